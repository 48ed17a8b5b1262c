"""The checkpoint-source layer (``bridge.source``): the README's Python API flow on a tied config that stores
``lm_head.weight`` (the tie decided once, by the source), and the three formats of one model as one source."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file

from ernie45.bridge.io import CheckpointError, HFCheckpoint
from ernie45.bridge.live import export_hf, load_hf
from ernie45.bridge.source import open_source
from ernie45.convert import convert
from ernie45.errors import UsageError
from ernie45.layout import Layout
from ernie45.megatron.model import build_model
from ernie45.megatron.run import forward_logits
from ernie45.reference import load_reference
from ernie45.testing import assert_bit_exact, write_tiny_checkpoint


@pytest.fixture(scope="module")
def tied_with_head(tmp_path_factory):
    """A tiny MoE whose config says tied but whose files store their own (random) ``lm_head.weight``, as some
    releases do: transformers 5.23 then loads it untied (reference §G)."""
    # every layer after the first MoE: a layer pattern llama.cpp runs, so the GGUF target takes it too
    path = write_tiny_checkpoint(tmp_path_factory.mktemp("tied") / "hf", "moe", seed=4, tie_word_embeddings=True,
                                 moe_layer_interval=1)
    tensors = load_file(path / "model.safetensors")
    g = torch.Generator().manual_seed(9)
    tensors["lm_head.weight"] = torch.randn(tensors["model.embed_tokens.weight"].shape, generator=g)
    save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})
    return path


def test_readme_python_api_on_a_tied_config_that_stores_lm_head(tied_with_head, tmp_path, megatron):
    """README "Python API", call for call (one process): open, build with the source's tie, load, run -- logits
    equal transformers' -- export, and the export is the checkpoint again, bit for bit, read by transformers."""
    hf = load_reference(tied_with_head)
    # the oracle: transformers really uses the stored head, untied from the embedding
    assert_bit_exact(hf.lm_head.weight.detach(), load_file(tied_with_head / "model.safetensors")["lm_head.weight"])
    assert hf.lm_head.weight.data_ptr() != hf.model.embed_tokens.weight.data_ptr()

    layout = Layout()
    megatron(layout)  # parallel.initialize(layout), torn down after the test
    source = open_source(tied_with_head)
    assert source.cfg.tie_word_embeddings and not source.tied
    chunks = build_model(source.cfg, layout, tie_word_embeddings=source.tied)
    load_hf(chunks, source.cfg, layout, source)
    ids = torch.randint(0, source.cfg.vocab_size, (2, 9), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ref = hf(input_ids=ids).logits
    out = forward_logits(chunks, ids, vocab_size=source.cfg.vocab_size)
    assert (out - ref).abs().max().item() <= 1e-4

    export_hf(chunks, source.cfg, layout, tmp_path / "out-hf", tied=source.tied, side_files_from=source.path)
    back = HFCheckpoint(tmp_path / "out-hf")
    assert sorted(back.keys()) == sorted(source.keys())
    for name in source.keys():
        assert_bit_exact(back.get(name), source.get(name), name)
    assert back.checksums is not None and back.checksums.check_all() >= 1  # the one HF writer records them
    with torch.no_grad():
        again = load_reference(tmp_path / "out-hf")(input_ids=ids).logits
    assert_bit_exact(again, ref, "logits of the export in transformers")


def test_three_formats_are_one_source(tied_with_head, tmp_path):
    """HF, the torch_dist written from it and the GGUF written from that: the same tie, the same HF names and
    shapes, the same bytes (F32 GGUF of an f32 checkpoint); a GGUF has no ERNIE config and no plan."""
    convert(tied_with_head, tmp_path / "mg", to="megatron", tp=2, progress=False)
    convert(tmp_path / "mg", tmp_path / "m.gguf", to="gguf", progress=False)
    hf, mg, gg = (open_source(p) for p in (tied_with_head, tmp_path / "mg", tmp_path / "m.gguf"))
    assert (hf.format, mg.format, gg.format) == ("hf", "megatron", "gguf")
    assert hf.tied is mg.tied is gg.tied is False
    assert mg.cfg.mlp_layer_types == hf.cfg.mlp_layer_types and gg.cfg is None and gg.plan is None
    assert set(mg.keys()) == set(hf.keys())
    assert set(gg.keys()) <= set(hf.keys())  # GGUF drops what llama.cpp does not use (declared: GGUF_IGNORED)
    for name in gg.keys():
        assert mg.shape(name) == hf.shape(name) == gg.shape(name)
        assert_bit_exact(gg.get(name), hf.get(name), name)
        assert_bit_exact(mg.get(name), hf.get(name), name)
    assert {gg.storage_type(n) for n in gg.keys()} == {"gguf F32"}
    assert {hf.storage_type(n) for n in hf.keys()} == {"float32"}


def test_open_source_refuses_what_holds_no_model(tied_with_head, tmp_path):
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text("{}")
    with pytest.raises(CheckpointError, match="PEFT adapter directory holds no model"):
        open_source(adapter)
    with pytest.raises(UsageError, match="--vit chooses the ViT of a VL model"):
        open_source(tied_with_head, vit="megatron")
