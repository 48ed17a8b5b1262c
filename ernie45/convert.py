"""Offline conversion: HF safetensors ⇄ Megatron-Core torch_dist (any TP/PP/EP layout) ⇄ GGUF, one CPU process.

Nothing here builds a model or a process group. Every conversion is

    source (HF names, ``bridge.source.open_source``)  --plan (totality)-->  target writer (streaming, atomic)

and this module only orchestrates it: the sources are ``bridge.source`` (HF), ``bridge.torch_dist`` and
``bridge.gguf``; the writers ``bridge.torch_dist.write_megatron`` (every chunk declared before any byte moves,
PyTorch DCP pulls them one at a time), :func:`write_hf` (``bridge.io.write_hf_files``: sharded safetensors + index,
streamed) and ``bridge.gguf.export_gguf``.

Speed (``ERNIE45_PHASES`` / ``benchmarks/convert.py`` say where the time goes; docs/convert-speed.md): a
torch_dist chunk that is unchanged bytes of a source file (HF tensors whole or cut along dim 0, gate / up halves,
experts, a reshard's re-cut stored chunks) is copied in the kernel (``bridge/dcp_write.py``) inside the archive
``torch.save`` would write; output checksums are hashed on one thread per data file beside the writes; DCP's
``torch.save`` of a produced chunk skips the zip CRC32 that ``torch.load`` never checks (the sha256 covers it);
``--fsync`` syncs files, directory and rename; the CLI leaves with ``os._exit`` once the output is in place.

Trust: a destination that is, contains or lies inside the source (links resolved) is refused for every target; a
source's stored shapes are checked against its config when it is opened; ernie45 records per-file sha256 checksums
of what it writes (torch_dist: ``ernie45.json`` ``checksums``; HF: an ``ernie45.json`` sidecar, which transformers
ignores; GGUF: the ``ernie45.sha256`` metadata entry, see ``bridge.gguf.open_gguf``) and checks each file before
its first read (``--verify-checksums``: all of them, up front). A torch_dist Megatron wrote has none: it is read
with a note saying so. Flags the chosen target would ignore are refused.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .bridge.io import (
    NO_PHASES,
    CheckpointError,
    Phases,
    atomic_output,
    copy_side_files,
    progress_bar,
    refuse_overlap,
    write_hf_files,
)
from .bridge.source import Source, open_source
from .bridge.tables import IGNORED
from .bridge.torch_dist import CARRY_PREFIX, ROW_BLOCK_BYTES, dist_key, source_checks, write_megatron
from .errors import UsageError
from .layout import Layout

__all__ = ["write_hf", "convert", "ConversionReport"]


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


def write_hf(source: Source, dst: Path, *, overwrite=False, progress=True, max_shard_bytes: int = 2 * 2**30,
             phases: Phases = NO_PHASES, fsync: bool = False, row_block_bytes: int = ROW_BLOCK_BYTES) -> int:
    """``source`` as an HF checkpoint at ``dst``: its model tensors, then the carried ones (MTP), streamed; a
    torch_dist source's tensors that are its stored bytes unchanged (``MegatronSource.locate``) copied by the kernel.
    ``fsync``: durable (files, directory and rename synced); ``phases``: where the time goes;
    ``row_block_bytes``: a torch_dist source's vocab tensors are streamed in row blocks of this."""
    with source_checks(source):  # a torch_dist source's checksums checked on both cores, each before its file's use
        return _write_hf(source, dst, overwrite=overwrite, progress=progress, max_shard_bytes=max_shard_bytes,
                         phases=phases, fsync=fsync, row_block_bytes=row_block_bytes)  # fmt: skip


def _write_hf(source: Source, dst: Path, *, overwrite, progress, max_shard_bytes: int, phases: Phases, fsync: bool,
              row_block_bytes: int) -> int:
    with phases("plan"):
        names = [n for it in source.plan.items for n in it.hf] + source.carried
        entries = [(n, tuple(source.shape(n)), source.dtype(n)) for n in names]
    total = sum(d.itemsize * math.prod(s) for _, s, d in entries)

    def produce(name: str):
        # a torch_dist source's tensor that is stored records byte for byte: where they lie (copied by the kernel)
        where = source.locate(name) if source.format == "megatron" else None
        if where is None:
            return source.stream(name, row_block_bytes)
        with phases("plan"):
            return where()

    with (atomic_output(dst, overwrite=overwrite, phases=phases, fsync=fsync) as tmp,
          progress_bar(total, "-> HF safetensors", progress) as bar):  # fmt: skip
        write_hf_files(tmp, source.cfg.to_hf(), entries, produce, max_shard_bytes=max_shard_bytes,
                       on_tensor=bar.update, phases=phases, fsync=fsync)  # fmt: skip
        copy_side_files(source.side_files(), tmp)
    return total


def _plan_text(source: Source, layout: Layout | None, to: str) -> str:
    lines = [f"{'HF names':<70} -> {'target':<62} {'op':<22} {'split':<14} bytes"]
    for item in source.plan.items:
        nbytes = sum(source.dtype(item.hf[0]).itemsize * math.prod(s) for s in item.hf_shapes)
        target = ", ".join(dist_key(m)[0] + (f"[{dist_key(m)[1]}]" if dist_key(m)[1] is not None else "") for m in item.mg)
        if to == "hf":
            target = ", ".join(item.hf)
        lines.append(f"{', '.join(item.hf):<70} -> {target:<62} {item.op.describe():<22} {item.split.value:<14} {nbytes}")
    for name in source.carried:
        lines.append(f"{name:<70} -> {CARRY_PREFIX + name:<62} carried (declared ignore table)")
    if source.format == "hf":
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
    # a torch_dist source's checksums checked on both cores from now on (not for a dry run, which reads nothing)
    with contextlib.nullcontext() if dry_run else source_checks(source):
        return _convert_opened(source, src, dst, to=to, tp=tp, pp=pp, ep=ep, etp=etp, vpp=vpp, first=first,
                               last=last, dry_run=dry_run, overwrite=overwrite, outtype=outtype, vit=vit,
                               verify_checksums=verify_checksums, progress=progress, fsync=fsync, phases=phases)  # fmt: skip


def _convert_opened(source, src, dst, *, to, tp, pp, ep, etp, vpp, first, last, dry_run, overwrite, outtype, vit,
                    verify_checksums, progress, fsync, phases: Phases) -> ConversionReport:
    if source.format == "gguf":
        raise CheckpointError(f"{src}: a gguf file cannot be a conversion source")
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
        seconds=0.0, ignored=[], carried=source.carried, dry_run=dry_run, notes=list(source.notes),
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
        report.ignored = list(gg.ignored)
        report.carried = []
    return report


def _tokenizer_dir(source: Source) -> Path | None:
    # side_files() checked it: a regular file inside the checkpoint (or its HF cache), never a link elsewhere
    return source.path if any(f.name == "tokenizer.model" for f in source.side_files()) else None
