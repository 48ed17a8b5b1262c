"""Packed rows (``ernie45.megatron.packing``): every sample of a pack gives the logits, loss and gradients it gives
when run alone -- text MoE, and VL with an image sample, a video sample and a text sample in one row.

Single process, TP1, fp32. The samples run alone go through the models' ordinary public forward (causal mask,
``arange`` positions / HF 3-D positions), so the comparison pins the pack against the path every other test
validates against transformers.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from ernie45.config import ConfigError, ErnieConfig, load_config
from ernie45.layout import Layout
from ernie45.megatron.model import causal_mask
from ernie45.megatron.packing import block_causal_mask, forward_packed, pack
from ernie45.megatron.vl_inputs import lm_labels, masked_token_mean
from ernie45.testing import assert_bit_exact, tiny_hf_config

from vl_helpers import make_batch

TOL = 1e-5
TEXT_LENGTHS = (5, 9, 1, 7)  # a one-token sample has no target: its loss is NaN, its logits still count


def _alone_text(chunk, ids_S):
    """Logits [1, S, V] and mean loss of one sample through the model's ordinary forward."""
    S = ids_S.numel()
    ids_BS, pos_BS = ids_S.view(1, S), torch.arange(S).view(1, S)
    logits = chunk(ids_BS, pos_BS, causal_mask(S), runtime_gather_output=True)
    labels, loss_mask = lm_labels(ids_BS)
    loss = masked_token_mean(chunk(ids_BS, pos_BS, causal_mask(S), labels=labels), loss_mask)
    return logits, loss


# ----------------------------------------------------------------------------------------------------------------------
# the packed batch itself (no model)


def test_pack_layout_labels_and_mask():
    cfg = ErnieConfig.from_hf(tiny_hf_config("moe"))
    g = torch.Generator().manual_seed(0)
    samples = [torch.randint(0, 150, (n,), generator=g) for n in (3, 4)]
    samples[1] = {"input_ids": samples[1], "labels": torch.tensor([-100, -100, 7, 8])}  # prompt tokens carry no loss
    p = pack(samples, cfg, pad_to_multiple_of=4)  # 7 tokens + 1 padding

    assert p.cu_seqlens.tolist() == [0, 3, 7] and p.boundaries == [(0, 3), (3, 7)] and p.seq_len == 8
    assert p.segment_ids.tolist() == [[0, 0, 0, 1, 1, 1, 1, -1]]
    assert p.position_ids.tolist() == [[0, 1, 2, 0, 1, 2, 3, 0]]
    # shifted inside each sample; a sample's last token predicts nothing (not the next sample's first token)
    ids = p.input_ids[0].tolist()
    assert p.labels[0].tolist() == [ids[1], ids[2], 0, 0, 7, 8, 0, 0]
    assert p.loss_mask[0].tolist() == [1, 1, 0, 0, 1, 1, 0, 0]
    # token 3 (first of sample 1) sees only itself; token 2 sees sample 0; the padding sees only padding
    visible = ~p.attention_mask[0, 0]
    assert visible[3].nonzero().flatten().tolist() == [3]
    assert visible[2].nonzero().flatten().tolist() == [0, 1, 2]
    assert visible[7].nonzero().flatten().tolist() == [7]
    assert_bit_exact(block_causal_mask(torch.zeros(1, 8, dtype=torch.long)), causal_mask(8))

    thd = p.packed_seq_params()  # the padding tail becomes a sequence of its own for THD kernels
    assert thd.qkv_format == "thd" and thd.cu_seqlens_q.tolist() == [0, 3, 7, 8] and thd.max_seqlen_q == 4
    pieces = p.unpack(p.input_ids)
    assert [t.shape[1] for t in pieces] == [3, 4]


def test_pack_refuses_keys_it_would_ignore():
    cfg = ErnieConfig.from_hf(tiny_hf_config("moe"))
    with pytest.raises(ValueError, match="unexpected keys"):
        pack([{"input_ids": torch.arange(4), "pixel_values": torch.zeros(1)}], cfg)


# ----------------------------------------------------------------------------------------------------------------------
# text MoE


@pytest.fixture(scope="module")
def moe(world1, tiny_ckpts):
    from ernie45.bridge.live import load_hf
    from ernie45.megatron.model import build_model

    path = tiny_ckpts["moe"]
    cfg = load_config(path)
    stock = build_model(cfg, Layout())
    load_hf(stock, cfg, Layout(), path)
    g = torch.Generator().manual_seed(1)
    samples = [torch.randint(0, cfg.vocab_size, (n,), generator=g) for n in TEXT_LENGTHS]
    # the references: every sample alone, through the stock "rope" model (rotates by arange(S))
    stock[0].eval()
    with torch.no_grad():
        alone = [_alone_text(stock[0], s) for s in samples]
    # the model packed rows run on: the same weights, rotating by position_ids
    chunks = build_model(cfg, Layout(), rope="position_ids")
    load_hf(chunks, cfg, Layout(), path)
    chunks[0].eval()
    return cfg, chunks, samples, alone


def test_text_packing_needs_position_driven_rope(moe):
    from ernie45.megatron.model import build_model

    cfg, _, samples, _ = moe

    fresh = build_model(cfg, Layout())  # a stock model rotates by arange(S): refused rather than silently wrong
    with pytest.raises(ConfigError, match="rope=.position_ids"):
        forward_packed(fresh[0], pack(samples, cfg), cfg)


def test_position_ids_rope_is_bit_identical_to_rope(moe):
    cfg, chunks, samples, alone = moe
    with torch.no_grad():
        for s, (ref, _) in zip(samples, alone):
            out, _ = _alone_text(chunks[0], s)
            assert_bit_exact(out, ref)


def test_packed_text_moe_equals_samples_alone(moe):
    cfg, chunks, samples, alone = moe
    p = pack(samples, cfg, pad_to_multiple_of=8)
    with torch.no_grad():
        logits = forward_packed(chunks[0], p, cfg, runtime_gather_output=True)
        losses = p.per_sample_loss(forward_packed(chunks[0], p, cfg, with_loss=True))
    dl = max((mine - ref).abs().max().item() for mine, (ref, _) in zip(p.unpack(logits), alone))
    ref_losses = torch.stack([loss for _, loss in alone])
    assert dl <= TOL, f"max |Δlogits| = {dl}"
    torch.testing.assert_close(losses, ref_losses, atol=TOL, rtol=0, equal_nan=True)
    assert torch.isnan(losses[2])  # the one-token sample


def test_packed_text_moe_gradients_equal_samples_alone(moe):
    """Training-grade: d(sum of per-sample mean losses) is the same packed or one by one."""
    cfg, chunks, samples, _ = moe
    chunk = chunks[0].train()
    trainable = [s for s in samples if s.numel() > 1]
    chunk.zero_grad(set_to_none=True)
    for s in trainable:
        _alone_text(chunk, s)[1].backward()
    ref = {n: p.grad.clone() for n, p in chunk.named_parameters() if p.grad is not None}
    chunk.zero_grad(set_to_none=True)
    p = pack(trainable, cfg)
    p.per_sample_loss(forward_packed(chunk, p, cfg, with_loss=True)).sum().backward()
    got = {n: p_.grad for n, p_ in chunk.named_parameters() if p_.grad is not None}
    chunk.eval()
    assert sorted(got) == sorted(ref)
    worst = max((got[n] - ref[n]).abs().max().item() for n in ref)
    assert worst <= TOL, f"max |Δgrad| = {worst}"


def test_packed_row_without_block_mask_differs(moe):
    """The negative control: a plain causal mask lets later samples attend to earlier ones."""
    cfg, chunks, samples, alone = moe
    p = pack(samples, cfg)
    leaky = dataclasses.replace(p, attention_mask=causal_mask(p.seq_len))
    with torch.no_grad():
        logits = forward_packed(chunks[0], leaky, cfg, runtime_gather_output=True)
    diffs = [(mine - ref).abs().max().item() for mine, (ref, _) in zip(leaky.unpack(logits), alone)]
    assert diffs[0] <= TOL  # the first sample has nobody before it
    assert min(diffs[1:]) > 1e-2, diffs


# ----------------------------------------------------------------------------------------------------------------------
# VL: an image sample, a video sample, a text-only sample and an image-first sample in one row

VL_SAMPLES = [
    [("text", 3), ("image", (1, 4, 6)), ("text", 5)],
    [("text", 2), ("video", (4, 4, 4)), ("text", 4)],
    [("text", 6)],
    [("image", (1, 8, 4)), ("text", 3)],
]


@pytest.fixture(scope="module")
def vl(world1, tmp_path_factory):
    from vl_helpers import bridged_tiny_vl

    cfg, hf_model, chunks = bridged_tiny_vl(tmp_path_factory.mktemp("vl-pack"))
    chunk = chunks[0].eval()
    samples = [make_batch(cfg, [s], seed=10 + i) for i, s in enumerate(VL_SAMPLES)]
    alone = []
    with torch.no_grad():
        for s in samples:
            labels, loss_mask = lm_labels(s["input_ids"])
            logits = chunk(**s, runtime_gather_output=True)
            alone.append((logits, masked_token_mean(chunk(**s, labels=labels), loss_mask)))
    return cfg, hf_model, chunk, samples, alone


def test_vl_pack_positions_are_hf_positions_of_each_sample_alone(vl):
    cfg, hf_model, _, samples, _ = vl
    p = pack(samples, cfg)
    for s, pos_3BS in zip(samples, p.unpack(p.position_ids, dim=2)):
        ref, _ = hf_model.model.get_rope_index(
            s["input_ids"],
            mm_token_type_ids=s["mm_token_type_ids"],
            image_grid_thw=s.get("image_grid_thw"),
            video_grid_thw=s.get("video_grid_thw"),
        )
        assert_bit_exact(pos_3BS, ref)


def test_packed_vl_equals_samples_alone(vl):
    cfg, hf_model, chunk, samples, alone = vl
    p = pack(samples, cfg, pad_to_multiple_of=8)
    assert p.image_grid_thw.shape[0] == 2 and p.video_grid_thw.shape[0] == 1
    with torch.no_grad():
        logits = forward_packed(chunk, p, cfg, runtime_gather_output=True)
        losses = p.per_sample_loss(forward_packed(chunk, p, cfg, with_loss=True))
        hf_logits = [hf_model(**s).logits for s in samples]
    pieces = [t[..., : cfg.vocab_size] for t in p.unpack(logits)]
    dl = max((mine - ref[..., : cfg.vocab_size]).abs().max().item() for mine, (ref, _) in zip(pieces, alone))
    assert dl <= TOL, f"max |Δlogits| vs alone = {dl}"
    torch.testing.assert_close(losses, torch.stack([loss for _, loss in alone]), atol=TOL, rtol=0)
    # and against transformers running each sample alone
    dh = max((mine - ref).abs().max().item() for mine, ref in zip(pieces, hf_logits))
    assert dh <= 1e-4, f"max |Δlogits| vs HF = {dh}"


def test_packed_vl_without_block_mask_differs(vl):
    cfg, _, chunk, samples, alone = vl
    p = pack(samples, cfg)
    leaky = dataclasses.replace(p, attention_mask=causal_mask(p.seq_len))
    with torch.no_grad():
        logits = forward_packed(chunk, leaky, cfg, runtime_gather_output=True)
    diffs = [(mine - ref).abs().max().item() for mine, (ref, _) in zip(leaky.unpack(logits), alone)]
    assert diffs[0] <= TOL and min(diffs[1:]) > 1e-2, diffs
