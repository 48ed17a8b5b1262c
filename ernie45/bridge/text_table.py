"""HF on-disk ⇄ Megatron-Core table of the text families (dense, text MoE), as data for the engine in ``tables.py``.

Megatron names here are *global*: full (unsharded) tensors, global layer index ``{L}``, global expert index
``{X}``, with the names of Megatron's local (non-TE) spec and SequentialMLP experts. Where each one lives on a
given rank (PP stage, EP rank, local names, TP slice) is ``layout.py``'s job.

On-disk layouts (reference §G):

* dense / text MoE: ``model.embed_tokens.weight``, ``model.layers.{L}.self_attn.{q,k,v,o}_proj.weight``,
  ``model.layers.{L}.{input,post_attention}_layernorm.weight``, dense ``model.layers.{L}.mlp.{gate,up,down}_proj``,
  MoE ``model.layers.{L}.mlp.gate.weight`` [E, H], ``model.layers.{L}.mlp.moe_statics.e_score_correction_bias``
  [1, E], ``model.layers.{L}.mlp.experts.{X}.{gate,up,down}_proj.weight``,
  ``model.layers.{L}.mlp.shared_experts.{gate,up,down}_proj.weight``, ``model.norm.weight``, ``lm_head.weight``
  (untied only; a tied checkpoint *with* the key is loaded untied, as transformers 5.23 does, reference §G).

Shapes use the named dims of :func:`ernie45.bridge.tables.dims` (``Q`` = heads·head_dim, ``F`` expert width, ...).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .ops import ConcatGLU, FuseQKV, Identity, Squeeze0
from .tables import Row, Split

if TYPE_CHECKING:
    from ..config import ErnieConfig

__all__ = ["text_rows"]


def text_rows(cfg: ErnieConfig) -> tuple[Row, ...]:
    qkv = FuseQKV(head_dim=cfg.head_dim, heads_per_group=cfg.num_attention_heads // cfg.num_key_value_heads)
    hf, mg = "model.layers.{L}.", "decoder.layers.{L}."
    same, rep = Identity(), Split.REPLICATED
    return (
        Row(("model.embed_tokens.weight",), ("embedding.word_embeddings.weight",), same, Split.VOCAB, "model",
            (("V", "H"),)),
        Row(("lm_head.weight",), ("output_layer.weight",), same, Split.VOCAB, "untied", (("V", "H"),)),
        Row(("model.norm.weight",), ("decoder.final_layernorm.weight",), same, rep, "model", (("H",),)),
        Row((hf + "input_layernorm.weight",), (mg + "input_layernorm.weight",), same, rep, "layer", (("H",),)),
        Row(tuple(hf + f"self_attn.{p}_proj.weight" for p in "qkv"), (mg + "self_attention.linear_qkv.weight",), qkv,
            Split.COLUMN, "layer", (("Q", "H"), ("K", "H"), ("K", "H"))),
        Row((hf + "self_attn.o_proj.weight",), (mg + "self_attention.linear_proj.weight",), same, Split.ROW, "layer",
            (("H", "Q"),)),
        Row((hf + "post_attention_layernorm.weight",), (mg + "pre_mlp_layernorm.weight",), same, rep, "layer",
            (("H",),)),
        # dense SwiGLU layers
        Row((hf + "mlp.gate_proj.weight", hf + "mlp.up_proj.weight"), (mg + "mlp.linear_fc1.weight",), ConcatGLU(),
            Split.COLUMN, "dense", (("I", "H"), ("I", "H"))),
        Row((hf + "mlp.down_proj.weight",), (mg + "mlp.linear_fc2.weight",), same, Split.ROW, "dense", (("H", "I"),)),
        # MoE layers: router [E, H] (text checkpoints store it un-transposed), selection bias [1, E] -> [E]
        Row((hf + "mlp.gate.weight",), (mg + "mlp.router.weight",), same, rep, "moe", (("E", "H"),)),
        Row((hf + "mlp.moe_statics.e_score_correction_bias",), (mg + "mlp.router.expert_bias",), Squeeze0(), rep,
            "moe", ((1, "E"),)),
        Row((hf + "mlp.experts.{X}.gate_proj.weight", hf + "mlp.experts.{X}.up_proj.weight"),
            (mg + "mlp.experts.local_experts.{X}.linear_fc1.weight",), ConcatGLU(), Split.EXPERT_COLUMN, "expert",
            (("F", "H"), ("F", "H"))),
        Row((hf + "mlp.experts.{X}.down_proj.weight",), (mg + "mlp.experts.local_experts.{X}.linear_fc2.weight",),
            same, Split.EXPERT_ROW, "expert", (("H", "F"),)),
        Row((hf + "mlp.shared_experts.gate_proj.weight", hf + "mlp.shared_experts.up_proj.weight"),
            (mg + "mlp.shared_experts.linear_fc1.weight",), ConcatGLU(), Split.COLUMN, "shared",
            (("S", "H"), ("S", "H"))),
        Row((hf + "mlp.shared_experts.down_proj.weight",), (mg + "mlp.shared_experts.linear_fc2.weight",), same,
            Split.ROW, "shared", (("H", "S"),)),
    )  # fmt: skip
