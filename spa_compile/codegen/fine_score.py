"""block_score "fine" in one Triton kernel: the attention mass of each key block under row means.

``reference.fine_scores`` materialises ``[B, Hq, blocks, A, NKB * M]`` logits and their softmax
(chunks of query blocks within 256 MiB, ``fine_selection.py``): memory-bound passes over about
2 GB at 16K tokens and 32 heads. Here one program per (query block, head) keeps its ``A`` projected
row means in registers and walks the M-per-block sub-key means twice, in chunks of BJ key blocks:
first the online softmax statistics (max, normaliser) of each row mean, then each block's mass,
``sum over its M sub-keys of exp(logit - max) / normaliser``, averaged over the row means. Only
the ``[B, Hq, blocks, NKB]`` masses reach global memory (the reference's masses before the
group mean). Logits as the reference: ``scale * qm . ksub + log nsub`` over visible blocks and
non-empty sub-blocks; a row mean that sees nothing contributes 0. The dots run on tensor cores as
three tf32 products ("tf32x3", about fp32, as the dense selection's scores): compile_check (sm_90,
triton 3.6, 16 row means, head dim 128, 64 sub-keys a chunk, 8 warps) gives 160 registers and no
spill, where fp32 FMA dots of 128 sub-keys at 4 warps spilled 5.9 KB.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor


SUB_KEYS_PER_CHUNK = 64  # a chunk's BJ blocks times M sub-keys (one BJ = 1 block when M is larger)


@triton.jit
def _chunk_logits(qm, KS_h, LN_h, VIS_r, c, n, rr, skn, NKB, R, scale,
                  M: tl.constexpr, BJ: tl.constexpr, PREC: tl.constexpr):
    """Logits ``[BA, BJ * M]`` of the sub-keys of key blocks ``[c, c + BJ)``; -inf where the
    block is not visible, the sub-block is empty, or the block is past NKB."""
    jb = c + n // M
    col = c * M + n
    inb = jb < NKB
    ln = tl.load(LN_h + col, mask=inb, other=float("-inf"))
    vis = tl.load(VIS_r + jb, mask=inb, other=0)
    ks = tl.load(KS_h + col[:, None].to(tl.int64) * skn + rr[None, :], mask=inb[:, None] & (rr < R)[None, :], other=0.0)
    lg = tl.dot(qm, tl.trans(ks), input_precision=PREC) * scale + ln[None, :]
    return tl.where(((vis != 0) & (ln > float("-inf")))[None, :], lg, float("-inf"))


@triton.jit
def _fine_mass_kernel(
    QM, KS, LN, VIS, OUT,
    sqb, sqh, sqi, sqa, skb, skh, skn, slb, slh, svb, svh, svi, sob, soh, soi,
    Hq, HK, HL, HV, NKB, A, R, scale,
    M: tl.constexpr, BJ: tl.constexpr, BA: tl.constexpr, BR: tl.constexpr, PREC: tl.constexpr,
):
    i = tl.program_id(0)
    pid = tl.program_id(1)
    b = (pid // Hq).to(tl.int64)
    h = pid % Hq
    a = tl.arange(0, BA)
    rr = tl.arange(0, BR)
    n = tl.arange(0, BJ * M)
    row_ok = a < A
    qm = tl.load(QM + b * sqb + h.to(tl.int64) * sqh + i.to(tl.int64) * sqi + a[:, None] * sqa + rr[None, :],
                 mask=row_ok[:, None] & (rr < R)[None, :], other=0.0)
    # the head's keys, counts and visibility (each stored for 1, Hkv or Hq heads)
    KS_h = KS + b * skb + (h * HK // Hq).to(tl.int64) * skh
    LN_h = LN + b * slb + (h * HL // Hq).to(tl.int64) * slh
    VIS_r = VIS + b * svb + (h * HV // Hq).to(tl.int64) * svh + i.to(tl.int64) * svi

    m_i = tl.full([BA], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BA], dtype=tl.float32)
    for c in range(0, NKB, BJ):  # pass 1: each row mean's softmax max and normaliser
        lg = _chunk_logits(qm, KS_h, LN_h, VIS_r, c, n, rr, skn, NKB, R, scale, M, BJ, PREC)
        m_new = tl.maximum(m_i, tl.max(lg, axis=1))
        m_s = tl.where(m_new == float("-inf"), 0.0, m_new)
        l_i = l_i * tl.exp(m_i - m_s) + tl.sum(tl.exp(lg - m_s[:, None]), axis=1)
        m_i = m_new
    m_s = tl.where(m_i == float("-inf"), 0.0, m_i)
    # 1 / (normaliser * A) for the row means, 0 for padding rows and rows that see nothing
    w = tl.where(row_ok & (l_i > 0.0), 1.0 / tl.where(l_i > 0.0, l_i, 1.0), 0.0) / A
    O_r = OUT + b * sob + h.to(tl.int64) * soh + i.to(tl.int64) * soi
    jo = tl.arange(0, BJ)
    for c in range(0, NKB, BJ):  # pass 2: the blocks' mass, averaged over the row means
        lg = _chunk_logits(qm, KS_h, LN_h, VIS_r, c, n, rr, skn, NKB, R, scale, M, BJ, PREC)
        p = tl.exp(lg - m_s[:, None]) * w[:, None]
        mass = tl.sum(tl.reshape(tl.sum(p, axis=0), [BJ, M]), axis=1)
        tl.store(O_r + c + jo, mass, mask=c + jo < NKB)


def fine_mass(qm: Tensor, ksub: Tensor, nsub: Tensor, visible: Tensor, scale: float) -> Tensor:
    """Per-head block masses ``[B, Hq, nb, NKB]`` fp32 of ``reference.fine_scores`` (before its
    mean over the heads of a selection head).

    qm ``[B, Hq, nb, A, r]``: projected row means of nb query blocks; ksub ``[B, 1|Hkv|Hq, NKB*M, r]``:
    projected sub-block key means; nsub ``[B, 1|Hkv|Hq, NKB*M]``: their valid-key counts; visible
    ``[B, 1|Hq, nb, NKB]`` bool."""
    b, hq, nb, a, r = qm.shape
    nkb = visible.shape[-1]
    m = ksub.shape[2] // nkb
    if m * nkb != ksub.shape[2] or m & (m - 1):
        raise ValueError(f"fine_mass: {ksub.shape[2]} sub-keys is not a power-of-two count per each of {nkb} blocks")
    qm = qm.float().contiguous()
    ksub = ksub.float().contiguous()
    logn = nsub.float().log().contiguous()  # log 0 = -inf: an empty sub-block drops out
    vis = visible.to(torch.int8).contiguous()
    out = torch.empty(b, hq, nb, nkb, dtype=torch.float32, device=qm.device)
    if out.numel() == 0:
        return out
    bj = max(1, SUB_KEYS_PER_CHUNK // m)
    _fine_mass_kernel[(nb, b * hq)](
        qm, ksub, logn, vis, out,
        qm.stride(0), qm.stride(1), qm.stride(2), qm.stride(3),
        ksub.stride(0), ksub.stride(1), ksub.stride(2), logn.stride(0), logn.stride(1),
        vis.stride(0), vis.stride(1), vis.stride(2), out.stride(0), out.stride(1), out.stride(2),
        hq, ksub.shape[1], logn.shape[1], vis.shape[1], nkb, a, r, float(scale),
        M=m, BJ=bj, BA=max(16, triton.next_power_of_2(a)), BR=max(16, triton.next_power_of_2(r)), PREC="tf32x3",
        num_warps=8,
    )
    return out

