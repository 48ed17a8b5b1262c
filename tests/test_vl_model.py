"""ERNIE 4.5 VL MoE on Megatron-Core vs transformers' Ernie4_5_VLMoeForConditionalGeneration (fp32, tiny, CPU).

Every HF parameter and buffer is re-randomised (both expert-bias rows included), so routing is decided by real
biases and every norm weight matters. The Megatron model gets HF's weights through the production bridge from the
model's own on-disk checkpoint; the independent test-only copy in ``vl_helpers.py`` is a second oracle (and maps
HF's gradients for the backward comparisons).
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch

from ernie45.config import ConfigError, ErnieConfig
from ernie45.runtime import capture_routing
from ernie45.testing import assert_bit_exact, build_hf_model, tiny_hf_config

from vl_helpers import expected_from_hf, load_hf_into_vl, load_through_bridge, make_batch, megatron_tensors

LOGIT_TOL = 1e-4
GRAD_RTOL = 1e-4


# ----------------------------------------------------------------------------------------------------------------------
# fixtures


@pytest.fixture(scope="module")
def cfg():
    return ErnieConfig.from_hf(tiny_hf_config("vl"))


@pytest.fixture(scope="module")
def hf_model():
    return build_hf_model(tiny_hf_config("vl"), seed=0)


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("vl-hf")


def _build(cfg, hf_model, hf_dir=None, **kw):
    """Through the production bridge (``hf_dir``), or the independent test copy (``hf_dir=None``)."""
    from ernie45.layout import Layout
    from ernie45.megatron.vl_model import build_vl_model

    torch.manual_seed(1234)
    chunks = build_vl_model(cfg, Layout(), vision_attn_implementation="eager", **kw)
    if hf_dir is None:
        load_hf_into_vl(hf_model, chunks, cfg)
    else:
        load_through_bridge(hf_model, chunks, cfg, Layout(), hf_dir)
    return chunks[0]


@pytest.fixture(scope="module")
def mg_model(world1, cfg, hf_model, hf_dir):
    return _build(cfg, hf_model, hf_dir).eval()


# ----------------------------------------------------------------------------------------------------------------------
# inputs

IMG_A, IMG_B, VIDEO = (1, 4, 6), (1, 8, 4), (4, 4, 4)  # patch grids: 6, 8 and 8 LM tokens

CASES = {
    "text_only": [[("text", 19)], [("text", 19)]],
    "one_image": [[("text", 3), ("image", IMG_A), ("text", 5)]],
    "two_images": [[("text", 2), ("image", IMG_A), ("text", 3), ("image", IMG_B), ("text", 4)]],
    "video": [[("text", 3), ("video", VIDEO), ("text", 4)]],
    "padded_mix": [
        [("text", 2), ("image", IMG_A), ("text", 2), ("video", VIDEO), ("text", 3)],
        [("text", 4)],
        [("image", IMG_B), ("text", 6)],
        [("text", 2), ("video", (2, 4, 8)), ("text", 1), ("image", IMG_A), ("text", 2)],
    ],
}


def _hf_forward(hf_model, batch, **kw):
    return hf_model(**batch, **kw)


def _valid(batch) -> torch.Tensor:
    mask = batch.get("attention_mask")
    return torch.ones_like(batch["input_ids"], dtype=torch.bool) if mask is None else mask.bool()


# ----------------------------------------------------------------------------------------------------------------------
# RoPE


def test_rope_matches_hf_bit_for_bit(hf_model, cfg):
    from megatron.core.models.common.embeddings.rope_utils import _apply_rotary_pos_emb_bshd
    from transformers.models.ernie4_5_vl_moe.modeling_ernie4_5_vl_moe import apply_rotary_pos_emb

    from ernie45.megatron.rope import ErnieMultimodalRotaryEmbedding

    g = torch.Generator().manual_seed(0)
    B, S, nh = 2, 40, cfg.num_attention_heads
    pos_3BS = torch.randint(0, 3000, (3, B, S), generator=g)  # distinct T/H/W everywhere
    q_BhSD = torch.randn(B, nh, S, cfg.head_dim, generator=g)

    cos_BSD, sin_BSD = hf_model.model.language_model.rotary_emb(q_BhSD, pos_3BS)
    ours = ErnieMultimodalRotaryEmbedding(cfg.head_dim, cfg.rope_theta, cfg.mrope_section)
    ang_SB1D = ours(pos_3BS, list(cfg.mrope_section))
    assert ang_SB1D.shape == (S, B, 1, cfg.head_dim)
    assert_bit_exact(ang_SB1D.cos()[:, :, 0].transpose(0, 1), cos_BSD)
    assert_bit_exact(ang_SB1D.sin()[:, :, 0].transpose(0, 1), sin_BSD)

    # the rotation Megatron applies (interleaved, fp32) equals HF's application exactly
    q_hf, _ = apply_rotary_pos_emb(q_BhSD, q_BhSD, cos_BSD, sin_BSD)
    q_mg_SBhD = _apply_rotary_pos_emb_bshd(q_BhSD.permute(2, 0, 1, 3), ang_SB1D, rotary_interleaved=True)
    assert_bit_exact(q_mg_SBhD.permute(1, 2, 0, 3), q_hf)


def test_rope_band_layout_and_1d_reduction(world1, cfg):
    """Band f: H on even f < h+w, W on odd f < h+w, T above; T=H=W gives Megatron's 1-D interleaved RoPE."""
    from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding

    from ernie45.megatron.rope import ErnieMultimodalRotaryEmbedding, rope_inv_freq

    rope = ErnieMultimodalRotaryEmbedding(cfg.head_dim, cfg.rope_theta, cfg.mrope_section)
    h, w, t = cfg.mrope_section
    pos = torch.tensor([[[7]], [[11]], [[13]]])  # T=7, H=11, W=13
    ang_F = rope.angles(pos)[0, 0]
    inv_F = rope_inv_freq(cfg.head_dim, cfg.rope_theta)
    axis = [round(float(a / i)) for a, i in zip(ang_F, inv_F)]
    assert axis == [11 if f % 2 == 0 else 13 for f in range(h + w)] + [7] * t

    S = 23
    text_pos = torch.arange(S).view(1, S)
    ours = rope(text_pos)  # [S, 1, 1, D]
    ref = RotaryEmbedding(kv_channels=cfg.head_dim, rotary_percent=1.0, rotary_interleaved=True, rotary_base=cfg.rope_theta, use_cpu_initialization=True)(S)
    assert_bit_exact(ours, ref)


# ----------------------------------------------------------------------------------------------------------------------
# positions


def test_position_ids_match_hf_get_rope_index(hf_model, cfg):
    from ernie45.megatron.vl_inputs import vl_position_ids

    batch = make_batch(cfg, CASES["padded_mix"] + [[("text", 1), ("video", (8, 4, 4)), ("text", 2)]], seed=3)
    ours = vl_position_ids(
        batch["input_ids"],
        batch["mm_token_type_ids"],
        batch["image_grid_thw"],
        batch["video_grid_thw"],
        batch["attention_mask"],
        spatial_merge_size=2,
        temporal_merge_size=2,
    )
    ref, _ = hf_model.model.get_rope_index(
        batch["input_ids"],
        mm_token_type_ids=batch["mm_token_type_ids"],
        image_grid_thw=batch["image_grid_thw"],
        video_grid_thw=batch["video_grid_thw"],
        attention_mask=batch["attention_mask"],
    )
    assert_bit_exact(ours, ref)


# ----------------------------------------------------------------------------------------------------------------------
# forward parity


def _forward_and_routing(hf_model, mg_model, cfg, case):
    """Both models on one case: (batch, valid mask, max |Δlogits| over real tokens, HF and Megatron expert sets)."""
    batch = make_batch(cfg, CASES[case], seed=len(case))
    ids = batch["input_ids"]
    with torch.no_grad(), capture_routing([hf_model], "transformers", cfg, ids) as hf_routing:
        ref = _hf_forward(hf_model, batch).logits
    with torch.no_grad(), capture_routing([mg_model], "megatron", cfg, ids) as mg_routing:
        out = mg_model(**batch)
    valid = _valid(batch)
    diff = (out - ref).abs()[valid].max().item()
    print(f"{case}: max |Δlogits| = {diff:.3g} (|logits| max {ref.abs().max().item():.3g})")
    return batch, valid, diff, _expert_sets(hf_routing), _expert_sets(mg_routing)


def _expert_sets(routing) -> dict:
    """{(layer, pool, b, s): the experts that token chose} for every token each pool routed."""
    return {(L, pool, b, s): tuple(r.chosen_BSE[b, s].nonzero().flatten().tolist())
            for (L, pool), r in routing.items() for b, s in r.mask_BS.nonzero().tolist()}  # fmt: skip


@pytest.mark.parametrize("case", list(CASES))
def test_forward_matches_hf(case, hf_model, mg_model, cfg):
    _, valid, diff, hf_sets, mg_sets = _forward_and_routing(hf_model, mg_model, cfg, case)
    assert diff <= LOGIT_TOL
    keys = {k for k in hf_sets if valid[k[2], k[3]]}
    assert keys == {k for k in mg_sets if valid[k[2], k[3]]}
    assert len(keys) == len(cfg.moe_layers) * int(valid.sum())
    mismatched = [k for k in keys if hf_sets[k] != mg_sets[k]]
    assert not mismatched, f"{len(mismatched)} tokens routed differently, e.g. {mismatched[:5]}"
    if case != "text_only":  # both pools really took part
        assert any(k[1] == "vision" for k in keys) and any(k[1] == "text" for k in keys)


def test_token_type_arrays_are_not_interchangeable(mg_model, cfg):
    """RoPE types (start/end = text) and MoE types (start/end = vision) each matter (reference §J.7)."""
    batch = make_batch(cfg, CASES["one_image"], seed=5)
    with torch.no_grad():
        ref = mg_model(**batch)
        swapped_moe = mg_model(**dict(batch, moe_mm_token_type_ids=batch["mm_token_type_ids"]))
    assert (swapped_moe - ref).abs().max() > 1e-3
    from ernie45.megatron.vl_inputs import vl_position_ids

    kw = dict(spatial_merge_size=2, temporal_merge_size=2)
    with pytest.raises(ValueError):  # the MoE types split the image run from its start token: no grid fits
        vl_position_ids(batch["input_ids"], batch["moe_mm_token_type_ids"], batch["image_grid_thw"], None, None, **kw)


def test_bool_padding_mask_is_refused(mg_model, cfg):
    from ernie45.megatron.model import causal_mask

    batch = make_batch(cfg, CASES["text_only"], seed=1)
    with pytest.raises(TypeError):
        mg_model.language_model(
            input_ids=batch["input_ids"],
            position_ids=torch.arange(19).expand(3, 2, 19),
            attention_mask=causal_mask(19),
            decoder_input=mg_model.embed(batch["input_ids"]),
            padding_mask=torch.zeros(2, 19, dtype=torch.bool),
        )


# ----------------------------------------------------------------------------------------------------------------------
# backward


@pytest.mark.parametrize("freeze", [dict(), dict(vision=True), dict(language=True, projection=False)], ids=str)
def test_loss_and_grads_match_hf(freeze, world1, cfg, hf_model, hf_dir):
    from ernie45.megatron.vl_inputs import lm_labels, masked_token_mean

    mg = _build(cfg, hf_model, hf_dir)
    mg.train()
    mg.freeze(**freeze)
    hf = copy.deepcopy(hf_model)
    hf_parts = dict(language=[hf.model.language_model, hf.lm_head], vision=[hf.model.vision_tower], projection=[hf.model.resampler_model])
    for part, flag in freeze.items():
        for module in hf_parts[part] if flag else []:
            module.requires_grad_(False)

    batch = make_batch(cfg, CASES["padded_mix"], seed=11)
    valid = _valid(batch)
    hf_labels = batch["input_ids"].masked_fill(~valid, -100)
    # a sequence's first token is never a target; under left padding HF would otherwise train the last pad position
    # on it through a fully masked attention row (see lm_labels)
    hf_labels[torch.arange(len(valid)), valid.long().argmax(1)] = -100
    hf_labels[0, :8] = -100  # and a prompt that is not trained on
    ref = hf(**batch, labels=hf_labels).loss
    ref.backward()

    labels, loss_mask = lm_labels(hf_labels, batch["attention_mask"])
    loss = masked_token_mean(mg(**batch, labels=labels), loss_mask)
    loss.backward()
    print(f"loss hf {ref.item():.6f} megatron {loss.item():.6f}")
    assert abs(loss.item() - ref.item()) <= GRAD_RTOL * abs(ref.item())

    params = megatron_tensors(mg, buffers=False)
    trainable = {n for n, p in params.items() if p.requires_grad}
    frozen_prefix = [{"language": "language_model.", "vision": "vision_model.", "projection": "resampler_model."}[k] for k, v in freeze.items() if v]
    assert all(any(n.startswith(f) for f in frozen_prefix) for n in params if n not in trainable)
    assert all(params[n].grad is None for n in params if n not in trainable)
    hf_grads = {n: p.grad for n, p in hf.named_parameters() if p.grad is not None}
    want = expected_from_hf(mg, hf_grads, cfg, sorted(trainable))
    worst = 0.0
    for n in sorted(trainable):
        g = params[n].grad
        assert g is not None, f"{n} got no gradient"
        scale = want[n].abs().max().item()
        rel = (g - want[n]).abs().max().item() / max(scale, 1e-12)
        worst = max(worst, rel)
        assert rel <= GRAD_RTOL or (g - want[n]).abs().max().item() <= 1e-7, f"{n}: rel grad diff {rel:.3g}"
    print(f"{freeze}: {len(trainable)} grads, worst relative diff {worst:.3g}")


# ----------------------------------------------------------------------------------------------------------------------
# configs and names

FLAT_TWIN = dict(
    # reference §A.4, by hand: everything top level, list-valued MoE fields, DFNRope vision config
    model_type="ernie4_5_moe_vl",
    vocab_size=160,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    rms_norm_eps=1e-5,
    rope_theta=500000.0,
    freq_allocation=2,
    tie_word_embeddings=False,
    use_bias=False,
    moe_num_experts=[8, 8],
    moe_k=3,
    moe_intermediate_size=[32, 16],
    moe_num_shared_experts=2,
    moe_layer_start_index=[1, 1],
    moe_layer_end_index=[3, 2],
    moe_layer_interval=1,
    im_patch_id=152,
    image_start_token_id=150,
    image_end_token_id=151,
    video_start_token_id=153,
    video_end_token_id=154,
    video_token_id=155,
    spatial_conv_size=2,
    temporal_conv_size=2,
    pixel_hidden_size=32,
    vision_config=dict(
        depth=2,
        embed_dim=32,
        hidden_size=32,
        mlp_ratio=2,
        num_heads=2,
        in_channels=3,
        patch_size=14,
        spatial_merge_size=2,
        hidden_act="quick_gelu",
    ),
)


def _flat_twin() -> ErnieConfig:
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # every key of the flat layout is consumed or declared ignored
        return ErnieConfig.from_hf(FLAT_TWIN)


def test_flat_thinking_config_gives_the_same_model(world1, cfg, hf_model, mg_model):
    flat = _flat_twin()
    assert flat == cfg
    twin = _build(flat, hf_model).eval()  # flat on-disk names differ (vision_model.*): independent copy
    assert {n: p.shape for n, p in megatron_tensors(twin).items()} == {n: p.shape for n, p in megatron_tensors(mg_model).items()}
    batch = make_batch(cfg, CASES["padded_mix"], seed=2)
    with torch.no_grad():
        assert_bit_exact(twin(**batch), mg_model(**batch))


def test_parameter_names_contract(mg_model, cfg):
    names = set(megatron_tensors(mg_model))
    L = cfg.moe_layers[0]
    lm = f"language_model.decoder.layers.{L}."
    for n in [
        "language_model.embedding.word_embeddings.weight",
        "language_model.output_layer.weight",
        "language_model.decoder.final_layernorm.weight",
        "language_model.decoder.layers.0.mlp.linear_fc1.weight",
        "language_model.decoder.layers.0.input_layernorm.weight",
        lm + "self_attention.linear_qkv.weight",
        lm + "pre_mlp_layernorm.weight",
        lm + "mlp.text_moe_layer.router.weight",
        lm + "mlp.text_moe_layer.router.expert_bias",
        lm + "mlp.vision_moe_layer.router.expert_bias",
        lm + "mlp.text_moe_layer.experts.local_experts.7.linear_fc2.weight",
        lm + "mlp.vision_moe_layer.experts.local_experts.0.linear_fc1.weight",
        lm + "mlp.shared_experts.linear_fc1.weight",
        "vision_model.patch_embed.proj.weight",
        "vision_model.blocks.1.attn.qkv.bias",
        "vision_model.ln.weight",
        "resampler_model.spatial_linear.fc1.weight",
        "resampler_model.temporal_linear.ln.bias",
        "resampler_model.after_norm.weight",
    ]:
        assert n in names, n
    I_t, I_v = cfg.moe_intermediate_size
    t = megatron_tensors(mg_model)
    assert t[lm + "mlp.vision_moe_layer.experts.local_experts.0.linear_fc1.weight"].shape == (2 * I_v, cfg.hidden_size)
    assert t[lm + "mlp.text_moe_layer.experts.local_experts.0.linear_fc1.weight"].shape == (2 * I_t, cfg.hidden_size)
    assert not any("rotary" in n or "local_tokens_per_expert" in n for n in names)


# ----------------------------------------------------------------------------------------------------------------------
# 2 processes (gloo): TP2 (+SP), EP2 (both pools split, a sample per rank), PP2, TP2·EP2 (etp=1) == 1 process and
# transformers over the union; offline torch_dist (either ViT) loaded by Megatron's own dist_checkpointing


@pytest.fixture(scope="module")
def dist_results(tmp_path_factory):
    import json

    import torch.multiprocessing as mp
    from conftest import free_port
    from vl_dist_worker import worker

    from ernie45.convert import convert
    from ernie45.testing import write_tiny_checkpoint

    out = tmp_path_factory.mktemp("vl_dist")
    write_tiny_checkpoint(out / "hf", "vl", seed=0)  # the worker's HF model (same seed)
    # offline torch_dist at a third layout, for Megatron's own loader in the worker (vl_dist_worker.OFFLINE)
    for name, vit in (("hf-vit", "hf"), ("megatron-vit", "megatron")):
        convert(out / "hf", out / f"offline-{name}", to="megatron", tp=2, pp=2, ep=2, vit=vit, progress=False)
    mp.spawn(worker, args=(free_port(), str(out)), nprocs=2, join=True)
    results = json.loads((out / "results.json").read_text())
    assert "error" not in results, results.get("error")
    return results, out


@pytest.mark.parametrize("layout", ["TP2", "EP2", "PP2", "TP2xEP2", "TP2-mgvit", "PP2-mgvit", "TP2xEP2-mgvit"])
def test_two_process_layouts_equal_one_process(layout, dist_results):
    """Each data-parallel rank ran its own sample (EP2: one each): logits and loss equal the 1-process model over
    the union, logits and every gradient equal transformers' over the union."""
    r = dist_results[0][layout]
    print(layout, r)
    assert r["logits"] <= 1e-5 and r["loss"] <= 1e-5, r
    assert r["logits_vs_hf"] <= LOGIT_TOL, r
    assert r["n_grads"] > 0 and r["grads_rel"] <= GRAD_RTOL, r
    assert r["data_parallel"] == (2 if layout == "EP2" else 1), r  # EP2 really split the samples


@pytest.mark.parametrize("name", ["hf-vit-TP2", "hf-vit-EP2", "megatron-vit-TP2", "megatron-vit-TP2xEP2"])
def test_offline_checkpoint_loads_into_live_models(name, dist_results):
    """HF -> torch_dist written offline at TP2·PP2·EP2 (either ViT), loaded by Megatron's own
    ``dist_checkpointing.load`` into live VL models at two other layouts: logits equal transformers'."""
    diff = dist_results[0][f"offline-{name}"]
    print(name, diff)
    assert diff <= LOGIT_TOL


@pytest.mark.parametrize("layout", ["TP2", "EP2", "PP2", "TP2xEP2", "TP2-mgvit", "PP2-mgvit", "TP2xEP2-mgvit"])
def test_two_process_live_export_is_bit_exact(layout, dist_results):
    """HF -> live Megatron (both pools split under EP) -> HF through the production bridge, every tensor equal."""
    from ernie45.bridge.io import HFCheckpoint

    out = dist_results[1]
    src, dst = HFCheckpoint(out / "hf"), HFCheckpoint(out / f"export-{layout}")
    assert sorted(src.keys()) == sorted(dst.keys())
    for name in src.keys():
        assert_bit_exact(src.get(name), dst.get(name), name)


# ----------------------------------------------------------------------------------------------------------------------
# bridge table (ernie45/bridge/vl_table.py) against an on-disk checkpoint written by transformers


def test_vl_table_reproduces_the_model_weights_and_round_trips(tmp_path, mg_model, cfg):
    from ernie45.bridge.io import HFCheckpoint
    from ernie45.bridge.plan import plan_from_hf
    from ernie45.config import load_config
    from ernie45.testing import write_tiny_checkpoint

    path = write_tiny_checkpoint(tmp_path / "vl", "vl", seed=0)  # the same weights as the hf_model fixture
    disk_cfg = load_config(path)
    ckpt = HFCheckpoint(path)
    plan = plan_from_hf(disk_cfg, ckpt.shapes(), where=str(path))  # totality: every disk tensor used exactly once
    assert not plan.tied and not plan.ignored
    model = megatron_tensors(mg_model)
    assert sorted(plan.mg_names) == sorted(model)
    for item in plan.items:
        hf = tuple(ckpt.read(n) for n in item.hf)
        mg = item.op.to_mg(hf)
        for name, t in zip(item.mg, mg):
            assert_bit_exact(t, model[name], name)
        for name, a, b in zip(item.hf, item.op.to_hf(mg), hf, strict=True):
            assert_bit_exact(a, b, name)


def test_vl_table_flat_layout_uses_top_level_vision_keys(cfg):
    """Baidu's original (flat, Thinking) files keep the ViT at top-level ``vision_model.*`` (reference §A.4, §G.3)."""
    from ernie45.bridge.plan import expand

    flat = _flat_twin()
    nested_hf = {n for it in expand(cfg, tied=False) for n in it.hf}
    flat_items = expand(flat, tied=False)
    flat_hf = {n for it in flat_items for n in it.hf}
    moved = {n for n in nested_hf if n.startswith("model.vision_model.")}
    assert moved and flat_hf == (nested_hf - moved) | {n[len("model."):] for n in moved}
    assert [it.mg for it in flat_items] == [it.mg for it in expand(cfg, tied=False)]


def test_bridge_equals_independent_copy(world1, cfg, hf_model, mg_model):
    """The production bridge (on-disk names) and the test's independent copy (in-memory names) agree exactly."""
    twin = _build(cfg, hf_model)
    a, b = megatron_tensors(mg_model), megatron_tensors(twin)
    assert sorted(a) == sorted(b)
    for name in a:
        assert_bit_exact(a[name], b[name], name)


def test_vl_bridge_round_trip_is_bit_exact(world1, cfg, hf_dir, mg_model):
    from ernie45.bridge.io import HFCheckpoint
    from ernie45.bridge.live import gather_hf
    from ernie45.layout import Layout

    src = HFCheckpoint(hf_dir / "hf")
    state = gather_hf([mg_model], cfg, Layout(), tied=False)
    assert sorted(state) == sorted(src.keys())
    for name in src.keys():
        assert_bit_exact(state[name], src.get(name), name)


# ----------------------------------------------------------------------------------------------------------------------
# the Megatron-Core ViT (ErnieConfig.vit_impl="megatron", megatron/vit.py): TP-sharded, same mathematics


@pytest.fixture(scope="module")
def mg_vit_model(world1, cfg, hf_model, hf_dir):
    import dataclasses

    return _build(dataclasses.replace(cfg, vit_impl="megatron"), hf_model, hf_dir).eval()


def test_megatron_vit_features_match_hf(mg_vit_model, hf_model, cfg):
    from ernie45.megatron.vit import ErnieMegatronViT

    assert isinstance(mg_vit_model.vision_model, ErnieMegatronViT)
    batch = make_batch(cfg, CASES["padded_mix"], seed=5)
    for pixels, grid in ((batch["pixel_values"], batch["image_grid_thw"]),
                         (batch["pixel_values_videos"], batch["video_grid_thw"])):  # fmt: skip
        with torch.no_grad():
            ref = hf_model.model.vision_tower(pixels, grid_thw=grid).last_hidden_state
            out = mg_vit_model.vision_model(pixels, grid)
        diff = (out - ref).abs().max().item()
        print(f"ViT features {list(grid.tolist())}: max |Δ| = {diff:.3g} (|features| max {ref.abs().max().item():.3g})")
        assert diff <= 1e-5


@pytest.mark.parametrize("case", [c for c in CASES if c != "text_only"])
def test_megatron_vit_model_matches_hf(case, hf_model, mg_vit_model, cfg):
    _, valid, diff, hf_sets, mg_sets = _forward_and_routing(hf_model, mg_vit_model, cfg, case)
    assert diff <= LOGIT_TOL
    keys = {k for k in hf_sets if valid[k[2], k[3]]}
    assert keys and all(hf_sets[k] == mg_sets[k] for k in keys)


def test_megatron_vit_bridge_round_trip_is_bit_exact(world1, cfg, hf_dir, mg_vit_model):
    """HF fused [Q|K|V] rows -> per-head [q_h, k_h, v_h] linear_qkv -> HF, and every other tensor, bit for bit."""
    import dataclasses

    from ernie45.bridge.io import HFCheckpoint
    from ernie45.bridge.live import gather_hf
    from ernie45.layout import Layout

    names = set(megatron_tensors(mg_vit_model))
    assert "vision_model.decoder.layers.0.self_attention.linear_qkv.weight" in names
    assert not any(n.startswith("vision_model.blocks.") for n in names)
    src = HFCheckpoint(hf_dir / "hf")
    state = gather_hf([mg_vit_model], dataclasses.replace(cfg, vit_impl="megatron"), Layout(), tied=False)
    assert sorted(state) == sorted(src.keys())
    for name in src.keys():
        assert_bit_exact(state[name], src.get(name), name)


def test_rope_option_is_refused_where_it_cannot_hold(cfg):
    """The VL model always rotates by its 3-D positions; a text model takes one of the two named choices."""
    from ernie45.layout import Layout
    from ernie45.megatron.model import build_model
    from ernie45.megatron.vl_model import build_vl_model

    with pytest.raises(ConfigError, match="3-D position_ids"):
        build_vl_model(cfg, Layout(), rope="arange")
    with pytest.raises(ConfigError, match="rope must be"):
        build_model(ErnieConfig.from_hf(tiny_hf_config("moe")), Layout(), rope="yarn")
