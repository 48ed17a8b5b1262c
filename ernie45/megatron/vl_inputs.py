"""The VL model's inputs, as HF builds them: token types, 3-D positions, labels and the loss mean.

Legend (shape suffixes): ``B`` batch, ``S`` sequence, ``3`` the (T, H, W) position rows.

Pure tensor functions of the ids, the processor outputs and the config: no model, no process group. The model's
forward, sequence packing and the KV-cache session all derive the VL inputs through these, so a sample gets the
same positions and pool types whichever way it runs.
"""

from __future__ import annotations

import itertools
from typing import Optional

import torch

from ..config import ErnieConfig
from .vl_moe import PAD_TOKEN_TYPE

__all__ = ["token_type_ids", "vl_position_ids", "model_positions_and_types", "lm_labels", "masked_token_mean"]


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


def model_positions_and_types(
    input_ids: torch.Tensor,
    cfg: ErnieConfig,
    *,
    attention_mask: Optional[torch.Tensor] = None,
    position_ids: Optional[torch.Tensor] = None,
    mm_token_type_ids: Optional[torch.Tensor] = None,
    moe_mm_token_type_ids: Optional[torch.Tensor] = None,
    image_grid_thw: Optional[torch.Tensor] = None,
    video_grid_thw: Optional[torch.Tensor] = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(position_ids [3, B, S], moe_token_types [B, S])`` of a padded batch from the HF processor outputs.

    Positions: the caller's (``[B, S]`` is broadcast to the three rows), else :func:`vl_position_ids`,
    attention-mask aware. MoE types: ``moe_mm_token_type_ids`` (None routes every token to the text pool, as in
    HF), with padding (``attention_mask`` 0) as ``PAD_TOKEN_TYPE`` (``vl_moe.py``).
    """
    B, S = input_ids.shape
    if position_ids is None:
        v = cfg.vision
        position_ids = vl_position_ids(
            input_ids,
            mm_token_type_ids,
            image_grid_thw,
            video_grid_thw,
            attention_mask,
            spatial_merge_size=v.spatial_merge_size,
            temporal_merge_size=v.temporal_merge_size,
        )
    elif position_ids.dim() == 2:
        position_ids = position_ids.unsqueeze(0).expand(3, B, S)
    types_BS = torch.zeros_like(input_ids) if moe_mm_token_type_ids is None else moe_mm_token_type_ids.to(torch.long)
    if attention_mask is not None:
        types_BS = types_BS.masked_fill(~attention_mask.bool(), PAD_TOKEN_TYPE)
    return position_ids, types_BS


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
