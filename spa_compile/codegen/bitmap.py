"""The selected-block bitmap the fill reads, built by one kernel launch.

``[B, Hs, NQB, ceil(NKB / 32)]`` int32: bit ``j % 32`` of word ``j // 32`` of a query
block's row is set when it selected key block ``j``. One program per row zeroes its words
and ORs in the bits of its index list (the same result as
``sparse_forward.selected_bitmap``, the torch formulation, which took about ten launches).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor


@triton.jit
def _bitmap_kernel(IDX, CNT, SEL, KMAX, W, BW: tl.constexpr, BK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    SEL_r = SEL + row * W
    for w0 in range(0, W, BW):
        ww = w0 + tl.arange(0, BW)
        tl.store(SEL_r + ww, tl.zeros([BW], dtype=tl.int32), mask=ww < W)
    tl.debug_barrier()  # the zeros land before the ORs
    cnt = tl.load(CNT + row)
    for s0 in range(0, cnt, BK):
        s = s0 + tl.arange(0, BK)
        ok = s < cnt
        j = tl.load(IDX + row * KMAX + s, mask=ok, other=0)
        ok = ok & (j >= 0)
        tl.atomic_or(SEL_r + j // 32, (1 << (j % 32)).to(tl.int32), mask=ok, sem="relaxed")


def build_bitmap(index: Tensor, count: Tensor, nkb: int) -> Tensor:
    """The bitmap of ``index`` ``[B, Hs, NQB, kmax]`` (ascending, -1 padded) and ``count``."""
    b, hs, nqb, kmax = index.shape
    words = (nkb + 31) // 32
    sel = torch.empty(b, hs, nqb, words, dtype=torch.int32, device=index.device)
    rows = b * hs * nqb
    if rows == 0:
        return sel
    _bitmap_kernel[(rows,)](
        index, count, sel, kmax, words,
        BW=min(1024, triton.next_power_of_2(words)), BK=min(1024, triton.next_power_of_2(max(kmax, 1))),
        num_warps=1 if kmax <= 128 else 4,
    )
    return sel
