"""Projectors: state, the distillation gradient, safetensors files, validation, attaching to the backend."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from spa_compile import SPAConfig, spa_attention
from spa_compile import reference as R
from spa_compile.projector import Projector, block_scores, distillation_grad, distillation_loss, pca_init
from spa_compile.projector_file import (
    ProjectorFile, ProjectorFileError, ProjectorWarning, SiteShape, fingerprint, load_projectors, match_sites,
    save_projectors,
)
from spa_compile.visibility import from_sdpa


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield


def _rand_projector(hkv=2, d=8, r=8, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return Projector(torch.randn(hkv, d, r, generator=gen), torch.randn(hkv, d, r, generator=gen))


# --------------------------------------------------------------------------------------- state


def test_eye_equals_tensor_free_identity_in_the_reference_selection():
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, h, 96, 8, generator=gen) for h in (4, 2, 2))
    cfg = SPAConfig(block_size=16, density=0.3)
    vis = from_sdpa(None, True, 96, 96)
    valid = R.valid_keys(vis, 1, 2, 16, q.device)
    pooled = R.pool_blocks(k, v, valid, 16)
    a = R.select_blocks(q, pooled, vis, valid, 0.3, cfg, None)
    b = R.select_blocks(q, pooled, vis, valid, 0.3, cfg, Projector.eye(2, 8))
    assert torch.equal(a.index, b.index)
    # a real projector changes the scores, and 4-D block means project as 3-D ones do
    p = _rand_projector()
    qbar = torch.randn(1, 4, 5, 8)
    torch.testing.assert_close(p.project_queries(qbar)[:, :, 2], p.project_queries(qbar[:, :, 2]))
    assert p.rank == 8 and p.shape == (2, 8, 8) and Projector.identity(2, 8).is_identity


def test_projector_validation():
    with pytest.raises(ValueError, match="both Pq and Pk"):
        Projector(torch.zeros(1, 4, 4), None)
    with pytest.raises(ValueError, match=r"\[Hkv, D, r\]"):
        Projector(torch.zeros(1, 4, 4), torch.zeros(1, 4, 3))
    with pytest.raises(ValueError, match="rank"):
        Projector.eye(2, 8, rank=9)


@pytest.mark.parametrize("hs,hkv", [(4, 2), (2, 2)])
def test_closed_form_gradient_matches_autograd(hs, hkv):
    gen = torch.Generator().manual_seed(1)
    qsel, kbar = torch.randn(2, hs, 5, 8, generator=gen), torch.randn(2, hkv, 6, 8, generator=gen)
    vis = torch.rand(2, hs, 5, 6, generator=gen) > 0.3
    vis[0, 0, 0] = False  # a row that sees nothing does not count
    t = torch.rand(2, hs, 5, 6, generator=gen) * vis
    t = t / t.sum(-1, keepdim=True).clamp_min(1e-9)
    pq = torch.randn(hkv, 8, 4, generator=gen, requires_grad=True)
    pk = torch.randn(hkv, 8, 4, generator=gen, requires_grad=True)
    loss = distillation_loss(block_scores(Projector(pq, pk), qsel, kbar, 0.3), t, vis)
    gq, gk = torch.autograd.grad(loss, (pq, pk))
    loss2, gq2, gk2 = distillation_grad(Projector(pq.detach(), pk.detach()), qsel, kbar, 0.3, t, vis)
    torch.testing.assert_close(loss2, loss.detach())
    torch.testing.assert_close(gq2, gq, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(gk2, gk, rtol=1e-5, atol=1e-6)


def test_kl_is_zero_when_the_scores_reproduce_the_target():
    score = torch.randn(3, 7)
    vis = torch.ones(3, 7, dtype=torch.bool)
    vis[1, 5:] = False
    target = torch.softmax(score.masked_fill(~vis, -math.inf), -1)
    assert float(distillation_loss(score, target, vis)) < 1e-6
    assert float(distillation_loss(torch.zeros_like(score), target, vis)) > 1e-3


def test_pca_init_keeps_the_dominant_subspace():
    gen = torch.Generator().manual_seed(0)
    basis = torch.linalg.qr(torch.randn(8, 8, generator=gen))[0]
    x = torch.randn(200, 1, 8, generator=gen) * torch.tensor([5, 4, 3, 0.01, 0.01, 0.01, 0.01, 0.01])
    x = x @ basis.T
    p = pca_init(x, x, 3, 1)
    assert p.shape == (1, 8, 3)
    # the projection keeps almost all of the energy
    kept = (x @ p.pq[0]).pow(2).sum() / x.pow(2).sum()
    assert kept > 0.999


# --------------------------------------------------------------------------------------- files


def _file(block_size=16, **shapes):
    shapes = shapes or {"model.a": SiteShape(4, 2, 8, 8), "model.b": SiteShape(4, 2, 8, 8)}
    projs = {name: _rand_projector(s.hkv, s.d, 4, seed=i) for i, (name, s) in enumerate(shapes.items())}
    return ProjectorFile(projs, dict(shapes), block_size, {"block_size": block_size, "selection": "group"})


def test_save_load_round_trip_with_metadata(tmp_path):
    pf = _file()
    path = save_projectors(pf, tmp_path / "p.safetensors")
    back = load_projectors(path)
    assert back.block_size == 16 and back.rank == 4 and back.config["selection"] == "group"
    assert back.shapes == pf.shapes and back.fingerprint == fingerprint(pf.shapes)
    for name in pf.projectors:
        torch.testing.assert_close(back.projectors[name].pq, pf.projectors[name].pq)
        torch.testing.assert_close(back.projectors[name].pk, pf.projectors[name].pk)
    from safetensors import safe_open

    with safe_open(path, "pt") as f:
        meta = f.metadata()
        assert sorted(f.keys()) == ["model.a/pk", "model.a/pq", "model.b/pk", "model.b/pq"]
    assert meta["format"] == "spa_compile.projectors" and meta["rank"] == "4" and meta["block_size"] == "16"


def test_bad_files_are_clear_errors(tmp_path):
    with pytest.raises(ProjectorFileError, match="does not exist"):
        load_projectors(tmp_path / "nope.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ProjectorFileError, match="not a readable safetensors"):
        load_projectors(tmp_path / "junk.safetensors")
    from safetensors.torch import save_file

    save_file({"x": torch.zeros(2)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(ProjectorFileError, match="not an SPA projector file"):
        load_projectors(tmp_path / "other.safetensors")
    pf = _file()
    meta = pf.metadata()
    tensors = {f"{n}/{w}": getattr(p, w) for n, p in pf.projectors.items() for w in ("pq", "pk")}
    tensors["model.a/pk"] = torch.zeros(2, 8, 3)
    save_file(tensors, str(tmp_path / "bad.safetensors"), metadata=meta)
    with pytest.raises(ProjectorFileError, match="model.a. pk has shape"):
        load_projectors(tmp_path / "bad.safetensors")


def test_match_sites_errors_and_warnings():
    pf = _file()
    same = dict(pf.shapes)
    with pytest.raises(ProjectorFileError, match="block_size=16.*block_size=32"):
        match_sites(pf, same, block_size=32)
    with pytest.raises(ProjectorFileError, match="model.b: file has Hq=4 Hkv=2 D=8"):
        match_sites(pf, {**same, "model.b": SiteShape(4, 2, 16, 16)}, block_size=16)
    with pytest.warns(ProjectorWarning, match="no projector for 1 SPA site.*model.c"):
        m = match_sites(pf, {**same, "model.c": SiteShape(4, 2, 8, 8)}, block_size=16)
    assert set(m.attach) == {"model.a", "model.b"} and m.missing == ["model.c"]
    with pytest.warns(ProjectorWarning, match="1 site.*does not have.*model.b"):
        m = match_sites(pf, {"model.a": same["model.a"]}, block_size=16)
    assert m.extra == ["model.b"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        match_sites(pf, same, block_size=16, selection="group")  # a full match is silent


# --------------------------------------------------------------------------------------- backend


class Attn(nn.Module):
    """One grouped-query causal attention: 4 query heads, 2 kv heads, D = 8."""

    def __init__(self):
        super().__init__()
        self.q, self.k, self.v = nn.Linear(16, 32), nn.Linear(16, 16), nn.Linear(16, 16)

    def qkv(self, x):
        b, n, _ = x.shape
        return (self.q(x).view(b, n, 4, 8).transpose(1, 2), self.k(x).view(b, n, 2, 8).transpose(1, 2),
                self.v(x).view(b, n, 2, 8).transpose(1, 2))

    def forward(self, x):
        q, k, v = self.qkv(x)
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)


class Model(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.attn = Attn()

    def forward(self, x):
        return self.attn(x)


CFG = {"mode": "spa", "block_size": 16, "density": 0.25, "sink_blocks": 0, "local_blocks": 1}


def test_backend_attaches_the_file_and_matches_the_functional(tmp_path):
    model, x = Model(), torch.randn(2, 128, 16, generator=torch.Generator().manual_seed(3))
    proj = _rand_projector(2, 8, 4, seed=5)
    pf = ProjectorFile({"model.attn": proj}, {"model.attn": SiteShape(4, 2, 8, 8)}, 16)
    path = save_projectors(pf, tmp_path / "p.safetensors")
    cfg = SPAConfig(**{k: v for k, v in CFG.items() if k != "mode"})
    with torch.no_grad():
        q, k, v = model.attn.qkv(x)
        want = spa_attention(q, k, v, is_causal=True, enable_gqa=True, config=cfg, projector=proj)
        pooled = spa_attention(q, k, v, is_causal=True, enable_gqa=True, config=cfg)
        got = torch.compile(model, backend="spa", options={**CFG, "projectors": path, "inner_backend": "aot_eager"})(x)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert (want - pooled).abs().max() > 1e-3  # the projector changed the selection


def test_backend_graph_reads_projector_buffers(tmp_path):
    from spa_compile.backend import apply_spa_passes

    pf = ProjectorFile({"model.attn": _rand_projector(2, 8, 4)}, {"model.attn": SiteShape(4, 2, 8, 8)}, 16)
    path = save_projectors(pf, tmp_path / "p.safetensors")
    seen = {}

    def backend(gm, example_inputs):
        apply_spa_passes(gm, SPAConfig(**CFG, projectors=path))
        seen["gm"] = gm
        return gm.forward

    torch.compile(Model(), backend=backend)(torch.randn(1, 64, 16))
    gm = seen["gm"]
    (node,) = [n for n in gm.graph.nodes if n.target is torch.ops.spa.attention.default]
    pq, pk = node.args[5], node.args[6]
    assert pq.op == pk.op == "get_attr"
    torch.testing.assert_close(getattr(gm, pq.target), pf.projectors["model.attn"].pq)
    assert "_spa_pk_0" in dict(gm.named_buffers())


def test_backend_errors_and_warnings_for_mismatched_files(tmp_path):
    x = torch.randn(1, 64, 16)
    wrong_block = save_projectors(
        ProjectorFile({"model.attn": _rand_projector(2, 8, 8)}, {"model.attn": SiteShape(4, 2, 8, 8)}, 32),
        tmp_path / "b32.safetensors")
    with pytest.raises(Exception, match="fitted for block_size=32"):
        torch.compile(Model(), backend="spa", options={**CFG, "projectors": wrong_block, "inner_backend": "eager"})(x)
    torch._dynamo.reset()
    wrong_shape = save_projectors(
        ProjectorFile({"model.attn": _rand_projector(2, 16, 8)}, {"model.attn": SiteShape(4, 2, 16, 16)}, 16),
        tmp_path / "d16.safetensors")
    with pytest.raises(Exception, match="wrong shapes"):
        torch.compile(Model(), backend="spa", options={**CFG, "projectors": wrong_shape, "inner_backend": "eager"})(x)
    torch._dynamo.reset()
    other = save_projectors(
        ProjectorFile({"model.other": _rand_projector(2, 8, 8)}, {"model.other": SiteShape(4, 2, 8, 8)}, 16),
        tmp_path / "other.safetensors")
    with pytest.warns(ProjectorWarning) as rec:
        out = torch.compile(Model(), backend="spa", options={**CFG, "projectors": other, "inner_backend": "eager"})(x)
    text = " ".join(str(w.message) for w in rec)
    assert "identity" in text and "model.attn" in text and "model.other" in text
    cfg = SPAConfig(**{k: v for k, v in CFG.items() if k != "mode"})
    q, k, v = Model().attn.qkv(x)
    torch.testing.assert_close(out, spa_attention(q, k, v, is_causal=True, enable_gqa=True, config=cfg))
