"""The bridge's ops are exact inverses and shard-compatible; plans fail loudly with the full list of offenders."""

from __future__ import annotations

import pytest
import torch

from ernie45.bridge.ops import ConcatGLU, FuseQKV, Identity, SplitRows, Squeeze0, Transpose
from ernie45.bridge.plan import PlanError, plan_from_hf
from ernie45.bridge.tables import IGNORED, Split, expand
from ernie45.bridge.layout import from_grouped_name, placements, to_grouped_name
from ernie45.config import ErnieConfig
from ernie45.megatron.parallel import Layout, LayoutError
from ernie45.testing import tiny_hf_config

g = torch.Generator().manual_seed(0)


def _r(*shape):
    return torch.randn(*shape, generator=g)


CASES = [
    (Identity(), (_r(6, 4),)),
    (Squeeze0(), (_r(1, 8),)),
    (Transpose(), (_r(12, 8),)),
    (FuseQKV(head_dim=4, heads_per_group=3), (_r(2 * 3 * 4, 10), _r(2 * 4, 10), _r(2 * 4, 10))),
    (ConcatGLU(), (_r(6, 10), _r(6, 10))),
    (SplitRows(n_mg=2), (_r(2, 8),)),
]


@pytest.mark.parametrize("op, hf", CASES, ids=lambda x: type(x).__name__ if not isinstance(x, tuple) else "")
def test_op_round_trip_is_bit_exact(op, hf):
    mg = op.to_mg(hf)
    back = op.to_hf(mg)
    assert len(back) == len(hf) and all(torch.equal(a, b) for a, b in zip(back, hf))
    assert op.mg_shapes(tuple(tuple(t.shape) for t in hf)) == tuple(tuple(t.shape) for t in mg)


def test_fused_qkv_matches_megatron_split():
    """Megatron views linear_qkv output as [.., G, (R+2)·D] and splits [R·D, D, D] (spec §H.3)."""
    G, R, D, H = 2, 3, 4, 10
    q, k, v = _r(G * R * D, H), _r(G * D, H), _r(G * D, H)
    (qkv,) = FuseQKV(head_dim=D, heads_per_group=R).to_mg((q, k, v))
    x = _r(5, H)
    out = (x @ qkv.t()).view(5, G, (R + 2) * D)
    mq, mk, mv = torch.split(out, [R * D, D, D], dim=-1)
    torch.testing.assert_close(mq.reshape(5, -1), x @ q.t(), rtol=0, atol=1e-6)
    torch.testing.assert_close(mk.reshape(5, -1), x @ k.t(), rtol=0, atol=1e-6)
    torch.testing.assert_close(mv.reshape(5, -1), x @ v.t(), rtol=0, atol=1e-6)


@pytest.mark.parametrize("op, hf", [CASES[3], CASES[4]], ids=["qkv", "glu"])
def test_ops_commute_with_tp_chunking(op, hf):
    """op(chunk_i of every input) == Megatron's TP shard i: what lets a rank read only its slices."""
    (full,) = op.to_mg(hf)
    n = 2
    for i in range(n):
        (shard,) = op.to_mg(tuple(t.chunk(n, dim=0)[i] for t in hf))
        if isinstance(op, ConcatGLU):  # Megatron's fc1 shard i = [gate_i; up_i]
            gate, up = full.chunk(2, dim=0)
            expect = torch.cat([gate.chunk(n)[i], up.chunk(n)[i]])
        else:  # whole KV groups per rank
            expect = full.chunk(n, dim=0)[i]
        assert torch.equal(shard, expect)


def _moe_cfg(**kw):
    return ErnieConfig.from_hf(tiny_hf_config("moe", **kw))


def _shapes(cfg, tied=False):
    return {n: s for it in expand(cfg, tied=tied) for n, s in zip(it.hf, it.hf_shapes)}


def test_plan_consumes_every_tensor_once():
    cfg = _moe_cfg()
    shapes = _shapes(cfg)
    plan = plan_from_hf(cfg, shapes)
    assert sorted(plan.hf_names) == sorted(shapes)
    assert len(set(plan.mg_names)) == len(plan.mg_names)


def test_plan_lists_every_offender():
    cfg = _moe_cfg()
    shapes = _shapes(cfg)
    del shapes["model.layers.1.mlp.experts.3.up_proj.weight"], shapes["model.norm.weight"]
    shapes["model.layers.1.mlp.experts.99.up_proj.weight"] = (32, 48)
    shapes["model.layers.0.self_attn.q_proj.weight"] = (48, 47)
    with pytest.raises(PlanError) as e:
        plan_from_hf(cfg, shapes)
    msg = str(e.value)
    for needle in ("experts.3.up_proj", "model.norm.weight", "experts.99.up_proj", "q_proj.weight: has [48, 47]"):
        assert needle in msg


def test_mtp_tensors_are_declared_ignored_with_reason():
    cfg = _moe_cfg()
    shapes = _shapes(cfg)
    shapes["model.mtp_block.0.self_attn.q_proj.weight"] = (48, 48)
    shapes["model.mtp_emb_norm.0.weight"] = (48,)
    plan = plan_from_hf(cfg, shapes)
    assert [n for n, _ in plan.ignored] == ["model.mtp_block.0.self_attn.q_proj.weight", "model.mtp_emb_norm.0.weight"]
    assert all(why in IGNORED.values() for _, why in plan.ignored)


def test_tied_config_with_lm_head_on_disk_loads_untied():
    """transformers 5.23 loads an on-disk lm_head.weight untied even if the config says tied (spec §G)."""
    cfg = ErnieConfig.from_hf(tiny_hf_config("dense"))
    shapes = _shapes(cfg, tied=True)
    assert not plan_from_hf(cfg, shapes).hf_names.count("lm_head.weight")
    shapes["lm_head.weight"] = (cfg.vocab_size, cfg.hidden_size)
    plan = plan_from_hf(cfg, shapes)
    assert not plan.tied and "lm_head.weight" in plan.hf_names


def test_every_megatron_tensor_is_classified():
    for family in ("dense", "moe"):
        cfg = ErnieConfig.from_hf(tiny_hf_config(family))
        assert all(isinstance(it.split, Split) for it in expand(cfg, tied=False))


def test_placements_pp_ep_and_names():
    cfg = _moe_cfg()
    layout = Layout(pp=2, ep=2, first=2, last=4)
    owner = layout.layer_owner(cfg)
    assert owner == {0: (0, 0), 1: (0, 0), 2: (1, 0), 3: (1, 0), 4: (1, 0), 5: (1, 0)}
    items = {n: it for it in expand(cfg, tied=True) for n in it.mg}
    name = "decoder.layers.3.mlp.experts.local_experts.5.linear_fc1.weight"
    (pl,) = placements(cfg, layout, owner, name, items[name], tied=True)
    assert (pl.pp, pl.ep, pl.local) == (1, 1, "decoder.layers.1.mlp.experts.local_experts.1.linear_fc1.weight")
    emb = placements(cfg, layout, owner, "embedding.word_embeddings.weight", items["embedding.word_embeddings.weight"], tied=True)
    assert [(p.pp, p.local, p.primary) for p in emb] == [(0, "embedding.word_embeddings.weight", True), (1, "output_layer.weight", False)]


def test_grouped_gemm_names_round_trip():
    seq = "decoder.layers.3.mlp.experts.local_experts.7.linear_fc2.weight"
    grouped = to_grouped_name(seq)
    assert grouped == "decoder.layers.3.mlp.experts.linear_fc2.weight7"
    assert from_grouped_name(grouped) == seq


@pytest.mark.parametrize(
    "layout, match",
    [
        (Layout(tp=4), "num_key_value_heads"),
        (Layout(ep=3), "moe_num_experts"),
        (Layout(pp=8), "more stages"),
        (Layout(pp=4), "does not divide num_hidden_layers"),
        (Layout(tp=3), "num_attention_heads"),
    ],
)
def test_impossible_layouts_are_refused(layout, match):
    with pytest.raises(LayoutError, match=match):
        layout.validate(_moe_cfg())
