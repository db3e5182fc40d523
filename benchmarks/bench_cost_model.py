"""Validate the cost model on a GPU: measured dense and SPA times next to the predictions.

    PYTHONPATH=. python3 benchmarks/bench_cost_model.py --out benchmarks/results [--refit]
        [--docs docs/benchmarks.md] [--write-cache] [--quick]
    PYTHONPATH=. python3 benchmarks/bench_cost_model.py --out /tmp/cm --from-json RESULT.json   # CPU only:
        the analysis (steps 5-6) again on a stored run's measurements, with the current code

One run, in this order:

1. the card, the versions and the date;
2. the hardware microbenchmark (``spa_compile.hardware.measure_profile``: the profile that
   ``device_profile="auto"`` uses);
3. output checks before any timing: SDPA's flash and cuDNN backends against the math backend;
   SPA with every block selected against SDPA (SPEC.md exactness); SPA at each density against the
   pure-PyTorch reference; and that the SPA Triton kernels (not the reference) serve the calls;
4. the grid: N from 512 to 128K, SDPA (default, flash, cuDNN) and ``spa_compile.spa_attention``
   at densities 0.1 to 0.5, each the median of ``triton.testing.do_bench``;
5. predictions of the built-in profile, the measured profile and (``--refit``) profiles whose
   efficiencies are fitted to these measurements (all points; and fitted on densities 0.1, 0.3,
   0.5 only, to check the held-out 0.2 and 0.4);
6. the targets: the decision (margin 0) picks the faster path at >= 90% of the points, and the
   predicted crossover N* is within 1.5x of the measured one, per density.

Writes ``bench_cost_model_<card>_<date>.json`` (every figure) and ``.md`` (tables) under ``--out``;
with ``--refit`` also ``profile_<card>.json`` (usable as ``device_profile="path.json"``) and
``builtin_refit_<name>.json`` (the numbers to paste into spa_compile/hardware.py); ``--docs``
replaces this benchmark's section of a markdown file; ``--write-cache`` installs the refit profile
as this card's cached profile. The analysis functions are pure and tested on CPU
(tests/test_cost_model.py).
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import subprocess
import sys
import time
import traceback
from pathlib import Path
from typing import Any, Callable

import torch

from spa_compile import SPAConfig, hardware
from spa_compile.hardware import EFFICIENCY_STAGES, HardwareProfile
from spa_compile.passes import cost_model as cm

DEFAULT_NS = [512 << i for i in range(9)]  # 512 .. 131072
DEFAULT_DENSITIES = [0.1, 0.2, 0.3, 0.4, 0.5]
HOLDOUT_FIT = (0.1, 0.3, 0.5)  # the held-out check fits on these and predicts the others
DOCS_BEGIN = "<!-- bench_cost_model:begin -->"
DOCS_END = "<!-- bench_cost_model:end -->"
TARGET_ACCURACY = 0.9
TARGET_CROSSOVER_RATIO = 1.5


def log(*args) -> None:
    print(*args, flush=True)


# ---------------------------------------------------------------------------------------
# Arguments and environment
# ---------------------------------------------------------------------------------------


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="folder for the JSON and markdown results")
    p.add_argument("--ns", type=int, nargs="+", default=DEFAULT_NS, help="sequence lengths (Nq = Nk)")
    p.add_argument("--densities", type=float, nargs="+", default=DEFAULT_DENSITIES)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--hq", type=int, default=32)
    p.add_argument("--hkv", type=int, default=None, help="kv heads (default: --hq, multi-head)")
    p.add_argument("--d", type=int, default=128)
    p.add_argument("--dtype", choices=("bfloat16", "float16"), default="bfloat16")
    p.add_argument("--no-causal", dest="causal", action="store_false")
    p.add_argument("--block-size", type=int, default=64)
    p.add_argument("--margin", type=float, default=SPAConfig().margin, help="margin of the reported decisions")
    p.add_argument("--refit", action="store_true", help="fit the profile's efficiencies to the measurements")
    p.add_argument("--write-cache", action="store_true", help="install the refit profile as this card's cache")
    p.add_argument("--docs", default=None, help="markdown file whose bench_cost_model section is replaced")
    p.add_argument("--no-microbenchmark", dest="microbenchmark", action="store_false",
                   help="skip hardware.measure_profile (use the built-in profile's rates)")
    p.add_argument("--quick", action="store_true", help="N up to 16K and densities 0.2, 0.4 (a smoke run)")
    p.add_argument("--skip-checks", action="store_true", help="time even if an output check fails")
    p.add_argument("--check-n", type=int, default=1024, help="sequence length of the output checks")
    p.add_argument("--from-json", default=None, metavar="RESULT.json",
                   help="no GPU: re-run the analysis (predictions, decisions, N*, refit, held-out) on the "
                        "measurements stored in a result JSON of this benchmark, with the current code")
    p.add_argument("--base-profile", default=None, metavar="NAME|PATH",
                   help="with --from-json: the profile the microbenchmark is read against (its prior "
                        "efficiencies; default the card's built-in; e.g. h200-run1, fitted to the first run)")
    args = p.parse_args(argv)
    if args.hkv is None:
        args.hkv = args.hq
    if args.quick:
        args.ns = [n for n in args.ns if n <= 16384]
        args.densities = [0.2, 0.4]
    return args


def _run(cmd: list[str]) -> str | None:
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=20, check=True).stdout.strip()
    except Exception:
        return None


def environment(device: torch.device) -> dict[str, Any]:
    props = torch.cuda.get_device_properties(device)
    import triton

    root = Path(__file__).resolve().parent.parent
    return {
        "card": props.name,
        "compute_capability": f"{props.major}.{props.minor}",
        "sm_count": props.multi_processor_count,
        "memory_gib": round(props.total_memory / 2**30, 1),
        "driver": _run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"]),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version(),
        "python": sys.version.split()[0],
        "spa_compile_git": _run(["git", "-C", str(root), "rev-parse", "--short", "HEAD"]),
        "spa_compile_dirty": bool(_run(["git", "-C", str(root), "status", "--porcelain", "--", "spa_compile"])),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "hostname": os.uname().nodename if hasattr(os, "uname") else None,
    }


def site_shape(args, n: int) -> cm.SiteShape:
    return cm.SiteShape(b=args.batch, hq=args.hq, hkv=args.hkv, nq=n, nk=n, d=args.d, dv=args.d,
                        causal=args.causal, dtype_bytes=2, fp32=False, dense_kind="fused")


def spa_config(args, density: float) -> SPAConfig:
    return SPAConfig(density=density, block_size=args.block_size)


# ---------------------------------------------------------------------------------------
# GPU: inputs, checks, timing
# ---------------------------------------------------------------------------------------


def make_inputs(args, n: int, device, seed: int = 0):
    dtype = getattr(torch, args.dtype)
    g = torch.Generator(device=device).manual_seed(seed)
    q = torch.randn(args.batch, args.hq, n, args.d, device=device, dtype=dtype, generator=g)
    k = torch.randn(args.batch, args.hkv, n, args.d, device=device, dtype=dtype, generator=g)
    v = torch.randn(args.batch, args.hkv, n, args.d, device=device, dtype=dtype, generator=g)
    return q, k, v


def sdpa(q, k, v, args, backend: str | None):
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    gqa = args.hq != args.hkv
    if backend is None:
        return F.scaled_dot_product_attention(q, k, v, is_causal=args.causal, enable_gqa=gqa)
    which = {"flash": SDPBackend.FLASH_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION,
             "math": SDPBackend.MATH}[backend]
    with sdpa_kernel([which]):
        return F.scaled_dot_product_attention(q, k, v, is_causal=args.causal, enable_gqa=gqa)


def spa(q, k, v, args, density: float):
    from spa_compile import spa_attention

    return spa_attention(q, k, v, is_causal=args.causal, enable_gqa=args.hq != args.hkv,
                         config=spa_config(args, density))


def _err(a, b) -> float:
    return float((a.float() - b.float()).abs().max())


def check_outputs(args, device) -> list[dict[str, Any]]:
    """Every check is {name, max_err, tol, ok}; timing is meaningless if one fails."""
    from spa_compile import ops
    from spa_compile.visibility import from_sdpa

    checks = []
    n = args.check_n
    q, k, v = make_inputs(args, n, device, seed=1)
    qf, kf, vf = q.float(), k.float(), v.float()
    exact = sdpa(qf, kf, vf, args, "math")  # float32 reference
    tol = 2e-2 if args.dtype == "bfloat16" else 5e-3
    for backend in ("flash", "cudnn", None):
        name = f"sdpa[{backend or 'default'}] vs float32 math"
        try:
            checks.append({"name": name, "max_err": _err(sdpa(q, k, v, args, backend), exact), "tol": tol})
        except RuntimeError as exc:  # a backend this card or build lacks: not a failure
            checks.append({"name": name, "skipped": str(exc).splitlines()[0][:200], "ok": True})
    checks.append({"name": "spa(density=1) vs float32 math (SPEC exactness)",
                   "max_err": _err(spa(q, k, v, args, 1.0), exact), "tol": tol})
    vis = from_sdpa(None, args.causal, n, n)
    scale = 1.0 / math.sqrt(args.d)
    checks.append({"name": "the SPA Triton kernels serve the calls",
                   "ok": bool(ops._use_kernels(q, k, v, vis, spa_config(args, 0.2), scale))})
    for density in args.densities:
        try:
            checks.extend(_check_density(q, k, v, qf, kf, vf, vis, scale, args, density, tol, device))
        except Exception as exc:  # a crash is a failed check, reported with the others
            checks.append({"name": f"spa(density={density}) runs", "ok": False,
                           "error": f"{type(exc).__name__}: {exc}"[:500]})
    for c in checks:
        if "ok" not in c:
            c["ok"] = math.isfinite(c["max_err"]) and c["max_err"] <= c["tol"]
    return checks


def _check_density(q, k, v, qf, kf, vf, vis, scale, args, density, tol, device) -> list[dict[str, Any]]:
    from spa_compile import ops, reference

    cfg = spa_config(args, density)
    out, _, index, count = torch.ops.spa.attention(q, k, v, None, None, None, None, scale, args.causal, 0, -1,
                                                   ops.config_to_str(cfg))
    valid = reference.valid_keys(vis, args.batch, args.hkv, cfg.block_size, device)
    pooled = reference.pool_blocks(kf, vf, valid, cfg.block_size)
    ref_sel = reference.select_blocks(qf, pooled, vis, valid, scale, cfg)
    # the kernels' output against the reference on the kernels' own selection ...
    want, _ = reference.sparse_attention(qf, kf, vf, reference.Selection(index=index, count=count),
                                         pooled, vis, valid, scale, cfg.fill, cfg.block_size)
    # ... and the selections themselves (bf16 vs float32 pooling may flip near-ties)
    same = (index.long() == ref_sel.index.long()).all(dim=-1) & (count == ref_sel.count)
    agree = float(same.float().mean())
    return [
        {"name": f"spa(density={density}) vs reference on the same selection", "max_err": _err(out, want), "tol": tol},
        {"name": f"spa(density={density}) selection agrees with the reference", "agreement": agree,
         "ok": agree >= 0.99},
    ]


LONG_CALL_MS = 20.0  # calls longer than this are timed by a few CUDA-event runs instead of do_bench
LONG_CALL_REPS = 5
SHORT_CALL_MS = 3.0  # calls up to this long are timed SHORT_CALL_TRIES times (host-bound region)
SHORT_CALL_TRIES = 3


def bench_s(fn: Callable[[], Any]) -> dict[str, float]:
    """Median (and 20th/80th percentile) seconds of ``fn``.

    Calls up to LONG_CALL_MS: ``triton.testing.do_bench`` (>= 25 ms warm-up, >= 100 ms of timed
    runs, L2 flushed between runs). Longer calls (N >= 32K here): one warm-up and LONG_CALL_REPS
    back-to-back runs between CUDA events, L2 flushed before each: do_bench's own estimate, warm-up
    and repeats would cost ~17 calls each, half of the run's time at 128K, for no better median.
    """
    from triton.testing import do_bench

    fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    est_ms = (time.perf_counter() - t0) * 1e3
    if est_ms <= LONG_CALL_MS:
        # SHORT_CALL_TRIES do_bench runs, the one with the lowest median kept: a host-bound call's
        # event time is its host time, and background host work (it came and went within one run,
        # doubling some medians at 0.5-8K: H200 bench_cost_model run 4) only ever adds to it
        runs = [do_bench(fn, warmup=max(25, 2 * est_ms), rep=max(100, 7 * est_ms), quantiles=[0.2, 0.5, 0.8])
                for _ in range(SHORT_CALL_TRIES if est_ms <= SHORT_CALL_MS else 1)]
        p20, p50, p80 = min(runs, key=lambda r: r[1])
        return {"median": p50 / 1e3, "p20": p20 / 1e3, "p80": p80 / 1e3,
                "medians_of_tries": [r[1] / 1e3 for r in runs]}
    flush = torch.empty(64 << 20, dtype=torch.int32, device="cuda")  # 256 MB, as do_bench's cache flush
    times = sorted(hardware.cuda_times(fn, LONG_CALL_REPS, warmup=0, before=flush.zero_))
    q = lambda f: times[min(len(times) - 1, int(round(f * (len(times) - 1))))]  # noqa: E731
    return {"median": q(0.5), "p20": q(0.2), "p80": q(0.8)}


def measure_grid(args, device, on_point=None) -> list[dict[str, Any]]:
    """Dense and SPA times per N; ``on_point(points)`` after each N (a killed run keeps what it measured)."""
    points = []
    t_start = time.perf_counter()
    for n in args.ns:
        q, k, v = make_inputs(args, n, device)
        point: dict[str, Any] = {"n": n, "dense": {}, "spa": {}, "errors": {}}
        for backend in (None, "flash", "cudnn"):
            name = backend or "sdpa"
            try:
                point["dense"][name] = bench_s(lambda: sdpa(q, k, v, args, backend))
            except RuntimeError as exc:
                point["errors"][name] = str(exc).splitlines()[0][:300]
        for density in args.densities:
            try:
                point["spa"][str(density)] = bench_s(lambda: spa(q, k, v, args, density))
            except Exception as exc:  # record, go on with the grid
                point["errors"][f"spa{density}"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:300]}"
        dense = point["dense"].get("sdpa", {}).get("median")
        log(f"N={n:>6}  sdpa {_ms(dense)}  flash {_ms(point['dense'].get('flash', {}).get('median'))}  "
            f"cudnn {_ms(point['dense'].get('cudnn', {}).get('median'))}  "
            + "  ".join(f"spa{d} {_ms(point['spa'].get(str(d), {}).get('median'))}" for d in args.densities)
            + f"  [{time.perf_counter() - t_start:.0f} s]")
        points.append(point)
        if on_point is not None:
            on_point(points)
        del q, k, v
        torch.cuda.empty_cache()
    return points


def _ms(t: float | None) -> str:
    return "   -    " if t is None else f"{t * 1e3:8.3f}ms"


# ---------------------------------------------------------------------------------------
# Analysis (pure: runs on CPU from measured points)
# ---------------------------------------------------------------------------------------


def records(points: list[dict], densities) -> list[dict[str, float]]:
    """One record per (N, density) with both measured times (dense = SDPA default)."""
    out = []
    for p in points:
        dense = p["dense"].get("sdpa", {}).get("median")
        for d in densities:
            t = p["spa"].get(str(d), {}).get("median")
            if dense is not None and t is not None:
                out.append({"n": p["n"], "density": d, "dense_s": dense, "spa_s": t})
    return out


def predict_records(recs: list[dict], profile: HardwareProfile, args) -> list[dict]:
    out = []
    for r in recs:
        pred = cm.predict(site_shape(args, r["n"]), spa_config(args, r["density"]), profile)
        out.append({**r, "pred_dense_s": pred.dense_s, "pred_spa_s": pred.spa_s})
    return out


def measured_crossover(ns: list[int], ratios: list[float]) -> float:
    """Smallest N from which SPA is measured faster at every larger grid N (dense/spa > 1),
    interpolated in log N between the grid points; ``ns[0]`` if SPA is faster everywhere, inf if
    it is not faster at the largest N."""
    logs = [math.log(r) for r in ratios]
    if logs[-1] <= 0:
        return math.inf
    last_loss = max((i for i, x in enumerate(logs) if x <= 0), default=None)
    if last_loss is None:
        return float(ns[0])
    i = last_loss
    a, b = logs[i], logs[i + 1]
    frac = (0 - a) / (b - a) if b != a else 0.0
    return math.exp(math.log(ns[i]) + frac * (math.log(ns[i + 1]) - math.log(ns[i])))


def crossover_ok(measured: float, predicted: float, lo: float, hi: float) -> tuple[bool, float | None]:
    """Within TARGET_CROSSOVER_RATIO; outside the grid [lo, hi] only bounds are known."""
    if math.isinf(measured):  # SPA not faster at the largest N measured
        return predicted >= hi / TARGET_CROSSOVER_RATIO, None
    if measured <= lo:  # SPA faster already at the smallest N measured
        return predicted <= lo * TARGET_CROSSOVER_RATIO, None
    if math.isinf(predicted):
        return False, math.inf
    ratio = max(predicted / measured, measured / predicted)
    return ratio <= TARGET_CROSSOVER_RATIO, ratio


def analyse(recs: list[dict], profile: HardwareProfile, args, densities=None) -> dict[str, Any]:
    """Decision accuracy (margin 0 and args.margin), time lost to wrong decisions, and N* per density."""
    densities = sorted({r["density"] for r in recs}) if densities is None else list(densities)
    rows = [r for r in predict_records(recs, profile, args) if r["density"] in densities]
    if not rows:
        return {"points": 0}
    correct = sum((r["pred_spa_s"] <= r["pred_dense_s"]) == (r["spa_s"] < r["dense_s"]) for r in rows)
    lost = []
    for r in rows:
        pick_spa = r["pred_spa_s"] * (1 + args.margin) <= r["pred_dense_s"]
        chosen = r["spa_s"] if pick_spa else r["dense_s"]
        lost.append(chosen / min(r["spa_s"], r["dense_s"]) - 1)
    rel_err = [abs(math.log(r["pred_spa_s"] / r["spa_s"])) for r in rows]
    rel_err_dense = [abs(math.log(r["pred_dense_s"] / r["dense_s"])) for r in rows]
    cross = {}
    all_ns = sorted({r["n"] for r in recs})
    for d in densities:
        pts = sorted((r for r in rows if r["density"] == d), key=lambda r: r["n"])
        if len(pts) < 2:
            continue
        ns = [r["n"] for r in pts]
        measured = measured_crossover(ns, [r["dense_s"] / r["spa_s"] for r in pts])
        predicted = cm.crossover(site_shape(args, ns[0]), spa_config(args, d), profile, margin=0.0)
        ok, ratio = crossover_ok(measured, predicted, all_ns[0], all_ns[-1])
        cross[str(d)] = {"measured": measured, "predicted": predicted, "ratio": ratio, "ok": ok}
    accuracy = correct / len(rows)
    return {
        "profile": profile.name,
        "points": len(rows),
        "decision_accuracy": accuracy,
        "decision_ok": accuracy >= TARGET_ACCURACY,
        "mean_time_lost_with_margin": sum(lost) / len(lost),
        "max_time_lost_with_margin": max(lost),
        "median_abs_log_error_spa": sorted(rel_err)[len(rel_err) // 2],
        "median_abs_log_error_dense": sorted(rel_err_dense)[len(rel_err_dense) // 2],
        "crossover": cross,
        "crossover_ok": all(c["ok"] for c in cross.values()),
    }


def _unit(profile: HardwareProfile) -> HardwareProfile:
    return profile.replace(
        launch_s=0.0, host_overhead_s={"dense": 0.0, "spa": 0.0},
        dense_efficiency={key: 1.0 for key in profile.dense_efficiency},
        spa_efficiency={key: 1.0 for key in EFFICIENCY_STAGES},
    )


def spa_points(points: list[dict], args, densities) -> list[tuple]:
    """``(shape, cfg, seconds)`` of every measured SPA point at ``densities``."""
    out = []
    for p in points:
        for d in densities:
            t = p["spa"].get(str(d), {}).get("median")
            if t is not None:
                out.append((site_shape(args, p["n"]), spa_config(args, d), t))
    return out


def refit(points: list[dict], base: HardwareProfile, args, densities=None, note: str = "") -> HardwareProfile:
    """Efficiencies and the SPA op's per-call floor fitted to measured points; rates stay ``base``'s.

    Dense (per SDPA backend): the geometric mean over GPU-bound points (>= 3x the dense floor) of
    roofline / measured time. SPA: :func:`spa_compile.hardware.fit_spa`: the four stage efficiencies
    and the floor ``F`` jointly, least squares in log time of ``t = max(F, sum_s roof_s / e_s +
    launches)`` over every point (the floor-bound ones inform ``F``, the others the efficiencies).
    """
    densities = list(args.densities if densities is None else densities)
    unit = _unit(base)
    dense_eff = dict(base.dense_efficiency)
    for name in ("sdpa", "flash", "cudnn"):
        logs = []
        for p in points:
            t = p["dense"].get(name, {}).get("median")
            if t is None or t < 3 * base.host_overhead_s["dense"]:
                continue
            roof = cm.predict(site_shape(args, p["n"]), spa_config(args, 0.2), unit).dense_s
            logs.append(math.log(roof / max(t - base.launch_s, 1e-12)))
        if logs:
            dense_eff[name] = hardware._clip_eff(math.exp(sum(logs) / len(logs)))
    spa_eff, fixed, stats = hardware.fit_spa(spa_points(points, args, densities), base)
    provisional = tuple(p for p in base.provisional
                        if p not in ("spa_efficiency", "dense_efficiency", "host_overhead_s"))
    sources = {**base.sources,
               "dense_efficiency": f"refit by benchmarks/bench_cost_model.py{note}",
               "spa_efficiency": f"refit by benchmarks/bench_cost_model.py (densities {densities}, jointly with "
                                 f"the per-call floor; rms log error {stats.get('rms_log_error', 0):.3f}){note}",
               "host_overhead_s": "spa: fitted per-call floor (bench_cost_model refit); dense: "
                                  + base.sources.get("host_overhead_s", "")}
    return base.replace(name=f"{base.name}+refit", dense_efficiency=dense_eff, spa_efficiency=spa_eff,
                        host_overhead_s={**base.host_overhead_s, "spa": fixed},
                        provisional=provisional, sources=sources)


# ---------------------------------------------------------------------------------------
# Reports
# ---------------------------------------------------------------------------------------


def _fmt_n(n: float | None) -> str:
    if n is None:
        return "-"
    if math.isinf(n):
        return "never"
    return f"{n / 1024:.1f}K" if n >= 1024 else f"{n:.0f}"


def markdown(result: dict[str, Any]) -> str:
    env, args = result["environment"], result["args"]
    lines = [
        f"### Cost model vs measurement: {env['card']} ({env['date'][:10]})",
        "",
        f"torch {env['torch']}, triton {env['triton']}, CUDA {env['cuda']}, driver {env['driver']}, "
        f"spa_compile {env['spa_compile_git']}{' (dirty)' if env.get('spa_compile_dirty') else ''}. "
        f"B={args['batch']}, Hq={args['hq']}, Hkv={args['hkv']}, D={args['d']}, {args['dtype']}, "
        f"{'causal' if args['causal'] else 'no mask'}, block {args['block_size']}; medians of do_bench. "
        "Dense = SDPA's default backend.",
        "",
    ]
    failed = [c["name"] for c in result["checks"] if not c["ok"]]
    lines += [f"Output checks: {'all passed' if not failed else 'FAILED: ' + ', '.join(failed)}.", ""]
    dens = args["densities"]
    lines += ["| N | SDPA | flash | cuDNN | " + " | ".join(f"SPA {d}" for d in dens) + " |",
              "|---:|---:|---:|---:|" + "---:|" * len(dens)]
    for p in result["points"]:
        cells = [_ms(p["dense"].get(b, {}).get("median")).strip() for b in ("sdpa", "flash", "cudnn")]
        cells += [_ms(p["spa"].get(str(d), {}).get("median")).strip() for d in dens]
        lines.append(f"| {p['n']} | " + " | ".join(cells) + " |")
    lines += ["", "| profile | decision accuracy (margin 0) | time lost (margin) | median SPA error | "
              "N* measured / predicted per density | targets |", "|---|---:|---:|---:|---|---|"]
    for a in result["analysis"]:
        if not a.get("points"):
            continue
        cross = ", ".join(f"{d}: {_fmt_n(c['measured'])}/{_fmt_n(c['predicted'])}" for d, c in a["crossover"].items())
        ok = "pass" if a["decision_ok"] and a["crossover_ok"] else "FAIL"
        label = a["profile"] + (f" ({a['label']})" if a.get("label") else "")
        lines.append(f"| {label} | {a['decision_accuracy']:.0%} | {a['mean_time_lost_with_margin']:.1%} | "
                     f"{math.exp(a['median_abs_log_error_spa']) - 1:.0%} | {cross} | {ok} |")
    if result.get("refit"):
        r = result["refit"]
        lines += ["", f"Refit efficiencies: dense {json.dumps(r['dense_efficiency'])}, "
                      f"SPA {json.dumps(r['spa_efficiency'])}."]
    return "\n".join(lines) + "\n"


def update_docs(path: Path, section: str) -> None:
    """Replace the text between the bench_cost_model markers (append the section if absent)."""
    text = path.read_text() if path.exists() else "# Benchmarks\n"
    block = f"{DOCS_BEGIN}\n{section}{DOCS_END}\n"
    if DOCS_BEGIN in text and DOCS_END in text:
        head, rest = text.split(DOCS_BEGIN, 1)
        tail = rest.split(DOCS_END, 1)[1].lstrip("\n")
        text = head + block + tail
    else:
        text = text.rstrip("\n") + "\n\n## Cost model\n\n" + block
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def _json_default(x):
    if isinstance(x, float) and math.isinf(x):
        return "inf"
    return str(x)


def _clean(obj):
    """inf -> "inf" (JSON has no infinity)."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return "inf" if obj > 0 else ("-inf" if obj < 0 else "nan")
    if isinstance(obj, dict):
        return {k: _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    return obj


def target_report(analyses: list[dict]) -> list[str]:
    """PASS/FAIL per target and profile, as printed at the end of a run."""
    lines = []
    for a in analyses:
        if not a.get("points"):
            continue
        right = round(a["decision_accuracy"] * a["points"])
        lines.append(f"== {a['profile']} ({a['label']}):")
        lines.append(f"   target decision accuracy >= {TARGET_ACCURACY:.0%}: {a['decision_accuracy']:.1%} "
                     f"({right}/{a['points']} points) -> {'PASS' if a['decision_ok'] else 'FAIL'}")
        for d, c in a["crossover"].items():
            ratio = "" if c["ratio"] is None else f", {c['ratio']:.2f}x"
            lines.append(f"   target N* within {TARGET_CROSSOVER_RATIO}x, density {d}: {_fmt_n(c['measured'])} measured"
                         f" / {_fmt_n(c['predicted'])} predicted{ratio} -> {'PASS' if c['ok'] else 'FAIL'}")
        lines.append(f"   median |error| SPA {math.exp(a['median_abs_log_error_spa']) - 1:.0%}, dense "
                     f"{math.exp(a['median_abs_log_error_dense']) - 1:.0%}; all targets: "
                     f"{'PASS' if a['decision_ok'] and a['crossover_ok'] else 'FAIL'}")
    return lines


def evaluate(points: list[dict], profiles: list[tuple[str, HardwareProfile]], args, refit_flag: bool,
             base_for_refit: HardwareProfile) -> tuple[list[dict], dict | None, HardwareProfile | None]:
    """Analyses for each profile, plus (with refit) all-points and held-out refits."""
    recs = records(points, args.densities)
    analyses = []
    for label, prof in profiles:
        analyses.append({**analyse(recs, prof, args), "label": label})
    refit_info, refit_profile = None, None
    if refit_flag:
        refit_profile = refit(points, base_for_refit, args)
        analyses.append({**analyse(recs, refit_profile, args), "label": "refit on all points (in-sample)"})
        fit_on = [d for d in args.densities if any(abs(d - h) < 1e-9 for h in HOLDOUT_FIT)]
        held = [d for d in args.densities if d not in fit_on]
        if fit_on and held:
            holdout = refit(points, base_for_refit, args, densities=fit_on, note=" (hold-out fit)")
            analyses.append({**analyse(recs, holdout, args, densities=held),
                             "label": f"fit on {fit_on}, checked on {held}"})
        refit_info = {"dense_efficiency": dict(refit_profile.dense_efficiency),
                      "spa_efficiency": dict(refit_profile.spa_efficiency),
                      "host_overhead_s": dict(refit_profile.host_overhead_s)}
    return analyses, refit_info, refit_profile


# ---------------------------------------------------------------------------------------
# Offline: the analysis again, on stored measurements (no GPU)
# ---------------------------------------------------------------------------------------

SHAPE_ARGS = ("ns", "densities", "batch", "hq", "hkv", "d", "dtype", "causal", "block_size", "margin")


def emulated_microbenchmark(data: dict, args) -> tuple[dict[str, Any], str]:
    """The raw microbenchmark numbers of a stored run, for :func:`hardware.profile_from_measurements`.

    A result written by this version stores them (``measured_profile.measurements``). An older one
    kept only the resulting profile: its rates and floors are taken from it, and the SDPA and SPA
    probes are emulated from the grid's points at the probes' lengths (N = DENSE_PROBE / SPA_PROBE n,
    same density), scaled to the probes' head counts by the model's roofline ratio. A result of
    schema 2 or older has no ``spa_probes`` (schema 3's several SPA probes): those with a grid point
    at the probe's length and density (fill "landmark") are emulated the same way; the fill="none"
    probe has no grid point and is left out (the fit's prior then splits fill from exact more).
    """
    mp = data["measured_profile"]
    notes = []
    if mp.get("measurements"):
        raw = dict(mp["measurements"])
        notes.append("the run's stored microbenchmark numbers")
    else:
        raw = {
            "matmul_flops": mp["matmul_flops"], "mem_bw": mp["mem_bw"], "l2_bw": mp["l2_bw"],
            "launch_s": mp["launch_s"], "host_dense_s": mp["host_overhead_s"]["dense"],
            "host_spa_s": mp["host_overhead_s"]["spa"],
        }
        notes.append("emulated: the stored profile's rates and floors (the run kept no raw microbenchmark numbers)")
    unit = _unit(hardware.closest_builtin(data["environment"]["card"]))
    by_n = {p["n"]: p for p in data["points"]}
    dp, sp = hardware.DENSE_PROBE, hardware.SPA_PROBE
    if "dense" not in raw and dp["n"] in by_n:
        probe = cm.SiteShape(b=dp["b"], hq=dp["hq"], hkv=dp["hkv"], nq=dp["n"], nk=dp["n"], d=dp["d"], dv=dp["d"],
                             causal=True)
        ratio = (cm.predict(probe, SPAConfig(), unit).dense_s
                 / cm.predict(site_shape(args, dp["n"]), SPAConfig(), unit).dense_s)
        raw["dense"] = {name: t["median"] * ratio for name, t in by_n[dp["n"]]["dense"].items()}
        notes.append("SDPA probe emulated from the grid")

    def from_grid(p: dict) -> float | None:
        t = by_n.get(p["n"], {}).get("spa", {}).get(str(p["density"]), {}).get("median")
        if t is None or p.get("fill", "landmark") != "landmark":
            return None
        cfg = SPAConfig(density=p["density"], block_size=args.block_size)
        grid = cm.predict(site_shape(args, p["n"]), cfg, unit).stages
        probe = cm.predict(hardware.spa_probe_shape(p), hardware.spa_probe_config(p), unit).stages
        return t * sum(probe[s] for s in EFFICIENCY_STAGES) / sum(grid[s] for s in EFFICIENCY_STAGES)

    if "spa_s" not in raw and from_grid(sp) is not None:
        raw["spa_s"] = from_grid(sp)
        notes.append("the SPA probe emulated from the grid")
    if "spa_probes" not in raw:
        probes = {name: from_grid(p) for name, p in hardware.SPA_PROBES.items()}
        raw["spa_probes"] = {name: t for name, t in probes.items() if t is not None}
        missing = [name for name, t in probes.items() if t is None]
        notes.append(f"schema-3 SPA probes EMULATED from the grid's 32-head points at 32K "
                     f"({', '.join(raw['spa_probes'])}; scaled to 16 heads by the roofline ratio)"
                     + (f"; not emulable, left out: {', '.join(missing)}" if missing else ""))
    return raw, "; ".join(notes)


def base_profile(spec: str | None, card: str) -> HardwareProfile:
    """The profile the microbenchmark numbers are read against (its rates, prior efficiencies):
    the card's built-in, another built-in or superseded one by name, or a profile JSON."""
    if spec is None:
        return hardware.closest_builtin(card)
    if spec.lower() in hardware.BUILTIN_PROFILES:
        return hardware.builtin_profile(spec)
    if spec.lower() in hardware.SUPERSEDED_PROFILES:
        return hardware.SUPERSEDED_PROFILES[spec.lower()]
    return HardwareProfile.load(spec)


def offline(args) -> int:
    data = json.loads(Path(args.from_json).read_text())
    for key in SHAPE_ARGS:  # the measured shapes, not this command line's
        if key in data.get("args", {}):
            setattr(args, key, data["args"][key])
    env = data["environment"]
    builtin = base_profile(args.base_profile, env["card"])
    raw, how = emulated_microbenchmark(data, args)
    measured = hardware.profile_from_measurements(raw, builtin, env["card"], env.get("sm_count", builtin.sm_count),
                                                  data["measured_profile"].get("versions", {}))
    log(f"offline analysis of {args.from_json} ({env['card']}, {env['date'][:10]}) with the current code")
    log(f"built-in profile: {builtin.summary()}")
    log(f"microbenchmark profile ({how}): {measured.summary()}")
    profiles = [(f"base profile {builtin.name} (the prior of the microbenchmark fit)", builtin),
                ("microbenchmark, re-derived with the current code", measured)]
    analyses, refit_info, refit_profile = evaluate(data["points"], profiles, args, True, measured)
    for line in target_report(analyses):
        log(line)
    result = {"environment": env, "args": vars(args), "offline_from": str(args.from_json),
              "microbenchmark_source": how, "builtin_profile": builtin.to_dict(),
              "measured_profile": measured.to_dict(), "checks": data.get("checks", []), "points": data["points"],
              "analysis": analyses, "refit": refit_info}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = Path(args.from_json).stem + "_offline"
    (out / f"{stem}.json").write_text(json.dumps(_clean(result), indent=2, default=_json_default))
    (out / f"{stem}.md").write_text(markdown(result))
    if refit_profile is not None:
        refit_profile.save(out / f"{stem}_profile.json")
    log(f"wrote {out / stem}.json and .md")
    return 0


def main(argv=None) -> int:
    args = parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.from_json:
        return offline(args)
    if not torch.cuda.is_available():
        log("bench_cost_model needs a CUDA GPU")
        return 2
    device = torch.device("cuda", torch.cuda.current_device())
    env = environment(device)
    log(f"card: {env['card']} (sm {env['compute_capability']}, {env['sm_count']} SMs), torch {env['torch']}, "
        f"triton {env['triton']}, CUDA {env['cuda']}")
    builtin = hardware.closest_builtin(env["card"])
    result: dict[str, Any] = {"environment": env, "args": vars(args), "builtin_profile": builtin.to_dict()}
    stem = f"bench_cost_model_{hardware._slug(env['card'])}_{env['date'][:10]}"

    def save() -> None:
        (out / f"{stem}.json").write_text(json.dumps(_clean(result), indent=2, default=_json_default))

    measured = builtin
    if args.microbenchmark:
        t0 = time.perf_counter()
        try:
            measured = hardware.measure_profile(device)
            log(f"microbenchmark ({time.perf_counter() - t0:.1f} s): {measured.summary()}")
        except Exception:
            result["microbenchmark_error"] = traceback.format_exc()
            log("microbenchmark failed; using the built-in rates\n" + result["microbenchmark_error"])
    result["measured_profile"] = measured.to_dict()

    result["checks"] = check_outputs(args, device)
    for c in result["checks"]:
        log(f"check {'ok  ' if c['ok'] else 'FAIL'} {c['name']}"
            + (f": max err {c['max_err']:.2e} (tol {c['tol']:.0e})" if "max_err" in c else ""))
    save()
    if not all(c["ok"] for c in result["checks"]) and not args.skip_checks:
        log(f"output checks failed: no timing (see {out / stem}.json; --skip-checks times anyway)")
        return 1

    def partial(points):
        result["points"] = points
        save()

    result["points"] = measure_grid(args, device, partial)
    save()
    profiles = [("built-in, provisional", builtin)]
    if measured is not builtin:
        profiles.append(("microbenchmark: what device_profile='auto' uses", measured))
    analyses, refit_info, refit_profile = evaluate(result["points"], profiles, args, args.refit, measured)
    result["analysis"] = analyses
    result["refit"] = refit_info
    for line in target_report(analyses):
        log(line)
    if refit_profile is not None:
        path = refit_profile.save(out / f"profile_{hardware._slug(env['card'])}.json")
        snippet = {"name": builtin.name, **refit_info,
                   "sources": "refit by benchmarks/bench_cost_model.py on " + env["card"] + " " + env["date"][:10]}
        (out / f"builtin_refit_{builtin.name}.json").write_text(json.dumps(snippet, indent=2))
        log(f"refit profile: {path} (device_profile=\"{path}\"); built-in numbers: "
            f"{out / f'builtin_refit_{builtin.name}.json'}")
        if args.write_cache:
            props = torch.cuda.get_device_properties(device)
            key = hardware.cache_key(props.name, (props.major, props.minor), hardware.current_versions())
            refit_profile.save(hardware.cache_path(key))
            log(f"installed as this card's cached profile: {hardware.cache_path(key)}")
    save()
    md = markdown(result)
    (out / f"{stem}.md").write_text(md)
    if args.docs:
        update_docs(Path(args.docs), md)
        log(f"updated {args.docs}")
    log(f"wrote {out / stem}.json and .md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
