"""Can the selection hide behind the sparse forward? The two launched on two CUDA streams at once,
against one after the other, on one card.

    PYTHONPATH=. python3 benchmarks/bench_overlap.py --out $OUT/overlap.json [--points 131072:32:topk32 ...]

The question behind it (issue #3): at 128K top-k 32, Hkv=32, the op takes 18.2 ms, of which the
streaming selection is about 2.4 ms and the pooling 0.8. The selection is latency-bound
(shuffles, compares); the forward is bound by its MMAs. If programs of both share the SMs, a
pipelined op (select query blocks i+1.. while the forward runs on blocks ..i) could hide most of
the selection. This measures the ceiling of that: the forward on a fixed selection and a whole
selection stage (pool the key and query means, score, top-k) launched together.

B=1, Hq=32, D=128, bf16, causal, block 64, fresh random inputs. For each point, median ms of
CUDA-event-timed rounds (L2 flushed and a 200 ms idle pause before each; the variants in turns):
``select``, ``forward`` (with the landmark fill), ``serial`` (select, then forward, one stream),
``overlap_sel_first`` / ``overlap_fwd_first`` (each on its own stream, launched in that order).
The forward's outputs with and without a concurrent selection are checked equal first.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_gluon_forward import forward_point, run_points  # noqa: E402
from bench_kernels import interleaved, mode_config  # noqa: E402
from spa_compile.budget import max_selected  # noqa: E402
from spa_compile.codegen import api  # noqa: E402
from spa_compile.visibility import Visibility  # noqa: E402

_FLUSH = {}


def timed(fn, _rep_ms=None) -> float:
    """One CUDA-event-timed call of ``fn`` after an L2 flush (ms); ``interleaved``'s timer."""
    if "buf" not in _FLUSH:
        _FLUSH["buf"] = torch.empty(64 << 20, dtype=torch.int32, device="cuda")
    _FLUSH["buf"].zero_()
    s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    s.record()
    fn()
    e.record()
    e.synchronize()
    return s.elapsed_time(e)


def on_two_streams(first, second):
    """``first`` and ``second`` launched on two side streams, in that order, joined back."""
    main = torch.cuda.current_stream()
    streams = [torch.cuda.Stream(), torch.cuda.Stream()]
    for st, fn in zip(streams, (first, second)):
        st.wait_stream(main)
        with torch.cuda.stream(st):
            fn()
    for st in streams:
        main.wait_stream(st)


def one_point(n: int, hkv: int, mode: str, rounds: int) -> dict:
    q, k, v, info, klp, vlp, index, count, scale, _ = forward_point(n, hkv, mode)
    cfg = mode_config(mode)
    kmax = int(max_selected(n, n, Visibility(n, n, causal=True), cfg))

    def select():
        qb, kb = api.pool_means(q, k, v, info, cfg, values=False)[:2]
        return api.selection_stage(q, kb, info, scale, cfg, None, kmax, k, qbar=qb)[0]

    def forward():
        return api.sparse_stage(q, k, v, klp, vlp, info, index, count, scale, True)

    want = forward()[0].clone()
    got = {}
    on_two_streams(select, lambda: got.setdefault("o", forward()[0]))
    torch.cuda.synchronize()
    assert torch.equal(got["o"], want), "the forward differs with a concurrent selection"
    calls = {
        "select": select,
        "forward": forward,
        "serial": lambda: (select(), forward()),
        "overlap_sel_first": lambda: on_two_streams(select, forward),
        "overlap_fwd_first": lambda: on_two_streams(forward, select),
    }
    for fn in calls.values():  # warm-up (compiles, tuning lookups)
        fn()
    med, per, _ = interleaved(calls, rounds, 0, cooldown_s=0.2, timer=timed)
    pt = {"N": n, "Hkv": hkv, "mode": mode, "median_ms": med, "round_ms": per,
          "hidden_ms_sel_first": med["serial"] - med["overlap_sel_first"],
          "hidden_ms_fwd_first": med["serial"] - med["overlap_fwd_first"]}
    print(json.dumps({k_: v_ for k_, v_ in pt.items() if k_ != "round_ms"}), flush=True)
    return pt


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="benchmarks/results/bench_overlap.json")
    ap.add_argument("--points", nargs="+", default=["131072:32:topk32", "131072:8:topk32", "16384:32:density0.2"],
                    help="N:Hkv:mode")
    ap.add_argument("--rounds", type=int, default=7)
    a = ap.parse_args(argv)
    run_points(a.points, lambda n, hkv, mode: one_point(n, hkv, mode, a.rounds), a.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
