"""Totality: a conversion plan is checked before any byte moves.

Every source tensor is consumed exactly once (or is listed in the declared ignore table with its reason), every
target is produced exactly once, and every source shape is the one the config implies. Otherwise
:class:`PlanError` lists *every* offender, not just the first.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Iterable, Mapping

import torch

from ..config import ErnieConfig
from ..errors import InputError
from .tables import Item, effective_tie, expand, ignored_reason

__all__ = ["PlanError", "Plan", "plan_from_hf", "plan_from_megatron"]


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
    _check_table(items)
    expected = {n: s for it in items for n, s in zip(it.hf, it.hf_shapes)}
    ignored = [(n, why) for n in shapes if n not in expected and (why := ignored_reason(n)) is not None]
    ignored_names = {n for n, _ in ignored}
    missing = sorted(n for n in expected if n not in shapes)
    unexpected = sorted(n for n in shapes if n not in expected and n not in ignored_names)
    wrong = sorted(
        f"{n}: has {list(shapes[n])}, config implies {list(expected[n])}"
        for n in expected
        if n in shapes and tuple(shapes[n]) != tuple(expected[n])
    )
    not_float = sorted(
        f"{n}: {str(dtypes[n]).replace('torch.', '')}, a weight must be a floating-point tensor"
        for n in expected
        if dtypes is not None and n in dtypes and not dtypes[n].is_floating_point
    )
    _fail(
        f"{where} does not match its config ({cfg.family}, {cfg.num_hidden_layers} layers)",
        {"missing tensors": missing, "unexpected tensors": unexpected, "wrong shapes": wrong, "wrong dtypes": not_float},
    )
    return Plan(cfg, tied, items, sorted(ignored))


def plan_from_megatron(cfg: ErnieConfig, names: Iterable[str], *, tied: bool, where: str = "model") -> Plan:
    """Plan Megatron (global names) → HF."""
    items = expand(cfg, tied=tied)
    _check_table(items)
    names = set(names)
    expected = {n for it in items for n in it.mg}
    _fail(
        f"{where} does not match its config ({cfg.family}, {cfg.num_hidden_layers} layers)",
        {"missing tensors": sorted(expected - names), "unexpected tensors": sorted(names - expected)},
    )
    return Plan(cfg, tied, items)
