"""Converter benchmark: HF -> Megatron torch_dist (TP2·PP2·EP2) -> HF, and a reshard (-> TP1·PP1·EP4), on synthetic
~1 GB and ~3 GB VL checkpoints.

    .venv/bin/python benchmarks/convert.py [--sizes 1 3] [--keep DIR]

The checkpoints have the real ERNIE-4.5-VL-28B-A3B tensor shapes (hidden 2560, 20/4 heads, vocab 103424, dense FFN
12288, expert widths 1536 / 512, ViT width 1280, resampler 5120) with fewer layers, ViT blocks and experts, in bf16
(routers and expert bias fp32, as HF keeps them). Everything is measured in this run:

* the baseline: ``cp -r`` of the same HF directory (warm page cache, like the conversions), median of three runs;
  every measurement starts after ``sync``, so no earlier step's writeback is billed to it;
* each conversion as a separate ``python -m ernie45 convert`` process, its wall time and its own peak RSS
  (``os.wait4`` rusage of that child);
* the ratios wall/cp, and a bit-exact check of the round trip;
* where each conversion's time goes: the converter's own accounting (``ERNIE45_PHASES``, see
  ``ernie45.bridge.io.Phases``: planning, reads, the ops, serialisation, the kernel's writes, checksum hashing,
  fsync, the final rename), plus the process start and imports (spawn to ``convert()``) and the exit after it.

Targets (issue #15): ≤ 1.5× cp at 2.6 GiB, peak RSS ≤ 0.75 GB and flat between the sizes.
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
from ernie45.bridge.plan import expand  # noqa: E402
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


def timed(cmd: list[str], phases: Path | None = None) -> tuple[float, int, dict[str, float]]:
    """(wall seconds, peak RSS bytes, phases) of one child process.

    RSS is sampled every 5 ms with psutil: the rusage of a child would also count the pages it inherited from
    this (large) parent at fork time, before exec. ``phases``: a file the converter writes its phase times to.
    """
    import psutil

    env = dict(os.environ, ERNIE45_PHASES=str(phases)) if phases else None
    spawned, t0 = time.time(), time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, env=env)
    child, peak = psutil.Process(proc.pid), 0
    while proc.poll() is None:
        try:
            peak = max(peak, child.memory_info().rss)
        except psutil.NoSuchProcess:
            break
        time.sleep(0.005)
    wall, ended = time.perf_counter() - t0, time.time()
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed with status {proc.returncode}")
    if not phases:
        return wall, peak, {}
    rec = json.loads(phases.read_text())
    return wall, peak, {"start+imports": rec["started"] - spawned, **rec["seconds"], "exit": ended - rec["finished"]}


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
                if k == 0:  # cp + sync: what --fsync is measured against
                    t = time.perf_counter()
                    os.sync()
                    cp_sync = cp_runs[0] + time.perf_counter() - t
                shutil.rmtree(d / f"hf-copy{k}")
            cp_wall = sorted(cp_runs)[1]
            os.sync()  # no writeback of earlier steps lands inside the next measurement
            runs = {
                "HF->MG": [str(d / "hf"), str(d / "mg"), "--to", "megatron", "--tp", "2", "--pp", "2", "--ep", "2"],
                "MG->HF": [str(d / "mg"), str(d / "back"), "--to", "hf"],
                "reshard": [str(d / "mg"), str(d / "mg2"), "--to", "megatron", "--tp", "1", "--pp", "1", "--ep", "4"],
                "HF->MG fsync": [str(d / "hf"), str(d / "mg3"), "--to", "megatron", "--tp", "2", "--pp", "2", "--ep",
                                 "2", "--fsync"],
            }  # fmt: skip
            row = dict(size=f"{nbytes / 2**30:.2f} GiB", cp=cp_wall, cp_sync=cp_sync, runs={})
            for name, argv in runs.items():
                os.sync()
                row["runs"][name] = timed(exe + argv + ["--no-progress"], phases=d / "phases.json")
                if name == "HF->MG fsync":
                    shutil.rmtree(d / "mg3")
            row["exact"] = bit_exact(d / "hf", d / "back")
            rows.append(row)
            shutil.rmtree(d)
    finally:
        if args.workdir is None:
            shutil.rmtree(root, ignore_errors=True)
    print(f"load average at the end: {' '.join(f'{x:.2f}' for x in os.getloadavg())} on {os.cpu_count()} cores")
    print(f"{'checkpoint':>11} {'run':>13} {'wall':>8} {'ratio':>7} {'peak RSS':>9}  (ratio: to cp -r; fsync: to cp -r + sync)")
    for r in rows:
        for name, (wall, rss, _) in r["runs"].items():
            base = r["cp_sync"] if "fsync" in name else r["cp"]
            print(f"{r['size']:>11} {name:>13} {wall:>7.2f}s {wall / base:>6.2f}x {rss / 2**30:>7.2f}GB")
        print(f"{r['size']:>11} {'cp -r':>13} {r['cp']:>7.2f}s {'':>7} {'':>9}   cp -r + sync {r['cp_sync']:.2f}s; "
              f"round trip bit-exact: {r['exact']}")  # fmt: skip
    for r in rows:
        names = list(r["runs"])
        phases = sorted({p for n in names for p in r["runs"][n][2]}, key=_PHASE_ORDER.index)
        print(f"\nwhere the time goes, {r['size']} (seconds)\n{'phase':>14}" + "".join(f"{n:>14}" for n in names))
        for p in phases:
            print(f"{p:>14}" + "".join(f"{r['runs'][n][2].get(p, 0.0):>14.2f}" for n in names))


_PHASE_ORDER = ["start+imports", "plan", "hash input", "read", "op", "serialise", "write", "hash output", "fsync",
                "rename", "other", "exit"]  # fmt: skip


if __name__ == "__main__":
    main()
