"""How weights move into and out of a live (distributed) Megatron model.

:func:`load_hf` — every rank reads only its own slices from the HF safetensors (lazily, ``get_slice``), applies the
table's op to those slices and copies the result into its parameters. Strict: the HF side must satisfy the plan
(``plan.py``) and the model's state dict must hold exactly the tensors the layout places on this rank.

:func:`gather_hf` / :func:`export_hf` — every rank turns its primary shards back into HF slices (the op's inverse),
rank 0 collects them with point-to-point sends, concatenates the slices and writes sharded safetensors with an
index, ``config.json``, the ``ernie45.json`` checksum record (``bridge.io.write_hf_files``, the offline
converter's writer) and the source's tokenizer/processor files.

The head's tie is the source's (``bridge.source``: ``source.tied``, decided once when the checkpoint is opened):
build the model with it and export with it. It is a required argument of the export, never the config's value,
because a checkpoint whose config says tied may store ``lm_head.weight`` (transformers then loads it untied).
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist

from ..config import ErnieConfig
from ..layout import Layout
from .io import HFCheckpoint, atomic_output, copy_side_files, read_hf_slices, side_files_of, write_hf_files
from .layout import Placement, from_grouped_name, placements, shard_bounds
from .plan import Plan, PlanError, expand, plan_from_hf
from .tables import Item, Split

__all__ = ["load_hf", "gather_hf", "export_hf", "RankCoords"]


class RankCoords:
    """This process's coordinates in Megatron's process groups."""

    def __init__(self) -> None:
        from megatron.core import parallel_state as ps

        self.pp = ps.get_pipeline_model_parallel_rank()
        self.ep = ps.get_expert_model_parallel_rank()
        self.tp, self.tp_size = ps.get_tensor_model_parallel_rank(), ps.get_tensor_model_parallel_world_size()
        self.etp, self.etp_size = ps.get_expert_tensor_parallel_rank(), ps.get_expert_tensor_parallel_world_size()
        self.dp = ps.get_data_parallel_rank()
        self.edp = ps.get_expert_data_parallel_rank()

    def shard(self, split: Split) -> tuple[int, int]:
        """(index, count) of this rank's slice for a tensor split this way."""
        if split is Split.REPLICATED:
            return 0, 1
        if split.is_expert:
            return self.etp, self.etp_size
        return self.tp, self.tp_size

    def is_primary(self, split: Split) -> bool:
        """Exactly one replica of every shard exports: data-parallel rank 0 of its kind, TP rank 0 if unsplit."""
        return (self.edp if split.is_expert else self.dp) == 0 and (split is not Split.REPLICATED or self.tp == 0)


def _local_targets(plan: Plan, layout: Layout, coords: RankCoords, n_chunks: int):
    """chunk -> {local name: (item, position in item.mg, placement)} for this rank."""
    cfg = plan.cfg
    owner = layout.layer_owner(cfg)
    targets: list[dict[str, tuple[Item, int, Placement]]] = [{} for _ in range(n_chunks)]
    for item in plan.items:
        for k, mg in enumerate(item.mg):
            for pl in placements(cfg, layout, owner, mg, item, tied=plan.tied):
                if pl.pp == coords.pp and (pl.ep is None or pl.ep == coords.ep):
                    targets[pl.vp][pl.local] = (item, k, pl)
    return targets


def _model_tensors(chunk: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Persistent parameters and buffers, under SequentialMLP names (GroupedMLP names are translated)."""
    return {
        from_grouped_name(n): t for n, t in chunk.state_dict(keep_vars=True).items() if not n.endswith("._extra_state")
    }


def _check_names(targets: dict, tensors: dict, chunk_index: int) -> None:
    missing = sorted(set(targets) - set(tensors))
    unexpected = sorted(set(tensors) - set(targets))
    if missing or unexpected:
        lines = [f"model chunk {chunk_index} does not hold the tensors the layout places on this rank:"]
        if missing:
            lines += [f"  expected but absent ({len(missing)}):"] + [f"    {n}" for n in missing]
        if unexpected:
            lines += [f"  present but unmapped ({len(unexpected)}):"] + [f"    {n}" for n in unexpected]
        raise PlanError("\n".join(lines))


def load_hf(chunks: list[torch.nn.Module], cfg: ErnieConfig, layout: Layout, source) -> Plan:
    """Load HF-named tensors into this rank's model chunks. Returns the plan (with the ignored tensors).

    ``source`` is an HF directory, an :class:`HFCheckpoint`, or any HF-named source with ``path``, ``shapes()``,
    ``dtypes()`` and ``read(name, dim, start, stop)`` (``ernie45.bridge.source.open_source``: HF or torch_dist).
    """
    ckpt = HFCheckpoint(source) if isinstance(source, (str, Path)) else source
    plan = plan_from_hf(cfg, ckpt.shapes(), dtypes=ckpt.dtypes(), where=str(ckpt.path))
    coords = RankCoords()
    targets = _local_targets(plan, layout, coords, len(chunks))
    for v, chunk in enumerate(chunks):
        tensors = _model_tensors(chunk)
        _check_names(targets[v], tensors, v)
        done: dict[int, tuple[torch.Tensor, ...]] = {}
        for local, (item, k, _pl) in targets[v].items():
            key = id(item)
            if key not in done:
                index, count = coords.shard(item.split)
                done[key] = item.op.to_mg(read_hf_slices(ckpt, item, index, count, cfg))
            value, param = done[key][k], tensors[local]
            if tuple(value.shape) != tuple(param.shape):
                raise PlanError(f"{local}: model shard has shape {list(param.shape)}, checkpoint gives {list(value.shape)}")
            with torch.no_grad():
                param.copy_(value.to(param.dtype))
    return plan


# ---------------------------------------------------------------------------------------------------------------
# export


def _local_pieces(plan: Plan, layout: Layout, coords: RankCoords, chunks, getter):
    """[(item index, shard index, shard count, HF slices)] this rank exports."""
    targets = _local_targets(plan, layout, coords, len(chunks))
    index_of = {id(it): i for i, it in enumerate(plan.items)}
    pieces = []
    for v, chunk in enumerate(chunks):
        tensors = _model_tensors(chunk)
        _check_names(targets[v], tensors, v)
        by_item: dict[int, dict[int, torch.Tensor]] = defaultdict(dict)
        for local, (item, k, pl) in targets[v].items():
            if not pl.primary or not coords.is_primary(item.split):
                continue
            value = getter(tensors[local])
            if value is not None:
                by_item[id(item)][k] = value.detach()
        for key, parts in by_item.items():
            item = plan.items[index_of[key]]
            if len(parts) != item.op.n_mg:
                raise PlanError(f"{item.mg}: only {len(parts)} of {item.op.n_mg} tensors live on one rank")
            mg = tuple(parts[k] for k in range(item.op.n_mg))
            index, count = coords.shard(item.split)
            hf = item.op.to_hf(mg)
            if item.split is Split.VOCAB:  # drop the zero rows that pad the vocab to a multiple of TP
                V = item.hf_shapes[0][0]
                pad_to = -(-V // count) * count
                a, b, _ = shard_bounds(item.split, V, count, index, pad_to=pad_to)
                hf = tuple(t[: b - a] for t in hf)
            pieces.append((index_of[key], index, count, hf))
    return pieces


def gather_hf(
    chunks: list[torch.nn.Module],
    cfg: ErnieConfig,
    layout: Layout,
    *,
    tied: bool,
    getter: Callable[[torch.Tensor], torch.Tensor | None] | None = None,
    dst: int = 0,
) -> dict[str, torch.Tensor] | None:
    """Full HF-named tensors of a live model on rank ``dst`` (None elsewhere).

    ``getter`` picks what to export from each parameter (``lambda p: p.grad`` gathers gradients; a None result
    skips that tensor). Without a getter every tensor of the plan must arrive. ``tied``: the model's head tie, as
    it was built (``source.tied``).
    """
    require_all = getter is None
    getter = getter or (lambda t: t)
    coords = RankCoords()
    rank, world = dist.get_rank(), dist.get_world_size()
    plan = Plan(cfg, tied, expand(cfg, tied=tied))
    pieces = _local_pieces(plan, layout, coords, chunks, getter)
    meta = [(i, s, n, [(tuple(t.shape), t.dtype) for t in hf]) for i, s, n, hf in pieces]
    all_meta: list = [None] * world
    dist.all_gather_object(all_meta, meta)
    if rank != dst:
        for _, _, _, hf in pieces:
            for t in hf:
                dist.send(t.contiguous(), dst)
        return None
    received: dict[int, dict[int, tuple[torch.Tensor, ...]]] = defaultdict(dict)
    counts: dict[int, int] = {}
    for r in range(world):
        for j, (i, s, n, shapes) in enumerate(all_meta[r]):
            if r == dst:
                hf = pieces[j][3]
            else:
                hf = tuple(torch.empty(shape, dtype=dtype) for shape, dtype in shapes)
                for t in hf:
                    dist.recv(t, r)
            if s in received[i]:
                raise PlanError(f"{plan.items[i].mg}: shard {s} exported twice (ranks disagree on replicas)")
            received[i][s] = hf
            counts[i] = n
    never = [n for i, it in enumerate(plan.items) if i not in received for n in it.mg]
    if require_all and never:
        raise PlanError("no rank exported these tensors:\n  " + "\n  ".join(never))
    out: dict[str, torch.Tensor] = {}
    for i, item in enumerate(plan.items):
        if i not in received:
            continue
        shards = received[i]
        if sorted(shards) != list(range(counts[i])):
            raise PlanError(f"{item.mg}: got shards {sorted(shards)} of {counts[i]}")
        for j, name in enumerate(item.hf):
            parts = [shards[s][j] for s in range(counts[i])]
            dim, blocks = item.split.dim, item.op.hf_blocks
            if len(parts) == 1:
                out[name] = parts[0]
            else:  # block j of the full tensor = block j of every shard, in shard order (ops.Op.hf_blocks)
                per_block = [torch.cat([p.chunk(blocks, dim)[j] for p in parts], dim) for j in range(blocks)]
                out[name] = torch.cat(per_block, dim)
    return out


def export_hf(
    chunks: list[torch.nn.Module],
    cfg: ErnieConfig,
    layout: Layout,
    out_dir: str | Path,
    *,
    tied: bool,
    dtype: torch.dtype | None = None,
    side_files_from: str | Path | None = None,
    overwrite: bool = False,
    max_shard_bytes: int = 5 * 2**30,
) -> Path | None:
    """Write the live model as an HF checkpoint (rank 0 writes; every rank must call). ``tied``: as for
    :func:`gather_hf`; ``side_files_from``: a checkpoint directory whose tokenizer / processor files travel along."""
    state = gather_hf(chunks, cfg, layout, tied=tied)
    if state is None:
        return None
    out_dir = Path(out_dir)
    entries = [(n, tuple(state[n].shape), state[n].dtype if dtype is None else dtype) for n in sorted(state)]
    with atomic_output(out_dir, overwrite=overwrite) as tmp:
        write_hf_files(tmp, cfg.to_hf(), entries, lambda n: state[n] if dtype is None else state[n].to(dtype),
                       max_shard_bytes=max_shard_bytes)  # fmt: skip
        if side_files_from is not None:
            copy_side_files(side_files_of(Path(side_files_from)), tmp)
    return out_dir
