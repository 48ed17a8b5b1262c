"""LoRA on the Megatron models (``ernie45.train.lora``) and its PEFT export (``ernie45.train.peft_export``).

Oracles: the merged model (``W + (α/r)·B·A``) and transformers + peft (``PeftModel.from_pretrained`` of the exported
adapter onto the transformers model). Adapters are random and non-zero in both A and B (``lora_worker.fill_adapters``),
base checkpoints are re-randomised tiny models (expert bias and norms included, ``ernie45.testing``); each check
also asserts that the adapters move the logits, so an adapter that did nothing could not pass.
"""

from __future__ import annotations

import dataclasses
import json
import shutil

import pytest
import torch
import torch.multiprocessing as mp

from conftest import free_port
from lora_worker import (
    ALPHA,
    DTYPE,
    LAYOUTS,
    RANK,
    TARGETS,
    build,
    fill_adapters,
    logits,
    text_batch,
    vl_batch,
    worker,
)

TOL = 1e-5
ALL = ("attn", "mlp", "shared", "experts", "vision_experts", "vit", "resampler")


@pytest.fixture(scope="module")
def vl_dir(tmp_path_factory):
    from ernie45.testing import write_tiny_checkpoint

    return write_tiny_checkpoint(tmp_path_factory.mktemp("lora-vl") / "vl", "vl", seed=1)


@pytest.fixture(scope="module")
def sources(tiny_ckpts, vl_dir):
    return {"dense": tiny_ckpts["dense"], "moe": tiny_ckpts["moe"], "vl": vl_dir}


def _lora_model(family, src, targets, *, vit_impl="hf", dtype=DTYPE):
    from ernie45.config import load_config
    from ernie45.layout import Layout
    from ernie45.train.lora import apply_lora

    cfg = load_config(src)
    if family == "vl":
        cfg = dataclasses.replace(cfg, vit_impl=vit_impl)
    chunks = build(family, cfg, Layout(), src, tied=cfg.tie_word_embeddings, dtype=dtype)
    apply_lora(chunks, cfg, Layout(), rank=RANK, alpha=ALPHA, targets=targets, seed=1)
    return cfg, chunks


def _hf_logits(model, family, batch):
    with torch.no_grad():
        return (model(**batch) if family == "vl" else model(input_ids=batch)).logits


# ----------------------------------------------------------------------------------------------------------------------
# one process: LoRA == merged == transformers + peft


CASES = {
    "dense": ("dense", ("attn", "mlp"), "hf"),
    "moe": ("moe", ("attn", "mlp", "shared", "experts"), "hf"),
    "vl": ("vl", ALL, "hf"),
    "vl-mgvit": ("vl", ALL, "megatron"),
}


@pytest.mark.parametrize("case", CASES)
def test_lora_equals_merged_and_peft(case, world1, sources, tmp_path):
    """TP1: the LoRA model's logits equal the merged model's, and transformers + peft with the exported adapter."""
    from peft import PeftModel

    from ernie45.layout import Layout
    from ernie45.reference import load_reference
    from ernie45.train.lora import merge_lora
    from ernie45.inspect import inspect_path
    from ernie45.train.peft_export import describe_adapter_dir, export_peft_adapter

    family, targets, vit = CASES[case]
    src = sources[family]
    cfg, chunks = _lora_model(family, src, targets, vit_impl=vit)
    batch = vl_batch(cfg, 3) if family == "vl" else text_batch(cfg, 3)
    base = logits(family, chunks, cfg, batch)  # B = 0: the base model
    fill_adapters(chunks, seed=5)
    lora = logits(family, chunks, cfg, batch)

    warnings = export_peft_adapter(chunks, cfg, Layout(), tmp_path / "peft", base_model=str(src))
    assert warnings == []
    config = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert config["target_parameters" if family != "dense" else "target_modules"]
    facts = describe_adapter_dir(tmp_path / "peft")
    assert inspect_path(tmp_path / "peft") == facts  # ernie45 inspect recognises the adapter directory
    assert facts["format"] == "peft lora adapter" and facts["rank"] == RANK
    n_adapter = sum(p.numel() for n, p in chunks[0].named_parameters() if ".lora." in n)
    if family == "dense":  # q/k/v and gate/up export their parts of A; nothing else is duplicated or dropped
        assert facts["adapter parameters"] == n_adapter
    assert config["r"] == RANK and config["lora_alpha"] == ALPHA and config["peft_type"] == "LORA"
    peft_model = PeftModel.from_pretrained(load_reference(src, dtype=DTYPE), str(tmp_path / "peft")).eval()
    via_peft = _hf_logits(peft_model, family, batch)

    merge_lora(chunks)
    assert not any(".lora." in n for n, _ in chunks[0].named_parameters())
    merged = logits(family, chunks, cfg, batch)

    effect = (lora - base).abs().max().item()
    d_merged = (lora - merged).abs().max().item()
    d_peft = (lora - via_peft).abs().max().item()
    print(f"{case}: adapters move logits by {effect:.3g}; |LoRA - merged| {d_merged:.3g}, |LoRA - peft| {d_peft:.3g}")
    assert effect > 0.1
    assert d_merged <= TOL and d_peft <= TOL


# ----------------------------------------------------------------------------------------------------------------------
# two processes: TP2, EP2, TP2·EP2; adapter checkpoint resumed at another layout


@pytest.fixture(scope="module")
def train_setup(tmp_path_factory):
    """The LoRA training run's checkpoint, data and flags (shared by the 1- and the 2-process run)."""
    from ernie45.testing import write_tiny_checkpoint
    from train_worker import write_pretokenized

    root = tmp_path_factory.mktemp("lora-train")
    ck = write_tiny_checkpoint(root / "moe", "moe", seed=1)
    vocab = json.loads((ck / "config.json").read_text())["vocab_size"]
    records = write_pretokenized(root / "data.jsonl", 6, vocab=vocab, seed=2)
    # Adam eps 1e-2: B starts at 0 and is only ~lr-sized after 5 steps, and where |grad| is small Adam's update is
    # ~lr·grad/(|grad| + eps): the ~1e-6 relative gradient agreement (checked at step 1) reaches B magnified by
    # ~max|grad|/eps relative to B's size (eps 1e-4 gave 2.4e-5 on B after 5 steps, 1e-3 gave 9.7e-6)
    common = dict(model=str(ck), data=[str(root / "data.jsonl")], steps=5, lr=2e-3, min_lr=2e-4, warmup=1,
                  schedule="cosine", weight_decay=0.1, adam_eps=1e-2, clip_grad=1.0, seq_length=16, micro_batch=2,
                  global_batch=4, shuffle=False, pack=False, progress=False)  # fmt: skip
    lora = dict(lora=RANK, lora_alpha=ALPHA, lora_targets=list(TARGETS["moe"]))
    return root, ck, records, common, lora


@pytest.fixture(scope="module")
def dist_results(sources, train_setup, tmp_path_factory):
    out = tmp_path_factory.mktemp("lora-dist")
    srcs = {"dense": str(sources["dense"]), "moe": str(sources["moe"]), "vl": str(sources["vl"]),
            "vl-mgvit": str(sources["vl"])}  # fmt: skip
    # and the LoRA training run at EP2 (data parallel 2: dense adapters reduced by Megatron's DDP, expert adapters
    # on their EP rank, not reduced over data parallel), compared with the 1-process run below
    root, _, _, common, lora = train_setup
    ep2 = dict(common, **lora, out=str(root / "run-ep2"), save_peft=str(root / "peft-ep2"), ep=2, save_every=3)
    mp.spawn(worker, args=(free_port(), srcs, str(out), ep2), nprocs=2, join=True)
    results = json.loads((out / "results.json").read_text())
    assert "error" not in results, results.get("error")
    return results


DIST_CASES = [f"{fam}-{name}" for name, (_, fams) in LAYOUTS.items() for fam in fams]


@pytest.mark.parametrize("case", DIST_CASES)
def test_layout_lora_equals_merged_and_tp1(case, dist_results):
    r = dist_results[case]
    print(case, r)
    assert r["effect"] > 0.1, r
    assert r["vs_merged"] <= TOL and r["vs_tp1"] <= TOL, r
    assert r["n_grads"] > 0 and r["grads_rel"] <= TOL, r


@pytest.mark.parametrize("family", ["moe", "vl", "vl-mgvit"])
def test_adapter_checkpoint_resumes_at_another_layout(family, dist_results):
    """Saved at TP2·EP2 by Megatron's dist_checkpointing, loaded at TP1 into fresh adapters: same logits."""
    r = dist_results[f"{family}-resume-TP2xEP2-at-TP1"]
    assert r["vs_tp1"] <= TOL, r


# ----------------------------------------------------------------------------------------------------------------------
# freezing, merged export to GGUF, describe


def test_base_frozen_and_bit_identical_after_a_step(world1, sources):
    cfg, chunks = _lora_model("moe", sources["moe"], TARGETS["moe"], dtype=torch.float32)
    before = {n: p.detach().clone() for n, p in chunks[0].named_parameters() if ".lora." not in n}
    adapters = {n: p for n, p in chunks[0].named_parameters() if ".lora." in n}
    assert adapters and all(p.requires_grad for p in adapters.values())
    assert not any(p.requires_grad for n, p in chunks[0].named_parameters() if n in before)
    fill_adapters(chunks, seed=3)
    start = {n: p.detach().clone() for n, p in adapters.items()}
    opt = torch.optim.AdamW([p for p in chunks[0].parameters() if p.requires_grad], lr=1e-2)
    from ernie45.megatron.run import forward_backward

    ids = text_batch(cfg, 4)
    forward_backward(chunks, ids, torch.roll(ids, -1, dims=1))
    opt.step()
    for n, p in chunks[0].named_parameters():
        if n in before:
            assert p.grad is None, n
            assert p.dtype == before[n].dtype and p.shape == before[n].shape, n
            assert p.detach().numpy().tobytes() == before[n].numpy().tobytes(), n
    assert all(p.grad is not None for p in adapters.values())
    assert all(not torch.equal(p, start[n]) for n, p in adapters.items())
    assert len(opt.state) == len(adapters)  # optimizer state for the adapters only


def test_dropout_acts_in_training_only_and_not_on_routed_experts(world1, sources):
    from ernie45.config import load_config
    from ernie45.layout import Layout
    from ernie45.train.lora import adapted_modules, apply_lora

    cfg = load_config(sources["moe"])
    chunks = build("moe", cfg, Layout(), sources["moe"], tied=cfg.tie_word_embeddings)
    apply_lora(chunks, cfg, Layout(), rank=RANK, alpha=ALPHA, dropout=0.5, targets=TARGETS["moe"], seed=1)
    fill_adapters(chunks, seed=2)
    kinds = {n: type(m.lora.dropout).__name__ for n, m in adapted_modules(chunks[0])}
    assert {k for n, k in kinds.items() if ".local_experts." in n} == {"Identity"}
    assert {k for n, k in kinds.items() if ".local_experts." not in n} == {"Dropout"}
    from ernie45.megatron.model import causal_mask

    ids = text_batch(cfg, 1)
    positions, mask = torch.arange(ids.shape[1]).expand_as(ids), causal_mask(ids.shape[1])
    chunks[0].train()
    with torch.no_grad():
        a, b = (chunks[0](ids, positions, mask) for _ in range(2))  # no labels: logits
    assert (a - b).abs().max().item() > 1e-3  # fresh masks each forward
    assert torch.equal(logits("moe", chunks, cfg, ids), logits("moe", chunks, cfg, ids))  # eval: none


def test_merged_export_converts_to_gguf(world1, sources, tmp_path):
    """merge_lora + the existing exporter give an HF checkpoint with the merged weights, which converts to GGUF and
    reads back with those weights."""
    from ernie45.bridge.gguf import read_gguf_as_hf
    from ernie45.bridge.io import HFCheckpoint
    from ernie45.bridge.live import export_hf
    from ernie45.convert import convert
    from ernie45.layout import Layout
    from ernie45.train.lora import merge_lora

    from ernie45.testing import write_tiny_checkpoint

    # llama.cpp's ernie4_5-moe runs "N dense layers, then MoE": the tiny MoE with every layer after the first sparse
    src = write_tiny_checkpoint(tmp_path / "hf", "moe", seed=4, moe_layer_interval=1)
    cfg, chunks = _lora_model("moe", src, TARGETS["moe"], dtype=torch.float32)
    fill_adapters(chunks, seed=6)
    qkv = chunks[0].decoder.layers[1].self_attention.linear_qkv
    expected_q = qkv.lora.merged_weight(qkv.weight)[: cfg.num_attention_heads // cfg.num_key_value_heads * cfg.head_dim]
    merge_lora(chunks)
    export_hf(chunks, cfg, Layout(), tmp_path / "merged", tied=cfg.tie_word_embeddings, side_files_from=src)
    merged, src = HFCheckpoint(tmp_path / "merged"), HFCheckpoint(src)
    assert sorted(merged.keys()) == sorted(src.keys())
    name = "model.layers.1.self_attn.q_proj.weight"
    assert merged.dtype(name) == src.dtype(name)
    assert torch.equal(merged.get(name)[: expected_q.shape[0]], expected_q)  # first KV group's query rows
    assert not torch.equal(merged.get(name), src.get(name))
    convert(tmp_path / "merged", tmp_path / "m.gguf", to="gguf", progress=False)
    back = read_gguf_as_hf(tmp_path / "m.gguf")
    for key in ("model.layers.2.mlp.experts.3.up_proj.weight", "model.layers.0.mlp.down_proj.weight",
                "model.layers.1.mlp.shared_experts.gate_proj.weight"):
        assert torch.equal(back[key], merged.get(key).float()), key


def test_adapter_dir_bad_input(tmp_path):
    from ernie45.bridge.io import CheckpointError
    from ernie45.train.peft_export import describe_adapter_dir

    (tmp_path / "adapter_config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="adapter_config.json: not a readable adapter config"):
        describe_adapter_dir(tmp_path)
    (tmp_path / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 4}))
    with pytest.raises(CheckpointError, match="adapter_model.safetensors: missing"):
        describe_adapter_dir(tmp_path)
    (tmp_path / "adapter_model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00garbage!")
    with pytest.raises(CheckpointError, match="adapter_model.safetensors: not a readable safetensors file"):
        describe_adapter_dir(tmp_path)


@pytest.mark.llama
def test_merged_lora_gguf_runs_in_llama_cpp(world1, tmp_path):
    """The llama target (``.ci/run``): the merged LoRA export as an f32 GGUF in real llama.cpp gives the logits of
    transformers + peft with the exported adapter (settings and tolerance as tests/test_llama_cpp.py)."""
    llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python not installed (the llama target)")
    import numpy as np
    from peft import PeftModel

    from ernie45.bridge.live import export_hf
    from ernie45.convert import convert
    from ernie45.layout import Layout
    from ernie45.reference import load_reference
    from ernie45.testing import write_tiny_checkpoint
    from ernie45.train.lora import merge_lora
    from ernie45.train.peft_export import export_peft_adapter

    # llama.cpp's ernie4_5-moe: a dense first layer, then every layer MoE
    src = write_tiny_checkpoint(tmp_path / "hf", "moe", seed=12, hidden_size=96, moe_layer_interval=1)
    cfg, chunks = _lora_model("moe", src, TARGETS["moe"], dtype=torch.float32)
    fill_adapters(chunks, seed=7)
    export_peft_adapter(chunks, cfg, Layout(), tmp_path / "peft", base_model=str(src))
    merge_lora(chunks)
    export_hf(chunks, cfg, Layout(), tmp_path / "merged", tied=cfg.tie_word_embeddings, side_files_from=src)
    convert(tmp_path / "merged", tmp_path / "m.gguf", to="gguf", outtype="f32", progress=False)
    oracle = PeftModel.from_pretrained(load_reference(src), str(tmp_path / "peft")).eval()
    # f32 K/V cache (GGML type 0) and no flash attention: llama.cpp's f16 defaults would measure f16 rounding
    llm = llama_cpp.Llama(str(tmp_path / "m.gguf"), n_ctx=64, logits_all=True, type_k=0, type_v=0, flash_attn=False,
                          n_threads=2, seed=0, verbose=False)  # fmt: skip
    base = load_reference(src).eval()
    g = torch.Generator().manual_seed(0)
    for n in (5, 24, 40):
        ids = torch.randint(3, cfg.vocab_size, (n,), generator=g).tolist()
        llm.reset()
        llm.eval(ids)
        got = np.array(llm.scores[:n], dtype=np.float32)
        with torch.no_grad():
            ref = oracle(input_ids=torch.tensor([ids])).logits[0].float().numpy()
            untouched = base(input_ids=torch.tensor([ids])).logits[0].float().numpy()
        assert np.abs(ref - untouched).max() > 0.1  # the adapters matter
        np.testing.assert_allclose(got, ref, rtol=0, atol=1e-4, err_msg=f"prompt {ids}")


def test_describe_and_bad_targets(sources):
    from ernie45.config import ErnieConfig, load_config
    from ernie45.testing import tiny_hf_config
    from ernie45.train.lora import LoraError
    from ernie45.train.peft_export import describe_lora

    vl = ErnieConfig.from_hf(tiny_hf_config("vl"))
    text = describe_lora(vl, rank=4, targets=ALL)
    for group in ALL:
        assert group in text
    assert "every target group is expressible" in text
    # the counts come from the bridge table: 4 layers x (qkv + proj) attention linears
    assert "attn            adapted           8 linears" in text
    moe = load_config(sources["moe"])
    assert "lora_dropout=0" in describe_lora(moe, rank=4, targets=TARGETS["moe"], dropout=0.1)
    with pytest.raises(LoraError, match="unknown LoRA target group.*'mpl'"):
        describe_lora(moe, rank=4, targets=("attn", "mpl"))
    with pytest.raises(LoraError, match="do not exist in this moe model"):
        describe_lora(moe, rank=4, targets=("attn", "vision_experts"))


# ----------------------------------------------------------------------------------------------------------------------
# ernie45 train --lora == transformers + peft + torch.optim.AdamW


def _dir_bytes(path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def _initial_adapter(family, cfg, ck, targets, seed, out):
    """The trainer's starting adapters (apply_lora draws A from the seed and each adapter's global name; B = 0),
    exported as a PEFT adapter, and the base weights, from a TP1 model built like the trainer's."""
    from megatron.core import parallel_state as ps

    from ernie45.layout import Layout
    from ernie45.megatron import parallel
    from ernie45.train.lora import apply_lora
    from ernie45.train.peft_export import export_peft_adapter

    if ps.model_parallel_is_initialized():  # the module's world1 groups: train() builds its own
        parallel.destroy()
    parallel.initialize(Layout())
    start = build(family, cfg, Layout(), ck, tied=cfg.tie_word_embeddings, dtype=torch.float32)
    base = {n: p.detach().clone() for n, p in start[0].named_parameters()}
    apply_lora(start, cfg, Layout(), rank=RANK, alpha=ALPHA, targets=targets, seed=seed)
    export_peft_adapter(start, cfg, Layout(), out, base_model=str(ck))
    parallel.destroy()
    return base


def _peft_adamw(ck, init_dir, samples, common):
    """The oracle: transformers + peft (the adapter in ``init_dir``) + torch AdamW with Megatron's schedule, clip
    and decay (every adapter is 2-D, so every one decays). Returns (losses, step-1 clipped grads, adapters)."""
    from peft import PeftModel
    from peft.utils import get_peft_model_state_dict

    from ernie45.reference import load_reference
    from train_worker import adamw_steps, lr_at

    model = PeftModel.from_pretrained(load_reference(ck), str(init_dir), is_trainable=True)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=common["lr"], betas=(0.9, 0.999), eps=common["adam_eps"],
                            weight_decay=common["weight_decay"])  # fmt: skip
    steps, grads = common["steps"], {}

    def after_clip(step):
        if step == 1:
            grads.update({k.replace(".default", ""): v.grad.clone() for k, v in model.named_parameters()
                          if v.requires_grad})  # fmt: skip

    losses, _ = adamw_steps(
        model, opt, samples, steps=steps, global_batch=common["global_batch"], clip=common["clip_grad"],
        after_clip=after_clip, lr_of=lambda s, g: lr_at(s, lr=common["lr"], min_lr=common["min_lr"],
                                                        warmup=common["warmup"], total=steps, schedule=common["schedule"]),
    )  # fmt: skip
    return losses, grads, {k.replace(".default", ""): v for k, v in get_peft_model_state_dict(model).items()}


def _first_step_grads(cfg, into: dict):
    """on_step callback: the clipped gradients of step 1, under peft's names."""
    from ernie45.train.peft_export import gather_adapters, peft_tensors

    def on_step(step, chunks):
        if step == 1:
            full = gather_adapters(chunks, cfg, getter=lambda p: p.grad.clone())
            into.update(peft_tensors(full, torch.float32, cfg.family)[0])

    return on_step


def test_lora_training_equals_transformers_peft_adamw(gloo_world, train_setup, dist_results, tmp_path):
    """5 steps of ``train(lora=4)`` on the tiny MoE (attention, dense MLP, shared and routed experts adapted) against
    peft + AdamW started from the same adapters (the trainer's initial ones, exported): losses, first-step gradients
    and the trained adapters agree; every base weight is bit-identical afterwards and never had a gradient. The same
    run on 2 processes at EP2 (``dist_results``) gives the same losses and adapters."""
    from safetensors.torch import load_file

    from ernie45.config import load_config
    from ernie45.train.checkpoint import step_dir
    from ernie45.train.config import TrainConfig
    from ernie45.train.trainer import train
    from train_worker import hf_sample, worst_relative

    root, ck, records, common, lora = train_setup
    steps = common["steps"]
    cfg = load_config(ck)
    config = TrainConfig.from_mapping(dict(common, **lora, out=str(tmp_path / "run"), save_peft=str(tmp_path / "peft")))
    base = _initial_adapter("moe", cfg, ck, TARGETS["moe"], config.seed, tmp_path / "init")

    frozen, grads = {}, {}
    first_step = _first_step_grads(cfg, grads)

    def on_step(step, chunks):
        first_step(step, chunks)
        if step == steps:
            for n, p in chunks[0].named_parameters():
                if ".lora." not in n:
                    frozen[n] = (p.grad is None, p.detach().clone())

    res = train(config, on_step=on_step)
    ref_losses, ref_grads, ref_adapters = _peft_adamw(ck, tmp_path / "init", [hf_sample(r) for r in records], common)
    trained = load_file(tmp_path / "peft" / "adapter_model.safetensors")

    print(f"losses {res.losses}\n   ref {ref_losses}")
    g_worst, g_where = worst_relative({k: v for k, v in grads.items() if "lora_B" in k},
                                      {k: v for k, v in ref_grads.items() if "lora_B" in k})  # A: zero grads (B = 0)
    print(f"step-1 gradients of {len(grads)} adapter tensors: worst relative diff {g_worst:.3g} ({g_where})")
    assert sorted(grads) == sorted(ref_grads) and g_worst <= TOL, g_where
    assert len(res.losses) == steps
    assert all(abs(a - b) <= TOL * abs(b) for a, b in zip(res.losses, ref_losses)), (res.losses, ref_losses)
    assert sorted(trained) == sorted(ref_adapters)
    worst, where = worst_relative(trained, ref_adapters)
    init = load_file(tmp_path / "init" / "adapter_model.safetensors")
    moved, _ = worst_relative(*({k: v for k, v in d.items() if "lora_A" in k} for d in (trained, init)))  # B: from 0
    print(f"{len(trained)} adapter tensors after {steps} steps: worst relative diff {worst:.3g} ({where})")
    assert worst <= TOL, where
    assert moved > 100 * TOL

    assert sorted(frozen) == sorted(base)
    for n, (no_grad, value) in frozen.items():
        assert no_grad, n
        assert value.dtype == base[n].dtype and value.shape == base[n].shape, n
        assert value.numpy().tobytes() == base[n].numpy().tobytes(), n

    # the same run on 2 processes at EP2 (dist_results): the same losses and trained adapters
    ep2_losses = dist_results["train"]["losses"]
    ep2_trained = load_file(root / "peft-ep2" / "adapter_model.safetensors")
    ep2_worst, ep2_where = worst_relative(ep2_trained, trained)
    print(f"EP2 run: losses {ep2_losses}; adapters vs 1 process: worst relative diff {ep2_worst:.3g}")
    assert len(ep2_losses) == steps and all(abs(a - b) <= TOL * abs(b) for a, b in zip(ep2_losses, res.losses))
    assert sorted(ep2_trained) == sorted(trained) and ep2_worst <= TOL, ep2_where

    # resume the EP2 run's step-3 checkpoint (adapters + Adam state, saved by 2 processes) in this 1-process run:
    # steps 4 and 5 and the final adapters equal the uninterrupted run's
    resumed = tmp_path / "resumed"
    shutil.copytree(root / "run-ep2", resumed)
    shutil.rmtree(step_dir(resumed, steps))
    (step_dir(resumed, 3).parent / "latest").write_text(step_dir(resumed, 3).name)
    res3 = train(TrainConfig.from_mapping(dict(common, **lora, out=str(resumed), resume=True,
                                               save_peft=str(tmp_path / "peft-resumed"))))  # fmt: skip
    r_worst, r_where = worst_relative(load_file(tmp_path / "peft-resumed" / "adapter_model.safetensors"), trained)
    print(f"resumed at TP1 from the EP2 step-3 checkpoint: losses {res3.losses}; adapters worst relative {r_worst:.3g}")
    assert res3.start_step == 3 and len(res3.losses) == steps - 3
    assert all(abs(a - b) <= TOL * abs(b) for a, b in zip(res3.losses, res.losses[3:]))
    assert r_worst <= TOL, r_where

    # adapter-only checkpoint (adapters + their Adam moments) next to a full fine-tuning one of the same model
    full = train(TrainConfig.from_mapping(dict(common, out=str(tmp_path / "full"), steps=1, warmup=0)))
    lora_bytes, full_bytes = _dir_bytes(step_dir(tmp_path / "run", steps)), _dir_bytes(step_dir(tmp_path / "full", 1))
    n_adapter = sum(t.numel() for t in trained.values())
    print(f"checkpoints: LoRA {lora_bytes:,} bytes ({n_adapter:,} adapter parameters + Adam moments), "
          f"full fine-tuning {full_bytes:,} bytes")
    assert full.steps == 1 and lora_bytes < full_bytes / 2


def test_vl_lora_training_equals_transformers_peft_adamw(gloo_world, tmp_path):
    """Text + image samples, every target group adapted (attention, dense MLP, shared experts, both routed pools,
    the transformers ViT, the resampler): 5 steps of ``train(lora=4)`` against peft + AdamW."""
    from safetensors.torch import load_file

    from ernie45.config import load_config
    from ernie45.testing import write_tiny_checkpoint
    from ernie45.train.config import TrainConfig
    from ernie45.train.trainer import train
    from train_worker import SampleRows, vl_samples, worst_relative

    ck = write_tiny_checkpoint(tmp_path / "vl", "vl", seed=5)
    cfg = load_config(ck)
    samples = vl_samples(cfg, 4, seed=3)
    common = dict(steps=5, lr=2e-3, min_lr=2e-4, warmup=1, schedule="cosine", weight_decay=0.1, adam_eps=1e-2,
                  clip_grad=1.0, seq_length=20, micro_batch=1, global_batch=4, shuffle=False, pack=False)  # fmt: skip
    config = TrainConfig(model=str(ck), data=("in-memory",), out=str(tmp_path / "run"), progress=False, lora=RANK,
                         lora_alpha=ALPHA, lora_targets=ALL, save_peft=str(tmp_path / "peft"), **common)  # fmt: skip
    _initial_adapter("vl", cfg, ck, ALL, config.seed, tmp_path / "init")
    grads = {}
    res = train(config, data=SampleRows(samples, cfg, 20), on_step=_first_step_grads(cfg, grads))
    ref_losses, ref_grads, ref_adapters = _peft_adamw(ck, tmp_path / "init", samples, common)
    trained = load_file(tmp_path / "peft" / "adapter_model.safetensors")

    print(f"vl losses {res.losses}\n      ref {ref_losses}")
    assert all(abs(a - b) <= TOL * abs(b) for a, b in zip(res.losses, ref_losses)), (res.losses, ref_losses)
    g_worst, g_where = worst_relative(*({k: v for k, v in d.items() if "lora_B" in k} for d in (grads, ref_grads)))
    worst, where = worst_relative(trained, ref_adapters)
    print(f"step-1 B gradients worst relative {g_worst:.3g} ({g_where}); {len(trained)} adapters after 5 steps "
          f"{worst:.3g} ({where})")  # fmt: skip
    assert sorted(trained) == sorted(ref_adapters) and any("vision_moe" in k for k in trained)
    assert any("vision_tower" in k for k in trained) and any("resampler_model" in k for k in trained)
    assert g_worst <= TOL, g_where
    assert worst <= TOL, where
