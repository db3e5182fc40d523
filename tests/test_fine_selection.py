"""block_score "fine" on the accelerator path (spa_compile/codegen/fine_selection.py): the
reference selection vectorised over chunks of query blocks gives the reference's lists."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from spa_compile import SPAConfig, Visibility
from spa_compile import reference as R
from spa_compile.codegen.fine_selection import fine_selection
from spa_compile.projector import Projector

from test_kernels import assert_same_selection, fine_block_scores, make_qkv, padding


def _check(b, hq, hkv, nq, nk, d, bs, visk, cfgk, chunk_bytes, projector=None, seed=0):
    q, k, v = make_qkv(b, hq, hkv, nq, nk, d, seed=seed)
    visk = dict(visk)
    if visk.get("key_valid") is not None:
        visk["key_valid"] = padding(b, nk, [nk - 5 - 11 * i for i in range(b)], left=visk["key_valid"] == "left")
    vis = Visibility(nq, nk, **visk)
    cfg = SPAConfig(block_size=bs, block_score="fine", **cfgk)
    scale = 1.0 / math.sqrt(d)
    idx, cnt = fine_selection(q, k, vis, scale, cfg, projector, chunk_bytes=chunk_bytes)
    valid = R.valid_keys(vis, b, hkv, bs, q.device)
    pooled = R.pool_for(cfg, k, v, valid)
    ref = R.select_blocks(q, pooled, vis, valid, scale, cfg, projector)
    assert_same_selection(ref, idx, cnt, fine_block_scores(q, pooled, scale, cfg, vis, valid, projector), tol=1e-5)
    return idx, cnt, ref


CASES = [
    pytest.param(1, 4, 2, 150, 150, 16, 16, dict(causal=True), dict(fine_rows=4, fine_keys=8), id="causal-gqa2-odd"),
    pytest.param(2, 2, 2, 96, 96, 8, 16, dict(key_valid="right"), dict(selection="head", fine_rows=16, fine_keys=2),
                 id="pad-head"),
    pytest.param(1, 4, 1, 70, 130, 8, 16, dict(causal=True, offset=60, window=50), dict(local_blocks=1, topk=2),
                 id="offset-window-topk"),
    pytest.param(2, 2, 1, 64, 64, 8, 32, dict(key_valid="left", causal=True), dict(sink_blocks=0, density=0.5),
                 id="leftpad-causal"),
]


@pytest.mark.parametrize("b,hq,hkv,nq,nk,d,bs,visk,cfgk", CASES)
@pytest.mark.parametrize("chunk_bytes", [1, 1 << 30], ids=["block-a-chunk", "one-chunk"])
def test_fine_selection_equals_reference(b, hq, hkv, nq, nk, d, bs, visk, cfgk, chunk_bytes):
    _check(b, hq, hkv, nq, nk, d, bs, visk, cfgk, chunk_bytes)


def test_fine_selection_with_a_projector_and_chunks_of_three():
    g = torch.Generator().manual_seed(3)
    proj = Projector(torch.randn(2, 16, 8, generator=g), torch.randn(2, 16, 8, generator=g))
    b, hq, hkv, n, d, bs = 1, 4, 2, 200, 16, 16
    per_block = b * hq * 4 * (-(-n // bs)) * 8 * 4  # the chunk budget of 3 blocks' logits
    _check(b, hq, hkv, n, n, d, bs, dict(causal=True), dict(fine_rows=4, fine_keys=8), 3 * per_block, projector=proj)


@settings(max_examples=15, deadline=None)
@given(st.integers(1, 120), st.sampled_from([1, 2]), st.sampled_from(["group", "head"]), st.booleans(),
       st.sampled_from([1, 4, 16]), st.integers(0, 1000))
def test_fine_selection_equals_reference_property(n, g, selection, causal, rows, seed):
    _check(1, 2 * g, 2, n, n, 8, 16, dict(causal=causal), dict(selection=selection, fine_rows=rows, fine_keys=4),
           1 << (seed % 20), seed=seed)
