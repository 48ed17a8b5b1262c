"""Trust in ``ernie45 verify`` / ``parity`` (issue 13): what they judge without being told, and the oracles behind
the numbers they print.

* **Default thresholds** mean "the same model": with no threshold given, NaN logits, a different model of the same
  shape, or a checkpoint without its expert bias FAIL (exit 1); a shape difference is reported (exit 1), not a
  traceback; the same model passes.
* **Flat (Thinking) VL checkpoints** (``model_type: ernie4_5_moe_vl``, Baidu's on-disk names) run in transformers
  as the tiny model they are (verify, parity, generate, route-stats), not as a default-sized one.
* **Text MoE with head_dim != hidden/heads** builds what transformers builds (parity against transformers).
* **parameter_counts** equals ``numel()`` of the transformers model (dense, MoE, VL incl. ViT and resampler).
* **bf16** verify / parity: both sides in bf16 (routers and expert bias fp32); agreement pinned per family.
* **The router's auxiliary loss** equals transformers' ``load_balancing_loss_func`` (its gradient, through the
  Megatron-Core model).
"""

from __future__ import annotations

import json
import math
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from ernie45.cli import main
from ernie45.convert import convert
from ernie45.testing import write_tiny_checkpoint
from ernie45.verify import verify


def _edited_copy(src, dst, edit):
    """A copy of an HF checkpoint with ``edit(name, tensor) -> tensor`` applied to every tensor."""
    shutil.copytree(src, dst)
    f = dst / "model.safetensors"
    tensors = load_file(f)
    save_file({n: edit(n, t).contiguous() for n, t in tensors.items()}, f, metadata={"format": "pt"})
    return dst


@pytest.fixture(scope="module")
def moe(tmp_path_factory):
    root = tmp_path_factory.mktemp("trust")
    hf = write_tiny_checkpoint(root / "hf", "moe", seed=5, moe_layer_interval=1)
    convert(hf, root / "mg", to="megatron", progress=False)
    return dict(root=root, hf=hf, mg=root / "mg")


# ----------------------------------------------------------------------------------------------------------------------
# default thresholds


def test_same_model_passes_under_the_default_fp32_thresholds(moe, capsys):
    r = verify(moe["hf"], moe["mg"])
    assert r.ok, r.failures()
    assert r.applied == dict(atol=1e-4, min_cosine=None, min_top1=1.0, min_routing=1.0)
    assert r.logits.cosine > 1 - 1e-9  # per-token cosine of two fp32 implementations
    assert main(["verify", str(moe["hf"]), str(moe["mg"])]) == 0
    out = capsys.readouterr().out
    assert "fp32 defaults: logits max |Δ| <= 0.0001, top-1 >= 1, routing >= 1; NaN / inf fail" in out


def test_nan_logits_fail_without_any_threshold(moe, capsys):
    nan = _edited_copy(moe["hf"], moe["root"] / "nan",
                       lambda n, t: torch.full_like(t, math.nan) if n == "model.norm.weight" else t)  # fmt: skip
    r = verify(moe["hf"], nan, tensors=False)
    assert not r.ok
    assert f"logits of B contain NaN or inf ({r.logits.tokens * 160} of {r.logits.tokens * 160} values)" in r.failures()
    # NaN fails even when the user's thresholds are loose enough for anything
    assert not verify(moe["hf"], nan, tensors=False, atol=math.inf, min_top1=0.0, min_routing=0.0).ok
    assert main(["verify", str(moe["hf"]), str(nan), "--no-tensors"]) == 1
    assert "NaN" in capsys.readouterr().out


def test_a_different_model_of_the_same_shape_fails_without_any_threshold(moe, capsys):
    other = write_tiny_checkpoint(moe["root"] / "other", "moe", seed=6, moe_layer_interval=1)
    r = verify(moe["hf"], other)
    fails = r.failures()
    assert not r.ok and r.logits.top1_agreement < 0.5
    assert any(f.startswith("logits max |Δ|") for f in fails) and any(f.startswith("top-1 agreement") for f in fails)
    assert any(f.startswith("routing layer") for f in fails)
    # every tensor is far outside float32 rounding of its own scale
    assert sum(f.startswith("tensor ") for f in fails) == len(r.tensors)
    assert main(["verify", str(moe["hf"]), str(other), "--json"]) == 1
    assert json.loads(capsys.readouterr().out)["ok"] is False


def test_dropped_expert_bias_fails_without_any_threshold(moe):
    nobias = _edited_copy(moe["hf"], moe["root"] / "nobias",
                          lambda n, t: torch.zeros_like(t) if n.endswith("e_score_correction_bias") else t)  # fmt: skip
    r = verify(moe["hf"], nobias, tensors=False)
    assert not r.ok and any(f.startswith("routing layer") for f in r.failures())


def test_tensor_defaults_allow_storage_rounding_only(moe):
    """The default tensor bound is the rounding of the coarser storage type, relative to the tensor's scale: a bf16
    copy passes as tensors (its logits in fp32 do not: that needs --dtype bf16); a 0.1 % change does not."""
    bf16 = _edited_copy(moe["hf"], moe["root"] / "bf16", lambda n, t: t.to(torch.bfloat16))
    assert verify(moe["hf"], bf16, logits=False).ok
    scaled = _edited_copy(moe["hf"], moe["root"] / "scaled",
                          lambda n, t: t * 1.001 if n == "model.layers.2.self_attn.o_proj.weight" else t)  # fmt: skip
    r = verify(moe["hf"], scaled, logits=False)
    assert [f.split(":")[0] for f in r.failures()] == ["tensor model.layers.2.self_attn.o_proj.weight"]


def test_shape_difference_is_reported_not_a_traceback(moe, capsys):
    wide = write_tiny_checkpoint(moe["root"] / "wide", "moe", seed=5, moe_layer_interval=1, moe_intermediate_size=16)
    assert main(["verify", str(moe["hf"]), str(wide)]) == 1
    out = capsys.readouterr().out
    assert "SHAPE [16, 48] vs [32, 48]" not in out and "SHAPE [32, 48] vs [16, 48]" in out
    assert "result   FAILED" in out
