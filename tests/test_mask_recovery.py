"""Mask structure recovery: masks built in the graph from index arithmetic become SPA structure.

Each builder makes a mask the way models do and passes it to SDPA (the same analysis runs for
decomposed sites). Recovered masks must give the structure expected, the exact output (SPA
forced exact), and leave no N x N tensor; unrecoverable masks stay dense with the reason; a
bias keeps the site dense. A property test checks recovered bands against the eager mask.
"""

from __future__ import annotations

import pytest
import torch
import torch.fx as fx
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from spa_compile import SPAConfig, Visibility
from spa_compile.backend import apply_spa_passes
from spa_compile.passes import graph_analysis as ga
from spa_compile.passes import mask_recovery as mr

EXACT = {"mode": "spa", "density": 1.0, "block_size": 16}
B, H, D = 2, 2, 8


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


class Capture:
    def __init__(self):
        self.cfg = SPAConfig.from_options(EXACT)
        self.graphs, self.records = [], []

    def __call__(self, gm, example_inputs):
        self.records += apply_spa_passes(gm, self.cfg)
        self.graphs.append(gm)
        return gm.forward

    def square_tensors(self, nq, nk):
        return [n.format_node() for gm in self.graphs for n in gm.graph.nodes
                if isinstance(n.meta.get("example_value"), torch.Tensor)
                and n.meta["example_value"].dim() >= 2 and tuple(n.meta["example_value"].shape[-2:]) == (nq, nk)]


def _qkv(nq, nk, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, H, nq, D, generator=g), torch.randn(B, H, nk, D, generator=g), torch.randn(B, H, nk, D, generator=g)


def _pad(nk, cut=7):
    valid = torch.ones(B, nk, dtype=torch.long)
    valid[1, nk - cut:] = 0
    return valid


def compile_site(build, nq=40, nk=40, with_pad=False):
    """SDPA with the mask ``build`` makes; returns (site, decision, capture), after checking the output."""
    def fn(q, k, v, *pad):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=build(q, k, *pad))

    args = (*_qkv(nq, nk), *((_pad(nk),) if with_pad else ()))
    cap = Capture()
    with torch.no_grad():
        out = torch.compile(fn, backend=cap)(*args)
        torch.testing.assert_close(out, fn(*args), rtol=1e-4, atol=1e-5)
    ((site, decision),) = cap.records
    return site, decision, cap


# --------------------------------------------------------------------------------------
# Builders: recovered
# --------------------------------------------------------------------------------------


def b_tril(q, k):
    return torch.ones(q.shape[-2], k.shape[-2], dtype=torch.bool).tril()


def b_tril_diag(q, k):
    return torch.tril(torch.ones(q.shape[-2], k.shape[-2], dtype=torch.bool), diagonal=3)


def b_triu_inf(q, k):
    return torch.triu(torch.full((q.shape[-2], k.shape[-2]), float("-inf")), diagonal=1)


def b_cache(q, k, past=8):
    t = torch.arange(past, past + q.shape[-2]).view(-1, 1)
    u = torch.arange(k.shape[-2]).view(1, -1)
    return u <= t


def b_window(q, k, w=12):
    t = torch.arange(q.shape[-2])[:, None]
    u = torch.arange(k.shape[-2])[None, :]
    return (u <= t) & (u > t - w)


def b_bidir_window(q, k, w=5):
    i = torch.arange(q.shape[-2])
    return (i[:, None] - i[None, :]).abs() <= w


def b_bert_extended(q, k, pad):
    return (1.0 - pad[:, None, None, :].to(q.dtype)) * torch.finfo(q.dtype).min


def b_bert_old(q, k, pad):  # old models: -10000.0
    return (1.0 - pad[:, None, None, :].float()) * -10000.0


def b_pad_expand_causal(q, k, pad):
    n, m = q.shape[-2], k.shape[-2]
    keep = pad.bool()[:, None, None, :].expand(B, 1, n, m)
    return keep & torch.ones(n, m, dtype=torch.bool).tril()


def b_where_finfo(q, k, pad):
    n = q.shape[-2]
    keep = torch.ones(n, n, dtype=torch.bool).tril()[None, None] & (pad[:, None, None, :] == 1)
    return torch.where(keep, torch.zeros(()), torch.finfo(torch.float32).min)


def b_masked_fill(q, k, pad):
    n = q.shape[-2]
    m = torch.zeros(B, 1, n, n)
    return m.masked_fill(pad[:, None, None, :] == 0, float("-inf")).masked_fill(
        torch.ones(n, n, dtype=torch.bool).triu(1), float("-inf"))


def b_new_full_triu(q, k):
    n = q.shape[-2]
    return q.new_full((n, n), float("-inf")).triu(1)


def b_static_key_limit(q, k):
    return (torch.arange(k.shape[-2]) < 30)[None, None, None, :].expand(1, 1, q.shape[-2], k.shape[-2])


@pytest.mark.parametrize("build,nq,nk,pad,kind", [
    (b_tril, 40, 40, False, "causal"),
    (b_tril_diag, 40, 40, False, "causal(offset=3)"),
    (b_triu_inf, 40, 40, False, "causal"),
    (b_cache, 24, 32, False, "causal(offset=8)"),
    (b_window, 40, 40, False, "causal+window(12)"),
    (b_bidir_window, 40, 40, False, "causal(offset=5)+window(11)"),
    (b_bert_extended, 40, 40, True, "key_padding"),
    (b_bert_old, 40, 40, True, "key_padding"),
    (b_pad_expand_causal, 40, 40, True, "causal+key_padding"),
    (b_where_finfo, 40, 40, True, "causal+key_padding"),
    (b_masked_fill, 40, 40, True, "causal+key_padding"),
    (b_static_key_limit, 40, 40, False, "key_padding"),
    (b_new_full_triu, 40, 40, False, "causal"),
])
def test_recovered(build, nq, nk, pad, kind):
    site, decision, cap = compile_site(build, nq, nk, pad)
    assert decision.decision == "spa" and site.mask_kind == kind, (site.mask_kind, decision.reason)
    assert site.attn_mask is None and site.mask_note is None
    assert cap.square_tensors(nq, nk) == []


# --------------------------------------------------------------------------------------
# Not recovered: an exact dense mask, with the reason
# --------------------------------------------------------------------------------------


def u_per_head(q, k):
    n = q.shape[-2]
    i = torch.arange(n)
    h = torch.arange(H)[:, None, None]
    return (i[None, None, :] <= i[None, :, None] + h)[None]


def u_packed(q, k, seq):
    return seq[:, None, :, None] == seq[:, None, None, :]


def u_chunked(q, k):
    i = torch.arange(q.shape[-2])
    return (i[:, None] // 16) == (i[None, :] // 16)


def u_input_mask(q, k, m):
    return m


def u_batch_offsets(q, k):  # a causal offset that grows with the batch row
    i = torch.arange(q.shape[-2])
    b = torch.arange(q.shape[0])
    return (i[None, None, None, :] <= i[None, None, :, None] + 3 * b[:, None, None, None])


@pytest.mark.parametrize("build,extra,why", [
    (u_per_head, None, "per head"),
    (u_packed, lambda: torch.tensor([[0] * 20 + [1] * 20, [0] * 40]), "input tensor"),
    (u_chunked, None, "band"),
    (u_input_mask, lambda: torch.rand(B, 1, 40, 40, generator=torch.Generator().manual_seed(5)) > 0.3, "input tensor"),
    (u_batch_offsets, None, "per batch"),
])
def test_unrecoverable_stays_exact_dense_with_reason(build, extra, why):
    def fn(q, k, v, *x):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=build(q, k, *x))

    args = (*_qkv(40, 40), *((extra(),) if extra else ()))
    cap = Capture()
    with torch.no_grad():
        out = torch.compile(fn, backend=cap)(*args)
        torch.testing.assert_close(out, fn(*args), rtol=1e-4, atol=1e-5)
    ((site, decision),) = cap.records
    assert decision.decision == "spa" and site.structure is None and site.attn_mask is not None
    assert site.mask_note and why in site.mask_note and "mask kept dense" in decision.reason, site.mask_note


def test_bias_keeps_the_site_dense():
    def alibi(q, k):
        i = torch.arange(q.shape[-2])
        return -(i[None, :] - i[:, None]).abs().float() * 0.25

    site, decision, cap = compile_site(alibi)
    assert decision.decision == "dense" and "bias" in decision.reason
    assert not any("spa" in str(n.target) for gm in cap.graphs for n in gm.graph.nodes)


def b_inplace_masked_fill(q, k):
    n = q.shape[-2]
    mask = torch.zeros(n, n)
    mask.masked_fill_(torch.ones(n, n, dtype=torch.bool).triu(1), float("-inf"))
    return mask


def b_old_hf_make_causal_mask(q, k):  # transformers < 4.36 _make_causal_mask, written in place
    n = q.shape[-2]
    mask = torch.full((n, n), torch.finfo(q.dtype).min)
    cond = torch.arange(mask.size(-1))
    mask.masked_fill_(cond < (cond + 1).view(mask.size(-1), 1), 0)
    return mask[None, None].expand(B, 1, n, n)


def b_old_hf_expand_mask(q, k, pad):  # transformers 4.3x _expand_mask (masked_fill of 1 - mask)
    n = q.shape[-2]
    inverted = 1.0 - pad[:, None, None, :].expand(B, 1, n, pad.shape[1]).to(torch.float32)
    return inverted.masked_fill(inverted.to(torch.bool), torch.finfo(torch.float32).min)


def b_old_hf_4d_causal(q, k, pad):  # _prepare_4d_causal_attention_mask: expanded padding + causal
    return b_old_hf_expand_mask(q, k, pad) + b_old_hf_make_causal_mask(q, k)


def b_bert_extended_plus_causal(q, k, pad):
    return b_bert_extended(q, k, pad) + b_old_hf_make_causal_mask(q, k)


@pytest.mark.parametrize("build,kind,checked", [
    (b_old_hf_expand_mask, "key_padding", False),
    (b_old_hf_4d_causal, "causal+key_padding", False),
    (b_bert_extended_plus_causal, "causal+key_padding", True),
])
def test_older_transformers_masks(build, kind, checked):
    site, decision, cap = compile_site(build, with_pad=True)
    assert site.mask_kind == kind and bool(site.structure.preconditions) == checked
    assert cap.square_tensors(40, 40) == []


@pytest.mark.parametrize("build", [b_inplace_masked_fill, b_old_hf_make_causal_mask])
def test_masks_written_in_place_are_followed(build):
    site, decision, cap = compile_site(build)
    assert site.mask_kind == "causal" and cap.square_tensors(40, 40) == []


def test_mask_written_through_a_slice_stays_dense():
    def build(q, k):
        mask = torch.zeros(1, 1, q.shape[-2], k.shape[-2])
        mask[:, :, :, k.shape[-2] - 5:] = float("-inf")  # setitem: not followed
        return mask

    site, decision, cap = compile_site(build)
    assert site.structure is None and "written in place" in site.mask_note


# --------------------------------------------------------------------------------------
# Property: recovered bands agree with the eager mask
# --------------------------------------------------------------------------------------


def _analyse_only(fn, *args):
    """Trace ``fn`` and run the analysis of its single SDPA mask; returns (structure | reason, graph)."""
    out = {}

    def backend(gm, example_inputs):
        from spa_compile.passes.find_attention import find_attention_sites

        (site,) = find_attention_sites(gm)
        out["site"] = site
        return gm.forward

    torch.compile(fn, backend=backend, dynamic=False)(*args)
    return out["site"]


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    nq=st.integers(1, 24), extra=st.integers(0, 20), past=st.integers(0, 8), window=st.integers(1, 30),
    causal=st.booleans(), use_window=st.booleans(), spelling=st.sampled_from(["cmp", "sub", "where", "tril"]),
)
def test_property_bands(nq, extra, past, window, causal, use_window, spelling):
    torch._dynamo.reset()
    nk = nq + extra
    if not (causal or use_window):
        causal = True

    def fn(q, k, v):
        t = torch.arange(nq) + past
        u = torch.arange(nk)
        if spelling == "cmp":
            keep = torch.ones(nq, nk, dtype=torch.bool)
            if causal:
                keep = keep & (u[None, :] <= t[:, None])
            if use_window:
                keep = keep & (u[None, :] > t[:, None] - window)
        elif spelling == "sub":
            d = u[None, :] - t[:, None]
            keep = torch.ones(nq, nk, dtype=torch.bool)
            if causal:
                keep = keep & ~(d > 0)
            if use_window:
                keep = keep & (d >= 1 - window)
        elif spelling == "where":
            blocked = torch.zeros(nq, nk, dtype=torch.bool)
            if causal:
                blocked = blocked | (u[None, :] - past > torch.arange(nq)[:, None])
            if use_window:
                blocked = torch.where(u[None, :] <= t[:, None] - window, True, blocked)
            keep = ~blocked
        else:
            keep = torch.ones(nq, nk, dtype=torch.bool)
            if causal:
                keep = keep.tril(past)
            if use_window:
                keep = keep & torch.ones(nq, nk, dtype=torch.bool).triu(past - window + 1)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=keep[None, None])

    q, k, v = _qkv(nq, nk)
    site = _analyse_only(fn, q, k, v)
    # the eager mask, recomputed
    t = torch.arange(nq)[:, None] + past
    u = torch.arange(nk)[None, :]
    keep = torch.ones(nq, nk, dtype=torch.bool)
    if causal:
        keep &= u <= t
    if use_window:
        keep &= u > t - window
    if not keep.any(-1).all():
        return  # rows that see nothing: nothing to compare (SPA gives 0, SDPA NaN)
    assert site.mask_note is None and site.reject_reason is None, site.mask_note
    st_ = site.structure
    if st_ is None:  # nothing masked at these sizes
        assert keep.all()
        return
    vis = Visibility(nq=nq, nk=nk, causal=st_.causal, offset=int(st_.offset),
                     window=None if st_.window is None else int(st_.window)).rows(0, nq, torch.device("cpu"))[0, 0]
    if st_.key_valid is not None:  # a degenerate band (one query row) is a static key limit
        assert not st_.leaves
        kv = torch.tensor([bool(st_.key_valid.subs({mr.D[0]: 0, st_.key_symbol: u})) for u in range(nk)])
        vis = vis & kv[None, :]
    assert torch.equal(vis, keep), (st_, spelling)


# --------------------------------------------------------------------------------------
# The evaluator and the graph analyses directly
# --------------------------------------------------------------------------------------


def test_symbolic_values_of_index_arithmetic():
    def f(x):
        n = x.shape[-1]
        i = torch.arange(3, 3 + n)
        return (i[:, None] - torch.arange(n)[None, :]) >= 2

    site_graph = {}

    def backend(gm, example_inputs):
        site_graph["gm"] = gm
        return gm.forward

    torch.compile(f, backend=backend)(torch.zeros(5))
    gm = site_graph["gm"]
    ev = mr.MaskEvaluator(gm.graph)
    out = [n for n in gm.graph.nodes if n.op == "output"][0].args[0][0]
    val = ev.value(out)
    d0, d1 = mr.D[0], mr.D[1]
    assert val.kind == "bool" and val.ndim == 2
    import sympy

    assert sympy.simplify(val.expr.lhs - val.expr.rhs - (3 + d0 - d1 - 2)) == 0 or sympy.simplify(
        val.expr.rhs - val.expr.lhs - (3 + d0 - d1 - 2)) == 0


def test_dead_code_keeps_live_in_place_mutations():
    g = fx.Graph()
    x = g.placeholder("x")
    y = g.call_method("clone", (x,))
    g.call_method("add_", (y, 1))  # mutates y, which is returned: live
    z = g.call_method("clone", (x,))
    g.call_method("mul_", (z, 2))  # mutates z, which nobody reads: dead
    g.call_method("add_", (x, 0))  # mutates an input: live
    g.output(y)
    gm = fx.GraphModule(torch.nn.Module(), g)
    dead = ga.dead_nodes(gm.graph)
    assert sorted(n.name for n in dead) == ["clone_1", "mul_"]
    ga.eliminate_dead_code(gm)
    assert [n.name for n in gm.graph.nodes] == ["x", "clone", "add_", "add__1", "output"]


def test_networkx_helpers():
    g = fx.Graph()
    a = g.placeholder("a")
    b = g.call_function(torch.relu, (a,))
    c = g.call_function(torch.sigmoid, (b,))
    d = g.call_function(torch.add, (b, c))
    g.output(d)
    dg = ga.to_digraph(g)
    assert ga.depends_on(dg, d, [a]) and not ga.depends_on(dg, b, [c])
    assert ga.producers(dg, [c]) == {a, b, c}
    assert ga.escapes(dg, [b], allowed=[c]) == [(b, d)]
    classes = ga.alias_classes(g)
    assert len({classes[n] for n in (a, b, c, d)}) == 4  # no views: four separate tensors


def test_integer_padding_vector_values_checked_at_run_time():
    """``(1 - mask) * finfo.min`` on an integer mask is key padding where mask == 1; a value that
    makes the additive mask neither 0 nor -inf (mask == 2) fails loudly instead of silently."""
    def fn(q, k, v, pad):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=b_bert_extended(q, k, pad))

    q, k, v = _qkv(40, 40)
    cap = Capture()
    compiled = torch.compile(fn, backend=cap)
    with torch.no_grad():
        torch.testing.assert_close(compiled(q, k, v, _pad(40)), fn(q, k, v, _pad(40)), rtol=1e-4, atol=1e-5)
        ((site, _),) = cap.records
        assert site.mask_kind == "key_padding" and site.structure.preconditions
        bad = _pad(40)
        bad[0, 3] = 2
        with pytest.raises(RuntimeError, match="padding vector"):
            compiled(q, k, v, bad)


def test_float_input_mask_is_not_assumed_to_be_padding():
    """A float [B, 1, 1, Nk] input may be a bias: it stays a dense mask (no run-time assumption)."""
    def fn(q, k, v, m):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=m)

    q, k, v = _qkv(40, 40)
    m = torch.zeros(B, 1, 1, 40)
    m[1, ..., 30:] = float("-inf")
    cap = Capture()
    with torch.no_grad():
        torch.testing.assert_close(torch.compile(fn, backend=cap)(q, k, v, m), fn(q, k, v, m), rtol=1e-4, atol=1e-5)
    ((site, decision),) = cap.records
    assert site.structure is None and site.attn_mask is not None and site.mask_kind == "additive"
    assert "input tensor" in decision.reason
