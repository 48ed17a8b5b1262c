"""Command line: a thin shell over the library (every command is a function you can call from Python).

    ernie45 demo                      # the main job, on the embedded tiny checkpoints
    ernie45 parity HF_DIR             # Megatron-Core (through the bridge) vs transformers, exact numbers
    ernie45 inspect PATH              # what a checkpoint is: family, sizes, parameters, dtypes, MTP, oddities
    ernie45 convert SRC DST --to {megatron,hf,gguf} [--tp N --pp N --ep N --vpp N] [--dry-run] [--overwrite]
    ernie45 verify A B                # tensors, logits, top-1 and routing agreement between any two formats
    ernie45 route-stats CKPT --prompts FILE --out DIR   # expert load heatmap and imbalance
    ernie45 generate CKPT --prompt TEXT                  # greedy sample
    ernie45 prepare-data FILE.jsonl --tokenizer CKPT --out PREFIX   # text -> Megatron IndexedDataset
    ernie45 train --model CKPT --data FILE --out RUN_DIR [--tp N --ep N ...]   # fine-tune on Megatron-Core

Building the parser imports no torch, transformers or Megatron: each command's module is imported when that command
runs (:func:`_lazy`), so ``--help`` is instant and the verb modules import torch at their top. The flags of
``verify``, ``generate`` and ``route-stats`` are declared here for that reason; ``train`` and ``prepare-data`` keep
theirs beside their (torch-free) configs.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
import warnings
from pathlib import Path

__all__ = ["main", "program", "build_parser"]

EXIT_BAD_INPUT = 2
DTYPES = ("fp32", "bf16")  # runtime.DTYPES' keys: what a comparison computes in
GENERATE_BACKENDS = ("auto", "transformers", "megatron", "llama.cpp")  # generate.BACKENDS


def _lazy(module: str):
    """``module.run(args)``, the module imported only when the command runs."""

    def run(args: argparse.Namespace) -> int:
        return importlib.import_module(module).run(args)

    return run


def _cmd_parity(args: argparse.Namespace) -> int:
    from .parity import check_parity

    report = check_parity(args.checkpoint, batch=args.batch, seq=args.seq, dtype=args.dtype)
    fails = report.failures(atol=args.atol)
    print(json.dumps({**report.to_json(), "failures": fails}, indent=2) if args.json else report.table())
    if not args.json:
        print("  result   OK" if not fails else "  result   FAILED\n" + "\n".join(f"    - {f}" for f in fails))
    return 0 if not fails else 1


def _cmd_inspect(args: argparse.Namespace) -> int:
    from .inspect import inspect_path

    info = inspect_path(args.path)
    print(json.dumps(info, indent=2) if args.json else "\n".join(f"{k:>22}: {v}" for k, v in info.items()))
    return 0


def _cmd_convert(args: argparse.Namespace) -> int:
    from .convert import convert

    report = convert(
        args.src, args.dst, to=args.to, tp=args.tp, pp=args.pp, ep=args.ep, etp=args.etp, vpp=args.vpp,
        first=args.first, last=args.last, dry_run=args.dry_run, overwrite=args.overwrite, hf_config=args.hf_config,
        outtype=args.outtype, vit=args.vit, verify_checksums=args.verify_checksums, fsync=args.fsync,
        progress=not args.no_progress and sys.stderr.isatty(),
    )  # fmt: skip
    if args.json:
        print(json.dumps(report.to_json(), indent=2))
    else:
        if report.dry_run:
            print(report.plan_text)
        print(report.summary())
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    return run_demo(out_dir=args.out, keep=args.keep)


EXAMPLES = """examples:
  ernie45 demo
  ernie45 convert ./ERNIE-4.5-21B-A3B-PT ./mcore --to megatron --tp 2 --pp 2 --ep 4 --etp 1
  ernie45 convert ./mcore ./hf-out --to hf
  ernie45 convert ./mcore ./mcore-tp4 --to megatron --tp 4      # reshard
  ernie45 convert ./ERNIE-4.5-0.3B-PT ./ernie.gguf --to gguf --outtype q8_0
  ernie45 parity ./ERNIE-4.5-21B-A3B-PT --seq 32
  ernie45 inspect ./ERNIE-4.5-0.3B-PT --json
  ernie45 verify ./ERNIE-4.5-0.3B-PT ./ernie.gguf
  ernie45 route-stats ./ERNIE-4.5-21B-A3B-PT --prompts prompts.txt --out stats/
  ernie45 generate ./mcore --prompt "Hello"
  ernie45 prepare-data corpus.jsonl --tokenizer ./ERNIE-4.5-0.3B-PT --out data/corpus
"""


def _verify_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("a", type=Path, help="HF directory, Megatron torch_dist directory or GGUF file")
    p.add_argument("b", type=Path, help="the checkpoint to compare with A (any of the three formats)")
    p.add_argument("--prompt", action="append", default=None, metavar="TEXT",
                   help="prompt text, tokenized with the checkpoint's tokenizer; repeat for more rows")
    p.add_argument("--prompt-ids", action="append", default=None, metavar="IDS",
                   help='a row of whitespace-separated token ids, e.g. "1 17 42"; repeat for more rows (equal '
                        "lengths). Default: 2 rows of 16 seeded random ids")  # fmt: skip
    p.add_argument("--image", type=Path, default=None, help="an image file for VL checkpoints (inserted mid-prompt)")
    p.add_argument("--dtype", choices=list(DTYPES), default="fp32",
                   help="what both sides compute in (routers and expert bias stay fp32, as in transformers); "
                        "sets the default thresholds (docs/verify.md has them and the measurements behind them)")
    p.add_argument("--atol", type=float, default=None,
                   help="fail (exit 1) above this logits max |Δ| (default: 1e-4 at fp32 and for an F32 GGUF, "
                        "else not judged)")  # fmt: skip
    p.add_argument("--tensor-atol", type=float, default=None,
                   help="fail above this max |Δ| of any tensor (0: equal values; default: the rounding of the "
                        "coarser storage type, eps x max |x|, Q8_0 max |x| / 127)")  # fmt: skip
    p.add_argument("--min-cosine", type=float, default=None,
                   help="fail below this cosine similarity of the logits (default: bf16 0.99, GGUF F16 0.9999, "
                        "BF16 0.995, Q8_0 0.99; fp32 not judged)")  # fmt: skip
    p.add_argument("--min-top1", type=float, default=None,
                   help="fail below this top-1 agreement, 0..1 (default: fp32 / F32 GGUF 1, bf16 0.8, GGUF F16 "
                        "0.95, BF16 0.9, Q8_0 0.75)")  # fmt: skip
    p.add_argument("--min-routing", type=float, default=None,
                   help="fail below this routing agreement in any MoE layer / pool, 0..1 (default: fp32 1, "
                        "bf16 0.8; not observable with a GGUF side)")  # fmt: skip
    p.add_argument("--no-tensors", action="store_true", help="skip the tensor comparison")
    p.add_argument("--no-logits", action="store_true", help="skip logits and routing (tensors only)")
    p.add_argument("--hf-runtime", choices=["transformers", "megatron"], default="transformers",
                   help="what runs an HF directory (default: transformers, the reference)")  # fmt: skip
    p.add_argument("--hf-config", type=Path, default=None, help="config.json for a torch_dist directory without one")
    p.add_argument("--all-tensors", action="store_true", help="list bit-exact tensors too")
    p.add_argument("--json", action="store_true", help="print the report as JSON")


def _route_stats_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("checkpoint", type=Path, help="MoE checkpoint: HF directory or Megatron torch_dist directory")
    p.add_argument("--prompts", type=Path, required=True,
                   help="text file, one prompt per line (token ids if the checkpoint has no tokenizer)")  # fmt: skip
    p.add_argument("--images", type=Path, default=None, help="VL: directory of images; image k goes before prompt k")
    p.add_argument("--out", type=Path, required=True, help="output directory for the CSVs and the PNG")
    p.add_argument("--hf-config", type=Path, default=None, help="config.json for a torch_dist directory without one")
    p.add_argument("--title", default=None, help="figure title")
    p.add_argument("--json", action="store_true", help="print the statistics as JSON")


def _generate_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("checkpoint", type=Path, help="HF directory, Megatron torch_dist directory or GGUF file")
    p.add_argument("--prompt", required=True,
                   help="prompt text (token ids, whitespace-separated, if the checkpoint has no tokenizer)")
    p.add_argument("--image", type=Path, default=None, help="an image file for VL checkpoints")
    p.add_argument("--max-new-tokens", type=int, default=16, help="tokens to generate at most (default 16)")
    p.add_argument("--backend", choices=GENERATE_BACKENDS, default="auto",
                   help="auto: transformers for HF, megatron for torch_dist, llama.cpp for GGUF")  # fmt: skip
    p.add_argument("--hf-config", type=Path, default=None, help="config.json for a torch_dist directory without one")
    p.add_argument("--no-eos-stop", action="store_true", help="always generate --max-new-tokens tokens")
    p.add_argument("--no-kv-cache", action="store_true", help="megatron: recompute the whole sequence for each token")
    p.add_argument("--json", action="store_true", help="print the result as JSON")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="ernie45",
        description="ERNIE 4.5 on Megatron-Core: exact HF <-> Megatron <-> GGUF weight bridges.",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    d = sub.add_parser("demo", help="run the whole journey on the embedded tiny checkpoints", epilog=EXAMPLES,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    d.add_argument("--out", type=Path, default=None, help="work directory (default: a temporary one)")
    d.add_argument("--keep", action="store_true", help="keep the work directory")
    d.set_defaults(func=_cmd_demo)

    c = sub.add_parser("convert", help="HF <-> Megatron torch_dist (any layout) -> GGUF, offline, streaming",
                       epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    c.add_argument("src", type=Path, help="HF directory or Megatron torch_dist directory")
    c.add_argument("dst", type=Path, help="output directory (megatron, hf) or .gguf file")
    c.add_argument("--to", required=True, choices=["megatron", "hf", "gguf"])
    # layout flags: --to megatron only (default 1); given with another target they are an error, not ignored
    c.add_argument("--tp", type=int, default=None, help="tensor parallel size (megatron target; default 1)")
    c.add_argument("--pp", type=int, default=None, help="pipeline parallel size (default 1)")
    c.add_argument("--ep", type=int, default=None, help="expert parallel size (default 1)")
    c.add_argument("--etp", type=int, default=None, help="expert tensor parallel size (default: = tp)")
    c.add_argument("--vpp", type=int, default=None, help="virtual pipeline chunks per stage (default 1)")
    c.add_argument("--first", type=int, default=None, help="layers in the first pipeline stage (uneven PP)")
    c.add_argument("--last", type=int, default=None, help="layers in the last pipeline stage (uneven PP)")
    c.add_argument("--hf-config", type=Path, default=None, help="HF config for a torch_dist source without one")
    c.add_argument("--outtype", default=None, choices=["f32", "f16", "bf16", "q8_0"],
                   help="GGUF tensor type (gguf target; default f32)")
    c.add_argument("--vit", default=None, choices=["hf", "megatron"],
                   help="VL, --to megatron: transformers' ViT replicated over TP (hf, default) or the TP-sharded "
                        "Megatron-Core ViT (megatron)")  # fmt: skip
    c.add_argument("--verify-checksums", action="store_true",
                   help="check every source file against the checksums ernie45 recorded, before writing anything")
    c.add_argument("--fsync", action="store_true",
                   help="durable output (megatron, hf targets): files and directory synced before the final rename")
    c.add_argument("--dry-run", action="store_true", help="print the plan (names, ops, shards, bytes); write nothing")
    c.add_argument("--overwrite", action="store_true", help="replace a non-empty destination")
    c.add_argument("--no-progress", action="store_true", help="no progress bar")
    c.add_argument("--json", action="store_true", help="print the report as JSON")
    c.set_defaults(func=_cmd_convert)

    q = sub.add_parser("parity", help="compare a Megatron-Core model loaded through the bridge with transformers",
                       epilog="example:\n  ernie45 parity ./tiny-ernie45-moe --batch 2 --seq 16 --json",
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    q.add_argument("checkpoint", type=Path, help="HF checkpoint directory (config.json + *.safetensors)")
    q.add_argument("--batch", type=int, default=2)
    q.add_argument("--seq", type=int, default=16)
    q.add_argument("--dtype", choices=list(DTYPES), default="fp32",
                   help="what both sides compute in (routers and expert bias stay fp32); sets the defaults: fp32 "
                        "logits max |Δ| 1e-4, top-1 and routing 100 %%; bf16 cosine 0.99, top-1 and routing 80 %%")
    q.add_argument("--atol", type=float, default=None,
                   help="fail (exit 1) above this max |Δlogits| (default: 1e-4 at fp32, not judged at bf16)")
    q.add_argument("--json", action="store_true", help="print the report as JSON")
    q.set_defaults(func=_cmd_parity)

    i = sub.add_parser("inspect", help="describe a checkpoint", epilog="example:\n  ernie45 inspect ./ckpt --json",
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    i.add_argument("path", type=Path)
    i.add_argument("--json", action="store_true")
    i.set_defaults(func=_cmd_inspect)

    from .train import config as train_config
    from .train import prepare

    for name, add_arguments, run, help_, example in (
        ("verify", _verify_arguments, _lazy("ernie45.verify"),
         "compare two checkpoints (HF / torch_dist / GGUF): tensors, logits, routing per pool",
         "ernie45 verify ./hf ./mcore --atol 1e-4 --min-routing 1\n  ernie45 verify ./hf ./model.gguf --prompt 'Hello'"),
        ("route-stats", _route_stats_arguments, _lazy("ernie45.route_stats"),
         "expert load per MoE layer and pool: CSV + PNG heatmap + imbalance",
         "ernie45 route-stats ./ERNIE-4.5-21B-A3B-PT --prompts prompts.txt --out stats/"),
        ("generate", _generate_arguments, _lazy("ernie45.generate"),
         "greedy sample from any checkpoint format (KV cache)",
         "ernie45 generate ./mcore --prompt 'The capital of France is' --max-new-tokens 8"),
        ("prepare-data", prepare.add_arguments, prepare.run,
         "tokenise JSONL text into a Megatron IndexedDataset (.bin/.idx) for pre-training",
         "ernie45 prepare-data corpus.jsonl more.jsonl --tokenizer ./ERNIE-4.5-0.3B-PT --out data/corpus\n"
         "  ernie45 train --model ./ERNIE-4.5-0.3B-PT --data data/corpus --out run/   # then train on it"),
        ("train", train_config.add_arguments, _lazy("ernie45.train.trainer"),
         "train (SFT / continued pre-training, text and VL) on Megatron-Core at any layout",
         train_config.EXAMPLES.strip()),
    ):  # fmt: skip
        s = sub.add_parser(name, help=help_, epilog=f"example:\n  {example}",
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        add_arguments(s)
        s.set_defaults(func=run)
    return p


def _quiet_libraries() -> None:
    """Keep the libraries' chatter out of our reports; what they say here is known and harmless."""
    import logging
    import os

    # read by transformers / huggingface_hub when (and only if) a command imports them: convert does not
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")  # the "Loading weights" bars of the reference model
    # our VL MoE layer builds its own process groups, so megatron's "Unknown MLP type ... default kwargs" is expected
    logging.getLogger("megatron.core.transformer.transformer_layer").setLevel(logging.ERROR)
    # gguf's SpecialVocab warns that a pair template names '<s>'; llama.cpp takes BOS from the metadata, not there
    logging.getLogger("gguf.vocab").setLevel(logging.ERROR)


def main(argv: list[str] | None = None) -> int:
    from .errors import bad_input_message

    args = build_parser().parse_args(argv)
    warnings.filterwarnings("ignore", module="megatron")
    warnings.filterwarnings("ignore", category=FutureWarning)
    # DCP's note that it runs without a process group: the offline converter does so on purpose
    warnings.filterwarnings("ignore", message="torch.distributed is disabled")
    _quiet_libraries()
    try:
        return args.func(args)
    except BaseException as e:  # DCP's CheckpointException is a BaseException; interrupts and bugs are re-raised
        message = bad_input_message(e)
        if message is None:
            raise  # a bug in ernie45 (or ^C): the traceback is the report
        # one clear line naming the file/tensor, exit code 2; nothing half-written (outputs are atomic)
        print(f"ernie45 {args.command}: error: {message}", file=sys.stderr)
        return EXIT_BAD_INPUT


def program() -> None:
    """The ``ernie45`` program (console script and ``python -m ernie45``): :func:`main`, then exit.

    After ``convert`` the process leaves with ``os._exit``: the output is complete, synced as asked and renamed into
    place, and tearing the interpreter down (torch, DCP and their threads) costs ~0.8 s of nothing at every size
    (docs/convert-speed.md). Every other command exits normally; :func:`main` itself always returns.
    """
    import os

    code = main()
    if sys.argv[1:2] == ["convert"]:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)


if __name__ == "__main__":  # pragma: no cover
    program()
