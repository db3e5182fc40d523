"""Hand-written attention in every spelling of point 1 of the issue, and the negative cases.

Each pattern is compiled with the SPA passes forced exact (mode="spa", density=1.0) and run
eagerly from the rewritten graph: the output must equal the uncompiled function, the site
must be found with the expected mask structure, and nothing of size N x N may be left where
the mask was recoverable. Negative cases must stay untouched with the reason recorded.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import spa_compile
from spa_compile import SPAConfig
from spa_compile.backend import apply_spa_passes

EXACT = {"mode": "spa", "density": 1.0, "block_size": 16}
B, H, N, D = 2, 2, 40, 8


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


class Capture:
    def __init__(self, **options):
        self.cfg = SPAConfig.from_options({**EXACT, **options})
        self.graphs, self.records = [], []

    def __call__(self, gm, example_inputs):
        self.records += apply_spa_passes(gm, self.cfg)
        self.graphs.append(gm)
        return gm.forward

    @property
    def sites(self):
        return [s for s, _ in self.records]

    def square_tensors(self, nq=N, nk=N):
        return [n.format_node() for gm in self.graphs for n in gm.graph.nodes
                if isinstance(n.meta.get("example_value"), torch.Tensor)
                and n.meta["example_value"].dim() >= 2 and tuple(n.meta["example_value"].shape[-2:]) == (nq, nk)]

    def spa_ops(self):
        return sum(1 for gm in self.graphs for n in gm.graph.nodes if "spa" in str(n.target) and "attention" in str(n.target))


def _qkv(b=B, h=H, nq=N, nk=N, d=D, hkv=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    hkv = h if hkv is None else hkv
    return (torch.randn(b, h, nq, d, generator=g), torch.randn(b, hkv, nk, d, generator=g),
            torch.randn(b, hkv, nk, d, generator=g))


def run(fn, *args, expect_spa=True, dynamic=False, **options):
    """Compile ``fn`` with the passes (exact SPA), compare with eager; returns the capture."""
    cap = Capture(**options)
    with torch.no_grad():
        ref = fn(*args)
        out = torch.compile(fn, backend=cap, dynamic=dynamic)(*args)
    outs, refs = (out, ref) if isinstance(out, tuple) else ((out,), (ref,))
    for a, b in zip(outs, refs):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    if expect_spa:
        assert cap.records and all(d.decision == "spa" for _, d in cap.records), [
            (s.name, d.reason) for s, d in cap.records]
        assert cap.spa_ops() == len(cap.records)
    return cap


def _causal_mask(n=N, m=None):
    m = n if m is None else m
    return torch.ones(n, m, dtype=torch.bool).tril()


# --------------------------------------------------------------------------------------
# 1. Scores: matmul, @, bmm, baddbmm, einsum; layouts
# --------------------------------------------------------------------------------------


def f_matmul(q, k, v):
    s = torch.matmul(q, k.transpose(-2, -1)) / math.sqrt(q.size(-1))
    return torch.matmul(F.softmax(s, dim=-1), v)


def f_at_permute(q, k, v):  # [B, N, H, D] inputs, permuted inside
    qq, kk, vv = q.permute(0, 2, 1, 3), k.permute(0, 2, 3, 1), v.permute(0, 2, 1, 3)
    return (qq @ kk * 0.35).softmax(-1) @ vv


def f_bmm_3d(q, k, v):  # (B*H, N, D)
    b, h, n, d = q.shape
    q3, k3, v3 = (x.reshape(b * h, -1, d) for x in (q, k, v))
    w = torch.bmm(q3, k3.transpose(1, 2)) * d**-0.5
    return torch.bmm(torch.softmax(w, dim=2), v3).view(b, h, n, d)


def f_baddbmm(q, k, v):
    b, h, n, d = q.shape
    q3, k3, v3 = (x.reshape(b * h, n, d) for x in (q, k, v))
    zeros = torch.zeros(b * h, n, n, dtype=q.dtype)
    w = torch.baddbmm(zeros, q3, k3.transpose(1, 2), beta=0.0, alpha=1.0 / math.sqrt(d))
    return torch.bmm(w.softmax(-1), v3)


def f_einsum(q, k, v):
    s = torch.einsum("bhqd,bhkd->bhqk", q, k) * q.shape[-1] ** -0.5
    return torch.einsum("bhqk,bhkd->bhqd", s.softmax(dim=-1), v)


def f_einsum_bnhd(q, k, v):  # [B, N, H, D] in and out
    qq, kk, vv = (x.transpose(1, 2) for x in (q, k, v))
    s = torch.einsum("bqhd,bkhd->bhqk", qq, kk) / 3.0
    return torch.einsum("bhqk,bkhd->bqhd", s.softmax(-1), vv)


def f_view_reshape_q(q, k, v):  # q/k/v through views and reshapes, k transposed by permute
    b, h, n, d = q.shape
    x = q.transpose(1, 2).reshape(b, n, h * d)
    qq = x.view(b, n, h, d).transpose(1, 2)
    kt = k.permute(0, 1, 3, 2)
    return (torch.matmul(qq, kt) * 0.25).softmax(-1).matmul(v)


@pytest.mark.parametrize("fn,pattern", [
    (f_matmul, "matmul/softmax/matmul"),
    (f_at_permute, "matmul/softmax/matmul"),
    (f_bmm_3d, "bmm/softmax/bmm"),
    (f_baddbmm, "baddbmm/softmax/bmm"),
    (f_einsum, "einsum/softmax/einsum"),
    (f_einsum_bnhd, "einsum/softmax/einsum"),
    (f_view_reshape_q, "matmul/softmax/matmul"),
])
def test_score_products_and_layouts(fn, pattern):
    q, k, v = _qkv()
    if fn is f_at_permute or fn is f_einsum_bnhd:
        q, k, v = (x.transpose(1, 2).contiguous() for x in (q, k, v))
    cap = run(fn, q, k, v)
    (site,) = cap.sites
    assert site.pattern == pattern and site.mask_kind == "none"
    assert site.structure is None and site.attn_mask is None
    assert cap.square_tensors() == []  # scores and weights are gone


# --------------------------------------------------------------------------------------
# 2. Scale: on scores, q, k, split; number, size sqrt, 0-d constant tensor
# --------------------------------------------------------------------------------------


def s_div_scores(q, k, v):
    return (q @ k.transpose(-2, -1) / 4.0).softmax(-1) @ v


def s_on_q(q, k, v):
    return ((q * 0.5) @ k.transpose(-2, -1)).softmax(-1) @ v


def s_on_k(q, k, v):
    return (q @ (k.transpose(-2, -1) / 2.0)).softmax(-1) @ v


def s_split(q, k, v):
    d = q.size(-1)
    return ((q * d**-0.25) @ (k * d**-0.25).transpose(-2, -1)).softmax(-1) @ v


def s_tensor_const(q, k, v):
    inv = torch.tensor(math.sqrt(q.shape[-1]), dtype=q.dtype)
    return (torch.matmul(q, k.transpose(-2, -1)).div(inv)).softmax(-1).matmul(v)


def s_full_const(q, k, v):  # GPT-2 style: torch.full([], value)
    w = torch.matmul(q, k.permute(0, 1, 3, 2))
    w = w / torch.full([], 8.0**0.5, dtype=w.dtype)
    return w.softmax(dim=-1).matmul(v)


def s_size_sqrt(q, k, v):  # sqrt of a size computed in the graph (symbolic under dynamic=True)
    return torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(q.size(-1)), -1) @ v


def s_sqrt_tensor_of_size(q, k, v):
    return torch.softmax(q @ k.transpose(-2, -1) / torch.sqrt(torch.tensor(q.size(-1), dtype=torch.float32)), -1) @ v


def s_mul_inplace(q, k, v):
    s = q @ k.transpose(-2, -1)
    s *= 0.3
    s /= 1.5
    return s.softmax(-1) @ v


@pytest.mark.parametrize("fn,scale", [
    (s_div_scores, 0.25), (s_on_q, 0.5), (s_on_k, 0.5), (s_split, 1 / math.sqrt(D)), (s_tensor_const, 1 / math.sqrt(D)),
    (s_full_const, 1 / math.sqrt(D)), (s_size_sqrt, 1 / math.sqrt(D)), (s_sqrt_tensor_of_size, 1 / math.sqrt(D)),
    (s_mul_inplace, 0.2),
])
def test_scale_spellings(fn, scale):
    cap = run(fn, *_qkv())
    (site,) = cap.sites
    assert math.isclose(site.scale, scale, rel_tol=1e-6)
    assert not site.scale_nodes


def test_scale_from_symbolic_size_is_folded_into_q():
    cap = run(s_size_sqrt, *_qkv(), dynamic=True)
    (site,) = cap.sites
    # the head dim is a symbol: the factor stays a graph value and multiplies q
    assert site.scale_nodes and site.scale == 1.0


def test_runtime_scale_tensor_stays_dense_with_reason():
    def f(q, k, v, temp):
        return (q @ k.transpose(-2, -1) * temp).softmax(-1) @ v

    cap = run(f, *_qkv(), torch.tensor(0.3), expect_spa=False)
    ((site, d),) = cap.records
    assert d.decision == "dense" and "varies at run time" in d.reason
    assert cap.spa_ops() == 0


# --------------------------------------------------------------------------------------
# 3. Masks: additive, in-place add, masked_fill (in place too), where
# --------------------------------------------------------------------------------------


def m_additive(q, k, v):
    n = q.shape[-2]
    mask = torch.zeros(n, n).masked_fill(~torch.ones(n, n, dtype=torch.bool).tril(), float("-inf"))
    return (q @ k.transpose(-2, -1) * 0.3 + mask).softmax(-1) @ v


def m_iadd(q, k, v):
    n = q.shape[-2]
    s = q @ k.transpose(-2, -1)
    s += torch.triu(torch.full((n, n), float("-inf")), diagonal=1)
    return s.softmax(-1) @ v


def m_masked_fill(q, k, v):
    n = q.shape[-2]
    s = (q @ k.transpose(-2, -1)) * 0.3
    s = s.masked_fill(torch.tril(torch.ones(n, n)) == 0, float("-inf"))
    return F.softmax(s, dim=-1) @ v


def m_masked_fill_inplace(q, k, v):
    n = q.shape[-2]
    s = (q @ k.transpose(-2, -1)) * 0.3
    s.masked_fill_(torch.ones(n, n, dtype=torch.bool).triu(1), torch.finfo(s.dtype).min)
    return F.softmax(s, dim=-1) @ v


def m_where(q, k, v):
    n = q.shape[-2]
    i = torch.arange(n)
    s = torch.where(i[None, :] <= i[:, None], q @ k.transpose(-2, -1), torch.tensor(-1e9))
    return torch.softmax(s, -1) @ v


def m_where_min(q, k, v):
    n = q.shape[-2]
    i = torch.arange(n)
    s = q @ k.transpose(-2, -1)
    s = torch.where(i[None, :] > i[:, None], torch.finfo(s.dtype).min, s)
    return torch.softmax(s, -1) @ v


@pytest.mark.parametrize("fn", [m_additive, m_iadd, m_masked_fill, m_masked_fill_inplace, m_where, m_where_min])
def test_mask_spellings_recovered_causal(fn):
    cap = run(fn, *_qkv())
    (site,) = cap.sites
    assert site.mask_kind == "causal" and site.structure.causal and site.structure.offset == 0
    assert cap.square_tensors() == []


def test_in_place_mask_stays_applied_when_the_site_stays_dense():
    """FX's own DCE would drop ``masked_fill_`` (an unused call_method): ours keeps it."""
    cap = run(m_masked_fill_inplace, *_qkv(), mode="dense", expect_spa=False)
    assert cap.spa_ops() == 0 and any("masked_fill_" in str(n.target) for n in cap.graphs[0].graph.nodes)


# --------------------------------------------------------------------------------------
# 4. Softmax spellings, casts, dropout
# --------------------------------------------------------------------------------------


def sm_method_dtype(q, k, v):
    return (q @ k.transpose(-2, -1)).softmax(dim=3, dtype=torch.float32) @ v


def sm_float_type_as(q, k, v):
    s = (q @ k.transpose(-2, -1)) * 0.3
    return torch.softmax(s.float(), dim=-1).type_as(q) @ v


def sm_to_type(q, k, v):
    s = torch.matmul(q, k.transpose(2, 3)).to(torch.float64)
    p = F.softmax(s, -1, dtype=torch.float32).type(torch.float32)
    return torch.matmul(p.to(v.dtype), v)


class SoftmaxModule(nn.Module):
    def __init__(self):
        super().__init__()
        self.sm = nn.Softmax(dim=-1)
        self.drop = nn.Dropout(0.1)

    def forward(self, q, k, v):
        return self.drop(self.sm(q @ k.transpose(-2, -1) * 0.3)) @ v


@pytest.mark.parametrize("fn", [sm_method_dtype, sm_float_type_as, sm_to_type, SoftmaxModule().eval()])
def test_softmax_spellings_casts_and_eval_dropout(fn):
    cap = run(fn, *_qkv())
    (site,) = cap.sites
    assert site.dropout_p == 0.0


def test_training_dropout_stays_dense_with_reason():
    torch.manual_seed(0)
    m = SoftmaxModule().train()
    cap = Capture()
    torch.compile(m, backend=cap)(*_qkv())
    ((site, d),) = cap.records
    assert d.decision == "dense" and "dropout" in d.reason


# --------------------------------------------------------------------------------------
# 5. GQA folding
# --------------------------------------------------------------------------------------


def repeat_kv(x, g):
    b, h, n, d = x.shape
    return x[:, :, None, :, :].expand(b, h, g, n, d).reshape(b, h * g, n, d)


def g_expand(q, k, v):
    g = q.shape[1] // k.shape[1]
    return (q @ repeat_kv(k, g).transpose(2, 3) * 0.3).softmax(-1) @ repeat_kv(v, g)


def g_repeat_interleave(q, k, v):
    g = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(g, dim=1), torch.repeat_interleave(v, g, dim=1)
    return F.scaled_dot_product_attention(q, k, v, is_causal=True)


def g_broadcast(q, k, v):  # MQA through matmul broadcasting ([B, 1, N, D] keys)
    return (q @ k[:, :1].transpose(-2, -1) * 0.3).softmax(-1) @ v[:, :1]


@pytest.mark.parametrize("fn", [g_expand, g_repeat_interleave, g_broadcast])
def test_gqa_folded(fn):
    q, k, v = _qkv(h=4, hkv=2)
    cap = run(fn, q, k, v)
    (site,) = cap.sites
    assert site.enable_gqa
    hkv = 1 if fn is g_broadcast else 2
    assert site.k_shape[1] == hkv and site.v_shape[1] == hkv
    # the expanded copies are gone
    assert not [n for gm in cap.graphs for n in gm.graph.nodes if str(n.target) in ("expand", "repeat_interleave")]


def test_tiled_repeat_is_not_folded():
    def f(q, k, v):  # k.repeat tiles heads (h % Hkv): not grouped-query semantics
        return (q @ k.repeat(1, 2, 1, 1).transpose(-2, -1)).softmax(-1) @ v.repeat(1, 2, 1, 1)

    cap = run(f, *_qkv(h=4, hkv=2))
    (site,) = cap.sites
    assert not site.enable_gqa and site.k_shape[1] == 4


# --------------------------------------------------------------------------------------
# 6. Sites: nanoGPT, cross-attention, KV cache, names
# --------------------------------------------------------------------------------------


class NanoGPTAttention(nn.Module):
    """nanoGPT's CausalSelfAttention, slow path (a registered tril buffer)."""

    def __init__(self, n_embd=32, n_head=4, block_size=64):
        super().__init__()
        self.c_attn = nn.Linear(n_embd, 3 * n_embd)
        self.c_proj = nn.Linear(n_embd, n_embd)
        self.attn_dropout = nn.Dropout(0.0)
        self.n_head, self.n_embd = n_head, n_embd
        self.register_buffer("bias", torch.tril(torch.ones(block_size, block_size)).view(1, 1, block_size, block_size))

    def forward(self, x):
        B_, T, C = x.size()
        q, k, v = self.c_attn(x).split(self.n_embd, dim=2)
        k = k.view(B_, T, self.n_head, C // self.n_head).transpose(1, 2)
        q = q.view(B_, T, self.n_head, C // self.n_head).transpose(1, 2)
        v = v.view(B_, T, self.n_head, C // self.n_head).transpose(1, 2)
        att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(k.size(-1)))
        att = att.masked_fill(self.bias[:, :, :T, :T] == 0, float("-inf"))
        att = F.softmax(att, dim=-1)
        att = self.attn_dropout(att)
        y = att @ v
        y = y.transpose(1, 2).contiguous().view(B_, T, C)
        return self.c_proj(y)


class NanoGPTInline(NanoGPTAttention):
    """The same with the mask built inline from T (no N x N buffer)."""

    def forward(self, x):
        B_, T, C = x.size()
        q, k, v = self.c_attn(x).split(self.n_embd, dim=2)
        k = k.view(B_, T, self.n_head, C // self.n_head).transpose(1, 2)
        q = q.view(B_, T, self.n_head, C // self.n_head).transpose(1, 2)
        v = v.view(B_, T, self.n_head, C // self.n_head).transpose(1, 2)
        att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(k.size(-1)))
        mask = torch.tril(torch.ones(T, T, device=x.device)).view(1, 1, T, T)
        att = att.masked_fill(mask == 0, float("-inf"))
        y = self.attn_dropout(F.softmax(att, dim=-1)) @ v
        return self.c_proj(y.transpose(1, 2).contiguous().view(B_, T, C))


class Blocks(nn.Module):
    def __init__(self, cls, n=2):
        super().__init__()
        self.h = nn.ModuleList([cls() for _ in range(n)])

    def forward(self, x):
        for blk in self.h:
            x = x + blk(x)
        return x


def test_nanogpt_buffer_mask_kept_dense_and_flagged():
    torch.manual_seed(0)
    model = Blocks(NanoGPTAttention).eval()
    cap = run(model, torch.randn(2, 40, 32))
    assert [s.name for s in cap.sites] == ["model.h.0", "model.h.1"]
    for site, d in cap.records:
        # the mask is read from a buffer (values unknown at compile time): exact dense mask, flagged
        assert site.attn_mask is not None and site.mask_note and "mask kept dense" in d.reason


def test_nanogpt_inline_mask_recovered():
    torch.manual_seed(0)
    model = Blocks(NanoGPTInline).eval()
    cap = run(model, torch.randn(2, 40, 32))
    assert [s.mask_kind for s in cap.sites] == ["causal", "causal"]
    assert cap.square_tensors() == []


class CrossAttention(nn.Module):
    def __init__(self, dim=32, heads=4):
        super().__init__()
        self.q, self.kv, self.heads = nn.Linear(dim, dim), nn.Linear(dim, 2 * dim), heads

    def forward(self, x, memory, memory_valid):
        b, n, c = x.shape
        m = memory.shape[1]
        q = self.q(x).view(b, n, self.heads, -1).transpose(1, 2)
        k, v = self.kv(memory).view(b, m, 2, self.heads, -1).permute(2, 0, 3, 1, 4)
        s = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])
        ext = (1.0 - memory_valid[:, None, None, :].to(s.dtype)) * torch.finfo(s.dtype).min  # BERT style
        return ((s + ext).softmax(-1) @ v).transpose(1, 2).reshape(b, n, c)


class EncoderDecoder(nn.Module):
    def __init__(self):
        super().__init__()
        self.self_attn = NanoGPTInline()
        self.cross_attn = CrossAttention()

    def forward(self, x, memory, memory_valid):
        x = x + self.self_attn(x)
        return x + self.cross_attn(x, memory, memory_valid)


def test_cross_attention_with_key_padding():
    torch.manual_seed(0)
    model = EncoderDecoder().eval()
    valid = torch.ones(2, 56, dtype=torch.bool)
    valid[0, 50:] = False
    cap = run(model, torch.randn(2, 40, 32), torch.randn(2, 56, 32), valid)
    names = {s.name: s for s in cap.sites}
    assert set(names) == {"model.self_attn", "model.cross_attn"}
    cross = names["model.cross_attn"]
    assert cross.q_shape[-2] == 40 and cross.k_shape[-2] == 56 and cross.mask_kind == "key_padding"
    assert cap.square_tensors(40, 56) == [] and cap.square_tensors(40, 40) == []


def test_kv_cache_offset_and_sliding_window():
    def f(q, k, v, past_len: int = 24, window: int = 10):
        nq, nk = q.shape[-2], k.shape[-2]
        t = torch.arange(past_len, past_len + nq)[:, None]
        u = torch.arange(nk)[None, :]
        keep = (u <= t) & (u > t - window)
        s = (q @ k.transpose(-2, -1) * 0.3).masked_fill(~keep, float("-inf"))
        return s.softmax(-1) @ v

    q, k, v = _qkv(nq=16, nk=40)
    cap = run(f, q, k, v)
    (site,) = cap.sites
    st = site.structure
    assert st.causal and st.offset == 24 and st.window == 10
    assert site.mask_kind == "causal(offset=24)+window(10)"
    assert cap.square_tensors(16, 40) == []


def test_bart_style_3d_scores_viewed_4d_for_the_mask():
    """BART/MBart eager attention: bmm on (B*H, N, D), a view to [B, H, N, N] to add the mask, back to 3-D."""
    def f(q, k, v):
        b, h, n, d = q.shape
        q3 = (q * d**-0.5).reshape(b * h, n, d)
        k3, v3 = k.reshape(b * h, n, d), v.reshape(b * h, n, d)
        w = torch.bmm(q3, k3.transpose(1, 2))
        mask = torch.full((n, n), torch.finfo(q.dtype).min).triu(1)[None, None]
        w = (w.view(b, h, n, n) + mask).view(b * h, n, n)
        return torch.bmm(F.softmax(w, dim=-1), v3).view(b, h, n, d)

    cap = run(f, *_qkv())
    (site,) = cap.sites
    assert site.pattern == "bmm/softmax/bmm" and site.mask_kind == "causal" and site.q_shape == (B, H, N, D)
    assert cap.square_tensors() == []


def test_t5_style_position_bias_runs_dense_inside_the_op():
    """T5: no scale, a learned position bias added to the scores: a bias, kept as a dense additive mask."""
    emb = nn.Embedding(2 * N, H)

    def f(q, k, v):
        rel = torch.arange(N)[None, :] - torch.arange(N)[:, None] + N
        bias = emb(rel).permute(2, 0, 1)[None]  # [1, H, N, N]
        s = torch.matmul(q, k.transpose(3, 2))
        s += bias
        return F.softmax(s.float(), dim=-1).type_as(s) @ v

    cap = run(f, *_qkv())
    ((site, d),) = cap.records
    assert site.structure is None and site.mask_kind == "additive" and "mask kept dense" in d.reason


# --------------------------------------------------------------------------------------
# 7. Negative cases: untouched, with the reason in explain
# --------------------------------------------------------------------------------------


def neg_weights_returned(q, k, v):
    p = (q @ k.transpose(-2, -1) * 0.3).softmax(-1)
    return p @ v, p


def neg_wrong_axis(q, k, v):
    return (q @ k.transpose(-2, -1) * 0.3).softmax(dim=-2) @ v


def neg_wrong_axis_explicit(q, k, v):
    return torch.softmax(q @ k.transpose(-2, -1), 2) @ v


def neg_contract_over_queries(q, k, v):  # weights used transposed: a product over the query axis
    p = (q @ k.transpose(-2, -1)).softmax(-1)
    return p.transpose(-2, -1) @ v


def neg_scores_reused(q, k, v):
    s = q @ k.transpose(-2, -1)
    return s.softmax(-1) @ v + s.mean()


def neg_bias_mask(q, k, v):  # ALiBi-like: a bias, not a visibility mask
    n = q.shape[-2]
    i = torch.arange(n)
    bias = -(i[None, :] - i[:, None]).abs().float() * 0.5
    return (q @ k.transpose(-2, -1) + bias).softmax(-1) @ v


@pytest.mark.parametrize("fn,why", [
    (neg_weights_returned, "returned"),
    (neg_wrong_axis, "not over the key axis"),
    (neg_wrong_axis_explicit, "not over the key axis"),
    (neg_contract_over_queries, "not a product with v"),
    (neg_scores_reused, "another user"),
    (neg_bias_mask, "bias"),
])
def test_negative_cases_untouched_with_reason(fn, why):
    q, k, v = _qkv()
    cap = run(fn, q, k, v, expect_spa=False)
    ((site, d),) = cap.records
    assert d.decision == "dense" and why in d.reason, d.reason
    assert site.reject_reason
    assert cap.spa_ops() == 0
    report = spa_compile.explain(fn, q, k, v, config={"mode": "spa"})
    assert len(report.sites) == 1 and report.sites[0].decision == "dense" and why in report.sites[0].reason


def test_softmax_chains_that_are_not_attention_are_not_sites():
    class Classifier(nn.Module):
        def __init__(self):
            super().__init__()
            self.head = nn.Linear(8, 5)
            self.gate = nn.Linear(8, 8)

        def forward(self, x):
            probs = self.head(x).softmax(-1)  # a classifier's softmax
            gate = self.gate(x).softmax(-1) * x  # a softmax gate (elementwise, no product)
            tied = (x @ self.gate.weight.t()).softmax(-1)  # an output head as a product with a weight
            return probs, gate, tied

    cap = run(Classifier().eval(), torch.randn(2, 40, 8), expect_spa=False)
    assert cap.records == []


def test_inductor_end_to_end():
    """One run through Inductor: the rewritten graph with recovered structure compiles."""
    q, k, v = _qkv()
    fn = m_masked_fill
    out = torch.compile(fn, backend="spa", options={**EXACT, "inner_backend": "inductor"})(q, k, v)
    torch.testing.assert_close(out, fn(q, k, v), rtol=1e-4, atol=1e-5)


def test_training_step_through_rewritten_decomposed_attention():
    """Gradients through a rewritten hand-written attention (recovered causal mask, aot_eager)."""
    torch.manual_seed(0)
    model = Blocks(NanoGPTInline).train()  # attention dropout p=0: identity even in training
    twin = Blocks(NanoGPTInline).train()
    twin.load_state_dict(model.state_dict())
    x = torch.randn(2, 40, 32)
    compiled = torch.compile(twin, backend="spa", options={**EXACT, "inner_backend": "aot_eager"})
    model(x).square().mean().backward()
    compiled(x).square().mean().backward()
    for (name, a), (_, b) in zip(model.named_parameters(), twin.named_parameters()):
        torch.testing.assert_close(b.grad, a.grad, rtol=1e-4, atol=1e-5, msg=name)
