"""Where SPA's perplexity goes at a fixed density: block scores against the oracle (CPU or GPU).

    PYTHONPATH=. python3 benchmarks/selection_scores_ppl.py --work DIR [--context 4096] [--windows 8]
        [--rules pooled landmark sub4 oracle] [--selections head group] [--density 0.2] [--out F]

DIR holds the model of benchmarks/long_context_accuracy.py (``model.pt`` or the bf16 shards). The
model runs under ``torch.compile(backend="spa")`` on the SPA reference path with the selection
score replaced through ``reference.select_blocks(block_scores=)`` (forced blocks, k and ties stay
as SPEC.md says; identity projector; fill on). Rules, for the rows t of a query block, its
visible key blocks j (causal) and the heads of a selection head (mean over them for "group"):

    pooled     s qbar . kbar (SPEC.md section 1, identity projector: SPA's default score)
    landmark   mean over rows of softmax_j(s q[t] . kbar[j] + log n[j]): each row's attention over
               the block landmarks (the fill's pseudo-keys)
    subM       the same over M sub-block means per block (Bk / M keys each), summed per block
    psubM      the pooled query's view of subM: softmax over the visible blocks of
               logsumexp_m(s qbar . ksub[j, m]) + log(Bk / M), the block's softmax mass as seen by
               the mean query (cost ~ M x pooled; psub64 = every key)
    qsubAxM    subM with the rows pooled to A query sub-block means (t0:t1 split into A groups):
               mean over them of the softmax over all visible key sub-blocks, summed per block
               (cost ~ A M x pooled; qsub1xM = psubM)
    rowmax     max over rows of s q[t] . kbar[j]
    fineAxM    the package's ``block_score="fine"`` (fine_rows A, fine_keys M; "fine": 16 x 16), run
               as configured (no score swap): checks the implementation against qsubAxM
    oracle     the true block mass: mean over rows of the dense attention each block receives (the
               ceiling of any score at this budget; dense attention's cost)

Prints and writes (``--out``) the per-byte perplexity of each rule as a ratio to dense attention
on held-out text windows (the model's own SDPA path). Causal, no padding: the model's case.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import long_context_accuracy as LC  # noqa: E402
from spa_compile import reference as R  # noqa: E402


def _rule_scores(rule: str, q, k, pooled, vis, scale, cfg, t0: int, t1: int):
    """[B, Hs, NKB] scores of query rows t0:t1 under ``rule`` (causal visibility)."""
    hq, hkv = q.shape[1], pooled.kbar.shape[1]
    bs = cfg.block_size
    nkb = pooled.kbar.shape[2]
    n = k.shape[2]
    rows = torch.arange(t0, t1, device=q.device) + vis.offset
    visible = (torch.arange(nkb, device=q.device) * bs)[None, :] <= rows[:, None]  # [R, NKB]
    qr = q[:, :, t0:t1]
    reduce = "mean"
    if rule == "pooled":
        kbar = R._to_heads(pooled.kbar.to(q.dtype), hq)
        sc = scale * torch.einsum("bhd,bhjd->bhj", qr.mean(2), kbar)
        reduce = "sum"
    elif rule in ("landmark", "rowmax"):
        kbar = R._to_heads(pooled.kbar.to(q.dtype), hq)
        logits = scale * qr @ kbar.transpose(-1, -2)  # [B, Hq, R, NKB]
        if rule == "rowmax":
            sc, reduce = logits.masked_fill(~visible, -math.inf).amax(2), "max"
        else:
            logn = R._to_heads(pooled.count.to(q.dtype), hq).log()[:, :, None, :]
            sc = (logits + logn).masked_fill(~visible, -math.inf).softmax(-1).mean(2)
    elif rule.startswith(("sub", "psub", "qsub")):
        # subM scores every row; psubM / qsubAxM pool the rows to 1 / A means first (cost ~ query
        # blocks, not rows), so they see the query block's visibility: j * bs <= its last row
        if rule.startswith("sub"):
            a, m = None, int(rule[3:])
        elif rule.startswith("psub"):
            a, m = 1, int(rule[4:])
        else:
            a, m = (int(x) for x in rule[4:].split("x"))
        if bs % m:
            raise ValueError(f"{rule}: block size {bs} is not a multiple of {m}")
        kh = F.pad(R._to_heads(k.to(q.dtype), hq), (0, 0, 0, nkb * bs - n))
        sub = kh.unflatten(2, (nkb * m, bs // m)).mean(3)  # [B, Hq, NKB * m, D]; no padding here
        if a is not None:
            qr = R.row_means(qr, a)  # [B, Hq, A, D]
            visible = visible[-1:]
        logits = scale * qr @ sub.transpose(-1, -2) + math.log(bs // m)
        p = logits.masked_fill(~visible.repeat_interleave(m, dim=1), -math.inf).softmax(-1).mean(2)
        sc = p.unflatten(-1, (nkb, m)).sum(-1)
    elif rule == "oracle":
        kh = R._to_heads(k.to(q.dtype), hq)
        logits = scale * qr @ kh.transpose(-1, -2)
        logits = logits.masked_fill(torch.arange(n, device=q.device)[None, :] > rows[:, None], -math.inf)
        p = logits.softmax(-1).mean(2)
        sc = F.pad(p, (0, nkb * bs - n)).unflatten(-1, (nkb, bs)).sum(-1)
    else:
        raise ValueError(f"unknown rule {rule!r}")
    if cfg.selection == "group":
        sc = sc.unflatten(1, (hkv, hq // hkv))
        sc = sc.amax(2) if reduce == "max" else (sc.sum(2) if reduce == "sum" else sc.mean(2))
    return sc


@contextlib.contextmanager
def swapped_scores(score):
    """The reference selection (``reference.select_blocks``, which the op's CPU path calls) with
    ``score(q, k, pooled, vis, scale, cfg, t0, t1) -> [B, Hs, NKB]`` in place of the projector
    score (forced blocks, k and ties unchanged); ``k`` is the call's keys, captured from
    ``reference.pool_blocks``. Identity projector only."""
    orig_select, orig_pool = R.select_blocks, R.pool_blocks
    last: dict = {}

    def pool(k, v, valid, block_k, extrema=False, sub_blocks=None):
        last["k"] = k
        return orig_pool(k, v, valid, block_k, extrema, sub_blocks)

    def select(q, pooled, vis, valid, scale, cfg, projector=None, block_scores=None):
        if projector is not None and not projector.is_identity:
            raise ValueError("swapped_scores: identity projector only")
        k = last["k"]
        return orig_select(q, pooled, vis, valid, scale, cfg, projector,
                           block_scores=lambda t0, t1: score(q, k, pooled, vis, scale, cfg, t0, t1))

    R.select_blocks, R.pool_blocks = select, pool
    try:
        yield
    finally:
        R.select_blocks, R.pool_blocks = orig_select, orig_pool


def scored_selection(rule: str):
    """The reference selection with ``rule``'s score (see the module docstring)."""
    return swapped_scores(lambda q, k, pooled, vis, scale, cfg, t0, t1:
                          _rule_scores(rule, q, k, pooled, vis, scale, cfg, t0, t1))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--work", required=True, help="folder with the long-context model (model.pt or shards)")
    ap.add_argument("--context", type=int, default=4096)
    ap.add_argument("--windows", type=int, default=8, help="held-out text windows")
    ap.add_argument("--rules", nargs="+", default=["pooled", "landmark", "sub4", "oracle"])
    ap.add_argument("--selections", nargs="+", default=["head", "group"])
    ap.add_argument("--density", type=float, default=0.2)
    ap.add_argument("--block-size", type=int, default=64)
    ap.add_argument("--seed", type=int, default=5)
    ap.add_argument("--out", default=None)
    a = ap.parse_args(argv)
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if LC.load_checkpoint(Path(a.work)) is None:
        sys.exit(f"no model in {a.work}: run benchmarks/long_context_accuracy.py --stage train first")
    model = LC.load_model(argparse.Namespace(work=a.work, block_size=a.block_size), dev)
    _, held, _ = LC.corpus(0)
    # the text windows of benchmarks/retrieval_selection.py (its --seed 5: seed + 1)
    text = LC.batch_windows(held, a.windows, a.context, torch.Generator().manual_seed(a.seed + 1))
    torch._dynamo.config.cache_size_limit = 1 << 20
    dn, dc, _ = LC.nll_and_retrieval(model, text, False, 2, dev)
    result = {"context": a.context, "windows": a.windows, "density": a.density, "block_size": a.block_size,
              "device": str(dev), "torch": torch.__version__, "dense_ppl": math.exp(dn / dc), "runs": []}
    print(f"dense ppl {result['dense_ppl']:.4f}", flush=True)
    for rule in a.rules:
        for selection in a.selections:
            torch._dynamo.reset()
            opts = {"mode": "spa", "block_size": a.block_size, "density": a.density, "fill": "landmark",
                    "inner_backend": "eager", "selection": selection}
            if rule.startswith("fine"):  # the package's block_score "fine" (fineAxM), no score swap
                a_, m_ = (int(x) for x in rule[4:].split("x")) if "x" in rule else (16, 16)
                opts.update(block_score="fine", fine_rows=a_, fine_keys=m_)
            fn = torch.compile(model, backend="spa", options=opts, dynamic=False)
            t0 = time.time()
            with contextlib.nullcontext() if rule.startswith("fine") else scored_selection(rule):
                nll, cnt, _ = LC.nll_and_retrieval(fn, text, False, 2, dev)
            row = {"rule": rule, "selection": selection, "ppl": math.exp(nll / cnt),
                   "ppl_ratio": math.exp(nll / cnt - dn / dc), "seconds": time.time() - t0}
            result["runs"].append(row)
            print(f"{rule:9} {selection:5} ppl x{row['ppl_ratio']:.4f} ({row['seconds']:.0f} s)", flush=True)
            if a.out:
                Path(a.out).write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
