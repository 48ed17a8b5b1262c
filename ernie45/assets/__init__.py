"""Tiny ERNIE 4.5 checkpoints shipped with the package (written by ``tools/make_tiny_checkpoints.py``)."""

from __future__ import annotations

from pathlib import Path

ASSETS = Path(__file__).parent
# name -> (family, seed)
EMBEDDED = {"tiny-ernie45-moe": ("moe", 11), "tiny-ernie45-dense": ("dense", 12)}
DEFAULT = "tiny-ernie45-moe"


def embedded_checkpoint(name: str = DEFAULT) -> Path:
    if name not in EMBEDDED:
        raise KeyError(f"no embedded checkpoint {name!r}; have {sorted(EMBEDDED)}")
    return ASSETS / name
