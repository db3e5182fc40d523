"""Calibration: block statistics against a naive dense computation, fitting, the report, the CLI hook."""

from __future__ import annotations

import math
import types

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from spa_compile import SPAConfig
from spa_compile import calibrate as C
from spa_compile import reference as R
from spa_compile.projector import Projector
from spa_compile.projector_file import load_projectors
from spa_compile.visibility import Visibility, num_blocks


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield


def _naive_mass(q, k, vis: Visibility, scale, bs, selection="group"):
    """A [B, Hs, NQB, NKB] from the full N x N attention (small sizes only)."""
    b, hq, n, d = q.shape
    hkv = k.shape[1]
    g = hq // hkv
    kk = k.repeat_interleave(g, 1)
    logits = torch.einsum("bhtd,bhud->bhtu", q.double(), kk.double()) * scale
    rows = vis.rows(0, n, q.device).expand(b, hq, n, k.shape[2])
    p = torch.softmax(logits.masked_fill(~rows, -math.inf), -1).nan_to_num(0.0)
    nkb, nqb = -(-k.shape[2] // bs), -(-n // bs)
    mass = F.pad(p, (0, nkb * bs - k.shape[2])).unflatten(-1, (nkb, bs)).sum(-1)  # [B, Hq, N, NKB]
    live = rows.any(-1).double()
    out = torch.zeros(b, hq, nqb, nkb, dtype=torch.float64)
    for i in range(nqb):
        sl = slice(i * bs, (i + 1) * bs)
        out[:, :, i] = (mass[:, :, sl] * live[:, :, sl, None]).sum(2) / live[:, :, sl].sum(2)[..., None].clamp_min(1)
    if selection == "group":
        out = out.unflatten(1, (hkv, g)).mean(2)
    return out, torch.einsum("bhtu,bhud->bhtd", p, v_of(k, g).double())


def v_of(k, g):
    return _V[0].repeat_interleave(g, 1)


_V = [None]


@pytest.mark.parametrize("kind", ["causal", "padding", "window"])
@pytest.mark.parametrize("selection", ["group", "head"])
def test_block_stats_match_the_dense_attention_mass(kind, selection):
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, h, 72, 8, generator=gen) for h in (4, 2, 2))
    _V[0] = v
    key_valid = None
    if kind == "padding":
        key_valid = torch.ones(2, 72, dtype=torch.bool)
        key_valid[1, 50:] = False
    vis = Visibility(nq=72, nk=72, causal=kind != "padding", offset=0,
                     window=20 if kind == "window" else None, key_valid=key_valid)
    cfg = SPAConfig(block_size=16, selection=selection)
    st = C.block_stats(q, k, v, vis, 0.35, cfg, with_output=True)
    want, dense = _naive_mass(q, k, vis, 0.35, 16, selection)
    torch.testing.assert_close(st.target.double(), want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(st.out.double(), dense, rtol=1e-5, atol=1e-5)
    live = st.visible.any(-1)
    torch.testing.assert_close(st.target.sum(-1)[live], torch.ones(int(live.sum())), rtol=1e-5, atol=1e-5)
    assert not (st.target * ~st.visible).any()  # no mass outside the visible blocks
    # a subset of query blocks gives the same rows
    sub = C.block_stats(q, k, v, vis, 0.35, cfg, blocks=[1, 3])
    torch.testing.assert_close(sub.target, st.target[:, :, [1, 3]])
    torch.testing.assert_close(sub.forced, st.forced[:, :, [1, 3]])


@pytest.mark.parametrize("causal,window,offset,nq", [(True, None, 0, 70), (True, 24, 5, 50), (False, 24, 3, 70),
                                                     (False, None, 0, 70), (True, None, 20, 40)])
def test_valid_keys_closed_form(causal, window, offset, nq):
    key_valid = torch.rand(2, 90, generator=torch.Generator().manual_seed(2)) > 0.2
    vis = Visibility(nq=nq, nk=90, causal=causal, offset=offset, window=window, key_valid=key_valid)
    assert torch.equal(C.valid_keys(vis, 2, 3, 16, "cpu"), R.valid_keys(vis, 2, 3, 16, "cpu"))


# --------------------------------------------------------------------------------------- fitting


class SDPA(nn.Module):
    def forward(self, q, k, v):
        return F.scaled_dot_product_attention(q, k, v)


def _synthetic(b, seed, n=256, bs=16):
    """Attention the pooled score cannot see but a projector can.

    Keys of block j alternate +s_j / -s_j on dim 0 (mean 0) and every query has q_0 = 4, so a
    block's mass grows with cosh(2 s_j); its mean key carries s_j^2 on dim 1, which no query
    reads. The pooled score (mean q . mean k) sees neither; Pq Pk^T with a (0, 1) entry ranks by s_j.
    """
    gen = torch.Generator().manual_seed(seed)
    nb = n // bs
    s = (torch.rand(b, 1, nb, generator=gen) * 2.5).repeat_interleave(bs, -1)
    sign = torch.tensor([1.0, -1.0]).repeat(n // 2)
    k = torch.randn(b, 1, n, 4, generator=gen) * 0.3
    k[..., 0] = sign * s
    k[..., 1] = s ** 2 / 4
    q = torch.randn(b, 1, n, 4, generator=gen)
    q[..., 0] = 4.0
    q[..., 1] = 0.0
    return q, k, torch.randn(b, 1, n, 4, generator=gen)


CFG = {"block_size": 16, "density": 0.25, "sink_blocks": 0, "local_blocks": 0}


def test_calibrate_learns_what_pooling_misses(tmp_path):
    model = SDPA()
    batches = [_synthetic(4, seed) for seed in range(2)]
    report = C.calibrate(model, batches, CFG, steps=80, lr=0.05, out=tmp_path / "p.safetensors",
                         eval_batches=[_synthetic(4, 10)], progress=False)
    (site,) = report.sites
    rec = site.recall
    assert rec["oracle"] >= rec["fitted"] - 1e-6 and rec["oracle"] >= rec["pooled"] - 1e-6
    assert rec["fitted"] > rec["pooled"] + 0.15, rec
    assert site.rel_err["fitted"] < site.rel_err["pooled"]
    assert site.kl["kl_fitted"] < site.kl["kl_pooled"]
    assert not report.in_sample and report.eval_batches == 1
    pf = load_projectors(tmp_path / "p.safetensors")
    assert set(pf.projectors) == {site.name} and pf.block_size == 16 and pf.report["steps"] == 80
    text = str(report)
    assert site.name in text and "oracle" in text and "overall" in text
    assert report.to_dict()["overall"]["recall"]["fitted"] == pytest.approx(rec["fitted"])

    # the backend with the file reproduces the fitted selection's output error
    q, k, v = _synthetic(4, 10)
    with torch.no_grad():
        dense = model(q, k, v)
        errs = {}
        for label, extra in (("pooled", {}), ("fitted", {"projectors": str(tmp_path / "p.safetensors")})):
            torch._dynamo.reset()
            out = torch.compile(model, backend="spa", options={**CFG, "mode": "spa", "inner_backend": "eager", **extra})(q, k, v)
            errs[label] = float((out - dense).norm() / dense.norm())
    assert errs["fitted"] == pytest.approx(site.rel_err["fitted"], rel=1e-4)
    assert errs["pooled"] == pytest.approx(site.rel_err["pooled"], rel=1e-4)


def test_rank_below_d_and_selectable_loss():
    data = C.collect(SDPA(), [_synthetic(2, 0)], CFG)
    (site,) = data.values()
    proj, losses = C.fit_projector(site, rank=2, steps=40, lr=0.05, loss_blocks="selectable")
    assert proj.shape == (1, 4, 2)
    assert losses["kl_fitted"] <= losses["kl_heldout"] + 1.0 and math.isfinite(losses["kl_fitted"])
    with pytest.raises(ValueError, match="rank"):
        C.fit_projector(site, rank=5, steps=1)


def test_calibrate_a_gqa_causal_model_with_padding(tmp_path):
    class Tiny(nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.emb = nn.Embedding(50, 32)
            self.q, self.kv = nn.Linear(32, 32), nn.Linear(32, 32)

        def forward(self, idx, mask):
            x = self.emb(idx)
            b, n, _ = x.shape
            q = self.q(x).view(b, n, 4, 8).transpose(1, 2)
            k, v = self.kv(x).view(b, n, 2, 2, 8).permute(2, 0, 3, 1, 4)
            m = mask[:, None, None, :].bool()
            return F.scaled_dot_product_attention(q, k, v, attn_mask=m, enable_gqa=True)

    idx = torch.randint(0, 50, (2, 128), generator=torch.Generator().manual_seed(0))
    mask = torch.ones(2, 128, dtype=torch.long)
    mask[1, 90:] = 0
    report = C.calibrate(Tiny(), [{"idx": idx, "mask": mask}], {"block_size": 16, "density": 0.3},
                         steps=10, progress=False)
    (site,) = report.sites
    assert site.shape == {"hq": 4, "hkv": 2, "d": 8, "dv": 8} and site.rank == 8
    assert 0 < site.recall["pooled"] <= site.recall["oracle"] + 1e-9 <= 1 + 1e-9
    assert report.in_sample


def test_cli_hook_writes_the_file(tmp_path, capsys):
    out = tmp_path / "cli.safetensors"
    args = types.SimpleNamespace(output=str(out), steps=5)
    q, k, v = _synthetic(2, 0)
    target = types.SimpleNamespace(model=SDPA(), args=(q, k, v), kwargs={})
    assert C.cli_main(args, target, SPAConfig(**CFG)) == 0
    assert load_projectors(out).block_size == 16
    assert "SPA projector calibration" in capsys.readouterr().out
    assert C.calibrate.cli_main is C.cli_main


def test_no_site_is_a_clear_error():
    with pytest.raises(ValueError, match="no attention site"):
        C.calibrate(nn.Linear(4, 4), [torch.randn(2, 4)], progress=False)


def test_fit_keeps_the_state_with_the_best_heldout_recall():
    data = C.collect(SDPA(), [_synthetic(4, 0), _synthetic(4, 1)], CFG)
    (site,) = data.values()
    proj, info = C.fit_projector(site, steps=60, lr=0.05, holdout=0.3, select_on=SPAConfig(**CFG))
    assert info["heldout_recall_fitted"] >= info["heldout_recall_pooled"]
    assert info["heldout_recall_fitted"] > info["heldout_recall_pooled"] + 0.1  # the synthetic case is learnable
    # a step budget of zero keeps the identity start
    proj0, info0 = C.fit_projector(site, steps=0, select_on=SPAConfig(**CFG))
    torch.testing.assert_close(proj0.pq, torch.eye(4).expand(1, 4, 4))
    assert info0["heldout_recall_fitted"] == pytest.approx(info0["heldout_recall_pooled"])


def test_evaluate_recall_only_matches_the_full_evaluation():
    model = SDPA()
    batches = [_synthetic(4, 3)]
    data = C.collect(model, [_synthetic(4, 0)], CFG)
    fitted, _ = C.fit(data, steps=20, lr=0.05)
    full = C.evaluate(model, batches, CFG, fitted)
    fast = C.evaluate(model, batches, CFG, fitted, errors=False)
    assert full.keys() == fast.keys()
    for site in full:
        for m in C.METHODS:
            assert fast[site]["recall"][m] == pytest.approx(full[site]["recall"][m], rel=1e-12)
            assert fast[site]["density"][m] == pytest.approx(full[site]["density"][m], rel=1e-12)
            assert math.isnan(fast[site]["rel_err"][m]) and math.isfinite(full[site]["rel_err"][m])


# --------------------------------------------------------------------------------------- chunked block_stats


def _block_stats_per_block(
    q, k, v, vis: Visibility, scale: float, cfg: SPAConfig, blocks=None, with_output: bool = False,
    valid=None, kbar=None,
):
    """The block-by-block block_stats (before chunking), kept verbatim as the oracle of the chunked one."""
    b, hq, nq, d = q.shape
    hkv, nk = k.shape[1], k.shape[2]
    g = hq // hkv
    bs = cfg.block_size
    hs = hkv if cfg.selection == "group" else hq
    nkb = num_blocks(nk, bs)
    dt = R.compute_dtype(q)
    if valid is None:
        valid = C.valid_keys(vis, b, hkv, bs, q.device)
    if kbar is None:
        kbar = R.pool_blocks(k, v, valid, bs).kbar
    blocks = list(range(num_blocks(nq, bs))) if blocks is None else list(blocks)
    kf, vf = k.to(dt), v.to(dt)
    pad = nkb * bs - nk
    out = torch.empty(b, hq, nq, v.shape[-1], dtype=q.dtype, device=q.device) if with_output else None
    qsels, targets, visibles, forceds = [], [], [], []
    for i in blocks:
        t0, t1 = i * bs, min((i + 1) * bs, nq)
        r = t1 - t0
        qi = q[:, :, t0:t1].to(dt)
        rows = vis.rows(t0, t1, q.device)  # [B|1, Hm|1, R, Nk]
        rows_h = rows if rows.shape[1] == 1 else rows.unflatten(1, (hkv, g))
        rows_h = rows_h.unsqueeze(1) if rows.shape[1] == 1 else rows_h  # [B|1, 1|Hkv, 1|G, R, Nk]
        logits = torch.einsum("bhgrd,bhud->bhgru", qi.unflatten(1, (hkv, g)), kf) * scale
        logits = logits.masked_fill(~rows_h, -math.inf)
        seen = rows_h.any(-1, keepdim=True).expand(b, hkv, g, r, 1)
        p = torch.softmax(torch.where(seen, logits, torch.zeros_like(logits)), dim=-1)
        p = torch.where(seen, p, torch.zeros_like(p))
        if with_output:
            out[:, :, t0:t1] = torch.einsum("bhgru,bhud->bhgrd", p, vf).flatten(1, 2).to(q.dtype)
        mass = torch.nn.functional.pad(p, (0, pad)).unflatten(-1, (nkb, bs)).sum(-1)  # [B,Hkv,G,R,NKB]
        live = seen.to(dt)
        a = (mass * live).sum(3) / live.sum(3).clamp_min(1)  # [B, Hkv, G, NKB]
        qbar = qi.mean(dim=2)  # [B, Hq, D]
        if hs == hkv:
            a, qsel = a.mean(2), qbar.unflatten(1, (hkv, g)).sum(2)
        else:
            a, qsel = a.flatten(1, 2), qbar
        visible_h, full_h = R.classify_blocks(rows, valid, bs)  # [B, Hm, NKB]
        visible = R._to_selection_heads(visible_h, hs).expand(b, hs, nkb)
        partial = R._to_selection_heads(visible_h & ~full_h, hs).expand(b, hs, nkb)
        # the forced blocks exactly as R.select_blocks forms them
        sink = visible & (visible.cumsum(-1) <= cfg.sink_blocks)
        diag = min(max((t1 - 1 + vis.offset) // bs, 0), nkb - 1)
        local = R.local_mask_rows(visible[..., None, :], torch.tensor([diag]), cfg.local_blocks)[..., 0, :]
        forceds.append(partial | sink | local)
        visibles.append(visible)
        targets.append(a)
        qsels.append(qsel)
    stack = lambda xs, shape: torch.stack(xs, 2) if xs else torch.zeros(shape)  # noqa: E731
    return C.BlockStats(
        qsel=stack(qsels, (b, hs, 0, d)), kbar=kbar.to(dt), target=stack(targets, (b, hs, 0, nkb)),
        visible=stack(visibles, (b, hs, 0, nkb)).bool(), forced=stack(forceds, (b, hs, 0, nkb)).bool(),
        blocks=blocks, out=out,
    )


def _assert_same_stats(got, want, exact_float=False):
    tol = {"rtol": 0, "atol": 0} if exact_float else {}
    for name in ("qsel", "kbar", "target"):
        a, b = getattr(got, name), getattr(want, name)
        assert a.dtype == b.dtype and a.shape == b.shape, name
        torch.testing.assert_close(a, b, **tol, msg=name)
    for name in ("visible", "forced"):
        a, b = getattr(got, name), getattr(want, name)
        assert a.dtype == torch.bool and torch.equal(a, b), name
    assert got.blocks == want.blocks
    assert (got.out is None) == (want.out is None)
    if got.out is not None:
        assert got.out.dtype == want.out.dtype
        torch.testing.assert_close(got.out, want.out, **tol)


def _case(kind, b=2, hkv=2, g=2, nq=72, nk=72, d=8, seed=0, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(b, hkv * g, nq, d, generator=gen).to(dtype)
    k = torch.randn(b, hkv, nk, d, generator=gen).to(dtype)
    v = torch.randn(b, hkv, nk, d + 1, generator=gen).to(dtype)
    kw = {}
    if kind == "padding":
        kv = torch.ones(b, nk, dtype=torch.bool)
        kv[-1, nk // 2:] = False
        kw = {"key_valid": kv}
    elif kind == "mask":  # per-head bool mask with rows that see nothing
        m = torch.rand(b, hkv * g, nq, nk, generator=gen) > 0.6
        m[:, :, 3] = False
        m[0, 1, 20:40] = False
        kw = {"mask": m}
    elif kind == "mask2d":  # one [Nq, Nk] mask for every batch row and head
        kw = {"mask": torch.rand(nq, nk, generator=gen) > 0.5}
    vis = Visibility(nq=nq, nk=nk, causal=kind in ("causal", "window", "offset"),
                     offset=7 if kind == "offset" else 0, window=20 if kind == "window" else None, **kw)
    return q, k, v, vis


@pytest.mark.parametrize("kind", ["causal", "padding", "window", "offset", "mask", "mask2d"])
@pytest.mark.parametrize("selection", ["group", "head"])
def test_chunked_block_stats_equal_the_per_block_ones(kind, selection):
    # 72 rows, block 16: 4 full blocks and a partial one; chunks of 1, 2 and 3 blocks (not
    # dividing the count), all at once (None: the memory budget allows it), subsets in any order
    q, k, v, vis = _case(kind)
    cfg = SPAConfig(block_size=16, selection=selection, sink_blocks=1, local_blocks=2)
    want = _block_stats_per_block(q, k, v, vis, 0.35, cfg, with_output=True)
    subsets = {blocks: _block_stats_per_block(q, k, v, vis, 0.35, cfg, blocks=blocks)
               for blocks in ((4, 0, 2, 1), (1, 2, 3, 4))}
    for chunk in (1, 2, 3, None):
        got = C.block_stats(q, k, v, vis, 0.35, cfg, with_output=True, chunk_blocks=chunk)
        _assert_same_stats(got, want)
        if chunk in (3, None):
            for blocks, sub_want in subsets.items():
                sub = C.block_stats(q, k, v, vis, 0.35, cfg, blocks=list(blocks), chunk_blocks=chunk)
                _assert_same_stats(sub, sub_want)


def test_chunked_block_stats_float64_and_the_memory_budget():
    q, k, v, vis = _case("window", dtype=torch.float64, nq=100, nk=100)
    cfg = SPAConfig(block_size=16, selection="group")
    want = _block_stats_per_block(q, k, v, vis, 0.35, cfg, with_output=True)
    # one row of logits is b * hq * nk * 8 bytes = 6400: a budget of 3 blocks' rows gives chunks of 3
    assert C.chunk_blocks_for(2, 4, 100, 16, torch.float64, 3 * 16 * 6400 + 5) == 3
    assert C.chunk_blocks_for(2, 4, 100, 16, torch.float64, 1) == 1  # never below one block
    assert C.chunk_blocks_for(1, 16, 4096, 64, torch.float32) == 16  # 256 MiB default: 16 MiB a block
    for budget in (1, 3 * 16 * 6400, 1 << 30):
        got = C.block_stats(q, k, v, vis, 0.35, cfg, with_output=True, chunk_bytes=budget)
        assert got.out.dtype == torch.float64 and got.target.dtype == torch.float64
        _assert_same_stats(got, want)
    assert C._chunks([0, 1, 2, 3, 6, 5, 4], 100, 16, 3) == [[0, 1, 2], [3], [6], [5, 4]]  # 6 is partial
    empty = C.block_stats(q, k, v, vis, 0.35, cfg, blocks=[])
    _assert_same_stats(empty, _block_stats_per_block(q, k, v, vis, 0.35, cfg, blocks=[]))


_shapes = st.fixed_dictionaries({
    "b": st.integers(1, 2), "hkv": st.integers(1, 2), "g": st.sampled_from([1, 3]),
    "nq": st.integers(1, 90), "extra_k": st.integers(0, 40), "bs": st.just(16),
    "causal": st.booleans(), "window": st.one_of(st.none(), st.integers(1, 40)), "offset": st.integers(0, 20),
    "padding": st.booleans(), "selection": st.sampled_from(["group", "head"]),
    "sink": st.integers(0, 2), "local": st.integers(0, 2), "chunk": st.integers(1, 4),
    "seed": st.integers(0, 1000),
})


@settings(max_examples=30, deadline=None)
@given(_shapes, st.randoms(use_true_random=False))
def test_chunked_block_stats_property(p, rnd):
    nq, nk = p["nq"], p["nq"] + p["extra_k"]
    gen = torch.Generator().manual_seed(p["seed"])
    q = torch.randn(p["b"], p["hkv"] * p["g"], nq, 4, generator=gen)
    k = torch.randn(p["b"], p["hkv"], nk, 4, generator=gen)
    v = torch.randn(p["b"], p["hkv"], nk, 3, generator=gen)
    kv = torch.rand(p["b"], nk, generator=gen) > 0.3 if p["padding"] else None
    vis = Visibility(nq=nq, nk=nk, causal=p["causal"], offset=p["offset"] if p["causal"] or p["window"] else 0,
                     window=p["window"], key_valid=kv)
    cfg = SPAConfig(block_size=p["bs"], selection=p["selection"], sink_blocks=p["sink"], local_blocks=p["local"])
    nqb = -(-nq // p["bs"])
    blocks = rnd.sample(range(nqb), rnd.randint(0, nqb)) if rnd.random() < 0.5 else None
    got = C.block_stats(q, k, v, vis, 0.5, cfg, blocks=blocks, with_output=blocks is None, chunk_blocks=p["chunk"])
    _assert_same_stats(got, _block_stats_per_block(q, k, v, vis, 0.5, cfg, blocks=blocks, with_output=blocks is None))


FINE = {**CFG, "block_score": "fine", "fine_rows": 4, "fine_keys": 4}


@pytest.mark.parametrize("selection", ["group", "head"])
def test_fine_stats_rank_as_the_fine_selection(selection):
    """With block_score "fine" the calibration scores blocks as the op selects them: ranking the
    recorded row and sub-block means by C._scores (identity projector) picks the blocks of
    reference.select_blocks; a last query block with fewer rows than fine_rows is left out."""
    g = torch.Generator().manual_seed(7)
    b, hq, hkv, n, d = 2, 4, 2, 16 * 9 + 3, 8  # the last block has 3 rows < fine_rows
    q, k, v = (torch.randn(b, h, n, d, generator=g) for h in (hq, hkv, hkv))
    vis = Visibility(n, n, causal=True)
    cfg = SPAConfig(**FINE, selection=selection)
    scale = d**-0.5
    st = C.block_stats(q, k, v, vis, scale, cfg)
    assert st.qrows.shape == (b, hq, 10, 4, d) and st.fine_ok.shape == st.visible.shape[:3]
    assert st.fine_ok[:, :, :9].all() and not st.fine_ok[:, :, 9].any()
    score = C._scores(Projector.identity(hkv, d), st, scale)
    valid = R.valid_keys(vis, b, hkv, 16, q.device)
    sel = R.select_blocks(q, R.pool_for(cfg, k, v, valid), vis, valid, scale, cfg)
    want = C.selection_mask(sel, st.visible.shape[-1])
    remaining = st.visible & ~st.forced
    kk = torch.minimum(want.sum(-1) - st.forced.sum(-1), remaining.sum(-1))
    chosen = st.forced | R._top(score, remaining, kk)
    ok = st.fine_ok
    assert torch.equal(chosen[ok], want[ok])


def test_fine_fit_keeps_the_best_state_and_lowers_its_kl():
    data = C.collect(SDPA(), [_synthetic(4, 0), _synthetic(4, 1)], FINE)
    (site,) = data.values()
    assert site.stats[0].qrows is not None
    proj, info = C.fit_projector(site, steps=30, lr=0.05, holdout=0.3, select_on=SPAConfig(**FINE))
    assert info["heldout_recall_fitted"] >= info["heldout_recall_pooled"]
    assert info["kl_fitted"] <= info["kl_pooled"] + 1e-6 and math.isfinite(info["kl_fitted"])
