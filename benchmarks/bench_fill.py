"""Why the landmark fill runs slower than the exact loop: the sparse forward with fill variants.

    PYTHONPATH=. python3 benchmarks/bench_fill.py --out $OUT/fill.json [--ns 131072] [--hkv 8]
        [--configs I ...] [--modes 0 ...] [--no-nofill]

B=1, Hq=32, D=128, bf16, causal, block 64, top-k 32 (the 128K target's setting). The selection
is computed once (api.selection_stage); then, for the forward configs that tuning picks at long
N (TMA loads, 1 or 2 heads a program), the sparse kernel is timed (``do_bench``, median, L2
flushed) without the fill, with it, and with the fill's bias computed in other ways
(``BIAS_MODE`` of ``sparse_forward._fwd_kernel``):

    0  ``fill_bias`` (shipped): the chunk's selection words as scalar loads, log2 n a constant when
       every block is full (``uniform_counts``), else a count load per column
    1  ``fill_bias_loads``: a count and a selection-word load per column (shipped until 2026-11-28)
    2  no bias at all (timing only: wrong results)

Measured before (H200, 2026-11-28, 128K, Hkv=8, GP=2 8 warps 4 stages TMA): per-column loads
(mode 1) 18.79 ms with the fill, 11.05 without (fill 275 TFLOP/s on its useful FLOPs); the bias
added after the dot 19.08; loaded one chunk ahead 18.80; no bias 15.77 (451 TFLOP/s); the count
load alone 17.87: the per-column loads were the cost, not their latency.

Two query blocks a program (the landmark tiles loaded once for both; commit 54504dd, removed
after run 35, H200, 2026-11-29, 128K, Hkv=32, fill on): 26.0 ms at 4 warps, 35.3 / 41.7 ms at 8
warps (3 / 2 stages) against 16.2 ms for the tuned one-block config (GP 1, 4 warps, 3 stages, TMA);
the same outputs (bitwise at 4 warps).

Every config's output (poisoned before each run) is compared with the first config's.
The fill's throughput is its FLOPs (4 D per (row, computed landmark), the landmarks a program's
chunks cover) over the time it adds to the no-fill run. Mode 1's output is checked against
mode 0's (and mode 0 against the reference in the GPU tests).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from spa_compile import SPAConfig  # noqa: E402
from spa_compile.codegen.sparse_forward import launch_forward  # noqa: E402
from op_selection import op_selection  # noqa: E402

CONFIGS = [
    {"GP": 2, "num_warps": 8, "num_stages": 4, "BJ": 64, "TMA": True, "TMA_FILL": True},
    {"GP": 1, "num_warps": 4, "num_stages": 3, "BJ": 64, "TMA": True, "TMA_FILL": True},
    {"GP": 4, "num_warps": 16, "num_stages": 2, "BJ": 64, "TMA": True, "TMA_FILL": True},
]
MODES = (0, 1, 2)


def fill_flops(index: torch.Tensor, count: torch.Tensor, nq: int, hq: int, d: int, bs: int, bj: int) -> float:
    """FLOPs the fill computes (causal, no padding): query block i's chunks cover ceil(i / BJ) * BJ
    landmarks (blocks 0 .. i-1 are fully visible), 4 D a (row, landmark), every query head."""
    nqb = index.shape[2]
    i = torch.arange(nqb, device=index.device, dtype=torch.float64)
    covered = torch.ceil(i / bj) * bj
    rows = torch.clamp(nq - i * bs, max=bs)
    return float((covered * rows).sum()) * 4 * d * hq * index.shape[0]


def useful_fill_flops(index, count, nq, hq, d, bs) -> float:
    """FLOPs of the landmarks SPEC.md computes: fully visible, unselected (what the 245 TFLOP/s
    figure counted)."""
    nqb = index.shape[2]
    i = torch.arange(nqb, device=index.device)
    sel_below = ((index >= 0) & (index < i[None, None, :, None])).sum(-1).double()  # [B, Hs, NQB]
    unsel = i[None, None, :].double() - sel_below
    rows = torch.clamp(nq - i * bs, max=bs).double()
    hs = index.shape[1]
    return float((unsel * rows).sum()) * 4 * d * (hq // hs)


def main(argv=None) -> int:
    from triton.testing import do_bench

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--ns", type=int, nargs="+", default=[131072])
    ap.add_argument("--hkv", type=int, default=8)
    ap.add_argument("--topk", type=int, default=32)
    ap.add_argument("--configs", type=int, nargs="*", default=None, help="indices into CONFIGS (default all)")
    ap.add_argument("--modes", type=int, nargs="*", default=list(MODES), help="BIAS_MODEs to time (0 first)")
    ap.add_argument("--no-nofill", action="store_true", help="skip the runs without the fill")
    a = ap.parse_args(argv)
    configs = CONFIGS if a.configs is None else [CONFIGS[i] for i in a.configs]
    dev = torch.device("cuda")
    hq, d, bs = 32, 128, 64
    res = {"card": torch.cuda.get_device_name(0), "torch": torch.__version__,
           "triton": __import__("triton").__version__, "date": time.strftime("%Y-%m-%d"), "points": []}
    for n in a.ns:
        gen = torch.Generator(device=dev).manual_seed(n)
        q = torch.randn(1, hq, n, d, device=dev, dtype=torch.bfloat16, generator=gen)
        k = torch.randn(1, a.hkv, n, d, device=dev, dtype=torch.bfloat16, generator=gen)
        v = torch.randn(1, a.hkv, n, d, device=dev, dtype=torch.bfloat16, generator=gen)
        cfg = SPAConfig(mode="spa", topk=a.topk)
        scale = d**-0.5
        info, kb, vb, index, count, sel = op_selection(q, k, v, cfg, bs)
        out = torch.empty(1, hq, n, d, device=dev, dtype=torch.bfloat16)
        lse = torch.empty(1, hq, n, device=dev, dtype=torch.float32)
        useful = useful_fill_flops(index, count, n, hq, d, bs)
        exact_flops = float(count.double().sum()) * bs * bs * 4 * d * (hq // index.shape[1])  # upper bound (diag full)
        pt = {"N": n, "Hkv": a.hkv, "topk": a.topk, "useful_fill_tflop": useful / 1e12,
              "exact_tflop_bound": exact_flops / 1e12, "runs": []}
        first = None  # the first config's output (mode 0): every other config's is compared with it
        for base in configs:
            def run(fill, mode, c=base):
                return launch_forward(q, k, v, kb, vb, info, index, count, scale, fill, dict(c, BIAS_MODE=mode),
                                      out, lse, sel if fill else count)
            t_nofill = None if a.no_nofill else do_bench(lambda: run(False, 0), warmup=25, rep=300, return_mode="median")
            ref = None
            row = {"config": base, "nofill_ms": t_nofill, "modes": {}}
            for mode in a.modes:
                out.fill_(float("nan"))
                lse.fill_(float("nan"))
                run(True, mode)
                torch.cuda.synchronize()
                if mode == 0:
                    ref = out.clone()
                    if first is None:
                        first = (ref, lse.clone())
                    else:
                        row["rel_err_vs_first_config"] = float((ref.float() - first[0].float()).norm()
                                                               / first[0].float().norm())
                        row["bitwise_equal_first_config"] = bool(torch.equal(ref, first[0])
                                                                 and torch.equal(lse, first[1]))
                        assert row["rel_err_vs_first_config"] < 1e-2, row
                        print(f"  vs first config: rel err {row['rel_err_vs_first_config']:.2e}, bitwise "
                              f"{row['bitwise_equal_first_config']}", flush=True)
                elif mode == 1:
                    err = float((out.float() - ref.float()).norm() / ref.float().norm())
                    row.setdefault("rel_err_vs_mode0", {})[mode] = err
                    assert err < 1e-2, (mode, err)
                t = do_bench(lambda: run(True, mode), warmup=25, rep=300, return_mode="median")
                row["modes"][mode] = {"ms": t}
                if t_nofill is not None:
                    computed = fill_flops(index, count, n, hq, d, bs, base["BJ"])
                    row["modes"][mode].update({"fill_ms": t - t_nofill,
                                               "fill_tflops_useful": useful / max(t - t_nofill, 1e-9) / 1e9,
                                               "fill_tflops_computed": computed / max(t - t_nofill, 1e-9) / 1e9})
                print(f"N={n} Hkv={a.hkv} {base} mode {mode}: {t:.2f} ms (no fill "
                      f"{'-' if t_nofill is None else f'{t_nofill:.2f}'})", flush=True)
            pt["runs"].append(row)
        res["points"].append(pt)
        Path(a.out).write_text(json.dumps(res, indent=1))
    print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
