"""The ERNIE 4.5 VL vision tower as a Megatron-Core ``TransformerBlock``: tensor-parallel, reference §D and §H.6 (MG-ViT).

The alternative to the replicated transformers ViT of ``vision.py`` (chosen by ``ErnieConfig.vit_impl``): the 32
blocks of a 1280-wide ViT are 0.6 B parameters, which a TP group can shard like the language model instead of
replicating. Same mathematics as transformers' ``Ernie4_5_VLMoeVisionTransformerPretrainedModel``:

    x   = pixel rows @ W_pe^T                                   patch embedding, no bias (§D.2)
    per block: x += proj(attn(RoPE2D(qkv(LayerNorm1(x)))))      non-causal, one segment per frame (§D.4)
               x += fc2(quick_gelu(fc1(LayerNorm2(x))))
    out = LayerNorm(x)                                          the block's final_layernorm (§D.5)

It is Megatron's local ViT layer spec (``ColumnParallelLinear`` fused QKV with per-head ``[q_h, k_h, v_h]`` rows,
``RowParallelLinear`` projections, torch ``LayerNorm``) with three settings that make it ERNIE's: biases on,
``quick_gelu`` (``x·σ(1.702x)``, not GELU, reference §I.3 #11) and half-split RoPE (``rotary_interleaved=False``) fed with
ERNIE's 2-D angles. Attention is block-diagonal over frames through an explicit mask (the CPU path has no THD
kernels; on GPU a ``PackedSeqParams`` with the same ``cu_seqlens`` is the drop-in).

The FFN width is the config's ``intermediate_size`` (what transformers uses), not ``embed_dim·mlp_ratio`` as
Megatron-Bridge does (reference §I.3 #15). The ViT lives whole on the first pipeline stage and never uses sequence
parallelism, so its Megatron config has PP = 1 and SP off whatever the language model's layout.

Legend: ``N`` patch rows of the batch (Σ t·h·w), ``P`` pixel row (C_in·p²), ``C`` ViT width, ``D`` head dim.
"""

from __future__ import annotations

import torch
from megatron.core.models.vision.vit_layer_specs import get_vit_layer_with_local_spec
from megatron.core.transformer import TransformerConfig
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_block import TransformerBlock

from ..config import ConfigError, ErnieConfig
from ..layout import Layout
from .model import engine_settings

__all__ = ["ErnieMegatronViT", "quick_gelu", "vit_transformer_config", "vision_position_ids", "frame_mask"]


def quick_gelu(x: torch.Tensor) -> torch.Tensor:
    """transformers' ``quick_gelu`` (the ViT MLP activation), as a module-level function so configs pickle."""
    return x * torch.sigmoid(1.702 * x)


def vit_transformer_config(cfg: ErnieConfig, layout: Layout, *, params_dtype: torch.dtype) -> TransformerConfig:
    v = cfg.vision
    if v is None:
        raise ConfigError("the Megatron ViT needs a VL config")
    if v.hidden_act != "quick_gelu":
        raise ConfigError(f"vision_config.hidden_act={v.hidden_act!r}: the Megatron ViT implements quick_gelu only")
    if v.hidden_size % v.num_heads:
        raise ConfigError(f"vision width {v.hidden_size} is not a multiple of its {v.num_heads} heads")
    return TransformerConfig(
        num_layers=v.depth,
        hidden_size=v.hidden_size,
        ffn_hidden_size=v.intermediate_size,
        num_attention_heads=v.num_heads,
        num_query_groups=v.num_heads,
        kv_channels=v.hidden_size // v.num_heads,
        normalization="LayerNorm",
        layernorm_epsilon=v.layer_norm_eps,
        gated_linear_unit=False,
        activation_func=quick_gelu,
        add_bias_linear=True,
        add_qkv_bias=True,
        attention_softmax_in_fp32=True,
        rotary_interleaved=False,  # half-split ("rotate_half") RoPE, reference §D.3
        bias_dropout_fusion=False,
        **engine_settings(params_dtype),
        tensor_model_parallel_size=layout.tp,
        pipeline_model_parallel_size=1,
        sequence_parallel=False,
        # per-layer dist-checkpoint keys (vision_model.decoder.layers.{B}.…) like the language model's, instead of
        # one [depth, …] stack: the offline converter and the bridge table name every block
        hetereogenous_dist_checkpoint=True,
    )


def vision_position_ids(grid_thw: torch.Tensor, merge: int) -> torch.Tensor:
    """``[N, 2]`` (row, column) of every patch in the full patch grid, block-major over ``merge``² blocks, repeated
    for each frame: the order of the pixel rows (reference §D.1, §D.3)."""
    out = []
    for t, h, w in grid_thw.tolist():
        hpos, wpos = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
        blocks = (h // merge, merge, w // merge, merge)
        hw_N2 = torch.stack([p.reshape(blocks).transpose(1, 2).flatten() for p in (hpos, wpos)], dim=-1)
        out.append(hw_N2.repeat(t, 1))
    return torch.cat(out)


def frame_mask(grid_thw: torch.Tensor) -> torch.Tensor:
    """``[1, 1, N, N]`` True = masked: each frame of each image / video attends only to itself (reference §D.4)."""
    seg_N = torch.repeat_interleave(
        torch.arange(int(grid_thw[:, 0].sum())), torch.repeat_interleave(grid_thw[:, 1] * grid_thw[:, 2], grid_thw[:, 0])
    )
    return (seg_N[:, None] != seg_N[None, :]).view(1, 1, len(seg_N), len(seg_N))


class _PatchEmbed(torch.nn.Module):
    """Holds ``proj`` so the parameter is ``patch_embed.proj.weight``, the HF name (§H.6)."""

    def __init__(self, in_features: int, width: int, dtype: torch.dtype) -> None:
        super().__init__()
        self.proj = torch.nn.Linear(in_features, width, bias=False, dtype=dtype)


class ErnieMegatronViT(MegatronModule):
    """Pixel rows ``[N, P]`` + ``grid_thw`` -> ViT features ``[N, C]`` (module docstring)."""

    def __init__(self, cfg: ErnieConfig, config: TransformerConfig) -> None:
        super().__init__(config=config)
        v = cfg.vision
        self.merge = v.spatial_merge_size
        self.head_dim = v.hidden_size // v.num_heads
        self.rope_theta = v.rope_theta
        self.patch_embed = _PatchEmbed(v.in_channels * v.patch_size**2, v.hidden_size, config.params_dtype)
        spec = get_vit_layer_with_local_spec()
        # non-causal: the frame mask is the whole mask (the local spec's default is causal)
        spec.submodules.self_attention.params = {"attn_mask_type": AttnMaskType.no_mask}
        self.decoder = TransformerBlock(config, spec, post_layer_norm=True, pre_process=True, post_process=True)

    def set_input_tensor(self, input_tensor) -> None:  # pragma: no cover - never pipelined (first stage only)
        self.decoder.set_input_tensor(input_tensor)

    def rotary_angles(self, grid_thw: torch.Tensor) -> torch.Tensor:
        """``[N, 1, 1, D]`` angles ``[h·inv, w·inv, h·inv, w·inv]`` with ``inv`` over D/2 (reference §D.3), fp32."""
        half = self.head_dim // 2
        inv = 1.0 / (self.rope_theta ** (torch.arange(0, half, 2, dtype=torch.float) / half))
        hw_N2 = vision_position_ids(grid_thw, self.merge)
        f_N2F = hw_N2[..., None].float() * inv
        phi_ND2 = torch.cat([f_N2F[:, 0], f_N2F[:, 1]], dim=-1)
        return torch.cat([phi_ND2, phi_ND2], dim=-1)[:, None, None, :]

    def forward(self, pixel_values: torch.Tensor, grid_thw: torch.Tensor) -> torch.Tensor:
        w = self.patch_embed.proj.weight
        x_NC = self.patch_embed.proj(pixel_values.to(w.dtype))
        grid_thw = grid_thw.cpu()
        out_N1C = self.decoder(
            hidden_states=x_NC.unsqueeze(1),  # [S=N, B=1, C]
            attention_mask=frame_mask(grid_thw).to(x_NC.device),
            rotary_pos_emb=self.rotary_angles(grid_thw).to(x_NC.device),
        )
        return out_N1C.squeeze(1)
