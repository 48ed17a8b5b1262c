"""The torch_dist writer's storage layer: PyTorch DCP's file format, the unchanged bytes copied in the kernel.

A DCP ``.distcp`` file written in DCP's default ``TORCH_SAVE`` format is a sequence of ``torch.save`` zip archives,
one per chunk, each placed by ``.metadata`` (``_StorageInfo``: file, offset, length). Inside an archive the chunk's
storage is one stored (uncompressed) record. Most chunks of an HF → torch_dist conversion are byte ranges of the
source's safetensors files unchanged (Identity tensors, dim-0 TP slices, gate / up halves, whole experts; a dim-1
TP slice row by row: :func:`file_rows`), and every chunk of a reshard is runs of the source's stored records (:class:`StoredChunks`), so
:class:`ZeroCopyWriter` writes such a chunk as

    the archive's framing (``torch.save`` under ``torch.serialization.skip_data``: every record but the storage's
    bytes, which it leaves a hole for)  +  the storage bytes, ``os.copy_file_range`` from the source file(s)

and the bytes never enter this process: the kernel copies page cache to page cache, as ``cp`` does. The archive is
byte for byte the one ``torch.save`` of the tensor writes (tests/test_dcp_zero_copy.py), so DCP's reader and
Megatron-Core's ``dist_checkpointing.load`` read it as any other. A chunk that needs an op (FuseQKV's regroup,
Squeeze0) is produced as a tensor and ``torch.save``-d as before.

The sha256 of each output file (what ernie45 records and checks on reading) is computed on a thread of its own, in
file order, beside the writes: a copied range is hashed from the source's page cache. sha256 (≈1.2 GiB/s a core
here) is slower than the kernel's copy (≈2.4 GiB/s): it is what bounds a conversion's speed, so the chunks are
spread over ``threads`` files, each hashed on its own thread (docs/convert-speed.md).

torch_dist → HF uses the same pieces the other way: an HF tensor that is a region of a stored key, byte for byte
(:meth:`StoredChunks.region`), is copied from the stored records into its safetensors shard by
:class:`~ernie45.bridge.io.OutputFile` (the one output file of both writers, in ``bridge.io``).
"""

from __future__ import annotations

import bisect
import contextlib
import io
import itertools
import math
import zipfile
from pathlib import Path
from typing import Callable

import torch
from torch.distributed.checkpoint.filesystem import DEFAULT_SUFFIX, FileSystem, FileSystemWriter, _StorageInfo
from torch.distributed.checkpoint.metadata import MetadataIndex, TensorStorageMetadata
from torch.distributed.checkpoint.planner import SavePlan, SavePlanner, WriteItem, WriteItemType
from torch.distributed.checkpoint.storage import WriteResult

from .io import NO_PHASES, CheckpointError, FileRange, HashingFile, OutputFile, Phases

__all__ = ["file_rows", "StoredChunks", "ZeroCopyWriter"]


def file_rows(ckpt, name: str, start: int = 0, stop: int | None = None, *, dim: int = 0
              ) -> Callable[[], list[FileRange]]:  # fmt: skip
    """Where the slice ``[start, stop)`` along ``dim`` (0: rows, one range; 1: columns of a matrix, a range per
    row) of tensor ``name`` of an :class:`~ernie45.bridge.io.HFCheckpoint` lies in its file, found when the chunk is
    written (the file's recorded checksum, if any, checked first, as a read would)."""

    def locate() -> list[FileRange]:
        f, a, b = ckpt.byte_range(name)
        if ckpt.checksums is not None:
            with ckpt.phases("hash input"):
                ckpt.checksums.check(f.relative_to(ckpt.path).as_posix())
        shape, itemsize = ckpt.shape(name), ckpt.dtype(name).itemsize
        if b - a != itemsize * math.prod(shape) or (dim == 1 and len(shape) != 2) or dim not in (0, 1):
            raise ValueError(f"{name}: {list(shape)} cannot be sliced along dim {dim} here")
        n = shape[dim] if shape else 1
        end = n if stop is None else stop
        if not 0 <= start <= end <= n:
            raise ValueError(f"{name}: [{start}, {end}) along dim {dim} outside its {n}")
        if dim == 0:
            row = itemsize * math.prod(shape[1:])
            return [FileRange(f, a + start * row, (end - start) * row)]
        row = itemsize * shape[1]
        return [FileRange(f, a + r * row + start * itemsize, (end - start) * itemsize) for r in range(shape[0])]

    return locate


class _Framing(io.RawIOBase):
    """What ``torch.save`` writes under ``skip_data``: the bytes before the storage's hole, the hole's length, the
    bytes after it (the zip writer seeks over the hole, relative to where it is)."""

    def __init__(self) -> None:
        super().__init__()
        self.parts: list[bytearray] = [bytearray()]
        self.hole: int | None = None
        self.pos = 0

    def writable(self) -> bool:
        return True

    def write(self, b) -> int:
        n = len(memoryview(b).cast("B"))
        self.parts[-1] += b
        self.pos += n
        return n

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        if whence != io.SEEK_CUR or self.hole is not None:
            raise RuntimeError("torch.save under skip_data wrote a layout this writer does not know (one hole expected)")
        self.hole = offset
        self.parts.append(bytearray())
        self.pos += offset
        return self.pos

    def tell(self) -> int:
        return self.pos


def _framing(sizes: tuple[int, ...], dtype: torch.dtype) -> tuple[bytes, int, bytes]:
    """The ``torch.save`` archive of a contiguous ``sizes`` ``dtype`` tensor, less its storage's bytes: (head, hole
    length, tail). The empty tensor is never touched, so its (virtual) memory never becomes resident."""
    sink = _Framing()
    with torch.serialization.skip_data():
        torch.save(torch.empty(sizes, dtype=dtype), sink)
    if sink.hole is None:  # a zero-byte storage leaves no hole
        return bytes(sink.parts[0]), 0, b""
    return bytes(sink.parts[0]), sink.hole, bytes(sink.parts[1])


class HashingFileSystem(FileSystem):
    """DCP's local file system, every file it writes (the ``.metadata``) hashed while written
    (:class:`~ernie45.bridge.io.HashingFile`). ``records``: ``{file name: {"bytes", "sha256"}}``, the ``.distcp``
    files :class:`ZeroCopyWriter` writes included."""

    def __init__(self, phases: Phases, fsync: bool) -> None:
        super().__init__()
        self.phases, self.fsync = phases, fsync
        self.records: dict[str, dict] = {}

    @contextlib.contextmanager
    def create_stream(self, path, mode: str):
        if mode != "wb":
            with super().create_stream(path, mode) as stream:
                yield stream
            return
        with HashingFile(Path(path), phases=self.phases, fsync=self.fsync) as stream:
            yield stream
        self.records[Path(path).name] = stream.record()

    def rename(self, path, new_path) -> None:  # DCP writes .metadata under a temporary name first
        super().rename(path, new_path)
        self.records[Path(new_path).name] = self.records.pop(Path(path).name)


class ZeroCopyWriter(FileSystemWriter):
    """DCP's file writer, its data written by :class:`OutputFile`: a chunk the planner resolves to a list of
    :class:`FileRange` is copied in the kernel inside its ``torch.save`` framing, a tensor is ``torch.save``-d, a
    byte object written as is. The items are spread over ``threads`` files (largest first, each to the least
    filled), written in parallel; in each file the byte objects come first and the chunks follow in plan order, as
    in DCP's own writer. No storage metadata is pickled into ``.metadata`` (a random save id and the temporary
    directory's path): two conversions of the same source give identical files. ``fs.records``: the checksums."""

    def __init__(self, path: Path, *, threads: int = 2, phases: Phases = NO_PHASES, fsync: bool = False) -> None:
        super().__init__(str(path), single_file_per_rank=True, thread_count=threads, sync_files=False)
        self.fs = HashingFileSystem(phases, fsync)
        self.phases, self.fsync = phases, fsync

    def storage_meta(self):
        return None

    def write_data(self, plan: SavePlan, planner: SavePlanner) -> torch.futures.Future[list[WriteResult]]:
        where = _spread(plan.items, self.thread_count)
        names = [f"{plan.storage_data.prefix}{i}{DEFAULT_SUFFIX}" for i in range(max(where, default=-1) + 1)]
        # One thread writes every file, the items in plan order, the byte objects first (as DCP's own writer); each
        # file hashes on its own thread, so the hashing (the slowest part) runs on as many cores as there are files.
        files, results = [], []
        try:
            for name in names:
                files.append(OutputFile(Path(self.path) / name, phases=self.phases, fsync=self.fsync))
            order = sorted(range(len(plan.items)), key=lambda i: plan.items[i].type != WriteItemType.BYTE_IO)
            for i in order:
                item, f = plan.items[i], files[where[i]]
                offset = f.tell()
                self._write_item(item, planner.resolve_data(item), f)
                length = f.tell() - offset
                results.append(WriteResult(index=item.index, size_in_bytes=length,
                                           storage_data=_StorageInfo(names[where[i]], offset, length)))  # fmt: skip
        finally:
            for f in files:
                f.close()
        for name, f in zip(names, files):
            self.fs.records[name] = f.record()
        done: torch.futures.Future[list[WriteResult]] = torch.futures.Future()
        done.set_result(results)
        return done

    def _write_item(self, item: WriteItem, data, f: OutputFile) -> None:
        if isinstance(data, io.BytesIO):
            f.write(data.getbuffer())
        elif isinstance(data, list):  # of FileRange
            td = item.tensor_data
            with self.phases("serialise"):
                head, hole, tail = _framing(tuple(td.chunk.sizes), td.properties.dtype)
            if hole != sum(r.length for r in data):
                raise CheckpointError(f"{item.index.fqn}@{list(item.index.offset)}: {sum(r.length for r in data)} "
                                      f"bytes located in {data[0].path if data else '-'}, planned {hole}")  # fmt: skip
            f.write(head)
            f.copy(data)
            f.write(tail)
        else:
            with self.phases("serialise"):
                torch.save(data, f)
            # the source hands each chunk a storage of its own: freed here, memory stays at one chunk
            if data.untyped_storage().resizable():
                data.untyped_storage().resize_(0)


def _spread(items: list[WriteItem], n: int) -> list[int]:
    """The file (``0 .. n-1``) of each of ``items``, the files of about equal bytes: largest first, each to the
    least filled (ties: the first). Deterministic, so two conversions write the same files."""

    def size(item: WriteItem) -> int:
        if item.type == WriteItemType.BYTE_IO:
            return 0
        td = item.tensor_data
        k = td.properties.dtype.itemsize
        for s in td.chunk.sizes:
            k *= s
        return k

    fill, where = [0] * n, [0] * len(items)
    for i in sorted(range(len(items)), key=lambda i: -size(items[i])):
        where[i] = min(range(n), key=lambda j: fill[j])
        fill[where[i]] += size(items[i])
    return where


def _one_run(lo, hi, chunk_sizes, target_sizes) -> bool:
    """Whether the box ``[lo, hi)`` is one contiguous byte run both in the stored chunk and in the target chunk:
    past its first dim of extent > 1 it spans both whole. Anything else (a column slice: a run per row) is
    produced instead -- thousands of small kernel copies measured slower than one user-space pass."""
    ext = [b - a for a, b in zip(lo, hi)]
    first = next((d for d, e in enumerate(ext) if e > 1), len(ext))
    return all(ext[d] == chunk_sizes[d] == target_sizes[d] for d in range(first + 1, len(ext)))


class StoredChunks:
    """A torch_dist checkpoint's stored chunks as byte ranges of its files (``reader``: a
    :class:`~ernie45.bridge.torch_dist.TorchDistReader`). A reshard re-cuts stored bytes: whatever the ops between
    the two sides, a region of a key holds the same bytes in the source and in the target, so a target chunk that
    stored chunks tile is copied from their storage records, row runs in the target's order. The same holds for an
    HF tensor that is a region of a stored key (torch_dist → HF: :meth:`~ernie45.bridge.torch_dist.MegatronSource.locate`)."""

    def __init__(self, reader) -> None:
        self.reader = reader
        self._payload: dict[tuple[str, int], int] = {}  # (file, archive offset) -> offset of its storage bytes
        self._index: dict[str, _ChunkIndex] = {}  # key -> its stored chunks, indexed (built on first use)

    def region(self, key: str, offsets, sizes, *, rows: int | None = None) -> Callable[[], list[FileRange]] | None:
        """Where the bytes of ``key``'s region ``[offsets, offsets + sizes)`` lie, found when it is written, if
        stored chunks tile it and it lies in the first ``rows`` rows (a vocab: its padding is written as zeros,
        whatever a source stored there); else None (the chunk is produced)."""
        md = self.reader.metadata.state_dict_metadata.get(key)
        if not isinstance(md, TensorStorageMetadata) or math.prod(sizes) == 0 or len(offsets) != len(md.size):
            return None
        if rows is not None and offsets[0] + sizes[0] > rows:
            return None
        if key not in self._index:
            self._index[key] = _ChunkIndex(md.chunks)
        boxes = []
        for c in self._index[key].overlapping(offsets, sizes):
            lo = [max(o, co) for o, co in zip(offsets, c.offsets)]
            hi = [min(o + z, co + cz) for o, z, co, cz in zip(offsets, sizes, c.offsets, c.sizes)]
            if all(a < b for a, b in zip(lo, hi)):
                info = self.reader.metadata.storage_data[MetadataIndex(key, c.offsets)]
                if getattr(info, "transform_descriptors", None):  # a DCP stream extension (compression...)
                    return None
                if not _one_run(lo, hi, c.sizes, sizes):
                    return None
                boxes.append((c, lo, hi))
        if sum(math.prod(b - a for a, b in zip(lo, hi)) for _, lo, hi in boxes) != math.prod(sizes):
            return None
        return lambda: self._ranges(key, tuple(offsets), tuple(sizes), boxes, md.properties.dtype.itemsize)

    def _ranges(self, key, offsets, sizes, boxes, itemsize: int) -> list[FileRange]:
        runs = []  # (offset in the target chunk, file, offset in the file, bytes)
        for c, lo, hi in boxes:
            path, payload = self._storage_bytes(key, c)
            for t, s, n in _runs(offsets, sizes, tuple(c.offsets), tuple(c.sizes), lo, hi):
                runs.append((t * itemsize, path, payload + s * itemsize, n * itemsize))
        runs.sort(key=lambda r: r[0])
        out: list[FileRange] = []
        for _, path, at, n in runs:  # runs that continue each other in the same file: one copy
            if out and out[-1].path == path and out[-1].offset + out[-1].length == at:
                out[-1] = FileRange(path, out[-1].offset, out[-1].length + n)
            else:
                out.append(FileRange(path, at, n))
        return out

    def _storage_bytes(self, key: str, chunk) -> tuple[Path, int]:
        """(file, offset) of the storage bytes of ``key``'s stored ``chunk``: the data record of its ``torch.save``
        archive, checked to hold exactly the chunk (contiguous, its dtype and shape) by loading the archive without
        its data (``skip_data``). The file's recorded checksum is checked first, as a read would."""
        info = self.reader.metadata.storage_data[MetadataIndex(key, chunk.offsets)]
        path = self.reader.path / info.relative_path
        if self.reader.checksums is not None:
            with self.reader.phases("hash input"):
                self.reader.checksums.check(info.relative_path)
        where = (info.relative_path, info.offset)
        if where not in self._payload:
            try:
                self._payload[where] = info.offset + self._record_start(path, info, key, chunk)
            except CheckpointError:
                raise
            except Exception as e:  # not a torch.save archive (a file replaced, no checksum recorded to say so)
                raise CheckpointError(f"{path}: cannot read {key}@{list(chunk.offsets)} "
                                      f"({type(e).__name__}: {e})") from None  # fmt: skip
        return path, self._payload[where]

    def _record_start(self, path: Path, info, key: str, chunk) -> int:
        """Where the storage bytes of the stored ``chunk`` start in its archive, checked to be the chunk's."""
        md = self.reader.metadata.state_dict_metadata[key]
        want = md.properties.dtype.itemsize * math.prod(chunk.sizes)
        with open(path, "rb") as f:
            view = _Slice(f, info.offset, info.length)
            with torch.serialization.skip_data():
                t = torch.load(view, map_location="cpu", weights_only=True)
            view.seek(0)
            records = [z for z in zipfile.ZipFile(view).infolist() if "/data/" in z.filename]
            ok = (isinstance(t, torch.Tensor) and tuple(t.shape) == tuple(chunk.sizes) and t.is_contiguous()
                  and t.dtype == md.properties.dtype and t.storage_offset() == 0 and len(records) == 1
                  and records[0].compress_type == zipfile.ZIP_STORED and records[0].file_size == want)  # fmt: skip
            if not ok:
                raise CheckpointError(f"{path}: the stored chunk {key}@{list(chunk.offsets)} is not one "
                                      "contiguous storage of its size")  # fmt: skip
            view.seek(records[0].header_offset)
            local = view.read(30)  # the local file header: its name and extra field lengths end it
            if local[:4] != b"PK\x03\x04":
                raise CheckpointError(f"{path}: corrupted archive of {key}@{list(chunk.offsets)}")
            return records[0].header_offset + 30 + int.from_bytes(local[26:28], "little") + \
                int.from_bytes(local[28:30], "little")  # fmt: skip


class _ChunkIndex:
    """One key's stored chunks, indexed along one dim (the one with the most distinct offsets: the experts, the
    row blocks, the TP cut), so a region visits only the chunks whose interval along it overlaps the region's,
    not every chunk (a reshard's planning was O(targets × stored) per key). :meth:`overlapping` yields them in
    stored order, as a scan of every chunk would meet them."""

    def __init__(self, chunks) -> None:
        self.chunks = list(chunks)
        ndim = len(self.chunks[0].offsets) if self.chunks else 0
        self.dim = max(range(ndim), key=lambda d: len({c.offsets[d] for c in self.chunks}), default=0)
        self.order = sorted(range(len(self.chunks)), key=self._start)  # chunk numbers, by their start along dim
        self.starts = [self._start(i) for i in self.order]
        # the longest extent along dim: a chunk starting further than this before a region's start cannot reach it
        self.reach = max((self._extent(i) for i in range(len(self.chunks))), default=0)

    def _start(self, i: int) -> int:
        return self.chunks[i].offsets[self.dim] if self.chunks[i].offsets else 0

    def _extent(self, i: int) -> int:
        return self.chunks[i].sizes[self.dim] if self.chunks[i].sizes else 1

    def overlapping(self, offsets, sizes) -> list:
        """The chunks whose interval along :attr:`dim` overlaps the region's (a superset of those the region
        overlaps: the caller intersects the boxes), in stored order."""
        if not offsets:  # a 0-d key: its one chunk
            return self.chunks
        a, b = offsets[self.dim], offsets[self.dim] + sizes[self.dim]
        first = bisect.bisect_right(self.starts, a - self.reach)  # start > a - reach: may end after a
        last = bisect.bisect_left(self.starts, b)  # start < b
        return [self.chunks[i] for i in sorted(self.order[first:last])]


def _runs(t_off, t_size, c_off, c_size, lo, hi) -> list[tuple[int, int, int]]:
    """The box ``[lo, hi)`` (inside target region ``t`` and stored chunk ``c``) as runs contiguous in both:
    (element offset in the target, in the chunk, elements). The dims after ``k`` are whole in box, target and
    chunk, so a run spans them and ``hi[k] - lo[k]`` of dim ``k``; the dims before ``k`` are iterated."""
    n = len(t_size)
    if n == 0:
        return [(0, 0, 1)]
    z = [b - a for a, b in zip(lo, hi)]
    k = n - 1
    while k > 0 and z[k] == t_size[k] == c_size[k]:
        k -= 1
    run = math.prod(z[k:])
    ts = [math.prod(t_size[d + 1 :]) for d in range(n)]
    cs = [math.prod(c_size[d + 1 :]) for d in range(n)]
    out = []
    for idx in itertools.product(*(range(z[d]) for d in range(k))):
        t = sum((lo[d] - t_off[d] + i) * ts[d] for d, i in enumerate(idx)) + (lo[k] - t_off[k]) * ts[k]
        c = sum((lo[d] - c_off[d] + i) * cs[d] for d, i in enumerate(idx)) + (lo[k] - c_off[k]) * cs[k]
        out.append((t, c, run))
    return out


class _Slice(io.RawIOBase):
    """Bytes ``[offset, offset + length)`` of an open file as a seekable file of their own (one archive)."""

    def __init__(self, f, offset: int, length: int) -> None:
        super().__init__()
        self._f, self._offset, self._length, self._pos = f, offset, length, 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def seek(self, pos: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: self._length}[whence]
        self._pos = min(max(0, base + pos), self._length)
        return self._pos

    def tell(self) -> int:
        return self._pos

    def readinto(self, b) -> int:
        n = min(len(b), self._length - self._pos)
        if n <= 0:
            return 0
        self._f.seek(self._offset + self._pos)
        got = self._f.readinto(memoryview(b)[:n])
        self._pos += got
        return got
