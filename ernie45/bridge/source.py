"""One checkpoint-source layer: any checkpoint ernie45 reads -- HF safetensors, Megatron-Core torch_dist, GGUF --
as HF-named tensors, opened by :func:`open_source`.

Every verb that reads a checkpoint (convert, verify, inspect, generate, route-stats, train) opens it here, and
everything downstream (the converters' writers, ``bridge.live.load_hf``, the runtimes, the comparisons) reads it
through the :class:`Source` protocol, whatever the format:

* ``hf`` -- :class:`HFSource` (here): an HF directory, lazy ``pread`` slices (``bridge.io.HFCheckpoint``).
* ``megatron`` -- ``bridge.torch_dist.MegatronSource``: a torch_dist directory through the bridge table's inverse
  ops, one Megatron tensor at a time.
* ``gguf`` -- ``bridge.gguf.GGUFSource``: a GGUF file through the GGUF table's inverse ops, one GGUF tensor at a
  time.

A source decides the checkpoint's facts once, when it is opened: its config, the effective tie of its head
(:attr:`Source.tied`: transformers 5.23 loads an on-disk ``lm_head.weight`` untied even when the config says tied,
reference §G), its plan (every tensor checked against the config) and the tensors it carries outside the model.
Build a model with ``tie_word_embeddings=source.tied`` and export it with ``tied=source.tied``.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Iterator, Protocol

import torch

from ..config import ErnieConfig, load_config
from ..errors import UsageError
from .gguf import GGUFSource
from .io import NO_PHASES, Checksums, CheckpointError, HFCheckpoint, Phases
from .plan import Plan, plan_from_hf
from .torch_dist import MegatronSource

__all__ = ["FORMATS", "Source", "HFSource", "detect_format", "open_source"]

FORMATS = ("hf", "megatron", "gguf")  # what open_source opens ("peft", an adapter directory, is no model)


class Source(Protocol):
    """A checkpoint as HF-named tensors (the names of the HF on-disk checkpoint, whatever the format).

    Facts, decided when the source is opened:

    * ``path`` -- the directory (HF, torch_dist) or file (GGUF).
    * ``format`` -- "hf" | "megatron" | "gguf".
    * ``cfg`` -- the :class:`~ernie45.config.ErnieConfig` (None for a GGUF, which holds llama.cpp's hyper-parameters,
      not an ERNIE config).
    * ``tied`` -- the effective tie of the head: whether the model built for these tensors shares the embedding as
      its output layer. The one answer ``build_model`` / ``load_hf`` / ``gather_hf`` / ``export_hf`` take.
    * ``plan`` -- the bridge plan (``bridge.plan.Plan``: the table's items for ``cfg`` and ``tied``, the ignored
      tensors with their reasons); None for a GGUF.
    * ``carried`` -- names of tensors outside the model kept bit-exact through a conversion (MTP).
    * ``checksums`` -- what ernie45 recorded when it wrote the checkpoint (``bridge.io.Checksums``), or None.
    * ``notes`` -- what a reader of this source should be told (e.g. no checksums to check).

    Tensors (every name of :meth:`keys`; nothing is read before it is asked for):

    * ``shape(name)`` / ``dtype(name)`` / ``shapes()`` / ``dtypes()`` -- without reading data.
    * ``storage_type(name)`` -- how it is stored ("bfloat16", "gguf Q8_0"): what its rounding is judged by.
    * ``get(name)`` -- the whole tensor; ``read(name, dim, start, stop)`` -- a slice along ``dim`` (a rank's shard);
      ``stream(name, row_block_bytes)`` -- the tensor, or an iterator of dim-0 row blocks whose concatenation is it
      (a streaming writer's input: memory bounded by a block).
    * ``side_files()`` -- tokenizer / processor / generation files that travel with a conversion;
      ``source_files()`` -- every path the source is read from (a destination must not overlap them).
    """

    path: Path
    format: str
    cfg: ErnieConfig | None
    tied: bool
    plan: Plan | None
    carried: list[str]
    checksums: Checksums | None
    notes: list[str]

    def keys(self) -> list[str]: ...

    def shape(self, name: str) -> tuple[int, ...]: ...

    def dtype(self, name: str) -> torch.dtype: ...

    def shapes(self) -> dict[str, tuple[int, ...]]: ...

    def dtypes(self) -> dict[str, torch.dtype]: ...

    def storage_type(self, name: str) -> str: ...

    def get(self, name: str) -> torch.Tensor: ...

    def read(self, name: str, dim: int | None = None, start: int = 0, stop: int | None = None) -> torch.Tensor: ...

    def stream(self, name: str, row_block_bytes: int) -> torch.Tensor | Iterator[torch.Tensor]: ...

    def side_files(self) -> list[Path]: ...

    def source_files(self) -> list[Path]: ...


def detect_format(path: str | Path) -> str:
    """'hf' (config.json + safetensors), 'megatron' (torch_dist), 'gguf', or 'peft' (a PEFT LoRA adapter)."""
    path = Path(path)
    if path.is_file():
        with open(path, "rb") as f:
            if f.read(4) == b"GGUF":
                return "gguf"
        raise CheckpointError(f"{path}: not a GGUF file (no GGUF magic) and not a checkpoint directory")
    if path.exists() and not path.is_dir():
        raise CheckpointError(f"{path}: not a regular file or a directory (a FIFO or device?)")
    # any trace of DCP / Megatron makes it a torch_dist (an incomplete one is then reported as such, not as HF)
    if (path / ".metadata").exists() or (path / "metadata.json").exists() or any(path.glob("*.distcp")):
        return "megatron"
    if (path / "config.json").is_file():
        return "hf"
    if (path / "adapter_config.json").is_file():  # ernie45 train --save-peft, or any peft save_pretrained
        return "peft"
    raise CheckpointError(f"{path}: not an HF directory (config.json), a Megatron torch_dist directory or a GGUF file")


class HFSource:
    """An HF checkpoint directory as a :class:`Source` (lazy ``pread`` slices through ``bridge.io.HFCheckpoint``)."""

    format = "hf"

    def __init__(self, path: str | Path, *, vit: str = "hf", phases: Phases = NO_PHASES) -> None:
        self.path = Path(path)
        cfg = load_config(path)
        # the Megatron side's ViT (VL only): the HF files are the same either way, the Megatron names differ
        self.cfg = replace(cfg, vit_impl=vit) if cfg.family == "vl" else cfg
        self.ckpt = HFCheckpoint(path, phases=phases)
        self.plan = plan_from_hf(self.cfg, self.ckpt.shapes(), dtypes=self.ckpt.dtypes(), where=str(path))
        self.tied = self.plan.tied
        self.carried = [n for n, _ in self.plan.ignored]  # outside the model (the declared-ignore table, e.g. MTP)
        self.checksums = self.ckpt.checksums
        self.notes: list[str] = []  # an HF checkpoint without ernie45's checksums is the normal case: no note

    def keys(self) -> list[str]:
        return self.ckpt.keys()

    def shapes(self) -> dict[str, tuple[int, ...]]:
        return self.ckpt.shapes()

    def dtypes(self) -> dict[str, torch.dtype]:
        return self.ckpt.dtypes()

    def shape(self, name: str) -> tuple[int, ...]:
        return self.ckpt.shape(name)

    def dtype(self, name: str) -> torch.dtype:
        return self.ckpt.dtype(name)

    def storage_type(self, name: str) -> str:
        return str(self.ckpt.dtype(name)).replace("torch.", "")

    def read(self, name: str, dim: int | None = None, start: int = 0, stop: int | None = None) -> torch.Tensor:
        return self.ckpt.read(name, dim, start, stop)

    def get(self, name: str) -> torch.Tensor:
        return self.ckpt.read(name)

    def stream(self, name: str, row_block_bytes: int) -> torch.Tensor:
        return self.ckpt.read(name)  # one pread of exactly the tensor's bytes: no block is smaller to hold

    def side_files(self) -> list[Path]:
        return self.ckpt.side_files()

    def source_files(self) -> list[Path]:
        return [self.path, *self.ckpt.source_files()]


def open_source(
    path: str | Path, *, hf_config: str | Path | None = None, vit: str | None = None, phases: Phases = NO_PHASES
) -> Source:
    """The checkpoint at ``path`` (HF directory, torch_dist directory or GGUF file) as a :class:`Source`.

    ``hf_config``: the config.json of a torch_dist directory written without one. ``vit`` ("hf" / "megatron", VL
    only): the ViT of the Megatron side, for an HF source; a torch_dist source says which it holds, and asking for
    the other is an error (convert through HF to switch). ``phases``: times the source's reads and checksum checks.
    """
    fmt = detect_format(path)
    if fmt == "hf":
        source = HFSource(path, vit=vit or "hf", phases=phases)
    elif fmt == "megatron":
        source = MegatronSource(path, hf_config=hf_config, phases=phases)
        if vit is not None and source.cfg.family == "vl" and vit != source.cfg.vit_impl:
            raise UsageError(f"{path} holds the {source.cfg.vit_impl!r} ViT; to change it to {vit!r}, convert to HF "
                             "first")  # fmt: skip
    elif fmt == "gguf":
        source = GGUFSource(path)
    else:
        raise CheckpointError(f"{path}: a PEFT adapter directory holds no model; give the base checkpoint")
    if vit is not None and (source.cfg is None or source.cfg.family != "vl"):
        what = "a GGUF file" if source.cfg is None else f"a {source.cfg.family} model"
        raise UsageError(f"--vit chooses the ViT of a VL model; {path} is {what}")
    return source
