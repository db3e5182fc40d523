"""Wide selection: the dense kernel's one-tile method for rows of 257..WIDE_MAX_NKB key blocks.

Opt-in (``path="wide"``, ``SPA_SELECT_WIDE=1``): correct, but slower than the streaming and
dense kernels on the H200 (docs/kernels.md, "Session 10"; 1.18-1.52 ms against the streaming
kernel's 1.01-1.06 at 128K, top-k 32, Hkv=8).

The streaming kernel (``selection._select_kernel``) walks long rows in chunks and merges each
into a running top-k buffer of 64-bit keys; at 128K tokens, top-k 32 its walk, not its score
arithmetic, is the cost. Here a program holds the keys of its WIDE_ROWS query blocks over all
NKBP columns as one int32 tile, in two column halves, and finds each row's cut once:

* per-row thresholds first, from reductions over column chunks whose tiles die at once: the
  SINK-th visible block (``sthr``), the LOCAL-th nearest to the diagonal (``lthr``); then, per
  half, the scores (fp32 FMA outer products over the projected dimensions, from the transposed
  query and key means, in the fp32 dot's order) and the keys: forced blocks (partial | sink |
  local) get the largest int32, unselectable ones the smallest, the rest their orderable score
  bits (capped one below the forced key), with the visible and forced counts;
* the ``n_forced + k``-th largest key by a binary search on the bits, stopped once every row's
  count at the candidate is exactly ``n_forced + k`` (the cut is then the smallest key at or above
  it: the value the full 32 steps reach);
* ties at the cut to the lowest j (a prefix count, only when some row has a surplus tie), S
  ascending and the -1 padding by one prefix count, as the dense kernel.

Same classification and the same fp32 scores as the streaming kernel and the dense kernel at
"ieee" precision, hence the same lists (tests compare the paths exactly). Causal launches come in
column tiers as the dense path's (``selection.dense_tiers``). The key tile lives in registers
only: no ``(NQB x NKB)`` buffer in global memory.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .common import classify_blocks
from .selection import _local_threshold, _program_rows, _topk_count

KEY_MAX = tl.constexpr(2147483647)  # forced blocks: above every score key
KEY_MIN = tl.constexpr(-2147483648)  # invisible or padded columns: below every score key
WIDE_MAX_NKB = 2048  # 128K tokens at block 64
WIDE_UNROLL = 8  # projected dimensions a scoring step loads together (_score_rows' RU)
WIDE_ROWS = 8  # query blocks a program: [8, 2048] int32 keys = 32 registers a thread at 16 warps
WIDE_EARLY = True  # stop the cut's search once every row's count is exact (False: all 32 steps)
WIDE_TIERS = 4  # causal column tiers (selection.dense_tiers): 2048, 1024, 512 and 256 columns at 128K


@triton.jit
def _classify(c0, t0, t1, row_ok, js, je, NB_b, FIRST_b, LAST_b, CS_b, Nk, NKB, OFF, WIN, QB: tl.constexpr,
              CW: tl.constexpr, BS: tl.constexpr, CAUSAL: tl.constexpr, WINDOW: tl.constexpr, HAS_KV: tl.constexpr):
    """Columns c0 .. c0 + CW - 1: (j [QB, CW], visible, full), visible within [js, je) and valid rows."""
    jj = c0 + tl.arange(0, CW)
    visible, full, n = classify_blocks(jj, t0, t1, NB_b, FIRST_b, LAST_b, CS_b, Nk, NKB, OFF, WIN, BS, CAUSAL,
                                       WINDOW, HAS_KV)
    visible = visible & ((jj >= js) & (jj < je))[None, :] & row_ok[:, None]
    return tl.zeros([QB, CW], dtype=tl.int32) + jj[None, :], visible, full


@triton.jit
def _row_thresholds(t0, t1, diag, row_ok, js, je, NB_b, FIRST_b, LAST_b, CS_b, Nk, NKB, OFF, WIN, SINK, LOCAL,
                    QB: tl.constexpr, NKBP: tl.constexpr, CW: tl.constexpr, BS: tl.constexpr, CAUSAL: tl.constexpr,
                    WINDOW: tl.constexpr, HAS_KV: tl.constexpr):
    """Per row: the SINK-th visible j (the sink blocks are the visible j <= it) and the LOCAL-th
    smallest local key ``|j - diag| * NKB + j`` (the local blocks are those <= it), by min
    reductions over column chunks of CW (no [QB, NKBP] tile: the registers are the key tile's)."""
    sthr = tl.full([QB], -1, dtype=tl.int32)
    for _s in range(SINK):  # fewer than SINK visible: every visible block is a sink (min of none = NKBP)
        cur = tl.full([QB], NKBP, dtype=tl.int32)
        for ci in tl.static_range(NKBP // CW):
            jb, visible, full = _classify(ci * CW, t0, t1, row_ok, js, je, NB_b, FIRST_b, LAST_b, CS_b, Nk, NKB, OFF,
                                          WIN, QB, CW, BS, CAUSAL, WINDOW, HAS_KV)
            cur = tl.minimum(cur, tl.min(tl.where(visible & (jb > sthr[:, None]), jb, NKBP), axis=1))
        sthr = cur
    # the streaming kernel's full-range scan over [js, je) in chunks of CW
    lthr = _local_threshold(tl.full([QB], -1, dtype=tl.int32), js, je, t0, t1, diag, NB_b, FIRST_b, LAST_b, CS_b, Nk,
                            NKB, OFF, WIN, LOCAL, QB, CW, BS, CAUSAL, WINDOW, HAS_KV)
    return sthr, lthr


@triton.jit
def _score_rows(QPT_r, KPT_h, rows, row_ok, jj, jm, R, NQB, NKB, scale, QB: tl.constexpr, H: tl.constexpr,
                RU: tl.constexpr):
    """scale * qp[rows] . kp[jj] in float32 ``[QB, H]`` by FMA outer products, one projected
    dimension at a time: a row of the transposed query means ``QPT_r`` ``[R, NQB]`` (the group
    already summed, in the order of ``selection._score_keys``) times a row of the transposed key
    means ``KPT_h`` ``[R, NKB]``, both coalesced loads. The products accumulate in r order, as the
    fp32 ("ieee") dot does. RU dimensions a step, their loads issued together. (A per-dimension
    loop over the group's query heads here made the 16K, Hkv=8 kernel slower than Hkv=32's with
    four times the rows: each of its loads waited on the one before.)"""
    acc = tl.zeros([QB, H], dtype=tl.float32)
    for r0 in range(0, R, RU):
        for u in tl.static_range(RU):  # RU divides R (the launcher's choice): no mask on r
            r = r0 + u
            qv = tl.load(QPT_r + r * NQB + rows, mask=row_ok, other=0.0)
            kv = tl.load(KPT_h + r * NKB + jj, mask=jm, other=0.0)
            acc += qv[:, None] * kv[None, :]
    s = acc * scale
    return tl.where(s == 0.0, 0.0, s)  # -0.0 -> +0.0: equal scores must tie


@triton.jit
def _key_half(c0, QP_r, KP_h, rows, t0, t1, diag, row_ok, js, je, sthr, lthr, NB_b, FIRST_b, LAST_b, CS_b, Nk,
              NKB, NQB, OFF, WIN, R, scale, QB: tl.constexpr, H: tl.constexpr, BS: tl.constexpr,
              CAUSAL: tl.constexpr, WINDOW: tl.constexpr, HAS_KV: tl.constexpr, RU: tl.constexpr):
    """int32 keys of columns ``[c0, c0 + H)``: KEY_MAX forced, KEY_MIN not selectable, else the
    orderable score bits (signed order = float order, as ``selection._encode``) capped at
    KEY_MAX - 1 (a NaN stays below the forced); and the rows' visible and forced counts there."""
    jb, visible, full = _classify(c0, t0, t1, row_ok, js, je, NB_b, FIRST_b, LAST_b, CS_b, Nk, NKB, OFF, WIN,
                                  QB, H, BS, CAUSAL, WINDOW, HAS_KV)
    lkey = tl.abs(jb - diag[:, None]) * NKB + jb
    forced = visible & ((full == 0) | (jb <= sthr[:, None]) | (lkey <= lthr[:, None]))
    jj = c0 + tl.arange(0, H)
    if tl.max(tl.max((visible & (forced == 0)).to(tl.int32), axis=1), axis=0) > 0:
        sc = _score_rows(QP_r, KP_h, rows, row_ok, jj, (jj >= js) & (jj < je), R, NQB, NKB, scale, QB, H, RU)
        bits = sc.to(tl.int32, bitcast=True)
        ordered = tl.minimum(tl.where(bits < 0, bits ^ 0x7FFFFFFF, bits), KEY_MAX - 1)
    else:  # nothing to score (past every row's causal edge, or all forced)
        ordered = tl.zeros([QB, H], dtype=tl.int32)
    key = tl.where(visible, tl.where(forced, KEY_MAX, ordered), KEY_MIN)
    return key, tl.sum(visible.to(tl.int32), axis=1), tl.sum(forced.to(tl.int32), axis=1)


@triton.jit
def _count_ge(ka, kb, t):
    return tl.sum((ka >= t[:, None]).to(tl.int32), axis=1) + tl.sum((kb >= t[:, None]).to(tl.int32), axis=1)


@triton.jit
def _cut(ka, kb, kk, QB: tl.constexpr, EARLY: tl.constexpr):
    """Per row the kk-th largest key of both halves (KEY_MAX when kk = 0): the largest t with
    #{key >= t} >= kk. A binary search on the unsigned bits from the top; EARLY stops once every
    row counts exactly kk at its candidate, whose kk-th largest is then the smallest key at or
    above it (the value the remaining steps would reach)."""
    tu = tl.zeros([QB], dtype=tl.int64)
    cnt = tl.full([QB], -1, dtype=tl.int32)
    step = tl.full([QB], 2147483648, dtype=tl.int64)
    it = tl.full([], 0, dtype=tl.int32)
    busy = it < 32
    while busy:
        cand = tu + step
        c = _count_ge(ka, kb, (cand - 2147483648).to(tl.int32))
        ok = c >= kk
        tu = tl.where(ok, cand, tu)
        cnt = tl.where(ok, c, cnt)
        step = step // 2
        it += 1
        busy = it < 32
        if EARLY:  # tested every 4 steps: the test is a block-wide reduction of its own
            if it % 4 == 0:
                busy = busy & (tl.max((cnt != kk).to(tl.int32), axis=0) > 0)
    ts = (tu - 2147483648).to(tl.int32)
    return tl.minimum(tl.min(tl.where(ka >= ts[:, None], ka, KEY_MAX), axis=1),
                      tl.min(tl.where(kb >= ts[:, None], kb, KEY_MAX), axis=1))


@triton.jit
def _write_half(key, c0, thr, need, eq_before, sel_before, kk, tie, IDX_r, row_ok, KMAX, QB: tl.constexpr,
                H: tl.constexpr):
    """Store the selected j of columns [c0, c0 + H) at their slots of S (ascending) and -1 at the
    slots [kk, KMAX) their unselected columns map to; ``eq_before`` / ``sel_before``: the ties at
    the cut and the selections in the columns before c0. Returns this half's counts of both."""
    eq = key == thr[:, None]
    sel = key > thr[:, None]
    if tie:  # surplus ties at the cut: the lowest j first
        sel = sel | (eq & ((tl.cumsum(eq.to(tl.int32), axis=1) + eq_before[:, None]) <= need[:, None]))
    else:
        sel = sel | eq
    jj = c0 + tl.arange(0, H)
    csum = tl.cumsum(sel.to(tl.int32), axis=1) + sel_before[:, None]
    slot = tl.where(sel, csum - 1, kk[:, None] + jj[None, :] - csum)
    val = tl.where(sel, jj[None, :] + tl.zeros([QB, H], dtype=tl.int32), -1)
    tl.store(IDX_r[:, None] + slot, val, mask=row_ok[:, None] & (slot < KMAX))
    return tl.sum(eq.to(tl.int32), axis=1), tl.sum(sel.to(tl.int32), axis=1)


@triton.jit
def _select_wide_kernel(
    QP, KP, NB, FIRST, LAST, CS, IDX, CNT,
    Hs, Hkv, Nq, Nk, NQB, NKB, R, KMAX, GS,
    OFF, WIN, scale,
    SINK, LOCAL, TOPK, PPM, MINB, MAXB,
    CAUSAL: tl.constexpr, WINDOW: tl.constexpr,
    BS: tl.constexpr, QB: tl.constexpr, NKBP: tl.constexpr,
    HALF: tl.constexpr = False, HAS_KV: tl.constexpr = True, PID0=0,
    LPT: tl.constexpr = False, EARLY: tl.constexpr = True, RU: tl.constexpr = 8,
):
    """The key tile in two halves of H = NKBP / 2 columns, built one after the other: every
    temporary (classification, the scores) is half the size. QP and KP are the transposed
    means ``[B, Hs, r, NQB]`` (group summed) and ``[B, Hkv, r, NKB]``; GS must be 1."""
    (bh, b, NB_b, FIRST_b, LAST_b, CS_b, QP_r, KP_h, rows, row_ok, t0, t1, diag, js, je) = _program_rows(
        QP, KP, NB, FIRST, LAST, CS, Hs, Hkv, Nq, Nk, NQB, NKB, R, GS, OFF, WIN, CAUSAL, WINDOW, BS, QB, PID0, LPT)
    H: tl.constexpr = NKBP // 2
    sthr, lthr = _row_thresholds(t0, t1, diag, row_ok, js, je, NB_b, FIRST_b, LAST_b, CS_b, Nk, NKB, OFF, WIN, SINK,
                                 LOCAL, QB, NKBP, H, BS, CAUSAL, WINDOW, HAS_KV)
    ka, nva, nfa = _key_half(0, QP_r, KP_h, rows, t0, t1, diag, row_ok, js, je, sthr, lthr, NB_b, FIRST_b, LAST_b,
                             CS_b, Nk, NKB, NQB, OFF, WIN, R, scale, QB, H, BS, CAUSAL, WINDOW, HAS_KV, RU)
    kb, nvb, nfb = _key_half(H, QP_r, KP_h, rows, t0, t1, diag, row_ok, js, je, sthr, lthr, NB_b, FIRST_b, LAST_b,
                             CS_b, Nk, NKB, NQB, OFF, WIN, R, scale, QB, H, BS, CAUSAL, WINDOW, HAS_KV, RU)
    nvis = nva + nvb
    nforced = nfa + nfb
    k = _topk_count(nvis, nvis - nforced, TOPK, PPM, MINB, MAXB)
    if HALF:  # block_score "hybrid": the projector's ceil(k/2), bound_selection adds the rest
        k = (k + 1) // 2
    kk = nforced + k

    thr = _cut(ka, kb, kk, QB, EARLY)
    ngt = tl.sum((ka > thr[:, None]).to(tl.int32), axis=1) + tl.sum((kb > thr[:, None]).to(tl.int32), axis=1)
    neq = tl.sum((ka == thr[:, None]).to(tl.int32), axis=1) + tl.sum((kb == thr[:, None]).to(tl.int32), axis=1)
    need = kk - ngt
    tie = tl.max(neq - need, axis=0) > 0
    # S ascending at slots [0, kk), -1 in [kk, KMAX): every slot below NKBP >= KMAX written once
    IDX_r = IDX + (bh.to(tl.int64) * NQB + rows.to(tl.int64)) * KMAX
    zero = tl.zeros([QB], dtype=tl.int32)
    eqa, sela = _write_half(ka, 0, thr, need, zero, zero, kk, tie, IDX_r, row_ok, KMAX, QB, H)
    _write_half(kb, H, thr, need, eqa, sela, kk, tie, IDX_r, row_ok, KMAX, QB, H)
    tl.store(CNT + bh.to(tl.int64) * NQB + rows, kk, mask=row_ok)


def wide_warps(qb: int, nkbp: int) -> int:
    """4 warps at every tier. The 2048-column tier spills a little there (session 10), yet every
    measured 128K point ran faster at 4 than at the former 32 key-tile elements a thread (16 warps
    at 2048 columns, 8 at 1024), H200, kernel alone, CUDA graph: top-k 32, Hkv=8 1.18 ms against
    1.48 (run 30); density 0.2 6.41 against 7.69 (Hkv=32) and 1.22-1.26 against 1.60 (Hkv=8, run
    42). ``qb`` and ``nkbp`` stay in the signature for the launchers and compile_check."""
    return 4
