"""ERNIE 4.5's top-k router as a Megatron-Core ``TopKRouter``.

Legend (shape suffixes): ``T`` tokens routed by this router, ``E`` experts in the pool, ``K`` top-k.

ERNIE (HF ``Ernie4_5_MoeTopKRouter``, Baidu's original, spec §C.2)::

    p_TE   = softmax(x @ W^T)               fp32, over this pool's E experts
    idx_TK = topk(p_TE + bias_E, K)         the bias only *chooses* the experts ...
    w_TK   = p_TE[idx_TK]                   ... the weights are the unbiased probabilities,
    w_TK  /= clamp(sum_K w_TK, moe_norm_min)

Megatron-Core 0.16.1 cannot express this: ``moe_router_enable_expert_bias`` is refused with ``softmax``, and its
softmax path ignores ``expert_bias`` entirely. (Megatron-Bridge switches to sigmoid, which changes both the weights
and the chosen experts.) So this subclass keeps everything of ``TopKRouter`` (gating GEMM, z-loss, capacity
dropping, aux losses) and replaces only the top-k step. It is plugged in through the public spec field
``MoESubmodules.router``.

``expert_bias`` is registered with the name, dtype and persistence Megatron uses for its own aux-loss-free bias,
so checkpoints carry it as ``...mlp.router.expert_bias``. It is a static buffer: ERNIE never updates it.
"""

from __future__ import annotations

from typing import Optional

import torch
from megatron.core.transformer.moe.moe_utils import apply_router_token_dropping, compute_routing_scores_for_aux_loss
from megatron.core.transformer.moe.router import TopKRouter

__all__ = ["ErnieTopKRouter", "ernie_topk"]


def ernie_topk(logits_TE: torch.Tensor, bias_E: torch.Tensor, k: int, norm_min: float):
    """ERNIE top-k on router logits. Returns dense ``probs_TE`` (zeros off the top-k) and ``routing_map_TE``."""
    p_TE = torch.softmax(logits_TE.float(), dim=-1)
    _, idx_TK = torch.topk(p_TE + bias_E.float(), k=k, dim=-1)
    w_TK = torch.gather(p_TE, 1, idx_TK)
    w_TK = w_TK / torch.clamp(w_TK.sum(dim=-1, keepdim=True), min=norm_min)
    probs_TE = torch.zeros_like(p_TE).scatter(1, idx_TK, w_TK)
    routing_map_TE = torch.zeros_like(p_TE, dtype=torch.bool).scatter(1, idx_TK, True)
    return probs_TE, routing_map_TE


class ErnieTopKRouter(TopKRouter):
    """Softmax router whose expert bias is used only for selection (ERNIE 4.5)."""

    def __init__(self, config, pg_collection=None) -> None:
        if config.moe_router_score_function != "softmax":
            raise ValueError("ErnieTopKRouter implements ERNIE's softmax routing; set moe_router_score_function='softmax'")
        super().__init__(config=config, pg_collection=pg_collection)
        # the megatron flag stays False (it would be refused with softmax); register the same buffers ourselves
        E = config.num_moe_experts
        del self.expert_bias, self.local_tokens_per_expert  # the parent set both to plain None attributes
        self.register_buffer("expert_bias", torch.zeros(E, dtype=torch.float32, device=torch.cuda.current_device()))
        self.register_buffer(
            "local_tokens_per_expert",
            torch.zeros(E, dtype=torch.float32, device=torch.cuda.current_device()),
            persistent=False,
        )
        self.enable_expert_bias = True  # keeps megatron's token counting (_apply_expert_bias) alive
        self.norm_min = config.ernie_moe_norm_min

    def routing(self, logits: torch.Tensor, padding_mask: Optional[torch.Tensor] = None):
        seq_length, bsz = logits.shape[:2]
        logits_TE = logits.view(-1, self.config.num_moe_experts)
        if padding_mask is not None:
            padding_mask = padding_mask.reshape(-1)
        logits_TE = self.apply_z_loss(logits_TE, padding_mask=padding_mask)

        probs_TE, routing_map_TE = ernie_topk(logits_TE, self.expert_bias, self.topk, self.norm_min)

        if self.config.moe_expert_capacity_factor is not None:
            probs_TE, routing_map_TE = apply_router_token_dropping(
                probs_TE,
                routing_map_TE,
                router_topk=self.topk,
                capacity_factor=self.config.moe_expert_capacity_factor,
                drop_policy=self.config.moe_token_drop_policy,
                pad_to_capacity=self.config.moe_pad_expert_input_to_capacity,
            )

        if self.training and torch.is_grad_enabled() and self.is_aux_loss_enabled():
            # HF's Switch loss uses the plain softmax and an unbiased top-k (spec §C.7) -- exactly megatron's.
            map_aux, scores_aux = compute_routing_scores_for_aux_loss(
                logits_TE, self.topk, "softmax", fused=False, padding_mask=padding_mask
            )
            with_pad = padding_mask is not None
            probs_TE = self._apply_aux_loss(probs_TE, scores_aux, map_aux, with_padding_mask=with_pad)
            probs_TE = self._apply_seq_aux_loss(probs_TE, scores_aux, map_aux, seq_length, bsz, with_padding_mask=with_pad)
            probs_TE = self._apply_global_aux_loss(probs_TE, scores_aux, map_aux, with_padding_mask=with_pad)

        # Megatron 0.16.1's _apply_expert_bias computes `routing_map_TE & ~padding_mask_T`, which does not broadcast;
        # give it the mask as [T, 1] (True = padding, as in apply_z_loss)
        self._apply_expert_bias(routing_map_TE, padding_mask=None if padding_mask is None else padding_mask.unsqueeze(-1))
        return probs_TE, routing_map_TE
