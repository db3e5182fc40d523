"""Host overhead of one SPA op call: where the time goes when the GPU work is small.

    PYTHONPATH=. python3 benchmarks/op_overhead.py --out $OUT/op_overhead.json

For B=1, Hq=32, D=128, bf16, causal, density 0.2, at a few lengths and Hkv in {8, 32}:

* the GPU-event time of the op (``triton.testing.do_bench`` median) and its host time
  (``perf_counter`` over back-to-back calls with one synchronize at the end);
* the host time of each stage of ``spa_compile.codegen.api.spa_forward``;
* the number of CUDA kernels one call launches (``torch.profiler``);
* a cProfile of the op at the shortest length (top functions by own time).

When host time > GPU time the op is launch bound and ``do_bench`` reports the host time.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import pstats
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import spa_compile  # noqa: E402,F401
from spa_compile import SPAConfig  # noqa: E402
from spa_compile.budget import max_selected  # noqa: E402
from spa_compile.codegen import api  # noqa: E402
from spa_compile.codegen.blockinfo import block_info  # noqa: E402
from spa_compile.codegen.pooling import pool_kv  # noqa: E402
from spa_compile.codegen.sparse_forward import selected_bitmap  # noqa: E402
from spa_compile.ops import config_to_str  # noqa: E402
from spa_compile.visibility import Visibility  # noqa: E402


def host_time(fn, reps=50) -> float:
    fn()
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(reps):
        fn()
    host = (time.perf_counter() - t) / reps
    torch.cuda.synchronize()
    return host


def kernels_per_call(fn) -> int:
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    return sum(e.count for e in prof.key_averages() if e.device_type == torch.autograd.DeviceType.CUDA)


def main(argv=None) -> int:
    import triton

    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", required=True)
    ap.add_argument("--ns", type=int, nargs="+", default=[512, 2048, 16384])
    args = ap.parse_args(argv)
    dev = torch.device("cuda")
    cfg = SPAConfig(mode="spa", density=0.2)
    cstr = config_to_str(cfg)
    rows = []
    for hkv in (32, 8):
        for n in args.ns:
            q = torch.randn(1, 32, n, 128, device=dev, dtype=torch.bfloat16)
            k = torch.randn(1, hkv, n, 128, device=dev, dtype=torch.bfloat16)
            v = torch.randn_like(k)
            scale = 128 ** -0.5

            def op():
                return torch.ops.spa.attention(q, k, v, None, None, None, None, scale, True, 0, -1, cstr)

            vis = Visibility(n, n, causal=True)
            info = block_info(vis, 1, n, n, 64, dev)
            kmax = int(max_selected(n, n, vis, cfg))
            kb, vb, kbl, vbl = pool_kv(k, v, info)
            index, count = api.selection_stage(q, kb, info, scale, cfg, None, kmax)
            stages = {
                "block_info": lambda: block_info(vis, 1, n, n, 64, dev),
                "max_selected": lambda: int(max_selected(n, n, vis, cfg)),
                "pool_kv": lambda: pool_kv(k, v, info),
                "selection_stage": lambda: api.selection_stage(q, kb, info, scale, cfg, None, kmax),
                "selected_bitmap": lambda: selected_bitmap(index, info.nkb),
                "sparse_stage": lambda: api.sparse_stage(q, k, v, kbl, vbl, info, index, count, scale, True),
                "spa_forward": lambda: api.spa_forward(q, k, v, vis, scale, cfg, None),
                "op": op,
            }
            row = {"Hkv": hkv, "N": n, "gpu_ms": triton.testing.do_bench(op, warmup=10, rep=100),
                   "kernels_per_call": kernels_per_call(op),
                   "host_ms": {name: host_time(fn) * 1e3 for name, fn in stages.items()}}
            rows.append(row)
            print(json.dumps(row), flush=True)
    # cProfile of the op at the shortest length, Hkv=32
    n = min(args.ns)
    q = torch.randn(1, 32, n, 128, device=dev, dtype=torch.bfloat16)
    k, v = torch.randn_like(q), torch.randn_like(q)
    op = lambda: torch.ops.spa.attention(q, k, v, None, None, None, None, 0.088, True, 0, -1, cstr)  # noqa: E731
    op()
    torch.cuda.synchronize()
    pr = cProfile.Profile()
    pr.enable()
    for _ in range(200):
        op()
    pr.disable()
    torch.cuda.synchronize()
    s = io.StringIO()
    pstats.Stats(pr, stream=s).sort_stats("tottime").print_stats(35)
    s2 = io.StringIO()
    pstats.Stats(pr, stream=s2).sort_stats("cumulative").print_stats(45)
    text = s.getvalue() + "\n" + s2.getvalue()
    print(text)
    result = {"card": torch.cuda.get_device_name(dev), "torch": torch.__version__, "triton": triton.__version__,
              "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "rows": rows, "cprofile_200_calls": text}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
