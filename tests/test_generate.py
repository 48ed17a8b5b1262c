"""``ernie45 generate``: greedy tokens from Megatron-Core equal transformers' own ``generate()`` (tiny models).

The oracle is transformers' ``GenerationMixin.generate(do_sample=False)`` with its KV cache -- an independent
implementation of greedy decoding. Every backend (transformers, Megatron-Core with its KV cache and with full
recompute, from an HF dir and from torch_dist, llama.cpp from GGUF when importable) must give the same tokens.
"""

from __future__ import annotations


import pytest
import torch

from ernie45.assets import embedded_checkpoint
from ernie45.convert import convert
from ernie45.cli import main
from ernie45.generate import GenerateError, generate
from ernie45.testing import write_tiny_checkpoint
from ernie45.inputs import PromptError
from ernie45.runtime import llama_cpp_available

N_NEW = 10


def _hf_greedy(path, ids: list[int], n: int) -> list[int]:
    from ernie45.reference import load_reference

    model = load_reference(path)
    out = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                         do_sample=False, max_new_tokens=n)  # fmt: skip
    return out[0, len(ids) :].tolist()


@pytest.mark.llama  # its llama.cpp half runs in .ci/run's llama target
def test_text_moe_all_backends_equal_transformers_generate(tmp_path, capsys):
    src = embedded_checkpoint("tiny-ernie45-moe")  # ships a tokenizer
    prompt = "the router takes a softmax over"
    mg = generate(src, prompt, max_new_tokens=N_NEW, backend="megatron")
    want = _hf_greedy(src, mg.prompt_ids, N_NEW)
    assert mg.prompt_ids[0] == 1 and len(want) == N_NEW  # BOS from the tokenizer; no early EOS on this prompt
    assert mg.new_ids == want, "Megatron-Core greedy differs from transformers.generate"
    assert (mg.backend, mg.decoding, mg.stop) == ("megatron-core", "kv-cache", "max_new_tokens") and mg.text
    full = generate(src, prompt, max_new_tokens=N_NEW, backend="megatron", kv_cache=False)
    assert full.decoding == "full-recompute" and full.new_ids == want

    hf = generate(src, prompt, max_new_tokens=N_NEW)  # auto: transformers for an HF dir
    assert hf.backend == "transformers" and hf.new_ids == want and hf.text == mg.text

    dist = tmp_path / "mg"
    convert(src, dist, to="megatron", tp=2, pp=2, ep=2, progress=False)
    assert main(["generate", str(dist), "--prompt", prompt, "--max-new-tokens", str(N_NEW)]) == 0
    out = capsys.readouterr().out
    assert "(megatron-core, greedy, kv-cache): 14 prompt tokens -> 10 new" in out and f"ids: {want}" in out

    if llama_cpp_available():
        gguf = tmp_path / "m.gguf"
        convert(src, gguf, to="gguf", progress=False)  # with the tokenizer: llama.cpp tokenizes the prompt itself
        g = generate(gguf, prompt, max_new_tokens=N_NEW)
        assert g.backend == "llama.cpp" and g.prompt_ids == mg.prompt_ids and g.new_ids == want and g.text == mg.text


def test_dense_token_ids_and_eos(tmp_path):
    """No tokenizer: the prompt is ids and the output ids. Generation stops at EOS exactly like transformers."""
    ck = write_tiny_checkpoint(tmp_path / "dense", "dense", seed=8, tie_word_embeddings=False)
    ids = [1, 17, 42, 99, 5, 63]
    g = generate(ck, " ".join(map(str, ids)), max_new_tokens=N_NEW, backend="megatron")
    assert g.prompt_ids == ids and g.text is None
    assert g.new_ids == _hf_greedy(ck, ids, N_NEW)
    # EOS: make the first greedy token the EOS id and check both stop right there
    eos = g.new_ids[0]
    (ck / "generation_config.json").write_text(f'{{"eos_token_id": {eos}, "bos_token_id": 1, "pad_token_id": 0}}')
    stopped = generate(ck, ids, max_new_tokens=N_NEW, backend="megatron")
    assert stopped.new_ids == [eos] and stopped.stop == "eos"
    assert _hf_greedy(ck, ids, N_NEW) == [eos]
    assert generate(ck, ids, max_new_tokens=3, backend="megatron", stop_at_eos=False).new_ids == g.new_ids[:3]


def test_vl_with_image_megatron_equals_transformers(tmp_path):
    from PIL import Image

    ck = write_tiny_checkpoint(tmp_path / "vl", "vl", seed=9)
    (ck / "generation_config.json").write_text('{"bos_token_id": 1}')  # the tiny VL config names no BOS
    image = tmp_path / "img.png"
    pixels = torch.rand(56, 84, 3, generator=torch.Generator().manual_seed(2)) * 255
    Image.fromarray(pixels.to(torch.uint8).numpy()).save(image)
    ids = [1, 33, 71, 12, 140]
    a = generate(ck, ids, image=image, max_new_tokens=8, backend="megatron", stop_at_eos=False)
    b = generate(ck, ids, image=image, max_new_tokens=8, backend="transformers", stop_at_eos=False)
    c = generate(ck, ids, image=image, max_new_tokens=8, backend="megatron", stop_at_eos=False, kv_cache=False)
    assert a.new_ids == b.new_ids == c.new_ids and len(a.new_ids) == 8
    # the image block (start, 2x3 placeholders, end) sits right after the BOS; no vision id is generated
    assert a.prompt_ids == [1, 150] + [152] * 6 + [151] + ids[1:]
    assert not set(a.new_ids) & set(range(150, 156))


def test_refusals(tmp_path):
    bare = write_tiny_checkpoint(tmp_path / "bare", "dense", seed=1)
    with pytest.raises(GenerateError, match="no tokenizer, so the prompt must be whitespace-separated token ids"):
        generate(bare, "hello there")
    with pytest.raises(GenerateError, match="runs with megatron, not transformers"):
        dist = tmp_path / "mg"
        convert(bare, dist, to="megatron", progress=False)
        generate(dist, "1 2", backend="transformers")
    with pytest.raises(GenerateError, match=r"prompt token ids must lie in \[0, 160\)"):
        generate(bare, [1, 500], backend="megatron")
    vl = write_tiny_checkpoint(tmp_path / "vl", "vl", seed=1)
    with pytest.raises(PromptError, match=r"text token id\(s\) \[152\] are this VL config's \['image_token_id'\]"):
        generate(vl, [1, 152, 3])


def test_embedded_vl_tokenizer_keeps_vision_ids_out_of_text():
    """The embedded VL checkpoint's image / video ids are its tokenizer's control pieces: text never yields them."""
    import transformers

    from ernie45.assets import embedded_checkpoint
    from ernie45.config import load_config
    from ernie45.testing_tokenizer import TINY_CORPUS, VL_CONTROL_TOKENS
    from ernie45.inputs import vision_special_ids

    src = embedded_checkpoint("tiny-ernie45-vl")
    cfg, tok = load_config(src), transformers.AutoTokenizer.from_pretrained(str(src))
    reserved = set(vision_special_ids(cfg))
    assert sorted(tok.convert_tokens_to_ids(list(VL_CONTROL_TOKENS))) == sorted(reserved)
    for line in TINY_CORPUS:
        assert not set(tok(line)["input_ids"]) & reserved, line
    g = generate(src, TINY_CORPUS[0], max_new_tokens=4, backend="megatron", stop_at_eos=False)
    assert len(g.new_ids) == 4
