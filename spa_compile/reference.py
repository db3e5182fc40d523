"""Reference SPA in pure PyTorch: SPEC.md, transcribed block by block.

It is the semantics the kernels answer to and the CPU fallback. It walks the
query blocks one at a time, so its memory is O(N * (k * Bk + N / Bk)) per head,
never Nq x Nk. Arithmetic is float32 (float64 for float64 inputs); the output
has the dtype of ``q``.

The three stages are public so that kernels can be checked stage by stage:
:func:`pool_blocks` (block means), :func:`select_blocks` (projector + top-k),
:func:`sparse_attention` (exact part + landmark fill).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from .budget import max_selected, topk_count
from .config import SPAConfig
from .projector import Projector
from .visibility import Visibility, from_sdpa, num_blocks


@dataclass
class Pooled:
    """Per key block: means of the valid keys and values, and their count (SPEC.md section 1)."""

    kbar: Tensor  # [B, Hkv, NKB, D]
    vbar: Tensor  # [B, Hkv, NKB, Dv]
    count: Tensor  # [B, Hkv, NKB], float
    # per-channel max / min of the valid keys (0 for empty blocks), for the "bound" block score
    kmax: Tensor | None = None  # [B, Hkv, NKB, D]
    kmin: Tensor | None = None
    # means and counts of M sub-blocks (Bk / M consecutive keys) per block, for the "fine" score
    ksub: Tensor | None = None  # [B, Hkv, NKB * M, D]
    nsub: Tensor | None = None  # [B, 1|Hkv, NKB * M], float


@dataclass
class Selection:
    """Selected key blocks per query block: ascending indices padded with -1."""

    index: Tensor  # [B, Hs, NQB, kmax] int32; Hs = Hkv ("group") or Hq ("head")
    count: Tensor  # [B, Hs, NQB] int32


def compute_dtype(x: Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


# ---------------------------------------------------------------------------------------
# Block classification
# ---------------------------------------------------------------------------------------


def valid_keys(vis: Visibility, batch: int, hkv: int, block_q: int, device) -> Tensor:
    """Keys some query of the same batch row and kv group may see: bool ``[B, Hkv, Nk]``."""
    hm = vis.mask_heads()
    valid = torch.zeros(batch, hkv, vis.nk, dtype=torch.bool, device=device)
    for t0 in range(0, vis.nq, block_q):
        rows = vis.rows(t0, min(t0 + block_q, vis.nq), device).any(dim=2)  # [B|1, Hm|1, Nk]
        if hm > 1:
            rows = rows.reshape(rows.shape[0], hkv, hm // hkv, vis.nk).any(dim=2)
        valid |= rows
    return valid


def _pad_keys(x: Tensor, nkb: int, block_k: int, value) -> Tensor:
    pad = nkb * block_k - x.shape[-1]
    return torch.nn.functional.pad(x, (0, pad), value=value) if pad else x


def classify_blocks(rows: Tensor, valid: Tensor, block_k: int) -> tuple[Tensor, Tensor]:
    """Visible and fully visible key blocks for one query block.

    rows: ``[B|1, Hm, R, Nk]`` visibility of the block's rows; valid: ``[B, Hkv, Nk]``.
    Returns two bool ``[B, Hm, NKB]``: visible (some pair visible) and full (every
    (row, valid key) pair visible).
    """
    nk = rows.shape[-1]
    nkb = num_blocks(nk, block_k)
    b = valid.shape[0]
    hm = rows.shape[1]
    rows = _pad_keys(rows.expand(b, hm, -1, -1), nkb, block_k, False)
    # a key no query of the head's group can see is invalid: "every valid key" skips it
    v = valid[:, :1] if hm == 1 else _to_heads(valid, hm)
    invalid = ~_pad_keys(v, nkb, block_k, False)
    blocks = rows.unflatten(-1, (nkb, block_k))  # [B, Hm, R, NKB, Bk]
    visible = blocks.any(dim=4).any(dim=2)
    full = (blocks | invalid.unflatten(-1, (nkb, block_k))[:, :, None]).all(dim=4).all(dim=2)
    return visible, full & visible


def classify_chunk(rows: Tensor, valid: Tensor, nb: int, block_k: int) -> tuple[Tensor, Tensor]:
    """:func:`classify_blocks` for ``nb`` query blocks of R rows each at once (folded into the
    batch dimension): rows ``[B|1, Hm, nb * R, Nk]``; returns visible and full ``[B, Hm, nb, NKB]``."""
    b, nk = valid.shape[0], rows.shape[-1]
    hm, r = rows.shape[1], rows.shape[2] // nb
    folded = rows.expand(b, hm, nb * r, nk).unflatten(2, (nb, r)).movedim(2, 0).reshape(nb * b, hm, r, nk)
    visible, full = classify_blocks(folded, valid.repeat(nb, 1, 1), block_k)  # [nb * B, Hm, NKB]
    return tuple(x.unflatten(0, (nb, b)).movedim(0, 2) for x in (visible, full))


def _to_heads(x: Tensor, heads: int) -> Tensor:
    """Broadcast a ``[B, h, ...]`` tensor with h in {1, heads/g} to ``heads`` heads."""
    if x.shape[1] == heads:
        return x
    if x.shape[1] == 1:
        return x.expand(x.shape[0], heads, *x.shape[2:])
    return x.repeat_interleave(heads // x.shape[1], dim=1)


def _to_selection_heads(x: Tensor, hs: int) -> Tensor:
    """Reduce a per-head bool ``[B, 1|Hq, ..., NKB]`` to ``hs`` selection heads: a group sees what any head sees."""
    if x.shape[1] == 1:
        return x.expand(x.shape[0], hs, *x.shape[2:])
    if x.shape[1] == hs:
        return x
    return x.unflatten(1, (hs, x.shape[1] // hs)).any(dim=2)


# ---------------------------------------------------------------------------------------
# 1. Pooling
# ---------------------------------------------------------------------------------------


def pool_blocks(k: Tensor, v: Tensor, valid: Tensor, block_k: int, extrema: bool = False,
                sub_blocks: int | None = None) -> Pooled:
    """Means of the valid keys and values of every key block, and their counts; with ``extrema``
    also the per-channel max and min of the valid keys (what ``block_score="bound"`` needs); with
    ``sub_blocks`` M the means and counts of M sub-blocks a block (``block_score="fine"``)."""
    dt = compute_dtype(k)
    nk = k.shape[2]
    nkb = num_blocks(nk, block_k)
    pad = nkb * block_k - nk
    w = valid.to(dt)[..., None]
    ks = torch.nn.functional.pad(k.to(dt) * w, (0, 0, 0, pad)).unflatten(2, (nkb, block_k)).sum(3)
    vs = torch.nn.functional.pad(v.to(dt) * w, (0, 0, 0, pad)).unflatten(2, (nkb, block_k)).sum(3)
    n = torch.nn.functional.pad(valid.to(dt), (0, pad)).unflatten(2, (nkb, block_k)).sum(3)
    denom = n.clamp(min=1)[..., None]
    pooled = Pooled(kbar=ks / denom, vbar=vs / denom, count=n)
    if extrema:
        pooled.kmax, pooled.kmin = key_extrema(k.detach(), valid, block_k)
    if sub_blocks:
        sub = pool_blocks(k.detach(), k.detach()[..., :1], valid, block_k // sub_blocks)
        short = nkb * sub_blocks - sub.count.shape[-1]  # a last block shorter than Bk: empty sub-blocks
        pooled.ksub = torch.nn.functional.pad(sub.kbar, (0, 0, 0, short))
        pooled.nsub = torch.nn.functional.pad(sub.count, (0, short))
    return pooled


def pool_for(cfg: SPAConfig, k: Tensor, v: Tensor, valid: Tensor) -> Pooled:
    """:func:`pool_blocks` with what ``cfg.block_score`` needs (extrema, sub-block means)."""
    return pool_blocks(k, v, valid, cfg.block_size, extrema=cfg.block_score in ("bound", "hybrid"),
                       sub_blocks=cfg.fine_keys if cfg.block_score == "fine" else None)


def key_extrema(k: Tensor, valid: Tensor, block_k: int) -> tuple[Tensor, Tensor]:
    """Per-channel max and min over the valid keys of each key block, ``[B, Hkv, NKB, D]`` each in
    the compute dtype; 0 for a block without valid keys (never visible: keeps 0 * inf out)."""
    dt = compute_dtype(k)
    nkb = num_blocks(k.shape[2], block_k)
    pad = nkb * block_k - k.shape[2]
    ok = torch.nn.functional.pad(valid, (0, pad))[..., None]  # [B, 1|Hkv, NKB * Bk, 1]
    kp = torch.nn.functional.pad(k.to(dt), (0, 0, 0, pad))
    hi = torch.where(ok, kp, -math.inf).unflatten(2, (nkb, block_k)).amax(3)
    lo = torch.where(ok, kp, math.inf).unflatten(2, (nkb, block_k)).amin(3)
    has = ok.unflatten(2, (nkb, block_k)).any(3)
    return torch.where(has, hi, 0.0), torch.where(has, lo, 0.0)


def bound_scores(q_rows: Tensor, kmax: Tensor, kmin: Tensor, hs: int, scale: float) -> Tensor:
    """The key-range bound of every key block for query rows ``q_rows`` ``[B, Hq, R, D]``:
    ``s * max over rows and the query heads of a selection head of sum_d max(q_d kmax_d, q_d kmin_d)``,
    an upper bound of the block's largest logit. ``max(q a, q b)`` for ``a >= b`` is ``q a`` when
    ``q >= 0`` and ``q b`` otherwise, so it is two matrix products. kmax/kmin ``[B, Hq, NKB, D]``
    (per query head). Returns ``[B, hs, NKB]``."""
    pos, neg = q_rows.clamp(min=0), q_rows.clamp(max=0)
    sc = (pos @ kmax.transpose(-1, -2) + neg @ kmin.transpose(-1, -2)).amax(2)  # [B, Hq, NKB]
    if sc.shape[1] != hs:
        sc = sc.unflatten(1, (hs, sc.shape[1] // hs)).amax(2)
    return scale * sc


def fine_scores(q_rows: Tensor, ksub: Tensor, nsub: Tensor, visible: Tensor, rows: int, hs: int, scale: float,
                projector: Projector) -> Tensor:
    """The ``block_score="fine"`` score of every key block for query blocks: each block's rows
    ``q_rows`` ``[B, Hq, *blocks, R, D]`` pooled to ``min(rows, R)`` consecutive-row means, each
    attending (softmax, projected like the block means) over the M sub-block key means of the
    visible blocks with their log counts; a block's score is the attention mass its sub-blocks
    get, averaged over the row means (and over the query heads of a selection head). It estimates
    the block's share of the true attention mass, which finer row means track better than one
    block mean (docs/accuracy.md). ksub ``[B, 1|Hkv|Hq, NKB * M, r]`` (projected) and nsub
    ``[B, 1|Hkv|Hq, NKB * M]`` (broadcast to the query heads here), visible ``[B, 1|Hq, *blocks,
    NKB]`` bool. ``*blocks``: no dimension
    (one query block, the reference) or one (a chunk of blocks with R rows each).
    Returns ``[B, hs, *blocks, NKB]``."""
    nkb = visible.shape[-1]
    m = ksub.shape[2] // nkb
    extra = q_rows.dim() - 4  # block dims between the heads and the rows
    qm = projector.project_queries(row_means(q_rows, rows))  # [B, Hq, *, A, r]
    ks, ns = _to_heads(ksub, q_rows.shape[1]), _to_heads(nsub, q_rows.shape[1])
    ks = ks.reshape(ks.shape[:2] + (1,) * extra + ks.shape[2:])
    ns = ns.reshape(ns.shape[:2] + (1,) * extra + ns.shape[2:])
    logits = scale * qm @ ks.transpose(-1, -2) + ns.log()[..., None, :]  # [B, Hq, *, A, NKB * M]
    ok = visible.repeat_interleave(m, dim=-1)[..., None, :] & (ns > 0)[..., None, :]
    logits = logits.masked_fill(~ok, -math.inf)
    mass = torch.softmax(logits, dim=-1).nan_to_num(0.0).mean(-2).unflatten(-1, (nkb, m)).sum(-1)  # [B, Hq, *, NKB]
    return selection_head_mean(mass, hs)


def selection_head_mean(x: Tensor, hs: int) -> Tensor:
    """``[B, Hq, ...]`` -> ``[B, hs, ...]``: the mean over the query heads of each selection head."""
    return x if x.shape[1] == hs else x.unflatten(1, (hs, x.shape[1] // hs)).mean(2)


def row_means(q_rows: Tensor, rows: int) -> Tensor:
    """``[..., R, D]`` -> ``[..., min(rows, R), D]``: the means of consecutive, near-equal row groups."""
    parts = q_rows.tensor_split(min(rows, q_rows.shape[-2]), dim=-2)
    return torch.stack([p.mean(-2) for p in parts], dim=-2)


def local_mask_rows(visible: Tensor, diag: Tensor, local_blocks: int) -> Tensor:
    """The ``local_blocks`` visible blocks nearest to each query block's diagonal block (ties:
    lower j): ``visible`` [..., nb, NKB], ``diag`` [nb]."""
    nkb = visible.shape[-1]
    if local_blocks == 0:
        return torch.zeros_like(visible)
    j = torch.arange(nkb, device=visible.device)
    key = (j - diag[:, None]).abs() * nkb + j  # distance first, then lower j
    key = torch.where(visible, key, torch.full_like(key, nkb * nkb * 4))
    rank = key.argsort(dim=-1).argsort(dim=-1)
    return visible & (rank < local_blocks)


def _top(score: Tensor, among: Tensor, k: Tensor) -> Tensor:
    """The ``k`` ([B, Hs]) highest scores of ``among`` ([B, Hs, NKB] bool), ties to the lower j."""
    masked = torch.where(among, score, torch.full_like(score, -math.inf))
    rank = torch.sort(masked, dim=-1, descending=True, stable=True).indices.argsort(dim=-1)
    return among & (rank < k[..., None])


# ---------------------------------------------------------------------------------------
# 2. Projector scores and selection
# ---------------------------------------------------------------------------------------


def forced_blocks(visible: Tensor, partial: Tensor, diag: Tensor, cfg: SPAConfig) -> Tensor:
    """The blocks always selected (SPEC.md 2): partially visible, the first ``sink_blocks``
    visible and the ``local_blocks`` visible ones nearest the diagonal. ``visible``, ``partial``
    [..., nb, NKB], ``diag`` [nb] (query block i's diagonal key block)."""
    sink = visible & (visible.cumsum(-1) <= cfg.sink_blocks)
    return partial | sink | local_mask_rows(visible, diag, cfg.local_blocks)


def index_rows(chosen: Tensor, kmax: int) -> tuple[Tensor, Tensor]:
    """The selected set ``chosen`` [..., NKB] as ascending index rows [..., kmax] (int32, -1
    padded) and counts (int32; kmax + 1 where more than kmax were chosen: see
    :func:`check_counts`)."""
    nkb = chosen.shape[-1]
    jj = torch.arange(nkb, device=chosen.device)
    idx = torch.where(chosen, jj, nkb).sort(dim=-1).values[..., :kmax]
    count = torch.clamp(chosen.sum(-1), max=kmax + 1)
    return torch.where(idx < nkb, idx, -1).to(torch.int32), count.to(torch.int32)


def check_counts(count: Tensor, kmax: int) -> None:
    """|S| <= kmax for every query block, checked once for a whole selection (a check per
    query block would sync a GPU once a block): a bug in max_selected, never a silent truncation."""
    if count.numel() and int(count.max()) > kmax:
        raise RuntimeError(f"selected more than {kmax} blocks (the bound) for some query block")


@torch.no_grad()
def select_blocks(
    q: Tensor,
    pooled: Pooled,
    vis: Visibility,
    valid: Tensor,
    scale: float,
    cfg: SPAConfig,
    projector: Projector | None = None,
    block_scores=None,
) -> Selection:
    """Projector scores and the selected set S for every query block (SPEC.md 1-2).

    ``cfg.block_score``: "projector" (SPEC.md) takes the top k by the projector score; "bound" by
    :func:`bound_scores` (needs ``pooled.kmax``/``kmin``: ``pool_blocks(..., extrema=True)``);
    "hybrid" the top ``ceil(k/2)`` by the projector score, then the top ``k - ceil(k/2)`` of the
    remaining blocks by the bound; "fine" by :func:`fine_scores` (needs ``pooled.ksub``/``nsub``:
    :func:`pool_for`). Forced blocks, k and ties (lower j first) are the same for all.

    ``block_scores(t0, t1)`` (optional, for experiments with other scores): the ``[B, Hs, NKB]``
    scores of query rows ``t0:t1`` in place of the projector score."""
    b, hq, nq, d = q.shape
    hkv = pooled.kbar.shape[1]
    g = hq // hkv
    bs = cfg.block_size
    nkb = pooled.kbar.shape[2]
    nqb = num_blocks(nq, bs)
    dt = compute_dtype(q)
    hs = hkv if cfg.selection == "group" else hq
    kmax = int(max_selected(nq, vis.nk, vis, cfg))
    proj = projector or Projector.identity(hkv, d, device=q.device, dtype=dt)
    kp = proj.project_keys(pooled.kbar.to(dt))  # [B, Hkv, NKB, r]
    if hs == hq:
        kp = _to_heads(kp, hq)
    use_bound = cfg.block_score in ("bound", "hybrid")
    fine = cfg.block_score == "fine" and block_scores is None
    if fine:
        if pooled.ksub is None or pooled.nsub is None:
            raise ValueError("block_score='fine' needs the sub-block key means: pool the keys with "
                             "pool_for(cfg, ...) or pool_blocks(..., sub_blocks=cfg.fine_keys)")
        ksub, nsub = proj.project_keys(pooled.ksub.to(dt)), pooled.nsub.to(dt)  # kv heads: fine_scores broadcasts
    if use_bound:
        if pooled.kmax is None or pooled.kmin is None:
            raise ValueError(f"block_score={cfg.block_score!r} needs the key extrema: pool the keys with "
                             f"pool_blocks(..., extrema=True)")
        kmx, kmn = _to_heads(pooled.kmax.to(dt), hq), _to_heads(pooled.kmin.to(dt), hq)
    index = torch.full((b, hs, nqb, kmax), -1, dtype=torch.int32, device=q.device)
    count = torch.zeros((b, hs, nqb), dtype=torch.int32, device=q.device)
    for i in range(nqb):
        t0, t1 = i * bs, min((i + 1) * bs, nq)
        visible_h, full_h = classify_blocks(vis.rows(t0, t1, q.device), valid, bs)
        visible = _to_selection_heads(visible_h, hs)
        partial = _to_selection_heads(visible_h & ~full_h, hs)
        if fine:
            score = fine_scores(q[:, :, t0:t1].to(dt), ksub, nsub, visible_h, cfg.fine_rows, hs, scale, proj)
        elif block_scores is None:
            qbar = q[:, :, t0:t1].to(dt).mean(dim=2)  # [B, Hq, D]
            qp = proj.project_queries(qbar)  # [B, Hq, r]
            if hs == hkv:
                qp = qp.unflatten(1, (hkv, g)).sum(dim=2)
            score = scale * torch.einsum("bhr,bhjr->bhj", qp, kp)
        else:
            score = block_scores(t0, t1).to(dt)
        diag = torch.tensor([min(max((t1 - 1 + vis.offset) // bs, 0), nkb - 1)], device=q.device)
        forced = forced_blocks(visible[..., None, :], partial[..., None, :], diag, cfg)[..., 0, :]
        remaining = visible & ~forced
        k = torch.minimum(topk_count(visible.sum(-1), cfg), remaining.sum(-1))
        if not use_bound:
            chosen = forced | _top(score, remaining, k)
        else:
            k1 = (k + 1) // 2 if cfg.block_score == "hybrid" else torch.zeros_like(k)
            first = _top(score, remaining, k1)
            bound = bound_scores(q[:, :, t0:t1].to(dt), kmx, kmn, hs, scale)
            chosen = forced | first | _top(bound, remaining & ~first, k - k1)
        index[:, :, i], count[:, :, i] = index_rows(chosen, kmax)
    check_counts(count, kmax)
    return Selection(index=index, count=count)


# ---------------------------------------------------------------------------------------
# 3-5. Exact part, landmark fill, output
# ---------------------------------------------------------------------------------------


def _gather_keys(x: Tensor, pos: Tensor) -> Tensor:
    """Rows ``pos`` ([B, Hs, L]) of ``x`` ([B, Hs, N, D]) -> [B, Hs, L, D]."""
    return x.gather(2, pos[..., None].expand(*pos.shape, x.shape[-1]))


def _block_probabilities(qf, kf, kbar, log_n, idx, vis, valid, t0, t1, scale, fill, bs):
    """Softmax of one query block over its exact keys and pseudo-keys (SPEC.md 3-5).

    qf ``[B, Hq, Nq, D]``; kf ``[B, Hs, Nk, D]``; kbar/log_n per query head; idx ``[B, Hs, kmax]``.
    Returns p ``[B, Hq, R, L (+ NKB)]``, lse and seen_any ``[B, Hq, R, 1]`` (lse is finite
    everywhere, so gradients stay NaN-free; rows with ``~seen_any`` see nothing), the gathered
    key positions ``pos`` ``[B, Hs, L]`` and ``slot``, False where a position is padding.
    """
    b, hq, _, _ = qf.shape
    hs, nk = kf.shape[1], kf.shape[2]
    gs = hq // hs
    r = t1 - t0
    pos = (idx[..., None] * bs + torch.arange(bs, device=qf.device)).flatten(-2)
    slot = (idx[..., None] >= 0).expand(*idx.shape, bs).flatten(-2) & (pos < nk)
    pos = pos.clamp(0, nk - 1)
    qi = qf[:, :, t0:t1]
    exact = torch.einsum("bsgrd,bsld->bsgrl", qi.unflatten(1, (hs, gs)), _gather_keys(kf, pos)) * scale
    rows = vis.rows(t0, t1, qf.device)
    rows_h = rows.expand(b, hq if rows.shape[1] > 1 else 1, r, nk)
    seen = rows_h.unsqueeze(1) if rows_h.shape[1] == 1 else rows_h.unflatten(1, (hs, gs))
    seen = seen.expand(b, hs, gs, r, nk).gather(-1, pos[:, :, None, None, :].expand(b, hs, gs, r, pos.shape[-1]))
    parts = [exact.masked_fill(~(seen & slot[:, :, None, None, :]), -math.inf).flatten(1, 2)]
    if fill == "landmark":
        _, full = classify_blocks(rows, valid, bs)  # [B, 1|Hq, NKB]
        chosen = torch.zeros(b, hs, kbar.shape[2] + 1, dtype=torch.bool, device=qf.device)
        chosen.scatter_(2, torch.where(idx >= 0, idx, kbar.shape[2]), True)
        use = _to_heads(full, hq) & ~_to_heads(chosen[..., :-1], hq) & (log_n > -math.inf)
        pseudo = torch.einsum("bhrd,bhjd->bhrj", qi, kbar) * scale + log_n[:, :, None]
        parts.append(pseudo.masked_fill(~use[:, :, None], -math.inf))
    logits = torch.cat(parts, dim=-1)
    seen_any = (logits > -math.inf).any(dim=-1, keepdim=True)
    lse = torch.logsumexp(torch.where(seen_any, logits, torch.zeros_like(logits)), dim=-1, keepdim=True)
    p = torch.where(seen_any, (logits - lse).exp(), torch.zeros_like(logits))
    return p, lse, seen_any, pos, slot


def sparse_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    selection: Selection,
    pooled: Pooled,
    vis: Visibility,
    valid: Tensor,
    scale: float,
    fill: str,
    block_size: int,
) -> tuple[Tensor, Tensor]:
    """Exact attention on the selected blocks plus the landmark fill (SPEC.md 3-5).

    Differentiable in q, k, v (also through ``pooled``) with the selection fixed.
    Returns the output ``[B, Hq, Nq, Dv]`` in q's dtype and the lse ``[B, Hq, Nq]``.
    """
    hq, nq = q.shape[1], q.shape[2]
    hkv = k.shape[1]
    hs = selection.index.shape[1]
    gs = hq // hs
    bs = block_size
    dt = compute_dtype(q)
    qf, kf, vf = q.to(dt), k.to(dt), v.to(dt)
    if hs != hkv:  # per-head selection: every query head gathers from its own copy
        kf, vf = _to_heads(kf, hs), _to_heads(vf, hs)
    kbar, vbar = _to_heads(pooled.kbar.to(dt), hq), _to_heads(pooled.vbar.to(dt), hq)
    log_n = _to_heads(pooled.count.to(dt), hq).log()  # -inf for empty blocks
    outs, lses = [], []
    for i in range(num_blocks(nq, bs)):
        t0, t1 = i * bs, min((i + 1) * bs, nq)
        idx = selection.index[:, :, i].long()  # [B, Hs, kmax]
        p, lse, seen_any, pos, _ = _block_probabilities(qf, kf, kbar, log_n, idx, vis, valid, t0, t1, scale, fill, bs)
        L = pos.shape[-1]
        vi = _gather_keys(vf, pos)  # [B, Hs, L, Dv]
        o = torch.einsum("bsgrl,bsld->bsgrd", p[..., :L].unflatten(1, (hs, gs)), vi).flatten(1, 2)
        if fill == "landmark":
            o = o + torch.einsum("bhrj,bhjd->bhrd", p[..., L:], vbar)
        outs.append(o)
        lses.append(torch.where(seen_any, lse, torch.full_like(lse, -math.inf)).squeeze(-1))
    return torch.cat(outs, dim=2).to(q.dtype), torch.cat(lses, dim=2)


# ---------------------------------------------------------------------------------------
# The whole function
# ---------------------------------------------------------------------------------------


def canonical_inputs(q: Tensor, k: Tensor, v: Tensor, enable_gqa: bool) -> tuple[Tensor, Tensor, Tensor]:
    """Check SDPA-style inputs and bring them to ``[B, H, N, D]``."""
    for name, x in (("q", q), ("k", k), ("v", v)):
        if x.dim() not in (3, 4):
            raise ValueError(f"{name} must be [B, H, N, D] or [B*H, N, D], got shape {tuple(x.shape)}")
        if not x.is_floating_point():
            raise TypeError(f"{name} must be a floating-point tensor, got {x.dtype}")
    if not (q.dim() == k.dim() == v.dim()):
        raise ValueError("q, k and v must have the same number of dims")
    if q.dim() == 3:
        q, k, v = q.unsqueeze(1), k.unsqueeze(1), v.unsqueeze(1)
    if q.shape[0] != k.shape[0] or k.shape[:3] != v.shape[:3]:
        raise ValueError(f"shapes do not line up: q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}")
    if q.shape[-1] != k.shape[-1]:
        raise ValueError(f"q and k head dims differ: {q.shape[-1]} vs {k.shape[-1]}")
    hq, hkv = q.shape[1], k.shape[1]
    if hq != hkv:
        if not enable_gqa:
            raise ValueError(
                f"q has {hq} heads but k/v have {hkv}: pass enable_gqa=True for grouped-query attention"
            )
        if hq % hkv:
            raise ValueError(f"q heads ({hq}) must be a multiple of k/v heads ({hkv})")
    return q, k, v


def spa_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    attn_mask: Tensor | None = None,
    is_causal: bool = False,
    scale: float | None = None,
    enable_gqa: bool = False,
    *,
    config: SPAConfig | None = None,
    projector: Projector | None = None,
    return_lse: bool = False,
    visibility: Visibility | None = None,
):
    """SPA with the signature of ``F.scaled_dot_product_attention`` (pure PyTorch).

    ``visibility`` replaces ``attn_mask``/``is_causal`` with a structured predicate
    (causal offset, window, key padding) when given.
    """
    cfg = config or SPAConfig()
    squeeze = q.dim() == 3
    q, k, v = canonical_inputs(q, k, v, enable_gqa)
    nq, nk = q.shape[2], k.shape[2]
    vis = visibility if visibility is not None else from_sdpa(attn_mask, is_causal, nq, nk)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    valid = valid_keys(vis, q.shape[0], k.shape[1], cfg.block_size, q.device)
    pooled = pool_for(cfg, k, v, valid)
    detached = Pooled(pooled.kbar.detach(), pooled.vbar.detach(), pooled.count, pooled.kmax, pooled.kmin,
                      pooled.ksub, pooled.nsub)
    sel = select_blocks(q.detach(), detached, vis, valid, scale, cfg, projector)
    out, lse = sparse_attention(q, k, v, sel, pooled, vis, valid, scale, cfg.fill, cfg.block_size)
    if squeeze:
        out, lse = out.squeeze(1), lse.squeeze(1)
    return (out, lse) if return_lse else out


# ---------------------------------------------------------------------------------------
# Backward with the selection held fixed
# ---------------------------------------------------------------------------------------


def sparse_attention_backward(
    grad_out: Tensor,
    grad_lse: Tensor | None,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    selection: Selection,
    vis: Visibility,
    valid: Tensor,
    scale: float,
    fill: str,
    block_size: int,
) -> tuple[Tensor, Tensor, Tensor]:
    """dq, dk, dv of :func:`sparse_attention`, by the FlashAttention recurrences.

    Block by block over queries: recompute the probabilities P of the exact keys
    and pseudo-keys, ``dS = P * (dO V^T - rowsum(dO * O) + dlse)``, then
    ``dq = s dS K``, ``dK += s dS^T q``, ``dV += P^T dO``. The pseudo-keys' share
    goes to kbar/vbar and from there, divided by n, to every valid key and value
    of the block.
    """
    dt = compute_dtype(q)
    pooled = pool_blocks(k, v, valid, block_size)
    b, hq, nq, _ = q.shape
    hkv, nk = k.shape[1], k.shape[2]
    hs = selection.index.shape[1]
    gs = hq // hs
    bs = block_size
    qf, kf, vf, go = q.to(dt), k.to(dt), v.to(dt), grad_out.to(dt)
    if hs != hkv:
        kf, vf = _to_heads(kf, hs), _to_heads(vf, hs)
    kbar, vbar = _to_heads(pooled.kbar, hq), _to_heads(pooled.vbar, hq)
    log_n = _to_heads(pooled.count, hq).log()
    dq = torch.zeros_like(qf)
    dk, dv = torch.zeros_like(kf), torch.zeros_like(vf)
    dkbar, dvbar = torch.zeros_like(kbar), torch.zeros_like(vbar)
    for i in range(num_blocks(nq, bs)):
        t0, t1 = i * bs, min((i + 1) * bs, nq)
        idx = selection.index[:, :, i].long()
        p, _, seen_any, pos, slot = _block_probabilities(qf, kf, kbar, log_n, idx, vis, valid, t0, t1, scale, fill, bs)
        L = pos.shape[-1]
        qi = qf[:, :, t0:t1]
        ki, vi = _gather_keys(kf, pos), _gather_keys(vf, pos)  # [B, Hs, L, D]
        gi = go[:, :, t0:t1]  # [B, Hq, R, Dv]
        gi_s = gi.unflatten(1, (hs, gs))
        dp = torch.einsum("bsgrd,bsld->bsgrl", gi_s, vi).flatten(1, 2)
        if fill == "landmark":
            dp = torch.cat([dp, torch.einsum("bhrd,bhjd->bhrj", gi, vbar)], dim=-1)
        o = (p[..., :L].unflatten(1, (hs, gs)) @ vi.unsqueeze(2)).flatten(1, 2)
        if fill == "landmark":
            o = o + p[..., L:] @ vbar
        delta = (gi * o).sum(-1, keepdim=True)
        if grad_lse is not None:
            delta = delta - torch.where(seen_any, grad_lse[:, :, t0:t1, None].to(dt), torch.zeros_like(delta))
        ds = p * (dp - delta)
        ds_e = ds[..., :L].unflatten(1, (hs, gs))
        dq[:, :, t0:t1] = scale * torch.einsum("bsgrl,bsld->bsgrd", ds_e, ki).flatten(1, 2)
        dki = scale * torch.einsum("bsgrl,bsgrd->bsld", ds_e, qi.unflatten(1, (hs, gs)))
        dvi = torch.einsum("bsgrl,bsgrd->bsld", p[..., :L].unflatten(1, (hs, gs)), gi_s)
        live = slot[..., None].to(dt)  # padding slots point at a clamped key: drop them
        dk.scatter_add_(2, pos[..., None].expand_as(dki), dki * live)
        dv.scatter_add_(2, pos[..., None].expand_as(dvi), dvi * live)
        if fill == "landmark":
            ds_f, p_f = ds[..., L:], p[..., L:]
            dq[:, :, t0:t1] += scale * ds_f @ kbar
            dkbar += scale * ds_f.transpose(-1, -2) @ qi
            dvbar += p_f.transpose(-1, -2) @ gi
    if hs != hkv:  # fold per-head copies back onto the kv heads
        dk = dk.unflatten(1, (hkv, hs // hkv)).sum(2)
        dv = dv.unflatten(1, (hkv, hs // hkv)).sum(2)
    if fill == "landmark":
        g = hq // hkv
        dkbar = dkbar.unflatten(1, (hkv, g)).sum(2)
        dvbar = dvbar.unflatten(1, (hkv, g)).sum(2)
        w = (valid.to(dt) / pooled.count.clamp(min=1).repeat_interleave(bs, dim=2)[..., :nk])[..., None]
        dk = dk + dkbar.repeat_interleave(bs, dim=2)[:, :, :nk] * w
        dv = dv + dvbar.repeat_interleave(bs, dim=2)[:, :, :nk] * w
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)
