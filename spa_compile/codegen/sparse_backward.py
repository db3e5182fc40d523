"""Backward of the block-sparse attention with landmark fill, selection held fixed.

Kernels (all deterministic: every output element is written by one program, no atomics):

1. ``_delta_kernel``: delta = rowsum(dO * O) (float32).
2. ``_dq_kernel``: per (query block, GP heads) like the forward: dq from the selected
   blocks and from the landmark pseudo-keys (``dq += s * dS_fill @ kbar``).
3. ``_landmark_kernel``: per (chunk of BJ key blocks, split of the query blocks, query
   head): partial gradients of the landmarks, ``dkbar = s * dS_fill^T Q`` and
   ``dvbar = P_fill^T dO``; which query blocks did *not* select a block comes from the
   reverse map (below), walked with one pointer per landmark.
4. ``_dkdv_kernel``: per (key block, kv head): dk, dv from the query blocks that selected
   the block (reverse map), plus ``dkbar / n`` and ``dvbar / n`` (partials summed over
   splits and the group's heads, in a fixed order) on every valid key of the block.

The reverse map (key block -> ascending query blocks that selected it, per selection
head) is a CSR built with one stable sort of the index lists.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from .blockinfo import BlockInfo
from .common import block_is_clean, exact_logits, fill_bounds, load_rows, pair_mask, program_grid, qblock_prologue
from .sparse_forward import LOG2E, dot_precision, fill_bias, selected_bitmap, uniform_counts


@triton.jit
def _delta_kernel(O, DO, DELTA, sob, soh, son, sdb, sdh, sdn, H, Nq, DV: tl.constexpr, BM: tl.constexpr, BDV: tl.constexpr):
    pid = tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    t = pid * BM + tl.arange(0, BM)
    dv = tl.arange(0, BDV)
    m = (t < Nq)[:, None] & (dv[None, :] < DV)
    o = tl.load(O + b * sob + h * soh + t[:, None].to(tl.int64) * son + dv[None, :], mask=m, other=0.0).to(tl.float32)
    do = tl.load(DO + b * sdb + h * sdh + t[:, None].to(tl.int64) * sdn + dv[None, :], mask=m, other=0.0).to(tl.float32)
    tl.store(DELTA + bh.to(tl.int64) * Nq + t, tl.sum(o * do, axis=1), mask=t < Nq)


@triton.jit
def _load_lse2(LSE_p, ok):
    """lse in log2 units; +inf for rows that see nothing (their p is then 0)."""
    lse = tl.load(LSE_p, mask=ok, other=float("inf"))
    return tl.where(lse == float("-inf"), float("inf"), lse * 1.4426950408889634)


@triton.jit
def _dq_kernel(
    Q, K, V, DO, LSE, DELTA, KBAR, VBAR, NB, FIRST, LAST, KVALID, IDX, CNT, SEL, DQ,
    sqb, sqh, sqn, skb, skh, skn, svb, svh, svn, sdb, sdh, sdn, sgb, sgh, sgn,
    Hq, Hkv, Hs, Nq, Nk, NQB, NKB, KMAX, OFF, WIN, qk_scale, scale,
    D: tl.constexpr, DV: tl.constexpr, BS: tl.constexpr, GP: tl.constexpr,
    BD: tl.constexpr, BDV: tl.constexpr, BJ: tl.constexpr,
    CAUSAL: tl.constexpr, WINDOW: tl.constexpr, HAS_KV: tl.constexpr, FILL: tl.constexpr,
    PREC: tl.constexpr, HF: tl.constexpr = False, UNIFORM_N: tl.constexpr = False, GO: tl.constexpr = False,
):
    i, b64, kh, hs, rh, t, t0, t1 = qblock_prologue(Hq, Hkv, Hs, Nq, NQB, BS, GP, HF, GO)
    BM: tl.constexpr = GP * BS
    row_ok = t < Nq
    d = tl.arange(0, BD)
    dv = tl.arange(0, BDV)
    offs_n = tl.arange(0, BS)
    t64 = t[:, None].to(tl.int64)

    q = tl.load(Q + b64 * sqb + rh[:, None] * sqh + t64 * sqn + d[None, :], mask=row_ok[:, None] & (d[None, :] < D), other=0.0)
    do = tl.load(DO + b64 * sdb + rh[:, None] * sdh + t64 * sdn + dv[None, :], mask=row_ok[:, None] & (dv[None, :] < DV), other=0.0)
    lse2 = _load_lse2(LSE + (b64 * Hq + rh) * Nq + t, row_ok)
    delta = tl.load(DELTA + (b64 * Hq + rh) * Nq + t, mask=row_ok, other=0.0)
    K_h = K + b64 * skb + kh.to(tl.int64) * skh
    V_h = V + b64 * svb + kh.to(tl.int64) * svh
    NB_b = NB + b64 * NKB
    KV_b = KVALID + b64 * Nk
    IDX_r = IDX + ((b64 * Hs + hs) * NQB + i) * KMAX
    cnt = tl.load(CNT + (b64 * Hs + hs) * NQB + i)

    dq = tl.zeros([BM, BD], dtype=tl.float32)
    for s in range(0, cnt):
        j = tl.load(IDX_r + s)
        kpos = j * BS + offs_n
        kc = tl.minimum(kpos, Nk - 1)  # clamped rows: masked below (such a block is never clean)
        k = load_rows(K_h, kc, skn, d, D, BD)
        v = load_rows(V_h, kc, svn, dv, DV, BDV)
        qk = exact_logits(q, k, j, kpos, t, t0, t1, NB_b, KV_b, Nk, OFF, WIN, qk_scale, BS, CAUSAL, WINDOW, HAS_KV,
                          PREC)
        p = tl.math.exp2(qk - lse2[:, None])
        dp = tl.dot(do, tl.trans(v), input_precision=PREC)
        ds = p * (dp - delta[:, None])
        dq += tl.dot(ds.to(k.dtype), k, input_precision=PREC)

    if FILL:  # the forward's fill walk (sparse_forward._fwd_kernel): same bounds and bias
        ls, he = fill_bounds(t0, t1, NKB, OFF, WIN, FIRST + b64 * NKB, LAST + b64 * NKB, BS, CAUSAL, WINDOW)
        SEL_r = SEL + ((b64 * Hs + hs) * NQB + i) * ((NKB + 31) // 32)
        KB_h = KBAR + (b64 * Hkv + kh) * NKB * D
        VB_h = VBAR + (b64 * Hkv + kh) * NKB * DV
        tl.static_assert(BJ % 32 == 0)
        cj = tl.arange(0, BJ)
        inv_scale = 1.0 / qk_scale
        log2_n = tl.math.log2(BS * 1.0)
        for c0 in range(ls - ls % 32, he, BJ):
            bias = fill_bias(c0, cj, ls, he, NB_b, SEL_r, WINDOW, BJ, UNIFORM_N, log2_n)
            jc = tl.minimum(c0 + cj, he - 1)
            kb = load_rows(KB_h, jc, D, d, D, BD)
            vb = load_rows(VB_h, jc, DV, dv, DV, BDV)
            qk = tl.dot(q, tl.trans(kb), acc=tl.broadcast_to((bias * inv_scale)[None, :], [BM, BJ]),
                        input_precision=PREC) * qk_scale
            p = tl.math.exp2(qk - lse2[:, None])
            dp = tl.dot(do, tl.trans(vb), input_precision=PREC)
            ds = p * (dp - delta[:, None])
            dq += tl.dot(ds.to(q.dtype), kb, input_precision=PREC)

    tl.store(DQ + b64 * sgb + rh[:, None] * sgh + t64 * sgn + d[None, :], (dq * scale).to(DQ.dtype.element_ty),
             mask=row_ok[:, None] & (d[None, :] < D))


@triton.jit
def _landmark_kernel(
    Q, DO, LSE, DELTA, KBAR, VBAR, NB, FIRST, LAST, REV_OFF, REV_I, DKBAR, DVBAR,
    sqb, sqh, sqn, sdb, sdh, sdn,
    B, Hq, Hkv, Hs, Nq, NQB, NKB, REV_LEN, OFF, WIN, qk_scale, scale, NSTEPS, ISPLIT,
    D: tl.constexpr, DV: tl.constexpr, BS: tl.constexpr,
    BD: tl.constexpr, BDV: tl.constexpr, BJ: tl.constexpr,
    CAUSAL: tl.constexpr, WINDOW: tl.constexpr, PREC: tl.constexpr,
):
    """Partial landmark gradients of BJ key blocks from query blocks
    [split * ISPLIT, (split + 1) * ISPLIT) of one query head: DKBAR[split, b, h, j]."""
    pid = tl.program_id(0)
    split = tl.program_id(1)
    bh = tl.program_id(2)
    b = bh // Hq
    h = bh % Hq
    kh = h // (Hq // Hkv)
    hs = h * Hs // Hq
    b64 = b.to(tl.int64)
    h64 = h.to(tl.int64)
    c0 = pid * BJ
    jj = c0 + tl.arange(0, BJ)
    jm = jj < NKB
    d = tl.arange(0, BD)
    dv = tl.arange(0, BDV)
    rr = tl.arange(0, BS)
    n = tl.load(NB + b * NKB + jj, mask=jm, other=0)
    first = tl.load(FIRST + b * NKB + jj, mask=jm, other=2**30)
    last = tl.load(LAST + b * NKB + jj, mask=jm, other=-(2**30))
    log2n = tl.math.log2(tl.maximum(n, 1).to(tl.float32))
    KB_h = KBAR + (b64 * Hkv + kh) * NKB * D
    VB_h = VBAR + (b64 * Hkv + kh) * NKB * DV
    kb = tl.load(KB_h + jj[:, None].to(tl.int64) * D + d[None, :], mask=jm[:, None] & (d[None, :] < D), other=0.0)
    vb = tl.load(VB_h + jj[:, None].to(tl.int64) * DV + dv[None, :], mask=jm[:, None] & (dv[None, :] < DV), other=0.0)

    # query blocks that can see one of these landmarks fully, within this split
    i_lo = split * ISPLIT
    i_hi = tl.minimum(i_lo + ISPLIT, NQB)
    if CAUSAL:
        x = c0 * BS - OFF
        i_lo = tl.maximum(i_lo, tl.where(x > 0, (x + BS - 1) // BS, 0))
    if WINDOW:
        y = (c0 + BJ) * BS - 1 - OFF + WIN
        i_hi = tl.minimum(i_hi, tl.where(y > 0, (y + BS - 1) // BS, 0))

    dk = tl.zeros([BJ, BD], dtype=tl.float32)
    dvacc = tl.zeros([BJ, BDV], dtype=tl.float32)
    if i_lo < i_hi:
        ROFF = REV_OFF + (b64 * Hs + hs) * (NKB + 1)
        RI = REV_I + (b64 * Hs + hs) * REV_LEN
        start = tl.load(ROFF + jj, mask=jm, other=0)
        end = tl.load(ROFF + jj + 1, mask=jm, other=0)
        # pointer = first reverse entry >= i_lo (binary search, vectorised over landmarks)
        lo = start
        hi = end
        for _s in range(NSTEPS):
            act = lo < hi
            mid = (lo + hi) // 2
            val = tl.load(RI + mid, mask=act, other=0)
            right = act & (val < i_lo)
            lo = tl.where(right, mid + 1, lo)
            hi = tl.where(act & (right == 0), mid, hi)
        ptr = lo
        Q_h = Q + b64 * sqb + h64 * sqh
        DO_h = DO + b64 * sdb + h64 * sdh
        for i in range(i_lo, i_hi):
            t0 = i * BS
            t1 = tl.minimum(t0 + BS, Nq)
            t = t0 + rr
            ok = t < Nq
            t64 = t[:, None].to(tl.int64)
            q = tl.load(Q_h + t64 * sqn + d[None, :], mask=ok[:, None] & (d[None, :] < D), other=0.0)
            do = tl.load(DO_h + t64 * sdn + dv[None, :], mask=ok[:, None] & (dv[None, :] < DV), other=0.0)
            lse2 = _load_lse2(LSE + (b64 * Hq + h64) * Nq + t, ok)
            delta = tl.load(DELTA + (b64 * Hq + h64) * Nq + t, mask=ok, other=0.0)
            use = jm & (n > 0)
            if CAUSAL:
                use = use & (last <= t0 + OFF)
            if WINDOW:
                use = use & (first > t1 - 1 + OFF - WIN)
            pm = ptr < end
            cur = tl.load(RI + ptr, mask=pm, other=-1)
            hit = pm & (cur == i)
            ptr = ptr + hit.to(tl.int32)
            use = use & (hit == 0)
            qk = tl.dot(q, tl.trans(kb), input_precision=PREC) * qk_scale
            qk = tl.where(use[None, :], qk + log2n[None, :], float("-inf"))
            p = tl.math.exp2(qk - lse2[:, None])
            dp = tl.dot(do, tl.trans(vb), input_precision=PREC)
            ds = p * (dp - delta[:, None])
            dk += tl.dot(tl.trans(ds.to(q.dtype)), q, input_precision=PREC)
            dvacc += tl.dot(tl.trans(p.to(do.dtype)), do, input_precision=PREC)

    out = ((split * B + b).to(tl.int64) * Hq + h64) * NKB + jj
    tl.store(DKBAR + out[:, None] * D + d[None, :], dk * scale, mask=jm[:, None] & (d[None, :] < D))
    tl.store(DVBAR + out[:, None] * DV + dv[None, :], dvacc, mask=jm[:, None] & (dv[None, :] < DV))


@triton.jit
def _dkdv_kernel(
    Q, K, V, DO, LSE, DELTA, DKBAR, DVBAR, NB, VALID, KVALID, REV_OFF, REV_I, DK, DV_,
    sqb, sqh, sqn, skb, skh, skn, svb, svh, svn, sdb, sdh, sdn,
    skgb, skgh, skgn, svgb, svgh, svgn,
    B, Hq, Hkv, Hs, Nq, Nk, NQB, NKB, REV_LEN, OFF, WIN, qk_scale, scale, NSPLIT,
    D: tl.constexpr, DV: tl.constexpr, BS: tl.constexpr, BD: tl.constexpr, BDV: tl.constexpr,
    CAUSAL: tl.constexpr, WINDOW: tl.constexpr, HAS_KV: tl.constexpr, FILL: tl.constexpr,
    PREC: tl.constexpr,
):
    j = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // Hkv
    kh = bh % Hkv
    b64 = b.to(tl.int64)
    G = Hq // Hkv
    d = tl.arange(0, BD)
    dv = tl.arange(0, BDV)
    rr = tl.arange(0, BS)
    kpos = j * BS + rr
    kin = kpos < Nk
    kp64 = kpos[:, None].to(tl.int64)
    k = tl.load(K + b64 * skb + kh.to(tl.int64) * skh + kp64 * skn + d[None, :], mask=kin[:, None] & (d[None, :] < D), other=0.0)
    v = tl.load(V + b64 * svb + kh.to(tl.int64) * svh + kp64 * svn + dv[None, :], mask=kin[:, None] & (dv[None, :] < DV), other=0.0)
    nj = tl.load(NB + b * NKB + j)
    KV_b = KVALID + b64 * Nk

    dk = tl.zeros([BS, BD], dtype=tl.float32)
    dvacc = tl.zeros([BS, BDV], dtype=tl.float32)
    for hh in range(0, G):
        h = kh * G + hh
        hs = h * Hs // Hq
        h64 = h.to(tl.int64)
        ROFF = REV_OFF + (b64 * Hs + hs) * (NKB + 1)
        RI = REV_I + (b64 * Hs + hs) * REV_LEN
        start = tl.load(ROFF + j)
        end = tl.load(ROFF + j + 1)
        Q_h = Q + b64 * sqb + h64 * sqh
        DO_h = DO + b64 * sdb + h64 * sdh
        for e in range(start, end):
            i = tl.load(RI + e)
            t0 = i * BS
            t1 = tl.minimum(t0 + BS, Nq)
            t = t0 + rr
            ok = t < Nq
            t64 = t[:, None].to(tl.int64)
            q = tl.load(Q_h + t64 * sqn + d[None, :], mask=ok[:, None] & (d[None, :] < D), other=0.0)
            do = tl.load(DO_h + t64 * sdn + dv[None, :], mask=ok[:, None] & (dv[None, :] < DV), other=0.0)
            lse2 = _load_lse2(LSE + (b64 * Hq + h64) * Nq + t, ok)
            delta = tl.load(DELTA + (b64 * Hq + h64) * Nq + t, mask=ok, other=0.0)
            qkT = tl.dot(k, tl.trans(q), input_precision=PREC) * qk_scale
            clean = block_is_clean(j, NB + b * NKB, Nk, t0, t1, OFF, WIN, BS, CAUSAL, WINDOW, HAS_KV)
            if clean == 0:
                msk = pair_mask(t, kpos, Nk, KV_b, OFF, WIN, CAUSAL, WINDOW, HAS_KV)
                qkT = tl.where(tl.trans(msk), qkT, float("-inf"))
            pT = tl.math.exp2(qkT - lse2[None, :])
            dvacc += tl.dot(pT.to(do.dtype), do, input_precision=PREC)
            dpT = tl.dot(v, tl.trans(do), input_precision=PREC)
            dsT = pT * (dpT - delta[None, :])
            dk += tl.dot(dsT.to(q.dtype), q, input_precision=PREC)

    dk = dk * scale
    if FILL:
        w = tl.load(VALID + b64 * Nk + kpos, mask=kin, other=0).to(tl.float32) / tl.maximum(nj, 1).to(tl.float32)
        dkb = tl.zeros([BD], dtype=tl.float32)
        dvb = tl.zeros([BDV], dtype=tl.float32)
        for sh in range(0, NSPLIT * G):
            sp = sh // G
            h = kh * G + sh % G
            row = ((sp * B + b).to(tl.int64) * Hq + h) * NKB + j
            dkb += tl.load(DKBAR + row * D + d, mask=d < D, other=0.0)
            dvb += tl.load(DVBAR + row * DV + dv, mask=dv < DV, other=0.0)
        dk += w[:, None] * dkb[None, :]
        dvacc += w[:, None] * dvb[None, :]
    tl.store(DK + b64 * skgb + kh.to(tl.int64) * skgh + kp64 * skgn + d[None, :], dk.to(DK.dtype.element_ty),
             mask=kin[:, None] & (d[None, :] < D))
    tl.store(DV_ + b64 * svgb + kh.to(tl.int64) * svgh + kp64 * svgn + dv[None, :], dvacc.to(DV_.dtype.element_ty),
             mask=kin[:, None] & (dv[None, :] < DV))


def reverse_map(index: Tensor, count: Tensor, nkb: int) -> tuple[Tensor, Tensor]:
    """CSR of key block -> ascending query blocks that selected it, per (batch, selection head).

    Returns offsets ``[B, Hs, NKB + 1]`` int32 and query-block ids ``[B, Hs, NQB * kmax]`` int32.
    """
    b, hs, nqb, kmax = index.shape
    flat = index.reshape(b * hs, nqb * kmax)
    key = torch.where(flat >= 0, flat, torch.full_like(flat, nkb))
    sorted_j, perm = torch.sort(key, dim=1, stable=True)
    rev_i = (perm // kmax).to(torch.int32)
    bounds = torch.arange(nkb + 1, device=index.device, dtype=sorted_j.dtype).expand(b * hs, nkb + 1).contiguous()
    offsets = torch.searchsorted(sorted_j.contiguous(), bounds).to(torch.int32)
    return offsets.view(b, hs, nkb + 1), rev_i.view(b, hs, nqb * kmax)


def launch_delta(out: Tensor, grad_out: Tensor) -> Tensor:
    b, h, nq, dv = out.shape
    delta = torch.empty(b, h, nq, device=out.device, dtype=torch.float32)
    bm = 64
    _delta_kernel[(triton.cdiv(nq, bm), b * h)](
        out, grad_out, delta, out.stride(0), out.stride(1), out.stride(2),
        grad_out.stride(0), grad_out.stride(1), grad_out.stride(2), h, nq,
        DV=dv, BM=bm, BDV=triton.next_power_of_2(dv), num_warps=4,
    )
    return delta


def launch_dq(q, k, v, do, lse, delta, kbar, vbar, info: BlockInfo, index, count, scale, fill, config, dq=None,
              sel=None):
    b, hq, nq, d = q.shape
    hkv, dvd = k.shape[1], v.shape[-1]
    if dq is None:
        dq = torch.empty_like(q)
    gp = config["GP"]
    kv = info.key_valid if info.key_valid is not None else info.valid
    if sel is None:
        sel = selected_bitmap(index, info.nkb) if fill else count
    grid, hf, go = program_grid(config, b, hq, info.nqb)
    _dq_kernel[grid](
        q, k, v, do, lse, delta, kbar, vbar, info.n, info.first, info.last, kv, index, count, sel, dq,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2), do.stride(0), do.stride(1), do.stride(2),
        dq.stride(0), dq.stride(1), dq.stride(2),
        hq, hkv, index.shape[1], nq, info.nk, info.nqb, info.nkb, index.shape[-1], info.offset, info.win,
        float(scale) * LOG2E, float(scale),
        D=d, DV=dvd, BS=info.block, GP=gp, BD=triton.next_power_of_2(d), BDV=triton.next_power_of_2(dvd),
        BJ=config.get("BJ", 64), CAUSAL=info.causal, WINDOW=info.has_window, HAS_KV=info.key_valid is not None,
        FILL=fill, PREC=dot_precision(q.dtype), HF=hf, GO=go, UNIFORM_N=uniform_counts(info),
        num_warps=config["num_warps"], num_stages=config["num_stages"],
    )
    return dq


LANDMARK_MIN_SPLIT = 128  # query blocks per split at least (tests lower it to reach several splits)


def landmark_splits(nqb: int) -> tuple[int, int]:
    """(query blocks per split, number of splits) of the landmark-gradient kernel: enough
    programs to fill the card, with partial buffers of at most 4 x (kbar of every q head)."""
    isplit = max(LANDMARK_MIN_SPLIT, triton.cdiv(nqb, 4))
    return isplit, triton.cdiv(nqb, isplit)


def launch_landmark(q, do, lse, delta, kbar, vbar, info: BlockInfo, rev_off, rev_i, hs, scale, config, out=None):
    b, hq, nq, d = q.shape
    hkv = kbar.shape[1]
    dvd = vbar.shape[-1]
    isplit, nsplit = landmark_splits(info.nqb)
    if out is None:
        dkbar = torch.empty(nsplit, b, hq, info.nkb, d, device=q.device, dtype=torch.float32)
        dvbar = torch.empty(nsplit, b, hq, info.nkb, dvd, device=q.device, dtype=torch.float32)
    else:
        dkbar, dvbar = out
    bj = config.get("BJ", 64)
    nsteps = max(1, int(info.nqb).bit_length() + 1)
    _landmark_kernel[(triton.cdiv(info.nkb, bj), nsplit, b * hq)](
        q, do, lse, delta, kbar, vbar, info.n, info.first, info.last, rev_off, rev_i, dkbar, dvbar,
        q.stride(0), q.stride(1), q.stride(2), do.stride(0), do.stride(1), do.stride(2),
        b, hq, hkv, hs, nq, info.nqb, info.nkb, rev_i.shape[-1], info.offset, info.win,
        float(scale) * LOG2E, float(scale), nsteps, isplit,
        D=d, DV=dvd, BS=info.block, BD=triton.next_power_of_2(d), BDV=triton.next_power_of_2(dvd), BJ=bj,
        CAUSAL=info.causal, WINDOW=info.has_window, PREC=dot_precision(q.dtype),
        num_warps=config["num_warps"], num_stages=config["num_stages"],
    )
    return dkbar, dvbar


def launch_dkdv(q, k, v, do, lse, delta, dkbar, dvbar, info: BlockInfo, rev_off, rev_i, hs, scale, fill, config, out=None):
    b, hq, nq, d = q.shape
    hkv, dvd = k.shape[1], v.shape[-1]
    if out is None:
        dk, dv = torch.empty_like(k), torch.empty_like(v)
    else:
        dk, dv = out
    kv = info.key_valid if info.key_valid is not None else info.valid
    if dkbar is None:
        dkbar, dvbar, nsplit = kv, kv, 0  # unused when FILL is off
    else:
        nsplit = dkbar.shape[0]
    _dkdv_kernel[(info.nkb, b * hkv)](
        q, k, v, do, lse, delta, dkbar, dvbar, info.n, info.valid, kv, rev_off, rev_i, dk, dv,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2), do.stride(0), do.stride(1), do.stride(2),
        dk.stride(0), dk.stride(1), dk.stride(2), dv.stride(0), dv.stride(1), dv.stride(2),
        b, hq, hkv, hs, nq, info.nk, info.nqb, info.nkb, rev_i.shape[-1], info.offset, info.win,
        float(scale) * LOG2E, float(scale), nsplit,
        D=d, DV=dvd, BS=info.block, BD=triton.next_power_of_2(d), BDV=triton.next_power_of_2(dvd),
        CAUSAL=info.causal, WINDOW=info.has_window, HAS_KV=info.key_valid is not None, FILL=fill,
        PREC=dot_precision(q.dtype), num_warps=config["num_warps"], num_stages=config["num_stages"],
    )
    return dk, dv
