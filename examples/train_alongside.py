"""Fit the SPA projectors while the model trains under the SPA backend (spa_compile.training_alongside).

    python examples/train_alongside.py                      # CPU: small model, 256 tokens
    python examples/train_alongside.py --seq-len 4096       # CUDA: the Triton kernels

1. A ProjectorTrainer is registered under a projector file path; the model is compiled with
   options={"projectors": trainer.path}: the backend attaches the trainer's live Pq/Pk to every SPA
   site and puts a distillation tap beside each one.
2. Each training step runs as usual; the taps sample ``--sample-blocks`` query blocks per site and
   accumulate the gradient of the KL loss of SPEC.md (detached from the model); trainer.step() is
   one Adam step on the projectors.
3. The example prints the model loss, the projectors' auxiliary loss, the time of a step with and
   without the taps, and at the end the block recall of the pooled and the trained projectors
   (spa_compile.calibrate.evaluate) on a fresh batch; the projectors are saved for inference.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(__file__))
from models import TinyLlama  # noqa: E402

from spa_compile import calibrate as C  # noqa: E402
from spa_compile.training_alongside import ProjectorTrainer  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--block-size", type=int, default=32)
    ap.add_argument("--density", type=float, default=0.25)
    ap.add_argument("--sample-blocks", type=int, default=1)
    ap.add_argument("--inner-backend", default="aot_eager", choices=["inductor", "aot_eager", "eager"])
    ap.add_argument("--out", default=os.path.join(tempfile.gettempdir(), "spa_projectors_alongside.safetensors"))
    args = ap.parse_args()

    torch.manual_seed(0)
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    model = TinyLlama().to(dev)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    spa = {"mode": "spa", "block_size": args.block_size, "density": args.density, "sink_blocks": 0,
           "local_blocks": 0, "inner_backend": args.inner_backend}
    # a toy language: repeated random motifs, so attention has structure to find
    motifs = torch.randint(0, 256, (64, 16))

    def data(seed):
        g = torch.Generator().manual_seed(seed)
        picks = torch.randint(0, 64, (2, args.seq_len // 16), generator=g)
        return motifs[picks].flatten(1).to(dev)

    if os.path.exists(args.out):
        os.remove(args.out)
    with ProjectorTrainer(args.out, lr=1e-2, sample_blocks=args.sample_blocks) as trainer:
        compiled = torch.compile(model, backend="spa", options=trainer.options(**spa))
        plain = torch.compile(model, backend="spa", options=spa)  # the same model without the taps
        timings = {"with taps": [], "without": []}
        for step in range(args.steps):
            x = data(step)
            for label, fn in (("with taps", compiled), ("without", plain)):
                if label == "without":
                    trainer.pause()
                t0 = time.perf_counter()
                loss = F.cross_entropy(fn(x)[:, :-1].flatten(0, 1), x[:, 1:].flatten())
                loss.backward()
                if dev == "cuda":
                    torch.cuda.synchronize()
                if step >= 2:  # after compilation
                    timings[label].append(time.perf_counter() - t0)
                if label == "with taps":
                    opt.step()
                opt.zero_grad()
                trainer.resume()
            aux = trainer.step()
            if step % 5 == 0 or step == args.steps - 1:
                mean_aux = sum(aux.values()) / max(len(aux), 1)
                print(f"step {step:3d}  model loss {loss.item():.3f}  projector KL {mean_aux:.4f}")
        path = trainer.save()
        with_taps = sum(timings["with taps"]) / max(1, len(timings["with taps"]))
        without = sum(timings["without"]) / max(1, len(timings["without"]))
        print(f"step time: {with_taps * 1e3:.1f} ms with the taps, {without * 1e3:.1f} ms without "
              f"({(with_taps / without - 1) * 100:+.1f}%)")
        print(f"projectors saved to {path}")
        res = C.evaluate(model, [data(10_000)], {k: v for k, v in spa.items() if k not in ("mode", "inner_backend")},
                         trainer.projector_file())
        for m in ("pooled", "fitted", "oracle"):
            r = sum(v["recall"][m] * v["query_blocks"] for v in res.values()) / sum(v["query_blocks"] for v in res.values())
            print(f"block recall on a fresh batch, {m:7s} {r:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
