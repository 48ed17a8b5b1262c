"""Bad inputs, interruptions and concurrency: one clear error naming the file or tensor, exit code 2, the
destination untouched; a killed conversion never leaves a destination that looks complete."""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
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
    """Content hash of every file (DCP's .metadata carries a random save id and the temporary path: excluded;
    its tensor list is compared through the reader instead)."""
    return {
        p.name: hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(path.iterdir())
        if p.is_file() and p.name != ".metadata"
    }


def _convert_cmd(src, dst, to):
    return [sys.executable, "-m", "ernie45", "convert", str(src), str(dst), "--to", to, "--tp", "2", "--no-progress"]


@pytest.fixture(scope="module")
def medium_ckpt(tmp_path_factory):
    """Big enough (~60 MB) that a conversion spends a while writing, so kills land mid-write too."""
    root = tmp_path_factory.mktemp("medium")
    return write_tiny_checkpoint(root / "src", "moe", seed=3, hidden_size=512, intermediate_size=1024,
                                 moe_intermediate_size=256, vocab_size=8192)  # fmt: skip


@pytest.mark.parametrize("to", ["megatron", "hf"])
def test_sigkill_never_leaves_a_complete_looking_destination(medium_ckpt, tmp_path, to):
    src = medium_ckpt
    if to == "hf":  # Megatron -> HF: make the Megatron source first
        subprocess.run(_convert_cmd(medium_ckpt, tmp_path / "mg-src", "megatron"), check=True)
        src = tmp_path / "mg-src"
    ref = tmp_path / "ref"
    t0 = time.perf_counter()
    subprocess.run(_convert_cmd(src, ref, to), check=True)
    duration = time.perf_counter() - t0
    rng = random.Random(1234)
    dst = tmp_path / "dst"
    for k in range(10):
        proc = subprocess.Popen(_convert_cmd(src, dst, to) + ["--overwrite"], stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)  # fmt: skip
        time.sleep(rng.uniform(0.3, duration))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        if dst.exists():  # the rename is the last step: whatever exists is complete and identical
            assert _digest(dst) == _digest(ref), f"kill {k}: destination exists but differs"
            shutil.rmtree(dst)
    subprocess.run(_convert_cmd(src, dst, to), check=True)
    assert _digest(dst) == _digest(ref)
    assert not list(tmp_path.glob(".dst.tmp-*")), "stale temporaries of killed runs were not cleaned up"


def test_two_conversions_at_once_do_not_interfere(medium_ckpt, tmp_path):
    a = subprocess.Popen(_convert_cmd(medium_ckpt, tmp_path / "a", "megatron"))
    b = subprocess.Popen(_convert_cmd(medium_ckpt, tmp_path / "b", "megatron"))
    assert a.wait() == 0 and b.wait() == 0
    assert _digest(tmp_path / "a") == _digest(tmp_path / "b")
    from ernie45.bridge.torch_dist import TorchDistReader

    ra, rb = TorchDistReader(tmp_path / "a"), TorchDistReader(tmp_path / "b")
    assert sorted(ra.keys()) == sorted(rb.keys())
