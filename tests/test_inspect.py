"""``ernie45 inspect`` on the three formats: the facts a user checks before trusting a checkpoint."""

from __future__ import annotations

import json

import pytest
from safetensors.torch import load_file, save_file

from ernie45.assets import embedded_checkpoint
from ernie45.cli import main
from ernie45.convert import convert
from ernie45.inspect import inspect_path


def test_hf_facts_and_mtp(tmp_path):
    import shutil

    import torch

    src = tmp_path / "moe"
    shutil.copytree(embedded_checkpoint("tiny-ernie45-moe"), src)
    f = src / "model.safetensors"
    tensors = load_file(f)
    tensors["model.mtp_emb_norm.0.weight"] = torch.ones(48)
    save_file(tensors, f, metadata={"format": "pt"})
    info = inspect_path(src)
    assert info["format"] == "hf safetensors" and info["family"] == "moe" and info["layers"] == "6 (DSSSSS)"
    assert info["mtp tensors"] == 1 and info["tensors"] == len(tensors)
    assert info["experts"].startswith("8 per pool × 1 pool(s), top-3")
    assert "K total" in info["parameters"] and "active per token" in info["parameters"]


def test_torch_dist_facts_layout_and_vit(tmp_path, capsys):
    src = embedded_checkpoint("tiny-ernie45-vl")
    dst = tmp_path / "mg"
    convert(src, dst, to="megatron", tp=2, pp=2, ep=2, vit="megatron", progress=False)
    info = inspect_path(dst)
    hf = inspect_path(src)
    assert info["format"] == "megatron-core torch_dist" and info["written for layout"] == "TP2·PP2·EP2"
    assert info["vision"].endswith("Megatron-Core (TP-sharded) ViT")
    for key in ("family", "layers", "hidden / heads / kv", "parameters", "experts", "tied head"):
        assert info[key] == hf[key], key  # the same model, whatever the format
    assert main(["inspect", str(dst), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["written for layout"] == "TP2·PP2·EP2"


@pytest.mark.parametrize("outtype, types", [("f32", {"F32"}), ("f16", {"F16", "F32"})])
def test_gguf_summary(outtype, types, tmp_path):
    out = tmp_path / "m.gguf"
    convert(embedded_checkpoint("tiny-ernie45-moe"), out, to="gguf", outtype=outtype, progress=False)
    info = inspect_path(out)
    assert info["architecture"] == "ernie4_5-moe" and info["layers"] == "6 (DSSSSS)"
    assert info["experts"].startswith("8, top-3") and info["tokenizer"] == "llama (160 tokens)"
    assert set(info["tensor types"]) == types
