"""spa_compile.inspect: FX / MLIR / dot views of the graphs before and after the SPA passes.

Everything is traced on fake tensors with tiny shapes; see tests/filecheck for the
FileCheck cases per mask kind.
"""

from __future__ import annotations

import io
import logging
import re
import shutil
import sys

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import spa_compile
from spa_compile import inspection
from spa_compile.logging_setup import configure_logging, parse_level

SITES = {"mode": "spa", "sites": {"model.layers.0.*": "dense"}}


class Attention(nn.Module):
    def __init__(self, dim=32, heads=2):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        b, n, c = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.proj(y.transpose(1, 2).reshape(b, n, c))


class Layer(nn.Module):
    def __init__(self):
        super().__init__()
        self.attn = Attention()

    def forward(self, x):
        return x + self.attn(x)


class TwoLayers(nn.Module):
    def __init__(self, graph_break: bool = False):
        super().__init__()
        self.layers = nn.ModuleList([Layer(), Layer()])
        self.graph_break = graph_break

    def forward(self, x):
        x = self.layers[0](x)
        if self.graph_break:
            torch._dynamo.graph_break()
        return self.layers[1](x)


@pytest.fixture(scope="module")
def cap() -> inspection.Capture:
    return inspection.capture(TwoLayers(), torch.randn(1, 128, 32), config=SITES)


def test_capture_records_sites_and_both_stages(cap):
    assert len(cap.graphs) == 1
    names = [(s.name, s.decision) for s in cap.sites]
    assert names == [("model.layers.0.attn", "dense"), ("model.layers.1.attn", "spa")]
    dense, spa = cap.sites
    assert dense.spa_node is None and spa.spa_node is not None
    assert spa.k == "1/2" and dense.k == "all"  # ceil(0.2 * 2 blocks) of 2
    assert dense.mask == spa.mask == "causal" and spa.pattern == "sdpa"
    g = cap.graphs[0]
    targets = lambda gm: [n.target for n in gm.graph.nodes if n.op == "call_function"]  # noqa: E731
    assert torch.ops.spa.attention.default not in targets(g.before)
    assert torch.ops.spa.attention.default in targets(g.after)
    # The before graph keeps both SDPA calls; the after graph one.
    sdpa = torch._C._nn.scaled_dot_product_attention
    assert targets(g.before).count(sdpa) == 2 and targets(g.after).count(sdpa) == 1


def test_fx_annotations_sit_on_the_site_nodes(cap):
    for stage in ("before", "after"):
        text = cap.render("fx", stage)
        assert text.startswith(f"# spa_compile.inspect: stage={stage} graph 1 of 1: 2 attention site(s), 1 SPA, 1 dense")
        lines = text.splitlines()
        for site in cap.sites:
            comment = f"# {site.comment()}"
            idx = [i for i, ln in enumerate(lines) if ln.strip() == comment]
            assert len(idx) == 1, (stage, comment)
            anchor = site.spa_node if stage == "after" and site.spa_node else site.node
            assert re.match(rf"\s*{anchor}\b", lines[idx[0] + 1]), lines[idx[0] + 1]
    after = cap.render("fx", "after")
    assert "torch.ops.spa.attention.default(" in after
    assert "# File:" not in after and "# File:" in cap.render("fx", "after", verbose=True)


def test_public_inspect_function():
    def fn(q, k, v):
        return F.scaled_dot_product_attention(q, k, v, is_causal=True) + 1

    q = k = v = torch.randn(1, 2, 64, 16)
    before = spa_compile.inspect(fn, q, k, v, format="fx", stage="before", config={"mode": "spa"})
    after = spa_compile.inspect(fn, q, k, v, config={"mode": "spa"})  # defaults: fx, after
    assert "scaled_dot_product_attention(" in before and "spa.attention" not in before
    assert "torch.ops.spa.attention.default(" in after and "scaled_dot_product_attention(" not in after
    assert "# spa site model: spa pattern=sdpa mask=causal k=1/1 (" in after


@pytest.mark.parametrize("kwargs, message", [({"format": "pdf"}, "format='pdf'"), ({"stage": "during"}, "stage='during'")])
def test_bad_format_or_stage(kwargs, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        spa_compile.inspect(lambda x: x, torch.randn(2), **kwargs)


def test_networkx_view_and_dot(cap):
    g = inspection.to_networkx(cap.graphs[0].after)
    spa = cap.sites[1]
    assert g.nodes[spa.spa_node]["target"] == "spa.attention"
    assert all(g.has_edge(i, spa.spa_node) for i in spa.inputs)
    dot = cap.render("dot", "after")
    assert dot.startswith("digraph spa_inspect {") and dot.rstrip().endswith("}")
    assert dot.count("{") == dot.count("}")
    assert dot.count("subgraph cluster_") == 2
    assert 'fillcolor="palegreen", penwidth="3"' in dot  # the rewritten op
    assert 'fillcolor="lightgoldenrod1"' in dot  # the dense site
    assert "(rewritten)" not in cap.render("dot", "before")


def test_dot_without_sites():
    out = spa_compile.inspect(lambda x: x.relu(), torch.randn(4), format="dot")
    assert "no attention sites" in out
    fx = spa_compile.inspect(lambda x: x.relu(), torch.randn(4))
    assert "0 attention site(s)" in fx


def test_svg_png_need_graphviz(monkeypatch):
    monkeypatch.setattr(inspection.shutil, "which", lambda name: None)
    with pytest.raises(inspection.GraphvizUnavailableError, match="format='dot'"):
        spa_compile.inspect(lambda x: x, torch.randn(2), format="svg")


@pytest.mark.skipif(shutil.which("dot") is None, reason="Graphviz 'dot' is not installed")
def test_svg_png_with_graphviz(cap):
    assert "<svg" in cap.render("svg", "after")
    assert cap.render("png", "after").startswith(b"\x89PNG")


def test_graph_breaks_give_one_section_per_graph():
    cap = inspection.capture(TwoLayers(graph_break=True), torch.randn(1, 64, 32), config={"mode": "spa"})
    assert len(cap.graphs) >= 2
    text = cap.render("fx", "after")
    assert f"graph 1 of {len(cap.graphs)}" in text and f"graph 2 of {len(cap.graphs)}" in text
    assert text.count("torch.ops.spa.attention.default(") == 2
    dot = cap.render("dot", "after")
    assert '"g0.' in dot and '"g1.' in dot


def test_mlir_unavailable_is_a_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "torch_mlir", None)  # import torch_mlir -> ImportError
    reason = inspection.mlir_unavailable_reason()
    assert reason and "torch-mlir" in reason and "pip install" in reason
    with pytest.raises(inspection.MLIRUnavailableError, match="torch-mlir"):
        spa_compile.inspect(lambda x: x, torch.randn(2), format="mlir")


@pytest.mark.skipif(inspection.mlir_unavailable_reason() is not None, reason=str(inspection.mlir_unavailable_reason()))
def test_mlir_before_and_after(cap):
    before = cap.render("mlir", "before")
    after = cap.render("mlir", "after")
    assert before.count("torch.aten.scaled_dot_product_attention") == 2 and "torch.operator" not in before
    assert after.count("torch.aten.scaled_dot_product_attention") == 1
    assert after.count('torch.operator "torch.spa.attention"') == 1
    assert "//   model.layers.1.attn: spa" in after


# ---------------------------------------------------------------------------------------
# Logging
# ---------------------------------------------------------------------------------------


def test_parse_level():
    assert parse_level("1") == parse_level("info") == logging.INFO
    assert parse_level("debug") == parse_level("2") == logging.DEBUG
    assert parse_level("0") is None and parse_level("") is None and parse_level(None) is None
    with pytest.raises(ValueError, match="SPA_LOG"):
        parse_level("loud")


def test_configure_logging_prints_each_decision():
    stream = io.StringIO()
    log = configure_logging("info", stream=stream)
    try:
        inspection.capture(TwoLayers(), torch.randn(1, 64, 32), config=SITES)
    finally:
        configure_logging(None)
        log.setLevel(logging.NOTSET)
    lines = stream.getvalue().splitlines()
    assert any(
        ln.startswith("[spa_compile] INFO spa site model.layers.0.attn: dense (") for ln in lines
    ), lines
    assert any(
        re.search(r"spa site model\.layers\.1\.attn: spa \(.*\) \[pattern=sdpa mask=causal", ln) for ln in lines
    ), lines
    # Turned off again: no handler of ours is left behind.
    assert not [h for h in logging.getLogger("spa_compile").handlers if type(h).__name__ == "_SPAHandler"]
