"""The sparse forward with two query blocks a program (``PAIR``): each block's exact part on its
own, the fill's landmark tiles loaded once for both.

Why: at 128K, top-k 32 the forward is bound by the traffic from L2 into the SMs (Nsight Compute,
H200, 2026-11-29, run 31: L2 throughput 73%, 111 GB read by the SMs in 14.2 ms, 7.8 TB/s,
79% L2 hits). A 64-row program reads its ~35 selected K/V blocks (1.15 MB) and the landmark
means of every fully visible block (about 0.5 MB at the middle query block: a third of the
traffic). Two adjacent query blocks of one head see the same landmarks but one, so a program of
two reads them once.

One head a program (GP = 1); the programs run the later pair first. The per-block arithmetic is
``sparse_forward._fwd_kernel``'s (``exact_part``, ``fill_step``, ``store_rows``, the same chunks
in the same order), so the outputs are the same.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .common import fill_bounds, load_rows
from .sparse_forward import exact_part, fill_bias, fill_step, store_rows


@triton.jit
def _fwd_pair_kernel(
    Q, K, V, KBAR, VBAR, NB, FIRST, LAST, KVALID, IDX, CNT, SEL, O, LSE, KD, VD, KBD, VBD,
    sqb, sqh, sqn, skb, skh, skn, svb, svh, svn, sob, soh, son,
    Hq, Hkv, Hs, Nq, Nk, NQB, NKB, KMAX, OFF, WIN, qk_scale,
    D: tl.constexpr, DV: tl.constexpr, BS: tl.constexpr,
    BD: tl.constexpr, BDV: tl.constexpr, BJ: tl.constexpr,
    CAUSAL: tl.constexpr, WINDOW: tl.constexpr, HAS_KV: tl.constexpr, FILL: tl.constexpr,
    PREC: tl.constexpr, FILL_STAGES: tl.constexpr = 0, TMA: tl.constexpr = False,
    TMA_FILL: tl.constexpr = False, UNIFORM_N: tl.constexpr = False,
):
    ia = NQB - 1 - 2 * tl.program_id(0)  # the pair's later block (the longest rows first)
    ib = ia - 1  # its earlier block; -1 in the last program when NQB is odd (no rows)
    has_b = ib >= 0
    ibc = tl.maximum(ib, 0)
    bh = tl.program_id(1)
    b64 = (bh // Hq).to(tl.int64)
    b32 = b64.to(tl.int32)
    h = bh % Hq
    kh = h // (Hq // Hkv)
    hs = h * Hs // Hq
    r = tl.arange(0, BS)
    rh = (h + r * 0).to(tl.int64)
    d = tl.arange(0, BD)
    dv = tl.arange(0, BDV)
    K_h = K + b64 * skb + kh.to(tl.int64) * skh
    V_h = V + b64 * svb + kh.to(tl.int64) * svh
    NB_b = NB + b64 * NKB
    KV_b = KVALID + b64 * Nk
    row_s = (b64 * Hs + hs) * NQB

    ta0 = ia * BS
    ta1 = tl.minimum(ta0 + BS, Nq)
    ta = ta0 + r
    ok_a = ta < Nq
    tb0 = ibc * BS
    tb1 = tl.minimum(tb0 + BS, Nq)
    tb = ib * BS + r  # negative rows (no block): masked everywhere
    ok_b = (tb >= 0) & (tb < Nq)
    Q_h = Q + b64 * sqb + h.to(tl.int64) * sqh
    qa = tl.load(Q_h + ta[:, None].to(tl.int64) * sqn + d[None, :], mask=ok_a[:, None] & (d[None, :] < D), other=0.0)
    qb = tl.load(Q_h + tb[:, None].to(tl.int64) * sqn + d[None, :], mask=ok_b[:, None] & (d[None, :] < D), other=0.0)
    cnt_a = tl.load(CNT + row_s + ia)
    cnt_b = tl.where(has_b, tl.load(CNT + row_s + ibc), 0)
    m_a, l_a, acc_a = exact_part(qa, ta, ta0, ta1, IDX + (row_s + ia) * KMAX, cnt_a, K_h, V_h, KD, VD, b32, kh, NB_b,
                                 KV_b, Nk, OFF, WIN, skn, svn, qk_scale, BS, D, DV, BS, BD, BDV, CAUSAL, WINDOW,
                                 HAS_KV, PREC, TMA)
    m_b, l_b, acc_b = exact_part(qb, tb, tb0, tb1, IDX + (row_s + ibc) * KMAX, cnt_b, K_h, V_h, KD, VD, b32, kh, NB_b,
                                 KV_b, Nk, OFF, WIN, skn, svn, qk_scale, BS, D, DV, BS, BD, BDV, CAUSAL, WINDOW,
                                 HAS_KV, PREC, TMA)

    if FILL:
        # each block's fully visible landmarks [ls, he) (_fwd_kernel's fill), walked once over their
        # union in 32-aligned chunks; a block takes the chunks that reach into its range, with its
        # own bias (selection bits, counts; columns outside its range -inf)
        FIRST_b = FIRST + b64 * NKB
        LAST_b = LAST + b64 * NKB
        ls_a, he_a = fill_bounds(ta0, ta1, NKB, OFF, WIN, FIRST_b, LAST_b, BS, CAUSAL, WINDOW)
        ls_b, he_b = fill_bounds(tb0, tb1, NKB, OFF, WIN, FIRST_b, LAST_b, BS, CAUSAL, WINDOW)
        he_b = tl.where(has_b, he_b, ls_b)
        words = (NKB + 31) // 32
        SEL_a = SEL + (row_s + ia) * words
        SEL_b = SEL + (row_s + ibc) * words
        KB_h = KBAR + (b64 * Hkv + kh) * NKB * D
        VB_h = VBAR + (b64 * Hkv + kh) * NKB * DV
        tl.static_assert(BJ % 32 == 0)
        cj = tl.arange(0, BJ)
        inv_scale = 1.0 / qk_scale
        lo = tl.minimum(ls_a, tl.where(he_b > ls_b, ls_b, ls_a))
        hi = tl.maximum(he_a, he_b)
        log2_n = tl.math.log2(BS * 1.0)
        for c0 in tl.range(lo - lo % 32, hi, BJ, num_stages=FILL_STAGES if FILL_STAGES > 0 else None):
            if TMA_FILL:
                kb = KBD.load([b32, kh, c0, 0]).reshape(BJ, BD)
                vb = VBD.load([b32, kh, c0, 0]).reshape(BJ, BDV)
            else:
                jc = tl.minimum(c0 + cj, hi - 1)  # in range: unmasked loads, each block's extra columns get -inf
                kb = load_rows(KB_h, jc, D, d, D, BD)
                vb = load_rows(VB_h, jc, DV, dv, DV, BDV)
            if (c0 < he_a) & (c0 + BJ > ls_a):
                bias = fill_bias(c0, cj, ls_a, he_a, NB_b, SEL_a, True, BJ, UNIFORM_N, log2_n)
                m_a, l_a, acc_a = fill_step(qa, kb, vb, bias, m_a, l_a, acc_a, qk_scale, inv_scale, BS, BJ, PREC)
            if (c0 < he_b) & (c0 + BJ > ls_b):
                bias = fill_bias(c0, cj, ls_b, he_b, NB_b, SEL_b, True, BJ, UNIFORM_N, log2_n)
                m_b, l_b, acc_b = fill_step(qb, kb, vb, bias, m_b, l_b, acc_b, qk_scale, inv_scale, BS, BJ, PREC)

    store_rows(O, LSE, b64, rh, ta, ok_a, m_a, l_a, acc_a, sob, soh, son, Hq, Nq, dv, DV)
    store_rows(O, LSE, b64, rh, tb, ok_b, m_b, l_b, acc_b, sob, soh, son, Hq, Nq, dv, DV)


def pair_grid(b: int, hq: int, nqb: int) -> tuple[int, int]:
    """(pairs of query blocks, batch x query heads)."""
    return (triton.cdiv(nqb, 2), b * hq)
