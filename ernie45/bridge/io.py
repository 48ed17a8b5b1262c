"""How tensors reach and leave disk: lazy safetensors reads, sharded writes, atomic output directories.

* :class:`HFCheckpoint` opens a HF directory (single ``model.safetensors``, or shards with
  ``model.safetensors.index.json``) and reads whole tensors or dim-0 / dim-1 slices lazily through
  ``safe_open(...).get_slice`` -- a rank only ever reads its own shard from disk. Pickle formats (``.bin``, ``.pt``,
  ``.pth``, ``.ckpt``) are refused, never unpickled. Index entries must point inside the directory.
* :class:`HFWriter` streams tensors into size-bounded shards with an index, inside a temporary directory that
  :func:`atomic_output` renames into place only when everything was written.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import math
import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable, Iterator

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

__all__ = ["CheckpointError", "HFCheckpoint", "HFWriter", "atomic_output", "write_safetensors_streaming", "SIDE_FILES"]

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


class CheckpointError(ValueError):
    """An unreadable or malformed checkpoint (names the file)."""


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

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
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
                self._file_of[name] = f
                self._shape[name] = tuple(sl.get_shape())
                self._dtype[name] = sl.get_dtype()
        self._check_index()

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
            try:
                self._index = json.loads(index.read_text())
                weight_map = self._index["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise CheckpointError(f"{index}: not a valid safetensors index ({e})") from None
            root = self.path.resolve()
            files = []
            for shard in sorted(set(weight_map.values())):
                p = (self.path / shard).resolve()
                if root not in p.parents:
                    raise CheckpointError(f"{index}: shard {shard!r} points outside the checkpoint directory")
                if not p.is_file():
                    raise CheckpointError(f"{index}: shard {shard!r} is missing")
                files.append(p)
            return files
        self._index = None
        if not st:
            raise CheckpointError(f"{self.path}: no *.safetensors files")
        return st

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
            n for n, shard in weight_map.items() if n not in self._file_of or self._file_of[n] != (self.path / shard).resolve()
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
        return _DTYPES[self._dtype[name]]

    def nbytes(self, name: str) -> int:
        n = self.dtype(name).itemsize
        for s in self._shape[name]:
            n *= s
        return n

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
        shape, dtype = self._shape[name], self.dtype(name)
        row_bytes = dtype.itemsize * math.prod(shape[1:])
        a, b = self._offsets[name]
        if dim == 0:
            stop = shape[0] if stop is None else stop
            a, b = a + start * row_bytes, a + stop * row_bytes
            shape = (stop - start, *shape[1:])
        elif dim not in (None, 1):
            raise ValueError(f"slicing along dim {dim} is not supported")
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
        return [self.path / n for n in SIDE_FILES if (self.path / n).is_file()]


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


class HFWriter:
    """Writes tensors into ``model-0000i-of-0000n.safetensors`` shards of at most ``max_shard_bytes`` + an index."""

    def __init__(self, out_dir: str | Path, *, max_shard_bytes: int = 5 * 2**30) -> None:
        self.out_dir = Path(out_dir)
        self.max_shard_bytes = max_shard_bytes
        self._pending: dict[str, torch.Tensor] = {}
        self._pending_bytes = 0
        self._shards: list[list[str]] = []
        self._total = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        if name in self._pending or any(name in s for s in self._shards):
            raise CheckpointError(f"tensor {name} written twice")
        nbytes = tensor.numel() * tensor.element_size()
        if self._pending and self._pending_bytes + nbytes > self.max_shard_bytes:
            self._flush()
        self._pending[name] = tensor.detach().contiguous()
        self._pending_bytes += nbytes
        self._total += nbytes

    def _flush(self) -> None:
        idx = len(self._shards)
        save_file(self._pending, str(self.out_dir / f"_shard{idx:05d}.safetensors"), metadata={"format": "pt"})
        self._shards.append(list(self._pending))
        self._pending, self._pending_bytes = {}, 0

    def close(self) -> list[str]:
        """Finish: name the shards, write the index (when sharded). Returns the file names."""
        if self._pending or not self._shards:
            self._flush()
        n = len(self._shards)
        if n == 1:
            names = ["model.safetensors"]
        else:
            names = [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
        for i, final in enumerate(names):
            os.replace(self.out_dir / f"_shard{i:05d}.safetensors", self.out_dir / final)
        if n > 1:
            weight_map = {t: names[i] for i, shard in enumerate(self._shards) for t in shard}
            index = {"metadata": {"total_size": self._total}, "weight_map": dict(sorted(weight_map.items()))}
            (self.out_dir / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")
        return names


def _remove_stale_temporaries(dst: Path) -> None:
    """Delete temporaries of earlier conversions into ``dst`` whose process is gone (killed, crashed)."""
    for stale in dst.parent.glob(f".{dst.name}.tmp-*-*"):
        pid = stale.name[len(f".{dst.name}.tmp-") :].split("-")[0]
        if not pid.isdigit():
            continue
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            shutil.rmtree(stale, ignore_errors=True) if stale.is_dir() else stale.unlink(missing_ok=True)
        except PermissionError:  # alive, someone else's
            pass


@contextlib.contextmanager
def atomic_output(dst: str | Path, *, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary directory beside ``dst``; on success it replaces ``dst``, on any error it is removed.

    A non-empty ``dst`` is refused unless ``overwrite``. Nothing at ``dst`` changes until the very end, so an
    interrupted conversion never leaves a destination that looks complete.
    """
    dst = Path(dst)
    if dst.exists() and (not dst.is_dir() or any(dst.iterdir())) and not overwrite:
        raise CheckpointError(f"{dst}: destination exists and is not empty (pass --overwrite to replace it)")
    dst.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_temporaries(dst)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dst.name}.tmp-{os.getpid()}-", dir=dst.parent))
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if dst.exists():
        old = dst.with_name(f".{dst.name}.old-{os.getpid()}")
        os.replace(dst, old)
        os.replace(tmp, dst)
        shutil.rmtree(old, ignore_errors=True) if old.is_dir() else old.unlink()
    else:
        os.replace(tmp, dst)


_ST_DTYPE = {v: k for k, v in _DTYPES.items()}


def write_safetensors_streaming(
    out_dir: Path,
    entries: list[tuple[str, tuple[int, ...], torch.dtype]],
    produce: Callable[[str], torch.Tensor],
    *,
    max_shard_bytes: int = 2 * 2**30,
    on_tensor: Callable[[int], None] = lambda n: None,
) -> list[str]:
    """Write ``entries`` (in order) as safetensors shards + index, producing one tensor at a time.

    The safetensors header needs every shape and offset before the first byte of data; the plan knows them, so
    each shard's header is written first and the tensors are streamed after it (peak memory: one tensor). The
    files are standard safetensors (read back by ``safe_open`` in the round-trip tests).
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
    total = 0
    for fname, shard in zip(names, shards):
        header: dict = {"__metadata__": {"format": "pt"}}
        offset = 0
        for name, shape, dtype in shard:
            nbytes = dtype.itemsize * math.prod(shape)
            header[name] = {"dtype": _ST_DTYPE[dtype], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
            offset += nbytes
        blob = json.dumps(header, separators=(",", ":")).encode()
        blob += b" " * (-len(blob) % 8)
        with open(out_dir / fname, "wb") as f:
            f.write(len(blob).to_bytes(8, "little"))
            f.write(blob)
            for name, shape, dtype in shard:
                t = produce(name)
                if tuple(t.shape) != tuple(shape) or t.dtype != dtype:
                    raise CheckpointError(f"{name}: produced {list(t.shape)} {t.dtype}, planned {list(shape)} {dtype}")
                data = t.contiguous().view(torch.uint8).numpy() if t.numel() else b""
                f.write(memoryview(data))
                on_tensor(t.numel() * t.element_size())
        total += offset
    if n > 1:
        weight_map = {name: fname for fname, shard in zip(names, shards) for name, _, _ in shard}
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        (out_dir / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")
    return names
