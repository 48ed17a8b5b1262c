"""Config normalisation: four HF layouts -> one frozen ErnieConfig, with clear errors and no silent defaults."""

from __future__ import annotations

import dataclasses
import json
import re
import warnings

import pytest

from ernie45.config import ConfigError, ErnieConfig, load_config
from ernie45.testing import tiny_hf_config


def test_text_moe_layer_rule_uses_start_interval_and_end():
    raw = tiny_hf_config("moe", num_hidden_layers=8, moe_layer_start_index=2, moe_layer_interval=2, moe_layer_end_index=6)
    cfg = ErnieConfig.from_hf(raw)
    # reference §A.2 example: L=8, start=2, interval=2, end=6 -> D D D S D S D D
    assert "".join(t[0].upper() for t in cfg.mlp_layer_types) == "DDDSDSDD"


def test_end_index_minus_one_means_last_layer():
    cfg = ErnieConfig.from_hf(tiny_hf_config("moe", moe_layer_interval=1, moe_layer_end_index=-1))
    assert cfg.mlp_layer_types == ("dense",) + ("sparse",) * 5


def test_moe_num_experts_as_list_and_shared_width():
    cfg = ErnieConfig.from_hf(tiny_hf_config("moe", moe_num_experts=[8, 8]))
    assert cfg.moe_num_experts == 8
    assert cfg.shared_expert_intermediate_size == 2 * 32


def test_dense_head_dim_and_gqa():
    cfg = ErnieConfig.from_hf(tiny_hf_config("dense"))
    assert (cfg.head_dim, cfg.num_attention_heads, cfg.num_key_value_heads) == (16, 4, 2)
    assert cfg.head_dim * cfg.num_attention_heads != cfg.hidden_size
    assert cfg.rope_theta == 500000.0 and cfg.mlp_layer_types == ("dense",) * 4


def test_legacy_top_level_rope_theta():
    raw = tiny_hf_config("dense")
    del raw["rope_parameters"]
    raw["rope_theta"] = 12345.0
    assert ErnieConfig.from_hf(raw).rope_theta == 12345.0


@pytest.mark.parametrize(
    "field", ["hidden_size", "num_hidden_layers", "vocab_size", "rms_norm_eps", "moe_k", "moe_num_experts"]
)
def test_missing_required_field_is_named(field):
    raw = tiny_hf_config("moe")
    del raw[field]
    with pytest.raises(ConfigError, match=field):
        ErnieConfig.from_hf(raw)


def test_missing_moe_pattern_field_is_named():
    raw = tiny_hf_config("moe")
    del raw["moe_layer_interval"]
    with pytest.raises(ConfigError, match="moe_layer_interval"):
        ErnieConfig.from_hf(raw)


@pytest.mark.parametrize(
    "change, match",
    [
        (dict(num_key_value_heads=3), "multiple of"),
        (dict(moe_k=9), "moe_k"),
        (dict(moe_num_experts=[8, 4]), "pools of different sizes"),
        (dict(model_type="llama"), "not an ERNIE"),
        (dict(hidden_act="gelu"), "silu"),
    ],
)
def test_inconsistent_config_is_refused(change, match):
    with pytest.raises(ConfigError, match=match):
        ErnieConfig.from_hf(tiny_hf_config("moe", **change))


def test_vl_nested_and_flat_thinking_layout_normalise_to_the_same_config():
    nested = ErnieConfig.from_hf(tiny_hf_config("vl"))
    t, v = tiny_hf_config("vl")["text_config"], tiny_hf_config("vl")["vision_config"]
    flat = {
        # reference §A.4: everything at top level, list-valued MoE fields, DFNRope vision config, no eps/temporal size
        "model_type": "ernie4_5_moe_vl",
        **{k: t[k] for k in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                              "num_attention_heads", "num_key_value_heads", "rms_norm_eps", "use_bias",
                              "moe_k", "moe_num_shared_experts")},
        "rope_theta": 500000.0,
        "freq_allocation": 2,
        "moe_num_experts": [8, 8],
        "moe_intermediate_size": [32, 16],
        "moe_layer_start_index": [1, 1],
        "moe_layer_end_index": [3, 3],
        "moe_layer_interval": 1,
        "tie_word_embeddings": False,
        "im_patch_id": 152,
        "image_start_token_id": 150, "image_end_token_id": 151,
        "video_start_token_id": 153, "video_end_token_id": 154, "video_token_id": 155,
        "spatial_conv_size": 2,
        "temporal_conv_size": 2,
        "vision_config": {"depth": v["depth"], "embed_dim": v["hidden_size"], "hidden_size": v["hidden_size"],
                          "mlp_ratio": 2, "num_heads": v["num_heads"], "in_channels": 3, "patch_size": 14,
                          "spatial_merge_size": 2, "hidden_act": "quick_gelu"},
    }  # fmt: skip
    flat_cfg = ErnieConfig.from_hf(flat)
    assert flat_cfg == nested
    assert flat_cfg.vision.layer_norm_eps == 1e-6  # never the LM's 1e-5 (Megatron-Bridge deviation #14)


def test_vl_top_level_tie_wins():
    raw = tiny_hf_config("vl", tie_word_embeddings=True)
    raw["text_config"]["tie_word_embeddings"] = False
    assert ErnieConfig.from_hf(raw).tie_word_embeddings is True


def test_load_config_errors_name_the_file(tmp_path):
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="config.json"):
        load_config(tmp_path)
    with pytest.raises(ConfigError, match="no config.json"):
        load_config(tmp_path / "nowhere")


def test_config_is_frozen_and_round_trips_to_hf():
    raw = tiny_hf_config("moe")
    cfg = ErnieConfig.from_hf(raw)
    with pytest.raises(Exception):
        cfg.hidden_size = 1  # type: ignore[misc]
    assert json.dumps(cfg.to_hf(), sort_keys=True) == json.dumps(raw, sort_keys=True)


def _saved(family: str) -> dict:
    """The config.json transformers writes for the tiny config of ``family`` (what ``save_pretrained`` stores)."""
    from ernie45.testing import _hf_config_object

    return json.loads(_hf_config_object(tiny_hf_config(family)).to_json_string(use_diff=True))


@pytest.mark.parametrize("family", ["dense", "moe", "vl"])
def test_every_saved_key_is_read_or_declared_ignored(family):
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # an unknown key would be reported
        cfg = ErnieConfig.from_hf(_saved(family))
    assert cfg.model_type == _saved(family)["model_type"]
    assert cfg.max_position_embeddings == 131072  # transformers' default, written by save_pretrained


def _flat_vl() -> dict:
    t, v = tiny_hf_config("vl")["text_config"], tiny_hf_config("vl")["vision_config"]
    keep = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
            "num_key_value_heads", "rms_norm_eps", "use_bias", "moe_k", "moe_num_shared_experts")  # fmt: skip
    return {
        "model_type": "ernie4_5_moe_vl", **{k: t[k] for k in keep}, "rope_theta": 500000.0, "freq_allocation": 2,
        "moe_num_experts": [8, 8], "moe_intermediate_size": [32, 16], "moe_layer_start_index": 1,
        "moe_layer_end_index": 3, "moe_layer_interval": 1, "tie_word_embeddings": False,
        "vision_config": {"depth": v["depth"], "embed_dim": v["hidden_size"], "hidden_size": v["hidden_size"],
                          "mlp_ratio": 2, "num_heads": v["num_heads"], "in_channels": 3, "patch_size": 14,
                          "hidden_act": "quick_gelu"},
    }  # fmt: skip


@pytest.mark.parametrize(
    "layout, path",
    [("moe", ()), ("vl", ()), ("vl", ("text_config",)), ("vl", ("vision_config",)), ("flat", ()), ("flat", ("vision_config",))],
    ids=["text", "vl-top", "vl-text_config", "vl-vision_config", "flat-top", "flat-vision_config"],
)
def test_unknown_keys_are_reported_at_every_level(layout, path):
    raw = _flat_vl() if layout == "flat" else _saved(layout)
    level = raw
    for key in path:
        level = level[key]
    level["ernie_new_knob"] = 3
    where = "".join(f"{key}." for key in path)
    with pytest.warns(UserWarning, match=re.escape(f"{where}['ernie_new_knob']")):
        ErnieConfig.from_hf(raw)


def test_layout_is_a_field_and_not_part_of_equality():
    nested = ErnieConfig.from_hf(tiny_hf_config("vl"))
    assert nested.model_type == "ernie4_5_vl_moe" and not nested.flat_vl
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # every key of the flat layout is read or declared ignored
        flat = ErnieConfig.from_hf(_flat_vl())
    assert flat.model_type == "ernie4_5_moe_vl" and flat.flat_vl
    with pytest.raises(ConfigError, match="not a dense layout"):
        dataclasses.replace(ErnieConfig.from_hf(tiny_hf_config("dense")), model_type="ernie4_5_moe")
