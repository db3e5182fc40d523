"""Where the selection stage's time goes, and which selection path is faster.

    PYTHONPATH=. python3 benchmarks/bench_selection.py --out $OUT/selection.json

For B=1, Hq=32, D=128, bf16, causal, block 64, density 0.2 and top-k 32, at each N and Hkv in {8, 32}:

* ``do_bench`` (CUDA events, L2 flushed: what ``bench_kernels.py`` reports; host-bound calls
  show their host time) and ``do_bench_cudagraph`` (the same calls replayed from a CUDA graph:
  GPU time alone) of: pool_q and pool_kv (also with 2 and 4 blocks a program), the group sum in torch (identity projector), the selection
  kernel on the summed queries for each path (stream, dense and wide where NKB allows; wide also with its search run all 32 steps), the selection
  kernel summing the group itself (``group=G``), with the score dot's key operand transposed or
  not (``keys_t``) at each precision, the same and the op forward in the ascending
  program order (``longest_first=False``, checked equal to the longest-first lists), the dense kernel's k-th search at 2 and 3 bits
  a step (``radix_bits``), the whole ``api.selection_stage`` and the
  whole op forward with each selection path, and both with ``block_score="hybrid"``; with
  ``--fine``, ``block_score="fine"`` (head selection) scored in PyTorch and by the Triton kernel,
  selection and op forward; with ``--stream-variants`` the streaming kernel at the launch
  shapes of ``STREAM_VARIANTS`` (checked against the default by rows differing); with
  ``--warps W ...`` each path again at W warps; ``--only REGEX`` keeps the matching stages;
* the CUDA kernels of one op forward (``torch.profiler``): name, count and device time.

Every selection path is checked against the streaming path's (index, count) before timing, with
fp32 scores (exactly comparable); the tensor-core scores ("tf32x3", the dense path's default) by
the number of rows that differ (near-ties).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from spa_compile import SPAConfig, spa_attention  # noqa: E402
from spa_compile.budget import max_selected  # noqa: E402
from spa_compile.codegen import api  # noqa: E402
from spa_compile.codegen.blockinfo import block_info  # noqa: E402
from spa_compile.codegen.pooling import FUSED_ENV, pool_kv, pool_q, pool_qkv  # noqa: E402
from spa_compile.codegen import selection, wide_selection  # noqa: E402
from spa_compile.codegen.selection import DENSE_MAX_NKB, ORDER_ENV, PATH_ENV, select  # noqa: E402
from spa_compile.codegen.wide_selection import WIDE_MAX_NKB  # noqa: E402
from spa_compile.visibility import Visibility  # noqa: E402


def timings(fn) -> dict[str, float]:
    """ms: do_bench median (events) and do_bench_cudagraph median (GPU only; None if capture fails)."""
    from triton.testing import do_bench, do_bench_cudagraph

    fn()
    torch.cuda.synchronize()
    out = {"events_ms": do_bench(fn, warmup=25, rep=200, return_mode="median")}
    try:
        out["graph_ms"] = do_bench_cudagraph(fn, rep=200, return_mode="median")
    except Exception as exc:  # noqa: BLE001 - recorded, the event time stands
        out["graph_ms"] = None
        out["graph_error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
    return out


def kernel_table(fn) -> list[dict]:
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    rows = []
    for e in prof.key_averages():
        if e.device_type == torch.autograd.DeviceType.CUDA:
            rows.append({"name": e.key[:80], "count": e.count, "device_us": e.device_time_total})
    return sorted(rows, key=lambda r: -r["device_us"])


def _with_attr(obj, name: str, value, fn):
    """fn() with obj.name set to value (module flags such as selection.DENSE_EARLY, read per launch)."""
    old = getattr(obj, name)
    setattr(obj, name, value)
    try:
        return fn()
    finally:
        setattr(obj, name, old)


def _with_env(var: str, value: str, fn):
    """fn() with $var set to value (the package reads $SPA_SELECT_PATH and $SPA_FINE_KERNEL per call)."""
    old = os.environ.get(var)
    os.environ[var] = value
    try:
        return fn()
    finally:
        if old is None:
            del os.environ[var]
        else:
            os.environ[var] = old


def fine_stages(q, k, v, vis, scale, cfg, g, checks) -> dict:
    """block_score "fine": its selection in PyTorch (the default) and with the Triton score
    (fine_score.fine_mass), checked against each other by the number of rows that differ
    (tf32x3 dots against fp32: near-ties), and the op forward with each."""
    from spa_compile.codegen.fine_selection import KERNEL_ENV, fine_selection

    fcfg = cfg.replace(block_score="fine", selection="head")
    torch_lists = fine_selection(q, k, vis, scale, fcfg, None, kernel=False)
    kern_lists = fine_selection(q, k, vis, scale, fcfg, None, kernel=True)
    checks["fine_kernel_rows_differing"] = (int((torch_lists[0] != kern_lists[0]).any(-1).sum())
                                            + int((torch_lists[1] != kern_lists[1]).sum()))

    def op_with(flag):
        return _with_env(KERNEL_ENV, flag, lambda: spa_attention(q, k, v, is_causal=True, enable_gqa=g > 1, config=fcfg))

    return {
        "fine_select_torch": lambda: fine_selection(q, k, vis, scale, fcfg, None, kernel=False),
        "fine_select_kernel": lambda: fine_selection(q, k, vis, scale, fcfg, None, kernel=True),
        "op_fwd_fine_torch": lambda: op_with("0"),
        "op_fwd_fine_kernel": lambda: op_with("1"),
    }


# --stream-variants: (name, selection.select's stream_config, score precision, warps); None keeps the launcher's
STREAM_VARIANTS = [
    ("base", None, None, None),
    ("no_interior", {"FAST": False}, None, None),  # every chunk classified
    ("prefix_counts", {"FAST": False, "HAS_KV": True}, None, None),  # the kernel before 2026-11-28 (session 8)
    ("w8", None, None, 8),
    ("bj64", {"BJ": 64}, None, None),
    ("tf32x3", None, "tf32x3", None),
    ("qb32_w8", {"QB": 32}, None, 8),  # 32 query blocks a program: each key chunk loaded for twice the rows
    ("rc32", {"RC": 32}, None, None),
    ("stages2", {"num_stages": 2}, None, None),
    ("stages3", {"num_stages": 3}, None, None),
]
# (name, dense_config, warps) of select(path="dense"): the tile orientation, rows a program, warps
DENSE_VARIANTS = [
    ("rowmajor", {"KM": False}, None),
    ("rowmajor_full_search", {"KM": False, "EARLY": False}, None),
    ("km_w16", {"KM": True}, 16),
    ("km_qb32_w16", {"KM": True, "QB": 32}, 16),
    ("km_w4", {"KM": True}, 4),
]
STREAM_STOPS = [("base_stop1", None, 1), ("base_stop2", None, 2)]


def one_point(n: int, hkv: int, cfg: SPAConfig, dev, warps=(), only=None, phases=(), fine=False,
              stream_variants=False, keep_paths=None) -> dict:
    hq, d, bs = 32, 128, cfg.block_size
    g = hq // hkv
    q = torch.randn(1, hq, n, d, device=dev, dtype=torch.bfloat16)
    k = torch.randn(1, hkv, n, d, device=dev, dtype=torch.bfloat16)
    v = torch.randn_like(k)
    vis = Visibility(n, n, causal=True)
    scale = d ** -0.5
    info = block_info(vis, 1, n, n, bs, dev)
    kmax = int(max_selected(n, n, vis, cfg))
    kbar, vbar, _, _ = pool_kv(k, v, info)
    qbar = pool_q(q, bs)
    qsum = qbar.unflatten(1, (hkv, g)).sum(dim=2)
    pt: dict = {"N": n, "Hkv": hkv, "nkb": info.nkb, "kmax": kmax}
    ref = select(qsum, kbar, info, scale, cfg, kmax, path="stream", precision="ieee")
    paths = ["stream"] + (["dense"] if info.nkb <= DENSE_MAX_NKB else []) + (["wide"] if info.nkb <= WIDE_MAX_NKB else [])
    if keep_paths:  # --paths: compare and time only these (each compiles its variants before timing)
        paths = [p for p in paths if p in keep_paths]
    checks = {}
    for path in paths:
        for grp in (1, g):
            got = select(qbar if grp > 1 else qsum, kbar, info, scale, cfg, kmax, group=grp, path=path, precision="ieee")
            # True, or the rows that differ: another fp32 summation order (the wide kernel's FMA
            # chain against the streaming kernel's broadcast products, KMAX > 128) reorders near-ties
            same = bool(torch.equal(got[1], ref[1]) and torch.equal(got[0], ref[0]))
            checks[f"{path}_group{grp}"] = True if same else (int((got[0] != ref[0]).any(-1).sum())
                                                             + int((got[1] != ref[1]).sum()))
    pt["selection_equal_to_stream"] = checks
    hcfg = cfg.replace(block_score="hybrid")
    hyb = api.selection_stage(q, kbar, info, scale, hcfg, None, kmax, k)
    pt["hybrid_same_counts"] = bool(torch.equal(hyb[1], ref[1]))  # same budget as the projector's top-k
    stages = {
        "pool_q": lambda: pool_q(q, bs),
        "pool_kv": lambda: pool_kv(k, v, info),
        "group_sum_torch": lambda: qbar.unflatten(1, (hkv, g)).sum(dim=2),
        "selection_stage": lambda: api.selection_stage(q, kbar, info, scale, cfg, None, kmax),
        # block_score "hybrid": the projector pass at ceil(k/2), key ranges and the bound pass
        "selection_stage_hybrid": lambda: api.selection_stage(q, kbar, info, scale, hcfg, None, kmax, k),
        "op_fwd_hybrid": lambda: spa_attention(q, k, v, is_causal=True, enable_gqa=g > 1, config=hcfg),
    }
    for nbp in (1, 2, 4, 8):  # pooling programs of NBP blocks (pool_q/pool_kv: 8 without invalid keys)
        stages[f"pool_q_nbp{nbp}"] = lambda nbp=nbp: pool_q(q, bs, blocks_per_program=nbp)
        stages[f"pool_kv_nbp{nbp}"] = lambda nbp=nbp: pool_kv(k, v, info, blocks_per_program=nbp)
    for nbp in (4, 8):
        stages[f"pool_k_nbp{nbp}"] = lambda nbp=nbp: pool_kv(k, v, info, blocks_per_program=nbp, values=False)
    for nbp, w in ((4, 8), (8, 8), (2, 8)):  # the same at other warp counts
        stages[f"pool_q_nbp{nbp}_w{w}"] = lambda nbp=nbp, w=w: pool_q(q, bs, blocks_per_program=nbp, num_warps=w)
        stages[f"pool_k_nbp{nbp}_w{w}"] = lambda nbp=nbp, w=w: pool_kv(k, v, info, blocks_per_program=nbp,
                                                                      values=False, num_warps=w)
    stages["pool_k"] = lambda: pool_kv(k, v, info, values=False)  # the key means alone: the selection's part
    # what bench_kernels.py times as the selection's share: the key means, then pool q, project, select
    def share():
        qb_, kb_ = api.pool_means(q, k, v, info, cfg, values=False)[:2]
        return api.selection_stage(q, kb_, info, scale, cfg, None, kmax, qbar=qb_)
    stages["selection_share_stage"] = share
    # the query and key (and value) means in one launch (pooling.pool_qkv, the default), and the
    # share and the op with the two launches (SPA_POOL_FUSED=0) for comparison
    stages["pool_qk_fused"] = lambda: pool_qkv(q, k, v, info, values=False)
    stages["pool_qkv_fused"] = lambda: pool_qkv(q, k, v, info)
    stages["selection_share_stage_pools_apart"] = lambda: _with_env(FUSED_ENV, "0", share)
    stages["op_fwd_pools_apart"] = lambda: _with_env(
        FUSED_ENV, "0", lambda: spa_attention(q, k, v, is_causal=True, enable_gqa=g > 1, config=cfg))
    for path in paths:
        stages[f"op_fwd_{path}"] = lambda path=path: _with_env(
            PATH_ENV, path, lambda: spa_attention(q, k, v, is_causal=True, enable_gqa=g > 1, config=cfg))
    if "dense" in paths:  # the dense kernel's k-th search, 2 and 3 bits a step (1 is select_dense)
        for rb in (2, 3):
            got = select(qsum, kbar, info, scale, cfg, kmax, path="dense", radix_bits=rb, precision="ieee")
            checks[f"dense_radix{rb}"] = bool(torch.equal(got[1], ref[1]) and torch.equal(got[0], ref[0]))
            stages[f"select_dense_radix{rb}"] = lambda rb=rb: select(qsum, kbar, info, scale, cfg, kmax, path="dense",
                                                                   radix_bits=rb)
    for path in paths:
        stages[f"select_{path}"] = lambda path=path: select(qsum, kbar, info, scale, cfg, kmax, path=path)
        if g > 1:
            stages[f"select_{path}_group_in_kernel"] = lambda path=path: select(qbar, kbar, info, scale, cfg, kmax,
                                                                                 group=g, path=path)
    for path in paths:  # program order: query blocks ascending, one head after the other (before LPT)
        got = select(qbar, kbar, info, scale, cfg, kmax, group=g, path=path, longest_first=False)
        lpt = select(qbar, kbar, info, scale, cfg, kmax, group=g, path=path, longest_first=True)
        checks[f"{path}_ascending_order_equal"] = bool(torch.equal(got[0], lpt[0]) and torch.equal(got[1], lpt[1]))
        stages[f"select_{path}_group_in_kernel_ascending"] = lambda path=path: select(
            qbar, kbar, info, scale, cfg, kmax, group=g, path=path, longest_first=False)
        stages[f"op_fwd_{path}_ascending"] = lambda path=path: _with_env(
            ORDER_ENV, "0", lambda: _with_env(
                PATH_ENV, path, lambda: spa_attention(q, k, v, is_causal=True, enable_gqa=g > 1, config=cfg)))
    for path in paths:  # the score dot on tensor cores (three tf32 products): same lists up to near-ties
        got = select(qsum, kbar, info, scale, cfg, kmax, path=path, precision="tf32x3")
        checks[f"{path}_tf32x3_rows_differing"] = int((got[0] != ref[0]).any(-1).sum()) + int((got[1] != ref[1]).sum())
        stages[f"select_{path}_tf32x3"] = lambda path=path: select(qsum, kbar, info, scale, cfg, kmax, path=path,
                                                                   precision="tf32x3")
        for w in warps:
            stages[f"select_{path}_tf32x3_w{w}"] = lambda path=path, w=w: select(
                qsum, kbar, info, scale, cfg, kmax, path=path, precision="tf32x3", num_warps=w)
    for path in [p for p in paths if p != "wide"]:  # the score dot's key operand transposed (KT) or not, as the op calls
        for kt in (False, True):
            for prec in ("ieee", "tf32x3"):
                got = select(qbar, kbar, info, scale, cfg, kmax, group=g, path=path, precision=prec, keys_t=kt)
                if prec == "ieee":
                    checks[f"{path}_kt{int(kt)}_equal"] = bool(torch.equal(got[1], ref[1]) and torch.equal(got[0], ref[0]))
                else:
                    checks[f"{path}_kt{int(kt)}_tf32x3_rows_differing"] = (int((got[0] != ref[0]).any(-1).sum())
                                                                          + int((got[1] != ref[1]).sum()))
                stages[f"select_{path}_group_in_kernel_{prec}_kt{int(kt)}"] = (
                    lambda path=path, kt=kt, prec=prec: select(qbar, kbar, info, scale, cfg, kmax, group=g, path=path,
                                                               precision=prec, keys_t=kt))
    for w in warps:  # the same kernels at other warp counts (selection.select(num_warps=))
        for path in paths:
            got = select(qsum, kbar, info, scale, cfg, kmax, path=path, num_warps=w, precision="ieee")
            checks[f"{path}_w{w}"] = bool(torch.equal(got[1], ref[1]) and torch.equal(got[0], ref[0]))
            stages[f"select_{path}_w{w}"] = lambda path=path, w=w: select(qsum, kbar, info, scale, cfg, kmax,
                                                                          path=path, num_warps=w)
        for path in paths:  # where a program's time goes: the kernel cut after each phase
            for stop in phases if path == "dense" else [1] if phases else []:
                stages[f"select_{path}_w{w}_stop{stop}"] = lambda path=path, w=w, stop=stop: select(
                    qsum, kbar, info, scale, cfg, kmax, path=path, num_warps=w, stop=stop)
    if "dense" in paths:  # the k-th search run all 32 steps, ties always by prefix count (DENSE_EARLY False)
        def dense_full(prec=None):
            return select(qbar, kbar, info, scale, cfg, kmax, group=g, path="dense", precision=prec,
                          dense_config={"EARLY": False})
        for prec in ("ieee", None):
            got, early = dense_full(prec), select(qbar, kbar, info, scale, cfg, kmax, group=g, path="dense", precision=prec)
            checks[f"dense_full_search_equal_{prec or 'default'}"] = bool(torch.equal(got[0], early[0])
                                                                          and torch.equal(got[1], early[1]))
        stages["select_dense_group_in_kernel_full_search"] = dense_full
        for name, dc, w in DENSE_VARIANTS:  # launch shapes of the dense kernel, checked against the default
            def run_dense(dc=dc, w=w):
                return select(qbar, kbar, info, scale, cfg, kmax, group=g, path="dense", dense_config=dc, num_warps=w)
            got, want = run_dense(), select(qbar, kbar, info, scale, cfg, kmax, group=g, path="dense")
            checks[f"dense_{name}_equal"] = bool(torch.equal(got[0], want[0]) and torch.equal(got[1], want[1]))
            stages[f"select_dense_{name}"] = run_dense
        stages["selection_share_stage_full_search"] = lambda: _with_attr(
            selection, "DENSE_EARLY", False, stages["selection_share_stage"])
    if stream_variants and "dense" in paths:  # the causal column tiers against one full-width launch
        for t in (1, 2):
            got = select(qbar, kbar, info, scale, cfg, kmax, group=g, path="dense", tiers=t)
            ref_d = select(qbar, kbar, info, scale, cfg, kmax, group=g, path="dense")
            checks[f"dense_tiers{t}_equal"] = bool(torch.equal(got[0], ref_d[0]) and torch.equal(got[1], ref_d[1]))
            stages[f"select_dense_tiers{t}"] = lambda t=t: select(qbar, kbar, info, scale, cfg, kmax, group=g,
                                                                  path="dense", tiers=t)
        stages["select_dense_group_in_kernel_w16"] = lambda: select(qbar, kbar, info, scale, cfg, kmax, group=g,
                                                                    path="dense", num_warps=16)
    if stream_variants:  # the streaming kernel's launch shapes (as the op calls it at 128K; at 16K against dense)
        for name, sc, prec, w in STREAM_VARIANTS:
            if only is not None and not re.search(only, f"select_stream_{name}"):
                continue  # each variant compiles for ~30 s: build only those --only keeps
            def run(sc=sc, prec=prec, w=w):
                return select(qbar, kbar, info, scale, cfg, kmax, group=g, path="stream", stream_config=sc,
                              precision=prec, num_warps=w)
            got = run()
            checks[f"stream_{name}_rows_differing"] = (int((got[0] != ref[0]).any(-1).sum())
                                                       + int((got[1] != ref[1]).sum()))
            stages[f"select_stream_{name}"] = run
        for name, sc, stop in STREAM_STOPS:  # where the walk's time goes (no valid lists)
            stages[f"select_stream_{name}"] = lambda sc=sc, stop=stop: select(
                qbar, kbar, info, scale, cfg, kmax, group=g, path="stream", stream_config=sc, stop=stop)
    if "wide" in paths:  # the wide kernel's search run all 32 steps (wide_selection.WIDE_EARLY False)
        def full_search():
            wide_selection.WIDE_EARLY = False
            try:
                return select(qbar, kbar, info, scale, cfg, kmax, group=g, path="wide")
            finally:
                wide_selection.WIDE_EARLY = True
        got = full_search()
        early = select(qbar, kbar, info, scale, cfg, kmax, group=g, path="wide")
        checks["wide_full_search_equal"] = bool(torch.equal(got[0], early[0]) and torch.equal(got[1], early[1]))
        stages["select_wide_group_in_kernel_full_search"] = full_search
    if fine:  # block_score "fine" with head selection (its accuracy setting), PyTorch and Triton scores
        stages.update(fine_stages(q, k, v, vis, scale, cfg, g, checks))
    op_stage = f"op_fwd_{paths[-1]}"
    if only is not None:
        stages = {name: fn for name, fn in stages.items() if re.search(only, name) or name == op_stage}
    pt["times"] = {name: timings(fn) for name, fn in stages.items()}
    pt["op_kernels"] = kernel_table(stages[op_stage])
    return pt


def main(argv=None) -> int:
    import triton

    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", required=True)
    ap.add_argument("--ns", type=int, nargs="+", default=[16384, 131072])
    ap.add_argument("--hkvs", type=int, nargs="+", default=[8, 32])
    ap.add_argument("--modes", nargs="+", default=["density0.2", "topk32"])
    ap.add_argument("--warps", type=int, nargs="*", default=[], help="also time each path at these warp counts")
    ap.add_argument("--phases", type=int, nargs="*", default=[],
                    help="with --warps: also the dense kernel cut after phase 1 (classify), 2 (scores), 3 (k-th), "
                         "and the streaming kernel without merges")
    ap.add_argument("--only", default=None, help="time only the stages matching this regex (and the op)")
    ap.add_argument("--fine", action="store_true",
                    help="also block_score 'fine' (head selection): its selection in PyTorch and with the Triton "
                         "score, and the op forward with each")
    ap.add_argument("--paths", nargs="*", default=None, help="only these selection paths (stream, dense, wide); "
                    "the streaming kernel's lists stay the reference")
    ap.add_argument("--stream-variants", action="store_true",
                    help="also the streaming kernel at other launch shapes (STREAM_VARIANTS), where NKB takes it")
    args = ap.parse_args(argv)
    dev = torch.device("cuda")
    result = {"card": torch.cuda.get_device_name(0), "torch": torch.__version__, "triton": triton.__version__,
              "cuda": torch.version.cuda, "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "points": []}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    for n in args.ns:
        for hkv in args.hkvs:
            for mode in args.modes:
                cfg = SPAConfig(mode="spa", density=0.2) if mode == "density0.2" else SPAConfig(mode="spa", topk=32)
                t0 = time.perf_counter()
                try:
                    pt = one_point(n, hkv, cfg, dev, args.warps, args.only, args.phases, args.fine,
                                   args.stream_variants, args.paths)
                except Exception as exc:  # noqa: BLE001 - record and go on
                    pt = {"N": n, "Hkv": hkv, "error": f"{type(exc).__name__}: {exc}"[:500]}
                pt["mode"] = mode
                pt["wall_s"] = round(time.perf_counter() - t0, 1)
                result["points"].append(pt)
                out.write_text(json.dumps(result, indent=1))
                times = pt.get("times", {})
                print(f"N={n} Hkv={hkv} {mode} [{pt['wall_s']} s] " + "  ".join(
                    f"{k} {t['events_ms']:.3f}/{t['graph_ms'] if t['graph_ms'] is None else round(t['graph_ms'], 3)}"
                    for k, t in times.items()) + f"  equal {pt.get('selection_equal_to_stream')}", flush=True)
                for r in pt.get("op_kernels", [])[:8]:
                    print(f"    {r['device_us']:9.1f} us  x{r['count']}  {r['name']}", flush=True)
                torch.cuda.empty_cache()
    return 0


if __name__ == "__main__":
    sys.exit(main())
