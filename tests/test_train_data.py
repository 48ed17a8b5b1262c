"""Training data (ernie45.train.data / prepare): chat masks, pre-tokenized rows, packing, order, Megatron datasets.

The oracles are independent of the code under test: the chat spans are written out by hand from the template
text; token ids of prepared documents come from the transformers tokenizer; windows come from Megatron-Core's own
``BlendedMegatronDatasetBuilder`` + ``GPTDataset``.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from ernie45.assets import EMBEDDED, chat_template, embedded_checkpoint, sft_set
from ernie45.config import load_config
from ernie45.train.data import DataError, DataSpec, collate, open_train_data
from ernie45.train.prepare import prepare_data

MOE = embedded_checkpoint("tiny-ernie45-moe")
VL = embedded_checkpoint("tiny-ernie45-vl")


@pytest.fixture(scope="module")
def cfg():
    return load_config(MOE)


@pytest.fixture(scope="module")
def vl_cfg():
    return load_config(VL)


@pytest.fixture(scope="module")
def tok():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(MOE))


def _jsonl(path: Path, records) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return path


def _targets(row, tok, sample: int = 0) -> list[tuple[int, str]]:
    """(position in the sample, piece) of every token the row trains on (labels are shifted by one)."""
    a, b = row.boundaries[sample]
    return [(s - a + 1, tok.convert_ids_to_tokens(int(row.labels[0, s]))) for s in range(a, b) if row.loss_mask[0, s]]


# ----------------------------------------------------------------------------------------------------------------------
# chat SFT


CHAT = [
    {"role": "system", "content": "be brief."},
    {"role": "user", "content": "the dog"},
    {"role": "assistant", "content": "a fox"},
    {"role": "user", "content": "and then"},
    {"role": "assistant", "content": "it jumps"},
]


def test_shipped_chat_templates_render_ernie_format(tok):
    """The embedded checkpoints carry the ERNIE text format, written out here by hand."""
    for name, (family, _, _) in EMBEDDED.items():
        tok_cfg = json.loads((embedded_checkpoint(name) / "tokenizer_config.json").read_text())
        assert tok_cfg["chat_template"] == chat_template(family), name  # what tools/make_tiny_checkpoints writes
    assert tok.apply_chat_template(CHAT, tokenize=False) == (
        "<|begin_of_sentence|>be brief.\nUser: the dog\nAssistant: a fox<|end_of_sentence|>"
        "User: and then\nAssistant: it jumps<|end_of_sentence|>"
    )
    assert tok.apply_chat_template(CHAT[:2], tokenize=False, add_generation_prompt=True).endswith(
        "User: the dog\nAssistant: "
    )


def test_chat_loss_mask_is_exactly_the_assistant_tokens(tmp_path, cfg, tok):
    path = _jsonl(tmp_path / "chat.jsonl", [{"messages": CHAT}])
    data = open_train_data([DataSpec(path)], cfg, tokenizer_dir=MOE, seq_length=64, shuffle=False)
    row = data.row(0)
    assert row.num_samples == 1
    # The tiny tokenizer has no pieces for capitals and "\n" (they vanish), so "User:" is [s, er, :] and
    # "Assistant:" is [s, s, is, t, an, t, :]. The rendered text (above), piece by piece:
    #   0 <|begin_of_sentence|>   1-8 "be brief."   9-11 "User:"   12-15 " the dog"   16-22 "Assistant:"
    #   23-27 " a fox<|end_of_sentence|>"   28-30 "User:"   31-33 " and then"   34-40 "Assistant:"
    #   41-46 " it jumps<|end_of_sentence|>"
    ids = row.input_ids[0, : row.boundaries[0][1]].tolist()
    pieces = tok.convert_ids_to_tokens(ids)
    assert len(pieces) == 47
    assert pieces[9:12] == pieces[28:31] == ["s", "er", ":"]
    assert pieces[16:23] == pieces[34:41] == ["s", "s", "is", "t", "an", "t", ":"]
    # the targets: both replies with their end-of-turn piece, nothing of the system / user / role text
    want = [(23, "▁a"), (24, "▁f"), (25, "o"), (26, "x"), (27, "<|end_of_sentence|>"),
            (41, "▁it"), (42, "▁"), (43, "j"), (44, "um"), (45, "ps"), (46, "<|end_of_sentence|>")]  # fmt: skip
    assert _targets(row, tok) == want
    assert data.stats["loss_tokens"] == len(want)


def test_chat_mask_with_a_generation_prompt_the_replies_do_not_carry(tmp_path, cfg, tok):
    """Thinking-style templates end the generation prompt with an empty think block that a rendered past reply
    does not have; the reply is then found by its text."""
    tok_dir = tmp_path / "tok"
    tok_dir.mkdir()
    for f in ("tokenizer.json", "special_tokens_map.json"):
        (tok_dir / f).write_bytes((MOE / f).read_bytes())
    tok_cfg = json.loads((MOE / "tokenizer_config.json").read_text())
    tok_cfg["chat_template"] = tok_cfg["chat_template"].replace(
        '{{- "Assistant: " -}}\n{%- endif -%}', '{{- "Assistant: <think> </think>" -}}\n{%- endif -%}')
    assert "<think>" in tok_cfg["chat_template"]
    (tok_dir / "tokenizer_config.json").write_text(json.dumps(tok_cfg))
    path = _jsonl(tmp_path / "chat.jsonl", [{"messages": CHAT}])
    row = open_train_data([DataSpec(path)], cfg, tokenizer_dir=tok_dir, seq_length=64, shuffle=False).row(0)
    # the same conversation text as with the shipped template, so the same hand-written targets
    want = [(23, "▁a"), (24, "▁f"), (25, "o"), (26, "x"), (27, "<|end_of_sentence|>"),
            (41, "▁it"), (42, "▁"), (43, "j"), (44, "um"), (45, "ps"), (46, "<|end_of_sentence|>")]  # fmt: skip
    assert _targets(row, tok) == want


def test_vl_chat_sample_gives_image_tokens_and_pixels(tmp_path, vl_cfg):
    from PIL import Image
    from transformers import AutoTokenizer

    Image.new("RGB", (56, 84), (200, 30, 30)).save(tmp_path / "pic.png")  # 84 high, 56 wide: 6x4 patches, 6 tokens
    record = {"messages": [
        {"role": "user", "content": [{"type": "image", "image": "pic.png"}, {"type": "text", "text": "what is it"}]},
        {"role": "assistant", "content": "a dog"},
    ]}  # fmt: skip
    path = _jsonl(tmp_path / "vl.jsonl", [record])
    row = open_train_data([DataSpec(path)], vl_cfg, tokenizer_dir=VL, seq_length=64, shuffle=False).row(0)
    ids = vl_cfg.special_ids
    n = row.boundaries[0][1]
    seq = row.input_ids[0, :n].tolist()
    start = seq.index(ids["image_start_token_id"])
    assert seq[start : start + 8] == [ids["image_start_token_id"]] + [ids["image_token_id"]] * 6 + [ids["image_end_token_id"]]
    assert row.image_grid_thw.tolist() == [[1, 6, 4]] and row.pixel_values.shape == (24, 3 * 14 * 14)
    assert row.moe_mm_token_type_ids[0, start : start + 8].tolist() == [1] * 8  # the vision pool, start/end included
    assert row.position_ids.shape == (3, 1, 64)
    tok = AutoTokenizer.from_pretrained(str(VL))
    # "\nAssistant: a dog<|end_of_sentence|>": the reply's pieces, and nothing else, are targets
    assert [p for _, p in _targets(row, tok)] == ["▁a", "▁d", "o", "g", "<|end_of_sentence|>"]


def test_vl_truncation_never_cuts_an_image(tmp_path, vl_cfg):
    from PIL import Image

    Image.new("RGB", (56, 56), (0, 90, 200)).save(tmp_path / "pic.png")  # 4 image tokens
    record = {"messages": [
        {"role": "user", "content": "the dog"}, {"role": "assistant", "content": "a fox"},
        {"role": "user", "content": [{"type": "text", "text": "and"}, {"type": "image", "image": "pic.png"}]},
        {"role": "assistant", "content": "a dog"},
    ]}  # fmt: skip
    path = _jsonl(tmp_path / "vl.jsonl", [record])
    whole = open_train_data([DataSpec(path)], vl_cfg, tokenizer_dir=VL, seq_length=64).row(0)
    start = whole.input_ids[0].tolist().index(vl_cfg.special_ids["image_start_token_id"])
    cut = open_train_data([DataSpec(path)], vl_cfg, tokenizer_dir=VL, seq_length=start + 3)  # inside the image
    row = cut.row(0)
    assert cut.stats["truncated"] == 1 and row.pixel_values is None and row.image_grid_thw is None
    assert row.input_ids[0, :start].tolist() == whole.input_ids[0, :start].tolist()
    assert (row.input_ids[0, start:] == 0).all()  # cut before the image's start, the rest is padding
    assert row.loss_mask.sum() == whole.loss_mask[0, :start].sum() > 0  # the first reply is still trained on


def test_shipped_sft_sets_open(cfg, vl_cfg):
    text = open_train_data([DataSpec(sft_set())], cfg, tokenizer_dir=MOE, seq_length=128, eval_rows=2)
    assert text.stats["samples"] + text.stats["eval_samples"] >= 36 and text.stats["loss_tokens"] > 0
    assert len(text.eval_batches()) == 2 and "chat SFT" in text.describe()
    vl = open_train_data([DataSpec(sft_set("vl"))], vl_cfg, tokenizer_dir=VL, seq_length=128)
    rows = [vl.row(i) for i in range(3)]
    assert all(r.pixel_values is not None for r in rows)
    batch = collate(rows)
    assert batch.input_ids.shape == (3, 128) and batch.position_ids.shape == (3, 3, 128)
    assert batch.pixel_values.shape[0] == int(batch.image_grid_thw.prod(dim=1).sum())
    assert batch.attention_mask.shape == (3, 1, 128, 128)


# ----------------------------------------------------------------------------------------------------------------------
# pre-tokenized rows, packing, order


def _tokens_file(path: Path, n: int, *, base: int = 10, length=lambda i: 3 + i % 5) -> tuple[Path, list[list[int]]]:
    """``n`` samples whose first token is ``base + i`` (their identity)."""
    samples = [[base + i] + [(base + i + k) % 150 + 3 for k in range(1, length(i))] for i in range(n)]
    return _jsonl(path, [{"input_ids": s} for s in samples]), samples


def test_pretokenized_round_trip(tmp_path, cfg):
    ids_a, ids_b = [5, 6, 7, 8, 9], [20, 21, 22]
    mask_a = [0, 0, 1, 1, 0]
    path = _jsonl(tmp_path / "t.jsonl", [{"input_ids": ids_a, "loss_mask": mask_a}, {"input_ids": ids_b}])
    data = open_train_data([DataSpec(path)], cfg, tokenizer_dir=None, seq_length=8, pack=False, shuffle=False)
    row = data.row(0)
    assert row.input_ids[0].tolist() == ids_a + [0, 0, 0]
    # Megatron's convention: position s is trained to predict token s+1 where that token's mask is 1
    assert row.loss_mask[0].tolist() == [0, 1, 1, 0, 0, 0, 0, 0]
    assert row.labels[0, 1:3].tolist() == [7, 8]
    row = data.row(1)
    assert row.input_ids[0, :3].tolist() == ids_b and row.loss_mask[0].tolist() == [1, 1, 0, 0, 0, 0, 0, 0]
    assert data.row(2).input_ids[0, :5].tolist() == ids_a  # epoch 2, in file order again
    assert data.stats["loss_tokens"] == 2 + 2


def test_packing_isolates_samples(tmp_path, cfg):
    path = _jsonl(tmp_path / "t.jsonl", [{"input_ids": [5, 6, 7]}, {"input_ids": [8, 9]}, {"input_ids": [10, 11, 12]}])
    row = open_train_data([DataSpec(path)], cfg, tokenizer_dir=None, seq_length=10, shuffle=False).row(0)
    assert row.input_ids[0].tolist() == [5, 6, 7, 8, 9, 10, 11, 12, 0, 0]
    assert row.segment_ids[0].tolist() == [0, 0, 0, 1, 1, 2, 2, 2, -1, -1]
    assert row.position_ids[0].tolist() == [0, 1, 2, 0, 1, 0, 1, 2, 0, 0]
    assert row.loss_mask[0].tolist() == [1, 1, 0, 1, 0, 1, 1, 0, 0, 0]  # a sample's last token predicts nothing
    mask = row.attention_mask[0, 0]  # True = masked
    assert not mask[4, 3] and mask[3, 2] and mask[5, 4] and mask[4, 5]  # no attention across samples, causal
    assert row.seq_len == 10


def test_order_is_deterministic_by_seed_and_reshuffled_each_epoch(tmp_path, cfg):
    path, samples = _tokens_file(tmp_path / "t.jsonl", 30)

    def first_tokens(data, rows):
        return [[int(r.input_ids[0, a]) for a, _ in r.boundaries] for r in (data.row(i) for i in rows)]

    def opened(seed, **kw):
        return open_train_data([DataSpec(path)], cfg, tokenizer_dir=None, seq_length=16, seed=seed, **kw)

    a, b, c = opened(1), opened(1), opened(2)
    per_epoch = a.stats["sources"][0]["rows_per_epoch"]
    assert first_tokens(a, range(3 * per_epoch)) == first_tokens(b, range(3 * per_epoch))
    assert first_tokens(a, range(per_epoch)) != first_tokens(c, range(per_epoch))
    # row(i) is a pure function: a fresh reader asked for a late row first gives the same row
    late = opened(1).row(2 * per_epoch + 1)
    assert torch.equal(late.input_ids, a.row(2 * per_epoch + 1).input_ids)
    first = a.row(0)
    a.row(5 * per_epoch)  # epochs 0.. are let go (only the last two stay built) and rebuilt on demand
    assert torch.equal(a.row(0).input_ids, first.input_ids) and torch.equal(a.row(0).loss_mask, first.loss_mask)
    # every sample exactly once per epoch, in a different order each epoch (an epoch may pack into a different
    # number of rows, but a row never spans two epochs)
    flat = sum(first_tokens(a, range(4 * per_epoch)), [])
    epochs = [flat[e * len(samples) : (e + 1) * len(samples)] for e in range(3)]
    assert all(sorted(ep) == [s[0] for s in samples] for ep in epochs)
    assert epochs[0] != epochs[1] != epochs[2]
    # no shuffle: file order for every seed and epoch (first-fit may put a short sample into an earlier row's gap)
    plain = [opened(seed, shuffle=False) for seed in (1, 2)]
    n = plain[0].stats["sources"][0]["rows_per_epoch"]
    assert first_tokens(plain[0], range(3 * n)) == first_tokens(plain[1], range(3 * n)) == first_tokens(plain[0], range(n)) * 3
    assert first_tokens(plain[0], range(1))[0][0] == samples[0][0]


def test_overlong_truncated_or_dropped_and_counted(tmp_path, cfg):
    path = _jsonl(tmp_path / "t.jsonl", [{"input_ids": list(range(3, 23))}, {"input_ids": [5, 6, 7]}])
    cut = open_train_data([DataSpec(path)], cfg, tokenizer_dir=None, seq_length=8, shuffle=False, pack=False)
    assert cut.stats["truncated"] == 1 and cut.row(0).input_ids[0].tolist() == list(range(3, 11))
    drop = open_train_data([DataSpec(path)], cfg, tokenizer_dir=None, seq_length=8, overlong="drop")
    assert drop.stats["dropped"] == 1 and drop.stats["samples"] == 1 and "1 dropped" in drop.describe()


def test_eval_split_is_held_out(tmp_path, cfg):
    path, samples = _tokens_file(tmp_path / "t.jsonl", 20)
    data = open_train_data([DataSpec(path)], cfg, tokenizer_dir=None, seq_length=16, eval_fraction=0.2)
    held = {int(r.input_ids[0, a]) for r in data.eval_batches() for a, _ in r.boundaries}
    assert held == {s[0] for s in samples[-4:]}  # the last samples, as Megatron's split takes the last documents
    seen = {int(data.row(i).input_ids[0, a]) for i in range(40) for a, _ in data.row(i).boundaries}
    assert seen == {s[0] for s in samples[:-4]}
    assert len(open_train_data([DataSpec(path)], cfg, tokenizer_dir=None, seq_length=16, eval_rows=2).eval_batches()) == 2


def test_blending_follows_weights(tmp_path, cfg):
    a, _ = _tokens_file(tmp_path / "a.jsonl", 10, base=3, length=lambda i: 16)  # one sample a row
    b, _ = _tokens_file(tmp_path / "b.jsonl", 10, base=100, length=lambda i: 16)
    data = open_train_data([DataSpec.parse(f"3:{a}"), DataSpec.parse(f"1:{b}")], cfg, tokenizer_dir=None,
                           seq_length=16)  # fmt: skip
    from_a = [int(data.row(i).input_ids[0, 0]) < 100 for i in range(400)]
    assert sum(from_a) == 300
    assert all(sum(from_a[:k]) in (3 * k // 4, 3 * k // 4 + 1) for k in range(4, 400, 4))  # interleaved, not runs
    assert "blended by weight" in data.describe()


# ----------------------------------------------------------------------------------------------------------------------
# continued pre-training: prepare-data -> Megatron IndexedDataset -> GPTDataset

DOCS = [
    "the quick brown fox jumps over the lazy dog.",
    "a mixture of experts routes every token to a few experts and adds a shared expert.",
    "norms keep the scale of the hidden state steady from one layer to the next.",
    "the model reads the prompt, then it writes one token at a time until it writes the end token.",
] * 3


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    d = tmp_path_factory.mktemp("corpus")
    src = _jsonl(d / "docs.jsonl", [{"text": t} for t in DOCS] + [{"text": ""}])
    report = prepare_data([src], d / "corpus", MOE)
    return d / "corpus", report


def test_prepare_data_reads_back_through_megatron_indexed_dataset(corpus, tok):
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    prefix, report = corpus
    ds = IndexedDataset(str(prefix))
    want = [tok(t, add_special_tokens=False)["input_ids"] + [tok.eos_token_id] for t in DOCS]
    assert len(ds) == len(DOCS) == report.documents and report.empty_skipped == 1
    assert [ds[i].tolist() for i in range(len(ds))] == want
    assert report.tokens == sum(map(len, want)) and ds[0].dtype.name == "uint16"
    meta = json.loads(Path(f"{prefix}.json").read_text())
    assert meta["eod"] == tok.eos_token_id == 2


def test_indexed_rows_are_megatron_gpt_dataset_windows(corpus, cfg):
    from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
    from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig
    from megatron.core.tokenizers import MegatronTokenizer

    prefix, _ = corpus
    S, seed = 32, 7
    config = GPTDatasetConfig(
        random_seed=seed, sequence_length=S, blend=([str(prefix)], None), split="1,0,0", path_to_cache="",
        tokenizer=MegatronTokenizer.from_pretrained(str(MOE), metadata_path={"library": "huggingface"}),
        reset_position_ids=True, reset_attention_mask=True, eod_mask_loss=False,
    )  # fmt: skip
    (megatron_ds, _, _) = BlendedMegatronDatasetBuilder(GPTDataset, [None, None, None], lambda: True, config).build()
    data = open_train_data([DataSpec(prefix)], cfg, tokenizer_dir=MOE, seq_length=S, seed=seed)
    assert data.stats["sources"][0]["rows_per_epoch"] == len(megatron_ds) > 3
    for j in range(len(megatron_ds)):
        ref, row = megatron_ds[j], data.row(j)
        assert torch.equal(row.input_ids[0], ref["tokens"])
        # documents isolated as Megatron's reset_position_ids / reset_attention_mask isolate them
        assert torch.equal(row.position_ids[0], ref["position_ids"])
        assert torch.equal(row.attention_mask[0, 0], ref["attention_mask"][0])
        eod_S = ref["tokens"] == 2
        assert torch.equal(row.labels[0][~eod_S], ref["labels"][~eod_S])
        assert torch.equal(row.loss_mask[0].bool(), ~eod_S)  # an EOD does not predict the next document
    assert data.row(len(megatron_ds)).input_ids.shape == (1, S)  # epoch 2: another GPTDataset, seed + 1


def test_forms_blend_together(corpus, cfg):
    prefix, _ = corpus
    data = open_train_data([DataSpec.parse(f"1:{prefix}"), DataSpec.parse(f"1:{sft_set()}")], cfg,
                           tokenizer_dir=MOE, seq_length=32)  # fmt: skip
    # chat rows start with the template's <|begin_of_sentence|> (id 3); windows of the corpus never hold it
    starts = [int(data.row(i).input_ids[0, 0]) == 3 for i in range(40)]
    assert sum(starts) == 20 and [s["form"] for s in data.stats["sources"]] == ["indexed", "chat"]
    assert collate([data.row(i) for i in range(4)]).input_ids.shape == (4, 32)


def test_prepare_data_cli_and_bad_input(tmp_path, corpus, capsys):
    from ernie45.cli import main

    bad = _jsonl(tmp_path / "bad.jsonl", [{"text": "a b"}, "{not json", {"text": "c"}])
    assert main(["prepare-data", str(bad), "--tokenizer", str(MOE), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"ernie45 prepare-data: error: {bad}:2: not valid JSON")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.jsonl"]  # nothing half-written
    prefix, _ = corpus
    with pytest.raises(DataError, match="exists; pass --overwrite"):
        prepare_data([bad], prefix, MOE)
    with pytest.raises(DataError, match=r":1: no 'body' field"):
        prepare_data([bad], tmp_path / "x", MOE, text_key="body")


# ----------------------------------------------------------------------------------------------------------------------
# bad input: one DataError naming the file:line / field


@pytest.mark.parametrize("records, match", [
    (['{"input_ids": [5, 6]}', '{"input_ids": [5, 6]', '{"input_ids": [7]}'], r"t\.jsonl:2: not valid JSON"),
    ([{"input_ids": [5, 6]}, {"messages": [{"role": "user", "content": "x"}]}], r":2: a chat record in a tokens file"),
    ([{"input_ids": [5, 999]}], r":1: token id 999 outside the vocabulary \[0, 160\)"),
    ([{"input_ids": [5, 6], "loss_mask": [1]}], r":1: 'loss_mask' has 1 entries for 2 input_ids"),
    ([{"text": "hello"}], r":1: raw 'text' records .* `ernie45 prepare-data`"),
    ([{"messages": [{"role": "user", "content": "x"}, {"role": "robot", "content": "y"}]}],
     r":1: message 1: unknown role 'robot'"),
    ([{"messages": [{"role": "user"}]}], r":1: message 0 has no 'content'"),
    ([{"messages": [{"role": "user", "content": "the dog"}]}], r":1: no assistant message"),
    ([], r"t\.jsonl: no records \(empty file\)"),
])  # fmt: skip
def test_bad_records_are_named(tmp_path, cfg, records, match):
    path = _jsonl(tmp_path / "t.jsonl", records)
    with pytest.raises(DataError, match=match):
        open_train_data([DataSpec(path)], cfg, tokenizer_dir=MOE, seq_length=16)


def test_chat_needs_a_tokenizer_with_a_template(tmp_path, cfg):
    path = _jsonl(tmp_path / "c.jsonl", [{"messages": CHAT}])
    with pytest.raises(DataError, match=r"c\.jsonl:1: chat records need the checkpoint's tokenizer"):
        open_train_data([DataSpec(path)], cfg, tokenizer_dir=None, seq_length=64)
    bare = tmp_path / "tok"
    bare.mkdir()
    for f in ("tokenizer.json", "special_tokens_map.json"):
        (bare / f).write_bytes((MOE / f).read_bytes())
    tok_cfg = json.loads((MOE / "tokenizer_config.json").read_text())
    del tok_cfg["chat_template"]
    (bare / "tokenizer_config.json").write_text(json.dumps(tok_cfg))
    with pytest.raises(DataError, match="the tokenizer has no chat_template"):
        open_train_data([DataSpec(path)], cfg, tokenizer_dir=bare, seq_length=64)


def test_missing_image_is_named(tmp_path, vl_cfg):
    record = {"messages": [{"role": "user", "content": [{"type": "image", "image": "gone.png"}]},
                           {"role": "assistant", "content": "a dog"}]}  # fmt: skip
    path = _jsonl(tmp_path / "vl.jsonl", [record])
    with pytest.raises(DataError, match=rf"vl\.jsonl:1: message 0: user content part 0: image {tmp_path}/gone\.png: no such file"):
        open_train_data([DataSpec(path)], vl_cfg, tokenizer_dir=VL, seq_length=64)
    with pytest.raises(DataError, match="needs a VL checkpoint"):
        open_train_data([DataSpec(path)], load_config(MOE), tokenizer_dir=MOE, seq_length=64)


@pytest.mark.parametrize("text, match", [("0:a.jsonl", "not a positive number"), ("-2:a.jsonl", "not a positive number"),
                                         ("nan:a.jsonl", "not a positive number"), ("1.5:", "no path after the weight")])  # fmt: skip
def test_bad_weights(text, match):
    with pytest.raises(DataError, match=match):
        DataSpec.parse(text)


def test_data_spec_parse_and_missing_path(tmp_path, cfg):
    assert DataSpec.parse("0.25:x/y.jsonl") == DataSpec(Path("x/y.jsonl"), 0.25)
    assert DataSpec.parse("data/set.jsonl") == DataSpec(Path("data/set.jsonl"), 1.0)
    assert DataSpec.parse("abc:def") == DataSpec(Path("abc:def"), 1.0)  # no number before the colon: a path
    with pytest.raises(DataError, match=r"abc:def: no such file.*positive number before the ':'"):
        open_train_data([DataSpec.parse("abc:def")], cfg, tokenizer_dir=None, seq_length=16)
