"""Megatron's process groups for a parallel :class:`~ernie45.layout.Layout` (the layout itself is plain data, in
``ernie45/layout.py``)."""

from __future__ import annotations

from ..layout import Layout, LayoutError

__all__ = ["initialize", "destroy"]


def initialize(layout: Layout, *, cpu: bool | None = None) -> None:
    """Create Megatron's process groups for ``layout`` (torch.distributed must be initialised).

    ``cpu``: run Megatron on the CPU, with the shims of ``cpu.py``; None: exactly when no CUDA device is present.
    """
    import torch
    import torch.distributed as dist
    from megatron.core import parallel_state

    from . import cpu as cpu_shims

    cpu_shims.install(cpu=not torch.cuda.is_available() if cpu is None else cpu)
    world = dist.get_world_size()
    if world % layout.world_size:
        raise LayoutError(f"layout {layout} needs a multiple of {layout.world_size} processes, have {world}")
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=layout.tp,
        pipeline_model_parallel_size=layout.pp,
        virtual_pipeline_model_parallel_size=layout.vpp if layout.vpp > 1 else None,
        expert_model_parallel_size=layout.ep,
        expert_tensor_parallel_size=layout.etp,
    )
    cpu_shims.init_rng_tracker()


def destroy() -> None:
    from megatron.core import parallel_state

    parallel_state.destroy_model_parallel()
