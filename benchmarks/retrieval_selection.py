"""Why SPA misses planted-key retrieval, and which block score would find the needle.

    PYTHONPATH=. python3 benchmarks/retrieval_selection.py --work DIR [--context 4096] [--samples 8]

DIR holds the model of benchmarks/long_context_accuracy.py (``model.pt`` or the bf16 shards
``model-*-of-*.safetensors`` that ``long_context_gpu.sh`` brings back). Runs on the CPU (the SPA
reference path) or a GPU. Two parts:

1. diagnose  Per retrieval window: the dense attention of the answer rows (the rows that predict the
             value bytes) per key block, for every layer and query head. A "retrieval head" puts
             at least half of that mass on one key block outside the last four (the planted line).
             For each, the rank of that block among the visible key blocks of the last query block
             under several block scores (0 = ranked first):
             ``pooled``        qbar . kbar (SPEC.md section 1, identity projector: what SPA runs)
             ``answer_mean``   the mean of the answer rows only . kbar (an oracle for the query side)
             ``key_max``       qbar . k, max over the block's keys (an oracle for the key side)
             ``row_max``       q[t] . kbar, max over the block's rows
             ``bound``         max over rows t of sum_d max(q[t,d] kmax[j,d], q[t,d] kmin[j,d]): an
                               upper bound of q[t] . k over the keys of block j from the per-channel
                               key minima and maxima (Quest-style), = Q+ Kmax^T + Q- Kmin^T
             ``exact``         the largest q[t] . k[u] over the block pair (dense attention's cost)
2. end to end  Retrieval accuracy (all value bytes right) and per-byte perplexity of the model under
             torch.compile(backend="spa") at the given densities, with the SPEC score ("pooled")
             and with ``bound`` or ``hybrid`` (the better of a block's pooled and bound ranks)
             swapped in for the selection score (an experiment: the reference selection with its
             scoring replaced through ``reference.select_blocks(block_scores=)``; not a supported
             option of spa_compile).

Writes a JSON (``--out``) with every rank and figure.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import random
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import long_context_accuracy as LC  # noqa: E402
from selection_scores_ppl import swapped_scores  # noqa: E402
from spa_compile import reference as R  # noqa: E402

SCORES = ("pooled", "answer_mean", "key_max", "row_max", "bound", "exact")


def key_extrema(k: torch.Tensor, block: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel max and min of each key block's keys, ``[..., NKB, D]`` each, any leading dims
    (``reference.key_extrema`` with every key valid; a partial last block takes its own keys)."""
    lead, (n, d) = k.shape[:-2], k.shape[-2:]
    valid = torch.ones(1, 1, n, dtype=torch.bool, device=k.device)
    hi, lo = R.key_extrema(k.reshape(1, -1, n, d), valid, block)
    return hi.reshape(*lead, -1, d).to(k.dtype), lo.reshape(*lead, -1, d).to(k.dtype)


def bound_scores(qrows: torch.Tensor, kmax: torch.Tensor, kmin: torch.Tensor) -> torch.Tensor:
    """max over rows of the upper bound of q . k per key block: ``[..., R, D]`` x ``[..., NKB, D]``
    -> ``[..., NKB]`` (``reference.bound_scores`` per leading index, scale 1)."""
    lead = qrows.shape[:-2]
    flat = lambda x: x.reshape(1, -1, *x.shape[-2:])  # noqa: E731
    h = flat(qrows).shape[1]
    return R.bound_scores(flat(qrows), flat(kmax), flat(kmin), h, 1.0).reshape(*lead, -1)


def block_ranks(q: torch.Tensor, k: torch.Tensor, rows: torch.Tensor, block: int, target: int) -> dict:
    """Rank of key block ``target`` for the last query block of one head under each score.
    q ``[N, D]``, k ``[N, D]`` (the head's kv head), rows: the answer rows."""
    n = q.shape[0]
    nkb = -(-n // block)
    far = nkb - 4  # the blocks a score must rank; the last ones are forced (local, diagonal)
    blk = q[(nkb - 1) * block:]
    kbar = F.pad(k, (0, 0, 0, nkb * block - n)).unflatten(0, (nkb, block)).mean(1)
    kmax, kmin = key_extrema(k, block)

    def key_max(qv):
        return F.pad(qv @ k.T, (0, nkb * block - n), value=-math.inf).unflatten(-1, (nkb, block)).amax(-1)

    scores = {
        "pooled": blk.mean(0) @ kbar.T,
        "answer_mean": q[rows].mean(0) @ kbar.T,
        "key_max": key_max(blk.mean(0)),
        "row_max": (blk @ kbar.T).amax(0),
        "bound": bound_scores(blk, kmax, kmin),
        "exact": key_max(blk).amax(0),
    }
    return {name: int((s[:far] > s[target]).sum()) for name, s in scores.items()}


@contextlib.contextmanager
def capture_attention(store: list):
    """Record (q, k) of every F.scaled_dot_product_attention call of the long-context model."""
    orig = LC.F.scaled_dot_product_attention

    def cap(q, k, v, **kw):
        store.append((q.detach().float(), k.detach().float()))
        return orig(q, k, v, **kw)

    LC.F.scaled_dot_product_attention = cap
    try:
        yield
    finally:
        LC.F.scaled_dot_product_attention = orig


def diagnose(model, windows: torch.Tensor, block: int, min_mass: float) -> list[dict]:
    out = []
    n = windows.shape[1]
    rows = torch.arange(n - LC.VALUE_LEN - 1, n - 1)
    nkb = -(-n // block)
    for si, x in enumerate(windows):
        caps: list = []
        with capture_attention(caps), torch.no_grad():
            logits = model(x[None].long().to(next(model.parameters()).device))
        dense_ok = bool((logits[0, -LC.VALUE_LEN - 1:-1].argmax(-1).cpu() == x[-LC.VALUE_LEN:]).all())
        for layer, (q, k) in enumerate(caps):
            hq, hkv = q.shape[1], k.shape[1]
            for h in range(hq):
                kh = k[0, h // (hq // hkv)]
                s = q[0, h, rows] @ kh.T / math.sqrt(q.shape[-1])
                s = s.masked_fill(torch.arange(n, device=s.device)[None, :] > rows.to(s.device)[:, None], -math.inf)
                mass = F.pad(s.softmax(-1).mean(0), (0, nkb * block - n)).unflatten(0, (nkb, block)).sum(-1)
                far = nkb - 4
                top = int(mass[:far].argmax())
                if float(mass[top]) < min_mass:
                    continue
                ranks = block_ranks(q[0, h], kh, rows, block, top)
                out.append({"sample": si, "dense_correct": dense_ok, "layer": layer, "head": h, "block": top,
                            "mass": round(float(mass[top]), 3), "visible_far_blocks": far, "ranks": ranks})
                print(f"[diagnose] sample {si} layer {layer} head {h}: block {top} holds {float(mass[top]):.2f} "
                      f"of the answer rows' attention; ranks of {far}: {ranks}", flush=True)
    return out


def _ranks(score: torch.Tensor) -> torch.Tensor:
    """0 for the highest score of the last dim, 1 for the next, ... (ties: lower index first)."""
    return torch.sort(score, dim=-1, descending=True, stable=True).indices.argsort(dim=-1)


def bound_selection(rule: str = "bound"):
    """The reference selection with another score in place of SPEC's pooled score (forced
    blocks, top-k counts and ties unchanged): ``bound`` (group selection: the max over the
    group's heads), or ``hybrid``: a block's better rank under pooled and bound, so the top k
    takes about k/2 blocks of each. Identity projector only. An experiment: it patches
    ``reference.select_blocks`` (``selection_scores_ppl.swapped_scores``), which the op's CPU path
    calls, so it acts on the CPU path only."""
    ranges: dict = {}  # the key ranges of the current call, computed once for all its query blocks

    def score(q, k, pooled, vis, scale, cfg, t0, t1):  # [B, Hs, NKB]
        hq, hkv = q.shape[1], k.shape[1]
        if ranges.get("k") is not k:
            ranges["k"], ranges["x"] = k, key_extrema(R._to_heads(k.to(q.dtype), hq), cfg.block_size)
        kmax, kmin = ranges["x"]
        sc = bound_scores(q[:, :, t0:t1], kmax, kmin)
        sc = sc.unflatten(1, (hkv, hq // hkv)).amax(2) if cfg.selection == "group" else sc
        if rule == "hybrid":
            kbar = R._to_heads(pooled.kbar.to(q.dtype), hq)
            pooled_sc = torch.einsum("bhd,bhjd->bhj", q[:, :, t0:t1].mean(2), kbar)
            if cfg.selection == "group":
                pooled_sc = pooled_sc.unflatten(1, (hkv, hq // hkv)).sum(2)
            return -torch.minimum(_ranks(sc), _ranks(pooled_sc)).to(q.dtype)
        return scale * sc

    return swapped_scores(score)


def end_to_end(model, windows, text, densities, block, dev) -> list[dict]:
    res = []
    torch._dynamo.config.cache_size_limit = 1 << 20
    _, _, dense_correct = LC.nll_and_retrieval(model, windows, True, 4, dev)
    dn, dc, _ = LC.nll_and_retrieval(model, text, False, 2, dev)
    res.append({"score": "dense", "density": None, "retrieval_correct": dense_correct, "samples": len(windows),
                "ppl": math.exp(dn / dc), "ppl_ratio": 1.0})
    print(f"[end-to-end] dense: retrieval {dense_correct}/{len(windows)} ppl {math.exp(dn / dc):.4f}", flush=True)
    for score in ("pooled", "bound", "hybrid"):
        for density in densities:
            torch._dynamo.reset()
            opts = {"mode": "spa", "block_size": block, "density": density, "fill": "landmark",
                    "inner_backend": "eager"}
            fn = torch.compile(model, backend="spa", options=opts, dynamic=False)
            t0 = time.time()
            with bound_selection(score) if score != "pooled" else contextlib.nullcontext():
                _, _, correct = LC.nll_and_retrieval(fn, windows, True, 4, dev)
                nll, cnt, _ = LC.nll_and_retrieval(fn, text, False, 2, dev)
            row = {"score": score, "density": density, "retrieval_correct": correct, "samples": len(windows),
                   "ppl": math.exp(nll / cnt), "ppl_ratio": math.exp(nll / cnt - dn / dc), "seconds": time.time() - t0}
            res.append(row)
            print(f"[end-to-end] {score} density {density}: retrieval {correct}/{len(windows)} "
                  f"ppl x{row['ppl_ratio']:.4f}", flush=True)
    return res


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--work", required=True, help="folder with the long-context model (model.pt or shards)")
    ap.add_argument("--context", type=int, default=4096)
    ap.add_argument("--samples", type=int, default=8, help="retrieval windows")
    ap.add_argument("--text-windows", type=int, default=4, help="held-out text windows for perplexity")
    ap.add_argument("--densities", type=float, nargs="+", default=[0.1, 0.2])
    ap.add_argument("--block-size", type=int, default=64)
    ap.add_argument("--min-mass", type=float, default=0.5, help="answer-row mass that makes a retrieval head")
    ap.add_argument("--skip-end-to-end", action="store_true")
    ap.add_argument("--seed", type=int, default=5)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "retrieval_selection.json"))
    a = ap.parse_args()
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if LC.load_checkpoint(Path(a.work)) is None:
        sys.exit(f"no model in {a.work}: run benchmarks/long_context_accuracy.py --stage train (or "
                 f"long_context_gpu.sh) first and pass its work folder")
    model = LC.load_model(argparse.Namespace(work=a.work, block_size=a.block_size), dev)
    _, held, _ = LC.corpus(0)
    gen, rng = torch.Generator().manual_seed(a.seed), random.Random(a.seed)
    windows = torch.stack([LC.plant_retrieval(LC.batch_windows(held, 1, a.context, gen)[0], rng, region=0.25)
                           for _ in range(a.samples)])
    text = LC.batch_windows(held, a.text_windows, a.context, torch.Generator().manual_seed(a.seed + 1))
    result = {"context": a.context, "block_size": a.block_size, "device": str(dev), "torch": torch.__version__,
              "samples": a.samples, "text_windows": a.text_windows}
    result["diagnose"] = diagnose(model, windows, a.block_size, a.min_mass)
    heads = result["diagnose"]
    result["median_rank"] = {s: sorted(r["ranks"][s] for r in heads)[len(heads) // 2] for s in SCORES} if heads else {}
    result["ranked_first"] = {s: sum(r["ranks"][s] == 0 for r in heads) for s in SCORES}
    print(f"[diagnose] {len(heads)} retrieval head-windows; median rank {result['median_rank']}; "
          f"ranked first {result['ranked_first']}", flush=True)
    if not a.skip_end_to_end:
        result["end_to_end"] = end_to_end(model, windows, text, a.densities, a.block_size, dev)
    Path(a.out).write_text(json.dumps(result, indent=1))
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
