"""The key-range bound score and its top-k (``block_score="bound"`` / ``"hybrid"``, docs/design.md).

SPEC.md's projector score compares block *means*: a single key that a few query rows look up (a
retrieval needle) is averaged away on both sides. The bound score of key block j for query block i
is an upper bound of the block pair's largest logit from the per-channel range of j's valid keys:

    bound[i, j] = s * max over the rows t of i (and the query heads of the selection head) of
                  sum_d max(q[t, d] * kmax[j, d], q[t, d] * kmin[j, d])
                = s * max_t (q+[t] . kmax[j] + q-[t] . kmin[j])          (q+ = max(q, 0), q- = min(q, 0))

two tensor-core products per (row tile, key-block chunk). ``key_range`` writes kmax / kmin;
``bound_select`` runs after the projector selection (``selection.select`` with ``half=True`` for
"hybrid", top-k 0 for "bound"), which already holds the forced blocks and the projector's share:

    k      = min(topk_count(visible), visible - forced)                     (SPEC.md section 2)
    k1     = ceil(k / 2) ("hybrid") or 0 ("bound")                          (the first pass)
    k2     = k - k1 = min(topk_count(visible) - k1', visible - count1)      (k1' from topk_count alone)

so the second pass needs only the first pass's count (the identity holds in both cases of the min).
One program per (query block, batch x selection head): it walks the visible key blocks in
chunks of BJ with a running buffer of the KP largest 64-bit keys ``(score bits << 32) | (2**31 - 1 - j)``
(ties: lower j first, as the streaming selection kernel), skipping the blocks the first pass took
(its bitmap), then merges its k2 blocks into the first pass's ascending list. No (NQB x NKB)
matrix reaches global memory.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from .bitmap import build_bitmap
from .blockinfo import BlockInfo
from .common import classify_blocks
from .selection import SENTINEL, _encode, _merge_top, _topk_count

BIG = tl.constexpr(2**30)


@triton.jit
def _key_range_kernel(K, VALID, KMX, KMN, skb, skh, skn, H, Nk, NKB,
                      D: tl.constexpr, BS: tl.constexpr, BD: tl.constexpr):
    """Per-channel max and min of the valid keys of one key block (0 for a block without any)."""
    blk = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    rows = blk * BS + tl.arange(0, BS)
    d = tl.arange(0, BD)
    ok = tl.load(VALID + b.to(tl.int64) * Nk + rows, mask=rows < Nk, other=0) != 0
    m = ok[:, None] & (d[None, :] < D)
    x = tl.load(K + b.to(tl.int64) * skb + h.to(tl.int64) * skh + rows[:, None].to(tl.int64) * skn + d[None, :],
                mask=m, other=0.0)
    hi = tl.max(tl.where(m, x, float("-inf")), axis=0)
    lo = tl.min(tl.where(m, x, float("inf")), axis=0)
    has = tl.max(ok.to(tl.int32), axis=0) > 0
    out = (bh.to(tl.int64) * NKB + blk) * D + d
    tl.store(KMX + out, tl.where(has, hi, 0.0).to(KMX.dtype.element_ty), mask=d < D)
    tl.store(KMN + out, tl.where(has, lo, 0.0).to(KMN.dtype.element_ty), mask=d < D)


def key_range(k: Tensor, info: BlockInfo) -> tuple[Tensor, Tensor]:
    """kmax, kmin ``[B, Hkv, NKB, D]`` in k's dtype (they are elements of k: exact)."""
    k = k if k.stride(-1) == 1 else k.contiguous()
    b, h, nk, d = k.shape
    kmx = torch.empty(b, h, info.nkb, d, device=k.device, dtype=k.dtype)
    kmn = torch.empty_like(kmx)
    bd = triton.next_power_of_2(d)
    _key_range_kernel[(info.nkb, b * h)](
        k, info.valid, kmx, kmn, k.stride(0), k.stride(1), k.stride(2), h, nk, info.nkb,
        D=d, BS=info.block, BD=bd, num_warps=4 if info.block * bd <= 8192 else 8,
    )
    return kmx, kmn


@triton.jit
def _bound_chunk(Q_b, KMX_h, KMN_h, jc, hs, t, row_ok, sqh, sqn, d, D: tl.constexpr, GS: tl.constexpr,
                 GT: tl.constexpr, BS: tl.constexpr, BJ: tl.constexpr, PREC: tl.constexpr):
    """max over rows and heads of q+ . kmax + q- . kmin for the key blocks ``jc`` ([BJ]): ``[BJ]`` f32."""
    kmask = d[None, :] < D
    kmx = tl.load(KMX_h + jc[:, None].to(tl.int64) * D + d[None, :], mask=kmask, other=0.0)
    kmn = tl.load(KMN_h + jc[:, None].to(tl.int64) * D + d[None, :], mask=kmask, other=0.0)
    r = tl.arange(0, GT * BS)
    sc = tl.full([BJ], float("-inf"), dtype=tl.float32)
    for h0 in range(0, GS, GT):
        rh = (hs * GS + h0 + r // BS).to(tl.int64)
        q = tl.load(Q_b + rh[:, None] * sqh + t[:, None].to(tl.int64) * sqn + d[None, :],
                    mask=row_ok[:, None] & (d[None, :] < D), other=0.0)
        qp = tl.maximum(q, 0.0).to(q.dtype)
        qn = tl.minimum(q, 0.0).to(q.dtype)
        bnd = tl.dot(qp, tl.trans(kmx), input_precision=PREC)
        bnd = tl.dot(qn, tl.trans(kmn), acc=bnd, input_precision=PREC)
        sc = tl.maximum(sc, tl.max(tl.where(row_ok[:, None], bnd, float("-inf")), axis=0))
    return sc


@triton.jit
def _bound_select_kernel(
    Q, KMX, KMN, NB, FIRST, LAST, CS, SEL1, IDX1, CNT1, IDX, CNT,
    sqb, sqh, sqn,
    Hs, Hkv, Nq, Nk, NQB, NKB, KMAX, OFF, WIN, scale,
    TOPK, PPM, MINB, MAXB,
    D: tl.constexpr, BD: tl.constexpr, GS: tl.constexpr, GT: tl.constexpr, BS: tl.constexpr,
    BJ: tl.constexpr, KP: tl.constexpr, KP1: tl.constexpr, KPO: tl.constexpr,
    HYBRID: tl.constexpr, CAUSAL: tl.constexpr, WINDOW: tl.constexpr, PREC: tl.constexpr,
    HAS_KV: tl.constexpr = True,
):
    i = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // Hs
    hs = bh % Hs
    kh = hs * Hkv // Hs
    b64 = b.to(tl.int64)
    row = bh.to(tl.int64) * NQB + i
    t0 = i * BS
    t1 = tl.minimum(t0 + BS, Nq)
    t0v = tl.zeros([1], dtype=tl.int32) + t0
    t1v = tl.zeros([1], dtype=tl.int32) + t1
    NB_b = NB + b64 * NKB
    FIRST_b = FIRST + b64 * NKB
    LAST_b = LAST + b64 * NKB
    CS_b = CS + b64 * (Nk + 1)
    KMX_h = KMX + (b64 * Hkv + kh) * NKB * D
    KMN_h = KMN + (b64 * Hkv + kh) * NKB * D
    SEL_r = SEL1 + row * ((NKB + 31) // 32)
    Q_b = Q + b64 * sqb
    r = tl.arange(0, GT * BS)
    t = t0 + r % BS
    row_ok = t < t1
    d = tl.arange(0, BD)
    js = 0
    je = NKB
    if CAUSAL:
        je = tl.minimum(tl.maximum((t1 - 1 + OFF) // BS + 1, 0), NKB)
    if WINDOW:
        js = tl.minimum(tl.maximum((t0 + OFF - WIN + 1) // BS, 0), NKB)

    cols = tl.arange(0, BJ)
    best = tl.full([1, KP], SENTINEL, dtype=tl.int64)
    nvis = tl.zeros([1], dtype=tl.int32)
    for c in range(js, je, BJ):
        jj = c + cols
        jm = jj < je
        visible, full, n = classify_blocks(jj, t0v, t1v, NB_b, FIRST_b, LAST_b, CS_b, Nk, NKB, OFF, WIN, BS,
                                           CAUSAL, WINDOW, HAS_KV)
        visible = visible & jm[None, :]
        nvis += tl.sum(visible.to(tl.int32), axis=1)
        jc = tl.minimum(jj, NKB - 1)
        taken = (tl.load(SEL_r + jc // 32) >> (jc % 32)) & 1
        rem = visible & (taken == 0)[None, :]
        kth = tl.min(best, axis=1)
        if tl.max(tl.max(rem.to(tl.int32), axis=1), axis=0) > 0:
            sc = _bound_chunk(Q_b, KMX_h, KMN_h, jc, hs, t, row_ok, sqh, sqn, d, D, GS, GT, BS, BJ, PREC) * scale
            sc = tl.where(sc == 0.0, 0.0, sc)  # -0.0 -> +0.0: equal scores must tie
            key = tl.where(rem, _encode(sc[None, :], jj), SENTINEL)
            if tl.max(tl.max((key > kth[:, None]).to(tl.int32), axis=1), axis=0) > 0:
                best = _merge_top(best, key, KP)  # ascending

    cnt1 = tl.load(CNT1 + row)
    kc = _topk_count(nvis, nvis, TOPK, PPM, MINB, MAXB)  # topk_count(visible), clipped by visible only
    k1 = kc * 0
    if HYBRID:
        k1 = (kc + 1) // 2
    k2 = tl.minimum(kc - k1, nvis - cnt1)  # [1]
    k2s = tl.sum(k2, axis=0)

    # merge the k2 best (the buffer's last k2; ascending j, BIG padding) into the first pass's list
    kcols = tl.arange(0, KP)
    jb = (2147483647 - (best & 0xFFFFFFFF)).to(tl.int32)
    jb = tl.reshape(tl.where(kcols[None, :] >= KP - k2[:, None], jb, BIG), [KP])
    jb = tl.sort(jb, dim=0, descending=False)
    c1 = tl.arange(0, KP1)
    ja = tl.load(IDX1 + row * KMAX + c1, mask=(c1 < cnt1) & (c1 < KMAX), other=BIG)
    pos_a = c1 + tl.sum((jb[None, :] < ja[:, None]).to(tl.int32), axis=1)
    pos_b = kcols + tl.sum((ja[None, :] < jb[:, None]).to(tl.int32), axis=1)
    IDX_r = IDX + row * KMAX
    tl.store(IDX_r + pos_a, ja, mask=c1 < cnt1)
    tl.store(IDX_r + pos_b, jb, mask=kcols < k2s)
    po = tl.arange(0, KPO)
    tl.store(IDX_r + po, tl.full([KPO], -1, dtype=tl.int32), mask=(po >= cnt1 + k2s) & (po < KMAX))
    tl.store(CNT + row, cnt1 + k2s)


def _bound_config(gs: int, block: int, bd: int, kp: int) -> tuple[int, int, int]:
    """(GT heads a row tile, BJ key blocks a chunk, warps): tiles of at most 128 rows; chunks of
    64 key blocks (32 for head dim 256), at least the buffer's width KP (the merge needs BJ >= KP)."""
    gt = 1
    while gt * 2 <= gs and gs % (gt * 2) == 0 and gt * 2 * block <= 128:
        gt *= 2
    bj = max(kp, 32 if bd > 128 else 64)
    warps = 4 if gt * block * bj <= 4096 else 8
    return gt, bj, warps


def bound_select(q: Tensor, kmx: Tensor, kmn: Tensor, info: BlockInfo, scale: float, cfg, index1: Tensor,
                 count1: Tensor, k2_cap: int) -> tuple[Tensor, Tensor]:
    """The bound score's share of the selection, merged into the first pass (index1, count1):
    index ``[B, Hs, NQB, kmax]`` ascending, -1 padded, and count. ``k2_cap``: an upper bound on
    the second pass's k2 (the buffer's width)."""
    q = q if q.stride(-1) == 1 else q.contiguous()
    b, hq, nq, d = q.shape
    hs = index1.shape[1]
    hkv = kmx.shape[1]
    kmax = index1.shape[-1]
    sel1 = build_bitmap(index1, count1, info.nkb)
    index = torch.empty_like(index1)
    count = torch.empty_like(count1)
    bd = max(16, triton.next_power_of_2(d))
    kp = max(16, triton.next_power_of_2(max(1, k2_cap)))
    gt, bj, warps = _bound_config(hq // hs, info.block, bd, kp)
    prec = "ieee" if q.dtype == torch.float32 else "tf32"
    _bound_select_kernel[(info.nqb, b * hs)](
        q, kmx, kmn, info.n, info.first, info.last, info.cs, sel1, index1, count1, index, count,
        q.stride(0), q.stride(1), q.stride(2),
        hs, hkv, nq, info.nk, info.nqb, info.nkb, kmax, info.offset, info.win, float(scale),
        -1 if cfg.topk is None else cfg.topk, cfg.density_ppm,
        -1 if cfg.min_blocks is None else cfg.min_blocks,
        -1 if cfg.max_blocks is None else cfg.max_blocks,
        D=d, BD=bd, GS=hq // hs, GT=gt, BS=info.block, BJ=bj, KP=kp,
        KP1=max(16, triton.next_power_of_2(kmax)), KPO=max(16, triton.next_power_of_2(kmax)),
        HYBRID=cfg.block_score == "hybrid", CAUSAL=info.causal, WINDOW=info.has_window, PREC=prec,
        HAS_KV=info.key_valid is not None, num_warps=warps,
    )
    return index, count
