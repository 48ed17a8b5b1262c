"""Running a (distributed) ERNIE Megatron model: forward for logits, forward+backward for a loss (expert choices:
``runtime.capture_routing``).

Pipeline-parallel runs go through Megatron-Core's own schedules (``get_forward_backward_func``); the few
``device="cuda"`` literals in them are rewritten by ``cpu.cpu_mode()`` on a CPU-only machine (S5).

Legend: ``B`` batch, ``S`` sequence, ``V`` vocab, ``E`` experts.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from . import cpu
from .model import causal_mask

__all__ = ["forward_logits", "forward_backward", "finalize_grads"]


def _batch(input_ids_BS, position_ids_BS, padding_mask_BS, labels_BS=None):
    B, S = input_ids_BS.shape
    if position_ids_BS is None:
        position_ids_BS = torch.arange(S).expand(B, S)
    return dict(
        input_ids=input_ids_BS,
        position_ids=position_ids_BS,
        attention_mask=causal_mask(S, padding_mask=padding_mask_BS),
        labels=labels_BS,
    )


def _schedule(chunks, batch, *, forward_only: bool, collect_logits: bool):
    from megatron.core import parallel_state as ps
    from megatron.core import tensor_parallel
    from megatron.core.pipeline_parallel import get_forward_backward_func

    B, S = batch["input_ids"].shape
    # the interleaved (VPP) schedule needs at least PP micro-batches
    n_mb = ps.get_pipeline_model_parallel_world_size() if len(chunks) > 1 else 1
    if B % n_mb:
        raise ValueError(f"batch size {B} must be a multiple of {n_mb} micro-batches for this pipeline layout")
    mbs = B // n_mb
    micro = [
        {k: (v if v is None or (k == "attention_mask" and v.shape[0] == 1) else v[i * mbs : (i + 1) * mbs]) for k, v in batch.items()}
        for i in range(n_mb)
    ]

    def forward_step(data_iterator, model):
        data = next(data_iterator)
        out = model(data["input_ids"], data["position_ids"], data["attention_mask"], labels=data["labels"])

        def loss_func(output, non_loss_data: bool = False):
            if non_loss_data:  # logits [B, S, V/tp] -> full vocab
                return tensor_parallel.gather_from_tensor_model_parallel_region(output)
            loss = output.float().mean()
            # clone: the schedule divides the returned loss in place by the number of micro-batches
            return loss, {"loss": loss.detach().clone()}

        return out, loss_func

    n = len(chunks)
    iters = [iter(micro) for _ in range(n)]
    with cpu.cpu_mode():
        result = get_forward_backward_func()(
            forward_step_func=forward_step,
            data_iterator=iters if n > 1 else iters[0],
            model=chunks if n > 1 else chunks[0],
            num_microbatches=n_mb,
            seq_length=S,
            micro_batch_size=mbs,
            forward_only=forward_only,
            collect_non_loss_data=collect_logits,
        )
    return result


def _broadcast_from_last_stage(t: torch.Tensor | None) -> torch.Tensor:
    """Share a tensor computed on the last pipeline stage with every rank of the pipeline group."""
    from megatron.core import parallel_state as ps

    group = ps.get_pipeline_model_parallel_group()
    src = ps.get_pipeline_model_parallel_last_rank()
    meta = [None if t is None else (tuple(t.shape), t.dtype)]
    dist.broadcast_object_list(meta, src=src, group=group)
    shape, dtype = meta[0]
    buf = t.contiguous() if t is not None else torch.empty(shape, dtype=dtype)
    dist.broadcast(buf, src=src, group=group)
    return buf


def forward_logits(chunks, input_ids_BS, *, position_ids_BS=None, padding_mask_BS=None, vocab_size=None):
    """Full-vocab logits ``[B, S, V]`` on every rank (eval mode, no grad)."""
    for c in chunks:
        c.eval()
    with torch.no_grad():
        out = _schedule(chunks, _batch(input_ids_BS, position_ids_BS, padding_mask_BS), forward_only=True, collect_logits=True)
    from megatron.core import parallel_state as ps

    logits_BSV = torch.cat(out, dim=0) if ps.is_pipeline_last_stage(ignore_virtual=True) else None
    logits_BSV = _broadcast_from_last_stage(logits_BSV)
    return logits_BSV[..., :vocab_size] if vocab_size else logits_BSV


def forward_backward(chunks, input_ids_BS, labels_BS, *, position_ids_BS=None, padding_mask_BS=None) -> torch.Tensor:
    """One forward+backward of the mean token loss; grads land in ``param.grad``. Returns the loss on every rank."""
    for c in chunks:
        c.train()
        c.zero_grad(set_to_none=True)
    batch = _batch(input_ids_BS, position_ids_BS, padding_mask_BS, labels_BS)
    out = _schedule(chunks, batch, forward_only=False, collect_logits=False)
    from megatron.core import parallel_state as ps

    # equal-sized micro-batches: the mean of their mean losses is the batch mean (Megatron scales grads likewise)
    last = ps.is_pipeline_last_stage(ignore_virtual=True)
    loss = torch.stack([o["loss"] for o in out]).mean().reshape(1) if last else None
    finalize_grads(chunks)
    return _broadcast_from_last_stage(loss)[0]


def finalize_grads(chunks) -> None:
    """The gradient reductions Megatron's ``finalize_model_grads`` does, for models not wrapped in its DDP.

    * TP-replicated parameters under sequence parallelism hold partial grads: sum them over TP.
    * A tied head with PP > 1 lives twice (embedding on the first stage, a copy on the last): sum their grads over
      the embedding group so both copies see the full gradient.
    """
    from megatron.core import parallel_state as ps

    if ps.get_tensor_model_parallel_world_size() > 1:
        for c in chunks:
            for p in c.parameters():
                if getattr(p, "sequence_parallel", False) and p.grad is not None:
                    dist.all_reduce(p.grad, group=ps.get_tensor_model_parallel_group())
    if ps.get_pipeline_model_parallel_world_size() > 1 and chunks[0].share_embeddings_and_output_weights:
        if ps.is_rank_in_embedding_group():
            chunk = chunks[0] if ps.is_pipeline_first_stage(ignore_virtual=True) else chunks[-1]
            weight = chunk.shared_embedding_or_output_weight()
            if weight.grad is not None:
                dist.all_reduce(weight.grad, group=ps.get_embedding_group())

