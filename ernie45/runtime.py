"""The runtimes: a checkpoint that maps a :class:`~ernie45.inputs.Batch` to logits and expert choices.

* :class:`TransformersRuntime` -- the reference: transformers, eager attention and experts, fp32 or bf16;
* :class:`MegatronRuntime`     -- Megatron-Core at TP1·PP1·EP1 on a 1-process world, weights loaded through the
  bridge from an HF-named source (an HF directory, or a torch_dist directory's ``MegatronSource`` view);
* :class:`LlamaCppRuntime`     -- llama.cpp (``llama_cpp``, f32 KV cache, no flash attention) for a GGUF file.

:func:`open_runtime` picks one for a path. Used by ``verify`` (and through it ``parity``), ``generate`` and
``route-stats``.

Routing: :func:`capture_routing` is the one recorder of expert choices, for either implementation (transformers'
gates, Megatron-Core's routers) and any family (text: one pool per MoE layer; VL: a text and a vision pool). It
keys each pool by ``(layer, "text" | "vision")`` and returns a :class:`PoolRouting` in ``[B, S]`` token order:
which tokens the pool routed and the experts each chose. llama.cpp does not expose its expert choice.

Legend: ``B`` batch, ``S`` sequence, ``V`` vocab, ``E`` experts per pool, ``K`` top-k, ``N`` tokens of one pool.
"""

from __future__ import annotations

import contextlib
import os
import re
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import torch

from .errors import InputError
from .inputs import Batch
from .layout import Layout

__all__ = [
    "BackendError",
    "DTYPES",
    "LLAMA_CPP_HINT",
    "PoolRouting",
    "Routing",
    "capture_routing",
    "vl_types",
    "Runtime",
    "TransformersRuntime",
    "MegatronRuntime",
    "LlamaCppRuntime",
    "open_runtime",
    "llama_cpp_available",
    "ensure_single_process_group",
]

DTYPES = {"fp32": "float32", "bf16": "bfloat16"}
LLAMA_CPP_HINT = "pip install llama-cpp-python==0.3.36 (see pyproject's [llama] extra)"


class BackendError(InputError):
    """A checkpoint, backend or dtype that a runtime cannot run (names it and why)."""


# ----------------------------------------------------------------------------------------------------------------------
# routing capture


@dataclass
class PoolRouting:
    """One MoE layer's pool: which tokens it routed (``mask_BS``) and the experts each chose (``chosen_BSE``)."""

    mask_BS: torch.Tensor
    chosen_BSE: torch.Tensor


Routing = dict[tuple[int, str], PoolRouting]


@dataclass(frozen=True)
class _RouterSite:
    """Where one implementation's routers sit (full module names) and how a router reports its choice."""

    name: re.Pattern  # groups: ``layer`` (the decoder layer's module name), ``pool`` (VL: text | vision)
    order: str  # how the pool's tokens are flattened: "BS" (transformers) or "SB" (Megatron-Core)
    choice: int  # which output holds the choice: indices [N, K] (transformers) or a bool map [N, E] (Megatron)


_ROUTER_SITES = {
    # gate(h) -> (router_logits, routing_weights, selected_experts [N, K]); layer index = the name's
    "transformers": _RouterSite(re.compile(r"(?P<layer>.*layers\.(?P<L>\d+))\.mlp\.(?:(?P<pool>text|vision)_moe\.)?gate"),
                                "BS", 2),
    # router(h) -> (probs [N, E], routing_map [N, E] bool); layer index = the layer's global layer_number - 1
    "megatron": _RouterSite(re.compile(r"(?P<layer>.*layers\.\d+)\.mlp\.(?:(?P<pool>text|vision)_moe_layer\.)?router"),
                            "SB", 1),
}  # fmt: skip


def vl_types(cfg, input_ids_BS: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(mm_token_type_ids, moe_mm_token_type_ids)`` of a VL batch, as the HF processor makes them."""
    from .megatron.vl_inputs import token_type_ids

    return token_type_ids(input_ids_BS, cfg)


@contextlib.contextmanager
def capture_routing(modules: Sequence[torch.nn.Module], kind: str, cfg, input_ids_BS: torch.Tensor) -> Iterator[Routing]:
    """Record every router's choice while the block runs one forward of ``input_ids_BS``; on exit the yielded dict
    holds ``{(layer, pool): PoolRouting}`` for every MoE layer of ``modules`` (a transformers model, or this rank's
    Megatron-Core chunks: ``kind`` "transformers" | "megatron").

    Pools: a text model routes every token through its one pool ("text"); a VL model sends its MoE vision tokens
    (image/video placeholders and their start/end tokens) to "vision", the rest to "text". transformers runs every
    token through the text pool when no token is vision (``Ernie4_5_VLMoeMoeBlock.forward``), which is what the
    text mask then says. Megatron's VL pools may append dummy rows (EP/ETP > 1 only): they are dropped.
    """
    site = _ROUTER_SITES[kind]
    B, S = input_ids_BS.shape
    if cfg.family == "vl":
        vision_BS = vl_types(cfg, input_ids_BS)[1] > 0
        masks = {"text": ~vision_BS, "vision": vision_BS}
    else:
        masks = {"text": torch.ones(B, S, dtype=torch.bool)}
    rows: dict[tuple[int, str], torch.Tensor] = {}

    def record(key):
        def hook(_module, _args, out):
            if key in rows:  # a second forward would mix two batches' tokens in one record
                raise RuntimeError(f"layer {key[0]} {key[1]} pool routed twice: capture one forward at a time")
            rows[key] = out[site.choice].detach().clone()

        return hook

    handles = []
    for chunk in modules:
        for name, module in chunk.named_modules():
            if (m := site.name.fullmatch(name)) is None:
                continue
            layer = int(m["L"]) if kind == "transformers" else chunk.get_submodule(m["layer"]).layer_number - 1
            handles.append(module.register_forward_hook(record((layer, m["pool"] or "text"))))
    out: Routing = {}
    try:
        yield out
    finally:
        for h in handles:
            h.remove()
    E = cfg.moe_num_experts
    for (layer, pool), rows_N in sorted(rows.items()):
        mask_BS = masks[pool]
        where = mask_BS.nonzero() if site.order == "BS" else mask_BS.t().nonzero().flip(1)  # (b, s) per row
        rows_N = rows_N[: where.shape[0]]
        if rows_N.shape[0] != where.shape[0]:
            raise RuntimeError(f"layer {layer} {pool}: a router produced {rows_N.shape[0]} rows for "
                               f"{where.shape[0]} tokens of its pool")  # fmt: skip
        if rows_N.dtype != torch.bool:  # top-k indices [N, K] -> a bool map [N, E]
            rows_N = torch.zeros(rows_N.shape[0], E, dtype=torch.bool).scatter(1, rows_N, True)
        chosen_BSE = torch.zeros(B, S, E, dtype=torch.bool)
        chosen_BSE[where[:, 0], where[:, 1]] = rows_N
        out[(layer, pool)] = PoolRouting(mask_BS.clone(), chosen_BSE)


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


def _no_capture() -> contextlib.AbstractContextManager[Routing]:
    return contextlib.nullcontext({})


class TransformersRuntime(Runtime):
    """The reference: transformers, eager attention and experts, fp32 (or bf16: ``dtype``)."""

    name = "transformers"

    def __init__(self, path: str | Path, cfg, *, dtype: str = "fp32") -> None:
        from .reference import load_reference

        self.cfg = cfg
        self.dtype = getattr(torch, DTYPES[dtype])
        self.model = load_reference(path, dtype=self.dtype, cfg=cfg)

    def forward(self, batch: Batch, *, routing: bool = True) -> tuple[torch.Tensor, Routing]:
        cfg, ids = self.cfg, batch.input_ids
        kw = dict(input_ids=ids)
        if cfg.family != "vl":
            if batch.pixel_values is not None:
                raise BackendError("an image was given to a text-only model")
        else:
            mm, moe = vl_types(cfg, ids)
            kw.update(mm_token_type_ids=mm, moe_mm_token_type_ids=moe)
            if batch.pixel_values is not None:
                kw.update(pixel_values=batch.pixel_values.to(self.dtype), image_grid_thw=batch.image_grid_thw)
        capture = capture_routing([self.model], "transformers", cfg, ids) if routing else _no_capture()
        with torch.no_grad(), capture as routed:
            logits = self.model(**kw).logits
        return logits.float(), routed

    def close(self) -> None:
        self.model = None


def ensure_single_process_group() -> None:
    """A 1-process gloo world (Megatron needs process groups even at TP=PP=EP=1)."""
    import torch.distributed as dist

    if dist.is_initialized():
        return
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ["MASTER_PORT"] = str(port)
    dist.init_process_group("gloo", rank=0, world_size=1)


def _megatron_groups() -> bool:
    """Megatron's process groups at TP1·PP1·EP1 on a 1-process world; True when this call created them."""
    from megatron.core import parallel_state as ps

    from .megatron import parallel

    ensure_single_process_group()
    if ps.model_parallel_is_initialized():
        sizes = (ps.get_tensor_model_parallel_world_size(), ps.get_pipeline_model_parallel_world_size(),
                 ps.get_expert_model_parallel_world_size())  # fmt: skip
        if sizes != (1, 1, 1):
            raise BackendError(f"Megatron is already initialised at TP·PP·EP = {sizes}; this runs at TP1·PP1·EP1")
        return False
    parallel.initialize(Layout())
    return True


class MegatronRuntime(Runtime):
    """Megatron-Core at TP1, weights loaded through the bridge from an HF-named source view."""

    name = "megatron-core"

    def __init__(self, source, *, vision_attn_implementation: str = "eager", dtype: str = "fp32") -> None:
        from megatron.core.transformer.moe.router import TopKRouter

        from .bridge.live import load_hf

        self.cfg = cfg = source.cfg
        self.dtype = params_dtype = getattr(torch, DTYPES[dtype])
        tied = source.tied
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
        from .megatron.run import forward_logits

        cfg, ids = self.cfg, batch.input_ids
        capture = capture_routing(self.chunks, "megatron", cfg, ids) if routing else _no_capture()
        if cfg.family != "vl":
            if batch.pixel_values is not None:
                raise BackendError("an image was given to a text-only model")
            with capture as routed:
                logits = forward_logits(self.chunks, ids, vocab_size=cfg.vocab_size)
            return logits.float(), routed
        (chunk,) = self.chunks
        chunk.eval()
        mm, moe = vl_types(cfg, ids)
        kw = dict(mm_token_type_ids=mm, moe_mm_token_type_ids=moe)
        if batch.pixel_values is not None:
            kw.update(pixel_values=batch.pixel_values.to(self.dtype), image_grid_thw=batch.image_grid_thw)
        with torch.no_grad(), capture as routed:
            logits = chunk(ids, **kw)
        return logits[..., : cfg.vocab_size].float(), routed

    def close(self) -> None:
        self.chunks = None
        if self._owned:
            from .megatron import parallel

            parallel.destroy()
            self._owned = False


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
            raise BackendError(f"{path}: running a GGUF needs llama_cpp ({LLAMA_CPP_HINT})")
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

        if batch.pixel_values is not None:
            raise BackendError(f"{self.path}: llama.cpp has no ERNIE 4.5 VL architecture; a GGUF cannot take an image")
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
    from .bridge.source import open_source

    if hf_runtime not in ("transformers", "megatron"):
        raise BackendError(f"hf_runtime must be 'transformers' or 'megatron', not {hf_runtime!r}")
    if dtype not in DTYPES:
        raise BackendError(f"dtype must be one of {list(DTYPES)}, not {dtype!r}")
    source = open_source(path, hf_config=hf_config)
    if source.format == "gguf":
        if dtype != "fp32":
            raise BackendError(f"{path}: llama.cpp runs a GGUF at its own tensor types; dtype {dtype} is not offered")
        return LlamaCppRuntime(path)
    if source.format == "hf" and hf_runtime == "transformers":
        return TransformersRuntime(path, source.cfg, dtype=dtype)
    return MegatronRuntime(source, vision_attn_implementation=vision_attn_implementation, dtype=dtype)
