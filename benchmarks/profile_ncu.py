"""One SPA op forward per point inside a cudaProfilerStart/Stop range, for Nsight Compute.

    ncu --clock-control none --profile-from-start off --set full -o prof \\
        python3 benchmarks/profile_ncu.py 131072:32:topk32 16384:32:density0.2

(``benchmarks/ncu_profile.sh`` runs that on the device and prints the details.) Each point is
``N:Hkv:mode`` (B=1, Hq=32, D=128, bf16, causal, fresh random inputs, the mode as in
bench_kernels.py). The op runs twice before the range (compiles and tuning stay outside it);
inside it the op forward runs once, and with ``--paths`` the selection kernel alone on each
named path (``selection.select(path=...)``) on the same pooled means.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from bench_kernels import mode_config  # noqa: E402
from spa_compile import spa_attention  # noqa: E402
from spa_compile.budget import max_selected  # noqa: E402
from spa_compile.codegen.blockinfo import block_info  # noqa: E402
from spa_compile.codegen.pooling import pool_kv, pool_q  # noqa: E402
from spa_compile.codegen.selection import select  # noqa: E402
from spa_compile.visibility import Visibility  # noqa: E402


def one_point(spec: str, paths: list[str]) -> None:
    n_s, hkv_s, mode = spec.split(":")
    n, hkv, hq, d = int(n_s), int(hkv_s), 32, 128
    cfg = mode_config(mode)
    dev = torch.device("cuda")
    q = torch.randn(1, hq, n, d, device=dev, dtype=torch.bfloat16)
    k = torch.randn(1, hkv, n, d, device=dev, dtype=torch.bfloat16)
    v = torch.randn_like(k)
    g = hq // hkv

    def op():
        return spa_attention(q, k, v, is_causal=True, enable_gqa=g > 1, config=cfg)

    vis = Visibility(n, n, causal=True)
    info = block_info(vis, 1, n, n, cfg.block_size, dev)
    kmax = int(max_selected(n, n, vis, cfg))
    kbar, _vbar, _, _ = pool_kv(k, v, info)
    qsum = pool_q(q, cfg.block_size).unflatten(1, (hkv, g)).sum(dim=2)
    for _ in range(2):
        op()
        for p in paths:
            select(qsum, kbar, info, d ** -0.5, cfg, kmax, path=p)
    torch.cuda.synchronize()
    torch.cuda.profiler.start()
    op()
    for p in paths:
        select(qsum, kbar, info, d ** -0.5, cfg, kmax, path=p)
    torch.cuda.synchronize()
    torch.cuda.profiler.stop()
    print(f"profiled {spec} (+ selection paths {paths})", flush=True)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("points", nargs="+", help="N:Hkv:mode, e.g. 131072:32:topk32")
    ap.add_argument("--paths", nargs="*", default=[], help="also the selection kernel alone on these paths")
    args = ap.parse_args(argv)
    for spec in args.points:
        one_point(spec, args.paths)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
