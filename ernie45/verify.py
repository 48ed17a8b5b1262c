"""``ernie45 verify A B``: are two checkpoints the same model? Each of A and B is an HF directory, a Megatron
torch_dist directory or a GGUF file.

Three levels, each reported with exact numbers (table or JSON):

1. **Tensors.** All three formats are read as HF-named tensors (HF: the files; torch_dist: ``MegatronSource``, the
   bridge table's inverse ops; GGUF: ``GGUFSource``, the GGUF table's inverse ops, lazily). Every name is
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

The runtimes that produce the logits and expert choices, and the inputs they take, are ``ernie45.runtime`` and
``ernie45.inputs`` (shared with ``parity``, ``generate`` and ``route-stats``); this module compares and reports.
Memory: logits are compared by loading A, running it, freeing it, then B -- one fp32 model at a time.

Legend: ``B`` batch, ``S`` sequence, ``V`` vocab, ``E`` experts per pool.
"""

from __future__ import annotations

import argparse
import json as jsonlib
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from .errors import InputError
from .inputs import prompt_batch, tokenizer_for
from .runtime import DTYPES, LLAMA_CPP_HINT, Routing, llama_cpp_available, open_runtime

__all__ = [
    "VerifyError",
    "verify",
    "VerifyReport",
    "TensorDiff",
    "LogitsDiff",
    "compare_tensors",
    "logits_diff",
    "routing_agreement",
    "DEFAULT_THRESHOLDS",
    "STORAGE_REL",
    "run",
]


class VerifyError(InputError):
    """A verification that cannot be set up (names the checkpoint / tensor / option)."""


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
        from .bridge.tables import ignored_reason

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
            out.append(TensorDiff(name, status, dtype_a=view_a.storage_type(name), note=why or ""))
            continue
        if name not in keys_a:
            why = _dropped_reason(fmt_a, name)
            status = "dropped-a" if why else "only-b"
            out.append(TensorDiff(name, status, dtype_b=view_b.storage_type(name), note=why or ""))
            continue
        da, db = view_a.storage_type(name), view_b.storage_type(name)
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
# report


TABLE_MAX_TENSORS = 20  # non-structural differences listed in the table (JSON always has every tensor)

# What "the same model" means when no threshold is given, by what is compared (``--dtype``, or the GGUF side's
# weight type: ``GGUFSource.weight_type``). ``atol``: logits max |Δ|; ``min_cosine``: cosine similarity of the
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


def routing_agreement(ra: Routing, rb: Routing) -> dict[int, dict[str, dict[str, float]]]:
    """Per MoE layer and pool: the share of the pool's tokens whose set of chosen experts is the same on both sides
    (and how many tokens it routed); pools that routed no token are left out."""
    # both sides ran the same batch on configs checked equal: a difference here is a bug in a runtime
    if set(ra) != set(rb):
        raise RuntimeError(f"the two sides routed different (layer, pool)s: {sorted(set(ra) ^ set(rb))}")
    out: dict[int, dict[str, dict[str, float]]] = {}
    for key in sorted(ra):
        a, b = ra[key], rb[key]
        if not torch.equal(a.mask_BS, b.mask_BS):
            raise RuntimeError(f"layer {key[0]} {key[1]} pool: the two sides sent different tokens to it")
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
    hf_runtime: str | tuple[str, str] = "transformers",
    hf_config: str | Path | None = None,
    dtype: str = "fp32",
) -> VerifyReport:
    """Compare checkpoints ``a`` and ``b`` (HF dir / torch_dist dir / GGUF file): tensors, logits, routing.

    ``prompt_ids``: rows of token ids (default: 2×16 seeded random ids); ``image``: an image file for VL checkpoints
    (placed in the middle of the first row). The thresholds only decide :meth:`VerifyReport.failures`; one not given
    takes its default (:data:`DEFAULT_THRESHOLDS`, by ``dtype`` or a GGUF side's weight type; tensors: the storage
    type's rounding, :data:`STORAGE_REL`). ``dtype`` ("fp32" | "bf16"): both runtimes compute in it (routers and
    expert bias in fp32, as transformers keeps them). ``hf_runtime``: what runs an HF directory, "transformers" (the
    reference) or "megatron" (Megatron-Core through the bridge); a pair says it for A and B apart (``parity``: one
    directory, both ways). ``hf_config``: the config.json for a torch_dist directory written without one.
    """
    if dtype not in DTYPES:
        raise VerifyError(f"dtype must be one of {list(DTYPES)}, not {dtype!r}")
    from .bridge.source import open_source

    view_a, view_b = open_source(a, hf_config=hf_config), open_source(b, hf_config=hf_config)
    fmt_a, fmt_b = view_a.format, view_b.format
    thresholds = dict(atol=atol, tensor_atol=tensor_atol, min_cosine=min_cosine, min_top1=min_top1,
                      min_routing=min_routing)  # fmt: skip
    ggufs = [v for v in (view_a, view_b) if v.format == "gguf"]
    if ggufs and dtype != "fp32":
        raise VerifyError(f"--dtype {dtype}: llama.cpp runs a GGUF at its own tensor types; compare it at fp32")
    key = f"gguf {max((v.weight_type() for v in ggufs), key=_gguf_rank)}" if ggufs else dtype
    report = VerifyReport(str(a), str(b), fmt_a, fmt_b, thresholds=thresholds, dtype=dtype,
                          defaults_key=key if key in DEFAULT_THRESHOLDS else None)  # fmt: skip
    if report.defaults_key is None:
        report.notes.append(f"no default logits thresholds for {key}: give --atol / --min-cosine / --min-top1")
    cfgs = [v.cfg for v in (view_a, view_b) if v.cfg is not None]
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
    batch = prompt_batch(prompt_ids, cfg, vocab, image, next((Path(p) for p in (a, b) if Path(p).is_dir()), None))
    results = []
    for path, runs_hf in zip((a, b), (hf_runtime,) * 2 if isinstance(hf_runtime, str) else hf_runtime):
        with open_runtime(path, hf_runtime=runs_hf, hf_config=hf_config, dtype=dtype) as rt:
            out, routing = rt.forward(batch)
            results.append((rt.name, rt.routing_observable, out, routing))
    (report.runtime_a, obs_a, la, ra), (report.runtime_b, obs_b, lb, rb) = results
    if la.shape != lb.shape:  # e.g. a GGUF whose vocab differs from the HF side's: no config to compare first
        report.mismatch = f"logits shapes differ: {list(la.shape)} vs {list(lb.shape)} (routing not compared)"
        return report
    report.logits = logits_diff(la, lb)
    if obs_a and obs_b:
        report.routing = routing_agreement(ra, rb)
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
