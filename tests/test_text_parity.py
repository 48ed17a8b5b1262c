"""Megatron-Core ERNIE (dense, MoE) loaded through the production bridge == transformers, fp32.

Every HF parameter and buffer is re-randomised (``ernie45.testing.rerandomise``), including the expert bias that
transformers zero-initialises, so a routing bug changes the chosen experts and fails the test.
"""

from __future__ import annotations

import pytest
import torch

from ernie45.bridge.io import HFCheckpoint
from ernie45.bridge.live import gather_hf, load_hf
from ernie45.bridge.tables import effective_tie
from ernie45.config import load_config
from ernie45.layout import Layout
from ernie45.megatron.model import build_model
from ernie45.megatron.run import forward_backward, forward_logits
from ernie45.reference import load_reference
from ernie45.runtime import capture_routing
from ernie45.testing import assert_bit_exact, grad_differences, hf_loss_and_grads

B, S = 3, 11


def _batch(vocab):
    g = torch.Generator().manual_seed(7)
    ids = torch.randint(0, vocab, (B, S), generator=g)
    mask = torch.ones(B, S, dtype=torch.bool)
    mask[1, :3] = False  # left padding
    mask[2, :5] = False
    pos = torch.arange(S).expand(B, S)
    return ids, mask, pos


def _megatron(path, megatron):
    cfg = load_config(path)
    ckpt = HFCheckpoint(path)
    layout = Layout()
    megatron(layout)
    chunks = build_model(cfg, layout, tie_word_embeddings=effective_tie(cfg, ckpt.keys()))
    load_hf(chunks, cfg, layout, ckpt)
    return cfg, ckpt, layout, chunks


@pytest.mark.parametrize("family", ["dense", "moe", "moe-tied", "dense-untied"])
def test_logits_and_routing_match_transformers(family, tiny_ckpts, megatron):
    path = tiny_ckpts[family]
    cfg, _, _, chunks = _megatron(path, megatron)
    ids, mask, pos = _batch(cfg.vocab_size)
    hf = load_reference(path)
    with torch.no_grad(), capture_routing([hf], "transformers", cfg, ids) as hf_routing:
        ref = hf(input_ids=ids, attention_mask=mask.long(), position_ids=pos).logits
    with capture_routing(chunks, "megatron", cfg, ids) as mg_routing:
        out = forward_logits(chunks, ids, position_ids_BS=pos, padding_mask_BS=mask, vocab_size=cfg.vocab_size)
    diff = (out - ref).abs()[mask].max().item()
    assert diff <= 1e-4, f"max |Δlogits| = {diff}"
    assert sorted(hf_routing) == sorted(mg_routing) == [(L, "text") for L in cfg.moe_layers]
    for layer in cfg.moe_layers:
        mine = mg_routing[(layer, "text")].chosen_BSE[mask]
        theirs = hf_routing[(layer, "text")].chosen_BSE[mask]
        assert mine.sum(-1).eq(cfg.moe_k).all()
        bad = (mine != theirs).any(-1).nonzero().flatten().tolist()
        assert not bad, f"layer {layer}: tokens {bad} routed to different experts"


GRAD_RTOL = 1e-4


@pytest.mark.parametrize("family", ["dense", "moe", "moe-tied", "dense-untied"])
def test_loss_and_grads_match_transformers(family, tiny_ckpts, megatron):
    """One forward+backward through Megatron's schedule: the loss and every parameter's gradient (under HF names,
    full tensors) equal transformers' own backward on the same batch -- the router's gradient included."""
    path = tiny_ckpts[family]
    cfg, ckpt, layout, chunks = _megatron(path, megatron)
    g = torch.Generator().manual_seed(12)
    ids = torch.randint(0, cfg.vocab_size, (B, S), generator=g)
    labels = torch.randint(0, cfg.vocab_size, (B, S), generator=g)
    ref_loss, ref_grads = hf_loss_and_grads(load_reference(path), ids, labels)
    loss = forward_backward(chunks, ids, labels)
    grads = gather_hf(chunks, cfg, layout, tied=effective_tie(cfg, ckpt.keys()), getter=lambda p: p.grad)
    assert abs(loss.item() - ref_loss.item()) <= 1e-5 * abs(ref_loss.item()), (loss.item(), ref_loss.item())
    rel = grad_differences(grads, ref_grads)
    assert len(rel) == len([n for n in ckpt.keys() if "e_score_correction_bias" not in n])  # every weight trains
    if cfg.moe_layers:
        assert any(".mlp.gate.weight" in n for n in rel)  # the router's gradient is compared
    worst = max(rel, key=rel.get)
    print(f"{family}: {len(rel)} grads, worst relative diff {rel[worst]:.3g} ({worst})")
    assert rel[worst] <= GRAD_RTOL, {n: r for n, r in rel.items() if r > GRAD_RTOL}


def test_expert_bias_changes_choices(tiny_ckpts, megatron):
    """Guard against a vacuous routing test: without the bias, some tokens choose other experts."""
    path = tiny_ckpts["moe"]
    cfg, _, _, chunks = _megatron(path, megatron)
    ids, mask, pos = _batch(cfg.vocab_size)
    with capture_routing(chunks, "megatron", cfg, ids) as with_bias:
        forward_logits(chunks, ids, position_ids_BS=pos, padding_mask_BS=mask)
    with torch.no_grad():
        for name, buf in chunks[0].named_buffers():
            if name.endswith("router.expert_bias"):
                buf.zero_()
    with capture_routing(chunks, "megatron", cfg, ids) as without_bias:
        forward_logits(chunks, ids, position_ids_BS=pos, padding_mask_BS=mask)
    changed = sum(int((with_bias[k].chosen_BSE != without_bias[k].chosen_BSE).any(-1).sum()) for k in with_bias)
    assert sorted(with_bias) == [(L, "text") for L in cfg.moe_layers]
    assert changed > 0


@pytest.mark.parametrize("family", ["dense", "moe", "moe-tied", "dense-untied"])
def test_hf_to_megatron_to_hf_is_bit_exact(family, tiny_ckpts, megatron):
    path = tiny_ckpts[family]
    cfg, ckpt, layout, chunks = _megatron(path, megatron)
    state = gather_hf(chunks, cfg, layout, tied=effective_tie(cfg, ckpt.keys()))
    assert set(state) == set(ckpt.keys())
    for name in ckpt.keys():
        assert_bit_exact(state[name], ckpt.get(name), name)


def test_router_equals_hf_router():
    """ErnieTopKRouter's top-k == HF Ernie4_5_MoeTopKRouter on random logits and a random bias; variants differ."""
    from transformers.models.ernie4_5_moe.configuration_ernie4_5_moe import Ernie4_5_MoeConfig
    from transformers.models.ernie4_5_moe.modeling_ernie4_5_moe import Ernie4_5_MoeTopKRouter

    from ernie45.megatron.router import ernie_topk

    g = torch.Generator().manual_seed(3)
    E, H, K, T = 16, 24, 4, 200
    hf = Ernie4_5_MoeTopKRouter(Ernie4_5_MoeConfig(hidden_size=H, moe_num_experts=E, moe_k=K))
    with torch.no_grad():
        hf.weight.copy_(torch.randn(E, H, generator=g))
        hf.moe_statics.e_score_correction_bias.copy_(torch.rand(1, E, generator=g) * 0.3)
    x = torch.randn(T, H, generator=g)
    _, w_ref, idx_ref = hf(x)
    logits = x @ hf.weight.t()
    probs, rmap = ernie_topk(logits, hf.moe_statics.e_score_correction_bias[0], K, 1e-12)
    ref_map = torch.zeros(T, E, dtype=torch.bool).scatter(1, idx_ref, True)
    assert_bit_exact(rmap, ref_map)
    torch.testing.assert_close(torch.gather(probs, 1, idx_ref), w_ref, rtol=0, atol=1e-7)
    # the variants a converter gets wrong: bias ignored, sigmoid scores
    _, no_bias = ernie_topk(logits, torch.zeros(E), K, 1e-12)
    sig = torch.zeros(T, E, dtype=torch.bool).scatter(1, torch.topk(logits.sigmoid() + hf.moe_statics.e_score_correction_bias, K).indices, True)
    assert not torch.equal(no_bias, ref_map) and not torch.equal(sig, ref_map)
