"""Tiny ERNIE 4.5 checkpoints shipped with the package (written by ``tools/make_tiny_checkpoints.py``)."""

from __future__ import annotations

from pathlib import Path

ASSETS = Path(__file__).parent
# name -> (family, seed, overrides of ernie45.testing.TINY). The MoE one has the released 21B's shape of pattern
# (a dense first layer, then MoE to the end, tied head), which llama.cpp can represent; the VL one is untied like
# the 424B, with pools of different widths.
EMBEDDED = {
    "tiny-ernie45-moe": ("moe", 11, dict(moe_layer_interval=1, tie_word_embeddings=True)),
    "tiny-ernie45-dense": ("dense", 12, {}),
    # image / video ids = the tokenizer's VL control pieces (testing_tokenizer.VL_CONTROL_TOKENS), so no text
    # prompt ever tokenizes into them
    "tiny-ernie45-vl": ("vl", 13, dict(image_start_token_id=5, image_end_token_id=6, image_token_id=7,
                                       video_start_token_id=8, video_end_token_id=9, video_token_id=10)),
}
DEFAULT = "tiny-ernie45-moe"


def embedded_checkpoint(name: str = DEFAULT) -> Path:
    if name not in EMBEDDED:
        raise KeyError(f"no embedded checkpoint {name!r}; have {sorted(EMBEDDED)}")
    return ASSETS / name


# the chat template each family's tokenizer_config.json carries (tools/make_tiny_checkpoints.py writes it there)
CHAT_TEMPLATES = {"dense": "ernie45_text.jinja", "moe": "ernie45_text.jinja", "vl": "ernie45_vl.jinja"}
SFT_SETS = {"text": ASSETS / "sft" / "tiny_chat.jsonl", "vl": ASSETS / "sft" / "tiny_vl_chat.jsonl"}


def chat_template(family: str) -> str:
    """The ERNIE-style chat template (Jinja) of ``family`` ("dense", "moe", "vl")."""
    return (ASSETS / "chat_templates" / CHAT_TEMPLATES[family]).read_text()


def sft_set(kind: str = "text") -> Path:
    """The tiny shipped chat SFT set: ``"text"`` (short multi-turn conversations inside the tiny tokenizer's
    alphabet) or ``"vl"`` (the same kind of turns around small PNGs shipped beside it)."""
    if kind not in SFT_SETS:
        raise KeyError(f"no shipped SFT set {kind!r}; have {sorted(SFT_SETS)}")
    return SFT_SETS[kind]
