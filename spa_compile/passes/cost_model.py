"""Cost model: predicted time of dense attention and of every SPA stage, and the crossover N*.

The work of each kernel is a sympy expression (:func:`formulas`) in the shape symbols

    B, Hq, Hkv, Hs, Nq, Nk, D, Dv    batch, heads (query, kv, selection), lengths, head dims
    Bq, Bk                           SPA query / key block sizes
    P                                query heads per program of the sparse kernel (a GQA group's
                                     heads share each K/V load: min(G, 128 / Bq) for group selection)
    k                                selected key blocks per query block (mean over query blocks)
    c                                the causal flag (0 or 1)
    w, W                             a sliding window (flag, keys per row; with c = 1)
    E, r, T, proj, fill              bytes per element, projector rank, the dense kernel's tile,
                                     whether a (non-identity) projector and the landmark fill run
    bnd                              whether the key-range bound runs (block_score "bound"/"hybrid")
    fin, AM                          whether the "fine" score runs (in PyTorch, chunks of query
                                     blocks) and its fine_rows * fine_keys

The dense path is what the site runs when it stays dense: ``dense`` (fused SDPA, flash: causal
tiles skipped), ``dense_masked`` (SDPA with a mask tensor: every tile computed, the mask read) or
``dense_unfused`` (a decomposed matmul -> softmax -> matmul chain: the N x N scores go through
memory). Each of those and each SPA stage (pool, select, exact, fill) has tensor-core FLOPs, vector (CUDA-core)
operations, compulsory HBM bytes, re-read bytes served by L2 (K/V tiles loaded again for each
query tile, gathered blocks), a number of parallel work items (CTAs) and kernel launches. Its time
is a roofline at the card's measured rates, divided by the kernel's measured efficiency:

    t_stage = waves * max(F / F_peak, V / V_peak, M / BW, M2 / BW_L2) / eff_stage + launches * t_launch
    waves   = max(1, SMs / items, 1 + SMs * tail)   (fewer work items than SMs leave SMs idle;
                                                      causal: the longest item's share ``tail``)

and SPA's time is ``host_and_gpu(its host overhead, sum of its stages)``, the p-norm
``(host^2 + gpu^2)^(1/2)``: never less than either (a kernel can't finish before the CPU has
issued it), less than their sum (host work overlaps earlier kernels); dense's is the max of the
two (one launch, ~20 us of host time). The rates, efficiencies and overheads come from a
:class:`~spa_compile.hardware.HardwareProfile`.

``k`` comes from the config (:func:`mean_selected_blocks`: forced blocks plus
``ceil(density * visible)`` or ``topk``, clipped, averaged over the query blocks); N* is solved
numerically from the expressions (:func:`crossover`): the smallest length from which SPA stays
predicted faster (by ``margin``) up to :data:`N_MAX`.

The model covers the forward pass; training multiplies both paths' attention work by about the
same factor (2.5x for the backward), so the crossover moves little.
"""

from __future__ import annotations

import functools
import math
import os
from dataclasses import dataclass, field, replace
from typing import Any, Callable

import sympy
from sympy import Max, Min, Piecewise, ceiling

from ..config import SPAConfig
from ..hardware import HardwareProfile

N_MAX = 1 << 22  # the longest sequence the crossover search considers (4M)
N_MIN = 16

# ---------------------------------------------------------------------------------------
# Symbols
# ---------------------------------------------------------------------------------------

B, Hq, Hkv, Hs, Nq, Nk, D, Dv = sympy.symbols("B Hq Hkv Hs Nq Nk D Dv", positive=True)
Bq, Bk, k, r, T, E, P, W, K = sympy.symbols("Bq Bk k r T E P W K", positive=True)
c, w, proj, fill, bnd, fin, AM = sympy.symbols("c w proj fill bnd fin AM", nonnegative=True)
SHAPE_SYMBOLS = (B, Hq, Hkv, Hs, Nq, Nk, D, Dv, Bq, Bk, k, r, T, E, P, W, c, w, proj, fill, K, bnd, fin, AM)
FINE_LAUNCHES_PER_CHUNK = 40  # the torch ops of one chunk of codegen/fine_selection.py
FINE_CHUNK_BYTES = 256 << 20  # its chunk budget (fine_selection.CHUNK_BYTES)

# Profile symbols: rates, SM count, launch gap, per-stage efficiencies.
F_peak, V_peak, BW, BW_L2, SMS, L_launch = sympy.symbols("F_peak V_peak BW BW_L2 SMs t_launch", positive=True)
STAGES = ("pool", "select", "exact", "fill")
DENSE_KINDS = ("fused", "masked", "unfused")
DENSE_PATHS = ("dense", "dense_masked", "dense_unfused")
EFF = {name: sympy.Symbol(f"eff_{name}", positive=True) for name in DENSE_PATHS + STAGES}
PROFILE_SYMBOLS = (F_peak, V_peak, BW, BW_L2, SMS, L_launch, *EFF.values())


@dataclass(frozen=True)
class Cost:
    """The work of one kernel (or one stage of a fused kernel), as sympy expressions."""

    flops: Any  # tensor-core FLOPs
    vops: Any  # vector (CUDA-core) operations
    bytes: Any  # compulsory HBM traffic
    l2_bytes: Any  # re-reads served by L2
    items: Any  # parallel work items (CTAs)
    launches: Any  # kernel launches
    waves: bool = True  # whether fewer work items than SMs slow the stage down
    # The longest work item's share of the stage's work (causal kernels: the last query tile sees
    # every key), or 0: the stage cannot end before that item, which starts at the latest when the
    # others have shared the SMs -> time * (1 + SMs * tail) (see stage_time).
    tail: Any = 0


def _derived():
    nqb = ceiling(Nq / Bq)
    nkb = ceiling(Nk / Bk)
    # Causal (top-left, Nq <= Nk): query block i sees key blocks 0..i (Bq = Bk): (NQB + 1) / 2 on average.
    # A causal sliding window of W keys: about W / Bk + 1 blocks per query block.
    nvis_causal = Min(nkb, (nqb + 1) * Bq / (2 * Bk))
    nvis = (1 - c) * nkb + c * ((1 - w) * nvis_causal + w * Min(nvis_causal, W / Bk + 1))
    nt = ceiling(Nq / T)
    causal_pairs = Piecewise((Nq * (Nq + 1) / 2, Nq <= Nk), (Nk * (Nk + 1) / 2 + (Nq - Nk) * Nk, True))
    # The dense kernel computes whole T x T tiles, the diagonal ones included.
    dense_pairs = (1 - c) * Nq * Nk + c * Min(Nq * Nk, Max(causal_pairs, nt * (nt + 1) / 2 * T * T))
    return nqb, nkb, nvis, dense_pairs


@functools.lru_cache(maxsize=1)
def formulas() -> dict[str, Cost]:
    """The work of dense attention and of every SPA stage (forward), in the shape symbols."""
    nqb, nkb, nvis, dense_pairs = _derived()
    nfill = fill * Max(0, nvis - k)  # fully visible blocks not selected: one pseudo-key each
    scores = B * Hs * nqb * nvis
    dense = Cost(
        flops=2 * B * Hq * dense_pairs * (D + Dv),
        vops=B * Hq * dense_pairs,  # one exp per logit
        bytes=E * B * (Hq * Nq * (D + Dv) + Hkv * Nk * (D + Dv)) + 4 * B * Hq * Nq,
        l2_bytes=E * B * Hq * dense_pairs / T * (D + Dv),  # K/V once per query tile of T rows
        items=B * Hq * ceiling(Nq / T),
        launches=1,
        # the last of the nt query tiles computes nt of the B Hq nt (nt + 1) / 2 tiles (no window)
        tail=c * (1 - w) * 2 / (B * Hq * (ceiling(Nq / T) + 1)),
    )
    pool = Cost(  # block means of k, v (and q), and their projection
        flops=2 * proj * B * (Hkv * nkb + Hq * nqb) * D * r,
        vops=B * (Hkv * Nk * (D + Dv) + Hq * Nq * D),
        bytes=E * B * (Hkv * Nk * (D + Dv) + Hq * Nq * D) + E * B * (Hkv * nkb * (D + Dv) + Hq * nqb * D)
        + 4 * B * Hkv * nkb,
        l2_bytes=0,
        items=B * (Hkv * nkb + Hq * nqb),
        launches=2,
        waves=False,
    )
    select = Cost(  # fp32 scores of the visible blocks (twice: top-k pass, write pass) and a bitonic top-k
        # bnd: the key ranges (one read of K), the first pass's bitmap and the bound pass: two
        # products a (row, visible block) pair, q re-read from L2 per chunk of 64 key blocks
        flops=bnd * 4 * B * Hq * Nq * nvis * D,
        vops=scores * (4 * r + sympy.log(2 * k + 2, 2) ** 2 + 40) + B * Hq * nqb * r
        + bnd * scores * (Bq + sympy.log(k + 2, 2) ** 2),
        bytes=4 * B * (Hs * nqb * r + Hkv * nkb * r) + 4 * B * Hs * nqb * (k + 1)
        + bnd * E * B * (Hkv * Nk * D + 2 * Hkv * nkb * D + Hq * Nq * D),
        l2_bytes=scores * r + bnd * E * B * Hq * Nq * D * (nvis / 64 + 1),  # fp32 kp, two passes, 8 query blocks per program
        items=B * Hs * ceiling(nqb / 8),
        launches=1 + 3 * bnd,
    )
    # fin: AM row-mean x sub-block-mean products per (head, query block, visible block), their
    # softmax in fp32 through memory (about 5 passes of 4 bytes), chunks of query blocks whose
    # logits fit FINE_CHUNK_BYTES, about FINE_LAUNCHES_PER_CHUNK torch launches each
    select = Cost(
        flops=select.flops + fin * 2 * B * Hq * nqb * nvis * AM * D,
        vops=select.vops + fin * 8 * B * Hq * nqb * nvis * AM,
        bytes=select.bytes + fin * (20 * B * Hq * nqb * nvis * AM + E * B * Hkv * Nk * D),
        l2_bytes=select.l2_bytes,
        items=select.items,
        launches=select.launches + fin * FINE_LAUNCHES_PER_CHUNK
        * Max(1, ceiling(nqb * B * Hq * AM * nkb * 4 / FINE_CHUNK_BYTES)),
    )
    exact = Cost(  # every (row of block i, key of a selected block), the masked diagonal included
        flops=2 * B * Hq * nqb * Bq * k * Bk * (D + Dv),
        vops=B * Hq * nqb * Bq * k * Bk,
        bytes=E * B * Hq * Nq * (D + Dv) + 4 * B * Hq * Nq + E * B * Hkv * Nk * (D + Dv) + 4 * B * Hs * nqb * k,
        l2_bytes=E * B * Hq / P * nqb * k * Bk * (D + Dv),  # the selected blocks, once per program
        items=B * Hq / P * nqb,
        launches=1,
        tail=c * K / (k * B * Hq / P * nqb),  # the longest program: K of the k * items selected blocks
    )
    fill_ = Cost(  # one pseudo-key per fully visible, unselected block (fused into the exact kernel)
        flops=2 * B * Hq * nqb * Bq * nfill * (D + Dv),
        vops=B * Hq * nqb * Bq * nfill,
        bytes=fill * E * B * Hkv * nkb * (D + Dv + 1),
        l2_bytes=E * B * Hq / P * nqb * nfill * (D + Dv),
        items=B * Hq / P * nqb,
        launches=0,
    )
    square = B * Hq * Nq * Nk
    qkvo = E * B * (Hq * Nq * (D + Dv) + Hkv * Nk * (D + Dv)) + 4 * B * Hq * Nq
    dense_masked = Cost(  # SDPA with a mask tensor (memory-efficient kernel): no tile is skipped
        flops=2 * square * (D + Dv),
        vops=2 * square,
        bytes=qkvo + E * B * Nq * Nk,
        l2_bytes=E * square / T * (D + Dv) + E * square,  # K/V per query tile; the mask per head
        items=B * Hq * ceiling(Nq / T),
        launches=1,
    )
    dense_unfused = Cost(  # scores = q @ k^T (+ mask), softmax, @ v: the scores go through memory
        flops=2 * square * (D + Dv),
        vops=5 * square,
        bytes=qkvo + E * B * Nq * Nk + 4 * E * square,
        l2_bytes=0,
        items=B * Hq * ceiling(Nq / T) * ceiling(Nk / T),
        launches=4,
    )
    return {"dense": dense, "dense_masked": dense_masked, "dense_unfused": dense_unfused,
            "pool": pool, "select": select, "exact": exact, "fill": fill_}


def stage_time(cost: Cost, eff) -> Any:
    """The roofline time of one stage, in the shape and profile symbols."""
    roof = Max(cost.flops / F_peak, cost.vops / V_peak, cost.bytes / BW, cost.l2_bytes / BW_L2)
    if cost.waves:
        # Under-filling (fewer items than SMs) and, for causal kernels, the tail: the scheduler
        # starts the long items first, so the stage takes about the balanced time plus (at most)
        # one longest item, ``1 + SMs * tail`` times the balanced time. Uniform items' partial last
        # wave is not counted (tail 0). No fitted constant: the H200 SDPA data (B=1, 32 heads,
        # 512..128K) follow it within 10% from 1K (efficiency 0.27 at 512 -> 0.76 at 64K).
        roof = roof * Max(1, SMS / cost.items, 1 + SMS * cost.tail)
    return roof / eff + cost.launches * L_launch


@functools.lru_cache(maxsize=1)
def time_expressions() -> dict[str, Any]:
    """Seconds per stage: ``{"dense": ..., "pool": ..., "select": ..., "exact": ..., "fill": ...}``."""
    return {name: stage_time(cost, EFF[name]) for name, cost in formulas().items()}


@functools.lru_cache(maxsize=1)
def _compiled() -> Callable[..., tuple]:
    exprs = time_expressions()
    return sympy.lambdify(SHAPE_SYMBOLS + PROFILE_SYMBOLS, [exprs[n] for n in DENSE_PATHS + STAGES], modules="math")


# ---------------------------------------------------------------------------------------
# Sites
# ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SiteShape:
    """The sizes of one attention call (concrete numbers; symbolic lengths at their hints)."""

    b: int
    hq: int
    hkv: int
    nq: int
    nk: int
    d: int
    dv: int
    causal: bool = False
    dtype_bytes: int = 2
    fp32: bool = False
    window: int | None = None  # a causal sliding window (keys per row)
    dense_kind: str = "fused"  # what the site runs when dense: "fused", "masked" or "unfused"

    def with_length(self, n: int, scale: str = "both") -> "SiteShape":
        """The same site at length ``n``: both lengths (self-attention) or the keys only."""
        return replace(self, nq=n, nk=n) if scale == "both" else replace(self, nk=n)


@dataclass
class Prediction:
    """Predicted seconds of both paths at one shape, with the SPA stages."""

    dense_s: float
    spa_s: float
    stages: dict[str, float] = field(default_factory=dict)  # SPA stages (GPU time) and "host"
    selected_blocks: float = 0.0  # k: mean selected key blocks per query block
    visible_blocks: float = 0.0  # mean visible key blocks per query block

    @property
    def speedup(self) -> float:
        return self.dense_s / self.spa_s if self.spa_s > 0 else math.inf


def mean_selected_blocks(nq: int, nk: int, causal: bool, cfg: SPAConfig,
                         window: int | None = None) -> tuple[float, float]:
    """(k, visible): mean selected and visible key blocks per query block (SPEC.md section 2).

    Per query block, ``|S| = min(n, forced + clip(ceil(density * n) or topk))`` for its ``n``
    visible blocks; under a causal mask, block ``i`` sees ``i + 1`` blocks (at most
    ``ceil(window / Bk) + 1`` with a sliding window). The mean over the query blocks is summed in
    closed form (``ceil`` counted as +1/2 on average).
    """
    bs = cfg.block_size
    nqb, nkb = max(1, -(-nq // bs)), max(1, -(-nk // bs))
    forced = cfg.sink_blocks + max(cfg.local_blocks, 1 if causal else 0)
    lo = float(cfg.min_blocks or 0)
    hi = math.inf if cfg.max_blocks is None else float(cfg.max_blocks)
    if cfg.topk is not None:
        slope, offset = 0.0, float(cfg.topk)
    else:
        slope = cfg.density_ppm / 1_000_000
        offset = 0.0 if slope >= 1.0 else 0.5

    def h(n: float) -> float:
        return min(n, forced + min(hi, max(lo, slope * n + offset)))

    if not causal:
        if cfg.topk is None:  # exact, in integers, as budget.topk_count
            kk = (nkb * cfg.density_ppm + 999_999) // 1_000_000
        else:
            kk = cfg.topk
        kk = min(hi, max(lo, kk))
        return float(min(nkb, forced + kk)), float(nkb)
    cap = nkb if window is None else min(nkb, -(-window // bs) + 1)
    m = min(nqb, cap)
    cuts = {m}
    if slope > 0:
        cuts |= {(lo - offset) / slope, (hi - offset) / slope}
    if slope < 1:
        cuts |= {(forced + offset) / (1 - slope)}
    cuts |= {forced + lo, forced + hi}
    ends = sorted({int(math.floor(x)) for x in cuts if math.isfinite(x) and 1 <= x <= m} | {m})
    total, start = 0.0, 1
    for end in ends:
        if end >= start:  # h is linear on start..end: the trapezoid sum is exact
            total += (h(start) + h(end)) * (end - start + 1) / 2
            start = end + 1
    vis_total = m * (m + 1) / 2
    if nqb > m:  # later query blocks see ``cap`` blocks (the window, or all keys when Nq > Nk)
        total += (nqb - m) * h(cap)
        vis_total += (nqb - m) * cap
    return total / nqb, vis_total / nqb


def heads_per_program(hq: int, hkv: int, cfg: SPAConfig) -> int:
    """GQA heads the sparse kernel packs into one tile of at most 128 rows (group selection)."""
    g = max(1, hq // max(1, hkv))
    if cfg.selection != "group":
        return 1
    p = 1
    while p * 2 <= g and g % (p * 2) == 0 and p * 2 * cfg.block_size <= 128:
        p *= 2
    return p


def max_selected_blocks(nq: int, nk: int, causal: bool, cfg: SPAConfig, window: int | None = None) -> float:
    """Selected key blocks of the query block that selects the most (causal: the last one)."""
    bs = cfg.block_size
    nqb, nkb = max(1, -(-nq // bs)), max(1, -(-nk // bs))
    n = nkb
    if causal:
        n = min(nkb, nqb) if nq <= nk else nkb
        if window is not None:
            n = min(n, -(-window // bs) + 1)
    forced = cfg.sink_blocks + max(cfg.local_blocks, 1 if causal else 0)
    kk = cfg.topk if cfg.topk is not None else (n * cfg.density_ppm + 999_999) // 1_000_000
    kk = max(float(cfg.min_blocks or 0), kk)
    if cfg.max_blocks is not None:
        kk = min(float(cfg.max_blocks), kk)
    return float(min(n, forced + kk))


def _shape_values(shape: SiteShape, cfg: SPAConfig, kk: float, tile: int, kmax: float | None = None) -> tuple:
    hs = shape.hkv if cfg.selection == "group" else shape.hq
    return (
        shape.b, shape.hq, shape.hkv, hs, shape.nq, shape.nk, shape.d, shape.dv,
        cfg.block_size, cfg.block_size, kk, shape.d, tile, shape.dtype_bytes,
        heads_per_program(shape.hq, shape.hkv, cfg), shape.window or 1, int(shape.causal),
        int(shape.causal and shape.window is not None), int(cfg.projectors is not None), int(cfg.fill == "landmark"),
        max(kk, kk if kmax is None else kmax), int(cfg.block_score in ("bound", "hybrid")),
        int(cfg.block_score == "fine"), cfg.fine_rows * cfg.fine_keys,
    )


def _profile_values(profile: HardwareProfile, shape: SiteShape) -> tuple:
    peak = profile.vector_flops if shape.fp32 else profile.matmul_flops
    eff = profile.spa_efficiency
    dense = [profile.dense_eff(kind) for kind in DENSE_KINDS]
    return (
        peak, profile.vector_flops, profile.mem_bw, profile.l2_bw, profile.sm_count, profile.launch_s,
        *dense, eff["pool"], eff["select"], eff["exact"], eff["fill"],
    )


# How the op's host time and its GPU time combine: ``(host^p + gpu^p)^(1/p)``. p -> infinity is
# max() (host issue and GPU work fully overlapped); the SPA op's seven launches overlap only in
# part (the sparse kernel, most of the GPU time, is issued last). On the H200 bench_cost_model run 6 (8K,
# densities 0.1-0.5, where the two are close) p = 2 is within 6% of every point, max() up to 26% low.
# SPA_COST_HOST_GPU_P=inf restores max() (for analysis).
HOST_GPU_P = float(os.environ.get("SPA_COST_HOST_GPU_P", "2"))


def host_and_gpu(host: float, gpu: float, p: float | None = None) -> float:
    """Seconds of one call whose host issue takes ``host`` and whose kernels take ``gpu``."""
    p = HOST_GPU_P if p is None else p
    if math.isinf(p):
        return max(host, gpu)
    hi = max(host, gpu)
    if hi <= 0:
        return 0.0
    return hi * ((host / hi) ** p + (gpu / hi) ** p) ** (1.0 / p)


@functools.lru_cache(maxsize=None)
def _l2_bytes_fn(stage: str) -> Callable[..., float]:
    return sympy.lambdify(SHAPE_SYMBOLS, formulas()[stage].l2_bytes, modules="math")


def stage_l2_bytes(shape: SiteShape, cfg: SPAConfig, stage: str) -> float:
    """Bytes a stage reads from L2 by the model (``formulas()[stage].l2_bytes``) at one shape."""
    kk, _ = mean_selected_blocks(shape.nq, shape.nk, shape.causal, cfg, shape.window if shape.causal else None)
    kmax = max_selected_blocks(shape.nq, shape.nk, shape.causal, cfg, shape.window if shape.causal else None)
    return float(_l2_bytes_fn(stage)(*_shape_values(shape, cfg, kk, 128, kmax)))


def predict(shape: SiteShape, cfg: SPAConfig, profile: HardwareProfile) -> Prediction:
    """Predicted seconds of the dense path (``shape.dense_kind``) and of SPA on ``profile``'s card."""
    if shape.dense_kind not in DENSE_KINDS:
        raise ValueError(f"dense_kind {shape.dense_kind!r}: expected one of {DENSE_KINDS}")
    if min(shape.b, shape.hq, shape.hkv, shape.nq, shape.nk) < 1:  # empty calls: as small as can be
        shape = replace(shape, b=max(1, shape.b), hq=max(1, shape.hq), hkv=max(1, shape.hkv),
                        nq=max(1, shape.nq), nk=max(1, shape.nk))
    kk, nvis = mean_selected_blocks(shape.nq, shape.nk, shape.causal, cfg, shape.window if shape.causal else None)
    window = shape.window if shape.causal else None
    kmax = max_selected_blocks(shape.nq, shape.nk, shape.causal, cfg, window)
    values = _shape_values(shape, cfg, kk, profile.dense_tile, kmax)
    times = _compiled()(*values, *_profile_values(profile, shape))
    dense = times[DENSE_KINDS.index(shape.dense_kind)]
    spa = times[len(DENSE_KINDS):]
    spa_gpu = sum(spa)
    stages = dict(zip(STAGES, spa))
    stages["host"] = profile.host_overhead_s["spa"]
    dense_s = max(dense, profile.host_overhead_s["dense"])
    spa_s = host_and_gpu(profile.host_overhead_s["spa"], spa_gpu)
    return Prediction(dense_s=dense_s, spa_s=spa_s, stages=stages, selected_blocks=kk, visible_blocks=nvis)


def spa_wins(pred: Prediction, margin: float) -> bool:
    """SPA is chosen where ``t_spa * (1 + margin) <= t_dense``."""
    return pred.spa_s * (1.0 + margin) <= pred.dense_s


def crossover(
    shape: SiteShape,
    cfg: SPAConfig,
    profile: HardwareProfile,
    margin: float = 0.0,
    scale: str = "both",
    n_max: int = N_MAX,
) -> float:
    """The smallest length N from which SPA stays predicted faster by ``margin`` up to ``n_max``.

    ``scale="both"`` varies Nq = Nk = N (self-attention), ``"keys"`` varies Nk only.
    Returns ``math.inf`` when SPA is not predicted faster at ``n_max``.
    """
    return _crossover_cached(shape.with_length(1, scale), _op_key(cfg), profile.cache_token(), margin, scale, n_max,
                             cfg, profile)


def _op_key(cfg: SPAConfig) -> tuple:
    return (cfg.block_size, cfg.density_ppm, cfg.topk, cfg.min_blocks, cfg.max_blocks, cfg.sink_blocks,
            cfg.local_blocks, cfg.fill, cfg.selection, cfg.projectors is not None, cfg.block_score,
            cfg.fine_rows, cfg.fine_keys)


_crossover_memo: dict[tuple, float] = {}


def _crossover_cached(base: SiteShape, op_key, token, margin, scale, n_max, cfg, profile) -> float:
    key = (base, op_key, token, margin, scale, n_max)
    hit = _crossover_memo.get(key)
    if hit is not None:
        return hit
    wins = lambda n: spa_wins(predict(base.with_length(n, scale), cfg, profile), margin)  # noqa: E731
    grid = sorted({int(round(N_MIN * 2 ** (j / 4))) for j in range(0, 4 * int(math.log2(n_max / N_MIN)) + 1)})
    grid = [n for n in grid if n <= n_max]
    results = [wins(n) for n in grid]
    if not results[-1]:
        value = math.inf
    else:
        last_loss = max((i for i, w in enumerate(results) if not w), default=None)
        if last_loss is None:
            value = float(grid[0])
        else:
            lo, hi = grid[last_loss], grid[last_loss + 1]  # loses at lo, wins at hi
            while hi - lo > 1:
                mid = (lo + hi) // 2
                lo, hi = (lo, mid) if wins(mid) else (mid, hi)
            value = float(hi)
    if len(_crossover_memo) > 4096:
        _crossover_memo.clear()
    _crossover_memo[key] = value
    return value


def describe() -> str:
    """The formulas as text (``python -m spa_compile.passes.cost_model``)."""
    lines = []
    for name, cost in formulas().items():
        lines.append(f"[{name}]")
        for part in ("flops", "vops", "bytes", "l2_bytes", "items", "launches", "tail"):
            lines.append(f"  {part:8s} = {getattr(cost, part)}")
    lines.append("[time per stage]")
    lines.append(f"  t = Max(1, SMs/items, 1 + SMs*tail) * Max(flops/{F_peak}, vops/{V_peak}, bytes/{BW}, l2_bytes/{BW_L2}) / eff_stage"
                 f" + launches*{L_launch}")
    return "\n".join(lines)


if __name__ == "__main__":  # pragma: no cover
    print(describe())
