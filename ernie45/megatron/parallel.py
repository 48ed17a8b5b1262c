"""Parallel layouts: the sizes a user picks, validated against a model, and Megatron's process groups for them.

A :class:`Layout` is plain data (no process group needed), so the offline converter can plan any layout on one CPU
process. Which layers a pipeline stage holds is computed by Megatron-Core's own functions
(``get_transformer_layer_offset`` / ``get_num_layers_to_build``) so offline plans and live models always agree.
"""

from __future__ import annotations

from dataclasses import dataclass
import math

from ..config import ConfigError, ErnieConfig

__all__ = ["Layout", "LayoutError", "initialize", "destroy"]


class LayoutError(ConfigError):
    """A parallel layout that does not fit the model (heads, experts or layers do not divide)."""


@dataclass(frozen=True)
class Layout:
    """Megatron parallel sizes.

    ``etp`` (expert tensor parallel) follows Megatron's default: ``None`` means "= tp". With EP and TP sharing the
    same ranks (e.g. TP2·EP2 on 2 processes) pass ``etp=1``. ``vpp`` is the number of virtual (interleaved) chunks per
    pipeline rank; ``first``/``last`` give uneven first/last pipeline stages (Megatron's
    ``num_layers_in_{first,last}_pipeline_stage``).
    """

    tp: int = 1
    pp: int = 1
    ep: int = 1
    etp: int | None = None
    vpp: int = 1
    first: int | None = None
    last: int | None = None

    def __post_init__(self) -> None:
        for name in ("tp", "pp", "ep", "vpp"):
            if getattr(self, name) < 1:
                raise LayoutError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.etp is not None and self.etp < 1:
            raise LayoutError(f"etp must be >= 1, got {self.etp}")
        if self.vpp > 1 and self.pp == 1:
            raise LayoutError("virtual pipeline (vpp > 1) needs pp > 1")
        if (self.first is not None or self.last is not None) and self.pp == 1:
            raise LayoutError("uneven first/last stages need pp > 1")

    @property
    def expert_tp(self) -> int:
        return self.tp if self.etp is None else self.etp

    @property
    def world_size(self) -> int:
        """The smallest world this layout fits in (data parallel 1 for the dense part)."""
        dense = self.tp * self.pp
        expert = self.expert_tp * self.ep * self.pp
        return dense * expert // math.gcd(dense, expert)

    def __str__(self) -> str:
        parts = [f"TP{self.tp}", f"PP{self.pp}", f"EP{self.ep}"]
        if self.etp is not None:
            parts.append(f"ETP{self.etp}")
        if self.vpp > 1:
            parts.append(f"VPP{self.vpp}")
        if self.first is not None or self.last is not None:
            parts.append(f"first{self.first}/last{self.last}")
        return "·".join(parts)

    # ------------------------------------------------------------------------------------------------------------
    def validate(self, cfg: ErnieConfig) -> None:
        """Raise :class:`LayoutError` listing every reason this layout cannot hold ``cfg``."""
        errors = []
        if cfg.num_attention_heads % self.tp:
            errors.append(f"TP={self.tp} does not divide num_attention_heads={cfg.num_attention_heads}")
        if cfg.num_key_value_heads % self.tp:
            errors.append(f"TP={self.tp} does not divide num_key_value_heads={cfg.num_key_value_heads}")
        if cfg.intermediate_size % self.tp and "dense" in cfg.mlp_layer_types:
            errors.append(f"TP={self.tp} does not divide intermediate_size={cfg.intermediate_size}")
        if cfg.is_moe:
            if cfg.moe_num_experts % self.ep:
                errors.append(f"EP={self.ep} does not divide moe_num_experts={cfg.moe_num_experts}")
            for w in cfg.moe_intermediate_size:
                if w % self.expert_tp:
                    errors.append(f"ETP={self.expert_tp} does not divide moe_intermediate_size={w}")
            if cfg.shared_expert_intermediate_size % self.tp:
                errors.append(f"TP={self.tp} does not divide the shared-expert width {cfg.shared_expert_intermediate_size}")
        elif self.ep > 1:
            errors.append(f"EP={self.ep} needs a MoE model")
        L = cfg.num_hidden_layers
        if self.pp * self.vpp > L:
            errors.append(f"PP={self.pp}×VPP={self.vpp} is more stages than the {L} layers")
        elif self.first is None and self.last is None and L % (self.pp * self.vpp):
            errors.append(f"PP={self.pp}×VPP={self.vpp} does not divide num_hidden_layers={L} (use first=/last=)")
        else:
            middle_stages = self.pp - (self.first is not None) - (self.last is not None)
            middle = L - (self.first or 0) - (self.last or 0)
            if middle < 0 or (middle_stages == 0 and middle != 0) or (middle_stages and middle % (middle_stages * self.vpp)):
                errors.append(f"first={self.first}/last={self.last} leave {middle} layers for {middle_stages} middle stages")
            for name, n in (("first", self.first), ("last", self.last)):
                if n is not None and (n < 1 or n % self.vpp):
                    errors.append(f"{name}={n} must be a positive multiple of VPP={self.vpp}")
        if errors:
            raise LayoutError(f"layout {self} cannot hold this model:\n  - " + "\n  - ".join(errors))

    # ------------------------------------------------------------------------------------------------------------
    def stage_layers(self, cfg: ErnieConfig, pp_rank: int, vp_stage: int | None = None) -> range:
        """Global layer indices held by pipeline rank ``pp_rank`` (and virtual chunk ``vp_stage``)."""
        from megatron.core.transformer.transformer_block import get_num_layers_to_build
        from megatron.core.transformer.transformer_layer import get_transformer_layer_offset

        if cfg.family == "vl":
            from .vl_model import vl_transformer_config as transformer_config
        else:
            from .model import transformer_config

        tc = transformer_config(cfg, self)
        vp = vp_stage if self.vpp > 1 else None
        offset = get_transformer_layer_offset(tc, vp_stage=vp, pp_rank=pp_rank)
        return range(offset, offset + get_num_layers_to_build(tc, vp_stage=vp, pp_rank=pp_rank))

    def layer_owner(self, cfg: ErnieConfig) -> dict[int, tuple[int, int]]:
        """global layer -> (pp_rank, vp_stage)."""
        owner = {}
        for p in range(self.pp):
            for v in range(self.vpp):
                for layer in self.stage_layers(cfg, p, v):
                    owner[layer] = (p, v)
        if sorted(owner) != list(range(cfg.num_hidden_layers)):
            raise LayoutError(f"layout {self} does not place every layer exactly once")
        return owner


def initialize(layout: Layout) -> None:
    """Create Megatron's process groups for ``layout`` (torch.distributed must be initialised)."""
    import torch.distributed as dist
    from megatron.core import parallel_state

    from . import cpu

    cpu.install()
    world = dist.get_world_size()
    if world % layout.world_size:
        raise LayoutError(f"layout {layout} needs a multiple of {layout.world_size} processes, have {world}")
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=layout.tp,
        pipeline_model_parallel_size=layout.pp,
        virtual_pipeline_model_parallel_size=layout.vpp if layout.vpp > 1 else None,
        expert_model_parallel_size=layout.ep,
        expert_tensor_parallel_size=layout.etp,
    )
    cpu.init_rng_tracker()


def destroy() -> None:
    from megatron.core import parallel_state

    parallel_state.destroy_model_parallel()
