"""How tensors reach and leave disk: lazy safetensors reads, sharded writes, atomic output directories.

* :class:`HFCheckpoint` opens a HF directory (single ``model.safetensors``, or shards with
  ``model.safetensors.index.json``) and reads whole tensors or dim-0 / dim-1 slices lazily through
  ``safe_open(...).get_slice`` -- a rank only ever reads its own shard from disk. Pickle formats (``.bin``, ``.pt``,
  ``.pth``, ``.ckpt``) are refused, never unpickled. Index entries are judged by their text (relative, no ``..``),
  so a Hugging Face cache snapshot (every file a link into ``../../blobs/``) opens; side files that link outside
  both the checkpoint and such a cache are refused (:func:`side_files_of`); weight files must be regular files.
* :class:`Checksums`: the per-file sha256 ernie45 records in ``ernie45.json`` when it writes a checkpoint, checked
  before each file's first read.
* :func:`refuse_overlap`: a destination that is, contains or lies inside a source is refused.
* :class:`Phases`: opt-in accounting of where a conversion's wall time goes (``ERNIE45_PHASES``, read by
  ``convert``); :data:`NO_PHASES` when off.
* :func:`read_hf_slices`: one TP / expert-TP shard of a table item's HF inputs, read as slices (what a rank loads,
  what a torch_dist chunk holds).
* :func:`write_safetensors_streaming` streams tensors into size-bounded shards with an index, each hashed while
  written; :func:`write_hf_files` adds ``config.json`` and the ``ernie45.json`` checksum record -- the one HF writer
  of the offline converter and of the live exporter. Both write inside a temporary directory that
  :func:`atomic_output` renames into place only when everything was written (:func:`atomic_file` for one file, the
  GGUF): one protocol for both (stale temporaries of killed runs removed, the umask followed, OS errors and a full
  disk reported naming the destination).
"""

from __future__ import annotations

import collections
import contextlib
import ctypes
import dataclasses
import errno
import hashlib
import json
import math
import os
import shutil
import stat
import tempfile
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path, PurePosixPath
from typing import Any, Callable, Iterable, Iterator

import torch
from safetensors import SafetensorError, safe_open

from ..config import ErnieConfig
from ..errors import InputError
from .layout import shard_bounds
from .tables import Item, Split

__all__ = [
    "CheckpointError", "HFCheckpoint", "atomic_output", "write_safetensors_streaming", "write_hf_files", "SIDE_FILES",
    "atomic_file", "Checksums", "Phases", "NO_PHASES", "HashingFile", "record_checksums", "refuse_overlap",
    "side_files_of", "copy_side_files", "regular_file", "read_json", "read_hf_slices", "progress_bar", "INFO_NAME",
    "INDEX_NAME", "FileRange", "OutputFile",
]  # fmt: skip

_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
# non-weight files an HF directory carries that a converted checkpoint should keep (tokenizer, processor, ...)
SIDE_FILES = (
    "generation_config.json",
    "tokenizer.model",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "chat_template.jinja",
    "chat_template.json",
    "preprocessor_config.json",
    "processor_config.json",
    "video_preprocessor_config.json",
)
INDEX_NAME = "model.safetensors.index.json"


class CheckpointError(InputError):
    """An unreadable or malformed checkpoint (names the file)."""


class Phases:
    """Where a conversion's wall time goes: ``with phases("read"): ...`` adds the block's time to "read".

    Time is exclusive: a phase entered inside another pauses it (the op's time excludes the reads it makes), so
    the phases add up to the time measured. Each thread keeps its own stack (a writer thread's phases are its own).
    Disabled (:data:`NO_PHASES`, the default everywhere), a phase costs one attribute test.
    """

    def __init__(self, *, enabled: bool = True) -> None:
        self.enabled = enabled
        self.seconds: dict[str, float] = {}
        self._local = threading.local()
        self._lock = threading.Lock()

    @contextlib.contextmanager
    def _timed(self, name: str) -> Iterator[None]:
        stack = self._local.__dict__.setdefault("stack", [])
        now = time.perf_counter()
        if stack:
            self._add(stack[-1][0], now - stack[-1][1])
        stack.append([name, now])
        try:
            yield
        finally:
            now = time.perf_counter()
            self._add(name, now - stack.pop()[1])
            if stack:
                stack[-1][1] = now

    def _add(self, name: str, dt: float) -> None:
        with self._lock:
            self.seconds[name] = self.seconds.get(name, 0.0) + dt

    def __call__(self, name: str):
        return self._timed(name) if self.enabled else contextlib.nullcontext()


NO_PHASES = Phases(enabled=False)  # never records: safe to share


class HashingFile:
    """A file opened for writing that hashes (sha256) what is written as it is written: the checksum of an output
    costs no second pass over it. A large buffer is hashed on a second thread while the kernel writes it (both
    release the GIL; sha256 runs at about the speed of the write), and :meth:`write` returns when both are done,
    so the caller may free the buffer. ``fsync``: flushed to the disk at :meth:`close`.

    Phases: "write" is the kernel's write, "hash output" the part of the hashing the write did not hide."""

    _OVERLAP_BYTES = 2**20  # below this a thread hand-off costs more than it hides

    def __init__(self, path: Path, *, phases: Phases = NO_PHASES, fsync: bool = False) -> None:
        self.path, self.phases, self._fsync = Path(path), phases, fsync
        self._f = open(path, "wb")
        self._h = hashlib.sha256()
        self._hasher: ThreadPoolExecutor | None = None
        self.nbytes = 0

    def write(self, data) -> int:
        view = memoryview(data).cast("B")  # torch.save hands bytes / memoryviews, the writers tensors' numpy views
        if len(view) < self._OVERLAP_BYTES:
            with self.phases("hash output"):
                self._h.update(view)
            with self.phases("write"):
                n = self._f.write(view)
        else:
            self._hasher = self._hasher or ThreadPoolExecutor(1, thread_name_prefix="ernie45-sha256")
            hashed = self._hasher.submit(self._h.update, view)  # one worker, awaited below: updates stay in order
            try:
                with self.phases("write"):
                    n = self._f.write(view)
            finally:
                with self.phases("hash output"):
                    hashed.result()
        self.nbytes += n
        return n

    def tell(self) -> int:
        return self.nbytes

    def flush(self) -> None:
        with self.phases("write"):
            self._f.flush()

    def fileno(self) -> int:
        return self._f.fileno()

    def close(self) -> None:
        if self._hasher is not None:
            self._hasher.shutdown()
            self._hasher = None
        if self._f.closed:
            return
        with self.phases("write"):
            self._f.flush()
        if self._fsync:
            with self.phases("fsync"):
                os.fsync(self._f.fileno())
        self._f.close()

    def __enter__(self) -> "HashingFile":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def record(self) -> dict[str, Any]:
        """``{"bytes", "sha256"}`` of what was written (as :func:`record_checksums` records it)."""
        return {"bytes": self.nbytes, "sha256": self._h.hexdigest()}


def read_json(path: Path, what: str) -> Any:
    """``path`` parsed as JSON, or a :class:`CheckpointError` naming the file and what it should have been."""
    regular_file(path, what)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: not a valid {what} (not JSON: {e})") from None


def regular_file(path: Path, what: str) -> Path:
    """``path`` if it is (or links to) a regular file; a FIFO, device or directory is refused (reading one hangs
    or means nothing)."""
    try:
        mode = path.stat().st_mode
    except FileNotFoundError:
        raise CheckpointError(f"{path}: no such {what}") from None
    if not stat.S_ISREG(mode):
        raise CheckpointError(f"{path}: the {what} is not a regular file (a FIFO, device or directory)")
    return path


def hf_cache_blobs(directory: Path) -> Path | None:
    """``<repo>/blobs`` if ``directory`` is a snapshot of the Hugging Face hub cache
    (``<cache>/models--<org>--<name>/snapshots/<revision>/``, whose files are links into ``../../blobs/``)."""
    d = directory.resolve()
    repo = d.parent.parent
    if d.parent.name == "snapshots" and repo.name.startswith(("models--", "datasets--")) and (repo / "blobs").is_dir():
        return repo / "blobs"
    return None


def side_files_of(directory: Path) -> list[Path]:
    """The :data:`SIDE_FILES` present in ``directory``, each a regular file inside the checkpoint or, for a Hugging
    Face cache snapshot, inside its ``blobs/``. A side file that links anywhere else is refused: it would be copied
    into the output (a ``tokenizer.model`` linked to a system file must not travel)."""
    root, blobs = directory.resolve(), hf_cache_blobs(directory)
    out = []
    for name in SIDE_FILES:
        f = directory / name
        if not (f.exists() or f.is_symlink()):
            continue
        target = f.resolve()
        if not (target.is_relative_to(root) or (blobs is not None and target.is_relative_to(blobs))):
            raise CheckpointError(f"{f}: links to {target}, outside the checkpoint (and outside any Hugging Face "
                                  "cache); refusing to read or copy it")  # fmt: skip
        out.append(regular_file(f, "side file"))
    return out


INFO_NAME = "ernie45.json"  # what ernie45 records beside what it writes: provenance, layout, checksums


def file_sha256(path: Path) -> str:
    """The sha256 of a file, the next block read (a second thread) while this one is hashed: a file not in the
    page cache costs max(read, hash), not their sum."""
    h = hashlib.sha256()
    with open(path, "rb", buffering=0) as f, ThreadPoolExecutor(1, thread_name_prefix="ernie45-read") as reader:
        ahead = reader.submit(f.read, 8 * 2**20)
        while chunk := ahead.result():
            ahead = reader.submit(f.read, 8 * 2**20)
            h.update(chunk)
    return h.hexdigest()


def record_checksums(directory: Path, names: Iterable[str], *, known: dict[str, dict[str, Any]] | None = None,
                     phases: Phases = NO_PHASES) -> dict[str, dict[str, Any]]:
    """``{file name: {"bytes": size, "sha256": hex}}`` of ``names`` in ``directory``. ``known``: the records of
    files hashed while they were written (:class:`HashingFile`); their size is checked against the file, the
    others are read back (small files: configs, Megatron's ``common.pt``)."""
    known = known or {}
    out = {}
    with phases("hash output"):
        for n in sorted(names):
            size = (directory / n).stat().st_size
            if n in known and known[n]["bytes"] != size:
                raise CheckpointError(f"{directory / n}: {size} bytes on disk, {known[n]['bytes']} written")
            out[n] = known[n] if n in known else {"bytes": size, "sha256": file_sha256(directory / n)}
    return out


class Checksums:
    """The per-file checksums ernie45 recorded in ``ernie45.json`` when it wrote a checkpoint, checked on reading.

    At open every recorded file must exist with its recorded size (cheap: catches a missing or truncated file).
    Its content hash is checked once, the first time the file is read (:meth:`check`), or for all files up front
    (:meth:`check_all`: ``convert --verify-checksums``, ``inspect``). Recorded are the data files (weights, DCP
    metadata, Megatron's ``common.pt`` / ``metadata.json``); not ``config.json`` or tokenizer files, which people
    edit by hand and which are checked against the weights anyway. A checkpoint ernie45 did not write has none:
    :attr:`note` says so.
    """

    def __init__(self, directory: Path, recorded: Any, *, info_file: Path | None) -> None:
        self.directory = directory
        self.recorded: dict[str, dict[str, Any]] = {}
        self.note: str | None = None
        self._checked: set[str] = set()
        self._pending: dict[str, Future] = {}  # prefetch(): file -> its sha256 being computed
        self._pool: ThreadPoolExecutor | None = None
        self._stop = threading.Event()
        if recorded is None:
            self.note = (f"{directory}: no checksums recorded (written by Megatron, another tool or an older "
                         "ernie45); corrupted bytes in its files cannot be detected")  # fmt: skip
            return
        ok = isinstance(recorded, dict) and all(
            isinstance(n, str) and n and "/" not in n and n not in (".", "..") and isinstance(v, dict)
            and isinstance(v.get("bytes"), int) and isinstance(v.get("sha256"), str) and len(v["sha256"]) == 64
            for n, v in recorded.items()
        )  # fmt: skip
        if not ok:
            raise CheckpointError(f"{info_file}: malformed 'checksums' (file name -> {{bytes, sha256}})")
        self.recorded = recorded
        for name, want in sorted(recorded.items()):
            f = directory / name
            if not f.exists():
                raise CheckpointError(f"{f}: missing (listed in {info_file})")
            size = regular_file(f, "checkpoint file").stat().st_size
            if size != want["bytes"]:
                raise CheckpointError(f"{f}: {size} bytes, but {want['bytes']} were written (recorded in "
                                      f"{info_file}): truncated or replaced")  # fmt: skip

    _WORKERS = 2  # the checks run on both cores (hashlib releases the GIL on large updates)
    _READ = 2**20  # a check reads its file in blocks of this (memory: a block per worker)

    def prefetch(self, names: Iterable[str]) -> None:
        """Start checking ``names`` (relative to the directory, in this order: the order of first use) on a
        small thread pool; :meth:`check` awaits a file's result where it is first needed, so a bad file raises
        the same error at the same point, before its bytes are used -- only the hashing moved off the caller's
        thread. Files already checked, already started or without a record are skipped. :meth:`close` stops
        what is left (an error, a conversion that ends early)."""
        todo = [n for n in dict.fromkeys(names) if n in self.recorded and n not in self._checked
                and n not in self._pending]  # fmt: skip
        if not todo:
            return
        if self._pool is None:
            self._stop.clear()
            self._pool = ThreadPoolExecutor(self._WORKERS, thread_name_prefix="ernie45-check")
        for n in todo:
            self._pending[n] = self._pool.submit(self._hash, self.directory / n)

    def _hash(self, path: Path) -> str | None:
        """sha256 of ``path`` in :data:`_READ` blocks (a prefetch worker); None when :meth:`close` stopped it."""
        h, buf = hashlib.sha256(), bytearray(self._READ)
        view = memoryview(buf)
        with open(path, "rb", buffering=0) as f:
            while n := f.readinto(buf):
                if self._stop.is_set():
                    return None
                h.update(view[:n])
        return h.hexdigest()

    def close(self) -> None:
        """Stop the checks :meth:`prefetch` started and not yet awaited (their results are dropped; a later
        :meth:`check` of such a file hashes it again), and wait for the workers to leave."""
        if self._pool is None:
            return
        self._stop.set()
        self._pool.shutdown(wait=True, cancel_futures=True)
        self._pool = None
        self._pending.clear()

    def check(self, name: str) -> None:
        """The content hash of ``name`` (relative to the directory), once; a file without a record passes. A file
        :meth:`prefetch` started is awaited (its error, if any, raised here), else hashed on this thread."""
        if name in self._checked or name not in self.recorded:
            return
        started = self._pending.pop(name, None)
        got = started.result() if started is not None else None
        if got is None:  # not started, or stopped by close()
            got = file_sha256(self.directory / name)
        if not self._pending and self._pool is not None:  # every started check awaited: the workers go
            self._pool.shutdown(wait=False)
            self._pool = None
        if got != self.recorded[name]["sha256"]:
            raise CheckpointError(f"{self.directory / name}: checksum mismatch (sha256 {got[:16]}…, recorded "
                                  f"{self.recorded[name]['sha256'][:16]}… in {INFO_NAME}): the file is corrupted "
                                  "or was replaced")  # fmt: skip
        self._checked.add(name)

    def check_all(self) -> int:
        """Check every recorded file (on the prefetch pool; the first bad one in name order raises); the number
        checked."""
        names = sorted(self.recorded)
        self.prefetch(names)
        try:
            for name in names:
                self.check(name)
        except BaseException:
            self.close()
            raise
        return len(self.recorded)

    def describe(self) -> str:
        return self.note or f"{len(self.recorded)} files recorded"


def refuse_overlap(sources: Iterable[str | Path], dst: str | Path) -> None:
    """Refuse a destination that is a source, lies inside one or contains one (also through links): writing it
    (``--overwrite`` replaces the destination whole) would destroy the source. ``sources``: the source
    directory and every file it is read from."""
    d = Path(dst).resolve()
    for src in sources:
        s = Path(src).resolve()
        if d == s or s.is_relative_to(d) or (s.is_dir() and d.is_relative_to(s)):
            how = "is" if d == s else "contains" if s.is_relative_to(d) else "lies inside"
            raise CheckpointError(f"{dst}: the destination {how} the source {src}"
                                  f"{f' ({s})' if str(s) != str(src) else ''}; choose another destination")  # fmt: skip


_DTYPES = {
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F64": torch.float64,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}


class HFCheckpoint:
    """Read-only, lazy view of a HF safetensors checkpoint directory."""

    def __init__(self, path: str | Path, *, phases: Phases = NO_PHASES) -> None:
        self.path = Path(path)
        self.phases = phases
        if not self.path.is_dir():
            raise CheckpointError(f"{self.path}: not a directory")
        self._file_of: dict[str, Path] = {}
        self._shape: dict[str, tuple[int, ...]] = {}
        self._dtype: dict[str, str] = {}
        self._offsets: dict[str, tuple[int, int]] = {}  # absolute byte range of each tensor's data
        files = self._weight_files()
        for f in files:
            handle = self._open(f)
            self._offsets.update(_data_offsets(f))
            for name in handle.keys():
                if name in self._file_of:
                    raise CheckpointError(f"{f}: tensor {name} also stored in {self._file_of[name]}")
                sl = handle.get_slice(name)
                if sl.get_dtype() not in _DTYPES:
                    raise CheckpointError(f"{f}: tensor {name} has dtype {sl.get_dtype()}, which ernie45 does not "
                                          f"read (it reads {', '.join(_DTYPES)})")  # fmt: skip
                self._file_of[name] = f
                self._shape[name] = tuple(sl.get_shape())
                self._dtype[name] = sl.get_dtype()
        self._check_index()
        # the checksums ernie45 recorded when it wrote this directory (none for other writers: HF's usual case)
        sidecar = self.path / INFO_NAME
        info = read_json(sidecar, f"ernie45 record ({INFO_NAME})") if sidecar.exists() else None
        if info is not None and not isinstance(info, dict):
            raise CheckpointError(f"{sidecar}: not an ernie45 record (a JSON object)")
        self.checksums = Checksums(self.path, info.get("checksums"), info_file=sidecar) if info else None

    # ---------------------------------------------------------------------------------------------------------
    def _weight_files(self) -> list[Path]:
        pickles = sorted(p.name for p in self.path.iterdir() if p.suffix in _PICKLE_SUFFIXES)
        st = sorted(self.path.glob("*.safetensors"))
        if pickles and not st:
            raise CheckpointError(
                f"{self.path}: only pickle weights ({', '.join(pickles)}); they can run arbitrary code when loaded and "
                "are never unpickled here. Convert them to safetensors with a trusted tool first."
            )
        index = self.path / INDEX_NAME
        if index.exists():
            self._index = read_json(index, "safetensors index")
            weight_map = self._index.get("weight_map") if isinstance(self._index, dict) else None
            if not isinstance(weight_map, dict) or not all(
                isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items()
            ):
                raise CheckpointError(f"{index}: not a valid safetensors index (weight_map must map tensor names to "
                                      "shard file names, all strings)")  # fmt: skip
            files = []
            for shard in sorted(set(weight_map.values())):
                # judged by its text: the Hugging Face cache's snapshot files are links into ../../blobs/, which is
                # fine; a name that climbs out of (or replaces) the directory is not
                rel = PurePosixPath(shard)
                if rel.is_absolute() or ".." in rel.parts or not rel.parts or "\\" in shard:
                    raise CheckpointError(f"{index}: shard {shard!r} points outside the checkpoint directory")
                p = self.path / rel
                if not p.exists():
                    raise CheckpointError(f"{index}: shard {shard!r} is missing")
                files.append(regular_file(p, "safetensors shard"))
            return files
        self._index = None
        if not st:
            raise CheckpointError(f"{self.path}: no *.safetensors files")
        return [regular_file(f, "safetensors file") for f in st]

    def _open(self, f: Path):
        try:
            handle = safe_open(str(f), framework="pt")
        except (SafetensorError, OSError, ValueError) as e:
            raise CheckpointError(f"{f}: cannot read safetensors file ({e})") from None
        size = f.stat().st_size
        # safe_open validates the header (dtypes, shapes, offsets); a truncated shard is caught here, not mid-way
        declared = _declared_size(f)
        if declared > size:
            raise CheckpointError(f"{f}: truncated (header declares {declared} bytes, file has {size})")
        return handle

    def _check_index(self) -> None:
        if self._index is None:
            return
        weight_map = self._index["weight_map"]
        wrong = sorted(
            n for n, shard in weight_map.items()
            if n not in self._file_of or self._file_of[n] != self.path / PurePosixPath(shard)
        )
        extra = sorted(set(self._file_of) - set(weight_map))
        if wrong or extra:
            raise CheckpointError(
                f"{self.path / INDEX_NAME}: index disagrees with the shards: "
                f"{len(wrong)} listed but not found where stated {wrong[:10]}, {len(extra)} unlisted {extra[:10]}"
            )

    # ---------------------------------------------------------------------------------------------------------
    def keys(self) -> list[str]:
        return list(self._file_of)

    def __contains__(self, name: str) -> bool:
        return name in self._file_of

    def shapes(self) -> dict[str, tuple[int, ...]]:
        return dict(self._shape)

    def dtypes(self) -> dict[str, torch.dtype]:
        return {n: self.dtype(n) for n in self._file_of}

    def shape(self, name: str) -> tuple[int, ...]:
        return self._shape[name]

    def dtype(self, name: str) -> torch.dtype:
        return _DTYPES[self._dtype[name]]  # every stored dtype was checked at open

    def nbytes(self, name: str) -> int:
        n = self.dtype(name).itemsize
        for s in self._shape[name]:
            n *= s
        return n

    def byte_range(self, name: str) -> tuple[Path, int, int]:
        """``(file, start, end)``: where ``name``'s data bytes lie (what a kernel copy of it reads)."""
        return (self._file_of[name], *self._offsets[name])

    def file_of(self, name: str) -> Path:
        return self._file_of[name]

    def get(self, name: str) -> torch.Tensor:
        """The whole tensor."""
        return self.read(name)

    def read(self, name: str, dim: int | None = None, start: int = 0, stop: int | None = None) -> torch.Tensor:
        """The tensor, or its ``[start:stop]`` slice along ``dim`` (0 or 1), read from disk.

        Reads use ``os.pread`` of exactly the bytes needed (rows are contiguous for a dim-0 slice) instead of the
        memory map ``safe_open`` keeps: pages of a mapped file stay resident while it is open, so a streaming
        conversion would otherwise grow to the size of its input.
        """
        if name not in self._file_of:
            raise CheckpointError(f"{self.path}: no tensor {name}")
        f = self._file_of[name]
        if self.checksums is not None:
            with self.phases("hash input"):
                self.checksums.check(f.relative_to(self.path).as_posix())
        shape, dtype = self._shape[name], self.dtype(name)
        row_bytes = dtype.itemsize * math.prod(shape[1:])
        a, b = self._offsets[name]
        if dim == 0:
            stop = shape[0] if stop is None else stop
            a, b = a + start * row_bytes, a + stop * row_bytes
            shape = (stop - start, *shape[1:])
        elif dim not in (None, 1):
            raise ValueError(f"slicing along dim {dim} is not supported")
        with self.phases("read"):
            t = torch.empty(shape, dtype=dtype)  # read straight into the tensor's own (freeable) storage
            fd = os.open(f, os.O_RDONLY)
            try:
                # a ctypes view of the tensor's memory (not .numpy(), which would pin the storage as non-resizable)
                n = os.preadv(fd, [(ctypes.c_char * (b - a)).from_address(t.data_ptr())], a) if b > a else 0
            finally:
                os.close(fd)
            if n != b - a:
                raise CheckpointError(f"{f}: truncated while reading {name}")
            if dim == 1:
                t = t[:, start:stop].contiguous()
        return t

    def side_files(self) -> list[Path]:
        return side_files_of(self.path)

    def source_files(self) -> list[Path]:
        """Every file this checkpoint is read from (weights, index, config, side files)."""
        extra = [self.path / n for n in (INDEX_NAME, "config.json") if (self.path / n).exists()]
        return sorted(set(self._file_of.values())) + extra + self.side_files()


def _header(f: Path) -> tuple[int, dict]:
    """(header length, header) of a safetensors file."""
    with open(f, "rb") as fh:
        head = fh.read(8)
        if len(head) < 8:
            raise CheckpointError(f"{f}: truncated (no header)")
        n = int.from_bytes(head, "little")
        try:
            return n, json.loads(fh.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise CheckpointError(f"{f}: corrupted safetensors header ({e})") from None


def _declared_size(f: Path) -> int:
    """Bytes a safetensors file must have according to its own header."""
    n, header = _header(f)
    end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
    return 8 + n + end


def _data_offsets(f: Path) -> dict[str, tuple[int, int]]:
    n, header = _header(f)
    return {k: (8 + n + v["data_offsets"][0], 8 + n + v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"}


def _temp_stem(dst: Path) -> str:
    """The part of ``dst``'s name its temporaries carry: short enough that ``.{stem}.tmp-<pid>-<random>.partial``
    fits in a file name (255 bytes) whatever the length of a valid ``dst`` name."""
    name = dst.name
    if len(name.encode()) <= 120:
        return name
    return name.encode()[:100].decode(errors="ignore") + "~" + hashlib.sha256(name.encode()).hexdigest()[:12]


def _remove_stale_temporaries(dst: Path) -> None:
    """Delete temporaries of earlier conversions into ``dst`` whose process is gone (killed, crashed): directories
    of the directory writers and ``.partial`` files of the GGUF writer alike."""
    stem = _temp_stem(dst)
    for stale in dst.parent.glob(f".{glob_escape(stem)}.tmp-*-*"):
        pid = stale.name[len(f".{stem}.tmp-") :].split("-")[0]
        if not pid.isdigit():
            continue
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            shutil.rmtree(stale, ignore_errors=True) if stale.is_dir() else stale.unlink(missing_ok=True)
        except PermissionError:  # alive, someone else's
            pass


def glob_escape(text: str) -> str:
    return "".join(f"[{c}]" if c in "*?[" else c for c in text)


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _destination_error(dst: Path, tmp: Path | None, e: OSError | None) -> OSError | CheckpointError | None:
    """An error met while writing ``dst`` as one naming the destination and the reason, or None if it is not
    about the destination. It is when the file system is full (whatever the writer raised: numpy and
    ``torch.save`` report a short write without an errno), or for an OSError that names no path, the temporary or
    a file in it, ``dst`` or a directory above it (read-only file system, permission denied). An OSError about
    another path (a source file) is not."""
    if tmp is not None and _nearly_full(dst.parent):
        return CheckpointError(f"{dst}: cannot write the destination (No space left on device: "
                               f"{_free(dst.parent)} bytes free)")  # fmt: skip
    if e is None:
        return None
    where = None if e.filename is None else Path(e.filename)
    about_dst = where is None or dst.is_relative_to(where) or (tmp is not None and where.is_relative_to(tmp))
    if not about_dst:
        return None
    reason = e.strerror or str(e)
    detail = f", at {where}" if where is not None and where != dst else ""
    return CheckpointError(f"{dst}: cannot write the destination ({reason}{detail})")


def _free(directory: Path) -> int:
    st = os.statvfs(directory)
    return st.f_bavail * st.f_frsize


def _nearly_full(directory: Path) -> bool:
    try:
        return _free(directory) < 64 * 2**10
    except OSError:
        return False


@contextlib.contextmanager
def _temporary(dst: Path, *, overwrite: bool, make: Callable[[str], Path], phases: Phases = NO_PHASES,
               fsync: bool = False) -> Iterator[Path]:
    """The one atomic-write protocol: a temporary beside ``dst`` (named after it and this process, so a later run
    removes it if this one is killed), permissions from the umask, renamed over ``dst`` only when complete and
    removed on any error. OS errors about the destination come out naming it. ``fsync``: every file and the
    temporary directory reach the disk before the rename, and the parent directory (the rename itself) after it,
    so after a crash ``dst`` is either the old one or the complete new one."""
    for parent in dst.parents:  # mkdir(parents=True) would say "File exists" about a parent that is a file
        if parent.exists():
            if not parent.is_dir():
                raise CheckpointError(f"{dst}: cannot write the destination ({parent} is not a directory)")
            break
    try:
        dst.parent.mkdir(parents=True, exist_ok=True)
        _remove_stale_temporaries(dst)
        tmp = make(f".{_temp_stem(dst)}.tmp-{os.getpid()}-")
        os.chmod(tmp, (0o777 if tmp.is_dir() else 0o666) & ~_umask())  # mkdtemp / mkstemp make 0700 / 0600
    except OSError as e:  # everything here is about the destination: its parent, its temporary
        reason = e.strerror or str(e)
        raise CheckpointError(f"{dst}: cannot write the destination ({reason}"
                              f"{f', at {e.filename}' if e.filename and Path(e.filename) != dst else ''})") from None
    try:
        yield tmp
        if dst.exists() and not overwrite:
            raise CheckpointError(f"{dst}: appeared while writing (pass --overwrite to replace it)")
        if dst.is_dir() and not tmp.is_dir():
            raise CheckpointError(f"{dst}: is a directory; give a file name")
        if fsync:
            with phases("fsync"):
                _sync_tree(tmp)
        with phases("rename"):
            if dst.exists() and tmp.is_dir():
                old = dst.with_name(f".{_temp_stem(dst)}.old-{os.getpid()}")
                os.replace(dst, old)
                os.replace(tmp, dst)
                shutil.rmtree(old, ignore_errors=True) if old.is_dir() else old.unlink()
            else:
                os.replace(tmp, dst)
        if fsync:
            with phases("fsync"):
                _sync_path(dst.parent)
    except BaseException as e:
        # an interrupt stays an interrupt; bad input already names what is wrong
        bad_write = isinstance(e, Exception) and not isinstance(e, InputError)
        translated = _destination_error(dst, tmp, e if isinstance(e, OSError) else None) if bad_write else None
        shutil.rmtree(tmp, ignore_errors=True) if tmp.is_dir() else tmp.unlink(missing_ok=True)
        if translated is not None:
            raise translated from None
        raise


def _sync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _sync_tree(root: Path) -> None:
    """fsync every file under ``root`` (a file already synced costs nothing), then the directories, deepest first."""
    if not root.is_dir():
        _sync_path(root)
        return
    for here, _, files in os.walk(root, topdown=False):
        for name in files:
            _sync_path(Path(here) / name)
        _sync_path(Path(here))


@contextlib.contextmanager
def atomic_output(dst: str | Path, *, overwrite: bool = False, phases: Phases = NO_PHASES,
                  fsync: bool = False) -> Iterator[Path]:
    """Yield a temporary directory beside ``dst``; on success it replaces ``dst``, on any error it is removed.

    A non-empty ``dst`` is refused unless ``overwrite``. Nothing at ``dst`` changes until the very end, so an
    interrupted conversion never leaves a destination that looks complete. ``fsync``: durably (files, the
    directory and the rename synced); ``phases`` times the rename (and the syncs).
    """
    dst = Path(dst)
    if dst.exists() and (not dst.is_dir() or any(dst.iterdir())) and not overwrite:
        raise CheckpointError(f"{dst}: destination exists and is not empty (pass --overwrite to replace it)")
    def make(prefix: str) -> Path:
        return Path(tempfile.mkdtemp(prefix=prefix, dir=dst.parent))

    with _temporary(dst, overwrite=True, make=make, phases=phases, fsync=fsync) as tmp:
        yield tmp


@contextlib.contextmanager
def atomic_file(dst: str | Path, *, overwrite: bool = False) -> Iterator[Path]:
    """:func:`atomic_output` for one file (the GGUF writer): ``.<name>.tmp-<pid>-<random>.partial`` beside it."""
    dst = Path(dst)
    if dst.is_dir():
        raise CheckpointError(f"{dst}: is a directory; give the file name")
    if dst.exists() and not overwrite:
        raise CheckpointError(f"{dst}: exists (pass --overwrite to replace it)")

    def make(prefix: str) -> Path:
        fd, name = tempfile.mkstemp(prefix=prefix, suffix=".partial", dir=dst.parent)
        os.close(fd)
        return Path(name)

    with _temporary(dst, overwrite=overwrite, make=make) as tmp:
        yield tmp


_ST_DTYPE = {v: k for k, v in _DTYPES.items()}


def write_safetensors_streaming(
    out_dir: Path,
    entries: list[tuple[str, tuple[int, ...], torch.dtype]],
    produce: Callable[[str], torch.Tensor],
    *,
    max_shard_bytes: int = 2 * 2**30,
    on_tensor: Callable[[int], None] = lambda n: None,
    phases: Phases = NO_PHASES,
    fsync: bool = False,
    overlap_shards: bool = True,
) -> dict[str, dict[str, Any]]:
    """Write ``entries`` (in order) as safetensors shards + index, producing one tensor at a time.

    The safetensors header needs every shape and offset before the first byte of data; the plan knows them, so
    each shard's header is written first and the tensors are streamed after it (peak memory: one tensor; a
    ``produce`` that returns an iterator of row blocks -- their concatenation along dim 0 is the tensor -- bounds
    it by a block). ``produce`` may also return a list of :class:`FileRange`: where the
    tensor's bytes lie, in order, unchanged in source files (torch_dist → HF: stored records): they are copied by
    the kernel and hashed from the page cache, never read into this process (:class:`OutputFile`, the
    torch_dist writer's files). The files are standard safetensors (read back by ``safe_open`` in the round-trip
    tests). Returns ``{shard file: {"bytes", "sha256"}}`` (in order), hashed while written: each shard on a thread
    of its own, a shard closed (its hashing awaited) only once the next one is written, so the hashing of one runs
    on beside the writes of the next (``overlap_shards``; False: each closed before the next starts -- the same
    files and records, one core).
    """

    shards: list[list[tuple[str, tuple[int, ...], torch.dtype]]] = [[]]
    size = 0
    for name, shape, dtype in entries:
        nbytes = dtype.itemsize * math.prod(shape)
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append((name, shape, dtype))
        size += nbytes
    n = len(shards)
    names = ["model.safetensors"] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
    total, records = 0, {}
    open_files: list[tuple[str, OutputFile]] = []  # written, their hashing not yet awaited (in shard order)

    def finish(keep: int) -> None:  # close all but the last ``keep`` written shards, in order
        while len(open_files) > keep:
            fname, f = open_files.pop(0)
            f.close()  # awaits its hashing ("hash output"): a source cut short raises here, before the rename
            records[fname] = f.record()

    try:
        for fname, shard in zip(names, shards):
            header: dict = {"__metadata__": {"format": "pt"}}
            offset = 0
            for name, shape, dtype in shard:
                nbytes = dtype.itemsize * math.prod(shape)
                header[name] = {"dtype": _ST_DTYPE[dtype], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
                offset += nbytes
            blob = json.dumps(header, separators=(",", ":")).encode()
            blob += b" " * (-len(blob) % 8)
            f = OutputFile(out_dir / fname, phases=phases, fsync=fsync)
            open_files.append((fname, f))
            f.write(len(blob).to_bytes(8, "little"))
            f.write(blob)
            for name, shape, dtype in shard:
                with phases("op"):  # what the source does beyond reading (inverse ops); its reads time themselves
                    produced = produce(name)
                if isinstance(produced, list):  # of FileRange: the tensor's bytes as a source file holds them
                    nbytes = dtype.itemsize * math.prod(shape)
                    if sum(r.length for r in produced) != nbytes:
                        raise CheckpointError(f"{name}: {sum(r.length for r in produced)} bytes located in "
                                              f"{produced[0].path if produced else '-'}, planned {list(shape)} {dtype}")  # fmt: skip
                    f.copy(produced)
                    on_tensor(nbytes)
                    continue
                blocks = iter([produced]) if isinstance(produced, torch.Tensor) else produced
                rows, want_rows = 0, shape[0] if len(shape) else 1  # a 0-d tensor: one "row"
                while True:
                    with phases("op"):
                        t = next(blocks, None)
                    if t is None:
                        break
                    got = t.shape[0] if t.dim() else 1
                    if t.dim() != len(shape) or tuple(t.shape[1:]) != tuple(shape[1:]) or t.dtype != dtype or \
                            rows + got > want_rows:
                        raise CheckpointError(f"{name}: produced {list(t.shape)} {t.dtype} (rows from {rows}), "
                                              f"planned {list(shape)} {dtype}")  # fmt: skip
                    rows += got
                    with phases("serialise"):
                        data = t.contiguous().view(torch.uint8).numpy() if t.numel() else b""
                    f.write(data)
                    on_tensor(t.numel() * t.element_size())
                    del t, data  # the block's memory goes before the next is read
                if rows != want_rows:
                    raise CheckpointError(f"{name}: produced {rows} rows, planned {list(shape)} {dtype}")
            total += offset
            # the shard before this one is closed now: its hashing ran on beside this shard's writes (both cores)
            finish(1 if overlap_shards else 0)
        finish(0)
    finally:
        for _, f in open_files:  # an error: close what is still open (the temporary directory goes anyway)
            with contextlib.suppress(Exception):
                f.close()
    if n > 1:
        weight_map = {name: fname for fname, shard in zip(names, shards) for name, _, _ in shard}
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        (out_dir / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")
    return records


def write_hf_files(
    out_dir: Path,
    config: dict,
    entries: list[tuple[str, tuple[int, ...], torch.dtype]],
    produce: Callable[[str], torch.Tensor],
    *,
    max_shard_bytes: int = 2 * 2**30,
    on_tensor: Callable[[int], None] = lambda n: None,
    phases: Phases = NO_PHASES,
    fsync: bool = False,
) -> None:
    """An HF checkpoint's files into ``out_dir`` (an :func:`atomic_output` temporary): the weights
    (:func:`write_safetensors_streaming`, in ``entries`` order), ``config.json`` (``config``, the HF dict) and the
    ``ernie45.json`` record of every weight file's sha256 (transformers ignores it; ernie45 checks the weights
    against it when it reads them back)."""
    written = write_safetensors_streaming(out_dir, entries, produce, max_shard_bytes=max_shard_bytes,
                                          on_tensor=on_tensor, phases=phases, fsync=fsync)  # fmt: skip
    files = [*written, *([INDEX_NAME] if (out_dir / INDEX_NAME).exists() else [])]
    (out_dir / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    info = dict(format="ernie45 hf", version=1, checksums=record_checksums(out_dir, files, known=written, phases=phases))
    (out_dir / INFO_NAME).write_text(json.dumps(info, indent=2) + "\n")


def copy_side_files(files: Iterable[Path], out_dir: Path) -> None:
    """Copy a checkpoint's side files (:func:`side_files_of`: checked regular files inside the checkpoint or its
    HF cache) into ``out_dir``; its ``config.json`` is the writer's own. A JSON side file (tokenizer, processor)
    that does not parse is named, not carried along."""
    for f in files:
        if f.name == "config.json":
            continue
        if f.suffix == ".json":
            read_json(f, f"JSON side file ({f.name})")
        shutil.copyfile(f, out_dir / f.name)


def progress_bar(total: int, desc: str, enabled: bool):
    """A byte-counting tqdm bar (``enabled=False``: silent) for a writer's ``on_tensor`` / ``on_chunk``."""
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="B", unit_scale=True, unit_divisor=1024, disable=not enabled, leave=False)


def read_hf_slices(ckpt, item: Item, index: int, count: int, cfg: ErnieConfig) -> tuple[torch.Tensor, ...]:
    """This shard's slice of every HF input of ``item`` (a padded vocab gets zero rows). ``ckpt``: any HF-named
    source with ``read(name, dim, start, stop)`` (:class:`HFCheckpoint`, a ``bridge.source`` source)."""
    out = []
    for name, shape in zip(item.hf, item.hf_shapes):
        dim = item.split.dim
        if dim is None:
            out.append(ckpt.read(name))
            continue
        pad_to = -(-shape[0] // count) * count if item.split is Split.VOCAB else None
        blocks = item.op.hf_blocks
        size = shape[dim] // blocks
        a, b, pad = shard_bounds(item.split, size, count, index, pad_to=pad_to)
        parts = [ckpt.read(name, dim=dim, start=j * size + a, stop=j * size + b) for j in range(blocks)]
        t = parts[0] if blocks == 1 else torch.cat(parts, dim=dim)
        if pad:
            t = torch.cat([t, t.new_zeros((pad, *t.shape[1:]))], dim=0)
        out.append(t)
    return tuple(out)


# ----------------------------------------------------------------------------------------------------------------------
# output files that copy byte ranges in the kernel (the safetensors writer here, the torch_dist writer in dcp_write)


@dataclasses.dataclass(frozen=True)
class FileRange:
    """``length`` bytes at ``offset`` of ``path``: a chunk's bytes exactly as a source file holds them."""

    path: Path
    offset: int
    length: int


class OutputFile:
    """One output file being written (a ``.distcp``, a safetensors shard): bytes appended (:meth:`write`) or copied
    from another file in the kernel (:meth:`copy`), everything hashed (sha256) in file order on one worker thread
    while the writes go on.

    Phases: "write" is the kernel's write / copy, "hash output" the hashing the writes did not hide."""

    _COALESCE = 2**20  # smaller writes (the archives' framing) are gathered into one write syscall
    _HASH_BLOCK = 2**20  # a copied range is read back for hashing in blocks of this (kept in the CPU's cache)

    def __init__(self, path: Path, *, phases: Phases, fsync: bool) -> None:
        self.path, self.phases, self._fsync = path, phases, fsync
        self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o666)
        self._h = hashlib.sha256()
        self._hasher = ThreadPoolExecutor(1, thread_name_prefix="ernie45-sha256")
        self._pending = bytearray()
        self._jobs: collections.deque[Future] = collections.deque()  # hashing jobs, run in order on the one worker
        self._block = bytearray(self._HASH_BLOCK)
        self.nbytes = 0  # the file's length so far, pending bytes included

    def tell(self) -> int:
        return self.nbytes

    def write(self, data) -> int:
        view = memoryview(data).cast("B")
        if len(view) < self._COALESCE:
            self._pending += view
            if len(self._pending) >= self._COALESCE:
                self._flush()
        else:  # the caller may free the buffer when this returns: hashed and written before returning
            self._flush()
            job = self._hash(self._h.update, view)
            self._write(view)
            with self.phases("hash output"):
                job.result()
        self.nbytes += len(view)
        return len(view)

    def flush(self) -> None:  # torch.save flushes its buffer at the end of an archive; _flush is what writes
        pass

    def copy(self, ranges: list[FileRange]) -> None:
        """Append the bytes of ``ranges`` (in order), copied by the kernel (no user-space copy); hashed from the
        page cache."""
        self._flush()
        self._hash(self._hash_ranges, ranges)
        with _opened({r.path for r in ranges}) as fds, self.phases("write"):
            for r in ranges:
                _copy_range(fds[r.path], self._fd, r, self.nbytes)
                self.nbytes += r.length
        os.lseek(self._fd, self.nbytes, os.SEEK_SET)  # copy_file_range at an offset leaves the file position

    def _hash_ranges(self, ranges: list[FileRange]) -> None:
        view = memoryview(self._block)
        with _opened({r.path for r in ranges}) as fds:
            for r in ranges:
                done = 0
                while done < r.length:
                    n = os.preadv(fds[r.path], [view[: min(len(view), r.length - done)]], r.offset + done)
                    if n <= 0:
                        raise CheckpointError(f"{r.path}: truncated while copying bytes {r.offset}+{r.length}")
                    self._h.update(view[:n])
                    done += n

    def _hash(self, fn: Callable[[Any], None], arg) -> Future:
        while self._jobs and self._jobs[0].done():
            self._jobs.popleft().result()  # a hashing job that failed (a source file cut short) raises here
        self._jobs.append(self._hasher.submit(fn, arg))
        return self._jobs[-1]

    def _flush(self) -> None:
        if not self._pending:
            return
        data, self._pending = bytes(self._pending), bytearray()
        self._hash(self._h.update, data)
        self._write(memoryview(data))

    def _write(self, view: memoryview) -> None:
        with self.phases("write"):
            while view:
                n = os.write(self._fd, view)
                view = view[n:]

    def close(self) -> None:
        try:
            self._flush()
            with self.phases("hash output"):
                while self._jobs:
                    self._jobs.popleft().result()
            if self._fsync:
                with self.phases("fsync"):
                    os.fsync(self._fd)
        finally:
            self._hasher.shutdown()
            os.close(self._fd)

    def record(self) -> dict[str, Any]:
        """``{"bytes", "sha256"}`` of what was written (as :func:`~ernie45.bridge.io.record_checksums` records it)."""
        return {"bytes": self.nbytes, "sha256": self._h.hexdigest()}


@contextlib.contextmanager
def _opened(paths):
    """``{path: file descriptor}`` of ``paths`` opened for reading, closed at the end."""
    fds = {}
    try:
        for p in paths:
            fds[p] = os.open(p, os.O_RDONLY)
        yield fds
    finally:
        for fd in fds.values():
            os.close(fd)


def _copy_range(src_fd: int, dst_fd: int, src: FileRange, dst_offset: int) -> None:
    """``src``'s bytes to ``dst_offset`` of ``dst_fd``, in the kernel: ``copy_file_range``, or ``sendfile`` where the
    file systems do not support it (across devices on older kernels)."""
    done = 0
    use_sendfile = False
    while done < src.length:
        left = src.length - done
        if not use_sendfile:
            try:
                n = os.copy_file_range(src_fd, dst_fd, left, src.offset + done, dst_offset + done)
            except OSError as e:
                if e.errno not in (errno.EXDEV, errno.ENOSYS, errno.EOPNOTSUPP, errno.EINVAL) or done:
                    raise
                use_sendfile = True
                os.lseek(dst_fd, dst_offset, os.SEEK_SET)
                continue
        else:
            n = os.sendfile(dst_fd, src_fd, src.offset + done, left)
        if n == 0:
            raise CheckpointError(f"{src.path}: truncated while copying bytes {src.offset}+{src.length}")
        done += n
