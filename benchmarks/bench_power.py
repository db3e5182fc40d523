"""Power and clock of the sparse forward and of FlexAttention on the same blocks, each run alone
for a few seconds: does the sparse kernel draw more power (and so throttle itself more) at the
card's cap?

    PYTHONPATH=. python3 benchmarks/bench_power.py --out $OUT/power.json [--points 131072:32:topk32] [--seconds 3] \\
        [--variant '{"GO": true}']

For each point and kernel: a 1 s idle pause, then the kernel launched back to back for
``--seconds`` while a thread reads NVML (``torch.cuda.power_draw``, ``clock_rate``) every 50 ms;
recorded: the mean and last-second power (W) and SM clock (MHz), and ms per call (wall time over
calls, the queue synchronized every 8 calls). The outputs are checked against each other first.
``--variant``: also the tuned config with these overrides (bench_forward_configs.py's
``--tuned-plus``), run between the two runs of the tuned kernel.
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_gluon_forward import forward_point, run_points  # noqa: E402
from bench_forward_configs import tuned_config  # noqa: E402
from bench_kernels import flex_block_mask, flex_run, rel  # noqa: E402
from spa_compile.codegen import api, sparse_forward  # noqa: E402


def sample_while(fn, seconds: float) -> dict:
    """Run ``fn`` back to back for ``seconds`` while sampling power and clock every 50 ms."""
    samples, stop = [], threading.Event()

    def poll():
        while not stop.is_set():
            try:
                samples.append((time.time(), torch.cuda.power_draw() / 1000.0, torch.cuda.clock_rate()))
            except Exception:  # noqa: BLE001 - no NVML: no samples
                return
            time.sleep(0.05)

    torch.cuda.synchronize()
    time.sleep(1.0)
    th = threading.Thread(target=poll, daemon=True)
    th.start()
    t0, calls = time.time(), 0
    while time.time() - t0 < seconds:
        for _ in range(8):
            fn()
        calls += 8
        torch.cuda.synchronize()
    wall = time.time() - t0
    stop.set()
    th.join()
    last = [s for s in samples if s[0] >= t0 + wall - 1.0]

    def mean(xs, i):
        return sum(x[i] for x in xs) / len(xs) if xs else None

    return {"ms_per_call": wall * 1e3 / calls, "calls": calls, "samples": len(samples),
            "power_w_mean": mean(samples, 1), "power_w_last_s": mean(last, 1),
            "sm_mhz_mean": mean(samples, 2), "sm_mhz_last_s": mean(last, 2)}


def one_point(n: int, hkv: int, mode: str, seconds: float, variant: dict | None = None) -> dict:
    q, k, v, info, _, _, index, count, scale, _ = forward_point(n, hkv, mode)
    flex = flex_run(flex_block_mask(index, count, q.shape[1], n, info.block))

    def sparse():
        return api.sparse_stage(q, k, v, None, None, info, index, count, scale, False)[0]

    def flex_call():
        return flex(q, k, v)

    runs = [("spa_sparse", sparse), ("flex", flex_call)]
    with torch.no_grad():
        err = rel(sparse(), flex_call())
        assert err < 2e-2, f"sparse and Flex disagree: {err}"
        pt = {"N": n, "Hkv": hkv, "mode": mode, "rel_err": err}
        if variant:
            conf = dict(tuned_config(q, k, v, (k, v), info, index, count, scale, False), **variant)

            def variant_call():
                return sparse_forward.launch_forward(q, k, v, k, v, info, index, count, scale, False, conf)[0]

            pt["variant_config"], pt["variant_rel_err"] = conf, rel(variant_call(), sparse())
            assert pt["variant_rel_err"] < 1e-2, f"the variant disagrees with the tuned kernel: {pt['variant_rel_err']}"
            runs.append(("spa_sparse_variant", variant_call))
        for name, fn in runs + [("spa_sparse_again", sparse)]:
            pt[name] = sample_while(fn, seconds)
            print(name, json.dumps(pt[name]), flush=True)
    return pt


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="benchmarks/results/bench_power.json")
    ap.add_argument("--points", nargs="+", default=["131072:32:topk32"], help="N:Hkv:mode")
    ap.add_argument("--seconds", type=float, default=3.0)
    ap.add_argument("--variant", default=None, help="overrides of the tuned config as a JSON object, e.g. {\"GO\": true}")
    a = ap.parse_args(argv)
    variant = json.loads(a.variant) if a.variant else None
    run_points(a.points, lambda n, hkv, mode: one_point(n, hkv, mode, a.seconds, variant), a.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
