"""Shared fixtures: a single-process gloo world for Megatron, tiny re-randomised HF checkpoints."""

from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.distributed as dist

if os.environ.get("PYTEST_XDIST_WORKER"):
    # the suite runs on pytest-xdist workers, one per core (README): one intra-op thread each -- and in the
    # processes they spawn, which inherit the variable -- instead of every process spinning threads on every core
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def gloo_world():
    """torch.distributed with one gloo process (Megatron needs process groups even at TP=PP=EP=1)."""
    if not dist.is_initialized():
        os.environ["MASTER_ADDR"] = "127.0.0.1"
        os.environ["MASTER_PORT"] = str(free_port())
        dist.init_process_group("gloo", rank=0, world_size=1)
    yield
    # left initialised for the session; the process exits afterwards


@pytest.fixture(scope="module")
def world1(gloo_world):
    """Megatron process groups for TP1·PP1·EP1 on the single-process gloo world, for one test module."""
    from megatron.core import parallel_state as ps

    from ernie45.layout import Layout
    from ernie45.megatron import parallel

    if ps.model_parallel_is_initialized():
        parallel.destroy()
    parallel.initialize(Layout())
    yield
    parallel.destroy()


@pytest.fixture()
def megatron(gloo_world):
    """Megatron process groups for one test; torn down after it."""
    from ernie45.megatron import parallel

    created = []

    def init(layout):
        parallel.initialize(layout)
        created.append(layout)

    yield init
    if created:
        parallel.destroy()


@pytest.fixture(scope="session")
def tiny_ckpts(tmp_path_factory):
    """family -> directory of a tiny HF checkpoint written by transformers (seed 1)."""
    from ernie45.testing import write_tiny_checkpoint

    root = tmp_path_factory.mktemp("tiny")
    out = {}
    for family in ("dense", "moe"):
        out[family] = write_tiny_checkpoint(root / family, family, seed=1)
    # tied MoE (the released 21B is tied) and an untied dense: both head variants for both families
    out["moe-tied"] = write_tiny_checkpoint(root / "moe-tied", "moe", seed=2, tie_word_embeddings=True)
    out["dense-untied"] = write_tiny_checkpoint(root / "dense-untied", "dense", seed=3, tie_word_embeddings=False)
    torch.manual_seed(0)
    return out
