"""Where each Megatron tensor lives for a parallel layout: PP stage and virtual chunk, EP rank, local name, TP slice.

Pure functions of (config, layout): no process group, no model. The live loader/exporter and the offline converter
use the same answers, so a checkpoint written offline always lands where a live model expects it.

* Layers: global ``decoder.layers.{L}`` ⇄ local ``decoder.layers.{L - stage_start}`` on the owning (pp, vp) chunk,
  as computed by Megatron's own offset functions (``Layout.layer_owner``).
* Experts: global expert ``X`` lives on EP rank ``X // (E/ep)`` as local ``j = X % (E/ep)`` (reference §H.7), in each
  pool. SequentialMLP names carry ``local_experts.{j}``; TE GroupedMLP names carry ``linear_fc{1,2}.weight{j}``.
* Embedding on the first chunk; final norm and untied head on the last. With a *tied* head and PP > 1 the last chunk
  holds a copy of the embedding as ``output_layer.weight`` (Megatron's shared embedding): loaded from the same
  tensor, never exported (``primary=False``).
* TP: :class:`Split` says which dim is cut into ``tp`` (or expert-TP) equal chunks; the vocab is zero-padded to a
  multiple of TP.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from ..config import ErnieConfig
from ..layout import Layout
from .tables import Item, Split

__all__ = ["Placement", "placements", "shard_bounds", "to_grouped_name", "from_grouped_name"]

_LAYER_RE = re.compile(r"(?P<pre>(?:language_model\.)?decoder\.layers\.)(?P<L>\d+)(?P<rest>\..+)")
_EXPERT_RE = re.compile(r"(?P<pre>.*\.experts\.local_experts\.)(?P<X>\d+)(?P<rest>\..+)")
_FIRST_STAGE_PREFIXES = ("embedding.", "language_model.embedding.", "vision_model.", "resampler_model.")
_LAST_STAGE_NAMES = ("output_layer.weight", "decoder.final_layernorm.weight")


@dataclass(frozen=True)
class Placement:
    pp: int
    vp: int
    ep: int | None  # None: present on every EP rank (not an expert tensor)
    local: str  # name inside that chunk's state dict
    primary: bool = True  # False: a copy that is loaded but never exported (tied head on the last stage)


def placements(cfg: ErnieConfig, layout: Layout, owner: dict[int, tuple[int, int]], mg: str, item: Item, *, tied: bool):
    """Every (chunk, EP rank, local name) holding global Megatron tensor ``mg``."""
    last = (layout.pp - 1, layout.vpp - 1)
    ep = None
    local = mg
    if item.split.is_expert:
        per = cfg.moe_num_experts // layout.ep
        m = _EXPERT_RE.fullmatch(local)
        x = int(m["X"])
        ep = x // per
        local = f"{m['pre']}{x % per}{m['rest']}"
    m = _LAYER_RE.fullmatch(local)
    if m:
        layer = int(m["L"])
        pp, vp = owner[layer]
        start = min(k for k, v in owner.items() if v == (pp, vp))
        return [Placement(pp, vp, ep, f"{m['pre']}{layer - start}{m['rest']}")]
    if local.startswith(_FIRST_STAGE_PREFIXES):
        out = [Placement(0, 0, ep, local)]
        is_embedding = local.endswith("embedding.word_embeddings.weight")
        if is_embedding and tied and last != (0, 0):
            head = local.replace("embedding.word_embeddings.weight", "output_layer.weight")
            out.append(Placement(*last, ep, head, primary=False))
        return out
    if local.endswith(_LAST_STAGE_NAMES):
        return [Placement(*last, ep, local)]
    raise ValueError(f"no placement rule for Megatron tensor {mg}")


def shard_bounds(split: Split, full: int, n: int, i: int, *, pad_to: int | None = None) -> tuple[int, int, int]:
    """Rows/cols ``[a, b)`` of the source held by shard ``i`` of ``n`` along ``split.dim``, plus zero-padding.

    ``pad_to`` (vocab only) is the padded length; the returned padding is how many zero rows follow ``[a, b)``.
    """
    total = pad_to if pad_to is not None else full
    if total % n:
        raise ValueError(f"{split.value} split of {total} into {n} shards is uneven")
    per = total // n
    a, b = i * per, (i + 1) * per
    real_b = min(b, full)
    real_a = min(a, real_b)
    return real_a, real_b, (b - a) - (real_b - real_a)


_SEQ_RE = re.compile(r"(?P<pre>.*\.experts\.)local_experts\.(?P<j>\d+)\.(?P<fc>linear_fc[12])\.weight")
_GROUPED_RE = re.compile(r"(?P<pre>.*\.experts\.)(?P<fc>linear_fc[12])\.weight(?P<j>\d+)")


def to_grouped_name(local: str) -> str:
    """SequentialMLP local name → TE GroupedMLP name (``local_experts.{j}.linear_fc1.weight`` → ``linear_fc1.weight{j}``)."""
    m = _SEQ_RE.fullmatch(local)
    return f"{m['pre']}{m['fc']}.weight{m['j']}" if m else local


def from_grouped_name(local: str) -> str:
    m = _GROUPED_RE.fullmatch(local)
    return f"{m['pre']}local_experts.{m['j']}.{m['fc']}.weight" if m else local
