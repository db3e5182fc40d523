"""Experimental, GPU-only, opt-in (not the op's default): the sparse forward (exact part and
landmark fill) in Gluon with warp specialization (FA3-style producer/consumers), for Hopper.

Why: the Triton forward runs at about 480-510 TFLOP/s on an H200 and is most of the op at 128K
(docs/kernels.md, session 11); Triton 3.6 cannot warp-specialize on sm_90, Gluon can. A program
takes two query blocks of one head. Each has its own consumer warpgroup (64 rows: the default
partition and a 4-warp worker, 232 registers a thread) and its own NS-deep ring of K/V buffers in
shared memory (``ready`` / ``empty`` mbarriers); one producer warp (24 registers) streams both
lists' blocks through TMA, then each block's landmark chunks (kbar / vbar tiles of 64 means) into
the same ring. A consumer issues the next tile's q k^T before this tile's softmax (the tensor cores
run while the exponentials do), then the PV product, and releases the buffer.
The two warpgroups overlap each other's softmax and MMAs through the warp scheduler alone; the
``order`` variant (``_mma_partition_ordered``) adds FA3's schedule: the consumers take turns to
issue their MMAs, and P runs a tile behind (H200, session 15: correct, 0.86-1.0x the Triton
kernel, no faster than without it).

Scope (``supported`` says why not): no key padding, no window, causal or not (the diagonal offset
``OFF`` as everywhere), bf16 / fp16, head dims 64 or 128, block 64, Nq and Nk multiples of the
block (the 2-D descriptors span heads), group or head selection (any Hs dividing Hq); the fill
where every key block is full (``sparse_forward.uniform_counts``: the landmark count is the
constant BS). Same arithmetic as ``sparse_forward._fwd_kernel``: fp32 logits scaled in the log2
domain, the diagonal block masked by ``t + OFF``, landmarks ``s q . kbar + log2(BS)`` over the
fully visible, unselected blocks (the bitmap), the online softmax of ``softmax_step``.

Gluon has no interpreter: CI compiles nothing here; ``benchmarks/compile_check.py --gluon``
compiles it for sm_90 (no GPU needed) and ``tests/test_gluon_forward.py`` compares it with the
Triton kernel on a card. On an H200 (session 14, runs 45-48) its outputs match the Triton
kernel's and it runs at 0.90-1.05x its speed (``pair`` at Hkv=8 about equal): opt-in
(``SPA_GLUON_FORWARD=1``), docs/kernels.md says why and what is left to try.
"""

from __future__ import annotations

import torch
from torch import Tensor

from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import (fence_async_shared, mbarrier, tma, warpgroup_mma,
                                                               warpgroup_mma_init, warpgroup_mma_wait)
from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

from .bitmap import build_bitmap
from .blockinfo import BlockInfo
from .sparse_forward import positive_scale, uniform_counts

LOG2E = 1.4426950408889634
# K/V buffers a ring. A consumer issues block s + 1's logits at the start of iteration s, and the
# producer refills a buffer only when its iteration ends, so with 2 buffers block s + 1's load
# starts one iteration before it is needed; 3 give it two. Two rings of 3 x (16 + 16) KB at
# D=128 and two Q tiles: 224 KB of the H200's 227 (2 buffers: 160 KB). One program an SM.
STAGES = 3
# registers a thread: two consumer warpgroups at 232 and a producer warp (its warpgroup) at 24
# fit the SM's 64K (FA3's split: 2 x 128 x 232 + 128 x 24 = 62,464)
CONSUMER_REGS = 232
PRODUCER_REGS = 24
# the consumer's variants (_mma_partition): q as the A operand from registers; PV kept in flight
Q_REGS = True  # H200, session 14: 3-8% faster than q from shared memory
PV_ASYNC = False  # 5-10% slower (the buffer is held a tile longer)


@gluon.jit
def _fill_end(t0, OFF, NKB, BS: gl.constexpr, CAUSAL: gl.constexpr):
    """he: the landmarks [0, he) fully visible to every row of the block (no padding, no window:
    common.fill_bounds without its loads)."""
    he = NKB
    if CAUSAL:
        y = t0 + OFF + 1
        he = gl.minimum(gl.where(y > 0, y // BS, 0), NKB)
    return he


@gluon.jit
def _produce(s, cnt, j, desc_k, desc_v, lm_k, lm_v, k_smem, v_smem, ready, empty, kv_row0, lm_row0,
             BS: gl.constexpr, NS: gl.constexpr):
    """Tile s of a consumer's walk into buffer s % NS once its last reader released it (``empty``:
    the first pass waits on the phase before the barrier's first, which counts as passed): the
    selected K/V block j (the list's entry s) for s < cnt, else landmark chunk (s - cnt) of kbar /
    vbar."""
    st = s % NS
    mbarrier.wait(empty.index(st), ((s // NS) & 1) ^ 1)
    mbarrier.expect(ready.index(st), desc_k.block_type.nbytes + desc_v.block_type.nbytes)
    if s < cnt:
        tma.async_copy_global_to_shared(desc_k, [kv_row0 + j * BS, 0], ready.index(st), k_smem.index(st))
        tma.async_copy_global_to_shared(desc_v, [kv_row0 + j * BS, 0], ready.index(st), v_smem.index(st))
    else:
        c0 = (s - cnt) * BS
        tma.async_copy_global_to_shared(lm_k, [lm_row0 + c0, 0], ready.index(st), k_smem.index(st))
        tma.async_copy_global_to_shared(lm_v, [lm_row0 + c0, 0], ready.index(st), v_smem.index(st))


@gluon.jit
def _pick(vec, lane, s):
    """Entry s % 32 of a warp's 32-wide vector, as a scalar (a shuffle-reduce, no memory trip)."""
    return gl.sum(gl.where(lane == s % 32, vec, 0), axis=0)


@gluon.jit
def _load_partition(k_desc, v_desc, kb_desc, vb_desc, k_a, v_a, ready_a, empty_a, k_b, v_b, ready_b, empty_b,
                    IDX_a, cnt_a, tot_a, IDX_b, cnt_b, tot_b, kv_row0, lm_row0, BS: gl.constexpr, NS: gl.constexpr):
    """The producer warp: both consumers' walks (their selected blocks, then their landmark
    chunks), one tile of each in turn. The lists are read 32 entries at a time into registers, the
    next 32 while the current ones are used: a global load per tile would put its latency (about
    a microsecond) on the producer's critical path, as long as a tile's MMAs."""
    lay: gl.constexpr = gl.BlockedLayout([1], [32], [1], [0])
    lane = gl.arange(0, 32, layout=lay)
    va = gl.load(IDX_a + lane, mask=lane < cnt_a, other=0)
    vb = gl.load(IDX_b + lane, mask=lane < cnt_b, other=0)
    na = gl.load(IDX_a + 32 + lane, mask=32 + lane < cnt_a, other=0)
    nb = gl.load(IDX_b + 32 + lane, mask=32 + lane < cnt_b, other=0)
    for s in range(gl.maximum(tot_a, tot_b)):
        if (s % 32 == 0) & (s > 0):  # the prefetched chunk becomes current; fetch the one after
            va = na
            vb = nb
            na = gl.load(IDX_a + s + 32 + lane, mask=s + 32 + lane < cnt_a, other=0)
            nb = gl.load(IDX_b + s + 32 + lane, mask=s + 32 + lane < cnt_b, other=0)
        if s < tot_a:
            _produce(s, cnt_a, _pick(va, lane, s), k_desc, v_desc, kb_desc, vb_desc, k_a, v_a, ready_a, empty_a,
                     kv_row0, lm_row0, BS, NS)
        if s < tot_b:
            _produce(s, cnt_b, _pick(vb, lane, s), k_desc, v_desc, kb_desc, vb_desc, k_b, v_b, ready_b, empty_b,
                     kv_row0, lm_row0, BS, NS)


@gluon.constexpr_function
def _mma_layout(n):
    """The accumulator layout of a consumer warpgroup's [64, n] warpgroup MMA (4 warps along the rows)."""
    return gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, n, 16])


@gluon.jit
def _q_operand(q_smem, q_bar, qa_layout: gl.constexpr, Q_REGS: gl.constexpr):
    """The query tile as q k^T's A operand once its copy landed: in registers (Q_REGS) or shared memory."""
    mbarrier.wait(q_bar, 0)
    if Q_REGS:
        return q_smem.load(qa_layout)
    else:
        return q_smem


@gluon.jit
def _logits(q, k_buf, zero_qk):
    """Start q k^T on the tensor cores (async: the caller waits); q in shared memory or registers."""
    return warpgroup_mma(q, k_buf.permute((1, 0)), zero_qk, use_acc=False, is_async=True)


@gluon.jit
def _tile_meta(IDX_r, SEL_r, NW, s, cnt, tot, BS: gl.constexpr):
    """What tile s's softmax needs from memory, loaded a tile ahead so that its latency hides
    behind the current tile: the key block j (a selected tile) or the two 32-bit bitmap words of
    its landmark chunk (a fill tile)."""
    j = gl.load(IDX_r + s, mask=s < cnt, other=0)
    fill = (s >= cnt) & (s < tot)
    w = (s - cnt) * (BS // 32)
    w0 = gl.load(SEL_r + gl.minimum(w, NW - 1), mask=fill, other=0)
    w1 = gl.load(SEL_r + gl.minimum(w + 1, NW - 1), mask=fill, other=0)
    return j, w0, w1


@gluon.jit
def _mma_partition(q_smem, k_smem, v_smem, ready, empty, q_bar, IDX_r, cnt, tot, he, SEL_r, NW, t0, OFF, qk_scale,
                   log2_n, O_r, LSE_r, Nq, BS: gl.constexpr, D: gl.constexpr, DV: gl.constexpr, NS: gl.constexpr,
                   CAUSAL: gl.constexpr, Q_REGS: gl.constexpr, PV_ASYNC: gl.constexpr):
    """One consumer warpgroup (64 rows) walks ``tot`` tiles: its ``cnt`` selected blocks (the
    diagonal one masked by ``t + OFF``), then the landmark chunks of [0, he) as pseudo-keys with
    logit ``s q . kbar + log2(n)`` (n = BS: no padding), the selected ones dropped through the
    query block's bitmap ``SEL_r`` (NW words). Each tile: logits, online softmax, PV, then the
    buffer is released. The next tile's q k^T is issued before this tile's softmax (FA3's
    intra-warpgroup overlap: the tensor cores work while the exponentials run).
    Q_REGS: q is the MMA's A operand from registers (read once), so q k^T reads only k from shared
    memory (a 64 x 64 tile reading both runs near the shared-memory bandwidth).
    PV_ASYNC: tile s's PV stays in flight through tile s + 1's softmax and is waited for only
    before the accumulator's rescale; its buffer is released then (needs NS >= 3: tiles s, s + 1
    and s + 2 are held or loading at once)."""
    qk_layout: gl.constexpr = _mma_layout(BS)
    pv_layout: gl.constexpr = _mma_layout(DV)
    p_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=pv_layout, k_width=2)
    qa_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=qk_layout, k_width=2)
    row_l: gl.constexpr = gl.SliceLayout(1, qk_layout)
    col_l: gl.constexpr = gl.SliceLayout(0, qk_layout)
    orow_l: gl.constexpr = gl.SliceLayout(1, pv_layout)
    gl.static_assert(BS == 64)  # two bitmap words a landmark chunk
    gl.static_assert((not PV_ASYNC) or NS >= 3)

    m_i = gl.full([BS], float("-inf"), gl.float32, row_l)
    l_i = gl.zeros([BS], gl.float32, row_l)
    acc = gl.zeros([BS, DV], gl.float32, pv_layout)
    if PV_ASYNC:
        acc = warpgroup_mma_init(acc)  # carried through the loop as a pending accumulator
    t = t0 + gl.arange(0, BS, layout=row_l)
    cols = gl.arange(0, BS, layout=col_l)
    zero_qk = gl.zeros([BS, BS], gl.float32, qk_layout)
    if PV_ASYNC:
        pa = gl.convert_layout(zero_qk.to(v_smem.dtype), p_layout)  # the in-flight PV's A operand
    q = _q_operand(q_smem, q_bar, qa_layout, Q_REGS)
    qk = zero_qk
    if tot > 0:
        mbarrier.wait(ready.index(0), 0)
        qk = _logits(q, k_smem.index(0), zero_qk)
        qk = warpgroup_mma_wait(num_outstanding=0, deps=(qk, ))
    j_nx, w0_nx, w1_nx = _tile_meta(IDX_r, SEL_r, NW, 0, cnt, tot, BS)
    for s in range(tot):
        st = s % NS
        j = j_nx
        w0 = w0_nx
        w1 = w1_nx
        j_nx, w0_nx, w1_nx = _tile_meta(IDX_r, SEL_r, NW, s + 1, cnt, tot, BS)
        has_next = s + 1 < tot
        nxt = warpgroup_mma_init(zero_qk)  # the async result's type (a pending accumulator)
        if has_next:  # the next tile's logits, on the tensor cores during this softmax
            st1 = (s + 1) % NS
            mbarrier.wait(ready.index(st1), ((s + 1) // NS) & 1)
            nxt = _logits(q, k_smem.index(st1), zero_qk)
        p, m_new, alpha, l_i = _softmax_tile(qk, s, cnt, j, w0, w1, t, t0, cols, OFF, he, qk_scale, log2_n, m_i, l_i,
                                             BS, CAUSAL)
        if PV_ASYNC:  # tile s - 1's PV (everything but the newest group, q k^T of s + 1) before the rescale
            # (a new name: acc is a pending accumulator, the waited one a tensor); pa rides through the
            # wait: its registers are that PV's A operand until then (see _mma_partition_ordered)
            if has_next:
                done, pa = warpgroup_mma_wait(num_outstanding=1, deps=(acc, pa))
            else:
                done, pa = warpgroup_mma_wait(num_outstanding=0, deps=(acc, pa))
            pa = gl.convert_layout(p.to(v_smem.dtype), p_layout)
            if s > 0:
                mbarrier.arrive(empty.index((s + NS - 1) % NS), count=1)
            done = done * gl.convert_layout(alpha, orow_l)[:, None]
            acc = warpgroup_mma(pa, v_smem.index(st), done, is_async=True)
            # q k^T of s + 1 for the next softmax (without it, nothing to wait for); this PV stays in flight
            nxt = warpgroup_mma_wait(num_outstanding=1, deps=(nxt, ))
        else:
            pa = gl.convert_layout(p.to(v_smem.dtype), p_layout)
            acc = acc * gl.convert_layout(alpha, orow_l)[:, None]
            acc = warpgroup_mma(pa, v_smem.index(st), acc, is_async=True)
            acc, nxt = warpgroup_mma_wait(num_outstanding=0, deps=(acc, nxt))
            mbarrier.arrive(empty.index(st), count=1)
        m_i = m_new
        qk = nxt
    if PV_ASYNC:
        acc, pa = warpgroup_mma_wait(num_outstanding=0, deps=(acc, pa))
        if tot > 0:
            mbarrier.arrive(empty.index((tot + NS - 1) % NS), count=1)

    _store_rows(acc, m_i, l_i, t, t0, O_r, LSE_r, Nq, BS, DV)


@gluon.jit
def _store_rows(acc, m_i, l_i, t, t0, O_r, LSE_r, Nq, BS: gl.constexpr, DV: gl.constexpr):
    """A consumer's 64 rows: out = acc / l in O's dtype and lse = (m + log2 l) ln 2 (-inf where no
    key was seen), the rows of a missing block (t0 < 0) or past Nq left out."""
    pv_layout: gl.constexpr = _mma_layout(DV)
    orow_l: gl.constexpr = gl.SliceLayout(1, pv_layout)
    ocol_l: gl.constexpr = gl.SliceLayout(0, pv_layout)
    seen = l_i > 0.0
    inv = gl.convert_layout(1.0 / gl.where(seen, l_i, 1.0), orow_l)
    out = acc * inv[:, None]
    orow = t0 + gl.arange(0, BS, layout=orow_l)
    ocol = gl.arange(0, DV, layout=ocol_l)
    ok = (orow >= 0) & (orow < Nq)
    gl.store(O_r + orow[:, None].to(gl.int64) * DV + ocol[None, :], out.to(O_r.dtype.element_ty), mask=ok[:, None])
    lse = gl.where(seen, (m_i + gl.log2(gl.where(seen, l_i, 1.0))) * 0.6931471805599453, float("-inf"))
    gl.store(LSE_r + t, lse, mask=(t >= 0) & (t < Nq))


@gluon.jit
def _softmax_tile(qk, s, cnt, j, w0, w1, t, t0, cols, OFF, he, qk_scale, log2_n, m_i, l_i, BS: gl.constexpr,
                  CAUSAL: gl.constexpr):
    """Tile s's masks (the diagonal block's element mask, or the landmark chunk's bias from the
    bitmap words w0 / w1) and online-softmax step on its unscaled logits ``qk``: (p, m, alpha, l).
    The scale (> 0) enters the row max once and each exponent through a multiply-add, as in
    sparse_forward.softmax_step."""
    if s < cnt:
        if CAUSAL:
            if j * BS + BS - 1 > t0 + OFF:  # the block reaches past the first row's last key
                kpos = j * BS + cols
                qk = gl.where(kpos[None, :] <= (t + OFF)[:, None], qk, float("-inf"))
    else:  # landmarks c0 .. c0 + BS - 1: log2(n) where unselected and below he, else -inf
        c0 = (s - cnt) * BS
        word = gl.where(cols < 32, w0, w1)
        use = (cols < he - c0) & (((word >> (cols % 32)) & 1) == 0)
        qk = qk + gl.where(use, log2_n / qk_scale, float("-inf"))[None, :]
    m_new = gl.maximum(m_i, gl.max(qk, axis=1) * qk_scale)
    m_s = gl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = gl.exp2(m_i - m_s)
    p = gl.exp2(qk * qk_scale - m_s[:, None])
    l_i = l_i * alpha + gl.sum(p, axis=1)
    return p, m_new, alpha, l_i


@gluon.jit
def _mma_partition_ordered(q_smem, k_smem, v_smem, ready, empty, q_bar, IDX_r, cnt, tot, he, SEL_r, NW, t0, OFF,
                           qk_scale, log2_n, O_r, LSE_r, Nq, turn_me, turn_other, tot_other,
                           BS: gl.constexpr, D: gl.constexpr, DV: gl.constexpr, NS: gl.constexpr,
                           CAUSAL: gl.constexpr, Q_REGS: gl.constexpr, FIRST: gl.constexpr):
    """``_mma_partition`` on FA3's schedule. Each step issues tile s + 1's
    q k^T and tile s's PV back to back, then runs tile s + 1's softmax while both are on the tensor
    cores; P is a tile behind. The two consumers take turns to issue (``turn_me`` /
    ``turn_other``, one mbarrier each, FIRST starting): one's softmax overlaps the other's MMAs
    instead of both issuing at once. A consumer with fewer tiles passes its remaining turns on."""
    qk_layout: gl.constexpr = _mma_layout(BS)
    pv_layout: gl.constexpr = _mma_layout(DV)
    p_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=pv_layout, k_width=2)
    qa_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=qk_layout, k_width=2)
    row_l: gl.constexpr = gl.SliceLayout(1, qk_layout)
    col_l: gl.constexpr = gl.SliceLayout(0, qk_layout)
    orow_l: gl.constexpr = gl.SliceLayout(1, pv_layout)
    gl.static_assert(BS == 64)  # two bitmap words a landmark chunk
    # the first consumer's first wait passes at once (the phase before a barrier's first counts
    # as completed); the other's waits for the first consumer's first arrival
    PAR0: gl.constexpr = 1 if FIRST else 0

    m_i = gl.full([BS], float("-inf"), gl.float32, row_l)
    l_i = gl.zeros([BS], gl.float32, row_l)
    acc = gl.zeros([BS, DV], gl.float32, pv_layout)
    t = t0 + gl.arange(0, BS, layout=row_l)
    cols = gl.arange(0, BS, layout=col_l)
    zero_qk = gl.zeros([BS, BS], gl.float32, qk_layout)
    alpha = gl.full([BS], 1.0, gl.float32, row_l)
    pa = gl.convert_layout(zero_qk.to(v_smem.dtype), p_layout)
    q = _q_operand(q_smem, q_bar, qa_layout, Q_REGS)
    j_nx, w0_nx, w1_nx = _tile_meta(IDX_r, SEL_r, NW, 0, cnt, tot, BS)
    if tot > 0:  # tile 0's logits and softmax
        mbarrier.wait(ready.index(0), 0)
        qk0 = warpgroup_mma_wait(num_outstanding=0, deps=(_logits(q, k_smem.index(0), zero_qk), ))
        p0, m_i, alpha, l_i = _softmax_tile(qk0, 0, cnt, j_nx, w0_nx, w1_nx, t, t0, cols, OFF, he, qk_scale,
                                            log2_n, m_i, l_i, BS, CAUSAL)
        pa = gl.convert_layout(p0.to(v_smem.dtype), p_layout)
        j_nx, w0_nx, w1_nx = _tile_meta(IDX_r, SEL_r, NW, 1, cnt, tot, BS)
    for s in range(tot):
        st = s % NS
        has_next = s + 1 < tot
        j = j_nx
        w0 = w0_nx
        w1 = w1_nx
        j_nx, w0_nx, w1_nx = _tile_meta(IDX_r, SEL_r, NW, s + 2, cnt, tot, BS)
        mbarrier.wait(turn_me, (s & 1) ^ PAR0)
        nxt = warpgroup_mma_init(zero_qk)
        if has_next:
            st1 = (s + 1) % NS
            mbarrier.wait(ready.index(st1), ((s + 1) // NS) & 1)
            nxt = _logits(q, k_smem.index(st1), zero_qk)
        acc = acc * gl.convert_layout(alpha, orow_l)[:, None]
        acc = warpgroup_mma(pa, v_smem.index(st), acc, is_async=True)
        mbarrier.arrive(turn_other, count=1)
        # tile s + 1's logits (everything but the newest group, this PV); nothing to wait for at the end
        qk = warpgroup_mma_wait(num_outstanding=1, deps=(nxt, ))
        p = zero_qk
        if has_next:
            p, m_i, alpha, l_i = _softmax_tile(qk, s + 1, cnt, j, w0, w1, t, t0, cols, OFF, he, qk_scale, log2_n,
                                               m_i, l_i, BS, CAUSAL)
        # P in bf16 only once this PV is done: pa's registers are its A operand until the wait, which
        # it rides through (PTX leaves writing them earlier undefined; session 15's card showed
        # NaNs from exactly that: the next P converted into them while the PV still read them)
        acc, pa = warpgroup_mma_wait(num_outstanding=0, deps=(acc, pa))
        mbarrier.arrive(empty.index(st), count=1)
        pa = gl.convert_layout(p.to(v_smem.dtype), p_layout)
    for s in range(tot, tot_other):  # the other consumer's remaining turns
        mbarrier.wait(turn_me, (s & 1) ^ PAR0)
        mbarrier.arrive(turn_other, count=1)

    _store_rows(acc, m_i, l_i, t, t0, O_r, LSE_r, Nq, BS, DV)


@gluon.jit
def _gluon_fwd_kernel(q_desc, k_desc, v_desc, kb_desc, vb_desc, IDX, CNT, SEL, O, LSE,
                      Hq, Hkv, Hs, Nq, Nk, NQB, NKB, KMAX, OFF, qk_scale,
                      BS: gl.constexpr, D: gl.constexpr, DV: gl.constexpr, NS: gl.constexpr,
                      CAUSAL: gl.constexpr, FILL: gl.constexpr, Q_REGS: gl.constexpr, PV_ASYNC: gl.constexpr,
                      PAIR: gl.constexpr, ORDER: gl.constexpr, CONSUMER_REGS: gl.constexpr,
                      PRODUCER_REGS: gl.constexpr):
    """Two (query block, head) tiles a program, each in its own consumer warpgroup (the default
    partition and a 4-warp worker); one producer warp feeds them. FILL: each walk goes on over its
    landmark chunks (kbar, vbar in q's dtype through kb_desc / vb_desc; SEL the selection bitmap).
    PAIR=False: query blocks i and i - 1 of one head (the last ones first), each with its own K/V
    ring. PAIR=True: query block i of heads 2p and 2p + 1, which share a selection row and a K/V
    head (GQA, group selection), so they walk the same list: one ring whose buffers both consumers
    read and release (``empty`` counts two arrivals), each K/V tile loaded once for 128 rows."""
    pid1 = gl.program_id(1)
    if PAIR:
        i_a = NQB - 1 - gl.program_id(0)
        i_b = i_a
        b = pid1 // (Hq // 2)
        h = 2 * (pid1 % (Hq // 2))
        h_b = h + 1
    else:
        i_a = NQB - 1 - 2 * gl.program_id(0)
        i_b = i_a - 1  # -1 for the first block of an odd NQB: no rows, no list
        b = pid1 // Hq
        h = pid1 % Hq
        h_b = h
    kh = h // (Hq // Hkv)
    hs = h * Hs // Hq
    bh = (b * Hq + h).to(gl.int64)
    bh_b = (b * Hq + h_b).to(gl.int64)

    q_a = gl.allocate_shared_memory(q_desc.dtype, [BS, D], q_desc.layout)
    q_b = gl.allocate_shared_memory(q_desc.dtype, [BS, D], q_desc.layout)
    k_a = gl.allocate_shared_memory(k_desc.dtype, [NS, BS, D], k_desc.layout)
    v_a = gl.allocate_shared_memory(v_desc.dtype, [NS, BS, DV], v_desc.layout)
    ready_a = gl.allocate_shared_memory(gl.int64, [NS, 1], mbarrier.MBarrierLayout())
    empty_a = gl.allocate_shared_memory(gl.int64, [NS, 1], mbarrier.MBarrierLayout())
    if PAIR:
        k_b = k_a
        v_b = v_a
        ready_b = ready_a
        empty_b = empty_a
    else:
        k_b = gl.allocate_shared_memory(k_desc.dtype, [NS, BS, D], k_desc.layout)
        v_b = gl.allocate_shared_memory(v_desc.dtype, [NS, BS, DV], v_desc.layout)
        ready_b = gl.allocate_shared_memory(gl.int64, [NS, 1], mbarrier.MBarrierLayout())
        empty_b = gl.allocate_shared_memory(gl.int64, [NS, 1], mbarrier.MBarrierLayout())
    qbar_a = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
    qbar_b = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
    for st in gl.static_range(NS):
        mbarrier.init(ready_a.index(st), count=1)
        if PAIR:
            mbarrier.init(empty_a.index(st), count=2)  # both consumers release each buffer
        else:
            mbarrier.init(empty_a.index(st), count=1)
            mbarrier.init(ready_b.index(st), count=1)
            mbarrier.init(empty_b.index(st), count=1)
    mbarrier.init(qbar_a, count=1)
    mbarrier.init(qbar_b, count=1)
    turns = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())  # ORDER: whose turn to issue
    mbarrier.init(turns.index(0), count=1)
    mbarrier.init(turns.index(1), count=1)
    fence_async_shared()
    mbarrier.expect(qbar_a, q_desc.block_type.nbytes)
    tma.async_copy_global_to_shared(q_desc, [(b * Hq + h) * Nq + i_a * BS, 0], qbar_a, q_a)  # int32: TMA
    # block -1 has no rows: its consumer still waits on qbar_b, so load block 0 there (unused)
    mbarrier.expect(qbar_b, q_desc.block_type.nbytes)
    tma.async_copy_global_to_shared(q_desc, [(b * Hq + h_b) * Nq + gl.maximum(i_b, 0) * BS, 0], qbar_b, q_b)

    row_a = (b * Hs + hs) * NQB + i_a
    IDX_a = IDX + row_a.to(gl.int64) * KMAX
    NW = (NKB + 31) // 32
    SEL_a = SEL + row_a.to(gl.int64) * NW
    cnt_a = gl.load(CNT + row_a)
    if PAIR:  # the same selection row
        cnt_b = cnt_a
        IDX_b = IDX_a
        SEL_b = SEL_a
    else:  # the row before: query block i - 1
        cnt_b = gl.load(CNT + row_a - 1, mask=i_b >= 0, other=0)
        IDX_b = IDX_a - KMAX
        SEL_b = SEL_a - NW
    he_a = 0
    he_b = 0
    if FILL:
        he_a = _fill_end(i_a * BS, OFF, NKB, BS, CAUSAL)
        he_b = gl.where(i_b >= 0, _fill_end(i_b * BS, OFF, NKB, BS, CAUSAL), 0)
    tot_a = cnt_a + (he_a + BS - 1) // BS
    tot_b = cnt_b + (he_b + BS - 1) // BS
    # the producer's walks: with PAIR one (ring a, read by both)
    p_cnt_b = cnt_b
    p_tot_b = tot_b
    if PAIR:
        p_cnt_b = 0
        p_tot_b = 0
    log2_n = gl.log2(BS * 1.0)
    if ORDER:  # (the producer's entry is written out twice: a partition list takes no tuple variables)
        gl.warp_specialize([
            (_mma_partition_ordered, (q_a, k_a, v_a, ready_a, empty_a, qbar_a, IDX_a, cnt_a, tot_a, he_a, SEL_a, NW,
                                      i_a * BS, OFF, qk_scale, log2_n, O + bh * Nq * DV, LSE + bh * Nq, Nq,
                                      turns.index(0), turns.index(1), tot_b, BS, D, DV, NS, CAUSAL, Q_REGS, True)),
            (_mma_partition_ordered, (q_b, k_b, v_b, ready_b, empty_b, qbar_b, IDX_b, cnt_b, tot_b, he_b, SEL_b, NW,
                                      i_b * BS, OFF, qk_scale, log2_n, O + bh_b * Nq * DV, LSE + bh_b * Nq, Nq,
                                      turns.index(1), turns.index(0), tot_a, BS, D, DV, NS, CAUSAL, Q_REGS, False)),
            (_load_partition, (k_desc, v_desc, kb_desc, vb_desc, k_a, v_a, ready_a, empty_a, k_b, v_b, ready_b,
                               empty_b, IDX_a, cnt_a, tot_a, IDX_b, p_cnt_b, p_tot_b, (b * Hkv + kh) * Nk,
                               (b * Hkv + kh) * NKB, BS, NS)),
        ], [4, 1], [CONSUMER_REGS, PRODUCER_REGS])
    else:
        gl.warp_specialize([
            (_mma_partition, (q_a, k_a, v_a, ready_a, empty_a, qbar_a, IDX_a, cnt_a, tot_a, he_a, SEL_a, NW, i_a * BS,
                              OFF, qk_scale, log2_n, O + bh * Nq * DV, LSE + bh * Nq, Nq, BS, D, DV, NS, CAUSAL,
                              Q_REGS, PV_ASYNC)),
            (_mma_partition, (q_b, k_b, v_b, ready_b, empty_b, qbar_b, IDX_b, cnt_b, tot_b, he_b, SEL_b, NW, i_b * BS,
                              OFF, qk_scale, log2_n, O + bh_b * Nq * DV, LSE + bh_b * Nq, Nq, BS, D, DV, NS, CAUSAL,
                              Q_REGS, PV_ASYNC)),
            (_load_partition, (k_desc, v_desc, kb_desc, vb_desc, k_a, v_a, ready_a, empty_a, k_b, v_b, ready_b,
                               empty_b, IDX_a, cnt_a, tot_a, IDX_b, p_cnt_b, p_tot_b, (b * Hkv + kh) * Nk,
                               (b * Hkv + kh) * NKB, BS, NS)),
        ], [4, 1], [CONSUMER_REGS, PRODUCER_REGS])


def pair_ok(hq: int, hkv: int, hs: int) -> bool:
    """Heads 2p and 2p + 1 read the same K/V head and the same selection row (h * Hs // Hq): an
    even group size Hq / Hkv and Hq / Hs (group selection: Hs = Hkv)."""
    return hq % hkv == 0 and hq % hs == 0 and (hq // hkv) % 2 == 0 and (hq // hs) % 2 == 0


def supported(q: Tensor, k: Tensor, v: Tensor, info: BlockInfo, fill: bool) -> str | None:
    """None where ``gluon_forward`` takes the shape, else why not (the Triton kernel does)."""
    if fill and not uniform_counts(info):
        return "the fill needs every key block full of valid keys (its landmark count is the constant BS)"
    if q.dtype not in (torch.bfloat16, torch.float16) or k.dtype != q.dtype or v.dtype != q.dtype:
        return "bf16 / fp16 only"
    if q.shape[-1] not in (64, 128) or v.shape[-1] not in (64, 128):
        return "head dims 64 or 128 only"
    if info.block != 64:
        return "block 64 only"
    if info.key_valid is not None or info.has_window:
        return "no key padding or window"
    if q.shape[2] % info.block or k.shape[2] % info.block:
        return "Nq and Nk must be multiples of the block (the 2-D descriptors span heads)"
    if not all(x.is_contiguous() for x in (q, k, v)):
        return "contiguous q, k, v only"
    if not (q.is_cuda and torch.cuda.get_device_capability(q.device)[0] == 9):
        return "a Hopper card (sm_90) only"
    return None


def descriptors(*xs: Tensor, block: int = 64):
    """2-D TMA descriptors of each [.., rows, D] tensor as [all rows, D] with [block, D] boxes
    (host-built; a box past a head's rows reads the next head's, masked by the kernel)."""
    out = []
    for x in xs:
        flat = x.reshape(-1, x.shape[-1])
        lay = gl.NVMMASharedLayout.get_default_for([block, x.shape[-1]], _GL_DTYPE[x.dtype])
        out.append(TensorDescriptor(flat, list(flat.shape), list(flat.stride()), [block, x.shape[-1]], lay))
    return out


_GL_DTYPE = {torch.bfloat16: gl.bfloat16, torch.float16: gl.float16}


def gluon_forward(q: Tensor, k: Tensor, v: Tensor, info: BlockInfo, index: Tensor, count: Tensor, scale: float,
                  kbar: Tensor | None = None, vbar: Tensor | None = None, stages: int = STAGES,
                  out: Tensor | None = None, lse: Tensor | None = None, q_regs: bool = Q_REGS,
                  pv_async: bool = PV_ASYNC, pair: bool | None = None, order: bool = False) -> tuple[Tensor, Tensor]:
    """(out, lse) as ``sparse_forward.launch_forward``: the exact part over ``index``/``count``,
    plus the landmark fill where ``kbar``/``vbar`` (the block means in q's dtype, ``[B, Hkv, NKB,
    D]``) are given; into ``out``/``lse`` where given (contiguous). ``q_regs`` / ``pv_async``:
    the consumer's variants (``_mma_partition``). ``pair``: two heads of a GQA group a program,
    sharing their K/V loads (``_gluon_fwd_kernel``; None: where ``pair_ok``). Raises where
    ``supported`` says no. ``order``: the consumers on FA3's schedule, taking turns to issue
    (``_mma_partition_ordered``)."""
    if order and pv_async:
        raise ValueError("gluon_forward: order has its own PV schedule; pv_async applies without it")
    if pair is None:
        pair = pair_ok(q.shape[1], k.shape[1], index.shape[1])
    if pair and not pair_ok(q.shape[1], k.shape[1], index.shape[1]):
        raise ValueError(f"gluon_forward: pair needs heads 2p and 2p + 1 to share a K/V head and a selection row "
                         f"(Hq {q.shape[1]}, Hkv {k.shape[1]}, selection heads {index.shape[1]}); use pair=False")
    if pv_async and stages < 3:
        raise ValueError("gluon_forward: pv_async holds a tile's buffer through the next tile; it needs stages >= 3")
    fill = kbar is not None
    q, scale = positive_scale(q, scale)
    why = supported(q, k, v, info, fill)
    if why:
        raise ValueError(f"gluon_forward: {why}; use sparse_forward.launch_forward")
    b, hq, nq, d = q.shape
    hkv, nk, dv = k.shape[1], k.shape[2], v.shape[-1]
    out = torch.empty(b, hq, nq, dv, device=q.device, dtype=q.dtype) if out is None else out
    lse = torch.empty(b, hq, nq, device=q.device, dtype=torch.float32) if lse is None else lse
    qd, kd, vd = descriptors(q, k, v, block=info.block)
    kbd, vbd = descriptors(kbar.contiguous(), vbar.contiguous(), block=info.block) if fill else (kd, vd)
    sel = build_bitmap(index, count, info.nkb) if fill else count
    grid = (info.nqb, b * hq // 2) if pair else ((info.nqb + 1) // 2, b * hq)
    _gluon_fwd_kernel[grid](
        qd, kd, vd, kbd, vbd, index, count, sel, out, lse, hq, hkv, index.shape[1], nq, nk, info.nqb, info.nkb,
        index.shape[-1], info.offset, float(scale) * LOG2E,
        BS=info.block, D=d, DV=dv, NS=stages, CAUSAL=info.causal, FILL=fill, Q_REGS=q_regs, PV_ASYNC=pv_async,
        PAIR=pair, ORDER=order, CONSUMER_REGS=CONSUMER_REGS,
        PRODUCER_REGS=PRODUCER_REGS, num_warps=4)
    return out, lse
