"""HF on-disk ⇄ Megatron table of the ERNIE 4.5 VL MoE (``ernie4_5_vl_moe`` / flat ``ernie4_5_moe_vl``).

Same :class:`~ernie45.bridge.tables.Row` format, engine and ops as the text table (``text_table.py``); Megatron
names are those of :class:`ernie45.megatron.vl_model.ErnieVLModel` (global layer / pool-local expert indices,
reference §H.6).

On-disk layout (reference §G.3)::

    model.embed_tokens.weight, model.norm.weight, lm_head.weight (untied)           -> language_model.*
    model.layers.{L}.* attention, norms, dense MLP, shared experts                  -> as the text table, prefixed
    model.layers.{L}.mlp.gate.weight        [H, E]  text router   (Transpose)       -> ...mlp.text_moe_layer.router.weight
    model.layers.{L}.mlp.gate.weight_1      [H, E]  vision router (Transpose)       -> ...mlp.vision_moe_layer.router.weight
    model.layers.{L}.mlp.moe_statics.e_score_correction_bias [2, E] (SplitRows)     -> text / vision router.expert_bias
    model.layers.{L}.mlp.experts.{X}.*      X < E   text experts, width I_t         -> ...text_moe_layer.experts.local_experts.{X}
    model.layers.{L}.mlp.experts.{E+X}.*            vision experts, width I_v       -> ...vision_moe_layer.experts.local_experts.{X}
    <V>blocks.{B}.*, <V>patch_embed.proj.weight, <V>ln.*   ViT (HF names)           -> vision_model.*
    model.resampler_model.{spatial,temporal}_linear.{0,2,3}.*, mlp.*, after_norm.*  -> resampler_model.{...}.{fc1,fc2,ln}.*

``<V>`` is ``model.vision_model.`` in checkpoints written by transformers (nested config) and ``vision_model.`` in
Baidu's original layout (flat Thinking config); transformers loads either. Here the prefix follows the config's
layout, so a nested config whose files carry top-level ``vision_model.*`` keys is reported by the plan as missing /
unexpected tensors rather than guessed.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

from .ops import ConcatGLU, Identity, RegroupQKV, SplitRows, Transpose
from .tables import Row, Split
from .text_table import text_rows

if TYPE_CHECKING:
    from ..config import ErnieConfig

__all__ = ["vl_rows", "vision_prefix"]

LM = "language_model."
# text-table scopes whose rows are identical for the VL language model (up to the prefix); its MoE rows differ
_SHARED_SCOPES = ("model", "untied", "layer", "dense", "shared")


def vision_prefix(cfg: ErnieConfig) -> str:
    """On-disk prefix of the ViT tensors for this config's layout (module docstring)."""
    return "vision_model." if cfg.flat_vl else "model.vision_model."


def _language_rows(cfg: ErnieConfig) -> tuple[Row, ...]:
    I_t, I_v = cfg.moe_intermediate_size  # the vision pool's width is no named dim: a plain int
    hf, mg = "model.layers.{L}.mlp.", LM + "decoder.layers.{L}.mlp."
    common = tuple(
        dataclasses.replace(row, mg=tuple(LM + n for n in row.mg)) for row in text_rows(cfg) if row.scope in _SHARED_SCOPES
    )
    pools = []
    for pool, gate, scope, X, I in (
        ("text", "gate.weight", "expert", "{X}", I_t),
        ("vision", "gate.weight_1", "vision_expert", "{XV}", I_v),
    ):
        p = mg + f"{pool}_moe_layer."
        pools += [
            Row((hf + gate,), (p + "router.weight",), Transpose(), Split.REPLICATED, "moe", (("H", "E"),)),
            Row((hf + f"experts.{X}.gate_proj.weight", hf + f"experts.{X}.up_proj.weight"),
                (p + "experts.local_experts.{X}.linear_fc1.weight",), ConcatGLU(), Split.EXPERT_COLUMN, scope,
                ((I, "H"), (I, "H"))),
            Row((hf + f"experts.{X}.down_proj.weight",), (p + "experts.local_experts.{X}.linear_fc2.weight",),
                Identity(), Split.EXPERT_ROW, scope, (("H", I),)),
        ]  # fmt: skip
    bias = Row(
        (hf + "moe_statics.e_score_correction_bias",),
        (mg + "text_moe_layer.router.expert_bias", mg + "vision_moe_layer.router.expert_bias"),
        SplitRows(n_mg=2),  # row 0 text, row 1 vision (reference §C.2)
        Split.REPLICATED,
        "moe",
        ((2, "E"),),
    )
    return common + tuple(pools) + (bias,)


def _vision_rows(cfg: ErnieConfig) -> tuple[Row, ...]:
    v = cfg.vision
    C, F, H = v.hidden_size, v.intermediate_size, cfg.hidden_size
    P = v.in_channels * v.patch_size**2
    Cs = C * v.spatial_merge_size**2  # resampler width after the 2x2 merge
    Ct = Cs * v.temporal_merge_size  # temporal_linear input ([first, second] frame features)
    V = vision_prefix(cfg)
    rep = Split.REPLICATED  # the ViT and resampler are replicated on every TP rank (vision.py)
    rows = [  # the patch embedding has the same name in both ViTs
        Row((V + "patch_embed.proj.weight",), ("vision_model.patch_embed.proj.weight",), Identity(), rep, "model",
            ((C, P),)),
    ]  # fmt: skip
    if cfg.vit_impl == "megatron":
        rows += _megatron_vit_rows(cfg)
    else:
        rows += [Row((V + f"ln.{p}",), (f"vision_model.ln.{p}",), Identity(), rep, "model", ((C,),))
                 for p in ("weight", "bias")]  # fmt: skip
        block = {
            "norm1.weight": (C,), "norm1.bias": (C,), "norm2.weight": (C,), "norm2.bias": (C,),
            "attn.qkv.weight": (3 * C, C), "attn.qkv.bias": (3 * C,), "attn.proj.weight": (C, C),
            "attn.proj.bias": (C,), "mlp.fc1.weight": (F, C), "mlp.fc1.bias": (F,), "mlp.fc2.weight": (C, F),
            "mlp.fc2.bias": (C,),
        }  # fmt: skip
        for name, shape in block.items():
            rows.append(
                Row((V + "blocks.{B}." + name,), ("vision_model.blocks.{B}." + name,), Identity(), rep, "vision_block",
                    (shape,))
            )  # fmt: skip
    # resampler: on disk the nn.Sequential indices (0 Linear, 1 GELU, 2 Linear, 3 LayerNorm), in memory fc1/fc2/ln
    R = "model.resampler_model."
    resampler = {}
    for part, d_in in (("spatial_linear", Cs), ("temporal_linear", Ct)):
        resampler.update({
            (f"{part}.0.weight", f"{part}.fc1.weight"): (Cs, d_in), (f"{part}.0.bias", f"{part}.fc1.bias"): (Cs,),
            (f"{part}.2.weight", f"{part}.fc2.weight"): (Cs, Cs), (f"{part}.2.bias", f"{part}.fc2.bias"): (Cs,),
            (f"{part}.3.weight", f"{part}.ln.weight"): (Cs,), (f"{part}.3.bias", f"{part}.ln.bias"): (Cs,),
        })  # fmt: skip
    resampler.update({("mlp.weight", "mlp.weight"): (H, Cs), ("mlp.bias", "mlp.bias"): (H,),
                      ("after_norm.weight", "after_norm.weight"): (H,)})  # fmt: skip
    for (disk, mem), shape in resampler.items():
        rows.append(Row((R + disk,), ("resampler_model." + mem,), Identity(), rep, "model", (shape,)))
    return tuple(rows)


def _megatron_vit_rows(cfg: ErnieConfig) -> list[Row]:
    """The TP-sharded Megatron-Core ViT (``megatron/vit.py``, reference §H.6 MG-ViT): blocks and final norm."""
    v = cfg.vision
    C, F = v.hidden_size, v.intermediate_size
    V, B = vision_prefix(cfg), "vision_model.decoder.layers.{B}."
    rep, col, row = Split.REPLICATED, Split.COLUMN, Split.ROW
    qkv = RegroupQKV(head_dim=C // v.num_heads)
    table = [  # HF name, Megatron name, op, split, shape
        ("norm1.weight", "input_layernorm.weight", Identity(), rep, (C,)),
        ("norm1.bias", "input_layernorm.bias", Identity(), rep, (C,)),
        ("attn.qkv.weight", "self_attention.linear_qkv.weight", qkv, col, (3 * C, C)),
        ("attn.qkv.bias", "self_attention.linear_qkv.bias", qkv, col, (3 * C,)),
        ("attn.proj.weight", "self_attention.linear_proj.weight", Identity(), row, (C, C)),
        ("attn.proj.bias", "self_attention.linear_proj.bias", Identity(), rep, (C,)),  # added after the all-reduce
        ("norm2.weight", "pre_mlp_layernorm.weight", Identity(), rep, (C,)),
        ("norm2.bias", "pre_mlp_layernorm.bias", Identity(), rep, (C,)),
        ("mlp.fc1.weight", "mlp.linear_fc1.weight", Identity(), col, (F, C)),
        ("mlp.fc1.bias", "mlp.linear_fc1.bias", Identity(), col, (F,)),
        ("mlp.fc2.weight", "mlp.linear_fc2.weight", Identity(), row, (C, F)),
        ("mlp.fc2.bias", "mlp.linear_fc2.bias", Identity(), rep, (C,)),
    ]
    rows = [Row((V + "blocks.{B}." + h,), (B + m,), op, split, "vision_block", (shape,))
            for h, m, op, split, shape in table]  # fmt: skip
    rows += [Row((V + f"ln.{p}",), (f"vision_model.decoder.final_layernorm.{p}",), Identity(), rep, "model",
                 ((C,),)) for p in ("weight", "bias")]  # fmt: skip
    return rows


def vl_rows(cfg: ErnieConfig) -> tuple[Row, ...]:
    """The HF ⇄ Megatron table of a VL config (called through :func:`ernie45.bridge.plan.megatron_rows`)."""
    if cfg.family != "vl":
        raise ValueError(f"vl_rows needs a VL config, got family {cfg.family!r}")
    return _language_rows(cfg) + _vision_rows(cfg)
