"""``ernie45 verify A B``: are two checkpoints the same model? Each of A and B is an HF directory, a Megatron
torch_dist directory or a GGUF file.

Three levels, each reported with exact numbers (table or JSON):

1. **Tensors.** All three formats are read as HF-named tensors (HF: the files; torch_dist: ``MegatronSource``, the
   bridge table's inverse ops; GGUF: :class:`GGUFView`, the GGUF table's inverse ops, lazily). Every name is
   "bit-exact" (same dtype, same bytes), "exact" (same values, different dtype: e.g. a bf16 tensor read back from
   an F32 GGUF), or differs by a max |Δ|. Names present on one side only are errors, except tensors a format drops
   by design (GGUF has no MTP tensors), which are listed with the reason.
2. **Logits** of the same token ids: max and mean |Δ|, cosine similarity, top-1 agreement. Each side runs in its
   own runtime: HF → transformers (eager; ``hf_runtime="megatron"`` runs it in Megatron-Core instead), torch_dist →
   Megatron-Core at TP1 loaded through the bridge from the ``MegatronSource`` view, both in ``dtype`` (fp32, or
   bf16 with the routers and expert bias in fp32 as transformers keeps them); GGUF → llama.cpp (``llama_cpp``, f32
   KV cache, no flash attention) when importable, else tensors only, with a note.
3. **Expert routing** per MoE layer and per pool (text / vision for VL): the fraction of a pool's tokens whose set
   of chosen experts is identical on both sides. llama.cpp does not expose its expert choice, so a GGUF side has
   no routing (said in the report).

Exit status of :func:`run`: 0 when the two are the same model; 1 when the tensor sets or shapes differ (beyond a
format's declared drops), any logit is NaN or inf, or a threshold is exceeded. Every threshold has a default that
means "the same model" for what is compared (:data:`DEFAULT_THRESHOLDS`: fp32 logits max |Δ| <= 1e-4, top-1 and
routing 100 %; looser for bf16 and per GGUF weight type; tensors within the rounding of their storage type,
:data:`STORAGE_REL`); a threshold given (``--atol``, ``--tensor-atol``, ``--min-cosine``, ``--min-top1``,
``--min-routing``) replaces its default, and fails when it cannot be checked (e.g. ``--min-routing`` with a GGUF
side), where an unchecked default is only a note. docs/verify.md has the measurements behind the defaults.

The runtimes (:func:`open_runtime`, :class:`Batch`, the routing captures) are shared by ``route_stats.py`` and
``generate.py``. torch and every heavy library are imported inside the functions that use them, so building the CLI
parser (``add_arguments``) stays instant. Memory: logits are compared by loading A, running it, freeing it, then
B -- one fp32 model at a time.

Legend: ``B`` batch, ``S`` sequence, ``V`` vocab, ``E`` experts per pool, ``K`` top-k, ``N`` tokens of one pool.
"""

from __future__ import annotations

import argparse
import contextlib
import json as jsonlib
import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterator

from .errors import InputError

__all__ = [
    "VerifyError",
    "verify",
    "VerifyReport",
    "TensorDiff",
    "LogitsDiff",
    "GGUFView",
    "open_view",
    "compare_tensors",
    "Batch",
    "PoolRouting",
    "Runtime",
    "TransformersRuntime",
    "MegatronRuntime",
    "LlamaCppRuntime",
    "open_runtime",
    "llama_cpp_available",
    "tokenizer_for",
    "declared_token_ids",
    "image_inputs",
    "image_block",
    "vision_special_ids",
    "check_text_ids",
    "random_text_ids",
    "logits_diff",
    "DEFAULT_THRESHOLDS",
    "STORAGE_REL",
    "add_arguments",
    "run",
]


class VerifyError(InputError):
    """A verification that cannot be set up (names the checkpoint / tensor / option)."""


# ----------------------------------------------------------------------------------------------------------------------
# tensor views under HF names


class GGUFView:
    """A GGUF file as HF-named tensors, read lazily (one GGUF tensor at a time) through the GGUF table's inverse ops.

    F32 / F16 / BF16 tensors come back in that dtype, bit for bit; quantised ones (Q8_0, ...) dequantised to f32.
    (``bridge.gguf.read_gguf_as_hf`` does the same eagerly, f32 for everything.)
    """

    format = "gguf"

    def __init__(self, path: str | Path) -> None:
        # the GGUF table's name patterns (bridge.gguf keeps them private; read_gguf_as_hf uses the same)
        from .bridge.gguf import SqueezeRow, StackExperts, gguf_name_patterns

        from .bridge.gguf import open_gguf

        self.path = Path(path)
        self.reader = open_gguf(path)  # header counts, checksum and shapes checked before anything is read
        patterns = gguf_name_patterns()
        self._where: dict[str, tuple[int, int]] = {}  # HF name -> (GGUF tensor index, position in op output)
        self._shape: dict[str, tuple[int, ...]] = {}
        self._op: dict[int, object] = {}  # GGUF tensor index -> its row's op
        unknown = []
        for i, t in enumerate(self.reader.tensors):
            hit = [(m, row) for pat, row in patterns if (m := pat.fullmatch(t.name))]
            if len(hit) != 1:
                unknown.append(t.name)
                continue
            m, row = hit[0]
            layer = int(m["L"]) if "L" in m.groupdict() else None
            shape = tuple(int(d) for d in reversed(t.shape))  # ggml ne -> numpy order
            self._op[i] = row.op
            if isinstance(row.op, StackExperts):
                for x in range(shape[0]):
                    name = row.hf.format(L=layer, X=x)
                    self._where[name], self._shape[name] = (i, x), shape[1:]
            else:
                name = row.hf.format(L=layer)
                self._where[name] = (i, 0)
                self._shape[name] = (1, *shape) if isinstance(row.op, SqueezeRow) else shape
        if unknown:
            raise VerifyError(f"{path}: {len(unknown)} GGUF tensor(s) match no row of the GGUF table: {unknown[:10]}")
        self._cache: tuple[int, tuple[torch.Tensor, ...]] | None = None

    def keys(self) -> list[str]:
        return list(self._where)

    def shape(self, name: str) -> tuple[int, ...]:
        return self._shape[name]

    def gguf_type(self, name: str) -> str:
        return self.reader.tensors[self._where[name][0]].tensor_type.name

    def weight_type(self) -> str:
        """The file's lossiest tensor type (``F32`` < ``F16`` < ``BF16`` < ``Q8_0`` < anything else): what its
        logits are judged by (:data:`DEFAULT_THRESHOLDS`)."""
        return max((t.tensor_type.name for t in self.reader.tensors), key=_gguf_rank, default="F32")

    def get(self, name: str) -> torch.Tensor:
        import gguf
        import numpy as np
        import torch
        from gguf import GGMLQuantizationType as QT

        if name not in self._where:
            raise VerifyError(f"{self.path}: no tensor {name} (under HF names)")
        i, pos = self._where[name]
        if self._cache is None or self._cache[0] != i:
            t = self.reader.tensors[i]
            shape = tuple(int(d) for d in reversed(t.shape))
            if t.tensor_type == QT.F32:
                x = torch.from_numpy(np.array(t.data, dtype=np.float32).reshape(shape))
            elif t.tensor_type == QT.F16:
                x = torch.from_numpy(np.array(t.data).view(np.float16).reshape(shape))
            elif t.tensor_type == QT.BF16:
                x = torch.from_numpy(np.array(t.data).view(np.int16).reshape(shape)).view(torch.bfloat16)
            else:
                deq = gguf.quants.dequantize(t.data, t.tensor_type)
                x = torch.from_numpy(np.array(deq, dtype=np.float32).reshape(shape))
            self._cache = (i, self._op[i].to_hf(x))
        return self._cache[1][pos].contiguous()


def open_view(path: str | Path, *, hf_config: str | Path | None = None):
    """``(format, view)``: the checkpoint at ``path`` as HF-named tensors (``keys()``, ``shape(n)``, ``get(n)``)."""
    from .convert import HFSource, MegatronSource
    from .inspect import detect_format

    fmt = detect_format(path)
    if fmt == "hf":
        return fmt, HFSource(path)
    if fmt == "megatron":
        return fmt, MegatronSource(path, hf_config=hf_config)
    return fmt, GGUFView(path)


def _dtype_name(view, name: str) -> str:
    if isinstance(view, GGUFView):
        return f"gguf {view.gguf_type(name)}"
    return str(view.dtype(name)).replace("torch.", "")


# ----------------------------------------------------------------------------------------------------------------------
# tensor comparison

_CHUNK = 1 << 22  # elements per step of a max |Δ| (bounds the float64 temporaries of a huge tensor)


# The default tensor bound (no --tensor-atol): the rounding of the coarser storage type, relative to the tensor's
# scale, |Δ| <= rel · (max |x| + tiny). rel is the type's machine epsilon (twice the worst round-to-nearest error,
# so one ulp anywhere passes); Q8_0 stores blocks of 32 as 8-bit multiples of an f16 scale max|x_block|/127, whose
# worst error max|x_block|·(1/254 + 2^-11) ≈ max|x|/226 stays below 1/127. ``tiny`` (f16's smallest normal) covers
# f16 subnormals and Q8_0 scales of near-zero blocks. Any other GGUF type has no default: give --tensor-atol.
STORAGE_REL = {
    "float64": 2.0**-52,
    "float32": 2.0**-23,
    "float16": 2.0**-10,
    "bfloat16": 2.0**-7,
    "gguf F32": 2.0**-23,
    "gguf F16": 2.0**-10,
    "gguf BF16": 2.0**-7,
    "gguf Q8_0": 1.0 / 127,
}
_TINY = 2.0**-14


@dataclass
class TensorDiff:
    """One HF name. ``status``: bit-exact | exact | differs | shape | only-a | only-b | dropped-a | dropped-b."""

    name: str
    status: str
    max_abs: float | None = None
    dtype_a: str | None = None
    dtype_b: str | None = None
    note: str = ""
    scale: float | None = None  # max |x| over both sides (for a "differs")

    @property
    def structural(self) -> bool:
        """A difference no tolerance can excuse: a missing tensor or a different shape."""
        return self.status in ("shape", "only-a", "only-b")

    def default_bound(self) -> float | None:
        """The storage-rounding bound on ``max_abs`` (see :data:`STORAGE_REL`); None: no default for these types."""
        if self.scale is None:
            return 0.0
        rel = [STORAGE_REL.get(d) for d in (self.dtype_a, self.dtype_b)]
        if None in rel:
            return None
        return max(rel) * (self.scale + _TINY)


def _bytes_equal(x: torch.Tensor, y: torch.Tensor) -> bool:
    import torch

    return torch.equal(x.contiguous().reshape(-1).view(torch.uint8), y.contiguous().reshape(-1).view(torch.uint8))


def _max_abs_diff(x: torch.Tensor, y: torch.Tensor) -> tuple[float, float]:
    """``(max |x - y|, max(|x|, |y|))`` in float64, NaN if any element is NaN."""
    xf, yf = x.reshape(-1), y.reshape(-1)
    worst = scale = 0.0
    for i in range(0, xf.numel(), _CHUNK):
        xd, yd = xf[i : i + _CHUNK].double(), yf[i : i + _CHUNK].double()
        d = (xd - yd).abs().max().item()
        if math.isnan(d):
            return math.nan, math.nan
        worst = max(worst, d)
        scale = max(scale, xd.abs().max().item(), yd.abs().max().item())
    return worst, scale


def _dropped_reason(fmt: str, name: str) -> str | None:
    """Why a tensor is absent from a checkpoint of format ``fmt`` by design (None: it should be there)."""
    if fmt == "gguf":
        from .bridge.gguf import ignored_reason

        return ignored_reason(name)
    return None


def compare_tensors(view_a, view_b, fmt_a: str, fmt_b: str) -> list[TensorDiff]:
    """Every HF name of either side, compared (sorted by name; one tensor of each side in memory at a time)."""
    keys_a, keys_b = set(view_a.keys()), set(view_b.keys())
    # visit in a torch_dist side's own order: its views cache one Megatron tensor (fused q/k/v, gate/up) at a time
    first, second = (view_b, view_a) if fmt_b == "megatron" else (view_a, view_b)
    seen = set(first.keys())
    order = list(first.keys()) + [n for n in second.keys() if n not in seen]
    out = []
    for name in order:
        if name not in keys_b:
            why = _dropped_reason(fmt_b, name)
            status = "dropped-b" if why else "only-a"
            out.append(TensorDiff(name, status, dtype_a=_dtype_name(view_a, name), note=why or ""))
            continue
        if name not in keys_a:
            why = _dropped_reason(fmt_a, name)
            status = "dropped-a" if why else "only-b"
            out.append(TensorDiff(name, status, dtype_b=_dtype_name(view_b, name), note=why or ""))
            continue
        da, db = _dtype_name(view_a, name), _dtype_name(view_b, name)
        sa, sb = tuple(view_a.shape(name)), tuple(view_b.shape(name))
        if sa != sb:
            out.append(TensorDiff(name, "shape", dtype_a=da, dtype_b=db, note=f"{list(sa)} vs {list(sb)}"))
            continue
        x, y = view_a.get(name), view_b.get(name)
        if x.dtype == y.dtype and _bytes_equal(x, y):
            out.append(TensorDiff(name, "bit-exact", 0.0, da, db))
            continue
        d, scale = _max_abs_diff(x, y)
        out.append(TensorDiff(name, "exact" if d == 0.0 else "differs", d, da, db, scale=None if d == 0.0 else scale))
    return sorted(out, key=lambda d: d.name)


# ----------------------------------------------------------------------------------------------------------------------
# inputs


@dataclass
class Batch:
    """Token ids ``[B, S]`` (no padding: all rows the same length) and, for VL models, one image's processor outputs."""

    input_ids: torch.Tensor
    pixel_values: torch.Tensor | None = None
    image_grid_thw: torch.Tensor | None = None

    def __post_init__(self) -> None:
        import torch

        if self.input_ids.dim() != 2:
            raise VerifyError(f"input_ids must be [B, S], got shape {list(self.input_ids.shape)}")
        self.input_ids = self.input_ids.to(torch.long)


def tokenizer_for(path: str | Path):
    """The checkpoint's ``transformers.AutoTokenizer`` if it ships tokenizer files, else None."""
    path = Path(path)
    files = ("tokenizer_config.json", "tokenizer.json", "tokenizer.model")
    if not path.is_dir() or not any((path / f).is_file() for f in files):
        return None
    import transformers

    return transformers.AutoTokenizer.from_pretrained(str(path))


def declared_token_ids(path: str | Path, key: str) -> set[int]:
    """``key`` ("eos_token_id", "bos_token_id") from ``generation_config.json``, else ``config.json`` (top level or
    ``text_config``); an int or a list there. Empty when neither names it."""
    for name in ("generation_config.json", "config.json"):
        f = Path(path) / name
        if not f.is_file():
            continue
        raw = jsonlib.loads(f.read_text())
        for d in (raw, raw.get("text_config") or {}):
            v = d.get(key)
            if v is not None:
                return {int(x) for x in v} if isinstance(v, list) else {int(v)}
    return set()


def image_inputs(image: str | Path, cfg, processor_dir: str | Path | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(pixel_values [N, C·p·p], image_grid_thw [1, 3])`` for one image file, as the HF processor makes them.

    The checkpoint's own image processor (``preprocessor_config.json``) when it ships one; otherwise transformers'
    ERNIE 4.5 VL image processor with its defaults (CLIP mean/std, 56² .. 14²·4·1280 pixels) and the config's
    patch / merge sizes.
    """
    from PIL import Image

    if cfg.family != "vl":
        raise VerifyError(f"an image needs a VL checkpoint; this one is {cfg.family}")
    path = Path(image)
    if not path.is_file():
        raise VerifyError(f"{path}: no such image file")
    try:
        img = Image.open(path).convert("RGB")
    except OSError as e:
        raise VerifyError(f"{path}: not an image PIL can read ({e})") from None
    if processor_dir is not None and (Path(processor_dir) / "preprocessor_config.json").is_file():
        import transformers

        proc = transformers.AutoImageProcessor.from_pretrained(str(processor_dir))
    else:
        from transformers.models.ernie4_5_vl_moe import image_processing_pil_ernie4_5_vl_moe as pil_processing

        proc = pil_processing.Ernie4_5_VLMoeImageProcessorPil(
            patch_size=cfg.vision.patch_size, merge_size=cfg.vision.spatial_merge_size
        )
    out = proc(images=[img], return_tensors="pt")
    return out["pixel_values"].float(), out["image_grid_thw"]


def image_block(cfg, grid_thw: torch.Tensor) -> list[int]:
    """``START + placeholders + END`` for one image of ``grid_thw`` (``t·h·w / m²`` placeholders, reference §F.1)."""
    t, h, w = (int(v) for v in grid_thw.reshape(-1)[:3])
    m = cfg.vision.spatial_merge_size
    ids = cfg.special_ids
    n = t * h * w // (m * m)
    return [ids["image_start_token_id"]] + [ids["image_token_id"]] * n + [ids["image_end_token_id"]]


def vision_special_ids(cfg) -> list[int]:
    """The image/video ids a VL config reserves (a text prompt must not contain them)."""
    if cfg is None or cfg.family != "vl":
        return []
    return sorted({v for k, v in cfg.special_ids.items() if v is not None and ("image" in k or "video" in k)})


def check_text_ids(ids: list[int], cfg, where: str) -> None:
    """Refuse text token ids a VL config reserves for images/videos: they would be taken for vision tokens."""
    reserved = set(vision_special_ids(cfg))
    bad = sorted({i for i in ids if i in reserved})
    if bad:
        names = {v: k for k, v in cfg.special_ids.items()}
        raise VerifyError(
            f"{where}: text token id(s) {bad} are this VL config's {[names[b] for b in bad]}; the tokenizer and "
            "config.json disagree (or the prompt ids are wrong)"
        )


# ----------------------------------------------------------------------------------------------------------------------
# routing records


@dataclass
class PoolRouting:
    """One MoE layer's pool: which tokens it routed (``mask_BS``) and the experts each chose (``chosen_BSE``)."""

    mask_BS: torch.Tensor
    chosen_BSE: torch.Tensor


Routing = dict[tuple[int, str], PoolRouting]


def _pool_routing(mask_BS: torch.Tensor, rows: torch.Tensor, order: str, E: int) -> PoolRouting:
    """Rows of a router's output (one per token of the pool, in ``order`` "BS" or "SB") -> :class:`PoolRouting`."""
    import torch

    B, S = mask_BS.shape
    if order == "BS":
        where = mask_BS.nonzero()
    else:  # Megatron flattens [S, B]
        where = mask_BS.t().nonzero().flip(1)
    rows = rows[: where.shape[0]]  # Megatron's VL pools may append dummy rows (EP/ETP > 1 only)
    if rows.shape[0] != where.shape[0]:
        raise VerifyError(f"a router produced {rows.shape[0]} rows for {where.shape[0]} tokens of its pool")
    if rows.dtype != torch.bool:  # top-k indices [N, K]
        rows = torch.zeros(rows.shape[0], E, dtype=torch.bool).scatter(1, rows, True)
    chosen = torch.zeros(B, S, E, dtype=torch.bool)
    chosen[where[:, 0], where[:, 1]] = rows
    return PoolRouting(mask_BS.clone(), chosen)


@contextlib.contextmanager
def _hooks(pairs) -> Iterator[None]:
    """Register ``(module, hook)`` forward hooks for the duration of the block."""
    handles = [m.register_forward_hook(h) for m, h in pairs]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def _vl_types(cfg, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
    from .megatron.vl_inputs import token_type_ids

    return token_type_ids(batch.input_ids, cfg)


# ----------------------------------------------------------------------------------------------------------------------
# runtimes


class Runtime:
    """A model that maps a :class:`Batch` to logits ``[B, S, V]`` and (where observable) routing."""

    name = ""
    routing_observable = True
    cfg = None

    def forward(self, batch: Batch, *, routing: bool = True) -> tuple[torch.Tensor, Routing | None]:
        """Logits ``[B, S, V]`` (fp32) and, when ``routing`` and observable, every router's choice."""
        raise NotImplementedError

    def close(self) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class TransformersRuntime(Runtime):
    """The reference: transformers, eager attention and experts, fp32 (or bf16: ``dtype``)."""

    name = "transformers"

    def __init__(self, path: str | Path, cfg, *, dtype: str = "fp32") -> None:
        import torch

        from .reference import load_reference

        self.cfg = cfg
        self.dtype = getattr(torch, DTYPES[dtype])
        self.model = load_reference(path, dtype=self.dtype, cfg=cfg)

    def forward(self, batch: Batch, *, routing: bool = True) -> tuple[torch.Tensor, Routing]:
        import torch

        from .reference import hf_routing

        cfg, ids = self.cfg, batch.input_ids
        B, S = ids.shape
        E = cfg.moe_num_experts or 0
        if cfg.family != "vl":
            if batch.pixel_values is not None:
                raise VerifyError("an image was given to a text-only model")
            with torch.no_grad(), (hf_routing(self.model) if routing else contextlib.nullcontext({})) as maps:
                logits = self.model(input_ids=ids).logits
            every = torch.ones(B, S, dtype=torch.bool)
            return logits.float(), {(L, "text"): _pool_routing(every, m, "BS", E) for L, m in maps.items()}
        mm, moe = _vl_types(cfg, batch)
        rows: dict[tuple[int, str], torch.Tensor] = {}
        pairs = []
        for L in cfg.moe_layers:
            mlp = self.model.model.language_model.layers[L].mlp
            for pool in ("text", "vision"):
                def hook(_m, _i, out, key=(L, pool)):
                    rows[key] = out[2].detach().clone()  # (router_logits, weights, selected_experts [N, K])

                pairs.append((getattr(mlp, f"{pool}_moe").gate, hook))
        kw = dict(input_ids=ids, mm_token_type_ids=mm, moe_mm_token_type_ids=moe)
        if batch.pixel_values is not None:
            kw.update(pixel_values=batch.pixel_values.to(self.dtype), image_grid_thw=batch.image_grid_thw)
        with torch.no_grad(), _hooks(pairs if routing else []):
            logits = self.model(**kw).logits
        vision_BS = moe > 0
        # HF runs every token through the text pool when no token is vision (Ernie4_5_VLMoeMoeBlock.forward)
        masks = {"text": ~vision_BS, "vision": vision_BS}
        return logits.float(), {k: _pool_routing(masks[k[1]], r, "BS", E) for k, r in rows.items()}

    def close(self) -> None:
        self.model = None


def _megatron_groups() -> bool:
    """Megatron's process groups at TP1·PP1·EP1 on a 1-process world; True when this call created them."""
    from megatron.core import parallel_state as ps

    from .layout import Layout
    from .megatron import parallel
    from .parity import ensure_single_process_group

    ensure_single_process_group()
    if ps.model_parallel_is_initialized():
        sizes = (ps.get_tensor_model_parallel_world_size(), ps.get_pipeline_model_parallel_world_size(),
                 ps.get_expert_model_parallel_world_size())  # fmt: skip
        if sizes != (1, 1, 1):
            raise VerifyError(f"Megatron is already initialised at TP·PP·EP = {sizes}; this runs at TP1·PP1·EP1")
        return False
    parallel.initialize(Layout())
    return True


class MegatronRuntime(Runtime):
    """Megatron-Core at TP1, weights loaded through the bridge from an HF-named source view."""

    name = "megatron-core"

    def __init__(self, source, *, vision_attn_implementation: str = "eager", dtype: str = "fp32") -> None:
        import torch
        from megatron.core.transformer.moe.router import TopKRouter

        from .bridge.live import load_hf
        from .bridge.tables import effective_tie
        from .layout import Layout

        self.cfg = cfg = source.cfg
        self.dtype = params_dtype = getattr(torch, DTYPES[dtype])
        tied = source.tied if hasattr(source, "tied") else effective_tie(cfg, source.keys())
        self._owned = _megatron_groups()
        try:
            torch.manual_seed(0)  # initial values are overwritten by load_hf; seeded so a run is repeatable anyway
            if cfg.family == "vl":
                from .megatron.vl_model import build_vl_model

                self.chunks = build_vl_model(cfg, Layout(), tie_word_embeddings=tied, params_dtype=params_dtype,
                                             vision_attn_implementation=vision_attn_implementation)  # fmt: skip
            else:
                from .megatron.model import build_model

                self.chunks = build_model(cfg, Layout(), tie_word_embeddings=tied, params_dtype=params_dtype)
            # transformers keeps every router weight in fp32 whatever the model dtype (_keep_in_fp32_modules_strict)
            # and so must we: Megatron creates it in params_dtype (its gating GEMM then runs in fp32 on bf16-rounded
            # weights). The expert bias is an fp32 buffer already (router.py).
            for chunk in self.chunks:
                for m in chunk.modules():
                    if isinstance(m, TopKRouter):
                        m.weight.data = m.weight.data.float()
            self.plan = load_hf(self.chunks, cfg, Layout(), source)
        except BaseException:
            self.close()
            raise

    def forward(self, batch: Batch, *, routing: bool = True) -> tuple[torch.Tensor, Routing]:
        import torch

        from .megatron.run import capture_routing, forward_logits

        cfg, ids = self.cfg, batch.input_ids
        B, S = ids.shape
        E = cfg.moe_num_experts or 0
        if cfg.family != "vl":
            if batch.pixel_values is not None:
                raise VerifyError("an image was given to a text-only model")
            with capture_routing(self.chunks, [0]) if routing else contextlib.nullcontext({}) as maps:
                logits = forward_logits(self.chunks, ids, vocab_size=cfg.vocab_size)
            every = torch.ones(B, S, dtype=torch.bool)
            return logits.float(), {(L, "text"): _pool_routing(every, m, "SB", E) for L, m in maps.items()}
        (chunk,) = self.chunks
        chunk.eval()
        mm, moe = _vl_types(cfg, batch)
        rows: dict[tuple[int, str], torch.Tensor] = {}
        pairs = []
        for layer in chunk.language_model.decoder.layers:
            if not hasattr(layer.mlp, "text_moe_layer"):
                continue
            for pool in ("text", "vision"):
                def hook(_m, _i, out, key=(layer.layer_number - 1, pool)):
                    rows[key] = out[1].detach().clone()  # (probs [N, E], routing_map [N, E])

                pairs.append((getattr(layer.mlp, f"{pool}_moe_layer").router, hook))
        kw = dict(mm_token_type_ids=mm, moe_mm_token_type_ids=moe)
        if batch.pixel_values is not None:
            kw.update(pixel_values=batch.pixel_values.to(self.dtype), image_grid_thw=batch.image_grid_thw)
        with torch.no_grad(), _hooks(pairs if routing else []):
            logits = chunk(ids, **kw)
        vision_BS = moe > 0
        masks = {"text": ~vision_BS, "vision": vision_BS}
        routed = {k: _pool_routing(masks[k[1]], r, "SB", E) for k, r in rows.items()}
        return logits[..., : cfg.vocab_size].float(), routed

    def close(self) -> None:
        self.chunks = None
        if self._owned:
            from .megatron import parallel

            parallel.destroy()
            self._owned = False


LLAMA_CPP_HINT = "pip install llama-cpp-python==0.3.36 (see pyproject's [llama] extra)"


def llama_cpp_available() -> bool:
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        return False
    return True


class LlamaCppRuntime(Runtime):
    """llama.cpp through llama-cpp-python: f32 KV cache and no flash attention, so f32 logits are comparable."""

    name = "llama.cpp"
    routing_observable = False

    def __init__(self, path: str | Path) -> None:
        if not llama_cpp_available():
            raise VerifyError(f"{path}: running a GGUF needs llama_cpp ({LLAMA_CPP_HINT})")
        self.path = Path(path)
        self._llm = None
        self._n_ctx = 0

    def llm(self, n_ctx: int):
        import llama_cpp

        if self._llm is None or self._n_ctx < n_ctx:
            self._n_ctx = max(64, n_ctx)
            f32 = 0  # GGML_TYPE_F32: llama.cpp's default f16 KV cache would measure f16 rounding, not the file
            self._llm = llama_cpp.Llama(
                str(self.path), n_ctx=self._n_ctx, logits_all=True, type_k=f32, type_v=f32, flash_attn=False,
                n_threads=os.cpu_count() or 1, seed=0, verbose=False,
            )  # fmt: skip
        return self._llm

    def forward(self, batch: Batch, *, routing: bool = True) -> tuple[torch.Tensor, None]:
        import numpy as np
        import torch

        if batch.pixel_values is not None:
            raise VerifyError(f"{self.path}: llama.cpp has no ERNIE 4.5 VL architecture; a GGUF cannot take an image")
        B, S = batch.input_ids.shape
        llm = self.llm(S)
        out = []
        for row in batch.input_ids.tolist():
            llm.reset()
            llm.eval(row)
            out.append(torch.from_numpy(np.array(llm.scores[:S], dtype=np.float32)))
        return torch.stack(out), None

    def close(self) -> None:
        if self._llm is not None:
            self._llm.close()
        self._llm = None


def open_runtime(path: str | Path, *, hf_runtime: str = "transformers", hf_config: str | Path | None = None,
                 vision_attn_implementation: str = "eager", dtype: str = "fp32") -> Runtime:  # fmt: skip
    """The runtime for a checkpoint: HF → ``hf_runtime`` ("transformers" | "megatron"), torch_dist → Megatron,
    GGUF → llama.cpp (fp32 only); ``dtype`` "fp32" | "bf16" for the first two."""
    from .inspect import detect_format

    if hf_runtime not in ("transformers", "megatron"):
        raise VerifyError(f"hf_runtime must be 'transformers' or 'megatron', not {hf_runtime!r}")
    if dtype not in DTYPES:
        raise VerifyError(f"dtype must be one of {list(DTYPES)}, not {dtype!r}")
    fmt = detect_format(path)
    if fmt == "gguf":
        if dtype != "fp32":
            raise VerifyError(f"{path}: llama.cpp runs a GGUF at its own tensor types; dtype {dtype} is not offered")
        return LlamaCppRuntime(path)
    from .convert import HFSource, MegatronSource

    source = HFSource(path) if fmt == "hf" else MegatronSource(path, hf_config=hf_config)
    if fmt == "hf" and hf_runtime == "transformers":
        return TransformersRuntime(path, source.cfg, dtype=dtype)
    return MegatronRuntime(source, vision_attn_implementation=vision_attn_implementation, dtype=dtype)


# ----------------------------------------------------------------------------------------------------------------------
# report


TABLE_MAX_TENSORS = 20  # non-structural differences listed in the table (JSON always has every tensor)

# What "the same model" means when no threshold is given, by what is compared (``--dtype``, or the GGUF side's
# weight type: :meth:`GGUFView.weight_type`). ``atol``: logits max |Δ|; ``min_cosine``: cosine similarity of the
# two sides' logits, each flattened to one vector (``[B·S·V]``); ``min_top1``: share of tokens with the same
# argmax; ``min_routing``: share of a pool's tokens with the same set of experts, in every MoE layer and pool.
# None: not judged by default. A given threshold replaces its default; NaN or inf logits always fail.
# docs/verify.md gives the measurements behind them.
DEFAULT_THRESHOLDS: dict[str, dict[str, float | None]] = {
    # two fp32 implementations differ only in summation order: measured <= 2.3e-6 on O(1) logits
    "fp32": dict(atol=1e-4, min_cosine=None, min_top1=1.0, min_routing=1.0),
    # both sides bf16 (routers and expert bias fp32): rounding flips near-tied experts and argmaxes; tiny random
    # MoE models measured cosine >= 0.9955, top-1 >= 0.875, routing >= 0.906 -- as far as transformers bf16 is
    # from transformers fp32 (docs/verify.md)
    "bf16": dict(atol=None, min_cosine=0.99, min_top1=0.8, min_routing=0.8),
    # llama.cpp computes in f32 (f32 KV cache, no flash attention); the weights' type sets the distance. Measured
    # with the file's weights in transformers fp32 (tiny dense / MoE): F16 cosine 0.9999993, top-1 100 %;
    # BF16 0.99930, 95 %; Q8_0 0.99829, 94.5 % (and 86.9 % top-1 in llama.cpp itself, tests/test_llama_cpp.py)
    "gguf F32": dict(atol=1e-4, min_cosine=None, min_top1=1.0, min_routing=None),
    "gguf F16": dict(atol=None, min_cosine=0.9999, min_top1=0.95, min_routing=None),
    "gguf BF16": dict(atol=None, min_cosine=0.995, min_top1=0.9, min_routing=None),
    "gguf Q8_0": dict(atol=None, min_cosine=0.99, min_top1=0.75, min_routing=None),
}
DTYPES = {"fp32": "float32", "bf16": "bfloat16"}
_JUDGED = (("atol", "logits max |Δ|", "<="), ("min_cosine", "cosine", ">="), ("min_top1", "top-1", ">="),
           ("min_routing", "routing", ">="))  # fmt: skip


@dataclass
class LogitsDiff:
    tokens: int
    max_abs: float
    mean_abs: float
    scale: float  # max |logit| of side A
    top1_agreement: float
    cosine: float = 1.0  # cosine similarity of all logits as one vector each (float64; judged by min_cosine)
    cosine_worst_token: float = 1.0  # the least similar token's logit vectors (reported)
    nonfinite_a: int = 0  # NaN / inf values among A's logits
    nonfinite_b: int = 0
    values: int = 0  # logits per side (B·S·V)


@dataclass
class VerifyReport:
    a: str
    b: str
    format_a: str
    format_b: str
    runtime_a: str | None = None
    runtime_b: str | None = None
    tensors: list[TensorDiff] | None = None
    logits: LogitsDiff | None = None
    routing: dict[int, dict[str, dict[str, float]]] | None = None  # layer -> pool -> {agreement, tokens}
    notes: list[str] = field(default_factory=list)
    thresholds: dict[str, float | None] = field(default_factory=dict)  # the ones given (None: not given)
    dtype: str = "fp32"
    defaults_key: str | None = None  # the DEFAULT_THRESHOLDS row that applies (None: no default for this pair)
    mismatch: str = ""  # the two runtimes' logits could not be compared (different shapes): always a failure

    # -- judgement ---------------------------------------------------------------------------------------------------
    @property
    def applied(self) -> dict[str, float | None]:
        """The logits / routing thresholds judged: each given one, else its default."""
        base = DEFAULT_THRESHOLDS.get(self.defaults_key or "", {})
        return {k: self.thresholds.get(k) if self.thresholds.get(k) is not None else base.get(k)
                for k, _, _ in _JUDGED}  # fmt: skip

    def failures(self) -> list[str]:
        """Why this verification fails (empty: it passes). See the module docstring for the rules."""
        out = []
        t, applied = self.thresholds, self.applied
        if self.tensors is not None:
            tol = t.get("tensor_atol")
            for d in self.tensors:
                if d.structural:
                    out.append(f"tensor {d.name}: {d.status} {d.note}".rstrip())
                elif d.max_abs is None:
                    continue
                elif tol is not None:
                    if not d.max_abs <= tol:
                        out.append(f"tensor {d.name}: max |Δ| {d.max_abs:.3e} > {tol:g}")
                elif (bound := d.default_bound()) is None:
                    out.append(f"tensor {d.name}: {d.dtype_a} vs {d.dtype_b} has no default bound; give --tensor-atol")
                elif not d.max_abs <= bound:
                    out.append(f"tensor {d.name}: max |Δ| {d.max_abs:.3e} > {bound:.3e} (rounding of "
                               f"{d.dtype_a} / {d.dtype_b} at max |x| {d.scale:.3g})")  # fmt: skip
        elif t.get("tensor_atol") is not None:
            out.append("--tensor-atol given but tensors were not compared")
        if self.mismatch:
            out.append(self.mismatch)
        g = self.logits
        if g is not None:
            for side, n in (("A", g.nonfinite_a), ("B", g.nonfinite_b)):
                if n:
                    out.append(f"logits of {side} contain NaN or inf ({n} of {g.values} values)")
        for key, what in (("atol", "logits max |Δ|"), ("min_cosine", "cosine"), ("min_top1", "top-1 agreement")):
            if g is None:
                if t.get(key) is not None:  # a default that could not be checked is only a note
                    out.append(f"{what} could not be checked: logits were not compared (see notes)")
                continue
            value = dict(atol=g.max_abs, min_cosine=g.cosine, min_top1=g.top1_agreement)[key]
            bound = applied[key]
            if bound is None:
                continue
            if key == "atol" and not value <= bound:
                out.append(f"{what} {value:.3e} > {bound:g}")
            elif key != "atol" and not value >= bound:
                out.append(f"{what} {value:.6f} < {bound:g}")
        if self.routing is None:
            if t.get("min_routing") is not None:
                out.append("routing agreement could not be checked (see notes)")
        elif applied["min_routing"] is not None:
            out += [f"routing layer {L} {pool}: {r['agreement']:.4f} < {applied['min_routing']:g}"
                    for L, pools in sorted(self.routing.items()) for pool, r in pools.items()
                    if not r["agreement"] >= applied["min_routing"]]  # fmt: skip
        return out

    def judged(self) -> str:
        """One line: what the tensors and logits were judged against."""
        t = self.thresholds
        if self.tensors is None:
            tensors = ""
        elif t.get("tensor_atol") is not None:
            tensors = f"tensors max |Δ| <= {t['tensor_atol']:g} (given); "
        else:
            tensors = "tensors within their storage type's rounding; "
        if self.logits is None:
            return f"{tensors}logits not compared".strip()
        judged = [(k, what, op, v) for k, what, op in _JUDGED if (v := self.applied[k]) is not None]
        given = [t.get(k) is not None for k, _, _, _ in judged]
        if judged and all(given):
            source, given = "given", [False] * len(judged)
        else:
            source = f"{self.defaults_key} defaults" if self.defaults_key else "no defaults for this pair"
        parts = [f"{what} {op} {v:g}" + (" (given)" if g else "") for (_, what, op, v), g in zip(judged, given)]
        return f"{tensors}{source}: " + (", ".join(parts) if parts else "nothing judged") + "; NaN / inf fail"

    @property
    def ok(self) -> bool:
        return not self.failures()

    # -- output ------------------------------------------------------------------------------------------------------
    def table(self, *, all_tensors: bool = False) -> str:
        lines = [
            f"verify  A = {self.a}  ({self.format_a}{', ' + self.runtime_a if self.runtime_a else ''})",
            f"        B = {self.b}  ({self.format_b}{', ' + self.runtime_b if self.runtime_b else ''})",
        ]
        if self.tensors is not None:
            counts: dict[str, int] = {}
            for d in self.tensors:
                counts[d.status] = counts.get(d.status, 0) + 1
            summary = ", ".join(f"{n} {s}" for s, n in sorted(counts.items(), key=lambda kv: -kv[1]))
            lines.append(f"  tensors  {len(self.tensors)} names under HF naming: {summary}")
            shown = self.tensors
            if not all_tensors:  # every structural problem, then the largest differences first
                others = [d for d in self.tensors if d.status != "bit-exact" and not d.structural]
                others.sort(key=_largest_first)
                shown = [d for d in self.tensors if d.structural] + others[:TABLE_MAX_TENSORS]
                if len(others) > TABLE_MAX_TENSORS:
                    lines.append(f"    (the {TABLE_MAX_TENSORS} largest of {len(others)} differences; "
                                 "--all-tensors lists all)")  # fmt: skip
            for d in shown:
                lines.append(f"    {d.name:<64} {_detail(d)}")
        if self.logits is not None:
            g = self.logits
            lines.append(f"  logits   {g.tokens} tokens: max |Δ| {g.max_abs:.3e}   mean |Δ| {g.mean_abs:.3e}   "
                         f"(max |logit| {g.scale:.3f})   cosine {g.cosine:.7f} (worst token "
                         f"{g.cosine_worst_token:.5f})   top-1 {g.top1_agreement:.2%} identical")  # fmt: skip
        if self.routing is not None:
            for L, pools in sorted(self.routing.items()):
                for pool, r in pools.items():
                    lines.append(f"  routing  layer {L:>3} {pool:<6}: {r['agreement']:.2%} of {int(r['tokens'])} "
                                 "tokens chose the same experts")  # fmt: skip
        lines += [f"  note     {n}" for n in self.notes]
        lines.append(f"  judged   {self.judged()}")
        fails = self.failures()
        lines.append("  result   OK" if not fails else "  result   FAILED\n" + "\n".join(f"    - {f}" for f in fails))
        return "\n".join(lines)

    def to_json(self) -> dict:
        d = asdict(self)
        d["routing"] = None if self.routing is None else {str(k): v for k, v in self.routing.items()}
        d["applied"] = self.applied
        d["failures"] = self.failures()
        d["ok"] = not d["failures"]
        return d


def _largest_first(d: TensorDiff) -> float:
    """Sort key: NaN first, then the largest |Δ|; tensors without a |Δ| (dropped by design) last."""
    if d.max_abs is None:
        return math.inf
    return -math.inf if math.isnan(d.max_abs) else -d.max_abs


def _detail(d: TensorDiff) -> str:
    if d.status == "bit-exact":
        return f"bit-exact ({d.dtype_a})"
    if d.status == "exact":
        return f"equal values ({d.dtype_a} vs {d.dtype_b})"
    if d.status == "differs":
        return f"max |Δ| {d.max_abs:.3e} ({d.dtype_a} vs {d.dtype_b})"
    return {"shape": f"SHAPE {d.note}", "only-a": "ONLY IN A", "only-b": "ONLY IN B",
            "dropped-a": f"not in A by design: {d.note[:90]}",
            "dropped-b": f"not in B by design: {d.note[:90]}"}[d.status]  # fmt: skip


# ----------------------------------------------------------------------------------------------------------------------
# verify


def _prompt_batch(prompt_ids, cfg, vocab: int, image, processor_dir) -> Batch:
    """The ids both sides run: the given rows, or 2×16 seeded random ids (below the VL special ids for VL)."""
    import torch

    if prompt_ids is None:
        ids = random_text_ids(cfg, vocab, 2, 16, seed=0)
    else:
        ids = torch.as_tensor(prompt_ids, dtype=torch.long)
        if ids.dim() == 1:
            ids = ids.unsqueeze(0)
        if ids.dim() != 2 or ids.numel() == 0:
            raise VerifyError("prompt_ids must be a non-empty list of equal-length rows of token ids")
        if int(ids.min()) < 0 or int(ids.max()) >= vocab:
            raise VerifyError(f"prompt_ids must lie in [0, {vocab}); got [{int(ids.min())}, {int(ids.max())}]")
    if cfg is not None and cfg.family == "vl":
        check_text_ids(ids.reshape(-1).tolist(), cfg, "prompt_ids")
    if image is None:
        return Batch(ids)
    if cfg is None or cfg.family != "vl":
        raise VerifyError("--image needs VL checkpoints")
    pixels, grid = image_inputs(image, cfg, processor_dir)
    row = ids[0].tolist()
    half = len(row) // 2
    return Batch(torch.tensor([row[:half] + image_block(cfg, grid) + row[half:]]), pixels, grid)


def random_text_ids(cfg, vocab: int, B: int, S: int, *, seed: int) -> torch.Tensor:
    """``[B, S]`` seeded random text ids, never an image / video id of a VL config (nor 0 there)."""
    import torch

    reserved = set(vision_special_ids(cfg))
    allowed = torch.tensor([i for i in range(1 if reserved else 0, vocab) if i not in reserved])
    return allowed[torch.randint(0, len(allowed), (B, S), generator=torch.Generator().manual_seed(seed))]


def _routing_agreement(ra: Routing, rb: Routing) -> dict[int, dict[str, dict[str, float]]]:
    import torch

    if set(ra) != set(rb):  # the configs are checked first; this would be a runtime bug
        raise VerifyError(f"the two sides routed different (layer, pool)s: {sorted(set(ra) ^ set(rb))}")
    out: dict[int, dict[str, dict[str, float]]] = {}
    for key in sorted(ra):
        a, b = ra[key], rb[key]
        if not torch.equal(a.mask_BS, b.mask_BS):
            raise VerifyError(f"layer {key[0]} {key[1]} pool: the two sides sent different tokens to it")
        n = int(a.mask_BS.sum())
        if n == 0:
            continue
        same = (a.chosen_BSE == b.chosen_BSE).all(-1)[a.mask_BS]
        out.setdefault(key[0], {})[key[1]] = {"agreement": same.float().mean().item(), "tokens": n}
    return out


def verify(
    a: str | Path,
    b: str | Path,
    *,
    prompt_ids=None,
    image: str | Path | None = None,
    atol: float | None = None,
    tensor_atol: float | None = None,
    min_cosine: float | None = None,
    min_top1: float | None = None,
    min_routing: float | None = None,
    tensors: bool = True,
    logits: bool = True,
    hf_runtime: str = "transformers",
    hf_config: str | Path | None = None,
    dtype: str = "fp32",
) -> VerifyReport:
    """Compare checkpoints ``a`` and ``b`` (HF dir / torch_dist dir / GGUF file): tensors, logits, routing.

    ``prompt_ids``: rows of token ids (default: 2×16 seeded random ids); ``image``: an image file for VL checkpoints
    (placed in the middle of the first row). The thresholds only decide :meth:`VerifyReport.failures`; one not given
    takes its default (:data:`DEFAULT_THRESHOLDS`, by ``dtype`` or a GGUF side's weight type; tensors: the storage
    type's rounding, :data:`STORAGE_REL`). ``dtype`` ("fp32" | "bf16"): both runtimes compute in it (routers and
    expert bias in fp32, as transformers keeps them). ``hf_runtime="megatron"`` runs HF directories in Megatron-Core
    instead of transformers. ``hf_config``: the config.json for a torch_dist directory written without one.
    """
    if dtype not in DTYPES:
        raise VerifyError(f"dtype must be one of {list(DTYPES)}, not {dtype!r}")
    fmt_a, view_a = open_view(a, hf_config=hf_config)
    fmt_b, view_b = open_view(b, hf_config=hf_config)
    thresholds = dict(atol=atol, tensor_atol=tensor_atol, min_cosine=min_cosine, min_top1=min_top1,
                      min_routing=min_routing)  # fmt: skip
    ggufs = [v for v in (view_a, view_b) if isinstance(v, GGUFView)]
    if ggufs and dtype != "fp32":
        raise VerifyError(f"--dtype {dtype}: llama.cpp runs a GGUF at its own tensor types; compare it at fp32")
    key = f"gguf {max((v.weight_type() for v in ggufs), key=_gguf_rank)}" if ggufs else dtype
    report = VerifyReport(str(a), str(b), fmt_a, fmt_b, thresholds=thresholds, dtype=dtype,
                          defaults_key=key if key in DEFAULT_THRESHOLDS else None)  # fmt: skip
    if report.defaults_key is None:
        report.notes.append(f"no default logits thresholds for {key}: give --atol / --min-cosine / --min-top1")
    cfgs = [v.cfg for v in (view_a, view_b) if hasattr(v, "cfg")]
    shape_of = [(c.family, c.vocab_size, c.mlp_layer_types) for c in cfgs]
    different = len(cfgs) == 2 and shape_of[0] != shape_of[1]
    if different:
        a_, b_ = (f"{c.family}, vocab {c.vocab_size}, {''.join('S' if t == 'sparse' else 'D' for t in layers)}"
                  for c, (_, _, layers) in zip(cfgs, shape_of))  # fmt: skip
        report.notes.append(f"different models: {a_} vs {b_}")
    if tensors:
        report.tensors = compare_tensors(view_a, view_b, fmt_a, fmt_b)
    if not logits:
        return report
    if different:
        report.notes.append("logits and routing not compared: the configs describe different models")
        return report
    missing_llama = [p for p, f in ((a, fmt_a), (b, fmt_b)) if f == "gguf" and not llama_cpp_available()]
    if missing_llama:
        report.notes.append(f"logits and routing not compared: {missing_llama[0]} is a GGUF and llama_cpp is not "
                            f"importable ({LLAMA_CPP_HINT}); tensors only")  # fmt: skip
        return report
    cfg = cfgs[0] if cfgs else None
    vocab = cfg.vocab_size if cfg is not None else view_a.shape("model.embed_tokens.weight")[0]
    batch = _prompt_batch(prompt_ids, cfg, vocab, image, next((Path(p) for p in (a, b) if Path(p).is_dir()), None))
    results = []
    for path in (a, b):
        with open_runtime(path, hf_runtime=hf_runtime, hf_config=hf_config, dtype=dtype) as rt:
            out, routing = rt.forward(batch)
            results.append((rt.name, rt.routing_observable, out, routing))
    (report.runtime_a, obs_a, la, ra), (report.runtime_b, obs_b, lb, rb) = results
    if la.shape != lb.shape:  # e.g. a GGUF whose vocab differs from the HF side's: no config to compare first
        report.mismatch = f"logits shapes differ: {list(la.shape)} vs {list(lb.shape)} (routing not compared)"
        return report
    report.logits = logits_diff(la, lb)
    if obs_a and obs_b:
        report.routing = _routing_agreement(ra, rb)
        if cfg is not None and not cfg.is_moe:
            report.notes.append("dense model: no expert routing to compare")
    else:
        side = report.a if not obs_a else report.b
        report.notes.append(f"routing not compared: llama.cpp does not expose its expert choice ({side})")
    return report


def _gguf_rank(weight_type: str) -> int:
    return {"F32": 0, "F16": 1, "BF16": 2, "Q8_0": 3}.get(weight_type, 4)


def logits_diff(la_BSV: torch.Tensor, lb_BSV: torch.Tensor) -> LogitsDiff:
    """Max / mean |Δ|, cosine similarity (all logits, and the worst token; float64), top-1 agreement, NaN / inf
    counts."""
    import torch

    a, b = la_BSV.double(), lb_BSV.double()
    diff = (a - b).abs()
    a_TV, b_TV = a.reshape(-1, a.shape[-1]), b.reshape(-1, b.shape[-1])
    cos_T = torch.nn.functional.cosine_similarity(a_TV, b_TV, dim=-1, eps=1e-30)
    cos = torch.nn.functional.cosine_similarity(a.reshape(-1), b.reshape(-1), dim=0, eps=1e-30)
    return LogitsDiff(
        tokens=a.shape[0] * a.shape[1], max_abs=diff.max().item(), mean_abs=diff.mean().item(),
        scale=a.abs().max().item(), top1_agreement=(a.argmax(-1) == b.argmax(-1)).double().mean().item(),
        cosine=cos.item(), cosine_worst_token=math.nan if cos_T.isnan().any() else cos_T.min().item(),
        nonfinite_a=int((~a.isfinite()).sum()), nonfinite_b=int((~b.isfinite()).sum()), values=a.numel(),
    )  # fmt: skip


# ----------------------------------------------------------------------------------------------------------------------
# command line


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("a", type=Path, help="HF directory, Megatron torch_dist directory or GGUF file")
    p.add_argument("b", type=Path, help="the checkpoint to compare with A (any of the three formats)")
    p.add_argument("--prompt", action="append", default=None, metavar="TEXT",
                   help="prompt text, tokenized with the checkpoint's tokenizer; repeat for more rows")
    p.add_argument("--prompt-ids", action="append", default=None, metavar="IDS",
                   help='a row of whitespace-separated token ids, e.g. "1 17 42"; repeat for more rows (equal '
                        "lengths). Default: 2 rows of 16 seeded random ids")  # fmt: skip
    p.add_argument("--image", type=Path, default=None, help="an image file for VL checkpoints (inserted mid-prompt)")
    p.add_argument("--dtype", choices=list(DTYPES), default="fp32",
                   help="what both sides compute in (routers and expert bias stay fp32, as in transformers); "
                        "sets the default thresholds (docs/verify.md has them and the measurements behind them)")
    p.add_argument("--atol", type=float, default=None,
                   help="fail (exit 1) above this logits max |Δ| (default: 1e-4 at fp32 and for an F32 GGUF, "
                        "else not judged)")  # fmt: skip
    p.add_argument("--tensor-atol", type=float, default=None,
                   help="fail above this max |Δ| of any tensor (0: equal values; default: the rounding of the "
                        "coarser storage type, eps x max |x|, Q8_0 max |x| / 127)")  # fmt: skip
    p.add_argument("--min-cosine", type=float, default=None,
                   help="fail below this cosine similarity of the logits (default: bf16 0.99, GGUF F16 0.9999, "
                        "BF16 0.995, Q8_0 0.99; fp32 not judged)")  # fmt: skip
    p.add_argument("--min-top1", type=float, default=None,
                   help="fail below this top-1 agreement, 0..1 (default: fp32 / F32 GGUF 1, bf16 0.8, GGUF F16 "
                        "0.95, BF16 0.9, Q8_0 0.75)")  # fmt: skip
    p.add_argument("--min-routing", type=float, default=None,
                   help="fail below this routing agreement in any MoE layer / pool, 0..1 (default: fp32 1, "
                        "bf16 0.8; not observable with a GGUF side)")  # fmt: skip
    p.add_argument("--no-tensors", action="store_true", help="skip the tensor comparison")
    p.add_argument("--no-logits", action="store_true", help="skip logits and routing (tensors only)")
    p.add_argument("--hf-runtime", choices=["transformers", "megatron"], default="transformers",
                   help="what runs an HF directory (default: transformers, the reference)")  # fmt: skip
    p.add_argument("--hf-config", type=Path, default=None, help="config.json for a torch_dist directory without one")
    p.add_argument("--all-tensors", action="store_true", help="list bit-exact tensors too")
    p.add_argument("--json", action="store_true", help="print the report as JSON")


def _parse_ids(rows: list[str] | None):
    if rows is None:
        return None
    try:
        return [[int(x) for x in row.split()] for row in rows]
    except ValueError:
        raise VerifyError(f"--prompt-ids takes whitespace-separated integers, got {rows}") from None


def _tokenize(a: Path, b: Path, prompts: list[str]) -> list[list[int]]:
    """Token ids of the prompts by the first of A, B that ships a tokenizer; rows cut to the shortest."""
    tok = next((t for t in map(tokenizer_for, (a, b)) if t is not None), None)
    if tok is None:
        raise VerifyError(f"--prompt needs a tokenizer and neither {a} nor {b} ships one; use --prompt-ids")
    rows = [tok(p)["input_ids"] for p in prompts]
    n = min(len(r) for r in rows)
    if n == 0:
        raise VerifyError("--prompt: a prompt tokenized to nothing")
    return [r[:n] for r in rows]


def run(args: argparse.Namespace) -> int:
    if args.prompt and args.prompt_ids:
        raise VerifyError("give --prompt or --prompt-ids, not both")
    ids = _tokenize(args.a, args.b, args.prompt) if args.prompt else _parse_ids(args.prompt_ids)
    report = verify(
        args.a, args.b, prompt_ids=ids, image=args.image, atol=args.atol, tensor_atol=args.tensor_atol,
        min_cosine=args.min_cosine, min_top1=args.min_top1, min_routing=args.min_routing,
        tensors=not args.no_tensors, logits=not args.no_logits, hf_runtime=args.hf_runtime, hf_config=args.hf_config,
        dtype=args.dtype,
    )  # fmt: skip
    print(jsonlib.dumps(report.to_json(), indent=2) if args.json else report.table(all_tensors=args.all_tensors))
    return 0 if report.ok else 1
