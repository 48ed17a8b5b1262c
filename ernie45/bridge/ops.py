"""The closed set of reversible tensor ops the bridge tables may use.

Every op maps a tuple of HF tensors to a tuple of Megatron tensors (``to_mg``) and back (``to_hf``), exactly:
``to_hf(to_mg(x)) == x`` bit for bit (pure reshapes, concatenations and copies; no arithmetic). The round-trip and
the inverse of each op are tested in ``tests/test_ops_and_plan.py``.

Ops are also *shard-compatible* along the split dims a table row allows: applying ``to_mg`` to the i-th TP chunk of
every HF input gives the i-th TP shard of the Megatron tensor, as Megatron lays it out. That is what lets each rank
read only its own slices from disk (and lets export work shard by shard):

* fused QKV is group-major (``[q×r, k, v]`` per KV group), so a dim-0 chunk holding whole KV groups is the fusion of
  the chunks of q, k and v (reference §H.3);
* ``linear_fc1`` of a TP rank is ``[gate_i; up_i]`` (reference §H.4) -- the concatenation of the chunks, *not* a chunk of
  the concatenation.

Legend: ``H`` hidden, ``E`` experts, ``G`` KV groups (on this shard), ``R`` query heads per group, ``D`` head dim,
``F`` FFN width.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["Op", "Identity", "Squeeze0", "Transpose", "FuseQKV", "ConcatGLU", "SplitRows", "RegroupQKV", "OPS"]

Tensors = tuple[torch.Tensor, ...]


@dataclass(frozen=True)
class Op:
    """Base: ``n_hf`` HF tensors ⇄ ``n_mg`` Megatron tensors."""

    n_hf: int = 1
    n_mg: int = 1
    # dims of the *Megatron* tensor along which this op commutes with chunking (see module docstring)
    shardable_dims: tuple[int, ...] = (0, 1)
    # the HF tensor's split dim is this many equal blocks, each chunked on its own: TP shard i of the Megatron
    # tensor comes from the i-th chunk of every block, concatenated (HF's fused [Q | K | V] ViT rows)
    hf_blocks: int = 1

    def to_mg(self, hf: Tensors) -> Tensors:
        raise NotImplementedError

    def to_hf(self, mg: Tensors) -> Tensors:
        raise NotImplementedError

    def mg_shapes(self, hf: tuple[tuple[int, ...], ...]) -> tuple[tuple[int, ...], ...]:
        """Shapes ``to_mg`` produces from inputs of these shapes (planning without touching data)."""
        raise NotImplementedError

    def describe(self) -> str:
        return type(self).__name__


@dataclass(frozen=True)
class Identity(Op):
    def to_mg(self, hf: Tensors) -> Tensors:
        return hf

    def mg_shapes(self, hf):
        return tuple(hf)

    def to_hf(self, mg: Tensors) -> Tensors:
        return mg


@dataclass(frozen=True)
class Squeeze0(Op):
    """``[1, E]`` (HF ``moe_statics.e_score_correction_bias``) ⇄ ``[E]`` (Megatron ``router.expert_bias``)."""

    shardable_dims: tuple[int, ...] = ()

    def to_mg(self, hf: Tensors) -> Tensors:
        (x_1E,) = hf
        if x_1E.dim() != 2 or x_1E.shape[0] != 1:
            raise ValueError(f"expected a [1, E] tensor, got {list(x_1E.shape)}")
        return (x_1E[0],)

    def to_hf(self, mg: Tensors) -> Tensors:
        (x_E,) = mg
        return (x_E.unsqueeze(0),)

    def mg_shapes(self, hf):
        return (tuple(hf[0][1:]),)


@dataclass(frozen=True)
class Transpose(Op):
    """VL routers are stored ``[H, E]`` on disk and used ``[E, H]`` (reference §H.5)."""

    shardable_dims: tuple[int, ...] = ()

    def to_mg(self, hf: Tensors) -> Tensors:
        return (hf[0].t().contiguous(),)

    def to_hf(self, mg: Tensors) -> Tensors:
        return (mg[0].t().contiguous(),)

    def mg_shapes(self, hf):
        return (tuple(reversed(hf[0])),)


@dataclass(frozen=True)
class FuseQKV(Op):
    """``q [G·R·D, H]``, ``k [G·D, H]``, ``v [G·D, H]`` ⇄ Megatron ``linear_qkv [G·(R+2)·D, H]`` (group-major)."""

    head_dim: int = 0
    heads_per_group: int = 0
    n_hf: int = 3
    shardable_dims: tuple[int, ...] = (0,)

    def to_mg(self, hf: Tensors) -> Tensors:
        q, k, v = hf
        D, R = self.head_dim, self.heads_per_group
        G = k.shape[0] // D
        if q.shape[0] != G * R * D or v.shape != k.shape:
            raise ValueError(f"q/k/v shapes {list(q.shape)}/{list(k.shape)}/{list(v.shape)} do not fit R={R}, D={D}")
        rest = q.shape[1:]
        q_GRDx = q.reshape(G, R * D, *rest)
        k_GDx = k.reshape(G, D, *rest)
        v_GDx = v.reshape(G, D, *rest)
        return (torch.cat([q_GRDx, k_GDx, v_GDx], dim=1).reshape(G * (R + 2) * D, *rest),)

    def to_hf(self, mg: Tensors) -> Tensors:
        (qkv,) = mg
        D, R = self.head_dim, self.heads_per_group
        G = qkv.shape[0] // ((R + 2) * D)
        rest = qkv.shape[1:]
        qkv_GXx = qkv.reshape(G, (R + 2) * D, *rest)
        q, k, v = torch.split(qkv_GXx, [R * D, D, D], dim=1)
        return (
            q.reshape(G * R * D, *rest).contiguous(),
            k.reshape(G * D, *rest).contiguous(),
            v.reshape(G * D, *rest).contiguous(),
        )

    def mg_shapes(self, hf):
        q, k, v = hf
        return ((q[0] + k[0] + v[0], *q[1:]),)

    def describe(self) -> str:
        return f"FuseQKV(R={self.heads_per_group}, D={self.head_dim})"


@dataclass(frozen=True)
class ConcatGLU(Op):
    """``gate [F, H]``, ``up [F, H]`` ⇄ ``linear_fc1 [2F, H]`` = ``[gate; up]`` (Megatron's SwiGLU input)."""

    n_hf: int = 2
    shardable_dims: tuple[int, ...] = (0,)

    def to_mg(self, hf: Tensors) -> Tensors:
        gate_FH, up_FH = hf
        if gate_FH.shape != up_FH.shape:
            raise ValueError(f"gate {list(gate_FH.shape)} and up {list(up_FH.shape)} differ")
        return (torch.cat([gate_FH, up_FH], dim=0),)

    def to_hf(self, mg: Tensors) -> Tensors:
        gate_FH, up_FH = torch.chunk(mg[0], 2, dim=0)
        return (gate_FH.contiguous(), up_FH.contiguous())

    def mg_shapes(self, hf):
        return ((2 * hf[0][0], *hf[0][1:]),)


@dataclass(frozen=True)
class SplitRows(Op):
    """One HF ``[n, …]`` tensor ⇄ ``n`` Megatron tensors (VL ``e_score_correction_bias [2, E]`` → text, vision)."""

    n_mg: int = 2
    shardable_dims: tuple[int, ...] = ()

    def to_mg(self, hf: Tensors) -> Tensors:
        (x,) = hf
        if x.shape[0] != self.n_mg:
            raise ValueError(f"expected {self.n_mg} rows, got {list(x.shape)}")
        return tuple(x[i].clone() for i in range(self.n_mg))

    def to_hf(self, mg: Tensors) -> Tensors:
        return (torch.stack(mg, dim=0),)

    def mg_shapes(self, hf):
        return (tuple(hf[0][1:]),) * self.n_mg

    def describe(self) -> str:
        return f"SplitRows({self.n_mg})"


@dataclass(frozen=True)
class RegroupQKV(Op):
    """HF ViT ``qkv [3·NH·D, …]`` (rows ``[Q | K | V]``) ⇄ Megatron ``linear_qkv`` (rows ``[q_h, k_h, v_h]`` per head,
    reference §H.6). Weight ``[3C, C]`` and bias ``[3C]`` alike; ``hf_blocks=3`` makes TP shards read whole heads of each
    of Q, K and V."""

    head_dim: int = 0
    shardable_dims: tuple[int, ...] = (0,)
    hf_blocks: int = 3

    def to_mg(self, hf: Tensors) -> Tensors:
        (x,) = hf
        rest = x.shape[1:]
        if x.shape[0] % (3 * self.head_dim):
            raise ValueError(f"qkv rows {x.shape[0]} are not 3 blocks of whole {self.head_dim}-row heads")
        x_3NDx = x.reshape(3, -1, self.head_dim, *rest)
        return (x_3NDx.transpose(0, 1).reshape(x.shape).contiguous(),)

    def to_hf(self, mg: Tensors) -> Tensors:
        (x,) = mg
        x_N3Dx = x.reshape(-1, 3, self.head_dim, *x.shape[1:])
        return (x_N3Dx.transpose(0, 1).reshape(x.shape).contiguous(),)

    def mg_shapes(self, hf):
        return (tuple(hf[0]),)

    def describe(self) -> str:
        return f"RegroupQKV(D={self.head_dim})"


OPS = (Identity, Squeeze0, Transpose, FuseQKV, ConcatGLU, SplitRows, RegroupQKV)
