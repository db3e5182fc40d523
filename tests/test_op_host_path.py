"""The host-side helpers of the kernel path: the one-launch selected-block bitmap and the
cached block summary (they replace about twenty small launches per op call)."""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from spa_compile import Visibility  # noqa: E402

codegen = pytest.importorskip("spa_compile.codegen")
from spa_compile.codegen import blockinfo  # noqa: E402
from spa_compile.codegen.bitmap import build_bitmap  # noqa: E402
from spa_compile.codegen.sparse_forward import selected_bitmap  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() else "cpu"


def _index(b, hs, nqb, nkb, kmax, seed):
    """Ascending index lists padded with -1, and their counts (random lengths, some empty)."""
    g = torch.Generator().manual_seed(seed)
    index = torch.full((b, hs, nqb, kmax), -1, dtype=torch.int32)
    count = torch.zeros((b, hs, nqb), dtype=torch.int32)
    for r in range(b * hs * nqb):
        n = int(torch.randint(0, min(kmax, nkb) + 1, (1,), generator=g))
        js = torch.randperm(nkb, generator=g)[:n].sort().values
        index.view(-1, kmax)[r, :n] = js.to(torch.int32)
        count.view(-1)[r] = n
    return index.to(DEV), count.to(DEV)


@settings(max_examples=12, deadline=None)
@given(nkb=st.integers(1, 130), kmax=st.integers(1, 40), nqb=st.integers(1, 4), hs=st.integers(1, 3),
       seed=st.integers(0, 1000))
def test_bitmap_kernel_equals_the_torch_formulation(nkb, kmax, nqb, hs, seed):
    index, count = _index(2, hs, nqb, nkb, kmax, seed)
    got = build_bitmap(index, count, nkb)
    assert got.dtype == torch.int32 and got.shape == (2, hs, nqb, (nkb + 31) // 32)
    assert torch.equal(got.cpu(), selected_bitmap(index, nkb).cpu())
    # every selected block's bit is set, and only those (bit 31 included: int32 wraps)
    bits = ((got.cpu().long()[..., :, None] >> torch.arange(32)) & 1).flatten(-2)[..., :nkb].bool()
    want = torch.zeros_like(bits)
    for r in range(index.view(-1, kmax).shape[0]):
        js = index.view(-1, kmax)[r, : int(count.view(-1)[r])].long().cpu()
        want.view(-1, nkb)[r, js] = True
    assert torch.equal(bits, want)


def test_block_info_is_cached_without_padding_and_recomputed_with_it():
    blockinfo._CACHE.clear()
    vis = Visibility(100, 120, causal=True, offset=3)
    a = blockinfo.block_info(vis, 2, 100, 120, 16, DEV)
    b = blockinfo.block_info(vis, 2, 100, 120, 16, DEV)
    assert a is b
    fresh = blockinfo._block_info(vis, 2, 100, 120, 16, DEV)
    for f in ("valid", "n", "first", "last", "cs"):
        assert torch.equal(getattr(a, f), getattr(fresh, f))
    other = blockinfo.block_info(Visibility(100, 120, causal=True, offset=4), 2, 100, 120, 16, DEV)
    assert other is not a and not torch.equal(other.cs, a.cs)
    kv = torch.ones(2, 100, dtype=torch.bool, device=DEV)
    kv[1, 90:] = False
    padded = Visibility(100, 100, causal=True, key_valid=kv)
    p1 = blockinfo.block_info(padded, 2, 100, 100, 16, DEV)
    kv[0, :5] = False  # a different padding of the same shape must not hit a cache
    p2 = blockinfo.block_info(Visibility(100, 100, causal=True, key_valid=kv), 2, 100, 100, 16, DEV)
    assert int(p2.n[0, 0]) == 11 and int(p1.n[0, 0]) == 16
    for i in range(blockinfo.CACHE_SIZE + 3):
        blockinfo.block_info(Visibility(100, 100, causal=True, offset=i), 1, 100, 100, 16, DEV)
    assert len(blockinfo._CACHE) == blockinfo.CACHE_SIZE


def test_tuning_skips_a_failing_optional_candidate_but_not_the_default(monkeypatch, tmp_path):
    from spa_compile.codegen import autotune

    monkeypatch.setenv("SPA_TUNE_CACHE", str(tmp_path / "tune.json"))
    monkeypatch.setenv("SPA_AUTOTUNE", "1")
    monkeypatch.setattr(autotune, "interpreting", lambda: False)
    times = {1: 3.0, 2: 1.0, 3: 2.0}
    timed = []

    def fake_bench(fn, **kw):
        fn()
        return times[timed[-1]]

    monkeypatch.setattr(autotune.triton.testing, "do_bench", fake_bench)

    def run(cand):
        timed.append(cand["c"])
        if cand["c"] == 2:
            raise RuntimeError("descriptor not supported here")

    cands = [{"c": 1}, {"c": 2}, {"c": 3}]
    with pytest.warns(RuntimeWarning, match="skipped"):
        best = autotune.pick("test_kernel", ("k", 1), cands, run, "cpu")
    assert best == {"c": 3}  # the failing (otherwise fastest) variant is left out

    def run_bad_default(cand):
        timed.append(cand["c"])
        if cand["c"] == 1:
            raise RuntimeError("a real bug")

    with pytest.raises(RuntimeError, match="a real bug"):
        autotune.pick("test_kernel", ("k", 2), cands, run_bad_default, "cpu")


def test_tma_candidates_on_by_default_off_by_env(monkeypatch):
    from spa_compile.codegen import autotune

    monkeypatch.setattr(autotune, "interpreting", lambda: False)
    monkeypatch.setattr(autotune.torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(autotune.torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(autotune, "_tma_card", lambda index: True)
    monkeypatch.delenv("SPA_TMA", raising=False)
    assert autotune.tma_card() is True
    monkeypatch.setenv("SPA_TMA", "0")
    assert autotune.tma_card() is False
    monkeypatch.setattr(autotune, "_tma_card", lambda index: False)  # pre-Hopper card
    monkeypatch.delenv("SPA_TMA", raising=False)
    assert autotune.tma_card() is False
