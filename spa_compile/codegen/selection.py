"""Projector scores and top-k selection (SPEC.md sections 1-2): two kernels, the same result.

Dense (``_select_dense_kernel``, NKB <= DENSE_MAX_NKB by default): a program holds all
scores of its query blocks in registers (key-major ``[NKBP, QB]`` tiles by default), finds each
row's k-th largest remaining score by a binary search on the orderable score bits (count of keys
>= candidate; it stops once every row counts exactly k), takes the keys above it and, of those
equal to it, the lowest j first (a prefix count: the order of the 64-bit keys below), and writes
S ascending plus the -1 padding by prefix counts (no sort).

Streaming (``_select_kernel``, longer rows): one program per (batch, selection head, QB
consecutive query blocks). It walks the key blocks in chunks of BJ and keeps, per query block,
a running buffer of the KP largest 64-bit keys ``(orderable score bits << 32) | (2**31 - 1 - j)`` (ties: lower j first).
Forced blocks (partial | sink | local) enter the same buffer with the largest score key, so
after the walk the buffer's last ``n_forced + k`` entries (it is ascending) are exactly S; KP
is the bound ``budget.max_selected`` on |S|. A chunk is merged by a bitonic top-KP of the chunk
(descending) and one bitonic merge of ``max(best_asc, top_desc)`` (``_merge_top``); chunks
with no key above the buffer's minimum skip the merge. No (NQB x NKB) score matrix ever
reaches global memory.

The local blocks (the ``local_blocks`` visible blocks nearest the diagonal) are found first
in a window around the diagonals of the program's rows; a row with too few visible blocks
in the window falls back to min-scans over its whole key range.

Both kernels use the same score arithmetic for a shape (``_dense_config`` copies the streaming
launcher's dot/broadcast choice and RC), write the whole index row (``-1`` padding included:
``index`` is ``torch.empty``), and can sum the query heads of a group themselves (``group=``).
``SPA_SELECT_PATH=auto|dense|stream`` or ``select(..., path=)`` chooses a path; the default is
"auto" (``DEFAULT_PATH``).
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl
from torch import Tensor

from .blockinfo import BlockInfo
from .common import classify_blocks, per_key, per_row
from .switches import env_switch

SENTINEL = tl.constexpr(-(2**63))
MAXKEY = tl.constexpr(2**63 - 1)
LOCAL_BIG = tl.constexpr(2**30)  # |j - diag| * NKB + j < 2**30 for NKB < 32K (2M tokens at block 64)
FORCED_HI = tl.constexpr(2147483647 * 4294967296)  # the score part of a forced block's key


@triton.jit
def _score_keys(QP_r, KP_h, rows, row_ok, jj, jm, R, scale, QB: tl.constexpr, BJ: tl.constexpr, RC: tl.constexpr,
                USE_DOT: tl.constexpr, GS, sqg, PREC: tl.constexpr = "ieee", KT: tl.constexpr = False, NKB=0):
    """scale * qp[rows] . kp[jj] in float32 as ``[QB, BJ]``: fp32 FMA (PREC "ieee"), or with
    USE_DOT and PREC "tf32x3" three tf32 tensor-core products (near fp32: tf32 alone, 10 mantissa
    bits, would reorder blocks whose scores differ by 1e-3).

    With GS > 1 the query rows are the sum of GS heads ``sqg`` elements apart (the group sum of
    "group" selection, done here instead of by a torch launch). KT (with USE_DOT): KP_h is the
    head's transposed key means ``[R, NKB]``, loaded as the dot's ``[RC, BJ]`` operand directly.
    The same products in the same order; what changes is the operand's shared-memory layout:
    from ``[BJ, RC]`` rows, the FMA dot's reads of one k across the lanes' columns hit two banks
    (16-way conflicts: 77% of the streaming kernel's shared wavefronts at 128K, Nsight Compute,
    H200, 2026-11-29)."""
    acc = tl.zeros([QB, BJ], dtype=tl.float32)
    for r0 in range(0, R, RC):
        rr = r0 + tl.arange(0, RC)
        rm = rr < R
        qptr = QP_r + rows[:, None].to(tl.int64) * R + rr[None, :]
        qm = row_ok[:, None] & rm[None, :]
        qv = tl.load(qptr, mask=qm, other=0.0)
        for g in range(1, GS):
            qv += tl.load(qptr + g * sqg, mask=qm, other=0.0)
        if USE_DOT and KT:
            kt = tl.load(KP_h + rr[:, None].to(tl.int64) * NKB + jj[None, :], mask=rm[:, None] & jm[None, :], other=0.0)
            acc += tl.dot(qv, kt, input_precision=PREC)
        elif USE_DOT:
            kv = tl.load(KP_h + jj[:, None].to(tl.int64) * R + rr[None, :], mask=jm[:, None] & rm[None, :], other=0.0)
            acc += tl.dot(qv, tl.trans(kv), input_precision=PREC)
        else:
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
def _local_threshold(lthr0, lo, hi, t0, t1, diag, NB_b, FIRST_b, LAST_b, CS_b, Nk, NKB, OFF, WIN, LOCAL,
                     QB: tl.constexpr, BJ: tl.constexpr, BS: tl.constexpr, CAUSAL: tl.constexpr,
                     WINDOW: tl.constexpr, HAS_KV: tl.constexpr):
    """The LOCAL-th smallest ``|j - diag| * NKB + j`` over visible blocks j in [lo, hi)."""
    lthr = lthr0
    cols = tl.arange(0, BJ)
    for _l in range(LOCAL):
        cur = tl.full([QB], LOCAL_BIG, dtype=tl.int32)
        for c in range(lo, hi, BJ):
            jj = c + cols
            visible, full, n = classify_blocks(jj, t0, t1, NB_b, FIRST_b, LAST_b, CS_b, Nk, NKB, OFF, WIN, BS,
                                               CAUSAL, WINDOW, HAS_KV)
            lkey = tl.abs(jj[None, :] - diag[:, None]) * NKB + jj[None, :]
            lkey = tl.where(visible & (lkey > lthr[:, None]) & (jj < hi)[None, :], lkey, LOCAL_BIG)
            cur = tl.minimum(cur, tl.min(lkey, axis=1))
        lthr = cur
    return lthr


@triton.jit
def _kth_threshold(ordered, rem, k, QB: tl.constexpr, RB: tl.constexpr, FW: tl.constexpr, KM: tl.constexpr = False):
    """T per row: the largest t with #{rem: ordered >= t} >= k (k <= #rem), from the top bit down.

    RB = 1: a binary search, 32 steps of one row sum each. RB > 1: RB bits a step (2**RB - 1
    candidates ``tu + m * 2**sh``) with still one row sum: an element reaching candidates 1..p
    (p = its offset from tu >> sh) adds a one to FW-bit fields 1..p of an int64, so field m of
    the sum counts the elements >= candidate m. FW bits must hold any count <= NKBP, and
    (2**RB - 1) * FW <= 63: RB = 3 with 9-bit fields (NKBP <= 256), RB = 2 with 10-bit fields.
    The row sums are what a step costs on the GPU (a cross-warp reduction each): 32 -> 11 (RB 3).
    Same T, bit for bit, whatever RB. KM: key-major tiles ``[NKBP, QB]`` (rows along axis 1)."""
    AX: tl.constexpr = 0 if KM else 1
    if RB == 1:
        tu = tl.zeros([QB], dtype=tl.int64)
        step = tl.full([QB], 2147483648, dtype=tl.int64)
        for _b in range(32):
            cand = tu + step
            ct = (cand - 2147483648).to(tl.int32)
            c = tl.sum((rem & (ordered >= per_row(ct, KM))).to(tl.int32), axis=AX)
            tu = tl.where(c >= k, cand, tu)
            step = step // 2
    else:
        ou = ordered.to(tl.int64) + 2147483648  # [0, 2**32): unsigned order
        tu = tl.zeros([QB], dtype=tl.int64)
        for st in tl.static_range((32 + RB - 1) // RB):
            sh = RB * ((32 + RB - 1) // RB - 1 - st)
            d = ou - per_row(tu, KM)
            p = tl.where(rem & (d >= 0), d >> sh, 0)  # candidates reached (capped below)
            ones = tl.zeros(p.shape, dtype=tl.int64)
            for m in tl.static_range(1, 1 << RB):
                ones += tl.where(p >= m, 1 << (FW * (m - 1)), 0).to(tl.int64)
            tot = tl.sum(ones, axis=AX)
            mm = tl.zeros([QB], dtype=tl.int64)
            for m in tl.static_range(1, 1 << RB):
                cm = (tot >> (FW * (m - 1))) & ((1 << FW) - 1)
                mm = tl.where(cm >= k, m, mm)
            tu = tu + (mm << sh)
        tu = tl.minimum(tu, 4294967295)  # k = 0 takes every candidate (2**33 - 1 would wrap to the same T)
    return (tu - 2147483648).to(tl.int32)


@triton.jit
def _kth_early(ordered, k, QB: tl.constexpr, KM: tl.constexpr = False):
    """(T, exact): ``_kth_threshold``'s T at RB = 1 (the entries that are not candidates hold
    INT_MIN, which no tested t reaches), the search in int32 and stopped once every row counts
    exactly k at its candidate t (tested each step: a max over the row vector, which every
    thread holds). T is then the smallest entry >= t, the k-th largest, which the remaining
    steps would have reached; ``exact`` (a scalar) says every row stopped so, i.e. exactly k
    entries are >= T: no surplus ties. Otherwise all 32 steps run, as the plain search. KM: as
    ``_kth_threshold``."""
    AX: tl.constexpr = 0 if KM else 1
    c = tl.sum((ordered >= 0).to(tl.int32), axis=AX)  # the top bit: candidate 0 in signed order
    ok = c >= k
    ts = tl.where(ok, 0, -2147483647 - 1)
    cnt = tl.where(ok, c, -1)
    b = tl.full([], 30, dtype=tl.int32)
    busy = tl.max((cnt != k).to(tl.int32), axis=0) > 0
    while busy:
        cand = ts + (tl.full([], 1, dtype=tl.int32) << b)  # no overflow: ts holds the bits above b only
        c = tl.sum((ordered >= per_row(cand, KM)).to(tl.int32), axis=AX)
        ok = c >= k
        ts = tl.where(ok, cand, ts)
        cnt = tl.where(ok, c, cnt)
        b -= 1
        busy = (b >= 0) & (tl.max((cnt != k).to(tl.int32), axis=0) > 0)
    exact = tl.max((cnt != k).to(tl.int32), axis=0) == 0
    return tl.min(tl.where(ordered >= per_row(ts, KM), ordered, 2147483647), axis=AX), exact


@triton.jit
def _merge_top(best, key, KPB: tl.constexpr):
    """The KPB largest of ``best`` (``[QB, KPB]``, ascending) and ``key`` (``[QB, BJ]``), ascending.

    The chunk's KPB largest come descending from a bitonic top-k (``tl.topk``: the first
    log2(KPB) stages of a sort, then halving), so that ``max(best, top)`` is bitonic and holds
    the KPB largest of the union; one bitonic merge (log2(KPB) rounds) sorts it. A full sort
    of the chunk and of the merged buffer did the same with 28 + 21 rounds at BJ 128, KPB 64
    (now 21 + 6 + 6)."""
    top = tl.topk(key, KPB, dim=1)
    return tl.bitonic_merge(tl.maximum(best, top), dim=1, descending=False)


@triton.jit
def _topk_count(nvis, nrem, TOPK, PPM, MINB, MAXB):
    """k per query block, int32: budget.topk_count (integer ppm arithmetic, so it equals the
    reference exactly), capped by the nrem unforced visible blocks left."""
    nv = nvis.to(tl.int64)
    if TOPK >= 0:
        k = tl.zeros_like(nv) + TOPK
    else:
        k = (nv * PPM + 999999) // 1000000
    if MINB >= 0:
        k = tl.maximum(k, MINB)
    if MAXB >= 0:
        k = tl.minimum(k, MAXB)
    return tl.minimum(k, nrem.to(tl.int64)).to(tl.int32)


@triton.jit
def _program_rows(QP, KP, NB, FIRST, LAST, CS, Hs, Hkv, Nq, Nk, NQB, NKB, R, GS, OFF, WIN,
                  CAUSAL: tl.constexpr, WINDOW: tl.constexpr, BS: tl.constexpr, QB: tl.constexpr, PID0=0,
                  LPT: tl.constexpr = False):
    """What both selection kernels start from: the (batch, selection head)'s pointers, the
    program's QB query-block rows, their diagonals and the key-block range [js, je) any of
    them may see. PID0: the launch's first program (the dense path's causal tiers).

    LPT (longest first): the grid is ``(B * Hs, programs)`` and the programs run from the last
    query blocks down, every head's at once: under a causal mask the last rows walk the most key
    blocks, and launched last (grid ``(programs, B * Hs)``, query blocks ascending, one head
    after the other) they ran alone at the end. The same lists: only the order changes."""
    if LPT:
        pid = PID0 + tl.num_programs(1) - 1 - tl.program_id(1)
        bh = tl.program_id(0)
    else:
        pid = tl.program_id(0) + PID0
        bh = tl.program_id(1)
    b = bh // Hs
    kh = (bh % Hs) * Hkv // Hs
    NB_b = NB + b * NKB
    FIRST_b = FIRST + b * NKB
    LAST_b = LAST + b * NKB
    CS_b = CS + b.to(tl.int64) * (Nk + 1)
    QP_r = QP + (bh * GS).to(tl.int64) * NQB * R
    KP_h = KP + (b * Hkv + kh).to(tl.int64) * NKB * R
    rows = pid * QB + tl.arange(0, QB)
    row_ok = rows < NQB
    t0 = rows * BS
    t1 = tl.minimum(t0 + BS, Nq)
    diag = tl.minimum(tl.maximum((t1 - 1 + OFF) // BS, 0), NKB - 1)
    js = 0
    je = NKB
    if CAUSAL:
        t1max = tl.minimum(pid * QB * BS + QB * BS, Nq)
        je = tl.minimum(tl.maximum((t1max - 1 + OFF) // BS + 1, 0), NKB)
    if WINDOW:
        js = tl.minimum(tl.maximum((pid * QB * BS + OFF - WIN + 1) // BS, 0), NKB)
    return bh, b, NB_b, FIRST_b, LAST_b, CS_b, QP_r, KP_h, rows, row_ok, t0, t1, diag, js, je


@triton.jit
def _select_kernel(
    QP, KP, NB, FIRST, LAST, CS, IDX, CNT,
    Hs, Hkv, Nq, Nk, NQB, NKB, R, KMAX, GS,
    OFF, WIN, scale,
    SINK, LOCAL, TOPK, PPM, MINB, MAXB,
    CAUSAL: tl.constexpr, WINDOW: tl.constexpr,
    BS: tl.constexpr, QB: tl.constexpr, KPB: tl.constexpr, BJ: tl.constexpr, RC: tl.constexpr,
    USE_DOT: tl.constexpr, NEAR: tl.constexpr, HALF: tl.constexpr = False, STOP: tl.constexpr = 0,
    PREC: tl.constexpr = "ieee", HAS_KV: tl.constexpr = True, FAST: tl.constexpr = True, LPT: tl.constexpr = False,
    KT: tl.constexpr = False,
):
    (bh, b, NB_b, FIRST_b, LAST_b, CS_b, QP_r, KP_h, rows, row_ok, t0, t1, diag, js, je) = _program_rows(
        QP, KP, NB, FIRST, LAST, CS, Hs, Hkv, Nq, Nk, NQB, NKB, R, GS, OFF, WIN, CAUSAL, WINDOW, BS, QB, 0, LPT)
    cols = tl.arange(0, BJ)

    # A. local threshold: first in a window around the diagonals, then a full scan if needed
    lthr = tl.full([QB], -1, dtype=tl.int32)
    dmin = tl.min(tl.where(row_ok, diag, NKB), axis=0)
    dmax = tl.max(tl.where(row_ok, diag, 0), axis=0)
    near_path = LOCAL <= 0  # the local blocks lie within NEAR of every row's diagonal
    if LOCAL > 0:
        wlo = tl.maximum(js, dmin - NEAR)
        whi = tl.minimum(je, dmax + NEAR + 1)
        near = tl.zeros([QB], dtype=tl.int32)
        for c in range(wlo, whi, BJ):
            jj = c + cols
            visible, full, n = classify_blocks(jj, t0, t1, NB_b, FIRST_b, LAST_b, CS_b, Nk, NKB, OFF, WIN, BS,
                                               CAUSAL, WINDOW, HAS_KV)
            close = visible & (tl.abs(jj[None, :] - diag[:, None]) <= NEAR) & (jj < whi)[None, :]
            near += tl.sum(close.to(tl.int32), axis=1)
        if tl.min(tl.where(row_ok, near, LOCAL), axis=0) >= LOCAL:
            near_path = LOCAL > 0  # i.e. True (a tensor, like the initial value: one type across branches)
            lthr = _local_threshold(lthr, wlo, whi, t0, t1, diag, NB_b, FIRST_b, LAST_b, CS_b, Nk, NKB, OFF, WIN,
                                    LOCAL, QB, BJ, BS, CAUSAL, WINDOW, HAS_KV)
        else:
            lthr = _local_threshold(lthr, js, je, t0, t1, diag, NB_b, FIRST_b, LAST_b, CS_b, Nk, NKB, OFF, WIN,
                                    LOCAL, QB, BJ, BS, CAUSAL, WINDOW, HAS_KV)

    # Interior chunks (FAST: no key padding, no window): every block of [c, c + BJ) is fully visible
    # to every row (below fb, the first block the program's first row does not fully see) and is
    # neither a sink (c >= SINK: the visible blocks start at 0) nor local (farther than NEAR from
    # every diagonal, when the local blocks were found within NEAR): no classification, no forced
    # block, every column scored. At 128K most of a program's chunks are interior; the H200 stage
    # went 1.78 -> 1.68 ms (top-k 32, Hkv=8): the key encoding, reductions and merges remain.
    FAST_OK: tl.constexpr = FAST and not HAS_KV and not WINDOW
    fb = NKB
    if CAUSAL:
        y = tl.min(t0, axis=0) + OFF + 1  # the program's first row
        fb = tl.minimum(tl.where(y > 0, y // BS, 0), NKB)

    # B. one walk: forced blocks (largest key) and the remaining visible blocks by score
    best = tl.full([QB, KPB], SENTINEL, dtype=tl.int64)
    seen = tl.zeros([QB], dtype=tl.int32)
    nrem = tl.zeros([QB], dtype=tl.int32)
    nforced = tl.zeros([QB], dtype=tl.int32)
    for c in range(js, je, BJ):
        jj = c + cols
        jm = jj < je
        far = (c + BJ + NEAR <= dmin) | (c > dmax + NEAR) | (LOCAL == 0)
        interior = near_path & far & (c >= SINK) & (c + BJ <= fb) & (c + BJ <= je) & FAST_OK
        if interior:
            rem = jm[None, :] & row_ok[:, None]
            seen += BJ
            nrem += BJ
            key = tl.full([QB, BJ], SENTINEL, dtype=tl.int64)
        else:
            visible, full, n = classify_blocks(jj, t0, t1, NB_b, FIRST_b, LAST_b, CS_b, Nk, NKB, OFF, WIN, BS, CAUSAL,
                                               WINDOW, HAS_KV)
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
            if STOP == 2:  # timing only (bench_selection.py --stream-variants): the walk without its scores
                sc = (jj[None, :] % 61).to(tl.float32) + rows[:, None].to(tl.float32)
            else:
                sc = _score_keys(QP_r, KP_h, rows, row_ok, jj, jm, R, scale, QB, BJ, RC, USE_DOT, GS, NQB * R, PREC,
                                 KT, NKB)
            key = tl.where(rem, _encode(sc, jj), key)
        kth = tl.min(best, axis=1)
        if STOP == 1:  # timing only (bench_selection.py --phases): the walk without its merges
            best = tl.maximum(best, tl.max(key, axis=1)[:, None])
        elif tl.max(tl.max((key > kth[:, None]).to(tl.int32), axis=1), axis=0) > 0:
            best = _merge_top(best, key, KPB)

    # k per query block (budget.topk_count); S = the last n_forced + k entries of the (ascending) buffer
    k = _topk_count(seen, nrem, TOPK, PPM, MINB, MAXB)
    if HALF:  # block_score "hybrid": the projector's ceil(k/2), bound_selection adds the rest
        k = (k + 1) // 2
    take = nforced + k
    kcols = tl.arange(0, KPB)
    jsel = (2147483647 - (best & 0xFFFFFFFF)).to(tl.int32)
    jsel = tl.where(kcols[None, :] >= KPB - take[:, None], jsel, 2**30)
    jsel = tl.sort(jsel, dim=1, descending=False)
    IDX_r = IDX + (bh.to(tl.int64) * NQB + rows.to(tl.int64)) * KMAX
    jsel = tl.where(kcols[None, :] < take[:, None], jsel, -1)  # KPB >= KMAX: the row's padding too
    ok = row_ok[:, None] & (kcols[None, :] < KMAX)
    tl.store(IDX_r[:, None] + kcols[None, :], jsel, mask=ok)
    tl.store(CNT + bh.to(tl.int64) * NQB + rows, take, mask=row_ok)


@triton.jit
def _select_dense_kernel(
    QP, KP, NB, FIRST, LAST, CS, IDX, CNT,
    Hs, Hkv, Nq, Nk, NQB, NKB, R, KMAX, GS,
    OFF, WIN, scale,
    SINK, LOCAL, TOPK, PPM, MINB, MAXB,
    CAUSAL: tl.constexpr, WINDOW: tl.constexpr,
    BS: tl.constexpr, QB: tl.constexpr, NKBP: tl.constexpr, RC: tl.constexpr, USE_DOT: tl.constexpr,
    RB: tl.constexpr = 1, FW: tl.constexpr = 10, HALF: tl.constexpr = False, STOP: tl.constexpr = 0,
    PREC: tl.constexpr = "ieee", HAS_KV: tl.constexpr = True, PID0=0, LPT: tl.constexpr = False,
    KT: tl.constexpr = False, EARLY: tl.constexpr = True, KM: tl.constexpr = False,
):
    """All NKB key blocks of QB query blocks at once (NKB <= NKBP): classify, score, then the
    k-th largest remaining score of each row by a search on its orderable bits, RB bits a step
    (``_kth_threshold``), ties at the threshold to the lower j by a prefix count; S ascending by
    a prefix count. Causal launches come in tiers (``dense_tiers``): the programs whose key range
    ends within NKBP columns, from program PID0 on.

    KM (key-major): the tiles are ``[NKBP, QB]``, for which Triton's default layout puts the warps
    along the key blocks and one query row in a thread (16 key blocks each at 16 x 256, 8 warps),
    where ``[QB, NKBP]`` puts every row in every thread: each per-row vector (k, counts, the
    search's candidate) then costs QB registers and instructions a thread, and a row sum five
    shuffles a row. The same arithmetic (the scores are the same dot, transposed), the same lists."""
    (bh, b, NB_b, FIRST_b, LAST_b, CS_b, QP_r, KP_h, rows, row_ok, t0, t1, diag, js, je) = _program_rows(
        QP, KP, NB, FIRST, LAST, CS, Hs, Hkv, Nq, Nk, NQB, NKB, R, GS, OFF, WIN, CAUSAL, WINDOW, BS, QB, PID0, LPT)
    AX: tl.constexpr = 0 if KM else 1  # the key-block axis of a tile: row reductions and prefix counts

    jj = tl.arange(0, NKBP)
    jm = (jj >= js) & (jj < je)
    visible, full, n = classify_blocks(jj, t0, t1, NB_b, FIRST_b, LAST_b, CS_b, Nk, NKB, OFF, WIN, BS, CAUSAL,
                                       WINDOW, HAS_KV, KM)
    visible = visible & per_key(jm, KM) & per_row(row_ok, KM)
    vi = visible.to(tl.int32)
    jb = per_key(jj, KM)
    if HAS_KV:
        sink = visible & (tl.cumsum(vi, axis=AX) <= SINK)
    else:  # geometry alone: each row's visible blocks are one interval, the sinks its first SINK
        sink = visible & (jb < per_row(tl.min(tl.where(visible, jb, NKBP), axis=AX), KM) + SINK)
    # local: the LOCAL smallest |j - diag| * NKB + j over visible j (all of them when fewer)
    lkey = tl.where(visible, tl.abs(jb - per_row(diag, KM)) * NKB + jb, LOCAL_BIG)
    lthr = tl.full([QB], -1, dtype=tl.int32)
    for _l in range(LOCAL):
        lthr = tl.min(tl.where(lkey > per_row(lthr, KM), lkey, LOCAL_BIG), axis=AX)
    forced = (visible & (full == 0)) | sink | (visible & (lkey <= per_row(lthr, KM)))
    rem = visible & (forced == 0)
    nvis = tl.sum(vi, axis=AX)
    nrem = tl.sum(rem.to(tl.int32), axis=AX)
    nforced = tl.sum(forced.to(tl.int32), axis=AX)
    if STOP == 1:  # STOP: benchmarks/bench_selection.py --phases times the kernel cut after each phase
        tl.store(CNT + bh.to(tl.int64) * NQB + rows, nrem + nforced, mask=row_ok)
        return

    # k per query block (budget.topk_count)
    k = _topk_count(nvis, nrem, TOPK, PPM, MINB, MAXB)
    if HALF:  # block_score "hybrid": the projector's ceil(k/2), bound_selection adds the rest
        k = (k + 1) // 2

    sel = forced
    if tl.max(nrem, axis=0) > 0:
        sc = _score_keys(QP_r, KP_h, rows, row_ok, jj, jm, R, scale, QB, NKBP, RC, USE_DOT, GS, NQB * R, PREC, KT, NKB)
        if KM:
            sc = tl.trans(sc)
        bits = sc.to(tl.int32, bitcast=True)
        ordered = tl.where(bits < 0, bits ^ 0x7FFFFFFF, bits)  # signed order = float order (as _encode)
        ordered = tl.where(rem, ordered, -2147483647 - 1)
        if STOP == 2:
            tl.store(CNT + bh.to(tl.int64) * NQB + rows, tl.max(ordered, axis=AX), mask=row_ok)
            return
        if RB == 1 and EARLY:
            thr, exact = _kth_early(ordered, k, QB, KM)
        else:
            thr = _kth_threshold(ordered, rem, k, QB, RB, FW, KM)
            exact = tl.max(k, axis=0) < 0  # False (a scalar tensor, as the early search's flag)
        if STOP == 3:
            tl.store(CNT + bh.to(tl.int64) * NQB + rows, thr, mask=row_ok)
            return
        if exact:  # exactly k remaining blocks >= T in every row
            sel = sel | (rem & (ordered >= per_row(thr, KM)))
        else:
            gt = rem & (ordered > per_row(thr, KM))
            eq = rem & (ordered == per_row(thr, KM))
            need = k - tl.sum(gt.to(tl.int32), axis=AX)  # ties at T: the lowest j first (the key's low half)
            sel = sel | gt | (eq & (tl.cumsum(eq.to(tl.int32), axis=AX) <= per_row(need, KM)))
    take = nforced + k

    # S ascending at slots [0, take), then -1 up to KMAX: selected j to slot (its prefix count - 1),
    # the others to take + (their prefix count - 1): every slot below NKBP >= KMAX written once
    si = sel.to(tl.int32)
    csum = tl.cumsum(si, axis=AX)
    slot = tl.where(sel, csum - 1, per_row(take, KM) + jb - csum)
    val = tl.where(sel, jb + tl.zeros_like(si), -1)
    IDX_r = IDX + (bh.to(tl.int64) * NQB + rows.to(tl.int64)) * KMAX
    tl.store(per_row(IDX_r, KM) + slot, val, mask=per_row(row_ok, KM) & (slot < KMAX))
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


DENSE_MAX_NKB = 256  # "auto" takes the dense path up to here (sm_90: no spills, see docs/kernels.md)
DENSE_FORCE_MAX_NKB = 512  # a forced "dense" is honoured up to here (may spill), else streaming
PATH_ENV = "SPA_SELECT_PATH"  # "auto", "dense" or "stream": choose a path (tests, benchmarks)
# "auto" since the H200 runs of 2026-11-28 (torch 2.11, triton 3.6): the GPU tests and the
# benchmarks' reference checks passed with it, and at 16K (Hkv=8) it took 42 us against the
# streaming kernel's 53 us (CUDA graph), identical lists (benchmarks/bench_selection.py).
DEFAULT_PATH = "auto"
# Bits of the k-th score search per step in the dense kernel (``_kth_threshold``): 1 (32 steps).
# 2 and 3 (16 and 11 steps, one packed row sum each) give the same lists but were slower on the
# H200 (16K, Hkv=8, CUDA graph: 42 us at 1, 54 at 2, 55 at 3; bench_selection.py, 2026-11-28).
# ``SPA_SELECT_RADIX`` overrides.
DENSE_RADIX_BITS = 1
RADIX_ENV = "SPA_SELECT_RADIX"


def dense_radix_bits(nkbp: int, bits: int | None = None) -> int:
    """Bits a step of the dense kernel's search: ``bits``, else $SPA_SELECT_RADIX, else
    DENSE_RADIX_BITS; 3 needs NKBP <= 256 (9-bit count fields), else 2 is used."""
    rb = bits if bits is not None else int(os.environ.get(RADIX_ENV, "") or DENSE_RADIX_BITS)
    if rb not in (1, 2, 3):
        raise ValueError(f"{RADIX_ENV} must be 1, 2 or 3, not {rb}")
    return 2 if rb == 3 and nkbp > 256 else rb


# The score dot's input precision per path: "ieee" (fp32 FMA) or "tf32x3" (three tf32 tensor-core
# products, near fp32). H200, torch 2.11, triton 3.6, 2026-11-28 (bench_selection.py, CUDA graph):
# the dense kernel at 16K, Hkv=8 took 27 us with tf32x3 at 8 warps against 42 us fp32 (the best
# warps of each), the same lists; the streaming kernel at 128K was slower with it (2.07 against
# 1.59 ms: its walk waits on loads, not on the FMAs), so it stays fp32.
SCORE_PRECISION = {"dense": "tf32x3", "stream": "ieee"}  # "wide" is always fp32 FMA
PRECISION_ENV = "SPA_SELECT_PRECISION"


def score_precision(precision: str | None = None, path: str = "dense") -> str:
    """The score dot's input precision on ``path``: ``precision``, else $SPA_SELECT_PRECISION, else
    SCORE_PRECISION[path]. The broadcast-product configs (fewer than 16 rows a program) stay fp32
    FMA whatever this says."""
    prec = precision or os.environ.get(PRECISION_ENV, "") or SCORE_PRECISION[path]
    if prec not in ("ieee", "tf32x3"):
        raise ValueError(f"{PRECISION_ENV}/precision must be 'ieee' or 'tf32x3', not {prec!r}")
    return prec


# Key means transposed (``[.., r, NKB]``) for the score dot (``_score_keys``' KT), per path. H200,
# torch 2.11, triton 3.6, 2026-11-29 (bench_selection.py, CUDA graph, top-k 32, the op's group-summing
# launch, the same lists): streaming (fp32 FMA dot) at 128K 2.47 ms against 3.99 (Hkv=32) and 0.76
# against 1.06 (Hkv=8), at 16K, Hkv=32 0.093 against 0.121; the dense kernel's tf32x3 dot at 16K,
# Hkv=32 0.108 against 0.094 (its fp32 FMA dot 0.101 against 0.132). $SPA_SELECT_KT ("0" / "1") or
# ``select(..., keys_t=)`` overrides.
KEYS_TRANSPOSED = {"dense": False, "stream": True}
KT_ENV = "SPA_SELECT_KT"


def keys_transposed(path: str, flag: bool | None = None) -> bool:
    """Whether ``path``'s score dot reads the transposed key means: ``flag``, else $SPA_SELECT_KT,
    else KEYS_TRANSPOSED[path]."""
    if flag is not None:
        return bool(flag)
    return env_switch(KT_ENV, KEYS_TRANSPOSED[path])


AUTO_WIDE = False  # "auto" takes the wide path for every DENSE_MAX_NKB < NKB <= WIDE_MAX_NKB (see wide_selection.py)
# ... and, with AUTO_WIDE False, where the lists are long: KMAX >= AUTO_WIDE_MIN_KMAX, where the
# streaming kernel's running buffer is over 128 wide (_stream_config: then few rows a program,
# scores by broadcast products, a bitonic merge of the whole buffer a chunk). H200, 128K, density
# 0.2 (KMAX 415), kernel alone, CUDA graph (run 42, 2026-11-29): wide 6.41 ms at 4 warps against
# 22.8 streaming (Hkv=32), 1.22-1.26 against 5.52 (Hkv=8); the op forward 74.2 against 88.7 and
# 69.2 against 72.5 (wide at its old 16 warps). At top-k 32 (KMAX 37) streaming stays faster
# (0.76 ms against 1.18, Hkv=8, runs 30 and 32)
AUTO_WIDE_MIN_KMAX = 129
WIDE_ENV = "SPA_SELECT_WIDE"  # "1" / "0": overrides AUTO_WIDE and AUTO_WIDE_MIN_KMAX


def select_path(nkb: int, path: str | None = None, kmax: int = 0) -> str:
    """"dense" (all scores of a program at once, binary search for the k-th), "wide" (the same
    method for rows up to ``wide_selection.WIDE_MAX_NKB`` key blocks, one lean int32 key tile) or
    "stream" (chunks and a running top-k buffer). ``path`` (else $SPA_SELECT_PATH, else
    DEFAULT_PATH) chooses; "auto" takes dense up to DENSE_MAX_NKB key blocks, then wide up to
    WIDE_MAX_NKB where the lists are long (``kmax`` >= AUTO_WIDE_MIN_KMAX; every length with
    AUTO_WIDE; $SPA_SELECT_WIDE=1 / 0: always / never), then stream; a forced "dense" beyond
    DENSE_FORCE_MAX_NKB and a forced "wide" beyond WIDE_MAX_NKB still stream."""
    from .wide_selection import WIDE_MAX_NKB

    path = path or os.environ.get(PATH_ENV, "") or DEFAULT_PATH
    if path not in ("auto", "dense", "wide", "stream"):
        raise ValueError(f"{PATH_ENV}/path must be auto, dense, wide or stream, not {path!r}")
    if path == "auto":
        if nkb <= DENSE_MAX_NKB:
            return "dense"
        wide = env_switch(WIDE_ENV, AUTO_WIDE or kmax >= AUTO_WIDE_MIN_KMAX)
        return "wide" if wide and nkb <= WIDE_MAX_NKB else "stream"
    if (path == "dense" and nkb > DENSE_FORCE_MAX_NKB) or (path == "wide" and nkb > WIDE_MAX_NKB):
        return "stream"
    return path


def _stream_config(nqb: int, nkb: int, r: int, kmax: int):
    """(QB, KPB, BJ, RC, USE_DOT, warps) of the streaming kernel."""
    kpb = max(16, triton.next_power_of_2(min(kmax, nkb)))
    if kpb <= 128:  # 16 query blocks a program, scores by an fp32 dot, chunks wider than the buffer
        bj = max(kpb, min(128, triton.next_power_of_2(nkb)))
        qb = 16
    else:  # wide buffers: fewer rows a program (registers), scores by broadcast products
        bj = kpb
        qb = max(1, 2048 // kpb)
    qb = min(qb, max(1, triton.next_power_of_2(nqb)))
    use_dot = qb >= 16
    rc = 16 if use_dot else min(triton.next_power_of_2(r), max(1, 16384 // (qb * bj)))
    # 4 warps for the dot configs: at 128K, top-k 32 (H200, 2026-11-28) 1.32 ms against 1.59 at 8
    # (Hkv=8) and 4.53 against 5.81 (Hkv=32), the same lists
    warps = 4 if use_dot or qb * bj < 1024 else 8
    return qb, kpb, bj, rc, use_dot, warps


def _dense_config(nqb: int, nkb: int, r: int, kmax: int):
    """(QB, NKBP, RC, USE_DOT, warps) of the dense kernel. The score arithmetic (dot or broadcast
    products, RC) is the streaming kernel's for the same shape, so both paths see the same fp32
    scores (bit-identical selections where the two compile to the same FMA order)."""
    sqb, _kpb, _bj, src, sdot, _w = _stream_config(nqb, nkb, r, kmax)
    nkbp = max(16, triton.next_power_of_2(nkb))
    if sdot:  # tl.dot needs 16 rows
        qb, rc, use_dot = 16, 16, True
    else:
        rc, use_dot = min(src, max(1, 16384 // nkbp)), False  # a single row: cap the broadcast product
        qb = max(1, min(16384 // (nkbp * rc), 4096 // nkbp, triton.next_power_of_2(nqb)))
    return qb, nkbp, rc, use_dot, _dense_warps(qb, nkbp)


def _dense_warps(qb: int, nkbp: int, km: bool = False, programs: int = 0, sms: int = 0) -> int:
    """Warps of a dense launch of ``programs`` programs on a card of ``sms`` SMs (0: unknown)."""
    if km and qb * nkbp <= 4096 and programs > sms > 0:
        # key-major 16 x 256 at 4 warps: 240 registers, two programs an SM (8 warps: 192, one), so a
        # launch of more programs than SMs runs in one wave instead of two. H200 run 38 (16K,
        # Hkv=32, every tier at 4 warps): 64.8 us against 73.6 at 8 (89.7 at 16). Smaller launches
        # keep 8: there a program's own latency is the launch's
        return 4
    # 16 rows x 256 at 8 warps: 232 registers, no spill (tf32x3); 27 us against 31 at 4 and 32 at 16
    return 4 if qb * nkbp < 1024 else (8 if qb * nkbp <= 4096 else 16)


# The dense kernel's k-th search stops once every row counts exactly k (``_kth_early``); False:
# all 32 steps and the tie prefix count always (benchmarks/bench_selection.py times both)
DENSE_EARLY = True
# The dense kernel's tiles key-major (``_select_dense_kernel``' KM): the same lists
DENSE_KEY_MAJOR = True
DENSE_TIERS = 3  # causal dense launches: column widths nkbp, nkbp/2, nkbp/4 (SPA_SELECT_TIERS overrides)
TIERS_ENV = "SPA_SELECT_TIERS"
MIN_TIER_PROGRAMS = 128  # a narrower tier launches only with about a card of programs (H200: 132 SMs)


def dense_tiers(info: BlockInfo, qb: int, nkbp: int, kmax: int, tiers: int | None = None,
                rows: int = 1) -> list[tuple[int, int, int]]:
    """(first program, end program, columns) of the dense path's launches. Causal without a
    window, program p sees key blocks below je(p) only (growing with p), so the early programs
    run with narrower rows (nkbp/2, nkbp/4: half and a quarter of the score, search and write
    work) while every row still gets its KMAX slots written (columns >= kmax). One launch
    otherwise, or with ``tiers=1``. Same lists: each program's arithmetic is per element.
    H200, 16K, Hkv=32, top-k 32 (CUDA graph, 2026-11-28, bench_selection.py --stream-variants):
    92 us against 109 in one launch. One launch branching on the program id to the three widths
    (tried the same day) runs every program at the widest one's registers and warps: the
    selection share in bench_kernels.py did not improve (0.205 ms against 0.197 untiered).
    ``rows`` (batch x selection heads) counts a launch's programs: a narrower tier needs
    MIN_TIER_PROGRAMS of them, else its programs run in the next wider one. The launches run one
    after the other, and small ones leave the card idle: at 16K, Hkv=8 (32 and 64 programs in the
    narrow tiers) the selection took 0.152 ms tiered against 0.093-0.100 in one launch (same card,
    same day); at Hkv=32 (128 and 128) 0.185 against 0.197."""
    nprog = triton.cdiv(info.nqb, qb)
    n = tiers if tiers is not None else int(os.environ.get(TIERS_ENV, "") or DENSE_TIERS)
    if n < 1:
        raise ValueError(f"{TIERS_ENV}/tiers must be >= 1, not {n}")
    if not info.causal or info.has_window or n == 1:
        return [(0, nprog, nkbp)]

    def je(p):  # _program_rows' je of program p
        t1max = min((p + 1) * qb * info.block, info.nq)
        return min(max((t1max - 1 + info.offset) // info.block + 1, 0), info.nkb)

    out, p0 = [], 0
    for w in sorted({nkbp >> i for i in range(n - 1, 0, -1)} | {nkbp}):
        if w < max(16, kmax) and w != nkbp:
            continue
        p1 = nprog if w == nkbp else p0
        while w != nkbp and p1 < nprog and je(p1) <= w:
            p1 += 1
        if w != nkbp and (p1 - p0) * rows < MIN_TIER_PROGRAMS:
            continue  # too few programs: they join the next wider tier
        if p1 > p0:
            out.append((p0, p1, w))
            p0 = p1
    return out


# Program order of both selection kernels (``_program_rows``' LPT): longest first, every head at once.
LONGEST_FIRST = True
ORDER_ENV = "SPA_SELECT_LPT"  # "0": query blocks ascending, one head after the other (the order until 2026-11-29)


def program_order_lpt(longest_first: bool | None = None) -> bool:
    """``longest_first``, else $SPA_SELECT_LPT ("0" / "1"), else LONGEST_FIRST."""
    if longest_first is not None:
        return bool(longest_first)
    return env_switch(ORDER_ENV, LONGEST_FIRST)


def select(qp: Tensor, kp: Tensor, info: BlockInfo, scale: float, cfg, kmax: int, group: int = 1,
           path: str | None = None, radix_bits: int | None = None, half: bool = False,
           num_warps: int | None = None, stop: int = 0, precision: str | None = None,
           stream_config: dict | None = None, tiers: int | None = None,
           longest_first: bool | None = None, keys_t: bool | None = None,
           dense_config: dict | None = None) -> tuple[Tensor, Tensor]:
    """index ``[B, Hs, NQB, kmax]`` int32 ascending, padded -1; count ``[B, Hs, NQB]`` int32.

    qp: projected query block means ``[B, Hs * group, NQB, r]`` float32; with ``group > 1`` the
    ``group`` consecutive heads of each selection head are summed in the kernel ("group"
    selection without the torch sum; ``group=1``: qp already summed, or "head" selection).
    kp: projected key block means ``[B, Hkv, NKB, r]`` float32. ``path``: see ``select_path``;
    ``radix_bits``: see ``dense_radix_bits`` (the dense path only). ``half``: take ``ceil(k/2)``
    by score (the projector's share of block_score "hybrid", see bound_selection). ``num_warps``
    overrides the launch's warps (benchmarks/bench_selection.py compares them); ``stream_config``
    overrides the streaming kernel's QB, BJ, RC, FAST (the interior-chunk path), HAS_KV (the
    prefix-count visibility) and num_stages (the same comparisons); ``tiers``: see ``dense_tiers``; ``stop`` 1/2/3 cuts
    the dense kernel after its classification / scores / threshold; 1 drops the streaming
    kernel's merges, 2 its scores (timing only: no valid lists). ``precision``: see ``score_precision``
    (the wide path always scores in fp32 FMA).
    ``longest_first``: see ``program_order_lpt`` (program order; the same lists either way).
    ``keys_t``: see ``keys_transposed`` (the score dot's key operand layout; the same lists).
    ``dense_config`` overrides the dense kernel's QB (query blocks a program, 16 or more for the
    score dot), KM (key-major tiles, else DENSE_KEY_MAJOR) and EARLY (else DENSE_EARLY): the same
    lists, for benchmarks/bench_selection.py.
    """
    qp = qp.contiguous().float()
    kp = kp.contiguous().float()
    b, hq, nqb, r = qp.shape
    if hq % group:
        raise ValueError(f"{hq} query heads are not a multiple of group={group}")
    hs = hq // group
    hkv = kp.shape[1]
    index = torch.empty((b, hs, nqb, kmax), dtype=torch.int32, device=qp.device)  # the kernels write the -1s
    count = torch.empty((b, hs, nqb), dtype=torch.int32, device=qp.device)
    common = (qp, kp, info.n, info.first, info.last, info.cs, index, count,
              hs, hkv, info.nq, info.nk, nqb, info.nkb, r, kmax, group,
              info.offset, info.win, float(scale),
              cfg.sink_blocks, cfg.local_blocks,
              -1 if cfg.topk is None else cfg.topk, cfg.density_ppm,
              -1 if cfg.min_blocks is None else cfg.min_blocks,
              -1 if cfg.max_blocks is None else cfg.max_blocks)
    chosen = select_path(info.nkb, path, kmax)
    has_kv = info.key_valid is not None  # without padding, visibility is geometry alone (classify_blocks)
    prec = score_precision(precision, "stream" if chosen == "wide" else chosen)  # wide: fp32 FMA always
    lpt = program_order_lpt(longest_first)

    def grid(nprog):  # (grid, LPT): LPT puts the programs on axis 1, which CUDA caps at 65535
        on = lpt and nprog <= 65535
        return ((b * hs, nprog) if on else (nprog, b * hs)), on

    def with_keys_t(use_dot):  # the launch tuple with the transposed key means, where the dot takes them
        kt = use_dot and keys_transposed(chosen, keys_t)
        return (common[:1] + (kp.transpose(-1, -2).contiguous(),) + common[2:]) if kt else common, kt

    if chosen == "dense":
        qb, nkbp, rc, use_dot, warps = _dense_config(nqb, info.nkb, r, kmax)
        dc = dict(dense_config or {})
        qb = dc.pop("QB", qb)
        km, early = bool(dc.pop("KM", DENSE_KEY_MAJOR)), bool(dc.pop("EARLY", DENSE_EARLY))
        if dc:
            raise ValueError(f"dense_config: unknown keys {sorted(dc)} (QB, KM, EARLY)")
        if use_dot and qb < 16:
            raise ValueError(f"dense_config: QB={qb}, but the score dot needs 16 query blocks a program or more")
        rb = dense_radix_bits(nkbp, radix_bits)
        args, kt = with_keys_t(use_dot)
        sms = torch.cuda.get_device_properties(qp.device).multi_processor_count if qp.is_cuda else 0
        for p0, p1, cols in dense_tiers(info, qb, nkbp, kmax, tiers, rows=b * hs):
            launch, on = grid(p1 - p0)
            _select_dense_kernel[launch](
                *args, KT=kt, CAUSAL=info.causal, WINDOW=info.has_window,
                BS=info.block, QB=qb, NKBP=cols, RC=rc, USE_DOT=use_dot, RB=rb, FW=9 if rb == 3 else 10,
                HALF=half, STOP=stop, PREC=prec if use_dot else "ieee", HAS_KV=has_kv, PID0=p0, LPT=on,
                EARLY=early, KM=km, num_warps=num_warps or _dense_warps(qb, cols, km, (p1 - p0) * b * hs, sms),
            )
    elif chosen == "wide":
        # wide_selection imports this module's jit helpers: imported here, not at the top
        from .wide_selection import WIDE_EARLY, WIDE_ROWS, WIDE_TIERS, WIDE_UNROLL, _select_wide_kernel, wide_warps

        nkbp = max(32, triton.next_power_of_2(info.nkb))
        wide = list(common)
        # the group summed here in the kernels' order (q0 + q1, then + q2, ...: the same fp32 sums),
        # queries and keys transposed to [.., r, NQB] / [.., r, NKB]: a coalesced row a projected dim
        qg = qp.view(b, hs, group, nqb, r)
        qs = qg[:, :, 0].clone()
        for g in range(1, group):
            qs += qg[:, :, g]
        wide[0] = qs.transpose(-1, -2).contiguous()
        wide[1] = kp.transpose(-1, -2).contiguous()
        wide[16] = 1  # GS: summed above
        for p0, p1, cols in dense_tiers(info, WIDE_ROWS, nkbp, kmax, tiers if tiers is not None else WIDE_TIERS,
                                        rows=b * hs):
            launch, on = grid(p1 - p0)
            _select_wide_kernel[launch](
                *wide, CAUSAL=info.causal, WINDOW=info.has_window, BS=info.block, QB=WIDE_ROWS, NKBP=cols,
                EARLY=WIDE_EARLY, RU=WIDE_UNROLL if r % WIDE_UNROLL == 0 else 1, HALF=half, HAS_KV=has_kv, PID0=p0, LPT=on,
                num_warps=num_warps or wide_warps(WIDE_ROWS, cols),
            )
    else:
        qb, kpb, bj, rc, use_dot, warps = _stream_config(nqb, info.nkb, r, kmax)
        sc = dict(stream_config or {})
        qb, bj, rc = sc.pop("QB", qb), sc.pop("BJ", bj), sc.pop("RC", rc)
        fast = bool(sc.pop("FAST", True))
        has_kv = bool(sc.pop("HAS_KV", has_kv))
        use_dot = qb >= 16
        extra = {"num_stages": sc.pop("num_stages")} if "num_stages" in sc else {}
        if sc:
            raise ValueError(f"stream_config: unknown keys {sorted(sc)} (QB, BJ, RC, FAST, HAS_KV, num_stages)")
        launch, on = grid(triton.cdiv(nqb, qb))
        args, kt = with_keys_t(use_dot)
        _select_kernel[launch](
            *args, KT=kt, CAUSAL=info.causal, WINDOW=info.has_window,
            BS=info.block, QB=qb, KPB=kpb, BJ=max(bj, kpb), RC=rc, USE_DOT=use_dot, NEAR=cfg.local_blocks + 4,
            HALF=half, STOP=stop, PREC=prec if use_dot else "ieee", HAS_KV=has_kv, FAST=fast, LPT=on,
            num_warps=num_warps or warps, **extra,
        )
    return index, count
