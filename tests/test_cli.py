"""The command-line surface is a contract: subcommands and flags are pinned here, and every --help carries an example.

A change to this table is a change users see (scripts break): make it on purpose, in the same commit as the code.
"""

from __future__ import annotations

import argparse
import subprocess
import sys

import pytest

from ernie45.cli import build_parser, main

SURFACE = {
    "demo": ["--out", "--keep"],
    "convert": ["<src>", "<dst>", "--to", "--tp", "--pp", "--ep", "--etp", "--vpp", "--first", "--last", "--hf-config",
                "--outtype", "--vit", "--verify-checksums", "--fsync", "--dry-run", "--overwrite", "--no-progress",
                "--json"],
    "parity": ["<checkpoint>", "--batch", "--seq", "--dtype", "--atol", "--json"],
    "inspect": ["<path>", "--json"],
    "verify": ["<a>", "<b>", "--prompt", "--prompt-ids", "--image", "--dtype", "--atol", "--tensor-atol",
               "--min-cosine", "--min-top1", "--min-routing", "--no-tensors", "--no-logits", "--hf-runtime", "--hf-config", "--all-tensors", "--json"],
    "route-stats": ["<checkpoint>", "--prompts", "--images", "--out", "--hf-config", "--title", "--json"],
    "generate": ["<checkpoint>", "--prompt", "--image", "--max-new-tokens", "--backend", "--hf-config", "--no-eos-stop",
                 "--no-kv-cache", "--json"],
    "prepare-data": ["<inputs>", "--tokenizer", "--out", "--text-key", "--overwrite", "--no-progress"],
    "train": ["--config", "--model", "--data", "--out", "--hf-config", "--tp", "--pp", "--ep", "--etp", "--vpp", "--first",
              "--last", "--sequence-parallel", "--recompute", "--vit", "--seq-length", "--micro-batch", "--global-batch",
              "--steps", "--lr", "--min-lr", "--warmup", "--schedule", "--weight-decay", "--adam-beta1", "--adam-beta2",
              "--adam-eps", "--clip-grad", "--dtype", "--distributed-optimizer", "--seed", "--no-shuffle", "--no-pack",
              "--overlong", "--eval-rows", "--eval-every", "--save-every", "--resume", "--overwrite", "--save-hf",
              "--freeze", "--vit-lr-mult", "--resampler-lr-mult", "--expert-bias-update-rate", "--aux-loss-coeff",
              "--lora", "--lora-alpha", "--lora-dropout", "--lora-targets", "--save-peft", "--no-progress", "--dry-run"],
}  # fmt: skip


def _subparsers(p: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    (sub,) = [a for a in p._actions if isinstance(a, argparse._SubParsersAction)]
    return dict(sub.choices)


def _surface(sp: argparse.ArgumentParser) -> list[str]:
    return [a.option_strings[0] if a.option_strings else f"<{a.dest}>"
            for a in sp._actions if not isinstance(a, argparse._HelpAction)]  # fmt: skip


def test_subcommands_and_flags_are_pinned():
    subs = _subparsers(build_parser())
    assert {name: _surface(sp) for name, sp in subs.items()} == SURFACE


@pytest.mark.parametrize("command", [None, *SURFACE])
def test_help_carries_examples(command, capsys):
    with pytest.raises(SystemExit) as e:
        main(["--help"] if command is None else [command, "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "example" in out and "ernie45 " in out.split("example", 1)[1]
    if command is None:
        assert all(name in out for name in SURFACE)


def test_module_entry_point_and_usage_errors():
    r = subprocess.run([sys.executable, "-m", "ernie45", "--help"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "usage: ernie45" in r.stdout
    r = subprocess.run([sys.executable, "-m", "ernie45", "convert", "a", "b"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "--to" in r.stderr  # argparse: the missing required flag is named


def test_bad_input_is_one_line_and_exit_2(tmp_path, capsys):
    assert main(["inspect", str(tmp_path / "nowhere")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "nowhere" in err[0] and err[0].startswith("ernie45 inspect: error:")


def test_the_parser_imports_no_heavy_library():
    """Building the parser (``--help``, a usage error) imports no torch / transformers / megatron: each command's
    module is imported only when that command runs. The flags it declares for them name the same choices."""
    code = ("import sys, ernie45.cli; ernie45.cli.build_parser(); "
            "heavy = [m for m in ('torch', 'transformers', 'megatron') if m in sys.modules]; assert not heavy, heavy")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    for argv in (["--help"], ["convert", "--help"]):
        r = subprocess.run([sys.executable, "-m", "ernie45", *argv], capture_output=True, text=True, timeout=120)
        assert r.returncode == 0 and r.stdout.startswith("usage: ernie45"), (argv, r.stderr)

    from ernie45 import cli, generate, runtime

    assert cli.DTYPES == tuple(runtime.DTYPES) and cli.GENERATE_BACKENDS == generate.BACKENDS
