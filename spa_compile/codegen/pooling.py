"""Block pooling kernels (SPEC.md section 1): kbar, vbar (means of valid keys/values), qbar.

One program per (block, batch x head); fp32 sums, outputs fp32 ``[B, H, NB, D]``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from .blockinfo import BlockInfo, all_keys_valid
from .switches import env_switch


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
def _pool_kv_body(
    pid, bh, K, V, VALID, KBAR, VBAR, KLP, VLP,
    skb, skh, skn, svb, svh, svn,
    H, Nk, NKB,
    D: tl.constexpr, DV: tl.constexpr,
    BS: tl.constexpr, BD: tl.constexpr, BDV: tl.constexpr, LP: tl.constexpr, NBP: tl.constexpr,
    POOL_V: tl.constexpr, WEIGHTED: tl.constexpr,
):
    """Key blocks ``pid * NBP ..`` of (batch x head) ``bh``, as [NBP, BS, BD] tiles when NBP > 1
    (see _pool_q_body). POOL_V False: the key means alone (what the selection reads; vbar is the
    fill's). WEIGHTED False: every key below Nk is valid (``blockinfo.all_keys_valid``): VALID is
    not read. Blocks past NKB store nothing (the fused launch's grid covers the longer of Q and K)."""
    b = bh // H
    h = bh % H
    d = tl.arange(0, BD)
    dv = tl.arange(0, BDV)
    K_h = K + b.to(tl.int64) * skb + h.to(tl.int64) * skh
    V_h = V + b.to(tl.int64) * svb + h.to(tl.int64) * svh
    if NBP == 1:
        blk = pid
        rows = blk * BS + tl.arange(0, BS)
        rmask = rows < Nk
        if WEIGHTED:
            w = tl.load(VALID + b.to(tl.int64) * Nk + rows, mask=rmask, other=0).to(tl.float32)
        else:
            w = rmask.to(tl.float32)
        inv = 1.0 / tl.maximum(tl.sum(w, axis=0), 1.0)
        kkeep = (d < D) & (blk + 0 * d < NKB)  # a tensor mask (the interpreter refuses scalar & tensor)
        vkeep = (dv < DV) & (blk + 0 * dv < NKB)
    else:
        blk = pid * NBP + tl.arange(0, NBP)  # [NBP]
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
def _pool_q_body(
    pid, bh, Q, QBAR,
    sqb, sqh, sqn,
    H, Nq, NQB,
    D: tl.constexpr, BS: tl.constexpr, BD: tl.constexpr, NBP: tl.constexpr,
):
    """Query blocks ``pid * NBP ..`` of ``bh``; NBP > 1 loads them as one [NBP, BS, BD] tile, so
    that all of its loads are in flight together (an unrolled loop of 2-D tiles compiled to one
    tile at a time: 30 -> 32 registers for 4 blocks, sm_90). Blocks past NQB store nothing."""
    b = bh // H
    h = bh % H
    d = tl.arange(0, BD)
    Q_h = Q + b.to(tl.int64) * sqb + h.to(tl.int64) * sqh
    if NBP == 1:
        i = pid
        rows = i * BS + tl.arange(0, BS)
        rmask = rows < Nq
        q = tl.load(Q_h + rows[:, None].to(tl.int64) * sqn + d[None, :], mask=rmask[:, None] & (d[None, :] < D),
                    other=0.0).to(tl.float32)
        cnt = tl.maximum(tl.minimum(Nq - i * BS, BS), 1).to(tl.float32)
        qbar = tl.sum(q, axis=0) / cnt
        tl.store(QBAR + (bh.to(tl.int64) * NQB + i) * D + d, qbar, mask=(d < D) & (i + 0 * d < NQB))
    else:
        blk = pid * NBP + tl.arange(0, NBP)  # [NBP]
        rows = blk[:, None] * BS + tl.arange(0, BS)[None, :]  # [NBP, BS]
        m3 = (rows < Nq)[:, :, None] & (d < D)[None, None, :]
        q = tl.load(Q_h + rows[:, :, None].to(tl.int64) * sqn + d[None, None, :], mask=m3, other=0.0)
        cnt = tl.maximum(tl.minimum(Nq - blk * BS, BS), 1).to(tl.float32)
        qbar = tl.sum(q.to(tl.float32), axis=1) / cnt[:, None]  # [NBP, BD]
        out = (bh.to(tl.int64) * NQB + blk)[:, None] * D + d[None, :]
        tl.store(QBAR + out, qbar, mask=(blk < NQB)[:, None] & (d < D)[None, :])


@triton.jit
def _pool_kv_kernel(
    K, V, VALID, KBAR, VBAR, KLP, VLP,
    skb, skh, skn, svb, svh, svn,
    H, Nk, NKB,
    D: tl.constexpr, DV: tl.constexpr,
    BS: tl.constexpr, BD: tl.constexpr, BDV: tl.constexpr, LP: tl.constexpr, NBP: tl.constexpr = 1,
    POOL_V: tl.constexpr = True, WEIGHTED: tl.constexpr = True,
):
    """Grid (key-block groups, B x Hkv): see _pool_kv_body."""
    _pool_kv_body(tl.program_id(0), tl.program_id(1), K, V, VALID, KBAR, VBAR, KLP, VLP, skb, skh, skn, svb, svh, svn,
                  H, Nk, NKB, D, DV, BS, BD, BDV, LP, NBP, POOL_V, WEIGHTED)


@triton.jit
def _pool_q_kernel(
    Q, QBAR,
    sqb, sqh, sqn,
    H, Nq, NQB,
    D: tl.constexpr, BS: tl.constexpr, BD: tl.constexpr, NBP: tl.constexpr = 1,
):
    """Grid (query-block groups, B x Hq): see _pool_q_body."""
    _pool_q_body(tl.program_id(0), tl.program_id(1), Q, QBAR, sqb, sqh, sqn, H, Nq, NQB, D, BS, BD, NBP)


@triton.jit
def _pool_qkv_kernel(
    Q, QBAR, sqb, sqh, sqn, HQ, Nq, NQB, BHQ,
    K, V, VALID, KBAR, VBAR, KLP, VLP,
    skb, skh, skn, svb, svh, svn,
    H, Nk, NKB,
    D: tl.constexpr, DV: tl.constexpr,
    BS: tl.constexpr, BD: tl.constexpr, BDV: tl.constexpr, LP: tl.constexpr, NBP: tl.constexpr,
    POOL_V: tl.constexpr, WEIGHTED: tl.constexpr,
):
    """The query means and the key (and value) means in one launch (``pool_qkv``): grid
    (block groups of the longer of Q and K, B x Hq + B x Hkv); rows below BHQ pool Q. One wave
    of programs instead of two launches, each a wave with its own tail."""
    pid = tl.program_id(0)
    bh = tl.program_id(1)
    if bh < BHQ:
        _pool_q_body(pid, bh, Q, QBAR, sqb, sqh, sqn, HQ, Nq, NQB, D, BS, BD, NBP)
    else:
        _pool_kv_body(pid, bh - BHQ, K, V, VALID, KBAR, VBAR, KLP, VLP, skb, skh, skn, svb, svh, svn,
                      H, Nk, NKB, D, DV, BS, BD, BDV, LP, NBP, POOL_V, WEIGHTED)


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


def _kv_outputs(k: Tensor, v: Tensor, nkb: int):
    """kbar, vbar (float32) and their copies in k's dtype (the same tensors for float32)."""
    b, h, _, d = k.shape
    kbar = torch.empty(b, h, nkb, d, device=k.device, dtype=torch.float32)
    vbar = torch.empty(b, h, nkb, v.shape[-1], device=k.device, dtype=torch.float32)
    lp = k.dtype != torch.float32
    klp = torch.empty(kbar.shape, device=k.device, dtype=k.dtype) if lp else kbar
    vlp = torch.empty(vbar.shape, device=k.device, dtype=k.dtype) if lp else vbar
    return kbar, vbar, klp, vlp, lp


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
    kbar, vbar, klp, vlp, lp = _kv_outputs(k, v, info.nkb)
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


# One launch for the query and key (and value) means (``pool_qkv``) by default since H200 run 40
# (2026-11-29, 16K, CUDA graph, benchmarks/bench_selection.py): the query and key means 68 us in
# one launch against 36 + 36 in two at Hkv=32 (47 against 36 + 8 at Hkv=8), Q, K and V 100 against
# 36 + 68 (53 against 36 + 20); the op forward about the same (1.4125 ms at Hkv=32, CUDA graph,
# against 1.4119 apart in run 39). What it saves is a launch and its tail: the selection's share at 16K density 0.2, Hkv=32
# 139.1 us of 1.412 ms (9.85%) against 144.7 of 1.412 (10.25%, run 39). $SPA_POOL_FUSED ("0" /
# "1") overrides.
POOL_FUSED = True
FUSED_ENV = "SPA_POOL_FUSED"


def pool_fused() -> bool:
    """$SPA_POOL_FUSED ("0" / "1"), else POOL_FUSED."""
    return env_switch(FUSED_ENV, POOL_FUSED)


def pool_qkv(q: Tensor, k: Tensor, v: Tensor, info: BlockInfo, blocks_per_program: int | None = None,
             values: bool = True) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """qbar, kbar, vbar, kbar_lp, vbar_lp in one launch: ``pool_q(q, info.block)`` and
    ``pool_kv(k, v, info)`` by the same jit bodies, both at the key means' blocks a program
    (bitwise their values at that ``blocks_per_program``)."""
    q, k, v = _check_inner(q, "q"), _check_inner(k, "k"), _check_inner(v, "v")
    b, hq, nq, d = q.shape
    hkv, nk, dv = k.shape[1], k.shape[2], v.shape[-1]
    if k.shape[-1] != d:
        raise ValueError(f"pool_qkv: q and k head dims differ ({d} vs {k.shape[-1]}); pool them apart")
    qbar = torch.empty(b, hq, info.nqb, d, device=q.device, dtype=torch.float32)
    kbar, vbar, klp, vlp, lp = _kv_outputs(k, v, info.nkb)
    bd, bdv = triton.next_power_of_2(d), triton.next_power_of_2(dv)
    weighted = not all_keys_valid(info)
    nbp = pool_blocks_per_program(blocks_per_program, weighted)
    _pool_qkv_kernel[(triton.cdiv(max(info.nqb, info.nkb), nbp), b * hq + b * hkv)](
        q, qbar, q.stride(0), q.stride(1), q.stride(2), hq, nq, info.nqb, b * hq,
        k, v, info.valid, kbar, vbar, klp, vlp,
        k.stride(0), k.stride(1), k.stride(2), v.stride(0), v.stride(1), v.stride(2),
        hkv, nk, info.nkb,
        D=d, DV=dv, BS=info.block, BD=bd, BDV=bdv, LP=lp, NBP=nbp, POOL_V=values, WEIGHTED=weighted,
        num_warps=4 if info.block * max(bd, bdv) <= 8192 else 8,
    )
    return qbar, kbar, vbar, klp, vlp
