"""What a user sees of a run: a tqdm bar per step, ``metrics.jsonl``, a loss/LR curve PNG, per-pool expert load.

Only rank 0 writes. ``metrics.jsonl`` holds one JSON object per line: ``{"kind": "train", "step", "loss", "lr",
"grad_norm", "tokens_per_s", ...}``, ``{"kind": "eval", "step", "loss"}`` and ``{"kind": "expert_load", "step",
"load": {"layer L/pool": [fraction per expert]}, "imbalance": {...}}`` (imbalance = max load / mean load).

Legend: ``E`` experts in a pool.
"""

from __future__ import annotations

import contextlib
import json
import time
from pathlib import Path
from typing import Iterator

import torch
import torch.distributed as dist

__all__ = ["MetricsLog", "expert_load", "plot_curves", "read_metrics"]

METRICS_FILE = "metrics.jsonl"
CURVE_FILE = "loss_lr.png"


class MetricsLog:
    """The bar and the JSONL file of one run (a no-op on ranks other than 0)."""

    def __init__(self, run_dir: Path, *, total_steps: int, start_step: int, enabled: bool, progress: bool) -> None:
        self.enabled = enabled
        self.path = Path(run_dir) / METRICS_FILE
        self.bar = None
        if not enabled:
            return
        if start_step:  # resuming: forget what the killed run logged after its last checkpoint
            kept = [r for r in read_metrics(self.path) if r["step"] <= start_step]
            self.path.write_text("".join(json.dumps(r) + "\n" for r in kept))
        if progress:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total_steps, initial=start_step, desc="train", unit="step", dynamic_ncols=True)
        self._t0 = time.perf_counter()

    def write(self, record: dict) -> None:
        if not self.enabled:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")

    def step(self, step: int, *, loss: float, lr: float, grad_norm: float, tokens: int, seconds: float) -> None:
        rec = dict(kind="train", step=step, loss=loss, lr=lr, grad_norm=grad_norm, tokens=tokens,
                   tokens_per_s=tokens / max(seconds, 1e-9), seconds=seconds)  # fmt: skip
        self.write(rec)
        if self.bar is not None:
            self.bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", gnorm=f"{grad_norm:.3f}",
                                 tok_s=f"{rec['tokens_per_s']:.0f}", refresh=False)  # fmt: skip
            self.bar.update(1)  # tqdm's ETA comes from the step rate

    def note(self, text: str) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.write(text)
        else:
            print(text, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def read_metrics(path: str | Path) -> list[dict]:
    path = Path(path)
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def plot_curves(run_dir: str | Path) -> Path | None:
    """``loss_lr.png``: training loss (and eval loss) against step, learning rate on a second axis."""
    records = read_metrics(Path(run_dir) / METRICS_FILE)
    train = [r for r in records if r["kind"] == "train"]
    if not train:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot([r["step"] for r in train], [r["loss"] for r in train], label="train loss", color="tab:blue")
    evals = [r for r in records if r["kind"] == "eval"]
    if evals:
        ax.plot([r["step"] for r in evals], [r["loss"] for r in evals], "o-", label="eval loss", color="tab:orange")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax2 = ax.twinx()
    ax2.plot([r["step"] for r in train], [r["lr"] for r in train], "--", label="lr", color="tab:gray")
    ax2.set_ylabel("learning rate")
    lines = ax.get_legend_handles_labels()
    lines2 = ax2.get_legend_handles_labels()
    ax.legend(lines[0] + lines2[0], lines[1] + lines2[1], loc="upper right")
    fig.tight_layout()
    out = Path(run_dir) / CURVE_FILE
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


# ------------------------------------------------------------------------------------------------------------------
# expert load


def _routers(chunks) -> list[tuple[str, torch.nn.Module]]:
    """("layer L/pool", router) for every MoE router of this rank's chunks (global layer numbers)."""
    out = []
    for chunk in chunks:
        lm = getattr(chunk, "language_model", chunk)
        for layer in lm.decoder.layers:
            L = layer.layer_number - 1
            mlp = layer.mlp
            if hasattr(mlp, "text_moe_layer"):  # VL: two pools
                out += [(f"layer {L}/text", mlp.text_moe_layer.router), (f"layer {L}/vision", mlp.vision_moe_layer.router)]
            elif hasattr(mlp, "router"):
                out.append((f"layer {L}/text", mlp.router))
    return out


@contextlib.contextmanager
def expert_load(chunks, *, sequence_parallel: bool) -> Iterator[dict]:
    """Count the tokens each expert receives while the block runs; on exit the yielded dict holds, on every rank,
    ``{"layer L/pool": tokens per expert [E]}`` over the whole model and the whole batch.

    Every rank routes its own tokens: TP ranks see the same tokens unless sequence parallelism splits them (then
    they are summed over TP); pipeline stages hold different layers (merged by name). Data-parallel ranks must run
    the same batch (the trainer evaluates every held-out row on every DP rank). The VL pools' dummy rows (zeros
    that even out the all-gather) are counted too; they are few and only at eval.
    """
    from megatron.core import parallel_state as ps

    routers = _routers(chunks)
    counts: dict[str, torch.Tensor] = {}
    handles = []
    for name, router in routers:

        def hook(_m, _inp, out, name=name):
            map_TE = out[1]
            counts[name] = counts.get(name, 0) + map_TE.sum(0).double().cpu()

        handles.append(router.register_forward_hook(hook))
    result: dict[str, list[float]] = {}
    try:
        yield result
    finally:
        for h in handles:
            h.remove()
    names = [n for n, _ in routers]
    if sequence_parallel and ps.get_tensor_model_parallel_world_size() > 1:
        for n in names:
            if n in counts:
                dist.all_reduce(counts[n], group=ps.get_tensor_model_parallel_group())
    gathered: list = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, {n: c.tolist() for n, c in counts.items()})
    for part in gathered:
        for n, c in part.items():
            result.setdefault(n, c)


def load_summary(load: dict[str, list[float]]) -> dict:
    """Fractions per expert and max/mean imbalance per (layer, pool), sorted by layer."""
    def key(n: str):
        layer, pool = n.split("/")
        return int(layer.split()[1]), pool

    fractions, imbalance = {}, {}
    for n in sorted(load, key=key):
        c = torch.tensor(load[n], dtype=torch.float64)
        total = float(c.sum())
        if total == 0:
            continue
        fractions[n] = [round(x, 6) for x in (c / total).tolist()]
        imbalance[n] = round(float(c.max() / c.mean()), 4)
    return dict(load=fractions, imbalance=imbalance)
