"""KV-cache inference through Megatron-Core's own machinery: prefill, cached decode steps, greedy generation.

Legend (shape suffixes): ``B`` batch, ``P`` prompt length, ``L`` tokens in the cache (prompt + generated so far),
``V`` vocab, ``3`` the (T, H, W) position rows of the VL model.

Machinery used (megatron-core 0.16.1)
--------------------------------------
``StaticInferenceContext`` is passed as ``inference_context=`` to ``GPTModel.forward``. Every attention layer then
keeps its keys/values in the context's ``key_value_memory_dict`` (``[max_len, max_batch, kv_heads, head_dim]``,
stored *before* RoPE and re-rotated each step), writes the new tokens at ``sequence_len_offset`` and attends over
``[0, offset + new)``; ``GPTModel`` keeps only the last position's logits (``materialize_only_last_token_logits``).
The caller advances ``sequence_len_offset`` after each call. On CPU nothing beyond the standing shims is needed:
the cache buffers are allocated on ``torch.cuda.current_device()``, which S1 maps to the CPU, and the explicit mask
(S3) is passed as usual. This module adds no shim.

Masks: Megatron's local attention applies whatever mask it is given (its ``attn_mask_type`` switch to ``no_mask``
at decode time only matters to fused kernels). Prefill gets the causal mask (plus padded keys); a decode step's
single query may see every cached key, so it gets ``None`` -- or, for left-padded batches, ``[B, 1, 1, L]`` masking
the padded keys.

Positions
---------
* ``"rope"`` text models rotate the cache slot: position = slot index, ``arange`` from 0 including left padding.
  HF counts real tokens only (``cumsum(mask) - 1``); for a left-padded row the two differ by a constant per row,
  which RoPE's relative form cancels (scores equal up to rounding).
* position-driven models (VL, or text built with ``rope="position_ids"``) slice the rotary angles of the
  *whole* cache (``q`` = the new slots, ``k`` = all slots), so each call passes the position history ``[.., B, L]``.
  VL prefill positions are HF's ``get_rope_index`` (reference §F.4); a decode token continues at
  ``max(prompt positions) + 1 + k`` on all three axes, i.e. HF's ``cache_len + rope_delta`` (§F.4).
* text models built with ``rope="position_ids"`` use HF's positions exactly (``cumsum(mask) - 1``).

Vision features are computed once, at prefill, from the prompt's pixels. Decode-time tokens are text and route to
the text pool (reference §J.20); cached vision positions keep the routing they had at prefill.
"""

from __future__ import annotations

from typing import Optional

import torch

from ..config import ConfigError, ErnieConfig
from .model import causal_mask, takes_position_ids
from .vl_inputs import model_positions_and_types
from .vl_model import vl_forward

__all__ = ["KVCacheSession", "generate", "teacher_forced_logits"]


class KVCacheSession:
    """One batch of sequences decoding through Megatron's static KV cache (TP ranks all call alike; PP = 1).

    ``prefill`` once with the prompts (and their pixels), then ``step`` with one new token per row.
    """

    def __init__(self, chunks, cfg: ErnieConfig, *, batch_size: int, max_length: int) -> None:
        from megatron.core.inference.contexts import StaticInferenceContext

        if len(chunks) != 1 or not (chunks[0].pre_process and chunks[0].post_process):
            raise ConfigError("KV-cache inference needs the whole model on one pipeline stage (PP = 1, no VPP)")
        if chunks[0].config.sequence_parallel:
            # a decode step holds one token per row: nothing to split over the TP ranks
            raise ConfigError("KV-cache inference runs without sequence parallelism; build the model with it off")
        self.model = chunks[0].eval()  # Megatron caches only outside training mode
        self.cfg = cfg
        self.vl = cfg.family == "vl"
        self.by_position_ids = takes_position_ids(self.model)
        self.context = StaticInferenceContext(batch_size, max_length)
        self.valid_BL: Optional[torch.Tensor] = None  # which cache slots hold real tokens (left padding = False)
        self.positions: Optional[torch.Tensor] = None  # [B, L] or [3, B, L]
        self.next_position_B: Optional[torch.Tensor] = None

    @property
    def length(self) -> int:
        return self.context.sequence_len_offset

    # -- calls -----------------------------------------------------------------------------------------------------
    def _forward(self, input_ids_BS, mask, positions, moe_types_BS, mm_inputs) -> torch.Tensor:
        if self.vl:
            logits = vl_forward(
                self.model,
                input_ids_BS,
                attention_mask=mask,
                position_ids=positions,
                moe_token_types=moe_types_BS,
                inference_context=self.context,
                runtime_gather_output=True,  # Megatron requires gathered logits at inference
                **mm_inputs,
            )
        else:
            logits = self.model(
                input_ids_BS, positions, mask, inference_context=self.context, runtime_gather_output=True
            )
        self.context.increment_sequence_len_offset(input_ids_BS.shape[1])
        return logits[..., : self.cfg.vocab_size]

    def _call_positions(self, new: int) -> torch.Tensor:
        # position-driven rotary slices q from the new slots and k from all slots: hand it the whole history
        if self.by_position_ids:
            return self.positions
        return self.positions[..., -new:]

    @torch.no_grad()
    def prefill(
        self,
        input_ids_BP: torch.Tensor,
        *,
        attention_mask: Optional[torch.Tensor] = None,
        all_logits: bool = False,
        mm_token_type_ids: Optional[torch.Tensor] = None,
        moe_mm_token_type_ids: Optional[torch.Tensor] = None,
        pixel_values: Optional[torch.Tensor] = None,
        image_grid_thw: Optional[torch.Tensor] = None,
        pixel_values_videos: Optional[torch.Tensor] = None,
        video_grid_thw: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        """Encode the prompts; logits of the last position ``[B, 1, V]`` (every position with ``all_logits``).

        ``attention_mask`` ``[B, P]`` (1 = token, 0 = left padding) as the HF processor/tokenizer gives it.
        """
        if self.length:
            raise RuntimeError("prefill() must come first; make a new session for a new batch")
        B, P = input_ids_BP.shape
        valid_BP = torch.ones(B, P, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
        if not bool(valid_BP[:, -1].all()):
            raise ValueError("decoding appends at the end: pad prompts on the left")
        self.valid_BL = valid_BP
        mm_inputs = {}
        moe_types_BP = None
        if self.vl:
            if moe_mm_token_type_ids is None and (pixel_values is not None or pixel_values_videos is not None):
                raise ValueError("a multimodal prompt needs moe_mm_token_type_ids (processor output, reference §F.2)")
            self.positions, moe_types_BP = model_positions_and_types(
                input_ids_BP,
                self.cfg,
                attention_mask=attention_mask,
                mm_token_type_ids=mm_token_type_ids,
                moe_mm_token_type_ids=moe_mm_token_type_ids,
                image_grid_thw=image_grid_thw,
                video_grid_thw=video_grid_thw,
            )
            # HF: rope_delta = max + 1 - n_valid; the next token sits at n_valid + delta = max + 1 (§F.4)
            masked_3BP = self.positions.masked_fill(~valid_BP.unsqueeze(0), -1)
            self.next_position_B = masked_3BP.amax(dim=(0, 2)) + 1
            mm_inputs = dict(
                pixel_values=pixel_values,
                image_grid_thw=image_grid_thw,
                pixel_values_videos=pixel_values_videos,
                video_grid_thw=video_grid_thw,
            )
        else:
            # HF's positions (cumsum of the mask); equal to arange without padding
            self.positions = (valid_BP.long().cumsum(1) - 1).clamp_min(0)
            self.next_position_B = self.positions[:, -1] + 1
        mask = causal_mask(P, input_ids_BP.device, padding_mask=None if attention_mask is None else valid_BP)
        self.context.materialize_only_last_token_logits = not all_logits
        try:
            logits = self._forward(input_ids_BP, mask, self._call_positions(P), moe_types_BP, mm_inputs)
        finally:
            self.context.materialize_only_last_token_logits = True
        self.context.enable_decode_mode()
        return logits

    @torch.no_grad()
    def step(self, next_ids_B: torch.Tensor) -> torch.Tensor:
        """Append one token per row; its logits ``[B, V]``."""
        if not self.length:
            raise RuntimeError("step() before prefill()")
        B = next_ids_B.shape[0]
        ids_B1 = next_ids_B.view(B, 1)
        new_B1 = self.next_position_B.view(B, 1)
        if self.vl:
            self.positions = torch.cat([self.positions, new_B1.unsqueeze(0).expand(3, B, 1)], dim=2)
        else:
            self.positions = torch.cat([self.positions, new_B1], dim=1)
        self.next_position_B = self.next_position_B + 1
        self.valid_BL = torch.cat([self.valid_BL, torch.ones(B, 1, dtype=torch.bool)], dim=1)
        # one query sees every cached key except left padding
        mask = None if bool(self.valid_BL.all()) else ~self.valid_BL.view(B, 1, 1, -1)
        # decode-time tokens are text: text pool (reference §J.20); an explicit zero tensor, not "no types"
        moe_types_B1 = torch.zeros_like(ids_B1) if self.vl else None
        return self._forward(ids_B1, mask, self._call_positions(1), moe_types_B1, {})[:, -1]


@torch.no_grad()
def generate(
    chunks,
    cfg: ErnieConfig,
    prompt_ids: torch.Tensor,
    max_new_tokens: int,
    *,
    attention_mask: Optional[torch.Tensor] = None,
    eos_token_id: Optional[int | list[int]] = None,
    pad_token_id: Optional[int] = None,
    **mm_inputs,
) -> torch.Tensor:
    """Greedy decoding with the KV cache: ``[B, P + n]`` (prompt, then up to ``max_new_tokens`` tokens).

    Like HF ``generate(do_sample=False)``: a row that emitted an ``eos_token_id`` continues with ``pad_token_id``,
    and decoding stops once every row has finished. ``mm_inputs`` are the VL processor outputs
    (``mm_token_type_ids``, ``moe_mm_token_type_ids``, ``pixel_values``, ``image_grid_thw``, ...).
    """
    if prompt_ids.dim() != 2:
        raise ValueError(f"prompt_ids must be [B, P], got {tuple(prompt_ids.shape)}")
    B = prompt_ids.shape[0]
    eos = [] if eos_token_id is None else ([eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id))
    if eos and pad_token_id is None:
        raise ValueError("eos_token_id needs a pad_token_id for the rows that finish early")
    session = KVCacheSession(chunks, cfg, batch_size=B, max_length=prompt_ids.shape[1] + max_new_tokens)
    logits_BV = session.prefill(prompt_ids, attention_mask=attention_mask, **mm_inputs)[:, -1]
    out = [prompt_ids]
    done_B = torch.zeros(B, dtype=torch.bool)
    for i in range(max_new_tokens):
        next_B = logits_BV.argmax(-1)
        if eos:
            next_B = next_B.masked_fill(done_B, pad_token_id)
            done_B = done_B | torch.isin(next_B, torch.tensor(eos))
        out.append(next_B.view(B, 1))
        if bool(done_B.all()) or i == max_new_tokens - 1:
            break
        logits_BV = session.step(next_B)
    return torch.cat(out, dim=1)


@torch.no_grad()
def teacher_forced_logits(
    chunks,
    cfg: ErnieConfig,
    input_ids: torch.Tensor,
    prompt_len: int,
    *,
    attention_mask: Optional[torch.Tensor] = None,
    **mm_inputs,
) -> torch.Tensor:
    """Logits ``[B, S, V]`` of ``input_ids`` computed the decoding way: prefill ``[:prompt_len]`` (all positions),
    then one cached step per remaining token. Equals a full forward -- the KV-cache check."""
    B, S = input_ids.shape
    session = KVCacheSession(chunks, cfg, batch_size=B, max_length=S)
    mask = None if attention_mask is None else attention_mask[:, :prompt_len]
    pieces = [session.prefill(input_ids[:, :prompt_len], attention_mask=mask, all_logits=True, **mm_inputs)]
    for s in range(prompt_len, S):
        pieces.append(session.step(input_ids[:, s]).unsqueeze(1))
    return torch.cat(pieces, dim=1)
