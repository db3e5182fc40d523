"""The selection kernels (spa_compile/codegen/selection.py, wide_selection.py) against
reference.select_blocks.

"dense" (all key blocks of a program in registers, k-th largest score by a binary search on
its bits), "wide" (the same for long rows: one int32 key tile in two column halves, an early-stopping
search) and "stream" (chunks, running top-k buffer) must give the reference's index lists
(exactly, up to blocks whose scores tie within rounding) and, on the same fp32 scores, the
same lists as each other. Small shapes in Triton's interpreter on CPU; block 16 gives
enough key blocks for several chunks, the 16-row dot path and the group-sum in the kernel.
"""

from __future__ import annotations

import math
import os
import zlib

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from spa_compile import SPAConfig, Visibility  # noqa: E402
from spa_compile import reference as R  # noqa: E402
from spa_compile.budget import max_selected  # noqa: E402
from spa_compile.projector import Projector  # noqa: E402

codegen = pytest.importorskip("spa_compile.codegen")
from spa_compile.codegen import selection  # noqa: E402
from spa_compile.codegen.blockinfo import block_info  # noqa: E402
from spa_compile.codegen.pooling import pool_kv, pool_q  # noqa: E402
from spa_compile.codegen import wide_selection  # noqa: E402
from spa_compile.codegen.wide_selection import WIDE_MAX_NKB  # noqa: E402
from test_kernels import CPU_OK, assert_same_selection, block_scores, make_qkv, padding, reference_stages  # noqa: E402

pytestmark = pytest.mark.skipif(
    not CPU_OK, reason="Triton interpreter not active (CUDA present, or triton imported before TRITON_INTERPRET=1)")


def _holes(b, nk, seed):
    """Key padding with holes: whole blocks and single keys invalid, not only a suffix."""
    gen = torch.Generator().manual_seed(seed)
    valid = torch.rand(b, nk, generator=gen) > 0.15
    valid[:, 32:48] = False  # a whole block at block 16
    valid[:, 0] = True
    return valid


def _run_paths(b, hq, hkv, nq, nk, d, bs, visk, cfgk, projector=None, seed=0, ties=False, gs_paths=("dense",)):
    q, k, v = make_qkv(b, hq, hkv, nq, nk, d, seed=seed)
    if ties:  # integer-valued, repeated key rows: many exactly equal scores (ties -> lower j)
        q = q.round()
        k = k.round().clamp(-1, 1)
        k[:, :, nk // 2:] = k[:, :, : nk - nk // 2].clone()
    kw = dict(visk)
    if isinstance(kw.get("key_valid"), str):
        kind = kw["key_valid"]
        lengths = [nk - 13 * (i + 1) for i in range(b)]
        kw["key_valid"] = _holes(b, nk, seed) if kind == "holes" else padding(b, nk, lengths, left=kind == "left")
    vis = Visibility(nq, nk, **kw)
    cfg = SPAConfig(block_size=bs, **cfgk)
    scale = 1.0 / math.sqrt(d)
    info = block_info(vis, b, nq, nk, bs, q.device)
    kbar = pool_kv(k, v, info)[0]
    kmax = int(max_selected(nq, nk, vis, cfg))
    qbar = pool_q(q, bs)
    proj = projector or Projector.identity(hkv, d)
    qp, kp = proj.project_queries(qbar), proj.project_keys(kbar)
    if cfg.selection == "group":  # summed by torch here; "-gs" below sums in the kernel
        qp = qp.unflatten(1, (hkv, hq // hkv)).sum(dim=2)
    # fp32 scores on both paths (exactly comparable), then the dense path's tensor-core default
    got = {p: selection.select(qp, kp, info, scale, cfg, kmax, path=p, precision="ieee")
           for p in ("dense", "stream", "wide")}
    # tensor-core scores (three tf32 products; exact fp32 under the interpreter): the reference's
    # lists up to near-ties, checked below like every path
    got["dense-tf32x3"] = selection.select(qp, kp, info, scale, cfg, kmax, path="dense", precision="tf32x3")
    # the score dot reading the transposed key means (KT): the same products, the same lists
    got["dense-kt"] = selection.select(qp, kp, info, scale, cfg, kmax, path="dense", precision="ieee", keys_t=True)
    if "stream" in gs_paths:  # the streaming kernel is slow in the interpreter: the dot case only
        got["stream-kt0"] = selection.select(qp, kp, info, scale, cfg, kmax, path="stream", precision="ieee",
                                             keys_t=False)
    # the dense kernel's row-major tiles, and 32 query blocks a program with the search run all 32
    # steps (ties always by prefix count): the same lists
    got["dense-rowmajor"] = selection.select(qp, kp, info, scale, cfg, kmax, path="dense", precision="ieee",
                                             dense_config={"KM": False})
    got["dense-full-search"] = selection.select(qp, kp, info, scale, cfg, kmax, path="dense", precision="ieee",
                                                dense_config={"EARLY": False, "QB": 32})
    for rb in (2, 3):  # the dense kernel's k-th search, RB bits a step: the same threshold
        got[f"dense-rb{rb}"] = selection.select(qp, kp, info, scale, cfg, kmax, path="dense", radix_bits=rb,
                                                precision="ieee")
    if cfg.selection == "group" and hq > hkv:  # the group sum in the kernel
        qh = proj.project_queries(qbar)
        for p in gs_paths:  # the streaming kernel is slow in the interpreter (sorts): one case
            got[p + "-gs"] = selection.select(qh, kp, info, scale, cfg, kmax, group=hq // hkv, path=p, precision="ieee")
    valid, pooled = reference_stages(q.double(), k.double(), v.double(), vis, scale, cfg)
    ref = R.select_blocks(q.double(), pooled, vis, valid, scale, cfg, projector)
    scores = block_scores(q, pooled, scale, cfg, projector)
    for name, (idx, cnt) in got.items():
        try:
            assert_same_selection(ref, idx, cnt, scores)
        except AssertionError as e:
            raise AssertionError(f"path {name}: {e}") from e
    # the same fp32 scores in both kernels: the same lists (ties included)
    for name in ("stream", "wide", "dense-rb2", "dense-rb3", "dense-kt", "dense-rowmajor", "dense-full-search") + (
            ("stream-kt0",) if "stream-kt0" in got else ()):
        assert torch.equal(got["dense"][0], got[name][0]) and torch.equal(got["dense"][1], got[name][1]), name
    return got, ref


CASES = [
    # b, hq, hkv, nq, nk, d, bs, vis kwargs, cfg kwargs
    pytest.param(1, 4, 1, 270, 270, 16, 16, dict(causal=True), dict(), id="causal-gqa4-odd-dot"),
    pytest.param(1, 2, 2, 150, 150, 16, 16, dict(), dict(selection="head"), id="none-mha-head"),
    pytest.param(2, 4, 1, 180, 180, 16, 16, dict(causal=True, key_valid="holes"), dict(density=0.3), id="causal-holes"),
    pytest.param(2, 2, 1, 140, 140, 16, 16, dict(key_valid="left"), dict(selection="head", sink_blocks=0, topk=3),
                 id="leftpad-head-topk"),
    pytest.param(1, 4, 2, 180, 320, 16, 16, dict(causal=True, offset=140, window=120),
                 dict(local_blocks=1, sink_blocks=2), id="offset-window"),
    pytest.param(1, 2, 1, 80, 300, 32, 16, dict(window=66, offset=200), dict(min_blocks=2, max_blocks=3),
                 id="window-minmax"),
    pytest.param(1, 2, 2, 200, 200, 16, 16, dict(causal=True, key_valid="right"),
                 dict(topk=5, local_blocks=0, sink_blocks=0), id="causal-pad-topk-nolocal"),
    pytest.param(1, 1, 1, 16, 600, 16, 16, dict(causal=True, offset=584), dict(density=0.5, min_blocks=4),
                 id="one-qblock-wide"),
    pytest.param(1, 4, 1, 260, 260, 8, 16, dict(causal=True), dict(topk=2, local_blocks=3), id="causal-ties"),
    # k = 0 with blocks left over: the k-th search must end at the top, taking nothing
    pytest.param(1, 2, 1, 150, 150, 16, 16, dict(causal=True), dict(topk=0), id="causal-topk0"),
]


@pytest.mark.parametrize("b,hq,hkv,nq,nk,d,bs,visk,cfgk", CASES)
def test_paths_match_reference(b, hq, hkv, nq, nk, d, bs, visk, cfgk, request):
    name = request.node.callspec.id
    _run_paths(b, hq, hkv, nq, nk, d, bs, visk, cfgk, seed=zlib.crc32(name.encode()) % 1000, ties="ties" in name,
               gs_paths=("dense", "stream") if name == "causal-gqa4-odd-dot" else ("dense",))


def test_paths_with_projector():
    """A learned low-rank projector (r < D), group selection with GQA 4."""
    hkv, d, r = 2, 16, 6
    gen = torch.Generator().manual_seed(3)
    proj = Projector(torch.randn(hkv, d, r, generator=gen), torch.randn(hkv, d, r, generator=gen))
    _run_paths(1, 8, hkv, 200, 200, d, 16, dict(causal=True), dict(density=0.25), projector=proj, seed=3)


def test_path_choice(monkeypatch):
    monkeypatch.delenv(selection.PATH_ENV, raising=False)
    assert selection.DEFAULT_PATH == "auto" and selection.select_path(256) == "dense"
    assert selection.select_path(selection.DENSE_MAX_NKB + 1) == "stream"
    assert selection.select_path(256, "auto") == "dense"
    assert selection.select_path(selection.DENSE_MAX_NKB + 1, "auto") == "stream"
    monkeypatch.setenv(selection.PATH_ENV, "auto")
    assert selection.select_path(256) == "dense"
    assert selection.select_path(4, "stream") == "stream"
    monkeypatch.setenv(selection.PATH_ENV, "dense")
    assert selection.select_path(selection.DENSE_FORCE_MAX_NKB) == "dense"
    assert selection.select_path(10_000) == "stream"  # beyond the dense kernel's tiles
    assert selection.select_path(10_000, "stream") == "stream"  # the argument wins
    monkeypatch.setenv(selection.PATH_ENV, "wide")
    assert selection.select_path(selection.DENSE_MAX_NKB + 1) == "wide" and selection.select_path(16) == "wide"
    assert selection.select_path(WIDE_MAX_NKB + 1) == "stream"  # beyond the wide tile
    monkeypatch.delenv(selection.PATH_ENV)
    # long lists (the streaming buffer over 128 wide): wide by default; short ones stream
    big = selection.AUTO_WIDE_MIN_KMAX
    assert selection.select_path(selection.DENSE_MAX_NKB + 1, kmax=big) == "wide"
    assert selection.select_path(WIDE_MAX_NKB, kmax=big) == "wide"
    assert selection.select_path(WIDE_MAX_NKB + 1, kmax=big) == "stream"  # beyond the wide tile
    assert selection.select_path(selection.DENSE_MAX_NKB + 1, kmax=big - 1) == "stream"
    assert selection.select_path(selection.DENSE_MAX_NKB, kmax=big) == "dense"
    assert selection.select_path(selection.DENSE_MAX_NKB + 1, "stream", kmax=big) == "stream"
    monkeypatch.setenv(selection.WIDE_ENV, "0")
    assert selection.select_path(selection.DENSE_MAX_NKB + 1, kmax=big) == "stream"
    monkeypatch.delenv(selection.WIDE_ENV)
    monkeypatch.setattr(selection, "AUTO_WIDE", True)
    assert selection.select_path(selection.DENSE_MAX_NKB) == "dense"
    assert selection.select_path(selection.DENSE_MAX_NKB + 1) == "wide"
    assert selection.select_path(WIDE_MAX_NKB) == "wide" and selection.select_path(WIDE_MAX_NKB + 1) == "stream"
    monkeypatch.setenv(selection.WIDE_ENV, "0")
    assert selection.select_path(selection.DENSE_MAX_NKB + 1) == "stream"
    monkeypatch.setenv(selection.WIDE_ENV, "2")
    with pytest.raises(ValueError, match="SPA_SELECT_WIDE"):
        selection.select_path(selection.DENSE_MAX_NKB + 1)
    monkeypatch.delenv(selection.WIDE_ENV)
    monkeypatch.setenv(selection.PATH_ENV, "bogus")
    with pytest.raises(ValueError):
        selection.select_path(8)


def test_dense_config_fits():
    """Dense tiles stay within the register budget the launcher assumes; dot rows are 16."""
    for nqb, nkb, kmax in [(256, 256, 56), (256, 256, 36), (512, 512, 110), (256, 256, 200), (1, 300, 30), (3, 40, 9)]:
        qb, nkbp, rc, dot, warps = selection._dense_config(nqb, nkb, 128, kmax)
        assert nkbp >= nkb and nkbp >= kmax
        assert (qb == 16 and rc == 16) if dot else qb * nkbp * rc <= 16384


def test_dense_warps_rule():
    """Key-major 16 x 256 launches take 4 warps (two programs an SM) only when they have more
    programs than the card has SMs; otherwise, and row-major, the register rule of _dense_warps."""
    w = selection._dense_warps
    assert w(16, 256, km=True, programs=256, sms=132) == 4
    assert w(16, 256, km=True, programs=128, sms=132) == 8  # one wave either way: a program's latency counts
    assert w(16, 256, km=False, programs=256, sms=132) == 8
    assert w(16, 256, km=True, programs=256, sms=0) == 8  # the interpreter: no card
    assert w(16, 512, km=True, programs=999, sms=132) == 16
    assert w(16, 32, km=True, programs=10, sms=132) == 4


def test_dense_config_errors():
    """select(dense_config=) names an unknown key, and a QB the score dot cannot take."""
    vis = Visibility(256, 256, causal=True)
    info = block_info(vis, 1, 256, 256, 16, "cpu")
    cfg = SPAConfig(block_size=16, topk=2)
    kmax = int(max_selected(256, 256, vis, cfg))
    qp, kp = torch.randn(1, 1, info.nqb, 16), torch.randn(1, 1, info.nkb, 16)
    with pytest.raises(ValueError, match=r"unknown keys \['BJ'\]"):
        selection.select(qp, kp, info, 0.2, cfg, kmax, path="dense", dense_config={"BJ": 64})
    with pytest.raises(ValueError, match="QB=8.*16 query blocks"):
        selection.select(qp, kp, info, 0.2, cfg, kmax, path="dense", dense_config={"QB": 8})


def test_score_precision_choice(monkeypatch):
    monkeypatch.delenv(selection.PRECISION_ENV, raising=False)
    assert selection.score_precision() == selection.SCORE_PRECISION["dense"] == "tf32x3"  # measured defaults
    assert selection.score_precision(path="stream") == selection.SCORE_PRECISION["stream"] == "ieee"
    assert selection.score_precision("tf32x3", "stream") == "tf32x3"
    monkeypatch.setenv(selection.PRECISION_ENV, "tf32x3")
    assert selection.score_precision(path="stream") == "tf32x3" and selection.score_precision("ieee") == "ieee"
    monkeypatch.setenv(selection.PRECISION_ENV, "tf32")  # plain tf32 would reorder near blocks
    with pytest.raises(ValueError, match="must be 'ieee' or 'tf32x3'"):
        selection.score_precision()


def test_keys_transposed_choice(monkeypatch):
    monkeypatch.delenv(selection.KT_ENV, raising=False)
    assert selection.keys_transposed("stream") is selection.KEYS_TRANSPOSED["stream"]
    assert selection.keys_transposed("dense", True) is True and selection.keys_transposed("stream", False) is False
    monkeypatch.setenv(selection.KT_ENV, "0")
    assert selection.keys_transposed("stream") is False
    monkeypatch.setenv(selection.KT_ENV, "1")
    assert selection.keys_transposed("dense") is True
    monkeypatch.setenv(selection.KT_ENV, "yes")
    with pytest.raises(ValueError, match="SPA_SELECT_KT"):
        selection.keys_transposed("dense")


def test_dense_radix_bits_choice(monkeypatch):
    monkeypatch.delenv(selection.RADIX_ENV, raising=False)
    assert selection.dense_radix_bits(256) == selection.DENSE_RADIX_BITS == 1  # the measured default
    assert selection.dense_radix_bits(256, 3) == 3 and selection.dense_radix_bits(512, 3) == 2  # 9-bit fields <= 256
    monkeypatch.setenv(selection.RADIX_ENV, "3")
    assert selection.dense_radix_bits(128) == 3
    monkeypatch.setenv(selection.RADIX_ENV, "4")
    with pytest.raises(ValueError, match="SPA_SELECT_RADIX must be 1, 2 or 3"):
        selection.dense_radix_bits(128)


@pytest.mark.parametrize("visk,cfgk", [
    (dict(causal=True), dict(topk=5, sink_blocks=1, local_blocks=2)),
    (dict(causal=True, offset=7), dict(density=0.3, sink_blocks=0, local_blocks=0)),
    (dict(causal=False), dict(topk=4, sink_blocks=2, local_blocks=1)),
])
def test_stream_interior_chunks_and_geometry_visibility(visk, cfgk):
    """The streaming kernel's interior-chunk path (no classification where every block is fully
    visible, not sink, not local) and its geometry-only visibility (no key padding) give the lists
    of the full per-chunk classification with prefix counts. Chunks of 16 blocks at 75 key
    blocks: interior chunks (from block 16 on, or 0 without sinks) in the later programs, and
    the diagonal's chunks through the full path."""
    nq = nk = 1200 if "offset" not in visk else 1193
    vis = Visibility(nq, nk, **visk)
    info = block_info(vis, 1, nq, nk, 16, "cpu")
    cfg = SPAConfig(block_size=16, **cfgk)
    kmax = int(max_selected(nq, nk, vis, cfg))
    gen = torch.Generator().manual_seed(len(str(visk)))
    qp = torch.randn(1, 2, info.nqb, 16, generator=gen)
    kp = torch.randn(1, 1, info.nkb, 16, generator=gen)
    full = selection.select(qp, kp, info, 0.2, cfg, kmax, group=2, path="stream",
                            stream_config={"BJ": 16, "FAST": False, "HAS_KV": True})
    fast = selection.select(qp, kp, info, 0.2, cfg, kmax, group=2, path="stream", stream_config={"BJ": 16})
    assert torch.equal(fast[1], full[1])
    assert torch.equal(fast[0], full[0])
    assert (full[1] > 0).all()


@pytest.mark.parametrize("offset,kw", [(0, dict(topk=3)), (37, dict(density=0.3, sink_blocks=0))])
def test_dense_causal_tiers(offset, kw, monkeypatch):
    """The dense path's causal launches in column tiers (selection.dense_tiers: the early programs
    with a half and a quarter of the columns) give the single full-width launch's lists; a narrow
    tier with fewer than MIN_TIER_PROGRAMS programs (batch x heads counted) joins the wider one."""
    nq, nk = 1000, 1000 + offset
    vis = Visibility(nq, nk, causal=True, offset=offset)
    info = block_info(vis, 1, nq, nk, 16, "cpu")
    cfg = SPAConfig(block_size=16, **kw)
    kmax = int(max_selected(nq, nk, vis, cfg))
    nprog = -(-info.nqb // 16)
    assert selection.dense_tiers(info, 16, 64, kmax, rows=2) == [(0, nprog, 64)]  # 4 programs x 2: too few
    monkeypatch.setattr(selection, "MIN_TIER_PROGRAMS", 1)  # these small shapes: every tier launches
    tiers = selection.dense_tiers(info, 16, 64, kmax, rows=2)
    assert len(tiers) >= 2 and tiers[-1] == (tiers[-1][0], nprog, 64) and tiers[0][0] == 0
    assert all(a[1] == b[0] for a, b in zip(tiers, tiers[1:]))
    gen = torch.Generator().manual_seed(offset)
    qp = torch.randn(1, 2, info.nqb, 16, generator=gen)
    kp = torch.randn(1, 2, info.nkb, 16, generator=gen)
    one = selection.select(qp, kp, info, 0.2, cfg, kmax, path="dense", tiers=1)
    many = selection.select(qp, kp, info, 0.2, cfg, kmax, path="dense")
    assert torch.equal(many[1], one[1])
    assert torch.equal(many[0], one[0])


@pytest.mark.parametrize("path", ["dense", "stream"])
def test_longest_first_order(path, monkeypatch):
    """Longest-first program order (``_program_rows``' LPT: grid (heads, programs), the last query
    blocks first) gives the lists of the ascending order, on both paths, with the dense path's
    causal tiers and key padding; every slot written (index and count poisoned first would be
    garbage otherwise: torch.empty). $SPA_SELECT_LPT chooses the default."""
    monkeypatch.setattr(selection, "MIN_TIER_PROGRAMS", 1)
    b, nq, nk, bs = 2, 1000, 1000, 16
    vis = Visibility(nq, nk, causal=True, key_valid=padding(b, nk, [nk - 40, nk - 300]))
    info = block_info(vis, b, nq, nk, bs, "cpu")
    cfg = SPAConfig(block_size=bs, topk=3)
    kmax = int(max_selected(nq, nk, vis, cfg))
    gen = torch.Generator().manual_seed(3)
    qp = torch.randn(b, 4, info.nqb, 16, generator=gen)
    kp = torch.randn(b, 2, info.nkb, 16, generator=gen)
    kw = dict(path=path, group=2) if path == "dense" else dict(path=path, group=2, stream_config={"BJ": 16})
    asc = selection.select(qp, kp, info, 0.2, cfg, kmax, longest_first=False, **kw)
    lpt = selection.select(qp, kp, info, 0.2, cfg, kmax, longest_first=True, **kw)
    assert torch.equal(lpt[1], asc[1]) and torch.equal(lpt[0], asc[0])
    assert (asc[1] > 0).all()
    monkeypatch.setenv(selection.ORDER_ENV, "0")
    assert selection.program_order_lpt() is False and selection.program_order_lpt(True) is True
    monkeypatch.setenv(selection.ORDER_ENV, "1")
    assert selection.program_order_lpt() is True
    monkeypatch.setenv(selection.ORDER_ENV, "yes")
    with pytest.raises(ValueError, match="SPA_SELECT_LPT"):
        selection.program_order_lpt()


@pytest.mark.parametrize("visk,cfgk,early", [
    (dict(causal=True, offset=37), dict(topk=3), True),
    (dict(causal=True, key_valid="holes"), dict(density=0.3, sink_blocks=2, local_blocks=3), True),
    (dict(window=300, offset=100), dict(topk=4, local_blocks=1), True),
    (dict(causal=True), dict(topk=3, sink_blocks=0, local_blocks=0), False),
])
def test_wide_tiers_and_early_stop(visk, cfgk, early, monkeypatch):
    """The wide kernel (two column halves, its causal tiers launching with MIN_TIER_PROGRAMS 1,
    the search stopped early or run all 32 steps) gives the dense kernel's lists, exactly (fp32
    scores both), with key padding, a window, sinks and locals; group sum in the kernel."""
    monkeypatch.setattr(selection, "MIN_TIER_PROGRAMS", 1)
    b, nq, nk, bs = 2, 1000, 1000 + visk.get("offset", 0), 16
    kw = dict(visk)
    if kw.get("key_valid") == "holes":
        kw["key_valid"] = _holes(b, nk, 5)
    vis = Visibility(nq, nk, **kw)
    info = block_info(vis, b, nq, nk, bs, "cpu")
    cfg = SPAConfig(block_size=bs, **cfgk)
    kmax = int(max_selected(nq, nk, vis, cfg))
    gen = torch.Generator().manual_seed(len(str(visk)))
    qp = torch.randn(b, 4, info.nqb, 16, generator=gen)
    kp = torch.randn(b, 2, info.nkb, 16, generator=gen)
    if not early:
        monkeypatch.setattr(wide_selection, "WIDE_EARLY", False)
    want = selection.select(qp, kp, info, 0.2, cfg, kmax, group=2, path="dense", precision="ieee", tiers=1)
    got = selection.select(qp, kp, info, 0.2, cfg, kmax, group=2, path="wide")
    assert torch.equal(got[1], want[1])
    assert torch.equal(got[0], want[0])
    assert (got[1] > 0).all()
