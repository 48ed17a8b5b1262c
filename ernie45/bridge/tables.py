"""The table engine shared by both format pairs: rows, scopes, expansion, the ignore table and the tie rule.

A table says, as data, which HF on-disk tensors become which model-side tensors through which reversible op
(``ops.py``). One engine serves every table: the HF ⇄ Megatron rows of the text families (``text_table.py``) and of
VL (``vl_table.py``), and the HF ⇄ GGUF rows (``gguf.py``). Each :class:`Row` says

* ``hf`` / ``mg``: name patterns of the HF tensors and of the model-side tensors (Megatron parameters, or the GGUF
  tensor), with placeholders ``{L}`` layer, ``{X}`` expert (pool-local), ``{XV}`` = E + X (the VL vision pool's
  on-disk index), ``{B}`` vision block;
* ``op``: the reversible op between them; ``split``: how the model-side tensor is sharded (:class:`Split`,
  reference §H.2; a GGUF tensor is whole: ``REPLICATED``);
* ``scope``: for which instances it exists (:data:`SCOPES`);
* ``hf_shapes``: the HF shapes, as plain tuples whose dims are ints or the names of :func:`dims` (resolved at
  expansion: a table written once reads the same for every config).

:func:`expand_rows` turns a table into :class:`Item` s, one per concrete instance; ``plan.py`` checks a source
against them (every tensor consumed once, or declared in :data:`IGNORED`) for either pair. Where a Megatron tensor
lives on a rank is ``layout.py``'s job. This module imports no table: each family's rows import it.
"""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass
from string import Formatter
from typing import TYPE_CHECKING, Iterable, Iterator, Mapping

from .ops import Op

if TYPE_CHECKING:  # the config module imports the planner lazily; no import of it is needed at run time here
    from ..config import ErnieConfig

__all__ = ["Split", "Row", "Item", "SCOPES", "IGNORED", "dims", "resolve", "expand_rows", "ignored_reason",
           "effective_tie"]  # fmt: skip


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


Shape = tuple[int | str, ...]

# scope -> which instances exist (see _instances): "model" once; "untied" once when the head is untied
# (effective_tie); "layer" every layer; "dense" / "moe" layers of that type; "shared" MoE layers when
# moe_num_shared_experts > 0; "expert" / "vision_expert" every expert of every MoE layer; "vision_block" every ViT
# block.
SCOPES = ("model", "untied", "layer", "dense", "moe", "shared", "expert", "vision_expert", "vision_block")
_SCOPE_KEYS = {"model": set(), "untied": set(), "layer": {"L"}, "dense": {"L"}, "moe": {"L"}, "shared": {"L"},
               "expert": {"L", "X", "XV"}, "vision_expert": {"L", "X", "XV"}, "vision_block": {"B"}}  # fmt: skip


def _placeholders(patterns: Iterable[str]) -> set[str]:
    return {f for p in patterns for _, f, _, _ in Formatter().parse(p) if f}


def _instance_keys(keys: set[str]) -> set[str]:
    """Placeholders up to renaming: ``{XV}`` (= E + X) names the same instance as ``{X}``."""
    return {"X" if k == "XV" else k for k in keys}


@dataclass(frozen=True)
class Row:
    hf: tuple[str, ...]
    mg: tuple[str, ...]
    op: Op
    split: Split
    scope: str
    hf_shapes: tuple[Shape, ...]

    def __post_init__(self) -> None:
        if self.scope not in SCOPES:
            raise ValueError(f"unknown scope {self.scope!r}")
        if len(self.hf) != self.op.n_hf or len(self.mg) != self.op.n_mg or len(self.hf_shapes) != self.op.n_hf:
            raise ValueError(f"row {self.hf} -> {self.mg}: arity does not match {self.op.describe()}")
        if self.split.dim is not None and self.split.dim not in self.op.shardable_dims:
            raise ValueError(f"row {self.mg}: {self.op.describe()} does not commute with a {self.split.value} split")
        if self.op.mg_blocks > 1 and not (self.op.verbatim and self.op.mg_blocks == self.op.n_hf):
            raise ValueError(f"row {self.mg}: {self.op.describe()}'s blocks must be its inputs, unchanged")
        hf_keys, mg_keys = _placeholders(self.hf), _placeholders(self.mg)
        if not hf_keys | mg_keys <= _SCOPE_KEYS[self.scope]:
            raise ValueError(f"row {self.hf}: placeholders {sorted(hf_keys | mg_keys)} do not exist in scope "
                             f"{self.scope!r}")  # fmt: skip
        # a placeholder the target names lack folds many instances into one target: only a gathering op may do that
        hf_keys, mg_keys = _instance_keys(hf_keys), _instance_keys(mg_keys)
        if bool(hf_keys - mg_keys) != self.op.gathers or not mg_keys <= hf_keys:
            raise ValueError(f"row {self.hf} -> {self.mg}: only a gathering op folds instances ({self.op.describe()}, "
                             f"placeholders {sorted(hf_keys)} -> {sorted(mg_keys)})")  # fmt: skip


@dataclass(frozen=True)
class Item:
    """One concrete row instance: these HF tensors ⇄ these Megatron (or GGUF) tensors."""

    hf: tuple[str, ...]
    mg: tuple[str, ...]
    op: Op
    split: Split
    hf_shapes: tuple[tuple[int, ...], ...]
    layer: int | None = None
    expert: int | None = None  # pool-local expert index (EP placement)


# Tensors deliberately left out of every target format, with the reason. Anchored full-key patterns only.
IGNORED: dict[str, str] = {
    r"(model\.)?mtp_(block|emb_norm|hidden_norm|linear_proj)\.\d+\..+": (
        "multi-token-prediction (MTP) head of the PT checkpoints: not part of the ERNIE 4.5 forward pass "
        "(transformers ignores it too, _keys_to_ignore_on_load_unexpected=['mtp']; llama.cpp's ERNIE 4.5 "
        "architectures have no MTP tensors and its converter skips them, Ernie4_5MoeModel.filter_tensors); the "
        "offline converter carries it through a torch_dist checkpoint unchanged"
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


def dims(cfg: ErnieConfig) -> dict[str, int]:
    """The named dims a row's ``hf_shapes`` may use: ``V`` vocab, ``H`` hidden, ``Q`` = heads·head_dim, ``K`` =
    kv_heads·head_dim, ``I`` dense FFN width, ``E`` experts, ``F`` (text) expert FFN width, ``S`` shared-expert FFN
    width; ``1`` is one."""
    return {
        "1": 1,
        "V": cfg.vocab_size,
        "H": cfg.hidden_size,
        "Q": cfg.num_attention_heads * cfg.head_dim,
        "K": cfg.num_key_value_heads * cfg.head_dim,
        "I": cfg.intermediate_size,
        "E": cfg.moe_num_experts or 0,
        "F": cfg.moe_intermediate_size[0] if cfg.is_moe else 0,
        "S": cfg.shared_expert_intermediate_size,
    }


def resolve(shape: Shape, named: Mapping[str, int]) -> tuple[int, ...]:
    """A row's shape with its named dims replaced by their values."""
    return tuple(named[d] if isinstance(d, str) else d for d in shape)


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


def expand_rows(rows: Iterable[Row], cfg: ErnieConfig, *, tied: bool) -> list[Item]:
    """Every concrete (HF names ⇄ model-side names) pair of ``rows`` for this config, in row order, each row's
    instances in scope order. A gathering row gives one item per target name, its HF names in instance order."""
    named = dims(cfg)
    items = []
    for row in rows:
        shapes = tuple(resolve(s, named) for s in row.hf_shapes)
        groups: dict[tuple[str, ...], list[Mapping[str, int]]] = {}
        for sub in _instances(cfg, row.scope, tied):
            groups.setdefault(tuple(p.format(**sub) for p in row.mg), []).append(sub)
        for mg, subs in groups.items():
            items.append(
                Item(
                    hf=tuple(p.format(**sub) for sub in subs for p in row.hf),
                    mg=mg,
                    op=row.op,
                    split=row.split,
                    hf_shapes=shapes * len(subs),
                    layer=subs[0].get("L"),
                    expert=None if row.op.gathers else subs[0].get("X"),
                )
            )
    return items
