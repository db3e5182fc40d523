"""The experimental Gluon forward (codegen/gluon_forward.py) against the tuned Triton kernel on
the same selection, without and with the landmark fill, one card, one run.

    PYTHONPATH=. python3 benchmarks/bench_gluon_forward.py --out $OUT/gluon.json \\
        [--points 16384:32:topk32 131072:8:topk32 ...] [--variants ns2 ns3 ns3qp]

B=1, Hq=32, D=128, bf16, causal, block 64, fresh random inputs. For each point: the selection
once (api.selection_stage), then for the exact part alone and with the fill: the Triton kernel
as the op tunes it (api.sparse_stage), then each Gluon variant (ring depth, q in registers, PV in flight): its output and lse are checked against the Triton
kernel's (poisoned buffers, relative error) before either is timed; median ms of
triton.testing.do_bench, TFLOP/s over the computed blocks (4 * 64 * 64 * D a block and head, as
bench_kernels.py counts them; with the fill the same count, so a rate, not the fill's FLOPs). A Gluon variant that fails its check is recorded and not timed.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from triton.testing import do_bench

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_kernels import fresh_inputs, mode_config  # noqa: E402
from op_selection import op_selection  # noqa: E402
from spa_compile.codegen import api  # noqa: E402


def parse_variant(var: str) -> dict:
    """"ns3qp" -> stages 3, q_regs, pv_async: the ring depth, then q for q in registers, p for PV in
    flight, g for two heads of a GQA group a program (pair), o for FA3's schedule with the consumers
    taking turns (order)."""
    body = var.removeprefix("ns")
    digits = "".join(ch for ch in body if ch.isdigit())
    flags = body[len(digits):]
    if not digits or set(flags) - set("qpgo"):
        raise SystemExit(f"bad variant {var!r}: ns<depth>[q][p][g][o], e.g. ns3 ns3q ns3qp ns6qg ns3qo")
    return {"stages": int(digits), "q_regs": "q" in flags, "pv_async": "p" in flags, "pair": "g" in flags,
            "order": "o" in flags}


def forward_point(n: int, hkv: int, mode: str):
    """B=1, Hq=32, D=128, bf16, causal: fresh inputs, the op's selection and the FLOPs of the
    computed blocks (4 * 64 * 64 * D a block and head, as bench_kernels.py counts them):
    (q, k, v, info, kbar, vbar, index, count, scale, flops), kbar / vbar in q's dtype."""
    hq, d = 32, 128
    cfg = mode_config(mode)
    q, k, v = fresh_inputs(hq, hkv, n, d, torch.bfloat16, seed=n + hkv, grad=False)
    info, klp, vlp, index, count, _ = op_selection(q, k, v, cfg, cfg.block_size)
    flops = 4.0 * cfg.block_size * cfg.block_size * d * int(count.sum()) * (hq // index.shape[1])
    return q, k, v, info, klp, vlp, index, count, d ** -0.5, flops


def one_point(n: int, hkv: int, mode: str, variants: list[str]) -> dict:
    from spa_compile.codegen import gluon_forward as gf

    q, k, v, info, klp, vlp, index, count, scale, flops = forward_point(n, hkv, mode)
    pt = {"N": n, "Hkv": hkv, "mode": mode, "blocks_per_qblock": float(count.float().mean())}
    for fill in (False, True):
        tag = "fill" if fill else "exact"
        lm = (klp, vlp) if fill else (None, None)

        def triton_fwd():
            return api.sparse_stage(q, k, v, *lm, info, index, count, scale, fill)

        want, want_lse = triton_fwd()
        ms = do_bench(triton_fwd, warmup=25, rep=200, return_mode="median")
        pt[f"triton_{tag}"] = {"ms": ms, "tflops_exact_blocks": flops / (ms * 1e-3) / 1e12}
        print(f"N={n} Hkv={hkv} {mode} triton_{tag}: {pt[f'triton_{tag}']}", flush=True)
        for var in variants:
            name = f"gluon_{tag}_{var}"
            kw = parse_variant(var)
            if kw["pair"] and not gf.pair_ok(q.shape[1], hkv, index.shape[1]):
                continue
            try:
                out2 = torch.full_like(want, float("nan"))  # poisoned: an unwritten row shows
                lse2 = torch.full_like(want_lse, float("nan"))
                gf.gluon_forward(q, k, v, info, index, count, scale, *lm, out=out2, lse=lse2, **kw)
                torch.cuda.synchronize()
                err = float((out2.double() - want.double()).norm() / want.double().norm())
                lse_err = float((lse2 - want_lse).abs().max())
                ok = bool(torch.isfinite(out2).all()) and err < 1e-2 and lse_err < 1e-2
                pt[name] = {"rel_err": err, "lse_max_abs_err": lse_err, "ok": ok}
                if ok:
                    g = do_bench(lambda: gf.gluon_forward(q, k, v, info, index, count, scale, *lm, **kw),
                                 warmup=25, rep=200, return_mode="median")
                    pt[name].update({"ms": g, "tflops_exact_blocks": flops / (g * 1e-3) / 1e12,
                                     "speedup_vs_triton": ms / g})
            except Exception as exc:  # noqa: BLE001 - record and go on
                pt[name] = {"error": f"{type(exc).__name__}: {exc}"[:1500]}
            print(f"N={n} Hkv={hkv} {mode} {name}: {pt[name]}", flush=True)
    return pt


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="benchmarks/results/bench_gluon_forward.json")
    ap.add_argument("--points", nargs="+", default=["16384:32:topk32", "16384:32:density0.2", "131072:32:topk32",
                                                    "131072:8:topk32"], help="N:Hkv:mode")
    ap.add_argument("--variants", nargs="+", default=["ns3q", "ns3qo", "ns2qo", "ns3qg", "ns6qg", "ns6qgo"],
                    help="ns<ring depth>[q: q in registers][p: PV in flight][g: two GQA heads share the loads]"
                    "[o: FA3's schedule, the consumers taking turns]; "
                    "a g variant is left out where the heads cannot pair (Hq / Hkv odd)")
    a = ap.parse_args(argv)
    run_points(a.points, lambda n, hkv, mode: one_point(n, hkv, mode, a.variants), a.out)
    return 0


def run_points(specs: list[str], point, out: str) -> dict:
    """``point(n, hkv, mode)`` for each "N:Hkv:mode" spec into the result's ``points`` (an error is
    recorded and the next point runs), the JSON (card, versions, date, points) rewritten after
    each; returns it."""
    import triton

    res = {"card": torch.cuda.get_device_name(0), "torch": torch.__version__, "triton": triton.__version__,
           "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "points": []}
    for spec in specs:
        n, hkv, mode = spec.split(":")
        try:
            res["points"].append(point(int(n), int(hkv), mode))
        except Exception as exc:  # noqa: BLE001
            res["points"].append({"point": spec, "error": f"{type(exc).__name__}: {exc}"[:1500]})
            print(spec, res["points"][-1]["error"], flush=True)
        Path(out).write_text(json.dumps(res, indent=1))
    return res


if __name__ == "__main__":
    raise SystemExit(main())
