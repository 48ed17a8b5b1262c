"""The reference: real transformers, with its routers' choices recorded (parity tests, ``ernie45 parity``)."""

from __future__ import annotations

import contextlib

import torch


@contextlib.contextmanager
def hf_routing(model):
    """Record every HF router's chosen experts as a bool map ``[B·S, E]`` keyed by layer index."""
    maps: dict[int, torch.Tensor] = {}
    handles = []
    for name, mod in model.named_modules():
        # the text-MoE router class; VL routers are recorded by the VL tests
        if type(mod).__name__ == "Ernie4_5_MoeTopKRouter":
            layer = int(name.split("layers.")[1].split(".")[0])

            def hook(_m, _inp, out, layer=layer, E=mod.num_experts):
                _logits, _weights, idx_TK = out
                maps[layer] = torch.zeros(idx_TK.shape[0], E, dtype=torch.bool).scatter(1, idx_TK, True)

            handles.append(mod.register_forward_hook(hook))
    try:
        yield maps
    finally:
        for h in handles:
            h.remove()


def load_reference(path):
    """The transformers model of an HF directory, fp32, eager attention and experts (the golden path)."""
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="eager")
    if hasattr(model, "set_experts_implementation"):
        model.set_experts_implementation("eager")
    return model.eval()


def megatron_map_to_hf_order(map_SB_E: torch.Tensor, B: int, S: int) -> torch.Tensor:
    """Megatron routes tokens in [S, B] order, HF in [B, S] order."""
    return map_SB_E.view(S, B, -1).transpose(0, 1).reshape(B * S, -1)
