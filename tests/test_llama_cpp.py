"""Our GGUF files in real llama.cpp (through llama-cpp-python) against transformers, on tiny random ERNIE 4.5 models.

Needs ``llama-cpp-python`` built with ERNIE 4.5 support (0.3.36 vendors a llama.cpp that has ``ernie4_5`` and
``ernie4_5-moe``); skipped otherwise. CI installs it with

    CMAKE_ARGS="-DGGML_NATIVE=OFF -DLLAVA_BUILD=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF \
        -DLLAMA_BUILD_TOOLS=OFF -DLLAMA_BUILD_SERVER=OFF" pip install llama-cpp-python==0.3.36

Models: every parameter re-randomised, including the expert-selection bias and the norms (``build_hf_model``).
``hidden_size`` is 96 so every matrix row is a multiple of the q8_0 block (32) and q8_0 really is q8_0; the MoE
uses a dense first layer then MoE (the pattern llama.cpp supports) with top-3 of 8 experts and 2 shared experts;
the dense model has head_dim 16 != hidden / heads = 24 and a tied head, the MoE model an untied head.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

pytestmark = pytest.mark.llama
llama_cpp = pytest.importorskip(
    "llama_cpp",
    reason="llama-cpp-python not installed; CI: CMAKE_ARGS=\"-DGGML_NATIVE=OFF ...\" pip install llama-cpp-python==0.3.36",
)

from ernie45.bridge.gguf import export_gguf  # noqa: E402
from ernie45.bridge.io import HFCheckpoint  # noqa: E402
from ernie45.config import ErnieConfig  # noqa: E402
from ernie45.testing import build_hf_model, tiny_hf_config  # noqa: E402
from ernie45.testing_tokenizer import TINY_CORPUS, write_tiny_tokenizer  # noqa: E402

CASES = {
    "dense": ("dense", {"hidden_size": 96}, 11),
    "moe": ("moe", {"hidden_size": 96, "moe_layer_interval": 1}, 12),
}
GGML_TYPE_F32 = 0

# f32 tolerance. Measured: max |logit diff| 4.9e-6 (dense) / 5.9e-6 (MoE) on logits of magnitude ~4-5, i.e. plain
# float32 rounding from a different summation order (ggml's SIMD dot products vs torch's GEMM). 1e-4 leaves ~15x
# headroom for other CPUs / thread counts and is still ~4 orders of magnitude below any layout or semantic error
# (dropping the expert bias: 1.7; NeoX-permuting Q/K: 3.8 -- see test_the_comparison_can_fail). The KV cache is
# kept f32 and flash attention off: llama.cpp's defaults (f16 K/V; the CPU flash-attention path rounds to f16)
# move these random-weight logits by up to 0.5, which would measure f16 rounding, not the export.
F32_ATOL = 1e-4
# q8_0 changes the weights (per-32 block, 8-bit), so logits move by O(0.1) and near-tied routing / argmax flips;
# measured top-1 agreement 94.9% (dense, 166/175) / 86.9% (MoE, 152/175) on these prompts. 75% still catches a
# broken file (chance agreement is ~1/160).
Q8_MIN_TOP1 = 0.75


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """family -> (HF model, checkpoint dir, {outtype: gguf path}, {outtype: report})."""
    root = tmp_path_factory.mktemp("llama")
    out = {}
    for name, (family, overrides, seed) in CASES.items():
        model = build_hf_model(tiny_hf_config(family, **overrides), seed=seed)
        ckpt = root / name
        model.save_pretrained(ckpt)
        cfg = ErnieConfig.from_file(ckpt)
        write_tiny_tokenizer(ckpt, cfg.vocab_size)
        paths, reports = {}, {}
        for outtype in ("f32", "q8_0"):
            paths[outtype] = root / f"{name}.{outtype}.gguf"
            reports[outtype] = export_gguf(
                HFCheckpoint(ckpt), cfg, paths[outtype], outtype=outtype, tokenizer_dir=ckpt, progress=False
            )
        out[name] = (model, ckpt, paths, reports)
    return out


def _prompts(ckpt: Path) -> list[list[int]]:
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(ckpt / "tokenizer.model"))
    g = torch.Generator().manual_seed(0)
    random_ids = [torch.randint(3, 160, (n,), generator=g).tolist() for n in (5, 12, 24, 40)]
    return random_ids + [[1] + sp.encode(line) for line in TINY_CORPUS[:3]]


def _llama(path: Path):
    return llama_cpp.Llama(
        str(path),
        n_ctx=64,
        logits_all=True,
        type_k=GGML_TYPE_F32,
        type_v=GGML_TYPE_F32,
        flash_attn=False,
        n_threads=2,
        seed=0,
        verbose=False,
    )


def _llama_logits(llm, ids: list[int]) -> np.ndarray:
    llm.reset()
    llm.eval(ids)
    return np.array(llm.scores[: len(ids)], dtype=np.float32)


def _hf_logits(model, ids: list[int]) -> np.ndarray:
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].float().numpy()


@pytest.mark.parametrize("name", list(CASES))
def test_f32_logits_match_transformers(name, built):
    model, ckpt, paths, _ = built[name]
    llm = _llama(paths["f32"])
    worst = 0.0
    for ids in _prompts(ckpt):
        ref, got = _hf_logits(model, ids), _llama_logits(llm, ids)
        assert got.shape == ref.shape == (len(ids), 160)
        worst = max(worst, float(np.abs(ref - got).max()))
        np.testing.assert_allclose(got, ref, rtol=0, atol=F32_ATOL, err_msg=f"{name} prompt {ids}")
        assert (got.argmax(-1) == ref.argmax(-1)).all(), f"{name}: top-1 differs for prompt {ids}"
    print(f"\n{name} f32: max |llama.cpp - transformers| = {worst:.2e} (tolerance {F32_ATOL:.0e})")


@pytest.mark.parametrize("name", list(CASES))
def test_q8_0_runs_and_mostly_agrees_on_top1(name, built):
    model, ckpt, paths, reports = built[name]
    assert not reports["q8_0"].notes  # nothing fell back to f16: this really is q8_0
    assert {t for _, _, t in reports["q8_0"].tensors} == {"Q8_0", "F32"}
    llm = _llama(paths["q8_0"])
    agree = total = 0
    for ids in _prompts(ckpt):
        ref, got = _hf_logits(model, ids), _llama_logits(llm, ids)
        assert np.isfinite(got).all()
        agree += int((got.argmax(-1) == ref.argmax(-1)).sum())
        total += len(ids)
    rate = agree / total
    print(f"\n{name} q8_0: top-1 agreement with transformers fp32 {agree}/{total} = {rate:.1%}")
    assert rate >= Q8_MIN_TOP1


def test_tokenizer_metadata_tokenizes_like_sentencepiece(built):
    import sentencepiece as spm

    _, ckpt, paths, _ = built["dense"]
    sp = spm.SentencePieceProcessor(model_file=str(ckpt / "tokenizer.model"))
    llm = _llama(paths["f32"])
    assert (llm.token_bos(), llm.token_eos(), llm.n_vocab()) == (1, 2, 160)
    for text in [*TINY_CORPUS, "the experts and the router"]:
        ids = llm.tokenize(text.encode(), add_bos=True, special=False)
        assert ids == [1] + sp.encode(text), text
        # with the BOS in front, llama.cpp strips the "▁" prefix like SentencePiece's decode does
        assert llm.detokenize(ids).decode() == sp.decode(ids) == text


def test_gguf_without_tokenizer_runs(built, tmp_path):
    """tokenizer_dir=None writes a no_vocab GGUF: llama.cpp runs it on ids with the same logits."""
    model, ckpt, paths, _ = built["dense"]
    out = tmp_path / "novocab.gguf"
    export_gguf(HFCheckpoint(ckpt), ErnieConfig.from_file(ckpt), out, progress=False)
    ids = _prompts(ckpt)[2]
    np.testing.assert_array_equal(_llama_logits(_llama(out), ids), _llama_logits(_llama(paths["f32"]), ids))


class _ZeroExpertBias:
    """The real checkpoint with the expert-selection bias zeroed (what a converter that drops it produces)."""

    def __init__(self, base):
        self.base = base

    def keys(self):
        return self.base.keys()

    def shape(self, name):
        return self.base.shape(name)

    def dtype(self, name):
        return self.base.dtype(name)

    def get(self, name):
        t = self.base.get(name)
        return torch.zeros_like(t) if name.endswith("e_score_correction_bias") else t


def test_the_comparison_can_fail(built, tmp_path):
    """The parity test has power: a GGUF without the (randomised) expert bias is far outside the tolerance."""
    model, ckpt, _, _ = built["moe"]
    out = tmp_path / "nobias.gguf"
    export_gguf(_ZeroExpertBias(HFCheckpoint(ckpt)), ErnieConfig.from_file(ckpt), out, tokenizer_dir=ckpt, progress=False)
    llm = _llama(out)
    worst = max(float(np.abs(_hf_logits(model, ids) - _llama_logits(llm, ids)).max()) for ids in _prompts(ckpt))
    assert worst > 100 * F32_ATOL


@pytest.mark.parametrize("name", list(CASES))
def test_from_megatron_tp2_pp2_ep2(name, built, tmp_path):
    """HF -> torch_dist at TP2·PP2(·EP2) -> GGUF runs in llama.cpp exactly like the GGUF made from HF."""
    from ernie45.convert import convert

    model, ckpt, paths, _ = built[name]
    layout = dict(tp=2, pp=2, ep=2) if name == "moe" else dict(tp=2, pp=2)
    convert(ckpt, tmp_path / "mcore", to="megatron", progress=False, **layout)
    gguf = tmp_path / "from-mcore.gguf"
    convert(tmp_path / "mcore", gguf, to="gguf", progress=False)
    from_hf, from_mg = _llama(paths["f32"]), _llama(gguf)
    for ids in _prompts(ckpt):
        ref, got = _hf_logits(model, ids), _llama_logits(from_mg, ids)
        np.testing.assert_allclose(got, ref, rtol=0, atol=F32_ATOL, err_msg=f"{name} prompt {ids}")
        assert (got.argmax(-1) == ref.argmax(-1)).all()
        assert np.array_equal(got, _llama_logits(from_hf, ids))  # same weights, same file contents: same numbers
