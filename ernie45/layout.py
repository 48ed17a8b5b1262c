"""Parallel layouts: the sizes a user picks, validated against a model, and which layers each pipeline chunk holds.

A :class:`Layout` is plain data: no process group, no model builder, no megatron-core. The offline converter plans
any layout with it on one CPU process; ``ernie45.megatron.parallel`` creates the process groups for it.

Which layers a pipeline stage holds is Megatron-Core's rule (``get_transformer_layer_offset`` /
``get_num_layers_to_build`` with ``num_layers_in_{first,last}_pipeline_stage`` and interleaving), written out below
in plain Python; ``tests/test_layout.py`` checks it against Megatron's two functions over a grid of layouts, so
offline plans and live models always agree.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from .config import ConfigError, ErnieConfig

__all__ = ["Layout", "LayoutError"]


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
        errors += self._stage_errors(cfg.num_hidden_layers)
        if errors:
            raise LayoutError(f"layout {self} cannot hold this model:\n  - " + "\n  - ".join(errors))

    def _stage_errors(self, L: int) -> list[str]:
        """Why ``L`` layers cannot be cut into this layout's pipeline chunks (empty when they can)."""
        if self.pp * self.vpp > L:
            return [f"PP={self.pp}×VPP={self.vpp} is more stages than the {L} layers"]
        if self.first is None and self.last is None:
            if L % (self.pp * self.vpp):
                return [f"PP={self.pp}×VPP={self.vpp} does not divide num_hidden_layers={L} (use first=/last=)"]
            return []
        errors = []
        middle_stages = self.pp - (self.first is not None) - (self.last is not None)
        middle = L - (self.first or 0) - (self.last or 0)
        # every middle stage needs a layer, as Megatron's TransformerConfig requires ("Mismatch: 0 middle layers")
        if middle < 0 or bool(middle_stages) != bool(middle) or (middle_stages and middle % (middle_stages * self.vpp)):
            errors.append(f"first={self.first}/last={self.last} leave {middle} layers for {middle_stages} middle stages")
        if self.vpp > 1 and middle_stages == 0:
            # Megatron-Core 0.16.1's interleaved offset divides by the number of middle stages
            errors.append(f"VPP={self.vpp} with both first= and last= needs a middle stage (pp > 2)")
        for name, n in (("first", self.first), ("last", self.last)):
            if n is not None and (n < 1 or n % self.vpp):
                errors.append(f"{name}={n} must be a positive multiple of VPP={self.vpp}")
        return errors

    # ------------------------------------------------------------------------------------------------------------
    def stage_sizes(self, num_layers: int) -> tuple[int, ...]:
        """Layers held by each pipeline rank (all its virtual chunks together).

        Megatron's rule: ``first``/``last`` layers on the first/last rank when given, the rest split evenly over the
        other ("middle") ranks."""
        errors = self._stage_errors(num_layers)
        if errors:
            raise LayoutError(f"layout {self} cannot cut {num_layers} layers: " + "; ".join(errors))
        middle_stages = self.pp - (self.first is not None) - (self.last is not None)
        middle = num_layers - (self.first or 0) - (self.last or 0)
        sizes = [middle // middle_stages if middle_stages else 0] * self.pp
        if self.first is not None:
            sizes[0] = self.first
        if self.last is not None:
            sizes[-1] = self.last
        return tuple(sizes)

    def stage_layers(self, cfg: ErnieConfig, pp_rank: int, vp_stage: int | None = None) -> range:
        """Global layer indices held by pipeline rank ``pp_rank`` (and virtual chunk ``vp_stage``).

        With interleaving every rank's share is cut into ``vpp`` equal chunks, laid out chunk-major: virtual chunk
        ``v`` of every rank comes before chunk ``v + 1`` of any rank (Megatron's interleaved schedule)."""
        sizes = self.stage_sizes(cfg.num_hidden_layers)
        if not 0 <= pp_rank < self.pp:
            raise ValueError(f"pp_rank {pp_rank} outside layout {self}")
        v = 0 if self.vpp == 1 else vp_stage
        if v is None or not 0 <= v < self.vpp:
            raise ValueError(f"vp_stage {vp_stage} outside layout {self}")
        chunk = [n // self.vpp for n in sizes]  # layers per virtual chunk, per rank
        start = v * sum(chunk) + sum(chunk[:pp_rank])
        return range(start, start + chunk[pp_rank])

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
