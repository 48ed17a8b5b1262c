"""Body of the 2-process sequence-parallel / activation-recompute test (spawned once by ``test_sp_recompute.py``).

For every model -- dense, text MoE, VL (padded batch with images and a video), and VL with a *packed* row -- each
rank builds the TP1 reference (each rank alone, no recompute), runs one forward+backward through Megatron's
schedule and gathers the gradients under HF names (``gather_hf``); for the text models also transformers' gradients
on the same batch (``ernie45.testing.hf_loss_and_grads``). The two TP2 ranks share their batch: at TP2 on 2
processes there is no data-parallel dimension (the EP / DP split is tested by ``dist_worker.py`` and
``vl_dist_worker.py``). It then rebuilds the model at TP2 with sequence
parallelism, without recompute and with selective / full recompute, loads the same checkpoint, and records the
worst loss and gradient differences against the reference.

Every attention call is counted: activation recompute runs the attention forward again during backward, so the
count doubles exactly when recompute is really on (a check that the ``recompute`` flag reached Megatron).
Rank 0 writes the numbers as JSON.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from ernie45.testing import worker_results

# name: (sequence_parallel, recompute); TP2 throughout
CASES = {
    "TP2-SP": (True, None),
    "TP2-SP-selective": (True, "selective"),
    "TP2-SP-full": (True, "full"),
}
# the packed VL row re-checks packing under SP with the most demanding case only (keeps the spawn short)
FAMILIES = {"dense": tuple(CASES), "moe": tuple(CASES), "vl": tuple(CASES), "vl-packed": ("TP2-SP-full",)}
B, S = 2, 12  # text batch; S divisible by TP for sequence parallelism
VL_SAMPLES = [
    [("text", 2), ("image", (1, 4, 6)), ("text", 2), ("video", (4, 4, 4)), ("text", 6)],
    [("text", 3), ("image", (1, 8, 4)), ("text", 5)],
]


def _schedule(chunk, data, fwd, loss_fn):
    """One micro-batch forward+backward through Megatron's schedule; returns the loss (PP = 1 here)."""
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from ernie45.megatron import cpu

    def forward_step(data_iterator, model):
        out = fwd(model, next(data_iterator))

        def loss_func(output):
            loss = loss_fn(output)
            return loss, {"loss": loss.detach().clone()}

        return out, loss_func

    with cpu.cpu_mode():
        out = get_forward_backward_func()(
            forward_step_func=forward_step,
            data_iterator=iter([data]),
            model=chunk,
            num_microbatches=1,
            seq_length=data["S"],
            micro_batch_size=1,
            forward_only=False,
        )
    return out[0]["loss"]


def _inputs(family, cfg):
    """(data, None) for text models; (data, (forward(chunk, data) -> per-token loss, loss reduction)) for VL."""
    from vl_helpers import make_batch

    from ernie45.megatron.packing import forward_packed, pack
    from ernie45.megatron.vl_inputs import lm_labels, masked_token_mean

    if family in ("dense", "moe"):
        g = torch.Generator().manual_seed(11)
        ids = torch.randint(0, cfg.vocab_size, (B, S), generator=g)
        labels = torch.randint(0, cfg.vocab_size, (B, S), generator=g)
        return dict(ids=ids, labels=labels, S=S), None
    if family == "vl":
        batch = make_batch(cfg, VL_SAMPLES, seed=4, force_mask=True)
        valid = batch["attention_mask"].bool()
        hf_labels = batch["input_ids"].masked_fill(~valid, -100)
        labels, loss_mask = lm_labels(hf_labels, batch["attention_mask"])

        def fwd(chunk, data):
            return chunk(**data["batch"], labels=data["labels"])

        def loss(out):
            return masked_token_mean(out, loss_mask)

        return dict(batch=batch, labels=labels, S=batch["input_ids"].shape[1]), (fwd, loss)
    # vl-packed: the two samples (and a text-only one) packed into one row, padded for SP
    samples = [make_batch(cfg, [s], seed=5 + i) for i, s in enumerate(VL_SAMPLES + [[("text", 7)]])]
    packed = pack(samples, cfg, pad_to_multiple_of=2)

    def fwd(chunk, data):
        return forward_packed(chunk, data["packed"], cfg, with_loss=True)

    return dict(packed=packed, S=packed.seq_len), (fwd, packed.mean_loss)


def _count_attention(chunks):
    from megatron.core.transformer.dot_product_attention import DotProductAttention

    calls = [0]

    def hook(*_):
        calls[0] += 1

    handles = [m.register_forward_hook(hook) for c in chunks for m in c.modules() if isinstance(m, DotProductAttention)]
    return calls, handles


def _run(cfg, hf_dir, layout, data, vl_fns, *, sp, recompute):
    from ernie45.bridge.live import gather_hf, load_hf
    from ernie45.megatron import parallel
    from ernie45.megatron.model import build_model
    from ernie45.megatron.run import finalize_grads, forward_backward
    from ernie45.megatron.vl_model import build_vl_model

    parallel.initialize(layout)
    torch.manual_seed(0)
    if cfg.family == "vl":
        chunks = build_vl_model(
            cfg, layout, sequence_parallel=sp, recompute=recompute, vision_attn_implementation="eager"
        )
    else:
        chunks = build_model(cfg, layout, sequence_parallel=sp, recompute=recompute)
    load_hf(chunks, cfg, layout, hf_dir)
    calls, handles = _count_attention(chunks)
    if cfg.family == "vl":
        fwd, loss_fn = vl_fns
        chunk = chunks[0].train()
        chunk.zero_grad(set_to_none=True)
        loss = _schedule(chunk, data, fwd, loss_fn).reshape(())
        finalize_grads(chunks)  # sums the partial grads of sequence-parallel (TP-replicated) parameters
    else:
        loss = forward_backward(chunks, data["ids"], data["labels"])
    for h in handles:
        h.remove()
    grads = gather_hf(chunks, cfg, layout, tied=cfg.tie_word_embeddings, getter=lambda p: p.grad)
    return loss, grads, calls[0] / cfg.num_hidden_layers


def worker(rank: int, port: int, hf_dirs: dict, out_root: str) -> None:
    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(port)
    sys.path.insert(0, str(Path(__file__).parent))
    # Megatron wraps a few MoE helpers in torch.compile (jit_fuser; e.g. the router's token counting). Compiling
    # them costs seconds per fresh process on 2 cores and changes no number, so these workers run them eagerly.
    torch._dynamo.config.disable = True
    dist.init_process_group("gloo", rank=rank, world_size=2)
    with worker_results(rank, out_root) as results:
        from ernie45.config import load_config
        from ernie45.layout import Layout
        from ernie45.megatron import parallel
        from ernie45.reference import load_reference
        from ernie45.testing import grad_differences, hf_loss_and_grads

        for family, cases in FAMILIES.items():
            hf_dir = hf_dirs[family.split("-")[0]]
            cfg = load_config(hf_dir)
            data, vl_fns = _inputs(family, cfg)
            ref_loss, ref_grads, ref_calls = _run(cfg, hf_dir, Layout(), data, vl_fns, sp=False, recompute=None)
            parallel.destroy()
            # text models: also transformers' own backward on the same batch (VL: test_vl_model's 2-process test)
            hf_grads = None
            if vl_fns is None:
                hf_grads = hf_loss_and_grads(load_reference(hf_dir), data["ids"], data["labels"])[1]
            for name in cases:
                sp, recompute = CASES[name]
                loss, grads, calls = _run(cfg, hf_dir, Layout(tp=2), data, vl_fns, sp=sp, recompute=recompute)
                parallel.destroy()
                if rank != 0:
                    continue
                results[f"{family}/{name}"] = dict(
                    loss=abs(loss.item() - ref_loss.item()),
                    ref_loss=ref_loss.item(),
                    grads=max((grads[n] - ref_grads[n]).abs().max().item() for n in ref_grads),
                    grad_scale=max(g.abs().max().item() for g in ref_grads.values()),
                    grads_rel_vs_hf=None if hf_grads is None else max(grad_differences(grads, hf_grads).values()),
                    same_grad_names=sorted(grads) == sorted(ref_grads),
                    n_grads=len(grads),
                    attention_calls_per_layer=calls,
                    ref_attention_calls_per_layer=ref_calls,
                )
