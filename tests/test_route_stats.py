"""``ernie45 route-stats``: expert load counted by Megatron-Core equals transformers' own router choices.

* text MoE (the embedded tiny checkpoint, converted to torch_dist, prompts tokenized by its tokenizer): per-layer
  counts equal those of transformers' routers on the same prompts; the CSVs are consistent with the counts; and
  the committed ``docs/route_stats.csv`` is what the current code produces (from the torch_dist copy, so HF and
  torch_dist inputs agree too);
* VL with images (no tokenizer: prompts are ids): vision-pool token counts are exactly the images' tokens and the
  per-pool counts equal transformers';
* refusals name the file / line.
"""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
import torch

from ernie45.assets import embedded_checkpoint
from ernie45.convert import convert
from ernie45.cli import main
from ernie45.route_stats import RouteStatsError, route_stats
from ernie45.testing import write_tiny_checkpoint
from ernie45.testing_tokenizer import TINY_CORPUS

DOCS = Path(__file__).resolve().parents[1] / "docs"


def _rows(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_text_moe_counts_match_transformers_and_docs(tmp_path, capsys):
    import transformers

    from ernie45.config import load_config
    from ernie45.reference import load_reference

    src = embedded_checkpoint("tiny-ernie45-moe")
    mg = tmp_path / "mg"
    convert(src, mg, to="megatron", tp=2, ep=2, progress=False)  # side files (the tokenizer) travel with it
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(TINY_CORPUS) + "\n\n")  # the trailing empty line is skipped
    assert main(["route-stats", str(mg), "--prompts", str(prompts), "--out", str(tmp_path / "out")]) == 0
    assert "wrote" in capsys.readouterr().out
    out = tmp_path / "out"

    # the oracle: transformers' routers on the same token ids (each gate's selected_experts, counted here)
    cfg = load_config(src)
    tok = transformers.AutoTokenizer.from_pretrained(str(src))
    model = load_reference(src)
    want: dict[int, torch.Tensor] = {}
    n_tokens = 0
    for line in TINY_CORPUS:
        ids = torch.tensor([tok(line)["input_ids"]])
        n_tokens += ids.shape[1]
        seen = {}
        hooks = [model.model.layers[L].mlp.gate.register_forward_hook(
                     lambda _m, _i, out, L=L: seen.__setitem__(L, out[2])) for L in cfg.moe_layers]  # fmt: skip
        with torch.no_grad():
            model(input_ids=ids)
        for h in hooks:
            h.remove()
        for L, idx_NK in seen.items():
            want[L] = want.get(L, 0) + torch.bincount(idx_NK.reshape(-1), minlength=cfg.moe_num_experts)
    rows = _rows(out / "route_stats.csv")
    got: dict[int, list[int]] = {}
    for r in rows:
        assert r["pool"] == "text" and int(r["tokens"]) == n_tokens
        got.setdefault(int(r["layer"]), []).append(int(r["assignments"]))
    assert got == {L: c.tolist() for L, c in want.items()} and sorted(got) == [1, 2, 3, 4, 5]
    for L, counts in got.items():
        assert sum(counts) == n_tokens * 3  # top-3
    assert sum(float(r["load"]) for r in rows if r["layer"] == "1") == pytest.approx(1.0, abs=1e-5)

    imb = {int(r["layer"]): r for r in _rows(out / "route_imbalance.csv")}
    for L, counts in got.items():
        c = torch.tensor(counts, dtype=torch.float64)
        assert float(imb[L]["max_over_mean"]) == pytest.approx((c.max() / c.mean()).item(), abs=1e-6)
        assert float(imb[L]["cv"]) == pytest.approx((c.std(unbiased=False) / c.mean()).item(), abs=1e-6)

    from PIL import Image

    with Image.open(out / "route_stats.png") as im:
        assert im.format == "PNG" and im.size[0] > 300 and im.size[1] > 300

    # the committed figure's data is current (tools/make_route_stats_figure.py regenerates it from the HF copy)
    for name in ("route_stats.csv", "route_imbalance.csv"):
        stale = f"docs/{name} is stale: run tools/make_route_stats_figure.py"
        assert (out / name).read_bytes() == (DOCS / name).read_bytes(), stale


def test_vl_with_images_counts_each_pool(tmp_path):
    from PIL import Image

    from ernie45.config import load_config
    from ernie45.megatron.vl_inputs import token_type_ids
    from ernie45.inputs import image_block, image_inputs
    from ernie45.runtime import TransformersRuntime

    hf = write_tiny_checkpoint(tmp_path / "vl", "vl", seed=6)  # no tokenizer: prompts are token ids
    cfg = load_config(hf)
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(3, 150, (n,), generator=g).tolist() for n in (7, 5, 9)]
    (tmp_path / "prompts.txt").write_text("".join(" ".join(map(str, p)) + "\n" for p in prompts))
    images = tmp_path / "images"
    images.mkdir()
    for name, (h, w) in (("a.png", (56, 56)), ("b.jpg", (84, 112))):  # 2x2 and 3x4 merged tokens
        Image.fromarray((torch.rand(h, w, 3, generator=g) * 255).to(torch.uint8).numpy()).save(images / name)
    (images / "notes.txt").write_text("not an image")
    stats = route_stats(hf, tmp_path / "prompts.txt", images_dir=images, out_dir=tmp_path / "out")

    assert stats.sequences == 3
    assert {p for _, p in stats.counts} == {"text", "vision"}
    for L in cfg.moe_layers:
        assert stats.tokens[(L, "vision")] == (4 + 2) + (12 + 2)  # placeholders + start/end per image
        assert stats.tokens[(L, "text")] == 7 + 5 + 9
        assert sum(stats.counts[(L, "vision")]) == stats.tokens[(L, "vision")] * cfg.moe_k

    # oracle: transformers' two routers per layer, fed the same sequences (image k before prompt k)
    want = {}
    rt = TransformersRuntime(hf, cfg)
    for k, ids in enumerate(prompts):
        kw = {}
        if k < 2:
            pixels, grid = image_inputs(sorted(images.glob("*.[pj]*g"))[k], cfg)
            ids = image_block(cfg, grid) + ids
            kw = dict(pixel_values=pixels, image_grid_thw=grid)
        ids = torch.tensor([ids])
        mm, moe = token_type_ids(ids, cfg)
        seen = {}
        hooks = [getattr(rt.model.model.language_model.layers[L].mlp, f"{pool}_moe").gate.register_forward_hook(
                     lambda _m, _i, out, key=(L, pool): seen.__setitem__(key, out[2]))
                 for L in cfg.moe_layers for pool in ("text", "vision")]  # fmt: skip
        with torch.no_grad():
            rt.model(input_ids=ids, mm_token_type_ids=mm, moe_mm_token_type_ids=moe, **kw)
        for h in hooks:
            h.remove()
        for key, idx_NK in seen.items():
            want[key] = want.get(key, 0) + torch.bincount(idx_NK.reshape(-1), minlength=cfg.moe_num_experts)
    assert stats.counts == {key: c.tolist() for key, c in want.items()}


def test_refusals_name_the_problem(tmp_path):
    moe = embedded_checkpoint("tiny-ernie45-moe")
    prompts = tmp_path / "p.txt"
    prompts.write_text("1 2 3\n")
    gguf = tmp_path / "m.gguf"
    convert(moe, gguf, to="gguf", progress=False)
    with pytest.raises(RouteStatsError, match="llama.cpp does not expose"):
        route_stats(gguf, prompts, out_dir=tmp_path / "o")
    with pytest.raises(RouteStatsError, match="dense model has no experts"):
        route_stats(embedded_checkpoint("tiny-ernie45-dense"), prompts, out_dir=tmp_path / "o")
    with pytest.raises(RouteStatsError, match="--images needs a VL checkpoint"):
        route_stats(moe, prompts, images_dir=tmp_path, out_dir=tmp_path / "o")
    bare = write_tiny_checkpoint(tmp_path / "bare", "moe", seed=1)  # no tokenizer
    prompts.write_text("1 2 3\n\nthe fox\n")
    with pytest.raises(RouteStatsError, match=r"p\.txt:3: the checkpoint has no tokenizer"):
        route_stats(bare, prompts, out_dir=tmp_path / "o")
