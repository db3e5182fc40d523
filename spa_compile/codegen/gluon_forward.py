"""Experimental, GPU-only, not used by the op: the sparse forward's exact part in Gluon with warp
specialization (FA3-style producer/consumers), for Hopper.

Why: the Triton forward runs at about 480-510 TFLOP/s on an H200 and is most of the op at 128K
(docs/kernels.md, session 11); Triton 3.6 cannot warp-specialize on sm_90, Gluon can. A program
takes two query blocks of one head. Each has its own consumer warpgroup (64 rows: the default
partition and a 4-warp worker, 232 registers a thread) and its own NS-deep ring of K/V buffers in
shared memory (``ready`` / ``empty`` mbarriers); one producer warp (24 registers) streams both
lists' blocks through TMA. A consumer issues the next block's q k^T before this block's softmax
(the tensor cores run while the exponentials do), then the PV product, and releases the buffer.
The two warpgroups overlap each other's softmax and MMAs as FA3's ping-pong does, without its
explicit ordering barriers.

Scope (``supported`` says why not): no landmark fill, no key padding, no window, causal or not
(no offset between query and key positions beyond ``OFF``), bf16 / fp16, head dims 64 or 128,
block 64, Nq and Nk multiples of the block (the 2-D descriptors span heads), group or head
selection (any Hs dividing Hq). Same arithmetic as ``sparse_forward._fwd_kernel`` with FILL False:
fp32 logits scaled in the log2 domain, the diagonal block masked by ``t + OFF``, the online
softmax of ``softmax_step``.

Gluon has no interpreter: CI compiles nothing here; ``benchmarks/compile_check.py --gluon``
compiles it for sm_90 (no GPU needed) and ``tests/test_gluon_forward.py`` compares it with the
Triton kernel on a card. Not validated on a GPU yet (written 2026-11-29 without device time).
"""

from __future__ import annotations

import torch
from torch import Tensor

from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import (fence_async_shared, mbarrier, tma, warpgroup_mma,
                                                               warpgroup_mma_init, warpgroup_mma_wait)
from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

from .blockinfo import BlockInfo

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


@gluon.jit
def _load_partition(k_desc, v_desc, k_a, v_a, ready_a, empty_a, k_b, v_b, ready_b, empty_b,
                    IDX_a, cnt_a, IDX_b, cnt_b, kv_row0, BS: gl.constexpr, NS: gl.constexpr):
    """The producer warp: the two query blocks' lists, block s of each into buffer s % NS of its
    own ring once its consumer released it (``empty``: the first pass waits on the phase before
    the barrier's first, which counts as passed)."""
    nbytes: gl.constexpr = k_desc.block_type.nbytes + v_desc.block_type.nbytes
    for s in range(gl.maximum(cnt_a, cnt_b)):
        st = s % NS
        ph = ((s // NS) & 1) ^ 1
        if s < cnt_a:
            mbarrier.wait(empty_a.index(st), ph)
            ja = gl.load(IDX_a + s)
            mbarrier.expect(ready_a.index(st), nbytes)
            tma.async_copy_global_to_shared(k_desc, [kv_row0 + ja * BS, 0], ready_a.index(st), k_a.index(st))
            tma.async_copy_global_to_shared(v_desc, [kv_row0 + ja * BS, 0], ready_a.index(st), v_a.index(st))
        if s < cnt_b:
            mbarrier.wait(empty_b.index(st), ph)
            jb = gl.load(IDX_b + s)
            mbarrier.expect(ready_b.index(st), nbytes)
            tma.async_copy_global_to_shared(k_desc, [kv_row0 + jb * BS, 0], ready_b.index(st), k_b.index(st))
            tma.async_copy_global_to_shared(v_desc, [kv_row0 + jb * BS, 0], ready_b.index(st), v_b.index(st))


@gluon.jit
def _logits(q_smem, k_buf, zero_qk):
    """Start q k^T on the tensor cores (async: the caller waits)."""
    return warpgroup_mma(q_smem, k_buf.permute((1, 0)), zero_qk, use_acc=False, is_async=True)


@gluon.jit
def _mma_partition(q_smem, k_smem, v_smem, ready, empty, q_bar, IDX_r, cnt, t0, OFF, qk_scale,
                   O_r, LSE_r, Nq, BS: gl.constexpr, DV: gl.constexpr, NS: gl.constexpr,
                   CAUSAL: gl.constexpr):
    """One consumer warpgroup (64 rows): logits, online softmax and PV for each buffer, then O and
    lse. The next block's q k^T is issued before this block's softmax (FA3's intra-warpgroup
    overlap: the tensor cores work while the exponentials run); a buffer is released once its
    PV product is done."""
    qk_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                        instr_shape=[16, BS, 16])
    pv_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                        instr_shape=[16, DV, 16])
    p_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=pv_layout, k_width=2)
    row_l: gl.constexpr = gl.SliceLayout(1, qk_layout)
    col_l: gl.constexpr = gl.SliceLayout(0, qk_layout)
    orow_l: gl.constexpr = gl.SliceLayout(1, pv_layout)
    ocol_l: gl.constexpr = gl.SliceLayout(0, pv_layout)

    m_i = gl.full([BS], float("-inf"), gl.float32, row_l)
    l_i = gl.zeros([BS], gl.float32, row_l)
    acc = gl.zeros([BS, DV], gl.float32, pv_layout)
    t = t0 + gl.arange(0, BS, layout=row_l)
    cols = gl.arange(0, BS, layout=col_l)
    zero_qk = gl.zeros([BS, BS], gl.float32, qk_layout)
    mbarrier.wait(q_bar, 0)
    qk = zero_qk
    if cnt > 0:
        mbarrier.wait(ready.index(0), 0)
        qk = _logits(q_smem, k_smem.index(0), zero_qk)
        qk = warpgroup_mma_wait(num_outstanding=0, deps=(qk, ))
    for s in range(cnt):
        st = s % NS
        j = gl.load(IDX_r + s)
        nxt = warpgroup_mma_init(zero_qk)  # the async result's type (a pending accumulator)
        if s + 1 < cnt:  # the next block's logits, on the tensor cores during this softmax
            st1 = (s + 1) % NS
            mbarrier.wait(ready.index(st1), ((s + 1) // NS) & 1)
            nxt = _logits(q_smem, k_smem.index(st1), zero_qk)
        qk = qk * qk_scale
        if CAUSAL:
            if j * BS + BS - 1 > t0 + OFF:  # the block reaches past the first row's last key
                kpos = j * BS + cols
                qk = gl.where(kpos[None, :] <= (t + OFF)[:, None], qk, float("-inf"))
        m_new = gl.maximum(m_i, gl.max(qk, axis=1))
        m_s = gl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = gl.exp2(m_i - m_s)
        p = gl.exp2(qk - m_s[:, None])
        l_i = l_i * alpha + gl.sum(p, axis=1)
        acc = acc * gl.convert_layout(alpha, orow_l)[:, None]
        pa = gl.convert_layout(p.to(v_smem.dtype), p_layout)
        acc = warpgroup_mma(pa, v_smem.index(st), acc, is_async=True)
        acc, nxt = warpgroup_mma_wait(num_outstanding=0, deps=(acc, nxt))
        mbarrier.arrive(empty.index(st), count=1)
        m_i = m_new
        qk = nxt

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
def _gluon_fwd_kernel(q_desc, k_desc, v_desc, IDX, CNT, O, LSE, Hq, Hkv, Hs, Nq, Nk, NQB, KMAX, OFF, qk_scale,
                      BS: gl.constexpr, D: gl.constexpr, DV: gl.constexpr, NS: gl.constexpr,
                      CAUSAL: gl.constexpr, CONSUMER_REGS: gl.constexpr, PRODUCER_REGS: gl.constexpr):
    """Two query blocks of one head a program (i and i - 1, the last ones first), each in its own
    consumer warpgroup (the default partition and a 4-warp worker) with its own K/V ring; one
    producer warp fills both rings."""
    i_a = NQB - 1 - 2 * gl.program_id(0)
    i_b = i_a - 1  # -1 for the first block of an odd NQB: no rows, no list
    pid1 = gl.program_id(1)
    b = pid1 // Hq
    h = pid1 % Hq
    kh = h // (Hq // Hkv)
    hs = h * Hs // Hq
    bh = (b * Hq + h).to(gl.int64)

    q_a = gl.allocate_shared_memory(q_desc.dtype, [BS, D], q_desc.layout)
    q_b = gl.allocate_shared_memory(q_desc.dtype, [BS, D], q_desc.layout)
    k_a = gl.allocate_shared_memory(k_desc.dtype, [NS, BS, D], k_desc.layout)
    v_a = gl.allocate_shared_memory(v_desc.dtype, [NS, BS, DV], v_desc.layout)
    k_b = gl.allocate_shared_memory(k_desc.dtype, [NS, BS, D], k_desc.layout)
    v_b = gl.allocate_shared_memory(v_desc.dtype, [NS, BS, DV], v_desc.layout)
    ready_a = gl.allocate_shared_memory(gl.int64, [NS, 1], mbarrier.MBarrierLayout())
    empty_a = gl.allocate_shared_memory(gl.int64, [NS, 1], mbarrier.MBarrierLayout())
    ready_b = gl.allocate_shared_memory(gl.int64, [NS, 1], mbarrier.MBarrierLayout())
    empty_b = gl.allocate_shared_memory(gl.int64, [NS, 1], mbarrier.MBarrierLayout())
    qbar_a = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
    qbar_b = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
    for st in gl.static_range(NS):
        mbarrier.init(ready_a.index(st), count=1)
        mbarrier.init(empty_a.index(st), count=1)
        mbarrier.init(ready_b.index(st), count=1)
        mbarrier.init(empty_b.index(st), count=1)
    mbarrier.init(qbar_a, count=1)
    mbarrier.init(qbar_b, count=1)
    fence_async_shared()
    q_row = (b * Hq + h) * Nq
    mbarrier.expect(qbar_a, q_desc.block_type.nbytes)
    tma.async_copy_global_to_shared(q_desc, [q_row + i_a * BS, 0], qbar_a, q_a)
    # block -1 has no rows: its consumer still waits on qbar_b, so load block 0 there (unused)
    mbarrier.expect(qbar_b, q_desc.block_type.nbytes)
    tma.async_copy_global_to_shared(q_desc, [q_row + gl.maximum(i_b, 0) * BS, 0], qbar_b, q_b)

    row_a = (b * Hs + hs) * NQB + i_a
    cnt_a = gl.load(CNT + row_a)
    cnt_b = gl.load(CNT + row_a - 1, mask=i_b >= 0, other=0)
    IDX_a = IDX + row_a.to(gl.int64) * KMAX
    IDX_b = IDX_a - KMAX
    gl.warp_specialize([
        (_mma_partition, (q_a, k_a, v_a, ready_a, empty_a, qbar_a, IDX_a, cnt_a, i_a * BS, OFF, qk_scale,
                          O + bh * Nq * DV, LSE + bh * Nq, Nq, BS, DV, NS, CAUSAL)),
        (_mma_partition, (q_b, k_b, v_b, ready_b, empty_b, qbar_b, IDX_b, cnt_b, i_b * BS, OFF, qk_scale,
                          O + bh * Nq * DV, LSE + bh * Nq, Nq, BS, DV, NS, CAUSAL)),
        (_load_partition, (k_desc, v_desc, k_a, v_a, ready_a, empty_a, k_b, v_b, ready_b, empty_b,
                           IDX_a, cnt_a, IDX_b, cnt_b, (b * Hkv + kh) * Nk, BS, NS)),
    ], [4, 1], [CONSUMER_REGS, PRODUCER_REGS])


def supported(q: Tensor, k: Tensor, v: Tensor, info: BlockInfo, fill: bool) -> str | None:
    """None where ``gluon_forward`` takes the shape, else why not (the Triton kernel does)."""
    if fill:
        return "the landmark fill is not written yet"
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


def descriptors(q: Tensor, k: Tensor, v: Tensor, block: int):
    """2-D TMA descriptors of q, k, v as [rows, D] with [block, D] boxes (host-built)."""
    out = []
    for x in (q, k, v):
        flat = x.reshape(-1, x.shape[-1])
        lay = gl.NVMMASharedLayout.get_default_for([block, x.shape[-1]], _GL_DTYPE[x.dtype])
        out.append(TensorDescriptor(flat, list(flat.shape), list(flat.stride()), [block, x.shape[-1]], lay))
    return out


_GL_DTYPE = {torch.bfloat16: gl.bfloat16, torch.float16: gl.float16}


def gluon_forward(q: Tensor, k: Tensor, v: Tensor, info: BlockInfo, index: Tensor, count: Tensor, scale: float,
                  stages: int = STAGES, out: Tensor | None = None, lse: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """(out, lse) of the exact part over ``index``/``count`` (no fill), as
    ``sparse_forward.launch_forward(..., fill=False)``, into ``out``/``lse`` where given
    (contiguous). Raises where ``supported`` says no."""
    why = supported(q, k, v, info, False)
    if why:
        raise ValueError(f"gluon_forward: {why}; use sparse_forward.launch_forward")
    b, hq, nq, d = q.shape
    hkv, nk, dv = k.shape[1], k.shape[2], v.shape[-1]
    out = torch.empty(b, hq, nq, dv, device=q.device, dtype=q.dtype) if out is None else out
    lse = torch.empty(b, hq, nq, device=q.device, dtype=torch.float32) if lse is None else lse
    qd, kd, vd = descriptors(q, k, v, info.block)
    _gluon_fwd_kernel[((info.nqb + 1) // 2, b * hq)](
        qd, kd, vd, index, count, out, lse, hq, hkv, index.shape[1], nq, nk, info.nqb, index.shape[-1],
        info.offset, float(scale) * LOG2E,
        BS=info.block, D=d, DV=dv, NS=stages, CAUSAL=info.causal, CONSUMER_REGS=CONSUMER_REGS,
        PRODUCER_REGS=PRODUCER_REGS, num_warps=4)
    return out, lse
