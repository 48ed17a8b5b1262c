"""2 processes on gloo (TP2, EP2, PP2, TP2·EP2, PP2·VPP2, uneven PP2) == 1 process, and live export is bit-exact."""

from __future__ import annotations

import json

import pytest
import torch
import torch.multiprocessing as mp

from conftest import free_port
from dist_worker import LAYOUTS, worker
from ernie45.bridge.io import HFCheckpoint

CASES = [f"{fam}-{name}" for name, (_, fams) in LAYOUTS.items() for fam in fams]


@pytest.fixture(scope="module")
def dist_run(tiny_ckpts, tmp_path_factory):
    out = tmp_path_factory.mktemp("dist")
    ckpts = {"dense": str(tiny_ckpts["dense"]), "moe": str(tiny_ckpts["moe-tied"])}
    mp.spawn(worker, args=(free_port(), ckpts, str(out)), nprocs=2, join=True)
    results = json.loads((out / "results.json").read_text())
    assert "error" not in results, results.get("error")
    return out, results, ckpts


@pytest.mark.parametrize("case", CASES)
def test_layout_equals_single_process(case, dist_run):
    _, results, _ = dist_run
    r = results[case]
    assert r["logits"] <= 1e-5, r
    assert r["loss"] <= 1e-5, r
    assert r["grad_names"], r
    assert r["grads"] <= 1e-5, r


@pytest.mark.parametrize("case", CASES)
def test_live_export_is_bit_exact(case, dist_run):
    out, _, ckpts = dist_run
    src = HFCheckpoint(ckpts[case.split("-")[0]])
    dst = HFCheckpoint(out / case)
    assert sorted(dst.keys()) == sorted(src.keys())
    for name in src.keys():
        assert dst.dtype(name) == src.dtype(name)
        assert torch.equal(dst.get(name), src.get(name)), name
    assert (out / case / "config.json").is_file() and (out / case / "generation_config.json").is_file()
