"""Megatron-Core ``torch_dist`` checkpoints, written and read offline: one CPU process, no model, no process group.

A ``torch_dist`` checkpoint *is* a PyTorch distributed checkpoint (DCP) with flat keys and global shapes, plus
Megatron's ``metadata.json`` / ``common.pt`` (docs/megatron-on-cpu.md). So this module drives PyTorch's own DCP machinery
with two small planners:

* :class:`_LazySavePlanner` declares every chunk up front (key, offsets, sizes, dtype) and produces its data only
  when the DCP writer asks for it (``resolve_data``): tensors stream from the source one chunk at a time, so peak
  memory is one chunk, whatever the model size; a chunk whose bytes lie unchanged in a source file is copied from
  it in the kernel instead (:mod:`.dcp_write`, docs/convert-speed.md).
* :class:`_RegionLoadPlanner` reads any region of any key (e.g. one expert of a stacked ``[E, 2F, H]`` tensor),
  whatever chunking the writer used (Megatron's own checkpoints from any layout included).

Keys follow what ``GPTModel.sharded_state_dict()`` produces (checked by ``tests/test_convert.py`` against a live
model): global layer numbers; ``input_layernorm`` stored as ``self_attention.linear_qkv.layer_norm_weight`` and
``pre_mlp_layernorm`` as ``mlp.linear_fc1.layer_norm_weight`` (the local spec's ``sharded_state_dict_keys_map``);
SequentialMLP experts stacked as ``mlp.experts.experts.linear_fc{1,2}.weight [E, …]``; ``linear_fc1`` stored as
``[gate; up]`` whatever the TP size. The ``_extra_state`` objects of the local spec (all ``None``) are written too,
so ``dist_checkpointing.load(model.sharded_state_dict(), dir)`` works unfiltered.

``.metadata`` is a pickle (PyTorch's format). It is read here with a restricted unpickler that only admits the DCP
metadata classes; tensor data is read by DCP with ``weights_only=True``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import math
import pickle
import re
from pathlib import Path
from typing import Callable

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner, DefaultSavePlanner
from torch.distributed.checkpoint.filesystem import FileSystemReader
from torch.distributed.checkpoint.metadata import (
    BytesStorageMetadata,
    ChunkStorageMetadata,
    Metadata,
    MetadataIndex,
    TensorProperties,
    TensorStorageMetadata,
)
from torch.distributed.checkpoint.planner import LoadPlan, SavePlan, TensorWriteData, WriteItem, WriteItemType
from torch.distributed.checkpoint.planner_helpers import create_read_items_for_chunk_list

from ..errors import dcp_failure
from .dcp_write import FileRange, ZeroCopyWriter
from .io import NO_PHASES, Checksums, CheckpointError, Phases, read_json, regular_file

__all__ = ["dist_key", "extra_state_keys", "ChunkSpec", "write_dcp", "TorchDistReader", "MEGATRON_METADATA"]

MEGATRON_METADATA = {
    "sharded_backend": "torch_dist",
    "sharded_backend_version": 1,
    "common_backend": "torch",
    "common_backend_version": 1,
}

# the GPT local spec's sharded_state_dict_keys_map (language model only; the ViT's spec keeps its norm names)
_RENAMES = (
    (re.compile(r"((?:language_model\.)?decoder\.layers\.\d+\.)input_layernorm\.weight"),
     r"\1self_attention.linear_qkv.layer_norm_weight"),
    (re.compile(r"((?:language_model\.)?decoder\.layers\.\d+\.)pre_mlp_layernorm\.weight"),
     r"\1mlp.linear_fc1.layer_norm_weight"),
)  # fmt: skip
_EXPERT = re.compile(r"(?P<pre>.*\.experts\.)local_experts\.(?P<X>\d+)\.(?P<fc>linear_fc[12])\.weight")


def dist_key(mg: str) -> tuple[str, int | None]:
    """Global Megatron name → (torch_dist key, expert index along the prepended axis or None)."""
    m = _EXPERT.fullmatch(mg)
    if m:
        return f"{m['pre']}experts.{m['fc']}.weight", int(m["X"])
    for pattern, repl in _RENAMES:
        if pattern.fullmatch(mg):
            return pattern.sub(repl, mg), None
    return mg, None


_LINEAR = re.compile(r"(.*\.(?:linear_qkv|linear_proj|linear_fc1|linear_fc2))\.weight")


def extra_state_keys(mg_names, num_experts: int | None) -> list[str]:
    """The ``_extra_state`` ShardedObject keys a local-spec GPTModel declares (one per linear; per expert)."""
    keys = set()
    for mg in mg_names:
        key, x = dist_key(mg)
        m = _LINEAR.fullmatch(key)
        if not m:
            continue
        keys.add(f"{m[1]}._extra_state/shard_{x}_{num_experts}" if x is not None else f"{m[1]}._extra_state/shard_0_1")
    return sorted(keys)


@dataclasses.dataclass(frozen=True)
class ChunkSpec:
    """One chunk of one key: its place in the global tensor and how to produce it (lazily)."""

    key: str
    offsets: tuple[int, ...]
    sizes: tuple[int, ...]
    global_shape: tuple[int, ...]
    dtype: torch.dtype
    produce: Callable[[], torch.Tensor]
    # where the chunk's bytes lie unchanged in source files, in order (an HF file's rows: dcp_write.file_rows; a
    # torch_dist's stored records: dcp_write.StoredChunks), found when it is written: copied in the kernel, never
    # produced (None: a chunk that needs an op is produced)
    copy_from: Callable[[], list[FileRange]] | None = None

    @property
    def nbytes(self) -> int:
        n = self.dtype.itemsize
        for s in self.sizes:
            n *= s
        return n


class _LazySavePlanner(DefaultSavePlanner):
    def __init__(self, chunks: list[ChunkSpec], objects: dict[str, bytes], on_chunk: Callable[[int], None],
                 phases: Phases = NO_PHASES):
        super().__init__(flatten_state_dict=False, flatten_sharded_tensors=False)
        self._chunks = {(c.key, c.offsets): c for c in chunks}
        self._objects = objects
        self._on_chunk = on_chunk
        self._phases = phases

    def set_up_planner(self, state_dict, storage_meta=None, is_coordinator=False) -> None:
        self.state_dict, self.is_coordinator = state_dict, is_coordinator

    def create_local_plan(self) -> SavePlan:
        with self._phases("plan"):
            return self._local_plan()

    def _local_plan(self) -> SavePlan:
        items = [
            WriteItem(
                index=MetadataIndex(c.key, torch.Size(c.offsets)),
                type=WriteItemType.SHARD,
                tensor_data=TensorWriteData(
                    chunk=ChunkStorageMetadata(offsets=torch.Size(c.offsets), sizes=torch.Size(c.sizes)),
                    properties=TensorProperties(dtype=c.dtype),
                    size=torch.Size(c.global_shape),
                ),
            )
            for c in self._chunks.values()
        ]
        items += [WriteItem(index=MetadataIndex(k), type=WriteItemType.BYTE_IO) for k in self._objects]
        self.plan = SavePlan(items)
        return self.plan

    def resolve_data(self, write_item: WriteItem):
        """A byte object's bytes, a chunk's tensor, or where a chunk's unchanged bytes lie (:class:`FileRange` s,
        copied by :class:`~ernie45.bridge.dcp_write.ZeroCopyWriter`, the one writer this planner is used with)."""
        if write_item.type == WriteItemType.BYTE_IO:
            return io.BytesIO(self._objects[write_item.index.fqn])
        c = self._chunks[(write_item.index.fqn, tuple(write_item.index.offset))]
        if c.copy_from is not None:
            with self._phases("plan"):
                where = c.copy_from()
            self._on_chunk(c.nbytes)
            return where
        with self._phases("op"):  # the source's reads time themselves (exclusive)
            t = c.produce()
        if tuple(t.shape) != c.sizes or t.dtype != c.dtype:
            raise CheckpointError(f"{c.key}@{c.offsets}: produced {list(t.shape)} {t.dtype}, planned {list(c.sizes)} {c.dtype}")
        self._on_chunk(c.nbytes)
        return t.contiguous()


@contextlib.contextmanager
def _without_zip_crc32():
    """``torch.save`` without the zip CRC32 of each record, for the duration of one write.

    DCP stores every chunk as the ``torch.save`` zip of that tensor; computing the CRC32 of each record costs as
    much as a third of the write. ``torch.load`` (and so DCP's reader and Megatron-Core's ``dist_checkpointing``)
    does not check it (``torch.serialization.set_crc32_options``), and ernie45 records a sha256 of every file it
    writes, checked on reading, which covers what a CRC would. The setting is PyTorch's process-wide one: restored
    when the write ends.
    """
    before = torch.serialization.get_crc32_options()
    torch.serialization.set_crc32_options(False)
    try:
        yield
    finally:
        torch.serialization.set_crc32_options(before)


def write_dcp(path: Path, chunks: list[ChunkSpec], objects: dict[str, bytes], on_chunk=lambda n: None, *,
              phases: Phases = NO_PHASES, fsync: bool = False, threads: int = 2) -> dict[str, dict]:
    """Write a DCP checkpoint from lazily produced chunks (no process group needed). Returns ``{file name:
    {"bytes", "sha256"}}`` of the files written (``.metadata`` and the ``.distcp`` data), hashed while written.

    A chunk with ``copy_from`` is copied from its source file in the kernel inside its ``torch.save`` framing;
    the others are produced and ``torch.save``-d (:class:`~ernie45.bridge.dcp_write.ZeroCopyWriter`). ``threads``:
    data files written side by side, each hashed on its own thread. ``phases``: "serialise" is DCP's own work (the
    framing, ``torch.save`` of produced chunks, the metadata), the kernel's writes and copies, the hashing, the
    source's reads and ops are timed apart. ``fsync``: each file synced."""
    writer = ZeroCopyWriter(path, threads=threads, phases=phases, fsync=fsync)
    try:
        with phases("serialise"), _without_zip_crc32():
            dcp.save({}, storage_writer=writer, planner=_LazySavePlanner(chunks, objects, on_chunk, phases),
                     no_dist=True)  # fmt: skip
    except CheckpointException as e:  # a BaseException: re-raise what went wrong (a bad tensor, a full disk) itself
        raise (dcp_failure(e) or CheckpointError(f"{path}: DCP could not write the checkpoint ({e})")) from None
    return writer.fs.records


# ------------------------------------------------------------------------------------------------------------------
# reading


class _MetadataUnpickler(pickle.Unpickler):
    """Admits only what DCP metadata is made of; anything else in a ``.metadata`` file is refused."""

    _ALLOWED_MODULES = ("torch.distributed.checkpoint.", "torch.distributed._shard.")
    _ALLOWED = {
        ("torch", "Size"),
        ("torch", "float32"), ("torch", "float16"), ("torch", "bfloat16"), ("torch", "float64"),
        ("torch", "int64"), ("torch", "int32"), ("torch", "int16"), ("torch", "int8"), ("torch", "uint8"),
        ("torch", "bool"), ("torch", "strided"), ("torch", "contiguous_format"), ("torch", "preserve_format"),
        ("torch", "layout"), ("torch", "memory_format"), ("torch", "dtype"),
        ("collections", "OrderedDict"), ("builtins", "set"), ("builtins", "frozenset"), ("builtins", "slice"),
        ("torch.serialization", "_get_layout"),  # maps a layout *name* to torch.strided etc.
        ("pathlib", "PosixPath"), ("pathlib", "PurePosixPath"),  # storage_meta.checkpoint_id
    }  # fmt: skip

    def find_class(self, module: str, name: str):
        if module.startswith(self._ALLOWED_MODULES) or (module, name) in self._ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name} from checkpoint metadata")


class _SafeReader(FileSystemReader):
    def __init__(self, path: str) -> None:
        super().__init__(path)
        self._parsed = None  # DCP asks for the metadata on every load; a big .metadata takes a while to parse

    def read_metadata(self, *args, **kwargs):
        path = Path(self.path) / ".metadata"
        if self._parsed is None:
            try:
                with open(regular_file(path, "DCP metadata file"), "rb") as f:
                    md = _MetadataUnpickler(f).load()
            except (pickle.UnpicklingError, EOFError, AttributeError, ValueError, TypeError, IndexError) as e:
                raise CheckpointError(f"{path}: unreadable or untrusted DCP metadata ({e})") from None
            _check_metadata(md, path)
            self._parsed = md
        md = self._parsed
        if md.storage_meta is not None:
            md.storage_meta.load_id = self.load_id
        return md


def _check_metadata(md, path: Path) -> None:
    """A ``.metadata`` is a pickle: that it unpickled says nothing about its shape. Check what DCP relies on."""
    if not isinstance(md, Metadata):
        raise CheckpointError(f"{path}: not DCP metadata (a pickled {type(md).__name__})")
    entries = md.state_dict_metadata
    storage = md.storage_data
    if not isinstance(entries, dict) or not isinstance(storage, dict):
        raise CheckpointError(f"{path}: malformed DCP metadata (state_dict_metadata / storage_data are not maps)")
    for key, v in entries.items():
        if not isinstance(key, str) or not isinstance(v, (TensorStorageMetadata, BytesStorageMetadata)):
            raise CheckpointError(f"{path}: malformed DCP metadata entry {key!r} ({type(v).__name__})")
        if isinstance(v, TensorStorageMetadata) and not (
            isinstance(v.properties, TensorProperties) and isinstance(v.properties.dtype, torch.dtype)
            and all(isinstance(c, ChunkStorageMetadata) for c in v.chunks)
        ):  # fmt: skip
            raise CheckpointError(f"{path}: malformed DCP metadata for tensor {key!r}")
    for index, info in storage.items():
        rel = getattr(info, "relative_path", None)
        if not (isinstance(index, MetadataIndex) and isinstance(rel, str) and isinstance(info.offset, int)
                and isinstance(info.length, int) and rel and not Path(rel).is_absolute()
                and ".." not in Path(rel).parts):  # fmt: skip
            raise CheckpointError(f"{path}: malformed DCP storage entry for {getattr(index, 'fqn', index)!r}")


class _RegionLoadPlanner(DefaultLoadPlanner):
    """Reads one region ``[offsets, offsets + sizes)`` of one key into ``dest``."""

    def __init__(self, key: str, offsets, sizes, dest: torch.Tensor) -> None:
        super().__init__(flatten_state_dict=False, flatten_sharded_tensors=False)
        self._key, self._chunk, self._dest = key, ChunkStorageMetadata(torch.Size(offsets), torch.Size(sizes)), dest

    def set_up_planner(self, state_dict, metadata=None, is_coordinator=False) -> None:
        self.state_dict, self.metadata, self.is_coordinator = state_dict, metadata, is_coordinator

    def create_local_plan(self) -> LoadPlan:
        md = self.metadata.state_dict_metadata[self._key]
        return LoadPlan(create_read_items_for_chunk_list(self._key, md, [self._chunk]))

    def resolve_tensor(self, read_item):
        view = self._dest
        for dim, (off, length) in enumerate(zip(read_item.dest_offsets, read_item.lengths)):
            view = view.narrow(dim, off, length)
        return view

    def commit_tensor(self, read_item, tensor) -> None:
        pass


class TorchDistReader:
    """Lazy reader of a torch_dist (DCP) checkpoint directory."""

    def __init__(self, path: str | Path, *, checksums: Checksums | None = None, phases: Phases = NO_PHASES) -> None:
        """``checksums``: what ernie45 recorded when it wrote the directory; each data file is checked against it
        before its first read. ``phases``: times the reads ("read": DCP's load, ``torch.load`` of each chunk
        included) and the checks ("hash input")."""
        self.path = Path(path)
        self.checksums = checksums
        self.phases = phases
        if not (self.path / ".metadata").exists():
            raise CheckpointError(f"{self.path}: not a complete torch_dist checkpoint (no .metadata file)")
        meta = self.path / "metadata.json"
        if meta.exists():
            info = read_json(meta, "Megatron metadata.json")
            if not isinstance(info, dict) or info.get("sharded_backend") != "torch_dist":
                raise CheckpointError(f"{meta}: sharded_backend is not torch_dist")
        self._reader = _SafeReader(str(self.path))
        self.metadata = self._reader.read_metadata()
        self._tensors = {
            k: v for k, v in self.metadata.state_dict_metadata.items() if isinstance(v, TensorStorageMetadata)
        }
        self._check_storage()
        self._files_of: dict[str, set[str]] = {}
        for index, info in self.metadata.storage_data.items():
            self._files_of.setdefault(index.fqn, set()).add(info.relative_path)

    def _check_storage(self) -> None:
        """Every byte range the metadata names lies in an existing regular file (a missing or truncated ``.distcp``
        is found here, not by DCP halfway through a conversion)."""
        need: dict[str, int] = {}
        for info in self.metadata.storage_data.values():
            need[info.relative_path] = max(need.get(info.relative_path, 0), info.offset + info.length)
        for name, end in sorted(need.items()):
            f = self.path / name
            if not f.exists():
                raise CheckpointError(f"{f}: missing (the checkpoint's .metadata stores tensors in it)")
            size = regular_file(f, "DCP data file").stat().st_size
            if size < end:
                raise CheckpointError(f"{f}: truncated (.metadata places data up to byte {end}, the file has {size})")

    def data_files(self) -> list[str]:
        """The data files the metadata names (relative to the directory)."""
        return sorted({info.relative_path for info in self.metadata.storage_data.values()})

    def keys(self) -> list[str]:
        return list(self._tensors)

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self._tensors[key].size)

    def dtype(self, key: str) -> torch.dtype:
        return self._tensors[key].properties.dtype

    def read(self, key: str, index: int | None = None) -> torch.Tensor:
        """The whole tensor, or ``[index]`` along the first axis (one expert of a stacked tensor)."""
        t = self.read_rows(key, *((index, index + 1) if index is not None else (0, None)))
        return t[0] if index is not None else t

    def largest_chunk_bytes(self, key: str) -> int:
        """The largest stored chunk of ``key`` (what one DCP read of any part of it loads)."""
        md = self._tensors[key]
        return max((md.properties.dtype.itemsize * math.prod(c.sizes) for c in md.chunks), default=0)

    def read_rows(self, key: str, start: int = 0, stop: int | None = None) -> torch.Tensor:
        """Rows ``[start, stop)`` along the first axis. DCP reads each stored chunk the rows overlap whole
        (``torch.load``), so memory is the rows plus the largest such chunk."""
        if key not in self._tensors:
            raise CheckpointError(f"{self.path}: no tensor {key}")
        shape = self.shape(key)
        offsets, sizes = [0] * len(shape), list(shape)
        stop = shape[0] if stop is None else stop
        if not 0 <= start <= stop <= shape[0]:
            raise ValueError(f"{key}: rows [{start}, {stop}) outside its {shape[0]}")
        offsets[0], sizes[0] = start, stop - start
        dest = torch.empty(sizes, dtype=self.dtype(key))
        if dest.numel() == 0:
            return dest
        if self.checksums is not None:
            with self.phases("hash input"):
                for name in sorted(self._files_of.get(key, ())):
                    self.checksums.check(name)
        try:
            with self.phases("read"):
                dcp.load({}, storage_reader=self._reader, planner=_RegionLoadPlanner(key, offsets, sizes, dest),
                         no_dist=True)  # fmt: skip
        except (Exception, CheckpointException) as e:  # CheckpointException (per-rank failures) is a BaseException
            if isinstance(e, CheckpointError):
                raise
            inner = dcp_failure(e) or e
            raise CheckpointError(f"{self.path}: cannot read {key} ({type(inner).__name__}: {inner})") from None
        return dest
