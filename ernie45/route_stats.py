"""``ernie45 route-stats CKPT PROMPTS``: how a MoE checkpoint spreads tokens over its experts, per layer and pool.

The checkpoint (HF directory or Megatron torch_dist directory) runs in Megatron-Core at TP1, loaded through the
bridge; every router's choice is captured (``runtime.capture_routing``, the same capture ``ernie45 verify``
compares with transformers'). A GGUF cannot be used: llama.cpp does not expose its expert choice.

Inputs
  * ``PROMPTS``: a text file, one prompt per non-empty line, each run as its own sequence. Lines are tokenized with
    the checkpoint's tokenizer (``transformers.AutoTokenizer``) when it ships one, else read as whitespace-separated
    token ids.
  * ``--images DIR`` (VL checkpoints): the image files in DIR (sorted by name) are processed with the checkpoint's
    HF image processor (``preprocessor_config.json``; else transformers' ERNIE 4.5 VL image processor with its
    defaults and the config's patch/merge sizes). Image *k* goes in front of prompt *k* (after its BOS: the
    tokenizer's, else ``bos_token_id`` of ``generation_config.json`` / ``config.json``); images
    beyond the last prompt make sequences of their own. Image start/end tokens count as vision tokens, as in HF's
    MoE token types.

Outputs (``out_dir``)
  * ``route_stats.csv``      layer, pool, expert, assignments, tokens, load (share of the pool's assignments at
    that layer: uniform = 1/E), relative_load (load·E: uniform = 1)
  * ``route_imbalance.csv``  layer, pool, tokens, max_over_mean (1 = perfectly balanced, E/K = every token on the
    same K experts), cv (std/mean of the assignments), unused_experts
  * ``route_stats.png``      relative-load heatmap (MoE layers × experts) per pool, and max/mean load per layer

Legend: ``E`` experts per pool, ``K`` top-k, ``L`` layer.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import statistics
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .errors import InputError
from .inputs import (
    Batch,
    check_text_ids,
    declared_token_ids,
    image_block,
    image_inputs,
    tokenizer_for,
)
from .runtime import MegatronRuntime

__all__ = ["RouteStatsError", "RouteStats", "route_stats", "read_prompts", "run"]

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")
CSV_NAME, IMBALANCE_NAME, PNG_NAME = "route_stats.csv", "route_imbalance.csv", "route_stats.png"


class RouteStatsError(InputError):
    """Inputs route-stats cannot use (names the file / line)."""


@dataclass
class RouteStats:
    checkpoint: str
    family: str
    experts: int  # E per pool
    top_k: int
    sequences: int
    counts: dict[tuple[int, str], list[int]]  # (layer, pool) -> assignments per expert
    tokens: dict[tuple[int, str], int]  # (layer, pool) -> tokens routed by that pool
    files: list[str] = field(default_factory=list)

    def imbalance(self) -> list[dict]:
        """Per (layer, pool): tokens, max/mean load, coefficient of variation, unused experts."""
        rows = []
        for (L, pool), c in sorted(self.counts.items()):
            mean = statistics.fmean(c)
            rows.append(dict(
                layer=L, pool=pool, tokens=self.tokens[(L, pool)],
                max_over_mean=max(c) / mean if mean else math.nan,
                cv=statistics.pstdev(c) / mean if mean else math.nan,
                unused_experts=sum(1 for x in c if x == 0),
            ))  # fmt: skip
        return rows

    def table(self) -> str:
        pools = sorted({p for _, p in self.counts})
        tok = ", ".join(f"{max(n for (_, p), n in self.tokens.items() if p == pool)} {pool}" for pool in pools)
        lines = [f"route-stats: {self.checkpoint} ({self.family}, top-{self.top_k} of {self.experts} experts per "
                 f"pool), {self.sequences} sequences, tokens: {tok}",
                 f"  {'layer':>5} {'pool':<6} {'tokens':>7} {'max/mean':>9} {'cv':>7} {'unused':>7}"]  # fmt: skip
        for r in self.imbalance():
            lines.append(f"  {r['layer']:>5} {r['pool']:<6} {r['tokens']:>7} {r['max_over_mean']:>9.3f} "
                         f"{r['cv']:>7.3f} {r['unused_experts']:>7}")  # fmt: skip
        lines += [f"  wrote {f}" for f in self.files]
        return "\n".join(lines)

    def to_json(self) -> dict:
        return dict(
            checkpoint=self.checkpoint, family=self.family, experts=self.experts, top_k=self.top_k,
            sequences=self.sequences,
            counts={f"{L}/{p}": c for (L, p), c in sorted(self.counts.items())},
            tokens={f"{L}/{p}": n for (L, p), n in sorted(self.tokens.items())},
            imbalance=self.imbalance(), files=self.files,
        )  # fmt: skip


# ----------------------------------------------------------------------------------------------------------------------
# inputs


def read_prompts(prompts_file: str | Path, tokenizer) -> list[list[int]]:
    """Token ids of every non-empty line (tokenizer, or whitespace-separated ids when there is none)."""
    path = Path(prompts_file)
    if not path.is_file():
        raise RouteStatsError(f"{path}: no such prompts file")
    out = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        if tokenizer is not None:
            out.append(list(tokenizer(line)["input_ids"]))
            continue
        try:
            out.append([int(x) for x in line.split()])
        except ValueError:
            raise RouteStatsError(
                f"{path}:{n}: the checkpoint has no tokenizer, so prompt lines must be whitespace-separated token "
                f"ids; got {line[:60]!r}"
            ) from None
    if not out:
        raise RouteStatsError(f"{path}: no prompts (every line is empty)")
    return out


def _images(images_dir: str | Path) -> list[Path]:
    d = Path(images_dir)
    if not d.is_dir():
        raise RouteStatsError(f"{d}: not a directory")
    files = sorted(f for f in d.iterdir() if f.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise RouteStatsError(f"{d}: no image files ({', '.join(IMAGE_SUFFIXES)})")
    return files


def _sequences(cfg, prompts: list[list[int]], images: list[Path], ckpt: Path, bos: set[int], where: str) -> list[Batch]:
    for i, ids in enumerate(prompts):
        check_text_ids(ids, cfg, f"{where}: prompt {i + 1}")
        if ids and (min(ids) < 0 or max(ids) >= cfg.vocab_size):
            raise RouteStatsError(f"{where}: prompt {i + 1} has token ids outside [0, {cfg.vocab_size})")
    out = []
    for k in range(max(len(prompts), len(images))):
        ids = list(prompts[k]) if k < len(prompts) else []
        if k >= len(images):
            out.append(Batch(torch.tensor([ids])))
            continue
        pixels, grid = image_inputs(images[k], cfg, ckpt)
        head = ids[:1] if ids and ids[0] in bos else []
        ids = head + image_block(cfg, grid) + ids[len(head) :]
        out.append(Batch(torch.tensor([ids]), pixels, grid))
    return out


# ----------------------------------------------------------------------------------------------------------------------
# outputs


def _write_csvs(stats: RouteStats, out_dir: Path) -> list[Path]:
    E, K = stats.experts, stats.top_k
    p1 = out_dir / CSV_NAME
    with open(p1, "w", newline="") as f:
        w = csv.writer(f, lineterminator="\n")
        w.writerow(["layer", "pool", "expert", "assignments", "tokens", "load", "relative_load"])
        for (L, pool), counts in sorted(stats.counts.items()):
            n = stats.tokens[(L, pool)]
            for e, c in enumerate(counts):
                load = c / (n * K) if n else 0.0
                w.writerow([L, pool, e, c, n, f"{load:.6f}", f"{load * E:.6f}"])
    p2 = out_dir / IMBALANCE_NAME
    with open(p2, "w", newline="") as f:
        w = csv.writer(f, lineterminator="\n")
        w.writerow(["layer", "pool", "tokens", "max_over_mean", "cv", "unused_experts"])
        for r in stats.imbalance():
            mom, cv = f"{r['max_over_mean']:.6f}", f"{r['cv']:.6f}"
            w.writerow([r["layer"], r["pool"], r["tokens"], mom, cv, r["unused_experts"]])
    return [p1, p2]


def _write_png(stats: RouteStats, path: Path, title: str) -> Path:
    import matplotlib
    import numpy as np

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    E, K = stats.experts, stats.top_k
    pools = [p for p in ("text", "vision") if any(q == p for _, q in stats.counts)]
    layers = sorted({L for L, _ in stats.counts})
    size = (max(6.0, 0.45 * E + 2.5), 1.2 + 0.45 * len(layers) * len(pools) + 2.6)
    heights = [max(2, len(layers))] * len(pools) + [3]
    fig, axes = plt.subplots(len(pools) + 1, 1, figsize=size, gridspec_kw=dict(height_ratios=heights), squeeze=False)
    axes = axes[:, 0]
    relative = [c * E / (stats.tokens[k] * K) for k, cs in stats.counts.items() for c in cs]
    vmax = max([2.0] + relative)
    for ax, pool in zip(axes, pools):
        grid = np.full((len(layers), E), np.nan)
        for i, L in enumerate(layers):
            n = stats.tokens.get((L, pool), 0)
            if n:
                grid[i] = np.array(stats.counts[(L, pool)], dtype=np.float64) * E / (n * K)
        im = ax.imshow(grid, aspect="auto", cmap="magma", vmin=0.0, vmax=vmax, interpolation="nearest")
        ax.set_yticks(range(len(layers)), [str(L) for L in layers])
        ax.set_xticks(range(E), [str(e) for e in range(E)] if E <= 32 else [""] * E)
        ax.set_ylabel("MoE layer")
        ax.set_xlabel(f"{pool} expert")
        n_max = max(stats.tokens.get((L, pool), 0) for L in layers)
        ax.set_title(f"{pool} pool: relative load (1 = uniform), {n_max} tokens", fontsize=10)
        if E <= 16:
            for i in range(len(layers)):
                for e in range(E):
                    v = float(grid[i, e])
                    if v == v:
                        color = "white" if v < vmax * 0.6 else "black"
                        ax.text(e, i, f"{v:.2f}", ha="center", va="center", fontsize=7, color=color)
        fig.colorbar(im, ax=ax, fraction=0.03, pad=0.02)
    ax = axes[-1]
    imb = stats.imbalance()
    width = 0.8 / len(pools)
    for j, pool in enumerate(pools):
        rows = {r["layer"]: r for r in imb if r["pool"] == pool}
        xs = [i + (j - (len(pools) - 1) / 2) * width for i, L in enumerate(layers) if L in rows]
        ys = [rows[L]["max_over_mean"] for L in layers if L in rows]
        bars = ax.bar(xs, ys, width=width, label=f"{pool}: max/mean")
        for b, L in zip(bars, [L for L in layers if L in rows]):
            x = b.get_x() + b.get_width() / 2
            ax.text(x, b.get_height(), f"cv {rows[L]['cv']:.2f}", ha="center", va="bottom", fontsize=7)
    ax.axhline(1.0, color="gray", linestyle="--", linewidth=0.8)
    ax.set_xticks(range(len(layers)), [str(L) for L in layers])
    ax.set_xlabel("MoE layer")
    ax.set_ylabel("max / mean load")
    ax.set_ylim(0, max([r["max_over_mean"] for r in imb] + [1.0]) * 1.25)
    ax.set_title("load imbalance per layer (dashed: perfectly balanced; cv = std/mean)", fontsize=10)
    ax.legend(fontsize=8, loc="upper right")
    fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    # no "Software" metadata: the same counts give the same bytes (the committed figure is regenerated by a tool)
    fig.savefig(path, dpi=110, metadata={"Software": None})
    plt.close(fig)
    return path


# ----------------------------------------------------------------------------------------------------------------------
# the command


def route_stats(
    ckpt: str | Path,
    prompts_file: str | Path,
    *,
    images_dir: str | Path | None = None,
    out_dir: str | Path,
    hf_config: str | Path | None = None,
    title: str | None = None,
) -> RouteStats:
    """Expert load per MoE layer and pool over the prompts (and images); writes CSVs and a PNG to ``out_dir``."""
    from .bridge.source import open_source

    ckpt = Path(ckpt)
    source = open_source(ckpt, hf_config=hf_config)
    if source.format == "gguf":
        raise RouteStatsError(f"{ckpt}: llama.cpp does not expose its expert choice; run route-stats on the HF or "
                              "torch_dist checkpoint the GGUF came from")  # fmt: skip
    cfg = source.cfg
    if not cfg.is_moe:
        raise RouteStatsError(f"{ckpt}: a {cfg.family} model has no experts to route to")
    if images_dir is not None and cfg.family != "vl":
        raise RouteStatsError(f"{ckpt}: --images needs a VL checkpoint, this one is {cfg.family}")
    tok = tokenizer_for(ckpt)
    prompts = read_prompts(prompts_file, tok)
    images = _images(images_dir) if images_dir is not None else []
    bos = declared_token_ids(ckpt, "bos_token_id")
    if tok is not None and tok.bos_token_id is not None:
        bos = {tok.bos_token_id}
    batches = _sequences(cfg, prompts, images, ckpt, bos, str(prompts_file))

    counts: dict[tuple[int, str], torch.Tensor] = {}
    tokens: dict[tuple[int, str], int] = {}
    with MegatronRuntime(source, vision_attn_implementation="sdpa") as rt:
        for batch in batches:
            _, routing = rt.forward(batch)
            for key, r in routing.items():
                zero = torch.zeros(cfg.moe_num_experts, dtype=torch.long)
                counts[key] = counts.get(key, zero) + r.chosen_BSE[r.mask_BS].sum(0)
                tokens[key] = tokens.get(key, 0) + int(r.mask_BS.sum())
    # a pool no token reached at all (e.g. vision without images) is left out rather than drawn as zeros
    keep = {k for k, n in tokens.items() if n}
    stats = RouteStats(
        checkpoint=str(ckpt), family=cfg.family, experts=cfg.moe_num_experts, top_k=cfg.moe_k, sequences=len(batches),
        counts={k: counts[k].tolist() for k in sorted(keep)}, tokens={k: tokens[k] for k in sorted(keep)},
    )  # fmt: skip
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = _write_csvs(stats, out)
    written.append(_write_png(stats, out / PNG_NAME, title or f"expert load: {ckpt.name}"))
    stats.files = [str(p) for p in written]
    return stats


def run(args: argparse.Namespace) -> int:
    stats = route_stats(args.checkpoint, args.prompts, images_dir=args.images, out_dir=args.out,
                        hf_config=args.hf_config, title=args.title)  # fmt: skip
    print(json.dumps(stats.to_json(), indent=2) if args.json else stats.table())
    return 0
