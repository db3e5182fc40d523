"""The L2 read rate as the attention kernels see it: many programs streaming tiles from an
L2-resident buffer (the microbenchmark's ``l2_read_bw``; see ``spa_compile.hardware``).

A copy within L2 (``y.copy_(x)``) measures reads and write-backs together (4.9 TB/s on an H200),
while the sparse kernel read its selected K/V tiles at 6.0 TB/s or more there (bench_cost_model run 5:
the no-fill probe's modelled L2 bytes over the whole op's time); this probe measured 8.4-8.6 TB/s
(runs 6-7). The cost model's L2 term is about reads of K/V tiles, so it takes this rate.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

ROWS, COLS = 64, 128  # a K/V tile of the exact loop (block 64, D 128)


@triton.jit
def _l2_read_kernel(X, OUT, ntiles, ITERS: tl.constexpr, ROWS: tl.constexpr, COLS: tl.constexpr):
    pid = tl.program_id(0)
    nprog = tl.num_programs(0)
    offs = tl.arange(0, ROWS)[:, None] * COLS + tl.arange(0, COLS)[None, :]
    acc = tl.zeros([ROWS, COLS], dtype=tl.float32)
    for i in range(ITERS):
        t = (pid + i * nprog) % ntiles  # neighbouring programs read neighbouring tiles, all tiles in turn
        acc += tl.load(X + t.to(tl.int64) * (ROWS * COLS) + offs, cache_modifier=".cg").to(tl.float32)
    tl.store(OUT + pid, tl.sum(tl.sum(acc, axis=1), axis=0))  # keeps the loads; 4 bytes a program


def l2_read(x: Tensor, programs: int, iters: int) -> tuple[Tensor, int]:
    """Sum of the tiles each program read (``[programs]`` float32) and the bytes read in all."""
    if x.numel() % (ROWS * COLS):
        raise ValueError(f"the buffer must hold whole {ROWS}x{COLS} tiles, got {x.numel()} elements")
    ntiles = x.numel() // (ROWS * COLS)
    out = torch.empty(programs, device=x.device, dtype=torch.float32)
    _l2_read_kernel[(programs,)](x, out, ntiles, ITERS=iters, ROWS=ROWS, COLS=COLS, num_warps=4)
    return out, programs * iters * ROWS * COLS * x.element_size()
