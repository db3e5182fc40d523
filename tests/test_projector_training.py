"""Training the projectors alongside the model under the SPA backend."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import spa_compile.backend as backend_mod
from spa_compile.projector_file import load_projectors
from spa_compile.training_alongside import ProjectorTrainer

CFG = {"mode": "spa", "block_size": 16, "density": 0.25, "sink_blocks": 0, "local_blocks": 1,
       "inner_backend": "aot_eager"}


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield


class LM(nn.Module):
    """Embedding, one grouped-query causal attention (4 query heads, 2 kv heads, D = 8), a head."""

    def __init__(self, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.emb = nn.Embedding(64, 32)
        self.q, self.k, self.v = nn.Linear(32, 32), nn.Linear(32, 16), nn.Linear(32, 16)
        self.out = nn.Linear(32, 64)

    def forward(self, idx):
        x = self.emb(idx)
        b, n, _ = x.shape
        q = self.q(x).view(b, n, 4, 8).transpose(1, 2)
        k = self.k(x).view(b, n, 2, 8).transpose(1, 2)
        v = self.v(x).view(b, n, 2, 8).transpose(1, 2)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        return self.out(y.transpose(1, 2).reshape(b, n, 32))


def _tokens(seed, b=2, n=128):
    return torch.randint(0, 64, (b, n), generator=torch.Generator().manual_seed(seed))


def _step(fn, model, idx):
    loss = F.cross_entropy(fn(idx)[:, :-1].flatten(0, 1), idx[:, 1:].flatten())
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    return grads


def test_trainer_fits_projectors_and_leaves_the_model_gradients_alone(tmp_path):
    path = tmp_path / "live.safetensors"
    model, twin = LM(), LM()
    with ProjectorTrainer(path, lr=0.05, sample_blocks=2) as trainer:
        fn = torch.compile(model, backend="spa", options=trainer.options(**CFG))
        plain = torch.compile(twin, backend="spa", options=CFG)
        idx = _tokens(0)
        g_live, g_plain = _step(fn, model, idx), _step(plain, twin, idx)
        for name in g_plain:  # identity start: the same selection, and the tap adds no model gradient
            torch.testing.assert_close(g_live[name], g_plain[name], msg=name)
        losses = trainer.step()
        assert set(losses) == {"model"} and losses["model"] > 0
        pq0 = trainer.params["model"][0].detach().clone()
        assert not torch.equal(pq0, torch.eye(8).expand(2, 8, 8))  # one Adam step moved it
        history = [losses["model"]]
        for s in range(1, 6):
            _step(fn, model, _tokens(s))
            history.append(trainer.step()["model"])
        assert trainer.steps == 6
        trainer.save()
    pf = load_projectors(path)
    assert set(pf.projectors) == {"model"} and pf.block_size == 16 and pf.report["trained_alongside_steps"] == 6
    torch.testing.assert_close(pf.projectors["model"].pq, trainer.params["model"][0].detach())


def test_compiled_graph_sees_in_place_updates_without_recompiling(tmp_path, monkeypatch):
    calls = []
    original = backend_mod.attach_projectors
    monkeypatch.setattr(backend_mod, "attach_projectors", lambda *a, **k: calls.append(1) or original(*a, **k))
    model, idx = LM(), _tokens(7)
    with ProjectorTrainer(tmp_path / "p.safetensors", sample_blocks=1) as trainer:
        trainer.pause()
        fn = torch.compile(model, backend="spa", options=trainer.options(**CFG))
        with torch.no_grad():
            before = fn(idx)
            pq, pk = trainer.params["model"]
            gen = torch.Generator().manual_seed(3)
            pq.copy_(torch.randn(pq.shape, generator=gen))
            pk.copy_(torch.randn(pk.shape, generator=gen))
            after = fn(idx)
        assert trainer.step() == {}  # paused: no auxiliary loss ran
        trainer.save()
    assert len(calls) == 1  # compiled once
    assert (after - before).abs().max() > 1e-4
    torch._dynamo.reset()
    with torch.no_grad():
        from_file = torch.compile(model, backend="spa", options={**CFG, "projectors": str(tmp_path / "p.safetensors")})(idx)
    torch.testing.assert_close(after, from_file)


def test_trainer_starts_from_an_existing_file(tmp_path):
    path = tmp_path / "p.safetensors"
    with ProjectorTrainer(path, lr=0.1, sample_blocks=2) as first:
        fn = torch.compile(LM(), backend="spa", options=first.options(**CFG))
        fn(_tokens(0)).sum().backward()
        first.step()
        first.save()
        saved = first.params["model"][0].detach().clone()
    torch._dynamo.reset()
    with ProjectorTrainer(path) as second:
        torch.compile(LM(), backend="spa", options=second.options(**CFG))(_tokens(1))
        torch.testing.assert_close(second.params["model"][0].detach(), saved)
    with pytest.raises(ValueError, match="sample_blocks"):
        ProjectorTrainer(path, sample_blocks=0)


def test_trainer_with_the_fine_score_warns_once_and_fits_the_pooled_objective(tmp_path):
    """block_score "fine": the aux loss (closed form) is the block-mean score's; the trainer says so
    once and still moves the projectors; training runs through the fine selection."""
    model = LM()
    with ProjectorTrainer(tmp_path / "p.safetensors", lr=0.05, sample_blocks=2) as trainer:
        fn = torch.compile(model, backend="spa", options=trainer.options(**CFG, block_score="fine", fine_rows=4,
                                                                          fine_keys=4))
        with pytest.warns(UserWarning, match="block_score='fine'"):
            _step(fn, model, _tokens(0))
        losses = trainer.step()
        assert losses["model"] > 0
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # once only
            _step(fn, model, _tokens(1))
        assert not torch.equal(trainer.params["model"][0].detach(), torch.eye(8).expand(2, 8, 8))
