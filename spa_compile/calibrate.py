"""Projector calibration: fit every site's ``Pq``/``Pk`` on the user's own batches.

    report = spa_compile.calibrate(model, batches, config={"block_size": 64, "density": 0.2},
                                   steps=200, out="projectors.safetensors")
    print(report)                      # block recall and output error per site: pooled / fitted / oracle
    model = torch.compile(model, backend="spa", options={..., "projectors": "projectors.safetensors"})

How it works (SPEC.md section 1 and "Gradients"):

1. **Collect.** The model runs once per batch under ``torch.compile`` with a *calibration
   backend*: the SPA passes find, analyse and rewrite the attention sites exactly as the
   ``"spa"`` backend does (same site names, same recovered mask structure, same GQA
   folding), then every rewritten op is replaced by a tap that computes **dense**
   attention block by block and records, per site, the query block means (summed over each
   kv group), the key block means, and the true block attention mass ``A`` with the
   visibility of every (query block, key block) pair. Nothing of size ``Nq x Nk`` is built:
   a chunk of query blocks' logits at a time, within a memory budget (:func:`block_stats`).
2. **Fit.** Per site, ``Pq``/``Pk`` start from the identity (``r = D``; a PCA start for a
   smaller rank) and minimise ``KL(A || softmax(score))`` over the visible blocks with Adam,
   keeping the state with the best loss on held-out query blocks.
3. **Evaluate.** A second pass over the evaluation batches (the calibration batches unless
   ``eval_batches`` is given) measures, per site, the block recall (share of ``A`` the
   selection covers) at the configured budget and the relative error of the attention output
   against dense, for the pooled (identity) projector, the fitted one and the oracle selection
   (the true top-k blocks, with the same forced blocks and the same k).

Why a backend pass rather than forward hooks: q and k are internal to the attention modules
(after RoPE, head reshapes, GQA expansion), so hooks would need per-architecture code, and
their names would not be the site names the backend later attaches projectors to. The
calibration backend reuses the site finder and the rewrite, so what is calibrated is exactly
what runs.
"""

from __future__ import annotations

import contextlib
import functools
import json
import math
import os
import sys
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Iterable, Mapping

import torch
from torch import Tensor

from . import ops, reference
from .config import SPAConfig
from .projector import Projector, block_scores, distillation_loss, pca_init
from .projector_file import ProjectorFile, SiteShape, save_projectors
from .visibility import BiasMaskError, Visibility, num_blocks

METHODS = ("pooled", "fitted", "oracle")


# ---------------------------------------------------------------------------------------
# Block statistics of one attention call (shared with training_alongside)
# ---------------------------------------------------------------------------------------


def visibility_from_args(q, k, attn_mask, key_valid, causal, offset, window) -> Visibility:
    """The op's visibility arguments as a :class:`Visibility` (raises BiasMaskError for a bias)."""
    return ops._visibility(q.shape[2], k.shape[2], attn_mask, key_valid, causal, offset, window, check_bias=True)


def valid_keys(vis: Visibility, batch: int, hkv: int, block: int, device) -> Tensor:
    """``reference.valid_keys``, in closed form for structured visibility (no loop over query blocks)."""
    if vis.mask is not None:
        return reference.valid_keys(vis, batch, hkv, block, device)
    u = torch.arange(vis.nk, device=device)
    ok = torch.ones(vis.nk, dtype=torch.bool, device=device)
    if vis.nq == 0:
        ok = ok & False
    elif vis.causal and vis.window is not None:  # some t in [max(0, u-off), min(nq-1, u-off+w-1)]
        lo = (u - vis.offset).clamp_min(0)
        hi = (u - vis.offset + vis.window - 1).clamp_max(vis.nq - 1)
        ok = lo <= hi
    elif vis.causal:
        ok = u <= vis.nq - 1 + vis.offset
    elif vis.window is not None:
        ok = u > vis.offset - vis.window
    valid = ok[None, None].expand(batch, hkv, vis.nk)
    if vis.key_valid is not None:
        valid = valid & vis.key_valid.to(device=device, dtype=torch.bool)[:, None, :]
    return valid.contiguous()


@dataclass
class BlockStats:
    """Per-site statistics of one batch, for the query blocks ``blocks``.

    ``qsel`` [B, Hs, nb, D] query block means (summed over the query heads of a group when the
    selection is per group); ``kbar`` [B, Hkv, NKB, D]; ``target`` [B, Hs, nb, NKB] the block
    attention mass A (rows sum to 1 over visible blocks); ``visible`` [B, Hs, nb, NKB].
    """

    qsel: Tensor
    kbar: Tensor
    target: Tensor
    visible: Tensor
    forced: Tensor  # [B, Hs, nb, NKB]: partial, sink and local blocks (always selected, SPEC.md 2)
    blocks: list[int]
    out: Tensor | None = None  # dense attention output [B, Hq, Nq, Dv] when asked for
    # block_score "fine" (the fit then scores by reference.fine_scores): the fine_rows row means
    # [B, Hq, nb, A, D] of each query block, False in fine_ok [B, Hs, nb] for a block with fewer
    # rows than A (left out of the fine loss), and the sub-block key means and counts of the call
    qrows: Tensor | None = None
    fine_ok: Tensor | None = None
    ksub: Tensor | None = None  # [B, Hkv, NKB * M, D]
    nsub: Tensor | None = None  # [B, Hkv, NKB * M]

    def loss_target(self, loss_blocks: str) -> tuple[Tensor, Tensor]:
        """(target, blocks the loss runs over): all visible blocks (SPEC.md), or only those the
        top-k chooses among (``"selectable"``: visible and not forced, target renormalised)."""
        if loss_blocks == "visible":
            return self.target, self.visible
        keep = self.visible & ~self.forced
        t = self.target * keep
        return t / t.sum(-1, keepdim=True).clamp_min(1e-30), keep


#: Default memory budget of one chunk's logits ``[B, Hkv, G, rows, Nk]`` in :func:`block_stats`
#: on an accelerator, where fewer, larger chunks mean fewer launches. The softmax, the output
#: and the block sums add temporaries of up to the same size, so the peak is a small multiple.
CHUNK_BYTES = 256 << 20
#: The same on CPU, where the work is compute- and cache-bound rather than launch-bound:
#: chunks that stay near the cache run faster (4K tokens, 16 heads: one 64-row block a chunk).
CHUNK_BYTES_CPU = 8 << 20


def chunk_blocks_for(b: int, hq: int, nk: int, block: int, dtype: torch.dtype,
                     chunk_bytes: int = CHUNK_BYTES) -> int:
    """Query blocks per chunk so that a chunk's logits (``b * hq * rows * nk`` elements of
    ``dtype``) stay within ``chunk_bytes``; at least 1."""
    row_bytes = max(b * hq * nk, 1) * torch.empty((), dtype=dtype).element_size()
    return max(1, chunk_bytes // (row_bytes * block))


def _chunks(blocks: list[int], nq: int, bs: int, per_chunk: int) -> list[list[int]]:
    """``blocks`` in order, cut into chunks of at most ``per_chunk`` blocks with the same row
    count (the partial last query block, if any, goes alone)."""
    out: list[list[int]] = []
    rows_of = lambda i: min((i + 1) * bs, nq) - i * bs  # noqa: E731
    for i in blocks:
        if out and len(out[-1]) < per_chunk and rows_of(out[-1][0]) == rows_of(i):
            out[-1].append(i)
        else:
            out.append([i])
    return out


def block_stats(
    q: Tensor, k: Tensor, v: Tensor, vis: Visibility, scale: float, cfg: SPAConfig,
    blocks: Iterable[int] | None = None, with_output: bool = False,
    valid: Tensor | None = None, kbar: Tensor | None = None,
    chunk_blocks: int | None = None, chunk_bytes: int | None = None,
) -> BlockStats:
    """Dense attention summarised by blocks, several query blocks at a time (never Nq x Nk).

    The query blocks ``blocks`` (default all; any order, a subset allowed) are processed in
    chunks of ``chunk_blocks`` blocks. By default a chunk holds as many blocks as keep its logits
    ``[B, Hkv, G, rows, Nk]`` within ``chunk_bytes`` (default :data:`CHUNK_BYTES`, 256 MiB, on
    an accelerator; :data:`CHUNK_BYTES_CPU`, 8 MiB, on CPU). A chunk of consecutive blocks reads
    its visibility rows in one call; the partial last block goes alone. The result is what the
    former block-by-block loop gave (tests/test_calibrate.py keeps that loop as the oracle): the
    same dtype (``reference.compute_dtype``), masks, forced blocks and zero rows for queries that
    see nothing, up to float rounding in the matmuls.

    Why: the loop cost about 55 ops per query block, which made the calibration "measure" phase
    launch-bound on a GPU. For B=1, Hkv=2 x G=8, D=64, 4K causal tokens, block 64 with the output,
    one call ran 3542 ops before and 263 now at the 256 MiB budget (4 chunks of 16 blocks); no GPU
    timing yet. On CPU (1 thread, process time, a loaded 2-core machine) the same call took
    3.0 s before and 1.8 s now (Hq=8: 1.3 s -> 0.9 s). That gain comes from adding the mask as a
    bias instead of a broadcast ``masked_fill``, not from chunking: on CPU larger chunks were
    slower (16 blocks a chunk: 2.4 s), hence the small CPU budget.
    """
    b, hq, nq, d = q.shape
    hkv, nk = k.shape[1], k.shape[2]
    g = hq // hkv
    bs = cfg.block_size
    hs = hkv if cfg.selection == "group" else hq
    nkb = num_blocks(nk, bs)
    dt = reference.compute_dtype(q)
    if valid is None:
        valid = valid_keys(vis, b, hkv, bs, q.device)
    if kbar is None:
        kbar = reference.pool_blocks(k, v, valid, bs).kbar
    valid = valid.expand(b, hkv, nk)
    blocks = list(range(num_blocks(nq, bs))) if blocks is None else [int(i) for i in blocks]
    if chunk_blocks is None:
        if chunk_bytes is None:
            chunk_bytes = CHUNK_BYTES_CPU if q.device.type == "cpu" else CHUNK_BYTES
        chunk_blocks = chunk_blocks_for(b, hq, nk, bs, dt, chunk_bytes)
    kf, vf = k.to(dt), v.to(dt)
    pad = nkb * bs - nk
    out = torch.empty(b, hq, nq, v.shape[-1], dtype=q.dtype, device=q.device) if with_output else None
    qsels, targets, visibles, forceds = [], [], [], []
    fine = cfg.block_score == "fine"
    qrowss, fine_oks = [], []
    for chunk in _chunks(blocks, nq, bs, max(int(chunk_blocks), 1)):
        nb = len(chunk)
        r = min((chunk[0] + 1) * bs, nq) - chunk[0] * bs  # rows per block, the same for the chunk
        t0 = chunk[0] * bs
        if chunk == list(range(chunk[0], chunk[0] + nb)):  # consecutive: one row range
            idx = None
            blk = torch.arange(chunk[0], chunk[0] + nb, device=q.device)  # no host-to-device copy
            qi = q[:, :, t0:t0 + nb * r].to(dt)
            rows = vis.rows(t0, t0 + nb * r, q.device)  # [B|1, Hm|1, nb*R, Nk]
        else:
            blk = torch.tensor(chunk, device=q.device)
            idx = (blk[:, None] * bs + torch.arange(r, device=q.device)).flatten()
            qi = q.index_select(2, idx).to(dt)
            rows = torch.cat([vis.rows(i * bs, i * bs + r, q.device) for i in chunk], dim=2)
        rows_h = rows if rows.shape[1] == 1 else rows.unflatten(1, (hkv, g))
        rows_h = rows_h.unsqueeze(1) if rows.shape[1] == 1 else rows_h  # [B|1, 1|Hkv, 1|G, nb*R, Nk]
        # rows that see nothing keep finite logits (no NaN) and get p = 0: what masking them to
        # -inf, zeroing their logits and zeroing p gave, without a broadcast masked_fill on the logits
        seen = rows_h.any(-1, keepdim=True)  # [B|1, 1|Hkv, 1|G, nb*R, 1]
        bias = torch.full(rows_h.shape, -math.inf, dtype=dt, device=q.device).masked_fill_(rows_h | ~seen, 0.0)
        logits = torch.einsum("bhgrd,bhud->bhgru", qi.unflatten(1, (hkv, g)), kf)
        logits.mul_(scale).add_(bias)
        p = torch.softmax(logits, dim=-1)
        del logits, bias
        seen = seen.expand(b, hkv, g, nb * r, 1).to(dt)
        p.mul_(seen)
        if with_output:
            o = torch.einsum("bhgru,bhud->bhgrd", p, vf).flatten(1, 2).to(q.dtype)
            if idx is None:
                out[:, :, t0:t0 + nb * r] = o
            else:
                out[:, :, idx] = o
        padded = torch.nn.functional.pad(p, (0, pad)) if pad else p
        mass = padded.unflatten(-1, (nkb, bs)).sum(-1)  # [B, Hkv, G, nb*R, NKB]
        del padded
        del p
        live = seen.unflatten(3, (nb, r))
        a = (mass.unflatten(3, (nb, r)) * live).sum(4) / live.sum(4).clamp_min(1)  # [B, Hkv, G, nb, NKB]
        qbar = qi.unflatten(2, (nb, r)).mean(dim=3)  # [B, Hq, nb, D]
        if hs == hkv:
            a, qsel = a.mean(2), qbar.unflatten(1, (hkv, g)).sum(2)
        else:
            a, qsel = a.flatten(1, 2), qbar
        visible_h, full_h = reference.classify_chunk(rows, valid, nb, bs)  # [B, Hm, nb, NKB]
        visible = reference._to_selection_heads(visible_h, hs).expand(b, hs, nb, nkb)
        partial = reference._to_selection_heads(visible_h & ~full_h, hs).expand(b, hs, nb, nkb)
        # the forced blocks exactly as reference.select_blocks forms them
        diag = torch.div(blk * bs + (r - 1 + vis.offset), bs, rounding_mode="floor").clamp(0, nkb - 1)
        forceds.append(reference.forced_blocks(visible, partial, diag, cfg))
        visibles.append(visible)
        targets.append(a)
        qsels.append(qsel)
        if fine:
            nr = cfg.fine_rows
            qrowss.append(reference.row_means(qi.unflatten(2, (nb, r)), nr) if r >= nr
                          else qi.new_zeros(b, hq, nb, nr, d))
            fine_oks.append(torch.full((b, hs, nb), r >= nr, dtype=torch.bool, device=q.device))
    cat = lambda xs, shape: torch.cat(xs, 2) if xs else torch.zeros(shape)  # noqa: E731
    st = BlockStats(
        qsel=cat(qsels, (b, hs, 0, d)), kbar=kbar.to(dt), target=cat(targets, (b, hs, 0, nkb)),
        visible=cat(visibles, (b, hs, 0, nkb)).bool(), forced=cat(forceds, (b, hs, 0, nkb)).bool(),
        blocks=blocks, out=out,
    )
    if fine:
        sub = reference.pool_blocks(k.detach(), k.detach()[..., :1], valid, bs, sub_blocks=cfg.fine_keys)
        st.qrows = cat(qrowss, (b, hq, 0, cfg.fine_rows, d))
        st.fine_ok = cat(fine_oks, (b, hs, 0)).bool()
        st.ksub, st.nsub = sub.ksub.to(dt), sub.nsub.to(dt)
    return st


def selection_mask(sel: reference.Selection, nkb: int) -> Tensor:
    """Bool ``[B, Hs, NQB, NKB]``: the blocks a selection picked."""
    idx = sel.index.long()
    mask = torch.zeros(*idx.shape[:3], nkb + 1, dtype=torch.bool, device=idx.device)
    mask.scatter_(3, torch.where(idx >= 0, idx, nkb), True)
    return mask[..., :nkb]


def oracle_selection(
    target: Tensor, visible: Tensor, forced: Tensor, budget: Tensor, width: int
) -> reference.Selection:
    """The forced blocks plus, per query block, the ``budget`` remaining visible blocks of largest
    true mass (ties: lower j): the best any projector could pick with the same k."""
    nkb = target.shape[-1]
    remaining = visible & ~forced
    masked = torch.where(remaining, target, torch.full_like(target, -1.0))
    order = torch.sort(masked, dim=-1, descending=True, stable=True).indices
    rank = order.argsort(dim=-1)
    chosen = forced | (remaining & (rank < budget[..., None]))
    jj = torch.arange(nkb, device=target.device)
    idx = torch.where(chosen, jj, nkb).sort(dim=-1).values
    if idx.shape[-1] < width:
        idx = torch.nn.functional.pad(idx, (0, width - idx.shape[-1]), value=nkb)
    idx = idx[..., :width]
    return reference.Selection(
        index=torch.where(idx < nkb, idx, -1).to(torch.int32), count=chosen.sum(-1).to(torch.int32)
    )


# ---------------------------------------------------------------------------------------
# The calibration backend: the SPA passes, then taps in place of the op
# ---------------------------------------------------------------------------------------


def _tap_backend(gm, example_inputs, *, cfg: SPAConfig, tap: Callable):
    from .backend import apply_spa_passes
    from .passes.attach_projectors import SITE_META, spa_nodes

    apply_spa_passes(gm, cfg)
    for node in spa_nodes(gm):
        node.target = tap
        node.args = (node.meta[SITE_META], *node.args[:12])
        node.kwargs = {}
    gm.graph.lint()
    gm.recompile()
    return gm.forward


def _split_batch(batch) -> tuple[tuple, dict]:
    """A batch is a tensor (one positional argument), a dict (keyword arguments), a tuple/list of
    positional arguments, or a pair ``(args_tuple, kwargs_dict)``."""
    if isinstance(batch, Mapping):
        return (), dict(batch)
    if isinstance(batch, (tuple, list)):
        if len(batch) == 2 and isinstance(batch[0], (tuple, list)) and isinstance(batch[1], Mapping):
            return tuple(batch[0]), dict(batch[1])
        return tuple(batch), {}
    return (batch,), {}


def run_with_taps(model: Callable, batches: Iterable, cfg: SPAConfig, tap: Callable, progress=None,
                  outputs: list | None = None) -> int:
    """Run ``model`` on every batch with ``tap`` in place of each SPA site; returns the batch count
    (the model's outputs go to ``outputs`` when given)."""
    from .explain import _isolated_dynamo

    backend = functools.partial(_tap_backend, cfg=cfg, tap=tap)
    compiled = torch.compile(model, backend=backend, dynamic=False)
    n = 0
    with _isolated_dynamo(), torch.no_grad():
        for batch in batches:
            args, kwargs = _split_batch(batch)
            result = compiled(*args, **kwargs)
            if outputs is not None:
                outputs.append(result)
            n += 1
            if progress is not None:
                progress.update(1)
    return n


def _capture_config(cfg: SPAConfig) -> SPAConfig:
    # every site that can take SPA is calibrated (the user's per-site "dense" overrides hold);
    # the taps run in Python, and no projector is attached while calibrating
    return cfg.replace(mode="spa", projectors=None, inner_backend="eager")


# ---------------------------------------------------------------------------------------
# Fitting
# ---------------------------------------------------------------------------------------

LOSS_BLOCKS = ("visible", "selectable")


@dataclass
class SiteData:
    shape: SiteShape
    scale: float
    stats: list[BlockStats] = field(default_factory=list)

    @property
    def query_blocks(self) -> int:
        return sum(int(s.visible.any(-1).sum()) for s in self.stats)


def _merged(stats: list[BlockStats]) -> list[BlockStats]:
    """Batches with the same block counts concatenated along the batch dim: one einsum per step."""
    groups: dict[tuple, list[BlockStats]] = {}
    for st in stats:
        fine = None if st.qrows is None else (tuple(st.qrows.shape[1:]), tuple(st.ksub.shape[1:]))
        groups.setdefault((tuple(st.qsel.shape[1:]), tuple(st.kbar.shape[1:]), fine), []).append(st)
    out = []
    for group in groups.values():
        if len(group) == 1:
            out.append(group[0])
            continue
        cat = lambda name: torch.cat([getattr(g, name) for g in group])  # noqa: E731
        merged = BlockStats(cat("qsel"), cat("kbar"), cat("target"), cat("visible"), cat("forced"), group[0].blocks)
        if group[0].qrows is not None:
            merged.qrows, merged.fine_ok = cat("qrows"), cat("fine_ok")
            merged.ksub, merged.nsub = cat("ksub"), cat("nsub")  # valid keys are per (batch, kv head)
        out.append(merged)
    return out


def _scores(proj: Projector, s: BlockStats, scale: float) -> Tensor:
    """What the selection ranks by: the projector score of the block means, or for block_score
    "fine" (``s.qrows`` recorded) the log of reference.fine_scores (a distribution over the
    visible blocks, so the KL of SPEC.md applies unchanged)."""
    if s.qrows is None:
        return block_scores(proj, s.qsel, s.kbar, scale)
    hq, hs = s.qrows.shape[1], s.visible.shape[1]
    vis_q = s.visible if hs == hq else reference._to_heads(s.visible, hq)  # a group's visibility per head
    mass = reference.fine_scores(s.qrows, proj.project_keys(s.ksub), s.nsub, vis_q, s.qrows.shape[-2], hs, scale, proj)
    return mass.clamp_min(1e-30).log()


def _live(s: BlockStats, target: Tensor, blocks: Tensor) -> Tensor:
    live = blocks.any(-1) & (target.sum(-1) > 0)
    return live if s.fine_ok is None else live & s.fine_ok


def _loss(proj: Projector, stats: list[BlockStats], scale: float, masks: list[Tensor] | None,
          loss_blocks: str) -> Tensor:
    total, rows = 0.0, 0
    for j, s in enumerate(stats):
        score = _scores(proj, s, scale)
        tgt, blocks = s.loss_target(loss_blocks)
        per_row = distillation_loss(score, tgt, blocks, reduction="none")
        live = _live(s, tgt, blocks)
        if masks is not None:
            live = live & masks[j].to(live.device)
        total = total + (per_row * live).sum()
        rows += int(live.sum())
    return total / max(rows, 1)


def _recall(proj: Projector, stats: list[BlockStats], scale: float, masks: list[Tensor] | None,
            cfg: SPAConfig) -> float:
    """Block recall of ``proj`` on the recorded query blocks at ``cfg``'s budget: the forced blocks
    plus the top-k remaining visible blocks by score, k as in reference.select_blocks."""
    from .budget import topk_count

    total, rows = 0.0, 0
    for j, s in enumerate(stats):
        score = _scores(proj, s, scale)
        remaining = s.visible & ~s.forced
        k = torch.minimum(topk_count(s.visible.sum(-1), cfg), remaining.sum(-1))
        masked = torch.where(remaining, score, torch.full_like(score, -math.inf))
        order = torch.sort(masked, dim=-1, descending=True, stable=True).indices
        chosen = s.forced | (remaining & (order.argsort(dim=-1) < k[..., None]))
        live = _live(s, s.target, s.visible)
        if masks is not None:
            live = live & masks[j].to(live.device)
        total += float(((s.target * chosen).sum(-1) * live).sum())
        rows += int(live.sum())
    return total / max(rows, 1)


def fit_projector(
    data: SiteData, rank: int | None = None, steps: int = 200, lr: float = 1e-2,
    holdout: float = 0.1, seed: int = 0, progress=None, init: Projector | None = None,
    loss_blocks: str = "visible", select_on: SPAConfig | None = None,
) -> tuple[Projector, dict[str, float]]:
    """Fit one site's projector by the KL loss of SPEC.md; returns it and the losses.

    ``loss_blocks``: "visible" (SPEC.md: KL over every visible block) or "selectable" (only the
    blocks the top-k chooses among, the forced ones left out). A share ``holdout`` of the query
    blocks is kept out of the fit. The state returned is the one with the best held-out block
    recall at ``select_on``'s budget (the config the projectors are for), the starting point
    included, so a fit never selects worse than the pooled projector on held-out blocks; without
    ``select_on``, the one with the lowest held-out loss.
    """
    if loss_blocks not in LOSS_BLOCKS:
        raise ValueError(f"loss_blocks must be one of {LOSS_BLOCKS}, got {loss_blocks!r}")
    hkv, d = data.shape.hkv, data.shape.d
    r = d if rank is None else int(rank)
    if not 1 <= r <= d:
        raise ValueError(f"rank must be in [1, D={d}], got {rank}")
    device = data.stats[0].qsel.device
    if init is not None:
        start = init.to(device, torch.float32)
    elif r == d:
        start = Projector.eye(hkv, d, device=device)
    else:
        qs = torch.cat([s.qsel.permute(0, 2, 1, 3).flatten(0, 1) for s in data.stats])
        ks = torch.cat([s.kbar.permute(0, 2, 1, 3).flatten(0, 1) for s in data.stats])
        start = pca_init(qs.float(), ks.float(), r, hkv)
    stats = _merged(data.stats)
    scale = data.scale
    gen = torch.Generator().manual_seed(seed)
    train, held = [], []
    for s in stats:
        m = torch.rand(s.visible.shape[:3], generator=gen) < holdout
        held.append(m)
        train.append(~m)
    if not any(bool(m.any()) for m in held):
        held = train  # too few query blocks to hold any out: select on the training loss
    pq = start.pq.detach().clone().float().requires_grad_(True)
    pk = start.pk.detach().clone().float().requires_grad_(True)
    opt = torch.optim.Adam([pq, pk], lr=lr)
    def quality(p: Projector) -> tuple[float, float]:  # higher is better
        h = float(_loss(p, stats, scale, held, loss_blocks))
        r = _recall(p, stats, scale, held, select_on) if select_on is not None else 0.0
        return (r, -h)

    with torch.no_grad():
        loss_pooled = float(_loss(Projector.identity(hkv, d), stats, scale, None, loss_blocks))
        best_q = quality(start)
    best = (pq.detach().clone(), pk.detach().clone())
    check = max(1, steps // 40)  # held-out check every few steps
    for step in range(1, steps + 1):
        opt.zero_grad(set_to_none=True)
        loss = _loss(Projector(pq, pk), stats, scale, train, loss_blocks)
        loss.backward()
        opt.step()
        if step % check == 0 or step == steps:
            with torch.no_grad():
                q_now = quality(Projector(pq, pk))
            if q_now > best_q:
                best_q, best = q_now, (pq.detach().clone(), pk.detach().clone())
        if progress is not None:
            progress.update(1)
    proj = Projector(*best)
    with torch.no_grad():
        loss_fitted = float(_loss(proj, stats, scale, None, loss_blocks))
    out = {"kl_pooled": loss_pooled, "kl_fitted": loss_fitted, "kl_heldout": -best_q[1]}
    if select_on is not None:
        with torch.no_grad():
            out["heldout_recall_pooled"] = _recall(Projector.identity(hkv, d), stats, scale, held, select_on)
        out["heldout_recall_fitted"] = best_q[0]
    return proj, out


def collect(model: Callable, batches: Iterable, config: SPAConfig | Mapping[str, Any] | None = None,
            progress: bool = False) -> dict[str, SiteData]:
    """Run ``model`` on ``batches`` with dense attention; per site, the block statistics."""
    cfg = config if isinstance(config, SPAConfig) else SPAConfig.from_options(config)
    batches = list(batches)
    data: dict[str, SiteData] = {}

    def tap(site, q, k, v, mask, key_valid, pq, pk, scale, causal, offset, window, config_str):
        try:
            vis = visibility_from_args(q, k, mask, key_valid, causal, offset, window)
        except BiasMaskError:
            return ops._dense_with_bias(q, k, v, mask, scale)
        st = block_stats(q, k, v, vis, scale, cfg, with_output=True)
        shape = SiteShape(q.shape[1], k.shape[1], q.shape[3], v.shape[3])
        entry = data.setdefault(site, SiteData(shape, float(scale)))
        if entry.shape != shape:
            raise ValueError(f"site {site!r} changed shapes between batches: {entry.shape} then {shape}")
        dense, st.out = st.out, None
        entry.stats.append(st)
        return (dense,)

    bar = _progress(len(batches), "spa calibrate: collect", progress)
    with _eval_mode(model):
        run_with_taps(model, batches, _capture_config(cfg), tap, bar)
    _close(bar)
    return data


def fit(data: Mapping[str, SiteData], steps: int = 200, rank: int | None = None, lr: float = 1e-2,
        holdout: float = 0.1, seed: int = 0, loss_blocks: str = "visible", progress: bool = False,
        select_on: SPAConfig | Mapping[str, Any] | None = None,
        ) -> tuple[dict[str, Projector], dict[str, dict[str, float]]]:
    """:func:`fit_projector` for every site: (projectors, losses) by site."""
    if select_on is not None and not isinstance(select_on, SPAConfig):
        select_on = SPAConfig.from_options(select_on)
    bar = _progress(steps * len(data), "spa calibrate: fit", progress)
    fitted, losses = {}, {}
    for name, site_data in data.items():
        fitted[name], losses[name] = fit_projector(
            site_data, rank=rank, steps=steps, lr=lr, holdout=holdout, seed=seed, progress=bar,
            loss_blocks=loss_blocks, select_on=select_on,
        )
    _close(bar)
    return fitted, losses


# ---------------------------------------------------------------------------------------
# Evaluation
# ---------------------------------------------------------------------------------------


class _Accumulator:
    def __init__(self):
        self.recall = {m: 0.0 for m in METHODS}
        self.err2 = {m: 0.0 for m in METHODS}
        self.selected = {m: 0.0 for m in METHODS}
        self.rows = 0
        self.visible = 0.0
        self.ref2 = 0.0

    def add(self, method: str, recall: Tensor, live: Tensor, chosen: Tensor, out: Tensor | None, dense: Tensor):
        self.recall[method] += float((recall * live).sum())
        self.selected[method] += float((chosen.sum(-1) * live).sum())
        # out None: the error was not measured (evaluate(errors=False)); the report says nan
        self.err2[method] += math.nan if out is None else float((out.double() - dense.double()).pow(2).sum())

    def result(self) -> dict[str, Any]:
        rows = max(self.rows, 1)
        return {
            "recall": {m: self.recall[m] / rows for m in METHODS},
            "rel_err": {m: math.sqrt(self.err2[m] / max(self.ref2, 1e-300)) for m in METHODS},
            "density": {m: self.selected[m] / max(self.visible, 1) for m in METHODS},
            "query_blocks": self.rows,
        }


def evaluate_site_call(
    q, k, v, vis: Visibility, scale: float, cfg: SPAConfig, fitted: Projector | None, acc: _Accumulator,
    errors: bool = True, propagate: str = "dense",
) -> dict[str, Tensor]:
    """Recall and output error of one attention call for the three selections; returns the outputs
    ``{"dense", "pooled", "fitted", "oracle"}``. ``errors=False`` measures recall only: the sparse
    outputs of the methods other than ``propagate`` are then not computed (about 4x less work)."""
    b, hq, nq, d = q.shape
    bs = cfg.block_size
    valid = valid_keys(vis, b, k.shape[1], bs, q.device)
    pooled = reference.pool_for(cfg, k, v, valid)
    st = block_stats(q, k, v, vis, scale, cfg, with_output=True, valid=valid, kbar=pooled.kbar)
    dense = st.out
    nkb = pooled.kbar.shape[2]
    live = (st.visible.any(-1) & (st.target.sum(-1) > 0)).to(torch.float64)
    acc.rows += int(live.sum())
    acc.visible += float((st.visible.sum(-1) * live).sum())
    acc.ref2 += float(dense.double().pow(2).sum())
    sel_pooled = reference.select_blocks(q, pooled, vis, valid, scale, cfg, None)
    forced_cfg = cfg.replace(topk=0, min_blocks=None, max_blocks=None)
    forced = selection_mask(reference.select_blocks(q, pooled, vis, valid, scale, forced_cfg, None), nkb)
    chosen_pooled = selection_mask(sel_pooled, nkb)
    budget = (chosen_pooled.sum(-1) - forced.sum(-1)).clamp_min(0)
    sels = {
        "pooled": sel_pooled,
        "fitted": sel_pooled if fitted is None else reference.select_blocks(q, pooled, vis, valid, scale, cfg, fitted),
        "oracle": oracle_selection(st.target, st.visible, forced, budget, sel_pooled.index.shape[-1]),
    }
    outs = {"dense": dense}
    for method, sel in sels.items():
        chosen = selection_mask(sel, nkb)
        recall = (st.target * chosen).sum(-1).double()
        out = None
        if errors or method == propagate:
            out, _ = reference.sparse_attention(q, k, v, sel, pooled, vis, valid, scale, cfg.fill, bs)
        acc.add(method, recall, live, chosen.double(), out if errors else None, dense)
        outs[method] = out
    return outs


def evaluate(model: Callable, batches: Iterable, config: SPAConfig | Mapping[str, Any] | None = None,
             projectors: Mapping[str, Projector] | ProjectorFile | None = None,
             progress: bool = False, propagate: str = "dense", outputs: list | None = None,
             errors: bool = True) -> dict[str, dict[str, Any]]:
    """Per site: block recall, output error and selected share for the pooled projector,
    ``projectors`` ("fitted") and the oracle selection, on ``batches``.

    Every site is measured on the activations that ``propagate`` gives the layers after it:
    "dense" (each site's error alone) or one of the methods (the model run end to end with that
    selection; the oracle can only be run this way). ``outputs``, if given, receives the model's
    output for every batch. ``errors=False`` skips the output errors (reported as nan) and
    measures recall alone, about 4x faster on long inputs."""
    if propagate not in ("dense",) + METHODS:
        raise ValueError(f"propagate must be 'dense' or one of {METHODS}, got {propagate!r}")
    cfg = config if isinstance(config, SPAConfig) else SPAConfig.from_options(config)
    if isinstance(projectors, ProjectorFile):
        projectors = projectors.projectors
    projectors = dict(projectors or {})
    batches = list(batches)
    accs: dict[str, _Accumulator] = {}

    def tap(site, q, k, v, mask, key_valid, pq, pk, scale, causal, offset, window, config_str):
        try:
            vis = visibility_from_args(q, k, mask, key_valid, causal, offset, window)
        except BiasMaskError:
            return ops._dense_with_bias(q, k, v, mask, scale)
        acc = accs.setdefault(site, _Accumulator())
        outs = evaluate_site_call(q, k, v, vis, float(scale), cfg, projectors.get(site), acc, errors, propagate)
        return (outs[propagate],)

    bar = _progress(len(batches), "spa calibrate: measure", progress)
    with _eval_mode(model):
        run_with_taps(model, batches, _capture_config(cfg), tap, bar, outputs)
    _close(bar)
    return {name: acc.result() for name, acc in accs.items()}


# ---------------------------------------------------------------------------------------
# The report
# ---------------------------------------------------------------------------------------


@dataclass
class SiteResult:
    name: str
    shape: dict[str, int]
    rank: int
    query_blocks: int
    kl: dict[str, float]
    recall: dict[str, float]
    rel_err: dict[str, float]
    density: dict[str, float]


@dataclass
class CalibrationReport:
    """What :func:`calibrate` fitted and measured; ``save(path)`` writes the projectors."""

    config: SPAConfig
    sites: list[SiteResult]
    projectors: ProjectorFile
    steps: int
    batches: int
    eval_batches: int
    in_sample: bool
    out: str | None = None

    @property
    def overall(self) -> dict[str, Any]:
        """Means over the sites, weighted by their evaluated query blocks."""
        w = [max(s.query_blocks, 0) for s in self.sites]
        tot = max(sum(w), 1)
        mean = lambda key: {m: sum(getattr(s, key)[m] * wi for s, wi in zip(self.sites, w)) / tot for m in METHODS}  # noqa: E731
        return {"recall": mean("recall"), "rel_err": mean("rel_err"), "density": mean("density"),
                "query_blocks": sum(w)}

    def save(self, path: str | os.PathLike) -> str:
        self.out = save_projectors(self.projectors, path)
        return self.out

    def to_dict(self) -> dict[str, Any]:
        return {
            "config": asdict(self.config), "steps": self.steps, "batches": self.batches,
            "eval_batches": self.eval_batches, "in_sample": self.in_sample, "out": self.out,
            "overall": self.overall, "sites": [asdict(s) for s in self.sites],
        }

    def __str__(self) -> str:
        c = self.config
        budget = f"topk={c.topk}" if c.topk is not None else f"density={c.density}"
        lines = [
            f"SPA projector calibration: {len(self.sites)} site(s), block_size={c.block_size}, {budget}, "
            f"sink_blocks={c.sink_blocks}, local_blocks={c.local_blocks}, fill={c.fill}, selection={c.selection}",
            f"fitted on {self.batches} batch(es), {self.steps} step(s); measured on "
            + ("the same batches (in-sample)" if self.in_sample else f"{self.eval_batches} held-out batch(es)"),
            "block recall (share of the dense attention mass the selection keeps) and relative error of the "
            "attention output vs dense:",
        ]
        w = max([len(s.name) for s in self.sites] + [7])
        head = f"  {'site'.ljust(w)}  {'recall: pooled':>14} {'fitted':>7} {'oracle':>7}   {'rel.err: pooled':>15} {'fitted':>7} {'oracle':>7}   {'KL pooled->fitted':>17}"
        lines.append(head)
        rows = [(s.name, s.recall, s.rel_err, f"{s.kl['kl_pooled']:.3f}->{s.kl['kl_fitted']:.3f}") for s in self.sites]
        o = self.overall
        rows.append(("overall", o["recall"], o["rel_err"], ""))
        for name, rec, err, kl in rows:
            lines.append(
                f"  {name.ljust(w)}  {rec['pooled']:>14.3f} {rec['fitted']:>7.3f} {rec['oracle']:>7.3f}   "
                f"{err['pooled']:>15.4f} {err['fitted']:>7.4f} {err['oracle']:>7.4f}   {kl:>17}"
            )
        lines.append(f"  selected share of visible blocks: {o['density']['pooled']:.3f} (forced blocks included)")
        if self.out:
            lines.append(f"projectors written to {self.out}")
        return "\n".join(lines)


# ---------------------------------------------------------------------------------------
# calibrate()
# ---------------------------------------------------------------------------------------


def _progress(total: int, desc: str, enabled: bool):
    if not enabled:
        return None
    try:
        from tqdm.auto import tqdm
    except ImportError:  # pragma: no cover - tqdm is optional
        return None
    return tqdm(total=total, desc=desc, leave=False, file=sys.stderr)


def _close(bar) -> None:
    if bar is not None:
        bar.close()


@contextlib.contextmanager
def _eval_mode(model):
    """Dropout off while measuring: the sites are calibrated as they run at inference."""
    training = getattr(model, "training", False)
    if training:
        model.eval()
    try:
        yield
    finally:
        if training:
            model.train()


def calibrate(
    model: Callable,
    batches: Iterable,
    config: SPAConfig | Mapping[str, Any] | None = None,
    steps: int = 200,
    out: str | os.PathLike | None = None,
    *,
    rank: int | None = None,
    lr: float = 1e-2,
    eval_batches: Iterable | None = None,
    holdout: float = 0.1,
    loss_blocks: str = "visible",
    progress: bool = True,
    seed: int = 0,
) -> CalibrationReport:
    """Fit the SPA projectors of every attention site of ``model`` on ``batches``.

    ``batches``: the model's inputs, each a tensor, a tuple of positional arguments, a dict of
    keyword arguments or ``(args, kwargs)``. ``config``: the SPA config the projectors are for
    (block size, budget, forced blocks, selection; ``mode`` is ignored: every site that can take
    SPA is calibrated). ``steps``: Adam steps per site. ``rank``: ``r`` of ``Pq``/``Pk``
    (default ``D``). ``out``: where to write the projector file. ``eval_batches``: batches for
    the report (default: ``batches``, reported as in-sample). ``loss_blocks``: "visible" (the
    loss of SPEC.md) or "selectable" (see :func:`fit_projector`).

    Returns a :class:`CalibrationReport` (``print(report)`` shows the table).
    """
    cfg = config if isinstance(config, SPAConfig) else SPAConfig.from_options(config)
    batches = list(batches)
    if not batches:
        raise ValueError("calibrate() needs at least one batch")
    data = collect(model, batches, cfg, progress)
    if not data:
        raise ValueError(
            "calibrate() found no attention site that SPA can take in this model "
            "(see spa_compile.explain(model, ...) for why)"
        )
    shapes = {name: d.shape for name, d in data.items()}
    fitted, losses = fit(data, steps, rank, lr, holdout, seed, loss_blocks, progress, select_on=cfg)
    del data
    ev = batches if eval_batches is None else list(eval_batches)
    measured = evaluate(model, ev, cfg, fitted, progress)
    results = []
    for name, proj in fitted.items():
        res = measured[name]
        results.append(SiteResult(
            name=name, shape=shapes[name].to_dict(), rank=int(proj.rank), query_blocks=res["query_blocks"],
            kl=losses[name], recall=res["recall"], rel_err=res["rel_err"], density=res["density"],
        ))
    pf = ProjectorFile(
        projectors=fitted, shapes=shapes, block_size=cfg.block_size,
        config=json.loads(ops.config_to_str(cfg)),
    )
    report = CalibrationReport(cfg, results, pf, steps, len(batches), len(ev), eval_batches is None)
    pf.report = {"overall": report.overall, "steps": steps, "batches": len(batches),
                 "in_sample": report.in_sample, "loss_blocks": loss_blocks}
    if out is not None:
        report.save(out)
    return report


# ---------------------------------------------------------------------------------------
# The `spa calibrate` command
# ---------------------------------------------------------------------------------------


def cli_main(args, target, cfg: SPAConfig) -> int:
    """``spa calibrate MODEL [--seq-len N] [--set ...] --output FILE``: what spa_compile.cli calls.

    ``target`` is the CLI's loaded model (``target.model``, ``target.args``, ``target.kwargs``):
    its example inputs are the one calibration batch. Optional attributes of ``args`` that the
    parser may define: ``steps``, ``rank``, ``lr``, ``json`` (print the report as JSON).
    """
    steps = getattr(args, "steps", None) or 200
    report = calibrate(
        target.model, [(tuple(target.args), dict(target.kwargs))], cfg, steps=steps,
        out=getattr(args, "output", None), rank=getattr(args, "rank", None), lr=getattr(args, "lr", None) or 1e-2,
    )
    if getattr(args, "json", False):
        print(json.dumps(report.to_dict(), indent=2, default=str))
    else:
        print(report)
        if not getattr(args, "output", None):
            print("no --output given: the projectors were not saved", file=sys.stderr)
    return 0


calibrate.cli_main = cli_main  # found by spa_compile.cli whether it gets this module or the function


class _CallableModule(type(sys)):
    """``spa_compile.calibrate(model, batches, ...)`` calls :func:`calibrate`, while
    ``spa_compile.calibrate.collect`` and friends stay reachable as module attributes."""

    def __call__(self, *args, **kwargs):
        return calibrate(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule
