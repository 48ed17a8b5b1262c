"""Test-only helpers for the VL model: HF→Megatron weight copy, processor-style inputs.

Models are loaded through the production bridge (:func:`load_through_bridge`). The independent weight copy
(:func:`load_hf_into_vl`) stays as a second oracle: ``test_bridge_equals_independent_copy`` checks the two agree, and
it maps HF *gradients* for the backward comparison. It works on HF **in-memory** names (``Ernie4_5_VLMoeForConditionalGeneration``
state dict) and slices for this rank's TP / ETP / EP / PP position, so the same function serves 1-process and
multi-process tests, and -- applied to gradients instead of weights -- the backward comparison.

Legend: ``B`` batch, ``S`` sequence, ``E`` experts, ``I`` expert width, ``H`` hidden.
"""

from __future__ import annotations

import re
from typing import Mapping

import torch

# ----------------------------------------------------------------------------------------------------------------------
# HF -> Megatron tensors


def _ranks():
    from megatron.core import parallel_state as ps

    return dict(
        tp=ps.get_tensor_model_parallel_world_size(),
        tp_rank=ps.get_tensor_model_parallel_rank(),
        etp=ps.get_expert_tensor_parallel_world_size(),
        etp_rank=ps.get_expert_tensor_parallel_rank(),
        ep=ps.get_expert_model_parallel_world_size(),
        ep_rank=ps.get_expert_model_parallel_rank(),
    )


def _chunk(t: torch.Tensor, n: int, i: int, dim: int) -> torch.Tensor:
    return t.chunk(n, dim=dim)[i]


def _gated(gate: torch.Tensor, up: torch.Tensor, n: int, i: int) -> torch.Tensor:
    # TP/ETP shards of a SwiGLU fc1 are [gate_i; up_i], not a plain dim-0 chunk of [gate; up] (reference §H.4)
    return torch.cat([_chunk(gate, n, i, 0), _chunk(up, n, i, 0)])


def _fused_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, nkv: int) -> torch.Tensor:
    # group-major [q x r, k, v] per KV group (reference §H.3)
    hd = k.shape[0] // nkv
    r = q.shape[0] // (nkv * hd)
    q_G = q.view(nkv, r * hd, -1)
    k_G = k.view(nkv, hd, -1)
    v_G = v.view(nkv, hd, -1)
    return torch.cat([q_G, k_G, v_G], dim=1).reshape(-1, q.shape[-1])


def _pad_rows(t: torch.Tensor, rows: int) -> torch.Tensor:
    return t if t.shape[0] == rows else torch.cat([t, t.new_zeros(rows - t.shape[0], *t.shape[1:])])


def megatron_layer_numbers(chunk) -> dict[int, int]:
    """local decoder layer index -> global layer index (Megatron's layer_number is global and 1-based)."""
    return {i: layer.layer_number - 1 for i, layer in enumerate(chunk.language_model.decoder.layers)}


def hf_source(name: str, cfg, layer_numbers: Mapping[int, int]):
    """(HF names, function of those HF tensors giving this rank's Megatron tensor) for Megatron ``name``."""
    r = _ranks()
    tp, tpr = r["tp"], r["tp_rank"]
    lm = "model.language_model."
    if name.startswith("vision_model."):
        src = "model.vision_tower." + name[len("vision_model.") :]
        return [src], lambda t: t
    if name.startswith("resampler_model."):
        return ["model." + name], lambda t: t
    if name == "language_model.embedding.word_embeddings.weight":
        return [lm + "embed_tokens.weight"], lambda t: _chunk(_pad_rows(t, -(-t.shape[0] // tp) * tp), tp, tpr, 0)
    if name == "language_model.output_layer.weight":
        return ["lm_head.weight"], lambda t: _chunk(_pad_rows(t, -(-t.shape[0] // tp) * tp), tp, tpr, 0)
    if name == "language_model.decoder.final_layernorm.weight":
        return [lm + "norm.weight"], lambda t: t
    m = re.fullmatch(r"language_model\.decoder\.layers\.(\d+)\.(.+)", name)
    if m is None:
        raise KeyError(f"no HF source for {name}")
    L = layer_numbers[int(m.group(1))]
    rest = m.group(2)
    p = f"{lm}layers.{L}."
    if rest == "input_layernorm.weight":
        return [p + "input_layernorm.weight"], lambda t: t
    if rest == "pre_mlp_layernorm.weight":
        return [p + "post_attention_layernorm.weight"], lambda t: t
    if rest == "self_attention.linear_qkv.weight":
        srcs = [p + f"self_attn.{x}_proj.weight" for x in "qkv"]
        return srcs, lambda q, k, v: _chunk(_fused_qkv(q, k, v, cfg.num_key_value_heads), tp, tpr, 0)
    if rest == "self_attention.linear_proj.weight":
        return [p + "self_attn.o_proj.weight"], lambda t: _chunk(t, tp, tpr, 1)
    if rest == "mlp.linear_fc1.weight":
        return [p + "mlp.gate_proj.weight", p + "mlp.up_proj.weight"], lambda g, u: _gated(g, u, tp, tpr)
    if rest == "mlp.linear_fc2.weight":
        return [p + "mlp.down_proj.weight"], lambda t: _chunk(t, tp, tpr, 1)
    if rest == "mlp.shared_experts.linear_fc1.weight":
        srcs = [p + "mlp.shared_experts.gate_proj.weight", p + "mlp.shared_experts.up_proj.weight"]
        return srcs, lambda g, u: _gated(g, u, tp, tpr)
    if rest == "mlp.shared_experts.linear_fc2.weight":
        return [p + "mlp.shared_experts.down_proj.weight"], lambda t: _chunk(t, tp, tpr, 1)
    m = re.fullmatch(r"mlp\.(text|vision)_moe_layer\.(.+)", rest)
    if m is None:
        raise KeyError(f"no HF source for {name}")
    pool = f"{p}mlp.{m.group(1)}_moe."
    rest = m.group(2)
    if rest == "router.weight":
        return [pool + "gate.weight"], lambda t: t
    if rest == "router.expert_bias":
        return [pool + "gate.moe_statics.e_score_correction_bias"], lambda t: t[0]
    m = re.fullmatch(r"experts\.local_experts\.(\d+)\.linear_fc([12])\.weight", rest)
    if m is None:
        raise KeyError(f"no HF source for {name}")
    g = r["ep_rank"] * (cfg.moe_num_experts // r["ep"]) + int(m.group(1))
    etp, etpr = r["etp"], r["etp_rank"]
    if m.group(2) == "1":
        def fc1(gate_up_EFH):
            gate_FH, up_FH = gate_up_EFH[g].chunk(2, dim=0)
            return _gated(gate_FH, up_FH, etp, etpr)

        return [pool + "experts.gate_up_proj"], fc1
    return [pool + "experts.down_proj"], lambda down_EHI: _chunk(down_EHI[g], etp, etpr, 1)


def megatron_tensors(chunk, *, buffers: bool = True):
    """(name, tensor) for every parameter and persistent buffer of one Megatron chunk."""
    out = dict(chunk.named_parameters())
    if buffers:
        persistent = chunk.state_dict(keep_vars=True)
        out.update({n: b for n, b in chunk.named_buffers() if n in persistent})
    return out


def expected_from_hf(chunk, hf_tensors: Mapping[str, torch.Tensor], cfg, names) -> dict[str, torch.Tensor]:
    layer_numbers = megatron_layer_numbers(chunk)
    out = {}
    for name in names:
        srcs, fn = hf_source(name, cfg, layer_numbers)
        out[name] = fn(*(hf_tensors[s] for s in srcs))
    return out


def load_through_bridge(hf_model, chunks, cfg, layout, tmp_dir) -> None:
    """The production path: save the transformers model in its on-disk format, load it with the bridge."""
    from pathlib import Path

    from ernie45.bridge.live import load_hf

    path = Path(tmp_dir) / "hf"
    if not (path / "config.json").is_file():
        hf_model.save_pretrained(path)
    load_hf(chunks, cfg, layout, path)


def bridged_tiny_vl(tmp_dir, *, seed: int = 0):
    """(cfg, transformers model, Megatron chunks at TP1) of the tiny VL config, loaded through the production bridge
    from the model's own on-disk checkpoint. Process groups must exist."""
    from ernie45.config import ErnieConfig
    from ernie45.layout import Layout
    from ernie45.megatron.vl_model import build_vl_model
    from ernie45.testing import build_hf_model, tiny_hf_config

    raw = tiny_hf_config("vl")
    cfg = ErnieConfig.from_hf(raw)
    hf_model = build_hf_model(raw, seed=seed)
    chunks = build_vl_model(cfg, Layout(), vision_attn_implementation="eager")
    load_through_bridge(hf_model, chunks, cfg, Layout(), tmp_dir)
    return cfg, hf_model, chunks


@torch.no_grad()
def load_hf_into_vl(hf_model, chunks, cfg, *, check_hf_totality: bool = True) -> None:
    """Copy every weight of ``hf_model`` into this rank's Megatron chunks; fail on anything left over."""
    hf = dict(hf_model.state_dict())
    used = set()
    for chunk in chunks:
        tensors = megatron_tensors(chunk)
        layer_numbers = megatron_layer_numbers(chunk)
        for name, dst in tensors.items():
            srcs, fn = hf_source(name, cfg, layer_numbers)
            value = fn(*(hf[s] for s in srcs))
            if value.shape != dst.shape:
                raise ValueError(f"{name}: HF gives {tuple(value.shape)}, Megatron holds {tuple(dst.shape)}")
            dst.copy_(value)
            used.update(srcs)
    if check_hf_totality:
        left = sorted(k for k in hf if k not in used and not k.endswith("inv_freq"))
        if left:
            raise ValueError(f"HF tensors not copied: {left}")


# ----------------------------------------------------------------------------------------------------------------------
# inputs built the way the HF processor builds them (reference §F)

PATCH_ROW = 3 * 14 * 14  # 588


def make_batch(cfg, samples, *, seed: int = 0, pad_side: str = "left", force_mask: bool = False) -> dict:
    """Processor-style inputs for ``samples``: lists of ("text", n) / ("image", (1,h,w)) / ("video", (t,h,w)).

    Text tokens are random non-special ids; each image becomes ``START + h·w/4 placeholders + END`` with ``h·w``
    pixel rows of 588, each video ``START + t·h·w/8 placeholders + END`` with ``t·h·w`` rows (reference §F.1). Rows
    shorter than the longest are padded with id 0 and attention_mask 0.
    """
    from ernie45.megatron.vl_inputs import token_type_ids

    g = torch.Generator().manual_seed(seed)
    ids = cfg.special_ids
    rows, images, image_grids, videos, video_grids = [], [], [], [], []
    for sample in samples:
        row = []
        for kind, arg in sample:
            if kind == "text":
                row += torch.randint(1, min(ids.values()), (arg,), generator=g).tolist()
            elif kind == "image":
                t, h, w = arg
                row += [ids["image_start_token_id"]] + [ids["image_token_id"]] * (t * h * w // 4) + [ids["image_end_token_id"]]
                images.append(torch.randn(t * h * w, PATCH_ROW, generator=g))
                image_grids.append(arg)
            elif kind == "video":
                t, h, w = arg
                row += [ids["video_start_token_id"]] + [ids["video_token_id"]] * (t * h * w // 8) + [ids["video_end_token_id"]]
                videos.append(torch.randn(t * h * w, PATCH_ROW, generator=g))
                video_grids.append(arg)
            else:
                raise ValueError(kind)
        rows.append(row)
    S = max(len(r) for r in rows)
    input_ids = torch.zeros(len(rows), S, dtype=torch.long)
    attention_mask = torch.zeros(len(rows), S, dtype=torch.long)
    for b, row in enumerate(rows):
        sl = slice(S - len(row), S) if pad_side == "left" else slice(0, len(row))
        input_ids[b, sl] = torch.tensor(row)
        attention_mask[b, sl] = 1
    mm, moe = token_type_ids(input_ids, cfg)
    batch = dict(input_ids=input_ids, mm_token_type_ids=mm, moe_mm_token_type_ids=moe)
    if force_mask or not bool(attention_mask.all()):
        batch["attention_mask"] = attention_mask
    if images:
        batch["pixel_values"] = torch.cat(images)
        batch["image_grid_thw"] = torch.tensor(image_grids)
    if videos:
        batch["pixel_values_videos"] = torch.cat(videos)
        batch["video_grid_thw"] = torch.tensor(video_grids)
    return batch


def batch_rows(batch: dict, rows: slice, cfg) -> dict:
    """Samples ``rows`` of a :func:`make_batch` batch, as if made from those samples alone: the rows of the token
    arrays, and those samples' images and videos (pixel rows and grids are in sample order; a sample's count is its
    number of start tokens). What one data-parallel rank feeds."""
    ids = batch["input_ids"]
    picked = range(ids.shape[0])[rows]
    out = {k: batch[k][rows] for k in ("input_ids", "mm_token_type_ids", "moe_mm_token_type_ids", "attention_mask") if k in batch}
    for start, grid_key, pixel_key in (
        ("image_start_token_id", "image_grid_thw", "pixel_values"),
        ("video_start_token_id", "video_grid_thw", "pixel_values_videos"),
    ):
        if grid_key not in batch:
            continue
        per_sample = (ids == cfg.special_ids[start]).sum(1).tolist()
        first, n = sum(per_sample[: picked.start]), sum(per_sample[rows])
        grids = batch[grid_key]
        offsets = [0] + torch.cumsum(grids.prod(1), 0).tolist()
        if n:
            out[grid_key] = grids[first : first + n]
            out[pixel_key] = batch[pixel_key][offsets[first] : offsets[first + n]]
    return out
