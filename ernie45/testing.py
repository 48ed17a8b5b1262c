"""Tiny, fully random ERNIE 4.5 checkpoints written by real transformers (for tests, the demo and benchmarks).

transformers zero-initialises the expert bias (``e_score_correction_bias``) and sets every norm weight to one,
which hides routing and norm bugs. :func:`rerandomise` draws *every* parameter and buffer afresh from a seeded
generator, so a parity test that passes has compared real numbers.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Any, Iterator

import torch

__all__ = [
    "TINY",
    "tiny_hf_config",
    "build_hf_model",
    "rerandomise",
    "write_tiny_checkpoint",
    "bit_exact_difference",
    "assert_bit_exact",
    "hf_loss_and_grads",
    "grad_differences",
]

# Tiny configs that exercise what the parity tests must cover: GQA, head_dim != hidden/heads (dense), a dense first
# layer, an MoE interval > 1, top-k > 1, 2 shared experts, E != H (catches a wrong router transpose), tied/untied.
TINY: dict[str, dict[str, Any]] = {
    "dense": dict(
        model_type="ernie4_5",
        vocab_size=160,
        hidden_size=48,
        intermediate_size=96,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,  # 4 x 16 = 64 != 48
        rms_norm_eps=1e-5,
        rope_parameters={"rope_type": "default", "rope_theta": 500000.0},
        tie_word_embeddings=True,
        use_bias=False,
    ),
    "moe": dict(
        model_type="ernie4_5_moe",
        vocab_size=160,
        hidden_size=48,
        intermediate_size=96,
        num_hidden_layers=6,
        num_attention_heads=4,
        num_key_value_heads=2,
        rms_norm_eps=1e-5,
        rope_parameters={"rope_type": "default", "rope_theta": 500000.0},
        tie_word_embeddings=False,
        use_bias=False,
        moe_num_experts=8,
        moe_k=3,
        moe_intermediate_size=32,
        moe_num_shared_experts=2,
        moe_layer_start_index=1,
        moe_layer_interval=2,  # layers 1, 3, 5 sparse (with end 5): D S D S D S
        moe_layer_end_index=-1,
        moe_norm_min=1e-12,
    ),
    # VL: pools of different widths (32 text / 16 vision), dense first layer, untied head like the 424B.
    # head_dim 16 -> 8 rotary bands: mrope_section (3, 3, 2) = 6 alternating H/W bands then 2 T bands.
    "vl": dict(
        model_type="ernie4_5_vl_moe",
        tie_word_embeddings=False,
        image_start_token_id=150,
        image_end_token_id=151,
        image_token_id=152,
        video_start_token_id=153,
        video_end_token_id=154,
        video_token_id=155,
        text_config=dict(
            vocab_size=160,
            hidden_size=64,
            intermediate_size=96,
            num_hidden_layers=4,
            num_attention_heads=4,
            num_key_value_heads=2,
            rms_norm_eps=1e-5,
            rope_parameters={"rope_type": "default", "rope_theta": 500000.0, "mrope_section": [3, 3, 2]},
            use_bias=False,
            moe_num_experts=8,
            moe_k=3,
            moe_intermediate_size=[32, 16],
            moe_num_shared_experts=2,
            moe_norm_min=1e-12,
            mlp_layer_types=["dense", "sparse", "sparse", "sparse"],
        ),
        vision_config=dict(
            depth=2,
            hidden_size=32,
            num_heads=2,
            intermediate_size=64,
            hidden_act="quick_gelu",
            in_channels=3,
            patch_size=14,
            spatial_merge_size=2,
            temporal_merge_size=2,
            rms_norm_eps=1e-6,
        ),
    ),
}


def tiny_hf_config(family: str, **overrides: Any) -> dict[str, Any]:
    cfg = json.loads(json.dumps(TINY[family]))
    cfg.update(overrides)
    return cfg


def _hf_config_object(raw: dict[str, Any]):
    import transformers

    cls = {
        "ernie4_5": transformers.Ernie4_5Config,
        "ernie4_5_moe": transformers.Ernie4_5_MoeConfig,
        "ernie4_5_vl_moe": transformers.Ernie4_5_VLMoeConfig,
    }[raw["model_type"]]
    kwargs = {k: v for k, v in raw.items() if k != "model_type"}
    return cls(**kwargs)


def build_hf_model(raw: dict[str, Any], *, seed: int = 0, dtype: torch.dtype = torch.float32):
    """A transformers model for ``raw`` with every parameter and buffer re-randomised (eager attention/experts)."""
    import transformers

    hf_cfg = _hf_config_object(raw)
    hf_cfg._attn_implementation = "eager"
    cls = {
        "ernie4_5": transformers.Ernie4_5ForCausalLM,
        "ernie4_5_moe": transformers.Ernie4_5_MoeForCausalLM,
        "ernie4_5_vl_moe": transformers.Ernie4_5_VLMoeForConditionalGeneration,
    }[raw["model_type"]]
    torch.manual_seed(seed)
    model = cls(hf_cfg)
    if hasattr(model, "set_experts_implementation"):
        model.set_experts_implementation("eager")
    rerandomise(model, seed=seed)
    return model.to(dtype).eval()


def rerandomise(model: torch.nn.Module, *, seed: int) -> None:
    """Draw every parameter and floating buffer afresh (incl. expert bias and norm weights).

    Scales are chosen so a tiny model's activations stay O(1) and routing is decided by clear margins: norms
    around 1, the expert bias comparable to the softmax probabilities it is added to.
    """
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in list(model.named_parameters()) + list(model.named_buffers()):
            if not p.is_floating_point() or "inv_freq" in name:  # RoPE tables are derived, not weights
                continue
            if "e_score_correction_bias" in name:
                new = torch.rand(p.shape, generator=g) * 0.2
            elif "norm" in name or name.endswith("ln.weight"):
                new = 1.0 + 0.2 * torch.randn(p.shape, generator=g)
            elif p.dim() == 1:
                new = 0.1 * torch.randn(p.shape, generator=g)
            else:
                fan_in = p.shape[-1]
                new = torch.randn(p.shape, generator=g) / fan_in**0.5
            p.copy_(new.to(p.dtype))


def write_tiny_checkpoint(out_dir: str | Path, family: str, *, seed: int = 0, dtype=torch.float32, **overrides) -> Path:
    """Save a re-randomised tiny HF checkpoint (real on-disk format, via ``save_pretrained``)."""
    out_dir = Path(out_dir)
    model = build_hf_model(tiny_hf_config(family, **overrides), seed=seed, dtype=dtype)
    model.save_pretrained(out_dir)
    return out_dir


def bit_exact_difference(actual: torch.Tensor, expected: torch.Tensor) -> str | None:
    """Why ``actual`` is not a bit-exact copy of ``expected`` (dtype, shape, then bytes), or None if it is.

    ``torch.equal`` alone is not enough: it compares values after type promotion, so a float64 (or float16 holding
    representable values) copy of a float32 tensor passes it. Bytes also make NaN payloads and the sign of zero count.
    """
    if not isinstance(actual, torch.Tensor) or not isinstance(expected, torch.Tensor):
        return f"not tensors: {type(actual).__name__} vs {type(expected).__name__}"
    if actual.dtype != expected.dtype:
        return f"dtype {actual.dtype} != {expected.dtype}"
    if actual.shape != expected.shape:
        return f"shape {list(actual.shape)} != {list(expected.shape)}"
    a_N = actual.detach().cpu().contiguous().reshape(-1)
    b_N = expected.detach().cpu().contiguous().reshape(-1)
    if a_N.numel() == 0:
        return None
    # one row of bytes per element, so the message can count elements, not bytes
    a_NB, b_NB = a_N.view(torch.uint8).view(a_N.numel(), -1), b_N.view(torch.uint8).view(b_N.numel(), -1)
    differ_N = (a_NB != b_NB).any(-1)
    if differ_N.any():
        first = int(differ_N.nonzero()[0])
        return f"{int(differ_N.sum())} of {a_N.numel()} elements differ (first at flat index {first})"
    return None


def assert_bit_exact(actual: torch.Tensor, expected: torch.Tensor, name: object = "") -> None:
    """Assert ``actual`` is ``expected`` bit for bit: same dtype, shape and bytes. ``name`` labels the failure."""
    why = bit_exact_difference(actual, expected)
    if why is not None:
        raise AssertionError(f"{name}: {why}" if name != "" else why)


def hf_loss_and_grads(hf_model, input_ids_BS: torch.Tensor, labels_BS: torch.Tensor, **inputs):
    """transformers' loss and gradients for Megatron's training convention, under the **on-disk** HF names.

    Megatron's GPT loss is the cross-entropy of ``logits[b, s]`` against ``labels[b, s]`` (labels already shifted),
    averaged over every token; here it is computed with ``torch.nn.functional.cross_entropy`` on transformers'
    logits. transformers holds the MoE experts fused in memory (``experts.gate_up_proj [E, 2I, H]``); its own
    ``revert_weight_conversion`` (what ``save_pretrained`` uses) maps the gradients back to the per-expert names a
    checkpoint -- and ``ernie45.bridge.live.gather_hf`` -- use. Returns ``(loss, {hf name: grad})``.
    """
    from transformers.core_model_loading import revert_weight_conversion

    hf_model.zero_grad(set_to_none=True)
    logits_BSV = hf_model(input_ids=input_ids_BS, **inputs).logits
    loss = torch.nn.functional.cross_entropy(logits_BSV.float().flatten(0, 1), labels_BS.flatten())
    loss.backward()
    grads = {n: p.grad for n, p in hf_model.named_parameters() if p.grad is not None}
    return loss.detach(), revert_weight_conversion(hf_model, grads)


def grad_differences(
    got: dict[str, torch.Tensor], want: dict[str, torch.Tensor], *, atol: float = 1e-7
) -> dict[str, float]:
    """Per tensor, max |got - want| relative to max |want| (0 where both are within ``atol``, e.g. an expert no token
    reached). The caller asserts the worst against its tolerance; the names must agree."""
    if sorted(got) != sorted(want):
        missing, extra = sorted(set(want) - set(got)), sorted(set(got) - set(want))
        raise AssertionError(f"gradient names differ: missing {missing[:5]}, unexpected {extra[:5]}")
    out = {}
    for name, w in want.items():
        g = got[name]
        if g.shape != w.shape:
            raise AssertionError(f"{name}: gradient shape {list(g.shape)} != {list(w.shape)}")
        diff = (g.float() - w.float()).abs().max().item()
        out[name] = 0.0 if diff <= atol else diff / max(w.abs().max().item(), 1e-12)
    return out


@contextlib.contextmanager
def worker_results(rank: int, out_root: str | Path, name: str = "results.json") -> Iterator[dict]:
    """The envelope of a 2-process test worker: collect results, rank 0 writes them as JSON for the parent test.

    A failure on either rank is written (with its traceback) and ends the process at once: its peer may be blocked
    in a collective, and a hung worker would hang the test instead of failing it.
    """
    import os
    import sys
    import traceback

    import torch.distributed as dist

    results: dict = {}
    path = Path(out_root, name)
    try:
        yield results
    except Exception:
        results["error"] = f"rank {rank}:\n{traceback.format_exc()}"
        print(results["error"], file=sys.stderr, flush=True)
        if rank == 0:
            path.write_text(json.dumps(results, indent=2))
        os._exit(1)
    if rank == 0:
        path.write_text(json.dumps(results, indent=2))
    dist.barrier()
    dist.destroy_process_group()


def edited_copy(src: str | Path, dst: str | Path, edit) -> Path:
    """A copy of a single-file HF checkpoint with ``edit(name, tensor) -> tensor`` applied to every tensor."""
    import shutil

    from safetensors.torch import load_file, save_file

    dst = Path(dst)
    shutil.copytree(src, dst)
    f = dst / "model.safetensors"
    save_file({n: edit(n, t).contiguous() for n, t in load_file(f).items()}, f, metadata={"format": "pt"})
    return dst
