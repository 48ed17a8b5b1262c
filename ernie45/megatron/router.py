"""ERNIE 4.5's top-k router as a Megatron-Core ``TopKRouter``.

Legend (shape suffixes): ``T`` tokens routed by this router, ``E`` experts in the pool, ``K`` top-k,
``B`` rows, ``S`` sequence (Megatron routes tokens in ``[S, B]`` order).

ERNIE (HF ``Ernie4_5_MoeTopKRouter``, Baidu's original, reference §C.2)::

    p_TE   = softmax(x @ W^T)               fp32, over this pool's E experts
    idx_TK = topk(p_TE + bias_E, K)         the bias only *chooses* the experts ...
    w_TK   = p_TE[idx_TK]                   ... the weights are the unbiased probabilities,
    w_TK  /= clamp(sum_K w_TK, moe_norm_min)

Megatron-Core 0.16.1 cannot express this: ``moe_router_enable_expert_bias`` is refused with ``softmax``, and its
softmax path ignores ``expert_bias`` entirely. (Megatron-Bridge switches to sigmoid, which changes both the weights
and the chosen experts.) So this subclass keeps everything of ``TopKRouter`` (gating GEMM, z-loss, capacity
dropping) and replaces only the top-k step. It is plugged in through the public spec field
``MoESubmodules.router``.

``expert_bias`` is registered with the name, dtype and persistence Megatron uses for its own aux-loss-free bias,
so checkpoints carry it as ``...mlp.router.expert_bias``. It is a static buffer: ERNIE never updates it.

The auxiliary load-balancing loss is transformers' (``load_balancing_loss_func`` of ``Ernie4_5_MoeForCausalLM``),
not Megatron's per-layer switch loss: it pools every MoE layer of one forward. With ``R`` = MoE layers × (real)
tokens, ``C_e`` = how often expert ``e`` is in the *unbiased* top-k of ``softmax(logits)`` over all layers and tokens,
``S_e`` = the summed softmax probabilities of ``e`` over all layers and tokens::

    aux = E · sum_e (C_e / R) · (S_e / R)        d aux / d p[l, t, e] = E · C_e / R²

The counts are not differentiable, so the gradient on every layer's probabilities is the same vector, known only
once the whole forward has run. :class:`PooledAuxLoss` (one per model chunk, shared by its routers, reset by a
forward pre-hook) collects ``C_e`` and ``R``; each router threads its probabilities through
:class:`_PooledAuxGrad`, an identity whose backward adds ``coef · scale · E · C_e / R²`` -- read from the collector
at backward time, when every layer has reported -- to the gradient of that layer's ``S_e``. Counts are stored per
layer (overwritten, not added), so a recomputed layer (activation checkpointing) reports the same numbers again.
"""

from __future__ import annotations

from typing import Optional

import torch
from megatron.core.transformer.moe.moe_utils import apply_router_token_dropping
from megatron.core.transformer.moe.router import TopKRouter

__all__ = ["ErnieTopKRouter", "PooledAuxLoss", "attach_pooled_aux_loss", "ernie_topk"]


def ernie_topk(logits_TE: torch.Tensor, bias_E: torch.Tensor, k: int, norm_min: float):
    """ERNIE top-k on router logits. Returns dense ``probs_TE`` (zeros off the top-k) and ``routing_map_TE``."""
    p_TE = torch.softmax(logits_TE.float(), dim=-1)
    _, idx_TK = torch.topk(p_TE + bias_E.float(), k=k, dim=-1)
    w_TK = torch.gather(p_TE, 1, idx_TK)
    w_TK = w_TK / torch.clamp(w_TK.sum(dim=-1, keepdim=True), min=norm_min)
    probs_TE = torch.zeros_like(p_TE).scatter(1, idx_TK, w_TK)
    routing_map_TE = torch.zeros_like(p_TE, dtype=torch.bool).scatter(1, idx_TK, True)
    return probs_TE, routing_map_TE


class PooledAuxLoss:
    """transformers' ERNIE 4.5 MoE auxiliary loss over every MoE layer of one forward of one model chunk.

    ``coef`` multiplies the loss (``router_aux_loss_coef``); ``scale`` (1 unless the caller sets it after the
    forward, before the backward) multiplies its gradient -- the trainer sets it to the micro-batch's loss-token
    count, see ``ernie45.train.trainer``. ``real_T`` (optional, set before a forward by :meth:`set_real_tokens`)
    weights each routed token like transformers' ``attention_mask``: padding neither counts nor has probability.
    """

    def __init__(self, coef: float, num_experts: int, topk: int) -> None:
        self.coef, self.num_experts, self.topk = float(coef), num_experts, topk
        self.real_T: Optional[torch.Tensor] = None
        self.reset()

    def reset(self, *_hook_args) -> None:
        """Forget the last forward (a forward pre-hook of the chunk); the token weights stay for this forward."""
        self.counts: dict[int, torch.Tensor] = {}  # MoE layer -> C_E of that layer (mask-weighted)
        self.rows: dict[int, torch.Tensor] = {}  # MoE layer -> its (mask-weighted) token count
        self.prob_sums: dict[int, torch.Tensor] = {}  # MoE layer -> S_E of that layer, detached (for the value)
        self.scale = 1.0

    def set_real_tokens(self, real_BS: Optional[torch.Tensor]) -> None:
        """``real_BS`` [B, S] (True = a real token, False = padding) for the next forward; None: every token."""
        self.real_T = None if real_BS is None else real_BS.t().reshape(-1).float()

    def record(self, layer: int, logits_TE: torch.Tensor) -> torch.Tensor:
        """Store this layer's unbiased top-k counts; return its differentiable probability sums ``S_E``."""
        p_TE = torch.softmax(logits_TE.float(), dim=-1)
        w_T = torch.ones(p_TE.shape[0], device=p_TE.device) if self.real_T is None else self.real_T.to(p_TE.device)
        if w_T.shape[0] != p_TE.shape[0]:
            raise ValueError(f"PooledAuxLoss: {w_T.shape[0]} token weights for {p_TE.shape[0]} routed tokens")
        _, idx_TK = torch.topk(p_TE.detach(), k=self.topk, dim=-1)
        w_TK = w_T.unsqueeze(-1).expand_as(idx_TK)
        c_E = torch.zeros(self.num_experts, device=p_TE.device)
        self.counts[layer] = c_E.scatter_add_(0, idx_TK.reshape(-1), w_TK.reshape(-1))
        self.rows[layer] = w_T.sum()
        s_E = (p_TE * w_T.unsqueeze(-1)).sum(dim=0)
        self.prob_sums[layer] = s_E.detach()
        return s_E

    def _pooled(self):
        C_E = torch.stack(list(self.counts.values())).sum(0)
        R = torch.stack(list(self.rows.values())).sum()
        return C_E, R

    def grad_of_prob_sums(self) -> torch.Tensor:
        """``coef · scale · E · C_E / R²``: the gradient of ``coef · scale · aux`` w.r.t. any layer's ``S_E``."""
        C_E, R = self._pooled()
        return self.coef * self.scale * self.num_experts * (C_E / R) / R

    def value(self) -> torch.Tensor:
        """``aux`` (without ``coef``) of the last forward, as transformers computes it."""
        C_E, R = self._pooled()
        S_E = torch.stack(list(self.prob_sums.values())).sum(0)
        return self.num_experts * ((C_E / R) * (S_E / R)).sum()


class _PooledAuxGrad(torch.autograd.Function):
    """Identity on ``probs_TE``; its backward gives ``s_E`` (this layer's probability sums) the pooled aux gradient."""

    @staticmethod
    def forward(ctx, probs_TE, s_E, collector):
        ctx.collector = collector
        return probs_TE

    @staticmethod
    def backward(ctx, grad_probs_TE):
        grad_E = ctx.collector.grad_of_prob_sums()
        return grad_probs_TE, grad_E.to(grad_probs_TE.device), None


def attach_pooled_aux_loss(chunk: torch.nn.Module, coef: float, num_experts: int, topk: int) -> PooledAuxLoss:
    """One :class:`PooledAuxLoss` for ``chunk``: shared by its routers, reset at the start of each forward."""
    collector = PooledAuxLoss(coef, num_experts, topk)
    for m in chunk.modules():
        if isinstance(m, ErnieTopKRouter):
            m.pooled_aux = collector
    chunk.register_forward_pre_hook(collector.reset)
    chunk.pooled_aux = collector
    return collector


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
        self.pooled_aux: Optional[PooledAuxLoss] = None  # set by attach_pooled_aux_loss when the aux loss is on

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

        if self.pooled_aux is not None and self.training:
            # counted in the no-grad first pass of a checkpointed layer too (its recompute overwrites the same numbers)
            s_E = self.pooled_aux.record(self.layer_number, logits_TE)
            if torch.is_grad_enabled():
                probs_TE = _PooledAuxGrad.apply(probs_TE, s_E, self.pooled_aux)

        # Megatron 0.16.1's _apply_expert_bias computes `routing_map_TE & ~padding_mask_T`, which does not broadcast;
        # give it the mask as [T, 1] (True = padding, as in apply_z_loss)
        self._apply_expert_bias(routing_map_TE, padding_mask=None if padding_mask is None else padding_mask.unsqueeze(-1))
        return probs_TE, routing_map_TE
