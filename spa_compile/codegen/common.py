"""Triton helpers shared by the SPA kernels: block classification and pair masks."""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def per_row(x, KM: tl.constexpr):
    """A per-query-row vector ``[QB]`` broadcast against a ``[QB, BJ]`` tile, or a key-major
    ``[BJ, QB]`` one (KM)."""
    if KM:
        return x[None, :]
    else:
        return x[:, None]


@triton.jit
def per_key(x, KM: tl.constexpr):
    """A per-key-block vector ``[BJ]`` broadcast against the same tiles (see per_row)."""
    if KM:
        return x[:, None]
    else:
        return x[None, :]


@triton.jit
def classify_blocks(
    jj, t0, t1, NB_b, FIRST_b, LAST_b, CS_b, Nk, NKB, OFF, WIN,
    BS: tl.constexpr, CAUSAL: tl.constexpr, WINDOW: tl.constexpr, HAS_KV: tl.constexpr = True,
    KM: tl.constexpr = False,
):
    """Visible and fully visible key blocks ``jj`` ([BJ]) for query blocks with rows
    ``t0 .. t1 - 1`` ([QB]). Returns (visible, full) bool ``[QB, BJ]`` (``[BJ, QB]`` with KM,
    key-major) and n ``[BJ]``.

    NB_b, FIRST_b, LAST_b, CS_b point at the batch row of the block-info tensors. HAS_KV False
    (no key padding): every key of ``[lo, hi)`` is valid (it lies inside the causal and window
    bounds of some row), so a non-empty range is visible without the two prefix-count gathers
    per ``[QB, BJ]`` element (the streaming selection at 128K, H200: 1.404 ms against 1.423 with them).
    """
    jm = (jj >= 0) & (jj < NKB)
    n = tl.load(NB_b + jj, mask=jm, other=0)
    has = per_key(n > 0, KM) & per_row(t1 > t0, KM)
    if CAUSAL or WINDOW:
        u0 = jj * BS
        u1 = tl.minimum(u0 + BS, Nk)
        lo = per_row(tl.zeros_like(t0), KM) + per_key(u0, KM)
        hi = per_row(tl.zeros_like(t0), KM) + per_key(u1, KM)
        full = has
        if CAUSAL:
            hi = tl.minimum(hi, per_row(t1 + OFF, KM))
            last = tl.load(LAST_b + jj, mask=jm, other=-(2**30))
            full = full & (per_key(last, KM) <= per_row(t0 + OFF, KM))
        if WINDOW:
            lo = tl.maximum(lo, per_row(t0 + OFF - WIN + 1, KM))
            first = tl.load(FIRST_b + jj, mask=jm, other=2**30)
            full = full & (per_key(first, KM) > per_row(t1 - 1 + OFF - WIN, KM))
        ok = (hi > lo) & has
        if HAS_KV:
            lo_c = tl.minimum(tl.maximum(lo, 0), Nk)
            hi_c = tl.minimum(tl.maximum(hi, 0), Nk)
            c_hi = tl.load(CS_b + hi_c, mask=ok, other=0)
            c_lo = tl.load(CS_b + lo_c, mask=ok, other=0)
            visible = ok & (c_hi > c_lo)
        else:
            visible = ok
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
def exact_logits(q, k, j, kpos, t, t0, t1, NB_b, KV_b, Nk, OFF, WIN, qk_scale, BS: tl.constexpr, CAUSAL: tl.constexpr,
                 WINDOW: tl.constexpr, HAS_KV: tl.constexpr, PREC: tl.constexpr, SCALED: tl.constexpr = True):
    """log2-domain logits of rows ``t`` against key block ``j`` (keys ``kpos``), -inf where a pair
    is not visible; blocks that need no element mask (``block_is_clean``) skip it. The forward's
    exact part and dq's both use it. SCALED=False: q k^T unscaled (the forward's softmax_step
    scales inside its exponent's multiply-add)."""
    qk = tl.dot(q, tl.trans(k), input_precision=PREC)
    if SCALED:
        qk = qk * qk_scale
    clean = block_is_clean(j, NB_b, Nk, t0, t1, OFF, WIN, BS, CAUSAL, WINDOW, HAS_KV)
    if clean == 0:
        msk = pair_mask(t, kpos, Nk, KV_b, OFF, WIN, CAUSAL, WINDOW, HAS_KV)
        qk = tl.where(msk, qk, float("-inf"))
    return qk


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


@triton.jit
def qblock_prologue(Hq, Hkv, Hs, Nq, NQB, BS: tl.constexpr, GP: tl.constexpr, HF: tl.constexpr,
                    GO: tl.constexpr = False):
    """Shared start of the per-(query block, GP heads) kernels (forward, dq).

    Returns the query block ``i`` (the last block first: causal rows that see the most keys
    start first), batch ``b`` (int64), kv head ``kh``, selection head ``hs``, the tile's row
    heads ``rh`` ([GP*BS], int64) and positions ``t`` ([GP*BS]), and the block's row range
    ``[t0, t1)``.

    Program order: the grid is ``(NQB, B * Hq // GP)`` (query blocks fastest), or with HF
    (heads first) ``(B * Hq // GP, NQB)``. CUDA in practice starts programs with axis 0 varying
    fastest, so with HF the head packs of one query block run side by side: the Hq/Hkv/GP
    packs of one GQA group read the same K/V (and landmark) tiles at about the same time and
    can share them through L2, where query blocks first puts them NQB programs apart (at long
    N the group's K/V is evicted from L2 in between). HF also puts every kv head's packs side
    by side, so the programs in flight read the K/V of all kv heads at once.
    GO (group order): a 1-D grid ``(B * Hkv * NQB * P,)``, P = Hq / Hkv / GP packs a group,
    the packs of one (kv head, query block) adjacent and the kv heads outermost: the packs
    share the K/V tiles through L2 as with HF, and the programs in flight read one kv head's
    K/V as with query blocks first. Only the order changes: the results are bitwise the same.
    With GP = Hq/Hkv there is one pack per group and GO is query blocks first.
    """
    HP = Hq // GP
    if GO:
        P = HP // Hkv
        pid = tl.program_id(0)
        r = pid // P
        i = NQB - 1 - r % NQB
        bk = r // NQB
        pid1 = (bk // Hkv) * HP + (bk % Hkv) * P + pid % P
    elif HF:
        pid1 = tl.program_id(0)
        i = NQB - 1 - tl.program_id(1)
    else:
        i = NQB - 1 - tl.program_id(0)
        pid1 = tl.program_id(1)
    b = pid1 // HP
    h0 = (pid1 % HP) * GP
    kh = h0 // (Hq // Hkv)
    hs = h0 * Hs // Hq
    r = tl.arange(0, GP * BS)
    rh = (h0 + r // BS).to(tl.int64)
    t = i * BS + r % BS
    t0 = i * BS
    t1 = tl.minimum(t0 + BS, Nq)
    return i, b.to(tl.int64), kh, hs, rh, t, t0, t1


def program_grid(config: dict, b: int, hq: int, nqb: int):
    """Grid and order flags (HF, GO) of the per-query-block kernels for ``config`` (see
    ``qblock_prologue``). HF puts the query blocks on grid axis 1, which CUDA caps at 65535:
    beyond that (over 1M tokens at block 16) query blocks first. GO is a 1-D grid (up to
    2**31 - 1 programs)."""
    gp = config["GP"]
    go = bool(config.get("GO", False)) and b * (hq // gp) * nqb < 2**31
    hf = not go and bool(config.get("HF", False)) and nqb <= 65535
    if go:
        return (b * (hq // gp) * nqb,), False, True
    return ((b * (hq // gp), nqb) if hf else (nqb, b * (hq // gp))), hf, False


@triton.jit
def load_rows(base, rows, stride, cols, NCOL: tl.constexpr, BCOL: tl.constexpr):
    """``base[rows[:, None] * stride + cols[None, :]]`` for in-range ``rows`` (callers clamp
    them); columns masked only when the head dim is not a power of two (``BCOL > NCOL``), so
    the usual case is an unpredicated (async) copy."""
    ptr = base + rows[:, None].to(tl.int64) * stride + cols[None, :]
    if BCOL == NCOL:
        x = tl.load(ptr)
    else:
        x = tl.load(ptr, mask=cols[None, :] < NCOL, other=0.0)
    return x


@triton.jit
def fill_bounds(t0, t1, NKB, OFF, WIN, FIRST_b, LAST_b, BS: tl.constexpr, CAUSAL: tl.constexpr,
                WINDOW: tl.constexpr):
    """[ls, he): the key blocks that are fully visible to every row of t0..t1-1, as far as
    causality and the window go (the caller still tests ``n > 0`` and selection). Exact for
    any key padding: block j with ``(j + 1) * BS - 1 <= t0 + OFF`` is causally full whatever
    its keys; of the others only the block holding position t0 + OFF can be, when its last
    valid key is at or before t0 + OFF (one scalar load). The window side mirrors it with
    ``first > t1 - 1 + OFF - WIN``. Empty blocks (first = 2**30, last = -2**30) may end up
    inside; ``n > 0`` drops them.
    """
    ls = 0
    he = NKB
    if CAUSAL:
        y = t0 + OFF + 1
        fb = tl.minimum(tl.where(y > 0, y // BS, 0), NKB)
        tail = fb < NKB
        last = tl.load(LAST_b + tl.minimum(fb, NKB - 1))
        he = fb + (tail & (last <= t0 + OFF) & (y > 0)).to(tl.int32)
    if WINDOW:
        x = t1 - 1 + OFF - WIN
        fa = tl.minimum(tl.where(x >= 0, x // BS + 1, 0), NKB)
        head = fa > 0
        first = tl.load(FIRST_b + tl.maximum(fa - 1, 0))
        ls = fa - (head & (first > x)).to(tl.int32)
    return ls, he
