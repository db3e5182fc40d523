"""The selection the SPA op makes (pool, project, select, bitmap), for benchmarks that time the
sparse forward alone on a fixed selection (bench_fill.py, bench_order.py): the same calls as
``codegen.api.spa_forward`` (scores from the float32 key means), causal, no padding."""

from __future__ import annotations

from spa_compile.budget import max_selected
from spa_compile.codegen import api
from spa_compile.codegen.bitmap import build_bitmap
from spa_compile.codegen.blockinfo import block_info
from spa_compile.codegen.pooling import pool_kv
from spa_compile.visibility import Visibility


def op_selection(q, k, v, cfg, block: int):
    """(info, kb, vb, index, count, sel): block info, the landmarks in k's dtype (the forward's
    operands), the index lists and counts, and the fill's selected-block bitmap."""
    n = q.shape[2]
    vis = Visibility(n, k.shape[2], causal=True)
    info = block_info(vis, q.shape[0], n, k.shape[2], block, q.device)
    kmax = int(max_selected(n, k.shape[2], vis, cfg))
    kbar, _, kb, vb = pool_kv(k, v, info)
    index, count = api.selection_stage(q, kbar, info, q.shape[-1] ** -0.5, cfg, None, kmax, k)
    return info, kb, vb, index, count, build_bitmap(index, count, info.nkb)
