"""``train(config)``: ERNIE 4.5 (dense, MoE, VL) trained on Megatron-Core's own machinery.

What comes from Megatron-Core (nothing here re-implements it):

* ``DistributedDataParallel`` with ``grad_reduce_in_fp32`` (grads accumulated and reduced in fp32) and its
  ``finalize_model_grads`` (DP reduction, sequence-parallel norm grads over TP, tied embeddings over PP, the
  aux-loss-free expert-bias update, and the per-token normalisation);
* ``get_megatron_optimizer`` (Adam = torch AdamW, decoupled weight decay; the standard parameter groups: no decay on
  1-D parameters -- norms -- and biases; separate dense and expert optimizers chained under one global-norm clip,
  replicas counted once) and ``OptimizerParamScheduler`` (constant / linear / cosine, linear warmup from 0);
* ``get_forward_backward_func`` with ``calculate_per_token_loss``: each micro-batch returns the *sum* of its masked
  token losses and its loss-token count, the schedule sums the counts, and ``finalize_model_grads`` divides the
  gradients by the global batch's loss-token count (summed over DP). The step minimises
  ``sum(token losses) / sum(loss tokens)`` over the whole global batch, exactly transformers' causal-LM loss on that
  batch. Micro-batches of different lengths/token counts are therefore weighted correctly.

ERNIE-specific choices: routers compute in fp32 (``moe_router_dtype``); the expert bias is a buffer, frozen unless
``expert_bias_update_rate`` > 0 (then Megatron's sign update per router, i.e. per pool, from the global batch's
measured load). ``aux_loss_coeff`` = ``c`` > 0 adds transformers' load-balancing loss (text MoE, tp = pp = 1;
``ernie45.megatron.router.PooledAuxLoss``: pooled over every MoE layer of one forward, unbiased top-k, padding
excluded). The rule: each micro-batch ``m`` (on any DP rank) is one transformers forward of its rows, and the step
minimises ``sum_m [ CE_sum(m) + c · n(m) · aux(m) ] / N`` with ``n(m)`` the loss tokens of ``m`` and ``N`` the global
batch's -- i.e. each micro-batch's transformers loss ``CE_mean(m) + c · aux(m)`` weighted by its share of the loss
tokens (one micro-batch of the whole batch: exactly transformers' ``loss``). The aux gradient enters through the
routers (scaled by ``n(m)``, divided by ``N`` with the LM gradients in ``finalize_model_grads``); the loss the trainer
reports stays the LM loss. A vocabulary padded to a multiple of TP gets ``-inf`` logits on
the padded rows before the cross-entropy, so the loss is transformers' over the real vocabulary.

Data: rows from ``ernie45.train.data`` (``TrainData.row(i)`` is a pure function of the index, so the checkpointed
row count is the whole data position); step ``s`` uses rows ``[s·G, (s+1)·G)``, DP rank ``r`` a contiguous slice.

Legend: ``B`` micro-batch rows, ``S`` sequence, ``V`` (padded) vocab on this TP rank.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import time
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist

from ..config import ErnieConfig
from .config import Resolved, TrainConfig, TrainConfigError, config_from_args, dump_yaml, dry_run_text

__all__ = ["train", "TrainResult", "open_model_source"]


@dataclass
class TrainResult:
    """What a run did (every rank returns the same numbers)."""

    run_dir: Path
    rank: int = 0  # this process's rank in the run's world
    steps: int = 0
    losses: list[float] = field(default_factory=list)  # per step run in this process (resumed runs: from there)
    grad_norms: list[float] = field(default_factory=list)  # before clipping
    lrs: list[float] = field(default_factory=list)
    eval_losses: dict[int, float] = field(default_factory=dict)
    start_step: int = 0
    dry_run_text: str | None = None


# ------------------------------------------------------------------------------------------------------------------
# set-up


def _init_distributed() -> bool:
    """torch.distributed from torchrun's environment, or a 1-process group of our own. True if we created it."""
    if dist.is_initialized():
        return False
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend)
        return True
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    # a world of one: nobody else connects, so any free port will do (and the environment stays untouched)
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    return True


def _world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else int(os.environ.get("WORLD_SIZE", "1"))


@dataclass(frozen=True)
class ModelSource:
    """The checkpoint a run starts from: HF safetensors or torch_dist, with the facts the build needs."""

    path: Path
    format: str  # "hf" | "megatron"
    cfg: ErnieConfig
    tied: bool
    shapes: dict  # HF-named shapes (dry-run parameter counts)
    tokenizer_dir: Path | None  # where the tokenizer / processor files are (chat data, --save-hf)
    side_files: tuple[Path, ...]  # the tokenizer / processor / generation files to carry into --save-hf


def open_model_source(config: TrainConfig) -> ModelSource:
    from ..bridge.source import open_source

    path = Path(config.model)
    src = open_source(path, hf_config=config.hf_config)
    fmt = src.format
    if fmt == "gguf":
        raise TrainConfigError(f"--model {path}: a {fmt} file cannot be trained; give an HF or torch_dist directory")
    cfg, tied, shapes, side = src.cfg, src.tied, src.shapes(), tuple(src.side_files())
    if cfg.family == "vl" and config.vit is not None:
        if fmt == "megatron" and config.vit != cfg.vit_impl:
            raise TrainConfigError(f"--model {path} holds the {cfg.vit_impl!r} ViT; --vit {config.vit} needs an HF source")
        cfg = dataclasses.replace(cfg, vit_impl=config.vit)
    if config.aux_loss_coeff:
        cfg = dataclasses.replace(cfg, router_aux_loss_coef=config.aux_loss_coeff)
    tokenizer_dir = side[0].parent if side else (Path(config.hf_config) if config.hf_config else None)
    return ModelSource(path, fmt, cfg, tied, shapes, tokenizer_dir, side)


def _non_empty(path: Path) -> bool:
    return path.exists() and (not path.is_dir() or any(path.iterdir()))


def _check_run_dir(config: TrainConfig) -> int:
    """Refuse an existing run unless --resume / --overwrite. Returns the step to resume from (0: fresh)."""
    from .checkpoint import latest_step

    out = Path(config.out)
    for flag, target in (("--save-hf", config.save_hf), ("--save-peft", config.save_peft)):
        # found now, not after the training: an export that cannot be written must not cost the run
        if target is not None and _non_empty(Path(target)) and not config.overwrite:
            raise TrainConfigError(f"{flag} {target} exists and is not empty; pass --overwrite to replace it")
    used = _non_empty(out)
    if config.resume:
        step = latest_step(out) if out.is_dir() else None
        if step is None:
            raise TrainConfigError(f"--resume: {out} holds no complete checkpoint")
        return step
    if used and not config.overwrite:
        raise TrainConfigError(f"{out} exists and is not empty; pass --resume to continue it or --overwrite to replace it")
    if used and not (out / "config.yaml").is_file():  # --overwrite deletes only what a run wrote
        raise TrainConfigError(f"--overwrite: {out} is not an ernie45 run directory (no config.yaml); not deleting it")
    return 0


def _open_data(config: TrainConfig, source: ModelSource, cfg: ErnieConfig):
    from .data import DataSpec, open_train_data

    return open_train_data(
        [DataSpec.parse(d) for d in config.data], cfg, tokenizer_dir=source.tokenizer_dir,
        seq_length=config.seq_length, pack=config.pack, shuffle=config.shuffle, seed=config.seed,
        overlong=config.overlong, eval_rows=config.eval_rows,
    )  # fmt: skip


def _use_distributed_optimizer(config: TrainConfig) -> bool:
    # Megatron's distributed optimizer shards the fp32 master weights and Adam moments over DP. It accepts CUDA
    # tensors only (0.16.1, tried on gloo: "TypeError: Wrapped parameters must be one of torch.cuda.FloatTensor,
    # torch.cuda.HalfTensor, or torch.cuda.BFloat16Tensor. Received torch.FloatTensor"), so on a CPU it stays off
    # and Megatron's plain optimizer runs; on a GPU it is the default.
    if config.distributed_optimizer is None:
        return torch.cuda.is_available()
    if config.distributed_optimizer and not torch.cuda.is_available():
        raise TrainConfigError("distributed_optimizer needs a GPU (NCCL); on a CPU Megatron's plain optimizer is used")
    return config.distributed_optimizer


# ------------------------------------------------------------------------------------------------------------------
# the model, the optimizer and the scheduler


def _build(config: TrainConfig, r: Resolved, source: ModelSource, device: torch.device, dtype: torch.dtype):
    from ..bridge.live import load_hf

    cfg, layout = source.cfg, r.layout
    # rope: packed rows restart positions at 0 in every sample
    kw = dict(tie_word_embeddings=source.tied, params_dtype=dtype, sequence_parallel=r.sequence_parallel,
              recompute=config.recompute, aux_loss=config.aux_loss_coeff > 0, seq_length=config.seq_length,
              rope="position_ids")  # fmt: skip
    if cfg.family == "vl":
        from ..megatron.vl_model import build_vl_model

        chunks = build_vl_model(cfg, layout, **kw)
    else:
        from ..megatron.model import build_model

        chunks = build_model(cfg, layout, **kw)
    if source.format == "hf":
        load_hf(chunks, cfg, layout, source.path)
    else:  # Megatron's own loader, resharding the torch_dist checkpoint to this layout
        from megatron.core import dist_checkpointing

        for chunk in chunks:
            chunk.load_state_dict(dist_checkpointing.load(chunk.sharded_state_dict(), str(source.path)), strict=True)
    chunks = [c.to(device) for c in chunks]
    if config.freeze:
        for chunk in chunks:
            chunk.freeze(**{part: True for part in config.freeze})
    if config.lora:
        from . import lora

        lora.apply_lora(chunks, cfg, layout, rank=config.lora, alpha=config.lora_alpha, dropout=config.lora_dropout,
                        targets=config.lora_targets, seed=config.seed)  # fmt: skip
    tc = chunks[0].config  # shared by every chunk (and, for VL, by the language model)
    tc.calculate_per_token_loss = True
    if not torch.cuda.is_available():
        # gloo matches point-to-point messages between two ranks in posting order. With PP=2 a rank's previous and
        # next stage are the same peer, and Megatron's batched p2p posts (send prev, recv prev, send next, recv
        # next) on both sides, so under the interleaved schedule a stage receives its peer's gradient as an
        # activation once forward and backward messages cross (more micro-batches than stages). The unbatched
        # path orders sends and receives by even/odd rank, which pairs them correctly.
        tc.batch_p2p_comm = False
    if config.expert_bias_update_rate:
        # Megatron refuses this flag with softmax routing at config time; ErnieTopKRouter does ERNIE's softmax
        # routing and keeps the token counts, so finalize_model_grads can run Megatron's own update on them
        tc.moe_router_enable_expert_bias = True
        tc.moe_router_bias_update_rate = config.expert_bias_update_rate
    return chunks


def _wrap_ddp(chunks, use_dist_opt: bool):
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads

    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True, overlap_grad_reduce=False, use_distributed_optimizer=use_dist_opt,
    )  # fmt: skip
    model = [
        DistributedDataParallel(config=c.config, ddp_config=ddp_config, module=c, disable_bucketing=i > 0)
        for i, c in enumerate(chunks)
    ]
    _fuse_wgrad_accumulation(chunks)
    tc = chunks[0].config
    tc.finalize_model_grads_func = finalize_model_grads
    tc.no_sync_func = [m.no_sync for m in model] if len(model) > 1 else model[0].no_sync
    return model


def _fuse_wgrad_accumulation(chunks) -> None:
    """Megatron's gradient accumulation fusion for the linear layers of DDP-wrapped ``chunks``: weight-gradient
    GEMMs accumulate into DDP's ``main_grad`` instead of producing a gradient that DDP's hook adds there (one pass
    and one weight-sized allocation less per weight and micro-batch). Needs apex's CUDA extension on a GPU (left off
    without it) or ``cpu.CpuWgradGemm`` (S13) on a CPU. Switched on per layer after wrapping, when every trainable
    weight has its ``main_grad`` (the fused backward writes there; a frozen weight takes Megatron's frozen-weight
    path whatever the flag). A tied head is covered by Megatron itself: it marks the shared embedding weight
    ``zero_out_wgrad``, so DDP's hook still adds the embedding lookup's gradient (``test_train``'s dense-tied case)."""
    from megatron.core.tensor_parallel import layers as tp_layers

    if not tp_layers._grad_accum_fusion_available:
        return
    for chunk in chunks:
        for m in chunk.modules():
            if isinstance(m, (tp_layers.ColumnParallelLinear, tp_layers.RowParallelLinear)):
                m.gradient_accumulation_fusion = True


def _optimizer(config: TrainConfig, model, bf16: bool, dtype: torch.dtype, use_dist_opt: bool, total_steps: int):
    from megatron.core.optimizer import OptimizerConfig, ParamKey, get_megatron_optimizer, get_standard_config_overrides
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    oc = OptimizerConfig(
        optimizer="adam", lr=config.lr, min_lr=config.min_lr, weight_decay=config.weight_decay,
        adam_beta1=config.adam_beta1, adam_beta2=config.adam_beta2, adam_eps=config.adam_eps,
        clip_grad=config.clip_grad, bf16=bf16, params_dtype=dtype, use_distributed_optimizer=use_dist_opt,
    )  # fmt: skip
    overrides = get_standard_config_overrides(oc)  # wd_mult 0 on 1-D parameters (norms) and biases
    # separate learning rates for the ViT and the resampler: their own max/min LR through the same schedule
    for pattern, mult in (("*vision_model.*", config.vit_lr_mult), ("*resampler_model.*", config.resampler_lr_mult)):
        if mult != 1.0:
            overrides[ParamKey(name=pattern)] = {"max_lr": config.lr * mult, "min_lr": config.min_lr * mult}
    from ..megatron import cpu

    with cpu.cpu_mode():
        optimizer = get_megatron_optimizer(oc, model, config_overrides=overrides)
    scheduler = OptimizerParamScheduler(
        optimizer, init_lr=0.0, max_lr=config.lr, min_lr=config.min_lr, lr_warmup_steps=config.warmup,
        lr_decay_steps=total_steps, lr_decay_style=config.schedule, start_wd=config.weight_decay,
        end_wd=config.weight_decay, wd_incr_steps=total_steps, wd_incr_style="constant",
    )  # fmt: skip
    return optimizer, scheduler


# ------------------------------------------------------------------------------------------------------------------
# one step


def _to_device(batch, device: torch.device):
    if device.type == "cpu":
        return batch
    moved = {f.name: (v.to(device) if isinstance(v := getattr(batch, f.name), torch.Tensor) else v)
             for f in dataclasses.fields(batch)}  # fmt: skip
    return type(batch)(**moved)


def _loss_func(mb, vocab_start: int, real_vocab: int, pooled_aux, out: torch.Tensor):
    """Sum of the masked token losses of one micro-batch, its loss-token count, and both for logging.

    ``out``: Megatron's per-token loss ``[B, S]`` -- or, when the vocabulary is padded to a multiple of TP, the
    logits ``[B, S, V]``, whose padded rows get ``-inf`` (no probability mass) before the same vocab-parallel
    cross-entropy.
    ``pooled_aux`` (the chunk's PooledAuxLoss, or None): its gradient is scaled by this micro-batch's loss-token
    count, like the summed LM loss it joins (see the module docstring)."""
    from megatron.core import tensor_parallel

    if out.dim() == 3:
        logits_BSV = out.float()
        V_local = logits_BSV.shape[-1]
        if vocab_start + V_local > real_vocab:  # this TP rank holds padded vocab rows
            pad_V = torch.arange(vocab_start, vocab_start + V_local, device=logits_BSV.device) >= real_vocab
            logits_BSV = logits_BSV.masked_fill(pad_V, float("-inf"))
        # [B, S, V] as it is: the cross-entropy takes any leading dims (a transposed copy would cost 2 x B·S·V)
        loss_BS = tensor_parallel.vocab_parallel_cross_entropy(logits_BSV, mb.labels)
    else:
        loss_BS = out
    mask_BS = mb.loss_mask.to(loss_BS.dtype)
    total = (loss_BS * mask_BS).sum()
    count = mask_BS.sum()
    if pooled_aux is not None:
        pooled_aux.scale = float(count)
    return total, count.to(torch.int), {"lm": torch.stack([total.detach(), count.detach()])}


def _forward_step(cfg: ErnieConfig, vocab_start: int, with_loss: bool, aux: bool, data_iterator, model):
    from ..megatron.packing import forward_packed

    mb = next(data_iterator)
    module = model.module  # the DDP wrapper's model (forward_packed calls into its parts)
    pooled_aux = module.pooled_aux if aux else None
    if pooled_aux is not None:
        pooled_aux.set_real_tokens(mb.segment_ids >= 0)  # the padding tail is not routed in transformers
    out = forward_packed(module, mb, cfg, with_loss=with_loss)
    return out, partial(_loss_func, mb, vocab_start, cfg.vocab_size, pooled_aux)


def _run_schedule(model, micro, cfg, config: TrainConfig, *, forward_only: bool):
    """(sum of token losses, loss tokens) over ``micro`` on this DP rank, known on every rank of the pipeline."""
    from megatron.core import parallel_state as ps
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from ..megatron import cpu

    tp_rank = ps.get_tensor_model_parallel_rank()
    vocab_local = -(-cfg.vocab_size // config.tp)  # rows per TP rank of the padded vocab
    # no padded vocab rows: Megatron's own per-token loss (its cross-entropy on the [S, B, V] logits); the logits
    # path would first have Megatron transpose them to [B, S, V] -- a copy of the largest activation, and another
    # in backward -- only to mask the padded rows
    with_loss = vocab_local * config.tp == cfg.vocab_size
    with cpu.cpu_mode():
        out = get_forward_backward_func()(
            forward_step_func=partial(_forward_step, cfg, tp_rank * vocab_local, with_loss, config.aux_loss_coeff > 0),
            data_iterator=[iter(micro) for _ in model] if len(model) > 1 else iter(micro),
            model=model if len(model) > 1 else model[0],
            num_microbatches=len(micro),
            seq_length=config.seq_length,
            micro_batch_size=micro[0].input_ids.shape[0],
            forward_only=forward_only,
        )
    sums = torch.zeros(2, dtype=torch.float64)
    if ps.is_pipeline_last_stage(ignore_virtual=True):
        for o in out:
            sums += o["lm"].double().cpu()
    if ps.get_pipeline_model_parallel_world_size() > 1:  # only the last stage has it
        dist.all_reduce(sums, group=ps.get_pipeline_model_parallel_group())
    return sums


def _global_loss(sums: torch.Tensor) -> float:
    from megatron.core import parallel_state as ps

    sums = sums.clone()
    dist.all_reduce(sums, group=ps.get_data_parallel_group())
    return float(sums[0] / sums[1]) if sums[1] > 0 else float("nan")


def _routers_reset(chunks) -> None:
    """Zero the routers' token counts (Megatron does it in finalize_model_grads only when it updates the bias)."""
    from ..megatron.router import ErnieTopKRouter

    for c in chunks:
        for m in c.modules():
            if isinstance(m, ErnieTopKRouter):  # every ERNIE router registers the count buffer (router.py)
                m.local_tokens_per_expert.zero_()


# ------------------------------------------------------------------------------------------------------------------
# checkpoint state


# Adam moments are saved under the parameters' own keys, without Megatron's ``chained_<i>.`` prefix: how many
# optimizers the chain holds depends on the layout (expert parameters get their own once EP > 1), the moments do not
OPTIMIZER_METADATA = {"chained_optim_avoid_prefix": True}


def _model_sharded_state(chunks, *, lora: bool) -> dict:
    if lora:
        from .lora import adapter_sharded_state_dict

        return {"model": adapter_sharded_state_dict(chunks)}
    if len(chunks) == 1:
        return {"model": chunks[0].sharded_state_dict()}
    return {f"model{i}": c.sharded_state_dict() for i, c in enumerate(chunks)}


def _trainer_state(config: TrainConfig, r: Resolved, step: int, scheduler) -> dict:
    return dict(step=step, consumed_rows=step * r.global_batch, scheduler=scheduler.state_dict(),
                config=config.to_mapping(), layout=str(r.layout), world_size=r.world_size)  # fmt: skip


def _save(config, r, chunks, optimizer, scheduler, step: int) -> None:
    from ..megatron import cpu
    from .checkpoint import save_checkpoint

    model_sd = _model_sharded_state(chunks, lora=config.lora > 0)
    state = dict(model_sd, optimizer=optimizer.sharded_state_dict(model_sd, metadata=OPTIMIZER_METADATA),
                 trainer=_trainer_state(config, r, step, scheduler))  # fmt: skip
    with cpu.cpu_mode():
        save_checkpoint(config.out, step, state)


def _leaves(tree, path=()):
    """(path, leaf) of a nested dict/list state."""
    items = tree.items() if isinstance(tree, dict) else enumerate(tree) if isinstance(tree, list) else None
    if items is None:
        yield path, tree
        return
    for k, v in items:
        yield from _leaves(v, path + (k,))


def _set_leaf(tree, path, value) -> None:
    for k in path[:-1]:
        tree = tree[k]
    tree[path[-1]] = value


def _resume(config, r, chunks, optimizer, scheduler, step: int, common: dict) -> None:
    """Model, Adam moments, scheduler (and, at the same layout, RNG) from step ``step``, resharded to this layout.

    The optimizer is restored tensor by tensor: every sub-optimizer of this layout's chain asks for the moments of
    its own parameters (by the parameters' checkpoint keys); its hyper-parameters are this run's, its step count the
    checkpoint's. That is the same state at any layout, however the chain is split.
    """
    from megatron.core.dist_checkpointing.mapping import LocalNonpersistentObject, ShardedTensor, ShardedTensorFactory

    from .checkpoint import load_checkpoint

    model_sd = _model_sharded_state(chunks, lora=config.lora > 0)
    subs = [sub.sharded_state_dict(model_sd, is_loading=True) for sub in optimizer.chained_optimizers]
    wanted = {f"{i}/" + "/".join(map(str, path)): (i, path, leaf)
              for i, sd in enumerate(subs) for path, leaf in _leaves(sd)
              if isinstance(leaf, (ShardedTensor, ShardedTensorFactory))}  # fmt: skip (factories: fused SwiGLU fc1)
    # RNG states are per rank: restore them only at the world size and layout they were saved with
    same_layout = common["world_size"] == r.world_size and common["layout"] == str(r.layout)
    request = dict(model_sd, optimizer_tensors={k: leaf for k, (_, _, leaf) in wanted.items()})
    loaded = load_checkpoint(config.out, step, request, with_rng=same_layout)
    if config.lora:  # adapters only
        from .lora import load_adapter_state_dict

        load_adapter_state_dict(chunks, loaded["model"])
    elif len(chunks) == 1:
        chunks[0].load_state_dict(loaded["model"], strict=True)
    else:
        for i, c in enumerate(chunks):
            c.load_state_dict(loaded[f"model{i}"], strict=True)
    for key, (i, path, _) in wanted.items():
        _set_leaf(subs[i], path, loaded["optimizer_tensors"][key])
    for sub, sd in zip(optimizer.chained_optimizers, subs):
        for path, leaf in list(_leaves(sd)):
            if isinstance(leaf, LocalNonpersistentObject):
                _set_leaf(sd, path, leaf.unwrap())
        inner = sd["optimizer"] if "optimizer" in sd else sd  # mixed precision wraps torch's state one level down
        inner["state"]["common_step"] = torch.tensor(float(step))  # torch AdamW keeps its step as a float tensor
        sub.load_state_dict(sd)
    scheduler.load_state_dict(common["scheduler"])


def _saved_trainer_state(run_dir, step: int) -> dict:
    from megatron.core.dist_checkpointing import load_common_state_dict

    from .checkpoint import step_dir

    return load_common_state_dict(str(step_dir(run_dir, step)))["trainer"]


# ------------------------------------------------------------------------------------------------------------------
# train


def train(config: TrainConfig, *, data=None, on_step: Callable[[int, list], None] | None = None) -> TrainResult:
    """Run ``config`` on this process's share of the world (call on every rank, e.g. under torchrun).

    ``data`` overrides the ``config.data`` sources with any object that has ``row(i)``, ``eval_batches()``,
    ``stats`` and ``describe()`` (see ``ernie45.train.data.TrainData``). ``on_step(step, chunks)`` is called after
    every optimizer step (1-based step; the chunks still hold that step's clipped fp32 gradients in ``.grad``).
    Bad input raises ``TrainConfigError`` (or the data module's ``DataError``) before any model is built and
    before the run directory is touched.
    """
    created = _init_distributed()
    try:
        return _train(config, data, on_step)
    finally:
        from megatron.core import parallel_state as ps

        if ps.model_parallel_is_initialized():
            ps.destroy_model_parallel()
        if created:
            dist.destroy_process_group()


def _train(config: TrainConfig, data, on_step) -> TrainResult:
    from ..megatron import cpu, parallel
    from .metrics import MetricsLog, expert_load, load_summary, plot_curves

    rank, world = dist.get_rank(), dist.get_world_size()
    source = open_model_source(config)
    cfg = source.cfg
    r = config.resolve(world, cfg)
    if config.vpp > 1 and config.eval_rows % config.pp:
        raise TrainConfigError(f"eval_rows {config.eval_rows} must be a multiple of pp={config.pp} with vpp > 1")
    on_gpu = torch.cuda.is_available()
    bf16 = config.dtype == "bf16" or (config.dtype == "auto" and on_gpu)
    if bf16 and not on_gpu:
        # Megatron's mixed-precision optimizer (bf16 weights, fp32 master copies) wraps CUDA tensors only
        raise TrainConfigError("--dtype bf16 needs a GPU; on a CPU ernie45 trains in fp32 (--dtype auto)")
    dtype = torch.bfloat16 if bf16 else torch.float32
    use_dist_opt = _use_distributed_optimizer(config)
    start = 0 if config.dry_run else _check_run_dir(config)
    saved = _saved_trainer_state(config.out, start) if start else None
    if saved is not None and saved["consumed_rows"] != start * r.global_batch:
        raise TrainConfigError(
            f"--resume: the checkpoint consumed {saved['consumed_rows']} rows in {start} steps; this run's "
            f"global batch {r.global_batch} would make it {start * r.global_batch} (keep --global-batch)"
        )
    if data is None:
        data = _open_data(config, source, cfg)
    result = TrainResult(run_dir=Path(config.out), rank=rank, start_step=start)
    if config.dry_run:
        text = dry_run_text(config, r, cfg, source.shapes, bf16=bf16, data_text=data.describe())
        if config.lora:
            from .peft_export import describe_lora

            text += "\n" + describe_lora(cfg, rank=config.lora, targets=config.lora_targets, alpha=config.lora_alpha,
                                          dropout=config.lora_dropout)  # fmt: skip
        result.dry_run_text = text
        return result

    # everything is validated (identically on every rank): now the run directory is ours
    dist.barrier()  # no rank may see the directory rank 0 is about to create while it still checks for one
    out = Path(config.out)
    if rank == 0:
        if config.overwrite and out.exists():
            shutil.rmtree(out) if out.is_dir() else out.unlink()
        out.mkdir(parents=True, exist_ok=True)
        # the batch as resolved (a resume must keep it); sequence parallelism as asked (it depends on the layout)
        resolved = config.replace(global_batch=r.global_batch, resume=False, overwrite=False, dry_run=False)
        header = (f"# resolved at world size {world}: {r.layout}, dp {r.dp}, {r.num_microbatches} micro-batch(es) "
                  f"of {config.micro_batch} row(s) per step\n")  # fmt: skip
        (out / "config.yaml").write_text(header + dump_yaml(resolved))
    dist.barrier()

    torch.manual_seed(config.seed)
    device = torch.device("cuda", torch.cuda.current_device()) if on_gpu else torch.device("cpu")
    parallel.initialize(r.layout)
    from megatron.core import parallel_state as ps

    chunks = _build(config, r, source, device, dtype)
    model = _wrap_ddp(chunks, use_dist_opt)
    optimizer, scheduler = _optimizer(config, model, bf16, dtype, use_dist_opt, config.steps)
    if start:
        with cpu.cpu_mode():
            _resume(config, r, chunks, optimizer, scheduler, start, saved)

    from ..megatron.packing import PackedBatch  # noqa: F401  (rows are PackedBatch; collate stacks them)
    from .data import collate

    log = MetricsLog(out, total_steps=config.steps, start_step=start, enabled=rank == 0, progress=config.progress)
    dp_rank = ps.get_data_parallel_rank()
    tokens_per_step = r.global_batch * config.seq_length
    eval_rows = data.eval_batches() if config.eval_rows else []

    def evaluate(step: int) -> None:
        for c in chunks:
            c.eval()
        micro = [_to_device(collate([row]), device) for row in eval_rows]
        with torch.no_grad(), expert_load(chunks, sequence_parallel=r.sequence_parallel) as load:
            sums = _run_schedule(model, micro, cfg, config, forward_only=True)
        loss = float(sums[0] / sums[1]) if sums[1] > 0 else float("nan")  # every DP rank ran every eval row
        result.eval_losses[step] = loss
        log.write(dict(kind="eval", step=step, loss=loss))
        if cfg.is_moe:
            log.write(dict(kind="expert_load", step=step, **load_summary(load)))
        log.note(f"step {step}: eval loss {loss:.4f}")

    for step in range(start, config.steps):
        t0 = time.perf_counter()
        for c in chunks:
            c.train()
        rows = r.rows_of_rank(step, dp_rank)
        mb = config.micro_batch
        micro = [_to_device(collate([data.row(i) for i in rows[k * mb : (k + 1) * mb]]), device)
                 for k in range(r.num_microbatches)]  # fmt: skip
        for m in model:
            m.zero_grad_buffer()
        optimizer.zero_grad()
        sums = _run_schedule(model, micro, cfg, config, forward_only=False)
        with cpu.cpu_mode():
            ok, grad_norm, _ = optimizer.step()
        if not ok:  # bf16 without a loss scaler never skips; fp16 is not offered
            raise RuntimeError(f"step {step + 1}: the optimizer skipped the update (non-finite gradients)")
        lr = next(g["lr"] for g in optimizer.param_groups if g["default_config"])
        scheduler.step(1)
        if not config.expert_bias_update_rate:
            _routers_reset(chunks)
        loss = _global_loss(sums)
        done = step + 1
        result.losses.append(loss)
        result.grad_norms.append(float(grad_norm))
        result.lrs.append(lr)
        log.step(done, loss=loss, lr=lr, grad_norm=float(grad_norm), tokens=tokens_per_step,
                 seconds=time.perf_counter() - t0)  # fmt: skip
        if on_step is not None:
            on_step(done, chunks)
        if eval_rows and config.eval_every and done % config.eval_every == 0 and done < config.steps:
            evaluate(done)
        if (config.save_every and done % config.save_every == 0) or done == config.steps:
            _save(config, r, chunks, optimizer, scheduler, done)
    result.steps = config.steps
    if eval_rows:
        evaluate(config.steps)
    log.close()
    _final_exports(config, r, source, chunks)
    if rank == 0:
        plot_curves(out)
    dist.barrier()
    return result


def _final_exports(config: TrainConfig, r: Resolved, source: ModelSource, chunks) -> None:
    from ..bridge.live import export_hf

    cfg = source.cfg
    if config.save_peft:
        from .peft_export import export_peft_adapter

        export_peft_adapter(chunks, cfg, r.layout, config.save_peft, base_model=str(source.path))
    if config.save_hf:
        if config.lora:
            from .lora import merge_lora

            merge_lora(chunks)
        # the source's tokenizer / processor / generation files (an HF or a torch_dist directory alike), written
        # inside the export's atomic output
        export_hf(chunks, cfg, r.layout, config.save_hf, tied=source.tied, side_files_from=source.path,
                  overwrite=config.overwrite)  # fmt: skip


def run(args) -> int:
    """``ernie45 train``: the flags (and ``--config`` YAML) to a :class:`TrainConfig`, then :func:`train`."""
    config = config_from_args(args)
    result = train(config)
    if result.rank == 0:
        if result.dry_run_text is not None:
            print(result.dry_run_text)
        else:
            last = f"loss {result.losses[-1]:.4f}" if result.losses else "nothing left to run"
            print(f"trained {result.steps} steps ({result.steps - result.start_step} in this run, {last}) -> {config.out}")
    return 0
