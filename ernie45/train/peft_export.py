"""Export the LoRA adapters of a live (distributed) Megatron model as an HF **PEFT adapter** that
``peft.PeftModel.from_pretrained`` loads onto the transformers model.

Written: ``adapter_config.json`` (peft's own ``LoraConfig``) and ``adapter_model.safetensors`` with transformers'
*in-memory* module names under ``base_model.model.``. Megatron adapter -> peft modules (``{H}`` = ``model.`` for
text models, ``model.language_model.`` for VL):

* fused ``linear_qkv`` (one LoRA per part, ``lora.py``; ``B`` rows group-major ``[q×R, k, v]`` per KV group) ->
  ``{H}layers.L.self_attn.{q,k,v}_proj``, each with its part of ``A`` and its rows of ``B``. ``B`` is split with the
  bridge op that splits the weight (``FuseQKV``), shard by shard;
* SwiGLU ``linear_fc1`` (``B`` rows ``[gate_i; up_i]`` per TP shard) -> ``gate_proj`` (A_gate, B_gate) and
  ``up_proj`` (A_up, B_up), ``B`` split by ``ConcatGLU`` per shard like the weight; ``linear_proj`` / ``linear_fc2``
  -> ``o_proj`` / ``down_proj`` (A gathered over its input-dim shards);
* routed experts: transformers holds each pool as fused 3-D parameters (``experts.gate_up_proj [E, 2I, H]``,
  ``experts.down_proj [E, H, I]``), which peft reaches through ``target_parameters`` (``lora.ParamWrapper``): one
  rank-r LoRA per expert stacked on the rank axis. From peft 0.21's ``ParamWrapper.get_delta_weight``:
  ``lora_A [E·r, in]`` is expert-major (rows ``e·r … e·r+r-1`` are expert e's ``A``) while ``lora_B [out, r·E]`` is
  *rank*-major (column ``k·E + e`` is column k of expert e's ``B``). With both parameters of one experts module
  targeted peft nests the wrappers: ``gate_up_proj``'s pair under ``experts.base_layer.``, ``down_proj``'s under
  ``experts.``. VL: ``mlp.text_moe.experts`` and ``mlp.vision_moe.experts``;
* ViT: the transformers ViT's linears keep their names (``model.vision_tower.blocks.B.attn.qkv`` …); the Megatron
  ViT's ``linear_qkv`` rows (per head ``[q_h, k_h, v_h]``) are regrouped to HF's ``[Q | K | V]`` with the bridge's
  ``RegroupQKV``; resampler linears keep their names under ``model.resampler_model.``.

peft's ``ParamWrapper`` refuses ``lora_dropout != 0``; dropout only acts in training, so an adapter with expert
targets is written with ``lora_dropout = 0`` and a warning says so (:func:`peft_limitations`).

Legend: ``E`` experts per pool, ``r`` LoRA rank, ``I`` expert width, ``H`` hidden.
"""

from __future__ import annotations

import importlib.util
import math
import re
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch
import torch.distributed as dist

from ..config import ErnieConfig
from .lora import (
    DEFAULT_LORA_TARGETS,
    LORA_TARGET_GROUPS,
    LoraError,
    adapted_modules,
    check_targets,
    group_of,
    lora_parts,
    lora_target_weights,
)

__all__ = [
    "describe_lora",
    "export_peft_adapter",
    "describe_adapter_dir",
    "gather_adapters",
    "peft_tensors",
    "peft_limitations",
    "peft_module_names",
    "ExpertSlot",
]

# Megatron global module (language-model part, after the optional "language_model." prefix) -> transformers module
# suffixes under {H}layers.{L}., in the order the bridge op's to_hf returns the pieces of B
_LM_ROWS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("self_attention.linear_qkv", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
    ("self_attention.linear_proj", ("self_attn.o_proj",)),
    ("mlp.linear_fc1", ("mlp.gate_proj", "mlp.up_proj")),
    ("mlp.linear_fc2", ("mlp.down_proj",)),
    ("mlp.shared_experts.linear_fc1", ("mlp.shared_experts.gate_proj", "mlp.shared_experts.up_proj")),
    ("mlp.shared_experts.linear_fc2", ("mlp.shared_experts.down_proj",)),
)
_MG_VIT_ROWS = {
    "self_attention.linear_qkv": "attn.qkv",
    "self_attention.linear_proj": "attn.proj",
    "mlp.linear_fc1": "mlp.fc1",
    "mlp.linear_fc2": "mlp.fc2",
}
_LAYER_RE = re.compile(r"(?P<vl>language_model\.)?decoder\.layers\.(?P<L>\d+)\.(?P<rest>.+)")
_EXPERT_RE = re.compile(
    r"mlp\.(?:(?P<pool>text|vision)_moe_layer\.)?experts\.local_experts\.(?P<X>\d+)\.linear_fc(?P<fc>[12])"
)
_POOL_MODULE = {None: "mlp.experts", "text": "mlp.text_moe.experts", "vision": "mlp.vision_moe.experts"}
# peft 0.21 on transformers 5 rewrites a *text MoE* model's target_modules ending in gate_proj / up_proj / down_proj
# into the fused expert parameters (its v4 -> v5 adapter conversion, ``_convert_peft_config_moe``, keyed by
# model_type ernie4_5_moe), which would re-target dense MLP and shared-expert adapters at the routed experts with a
# doubled rank. Those linears are therefore named through target_parameters ("….gate_proj.weight"): a ParamWrapper
# over a 2-D weight is an ordinary LoRA (ΔW = B·A·α/r) with the same saved keys, and that path is not rewritten.
_REMAPPED_BY_PEFT = {"moe": ("gate_proj", "up_proj", "down_proj")}


@dataclass(frozen=True)
class ExpertSlot:
    """A routed expert's place in transformers' fused pool: its experts module, expert index, fc1 or fc2."""

    module: str
    expert: int
    fc: int


def peft_module_names(global_name: str) -> tuple[str, ...] | ExpertSlot:
    """transformers module names a Megatron adapter becomes (in the order of the weight op's HF pieces)."""
    m = _LAYER_RE.fullmatch(global_name)
    if m:
        H = f"model.language_model.layers.{m['L']}." if m["vl"] else f"model.layers.{m['L']}."
        e = _EXPERT_RE.fullmatch(m["rest"])
        if e:
            return ExpertSlot(H + _POOL_MODULE[e["pool"]], int(e["X"]), int(e["fc"]))
        for mg, hf in _LM_ROWS:
            if m["rest"] == mg:
                return tuple(H + h for h in hf)
    m = re.fullmatch(r"vision_model\.decoder\.layers\.(?P<B>\d+)\.(?P<rest>.+)", global_name)
    if m and m["rest"] in _MG_VIT_ROWS:
        return (f"model.vision_tower.blocks.{m['B']}.{_MG_VIT_ROWS[m['rest']]}",)
    m = re.fullmatch(r"vision_model\.(?P<rest>blocks\..+)", global_name)
    if m:
        return ("model.vision_tower." + m["rest"],)
    if global_name.startswith("resampler_model."):
        return ("model." + global_name,)
    raise LoraError(f"no PEFT module name for the adapter of {global_name}")


def peft_limitations(cfg: ErnieConfig, targets: Sequence[str], *, dropout: float) -> list[str]:
    """What the PEFT export changes or cannot express for these targets (empty: exact)."""
    notes = []
    wrapped = {"experts", "vision_experts"} | ({"mlp", "shared"} if cfg.family in _REMAPPED_BY_PEFT else set())
    if dropout > 0 and ({"experts", "vision_experts"} & set(targets)):
        notes.append("routed experts train without LoRA dropout (ernie45.train.lora), as peft's fused-expert LoRA")
    if dropout > 0 and (wrapped & set(targets)):
        notes.append(
            f"targets {sorted(wrapped & set(targets))} go through peft's target_parameters (ParamWrapper), which "
            f"refuses lora_dropout != 0: the adapter is written with lora_dropout=0 instead of {dropout} (dropout "
            f"only acts in training; inference is unchanged)"
        )
    return notes


def describe_lora(cfg: ErnieConfig, *, rank: int, targets: Sequence[str] = DEFAULT_LORA_TARGETS,
                  alpha: float | None = None, dropout: float = 0.0) -> str:  # fmt: skip
    """For ``--dry-run``: per target group the adapted linears, adapter and base parameters, and what the PEFT
    export (``--save-peft``) does with it."""
    targets = check_targets(cfg, targets)
    weights = lora_target_weights(cfg)
    settings = f"rank {rank}" + (f", alpha {alpha:g}" if alpha is not None else "") + f", dropout {dropout:g}"
    lines = [f"LoRA {settings}; "
             f"base weights frozen; one rank-r LoRA per transformers linear (fused q/k/v and gate/up hold one "
             f"per part); "
             f"A replicated for column-parallel bases, sharded on the input dim for row-parallel ones; B sharded "
             f"like a column-parallel weight"]  # fmt: skip
    total = base = 0
    for g in LORA_TARGET_GROUPS:
        shapes = [s for n, s in weights.items() if group_of(n) == g]
        if not shapes:
            continue
        n_ad = sum(rank * (o + len(lora_parts(n)) * i) for n, (o, i) in weights.items() if group_of(n) == g)
        n_base = sum(o * i for o, i in shapes)
        mark = "adapted" if g in targets else "not targeted"
        lines.append(f"  {g:15s} {mark:13s} {len(shapes):5d} linears  {n_ad:>14,} adapter params  "
                     f"(base {n_base:,})")  # fmt: skip
        if g in targets:
            total += n_ad
            base += n_base
    share = 100 * total / max(base, 1)
    lines.append(f"  trainable: {total:,} adapter parameters ({share:.3f}% of the adapted weights)")
    lines.append("  PEFT export (--save-peft): every target group is expressible as a peft adapter")
    lines += [f"    note: {n}" for n in peft_limitations(cfg, targets, dropout=dropout)]
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------------------------


def _ops_by_weight(cfg: ErnieConfig) -> dict:
    from ..bridge.plan import expand

    return {item.mg[0]: item.op for item in expand(cfg, tied=cfg.tie_word_embeddings) if len(item.mg) == 1}


def _local_records(chunks, ops: dict, getter) -> list:
    """[(global module, "A"|"B", shard index, shard count, dim, hf_blocks, hf pieces)] this rank exports: one
    replica of every piece (data-parallel rank 0; TP rank 0 for a piece replicated over TP)."""
    from .lora import _replica_rank

    records = []
    for chunk in chunks:
        for _, module in adapted_modules(chunk):
            ad = module.lora
            s = ad.sharding
            if _replica_rank(ad) != 0:
                continue
            op = ops[ad.global_name + ".weight"]
            for which, p in (("A", ad.A), ("B", ad.B)):
                dim = s.dim(which)
                if dim is None and s.index != 0:
                    continue
                t = getter(p).detach().clone()
                # B's rows follow the weight's rows: split them with the weight's own op, shard by shard
                pieces = op.to_hf((t,)) if which == "B" else (t,)
                blocks = op.hf_blocks if which == "B" else 1
                index, count = (0, 1) if dim is None else (s.index, s.count)
                records.append((ad.global_name, which, index, count, dim, blocks, tuple(pieces)))
    return records


def _assemble(all_records: list) -> dict[tuple[str, str], tuple[torch.Tensor, ...]]:
    """(module, "A"|"B") -> full HF pieces: block j of the full tensor = block j of every shard, in shard order."""
    shards: dict = defaultdict(dict)
    meta = {}
    for name, which, index, count, dim, blocks, pieces in all_records:
        if index in shards[(name, which)]:
            raise LoraError(f"{name}.lora.{which}: shard {index} exported twice (ranks disagree on replicas)")
        shards[(name, which)][index] = pieces
        meta[(name, which)] = (count, dim, blocks)
    out = {}
    for key, got in shards.items():
        count, dim, blocks = meta[key]
        if sorted(got) != list(range(count)):
            raise LoraError(f"{key[0]}.lora.{key[1]}: got shards {sorted(got)} of {count}")
        if count == 1:
            out[key] = got[0]
            continue
        full = []
        for j in range(len(got[0])):
            parts = [got[i][j] for i in range(count)]
            per_block = [torch.cat([p.chunk(blocks, dim)[b] for p in parts], dim) for b in range(blocks)]
            full.append(torch.cat(per_block, dim))
        out[key] = tuple(full)
    return out


def peft_tensors(full: dict, dtype: torch.dtype, family: str) -> tuple[dict[str, torch.Tensor], list[str], list[str]]:
    """(peft state dict, target_modules, target_parameters) from the assembled adapters."""
    tensors: dict[str, torch.Tensor] = {}
    modules, params = [], []
    experts: dict = defaultdict(dict)  # (experts module, fc) -> expert -> (A [r, in], B [out, r])
    for (name, which), _ in sorted(full.items()):
        if which != "A":
            continue
        (A,) = full[(name, "A")]
        B_pieces = full[(name, "B")]
        target = peft_module_names(name)
        if isinstance(target, ExpertSlot):
            # fc1: [B_gate; B_up], gate_up_proj's rows
            experts[(target.module, target.fc)][target.expert] = (A, torch.cat(B_pieces, dim=0))
            continue
        if len(lora_parts(name)) != len(target):
            raise LoraError(f"{name}: {len(lora_parts(name))} LoRA parts for {len(target)} transformers modules")
        # part p of A (q / k / v, gate / up) is that module's own A
        for hf_module, A_p, B in zip(target, A.chunk(len(target), dim=0), B_pieces, strict=True):
            tensors[f"base_model.model.{hf_module}.lora_A.weight"] = A_p
            tensors[f"base_model.model.{hf_module}.lora_B.weight"] = B
            if hf_module.rsplit(".", 1)[-1] in _REMAPPED_BY_PEFT.get(family, ()):
                params.append(hf_module + ".weight")  # same saved keys: one ParamWrapper per nn.Linear weight
            else:
                modules.append(hf_module)
    for (module, fc), by_expert in sorted(experts.items()):
        E = len(by_expert)
        if sorted(by_expert) != list(range(E)):
            raise LoraError(f"{module}: adapters of experts {sorted(by_expert)} only")
        A_ErI = torch.stack([by_expert[x][0] for x in range(E)])
        B_EOr = torch.stack([by_expert[x][1] for x in range(E)])
        lora_A = A_ErI.reshape(-1, A_ErI.shape[-1])  # [E·r, in], expert-major
        lora_B = B_EOr.permute(1, 2, 0).reshape(B_EOr.shape[1], -1)  # [out, r·E], column k·E + e
        # peft wraps gate_up_proj first (registration order), so down_proj's wrapper is the outer one
        prefix = f"base_model.model.{module}." + ("base_layer." if fc == 1 else "")
        tensors[prefix + "lora_A.weight"] = lora_A
        tensors[prefix + "lora_B.weight"] = lora_B
        params.append(f"{module}.{'gate_up_proj' if fc == 1 else 'down_proj'}")
    # clone: the parts of one A (q / k / v) are views of one tensor; safetensors wants each tensor its own storage
    return {k: v.to(dtype).clone() for k, v in tensors.items()}, sorted(modules), sorted(params)


def gather_adapters(chunks, cfg: ErnieConfig, *, getter=None) -> dict | None:
    """Every adapter as full tensors on rank 0 (None elsewhere; every rank must call): ``(global module, "A"|"B")``
    -> the HF pieces of that tensor (``B`` of a fused base split by the weight's op: q/k/v, gate/up), whatever the
    layout. ``getter`` picks what to gather from each adapter parameter (``lambda p: p.grad`` for gradients)."""
    records = _local_records(chunks, _ops_by_weight(cfg), getter or (lambda p: p))
    gathered: list | None = [None] * dist.get_world_size() if dist.get_rank() == 0 else None
    dist.gather_object(records, gathered, dst=0)
    if gathered is None:
        return None
    return _assemble([r for per_rank in gathered for r in per_rank])


def export_peft_adapter(chunks, cfg: ErnieConfig, layout, out_dir: str | Path, *, base_model: str,
                        dtype: torch.dtype | None = None, overwrite: bool = False) -> list[str]:  # fmt: skip
    """Write the adapters as a PEFT adapter directory (rank 0 writes; every rank must call). Returns the warnings
    (what the export changed, :func:`peft_limitations`), the same on every rank.

    ``dtype``: of the written tensors (default: the adapters' own dtype)."""
    if importlib.util.find_spec("peft") is None:  # checked on every rank, before any collective
        raise LoraError("the PEFT adapter export needs peft: pip install 'ernie45[peft]'")
    settings = sorted({(m.lora.rank, m.lora.alpha, m.lora.run_dropout, str(m.lora.A.dtype),
                        group_of(n)) for c in chunks for n, m in adapted_modules(c)})  # fmt: skip
    world = dist.get_world_size()
    gathered_settings: list = [None] * world
    dist.all_gather_object(gathered_settings, settings)
    settings = sorted({s for per_rank in gathered_settings for s in per_rank})
    if not settings:
        raise LoraError("the model has no LoRA adapters to export")
    if len({s[:4] for s in settings}) != 1:
        differ = sorted({s[:4] for s in settings})
        raise LoraError(f"adapters differ in rank / alpha / dropout / dtype across the model: {differ}")
    rank, alpha, dropout, dtype_name = settings[0][:4]
    targets = sorted({s[4] for s in settings})
    warnings = peft_limitations(cfg, targets, dropout=dropout)
    full = gather_adapters(chunks, cfg)
    if full is None:  # not rank 0
        return warnings

    from peft import LoraConfig
    from safetensors.torch import save_file

    from ..bridge.io import atomic_output

    out_dtype = dtype or getattr(torch, dtype_name.removeprefix("torch."))
    tensors, modules, params = peft_tensors(full, out_dtype, cfg.family)
    wrapped = bool(params)  # ParamWrapper refuses dropout (peft_limitations)
    config = LoraConfig(
        r=rank,
        lora_alpha=alpha,
        lora_dropout=0.0 if wrapped else dropout,
        target_modules=modules or None,
        target_parameters=params or None,
        base_model_name_or_path=base_model,
        task_type="CAUSAL_LM" if cfg.family != "vl" else None,
        bias="none",
    )
    with atomic_output(out_dir, overwrite=overwrite) as tmp:
        save_file(tensors, tmp / "adapter_model.safetensors", metadata={"format": "pt"})
        config.save_pretrained(str(tmp))
    return warnings


# ----------------------------------------------------------------------------------------------------------------------
# reading one back (for ``ernie45 inspect``)


def describe_adapter_dir(path: str | Path) -> dict:
    """What a PEFT LoRA adapter directory holds, from ``adapter_config.json`` and the safetensors header alone
    (no tensor is read, nothing is unpickled). Bad input raises ``CheckpointError`` naming the file."""
    import json

    from safetensors import SafetensorError, safe_open

    from ..bridge.io import CheckpointError

    path = Path(path)
    cfg_file, weights = path / "adapter_config.json", path / "adapter_model.safetensors"
    try:
        config = json.loads(cfg_file.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{cfg_file}: not a readable adapter config ({e})") from None
    if not isinstance(config, dict) or config.get("peft_type") != "LORA":
        raise CheckpointError(f"{cfg_file}: not a LoRA adapter config (peft_type {config.get('peft_type')!r})"
                              if isinstance(config, dict) else f"{cfg_file}: not a JSON object")  # fmt: skip
    if not weights.is_file():
        raise CheckpointError(f"{weights}: missing (a PEFT adapter directory holds adapter_model.safetensors)")
    try:
        with safe_open(str(weights), "pt") as f:
            shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
            dtypes = sorted({f.get_slice(k).get_dtype() for k in f.keys()})
    except (OSError, SafetensorError) as e:
        raise CheckpointError(f"{weights}: not a readable safetensors file ({e})") from None
    n_params = sum(math.prod(s) for s in shapes.values())
    return {
        "format": "peft lora adapter",
        "base model": config.get("base_model_name_or_path"),
        "rank": config.get("r"),
        "alpha": config.get("lora_alpha"),
        "dropout": config.get("lora_dropout"),
        "target modules": len(config.get("target_modules") or []),
        "target parameters": len(config.get("target_parameters") or []),
        "tensors": len(shapes),
        "adapter parameters": n_params,
        "dtypes": dtypes,
        "size on disk": f"{weights.stat().st_size / 2**20:.2f} MiB",
    }
