"""``ernie45 generate CKPT PROMPT``: a quick greedy continuation from any checkpoint format.

Backends (``backend="auto"`` picks the checkpoint's own runtime):

* ``transformers`` -- HF directories (the reference, fp32 eager);
* ``megatron``     -- HF or torch_dist directories, Megatron-Core at TP1 loaded through the bridge;
* ``llama.cpp``    -- GGUF files, through ``llama_cpp`` when importable.

Decoding is plain greedy (argmax, no sampling, no penalties) and stops at ``max_new_tokens`` or an EOS id
(``generation_config.json`` / ``config.json``; llama.cpp's own for GGUF). The Megatron backend decodes through
Megatron-Core's static KV cache (``megatron/inference.py``: prefill once, one cached step per token); with
``kv_cache=False`` it recomputes the whole sequence for every token, as the transformers backend always does --
simple, exactly comparable, and cheap for the short samples this command is for. llama.cpp uses its own KV cache.
For VL checkpoints the image/video special ids are excluded from the argmax: a generated image placeholder would
need image features nobody supplies.

Prompt: text is tokenized with the checkpoint's tokenizer (``transformers.AutoTokenizer``; for GGUF, the vocabulary
in the file); without one, the prompt is whitespace-separated token ids, and the continuation is printed as ids.
``image`` (VL): processed like ``ernie45 verify --image`` and placed right after the prompt's BOS (the tokenizer's,
else ``bos_token_id`` of ``generation_config.json`` / ``config.json``), or first when there is none.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Generator

import torch

from .errors import InputError
from .inputs import (
    Batch,
    check_text_ids,
    declared_token_ids,
    image_block,
    image_inputs,
    tokenizer_for,
    vision_special_ids,
)
from .runtime import LlamaCppRuntime, MegatronRuntime, open_runtime

__all__ = ["GenerateError", "Generation", "generate", "run"]

BACKENDS = ("auto", "transformers", "megatron", "llama.cpp")


class GenerateError(InputError):
    """A prompt, image or backend that cannot be used with this checkpoint."""


@dataclass
class Generation:
    checkpoint: str
    backend: str
    prompt_ids: list[int]
    new_ids: list[int]
    text: str | None  # the decoded continuation, None without a tokenizer
    stop: str  # "eos" | "max_new_tokens"
    decoding: str  # "kv-cache" | "full-recompute"

    def summary(self) -> str:
        head = (f"{self.checkpoint} ({self.backend}, greedy, {self.decoding}): {len(self.prompt_ids)} prompt tokens -> "
                f"{len(self.new_ids)} new")  # fmt: skip
        head += ", stopped at EOS" if self.stop == "eos" else ""
        body = self.text if self.text is not None else " ".join(map(str, self.new_ids))
        return f"{head}\n{body}\nids: {self.new_ids}"


def _bos_ids(path: Path, tok) -> set[int]:
    if tok is not None and tok.bos_token_id is not None:
        return {tok.bos_token_id}
    return declared_token_ids(path, "bos_token_id")


def _parse_ids(prompt: str, where: str) -> list[int]:
    try:
        return [int(x) for x in prompt.split()]
    except ValueError:
        raise GenerateError(f"{where} has no tokenizer, so the prompt must be whitespace-separated token ids; "
                            f"got {prompt[:60]!r}") from None  # fmt: skip


def _gguf_has_vocab(path: Path) -> bool:
    import gguf

    from .bridge.gguf import open_gguf

    field = open_gguf(path).fields.get("tokenizer.ggml.model")
    return field is not None and field.contents() != gguf.NoVocab.tokenizer_model


def _generate_gguf(path: Path, prompt, image, max_new_tokens: int, stop_at_eos: bool) -> Generation:
    import numpy as np

    if image is not None:
        raise GenerateError(f"{path}: llama.cpp has no ERNIE 4.5 VL architecture; a GGUF cannot take an image")
    rt = LlamaCppRuntime(path)
    vocab = _gguf_has_vocab(path)
    try:
        probe = rt.llm(64)
        if isinstance(prompt, str) and vocab:
            ids = probe.tokenize(prompt.encode(), add_bos=True, special=False)
        else:
            ids = list(prompt) if not isinstance(prompt, str) else _parse_ids(prompt, str(path))
        llm = rt.llm(len(ids) + max_new_tokens)
        eos = {llm.token_eos()} if vocab else set()
        llm.reset()
        llm.eval(ids)
        new: list[int] = []
        stop = "max_new_tokens"
        for _ in range(max_new_tokens):
            nxt = int(np.argmax(llm.scores[llm.n_tokens - 1]))
            new.append(nxt)
            if stop_at_eos and nxt in eos:
                stop = "eos"
                break
            llm.eval([nxt])
        text = llm.detokenize(new).decode("utf-8", errors="replace") if vocab else None
    finally:
        rt.close()
    return Generation(str(path), "llama.cpp", list(ids), new, text, stop, "kv-cache")


def generate(
    ckpt: str | Path,
    prompt: str | list[int],
    *,
    image: str | Path | None = None,
    max_new_tokens: int = 16,
    backend: str = "auto",
    hf_config: str | Path | None = None,
    stop_at_eos: bool = True,
    kv_cache: bool = True,
) -> Generation:
    """Greedy continuation of ``prompt`` (text, or token ids) from ``ckpt`` (HF dir / torch_dist dir / GGUF).

    ``kv_cache`` (Megatron backend): decode through Megatron-Core's KV cache; ``False`` recomputes the whole sequence
    for every token (as the transformers backend always does).
    """
    from .bridge.source import open_source

    ckpt = Path(ckpt)
    if backend not in BACKENDS:
        raise GenerateError(f"backend must be one of {BACKENDS}, not {backend!r}")
    if max_new_tokens < 1:
        raise GenerateError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    source = open_source(ckpt, hf_config=hf_config)
    fmt = source.format
    if backend == "auto":
        backend = {"hf": "transformers", "megatron": "megatron", "gguf": "llama.cpp"}[fmt]
    allowed = {"hf": ("transformers", "megatron"), "megatron": ("megatron",), "gguf": ("llama.cpp",)}[fmt]
    if backend not in allowed:
        raise GenerateError(f"{ckpt}: a {fmt} checkpoint runs with {' or '.join(allowed)}, not {backend}")
    if fmt == "gguf":
        return _generate_gguf(ckpt, prompt, image, max_new_tokens, stop_at_eos)

    tok = tokenizer_for(ckpt)
    if isinstance(prompt, str):
        ids = list(tok(prompt)["input_ids"]) if tok is not None else _parse_ids(prompt, str(ckpt))
    else:
        ids = [int(i) for i in prompt]
    if not ids:
        raise GenerateError("the prompt is empty")
    cfg = source.cfg
    if min(ids) < 0 or max(ids) >= cfg.vocab_size:
        raise GenerateError(f"prompt token ids must lie in [0, {cfg.vocab_size})")
    check_text_ids(ids, cfg, "prompt")
    pixels = grid = None
    if image is not None:
        pixels, grid = image_inputs(image, cfg, ckpt)
        head = ids[:1] if ids[0] in _bos_ids(ckpt, tok) else []
        ids = head + image_block(cfg, grid) + ids[len(head) :]
    reserved = vision_special_ids(cfg)
    eos = declared_token_ids(ckpt, "eos_token_id") if stop_at_eos else set()
    batch = Batch(torch.tensor([ids]), pixels, grid)
    with open_runtime(ckpt, hf_runtime=backend, hf_config=hf_config, vision_attn_implementation="sdpa") as rt:
        use_cache = kv_cache and isinstance(rt, MegatronRuntime)
        steps = _cached_logits(rt, batch, max_new_tokens) if use_cache else _recomputed_logits(rt, batch)
        new, stop = [], "max_new_tokens"
        last_V = next(steps)
        for i in range(max_new_tokens):
            last_V = last_V.clone()
            last_V[reserved] = float("-inf")
            nxt = int(last_V.argmax())
            new.append(nxt)
            if nxt in eos:
                stop = "eos"
                break
            if i < max_new_tokens - 1:
                last_V = steps.send(nxt)
        name = rt.name
    text = tok.decode(new, skip_special_tokens=True) if tok is not None else None
    return Generation(str(ckpt), name, ids, new, text, stop, "kv-cache" if use_cache else "full-recompute")


def _recomputed_logits(rt, batch: Batch) -> Generator[torch.Tensor, int, None]:
    """Last-position logits ``[V]`` of the whole sequence, recomputed after each token sent in (any runtime)."""
    seq = batch.input_ids[0].tolist()
    while True:
        logits, _ = rt.forward(Batch(torch.tensor([seq]), batch.pixel_values, batch.image_grid_thw), routing=False)
        seq.append((yield logits[0, -1]))


def _cached_logits(rt: MegatronRuntime, batch: Batch, max_new_tokens: int) -> Generator[torch.Tensor, int, None]:
    """The same through Megatron-Core's static KV cache (``megatron/inference.py``): prefill once, then one step per
    token."""
    from .megatron.inference import KVCacheSession

    cfg, ids = rt.cfg, batch.input_ids
    mm = {}
    if cfg.family == "vl":
        from .megatron.vl_inputs import token_type_ids

        types, moe_types = token_type_ids(ids, cfg)
        mm = dict(mm_token_type_ids=types, moe_mm_token_type_ids=moe_types)
        if batch.pixel_values is not None:
            mm.update(pixel_values=batch.pixel_values, image_grid_thw=batch.image_grid_thw)
    session = KVCacheSession(rt.chunks, cfg, batch_size=1, max_length=ids.shape[1] + max_new_tokens)
    logits = session.prefill(ids, **mm)[0, -1]
    while True:
        nxt = yield logits.float()
        logits = session.step(torch.tensor([nxt]))[0]


def run(args: argparse.Namespace) -> int:
    g = generate(args.checkpoint, args.prompt, image=args.image, max_new_tokens=args.max_new_tokens,
                 backend=args.backend, hf_config=args.hf_config, stop_at_eos=not args.no_eos_stop,
                 kv_cache=not args.no_kv_cache)  # fmt: skip
    print(json.dumps(asdict(g), indent=2) if args.json else g.summary())
    return 0
