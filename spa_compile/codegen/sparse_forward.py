"""Block-sparse FlashAttention over the selected blocks plus the landmark fill (SPEC.md 3-5).

One program per (query block, GP query heads of one selection row). GP > 1 packs the
heads of a GQA group into one tile of GP * Bq rows (group selection only), so each
K/V block is loaded once for GP heads. The exact part walks the ascending index list
with an online softmax (log2 domain); blocks that need no element mask skip it. The
fill then walks the key-block means of the blocks that can be fully visible, in
chunks of BJ, skipping the selected ones by a moving window over the sorted index
list, as pseudo-keys with logit ``s q . kbar + log n``.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl
from torch import Tensor

from .blockinfo import BlockInfo
from .common import block_is_clean, pair_mask

LOG2E = 1.4426950408889634


@triton.jit
def fill_range(t0, t1, NKB, OFF, WIN, BS: tl.constexpr, CAUSAL: tl.constexpr, WINDOW: tl.constexpr):
    """Key blocks [lo, hi) that can be fully visible to rows t0..t1-1 (a superset)."""
    lo = 0
    hi = NKB
    if CAUSAL:
        hi = tl.where(t0 + OFF >= 0, tl.minimum((t0 + OFF) // BS + 1, NKB), 0)
    if WINDOW:
        lo = tl.maximum((t1 - 1 + OFF - WIN - BS + 1) // BS, 0)
    return lo, hi


@triton.jit
def fill_use(jj, SEL_r, NB_b, FIRST_b, LAST_b, NKB, hi, t0, t1, OFF, WIN,
             CAUSAL: tl.constexpr, WINDOW: tl.constexpr):
    """Landmarks jj ([BJ]) that are fully visible to rows t0..t1-1 and not selected
    (SEL_r: the query block's selected-block bitmap, 32 blocks a word)."""
    jm = (jj < hi) & (jj < NKB)
    n = tl.load(NB_b + jj, mask=jm, other=0)
    use = jm & (n > 0)
    if CAUSAL:
        last = tl.load(LAST_b + jj, mask=jm, other=2**30)
        use = use & (last <= t0 + OFF)
    if WINDOW:
        first = tl.load(FIRST_b + jj, mask=jm, other=-(2**30))
        use = use & (first > t1 - 1 + OFF - WIN)
    word = tl.load(SEL_r + jj // 32, mask=jm, other=0)
    use = use & (((word >> (jj % 32)) & 1) == 0)
    return use, n


@triton.jit
def _fwd_kernel(
    Q, K, V, KBAR, VBAR, NB, FIRST, LAST, KVALID, IDX, CNT, SEL, O, LSE,
    sqb, sqh, sqn, skb, skh, skn, svb, svh, svn, sob, soh, son,
    Hq, Hkv, Hs, Nq, Nk, NQB, NKB, KMAX, OFF, WIN, qk_scale,
    D: tl.constexpr, DV: tl.constexpr, BS: tl.constexpr, GP: tl.constexpr,
    BD: tl.constexpr, BDV: tl.constexpr, BJ: tl.constexpr,
    CAUSAL: tl.constexpr, WINDOW: tl.constexpr, HAS_KV: tl.constexpr, FILL: tl.constexpr,
    PREC: tl.constexpr,
):
    BM: tl.constexpr = GP * BS
    i = NQB - 1 - tl.program_id(0)  # causal: the longest rows first
    pid1 = tl.program_id(1)
    HP = Hq // GP
    b = pid1 // HP
    h0 = (pid1 % HP) * GP
    G = Hq // Hkv
    kh = h0 // G
    hs = h0 * Hs // Hq
    b64 = b.to(tl.int64)

    r = tl.arange(0, BM)
    rh = (h0 + r // BS).to(tl.int64)
    t = i * BS + r % BS
    t0 = i * BS
    t1 = tl.minimum(t0 + BS, Nq)
    row_ok = t < Nq
    d = tl.arange(0, BD)
    dv = tl.arange(0, BDV)
    offs_n = tl.arange(0, BS)

    q = tl.load(Q + b64 * sqb + rh[:, None] * sqh + t[:, None].to(tl.int64) * sqn + d[None, :],
                mask=row_ok[:, None] & (d[None, :] < D), other=0.0)
    K_h = K + b64 * skb + kh.to(tl.int64) * skh
    V_h = V + b64 * svb + kh.to(tl.int64) * svh
    NB_b = NB + b * NKB
    KV_b = KVALID + b64 * Nk
    IDX_r = IDX + ((b64 * Hs + hs) * NQB + i) * KMAX
    cnt = tl.load(CNT + (b64 * Hs + hs) * NQB + i)

    m_i = tl.full([BM], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BM], dtype=tl.float32)
    acc = tl.zeros([BM, BDV], dtype=tl.float32)

    for s in range(0, cnt):
        j = tl.load(IDX_r + s)
        kpos = j * BS + offs_n
        kin = kpos < Nk
        k = tl.load(K_h + kpos[:, None].to(tl.int64) * skn + d[None, :], mask=kin[:, None] & (d[None, :] < D), other=0.0)
        v = tl.load(V_h + kpos[:, None].to(tl.int64) * svn + dv[None, :], mask=kin[:, None] & (dv[None, :] < DV), other=0.0)
        qk = tl.dot(q, tl.trans(k), input_precision=PREC) * qk_scale
        clean = block_is_clean(j, NB_b, Nk, t0, t1, OFF, WIN, BS, CAUSAL, WINDOW, HAS_KV)
        if clean == 0:
            msk = pair_mask(t, kpos, Nk, KV_b, OFF, WIN, CAUSAL, WINDOW, HAS_KV)
            qk = tl.where(msk, qk, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(qk, axis=1))
        m_s = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.math.exp2(m_i - m_s)
        p = tl.math.exp2(qk - m_s[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PREC)
        m_i = m_new

    if FILL:
        lo, hi = fill_range(t0, t1, NKB, OFF, WIN, BS, CAUSAL, WINDOW)
        SEL_r = SEL + ((b64 * Hs + hs) * NQB + i) * ((NKB + 31) // 32)
        KB_h = KBAR + (b64 * Hkv + kh) * NKB * D
        VB_h = VBAR + (b64 * Hkv + kh) * NKB * DV
        FIRST_b = FIRST + b * NKB
        LAST_b = LAST + b * NKB
        for c0 in range(lo, hi, BJ):
            jj = c0 + tl.arange(0, BJ)
            use, n = fill_use(jj, SEL_r, NB_b, FIRST_b, LAST_b, NKB, hi, t0, t1, OFF, WIN, CAUSAL, WINDOW)
            jm = jj < hi
            kb = tl.load(KB_h + jj[:, None].to(tl.int64) * D + d[None, :], mask=jm[:, None] & (d[None, :] < D), other=0.0)
            vb = tl.load(VB_h + jj[:, None].to(tl.int64) * DV + dv[None, :], mask=jm[:, None] & (dv[None, :] < DV), other=0.0)
            qk = tl.dot(q, tl.trans(kb), input_precision=PREC) * qk_scale
            qk = tl.where(use[None, :], qk + tl.math.log2(tl.maximum(n, 1).to(tl.float32))[None, :], float("-inf"))
            m_new = tl.maximum(m_i, tl.max(qk, axis=1))
            m_s = tl.where(m_new == float("-inf"), 0.0, m_new)
            alpha = tl.math.exp2(m_i - m_s)
            p = tl.math.exp2(qk - m_s[:, None])
            l_i = l_i * alpha + tl.sum(p, axis=1)
            acc = acc * alpha[:, None] + tl.dot(p.to(q.dtype), vb, input_precision=PREC)
            m_i = m_new

    seen = l_i > 0.0
    out = acc / tl.where(seen, l_i, 1.0)[:, None]
    lse = tl.where(seen, (m_i + tl.math.log2(tl.where(seen, l_i, 1.0))) * 0.6931471805599453, float("-inf"))
    tl.store(O + b64 * sob + rh[:, None] * soh + t[:, None].to(tl.int64) * son + dv[None, :],
             out.to(O.dtype.element_ty), mask=row_ok[:, None] & (dv[None, :] < DV))
    tl.store(LSE + (b64 * Hq + rh) * Nq + t, lse, mask=row_ok)


def dot_precision(dtype: torch.dtype) -> str:
    # float32 inputs: three-pass tf32, about float32 accuracy on the tensor cores
    return "tf32x3" if dtype == torch.float32 else "tf32"


def selected_bitmap(index: Tensor, nkb: int) -> Tensor:
    """[B, Hs, NQB, ceil(NKB / 32)] int32: bit j of a query block's row is set when it selected
    block j (the fill skips those landmarks). 32x smaller than the index lists at density 1/32."""
    b, hs, nqb, kmax = index.shape
    words = (nkb + 31) // 32
    bits = torch.zeros(b, hs, nqb, words + 1, dtype=torch.int32, device=index.device)
    idx = index.long()
    ok = idx >= 0
    w = torch.where(ok, idx // 32, torch.full_like(idx, words))
    val = torch.where(ok, torch.ones_like(idx).bitwise_left_shift(idx % 32), torch.zeros_like(idx))
    # distinct bits of a word: their sum is their OR (int64 keeps bit 31 exact, then wraps to int32)
    acc = torch.zeros(b, hs, nqb, words + 1, dtype=torch.int64, device=index.device)
    acc.scatter_add_(3, w, val)
    bits = torch.where(acc >= 2**31, acc - 2**32, acc).to(torch.int32)
    return bits[..., :words].contiguous()


def launch_forward(q, k, v, kbar, vbar, info: BlockInfo, index, count, scale, fill: bool, config, out=None, lse=None,
                   sel=None):
    b, hq, nq, d = q.shape
    hkv = k.shape[1]
    dv = v.shape[-1]
    hs = index.shape[1]
    if out is None:
        out = torch.empty(b, hq, nq, dv, device=q.device, dtype=q.dtype)
    if lse is None:
        lse = torch.empty(b, hq, nq, device=q.device, dtype=torch.float32)
    gp = config["GP"]
    kv = info.key_valid if info.key_valid is not None else info.valid
    if sel is None:
        sel = selected_bitmap(index, info.nkb) if fill else count
    _fwd_kernel[(info.nqb, b * (hq // gp))](
        q, k, v, kbar, vbar, info.n, info.first, info.last, kv, index, count, sel, out, lse,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2), out.stride(0), out.stride(1), out.stride(2),
        hq, hkv, hs, nq, info.nk, info.nqb, info.nkb, index.shape[-1], info.offset, info.win,
        float(scale) * LOG2E,
        D=d, DV=dv, BS=info.block, GP=gp,
        BD=triton.next_power_of_2(d), BDV=triton.next_power_of_2(dv), BJ=config.get("BJ", 64),
        CAUSAL=info.causal, WINDOW=info.has_window, HAS_KV=info.key_valid is not None, FILL=fill,
        PREC=dot_precision(q.dtype),
        num_warps=config["num_warps"], num_stages=config["num_stages"],
    )
    return out, lse
