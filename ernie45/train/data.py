"""Training data: chat SFT, pre-tokenized and Megatron IndexedDataset sources, packed into fixed rows, blended.

A *row* is one :class:`~ernie45.megatron.packing.PackedBatch` of exactly ``seq_length`` tokens built by
:func:`~ernie45.megatron.packing.pack`: the samples in a row are isolated from each other (block-diagonal causal
mask, positions restarting at 0, labels shifted inside each sample), and the padding tail carries no loss.
``--no-pack`` puts one sample in each row, padded.

Sources (one per ``--data [WEIGHT:]PATH``; the form is detected from the path and its first record):

* **chat SFT JSONL** -- ``{"messages": [{"role": "system"|"user"|"assistant", "content": ...}, ...]}``. Rendered
  with the checkpoint's *own* chat template (``tokenizer.apply_chat_template``) and tokenised once as a whole; the
  loss covers every assistant turn (its reply and the end-of-turn piece the template puts after it), nothing
  else. VL content may be a list of parts ``{"type": "text", "text": ...}`` / ``{"type": "image", "image":
  "local/path.png"}`` (relative to the JSONL file); each image's placeholder is widened to the image's tokens as
  the HF processor does (``grid.prod() / merge²``), and the pixel values come from the checkpoint's image
  processor (:func:`ernie45.inputs.image_inputs`). Video parts are not read yet (refused, named).
* **pre-tokenized JSONL** -- ``{"input_ids": [...], "loss_mask": [...]}`` (``loss_mask`` optional, aligned with
  ``input_ids``, 1 = this token is a prediction target; default: every token).
* **Megatron IndexedDataset** -- ``PATH`` with ``PATH.bin`` / ``PATH.idx`` (``ernie45 prepare-data``, or
  Megatron's own ``preprocess_data.py``), read through Megatron-Core's ``GPTDataset``: windows of ``seq_length + 1``
  tokens across documents. The documents inside a window are isolated like packed samples (split after each EOD),
  which is what Megatron's ``reset_position_ids`` + ``reset_attention_mask`` do; an EOD predicts nothing (the
  next document is not its continuation), every other position its next token.

Which token is a target (how the chat mask is found)
----------------------------------------------------
The whole conversation is tokenised once (the ids the model sees). For assistant turn ``k`` the template is
rendered up to the generation prompt before it (``P``) and through the end of the turn (``Q``); both are string
prefixes of the whole text. The turn's targets run from the first token where ``tokenize(P)`` and the whole
tokenisation differ (so a piece that joins the prompt's trailing space to the reply's first word, ``▁a``,
is a target) to the last token of ``Q``. This needs no character offsets, which lossy tokenizers get wrong.

Order and determinism
---------------------
``row(i)`` is a pure function of (data, seed, i). Each source is an endless sequence of epochs; epoch ``e``
orders the source's training samples by ``numpy.random.RandomState(seed + e)`` (file order with
``shuffle=False``) and packs them greedily in that order (first fit over a few open rows, so a short sample may
fill an earlier row's gap). An IndexedDataset source builds Megatron's ``GPTDataset`` with
``random_seed = seed + e`` for epoch ``e`` (it always shuffles, as in Megatron). Sources are interleaved by Megatron's own blending rule (``helpers.build_blending_indices``: each next row comes
from the source furthest below its weighted share), so with weights 0.7 / 0.3 seven rows in ten come from the
first; without weights (all 1) every source gives an equal share of rows. Resuming therefore needs only the
number of rows consumed.

Held-out rows (``eval_fraction`` / ``eval_rows``) are the *last* samples (documents) of each source, as Megatron's
train/valid split takes the last documents; they never appear in training rows.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy
import torch

from ..config import ErnieConfig
from ..errors import InputError
from ..inputs import PromptError, image_inputs
from ..megatron.packing import IGNORE_INDEX, PackedBatch, pack

__all__ = ["DataSpec", "DataError", "TrainData", "open_train_data", "collate", "read_jsonl", "load_tokenizer",
           "FORMS", "OVERLONG"]  # fmt: skip

FORMS = ("chat", "tokens", "indexed")  # chat SFT JSONL, pre-tokenized JSONL, Megatron IndexedDataset
OVERLONG = ("truncate", "drop")
ROLES = ("system", "user", "assistant")
# rows a greedy packer keeps open: enough to fill gaps left by long samples, few enough to stay O(samples)
_OPEN_ROWS = 8


class DataError(InputError):
    """Bad training data (names the file:line / field and what is wrong)."""


@dataclass(frozen=True)
class DataSpec:
    """One ``--data`` argument: ``PATH`` or ``WEIGHT:PATH`` (WEIGHT a positive number)."""

    path: Path
    weight: float = 1.0

    def __post_init__(self) -> None:
        if not (isinstance(self.weight, (int, float)) and math.isfinite(self.weight) and self.weight > 0):
            raise DataError(f"--data {self.path}: weight {self.weight!r} is not a positive number")

    @classmethod
    def parse(cls, text: str) -> "DataSpec":
        head, sep, tail = str(text).partition(":")
        if sep:
            try:
                weight = float(head)
            except ValueError:  # no number before the colon: the colon is part of the path
                weight = None
            if weight is not None:
                if not tail:
                    raise DataError(f"--data {text!r}: no path after the weight")
                if not (math.isfinite(weight) and weight > 0):
                    raise DataError(f"--data {text!r}: weight {head!r} is not a positive number")
                return cls(Path(tail), weight)
        if not text:
            raise DataError("--data: empty path")
        return cls(Path(text))


# ----------------------------------------------------------------------------------------------------------------------
# samples (one conversation / one pre-tokenized record), before packing


@dataclass(frozen=True)
class _Image:
    path: Path
    grid_thw: tuple[int, int, int]


@dataclass(frozen=True)
class _Sample:
    ids: torch.Tensor  # [n] long
    target: torch.Tensor  # [n] bool, aligned with ids: True = this token is predicted (HF-style, unshifted)
    images: tuple[_Image, ...]  # in placeholder order
    where: str  # "file:line"

    def __len__(self) -> int:
        return self.ids.numel()

    @property
    def loss_tokens(self) -> int:
        return int(self.target[1:].sum())  # the first token has no predecessor to predict it


def _lcp(a: Sequence[int], b: Sequence[int]) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


def read_jsonl(path: Path):
    """(line number, record) for every non-blank line; one DataError naming file:line for anything else."""
    try:
        f = path.open("r", encoding="utf-8")
    except OSError as e:
        raise DataError(f"{path}: cannot read ({e.strerror})") from None
    with f:
        try:
            for n, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as e:
                    raise DataError(f"{path}:{n}: not valid JSON ({e.msg}, column {e.colno})") from None
                if not isinstance(record, dict):
                    raise DataError(f"{path}:{n}: a record must be a JSON object, got {type(record).__name__}")
                yield n, record
        except UnicodeDecodeError as e:
            raise DataError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None


def _form_of(record: dict, where: str) -> str:
    keys = {"messages": "chat", "input_ids": "tokens"}
    found = [form for key, form in keys.items() if key in record]
    if len(found) == 1:
        return found[0]
    if found:
        raise DataError(f"{where}: a record has either 'messages' (chat) or 'input_ids' (pre-tokenized), not both")
    if "text" in record:
        raise DataError(
            f"{where}: raw 'text' records are pre-training data: tokenise them with `ernie45 prepare-data` and pass "
            "the output prefix as --data"
        )
    raise DataError(f"{where}: no 'messages' (chat) or 'input_ids' (pre-tokenized) field; keys: {sorted(record)}")


def _int_list(value: Any, field: str, where: str) -> list[int]:
    if not isinstance(value, list) or not all(isinstance(v, int) and not isinstance(v, bool) for v in value):
        raise DataError(f"{where}: '{field}' must be a list of integers")
    return value


def _tokens_sample(record: dict, where: str, cfg: ErnieConfig) -> _Sample:
    ids = _int_list(record["input_ids"], "input_ids", where)
    if not ids:
        raise DataError(f"{where}: 'input_ids' is empty")
    bad = [i for i in ids if not 0 <= i < cfg.vocab_size]
    if bad:
        raise DataError(f"{where}: token id {bad[0]} outside the vocabulary [0, {cfg.vocab_size})")
    reserved = set(_vision_ids(cfg))
    if reserved & set(ids):
        raise DataError(
            f"{where}: 'input_ids' holds image/video token ids {sorted(reserved & set(ids))}; pre-tokenized data is "
            "text only (images go through chat records with image parts)"
        )
    if "loss_mask" in record:
        mask = record["loss_mask"]
        if not isinstance(mask, list) or not all(m in (0, 1) and not isinstance(m, float) for m in mask):
            raise DataError(f"{where}: 'loss_mask' must be a list of 0/1")
        if len(mask) != len(ids):
            raise DataError(f"{where}: 'loss_mask' has {len(mask)} entries for {len(ids)} input_ids")
        target = torch.tensor([bool(m) for m in mask])
    else:
        target = torch.ones(len(ids), dtype=torch.bool)
    return _Sample(torch.tensor(ids, dtype=torch.long), target, (), where)


def _vision_ids(cfg: ErnieConfig) -> list[int]:
    if cfg.family != "vl":
        return []
    return sorted({v for k, v in cfg.special_ids.items() if v is not None and ("image" in k or "video" in k)})


def _has_tokenizer(path: Path) -> None:
    files = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json")
    if not path.is_dir() or not any((path / f).is_file() for f in files):
        raise DataError(f"{path}: no tokenizer there (tokenizer.json / tokenizer.model / tokenizer_config.json)")


def load_tokenizer(path: Path):
    """The checkpoint's transformers tokenizer; a directory without one is a DataError naming it."""
    import transformers

    path = Path(path)
    _has_tokenizer(path)
    try:
        return transformers.AutoTokenizer.from_pretrained(str(path))
    except (OSError, ValueError) as e:  # transformers' errors for unreadable / inconsistent tokenizer files
        raise DataError(f"{path}: cannot load its tokenizer ({e})") from None


class _ChatRenderer:
    """Chat records -> samples, through the checkpoint's tokenizer, chat template and (VL) image processor."""

    def __init__(self, tokenizer_dir: Path, cfg: ErnieConfig) -> None:
        self.cfg = cfg
        self.tokenizer_dir = Path(tokenizer_dir)
        self.tok = load_tokenizer(tokenizer_dir)
        if not self.tok.chat_template:
            raise DataError(
                f"{tokenizer_dir}: the tokenizer has no chat_template, so chat records cannot be rendered as the "
                "model expects; add the checkpoint's template or give pre-tokenized data"
            )

    def _render(self, messages: list[dict], where: str, *, generation_prompt: bool) -> str:
        import jinja2

        try:
            return self.tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)
        except (jinja2.TemplateError, TypeError, ValueError) as e:  # the template is the checkpoint's, i.e. input
            raise DataError(f"{where}: the chat template of {self.tokenizer_dir} failed: {e}") from None

    def _ids(self, text: str) -> list[int]:
        # the template writes the special pieces itself, so the tokenizer adds none (as apply_chat_template does)
        return self.tok(text, add_special_tokens=False)["input_ids"]

    def _content(self, content: Any, role: str, where: str, base: Path, images: list[_Image]) -> Any:
        """Validated content: a string, or (VL) the list of parts with image paths resolved."""
        if isinstance(content, str):
            return content
        if not isinstance(content, list):
            raise DataError(f"{where}: {role} content must be a string or a list of parts")
        parts = []
        for j, part in enumerate(content):
            if not isinstance(part, dict) or part.get("type") not in ("text", "image"):
                got = part.get("type") if isinstance(part, dict) else type(part).__name__
                raise DataError(f"{where}: {role} content part {j}: type must be 'text' or 'image', got {got!r}")
            if part["type"] == "text":
                if not isinstance(part.get("text"), str):
                    raise DataError(f"{where}: {role} content part {j}: a text part needs a string 'text'")
                parts.append({"type": "text", "text": part["text"]})
                continue
            if self.cfg.family != "vl":
                raise DataError(f"{where}: an image part needs a VL checkpoint; this one is {self.cfg.family}")
            if role == "assistant":
                raise DataError(f"{where}: assistant content part {j}: images belong in system/user turns")
            images.append(self._image(part.get("image"), f"{where}: {role} content part {j}", base))
            parts.append({"type": "image"})
        if self.cfg.family != "vl":  # the text templates concatenate strings
            return "".join(p["text"] for p in parts)
        return parts

    def _image(self, ref: Any, where: str, base: Path) -> _Image:
        if not isinstance(ref, str) or not ref:
            raise DataError(f"{where}: an image part needs 'image': a local file path")
        if "://" in ref:
            raise DataError(f"{where}: image {ref!r}: only local files are read (no URLs)")
        path = Path(ref) if Path(ref).is_absolute() else base / ref
        if not path.is_file():
            raise DataError(f"{where}: image {path}: no such file")
        try:
            _, grid_13 = image_inputs(path, self.cfg, self.tokenizer_dir)
        except PromptError as e:
            raise DataError(f"{where}: {e}") from None
        t, h, w = (int(v) for v in grid_13[0])
        return _Image(path, (t, h, w))

    def sample(self, record: dict, where: str, base: Path) -> _Sample:
        messages = record["messages"]
        if not isinstance(messages, list) or not messages:
            raise DataError(f"{where}: 'messages' must be a non-empty list")
        clean, images = [], []
        for i, m in enumerate(messages):
            if not isinstance(m, dict):
                raise DataError(f"{where}: message {i} must be an object with 'role' and 'content'")
            for key in ("role", "content"):
                if key not in m:
                    raise DataError(f"{where}: message {i} has no '{key}'")
            if m["role"] not in ROLES:
                raise DataError(f"{where}: message {i}: unknown role {m['role']!r} (expected one of {list(ROLES)})")
            content = self._content(m["content"], m["role"], f"{where}: message {i}", base, images)
            clean.append({"role": m["role"], "content": content})
        turns = [i for i, m in enumerate(clean) if m["role"] == "assistant"]
        if not turns:
            raise DataError(f"{where}: no assistant message, so nothing to learn")
        if turns[0] == 0:
            raise DataError(f"{where}: message 0 is an assistant reply to nothing; start with a system or user turn")

        full = self._render(clean, where, generation_prompt=False)
        ids = self._ids(full)
        target = [False] * len(ids)
        for k in turns:
            prompt = self._render(clean[:k], where, generation_prompt=True)
            through = self._render(clean[: k + 1], where, generation_prompt=False)
            if not full.startswith(through):
                raise DataError(f"{where}: the chat template of {self.tokenizer_dir} renders turn {k} differently "
                                "inside the whole conversation; cannot find its tokens")  # fmt: skip
            if not through.startswith(prompt):  # e.g. a template whose generation prompt opens a thinking block
                before = self._render(clean[:k], where, generation_prompt=False)
                reply = clean[k]["content"] if isinstance(clean[k]["content"], str) else "".join(
                    p["text"] for p in clean[k]["content"])  # fmt: skip
                at = through.find(reply, len(before)) if reply else -1
                if at < 0:
                    raise DataError(f"{where}: cannot locate assistant turn {k} in the rendered conversation")
                prompt = through[:at]
            start = _lcp(self._ids(prompt), ids)
            through_ids = self._ids(through)
            stop = _lcp(through_ids, ids)
            if stop < len(through_ids):  # the turn's last piece merged with what follows: it is still the reply's
                stop += 1
            for j in range(start, stop):
                target[j] = True
        return self._widen_images(ids, target, images, where)

    def _widen_images(self, ids: list[int], target: list[bool], images: list[_Image], where: str) -> _Sample:
        """Each image placeholder -> ``t·h·w / merge²`` copies (what the HF processor does to the text)."""
        if max(ids) >= self.cfg.vocab_size:
            raise DataError(f"{where}: the tokenizer of {self.tokenizer_dir} gives id {max(ids)}, outside this "
                            f"model's vocabulary [0, {self.cfg.vocab_size})")  # fmt: skip
        if self.cfg.family == "vl":
            placeholder = self.cfg.special_ids["image_token_id"]
            found = ids.count(placeholder)
            if found != len(images):
                raise DataError(f"{where}: the chat template rendered {found} image placeholder(s) for "
                                f"{len(images)} image(s)")  # fmt: skip
            merge = self.cfg.vision.spatial_merge_size
            out_ids, out_target, n = [], [], 0
            for i, t in zip(ids, target):
                if i == placeholder:
                    tt, h, w = images[n].grid_thw
                    out_ids += [placeholder] * (tt * h * w // (merge * merge))
                    out_target += [False] * (tt * h * w // (merge * merge))
                    n += 1
                else:
                    out_ids.append(i)
                    out_target.append(t)
            ids, target = out_ids, out_target
        return _Sample(torch.tensor(ids, dtype=torch.long), torch.tensor(target, dtype=torch.bool), tuple(images),
                       where)  # fmt: skip


def _truncate(s: _Sample, n: int, cfg: ErnieConfig) -> _Sample:
    """The first ``n`` tokens of ``s``; an image cut by the limit goes with everything after it."""
    images = list(s.images)
    if images:
        start_id, end_id = cfg.special_ids["image_start_token_id"], cfg.special_ids["image_end_token_id"]
        starts = (s.ids == start_id).nonzero().flatten().tolist()
        ends = (s.ids == end_id).nonzero().flatten().tolist()
        for i, (a, b) in enumerate(zip(starts, ends)):
            if b >= n:
                n, images = a, images[:i]
                break
    return _Sample(s.ids[:n], s.target[:n], tuple(images), s.where)


# ----------------------------------------------------------------------------------------------------------------------
# sources


def _greedy_rows(lengths: Sequence[int], order: Sequence[int], seq_length: int) -> list[list[int]]:
    """First-fit packing of the samples in ``order`` into rows of ``seq_length``, over the last few open rows."""
    rows: list[list[int]] = []
    free: list[int] = []
    open_rows: list[int] = []
    for idx in order:
        n = lengths[idx]
        for r in open_rows:
            if free[r] >= n:
                break
        else:
            if len(open_rows) == _OPEN_ROWS:
                open_rows.pop(0)
            rows.append([])
            free.append(seq_length)
            r = len(rows) - 1
            open_rows.append(r)
        rows[r].append(idx)
        free[r] -= n
        if free[r] == 0:
            open_rows.remove(r)
    return rows


@dataclass
class _SourceStats:
    path: str
    form: str
    weight: float
    samples: int = 0  # training samples (documents for an IndexedDataset)
    eval_samples: int = 0
    tokens: int = 0  # training tokens
    loss_tokens: Optional[int] = 0  # None where not counted (IndexedDataset)
    truncated: int = 0
    dropped: int = 0  # longer than seq_length with overlong="drop", or truncated down to no target token
    rows_per_epoch: int = 0


class _Epochs:
    """An endless stream of epochs ``build(e)`` (each a sequence of rows), addressed by global row number.

    Only each epoch's length is kept for good, and the last two epochs built: an epoch is a pure function of
    ``e``, so one that was let go is rebuilt when a reader jumps back (eval, resume), while memory stays flat
    over a long run.
    """

    def __init__(self, build) -> None:
        self._build = build
        self._starts = [0]  # first row of each epoch measured so far, then the end of the last
        self._recent: dict[int, Sequence] = {}

    def epoch(self, e: int) -> Sequence:
        if e not in self._recent:
            if len(self._recent) == 2:
                self._recent.pop(min(self._recent))
            self._recent[e] = self._build(e)
        return self._recent[e]

    def locate(self, j: int) -> tuple[Sequence, int]:
        """(the epoch holding global row ``j``, ``j``'s place in it)."""
        e = 0
        while True:
            if e + 1 == len(self._starts):
                self._starts.append(self._starts[-1] + len(self.epoch(e)))
            if j < self._starts[e + 1]:
                return self.epoch(e), j - self._starts[e]
            e += 1


class _JsonlSource:
    """Chat or pre-tokenized samples, packed per epoch."""

    def __init__(self, spec: DataSpec, samples: list[_Sample], n_eval: int, stats: _SourceStats, *,
                 cfg: ErnieConfig, seq_length: int, pack: bool, shuffle: bool, seed: int,
                 processor_dir: Optional[Path]) -> None:  # fmt: skip
        self.spec, self.cfg, self.seq_length = spec, cfg, seq_length
        self.pack, self.shuffle, self.seed = pack, shuffle, seed
        self.processor_dir = processor_dir
        self.train = samples[: len(samples) - n_eval]
        self.held_out = samples[len(samples) - n_eval :]
        if not self.train:
            raise DataError(f"{spec.path}: the held-out split takes all {len(samples)} samples; none left to train on")
        self.stats = stats
        self._lengths = [len(s) for s in self.train]
        self._epochs = _Epochs(self._epoch)
        stats.rows_per_epoch = len(self._epochs.epoch(0))

    def _epoch(self, e: int) -> list[list[int]]:
        """Epoch ``e``'s rows, as lists of sample indices."""
        n = len(self.train)
        order = numpy.random.RandomState(self.seed + e).permutation(n) if self.shuffle else numpy.arange(n)
        order = order.tolist()
        return _greedy_rows(self._lengths, order, self.seq_length) if self.pack else [[i] for i in order]

    def row(self, j: int) -> PackedBatch:
        rows, k = self._epochs.locate(j)
        return self._materialise([self.train[i] for i in rows[k]])

    def eval_rows(self, limit: int) -> list[PackedBatch]:
        order = list(range(len(self.held_out)))
        lengths = [len(s) for s in self.held_out]
        rows = _greedy_rows(lengths, order, self.seq_length) if self.pack else [[i] for i in order]
        if limit:
            rows = rows[:limit]
        return [self._materialise([self.held_out[i] for i in r]) for r in rows]

    def _materialise(self, samples: list[_Sample]) -> PackedBatch:
        packed = []
        for s in samples:
            item: dict[str, torch.Tensor] = {
                "input_ids": s.ids,
                "labels": torch.where(s.target, s.ids, torch.full_like(s.ids, IGNORE_INDEX)),
            }
            if s.images:
                item.update(_pixels(s, self.cfg, self.processor_dir))
            packed.append(item)
        # padding id 0: ERNIE's pad (<unk>); the tail is masked and carries no loss, so the id only has to exist
        return pack(packed, self.cfg, pad_to_multiple_of=self.seq_length)


def _pixels(s: _Sample, cfg: ErnieConfig, processor_dir: Optional[Path]) -> dict[str, torch.Tensor]:
    """Pixel values of a sample's images, computed when its row is built (they are large; the grid was kept)."""
    pixels, grids = [], []
    for img in s.images:
        try:
            pv, grid_13 = image_inputs(img.path, cfg, processor_dir)
        except PromptError as e:
            raise DataError(f"{s.where}: {e}") from None
        if tuple(int(v) for v in grid_13[0]) != img.grid_thw:
            raise DataError(f"{s.where}: image {img.path} changed since the data was opened")
        pixels.append(pv)
        grids.append(grid_13)
    return {"pixel_values": torch.cat(pixels), "image_grid_thw": torch.cat(grids)}


def _quiet_megatron_datasets():
    """Megatron's dataset modules log every index build at INFO and warn that no cache dir is set; we build
    the (cheap, deterministic) indices in memory on every rank on purpose (see _IndexedSource)."""
    for name in ("megatron.core.datasets.gpt_dataset", "megatron.core.datasets.indexed_dataset",
                 "megatron.core.datasets.megatron_dataset"):  # fmt: skip
        logging.getLogger(name).setLevel(logging.ERROR)


class _IndexedSource:
    """A Megatron IndexedDataset read through Megatron-Core's GPTDataset, one GPTDataset per epoch.

    The indices are built in memory on each rank (``path_to_cache=""``): Megatron's on-disk cache needs its
    rank-0-first barrier protocol, and a data-parallel rank reaches an epoch boundary at its own time, so a
    collective inside ``row()`` could deadlock. Building them is cheap and deterministic.
    """

    def __init__(self, spec: DataSpec, prefix: Path, cfg: ErnieConfig, *, tokenizer_dir: Optional[Path],
                 seq_length: int, seed: int, eval_fraction: float, eval_rows: int) -> None:  # fmt: skip
        from megatron.core.datasets.gpt_dataset import GPTDatasetConfig
        from megatron.core.datasets.indexed_dataset import IndexedDataset
        from megatron.core.tokenizers import MegatronTokenizer

        _quiet_megatron_datasets()
        self.spec, self.prefix, self.cfg, self.seq_length, self.seed = spec, prefix, cfg, seq_length, seed
        if tokenizer_dir is None:
            raise DataError(f"{prefix}: an IndexedDataset source needs the checkpoint's tokenizer (its EOD id)")
        try:
            self.indexed = IndexedDataset(str(prefix), multimodal=False, mmap=True)
        except (AssertionError, ValueError, OSError) as e:  # Megatron asserts on a bad header / size
            raise DataError(f"{prefix}.idx/.bin: not a Megatron IndexedDataset ({e})") from None
        _has_tokenizer(Path(tokenizer_dir))  # a clear error before Megatron's own asserts
        tokenizer = MegatronTokenizer.from_pretrained(str(tokenizer_dir), metadata_path={"library": "huggingface"})
        self.eod = tokenizer.eod
        meta = Path(str(prefix) + ".json")
        if meta.is_file():  # written by `ernie45 prepare-data`
            info = json.loads(meta.read_text())
            if info.get("eod") != self.eod:
                raise DataError(f"{meta}: prepared with EOD id {info.get('eod')}, but {tokenizer_dir}'s is {self.eod}")
        self.base_config = dict(
            sequence_length=seq_length, tokenizer=tokenizer, blend=([str(prefix)], None), split="1,0,0",
            path_to_cache="",
            reset_position_ids=False, reset_attention_mask=False, eod_mask_loss=False, create_attention_mask=False,
        )  # fmt: skip
        self._config_cls = GPTDatasetConfig
        lengths = self.indexed.sequence_lengths
        n = len(lengths)
        if n == 0:
            raise DataError(f"{prefix}: no documents")
        if eval_fraction > 0:
            n_eval = max(1, round(eval_fraction * n))
        elif eval_rows > 0:  # the last documents holding at least eval_rows windows
            need = eval_rows * seq_length + 1
            cum = numpy.cumsum(lengths[::-1], dtype=numpy.int64)
            n_eval = int(numpy.searchsorted(cum, need)) + 1
        else:
            n_eval = 0
        if n_eval >= n:
            raise DataError(f"{prefix}: the held-out split takes all {n} documents; none left to train on")
        self.train_docs = numpy.arange(0, n - n_eval, dtype=numpy.int32)
        self.eval_docs = numpy.arange(n - n_eval, n, dtype=numpy.int32)
        self._epochs = _Epochs(self._epoch)
        first = self._epochs.epoch(0)
        self.stats = _SourceStats(
            path=str(prefix), form="indexed", weight=spec.weight, samples=len(self.train_docs),
            eval_samples=n_eval, tokens=int(lengths[: n - n_eval].sum()), loss_tokens=None,
            rows_per_epoch=len(first),
        )  # fmt: skip

    def _dataset(self, docs: numpy.ndarray, seed: int, split):
        from megatron.core.datasets.gpt_dataset import GPTDataset

        config = self._config_cls(random_seed=seed, **self.base_config)
        return GPTDataset(self.indexed, str(self.prefix), docs, None, split, config)

    def _epoch(self, e: int):
        """Epoch ``e``: Megatron's GPTDataset over the training documents, seeded ``seed + e``."""
        from megatron.core.datasets.utils import Split

        ds = self._dataset(self.train_docs, self.seed + e, Split.train)
        if len(ds) == 0:
            tokens = int(self.indexed.sequence_lengths[self.train_docs].sum())
            raise DataError(f"{self.prefix}: {tokens} training tokens, fewer than one row of "
                            f"seq_length + 1 = {self.seq_length + 1}")  # fmt: skip
        return ds

    def row(self, j: int) -> PackedBatch:
        ds, k = self._epochs.locate(j)
        return self._window(ds[k])

    def eval_rows(self, limit: int) -> list[PackedBatch]:
        from megatron.core.datasets.utils import Split

        if len(self.eval_docs) == 0:
            return []
        ds = self._dataset(self.eval_docs, self.seed, Split.valid)
        n = len(ds) if not limit else min(limit, len(ds))
        return [self._window(ds[k]) for k in range(n)]

    def _window(self, item: dict) -> PackedBatch:
        """A GPTDataset window -> a row with its documents isolated (split after each EOD)."""
        tokens_S, labels_S = item["tokens"], item["labels"]
        S = tokens_S.numel()
        if int(tokens_S.max()) >= self.cfg.vocab_size or int(labels_S.max()) >= self.cfg.vocab_size:
            raise DataError(f"{self.prefix}: token id {max(int(tokens_S.max()), int(labels_S.max()))} outside the "
                            f"vocabulary [0, {self.cfg.vocab_size}) of this model")  # fmt: skip
        cuts = ((tokens_S == self.eod).nonzero().flatten() + 1).tolist()
        bounds = [0] + [c for c in cuts if c < S] + [S]
        pieces = [tokens_S[a:b] for a, b in zip(bounds[:-1], bounds[1:])]
        row = pack(pieces, self.cfg, pad_to_multiple_of=S)
        # The window's last token predicts the extra token GPTDataset reads for it (add_extra_token_to_sequence),
        # unless it ends a document. GPTDataset's own loss_mask drops targets equal to the pad id.
        labels = row.labels.clone()
        loss_mask = row.loss_mask.clone()
        if int(tokens_S[-1]) != self.eod:
            labels[0, -1] = labels_S[-1]
            loss_mask[0, -1] = 1.0
        loss_mask = loss_mask * item["loss_mask"].view(1, S)
        return dataclasses.replace(row, labels=labels, loss_mask=loss_mask)


# ----------------------------------------------------------------------------------------------------------------------
# the whole data set


def _indexed_prefix(path: Path) -> Optional[Path]:
    """``PATH`` / ``PATH.bin`` / ``PATH.idx`` -> the prefix when both files exist, else None."""
    prefix = path.with_suffix("") if path.suffix in (".bin", ".idx") else path
    bin_, idx = Path(str(prefix) + ".bin"), Path(str(prefix) + ".idx")
    if bin_.is_file() and idx.is_file():
        return prefix
    if bin_.is_file() or idx.is_file():
        raise DataError(f"{prefix}: an IndexedDataset needs both {bin_.name} and {idx.name}")
    return None


def _eval_shares(eval_rows: int, weights: list[float]) -> list[int]:
    """``eval_rows`` split over the sources by weight (largest remainder, summing to eval_rows)."""
    total = sum(weights)
    exact = [eval_rows * w / total for w in weights]
    shares = [math.floor(x) for x in exact]
    for i in sorted(range(len(weights)), key=lambda i: shares[i] - exact[i])[: eval_rows - sum(shares)]:
        shares[i] += 1
    return shares


class TrainData:
    """Rows of ``seq_length`` tokens from one or more blended sources; see the module docstring."""

    def __init__(self, sources: list, *, seq_length: int, pack: bool, shuffle: bool, seed: int, overlong: str,
                 eval_shares: list[int]) -> None:  # fmt: skip
        self.sources = sources
        self.seq_length, self.pack, self.shuffle, self.seed, self.overlong = seq_length, pack, shuffle, seed, overlong
        self._eval_shares = eval_shares
        self._eval: Optional[list[PackedBatch]] = None
        weights = numpy.array([s.spec.weight for s in sources], dtype=numpy.float64)
        self._weights = weights / weights.sum()
        self._blend_source = numpy.zeros(0, dtype=numpy.int16)
        self._blend_row = numpy.zeros(0, dtype=numpy.int64)
        per = [s.stats for s in sources]
        counted = [p.loss_tokens for p in per if p.loss_tokens is not None]
        self.stats = {
            "samples": sum(p.samples for p in per),
            "tokens": sum(p.tokens for p in per),
            "loss_tokens": sum(counted) if len(counted) == len(per) else None,
            "truncated": sum(p.truncated for p in per),
            "dropped": sum(p.dropped for p in per),
            "eval_samples": sum(p.eval_samples for p in per),
            "sources": [dataclasses.asdict(p) for p in per],
        }

    def _blend(self, index: int) -> tuple[int, int]:
        """(source, row within it) of row ``index``: Megatron's blending rule, grown by doubling (its prefix does
        not depend on the total size, so a longer build only appends)."""
        if len(self.sources) == 1:
            return 0, index
        if index >= len(self._blend_source):
            from megatron.core.datasets import helpers

            size = max(1024, 2 * (index + 1))
            src, row = numpy.zeros(size, dtype=numpy.int16), numpy.zeros(size, dtype=numpy.int64)
            helpers.build_blending_indices(src, row, self._weights, len(self.sources), size, False)
            self._blend_source, self._blend_row = src, row
        return int(self._blend_source[index]), int(self._blend_row[index])

    def row(self, index: int) -> PackedBatch:
        if index < 0:
            raise IndexError(f"row index {index} < 0")
        source, j = self._blend(index)
        return self.sources[source].row(j)

    def source_of(self, index: int) -> int:
        """Which source (in --data order) row ``index`` comes from."""
        return self._blend(index)[0]

    def eval_batches(self) -> list[PackedBatch]:
        if self._eval is None:
            self._eval = [b for s, share in zip(self.sources, self._eval_shares) for b in s.eval_rows(share)]
        return list(self._eval)

    def describe(self) -> str:
        parts = []
        for s in self.stats["sources"]:
            what = {"chat": "chat SFT", "tokens": "pre-tokenized",
                    "indexed": "Megatron IndexedDataset through GPTDataset, its own shuffle"}[s["form"]]  # fmt: skip
            unit = "documents" if s["form"] == "indexed" else "samples"
            loss = f", {s['loss_tokens']} target tokens" if s["loss_tokens"] is not None else ""
            extra = f", {s['truncated']} truncated" if s["truncated"] else ""
            extra += f", {s['dropped']} dropped (longer than {self.seq_length})" if s["dropped"] else ""
            held = f", {s['eval_samples']} held out" if s["eval_samples"] else ""
            weight = f"weight {s['weight']:g}: " if len(self.sources) > 1 else ""
            rows = f"{s['rows_per_epoch']} {'windows' if s['form'] == 'indexed' else 'rows'} an epoch"
            parts.append(f"{weight}{s['path']} ({what}, {s['samples']} {unit}, {s['tokens']} tokens{loss}{extra}"
                         f"{held}, {rows})")  # fmt: skip
        how = "packed" if self.pack else "one sample a row"
        order = f"shuffled by seed {self.seed}, reshuffled every epoch" if self.shuffle else "in file order"
        blend = " blended by weight (Megatron's blending rule);" if len(self.sources) > 1 else ""
        n_eval = len(self.eval_batches())
        return (f"{len(self.sources)} source(s):{blend} " + "; ".join(parts) + f". Rows of {self.seq_length} tokens, "
                f"{how}, {order}; overlong samples {'truncated' if self.overlong == 'truncate' else 'dropped'}; "
                f"{n_eval} held-out eval row(s).")  # fmt: skip


def open_train_data(
    specs: Sequence[DataSpec],
    cfg: ErnieConfig,
    *,
    tokenizer_dir: Path | None,
    seq_length: int,
    pack: bool = True,
    shuffle: bool = True,
    seed: int = 1234,
    overlong: str = "truncate",
    eval_fraction: float = 0.0,
    eval_rows: int = 0,
) -> TrainData:
    """Open every ``--data`` source (validating all of it now, so bad data fails before a model is built).

    ``eval_fraction``: that share of each source's samples (documents) is held out; ``eval_rows``: the number of
    held-out rows, split over the sources by weight (alone, it holds out just enough samples for them; with
    ``eval_fraction``, it caps the held-out rows).
    """
    if not specs:
        raise DataError("no --data source given")
    if not (isinstance(seq_length, int) and seq_length > 0):
        raise DataError(f"seq_length must be a positive integer, got {seq_length!r}")
    if overlong not in OVERLONG:
        raise DataError(f"overlong must be one of {OVERLONG}, got {overlong!r}")
    if not 0.0 <= eval_fraction < 1.0:
        raise DataError(f"eval_fraction must be in [0, 1), got {eval_fraction}")
    if eval_rows < 0:
        raise DataError(f"eval_rows must be >= 0, got {eval_rows}")
    specs = [s if isinstance(s, DataSpec) else DataSpec.parse(str(s)) for s in specs]
    shares = _eval_shares(eval_rows, [s.weight for s in specs]) if eval_rows else [0] * len(specs)
    renderer: Optional[_ChatRenderer] = None
    sources = []
    for spec, share in zip(specs, shares):
        prefix = _indexed_prefix(spec.path)
        if prefix is not None:
            sources.append(_IndexedSource(spec, prefix, cfg, tokenizer_dir=tokenizer_dir, seq_length=seq_length,
                                          seed=seed, eval_fraction=eval_fraction, eval_rows=share))  # fmt: skip
            continue
        if not spec.path.is_file():
            hint = " (a weight must be a positive number before the ':')" if ":" in str(spec.path) else ""
            raise DataError(f"--data {spec.path}: no such file, and no {spec.path}.bin/.idx{hint}")
        form, samples = None, []
        stats = _SourceStats(path=str(spec.path), form="", weight=spec.weight)
        for n, record in read_jsonl(spec.path):
            where = f"{spec.path}:{n}"
            this = _form_of(record, where)
            if form is None:
                form = stats.form = this
            elif this != form:
                raise DataError(f"{where}: a {this} record in a {form} file (one form per file)")
            if form == "chat":
                if renderer is None:
                    if tokenizer_dir is None:
                        raise DataError(f"{where}: chat records need the checkpoint's tokenizer and chat template")
                    renderer = _ChatRenderer(tokenizer_dir, cfg)
                sample = renderer.sample(record, where, spec.path.parent)
            else:
                sample = _tokens_sample(record, where, cfg)
            if len(sample) > seq_length:
                if overlong == "drop":
                    stats.dropped += 1
                    continue
                sample = _truncate(sample, seq_length, cfg)
                stats.truncated += 1
                if sample.loss_tokens == 0:  # the cut left nothing to learn from
                    stats.dropped += 1
                    continue
            samples.append(sample)
        if form is None:
            raise DataError(f"{spec.path}: no records (empty file)")
        if not samples:
            raise DataError(f"{spec.path}: every sample is longer than seq_length {seq_length} and was dropped")
        if eval_fraction > 0:
            n_eval = max(1, round(eval_fraction * len(samples)))
        elif share > 0:  # the last samples holding at least `share` rows
            if pack:
                tokens, n_eval = 0, 0
                while n_eval < len(samples) and tokens < share * seq_length:
                    n_eval += 1
                    tokens += len(samples[-n_eval])
            else:
                n_eval = share
        else:
            n_eval = 0
        train = samples[: len(samples) - n_eval]
        stats.samples, stats.eval_samples = len(train), n_eval
        stats.tokens = sum(len(s) for s in train)
        stats.loss_tokens = sum(s.loss_tokens for s in train)
        sources.append(_JsonlSource(spec, samples, n_eval, stats, cfg=cfg, seq_length=seq_length, pack=pack,
                                    shuffle=shuffle, seed=seed, processor_dir=tokenizer_dir))  # fmt: skip
    return TrainData(sources, seq_length=seq_length, pack=pack, shuffle=shuffle, seed=seed, overlong=overlong,
                     eval_shares=shares)  # fmt: skip


# ----------------------------------------------------------------------------------------------------------------------
# micro-batches


def collate(rows: Sequence[PackedBatch]) -> PackedBatch:
    """Stack ``B`` rows into one ``[B, S]`` micro-batch.

    ``attention_mask`` ``[B, 1, S, S]``, ``position_ids`` ``[B, S]`` (text) or ``[3, B, S]`` (VL), pixel values and
    grids concatenated in row order (the order in which the model fills the placeholders). ``cu_seqlens`` holds
    the sample boundaries over the flattened ``B·S`` tokens, each row's padding tail included as its own
    sequence (the THD view of the batch).
    """
    if not rows:
        raise ValueError("collate() needs at least one row")
    S = rows[0].seq_len
    if any(r.seq_len != S or r.input_ids.shape[0] != 1 for r in rows):
        raise ValueError(f"collate() needs [1, {S}] rows, got {[tuple(r.input_ids.shape) for r in rows]}")
    vl = rows[0].mm_token_type_ids is not None

    def cat(name: str, dim: int = 0) -> Optional[torch.Tensor]:
        parts = [getattr(r, name) for r in rows if getattr(r, name) is not None]
        return torch.cat(parts, dim=dim) if parts else None

    cu = [0]
    for b, r in enumerate(rows):
        cu += [b * S + int(c) for c in r.cu_seqlens[1:]]
        if cu[-1] != (b + 1) * S:
            cu.append((b + 1) * S)
    return PackedBatch(
        input_ids=cat("input_ids"),
        position_ids=cat("position_ids", dim=1 if vl else 0),
        attention_mask=cat("attention_mask"),
        labels=cat("labels"),
        loss_mask=cat("loss_mask"),
        segment_ids=cat("segment_ids"),
        cu_seqlens=torch.tensor(cu, dtype=torch.int32),
        mm_token_type_ids=cat("mm_token_type_ids"),
        moe_mm_token_type_ids=cat("moe_mm_token_type_ids"),
        pixel_values=cat("pixel_values"),
        image_grid_thw=cat("image_grid_thw"),
        pixel_values_videos=cat("pixel_values_videos"),
        video_grid_thw=cat("video_grid_thw"),
    )
