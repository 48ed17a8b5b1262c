"""Bad inputs, interruptions and concurrency: one clear error naming the file or tensor, exit code 2, the
destination untouched; a killed conversion never leaves a destination that looks complete."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from ernie45.cli import main as cli
from ernie45.testing import write_tiny_checkpoint

SRC_MOE = "model.layers.1.mlp.experts.2.up_proj.weight"


@pytest.fixture()
def ckpt(tmp_path):
    """A fresh, writable tiny MoE checkpoint per test (tests corrupt it)."""
    return write_tiny_checkpoint(tmp_path / "src", "moe", seed=9)


def _tensors(path):
    return load_file(path / "model.safetensors")


def _save(path, tensors):
    save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})


def _run_cli(args, capsys):
    code = cli(args)
    return code, capsys.readouterr().err


def _convert_fails(src, tmp_path, capsys, *extra, needle):
    """Convert to Megatron; assert exit 2, one error line naming ``needle``, nothing at the destination."""
    dst = tmp_path / "dst"
    code, err = _run_cli(["convert", str(src), str(dst), "--to", "megatron", "--no-progress", *extra], capsys)
    assert code == 2, err
    assert err.startswith("ernie45 convert: error:") and needle in err, err
    assert not dst.exists()
    assert not list(tmp_path.glob(".dst.tmp-*")), "a temporary was left behind"
    return err


def test_truncated_shard(ckpt, tmp_path, capsys):
    f = ckpt / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) - 1000])
    _convert_fails(ckpt, tmp_path, capsys, needle="model.safetensors")


def test_corrupted_header(ckpt, tmp_path, capsys):
    f = ckpt / "model.safetensors"
    data = bytearray(f.read_bytes())
    data[8:20] = b"#not-json!!!"
    f.write_bytes(bytes(data))
    _convert_fails(ckpt, tmp_path, capsys, needle="model.safetensors")


def test_missing_tensor(ckpt, tmp_path, capsys):
    t = _tensors(ckpt)
    del t[SRC_MOE]
    _save(ckpt, t)
    err = _convert_fails(ckpt, tmp_path, capsys, needle=SRC_MOE)
    assert "missing tensors (1)" in err


def test_extra_unknown_tensor(ckpt, tmp_path, capsys):
    t = _tensors(ckpt)
    t["model.layers.1.mlp.mystery.weight"] = torch.zeros(3)
    _save(ckpt, t)
    _convert_fails(ckpt, tmp_path, capsys, needle="model.layers.1.mlp.mystery.weight")


def test_wrong_shape(ckpt, tmp_path, capsys):
    t = _tensors(ckpt)
    t[SRC_MOE] = torch.zeros(31, 48)
    _save(ckpt, t)
    _convert_fails(ckpt, tmp_path, capsys, needle=f"{SRC_MOE}: has [31, 48], config implies [32, 48]")


def test_wrong_dtype(ckpt, tmp_path, capsys):
    t = _tensors(ckpt)
    t[SRC_MOE] = torch.zeros(32, 48, dtype=torch.int32)
    _save(ckpt, t)
    _convert_fails(ckpt, tmp_path, capsys, needle=f"{SRC_MOE}: int32, a weight must be a floating-point tensor")


def test_config_disagrees_with_weights(ckpt, tmp_path, capsys):
    cfg = json.loads((ckpt / "config.json").read_text())
    cfg["moe_num_experts"] = 6
    (ckpt / "config.json").write_text(json.dumps(cfg))
    err = _convert_fails(ckpt, tmp_path, capsys, needle="does not match its config")
    assert "model.layers.1.mlp.experts.7.up_proj.weight" in err  # experts 6, 7 are unexpected


def test_missing_required_config_field(ckpt, tmp_path, capsys):
    cfg = json.loads((ckpt / "config.json").read_text())
    del cfg["moe_k"]
    (ckpt / "config.json").write_text(json.dumps(cfg))
    _convert_fails(ckpt, tmp_path, capsys, needle="missing required field moe_k")


@pytest.mark.parametrize(
    "flags, needle",
    [
        (["--tp", "3"], "TP=3 does not divide num_attention_heads=4"),
        (["--tp", "4"], "TP=4 does not divide num_key_value_heads=2"),
        (["--ep", "3"], "EP=3 does not divide moe_num_experts=8"),
        (["--pp", "7"], "more stages than the 6 layers"),
    ],
)
def test_impossible_layout(ckpt, tmp_path, capsys, flags, needle):
    _convert_fails(ckpt, tmp_path, capsys, *flags, needle=needle)


def test_index_pointing_outside_the_checkpoint(ckpt, tmp_path, capsys):
    outside = tmp_path / "elsewhere.safetensors"
    shutil.move(ckpt / "model.safetensors", outside)
    names = load_file(outside).keys()
    index = {"metadata": {}, "weight_map": {n: "../elsewhere.safetensors" for n in names}}
    (ckpt / "model.safetensors.index.json").write_text(json.dumps(index))
    (ckpt / "stub.safetensors").write_bytes(b"")  # a shard file next to the index, but the index escapes the dir
    _convert_fails(ckpt, tmp_path, capsys, needle="points outside the checkpoint directory")


def test_pickle_input_is_refused_never_unpickled(ckpt, tmp_path, capsys):
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    (ckpt / "model.safetensors").unlink()
    torch.save({"x": Evil()}, ckpt / "pytorch_model.bin")
    _convert_fails(ckpt, tmp_path, capsys, needle="never unpickled")
    assert not marker.exists()


def test_non_empty_destination_without_overwrite(ckpt, tmp_path, capsys):
    dst = tmp_path / "dst"
    dst.mkdir()
    (dst / "keep.txt").write_text("precious")
    code, err = _run_cli(["convert", str(ckpt), str(dst), "--to", "megatron", "--no-progress"], capsys)
    assert code == 2 and "--overwrite" in err and str(dst) in err
    assert sorted(p.name for p in dst.iterdir()) == ["keep.txt"] and (dst / "keep.txt").read_text() == "precious"


# ------------------------------------------------------------------------------------------------------------------
# interruptions and concurrency


def _digest(path: Path) -> dict[str, str]:
    """Content hash of every file, DCP's .metadata included (the writer leaves out the random save id and the
    temporary path, so two conversions of one source are identical)."""
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(path.iterdir()) if p.is_file()}


def _convert_cmd(src, dst, to):
    return [sys.executable, "-m", "ernie45", "convert", str(src), str(dst), "--to", to, "--tp", "2", "--no-progress"]


@pytest.fixture(scope="module")
def medium_ckpt(tmp_path_factory):
    """Big enough (~60 MB) that two conversions started together really overlap while writing."""
    root = tmp_path_factory.mktemp("medium")
    return write_tiny_checkpoint(root / "src", "moe", seed=3, hidden_size=512, intermediate_size=1024,
                                 moe_intermediate_size=256, vocab_size=8192)  # fmt: skip


# A conversion run by this driver is killed (SIGKILL, no clean-up possible) at a chosen point: just before the
# writer takes tensor K (so tensors 1..K-1 are written and the file is open; K = 2: after the first tensor, K = half
# the tensors: mid-file), or just before the final rename of the complete temporary onto DST. It prints where it
# dies first, so the test knows the kill landed there and not at some other moment. Without a kill point it runs
# to the end and prints how many tensors the writer took. Nothing in ernie45 is changed: the hooks wrap the writers'
# per-tensor calls (DCP's planner, the safetensors streamer's producer, gguf's GGUFWriter) and os.replace.
KILL_DRIVER = r"""
import os, signal, sys
from pathlib import Path

point, at, dst, argv = sys.argv[1], int(sys.argv[2]), Path(sys.argv[3]), sys.argv[4:]
calls = 0


def die(where):
    print(f"KILLED AT {where}", flush=True)
    os.kill(os.getpid(), signal.SIGKILL)


def next_tensor():
    global calls
    calls += 1
    if point == "tensor" and calls == at:
        die(f"tensor {at}")


import gguf
from torch.distributed.checkpoint.planner import WriteItemType

import ernie45.bridge.torch_dist as torch_dist
import ernie45.bridge.io as bridge_io

resolve_data = torch_dist._LazySavePlanner.resolve_data


def counted_resolve_data(self, item):
    if item.type == WriteItemType.SHARD:
        next_tensor()
    return resolve_data(self, item)


torch_dist._LazySavePlanner.resolve_data = counted_resolve_data
streaming = bridge_io.write_safetensors_streaming


def counted_streaming(out_dir, entries, produce, **kw):
    def produce_counted(name):
        next_tensor()
        return produce(name)

    return streaming(out_dir, entries, produce_counted, **kw)


bridge_io.write_safetensors_streaming = counted_streaming
write_tensor_data = gguf.GGUFWriter.write_tensor_data


def counted_write_tensor_data(self, *args, **kw):
    next_tensor()
    return write_tensor_data(self, *args, **kw)


gguf.GGUFWriter.write_tensor_data = counted_write_tensor_data
replace = os.replace


def replace_or_die(src, target, *args, **kw):
    if point == "rename" and Path(target) == dst and ".tmp-" in Path(src).name:
        die("rename")
    return replace(src, target, *args, **kw)


os.replace = replace_or_die
from ernie45.cli import main

code = main(argv)
print(f"TENSORS {calls}", flush=True)
sys.exit(code)
"""


def _layout_flags(to: str) -> list[str]:
    return ["--tp", "2"] if to == "megatron" else []  # layout flags belong to a Megatron target only


def _driven(point: str, at: int, src: Path, dst: Path, to: str) -> subprocess.CompletedProcess:
    args = ["convert", str(src), str(dst), "--to", to, "--no-progress"] + _layout_flags(to)
    cmd = [sys.executable, "-c", KILL_DRIVER, point, str(at), str(dst), *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300)


def _temporaries(dst: Path) -> list[Path]:
    return sorted(dst.parent.glob(f".{dst.name}.tmp-*"))


def _files(path: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(path.iterdir())} if path.is_dir() else {"": path.read_bytes()}


@pytest.fixture(scope="module")
def kill_sources(tmp_path_factory):
    """Source per target: the kills are placed, not timed, so a tiny checkpoint is enough (every layer after the
    first MoE, a pattern llama.cpp can run, so the GGUF target takes it too)."""
    from ernie45.convert import convert

    root = tmp_path_factory.mktemp("kill")
    hf = write_tiny_checkpoint(root / "hf", "moe", seed=3, moe_layer_interval=1)
    convert(hf, root / "mg", to="megatron", tp=2, progress=False)
    return {"megatron": hf, "hf": root / "mg", "gguf": hf}


# what a complete output has that a half-written one must not: DCP writes .metadata after the data, the HF writer
# config.json after the shards; a GGUF is complete at its full length (checked by size below)
COMPLETE_MARK = {"megatron": ".metadata", "hf": "config.json", "gguf": None}


@pytest.mark.parametrize("to", ["megatron", "hf", "gguf"])
def test_sigkill_at_chosen_points_never_leaves_a_complete_looking_destination(to, kill_sources, tmp_path):
    """Killed after the first tensor, half-way through the tensors, and before the final rename: the destination
    never exists, the temporary is partial (or, before the rename, complete under its temporary name), and the next
    run removes it and writes the same output as an uninterrupted conversion (GGUF's ``.partial`` included)."""
    src, name = kill_sources[to], "m.gguf" if to == "gguf" else "dst"
    ref = tmp_path / "ref" / name
    ref.parent.mkdir()
    run = _driven("none", 0, src, ref, to)
    assert run.returncode == 0, run.stderr
    n = int(run.stdout.split("TENSORS ")[1])
    assert n >= 8, run.stdout  # enough tensors for "after the first" and "half-way" to be different points
    dst = tmp_path / name
    ref_files = _files(ref)
    ref_bytes = sum(map(len, ref_files.values()))
    half = n // 2 + 1
    for point, at, where in (("tensor", 2, "tensor 2"), ("tensor", half, f"tensor {half}"), ("rename", 0, "rename")):
        run = _driven(point, at, src, dst, to)
        landed = run.returncode == -signal.SIGKILL and f"KILLED AT {where}\n" in run.stdout
        assert landed, (where, run.returncode, run.stdout, run.stderr)
        assert not dst.exists(), f"killed at {where}: the destination exists"
        (tmp,) = _temporaries(dst)  # the kill landed while the output was being written: its temporary is there
        files = _files(tmp)
        if point == "rename":  # complete, just never renamed into place
            assert files == ref_files, f"killed at {where}: the temporary differs from a complete conversion"
        else:
            assert sum(map(len, files.values())) < ref_bytes, f"killed at {where}: the temporary looks complete"
            assert COMPLETE_MARK[to] not in files, f"killed at {where}: {COMPLETE_MARK[to]} written already"
    # a later run (this process): removes the killed run's temporary, writes the output
    assert cli(["convert", str(src), str(dst), "--to", to, "--no-progress"] + _layout_flags(to)) == 0
    assert _files(dst) == ref_files
    assert not _temporaries(dst), "stale temporaries of killed runs were not cleaned up"


def test_two_conversions_at_once_do_not_interfere(medium_ckpt, tmp_path):
    a = subprocess.Popen(_convert_cmd(medium_ckpt, tmp_path / "a", "megatron"))
    b = subprocess.Popen(_convert_cmd(medium_ckpt, tmp_path / "b", "megatron"))
    assert a.wait() == 0 and b.wait() == 0
    assert _digest(tmp_path / "a") == _digest(tmp_path / "b")
    from ernie45.bridge.torch_dist import TorchDistReader

    ra, rb = TorchDistReader(tmp_path / "a"), TorchDistReader(tmp_path / "b")
    assert sorted(ra.keys()) == sorted(rb.keys())
