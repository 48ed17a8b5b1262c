"""GGUF export (issue #5), without llama.cpp: golden metadata / tensor lists, bit-exact read-back, every error path.

The checkpoints are real transformers ``save_pretrained`` outputs of tiny re-randomised models (expert bias and
norms included), with a real trained SentencePiece tokenizer. The GGUF is read back with ``gguf.GGUFReader`` and
mapped to HF names through the same table, so f32 exports are compared bit for bit with the source.
``tests/test_llama_cpp.py`` runs the files in llama.cpp itself.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch

from ernie45.bridge.gguf import (
    GGUF_TABLE,
    GGUFExportError,
    GGUFRow,
    export_gguf,
    llama_cpp_layer_pattern,
    read_gguf_as_hf,
)
from ernie45.bridge.io import HFCheckpoint
from ernie45.bridge.ops import Identity, Squeeze0, Stack
from ernie45.bridge.plan import PlanError
from ernie45.bridge.tables import IGNORED, Row, Split, expand_rows
from ernie45.config import ErnieConfig
from ernie45.testing import assert_bit_exact, tiny_hf_config, write_tiny_checkpoint
from ernie45.testing_tokenizer import TINY_CORPUS, write_tiny_tokenizer

ROOT = Path(__file__).resolve().parents[1]
# tiny MoE with a pattern llama.cpp can run: D S S S S S (the default tiny MoE is D S D S D S, refused below)
MOE_OK = {"moe_layer_interval": 1}


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    """name -> checkpoint dir (with tokenizer). Both head variants for both families, and H = 64 for real q8_0."""
    root = tmp_path_factory.mktemp("gguf_ckpts")
    specs = {
        "dense": ("dense", 1, {}),  # tied, head_dim 16 != H / heads = 12
        "dense-untied": ("dense", 3, {"tie_word_embeddings": False}),
        "moe": ("moe", 1, MOE_OK),  # untied
        "moe-tied": ("moe", 2, {**MOE_OK, "tie_word_embeddings": True}),
        "moe-h64": ("moe", 4, {**MOE_OK, "hidden_size": 64}),  # every matrix row a multiple of the q8_0 block
    }
    out = {}
    for name, (family, seed, overrides) in specs.items():
        d = write_tiny_checkpoint(root / name, family, seed=seed, **overrides)
        write_tiny_tokenizer(d, 160)
        out[name] = d
    return out


def _export(ckpt: Path, out: Path, source=None, **kw):
    cfg = ErnieConfig.from_file(ckpt)
    kw.setdefault("tokenizer_dir", ckpt)
    return export_gguf(source or HFCheckpoint(ckpt), cfg, out, progress=False, **kw)


class EditedSource:
    """A real checkpoint with tensors added, replaced or dropped: what a foreign or damaged checkpoint looks like."""

    def __init__(self, base: HFCheckpoint, *, add=None, drop=()):
        self.base, self.add, self.drop = base, dict(add or {}), set(drop)

    def keys(self):
        return [k for k in self.base.keys() if k not in self.drop and k not in self.add] + list(self.add)

    def get(self, name):
        return self.add[name] if name in self.add else self.base.get(name)

    def shape(self, name):
        return tuple(self.get(name).shape)

    def dtype(self, name):
        return self.get(name).dtype


class MisreportingSource(EditedSource):
    """Same, but its stored shapes say what the config implies while a tensor read is another (a header that lies
    about its data), so the bad tensor surfaces only mid-write."""

    def shape(self, name):
        return tuple(self.base.shape(name)) if name in self.add and name in self.base.keys() else super().shape(name)


def _no_partials(d: Path):
    return [p.name for p in d.iterdir() if p.name.endswith(".partial")]


# ------------------------------------------------------------------------------------------------------------------
# table


def test_table_uses_gguf_constants_and_covers_the_architectures():
    moe, dense = gguf.MODEL_ARCH.ERNIE4_5_MOE, gguf.MODEL_ARCH.ERNIE4_5
    assert gguf.MODEL_ARCH_NAMES[dense] == "ernie4_5" and gguf.MODEL_ARCH_NAMES[moe] == "ernie4_5-moe"
    rows = {r.tensor for r in GGUF_TABLE}
    # every tensor kind gguf-py lists for ERNIE 4.5 MoE has exactly one row, and nothing else is in the table
    assert rows == set(gguf.MODEL_TENSORS[moe])
    assert len(rows) == len(GGUF_TABLE)
    # the dense architecture is the MoE one minus the expert / router / shared tensors
    moe_only = {r.tensor for r in GGUF_TABLE if r.row.scope in ("moe", "expert", "shared")}
    assert set(gguf.MODEL_TENSORS[dense]) == rows - moe_only
    # and a dense config's expansion of the table writes exactly the kinds the dense architecture has
    cfg = ErnieConfig.from_hf(tiny_hf_config("dense", tie_word_embeddings=False))
    kinds = {r.tensor for r in GGUF_TABLE if expand_rows((r.row,), cfg, tied=False)}
    assert kinds == set(gguf.MODEL_TENSORS[dense])
    # contract on a few names (a refactor must not rename what llama.cpp loads)
    names = {r.row.hf[0]: r.row.mg[0].format(L=7) for r in GGUF_TABLE}
    assert names["model.layers.{L}.mlp.moe_statics.e_score_correction_bias"] == "blk.7.exp_probs_b.bias"
    assert names["model.layers.{L}.mlp.experts.{X}.down_proj.weight"] == "blk.7.ffn_down_exps.weight"
    assert names["model.layers.{L}.mlp.shared_experts.gate_proj.weight"] == "blk.7.ffn_gate_shexp.weight"
    assert names["lm_head.weight"] == "output.weight"


@pytest.mark.parametrize("name", ["dense", "dense-untied", "moe", "moe-tied"])
def test_both_tables_consume_the_same_checkpoint(name, ckpts):
    """One engine, one tie rule: the GGUF and the Megatron table of a config read exactly the HF tensors that
    transformers wrote, each once."""
    from ernie45.bridge.gguf import plan_gguf
    from ernie45.bridge.plan import plan_from_hf

    src = HFCheckpoint(ckpts[name])
    cfg = ErnieConfig.from_file(ckpts[name])
    megatron = plan_from_hf(cfg, src.shapes())
    gguf_plan = plan_gguf(cfg, src.keys(), shapes=src.shapes())
    consumed = [s for p in gguf_plan.tensors for s in p.sources]
    assert sorted(consumed) == sorted(megatron.hf_names) == sorted(src.keys())


def test_ops_invert_bit_exactly():
    """The GGUF table's ops are the shared ones (round trips of all of them: tests/test_ops_and_plan.py); here the
    layouts llama.cpp relies on."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 5, generator=g)
    assert_bit_exact(Identity().to_hf(Identity().to_mg((x,)))[0], x)
    b = torch.rand(1, 8, generator=g)
    (b_E,) = Squeeze0().to_mg((b,))
    assert b_E.shape == (8,)
    assert_bit_exact(Squeeze0().to_hf((b_E,))[0], b)
    experts = tuple(torch.randn(4, 6, generator=g) for _ in range(5))
    (stacked,) = Stack().to_mg(experts)
    assert stacked.shape == (5, 4, 6)
    assert_bit_exact(stacked[3], experts[3])
    for a, b in zip(Stack().to_hf((stacked,)), experts, strict=True):
        assert_bit_exact(a, b)
    with pytest.raises(ValueError, match=r"\[1, E\]"):
        Squeeze0().to_mg((torch.zeros(2, 8),))


def test_rows_are_checked_when_the_table_is_built():
    """GGUF rows are engine rows (their checks apply) whose names must be gguf-py's."""
    T = gguf.MODEL_TENSOR
    with pytest.raises(ValueError, match="not gguf-py's name of ATTN_Q"):
        GGUFRow(Row(("model.layers.{L}.a",), ("blk.{L}.attn_k.weight",), Identity(), Split.REPLICATED, "layer",
                    (("H",),)), T.ATTN_Q)  # fmt: skip
    with pytest.raises(ValueError, match="stored whole"):
        GGUFRow(Row(("model.embed_tokens.weight",), ("token_embd.weight",), Identity(), Split.VOCAB, "model",
                    (("V", "H"),)), T.TOKEN_EMBD)  # fmt: skip
    with pytest.raises(ValueError, match="only a gathering op"):  # experts must be stacked, not dropped
        GGUFRow(Row(("model.layers.{L}.mlp.experts.{X}.up_proj.weight",), ("blk.{L}.ffn_up_exps.weight",),
                    Identity(), Split.REPLICATED, "expert", (("F", "H"),)), T.FFN_UP_EXP)  # fmt: skip


def test_layer_pattern_rule():
    def cfg(types):
        raw = tiny_hf_config("moe", num_hidden_layers=len(types), mlp_layer_types=list(types))
        for k in ("moe_layer_start_index", "moe_layer_interval", "moe_layer_end_index"):  # superseded by the list
            del raw[k]
        return ErnieConfig.from_hf(raw)

    assert llama_cpp_layer_pattern(cfg(["dense", "sparse", "sparse", "sparse"])) == (1, 1)
    assert llama_cpp_layer_pattern(cfg(["sparse"] * 3)) == (0, 1)
    assert llama_cpp_layer_pattern(cfg(["dense"] * 3)) == (3, 1)
    for bad in (["dense", "sparse", "dense", "sparse"], ["sparse", "dense"]):
        with pytest.raises(GGUFExportError, match="leading_dense_block_count"):
            llama_cpp_layer_pattern(cfg(bad))


# ------------------------------------------------------------------------------------------------------------------
# golden files


def _regen_module():
    spec = importlib.util.spec_from_file_location("regen_golden_gguf", ROOT / "tools" / "regen_golden_gguf.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.parametrize("name", ["dense", "moe"])
def test_golden(name, tmp_path):
    """Metadata keys/values and tensor names/shapes/types are pinned (regenerate: tools/regen_golden_gguf.py)."""
    golden = json.loads((ROOT / "tests" / "golden" / f"gguf_tiny_{name}.json").read_text())
    now = _regen_module().golden_record(name, tmp_path)
    assert now["metadata"] == golden["metadata"]
    assert now["tensors"] == golden["tensors"]
    assert list(now["tensors"]) == list(golden["tensors"])  # write order too
    assert now["q8_0_tensor_types"] == golden["q8_0_tensor_types"]
    assert now["q8_0_file_type"] == golden["q8_0_file_type"]


def test_golden_facts():
    """The golden values that matter to llama.cpp, spelled out (so a regenerated golden cannot drift silently)."""
    moe = json.loads((ROOT / "tests" / "golden" / "gguf_tiny_moe.json").read_text())
    meta = moe["metadata"]
    assert meta["general.architecture"] == "ernie4_5-moe"
    assert meta["ernie4_5-moe.attention.key_length"] == 48 // 4
    assert meta["ernie4_5-moe.expert_shared_feed_forward_length"] == 2 * 32  # not 96 // 2 (llama.cpp's guess)
    assert meta["ernie4_5-moe.leading_dense_block_count"] == 1
    assert meta["ernie4_5-moe.interleave_moe_layer_step"] == 1
    assert meta["ernie4_5-moe.rope.freq_base"] == 500000.0
    assert moe["tensors"]["blk.1.exp_probs_b.bias"] == "F32 [8]"
    assert moe["tensors"]["blk.1.ffn_down_exps.weight"] == "F32 [8, 48, 32]"
    assert "blk.0.ffn_gate_inp.weight" not in moe["tensors"]  # layer 0 is dense
    assert "output.weight" in moe["tensors"]  # untied
    assert moe["q8_0_tensor_types"]["blk.1.ffn_gate_inp.weight"] == "F32"
    dense = json.loads((ROOT / "tests" / "golden" / "gguf_tiny_dense.json").read_text())
    assert dense["metadata"]["ernie4_5.attention.key_length"] == 16  # head_dim, not 48 // 4
    assert "output.weight" not in dense["tensors"]  # tied: llama.cpp falls back to token_embd
    assert dense["metadata"]["tokenizer.ggml.model"] == "llama"
    assert dense["metadata"]["tokenizer.ggml.bos_token_id"] == 1
    assert dense["metadata"]["tokenizer.ggml.add_space_prefix"] is True


# ------------------------------------------------------------------------------------------------------------------
# values


@pytest.mark.parametrize("name", ["dense", "dense-untied", "moe", "moe-tied"])
def test_f32_round_trip_is_bit_exact(name, ckpts, tmp_path):
    src = HFCheckpoint(ckpts[name])
    report = _export(ckpts[name], tmp_path / "m.gguf")
    # every source tensor consumed exactly once, nothing ignored in a plain HF save
    consumed = [s for ss in report.sources.values() for s in ss]
    assert sorted(consumed) == sorted(src.keys()) and not report.ignored
    assert ("output.weight" in report.sources) == ("lm_head.weight" in src.keys())
    back = read_gguf_as_hf(tmp_path / "m.gguf")
    assert sorted(back) == sorted(src.keys())
    for k in src.keys():
        assert_bit_exact(back[k], src.get(k), k)


def test_layout_spelled_out(ckpts, tmp_path):
    """The GGUF tensors, read raw (not through the table's inverse), against the HF tensors they must hold."""
    src = HFCheckpoint(ckpts["moe"])
    _export(ckpts["moe"], tmp_path / "m.gguf")
    raw = {t.name: torch.from_numpy(np.array(t.data)) for t in gguf.GGUFReader(str(tmp_path / "m.gguf")).tensors}
    p = "model.layers.3.mlp."
    for x in range(8):  # expert x at index x of the stacked tensors, no transpose
        assert_bit_exact(raw["blk.3.ffn_gate_exps.weight"][x], src.get(p + f"experts.{x}.gate_proj.weight"))
        assert_bit_exact(raw["blk.3.ffn_up_exps.weight"][x], src.get(p + f"experts.{x}.up_proj.weight"))
        assert_bit_exact(raw["blk.3.ffn_down_exps.weight"][x], src.get(p + f"experts.{x}.down_proj.weight"))
    assert_bit_exact(raw["blk.3.ffn_gate_inp.weight"], src.get(p + "gate.weight"))  # [E, H], as on disk
    assert_bit_exact(raw["blk.3.exp_probs_b.bias"], src.get(p + "moe_statics.e_score_correction_bias")[0])
    assert_bit_exact(raw["blk.3.ffn_down_shexp.weight"], src.get(p + "shared_experts.down_proj.weight"))
    # Q and K are *not* permuted: llama.cpp's NORM RoPE already pairs adjacent channels like HF ERNIE
    assert_bit_exact(raw["blk.0.attn_q.weight"], src.get("model.layers.0.self_attn.q_proj.weight"))
    assert_bit_exact(raw["blk.0.attn_k.weight"], src.get("model.layers.0.self_attn.k_proj.weight"))
    assert_bit_exact(raw["blk.0.ffn_gate.weight"], src.get("model.layers.0.mlp.gate_proj.weight"))
    assert_bit_exact(raw["output.weight"], src.get("lm_head.weight"))


def test_tied_config_with_lm_head_on_disk_writes_output(ckpts, tmp_path):
    """transformers 5.23 uses an on-disk lm_head.weight even when tied (reference §G): llama.cpp must get it too."""
    base = HFCheckpoint(ckpts["moe-tied"])
    head = torch.randn(base.shape("model.embed_tokens.weight"), generator=torch.Generator().manual_seed(5))
    report = _export(ckpts["moe-tied"], tmp_path / "m.gguf", EditedSource(base, add={"lm_head.weight": head}))
    assert report.sources["output.weight"] == ("lm_head.weight",)
    assert_bit_exact(read_gguf_as_hf(tmp_path / "m.gguf")["lm_head.weight"], head)


def _expected_type(name: str, shape: tuple[int, ...], outtype: str) -> str:
    if len(shape) == 1 or name.endswith(("_norm.weight", "ffn_gate_inp.weight", ".bias")):
        return "F32"
    if outtype == "q8_0" and shape[-1] % 32:
        return "F16"
    return outtype.upper()


@pytest.mark.parametrize(("name", "outtype"), [("moe", "f16"), ("moe", "bf16"), ("moe", "q8_0"), ("moe-h64", "q8_0")])
def test_outtypes(name, outtype, ckpts, tmp_path):
    src = HFCheckpoint(ckpts[name])
    report = _export(ckpts[name], tmp_path / "m.gguf", outtype=outtype)
    types = {n: t for n, _, t in report.tensors}
    assert types == {n: _expected_type(n, s, outtype) for n, s, _ in report.tensors}
    if name == "moe-h64":  # the real q8_0 path, not only the f16 fallback
        assert types["blk.1.ffn_gate_exps.weight"] == types["token_embd.weight"] == "Q8_0"
    back = read_gguf_as_hf(tmp_path / "m.gguf")
    gguf_of = {s: n for n, ss in report.sources.items() for s in ss}
    for k in src.keys():
        x, y, t = src.get(k), back[k], types[gguf_of[k]]
        if t == "F32":
            assert_bit_exact(y, x, k)
        elif t == "F16":
            assert_bit_exact(y, x.half().float(), k)
        elif t == "BF16":
            assert_bit_exact(y, x.bfloat16().float(), k)
        else:  # Q8_0: per block of 32, q = round(x / d) with d = absmax / 127, dequantised as q * f16(d)
            blocks = x.reshape(-1, 32)
            d = blocks.abs().amax(dim=1, keepdim=True) / 127
            bound = 0.5 * d + 127 * (d.half().float() - d).abs()  # rounding of q, plus the f16 rounding of d
            err = (y.reshape(-1, 32) - blocks).abs()
            assert bool((err <= bound * (1 + 1e-5) + 1e-12).all()), k
            assert not torch.equal(y, x)  # really quantised


# ------------------------------------------------------------------------------------------------------------------
# totality and errors


def test_mtp_tensors_are_ignored_and_reported(ckpts, tmp_path):
    base = HFCheckpoint(ckpts["moe"])
    mtp = {
        "model.mtp_block.0.self_attn.q_proj.weight": torch.zeros(4, 4),
        "model.mtp_emb_norm.0.weight": torch.ones(48),
        "model.mtp_linear_proj.0.weight": torch.zeros(48, 96),
    }
    report = _export(ckpts["moe"], tmp_path / "m.gguf", EditedSource(base, add=mtp))
    assert set(report.ignored) == set(mtp)
    assert all("MTP" in why and "llama.cpp" in why for why in report.ignored.values())
    assert "ignored model.mtp_emb_norm.0.weight" in report.summary()
    assert len(IGNORED) == 2  # adding an ignore rule is a reviewed decision: update this test with it


def test_unknown_tensors_are_all_listed(ckpts, tmp_path):
    base = HFCheckpoint(ckpts["moe"])
    extra = {
        "model.layers.0.mlp.gate.weight": torch.zeros(8, 48),  # a router on the dense layer 0
        "model.layers.6.self_attn.q_proj.weight": torch.zeros(48, 48),  # layer 6 of 6
        "model.layers.1.mlp.experts.8.up_proj.weight": torch.zeros(32, 48),  # expert 8 of 8
    }
    with pytest.raises(PlanError) as e:
        _export(ckpts["moe"], tmp_path / "m.gguf", EditedSource(base, add=extra))
    assert "does not match the ernie4_5-moe GGUF" in str(e.value) and "unexpected tensors (3)" in str(e.value)
    assert all(k in str(e.value) for k in extra)
    assert list(tmp_path.iterdir()) == []


def test_missing_tensors_are_all_listed(ckpts, tmp_path):
    drop = ["model.layers.3.mlp.experts.5.down_proj.weight", "model.layers.0.mlp.up_proj.weight", "lm_head.weight"]
    with pytest.raises(PlanError) as e:
        _export(ckpts["moe"], tmp_path / "m.gguf", EditedSource(HFCheckpoint(ckpts["moe"]), drop=drop))
    assert "does not match the ernie4_5-moe GGUF" in str(e.value) and "missing tensors (3)" in str(e.value)
    assert all(k in str(e.value) for k in drop)
    assert list(tmp_path.iterdir()) == []


def test_wrong_shapes_are_listed_before_writing(ckpts, tmp_path):
    bad = {"model.layers.1.mlp.gate.weight": torch.zeros(48, 8), "model.norm.weight": torch.zeros(47)}
    with pytest.raises(PlanError) as e:
        _export(ckpts["moe"], tmp_path / "m.gguf", EditedSource(HFCheckpoint(ckpts["moe"]), add=bad))
    assert "wrong shapes (2)" in str(e.value) and "gate.weight: has [48, 8], config implies [8, 48]" in str(e.value)
    assert list(tmp_path.iterdir()) == []


def test_error_mid_write_leaves_nothing_and_keeps_the_old_file(ckpts, tmp_path):
    """A bad tensor found only while streaming (the source's stored shapes pass the plan, its data does not): no
    output, no temp file, and with overwrite=True the existing file is left untouched."""
    out = tmp_path / "m.gguf"
    # output.weight is written last, after the header and every other tensor
    bad = MisreportingSource(HFCheckpoint(ckpts["moe"]), add={"lm_head.weight": torch.zeros(160, 47)})
    with pytest.raises(GGUFExportError, match=r"lm_head.weight: shape \[160, 47\]"):
        _export(ckpts["moe"], out, bad)
    assert list(tmp_path.iterdir()) == []
    out.write_bytes(b"previous export")
    with pytest.raises(GGUFExportError):
        _export(ckpts["moe"], out, bad, overwrite=True)
    assert out.read_bytes() == b"previous export" and not _no_partials(tmp_path)


def test_existing_output_needs_overwrite(ckpts, tmp_path):
    out = tmp_path / "m.gguf"
    out.write_bytes(b"x")
    with pytest.raises(GGUFExportError, match="overwrite=True"):
        _export(ckpts["dense"], out)
    assert out.read_bytes() == b"x"
    _export(ckpts["dense"], out, overwrite=True)
    assert gguf.GGUFReader(str(out)).fields["general.architecture"].contents() == "ernie4_5"
    assert not _no_partials(tmp_path)


def test_vl_is_refused(ckpts, tmp_path):
    cfg = ErnieConfig.from_hf(tiny_hf_config("vl"))
    with pytest.raises(GGUFExportError, match="VL"):
        export_gguf(HFCheckpoint(ckpts["moe"]), cfg, tmp_path / "m.gguf", progress=False)
    assert list(tmp_path.iterdir()) == []


def test_unrepresentable_layer_pattern_is_refused(ckpts, tmp_path):
    cfg = ErnieConfig.from_hf(tiny_hf_config("moe"))  # the default tiny MoE: D S D S D S
    with pytest.raises(GGUFExportError, match="DSDSDS cannot be represented"):
        export_gguf(HFCheckpoint(ckpts["moe"]), cfg, tmp_path / "m.gguf", progress=False)


def test_bias_is_refused(ckpts, tmp_path):
    cfg = ErnieConfig.from_hf(tiny_hf_config("dense", use_bias=True))
    with pytest.raises(GGUFExportError, match="use_bias"):
        export_gguf(HFCheckpoint(ckpts["dense"]), cfg, tmp_path / "m.gguf", progress=False)


def test_missing_context_length_is_an_error(ckpts, tmp_path):
    cfg = ErnieConfig.from_hf(tiny_hf_config("dense"))  # a dict that never went through save_pretrained
    assert cfg.max_position_embeddings is None
    with pytest.raises(GGUFExportError, match="max_position_embeddings"):
        export_gguf(HFCheckpoint(ckpts["dense"]), cfg, tmp_path / "m.gguf", progress=False)
    assert list(tmp_path.iterdir()) == []


def test_bad_outtype(ckpts, tmp_path):
    with pytest.raises(GGUFExportError, match="outtype"):
        _export(ckpts["dense"], tmp_path / "m.gguf", outtype="q4_0")


# ------------------------------------------------------------------------------------------------------------------
# tokenizer


def _field(path, key):
    return gguf.GGUFReader(str(path)).fields[key].contents()


def test_tokenizer_matches_sentencepiece(ckpts, tmp_path):
    import sentencepiece as spm

    _export(ckpts["dense"], tmp_path / "m.gguf")
    sp = spm.SentencePieceProcessor(model_file=str(ckpts["dense"] / "tokenizer.model"))
    tokens = _field(tmp_path / "m.gguf", "tokenizer.ggml.tokens")
    scores = _field(tmp_path / "m.gguf", "tokenizer.ggml.scores")
    types = _field(tmp_path / "m.gguf", "tokenizer.ggml.token_type")
    assert tokens == [sp.id_to_piece(i) for i in range(160)]
    assert np.allclose(scores, [sp.get_score(i) for i in range(160)], rtol=0, atol=0)
    assert types[:5] == [gguf.TokenType.UNKNOWN] + [gguf.TokenType.CONTROL] * 4
    assert set(types[5:]) == {gguf.TokenType.NORMAL}


def test_tokenizer_is_padded_to_vocab_size(ckpts, tmp_path):
    tok = write_tiny_tokenizer(tmp_path / "tok150", 150)
    _export(ckpts["dense"], tmp_path / "m.gguf", tokenizer_dir=tok)
    tokens = _field(tmp_path / "m.gguf", "tokenizer.ggml.tokens")
    assert len(tokens) == 160 and tokens[150:] == [f"[PAD{i}]" for i in range(150, 160)]
    assert _field(tmp_path / "m.gguf", "tokenizer.ggml.token_type")[150:] == [gguf.TokenType.UNUSED] * 10
    assert _field(tmp_path / "m.gguf", "tokenizer.ggml.scores")[150:] == [-10000.0] * 10
    # no config.json beside this tokenizer: the special ids come from tokenizer.json / the checkpoint config
    assert _field(tmp_path / "m.gguf", "tokenizer.ggml.eos_token_id") == 2


def test_tokenizer_larger_than_vocab_is_an_error(ckpts, tmp_path):
    tok = write_tiny_tokenizer(tmp_path / "tok170", 170)
    with pytest.raises(GGUFExportError, match="170 pieces but the model has only vocab_size=160"):
        _export(ckpts["dense"], tmp_path / "m.gguf", tokenizer_dir=tok)
    assert [p.name for p in tmp_path.iterdir()] == ["tok170"]


def test_no_tokenizer_writes_no_vocab(ckpts, tmp_path):
    report = _export(ckpts["dense"], tmp_path / "m.gguf", tokenizer_dir=None)
    assert report.tokenizer is None and "no_vocab" in report.summary()
    assert _field(tmp_path / "m.gguf", "tokenizer.ggml.model") == "no_vocab"
    assert _field(tmp_path / "m.gguf", "ernie4_5.vocab_size") == 160


def test_tiny_tokenizer_is_deterministic_and_loads_in_transformers(tmp_path):
    import sentencepiece as spm
    from transformers import AutoTokenizer

    a, b = write_tiny_tokenizer(tmp_path / "a", 160), write_tiny_tokenizer(tmp_path / "b", 160)
    assert (a / "tokenizer.model").read_bytes() == (b / "tokenizer.model").read_bytes()
    assert (a / "tokenizer.json").read_bytes() == (b / "tokenizer.json").read_bytes()
    sp = spm.SentencePieceProcessor(model_file=str(a / "tokenizer.model"))
    hf = AutoTokenizer.from_pretrained(a)
    assert (hf.unk_token_id, hf.bos_token_id, hf.eos_token_id, hf.pad_token_id) == (0, 1, 2, 0)
    texts = [*TINY_CORPUS[:3], "the expert bias is load bearing", "norms keep the scale"]
    for text in texts:
        ids = hf(text).input_ids
        assert ids == [1] + sp.encode(text), text
