"""``ernie45 generate CKPT PROMPT``: a quick greedy continuation from any checkpoint format.

Backends (``backend="auto"`` picks the checkpoint's own runtime):

* ``transformers`` -- HF directories (the reference, fp32 eager);
* ``megatron``     -- HF or torch_dist directories, Megatron-Core at TP1 loaded through the bridge;
* ``llama.cpp``    -- GGUF files, through ``llama_cpp`` when importable.

Decoding is plain greedy (argmax, no sampling, no penalties) and stops at ``max_new_tokens`` or an EOS id
(``generation_config.json`` / ``config.json``; llama.cpp's own for GGUF). The transformers and Megatron backends
recompute the whole sequence for every new token: simple and exactly comparable, and cheap for the short samples
this command is for (llama.cpp uses its KV cache). For VL checkpoints the image/video special ids are excluded from
the argmax: a generated image placeholder would need image features nobody supplies.

Prompt: text is tokenized with the checkpoint's tokenizer (``transformers.AutoTokenizer``; for GGUF, the vocabulary
in the file); without one, the prompt is whitespace-separated token ids, and the continuation is printed as ids.
``image`` (VL): processed like ``ernie45 verify --image`` and placed right after the prompt's BOS.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from .verify import (
    Batch,
    LlamaCppRuntime,
    VerifyError,
    check_text_ids,
    image_block,
    image_inputs,
    open_runtime,
    tokenizer_for,
    vision_special_ids,
)

__all__ = ["GenerateError", "Generation", "generate", "add_arguments", "run"]

BACKENDS = ("auto", "transformers", "megatron", "llama.cpp")


class GenerateError(VerifyError):
    """A prompt, image or backend that cannot be used with this checkpoint."""


@dataclass
class Generation:
    checkpoint: str
    backend: str
    prompt_ids: list[int]
    new_ids: list[int]
    text: str | None  # the decoded continuation, None without a tokenizer
    stop: str  # "eos" | "max_new_tokens"

    def summary(self) -> str:
        head = f"{self.checkpoint} ({self.backend}, greedy): {len(self.prompt_ids)} prompt tokens -> {len(self.new_ids)} new"
        head += ", stopped at EOS" if self.stop == "eos" else ""
        body = self.text if self.text is not None else " ".join(map(str, self.new_ids))
        return f"{head}\n{body}\nids: {self.new_ids}"


def _eos_ids(path: Path) -> set[int]:
    """EOS id(s): ``generation_config.json`` first, then ``config.json`` (top level or ``text_config``)."""
    for name in ("generation_config.json", "config.json"):
        f = path / name
        if not f.is_file():
            continue
        raw = json.loads(f.read_text())
        for d in (raw, raw.get("text_config") or {}):
            v = d.get("eos_token_id")
            if v is not None:
                return set(v) if isinstance(v, list) else {int(v)}
    return set()


def _parse_ids(prompt: str, where: str) -> list[int]:
    try:
        return [int(x) for x in prompt.split()]
    except ValueError:
        raise GenerateError(f"{where} has no tokenizer, so the prompt must be whitespace-separated token ids; "
                            f"got {prompt[:60]!r}") from None  # fmt: skip


def _gguf_has_vocab(path: Path) -> bool:
    import gguf

    field = gguf.GGUFReader(str(path)).fields.get("tokenizer.ggml.model")
    return field is not None and field.contents() != gguf.NoVocab.tokenizer_model


def _generate_gguf(path: Path, prompt, image, max_new_tokens: int, stop_at_eos: bool) -> Generation:
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
            nxt = int(torch.tensor(llm.scores[llm.n_tokens - 1]).argmax())
            new.append(nxt)
            if stop_at_eos and nxt in eos:
                stop = "eos"
                break
            llm.eval([nxt])
        text = llm.detokenize(new).decode("utf-8", errors="replace") if vocab else None
    finally:
        rt.close()
    return Generation(str(path), "llama.cpp", list(ids), new, text, stop)


def generate(
    ckpt: str | Path,
    prompt: str | list[int],
    *,
    image: str | Path | None = None,
    max_new_tokens: int = 16,
    backend: str = "auto",
    hf_config: str | Path | None = None,
    stop_at_eos: bool = True,
) -> Generation:
    """Greedy continuation of ``prompt`` (text, or token ids) from ``ckpt`` (HF dir / torch_dist dir / GGUF)."""
    from .inspect import detect_format

    ckpt = Path(ckpt)
    if backend not in BACKENDS:
        raise GenerateError(f"backend must be one of {BACKENDS}, not {backend!r}")
    if max_new_tokens < 1:
        raise GenerateError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    fmt = detect_format(ckpt)
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
    rt = open_runtime(ckpt, hf_runtime=backend, hf_config=hf_config, vision_attn_implementation="sdpa")
    with rt:
        cfg = rt.cfg
        if min(ids) < 0 or max(ids) >= cfg.vocab_size:
            raise GenerateError(f"prompt token ids must lie in [0, {cfg.vocab_size})")
        check_text_ids(ids, cfg, "prompt")
        pixels = grid = None
        if image is not None:
            pixels, grid = image_inputs(image, cfg, ckpt)
            head = ids[:1] if tok is not None and ids[0] == tok.bos_token_id else []
            ids = head + image_block(cfg, grid) + ids[len(head) :]
        reserved = vision_special_ids(cfg)
        eos = _eos_ids(ckpt) if stop_at_eos else set()
        seq, new, stop = list(ids), [], "max_new_tokens"
        for _ in range(max_new_tokens):
            logits, _ = rt.forward(Batch(torch.tensor([seq]), pixels, grid), routing=False)
            last_V = logits[0, -1].clone()
            last_V[reserved] = float("-inf")
            nxt = int(last_V.argmax())
            new.append(nxt)
            seq.append(nxt)
            if nxt in eos:
                stop = "eos"
                break
        name = rt.name
    text = tok.decode(new, skip_special_tokens=True) if tok is not None else None
    return Generation(str(ckpt), name, ids, new, text, stop)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("checkpoint", type=Path, help="HF directory, Megatron torch_dist directory or GGUF file")
    p.add_argument("prompt", help="prompt text (token ids, whitespace-separated, if the checkpoint has no tokenizer)")
    p.add_argument("--image", type=Path, default=None, help="an image file for VL checkpoints")
    p.add_argument("--max-new-tokens", type=int, default=16)
    p.add_argument("--backend", choices=BACKENDS, default="auto",
                   help="auto: transformers for HF, megatron for torch_dist, llama.cpp for GGUF")  # fmt: skip
    p.add_argument("--hf-config", type=Path, default=None, help="config.json for a torch_dist directory without one")
    p.add_argument("--no-eos-stop", action="store_true", help="always generate --max-new-tokens tokens")
    p.add_argument("--json", action="store_true", help="print the result as JSON")


def run(args: argparse.Namespace) -> int:
    g = generate(args.checkpoint, args.prompt, image=args.image, max_new_tokens=args.max_new_tokens,
                 backend=args.backend, hf_config=args.hf_config, stop_at_eos=not args.no_eos_stop)  # fmt: skip
    print(json.dumps(asdict(g), indent=2) if args.json else g.summary())
    return 0
