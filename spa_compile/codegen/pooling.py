"""Block pooling kernels (SPEC.md section 1): kbar, vbar (means of valid keys/values), qbar.

One program per (block, batch x head); fp32 sums, outputs fp32 ``[B, H, NB, D]``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from .blockinfo import BlockInfo


@triton.jit
def _pool_kv_kernel(
    K, V, VALID, KBAR, VBAR, KLP, VLP,
    skb, skh, skn, svb, svh, svn,
    H, Nk, NKB,
    D: tl.constexpr, DV: tl.constexpr,
    BS: tl.constexpr, BD: tl.constexpr, BDV: tl.constexpr, LP: tl.constexpr,
):
    j = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    rows = j * BS + tl.arange(0, BS)
    rmask = rows < Nk
    w = tl.load(VALID + b.to(tl.int64) * Nk + rows, mask=rmask, other=0).to(tl.float32)
    n = tl.sum(w, axis=0)
    inv = 1.0 / tl.maximum(n, 1.0)
    d = tl.arange(0, BD)
    kp = K + b.to(tl.int64) * skb + h.to(tl.int64) * skh + rows[:, None].to(tl.int64) * skn + d[None, :]
    k = tl.load(kp, mask=rmask[:, None] & (d[None, :] < D), other=0.0).to(tl.float32)
    kbar = tl.sum(k * w[:, None], axis=0) * inv
    out = (bh.to(tl.int64) * NKB + j) * D
    tl.store(KBAR + out + d, kbar, mask=d < D)
    if LP:
        tl.store(KLP + out + d, kbar.to(KLP.dtype.element_ty), mask=d < D)
    dv = tl.arange(0, BDV)
    vp = V + b.to(tl.int64) * svb + h.to(tl.int64) * svh + rows[:, None].to(tl.int64) * svn + dv[None, :]
    v = tl.load(vp, mask=rmask[:, None] & (dv[None, :] < DV), other=0.0).to(tl.float32)
    vbar = tl.sum(v * w[:, None], axis=0) * inv
    outv = (bh.to(tl.int64) * NKB + j) * DV
    tl.store(VBAR + outv + dv, vbar, mask=dv < DV)
    if LP:
        tl.store(VLP + outv + dv, vbar.to(VLP.dtype.element_ty), mask=dv < DV)


@triton.jit
def _pool_q_kernel(
    Q, QBAR,
    sqb, sqh, sqn,
    H, Nq, NQB,
    D: tl.constexpr, BS: tl.constexpr, BD: tl.constexpr,
):
    i = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    rows = i * BS + tl.arange(0, BS)
    rmask = rows < Nq
    d = tl.arange(0, BD)
    qp = Q + b.to(tl.int64) * sqb + h.to(tl.int64) * sqh + rows[:, None].to(tl.int64) * sqn + d[None, :]
    q = tl.load(qp, mask=rmask[:, None] & (d[None, :] < D), other=0.0).to(tl.float32)
    cnt = tl.minimum(Nq - i * BS, BS).to(tl.float32)
    qbar = tl.sum(q, axis=0) / cnt
    tl.store(QBAR + (bh.to(tl.int64) * NQB + i) * D + d, qbar, mask=d < D)


def _check_inner(x: Tensor, name: str) -> Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()


def pool_kv(k: Tensor, v: Tensor, info: BlockInfo) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """kbar ``[B, Hkv, NKB, D]``, vbar ``[B, Hkv, NKB, Dv]`` in float32, and copies of both in
    k's dtype (the same tensors for float32): the attention kernels load those as MMA operands."""
    k = _check_inner(k, "k")
    v = _check_inner(v, "v")
    b, h, nk, d = k.shape
    dv = v.shape[-1]
    kbar = torch.empty(b, h, info.nkb, d, device=k.device, dtype=torch.float32)
    vbar = torch.empty(b, h, info.nkb, dv, device=k.device, dtype=torch.float32)
    lp = k.dtype != torch.float32
    klp = torch.empty(kbar.shape, device=k.device, dtype=k.dtype) if lp else kbar
    vlp = torch.empty(vbar.shape, device=k.device, dtype=k.dtype) if lp else vbar
    bd, bdv = triton.next_power_of_2(d), triton.next_power_of_2(dv)
    _pool_kv_kernel[(info.nkb, b * h)](
        k, v, info.valid, kbar, vbar, klp, vlp,
        k.stride(0), k.stride(1), k.stride(2), v.stride(0), v.stride(1), v.stride(2),
        h, nk, info.nkb,
        D=d, DV=dv, BS=info.block, BD=bd, BDV=bdv, LP=lp,
        num_warps=4 if info.block * max(bd, bdv) <= 8192 else 8,
    )
    return kbar, vbar, klp, vlp


def pool_q(q: Tensor, block: int) -> Tensor:
    """qbar ``[B, Hq, NQB, D]`` in float32: the mean of each block's rows."""
    q = _check_inner(q, "q")
    b, h, nq, d = q.shape
    nqb = triton.cdiv(nq, block)
    qbar = torch.empty(b, h, nqb, d, device=q.device, dtype=torch.float32)
    bd = triton.next_power_of_2(d)
    _pool_q_kernel[(nqb, b * h)](
        q, qbar, q.stride(0), q.stride(1), q.stride(2), h, nq, nqb,
        D=d, BS=block, BD=bd, num_warps=4 if block * bd <= 8192 else 8,
    )
    return qbar
