"""One million tokens on one card: the SPA op forward (and forward + backward) at N = 2**20, its
peak memory against an 80 GB card, and sampled rows checked against the float64 reference.

    PYTHONPATH=. python3 benchmarks/bench_million.py --out $OUT/million.json \\
        [--points 1048576:8:topk32 1048576:32:topk32] [--backward]

B=1, Hq=32, D=128, bf16, causal, block 64, fresh random inputs (never zeros). For each point:
1. ``api.spa_forward`` once (compiles and tunes the kernels at this shape), its output and lse
   NaN-free, then the rows of a few query blocks (the first, the second, the middle, the last) of
   the first and last query heads checked against ``reference.sparse_attention`` in float64 on
   those rows alone (the same index lists; the landmark means of the whole head), by the relative
   error of METHOD.md (bf16: under 1e-2);
2. the op (``spa_compile.spa_attention``) timed by ``triton.testing.do_bench`` (median, warm-up
   excluded), and its peak memory above the inputs (``torch.cuda.max_memory_allocated``);
3. with ``--backward``: forward + backward once more for the peak (inputs, their gradients and the
   output's gradient included), then timed by do_bench.
Dense attention at this length is not run (SDPA's kernels take seconds a call here).
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import torch
from triton.testing import do_bench

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_gluon_forward import run_points  # noqa: E402
from bench_kernels import fresh_inputs, mode_config, rel  # noqa: E402
from spa_compile import reference as R  # noqa: E402
from spa_compile import spa_attention  # noqa: E402
from spa_compile.codegen import api  # noqa: E402
from spa_compile.visibility import Visibility  # noqa: E402

GB = 1e9


def reference_rows(q, k, v, index, count, cfg, scale, i: int, h: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows of query block ``i``, query head ``h`` by the float64 reference: the block's rows as a
    causal sub-problem at offset ``i * block`` (the same visibility), the head's own K/V and
    selection row (index lists from the kernels)."""
    bs = cfg.block_size
    hq, n = q.shape[1], q.shape[2]
    kh = h // (hq // k.shape[1])
    hs = h * index.shape[1] // hq
    t0, t1 = i * bs, min((i + 1) * bs, n)
    qs = q[:, h:h + 1, t0:t1].double()
    ks, vs = k[:, kh:kh + 1].double(), v[:, kh:kh + 1].double()
    vis = Visibility(t1 - t0, n, causal=True, offset=t0)
    valid = R.valid_keys(vis, 1, 1, bs, q.device)
    pooled = R.pool_for(cfg, ks, vs, valid)
    sel = R.Selection(index[:, hs:hs + 1, i:i + 1], count[:, hs:hs + 1, i:i + 1])
    return R.sparse_attention(qs, ks, vs, sel, pooled, vis, valid, scale, cfg.fill, bs)


def check_rows(q, k, v, cfg, scale) -> dict:
    n = q.shape[2]
    vis = Visibility(n, n, causal=True)
    with torch.no_grad():
        out, lse, index, count = api.spa_forward(q, k, v, vis, scale, cfg, None)
    torch.cuda.synchronize()
    res = {"out_finite": bool(torch.isfinite(out).all()), "lse_finite": bool(torch.isfinite(lse).all()),
           "index_mb": index.numel() * index.element_size() / 1e6, "kmax": index.shape[-1],
           "blocks_per_qblock": float(count.float().mean()), "rows": []}
    nqb = math.ceil(n / cfg.block_size)
    for i in (0, 1, nqb // 2, nqb - 1):
        for h in (0, q.shape[1] - 1):
            ro, rl = reference_rows(q, k, v, index, count, cfg, scale, i, h)
            t0 = i * cfg.block_size
            got, got_lse = out[:, h:h + 1, t0:t0 + ro.shape[2]], lse[:, h:h + 1, t0:t0 + ro.shape[2]]
            res["rows"].append({"qblock": i, "head": h, "rel_err": rel(got, ro),
                                "lse_max_abs_err": float((got_lse.double() - rl).abs().max())})
    res["max_rel_err"] = max(r["rel_err"] for r in res["rows"])
    res["ok"] = res["out_finite"] and res["lse_finite"] and res["max_rel_err"] < 1e-2
    print("check", {k_: v_ for k_, v_ in res.items() if k_ != "rows"}, flush=True)
    return res


def one_point(n: int, hkv: int, mode: str, backward: bool) -> dict:
    hq, d = 32, 128
    cfg = mode_config(mode)
    scale = d ** -0.5
    q, k, v = fresh_inputs(hq, hkv, n, d, torch.bfloat16, seed=n + hkv, grad=False)
    inputs = sum(x.numel() * x.element_size() for x in (q, k, v))
    pt = {"N": n, "Hkv": hkv, "Hq": hq, "D": d, "mode": mode, "inputs_gb": inputs / GB,
          "check": check_rows(q, k, v, cfg, scale)}

    def op():
        return spa_attention(q, k, v, is_causal=True, enable_gqa=hq != hkv, config=cfg)

    with torch.no_grad():
        op()
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        op()
        torch.cuda.synchronize()
        pt["fwd_peak_gb"] = torch.cuda.max_memory_allocated() / GB
        pt["fwd_peak_above_inputs_gb"] = (torch.cuda.max_memory_allocated() - base) / GB
        pt["fwd_ms"] = do_bench(op, warmup=1, rep=3000, return_mode="median")
    print("fwd", {k_: v_ for k_, v_ in pt.items() if k_.startswith("fwd")}, flush=True)
    if backward:
        for x in (q, k, v):
            x.requires_grad_(True)
        g = torch.randn(1, hq, n, d, device="cuda", dtype=torch.bfloat16)

        def fwd_bwd():
            for x in (q, k, v):
                x.grad = None
            op().backward(g)

        fwd_bwd()  # compiles and tunes the backward kernels
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        fwd_bwd()
        torch.cuda.synchronize()
        pt["fwdbwd_peak_gb"] = torch.cuda.max_memory_allocated() / GB
        pt["grads_finite"] = all(bool(torch.isfinite(x.grad).all()) for x in (q, k, v))
        pt["fwdbwd_ms"] = do_bench(fwd_bwd, warmup=1, rep=5000, return_mode="median")
        print("fwd+bwd", {k_: v_ for k_, v_ in pt.items() if k_.startswith("fwdbwd") or k_ == "grads_finite"},
              flush=True)
    pt["card_memory_gb"] = torch.cuda.get_device_properties(0).total_memory / GB
    pt["fits_80gb"] = max(pt.get("fwd_peak_gb", 0), pt.get("fwdbwd_peak_gb", 0)) < 80.0
    return pt


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="benchmarks/results/bench_million.json")
    ap.add_argument("--points", nargs="+", default=["1048576:8:topk32", "1048576:32:topk32"], help="N:Hkv:mode")
    ap.add_argument("--backward", action="store_true", help="also forward + backward")
    a = ap.parse_args(argv)
    run_points(a.points, lambda n, hkv, mode: one_point(n, hkv, mode, a.backward), a.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
