"""HF on-disk safetensors ⇄ GGUF for llama.cpp: ERNIE 4.5 dense (``ernie4_5``) and text MoE (``ernie4_5-moe``).

The tensor names, metadata keys and architecture names come from the ``gguf`` package (0.19.0, the gguf-py that
ships with llama.cpp): ``gguf.MODEL_ARCH``, ``gguf.MODEL_TENSORS``, ``gguf.TENSOR_NAMES``, ``gguf.Keys`` (through
``GGUFWriter.add_*``). What llama.cpp *does* with them was read in llama.cpp's ``src/models/ernie4-5.cpp`` /
``ernie4-5-moe.cpp`` and ``convert_hf_to_gguf.py`` (``conversion/ernie.py``, ``Ernie4_5Model`` /
``Ernie4_5MoeModel``), as vendored by llama-cpp-python 0.3.36:

* **No Q/K permutation.** llama.cpp runs ERNIE 4.5 with ``LLAMA_ROPE_TYPE_NORM``, which rotates adjacent pairs
  ``(x[2i], x[2i+1])``: exactly HF ERNIE's interleaved (GPT-J) RoPE (reference §B.4). (The Llama converter permutes
  Q/K because HF Llama is half-split/NeoX; ERNIE's converter does not, and neither do we.)
* **head_dim** travels as ``attention.key_length`` / ``value_length`` (0.3B: 128 with H = 1024, so ``H / nh`` would
  be wrong); ``rope.dimension_count`` = head_dim (llama.cpp asserts ``n_rot == head_dim`` for ERNIE).
* **Experts are stacked**: ``blk.L.ffn_{gate,up,down}_exps.weight`` are ``[E, F, H]`` / ``[E, F, H]`` / ``[E, H, F]``
  (numpy order; ggml ``ne`` is reversed), expert ``x`` at index ``x``.
* **Router** ``blk.L.ffn_gate_inp.weight`` is ``[E, H]`` (no transpose for text checkpoints) and stays f32; the
  **selection bias** ``blk.L.exp_probs_b.bias`` is ``[E]`` (squeezed from the on-disk ``[1, E]``; llama.cpp declares
  it ``{n_expert}``) and stays f32. llama.cpp's ERNIE MoE graph is HF's router (reference §C.2): softmax, bias added for
  the top-k choice only, unbiased weights gathered and renormalised (its clamp floor is 6.1e-5 instead of
  ``moe_norm_min``; a sum of k softmax probabilities never gets near either).
* **Shared experts** ``blk.L.ffn_{gate,up,down}_shexp.weight`` with ``expert_shared_feed_forward_length`` =
  ``moe_num_shared_experts · moe_intermediate_size`` (reference §C.4). Deliberate deviation: llama.cpp's converter
  writes ``intermediate_size // num_key_value_heads``, which equals it for the 21B (12288 / 4 = 3072) by
  coincidence only; llama.cpp sizes the tensors from this key, so it must be the true width (checked: the
  converter's file for the tiny MoE test model fails to load in llama.cpp, ours loads and matches transformers).
* **Dense / MoE pattern.** llama.cpp loads MoE tensors for *every* layer ``>= leading_dense_block_count``, while its
  graph treats layer ``il`` as MoE iff ``il >= leading_dense_block_count and (il + 1) % interleave_moe_layer_step ==
  0``. The two agree only for "``n`` dense layers, then all MoE" with step 1, so that is what we write (derived from
  ``cfg.mlp_layer_types``, never from the raw ``moe_layer_*`` keys) and any other pattern is refused with
  :class:`GGUFExportError` instead of producing a file llama.cpp would misread.
* **Tied heads.** Without ``output.weight`` llama.cpp uses ``token_embd.weight`` for the head. A tied checkpoint
  with no ``lm_head.weight`` gets no ``output.weight``; an on-disk ``lm_head.weight`` is always written (transformers
  5.23 loads it untied even when the config says tied, reference §G).
* **Biases.** llama.cpp's ERNIE graph uses no linear biases (it loads ``attn_output.bias`` but never applies it),
  so ``use_bias=True`` configs are refused. **VL** checkpoints are refused (no llama.cpp architecture for them).

**Checksum.** Every GGUF ernie45 writes carries ``ernie45.sha256``: the sha256 of the whole file with these 64
characters read as zeros (written as a placeholder, filled in once the file is complete, before the rename).
llama.cpp ignores the key; :func:`open_gguf` (used by ``read_gguf_as_hf`` and ``inspect``) checks it, and checks the
header counts against the file size and every tensor's shape against the file's own hyper-parameters.
``describe_gguf`` reports it apart from the metadata (its value depends on every byte).

Tensor types follow llama.cpp's converter: 1-D tensors, norms, the router and the expert bias are always f32;
everything else takes ``outtype``; a tensor whose rows cannot be cut into q8_0 blocks of 32 falls back to f16
(reported, as the converter does).

On-disk layouts (reference §G; ``L`` layer, ``X`` expert):

====================================================================  ===============================================
HF on-disk                                                            GGUF
====================================================================  ===============================================
``model.embed_tokens.weight`` [V, H]                                  ``token_embd.weight``
``model.layers.L.input_layernorm.weight`` [H]                         ``blk.L.attn_norm.weight``
``model.layers.L.self_attn.{q,k,v,o}_proj.weight``                    ``blk.L.attn_{q,k,v,output}.weight``
``model.layers.L.post_attention_layernorm.weight`` [H]                ``blk.L.ffn_norm.weight``
``model.layers.L.mlp.{gate,up,down}_proj.weight`` (dense layers)      ``blk.L.ffn_{gate,up,down}.weight``
``model.layers.L.mlp.gate.weight`` [E, H]                             ``blk.L.ffn_gate_inp.weight``
``model.layers.L.mlp.moe_statics.e_score_correction_bias`` [1, E]     ``blk.L.exp_probs_b.bias`` [E]
``model.layers.L.mlp.experts.X.{gate,up,down}_proj.weight``           ``blk.L.ffn_{gate,up,down}_exps.weight`` (stacked)
``model.layers.L.mlp.shared_experts.{gate,up,down}_proj.weight``      ``blk.L.ffn_{gate,up,down}_shexp.weight``
``model.norm.weight`` [H]                                             ``output_norm.weight``
``lm_head.weight`` [V, H] (untied, or present on disk)                ``output.weight``
====================================================================  ===============================================

Legend for shapes: ``V`` vocab, ``H`` hidden, ``Q`` = heads·head_dim, ``K`` = kv_heads·head_dim, ``I`` dense FFN
width, ``E`` experts, ``F`` expert FFN width, ``S`` shared-expert FFN width.
"""

from __future__ import annotations

import hashlib
import json
import re
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping, Protocol

import numpy as np
import torch

import gguf
from gguf import GGMLQuantizationType as QT
from gguf import MODEL_TENSOR as T

from ..config import ErnieConfig
from ..errors import InputError
from .io import atomic_file, read_json, regular_file
from .ops import Identity, Op, Squeeze0, Stack
from .plan import check_source
from .tables import Row, Split, effective_tie, expand_rows, resolve

__all__ = [
    "GGUFExportError",
    "GGUFReport",
    "GGUF_TABLE",
    "GGUFRow",
    "OUTTYPES",
    "export_gguf",
    "plan_gguf",
    "read_gguf_as_hf",
    "describe_gguf",
    "open_gguf",
    "gguf_shape_problems",
    "gguf_name_patterns",
    "gguf_tensors_as_hf",
    "llama_cpp_layer_pattern",
]


class GGUFExportError(InputError):
    """A checkpoint / config that cannot be written as a correct llama.cpp GGUF (names the offending tensors)."""


class TensorSource(Protocol):
    """What :func:`export_gguf` reads from: HF on-disk names, their stored shapes and dtypes (checked in the plan,
    before anything is written) and full tensors (every ``bridge.source`` source and ``HFCheckpoint`` are one)."""

    def keys(self) -> Iterable[str]: ...

    def shape(self, name: str) -> tuple[int, ...]: ...

    def dtype(self, name: str) -> torch.dtype: ...

    def get(self, name: str) -> torch.Tensor: ...


# ------------------------------------------------------------------------------------------------------------------
# the table: rows of the shared engine (bridge/tables.py) whose target is one llama.cpp tensor


@dataclass(frozen=True)
class GGUFRow:
    """One engine :class:`~ernie45.bridge.tables.Row` (HF names ⇄ the GGUF name, op, scope, shapes) and what the
    GGUF side adds: the llama.cpp tensor kind it writes and whether it is always f32 (and why)."""

    row: Row
    tensor: T  # gguf.MODEL_TENSOR; the GGUF name is gguf.TENSOR_NAMES[tensor] + "." + weight | bias
    f32: str = ""  # why this tensor is written f32 whatever the outtype ("": it follows outtype)

    def __post_init__(self) -> None:
        base = re.escape(gguf.TENSOR_NAMES[self.tensor].replace("{bid}", "{L}"))
        if len(self.row.mg) != 1 or not re.fullmatch(base + r"\.(weight|bias)", self.row.mg[0]):
            raise ValueError(f"row {self.row.hf}: GGUF name {self.row.mg} is not gguf-py's name of {self.tensor.name}")
        if self.row.split is not Split.REPLICATED:
            raise ValueError(f"row {self.row.mg}: a GGUF tensor is stored whole (Split.REPLICATED)")


def _row(hf: str, tensor: T, suffix: str, op: Op, scope: str, shape: tuple[int | str, ...], f32: str = "") -> GGUFRow:
    name = gguf.TENSOR_NAMES[tensor].replace("{bid}", "{L}") + "." + suffix
    return GGUFRow(Row((hf,), (name,), op, Split.REPLICATED, scope, (shape,)), tensor, f32)


_NORM = "norm: llama.cpp's converter keeps 1-D tensors and norms in f32 (ggml norm kernels take f32)"
_P = "model.layers.{L}."
_SAME, _STACK = Identity(), Stack()
# shapes: the named dims of bridge.tables.dims (module docstring's legend)
GGUF_TABLE: tuple[GGUFRow, ...] = (
    _row("model.embed_tokens.weight", T.TOKEN_EMBD, "weight", _SAME, "model", ("V", "H")),
    _row(_P + "input_layernorm.weight", T.ATTN_NORM, "weight", _SAME, "layer", ("H",), _NORM),
    _row(_P + "self_attn.q_proj.weight", T.ATTN_Q, "weight", _SAME, "layer", ("Q", "H")),
    _row(_P + "self_attn.k_proj.weight", T.ATTN_K, "weight", _SAME, "layer", ("K", "H")),
    _row(_P + "self_attn.v_proj.weight", T.ATTN_V, "weight", _SAME, "layer", ("K", "H")),
    _row(_P + "self_attn.o_proj.weight", T.ATTN_OUT, "weight", _SAME, "layer", ("H", "Q")),
    _row(_P + "post_attention_layernorm.weight", T.FFN_NORM, "weight", _SAME, "layer", ("H",), _NORM),
    # dense SwiGLU layers
    _row(_P + "mlp.gate_proj.weight", T.FFN_GATE, "weight", _SAME, "dense", ("I", "H")),
    _row(_P + "mlp.up_proj.weight", T.FFN_UP, "weight", _SAME, "dense", ("I", "H")),
    _row(_P + "mlp.down_proj.weight", T.FFN_DOWN, "weight", _SAME, "dense", ("H", "I")),
    # MoE layers; the experts of one layer are stacked into one tensor (expert x at index x)
    _row(_P + "mlp.gate.weight", T.FFN_GATE_INP, "weight", _SAME, "moe", ("E", "H"),
         "router: llama.cpp keeps FFN_GATE_INP in f32 (converter and llama-quantize)"),
    _row(_P + "mlp.moe_statics.e_score_correction_bias", T.FFN_EXP_PROBS_B, "bias", Squeeze0(), "moe", (1, "E"),
         "expert-selection bias: 1-D, added to f32 probabilities"),
    _row(_P + "mlp.experts.{X}.gate_proj.weight", T.FFN_GATE_EXP, "weight", _STACK, "expert", ("F", "H")),
    _row(_P + "mlp.experts.{X}.up_proj.weight", T.FFN_UP_EXP, "weight", _STACK, "expert", ("F", "H")),
    _row(_P + "mlp.experts.{X}.down_proj.weight", T.FFN_DOWN_EXP, "weight", _STACK, "expert", ("H", "F")),
    _row(_P + "mlp.shared_experts.gate_proj.weight", T.FFN_GATE_SHEXP, "weight", _SAME, "shared", ("S", "H")),
    _row(_P + "mlp.shared_experts.up_proj.weight", T.FFN_UP_SHEXP, "weight", _SAME, "shared", ("S", "H")),
    _row(_P + "mlp.shared_experts.down_proj.weight", T.FFN_DOWN_SHEXP, "weight", _SAME, "shared", ("H", "S")),
    _row("model.norm.weight", T.OUTPUT_NORM, "weight", _SAME, "model", ("H",), _NORM),
    # written when the head is untied, or tied in the config but on disk (effective_tie, reference §G)
    _row("lm_head.weight", T.OUTPUT, "weight", _SAME, "untied", ("V", "H")),
)  # fmt: skip

OUTTYPES: dict[str, tuple[QT, gguf.LlamaFileType]] = {
    "f32": (QT.F32, gguf.LlamaFileType.ALL_F32),
    "f16": (QT.F16, gguf.LlamaFileType.MOSTLY_F16),
    "bf16": (QT.BF16, gguf.LlamaFileType.MOSTLY_BF16),
    "q8_0": (QT.Q8_0, gguf.LlamaFileType.MOSTLY_Q8_0),
}
_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


# ------------------------------------------------------------------------------------------------------------------
# planning: every tensor accounted for before a byte is written


@dataclass(frozen=True)
class PlannedTensor:
    name: str  # GGUF name
    sources: tuple[str, ...]  # HF names, in the op's order
    op: Op
    source_shapes: tuple[tuple[int, ...], ...]  # expected shape of each source tensor
    shape: tuple[int, ...]  # numpy (row-major) shape of the GGUF tensor
    qtype: QT
    nbytes: int
    note: str = ""  # why the type differs from outtype, if it does


@dataclass(frozen=True)
class GGUFPlan:
    arch: gguf.MODEL_ARCH
    outtype: str
    tensors: tuple[PlannedTensor, ...]
    ignored: Mapping[str, str]  # HF name -> reason
    leading_dense_block_count: int

    @property
    def arch_name(self) -> str:
        return gguf.MODEL_ARCH_NAMES[self.arch]


def _arch(cfg: ErnieConfig) -> gguf.MODEL_ARCH:
    if cfg.family == "vl":
        raise GGUFExportError(
            "ERNIE 4.5 VL checkpoints cannot be exported to GGUF: llama.cpp has no architecture for the dual-pool "
            "vision-language MoE (only ernie4_5 and ernie4_5-moe, text only)"
        )
    if cfg.use_bias:
        raise GGUFExportError(
            "use_bias=True cannot be exported: llama.cpp's ERNIE 4.5 graph applies no q/k/v/o or FFN biases "
            "(the released models have none)"
        )
    return gguf.MODEL_ARCH.ERNIE4_5 if cfg.family == "dense" else gguf.MODEL_ARCH.ERNIE4_5_MOE


def llama_cpp_layer_pattern(cfg: ErnieConfig) -> tuple[int, int]:
    """``(leading_dense_block_count, interleave_moe_layer_step)`` for ``cfg.mlp_layer_types``, or an error.

    llama.cpp (src/models/ernie4-5.cpp) creates MoE tensors for every layer ``>= leading_dense_block_count``;
    its graph (ernie4-5-moe.cpp) runs layer ``il`` as MoE iff ``il >= lead and (il + 1) % step == 0``. Only
    "``lead`` dense layers, then MoE to the end", with step 1, satisfies both.
    """
    types = tuple(cfg.mlp_layer_types)
    lead = next((i for i, t in enumerate(types) if t == "sparse"), len(types))
    if types != ("dense",) * lead + ("sparse",) * (len(types) - lead):
        pattern = "".join("S" if t == "sparse" else "D" for t in types)
        raise GGUFExportError(
            f"dense/MoE layer pattern {pattern} cannot be represented in llama.cpp's ernie4_5-moe: it only runs "
            "'N leading dense layers, then every layer MoE' (leading_dense_block_count = N, "
            "interleave_moe_layer_step = 1); it loads MoE tensors for every layer >= N but its graph would skip "
            "those with (il + 1) % step != 0, so any other pattern would give a file llama.cpp misreads"
        )
    return lead, 1


def _qtype(row: GGUFRow, shape: tuple[int, ...], outtype: str) -> tuple[QT, str]:
    if row.f32 or len(shape) <= 1:
        return QT.F32, ""
    qt = OUTTYPES[outtype][0]
    block, _ = gguf.GGML_QUANT_SIZES[qt]
    if shape[-1] % block:
        # llama.cpp's converter catches the QuantError and writes f16; we do the same and say so in the report
        return QT.F16, f"rows of {shape[-1]} are not a multiple of the {qt.name} block ({block}): f16 (converter's fallback)"
    return qt, ""


def _nbytes(shape: tuple[int, ...], qt: QT) -> int:
    if qt in (QT.F32, QT.F16):
        return int(np.prod(shape, dtype=np.int64)) * (4 if qt == QT.F32 else 2)
    return int(np.prod(gguf.quant_shape_to_byte_shape(shape, qt), dtype=np.int64))


def plan_gguf(
    cfg: ErnieConfig,
    keys: Iterable[str],
    *,
    outtype: str = "f32",
    shapes: Mapping[str, tuple[int, ...]] | None = None,
    dtypes: Mapping[str, torch.dtype] | None = None,
) -> GGUFPlan:
    """Every GGUF tensor, its HF sources, shape and type -- or one error listing every offending tensor.

    ``shapes`` / ``dtypes`` (when the source can tell them without reading) are checked here too; otherwise each
    tensor is checked when it is read.
    """
    if outtype not in OUTTYPES:
        raise GGUFExportError(f"outtype must be one of {sorted(OUTTYPES)}, got {outtype!r}")
    arch = _arch(cfg)
    lead, _ = llama_cpp_layer_pattern(cfg) if cfg.family == "moe" else (cfg.num_hidden_layers, 1)
    allowed = set(gguf.MODEL_TENSORS[arch])
    keys = list(keys)
    tied = effective_tie(cfg, keys)

    expanded = [(r_idx, row, item) for r_idx, row in enumerate(GGUF_TABLE)
                for item in expand_rows((row.row,), cfg, tied=tied)]  # fmt: skip
    # the totality check of every table (bridge/plan.py): each source tensor consumed once or declared ignored
    title = (f"cannot export to GGUF: the source does not match the {gguf.MODEL_ARCH_NAMES[arch]} GGUF of its "
             f"config ({cfg.family}, {cfg.num_hidden_layers} layers)")  # fmt: skip
    items = [item for _, _, item in expanded]
    ignored = dict(check_source(items, keys, shapes=shapes, dtypes=dtypes, title=title))
    if dtypes is not None:  # llama.cpp's converter (and gguf.quants) take these three
        bad = [f"{s}: {dtypes[s]}" for it in items for s in it.hf if s in dtypes and dtypes[s] not in _FLOAT_DTYPES]
        if bad:
            raise GGUFExportError(f"cannot export to GGUF: {len(bad)} tensor(s) are not f32/f16/bf16: {bad}")

    first_layer_row = next(i for i, r in enumerate(GGUF_TABLE) if r.row.scope != "model")

    def write_order(entry) -> tuple[int, int, int]:  # llama.cpp's converter's: embedding, layers, then the rest
        r_idx, _, item = entry
        group = 1 if item.layer is not None else (0 if r_idx < first_layer_row else 2)
        return group, item.layer or 0, r_idx

    tensors = []
    for _, row, item in sorted(expanded, key=write_order):
        if row.tensor not in allowed:  # pragma: no cover - the scopes give a dense config no MoE tensor
            raise GGUFExportError(f"{item.mg[0]}: {gguf.MODEL_ARCH_NAMES[arch]} has no {row.tensor.name} tensor")
        (shape,) = item.op.mg_shapes(item.hf_shapes)
        qt, note = _qtype(row, shape, outtype)
        tensors.append(PlannedTensor(item.mg[0], item.hf, item.op, item.hf_shapes, shape, qt, _nbytes(shape, qt), note))
    return GGUFPlan(arch, outtype, tuple(tensors), ignored, lead)


# ------------------------------------------------------------------------------------------------------------------
# metadata


def _write_hparams(w: gguf.GGUFWriter, cfg: ErnieConfig, plan: GGUFPlan) -> None:
    """The hyper-parameters llama.cpp reads for ERNIE 4.5 (llama-model.cpp load_hparams + ernie4-5.cpp)."""
    ctx = cfg.max_position_embeddings
    if ctx is None:
        # llama.cpp requires context_length; ERNIE 4.5 has no RoPE scaling, so it is the config value or nothing
        raise GGUFExportError("config.json has no max_position_embeddings; llama.cpp requires a context length")
    w.add_type(gguf.GGUFType.MODEL)
    w.add_name(plan.arch_name)
    w.add_file_type(OUTTYPES[plan.outtype][1])
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_context_length(int(ctx))
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)  # dense layers' SwiGLU width
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_key_length(cfg.head_dim)
    w.add_value_length(cfg.head_dim)
    w.add_rope_dimension_count(cfg.head_dim)
    w.add_rope_freq_base(cfg.rope_theta)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    if plan.arch == gguf.MODEL_ARCH.ERNIE4_5_MOE:
        w.add_expert_count(cfg.moe_num_experts)
        w.add_expert_used_count(cfg.moe_k)
        w.add_expert_feed_forward_length(cfg.moe_intermediate_size[0])
        w.add_leading_dense_block_count(plan.leading_dense_block_count)
        w.add_interleave_moe_layer_step(1)  # see llama_cpp_layer_pattern
        w.add_expert_shared_count(cfg.moe_num_shared_experts)
        if cfg.moe_num_shared_experts > 0:
            w.add_expert_shared_feed_forward_length(cfg.shared_expert_intermediate_size)


def _looks_special(token: str) -> bool:
    # llama.cpp converter's does_token_look_special, restricted to the ERNIE-relevant forms
    return token in ("<pad>", "<mask>") or (token.startswith("<|") and token.endswith("|>"))


def _is_id(i: Any) -> bool:
    return isinstance(i, int) and not isinstance(i, bool) and i >= 0


def _write_sentencepiece_vocab(w: gguf.GGUFWriter, tokenizer_dir: Path, cfg: ErnieConfig) -> str:
    """tokenizer.ggml.* exactly as llama.cpp's ``_set_vocab_sentencepiece`` + ``Ernie4_5Model.set_vocab``."""
    from sentencepiece import SentencePieceProcessor

    model_file = tokenizer_dir / "tokenizer.model"
    if not model_file.is_file():
        raise GGUFExportError(f"{model_file}: no SentencePiece tokenizer.model (ERNIE 4.5 ships one)")
    sp = SentencePieceProcessor()
    try:
        sp.LoadFromFile(str(regular_file(model_file, "SentencePiece model")))
    except (OSError, RuntimeError) as e:  # sentencepiece: "Internal: could not parse ModelProto"
        raise GGUFExportError(f"{model_file}: not a SentencePiece model that parses ({e})") from None
    n = cfg.vocab_size
    if sp.vocab_size() > n:
        raise GGUFExportError(
            f"{model_file}: {sp.vocab_size()} pieces but the model has only vocab_size={n} embedding rows"
        )
    TT = gguf.TokenType
    # unfilled ids are padding rows of the embedding: "[PAD<id>]", score -10000, UNUSED (as llama.cpp)
    tokens = [f"[PAD{i}]".encode() for i in range(n)]
    scores = [-10000.0] * n
    types = [TT.UNUSED] * n
    for i in range(sp.vocab_size()):
        tokens[i] = sp.IdToPiece(i).encode("utf-8")
        scores[i] = sp.GetScore(i)
        types[i] = (
            TT.UNKNOWN if sp.IsUnknown(i)
            else TT.CONTROL if sp.IsControl(i)
            else TT.UNUSED if sp.IsUnused(i)
            else TT.BYTE if sp.IsByte(i)
            else TT.NORMAL
        )  # fmt: skip
    added_file = tokenizer_dir / "added_tokens.json"
    if added_file.is_file():
        added = read_json(added_file, "added_tokens.json")
        if not isinstance(added, dict) or not all(isinstance(t, str) and _is_id(i) for t, i in added.items()):
            raise GGUFExportError(f"{added_file}: must map token texts to integer ids")
        for text, i in added.items():
            if i >= n:
                raise GGUFExportError(f"{added_file}: token {text!r} has id {i} >= vocab_size {n}")
            tokens[i], scores[i], types[i] = text.encode("utf-8"), -1000.0, TT.USER_DEFINED
    tok_cfg: dict[str, Any] = {}
    tok_cfg_file = tokenizer_dir / "tokenizer_config.json"
    if tok_cfg_file.is_file():
        tok_cfg = read_json(tok_cfg_file, "tokenizer_config.json")
    decoder = tok_cfg.get("added_tokens_decoder", {}) if isinstance(tok_cfg, dict) else None
    if not isinstance(decoder, dict) or not all(
        isinstance(k, str) and k.isdigit() and isinstance(d, dict) and isinstance(d.get("content"), str)
        for k, d in decoder.items()
    ):
        raise GGUFExportError(f"{tok_cfg_file}: added_tokens_decoder must map token ids to {{content: text, ...}}")
    for key, data in decoder.items():
        i, text = int(key), data["content"]
        if i >= n:
            raise GGUFExportError(f"{tok_cfg_file}: added token {text!r} has id {i} >= vocab_size {n}")
        if data.get("special") or _looks_special(text):
            types[i] = TT.CONTROL
        else:
            text = text.replace("\u2581", " ")  # llama.cpp pre-normalises user-defined spaces
            types[i] = TT.USER_DEFINED
        tokens[i], scores[i] = text.encode("utf-8"), -1000.0

    w.add_tokenizer_model("llama")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_scores(scores)
    w.add_token_types(types)
    try:  # reads tokenizer.json / tokenizer_config.json / config.json / generation_config.json for special ids
        special = gguf.SpecialVocab(tokenizer_dir, n_vocab=n)
    except (ValueError, KeyError, TypeError, AttributeError, UnicodeDecodeError) as e:
        raise GGUFExportError(f"{tokenizer_dir}: its tokenizer files do not parse (gguf.SpecialVocab: "
                              f"{type(e).__name__}: {e})") from None
    # config.json's ids are authoritative for the checkpoint; fill what SpecialVocab found nowhere
    for typ in ("bos", "eos", "pad"):
        tid = cfg.special_ids.get(f"{typ}_token_id")
        if typ not in special.special_token_ids and isinstance(tid, int) and 0 <= tid < n:
            special.special_token_ids[typ] = tid
    special.add_to_gguf(w, quiet=True)
    # Ernie4_5Model.set_vocab: an explicit add_prefix_space overrides llama.cpp's SPM default (add a "▁" prefix).
    # transformers 5 saves "add_prefix_space": null for "the tokenizer's default"; only a bool is an override.
    if isinstance(tok_cfg.get("add_prefix_space"), bool):
        w.add_add_space_prefix(tok_cfg["add_prefix_space"])
    padded = n - sp.vocab_size()
    return f"sentencepiece {model_file}: {sp.vocab_size()} pieces" + (f" + {padded} [PAD] rows" if padded else "")


# ------------------------------------------------------------------------------------------------------------------
# export


@dataclass(frozen=True)
class GGUFReport:
    path: Path
    arch: str
    outtype: str
    tensors: tuple[tuple[str, tuple[int, ...], str], ...]  # (GGUF name, numpy shape, ggml type)
    sources: Mapping[str, tuple[str, ...]]  # GGUF name -> HF names consumed
    ignored: Mapping[str, str]  # HF name -> reason
    notes: Mapping[str, str]  # GGUF name -> why its type differs from outtype
    tokenizer: str | None
    nbytes: int

    def summary(self) -> str:
        lines = [
            f"{self.path}: {self.arch}, {self.outtype}, {len(self.tensors)} tensors, {self.nbytes / 2**20:.1f} MiB "
            f"of tensor data, from {sum(len(s) for s in self.sources.values())} HF tensors",
            f"tokenizer: {self.tokenizer or 'none (tokenizer.ggml.model = no_vocab; llama.cpp cannot tokenize text)'}",
        ]
        lines += [f"ignored {n}: {why}" for n, why in sorted(self.ignored.items())]
        by_reason: dict[str, list[str]] = {}
        for n, why in self.notes.items():
            by_reason.setdefault(why.split(": ", 1)[-1], []).append(n)
        lines += [f"{len(ns)} tensor(s) written as {why}: {', '.join(ns)}" for why, ns in by_reason.items()]
        return "\n".join(lines)


def _to_numpy(t: torch.Tensor, p: PlannedTensor) -> np.ndarray:
    if tuple(t.shape) != p.shape:  # pragma: no cover - guarded by the per-source shape check
        raise GGUFExportError(f"{p.name}: built shape {list(t.shape)} != planned {list(p.shape)}")
    # bf16 / f16 -> f32 is exact; the target type is then reached with gguf.quants, as llama.cpp's converter does
    arr = gguf.quants.quantize(t.to(torch.float32).contiguous().numpy(), p.qtype)
    if arr.nbytes != p.nbytes:  # pragma: no cover - _nbytes mirrors gguf.quants
        raise GGUFExportError(f"{p.name}: {arr.nbytes} bytes != planned {p.nbytes}")
    return arr


def _read(source: TensorSource, name: str, shape: tuple[int, ...]) -> torch.Tensor:
    t = source.get(name)
    if not isinstance(t, torch.Tensor):
        raise GGUFExportError(f"{name}: source returned {type(t).__name__}, not a torch.Tensor")
    if t.dtype not in _FLOAT_DTYPES:
        raise GGUFExportError(f"{name}: dtype {t.dtype} is not f32/f16/bf16")
    if tuple(t.shape) != shape:
        raise GGUFExportError(f"{name}: shape {list(t.shape)} != expected {list(shape)} for this config")
    return t


def export_gguf(
    source: TensorSource,
    cfg: ErnieConfig,
    out_path: str | Path,
    *,
    outtype: str = "f32",
    tokenizer_dir: str | Path | None = None,
    overwrite: bool = False,
    progress: bool = True,
) -> GGUFReport:
    """Write ``source`` (HF on-disk names) as a llama.cpp GGUF at ``out_path``.

    The plan (every tensor, shape, type; unknown / missing tensors) is checked before anything is written. Tensors
    are then streamed one at a time (experts of one projection of one layer stacked at once) into a temporary file
    beside ``out_path``, renamed into place only when complete; on any error it is removed.
    ``tokenizer_dir`` holds ``tokenizer.model`` (+ ``tokenizer_config.json``, ``config.json`` for special ids);
    without it the GGUF has no vocabulary (``no_vocab``): llama.cpp runs it on token ids but cannot tokenize.
    """
    out_path = Path(out_path)
    if out_path.is_dir():
        raise GGUFExportError(f"{out_path}: is a directory; give the .gguf file name")
    if out_path.exists() and not overwrite:
        raise GGUFExportError(f"{out_path}: exists (pass overwrite=True to replace it)")
    keys = list(source.keys())
    plan = plan_gguf(
        cfg, keys, outtype=outtype, shapes={k: source.shape(k) for k in keys}, dtypes={k: source.dtype(k) for k in keys}
    )

    w = gguf.GGUFWriter(path=None, arch=plan.arch_name)
    _write_hparams(w, cfg, plan)
    if tokenizer_dir is not None:
        tok_desc = _write_sentencepiece_vocab(w, Path(tokenizer_dir), cfg)
    else:
        tok_desc = None
        w.add_tokenizer_model(gguf.NoVocab.tokenizer_model)
        w.add_vocab_size(cfg.vocab_size)  # llama.cpp's no_vocab path sizes its dummy vocabulary from this
    # placeholder, filled in by _seal once the whole file is written (the sha256 of the file with these 64 bytes
    # as zeros): the GGUF carries its own checksum, checked by open_gguf
    w.add_string(CHECKSUM_KEY, _UNSEALED)
    for p in plan.tensors:
        w.add_tensor_info(p.name, p.shape, np.dtype(np.float32), p.nbytes, raw_dtype=p.qtype)

    bar = None
    # the one atomic-write protocol of the directory writers: a `.partial` beside out_path, removed on any error
    # and by a later run if this one is killed, renamed into place when complete
    with atomic_file(out_path, overwrite=overwrite) as tmp:
        try:
            w.write_header_to_file(path=tmp)
            w.write_kv_data_to_file()
            w.write_ti_data_to_file()
            if progress:
                from tqdm import tqdm

                bar = tqdm(total=sum(p.nbytes for p in plan.tensors), unit="B", unit_scale=True, desc=out_path.name)
            for p in plan.tensors:
                # one GGUF tensor at a time; for experts that is one projection of one layer (E source tensors,
                # whose references die with the tuple once stacked). Peak ~3-4x that stack in bf16: stack, f32
                # copy, output.
                (t,) = p.op.to_mg(tuple(_read(source, s, shape) for s, shape in zip(p.sources, p.source_shapes)))
                w.write_tensor_data(_to_numpy(t, p))
                del t
                if bar is not None:
                    bar.update(p.nbytes)
        finally:
            w.close()
            if bar is not None:
                bar.close()
        _seal(tmp)

    return GGUFReport(
        path=out_path,
        arch=plan.arch_name,
        outtype=outtype,
        tensors=tuple((p.name, p.shape, p.qtype.name) for p in plan.tensors),
        sources={p.name: p.sources for p in plan.tensors},
        ignored=dict(plan.ignored),
        notes={p.name: p.note for p in plan.tensors if p.note},
        tokenizer=tok_desc,
        nbytes=sum(p.nbytes for p in plan.tensors),
    )


# ------------------------------------------------------------------------------------------------------------------
# reading back (GGUF -> HF names), through the same table


CHECKSUM_KEY = "ernie45.sha256"
_UNSEALED = "0" * 64
# smallest possible encodings (gguf spec): a KV is a key (u64 length + >= 1 byte), a u32 type and a value of >= 1
# byte; a tensor info is a name (u64 + >= 1 byte), u32 n_dims, >= 1 u64 dim, u32 type and a u64 offset
_MIN_KV_BYTES, _MIN_TENSOR_INFO_BYTES, _HEADER_BYTES = 8 + 1 + 4 + 1, 8 + 1 + 4 + 8 + 4 + 8, 4 + 4 + 8 + 8


def _checksum_span(reader: gguf.GGUFReader) -> tuple[int, int] | None:
    """Byte range of the ``ernie45.sha256`` value in the file, or None if the GGUF has none."""
    field = reader.fields.get(CHECKSUM_KEY)
    if field is None:
        return None
    start = field.offset + sum(int(part.nbytes) for part in field.parts[:-1])
    return start, start + int(field.parts[-1].nbytes)


def _file_digest(data, span: tuple[int, int]) -> str:
    """sha256 of ``data`` (the file's bytes) with the checksum value read as the placeholder it was written as."""
    a, b = span
    h = hashlib.sha256()
    h.update(memoryview(data[:a]))
    h.update(_UNSEALED.encode())
    h.update(memoryview(data[b:]))
    return h.hexdigest()


def _seal(path: Path) -> None:
    """Write the checksum of the finished file into its ``ernie45.sha256`` placeholder."""
    reader = gguf.GGUFReader(str(path))
    span = _checksum_span(reader)
    digest = _file_digest(reader.data, span)
    del reader  # the memory map
    with open(path, "r+b") as f:
        f.seek(span[0])
        f.write(digest.encode())


def open_gguf(path: str | Path, *, check_checksum: bool = True) -> gguf.GGUFReader:
    """A GGUF file, opened safely: a regular file whose header counts fit its size (``GGUFReader`` would try to
    parse 2**40 declared tensors), parsed without an uncaught exception, its ``ernie45.sha256`` (if ernie45 wrote
    it) matching its bytes, and its tensor shapes matching its own hyper-parameters. Every failure is a
    :class:`CheckpointError` naming the file."""
    from .io import CheckpointError, regular_file

    path = Path(path)
    size = regular_file(path, "GGUF file").stat().st_size
    with open(path, "rb") as f:
        head = f.read(_HEADER_BYTES)
    if len(head) < _HEADER_BYTES or head[:4] != b"GGUF":
        raise CheckpointError(f"{path}: not a GGUF file (truncated header or no GGUF magic)")
    n_tensors, n_kv = struct.unpack("<QQ", head[8:24])
    if _HEADER_BYTES + n_tensors * _MIN_TENSOR_INFO_BYTES + n_kv * _MIN_KV_BYTES > size:
        raise CheckpointError(f"{path}: header declares {n_tensors} tensors and {n_kv} metadata entries, more than "
                              f"a file of {size} bytes can hold (truncated or corrupted)")  # fmt: skip
    try:
        reader = gguf.GGUFReader(str(path))
    except (ValueError, IndexError, KeyError, TypeError, OverflowError, struct.error, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: not a readable GGUF file ({type(e).__name__}: {e})") from None
    span = _checksum_span(reader)
    if check_checksum and span is not None:
        recorded = bytes(reader.data[span[0] : span[1]]).decode(errors="replace")
        if _file_digest(reader.data, span) != recorded:
            raise CheckpointError(f"{path}: checksum mismatch (the {CHECKSUM_KEY} ernie45 recorded does not match "
                                  "the file's bytes): the file is corrupted or was modified")  # fmt: skip
    problems = gguf_shape_problems(reader)
    if problems:
        raise CheckpointError(f"{path}: tensor shapes disagree with the file's own hyper-parameters:\n  "
                              + "\n  ".join(problems))  # fmt: skip
    return reader


def gguf_shape_problems(reader: gguf.GGUFReader) -> list[str]:
    """Every ERNIE tensor of the GGUF against the shape its metadata implies (through the same table)."""
    meta = {k: f.contents() for k, f in reader.fields.items() if not k.startswith("GGUF.")}
    arch = meta.get("general.architecture")

    def m(key: str, default=None):
        return meta.get(f"{arch}.{key}", default)

    tokens = meta.get("tokenizer.ggml.tokens")
    try:  # the named dims of bridge.tables.dims, from the file's own hyper-parameters
        H, nh, hd = int(m("embedding_length")), int(m("attention.head_count")), int(m("attention.key_length"))
        named = {
            "1": 1, "H": H, "Q": nh * hd, "K": int(m("attention.head_count_kv", nh)) * hd,
            "V": len(tokens) if tokens is not None else int(meta.get(f"{arch}.vocab_size", -1)),
            "I": int(m("feed_forward_length", -1)), "E": int(m("expert_count", 0)),
            "F": int(m("expert_feed_forward_length", -1)), "S": int(m("expert_shared_feed_forward_length", -1)),
        }  # fmt: skip
        layers = int(m("block_count"))
    except (TypeError, ValueError):
        return [f"missing or malformed hyper-parameters for architecture {arch!r}"]
    out = []
    for t in reader.tensors:
        hit = [(mt, row) for pat, row in gguf_name_patterns() if (mt := pat.fullmatch(t.name))]
        if len(hit) != 1:
            continue  # named by read_gguf_as_hf / verify as "matches no row"
        mt, row = hit[0]
        if "L" in mt.groupdict() and int(mt["L"]) >= layers:
            out.append(f"{t.name}: layer {mt['L']} >= block_count {layers}")
            continue
        # a gathering row folds the E experts of a layer (its scope is "expert") into one tensor
        sources = tuple(resolve(s, named) for s in row.row.hf_shapes) * (named["E"] if row.row.op.gathers else 1)
        got = tuple(int(d) for d in reversed(t.shape))
        if any(d < 0 for s in sources for d in s) or row.row.op.hf_shapes((got,)) != sources:
            want = list(row.row.op.mg_shapes(sources)[0]) if sources else "no experts (expert_count 0)"
            out.append(f"{t.name}: {list(got)}, the metadata implies {want}")
    return out


def gguf_name_patterns() -> list[tuple[re.Pattern[str], GGUFRow]]:
    """(full-name regex with the layer as group ``L``, table row) for every GGUF tensor name the table produces."""
    return [(re.compile(re.escape(row.row.mg[0]).replace(r"\{L\}", r"(?P<L>\d+)")), row) for row in GGUF_TABLE]


HFView = tuple[Op, tuple[str, ...], tuple[tuple[int, ...], ...]]  # a row's op, HF names, HF shapes


def gguf_tensors_as_hf(reader: gguf.GGUFReader) -> tuple[dict[int, HFView], list[str]]:
    """The table's inverse, by name and shape only: GGUF tensor index -> (its row's op, the HF names and shapes
    ``op.to_hf`` gives it), and the names of the GGUF tensors that match no row."""
    patterns = gguf_name_patterns()
    out, unknown = {}, []
    for i, t in enumerate(reader.tensors):
        hit = [(m, row) for pat, row in patterns if (m := pat.fullmatch(t.name))]
        if len(hit) != 1:
            unknown.append(t.name)
            continue
        m, row = hit[0]
        sub = {"L": int(m["L"])} if "L" in m.groupdict() else {}
        shape = tuple(int(d) for d in reversed(t.shape))  # ggml ne -> numpy order
        hf_shapes = row.row.op.hf_shapes((shape,))
        # a gathering row's pattern names instance x of the stacked tensor as {X} = x
        subs = [dict(sub, X=x) for x in range(len(hf_shapes))] if row.row.op.gathers else [sub]
        out[i] = (row.row.op, tuple(p.format(**s) for s in subs for p in row.row.hf), hf_shapes)
    return out, unknown


def read_gguf_as_hf(path: str | Path) -> dict[str, torch.Tensor]:
    """Every tensor of an ERNIE 4.5 GGUF under its HF on-disk name(s), dequantised to f32.

    The inverse of :func:`export_gguf` through the same table: F32 tensors come back bit-exact, F16 / BF16 exactly
    as rounded, Q8_0 dequantised. A GGUF tensor that matches no row is an error.
    """
    reader = open_gguf(path)
    views, unknown = gguf_tensors_as_hf(reader)
    if unknown:
        raise GGUFExportError(f"{path}: {len(unknown)} tensor(s) match no row of the GGUF table: {unknown}")
    out: dict[str, torch.Tensor] = {}
    for i, (op, names, _) in views.items():
        t = reader.tensors[i]
        shape = tuple(int(d) for d in reversed(t.shape))
        arr = gguf.quants.dequantize(t.data, t.tensor_type).reshape(shape)
        out.update(zip(names, op.to_hf((torch.from_numpy(np.array(arr, dtype=np.float32)),)), strict=True))
    return out


def _json_value(v: Any) -> Any:
    if isinstance(v, (list, tuple)) and len(v) > 16:
        blob = json.dumps([_json_value(x) for x in v], ensure_ascii=False).encode()
        return {"len": len(v), "head": [_json_value(x) for x in v[:8]], "sha256": hashlib.sha256(blob).hexdigest()}
    if isinstance(v, (list, tuple)):
        return [_json_value(x) for x in v]
    if isinstance(v, (bytes, bytearray)):
        return v.decode("utf-8", errors="backslashreplace")
    if isinstance(v, (np.floating, float)):
        return float(np.float32(v))  # GGUF floats are f32: compare them as such
    if isinstance(v, np.integer):
        return int(v)
    return v


def describe_gguf(path: str | Path) -> dict[str, Any]:
    """A JSON-able description of a GGUF: metadata key -> value (long arrays as length/head/sha256), tensors."""
    reader = open_gguf(path, check_checksum=False)
    meta = {}
    for key, f in reader.fields.items():
        if key.startswith("GGUF.") or key == CHECKSUM_KEY:  # header fields (version, counts), not metadata
            continue
        meta[key] = _json_value(f.contents())
    tensors = [
        {"name": t.name, "shape": [int(d) for d in reversed(t.shape)], "type": t.tensor_type.name}
        for t in reader.tensors
    ]
    span = _checksum_span(reader)
    checksum = "none recorded (not written by ernie45)" if span is None else (
        "ok (matches the sha256 ernie45 recorded)"
        if _file_digest(reader.data, span) == bytes(reader.data[span[0] : span[1]]).decode(errors="replace")
        else "MISMATCH: the file is corrupted or was modified"
    )  # fmt: skip
    return {"metadata": meta, "tensors": tensors, "checksum": checksum}


# ------------------------------------------------------------------------------------------------------------------
# a GGUF file as a source of HF-named tensors (``bridge.source``), lazily, through the same table

# what :meth:`GGUFSource.get` returns for each stored type: the float types as they are, bit for bit; anything
# quantised dequantised to f32
_TORCH_DTYPE = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}


class GGUFSource:
    """A GGUF file as HF-named tensors (a ``bridge.source.Source``), read lazily (one GGUF tensor at a time)
    through the GGUF table's inverse ops.

    F32 / F16 / BF16 tensors come back in that dtype, bit for bit; quantised ones (Q8_0, ...) dequantised to f32
    (:func:`read_gguf_as_hf` does the same eagerly, f32 for everything). A GGUF holds no ERNIE config: ``cfg`` and
    ``plan`` are None; the head is tied when the file has no output tensor (llama.cpp's rule).
    """

    format = "gguf"
    cfg = None
    plan = None
    checksums = None  # the file carries its own (ernie45.sha256), checked by open_gguf when it is opened

    def __init__(self, path: str | Path) -> None:
        from .io import CheckpointError

        self.path = Path(path)
        self.reader = open_gguf(path)  # header counts, checksum and shapes checked before anything is read
        self._where: dict[str, tuple[int, int]] = {}  # HF name -> (GGUF tensor index, position in op output)
        self._shape: dict[str, tuple[int, ...]] = {}
        self._op: dict[int, Op] = {}  # GGUF tensor index -> its row's op
        views, unknown = gguf_tensors_as_hf(self.reader)  # the GGUF table's inverse, as read_gguf_as_hf uses it
        if unknown:
            raise CheckpointError(f"{path}: {len(unknown)} GGUF tensor(s) match no row of the GGUF table: {unknown[:10]}")
        for i, (op, names, shapes) in views.items():
            self._op[i] = op
            for pos, (name, shape) in enumerate(zip(names, shapes, strict=True)):
                self._where[name], self._shape[name] = (i, pos), shape
        self.tied = "lm_head.weight" not in self._where
        self.carried: list[str] = []  # a GGUF drops what llama.cpp does not use (tables.IGNORED), it carries nothing
        self.notes: list[str] = []
        self._cache: tuple[int, tuple[torch.Tensor, ...]] | None = None

    def keys(self) -> list[str]:
        return list(self._where)

    def shapes(self) -> dict[str, tuple[int, ...]]:
        return dict(self._shape)

    def dtypes(self) -> dict[str, torch.dtype]:
        return {n: self.dtype(n) for n in self._where}

    def shape(self, name: str) -> tuple[int, ...]:
        return self._shape[name]

    def gguf_type(self, name: str) -> str:
        return self.reader.tensors[self._where[name][0]].tensor_type.name

    def dtype(self, name: str) -> torch.dtype:
        return _TORCH_DTYPE.get(self.gguf_type(name), torch.float32)

    def storage_type(self, name: str) -> str:
        return f"gguf {self.gguf_type(name)}"

    def weight_type(self) -> str:
        """The file's lossiest tensor type (``F32`` < ``F16`` < ``BF16`` < ``Q8_0`` < anything else): what its
        logits are judged by (``verify.DEFAULT_THRESHOLDS``)."""
        rank = {"F32": 0, "F16": 1, "BF16": 2, "Q8_0": 3}
        return max((t.tensor_type.name for t in self.reader.tensors), key=lambda n: rank.get(n, 4), default="F32")

    def get(self, name: str) -> torch.Tensor:
        from .io import CheckpointError

        if name not in self._where:
            raise CheckpointError(f"{self.path}: no tensor {name} (under HF names)")
        i, pos = self._where[name]
        if self._cache is None or self._cache[0] != i:
            t = self.reader.tensors[i]
            shape = tuple(int(d) for d in reversed(t.shape))
            if t.tensor_type == QT.F32:
                x = torch.from_numpy(np.array(t.data, dtype=np.float32).reshape(shape))
            elif t.tensor_type == QT.F16:
                x = torch.from_numpy(np.array(t.data).view(np.float16).reshape(shape))
            elif t.tensor_type == QT.BF16:
                x = torch.from_numpy(np.array(t.data).view(np.int16).reshape(shape)).view(torch.bfloat16)
            else:
                deq = gguf.quants.dequantize(t.data, t.tensor_type)
                x = torch.from_numpy(np.array(deq, dtype=np.float32).reshape(shape))
            self._cache = (i, self._op[i].to_hf((x,)))
        return self._cache[1][pos].contiguous()

    def read(self, name: str, dim: int | None = None, start: int = 0, stop: int | None = None) -> torch.Tensor:
        t = self.get(name)
        return t if dim is None else t.narrow(dim, start, (t.shape[dim] if stop is None else stop) - start).contiguous()

    def stream(self, name: str, row_block_bytes: int) -> torch.Tensor:
        return self.get(name)

    def side_files(self) -> list[Path]:
        return []  # the vocabulary and everything llama.cpp needs are inside the file

    def source_files(self) -> list[Path]:
        return [self.path]
