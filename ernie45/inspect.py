"""``ernie45 inspect``: what a checkpoint is, at a glance."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

from .bridge.plan import parameter_counts
from .bridge.source import detect_format, open_source
from .bridge.torch_dist import inspect_torch_dist

__all__ = ["inspect_path", "model_facts"]


def _human(n: float) -> str:
    for unit in ("", "K", "M", "B", "T"):
        if abs(n) < 1000:
            return f"{n:.1f}{unit}" if unit else str(int(n))
        n /= 1000
    return f"{n:.1f}P"


def model_facts(cfg, *, tied: bool) -> dict:
    """The config-derived lines every format's report shares (HF and torch_dist)."""
    total, active = parameter_counts(cfg)
    info = {
        "family": cfg.family,
        "model_type": cfg.model_type,
        "layers": f"{cfg.num_hidden_layers} ({''.join('S' if t == 'sparse' else 'D' for t in cfg.mlp_layer_types)})",
        "hidden / heads / kv": f"{cfg.hidden_size} / {cfg.num_attention_heads} / {cfg.num_key_value_heads} (head_dim {cfg.head_dim})",
        "vocab": cfg.vocab_size,
        "rope theta": cfg.rope_theta,
        "tied head": tied,
        "parameters": f"{_human(total)} total, {_human(active)} active per token",
    }
    if cfg.is_moe:
        info["experts"] = (
            f"{cfg.moe_num_experts} per pool × {cfg.num_pools} pool(s), top-{cfg.moe_k}, widths "
            f"{list(cfg.moe_intermediate_size)}, shared {cfg.moe_num_shared_experts}×{cfg.moe_intermediate_size[0]}"
        )
    if cfg.vision is not None:
        v = cfg.vision
        info["vision"] = (f"ViT {v.depth} blocks × {v.hidden_size} wide, {v.num_heads} heads, patch {v.patch_size}, "
                          f"merge {v.spatial_merge_size}×{v.spatial_merge_size}")  # fmt: skip
    return info


def gguf_summary(path: str | Path) -> dict:
    """``ernie45 inspect`` of a GGUF: the model as llama.cpp will see it (the full dump: ``bridge.gguf.describe_gguf``)."""
    from .bridge.gguf import describe_gguf, open_gguf

    open_gguf(path)  # header, checksum and shapes checked: a bad file is an error, not a summary
    d = describe_gguf(path)
    meta = d["metadata"]
    arch = meta.get("general.architecture", "?")

    def m(key: str):
        return meta.get(f"{arch}.{key}")

    layers, lead = m("block_count"), m("leading_dense_block_count")
    heads, kv, hd = m("attention.head_count"), m("attention.head_count_kv"), m("attention.key_length")
    info = {
        "format": "gguf (llama.cpp)",
        "architecture": arch,
        "layers": f"{layers}" if lead is None else f"{layers} ({'D' * lead}{'S' * (layers - lead)})",
        "hidden / heads / kv": f"{m('embedding_length')} / {heads} / {kv} (head_dim {hd})",
        "rope theta": m("rope.freq_base"),
        "context length": m("context_length"),
    }
    if m("expert_count"):
        info["experts"] = (f"{m('expert_count')}, top-{m('expert_used_count')}, width {m('expert_feed_forward_length')}, "
                           f"shared {m('expert_shared_count')} (width {m('expert_shared_feed_forward_length')})")  # fmt: skip
    tokens = meta.get("tokenizer.ggml.tokens")
    info["tokenizer"] = (f"{meta.get('tokenizer.ggml.model')} ({tokens['len']} tokens)" if tokens
                         else "none (token ids only)")  # fmt: skip
    info["tensors"] = len(d["tensors"])
    info["tensor types"] = dict(Counter(t["type"] for t in d["tensors"]))
    info["size on disk"] = f"{Path(path).stat().st_size / 2**20:.1f} MiB"
    info["checksum"] = d["checksum"]
    return info


def inspect_path(path: str | Path) -> dict:
    fmt = detect_format(path)
    if fmt == "gguf":  # the file as llama.cpp sees it, also one that is no ERNIE (no HF-named source)
        return gguf_summary(path)
    if fmt == "peft":
        from .train.peft_export import describe_adapter_dir

        return describe_adapter_dir(path)
    source = open_source(path)
    cfg = source.cfg
    if source.format == "megatron":
        out = {"format": "megatron-core torch_dist", **model_facts(cfg, tied=source.tied)}
        if cfg.family == "vl":
            out["vision"] += f"; {'Megatron-Core (TP-sharded)' if cfg.vit_impl == 'megatron' else 'transformers'} ViT"
        out.update(inspect_torch_dist(source))
        return out
    dtypes = Counter(source.storage_type(n) for n in source.keys())
    unusual = []
    if cfg.tie_word_embeddings and not source.tied:
        unusual.append("config says tied but lm_head.weight is stored: loaded untied (as transformers does)")
    info = {"format": "hf safetensors", **model_facts(cfg, tied=source.tied)}
    info.update({
        "tensors": len(source.keys()),
        "dtypes": dict(dtypes),
        "size on disk": f"{sum(f.stat().st_size for f in Path(path).glob('*.safetensors')) / 2**20:.1f} MiB",
        "mtp tensors": sum(1 for n in source.carried if "mtp" in n),
        "checksums": (f"ok ({source.checksums.check_all()} files match what ernie45 recorded)" if source.checksums
                      else "none recorded (not written by ernie45)"),
        "unusual": unusual or "nothing",
    })  # fmt: skip
    return info
