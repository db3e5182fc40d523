"""Block pooling kernels (SPEC.md section 1): kbar, vbar (means of valid keys/values), qbar.

One program per (block, batch x head); fp32 sums, outputs fp32 ``[B, H, NB, D]``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from .blockinfo import BlockInfo, all_keys_valid


@triton.jit
def _block_means(X_h, sxn, rows, rmask, w, inv, cols, NCOL: tl.constexpr, OUT, OUT_LP, out, keep, LP: tl.constexpr,
                 AXIS: tl.constexpr, WEIGHTED: tl.constexpr = True):
    """Weighted means of X's rows (``rows`` [BS] with AXIS 0, or [NBP, BS] with AXIS 1), stored
    at ``out`` (+ cols) in float32 and, with LP, in OUT_LP's dtype; ``keep`` masks the stores.
    WEIGHTED False: every row in range is valid (w is 1 there), the masked load's zeros do the rest."""
    if AXIS == 0:
        x = tl.load(X_h + rows[:, None].to(tl.int64) * sxn + cols[None, :],
                    mask=rmask[:, None] & (cols[None, :] < NCOL), other=0.0).to(tl.float32)
        if WEIGHTED:
            x = x * w[:, None]
        mean = tl.sum(x, axis=0) * inv
        ptr = out + cols
    else:
        x = tl.load(X_h + rows[:, :, None].to(tl.int64) * sxn + cols[None, None, :],
                    mask=rmask[:, :, None] & (cols < NCOL)[None, None, :], other=0.0).to(tl.float32)
        if WEIGHTED:
            x = x * w[:, :, None]
        mean = tl.sum(x, axis=1) * inv[:, None]
        ptr = out[:, None] + cols[None, :]
    tl.store(OUT + ptr, mean, mask=keep)
    if LP:
        tl.store(OUT_LP + ptr, mean.to(OUT_LP.dtype.element_ty), mask=keep)


@triton.jit
def _pool_kv_kernel(
    K, V, VALID, KBAR, VBAR, KLP, VLP,
    skb, skh, skn, svb, svh, svn,
    H, Nk, NKB,
    D: tl.constexpr, DV: tl.constexpr,
    BS: tl.constexpr, BD: tl.constexpr, BDV: tl.constexpr, LP: tl.constexpr, NBP: tl.constexpr = 1,
    POOL_V: tl.constexpr = True, WEIGHTED: tl.constexpr = True,
):
    """NBP consecutive key blocks a program, as [NBP, BS, BD] tiles when NBP > 1 (see _pool_q_kernel).
    POOL_V False: the key means alone (what the selection reads; vbar is the fill's). WEIGHTED
    False: every key below Nk is valid (``blockinfo.all_keys_valid``): VALID is not read."""
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    d = tl.arange(0, BD)
    dv = tl.arange(0, BDV)
    K_h = K + b.to(tl.int64) * skb + h.to(tl.int64) * skh
    V_h = V + b.to(tl.int64) * svb + h.to(tl.int64) * svh
    if NBP == 1:
        blk = tl.program_id(0)
        rows = blk * BS + tl.arange(0, BS)
        rmask = rows < Nk
        if WEIGHTED:
            w = tl.load(VALID + b.to(tl.int64) * Nk + rows, mask=rmask, other=0).to(tl.float32)
        else:
            w = rmask.to(tl.float32)
        inv = 1.0 / tl.maximum(tl.sum(w, axis=0), 1.0)
        kkeep = d < D
        vkeep = dv < DV
    else:
        blk = tl.program_id(0) * NBP + tl.arange(0, NBP)  # [NBP]
        rows = blk[:, None] * BS + tl.arange(0, BS)[None, :]  # [NBP, BS]
        rmask = rows < Nk
        if WEIGHTED:
            w = tl.load(VALID + b.to(tl.int64) * Nk + rows, mask=rmask, other=0).to(tl.float32)
        else:
            w = rmask.to(tl.float32)
        inv = 1.0 / tl.maximum(tl.sum(w, axis=1), 1.0)  # [NBP]
        kkeep = (blk < NKB)[:, None] & (d < D)[None, :]
        vkeep = (blk < NKB)[:, None] & (dv < DV)[None, :]
    base = bh.to(tl.int64) * NKB + blk
    axis: tl.constexpr = 0 if NBP == 1 else 1
    _block_means(K_h, skn, rows, rmask, w, inv, d, D, KBAR, KLP, base * D, kkeep, LP, axis, WEIGHTED)
    if POOL_V:
        _block_means(V_h, svn, rows, rmask, w, inv, dv, DV, VBAR, VLP, base * DV, vkeep, LP, axis, WEIGHTED)


@triton.jit
def _pool_q_kernel(
    Q, QBAR,
    sqb, sqh, sqn,
    H, Nq, NQB,
    D: tl.constexpr, BS: tl.constexpr, BD: tl.constexpr, NBP: tl.constexpr = 1,
):
    """NBP consecutive query blocks a program; NBP > 1 loads them as one [NBP, BS, BD] tile, so
    that all of its loads are in flight together (an unrolled loop of 2-D tiles compiled to one
    tile at a time: 30 -> 32 registers for 4 blocks, sm_90)."""
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    d = tl.arange(0, BD)
    Q_h = Q + b.to(tl.int64) * sqb + h.to(tl.int64) * sqh
    if NBP == 1:
        i = tl.program_id(0)
        rows = i * BS + tl.arange(0, BS)
        rmask = rows < Nq
        q = tl.load(Q_h + rows[:, None].to(tl.int64) * sqn + d[None, :], mask=rmask[:, None] & (d[None, :] < D),
                    other=0.0).to(tl.float32)
        cnt = tl.minimum(Nq - i * BS, BS).to(tl.float32)
        qbar = tl.sum(q, axis=0) / cnt
        tl.store(QBAR + (bh.to(tl.int64) * NQB + i) * D + d, qbar, mask=d < D)
    else:
        blk = tl.program_id(0) * NBP + tl.arange(0, NBP)  # [NBP]
        rows = blk[:, None] * BS + tl.arange(0, BS)[None, :]  # [NBP, BS]
        m3 = (rows < Nq)[:, :, None] & (d < D)[None, None, :]
        q = tl.load(Q_h + rows[:, :, None].to(tl.int64) * sqn + d[None, None, :], mask=m3, other=0.0)
        cnt = tl.maximum(tl.minimum(Nq - blk * BS, BS), 1).to(tl.float32)
        qbar = tl.sum(q.to(tl.float32), axis=1) / cnt[:, None]  # [NBP, BD]
        out = (bh.to(tl.int64) * NQB + blk)[:, None] * D + d[None, :]
        tl.store(QBAR + out, qbar, mask=(blk < NQB)[:, None] & (d < D)[None, :])


def _check_inner(x: Tensor, name: str) -> Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()


# Blocks a pooling program handles (one [NBP, BS, D] tile). 4 since the H200 run of 2026-11-28
# (benchmarks/bench_selection.py, CUDA graph, 16K, Hq=32/Hkv=8, D=128): pool_q 41 us and pool_kv
# 23 us against 55 and 32 with one block a program (16 KB a program, 2.1-2.4 TB/s); 2 blocks
# gained nothing (64 / 33 us). 8 where no key is invalid (run 37, 2026-11-29, 16K, Hkv=32): pool_q
# 36.2 us against 41.2, pool_kv 67.1 against 79.1 (128 KB a program, 3.7-4.0 TB/s); the weighted
# key means (padding) stay at 4: at 8 blocks and 4 warps they spill (sm_90: 255 registers + 104 B).
POOL_BLOCKS_PER_PROGRAM = 4
POOL_BLOCKS_UNWEIGHTED = 8
POOL_ENV = "SPA_POOL_BLOCKS"


def pool_blocks_per_program(nbp: int | None = None, weighted: bool = True) -> int:
    """``nbp``, else $SPA_POOL_BLOCKS, else POOL_BLOCKS_PER_PROGRAM (weighted means: key padding)
    or POOL_BLOCKS_UNWEIGHTED; 1, 2, 4 or 8."""
    import os

    default = POOL_BLOCKS_PER_PROGRAM if weighted else POOL_BLOCKS_UNWEIGHTED
    v = nbp if nbp is not None else int(os.environ.get(POOL_ENV, "") or default)
    if v not in (1, 2, 4, 8):
        raise ValueError(f"{POOL_ENV} must be 1, 2, 4 or 8 (blocks a pooling program), not {v}")
    return v


def pool_kv(k: Tensor, v: Tensor, info: BlockInfo, blocks_per_program: int | None = None, values: bool = True,
            num_warps: int | None = None) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """kbar ``[B, Hkv, NKB, D]``, vbar ``[B, Hkv, NKB, Dv]`` in float32, and copies of both in
    k's dtype (the same tensors for float32): the attention kernels load those as MMA operands.
    ``values=False`` pools the keys alone (vbar and its copy are then left unwritten): the part
    of the pooling the selection needs, which bench_kernels.py times as the selection's share.
    ``num_warps`` overrides the launch's (benchmarks/bench_selection.py compares them)."""
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
    weighted = not all_keys_valid(info)
    nbp = pool_blocks_per_program(blocks_per_program, weighted)
    _pool_kv_kernel[(triton.cdiv(info.nkb, nbp), b * h)](
        k, v, info.valid, kbar, vbar, klp, vlp,
        k.stride(0), k.stride(1), k.stride(2), v.stride(0), v.stride(1), v.stride(2),
        h, nk, info.nkb,
        D=d, DV=dv, BS=info.block, BD=bd, BDV=bdv, LP=lp, NBP=nbp, POOL_V=values, WEIGHTED=weighted,
        num_warps=num_warps or (4 if info.block * max(bd, bdv) <= 8192 else 8),
    )
    return kbar, vbar, klp, vlp


def pool_q(q: Tensor, block: int, blocks_per_program: int | None = None, num_warps: int | None = None) -> Tensor:
    """qbar ``[B, Hq, NQB, D]`` in float32: the mean of each block's rows (``num_warps``: as pool_kv)."""
    q = _check_inner(q, "q")
    b, h, nq, d = q.shape
    nqb = triton.cdiv(nq, block)
    qbar = torch.empty(b, h, nqb, d, device=q.device, dtype=torch.float32)
    bd = triton.next_power_of_2(d)
    nbp = pool_blocks_per_program(blocks_per_program, weighted=False)
    _pool_q_kernel[(triton.cdiv(nqb, nbp), b * h)](
        q, qbar, q.stride(0), q.stride(1), q.stride(2), h, nq, nqb,
        D=d, BS=block, BD=bd, NBP=nbp, num_warps=num_warps or (4 if block * bd <= 8192 else 8),
    )
    return qbar
