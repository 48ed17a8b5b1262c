"""Sequence packing: several samples (text, image, video) in one row, each behaving exactly as if it ran alone.

Legend (shape suffixes): ``S`` packed length, ``N`` samples in the pack, ``B`` batch (1 for a packed row),
``V`` vocab, ``3`` the (T, H, W) position rows of the VL model, ``P`` pixel rows, ``C`` pixel row width.

What makes a packed sample equal to the same sample run alone
--------------------------------------------------------------
* **attention**: a block-diagonal causal mask -- token ``i`` sees token ``j`` iff both belong to the same sample
  and ``j <= i``. Without it a sample attends to its predecessors (the test shows the logits then differ);
* **positions** restart at 0 in every sample: 1-D ``arange`` for text models, and for the VL model the 3-D
  positions HF's ``get_rope_index`` gives *that sample alone* (reference §F.4), concatenated;
* **pool routing** (VL) is per token from the concatenated MoE token types; ERNIE has no capacity limit, so a
  token's experts never depend on its neighbours (text MoE likewise);
* **labels** shift inside each sample only: the last token of a sample predicts nothing (``loss_mask`` 0), it must
  not be trained to predict the next sample's first token. :meth:`PackedBatch.per_sample_loss` gives every sample
  its own mean, so one sample's loss is unaffected by its neighbours' lengths.

What runs where
---------------
* **CPU (and any GPU without TransformerEngine)**: Megatron's local ``DotProductAttention`` refuses
  ``packed_seq_params`` (THD needs TE/flash kernels), so packing uses Megatron's own BSHD primitives: the explicit
  ``[1, 1, S, S]`` block-diagonal mask (True = masked, the same convention as ``model.causal_mask``) and explicit
  per-sample ``position_ids``. Cost: attention is O(S²) over the whole row; fine for tests and modest rows.
* **GPU with TransformerEngine**: :meth:`PackedBatch.packed_seq_params` describes the same pack as Megatron's
  ``PackedSeqParams(qkv_format="thd", cu_seqlens...)`` for the THD kernels (``attention_mask=None``). This module
  builds that description but this project's specs are the local (non-TE) ones, so the THD path is *not* exercised
  by the CPU test suite.

Text models and positions
-------------------------
Megatron's ``"rope"`` position type ignores ``position_ids``: it rotates by ``arange(S)`` (or derives per-sample
positions from ``cu_seqlens`` on the THD path). On the BSHD path the restart-at-0 positions must therefore reach
RoPE another way: text models for packed rows are built with ``build_model(..., rope="position_ids")``, the
position-driven rotary channel the VL model uses (``"mrope"`` + ERNIE's 3-D rotary with every band on the T row,
which *is* the 1-D interleaved RoPE bit for bit, reference §B.5(i)).

Packed VL rows run :func:`ernie45.megatron.vl_model.vl_forward` with the block-diagonal mask, the model's own
forward taking a ``[B, S]`` padding mask instead.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Optional, Sequence

import torch

from ..config import ConfigError, ErnieConfig
from .model import takes_position_ids
from .vl_inputs import lm_labels, token_type_ids, vl_position_ids
from .vl_model import vl_forward
from .vl_moe import PAD_TOKEN_TYPE

__all__ = [
    "PackedBatch",
    "pack",
    "block_causal_mask",
    "forward_packed",
]

IGNORE_INDEX = -100  # HF's label for "no loss here"

# keys a VL sample may carry (processor outputs of one unpadded sample) -- anything else is refused
_VL_KEYS = {
    "input_ids",
    "labels",
    "mm_token_type_ids",
    "moe_mm_token_type_ids",
    "pixel_values",
    "image_grid_thw",
    "pixel_values_videos",
    "video_grid_thw",
}


# ----------------------------------------------------------------------------------------------------------------------
# the packed batch


@dataclass(frozen=True)
class PackedBatch:
    """One packed row. Tensors are batch-first ``[1, S]`` like processor outputs; see the module docstring.

    ``labels``/``loss_mask`` follow Megatron's convention (already shifted: ``labels[s]`` is the target of position
    ``s``), so ``labels`` can go straight into ``GPTModel.forward(labels=...)``. ``segment_ids`` holds each token's
    sample index, ``-1`` on the padding tail.
    """

    input_ids: torch.Tensor  # [1, S]
    position_ids: torch.Tensor  # [1, S] (text) or [3, 1, S] (VL)
    attention_mask: torch.Tensor  # [1, 1, S, S] bool, True = masked
    labels: torch.Tensor  # [1, S]
    loss_mask: torch.Tensor  # [1, S] float
    segment_ids: torch.Tensor  # [1, S] long
    cu_seqlens: torch.Tensor  # [N + 1] int32, sample boundaries (padding tail excluded)
    # VL only (None for text models)
    mm_token_type_ids: Optional[torch.Tensor] = None  # [1, S] RoPE types
    moe_mm_token_type_ids: Optional[torch.Tensor] = None  # [1, S] pool types, PAD_TOKEN_TYPE on the padding tail
    pixel_values: Optional[torch.Tensor] = None  # [P, C]
    image_grid_thw: Optional[torch.Tensor] = None  # [n_images, 3]
    pixel_values_videos: Optional[torch.Tensor] = None  # [P, C]
    video_grid_thw: Optional[torch.Tensor] = None  # [n_videos, 3]

    @property
    def num_samples(self) -> int:
        return self.cu_seqlens.numel() - 1

    @property
    def seq_len(self) -> int:
        return self.input_ids.shape[1]

    @property
    def boundaries(self) -> list[tuple[int, int]]:
        """``[(start, stop)]`` of every sample along the packed sequence."""
        cu = self.cu_seqlens.tolist()
        return list(zip(cu[:-1], cu[1:]))

    @property
    def max_seqlen(self) -> int:
        return max(b - a for a, b in self.boundaries)

    def unpack(self, t: torch.Tensor, dim: int = 1) -> list[torch.Tensor]:
        """Split a per-token tensor of the pack (``[1, S, ...]`` by default) into its samples (padding dropped)."""
        if t.shape[dim] != self.seq_len:
            raise ValueError(f"dim {dim} of {tuple(t.shape)} is not the packed length {self.seq_len}")
        return [t.narrow(dim, a, b - a) for a, b in self.boundaries]

    def per_sample_loss(self, per_token_loss_BS: torch.Tensor) -> torch.Tensor:
        """Each sample's mean token loss ``[N]`` from Megatron's per-token loss ``[1, S]``.

        A sample with no target token (``loss_mask`` all 0, e.g. a one-token sample) gets NaN, not 0: an average
        over nothing has no value, and silently reporting 0 would look like a perfect prediction.
        """
        loss_S = (per_token_loss_BS.float() * self.loss_mask)[0]
        out_N = []
        for a, b in self.boundaries:
            out_N.append(loss_S[a:b].sum() / self.loss_mask[0, a:b].sum())
        return torch.stack(out_N)

    def mean_loss(self, per_token_loss_BS: torch.Tensor) -> torch.Tensor:
        """Token-weighted mean over the whole pack (what a training step usually minimises)."""
        return (per_token_loss_BS.float() * self.loss_mask).sum() / self.loss_mask.sum()

    def packed_seq_params(self):
        """Megatron's THD description of this pack (TransformerEngine attention; unused on CPU).

        For ``GPTModel.forward(..., attention_mask=None, packed_seq_params=...)`` with TE layer specs; move the
        ``cu_seqlens`` to the model's device with the batch. THD kernels must cover every token, so a padding tail
        becomes one extra (loss-free) sequence.
        """
        from megatron.core.packed_seq_params import PackedSeqParams

        cu_N = self.cu_seqlens
        if int(cu_N[-1]) != self.seq_len:
            cu_N = torch.cat([cu_N, cu_N.new_tensor([self.seq_len])])
        longest = int((cu_N[1:] - cu_N[:-1]).max())
        return PackedSeqParams(
            qkv_format="thd", cu_seqlens_q=cu_N, cu_seqlens_kv=cu_N, max_seqlen_q=longest, max_seqlen_kv=longest
        )

    def vl_inputs(self) -> dict[str, Any]:
        """The multimodal keyword arguments of :func:`~ernie45.megatron.vl_model.vl_forward`."""
        return dict(
            pixel_values=self.pixel_values,
            image_grid_thw=self.image_grid_thw,
            pixel_values_videos=self.pixel_values_videos,
            video_grid_thw=self.video_grid_thw,
        )


def block_causal_mask(segment_ids_BS: torch.Tensor) -> torch.Tensor:
    """``[B, 1, S, S]`` bool, True = masked: causal, and no attention across segments."""
    S = segment_ids_BS.shape[1]
    other_segment_BSS = segment_ids_BS.unsqueeze(2) != segment_ids_BS.unsqueeze(1)
    future_SS = torch.triu(torch.ones(S, S, dtype=torch.bool, device=segment_ids_BS.device), diagonal=1)
    return (other_segment_BSS | future_SS).unsqueeze(1)


# ----------------------------------------------------------------------------------------------------------------------
# packing


def _row(t: torch.Tensor, name: str) -> torch.Tensor:
    """A sample's per-token tensor as 1-D ``[S_i]`` (accepts ``[S_i]`` or ``[1, S_i]``)."""
    if t.dim() == 2 and t.shape[0] == 1:
        t = t[0]
    if t.dim() != 1:
        raise ValueError(f"{name} of one sample must be [S] or [1, S], got {tuple(t.shape)}")
    return t


def _cat_optional(parts: list[Optional[torch.Tensor]]) -> Optional[torch.Tensor]:
    parts = [p for p in parts if p is not None]
    return torch.cat(parts) if parts else None


def pack(
    samples: Sequence[torch.Tensor | Mapping[str, torch.Tensor]],
    cfg: ErnieConfig,
    *,
    pad_to_multiple_of: int = 1,
    pad_token_id: int = 0,
) -> PackedBatch:
    """Pack unpadded samples into one row.

    A sample is a 1-D tensor of token ids, or a dict with ``input_ids`` and optionally HF-style ``labels``
    (unshifted, ``-100`` = no loss; default: every next token is a target). VL samples may carry the processor
    outputs of that sample alone: ``pixel_values``/``image_grid_thw``, ``pixel_values_videos``/``video_grid_thw``,
    and the two token-type arrays (derived from the ids when absent, reference §F.2).

    ``pad_to_multiple_of`` pads the row (e.g. to the TP size for sequence parallelism); the padding tail is its
    own causal block, carries no loss and routes with the text pool, as HF routes padding.
    """
    if not samples:
        raise ValueError("pack() needs at least one sample")
    vl = cfg.family == "vl"
    ids_N, labels_N, pos_N, mm_N, moe_N = [], [], [], [], []
    pixels, image_grids, video_pixels, video_grids = [], [], [], []
    for i, sample in enumerate(samples):
        if isinstance(sample, torch.Tensor):
            sample = {"input_ids": sample}
        if vl:
            unknown = sorted(set(sample) - _VL_KEYS)
        else:
            unknown = sorted(set(sample) - {"input_ids", "labels"})
        if unknown:
            raise ValueError(f"sample {i}: unexpected keys {unknown} for a {cfg.family} model")
        ids_S = _row(sample["input_ids"], f"sample {i} input_ids").long()
        if ids_S.numel() == 0:
            raise ValueError(f"sample {i} is empty")
        ids_N.append(ids_S)
        hf_labels_S = _row(sample["labels"], f"sample {i} labels") if "labels" in sample else ids_S
        if hf_labels_S.shape != ids_S.shape:
            raise ValueError(f"sample {i}: labels {tuple(hf_labels_S.shape)} vs input_ids {tuple(ids_S.shape)}")
        labels_N.append(hf_labels_S)
        if not vl:
            pos_N.append(torch.arange(ids_S.numel()).view(1, -1))
            continue
        given = {"mm_token_type_ids", "moe_mm_token_type_ids"} & set(sample)
        if len(given) == 1:
            raise ValueError(f"sample {i}: give both token-type arrays or neither (reference §J.7); got only {given}")
        if given:
            mm_S = _row(sample["mm_token_type_ids"], f"sample {i} mm_token_type_ids")
            moe_S = _row(sample["moe_mm_token_type_ids"], f"sample {i} moe_mm_token_type_ids")
        else:
            mm_1S, moe_1S = token_type_ids(ids_S.view(1, -1), cfg)
            mm_S, moe_S = mm_1S[0], moe_1S[0]
        mm_N.append(mm_S.long())
        moe_N.append(moe_S.long())
        # positions as HF computes them for this sample alone: [3, 1, S_i]
        pos_N.append(
            vl_position_ids(
                ids_S.view(1, -1),
                mm_S.view(1, -1),
                sample.get("image_grid_thw"),
                sample.get("video_grid_thw"),
                spatial_merge_size=cfg.vision.spatial_merge_size,
                temporal_merge_size=cfg.vision.temporal_merge_size,
            )
        )
        for key, store in (
            ("pixel_values", pixels),
            ("image_grid_thw", image_grids),
            ("pixel_values_videos", video_pixels),
            ("video_grid_thw", video_grids),
        ):
            store.append(sample.get(key))

    lengths = [t.numel() for t in ids_N]
    S_real = sum(lengths)
    S = -(-S_real // pad_to_multiple_of) * pad_to_multiple_of
    pad = S - S_real

    seg_N = [torch.full((n,), i, dtype=torch.long) for i, n in enumerate(lengths)]
    seg_S = torch.cat(seg_N + [torch.full((pad,), -1, dtype=torch.long)])
    ids_S = torch.cat(ids_N + [torch.full((pad,), pad_token_id, dtype=torch.long)])
    # labels shift inside each sample; its last token gets -100 (lm_labels does exactly that per row)
    shifted = [lm_labels(lab.view(1, -1), ignore_index=IGNORE_INDEX) for lab in labels_N]
    labels_S = torch.cat([lab[0] for lab, _ in shifted] + [torch.zeros(pad, dtype=torch.long)])
    loss_mask_S = torch.cat([m[0] for _, m in shifted] + [torch.zeros(pad)])
    cu_N = torch.tensor([0] + lengths, dtype=torch.int32).cumsum(0).to(torch.int32)
    segment_ids_BS = seg_S.view(1, S)
    # the padding tail is one block of its own (segment -1 differs from every sample's)
    mask_B1SS = block_causal_mask(segment_ids_BS)

    if not vl:
        position_ids = torch.cat(pos_N + [torch.zeros(1, pad, dtype=torch.long)], dim=1)
        return PackedBatch(
            input_ids=ids_S.view(1, S),
            position_ids=position_ids,
            attention_mask=mask_B1SS,
            labels=labels_S.view(1, S),
            loss_mask=loss_mask_S.view(1, S),
            segment_ids=segment_ids_BS,
            cu_seqlens=cu_N,
        )

    position_ids = torch.cat(pos_N + [torch.zeros(3, 1, pad, dtype=pos_N[0].dtype)], dim=2)
    mm_S = torch.cat(mm_N + [torch.zeros(pad, dtype=torch.long)])
    moe_S = torch.cat(moe_N + [torch.full((pad,), PAD_TOKEN_TYPE, dtype=torch.long)])
    return PackedBatch(
        input_ids=ids_S.view(1, S),
        position_ids=position_ids,
        attention_mask=mask_B1SS,
        labels=labels_S.view(1, S),
        loss_mask=loss_mask_S.view(1, S),
        segment_ids=segment_ids_BS,
        cu_seqlens=cu_N,
        mm_token_type_ids=mm_S.view(1, S),
        moe_mm_token_type_ids=moe_S.view(1, S),
        # in sample order = the row-major order in which the model scatters features into placeholders (§F.3)
        pixel_values=_cat_optional(pixels),
        image_grid_thw=_cat_optional(image_grids),
        pixel_values_videos=_cat_optional(video_pixels),
        video_grid_thw=_cat_optional(video_grids),
    )


# ----------------------------------------------------------------------------------------------------------------------
# running a packed row


def forward_packed(
    chunk,
    packed: PackedBatch,
    cfg: ErnieConfig,
    *,
    with_loss: bool = False,
    runtime_gather_output: Optional[bool] = None,
) -> torch.Tensor:
    """Logits ``[1, S, V(/tp)]`` of a packed row -- or Megatron's per-token loss ``[1, S]`` with ``with_loss``.

    Text chunks must take positions from ``position_ids`` (built with ``rope="position_ids"``); otherwise every
    sample after the first would be rotated by its offset in the row instead of from 0.
    """
    labels = packed.labels if with_loss else None
    if cfg.family == "vl":
        return vl_forward(
            chunk,
            packed.input_ids,
            attention_mask=packed.attention_mask,
            position_ids=packed.position_ids,
            moe_token_types=packed.moe_mm_token_type_ids,
            labels=labels,
            runtime_gather_output=runtime_gather_output,
            **packed.vl_inputs(),
        )
    if not takes_position_ids(chunk):
        raise ConfigError(
            'this text model rotates by arange(S), not by position_ids; build it with rope="position_ids"'
        )
    return chunk(
        packed.input_ids,
        packed.position_ids,
        packed.attention_mask,
        labels=labels,
        runtime_gather_output=runtime_gather_output,
    )
