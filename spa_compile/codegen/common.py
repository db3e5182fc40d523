"""Triton helpers shared by the SPA kernels: block classification and pair masks."""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def classify_blocks(
    jj, t0, t1, NB_b, FIRST_b, LAST_b, CS_b, Nk, NKB, OFF, WIN,
    BS: tl.constexpr, CAUSAL: tl.constexpr, WINDOW: tl.constexpr,
):
    """Visible and fully visible key blocks ``jj`` ([BJ]) for query blocks with rows
    ``t0 .. t1 - 1`` ([QB]). Returns (visible, full) bool ``[QB, BJ]`` and n ``[BJ]``.

    NB_b, FIRST_b, LAST_b, CS_b point at the batch row of the block-info tensors.
    """
    jm = (jj >= 0) & (jj < NKB)
    n = tl.load(NB_b + jj, mask=jm, other=0)
    has = (n > 0)[None, :] & (t1 > t0)[:, None]
    if CAUSAL or WINDOW:
        u0 = jj * BS
        u1 = tl.minimum(u0 + BS, Nk)
        lo = tl.zeros_like(t0)[:, None] + u0[None, :]
        hi = tl.zeros_like(t0)[:, None] + u1[None, :]
        full = has
        if CAUSAL:
            hi = tl.minimum(hi, (t1 + OFF)[:, None])
            last = tl.load(LAST_b + jj, mask=jm, other=-(2**30))
            full = full & (last[None, :] <= (t0 + OFF)[:, None])
        if WINDOW:
            lo = tl.maximum(lo, (t0 + OFF - WIN + 1)[:, None])
            first = tl.load(FIRST_b + jj, mask=jm, other=2**30)
            full = full & (first[None, :] > (t1 - 1 + OFF - WIN)[:, None])
        ok = (hi > lo) & has
        lo_c = tl.minimum(tl.maximum(lo, 0), Nk)
        hi_c = tl.minimum(tl.maximum(hi, 0), Nk)
        c_hi = tl.load(CS_b + hi_c, mask=ok, other=0)
        c_lo = tl.load(CS_b + lo_c, mask=ok, other=0)
        visible = ok & (c_hi > c_lo)
        full = full & visible
    else:
        visible = has
        full = has
    return visible, full, n


@triton.jit
def block_is_clean(j, NB_b, Nk, t0, t1, OFF, WIN, BS: tl.constexpr, CAUSAL: tl.constexpr, WINDOW: tl.constexpr,
                   HAS_KV: tl.constexpr):
    """True when every (row of t0..t1-1, key of block j) pair is visible: no element mask needed.

    Without key padding this is geometry alone (a block inside the causal/window band has only
    valid keys); with padding the block's valid-key count must be full.
    """
    if HAS_KV:
        clean = tl.load(NB_b + j) == BS
    else:
        clean = j * BS + BS <= Nk
    if CAUSAL:
        clean = clean & (j * BS + BS - 1 <= t0 + OFF)
    if WINDOW:
        clean = clean & (j * BS > t1 - 1 + OFF - WIN)
    return clean


@triton.jit
def pair_mask(
    t, kpos, Nk, KV_b, OFF, WIN,
    CAUSAL: tl.constexpr, WINDOW: tl.constexpr, HAS_KV: tl.constexpr,
):
    """visible(t, u) for rows ``t`` ([M]) and keys ``kpos`` ([N]): bool ``[M, N]``."""
    kin = kpos < Nk
    m = (tl.zeros_like(t)[:, None] + kin[None, :].to(tl.int32)) != 0
    if HAS_KV:
        kv = tl.load(KV_b + kpos, mask=kin, other=0)
        m = m & (kv != 0)[None, :]
    if CAUSAL:
        m = m & (kpos[None, :] <= (t + OFF)[:, None])
    if WINDOW:
        m = m & (kpos[None, :] > (t + OFF - WIN)[:, None])
    return m
