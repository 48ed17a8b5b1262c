"""Body of the 2-process gloo tests (run by ``torch.multiprocessing.spawn`` from ``test_distributed.py``).

For each family and layout every rank: builds the TP1 reference (data parallel 2), records logits, loss and
gradients; rebuilds at the layout, loads the same HF checkpoint through the bridge, records the same, and exports
the model back to HF safetensors. Rank 0 writes the numbers as JSON (no pickles cross the process boundary).
"""

from __future__ import annotations

import json
import os
import sys
import traceback
from pathlib import Path

import torch
import torch.distributed as dist

LAYOUTS = {
    # name: (Layout kwargs, families)
    "TP2": (dict(tp=2), ("dense", "moe")),
    "EP2": (dict(ep=2), ("moe",)),
    "PP2": (dict(pp=2), ("dense", "moe")),
    "TP2xEP2": (dict(tp=2, ep=2, etp=1), ("moe",)),
    "PP2xVPP2": (dict(pp=2, vpp=2), ("dense",)),
    "PP2-uneven": (dict(pp=2, first=2, last=4), ("moe",)),
}
B, S = 2, 12


def _run(cfg, layout, path, tied, *, sp: bool):
    from ernie45.bridge.live import gather_hf, load_hf
    from ernie45.megatron import parallel
    from ernie45.megatron.model import build_model
    from ernie45.megatron.run import forward_backward, forward_logits

    parallel.initialize(layout)
    chunks = build_model(cfg, layout, tie_word_embeddings=tied, sequence_parallel=sp)
    load_hf(chunks, cfg, layout, path)
    g = torch.Generator().manual_seed(11)
    ids = torch.randint(0, cfg.vocab_size, (B, S), generator=g)
    labels = torch.randint(0, cfg.vocab_size, (B, S), generator=g)
    logits = forward_logits(chunks, ids, vocab_size=cfg.vocab_size)
    loss = forward_backward(chunks, ids, labels)
    grads = gather_hf(chunks, cfg, layout, tied=tied, getter=lambda p: p.grad)
    return chunks, logits, loss, grads


def worker(rank: int, port: int, ckpts: dict, out_root: str) -> None:
    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(port)
    dist.init_process_group("gloo", rank=rank, world_size=2)
    from megatron.core import parallel_state as ps

    from ernie45.bridge.io import HFCheckpoint
    from ernie45.bridge.live import export_hf
    from ernie45.bridge.tables import Split, effective_tie, expand
    from ernie45.config import load_config
    from ernie45.megatron import parallel
    from ernie45.megatron.parallel import Layout

    results = {}
    try:
        for family, path in ckpts.items():
            cfg = load_config(path)
            tied = effective_tie(cfg, HFCheckpoint(path).keys())
            expert_names = {n for it in expand(cfg, tied=tied) if it.split.is_expert for n in it.hf}
            _, ref_logits, ref_loss, ref_grads = _run(cfg, Layout(), path, tied, sp=False)
            parallel.destroy()
            for name, (kw, families) in LAYOUTS.items():
                if family not in families:
                    continue
                layout = Layout(**kw)
                chunks, logits, loss, grads = _run(cfg, layout, path, tied, sp=layout.tp > 1)
                # both ranks feed the same batch; under EP the dispatcher hands an expert the tokens of every
                # data-parallel replica inside its expert group, so its gradient is that many times the reference
                factor = min(ps.get_data_parallel_world_size(), layout.ep)
                export_hf(chunks, cfg, layout, Path(out_root) / f"{family}-{name}", tied=tied, side_files_from=path)
                if rank == 0:
                    gdiff = max(
                        (grads[n] - ref_grads[n] * (factor if n in expert_names else 1)).abs().max().item()
                        for n in ref_grads
                    )
                    results[f"{family}-{name}"] = dict(
                        logits=(logits - ref_logits).abs().max().item(),
                        loss=abs(loss.item() - ref_loss.item()),
                        grads=gdiff,
                        grad_names=sorted(grads) == sorted(ref_grads),
                        n_grads=len(grads),
                        grad_scale=max(g.abs().max().item() for g in ref_grads.values()),
                    )
                parallel.destroy()
    except Exception:
        results["error"] = f"rank {rank}:\n{traceback.format_exc()}"
        print(results["error"], file=sys.stderr, flush=True)
        if rank == 0:
            Path(out_root, "results.json").write_text(json.dumps(results, indent=2))
        os._exit(1)  # the peer may be blocked in a collective; do not hang the test
    if rank == 0:
        Path(out_root, "results.json").write_text(json.dumps(results, indent=2))
    dist.barrier()
    dist.destroy_process_group()


def offline_worker(rank: int, port: int, mg_dir: str, hf_dir: str, ref_file: str, out_root: str) -> None:
    """Load an offline-written torch_dist checkpoint with Megatron's own loader at two layouts; record logits."""
    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(port)
    dist.init_process_group("gloo", rank=rank, world_size=2)
    from megatron.core import dist_checkpointing
    from safetensors.torch import load_file

    from ernie45.config import load_config
    from ernie45.megatron import parallel
    from ernie45.megatron.model import build_model
    from ernie45.megatron.run import forward_logits
    from ernie45.megatron.parallel import Layout

    ref = load_file(ref_file)
    results = {}
    try:
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
    except Exception:
        results["error"] = f"rank {rank}:\n{traceback.format_exc()}"
        print(results["error"], file=sys.stderr, flush=True)
        if rank == 0:
            Path(out_root, "offline.json").write_text(json.dumps(results))
        os._exit(1)
    if rank == 0:
        Path(out_root, "offline.json").write_text(json.dumps(results))
    dist.barrier()
    dist.destroy_process_group()
