"""The landmark fill (SPEC.md 4) as its own kernel, for the forward's fill-first form (launch
config ``"FF"``, opt-in): QP consecutive query blocks of one head a program, so that each chunk
of landmark means (kbar, vbar) is loaded once for QP * Bq rows instead of once a query block.

The fused forward (``sparse_forward._fwd_kernel``) walks the landmarks after its exact part, one
query block a program, so every query block reloads the head's landmark means from L2: about a
third of its L2 traffic at 128K, top-k 32. Here the fill runs first and leaves its normalized
output and log-sum-exp in the op's ``out`` / ``lse``; the exact kernel then starts its online
softmax from them (``INIT``): ``m = lse, l = 1, acc = out``, which is the fill's own (m, l, acc)
rescaled by 1 / l. The one extra rounding is the fill output's to q's dtype, on the fill's share
of the row's mass only.

Rows: QP * Bq rows of query blocks i0 .. i0 + QP - 1 (``i0 = QP * p``, the last pair first), each
query block with its own fully visible range (``common.fill_bounds``) and selection bitmap; the
chunk loop walks the union and each block's rows get their block's bias (``fill_bias``), so
landmarks outside a block's range or selected by it get -inf for its rows.
"""

from __future__ import annotations

import triton
import triton.language as tl
from torch import Tensor

from .blockinfo import BlockInfo
from .common import fill_bounds, load_rows
from .sparse_forward import (LOG2E, dot_precision, fill_bias, positive_scale, softmax_step, tma_descriptors,
                             tma_ok, uniform_counts)


@triton.jit
def _block_bias(c0, cj, i, NQB, NKB, OFF, WIN, Nq, NB_b, FIRST_b, LAST_b, SEL_h, WORDS, log2_n,
                BS: tl.constexpr, BJ: tl.constexpr, CAUSAL: tl.constexpr, WINDOW: tl.constexpr,
                UNIFORM_N: tl.constexpr):
    """``fill_bias`` of query block ``i`` for chunk c0 (all -inf where i is past the last block)."""
    ic = tl.minimum(i, NQB - 1)
    t0 = ic * BS
    ls, he = fill_bounds(t0, tl.minimum(t0 + BS, Nq), NKB, OFF, WIN, FIRST_b, LAST_b, BS, CAUSAL, WINDOW)
    he = tl.where(i < NQB, he, ls)
    return fill_bias(c0, cj, ls, he, NB_b, SEL_h + ic * WORDS, WINDOW, BJ, UNIFORM_N, log2_n)


@triton.jit
def _block_range(i, NQB, NKB, OFF, WIN, Nq, FIRST_b, LAST_b, BS: tl.constexpr, CAUSAL: tl.constexpr,
                 WINDOW: tl.constexpr):
    ic = tl.minimum(i, NQB - 1)
    t0 = ic * BS
    ls, he = fill_bounds(t0, tl.minimum(t0 + BS, Nq), NKB, OFF, WIN, FIRST_b, LAST_b, BS, CAUSAL, WINDOW)
    return ls, tl.where(i < NQB, he, ls)


@triton.jit
def _fill_kernel(
    Q, KBAR, VBAR, NB, FIRST, LAST, SEL, O, LSE, KBD, VBD,
    sqb, sqh, sqn, sob, soh, son,
    Hq, Hkv, Hs, Nq, NQB, NKB, OFF, WIN, qk_scale,
    D: tl.constexpr, DV: tl.constexpr, BS: tl.constexpr, QP: tl.constexpr, BD: tl.constexpr, BDV: tl.constexpr,
    BJ: tl.constexpr, CAUSAL: tl.constexpr, WINDOW: tl.constexpr, PREC: tl.constexpr, UNIFORM_N: tl.constexpr,
    TMA_FILL: tl.constexpr,
):
    tl.static_assert(QP == 1 or QP == 2)
    tl.static_assert(BJ % 32 == 0)
    BM: tl.constexpr = QP * BS
    npair = tl.cdiv(NQB, QP)
    i0 = (npair - 1 - tl.program_id(0)) * QP  # the longest rows first
    bh = tl.program_id(1)
    b64 = (bh // Hq).to(tl.int64)
    h = bh % Hq
    kh = h // (Hq // Hkv)
    hs = h * Hs // Hq
    r = tl.arange(0, BM)
    t = i0 * BS + r
    row_ok = t < Nq
    d = tl.arange(0, BD)
    dv = tl.arange(0, BDV)
    q = tl.load(Q + b64 * sqb + h.to(tl.int64) * sqh + t[:, None].to(tl.int64) * sqn + d[None, :],
                mask=row_ok[:, None] & (d[None, :] < D), other=0.0)

    NB_b = NB + b64 * NKB
    FIRST_b = FIRST + b64 * NKB
    LAST_b = LAST + b64 * NKB
    WORDS = (NKB + 31) // 32
    SEL_h = SEL + (b64 * Hs + hs) * NQB * WORDS
    KB_h = KBAR + (b64 * Hkv + kh) * NKB * D
    VB_h = VBAR + (b64 * Hkv + kh) * NKB * DV
    b32 = b64.to(tl.int32)

    ls, he = _block_range(i0, NQB, NKB, OFF, WIN, Nq, FIRST_b, LAST_b, BS, CAUSAL, WINDOW)
    if QP == 2:
        ls1, he1 = _block_range(i0 + 1, NQB, NKB, OFF, WIN, Nq, FIRST_b, LAST_b, BS, CAUSAL, WINDOW)
        ls = tl.where(he1 > ls1, tl.minimum(ls, ls1), ls)
        he = tl.maximum(he, he1)
    cj = tl.arange(0, BJ)
    inv_scale = 1.0 / qk_scale
    log2_n = tl.math.log2(BS * 1.0)
    upper = (r // BS) == 0  # the rows of block i0

    m_i = tl.full([BM], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BM], dtype=tl.float32)
    acc = tl.zeros([BM, BDV], dtype=tl.float32)
    for c0 in range(ls - ls % 32, he, BJ):
        bias = _block_bias(c0, cj, i0, NQB, NKB, OFF, WIN, Nq, NB_b, FIRST_b, LAST_b, SEL_h, WORDS, log2_n,
                           BS, BJ, CAUSAL, WINDOW, UNIFORM_N)
        if QP == 2:
            bias1 = _block_bias(c0, cj, i0 + 1, NQB, NKB, OFF, WIN, Nq, NB_b, FIRST_b, LAST_b, SEL_h, WORDS,
                                log2_n, BS, BJ, CAUSAL, WINDOW, UNIFORM_N)
            bias2 = tl.where(upper[:, None], bias[None, :], bias1[None, :])
        else:
            bias2 = tl.broadcast_to(bias[None, :], [BM, BJ])
        if TMA_FILL:
            kb = KBD.load([b32, kh, c0, 0]).reshape(BJ, BD)
            vb = VBD.load([b32, kh, c0, 0]).reshape(BJ, BDV)
        else:
            jc = tl.minimum(c0 + cj, NKB - 1)  # in range; the bias drops the clamped columns
            kb = load_rows(KB_h, jc, D, d, D, BD)
            vb = load_rows(VB_h, jc, DV, dv, DV, BDV)
        qk = tl.dot(q, tl.trans(kb), acc=bias2 * inv_scale, input_precision=PREC)
        m_i, l_i, acc = softmax_step(qk, vb, m_i, l_i, acc, qk_scale, PREC)

    seen = l_i > 0.0
    out = acc / tl.where(seen, l_i, 1.0)[:, None]
    lse = tl.where(seen, (m_i + tl.math.log2(tl.where(seen, l_i, 1.0))) * 0.6931471805599453, float("-inf"))
    tl.store(O + b64 * sob + h.to(tl.int64) * soh + t[:, None].to(tl.int64) * son + dv[None, :],
             out.to(O.dtype.element_ty), mask=row_ok[:, None] & (dv[None, :] < DV))
    tl.store(LSE + (b64 * Hq + h) * Nq + t, lse, mask=row_ok)


def launch_fill(q: Tensor, kbar: Tensor, vbar: Tensor, info: BlockInfo, sel: Tensor, scale: float, out: Tensor,
                lse: Tensor, qp: int = 2, bj: int = 64, warps: int = 8, stages: int = 2, tma: bool = True) -> None:
    """The fill alone into ``out`` (its normalized output, q's dtype) and ``lse`` (its log-sum-exp;
    -inf and 0 where a row sees no landmark). ``sel``: the selection bitmap (``build_bitmap``)."""
    b, hq, nq, d = q.shape
    hkv = kbar.shape[1]
    dv = vbar.shape[-1]
    hs = sel.shape[1]
    q, scale = positive_scale(q, scale)
    tma = tma and tma_ok(kbar, vbar, bj)
    kbd, vbd = tma_descriptors(kbar, vbar, bj) if tma else (None, None)
    grid = (triton.cdiv(info.nqb, qp), b * hq)
    _fill_kernel[grid](
        q, kbar, vbar, info.n, info.first, info.last, sel, out, lse, kbd, vbd,
        q.stride(0), q.stride(1), q.stride(2), out.stride(0), out.stride(1), out.stride(2),
        hq, hkv, hs, nq, info.nqb, info.nkb, info.offset, info.win, float(scale) * LOG2E,
        D=d, DV=dv, BS=info.block, QP=qp, BD=triton.next_power_of_2(d), BDV=triton.next_power_of_2(dv), BJ=bj,
        CAUSAL=info.causal, WINDOW=info.has_window, PREC=dot_precision(q.dtype), UNIFORM_N=uniform_counts(info),
        TMA_FILL=tma, num_warps=warps, num_stages=stages,
    )
