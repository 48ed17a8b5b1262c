"""The main job: the whole journey on the embedded tiny checkpoints, with exact numbers printed."""

from __future__ import annotations

import shutil
import tempfile
import time
from pathlib import Path

from .assets import embedded_checkpoint
from .parity import check_parity

__all__ = ["run_demo"]


def run_demo(out_dir: Path | None = None, keep: bool = False) -> int:
    t0 = time.time()
    work = Path(out_dir) if out_dir else Path(tempfile.mkdtemp(prefix="ernie45-demo-"))
    work.mkdir(parents=True, exist_ok=True)
    ok = True
    try:
        for name in ("tiny-ernie45-moe", "tiny-ernie45-dense"):
            src = embedded_checkpoint(name)
            print(f"\n== {name}: HF -> Megatron-Core (bridge, TP1) vs transformers")
            report = check_parity(src)
            print(report.table())
            ok &= report.logits_max_abs_diff <= 1e-4 and all(v == 1.0 for v in report.routing.values())
        print(f"\n{'OK' if ok else 'FAILED'} in {time.time() - t0:.1f} s")
    finally:
        if not keep and out_dir is None:
            shutil.rmtree(work, ignore_errors=True)
    return 0 if ok else 1
