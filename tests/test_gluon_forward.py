"""The experimental Gluon forward (spa_compile/codegen/gluon_forward.py) against the Triton
kernel's exact part on a Hopper card: the same selection, outputs poisoned before the run.
GPU-only: Gluon has no interpreter, so CI skips these (benchmarks/compile_check.py --gluon
compiles the kernel for sm_90 without a card)."""

from __future__ import annotations

import math

import pytest
import torch

from spa_compile import SPAConfig, Visibility
from spa_compile.budget import max_selected

hopper = pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability()[0] != 9,
                            reason="needs a Hopper GPU (Gluon warpgroup MMA)")


def _case(hq, hkv, n, d, causal, cfg, fill, seed=0):
    from spa_compile.codegen import api, sparse_forward
    from spa_compile.codegen.blockinfo import block_info
    from spa_compile.codegen.pooling import pool_kv

    gen = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(1, h, n, d, generator=gen).to("cuda", torch.bfloat16) for h in (hq, hkv, hkv))
    vis = Visibility(n, n, causal=causal)
    info = block_info(vis, 1, n, n, cfg.block_size, q.device)
    scale = 1.0 / math.sqrt(d)
    kbar, _, klp, vlp = pool_kv(k, v, info)
    index, count = api.selection_stage(q, kbar, info, scale, cfg, None, int(max_selected(n, n, vis, cfg)))
    lm = (klp, vlp) if fill else (k, v)
    want, want_lse = sparse_forward.launch_forward(q, k, v, *lm, info, index, count, scale, fill,
                                                   {"GP": 1, "BJ": 64, "num_warps": 4, "num_stages": 3})
    return q, k, v, info, index, count, scale, want, want_lse, (klp, vlp) if fill else (None, None)


@hopper
@pytest.mark.gpu
@pytest.mark.parametrize("variant", [dict(stages=3, pair=False), dict(stages=2, q_regs=True, pair=False),
                                     dict(stages=3, q_regs=True, pv_async=True, pair=False),
                                     dict(stages=6, q_regs=True, pair=True), dict(stages=5, pv_async=True, pair=True),
                                     dict(stages=3, q_regs=True, pair=False, order=True),
                                     dict(stages=2, q_regs=True, pair=False, order=True),
                                     dict(stages=6, q_regs=True, pair=True, order=True)],
                         ids=["ns3", "ns2q", "ns3qp", "ns6qg", "ns5pg", "ns3qo", "ns2qo", "ns6qgo"])
@pytest.mark.parametrize("fill", [False, True], ids=["exact", "fill"])
@pytest.mark.parametrize("hq,hkv,n,d,causal,cfgk", [
    (8, 2, 4096, 128, True, dict(topk=8)),
    (4, 4, 64 * 63, 128, True, dict(density=0.3, selection="head")),  # odd NQB: the last program's second block is empty
    (4, 1, 2048, 64, False, dict(topk=5)),
])
def test_gluon_forward_equals_triton(hq, hkv, n, d, causal, cfgk, fill, variant):
    gf = pytest.importorskip("spa_compile.codegen.gluon_forward")
    q, k, v, info, index, count, scale, want, want_lse, lm = _case(hq, hkv, n, d, causal, SPAConfig(**cfgk), fill)
    assert gf.supported(q, k, v, info, fill) is None
    if variant["pair"] and not gf.pair_ok(hq, hkv, index.shape[1]):
        with pytest.raises(ValueError, match="pair needs heads 2p and 2p"):
            gf.gluon_forward(q, k, v, info, index, count, scale, *lm, **variant)
        return
    out = torch.full_like(want, float("nan"))  # poisoned: an unwritten row shows
    lse = torch.full_like(want_lse, float("nan"))
    gf.gluon_forward(q, k, v, info, index, count, scale, *lm, out=out, lse=lse, **variant)
    torch.cuda.synchronize()
    assert torch.isfinite(out).all() and torch.isfinite(lse).all()
    err = float((out.double() - want.double()).norm() / want.double().norm())
    assert err < 1e-2, err
    torch.testing.assert_close(lse, want_lse, rtol=1e-4, atol=1e-3)


def test_gluon_forward_refuses_what_it_does_not_take():
    """The scope check names the reason (CPU tensors are refused too: no Hopper card)."""
    gf = pytest.importorskip("spa_compile.codegen.gluon_forward")
    from spa_compile.codegen.blockinfo import block_info

    q = torch.zeros(1, 2, 128, 128, dtype=torch.bfloat16)
    info = block_info(Visibility(128, 128, causal=True), 1, 128, 128, 64, "cpu")
    padded = block_info(Visibility(128, 128, causal=True, key_valid=torch.arange(128)[None] < 100), 1, 128, 128, 64,
                        "cpu")
    assert "fill needs every key block full" in gf.supported(q, q, q, padded, True)
    assert "bf16" in gf.supported(q.float(), q.float(), q.float(), info, False)
    assert "Hopper" in gf.supported(q, q, q, info, False)
    with pytest.raises(ValueError, match="pv_async .* needs stages >= 3"):
        gf.gluon_forward(q, q, q, info, torch.zeros(1, 2, 2, 2, dtype=torch.int32),
                         torch.zeros(1, 2, 2, dtype=torch.int32), 0.1, stages=2, pv_async=True)
    with pytest.raises(ValueError, match="order has its own PV schedule"):
        gf.gluon_forward(q, q, q, info, torch.zeros(1, 2, 2, 2, dtype=torch.int32),
                         torch.zeros(1, 2, 2, dtype=torch.int32), 0.1, pv_async=True, order=True)
    with pytest.raises(ValueError, match="gluon_forward: .*launch_forward"):
        gf.gluon_forward(q, q, q, info, torch.zeros(1, 2, 2, 2, dtype=torch.int32),
                         torch.zeros(1, 2, 2, dtype=torch.int32), 0.1)


def test_gluon_switch(monkeypatch):
    """SPA_GLUON_FORWARD: off by default, "1" asks for the Gluon kernel where it takes the shape
    (elsewhere, and on the CPU, the Triton kernel runs), anything else is an error."""
    from spa_compile.codegen import api

    monkeypatch.delenv(api.GLUON_ENV, raising=False)
    assert api.gluon_forward_enabled() is False
    monkeypatch.setenv(api.GLUON_ENV, "1")
    assert api.gluon_forward_enabled() is True
    monkeypatch.setenv(api.GLUON_ENV, "yes")
    with pytest.raises(ValueError, match="SPA_GLUON_FORWARD must be 0 or 1"):
        api.gluon_forward_enabled()
