"""Body of the 2-process gloo tests (run by ``torch.multiprocessing.spawn`` from ``test_distributed.py``).

Every rank draws the same *union* batch of ``B`` samples. References over the union, on every rank: transformers'
logits, loss and gradients (``ernie45.testing.hf_loss_and_grads``, under on-disk HF names), and the TP1 Megatron
model's. Then for each family and layout every rank feeds **its data-parallel share** of the union (ranks of one
TP / PP group share a batch; the data-parallel ranks -- the two EP ranks under EP2 -- get different samples, so a
token sent back to the wrong EP rank changes the numbers), reduces the gradients as Megatron's DDP does
(:func:`reduce_data_parallel_grads`), gathers them under HF names and compares logits, loss and gradients with the
union references; finally it exports the model back to HF safetensors. Rank 0 writes the numbers as JSON (no
pickles cross the process boundary).
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.distributed as dist

from ernie45.testing import worker_results

LAYOUTS = {
    # name: (Layout kwargs, families)
    "TP2": (dict(tp=2), ("dense", "moe")),
    "EP2": (dict(ep=2), ("moe",)),
    "PP2": (dict(pp=2), ("dense", "moe")),
    "TP2xEP2": (dict(tp=2, ep=2, etp=1), ("moe",)),
    "PP2xVPP2": (dict(pp=2, vpp=2), ("dense",)),
    "PP2-uneven": (dict(pp=2, first=2, last=4), ("moe",)),
}
B, S = 4, 12  # the union batch; under data parallel 2 each rank holds 2 of its samples


def reduce_data_parallel_grads(chunks, *, scale: float) -> None:
    """The gradient reduction of Megatron's DDP for models not wrapped in it: every gradient times ``scale`` (DDP:
    1 / data-parallel size for a per-rank mean loss), then summed over the parameter's data-parallel group -- the
    expert-data-parallel group for expert parameters under EP (``allreduce=False``, whose gradients already hold
    every EP rank's tokens through the dispatcher), the data-parallel group for the others."""
    from megatron.core import parallel_state as ps

    for chunk in chunks:
        for p in chunk.parameters():
            if p.grad is None:
                continue
            p.grad.mul_(scale)
            expert = not getattr(p, "allreduce", True)
            group = ps.get_expert_data_parallel_group() if expert else ps.get_data_parallel_group()
            if dist.get_world_size(group) > 1:
                dist.all_reduce(p.grad, group=group)


def data_parallel_rows(n: int) -> slice:
    """This rank's share of a union batch of ``n`` samples (contiguous, by data-parallel rank)."""
    from megatron.core import parallel_state as ps

    dp, r = ps.get_data_parallel_world_size(), ps.get_data_parallel_rank()
    if n % dp:
        raise ValueError(f"{n} samples do not split over {dp} data-parallel ranks")
    return slice(r * n // dp, (r + 1) * n // dp)


def union_batch(vocab: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(11)
    return torch.randint(0, vocab, (B, S), generator=g), torch.randint(0, vocab, (B, S), generator=g)


def _run(cfg, layout, path, tied, *, sp: bool, whole_batch: bool = False):
    """Logits of this rank's rows, the union loss and the union gradients under HF names (on rank 0).

    ``whole_batch``: every rank runs the whole union on its own (the 1-process reference), nothing is reduced."""
    from megatron.core import parallel_state as ps

    from ernie45.bridge.live import gather_hf, load_hf
    from ernie45.megatron import parallel
    from ernie45.megatron.model import build_model
    from ernie45.megatron.run import forward_backward, forward_logits

    parallel.initialize(layout)
    chunks = build_model(cfg, layout, tie_word_embeddings=tied, sequence_parallel=sp)
    load_hf(chunks, cfg, layout, path)
    ids, labels = union_batch(cfg.vocab_size)
    rows = slice(None) if whole_batch else data_parallel_rows(B)
    logits = forward_logits(chunks, ids[rows], vocab_size=cfg.vocab_size)
    loss = forward_backward(chunks, ids[rows], labels[rows])
    dp = 1 if whole_batch else ps.get_data_parallel_world_size()
    if dp > 1:
        reduce_data_parallel_grads(chunks, scale=1.0 / dp)
    loss_sum = loss.detach().reshape(1).clone()
    if dp > 1:
        dist.all_reduce(loss_sum, group=ps.get_data_parallel_group())
    grads = gather_hf(chunks, cfg, layout, tied=tied, getter=lambda p: p.grad)
    return chunks, rows, logits, loss_sum[0] / dp, grads


def _max_over_ranks(x: float) -> float:
    t = torch.tensor([x])
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.item()


def worker(rank: int, port: int, ckpts: dict, out_root: str) -> None:
    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(port)
    dist.init_process_group("gloo", rank=rank, world_size=2)
    from megatron.core import parallel_state as ps

    from ernie45.bridge.io import HFCheckpoint
    from ernie45.bridge.live import export_hf
    from ernie45.bridge.tables import effective_tie
    from ernie45.config import load_config
    from ernie45.layout import Layout
    from ernie45.megatron import parallel

    with worker_results(rank, out_root) as results:
        from ernie45.reference import load_reference
        from ernie45.testing import grad_differences, hf_loss_and_grads

        for family, path in ckpts.items():
            cfg = load_config(path)
            tied = effective_tie(cfg, HFCheckpoint(path).keys())
            ids, labels = union_batch(cfg.vocab_size)
            hf = load_reference(path)
            with torch.no_grad():
                hf_logits = hf(input_ids=ids).logits
            hf_loss, hf_grads = hf_loss_and_grads(hf, ids, labels)
            _, _, ref_logits, ref_loss, ref_grads = _run(cfg, Layout(), path, tied, sp=False, whole_batch=True)
            parallel.destroy()
            for name, (kw, families) in LAYOUTS.items():
                if family not in families:
                    continue
                layout = Layout(**kw)
                chunks, rows, logits, loss, grads = _run(cfg, layout, path, tied, sp=layout.tp > 1)
                dp = ps.get_data_parallel_world_size()
                export_hf(chunks, cfg, layout, Path(out_root) / f"{family}-{name}", tied=tied, side_files_from=path)
                logit_diff = _max_over_ranks((logits - ref_logits[rows]).abs().max().item())
                hf_logit_diff = _max_over_ranks((logits - hf_logits[rows]).abs().max().item())
                if rank == 0:
                    hf_rel = grad_differences(grads, hf_grads)
                    results[f"{family}-{name}"] = dict(
                        data_parallel=dp,
                        logits=logit_diff,
                        logits_vs_hf=hf_logit_diff,
                        loss=abs(loss.item() - ref_loss.item()),
                        loss_vs_hf=abs(loss.item() - hf_loss.item()),
                        grads=max((grads[n] - ref_grads[n]).abs().max().item() for n in ref_grads),
                        grads_rel_vs_hf=max(hf_rel.values()),
                        worst_vs_hf=max(hf_rel, key=hf_rel.get),
                        grad_names=sorted(grads) == sorted(ref_grads) == sorted(hf_grads),
                        n_grads=len(grads),
                        grad_scale=max(g.abs().max().item() for g in ref_grads.values()),
                    )
                parallel.destroy()


def offline_worker(rank: int, port: int, mg_dir: str, hf_dir: str, ref_file: str, out_root: str) -> None:
    """Load an offline-written torch_dist checkpoint with Megatron's own loader at two layouts; record logits."""
    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(port)
    dist.init_process_group("gloo", rank=rank, world_size=2)
    from megatron.core import dist_checkpointing
    from safetensors.torch import load_file

    from ernie45.config import load_config
    from ernie45.layout import Layout
    from ernie45.megatron import parallel
    from ernie45.megatron.model import build_model
    from ernie45.megatron.run import forward_logits

    ref = load_file(ref_file)
    with worker_results(rank, out_root, "offline.json") as results:
        cfg = load_config(hf_dir)
        for name, kw in {"TP2": dict(tp=2), "EP2": dict(ep=2)}.items():
            layout = Layout(**kw)
            parallel.initialize(layout)
            chunks = build_model(cfg, layout, tie_word_embeddings=cfg.tie_word_embeddings)
            for chunk in chunks:
                state = dist_checkpointing.load(chunk.sharded_state_dict(), mg_dir)
                chunk.load_state_dict(state, strict=True)
            logits = forward_logits(chunks, ref["input_ids"], vocab_size=cfg.vocab_size)
            results[name] = (logits - ref["logits"]).abs().max().item()
            # and Megatron's own writer, from this live layout: the converter must read what training saves
            saved = Path(out_root, f"saved-{name}")
            if rank == 0:
                saved.mkdir()
            dist.barrier()
            dist_checkpointing.save(chunks[0].sharded_state_dict(), str(saved))
            parallel.destroy()


def offline_load_diffs(hf_dir, mg_dir, out_root, *, seed: int) -> dict:
    """Run :func:`offline_worker` on 2 gloo processes: transformers' logits on ``hf_dir`` for a seeded batch, then
    Megatron's own ``dist_checkpointing.load`` of ``mg_dir`` at TP2 and at EP2; returns the worker's results."""
    import json

    import torch.multiprocessing as mp
    from conftest import free_port
    from safetensors.torch import save_file

    from ernie45.reference import load_reference

    ids = torch.randint(0, 160, (2, 12), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        logits = load_reference(hf_dir)(input_ids=ids).logits
    ref = Path(out_root, "ref.safetensors")
    save_file({"input_ids": ids, "logits": logits.contiguous()}, ref)
    mp.spawn(offline_worker, args=(free_port(), str(mg_dir), str(hf_dir), str(ref), str(out_root)), nprocs=2,
             join=True)  # fmt: skip
    return json.loads(Path(out_root, "offline.json").read_text())
