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

Deliberate differences from Megatron-Bridge's ``Ernie45VLModel`` (reference §I.3): softmax+bias routing (#1), HF pixel
contract without a second normalisation (#10), attention-mask-aware positions that honour given ``position_ids``
(#11), an ``output_layer`` for untied heads (#12), and no module-level token-type global.
"""

from __future__ import annotations

import copy
import dataclasses
import itertools
from typing import Optional

import torch
from megatron.core import tensor_parallel
from megatron.core.enums import ModelType
from megatron.core.models.gpt import GPTModel
from megatron.core.transformer import TransformerConfig
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.moe.moe_layer import MoELayer, MoESubmodules
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_block import TransformerBlockSubmodules, get_num_layers_to_build
from megatron.core.transformer.transformer_layer import get_transformer_layer_offset

from ..config import ConfigError, ErnieConfig
from .model import ErnieRMSNorm, ErnieTransformerConfig, _ernie_layer_specs, causal_mask, padded_vocab_size, transformer_config
from .parallel import Layout
from .rope import ErnieMultimodalRotaryEmbedding
from .vision import build_vision_modules, vision_features
from .vl_moe import PAD_TOKEN_TYPE, ErnieVLMoE, ErnieVLMoESubmodules

__all__ = [
    "ErnieVLModel",
    "build_vl_model",
    "vl_transformer_config",
    "vl_layer_specs",
    "vl_position_ids",
    "token_type_ids",
    "lm_labels",
    "masked_token_mean",
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
        cfg, family="moe", moe_intermediate_size=cfg.moe_intermediate_size[:1], mrope_section=None, vision=None,
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


def vl_block_spec(tc: ErnieTransformerConfig, cfg: ErnieConfig, *, pp_rank: int, vp_stage: int | None):
    """The decoder block of one pipeline stage (chunk); Megatron's offset rules pick the layers (as in model.py)."""
    specs = vl_layer_specs(tc, cfg)
    offset = get_transformer_layer_offset(tc, vp_stage=vp_stage, pp_rank=pp_rank)
    n = get_num_layers_to_build(tc, vp_stage=vp_stage, pp_rank=pp_rank)
    return TransformerBlockSubmodules(layer_specs=specs[offset : offset + n], layer_norm=ErnieRMSNorm)


# ----------------------------------------------------------------------------------------------------------------------
# inputs


def token_type_ids(input_ids: torch.Tensor, cfg: ErnieConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """``(mm_token_type_ids, moe_mm_token_type_ids)`` exactly as the HF processor builds them (reference §F.2).

    RoPE types: 1 on image placeholders, 2 on video placeholders, else 0. MoE types: the same, plus 1 on
    image start/end tokens and 2 on video start/end tokens.
    """
    ids = cfg.special_ids
    mm = torch.zeros_like(input_ids)
    mm[input_ids == ids["image_token_id"]] = 1
    mm[input_ids == ids["video_token_id"]] = 2
    moe = mm.clone()
    for key, value in (("image_start_token_id", 1), ("image_end_token_id", 1), ("video_start_token_id", 2), ("video_end_token_id", 2)):
        moe[input_ids == ids[key]] = value
    return mm, moe


def vl_position_ids(
    input_ids: torch.Tensor,
    mm_token_type_ids: Optional[torch.Tensor],
    image_grid_thw: Optional[torch.Tensor] = None,
    video_grid_thw: Optional[torch.Tensor] = None,
    attention_mask: Optional[torch.Tensor] = None,
    *,
    spatial_merge_size: int,
    temporal_merge_size: int,
) -> torch.Tensor:
    """3-D positions ``[3, B, S]`` (rows T, H, W), exactly HF ``get_rope_index`` / ``compute_3d_position_ids``.

    Per row, over the unpadded tokens, consecutive tokens of one RoPE type form a group: text groups count on from
    ``cur``; an image (video) group takes the next grid and enumerates ``(t, h/m, w/m)`` (``t/2`` for videos) in C order
    offset by ``cur``, then ``cur += max(h, w)/m`` (reference §F.4). Padding gets 0. With no grids at all HF uses plain
    ``arange`` positions -- padding included -- and so does this.
    """
    B, S = input_ids.shape
    device = input_ids.device
    if image_grid_thw is None and video_grid_thw is None:
        return torch.arange(S, device=device).view(1, 1, S).expand(3, B, S)
    if mm_token_type_ids is None:
        raise ValueError("image/video grids were given without mm_token_type_ids; 3-D positions need them (reference §F.2)")
    m = spatial_merge_size
    grids = {
        1: iter([] if image_grid_thw is None else image_grid_thw.tolist()),
        2: iter([] if video_grid_thw is None else video_grid_thw.tolist()),
    }
    temporal = {1: 1, 2: temporal_merge_size}  # images have no temporal merge
    pos_3BS = torch.zeros(3, B, S, dtype=input_ids.dtype, device=device)
    for b in range(B):
        keep_S = torch.ones(S, dtype=torch.bool, device=device) if attention_mask is None else attention_mask[b].bool()
        types = mm_token_type_ids[b][keep_S].tolist()
        cur, pieces = 0, []
        for kind, group in itertools.groupby(types):
            n = len(list(group))
            if kind == 0:
                pieces.append(torch.arange(cur, cur + n, device=device).view(1, n).expand(3, n))
                cur += n
                continue
            if kind not in grids:
                raise ValueError(f"mm_token_type_ids holds {kind}; only 0 (text), 1 (image), 2 (video) exist")
            t, h, w = next(grids[kind])
            lt, lh, lw = t // temporal[kind], h // m, w // m
            if n != lt * lh * lw:
                raise ValueError(f"a run of {n} type-{kind} tokens in row {b} does not match grid {(t, h, w)} ({lt * lh * lw} tokens)")
            grid_t, grid_h, grid_w = torch.meshgrid(
                torch.arange(lt, device=device), torch.arange(lh, device=device), torch.arange(lw, device=device), indexing="ij"
            )
            pieces.append(torch.stack([grid_t, grid_h, grid_w]).reshape(3, -1) + cur)
            cur += max(h, w) // m
        pos_3BS[:, b, keep_S] = torch.cat(pieces, dim=1).to(pos_3BS.dtype)
    return pos_3BS


def lm_labels(
    hf_labels: torch.Tensor, attention_mask: Optional[torch.Tensor] = None, ignore_index: int = -100
) -> tuple[torch.Tensor, torch.Tensor]:
    """HF-style labels (unshifted, ``-100`` = ignore) -> Megatron ``(labels, loss_mask)`` (next-token, shifted).

    With ``attention_mask`` the loss is also masked where the *predicting* position is padding. HF's shift does not
    do that: under left padding the last pad position "predicts" the first real token from a fully masked attention
    row, which adds a term with spurious gradients -- set the first real token's label to -100 to compare with HF.
    """
    labels = torch.full_like(hf_labels, ignore_index)
    labels[:, :-1] = hf_labels[:, 1:]
    loss_mask = labels != ignore_index
    if attention_mask is not None:
        loss_mask &= attention_mask.bool()
    return labels.masked_fill(~loss_mask, 0), loss_mask.float()


def masked_token_mean(per_token_loss: torch.Tensor, loss_mask: torch.Tensor) -> torch.Tensor:
    """Mean of the per-token loss over the unmasked tokens (HF's causal-LM loss reduction)."""
    return (per_token_loss.float() * loss_mask).sum() / loss_mask.sum()


# ----------------------------------------------------------------------------------------------------------------------
# the model


class ErnieVLModel(MegatronModule):
    """One pipeline chunk of the ERNIE 4.5 VL model (module docstring)."""

    def __init__(
        self,
        cfg: ErnieConfig,
        config: ErnieTransformerConfig,
        *,
        vocab_size: int,
        pre_process: bool = True,
        post_process: bool = True,
        share_embeddings_and_output_weights: bool = False,
        seq_length: int = 4096,
        pp_rank: int = 0,
        vp_stage: int | None = None,
        vision_attn_implementation: str = "sdpa",
        vit_config: TransformerConfig | None = None,
    ) -> None:
        super().__init__(config=config)
        self.cfg = cfg
        self.pre_process = pre_process
        self.post_process = post_process
        self.model_type = ModelType.encoder_or_decoder  # Megatron's pipeline schedules read it
        self.language_model = GPTModel(
            config=config,
            transformer_layer_spec=vl_block_spec(config, cfg, pp_rank=pp_rank, vp_stage=vp_stage),
            vocab_size=vocab_size,
            max_sequence_length=seq_length,
            pre_process=pre_process,
            post_process=post_process,
            share_embeddings_and_output_weights=share_embeddings_and_output_weights,
            # "mrope" makes GPTModel hand position_ids [3, B, S] to rotary_pos_emb; its stock module (Qwen2-VL block
            # layout) is replaced by ERNIE's right below, as GPTModel has no spec field for the rotary module
            position_embedding_type="mrope",
            rotary_base=cfg.rope_theta,
            # vision features are written into the embeddings first; this model scatters to SP afterwards
            scatter_embedding_sequence_parallel=False,
            vp_stage=vp_stage,
        )
        self.language_model.rotary_pos_emb = ErnieMultimodalRotaryEmbedding(cfg.head_dim, cfg.rope_theta, cfg.mrope_section)
        self.vision_model = None
        self.resampler_model = None
        if pre_process:
            self.vision_model, self.resampler_model = build_vision_modules(
                cfg, params_dtype=config.params_dtype, attn_implementation=vision_attn_implementation,
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

    # -- training helpers ----------------------------------------------------------------------------------------------
    def freeze(self, *, language: bool = False, vision: bool = False, projection: bool = False) -> None:
        """Stop gradients for the language model, the ViT and/or the resampler ("projection"). Call before DDP."""
        for flag, module in ((language, self.language_model), (vision, self.vision_model), (projection, self.resampler_model)):
            if flag and module is not None:
                for p in module.parameters():
                    p.requires_grad_(False)

    # -- forward -------------------------------------------------------------------------------------------------------
    def position_ids(
        self,
        input_ids: torch.Tensor,
        mm_token_type_ids: Optional[torch.Tensor],
        image_grid_thw: Optional[torch.Tensor],
        video_grid_thw: Optional[torch.Tensor],
        attention_mask: Optional[torch.Tensor],
    ) -> torch.Tensor:
        v = self.cfg.vision
        return vl_position_ids(
            input_ids,
            mm_token_type_ids,
            image_grid_thw,
            video_grid_thw,
            attention_mask,
            spatial_merge_size=v.spatial_merge_size,
            temporal_merge_size=v.temporal_merge_size,
        )

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
        (Megatron convention: already shifted, see :func:`lm_labels`) are given; hidden states on non-last stages.

        Every pipeline stage gets the same batch: positions and token types are needed by every stage, pixels only
        by the first. ``attention_mask`` ``[B, S]`` (1 = token, 0 = padding) masks padded keys and padded positions.
        ``moe_mm_token_type_ids = None`` routes every token to the text pool, as in HF.
        """
        B, S = input_ids.shape
        if position_ids is None:
            position_ids = self.position_ids(input_ids, mm_token_type_ids, image_grid_thw, video_grid_thw, attention_mask)
        elif position_ids.dim() == 2:
            position_ids = position_ids.unsqueeze(0).expand(3, B, S)

        decoder_input = None
        if self.pre_process:
            decoder_input = self.embed(input_ids, pixel_values, image_grid_thw, pixel_values_videos, video_grid_thw)

        moe_types_BS = (
            torch.zeros_like(input_ids) if moe_mm_token_type_ids is None else moe_mm_token_type_ids.to(torch.long)
        )
        if attention_mask is not None:
            moe_types_BS = moe_types_BS.masked_fill(~attention_mask.bool(), PAD_TOKEN_TYPE)

        return self.language_model(
            input_ids=None,
            position_ids=position_ids,
            attention_mask=causal_mask(S, input_ids.device, padding_mask=attention_mask),
            decoder_input=decoder_input,
            labels=labels,
            padding_mask=moe_types_BS,  # the MoE token types, see vl_moe.py
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
) -> list[ErnieVLModel]:
    """Build this rank's VL model chunks (one per virtual pipeline stage). Process groups must exist.

    ``tie_word_embeddings`` overrides the (top-level) config value, as in :func:`ernie45.megatron.model.build_model`.
    """
    from megatron.core import parallel_state as ps

    layout.validate(cfg)
    if aux_loss:
        # transformers' VL loss writes each token's text-pool or vision-pool router logits into the same [T, E]
        # columns and runs the text loss on that mix: not what the per-pool routers' PooledAuxLoss computes
        raise ConfigError("aux_loss is not supported for VL models (transformers' VL aux loss mixes both pools' logits)")
    tc = vl_transformer_config(
        cfg, layout, params_dtype=params_dtype, sequence_parallel=sequence_parallel, recompute=recompute, aux_loss=aux_loss
    )
    tie = cfg.tie_word_embeddings if tie_word_embeddings is None else tie_word_embeddings
    pp_rank = ps.get_pipeline_model_parallel_rank()
    vit_config = None
    if cfg.vit_impl == "megatron":
        from .vit import vit_transformer_config

        vit_config = vit_transformer_config(cfg, layout, params_dtype=params_dtype)
    chunks = []
    for v in range(layout.vpp):
        vp = v if layout.vpp > 1 else None
        chunks.append(
            ErnieVLModel(
                cfg,
                tc,
                vocab_size=padded_vocab_size(cfg, layout),
                pre_process=ps.is_pipeline_first_stage(ignore_virtual=False, vp_stage=vp),
                post_process=ps.is_pipeline_last_stage(ignore_virtual=False, vp_stage=vp),
                share_embeddings_and_output_weights=tie,
                seq_length=seq_length,
                pp_rank=pp_rank,
                vp_stage=vp,
                vision_attn_implementation=vision_attn_implementation,
                vit_config=vit_config,
            )
        )
    return chunks
