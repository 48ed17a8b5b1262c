"""Offline conversion: HF safetensors ⇄ Megatron-Core torch_dist (any TP/PP/EP layout) ⇄ GGUF, one CPU process.

Nothing here builds a model or a process group. Every conversion is

    source view (HF names)  --plan (totality)-->  target writer (streaming, atomic)

* :class:`HFSource` — an HF directory (lazy ``get_slice`` reads).
* :class:`MegatronSource` — a torch_dist directory seen through the bridge table as HF-named tensors: each one is
  materialised on demand from its Megatron tensor(s) (one expert of a stacked tensor at a time), so Megatron → HF,
  Megatron → Megatron (reshard) and Megatron → GGUF all stream.
* :func:`write_megatron` declares every chunk before any byte moves and lets PyTorch DCP pull them one at a time.
* :func:`write_hf` streams sharded safetensors + index.

torch_dist checkpoints are layout-independent by design (global shapes; Megatron reshards on load), so the layout
given for HF → Megatron decides the vocab padding (a multiple of TP), the chunking (one chunk per TP shard /
expert, what each rank of that layout reads; a vocab shard over :data:`ROW_BLOCK_BYTES` in row blocks, read back
block by block, so memory is bounded by a block rather than by the 530 MB embedding) and what is validated (heads,
KV groups, experts and layers must divide). Tensors the model does not use (MTP) are carried under
``ernie45.carry.<hf name>`` and come back bit-exact.

Speed (``ERNIE45_PHASES`` / ``benchmarks/convert.py`` say where the time goes): output checksums are hashed as the
bytes are written, on a second thread beside the kernel's write; DCP's ``torch.save`` of each chunk skips the zip
CRC32 that ``torch.load`` never checks (the sha256 covers it); ``--fsync`` syncs files, directory and rename.

Trust: a destination that is, contains or lies inside the source (links resolved) is refused for every target; a
source's stored shapes are checked against its config when it is opened; ernie45 records per-file sha256 checksums
of what it writes (torch_dist: ``ernie45.json`` ``checksums``; HF: an ``ernie45.json`` sidecar, which transformers
ignores; GGUF: the ``ernie45.sha256`` metadata entry, see ``bridge.gguf.open_gguf``) and checks each file before
its first read (``--verify-checksums``: all of them, up front). A torch_dist Megatron wrote has none: it is read
with a note saying so. Flags the chosen target would ignore are refused.
"""

from __future__ import annotations

import io
import json
import math
import os
import shutil
import time
from collections import Counter
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch

from .bridge.io import (
    INDEX_NAME,
    INFO_NAME,
    NO_PHASES,
    Checksums,
    CheckpointError,
    HFCheckpoint,
    Phases,
    atomic_output,
    read_json,
    record_checksums,
    refuse_overlap,
    side_files_of,
    write_safetensors_streaming,
)
from .bridge.dcp_write import StoredChunks, file_rows
from .bridge.layout import shard_bounds
from .bridge.live import _read_hf_slices
from .bridge.ops import ConcatGLU, Identity
from .bridge.plan import Plan, PlanError, plan_from_hf
from .bridge.tables import Item, Split, expand, ignored_reason
from .bridge.torch_dist import MEGATRON_METADATA, ChunkSpec, TorchDistReader, dist_key, extra_state_keys, write_dcp
from .config import ErnieConfig, load_config
from .errors import UsageError
from .megatron.parallel import Layout

__all__ = ["HFSource", "MegatronSource", "open_source", "write_megatron", "write_hf", "convert", "ConversionReport"]

CARRY_PREFIX = "ernie45.carry."
MEGATRON_VIT_PREFIX = "vision_model.decoder.layers."
# the vocab tensors (the largest: 530 MB at 21B) are written and read in row blocks of at most this: memory is
# bounded by a block, not by the largest tensor
ROW_BLOCK_BYTES = 64 * 2**20


class HFSource:
    """An HF checkpoint directory as a tensor source."""

    format = "hf"

    def __init__(self, path: str | Path, *, vit: str = "hf", phases: Phases = NO_PHASES) -> None:
        self.path = Path(path)
        cfg = load_config(path)
        # the Megatron side's ViT (VL only): the HF files are the same either way, the Megatron names differ
        self.cfg = replace(cfg, vit_impl=vit) if cfg.family == "vl" else cfg
        self.ckpt = HFCheckpoint(path, phases=phases)
        self.plan = plan_from_hf(self.cfg, self.ckpt.shapes(), dtypes=self.ckpt.dtypes(), where=str(path))

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

    def read(self, name: str, dim: int | None = None, start: int = 0, stop: int | None = None) -> torch.Tensor:
        return self.ckpt.read(name, dim, start, stop)

    def get(self, name: str) -> torch.Tensor:
        return self.ckpt.read(name)

    def side_files(self) -> list[Path]:
        return self.ckpt.side_files()

    def source_files(self) -> list[Path]:
        return [self.path, *self.ckpt.source_files()]

    @property
    def checksums(self) -> Checksums | None:
        return self.ckpt.checksums

    @property
    def notes(self) -> list[str]:
        return []  # an HF checkpoint without ernie45's checksums is the normal case (every hub release): no note


class MegatronSource:
    """A torch_dist checkpoint seen as HF-named tensors (through the bridge table, inverse ops)."""

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

    def keys(self) -> list[str]:
        return list(self._by_hf) + self.carried

    def shapes(self) -> dict[str, tuple[int, ...]]:
        return {n: self.shape(n) for n in self.keys()}

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
        if item is None or item.split is not Split.VOCAB or not isinstance(item.op, Identity) or len(item.mg) != 1:
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


def open_source(
    path: str | Path, *, hf_config: str | Path | None = None, vit: str | None = None, phases: Phases = NO_PHASES
) -> HFSource | MegatronSource:
    """``vit`` ("hf" / "megatron", VL only): the ViT of the Megatron side, for an HF source; a torch_dist source
    says which it holds, and asking for the other is an error (convert through HF to switch). ``phases``: times
    the source's reads and checksum checks."""
    from .inspect import detect_format

    fmt = detect_format(path)
    if fmt == "hf":
        source = HFSource(path, vit=vit or "hf", phases=phases)
    elif fmt == "megatron":
        source = MegatronSource(path, hf_config=hf_config, phases=phases)
        if vit is not None and source.cfg.family == "vl" and vit != source.cfg.vit_impl:
            raise UsageError(f"{path} holds the {source.cfg.vit_impl!r} ViT; to change it to {vit!r}, convert to HF "
                             "first")  # fmt: skip
    else:
        raise CheckpointError(f"{path}: a {fmt} file cannot be a conversion source")
    if vit is not None and source.cfg.family != "vl":
        raise UsageError(f"--vit chooses the ViT of a VL model; {path} is a {source.cfg.family} model")
    return source


# ------------------------------------------------------------------------------------------------------------------
# planning the Megatron side


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

        if isinstance(item.op, ConcatGLU):
            # Megatron's own layout for [gate; up]: each half cut into TP pieces (reference §H.4)
            F = shape[0] // 2
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
                t = item.op.to_mg(_read_hf_slices(source, item, i, n, cfg))[k]
                return t.reshape(*lead, *sizes)

            if (item.split is Split.VOCAB and isinstance(item.op, Identity) and len(item.hf) == 1
                    and dtype.itemsize * math.prod(sizes) > row_block_bytes):  # fmt: skip
                out += _vocab_row_blocks(item, source, sizes[0], i, gshape, dtype, row_block_bytes)
                continue
            # the HF tensor's own bytes (an Identity: whole, a dim-0 slice short of the vocab padding, a dim-1 slice
            # row by row): copied
            d = 0 if dim is None or n == 1 else dim
            cut = (offsets[d], offsets[d] + sizes[d]) if sizes else (0, None)
            same = isinstance(item.op, Identity) and (d == 0 or item.op.hf_blocks == 1) and (
                dim != 0 or n == 1 or item.op.hf_blocks == 1 and cut[1] <= item.hf_shapes[0][0])  # fmt: skip
            spec(tuple(offsets), tuple(sizes), produce, _unchanged(source, item.hf[0], *cut, dim=d) if same else None)
    return out


def _unchanged(source, name: str, start: int = 0, stop: int | None = None, *, dim: int = 0):
    """Where the slice ``[start, stop)`` along ``dim`` of ``name`` lies unchanged in an HF source's file (a chunk
    copied in the kernel, :mod:`ernie45.bridge.dcp_write`); None for a torch_dist source (``StoredChunks``)."""
    return file_rows(source.ckpt, name, start, stop, dim=dim) if isinstance(source, HFSource) else None


@dataclass
class ConversionReport:
    source: str
    destination: str
    to: str
    layout: str | None
    tensors: int
    bytes: int
    seconds: float
    ignored: list[str] = field(default_factory=list)
    carried: list[str] = field(default_factory=list)
    dry_run: bool = False
    plan_text: str = ""
    notes: list[str] = field(default_factory=list)  # what the reader wants said (e.g. no checksums to check)

    def summary(self) -> str:
        mb = self.bytes / 2**20
        head = "planned" if self.dry_run else "wrote"
        lines = [f"{head} {self.destination} ({self.to}{', ' + self.layout if self.layout else ''}): "
                 f"{self.tensors} tensors, {mb:.1f} MiB" + ("" if self.dry_run else f" in {self.seconds:.2f} s")]
        lines += [f"  carried (not used by the model, kept bit-exact): {n}" for n in self.carried]
        lines += [f"  ignored: {n}" for n in self.ignored]
        lines += [f"  note: {n}" for n in self.notes]
        return "\n".join(lines)

    def to_json(self) -> dict:
        d = asdict(self)
        d.pop("plan_text")
        return d


def _progress(total: int, desc: str, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="B", unit_scale=True, unit_divisor=1024, disable=not enabled, leave=False)


def _carried(source) -> list[str]:
    """Source tensors outside the model that are carried through (the declared-ignore table, e.g. MTP)."""
    if isinstance(source, MegatronSource):
        return source.carried
    return [n for n, _ in source.plan.ignored]


def plan_megatron(source, layout: Layout, *, row_block_bytes: int = ROW_BLOCK_BYTES
                  ) -> tuple[list[ChunkSpec], dict[str, bytes]]:  # fmt: skip
    cfg = source.cfg
    layout.validate(cfg)
    chunks: list[ChunkSpec] = []
    # a reshard re-cuts stored bytes: a chunk that stored chunks tile is copied from them (not the vocab padding)
    stored = StoredChunks(source.reader) if isinstance(source, MegatronSource) else None
    for item in source.plan.items:
        cut = _chunks_for(item, source, layout, cfg, row_block_bytes)
        if stored is not None:
            rows = item.hf_shapes[0][0] if item.split is Split.VOCAB else None
            cut = [replace(c, copy_from=stored.region(c.key, c.offsets, c.sizes, rows=rows)) for c in cut]
        chunks += cut
    for name in _carried(source):
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


def write_megatron(source, dst: Path, layout: Layout, *, overwrite=False, progress=True, phases: Phases = NO_PHASES,
                   fsync: bool = False, row_block_bytes: int = ROW_BLOCK_BYTES) -> int:
    """``fsync``: durable (files, directory and rename synced); ``phases``: where the time goes;
    ``row_block_bytes``: the largest chunk a vocab tensor is written in (memory is bounded by it)."""
    with phases("plan"):
        chunks, objects = plan_megatron(source, layout, row_block_bytes=row_block_bytes)
    total = sum(c.nbytes for c in chunks)
    with (atomic_output(dst, overwrite=overwrite, phases=phases, fsync=fsync) as tmp,
          _progress(total, "HF -> torch_dist", progress) as bar):  # fmt: skip
        written = write_dcp(tmp, chunks, objects, on_chunk=bar.update, phases=phases, fsync=fsync)
        (tmp / "metadata.json").write_text(json.dumps(MEGATRON_METADATA))
        torch.save({}, tmp / "common.pt")  # Megatron's common (non-sharded) state: nothing for a bare conversion
        data_files = [f.name for f in tmp.iterdir()]
        (tmp / "config.json").write_text(json.dumps(source.cfg.to_hf(), indent=2, sort_keys=True) + "\n")
        info = dict(
            format="ernie45 torch_dist", version=1, family=source.cfg.family, tied=source.plan.tied,
            layout=asdict(layout), vocab_size=source.cfg.vocab_size, carried=_carried(source), vit=source.cfg.vit_impl,
            local_spec="megatron-core local spec, SequentialMLP experts",
            checksums=record_checksums(tmp, data_files, known=written, phases=phases),
        )  # fmt: skip
        (tmp / INFO_NAME).write_text(json.dumps(info, indent=2) + "\n")
        _copy_side_files(source, tmp)
    return total


def write_hf(source, dst: Path, *, overwrite=False, progress=True, max_shard_bytes: int = 2 * 2**30,
             phases: Phases = NO_PHASES, fsync: bool = False, row_block_bytes: int = ROW_BLOCK_BYTES) -> int:
    """``fsync``: durable (files, directory and rename synced); ``phases``: where the time goes;
    ``row_block_bytes``: a torch_dist source's vocab tensors are streamed in row blocks of this."""
    with phases("plan"):
        names = [n for it in source.plan.items for n in it.hf] + _carried(source)
        entries = [(n, tuple(source.shape(n)), source.dtype(n)) for n in names]
    total = sum(d.itemsize * math.prod(s) for _, s, d in entries)
    with (atomic_output(dst, overwrite=overwrite, phases=phases, fsync=fsync) as tmp,
          _progress(total, "-> HF safetensors", progress) as bar):  # fmt: skip
        produce = (lambda n: source.stream(n, row_block_bytes)) if isinstance(source, MegatronSource) else source.get
        written = write_safetensors_streaming(tmp, entries, produce, max_shard_bytes=max_shard_bytes,
                                              on_tensor=bar.update, phases=phases, fsync=fsync)  # fmt: skip
        files = [*written, *([INDEX_NAME] if (tmp / INDEX_NAME).exists() else [])]
        (tmp / "config.json").write_text(json.dumps(source.cfg.to_hf(), indent=2, sort_keys=True) + "\n")
        # transformers ignores this sidecar; ernie45 checks the weights against it when it reads them back
        info = dict(format="ernie45 hf", version=1, checksums=record_checksums(tmp, files, known=written, phases=phases))
        (tmp / INFO_NAME).write_text(json.dumps(info, indent=2) + "\n")
        _copy_side_files(source, tmp)
    return total


def _copy_side_files(source, tmp: Path) -> None:
    for f in source.side_files():  # checked at listing: regular files inside the checkpoint (or its HF cache)
        if f.name == "config.json":
            continue
        if f.suffix == ".json":  # a tokenizer / processor file that does not parse is named, not carried along
            read_json(f, f"JSON side file ({f.name})")
        shutil.copyfile(f, tmp / f.name)


def _plan_text(source, layout: Layout | None, to: str) -> str:
    lines = [f"{'HF names':<70} -> {'target':<62} {'op':<22} {'split':<14} bytes"]
    for item in source.plan.items:
        nbytes = sum(source.dtype(item.hf[0]).itemsize * math.prod(s) for s in item.hf_shapes)
        target = ", ".join(dist_key(m)[0] + (f"[{dist_key(m)[1]}]" if dist_key(m)[1] is not None else "") for m in item.mg)
        if to == "hf":
            target = ", ".join(item.hf)
        lines.append(f"{', '.join(item.hf):<70} -> {target:<62} {item.op.describe():<22} {item.split.value:<14} {nbytes}")
    for name in _carried(source):
        lines.append(f"{name:<70} -> {CARRY_PREFIX + name:<62} carried (declared ignore table)")
    if isinstance(source, HFSource):
        from .bridge.tables import IGNORED

        lines.append("declared-ignore table:")
        lines += [f"  {p}: {why}" for p, why in IGNORED.items()]
    return "\n".join(lines)


def convert(
    src: str | Path,
    dst: str | Path,
    *,
    to: str,
    tp: int | None = None,
    pp: int | None = None,
    ep: int | None = None,
    etp: int | None = None,
    vpp: int | None = None,
    first: int | None = None,
    last: int | None = None,
    dry_run: bool = False,
    overwrite: bool = False,
    hf_config: str | Path | None = None,
    outtype: str | None = None,
    vit: str | None = None,
    verify_checksums: bool = False,
    progress: bool = True,
    fsync: bool = False,
    phases: Phases | None = None,
) -> ConversionReport:
    """Convert ``src`` (HF dir or torch_dist dir) to ``to`` in {"megatron", "hf", "gguf"} at ``dst``.

    The layout flags (``tp`` ... ``last``, ``vit``) belong to a Megatron target, ``outtype`` (default f32) to a
    GGUF one; giving one to another target is an error rather than ignored. ``vit`` (VL, ``to="megatron"``): "hf"
    (default) writes transformers' ViT replicated, "megatron" the TP-sharded Megatron-Core ViT
    (``ErnieConfig.vit_impl``). ``verify_checksums``: check every file of the source against the checksums
    ernie45 recorded when it wrote it, before writing anything (without it each file is checked when first read).
    ``fsync`` (megatron / hf targets): durable -- every file and the directory reach the disk before the final
    rename, and the rename after it.

    ``phases``: where the time goes (:class:`~ernie45.bridge.io.Phases`: planning, reads, ops, serialisation,
    the kernel's writes, hashing, rename). When not given and ``ERNIE45_PHASES`` names a file, the phases (and the
    wall-clock start and end) are written there as JSON -- what ``benchmarks/convert.py`` reads.
    """
    t0 = time.time()
    phases_file = os.environ.get("ERNIE45_PHASES") if phases is None else None
    if phases is None:
        phases = Phases() if phases_file else NO_PHASES
    report = _convert(src, dst, to=to, tp=tp, pp=pp, ep=ep, etp=etp, vpp=vpp, first=first, last=last,
                      dry_run=dry_run, overwrite=overwrite, hf_config=hf_config, outtype=outtype, vit=vit,
                      verify_checksums=verify_checksums, progress=progress, fsync=fsync, phases=phases)  # fmt: skip
    report.seconds = time.time() - t0
    if phases_file:
        seconds = dict(phases.seconds, other=report.seconds - sum(phases.seconds.values()))
        Path(phases_file).write_text(json.dumps({"started": t0, "finished": t0 + report.seconds, "seconds": seconds}))
    return report


def _convert(src, dst, *, to, tp, pp, ep, etp, vpp, first, last, dry_run, overwrite, hf_config, outtype, vit,
             verify_checksums, progress, fsync, phases: Phases) -> ConversionReport:
    if to not in ("megatron", "hf", "gguf"):
        raise UsageError(f"--to must be megatron, hf or gguf, not {to!r}")
    layout_flags = dict(tp=tp, pp=pp, ep=ep, etp=etp, vpp=vpp, first=first, last=last, vit=vit)
    ignored_flags = [f"--{k}" for k, v in layout_flags.items() if v is not None and to != "megatron"]
    ignored_flags += ["--outtype"] if outtype is not None and to != "gguf" else []
    ignored_flags += ["--fsync"] if fsync and to == "gguf" else []
    if ignored_flags:
        raise UsageError(f"{', '.join(ignored_flags)} {'does' if len(ignored_flags) == 1 else 'do'} not apply to "
                         f"--to {to} (layout flags and --vit are for --to megatron, --outtype for --to gguf, --fsync for "
                         "megatron and hf)")  # fmt: skip
    with phases("plan"):
        source = open_source(src, hf_config=hf_config, vit=vit, phases=phases)
    dst = Path(dst)
    refuse_overlap(source.source_files(), dst)
    if dst.exists() and not overwrite and (not dst.is_dir() or any(dst.iterdir())):
        raise CheckpointError(f"{dst}: destination exists and is not empty (pass --overwrite to replace it)")
    layout = None
    if to == "megatron":
        layout = Layout(tp=tp or 1, pp=pp or 1, ep=ep or 1, etp=etp, vpp=vpp or 1, first=first, last=last)
        layout.validate(source.cfg)
    if to == "hf" and source.format == "hf":
        raise UsageError(f"{src} is already an HF checkpoint")
    if verify_checksums:
        if source.checksums is None or source.checksums.note:
            raise CheckpointError(f"{src}: --verify-checksums: no checksums recorded (not written by ernie45)")
        source.checksums.check_all()
    report = ConversionReport(
        source=str(src), destination=str(dst), to=to, layout=str(layout) if layout else None,
        tensors=len(source.keys()), bytes=sum(source.dtype(n).itemsize * math.prod(source.shape(n)) for n in source.keys()),
        seconds=0.0, ignored=[], carried=_carried(source), dry_run=dry_run, notes=list(source.notes),
    )  # fmt: skip
    if dry_run:
        report.plan_text = _plan_text(source, layout, to)
        return report
    if to == "megatron":
        write_megatron(source, dst, layout, overwrite=overwrite, progress=progress, phases=phases, fsync=fsync)
    elif to == "hf":
        write_hf(source, dst, overwrite=overwrite, progress=progress, phases=phases, fsync=fsync)
    else:
        from .bridge.gguf import export_gguf

        gg = export_gguf(source, source.cfg, dst, outtype=outtype or "f32", tokenizer_dir=_tokenizer_dir(source),
                         overwrite=overwrite, progress=progress)  # fmt: skip
        report.ignored = list(getattr(gg, "ignored", []))
        report.carried = []
    return report


def _tokenizer_dir(source) -> Path | None:
    # side_files() checked it: a regular file inside the checkpoint (or its HF cache), never a link elsewhere
    return source.path if any(f.name == "tokenizer.model" for f in source.side_files()) else None


def inspect_torch_dist(path: str | Path) -> dict:
    """``ernie45 inspect`` for torch_dist directories."""
    from .inspect import model_facts

    src = MegatronSource(path)
    cfg = src.cfg
    layout = src.info.get("layout")
    out = {"format": "megatron-core torch_dist", **model_facts(cfg, tied=src.tied)}
    if cfg.family == "vl":
        out["vision"] += f"; {'Megatron-Core (TP-sharded)' if cfg.vit_impl == 'megatron' else 'transformers'} ViT"
    out.update({
        "written for layout": str(Layout(**layout)) if layout else "unknown (not written by ernie45); loads at any",
        "tensors": len(src.reader.keys()),
        "dtypes": dict(Counter(str(src.reader.dtype(k)).replace("torch.", "") for k in src.reader.keys())),
        "size on disk": f"{sum(f.stat().st_size for f in Path(path).glob('*.distcp')) / 2**20:.1f} MiB",
        "mtp tensors": sum(1 for n in src.carried if "mtp" in n),
        "checksums": src.checksums.note or f"ok ({src.checksums.check_all()} files match what ernie45 recorded)",
    })  # fmt: skip
    return out
