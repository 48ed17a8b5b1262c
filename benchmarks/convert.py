"""Converter benchmark: HF -> Megatron torch_dist (TP2·PP2·EP2) -> HF on synthetic ~1 GB and ~3 GB VL checkpoints.

    .venv/bin/python benchmarks/convert.py [--sizes 1 3] [--keep DIR]

The checkpoints have the real ERNIE-4.5-VL-28B-A3B tensor shapes (hidden 2560, 20/4 heads, vocab 103424, dense FFN
12288, expert widths 1536 / 512, ViT width 1280, resampler 5120) with fewer layers, ViT blocks and experts, in bf16
(routers and expert bias fp32, as HF keeps them). Everything is measured in this run:

* the baseline: ``cp -r`` of the same HF directory (warm page cache, like the conversions), median of three runs;
  every measurement starts after ``sync``, so no earlier step's writeback is billed to it;
* each conversion as a separate ``python -m ernie45 convert`` process, its wall time and its own peak RSS
  (``os.wait4`` rusage of that child);
* the ratios wall/cp, and a bit-exact check of the round trip.

Targets (issue #4): ≤ 1.3× cp, peak RSS ≤ 1.5 GB and flat between the two sizes.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ernie45.bridge.io import HFCheckpoint, write_safetensors_streaming  # noqa: E402
from ernie45.bridge.tables import expand  # noqa: E402
from ernie45.config import ErnieConfig  # noqa: E402

# (MoE layers, experts per pool, ViT blocks) for ~1 GB and ~3 GB in bf16
SIZES = {1: (1, 4, 2), 3: (5, 8, 2)}


def vl_config(moe_layers: int, experts: int, vit_blocks: int) -> dict:
    L = 1 + moe_layers
    return {
        "model_type": "ernie4_5_vl_moe",
        "tie_word_embeddings": True,
        "text_config": {
            "vocab_size": 103424, "hidden_size": 2560, "intermediate_size": 12288, "num_hidden_layers": L,
            "num_attention_heads": 20, "num_key_value_heads": 4, "rms_norm_eps": 1e-5, "use_bias": False,
            "rope_parameters": {"rope_type": "default", "rope_theta": 500000.0, "mrope_section": [22, 22, 20]},
            "moe_num_experts": experts, "moe_k": min(6, experts), "moe_intermediate_size": [1536, 512],
            "moe_num_shared_experts": 2, "moe_norm_min": 1e-12, "mlp_layer_types": ["dense"] + ["sparse"] * moe_layers,
        },
        "vision_config": {
            "depth": vit_blocks, "hidden_size": 1280, "num_heads": 16, "intermediate_size": 5120,
            "hidden_act": "quick_gelu", "in_channels": 3, "patch_size": 14, "spatial_merge_size": 2,
            "temporal_merge_size": 2, "rms_norm_eps": 1e-6,
        },
    }  # fmt: skip


def write_synthetic(path: Path, raw: dict) -> int:
    """A synthetic HF checkpoint (random values, real names and shapes), streamed to disk."""
    cfg = ErnieConfig.from_hf(raw)
    path.mkdir(parents=True)
    entries = []
    for it in expand(cfg, tied=True):
        for name, shape in zip(it.hf, it.hf_shapes):
            fp32 = ".mlp.gate." in name or "moe_statics" in name  # HF keeps routers and the bias in fp32
            entries.append((name, tuple(shape), torch.float32 if fp32 else torch.bfloat16))
    g = torch.Generator().manual_seed(0)

    def produce(name: str) -> torch.Tensor:
        _, shape, dtype = next(e for e in entries if e[0] == name)
        return torch.randn(shape, generator=g, dtype=torch.float32).to(dtype)

    write_safetensors_streaming(path, entries, produce, max_shard_bytes=2 * 2**30)
    (path / "config.json").write_text(json.dumps(raw, indent=2))
    return sum(f.stat().st_size for f in path.iterdir())


def timed(cmd: list[str]) -> tuple[float, int]:
    """(wall seconds, peak RSS bytes) of one child process.

    RSS is sampled every 5 ms with psutil: the rusage of a child would also count the pages it inherited from
    this (large) parent at fork time, before exec.
    """
    import psutil

    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL)
    child, peak = psutil.Process(proc.pid), 0
    while proc.poll() is None:
        try:
            peak = max(peak, child.memory_info().rss)
        except psutil.NoSuchProcess:
            break
        time.sleep(0.005)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed with status {proc.returncode}")
    return wall, peak


def bit_exact(a: Path, b: Path) -> bool:
    x, y = HFCheckpoint(a), HFCheckpoint(b)
    return sorted(x.keys()) == sorted(y.keys()) and all(torch.equal(x.get(n), y.get(n)) for n in x.keys())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", type=int, nargs="+", default=[1, 3], choices=sorted(SIZES))
    ap.add_argument("--workdir", type=Path, default=None)
    args = ap.parse_args()
    root = args.workdir or Path(tempfile.mkdtemp(prefix="ernie45-bench-"))
    exe = [sys.executable, "-m", "ernie45", "convert"]
    rows = []
    try:
        for size in args.sizes:
            d = root / f"{size}gb"
            shutil.rmtree(d, ignore_errors=True)
            nbytes = write_synthetic(d / "hf", vl_config(*SIZES[size]))
            subprocess.run(["cat", *map(str, (d / "hf").glob("*.safetensors"))], stdout=subprocess.DEVNULL, check=True)
            cp_runs = []
            for k in range(3):  # the median of three: cp's time swings with the page cache's writeback state
                os.sync()
                cp_runs.append(timed(["cp", "-r", str(d / "hf"), str(d / f"hf-copy{k}")])[0])
                shutil.rmtree(d / f"hf-copy{k}")
            cp_wall = sorted(cp_runs)[1]
            os.sync()  # no writeback of earlier steps lands inside the next measurement
            to_mg, to_mg_rss = timed(exe + [str(d / "hf"), str(d / "mg"), "--to", "megatron", "--tp", "2", "--pp", "2",
                                           "--ep", "2", "--no-progress"])  # fmt: skip
            os.sync()
            to_hf, to_hf_rss = timed(exe + [str(d / "mg"), str(d / "back"), "--to", "hf", "--no-progress"])
            exact = bit_exact(d / "hf", d / "back")
            rows.append(dict(size=f"{nbytes / 2**30:.2f} GiB", cp=cp_wall, to_mg=to_mg, to_hf=to_hf,
                             rss_mg=to_mg_rss, rss_hf=to_hf_rss, exact=exact))  # fmt: skip
            shutil.rmtree(d)
    finally:
        if args.workdir is None:
            shutil.rmtree(root, ignore_errors=True)
    print(f"{'checkpoint':>11} {'cp -r':>7} {'HF->MG':>8} {'ratio':>6} {'MG->HF':>8} {'ratio':>6} "
          f"{'RSS HF->MG':>11} {'RSS MG->HF':>11} bit-exact")  # fmt: skip
    for r in rows:
        print(f"{r['size']:>11} {r['cp']:>6.2f}s {r['to_mg']:>7.2f}s {r['to_mg'] / r['cp']:>5.2f}x {r['to_hf']:>7.2f}s "
              f"{r['to_hf'] / r['cp']:>5.2f}x {r['rss_mg'] / 2**30:>9.2f}GB {r['rss_hf'] / 2**30:>9.2f}GB {r['exact']}")  # fmt: skip


if __name__ == "__main__":
    main()
