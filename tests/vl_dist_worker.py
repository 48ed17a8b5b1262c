"""Body of the 2-process VL tests (``torch.multiprocessing.spawn`` from ``test_vl_model.py``).

Every rank builds the same re-randomised HF model and the same *union* batch (two samples: images, a video,
padding), and computes transformers' logits, loss and gradients over the union. Then for each layout it builds the
Megatron VL model (weights through the production bridge, each rank reading its own slices) and feeds **its
data-parallel share** of the union (TP / PP ranks share their samples; under EP2 the two data-parallel ranks get one
sample each, so a token returned to the wrong EP rank changes the numbers). It runs Megatron's own schedule for
logits (eval) and for one forward+backward whose loss is this rank's part of the union's token mean, reduces the
gradients as Megatron's DDP does (``dist_worker.reduce_data_parallel_grads``) and compares

* logits and loss with the single-process Megatron model over the union (built first, each rank alone),
* every local gradient with HF's gradient, sliced the same way as the weights.

It then loads the torch_dist checkpoints the parent converted offline (HF ViT and Megatron ViT) with Megatron's own
``dist_checkpointing.load`` into live models at two layouts each, and compares their logits with transformers'.
Rank 0 writes the numbers as JSON.
"""

from __future__ import annotations

import dataclasses
import json
import os
import traceback
from pathlib import Path

import torch
import torch.distributed as dist

LAYOUTS = {
    "TP2": dict(tp=2),
    "EP2": dict(ep=2),
    "PP2": dict(pp=2),
    "TP2xEP2": dict(tp=2, ep=2, etp=1),
}
# the same model with the TP-sharded Megatron-Core ViT (ErnieConfig.vit_impl="megatron"), against its own 1-process run
MG_VIT_LAYOUTS = {
    "TP2-mgvit": dict(tp=2),
    "PP2-mgvit": dict(pp=2),
    "TP2xEP2-mgvit": dict(tp=2, ep=2, etp=1),
}
# the first sample's second half is pure text: under TP2 + SP rank 1 holds no vision token of it, so the vision
# pool runs dummy rows there while rank 0 routes real ones
SAMPLES = [
    [("text", 2), ("image", (1, 4, 6)), ("text", 2), ("video", (4, 4, 4)), ("text", 22)],
    [("text", 2), ("image", (1, 8, 4)), ("text", 32)],
]


def _schedule(chunks, batch, *, forward_only: bool):
    """One micro-batch through Megatron's schedule; returns logits [B, S, V] or the loss, on the last stage."""
    from megatron.core import tensor_parallel
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from ernie45.megatron import cpu
    from ernie45.megatron.vl_inputs import masked_token_mean

    B, S = batch["input_ids"].shape
    loss_mask = batch.pop("loss_mask", None)
    loss_scale = batch.pop("loss_scale", 1.0)

    def forward_step(data_iterator, model):
        out = model(**next(data_iterator))

        def loss_func(output, non_loss_data: bool = False):
            if non_loss_data:
                return tensor_parallel.gather_from_tensor_model_parallel_region(output)
            loss = masked_token_mean(output, loss_mask) * loss_scale
            return loss, {"loss": loss.detach().clone()}

        return out, loss_func

    with cpu.cpu_mode():
        return get_forward_backward_func()(
            forward_step_func=forward_step,
            data_iterator=iter([batch]),
            model=chunks[0],
            num_microbatches=1,
            seq_length=S,
            micro_batch_size=B,
            forward_only=forward_only,
            collect_non_loss_data=forward_only,
        )


def _from_last_stage(t):
    from megatron.core import parallel_state as ps

    group, src = ps.get_pipeline_model_parallel_group(), ps.get_pipeline_model_parallel_last_rank()
    meta = [None if t is None else (tuple(t.shape), t.dtype)]
    dist.broadcast_object_list(meta, src=src, group=group)
    buf = t.contiguous() if t is not None else torch.empty(meta[0][0], dtype=meta[0][1])
    dist.broadcast(buf, src=src, group=group)
    return buf


def _run(cfg, hf_dir, layout, batch, labels, *, whole_batch: bool = False):
    """This rank's rows of ``batch`` through the model at ``layout``: (chunks, rows, logits of those rows, union
    loss), gradients reduced over data parallel. ``whole_batch``: the 1-process reference, every rank alone."""
    from megatron.core import parallel_state as ps

    from dist_worker import data_parallel_rows, reduce_data_parallel_grads
    from ernie45.megatron import parallel
    from ernie45.megatron.run import finalize_grads
    from ernie45.megatron.vl_model import build_vl_model
    from ernie45.bridge.live import load_hf
    from vl_helpers import batch_rows

    parallel.initialize(layout)
    torch.manual_seed(0)
    chunks = build_vl_model(cfg, layout, sequence_parallel=layout.tp > 1, vision_attn_implementation="eager")
    load_hf(chunks, cfg, layout, hf_dir)  # the production bridge: each rank reads its own slices
    last = ps.is_pipeline_last_stage(ignore_virtual=True)
    n = batch["input_ids"].shape[0]
    rows = slice(None) if whole_batch else data_parallel_rows(n)
    local = batch_rows(batch, rows, cfg)
    labels_BS, loss_mask_BS = labels[0][rows], labels[1][rows]

    chunks[0].eval()
    with torch.no_grad():
        out = _schedule(chunks, dict(local), forward_only=True)
    logits = _from_last_stage(out[0] if last else None)[..., : cfg.vocab_size]

    chunks[0].train()
    # this rank's share of the union's token mean: summed over the data-parallel ranks it is the union's loss
    share = loss_mask_BS.sum() / labels[1].sum()
    out = _schedule(chunks, dict(local, labels=labels_BS, loss_mask=loss_mask_BS, loss_scale=share), forward_only=False)
    loss = _from_last_stage(out[0]["loss"].reshape(1) if last else None)
    finalize_grads(chunks)
    if not whole_batch and ps.get_data_parallel_world_size() > 1:
        reduce_data_parallel_grads(chunks, scale=1.0)
        dist.all_reduce(loss, group=ps.get_data_parallel_group())
    return chunks, rows, logits, loss[0]


def _load_offline(cfg, layout, mg_dir, batch):
    """Megatron's own loader on an offline-written torch_dist; logits of this rank's rows of ``batch``."""
    from megatron.core import dist_checkpointing
    from megatron.core import parallel_state as ps

    from dist_worker import data_parallel_rows
    from ernie45.megatron import parallel
    from ernie45.megatron.vl_model import build_vl_model
    from vl_helpers import batch_rows

    parallel.initialize(layout)
    try:
        torch.manual_seed(0)
        chunks = build_vl_model(cfg, layout, sequence_parallel=layout.tp > 1, vision_attn_implementation="eager")
        for chunk in chunks:
            state = dist_checkpointing.load(chunk.sharded_state_dict(), mg_dir)
            chunk.load_state_dict(state, strict=True)
        rows = data_parallel_rows(batch["input_ids"].shape[0])
        chunks[0].eval()
        with torch.no_grad():
            out = _schedule(chunks, batch_rows(batch, rows, cfg), forward_only=True)
        last = ps.is_pipeline_last_stage(ignore_virtual=True)
        return rows, _from_last_stage(out[0] if last else None)[..., : cfg.vocab_size]
    finally:
        parallel.destroy()


# offline torch_dist written by the parent (at TP2·PP2·EP2) -> loaded by dist_checkpointing at two layouts
OFFLINE = {
    "hf-vit": ("hf", {"TP2": dict(tp=2), "EP2": dict(ep=2)}),
    "megatron-vit": ("megatron", {"TP2": dict(tp=2), "TP2xEP2": dict(tp=2, ep=2, etp=1)}),
}


def worker(rank: int, port: int, out_root: str) -> None:
    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(port)
    dist.init_process_group("gloo", rank=rank, world_size=2)
    results = {}
    try:
        from megatron.core import parallel_state as ps

        from ernie45.bridge.live import export_hf, gather_hf
        from ernie45.config import ErnieConfig
        from ernie45.layout import Layout
        from ernie45.megatron import parallel
        from ernie45.megatron.vl_inputs import lm_labels
        from ernie45.testing import build_hf_model, tiny_hf_config
        from vl_helpers import expected_from_hf, make_batch

        raw = tiny_hf_config("vl")
        cfg = ErnieConfig.from_hf(raw)
        hf_model = build_hf_model(raw, seed=0)  # the model the parent saved to hf_dir (same seed)
        hf_dir = Path(out_root) / "hf"
        batch = make_batch(cfg, SAMPLES, seed=4, force_mask=True)
        valid = batch["attention_mask"].bool()
        hf_labels = batch["input_ids"].masked_fill(~valid, -100)
        hf_labels[torch.arange(len(valid)), valid.long().argmax(1)] = -100
        labels = lm_labels(hf_labels, batch["attention_mask"])

        hf_model.zero_grad()
        with torch.no_grad():
            hf_logits = hf_model(**batch).logits
        hf_model(**batch, labels=hf_labels).loss.backward()
        hf_grads = {n: p.grad for n, p in hf_model.named_parameters() if p.grad is not None}

        mg_vit = dataclasses.replace(cfg, vit_impl="megatron")
        refs = {}
        for c in (cfg, mg_vit):
            _, _, ref_logits, ref_loss = _run(c, hf_dir, Layout(), batch, labels, whole_batch=True)
            refs[c.vit_impl] = ref_logits, ref_loss
            parallel.destroy()
        runs = [(n, kw, cfg) for n, kw in LAYOUTS.items()] + [(n, kw, mg_vit) for n, kw in MG_VIT_LAYOUTS.items()]
        for name, kw, run_cfg in runs:
            layout = Layout(**kw)
            ref_logits, ref_loss = refs[run_cfg.vit_impl]
            chunks, rows, logits, loss = _run(run_cfg, hf_dir, layout, batch, labels)
            dp = ps.get_data_parallel_world_size()
            export_hf(chunks, run_cfg, layout, Path(out_root) / f"export-{name}", tied=False, side_files_from=hf_dir)
            worst, n_grads = 0.0, 0
            # Megatron-ViT gradients come back under HF names through the bridge (TP shards gathered)
            own_vit = run_cfg.vit_impl == "megatron"
            vit_grads = gather_hf(chunks, run_cfg, layout, tied=False, getter=lambda t: t.grad) if own_vit else None
            for hf_name, g in (vit_grads or {}).items():
                if hf_name.startswith("model.vision_model."):  # on disk; transformers holds it as vision_tower
                    w = hf_grads["model.vision_tower." + hf_name[len("model.vision_model.") :]]
                    worst = max(worst, ((g - w).abs().max() / w.abs().max().clamp_min(1e-12)).item())
                    n_grads += 1
            for chunk in chunks:
                params = {n: p for n, p in chunk.named_parameters() if p.grad is not None}
                if own_vit:
                    params = {n: p for n, p in params.items() if not n.startswith("vision_model.")}
                want = expected_from_hf(chunk, hf_grads, cfg, sorted(params))
                for n, p in params.items():
                    w = want[n]
                    worst = max(worst, ((p.grad - w).abs().max() / w.abs().max().clamp_min(1e-12)).item())
                    n_grads += 1
            local_valid = valid[rows]
            stats = torch.tensor([
                (logits - ref_logits[rows])[local_valid].abs().max().item(),
                (logits - hf_logits[rows])[local_valid].abs().max().item(),
                abs(loss.item() - ref_loss.item()),
                worst,
            ])  # fmt: skip
            dist.all_reduce(stats, op=dist.ReduceOp.MAX)
            counts = torch.tensor([n_grads])
            dist.all_reduce(counts)
            results[name] = dict(logits=stats[0].item(), logits_vs_hf=stats[1].item(), loss=stats[2].item(),
                                 grads_rel=stats[3].item(), n_grads=int(counts[0]), data_parallel=dp)  # fmt: skip
            parallel.destroy()

        for ckpt_name, (vit_impl, layouts) in OFFLINE.items():
            load_cfg = dataclasses.replace(cfg, vit_impl=vit_impl)
            for name, kw in layouts.items():
                mg_dir = str(Path(out_root) / f"offline-{ckpt_name}")
                rows, logits = _load_offline(load_cfg, Layout(**kw), mg_dir, batch)
                diff = torch.tensor([(logits - hf_logits[rows])[valid[rows]].abs().max().item()])
                dist.all_reduce(diff, op=dist.ReduceOp.MAX)
                results[f"offline-{ckpt_name}-{name}"] = diff.item()
    except Exception:  # report the failure to the parent test through the JSON, then re-raise
        results = {"error": f"rank {rank}:\n{traceback.format_exc()}"}
        if rank == 0:
            Path(out_root, "results.json").write_text(json.dumps(results))
        raise
    if rank == 0:
        Path(out_root, "results.json").write_text(json.dumps(results))
    dist.destroy_process_group()
