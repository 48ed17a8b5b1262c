"""KV-cache inference through Megatron-Core's ``StaticInferenceContext`` (``ernie45.megatron.inference``).

* cached decoding, one token at a time, gives the logits of a full forward at every position -- text MoE (with
  left padding, stock and position-driven RoPE) and VL prompts with an image or a video;
* greedy generation equals transformers' ``generate(do_sample=False)`` on the same tiny checkpoints -- dense, text
  MoE, VL with an image, a video, and a left-padded batch of two image prompts.

Single process, TP1, fp32.
"""

from __future__ import annotations

import pytest
import torch

from ernie45.bridge.live import load_hf
from ernie45.config import load_config
from ernie45.layout import Layout
from ernie45.megatron.inference import KVCacheSession, generate, teacher_forced_logits
from ernie45.reference import load_reference
from ernie45.testing import assert_bit_exact

from vl_helpers import make_batch

TOL = 1e-5
NEW = 8  # generated tokens


def _text_model(path, *, position_rope: bool = False):
    from ernie45.megatron.model import build_model

    cfg = load_config(path)
    chunks = build_model(cfg, Layout(), rope="position_ids" if position_rope else "arange")
    load_hf(chunks, cfg, Layout(), path)
    return cfg, chunks


def _text_batch(vocab: int, B: int = 2, S: int = 14, pad: int = 4, seed: int = 3):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (B, S), generator=g)  # no bos/eos/pad ids inside the prompt
    mask = torch.ones(B, S, dtype=torch.long)
    mask[1, :pad] = 0  # left padding
    ids[1, :pad] = 0
    return ids, mask


# ----------------------------------------------------------------------------------------------------------------------
# text


@pytest.mark.parametrize("position_rope", [False, True], ids=["rope", "position-ids-rope"])
def test_text_cached_decoding_equals_full_forward(position_rope, world1, tiny_ckpts):
    from ernie45.megatron.run import forward_logits

    cfg, chunks = _text_model(tiny_ckpts["moe"], position_rope=position_rope)
    ids, mask = _text_batch(cfg.vocab_size)
    valid = mask.bool()
    # the full forward: stock RoPE rotates by arange (padding included), HF by cumsum(mask)-1; both are what the
    # corresponding session uses, so the two agree to rounding either way
    pos = torch.arange(ids.shape[1]).expand_as(ids) if not position_rope else (mask.cumsum(1) - 1).clamp_min(0)
    full = forward_logits(chunks, ids, position_ids_BS=pos, padding_mask_BS=valid, vocab_size=cfg.vocab_size)
    stepped = teacher_forced_logits(chunks, cfg, ids, 5, attention_mask=mask)
    diff = (stepped - full)[valid].abs().max().item()
    assert diff <= TOL, f"max |Δlogits| = {diff}"


def test_prefill_materialises_only_the_last_position(world1, tiny_ckpts):
    cfg, chunks = _text_model(tiny_ckpts["moe"])
    ids, mask = _text_batch(cfg.vocab_size)
    session = KVCacheSession(chunks, cfg, batch_size=2, max_length=20)
    assert session.prefill(ids, attention_mask=mask).shape == (2, 1, cfg.vocab_size)
    assert session.length == ids.shape[1]
    assert session.step(torch.tensor([5, 6])).shape == (2, cfg.vocab_size)
    assert session.length == ids.shape[1] + 1
    with pytest.raises(ValueError, match="pad prompts on the left"):
        right_padded = torch.tensor([[1, 1, 1, 0]])
        KVCacheSession(chunks, cfg, batch_size=1, max_length=8).prefill(ids[:1, :4], attention_mask=right_padded)


@pytest.mark.parametrize("family", ["dense", "moe"])
def test_text_greedy_equals_transformers_generate(family, world1, tiny_ckpts):
    path = tiny_ckpts[family]
    cfg, chunks = _text_model(path)
    hf = load_reference(path)
    ids, mask = _text_batch(cfg.vocab_size, S=9, pad=3, seed=5)
    gc = hf.generation_config
    ref = hf.generate(input_ids=ids, attention_mask=mask, max_new_tokens=NEW, do_sample=False)
    mine = generate(
        chunks, cfg, ids, NEW, attention_mask=mask, eos_token_id=gc.eos_token_id, pad_token_id=gc.pad_token_id
    )
    assert_bit_exact(mine, ref, (mine[:, ids.shape[1] :], ref[:, ids.shape[1] :]))


# ----------------------------------------------------------------------------------------------------------------------
# VL

IMAGE_PROMPT = [("text", 3), ("image", (1, 4, 6)), ("text", 4)]
VIDEO_PROMPT = [("text", 2), ("video", (4, 4, 4)), ("text", 3)]


@pytest.fixture(scope="module")
def vl(world1, tmp_path_factory):
    from vl_helpers import bridged_tiny_vl

    return bridged_tiny_vl(tmp_path_factory.mktemp("vl-inference"))


def _prompt_inputs(batch):
    return {k: v for k, v in batch.items() if k != "input_ids"}


def _full_vl_inputs(cfg, prompt, ids):
    """Processor-style inputs for prompt + continuation ``ids`` (continuation tokens are text)."""
    from ernie45.megatron.vl_inputs import token_type_ids

    mm, moe = token_type_ids(ids, cfg)
    out = {k: v for k, v in prompt.items() if k.startswith("pixel_values") or k.endswith("grid_thw")}
    out.update(mm_token_type_ids=mm, moe_mm_token_type_ids=moe)
    if "attention_mask" in prompt:
        mask = prompt["attention_mask"]
        out["attention_mask"] = torch.cat([mask, mask.new_ones(ids.shape[0], ids.shape[1] - mask.shape[1])], dim=1)
    return out


@pytest.mark.parametrize("prompt", [IMAGE_PROMPT, VIDEO_PROMPT], ids=["image", "video"])
def test_vl_cached_decoding_equals_full_forward(prompt, vl):
    from ernie45.megatron.vl_inputs import vl_position_ids

    cfg, _, chunks = vl
    batch = make_batch(cfg, [prompt], seed=2)
    P = batch["input_ids"].shape[1]
    g = torch.Generator().manual_seed(9)
    ids = torch.cat([batch["input_ids"], torch.randint(1, 150, (1, 6), generator=g)], dim=1)  # text continuation
    full_inputs = _full_vl_inputs(cfg, batch, ids)
    chunk = chunks[0].eval()
    with torch.no_grad():
        full = chunk(ids, runtime_gather_output=True, **full_inputs)[..., : cfg.vocab_size]

    stepped = teacher_forced_logits(chunks, cfg, ids, P, **_prompt_inputs(batch))
    diff = (stepped - full).abs().max().item()
    assert diff <= TOL, f"max |Δlogits| = {diff}"

    # decode positions continue at max(prompt positions) + 1 on all three axes (HF's rope_delta), which is where
    # the full sequence's text positions continue too; continuing at the cache length instead changes the logits
    session = KVCacheSession(chunks, cfg, batch_size=1, max_length=ids.shape[1])
    session.prefill(batch["input_ids"], **_prompt_inputs(batch))
    for s in range(P, ids.shape[1]):
        session.step(ids[:, s])
    v = cfg.vision
    expected = vl_position_ids(
        ids,
        full_inputs["mm_token_type_ids"],
        full_inputs.get("image_grid_thw"),
        full_inputs.get("video_grid_thw"),
        spatial_merge_size=v.spatial_merge_size,
        temporal_merge_size=v.temporal_merge_size,
    )
    assert_bit_exact(session.positions, expected)
    assert int(session.positions[0, 0, P]) < P  # vision tokens span fewer positions than cache slots

    wrong = KVCacheSession(chunks, cfg, batch_size=1, max_length=ids.shape[1])
    wrong.prefill(batch["input_ids"], **_prompt_inputs(batch))
    wrong.next_position_B = torch.tensor([P])  # the cache length: what a 1-D-RoPE decoder would use
    off = max((wrong.step(ids[:, s]) - full[:, s]).abs().max().item() for s in range(P, ids.shape[1]))
    assert off > 1e-3, off


@pytest.mark.parametrize(
    "prompts",
    [[IMAGE_PROMPT], [VIDEO_PROMPT], [IMAGE_PROMPT, [("text", 2), ("image", (1, 8, 4)), ("text", 1)]]],
    ids=["image", "video", "padded-batch-of-two-images"],
)
def test_vl_greedy_equals_transformers_generate(prompts, vl):
    cfg, hf_model, chunks = vl
    batch = make_batch(cfg, prompts, seed=1)
    ref = hf_model.generate(**batch, max_new_tokens=NEW, do_sample=False)
    mine = generate(chunks, cfg, batch["input_ids"], NEW, **_prompt_inputs(batch))
    P = batch["input_ids"].shape[1]
    assert ref.shape[1] == P + NEW  # the tiny VL model has no eos: every step is compared
    assert_bit_exact(mine, ref, (mine[:, P:], ref[:, P:]))


# ----------------------------------------------------------------------------------------------------------------------
# 2 processes (gloo): decoding at TP2 / EP2 (a prompt per rank) / TP2·EP2 equals the unsharded model, text and VL
# (Megatron ViT, image)


@pytest.fixture(scope="module")
def two_process_decoding(tiny_ckpts, tmp_path_factory):
    import torch.multiprocessing as mp
    from conftest import free_port
    from inference_worker import worker
    from safetensors.torch import save_file

    from ernie45.testing import write_tiny_checkpoint

    root = tmp_path_factory.mktemp("decode-2proc")
    paths = {"dense": str(tiny_ckpts["dense"]), "moe": str(tiny_ckpts["moe"]),
             "vl": str(write_tiny_checkpoint(root / "vl", "vl", seed=7))}  # fmt: skip
    for family in ("dense", "moe"):
        ids, mask = _text_batch(load_config(paths[family]).vocab_size, S=12, pad=3, seed=8)
        save_file({"ids": ids, "attention_mask": mask, "prompt_len": torch.tensor(7)},
                  str(root / f"inputs-{family}.safetensors"))  # fmt: skip
    cfg = load_config(paths["vl"])
    batch = make_batch(cfg, [IMAGE_PROMPT], seed=2)
    text = torch.randint(1, 150, (1, 5), generator=torch.Generator().manual_seed(4))  # a text continuation
    vl_inputs = {"ids": torch.cat([batch["input_ids"], text], dim=1), "prompt_len": torch.tensor(batch["input_ids"].shape[1])}
    vl_inputs.update({k: v.contiguous() for k, v in _prompt_inputs(batch).items()})
    save_file(vl_inputs, str(root / "inputs-vl.safetensors"))
    mp.spawn(worker, args=(free_port(), paths, str(root)), nprocs=2, join=True)
    assert not (root / "error.txt").exists(), (root / "error.txt").read_text()
    return root


@pytest.mark.parametrize("case", ["dense-TP2", "moe-TP2", "moe-EP2", "moe-TP2xEP2", "vl-TP2xEP2-mgvit"])
def test_two_process_decoding_equals_unsharded(case, two_process_decoding):
    from safetensors.torch import load_file

    got = load_file(str(two_process_decoding / f"{case}.safetensors"))
    ref = load_file(str(two_process_decoding / f"{case}-ref.safetensors"))
    diff = (got["logits"] - ref["logits"]).abs().max().item()
    print(f"{case}: cached decoding, max |Δlogits| vs unsharded = {diff:.3g}")
    assert diff <= TOL
    assert_bit_exact(got["tokens"], ref["tokens"])
