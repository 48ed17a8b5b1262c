"""ERNIE's SDPA core attention equals Megatron-Core's own ``DotProductAttention`` (the oracle), forward and backward;
ERNIE's rotary and ``ErnieSelfAttention`` equal Megatron's own interleaved rotary and ``SelfAttention``.

Both modules are built from the same config of a tiny ERNIE model and fed the same random ``[S, B, H, D]`` queries
and ``[K, B, G, D]`` keys/values under every mask the project builds: causal, right padding, left padding (fully
masked query rows), packed block-diagonal, a KV-cache decode step, and no mask (Megatron's default causal one).
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from megatron.core.transformer.dot_product_attention import DotProductAttention
from megatron.core.transformer.enums import AttnMaskType

from ernie45.config import ConfigError, ErnieConfig
from ernie45.megatron.attention import ErnieCoreAttention, ErnieSelfAttention, apply_interleaved_rotary
from ernie45.megatron.model import build_model, causal_mask, transformer_config
from ernie45.megatron.packing import block_causal_mask
from ernie45.layout import Layout
from ernie45.testing import tiny_hf_config

B, S = 3, 12
LENGTHS = [12, 9, 5]  # real tokens per row (the rest is padding)


def _masks() -> dict[str, tuple[int, torch.Tensor | None, torch.Tensor | None]]:
    """name -> (query positions, ``[B|1, 1, S, K]`` bool mask (True = masked), the mask given to Megatron).

    Megatron builds its default causal mask (``None``, S > 1) on ``device="cuda"`` (S3, docs/megatron-on-cpu.md):
    on a CPU its oracle run gets that mask explicitly."""
    real_BS = torch.arange(S).unsqueeze(0) < torch.tensor(LENGTHS).unsqueeze(1)
    left_BS = real_BS.flip(-1)
    segments_1S = torch.tensor([[0, 0, 0, 0, 1, 1, 1, 2, 2, 2, 2, -1]])  # three samples and a padding tail
    masks = {
        "causal": (S, causal_mask(S)),
        "right-padded": (S, causal_mask(S, padding_mask=real_BS)),
        "left-padded": (S, causal_mask(S, padding_mask=left_BS)),
        "packed": (S, block_causal_mask(segments_1S)),
        "decode-left-padded": (1, ~left_BS.view(B, 1, 1, S)),
        "decode": (1, None),
    }
    masks = {name: (sq, m, m) for name, (sq, m) in masks.items()}
    masks["none"] = (S, None, causal_mask(S))
    return masks


def _config(groups: int):
    cfg = ErnieConfig.from_hf(tiny_hf_config("dense", num_attention_heads=4, num_key_value_heads=groups))
    return transformer_config(cfg, Layout())


@pytest.mark.parametrize("groups", [2, 4], ids=["gqa", "mha"])
@pytest.mark.parametrize("case", list(_masks()))
def test_equals_megatron_dot_product_attention(world1, case, groups):
    tc = _config(groups)
    kw = dict(config=tc, layer_number=1, attn_mask_type=AttnMaskType.causal, attention_type="self",
              softmax_scale=None, cp_comm_type=None, pg_collection=None)  # fmt: skip
    ours, ref = ErnieCoreAttention(**kw), DotProductAttention(**kw)
    H, D = tc.num_attention_heads, tc.kv_channels
    Sq, mask, ref_mask = _masks()[case]
    if case == "left-padded":
        assert bool(mask.all(-1).any()), "this case must contain fully masked query rows"
    g = torch.Generator().manual_seed(0)
    q = torch.randn(Sq, B, H, D, generator=g)
    k, v = (torch.randn(S, B, groups, D, generator=g) for _ in range(2))
    grad_out = torch.randn(Sq, B, H * D, generator=g)
    results = []
    for module, m in ((ours, mask), (ref, ref_mask)):
        leaves = [t.clone().requires_grad_() for t in (q, k, v)]
        out = module(*leaves, m, attn_mask_type=AttnMaskType.causal)
        out.backward(grad_out)
        results.append((out.detach(), *(t.grad for t in leaves)))
    for name, a, b in zip(("output", "dq", "dk", "dv"), *results):
        assert torch.isfinite(a).all(), f"{case}: non-finite {name}"
        assert a.shape == b.shape and a.dtype == b.dtype, name
        diff = (a - b).abs().max().item()
        assert diff <= 1e-5, f"{case}/{name}: max|Δ| {diff:.3g} vs Megatron's DotProductAttention"


def test_refuses_what_sdpa_does_not_take(world1):
    tc = dataclasses.replace(_config(2), attention_dropout=0.1)
    with pytest.raises(ConfigError, match="attention_dropout"):
        ErnieCoreAttention(config=tc, layer_number=1, attn_mask_type=AttnMaskType.causal, attention_type="self")


def test_ernie_layers_use_it(world1):
    cfg = ErnieConfig.from_hf(tiny_hf_config("moe"))
    (chunk,) = build_model(cfg, Layout())
    cores = [layer.self_attention.core_attention for layer in chunk.decoder.layers]
    assert cores and all(type(c) is ErnieCoreAttention for c in cores)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
@pytest.mark.parametrize("angles", ["1-D", "3-D"])
@pytest.mark.parametrize("extra", [2, 1], ids=["even-strides", "odd-strides"])  # odd: no complex view, a copy
def test_rotary_equals_megatrons_interleaved_rotary(dtype, angles, extra):
    from megatron.core.models.common.embeddings.rope_utils import _apply_rotary_pos_emb_bshd

    g = torch.Generator().manual_seed(0)
    Sq, Bq, H, D = 7, 3, 4, 16
    # queries as Megatron hands them over: a strided view into the fused QKV projection's output
    fused = torch.randn(Sq, Bq, H * D + extra * D // 2 + extra % 2, generator=g).to(dtype)
    ang_SBF = torch.rand(Sq, 1 if angles == "1-D" else Bq, D // 2, generator=g, dtype=torch.float64) * 40
    freqs_SB1D = ang_SBF.repeat_interleave(2, dim=-1).unsqueeze(2).float()  # every band twice, as Megatron lays it out
    grad_out = torch.randn(Sq, Bq, H, D, generator=g).to(dtype)
    results = []
    for fn in (apply_interleaved_rotary, lambda x, f: _apply_rotary_pos_emb_bshd(x, f, rotary_interleaved=True)):
        leaf = fused.clone().requires_grad_()
        out = fn(leaf[..., : H * D].view(Sq, Bq, H, D), freqs_SB1D)
        out.backward(grad_out)
        results.append((out.detach(), leaf.grad))
    tol = {torch.float32: 2e-6, torch.float64: 1e-12, torch.bfloat16: 0.0}[dtype]  # bf16: the same roundings
    for name, a, b in zip(("output", "grad"), *results):
        assert a.dtype == b.dtype == dtype and a.shape == b.shape, name
        diff = (a.double() - b.double()).abs().max().item()
        assert diff <= tol * b.abs().max().item(), f"{name}: max|Δ| {diff:.3g}"


def test_self_attention_equals_megatrons(world1):
    """A whole tiny MoE chunk with ERNIE's attention vs the same chunk, same weights, with every layer's attention
    turned back into Megatron's own ``SelfAttention`` (its rotary and forward): logits and every gradient."""
    from megatron.core.transformer.attention import SelfAttention

    cfg = ErnieConfig.from_hf(tiny_hf_config("moe"))
    (ours,), (ref,) = build_model(cfg, Layout()), build_model(cfg, Layout())
    assert all(type(layer.self_attention) is ErnieSelfAttention for layer in ours.decoder.layers)
    for layer in ref.decoder.layers:
        layer.self_attention.__class__ = SelfAttention
    with torch.no_grad():  # re-randomise every parameter, the expert bias included, identically in both
        for (_, p), (_, q) in zip(ours.named_parameters(), ref.named_parameters()):
            q.copy_(p.copy_(torch.randn_like(p) * 0.2))
        for (_, b), (_, c) in zip(ours.named_buffers(), ref.named_buffers()):
            if b.is_floating_point():
                c.copy_(b.copy_(torch.randn_like(b)))
    ids = torch.randint(0, cfg.vocab_size, (2, 10), generator=torch.Generator().manual_seed(1))
    pos = torch.arange(10).expand(2, 10)
    outs = []
    for model in (ours, ref):
        logits = model(input_ids=ids, position_ids=pos, attention_mask=causal_mask(10))
        logits.float().square().mean().backward()
        outs.append((logits.detach(), {n: p.grad for n, p in model.named_parameters()}))
    (lo, go), (lr, gr) = outs
    assert (lo - lr).abs().max().item() <= 1e-5 * lr.abs().max().item()
    assert go.keys() == gr.keys()
    for name in gr:
        assert gr[name] is not None and go[name] is not None, name
        assert (go[name] - gr[name]).abs().max().item() <= 1e-5 * max(gr[name].abs().max().item(), 1e-8), name
