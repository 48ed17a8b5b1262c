"""A tiny, deterministic SentencePiece tokenizer shaped like ERNIE 4.5's, for tests and the demo.

ERNIE 4.5 ships a SentencePiece ``tokenizer.model`` with ``<unk>`` = 0 (also the pad token), ``<s>`` = 1 and
``</s>`` = 2 (the ids in every ERNIE 4.5 ``config.json``), plus control pieces such as ``<|begin_of_sentence|>``.
:func:`write_tiny_tokenizer` trains such a model offline on a fixed embedded corpus, with exactly the tiny
model's ``vocab_size`` pieces, so embedding rows and token ids line up one to one.

Determinism: the corpus is a constant, training runs single-threaded with sampling and shuffling off, and the
model is trained from an in-memory iterator into an in-memory writer, so no temp-file path ends up in the
serialised ``trainer_spec``. Two calls therefore write byte-identical ``tokenizer.model`` files (tested).

Model type is BPE (not unigram) because llama.cpp's SPM tokenizer merges pieces greedily by score, which
reproduces SentencePiece's own segmentation for BPE models; that lets the llama.cpp test compare token ids too.
There is no byte fallback: 256 byte pieces would not fit a 160-piece vocabulary.

Files written (loadable by ``transformers.AutoTokenizer`` and by ``gguf`` / llama.cpp's converter):

* ``tokenizer.model``           the SentencePiece model
* ``tokenizer_config.json``     LlamaTokenizer-style config (bos/eos/unk/pad, add_bos_token, added_tokens_decoder)
* ``special_tokens_map.json``   the same special tokens, for older loaders
"""

from __future__ import annotations

import io
import json
from pathlib import Path

__all__ = ["TINY_CORPUS", "CONTROL_TOKENS", "VL_CONTROL_TOKENS", "write_tiny_tokenizer"]

# Special pieces, in id order. ERNIE 4.5: pad_token_id = 0 (<unk>), bos_token_id = 1, eos_token_id = 2.
UNK, BOS, EOS = "<unk>", "<s>", "</s>"
# Two of ERNIE's control pieces (cls / sep in its tokenizer_config), so the CONTROL token type path is exercised.
CONTROL_TOKENS = ("<|begin_of_sentence|>", "<|end_of_sentence|>")
# ERNIE 4.5 VL's image / video pieces, in the order of the config's image_start/end, image, video_start/end, video
# token ids. As control pieces they follow CONTROL_TOKENS (ids 5..10) and never come out of text.
VL_CONTROL_TOKENS = ("<|IMAGE_START|>", "<|IMAGE_END|>", "<|IMAGE_PLACEHOLDER|>", "<|VIDEO_START|>", "<|VIDEO_END|>",
                     "<|VIDEO_PLACEHOLDER|>")  # fmt: skip

# Fixed training text. Small alphabet on purpose: every distinct character becomes a piece, and with 160 pieces
# in all there must be room left for merges.
TINY_CORPUS = """\
the quick brown fox jumps over the lazy dog.
a mixture of experts routes every token to a few experts and adds a shared expert.
the router takes a softmax over the experts, adds a bias for the choice only, and keeps the top k.
rotary position embeddings turn pairs of channels by an angle that grows with the position.
the model reads the prompt, then it writes one token at a time until it writes the end token.
weights move between formats exactly: the same numbers, a different layout, and nothing left out.
a tiny model with random weights says nothing useful, but it says the same thing in every runtime.
the dense layer is a gated linear unit; the sparse layer is a sum of gated linear units.
norms keep the scale of the hidden state steady from one layer to the next.
tokens, scores and types go into the file together with the weights of the model.
""".strip().splitlines()


def _train(vocab_size: int, controls: tuple[str, ...]) -> bytes:
    import sentencepiece as spm

    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(TINY_CORPUS * 4),
        model_writer=model,
        model_type="bpe",
        vocab_size=vocab_size,
        character_coverage=1.0,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,  # ERNIE pads with <unk> (pad_token_id = 0); SentencePiece needs no own pad piece
        unk_piece=UNK,
        bos_piece=BOS,
        eos_piece=EOS,
        control_symbols=list(controls),
        byte_fallback=False,
        # Llama-style normalisation: none (llama.cpp's SPM tokenizer applies no NFKC and keeps repeated spaces),
        # plus the "▁" dummy prefix that both SentencePiece and llama.cpp add.
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        add_dummy_prefix=True,
        num_threads=1,
        input_sentence_size=0,  # use every sentence: no sampling
        shuffle_input_sentence=False,
        hard_vocab_limit=True,  # exactly vocab_size pieces, or an error
        minloglevel=2,
    )
    return model.getvalue()


def write_tiny_tokenizer(out_dir: str | Path, vocab_size: int, *, vl: bool = False) -> Path:
    """Train and write a SentencePiece tokenizer with exactly ``vocab_size`` pieces into ``out_dir``.

    ``vl``: also the image / video control pieces (:data:`VL_CONTROL_TOKENS`, ids 5..10), which a VL config must
    then name as its image / video token ids.

    Writes ``tokenizer.model`` (what llama.cpp's converter and :func:`ernie45.bridge.gguf.export_gguf` read),
    and ``tokenizer.json`` + ``tokenizer_config.json`` + ``special_tokens_map.json`` for transformers. The
    tokenizer.json is built by transformers' own ``LlamaTokenizer`` from the SentencePiece vocabulary with the
    merges derived the way transformers' SentencePiece extractor derives them (``generate_merges``), so loading
    needs neither protobuf nor a slow-to-fast conversion.

    Known, documented differences from SentencePiece (irrelevant for the tests, which stay inside the corpus
    alphabet): characters outside the corpus alphabet (SentencePiece: ``<unk>``; LlamaTokenizer: byte fallback
    with no byte pieces), a leading space (SentencePiece adds a second "▁"), and control tokens written as text
    (transformers matches them as special tokens, SentencePiece and llama.cpp without ``parse_special`` do not).
    """
    import sentencepiece as spm
    from tokenizers import AddedToken
    from transformers import LlamaTokenizer
    from transformers.tokenization_utils_base import generate_merges

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    control_tokens = CONTROL_TOKENS + (VL_CONTROL_TOKENS if vl else ())
    blob = _train(vocab_size, control_tokens)
    sp = spm.SentencePieceProcessor(model_proto=blob)
    if sp.get_piece_size() != vocab_size:  # hard_vocab_limit should make this impossible; check, do not trust
        raise ValueError(f"trained {sp.get_piece_size()} pieces, wanted {vocab_size}")
    if (sp.unk_id(), sp.bos_id(), sp.eos_id()) != (0, 1, 2):
        raise ValueError("special ids moved: ERNIE 4.5 needs <unk>=0, <s>=1, </s>=2")
    (out_dir / "tokenizer.model").write_bytes(blob)

    vocab = {sp.id_to_piece(i): i for i in range(vocab_size)}
    controls = [AddedToken(tok, normalized=False, special=True) for tok in control_tokens]
    hf_tok = LlamaTokenizer(
        vocab=vocab,
        merges=generate_merges(vocab),
        unk_token=UNK,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=UNK,  # ERNIE 4.5 pads with id 0
        add_bos_token=True,
        add_eos_token=False,
        add_prefix_space=True,  # SentencePiece's add_dummy_prefix; llama.cpp reads it as add_space_prefix
        additional_special_tokens=controls,
        model_max_length=131072,
    )
    hf_tok.save_pretrained(out_dir)

    # Make the flags explicit in tokenizer_config.json: llama.cpp's converter (gguf.SpecialVocab) reads
    # add_bos_token / add_eos_token from there.
    cfg_path = out_dir / "tokenizer_config.json"
    tok_cfg = json.loads(cfg_path.read_text())
    tok_cfg.update(add_bos_token=True, add_eos_token=False)
    cfg_path.write_text(json.dumps(tok_cfg, indent=2, sort_keys=True) + "\n")
    specials = {"unk_token": UNK, "bos_token": BOS, "eos_token": EOS, "pad_token": UNK}
    (out_dir / "special_tokens_map.json").write_text(json.dumps(specials, indent=2, sort_keys=True) + "\n")
    return out_dir
