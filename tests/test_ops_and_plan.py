"""The bridge's ops are exact inverses and shard-compatible; plans fail loudly with the full list of offenders."""

from __future__ import annotations

import pytest
import torch

from ernie45.bridge.io import HFCheckpoint
from ernie45.bridge.ops import OPS, ConcatGLU, FuseQKV, Identity, RegroupQKV, SplitRows, Squeeze0, Stack, Transpose
from ernie45.bridge.plan import PlanError, expand, plan_from_hf
from ernie45.bridge.tables import Row, Split, effective_tie
from ernie45.bridge.layout import from_grouped_name, placements, to_grouped_name
from ernie45.config import ErnieConfig
from ernie45.layout import Layout, LayoutError
from ernie45.testing import assert_bit_exact, tiny_hf_config

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
    (RegroupQKV(head_dim=4), (_r(3 * 2 * 4, 8),)),  # ViT qkv weight: 2 heads of 4
    (RegroupQKV(head_dim=4), (_r(3 * 2 * 4),)),  # and its bias
    (Stack(), tuple(_r(4, 6) for _ in range(5))),  # GGUF's stacked experts
]


def test_every_op_has_a_round_trip_case():
    assert {type(op) for op, _ in CASES} == set(OPS)


@pytest.mark.parametrize("op, hf", CASES, ids=lambda x: type(x).__name__ if not isinstance(x, tuple) else "")
def test_op_round_trip_is_bit_exact(op, hf):
    mg = op.to_mg(hf)
    back = op.to_hf(mg)
    assert len(back) == len(hf)
    for a, b in zip(back, hf):
        assert_bit_exact(a, b)
    hf_shapes, mg_shapes = tuple(tuple(t.shape) for t in hf), tuple(tuple(t.shape) for t in mg)
    assert op.mg_shapes(hf_shapes) == mg_shapes and op.hf_shapes(mg_shapes) == hf_shapes
    if op.verbatim:  # the Megatron tensor is its inputs on dim 0, unchanged: readers take rows straight from them
        assert_bit_exact(mg[0], torch.cat(hf, dim=0))


def test_fused_qkv_matches_megatron_split():
    """Megatron views linear_qkv output as [.., G, (R+2)·D] and splits [R·D, D, D] (reference §H.3)."""
    G, R, D, H = 2, 3, 4, 10
    q, k, v = _r(G * R * D, H), _r(G * D, H), _r(G * D, H)
    (qkv,) = FuseQKV(head_dim=D, heads_per_group=R).to_mg((q, k, v))
    x = _r(5, H)
    out = (x @ qkv.t()).view(5, G, (R + 2) * D)
    mq, mk, mv = torch.split(out, [R * D, D, D], dim=-1)
    torch.testing.assert_close(mq.reshape(5, -1), x @ q.t(), rtol=0, atol=1e-6)
    torch.testing.assert_close(mk.reshape(5, -1), x @ k.t(), rtol=0, atol=1e-6)
    torch.testing.assert_close(mv.reshape(5, -1), x @ v.t(), rtol=0, atol=1e-6)


def test_regroup_qkv_matches_megatron_split():
    """Megatron's ViT attention (one query group per head) views linear_qkv output as [.., NH, 3·D] and splits
    [D, D, D]: head h's q, k, v must be HF's rows h·D.. of the Q, K and V blocks, for the weight and the bias."""
    NH, D, C = 3, 4, 10
    w, b = _r(3 * NH * D, C), _r(3 * NH * D)
    (w_mg,), (b_mg,) = RegroupQKV(head_dim=D).to_mg((w,)), RegroupQKV(head_dim=D).to_mg((b,))
    x = _r(5, C)
    hf_q, hf_k, hf_v = (x @ w.t() + b).chunk(3, dim=-1)
    out = (x @ w_mg.t() + b_mg).view(5, NH, 3 * D)
    mq, mk, mv = torch.split(out, [D, D, D], dim=-1)
    for mine, ref in ((mq, hf_q), (mk, hf_k), (mv, hf_v)):
        torch.testing.assert_close(mine.reshape(5, -1), ref, rtol=0, atol=1e-6)


@pytest.mark.parametrize("op, hf", [CASES[3], CASES[4], CASES[6]], ids=["qkv", "glu", "vit-qkv"])
def test_ops_commute_with_tp_chunking(op, hf):
    """op(chunk_i of every input) == Megatron's TP shard i: what lets a rank read only its slices."""
    (full,) = op.to_mg(hf)
    n = 2
    for i in range(n):
        if op.mg_blocks > 1:  # Megatron's fc1 shard i = [gate_i; up_i]
            expect = torch.cat([block.chunk(n)[i] for block in full.chunk(op.mg_blocks, dim=0)])
            (shard,) = op.to_mg(tuple(t.chunk(n, dim=0)[i] for t in hf))
        elif op.hf_blocks > 1:  # a rank reads head block i of each of Q, K and V (hf_blocks = 3)
            expect = full.chunk(n, dim=0)[i]
            (qkv,) = hf
            (shard,) = op.to_mg((torch.cat([blk.chunk(n, dim=0)[i] for blk in qkv.chunk(op.hf_blocks, dim=0)]),))
        else:  # whole KV groups per rank
            expect = full.chunk(n, dim=0)[i]
            (shard,) = op.to_mg(tuple(t.chunk(n, dim=0)[i] for t in hf))
        assert_bit_exact(shard, expect)


@pytest.mark.parametrize(
    "hf, mg, op, split, scope, match",
    [
        (("a", "b"), ("c",), Identity(), Split.REPLICATED, "model", "arity"),
        (("a",), ("c",), Transpose(), Split.COLUMN, "model", "does not commute"),
        (("l.{L}.a",), ("c.{L}",), Identity(), Split.REPLICATED, "model", "do not exist in scope"),
        (("e.{X}.a",), ("c.{L}",), Identity(), Split.REPLICATED, "expert", "only a gathering op"),  # drops experts
        (("e.{L}.a",), ("c.{L}",), Stack(), Split.REPLICATED, "moe", "only a gathering op"),  # nothing to gather
        (("a", "b"), ("c",), FuseQKV(head_dim=2, heads_per_group=1, n_hf=2, mg_blocks=2), Split.COLUMN, "model",
         "blocks must be its inputs"),
    ],
)
def test_rows_are_checked_when_a_table_is_built(hf, mg, op, split, scope, match):
    shapes = tuple((4, 4) for _ in hf)
    with pytest.raises(ValueError, match=match):
        Row(hf, mg, op, split, scope, shapes)


def _moe_cfg(**kw):
    return ErnieConfig.from_hf(tiny_hf_config("moe", **kw))


# Plans are fed what transformers really wrote (``tiny_ckpts``: save_pretrained of re-randomised models), never the
# table's own names and shapes, and what they produce is compared with a live Megatron model's state dict.


def _live_names(chunk) -> set[str]:
    return {n for n in chunk.state_dict() if not n.endswith("_extra_state")}


@pytest.mark.parametrize("family", ["dense", "moe", "moe-tied", "dense-untied"])
def test_plan_of_a_real_checkpoint_consumes_every_tensor_once(family, tiny_ckpts, world1):
    from ernie45.config import load_config
    from ernie45.megatron.model import build_model

    path = tiny_ckpts[family]
    cfg, ckpt = load_config(path), HFCheckpoint(path)
    plan = plan_from_hf(cfg, ckpt.shapes(), dtypes=ckpt.dtypes(), where=str(path))
    assert sorted(plan.hf_names) == sorted(ckpt.keys()) and not plan.ignored
    assert len(set(plan.mg_names)) == len(plan.mg_names)
    (chunk,) = build_model(cfg, Layout(), tie_word_embeddings=plan.tied)
    assert sorted(plan.mg_names) == sorted(_live_names(chunk))
    live = chunk.state_dict()
    for item in plan.items:  # the table's Megatron shapes are the live model's
        for name, shape in zip(item.mg, item.op.mg_shapes(item.hf_shapes)):
            assert tuple(live[name].shape) == tuple(shape), name


def test_plan_lists_every_offender(tiny_ckpts):
    path = tiny_ckpts["moe"]
    cfg, shapes = ErnieConfig.from_hf(tiny_hf_config("moe")), dict(HFCheckpoint(tiny_ckpts["moe"]).shapes())
    plan_from_hf(cfg, shapes)  # the untouched checkpoint plans
    del shapes["model.layers.1.mlp.experts.3.up_proj.weight"], shapes["model.norm.weight"]
    shapes["model.layers.1.mlp.experts.99.up_proj.weight"] = (32, 48)
    shapes["model.layers.0.self_attn.q_proj.weight"] = (48, 47)
    with pytest.raises(PlanError) as e:
        plan_from_hf(cfg, shapes, where=str(path))
    msg = str(e.value)
    assert msg.startswith(f"{path} does not match its config")
    for needle in ("experts.3.up_proj", "model.norm.weight", "experts.99.up_proj", "q_proj.weight: has [48, 47]"):
        assert needle in msg


def test_mtp_tensors_are_ignored_like_transformers_ignores_them(tiny_ckpts, tmp_path):
    """A checkpoint with the PT releases' MTP tensors: transformers loads it without them; the plan declares exactly
    those ignored (with the reason), and anything else unknown is still refused."""
    import shutil

    from safetensors.torch import load_file, save_file

    from ernie45.reference import load_reference

    src = shutil.copytree(tiny_ckpts["moe"], tmp_path / "mtp")
    tensors = load_file(src / "model.safetensors")
    mtp = {
        "model.mtp_block.0.self_attn.q_proj.weight": torch.zeros(48, 48),
        "model.mtp_emb_norm.0.weight": torch.ones(48),
    }
    save_file(dict(tensors, **mtp), src / "model.safetensors", metadata={"format": "pt"})
    hf = load_reference(src)
    assert not any("mtp" in n for n in hf.state_dict())  # transformers drops them too
    cfg, ckpt = ErnieConfig.from_hf(tiny_hf_config("moe")), HFCheckpoint(src)
    plan = plan_from_hf(cfg, ckpt.shapes())
    assert [n for n, _ in plan.ignored] == sorted(mtp)
    assert all("MTP" in why for _, why in plan.ignored)
    assert sorted(plan.hf_names) == sorted(tensors)
    with pytest.raises(PlanError, match="model.mtp_blocks.0.weight"):  # not an MTP name: unexpected, not ignored
        plan_from_hf(cfg, dict(ckpt.shapes(), **{"model.mtp_blocks.0.weight": (48,)}))


def test_tied_config_with_lm_head_on_disk_loads_untied(tiny_ckpts, tmp_path):
    """A tied config with an lm_head.weight on disk: transformers 5.23 uses that head (untied), so must the plan."""
    import shutil

    from safetensors.torch import load_file, save_file

    from ernie45.reference import load_reference

    src = tiny_ckpts["dense"]
    cfg = ErnieConfig.from_hf(tiny_hf_config("dense"))
    assert cfg.tie_word_embeddings and "lm_head.weight" not in HFCheckpoint(src).keys()
    plan = plan_from_hf(cfg, HFCheckpoint(src).shapes())
    assert plan.tied and "lm_head.weight" not in plan.hf_names and "output_layer.weight" not in plan.mg_names

    with_head = shutil.copytree(src, tmp_path / "with-head")
    tensors = load_file(with_head / "model.safetensors")
    head = torch.randn(tensors["model.embed_tokens.weight"].shape, generator=torch.Generator().manual_seed(8))
    save_file(dict(tensors, **{"lm_head.weight": head}), with_head / "model.safetensors", metadata={"format": "pt"})
    hf = load_reference(with_head)
    assert_bit_exact(hf.lm_head.weight.detach(), head)  # the oracle: transformers really uses the on-disk head
    assert_bit_exact(hf.model.embed_tokens.weight.detach(), tensors["model.embed_tokens.weight"])
    ckpt = HFCheckpoint(with_head)
    assert not effective_tie(cfg, ckpt.keys())
    plan = plan_from_hf(cfg, ckpt.shapes())
    assert not plan.tied and "lm_head.weight" in plan.hf_names and "output_layer.weight" in plan.mg_names


def _megatron_split(module, pname: str, tensor, *, vocab_modules) -> Split:
    """How Megatron itself says a tensor is sharded: the attributes its parallel layers set on their parameters
    (``tensor_model_parallel``, ``partition_dim``) and the owning layer's ``is_expert``. Set at TP1 too."""
    if not getattr(tensor, "tensor_model_parallel", False):
        return Split.REPLICATED
    if any(module is m for m in vocab_modules):
        return Split.VOCAB
    dim = tensor.partition_dim
    if getattr(module, "is_expert", False):
        return {0: Split.EXPERT_COLUMN, 1: Split.EXPERT_ROW}[dim]
    return {0: Split.COLUMN, 1: Split.ROW}[dim]


@pytest.mark.parametrize("family", ["dense", "moe", "vl", "vl-mgvit"])
def test_every_split_matches_megatrons_own_partitioning(family, world1):
    """The table's Split of every Megatron tensor == what the live Megatron layer that owns it declares."""
    import dataclasses

    from ernie45.megatron.model import build_model
    from ernie45.megatron.vl_model import build_vl_model

    cfg = ErnieConfig.from_hf(tiny_hf_config(family.split("-")[0]))
    if family == "vl-mgvit":
        cfg = dataclasses.replace(cfg, vit_impl="megatron")
    if cfg.family == "vl":
        (chunk,) = build_vl_model(cfg, Layout(), vision_attn_implementation="eager")
        gpt = chunk.language_model
    else:
        (chunk,) = build_model(cfg, Layout(), tie_word_embeddings=cfg.tie_word_embeddings)
        gpt = chunk
    vocab_modules = [gpt.embedding.word_embeddings] + ([gpt.output_layer] if hasattr(gpt, "output_layer") else [])
    items = {n: it for it in expand(cfg, tied=cfg.tie_word_embeddings) for n in it.mg}
    live = _live_names(chunk)
    assert sorted(items) == sorted(live)
    seen = {}
    for mod_name, module in chunk.named_modules():
        prefix = f"{mod_name}." if mod_name else ""
        for pname, t in list(module.named_parameters(recurse=False)) + list(module.named_buffers(recurse=False)):
            if prefix + pname in live:
                seen[prefix + pname] = _megatron_split(module, pname, t, vocab_modules=vocab_modules)
    assert sorted(seen) == sorted(live)
    wrong = {n: (items[n].split, s) for n, s in seen.items() if items[n].split != s}
    assert not wrong, wrong
    assert any(s != Split.REPLICATED for s in seen.values())


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
