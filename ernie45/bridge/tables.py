"""What maps to what: HF on-disk safetensors names ⇄ Megatron-Core parameter names, as data.

One table per format pair drives both directions. Each :class:`Row` says which HF tensors become which Megatron
tensors through which reversible op (``ops.py``), how the Megatron tensor is sharded (:class:`Split`, reference §H.2),
for which layers / experts it exists (``scope``) and the HF shapes the config implies.

Megatron names here are *global*: full (unsharded) tensors, global layer index ``{L}``, global expert index
``{X}``, with the names of Megatron's local (non-TE) spec and SequentialMLP experts. Where each one lives on a
given rank (PP stage, EP rank, local names, TP slice) is ``layout.py``'s job.

On-disk layouts (reference §G):

* dense / text MoE: ``model.embed_tokens.weight``, ``model.layers.{L}.self_attn.{q,k,v,o}_proj.weight``,
  ``model.layers.{L}.{input,post_attention}_layernorm.weight``, dense ``model.layers.{L}.mlp.{gate,up,down}_proj``,
  MoE ``model.layers.{L}.mlp.gate.weight`` [E, H], ``model.layers.{L}.mlp.moe_statics.e_score_correction_bias``
  [1, E], ``model.layers.{L}.mlp.experts.{X}.{gate,up,down}_proj.weight``,
  ``model.layers.{L}.mlp.shared_experts.{gate,up,down}_proj.weight``, ``model.norm.weight``, ``lm_head.weight``
  (untied only; a tied checkpoint *with* the key is loaded untied, as transformers 5.23 does, reference §G).
"""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass
from typing import Callable, Iterator, Mapping

from ..config import ErnieConfig
from .ops import ConcatGLU, FuseQKV, Identity, Op, Squeeze0

__all__ = ["Split", "Row", "Item", "IGNORED", "rows_for", "text_rows", "expand", "ignored_reason", "effective_tie"]


class Split(enum.Enum):
    """How a Megatron tensor is sharded. Every tensor is classified; nothing is 'replicated by default'."""

    REPLICATED = "replicated"
    COLUMN = "column"  # dim 0 over TP
    ROW = "row"  # dim 1 over TP
    VOCAB = "vocab"  # dim 0 over TP, zero-padded to a multiple of TP
    EXPERT_COLUMN = "expert-column"  # experts over EP, dim 0 over expert-TP
    EXPERT_ROW = "expert-row"  # experts over EP, dim 1 over expert-TP

    @property
    def dim(self) -> int | None:
        return {"column": 0, "vocab": 0, "expert-column": 0, "row": 1, "expert-row": 1}.get(self.value)

    @property
    def is_expert(self) -> bool:
        return self in (Split.EXPERT_COLUMN, Split.EXPERT_ROW)


Shapes = Callable[[ErnieConfig], tuple[tuple[int, ...], ...]]

# scope -> which instances exist. Placeholders: {L} layer, {X} expert (pool-local), {XV} = E + X (VL vision pool's
# on-disk index), {B} vision block.
SCOPES = ("model", "untied", "layer", "dense", "moe", "shared", "expert", "vision_expert", "vision_block")


@dataclass(frozen=True)
class Row:
    hf: tuple[str, ...]
    mg: tuple[str, ...]
    op: Op
    split: Split
    scope: str
    hf_shapes: Shapes

    def __post_init__(self) -> None:
        if self.scope not in SCOPES:
            raise ValueError(f"unknown scope {self.scope!r}")
        if len(self.hf) != self.op.n_hf or len(self.mg) != self.op.n_mg:
            raise ValueError(f"row {self.hf} -> {self.mg}: arity does not match {self.op.describe()}")
        if self.split.dim is not None and self.split.dim not in self.op.shardable_dims:
            raise ValueError(f"row {self.mg}: {self.op.describe()} does not commute with a {self.split.value} split")


@dataclass(frozen=True)
class Item:
    """One concrete row instance: these HF tensors ⇄ these Megatron tensors."""

    hf: tuple[str, ...]
    mg: tuple[str, ...]
    op: Op
    split: Split
    hf_shapes: tuple[tuple[int, ...], ...]
    layer: int | None = None
    expert: int | None = None  # pool-local expert index (EP placement)


# Tensors deliberately left out of the Megatron model, with the reason. Anchored full-key patterns only.
IGNORED: dict[str, str] = {
    r"(model\.)?mtp_(block|emb_norm|hidden_norm|linear_proj)\.\d+\..+": (
        "multi-token-prediction (MTP) head of the PT checkpoints: not part of the ERNIE 4.5 forward pass "
        "(transformers ignores it too, _keys_to_ignore_on_load_unexpected=['mtp']); the offline converter carries "
        "it through unchanged"
    ),
    r"optimizer\.state\.(exp_avg|exp_avg_sq|fp32_param)\..+": (
        "optimizer state of an `ernie45 train` checkpoint (Adam moments, fp32 master copies): training state, not "
        "model weights; a conversion exports the model, and only `ernie45 train --resume` reads it"
    ),
}
_IGNORED_RE = [(re.compile(p), why) for p, why in IGNORED.items()]


def ignored_reason(name: str) -> str | None:
    for pattern, why in _IGNORED_RE:
        if pattern.fullmatch(name):
            return why
    return None


def effective_tie(cfg: ErnieConfig, hf_keys) -> bool:
    """transformers 5.23 loads an on-disk ``lm_head.weight`` untied even if the config says tied (reference §G)."""
    return cfg.tie_word_embeddings and "lm_head.weight" not in set(hf_keys)


def text_rows(cfg: ErnieConfig) -> tuple[Row, ...]:
    H, V, D = cfg.hidden_size, cfg.vocab_size, cfg.head_dim
    nh, nkv = cfg.num_attention_heads, cfg.num_key_value_heads
    F = cfg.intermediate_size
    Ft = cfg.moe_intermediate_size[0] if cfg.is_moe else 0
    Fs = cfg.shared_expert_intermediate_size
    E = cfg.moe_num_experts or 0
    hf, mg = "model.layers.{L}.", "decoder.layers.{L}."
    return (
        Row(("model.embed_tokens.weight",), ("embedding.word_embeddings.weight",), Identity(), Split.VOCAB, "model",
            lambda c: ((V, H),)),
        Row(("lm_head.weight",), ("output_layer.weight",), Identity(), Split.VOCAB, "untied", lambda c: ((V, H),)),
        Row(("model.norm.weight",), ("decoder.final_layernorm.weight",), Identity(), Split.REPLICATED, "model",
            lambda c: ((H,),)),
        Row((hf + "input_layernorm.weight",), (mg + "input_layernorm.weight",), Identity(), Split.REPLICATED, "layer",
            lambda c: ((H,),)),
        Row(tuple(hf + f"self_attn.{p}_proj.weight" for p in "qkv"), (mg + "self_attention.linear_qkv.weight",),
            FuseQKV(head_dim=D, heads_per_group=nh // nkv), Split.COLUMN, "layer",
            lambda c: ((nh * D, H), (nkv * D, H), (nkv * D, H))),
        Row((hf + "self_attn.o_proj.weight",), (mg + "self_attention.linear_proj.weight",), Identity(), Split.ROW,
            "layer", lambda c: ((H, nh * D),)),
        Row((hf + "post_attention_layernorm.weight",), (mg + "pre_mlp_layernorm.weight",), Identity(),
            Split.REPLICATED, "layer", lambda c: ((H,),)),
        # dense SwiGLU layers
        Row((hf + "mlp.gate_proj.weight", hf + "mlp.up_proj.weight"), (mg + "mlp.linear_fc1.weight",), ConcatGLU(),
            Split.COLUMN, "dense", lambda c: ((F, H), (F, H))),
        Row((hf + "mlp.down_proj.weight",), (mg + "mlp.linear_fc2.weight",), Identity(), Split.ROW, "dense",
            lambda c: ((H, F),)),
        # MoE layers: router [E, H] (text checkpoints store it un-transposed), selection bias [1, E] -> [E]
        Row((hf + "mlp.gate.weight",), (mg + "mlp.router.weight",), Identity(), Split.REPLICATED, "moe",
            lambda c: ((E, H),)),
        Row((hf + "mlp.moe_statics.e_score_correction_bias",), (mg + "mlp.router.expert_bias",), Squeeze0(),
            Split.REPLICATED, "moe", lambda c: ((1, E),)),
        Row((hf + "mlp.experts.{X}.gate_proj.weight", hf + "mlp.experts.{X}.up_proj.weight"),
            (mg + "mlp.experts.local_experts.{X}.linear_fc1.weight",), ConcatGLU(), Split.EXPERT_COLUMN, "expert",
            lambda c: ((Ft, H), (Ft, H))),
        Row((hf + "mlp.experts.{X}.down_proj.weight",), (mg + "mlp.experts.local_experts.{X}.linear_fc2.weight",),
            Identity(), Split.EXPERT_ROW, "expert", lambda c: ((H, Ft),)),
        Row((hf + "mlp.shared_experts.gate_proj.weight", hf + "mlp.shared_experts.up_proj.weight"),
            (mg + "mlp.shared_experts.linear_fc1.weight",), ConcatGLU(), Split.COLUMN, "shared",
            lambda c: ((Fs, H), (Fs, H))),
        Row((hf + "mlp.shared_experts.down_proj.weight",), (mg + "mlp.shared_experts.linear_fc2.weight",), Identity(),
            Split.ROW, "shared", lambda c: ((H, Fs),)),
    )  # fmt: skip


def rows_for(cfg: ErnieConfig) -> tuple[Row, ...]:
    """The HF ⇄ Megatron table of this config's family."""
    if cfg.family == "vl":
        from .vl_table import vl_rows  # the VL table is its own format pair (different on-disk layout)

        return vl_rows(cfg)
    return text_rows(cfg)


def _instances(cfg: ErnieConfig, scope: str, tied: bool) -> Iterator[Mapping[str, int]]:
    layers = range(cfg.num_hidden_layers)
    sparse = [l for l in layers if cfg.mlp_layer_types[l] == "sparse"]
    E = cfg.moe_num_experts or 0
    if scope == "model":
        yield {}
    elif scope == "untied":
        if not tied:
            yield {}
    elif scope == "layer":
        yield from ({"L": l} for l in layers)
    elif scope == "dense":
        yield from ({"L": l} for l in layers if cfg.mlp_layer_types[l] == "dense")
    elif scope == "moe":
        yield from ({"L": l} for l in sparse)
    elif scope == "shared":
        if cfg.moe_num_shared_experts:
            yield from ({"L": l} for l in sparse)
    elif scope in ("expert", "vision_expert"):
        yield from ({"L": l, "X": x, "XV": E + x} for l in sparse for x in range(E))
    elif scope == "vision_block":
        yield from ({"B": b} for b in range(cfg.vision.depth))
    else:  # pragma: no cover - Row validates scopes
        raise ValueError(scope)


def expand(cfg: ErnieConfig, *, tied: bool) -> list[Item]:
    """Every concrete (HF names ⇄ Megatron names) pair for this config, in a deterministic order."""
    items = []
    for row in rows_for(cfg):
        shapes = row.hf_shapes(cfg)
        for sub in _instances(cfg, row.scope, tied):
            items.append(
                Item(
                    hf=tuple(p.format(**sub) for p in row.hf),
                    mg=tuple(p.format(**sub) for p in row.mg),
                    op=row.op,
                    split=row.split,
                    hf_shapes=shapes,
                    layer=sub.get("L"),
                    expert=sub.get("X"),
                )
            )
    return items
