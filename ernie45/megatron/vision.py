"""The ERNIE 4.5 VL vision tower (DFNRope ViT, reference §D) and resampler (reference §E), reused from transformers.

Both modules are transformers' own (``Ernie4_5_VLMoeVisionTransformerPretrainedModel`` and
``Ernie4_5_VLMoeVariableResolutionResamplerModel``), replicated on every tensor-parallel rank of the first
pipeline stage. Their parameter names are therefore HF's (``patch_embed.proj.weight``, ``blocks.B.attn.qkv.weight``,
…, ``ln.weight``; ``spatial_linear.fc1.weight``, …, ``after_norm.weight``) and the bridge copies them unchanged.
Replicated parameters carry no ``tensor_model_parallel`` attribute, which is how Megatron's DDP, optimizer and
dist-checkpointing recognise replicas; every TP rank sees the same pixels, so their gradients agree.

Pixel contract: ``pixel_values`` are the **HF processor's output** (rescaled and CLIP-normalised rows of
``C·p·p = 588``, block-major patch order, reference §D.1). Nothing is normalised here -- Megatron-Bridge normalises again
inside its model (reference §I.3 #10), which would double-normalise processor output.

The HF configs are rebuilt from the normalised :class:`~ernie45.config.ErnieConfig`, so the nested and the flat
(Thinking) layouts give the same modules. ``ErnieConfig.vit_impl="megatron"`` swaps the ViT for the TP-sharded
Megatron-Core one of ``vit.py`` (same mathematics, Megatron parameter names); the resampler stays this one.
"""

from __future__ import annotations

import torch
from megatron.core.transformer import TransformerConfig

from ..config import ErnieConfig

__all__ = ["hf_vision_configs", "build_vision_modules", "vision_features"]


def hf_vision_configs(cfg: ErnieConfig, attn_implementation: str):
    """(vision config, composite config for the resampler) as transformers objects, from ``cfg`` alone."""
    from transformers import Ernie4_5_VLMoeConfig, Ernie4_5_VLMoeVisionConfig

    v = cfg.vision
    if v is None:
        raise ValueError("a VL config is needed to build the vision tower")
    vision = Ernie4_5_VLMoeVisionConfig(
        depth=v.depth,
        hidden_size=v.hidden_size,
        hidden_act=v.hidden_act,
        num_heads=v.num_heads,
        in_channels=v.in_channels,
        patch_size=v.patch_size,
        spatial_merge_size=v.spatial_merge_size,
        temporal_merge_size=v.temporal_merge_size,
        intermediate_size=v.intermediate_size,
        rms_norm_eps=v.layer_norm_eps,
        rope_parameters={"rope_type": "axial", "rope_theta": v.rope_theta},
    )
    vision._attn_implementation = attn_implementation
    # the resampler reads vision_config (widths, merge sizes, LayerNorm eps) and text_config (LM width, RMSNorm eps)
    composite = Ernie4_5_VLMoeConfig(
        vision_config=vision.to_dict(),
        text_config={"hidden_size": cfg.hidden_size, "rms_norm_eps": cfg.rms_norm_eps},
    )
    return vision, composite


def build_vision_modules(
    cfg: ErnieConfig,
    *,
    params_dtype: torch.dtype = torch.float32,
    attn_implementation: str = "sdpa",
    vit_config: TransformerConfig | None = None,
) -> tuple[torch.nn.Module, torch.nn.Module]:
    """(``vision_model``, ``resampler_model``): the HF ViT and resampler for ``cfg``, randomly initialised.

    ``attn_implementation`` picks the ViT attention kernel ("sdpa" or "eager"; both split attention per frame).
    """
    from transformers.models.ernie4_5_vl_moe.modeling_ernie4_5_vl_moe import (
        Ernie4_5_VLMoeVariableResolutionResamplerModel,
        Ernie4_5_VLMoeVisionTransformerPretrainedModel,
    )

    vision_cfg, composite = hf_vision_configs(cfg, attn_implementation)
    resampler_model = Ernie4_5_VLMoeVariableResolutionResamplerModel(composite).to(params_dtype)
    if cfg.vit_impl == "megatron":
        from .vit import ErnieMegatronViT

        if vit_config is None:
            raise ValueError("vit_impl='megatron' needs the ViT's Megatron config (vit.vit_transformer_config)")
        return ErnieMegatronViT(cfg, vit_config), resampler_model
    vision_model = Ernie4_5_VLMoeVisionTransformerPretrainedModel(vision_cfg)
    if vision_model.config._attn_implementation != attn_implementation:
        raise ValueError(
            f"transformers chose attention {vision_model.config._attn_implementation!r}, asked for {attn_implementation!r}"
        )
    return vision_model.to(params_dtype), resampler_model


def vision_features(
    vision_model: torch.nn.Module, resampler_model: torch.nn.Module, pixel_values: torch.Tensor, grid_thw: torch.Tensor
) -> torch.Tensor:
    """LM-width features for all images (or all videos) of a batch, in ``grid_thw`` order.

    ``[Σ t·h·w, 588]`` pixel rows -> ViT -> resampler -> ``[Σ h·w/4, H]`` for images, ``[Σ t·h·w/8, H]`` for videos
    (HF ``get_image_features`` / ``get_video_features``; the resampler's temporal slicing tells the two apart by t).
    """
    from .vit import ErnieMegatronViT

    if isinstance(vision_model, ErnieMegatronViT):
        hidden = vision_model(pixel_values, grid_thw)
    else:
        hidden = vision_model(pixel_values, grid_thw=grid_thw).last_hidden_state
    return resampler_model(hidden, grid_thw)
