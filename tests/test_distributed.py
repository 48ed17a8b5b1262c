"""2 processes on gloo (TP2, EP2, PP2, TP2·EP2, PP2·VPP2, uneven PP2) == 1 process and transformers over the union
of the ranks' samples (the data-parallel ranks -- EP2's two -- run different ones), and live export is bit-exact."""

from __future__ import annotations

import json

import pytest
import torch.multiprocessing as mp

from conftest import free_port
from dist_worker import LAYOUTS, worker
from ernie45.bridge.io import HFCheckpoint
from ernie45.testing import assert_bit_exact

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
    """Each data-parallel rank ran its own samples: logits, loss and reduced gradients equal the 1-process
    Megatron run and transformers' forward+backward over the union of the ranks' samples."""
    _, results, _ = dist_run
    r = results[case]
    print(case, r)
    assert r["logits"] <= 1e-5 and r["logits_vs_hf"] <= 1e-4, r
    assert r["loss"] <= 1e-5 and r["loss_vs_hf"] <= 1e-5, r
    assert r["grad_names"] and r["n_grads"] > 0, r
    assert r["grads"] <= 1e-5, r
    assert r["grads_rel_vs_hf"] <= 1e-4, r


def test_data_parallel_ranks_got_different_samples(dist_run):
    """Not vacuous: the EP2 layout is data parallel 2, so its two ranks ran different halves of the union."""
    _, results, _ = dist_run
    assert results["moe-EP2"]["data_parallel"] == 2
    assert {results[c]["data_parallel"] for c in CASES if "EP2" not in c or "TP2" in c} == {1}


@pytest.mark.parametrize("case", CASES)
def test_live_export_is_bit_exact(case, dist_run):
    out, _, ckpts = dist_run
    src = HFCheckpoint(ckpts[case.split("-")[0]])
    dst = HFCheckpoint(out / case)
    assert sorted(dst.keys()) == sorted(src.keys())
    for name in src.keys():
        assert dst.dtype(name) == src.dtype(name)
        assert_bit_exact(dst.get(name), src.get(name), name)
    assert (out / case / "config.json").is_file() and (out / case / "generation_config.json").is_file()


def test_offline_checkpoint_loads_into_live_models_at_two_layouts(tiny_ckpts, tmp_path):
    """HF -> torch_dist written offline at TP2·PP2·EP2, loaded by Megatron's own dist_checkpointing.load at TP2 and
    at EP2 (2 gloo processes): logits equal transformers' on the HF source."""
    from dist_worker import offline_load_diffs
    from ernie45.convert import convert

    hf_dir = tiny_ckpts["moe-tied"]
    convert(hf_dir, tmp_path / "mg", to="megatron", tp=2, pp=2, ep=2, progress=False)
    results = offline_load_diffs(hf_dir, tmp_path / "mg", tmp_path, seed=4)
    assert "error" not in results, results.get("error")
    assert results["TP2"] <= 1e-4 and results["EP2"] <= 1e-4, results

    # checkpoints written by Megatron's dist_checkpointing.save from the live TP2 and EP2 models (no config.json,
    # no ernie45.json): back to HF bit-exact, and resharded offline
    src = HFCheckpoint(hf_dir)
    for name in ("TP2", "EP2"):
        saved = tmp_path / f"saved-{name}"
        convert(saved, tmp_path / f"hf-{name}", to="hf", hf_config=hf_dir, progress=False)
        convert(saved, tmp_path / f"resharded-{name}", to="megatron", pp=2, ep=4, hf_config=hf_dir, progress=False)
        convert(tmp_path / f"resharded-{name}", tmp_path / f"hf2-{name}", to="hf", progress=False)
        for out in (tmp_path / f"hf-{name}", tmp_path / f"hf2-{name}"):
            back = HFCheckpoint(out)
            assert sorted(back.keys()) == sorted(src.keys())
            for key in src.keys():
                assert_bit_exact(back.get(key), src.get(key), (out, key))
