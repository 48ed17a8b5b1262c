"""Megatron-Core ``torch_dist`` checkpoints, written and read offline: one CPU process, no model, no process group.

Everything torch_dist lives here, as everything GGUF lives in ``gguf.py``: the DCP writer and reader, the source
(:class:`MegatronSource`: a torch_dist directory as HF-named tensors), the chunk plan (:func:`plan_megatron`: one
chunk per TP / expert-TP shard, per expert, gate/up apart, big vocab shards in row blocks) and the writer
(:func:`write_megatron`: DCP files, ``metadata.json``, ``common.pt``, ``ernie45.json``).

torch_dist checkpoints are layout-independent by design (global shapes; Megatron reshards on load), so the layout
given for a write decides the vocab padding (a multiple of TP), the chunking (what each rank of that layout reads;
a vocab shard over :data:`ROW_BLOCK_BYTES` in row blocks, read back block by block, so memory is bounded by a
block rather than by the 530 MB embedding) and what is validated (heads, KV groups, experts and layers must
divide). Tensors the model does not use (MTP) are carried under ``ernie45.carry.<hf name>``.

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
import json
import math
import pickle
import re
from collections import Counter
from dataclasses import asdict, replace
from pathlib import Path
from typing import Callable

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.default_planner import (
    DefaultLoadPlanner,
    DefaultSavePlanner,
)
from torch.distributed.checkpoint.filesystem import FileSystemReader
from torch.distributed.checkpoint.metadata import (
    BytesStorageMetadata,
    ChunkStorageMetadata,
    Metadata,
    MetadataIndex,
    TensorProperties,
    TensorStorageMetadata,
)
from torch.distributed.checkpoint.planner import (
    LoadPlan,
    SavePlan,
    TensorWriteData,
    WriteItem,
    WriteItemType,
)
from torch.distributed.checkpoint.planner_helpers import (
    create_read_items_for_chunk_list,
)

from ..config import ErnieConfig, load_config
from ..errors import dcp_failure
from ..layout import Layout
from .dcp_write import StoredChunks, ZeroCopyWriter, file_rows
from .io import (
    INFO_NAME,
    NO_PHASES,
    CheckpointError,
    Checksums,
    FileRange,
    Phases,
    atomic_output,
    copy_side_files,
    progress_bar,
    read_hf_slices,
    read_json,
    record_checksums,
    regular_file,
    side_files_of,
)
from .layout import shard_bounds
from .plan import Plan, PlanError, expand
from .tables import Item, Split, ignored_reason

__all__ = [
    "dist_key", "extra_state_keys", "ChunkSpec", "write_dcp", "TorchDistReader", "MEGATRON_METADATA", "MegatronSource",
    "plan_megatron", "write_megatron", "source_checks", "inspect_torch_dist", "CARRY_PREFIX", "ROW_BLOCK_BYTES",
]  # fmt: skip

CARRY_PREFIX = "ernie45.carry."
MEGATRON_VIT_PREFIX = "vision_model.decoder.layers."
# the vocab tensors (the largest: 530 MB at 21B) are written and read in row blocks of at most this: memory is
# bounded by a block, not by the largest tensor
ROW_BLOCK_BYTES = 64 * 2**20

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

    def files_of(self, key: str) -> list[str]:
        """The data files ``key``'s stored chunks lie in (relative to the directory), sorted."""
        return sorted(self._files_of.get(key, ()))

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
                for name in self.files_of(key):
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


# ------------------------------------------------------------------------------------------------------------------
# a torch_dist checkpoint as a source of HF-named tensors


class MegatronSource:
    """A torch_dist checkpoint seen as HF-named tensors (through the bridge table, inverse ops): a
    ``bridge.source.Source``. Each HF tensor is materialised on demand from its Megatron tensor(s) (one expert of a
    stacked tensor at a time), so Megatron → HF, Megatron → Megatron (reshard) and Megatron → GGUF all stream.

    The head's tie: ``ernie45.json``'s record, or for Megatron's own checkpoints (which record none) whether the
    names only an untied table has are stored. Tensors outside the model (MTP) are stored under
    ``ernie45.carry.<hf name>`` (:attr:`carried`) and come back bit-exact.
    """

    format = "megatron"

    def __init__(self, path: str | Path, *, hf_config: str | Path | None = None, phases: Phases = NO_PHASES) -> None:
        self.path = Path(path)
        cfg_path = Path(hf_config) if hf_config else self.path
        if not (cfg_path / "config.json").is_file() and not cfg_path.is_file():
            raise CheckpointError(f"{self.path}: no config.json; pass the HF config with --hf-config")
        self.config_path = cfg_path if cfg_path.is_file() else cfg_path / "config.json"
        cfg = load_config(cfg_path)
        # what ernie45 wrote beside the checkpoint (layout, tied, checksums, ...); empty for Megatron's own
        self.info = info = _read_info(self.path / INFO_NAME)
        self.checksums = Checksums(self.path, info.get("checksums") if info else None, info_file=self.path / INFO_NAME)
        with phases("hash input"):
            self.checksums.check(".metadata")  # before it is unpickled
        self.reader = TorchDistReader(path, checksums=self.checksums, phases=phases)
        self.notes = [self.checksums.note] if self.checksums.note else []
        keys = set(self.reader.keys())
        if cfg.family == "vl" and any(k.startswith(MEGATRON_VIT_PREFIX) for k in keys):
            cfg = replace(cfg, vit_impl="megatron")  # saved from (or for) the Megatron-Core ViT
        self.cfg = cfg
        # Megatron's own checkpoints record no tie: a stored output layer (the names only an untied table has) says
        head = {dist_key(m)[0] for it in expand(cfg, tied=False) for m in it.mg} - {
            dist_key(m)[0] for it in expand(cfg, tied=True) for m in it.mg}  # fmt: skip
        self.tied = info.get("tied", not head & keys)
        items = expand(self.cfg, tied=self.tied)
        self.plan = Plan(self.cfg, self.tied, items)
        expected = {dist_key(mg)[0] for it in items for mg in it.mg}
        self.carried = sorted(k[len(CARRY_PREFIX) :] for k in keys if k.startswith(CARRY_PREFIX))
        # a training checkpoint's optimizer state (declared in the ignore table): read past, said in the notes
        training_state = sorted(k for k in keys - expected if ignored_reason(k) is not None)
        if training_state:
            self.notes.append(f"{len(training_state)} optimizer-state tensors left out: {ignored_reason(training_state[0])}")
        unexpected = sorted(k for k in keys - expected if not k.startswith(CARRY_PREFIX) and ignored_reason(k) is None)
        missing = sorted(expected - keys)
        wrong = self._wrong_shapes(items, keys)
        if missing or unexpected or wrong:
            raise PlanError(
                f"{self.path} does not match its config {self.config_path} ({self.cfg.family}, "
                f"{self.cfg.num_hidden_layers} layers, vocab {self.cfg.vocab_size}):\n"
                + "".join(f"  missing: {k}\n" for k in missing)
                + "".join(f"  unexpected: {k}\n" for k in unexpected)
                + "".join(f"  {line}\n" for line in wrong)
            )
        self._by_hf = {n: it for it in items for n in it.hf}
        self._cache: tuple[int, dict[str, torch.Tensor]] | None = None
        self._stored = StoredChunks(self.reader)  # where stored records lie (torch_dist -> HF copies them: locate)

    def _wrong_shapes(self, items: list[Item], keys: set[str]) -> list[str]:
        """Every stored shape against the one the config implies, at open (not halfway through a write).

        The vocab rows may exceed ``vocab_size`` only by padding: for a checkpoint ernie45 wrote, exactly the
        padding to a multiple of the TP it records; for Megatron's own, a padding Megatron makes (to a multiple of
        ``tp`` or ``128·tp``). A config that says fewer rows than that is refused, never trimmed.
        """
        V, out = self.cfg.vocab_size, []
        if self.info and self.info.get("vocab_size") != V:
            out.append(f"vocab: {self.config_path.name} says vocab_size {V}, {INFO_NAME} records "
                       f"{self.info.get('vocab_size')}")  # fmt: skip
        for item in items:
            for mg, shape in zip(item.mg, _mg_shapes(item)):
                key, x = dist_key(mg)
                if key not in keys:
                    continue
                stored = self.reader.shape(key)
                want = (self.cfg.moe_num_experts, *shape) if x is not None else tuple(shape)
                if item.split is Split.VOCAB and len(stored) == len(want) and stored[1:] == want[1:]:
                    if stored[0] in self._vocab_rows(V):
                        continue
                    out.append(f"wrong shape: {key}: {stored[0]} rows, not vocab_size {V} padded as "
                               f"{'its recorded layout pads it' if self.info else 'Megatron pads it'}")  # fmt: skip
                elif tuple(stored) != want:
                    out.append(f"wrong shape: {key}: stored {list(stored)}, config implies {list(want)}")
        return sorted(set(out))

    def _vocab_rows(self, V: int) -> set[int]:
        if self.info:
            tp = self.info["layout"]["tp"]
            return {-(-V // tp) * tp}
        return {-(-V // m) * m for tp in range(1, 1025) for m in (tp, 128 * tp)}

    def source_files(self) -> list[Path]:
        return [self.path, self.config_path, *self.side_files()]

    def storage_type(self, name: str) -> str:
        return str(self.dtype(name)).replace("torch.", "")

    def keys(self) -> list[str]:
        return list(self._by_hf) + self.carried

    def shapes(self) -> dict[str, tuple[int, ...]]:
        return {n: self.shape(n) for n in self.keys()}

    def start_checks(self) -> None:
        """Start checking the data files' recorded checksums on the prefetch pool (``Checksums.prefetch``), in the
        order a conversion first uses them (its tensors in plan order, then the carried ones): each is still
        awaited before its first read or copy, and a bad one raises there; ``checksums.close()`` stops the rest."""
        keys = [dist_key(m)[0] for it in self.plan.items for m in it.mg] + [CARRY_PREFIX + n for n in self.carried]
        self.checksums.prefetch([f for k in dict.fromkeys(keys) for f in self.reader.files_of(k)]
                                + self.reader.data_files())  # fmt: skip

    def dtypes(self) -> dict[str, torch.dtype]:
        return {n: self.dtype(n) for n in self.keys()}

    def shape(self, name: str) -> tuple[int, ...]:
        if name in self._by_hf:
            it = self._by_hf[name]
            return tuple(it.hf_shapes[it.hf.index(name)])
        return self.reader.shape(CARRY_PREFIX + name)

    def dtype(self, name: str) -> torch.dtype:
        if name in self._by_hf:
            return self.reader.dtype(dist_key(self._by_hf[name].mg[0])[0])
        return self.reader.dtype(CARRY_PREFIX + name)

    def get(self, name: str) -> torch.Tensor:
        if name not in self._by_hf:
            return self.reader.read(CARRY_PREFIX + name)
        item = self._by_hf[name]
        if self._cache is None or self._cache[0] != id(item):  # q/k/v, gate/up come from one Megatron tensor
            mg = []
            for m in item.mg:
                key, x = dist_key(m)
                t = self.reader.read(key, x)
                if item.split is Split.VOCAB:
                    t = t[: item.hf_shapes[0][0]]  # drop the rows padding the vocab to a multiple of TP
                mg.append(t)
            self._cache = (id(item), dict(zip(item.hf, item.op.to_hf(tuple(mg)))))
        return self._cache[1][name]

    def locate(self, name: str) -> Callable[[], list[FileRange]] | None:
        """Where HF tensor ``name``'s bytes lie, byte for byte, in the stored records, found when it is written
        (each file's recorded checksum checked first, as a read would): for a tensor the inverse op leaves as
        stored -- a verbatim op's input (Identity: whole, a vocab short of its padding rows; ConcatGLU: a half;
        one expert of a stacked tensor), a carried one -- whose stored chunks give it in whole runs
        (``dcp_write._one_run``: not a TP-cut row-parallel tensor, a run per row). None: produced (:meth:`stream`)."""
        if name not in self._by_hf:
            shape = self.reader.shape(CARRY_PREFIX + name)
            return self._stored.region(CARRY_PREFIX + name, (0,) * len(shape), shape)
        item = self._by_hf[name]
        if not item.op.verbatim or len(item.mg) != 1:
            return None
        key, x = dist_key(item.mg[0])
        j = item.hf.index(name)
        shape = item.hf_shapes[j]
        start = sum(s[0] for s in item.hf_shapes[:j])  # a verbatim op's tensor is its HF inputs stacked on dim 0
        prefix, lead = ((), ()) if x is None else ((x,), (1,))  # one expert of the [E, ...] stack
        offsets = (*prefix, *(start if d == 0 else 0 for d in range(len(shape))))
        return self._stored.region(key, offsets, (*lead, *shape))

    def stream(self, name: str, row_block_bytes: int = ROW_BLOCK_BYTES):
        """``name`` for a streaming writer: a vocab tensor (embedding, output layer) stored in chunks of at most
        two blocks (as ernie45 writes it) as an iterator of row blocks, each read on demand, so memory is bounded
        by a block, not by the largest tensor; any other tensor whole (:meth:`get`). (Stored in bigger chunks --
        Megatron's own, one per TP shard -- each block's read would load a whole chunk again: read whole.)"""
        key, shape = self._rows_key(name, row_block_bytes), self.shape(name)
        step = max(1, row_block_bytes // (self.dtype(name).itemsize * math.prod(shape[1:])))
        if key is None or step >= shape[0]:
            return self.get(name)
        return (self.reader.read_rows(key, a, min(a + step, shape[0])) for a in range(0, shape[0], step))

    def _rows_key(self, name: str, row_block_bytes: int = ROW_BLOCK_BYTES) -> str | None:
        """The stored key whose rows are ``name``'s rows (a vocab tensor: Identity, one Megatron tensor, the
        padding rows after the vocab) if it is stored in chunks of at most two blocks, else None."""
        item = self._by_hf.get(name)
        if item is None or item.split is not Split.VOCAB or not (item.op.verbatim and item.op.n_hf == 1) or len(item.mg) != 1:
            return None
        key = dist_key(item.mg[0])[0]
        return key if self.reader.largest_chunk_bytes(key) <= 2 * row_block_bytes else None

    def read(self, name: str, dim: int | None = None, start: int = 0, stop: int | None = None) -> torch.Tensor:
        key = self._rows_key(name) if dim == 0 else None
        if key is not None:  # a reshard's vocab blocks: only their rows, never the whole tensor
            return self.reader.read_rows(key, start, self.shape(name)[0] if stop is None else stop)
        t = self.get(name)
        out = t if dim is None else t.narrow(dim, start, (t.shape[dim] if stop is None else stop) - start).contiguous()
        # The writer frees each chunk's storage once written; never hand it the cached tensor's own storage.
        return out.clone() if out.untyped_storage().data_ptr() == t.untyped_storage().data_ptr() else out

    def side_files(self) -> list[Path]:
        return side_files_of(self.path)


def _read_info(path: Path) -> dict:
    """``ernie45.json`` of a torch_dist ernie45 wrote (``{}`` when absent: Megatron's own checkpoints), checked."""
    if not path.exists():
        return {}
    info = read_json(path, f"ernie45 record ({INFO_NAME})")
    problems = []
    if not isinstance(info, dict):
        raise CheckpointError(f"{path}: not an ernie45 record (a JSON object)")
    if info.get("format") != "ernie45 torch_dist":
        problems.append(f"format {info.get('format')!r} is not 'ernie45 torch_dist'")
    if not isinstance(info.get("tied"), bool):
        problems.append("tied must be true or false")
    if not isinstance(info.get("vocab_size"), int) or isinstance(info.get("vocab_size"), bool):
        problems.append("vocab_size must be an integer")
    if not (isinstance(info.get("carried", []), list) and all(isinstance(n, str) for n in info.get("carried", []))):
        problems.append("carried must be a list of tensor names")
    try:
        Layout(**info["layout"])
    except (KeyError, TypeError, ValueError) as e:
        problems.append(f"layout must be a layout ({type(e).__name__}: {e})")
    if problems:
        raise CheckpointError(f"{path}: malformed ernie45 record: {'; '.join(problems)}")
    return info


# ------------------------------------------------------------------------------------------------------------------
# planning and writing a torch_dist checkpoint from any source


def _mg_shapes(item: Item) -> tuple[tuple[int, ...], ...]:
    """Full Megatron shapes of an item."""
    return item.op.mg_shapes(item.hf_shapes)


def _vocab_row_blocks(item: Item, source, shard_rows: int, i: int, gshape, dtype, row_block_bytes: int):
    """TP shard ``i`` of a vocab tensor (embedding, output layer) as DCP chunks of at most ``row_block_bytes``,
    each read from its own HF rows (the padding rows past the vocab are zeros): memory is bounded by a block,
    not by the largest tensor. Megatron's loader (DCP) assembles any chunking; one chunk per shard is the rest's."""
    rows_V, row_bytes = item.hf_shapes[0][0], dtype.itemsize * math.prod(gshape[1:])
    step = max(1, row_block_bytes // row_bytes)
    key = dist_key(item.mg[0])[0]
    out = []
    for g0 in range(i * shard_rows, (i + 1) * shard_rows, step):
        g1 = min(g0 + step, (i + 1) * shard_rows)

        def produce(g0=g0, g1=g1):
            real = source.read(item.hf[0], 0, min(g0, rows_V), min(g1, rows_V))
            pad = (g1 - g0) - real.shape[0]
            return torch.cat([real, real.new_zeros((pad, *gshape[1:]))]) if pad else real

        copy = _unchanged(source, item.hf[0], g0, g1) if g1 <= rows_V else None
        out.append(ChunkSpec(key, (g0, *([0] * (len(gshape) - 1))), (g1 - g0, *gshape[1:]), gshape, dtype, produce, copy))
    return out


def _chunks_for(item: Item, source, layout: Layout, cfg: ErnieConfig, row_block_bytes: int = ROW_BLOCK_BYTES
                ) -> list[ChunkSpec]:  # fmt: skip
    """The torch_dist chunks of one item: one per TP (or expert-TP) shard, per expert, gate/up apart; a vocab
    shard larger than ``row_block_bytes`` in row blocks."""
    n = 1 if item.split is Split.REPLICATED else (layout.expert_tp if item.split.is_expert else layout.tp)
    dtype = source.dtype(item.hf[0])
    out = []
    for k, (mg, shape) in enumerate(zip(item.mg, _mg_shapes(item))):
        key, x = dist_key(mg)
        if item.split is Split.VOCAB:
            shape = (-(-shape[0] // n) * n, *shape[1:])
        prefix = () if x is None else (x,)
        gshape = shape if x is None else (cfg.moe_num_experts, *shape)
        lead = (1,) * len(prefix)

        def spec(offsets, sizes, produce, copy=None):
            out.append(ChunkSpec(key, (*prefix, *offsets), (*lead, *sizes), gshape, dtype, produce, copy))

        if item.op.mg_blocks > 1:
            # Megatron's own layout for a blocked tensor ([gate; up]): each block cut into TP pieces (reference
            # §H.4); block j of a verbatim op is HF input j, so each piece is read straight from it (Row checks both)
            F = shape[0] // item.op.mg_blocks
            for half, src in enumerate(item.hf):
                for i in range(n):
                    a, b, _ = shard_bounds(item.split, F, n, i)
                    offsets = (half * F + a, *([0] * (len(shape) - 1)))
                    sizes = (b - a, *shape[1:])
                    spec(offsets, sizes, lambda src=src, a=a, b=b, lead=lead: source.read(src, 0, a, b).reshape(*lead, b - a, *shape[1:]),
                         _unchanged(source, src, a, b))  # fmt: skip
            continue
        dim = item.split.dim
        for i in range(n):
            sizes = list(shape)
            offsets = [0] * len(shape)
            if dim is not None:
                per = shape[dim] // n
                offsets[dim], sizes[dim] = i * per, per

            def produce(i=i, k=k, n=n, sizes=tuple(sizes), lead=lead):
                t = item.op.to_mg(read_hf_slices(source, item, i, n, cfg))[k]
                return t.reshape(*lead, *sizes)

            if (item.split is Split.VOCAB and item.op.verbatim and item.op.n_hf == 1
                    and dtype.itemsize * math.prod(sizes) > row_block_bytes):  # fmt: skip
                out += _vocab_row_blocks(item, source, sizes[0], i, gshape, dtype, row_block_bytes)
                continue
            # the HF tensor's own bytes (an unchanged single input: whole, a dim-0 slice short of the vocab padding,
            # a dim-1 slice row by row): copied
            d = 0 if dim is None or n == 1 else dim
            cut = (offsets[d], offsets[d] + sizes[d]) if sizes else (0, None)
            same = item.op.verbatim and item.op.n_hf == 1 and d == 0 and (
                dim != 0 or n == 1 or item.op.hf_blocks == 1 and cut[1] <= item.hf_shapes[0][0])  # fmt: skip
            spec(tuple(offsets), tuple(sizes), produce, _unchanged(source, item.hf[0], *cut, dim=d) if same else None)
    return out


def _unchanged(source, name: str, start: int = 0, stop: int | None = None, *, dim: int = 0) -> list[FileRange] | None:
    """Where the slice ``[start, stop)`` along ``dim`` of ``name`` lies unchanged in an HF source's file (a chunk
    copied in the kernel, :mod:`ernie45.bridge.dcp_write`); None for a torch_dist source (``StoredChunks``)."""
    return file_rows(source.ckpt, name, start, stop, dim=dim) if source.format == "hf" else None


def plan_megatron(source, layout: Layout, *, row_block_bytes: int = ROW_BLOCK_BYTES
                  ) -> tuple[list[ChunkSpec], dict[str, bytes]]:  # fmt: skip
    cfg = source.cfg
    layout.validate(cfg)
    chunks: list[ChunkSpec] = []
    # a reshard re-cuts stored bytes: a chunk that stored chunks tile is copied from them (not the vocab padding)
    stored = StoredChunks(source.reader) if source.format == "megatron" else None
    for item in source.plan.items:
        cut = _chunks_for(item, source, layout, cfg, row_block_bytes)
        if stored is not None:
            rows = item.hf_shapes[0][0] if item.split is Split.VOCAB else None
            cut = [dataclasses.replace(c, copy_from=stored.region(c.key, c.offsets, c.sizes, rows=rows)) for c in cut]
        chunks += cut
    for name in source.carried:
        shape = tuple(source.shape(name))
        copy = _unchanged(source, name) if stored is None else stored.region(CARRY_PREFIX + name, (0,) * len(shape), shape)
        chunks.append(ChunkSpec(CARRY_PREFIX + name, (0,) * len(shape), shape, shape, source.dtype(name),
                                lambda name=name: source.get(name), copy))
    # The local spec's linears carry an (empty) TE-style _extra_state; Megatron stores each ShardedObject as the
    # torch.save of a one-element list ([None] here), which is what its loader unwraps.
    buf = io.BytesIO()
    torch.save([None], buf)
    objects = {k: buf.getvalue() for k in extra_state_keys(source.plan.mg_names, cfg.moe_num_experts)}
    return chunks, objects


@contextlib.contextmanager
def source_checks(source):
    """While the block runs, a torch_dist source's recorded checksums are checked on the prefetch pool
    (:meth:`MegatronSource.start_checks`: each still awaited before its file's first read or copy, a bad file raising
    there); after it the pool is stopped (``Checksums.close``), whatever happened. Any other source: nothing. An
    inner block (a conversion's writer inside ``convert``) finds the checks started and stops them at its end."""
    if source.format != "megatron":
        yield
        return
    source.start_checks()
    try:
        yield
    finally:
        source.checksums.close()


def write_megatron(source, dst: Path, layout: Layout, *, overwrite=False, progress=True, phases: Phases = NO_PHASES,
                   fsync: bool = False, row_block_bytes: int = ROW_BLOCK_BYTES) -> int:
    """``source`` (any HF-named ``bridge.source.Source`` but a GGUF) as a torch_dist checkpoint at ``dst``, for
    ``layout``: the DCP files (every chunk declared before any byte moves, then pulled one at a time), Megatron's
    ``metadata.json`` and ``common.pt``, ``config.json``, ``ernie45.json`` (tie, layout, carried tensors,
    checksums) and the source's side files. ``fsync``: durable (files, directory and rename synced); ``phases``:
    where the time goes; ``row_block_bytes``: the largest chunk a vocab tensor is written in (memory is bounded by
    it)."""
    with source_checks(source):  # a reshard: the source's checksums checked on both cores, planning included
        with phases("plan"):
            chunks, objects = plan_megatron(source, layout, row_block_bytes=row_block_bytes)
        total = sum(c.nbytes for c in chunks)
        with (atomic_output(dst, overwrite=overwrite, phases=phases, fsync=fsync) as tmp,
              progress_bar(total, "HF -> torch_dist", progress) as bar):  # fmt: skip
            written = write_dcp(tmp, chunks, objects, on_chunk=bar.update, phases=phases, fsync=fsync)
            (tmp / "metadata.json").write_text(json.dumps(MEGATRON_METADATA))
            torch.save({}, tmp / "common.pt")  # Megatron's common (non-sharded) state: nothing for a bare conversion
            data_files = [f.name for f in tmp.iterdir()]
            (tmp / "config.json").write_text(json.dumps(source.cfg.to_hf(), indent=2, sort_keys=True) + "\n")
            info = dict(
                format="ernie45 torch_dist", version=1, family=source.cfg.family, tied=source.tied,
                layout=asdict(layout), vocab_size=source.cfg.vocab_size, carried=source.carried,
                vit=source.cfg.vit_impl,
                local_spec="megatron-core local spec, SequentialMLP experts",
                checksums=record_checksums(tmp, data_files, known=written, phases=phases),
            )  # fmt: skip
            (tmp / INFO_NAME).write_text(json.dumps(info, indent=2) + "\n")
            copy_side_files(source.side_files(), tmp)
        return total


def inspect_torch_dist(src: MegatronSource) -> dict:
    """The torch_dist lines of ``ernie45 inspect`` (the config-derived ones are ``inspect.model_facts``)."""
    layout = src.info.get("layout")
    return {
        "written for layout": str(Layout(**layout)) if layout else "unknown (not written by ernie45); loads at any",
        "tensors": len(src.reader.keys()),
        "dtypes": dict(Counter(str(src.reader.dtype(k)).replace("torch.", "") for k in src.reader.keys())),
        "size on disk": f"{sum(f.stat().st_size for f in src.path.glob('*.distcp')) / 2**20:.1f} MiB",
        "mtp tensors": sum(1 for n in src.carried if "mtp" in n),
        "checksums": src.checksums.note or f"ok ({src.checksums.check_all()} files match what ernie45 recorded)",
    }
