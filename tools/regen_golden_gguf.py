#!/usr/bin/env python
"""Regenerate the GGUF golden files ``tests/golden/gguf_tiny_{dense,moe}.json``.

Each golden pins what ``export_gguf`` writes for a tiny re-randomised checkpoint + tiny SentencePiece tokenizer:
every metadata key and value (long arrays as length / first 8 / sha256), and every tensor's name, type and numpy
shape at f32, plus the tensor types at q8_0 (which pins the "keep in f32" and "q8_0 -> f16 fallback" rules).
``tests/test_gguf.py`` rebuilds the same record with :func:`golden_record` and compares. Run this script, and
review the diff, only when a change to the GGUF output is intended:

    .venv/bin/python tools/regen_golden_gguf.py
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
GOLDEN_DIR = ROOT / "tests" / "golden"

# name -> (family, tiny-config overrides, seed). The text-MoE tiny config's default pattern D S D S D S cannot be
# represented in llama.cpp (see ernie45.bridge.gguf.llama_cpp_layer_pattern), so the golden uses interval 1:
# D S S S S S (one leading dense layer, like the released 21B).
CASES: dict[str, tuple[str, dict[str, Any], int]] = {
    "dense": ("dense", {}, 0),
    "moe": ("moe", {"moe_layer_interval": 1}, 0),
}


def golden_record(name: str, workdir: Path) -> dict[str, Any]:
    from ernie45.bridge.gguf import describe_gguf, export_gguf
    from ernie45.bridge.io import HFCheckpoint
    from ernie45.config import ErnieConfig
    from ernie45.testing import write_tiny_checkpoint
    from ernie45.testing_tokenizer import write_tiny_tokenizer

    family, overrides, seed = CASES[name]
    ckpt = write_tiny_checkpoint(workdir / name, family, seed=seed, **overrides)
    cfg = ErnieConfig.from_file(ckpt)
    write_tiny_tokenizer(ckpt, cfg.vocab_size)
    src = HFCheckpoint(ckpt)
    record: dict[str, Any] = {}
    for outtype in ("f32", "q8_0"):
        out = workdir / f"{name}.{outtype}.gguf"
        export_gguf(src, cfg, out, outtype=outtype, tokenizer_dir=ckpt, progress=False)
        desc = describe_gguf(out)
        if outtype == "f32":
            # one line per tensor in the JSON: "name": "TYPE [numpy shape]"
            record["metadata"] = desc["metadata"]
            record["tensors"] = {t["name"]: f"{t['type']} {t['shape']}" for t in desc["tensors"]}
        else:
            record["q8_0_file_type"] = desc["metadata"]["general.file_type"]
            record["q8_0_tensor_types"] = {t["name"]: t["type"] for t in desc["tensors"]}
    return record


def main() -> int:
    GOLDEN_DIR.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        for name in CASES:
            path = GOLDEN_DIR / f"gguf_tiny_{name}.json"
            path.write_text(json.dumps(golden_record(name, Path(tmp)), indent=1, ensure_ascii=False) + "\n")
            print(f"wrote {path.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
