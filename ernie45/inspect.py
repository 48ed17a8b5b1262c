"""``ernie45 inspect``: what a checkpoint is, at a glance."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

from .bridge.io import HFCheckpoint
from .bridge.plan import plan_from_hf
from .config import load_config

__all__ = ["detect_format", "inspect_path"]


def detect_format(path: str | Path) -> str:
    """'hf' (config.json + safetensors), 'megatron' (torch_dist), or 'gguf'."""
    path = Path(path)
    if path.is_file():
        with open(path, "rb") as f:
            if f.read(4) == b"GGUF":
                return "gguf"
        raise ValueError(f"{path}: not a GGUF file and not a checkpoint directory")
    if (path / "metadata.json").is_file() and (path / ".metadata").is_file():
        return "megatron"
    if (path / "config.json").is_file():
        return "hf"
    raise ValueError(f"{path}: not an HF directory (config.json), a Megatron torch_dist directory or a GGUF file")


def _human(n: float) -> str:
    for unit in ("", "K", "M", "B", "T"):
        if abs(n) < 1000:
            return f"{n:.1f}{unit}" if unit else str(int(n))
        n /= 1000
    return f"{n:.1f}P"


def inspect_path(path: str | Path) -> dict:
    fmt = detect_format(path)
    if fmt != "hf":
        from .convert import inspect_other

        return inspect_other(path, fmt)
    cfg = load_config(path)
    ckpt = HFCheckpoint(path)
    plan = plan_from_hf(cfg, ckpt.shapes(), where=str(path))
    total, active = cfg.parameter_counts()
    dtypes = Counter(str(ckpt.dtype(n)).replace("torch.", "") for n in ckpt.keys())
    unusual = []
    if cfg.tie_word_embeddings and not plan.tied:
        unusual.append("config says tied but lm_head.weight is stored: loaded untied (as transformers does)")
    info = {
        "format": "hf safetensors",
        "family": cfg.family,
        "model_type": cfg.hf_config.get("model_type"),
        "layers": f"{cfg.num_hidden_layers} ({''.join('S' if t == 'sparse' else 'D' for t in cfg.mlp_layer_types)})",
        "hidden / heads / kv": f"{cfg.hidden_size} / {cfg.num_attention_heads} / {cfg.num_key_value_heads} (head_dim {cfg.head_dim})",
        "vocab": cfg.vocab_size,
        "rope theta": cfg.rope_theta,
        "tied head": plan.tied,
        "parameters": f"{_human(total)} total, {_human(active)} active per token",
        "tensors": len(ckpt.keys()),
        "dtypes": dict(dtypes),
        "size on disk": f"{sum(f.stat().st_size for f in Path(path).glob('*.safetensors')) / 2**20:.1f} MiB",
        "mtp tensors": sum(1 for n, _ in plan.ignored if "mtp" in n),
    }
    if cfg.is_moe:
        info["experts"] = (
            f"{cfg.moe_num_experts} per pool × {cfg.num_pools} pool(s), top-{cfg.moe_k}, widths "
            f"{list(cfg.moe_intermediate_size)}, shared {cfg.moe_num_shared_experts}×{cfg.moe_intermediate_size[0]}"
        )
    info["unusual"] = unusual or "nothing"
    return info
