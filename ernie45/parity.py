"""Parity of a Megatron-Core ERNIE (loaded through the bridge) against transformers, on one process.

Used by ``ernie45 parity`` and the demo: exact numbers, not a cosine similarity.
"""

from __future__ import annotations

import os
import socket
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

__all__ = ["ParityReport", "check_parity", "ensure_single_process_group"]


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

    def table(self) -> str:
        lines = [
            f"parity: {self.checkpoint} ({self.family}), {self.tokens} tokens, fp32, Megatron-Core vs transformers",
            f"  logits   max |Δ| {self.logits_max_abs_diff:.3e}   mean |Δ| {self.logits_mean_abs_diff:.3e}   "
            f"(max |logit| {self.logits_scale:.3f})",
            f"  top-1    {self.top1_agreement:.2%} identical",
        ]
        for layer, same in sorted(self.routing.items()):
            lines.append(f"  routing  layer {layer:>3}: {same:.2%} of tokens chose the same experts")
        for name in self.ignored:
            lines.append(f"  ignored  {name}")
        return "\n".join(lines)

    def to_json(self) -> dict:
        return asdict(self)


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


def check_parity(hf_dir: str | Path, *, batch: int = 2, seq: int = 16, seed: int = 0) -> ParityReport:
    """Load ``hf_dir`` into Megatron (TP1) and into transformers; compare logits and expert choices."""
    from .bridge.io import HFCheckpoint
    from .bridge.live import load_hf
    from .bridge.tables import effective_tie
    from .config import load_config
    from .megatron import parallel
    from .megatron.model import build_model
    from .megatron.run import capture_routing, forward_logits
    from .reference import hf_routing, load_reference, megatron_map_to_hf_order

    ensure_single_process_group()
    cfg = load_config(hf_dir)
    ckpt = HFCheckpoint(hf_dir)
    layout = parallel.Layout()
    parallel.initialize(layout)
    try:
        chunks = build_model(cfg, layout, tie_word_embeddings=effective_tie(cfg, ckpt.keys()))
        plan = load_hf(chunks, cfg, layout, ckpt)
        ids = torch.randint(0, cfg.vocab_size, (batch, seq), generator=torch.Generator().manual_seed(seed))
        with capture_routing(chunks, [0]) as mg_maps:
            out = forward_logits(chunks, ids, vocab_size=cfg.vocab_size)
    finally:
        parallel.destroy()
    hf = load_reference(hf_dir)
    with torch.no_grad(), hf_routing(hf) as hf_maps:
        ref = hf(input_ids=ids).logits
    diff = (out - ref).abs()
    routing = {
        layer: (megatron_map_to_hf_order(mg_maps[layer], batch, seq) == hf_maps[layer]).all(-1).float().mean().item()
        for layer in cfg.moe_layers
    }
    return ParityReport(
        checkpoint=str(hf_dir),
        family=cfg.family,
        tokens=batch * seq,
        logits_max_abs_diff=diff.max().item(),
        logits_mean_abs_diff=diff.mean().item(),
        logits_scale=ref.abs().max().item(),
        top1_agreement=(out.argmax(-1) == ref.argmax(-1)).float().mean().item(),
        routing=routing,
        ignored=[n for n, _ in plan.ignored],
    )
