"""The sparse forward (Triton) at given launch configs against the config the op tunes, on the
same selection, one card, one run: for trying a kernel variant before it joins the autotuner.

    PYTHONPATH=. python3 benchmarks/bench_forward_configs.py --out $OUT/fwd_configs.json \\
        [--points 131072:32:topk32 16384:32:density0.2] \\
        [--configs '{"GP": 1, "num_warps": 4, "num_stages": 3, "BJ": 64, "TMA": true, "PJ": true}' ...] \\
        [--tuned-plus '{"TAIL_SPLIT": false}'] [--rounds 5] [--fills 1]

B=1, Hq=32, D=128, bf16, causal, block 64, fresh random inputs. For each point: the selection
once (api.selection_stage), then without and with the landmark fill: the tuned config
(api.sparse_stage), then each given config through sparse_forward.launch_forward. Each config's
output and lse are checked against the tuned one's (poisoned buffers, relative error) before it
is timed; median ms of triton.testing.do_bench and TFLOP/s over the computed blocks (as
bench_kernels.py counts them). A config that fails its check is recorded and not timed.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from triton.testing import do_bench

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_gluon_forward import forward_point, run_points  # noqa: E402
from bench_kernels import interleaved  # noqa: E402
from spa_compile.codegen import api, sparse_forward  # noqa: E402
from spa_compile.codegen.bitmap import build_bitmap  # noqa: E402

# the shipped 128K top-k 32 config (group order off) at 2, 3 and 4 stages: a baseline sweep; pass
# --configs to time a new variant (run 51 timed "PJ", two blocks a step, since removed: 0.84x)
DEFAULT_CONFIGS = [
    {"GP": 1, "num_warps": 4, "num_stages": st, "BJ": 64, "TMA": True, "TMA_FILL": True} for st in (2, 3, 4)
]


def tuned_config(q, k, v, lm, info, index, count, scale, fill) -> dict:
    """The launch config the op picks at this point (api.sparse_stage's tuning key and cache)."""
    sel = build_bitmap(index, count, info.nkb) if fill else count

    def run(c):
        return sparse_forward.launch_forward(q, k, v, *lm, info, index, count, scale, fill, c, None, None, sel)

    return dict(api._attention_config("fwd", q, k, v, index.shape[1], info, fill, run, index))


def rounds_ms(calls: dict, rounds: int):
    """bench_kernels.interleaved with do_bench medians (100 ms each, no pause): the tuned config
    and a variant in turns, the same card state for both. ({name: median}, {name: per round})."""
    med, per, _ = interleaved(calls, rounds, 100, timer=lambda fn, rep: do_bench(fn, warmup=10, rep=rep,
                                                                               return_mode="median"))
    return med, per


def one_point(n: int, hkv: int, mode: str, configs: list[dict], plus: list[dict], rounds: int,
              fills: tuple[bool, ...] = (False, True)) -> dict:
    q, k, v, info, klp, vlp, index, count, scale, flops = forward_point(n, hkv, mode)
    pt = {"N": n, "Hkv": hkv, "mode": mode, "blocks_per_qblock": float(count.float().mean()), "runs": []}
    for fill in fills:
        lm = (klp, vlp) if fill else (k, v)

        def tuned():
            return api.sparse_stage(q, k, v, *lm, info, index, count, scale, fill)

        want, want_lse = tuned()
        base = tuned_config(q, k, v, lm, info, index, count, scale, fill)
        ms = do_bench(tuned, warmup=25, rep=200, return_mode="median")
        pt["runs"].append({"fill": fill, "config": "tuned", "tuned_config": base, "ms": ms,
                           "tflops": flops / (ms * 1e-3) / 1e12})
        print(f"N={n} Hkv={hkv} {mode} fill={fill} tuned {base}: {ms:.3f} ms", flush=True)
        for conf in configs + [dict(base, **p) for p in plus]:
            rec = {"fill": fill, "config": conf}
            try:
                out = torch.full_like(want, float("nan"))  # poisoned: an unwritten row shows
                lse = torch.full_like(want_lse, float("nan"))
                sparse_forward.launch_forward(q, k, v, *lm, info, index, count, scale, fill, conf, out, lse)
                torch.cuda.synchronize()
                rec["rel_err"] = float((out.double() - want.double()).norm() / want.double().norm())
                rec["lse_max_abs_err"] = float((lse - want_lse).abs().max())
                rec["ok"] = bool(torch.isfinite(out).all()) and rec["rel_err"] < 1e-2 and rec["lse_max_abs_err"] < 1e-2
                if rec["ok"]:
                    def variant(conf=conf):
                        return sparse_forward.launch_forward(q, k, v, *lm, info, index, count, scale, fill, conf)
                    if rounds > 0:  # the tuned config and this one in turns: same card state
                        med, per = rounds_ms({"tuned": tuned, "variant": variant}, rounds)
                        rec.update({"rounds": per, "tuned_ms_rounds": med["tuned"]})
                        g, ms_ref = med["variant"], med["tuned"]
                    else:
                        g, ms_ref = do_bench(variant, warmup=25, rep=200, return_mode="median"), ms
                    rec.update({"ms": g, "tflops": flops / (g * 1e-3) / 1e12, "speedup_vs_tuned": ms_ref / g})
            except Exception as exc:  # noqa: BLE001 - record and go on
                rec["error"] = f"{type(exc).__name__}: {exc}"[:1500]
            pt["runs"].append(rec)
            print(f"N={n} Hkv={hkv} {mode} fill={fill} {conf}: "
                  f"{ {k_: v_ for k_, v_ in rec.items() if k_ not in ('config', 'fill')} }", flush=True)
    return pt


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="benchmarks/results/bench_forward_configs.json")
    ap.add_argument("--points", nargs="+", default=["131072:32:topk32", "16384:32:density0.2"], help="N:Hkv:mode")
    ap.add_argument("--configs", nargs="+", default=None, help="launch configs as JSON objects")
    ap.add_argument("--tuned-plus", nargs="+", default=[],
                    help='overrides of the tuned config as JSON objects, e.g. \'{"TAIL_SPLIT": false}\'; with '
                         'these and no --configs, only they are timed')
    ap.add_argument("--rounds", type=int, default=0,
                    help="time the tuned config and each variant in turn over this many rounds (0: once each)")
    ap.add_argument("--fills", default="0,1", help="without (0) and/or with (1) the landmark fill, e.g. 1")
    a = ap.parse_args(argv)
    fills = tuple(bool(int(f)) for f in a.fills.split(","))
    plus = [json.loads(c) for c in a.tuned_plus]
    configs = [json.loads(c) for c in a.configs] if a.configs else ([] if plus else DEFAULT_CONFIGS)
    run_points(a.points, lambda n, hkv, mode: one_point(n, hkv, mode, configs, plus, a.rounds, fills), a.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
