"""HF → torch_dist with the unchanged bytes copied in the kernel (``ernie45.bridge.dcp_write``).

Oracles independent of the writer: ``torch.save`` itself (each archive must be byte for byte what it writes for
the tensor), PyTorch's stock DCP ``FileSystemReader`` with its default planner, ``hashlib`` over the bytes on disk,
``safetensors.torch.load_file``. That Megatron-Core's ``dist_checkpointing.load`` reads a checkpoint written this
way into live models at TP2 and at EP2 with transformers' logits is
tests/test_convert_speed_paths.py::test_vocab_written_in_row_blocks_loads_with_megatron_at_two_layouts and
tests/test_distributed.py::test_offline_checkpoint_loads_into_live_models_at_two_layouts (both convert through
this writer; here it is checked that they do copy).
"""

from __future__ import annotations

import dataclasses
import hashlib
import io

import pytest
import torch
import torch.distributed.checkpoint as dcp
from safetensors.torch import load_file
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.filesystem import FileSystemReader

from ernie45.bridge import torch_dist
from ernie45.bridge.dcp_write import _framing
from ernie45.bridge.source import HFSource
from ernie45.bridge.torch_dist import plan_megatron, write_dcp
from ernie45.layout import Layout
from ernie45.testing import assert_bit_exact, write_tiny_checkpoint


@pytest.mark.parametrize("shape, dtype", [((3, 5), torch.bfloat16), ((1, 7, 4), torch.float32), ((6,), torch.float16),
                                          ((), torch.float32), ((0, 4), torch.bfloat16), ((2, 3), torch.int64)])  # fmt: skip
def test_framing_around_the_bytes_is_what_torch_save_writes(shape, dtype):
    t = torch.randn(shape, generator=torch.Generator().manual_seed(0)).to(dtype)
    with torch_dist._without_zip_crc32():
        want = io.BytesIO()
        torch.save(t, want)
        head, hole, tail = _framing(tuple(shape), dtype)
    assert hole == t.numel() * t.element_size()
    assert head + bytes(t.untyped_storage()) + tail == want.getvalue()


@pytest.fixture(scope="module")
def big_vocab(tmp_path_factory):
    # a 24576-row vocab: the embedding in several 256 KiB row blocks below
    return write_tiny_checkpoint(tmp_path_factory.mktemp("zc") / "hf", "moe", seed=4, vocab_size=24576)


@pytest.mark.parametrize("layout", [Layout(tp=2, pp=2, ep=2), Layout(tp=2, ep=2, etp=2)], ids=str)
def test_copied_checkpoint_is_the_torch_save_one_byte_for_byte(big_vocab, tmp_path, layout):
    """The same plan written with the unchanged chunks copied, and with every chunk produced and ``torch.save``-d:
    identical files. Every chunk but the fused QKV and the squeezed expert bias (ops) and the row-parallel (dim-1)
    TP slices (a run per row: produced, see ``dcp_write._one_run``) is copied: whole tensors, dim-0 slices and row
    blocks, each in one range."""
    source = HFSource(big_vocab)
    chunks, objects = plan_megatron(source, layout, row_block_bytes=2**18)
    produced = {c.key.rsplit(".", 2)[-2] for c in chunks if c.copy_from is None}
    split_cols = layout.tp > 1
    assert produced == {"linear_qkv", "router"} | ({"linear_proj", "linear_fc2"} if split_cols else set())
    assert any(c.copy_from for c in chunks if "linear_fc1" in c.key)  # gate and up halves, dim-0 slices
    fast = write_dcp(tmp_path / "fast", chunks, objects)
    slow = write_dcp(tmp_path / "slow", [dataclasses.replace(c, copy_from=None) for c in chunks], objects)
    assert fast == slow and len([n for n in fast if n.endswith(".distcp")]) == 2
    for name, rec in fast.items():  # the checksums, hashed while copied, are those of the bytes on disk
        data = (tmp_path / "fast" / name).read_bytes()
        assert data == (tmp_path / "slow" / name).read_bytes(), name
        assert rec == {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}, name


def test_copied_checkpoint_reads_with_pytorch_dcp_bit_exact(big_vocab, tmp_path):
    """PyTorch's own reader: every Identity tensor equals the HF one, bit for bit (the vocab without its padding)."""
    source = HFSource(big_vocab)
    chunks, objects = plan_megatron(source, Layout(tp=2, ep=2), row_block_bytes=2**18)
    write_dcp(tmp_path / "mg", chunks, objects, threads=3)
    md = FileSystemReader(str(tmp_path / "mg")).read_metadata()
    state = {k: torch.empty(tuple(v.size), dtype=v.properties.dtype) for k, v in md.state_dict_metadata.items()
             if hasattr(v, "properties")}  # fmt: skip
    dcp.load(state, storage_reader=FileSystemReader(str(tmp_path / "mg")), planner=DefaultLoadPlanner(), no_dist=True)
    hf = load_file(big_vocab / "model.safetensors")
    assert_bit_exact(state["embedding.word_embeddings.weight"][:24576], hf["model.embed_tokens.weight"])
    assert_bit_exact(state["output_layer.weight"][:24576], hf["lm_head.weight"])
    assert_bit_exact(state["decoder.final_layernorm.weight"], hf["model.norm.weight"])
    fc2 = state["decoder.layers.1.mlp.experts.experts.linear_fc2.weight"]
    fc1 = state["decoder.layers.1.mlp.experts.experts.linear_fc1.weight"]
    for x in range(fc2.shape[0]):
        p = f"model.layers.1.mlp.experts.{x}."
        assert_bit_exact(fc2[x], hf[p + "down_proj.weight"], f"expert {x} fc2")
        assert_bit_exact(fc1[x], torch.cat([hf[p + "gate_proj.weight"], hf[p + "up_proj.weight"]]), f"expert {x} fc1")


@pytest.mark.parametrize("to", [Layout(tp=1, ep=4), Layout(tp=2, pp=1, ep=1), Layout(tp=2, ep=2, etp=2)], ids=str)
def test_reshard_copies_stored_bytes_into_the_torch_save_files(big_vocab, tmp_path, to):
    """A reshard (TP2·PP2·EP2 -> ``to``): every chunk that stored chunks tile in whole runs is re-cut from them by
    kernel copies (a TP change of a row-parallel tensor, a run per row, is produced instead), and the files are
    those of producing and ``torch.save``-ing every chunk; the way back to HF is bit-exact."""
    from ernie45.bridge.torch_dist import MegatronSource, write_megatron
    from ernie45.convert import write_hf

    write_megatron(HFSource(big_vocab), tmp_path / "a", Layout(tp=2, pp=2, ep=2), progress=False, row_block_bytes=2**18)
    source = MegatronSource(tmp_path / "a")
    chunks, objects = plan_megatron(source, to, row_block_bytes=3 * 2**17)  # blocks straddling the stored ones
    produced = {c.key.rsplit(".", 2)[-2] for c in chunks if c.copy_from is None}
    assert produced <= {"linear_proj", "linear_fc2"} and sum(c.copy_from is not None for c in chunks) > len(chunks) / 2
    fast = write_dcp(tmp_path / "fast", chunks, objects)
    slow = write_dcp(tmp_path / "slow", [dataclasses.replace(c, copy_from=None) for c in chunks], objects)
    assert fast == slow
    for name in fast:
        assert (tmp_path / "fast" / name).read_bytes() == (tmp_path / "slow" / name).read_bytes(), name
    write_megatron(source, tmp_path / "b", to, progress=False, row_block_bytes=3 * 2**17)
    write_hf(MegatronSource(tmp_path / "b"), tmp_path / "hf", progress=False)
    want, got = load_file(big_vocab / "model.safetensors"), load_file(tmp_path / "hf" / "model.safetensors")
    assert sorted(got) == sorted(want)
    for name in want:
        assert_bit_exact(got[name], want[name], name)


def test_copy_across_file_systems_falls_back_to_sendfile(tmp_path):
    """A source on another file system (``copy_file_range`` says EXDEV between tmpfs and the test's disk): the
    chunks go through ``sendfile``, still in the kernel; the round trip is bit-exact and the checksums hold."""
    import json
    import shutil
    import tempfile
    from pathlib import Path

    from ernie45.convert import convert

    if not Path("/dev/shm").is_dir() or Path("/dev/shm").stat().st_dev == tmp_path.stat().st_dev:
        pytest.skip("needs /dev/shm on a file system other than the test's temporary directory")
    shm = Path(tempfile.mkdtemp(dir="/dev/shm"))
    try:
        hf = write_tiny_checkpoint(shm / "hf", "moe", seed=5, vocab_size=8192)
        convert(hf, tmp_path / "mg", to="megatron", tp=2, ep=2, progress=False)
        info = json.loads((tmp_path / "mg" / "ernie45.json").read_text())
        for name, rec in info["checksums"].items():
            data = (tmp_path / "mg" / name).read_bytes()
            assert rec == {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}, name
        convert(tmp_path / "mg", tmp_path / "back", to="hf", progress=False)
        want, got = load_file(hf / "model.safetensors"), load_file(tmp_path / "back" / "model.safetensors")
        assert sorted(got) == sorted(want)
        for name in want:
            assert_bit_exact(got[name], want[name], name)
    finally:
        shutil.rmtree(shm, ignore_errors=True)


def _regions_brute_force(stored, key, offsets, sizes, rows=None):
    """The reference for ``StoredChunks.region``: every stored chunk of ``key`` scanned (what it did before its
    chunks were indexed); the same None cases, else the FileRange list."""
    import math

    from torch.distributed.checkpoint.metadata import MetadataIndex

    from ernie45.bridge.dcp_write import _one_run

    md = stored.reader.metadata.state_dict_metadata[key]
    if math.prod(sizes) == 0 or (rows is not None and offsets[0] + sizes[0] > rows):
        return None
    boxes = []
    for c in md.chunks:
        lo = [max(o, co) for o, co in zip(offsets, c.offsets)]
        hi = [min(o + z, co + cz) for o, z, co, cz in zip(offsets, sizes, c.offsets, c.sizes)]
        if all(a < b for a, b in zip(lo, hi)):
            assert not getattr(stored.reader.metadata.storage_data[MetadataIndex(key, c.offsets)],
                               "transform_descriptors", None)  # fmt: skip
            if not _one_run(lo, hi, c.sizes, sizes):
                return None
            boxes.append((c, lo, hi))
    if sum(math.prod(b - a for a, b in zip(lo, hi)) for _, lo, hi in boxes) != math.prod(sizes):
        return None
    return stored._ranges(key, tuple(offsets), tuple(sizes), boxes, md.properties.dtype.itemsize)


@pytest.mark.parametrize("layout", [Layout(tp=2, pp=2, ep=2), Layout(tp=2, ep=2, etp=2)], ids=str)
def test_indexed_region_lookup_is_the_brute_force_scan(big_vocab, tmp_path, layout):
    """``StoredChunks.region`` visits only the stored chunks its index says may overlap: over a grid of regions of
    every key (each dim cut at the stored chunks' bounds, their midpoints and the ends; whole, exact, straddling,
    partial, empty, past the vocab rows) it gives exactly the FileRange lists (and the None cases) of scanning
    every chunk."""
    import itertools
    import random

    from ernie45.bridge.dcp_write import StoredChunks
    from ernie45.bridge.torch_dist import MegatronSource, write_megatron

    write_megatron(HFSource(big_vocab), tmp_path / "mg", layout, progress=False, row_block_bytes=2**18)
    reader = MegatronSource(tmp_path / "mg").reader
    indexed, oracle = StoredChunks(reader), StoredChunks(reader)
    rng = random.Random(0)
    compared = located = 0
    for key in reader.keys():
        md = reader.metadata.state_dict_metadata[key]
        cuts = []
        for d, n in enumerate(md.size):
            bounds = {0, n} | {c.offsets[d] for c in md.chunks} | {c.offsets[d] + c.sizes[d] for c in md.chunks}
            bounds |= {(a + b) // 2 for a, b in itertools.pairwise(sorted(bounds))}
            cuts.append(sorted(bounds))
        per_dim = [[(a, b) for a in c for b in c if a <= b] for c in cuts]
        grid = list(itertools.product(*per_dim))
        rows = [None] + ([md.size[0] - 1] if md.size and md.size[0] > 1 else [])
        for box in rng.sample(grid, min(len(grid), 150)):
            offsets, sizes = tuple(a for a, _ in box), tuple(b - a for a, b in box)
            for r in rows:
                got = indexed.region(key, offsets, sizes, rows=r)
                want = _regions_brute_force(oracle, key, offsets, sizes, rows=r)
                assert (got is None) == (want is None), (key, offsets, sizes, r)
                if got is not None:
                    assert got() == want, (key, offsets, sizes, r)
                    located += 1
                compared += 1
        whole = indexed.region(key, (0,) * len(md.size), tuple(md.size))  # the whole key: tiled by its chunks
        assert whole is None or whole() == _regions_brute_force(oracle, key, (0,) * len(md.size), tuple(md.size))
    assert compared > 5000 and located > 500, (compared, located)


@pytest.fixture(scope="module")
def mg_sources(big_vocab, tmp_path_factory):
    """name -> a torch_dist checkpoint at TP2·PP2·EP2 (vocab in row blocks): the MoE (24576-row vocab, two MTP
    tensors carried) and a VL one (8 heads / 4 KV groups, two expert pools, both ViTs' layouts)."""
    from safetensors.torch import save_file

    from ernie45.bridge.torch_dist import write_megatron
    from ernie45.testing import tiny_hf_config

    root = tmp_path_factory.mktemp("mg-sources")
    tensors = load_file(big_vocab / "model.safetensors")
    H = tensors["model.norm.weight"].shape[0]
    g = torch.Generator().manual_seed(7)
    tensors["model.mtp_hidden_norm.0.weight"] = torch.randn(H, generator=g)
    tensors["model.mtp_linear_proj.0.weight"] = torch.randn(H, 2 * H, generator=g)
    moe = root / "moe-hf"
    moe.mkdir()
    for f in big_vocab.iterdir():
        if f.name != "model.safetensors":
            (moe / f.name).write_bytes(f.read_bytes())
    save_file(tensors, moe / "model.safetensors", metadata={"format": "pt"})
    text = dict(tiny_hf_config("vl")["text_config"], num_attention_heads=8, num_key_value_heads=4, hidden_size=128,
                num_hidden_layers=4, mlp_layer_types=["dense"] + ["sparse"] * 3)  # fmt: skip
    vision = dict(tiny_hf_config("vl")["vision_config"], num_heads=4)
    vl = write_tiny_checkpoint(root / "vl-hf", "vl", seed=23, text_config=text, vision_config=vision)
    out = {}
    for name, hf, vit in (("moe", moe, None), ("vl", vl, None), ("vl-megatron-vit", vl, "megatron")):
        source = HFSource(hf, vit=vit) if vit else HFSource(hf)
        write_megatron(source, root / name, Layout(tp=2, pp=2, ep=2), progress=False, row_block_bytes=2**18)
        out[name] = (hf, root / name)
    return out


@pytest.mark.parametrize("name", ["moe", "vl", "vl-megatron-vit"])
def test_torch_dist_to_hf_copies_stored_bytes_into_the_same_files(mg_sources, tmp_path, name):
    """torch_dist → HF with the tensors that are stored records byte for byte (Identity, ConcatGLU halves, whole
    experts, the vocab short of its padding, the carried MTP) copied by the kernel, never streamed through memory,
    and with every tensor produced: files identical (sha256 of each whole file, the recorded checksums included),
    some tensors of each kind; the way back is bit-exact, the checksums those of the bytes on disk."""
    from ernie45.bridge.torch_dist import MegatronSource
    from ernie45.convert import write_hf

    hf, mg = mg_sources[name]
    source = MegatronSource(mg)
    copied, streamed = [], []
    locate, stream = source.locate, source.stream
    source.locate = lambda n: (lambda where: (where is not None and copied.append(n)) or where)(locate(n))
    source.stream = lambda n, *a: streamed.append(n) or stream(n, *a)
    write_hf(source, tmp_path / "fast", progress=False, max_shard_bytes=2**21)  # several shards
    produced = MegatronSource(mg)
    produced.locate = lambda n: None
    write_hf(produced, tmp_path / "slow", progress=False, max_shard_bytes=2**21)

    assert copied and streamed and not set(copied) & set(streamed), (copied, streamed)
    assert sorted(copied + streamed) == sorted(source.keys())
    assert any("gate_proj" in n for n in copied) and any("up_proj" in n for n in copied)
    assert any("q_proj" in n for n in streamed)  # FuseQKV: an op, produced
    if name == "moe":
        assert {"model.embed_tokens.weight", "model.mtp_linear_proj.0.weight"} <= set(copied)
    files = sorted(p.name for p in (tmp_path / "fast").iterdir())
    assert files == sorted(p.name for p in (tmp_path / "slow").iterdir()) and "model.safetensors.index.json" in files
    for f in files:
        digest = [hashlib.sha256((tmp_path / d / f).read_bytes()).hexdigest() for d in ("fast", "slow")]
        assert digest[0] == digest[1], f
    import json

    for f, rec in json.loads((tmp_path / "fast" / "ernie45.json").read_text())["checksums"].items():
        data = (tmp_path / "fast" / f).read_bytes()
        assert rec == {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}, f
    from ernie45.bridge.io import HFCheckpoint

    want, got = HFCheckpoint(hf), HFCheckpoint(tmp_path / "fast")
    assert sorted(got.keys()) == sorted(want.keys())
    for n in want.keys():
        assert_bit_exact(got.get(n), want.get(n), n)


def test_a_flipped_byte_in_a_copied_range_is_caught_by_the_checksum(mg_sources, tmp_path, capsys):
    """A byte flipped inside a stored record that torch_dist → HF would copy: locating it checks the file's
    recorded sha256 first (as a read would), so the copy never happens; the CLI exits 2 naming the file."""
    import shutil

    from ernie45.bridge.io import CheckpointError
    from ernie45.bridge.torch_dist import MegatronSource
    from ernie45.cli import main as cli

    mg = tmp_path / "mg"
    shutil.copytree(mg_sources["moe"][1], mg)
    where = MegatronSource(mg).locate("model.layers.1.mlp.experts.0.up_proj.weight")()[-1]  # (ETP2: two halves)
    with open(where.path, "r+b") as f:
        f.seek(where.offset + where.length // 2)
        b = f.read(1)
        f.seek(-1, 1)
        f.write(bytes([b[0] ^ 0x10]))
    with pytest.raises(CheckpointError, match="checksum mismatch") as e:
        MegatronSource(mg).locate("model.layers.1.mlp.experts.0.up_proj.weight")()
    assert str(where.path) in str(e.value)
    code = cli(["convert", str(mg), str(tmp_path / "hf"), "--to", "hf", "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2 and str(where.path) in err and "checksum mismatch" in err, err
    assert not (tmp_path / "hf").exists()


def _flip_byte(where) -> None:
    with open(where.path, "r+b") as f:
        f.seek(where.offset + where.length // 2)
        b = f.read(1)
        f.seek(-1, 1)
        f.write(bytes([b[0] ^ 0x10]))


@pytest.mark.parametrize("to", ["hf", "megatron"])
def test_parallel_source_checks_refuse_a_corrupted_file_before_its_bytes_are_used(mg_sources, tmp_path, monkeypatch, to):
    """torch_dist → HF and the reshard check the source's recorded sha256s on a pool (``Checksums.prefetch``,
    started before planning): a byte flipped in a stored record the conversion would copy -- in the file submitted
    last -- is still refused with the same CheckpointError naming the file, before any of that file's bytes are
    copied or read, the destination absent and the pool's threads gone. No data file is hashed on the caller's
    thread (every check was the pool's)."""
    import shutil
    import threading

    from ernie45.bridge import io as bio
    from ernie45.bridge.io import CheckpointError
    from ernie45.bridge.torch_dist import MegatronSource, write_megatron
    from ernie45.convert import write_hf

    mg = tmp_path / "mg"
    shutil.copytree(mg_sources["moe"][1], mg)
    source = MegatronSource(mg)
    prefetched = []
    monkeypatch.setattr(source.checksums, "prefetch", lambda names, f=source.checksums.prefetch: (
        prefetched.extend(names), f(names)))  # fmt: skip
    # the last data file the conversion uses, and a tensor copied from it
    order = list(dict.fromkeys(f for k in [torch_dist.dist_key(m)[0] for it in source.plan.items for m in it.mg]
                               for f in source.reader.files_of(k)))  # fmt: skip
    last = mg / order[-1]
    victim = next(n for n in reversed(source.keys()) if (w := source.locate(n)) is not None and w()[0].path == last)
    _flip_byte(MegatronSource(mg).locate(victim)()[0])
    source = MegatronSource(mg)  # a fresh one: nothing checked yet
    monkeypatch.setattr(source.checksums, "prefetch", lambda names, f=source.checksums.prefetch: (
        prefetched.extend(names), f(names)))  # fmt: skip
    on_caller = []
    monkeypatch.setattr(bio, "file_sha256", lambda p, f=bio.file_sha256: on_caller.append(p) or f(p))
    used = []  # every source file a byte was copied or read from
    copy, rows = bio.OutputFile.copy, source.reader.read_rows
    monkeypatch.setattr(bio.OutputFile, "copy", lambda self, ranges: used.extend(r.path for r in ranges) or copy(self, ranges))
    source.reader.read_rows = lambda key, *a: used.extend(mg / f for f in source.reader.files_of(key)) or rows(key, *a)
    dst = tmp_path / "out"
    with pytest.raises(CheckpointError, match="checksum mismatch") as e:
        if to == "hf":
            write_hf(source, dst, progress=False, max_shard_bytes=2**21)
        else:
            write_megatron(source, dst, Layout(tp=1, ep=4), progress=False)
    assert str(last) in str(e.value)
    assert prefetched and last.name in prefetched, prefetched
    assert last not in used, used  # never a byte of the bad file
    assert on_caller == [], on_caller  # every data file's check came from the pool
    assert not dst.exists() and not list(tmp_path.glob(".out.tmp-*"))
    assert not [t for t in threading.enumerate() if t.name.startswith("ernie45-check")]


def test_check_all_on_the_pool_names_the_first_bad_file(mg_sources, tmp_path):
    """``Checksums.check_all`` (``--verify-checksums``, ``inspect``) checks on the pool: every data file corrupted,
    the first in name order is the one named, as the sequential loop would; the other checks are stopped."""
    import shutil
    import threading

    from ernie45.bridge.io import CheckpointError
    from ernie45.bridge.torch_dist import MegatronSource

    mg = tmp_path / "mg"
    shutil.copytree(mg_sources["moe"][1], mg)
    files = MegatronSource(mg).reader.data_files()
    assert len(files) >= 2
    for name in files:
        with open(mg / name, "r+b") as f:
            f.seek(100)
            b = f.read(1)
            f.seek(100)
            f.write(bytes([b[0] ^ 1]))
    with pytest.raises(CheckpointError, match="checksum mismatch") as e:
        MegatronSource(mg).checksums.check_all()
    assert str(mg / files[0]) in str(e.value)
    assert not [t for t in threading.enumerate() if t.name.startswith("ernie45-check")]


def test_overlapped_shards_are_the_sequential_ones(mg_sources, tmp_path):
    """``write_safetensors_streaming`` closing each shard only after the next is written (its hashing beside the
    next one's writes) and closing each before the next (``overlap_shards=False``): the same files byte for
    byte and the same records, each the sha256 hashlib computes over the bytes on disk; copied and produced
    tensors, several shards."""
    from ernie45.bridge.io import write_safetensors_streaming
    from ernie45.bridge.torch_dist import MegatronSource

    source = MegatronSource(mg_sources["moe"][1])
    names = [n for it in source.plan.items for n in it.hf] + source.carried
    entries = [(n, tuple(source.shape(n)), source.dtype(n)) for n in names]

    def produce(n):
        where = source.locate(n)
        return source.stream(n, 2**18) if where is None else where()

    records = {}
    for overlap in (True, False):
        out = tmp_path / str(overlap)
        out.mkdir()
        records[overlap] = write_safetensors_streaming(out, entries, produce, max_shard_bytes=2**20,
                                                       overlap_shards=overlap)  # fmt: skip
    assert len(records[True]) >= 3 and list(records[True]) == list(records[False])
    assert records[True] == records[False]
    for f, rec in records[True].items():
        data = (tmp_path / "True" / f).read_bytes()
        assert data == (tmp_path / "False" / f).read_bytes(), f
        assert rec == {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}, f
    index = "model.safetensors.index.json"
    assert (tmp_path / "True" / index).read_bytes() == (tmp_path / "False" / index).read_bytes()
