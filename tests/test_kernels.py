"""The Triton kernels of spa_compile.codegen against the pure-PyTorch reference.

CPU (CI): the kernels run in Triton's interpreter (TRITON_INTERPRET=1, set below before
triton is imported when there is no CUDA device) on small shapes: odd lengths, GQA ratios
1/4/8, causal and not, offsets and windows, key padding, both fills, both selection
modes, forward and backward. GPU (``-m gpu``): the same checks at real shapes, with
outputs poisoned (NaN) before each run, errors within METHOD.md's bounds per dtype.
"""

from __future__ import annotations

import functools
import math
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from spa_compile import SPAConfig, Visibility  # noqa: E402
from spa_compile import reference as R  # noqa: E402
from spa_compile.budget import max_selected  # noqa: E402
from spa_compile.projector import Projector  # noqa: E402

codegen = pytest.importorskip("spa_compile.codegen")
from spa_compile.codegen import api, sparse_backward, sparse_forward  # noqa: E402
from spa_compile.codegen.blockinfo import block_info  # noqa: E402
from spa_compile.codegen.pooling import pool_kv  # noqa: E402

import triton.language as _tl  # noqa: E402

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
# Triton chooses interpreter or compiler when it is imported: if another test module imported
# triton before TRITON_INTERPRET was set, the interpreter is not really active (tests/conftest.py
# should set it first on machines without CUDA).
CPU_OK = INTERPRET and type(_tl.sum).__name__ == "InterpretedFunction"
needs_cpu_kernels = pytest.mark.skipif(
    not CPU_OK,
    reason="Triton interpreter not active: CUDA present, or triton was imported before TRITON_INTERPRET=1 was set",
)
gpu = pytest.mark.gpu
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available() or INTERPRET, reason="needs a CUDA GPU (compiled kernels)")


# ---------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------


def maxabs(x):
    return float(x.abs().max()) if x.numel() else 0.0


def rel(a, b):
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def make_qkv(b, hq, hkv, nq, nk, d, dv=None, dtype=torch.float32, device="cpu", seed=0):
    gen = torch.Generator(device="cpu").manual_seed(seed)
    dv = d if dv is None else dv
    q = torch.randn(b, hq, nq, d, generator=gen).to(device=device, dtype=dtype)
    k = torch.randn(b, hkv, nk, d, generator=gen).to(device=device, dtype=dtype)
    v = torch.randn(b, hkv, nk, dv, generator=gen).to(device=device, dtype=dtype)
    return q, k, v


def padding(b, nk, lengths, left=False, device="cpu"):
    u = torch.arange(nk, device=device)[None]
    n = torch.tensor(lengths, device=device)[:, None]
    return (u >= nk - n) if left else (u < n)


def reference_stages(q, k, v, vis, scale, cfg, projector=None):
    b, hkv = q.shape[0], k.shape[1]
    valid = R.valid_keys(vis, b, hkv, cfg.block_size, q.device)
    pooled = R.pool_for(cfg, k, v, valid)
    return valid, pooled


def block_scores(q, pooled, scale, cfg, projector=None):
    """reference scores [B, Hs, NQB, NKB] (float64) for tie checks."""
    b, hq, nq, d = q.shape
    hkv = pooled.kbar.shape[1]
    bs = cfg.block_size
    nqb = -(-nq // bs)
    qpad = torch.nn.functional.pad(q.double(), (0, 0, 0, nqb * bs - nq))
    cnt = torch.clamp(nq - torch.arange(nqb, device=q.device) * bs, max=bs).double()
    qbar = qpad.unflatten(2, (nqb, bs)).sum(3) / cnt[:, None]
    proj = projector or Projector.identity(hkv, d)
    if proj.pq is not None:
        proj = Projector(proj.pq.double(), proj.pk.double())
    qp = torch.stack([proj.project_queries(qbar[:, :, i]) for i in range(nqb)], dim=2)
    kp = proj.project_keys(pooled.kbar.double())
    if cfg.selection == "group":
        qp = qp.unflatten(1, (hkv, hq // hkv)).sum(2)
    else:
        kp = kp.repeat_interleave(hq // hkv, dim=1)
    return scale * torch.einsum("bhir,bhjr->bhij", qp, kp)


def bound_block_scores(q, pooled, scale, cfg):
    """reference key-range bound scores [B, Hs, NQB, NKB] (float64) for tie checks."""
    hq, nq = q.shape[1], q.shape[2]
    hs = pooled.kbar.shape[1] if cfg.selection == "group" else hq
    kmx, kmn = (R._to_heads(x.double(), hq) for x in (pooled.kmax, pooled.kmin))
    bs = cfg.block_size
    return torch.stack([R.bound_scores(q[:, :, t0:t0 + bs].double(), kmx, kmn, hs, scale)
                        for t0 in range(0, nq, bs)], dim=2)


def fine_block_scores(q, pooled, scale, cfg, vis, valid, projector=None):
    """reference "fine" scores [B, Hs, NQB, NKB] (float64) for tie checks."""
    hq, nq, d = q.shape[1], q.shape[2], q.shape[3]
    hkv, bs = pooled.kbar.shape[1], cfg.block_size
    hs = hkv if cfg.selection == "group" else hq
    proj = projector or Projector.identity(hkv, d)
    ksub, nsub = proj.project_keys(pooled.ksub.double()), pooled.nsub.double()
    out = []
    for t0 in range(0, nq, bs):
        visible, _ = R.classify_blocks(vis.rows(t0, min(nq, t0 + bs), q.device), valid, bs)
        out.append(R.fine_scores(q[:, :, t0:t0 + bs].double(), ksub, nsub, visible, cfg.fine_rows, hs, scale, proj))
    return torch.stack(out, dim=2)


def selection_scores(q, pooled, scale, cfg, projector=None, vis=None, valid=None):
    """The scores the selection ranks by: the projector's, the bound for "bound"/"hybrid", the
    fine score for "fine" (needs vis and valid)."""
    if cfg.block_score == "fine":
        return [fine_block_scores(q, pooled, scale, cfg, vis, valid, projector)]
    scores = [block_scores(q, pooled, scale, cfg, projector)]
    if cfg.block_score != "projector":
        scores.append(bound_block_scores(q, pooled, scale, cfg))
    return scores


def assert_same_selection(ref, idx, cnt, scores=None, tol=1e-4):
    """Equal counts; equal index lists except blocks whose scores tie within rounding
    (``scores``: one ``[B, Hs, NQB, NKB]`` tensor or a list, a tie under any of them)."""
    assert idx.shape == ref.index.shape, (idx.shape, ref.index.shape)
    assert torch.equal(cnt.cpu(), ref.count.cpu()), "selected counts differ"
    diff = (idx.cpu() != ref.index.cpu()).any(-1)
    if not diff.any():
        return
    assert scores is not None, f"{int(diff.sum())} query blocks select different blocks"
    for b, h, i in diff.nonzero().tolist():
        a = set(ref.index[b, h, i].tolist()) - {-1}
        g = set(idx[b, h, i].tolist()) - {-1}
        only_ref, only_got = sorted(a - g), sorted(g - a)
        spreads = []
        for sc in scores if isinstance(scores, (list, tuple)) else [scores]:
            s = sc[b, h, i].cpu()
            spread = float(s[only_ref + only_got].max() - s[only_ref + only_got].min())
            spreads.append(spread / (float(s[only_ref + only_got].abs().max()) + 1.0))
        assert min(spreads) <= tol, f"blocks {only_ref} vs {only_got} at {(b, h, i)} differ by {spreads}"


def run_and_check(q, k, v, vis, cfg, projector=None, grads=True, tol=2e-5, gtol=5e-5, check_sel=True):
    scale = 1.0 / math.sqrt(q.shape[-1])
    out, lse, idx, cnt = api.spa_forward(q, k, v, vis, scale, cfg, projector)
    kmax = int(max_selected(q.shape[2], k.shape[2], vis, cfg))
    hs = k.shape[1] if cfg.selection == "group" else q.shape[1]
    assert idx.shape == (q.shape[0], hs, -(-q.shape[2] // cfg.block_size), kmax)
    assert idx.dtype == torch.int32 and cnt.dtype == torch.int32 and lse.dtype == torch.float32
    assert out.dtype == q.dtype and out.shape == (*q.shape[:3], v.shape[-1])
    valid, pooled = reference_stages(q.double(), k.double(), v.double(), vis, scale, cfg)
    if check_sel:
        ref_sel = R.select_blocks(q.double(), pooled, vis, valid, scale, cfg, projector)
        assert_same_selection(ref_sel, idx, cnt, selection_scores(q, pooled, scale, cfg, projector, vis, valid))
    # stage check: the sparse part with the kernels' own selection
    qr, kr, vr = (x.detach().double().requires_grad_(grads) for x in (q, k, v))
    pooled_r = R.pool_blocks(kr, vr, valid, cfg.block_size)
    ro, rl = R.sparse_attention(qr, kr, vr, R.Selection(idx, cnt), pooled_r, vis, valid, scale, cfg.fill,
                                cfg.block_size)
    assert torch.isfinite(out).all()
    assert rel(out, ro.detach()) < tol, rel(out, ro.detach())
    fin = torch.isfinite(rl)
    assert torch.equal(fin, torch.isfinite(lse)), "rows that see nothing differ"
    assert maxabs(lse[fin].double() - rl[fin].detach()) < max(tol, 1e-4) * 50
    if grads:
        go = torch.randn_like(out)
        dq, dk, dv = api.spa_backward(go, q, k, v, out, lse, idx, cnt, vis, scale, cfg)
        ro.backward(go.double())
        for name, got, want in (("dq", dq, qr.grad), ("dk", dk, kr.grad), ("dv", dv, vr.grad)):
            assert got.dtype == q.dtype and got.shape == want.shape
            assert torch.isfinite(got).all(), name
            assert rel(got, want) < gtol, (name, rel(got, want))
    return out, lse, idx, cnt


# ---------------------------------------------------------------------------------------
# CPU (interpreter) suite
# ---------------------------------------------------------------------------------------

CASES = [
    # (b, hq, hkv, nq, nk, d, vis kwargs, cfg kwargs)
    pytest.param(1, 4, 1, 75, 75, 16, dict(causal=True), dict(), id="causal-gqa4-odd"),
    pytest.param(1, 2, 2, 70, 70, 16, dict(), dict(selection="head"), id="none-mha-head"),
    pytest.param(1, 8, 1, 64, 64, 16, dict(causal=True), dict(fill="none", topk=1), id="causal-gqa8-nofill"),
    pytest.param(2, 4, 1, 67, 67, 16, dict(causal=True, key_valid="right"), dict(), id="causal-padding"),
    pytest.param(2, 2, 1, 60, 60, 16, dict(key_valid="left"), dict(selection="head", sink_blocks=0), id="leftpad-head"),
    pytest.param(1, 4, 2, 50, 80, 16, dict(causal=True, offset=30, window=40), dict(local_blocks=1), id="offset-window"),
    pytest.param(1, 2, 1, 40, 90, 32, dict(window=33, offset=50), dict(min_blocks=2, max_blocks=3), id="window-only"),
    # every key block full (sparse_forward.uniform_counts): the fill's count is a constant
    pytest.param(1, 4, 2, 128, 128, 16, dict(causal=True), dict(density=0.4), id="causal-uniform-counts"),
    # the key-range bound score (bound_selection): first pass half or forced-only, then the bound
    pytest.param(1, 4, 1, 150, 150, 16, dict(causal=True), dict(block_score="hybrid"), id="hybrid-causal-gqa4"),
    pytest.param(2, 2, 2, 97, 97, 32, dict(key_valid="right"), dict(block_score="bound", selection="head"),
                 id="bound-pad-head"),
    pytest.param(1, 8, 1, 90, 130, 16, dict(causal=True, offset=40, window=70),
                 dict(block_score="hybrid", topk=3, local_blocks=1), id="hybrid-window-gqa8"),
    # block_score "fine": the reference selection in torch, the kernels' sparse stage on its lists
    pytest.param(2, 4, 2, 90, 90, 16, dict(causal=True, key_valid="right"),
                 dict(block_score="fine", fine_rows=4, fine_keys=8, selection="head"), id="fine-causal-pad-head"),
]


@needs_cpu_kernels
@pytest.mark.parametrize("visk", [dict(causal=True, key_valid="right"), dict(causal=True, offset=100, window=250)],
                         ids=["causal-padding", "offset-window"])
def test_fill_chunk_variants(visk):
    """The forward's fill with 32- and 128-landmark chunks (the autotuner's other candidates,
    BJ / FILL_STAGES) against the reference, over more than one selection-bitmap word."""
    b, hq, hkv, n, d, bs = 1, 1, 1, 560, 16, 16
    q, k, v = make_qkv(b, hq, hkv, n, n, d, seed=5)
    kw = dict(visk)
    if kw.get("key_valid") == "right":
        kw["key_valid"] = padding(b, n, [n - 90])
    vis = Visibility(n, n, **kw)
    cfg = SPAConfig(block_size=bs, topk=3)
    scale = d**-0.5
    _, _, idx, cnt = api.spa_forward(q, k, v, vis, scale, cfg, None)
    info = block_info(vis, b, n, n, bs, q.device)
    _, _, kb, vb = pool_kv(k, v, info)
    valid, pooled = reference_stages(q.double(), k.double(), v.double(), vis, scale, cfg)
    ro, rl = R.sparse_attention(q.double(), k.double(), v.double(), R.Selection(idx, cnt), pooled, vis, valid, scale,
                                cfg.fill, bs)
    for c in ({"GP": 1, "num_warps": 4, "num_stages": 2, "BJ": 32, "FILL_STAGES": 3},
              {"GP": 1, "num_warps": 4, "num_stages": 2, "BJ": 128}):
        out, lse = sparse_forward.launch_forward(q, k, v, kb, vb, info, idx, cnt, scale, True, c)
        assert rel(out, ro) < 2e-5, (c, rel(out, ro))
        fin = torch.isfinite(rl)
        assert torch.equal(fin, torch.isfinite(lse))
        assert maxabs(lse[fin].double() - rl[fin]) < 5e-3


@needs_cpu_kernels
@pytest.mark.parametrize("hq,hkv,gp", [(2, 1, 2), (1, 1, 1)], ids=["gqa-gp2", "mha"])
def test_forward_tma_variant(hq, hkv, gp):
    """The forward's TMA variants (K/V, and kbar/vbar with TMA_FILL, through host-built tensor
    descriptors, rows past Nk / NKB zero-filled by the descriptor's bounds) against the
    reference and bitwise against the pointer path: an Nk that is not a multiple of the
    block, key padding, fill on. The interpreter runs descriptor loads; the autotuner never
    offers the variants there."""
    b, n, d, bs = 1, 150, 16, 16
    q, k, v = make_qkv(b, hq, hkv, n, n, d, dtype=torch.float16, seed=11)
    vis = Visibility(n, n, causal=True, key_valid=padding(b, n, [n - 7]))
    cfg = SPAConfig(block_size=bs, topk=3)
    scale = d**-0.5
    _, _, idx, cnt = api.spa_forward(q, k, v, vis, scale, cfg, None)
    info = block_info(vis, b, n, n, bs, q.device)
    _, _, kb, vb = pool_kv(k, v, info)
    assert sparse_forward.tma_ok(k, v, bs)
    base = {"GP": gp, "num_warps": 4, "num_stages": 2, "BJ": 64}
    o1, l1 = sparse_forward.launch_forward(q, k, v, kb, vb, info, idx, cnt, scale, True, base)
    assert sparse_forward.tma_ok(kb, vb, 32)
    for extra in ({"TMA": True}, {"TMA": True, "TMA_FILL": True}):
        o2, l2 = sparse_forward.launch_forward(q, k, v, kb, vb, info, idx, cnt, scale, True, dict(base, **extra))
        assert torch.equal(o1, o2) and torch.equal(l1, l2), extra
    # 32-landmark fill chunks through descriptors (rows past NKB zero-filled)
    c32 = dict(base, BJ=32, FILL_STAGES=3)
    o3, l3 = sparse_forward.launch_forward(q, k, v, kb, vb, info, idx, cnt, scale, True, c32)
    o4, l4 = sparse_forward.launch_forward(q, k, v, kb, vb, info, idx, cnt, scale, True, dict(c32, TMA=True, TMA_FILL=True))
    assert torch.equal(o3, o4) and torch.equal(l3, l4)
    valid, pooled = reference_stages(q.double(), k.double(), v.double(), vis, scale, cfg)
    ro, rl = R.sparse_attention(q.double(), k.double(), v.double(), R.Selection(idx, cnt), pooled, vis, valid, scale,
                                cfg.fill, bs)
    assert rel(o2, ro) < 2e-3
    fin = torch.isfinite(rl)
    assert torch.equal(fin, torch.isfinite(l2))


def test_tma_eligibility_and_candidates():
    """TMA needs 16-bit dtypes, power-of-two head dims and 16-byte strides (else the launcher
    keeps the pointer loads); the candidate list offers it only on a compiled Hopper path,
    never as the heuristic default, and never under the interpreter."""
    k = torch.zeros(1, 2, 100, 64, dtype=torch.bfloat16)
    assert sparse_forward.tma_ok(k, k, 64) == codegen.autotune.interpreting()
    assert not sparse_forward.tma_ok(k.float(), k.float(), 64)
    odd = torch.zeros(1, 2, 100, 72, dtype=torch.bfloat16)[..., :64]  # row stride 72 * 2 = 144 bytes: aligned
    assert sparse_forward.tma_ok(odd, odd, 64) == codegen.autotune.interpreting()
    bad = torch.zeros(1, 2, 100, 68, dtype=torch.bfloat16)[..., :64]  # 136-byte rows: not 16-byte aligned
    assert not sparse_forward.tma_ok(bad, bad, 64)
    assert not sparse_forward.tma_ok(torch.zeros(1, 2, 100, 96, dtype=torch.bfloat16), k, 64)
    nc = torch.zeros(1, 2, 64, 100, dtype=torch.bfloat16).transpose(-1, -2)  # inner dim not contiguous
    assert not sparse_forward.tma_ok(nc, nc, 64)
    ex = torch.zeros(1, 1, 100, 64, dtype=torch.bfloat16).expand(1, 2, 100, 64)  # stride 0 over heads
    assert not sparse_forward.tma_ok(ex, ex, 64)
    one = torch.zeros(1, 2, 100, 64, dtype=torch.bfloat16).as_strided((1, 2, 100, 64), (1, 6400, 64, 1))
    assert sparse_forward.tma_ok(one, one, 64) == codegen.autotune.interpreting()  # size-1 dim: stride ignored
    cands = codegen.autotune.attention_candidates(4, 64, 128, 128, torch.bfloat16, True, fill=True, tma=True, hf=True)
    assert not cands[0].get("TMA", False)
    if codegen.autotune.interpreting():
        assert not any(c.get("TMA", False) for c in cands)
    else:
        # the heads-first (HF) variants come last; they are checked in test_heads_first_candidates
        hf = [c for c in cands if c.get("HF")]
        assert cands[-len(hf):] == hf and [c for c in hf if c.get("TMA")] == hf
        cands = cands[:-len(hf)]
        plain = codegen.autotune.attention_candidates(4, 64, 128, 128, torch.bfloat16, True, fill=True, tma=False)
        plain = [c for c in plain if not c.get("HF")]
        assert [c for c in cands if not c.get("TMA", False)] == plain
        tma_cands = [c for c in cands if c.get("TMA")]
        assert [dict(c, TMA=True, TMA_FILL=True) for c in plain] == tma_cands[:len(plain)]
        assert [dict(c, TMA=True) for c in plain[:2]] == tma_cands[len(plain):len(plain) + 2]
        assert all(c["num_stages"] == 4 for c in tma_cands[len(plain) + 2:])
    for dt, d in [(torch.float32, 128), (torch.bfloat16, 96)]:
        assert not any(c.get("TMA") for c in codegen.autotune.attention_candidates(4, 64, d, d, dt, True, tma=True))
    assert not any(c.get("TMA") for c in codegen.autotune.attention_candidates(4, 64, 128, 128, torch.bfloat16, True,
                                                                               backward=True, tma=True))



def test_heads_first_candidates():
    """Heads-first (HF) program order is a tuning candidate for GQA group selection only:
    last in the list (the first config stays the heuristic default), one per head pack GP
    smaller than the group (GP = g has no other pack to share K/V with): the first config of
    that GP, TMA when TMA configs are offered. Only when asked for (``hf=True`` or
    $SPA_TUNE_HF=1): they lost everywhere on the H200."""
    A = functools.partial(codegen.autotune.attention_candidates, hf=True)
    for backward in (False, True):
        assert not any(c.get("HF") for c in codegen.autotune.attention_candidates(4, 64, 128, 128, torch.bfloat16, True,
                                                                                  backward=backward, fill=True))
    for g, block, d, fill, backward in [(4, 64, 128, True, False), (4, 64, 128, False, False), (4, 64, 128, True, True),
                                        (4, 16, 32, True, False), (2, 32, 64, False, True), (8, 64, 128, True, False)]:
        for tma in (None, True, False):
            cands = A(g, block, d, d, torch.bfloat16, True, backward=backward, fill=fill, tma=tma)
            hf = [c for c in cands if c.get("HF")]
            rest = cands[:len(cands) - len(hf)]
            assert hf and cands[-len(hf):] == hf and not any(c.get("HF") for c in rest)
            assert not any(c.get("GO") for c in hf)
            rest = [c for c in rest if not c.get("GO")]
            tma_cands = [c for c in rest if c.get("TMA")]
            base = tma_cands or rest
            packs = list(dict.fromkeys(c["GP"] for c in base if c["GP"] < g))  # in list order
            assert packs and hf == [dict(next(c for c in base if c["GP"] == gp), HF=True) for gp in packs]
            if backward or tma is False or codegen.autotune.interpreting():
                assert not tma_cands
            elif tma:
                assert all(c["TMA"] for c in hf)
            # the same list without the HF variants as when the group shares no K/V
            if not backward:
                assert rest[0] == A(g, block, d, d, torch.bfloat16, True, backward=backward, fill=fill, tma=False)[0]
            assert not any(c.get("HF") for c in A(g, block, d, d, torch.bfloat16, False, backward=backward, fill=fill,
                                                   tma=tma))
    for backward in (False, True):  # MHA: no group to share K/V
        assert not any(c.get("HF") for c in A(1, 64, 128, 128, torch.bfloat16, True, backward=backward, fill=True))


def test_group_order_candidates():
    """Group order (GO) twins are forward candidates for GQA group selection (g > 1): one per
    one-head config (TMA ones when offered), after them and never first; none for dq, MHA or
    head selection. The shipped H200 entries for 128K top-k 32 at Hkv=8 (and 64K without the fill, since
    run 61) are GO configs, so they
    must stay in the list (else tuning would run again on the card)."""
    A = codegen.autotune.attention_candidates
    for g, fill, tma in [(4, True, True), (4, False, True), (4, True, False), (8, False, None), (2, True, True)]:
        cands = A(g, 64, 128, 128, torch.bfloat16, True, fill=fill, tma=tma)
        go = [c for c in cands if c.get("GO")]
        plain = [c for c in cands if not c.get("GO")]
        base = [c for c in plain if c.get("TMA")] or plain
        assert go == [dict(c, GO=True) for c in base if c["GP"] == 1], (g, fill, tma)
        assert not cands[0].get("GO") and cands.index(go[0]) > cands.index(base[-1])
    for backward in (False, True):
        assert not any(c.get("GO") for c in A(1, 64, 128, 128, torch.bfloat16, True, backward=backward, fill=True))
        assert not any(c.get("GO") for c in A(4, 64, 128, 128, torch.bfloat16, False, backward=backward, fill=True))
    assert not any(c.get("GO") for c in A(4, 64, 128, 128, torch.bfloat16, True, backward=True, fill=True))
    shipped = {k: v for k, v in codegen.autotune.tuned_entries().items() if k.startswith("fwd.") and v.get("GO")}
    for key, cfg in shipped.items():
        parts = key.split("|")
        g, fill = int(parts[7]), parts[12] == "True"
        if codegen.autotune.interpreting():  # no TMA candidates there: the same config without
            cfg = {k: v for k, v in cfg.items() if k not in ("TMA", "TMA_FILL")}
        assert cfg in A(g, int(parts[6]), int(parts[3]), int(parts[4]), torch.bfloat16, True, fill=fill, tma=True), key
    assert shipped  # the 128K top-k entries (Hkv=8, with and without the fill)


def test_tuning_key_classes():
    """The per-query-block kernels tune apart by length (8K / 32K / 64K / longer) and row length
    (index rows of up to 64 blocks vs longer)."""
    def info(n):
        return block_info(Visibility(n, n, causal=True), 1, n, n, 64, "cpu")

    assert api._row_class(torch.zeros(1, 1, 4, 37)) != api._row_class(torch.zeros(1, 1, 4, 415))
    assert api._row_class(torch.zeros(1, 1, 4, 64)) == api._row_class(torch.zeros(1, 1, 4, 1))
    sizes = [api._size_class(info(n)) for n in (4096, 8192, 8256, 32768, 32832, 65536, 65600, 131072)]
    assert sizes[0] == sizes[1] and sizes[2] == sizes[3] and sizes[4] == sizes[5] and sizes[6] == sizes[7]
    assert len(set(sizes)) == 4
    # long kernels are timed over TUNE_MIN_RUNS runs, short ones over 20 ms
    assert codegen.autotune.tuning_rep_ms(0.1) == 20.0
    assert codegen.autotune.tuning_rep_ms(17.0) == 17.0 * codegen.autotune.TUNE_MIN_RUNS
    assert codegen.autotune.tuning_rep_ms(1000.0) == codegen.autotune.TUNE_MAX_REP_MS


@needs_cpu_kernels
@pytest.mark.parametrize("b,hq,hkv,pad,gps", [(1, 8, 2, False, (4, 2)), (2, 4, 1, True, (2,))],
                         ids=["causal", "causal-padding-b2"])
def test_heads_first_order(b, hq, hkv, pad, gps):
    """The forward (with the landmark fill) and dq with heads-first program order (HF: grid
    axes swapped, common.qblock_prologue) bitwise equal to query blocks first: same
    arithmetic, only the order of the programs changes. Outputs NaN-poisoned first: every
    element written. GP = 4 (the whole group in one program: nothing to share, the order still
    changes) and 2 (two head packs per group, the case HF is for)."""
    n, d, bs = 200, 16, 16
    q, k, v = make_qkv(b, hq, hkv, n, n, d, seed=21 + b)
    kv = padding(b, n, [n - 23 * (i + 1) for i in range(b)]) if pad else None
    vis = Visibility(n, n, causal=True, key_valid=kv)
    cfg = SPAConfig(block_size=bs, topk=3)
    scale = d**-0.5
    out, lse, idx, cnt = api.spa_forward(q, k, v, vis, scale, cfg, None)
    info = block_info(vis, b, n, n, bs, q.device)
    _, _, kb, vb = pool_kv(k, v, info)
    do = torch.randn(out.shape, generator=torch.Generator().manual_seed(5))
    delta = sparse_backward.launch_delta(out, do)
    hf_cands = [c for c in codegen.autotune.attention_candidates(hq // hkv, bs, d, d, q.dtype, True, fill=True,
                                                                 hf=True) if c.get("HF")]
    assert hf_cands and all(c["GP"] < hq // hkv for c in hf_cands)
    for gp in gps:
        assert_heads_first_equal(q, k, v, kb, vb, info, idx, cnt, scale, lse, do, delta,
                                 {"GP": gp, "num_warps": 4, "num_stages": 2, "BJ": 64})


def assert_heads_first_equal(q, k, v, kb, vb, info, idx, cnt, scale, lse, do, delta, base):
    """The forward (with the fill) and dq under config ``base``, ``base`` + HF and ``base`` + GO
    (group order), into NaN-poisoned buffers: every element written, and bitwise the same."""
    res = []
    for c in (base, dict(base, HF=True), dict(base, GO=True)):
        o = torch.full((*q.shape[:3], v.shape[-1]), float("nan"), device=q.device, dtype=q.dtype)
        lo = torch.full(q.shape[:3], float("nan"), device=q.device)
        sparse_forward.launch_forward(q, k, v, kb, vb, info, idx, cnt, scale, True, c, o, lo)
        dq = torch.full_like(q, float("nan"))
        sparse_backward.launch_dq(q, k, v, do, lse, delta, kb, vb, info, idx, cnt, scale, True, c, dq)
        res.append((o, lo, dq))
    (o1, l1, dq1) = res[0]
    assert not o1.isnan().any() and not l1.isnan().any() and not dq1.isnan().any(), base
    for order, (o2, l2, dq2) in zip(("HF", "GO"), res[1:]):
        assert torch.equal(o1, o2) and torch.equal(l1, l2) and torch.equal(dq1, dq2), (base, order)


@needs_cpu_kernels
@pytest.mark.parametrize("b,hq,hkv,nq,nk,d,visk,cfgk", CASES)
def test_kernels_match_reference(b, hq, hkv, nq, nk, d, visk, cfgk):
    q, k, v = make_qkv(b, hq, hkv, nq, nk, d, seed=nq + nk)
    visk = dict(visk)
    if "key_valid" in visk:
        lengths = [nk - 9, nk - 30][:b]
        visk["key_valid"] = padding(b, nk, lengths, left=visk["key_valid"] == "left")
    vis = Visibility(nq=nq, nk=nk, **visk)
    cfg = SPAConfig(**{"block_size": 16, "density": 0.3, **cfgk})
    run_and_check(q, k, v, vis, cfg)


@needs_cpu_kernels
@pytest.mark.parametrize("fill", [True, False], ids=["fill", "exact"])
def test_forward_scale_sign(fill):
    """The forward's softmax takes the row max of unscaled logits (the scale enters the exponent's
    multiply-add), which holds for scale > 0 only: a negative scale is flipped into q, so the result
    equals the reference at that scale; scale 0 is refused with a way out."""
    q, k, v = make_qkv(1, 2, 1, 80, 80, 16, seed=3)
    vis = Visibility(80, 80, causal=True)
    cfg = SPAConfig(block_size=16, topk=2, fill="landmark" if fill else "none")
    info = block_info(vis, 1, 80, 80, 16, q.device)
    _, _, kb, vb = pool_kv(k, v, info)
    idx, cnt = api.selection_stage(q, kb, info, 0.25, cfg, None, int(max_selected(80, 80, vis, cfg)))
    conf = {"GP": 1, "num_warps": 4, "num_stages": 2, "BJ": 32}
    valid, pooled = reference_stages(q.double(), k.double(), v.double(), vis, 0.25, cfg)
    for scale in (-0.25, 0.25):
        out, lse = sparse_forward.launch_forward(q, k, v, kb, vb, info, idx, cnt, scale, fill, conf)
        ro, rl = R.sparse_attention(q.double(), k.double(), v.double(), R.Selection(idx, cnt), pooled, vis, valid,
                                    scale, cfg.fill, 16)
        assert rel(out, ro) < 2e-5, (scale, rel(out, ro))
        fin = torch.isfinite(rl)
        assert torch.equal(fin, torch.isfinite(lse)) and maxabs(lse[fin].double() - rl[fin]) < 1e-3
    with pytest.raises(ValueError, match="scale 0 .*reference takes any scale"):
        sparse_forward.launch_forward(q, k, v, kb, vb, info, idx, cnt, 0.0, fill, conf)


@needs_cpu_kernels
def test_end_to_end_and_projector():
    """spa_forward against reference.spa_attention (its own selection) with a learned projector."""
    b, hq, hkv, n, d, r = 1, 4, 2, 70, 16, 8
    q, k, v = make_qkv(b, hq, hkv, n, n, d, seed=3)
    gen = torch.Generator().manual_seed(4)
    proj = Projector(torch.randn(hkv, d, r, generator=gen), torch.randn(hkv, d, r, generator=gen))
    vis = Visibility(n, n, causal=True)
    cfg = SPAConfig(block_size=16, density=0.25)
    run_and_check(q, k, v, vis, cfg, projector=proj, grads=False)
    scale = 1.0 / math.sqrt(d)
    out, lse, _, _ = api.spa_forward(q, k, v, vis, scale, cfg, proj)
    ro, rl = R.spa_attention(q, k, v, visibility=vis, config=cfg, projector=proj, enable_gqa=True,
                             return_lse=True)
    assert rel(out, ro) < 2e-5


@needs_cpu_kernels
def test_dense_when_everything_selected():
    """density 1: SPA is dense attention (SPEC.md Exactness)."""
    q, k, v = make_qkv(1, 4, 2, 45, 45, 16, seed=5)
    vis = Visibility(45, 45, causal=True)
    cfg = SPAConfig(block_size=16, density=1.0)
    out, lse, idx, cnt = api.spa_forward(q, k, v, vis, 0.25, cfg, None)
    dense = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, scale=0.25, enable_gqa=True)
    assert rel(out, dense) < 2e-6


@needs_cpu_kernels
def test_rows_that_see_nothing_and_several_landmark_splits(monkeypatch):
    """Causal with a negative offset: the first rows see no key (o = 0, lse = -inf, finite
    gradients); the landmark gradient runs in several query-block splits."""
    monkeypatch.setattr(sparse_backward, "LANDMARK_MIN_SPLIT", 1)
    q, k, v = make_qkv(1, 2, 1, 60, 60, 16, seed=6)
    vis = Visibility(60, 60, causal=True, offset=-20)
    cfg = SPAConfig(block_size=16, density=0.2, local_blocks=1)
    out, lse, idx, cnt = run_and_check(q, k, v, vis, cfg)
    assert (out[:, :, :20] == 0).all() and torch.isinf(lse[:, :, :20]).all()


@needs_cpu_kernels
def test_backward_with_grad_lse():
    """A loss on the lse too: spa_backward(grad_lse=...) against autograd of the reference."""
    q, k, v = make_qkv(1, 4, 2, 50, 50, 16, seed=8)
    vis = Visibility(50, 50, causal=True)
    cfg = SPAConfig(block_size=16, density=0.3)
    out, lse, idx, cnt = api.spa_forward(q, k, v, vis, 0.25, cfg, None)
    go, gl = torch.randn_like(out), torch.randn_like(lse)
    dq, dk, dv = api.spa_backward(go, q, k, v, out, lse, idx, cnt, vis, 0.25, cfg, grad_lse=gl)
    qr, kr, vr = (x.double().requires_grad_() for x in (q, k, v))
    valid = R.valid_keys(vis, 1, 2, 16, q.device)
    ro, rl = R.sparse_attention(qr, kr, vr, R.Selection(idx, cnt), R.pool_blocks(kr, vr, valid, 16), vis, valid,
                                0.25, "landmark", 16)
    ((ro * go.double()).sum() + (rl * gl.double()).sum()).backward()
    for got, want in ((dq, qr.grad), (dk, kr.grad), (dv, vr.grad)):
        assert rel(got, want) < 5e-5


@needs_cpu_kernels
@settings(max_examples=4, deadline=None, suppress_health_check=list(HealthCheck))
@given(
    n=st.integers(17, 70),
    extra=st.integers(0, 20),
    g=st.sampled_from([1, 2, 4]),
    causal=st.booleans(),
    fill=st.sampled_from(["landmark", "none"]),
    density=st.sampled_from([0.1, 0.3, 0.6]),
    pad=st.integers(0, 15),
    seed=st.integers(0, 2**16),
)
def test_hypothesis_small(n, extra, g, causal, fill, density, pad, seed):
    nk = n + extra
    q, k, v = make_qkv(1, g, 1, n, nk, 16, seed=seed)
    kv = padding(1, nk, [nk - pad]) if pad else None
    vis = Visibility(n, nk, causal=causal, offset=extra if causal else 0, key_valid=kv)
    cfg = SPAConfig(block_size=16, density=density, fill=fill)
    run_and_check(q, k, v, vis, cfg)


def test_unsupported_reason():
    q, k, v = make_qkv(1, 2, 1, 8, 8, 16)
    cfg = SPAConfig()
    assert api.unsupported_reason(q, k, v, Visibility(8, 8), cfg) is not None  # CPU tensors
    dev = "cuda" if torch.cuda.is_available() else "meta"
    qc, kc, vc = (x.to(dev) for x in (q, k, v))
    if dev == "cuda":
        assert api.unsupported_reason(qc, kc, vc, Visibility(8, 8, causal=True), cfg) is None
    mask = torch.ones(8, 8, dtype=torch.bool, device=dev)
    assert "mask" in api.unsupported_reason(qc, kc, vc, Visibility(8, 8, mask=mask), cfg)
    assert "dtype" in api.unsupported_reason(qc.half().int(), kc, vc, Visibility(8, 8), cfg)
    assert "scale 0" in api.unsupported_reason(qc, kc, vc, Visibility(8, 8), cfg, scale=0.0)


# ---------------------------------------------------------------------------------------
# GPU suite (real shapes, poisoned outputs)
# ---------------------------------------------------------------------------------------

# METHOD.md: float32 far under 1e-3 (the kernels use 3-pass tf32 for float32 dots);
# bf16/fp16 operands between 1e-3 and 1e-2.
GPU_TOL = {torch.float32: 1e-3, torch.float16: 1e-2, torch.bfloat16: 2e-2}


def _poison_allocator(nbytes=1 << 30):
    """Fill free cached memory with NaN so that an unwritten output shows up."""
    try:
        x = torch.empty(nbytes // 4, dtype=torch.float32, device="cuda").fill_(float("nan"))
        del x
    except torch.cuda.OutOfMemoryError:
        pass


def _gpu_case(b, hq, hkv, n, d, dtype, causal, fill, pad, selection="group", nk=None, dv=None, density=0.2,
              grads=True, seed=0, block_score="projector"):
    nk = n if nk is None else nk
    q, k, v = make_qkv(b, hq, hkv, n, nk, d, dv=dv, dtype=dtype, device="cuda", seed=seed)
    kv = padding(b, nk, [nk - pad - 37 * i for i in range(b)], device="cuda") if pad else None
    vis = Visibility(n, nk, causal=causal, offset=nk - n if causal else 0, key_valid=kv)
    cfg = SPAConfig(density=density, fill=fill, selection=selection, block_score=block_score)
    scale = 1.0 / math.sqrt(d)
    _poison_allocator()
    out, lse, idx, cnt = api.spa_forward(q, k, v, vis, scale, cfg, None)
    torch.cuda.synchronize()
    tol = GPU_TOL[dtype]
    valid, pooled = reference_stages(q.float(), k.float(), v.float(), vis, scale, cfg)
    ref_sel = R.select_blocks(q.float(), pooled, vis, valid, scale, cfg)
    assert_same_selection(ref_sel, idx, cnt, selection_scores(q.float(), pooled, scale, cfg, None, vis, valid), tol=1e-3)
    qr, kr, vr = (x.detach().float().requires_grad_(grads) for x in (q, k, v))
    pooled_r = R.pool_blocks(kr, vr, valid, cfg.block_size)
    ro, rl = R.sparse_attention(qr, kr, vr, R.Selection(idx, cnt), pooled_r, vis, valid, scale, fill, cfg.block_size)
    assert not torch.isnan(out).any() and not torch.isnan(lse).any(), "unwritten (NaN-poisoned) output"
    assert rel(out, ro.detach()) < tol, rel(out, ro.detach())
    fin = torch.isfinite(rl)
    assert torch.equal(fin, torch.isfinite(lse))
    assert maxabs(lse[fin] - rl[fin].detach()) < 50 * tol
    if grads:
        go = torch.randn_like(out)
        _poison_allocator()
        dq, dk, dv_ = api.spa_backward(go, q, k, v, out, lse, idx, cnt, vis, scale, cfg)
        torch.cuda.synchronize()
        ro.backward(go.float())
        for name, got, want in (("dq", dq, qr.grad), ("dk", dk, kr.grad), ("dv", dv_, vr.grad)):
            assert not torch.isnan(got).any(), f"{name}: unwritten (NaN-poisoned) output"
            assert rel(got, want) < tol, (name, rel(got, want))
        # deterministic: the same gradients bit for bit
        dq2, dk2, dv2 = api.spa_backward(go, q, k, v, out, lse, idx, cnt, vis, scale, cfg, deterministic=True)
        assert torch.equal(dq2, dq) and torch.equal(dk2, dk) and torch.equal(dv2, dv_)


GPU_CASES = [
    # b, hq, hkv, n, d, dtype, causal, fill, pad, selection, nk, dv
    pytest.param(1, 8, 2, 4096 + 37, 128, torch.bfloat16, True, "landmark", 0, "group", None, None, id="bf16-d128-gqa4-causal"),
    pytest.param(2, 8, 1, 3000, 64, torch.float16, True, "landmark", 300, "group", None, None, id="fp16-d64-gqa8-pad"),
    pytest.param(1, 4, 4, 2500, 128, torch.bfloat16, False, "none", 0, "head", None, None, id="bf16-d128-mha-nofill-head"),
    pytest.param(1, 4, 1, 2048, 64, torch.float32, True, "landmark", 0, "group", None, None, id="fp32-d64-causal"),
    pytest.param(1, 4, 2, 1500, 256, torch.bfloat16, True, "landmark", 0, "group", 1700, None, id="bf16-d256-offset"),
    pytest.param(1, 4, 2, 2000, 96, torch.bfloat16, False, "landmark", 100, "group", None, None, id="bf16-d96-pad"),
    pytest.param(1, 4, 4, 1800, 32, torch.float16, True, "landmark", 0, "head", None, None, id="fp16-d32-head"),
]


@gpu
@needs_cuda
@pytest.mark.parametrize("b,hq,hkv,n,d,dtype,causal,fill,pad,selection,nk,dv", GPU_CASES)
def test_gpu_real_shapes(b, hq, hkv, n, d, dtype, causal, fill, pad, selection, nk, dv):
    _gpu_case(b, hq, hkv, n, d, dtype, causal, fill, pad, selection, nk, dv)


@gpu
@needs_cuda
@pytest.mark.parametrize("b,hq,hkv,n,d,dtype,pad,selection,block_score", [
    pytest.param(1, 8, 2, 8192 + 37, 128, torch.bfloat16, 0, "group", "hybrid", id="bf16-d128-gqa4-hybrid"),
    pytest.param(2, 4, 4, 3000, 64, torch.float16, 300, "head", "bound", id="fp16-d64-pad-head-bound"),
    pytest.param(1, 4, 1, 2048, 64, torch.float32, 0, "group", "hybrid", id="fp32-d64-gqa4-hybrid"),
    pytest.param(1, 8, 2, 4096 + 37, 128, torch.bfloat16, 100, "head", "fine", id="bf16-d128-gqa4-fine-head"),
])
def test_gpu_bound_scores(b, hq, hkv, n, d, dtype, pad, selection, block_score):
    """block_score "bound" / "hybrid": bound_selection's lists against the reference, and the
    forward and backward on them, causal, at real shapes."""
    _gpu_case(b, hq, hkv, n, d, dtype, True, "landmark", pad, selection, block_score=block_score)


@gpu
@needs_cuda
def test_gpu_kernel_writes_every_output():
    """Launch the forward/backward kernels into NaN-filled buffers: every element is written."""
    b, hq, hkv, n, d = 1, 8, 2, 3000, 128
    q, k, v = make_qkv(b, hq, hkv, n, n, d, dtype=torch.bfloat16, device="cuda", seed=9)
    vis = Visibility(n, n, causal=True)
    cfg = SPAConfig()
    scale = d**-0.5
    out, lse, idx, cnt = api.spa_forward(q, k, v, vis, scale, cfg, None)
    info = block_info(vis, b, n, n, cfg.block_size, q.device)
    _, _, kb, vb = pool_kv(k, v, info)
    o2 = torch.full_like(out, float("nan"))
    l2 = torch.full_like(lse, float("nan"))
    for c in codegen.autotune.attention_candidates(4, 64, d, d, q.dtype, True, fill=True):
        o2.fill_(float("nan"))
        l2.fill_(float("nan"))
        sparse_forward.launch_forward(q, k, v, kb, vb, info, idx, cnt, scale, True, c, o2, l2)
        if c.get("BJ", 64) == 64:  # same fill chunks: the same arithmetic
            assert torch.equal(o2, out) and torch.equal(l2, lse), c
        else:  # other chunk widths change the online-softmax order only
            assert torch.isfinite(o2).all() and rel(o2, out) < 1e-2, c
            assert maxabs(l2 - lse) < 1e-2, c


@gpu
@needs_cuda
@pytest.mark.parametrize("hkv,nk,d", [(2, 3000, 128), (8, 2049, 64), (8, 1500, 256)], ids=["gqa-d128", "mha-d64", "mha-d256"])
def test_gpu_forward_tma_variants(hkv, nk, d):
    """Every forward candidate with TMA (K/V, and kbar/vbar with TMA_FILL, through tensor
    descriptors; Nk not a multiple of 64, key padding) bitwise against the same config with
    pointer loads, on the card; skipped before Hopper."""
    if torch.cuda.get_device_capability()[0] < 9:
        pytest.skip("TMA needs sm_90+")
    b, hq, n = 1, 8, nk
    q, k, v = make_qkv(b, hq, hkv, n, nk, d, dtype=torch.bfloat16, device="cuda", seed=13)
    vis = Visibility(n, nk, causal=True, key_valid=padding(b, nk, [nk - 37], device="cuda"))
    cfg = SPAConfig()
    scale = d**-0.5
    _, _, idx, cnt = api.spa_forward(q, k, v, vis, scale, cfg, None)
    info = block_info(vis, b, n, nk, cfg.block_size, q.device)
    _, _, kb, vb = pool_kv(k, v, info)
    assert sparse_forward.tma_ok(k, v, 64) and sparse_forward.tma_ok(kb, vb, 64)
    g = hq // hkv
    cands = codegen.autotune.attention_candidates(g, 64, d, d, q.dtype, g > 1, fill=True, tma=True)
    tma_cands = [c for c in cands if c.get("TMA")]
    assert tma_cands
    # a few (compiles cost time in the GPU run): the first (TMA + TMA_FILL), an exact-only one
    # and the deeper pipeline, at D=128; the first elsewhere
    pick = [tma_cands[0]]
    if d == 128:
        pick += [c for c in tma_cands if not c.get("TMA_FILL")][:1] + [c for c in tma_cands if c["num_stages"] == 4]
    for c in pick:
        plain = {key: val for key, val in c.items() if key not in ("TMA", "TMA_FILL")}
        o1 = torch.full(q.shape, float("nan"), device="cuda", dtype=q.dtype)
        l1 = torch.full(q.shape[:3], float("nan"), device="cuda")
        o2, l2 = o1.clone(), l1.clone()
        sparse_forward.launch_forward(q, k, v, kb, vb, info, idx, cnt, scale, True, plain, o1, l1)
        sparse_forward.launch_forward(q, k, v, kb, vb, info, idx, cnt, scale, True, c, o2, l2)
        assert torch.isfinite(o2).all(), c
        assert torch.equal(o1, o2) and torch.equal(l1, l2), c


@gpu
@needs_cuda
@pytest.mark.parametrize("cfgk", [dict(topk=32), dict(density=0.2), dict(density=0.45)],
                         ids=["topk32", "density0.2", "density0.45"])
def test_gpu_streaming_selection_equals_dense(cfgk):
    """The streaming kernel (running top-k, merged by tl.topk + tl.bitonic_merge) against the dense
    kernel's k-th search and the wide kernel's at 20K tokens (313 key blocks: dense when forced),
    on the card, GQA 4, bf16 queries: the same lists from the same fp32 scores; the dense kernel's
    default tensor-core scores (tf32x3) give them up to near-ties. Density 0.45 (KMAX 146: "auto"
    takes the wide path): the streaming kernel's buffer is 256 wide and it scores by broadcast
    products (another fp32 summation order than the wide kernel's FMA chain), so wide and
    streaming agree up to near-ties there, dense and streaming (the same arithmetic) exactly."""
    from types import SimpleNamespace

    from spa_compile.codegen import selection
    from spa_compile.codegen.pooling import pool_q

    b, hq, hkv, n, d = 1, 32, 8, 20000, 128
    q, k, v = make_qkv(b, hq, hkv, n, n, d, dtype=torch.bfloat16, device="cuda", seed=23)
    vis = Visibility(n, n, causal=True)
    cfg = SPAConfig(**cfgk)
    info = block_info(vis, b, n, n, cfg.block_size, q.device)
    kbar = pool_kv(k, v, info)[0]
    kmax = int(max_selected(n, n, vis, cfg))
    qbar = pool_q(q, cfg.block_size)
    long_lists = kmax >= selection.AUTO_WIDE_MIN_KMAX
    assert selection.select_path(info.nkb, "auto", kmax) == ("wide" if long_lists else "stream")
    got = {p: selection.select(qbar, kbar, info, d**-0.5, cfg, kmax, group=hq // hkv, path=p, precision="ieee")
           for p in ("stream", "dense", "wide")}
    # the streaming walk with the key operand untransposed
    got["stream-kt0"] = selection.select(qbar, kbar, info, d**-0.5, cfg, kmax, group=hq // hkv, path="stream",
                                         precision="ieee", keys_t=False)
    exact = ("dense", "stream-kt0") if long_lists else ("dense", "wide", "stream-kt0")
    for p in exact:  # wide with the dot's shapes: fp32 FMA outer products, the fp32 dot's order
        assert torch.equal(got["stream"][1], got[p][1]), p
        assert torch.equal(got["stream"][0], got[p][0]), p
    tc = selection.select(qbar, kbar, info, d**-0.5, cfg, kmax, group=hq // hkv, path="dense", precision="tf32x3")
    qs = qbar.double().unflatten(1, (hkv, hq // hkv)).sum(2)
    scores = d**-0.5 * torch.einsum("bhir,bhjr->bhij", qs, kbar.double())
    ref = SimpleNamespace(index=got["stream"][0], count=got["stream"][1])
    assert_same_selection(ref, *tc, scores)
    assert_same_selection(ref, *got["wide"], scores)
    # the auto path as the op calls it (group summed in the kernel, its default precision)
    assert_same_selection(ref, *selection.select(qbar, kbar, info, d**-0.5, cfg, kmax, group=hq // hkv), scores)


@gpu
@needs_cuda
@pytest.mark.parametrize("hkv", [8, 32])
def test_gpu_selection_radix_and_heads_first(hkv):
    """On the card, at the benchmark's shape class (Hq=32, D=128, bf16, causal, block 64, 8K + 37):
    the dense selection's k-th search at 1, 2 and 3 bits a step gives the same lists, and the
    forward and dq with heads-first order (HF) equal query-blocks-first bit for bit, outputs
    NaN-poisoned first."""
    from spa_compile.codegen import selection
    from spa_compile.codegen.pooling import pool_q

    b, hq, n, d = 1, 32, 8192 + 37, 128
    q, k, v = make_qkv(b, hq, hkv, n, n, d, dtype=torch.bfloat16, device="cuda", seed=17)
    vis = Visibility(n, n, causal=True)
    cfg = SPAConfig()
    scale = d**-0.5
    info = block_info(vis, b, n, n, cfg.block_size, q.device)
    kbar, vbar, kb, vb = pool_kv(k, v, info)
    kmax = int(max_selected(n, n, vis, cfg))
    qbar = pool_q(q, cfg.block_size)
    lists = [selection.select(qbar, kbar, info, scale, cfg, kmax, group=hq // hkv, path="dense", radix_bits=rb)
             for rb in (1, 2, 3)]
    for rb, (idx, cnt) in zip((2, 3), lists[1:]):
        assert torch.equal(idx, lists[0][0]) and torch.equal(cnt, lists[0][1]), rb
    if hkv == hq:
        return  # no group: no HF candidates
    out, lse, idx, cnt = api.spa_forward(q, k, v, vis, scale, cfg, None)
    do = torch.randn_like(out)
    delta = sparse_backward.launch_delta(out, do)
    # two head packs per group of 4; one head a pack through tensor descriptors (the long-sequence
    # HF candidates: the forward reads K/V and kbar/vbar by TMA, dq ignores those keys)
    for base in ({"GP": 2, "num_warps": 8, "num_stages": 3, "BJ": 64},
                 {"GP": 1, "num_warps": 4, "num_stages": 3, "BJ": 64, "TMA": True, "TMA_FILL": True}):
        assert_heads_first_equal(q, k, v, kb, vb, info, idx, cnt, scale, lse, do, delta, base)


@needs_cpu_kernels
@pytest.mark.parametrize("nbp", [2, 4, 8])
def test_pooling_blocks_per_program(nbp):
    """Pooling NBP blocks a program (the unrolled variant) writes exactly what one block a
    program writes, for block counts that are not multiples of NBP, key padding with holes,
    and fp32 (no low-precision copies); every output written (NaN-free where one block is)."""
    from spa_compile.codegen import pooling

    for b, h, n, d, dtype in ((2, 3, 16 * 7 + 5, 16, torch.bfloat16), (1, 2, 16 * 3, 32, torch.float32)):
        q, k, v = make_qkv(b, h, h, n, n, d, dtype=dtype, seed=n + nbp)
        kv = padding(b, n, [n - 9 * (i + 1) for i in range(b)])
        kv[:, 16:32] = False  # a whole empty block
        vis = Visibility(n, n, causal=True, key_valid=kv)
        info = block_info(vis, b, n, n, 16, q.device)
        one = pooling.pool_kv(k, v, info, blocks_per_program=1)
        many = pooling.pool_kv(k, v, info, blocks_per_program=nbp)
        for x, y in zip(one, many):
            assert torch.equal(x, y)
        assert torch.equal(pooling.pool_q(q, 16, blocks_per_program=1), pooling.pool_q(q, 16, blocks_per_program=nbp))
    with pytest.raises(ValueError, match="SPA_POOL_BLOCKS must be 1, 2, 4 or 8"):
        pooling.pool_blocks_per_program(3)


@gpu
@needs_cuda
def test_gpu_pooling_blocks_per_program():
    """On the card: pooling 2/4/8 blocks a program as one tile gives the one-block means (fp32
    sums over the same rows; a different reduction tree may change the last bits), and pool_qkv
    the separate launches' values bitwise at the same blocks a program."""
    from spa_compile.codegen import pooling

    b, h, n, d = 2, 8, 8192 + 37, 128
    q, k, v = make_qkv(b, h, h, n, n, d, dtype=torch.bfloat16, device="cuda", seed=23)
    vis = Visibility(n, n, causal=True, key_valid=padding(b, n, [n - 100, n - 7], device="cuda"))
    info = block_info(vis, b, n, n, 64, q.device)
    one = pooling.pool_kv(k, v, info, blocks_per_program=1)
    q1 = pooling.pool_q(q, 64, blocks_per_program=1)
    for nbp in (2, 4, 8):
        for x, y in zip(one, pooling.pool_kv(k, v, info, blocks_per_program=nbp)):
            tol = 1e-6 if x.dtype == torch.float32 else 8e-3  # the bf16 copies: one rounding step
            torch.testing.assert_close(y.float(), x.float(), rtol=tol, atol=tol)
        torch.testing.assert_close(pooling.pool_q(q, 64, blocks_per_program=nbp), q1, rtol=1e-6, atol=1e-6)
        # the one-launch query, key and value means (the op's default): bitwise the two launches'
        fused = pooling.pool_qkv(q, k, v, info, blocks_per_program=nbp)
        assert torch.equal(fused[0], pooling.pool_q(q, 64, blocks_per_program=nbp))
        for x, y in zip(fused[1:], pooling.pool_kv(k, v, info, blocks_per_program=nbp)):
            assert torch.equal(x, y)


@needs_cpu_kernels
@pytest.mark.parametrize("nq,nk,kw", [(150, 150, dict(causal=True)), (64, 150, dict()),
                                      (80, 150, dict(causal=True, offset=70)), (150, 150, dict(causal=True, window=40)),
                                      (64, 150, dict(causal=True)), (100, 150, dict(offset=60, window=50))])
def test_unweighted_key_means(nq, nk, kw):
    """blockinfo.all_keys_valid (geometry alone) holds exactly when every key is valid without
    padding; then pool_kv skips VALID (WEIGHTED False) and gives the weighted means of an all-True
    key_valid, which take the weighted path."""
    from spa_compile.codegen import pooling
    from spa_compile.codegen.blockinfo import all_keys_valid

    q, k, v = make_qkv(1, 2, 2, nq, nk, 16, seed=nq + nk)
    info = block_info(Visibility(nq, nk, **kw), 1, nq, nk, 16, q.device)
    assert all_keys_valid(info) == bool(info.valid.all())
    if not all_keys_valid(info):
        return
    weighted = block_info(Visibility(nq, nk, key_valid=torch.ones(1, nk, dtype=torch.bool), **kw), 1, nq, nk, 16,
                          q.device)
    assert not all_keys_valid(weighted)
    for nbp in (1, 4):
        for x, y in zip(pooling.pool_kv(k, v, info, blocks_per_program=nbp),
                        pooling.pool_kv(k, v, weighted, blocks_per_program=nbp)):
            torch.testing.assert_close(x, y, rtol=1e-6, atol=1e-6)
    assert pooling.pool_blocks_per_program(weighted=False) == pooling.POOL_BLOCKS_UNWEIGHTED


@needs_cpu_kernels
@pytest.mark.parametrize("pad,values,nq,nk", [(False, True, 150, 150), (True, True, 150, 150),
                                               (False, False, 70, 150), (True, False, 150, 90)])
def test_pool_qkv_one_launch(pad, values, nq, nk):
    """pool_qkv (query, key and value means in one launch) gives bitwise pool_q's and pool_kv's
    values at the same blocks a program; the op forward with it (the default) gives the same
    output and lists as with the two launches (SPA_POOL_FUSED=0)."""
    from spa_compile.codegen import pooling

    b, hq, hkv, d = 2, 4, 2, 16
    q, k, v = make_qkv(b, hq, hkv, nq, nk, d, dtype=torch.bfloat16, seed=nq + nk + pad)
    kv = padding(b, nk, [nk - 5, nk - 40]) if pad else None
    vis = Visibility(nq, nk, causal=nq <= nk, key_valid=kv)
    info = block_info(vis, b, nq, nk, 16, q.device)
    for nbp in (1, 4):
        got = pooling.pool_qkv(q, k, v, info, blocks_per_program=nbp, values=values)
        assert torch.equal(got[0], pooling.pool_q(q, 16, blocks_per_program=nbp))
        want = pooling.pool_kv(k, v, info, blocks_per_program=nbp, values=values)
        for x, y in zip(got[1:] if values else got[1:4:2], want if values else want[0:3:2]):
            assert torch.equal(x, y)
    cfg = SPAConfig(block_size=16, topk=3)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(pooling.FUSED_ENV, "0")
        two = api.spa_forward(q, k, v, vis, d ** -0.5, cfg, None)
        mp.setenv(pooling.FUSED_ENV, "1")
        one = api.spa_forward(q, k, v, vis, d ** -0.5, cfg, None)
    for x, y in zip(one, two):
        if pad:  # pool_q alone takes 8 blocks a program, the fused launch the keys' 4: last bits
            torch.testing.assert_close(x.float(), y.float(), rtol=2e-2, atol=2e-2)
        else:
            assert torch.equal(x, y)


def test_pool_fused_choice(monkeypatch):
    from spa_compile.codegen import pooling

    monkeypatch.delenv(pooling.FUSED_ENV, raising=False)
    assert pooling.pool_fused() is pooling.POOL_FUSED
    monkeypatch.setenv(pooling.FUSED_ENV, "1")
    assert pooling.pool_fused() is True
    monkeypatch.setenv(pooling.FUSED_ENV, "yes")
    with pytest.raises(ValueError, match="SPA_POOL_FUSED must be 0 or 1"):
        pooling.pool_fused()


def test_uniform_counts_from_geometry():
    """The fill takes a constant landmark count only when every key block is full of valid keys."""
    def info(nq, nk, **kw):
        return block_info(Visibility(nq=nq, nk=nk, **kw), 1, nq, nk, 16, "cpu")

    assert sparse_forward.uniform_counts(info(128, 128, causal=True))
    assert sparse_forward.uniform_counts(info(64, 128))
    assert sparse_forward.uniform_counts(info(64, 128, causal=True, offset=64))
    assert not sparse_forward.uniform_counts(info(75, 75, causal=True))  # a partial last block
    assert not sparse_forward.uniform_counts(info(64, 128, causal=True, offset=0))  # keys 64.. never seen
    assert not sparse_forward.uniform_counts(info(128, 128, causal=True, window=40))
    assert not sparse_forward.uniform_counts(info(128, 128, key_valid=padding(1, 128, [100])))


@needs_cpu_kernels
@pytest.mark.parametrize("n", [128, 150])
def test_fill_bias_forms_agree(n):
    """fill_bias (scalar selection words, constant count when uniform) and the per-column loads of
    fill_bias_loads give the same forward."""
    q, k, v = make_qkv(1, 4, 2, n, n, 16, seed=n)
    vis = Visibility(n, n, causal=True)
    cfg = SPAConfig(block_size=16, topk=2)
    info = block_info(vis, 1, n, n, 16, q.device)
    assert sparse_forward.uniform_counts(info) == (n % 16 == 0)
    kmax = int(max_selected(n, n, vis, cfg))
    kbar, _, kb, vb = pool_kv(k, v, info)
    idx, cnt = api.selection_stage(q, kbar, info, 0.25, cfg, None, kmax, k)
    sel = codegen.bitmap.build_bitmap(idx, cnt, info.nkb)
    outs = [sparse_forward.launch_forward(q, k, v, kb, vb, info, idx, cnt, 0.25, True,
                                          {"GP": 2, "num_warps": 4, "num_stages": 2, "BJ": bj, "BIAS_MODE": mode},
                                          sel=sel) for mode, bj in ((0, 32), (1, 32), (0, 64))]
    for o, lse in outs[1:]:
        assert torch.allclose(o, outs[0][0], atol=1e-6) and torch.allclose(lse, outs[0][1], atol=1e-5)


def test_bound_selection_needs_the_keys():
    """The bound's key ranges come from k: selection_stage says so instead of failing inside."""
    q, k, v = make_qkv(1, 2, 1, 64, 64, 16)
    vis = Visibility(64, 64, causal=True)
    info = block_info(vis, 1, 64, 64, 16, q.device)
    cfg = SPAConfig(block_size=16, block_score="hybrid")
    kbar = R.pool_blocks(k, v, R.valid_keys(vis, 1, 1, 16, q.device), 16).kbar
    with pytest.raises(ValueError, match="needs the keys k"):
        api.selection_stage(q, kbar, info, 0.25, cfg, None, int(max_selected(64, 64, vis, cfg)))
