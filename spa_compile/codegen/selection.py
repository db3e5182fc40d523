"""Projector scores and streaming top-k selection (SPEC.md sections 1-2).

One program per (batch, selection head, QB consecutive query blocks). It walks the
key blocks in chunks of KP and keeps, per query block, a running top-KP buffer of
64-bit keys ``(orderable score bits << 32) | (2**31 - 1 - j)`` (ties: lower j first),
merged chunk by chunk with the bitonic trick (``max(desc, asc)`` keeps the KP largest
of the union, then one sort). No (NQB x NKB) score matrix ever reaches global memory.

Passes over the key blocks of one program:

A. ``local_blocks`` min-scans: the local-th smallest ``|j - diag| * NKB + j`` over
   visible blocks (the local threshold);
B. forced flags (partial | sink | local), counts, and the running top-k over the
   remaining visible blocks;
C. the same flags and scores again: ``chosen = forced | key >= k-th key``, written in
   ascending order with a running prefix count.
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
LOCAL_BIG = tl.constexpr(2**62)


@triton.jit
def _score_keys(QP_r, KP_h, rows, row_ok, jj, jm, R, scale, QB: tl.constexpr, BJ: tl.constexpr, RC: tl.constexpr):
    """scale * qp[rows] . kp[jj] in float32 as ``[QB, BJ]``."""
    acc = tl.zeros([QB, BJ], dtype=tl.float32)
    for r0 in range(0, R, RC):
        rr = r0 + tl.arange(0, RC)
        rm = rr < R
        qv = tl.load(QP_r + rows[:, None].to(tl.int64) * R + rr[None, :], mask=row_ok[:, None] & rm[None, :], other=0.0)
        kv = tl.load(KP_h + jj[:, None].to(tl.int64) * R + rr[None, :], mask=jm[:, None] & rm[None, :], other=0.0)
        acc += tl.sum(qv[:, None, :] * kv[None, :, :], axis=2)
    s = acc * scale
    return tl.where(s == 0.0, 0.0, s)  # -0.0 -> +0.0: equal scores must tie


@triton.jit
def _encode(s, jj):
    bits = s.to(tl.int32, bitcast=True)
    ordered = tl.where(bits < 0, bits ^ 0x7FFFFFFF, bits)
    return (ordered.to(tl.int64) << 32) + (2147483647 - jj).to(tl.int64)[None, :]


@triton.jit
def _flags(
    jj, t0, t1, diag, seen, lthr, NB_b, FIRST_b, LAST_b, CS_b, Nk, NKB, OFF, WIN, SINK,
    BS: tl.constexpr, CAUSAL: tl.constexpr, WINDOW: tl.constexpr,
):
    visible, full, n = classify_blocks(jj, t0, t1, NB_b, FIRST_b, LAST_b, CS_b, Nk, NKB, OFF, WIN, BS, CAUSAL, WINDOW)
    vi = visible.to(tl.int32)
    cumv = seen[:, None] + tl.cumsum(vi, axis=1)
    sink = visible & (cumv <= SINK)
    dist = tl.abs(jj[None, :] - diag[:, None]).to(tl.int64)
    lkey = dist * NKB + jj[None, :]
    local = visible & (lkey <= lthr[:, None])
    partial = visible & (full == 0)
    forced = partial | sink | local
    rem = visible & (forced == 0)
    return visible, forced, rem, tl.sum(vi, axis=1)


@triton.jit
def _select_kernel(
    QP, KP, NB, FIRST, LAST, CS, IDX, CNT,
    Hs, Hkv, Nq, Nk, NQB, NKB, R, KMAX,
    OFF, WIN, scale,
    SINK, LOCAL, TOPK, PPM, MINB, MAXB,
    CAUSAL: tl.constexpr, WINDOW: tl.constexpr,
    BS: tl.constexpr, QB: tl.constexpr, KPB: tl.constexpr, RC: tl.constexpr,
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
    cols = tl.arange(0, KPB)

    # A. local threshold: the LOCAL-th smallest distance key among visible blocks
    lthr = tl.full([QB], -1, dtype=tl.int64)
    for _l in range(LOCAL):
        cur = tl.full([QB], LOCAL_BIG, dtype=tl.int64)
        for c in range(js, je, KPB):
            jj = c + cols
            visible, full, n = classify_blocks(jj, t0, t1, NB_b, FIRST_b, LAST_b, CS_b, Nk, NKB, OFF, WIN, BS, CAUSAL, WINDOW)
            dist = tl.abs(jj[None, :] - diag[:, None]).to(tl.int64)
            lkey = dist * NKB + jj[None, :]
            lkey = tl.where(visible & (lkey > lthr[:, None]) & (jj < je)[None, :], lkey, LOCAL_BIG)
            cur = tl.minimum(cur, tl.min(lkey, axis=1))
        lthr = cur

    # B. counts and the running top-KP of the remaining visible blocks
    best = tl.full([QB, KPB], SENTINEL, dtype=tl.int64)
    seen = tl.zeros([QB], dtype=tl.int32)
    nrem = tl.zeros([QB], dtype=tl.int32)
    for c in range(js, je, KPB):
        jj = c + cols
        jm = jj < je
        visible, forced, rem, nv = _flags(jj, t0, t1, diag, seen, lthr, NB_b, FIRST_b, LAST_b, CS_b, Nk, NKB, OFF, WIN, SINK, BS, CAUSAL, WINDOW)
        seen += nv
        nrem += tl.sum(rem.to(tl.int32), axis=1)
        if tl.max(tl.max(rem.to(tl.int32), axis=1), axis=0) > 0:
            s = _score_keys(QP_r, KP_h, rows, row_ok, jj, jm, R, scale, QB, KPB, RC)
            key = tl.where(rem, _encode(s, jj), SENTINEL)
            kth = tl.min(best, axis=1)
            if tl.max(tl.max((key > kth[:, None]).to(tl.int32), axis=1), axis=0) > 0:
                asc = tl.sort(key, dim=1, descending=False)
                best = tl.sort(tl.maximum(best, asc), dim=1, descending=True)

    # k per query block (budget.topk_count), then the k-th key as the threshold
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
    kth = tl.max(tl.where(cols[None, :].to(tl.int64) == (k - 1)[:, None], best, SENTINEL), axis=1)
    thr = tl.where(k > 0, kth, MAXKEY)

    # C. write forced | top-k in ascending order
    base = tl.zeros([QB], dtype=tl.int32)
    seen = tl.zeros([QB], dtype=tl.int32)
    IDX_r = IDX + (bh.to(tl.int64) * NQB + rows.to(tl.int64)) * KMAX
    for c in range(js, je, KPB):
        jj = c + cols
        jm = jj < je
        visible, forced, rem, nv = _flags(jj, t0, t1, diag, seen, lthr, NB_b, FIRST_b, LAST_b, CS_b, Nk, NKB, OFF, WIN, SINK, BS, CAUSAL, WINDOW)
        seen += nv
        chosen = forced
        if tl.max(tl.max(rem.to(tl.int32), axis=1), axis=0) > 0:
            s = _score_keys(QP_r, KP_h, rows, row_ok, jj, jm, R, scale, QB, KPB, RC)
            key = tl.where(rem, _encode(s, jj), SENTINEL)
            chosen = chosen | (rem & (key >= thr[:, None]))
        ci = chosen.to(tl.int32)
        pos = base[:, None] + tl.cumsum(ci, axis=1) - 1
        ok = chosen & row_ok[:, None] & (pos < KMAX)
        tl.store(IDX_r[:, None] + pos, (tl.zeros_like(pos) + jj[None, :]).to(tl.int32), mask=ok)
        base += tl.sum(ci, axis=1)
    tl.store(CNT + bh.to(tl.int64) * NQB + rows, base, mask=row_ok)


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
    kpb = max(16, triton.next_power_of_2(topk_capacity(info.nkb, cfg)))
    qb = max(1, min(16, 4096 // kpb, triton.next_power_of_2(nqb)))
    rc = min(triton.next_power_of_2(r), max(1, 16384 // (qb * kpb)))
    warps = 4 if qb * kpb <= 1024 else 8
    _select_kernel[(triton.cdiv(nqb, qb), b * hs)](
        qp, kp, info.n, info.first, info.last, info.cs, index, count,
        hs, hkv, info.nq, info.nk, nqb, info.nkb, r, kmax,
        info.offset, info.win, float(scale),
        cfg.sink_blocks, cfg.local_blocks,
        -1 if cfg.topk is None else cfg.topk, cfg.density_ppm,
        -1 if cfg.min_blocks is None else cfg.min_blocks,
        -1 if cfg.max_blocks is None else cfg.max_blocks,
        CAUSAL=info.causal, WINDOW=info.has_window,
        BS=info.block, QB=qb, KPB=kpb, RC=rc,
        num_warps=warps,
    )
    return index, count
