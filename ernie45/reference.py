"""The reference: real transformers (parity tests, ``ernie45 parity``, verify; ``runtime.capture_routing`` records its
routers' choices).

transformers reads ``config.json`` itself wherever it can, so the reference stays independent of how ernie45
reads configs. The one layout it cannot read is the flat Thinking config (``model_type: ernie4_5_moe_vl``, Baidu's
original): ``Ernie4_5_VLMoeConfig`` would take the flat dict for a nested one and fall back to its defaults (a
real-size text model), so that layout is translated into transformers' nested config (:func:`transformers_config`)
from the normalised :class:`~ernie45.config.ErnieConfig` -- field by field, nothing else.
"""

from __future__ import annotations

import torch

__all__ = ["transformers_config", "load_reference"]


def transformers_config(cfg):
    """transformers' nested ``Ernie4_5_VLMoeConfig`` for a flat (Thinking) VL config; None for every other layout
    (transformers reads those from ``config.json`` itself)."""
    if not cfg.flat_vl:
        return None
    import transformers

    v = cfg.vision
    text = dict(
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_hidden_layers,
        num_attention_heads=cfg.num_attention_heads,
        num_key_value_heads=cfg.num_key_value_heads,
        hidden_act=cfg.hidden_act,
        rms_norm_eps=cfg.rms_norm_eps,
        rope_parameters=dict(rope_type="default", rope_theta=cfg.rope_theta, mrope_section=list(cfg.mrope_section)),
        use_bias=cfg.use_bias,  # (tie_word_embeddings: the top-level one is what the VL model honours)
        moe_num_experts=cfg.moe_num_experts,
        moe_k=cfg.moe_k,
        moe_intermediate_size=list(cfg.moe_intermediate_size),
        moe_num_shared_experts=cfg.moe_num_shared_experts,
        moe_norm_min=cfg.moe_norm_min,
        router_aux_loss_coef=cfg.router_aux_loss_coef,
        mlp_layer_types=list(cfg.mlp_layer_types),
    )
    vision = dict(
        depth=v.depth,
        hidden_size=v.hidden_size,
        num_heads=v.num_heads,
        intermediate_size=v.intermediate_size,
        hidden_act=v.hidden_act,
        in_channels=v.in_channels,
        patch_size=v.patch_size,
        spatial_merge_size=v.spatial_merge_size,
        temporal_merge_size=v.temporal_merge_size,
        rms_norm_eps=v.layer_norm_eps,  # transformers' name for the ViT LayerNorm eps
        rope_parameters=dict(rope_type="default", rope_theta=v.rope_theta),
    )
    ids = {k: v for k, v in cfg.special_ids.items() if v is not None}
    return transformers.Ernie4_5_VLMoeConfig(
        text_config=text, vision_config=vision, tie_word_embeddings=cfg.tie_word_embeddings, **ids
    )


def load_reference(path, *, dtype: torch.dtype = torch.float32, cfg=None):
    """The transformers model of an HF directory, eager attention and experts (the golden path), in ``dtype``
    (transformers keeps the routers and the expert bias in fp32 by itself: ``_keep_in_fp32_modules_strict``).

    ``cfg`` (the directory's :class:`~ernie45.config.ErnieConfig`, read when not given) picks the class: VL
    checkpoints load as ``Ernie4_5_VLMoeForConditionalGeneration``, flat ones with :func:`transformers_config`.
    """
    import transformers

    from .config import load_config

    cfg = load_config(path) if cfg is None else cfg
    kw = dict(dtype=dtype, attn_implementation="eager")
    if cfg.family == "vl":
        nested = transformers_config(cfg)
        if nested is not None:
            kw["config"] = nested
        model = transformers.Ernie4_5_VLMoeForConditionalGeneration.from_pretrained(str(path), **kw)
    else:
        model = transformers.AutoModelForCausalLM.from_pretrained(str(path), **kw)
    if hasattr(model, "set_experts_implementation"):
        model.set_experts_implementation("eager")
    return model.eval()

