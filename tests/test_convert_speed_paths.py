"""The converter's fast paths: checksums hashed while written (a second thread for big buffers), DCP chunks written
without the zip CRC32 (the unchanged ones copied in the kernel: tests/test_dcp_zero_copy.py), ``--fsync``, the
opt-in phase accounting.

Oracles are independent of ernie45: ``hashlib`` over the bytes on disk, PyTorch's stock DCP ``FileSystemReader``
with its default planner, ``safetensors.torch.load_file``. (That Megatron-Core's ``dist_checkpointing.load`` reads
a checkpoint written this way into live models at two layouts is tests/test_distributed.py::
test_offline_checkpoint_loads_into_live_models_at_two_layouts, which converts through the same path.)
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys

import pytest
import torch
import torch.distributed.checkpoint as dcp
from safetensors.torch import load_file
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.filesystem import FileSystemReader

from ernie45.bridge.io import HashingFile, Phases
from ernie45.convert import convert
from ernie45.testing import assert_bit_exact, write_tiny_checkpoint

# a vocab whose embedding (24576 x 48, fp32: 4.5 MiB) makes TP2 chunks over 1 MiB: the hash-beside-write path
VOCAB = 24576


@pytest.fixture(scope="module")
def big_vocab(tmp_path_factory):
    return write_tiny_checkpoint(tmp_path_factory.mktemp("speed") / "hf", "moe", seed=3, vocab_size=VOCAB)


def test_hashing_file_records_the_sha256_of_what_is_on_disk(tmp_path):
    g = torch.Generator().manual_seed(0)
    pieces = [torch.randint(0, 256, (n,), generator=g, dtype=torch.uint8) for n in (7, 3 * 2**20 + 5, 100, 2**20, 1)]
    with HashingFile(tmp_path / "f", fsync=True) as f:
        for p in pieces:
            f.write(p.numpy())
        f.write(b"tail")
    data = (tmp_path / "f").read_bytes()
    assert f.record() == {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    assert len(data) == sum(p.numel() for p in pieces) + 4


def test_torch_dist_written_fast_reads_with_pytorch_dcp_and_matches_its_checksums(big_vocab, tmp_path):
    crc_before = torch.serialization.get_crc32_options()
    convert(big_vocab, tmp_path / "mg", to="megatron", tp=2, ep=2, progress=False)
    assert torch.serialization.get_crc32_options() == crc_before  # PyTorch's process-wide setting restored
    mg = tmp_path / "mg"
    info = json.loads((mg / "ernie45.json").read_text())
    for name, rec in info["checksums"].items():  # hashed while written == hashed from disk afterwards
        data = (mg / name).read_bytes()
        assert rec == {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}, name
    # PyTorch's own reader (torch.load of each chunk) reads every tensor back: the embedding bit-exact
    md = FileSystemReader(str(mg)).read_metadata()
    state = {k: torch.empty(tuple(v.size), dtype=v.properties.dtype) for k, v in md.state_dict_metadata.items()
             if hasattr(v, "properties")}  # fmt: skip
    dcp.load(state, storage_reader=FileSystemReader(str(mg)), planner=DefaultLoadPlanner(), no_dist=True)
    emb = load_file(big_vocab / "model.safetensors")["model.embed_tokens.weight"]
    assert emb.numel() * emb.element_size() > 2 * 2**20
    assert_bit_exact(state["embedding.word_embeddings.weight"][:VOCAB], emb, "embedding")


def test_fsync_round_trip_is_bit_exact_and_phases_add_up(big_vocab, tmp_path):
    """``--fsync`` through the CLI, the phases through ``ERNIE45_PHASES`` (as the benchmark reads them)."""
    env = dict(os.environ, ERNIE45_PHASES=str(tmp_path / "phases.json"))
    run = [sys.executable, "-m", "ernie45", "convert", "--no-progress", "--fsync"]
    for argv in ([str(big_vocab), str(tmp_path / "mg"), "--to", "megatron", "--tp", "2"],
                 [str(tmp_path / "mg"), str(tmp_path / "back"), "--to", "hf"]):  # fmt: skip
        r = subprocess.run(run + argv, env=env, capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stderr
        rec = json.loads((tmp_path / "phases.json").read_text())
        s = rec["seconds"]
        assert {"plan", "read", "write", "hash output", "fsync", "rename"} <= set(s) and min(s.values()) > -1e-3
        assert sum(s.values()) == pytest.approx(rec["finished"] - rec["started"], abs=1e-6)
    want, got = load_file(big_vocab / "model.safetensors"), load_file(tmp_path / "back" / "model.safetensors")
    assert sorted(got) == sorted(want)
    for name in want:
        assert_bit_exact(got[name], want[name], name)
    r = subprocess.run(run + [str(big_vocab), str(tmp_path / "x.gguf"), "--to", "gguf"], capture_output=True,
                       text=True, timeout=300)  # fmt: skip
    assert r.returncode == 2 and "--fsync" in r.stderr and "Traceback" not in r.stderr


def test_phases_are_exclusive_per_thread():
    ph = Phases()
    with ph("outer"):
        with ph("inner"):
            pass
    assert set(ph.seconds) == {"outer", "inner"} and all(v >= 0 for v in ph.seconds.values())
    assert Phases(enabled=False).seconds == {}


def test_vocab_written_in_row_blocks_loads_with_megatron_at_two_layouts(tiny_ckpts, tmp_path):
    """The embedding in row blocks (a 4 KiB block here, 64 MiB by default): Megatron-Core's own
    dist_checkpointing.load reads it into live models at TP2 and EP2 (2 gloo processes) with logits equal to
    transformers' on the HF source; PyTorch's reader sees the same tensor as the one-chunk-per-shard write."""
    from dist_worker import offline_load_diffs

    from ernie45.bridge.source import HFSource
    from ernie45.bridge.torch_dist import write_megatron
    from ernie45.layout import Layout

    hf_dir = tiny_ckpts["moe-tied"]
    layout = Layout(tp=2, pp=2, ep=2)
    write_megatron(HFSource(hf_dir), tmp_path / "mg", layout, progress=False, row_block_bytes=4096)
    write_megatron(HFSource(hf_dir), tmp_path / "whole", layout, progress=False)
    key = "embedding.word_embeddings.weight"
    blocked, whole = (FileSystemReader(str(tmp_path / d)).read_metadata().state_dict_metadata[key]
                      for d in ("mg", "whole"))  # fmt: skip
    assert len(whole.chunks) == 2 and len(blocked.chunks) > 4  # two TP shards; each cut into blocks
    got, want = ({key: torch.empty(tuple(whole.size), dtype=whole.properties.dtype)} for _ in range(2))
    for d, state in (("mg", got), ("whole", want)):
        dcp.load(state, storage_reader=FileSystemReader(str(tmp_path / d)), planner=DefaultLoadPlanner(), no_dist=True)
    assert_bit_exact(got[key], want[key], key)

    results = offline_load_diffs(hf_dir, tmp_path / "mg", tmp_path, seed=5)
    assert "error" not in results, results.get("error")
    assert results["TP2"] <= 1e-4 and results["EP2"] <= 1e-4, results


def test_torch_dist_to_hf_streams_the_vocab_in_row_blocks_bit_exact(tiny_ckpts, tmp_path):
    from ernie45.bridge.source import HFSource
    from ernie45.bridge.torch_dist import MegatronSource, write_megatron
    from ernie45.convert import write_hf
    from ernie45.layout import Layout

    hf_dir = tiny_ckpts["moe"]  # untied: embedding and output layer both stream
    write_megatron(HFSource(hf_dir), tmp_path / "mg", Layout(tp=2), progress=False, row_block_bytes=4096)
    source = MegatronSource(tmp_path / "mg")
    blocks = source.stream("model.embed_tokens.weight", 4096)
    assert not isinstance(blocks, torch.Tensor)
    assert_bit_exact(torch.cat(list(blocks)), load_file(hf_dir / "model.safetensors")["model.embed_tokens.weight"])
    write_hf(source, tmp_path / "hf", progress=False, row_block_bytes=4096)
    want, got = load_file(hf_dir / "model.safetensors"), load_file(tmp_path / "hf" / "model.safetensors")
    assert sorted(got) == sorted(want) and "lm_head.weight" in got
    for name in want:
        assert_bit_exact(got[name], want[name], name)


def test_reshard_of_row_blocked_vocab_reads_only_rows_bit_exact(tiny_ckpts, tmp_path):
    """A reshard (TP2 -> TP1·EP2 -> HF) whose vocab tensors are stored in row blocks copies them from the stored
    blocks, never reading them, and the round trip is bit-exact. Produced instead (the path of a chunk stored bytes
    do not tile, e.g. a vocab padding that grows) they are read row range by row range
    (``TorchDistReader.read_rows``), never whole, into the same files."""
    import dataclasses

    from ernie45.bridge.source import HFSource
    from ernie45.bridge.torch_dist import MegatronSource, TorchDistReader, plan_megatron, write_dcp, write_megatron
    from ernie45.convert import write_hf
    from ernie45.layout import Layout

    hf_dir = tiny_ckpts["moe"]
    write_megatron(HFSource(hf_dir), tmp_path / "a", Layout(tp=2), progress=False, row_block_bytes=4096)
    vocab = {"embedding.word_embeddings.weight", "output_layer.weight"}
    calls = []
    source = MegatronSource(tmp_path / "a")
    read_rows = source.reader.read_rows
    source.reader.read_rows = lambda key, a=0, b=None: calls.append((key, a, b)) or read_rows(key, a, b)
    write_megatron(source, tmp_path / "b", Layout(ep=2), progress=False, row_block_bytes=4096)
    assert not [k for k, _, _ in calls if k in vocab]  # copied from the stored blocks, never read
    assert len(TorchDistReader(tmp_path / "b").metadata.state_dict_metadata["output_layer.weight"].chunks) > 1
    write_hf(MegatronSource(tmp_path / "b"), tmp_path / "hf", progress=False)
    want, got = load_file(hf_dir / "model.safetensors"), load_file(tmp_path / "hf" / "model.safetensors")
    assert sorted(got) == sorted(want)
    for name in want:
        assert_bit_exact(got[name], want[name], name)

    chunks, objects = plan_megatron(source, Layout(ep=2), row_block_bytes=4096)
    calls.clear()
    written = write_dcp(tmp_path / "produced", [dataclasses.replace(c, copy_from=None) for c in chunks], objects)
    ranges = [(k, a, b) for k, a, b in calls if k in vocab]
    assert {k for k, _, _ in ranges} == vocab  # (read_rows also serves every other read, whole)
    assert all(b is not None and b - a < 160 for _, a, b in ranges)  # row ranges (vocab 160), never the whole
    for name in written:
        assert (tmp_path / "produced" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name
