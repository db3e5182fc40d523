"""The visibility predicate of SPEC.md: which keys each query row may see.

A :class:`Visibility` is either structured (causal with an offset, a sliding
window, key padding; no N x N tensor) or carries a boolean mask the user gave.
It is evaluated one block of query rows at a time, so nothing of size Nq x Nk
is ever built from it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor


class BiasMaskError(ValueError):
    """An additive mask with finite non-zero entries: a bias, not a visibility mask."""


@dataclass(frozen=True)
class Visibility:
    """``visible(b, h, t, u)`` for query rows ``t < nq`` and keys ``u < nk``.

    causal:    keys ``u <= t + offset`` only (SDPA's ``is_causal`` is offset 0, top-left).
    window:    with ``offset``, keys ``u > t + offset - window`` only (sliding window).
    key_valid: ``[B, Nk]`` bool, False for padding keys.
    mask:      bool, broadcastable to ``[B, H, Nq, Nk]`` (True = attend).
    """

    nq: int
    nk: int
    causal: bool = False
    offset: int = 0
    window: int | None = None
    key_valid: Tensor | None = None
    mask: Tensor | None = None

    @property
    def kind(self) -> str:
        """Short name of the mask kind, as ``explain`` shows it."""
        parts = []
        if self.causal:
            parts.append("causal" if self.offset == 0 else f"causal(offset={self.offset})")
        if self.window is not None:
            parts.append(f"window({self.window})")
        if self.key_valid is not None:
            parts.append("key_padding")
        if self.mask is not None:
            parts.append("bool")
        return "+".join(parts) or "none"

    @property
    def structured(self) -> bool:
        """True when no dense mask is involved (what the GPU kernels support)."""
        return self.mask is None

    def mask_heads(self) -> int:
        """1 if visibility is the same for every head, else the mask's head count."""
        if self.mask is None or self.mask.dim() < 3:
            return 1
        return self.mask.shape[-3]

    def rows(self, t0: int, t1: int, device: torch.device) -> Tensor:
        """Visibility of query rows ``t0..t1-1``: bool ``[B|1, H|1, t1-t0, Nk]``."""
        vis = torch.ones(1, 1, t1 - t0, self.nk, dtype=torch.bool, device=device)
        if self.causal or self.window is not None:
            t = torch.arange(t0, t1, device=device)[:, None] + self.offset
            u = torch.arange(self.nk, device=device)[None, :]
            if self.causal:
                vis = vis & (u <= t)
            if self.window is not None:
                vis = vis & (u > t - self.window)
        if self.key_valid is not None:
            vis = vis & self.key_valid[:, None, None, :].to(device)
        if self.mask is not None:
            m = self.mask
            while m.dim() < 4:
                m = m.unsqueeze(0)
            m = m if m.shape[-2] == 1 else m[..., t0:t1, :]
            vis = vis & m.to(device)
        return vis


def mask_to_visibility(attn_mask: Tensor) -> Tensor:
    """Turn an SDPA ``attn_mask`` into a boolean visibility mask.

    Boolean masks pass through. Additive masks must hold only 0 and -inf (or the
    dtype's most negative value, which Hugging Face models use for -inf); any
    other entry makes the mask a bias and raises :class:`BiasMaskError`.
    """
    if attn_mask.dtype == torch.bool:
        return attn_mask
    if not attn_mask.is_floating_point():
        raise TypeError(f"attn_mask must be bool or floating point, got {attn_mask.dtype}")
    blocked = attn_mask <= torch.finfo(attn_mask.dtype).min
    if bool(((attn_mask != 0) & ~blocked).any()):
        raise BiasMaskError(
            "attn_mask has finite non-zero entries: it is a bias (ALiBi, relative position), "
            "not a visibility mask; SPA keeps such a site dense"
        )
    return ~blocked


def from_sdpa(attn_mask: Tensor | None, is_causal: bool, nq: int, nk: int) -> Visibility:
    """The visibility that ``F.scaled_dot_product_attention(..., attn_mask, is_causal)`` means."""
    if attn_mask is not None and is_causal:
        raise ValueError(
            "attn_mask and is_causal=True were both given; SDPA rejects this too. "
            "Fold the causal structure into the mask or drop the mask."
        )
    mask = None if attn_mask is None else mask_to_visibility(attn_mask)
    if mask is not None and mask.shape[-1] != nk:
        raise ValueError(f"attn_mask's last dim is {mask.shape[-1]}, but there are {nk} keys")
    return Visibility(nq=nq, nk=nk, causal=bool(is_causal), mask=mask)


def num_blocks(n: int, block: int) -> int:
    return -(-n // block)


def max_partial_blocks(vis: Visibility, block_q: int, block_k: int, nkb: int) -> int:
    """Upper bound on the partially visible key blocks of one query block."""
    if vis.mask is not None:
        return nkb
    per_edge = math.ceil(block_q / block_k) + 1
    edges = int(vis.causal) + int(vis.window is not None)
    return torch.sym_min(nkb, per_edge * edges)
