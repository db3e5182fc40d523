"""Projector scores and streaming top-k selection (SPEC.md sections 1-2).

One program per (batch, selection head, QB consecutive query blocks). It walks the
key blocks in chunks of BJ and keeps, per query block, a running buffer of the KP largest
64-bit keys ``(orderable score bits << 32) | (2**31 - 1 - j)`` (ties: lower j first).
Forced blocks (partial | sink | local) enter the same buffer with the largest score key, so
after the walk the buffer's first ``n_forced + k`` entries are exactly S; KP is the bound
``budget.max_selected`` on |S|. A chunk is merged by one ascending sort, its top KP taken
(the last KP of the sort), and the bitonic step ``sort(max(best_desc, top_asc))``; chunks
with no key above the buffer's minimum skip the merge. No (NQB x NKB) score matrix ever
reaches global memory.

The local blocks (the ``local_blocks`` visible blocks nearest the diagonal) are found first
in a window around the diagonals of the program's rows; a row with too few visible blocks
in the window falls back to min-scans over its whole key range.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from .blockinfo import BlockInfo
from .common import classify_blocks

SENTINEL = tl.constexpr(-(2**63))
MAXKEY = tl.constexpr(2**63 - 1)
LOCAL_BIG = tl.constexpr(2**30)  # |j - diag| * NKB + j < 2**30 for NKB < 32K (2M tokens at block 64)
FORCED_HI = tl.constexpr(2147483647 * 4294967296)  # the score part of a forced block's key


@triton.jit
def _score_keys(QP_r, KP_h, rows, row_ok, jj, jm, R, scale, QB: tl.constexpr, BJ: tl.constexpr, RC: tl.constexpr,
                USE_DOT: tl.constexpr):
    """scale * qp[rows] . kp[jj] in float32 as ``[QB, BJ]`` (fp32 FMA, no tf32)."""
    acc = tl.zeros([QB, BJ], dtype=tl.float32)
    for r0 in range(0, R, RC):
        rr = r0 + tl.arange(0, RC)
        rm = rr < R
        qv = tl.load(QP_r + rows[:, None].to(tl.int64) * R + rr[None, :], mask=row_ok[:, None] & rm[None, :], other=0.0)
        kv = tl.load(KP_h + jj[:, None].to(tl.int64) * R + rr[None, :], mask=jm[:, None] & rm[None, :], other=0.0)
        if USE_DOT:
            acc += tl.dot(qv, tl.trans(kv), input_precision="ieee")
        else:
            acc += tl.sum(qv[:, None, :] * kv[None, :, :], axis=2)
    s = acc * scale
    return tl.where(s == 0.0, 0.0, s)  # -0.0 -> +0.0: equal scores must tie


@triton.jit
def _encode(s, jj):
    bits = s.to(tl.int32, bitcast=True)
    ordered = tl.where(bits < 0, bits ^ 0x7FFFFFFF, bits)
    return (ordered.to(tl.int64) << 32) + (2147483647 - jj).to(tl.int64)[None, :]


@triton.jit
def _local_threshold(lthr0, lo, hi, t0, t1, diag, NB_b, FIRST_b, LAST_b, CS_b, Nk, NKB, OFF, WIN, LOCAL,
                     QB: tl.constexpr, BJ: tl.constexpr, BS: tl.constexpr, CAUSAL: tl.constexpr,
                     WINDOW: tl.constexpr):
    """The LOCAL-th smallest ``|j - diag| * NKB + j`` over visible blocks j in [lo, hi)."""
    lthr = lthr0
    cols = tl.arange(0, BJ)
    for _l in range(LOCAL):
        cur = tl.full([QB], LOCAL_BIG, dtype=tl.int32)
        for c in range(lo, hi, BJ):
            jj = c + cols
            visible, full, n = classify_blocks(jj, t0, t1, NB_b, FIRST_b, LAST_b, CS_b, Nk, NKB, OFF, WIN, BS,
                                               CAUSAL, WINDOW)
            lkey = tl.abs(jj[None, :] - diag[:, None]) * NKB + jj[None, :]
            lkey = tl.where(visible & (lkey > lthr[:, None]) & (jj < hi)[None, :], lkey, LOCAL_BIG)
            cur = tl.minimum(cur, tl.min(lkey, axis=1))
        lthr = cur
    return lthr


@triton.jit
def _select_kernel(
    QP, KP, NB, FIRST, LAST, CS, IDX, CNT,
    Hs, Hkv, Nq, Nk, NQB, NKB, R, KMAX,
    OFF, WIN, scale,
    SINK, LOCAL, TOPK, PPM, MINB, MAXB,
    CAUSAL: tl.constexpr, WINDOW: tl.constexpr,
    BS: tl.constexpr, QB: tl.constexpr, KPB: tl.constexpr, BJ: tl.constexpr, RC: tl.constexpr,
    USE_DOT: tl.constexpr, NEAR: tl.constexpr,
):
    pid = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // Hs
    hs = bh % Hs
    kh = hs * Hkv // Hs
    NB_b = NB + b * NKB
    FIRST_b = FIRST + b * NKB
    LAST_b = LAST + b * NKB
    CS_b = CS + b.to(tl.int64) * (Nk + 1)
    QP_r = QP + bh.to(tl.int64) * NQB * R
    KP_h = KP + (b * Hkv + kh).to(tl.int64) * NKB * R

    rows = pid * QB + tl.arange(0, QB)
    row_ok = rows < NQB
    t0 = rows * BS
    t1 = tl.minimum(t0 + BS, Nq)
    diag = tl.minimum(tl.maximum((t1 - 1 + OFF) // BS, 0), NKB - 1)

    # key-block range any row of this program may see
    js = 0
    je = NKB
    if CAUSAL:
        t1max = tl.minimum(pid * QB * BS + QB * BS, Nq)
        je = tl.minimum(tl.maximum((t1max - 1 + OFF) // BS + 1, 0), NKB)
    if WINDOW:
        js = tl.minimum(tl.maximum((pid * QB * BS + OFF - WIN + 1) // BS, 0), NKB)
    cols = tl.arange(0, BJ)

    # A. local threshold: first in a window around the diagonals, then a full scan if needed
    lthr = tl.full([QB], -1, dtype=tl.int32)
    if LOCAL > 0:
        dmin = tl.min(tl.where(row_ok, diag, NKB), axis=0)
        dmax = tl.max(tl.where(row_ok, diag, 0), axis=0)
        wlo = tl.maximum(js, dmin - NEAR)
        whi = tl.minimum(je, dmax + NEAR + 1)
        near = tl.zeros([QB], dtype=tl.int32)
        for c in range(wlo, whi, BJ):
            jj = c + cols
            visible, full, n = classify_blocks(jj, t0, t1, NB_b, FIRST_b, LAST_b, CS_b, Nk, NKB, OFF, WIN, BS,
                                               CAUSAL, WINDOW)
            close = visible & (tl.abs(jj[None, :] - diag[:, None]) <= NEAR) & (jj < whi)[None, :]
            near += tl.sum(close.to(tl.int32), axis=1)
        if tl.min(tl.where(row_ok, near, LOCAL), axis=0) >= LOCAL:
            lthr = _local_threshold(lthr, wlo, whi, t0, t1, diag, NB_b, FIRST_b, LAST_b, CS_b, Nk, NKB, OFF, WIN,
                                    LOCAL, QB, BJ, BS, CAUSAL, WINDOW)
        else:
            lthr = _local_threshold(lthr, js, je, t0, t1, diag, NB_b, FIRST_b, LAST_b, CS_b, Nk, NKB, OFF, WIN,
                                    LOCAL, QB, BJ, BS, CAUSAL, WINDOW)

    # B. one walk: forced blocks (largest key) and the remaining visible blocks by score
    best = tl.full([QB, KPB], SENTINEL, dtype=tl.int64)
    seen = tl.zeros([QB], dtype=tl.int32)
    nrem = tl.zeros([QB], dtype=tl.int32)
    nforced = tl.zeros([QB], dtype=tl.int32)
    for c in range(js, je, BJ):
        jj = c + cols
        jm = jj < je
        visible, full, n = classify_blocks(jj, t0, t1, NB_b, FIRST_b, LAST_b, CS_b, Nk, NKB, OFF, WIN, BS, CAUSAL,
                                           WINDOW)
        visible = visible & jm[None, :] & row_ok[:, None]
        vi = visible.to(tl.int32)
        sink = visible & ((seen[:, None] + tl.cumsum(vi, axis=1)) <= SINK)
        lkey = tl.abs(jj[None, :] - diag[:, None]) * NKB + jj[None, :]
        forced = (visible & (full == 0)) | sink | (visible & (lkey <= lthr[:, None]))
        rem = visible & (forced == 0)
        seen += tl.sum(vi, axis=1)
        nrem += tl.sum(rem.to(tl.int32), axis=1)
        nforced += tl.sum(forced.to(tl.int32), axis=1)
        low = (2147483647 - jj).to(tl.int64)[None, :]
        key = tl.where(forced, FORCED_HI + low, SENTINEL)
        if tl.max(tl.max(rem.to(tl.int32), axis=1), axis=0) > 0:
            sc = _score_keys(QP_r, KP_h, rows, row_ok, jj, jm, R, scale, QB, BJ, RC, USE_DOT)
            key = tl.where(rem, _encode(sc, jj), key)
        kth = tl.min(best, axis=1)
        if tl.max(tl.max((key > kth[:, None]).to(tl.int32), axis=1), axis=0) > 0:
            asc = tl.sort(key, dim=1, descending=False)
            top = tl.max(tl.reshape(asc, [QB, BJ // KPB, KPB]), axis=1)  # the KPB largest, ascending
            best = tl.sort(tl.maximum(best, top), dim=1, descending=True)

    # k per query block (budget.topk_count); S = the first n_forced + k entries of the buffer
    nvis = seen.to(tl.int64)
    if TOPK >= 0:
        k = tl.zeros_like(nvis) + TOPK
    else:
        k = (nvis * PPM + 999999) // 1000000
    if MINB >= 0:
        k = tl.maximum(k, MINB)
    if MAXB >= 0:
        k = tl.minimum(k, MAXB)
    k = tl.minimum(k, nrem.to(tl.int64))
    take = nforced + k.to(tl.int32)
    kcols = tl.arange(0, KPB)
    jsel = (2147483647 - (best & 0xFFFFFFFF)).to(tl.int32)
    jsel = tl.where(kcols[None, :] < take[:, None], jsel, 2**30)
    jsel = tl.sort(jsel, dim=1, descending=False)
    IDX_r = IDX + (bh.to(tl.int64) * NQB + rows.to(tl.int64)) * KMAX
    ok = row_ok[:, None] & (kcols[None, :] < take[:, None]) & (kcols[None, :] < KMAX)
    tl.store(IDX_r[:, None] + kcols[None, :], jsel, mask=ok)
    tl.store(CNT + bh.to(tl.int64) * NQB + rows, take, mask=row_ok)


def topk_capacity(nkb: int, cfg) -> int:
    """Upper bound on budget.topk_count for this config (the top-k buffer's width)."""
    if cfg.topk is not None:
        k = cfg.topk
    else:
        k = (nkb * cfg.density_ppm + 999_999) // 1_000_000
    if cfg.min_blocks is not None:
        k = max(k, cfg.min_blocks)
    if cfg.max_blocks is not None:
        k = min(k, cfg.max_blocks)
    return max(1, min(k, nkb))


def select(qp: Tensor, kp: Tensor, info: BlockInfo, scale: float, cfg, kmax: int) -> tuple[Tensor, Tensor]:
    """index ``[B, Hs, NQB, kmax]`` int32 ascending, padded -1; count ``[B, Hs, NQB]`` int32.

    qp: projected (and for "group" selection, group-summed) query block means
    ``[B, Hs, NQB, r]`` float32; kp: projected key block means ``[B, Hkv, NKB, r]`` float32.
    """
    qp = qp.contiguous().float()
    kp = kp.contiguous().float()
    b, hs, nqb, r = qp.shape
    hkv = kp.shape[1]
    index = torch.full((b, hs, nqb, kmax), -1, dtype=torch.int32, device=qp.device)
    count = torch.empty((b, hs, nqb), dtype=torch.int32, device=qp.device)
    kpb = max(16, triton.next_power_of_2(min(kmax, info.nkb)))
    if kpb <= 128:  # 16 query blocks a program, scores by an fp32 dot, chunks wider than the buffer
        bj = max(kpb, min(128, triton.next_power_of_2(info.nkb)))
        qb = 16
    else:  # wide buffers: fewer rows a program (registers), scores by broadcast products
        bj = kpb
        qb = max(1, 2048 // kpb)
    qb = min(qb, max(1, triton.next_power_of_2(nqb)))
    use_dot = qb >= 16
    rc = 16 if use_dot else min(triton.next_power_of_2(r), max(1, 16384 // (qb * bj)))
    warps = 4 if qb * bj < 1024 else 8
    _select_kernel[(triton.cdiv(nqb, qb), b * hs)](
        qp, kp, info.n, info.first, info.last, info.cs, index, count,
        hs, hkv, info.nq, info.nk, nqb, info.nkb, r, kmax,
        info.offset, info.win, float(scale),
        cfg.sink_blocks, cfg.local_blocks,
        -1 if cfg.topk is None else cfg.topk, cfg.density_ppm,
        -1 if cfg.min_blocks is None else cfg.min_blocks,
        -1 if cfg.max_blocks is None else cfg.max_blocks,
        CAUSAL=info.causal, WINDOW=info.has_window,
        BS=info.block, QB=qb, KPB=kpb, BJ=bj, RC=rc, USE_DOT=use_dot, NEAR=cfg.local_blocks + 4,
        num_warps=warps,
    )
    return index, count
