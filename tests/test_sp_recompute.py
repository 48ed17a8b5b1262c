"""Sequence parallelism and activation recompute (2 gloo processes, one spawn): TP2 + SP, and TP2 + SP with
selective / full recompute, give the TP1 loss and gradients -- dense, text MoE, VL, and a packed VL row.

MoE with TP > 1 in training *requires* sequence parallelism in Megatron (``MoELayer`` raises otherwise), so every
TP2 case here runs with SP. The worker is ``feature_worker.py``.
"""

from __future__ import annotations

import json

import pytest
import torch.multiprocessing as mp

from conftest import free_port
from feature_worker import FAMILIES, worker

TOL = 1e-5
RESULTS = [f"{family}/{case}" for family, cases in FAMILIES.items() for case in cases]


@pytest.fixture(scope="module")
def sp_results(tiny_ckpts, tmp_path_factory):
    from ernie45.testing import write_tiny_checkpoint

    root = tmp_path_factory.mktemp("sp")
    # the session's tiny dense (tied) and MoE (untied) checkpoints, and a tiny VL one
    hf_dirs = {"dense": str(tiny_ckpts["dense"]), "moe": str(tiny_ckpts["moe"])}
    hf_dirs["vl"] = str(write_tiny_checkpoint(root / "vl", "vl", seed=5))
    mp.spawn(worker, args=(free_port(), hf_dirs, str(root)), nprocs=2, join=True)
    results = json.loads((root / "results.json").read_text())
    assert "error" not in results, results.get("error")
    return results


@pytest.mark.parametrize("case", RESULTS)
def test_tp2_sequence_parallel_and_recompute_equal_tp1(case, sp_results):
    r = sp_results[case]
    assert r["same_grad_names"] and r["n_grads"] > 0, r
    assert r["loss"] <= TOL, r
    assert r["grads"] <= TOL, r
    if not case.startswith("vl"):  # text: the gradients also equal transformers' own backward
        assert r["grads_rel_vs_hf"] <= 1e-4, r


@pytest.mark.parametrize("case", RESULTS)
def test_recompute_really_recomputes(case, sp_results):
    """Recompute runs every attention forward a second time in backward; without it, once per layer."""
    r = sp_results[case]
    assert r["ref_attention_calls_per_layer"] == 1.0, r
    expected = 1.0 if case.endswith("TP2-SP") else 2.0
    assert r["attention_calls_per_layer"] == expected, r
