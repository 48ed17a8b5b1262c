"""Training tests' shared pieces: tiny data, the independent transformers + torch.optim.AdamW oracle, comparisons,
and the body of the 2-process gloo runs (``torch.multiprocessing.spawn`` from ``test_train.py``).

The oracle knows nothing of ernie45's trainer: it loads the HF directory with transformers, builds AdamW parameter
groups (decay on matrices, none on 1-D tensors), writes Megatron's LR schedule formula out by hand, sums each
sample's masked cross-entropy over the global batch and divides by the batch's target-token count, clips with
``clip_grad_norm_``. Weights and gradients are compared in HF's on-disk names (transformers' own
``save_pretrained`` converts its in-memory layout).
"""

from __future__ import annotations

import copy
import json
import math
import os
import random
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F

from ernie45.testing import worker_results

# ----------------------------------------------------------------------------------------------------------------------
# data


def write_pretokenized(path: Path, n: int, *, vocab: int, lengths=(6, 14), seed: int = 0) -> list[dict]:
    """``n`` pre-tokenized samples (``input_ids`` + ``loss_mask``: a 2-4 token prompt without loss)."""
    rng = random.Random(seed)
    recs = []
    for _ in range(n):
        L = rng.randint(*lengths)
        prompt = rng.randint(2, 4)
        recs.append({"input_ids": [rng.randrange(1, vocab) for _ in range(L)], "loss_mask": [0] * prompt + [1] * (L - prompt)})
    path.write_text("".join(json.dumps(r) + "\n" for r in recs))
    return recs


def hf_sample(rec: dict) -> dict:
    """A pre-tokenized record as an HF-style sample: ``labels`` = ids where the token is a target, else -100."""
    ids = torch.tensor(rec["input_ids"])
    target = torch.tensor(rec["loss_mask"]).bool()
    return {"input_ids": ids, "labels": ids.masked_fill(~target, -100)}


def vl_samples(cfg, n: int, *, seed: int = 0) -> list[dict]:
    """``n`` VL samples (text, image of 1×4×4 patches, text) with HF-style labels (image tokens never targets)."""
    from vl_helpers import make_batch

    out = []
    for i in range(n):
        rng = random.Random(seed + i)
        parts = [("text", rng.randint(3, 5)), ("image", (1, 4, 4)), ("text", rng.randint(3, 6))]
        b = make_batch(cfg, [parts], seed=seed + i)
        ids = b["input_ids"][0]
        labels = ids.masked_fill(b["moe_mm_token_type_ids"][0] > 0, -100)
        labels[:2] = -100
        out.append(dict(input_ids=ids, labels=labels, mm_token_type_ids=b["mm_token_type_ids"][0],
                        moe_mm_token_type_ids=b["moe_mm_token_type_ids"][0], pixel_values=b["pixel_values"],
                        image_grid_thw=b["image_grid_thw"]))  # fmt: skip
    return out


class SampleRows:
    """Rows for the trainer from in-memory samples: row ``i`` = sample ``i mod N`` alone, padded to ``seq_length``
    by the production ``packing.pack`` (what ``--no-pack --no-shuffle`` means). Used for VL samples with pixels,
    which a JSONL file does not carry."""

    def __init__(self, samples, cfg, seq_length: int) -> None:
        self.samples, self.cfg, self.seq_length = samples, cfg, seq_length
        self.stats = {"samples": len(samples)}

    def row(self, index: int):
        from ernie45.megatron.packing import pack

        return pack([self.samples[index % len(self.samples)]], self.cfg, pad_to_multiple_of=self.seq_length)

    def eval_batches(self):
        return []

    def describe(self) -> str:
        return f"{len(self.samples)} in-memory samples"


# ----------------------------------------------------------------------------------------------------------------------
# the oracle


def lr_at(step: int, *, lr: float, min_lr: float, warmup: int, total: int, schedule: str) -> float:
    """The learning rate of optimizer step ``step`` (0-based), Megatron's formula written out independently:
    linear warmup from 0 over ``warmup`` steps, then constant / linear / cosine decay to ``min_lr`` at ``total``."""
    if warmup and step <= warmup:
        return lr * step / warmup
    if schedule == "constant":
        return lr
    progress = (step - warmup) / (total - warmup)
    coeff = 1 - progress if schedule == "linear" else 0.5 * (1 + math.cos(math.pi * progress))
    return min_lr + coeff * (lr - min_lr)


def _hf_forward_loss(model, sample: dict) -> tuple[torch.Tensor, int]:
    """Sum of the token cross-entropies of one sample run alone, and its target count."""
    kw = {k: (v if k in ("pixel_values", "image_grid_thw") else v[None]) for k, v in sample.items() if k != "labels"}
    logits = model(**kw).logits[0].float()
    targets = sample["labels"][1:]
    loss = F.cross_entropy(logits[:-1], targets, ignore_index=-100, reduction="sum")
    return loss, int((targets != -100).sum())


def reference_training(hf_dir, samples, *, steps, global_batch, lr, min_lr=0.0, warmup=0, schedule="constant",
                       weight_decay=0.0, betas=(0.9, 0.999), eps=1e-4, clip=1.0, lr_mults=None, grads_at=(),
                       out_dir=None):  # fmt: skip
    """transformers + torch.optim.AdamW over ``samples`` (step s takes samples ``s·G .. s·G+G-1`` mod N).

    Returns dict(losses, grad_norms, grads={step: on-disk-named clipped grads}, weights=on-disk tensors).
    ``lr_mults``: {in-memory name prefix: multiplier} for the VL ViT / resampler groups.
    """
    import transformers

    cfg_json = json.loads((Path(hf_dir) / "config.json").read_text())
    cls = {"ernie4_5": transformers.Ernie4_5ForCausalLM, "ernie4_5_moe": transformers.Ernie4_5_MoeForCausalLM,
           "ernie4_5_vl_moe": transformers.Ernie4_5_VLMoeForConditionalGeneration}[cfg_json["model_type"]]  # fmt: skip
    model = cls.from_pretrained(hf_dir, dtype=torch.float32, attn_implementation="eager")
    if hasattr(model, "set_experts_implementation"):
        model.set_experts_implementation("eager")
    model.train()
    lr_mults = lr_mults or {}
    groups: dict[tuple[float, float], list] = {}
    for name, p in model.named_parameters():
        mult = next((m for prefix, m in lr_mults.items() if name.startswith(prefix)), 1.0)
        wd = weight_decay if p.dim() >= 2 else 0.0  # no decay on norms and biases
        groups.setdefault((mult, wd), []).append(p)
    param_groups = [dict(params=ps, weight_decay=wd, mult=m) for (m, wd), ps in groups.items()]
    opt = torch.optim.AdamW(param_groups, lr=lr, betas=betas, eps=eps)
    out = dict(grads={})

    def after_clip(step):
        if step in grads_at:
            out["grads"][step] = _on_disk(model, Path(out_dir) / f"grads-{step}", lambda p: p.grad)

    out["losses"], out["grad_norms"] = adamw_steps(
        model, opt, samples, steps=steps, global_batch=global_batch, clip=clip, after_clip=after_clip,
        lr_of=lambda s, g: lr_at(s, lr=lr * g["mult"], min_lr=min_lr * g["mult"], warmup=warmup, total=steps,
                                 schedule=schedule),
    )  # fmt: skip
    out["weights"] = _on_disk(model, Path(out_dir) / "weights", lambda p: p.detach())
    return out


def adamw_steps(model, opt, samples, *, steps, global_batch, lr_of, clip, after_clip=None):
    """The oracle's step loop: step ``s`` takes samples ``s·G .. s·G+G-1`` (mod N), sums each sample's token loss
    over the global batch's target count (transformers' causal-LM loss on the whole batch), clips the global grad
    norm of the trainable parameters, then ``opt.step()``. ``lr_of(s, group)`` sets each group's LR;
    ``after_clip(step)`` (1-based) sees the clipped grads. Returns (losses, grad norms before clipping)."""
    params = [p for p in model.parameters() if p.requires_grad]
    losses, norms, N = [], [], len(samples)
    for s in range(steps):
        for g in opt.param_groups:
            g["lr"] = lr_of(s, g)
        batch = [samples[(s * global_batch + j) % N] for j in range(global_batch)]
        total_targets = sum(int((b["labels"][1:] != -100).sum()) for b in batch)
        opt.zero_grad()
        loss_sum = 0.0
        for sample in batch:
            loss, _ = _hf_forward_loss(model, sample)
            (loss / total_targets).backward()
            loss_sum += loss.item()
        norms.append(float(torch.nn.utils.clip_grad_norm_(params, clip)))
        losses.append(loss_sum / total_targets)
        if after_clip is not None:
            after_clip(s + 1)
        opt.step()
    return losses, norms


def _on_disk(model, path: Path, pick) -> dict[str, torch.Tensor]:
    """``pick(param)`` for every parameter, in HF's on-disk names (through transformers' own save_pretrained)."""
    from safetensors.torch import load_file

    twin = copy.deepcopy(model)
    with torch.no_grad():
        for (_, p), (_, q) in zip(model.named_parameters(), twin.named_parameters()):
            v = pick(p)
            q.data = torch.zeros_like(p) if v is None else v.detach().clone()
    twin.save_pretrained(path)
    out = {}
    for f in sorted(path.glob("*.safetensors")):
        out.update(load_file(f))
    return out


def read_hf_dir(path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    out = {}
    for f in sorted(Path(path).glob("*.safetensors")):
        out.update(load_file(f))
    return out


def worst_relative(a: dict, b: dict, names=None) -> tuple[float, str]:
    """max over tensors of max|a-b| / max|b| (and the worst tensor's name); every name must be in both."""
    names = sorted(b) if names is None else names
    worst, where = 0.0, ""
    for n in names:
        x, y = a[n].double(), b[n].double()
        if x.shape != y.shape:
            raise AssertionError(f"{n}: shapes {tuple(x.shape)} vs {tuple(y.shape)}")
        rel = (x - y).abs().max().item() / max(y.abs().max().item(), 1e-30)
        if rel > worst:
            worst, where = rel, n
    return worst, where


def bit_equal(a: dict, b: dict) -> list[str]:
    """Names whose dtype, shape or bytes differ."""
    assert sorted(a) == sorted(b)
    return [n for n in sorted(a) if a[n].dtype != b[n].dtype or a[n].shape != b[n].shape or not torch.equal(a[n], b[n])]


# ----------------------------------------------------------------------------------------------------------------------
# 2-process runs

# name: (checkpoint key, TrainConfig overrides)
LAYOUTS = {
    "TP2": ("dense-odd", dict(tp=2)),  # vocab 161 padded to 162: the padded logit must not enter the loss
    "SP": ("dense-odd", dict(tp=2, sequence_parallel=True)),
    "PP2": ("dense", dict(pp=2)),  # 4 micro-batches through the 1F1B schedule
    # the interleaved schedule with more micro-batches (4) than stages: forward and backward messages cross
    "PP2xVPP2": ("dense", dict(pp=2, vpp=2)),
    "DP2": ("dense", dict()),  # different rows on each rank
    "EP2": ("moe", dict(ep=2)),
    "TP2xEP2": ("moe", dict(tp=2, ep=2, etp=1)),
}


def worker(rank: int, port: int, jobs: list[dict], out_root: str) -> None:
    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(port)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=2)
    import warnings

    warnings.filterwarnings("ignore")
    from ernie45.train.config import TrainConfig
    from ernie45.train.trainer import train

    with worker_results(rank, out_root) as results:
        for job in jobs:
            res = train(TrainConfig.from_mapping(job["config"]))
            results[job["name"]] = dict(losses=res.losses, grad_norms=res.grad_norms)
