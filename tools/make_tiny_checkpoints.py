"""Regenerate the embedded tiny checkpoints under ernie45/assets/ (deterministic: fixed seeds, real transformers).

    .venv/bin/python tools/make_tiny_checkpoints.py

They are what the README's main command runs on. Every parameter and buffer is re-randomised (expert bias and norm
weights included), so parity printed on them is a real check.
"""

from __future__ import annotations

import shutil

from ernie45.assets import ASSETS, EMBEDDED
from ernie45.config import load_config
from ernie45.testing import write_tiny_checkpoint
from ernie45.testing_tokenizer import write_tiny_tokenizer


def main() -> None:
    for name, (family, seed, overrides) in EMBEDDED.items():
        out = ASSETS / name
        if out.exists():
            shutil.rmtree(out)
        write_tiny_checkpoint(out, family, seed=seed, **overrides)
        write_tiny_tokenizer(out, load_config(out).vocab_size)
        print(f"wrote {out} ({sum(f.stat().st_size for f in out.iterdir()) / 1e3:.0f} kB)")


if __name__ == "__main__":
    main()
