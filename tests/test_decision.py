"""Decisions per site: the cost model on a hardware profile, margin, min_seq_len and per-site
overrides, the fallback without a profile, and the run-time choice for symbolic lengths."""

from __future__ import annotations

import functools
import math
import os

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import spa_compile
from spa_compile import SPAConfig, spa_attention
from spa_compile.backend import recording, spa_backend
from spa_compile.passes import cost_model, rewrite
from spa_compile.passes.decision import Decision, fmt_length, fmt_seconds
from spa_compile.runtime_choice import RUNTIME_THRESHOLD_META, dense_attention, spa_call, spa_or_dense

META = dict(device="meta", dtype=torch.bfloat16)


@pytest.fixture(autouse=True)
def no_config_files(monkeypatch, tmp_path):
    for var in list(os.environ):
        if var.startswith("SPA_"):
            monkeypatch.delenv(var)
    monkeypatch.chdir(tmp_path)


def _gqa(n: int, hq: int = 32, hkv: int = 8, d: int = 128):
    return torch.empty(1, hq, n, d, **META), torch.empty(1, hkv, n, d, **META), torch.empty(1, hkv, n, d, **META)


def _sdpa_gqa(q, k, v):
    return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)


def _decide(fn, *args, config=None) -> list[Decision]:
    records = []
    with recording(records.append):
        spa_compile.explain(fn, *args, config=config)
    return [decision for _, decision in records]


def _shape(n: int) -> cost_model.SiteShape:
    return cost_model.SiteShape(b=1, hq=32, hkv=8, nq=n, nk=n, d=128, dv=128, causal=True)


def test_auto_predicts_both_paths_and_the_crossover():
    cfg = SPAConfig(device_profile="h100")
    n_star = cost_model.crossover(_shape(16384), cfg, spa_compile.hardware.H100)
    switch = cost_model.crossover(_shape(16384), cfg, spa_compile.hardware.H100, margin=cfg.margin)
    (long,) = _decide(_sdpa_gqa, *_gqa(16384), config={"device_profile": "h100"})
    assert long.decision == "spa" and long.profile == "h100"
    assert long.predicted_dense_s > (1 + cfg.margin) * long.predicted_spa_s > 0
    assert long.n_star == n_star and long.switch_len == switch and long.runtime_threshold is None
    assert set(long.stages) == {"pool", "select", "exact", "fill", "host"}
    assert "h100" in long.reason and f"N*={int(n_star)}" in long.reason and "faster" in long.reason
    (short,) = _decide(_sdpa_gqa, *_gqa(1024), config={"device_profile": "h100"})
    assert short.decision == "dense" and "slower" in short.reason and short.n_star == n_star
    assert short.predicted_spa_s > short.predicted_dense_s


def test_margin_keeps_a_small_predicted_win_dense():
    cfg = SPAConfig(device_profile="h100", margin=0.5)
    prof = spa_compile.hardware.H100
    lo, hi = cost_model.crossover(_shape(1), cfg, prof), cost_model.crossover(_shape(1), cfg, prof, margin=0.5)
    assert lo < hi
    n = next(n for n in range(int(lo), int(hi), 64) if 1.05 < cost_model.predict(_shape(n), cfg, prof).speedup < 1.45)
    (d,) = _decide(_sdpa_gqa, *_gqa(n), config={"device_profile": "h100", "margin": 0.5})
    assert d.decision == "dense" and "only" in d.reason and "margin 0.5" in d.reason
    (d0,) = _decide(_sdpa_gqa, *_gqa(n), config={"device_profile": "h100", "margin": 0.0})
    assert d0.decision == "spa"


def test_min_seq_len_overrides_the_model():
    (d,) = _decide(_sdpa_gqa, *_gqa(1024), config={"device_profile": "h100", "min_seq_len": 512})
    assert d.decision == "spa" and "min_seq_len=512" in d.reason
    assert d.predicted_spa_s > d.predicted_dense_s  # the model's view is still reported
    (d,) = _decide(_sdpa_gqa, *_gqa(65536), config={"device_profile": "h100", "min_seq_len": 100_000})
    assert d.decision == "dense" and d.switch_len == 100_000


class _Layer(nn.Module):
    def forward(self, q, k, v):
        return _sdpa_gqa(q, k, v)


class _Model(nn.Module):
    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleList([_Layer(), _Layer()])

    def forward(self, q, k, v):
        for layer in self.layers:
            q = layer(q, k, v)
        return q


def test_site_overrides_by_name_pattern_in_auto_mode():
    report = spa_compile.explain(_Model(), *_gqa(16384),
                                 config={"device_profile": "h200", "sites": {"model.layers.0*": "dense"}})
    assert [(s.name, s.decision) for s in report.sites] == [("model.layers.0", "dense"), ("model.layers.1", "spa")]
    assert report.sites[0].reason == "sites override -> dense"


def test_without_a_profile_auto_falls_back_to_the_threshold():
    q = torch.randn(1, 2, 64, 8)
    (d,) = _decide(_sdpa_gqa, q, q, q)
    assert d.decision == "dense" and d.predicted_spa_s is None and d.profile is None
    assert "min_seq_len=4096 (default threshold: the site's tensors are on cpu" in d.reason
    (d,) = _decide(_sdpa_gqa, *_gqa(8192))
    assert d.decision == "spa" and "default threshold" in d.reason


def test_dense_mask_stays_dense_under_the_model_and_fixed_modes_predict_nothing():
    q, k, v = _gqa(16384, hq=8)
    mask = torch.ones(16384, 16384, device="meta", dtype=torch.bool)

    def masked(q, k, v, m):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=m, enable_gqa=True)

    (d,) = _decide(masked, q, k, v, mask, config={"device_profile": "h100"})
    assert d.decision == "dense" and "a dense attn_mask (bool" in d.reason
    (d,) = _decide(masked, q, k, v, mask, config={"device_profile": "h100", "mode": "spa"})
    assert d.decision == "spa" and d.predicted_dense_s is None and d.n_star is None


def test_formatting():
    assert fmt_seconds(None) == "-" and fmt_seconds(2.5) == "2.50 s" and fmt_seconds(1.5e-3) == "1.5 ms"
    assert fmt_seconds(2e-5) == "20 us" and fmt_length(math.inf).startswith("never") and fmt_length(4096.0) == "4096"
    assert Decision("spa", "x", predicted_dense_s=2.0, predicted_spa_s=1.0).predicted_speedup == 2.0
    assert Decision("dense", "x").predicted_speedup is None


# ---------------------------------------------------------------------------------------
# Run-time choice for symbolic lengths
# ---------------------------------------------------------------------------------------


def test_spa_or_dense_on_concrete_sizes():
    cfg = SPAConfig(block_size=16, density=0.25)
    cs = spa_compile.ops.config_to_str(cfg)
    q = torch.randn(1, 4, 192, 8)
    k, v = torch.randn(1, 2, 192, 8), torch.randn(1, 2, 192, 8)
    args = (q, k, v, None, None, None, None, 8**-0.5, True, 0, -1, cs)
    (below,) = spa_or_dense(*args, 193)
    torch.testing.assert_close(below, F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True))
    (above,) = spa_or_dense(*args, 192)
    torch.testing.assert_close(above, spa_attention(q, k, v, is_causal=True, enable_gqa=True, config=cfg))
    assert (above - below).abs().max() > 1e-3  # really sparse


def test_dense_branch_reproduces_structured_visibility():
    """Key padding, a causal offset and a window: dense == SPA with every block selected (SPEC exactness)."""
    torch.manual_seed(0)
    q, k, v = torch.randn(2, 2, 40, 8), torch.randn(2, 2, 56, 8), torch.randn(2, 2, 56, 8)
    key_valid = torch.ones(2, 56, dtype=torch.bool)
    key_valid[1, 50:] = False
    full = spa_compile.ops.config_to_str(SPAConfig(block_size=16, density=1.0))
    for offset, window in ((16, -1), (16, 24), (0, -1)):
        dense = dense_attention(q, k, v, None, key_valid, 0.3, True, offset, window)
        exact = torch.ops.spa.attention(q, k, v, None, key_valid, None, None, 0.3, True, offset, window, full)[0]
        torch.testing.assert_close(dense, exact, rtol=1e-5, atol=1e-5)
    additive = torch.zeros(40, 56)
    additive[:, :4] = float("-inf")
    dense = dense_attention(q, k, v, additive, key_valid, 0.3, False, 0, 24)
    bool_mask = torch.ones(40, 56, dtype=torch.bool)
    bool_mask[:, :4] = False
    torch.testing.assert_close(dense, dense_attention(q, k, v, bool_mask, key_valid, 0.3, False, 0, 24))


def test_spa_call_picks_the_target_from_the_node():
    graph = torch.fx.Graph()
    node = graph.placeholder("x")
    args = ("q", "k", "v")
    assert spa_call(node, args) == (torch.ops.spa.attention.default, args)
    node.meta[RUNTIME_THRESHOLD_META] = 4096
    assert spa_call(node, args) == (spa_or_dense, ("q", "k", "v", 4096))


def _rewrite_with_runtime_choice(gm, site, cfg):
    """rewrite.rewrite_site with the one-line change this module asks for (spa_call)."""
    import math as _math
    import operator

    graph, node = gm.graph, site.node
    q_val = rewrite.example_value(site.q)
    scale = site.scale if site.scale is not None else 1.0 / _math.sqrt(q_val.shape[-1])
    with graph.inserting_before(node):
        spa = graph.call_function(*spa_call(node, (
            site.q, site.k, site.v, site.attn_mask, None, None, None, float(scale), bool(site.is_causal), 0, -1,
            spa_compile.ops.config_to_str(cfg))))
        out = graph.call_function(operator.getitem, (spa, 0))
    if "example_value" in node.meta:
        out.meta["example_value"] = node.meta["example_value"]
    node.replace_all_uses_with(out)
    graph.erase_node(node)
    return spa


@pytest.fixture
def runtime_rewrite(monkeypatch):
    import inspect

    if "spa_call" not in inspect.getsource(rewrite):  # until rewrite.py emits runtime_choice.spa_call
        monkeypatch.setattr(spa_compile.backend, "rewrite_site", _rewrite_with_runtime_choice)


def test_dynamic_length_chooses_at_run_time_without_recompiling(runtime_rewrite):
    torch._dynamo.reset()
    opts = {"min_seq_len": 96, "block_size": 16, "density": 0.25, "inner_backend": "aot_eager"}
    spa_cfg = SPAConfig(block_size=16, density=0.25)

    def f(q, k, v):
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True) * 2

    def expected(q, k, v):
        if k.shape[2] >= 96:
            return spa_attention(q, k, v, is_causal=True, enable_gqa=True, config=spa_cfg) * 2
        return f(q, k, v)

    records = []
    compiled = torch.compile(f, backend=functools.partial(spa_backend, options=opts), dynamic=True)
    with recording(records.append):
        for n in (64, 112, 80, 128):
            torch.manual_seed(n)
            q = torch.randn(1, 4, n, 8, requires_grad=True)
            k, v = (torch.randn(1, 2, n, 8, requires_grad=True) for _ in range(2))
            out = compiled(q, k, v)
            ref = expected(q, k, v)
            torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
            if n >= 96:
                assert (ref - f(q, k, v)).abs().max() > 1e-3  # SPA really differs from dense here
            grads = torch.autograd.grad(out.square().sum(), (q, k, v))
            ref_grads = torch.autograd.grad(ref.square().sum(), (q, k, v))
            for a, b in zip(grads, ref_grads):
                torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    assert len(records) == 1  # one compiled graph served every length
    site, decision = records[0]
    assert decision.decision == "spa" and decision.runtime_threshold == 96
    assert "chosen at run time" in decision.reason and "dynamic" in decision.reason


def test_dynamic_length_threshold_comes_from_the_model(runtime_rewrite):
    torch._dynamo.reset()
    opts = {"device_profile": "h100", "inner_backend": "eager"}
    records = []
    compiled = torch.compile(_sdpa_gqa, backend=functools.partial(spa_backend, options=opts), dynamic=True)
    with recording(records.append):
        for n in (48, 40):
            q, k = torch.randn(1, 4, n, 16), torch.randn(1, 2, n, 16)
            torch.testing.assert_close(compiled(q, k, k), _sdpa_gqa(q, k, k))  # far below N*: dense
    assert len(records) == 1
    site, d = records[0]
    expect = cost_model.crossover(
        cost_model.SiteShape(b=1, hq=4, hkv=2, nq=48, nk=48, d=16, dv=16, causal=True, dtype_bytes=4, fp32=True),
        SPAConfig(device_profile="h100"), spa_compile.hardware.H100, margin=0.1)
    if math.isinf(expect):
        assert d.decision == "dense" and d.runtime_threshold is None
    else:
        assert d.decision == "spa" and d.runtime_threshold == int(expect) == site.node.meta[RUNTIME_THRESHOLD_META]
