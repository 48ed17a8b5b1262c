"""What a training run is: one :class:`TrainConfig` from flags and/or a YAML file, validated before anything heavy.

The field names are the CLI flags with ``_`` for ``-`` (``--global-batch`` = ``global_batch``); a YAML file given
with ``--config`` may hold any of them (either spelling), and flags given on the command line win. The resolved
config is written to ``RUN_DIR/config.yaml`` so a run can be reproduced (and resumed) from its directory alone.

Batch arithmetic (Megatron's): a step consumes ``global_batch`` rows of ``seq_length`` tokens;
``global_batch = micro_batch × dp × micro-batches per step``, ``dp = world / (tp · pp)``. Anything that does not
divide is a :class:`TrainConfigError` raised by :meth:`TrainConfig.resolve` -- before any model is built.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Mapping

from ..config import ConfigError, ErnieConfig
from ..layout import Layout, LayoutError

__all__ = ["TrainConfig", "TrainConfigError", "Resolved", "SCHEDULES", "FREEZABLE", "load_yaml", "dry_run_text"]

SCHEDULES = ("constant", "linear", "cosine")
FREEZABLE = ("language", "vision", "projection")
DTYPES = ("auto", "fp32", "bf16")
OVERLONG = ("truncate", "drop")
# LoRA target groups (ernie45.train.lora.LORA_TARGET_GROUPS; repeated here so the config validates without it)
LORA_TARGET_GROUPS = ("attn", "mlp", "shared", "experts", "vision_experts", "vit", "resampler")
DEFAULT_LORA_TARGETS = ("attn", "mlp", "shared", "experts")


class TrainConfigError(ConfigError):
    """A training flag / YAML key that is missing, malformed or inconsistent (names the field)."""


@dataclass(frozen=True)
class TrainConfig:
    """Every knob of ``ernie45 train`` (the CLI's ``--help`` documents each)."""

    model: str  # HF checkpoint dir, or a torch_dist dir (ours or Megatron's own)
    data: tuple[str, ...]  # "PATH" or "WEIGHT:PATH" (ernie45.train.data.DataSpec)
    out: str  # the run directory
    # layout
    tp: int = 1
    pp: int = 1
    ep: int = 1
    etp: int | None = None
    vpp: int = 1
    first: int | None = None
    last: int | None = None
    sequence_parallel: bool = False  # forced on for MoE with tp > 1 (Megatron's MoE layer requires it)
    recompute: str | None = None  # None | "selective" | "full"
    vit: str | None = None  # VL: "hf" (transformers' ViT, replicated) or "megatron" (TP-sharded); default hf
    hf_config: str | None = None  # config.json for a torch_dist --model written without one
    # batch
    seq_length: int = 4096
    micro_batch: int = 1
    global_batch: int | None = None  # default: micro_batch × dp (no accumulation)
    steps: int = 100
    # optimiser (Megatron's Adam = torch AdamW with decoupled weight decay) and schedule
    lr: float = 1e-5
    min_lr: float = 0.0
    warmup: int = 0
    schedule: str = "cosine"
    weight_decay: float = 0.01
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_eps: float = 1e-8
    clip_grad: float = 1.0  # global grad-norm clip; 0 = off
    dtype: str = "auto"  # auto: fp32 on CPU, bf16 (fp32 master weights) on GPU
    distributed_optimizer: bool | None = None  # None: on where the backend supports it (see trainer)
    # data
    seed: int = 1234
    shuffle: bool = True
    pack: bool = True
    overlong: str = "truncate"
    eval_rows: int = 0  # held-out rows for eval loss
    eval_every: int = 0  # steps between evals (0: only at the end when eval_rows > 0)
    # checkpoints and outputs
    save_every: int = 0  # steps between checkpoints (0: only at the end)
    resume: bool = False
    overwrite: bool = False
    save_hf: str | None = None
    # ERNIE specifics
    freeze: tuple[str, ...] = ()
    vit_lr_mult: float = 1.0
    resampler_lr_mult: float = 1.0
    expert_bias_update_rate: float = 0.0  # aux-loss-free bias update per pool; 0 = frozen bias (ERNIE's default)
    aux_loss_coeff: float = 0.0
    # LoRA (ernie45.train.lora)
    lora: int = 0  # rank; 0 = full fine-tuning
    lora_alpha: float = 16.0
    lora_dropout: float = 0.0
    lora_targets: tuple[str, ...] = DEFAULT_LORA_TARGETS
    save_peft: str | None = None
    # behaviour
    progress: bool = True
    dry_run: bool = False

    # --------------------------------------------------------------------------------------------------------------
    def __post_init__(self) -> None:
        errors = []

        def need(ok: bool, msg: str) -> None:
            if not ok:
                errors.append(msg)

        need(bool(self.model), "model: a checkpoint directory is required")
        need(bool(self.data), "data: at least one --data source is required")
        need(bool(self.out), "out: a run directory is required")
        for name in ("tp", "pp", "ep", "vpp", "seq_length", "micro_batch", "steps"):
            need(getattr(self, name) >= 1, f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("etp", "global_batch"):
            v = getattr(self, name)
            need(v is None or v >= 1, f"{name} must be >= 1, got {v}")
        for name in ("warmup", "eval_rows", "eval_every", "save_every", "lora"):
            need(getattr(self, name) >= 0, f"{name} must be >= 0, got {getattr(self, name)}")
        need(self.lr > 0, f"lr must be > 0, got {self.lr}")
        need(0 <= self.min_lr <= self.lr, f"min_lr must be in [0, lr={self.lr}], got {self.min_lr}")
        need(self.warmup < self.steps, f"warmup ({self.warmup}) must be < steps ({self.steps})")
        need(self.schedule in SCHEDULES, f"schedule must be one of {SCHEDULES}, got {self.schedule!r}")
        need(self.weight_decay >= 0, f"weight_decay must be >= 0, got {self.weight_decay}")
        need(0 <= self.adam_beta1 < 1 and 0 <= self.adam_beta2 < 1, "adam_beta1/adam_beta2 must be in [0, 1)")
        need(self.adam_eps > 0, f"adam_eps must be > 0, got {self.adam_eps}")
        need(self.clip_grad >= 0, f"clip_grad must be >= 0, got {self.clip_grad}")
        need(self.dtype in DTYPES, f"dtype must be one of {DTYPES}, got {self.dtype!r}")
        need(self.overlong in OVERLONG, f"overlong must be one of {OVERLONG}, got {self.overlong!r}")
        need(self.recompute in (None, "selective", "full"), f"recompute must be selective or full, got {self.recompute!r}")
        need(self.vit in (None, "hf", "megatron"), f"vit must be hf or megatron, got {self.vit!r}")
        bad = sorted(set(self.freeze) - set(FREEZABLE))
        need(not bad, f"freeze: unknown part(s) {bad}; choose from {FREEZABLE}")
        for name in ("vit_lr_mult", "resampler_lr_mult"):
            need(getattr(self, name) > 0, f"{name} must be > 0, got {getattr(self, name)}")
        need(self.expert_bias_update_rate >= 0, "expert_bias_update_rate must be >= 0")
        need(self.aux_loss_coeff >= 0, "aux_loss_coeff must be >= 0")
        need(0 <= self.lora_dropout < 1, f"lora_dropout must be in [0, 1), got {self.lora_dropout}")
        bad = sorted(set(self.lora_targets) - set(LORA_TARGET_GROUPS))
        need(not bad, f"lora_targets: unknown group(s) {bad}; choose from {LORA_TARGET_GROUPS}")
        need(self.save_peft is None or self.lora > 0, "save_peft needs --lora RANK")
        need(not (self.resume and self.overwrite), "resume and overwrite exclude each other")
        if errors:
            raise TrainConfigError("bad training config:\n  - " + "\n  - ".join(errors))

    # --------------------------------------------------------------------------------------------------------------
    @classmethod
    def from_mapping(cls, values: Mapping[str, Any], *, where: str = "config") -> "TrainConfig":
        """Build from a dict whose keys are field names (``-`` or ``_``); unknown keys and wrong types are errors."""
        known = {f.name: f for f in fields(cls)}
        kwargs: dict[str, Any] = {}
        for raw_key, value in values.items():
            key = str(raw_key).replace("-", "_")
            if key not in known:
                raise TrainConfigError(f"{where}: unknown key {raw_key!r} (known: {', '.join(sorted(known))})")
            kwargs[key] = _coerce(key, value, known[key], where)
        missing = [n for n, f in known.items() if f.default is dataclasses.MISSING and n not in kwargs]
        if missing:
            raise TrainConfigError(f"{where}: missing required {', '.join('--' + m.replace('_', '-') for m in missing)}")
        return cls(**kwargs)

    def to_mapping(self) -> dict[str, Any]:
        """Plain YAML-able values (tuples as lists)."""
        return {f.name: list(v) if isinstance(v := getattr(self, f.name), tuple) else v for f in fields(self)}

    def replace(self, **changes: Any) -> "TrainConfig":
        return dataclasses.replace(self, **changes)

    @property
    def layout(self) -> Layout:
        try:
            return Layout(tp=self.tp, pp=self.pp, ep=self.ep, etp=self.etp, vpp=self.vpp, first=self.first, last=self.last)
        except LayoutError as e:
            raise TrainConfigError(f"layout: {e}") from None

    # --------------------------------------------------------------------------------------------------------------
    def resolve(self, world_size: int, cfg: ErnieConfig | None = None) -> "Resolved":
        """The batch arithmetic and layout for ``world_size`` processes (and model ``cfg`` when given)."""
        layout = self.layout
        if cfg is not None:
            try:
                layout.validate(cfg)
            except LayoutError as e:
                raise TrainConfigError(str(e)) from None
            if set(self.freeze) == set(FREEZABLE) and not self.lora:
                raise TrainConfigError(f"freeze {list(self.freeze)}: nothing left to train")
            if self.freeze and cfg.family != "vl":
                raise TrainConfigError(f"freeze {list(self.freeze)}: only VL models have vision/projection parts")
            if cfg.family != "vl" and (self.vit_lr_mult != 1.0 or self.resampler_lr_mult != 1.0 or self.vit):
                raise TrainConfigError("vit / vit_lr_mult / resampler_lr_mult apply to VL models only")
            if not cfg.is_moe and (self.expert_bias_update_rate or self.aux_loss_coeff):
                raise TrainConfigError("expert_bias_update_rate / aux_loss_coeff need a MoE model")
            if self.aux_loss_coeff and cfg.family == "vl":
                raise TrainConfigError(
                    "aux_loss_coeff: transformers' VL aux loss mixes the text and vision pools' router logits; "
                    "only the text MoE loss is implemented exactly"
                )
            if self.aux_loss_coeff and (self.pp > 1 or self.tp > 1):
                raise TrainConfigError(
                    f"aux_loss_coeff needs tp = pp = 1 (have tp={self.tp}, pp={self.pp}): transformers' aux loss pools "
                    "every MoE layer and every token of a forward, which pipeline stages and sequence parallelism split"
                )
        model_parallel = self.tp * self.pp
        if world_size % model_parallel or world_size % layout.world_size:
            raise TrainConfigError(
                f"layout {layout} needs a world size that is a multiple of {math.lcm(model_parallel, layout.world_size)}"
                f" (tp·pp = {model_parallel}); have {world_size} process(es)"
            )
        dp = world_size // model_parallel
        per_pass = self.micro_batch * dp
        global_batch = self.global_batch if self.global_batch is not None else per_pass
        if global_batch % per_pass:
            raise TrainConfigError(
                f"global_batch {global_batch} is not a multiple of micro_batch {self.micro_batch} × dp {dp} = {per_pass}"
            )
        n_micro = global_batch // per_pass
        if self.vpp > 1 and n_micro % self.pp:
            raise TrainConfigError(
                f"the interleaved pipeline (vpp={self.vpp}) needs micro-batches per step ({n_micro}) to be a multiple "
                f"of pp={self.pp}: raise global_batch to a multiple of {per_pass * self.pp}"
            )
        if self.sequence_parallel and self.tp == 1:
            raise TrainConfigError("sequence_parallel needs tp > 1")
        sp = self.sequence_parallel or (self.tp > 1 and cfg is not None and cfg.is_moe)
        if sp and self.seq_length % self.tp:
            raise TrainConfigError(f"seq_length {self.seq_length} must be a multiple of tp={self.tp} under sequence parallelism")
        return Resolved(
            world_size=world_size, layout=layout, dp=dp, global_batch=global_batch, num_microbatches=n_micro,
            sequence_parallel=sp,
        )  # fmt: skip


@dataclass(frozen=True)
class Resolved:
    """A config's run-time arithmetic at one world size."""

    world_size: int
    layout: Layout
    dp: int
    global_batch: int  # rows per step
    num_microbatches: int  # per DP rank per step
    sequence_parallel: bool

    def rows_of_rank(self, step: int, dp_rank: int) -> range:
        """Row indices DP rank ``dp_rank`` consumes at global step ``step`` (0-based): a contiguous slice."""
        per_rank = self.global_batch // self.dp
        start = step * self.global_batch + dp_rank * per_rank
        return range(start, start + per_rank)


# ------------------------------------------------------------------------------------------------------------------
# YAML


def load_yaml(path: str | Path) -> dict[str, Any]:
    """A YAML mapping of config keys (``yaml.safe_load``: plain data only)."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise TrainConfigError(f"{path}: no such config file")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise TrainConfigError(f"{path}: not valid YAML ({e})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise TrainConfigError(f"{path}: the top level must be a mapping of config keys, got {type(data).__name__}")
    return data


def dump_yaml(config: TrainConfig) -> str:
    import yaml

    return yaml.safe_dump(config.to_mapping(), sort_keys=False)


def _coerce(key: str, value: Any, f: dataclasses.Field, where: str) -> Any:
    """A YAML/CLI value as the field's type; a value of the wrong kind is an error naming the key."""
    kind = str(f.type)
    if value is None:
        if "None" in kind:
            return None
        raise TrainConfigError(f"{where}: {key} may not be null")
    try:
        if kind.startswith("tuple"):
            items = [value] if isinstance(value, (str, int, float)) else list(value)
            return tuple(str(v) for v in items)
        if kind.startswith("bool"):
            if not isinstance(value, bool):
                raise TypeError
            return value
        if kind.startswith("int"):
            if isinstance(value, bool) or not isinstance(value, int):
                raise TypeError
            return value
        if kind.startswith("float"):
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise TypeError
            return float(value)
        if kind.startswith("str"):
            if not isinstance(value, (str, Path)):
                raise TypeError
            return str(value)
    except TypeError:
        raise TrainConfigError(f"{where}: {key} must be {kind}, got {value!r}") from None
    raise AssertionError(f"unhandled field type {kind} for {key}")


# ------------------------------------------------------------------------------------------------------------------
# --dry-run


def _param_counts(shapes: Mapping[str, tuple[int, ...]]) -> tuple[int, int]:
    """(total, of which routed experts) from HF tensor shapes."""
    total = expert = 0
    for name, shape in shapes.items():
        n = math.prod(shape)
        total += n
        if ".experts." in name and "shared_experts" not in name:
            expert += n
    return total, expert


def memory_estimate(config: TrainConfig, r: Resolved, cfg: ErnieConfig, total: int, expert: int, bf16: bool) -> dict:
    """A rough per-rank peak (GiB): weights, grads, optimizer, activations. An estimate, not a measurement."""
    dense = total - expert
    expert_tp = r.layout.expert_tp
    per_rank = dense / (config.tp * config.pp) + expert / (config.ep * expert_tp * config.pp)
    trainable = per_rank if config.lora == 0 else per_rank * 0.01
    w = 2 if bf16 else 4
    opt_shards = r.dp if (config.distributed_optimizer or False) else 1
    weights = per_rank * w
    grads = trainable * 4  # grads reduced (and kept) in fp32
    optim = trainable * ((4 if bf16 else 0) + 8) / opt_shards  # fp32 master (bf16 only) + Adam m, v
    # activations of one micro-batch (Korthikanti et al.: s·b·h·(34 + 5·a·s/h) bytes per layer in 16-bit,
    # divided by tp under sequence parallelism), ×pp micro-batches in flight under 1F1B on the first stage
    s, b, h, a = config.seq_length, config.micro_batch, cfg.hidden_size, cfg.num_attention_heads
    layers = cfg.num_hidden_layers / config.pp
    act = s * b * h * (34 + 5 * a * s / h) * layers * (w / 2) / (config.tp if r.sequence_parallel else 1)
    act *= min(config.pp, r.num_microbatches)
    if config.recompute == "full":
        act /= max(layers, 1)
    gib = 2**30
    return {k: v / gib for k, v in dict(weights=weights, grads=grads, optimizer=optim, activations=act).items()}


def _gib(v: float) -> str:
    return f"{v:.2f} GiB" if v >= 1 else f"{v * 1024:.1f} MiB"


def dry_run_text(config: TrainConfig, r: Resolved, cfg: ErnieConfig, shapes: Mapping[str, tuple[int, ...]],
                 *, bf16: bool, data_text: str | None) -> str:  # fmt: skip
    total, expert = _param_counts(shapes)
    mem = memory_estimate(config, r, cfg, total, expert, bf16)
    tokens_step = r.global_batch * config.seq_length
    moe = f", {cfg.moe_num_experts} experts × {len(cfg.moe_intermediate_size)} pool(s), top-{cfg.moe_k}" if cfg.is_moe else ""
    lines = [
        f"model        {config.model}  ({cfg.family}, {cfg.num_hidden_layers} layers, hidden {cfg.hidden_size}{moe})",
        f"parameters   {total:,} total, {expert:,} in routed experts"
        + (f"; active per token ≈ {total - expert + expert * cfg.moe_k // cfg.moe_num_experts:,}" if cfg.is_moe else ""),
        f"layout       {r.layout} on {r.world_size} process(es): dp {r.dp}"
        + (", sequence parallel" if r.sequence_parallel else "") + (f", recompute {config.recompute}" if config.recompute else ""),
        f"batch        global {r.global_batch} rows = micro {config.micro_batch} × dp {r.dp} × {r.num_microbatches} "
        f"micro-batch(es) per step; {config.seq_length} tokens a row",
        f"tokens       {tokens_step:,} per step, {tokens_step * config.steps:,} over {config.steps} steps",
        f"optimiser    Adam(W) lr {config.lr:g} → {config.min_lr:g} ({config.schedule}, warmup {config.warmup}), "
        f"betas ({config.adam_beta1}, {config.adam_beta2}), eps {config.adam_eps:g}, weight decay {config.weight_decay:g} "
        f"(not on norms/biases), clip {config.clip_grad:g}",
        f"precision    {'bf16 weights, fp32 master weights and grads' if bf16 else 'fp32'}",
        "memory/rank  ≈ " + ", ".join(f"{k} {_gib(v)}" for k, v in mem.items()) + f" (total ≈ {_gib(sum(mem.values()))})",
    ]
    if cfg.is_moe:
        bias = f"updated aux-loss-free at rate {config.expert_bias_update_rate:g}" if config.expert_bias_update_rate else "frozen"
        lines.append(f"routing      routers in fp32, expert bias {bias}, aux loss coeff {config.aux_loss_coeff:g}")
    if config.freeze:
        lines.append(f"frozen       {', '.join(config.freeze)}")
    if config.lora:
        lines.append(f"lora         rank {config.lora}, alpha {config.lora_alpha:g}, targets {', '.join(config.lora_targets)}")
    if data_text:
        lines.append(f"data         {data_text}")
    lines.append(f"run dir      {config.out}")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------------------------
# the command line (``ernie45 train``): flags are the fields; unset flags leave the YAML / defaults alone

EXAMPLES = """  ernie45 train --model ./ERNIE-4.5-0.3B-PT --data sft.jsonl --out runs/sft --steps 200 --lr 1e-5 --warmup 20
  torchrun --nproc-per-node 4 -m ernie45 train --model ./ERNIE-4.5-21B-A3B-PT --data 0.7:chat.jsonl \\
      --data 0.3:data/corpus --out runs/moe --tp 2 --ep 2 --etp 1 --global-batch 64 --save-hf runs/moe/hf
  ernie45 train --config run.yaml --dry-run          # the resolved run: layout, batch arithmetic, memory
  ernie45 train --out runs/sft --resume --tp 2       # continue the latest checkpoint, here at another layout
  ernie45 train --model ./ERNIE-4.5-VL-28B-A3B-PT --data vl_chat.jsonl --out runs/vl --freeze vision --vit-lr-mult 0.1"""


def add_arguments(p) -> None:
    import argparse

    S = argparse.SUPPRESS
    p.add_argument("--config", type=Path, default=None, help="YAML file with any of these keys (flags win)")
    g = p.add_argument_group("model, data, run directory")
    g.add_argument("--model", default=S, help="HF checkpoint dir or torch_dist dir (ours or Megatron's own)")
    g.add_argument("--data", action="append", default=S, metavar="[WEIGHT:]PATH",
                   help="chat / pre-tokenized JSONL or an IndexedDataset prefix; repeat to blend by weight")
    g.add_argument("--out", default=S, metavar="RUN_DIR", help="run directory (checkpoints, metrics, config.yaml)")
    g.add_argument("--hf-config", default=S, help="config.json for a torch_dist --model without one")
    g = p.add_argument_group("layout")
    for flag, helptext in (("--tp", "tensor parallel"), ("--pp", "pipeline parallel"), ("--ep", "expert parallel"),
                           ("--etp", "expert tensor parallel (default = tp)"), ("--vpp", "virtual pipeline chunks"),
                           ("--first", "layers in the first stage"), ("--last", "layers in the last stage")):  # fmt: skip
        g.add_argument(flag, type=int, default=S, help=helptext)
    g.add_argument("--sequence-parallel", action="store_true", default=S, help="(always on for MoE with tp > 1)")
    g.add_argument("--recompute", choices=["selective", "full"], default=S, help="activation recompute")
    g.add_argument("--vit", choices=["hf", "megatron"], default=S, help="VL: the ViT implementation")
    g = p.add_argument_group("batch and schedule")
    g.add_argument("--seq-length", type=int, default=S, help="tokens per row (default 4096)")
    g.add_argument("--micro-batch", type=int, default=S, help="rows per micro-batch (default 1)")
    g.add_argument("--global-batch", type=int, default=S, help="rows per step (default micro-batch × dp)")
    g.add_argument("--steps", type=int, default=S, help="optimizer steps (default 100)")
    g.add_argument("--lr", type=float, default=S, help="peak learning rate (default 1e-5)")
    g.add_argument("--min-lr", type=float, default=S, help="final learning rate (default 0)")
    g.add_argument("--warmup", type=int, default=S, help="linear warmup steps from 0 (default 0)")
    g.add_argument("--schedule", choices=SCHEDULES, default=S, help="decay after warmup (default cosine)")
    g.add_argument("--weight-decay", type=float, default=S, help="decoupled, not on norms/biases (default 0.01)")
    g.add_argument("--adam-beta1", type=float, default=S)
    g.add_argument("--adam-beta2", type=float, default=S)
    g.add_argument("--adam-eps", type=float, default=S)
    g.add_argument("--clip-grad", type=float, default=S, help="global grad-norm clip, 0 = off (default 1.0)")
    g.add_argument("--dtype", choices=DTYPES, default=S, help="auto: fp32 on CPU, bf16 + fp32 master on GPU")
    g.add_argument("--distributed-optimizer", action=argparse.BooleanOptionalAction, default=S,
                   help="shard optimizer state over DP (default: on GPU)")
    g.add_argument("--seed", type=int, default=S)
    g.add_argument("--no-shuffle", dest="shuffle", action="store_false", default=S)
    g.add_argument("--no-pack", dest="pack", action="store_false", default=S, help="one sample per row, padded")
    g.add_argument("--overlong", choices=OVERLONG, default=S, help="a sample longer than --seq-length (default truncate)")
    g = p.add_argument_group("evaluation, checkpoints, outputs")
    g.add_argument("--eval-rows", type=int, default=S, help="held-out rows for the eval loss")
    g.add_argument("--eval-every", type=int, default=S, help="steps between evals (and at the end)")
    g.add_argument("--save-every", type=int, default=S, help="steps between checkpoints (and at the end)")
    g.add_argument("--resume", action="store_true", default=S, help="continue RUN_DIR's latest checkpoint")
    g.add_argument("--overwrite", action="store_true", default=S, help="replace an existing RUN_DIR")
    g.add_argument("--save-hf", default=S, metavar="DIR", help="write an HF checkpoint at the end")
    g = p.add_argument_group("ERNIE specifics")
    g.add_argument("--freeze", action="append", choices=FREEZABLE, default=S, help="VL: freeze a part (repeatable)")
    g.add_argument("--vit-lr-mult", type=float, default=S, help="VL: ViT learning-rate multiplier")
    g.add_argument("--resampler-lr-mult", type=float, default=S, help="VL: resampler learning-rate multiplier")
    g.add_argument("--expert-bias-update-rate", type=float, default=S,
                   help="aux-loss-free expert-bias update per pool (default 0: bias frozen)")
    g.add_argument("--aux-loss-coeff", type=float, default=S,
                   help="transformers' load-balancing (aux) loss coefficient; text MoE at tp = pp = 1 (default 0)")
    g = p.add_argument_group("LoRA")
    g.add_argument("--lora", type=int, default=S, metavar="RANK", help="train LoRA adapters of this rank")
    g.add_argument("--lora-alpha", type=float, default=S)
    g.add_argument("--lora-dropout", type=float, default=S)
    g.add_argument("--lora-targets", default=S, help=f"comma-separated groups of {','.join(LORA_TARGET_GROUPS)}")
    g.add_argument("--save-peft", default=S, metavar="DIR", help="export the adapter as a PEFT checkpoint")
    p.add_argument("--no-progress", dest="progress", action="store_false", default=S)
    p.add_argument("--dry-run", action="store_true", default=S, help="print the resolved run; build nothing")


def config_from_args(args) -> TrainConfig:
    """YAML (``--config``; with ``--resume`` and no ``--config``, the run's own ``config.yaml``), then the flags."""
    values = dict(vars(args))
    for k in ("command", "func", "config"):
        values.pop(k, None)
    base: dict[str, Any] = {}
    if args.config is not None:
        base = load_yaml(args.config)
        where = str(args.config)
    elif values.get("resume") and "out" in values and (Path(values["out"]) / "config.yaml").is_file():
        base = load_yaml(Path(values["out"]) / "config.yaml")
        where = str(Path(values["out"]) / "config.yaml")
    else:
        where = "flags"
    if "lora_targets" in values:
        values["lora_targets"] = tuple(t for t in values["lora_targets"].split(",") if t)
    merged = {str(k).replace("-", "_"): v for k, v in base.items()}
    merged.update(values)
    return TrainConfig.from_mapping(merged, where=where)
