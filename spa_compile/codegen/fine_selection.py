"""block_score "fine" on an accelerator: the reference selection vectorised over chunks of query blocks.

``reference.select_blocks`` scores one query block at a time (about 40 torch launches each: the
whole long-context study's SPA time on a GPU). Here a chunk of query blocks is scored at once:
``[B, Hq, blocks, fine_rows, NKB * fine_keys]`` logits within a byte budget (never N x N), with
the visibility, the forced blocks (partial, sink, local), k and the ties of the reference, so the
lists are the reference's (tests/test_fine_selection.py compares them). The sparse kernels take
these lists as they take the selection kernels'.

``kernel=True`` (or ``SPA_FINE_KERNEL=1``) scores each chunk with ``fine_score.fine_mass`` (one
Triton program per query block and head: no logits in global memory) instead of
``reference.fine_scores``; the forced blocks, k and the ties stay the reference's. Checked against
the reference under the Triton interpreter; off by default until timed and checked on a card.
"""

from __future__ import annotations

import os

import torch
from torch import Tensor

from .. import reference as R
from ..budget import max_selected, topk_count
from ..projector import Projector
from ..visibility import Visibility, num_blocks
from .autotune import interpreting
from .fine_score import fine_mass

CHUNK_BYTES = 256 << 20  # fp32 logits of one chunk (the softmax adds temporaries of the same size)


KERNEL_ENV = "SPA_FINE_KERNEL"  # "1": score chunks with the Triton kernel (fine_score.fine_mass)


def use_kernel(q: Tensor, kernel: bool | None) -> bool:
    """The Triton scoring where it can run (a CUDA tensor, or the interpreter), when asked for."""
    if kernel is None:
        kernel = os.environ.get(KERNEL_ENV, "0") == "1"
    if kernel and not (q.is_cuda or interpreting()):
        raise ValueError(f"fine_selection: the Triton fine score needs a CUDA tensor or TRITON_INTERPRET=1 "
                         f"(got a {q.device} tensor): unset {KERNEL_ENV} or pass kernel=False")
    return kernel


def fine_selection(q: Tensor, k: Tensor, vis: Visibility, scale: float, cfg, projector: Projector | None,
                   chunk_bytes: int = CHUNK_BYTES, kernel: bool | None = None) -> tuple[Tensor, Tensor]:
    """index ``[B, Hs, NQB, kmax]`` int32 (ascending, -1 padded) and count ``[B, Hs, NQB]`` of
    ``block_score="fine"``: what ``reference.select_blocks`` gives, a chunk of query blocks at a time.
    ``kernel``: score with the Triton kernel (default: ``$SPA_FINE_KERNEL`` is "1")."""
    kernel = use_kernel(q, kernel)
    b, hq, nq, d = q.shape
    hkv, bs = k.shape[1], cfg.block_size
    hs = hkv if cfg.selection == "group" else hq
    dt = R.compute_dtype(q)
    valid = R.valid_keys(vis, b, hkv, bs, q.device)
    pooled = R.pool_blocks(k.detach(), k.detach()[..., :1], valid, bs, sub_blocks=cfg.fine_keys)
    proj = projector or Projector.identity(hkv, d, device=q.device, dtype=dt)
    ksub = proj.project_keys(pooled.ksub.to(dt))  # [B, Hkv, NKB * M, r]: both scorers broadcast heads
    nsub = pooled.nsub.to(dt)
    nkb, nqb = pooled.kbar.shape[2], num_blocks(nq, bs)
    kmax = int(max_selected(nq, vis.nk, vis, cfg))
    index = torch.full((b, hs, nqb, kmax), -1, dtype=torch.int32, device=q.device)
    count = torch.zeros((b, hs, nqb), dtype=torch.int32, device=q.device)
    es = torch.empty((), dtype=dt).element_size()
    if kernel:  # the chunk's rows in dt, their projected row means and the masses: no logits
        per_block = b * hq * (bs * d + min(cfg.fine_rows, bs) * ksub.shape[-1] + nkb) * es
    else:
        per_block = b * hq * min(cfg.fine_rows, bs) * ksub.shape[2] * es
    per_block += b * vis.mask_heads() * bs * vis.nk  # the chunk's row visibility (bool), classify_chunk
    step = max(1, chunk_bytes // max(per_block, 1))
    nfull = nq // bs
    chunks = [(i, min(i + step, nfull), bs) for i in range(0, nfull, step)]
    if nq % bs:
        chunks.append((nfull, nfull + 1, nq - nfull * bs))  # the partial last block alone
    for i0, i1, r in chunks:
        nb, t0 = i1 - i0, i0 * bs
        visible_h, full_h = R.classify_chunk(vis.rows(t0, t0 + nb * r, q.device), valid, nb, bs)  # [B, Hm, nb, NKB]
        visible = R._to_selection_heads(visible_h, hs)
        partial = R._to_selection_heads(visible_h & ~full_h, hs)
        q_rows = q[:, :, t0:t0 + nb * r].to(dt).unflatten(2, (nb, r))  # [B, Hq, nb, r, D]
        if kernel:
            qm = proj.project_queries(R.row_means(q_rows, cfg.fine_rows))  # [B, Hq, nb, A, r]
            score = R.selection_head_mean(fine_mass(qm, ksub, nsub, visible_h, scale), hs)  # [B, Hs, nb, NKB]
        else:
            score = R.fine_scores(q_rows, ksub, nsub, visible_h, cfg.fine_rows, hs, scale, proj)  # [B, Hs, nb, NKB]
        blk = torch.arange(i0, i1, device=q.device)
        diag = torch.div(blk * bs + (r - 1 + vis.offset), bs, rounding_mode="floor").clamp(0, nkb - 1)
        forced = R.forced_blocks(visible, partial, diag, cfg)
        remaining = visible & ~forced
        kk = torch.minimum(topk_count(visible.sum(-1), cfg), remaining.sum(-1))
        index[:, :, i0:i1], count[:, :, i0:i1] = R.index_rows(forced | R._top(score, remaining, kk), kmax)
    R.check_counts(count, kmax)
    return index, count
