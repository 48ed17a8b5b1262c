"""Run-time shims that let Megatron-Core 0.16.1 run forward/backward on a CPU with gloo.

Everything CPU-specific lives in this one module (``docs/megatron-on-cpu.md`` says why each shim is needed).
The model code never imports it, and importing it changes nothing. The shims that rebind torch globals are applied
only when the caller asks for CPU mode: ``install(cpu=True)``, which ``ernie45.megatron.parallel.initialize`` calls
with ``cpu=True`` by default exactly when no CUDA device is present. ``install(cpu=False)`` only applies S4, which
is a Megatron 0.16.1 bug (not a CPU issue) and a no-op on later releases.

=====  ===================================================================  ==========================================
id     what                                                                 why
=====  ===================================================================  ==========================================
S1     ``torch.cuda.current_device`` -> ``cpu``                             ~175 ``device=torch.cuda.current_device()``
                                                                            call sites (buffers, rotary, router)
S2     null CUDA RNG tracker (public API)                                   DotProductAttention forks the CUDA RNG
S4     ``moe_utils.te_general_gemm = None`` if undefined                    0.16.1 NameError without TransformerEngine
S5     :class:`CudaToCpuMode`: ``device="cuda"`` kwargs -> cpu              pipeline schedules, optimizer, clip_grads
S6     ``torch.cuda.synchronize`` -> no-op                                  dist_checkpointing async writer
S9     CUDA RNG state save/restore -> no-op                                 activation recompute
S11    ``Tensor.cuda()`` -> the tensor itself                               tied embeddings with PP > 1: Megatron
                                                                            all-reduces ``weight.data.cuda()``
S12    the optimizer's ``clip_grad_by_total_norm_fp32`` -> a device-free    it asserts ``torch.cuda.FloatTensor``
       copy (same coefficient ``max_norm / (norm + 1e-6)``, in place)       grads; the optimizer imports it by name
S13    apex's ``fused_weight_gradient_mlp_cuda`` -> :class:`CpuWgradGemm`  gradient accumulation fusion (below)
=====  ===================================================================  ==========================================

S3 (explicit causal mask) is a call convention, handled by :func:`ernie45.megatron.model.causal_mask`.

S13 is a speed shim, not a correctness one. Without gradient accumulation fusion, every weight gradient of a Megatron
linear layer is a fresh tensor that DDP's backward hook then adds into the parameter's ``main_grad`` buffer: one more
pass over every weight gradient and an allocation the size of each weight, per micro-batch. With it, the weight
gradient GEMM accumulates straight into ``main_grad`` (BLAS with beta = 1) -- what apex's CUDA extension does on a
GPU, and what ``CpuWgradGemm`` does with ``Tensor.addmm_``. The trainer turns the fusion on only for layers whose
weights DDP gave a ``main_grad`` (``ernie45.train.trainer``); every other use of a model is unchanged.
"""

from __future__ import annotations

import contextlib

import torch
from torch.overrides import TorchFunctionMode

__all__ = ["install", "init_rng_tracker", "CudaToCpuMode", "CpuWgradGemm", "on_cpu"]

# whether this process runs Megatron on the CPU: set once by install(cpu=True), never unset (the shims stay)
_cpu_mode = False


def on_cpu() -> bool:
    """Whether the caller asked for CPU mode (:func:`install` with ``cpu=True``)."""
    return _cpu_mode


def install(*, cpu: bool) -> None:
    """Apply S4, and with ``cpu`` the process-wide CPU shims (idempotent; CPU mode cannot be left again)."""
    global _cpu_mode
    from megatron.core.transformer.moe import moe_utils

    # S4: defined only inside `try: import transformer_engine` in 0.16.1, but tested unconditionally.
    if not hasattr(moe_utils, "te_general_gemm"):
        moe_utils.te_general_gemm = None
    if cpu and not _cpu_mode:
        # S1
        torch.cuda.current_device = lambda: torch.device("cpu")
        # S6
        torch.cuda.synchronize = lambda *a, **k: None
        # S11: on a CPU-only build no tensor can move to CUDA; keep it where it is
        torch.Tensor.cuda = lambda self, *a, **k: self
        # S9
        from megatron.core.tensor_parallel import random as tp_random

        tp_random._get_cuda_rng_state = lambda *a, **k: torch.get_rng_state()
        tp_random._set_cuda_rng_state = lambda *a, **k: None
        # S12
        from megatron.core.optimizer import optimizer as mg_optimizer

        mg_optimizer.clip_grad_by_total_norm_fp32 = _clip_grad_by_total_norm_fp32
        # S13
        from megatron.core.tensor_parallel import layers as tp_layers

        if not tp_layers._grad_accum_fusion_available:
            tp_layers.fused_weight_gradient_mlp_cuda = CpuWgradGemm
            tp_layers._grad_accum_fusion_available = True
        _cpu_mode = True


def init_rng_tracker() -> None:
    """S2: a tracker whose ``fork()`` is a no-op. Call after ``initialize_model_parallel``.

    Dropout inside TP regions then draws from the default CPU generator; ERNIE runs with dropout 0.
    """
    from megatron.core.tensor_parallel import random as tp_random

    if on_cpu():
        tp_random.initialize_rng_tracker(inference_rng_tracker=True, force_reset=True)
    else:  # the real thing on GPU
        tp_random.model_parallel_cuda_manual_seed(1234)


def _clip_grad_by_total_norm_fp32(parameters, max_norm, total_norm, use_decoupled_grad=False):
    """S12: Megatron's ``clip_grad_by_total_norm_fp32`` without its CUDA-tensor assertion and fused kernel."""
    if isinstance(parameters, torch.Tensor):
        parameters = [parameters]
    attr = "decoupled_grad" if use_decoupled_grad else "grad"
    grads = [getattr(p, attr) for p in parameters if getattr(p, attr, None) is not None]
    clip_coeff = max_norm / (total_norm + 1.0e-6)
    if clip_coeff < 1.0:
        torch._foreach_mul_(grads, clip_coeff)


class CpuWgradGemm:
    """S13: apex's ``fused_weight_gradient_mlp_cuda`` interface on a CPU: ``main_grad += grad_output^T · input``
    (``[T, out]`` and ``[T, in]`` flattened tokens) in one GEMM that writes into ``main_grad`` itself."""

    @staticmethod
    def wgrad_gemm_accum_fp32(total_input_TI: torch.Tensor, grad_output_TO: torch.Tensor, main_grad_OI: torch.Tensor):
        main_grad_OI.addmm_(grad_output_TO.t(), total_input_TI)

    @staticmethod
    def wgrad_gemm_accum_fp16(total_input_TI: torch.Tensor, grad_output_TO: torch.Tensor, main_grad_OI: torch.Tensor):
        raise RuntimeError("a 16-bit main_grad is not used on a CPU (DDP reduces gradients in fp32 here)")


class CudaToCpuMode(TorchFunctionMode):
    """S5: rewrite ``device="cuda"`` keyword arguments to the CPU (schedules, optimizer, grad clipping)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        dev = kwargs.get("device")
        if dev is not None and str(dev).startswith("cuda"):
            kwargs = dict(kwargs, device="cpu")
        return func(*args, **kwargs)


def cpu_mode():
    """A context for Megatron code paths that hard-code ``device="cuda"`` (S5); a no-op outside CPU mode."""
    return CudaToCpuMode() if on_cpu() else contextlib.nullcontext()
