"""Training-step throughput: ``ernie45.train`` (Megatron-Core DDP + optimizer + schedule) vs transformers + AdamW.

Both sides run the whole step -- forward, backward, global-norm clipping, Adam update -- on the same model (one
re-randomised HF checkpoint) and the same batch of full rows, in this one process, and the script prints tokens/s of
each and their ratio (median over the timed steps, after warm-up steps; the two sides alternate step by step, so a
shared machine's drifting speed bills both alike). On a CPU both are matmul-bound; fp32.

    .venv/bin/python benchmarks/train.py                       # a 4-layer dense model, hidden 512, batch 4 x 256
    .venv/bin/python benchmarks/train.py --family moe --layers 4
    .venv/bin/python benchmarks/train.py --tiny --steps 3      # smoke run on the tiny test config

On a GPU (``--device cuda``) the same script measures bf16 (Megatron: bf16 weights with fp32 master weights and
grads; transformers: bf16 autocast over fp32 weights) and prints the MFU of the Megatron step from 6·N·tokens FLOPs
(N = active parameters per token) against ``--peak-tflops``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

# ERNIE-4.5-21B-A3B's widths (its config.json), depth reduced by --layers
WIDE_MOE = dict(hidden_size=2560, intermediate_size=12288, num_attention_heads=20, num_key_value_heads=4,
                moe_num_experts=64, moe_k=6, moe_intermediate_size=1536, moe_num_shared_experts=2, vocab_size=103424,
                moe_layer_start_index=1, moe_layer_interval=1, moe_layer_end_index=-1)  # fmt: skip
CPU_DENSE = dict(hidden_size=512, intermediate_size=1408, num_attention_heads=8, num_key_value_heads=2, head_dim=64,
                 vocab_size=8192)  # fmt: skip
CPU_MOE = dict(hidden_size=512, intermediate_size=1408, num_attention_heads=8, num_key_value_heads=2, vocab_size=8192,
               moe_num_experts=8, moe_k=2, moe_intermediate_size=512, moe_num_shared_experts=1,
               moe_layer_start_index=1, moe_layer_interval=1, moe_layer_end_index=-1)  # fmt: skip


class _HFStep:
    """One whole transformers + AdamW training step at a time (forward, backward, clipping, update)."""

    def __init__(self, ckpt: Path, batch: torch.Tensor, *, device: str, bf16: bool) -> None:
        import transformers

        kind = json.loads((ckpt / "config.json").read_text())["model_type"]
        cls = {"ernie4_5": transformers.Ernie4_5ForCausalLM, "ernie4_5_moe": transformers.Ernie4_5_MoeForCausalLM}[kind]
        self.model = cls.from_pretrained(ckpt, dtype=torch.float32).to(device).train()
        decay = [p for p in self.model.parameters() if p.dim() >= 2]
        rest = [p for p in self.model.parameters() if p.dim() < 2]
        self.opt = torch.optim.AdamW([dict(params=decay, weight_decay=0.01), dict(params=rest, weight_decay=0.0)],
                                     lr=1e-5)  # fmt: skip
        self.ids, self.device, self.bf16 = batch.to(device), device, bf16

    def __call__(self) -> float:
        _sync(self.device)
        t0 = time.perf_counter()
        with torch.autocast(device_type=self.device, dtype=torch.bfloat16, enabled=self.bf16):
            loss = self.model(input_ids=self.ids, labels=self.ids).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        _sync(self.device)
        return time.perf_counter() - t0


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _interleaved_step_times(ckpt: Path, data: Path, out: Path, ref_step: _HFStep, *, batch: int, seq: int,
                            steps: int, warmup: int) -> tuple[list[float], list[float]]:  # fmt: skip
    """(ours, transformers') step times, the two sides alternating step by step in this one process: ernie45's
    step i, then one transformers step, then ernie45's step i + 1 ... -- so a machine whose speed drifts (a shared
    CPU) bills both sides alike. An ernie45 step is timed from the end of the transformers step before it to the
    end of its own ``on_step`` call (data, schedule, optimizer, scheduler, logging: the whole loop body)."""
    from ernie45.train.config import TrainConfig
    from ernie45.train.trainer import train

    device = "cuda" if torch.cuda.is_available() else "cpu"
    ours, ref, start = [], [], [None]

    def on_step(step, chunks):
        _sync(device)
        end = time.perf_counter()
        if start[0] is not None and step > warmup + 1:
            ours.append(end - start[0])
        if step <= warmup + steps:
            t = ref_step()
            if step > warmup:
                ref.append(t)
        start[0] = time.perf_counter()

    config = TrainConfig(model=str(ckpt), data=(str(data),), out=str(out), seq_length=seq, micro_batch=batch,
                         global_batch=batch, steps=warmup + steps + 1, lr=1e-5, clip_grad=1.0, shuffle=False, pack=False,
                         progress=False, save_every=10**9)  # fmt: skip
    # the last step also saves a checkpoint: it is timed only up to its on_step call, like the others
    train(config, on_step=on_step)
    return ours, ref


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--family", choices=["dense", "moe"], default="dense")
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--steps", type=int, default=5, help="timed steps per side")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--tiny", action="store_true", help="the tiny test config (a smoke run, not a measurement)")
    p.add_argument("--wide", action="store_true", help="ERNIE-4.5-21B-A3B widths at --layers depth (GPU)")
    p.add_argument("--peak-tflops", type=float, default=989.0, help="dense bf16 peak of the GPU for MFU (H100/H200)")
    args = p.parse_args()
    warnings.filterwarnings("ignore")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    from ernie45.testing import tiny_hf_config, write_tiny_checkpoint

    device = "cuda" if torch.cuda.is_available() else "cpu"
    family = "moe" if args.wide else args.family
    overrides = {} if args.tiny else dict(WIDE_MOE if args.wide else (CPU_MOE if family == "moe" else CPU_DENSE))
    overrides["num_hidden_layers"] = args.layers
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        ckpt = write_tiny_checkpoint(tmp / "ckpt", family, seed=0, **overrides)
        raw = tiny_hf_config(family, **overrides)
        vocab = raw["vocab_size"]
        g = torch.Generator().manual_seed(0)
        batch = torch.randint(1, vocab, (args.batch, args.seq), generator=g)
        data = tmp / "rows.jsonl"
        data.write_text("".join(json.dumps({"input_ids": row.tolist()}) + "\n" for row in batch))
        ref_step = _HFStep(ckpt, batch, device=device, bf16=device == "cuda")
        ours, ref = _interleaved_step_times(ckpt, data, tmp / "run", ref_step, batch=args.batch, seq=args.seq,
                                            steps=args.steps, warmup=args.warmup)  # fmt: skip
    tokens = args.batch * args.seq
    t_ours, t_ref = statistics.median(ours), statistics.median(ref)
    # each step of ours beside the transformers step right after it: the ratio a drifting machine cannot bias
    pair = statistics.median(r / o for o, r in zip(ours, ref))
    print(f"model: {family}, {args.layers} layers, hidden {raw['hidden_size']}, batch {args.batch} x {args.seq}, "
          f"{device} {'bf16' if device == 'cuda' else 'fp32'}, threads {torch.get_num_threads()}, "
          f"median of {args.steps} timed steps per side after {args.warmup} warm-up, the sides alternating step "
          f"by step")  # fmt: skip
    print(f"{'':24}{'step s':>10}{'tokens/s':>12}")
    print(f"{'ernie45 (Megatron-Core)':24}{t_ours:10.4f}{tokens / t_ours:12.0f}")
    print(f"{'transformers + AdamW':24}{t_ref:10.4f}{tokens / t_ref:12.0f}")
    print(f"ratio (ernie45 / transformers): {t_ref / t_ours:.3f}x (of the medians); {pair:.3f}x (median over "
          f"adjacent step pairs)")
    if device == "cuda":
        from ernie45.bridge.plan import parameter_counts
        from ernie45.config import ErnieConfig

        _, active = parameter_counts(ErnieConfig.from_hf(raw))
        mfu = 6 * active * tokens / t_ours / (args.peak_tflops * 1e12)
        print(f"MFU (6·N_active·tokens / peak {args.peak_tflops:g} TFLOP/s): {100 * mfu:.1f}%")
    return 0


if __name__ == "__main__":
    sys.exit(main())
