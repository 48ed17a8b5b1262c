"""``ernie45 prepare-data``: JSONL text -> a Megatron-Core IndexedDataset (``PREFIX.bin`` / ``PREFIX.idx``).

Each record's ``text`` (or ``--text-key``) is tokenised with the checkpoint's own tokenizer, without the special
pieces a tokenizer adds around a single text (as Megatron's ``preprocess_data.py`` does), and the EOD id (the
tokenizer's EOS) is appended, so documents stay separable inside a training window. The files are written by
Megatron-Core's own ``IndexedDatasetBuilder`` (token dtype ``DType.optimal_dtype(vocab)``: uint16 below 65 500
pieces), so Megatron's ``IndexedDataset`` / ``GPTDataset`` -- and ``ernie45 train --data PREFIX`` -- read them.

A sidecar ``PREFIX.json`` records what made them (tokenizer, EOD id, vocabulary size, counts); ``train`` checks
the EOD id against the model's tokenizer. Everything is written under temporary names and renamed when complete;
an existing output is refused unless ``overwrite``; the inputs are only read. Blank lines are skipped; a record
whose text is empty is counted and skipped (it would be a lone EOD).
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

__all__ = ["prepare_data", "PrepareReport", "add_arguments", "run"]

_BATCH = 256  # records tokenised per call (the fast tokenizer batches in Rust)


@dataclass(frozen=True)
class PrepareReport:
    prefix: str
    documents: int
    tokens: int  # EODs included
    empty_skipped: int
    dtype: str
    eod: int
    vocab_size: int

    def summary(self) -> str:
        return (f"wrote {self.prefix}.bin/.idx: {self.documents} documents, {self.tokens} tokens ({self.dtype}, EOD "
                f"{self.eod} appended to each); {self.empty_skipped} empty record(s) skipped")  # fmt: skip


def _outputs(prefix: Path) -> list[Path]:
    return [Path(f"{prefix}{ext}") for ext in (".bin", ".idx", ".json")]


def prepare_data(
    inputs: Sequence[str | Path],
    out: str | Path,
    tokenizer: str | Path,
    *,
    text_key: str = "text",
    overwrite: bool = False,
    progress: bool = False,
) -> PrepareReport:
    """Tokenise ``inputs`` (JSONL, one document per record) into the IndexedDataset ``out`` (a path prefix; a
    trailing ``.bin`` / ``.idx`` is dropped)."""
    import numpy
    import torch
    from megatron.core.datasets.indexed_dataset import DType, IndexedDatasetBuilder

    from .data import DataError, load_tokenizer, read_jsonl  # here: the CLI imports this module to build its parser

    inputs = [Path(p) for p in inputs]
    if not inputs:
        raise DataError("prepare-data: no input file")
    for p in inputs:
        if not p.is_file():
            raise DataError(f"{p}: no such file")
    prefix = Path(out)
    if prefix.suffix in (".bin", ".idx"):
        prefix = prefix.with_suffix("")
    existing = [p for p in _outputs(prefix) if p.exists()]
    if existing and not overwrite:
        raise DataError(f"{existing[0]} exists; pass --overwrite to replace it")
    tok_dir = Path(tokenizer)
    tok = load_tokenizer(tok_dir)
    eod = tok.eos_token_id
    if eod is None:
        raise DataError(f"{tok_dir}: the tokenizer has no EOS token to end documents with")
    vocab = len(tok)
    dtype = DType.optimal_dtype(vocab)
    prefix.parent.mkdir(parents=True, exist_ok=True)
    tmp = prefix.with_name(f".{prefix.name}.tmp-{os.getpid()}")
    tmp_bin, tmp_idx = Path(f"{tmp}.bin"), Path(f"{tmp}.idx")
    builder = IndexedDatasetBuilder(str(tmp_bin), dtype=dtype)
    documents = tokens = empty = 0

    def flush(texts: list[str]) -> None:
        nonlocal documents, tokens
        for ids in tok(texts, add_special_tokens=False)["input_ids"]:
            builder.add_item(torch.tensor(ids + [eod], dtype=torch.int64))
            builder.end_document()
            documents += 1
            tokens += len(ids) + 1

    try:
        from tqdm import tqdm

        for path in tqdm(inputs, desc="prepare-data", unit="file", disable=not progress):
            batch: list[str] = []
            for n, record in read_jsonl(path):
                if text_key not in record:
                    raise DataError(f"{path}:{n}: no '{text_key}' field; keys: {sorted(record)}")
                text = record[text_key]
                if not isinstance(text, str):
                    raise DataError(f"{path}:{n}: '{text_key}' must be a string, got {type(text).__name__}")
                if not text:
                    empty += 1
                    continue
                batch.append(text)
                if len(batch) == _BATCH:
                    flush(batch)
                    batch = []
            if batch:
                flush(batch)
        if documents == 0:
            raise DataError(f"no documents in {', '.join(map(str, inputs))}")
        builder.finalize(str(tmp_idx))
        report = PrepareReport(prefix=str(prefix), documents=documents, tokens=tokens, empty_skipped=empty,
                               dtype=numpy.dtype(dtype).name, eod=eod, vocab_size=vocab)  # fmt: skip
        meta = dict(asdict(report), made_by="ernie45 prepare-data", tokenizer=str(tok_dir),
                    inputs=[str(p) for p in inputs], text_key=text_key)  # fmt: skip
        tmp_json = Path(f"{tmp}.json")
        tmp_json.write_text(json.dumps(meta, indent=2) + "\n")
        # the data files first, the sidecar last: a reader that finds the sidecar finds complete data
        os.replace(tmp_bin, f"{prefix}.bin")
        os.replace(tmp_idx, f"{prefix}.idx")
        os.replace(tmp_json, f"{prefix}.json")
        return report
    finally:
        builder.data_file.close()
        for p in (tmp_bin, tmp_idx, Path(f"{tmp}.json")):
            p.unlink(missing_ok=True)


# ----------------------------------------------------------------------------------------------------------------------
# CLI


def add_arguments(p) -> None:
    p.add_argument("inputs", nargs="+", type=Path, help="JSONL file(s), one document per record")
    p.add_argument("--tokenizer", required=True, type=Path, metavar="DIR",
                   help="the checkpoint (or tokenizer) directory whose tokenizer the model was trained with")  # fmt: skip
    p.add_argument("--out", required=True, type=Path, metavar="PREFIX",
                   help="output prefix: writes PREFIX.bin, PREFIX.idx, PREFIX.json")
    p.add_argument("--text-key", default="text", metavar="KEY",
                   help="the record field holding the text (default: text)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing PREFIX.bin/.idx/.json")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(args) -> int:
    import sys

    report = prepare_data(args.inputs, args.out, args.tokenizer, text_key=args.text_key, overwrite=args.overwrite,
                          progress=not args.no_progress and sys.stderr.isatty())  # fmt: skip
    print(report.summary())
    return 0
