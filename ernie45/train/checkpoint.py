"""Training checkpoints through Megatron-Core's ``dist_checkpointing.save`` (torch_dist), resumable at any layout.

Run directory::

    RUN/checkpoints/step_0000005/      one torch_dist checkpoint: model, optimizer (Adam moments as ShardedTensors
                                       that follow the parameters' sharding), trainer state (scheduler, step,
                                       consumed rows, run config) and every rank's RNG state
    RUN/checkpoints/step_0000005/complete   written last, once every rank has finished writing
    RUN/checkpoints/latest             the name of the newest complete step directory (replaced atomically)

A step is written under ``step_XXXXXXX.partial`` and renamed only when every rank is done, so a process killed while
saving leaves a ``.partial`` directory that is never resumed from (and is removed by the next save).
Non-tensor state travels in Megatron's common state (``common.pt``), which Megatron reads with ``torch.load``'s
default ``weights_only=True``: plain data only, no arbitrary unpickling.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import torch
import torch.distributed as dist

from ..config import ConfigError

__all__ = ["CHECKPOINTS", "latest_step", "step_dir", "save_checkpoint", "load_checkpoint", "CheckpointStateError"]

CHECKPOINTS = "checkpoints"
LATEST = "latest"
COMPLETE = "complete"


class CheckpointStateError(ConfigError):
    """A run directory whose checkpoints cannot be resumed (none complete, or a dangling ``latest``)."""


def step_dir(run_dir: str | Path, step: int) -> Path:
    return Path(run_dir) / CHECKPOINTS / f"step_{step:07d}"


def latest_step(run_dir: str | Path) -> int | None:
    """The step of the newest complete checkpoint, or None when the run has none."""
    latest = Path(run_dir) / CHECKPOINTS / LATEST
    if not latest.is_file():
        return None
    name = latest.read_text().strip()
    d = Path(run_dir) / CHECKPOINTS / name
    if not name.startswith("step_") or not (d / COMPLETE).is_file():
        raise CheckpointStateError(f"{latest} names {name!r}, which is not a complete checkpoint")
    return int(name[len("step_") :])


def _rng_object(rank: int, world: int):
    from megatron.core.dist_checkpointing.mapping import ShardedObject

    state = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return ShardedObject("rng_state", state, (world,), (rank,), replica_id=0)


def save_checkpoint(run_dir: str | Path, step: int, state: dict) -> Path:
    """Write ``state`` (a Megatron sharded state dict) as step ``step``; every rank must call."""
    from megatron.core import dist_checkpointing

    rank, world = dist.get_rank(), dist.get_world_size()
    final = step_dir(run_dir, step)
    partial = final.with_name(final.name + ".partial")
    if rank == 0:
        for stale in final.parent.glob("*.partial"):
            shutil.rmtree(stale)
        partial.mkdir(parents=True)
    dist.barrier()
    state = dict(state, rng=_rng_object(rank, world))
    dist_checkpointing.save(state, str(partial))
    dist.barrier()
    if rank == 0:
        if final.exists():
            shutil.rmtree(final)
        os.replace(partial, final)
        (final / COMPLETE).write_text(f"step {step}\n")
        tmp = final.parent / (LATEST + ".tmp")
        tmp.write_text(final.name + "\n")
        os.replace(tmp, final.parent / LATEST)
    dist.barrier()
    return final


def load_checkpoint(run_dir: str | Path, step: int, state: dict, *, with_rng: bool) -> dict:
    """Load step ``step`` into the sharded state dict ``state`` (resharded to this layout); every rank calls.

    ``with_rng``: restore this rank's RNG state too (only meaningful at the world size it was saved with).
    """
    from megatron.core import dist_checkpointing

    if with_rng:
        state = dict(state, rng=_rng_object(dist.get_rank(), dist.get_world_size()))
    loaded = dist_checkpointing.load(state, str(step_dir(run_dir, step)))
    if with_rng:
        rng = loaded.pop("rng")
        torch.set_rng_state(rng["cpu"])
        if "cuda" in rng and torch.cuda.is_available():
            torch.cuda.set_rng_state(rng["cuda"])
    return loaded
