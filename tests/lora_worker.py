"""LoRA helpers shared by ``test_lora.py`` and the body of its 2-process gloo test.

:func:`fill_adapters` gives every adapter random non-zero ``A`` and ``B``, drawn at full size from a generator keyed
by the adapter's global name and sliced to this rank's shard -- so every layout holds the same adapters.

The worker, per family and layout: builds the model at TP1 (data parallel 2) with LoRA, records its logits for the
batches of both data-parallel ranks and its adapter gradients; then at the layout (each data-parallel rank its own
batch; TP with sequence parallelism for MoE and VL, without for dense): LoRA logits == the TP1 logits of that
batch, and == the logits after ``merge_lora`` at the same layout; adapter gradients (same batch on both ranks,
gathered to full tensors) == TP1's. At TP2·EP2 the adapters
are saved with Megatron's ``dist_checkpointing.save(adapter_sharded_state_dict(...))`` and loaded back at TP1
into fresh adapters: logits == the TP1 reference. Rank 0 writes the numbers as JSON.
"""

from __future__ import annotations

import dataclasses
import os
import zlib
from pathlib import Path

import torch
import torch.distributed as dist

from ernie45.testing import worker_results

LAYOUTS = {
    # name: (Layout kwargs, families)
    "TP2": (dict(tp=2), ("dense", "moe", "vl")),
    "EP2": (dict(ep=2), ("moe", "vl")),
    "TP2xEP2": (dict(tp=2, ep=2, etp=1), ("moe", "vl", "vl-mgvit")),
    "PP2": (dict(pp=2), ("moe",)),  # adapters on both stages, global layer numbers, gathered over PP
}
TARGETS = {
    "dense": ("attn", "mlp"),
    "moe": ("attn", "mlp", "shared", "experts"),
    "vl": ("attn", "mlp", "shared", "experts", "vision_experts", "vit", "resampler"),
    "vl-mgvit": ("attn", "mlp", "shared", "experts", "vision_experts", "vit", "resampler"),
}
RANK, ALPHA = 4, 8.0
# fp64 models: merging rounds every adapted weight once, and in fp32 the tiny VL model turns a one-ulp change of its
# weights into ~6e-6 on the logits (measured) -- the same order as the 1e-5 bound. In fp64 (RMSNorm statistics and
# the routers stay fp32, as in HF) the comparisons sit ~1e-6 below the bound and only a real error can cross it.
DTYPE = torch.float64
# the VL batch: an image and text in each row (both pools see tokens)
VL_SAMPLES = [[("text", 3), ("image", (1, 4, 6)), ("text", 5)], [("text", 2), ("image", (1, 8, 4)), ("text", 4)]]


def fill_adapters(chunks, seed: int, scale: float = 0.05) -> None:
    """Random non-zero A and B, the same full tensors at every layout (see the module docstring)."""
    from ernie45.train.lora import adapted_modules

    with torch.no_grad():
        for chunk in chunks:
            for _, module in adapted_modules(chunk):
                ad = module.lora
                s = ad.sharding
                g = torch.Generator().manual_seed(seed * 7919 + zlib.crc32(ad.global_name.encode()))
                for which, p in (("A", ad.A), ("B", ad.B)):
                    dim = s.dim(which)
                    shape = list(p.shape)
                    if dim is not None:
                        shape[dim] *= s.count
                    full = torch.randn(shape, generator=g) * scale
                    if dim is None:
                        p.copy_(full)
                    elif s.glu and which == "B":  # [gate; up]: shard i is [gate_i; up_i]
                        p.copy_(torch.cat([half.chunk(s.count, dim=0)[s.index] for half in full.chunk(2, dim=0)]))
                    else:
                        p.copy_(full.chunk(s.count, dim=dim)[s.index])


def vl_batch(cfg, seed: int, dtype=DTYPE) -> dict:
    from vl_helpers import make_batch

    batch = make_batch(cfg, VL_SAMPLES, seed=seed)
    return {k: v.to(dtype) if v.is_floating_point() else v for k, v in batch.items()}


def text_batch(cfg, seed: int) -> torch.Tensor:
    return torch.randint(0, cfg.vocab_size, (2, 10), generator=torch.Generator().manual_seed(seed))


def build(family: str, cfg, layout, source, *, tied=None, dtype=DTYPE, sp=False):
    """This rank's chunks of ``family`` at ``layout``, base weights from ``source`` (an HF directory)."""
    from ernie45.bridge.live import load_hf
    from ernie45.megatron.model import build_model
    from ernie45.megatron.vl_model import build_vl_model

    torch.manual_seed(0)
    if family.startswith("vl"):
        chunks = build_vl_model(cfg, layout, vision_attn_implementation="eager", params_dtype=dtype,
                                sequence_parallel=sp)
        if chunks[0].pre_process:  # Megatron's local ViT spec builds its torch LayerNorms in fp32 whatever params_dtype
            chunks[0].vision_model.to(dtype)
    else:
        chunks = build_model(cfg, layout, tie_word_embeddings=tied, params_dtype=dtype, sequence_parallel=sp)
    load_hf(chunks, cfg, layout, source)
    return chunks


def logits(family: str, chunks, cfg, batch) -> torch.Tensor:
    """Full-vocab logits on every rank (eval, no grad)."""
    from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

    from ernie45.megatron.run import forward_logits

    if not family.startswith("vl"):
        return forward_logits(chunks, batch, vocab_size=cfg.vocab_size)
    chunks[0].eval()
    with torch.no_grad():
        out = chunks[0](**batch)
    return gather_from_tensor_model_parallel_region(out)[..., : cfg.vocab_size]


def adapter_grads(family: str, chunks, cfg, batch) -> dict | None:
    """One forward + backward of the mean token loss; every adapter's gradient as full tensors on rank 0."""
    from ernie45.megatron.run import finalize_grads, forward_backward
    from ernie45.train.peft_export import gather_adapters

    if family.startswith("vl"):
        chunks[0].train()
        chunks[0].zero_grad(set_to_none=True)
        chunks[0](**batch, labels=torch.roll(batch["input_ids"], -1, dims=1)).mean().backward()
        finalize_grads(chunks)
    else:
        forward_backward(chunks, batch, torch.roll(batch, -1, dims=1))
    return gather_adapters(chunks, cfg, getter=lambda p: p.grad)


def grad_error(grads: dict, ref: dict, factor: int) -> float:
    """max over adapter tensors of |g - factor_e·g_ref| / max|g_ref| (factor only for routed experts)."""
    if sorted(grads) != sorted(ref):
        raise AssertionError(f"gradients of different adapters: {sorted(set(grads) ^ set(ref))}")
    worst = 0.0
    for key, pieces in grads.items():
        f = factor if ".local_experts." in key[0] else 1
        for g, w in zip(pieces, ref[key], strict=True):
            worst = max(worst, ((g - f * w).abs().max() / w.abs().max()).item())
    return worst


def worker(rank: int, port: int, sources: dict, out_root: str, train_kwargs: dict | None = None) -> None:
    """The layouts above for each family in ``sources``; then, with ``train_kwargs``, one ``train()`` run on the
    2 processes (``TrainConfig.from_mapping(train_kwargs)``; its losses land in the JSON as ``train``)."""
    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(port)
    dist.init_process_group("gloo", rank=rank, world_size=2)
    from megatron.core import dist_checkpointing
    from megatron.core import parallel_state as ps

    from ernie45.config import load_config
    from ernie45.layout import Layout
    from ernie45.megatron import parallel
    from ernie45.train.lora import (
        adapter_sharded_state_dict,
        apply_lora,
        load_adapter_state_dict,
        merge_lora,
    )

    with worker_results(rank, out_root) as results:
        for family, src in sources.items():
            cfg = load_config(src)
            if family == "vl-mgvit":
                cfg = dataclasses.replace(cfg, vit_impl="megatron")
            make = (lambda s: vl_batch(cfg, s)) if family.startswith("vl") else (lambda s: text_batch(cfg, s))
            batches = {s: make(s) for s in (100, 101)}

            def lora_model(layout, fill=True):
                parallel.initialize(layout)
                # MoE training under TP needs sequence parallelism (Megatron refuses otherwise): the dense model
                # covers the plain-TP adapter paths, MoE and VL the SP ones (gather / reduce-scatter)
                sp = layout.tp > 1 and family != "dense"
                chunks = build(family, cfg, layout, src, tied=cfg.tie_word_embeddings, sp=sp)
                apply_lora(chunks, cfg, layout, rank=RANK, alpha=ALPHA, targets=TARGETS[family], seed=1)
                if fill:
                    fill_adapters(chunks, seed=2)
                return chunks

            chunks = lora_model(Layout(), fill=False)
            base = logits(family, chunks, cfg, batches[100])  # B = 0: the base model
            fill_adapters(chunks, seed=2)
            ref = {s: logits(family, chunks, cfg, b) for s, b in batches.items()}
            effect = (ref[100] - base).abs().max().item()
            ref_grads = adapter_grads(family, chunks, cfg, batches[100])  # the same batch on both ranks
            parallel.destroy()
            for name, (kw, families) in LAYOUTS.items():
                if family not in families:
                    continue
                layout = Layout(**kw)
                chunks = lora_model(layout)
                seed = 100 + ps.get_data_parallel_rank()  # each data-parallel rank its own batch
                lora = logits(family, chunks, cfg, batches[seed])
                grads = adapter_grads(family, chunks, cfg, batches[100])
                # an expert receives the tokens of every data-parallel replica in its expert group (dist_worker.py)
                factor = min(ps.get_data_parallel_world_size(), layout.ep)
                g_err = grad_error(grads, ref_grads, factor) if rank == 0 else 0.0
                ckpt = None
                if name == "TP2xEP2":
                    ckpt = Path(out_root, f"adapters-{family}")
                    if rank == 0:
                        ckpt.mkdir()
                    dist.barrier()
                    dist_checkpointing.save(adapter_sharded_state_dict(chunks), str(ckpt))
                merge_lora(chunks)
                merged = logits(family, chunks, cfg, batches[seed])
                stats = torch.tensor([(lora - ref[seed]).abs().max().item(), (lora - merged).abs().max().item()])
                dist.all_reduce(stats, op=dist.ReduceOp.MAX)
                results[f"{family}-{name}"] = dict(vs_tp1=stats[0].item(), vs_merged=stats[1].item(), effect=effect,
                                                   grads_rel=g_err, n_grads=len(ref_grads or {}))  # fmt: skip
                parallel.destroy()
                if ckpt is not None:  # resume the TP2·EP2 adapters at TP1 (data parallel 2)
                    layout = Layout()
                    parallel.initialize(layout)
                    chunks = build(family, cfg, layout, src, tied=cfg.tie_word_embeddings)
                    apply_lora(chunks, cfg, layout, rank=RANK, alpha=ALPHA, targets=TARGETS[family], seed=9)
                    sharded = adapter_sharded_state_dict(chunks)
                    load_adapter_state_dict(chunks, dist_checkpointing.load(sharded, str(ckpt)))
                    diff = torch.tensor([(logits(family, chunks, cfg, batches[100]) - ref[100]).abs().max().item()])
                    dist.all_reduce(diff, op=dist.ReduceOp.MAX)
                    results[f"{family}-resume-TP2xEP2-at-TP1"] = dict(vs_tp1=diff.item(), n_keys=len(sharded))
                    parallel.destroy()
        if train_kwargs is not None:
            from ernie45.train.config import TrainConfig
            from ernie45.train.trainer import train

            results["train"] = dict(losses=train(TrainConfig.from_mapping(train_kwargs)).losses)

