"""ERNIE 4.5 VL 3-D rotary embedding for the Megatron-Core language model (reference §B.5, §J.2).

Legend (shape suffixes): ``B`` batch, ``S`` sequence, ``F`` rotary bands (= head_dim / 2), ``D`` head_dim,
``3`` the (T, H, W) position rows.

ERNIE's layout is *not* Qwen2-VL's contiguous ``[T | H | W]`` blocks that Megatron's ``MultimodalRotaryEmbedding``
implements. With ``mrope_section = (h, w, t)`` (``h == w``) and ``hw = h + w``, band ``f`` of the head dimension takes
its angle from

* ``f < hw``, ``f`` even  ->  the H row,
* ``f < hw``, ``f`` odd   ->  the W row,
* ``f >= hw``             ->  the T row,

always with the *unpermuted* inverse frequency ``inv[f] = θ^(-2f/D)``, and each band rotates the interleaved pair
``(2f, 2f+1)`` (GPT-J style, like the 1-D text RoPE, reference §B.4). For text tokens ``T = H = W`` so it reduces
exactly to the 1-D interleaved RoPE.

HF (``Ernie4_5_VLMoeTextRotaryEmbedding``) reaches the same angles by pre-permuting ``inv`` and re-interleaving
after the multiply; here the axis of every band is a fixed index vector, so each angle is the single fp32 product
``pos · inv[f]`` HF computes too -- bit-identical, not merely close.

The module returns *angles* in Megatron's rotary format ``[S, B, 1, D]`` (each band doubled, ``[f, f]``) and is
plugged in as ``GPTModel.rotary_pos_emb``; Megatron's attention then applies
``x·cos + rotate_interleaved(x)·sin`` with ``config.rotary_interleaved = True``.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch

__all__ = ["ErnieMultimodalRotaryEmbedding", "band_axes", "rope_inv_freq"]

# rows of the position tensor, in HF's order (reference §F.4)
_T, _H, _W = 0, 1, 2


def rope_inv_freq(head_dim: int, theta: float) -> torch.Tensor:
    """``inv[f] = θ^(-2f/D)`` in fp32, written exactly as HF writes it (same bits)."""
    return 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float) / head_dim))


def band_axes(mrope_section: Sequence[int]) -> torch.Tensor:
    """Position row (0 = T, 1 = H, 2 = W) that drives each rotary band ``f``."""
    h, w, t = (int(x) for x in mrope_section)
    if h != w:
        raise ValueError(f"ERNIE 3-D RoPE alternates H/W bands, so mrope_section needs h == w; got {list(mrope_section)}")
    hw = h + w
    axes_F = torch.tensor([(_H if f % 2 == 0 else _W) for f in range(hw)] + [_T] * t, dtype=torch.long)
    return axes_F


class ErnieMultimodalRotaryEmbedding(torch.nn.Module):
    """ERNIE's 3-D RoPE angles, with the call signature of Megatron's ``MultimodalRotaryEmbedding``."""

    def __init__(self, kv_channels: int, rotary_base: float, mrope_section: Sequence[int]) -> None:
        super().__init__()
        if sum(mrope_section) != kv_channels // 2:
            raise ValueError(f"mrope_section {list(mrope_section)} must sum to head_dim/2 = {kv_channels // 2}")
        self.mrope_section = tuple(int(x) for x in mrope_section)
        # derived tables, rebuilt from the config: never part of a checkpoint
        self.register_buffer("inv_freq", rope_inv_freq(kv_channels, rotary_base), persistent=False)
        self.register_buffer("axes", band_axes(self.mrope_section), persistent=False)

    def angles(self, position_ids: torch.Tensor) -> torch.Tensor:
        """``[3, B, S]`` (or ``[B, S]`` text-only) integer positions -> fp32 angles ``[B, S, F]``."""
        if position_ids.dim() == 2:  # text only: T = H = W
            position_ids = position_ids.unsqueeze(0).expand(3, -1, -1)
        if position_ids.dim() != 3 or position_ids.shape[0] != 3:
            raise ValueError(f"position_ids must be [3, B, S] (T, H, W rows) or [B, S], got {tuple(position_ids.shape)}")
        pos_3BS = position_ids.to(device=self.inv_freq.device).float()
        # pick, for every band, the row that drives it: [F, B, S] -> [B, S, F]
        pos_BSF = pos_3BS.index_select(0, self.axes).permute(1, 2, 0)
        return pos_BSF * self.inv_freq

    def forward(
        self,
        position_ids: torch.Tensor,
        mrope_section: Optional[Sequence[int]] = None,
        cp_group: Optional[torch.distributed.ProcessGroup] = None,
    ) -> torch.Tensor:
        """Angles ``[S, B, 1, D]`` for Megatron's attention (``GPTModel._preprocess`` calls it this way)."""
        if mrope_section is not None and tuple(mrope_section) != self.mrope_section:
            raise ValueError(f"mrope_section {list(mrope_section)} differs from this module's {list(self.mrope_section)}")
        if cp_group is not None and cp_group.size() > 1:
            raise NotImplementedError("context parallelism is not supported by the ERNIE VL rotary embedding")
        ang_BSF = self.angles(position_ids)
        # interleaved pairs: band f covers dims (2f, 2f+1)
        ang_BSD = ang_BSF.repeat_interleave(2, dim=-1)
        return ang_BSD.transpose(0, 1).unsqueeze(2).contiguous()
