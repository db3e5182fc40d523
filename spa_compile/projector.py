"""The projector of one attention site: ``Pq[g]``, ``Pk[g]`` (``D x r``) per kv head.

Untrained it is the identity (``r = D``): the block score is then the pooled
attention logit, a training-free estimate (SPEC.md section 1). A learned
projector (:mod:`spa_compile.calibrate`, :mod:`spa_compile.training_alongside`)
is fitted by the distillation loss of SPEC.md (:func:`distillation_loss`):
``KL(A || softmax(score))`` over the visible key blocks, where ``A`` is the
attention mass each query block puts on each key block under dense attention.

Projector files (safetensors, one entry per site) are read and written by
:mod:`spa_compile.projector_file`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class Projector:
    pq: Tensor | None  # [Hkv, D, r]; None = identity
    pk: Tensor | None  # [Hkv, D, r]; None = identity

    @classmethod
    def identity(cls, hkv: int, d: int, device=None, dtype=None) -> "Projector":
        """The training-free projector, without tensors (the pooled score)."""
        return cls(pq=None, pk=None)

    @classmethod
    def eye(cls, hkv: int, d: int, rank: int | None = None, device=None, dtype=torch.float32) -> "Projector":
        """The identity as explicit ``[Hkv, D, r]`` tensors: the starting point of a fit.

        With ``rank < D`` it keeps the first ``r`` coordinates (see :func:`pca_init` for a better start).
        """
        r = d if rank is None else int(rank)
        if not 1 <= r <= d:
            raise ValueError(f"projector rank must be in [1, D={d}], got {rank}")
        e = torch.eye(d, r, device=device, dtype=dtype).expand(hkv, d, r).clone()
        return cls(pq=e, pk=e.clone())

    @property
    def is_identity(self) -> bool:
        return self.pq is None and self.pk is None

    @property
    def rank(self) -> int | None:
        return None if self.pq is None else int(self.pq.shape[-1])

    @property
    def shape(self) -> tuple[int, int, int] | None:
        """``(Hkv, D, r)``, or None for the tensor-free identity."""
        return None if self.pq is None else tuple(self.pq.shape)

    def __post_init__(self) -> None:
        if (self.pq is None) != (self.pk is None):
            raise ValueError("a projector needs both Pq and Pk, or neither (identity)")
        if self.pq is not None:
            if self.pq.dim() != 3 or self.pq.shape != self.pk.shape:
                raise ValueError(
                    f"Pq and Pk must both be [Hkv, D, r]; got {tuple(self.pq.shape)} and {tuple(self.pk.shape)}"
                )

    def to(self, device=None, dtype=None) -> "Projector":
        if self.pq is None:
            return self
        return Projector(self.pq.to(device=device, dtype=dtype), self.pk.to(device=device, dtype=dtype))

    def detach(self) -> "Projector":
        return self if self.pq is None else Projector(self.pq.detach(), self.pk.detach())

    def project_queries(self, qbar: Tensor) -> Tensor:
        """``qbar`` [B, Hq, ..., D] -> [B, Hq, ..., r]; query head h uses Pq[h // G]."""
        if self.pq is None:
            return qbar
        hkv = self.pq.shape[0]
        g = qbar.shape[1] // hkv
        p = self.pq.to(device=qbar.device, dtype=qbar.dtype).repeat_interleave(g, dim=0)  # [Hq, D, r]
        return torch.einsum("bh...d,hdr->bh...r", qbar, p)

    def project_keys(self, kbar: Tensor) -> Tensor:
        """``kbar`` [B, Hkv, ..., D] -> [B, Hkv, ..., r]."""
        if self.pk is None:
            return kbar
        return torch.einsum("bh...d,hdr->bh...r", kbar, self.pk.to(device=kbar.device, dtype=kbar.dtype))


# ---------------------------------------------------------------------------------------
# Scores and the distillation loss (SPEC.md section 1 and "Gradients")
# ---------------------------------------------------------------------------------------


def block_scores(projector: Projector, qsel: Tensor, kbar: Tensor, scale: float) -> Tensor:
    """Scores ``[B, Hs, NQB, NKB]`` of every key block for every query block.

    ``qsel`` ``[B, Hs, NQB, D]``: the query block means, already summed over the query heads
    of each group when the selection is shared by the group (``Hs = Hkv``), or per query head
    (``Hs = Hq``, selection ``"head"``). ``kbar`` ``[B, Hkv, NKB, D]``: the key block means.
    Head ``s`` of ``Hs`` uses kv head ``s // (Hs / Hkv)``: the same arithmetic as the
    reference's selection (a sum of projected query means equals the projected sum).
    """
    hkv = kbar.shape[1]
    hs = qsel.shape[1]
    if projector.pq is None:
        qp, kp = qsel, kbar
    else:
        pq = projector.pq.to(device=qsel.device, dtype=qsel.dtype).repeat_interleave(hs // hkv, dim=0)
        qp = torch.einsum("bsid,sdr->bsir", qsel, pq)
        kp = torch.einsum("bgjd,gdr->bgjr", kbar, projector.pk.to(device=kbar.device, dtype=kbar.dtype))
    if hs != hkv:
        kp = kp.repeat_interleave(hs // hkv, dim=1)
    return scale * torch.einsum("bsir,bsjr->bsij", qp, kp)


def distillation_loss(score: Tensor, target: Tensor, visible: Tensor, reduction: str = "mean") -> Tensor:
    """``KL(A || softmax_j(score))`` over the visible key blocks ``j`` (SPEC.md, Gradients).

    ``score``, ``target`` (A, each row summing to 1 over its visible blocks) and ``visible``
    (bool) share the shape ``[..., NKB]``. Rows with no visible block or no mass do not count.
    ``reduction``: "mean" over the counted rows, "sum", or "none" (per row, 0 for rows that do not count).
    """
    neg = torch.finfo(score.dtype).min
    logp = torch.log_softmax(score.masked_fill(~visible, neg), dim=-1)
    a = target.masked_fill(~visible, 0.0)
    terms = torch.where(a > 0, a * (a.clamp_min(1e-30).log() - logp), torch.zeros_like(a))
    per_row = terms.sum(-1)
    live = visible.any(-1) & (a.sum(-1) > 0)
    per_row = torch.where(live, per_row, torch.zeros_like(per_row))
    if reduction == "none":
        return per_row
    if reduction == "sum":
        return per_row.sum()
    return per_row.sum() / live.sum().clamp_min(1)


def distillation_grad(
    projector: Projector, qsel: Tensor, kbar: Tensor, scale: float, target: Tensor, visible: Tensor
) -> tuple[Tensor, Tensor, Tensor]:
    """``(loss, dL/dPq, dL/dPk)`` of the mean :func:`distillation_loss` of
    :func:`block_scores`, in closed form (no autograd: usable inside a custom op's kernel).

    ``dL/dscore = (softmax(score) - A) / rows`` on the counted rows; the chain rule through the
    two projections gives the ``[Hkv, D, r]`` gradients (the group's query heads summed).
    """
    pq, pk = projector.pq, projector.pk
    hkv = kbar.shape[1]
    hs = qsel.shape[1]
    gs = hs // hkv
    dt = torch.float32 if qsel.dtype != torch.float64 else torch.float64
    qsel, kbar, target = qsel.to(dt), kbar.to(dt), target.to(dt)
    pq_h = pq.to(qsel.device, dt).repeat_interleave(gs, dim=0)  # [Hs, D, r]
    qp = torch.einsum("bsid,sdr->bsir", qsel, pq_h)
    kp = torch.einsum("bgjd,gdr->bgjr", kbar, pk.to(kbar.device, dt))
    kp_h = kp.repeat_interleave(gs, dim=1) if gs > 1 else kp
    score = scale * torch.einsum("bsir,bsjr->bsij", qp, kp_h)
    neg = torch.finfo(dt).min
    logp = torch.log_softmax(score.masked_fill(~visible, neg), dim=-1)
    a = target.masked_fill(~visible, 0.0)
    live = visible.any(-1) & (a.sum(-1) > 0)
    rows = live.sum().clamp_min(1).to(dt)
    terms = torch.where(a > 0, a * (a.clamp_min(1e-30).log() - logp), torch.zeros_like(a))
    loss = (terms.sum(-1) * live).sum() / rows
    g = (logp.exp().masked_fill(~visible, 0.0) - a) * live[..., None] / rows  # dL/dscore
    dqp = scale * torch.einsum("bsij,bsjr->bsir", g, kp_h)
    dkp = scale * torch.einsum("bsij,bsir->bsjr", g, qp)
    dpq = torch.einsum("bsid,bsir->sdr", qsel, dqp).unflatten(0, (hkv, gs)).sum(1)
    dkp = dkp.unflatten(1, (hkv, gs)).sum(2) if gs > 1 else dkp
    dpk = torch.einsum("bgjd,bgjr->gdr", kbar, dkp)
    return loss, dpq.to(pq.dtype), dpk.to(pk.dtype)


def pca_init(qsel: Tensor, kbar: Tensor, rank: int, hkv: int) -> Projector:
    """A rank-``r`` start for ``r < D``: ``Pq = Pk = U_r`` per kv head, the top principal
    directions of the (normalised) query and key block means. The score is then the pooled
    logit restricted to the subspace that carries most of it.

    ``qsel`` ``[N_q, Hs, D]`` and ``kbar`` ``[N_k, Hkv, D]`` (rows: samples).
    """
    d = kbar.shape[-1]
    hs = qsel.shape[1]
    mats = []
    for g in range(hkv):
        qg = qsel[:, g * (hs // hkv):(g + 1) * (hs // hkv)].reshape(-1, d).double()
        kg = kbar[:, g].reshape(-1, d).double()
        cq = qg.T @ qg / max(1, qg.shape[0])
        ck = kg.T @ kg / max(1, kg.shape[0])
        c = cq / cq.trace().clamp_min(1e-30) + ck / ck.trace().clamp_min(1e-30)
        _, vecs = torch.linalg.eigh(c)
        mats.append(vecs[:, -rank:].flip(-1).float())
    u = torch.stack(mats).to(kbar.device)
    return Projector(u, u.clone())


def default_scale(d: int) -> float:
    return 1.0 / math.sqrt(d)
