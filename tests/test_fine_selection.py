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

from spa_compile.codegen.fine_score import fine_mass
from test_kernels import assert_same_selection, fine_block_scores, gpu, make_qkv, needs_cpu_kernels, needs_cuda, padding


def _check(b, hq, hkv, nq, nk, d, bs, visk, cfgk, chunk_bytes, projector=None, seed=0, kernel=False):
    q, k, v = make_qkv(b, hq, hkv, nq, nk, d, seed=seed)
    visk = dict(visk)
    if visk.get("key_valid") is not None:
        visk["key_valid"] = padding(b, nk, [nk - 5 - 11 * i for i in range(b)], left=visk["key_valid"] == "left")
    vis = Visibility(nq, nk, **visk)
    cfg = SPAConfig(block_size=bs, block_score="fine", **cfgk)
    scale = 1.0 / math.sqrt(d)
    idx, cnt = fine_selection(q, k, vis, scale, cfg, projector, chunk_bytes=chunk_bytes, kernel=kernel)
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
    per_block = b * hq * 4 * (-(-n // bs)) * 8 * 4 + b * bs * n  # a block's logits and row visibility
    _check(b, hq, hkv, n, n, d, bs, dict(causal=True), dict(fine_rows=4, fine_keys=8), 3 * per_block, projector=proj)


@settings(max_examples=15, deadline=None)
@given(st.integers(1, 120), st.sampled_from([1, 2]), st.sampled_from(["group", "head"]), st.booleans(),
       st.sampled_from([1, 4, 16]), st.integers(0, 1000))
def test_fine_selection_equals_reference_property(n, g, selection, causal, rows, seed):
    _check(1, 2 * g, 2, n, n, 8, 16, dict(causal=causal), dict(selection=selection, fine_rows=rows, fine_keys=4),
           1 << (seed % 20), seed=seed)


@needs_cpu_kernels
@pytest.mark.parametrize("b,hq,hkv,nq,nk,d,bs,visk,cfgk", CASES)
def test_fine_kernel_selection_equals_reference(b, hq, hkv, nq, nk, d, bs, visk, cfgk):
    """The Triton fine score (fine_score.fine_mass, interpreter) gives the reference's lists:
    odd lengths (a partial last block with fewer rows than fine_rows), GQA and head selection,
    padding, offset and window, top-k and density; chunks of one block and one chunk."""
    for chunk_bytes in (1, 1 << 30):
        _check(b, hq, hkv, nq, nk, d, bs, visk, cfgk, chunk_bytes, kernel=True)


@needs_cpu_kernels
def test_fine_kernel_with_a_projector():
    g = torch.Generator().manual_seed(4)
    proj = Projector(torch.randn(2, 16, 8, generator=g), torch.randn(2, 16, 8, generator=g))
    _check(1, 4, 2, 200, 200, 16, 16, dict(causal=True), dict(fine_rows=4, fine_keys=8), 1 << 30, projector=proj,
           kernel=True)


@needs_cpu_kernels
@settings(max_examples=12, deadline=None)
@given(a=st.sampled_from([1, 2, 4, 16, 32]), m=st.sampled_from([1, 2, 8, 32]), nkb=st.integers(1, 11),
       r=st.sampled_from([8, 16, 24]), heads=st.sampled_from([(2, 1), (2, 2), (4, 1)]), seed=st.integers(0, 99))
def test_fine_mass_equals_reference_scores(a, m, nkb, r, heads, seed):
    """fine_mass against reference.fine_scores per head (hs = Hq: no group mean), with
    invisible blocks, empty sub-blocks, a row mean that sees nothing, and keys stored per kv head."""
    hq, hk = heads
    g = torch.Generator().manual_seed(seed)
    b, nb = 2, 3
    qm = torch.randn(b, hq, nb, a, r, generator=g, dtype=torch.float64)
    ksub = torch.randn(b, hk, nkb * m, r, generator=g, dtype=torch.float64)
    nsub = torch.randint(0, 3, (b, hk, nkb * m), generator=g).double()
    visible = torch.rand(b, hq, nb, nkb, generator=g) < 0.7
    visible[0, 0, 0] = False  # a query block that sees nothing
    got = fine_mass(qm, ksub, nsub, visible, 0.3)
    ident = Projector.identity(hk, r, dtype=torch.float64)
    # reference.fine_scores pools rows itself: give it A rows per block, one per row mean
    ref = R.fine_scores(qm, ksub, nsub, visible, a, hq, 0.3, ident)
    torch.testing.assert_close(got.double(), ref, atol=1e-5, rtol=1e-4)
    assert torch.equal(got[0, 0, 0], torch.zeros(nkb)) and (got >= 0).all()


@gpu
@needs_cuda
@pytest.mark.parametrize("selection", ["group", "head"])
def test_gpu_fine_kernel_selection(selection):
    """On the card, at the benchmark's shape class (Hq=32, Hkv=8, D=128, bf16, causal, block 64,
    8K + 37 tokens, density 0.2): the Triton fine score (tf32x3 dots) gives the lists of the
    PyTorch path, but for blocks whose reference scores tie within rounding."""
    b, hq, hkv, n, d = 1, 32, 8, 8192 + 37, 128
    q, k, v = make_qkv(b, hq, hkv, n, n, d, dtype=torch.bfloat16, device="cuda", seed=29)
    vis = Visibility(n, n, causal=True)
    cfg = SPAConfig(block_score="fine", selection=selection)
    scale = d**-0.5
    idx, cnt = fine_selection(q, k, vis, scale, cfg, None, kernel=True)
    ref_idx, ref_cnt = fine_selection(q, k, vis, scale, cfg, None, kernel=False)
    valid = R.valid_keys(vis, b, hkv, cfg.block_size, q.device)
    pooled = R.pool_for(cfg, k.float(), v.float(), valid)
    assert_same_selection(R.Selection(ref_idx, ref_cnt), idx, cnt,
                          fine_block_scores(q.float(), pooled, scale, cfg, vis, valid), tol=1e-4)
