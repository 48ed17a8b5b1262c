"""Body of the 2-process KV-cache test (``torch.multiprocessing.spawn`` from ``test_inference.py``).

For each case, both ranks build the model at a TP / EP layout, load the HF checkpoint through the bridge and run the
same decoding: teacher-forced logits through the cache, and greedy generation, once unsharded (the reference, each
rank on the whole batch) and once at the layout. TP ranks share their prompts; under EP2 (data parallel 2) each rank
decodes its own prompt -- different tokens meet in every MoE dispatch -- and the rows are gathered afterwards. Rank 0
writes both as safetensors for the parent test to compare.
"""

from __future__ import annotations

import dataclasses
import os
import traceback
from pathlib import Path

import torch
import torch.distributed as dist

# case -> (family key of the parent's checkpoints, layout, Megatron ViT?)
CASES = {
    "dense-TP2": ("dense", dict(tp=2), False),
    "moe-TP2": ("moe", dict(tp=2), False),
    "moe-EP2": ("moe", dict(ep=2), False),
    "moe-TP2xEP2": ("moe", dict(tp=2, ep=2, etp=1), False),
    "vl-TP2xEP2-mgvit": ("vl", dict(tp=2, ep=2, etp=1), True),
}


def run_case(
    family: str, path: str, layout, *, mg_vit: bool, inputs: dict, whole_batch: bool = False
) -> dict[str, torch.Tensor]:
    """Teacher-forced logits and greedy tokens of one model at ``layout`` (process groups initialised here), for
    the whole batch: under data parallel each rank decodes its rows, gathered in row order."""
    from megatron.core import parallel_state as ps

    from dist_worker import data_parallel_rows
    from ernie45.bridge.live import load_hf
    from ernie45.config import load_config
    from ernie45.megatron import parallel
    from ernie45.megatron.inference import generate, teacher_forced_logits
    from ernie45.megatron.model import build_model
    from ernie45.megatron.vl_model import build_vl_model

    parallel.initialize(layout)
    try:
        cfg = load_config(path)
        if mg_vit:
            cfg = dataclasses.replace(cfg, vit_impl="megatron")
        build = build_vl_model if family == "vl" else build_model
        chunks = build(cfg, layout)
        load_hf(chunks, cfg, layout, path)
        for c in chunks:
            c.eval()
        ids, mask, prompt_len = inputs["ids"], inputs.get("attention_mask"), int(inputs["prompt_len"])
        mm = {k: v for k, v in inputs.items() if k not in ("ids", "attention_mask", "prompt_len")}
        dp = 1 if whole_batch else ps.get_data_parallel_world_size()
        if dp > 1:
            if mm:
                raise ValueError("splitting VL inputs over data parallel is not implemented in this worker")
            rows = data_parallel_rows(ids.shape[0])
            ids, mask = ids[rows], None if mask is None else mask[rows]
        with torch.no_grad():
            logits = teacher_forced_logits(chunks, cfg, ids, prompt_len, attention_mask=mask, **mm)
            tokens = generate(chunks, cfg, ids[:, :prompt_len], 6,
                              attention_mask=None if mask is None else mask[:, :prompt_len], **mm)  # fmt: skip
        out = {"logits": logits.contiguous(), "tokens": tokens.contiguous()}
        if dp > 1:  # every rank's rows, in data-parallel rank order
            group = ps.get_data_parallel_group()
            for k, t in out.items():
                parts = [torch.empty_like(t) for _ in range(dp)]
                dist.all_gather(parts, t, group=group)
                out[k] = torch.cat(parts)
        return out
    finally:
        parallel.destroy()


def worker(rank: int, port: int, paths: dict[str, str], out_root: str) -> None:
    from safetensors.torch import load_file, save_file

    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(port)
    dist.init_process_group("gloo", rank=rank, world_size=2)
    from ernie45.layout import Layout

    try:
        for name, (family, kw, mg_vit) in CASES.items():
            inputs = load_file(str(Path(out_root) / f"inputs-{family}.safetensors"))
            # the reference: the same model unsharded (TP1; the two ranks are data-parallel replicas)
            for suffix, layout in (("-ref", Layout()), ("", Layout(**kw))):
                whole = suffix == "-ref"
                result = run_case(family, paths[family], layout, mg_vit=mg_vit, inputs=inputs, whole_batch=whole)
                if rank == 0:
                    save_file(result, str(Path(out_root) / f"{name}{suffix}.safetensors"))
    except Exception:
        if rank == 0:
            (Path(out_root) / "error.txt").write_text(f"rank {rank}:\n{traceback.format_exc()}")
        raise
    dist.destroy_process_group()
