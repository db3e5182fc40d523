"""The reference implementation against SDPA (exactness) and against SPEC.md read literally."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from naive_spa import naive_spa
from spa_compile import Projector, SPAConfig, Visibility
from spa_compile import reference as R


def _inputs(b, hq, hkv, nq, nk, d, dv=None, dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    mk = lambda *s: torch.randn(*s, generator=gen, dtype=dtype)  # noqa: E731
    return mk(b, hq, nq, d), mk(b, hkv, nk, d), mk(b, hkv, nk, dv or d)


def _sdpa(q, k, v, **kw):
    return F.scaled_dot_product_attention(q, k, v, enable_gqa=q.shape[1] != k.shape[1], **kw)


# ---------------------------------------------------------------------------------------
# Exactness: every visible block selected -> dense attention
# ---------------------------------------------------------------------------------------

shapes = st.fixed_dictionaries(
    {
        "b": st.integers(1, 2),
        "hkv": st.sampled_from([1, 2]),
        "g": st.sampled_from([1, 2, 4]),
        "nq": st.integers(1, 90),
        "nk": st.integers(1, 90),
        "d": st.sampled_from([4, 8, 16]),
        "block": st.sampled_from([16, 32]),
        "mask": st.sampled_from(["none", "causal", "bool", "additive", "padding"]),
        "selection": st.sampled_from(["group", "head"]),
        "seed": st.integers(0, 2**16),
    }
)


@settings(max_examples=40, deadline=None)
@given(shapes)
def test_full_density_equals_sdpa(p):
    q, k, v = _inputs(p["b"], p["hkv"] * p["g"], p["hkv"], p["nq"], p["nk"], p["d"], seed=p["seed"])
    gen = torch.Generator().manual_seed(p["seed"] + 1)
    kw = {}
    if p["mask"] == "causal":
        kw["is_causal"] = True
    elif p["mask"] == "bool":
        kw["attn_mask"] = torch.rand(p["b"], 1, p["nq"], p["nk"], generator=gen) > 0.3
    elif p["mask"] == "additive":
        keep = torch.rand(p["nq"], p["nk"], generator=gen) > 0.3
        kw["attn_mask"] = torch.zeros(p["nq"], p["nk"]).masked_fill(~keep, -math.inf)
    elif p["mask"] == "padding":
        lengths = torch.randint(1, p["nk"] + 1, (p["b"],), generator=gen)
        kw["attn_mask"] = (torch.arange(p["nk"])[None, :] < lengths[:, None])[:, None, None, :]
    cfg = SPAConfig(density=1.0, block_size=p["block"], selection=p["selection"])
    out = R.spa_attention(q, k, v, config=cfg, enable_gqa=True, **kw)
    ref = _sdpa(q, k, v, **kw)
    # rows that see no key: SPEC says 0; SDPA gives NaN or 0 depending on the backend
    seen = _visible_rows(kw, p)
    torch.testing.assert_close(out[seen], ref[seen], rtol=1e-5, atol=1e-5)
    assert torch.all(out[~seen] == 0)


def _visible_rows(kw, p):
    b, hq, nq = p["b"], p["hkv"] * p["g"], p["nq"]
    if "attn_mask" not in kw:
        seen = torch.ones(b, hq, nq, dtype=torch.bool)
        if kw.get("is_causal"):
            return seen  # top-left causal: row t sees key 0
        return seen if p["nk"] > 0 else ~seen
    m = kw["attn_mask"]
    vis = m if m.dtype == torch.bool else m == 0
    return vis.expand(b, hq, nq, p["nk"]).any(-1)


def test_topk_at_least_visible_blocks_is_exact():
    q, k, v = _inputs(1, 4, 2, 100, 100, 16)
    cfg = SPAConfig(topk=10, block_size=16, sink_blocks=0, local_blocks=0)
    out = R.spa_attention(q, k, v, is_causal=True, config=cfg, enable_gqa=True)
    torch.testing.assert_close(out, _sdpa(q, k, v, is_causal=True), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_inputs_computed_in_fp32(dtype):
    q, k, v = _inputs(1, 2, 2, 70, 70, 16, dtype=dtype)
    out, lse = R.spa_attention(q, k, v, is_causal=True, config=SPAConfig(density=1.0, block_size=16), return_lse=True)
    assert out.dtype == dtype and lse.dtype == torch.float32
    ref = _sdpa(q.float(), k.float(), v.float(), is_causal=True)
    torch.testing.assert_close(out.float(), ref, rtol=1e-2, atol=1e-2)


# ---------------------------------------------------------------------------------------
# Selection and fill against the literal transcription of SPEC.md
# ---------------------------------------------------------------------------------------


def _visible_full(kind, b, hq, nq, nk, gen, offset=0, window=None):
    t = torch.arange(nq)[:, None]
    u = torch.arange(nk)[None, :]
    vis = torch.ones(b, hq, nq, nk, dtype=torch.bool)
    if kind in ("causal", "causal_padding", "window"):
        vis &= u <= t + offset
    if kind == "window":
        vis &= u > t + offset - window
    if kind in ("padding", "causal_padding"):
        lengths = torch.randint(nk // 2, nk + 1, (b,), generator=gen)
        vis &= (torch.arange(nk)[None, :] < lengths[:, None])[:, None, None, :]
    if kind == "bool":
        vis &= torch.rand(b, 1, nq, nk, generator=gen) > 0.4
    return vis


CASES = [
    dict(kind="causal", density=0.3, sink=1, local=1, fill="landmark"),
    dict(kind="causal", density=0.5, sink=0, local=2, fill="none"),
    dict(kind="none", topk=2, sink=1, local=0, fill="landmark"),
    dict(kind="padding", density=0.4, sink=1, local=1, fill="landmark"),
    dict(kind="causal_padding", density=0.3, sink=1, local=1, fill="landmark", per_head=True),
    dict(kind="bool", density=0.4, sink=1, local=1, fill="landmark"),
    dict(kind="causal", density=0.2, min_blocks=2, max_blocks=3, sink=1, local=1, fill="landmark"),
    dict(kind="window", density=0.3, sink=1, local=1, fill="landmark", window=40, offset=0),
    dict(kind="causal", density=0.3, sink=1, local=1, fill="landmark", offset=23, nk_extra=23),
    dict(kind="causal", density=0.3, sink=1, local=1, fill="landmark", projector=True),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()))
def test_matches_literal_spec(case):
    gen = torch.Generator().manual_seed(7)
    b, hkv, g, d, block = 2, 2, 2, 8, 16
    nq = 75
    nk = nq + case.get("nk_extra", 0)
    hq = hkv * g
    q, k, v = _inputs(b, hq, hkv, nq, nk, d, dv=6, dtype=torch.float64, seed=3)
    offset, window = case.get("offset", 0), case.get("window")
    visible = _visible_full(case["kind"], b, hq, nq, nk, gen, offset, window)
    projector = None
    if case.get("projector"):
        projector = Projector(torch.randn(hkv, d, 4, generator=gen, dtype=torch.float64),
                              torch.randn(hkv, d, 4, generator=gen, dtype=torch.float64))
    cfg = SPAConfig(block_size=block, density=case.get("density", 0.2), topk=case.get("topk"),
                    min_blocks=case.get("min_blocks"), max_blocks=case.get("max_blocks"),
                    sink_blocks=case["sink"], local_blocks=case["local"], fill=case["fill"],
                    selection="head" if case.get("per_head") else "group")
    if case["kind"] in ("bool",):
        vis = Visibility(nq=nq, nk=nk, mask=visible[:, :1])
    else:
        kv = visible.any(dim=(1, 2)) if "padding" in case["kind"] else None
        vis = Visibility(nq=nq, nk=nk, causal=case["kind"] != "none" and "causal" in case["kind"] or case["kind"] == "window",
                         offset=offset, window=window, key_valid=kv)
        if kv is not None:  # the literal predicate: causal/window & key_valid
            visible = _visible_full("causal" if vis.causal else "none", b, hq, nq, nk, gen, offset, window) & kv[:, None, None, :]
            if window is not None:
                visible &= _visible_full("window", b, hq, nq, nk, gen, offset, window)
    scale = 0.3
    out, lse = R.spa_attention(q, k, v, scale=scale, enable_gqa=True, config=cfg, projector=projector,
                               visibility=vis, return_lse=True)
    ref_out, ref_lse, S = naive_spa(
        q, k, v, visible, scale, block=block, density=cfg.density if cfg.topk is None else None, topk=cfg.topk,
        min_blocks=cfg.min_blocks, max_blocks=cfg.max_blocks, sink=cfg.sink_blocks, local=cfg.local_blocks,
        fill=cfg.fill, per_head=cfg.selection == "head", offset=offset,
        pq=None if projector is None else projector.pq, pk=None if projector is None else projector.pk,
    )
    torch.testing.assert_close(out, ref_out, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(lse.double(), ref_lse, rtol=1e-6, atol=1e-6)
    # the selection itself, block for block
    valid = R.valid_keys(vis, b, hkv, block, q.device)
    pooled = R.pool_blocks(k, v, valid, block)
    sel = R.select_blocks(q, pooled, vis, valid, scale, cfg, projector)
    for (bb, s, i), blocks in S.items():
        got = sel.index[bb, s, i][: sel.count[bb, s, i]].tolist()
        assert got == sorted(blocks), (bb, s, i)
        assert (sel.index[bb, s, i][sel.count[bb, s, i]:] == -1).all()


def test_sparse_selection_really_drops_blocks_and_fill_helps():
    """At low density the output differs from dense, and the fill brings it closer."""
    torch.manual_seed(0)
    q, k, v = _inputs(1, 4, 4, 512, 512, 32, seed=11)
    dense = _sdpa(q, k, v, is_causal=True)
    cfg = SPAConfig(density=0.2, block_size=32)
    with_fill = R.spa_attention(q, k, v, is_causal=True, config=cfg)
    no_fill = R.spa_attention(q, k, v, is_causal=True, config=cfg.replace(fill="none"))
    err = lambda x: float((x - dense).norm() / dense.norm())  # noqa: E731
    assert err(with_fill) > 1e-4  # it is sparse
    assert err(with_fill) < err(no_fill)


def test_fully_masked_row_is_zero_with_lse_minus_inf():
    q, k, v = _inputs(1, 2, 2, 20, 20, 8)
    mask = torch.ones(20, 20, dtype=torch.bool)
    mask[5] = False
    out, lse = R.spa_attention(q, k, v, attn_mask=mask, config=SPAConfig(block_size=16), return_lse=True)
    assert torch.all(out[:, :, 5] == 0) and torch.all(lse[:, :, 5] == -math.inf)
    assert torch.isfinite(out).all()


# ---------------------------------------------------------------------------------------
# Gradients
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("fill", ["landmark", "none"])
@pytest.mark.parametrize("kind", ["causal", "padding"])
def test_gradcheck_with_fixed_selection(fill, kind):
    n = 70  # 5 key blocks: at density 0.2 most are left to the fill
    q, k, v = (x.requires_grad_() for x in _inputs(1, 2, 1, n, n, 4, dtype=torch.float64, seed=5))
    cfg = SPAConfig(block_size=16, density=0.2, sink_blocks=0, local_blocks=1, fill=fill)
    kv = None
    if kind == "padding":
        kv = torch.ones(1, n, dtype=torch.bool)
        kv[0, 60:] = False
    vis = Visibility(nq=n, nk=n, causal=kind == "causal", key_valid=kv)
    valid = R.valid_keys(vis, 1, 1, 16, q.device)
    pooled = R.pool_blocks(k.detach(), v.detach(), valid, 16)
    sel = R.select_blocks(q.detach(), pooled, vis, valid, 0.5, cfg)
    assert int(sel.count[0, 0, -1]) < 5  # the last query block really leaves blocks out

    def f(q_, k_, v_):
        pooled_ = R.pool_blocks(k_, v_, valid, 16)
        return R.sparse_attention(q_, k_, v_, sel, pooled_, vis, valid, 0.5, fill, 16)

    # fast mode checks random directions of the Jacobian: the full one takes minutes on 2 cores
    assert torch.autograd.gradcheck(f, (q, k, v), fast_mode=True)
    # the hand-written backward (what the op registers) equals autograd of the forward
    out, lse = f(q, k, v)
    go, gl = torch.randn_like(out), torch.randn_like(lse)
    auto = torch.autograd.grad((out * go).sum() + (lse * gl).sum(), (q, k, v))
    manual = R.sparse_attention_backward(go, gl, q, k, v, sel, vis, valid, 0.5, fill, 16)
    for a, m in zip(auto, manual):
        torch.testing.assert_close(m, a, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("selection", ["group", "head"])
def test_select_blocks_with_given_block_scores(selection):
    """``block_scores`` replaces only the score: the pooled score passed back in gives the same
    selection; a score that prefers the lowest blocks selects them, with the forced blocks
    (diagonal, sink, local) and k per query block unchanged."""
    q, k, v = _inputs(2, 4, 2, 150, 150, 8, seed=7)
    vis = Visibility(150, 150, causal=True)
    cfg = SPAConfig(block_size=16, density=0.3, selection=selection)
    valid = R.valid_keys(vis, 2, 2, 16, q.device)
    pooled = R.pool_blocks(k, v, valid, 16)
    scale = 8**-0.5
    ref = R.select_blocks(q, pooled, vis, valid, scale, cfg)
    hs = 2 if selection == "group" else 4
    kb = pooled.kbar if hs == 2 else pooled.kbar.repeat_interleave(2, 1)

    def pooled_scores(t0, t1):
        qbar = q[:, :, t0:t1].mean(dim=2)
        if hs == 2:
            qbar = qbar.unflatten(1, (2, 2)).sum(2)
        return scale * torch.einsum("bhd,bhjd->bhj", qbar, kb)

    same = R.select_blocks(q, pooled, vis, valid, scale, cfg, block_scores=pooled_scores)
    assert torch.equal(same.index, ref.index) and torch.equal(same.count, ref.count)
    nkb = kb.shape[2]
    low = R.select_blocks(q, pooled, vis, valid, scale, cfg,
                          block_scores=lambda t0, t1: -torch.arange(nkb, dtype=q.dtype).expand(2, hs, nkb))
    assert torch.equal(low.count, ref.count)
    assert not torch.equal(low.index, ref.index)
    # row 8 (query block 8 sees blocks 0-8; forced: block 8, sink 0, local 7-8): the top-k of the
    # rest are its lowest blocks 1, 2, ...
    row = low.index[0, 0, 8]
    chosen = sorted(int(j) for j in row[row >= 0])
    n_free = int(low.count[0, 0, 8]) - len({0, 8} | set(range(8 - cfg.local_blocks + 1, 9)))
    assert chosen[:1 + n_free] == list(range(1 + n_free))


# ---------------------------------------------------------------------------------------
# block_score "bound" / "hybrid": the key-range bound (docs/design.md)
# ---------------------------------------------------------------------------------------


@settings(max_examples=25, deadline=None)
@given(st.integers(1, 70), st.sampled_from([1, 2]), st.sampled_from([4, 16]), st.sampled_from([16, 32]),
       st.booleans(), st.integers(0, 10**6))
def test_bound_is_an_upper_bound_of_every_logit(n, g, d, block, pad, seed):
    """bound[i, j] >= s * q[t] . k[u] for every row t of query block i, head of its group and
    valid key u of block j (what makes it find a block holding one matching key)."""
    q, k, v = _inputs(1, 2 * g, 2, n, n, d, seed=seed)
    kv = torch.arange(n)[None] < max(1, n - 7) if pad else None
    vis = Visibility(n, n, key_valid=kv)
    valid = R.valid_keys(vis, 1, 2, block, q.device)
    pooled = R.pool_blocks(k, v, valid, block, extrema=True)
    kmx, kmn = R._to_heads(pooled.kmax, 2 * g), R._to_heads(pooled.kmin, 2 * g)
    scale = d**-0.5
    logits = scale * q @ R._to_heads(k, 2 * g).transpose(-1, -2)  # [1, Hq, N, N]
    logits = logits.masked_fill(~R._to_heads(valid, 2 * g)[:, :, None, :].expand_as(logits), -math.inf)
    for t0 in range(0, n, block):
        t1 = min(n, t0 + block)
        bnd = R.bound_scores(q[:, :, t0:t1], kmx, kmn, 2, scale)  # group selection: [1, 2, NKB]
        for j in range(pooled.kbar.shape[2]):
            exact = logits[:, :, t0:t1, j * block:(j + 1) * block].amax((2, 3)).unflatten(1, (2, g)).amax(2)
            ok = exact > -math.inf
            assert torch.all(bnd[..., j][ok] >= exact[ok] - 1e-5)


def _needle(seed=3):
    """Random keys and queries, and one key of block 2 that matches the last query row only."""
    n, d = 256, 16
    q, k, v = _inputs(1, 2, 1, n, n, d, seed=seed)
    q, k = 0.3 * q, 0.3 * k
    k[0, 0, 2 * 16 + 5] = 6.0 * q[0, 0, n - 1] / q[0, 0, n - 1].norm()
    return q, k, v, Visibility(n, n, causal=True)


@pytest.mark.parametrize("block_score", ["bound", "hybrid"])
def test_bound_scores_find_a_single_matching_key(block_score):
    """A needle: the pooled score averages one matching key and one asking row away and does not
    select its block for the last query block; the bound and hybrid scores do, and the last row's
    output moves to dense attention's."""
    q, k, v, vis = _needle()
    base = dict(block_size=16, topk=4, sink_blocks=0, local_blocks=1)
    valid = R.valid_keys(vis, 1, 1, 16, q.device)
    pooled = R.pool_blocks(k, v, valid, 16, extrema=True)
    scale = 16**-0.5
    sel = {bs: R.select_blocks(q, pooled, vis, valid, scale, SPAConfig(block_score=bs, **base))
           for bs in ("projector", block_score)}
    last = {bs: set(s.index[0, 0, -1].tolist()) for bs, s in sel.items()}
    assert 2 not in last["projector"] and 2 in last[block_score]
    assert torch.equal(sel["projector"].count, sel[block_score].count)  # same budget
    dense = _sdpa(q, k, v, is_causal=True)[0, :, -1]
    err = {bs: float((R.spa_attention(q, k, v, is_causal=True, enable_gqa=True, config=SPAConfig(
        block_score=bs, **base))[0, :, -1] - dense).norm()) for bs in sel}
    assert err[block_score] < 0.5 * err["projector"], err


def test_hybrid_is_projector_half_then_bound():
    """hybrid = forced + the projector's top ceil(k/2) + the bound's top k - ceil(k/2) of the rest."""
    q, k, v = _inputs(2, 4, 2, 200, 200, 8, seed=11)
    vis = Visibility(200, 200, causal=True)
    valid = R.valid_keys(vis, 2, 2, 16, q.device)
    pooled = R.pool_blocks(k, v, valid, 16, extrema=True)
    scale = 8**-0.5
    base = dict(block_size=16, topk=5)
    hyb = R.select_blocks(q, pooled, vis, valid, scale, SPAConfig(block_score="hybrid", **base))
    half = R.select_blocks(q, pooled, vis, valid, scale, SPAConfig(**{**base, "topk": 3}))
    full = R.select_blocks(q, pooled, vis, valid, scale, SPAConfig(**base))
    assert torch.equal(hyb.count, full.count)
    kmx, kmn = R._to_heads(pooled.kmax, 4), R._to_heads(pooled.kmin, 4)
    differs = 0
    for i in range(hyb.index.shape[2]):
        t0 = i * 16
        bnd = R.bound_scores(q[:, :, t0:t0 + 16], kmx, kmn, 2, scale)
        for b in range(2):
            for h in range(2):
                got = set(hyb.index[b, h, i].tolist()) - {-1}
                first = set(half.index[b, h, i].tolist()) - {-1}
                assert first <= got
                rest = sorted(got - first)
                others = [j for j in range(i + 1) if j not in got]  # visible, not chosen
                if rest and others:
                    assert float(bnd[b, h, rest].min()) >= float(bnd[b, h, others].max())
                differs += got != set(full.index[b, h, i].tolist()) - {-1}
    assert differs > 0  # the bound's half is not the projector's


@pytest.mark.parametrize("block_score", ["bound", "hybrid"])
def test_bound_scores_at_full_density_are_exact(block_score):
    q, k, v = _inputs(1, 4, 2, 90, 90, 16, seed=2)
    cfg = SPAConfig(density=1.0, block_size=16, block_score=block_score)
    out = R.spa_attention(q, k, v, is_causal=True, config=cfg, enable_gqa=True)
    torch.testing.assert_close(out, _sdpa(q, k, v, is_causal=True), rtol=1e-5, atol=1e-5)


def test_block_score_needs_key_extrema_and_a_known_name():
    from spa_compile.config import SPAConfigError

    with pytest.raises(SPAConfigError, match=r"block_score = 'max'.*'projector', 'hybrid', 'bound'"):
        SPAConfig(block_score="max")
    q, k, v = _inputs(1, 2, 1, 40, 40, 8)
    vis = Visibility(40, 40, causal=True)
    valid = R.valid_keys(vis, 1, 1, 16, q.device)
    with pytest.raises(ValueError, match="extrema=True"):
        R.select_blocks(q, R.pool_blocks(k, v, valid, 16), vis, valid, 0.3, SPAConfig(block_size=16, block_score="bound"))


# ---------------------------------------------------------------------------------------
# block_score "fine": row means against sub-block key means (docs/accuracy.md)
# ---------------------------------------------------------------------------------------


@settings(max_examples=20, deadline=None)
@given(st.integers(1, 70), st.sampled_from([1, 2]), st.sampled_from([16, 32]), st.booleans(), st.integers(0, 10**6))
def test_fine_scores_at_full_resolution_are_the_true_block_mass(n, g, block, pad, seed):
    """With one row a mean and one key a sub-block (fine_rows = fine_keys = block_size), the fine
    score of block j is the attention mass dense attention gives j, averaged over the query
    block's rows and the heads of the group (no causal mask: block visibility is key visibility)."""
    d, hkv = 8, 2
    q, k, v = _inputs(1, hkv * g, hkv, n, n, d, dtype=torch.float64, seed=seed)
    kv = torch.arange(n)[None] < max(1, n - 7) if pad else None
    vis = Visibility(n, n, key_valid=kv)
    valid = R.valid_keys(vis, 1, hkv, block, q.device)
    cfg = SPAConfig(block_size=block, block_score="fine", fine_rows=block, fine_keys=block)
    pooled = R.pool_for(cfg, k, v, valid)
    nkb = pooled.kbar.shape[2]
    assert pooled.ksub.shape[2] == nkb * block and pooled.nsub.shape[-1] == nkb * block
    scale = d**-0.5
    logits = scale * q @ R._to_heads(k, hkv * g).transpose(-1, -2)
    logits = logits.masked_fill(~R._to_heads(valid, hkv * g)[:, :, None, :].expand_as(logits), -math.inf)
    p = F.pad(torch.softmax(logits, -1), (0, nkb * block - n)).unflatten(-1, (nkb, block)).sum(-1)  # [1, Hq, N, NKB]
    ksub, nsub = pooled.ksub, pooled.nsub  # kv heads: fine_scores broadcasts them
    ident = Projector.identity(hkv, d)
    for t0 in range(0, n, block):
        t1 = min(n, t0 + block)
        visible = torch.ones(1, 1, nkb, dtype=torch.bool)
        got = R.fine_scores(q[:, :, t0:t1], ksub, nsub, visible, block, hkv, scale, ident)
        want = p[:, :, t0:t1].mean(2).unflatten(1, (hkv, g)).mean(2)
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-12)


def test_fine_score_selects_by_mass_and_is_exact_at_full_density():
    """The fine score's selection, at the same budget as the projector's: (a) dense outputs at
    density 1; (b) at density 0.3 (causal, GQA 2, both selections) an output closer to dense
    attention's than the pooled score's on inputs with a few strong keys per block."""
    g = torch.Generator().manual_seed(4)
    n, d = 256, 16
    q, k, v = (torch.randn(1, h, n, d, generator=g, dtype=torch.float64) for h in (4, 2, 2))
    spikes = torch.rand(1, 2, n, 1, generator=g, dtype=torch.float64) < 0.05  # a few keys a block stand out
    k = k + 4.0 * spikes * q.unflatten(1, (2, 2))[:, :, 0].roll(-3, dims=2)
    dense = _sdpa(q, k, v, is_causal=True)
    for selection in ("head", "group"):
        full = R.spa_attention(q, k, v, is_causal=True, enable_gqa=True, config=SPAConfig(
            block_size=16, density=1.0, block_score="fine", selection=selection))
        torch.testing.assert_close(full, dense, rtol=1e-9, atol=1e-9)
        err = {bs: float((R.spa_attention(q, k, v, is_causal=True, enable_gqa=True, config=SPAConfig(
            block_size=16, density=0.3, block_score=bs, fine_rows=8, fine_keys=8, selection=selection))
            - dense).norm() / dense.norm()) for bs in ("projector", "fine")}
        assert err["fine"] < err["projector"], (selection, err)


def test_fine_score_needs_sub_block_means_and_valid_resolutions():
    from spa_compile.config import SPAConfigError

    with pytest.raises(SPAConfigError, match="fine_rows = 3 .*power of two between 1 and block_size"):
        SPAConfig(fine_rows=3)
    with pytest.raises(SPAConfigError, match="fine_keys = 64 .*block_size \\(32\\)"):
        SPAConfig(block_size=32, fine_keys=64)
    q, k, v = _inputs(1, 2, 1, 40, 40, 8)
    vis = Visibility(40, 40, causal=True)
    valid = R.valid_keys(vis, 1, 1, 16, q.device)
    with pytest.raises(ValueError, match="sub-block key means"):
        R.select_blocks(q, R.pool_blocks(k, v, valid, 16), vis, valid, 0.3, SPAConfig(block_size=16, block_score="fine"))
