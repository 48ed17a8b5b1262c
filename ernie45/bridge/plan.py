"""Totality: a conversion plan is checked before any byte moves, for either format pair.

Every source tensor is consumed exactly once (or is listed in the declared ignore table with its reason), every
target is produced exactly once, and every source shape is the one the config implies. Otherwise
:class:`PlanError` lists *every* offender, not just the first. :func:`check_source` is that check for any table's
items (HF ⇄ Megatron here, HF ⇄ GGUF in ``gguf.py``); :func:`megatron_rows` / :func:`expand` are the HF ⇄ Megatron
table of a config's family.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Iterable, Mapping

import torch

from ..errors import InputError
from .tables import Item, Row, effective_tie, expand_rows, ignored_reason
from .text_table import text_rows
from .vl_table import vl_rows

if TYPE_CHECKING:
    from ..config import ErnieConfig

__all__ = ["PlanError", "Plan", "megatron_rows", "expand", "parameter_counts", "check_source", "plan_from_hf"]


class PlanError(InputError):
    """The source does not match the model the config describes."""


@dataclass
class Plan:
    cfg: ErnieConfig
    tied: bool
    items: list[Item]
    ignored: list[tuple[str, str]] = field(default_factory=list)  # (source name, reason)

    @property
    def hf_names(self) -> list[str]:
        return [n for it in self.items for n in it.hf]

    @property
    def mg_names(self) -> list[str]:
        return [n for it in self.items for n in it.mg]

    def by_mg(self) -> dict[str, Item]:
        return {n: it for it in self.items for n in it.mg}

    def by_hf(self) -> dict[str, Item]:
        return {n: it for it in self.items for n in it.hf}


def megatron_rows(cfg: ErnieConfig) -> tuple[Row, ...]:
    """The HF ⇄ Megatron table of this config's family (the VL on-disk layout is its own format pair)."""
    return vl_rows(cfg) if cfg.family == "vl" else text_rows(cfg)


def expand(cfg: ErnieConfig, *, tied: bool) -> list[Item]:
    """Every concrete (HF names ⇄ Megatron names) pair for this config, in a deterministic order."""
    return expand_rows(megatron_rows(cfg), cfg, tied=tied)



def parameter_counts(cfg: ErnieConfig) -> tuple[int, int]:
    """(total, active-per-token) parameters. Total: every tensor the HF checkpoint of this config holds (the
    bridge table's shapes: language model, ViT and resampler, expert bias; a tied head once). Active: what one
    text token passes through -- all but the routed experts it does not use (E - K of the pool's E per MoE
    layer) and, for VL, the ViT, the resampler and the vision pool (so 28B-A3B comes out at ~3.3B)."""
    E, K = cfg.moe_num_experts or 1, cfg.moe_k or 1
    total = idle = 0
    for item in expand(cfg, tied=cfg.tie_word_embeddings):
        n = sum(math.prod(shape) for shape in item.hf_shapes)
        total += n
        # an item's Megatron pieces are equal parts of it (e.g. the [2, E] VL expert bias: text, vision)
        vision = sum(m.startswith(("vision_model.", "resampler_model.")) or ".vision_moe_layer." in m
                     for m in item.mg)  # fmt: skip
        idle += n * vision // len(item.mg)
        if item.expert is not None and not vision:
            idle += n * (E - K) // E
    return total, total - idle

def _fail(title: str, groups: Mapping[str, list[str]]) -> None:
    lines = [f"{title}:"]
    for what, names in groups.items():
        if names:
            lines.append(f"  {what} ({len(names)}):")
            lines.extend(f"    {n}" for n in names)
    if len(lines) > 1:
        raise PlanError("\n".join(lines))


def _check_table(items: list[Item]) -> None:
    """The table itself must produce each name once (a table bug, caught before any input is blamed)."""
    for side in ("hf", "mg"):
        dup = [n for n, c in Counter(n for it in items for n in getattr(it, side)).items() if c > 1]
        _fail(f"bridge table maps these {side} names more than once", {"duplicated": dup})


def check_source(
    items: list[Item],
    names: Iterable[str],
    *,
    shapes: Mapping[str, tuple[int, ...]] | None = None,
    dtypes: Mapping[str, torch.dtype] | None = None,
    title: str,
) -> list[tuple[str, str]]:
    """A source's tensor names (and shapes and dtypes, when it can tell them without reading: weights must be
    floats) against a table's items: every tensor consumed once or declared ignored, every shape the config's.
    Returns the ignored (name, reason) pairs, sorted; raises :class:`PlanError` listing every offender."""
    _check_table(items)
    names = set(names)
    expected = {n: s for it in items for n, s in zip(it.hf, it.hf_shapes)}
    ignored = [(n, why) for n in names if n not in expected and (why := ignored_reason(n)) is not None]
    ignored_names = {n for n, _ in ignored}
    missing = sorted(n for n in expected if n not in names)
    unexpected = sorted(n for n in names if n not in expected and n not in ignored_names)
    wrong = sorted(
        f"{n}: has {list(shapes[n])}, config implies {list(expected[n])}"
        for n in expected
        if shapes is not None and n in shapes and tuple(shapes[n]) != tuple(expected[n])
    )
    not_float = sorted(
        f"{n}: {str(dtypes[n]).replace('torch.', '')}, a weight must be a floating-point tensor"
        for n in expected
        if dtypes is not None and n in dtypes and not dtypes[n].is_floating_point
    )
    _fail(title, {"missing tensors": missing, "unexpected tensors": unexpected, "wrong shapes": wrong,
                  "wrong dtypes": not_float})  # fmt: skip
    return sorted(ignored)


def plan_from_hf(
    cfg: ErnieConfig,
    shapes: Mapping[str, tuple[int, ...]],
    *,
    dtypes: Mapping[str, torch.dtype] | None = None,
    where: str = "checkpoint",
) -> Plan:
    """Plan HF → Megatron for a source with these tensor names and shapes (and dtypes: weights must be floats)."""
    tied = effective_tie(cfg, shapes)
    items = expand(cfg, tied=tied)
    title = f"{where} does not match its config ({cfg.family}, {cfg.num_hidden_layers} layers)"
    return Plan(cfg, tied, items, check_source(items, shapes, shapes=shapes, dtypes=dtypes, title=title))
