"""Trust (issue 13): no source is ever harmed, no corruption or config/shape disagreement passes, every bad input
gets one clear error (exit 2, naming the file / tensor / field), and a bug in ernie45 is not reported as bad input.

Every test here builds the bad input a hostile or careless user would give and runs the real command on it.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import stat
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from ernie45.cli import main as cli
from ernie45.convert import convert

ASSETS = Path(__file__).resolve().parents[1] / "ernie45" / "assets"


# ------------------------------------------------------------------------------------------------------------------
# fixtures: the embedded tiny checkpoints, converted once per module; tests that damage one take a copy


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    root = tmp_path_factory.mktemp("trust")
    hf = root / "hf-moe"
    shutil.copytree(ASSETS / "tiny-ernie45-moe", hf)
    mg = root / "mg-moe"
    convert(hf, mg, to="megatron", tp=2, ep=2, progress=False)
    back = root / "hf-back"
    convert(mg, back, to="hf", progress=False)
    return {"hf": hf, "mg": mg, "back": back}


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst, symlinks=True)
    return dst


def _digest(path: Path) -> dict[str, str]:
    """Content hash of every file under ``path`` (links followed), to show a source was not touched."""
    return {str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(path.rglob("*")) if p.is_file()}  # fmt: skip


def _run(args, capsys) -> tuple[int, str]:
    code = cli([str(a) for a in args])
    return code, capsys.readouterr().err


def _fails(args, capsys, *needles) -> str:
    """The command exits 2 with one error (its first line says which command; a list of offenders may follow, one
    per line) naming every needle, and no traceback."""
    code, err = _run(args, capsys)
    assert code == 2, err
    assert err.startswith(f"ernie45 {args[0]}: error:") and "Traceback" not in err, err
    assert all(n in err for n in needles), err
    return err


def _convert(src, dst, to, *extra):
    return ["convert", src, dst, "--to", to, "--no-progress", *extra]


# ------------------------------------------------------------------------------------------------------------------
# one root for bad input; a bug keeps its traceback


def test_bad_input_errors_share_one_root():
    from ernie45.bridge.gguf import GGUFExportError
    from ernie45.bridge.io import CheckpointError
    from ernie45.config import ConfigError
    from ernie45.errors import InputError, UsageError
    from ernie45.layout import LayoutError

    for cls in (ConfigError, CheckpointError, LayoutError, GGUFExportError, UsageError):
        assert issubclass(cls, InputError), cls


def test_a_bug_is_not_reported_as_bad_input(monkeypatch, made):
    import ernie45.inspect

    def buggy(path):
        raise ValueError("an internal bug")  # e.g. a shape mistake inside ernie45, not the user's input

    monkeypatch.setattr(ernie45.inspect, "inspect_path", buggy)
    with pytest.raises(ValueError, match="an internal bug"):
        cli(["inspect", str(made["hf"])])


def test_dcp_failures_and_os_errors_are_translated():
    """DCP's CheckpointException is a BaseException: judged by what it wraps; an OSError names its path."""
    from torch.distributed.checkpoint.api import CheckpointException

    from ernie45.errors import bad_input_message

    missing = FileNotFoundError(errno.ENOENT, "No such file or directory", "/ck/__0_0.distcp")
    assert bad_input_message(CheckpointException("load", {0: (missing, None)})) == (
        "/ck/__0_0.distcp: No such file or directory"
    )
    assert bad_input_message(CheckpointException("load", {0: (KeyError("bug"), None)})) is None
    assert bad_input_message(OSError(errno.ENOSPC, "No space left on device", "/out/x")) == (
        "/out/x: No space left on device"
    )
    assert bad_input_message(KeyboardInterrupt()) is None


# ------------------------------------------------------------------------------------------------------------------
# 1. the source is never destroyed


@pytest.mark.parametrize("case", ["same-dir", "weight-file", "ancestor", "symlink-to-source", "inside"])
def test_destination_overlapping_the_source_is_refused(case, made, tmp_path, capsys):
    root = tmp_path / "root"
    root.mkdir()
    if case == "same-dir":
        src = _copy(made["mg"], root / "mg")
        args = _convert(src, src, "megatron", "--overwrite")
    elif case == "weight-file":
        src = _copy(made["hf"], root / "hf")
        args = _convert(src, src / "model.safetensors", "gguf", "--overwrite")
    elif case == "ancestor":
        src = _copy(made["hf"], root / "hf")
        args = _convert(src, root, "megatron", "--overwrite")
    elif case == "symlink-to-source":
        src = _copy(made["mg"], root / "mg")
        (tmp_path / "link").symlink_to(src, target_is_directory=True)
        args = _convert(src, tmp_path / "link", "hf", "--overwrite")
    else:
        src = _copy(made["hf"], root / "hf")
        args = _convert(src, src / "mg", "megatron")
    before = _digest(src)
    _fails(args, capsys, "destination", "source")
    assert _digest(src) == before


# ------------------------------------------------------------------------------------------------------------------
# 2. stored shapes are checked against the config at open


def _edit_config(d: Path, **changes) -> None:
    cfg = json.loads((d / "config.json").read_text())
    cfg.update(changes)
    (d / "config.json").write_text(json.dumps(cfg))


def test_torch_dist_with_a_smaller_vocab_in_its_config_is_refused_not_trimmed(made, tmp_path, capsys):
    mg = _copy(made["mg"], tmp_path / "mg")
    _edit_config(mg, vocab_size=150)  # the checkpoint stores 160 rows; 10 of them are not TP padding
    _fails(_convert(mg, tmp_path / "out", "hf"), capsys, "vocab_size 150", "embedding.word_embeddings.weight")
    assert not (tmp_path / "out").exists()
    _fails(["inspect", mg], capsys, "vocab_size 150")


def test_torch_dist_shape_disagreement_is_found_at_open(made, tmp_path, capsys):
    mg = _copy(made["mg"], tmp_path / "mg")
    cfg = json.loads((mg / "config.json").read_text())
    _edit_config(mg, moe_intermediate_size=cfg["moe_intermediate_size"] * 2)
    err = _fails(_convert(mg, tmp_path / "out", "hf"), capsys, "wrong shape", "experts.linear_fc1.weight")
    assert str(mg / "config.json") in err
    _fails(["inspect", mg], capsys, "wrong shape")


def test_hf_shape_disagreement_is_reported_by_inspect(made, tmp_path, capsys):
    hf = _copy(made["hf"], tmp_path / "hf")
    _edit_config(hf, intermediate_size=json.loads((hf / "config.json").read_text())["intermediate_size"] + 8)
    _fails(["inspect", hf], capsys, "wrong shapes", "model.layers.0.mlp.gate_proj.weight")


def test_gguf_shapes_are_checked_against_its_own_metadata(gguf_file, tmp_path, capsys):
    import gguf

    from ernie45.bridge.gguf import _seal

    bad = tmp_path / "bad.gguf"
    shutil.copyfile(gguf_file, bad)
    field = gguf.GGUFReader(str(bad)).fields["ernie4_5-moe.expert_feed_forward_length"]
    at = field.offset + sum(int(p.nbytes) for p in field.parts[:-1])
    with open(bad, "r+b") as f:  # the metadata now says experts are 16 wide; the tensors are 32 wide
        f.seek(at)
        f.write(struct.pack("<I", 16))
    _seal(bad)  # a consistent checksum: the disagreement itself must be found
    _fails(["inspect", bad], capsys, str(bad), "blk.1.ffn_gate_exps.weight", "[8, 16, 48]")


# ------------------------------------------------------------------------------------------------------------------
# 3. checksums: what ernie45 wrote is checked when read


def _flip_byte(f: Path, at: int) -> None:
    data = bytearray(f.read_bytes())
    data[at] ^= 0x40
    f.write_bytes(bytes(data))


def _distcp(d: Path) -> Path:
    return sorted(d.glob("*.distcp"))[0]


def test_flipped_bytes_in_a_distcp_are_caught(made, tmp_path, capsys):
    mg = _copy(made["mg"], tmp_path / "mg")
    f = _distcp(mg)
    _flip_byte(f, f.stat().st_size // 2)
    for to in ("hf", "megatron", "gguf"):
        dst = tmp_path / ("out.gguf" if to == "gguf" else f"out-{to}")
        _fails(_convert(mg, dst, to), capsys, str(f), "checksum mismatch")
        assert not dst.exists()
    _fails(_convert(mg, tmp_path / "dry", "hf", "--verify-checksums", "--dry-run"), capsys, "checksum mismatch")
    _fails(["inspect", mg], capsys, "checksum mismatch")
    _fails(["verify", made["hf"], mg, "--prompt-ids", "1 2 3"], capsys, str(f), "checksum mismatch")


def test_flipped_bytes_in_an_hf_export_are_caught(made, tmp_path, capsys):
    back = _copy(made["back"], tmp_path / "hf")
    f = back / "model.safetensors"
    _flip_byte(f, f.stat().st_size - 100)  # tensor data, not the header
    _fails(_convert(back, tmp_path / "mg", "megatron"), capsys, str(f), "checksum mismatch")
    _fails(["inspect", back], capsys, "checksum mismatch")


def test_a_checkpoint_without_checksums_is_read_with_a_note(made, tmp_path, capsys):
    mg = _copy(made["mg"], tmp_path / "mg")
    info = json.loads((mg / "ernie45.json").read_text())
    info.pop("checksums", None)  # as Megatron's own dist_checkpointing.save leaves it: nothing recorded
    (mg / "ernie45.json").write_text(json.dumps(info))
    code = cli([str(a) for a in _convert(mg, tmp_path / "out", "hf")])
    out = capsys.readouterr().out
    assert code == 0 and f"note: {mg}: no checksums recorded" in out, out  # printed with the summary
    _fails(_convert(mg, tmp_path / "out2", "hf", "--verify-checksums"), capsys, "no checksums recorded")


@pytest.mark.parametrize("damage", ["missing", "truncated", "replaced"])
def test_missing_truncated_or_replaced_distcp_is_a_clean_error(damage, made, tmp_path, capsys):
    """With ernie45's record and without (as Megatron writes it): never DCP's CheckpointException (a BaseException
    that escapes ``except Exception``), never "fine" from inspect."""
    for recorded in (True, False):
        mg = _copy(made["mg"], tmp_path / f"mg-{recorded}")
        if not recorded:
            _strip_checksums(mg)
        f = _distcp(mg)
        if damage == "missing":
            f.unlink()
        elif damage == "truncated":
            f.write_bytes(f.read_bytes()[:-1000])
        else:  # same size, other bytes: only a checksum can tell, else DCP's own reader fails on it
            f.write_bytes(os.urandom(f.stat().st_size))
        needle = {"missing": "missing", "truncated": "truncated", "replaced": "checksum mismatch" if recorded else
                  "cannot read"}[damage]  # fmt: skip
        for args in (_convert(mg, tmp_path / "out", "hf"), ["verify", made["hf"], mg, "--prompt-ids", "1 2"]):
            _fails(args, capsys, str(mg), needle)
        if recorded or damage != "replaced":  # inspect reads no tensor data: a replaced file needs a checksum
            _fails(["inspect", mg], capsys, str(mg), needle)


# ------------------------------------------------------------------------------------------------------------------
# 5. the Hugging Face cache layout


def _as_hf_cache(src: Path, cache: Path, *, link_tokenizer_to: Path | None = None) -> Path:
    """``src`` laid out as ``hf download`` leaves it: snapshots/<rev>/<file> -> ../../blobs/<sha256>."""
    repo = cache / "models--baidu--tiny"
    (repo / "blobs").mkdir(parents=True)
    snap = repo / "snapshots" / "0123abc"
    snap.mkdir(parents=True)
    for f in sorted(src.iterdir()):
        blob = hashlib.sha256(f.read_bytes()).hexdigest()
        shutil.copyfile(f, repo / "blobs" / blob)
        (snap / f.name).symlink_to(Path("..") / ".." / "blobs" / blob)
    if link_tokenizer_to is not None:
        (snap / "tokenizer.model").unlink()
        (snap / "tokenizer.model").symlink_to(link_tokenizer_to)
    return snap


@pytest.fixture(scope="module")
def sharded(made, tmp_path_factory):
    """An HF checkpoint in several shards with an index (as the released ones are), tokenizer included."""
    from ernie45.bridge.torch_dist import MegatronSource
    from ernie45.convert import write_hf

    out = tmp_path_factory.mktemp("sharded") / "hf"
    write_hf(MegatronSource(made["mg"]), out, progress=False, max_shard_bytes=300_000)
    assert (out / "model.safetensors.index.json").is_file() and (out / "tokenizer.model").is_file()
    (out / "ernie45.json").unlink(missing_ok=True)  # as downloaded from the hub
    return out


def test_sharded_checkpoint_in_the_hf_cache_layout_converts(sharded, made, tmp_path, capsys):
    snap = _as_hf_cache(sharded, tmp_path / "cache")
    code, err = _run(_convert(snap, tmp_path / "mg", "megatron", "--tp", "2"), capsys)
    assert code == 0, err
    assert (tmp_path / "mg" / "tokenizer.model").read_bytes() == (sharded / "tokenizer.model").read_bytes()
    code, err = _run(_convert(tmp_path / "mg", tmp_path / "hf", "hf"), capsys)
    assert code == 0, err
    a, b = load_file(made["hf"] / "model.safetensors"), {}
    for f in (tmp_path / "hf").glob("*.safetensors"):
        b.update(load_file(f))
    assert sorted(a) == sorted(b)
    assert all(a[n].dtype == b[n].dtype and torch.equal(a[n], b[n]) for n in a)


def test_side_file_linked_outside_the_checkpoint_is_never_copied(sharded, tmp_path, capsys):
    secret = tmp_path / "secret.txt"
    secret.write_text("a system file")
    snap = _as_hf_cache(sharded, tmp_path / "cache", link_tokenizer_to=secret)
    for to, dst in (("megatron", tmp_path / "mg"), ("gguf", tmp_path / "m.gguf")):
        _fails(_convert(snap, dst, to), capsys, "tokenizer.model", "outside the checkpoint")
        assert not dst.exists()
    # and in a plain directory
    plain = _copy(sharded, tmp_path / "plain")
    (plain / "tokenizer.model").unlink()
    (plain / "tokenizer.model").symlink_to(secret)
    _fails(_convert(plain, tmp_path / "mg2", "megatron"), capsys, "tokenizer.model", "outside the checkpoint")


@pytest.mark.parametrize("shard", ["../elsewhere.safetensors", "/abs/x.safetensors", "a/../../x.safetensors"])
def test_index_entries_are_judged_by_their_text(sharded, tmp_path, capsys, shard):
    ck = _copy(sharded, tmp_path / "ck")
    index = json.loads((ck / "model.safetensors.index.json").read_text())
    first = next(iter(index["weight_map"]))
    index["weight_map"][first] = shard
    (ck / "model.safetensors.index.json").write_text(json.dumps(index))
    _fails(_convert(ck, tmp_path / "mg", "megatron"), capsys, "points outside the checkpoint directory", shard)


# ------------------------------------------------------------------------------------------------------------------
# flags the target would ignore


@pytest.mark.parametrize(
    "to, flags, needle",
    [("gguf", ["--tp", "3"], "--tp"), ("megatron", ["--outtype", "q8_0"], "--outtype"),
     ("hf", ["--tp", "2"], "--tp"), ("megatron", ["--vit", "megatron"], "--vit")],
)  # fmt: skip
def test_flags_the_target_ignores_are_refused(to, flags, needle, made, tmp_path, capsys):
    src = made["hf"] if to != "hf" else made["mg"]
    dst = tmp_path / ("m.gguf" if to == "gguf" else "out")
    _fails(_convert(src, dst, to, *flags), capsys, needle)
    assert not dst.exists()


# ------------------------------------------------------------------------------------------------------------------
# config values of the wrong type or range: typed, ranged checks naming the field


@pytest.mark.parametrize(
    "family, change, needle",
    [
        ("dense", {"hidden_size": "64"}, "hidden_size must be an integer >= 1, got '64'"),
        ("moe", {"intermediate_size": [128]}, "intermediate_size must be an integer >= 1"),
        ("moe", {"num_key_value_heads": 0}, "num_key_value_heads must be an integer >= 1, got 0"),
        ("moe", {"rms_norm_eps": -1e-5}, "rms_norm_eps must be a number > 0"),
        ("dense", {"tie_word_embeddings": "false"}, "tie_word_embeddings must be true or false"),
        ("moe", {"use_bias": "false"}, "use_bias must be true or false"),
        ("moe", {"rope_parameters": "default"}, "rope_parameters must be a JSON object"),
        ("moe", {"moe_k": True}, "moe_k must be an integer >= 1, got True"),
        ("moe", {"moe_num_shared_experts": -1}, "moe_num_shared_experts must be an integer >= 0"),
        ("vl", {"text_config.moe_intermediate_size": [64, "32"]}, "text_config.moe_intermediate_size[1]"),
        ("vl", {"vision_config.depth": 1.5}, "vision_config.depth must be an integer >= 1"),
    ],
)  # fmt: skip
def test_config_values_are_typed_and_ranged(family, change, needle, tmp_path, capsys):
    ck = _copy(ASSETS / f"tiny-ernie45-{family}", tmp_path / "ck")
    cfg = json.loads((ck / "config.json").read_text())
    for key, value in change.items():
        d = cfg
        *parents, leaf = key.split(".")
        for part in parents:
            d = d[part]
        d[leaf] = value
    (ck / "config.json").write_text(json.dumps(cfg))
    _fails(["inspect", ck], capsys, str(ck / "config.json"), needle)


def test_config_json_that_is_an_array(tmp_path, capsys):
    ck = _copy(ASSETS / "tiny-ernie45-dense", tmp_path / "ck")
    (ck / "config.json").write_text("[1, 2]")
    _fails(["inspect", ck], capsys, str(ck / "config.json"), "must be a JSON object")


# ------------------------------------------------------------------------------------------------------------------
# malformed files: one error naming the file and what is wrong with it


@pytest.mark.parametrize("dtype, name", [(torch.uint32, "U32"), (torch.float8_e4m3fn, "F8_E4M3")])
def test_safetensors_dtype_ernie45_does_not_read(dtype, name, tmp_path, capsys):
    ck = _copy(ASSETS / "tiny-ernie45-dense", tmp_path / "ck")
    tensors = load_file(ck / "model.safetensors")
    tensors["model.norm.weight"] = tensors["model.norm.weight"].to(dtype)
    save_file(tensors, ck / "model.safetensors", metadata={"format": "pt"})
    for args in (_convert(ck, tmp_path / "mg", "megatron"), ["inspect", ck]):
        _fails(args, capsys, str(ck / "model.safetensors"), "model.norm.weight", name)


@pytest.mark.parametrize("weight_map", [["model.safetensors"], {"model.norm.weight": 3}, "model.safetensors"])
def test_index_whose_weight_map_is_not_a_name_map(weight_map, sharded, tmp_path, capsys):
    ck = _copy(sharded, tmp_path / "ck")
    (ck / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    _fails(_convert(ck, tmp_path / "mg", "megatron"), capsys, "model.safetensors.index.json", "weight_map")


def _with_alarm(seconds: int):
    """Turn a hang into a failure (a FIFO read blocks forever)."""
    import signal

    def boom(*_):
        raise TimeoutError("hung on a non-regular file")

    signal.signal(signal.SIGALRM, boom)
    signal.alarm(seconds)


def test_fifo_as_a_weight_file_is_refused_without_hanging(made, tmp_path, capsys):
    import signal

    hf = _copy(made["hf"], tmp_path / "hf")
    (hf / "model.safetensors").unlink()
    os.mkfifo(hf / "model.safetensors")
    mg = _copy(made["mg"], tmp_path / "mg")
    _distcp(mg).unlink()
    os.mkfifo(mg / "__0_0.distcp")
    os.mkfifo(tmp_path / "m.gguf")
    _with_alarm(60)
    try:
        for args, needle in (
            (_convert(hf, tmp_path / "o1", "megatron"), hf / "model.safetensors"),
            (["inspect", hf], hf / "model.safetensors"),
            (_convert(mg, tmp_path / "o2", "hf"), mg / "__0_0.distcp"),
            (["inspect", mg], mg / "__0_0.distcp"),
            (["inspect", tmp_path / "m.gguf"], tmp_path / "m.gguf"),
        ):
            _fails(args, capsys, str(needle), "not a regular file")
    finally:
        signal.alarm(0)


@pytest.mark.parametrize("recorded", [True, False])
def test_torch_dist_without_its_metadata_is_named_so(recorded, made, tmp_path, capsys):
    mg = _copy(made["mg"], tmp_path / "mg")
    if not recorded:
        _strip_checksums(mg)
    (mg / ".metadata").unlink()
    needle = f"{mg / '.metadata'}: missing" if recorded else f"{mg}: not a complete torch_dist checkpoint (no .metadata"
    for args in (_convert(mg, tmp_path / "o", "hf"), ["inspect", mg]):
        err = _fails(args, capsys, needle)
        assert "pickle" not in err


def _strip_checksums(mg: Path) -> None:
    info = json.loads((mg / "ernie45.json").read_text())
    info.pop("checksums", None)
    (mg / "ernie45.json").write_text(json.dumps(info))


@pytest.mark.parametrize("recorded", [True, False])
def test_metadata_that_is_a_pickle_of_the_wrong_type(recorded, made, tmp_path, capsys):
    import pickle

    mg = _copy(made["mg"], tmp_path / "mg")
    if not recorded:
        _strip_checksums(mg)
    (mg / ".metadata").write_bytes(pickle.dumps({"state_dict_metadata": {}}))
    needle = "truncated or replaced" if recorded else "not DCP metadata (a pickled dict)"
    for args in (_convert(mg, tmp_path / "o", "hf"), ["inspect", mg]):
        _fails(args, capsys, str(mg / ".metadata"), needle)


@pytest.mark.parametrize(
    "name, text, needle",
    [("ernie45.json", "{garbage", "not JSON"), ("ernie45.json", '{"tied": "yes"}', "malformed ernie45 record"),
     ("ernie45.json", "[]", "not an ernie45 record"), ("metadata.json", "\\x00\\x01", "not JSON"),
     ("metadata.json", '{"sharded_backend": "zarr"}', "sharded_backend is not torch_dist")],
)  # fmt: skip
def test_garbage_in_the_json_beside_a_torch_dist(name, text, needle, made, tmp_path, capsys):
    mg = _copy(made["mg"], tmp_path / "mg")
    if name == "metadata.json":
        _strip_checksums(mg)  # else the recorded checksum names it first
    (mg / name).write_text(text)
    for args in (_convert(mg, tmp_path / "o", "hf"), ["inspect", mg]):
        _fails(args, capsys, str(mg / name), needle)


# ------------------------------------------------------------------------------------------------------------------
# GGUF: headers, checksums, tokenizer files, interrupted exports


@pytest.fixture(scope="module")
def gguf_file(made, tmp_path_factory):
    out = tmp_path_factory.mktemp("gguf") / "m.gguf"
    convert(made["hf"], out, to="gguf", progress=False)
    return out


def test_gguf_header_declaring_absurd_counts(gguf_file, tmp_path, capsys):
    bad = tmp_path / "bad.gguf"
    data = bytearray(gguf_file.read_bytes())
    data[8:16] = struct.pack("<Q", 2**40)  # tensor count
    bad.write_bytes(bytes(data))
    _fails(["inspect", bad], capsys, str(bad), f"declares {2**40} tensors")


def test_truncated_or_flipped_gguf(gguf_file, tmp_path, capsys):
    from ernie45.bridge.gguf import read_gguf_as_hf

    trunc = tmp_path / "trunc.gguf"
    trunc.write_bytes(gguf_file.read_bytes()[: gguf_file.stat().st_size // 3])
    _fails(["inspect", trunc], capsys, str(trunc))
    flipped = tmp_path / "flipped.gguf"
    shutil.copyfile(gguf_file, flipped)
    _flip_byte(flipped, flipped.stat().st_size - 64)  # tensor data
    _fails(["inspect", flipped], capsys, str(flipped), "checksum mismatch")
    with pytest.raises(Exception, match="checksum mismatch"):
        read_gguf_as_hf(flipped)
    assert read_gguf_as_hf(gguf_file)  # the intact one reads


@pytest.mark.parametrize(
    "name, text, needle",
    [("tokenizer.model", "not a protobuf", "not a SentencePiece model"),
     ("tokenizer_config.json", "{broken", "not JSON"),
     ("tokenizer_config.json", '{"added_tokens_decoder": {"x": 1}}', "added_tokens_decoder"),
     ("added_tokens.json", '{"<x>": "7"}', "integer ids")],
)  # fmt: skip
def test_tokenizer_file_that_does_not_parse(name, text, needle, made, tmp_path, capsys):
    hf = _copy(made["hf"], tmp_path / "hf")
    (hf / name).write_text(text)
    _fails(_convert(hf, tmp_path / "m.gguf", "gguf"), capsys, str(hf / name), needle)
    assert not list(tmp_path.glob("*.gguf*")) and not list(tmp_path.glob(".m.gguf*"))


@pytest.mark.parametrize("to", ["megatron", "hf"])
def test_json_side_file_that_does_not_parse_is_named(to, made, tmp_path, capsys):
    src = _copy(made["mg"] if to == "hf" else made["hf"], tmp_path / "src")
    (src / "tokenizer_config.json").write_text('{"model_max_length": 12,')
    _fails(_convert(src, tmp_path / "out", to), capsys, str(src / "tokenizer_config.json"), "not JSON")
    assert not (tmp_path / "out").exists()


def test_interrupted_gguf_exports_are_cleaned_like_directories(made, tmp_path):
    """A killed export leaves `.m.gguf.tmp-<pid>-*.partial`; the next export into the same name removes it."""
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()  # a pid that no longer runs
    stale = tmp_path / f".m.gguf.tmp-{dead.pid}-abcd.partial"
    stale.write_bytes(b"x" * 1000)
    stale_dir = tmp_path / f".mg.tmp-{dead.pid}-abcd"
    stale_dir.mkdir()
    convert(made["hf"], tmp_path / "m.gguf", to="gguf", progress=False)
    convert(made["hf"], tmp_path / "mg", to="megatron", progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.gguf", "mg"]


# ------------------------------------------------------------------------------------------------------------------
# reproducible outputs that follow the umask


def test_two_clean_conversions_are_bit_identical(made, tmp_path):
    for name in ("a", "b"):
        convert(made["hf"], tmp_path / name, to="megatron", tp=2, ep=2, progress=False)
        convert(tmp_path / name, tmp_path / f"{name}-hf", to="hf", progress=False)
        convert(made["hf"], tmp_path / f"{name}.gguf", to="gguf", progress=False)
    a, b = _digest(tmp_path / "a"), _digest(tmp_path / "b")
    assert ".metadata" in a and a == b
    assert _digest(tmp_path / "a-hf") == _digest(tmp_path / "b-hf")
    assert (tmp_path / "a.gguf").read_bytes() == (tmp_path / "b.gguf").read_bytes()


def test_gguf_checksum_is_the_sha256_of_the_file(gguf_file):
    """Independently of ernie45's reader: find the key's bytes, blank its 64-character value, hash the file."""
    data = gguf_file.read_bytes()
    key = b"ernie45.sha256"
    at = data.index(struct.pack("<Q", len(key)) + key) + 8 + len(key)
    assert struct.unpack("<IQ", data[at : at + 12]) == (8, 64)  # a string of 64 bytes
    value = data[at + 12 : at + 12 + 64]
    blanked = data[: at + 12] + b"0" * 64 + data[at + 12 + 64 :]
    assert value.decode() == hashlib.sha256(blanked).hexdigest()


def test_outputs_follow_the_umask(made, tmp_path):
    old = os.umask(0o027)
    try:
        convert(made["hf"], tmp_path / "mg", to="megatron", progress=False)
        convert(tmp_path / "mg", tmp_path / "hf", to="hf", progress=False)
        convert(made["hf"], tmp_path / "m.gguf", to="gguf", progress=False)
    finally:
        os.umask(old)
    for d in (tmp_path / "mg", tmp_path / "hf"):
        assert stat.S_IMODE(d.stat().st_mode) == 0o750, d
        for f in d.iterdir():
            assert stat.S_IMODE(f.stat().st_mode) == 0o640, f
    assert stat.S_IMODE((tmp_path / "m.gguf").stat().st_mode) == 0o640


# ------------------------------------------------------------------------------------------------------------------
# destination OS errors: exit 2 naming the path and the reason, nothing left behind


def _leftovers(d: Path) -> list[str]:
    return sorted(p.name for p in d.iterdir() if ".tmp-" in p.name or ".old-" in p.name)


def test_destination_whose_parent_is_a_file(made, tmp_path, capsys):
    (tmp_path / "afile").write_text("x")
    for to, name in (("megatron", "out"), ("gguf", "m.gguf")):
        _fails(_convert(made["hf"], tmp_path / "afile" / name, to), capsys, f"{tmp_path / 'afile'} is not a directory")


def test_long_destination_names(made, tmp_path, capsys):
    """A valid name (<= 255 bytes) is not made too long by the temporary's suffix; an invalid one is named."""
    for to, name in (("megatron", "m" * 250), ("gguf", "g" * 245 + ".gguf")):
        code, err = _run(_convert(made["hf"], tmp_path / name, to), capsys)
        assert code == 0, err
        assert (tmp_path / name).exists() and _leftovers(tmp_path) == []
    _fails(_convert(made["hf"], tmp_path / ("x" * 300), "megatron"), capsys, "x" * 300, "File name too long")


@pytest.fixture()
def tiny_mount(tmp_path):
    """mount(kind) -> a tmpfs of 256 KiB ("full": smaller than any output) or a read-only one ("ro")."""
    mounted = []

    def mount(kind: str) -> Path:
        d = tmp_path / f"mnt-{kind}"
        d.mkdir()
        opts = "size=256k" if kind == "full" else "size=256k,ro"
        r = subprocess.run(["mount", "-t", "tmpfs", "-o", opts, "tmpfs", str(d)], capture_output=True)
        if r.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here ({r.stderr.decode().strip()})")
        mounted.append(d)
        return d

    yield mount
    for d in mounted:
        subprocess.run(["umount", str(d)], check=True)


@pytest.mark.parametrize("kind, reason", [("full", "No space left on device"), ("ro", "Read-only file system")])
@pytest.mark.parametrize("to", ["megatron", "hf", "gguf"])
def test_destination_on_a_full_or_read_only_file_system(kind, reason, to, made, tmp_path, tiny_mount, capsys):
    d = tiny_mount(kind)
    src = made["mg"] if to == "hf" else made["hf"]
    dst = d / ("m.gguf" if to == "gguf" else "out")
    _fails(_convert(src, dst, to), capsys, str(dst), reason)
    assert list(d.iterdir()) == []


def test_destination_permission_denied(made, tmp_path, capsys):
    if os.geteuid() != 0:
        pytest.skip("needs root to act as another user")
    import tempfile

    base = Path(tempfile.mkdtemp(dir="/tmp"))
    try:
        os.chmod(base, 0o755)
        src = _copy(made["hf"], base / "hf")
        for p in [src, *src.iterdir()]:
            os.chmod(p, 0o755 if p.is_dir() else 0o644)
        locked = base / "locked"
        locked.mkdir(mode=0o555)
        os.seteuid(65534)  # nobody: the root-owned, read-only directory is not writable
        try:
            for to, name in (("megatron", "out"), ("gguf", "m.gguf")):
                _fails(_convert(src, locked / name, to), capsys, str(locked / name), "Permission denied")
        finally:
            os.seteuid(0)
        assert list(locked.iterdir()) == []
    finally:
        shutil.rmtree(base)
