"""ERNIE's attention for Megatron's local layer spec: Megatron's ``DotProductAttention`` on torch's SDPA, and
Megatron's ``SelfAttention`` with the interleaved rotary applied as one complex multiply (:class:`ErnieSelfAttention`,
whose own docstring says why).

Legend (shape suffixes): ``S`` query positions, ``K`` key positions, ``B`` batch rows (``1`` where a mask is
broadcast over rows), ``H`` query heads on this TP rank, ``G`` key/value head groups on this TP rank, ``D`` head dim.
Megatron hands the core attention ``[S, B, H, D]`` queries and ``[K, B, G, D]`` keys/values and expects
``[S, B, H·D]`` back.

Why: Megatron-Core's local (non-TransformerEngine) ``DotProductAttention`` -- the only core attention of the local
spec, so the one used on CPUs and on GPUs without TE -- materialises the scores with ``baddbmm``, masks them with
``masked_fill(-10000)``, runs an eager softmax and a second ``bmm``, and expands GQA keys/values with
``repeat_interleave`` first. Measured on a CPU (fp32, ``[4 × 256]`` tokens, 8 heads over 2 KV groups, head dim 64,
one layer's forward + backward): 23.3 ms eager vs 13.2 ms through ``torch.nn.functional.scaled_dot_product_attention``
(fused kernel, GQA without the copy), max |Δ| 6e-7 -- about 5 % of a whole training step of the benchmark model
(``benchmarks/train.py``). Megatron cannot express this: its only SDPA-class kernels are TransformerEngine's, and
``FusedScaleMaskSoftmax``'s fused path is CUDA-only and still materialises the scores.

So this subclass keeps everything of ``DotProductAttention`` -- its constructor (heads and KV groups per TP rank,
``softmax_scale`` = ``kv_channels^-0.5`` unless the config gives one; context parallelism refused there), its
``sharded_state_dict``, and its place in Megatron's selective recompute (``recompute_modules`` ``core_attn`` wraps
this module) -- and replaces only ``forward``, with Megatron's semantics:

* ``attention_mask`` ``[B|1, 1, S, K]`` bool, True = masked (``model.causal_mask``, ``packing.block_causal_mask``,
  the ``[B, 1, 1, K]`` left-padding mask of a KV-cache decode step). With ``None``: causal for a causal layer with
  ``S > 1``, else every key (a decode step), as Megatron's softmax does. Megatron ignores the ``attn_mask_type``
  argument of ``forward`` (its softmax keeps the one it was built with); so does this.
* A masked score is *replaced* by -10000 in Megatron, so a fully masked row (a left-padding query) averages every
  value uniformly and passes no gradient to its query or to the keys. Here the mask is additive,
  ``finfo(dtype).min`` on masked keys: ``score + min`` rounds to ``min`` for any finite score, so a masked key gets
  probability exactly 0 -- never the NaN a boolean ``-inf`` mask gives a fully masked row. Fully masked rows (only
  when there is one) are instead unmasked with their query zeroed: constant scores, the same uniform average, no
  gradient to the query or the keys. (Left fully masked, SDPA's CPU backward is wrong there: it recomputes the
  probabilities from a log-sum-exp of ``min + log K``, which rounds to ``min``, and gets 1 instead of ``1/K``.)
* GQA through SDPA's ``enable_gqa`` (query head ``h`` reads KV group ``h // (H / G)``, what Megatron's
  ``repeat_interleave`` builds).
* Refused: ``packed_seq_params`` (THD needs TE's kernels; packing uses the block mask), ``attention_bias``, and the
  constructor-time options ERNIE 4.5 never sets and this forward does not implement (attention dropout > 0,
  sliding windows, ``softmax_type`` other than vanilla, query-key layer scaling).

Softmax precision: for bf16 inputs Megatron computes the scores in bf16 and the softmax in fp32
(``attention_softmax_in_fp32``); SDPA's kernels accumulate in fp32 throughout. fp32 runs agree to rounding (~1e-6),
which, like any change of summation order, grows over optimizer steps: after 4 Adam steps of the tiny MoE of
``tests/test_train.py``, the step-5 gradients of transformers' own eager and SDPA attentions differ by 8e-6
(max relative per tensor), this module's and transformers' eager ones by 1.1e-5, Megatron's eager and transformers'
eager ones by 7e-6.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from megatron.core.packed_seq_params import PackedSeqParams
from megatron.core.transformer.attention import SelfAttention
from megatron.core.transformer.dot_product_attention import DotProductAttention
from megatron.core.transformer.enums import AttnMaskType

from ..config import ConfigError

__all__ = ["ErnieCoreAttention", "ErnieSelfAttention", "apply_interleaved_rotary"]


class ErnieCoreAttention(DotProductAttention):
    """Megatron's ``DotProductAttention`` with its forward on ``scaled_dot_product_attention`` (module docstring)."""

    def __init__(self, config, layer_number: int, attn_mask_type: AttnMaskType, attention_type: str, **kw) -> None:
        super().__init__(config, layer_number, attn_mask_type, attention_type, **kw)
        unsupported = {
            "attention_dropout > 0": self.attention_dropout.p != 0.0,
            "sliding-window attention (window_size)": self.scale_mask_softmax.window_size is not None,
            f"softmax_type {config.softmax_type!r}": config.softmax_type != "vanilla",
            "apply_query_key_layer_scaling": config.apply_query_key_layer_scaling,
        }
        refused = [name for name, on in unsupported.items() if on]
        if refused:
            raise ConfigError(f"ERNIE's core attention does not support {', '.join(refused)}")

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask: Optional[torch.Tensor],
        attn_mask_type: Optional[AttnMaskType] = None,
        attention_bias: Optional[torch.Tensor] = None,
        packed_seq_params: Optional[PackedSeqParams] = None,
    ) -> torch.Tensor:
        if packed_seq_params is not None:
            raise ValueError("packed_seq_params (THD) needs TransformerEngine; packed rows use a block mask instead")
        if attention_bias is not None:
            raise ValueError("attention_bias is not supported by ERNIE's core attention")
        S, B, H, D = query.shape
        K, G = key.shape[0], key.shape[2]
        # views, no copies: SDPA's kernels take strided [B, H, S, D] inputs
        q_BHSD, k_BGKD, v_BGKD = (t.permute(1, 2, 0, 3) for t in (query, key, value))
        add_B1SK, is_causal = None, False
        if attention_mask is not None:
            masked_B1SK = attention_mask
            full_B1S1 = masked_B1SK.all(dim=-1, keepdim=True)
            # a fully masked (left-padding) query: unmasked, zero query -> uniform, no gradient (module docstring).
            # The test is one host sync per layer on a GPU; an unconditional masked_fill costs ~10 % of a CPU layer
            if bool(full_B1S1.any()):
                q_BHSD = q_BHSD.masked_fill(full_B1S1, 0.0)
                masked_B1SK = masked_B1SK & ~full_B1S1
            add_B1SK = torch.zeros(masked_B1SK.shape, dtype=query.dtype, device=query.device)
            add_B1SK.masked_fill_(masked_B1SK, torch.finfo(query.dtype).min)
        elif self.attn_mask_type == AttnMaskType.causal and S > 1:
            if S != K:
                raise ValueError(f"a causal mask without an explicit mask needs as many queries as keys ({S} vs {K})")
            is_causal = True
        out_BHSD = F.scaled_dot_product_attention(
            q_BHSD, k_BGKD, v_BGKD, attn_mask=add_B1SK, is_causal=is_causal, scale=self.softmax_scale,
            enable_gqa=H != G,
        )  # fmt: skip
        return out_BHSD.permute(2, 0, 1, 3).reshape(S, B, H * D)


_COMPLEX = {torch.float32: torch.complex64, torch.float64: torch.complex128}


def apply_interleaved_rotary(x_SBHD: torch.Tensor, freqs_SB1D: torch.Tensor) -> torch.Tensor:
    """ERNIE's interleaved RoPE: the pair ``(x[2f], x[2f+1])`` of every head turned by the angle of band ``f``.

    ``freqs_SB1D``: Megatron's interleaved angle layout, every band's angle twice (``[θ0, θ0, θ1, θ1, ...]``; the
    ``B`` axis is 1 for Megatron's 1-D rotary, the batch for ERNIE's 3-D one). Legend: ``F = D / 2`` bands.

        x'[2f]   = x[2f] · cos θ_f − x[2f+1] · sin θ_f
        x'[2f+1] = x[2f+1] · cos θ_f + x[2f] · sin θ_f

    which is Megatron's ``t · cos + rotate_half(t) · sin`` -- and the product of the complex number
    ``x[2f] + i·x[2f+1]`` with ``e^{iθ_f}``: in fp32/fp64 one complex multiply over a view of ``x`` (its backward is
    one more, by the conjugate). Complex bf16/fp16 does not exist, so those dtypes take the same formula on the two
    halves of each pair, with cos/sin rounded to the input's dtype first as Megatron does."""
    ang_SB1F = freqs_SB1D[..., ::2]
    if x_SBHD.dtype in _COMPLEX:
        if x_SBHD.stride(-1) != 1 or x_SBHD.storage_offset() % 2 or any(st % 2 for st in x_SBHD.stride()[:-1]):
            x_SBHD = x_SBHD.contiguous()  # a complex view needs whole (re, im) pairs
        # cos/sin in the angles' dtype, then cast (Megatron's order of rounding)
        cis_SB1F = torch.complex(ang_SB1F.cos(), ang_SB1F.sin()).to(_COMPLEX[x_SBHD.dtype])
        return torch.view_as_real(torch.view_as_complex(x_SBHD.unflatten(-1, (-1, 2))) * cis_SB1F).flatten(-2)
    cos_SB1F, sin_SB1F = ang_SB1F.cos().to(x_SBHD.dtype), ang_SB1F.sin().to(x_SBHD.dtype)
    even_SBHF, odd_SBHF = x_SBHD.unflatten(-1, (-1, 2)).unbind(-1)
    return torch.stack((even_SBHF * cos_SB1F - odd_SBHF * sin_SB1F, odd_SBHF * cos_SB1F + even_SBHF * sin_SB1F),
                       dim=-1).flatten(-2)  # fmt: skip


class ErnieSelfAttention(SelfAttention):
    """Megatron's ``SelfAttention`` whose training/eval forward rotates queries and keys with
    :func:`apply_interleaved_rotary`.

    Why: Megatron's unfused interleaved rotary (``rope_utils._apply_rotary_pos_emb_bshd``, the path of every run
    without TransformerEngine) takes strided slices of the whole tensor, stacks them into a rotated copy, multiplies
    cos and sin into two more full-size tensors, adds them and concatenates an empty remainder -- a full copy -- per
    call, and recomputes cos/sin each time: on a CPU (fp32, ``[256, 4]`` tokens, 8 heads, head dim 64, forward +
    backward, quiet machine) 3.3-4.2 ms per call against 1.0-1.4 ms for the single complex multiply. Megatron's
    only other path is TE's fused kernel (``apply_rope_fusion``, TE >= 2.3 for interleaved), and its
    ``apply_rotary_pos_emb`` is a module function with no hook. What it does let a subclass change is
    ``get_query_key_value_tensors``, so:

    * ``forward`` keeps the angles for this call and hands Megatron ``rotary_pos_emb=None`` (it then applies none);
    * ``get_query_key_value_tensors`` rotates the query and key it returns with them.

    Same angles, same formula; fp32 results agree with Megatron's to rounding (~5e-7). Everything else is
    Megatron's: the fused QKV projection and its TP split, the core attention, the output projection, recompute.
    With a KV cache (``inference_context``) or THD packing (``packed_seq_params``) the call is Megatron's own, rotary
    included: those paths slice the angles by cache position or sequence, and are not training's hot path."""

    def __init__(self, config, *args, **kw) -> None:
        super().__init__(config, *args, **kw)
        if not config.rotary_interleaved or config.multi_latent_attention:
            raise ConfigError("ErnieSelfAttention applies ERNIE's interleaved rotary (rotary_interleaved=True, no MLA)")
        # the (query, key) angles of the forward call in progress, None between calls (forward sets and clears it)
        self._rotary_this_call: tuple[torch.Tensor, torch.Tensor] | None = None

    def forward(self, hidden_states, attention_mask, *, rotary_pos_emb=None, inference_context=None,
                packed_seq_params=None, **kw):  # fmt: skip
        if rotary_pos_emb is None or inference_context is not None or packed_seq_params is not None:
            return super().forward(hidden_states, attention_mask, rotary_pos_emb=rotary_pos_emb,
                                   inference_context=inference_context, packed_seq_params=packed_seq_params, **kw)  # fmt: skip
        self._rotary_this_call = rotary_pos_emb if isinstance(rotary_pos_emb, tuple) else (rotary_pos_emb,) * 2
        try:
            return super().forward(hidden_states, attention_mask, rotary_pos_emb=None, **kw)
        finally:
            self._rotary_this_call = None  # never carried into a later call (or a KV-cache one)

    def get_query_key_value_tensors(self, hidden_states, key_value_states=None, output_gate=False, split_qkv=True):
        qkv = super().get_query_key_value_tensors(hidden_states, key_value_states, output_gate=output_gate,
                                                  split_qkv=split_qkv)  # fmt: skip
        rotary = self._rotary_this_call
        if rotary is None:
            return qkv
        if not split_qkv:
            raise ValueError("ERNIE's rotary needs split query/key/value tensors (fused_single_qkv_rope is not used)")
        q_freqs, k_freqs = rotary
        query, key, *rest = qkv
        return (apply_interleaved_rotary(query, q_freqs), apply_interleaved_rotary(key, k_freqs), *rest)
