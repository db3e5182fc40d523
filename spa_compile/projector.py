"""The projector of one attention site: ``Pq[g]``, ``Pk[g]`` (``D x r``) per kv head.

Untrained it is the identity (``r = D``): the block score is then the pooled
attention logit, a training-free estimate (SPEC.md section 1).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class Projector:
    pq: Tensor | None  # [Hkv, D, r]; None = identity
    pk: Tensor | None  # [Hkv, D, r]; None = identity

    @classmethod
    def identity(cls, hkv: int, d: int, device=None, dtype=None) -> "Projector":
        return cls(pq=None, pk=None)

    @property
    def is_identity(self) -> bool:
        return self.pq is None and self.pk is None

    def __post_init__(self) -> None:
        if (self.pq is None) != (self.pk is None):
            raise ValueError("a projector needs both Pq and Pk, or neither (identity)")
        if self.pq is not None:
            if self.pq.dim() != 3 or self.pq.shape != self.pk.shape:
                raise ValueError(
                    f"Pq and Pk must both be [Hkv, D, r]; got {tuple(self.pq.shape)} and {tuple(self.pk.shape)}"
                )

    def project_queries(self, qbar: Tensor) -> Tensor:
        """``qbar`` [B, Hq, D] -> [B, Hq, r]; query head h uses Pq[h // G]."""
        if self.pq is None:
            return qbar
        hkv = self.pq.shape[0]
        g = qbar.shape[1] // hkv
        p = self.pq.to(qbar.dtype).repeat_interleave(g, dim=0)  # [Hq, D, r]
        return torch.einsum("bhd,hdr->bhr", qbar, p)

    def project_keys(self, kbar: Tensor) -> Tensor:
        """``kbar`` [B, Hkv, NKB, D] -> [B, Hkv, NKB, r]."""
        if self.pk is None:
            return kbar
        return torch.einsum("bhjd,hdr->bhjr", kbar, self.pk.to(kbar.dtype))
