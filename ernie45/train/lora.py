"""LoRA on the Megatron-Core ERNIE models: adapters on column- and row-parallel linears, on every SequentialMLP expert
of either pool, on the ViT and the resampler; freezing, merging, adapter-only checkpoints.

An adapter is a :class:`LoRAAdapter` child named ``lora`` of the linear it adapts, run by a forward hook that adds
``(α/r)·B·A·dropout(x)`` to the linear's output. The base parameters keep their names
(``decoder.layers.0.self_attention.linear_qkv.weight``), so the bridge tables and Megatron's dist-checkpoint keys
stay valid; the adapter adds ``….linear_qkv.lora.A`` / ``….lora.B``, names no bridge table knows. ``merge_lora``
folds the adapters into the weights and removes them, after which ``bridge.live.export_hf`` exports as usual.

Target groups are anchored patterns over module names (:data:`TARGET_PATTERNS`); the same patterns select from a
live chunk's local names and from the bridge table's global names (``describe_lora`` counts without a model).

Tensor parallelism -- every adapted layer equals the merged layer ``W + (α/r)·B·A`` at any TP:

* column-parallel base (``linear_qkv``, ``linear_fc1``, ViT ``linear_qkv``/``linear_fc1``; ``W_i`` = output rows
  ``i``): ``A`` replicated ``[P·r, in]``, ``B`` sharded like ``W`` on the output dim, ``B_i = B[rows_i]``. Then
  ``ΔW[rows_i] = B_i·A`` (per part, below) -- the merged shard. ``B``'s rows follow ``W``'s rows *whatever their
  layout*: the fused QKV's group-major rows and SwiGLU's per-shard ``[gate_i; up_i]`` interleave come for free, and
  the PEFT export un-interleaves ``B`` with the same bridge op as ``W`` (``ConcatGLU`` / ``FuseQKV``). Each rank's
  ``B_i`` only sees its output rows, so ``∂A`` is a partial sum: ``A`` enters through
  ``copy_to_tensor_model_parallel_region`` (identity forward, all-reduce backward), which makes its gradient whole on
  every rank inside autograd;
* row-parallel base (``linear_proj``, ``linear_fc2``; ``W_i`` = input columns ``i``, outputs summed over TP):
  ``A`` sharded on the input dim ``A_i = A[:, cols_i]``, ``B`` replicated. ``Σ_i W_i x_i + B·Σ_i A_i x_i`` equals
  ``Σ_i (W_i + B·A_i) x_i`` exactly in exact arithmetic, so we reduce the rank-``r`` partial sums ``A_i x_i`` the way
  the base reduces its output (all-reduce, or reduce-scatter under sequence parallelism) and apply ``B`` *after* the
  reduction: the collective moves ``r`` numbers per token instead of ``out``. Under sequence parallelism each rank
  applies ``B`` to its sequence chunk only, so ``∂B`` is partial and ``B`` enters through the same copy-to region;
* experts (``explicit_expert_comm``: Megatron's dispatcher does the reductions): the column rule is unchanged
  (inputs are not gathered); for the row-parallel ``linear_fc2`` the base output stays a partial sum over expert-TP
  that the dispatcher reduces, so the adapter adds its partial ``B·A_i x_i`` to it and ``∂B`` is summed over the
  expert-TP group (copy-to region). Expert adapters are children of their expert modules, so they live on the
  expert's EP rank and carry the weight's ``allreduce=False`` (expert data-parallel gradients in Megatron's DDP).

One LoRA per transformers linear (what peft trains): a Megatron linear that fuses several transformers linears holds
one independent rank-r LoRA per *part* -- ``linear_qkv`` = q, k, v (transformers' ``q_proj``, ``k_proj``,
``v_proj``), a dense / shared-expert SwiGLU ``linear_fc1`` = gate, up (``gate_proj``, ``up_proj``). ``A`` stacks
the parts' ``A`` s ``[P·r, in]``; every output row of ``B [out, r]`` belongs to one part (``part_O``, following the
weight's row layout on this shard) and reads only that part's ``r`` columns of ``A·x``. So ``ΔW[o] = B[o]·A_part(o)``,
training equals peft's q/k/v (gate/up) LoRAs step for step, and the PEFT export is exact. A shared ``A`` for q, k
and v would be expressible too (a copy per peft module), but it trains differently: peft's three ``A`` s receive
different gradients. Routed experts' ``linear_fc1`` is one part: transformers fuses ``gate_up_proj`` and peft adapts
it with a single ``A`` per expert; the Megatron ViT's ``linear_qkv`` is one part too (HF's ViT ``qkv`` is one
linear).

The input-gradient paths mirror the base: the column adapter's ``∂x`` is a partial sum exactly like the base's and
is reduced by the same mapping the base uses (all-reduce / reduce-scatter under SP / the dispatcher for experts).

The transformers ViT and the resampler are ``torch.nn.Linear`` modules replicated over TP: plain adapters. Both ViTs
are supported (``vit``: HF-ViT ``blocks.B.attn.{qkv,proj}``, ``mlp.fc{1,2}``; Megatron ViT the same four linears
as column/row-parallel layers); the patch embedding is not a target.

Dropout (on the adapter's input, as peft) draws from torch's default generator, seeded alike on every rank, so the
replicated input of a column adapter gets the same mask on every TP rank. Routed experts take no LoRA dropout: the
ranks of one TP group may hold different experts with different token counts, whose draws would put their
generators out of step, and peft's fused-expert LoRA (``ParamWrapper``) refuses dropout anyway.

Legend: ``P`` LoRA parts of one linear, ``r`` rank, ``O`` output rows on this shard, ``I`` input features.
"""

from __future__ import annotations

import re
import zlib
from dataclasses import dataclass
from typing import Iterator, Sequence

import torch
import torch.nn.functional as F

from ..config import ConfigError, ErnieConfig

__all__ = [
    "LORA_TARGET_GROUPS",
    "DEFAULT_LORA_TARGETS",
    "TARGET_PATTERNS",
    "LoraError",
    "LoRAAdapter",
    "apply_lora",
    "adapted_modules",
    "adapter_sharded_state_dict",
    "load_adapter_state_dict",
    "merge_lora",
    "lora_target_weights",
    "lora_parts",
]

LORA_TARGET_GROUPS = ("attn", "mlp", "shared", "experts", "vision_experts", "vit", "resampler")
DEFAULT_LORA_TARGETS = ("attn", "mlp", "shared", "experts")

_LM = r"(?:language_model\.)?decoder\.layers\.\d+\."
# group -> the module names it adapts, as an anchored pattern over model names (local or global alike)
TARGET_PATTERNS: dict[str, str] = {
    "attn": _LM + r"self_attention\.linear_(?:qkv|proj)",
    "mlp": _LM + r"mlp\.linear_fc[12]",
    "shared": _LM + r"mlp\.shared_experts\.linear_fc[12]",
    "experts": _LM + r"mlp\.(?:text_moe_layer\.)?experts\.local_experts\.\d+\.linear_fc[12]",
    "vision_experts": _LM + r"mlp\.vision_moe_layer\.experts\.local_experts\.\d+\.linear_fc[12]",
    "vit": r"vision_model\.(?:blocks\.\d+\.(?:attn\.(?:qkv|proj)|mlp\.fc[12])"
    r"|decoder\.layers\.\d+\.(?:self_attention\.linear_(?:qkv|proj)|mlp\.linear_fc[12]))",
    "resampler": r"resampler_model\.(?:(?:spatial|temporal)_linear\.fc[12]|mlp)",
}
_TARGET_RE = {g: re.compile(p) for g, p in TARGET_PATTERNS.items()}
# Megatron linears that fuse several transformers linears -> their parts, in the order of the weight's rows
_PARTS: tuple[tuple[re.Pattern[str], tuple[str, ...]], ...] = (
    (re.compile(_LM + r"self_attention\.linear_qkv"), ("q", "k", "v")),
    (re.compile(_LM + r"mlp\.(?:shared_experts\.)?linear_fc1"), ("gate", "up")),
)
_LAYER_RE = re.compile(r"(?P<pre>(?:language_model\.)?decoder\.layers\.)(?P<L>\d+)(?P<rest>\..+)")
_EXPERT_RE = re.compile(r"(?P<pre>.*\.experts)\.local_experts\.(?P<j>\d+)(?P<rest>\..+)")


class LoraError(ConfigError):
    """A LoRA request that does not fit the model (unknown or absent target group, bad rank)."""


def lora_parts(module_name: str) -> tuple[str, ...]:
    """The independent LoRAs one adapted linear holds (module docstring); ``("",)`` for a single one."""
    hits = [parts for rx, parts in _PARTS if rx.fullmatch(module_name)]
    return hits[0] if hits else ("",)


def _row_parts(cfg: ErnieConfig, parts: tuple[str, ...], out_local: int) -> torch.Tensor:
    """``part_O``: the part each output row of this shard belongs to (the weight's row layout, reference §H.3 / §H.4)."""
    if parts == ("q", "k", "v"):  # group-major [q x R, k, v] per KV group; a TP shard holds whole groups
        D, R = cfg.head_dim, cfg.num_attention_heads // cfg.num_key_value_heads
        per_group = torch.cat([torch.zeros(R * D), torch.ones(D), torch.full((D,), 2.0)]).long()
        return per_group.repeat(out_local // ((R + 2) * D))
    if parts == ("gate", "up"):  # [gate_i; up_i] on every TP shard
        return torch.arange(2).repeat_interleave(out_local // 2)
    return torch.zeros(out_local, dtype=torch.long)


def group_of(module_name: str) -> str | None:
    """The target group a module name belongs to (None: not a LoRA target)."""
    hits = [g for g, rx in _TARGET_RE.items() if rx.fullmatch(module_name)]
    if len(hits) > 1:  # the patterns are disjoint; a second hit is a bug in the table
        raise LoraError(f"{module_name} matches several LoRA target groups: {hits}")
    return hits[0] if hits else None


# ----------------------------------------------------------------------------------------------------------------------
# the adapter


@dataclass(frozen=True)
class Sharding:
    """How one adapter is split: its base's kind and its rank's place in the base's TP group."""

    kind: str  # "column" | "row" | "replicated"
    index: int  # rank in the base's (expert-)TP group
    count: int  # size of that group
    is_expert: bool
    # SwiGLU linear_fc1: the output rows are two halves [gate; up], each split over TP on its own, so TP shard i of
    # W (and of B) is [gate_i; up_i] -- not a plain dim-0 chunk of the full tensor
    glu: bool = False

    def dim(self, which: str) -> int | None:
        """The dim of ``A`` / ``B`` split over the group (None: replicated)."""
        return {("column", "B"): 0, ("row", "A"): 1}.get((self.kind, which))


class LoRAAdapter(torch.nn.Module):
    """``A [P·r, in_local]``, ``B [out_local, r]`` of one base linear (P parts, module docstring) and the
    collectives that make it TP-exact."""

    def __init__(self, base: torch.nn.Module, *, rank: int, alpha: float, dropout: float, global_name: str,
                 sharding: Sharding, A_full: torch.Tensor, parts: tuple[str, ...],
                 part_O: torch.Tensor) -> None:  # fmt: skip
        super().__init__()
        w = base.weight
        self.global_name = global_name
        self.parts = parts
        # one-hot of each output row's part [P, out]: derived from the layout, not state
        part_PO = torch.nn.functional.one_hot(part_O, len(parts)).t().to(device=w.device, dtype=w.dtype)
        self.register_buffer("part_PO", part_PO, persistent=False)
        self.sharding = sharding
        self.rank = rank
        self.alpha = alpha
        self.scaling = alpha / rank
        self.run_dropout = dropout  # the run's --lora-dropout (recorded in exports; experts apply none)
        p_drop = 0.0 if sharding.is_expert else dropout  # routed experts: no dropout (module docstring)
        self.dropout = torch.nn.Dropout(p_drop) if p_drop > 0 else torch.nn.Identity()
        self.tp_group = getattr(base, "tp_group", None)
        self.sequence_parallel = bool(getattr(base, "sequence_parallel", False))
        self.explicit_comm = bool(getattr(base, "explicit_expert_comm", False))
        a_dim = sharding.dim("A")
        A = A_full if a_dim is None else A_full.chunk(sharding.count, dim=a_dim)[sharding.index]
        # on the base's device and in its dtype (the trainer moves the model before adding adapters)
        self.A = torch.nn.Parameter(A.to(device=w.device, dtype=w.dtype).contiguous())
        self.B = torch.nn.Parameter(torch.zeros(w.shape[0], rank, device=w.device, dtype=w.dtype))
        from megatron.core.tensor_parallel import set_tensor_model_parallel_attributes

        for which, p in (("A", self.A), ("B", self.B)):
            dim = sharding.dim(which)
            if dim is not None:  # Megatron's grad-norm and checkpoint code count sharded parameters by these
                set_tensor_model_parallel_attributes(p, True, dim, 1)
            # expert adapters reduce over the expert data-parallel group in Megatron's DDP, like their weights
            p.allreduce = getattr(w, "allreduce", True)

    def delta(self, x: torch.Tensor) -> torch.Tensor:
        """What the adapter adds to the base output for input ``x`` (the base's own input)."""
        from megatron.core.tensor_parallel.mappings import (
            copy_to_tensor_model_parallel_region as copy_to,
            gather_from_sequence_parallel_region,
            reduce_from_tensor_model_parallel_region,
            reduce_scatter_to_sequence_parallel_region,
        )

        kind, g = self.sharding.kind, self.tp_group
        if kind == "replicated":
            return self.scaling * F.linear(F.linear(self.dropout(x), self.A), self.B)
        split = self.sharding.count > 1
        if kind == "column":
            if split and not self.explicit_comm:
                # the base's input: gathered over the sequence (SP), or replicated with an all-reduced gradient
                x = gather_from_sequence_parallel_region(x, group=g) if self.sequence_parallel else copy_to(x, group=g)
            A = copy_to(self.A, group=g) if split else self.A  # ∂A: summed over the B shards
            h = F.linear(self.dropout(x), A)
            if len(self.parts) == 1:
                return self.scaling * F.linear(h, self.B)
            # row o reads only its part's r columns of h: Σ_p h_p · (B masked to part p's rows)ᵀ
            h_P = h.unflatten(-1, (len(self.parts), self.rank))
            out = sum(F.linear(h_P[..., p, :], self.B * self.part_PO[p, :, None]) for p in range(len(self.parts)))
            return self.scaling * out
        # row: the rank-r partial sums reduced like the base's output, B applied after (module docstring)
        h = F.linear(self.dropout(x), self.A)
        B = self.B
        if split:
            if self.explicit_comm:  # the dispatcher sums the expert's partial output over expert-TP
                B = copy_to(self.B, group=g)
            elif self.sequence_parallel:
                h = reduce_scatter_to_sequence_parallel_region(h, group=g)
                B = copy_to(self.B, group=g)  # each rank's B saw one sequence chunk
            else:
                h = reduce_from_tensor_model_parallel_region(h, group=g)
        return self.scaling * F.linear(h, B)

    def merged_weight(self, weight: torch.Tensor) -> torch.Tensor:
        """``W + (α/r)·B·A`` of this rank's shard, in fp32, cast to ``W``'s dtype."""
        return (weight.float() + self.scaling * self.delta_weight()).to(weight.dtype)

    def delta_weight(self) -> torch.Tensor:
        """``B·A`` of this rank's shard in fp32, row o with its part's ``A`` (``[out_local, in_local]``)."""
        A_PRI = self.A.float().view(len(self.parts), self.rank, -1)
        return sum((self.B.float() * self.part_PO[p, :, None].float()) @ A_PRI[p] for p in range(len(self.parts)))

    def extra_repr(self) -> str:
        s = self.sharding
        return f"{self.global_name}: r={self.rank}, alpha={self.alpha}, {s.kind} shard {s.index}/{s.count}"


def _add_lora(module, args, kwargs, output):
    """Forward hook of an adapted linear: output (or ``(output, bias)``) + the adapter's delta."""
    x = args[0] if args else next(iter(kwargs.values()))
    delta = module.lora.delta(x)
    if isinstance(output, tuple):
        return (output[0] + delta.to(output[0].dtype), *output[1:])
    return output + delta.to(output.dtype)


# ----------------------------------------------------------------------------------------------------------------------
# applying


def _sharding(name: str, module: torch.nn.Module) -> Sharding:
    from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear

    if isinstance(module, (ColumnParallelLinear, RowParallelLinear)):
        kind = "column" if isinstance(module, ColumnParallelLinear) else "row"
        glu = kind == "column" and name.endswith("linear_fc1") and module.config.gated_linear_unit
        return Sharding(kind, module.tp_group.rank(), module.tp_group.size(), bool(module.is_expert), glu)
    if isinstance(module, torch.nn.Linear):  # transformers' ViT / resampler: replicated over the TP group
        from megatron.core import parallel_state as ps

        tp_rank, tp = ps.get_tensor_model_parallel_rank(), ps.get_tensor_model_parallel_world_size()
        return Sharding("replicated", tp_rank, tp, False)
    raise LoraError(f"cannot adapt {type(module).__name__}: not a Linear, ColumnParallelLinear or RowParallelLinear")


def _global_name(chunk: torch.nn.Module, local: str) -> str:
    """Local module name -> global one: Megatron's global layer number, the expert's index in its pool."""
    from megatron.core import parallel_state as ps

    m = _EXPERT_RE.fullmatch(local)
    if m:
        per = chunk.get_submodule(m["pre"]).num_local_experts
        local = f"{m['pre']}.local_experts.{ps.get_expert_model_parallel_rank() * per + int(m['j'])}{m['rest']}"
    m = _LAYER_RE.fullmatch(local)
    if m:
        layer = chunk.get_submodule(m["pre"] + m["L"]).layer_number - 1  # Megatron's layer_number is 1-based, global
        local = f"{m['pre']}{layer}{m['rest']}"
    return local


def _initial_A(global_name: str, rank: int, in_features: int, seed: int, dtype: torch.dtype) -> torch.Tensor:
    """peft's initialisation of ``A`` (kaiming-uniform, a=√5: U(±1/√in)) for the *full* tensor, drawn from a
    generator keyed by the global name: the same adapters at every layout and on every replica."""
    g = torch.Generator().manual_seed((seed * 1_000_003 + zlib.crc32(global_name.encode())) % 2**63)
    bound = 1.0 / in_features**0.5
    return ((torch.rand(rank, in_features, generator=g, dtype=torch.float64) * 2 - 1) * bound).to(dtype)


def check_targets(cfg: ErnieConfig, targets: Sequence[str]) -> tuple[str, ...]:
    targets = tuple(targets)
    unknown = [t for t in targets if t not in LORA_TARGET_GROUPS]
    if unknown:
        raise LoraError(f"unknown LoRA target group(s) {unknown}; choose from {', '.join(LORA_TARGET_GROUPS)}")
    if not targets:
        raise LoraError("no LoRA target group given")
    present = {group_of(name) for name in lora_target_weights(cfg)}
    absent = [t for t in targets if t not in present and t not in DEFAULT_LORA_TARGETS]
    if absent:
        raise LoraError(f"LoRA target group(s) {absent} do not exist in this {cfg.family} model")
    if not present & set(targets):
        raise LoraError(f"none of the LoRA target groups {list(targets)} exists in this {cfg.family} model")
    return targets


def apply_lora(chunks, cfg: ErnieConfig, layout, *, rank: int, alpha: float, dropout: float = 0.0,
               targets: Sequence[str] = DEFAULT_LORA_TARGETS, seed: int = 0) -> None:  # fmt: skip
    """Add adapters in place (A random, B zero, as peft) and freeze every base parameter (``requires_grad=False``).

    Call after the base weights are loaded and before any DDP wrap. ``layout`` is validated against ``cfg``.
    """
    if rank < 1:
        raise LoraError(f"LoRA rank must be >= 1, got {rank}")
    if not 0.0 <= dropout < 1.0:
        raise LoraError(f"LoRA dropout must be in [0, 1), got {dropout}")
    layout.validate(cfg)
    targets = check_targets(cfg, targets)
    for chunk in chunks:
        for p in chunk.parameters():
            p.requires_grad_(False)
        found = [(n, m) for n, m in chunk.named_modules() if group_of(n) in targets]
        for name, module in found:
            if hasattr(module, "lora"):
                raise LoraError(f"{name} already has a LoRA adapter")
            sharding = _sharding(name, module)
            global_name = _global_name(chunk, name)
            in_full = module.weight.shape[1] * (sharding.count if sharding.kind == "row" else 1)
            parts = lora_parts(global_name)
            A_full = _initial_A(global_name, rank * len(parts), in_full, seed, module.weight.dtype)
            module.lora = LoRAAdapter(module, rank=rank, alpha=alpha, dropout=dropout, global_name=global_name,
                                      sharding=sharding, A_full=A_full, parts=parts,
                                      part_O=_row_parts(cfg, parts, module.weight.shape[0]))  # fmt: skip
            module.lora.hook = module.register_forward_hook(_add_lora, with_kwargs=True)


def adapted_modules(chunk: torch.nn.Module) -> Iterator[tuple[str, torch.nn.Module]]:
    """(local name, base linear) of every adapted linear of one chunk."""
    for name, module in chunk.named_modules():
        if isinstance(getattr(module, "lora", None), LoRAAdapter):
            yield name, module


def merge_lora(chunks) -> None:
    """``W += (α/r)·B·A`` (fp32, cast back to W's dtype) on every adapted linear; removes the adapters and hooks."""
    for chunk in chunks:
        for _, module in list(adapted_modules(chunk)):
            with torch.no_grad():
                module.weight.copy_(module.lora.merged_weight(module.weight))
            module.lora.hook.remove()
            del module.lora


# ----------------------------------------------------------------------------------------------------------------------
# checkpoints


def _replica_rank(adapter: LoRAAdapter) -> int:
    from megatron.core import parallel_state as ps

    if adapter.sharding.is_expert:
        return ps.get_expert_data_parallel_rank()
    return ps.get_data_parallel_rank(with_context_parallel=True)


def adapter_sharded_state_dict(chunks) -> dict:
    """Adapters only, as Megatron ``ShardedTensor`` s over the parameters themselves (the optimizer's
    ``sharded_state_dict`` maps its state through them): keys are global (``decoder.layers.{L}.….lora.A``, global
    expert index), TP shards carry their offsets, replicas a non-zero ``replica_id`` -- so an adapter checkpoint
    resumes at any layout."""
    from megatron.core.dist_checkpointing import ShardedTensor
    from megatron.core.transformer.mlp import apply_swiglu_sharded_factory

    out = {}
    for chunk in chunks:
        for _, module in adapted_modules(chunk):
            ad = module.lora
            s, dp = ad.sharding, _replica_rank(ad)
            for which, p in (("A", ad.A), ("B", ad.B)):
                key = f"{ad.global_name}.lora.{which}"
                dim = s.dim(which)
                if dim is None:  # replicated over the TP group: TP rank > 0 holds a replica
                    out[key] = ShardedTensor.from_rank_offsets(key, p, replica_id=(s.index, dp))
                else:
                    out[key] = ShardedTensor.from_rank_offsets(key, p, (dim, s.index, s.count), replica_id=(0, dp))
                    if s.glu and which == "B":  # stored as the full [gate; up], whatever the TP (like W itself)
                        out[key] = apply_swiglu_sharded_factory(out[key], ())
    return out


def load_adapter_state_dict(chunks, loaded: dict) -> None:
    """Copy what ``dist_checkpointing.load(adapter_sharded_state_dict(chunks), dir)`` returned into the adapters;
    fails listing every missing, unexpected or mis-shaped key."""
    want = adapter_sharded_state_dict(chunks)
    missing, unexpected = sorted(set(want) - set(loaded)), sorted(set(loaded) - set(want))
    bad = [k for k in want if k in loaded and tuple(loaded[k].shape) != tuple(want[k].data.shape)]
    if missing or unexpected or bad:
        raise LoraError(f"adapter checkpoint does not fit this model: missing {missing}, unexpected {unexpected}, "
                        f"mis-shaped {bad}")  # fmt: skip
    with torch.no_grad():
        for key, sh in want.items():
            sh.data.copy_(loaded[key])


# ----------------------------------------------------------------------------------------------------------------------
# counting (no model needed)


def lora_target_weights(cfg: ErnieConfig) -> dict[str, tuple[int, int]]:
    """Every linear of ``cfg`` some target group can adapt: global module name -> full ``(out, in)``, from the
    bridge table (so the counts cover every layer and expert, whatever this rank holds)."""
    from ..bridge.plan import expand

    out = {}
    for item in expand(cfg, tied=cfg.tie_word_embeddings):
        for name, shape in zip(item.mg, item.op.mg_shapes(item.hf_shapes)):
            if name.endswith(".weight") and len(shape) == 2 and group_of(name[: -len(".weight")]):
                out[name[: -len(".weight")]] = tuple(shape)
    return out
