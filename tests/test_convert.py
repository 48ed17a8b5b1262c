"""Offline converter: HF ⇄ torch_dist over a grid of layouts, MTP carried, reshard, dry-run, live-load contract."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from ernie45.bridge.io import CheckpointError, HFCheckpoint
from ernie45.bridge.torch_dist import TorchDistReader
from ernie45.cli import main as cli
from ernie45.convert import convert
from ernie45.testing import assert_bit_exact, tiny_hf_config, write_tiny_checkpoint

MTP = {
    "model.mtp_block.0.self_attn.q_proj.weight": (64, 64),
    "model.mtp_emb_norm.0.weight": (64,),
    "model.mtp_hidden_norm.0.weight": (64,),
    "model.mtp_linear_proj.0.weight": (64, 128),
}


def _with_mtp(path):
    """Add the MTP tensors the PT checkpoints ship (transformers ignores them; we must carry them)."""
    f = path / "model.safetensors"
    tensors = load_file(f)
    g = torch.Generator().manual_seed(5)
    for name, shape in MTP.items():
        tensors[name] = torch.randn(shape, generator=g).to(torch.bfloat16)
    save_file(tensors, f, metadata={"format": "pt"})
    return path


@pytest.fixture(scope="module")
def grid_ckpts(tmp_path_factory):
    """Checkpoints shaped for the layout grid: 8 heads / 4 KV groups (TP 1-4), 6 layers (PP 1-3), 8 experts (EP 1-4)."""
    root = tmp_path_factory.mktemp("grid")
    shape = dict(hidden_size=64, num_attention_heads=8, num_key_value_heads=4, num_hidden_layers=6)
    dense = write_tiny_checkpoint(root / "dense", "dense", seed=21, head_dim=8, **shape)
    moe = _with_mtp(write_tiny_checkpoint(root / "moe", "moe", seed=22, dtype=torch.bfloat16, **shape))
    # VL: 8 heads / 4 KV groups of 16, 6 layers (dense first), 8 experts per pool of different widths, 4 ViT heads
    text = dict(tiny_hf_config("vl")["text_config"], num_attention_heads=8, num_key_value_heads=4, hidden_size=128,
                num_hidden_layers=6, mlp_layer_types=["dense"] + ["sparse"] * 5)  # fmt: skip
    vision = dict(tiny_hf_config("vl")["vision_config"], num_heads=4)
    vl = write_tiny_checkpoint(root / "vl", "vl", seed=23, text_config=text, vision_config=vision)
    return {"dense": dense, "moe": moe, "vl": vl}


LAYOUTS = {
    "dense": [
        dict(), dict(tp=2), dict(tp=4), dict(pp=2), dict(pp=3), dict(pp=2, first=2, last=4), dict(tp=2, pp=3),
        dict(tp=4, pp=2), dict(pp=2, vpp=3), dict(tp=2, pp=2, first=2, last=4), dict(pp=3, vpp=2),
        dict(pp=2, first=1, last=5), dict(tp=4, pp=3), dict(tp=2, pp=2, vpp=3), dict(pp=6), dict(tp=2, pp=6),
        dict(pp=3, first=1, last=1), dict(tp=4, pp=6), dict(tp=2, pp=3, vpp=2), dict(pp=2, first=4, last=2),
    ],
    "moe": [
        dict(), dict(tp=2), dict(tp=4), dict(ep=2), dict(ep=4), dict(tp=2, ep=2, etp=1), dict(tp=4, ep=4, etp=1),
        dict(tp=2, ep=2), dict(pp=2), dict(pp=3), dict(pp=2, first=2, last=4), dict(tp=2, pp=2, ep=2),
        dict(tp=2, pp=2, ep=2, etp=1), dict(pp=2, vpp=3), dict(pp=3, vpp=2, ep=4), dict(tp=2, pp=3, ep=4, etp=2),
        dict(ep=8), dict(tp=4, ep=2, etp=4), dict(pp=6, ep=2), dict(tp=2, pp=2, vpp=3, ep=8, etp=1),
    ],
    # both pools split under EP; "vit": the TP-sharded Megatron-Core ViT instead of the replicated HF one
    "vl": [
        dict(), dict(tp=2), dict(tp=4), dict(ep=2), dict(ep=4), dict(ep=8), dict(tp=2, ep=2, etp=1),
        dict(tp=4, ep=2), dict(pp=2), dict(pp=3), dict(pp=2, first=2, last=4), dict(tp=2, pp=2, ep=2),
        dict(pp=2, vpp=3), dict(pp=3, vpp=2, ep=4), dict(tp=2, pp=3, ep=4, etp=2), dict(pp=2, first=1, last=5),
        dict(vit="megatron"), dict(tp=2, vit="megatron"), dict(tp=4, ep=4, etp=1, vit="megatron"),
        dict(tp=2, pp=2, ep=2, vit="megatron"), dict(tp=4, pp=3, vpp=2, ep=2, vit="megatron"),
    ],
}  # fmt: skip


def _layout_id(kw):
    return "-".join(f"{k}{v}" for k, v in kw.items()) or "tp1"


def _assert_same_hf(a, b):
    a, b = HFCheckpoint(a), HFCheckpoint(b)
    assert sorted(a.keys()) == sorted(b.keys())
    for name in a.keys():
        assert_bit_exact(a.get(name), b.get(name), name)


@pytest.mark.parametrize("family", ["dense", "moe", "vl"])
def test_round_trip_over_layout_grid(family, grid_ckpts, tmp_path):
    src = grid_ckpts[family]
    assert len(LAYOUTS[family]) >= 20
    for kw in LAYOUTS[family]:
        mg, back = tmp_path / f"mg-{_layout_id(kw)}", tmp_path / f"hf-{_layout_id(kw)}"
        convert(src, mg, to="megatron", progress=False, **kw)
        convert(mg, back, to="hf", progress=False)
        _assert_same_hf(src, back)


def test_mtp_is_carried_bit_exact(grid_ckpts, tmp_path):
    convert(grid_ckpts["moe"], tmp_path / "mg", to="megatron", tp=2, ep=2, progress=False)
    info = json.loads((tmp_path / "mg" / "ernie45.json").read_text())
    assert sorted(info["carried"]) == sorted(MTP)
    keys = TorchDistReader(tmp_path / "mg").keys()
    assert all(f"ernie45.carry.{n}" in keys for n in MTP)
    convert(tmp_path / "mg", tmp_path / "hf", to="hf", progress=False)
    back = HFCheckpoint(tmp_path / "hf")
    for name in MTP:
        assert back.dtype(name) == torch.bfloat16
        assert_bit_exact(back.get(name), HFCheckpoint(grid_ckpts["moe"]).get(name))


def test_reshard_a_b_a_is_bit_exact(grid_ckpts, tmp_path):
    src = grid_ckpts["moe"]
    convert(src, tmp_path / "a", to="megatron", tp=2, pp=2, ep=2, progress=False)
    convert(tmp_path / "a", tmp_path / "b", to="megatron", tp=4, pp=3, ep=4, etp=1, progress=False)
    convert(tmp_path / "b", tmp_path / "a2", to="megatron", tp=2, pp=2, ep=2, progress=False)
    a, a2 = TorchDistReader(tmp_path / "a"), TorchDistReader(tmp_path / "a2")
    assert sorted(a.keys()) == sorted(a2.keys())
    for k in a.keys():
        assert_bit_exact(a.read(k), a2.read(k), k)
    convert(tmp_path / "b", tmp_path / "hf", to="hf", progress=False)
    _assert_same_hf(src, tmp_path / "hf")


def test_offline_keys_equal_live_model_sharded_state_dict(grid_ckpts, tmp_path, megatron):
    """Contract: the offline writer produces exactly the keys GPTModel.sharded_state_dict() asks for."""
    from megatron.core.dist_checkpointing.mapping import ShardedObject
    from megatron.core.dist_checkpointing.dict_utils import nested_values

    from ernie45.config import load_config
    from ernie45.layout import Layout
    from ernie45.megatron.model import build_model

    src = grid_ckpts["moe"]
    convert(src, tmp_path / "mg", to="megatron", progress=False)
    cfg = load_config(src)
    megatron(Layout())
    (model,) = build_model(cfg, Layout(), tie_word_embeddings=False)
    live = {v.unique_key if isinstance(v, ShardedObject) else v.key for v in nested_values(model.sharded_state_dict())}
    reader = TorchDistReader(tmp_path / "mg")
    written = set(reader.metadata.state_dict_metadata)
    assert live == {k for k in written if not k.startswith("ernie45.carry.")}


def test_offline_vl_keys_equal_live_model_with_either_vit(grid_ckpts, tmp_path, megatron):
    """The VL contract, with the replicated HF ViT and with the TP-sharded Megatron ViT (and its keys on disk)."""
    import dataclasses

    from megatron.core.dist_checkpointing.dict_utils import nested_values
    from megatron.core.dist_checkpointing.mapping import ShardedObject

    from ernie45.config import load_config
    from ernie45.bridge.torch_dist import MegatronSource
    from ernie45.layout import Layout
    from ernie45.megatron.vl_model import build_vl_model

    megatron(Layout())
    for vit in ("hf", "megatron"):
        dst = tmp_path / f"mg-{vit}"
        convert(grid_ckpts["vl"], dst, to="megatron", vit=vit, progress=False)
        cfg = dataclasses.replace(load_config(grid_ckpts["vl"]), vit_impl=vit)
        (model,) = build_vl_model(cfg, Layout())
        live = {v.unique_key if isinstance(v, ShardedObject) else v.key for v in nested_values(model.sharded_state_dict())}
        assert live == set(TorchDistReader(dst).metadata.state_dict_metadata)
        assert MegatronSource(dst).cfg.vit_impl == vit  # told apart by the keys on disk
        assert any(k.startswith("vision_model.decoder.layers.") for k in live) == (vit == "megatron")


def test_dry_run_prints_the_plan_and_writes_nothing(grid_ckpts, tmp_path, capsys):
    dst = tmp_path / "never"
    assert cli(["convert", str(grid_ckpts["moe"]), str(dst), "--to", "megatron", "--tp", "2", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "FuseQKV" in out and "ConcatGLU" in out and "expert-column" in out
    assert "model.mtp_block.0.self_attn.q_proj.weight" in out and "declared-ignore table" in out
    assert not dst.exists()


def test_non_empty_destination_needs_overwrite(grid_ckpts, tmp_path):
    dst = tmp_path / "out"
    dst.mkdir()
    (dst / "precious.txt").write_text("keep me")
    with pytest.raises(CheckpointError, match="--overwrite"):
        convert(grid_ckpts["dense"], dst, to="megatron", progress=False)
    assert (dst / "precious.txt").read_text() == "keep me"
    convert(grid_ckpts["dense"], dst, to="megatron", overwrite=True, progress=False)
    assert not (dst / "precious.txt").exists() and (dst / ".metadata").is_file()
