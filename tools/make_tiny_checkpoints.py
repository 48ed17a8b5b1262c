"""Regenerate the embedded tiny checkpoints under ernie45/assets/ (deterministic: fixed seeds, real transformers).

    .venv/bin/python tools/make_tiny_checkpoints.py

They are what the README's main command runs on. Every parameter and buffer is re-randomised (expert bias and norm
weights included), so parity printed on them is a real check.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from transformers import AutoTokenizer

from ernie45.assets import ASSETS, EMBEDDED, chat_template
from ernie45.config import load_config
from ernie45.testing import write_tiny_checkpoint
from ernie45.testing_tokenizer import VL_CONTROL_TOKENS, write_tiny_tokenizer


def write_chat_template(out: Path, family: str) -> None:
    """Put the family's ERNIE-style chat template into tokenizer_config.json, as the released checkpoints carry it."""
    path = out / "tokenizer_config.json"
    tok_cfg = json.loads(path.read_text())
    tok_cfg["chat_template"] = chat_template(family)
    path.write_text(json.dumps(tok_cfg, indent=2, sort_keys=True) + "\n")


def main() -> None:
    for name, (family, seed, overrides) in EMBEDDED.items():
        out = ASSETS / name
        if out.exists():
            shutil.rmtree(out)
        write_tiny_checkpoint(out, family, seed=seed, **overrides)
        cfg = load_config(out)
        write_tiny_tokenizer(out, cfg.vocab_size, vl=family == "vl")
        write_chat_template(out, family)
        if family == "vl":  # the config's image / video ids are the tokenizer's VL control pieces
            tok = AutoTokenizer.from_pretrained(out)
            want = [cfg.special_ids[k] for k in ("image_start_token_id", "image_end_token_id", "image_token_id",
                                                  "video_start_token_id", "video_end_token_id", "video_token_id")]
            if tok.convert_tokens_to_ids(list(VL_CONTROL_TOKENS)) != want:
                raise SystemExit(f"{out}: VL token ids {want} are not the tokenizer's {VL_CONTROL_TOKENS}")
        print(f"wrote {out} ({sum(f.stat().st_size for f in out.iterdir()) / 1e3:.0f} kB)")


if __name__ == "__main__":
    main()
