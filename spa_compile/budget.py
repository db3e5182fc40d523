"""How many key blocks a query block selects (SPEC.md section 2), in integers.

The reference and the GPU kernels both use these formulas, so their
selections agree exactly: ``ceil(density * n)`` is computed from the density in
parts per million, never in floating point (``0.2 * 10`` is not 2 in floats).
"""

from __future__ import annotations

import torch
from torch import Tensor

from .config import SPAConfig
from .visibility import Visibility, max_partial_blocks, num_blocks


def topk_count(n_visible: Tensor, cfg: SPAConfig) -> Tensor:
    """k for each query block, from its number of visible key blocks (int64)."""
    n = n_visible.to(torch.int64)
    if cfg.topk is not None:
        k = torch.full_like(n, cfg.topk)
    else:
        k = (n * cfg.density_ppm + 999_999) // 1_000_000
    if cfg.min_blocks is not None:
        k = k.clamp(min=cfg.min_blocks)
    if cfg.max_blocks is not None:
        k = k.clamp(max=cfg.max_blocks)
    return k


def max_selected(nq: int, nk: int, vis: Visibility, cfg: SPAConfig):
    """Static upper bound on |S| per query block: the width of the index lists.

    Works on Python ints and on SymInts (dynamic sequence lengths).
    """
    bs = cfg.block_size
    nkb = num_blocks(nk, bs)
    if cfg.topk is not None:
        k = cfg.topk
    else:
        k = (nkb * cfg.density_ppm + 999_999) // 1_000_000
    if cfg.min_blocks is not None:
        k = torch.sym_max(k, cfg.min_blocks)
    if cfg.max_blocks is not None:
        k = torch.sym_min(k, cfg.max_blocks)
    forced = cfg.sink_blocks + cfg.local_blocks + max_partial_blocks(vis, bs, bs, nkb)
    # torch.sym_min keeps the bound symbolic under dynamic shapes (and is min() on ints).
    return torch.sym_max(1, torch.sym_min(nkb, forced + k))
