"""ERNIE 4.5 VL MoE (``Ernie4_5_VLMoeForConditionalGeneration``) on Megatron-Core.

Structure and parameter names (the bridge tables key off these, reference §H.6)::

    ErnieVLModel
      vision_model      HF DFNRope ViT, replicated        (first pipeline stage only)   vision.py
      resampler_model   HF resampler, replicated          (first pipeline stage only)   vision.py
      language_model    Megatron GPTModel
        embedding.word_embeddings
        rotary_pos_emb  ErnieMultimodalRotaryEmbedding (3-D, interleaved)               rope.py
        decoder.layers.L  input_layernorm, self_attention.linear_qkv/linear_proj, pre_mlp_layernorm,
                          dense L: mlp.linear_fc1/linear_fc2
                          MoE L:   mlp = ErnieVLMoE {text_moe_layer, vision_moe_layer, shared_experts}  vl_moe.py
        decoder.final_layernorm
        output_layer    (untied heads only)

Forward (HF ``Ernie4_5_VLMoeModel.forward`` semantics):

1. ``Embed(input_ids)``; image features (ViT + resampler on all images, ``image_grid_thw`` order) replace the rows
   holding ``image_token_id``, video features the rows holding ``video_token_id`` (reference §F.3);
2. 3-D positions from ``mm_token_type_ids`` + grids exactly like HF ``get_rope_index``, attention-mask aware
   (reference §F.4), or the caller's ``position_ids``;
3. the language model, with the **MoE** token types (``moe_mm_token_type_ids``: start/end tokens are vision here, text
   for positions -- reference §J.7) carried explicitly to every MoE layer through Megatron's ``padding_mask`` channel
   (documented in ``vl_moe.py``); padding positions travel as type ``-1``.

The inputs of steps 2 and 3 are built by ``vl_inputs.py``; steps 1 and 3 are :func:`vl_forward`, the one VL forward
that the model's ``forward``, packed rows (``packing.py``) and the KV-cache session (``inference.py``) all run.

Deliberate differences from Megatron-Bridge's ``Ernie45VLModel`` (reference §I.3): softmax+bias routing (#1), HF pixel
contract without a second normalisation (#10), attention-mask-aware positions that honour given ``position_ids``
(#11), an ``output_layer`` for untied heads (#12), and no module-level token-type global.
"""

from __future__ import annotations

import copy
import dataclasses
from typing import Optional

import torch
from megatron.core import tensor_parallel
from megatron.core.enums import ModelType
from megatron.core.models.gpt import GPTModel
from megatron.core.transformer import TransformerConfig
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.moe.moe_layer import MoELayer, MoESubmodules
from megatron.core.transformer.spec_utils import ModuleSpec

from ..config import ConfigError, ErnieConfig
from ..layout import Layout
from .model import ROPE_POSITION_IDS, ErnieTransformerConfig, _ernie_layer_specs, build_chunks, causal_mask, transformer_config
from .vision import build_vision_modules, vision_features
from .vl_inputs import model_positions_and_types
from .vl_moe import ErnieVLMoE, ErnieVLMoESubmodules

__all__ = [
    "ErnieVLModel",
    "build_vl_model",
    "vl_transformer_config",
    "vl_layer_specs",
    "vl_forward",
]


# ----------------------------------------------------------------------------------------------------------------------
# config and specs


def vl_transformer_config(
    cfg: ErnieConfig,
    layout: Layout,
    *,
    params_dtype: torch.dtype = torch.float32,
    sequence_parallel: bool = False,
    recompute: str | None = None,
    aux_loss: bool = False,
) -> ErnieTransformerConfig:
    """The Megatron config of the VL language model.

    Everything Megatron itself reads is what the text MoE model uses with the *text* pool's width (attention, norms,
    ``moe_ffn_hidden_size = I_t``, shared width ``n_shared·I_t``, E experts, top-k); so it is built from a text view of
    ``cfg`` by :func:`transformer_config`. The vision pool's width travels in the layer spec (:func:`vl_layer_specs`),
    and ``mrope_section`` is set for GPTModel's multimodal-RoPE path.
    """
    if cfg.family != "vl":
        raise ConfigError(f"vl_transformer_config needs a VL config, got family {cfg.family!r}")
    text_view = dataclasses.replace(
        cfg, family="moe", model_type="ernie4_5_moe", moe_intermediate_size=cfg.moe_intermediate_size[:1], mrope_section=None, vision=None,
        vit_impl="hf",
    )
    tc = transformer_config(
        text_view, layout, params_dtype=params_dtype, sequence_parallel=sequence_parallel, recompute=recompute, aux_loss=aux_loss
    )
    tc.mrope_section = list(cfg.mrope_section)
    return tc


def vl_layer_specs(tc: ErnieTransformerConfig, cfg: ErnieConfig) -> list[ModuleSpec]:
    """All layers' specs: the text model's, with each MoE layer's MLP replaced by the dual-pool :class:`ErnieVLMoE`."""
    specs = _ernie_layer_specs(tc)
    vl_moe_layer = None
    out = []
    for spec in specs:
        if spec.submodules.mlp.module is not MoELayer:
            out.append(spec)
            continue
        if vl_moe_layer is None:
            moe = spec.submodules.mlp.submodules
            # one stock MoELayer spec per pool: ERNIE router + SequentialMLP experts, no per-pool shared experts
            pool = ModuleSpec(
                module=MoELayer, submodules=MoESubmodules(experts=moe.experts, shared_experts=None, router=moe.router)
            )
            vl_mlp = ModuleSpec(
                module=ErnieVLMoE,
                submodules=ErnieVLMoESubmodules(text_moe_layer=pool, vision_moe_layer=pool, shared_experts=moe.shared_experts),
                params={"ffn_hidden_sizes": tuple(cfg.moe_intermediate_size)},
            )
            vl_moe_layer = copy.copy(spec)
            vl_moe_layer.submodules = copy.copy(spec.submodules)
            vl_moe_layer.submodules.mlp = vl_mlp
        out.append(vl_moe_layer)
    return out


# ----------------------------------------------------------------------------------------------------------------------
# the model


class ErnieVLModel(MegatronModule):
    """One pipeline chunk of the ERNIE 4.5 VL model (module docstring): a built language model, plus the ViT and
    the resampler on the first pipeline stage."""

    def __init__(
        self,
        cfg: ErnieConfig,
        language_model: GPTModel,
        *,
        vision_attn_implementation: str = "sdpa",
        vit_config: TransformerConfig | None = None,
    ) -> None:
        super().__init__(config=language_model.config)
        self.cfg = cfg
        self.pre_process = language_model.pre_process
        self.post_process = language_model.post_process
        self.model_type = ModelType.encoder_or_decoder  # Megatron's pipeline schedules read it
        self.language_model = language_model
        self.vision_model = None
        self.resampler_model = None
        if self.pre_process:
            self.vision_model, self.resampler_model = build_vision_modules(
                cfg, params_dtype=self.config.params_dtype, attn_implementation=vision_attn_implementation,
                vit_config=vit_config,
            )  # fmt: skip

    # -- Megatron plumbing (pipeline input, tied embeddings) ------------------------------------------------------------
    def set_input_tensor(self, input_tensor) -> None:
        self.language_model.set_input_tensor(input_tensor)

    @property
    def share_embeddings_and_output_weights(self) -> bool:
        return self.language_model.share_embeddings_and_output_weights

    def shared_embedding_or_output_weight(self) -> torch.Tensor:
        return self.language_model.shared_embedding_or_output_weight()

    @property
    def position_embedding_type(self) -> str:
        return self.language_model.position_embedding_type

    # -- training helpers ----------------------------------------------------------------------------------------------
    def freeze(self, *, language: bool = False, vision: bool = False, projection: bool = False) -> None:
        """Stop gradients for the language model, the ViT and/or the resampler ("projection"). Call before DDP."""
        for flag, module in ((language, self.language_model), (vision, self.vision_model), (projection, self.resampler_model)):
            if flag and module is not None:
                for p in module.parameters():
                    p.requires_grad_(False)

    # -- forward -------------------------------------------------------------------------------------------------------
    def embed(
        self,
        input_ids: torch.Tensor,
        pixel_values: Optional[torch.Tensor] = None,
        image_grid_thw: Optional[torch.Tensor] = None,
        pixel_values_videos: Optional[torch.Tensor] = None,
        video_grid_thw: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        """Decoder input ``[S, B, H]`` (this rank's SP chunk under sequence parallelism)."""
        emb_BSD = self.language_model.embedding(input_ids=input_ids, position_ids=None).transpose(0, 1)
        for pixels, grid, token in (
            (pixel_values, image_grid_thw, "image_token_id"),
            (pixel_values_videos, video_grid_thw, "video_token_id"),
        ):
            if pixels is None:
                continue
            if grid is None:
                raise ValueError(f"pixels for {token} were given without their grid_thw")
            feats_ND = vision_features(self.vision_model, self.resampler_model, pixels, grid)
            mask_BS = input_ids == self.cfg.special_ids[token]
            if int(mask_BS.sum()) != feats_ND.shape[0]:
                raise ValueError(f"{int(mask_BS.sum())} {token} placeholders for {feats_ND.shape[0]} features")
            emb_BSD = emb_BSD.masked_scatter(mask_BS.unsqueeze(-1), feats_ND.to(emb_BSD.dtype))
        emb_SBD = emb_BSD.transpose(0, 1).contiguous()
        if self.config.sequence_parallel:
            emb_SBD = tensor_parallel.scatter_to_sequence_parallel_region(emb_SBD, group=self.language_model.pg_collection.tp)
        return emb_SBD

    def forward(
        self,
        input_ids: torch.Tensor,
        *,
        attention_mask: Optional[torch.Tensor] = None,
        position_ids: Optional[torch.Tensor] = None,
        mm_token_type_ids: Optional[torch.Tensor] = None,
        moe_mm_token_type_ids: Optional[torch.Tensor] = None,
        pixel_values: Optional[torch.Tensor] = None,
        image_grid_thw: Optional[torch.Tensor] = None,
        pixel_values_videos: Optional[torch.Tensor] = None,
        video_grid_thw: Optional[torch.Tensor] = None,
        labels: Optional[torch.Tensor] = None,
        runtime_gather_output: Optional[bool] = None,
    ) -> torch.Tensor:
        """HF processor outputs in, logits ``[B, S, V(/tp)]`` out -- or per-token loss ``[B, S]`` when ``labels``
        (Megatron convention: already shifted, see ``vl_inputs.lm_labels``) are given; hidden states on non-last
        stages.

        Every pipeline stage gets the same batch: positions and token types are needed by every stage, pixels only
        by the first. ``attention_mask`` ``[B, S]`` (1 = token, 0 = padding) masks padded keys and padded positions.
        ``moe_mm_token_type_ids = None`` routes every token to the text pool, as in HF.
        """
        position_ids, moe_types_BS = model_positions_and_types(
            input_ids,
            self.cfg,
            attention_mask=attention_mask,
            position_ids=position_ids,
            mm_token_type_ids=mm_token_type_ids,
            moe_mm_token_type_ids=moe_mm_token_type_ids,
            image_grid_thw=image_grid_thw,
            video_grid_thw=video_grid_thw,
        )
        return vl_forward(
            self,
            input_ids,
            attention_mask=causal_mask(input_ids.shape[1], input_ids.device, padding_mask=attention_mask),
            position_ids=position_ids,
            moe_token_types=moe_types_BS,
            pixel_values=pixel_values,
            image_grid_thw=image_grid_thw,
            pixel_values_videos=pixel_values_videos,
            video_grid_thw=video_grid_thw,
            labels=labels,
            runtime_gather_output=runtime_gather_output,
        )


def vl_forward(
    chunk: ErnieVLModel,
    input_ids: torch.Tensor,
    *,
    attention_mask: torch.Tensor,
    position_ids: torch.Tensor,
    moe_token_types: Optional[torch.Tensor],
    pixel_values: Optional[torch.Tensor] = None,
    image_grid_thw: Optional[torch.Tensor] = None,
    pixel_values_videos: Optional[torch.Tensor] = None,
    video_grid_thw: Optional[torch.Tensor] = None,
    labels: Optional[torch.Tensor] = None,
    inference_context=None,
    runtime_gather_output: Optional[bool] = None,
) -> torch.Tensor:
    """The VL forward every caller runs (the model's ``forward``, packed rows, the KV-cache session): the embedding
    with the vision features in place (first stage), then the language model with the MoE token types.

    Everything is explicit: the attention mask ``[B|1, 1, Sq, Sk]`` (True = masked; block-diagonal for packed rows),
    ``position_ids`` ``[3, B, S]``, ``moe_token_types`` ``[B, Sq]`` (0 text, >0 vision, ``PAD_TOKEN_TYPE`` padding;
    None = all text). ``inference_context`` is Megatron's KV-cache context (``inference.py``). Returns what
    ``GPTModel.forward`` returns.
    """
    decoder_input = None
    if chunk.pre_process:
        decoder_input = chunk.embed(input_ids, pixel_values, image_grid_thw, pixel_values_videos, video_grid_thw)
    types_BS = torch.zeros_like(input_ids) if moe_token_types is None else moe_token_types.long()
    return chunk.language_model(
        input_ids=None,
        position_ids=position_ids,
        attention_mask=attention_mask,
        decoder_input=decoder_input,
        labels=labels,
        padding_mask=types_BS,  # the MoE token types, see vl_moe.py
        inference_context=inference_context,
        runtime_gather_output=runtime_gather_output,
    )


def build_vl_model(
    cfg: ErnieConfig,
    layout: Layout,
    *,
    tie_word_embeddings: bool | None = None,
    params_dtype: torch.dtype = torch.float32,
    sequence_parallel: bool = False,
    recompute: str | None = None,
    aux_loss: bool = False,
    seq_length: int = 4096,
    vision_attn_implementation: str = "sdpa",
    rope: str = ROPE_POSITION_IDS,
) -> list[ErnieVLModel]:
    """Build this rank's VL model chunks (one per virtual pipeline stage). Process groups must exist.

    ``tie_word_embeddings`` overrides the (top-level) config value, as in :func:`ernie45.megatron.model.build_model`.
    ``rope``: the VL model always rotates by its 3-D ``position_ids``; only ``"position_ids"`` is accepted (the
    option exists so callers pass one ``rope=`` to either family).
    """
    layout.validate(cfg)
    if rope != ROPE_POSITION_IDS:
        raise ConfigError(f"rope={rope!r}: the VL model rotates by its 3-D position_ids ({ROPE_POSITION_IDS!r})")
    if aux_loss:
        # transformers' VL loss writes each token's text-pool or vision-pool router logits into the same [T, E]
        # columns and runs the text loss on that mix: not what the per-pool routers' PooledAuxLoss computes
        raise ConfigError("aux_loss is not supported for VL models (transformers' VL aux loss mixes both pools' logits)")
    tc = vl_transformer_config(
        cfg, layout, params_dtype=params_dtype, sequence_parallel=sequence_parallel, recompute=recompute, aux_loss=aux_loss
    )
    tie = cfg.tie_word_embeddings if tie_word_embeddings is None else tie_word_embeddings
    vit_config = None
    if cfg.vit_impl == "megatron":
        from .vit import vit_transformer_config

        vit_config = vit_transformer_config(cfg, layout, params_dtype=params_dtype)
    return build_chunks(
        cfg,
        layout,
        tc,
        vl_layer_specs(tc, cfg),
        tie=tie,
        seq_length=seq_length,
        # vision features are written into the embeddings first; ErnieVLModel.embed scatters to SP afterwards
        scatter_embedding_sequence_parallel=False,
        wrap=lambda lm: ErnieVLModel(cfg, lm, vision_attn_implementation=vision_attn_implementation, vit_config=vit_config),
    )
