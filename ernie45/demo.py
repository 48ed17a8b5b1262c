"""The main job: the whole journey on the embedded tiny checkpoints, with exact numbers printed.

For each embedded checkpoint (text MoE, dense, VL):
  1. HF -> Megatron-Core live model (bridge, TP1) vs transformers: logits and expert choices   (text families)
  2. HF -> Megatron torch_dist at TP2·PP2·EP2, offline -> HF: tensors bit-exact (VL: with either ViT)
  3. ernie45 verify HF (transformers) vs the Megatron torch_dist (Megatron-Core): tensors, logits, top-1 and
     expert-routing agreement per MoE layer and pool (VL: with an image in the prompt)
  4. HF -> GGUF and Megatron torch_dist -> GGUF (text families): tensors read back under HF names, bit-exact (f32);
     verified in llama.cpp too when llama-cpp-python is installed
  5. ernie45 train (MoE; VL with images): ~20 steps of chat SFT on the shipped set at TP2·EP2 on 2 processes
     (torchrun), the loss falling; the run's last torch_dist checkpoint (Megatron-Core) verified against its HF
     export (transformers)
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from .assets import embedded_checkpoint, sft_set
from .bridge.io import HFCheckpoint

__all__ = ["run_demo"]


def _bit_exact(a: HFCheckpoint, b) -> tuple[int, int, list[str]]:
    """(tensors equal in dtype, shape and bytes, tensors of ``a``, the others): torch.equal alone ignores dtype."""
    from .testing import bit_exact_difference

    names = sorted(a.keys())
    have = set(b.keys())
    bad = [n for n in names if n not in have or bit_exact_difference(b.get(n), a.get(n)) is not None]
    return len(names) - len(bad), len(names), bad


def _step(title: str) -> None:
    print(f"\n-- {title}")


def _demo_image(path: Path) -> Path:
    """A small deterministic picture (a colour gradient with a square), so the VL leg runs with a real image."""
    from PIL import Image

    g = torch.Generator().manual_seed(0)
    px = (torch.rand(84, 112, 3, generator=g) * 64).to(torch.uint8)
    px[:, :, 0] += torch.linspace(0, 190, 112).to(torch.uint8)
    px[20:60, 30:70, 2] = 230
    Image.fromarray(px.numpy()).save(path)
    return path


# what the training leg runs, per family: TP2·EP2 on 2 processes (etp 1: experts are not also split over TP)
TRAIN_LEG = {
    "tiny-ernie45-moe": dict(data="text", seq_length=128, global_batch=4),
    "tiny-ernie45-vl": dict(data="vl", seq_length=256, global_batch=2),
}
TRAIN_STEPS = 20


def _train_leg(name: str, src: Path, work: Path) -> bool:
    """Fine-tune under torchrun at TP2·EP2, show the loss, verify the last checkpoint against its HF export."""
    from .train.checkpoint import latest_step, step_dir
    from .train.metrics import read_metrics
    from .verify import verify

    leg = TRAIN_LEG[name]
    run, hf = work / f"{name}-run", work / f"{name}-run" / "hf"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", str(_free_port()),
           "-m", "ernie45", "train", "--model", str(src), "--data", str(sft_set(leg["data"])), "--out", str(run),
           "--tp", "2", "--ep", "2", "--etp", "1", "--steps", str(TRAIN_STEPS), "--seq-length", str(leg["seq_length"]),
           "--global-batch", str(leg["global_batch"]), "--lr", "3e-3", "--warmup", "2", "--save-hf", str(hf),
           "--overwrite", "--no-progress"]  # fmt: skip
    _step(f"ernie45 train {name} on the shipped {leg['data']} chat set: {TRAIN_STEPS} steps, TP2·EP2, 2 processes")
    t0 = time.time()
    env = dict(os.environ, OMP_NUM_THREADS="1")  # two processes on a small machine: no thread oversubscription
    done = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        print(f"  FAILED (exit {done.returncode}):\n{done.stderr[-3000:]}")
        return False
    losses = [r["loss"] for r in read_metrics(run / "metrics.jsonl") if r["kind"] == "train"]
    shown = " ".join(f"{x:.2f}" for x in losses[:: max(1, len(losses) // 10)])
    first, last = sum(losses[:3]) / 3, sum(losses[-3:]) / 3
    falling = last < first
    print(f"  {len(losses)} steps in {time.time() - t0:.0f} s; loss {shown} ... {losses[-1]:.2f} "
          f"(mean of the first 3 {first:.2f} -> last 3 {last:.2f}{'' if falling else ': NOT FALLING'})")  # fmt: skip
    print(f"  run directory: metrics.jsonl, loss_lr.png, config.yaml, checkpoints/; HF export -> {hf.name}/")
    _step("ernie45 verify: the run's last torch_dist checkpoint (Megatron-Core) vs its HF export (transformers)")
    image = _demo_image(work / "demo.png") if name.endswith("-vl") else None
    rep = verify(hf, step_dir(run, latest_step(run)), hf_config=hf / "config.json", image=image, atol=1e-4,
                 tensor_atol=0.0, min_top1=1.0, min_routing=1.0)  # fmt: skip
    print(rep.table())
    return falling and rep.ok


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_demo(out_dir: Path | None = None, keep: bool = False) -> int:
    from .bridge.gguf import read_gguf_as_hf
    from .config import load_config
    from .convert import convert
    from .parity import check_parity
    from .runtime import llama_cpp_available
    from .verify import verify

    t0 = time.time()
    work = Path(out_dir) if out_dir else Path(tempfile.mkdtemp(prefix="ernie45-demo-"))
    work.mkdir(parents=True, exist_ok=True)
    ok = True
    try:
        for name in ("tiny-ernie45-moe", "tiny-ernie45-dense", "tiny-ernie45-vl"):
            src = embedded_checkpoint(name)
            cfg = load_config(src)
            print(f"\n== {name} ({cfg.family}, {cfg.num_hidden_layers} layers, "
                  f"{''.join('S' if t == 'sparse' else 'D' for t in cfg.mlp_layer_types)})")  # fmt: skip
            hf = HFCheckpoint(src)
            if cfg.family != "vl":
                _step("HF -> Megatron-Core (bridge, TP1) vs transformers, fp32")
                report = check_parity(src)
                print(report.table())
                ok &= report.logits_max_abs_diff <= 1e-4 and all(v == 1.0 for v in report.routing.values())

            layout = dict(tp=2, pp=2, ep=2) if cfg.is_moe else dict(tp=2, pp=2)
            where = "·".join(f"{k.upper()}{v}" for k, v in layout.items())
            mg = work / f"{name}-mcore"  # what verify and the GGUF legs below read (VL: the transformers-ViT one)
            for vit in ("hf", "megatron") if cfg.family == "vl" else (None,):
                suffix = "-vit" if vit == "megatron" else ""
                mg_v, back = work / f"{name}-mcore{suffix}", work / f"{name}-hf{suffix}"
                kind = ", TP-sharded Megatron-Core ViT (--vit megatron)" if vit == "megatron" else ""
                _step(f"HF -> Megatron torch_dist ({where}{kind}, offline) -> HF")
                r1 = convert(src, mg_v, to="megatron", vit=vit, progress=False, overwrite=True, **layout)
                r2 = convert(mg_v, back, to="hf", progress=False, overwrite=True)
                same, total, bad = _bit_exact(hf, HFCheckpoint(back))
                print(f"  {r1.summary()}\n  {r2.summary()}")
                print(f"  bit-exact: {same}/{total} tensors" + (f"; DIFFER: {bad}" if bad else ""))
                ok &= not bad

            image = _demo_image(work / "demo.png") if cfg.family == "vl" else None
            _step("ernie45 verify HF (transformers) vs Megatron torch_dist (Megatron-Core)"
                  + (", with an image" if image else ""))
            rep = verify(src, mg, image=image, atol=1e-4, tensor_atol=0.0, min_top1=1.0, min_routing=1.0)
            print(rep.table())
            ok &= rep.ok

            if cfg.family != "vl":
                for label, gsrc in (("HF", src), ("Megatron torch_dist", mg)):
                    _step(f"{label} -> GGUF (f32)")
                    out = work / f"{name}-{'hf' if gsrc == src else 'mcore'}.gguf"
                    convert(gsrc, out, to="gguf", progress=False, overwrite=True)
                    view = read_gguf_as_hf(out)
                    same, total, bad = _bit_exact(hf, view)
                    print(f"  wrote {out.name} ({out.stat().st_size / 1e3:.0f} kB); read back under HF names: "
                          f"{same}/{total} tensors bit-exact" + (f"; DIFFER: {bad}" if bad else ""))  # fmt: skip
                    ok &= not bad
                if llama_cpp_available():
                    _step("ernie45 verify HF (transformers) vs GGUF f32 (llama.cpp)")
                    rep = verify(src, out, atol=1e-4, min_top1=1.0)
                    print(rep.table())
                    ok &= rep.ok
            if name in TRAIN_LEG:
                ok &= _train_leg(name, src, work)
        print(f"\n{'OK' if ok else 'FAILED'} in {time.time() - t0:.1f} s")
    finally:
        if not keep and out_dir is None:
            shutil.rmtree(work, ignore_errors=True)
    return 0 if ok else 1
