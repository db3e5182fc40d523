"""Long-context accuracy of SPA: a small GPT-style model (RoPE, GQA) trained for a few minutes.

    PYTHONPATH=. python3 benchmarks/long_context_accuracy.py            # everything, one GPU
    PYTHONPATH=. python3 benchmarks/long_context_accuracy.py --stage train      # or stage by stage
    PYTHONPATH=. python3 benchmarks/long_context_accuracy.py --stage calibrate
    PYTHONPATH=. python3 benchmarks/long_context_accuracy.py --stage eval
    PYTHONPATH=. python3 benchmarks/long_context_accuracy.py --smoke    # tiny CPU run of every code path

Stages (each reuses what the previous one wrote in --work, so a run cut by a time limit goes on):

1. train      a byte-level decoder (8 layers, 8 query heads, 2 kv heads, head dim 64, RoPE, SwiGLU,
              ~22M parameters) on real text: Python's standard library sources and its
              documentation (pydoc_data.topics), files split into train / held-out by a hash of
              their path. A share of the training sequences are retrieval samples: key/value pairs
              planted early ("# key abc123 = x7y8z9"), one of them asked for at the end
              ("# lookup abc123 -> x7y8z9"). Half the time at 4K tokens, then 16K.
2. calibrate  spa_compile.calibrate on training-distribution windows (4K, 8K, 16K) at block size 64:
              the fitted projectors, and block recall at each density (pooled / fitted / oracle)
              on held-out windows at 8K and 16K.
3. eval       per context length (4K, 8K, 16K): per-byte perplexity on held-out text and retrieval
              accuracy (pairs planted in the first quarter, asked for at the end; all 6 value bytes
              right under teacher forcing), dense (SDPA) and SPA through torch.compile(backend="spa")
              at densities 0.1 / 0.2 / 0.3, pooled and calibrated projectors, fill "landmark" and "none".

Writes benchmarks/results/long_context.json and docs/long_context_{ppl,recall,retrieval}.png, and
checks the targets of the projector issue: at 8K and 16K, calibrated SPA at density 0.2 within 1%
of dense perplexity and equal to dense on retrieval; fitted recall >= pooled recall + 5 points.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import math
import random
import sys
import sysconfig
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import spa_compile  # noqa: E402
from spa_compile import calibrate as C  # noqa: E402
from spa_compile.backend import recording  # noqa: E402


# ---------------------------------------------------------------------------------------
# Data: Python's standard library sources and documentation, as bytes
# ---------------------------------------------------------------------------------------


def corpus(max_bytes: int | None = None) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """(train, held-out) uint8 tensors; a file goes to held-out when a hash of its path says so."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(p for p in stdlib.rglob("*.py") if "site-packages" not in p.parts and "dist-packages" not in p.parts)
    train, held = bytearray(), bytearray()
    n_files = [0, 0]
    for p in files:
        try:
            data = p.read_bytes()
        except OSError:
            continue
        rel = str(p.relative_to(stdlib))
        is_held = int(hashlib.sha1(rel.encode()).hexdigest(), 16) % 20 == 0
        (held if is_held else train).extend(b"\n\n# file: " + rel.encode() + b"\n" + data)
        n_files[is_held] += 1
        if max_bytes and len(train) > max_bytes and len(held) > max_bytes // 8:
            break
    try:
        from pydoc_data.topics import topics
    except ImportError:  # pragma: no cover
        topics = {}
    for name in sorted(topics):
        is_held = int(hashlib.sha1(name.encode()).hexdigest(), 16) % 20 == 0
        (held if is_held else train).extend(b"\n\n" + topics[name].encode("utf-8", "replace"))
    info = {"source": f"Python {sys.version.split()[0]} standard library (*.py) + pydoc_data.topics",
            "train_bytes": len(train), "heldout_bytes": len(held), "train_files": n_files[0], "heldout_files": n_files[1]}
    return torch.frombuffer(train, dtype=torch.uint8).clone(), torch.frombuffer(held, dtype=torch.uint8).clone(), info


ALPHABET = "abcdefghijklmnopqrstuvwxyz0123456789"
VALUE_LEN = 6


def _word(rng: random.Random) -> str:
    return "".join(rng.choice(ALPHABET) for _ in range(VALUE_LEN))


def plant_retrieval(window: torch.Tensor, rng: random.Random, pairs: int = 4, region: float = 0.25,
                    lookups: int = 1) -> torch.Tensor:
    """Plant ``pairs`` key/value lines in the first ``region`` of ``window`` and ask for one at the end.

    The value is the last VALUE_LEN bytes of the window. ``lookups > 1`` (training) also asks
    ``lookups - 1`` times in between, after the planted region: more answer bytes to learn from."""
    buf = bytearray(window.tolist())
    n = len(buf)
    keys = [_word(rng) for _ in range(pairs)]
    vals = [_word(rng) for _ in range(pairs)]
    lines = [f"\n# key {k} = {v}\n".encode() for k, v in zip(keys, vals)]
    span = max(len(lines[0]) + 1, int(n * region) - len(lines[0]))
    slots = sorted(rng.sample(range(0, span // len(lines[0])), pairs)) if span // len(lines[0]) >= pairs else range(pairs)
    end = 0
    for slot, line in zip(slots, lines):
        pos = slot * len(line)
        buf[pos:pos + len(line)] = line
        end = max(end, pos + len(line))
    j = rng.randrange(pairs)
    tail = f"\n# lookup {keys[j]} -> {vals[j]}".encode()
    if lookups > 1:
        width = len(tail) + 1
        room = (n - len(tail) - end) // width
        for slot in rng.sample(range(room), min(lookups - 1, max(room, 0))):
            i = rng.randrange(pairs)
            pos = end + slot * width
            buf[pos:pos + width] = f"\n# lookup {keys[i]} -> {vals[i]}\n".encode()
    buf[n - len(tail):] = tail
    return torch.tensor(list(buf), dtype=torch.uint8)


# ---------------------------------------------------------------------------------------
# The model
# ---------------------------------------------------------------------------------------


@dataclass
class ModelConfig:
    vocab: int = 256
    dim: int = 512
    layers: int = 8
    heads: int = 8
    kv_heads: int = 2
    mlp: int = 1408
    max_len: int = 16384
    rope_base: float = 100000.0


class RMSNorm(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.w = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        return x * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + 1e-6).to(x.dtype) * self.w


def rope(x, cos, sin):
    x1, x2 = x[..., 0::2], x[..., 1::2]
    return torch.stack((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1).flatten(-2)


class Attention(nn.Module):
    def __init__(self, c: ModelConfig):
        super().__init__()
        self.h, self.hkv, self.hd = c.heads, c.kv_heads, c.dim // c.heads
        self.wq = nn.Linear(c.dim, c.dim, bias=False)
        self.wkv = nn.Linear(c.dim, 2 * self.hkv * self.hd, bias=False)
        self.wo = nn.Linear(c.dim, c.dim, bias=False)

    def forward(self, x, cos, sin):
        b, n, _ = x.shape
        q = self.wq(x).view(b, n, self.h, self.hd).transpose(1, 2)
        k, v = self.wkv(x).view(b, n, 2, self.hkv, self.hd).permute(2, 0, 3, 1, 4)
        q, k = rope(q, cos, sin), rope(k, cos, sin)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        return self.wo(y.transpose(1, 2).reshape(b, n, -1))


class Block(nn.Module):
    def __init__(self, c: ModelConfig):
        super().__init__()
        self.n1, self.n2 = RMSNorm(c.dim), RMSNorm(c.dim)
        self.attn = Attention(c)
        self.w1, self.w3 = nn.Linear(c.dim, c.mlp, bias=False), nn.Linear(c.dim, c.mlp, bias=False)
        self.w2 = nn.Linear(c.mlp, c.dim, bias=False)

    def forward(self, x, cos, sin):
        x = x + self.attn(self.n1(x), cos, sin)
        h = self.n2(x)
        return x + self.w2(F.silu(self.w1(h)) * self.w3(h))


class ByteGPT(nn.Module):
    def __init__(self, c: ModelConfig):
        super().__init__()
        self.c = c
        self.emb = nn.Embedding(c.vocab, c.dim)
        self.layers = nn.ModuleList([Block(c) for _ in range(c.layers)])
        self.norm = RMSNorm(c.dim)
        self.head = nn.Linear(c.dim, c.vocab, bias=False)
        hd = c.dim // c.heads
        inv = c.rope_base ** (-torch.arange(0, hd, 2, dtype=torch.float32) / hd)
        ang = torch.arange(c.max_len, dtype=torch.float32)[:, None] * inv[None]
        self.register_buffer("cos", ang.cos(), persistent=False)
        self.register_buffer("sin", ang.sin(), persistent=False)

    def forward(self, idx):
        n = idx.shape[1]
        x = self.emb(idx)
        cos, sin = self.cos[:n].to(x.dtype), self.sin[:n].to(x.dtype)
        for layer in self.layers:
            x = layer(x, cos, sin)
        return self.head(self.norm(x))


# ---------------------------------------------------------------------------------------
# Stages
# ---------------------------------------------------------------------------------------


def batch_windows(data: torch.Tensor, n: int, length: int, gen: torch.Generator) -> torch.Tensor:
    starts = torch.randint(0, len(data) - length - 1, (n,), generator=gen)
    return torch.stack([data[s:s + length] for s in starts.tolist()])


SHARD_BYTES = 15 * 2**20  # the device tool brings back files of at most 16 MiB


def save_shards(state: dict, info: dict, work: Path) -> list[Path]:
    """The weights in bfloat16 (what evaluation runs in) as safetensors shards under 15 MiB."""
    from safetensors.torch import save_file

    shards, cur, size = [], {}, 0
    for name, t in state.items():
        t = t.detach().to("cpu", torch.bfloat16).contiguous()
        if cur and size + t.numel() * 2 > SHARD_BYTES:
            shards.append(cur)
            cur, size = {}, 0
        cur[name] = t
        size += t.numel() * 2
    shards.append(cur)
    paths = []
    for i, part in enumerate(shards):
        p = work / f"model-{i:02d}-of-{len(shards):02d}.safetensors"
        save_file(part, str(p), metadata={"info": json.dumps(info, default=str)})
        paths.append(p)
    return paths


def load_checkpoint(work: Path) -> dict | None:
    """{"state", "info"} from model.pt, else from the bfloat16 shards; None if neither exists."""
    ckpt = work / "model.pt"
    if ckpt.exists():
        return torch.load(ckpt, map_location="cpu")
    shards = sorted(work.glob("model-*-of-*.safetensors"))
    if not shards:
        return None
    from safetensors import safe_open

    state, info = {}, None
    for p in shards:
        with safe_open(str(p), framework="pt") as f:
            info = json.loads(f.metadata()["info"])
            state.update({k: f.get_tensor(k) for k in f.keys()})
    return {"state": state, "info": info}


def train(args, dev, work: Path) -> dict:
    ckpt = work / "model.pt"
    if not args.force:
        state = load_checkpoint(work)
        if state is not None:
            print(f"[train] reusing the checkpoint in {work} ({state['info']['steps']} steps)")
            return state["info"]
    tr, _, data_info = corpus(args.max_corpus)
    mc = model_config(args)
    torch.manual_seed(args.seed)
    model = ByteGPT(mc).to(dev)
    n_params = sum(p.numel() for p in model.parameters())
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=0.1)
    gen = torch.Generator().manual_seed(args.seed)
    rng = random.Random(args.seed)
    budget = args.minutes * 60
    t0 = time.time()
    step, tokens, losses = 0, 0, []
    phases = [(args.contexts[0], args.tokens_per_step // args.contexts[0]), (max(args.contexts), args.tokens_per_step // max(args.contexts))]
    amp = torch.autocast("cuda", dtype=torch.bfloat16) if dev.type == "cuda" else contextlib.nullcontext()
    model.train()
    while True:
        elapsed = time.time() - t0
        if elapsed >= budget or (args.max_steps and step >= args.max_steps):
            break
        frac = elapsed / budget
        length, bsz = phases[0] if frac < args.short_fraction else phases[1]
        lr = args.lr * min(1.0, (step + 1) / 100) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(frac, 1.0))))
        for g in opt.param_groups:
            g["lr"] = lr
        x = batch_windows(tr, bsz, length + 1, gen)
        for i in range(bsz):
            if rng.random() < args.retrieval_share:
                x[i] = plant_retrieval(x[i], rng, region=rng.uniform(0.05, 0.9), lookups=args.lookups)
        x = x.to(dev, torch.long, non_blocking=True)
        with amp:
            logits = model(x[:, :-1])
        loss = F.cross_entropy(logits.float().flatten(0, 1), x[:, 1:].flatten())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        step += 1
        tokens += bsz * length
        losses.append(loss.item())
        if step % args.log_every == 0:
            print(f"[train] step {step} len {length} loss {sum(losses[-args.log_every:]) / args.log_every:.3f} "
                  f"({tokens / (time.time() - t0):,.0f} tok/s, {time.time() - t0:.0f}s)", flush=True)
    info = {"steps": step, "tokens": tokens, "seconds": time.time() - t0, "params": n_params,
            "final_loss": sum(losses[-20:]) / max(1, len(losses[-20:])), "model": asdict(mc), "data": data_info,
            "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu",
            "torch": str(torch.__version__), "retrieval_share": args.retrieval_share}
    torch.save({"state": model.state_dict(), "info": info}, ckpt)
    save_shards(model.state_dict(), info, work)
    print(f"[train] {step} steps, {tokens:,} tokens in {info['seconds']:.0f}s, final loss {info['final_loss']:.3f}")
    return info


def model_config(args) -> ModelConfig:
    if args.smoke:
        return ModelConfig(dim=64, layers=2, heads=4, kv_heads=2, mlp=128, max_len=max(args.contexts))
    return ModelConfig(max_len=max(args.contexts))


def load_model(args, dev) -> ByteGPT:
    state = load_checkpoint(Path(args.work))
    model = ByteGPT(ModelConfig(**state["info"]["model"]))
    model.load_state_dict({k: v.float() for k, v in state["state"].items()})
    model = model.to(dev).eval()
    if dev.type == "cuda":
        model = model.to(torch.bfloat16)
    return model


def spa_options(args, density, fill="landmark", projectors=None, selection="group", block_score="projector") -> dict:
    return {"mode": "spa", "block_size": args.block_size, "density": density, "fill": fill,
            "projectors": projectors, "inner_backend": "eager", "selection": selection, "block_score": block_score}


def projector_path(work: Path, selection: str, block_score: str = "projector") -> Path:
    """Projectors fitted for a selection mode ("group": the name of runs 1-2, so their files resume)
    and a score: "fine" has its own fit (row means and sub-block means); "hybrid" and "bound" use
    the projector score's."""
    tag = ("" if selection == "group" else f"_{selection}") + ("_fine" if block_score == "fine" else "")
    return work / f"projectors{tag}.safetensors"


def calibrate_stage(args, dev, work: Path, selection: str = "group", block_score: str = "projector") -> dict:
    """Fit the projectors for one selection mode and score (the fit and the recall figures use the
    projector score alone, or the fine score for "fine": block_score "hybrid" runs the projector
    score's projectors for its first half)."""
    out = projector_path(work, selection, block_score)
    tag = ("" if selection == "group" else f"_{selection}") + ("_fine" if block_score == "fine" else "")
    res_path = work / f"calibration{tag}.json"
    if out.exists() and res_path.exists() and not args.force:
        print(f"[calibrate] reusing {out}")
        return json.loads(res_path.read_text())
    model = load_model(args, dev)
    tr, held, _ = corpus(args.max_corpus)
    gen = torch.Generator().manual_seed(args.seed + 1)
    rng = random.Random(args.seed + 1)
    batches = []
    for length, count in zip(args.contexts, args.calib_windows):
        for _ in range(count):
            x = batch_windows(tr, 1, length, gen)[0]
            if rng.random() < args.retrieval_share:
                x = plant_retrieval(x, rng, region=rng.uniform(0.05, 0.9))
            batches.append(x[None].to(dev, torch.long))
    cfg = {k: v for k, v in spa_options(args, 0.2, selection=selection, block_score=block_score).items()
           if k not in ("projectors", "inner_backend")}
    t0 = time.time()
    report = C.calibrate(model, batches, cfg, steps=args.calib_steps, lr=args.calib_lr, out=out,
                         loss_blocks=args.loss_blocks, progress=True)
    fit_s = time.time() - t0
    print(report)
    fitted = report.projectors.projectors
    recall = []
    result = {"seconds": fit_s, "report": report.to_dict(), "recall": recall, "projectors": str(out),
              "selection": selection}
    (work / f"calibration_fit{tag}.json").write_text(json.dumps(result, indent=1, default=str))
    for length in args.contexts[1:]:
        ev = [batch_windows(held, 1, length, gen)[0][None].to(dev, torch.long) for _ in range(args.recall_windows)]
        for density in args.densities:
            # recall only: the output errors of each method would cost 4x the time here
            res = C.evaluate(model, ev, {**cfg, "density": density}, fitted, errors=False)
            rows = sum(r["query_blocks"] for r in res.values())
            mean = lambda key, m: sum(r[key][m] * r["query_blocks"] for r in res.values()) / rows  # noqa: E731
            entry = {"context": length, "density": density,
                     **{f"recall_{m}": mean("recall", m) for m in C.METHODS},
                     "selected_share": mean("density", "pooled")}
            recall.append(entry)
            print(f"[calibrate] {length} tokens density {density}: recall pooled {entry['recall_pooled']:.3f} "
                  f"fitted {entry['recall_fitted']:.3f} oracle {entry['recall_oracle']:.3f}", flush=True)
    res_path.write_text(json.dumps(result, indent=1, default=str))
    return result


@torch.no_grad()
def nll_and_retrieval(fn, windows: torch.Tensor, answers: bool, bsz: int, dev) -> tuple[float, int, int]:
    """Sum of NLL over predicted bytes and its count, or (for retrieval windows) correct answers."""
    total, count, correct = 0.0, 0, 0
    for i in range(0, len(windows), bsz):
        x = windows[i:i + bsz].to(dev, torch.long)
        logits = fn(x).float()
        if answers:
            pred = logits[:, -VALUE_LEN - 1:-1].argmax(-1)
            correct += int((pred == x[:, -VALUE_LEN:]).all(-1).sum())
        else:
            nll = F.cross_entropy(logits[:, :-1].flatten(0, 1), x[:, 1:].flatten(), reduction="sum")
            total += float(nll)
            count += x[:, 1:].numel()
    return total, count, correct


def eval_stage(args, dev, work: Path, calib: dict) -> dict:
    model = load_model(args, dev)
    _, held, _ = corpus(args.max_corpus)
    gen = torch.Generator().manual_seed(args.seed + 2)
    rng = random.Random(args.seed + 2)
    runs = [("dense", None, None, None, None, None)]
    for selection in args.selections:
        for block_score in args.block_scores:
            for density in args.densities:
                for projector in ("pooled", "calibrated"):
                    for fill in args.fills:
                        runs.append(("spa", density, projector, fill, selection, block_score))
    rows = []
    torch._dynamo.config.cache_size_limit = 1 << 20
    if hasattr(torch._dynamo.config, "recompile_limit"):
        torch._dynamo.config.recompile_limit = 1 << 20
    for length in args.contexts:
        done = work / f"eval_{length}.json"
        if done.exists() and not args.force:  # a run cut by a time limit goes on from here
            rows.extend(json.loads(done.read_text()))
            print(f"[eval] reusing {done}")
            continue
        n_windows = max(1, args.eval_tokens // length)
        text = batch_windows(held, n_windows, length, gen)
        ret = torch.stack([plant_retrieval(batch_windows(held, 1, length, gen)[0], rng, region=0.25)
                           for _ in range(args.retrieval_samples)])
        bsz = max(1, args.batch_tokens // length)
        dense_ppl = None
        these = []
        for kind, density, projector, fill, selection, block_score in runs:
            torch._dynamo.reset()
            sites = []
            if kind == "dense":
                fn = model
            else:
                proj = str(projector_path(work, selection, block_score)) if projector == "calibrated" else None
                opts = spa_options(args, density, fill, proj, selection, block_score)
                fn = torch.compile(model, backend="spa", options=opts, dynamic=False)
            t0 = time.time()
            with recording(sites.append):
                nll, cnt, _ = nll_and_retrieval(fn, text, False, bsz, dev)
                _, _, correct = nll_and_retrieval(fn, ret, True, bsz, dev)
            n_spa = sum(d.decision == "spa" for _, d in sites)
            if kind == "spa" and n_spa == 0:
                raise RuntimeError(f"no site ran SPA for {opts}: see spa_compile.explain")
            ppl = math.exp(nll / cnt)
            if kind == "dense":
                dense_ppl = ppl
            row = {"context": length, "attention": kind, "density": density, "projector": projector, "fill": fill,
                   "selection": selection, "block_score": block_score, "ppl": ppl, "ppl_ratio": ppl / dense_ppl, "retrieval": correct / len(ret),
                   "retrieval_correct": correct, "retrieval_samples": len(ret), "tokens": cnt,
                   "spa_sites": n_spa, "seconds": time.time() - t0}
            these.append(row)
            print(f"[eval] {length:>6} {kind:5} density={density} projector={projector} fill={fill} "
                  f"selection={selection} block_score={block_score}: "
                  f"ppl {ppl:.4f} (x{row['ppl_ratio']:.4f}) retrieval {row['retrieval']:.2f}", flush=True)
        done.write_text(json.dumps(these, indent=1))
        rows.extend(these)
    return {"runs": rows}


def _variant(r: dict) -> str:
    """The selection variant of an eval row: "<selection>/<block_score>" (runs 1-2: group/projector)."""
    return f"{r.get('selection') or 'group'}/{r.get('block_score') or 'projector'}"


def check_targets(evals: dict, calibs: dict, contexts) -> dict:
    """Per selection variant and context (8K and up): the targets of the projector issue."""
    out = {}
    long = [c for c in contexts if c >= 8192] or list(contexts)[-2:]
    variants = sorted({_variant(r) for r in evals["runs"] if r["attention"] == "spa"})
    for variant in variants:
        calib = calibs.get(variant) or calibs.get(variant.split("/")[0])
        if calib is None:  # evaluated in an earlier call whose fit this one did not redo
            continue
        for length in long:
            out.setdefault(variant, {})[str(length)] = _targets_at(evals, calib, length, variant)
    return out


def _targets_at(evals: dict, calib: dict, length: int, variant: str) -> dict:
    dense = next(r for r in evals["runs"] if r["context"] == length and r["attention"] == "dense")
    spa = next(r for r in evals["runs"] if r["context"] == length and r["attention"] == "spa" and _variant(r) == variant
               and r["density"] == 0.2 and r["projector"] == "calibrated" and r["fill"] == "landmark")
    rec = next((r for r in calib["recall"] if r["context"] == length and r["density"] == 0.2), None)
    return {
        "ppl_within_1pct": spa["ppl_ratio"] <= 1.01, "ppl_ratio": spa["ppl_ratio"],
        "retrieval_equal": spa["retrieval"] >= dense["retrieval"],
        "retrieval_dense": dense["retrieval"], "retrieval_spa": spa["retrieval"],
        "fitted_recall_gain": None if rec is None else rec["recall_fitted"] - rec["recall_pooled"],
        "recall_gain_at_least_5_points": None if rec is None else rec["recall_fitted"] - rec["recall_pooled"] >= 0.05,
    }


def plots(result: dict, docs: Path, contexts) -> list[str]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib missing: no plots")
        return []
    written = []
    runs = result["eval"]["runs"]
    fig, axes = plt.subplots(1, len(contexts), figsize=(4.2 * len(contexts), 3.4), sharey=True)
    axes = [axes] if len(contexts) == 1 else axes
    variants = sorted({_variant(r) for r in runs if r["attention"] == "spa"})
    fills = sorted({r["fill"] for r in runs if r["attention"] == "spa"})
    for ax, length in zip(axes, contexts):
        for vi, variant in enumerate(variants):
            for projector, fill in ((p, f) for f in fills for p in ("pooled", "calibrated")):
                pts = sorted((r["density"], r["ppl_ratio"]) for r in runs if r["context"] == length
                             and r["attention"] == "spa" and r["projector"] == projector and r["fill"] == fill
                             and _variant(r) == variant)
                style = ("o" if fill == "landmark" else "s") + ("-" if projector == "calibrated" else "--")
                label = f"{projector}, fill={fill}" + (f", {variant}" if len(variants) > 1 else "")
                ax.plot([p[0] for p in pts], [p[1] for p in pts], style, color=f"C{vi}", label=label,
                        alpha=1.0 if fill == "landmark" else 0.5)
        ax.axhline(1.01, color="grey", lw=0.8, ls="--")
        ax.axhline(1.0, color="black", lw=0.8)
        ax.set_title(f"{length // 1024}K tokens")
        ax.set_xlabel("density")
    axes[0].set_ylabel("perplexity / dense perplexity")
    axes[-1].legend(fontsize=7)
    fig.tight_layout()
    p = docs / "long_context_ppl.png"
    fig.savefig(p, dpi=120)
    written.append(str(p))
    plt.close(fig)

    calibs = result.get("calibrate_by_selection") or {"group": result["calibrate"]}
    rec = result["calibrate"]["recall"]
    lens = sorted({r["context"] for r in rec})
    fig, axes = plt.subplots(1, len(lens), figsize=(4.2 * len(lens), 3.4), sharey=True)
    axes = [axes] if len(lens) == 1 else axes
    for ax, length in zip(axes, lens):
        for si, (selection, calib) in enumerate(sorted(calibs.items())):
            pts = sorted(((r["density"], r) for r in calib["recall"] if r["context"] == length), key=lambda t: t[0])
            for m, style in (("pooled", "o--"), ("fitted", "o-"), ("oracle", ":")):
                ax.plot([d for d, _ in pts], [r[f"recall_{m}"] for _, r in pts], style, color=f"C{si}",
                        label=f"{m}, {selection} selection" if len(calibs) > 1 else m)
        ax.set_title(f"block recall, {length // 1024}K tokens")
        ax.set_xlabel("density")
    axes[0].set_ylabel("share of dense attention mass kept")
    axes[-1].legend(fontsize=8)
    fig.tight_layout()
    p = docs / "long_context_recall.png"
    fig.savefig(p, dpi=120)
    written.append(str(p))
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(9, 3.4))
    configs = [("dense", None, None, None)] + sorted(
        {("spa", r["density"], r["projector"], _variant(r)) for r in runs
         if r["attention"] == "spa" and r["fill"] == "landmark" and (r["density"] == 0.2 or len(variants) == 1)},
        key=lambda t: (t[3], t[1], t[2]))
    width = 0.8 / len(configs)
    for j, (kind, density, projector, variant) in enumerate(configs):
        ys = [next(r["retrieval"] for r in runs if r["context"] == length and r["attention"] == kind
                   and r["density"] == density and r["projector"] == projector
                   and (kind == "dense" or (r["fill"] == "landmark" and _variant(r) == variant)))
              for length in contexts]
        ax.bar([i + j * width for i in range(len(contexts))], ys, width,
               label="dense" if kind == "dense" else f"{density} {projector}"
               + (f" {variant}" if len(variants) > 1 else ""))
    ax.set_xticks([i + width * (len(configs) - 1) / 2 for i in range(len(contexts))])
    ax.set_xticklabels([f"{c // 1024}K" if c >= 1024 else str(c) for c in contexts])
    ax.set_ylabel("retrieval accuracy")
    ax.set_ylim(0, 1.05)
    ax.legend(fontsize=6, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    p = docs / "long_context_retrieval.png"
    fig.savefig(p, dpi=120)
    written.append(str(p))
    plt.close(fig)
    return written


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--stage", choices=["all", "train", "calibrate", "eval"], default="all")
    ap.add_argument("--smoke", action="store_true", help="tiny model, short contexts, CPU: checks the code paths")
    ap.add_argument("--force", action="store_true", help="redo stages whose outputs exist")
    ap.add_argument("--work", default=None, help="checkpoint and projector folder (default benchmarks/results/long_context_work)")
    ap.add_argument("--out", default=None, help="results JSON (default benchmarks/results/long_context.json)")
    ap.add_argument("--docs", default=str(ROOT / "docs"))
    ap.add_argument("--minutes", type=float, default=5.0, help="training wall time")
    ap.add_argument("--max-steps", type=int, default=0)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--tokens-per-step", type=int, default=65536)
    ap.add_argument("--short-fraction", type=float, default=0.5, help="share of the training time at the shortest context")
    ap.add_argument("--retrieval-share", type=float, default=0.3)
    ap.add_argument("--lookups", type=int, default=32,
                    help="lookups per training retrieval sample (1: only the final one; a 240 s run with 1 learned nothing)")
    ap.add_argument("--contexts", type=int, nargs="+", default=[4096, 8192, 16384])
    ap.add_argument("--densities", type=float, nargs="+", default=[0.1, 0.2, 0.3])
    ap.add_argument("--block-size", type=int, default=64)
    ap.add_argument("--selections", nargs="+", choices=["group", "head"], default=["group"],
                    help="SPAConfig.selection values to evaluate (projectors are calibrated for each)")
    ap.add_argument("--block-scores", nargs="+", choices=["projector", "hybrid", "bound", "fine"], default=["projector"],
                    help="SPAConfig.block_score values to evaluate")
    ap.add_argument("--fills", nargs="+", choices=["landmark", "none"], default=["landmark", "none"])
    ap.add_argument("--calib-windows", type=int, nargs="+", default=[8, 4, 2], help="calibration windows per context")
    ap.add_argument("--calib-steps", type=int, default=300)
    ap.add_argument("--calib-lr", type=float, default=1e-2)
    ap.add_argument("--loss-blocks", choices=C.LOSS_BLOCKS, default="visible")
    ap.add_argument("--recall-windows", type=int, default=2)
    ap.add_argument("--eval-tokens", type=int, default=131072, help="held-out tokens per context for perplexity")
    ap.add_argument("--batch-tokens", type=int, default=32768)
    ap.add_argument("--retrieval-samples", type=int, default=64)
    ap.add_argument("--max-corpus", type=int, default=0, help="stop reading sources past this many bytes (0: all)")
    ap.add_argument("--log-every", type=int, default=50)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    if args.smoke:
        args.contexts = [256, 512, 1024] if args.contexts == [4096, 8192, 16384] else args.contexts
        args.block_size = 32 if args.block_size == 64 else args.block_size
        args.minutes, args.max_steps, args.tokens_per_step = min(args.minutes, 1.0), args.max_steps or 6, 2048
        args.calib_steps, args.calib_windows, args.recall_windows = 10, [2, 1, 1], 1
        args.eval_tokens, args.batch_tokens, args.retrieval_samples = 2048, 2048, 4
        args.max_corpus, args.log_every = args.max_corpus or 2_000_000, 2
    dev = torch.device("cuda" if torch.cuda.is_available() and not args.smoke else "cpu")
    if dev.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    suffix = "_smoke" if args.smoke else ""
    work = Path(args.work or ROOT / "benchmarks" / "results" / f"long_context_work{suffix}")
    work.mkdir(parents=True, exist_ok=True)
    args.work = str(work)
    out = Path(args.out or ROOT / "benchmarks" / "results" / f"long_context{suffix}.json")
    docs = Path(args.docs)
    t0 = time.time()
    result = {"args": vars(args), "spa_compile": spa_compile.__version__, "torch": str(torch.__version__)}
    result["train"] = train(args, dev, work)
    if args.stage == "train":
        return 0
    calibs = {}
    if set(args.block_scores) - {"fine"}:  # the projector score's fit (hybrid and bound use it too)
        calibs.update({selection: calibrate_stage(args, dev, work, selection) for selection in args.selections})
    if "fine" in args.block_scores:  # the fine score's own fit
        calibs.update({f"{selection}/fine": calibrate_stage(args, dev, work, selection, "fine")
                       for selection in args.selections})
    result["calibrate"] = next(iter(calibs.values()))
    result["calibrate_by_selection"] = calibs
    if args.stage == "calibrate":
        return 0
    result["eval"] = eval_stage(args, dev, work, result["calibrate"])
    result["targets"] = check_targets(result["eval"], calibs, args.contexts)
    result["seconds"] = time.time() - t0
    out.write_text(json.dumps(result, indent=1, default=str))
    print(f"wrote {out}")
    if not args.smoke:
        docs.mkdir(parents=True, exist_ok=True)
        for p in plots(result, docs, args.contexts):
            print(f"wrote {p}")
    print(json.dumps(result["targets"], indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
