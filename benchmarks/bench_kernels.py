"""Time the SPA Triton kernels against SDPA (flash, cuDNN) and FlexAttention on one card.

    PYTHONPATH=. python3 benchmarks/bench_kernels.py --out benchmarks/results [--docs docs/benchmarks.md]
        [--ns 4096 8192 ...] [--hkv 8 32] [--budget-s 480]

For B=1, Hq=32, Hkv in {8, 32}, D=128, bf16, causal, N in {4K .. 128K}, at density 0.2 and at
a fixed top-k of 32 blocks, forward and forward+backward, with the peak memory of each:

* ``sdpa_flash`` / ``sdpa_cudnn``: dense SDPA with one backend forced;
* ``flex``: FlexAttention (torch.compile'd) given exactly the selected block set as a BlockMask
  (diagonal blocks as partial blocks with the causal mask_mod, the others as full blocks);
* ``spa_sparse``: the SPA sparse kernel alone on the same blocks (no fill, as Flex);
* ``spa_op``: the whole SPA op through ``spa_compile.spa_attention`` (pool, project, select,
  sparse, fill), falling back to a direct ``codegen`` autograd wrapper when the op is unusable;
* ``spa_select``: pooling + projector + selection alone (its share of the whole op).

Times are medians of CUDA-event-timed runs with the L2 flushed before each (as
``triton.testing.do_bench``, but a call over 100 ms is run 3 times, not 8+, and the peak-memory
call is one of them), after a warm-up call, on fresh random inputs (never zeros); every
method's output is checked before it is timed (flash vs cuDNN, sparse vs
Flex on the same blocks, the op vs the pure-PyTorch reference up to 8K, gradients at the
smallest N). The sparse and Flex forwards are then timed again in ``--interleave`` rounds
that alternate them, each after an idle pause (``interleaved``: the same card state for both, the
SM clock, power and temperature recorded before each round), a second figure for the 1.3x target beside the
back-to-back one. Results go to ``<out>/<card>-<date>.json`` after every measurement (a time budget
stops starting new points; a timeout loses at most the measurement in flight) and a table is printed; ``--docs`` writes docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import platform
import time
import traceback
from pathlib import Path

import torch
import torch.nn.functional as F
import triton

from spa_compile import SPAConfig, Visibility
from spa_compile import reference as R
from spa_compile.budget import max_selected
from spa_compile.codegen import api
from spa_compile.codegen.blockinfo import block_info
from spa_compile.codegen.fine_selection import fine_selection
from spa_compile.codegen.pooling import pool_fused

MB = 1 << 20
DOCS_BEGIN = "<!-- bench_kernels:begin -->"
DOCS_END = "<!-- bench_kernels:end -->"


def log(*a):
    print(*a, flush=True)


def rel(a, b):
    a, b = a.float(), b.float()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


# ---------------------------------------------------------------------------------------
# methods
# ---------------------------------------------------------------------------------------


def sdpa(backend):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    be = {"flash": SDPBackend.FLASH_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION}[backend]

    def run(q, k, v):
        with sdpa_kernel(be):
            try:
                return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=k.shape[1] != q.shape[1])
            except RuntimeError:
                g = q.shape[1] // k.shape[1]
                return F.scaled_dot_product_attention(
                    q, k.repeat_interleave(g, 1), v.repeat_interleave(g, 1), is_causal=True)

    return run


_FLEX = {}


def _patch_flex_backward_configs(block: int) -> None:
    """FlexAttention's default sm90 backward tile for D=128 is (64, 128, 128, 64), which does not
    divide 64-key blocks, and Flex then finds no kernel. Offer Flex's own (64, 64, 64, 64) tile
    (its choice on sm8x and for small heads) when no default fits the block size."""
    from torch._inductor import choices
    from torch._inductor.template_heuristics.triton import FlexBwDConfig

    if getattr(choices.InductorChoices, "_spa_patched", False):
        return
    orig = choices.InductorChoices.get_flex_attention_bwd_configs

    def patched(self, head_dim, dtype, *args, **kwargs):
        confs = list(orig(self, head_dim, dtype, *args, **kwargs))
        fits = [c for c in confs if all(block % x == 0 for x in (c.block_m1, c.block_n1, c.block_m2, c.block_n2))]
        if not fits:
            confs.append(FlexBwDConfig(64, 64, 64, 64, 3, 4))
        return confs

    choices.InductorChoices.get_flex_attention_bwd_configs = patched
    choices.InductorChoices._spa_patched = True


def flex_fn():
    if "fn" not in _FLEX:
        try:
            _patch_flex_backward_configs(64)
        except Exception as e:  # noqa: BLE001
            log(f"could not patch Flex backward configs: {type(e).__name__}: {e}")
        from torch.nn.attention.flex_attention import flex_attention

        _FLEX["fn"] = torch.compile(flex_attention, dynamic=True)
    return _FLEX["fn"]


def flex_block_mask(index, count, hq, n, bs):
    """The selected blocks as a BlockMask: diagonal (partially visible) blocks get the causal
    mask_mod, the others are full blocks."""
    from torch.nn.attention.flex_attention import BlockMask

    b, hs, nqb, kmax = index.shape
    nkb = -(-n // bs)
    g = hq // hs
    idx = index.repeat_interleave(g, dim=1).long()
    cnt = count.repeat_interleave(g, dim=1)
    slot = torch.arange(kmax, device=index.device)
    ok = slot < cnt[..., None]
    i = torch.arange(nqb, device=index.device)[:, None]
    partial = ok & (idx * bs + bs - 1 > i * bs)
    full = ok & ~partial

    def pack(sel):
        key = torch.where(sel, idx, torch.full_like(idx, nkb + 1))
        srt = key.sort(dim=-1).values
        num = sel.sum(-1).to(torch.int32)
        srt = torch.where(srt > nkb, torch.zeros_like(srt), srt).to(torch.int32)
        out = torch.zeros(b, hq, nqb, nkb, dtype=torch.int32, device=index.device)
        w = min(kmax, nkb)
        out[..., :w] = srt[..., :w]
        return num, out

    pn, pi = pack(partial)
    fn, fi = pack(full)

    def causal(b_, h_, q_idx, kv_idx):
        return q_idx >= kv_idx

    return BlockMask.from_kv_blocks(pn, pi, fn, fi, BLOCK_SIZE=bs, mask_mod=causal, seq_lengths=(n, n))


def flex_run(block_mask):
    fn = flex_fn()
    opts = {"BLOCK_M": 64, "BLOCK_N": 64, "num_warps": 4, "num_stages": 3}

    def run(q, k, v):
        return fn(q, k, v, block_mask=block_mask, enable_gqa=k.shape[1] != q.shape[1], kernel_options=opts)

    return run


class _SparseOnly(torch.autograd.Function):
    """The sparse kernel alone (no fill) on a fixed selection, forward and backward."""

    @staticmethod
    def forward(ctx, q, k, v, index, count, vis, scale, cfg):
        info = block_info(vis, q.shape[0], q.shape[2], k.shape[2], cfg.block_size, q.device)
        out, lse = api.sparse_stage(q, k, v, None, None, info, index, count, scale, False)
        ctx.save_for_backward(q, k, v, out, lse, index, count)
        ctx.args = (vis, scale, cfg)
        return out

    @staticmethod
    def backward(ctx, go):
        q, k, v, out, lse, index, count = ctx.saved_tensors
        vis, scale, cfg = ctx.args
        dq, dk, dv = api.spa_backward(go.contiguous(), q, k, v, out, lse, index, count, vis, scale, cfg)
        return dq, dk, dv, None, None, None, None, None


class _WholeOp(torch.autograd.Function):
    """codegen.spa_forward / spa_backward as one autograd function (fallback for the op)."""

    @staticmethod
    def forward(ctx, q, k, v, vis, scale, cfg):
        out, lse, index, count = api.spa_forward(q, k, v, vis, scale, cfg, None)
        ctx.save_for_backward(q, k, v, out, lse, index, count)
        ctx.args = (vis, scale, cfg)
        return out

    @staticmethod
    def backward(ctx, go):
        q, k, v, out, lse, index, count = ctx.saved_tensors
        vis, scale, cfg = ctx.args
        dq, dk, dv = api.spa_backward(go.contiguous(), q, k, v, out, lse, index, count, vis, scale, cfg)
        return dq, dk, dv, None, None, None


def whole_op(cfg, n, mode):
    vis = Visibility(n, n, causal=True)
    if mode == "op":
        import spa_compile

        def run(q, k, v):
            return spa_compile.spa_attention(q, k, v, is_causal=True, enable_gqa=k.shape[1] != q.shape[1], config=cfg)
    else:
        def run(q, k, v):
            return _WholeOp.apply(q, k, v, vis, q.shape[-1] ** -0.5, cfg)
    return run


# ---------------------------------------------------------------------------------------
# measurement
# ---------------------------------------------------------------------------------------


_FLUSH = {}


def graph_ms(call):
    """Median ms of ``call`` replayed from a CUDA graph (``do_bench_cudagraph``): GPU time without
    host launch gaps; None where capture fails (recorded, the event time stands)."""
    from triton.testing import do_bench_cudagraph

    try:
        return do_bench_cudagraph(call, rep=100, return_mode="median")
    except Exception as e:  # noqa: BLE001
        log(f"CUDA graph capture failed: {type(e).__name__}: {str(e)[:200]}")
        return None


def timed_runs(call, rep_ms, min_reps=3, max_reps=100, before=None):
    """Median ms of ``call`` over CUDA-event-timed runs (L2 flushed before each, as do_bench):
    as many runs as fit in ``rep_ms`` judged by the first, at least ``min_reps``. The first run
    is timed too (callers warm up before), so a 1 s call costs ``min_reps`` runs, not the 8+
    of do_bench's estimate-then-repeat. After the first, the runs are queued back to back with
    one synchronize at the end (as do_bench does): a synchronize per run would leave the GPU idle
    while the host launches the next call, and a short call's host time would be counted."""
    if "buf" not in _FLUSH:
        _FLUSH["buf"] = torch.empty(256 * MB // 4, dtype=torch.int32, device="cuda")

    def one():
        if before is not None:
            before()
        _FLUSH["buf"].zero_()
        s_, e_ = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s_.record()
        call()
        e_.record()
        return s_, e_

    s_, e_ = one()
    e_.synchronize()
    times = [s_.elapsed_time(e_)]
    n = int(min(max_reps, max(min_reps, rep_ms / max(times[0], 1e-3))))
    events = [one() for _ in range(n - 1)]
    torch.cuda.synchronize()
    times += [s.elapsed_time(e) for s, e in events]
    times.sort()
    return times[len(times) // 2]


def card_state():
    """SM clock (MHz), power (W) and temperature (C) of the card now, through NVML (torch.cuda's
    wrappers); {} where NVML is missing. Recorded around the interleaved rounds: a clock that
    drops under sustained load shows there."""
    st = {}
    for name, fn in (("sm_mhz", "clock_rate"), ("power_w", "power_draw"), ("temp_c", "temperature")):
        try:
            val = getattr(torch.cuda, fn)()
            st[name] = round(val / 1000.0, 1) if name == "power_w" else val  # power_draw: mW
        except Exception:  # noqa: BLE001 - no NVML: no record
            pass
    return st


def interleaved(calls: dict, rounds: int, rep_ms: float, cooldown_s: float = 0.0, timer=None):
    """Median ms of each call over ``rounds`` rounds that time every call in turn (the order
    rotating each round), ``timer(call, rep_ms)`` each (default ``timed_runs``; bench_forward_configs
    passes do_bench), after ``cooldown_s`` of idle card: the calls start
    from the same card state (clock, power, temperature). Without the pause a call timed right
    after the sparse kernel ran about 10% slower than after itself (H200 at its 700 W cap, run
    60), which back-to-back measurements of one call and then the other carry into the ratio.
    Returns {name: median of the round medians}, the per-round figures and the card state before
    each round."""
    timer = timer or timed_runs
    names = list(calls)
    per = {nm: [] for nm in names}
    states = []
    for r in range(rounds):
        states.append(card_state())
        for nm in names[r % len(names):] + names[:r % len(names)]:
            if cooldown_s > 0:
                torch.cuda.synchronize()
                time.sleep(cooldown_s)
            per[nm].append(timer(calls[nm], rep_ms))
    med = {nm: sorted(v)[len(v) // 2] for nm, v in per.items()}
    return med, per, states


def measure(fn, q, k, v, backward, reps_ms=100):
    """(median ms, peak MB incl. inputs, extra MB) of fn, forward or forward+backward.

    One untimed warm-up call (compilation, autotuning, caches), then one call whose peak
    memory is read, then the timed runs; the peak-memory call doubles as the first timed run
    for calls over 100 ms (long dense runs: one call less)."""
    xs = [q, k, v]
    if backward:
        g = torch.randn_like(fn(q, k, v))

        def call():
            out = fn(q, k, v)
            out.backward(g)
    else:
        def call():
            with torch.no_grad():
                fn(q, k, v)

    def clear():
        for x in xs:
            x.grad = None

    call()
    torch.cuda.synchronize()
    clear()
    gc.collect()
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    s_, e_ = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    s_.record()
    call()
    e_.record()
    e_.synchronize()
    peak = torch.cuda.max_memory_allocated()
    first = s_.elapsed_time(e_)
    clear()
    inputs = sum(x.numel() * x.element_size() for x in xs)
    if first > 100.0:  # long dense runs: keep the measured call, add two more (median of 3)
        ms = sorted([first] + [timed_runs(call, 0, 1, 1, before=clear) for _ in range(2)])[1]
    else:
        ms = timed_runs(call, reps_ms, before=clear)
    clear()
    return ms, (peak - base + inputs) / MB, (peak - base) / MB


def fresh_inputs(hq, hkv, n, d, dtype, seed, grad):
    torch.manual_seed(seed)
    q = torch.randn(1, hq, n, d, device="cuda", dtype=dtype, requires_grad=grad)
    k = torch.randn(1, hkv, n, d, device="cuda", dtype=dtype, requires_grad=grad)
    v = torch.randn(1, hkv, n, d, device="cuda", dtype=dtype, requires_grad=grad)
    return q, k, v


# ---------------------------------------------------------------------------------------
# main loop
# ---------------------------------------------------------------------------------------


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="benchmarks/results")
    p.add_argument("--ns", type=int, nargs="+", default=[4096 << i for i in range(6)])
    p.add_argument("--hkv", type=int, nargs="+", default=[8, 32])
    p.add_argument("--hq", type=int, default=32)
    p.add_argument("--d", type=int, default=128)
    p.add_argument("--modes", nargs="+", default=["density0.2", "topk32"])
    p.add_argument("--budget-s", type=float, default=1e9, help="stop starting new points after this many seconds")
    p.add_argument("--priority", nargs="*", default=["16384:density0.2", "131072:topk32"],
                   help="N:mode points run first, both Hkv (the issue's key points); the rest by N")
    p.add_argument("--docs", default=None, help="write the results section of this markdown file")
    p.add_argument("--no-flex", action="store_true")
    p.add_argument("--no-backward", action="store_true")
    p.add_argument("--rep-ms", type=int, default=100, help="timed runs per measurement: as many as fit (3 at least)")
    p.add_argument("--interleave", type=int, default=6,
                   help="rounds of the sparse-vs-Flex forward timed in turn (0: off); see interleaved()")
    p.add_argument("--cooldown-ms", type=int, default=500,
                   help="idle card before each of the interleaved measurements (ms)")
    p.add_argument("--from-json", default=None, help="render the table/targets/docs of an earlier run's JSON")
    p.add_argument("--selection", choices=["group", "head"], default="group",
                   help="SPAConfig.selection of every SPA run (the issue's targets are for 'group')")
    p.add_argument("--block-score", choices=["projector", "hybrid", "bound", "fine"], default="projector",
                   help="SPAConfig.block_score of every SPA run (the issue's targets are for 'projector'; "
                        "'fine' selects in PyTorch, codegen/fine_selection.py)")
    return p.parse_args(argv)


def mode_config(mode):
    if mode.startswith("density"):
        return SPAConfig(mode="spa", density=float(mode[len("density"):]))
    return SPAConfig(mode="spa", topk=int(mode[len("topk"):]))


def card_info():
    props = torch.cuda.get_device_properties(0)
    return {
        "card": torch.cuda.get_device_name(0),
        "sm_count": props.multi_processor_count,
        "memory_gb": round(props.total_memory / 1e9, 1),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version(),
        "python": platform.python_version(),
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
    }


def main(argv=None):
    a = parse_args(argv)
    if a.from_json:
        result = json.loads(Path(a.from_json).read_text())
        result["targets"] = evaluate_targets(result)
        table = format_table(result)
        print(table)
        if a.docs:
            write_docs(Path(a.docs), result, table, Path(a.from_json))
        return
    t_start = time.time()
    info = card_info()
    log(json.dumps(info))
    out_dir = Path(a.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d")
    path = out_dir / f"{info['card'].replace(' ', '_')}-{stamp}.json"
    result = {"info": info, "setup": {"B": 1, "Hq": a.hq, "D": a.d, "dtype": "bfloat16", "causal": True,
                                      "block_size": 64, "selection": a.selection, "block_score": a.block_score,
                                      "pool_fused": pool_fused(),
                                      "timing": "median ms of CUDA-event-timed runs, L2 flushed before each (3 runs for calls over 100 ms)"},
              "points": [], "checks": [], "errors": []}
    dtype = torch.bfloat16
    op_mode = "op"

    def save():
        result["elapsed_s"] = round(time.time() - t_start, 1)
        path.write_text(json.dumps(result, indent=1))

    # the order: priority points first (both Hkv), then everything else by N
    points = [(hkv, n, m) for n in a.ns for m in a.modes for hkv in a.hkv]
    prio = []
    for p in a.priority:
        n, m = p.split(":")
        prio += [x for x in points if x[1] == int(n) and x[2] == m]
    order = prio + [p for p in points if p not in prio]
    dense_cache = {}

    for hkv, n, mode in order:
        if time.time() - t_start > a.budget_s:
            log(f"time budget reached: skipping Hkv={hkv} N={n} {mode}")
            result["errors"].append(f"skipped (budget) Hkv={hkv} N={n} {mode}")
            continue
        cfg = mode_config(mode).replace(selection=a.selection, block_score=a.block_score)
        seed = hash((hkv, n, mode)) % 1000
        pt = {"Hkv": hkv, "N": n, "mode": mode}
        result["points"].append(pt)  # saved as it fills: a timeout keeps what was measured
        t_pt = time.time()
        try:
            run_point(a, pt, hkv, n, cfg, dtype, seed, dense_cache, result, op_mode, save)
            op_mode = pt.get("op_mode", op_mode)
        except Exception as e:  # noqa: BLE001 - record and go on
            traceback.print_exc()
            result["errors"].append(f"Hkv={hkv} N={n} {mode}: {type(e).__name__}: {str(e)[:400]}")
        pt["point_s"] = round(time.time() - t_pt, 1)
        save()
        gc.collect()
        torch.cuda.empty_cache()
    targets = evaluate_targets(result)
    result["targets"] = targets
    save()
    table = format_table(result)
    log(table)
    if a.docs:
        write_docs(Path(a.docs), result, table, path)
    log(f"wrote {path}")


def run_point(a, pt, hkv, n, cfg, dtype, seed, dense_cache, result, op_mode, save=lambda: None):
    hq, d = a.hq, a.d
    scale = d**-0.5
    vis = Visibility(n, n, causal=True)
    log(f"--- Hkv={hkv} N={n} {pt['mode']}")
    q, k, v = fresh_inputs(hq, hkv, n, d, dtype, seed, grad=True)
    qd, kd, vd = q.detach(), k.detach(), v.detach()
    # dense baselines (independent of the SPA mode: measured once per (Hkv, N))
    key = (hkv, n)
    if key not in dense_cache:
        dense = {}
        o_flash = sdpa("flash")(qd, kd, vd)
        o_cudnn = sdpa("cudnn")(qd, kd, vd)
        err = rel(o_cudnn, o_flash)
        result["checks"].append({"Hkv": hkv, "N": n, "check": "sdpa cudnn vs flash", "rel_err": err})
        assert err < 2e-2, f"cuDNN and flash SDPA disagree: {err}"
        del o_flash, o_cudnn
        for name in ("flash", "cudnn"):
            fn = sdpa(name)
            for tag, bwd in (("fwd", False), ("fwdbwd", True)):
                if bwd and a.no_backward:
                    continue
                dense[f"sdpa_{name}_{tag}"] = measure(fn, q, k, v, bwd, a.rep_ms)
                ms, peak, extra = dense[f"sdpa_{name}_{tag}"]
                pt[f"sdpa_{name}_{tag}"] = {"ms": ms, "peak_mb": peak, "extra_mb": extra}
                save()
        dense_cache[key] = dense
    for name, (ms, peak, extra) in dense_cache[key].items():
        pt[name] = {"ms": ms, "peak_mb": peak, "extra_mb": extra}

    # SPA: the selection the whole op makes
    out, lse, index, count = api.spa_forward(qd, kd, vd, vis, scale, cfg, None)
    g = hq // hkv
    blocks = int(count.sum()) * g  # computed (query block, head, key block) tiles
    pt["blocks_per_qblock"] = float(count.float().mean())
    pt["kmax"] = int(index.shape[-1])
    if n <= 8192:  # the whole op against the pure-PyTorch reference (same selection)
        valid = R.valid_keys(vis, 1, hkv, cfg.block_size, q.device)
        pooled = R.pool_for(cfg, kd.float(), vd.float(), valid)
        ref_sel = R.select_blocks(qd.float(), pooled, vis, valid, scale, cfg)
        same = float((ref_sel.index == index).all(-1).float().mean())
        ro, _ = R.sparse_attention(qd.float(), kd.float(), vd.float(), R.Selection(index, count), pooled, vis, valid,
                                   scale, cfg.fill, cfg.block_size)
        err = rel(out, ro)
        result["checks"].append({"Hkv": hkv, "N": n, "mode": pt["mode"], "check": "spa op vs reference",
                                 "rel_err": err, "selection_rows_equal": same})
        assert err < 2e-2, f"SPA op disagrees with the reference: {err}"
        del ro, pooled
    del out, lse

    # the whole op (public op if it serves the kernels, else the codegen wrapper)
    op = whole_op(cfg, n, op_mode)
    if op_mode == "op":
        try:
            with torch.no_grad():
                o1 = op(qd, kd, vd)
                o2 = whole_op(cfg, n, "wrapper")(qd, kd, vd)
            if not torch.equal(o1, o2):
                raise RuntimeError(f"spa_attention differs from the kernels (rel {rel(o1, o2):.2e}): not served by them")
            del o1, o2
        except Exception as e:  # noqa: BLE001
            log(f"spa_compile.spa_attention unusable here ({type(e).__name__}: {str(e)[:200]}); timing the codegen wrapper")
            result["errors"].append(f"spa_attention unusable: {type(e).__name__}: {str(e)[:300]}")
            op_mode = "wrapper"
            op = whole_op(cfg, n, op_mode)
    pt["op_mode"] = op_mode
    for tag, bwd in (("fwd", False), ("fwdbwd", True)):
        if bwd and a.no_backward:
            continue
        ms, peak, extra = measure(op, q, k, v, bwd, a.rep_ms)
        pt[f"spa_op_{tag}"] = {"ms": ms, "peak_mb": peak, "extra_mb": extra}
        save()

    # selection + projector alone (pool k/v, pool q, project, score, top-k)
    info = block_info(vis, 1, n, n, cfg.block_size, q.device)
    kmax = int(max_selected(n, n, vis, cfg))

    def select_only(q_, k_, v_, values=False):
        if cfg.block_score == "fine":  # its own pooling (sub-block means) inside, as in api.spa_forward
            return fine_selection(q_, k_, vis, scale, cfg, None)[0]
        # the key means alone: the value means (vbar) are the fill's landmarks, not the selection's
        # (the op pools both in one kernel; spa_select_vpool_* keeps them in, for comparison);
        # the query means too where the op pools them in that launch (the default; SPA_POOL_FUSED=0: apart)
        qb, kb = api.pool_means(q_, k_, v_, info, cfg, values=values)[:2]
        return api.selection_stage(q_, kb, info, scale, cfg, None, kmax, k_, qbar=qb)[0]

    select_only(qd, kd, vd)
    pt["spa_select_fwd"] = {"ms": timed_runs(lambda: select_only(qd, kd, vd), a.rep_ms)}
    # the same two on GPU time alone (replayed from a CUDA graph, L2 warm): the events above count
    # the host's launch time where the GPU waits for it (a few short kernels: host-bound)
    with torch.no_grad():
        pt["spa_select_fwd_graph"] = {"ms": graph_ms(lambda: select_only(qd, kd, vd))}
        pt["spa_select_vpool_fwd_graph"] = {"ms": graph_ms(lambda: select_only(qd, kd, vd, True))}
        pt["spa_op_fwd_graph"] = {"ms": graph_ms(lambda: op(qd, kd, vd))}
    save()

    # the sparse kernel alone and FlexAttention on the same blocks
    nofill = cfg.replace(fill="none")
    sparse = lambda q_, k_, v_: _SparseOnly.apply(q_, k_, v_, index, count, vis, scale, nofill)  # noqa: E731
    with torch.no_grad():
        o_sparse = sparse(qd, kd, vd)
    if not a.no_flex:
        bm = flex_block_mask(index, count, hq, n, cfg.block_size)
        flex = flex_run(bm)
        with torch.no_grad():
            o_flex = flex(qd, kd, vd)
        err = rel(o_sparse, o_flex)
        result["checks"].append({"Hkv": hkv, "N": n, "mode": pt["mode"], "check": "spa sparse vs flex (same blocks)",
                                 "rel_err": err})
        assert err < 2e-2, f"sparse kernel and FlexAttention disagree on the same blocks: {err}"
        del o_flex
        if n == min(a.ns) and not a.no_backward:  # gradients too, once per Hkv/mode
            go = torch.randn_like(o_sparse)
            grads = []
            for fn in (sparse, flex):
                qq, kk, vv = (x.detach().clone().requires_grad_() for x in (q, k, v))
                fn(qq, kk, vv).backward(go)
                grads.append((qq.grad, kk.grad, vv.grad))
            errs = [rel(a_, b_) for a_, b_ in zip(*grads)]
            result["checks"].append({"Hkv": hkv, "N": n, "mode": pt["mode"],
                                     "check": "spa sparse vs flex gradients (dq, dk, dv)", "rel_err": max(errs),
                                     "each": errs})
            assert max(errs) < 3e-2, f"sparse and Flex gradients disagree: {errs}"
    del o_sparse
    for tag, bwd in (("fwd", False), ("fwdbwd", True)):
        if bwd and a.no_backward:
            continue
        ms, peak, extra = measure(sparse, q, k, v, bwd, a.rep_ms)
        pt[f"spa_sparse_{tag}"] = {"ms": ms, "peak_mb": peak, "extra_mb": extra}
        save()
        if not a.no_flex:
            ms, peak, extra = measure(flex, q, k, v, bwd, a.rep_ms)
            pt[f"flex_{tag}"] = {"ms": ms, "peak_mb": peak, "extra_mb": extra}
            save()
    if not a.no_flex and a.interleave > 0:
        # the forward pair again, in turns, each after an idle pause (the same card state for
        # both; the figures above were measured one after the other, Flex right after the sparse
        # kernel: see interleaved)
        def nograd(fn):
            def call():
                with torch.no_grad():
                    fn(qd, kd, vd)
            return call
        med, per, states = interleaved({"spa_sparse": nograd(sparse), "flex": nograd(flex)}, a.interleave,
                                       max(20, a.rep_ms // 2), a.cooldown_ms / 1000.0)
        pt["interleaved_fwd"] = {"rounds": a.interleave, "cooldown_ms": a.cooldown_ms, "median_ms": med,
                                 "round_ms": per, "card_state": states + [card_state()]}
    flops = 4.0 * cfg.block_size * cfg.block_size * d * blocks
    pt["sparse_tflops_fwd"] = flops / (pt["spa_sparse_fwd"]["ms"] * 1e-3) / 1e12
    if "spa_sparse_fwdbwd" in pt:
        pt["sparse_tflops_fwdbwd"] = 3.5 * flops / (pt["spa_sparse_fwdbwd"]["ms"] * 1e-3) / 1e12
    log(json.dumps({k_: (v_.get("ms", v_.get("median_ms")) if isinstance(v_, dict) else v_) for k_, v_ in pt.items()}))


# ---------------------------------------------------------------------------------------
# targets, table, docs
# ---------------------------------------------------------------------------------------


def _ms(pt, name):
    x = pt.get(name)
    return None if x is None else x["ms"]


def _ratio(a, b):
    return None if a is None or b is None or b == 0 else a / b


def _interleaved_ratio(pt):
    """Flex / sparse forward of the interleaved rounds (``interleaved``), None where not measured."""
    med = pt.get("interleaved_fwd", {}).get("median_ms", {})
    return _ratio(med.get("flex"), med.get("spa_sparse"))


def evaluate_targets(result):
    pts = result["points"]
    out = []

    def add(name, value, goal, ok_if_ge=True, where=""):
        ok = None if value is None else (value >= goal if ok_if_ge else value <= goal)
        out.append({"target": name, "where": where, "value": value, "goal": goal, "met": ok})

    for p in pts:
        if 16384 <= p["N"] <= 131072:
            w = f"Hkv={p['Hkv']} N={p['N']} {p['mode']}"
            add("sparse vs flex fwd speedup >= 1.3", _ratio(_ms(p, "flex_fwd"), _ms(p, "spa_sparse_fwd")), 1.3, where=w)
            if "interleaved_fwd" in p:
                add("sparse vs flex fwd speedup >= 1.3 (interleaved rounds)", _interleaved_ratio(p), 1.3, where=w)
            add("sparse vs flex fwd+bwd speedup >= 1.2", _ratio(_ms(p, "flex_fwdbwd"), _ms(p, "spa_sparse_fwdbwd")),
                1.2, where=w)
    best = max((p.get("sparse_tflops_fwd") or 0 for p in pts), default=None)
    add("sparse kernel fwd TFLOP/s >= 450 (best point)", best, 450)
    for p in pts:
        w = f"Hkv={p['Hkv']} N={p['N']} {p['mode']}"
        if p["N"] == 16384 and p["mode"] == "density0.2":
            add("op fwd vs sdpa flash >= 3.2", _ratio(_ms(p, "sdpa_flash_fwd"), _ms(p, "spa_op_fwd")), 3.2, where=w)
            add("op fwd vs sdpa cudnn >= 1.8", _ratio(_ms(p, "sdpa_cudnn_fwd"), _ms(p, "spa_op_fwd")), 1.8, where=w)
            add("op fwd+bwd vs sdpa flash >= 2.5", _ratio(_ms(p, "sdpa_flash_fwdbwd"), _ms(p, "spa_op_fwdbwd")), 2.5,
                where=w)
        if p["N"] == 16384:
            add("selection+projector share of op fwd <= 0.10", _ratio(_ms(p, "spa_select_fwd"), _ms(p, "spa_op_fwd")),
                0.10, ok_if_ge=False, where=w)
            add("selection+projector share of op fwd, GPU time (CUDA graph) <= 0.10",
                _ratio(_ms(p, "spa_select_fwd_graph"), _ms(p, "spa_op_fwd_graph")), 0.10, ok_if_ge=False, where=w)
        if p["N"] == 131072 and p["mode"] == "topk32":
            add("op fwd vs sdpa cudnn >= 15", _ratio(_ms(p, "sdpa_cudnn_fwd"), _ms(p, "spa_op_fwd")), 15, where=w)
        if p["N"] == 131072:
            f = p.get("sdpa_flash_fwd", {}).get("peak_mb")
            o = p.get("spa_op_fwd", {}).get("peak_mb")
            add("op fwd peak memory / sdpa flash <= 1.25", _ratio(o, f), 1.25, ok_if_ge=False, where=w)
            f = p.get("sdpa_flash_fwdbwd", {}).get("peak_mb")
            o = p.get("spa_op_fwdbwd", {}).get("peak_mb")
            add("op fwd+bwd peak memory / sdpa flash <= 1.25", _ratio(o, f), 1.25, ok_if_ge=False, where=w)
    return out


METHODS = ["sdpa_flash", "sdpa_cudnn", "flex", "spa_sparse", "spa_op"]


def _fmt(x, nd=2):
    return "-" if x is None else f"{x:.{nd}f}"


def format_table(result):
    lines = []
    info = result["info"]
    lines.append(f"Card: {info['card']} | torch {info['torch']} | triton {info['triton']} | CUDA {info['cuda']} | "
                 f"{info['date']}")
    lines.append("")
    lines.append("Times: median ms (CUDA events, L2 flushed). B=1, Hq=32, D=128, bf16, causal, block 64.")
    lines.append("")
    head = ["Hkv", "N", "mode"] + [f"{m} fwd" for m in METHODS] + [f"{m} f+b" for m in METHODS] + \
        ["select", "sparse TF/s", "flex/sparse fwd", "flex/sparse fwd (interleaved)", "flex/sparse f+b"]
    lines.append("| " + " | ".join(head) + " |")
    lines.append("|" + "---|" * len(head))
    for p in sorted(result["points"], key=lambda p: (p["Hkv"], p["mode"], p["N"])):
        row = [str(p["Hkv"]), str(p["N"]), p["mode"]]
        row += [_fmt(_ms(p, f"{m}_fwd")) for m in METHODS]
        row += [_fmt(_ms(p, f"{m}_fwdbwd")) for m in METHODS]
        row += [_fmt(_ms(p, "spa_select_fwd"), 3), _fmt(p.get("sparse_tflops_fwd"), 0),
                _fmt(_ratio(_ms(p, "flex_fwd"), _ms(p, "spa_sparse_fwd"))),
                _fmt(_interleaved_ratio(p)),
                _fmt(_ratio(_ms(p, "flex_fwdbwd"), _ms(p, "spa_sparse_fwdbwd")))]
        lines.append("| " + " | ".join(row) + " |")
    lines.append("")
    lines.append("Peak memory (MB, inputs included; fwd / fwd+bwd):")
    lines.append("")
    head = ["Hkv", "N", "mode"] + METHODS
    lines.append("| " + " | ".join(head) + " |")
    lines.append("|" + "---|" * len(head))
    for p in sorted(result["points"], key=lambda p: (p["Hkv"], p["mode"], p["N"])):
        row = [str(p["Hkv"]), str(p["N"]), p["mode"]]
        for m in METHODS:
            f = p.get(f"{m}_fwd", {}).get("peak_mb")
            b = p.get(f"{m}_fwdbwd", {}).get("peak_mb")
            row.append(f"{_fmt(f, 0)} / {_fmt(b, 0)}")
        lines.append("| " + " | ".join(row) + " |")
    lines.append("")
    lines.append("Targets:")
    lines.append("")
    lines.append("| target | where | value | goal | met |")
    lines.append("|---|---|---|---|---|")
    for t in result.get("targets", []):
        met = "-" if t["met"] is None else ("yes" if t["met"] else "NO")
        lines.append(f"| {t['target']} | {t['where']} | {_fmt(t['value'])} | {t['goal']} | {met} |")
    if result["errors"]:
        lines.append("")
        lines.append("Errors / skipped:")
        lines.extend(f"- {e}" for e in result["errors"])
    return "\n".join(lines)


def write_docs(path: Path, result, table, json_path):
    section = "\n".join([
        DOCS_BEGIN,
        f"## SPA kernels vs SDPA and FlexAttention ({result['info']['card']})",
        "",
        f"Measured by `benchmarks/bench_kernels.py` on {result['info']['date']}; raw figures: "
        f"`{json_path.as_posix()}`.",
        "",
        table,
        DOCS_END,
    ])
    text = path.read_text() if path.exists() else "# Benchmarks\n"
    if DOCS_BEGIN in text and DOCS_END in text:
        pre, rest = text.split(DOCS_BEGIN, 1)
        post = rest.split(DOCS_END, 1)[1]
        text = pre + section + post
    else:
        text = text.rstrip() + "\n\n" + section + "\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


if __name__ == "__main__":
    main()
