"""Experimental, GPU-only, opt-in: the sparse forward in Gluon on 128-key tiles, one query block a
program, its two consumer warpgroups splitting the block's tiles (split-K inside the program).

Why: ``gluon_forward`` (two query blocks a program, one warpgroup each, 64-key tiles) and the
Triton kernel both stop near 450 TFLOP/s on an H200 (docs/kernels.md, session 14): a 64 x 64
tile's row reductions and accumulator rescale cost as much per key as the MMAs can hide, and a
second K/V ring for 128-key tiles does not fit in shared memory. Here one ring serves both
consumers: tile u holds two 64-row halves (list entries or landmark chunks 2u and 2u + 1, loaded
as two TMA boxes each of K and V), the consumer ``u % 2`` takes it, so each K/V tile is loaded
once and every softmax step covers 128 keys (FA3's 64 x 128 warpgroup tile). At the end the
second consumer hands its (m, l, acc) to the first through a ring buffer (free by then), which
merges the two online softmaxes and writes the rows.

Scope and arithmetic: ``gluon_forward.supported`` (no padding, no window, bf16 / fp16, D 64 or
128, block 64, multiples of the block) and ``sparse_forward._fwd_kernel``'s numbers: fp32
logits, the scale in the log2 domain through one multiply-add, the diagonal block masked by
``t + OFF``, the landmarks ``s q . kbar + log2(BS)`` over the fully visible, unselected blocks.
Gluon has no interpreter: ``benchmarks/compile_check.py --gluon`` compiles it for sm_90 and
``tests/test_gluon_forward.py`` compares it with the Triton kernel on a card.
"""

from __future__ import annotations

import torch
from torch import Tensor

from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import (fence_async_shared, mbarrier, tma, warpgroup_mma,
                                                               warpgroup_mma_init, warpgroup_mma_wait)

from .bitmap import build_bitmap
from .blockinfo import BlockInfo
from .gluon_forward import LOG2E, _fill_end, _mma_layout, _pick, _store_rows, _tile_meta, descriptors, supported
from .sparse_forward import positive_scale

# K/V tiles a ring (each 2 x 64 rows of K and of V: 64 KB at D=128): a consumer holds its tile,
# the other consumer its own, the third loads. 3 x 64 + 16 (q) = 208 KB of the H200's 227.
STAGES = 3
# registers a thread: 64 x 128 fp32 logits and accumulator (64 each), P in bf16 (32), the rest;
# two consumer warpgroups at 240 and the producer warp's group at 24: 64,512 of the SM's 65,536
CONSUMER_REGS = 240
PRODUCER_REGS = 24


@gluon.jit
def _load_half(h, cnt, j, desc_k, desc_v, lm_k, lm_v, k_dst, v_dst, bar, kv_row0, lm_row0, BS: gl.constexpr):
    """Half h of the walk into one 64-row half of a tile: the selected K/V block j (h < cnt) or
    landmark chunk h - cnt."""
    if h < cnt:
        tma.async_copy_global_to_shared(desc_k, [kv_row0 + j * BS, 0], bar, k_dst)
        tma.async_copy_global_to_shared(desc_v, [kv_row0 + j * BS, 0], bar, v_dst)
    else:
        tma.async_copy_global_to_shared(lm_k, [lm_row0 + (h - cnt) * BS, 0], bar, k_dst)
        tma.async_copy_global_to_shared(lm_v, [lm_row0 + (h - cnt) * BS, 0], bar, v_dst)


@gluon.jit
def _split_load_partition(k_desc, v_desc, kb_desc, vb_desc, k_smem, v_smem, ready, empty, IDX_r, cnt, tot,
                          kv_row0, lm_row0, BS: gl.constexpr, NS: gl.constexpr):
    """The producer warp: halves 0 .. tot - 1 in pairs into the ring (tile u = halves 2u, 2u + 1
    in stage u % NS once its consumer released it); an odd last tile repeats its first half in
    the second (finite data under the -inf mask). The list is read 32 entries at a time into
    registers, the next 32 prefetched (``gluon_forward._load_partition``)."""
    lay: gl.constexpr = gl.BlockedLayout([1], [32], [1], [0])
    lane = gl.arange(0, 32, layout=lay)
    va = gl.load(IDX_r + lane, mask=lane < cnt, other=0)
    na = gl.load(IDX_r + 32 + lane, mask=32 + lane < cnt, other=0)
    nbytes: gl.constexpr = 2 * (k_desc.block_type.nbytes + v_desc.block_type.nbytes)
    for h in range(tot):
        if (h % 32 == 0) & (h > 0):
            va = na
            na = gl.load(IDX_r + h + 32 + lane, mask=h + 32 + lane < cnt, other=0)
        u = h // 2
        st = u % NS
        if h % 2 == 0:
            mbarrier.wait(empty.index(st), ((u // NS) & 1) ^ 1)
            mbarrier.expect(ready.index(st), nbytes)
        j = _pick(va, lane, h)
        kt = k_smem.index(st)
        vt = v_smem.index(st)
        if h % 2 == 0:  # (a slice's start is a constant)
            _load_half(h, cnt, j, k_desc, v_desc, kb_desc, vb_desc, kt.slice(0, BS), vt.slice(0, BS),
                       ready.index(st), kv_row0, lm_row0, BS)
        if (h % 2 == 1) | (h + 1 == tot):
            _load_half(h, cnt, j, k_desc, v_desc, kb_desc, vb_desc, kt.slice(BS, BS), vt.slice(BS, BS),
                       ready.index(st), kv_row0, lm_row0, BS)


@gluon.jit
def _mask_tile(qk, u, cnt, tot, j0, j1, wa0, wa1, wb0, wb1, t, t0, cols, OFF, he, qk_scale, log2_n,
               BS: gl.constexpr, CAUSAL: gl.constexpr):
    """Tile u's masks on its unscaled [64, 128] logits: column c is half h = 2u + (c >= 64), a
    selected block (h < cnt: the diagonal's element mask) or a landmark chunk (cnt <= h < tot:
    log2(BS) where unselected and below he, through the bitmap words), else -inf (an odd walk's
    repeated half). Tiles of two selected blocks that every row sees whole pass unchanged."""
    plain = 2 * u + 1 < cnt
    if CAUSAL:
        plain = plain & (gl.maximum(j0, j1) * BS + BS - 1 <= t0 + OFF)
    if not plain:
        half = cols >= BS
        c64 = cols % BS
        hh = 2 * u + half.to(gl.int32)
        sel = hh < cnt
        word = gl.where(half, gl.where(c64 < 32, wb0, wb1), gl.where(c64 < 32, wa0, wa1))
        use = (hh >= cnt) & (hh < tot) & ((hh - cnt) * BS + c64 < he) & (((word >> (c64 % 32)) & 1) == 0)
        bias = gl.where(use, log2_n / qk_scale, 0.0)
        if CAUSAL:
            kpos = gl.where(half, j1, j0) * BS + c64
            ok = (sel[None, :] & (kpos[None, :] <= (t + OFF)[:, None])) | use[None, :]
        else:
            ok = (sel | use)[None, :] & (t >= -1)[:, None]  # (a 2-D mask like the causal one)
        qk = gl.where(ok, qk + bias[None, :], float("-inf"))
    return qk


@gluon.jit
def _split_mma_partition(q_smem, k_smem, v_smem, ready, empty, q_bar, a_done, merged, IDX_r, cnt, tot, he, SEL_r,
                         NW, t0, OFF, qk_scale, log2_n, O_r, LSE_r, Nq, ME: gl.constexpr, BS: gl.constexpr,
                         D: gl.constexpr, DV: gl.constexpr, NS: gl.constexpr, CAUSAL: gl.constexpr,
                         PV_WAIT: gl.constexpr):
    """Consumer ME (0 or 1) of the program's query block: tiles ME, ME + 2, ... of the walk.
    Each: q k^T (64 x 128), masks, online softmax, then PV issued and left in flight until the
    next tile's q k^T is done. Consumer 1 then hands (m, l, acc) to consumer 0 through stage 0's
    buffers (every tile consumed by then: ``a_done``), which merges and writes the rows."""
    qk_layout: gl.constexpr = _mma_layout(2 * BS)
    pv_layout: gl.constexpr = _mma_layout(DV)
    p_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=pv_layout, k_width=2)
    row_l: gl.constexpr = gl.SliceLayout(1, qk_layout)
    col_l: gl.constexpr = gl.SliceLayout(0, qk_layout)
    orow_l: gl.constexpr = gl.SliceLayout(1, pv_layout)
    gl.static_assert(BS == 64)  # two bitmap words a landmark chunk

    m_i = gl.full([BS], float("-inf"), gl.float32, row_l)
    l_i = gl.zeros([BS], gl.float32, row_l)
    acc = gl.zeros([BS, DV], gl.float32, pv_layout)
    if not PV_WAIT:
        acc = warpgroup_mma_init(acc)  # pending between tiles
    t = t0 + gl.arange(0, BS, layout=row_l)
    cols = gl.arange(0, 2 * BS, layout=col_l)
    zero_qk = gl.zeros([BS, 2 * BS], gl.float32, qk_layout)
    pa = gl.convert_layout(zero_qk.to(v_smem.dtype), p_layout)  # the in-flight PV's A operand
    mbarrier.wait(q_bar, 0)
    ntile = (tot + 1) // 2
    u = ME
    j0, wa0, wa1 = _tile_meta(IDX_r, SEL_r, NW, 2 * u, cnt, tot, BS)
    j1, wb0, wb1 = _tile_meta(IDX_r, SEL_r, NW, 2 * u + 1, cnt, tot, BS)
    st_prev = 0
    for u in range(ME, ntile, 2):
        st = u % NS
        mbarrier.wait(ready.index(st), (u // NS) & 1)
        s_tok = warpgroup_mma(q_smem, k_smem.index(st).permute((1, 0)), zero_qk, use_acc=False, is_async=True)
        if PV_WAIT:
            qk = warpgroup_mma_wait(num_outstanding=0, deps=(s_tok, ))
        else:  # this q k^T and the previous tile's PV (pa rides through: its registers are that PV's operand)
            qk, acc, pa = warpgroup_mma_wait(num_outstanding=0, deps=(s_tok, acc, pa))
            if u > ME:
                mbarrier.arrive(empty.index(st_prev), count=1)
        c0, c1, c2 = j0, wa0, wa1
        c3, c4, c5 = j1, wb0, wb1
        j0, wa0, wa1 = _tile_meta(IDX_r, SEL_r, NW, 2 * u + 4, cnt, tot, BS)  # the next tile's, a tile ahead
        j1, wb0, wb1 = _tile_meta(IDX_r, SEL_r, NW, 2 * u + 5, cnt, tot, BS)
        qk = _mask_tile(qk, u, cnt, tot, c0, c3, c1, c2, c4, c5, t, t0, cols, OFF, he, qk_scale, log2_n, BS, CAUSAL)
        m_new = gl.maximum(m_i, gl.max(qk, axis=1) * qk_scale)
        m_s = gl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = gl.exp2(m_i - m_s)
        p = gl.exp2(qk * qk_scale - m_s[:, None])
        l_i = l_i * alpha + gl.sum(p, axis=1)
        m_i = m_new
        acc = acc * gl.convert_layout(alpha, orow_l)[:, None]
        pa = gl.convert_layout(p.to(v_smem.dtype), p_layout)
        if PV_WAIT:  # done before the next tile: the buffer goes back to the producer at once
            acc = warpgroup_mma(pa, v_smem.index(st), acc, is_async=True)
            acc, pa = warpgroup_mma_wait(num_outstanding=0, deps=(acc, pa))
            mbarrier.arrive(empty.index(st), count=1)
        else:
            acc = warpgroup_mma(pa, v_smem.index(st), acc, is_async=True)
        st_prev = st
    if not PV_WAIT:
        acc, pa = warpgroup_mma_wait(num_outstanding=0, deps=(acc, pa))
        if ME < ntile:
            mbarrier.arrive(empty.index(st_prev), count=1)

    # the hand-over: consumer 1's partial softmax into stages 0 and 1's buffers, reinterpreted as fp32
    xl: gl.constexpr = gl.SwizzledSharedLayout(1, 1, 1, order=[1, 0])
    xl1: gl.constexpr = gl.SwizzledSharedLayout(1, 1, 1, order=[0])
    x_acc = k_smem.index(0)._reinterpret(gl.float32, [BS, DV], xl)
    x_m = v_smem.index(0)._reinterpret(gl.float32, [BS], xl1)
    x_l = v_smem.index(1)._reinterpret(gl.float32, [BS], xl1)
    if ME == 1:
        mbarrier.wait(a_done, 0)
        x_acc.store(acc)
        x_m.store(m_i)
        x_l.store(l_i)
        mbarrier.arrive(merged, count=1)
    else:
        mbarrier.arrive(a_done, count=1)
        mbarrier.wait(merged, 0)
        m_b = x_m.load(row_l)
        l_b = x_l.load(row_l)
        acc_b = x_acc.load(pv_layout)
        m = gl.maximum(m_i, m_b)
        m_s = gl.where(m == float("-inf"), 0.0, m)
        ca = gl.exp2(m_i - m_s)
        cb = gl.exp2(m_b - m_s)
        l_i = l_i * ca + l_b * cb
        acc = acc * gl.convert_layout(ca, orow_l)[:, None] + acc_b * gl.convert_layout(cb, orow_l)[:, None]
        _store_rows(acc, m, l_i, t, t0, O_r, LSE_r, Nq, BS, DV)


@gluon.jit
def _gluon_split_kernel(q_desc, k_desc, v_desc, kb_desc, vb_desc, IDX, CNT, SEL, O, LSE,
                        Hq, Hkv, Hs, Nq, Nk, NQB, NKB, KMAX, OFF, qk_scale,
                        BS: gl.constexpr, D: gl.constexpr, DV: gl.constexpr, NS: gl.constexpr,
                        CAUSAL: gl.constexpr, FILL: gl.constexpr, PV_WAIT: gl.constexpr,
                        CONSUMER_REGS: gl.constexpr, PRODUCER_REGS: gl.constexpr):
    """One (query block, head) a program, the last query blocks first: one producer warp, two
    consumer warpgroups (the default partition: consumer 0, which writes the rows)."""
    i = NQB - 1 - gl.program_id(0)
    pid1 = gl.program_id(1)
    b = pid1 // Hq
    h = pid1 % Hq
    kh = h // (Hq // Hkv)
    hs = h * Hs // Hq
    bh = (b * Hq + h).to(gl.int64)

    q_smem = gl.allocate_shared_memory(q_desc.dtype, [BS, D], q_desc.layout)
    k_smem = gl.allocate_shared_memory(k_desc.dtype, [NS, 2 * BS, D], k_desc.layout)
    v_smem = gl.allocate_shared_memory(v_desc.dtype, [NS, 2 * BS, DV], v_desc.layout)
    ready = gl.allocate_shared_memory(gl.int64, [NS, 1], mbarrier.MBarrierLayout())
    empty = gl.allocate_shared_memory(gl.int64, [NS, 1], mbarrier.MBarrierLayout())
    bars = gl.allocate_shared_memory(gl.int64, [3, 1], mbarrier.MBarrierLayout())  # q, a_done, merged
    for st in gl.static_range(NS):
        mbarrier.init(ready.index(st), count=1)
        mbarrier.init(empty.index(st), count=1)
    for x in gl.static_range(3):
        mbarrier.init(bars.index(x), count=1)
    fence_async_shared()
    mbarrier.expect(bars.index(0), q_desc.block_type.nbytes)
    tma.async_copy_global_to_shared(q_desc, [(b * Hq + h) * Nq + i * BS, 0], bars.index(0), q_smem)

    row = (b * Hs + hs) * NQB + i
    IDX_r = IDX + row.to(gl.int64) * KMAX
    NW = (NKB + 31) // 32
    SEL_r = SEL + row.to(gl.int64) * NW
    cnt = gl.load(CNT + row)
    he = 0
    if FILL:
        he = _fill_end(i * BS, OFF, NKB, BS, CAUSAL)
    tot = cnt + (he + BS - 1) // BS
    log2_n = gl.log2(BS * 1.0)
    gl.warp_specialize([
        (_split_mma_partition, (q_smem, k_smem, v_smem, ready, empty, bars.index(0), bars.index(1), bars.index(2),
                                IDX_r, cnt, tot, he, SEL_r, NW, i * BS, OFF, qk_scale, log2_n, O + bh * Nq * DV,
                                LSE + bh * Nq, Nq, 0, BS, D, DV, NS, CAUSAL, PV_WAIT)),
        (_split_mma_partition, (q_smem, k_smem, v_smem, ready, empty, bars.index(0), bars.index(1), bars.index(2),
                                IDX_r, cnt, tot, he, SEL_r, NW, i * BS, OFF, qk_scale, log2_n, O + bh * Nq * DV,
                                LSE + bh * Nq, Nq, 1, BS, D, DV, NS, CAUSAL, PV_WAIT)),
        (_split_load_partition, (k_desc, v_desc, kb_desc, vb_desc, k_smem, v_smem, ready, empty, IDX_r, cnt, tot,
                                 (b * Hkv + kh) * Nk, (b * Hkv + kh) * NKB, BS, NS)),
    ], [4, 1], [CONSUMER_REGS, PRODUCER_REGS])


def gluon_forward_split(q: Tensor, k: Tensor, v: Tensor, info: BlockInfo, index: Tensor, count: Tensor,
                        scale: float, kbar: Tensor | None = None, vbar: Tensor | None = None, stages: int = STAGES,
                        out: Tensor | None = None, lse: Tensor | None = None,
                        pv_wait: bool = True) -> tuple[Tensor, Tensor]:
    """(out, lse) as ``gluon_forward.gluon_forward`` (the same arguments and scope), on 128-key
    tiles split between the program's two consumers. ``pv_wait``: each tile's PV is waited for
    and its buffer released at once (False: the PV stays in flight until the next tile's q k^T,
    the buffer held as long)."""
    fill = kbar is not None
    q, scale = positive_scale(q, scale)
    why = supported(q, k, v, info, fill)
    if why:
        raise ValueError(f"gluon_forward_split: {why}; use sparse_forward.launch_forward")
    if stages < (2 if pv_wait else 3):
        raise ValueError("gluon_forward_split: each consumer holds a buffer (and without pv_wait the next one's q k^T "
                         "too): stages >= 2 with pv_wait, 3 without")
    b, hq, nq, d = q.shape
    hkv, nk, dv = k.shape[1], k.shape[2], v.shape[-1]
    out = torch.empty(b, hq, nq, dv, device=q.device, dtype=q.dtype) if out is None else out
    lse = torch.empty(b, hq, nq, device=q.device, dtype=torch.float32) if lse is None else lse
    qd, kd, vd = descriptors(q, k, v, block=info.block)
    kbd, vbd = descriptors(kbar.contiguous(), vbar.contiguous(), block=info.block) if fill else (kd, vd)
    sel = build_bitmap(index, count, info.nkb) if fill else count
    _gluon_split_kernel[(info.nqb, b * hq)](
        qd, kd, vd, kbd, vbd, index, count, sel, out, lse, hq, hkv, index.shape[1], nq, nk, info.nqb, info.nkb,
        index.shape[-1], info.offset, float(scale) * LOG2E,
        BS=info.block, D=d, DV=dv, NS=stages, CAUSAL=info.causal, FILL=fill, PV_WAIT=pv_wait,
        CONSUMER_REGS=CONSUMER_REGS, PRODUCER_REGS=PRODUCER_REGS, num_warps=4)
    return out, lse
