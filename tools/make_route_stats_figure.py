"""Regenerate docs/route_stats.png (+ route_stats.csv, route_imbalance.csv) from the embedded tiny MoE checkpoint.

    .venv/bin/python tools/make_route_stats_figure.py

The prompts are the tiny tokenizer's own corpus (``ernie45.testing_tokenizer.TINY_CORPUS``), tokenized by the
checkpoint's tokenizer; the model runs in Megatron-Core (TP1) loaded through the bridge. Deterministic: the same
files come out on every run (the PNG carries no software-version metadata). The weights are random, so the picture
shows what the tool draws, not how a trained ERNIE routes.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from ernie45.assets import embedded_checkpoint
from ernie45.route_stats import route_stats
from ernie45.testing_tokenizer import TINY_CORPUS

DOCS = Path(__file__).resolve().parents[1] / "docs"


def main() -> None:
    ckpt = embedded_checkpoint("tiny-ernie45-moe")
    with tempfile.TemporaryDirectory() as tmp:
        prompts = Path(tmp) / "prompts.txt"
        prompts.write_text("\n".join(TINY_CORPUS) + "\n")
        stats = route_stats(ckpt, prompts, out_dir=DOCS,
                            title="expert load: embedded tiny-ernie45-moe (random weights), 10 prompts")  # fmt: skip
    print(stats.table())


if __name__ == "__main__":
    main()
