"""ERNIE 4.5 text models (dense and MoE) as a Megatron-Core ``GPTModel``.

The model is Megatron's own GPTModel with Megatron's local layer specs, changed in exactly four places:

* ``ErnieRMSNorm`` for every norm: HF's formula (fp32 statistics, cast back, *then* the weight multiply, reference §B.2)
  and sequence-parallel capable (its parameters carry ``sequence_parallel``), which the torch norm of the local spec
  refuses (S8, docs/megatron-on-cpu.md);
* ``ErnieTopKRouter`` in every MoE layer (softmax + selection-only expert bias, see ``router.py``);
* ``ErnieCoreAttention`` as every layer's core attention: Megatron's ``DotProductAttention`` semantics on
  ``scaled_dot_product_attention`` (half the eager kernel's time on a CPU, see ``attention.py``), inside
  ``ErnieSelfAttention``: Megatron's ``SelfAttention`` with the interleaved rotary as one complex multiply;
* the dense/MoE pattern comes from ``ErnieConfig.mlp_layer_types`` (``moe_layer_freq`` as a list);

and, with ``rope="position_ids"`` (packed rows), ERNIE's rotary module fed by ``position_ids`` (:func:`build_chunks`).
:func:`build_chunks` is the stage loop the VL model (``vl_model.py``) shares.

Everything else is configuration: GQA with the config's head_dim (``kv_channels``), interleaved RoPE with the
config's θ (``rotary_interleaved=True``; HF's "rotate_half" is the interleaved one, reference §B.4), SwiGLU, shared experts
of width ``n_shared · I_t``, tied or untied output head.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from megatron.core.models.gpt import GPTModel
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_decoder_layer_specs
from megatron.core.transformer import TransformerConfig
from megatron.core.transformer.transformer_block import TransformerBlockSubmodules

from ..config import ConfigError, ErnieConfig
from ..layout import Layout
from .attention import ErnieCoreAttention, ErnieSelfAttention
from .rope import ErnieMultimodalRotaryEmbedding
from .router import ErnieTopKRouter

__all__ = [
    "ErnieRMSNorm",
    "ErnieTransformerConfig",
    "engine_settings",
    "transformer_config",
    "build_chunks",
    "build_model",
    "takes_position_ids",
    "ROPE_ARANGE",
    "ROPE_POSITION_IDS",
    "causal_mask",
    "padded_vocab_size",
]


@dataclass
class ErnieTransformerConfig(TransformerConfig):
    """Megatron's TransformerConfig plus the one ERNIE routing constant Megatron has no field for."""

    ernie_moe_norm_min: float = 1e-12


class ErnieRMSNorm(torch.nn.Module):
    """HF ``Ernie4_5RMSNorm``: ``w * (x.float() * rsqrt(mean(x²) + eps)).to(dtype)``."""

    def __init__(self, config: TransformerConfig, hidden_size: int, eps: float = 1e-5, **_: object) -> None:
        super().__init__()
        self.eps = eps
        self.weight = torch.nn.Parameter(torch.ones(hidden_size, dtype=config.params_dtype))
        # under sequence parallelism each TP rank sees a different token slice; Megatron all-reduces these grads
        setattr(self.weight, "sequence_parallel", config.sequence_parallel)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = x.float()
        y = y * torch.rsqrt(y.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * y.to(x.dtype)


def padded_vocab_size(cfg: ErnieConfig, layout: Layout) -> int:
    """Vocab rows the embedding holds: a multiple of TP (Megatron's VocabParallelEmbedding splits evenly)."""
    return -(-cfg.vocab_size // layout.tp) * layout.tp


def engine_settings(params_dtype: torch.dtype) -> dict:
    """What every ERNIE Megatron config (LM and ViT) shares: no dropout (ERNIE 4.5 trains without), unfused kernels
    (exact HF arithmetic, and the CPU path has no fused ones), parameters created on the CPU in ``params_dtype``."""
    return dict(
        hidden_dropout=0.0,
        attention_dropout=0.0,
        apply_rope_fusion=False,
        bias_activation_fusion=False,
        masked_softmax_fusion=False,
        persist_layer_norm=False,
        gradient_accumulation_fusion=False,
        params_dtype=params_dtype,
        pipeline_dtype=params_dtype,
        bf16=params_dtype == torch.bfloat16,
        use_cpu_initialization=True,
    )


def transformer_config(
    cfg: ErnieConfig,
    layout: Layout,
    *,
    params_dtype: torch.dtype = torch.float32,
    sequence_parallel: bool = False,
    recompute: str | None = None,
    aux_loss: bool = False,
) -> ErnieTransformerConfig:
    """The Megatron config for ``cfg`` at ``layout``. ``recompute``: None, "selective" or "full".

    ``aux_loss`` does not change the config (Megatron's own aux losses stay off): see :func:`build_model`."""
    if cfg.family == "vl":
        raise ConfigError("VL models are built by ernie45.megatron.vl_model, not as a plain GPTModel")
    if cfg.use_bias:
        raise ConfigError("use_bias=True is not supported (no released ERNIE 4.5 checkpoint uses linear biases)")
    moe = {}
    if cfg.is_moe:
        moe = dict(
            num_moe_experts=cfg.moe_num_experts,
            moe_router_topk=cfg.moe_k,
            moe_ffn_hidden_size=cfg.moe_intermediate_size[0],
            moe_shared_expert_intermediate_size=cfg.shared_expert_intermediate_size or None,
            moe_layer_freq=[int(t == "sparse") for t in cfg.mlp_layer_types],
            moe_router_score_function="softmax",
            moe_router_pre_softmax=False,
            moe_router_dtype="fp32",
            # Megatron's per-layer switch loss is not transformers' pooled one; build_model attaches that instead
            moe_router_load_balancing_type="none",
            moe_aux_loss_coeff=0.0,
            moe_token_dispatcher_type="allgather",
            moe_grouped_gemm=False,
            ernie_moe_norm_min=cfg.moe_norm_min,
        )
    recompute_kw = {}
    if recompute == "selective":
        recompute_kw = dict(recompute_granularity="selective")
    elif recompute == "full":
        recompute_kw = dict(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1)
    elif recompute is not None:
        raise ValueError(f"recompute must be None, 'selective' or 'full', got {recompute!r}")
    return ErnieTransformerConfig(
        num_layers=cfg.num_hidden_layers,
        hidden_size=cfg.hidden_size,
        ffn_hidden_size=cfg.intermediate_size,
        num_attention_heads=cfg.num_attention_heads,
        num_query_groups=cfg.num_key_value_heads,
        kv_channels=cfg.head_dim,
        normalization="RMSNorm",
        layernorm_epsilon=cfg.rms_norm_eps,
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,
        add_qkv_bias=False,
        rotary_interleaved=True,
        **engine_settings(params_dtype),
        tensor_model_parallel_size=layout.tp,
        pipeline_model_parallel_size=layout.pp,
        virtual_pipeline_model_parallel_size=layout.vpp if layout.vpp > 1 else None,
        num_layers_in_first_pipeline_stage=layout.first,
        num_layers_in_last_pipeline_stage=layout.last,
        expert_model_parallel_size=layout.ep,
        expert_tensor_parallel_size=layout.expert_tp,
        sequence_parallel=sequence_parallel,
        batch_p2p_sync=False,  # S6 not needed in the schedules
        **recompute_kw,
        **moe,
    )


def _ernie_layer_specs(tc: TransformerConfig) -> list:
    specs = get_gpt_decoder_layer_specs(tc, use_transformer_engine=False, normalization="RMSNorm")
    for spec in {id(s): s for s in specs}.values():  # dense and MoE specs are shared objects
        spec.submodules.input_layernorm = ErnieRMSNorm
        spec.submodules.pre_mlp_layernorm = ErnieRMSNorm
        spec.submodules.self_attention.module = ErnieSelfAttention
        spec.submodules.self_attention.submodules.core_attention = ErnieCoreAttention
        if hasattr(spec.submodules.mlp.submodules, "router"):
            spec.submodules.mlp.submodules.router = ErnieTopKRouter
    return specs


# how a chunk's rotary embedding takes its positions (the ``rope=`` option of the builders)
ROPE_ARANGE = "arange"  # Megatron's 1-D "rope": rotates by arange(S) (by cache slot under the KV cache)
ROPE_POSITION_IDS = "position_ids"  # by the caller's position_ids, through GPTModel's position-driven channel


def build_chunks(
    cfg: ErnieConfig,
    layout: Layout,
    tc: ErnieTransformerConfig,
    layer_specs: list,
    *,
    tie: bool,
    seq_length: int,
    scatter_embedding_sequence_parallel: bool = True,
    wrap: Callable[[GPTModel], torch.nn.Module] = lambda lm: lm,
) -> list:
    """This rank's chunks, one per virtual pipeline stage: the stage loop of both families. Process groups must exist.

    ``layer_specs`` holds every layer's spec; each chunk's language model (a Megatron ``GPTModel``) gets the layers
    :meth:`Layout.stage_layers` gives it. ``tc.mrope_section`` picks the rotary: None is Megatron's 1-D ``"rope"``;
    a section makes GPTModel's ``"mrope"`` type hand ``position_ids`` to ERNIE's 3-D rotary of that section (the
    stock module has Qwen2-VL's block layout and GPTModel no spec field for it, so it is replaced right after the
    build; the rotary tables are non-persistent: nothing in the state dict changes). ``wrap`` turns the language
    model into the family's chunk (the VL model adds its vision modules); it runs chunk by chunk so parameters are
    created in chunk order.
    """
    from megatron.core import parallel_state as ps

    pp_rank = ps.get_pipeline_model_parallel_rank()
    chunks = []
    for v in range(layout.vpp):
        vp = v if layout.vpp > 1 else None
        layers = layout.stage_layers(cfg, pp_rank, vp)
        lm = GPTModel(
            config=tc,
            transformer_layer_spec=TransformerBlockSubmodules(
                layer_specs=layer_specs[layers.start : layers.stop], layer_norm=ErnieRMSNorm
            ),
            vocab_size=padded_vocab_size(cfg, layout),
            max_sequence_length=seq_length,
            pre_process=ps.is_pipeline_first_stage(ignore_virtual=False, vp_stage=vp),
            post_process=ps.is_pipeline_last_stage(ignore_virtual=False, vp_stage=vp),
            share_embeddings_and_output_weights=tie,
            position_embedding_type="rope" if tc.mrope_section is None else "mrope",
            rotary_base=cfg.rope_theta,
            scatter_embedding_sequence_parallel=scatter_embedding_sequence_parallel,
            vp_stage=vp,
        )
        if tc.mrope_section is not None:
            lm.rotary_pos_emb = ErnieMultimodalRotaryEmbedding(cfg.head_dim, cfg.rope_theta, tuple(tc.mrope_section))
        chunks.append(wrap(lm))
    return chunks


def build_model(
    cfg: ErnieConfig,
    layout: Layout,
    *,
    tie_word_embeddings: bool | None = None,
    params_dtype: torch.dtype = torch.float32,
    sequence_parallel: bool = False,
    recompute: str | None = None,
    aux_loss: bool = False,
    seq_length: int = 4096,
    rope: str = ROPE_ARANGE,
) -> list[GPTModel]:
    """Build this rank's model chunks (one per virtual pipeline stage). Process groups must exist.

    ``tie_word_embeddings`` overrides the config: transformers 5.23 loads an on-disk ``lm_head.weight`` untied even
    when the config says tied (reference §G), and the bridge mirrors that.

    ``rope``: ``"arange"`` rotates token ``s`` of a row by position ``s`` (Megatron's ``"rope"``, which ignores
    ``position_ids``); ``"position_ids"`` rotates by the ``position_ids`` passed to forward, which packed rows need
    (positions restart at 0 in every sample). It is ERNIE's 3-D rotary with every band on the T row
    (``mrope_section = (0, 0, head_dim/2)``), exactly the 1-D interleaved RoPE of reference §B.4 at those positions:
    same inverse frequencies, same fp32 products (``test_packing`` checks bit equality with ``"arange"``).

    ``aux_loss``: transformers' load-balancing loss (``router_aux_loss_coef`` × ``load_balancing_loss_func``, pooled
    over every MoE layer of a forward) through one ``ernie45.megatron.router.PooledAuxLoss`` on the chunk
    (``chunk.pooled_aux``). Pooling needs every MoE layer and every token of a sequence in one process: refused with
    pipeline stages (pp > 1) or sequence parallelism.
    """
    layout.validate(cfg)
    if rope not in (ROPE_ARANGE, ROPE_POSITION_IDS):
        raise ConfigError(f"rope must be {ROPE_ARANGE!r} or {ROPE_POSITION_IDS!r}, got {rope!r}")
    if aux_loss and cfg.is_moe and (layout.pp > 1 or sequence_parallel):
        raise ConfigError(
            "aux_loss: transformers' load-balancing loss pools every MoE layer and token of a forward; "
            "it cannot be computed exactly with pipeline stages (pp > 1) or sequence parallelism (tp > 1 for MoE)"
        )
    tc = transformer_config(
        cfg, layout, params_dtype=params_dtype, sequence_parallel=sequence_parallel, recompute=recompute, aux_loss=aux_loss
    )
    if rope == ROPE_POSITION_IDS:
        tc.mrope_section = [0, 0, cfg.head_dim // 2]
    tie = cfg.tie_word_embeddings if tie_word_embeddings is None else tie_word_embeddings
    chunks = build_chunks(cfg, layout, tc, _ernie_layer_specs(tc), tie=tie, seq_length=seq_length)
    if aux_loss and cfg.is_moe:
        from .router import attach_pooled_aux_loss

        (chunk,) = chunks  # pp == 1
        attach_pooled_aux_loss(chunk, cfg.router_aux_loss_coef, cfg.moe_num_experts, cfg.moe_k)
    return chunks


def takes_position_ids(chunk) -> bool:
    """Whether a chunk (text GPTModel or VL model) rotates by the ``position_ids`` it is given (``rope=``)."""
    return chunk.position_embedding_type == "mrope"


def causal_mask(seq_len: int, device: torch.device | str = "cpu", padding_mask: torch.Tensor | None = None):
    """The explicit attention mask Megatron needs on CPU (S3): ``[B|1, 1, S, S]``, True = masked.

    ``padding_mask`` ``[B, S]`` (True = real token) additionally masks padded keys, like HF's attention_mask.
    """
    m = torch.triu(torch.ones(seq_len, seq_len, dtype=torch.bool, device=device), diagonal=1).view(1, 1, seq_len, seq_len)
    if padding_mask is not None:
        m = m | ~padding_mask.bool().view(padding_mask.shape[0], 1, 1, seq_len)
    return m
