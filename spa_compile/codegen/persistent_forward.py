"""Persistent form of the sparse forward's exact part (SPEC.md section 3, ``fill = "none"``).

The per-query-block kernel (``sparse_forward._fwd_kernel``) starts its K/V pipeline afresh in
every program: the first tiles' loads are exposed once per query block (about 37 tiles at
top-k 32). Here a fixed number of programs (as many as the SMs hold at once) walk the
(query block, head pack) work items in the same order as the per-block grid (query blocks
first, the last block first), and the loop over items and the loop over an item's list are one
loop (``tl.range(..., flatten=True)``): the pipeliner then issues the next item's first K/V
copies, and its query tile load, while the current item's last tiles are computed.

Flattening needs an inner trip count that does not depend on the item, so every item walks
KMAX list entries; the entries past its count (index -1) read block 0 and are masked out
(``-inf`` logits: the online softmax is unchanged, bit for bit). That costs nothing where rows
hold KMAX blocks (top-k lists; only the first query blocks of a causal mask hold fewer), so it
is offered for lists of up to 64 blocks (``autotune.attention_candidates``). The results are
bitwise those of ``_fwd_kernel`` at the same tile shape (``tests/test_kernels.py``).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .autotune import interpreting
from .common import block_is_clean, pair_mask
from .sparse_forward import LOG2E, _block_kv, dot_precision, positive_scale, softmax_step, tma_descriptors, tma_ok


@triton.jit
def _fwd_persistent_kernel(
    Q, K, V, NB, KVALID, IDX, CNT, O, LSE, KD, VD,
    sqb, sqh, sqn, skb, skh, skn, svb, svh, svn, sob, soh, son,
    Hq, Hkv, Hs, Nq, Nk, NQB, NKB, KMAX, OFF, WIN, qk_scale, N_ITEMS, NPROG,
    D: tl.constexpr, DV: tl.constexpr, BS: tl.constexpr, GP: tl.constexpr,
    BD: tl.constexpr, BDV: tl.constexpr,
    CAUSAL: tl.constexpr, WINDOW: tl.constexpr, HAS_KV: tl.constexpr,
    PREC: tl.constexpr, TMA: tl.constexpr = False, FLATTEN: tl.constexpr = True,
):
    BM: tl.constexpr = GP * BS
    HP = Hq // GP
    d = tl.arange(0, BD)
    dv = tl.arange(0, BDV)
    offs_n = tl.arange(0, BS)
    r = tl.arange(0, BM)
    for item in tl.range(tl.program_id(0), N_ITEMS, NPROG, flatten=FLATTEN):
        # the work item's query block and head pack, in the per-block grid's order
        # (common.qblock_prologue without HF / GO: query blocks first, the last one first)
        i = NQB - 1 - item % NQB
        pid1 = item // NQB
        b = pid1 // HP
        h0 = (pid1 % HP) * GP
        kh = h0 // (Hq // Hkv)
        hs = h0 * Hs // Hq
        rh = (h0 + r // BS).to(tl.int64)
        t = i * BS + r % BS
        t0 = i * BS
        t1 = tl.minimum(t0 + BS, Nq)
        b64 = b.to(tl.int64)
        b32 = b.to(tl.int32)
        row_ok = t < Nq
        q = tl.load(Q + b64 * sqb + rh[:, None] * sqh + t[:, None].to(tl.int64) * sqn + d[None, :],
                    mask=row_ok[:, None] & (d[None, :] < D), other=0.0)
        K_h = K + b64 * skb + kh.to(tl.int64) * skh
        V_h = V + b64 * svb + kh.to(tl.int64) * svh
        NB_b = NB + b64 * NKB
        KV_b = KVALID + b64 * Nk
        IDX_r = IDX + ((b64 * Hs + hs) * NQB + i) * KMAX
        cnt = tl.load(CNT + (b64 * Hs + hs) * NQB + i)
        m_i = tl.full([BM], float("-inf"), dtype=tl.float32)
        l_i = tl.zeros([BM], dtype=tl.float32)
        acc = tl.zeros([BM, BDV], dtype=tl.float32)
        for s in range(0, KMAX):  # item-invariant trip count: what flatten needs
            j = tl.maximum(tl.load(IDX_r + s), 0)  # past the count: block 0, masked below
            kpos = j * BS + offs_n
            k, v = _block_kv(K_h, V_h, KD, VD, b32, kh, j, offs_n, d, dv, Nk, skn, svn, D, DV, BS, BD, BDV, TMA)
            qk = tl.dot(q, tl.trans(k), input_precision=PREC)
            live = s < cnt
            clean = block_is_clean(j, NB_b, Nk, t0, t1, OFF, WIN, BS, CAUSAL, WINDOW, HAS_KV) & live
            if clean == 0:
                msk = pair_mask(t, kpos, Nk, KV_b, OFF, WIN, CAUSAL, WINDOW, HAS_KV) & live
                qk = tl.where(msk, qk, float("-inf"))
            m_i, l_i, acc = softmax_step(qk, v, m_i, l_i, acc, qk_scale, PREC)
        seen = l_i > 0.0
        out = acc / tl.where(seen, l_i, 1.0)[:, None]
        lse = tl.where(seen, (m_i + tl.math.log2(tl.where(seen, l_i, 1.0))) * 0.6931471805599453, float("-inf"))
        tl.store(O + b64 * sob + rh[:, None] * soh + t[:, None].to(tl.int64) * son + dv[None, :],
                 out.to(O.dtype.element_ty), mask=row_ok[:, None] & (dv[None, :] < DV))
        tl.store(LSE + (b64 * Hq + rh) * Nq + t, lse, mask=row_ok)


# programs an SM that fit at once, per compiled variant (from its registers and shared memory,
# read after its first launch: until then one an SM, which is always resident)
_RESIDENT: dict[tuple, int] = {}


def resident_per_sm(compiled, num_warps: int, device: torch.device) -> int:
    """How many programs of ``compiled`` an SM holds at once: the least of what its shared
    memory (plus the 1 KB the driver reserves a block), its registers (rounded up to 8 a thread)
    and its thread slots allow. A persistent launch of more programs than fit would run the
    surplus after the others finished: twice the time."""
    props = torch.cuda.get_device_properties(device)
    smem = getattr(props, "shared_memory_per_multiprocessor", 228 * 1024)
    regs = getattr(props, "regs_per_multiprocessor", 65536)
    threads = getattr(props, "max_threads_per_multi_processor", 2048)
    per_thread = -(-max(int(compiled.n_regs), 1) // 8) * 8
    fit = min(smem // (int(compiled.metadata.shared) + 1024), regs // (per_thread * 32 * num_warps),
              threads // (32 * num_warps))
    return max(1, fit)


def program_count(device: torch.device, n_items: int, per_sm: int) -> int:
    """Programs of the persistent launch: ``per_sm`` a streaming multiprocessor (4 SMs in the
    interpreter, so that the tests walk several items a program), at most one an item."""
    sms = 4 if interpreting() or device.type != "cuda" else torch.cuda.get_device_properties(device).multi_processor_count
    return max(1, min(n_items, per_sm * sms))


def launch_forward_persistent(q, k, v, info, index, count, scale, config, out=None, lse=None):
    """The exact part alone (no fill) with the persistent kernel: (out, lse), as
    ``sparse_forward.launch_forward(..., fill=False)``. ``config``: GP, num_warps, num_stages, TMA,
    CTAS_PER_SM (default: as many as fit, ``resident_per_sm``) and FLATTEN (default True; False keeps
    the two loops, for comparison)."""
    b, hq, nq, d = q.shape
    hkv = k.shape[1]
    dv = v.shape[-1]
    hs = index.shape[1]
    if out is None:
        out = torch.empty(b, hq, nq, dv, device=q.device, dtype=q.dtype)
    if lse is None:
        lse = torch.empty(b, hq, nq, device=q.device, dtype=torch.float32)
    gp = config["GP"]
    q, scale = positive_scale(q, scale)
    kv = info.key_valid if info.key_valid is not None else info.valid
    tma = bool(config.get("TMA", False)) and tma_ok(k, v, info.block)
    kd, vd = tma_descriptors(k, v, info.block) if tma else (None, None)
    n_items = b * (hq // gp) * info.nqb
    flatten = bool(config.get("FLATTEN", True))
    key = (q.device, q.dtype, d, dv, info.block, gp, config["num_warps"], config["num_stages"], tma, flatten,
           info.causal, info.has_window, info.key_valid is not None)
    per_sm = config.get("CTAS_PER_SM") or (2 if interpreting() else _RESIDENT.get(key, 1))
    nprog = program_count(q.device, n_items, per_sm)
    compiled = _fwd_persistent_kernel[(nprog,)](
        q, k, v, info.n, kv, index, count, out, lse, kd, vd,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2), out.stride(0), out.stride(1), out.stride(2),
        hq, hkv, hs, nq, info.nk, info.nqb, info.nkb, index.shape[-1], info.offset, info.win,
        float(scale) * LOG2E, n_items, nprog,
        D=d, DV=dv, BS=info.block, GP=gp,
        BD=triton.next_power_of_2(d), BDV=triton.next_power_of_2(dv),
        CAUSAL=info.causal, WINDOW=info.has_window, HAS_KV=info.key_valid is not None,
        PREC=dot_precision(q.dtype), TMA=tma, FLATTEN=flatten,
        num_warps=config["num_warps"], num_stages=config["num_stages"],
    )
    if key not in _RESIDENT and not interpreting() and q.is_cuda:
        _RESIDENT[key] = resident_per_sm(compiled, config["num_warps"], q.device)
    return out, lse
