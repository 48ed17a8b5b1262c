"""Converter benchmark: HF -> Megatron torch_dist (TP2·PP2·EP2) -> HF, and a reshard (-> TP1·PP1·EP4).

    .venv/bin/python benchmarks/convert.py [--sizes 1 3 8] [--repeats 3] [--real-21b] [--workdir DIR]

Checkpoints, in bf16 (routers and expert bias fp32, as HF keeps them), random values, real names and shapes:

* ``1`` / ``3``: ~1.2 / ~2.6 GiB VL, the real ERNIE-4.5-VL-28B-A3B tensor shapes (hidden 2560, 20/4 heads, vocab
  103424, dense FFN 12288, expert widths 1536 / 512, ViT width 1280, resampler 5120) with fewer layers, ViT blocks
  and experts;
* ``8``: ~8.1 GiB text MoE, ERNIE-4.5-21B-A3B's real widths (64 experts of 1536, 2 shared, vocab 103424, tied) with
  1 dense + 5 MoE layers instead of 1 + 27;
* ``--real-21b``: the whole ERNIE-4.5-21B-A3B shape set (28 layers, ~43 GB), its source written sparse (headers +
  holes: only the outputs cost disk, one at a time, each removed after its run; the torch_dist output is made
  sparse again before it is read, so the way back fits too). Its baseline is ``cp -r --sparse=never``.

Everything is measured in this run, each number the median of ``--repeats`` runs:

* the baseline: ``cp -r`` of the same HF directory (warm page cache, like the conversions), and ``cp -r`` +
  ``sync`` (what ``--fsync`` is measured against); every measurement starts after ``sync``, so no earlier step's
  writeback is billed to it;
* each conversion as a separate ``python -m ernie45 convert`` process: its wall time and its peak RSS (the largest
  over the repeats), the ratio to cp, and a bit-exact check of the round trip;
* where each conversion's time goes (the median run's): the converter's own accounting (``ERNIE45_PHASES``, see
  ``ernie45.bridge.io.Phases``: planning, reads, the ops, serialisation, the kernel's writes and copies, checksum
  hashing, fsync, the final rename), plus the process start and imports (spawn to ``convert()``) and the exit
  after it.

Targets (issue #15): ≤ 1.5× cp at 2.6 GiB and ≤ 1.3× at ≥ 8 GiB; peak RSS ≤ 0.75 GB and flat across the sizes.
docs/convert-speed.md reads these numbers.
"""

from __future__ import annotations

import argparse
import json
import math
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


def vl_config(moe_layers: int, experts: int, vit_blocks: int) -> dict:
    """An ERNIE-4.5-VL-28B-A3B config.json with fewer MoE layers, experts per pool and ViT blocks."""
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


def text_21b_config(layers: int = 28) -> dict:
    """ERNIE-4.5-21B-A3B's config.json (the released one's shapes), with ``layers`` layers (the first dense)."""
    return {
        "model_type": "ernie4_5_moe", "architectures": ["Ernie4_5_MoeForCausalLM"], "tie_word_embeddings": True,
        "vocab_size": 103424, "hidden_size": 2560, "intermediate_size": 12288, "num_hidden_layers": layers,
        "num_attention_heads": 20, "num_key_value_heads": 4, "head_dim": 128, "rms_norm_eps": 1e-5,
        "use_bias": False, "rope_theta": 500000.0, "max_position_embeddings": 131072,
        "moe_num_experts": 64, "moe_k": 6, "moe_intermediate_size": 1536, "moe_num_shared_experts": 2,
        "moe_layer_start_index": 1, "moe_layer_end_index": layers - 1, "moe_layer_interval": 1, "moe_norm_min": 1e-12,
    }  # fmt: skip


# size -> config of the synthetic checkpoint
CONFIGS = {1: lambda: vl_config(1, 4, 2), 3: lambda: vl_config(5, 8, 2), 8: lambda: text_21b_config(6)}


def _entries(raw: dict) -> list[tuple[str, tuple[int, ...], torch.dtype]]:
    cfg = ErnieConfig.from_hf(raw)
    out = []
    for it in expand(cfg, tied=cfg.tie_word_embeddings):
        for name, shape in zip(it.hf, it.hf_shapes):
            fp32 = ".mlp.gate." in name or "moe_statics" in name  # HF keeps routers and the bias in fp32
            out.append((name, tuple(shape), torch.float32 if fp32 else torch.bfloat16))
    return out


def write_synthetic(path: Path, raw: dict, *, sparse: bool = False) -> int:
    """A synthetic HF checkpoint (real names and shapes) in 4 GiB shards: random values streamed to disk, or
    ``sparse``: each shard its safetensors header followed by a hole (all zeros, no disk)."""
    path.mkdir(parents=True)
    entries = _entries(raw)
    if sparse:
        _write_sparse(path, entries, 4 * 2**30)
    else:
        g = torch.Generator().manual_seed(0)
        shapes = {n: (s, d) for n, s, d in entries}

        def produce(name: str) -> torch.Tensor:
            shape, dtype = shapes[name]
            return torch.randn(shape, generator=g, dtype=torch.float32).to(dtype)

        write_safetensors_streaming(path, entries, produce, max_shard_bytes=4 * 2**30)
    (path / "config.json").write_text(json.dumps(raw, indent=2))
    return sum(f.stat().st_size for f in path.iterdir())


def _write_sparse(path: Path, entries, max_shard_bytes: int) -> None:
    """Standard safetensors shards + index whose data are holes (read back as zeros)."""
    shards, size = [[]], 0
    for e in entries:
        nbytes = e[2].itemsize * math.prod(e[1])
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(e)
        size += nbytes
    names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    st_dtype = {torch.bfloat16: "BF16", torch.float32: "F32"}
    weight_map, total = {}, 0
    for fname, shard in zip(names, shards):
        header, offset = {"__metadata__": {"format": "pt"}}, 0
        for name, shape, dtype in shard:
            nbytes = dtype.itemsize * math.prod(shape)
            header[name] = {"dtype": st_dtype[dtype], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
            offset += nbytes
            weight_map[name] = fname
        blob = json.dumps(header, separators=(",", ":")).encode()
        blob += b" " * (-len(blob) % 8)
        with open(path / fname, "wb") as f:
            f.write(len(blob).to_bytes(8, "little") + blob)
            f.truncate(8 + len(blob) + offset)
        total += offset
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (path / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))


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


def median_run(repeats: int, run, before=lambda: None) -> tuple[float, int, dict[str, float]]:
    """``run()`` ``repeats`` times (``before()`` ahead of each, untimed): the median run's wall time and phases,
    the largest peak RSS of them all."""
    runs = []
    for _ in range(repeats):
        before()
        os.sync()  # no writeback of earlier steps lands inside the measurement
        runs.append(run())
    wall, _, phases = sorted(runs, key=lambda r: r[0])[len(runs) // 2]
    return wall, max(r[1] for r in runs), phases


def cp_baseline(src: Path, dst: Path, repeats: int, sparse: bool) -> tuple[float, float]:
    """(cp -r, cp -r + sync) of ``src``, medians; ``sparse``: a sparse source copied with ``--sparse=never``."""
    cmd = ["cp", "-r", *(["--sparse=never"] if sparse else []), str(src), str(dst)]
    remove = lambda: shutil.rmtree(dst, ignore_errors=True)  # noqa: E731
    plain = median_run(repeats, lambda: timed(cmd), remove)[0]

    def with_sync():
        wall = timed(cmd)[0]
        t = time.perf_counter()
        os.sync()
        return wall + time.perf_counter() - t, 0, {}

    synced = median_run(repeats, with_sync, remove)[0]
    remove()
    return plain, synced


def dig_holes(d: Path) -> None:
    """Make the zeros of a converted sparse source holes again (``fallocate -d``), so the next output fits."""
    for f in d.iterdir():
        if f.is_file() and f.stat().st_size > 2**20:
            subprocess.run(["fallocate", "-d", str(f)], check=True)


def bench(d: Path, raw: dict, *, repeats: int, sparse: bool) -> dict:
    exe = [sys.executable, "-m", "ernie45", "convert", "--no-progress"]
    shutil.rmtree(d, ignore_errors=True)
    nbytes = write_synthetic(d / "hf", raw, sparse=sparse)
    subprocess.run(["cat", *map(str, (d / "hf").glob("*.safetensors"))], stdout=subprocess.DEVNULL, check=True)
    cp, cp_sync = cp_baseline(d / "hf", d / "hf-copy", repeats, sparse)
    mg = ["--to", "megatron", "--tp", "2", "--pp", "2", "--ep", "2"]
    runs = {  # name: (argv, the output, removed after the last run too)
        "HF->MG": ([str(d / "hf"), str(d / "mg"), *mg], d / "mg", False),
        "MG->HF": ([str(d / "mg"), str(d / "back"), "--to", "hf"], d / "back", False),
        "reshard": ([str(d / "mg"), str(d / "mg2"), "--to", "megatron", "--tp", "1", "--pp", "1", "--ep", "4"],
                    d / "mg2", True),
        "HF->MG fsync": ([str(d / "hf"), str(d / "mg3"), *mg, "--fsync"], d / "mg3", True),
    }  # fmt: skip
    row = dict(size=f"{nbytes / 2**30:.2f} GiB" + (" sparse" if sparse else ""), cp=cp, cp_sync=cp_sync, runs={})
    for name, (argv, out, remove_after) in runs.items():
        if sparse and name == "MG->HF":  # before reading the torch_dist: its zeros holes again (disk)
            dig_holes(d / "mg")
        row["runs"][name] = median_run(repeats, lambda: timed(exe + argv, phases=d / "phases.json"),
                                       lambda: shutil.rmtree(out, ignore_errors=True))  # fmt: skip
        if remove_after:
            shutil.rmtree(out)
        if sparse and name == "MG->HF":
            row["exact"] = bit_exact(d / "hf", d / "back")
            shutil.rmtree(d / "back")
    row.setdefault("exact", bit_exact(d / "hf", d / "back") if (d / "back").exists() else False)
    shutil.rmtree(d)
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", type=int, nargs="*", default=[1, 3], choices=sorted(CONFIGS))
    ap.add_argument("--repeats", type=int, default=3, help="runs of each measurement (the median is reported)")
    ap.add_argument("--real-21b", action="store_true", help="also the whole ERNIE-4.5-21B-A3B shape set, sparse")
    ap.add_argument("--workdir", type=Path, default=None)
    args = ap.parse_args()
    root = args.workdir or Path(tempfile.mkdtemp(prefix="ernie45-bench-"))
    points = [(f"{s}gb", CONFIGS[s](), False) for s in args.sizes]
    points += [("21b", text_21b_config(), True)] if args.real_21b else []
    rows = []
    try:
        for name, raw, sparse in points:
            rows.append(bench(root / name, raw, repeats=args.repeats, sparse=sparse))
    finally:
        if args.workdir is None:
            shutil.rmtree(root, ignore_errors=True)
    print(f"load average at the end: {' '.join(f'{x:.2f}' for x in os.getloadavg())} on {os.cpu_count()} cores; "
          f"median of {args.repeats}")  # fmt: skip
    print(f"{'checkpoint':>18} {'run':>13} {'wall':>8} {'ratio':>7} {'peak RSS':>9}  (ratio: to cp -r; fsync: to cp -r + sync)")
    for r in rows:
        for name, (wall, rss, _) in r["runs"].items():
            base = r["cp_sync"] if "fsync" in name else r["cp"]
            print(f"{r['size']:>18} {name:>13} {wall:>7.2f}s {wall / base:>6.2f}x {rss / 2**30:>7.2f}GB")
        print(f"{r['size']:>18} {'cp -r':>13} {r['cp']:>7.2f}s {'':>7} {'':>9}   cp -r + sync {r['cp_sync']:.2f}s; "
              f"round trip bit-exact: {r['exact']}")  # fmt: skip
    for r in rows:
        names = list(r["runs"])
        phases = sorted({p for n in names for p in r["runs"][n][2]}, key=_phase_rank)
        print(f"\nwhere the time goes, {r['size']} (seconds)\n{'phase':>26}" + "".join(f"{n:>14}" for n in names))
        for p in phases:
            print(f"{p:>26}" + "".join(f"{r['runs'][n][2].get(p, 0.0):>14.2f}" for n in names))


def _phase_rank(p: str) -> int:
    return _PHASE_ORDER.index(p) if p in _PHASE_ORDER else len(_PHASE_ORDER) - 2  # unknown ones before "other"


_PHASE_ORDER = ["start+imports", "plan", "hash input", "read", "op", "serialise", "write", "hash output", "fsync",
                "rename", "other", "exit"]  # fmt: skip


if __name__ == "__main__":
    main()
