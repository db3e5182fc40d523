"""backend="spa" end to end on a small GPT-style model: exactness, sparsity, training, explain, options."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import spa_compile
from spa_compile import SPAConfig
from spa_compile import reference as R

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "examples"))
from models import TinyGPT, TinyLlama  # noqa: E402

EXACT = {"mode": "spa", "density": 1.0, "block_size": 16}


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield


def _tokens(n, b=2, seed=0):
    return torch.randint(0, 256, (b, n), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("inner", ["aot_eager", "inductor"])
def test_forced_exact_matches_eager_forward_and_training_step(inner):
    torch.manual_seed(0)
    model = TinyGPT()
    twin = TinyGPT()
    twin.load_state_dict(model.state_dict())
    idx = _tokens(75)
    compiled = torch.compile(twin, backend="spa", options={**EXACT, "inner_backend": inner})
    torch.testing.assert_close(compiled(idx), model(idx), rtol=1e-4, atol=1e-4)
    # one training step each, same optimizer: parameters stay equal
    opts = [torch.optim.SGD(m.parameters(), lr=0.1) for m in (model, twin)]
    for m, fn, opt in ((model, model, opts[0]), (twin, compiled, opts[1])):
        loss = F.cross_entropy(fn(idx).flatten(0, 1), idx.flatten())
        loss.backward()
        opt.step()
    for (name, a), (_, b) in zip(model.named_parameters(), twin.named_parameters()):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5, msg=name)


def test_forced_sparse_matches_reference():
    torch.manual_seed(0)
    model = TinyGPT(layers=1)
    cfg = {"mode": "spa", "density": 0.25, "block_size": 16, "inner_backend": "aot_eager"}
    idx = _tokens(200, b=1)
    out = torch.compile(model, backend="spa", options=cfg)(idx)

    # the same model with the reference in place of SDPA
    attn = model.layers[0].attn
    seen = {}

    def hook(mod, args, output):
        x = args[0]
        b, n, c = x.shape
        q, k, v = mod.qkv(x).view(b, n, 3, mod.heads, c // mod.heads).permute(2, 0, 3, 1, 4)
        y = R.spa_attention(q, k, v, is_causal=True, config=SPAConfig(**{k_: v_ for k_, v_ in cfg.items() if k_ != "inner_backend"}))
        seen["y"] = mod.proj(y.transpose(1, 2).reshape(b, n, c))
        return seen["y"]

    handle = attn.register_forward_hook(hook)
    try:
        ref = model(idx)
    finally:
        handle.remove()
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)
    assert (out - model(idx)).abs().max() > 1e-4  # it really is sparse


def test_explain_lists_one_site_per_layer():
    report = spa_compile.explain(TinyGPT(layers=3), _tokens(8192, b=1))
    assert [s.name for s in report.sites] == [f"model.layers.{i}.attn" for i in range(3)]
    assert all(s.decision == "spa" and s.mask == "causal" for s in report.sites)
    assert report.sites[0].q_shape == (1, 4, 8192, 16)
    text = str(report)
    assert "model.layers.2.attn" in text and "causal" in text

    short = spa_compile.explain(TinyGPT(layers=2), _tokens(128, b=1))
    assert [s.decision for s in short.sites] == ["dense", "dense"]
    assert "min_seq_len" in short.sites[0].reason


def test_explain_config_overrides_and_llama_gqa():
    report = spa_compile.explain(
        TinyLlama(layers=2), _tokens(300, b=1), config={"mode": "spa", "sites": {"model.layers.0.*": "dense"}}
    )
    assert [(s.name, s.decision) for s in report.sites] == [
        ("model.layers.0.self_attn", "dense"), ("model.layers.1.self_attn", "spa")]
    assert report.sites[1].q_shape == (1, 8, 300, 16) and report.sites[1].k_shape == (1, 2, 300, 16)


def test_dropout_site_stays_dense_and_says_why():
    def f(q, k, v):
        return F.scaled_dot_product_attention(q, k, v, dropout_p=0.1, is_causal=True)

    q = torch.randn(1, 2, 64, 16)
    report = spa_compile.explain(f, q, q, q, config={"mode": "spa"})
    assert report.sites[0].decision == "dense" and "dropout" in report.sites[0].reason


def test_options_are_validated():
    model = torch.compile(TinyGPT(layers=1), backend="spa", options={"densty": 0.1})
    with pytest.raises(Exception, match="densty.*did you mean 'density'"):
        model(_tokens(16))


def test_entry_point_without_importing_spa_compile():
    code = (
        "import torch, torch.nn.functional as F\n"
        "f = torch.compile(lambda q: F.scaled_dot_product_attention(q, q, q, is_causal=True), backend='spa',"
        " options={'mode': 'spa', 'density': 1.0, 'block_size': 16, 'inner_backend': 'eager'})\n"
        "q = torch.randn(1, 2, 40, 8)\n"
        "assert torch.allclose(f(q), F.scaled_dot_product_attention(q, q, q, is_causal=True), atol=1e-5)\n"
        "import sys; assert 'spa_compile' in sys.modules  # loaded through the entry point\n"
        "print('ok')\n"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0 and res.stdout.strip().endswith("ok"), res.stderr[-2000:]


def test_graph_breaks_still_rewrite_each_graph():
    def f(q):
        a = F.scaled_dot_product_attention(q, q, q, is_causal=True)
        torch._dynamo.graph_break()
        return F.scaled_dot_product_attention(a, a, a)

    q = torch.randn(1, 2, 40, 8)
    report = spa_compile.explain(f, q, config={"mode": "spa"})
    assert len(report.sites) == 2 and {s.mask for s in report.sites} == {"causal", "none"}
    out = torch.compile(f, backend="spa", options={**EXACT, "inner_backend": "eager"})(q)
    a = F.scaled_dot_product_attention(q, q, q, is_causal=True)
    torch.testing.assert_close(out, F.scaled_dot_product_attention(a, a, a), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("mask_kind", ["bool", "additive"])
def test_sdpa_arguments_by_position_and_keyword_with_masks(mask_kind):
    gen = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(2, 4, 50, 8, generator=gen) for _ in range(3))
    keep = torch.rand(2, 1, 50, 50, generator=gen) > 0.3
    mask = keep if mask_kind == "bool" else torch.zeros(2, 1, 50, 50).masked_fill(~keep, float("-inf"))

    def positional(q, k, v, m):
        return F.scaled_dot_product_attention(q, k, v, m, 0.0, False, scale=0.3)

    def keyword(q, k, v, m):
        return F.scaled_dot_product_attention(query=q, key=k, value=v, attn_mask=m, scale=0.3)

    for fn in (positional, keyword):
        report = spa_compile.explain(fn, q, k, v, mask, config={"mode": "spa"})
        assert [(s.decision, s.mask) for s in report.sites] == [("spa", mask_kind)]
        torch._dynamo.reset()
        out = torch.compile(fn, backend="spa", options={**EXACT, "inner_backend": "aot_eager"})(q, k, v, mask)
        torch.testing.assert_close(out, fn(q, k, v, mask), rtol=1e-5, atol=1e-5)
