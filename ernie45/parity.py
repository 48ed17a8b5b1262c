"""Parity of a Megatron-Core ERNIE (loaded through the bridge) against transformers, on one process.

Used by ``ernie45 parity`` and the demo: exact numbers (max |Δ|, cosine, top-1, routing), not a cosine alone.
A parity check is one :func:`ernie45.verify.verify` of the HF directory with itself, logits and routing only:
transformers (flat Thinking VL configs translated, ``reference.transformers_config``) against Megatron-Core at TP1
loaded through the bridge, in ``dtype`` (fp32, or bf16 with the routers and expert bias in fp32 as transformers
keeps them), on seeded random text ids (VL: text tokens only, so only the text pool routes; ``ernie45 verify
--image`` covers the vision pool). A report is judged with the same defaults as ``verify``
(``verify.DEFAULT_THRESHOLDS``).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

from .verify import DEFAULT_THRESHOLDS, verify

__all__ = ["ParityReport", "check_parity"]


@dataclass
class ParityReport:
    checkpoint: str
    family: str
    tokens: int
    logits_max_abs_diff: float
    logits_mean_abs_diff: float
    logits_scale: float
    top1_agreement: float
    routing: dict[int, float] = field(default_factory=dict)  # MoE layer -> fraction of tokens with identical experts
    ignored: list[str] = field(default_factory=list)
    dtype: str = "fp32"
    cosine: float = 1.0  # all logits as one vector per side
    cosine_worst_token: float = 1.0
    nonfinite: int = 0  # NaN / inf logits, both sides together

    def failures(self, atol: float | None = None) -> list[str]:
        """Why the two sides are not the same model at this dtype (``verify``'s defaults; ``atol`` replaces the
        logits max |Δ| default)."""
        t = dict(DEFAULT_THRESHOLDS[self.dtype])
        if atol is not None:
            t["atol"] = atol
        out = [f"{self.nonfinite} logits are NaN or inf"] if self.nonfinite else []
        if t["atol"] is not None and not self.logits_max_abs_diff <= t["atol"]:
            out.append(f"logits max |Δ| {self.logits_max_abs_diff:.3e} > {t['atol']:g}")
        if t["min_cosine"] is not None and not self.cosine >= t["min_cosine"]:
            out.append(f"cosine {self.cosine:.6f} < {t['min_cosine']:g}")
        if not self.top1_agreement >= t["min_top1"]:
            out.append(f"top-1 agreement {self.top1_agreement:.4f} < {t['min_top1']:g}")
        out += [f"routing layer {L}: {v:.4f} < {t['min_routing']:g}"
                for L, v in sorted(self.routing.items()) if not v >= t["min_routing"]]  # fmt: skip
        return out

    def table(self) -> str:
        lines = [
            f"parity: {self.checkpoint} ({self.family}), {self.tokens} tokens, {self.dtype}, Megatron-Core vs "
            "transformers",
            f"  logits   max |Δ| {self.logits_max_abs_diff:.3e}   mean |Δ| {self.logits_mean_abs_diff:.3e}   "
            f"(max |logit| {self.logits_scale:.3f})   cosine {self.cosine:.7f} (worst token "
            f"{self.cosine_worst_token:.5f})",
            f"  top-1    {self.top1_agreement:.2%} identical",
        ]
        for layer, same in sorted(self.routing.items()):
            lines.append(f"  routing  layer {layer:>3}: {same:.2%} of tokens chose the same experts")
        for name in self.ignored:
            lines.append(f"  ignored  {name}")
        return "\n".join(lines)

    def to_json(self) -> dict:
        return asdict(self)


def check_parity(
    hf_dir: str | Path, *, batch: int = 2, seq: int = 16, seed: int = 0, dtype: str = "fp32"
) -> ParityReport:
    """Run ``hf_dir`` in transformers and in Megatron (TP1), both in ``dtype``; compare logits and expert choices
    on ``batch`` x ``seq`` seeded random text ids."""
    from .bridge.source import HFSource
    from .inputs import random_text_ids

    source = HFSource(hf_dir)
    cfg = source.cfg
    ids = random_text_ids(cfg, cfg.vocab_size, batch, seq, seed=seed)
    # A is the reference: the logits' scale is transformers' max |logit|
    report = verify(hf_dir, hf_dir, prompt_ids=ids, tensors=False, hf_runtime=("transformers", "megatron"),
                    dtype=dtype)  # fmt: skip
    g = report.logits
    ignored = source.plan.ignored
    return ParityReport(
        checkpoint=str(hf_dir),
        family=cfg.family,
        tokens=g.tokens,
        logits_max_abs_diff=g.max_abs,
        logits_mean_abs_diff=g.mean_abs,
        logits_scale=g.scale,
        top1_agreement=g.top1_agreement,
        routing={L: pools["text"]["agreement"] for L, pools in report.routing.items()},
        ignored=[n for n, _ in ignored],
        dtype=dtype,
        cosine=g.cosine,
        cosine_worst_token=g.cosine_worst_token,
        nonfinite=g.nonfinite_a + g.nonfinite_b,
    )
