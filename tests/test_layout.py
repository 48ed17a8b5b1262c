"""The pure Layout (``ernie45/layout.py``): which layers each pipeline chunk holds equals Megatron-Core's own
``get_transformer_layer_offset`` / ``get_num_layers_to_build`` (the oracle) over a grid of layouts, and the module
stays free of megatron-core and the model builders."""

from __future__ import annotations

import itertools
import subprocess
import sys

import pytest

from ernie45.config import ErnieConfig
from ernie45.layout import Layout, LayoutError
from ernie45.testing import tiny_hf_config

LAYER_COUNTS = (4, 6, 8, 12)
STAGE_SIZES = (None, 1, 2, 4)  # first= / last= choices


def _grid():
    for L, pp, vpp, first, last in itertools.product(LAYER_COUNTS, (1, 2, 3, 4), (1, 2), STAGE_SIZES, STAGE_SIZES):
        if pp == 1 and (vpp > 1 or first is not None or last is not None):
            continue  # refused by Layout itself (test_layout_refuses_...)
        yield L, Layout(pp=pp, vpp=vpp, first=first, last=last)


def _megatron_ranges(cfg: ErnieConfig, layout: Layout) -> dict[tuple[int, int], range]:
    from megatron.core.transformer.transformer_block import get_num_layers_to_build
    from megatron.core.transformer.transformer_layer import get_transformer_layer_offset

    from ernie45.megatron.model import transformer_config  # the very config the model is built with

    tc = transformer_config(cfg, layout)
    out = {}
    for p, v in itertools.product(range(layout.pp), range(layout.vpp)):
        vp = v if layout.vpp > 1 else None
        offset = get_transformer_layer_offset(tc, vp_stage=vp, pp_rank=p)
        out[p, v] = range(offset, offset + get_num_layers_to_build(tc, vp_stage=vp, pp_rank=p))
    return out


def test_stage_layers_equal_megatron():
    compared = refused = 0
    for L, layout in _grid():
        cfg = ErnieConfig.from_hf(tiny_hf_config("dense", num_hidden_layers=L))
        try:
            layout.validate(cfg)
        except LayoutError:
            refused += 1
            continue
        ours = {(p, v): layout.stage_layers(cfg, p, v) for p in range(layout.pp) for v in range(layout.vpp)}
        assert ours == _megatron_ranges(cfg, layout), f"{layout}, {L} layers"
        owner = layout.layer_owner(cfg)
        assert sorted(owner) == list(range(L))
        compared += 1
    # the grid covers even, uneven and interleaved layouts, and layouts that cannot hold the model
    assert compared > 100 and refused > 100, (compared, refused)


def test_uneven_interleaved_layout_by_hand():
    cfg = ErnieConfig.from_hf(tiny_hf_config("dense", num_hidden_layers=12))
    layout = Layout(pp=3, vpp=2, first=2, last=2)  # rank sizes 2, 8, 2; chunks of 1, 4, 1 layers
    ranges = [[list(layout.stage_layers(cfg, p, v)) for v in range(2)] for p in range(3)]
    assert ranges == [[[0], [6]], [[1, 2, 3, 4], [7, 8, 9, 10]], [[5], [11]]]


@pytest.mark.parametrize(
    "kw, L, match",
    [
        (dict(pp=4), 6, "does not divide num_hidden_layers"),
        (dict(pp=2, vpp=2, first=1), 6, "multiple of VPP"),
        (dict(pp=4, first=1, last=1), 5, "leave 3 layers for 2 middle stages"),
        (dict(pp=3, first=2, last=2), 4, "leave 0 layers for 1 middle stages"),  # Megatron's config refuses it
        (dict(pp=2, vpp=2, first=2, last=4), 6, "needs a middle stage"),  # Megatron's offset divides by zero
        (dict(pp=4, vpp=2), 6, "more stages"),
    ],
)
def test_stage_layers_refuse_cuts_that_do_not_fit(kw, L, match):
    cfg = ErnieConfig.from_hf(tiny_hf_config("dense", num_hidden_layers=L))
    with pytest.raises(LayoutError, match=match):
        Layout(**kw).stage_layers(cfg, 0, 0)


def test_layout_refuses_pipeline_options_without_pipeline():
    with pytest.raises(LayoutError, match="needs pp > 1"):
        Layout(vpp=2)
    with pytest.raises(LayoutError, match="need pp > 1"):
        Layout(first=1)


def test_layout_module_imports_no_megatron_and_no_model():
    code = (
        "import sys, ernie45.layout; "
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('megatron', 'torch') or m.startswith('ernie45.megatron')); "
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


# ----------------------------------------------------------------------------------------------------------------------
# process groups for a layout (megatron/parallel.py) and the CPU shims they install


def test_cpu_shims_rebind_torch_only_when_cpu_mode_is_asked_for():
    code = """
import torch
original = (torch.cuda.current_device, torch.cuda.synchronize, torch.Tensor.cuda)
from ernie45.megatron import cpu, parallel  # importing changes nothing
assert (torch.cuda.current_device, torch.cuda.synchronize, torch.Tensor.cuda) == original
cpu.install(cpu=False)  # what a CUDA run gets: S4 only
assert (torch.cuda.current_device, torch.cuda.synchronize, torch.Tensor.cuda) == original and not cpu.on_cpu()
cpu.install(cpu=True)
assert torch.cuda.current_device() == torch.device("cpu") and cpu.on_cpu()
"""
    subprocess.run([sys.executable, "-c", code], check=True)
