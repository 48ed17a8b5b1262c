"""ERNIE 4.5 VL dual-pool MoE block (HF ``Ernie4_5_VLMoeMoeBlock``, reference §C.6) as a Megatron-Core module.

Legend (shape suffixes): ``S`` local sequence (a sequence-parallel chunk under SP), ``B`` batch, ``D`` hidden,
``T`` local tokens ``S·B`` flattened in Megatron's ``[S, B]`` order, ``N`` tokens handed to one pool (after padding
to the group maximum), ``E`` experts per pool.

Each VL MoE layer holds two *independent* routed pools and one shared MLP::

    text_moe_layer    Megatron MoELayer: ErnieTopKRouter over E experts of width I_t  (text tokens)
    vision_moe_layer  Megatron MoELayer: ErnieTopKRouter over E experts of width I_v  (image/video tokens)
    shared_experts    SharedExpertMLP of width n_shared · I_t, no gate               (every token)

``out = scatter(text_pool(x[text]) , vision_pool(x[vision])) + shared(x)``. A token's pool comes from the
*MoE* token types (``moe_mm_token_type_ids``: 0 text, 1 image, 2 video -- image/video start/end tokens count as
vision here, unlike in the RoPE types). Each pool softmaxes over its own E experts with its own selection bias.

How the token types reach this module (no globals)
---------------------------------------------------
Megatron 0.16.1 threads one per-token tensor from ``GPTModel.forward(padding_mask=...)`` through
``TransformerBlock`` and ``TransformerLayer`` into ``mlp(hidden, padding_mask=...)`` (also through activation
recompute). The VL model uses exactly that channel to carry the **MoE token types** ``[B, S]`` as an *integer*
tensor: ``0`` text, ``> 0`` vision, ``-1`` padding (routed with the text pool, as HF routes padding). Dense layers'
``MLP`` ignores it. A boolean tensor is refused, so a plain Megatron padding mask cannot be mistaken for token types.

Padding and dummy rows are *not* handed to the pools as a Megatron padding mask yet: Megatron 0.16.1's
``TopKRouter._apply_expert_bias`` broadcasts ``routing_map [T, E] & ~padding_mask [T]`` and fails whenever the
expert-bias path is on (ErnieTopKRouter turns it on). They only enter the routers' token counts (the expert-load
statistics and the aux-loss-free bias update); outputs are unaffected. (The VL model has no aux loss: transformers'
mixes both pools' router logits into one statistic, which per-pool routers cannot reproduce.)

Collectives
-----------
Megatron's all-gather dispatcher gathers equally sized token sets over the expert-TP × EP group. The split into
pools makes the per-rank counts differ (different data per EP rank, different sequence chunks per TP rank under SP),
so each pool's rows are padded with zero dummy rows to the group maximum, found by one
``all_reduce(MAX)`` of the two counts per layer. A pool that is empty on *every* rank is skipped on every rank; a
pool empty only locally still runs its dummy rows, so the collectives line up (reference §I.1). This all-reduce is the
only collective this module adds -- the split itself is the one thing Megatron cannot do for us.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist
from megatron.core.process_groups_config import ProcessGroupCollection
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.moe.moe_utils import get_default_pg_collection
from megatron.core.transformer.spec_utils import ModuleSpec, build_module
from megatron.core.transformer.transformer_config import TransformerConfig

__all__ = ["ErnieVLMoESubmodules", "ErnieVLMoE", "PAD_TOKEN_TYPE"]

# MoE token type of padding positions (see the module docstring)
PAD_TOKEN_TYPE = -1


@dataclass
class ErnieVLMoESubmodules:
    """Specs of the two routed pools (Megatron ``MoELayer`` specs without shared experts) and the shared MLP."""

    text_moe_layer: ModuleSpec
    vision_moe_layer: ModuleSpec
    shared_experts: Optional[ModuleSpec] = None


class ErnieVLMoE(MegatronModule):
    """Text pool + vision pool + shared experts; the token types arrive through ``padding_mask`` (module docstring)."""

    def __init__(
        self,
        config: TransformerConfig,
        submodules: ErnieVLMoESubmodules,
        ffn_hidden_sizes: tuple[int, int],
        layer_number: Optional[int] = None,
        pg_collection: Optional[ProcessGroupCollection] = None,
    ) -> None:
        super().__init__(config=config)
        # TransformerLayer only hands pg_collection to modules it knows; fall back the way MoELayer does
        pg_collection = get_default_pg_collection() if pg_collection is None else pg_collection
        self.tp_group = pg_collection.tp
        self.tp_ep_group = pg_collection.tp_ep
        self.layer_number = layer_number

        # each pool is a stock MoELayer built from its own copy of the config: its own expert width, and no
        # per-pool shared experts (the shared MLP sits here, once, on all tokens)
        pools = {}
        for name, spec, width in (
            ("text", submodules.text_moe_layer, ffn_hidden_sizes[0]),
            ("vision", submodules.vision_moe_layer, ffn_hidden_sizes[1]),
        ):
            pool_config = copy.copy(config)
            pool_config.moe_ffn_hidden_size = width
            pool_config.moe_shared_expert_intermediate_size = None
            pools[name] = build_module(spec, config=pool_config, layer_number=layer_number, pg_collection=pg_collection)
        self.text_moe_layer = pools["text"]
        self.vision_moe_layer = pools["vision"]

        self.shared_experts = None
        if submodules.shared_experts is not None:
            if config.moe_shared_expert_intermediate_size is None:
                raise ValueError("a shared-experts spec needs config.moe_shared_expert_intermediate_size")
            self.shared_experts = build_module(
                submodules.shared_experts, config=config, pg_collection=pg_collection, gate=False
            )

    def set_layer_number(self, layer_number: int) -> None:
        self.layer_number = layer_number
        self.text_moe_layer.set_layer_number(layer_number)
        self.vision_moe_layer.set_layer_number(layer_number)

    # --------------------------------------------------------------------------------------------------------------
    def _local_token_types(self, token_types_BS: Optional[torch.Tensor], S: int, B: int, device) -> torch.Tensor:
        """The types of this rank's tokens as ``[S, B]`` (slices the full sequence under sequence parallelism)."""
        if token_types_BS is None:  # no types given: everything is text (HF does the same)
            return torch.zeros(S, B, dtype=torch.long, device=device)
        if token_types_BS.dtype == torch.bool or token_types_BS.is_floating_point():
            raise TypeError(
                "the ERNIE VL model carries integer MoE token types in Megatron's padding_mask channel "
                f"(0 text, >0 vision, -1 padding); got dtype {token_types_BS.dtype}"
            )
        if token_types_BS.shape[0] != B:
            raise ValueError(f"token types {tuple(token_types_BS.shape)} do not match batch {B}")
        full = token_types_BS.shape[1]
        tp = self.tp_group.size()
        if full != S:
            # the VL model hands over the full sequence; under SP this rank holds chunk tp_rank of it
            if not (self.config.sequence_parallel and full == S * tp):
                raise ValueError(f"token types cover {full} positions, this rank holds {S} (tp={tp})")
            rank = self.tp_group.rank()
            token_types_BS = token_types_BS[:, rank * S : (rank + 1) * S]
        return token_types_BS.t().to(device)

    def _group_max(self, counts: list[int], device) -> list[int]:
        """Per-pool token counts maxed over the expert-TP × EP group (the all-gather dispatcher's group)."""
        if self.tp_ep_group.size() == 1:
            return counts
        t = torch.tensor(counts, dtype=torch.long, device=device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=self.tp_ep_group)
        return t.tolist()

    def forward(self, hidden_states: torch.Tensor, padding_mask: Optional[torch.Tensor] = None):
        """``hidden_states`` ``[S, B, D]``; ``padding_mask`` = MoE token types ``[B, S_full]`` (see module doc)."""
        S, B, D = hidden_states.shape
        types_T = self._local_token_types(padding_mask, S, B, hidden_states.device).reshape(-1)
        vision_T = types_T > 0  # text pool: 0 and PAD_TOKEN_TYPE
        x_TD = hidden_states.reshape(S * B, D)

        rows = [(~vision_T).nonzero().squeeze(1), vision_T.nonzero().squeeze(1)]
        n_max = self._group_max([int(r.numel()) for r in rows], hidden_states.device)

        out_TD = torch.zeros_like(x_TD)
        for pool, rows_N, n_pool in zip((self.text_moe_layer, self.vision_moe_layer), rows, n_max):
            if n_pool == 0:  # empty on every rank of the group: nobody enters the dispatcher's collectives
                continue
            n = rows_N.numel()
            x_ND = x_TD.index_select(0, rows_N)
            if n < n_pool:  # dummy rows so every rank gathers the same count; their outputs are dropped
                x_ND = torch.cat([x_ND, x_ND.new_zeros(n_pool - n, D)])
            # MoELayer wants [S, B, D]: give it the pool's rows as a length-N sequence of batch 1
            y_N1D, _ = pool(x_ND.unsqueeze(1))
            out_TD = out_TD.index_copy(0, rows_N, y_N1D[:n, 0])

        out_SBD = out_TD.view(S, B, D)
        if self.shared_experts is not None:
            out_SBD = out_SBD + self.shared_experts(hidden_states)
        return out_SBD, None
