"""What a runtime is fed: token ids, the checkpoint's tokenizer and declared ids, and VL image inputs.

Shared by ``verify``, ``generate``, ``route-stats`` and the training data (``train/data.py``). Every refusal is a
:class:`PromptError` naming the prompt, id or image file. transformers and PIL are imported where they are used
(reading a tokenizer or an image), torch at the top.

Legend: ``B`` batch, ``S`` sequence.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import InputError

__all__ = [
    "PromptError",
    "Batch",
    "tokenizer_for",
    "declared_token_ids",
    "image_inputs",
    "image_block",
    "vision_special_ids",
    "check_text_ids",
    "random_text_ids",
    "prompt_batch",
]


class PromptError(InputError):
    """Token ids, a prompt or an image that a checkpoint cannot take (names it and why)."""


@dataclass
class Batch:
    """Token ids ``[B, S]`` (no padding: all rows the same length) and, for VL models, one image's processor outputs."""

    input_ids: torch.Tensor
    pixel_values: torch.Tensor | None = None
    image_grid_thw: torch.Tensor | None = None

    def __post_init__(self) -> None:
        if self.input_ids.dim() != 2:
            raise PromptError(f"input_ids must be [B, S], got shape {list(self.input_ids.shape)}")
        self.input_ids = self.input_ids.to(torch.long)


def tokenizer_for(path: str | Path):
    """The checkpoint's ``transformers.AutoTokenizer`` if it ships tokenizer files, else None."""
    path = Path(path)
    files = ("tokenizer_config.json", "tokenizer.json", "tokenizer.model")
    if not path.is_dir() or not any((path / f).is_file() for f in files):
        return None
    import transformers

    return transformers.AutoTokenizer.from_pretrained(str(path))


def declared_token_ids(path: str | Path, key: str) -> set[int]:
    """``key`` ("eos_token_id", "bos_token_id") from ``generation_config.json``, else ``config.json`` (top level or
    ``text_config``); an int or a list there. Empty when neither names it."""
    for name in ("generation_config.json", "config.json"):
        f = Path(path) / name
        if not f.is_file():
            continue
        raw = json.loads(f.read_text())
        for d in (raw, raw.get("text_config") or {}):
            v = d.get(key)
            if v is not None:
                return {int(x) for x in v} if isinstance(v, list) else {int(v)}
    return set()


def image_inputs(image: str | Path, cfg, processor_dir: str | Path | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(pixel_values [N, C·p·p], image_grid_thw [1, 3])`` for one image file, as the HF processor makes them.

    The checkpoint's own image processor (``preprocessor_config.json``) when it ships one; otherwise transformers'
    ERNIE 4.5 VL image processor with its defaults (CLIP mean/std, 56² .. 14²·4·1280 pixels) and the config's
    patch / merge sizes.
    """
    from PIL import Image

    if cfg.family != "vl":
        raise PromptError(f"an image needs a VL checkpoint; this one is {cfg.family}")
    path = Path(image)
    if not path.is_file():
        raise PromptError(f"{path}: no such image file")
    try:
        img = Image.open(path).convert("RGB")
    except OSError as e:
        raise PromptError(f"{path}: not an image PIL can read ({e})") from None
    if processor_dir is not None and (Path(processor_dir) / "preprocessor_config.json").is_file():
        import transformers

        proc = transformers.AutoImageProcessor.from_pretrained(str(processor_dir))
    else:
        from transformers.models.ernie4_5_vl_moe import image_processing_pil_ernie4_5_vl_moe as pil_processing

        proc = pil_processing.Ernie4_5_VLMoeImageProcessorPil(
            patch_size=cfg.vision.patch_size, merge_size=cfg.vision.spatial_merge_size
        )
    out = proc(images=[img], return_tensors="pt")
    return out["pixel_values"].float(), out["image_grid_thw"]


def image_block(cfg, grid_thw: torch.Tensor) -> list[int]:
    """``START + placeholders + END`` for one image of ``grid_thw`` (``t·h·w / m²`` placeholders, reference §F.1)."""
    t, h, w = (int(v) for v in grid_thw.reshape(-1)[:3])
    m = cfg.vision.spatial_merge_size
    ids = cfg.special_ids
    n = t * h * w // (m * m)
    return [ids["image_start_token_id"]] + [ids["image_token_id"]] * n + [ids["image_end_token_id"]]


def vision_special_ids(cfg) -> list[int]:
    """The image/video ids a VL config reserves (a text prompt must not contain them)."""
    if cfg is None or cfg.family != "vl":
        return []
    return sorted({v for k, v in cfg.special_ids.items() if v is not None and ("image" in k or "video" in k)})


def check_text_ids(ids: list[int], cfg, where: str) -> None:
    """Refuse text token ids a VL config reserves for images/videos: they would be taken for vision tokens."""
    reserved = set(vision_special_ids(cfg))
    bad = sorted({i for i in ids if i in reserved})
    if bad:
        names = {v: k for k, v in cfg.special_ids.items()}
        raise PromptError(
            f"{where}: text token id(s) {bad} are this VL config's {[names[b] for b in bad]}; the tokenizer and "
            "config.json disagree (or the prompt ids are wrong)"
        )


def random_text_ids(cfg, vocab: int, B: int, S: int, *, seed: int) -> torch.Tensor:
    """``[B, S]`` seeded random text ids, never an image / video id of a VL config (nor 0 there)."""
    reserved = set(vision_special_ids(cfg))
    allowed = torch.tensor([i for i in range(1 if reserved else 0, vocab) if i not in reserved])
    return allowed[torch.randint(0, len(allowed), (B, S), generator=torch.Generator().manual_seed(seed))]


def prompt_batch(prompt_ids, cfg, vocab: int, image, processor_dir) -> Batch:
    """The ids a comparison runs: the given rows, or 2×16 seeded random ids (below the VL special ids for VL); an
    ``image`` goes in the middle of the first row."""
    if prompt_ids is None:
        ids = random_text_ids(cfg, vocab, 2, 16, seed=0)
    else:
        ids = torch.as_tensor(prompt_ids, dtype=torch.long)
        if ids.dim() == 1:
            ids = ids.unsqueeze(0)
        if ids.dim() != 2 or ids.numel() == 0:
            raise PromptError("prompt_ids must be a non-empty list of equal-length rows of token ids")
        if int(ids.min()) < 0 or int(ids.max()) >= vocab:
            raise PromptError(f"prompt_ids must lie in [0, {vocab}); got [{int(ids.min())}, {int(ids.max())}]")
    if cfg is not None and cfg.family == "vl":
        check_text_ids(ids.reshape(-1).tolist(), cfg, "prompt_ids")
    if image is None:
        return Batch(ids)
    if cfg is None or cfg.family != "vl":
        raise PromptError("--image needs VL checkpoints")
    pixels, grid = image_inputs(image, cfg, processor_dir)
    row = ids[0].tolist()
    half = len(row) // 2
    return Batch(torch.tensor([row[:half] + image_block(cfg, grid) + row[half:]]), pixels, grid)
