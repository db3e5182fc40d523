"""The spa_compile demo: a small LLaMA-style model under ``torch.compile(backend="spa")``.

1. ``spa_compile.explain`` prints which attention sites SPA takes, and why.
2. Forced exact (every visible block selected), the compiled model equals eager dense attention.
3. At density 0.25 it runs sparse: the output is compared with dense attention.
4. One training step through the SPA op (backward included).

Runs on the CPU (the reference path) or on CUDA (the Triton kernels).
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(__file__))
import spa_compile  # noqa: E402
from models import TinyLlama  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seq-len", type=int, default=1024)
    parser.add_argument("--density", type=float, default=0.25)
    parser.add_argument("--block-size", type=int, default=64)
    parser.add_argument("--inner-backend", default="inductor", choices=["inductor", "aot_eager", "eager"])
    args = parser.parse_args()

    torch.manual_seed(0)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    # head dim 16 on the CPU (fast), 64 on a GPU (the Triton kernels take head dims >= 32)
    model = (TinyLlama(dim=512) if device == "cuda" else TinyLlama()).to(device)
    idx = torch.randint(0, 256, (1, args.seq_len), device=device)
    options = {"mode": "spa", "density": args.density, "block_size": args.block_size,
               "inner_backend": args.inner_backend}

    print(spa_compile.explain(model, idx, config=options), "\n")
    print("SPA path:", _path(model, idx, options), "\n")

    with torch.no_grad():
        dense = model(idx)
        t = time.perf_counter()
        exact = torch.compile(model, backend="spa", options={**options, "density": 1.0})(idx)
        exact_err = float((exact - dense).norm() / dense.norm())
        print(f"forced exact (density 1.0): relative error to dense {exact_err:.2e}"
              f"  (compile + run {time.perf_counter() - t:.1f} s)")
        torch._dynamo.reset()
        sparse = torch.compile(model, backend="spa", options=options)(idx)
    rel = float((sparse - dense).norm() / dense.norm())
    agree = float((sparse.argmax(-1) == dense.argmax(-1)).float().mean())
    print(f"density {args.density}: relative error of the logits {rel:.3e}, next-token agreement {agree:.1%}"
          " (random weights: attention is nearly uniform, the hardest case for block selection)")

    compiled = torch.compile(model, backend="spa", options=options)
    loss = F.cross_entropy(compiled(idx)[0, :-1], idx[0, 1:])
    loss.backward()
    grad_norm = sum(p.grad.norm() ** 2 for p in model.parameters() if p.grad is not None) ** 0.5
    print(f"training step: loss {loss.item():.4f}, gradient norm {grad_norm:.4f}")

    # fp32 on the CPU; on a GPU the kernels' fp32 dots run in tf32 (about 3e-4 relative)
    ok = exact_err < (1e-5 if device == "cpu" else 3e-3) and bool(torch.isfinite(grad_norm))
    print("demo", "OK" if ok else "FAILED")
    return 0 if ok else 1


def _path(model, idx, options) -> str:
    """Which implementation the SPA op runs here: the Triton kernels or the reference."""
    if not idx.is_cuda:
        return "reference (pure PyTorch, CPU)"
    from spa_compile import codegen
    from spa_compile.config import SPAConfig
    from spa_compile.visibility import Visibility

    attn = model.layers[0].self_attn
    n = idx.shape[1]
    q = torch.empty(1, attn.heads, n, attn.hd, device=idx.device)
    k = torch.empty(1, attn.kv_heads, n, attn.hd, device=idx.device)
    cfg = SPAConfig.from_options({f: v for f, v in options.items() if f != "inner_backend"})
    reason = codegen.unsupported_reason(q, k, k, Visibility(nq=n, nk=n, causal=True), cfg)
    return "Triton kernels (CUDA)" if reason is None else f"reference ({reason})"


if __name__ == "__main__":
    sys.exit(main())
