"""The torch.library op: opcheck, autograd, torch.compile (fullgraph, Inductor, dynamic lengths)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import spa_compile
from spa_compile import SPAConfig, spa_attention
from spa_compile import ops
from spa_compile import reference as R


def _qkv(b=1, hq=4, hkv=2, n=70, d=16, dtype=torch.float32, grad=False, seed=0):
    gen = torch.Generator().manual_seed(seed)
    xs = [torch.randn(b, h, n, d, generator=gen, dtype=dtype) for h in (hq, hkv, hkv)]
    return [x.requires_grad_(grad) for x in xs]


@pytest.mark.parametrize(
    "mask", ["none", "causal", "bool", "additive"],
)
def test_opcheck(mask):
    q, k, v = _qkv(dtype=torch.float64, grad=True)
    attn_mask = None
    if mask == "bool":
        attn_mask = torch.rand(70, 70, generator=torch.Generator().manual_seed(1)) > 0.3
    if mask == "additive":
        attn_mask = torch.zeros(1, 1, 70, 70, dtype=torch.float64).masked_fill(
            torch.rand(70, 70, generator=torch.Generator().manual_seed(1)) > 0.7, -math.inf)
    args = (q, k, v, attn_mask, None, None, None, 0.25, mask == "causal", 0, -1,
            ops.config_to_str(SPAConfig(block_size=16, density=0.4)))
    torch.library.opcheck(torch.ops.spa.attention.default, args)


def test_functional_matches_reference_and_sdpa_when_exact():
    q, k, v = _qkv(grad=True)
    out = spa_attention(q, k, v, is_causal=True, enable_gqa=True, config=SPAConfig(density=1.0, block_size=16))
    ref = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    g = torch.autograd.grad(out.square().sum(), (q, k, v))
    gr = torch.autograd.grad(ref.square().sum(), (q, k, v))
    for a, b in zip(g, gr):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_functional_sparse_matches_reference_3d_layout():
    q, k, v = (x[0] for x in _qkv(hq=2, hkv=2))  # (B*H, N, D) layout
    cfg = SPAConfig(density=0.3, block_size=16)
    torch.testing.assert_close(spa_attention(q, k, v, is_causal=True, config=cfg),
                               R.spa_attention(q, k, v, is_causal=True, config=cfg))


def test_bias_mask_runs_dense():
    q, k, v = _qkv(hq=2, hkv=2, grad=True)
    bias = torch.randn(70, 70)  # ALiBi-like: finite, non-zero -> a bias, not a visibility mask
    out = spa_attention(q, k, v, attn_mask=bias, config=SPAConfig(density=0.1, block_size=16))
    ref = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    g = torch.autograd.grad(out.sum(), q)[0]
    torch.testing.assert_close(g, torch.autograd.grad(ref.sum(), q)[0], rtol=1e-4, atol=1e-5)


def test_errors_name_the_problem():
    q, k, v = _qkv(hq=4, hkv=2)
    with pytest.raises(ValueError, match="enable_gqa=True"):
        spa_attention(q, k, v)
    with pytest.raises(ValueError, match="is_causal"):
        spa_attention(q, k, v, attn_mask=torch.ones(70, 70, dtype=torch.bool), is_causal=True, enable_gqa=True)
    with pytest.raises(ValueError, match="head dims differ"):
        spa_attention(q, k[..., :8], v, enable_gqa=True)


def test_dropout_falls_back_to_dense_with_a_warning():
    q, k, v = _qkv(hq=2, hkv=2)
    with pytest.warns(UserWarning, match="dropout"):
        out = spa_attention(q, k, v, dropout_p=0.5)
    assert out.shape == q.shape


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_fullgraph_compile_training_and_dynamic_lengths(backend):
    cfg = SPAConfig(density=0.3, block_size=16)

    def f(q, k, v):
        return spa_attention(q * 1.5, k, v, is_causal=True, enable_gqa=True, config=cfg).relu()

    compiled = torch.compile(f, backend=backend, fullgraph=True, dynamic=True)
    torch._dynamo.reset()
    for n in (40, 70, 93):
        q, k, v = _qkv(n=n, grad=True, seed=n)
        out = compiled(q, k, v)
        ref = f(q, k, v)
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
        g = torch.autograd.grad(out.sum(), (q, k, v))
        gr = torch.autograd.grad(ref.sum(), (q, k, v))
        for a, b in zip(g, gr):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    with torch.no_grad():  # inference
        q, k, v = _qkv(n=55)
        torch.testing.assert_close(compiled(q, k, v), f(q, k, v), rtol=1e-5, atol=1e-5)


def test_fine_block_score_through_the_op():
    """block_score "fine" and its resolutions travel in the op's config string (only then: other
    configs' strings, and so compiled graphs, are unchanged) and the op gives the reference's result."""
    cfg = SPAConfig(density=0.3, block_size=16, block_score="fine", fine_rows=4, fine_keys=8)
    text = ops.config_to_str(cfg)
    assert ops.config_from_str(text) == SPAConfig(**{f: getattr(cfg, f) for f in ops.OP_FIELDS + ("fine_rows", "fine_keys")})
    assert "fine_rows" not in ops.config_to_str(SPAConfig(block_size=16))
    q, k, v = _qkv(grad=True)
    out = spa_attention(q, k, v, is_causal=True, enable_gqa=True, config=cfg)
    torch.testing.assert_close(out, R.spa_attention(q, k, v, is_causal=True, enable_gqa=True, config=cfg))
    out.square().sum().backward()  # training: gradients through the fixed selection
    assert q.grad is not None and torch.isfinite(q.grad).all()
