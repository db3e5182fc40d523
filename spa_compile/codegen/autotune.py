"""Launch configurations: candidates, a measured choice per (kernel, shape class, card), cached.

The first call of a kernel for a key (head dims, dtype, block, group, flags, card, triton
version) times each candidate with ``triton.testing.do_bench`` (median) and keeps the
fastest, in memory and in a JSON file (``$SPA_TUNE_CACHE``, default
``~/.cache/spa_compile/tune.json``). Tuned files shipped in ``spa_compile/codegen/tuned/``
are read first. ``SPA_AUTOTUNE=0`` (and the Triton interpreter) skip the timing and use
the first candidate, the heuristic default.

Kernels whose code changed since the shipped files were tuned carry a version in their key
(``KERNEL_VERSION``), so their old entries are not reused and the new candidates are timed.
``SPA_TUNE_IGNORE_SHIPPED=1`` ignores every shipped file (the user cache still counts).
"""

from __future__ import annotations

import functools
import json
import os
import threading
import warnings
from pathlib import Path

import torch
import triton

_LOCK = threading.Lock()
_MEMO: dict[str, dict] = {}
_LOADED = False
_SHIPPED = Path(__file__).with_name("tuned")
# bumped when a kernel's code or candidates change enough that shipped timings are stale
# (fwd v2: fill over [ls, he) with the bias as the score dot's accumulator, BJ / FILL_STAGES
# candidates, unmasked clamped K/V loads; v3: TMA candidates, K/V of the exact loop and kbar/vbar
# of the fill through tensor descriptors; v4: heads-first (HF) candidates; dq v2: HF candidates,
# which shipped dq timings would otherwise hide; fwd v6 / dq v3: the fill's bias from scalar
# selection words and a constant count (sparse_forward.fill_bias))
KERNEL_VERSION = {"fwd": 6, "dq": 3}


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _cache_path() -> Path:
    return Path(os.environ.get("SPA_TUNE_CACHE", Path.home() / ".cache" / "spa_compile" / "tune.json"))


def _load() -> None:
    global _LOADED
    if _LOADED:
        return
    _LOADED = True
    ignore = os.environ.get("SPA_TUNE_IGNORE_SHIPPED", "0") not in ("", "0")
    files = sorted(_SHIPPED.glob("*.json")) if _SHIPPED.is_dir() and not ignore else []
    files.append(_cache_path())
    for f in files:
        try:
            _MEMO.update(json.loads(Path(f).read_text()))
        except (OSError, ValueError):
            pass


def _save() -> None:
    path = _cache_path()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(_MEMO, indent=1, sort_keys=True))
        tmp.replace(path)
    except OSError:
        pass


def card_name(device) -> str:
    if interpreting() or not torch.cuda.is_available() or torch.device(device).type != "cuda":
        return "interpreter"
    return torch.cuda.get_device_name(device).replace(" ", "_")


def tuned_entries() -> dict[str, dict]:
    _load()
    return dict(_MEMO)


def _launches(run, cand) -> bool:
    try:
        run(cand)
        return True
    except Exception as e:  # noqa: BLE001 - out of shared memory / registers: try the next
        if "OutOfResources" in type(e).__name__ or "out of resource" in str(e).lower():
            return False
        raise


TUNE_MIN_RUNS = 10  # timed runs per candidate: a median of one or two picked noise at 64K+
TUNE_MAX_REP_MS = 400.0  # but at most this long per candidate (a 70 ms kernel gets 5 runs)


def tuning_rep_ms(first_ms: float) -> float:
    """do_bench's time budget per candidate (ms): 20 ms, or ``TUNE_MIN_RUNS`` runs of a kernel
    that long up to ``TUNE_MAX_REP_MS`` (do_bench runs ``rep / estimate`` times: 17 ms kernels
    got one run at rep 20, and 64K's pick of 2 against 3 stages, a 3% difference in one run,
    cost 11% at 128K)."""
    return max(20.0, min(TUNE_MIN_RUNS * float(first_ms), TUNE_MAX_REP_MS))


def pick(kernel: str, key: tuple, candidates: list[dict], run, device) -> dict:
    """The best of ``candidates`` for ``key`` (``run(config)`` launches the kernel once)."""
    if not candidates:
        raise ValueError(f"no launch configuration for {kernel}")
    if interpreting():
        return candidates[0]
    tune = os.environ.get("SPA_AUTOTUNE", "1") != "0" and len(candidates) > 1
    name = kernel if kernel not in KERNEL_VERSION else f"{kernel}.v{KERNEL_VERSION[kernel]}"
    full = "|".join([name, card_name(device), triton.__version__] + [str(x) for x in key])
    with _LOCK:
        _load()
        hit = _MEMO.get(full) or _MEMO.get("untuned|" + full)
    if hit is not None and hit in candidates:
        return hit
    if not tune:  # the first candidate that launches
        for cand in candidates:
            if _launches(run, cand):
                with _LOCK:
                    _MEMO["untuned|" + full] = cand
                return cand
        raise RuntimeError(f"no launch configuration of {kernel} fits the card for {key}")
    timings = []
    rep = None
    for i, cand in enumerate(candidates):
        try:
            if rep is None:  # the first candidate sets how long each is timed
                rep = tuning_rep_ms(triton.testing.do_bench(lambda: run(cand), warmup=5, rep=20, return_mode="median"))
            ms = triton.testing.do_bench(lambda: run(cand), warmup=5, rep=rep, return_mode="median")
        except Exception as e:  # noqa: BLE001 - a config the card cannot run: skip it
            if "OutOfResources" in type(e).__name__ or "out of resource" in str(e).lower():
                continue
            if i == 0:  # the default configuration must work: a real error
                raise
            # an optional variant that fails to build or launch here is left out, said once
            warnings.warn(f"spa_compile: {kernel} launch configuration {cand} failed on this card and is "
                          f"skipped ({type(e).__name__}: {str(e)[:200]})", RuntimeWarning, stacklevel=2)
            continue
        timings.append((ms, cand))
    if not timings:
        raise RuntimeError(f"no launch configuration of {kernel} fits the card for {key}")
    best = min(timings, key=lambda x: x[0])[1]
    log = os.environ.get("SPA_TUNE_LOG")
    if log:
        try:
            with open(log, "a") as f:
                f.write(json.dumps({"key": full, "timings_ms": [[t, c] for t, c in timings], "best": best}) + "\n")
        except OSError:
            pass
    with _LOCK:
        _MEMO[full] = best
        _save()
    return best


SMEM_LIMIT = 220 * 1024  # bytes of shared memory a program may take (H100/H200: 227 KB)


def _esize(dtype: torch.dtype) -> int:
    return 4 if dtype == torch.float32 else 2


@functools.lru_cache(maxsize=None)
def _tma_card(index: int) -> bool:
    return torch.cuda.get_device_capability(index)[0] >= 9


def tma_card() -> bool:
    """A compiled (not interpreted) run on a card with bulk tensor copies (Hopper or newer), unless
    ``SPA_TMA=0``. Checked on an H200 (torch 2.11, triton 3.6): the GPU tests launch every
    candidate, and tuning picked a TMA config at 16K-128K (sparse forward 506 TFLOP/s at 16K)."""
    if interpreting() or not torch.cuda.is_available() or os.environ.get("SPA_TMA", "1") == "0":
        return False
    return _tma_card(torch.cuda.current_device())


HF_ENV = "SPA_TUNE_HF"  # "1": also time the heads-first (HF) variants


def attention_candidates(g: int, block: int, d: int, dv: int, dtype: torch.dtype, group: bool,
                         backward: bool = False, fill: bool = False, tma: bool | None = None,
                         hf: bool | None = None) -> list[dict]:
    """Configs of the per-query-block kernels (forward, dq). First = heuristic default.

    tma: also offer the forward's TMA variant of every config (``"TMA": True``: K/V of the exact
    loop through tensor descriptors; with the fill also ``"TMA_FILL": True``, its kbar/vbar),
    after the pointer-load ones; None = when ``tma_card()``.
    Never under the interpreter, for backward, fp32, or head dims that are not powers of two
    in 16..256 (the launcher also falls back per call on strides the descriptors cannot take).

    hf (default: $SPA_TUNE_HF is "1"), group with g > 1: last, heads-first variants (``"HF":
    True``, common.qblock_prologue: the head packs of one query block run side by side and can
    share the group's K/V tiles through L2) of the first config of each head pack GP < g, TMA
    ones when those are offered. Off by default: on the H200 they lost at every key timed (run 6,
    forward and dq, 4K to 64K, density 0.2: e.g. 18.03 vs 17.54 ms forward with fill at 64K,
    Hkv=8; runs 13 and 14, offered above 32K: second or third at best, 128K top-k 32 included).

    Forward, group with g > 1: the group-order twins (``"GO": True``) of the one-head configs
    (TMA ones when offered), after those; the first config is never one.

    An L2 prefetch of the block 4 or 8 steps ahead (inline ``prefetch.global.L2``) was tried as a
    candidate above 32K tokens (run 15): 4-12% slower at every 64K/128K key, so it is gone.
    """
    out = _attention_candidates(g, block, d, dv, dtype, group, backward, fill)
    if tma is None:
        tma = tma_card()
    pow2 = all(x == triton.next_power_of_2(x) and 16 <= x <= 256 for x in (d, dv, block))
    if tma and not interpreting() and not backward and _esize(dtype) == 2 and pow2:
        # with the fill, its landmark loads go through descriptors too (TMA_FILL); the first two
        # configs also without, so that the measurement can tell the two loops apart
        extra = [dict(c, TMA=True, TMA_FILL=True) if fill else dict(c, TMA=True) for c in out]
        if fill:
            extra += [dict(c, TMA=True) for c in out[:2]]
        # copies in flight cost no registers with TMA: the default config one stage deeper
        first = out[0]
        if first["num_stages"] == 3 and 2 * (first["GP"] * block * d + 4 * block * (d + dv)) <= SMEM_LIMIT:
            extra.append(dict(extra[0], num_stages=4))
        out = out + extra
    if group and g > 1 and not backward:
        # group order (GO, common.qblock_prologue) of the one-head configs (TMA ones when offered):
        # the G head programs of a (kv head, query block) side by side. H200, 128K top-k 32, Hkv=8
        # (bench_order.py, runs 20-21, 2026-11-29): 10.61-10.71 ms without the fill against
        # 10.99-11.28 for the query-blocks-first configs, 15.67-15.79 with it against 15.88-16.69;
        # at 16K within noise (1.22 / 1.28 ms against 1.23 / 1.24). Not measured for dq: not offered there.
        base = [c for c in out if c.get("TMA", False)] or out
        out = out + [dict(c, GO=True) for c in base if c["GP"] == 1]
    if hf is None:
        hf = os.environ.get(HF_ENV, "0") == "1"
    if hf and group and g > 1:
        # the first config of each head pack smaller than the group (GP = g has nothing to share)
        plain = [c for c in out if not c.get("GO")]
        base = [c for c in plain if c.get("TMA", False)] or plain
        firsts = {}
        for c in base:
            if c["GP"] < g:
                firsts.setdefault(c["GP"], c)
        out = out + [dict(c, HF=True) for c in firsts.values()]
    return out


def _attention_candidates(g: int, block: int, d: int, dv: int, dtype: torch.dtype, group: bool,
                          backward: bool = False, fill: bool = False) -> list[dict]:
    bd, bdv = triton.next_power_of_2(d), triton.next_power_of_2(dv)
    es = _esize(dtype)
    gps = [1]
    if group:
        gp = 2
        while gp <= g and g % gp == 0 and gp * block <= 128:
            gps.append(gp)
            gp *= 2
    out = []
    for gp in reversed(gps):
        bm = gp * block
        w = 8 if bm >= 128 or es == 4 else 4
        fits = [s for s in (3, 2, 1) if es * (bm * bd + (bm * bdv if backward else 0) + s * block * (bd + bdv)) <= SMEM_LIMIT]
        out += [{"GP": gp, "num_warps": w, "num_stages": s, "BJ": 64} for s in fits[:2]]
    # four heads of a group in one 256-row tile (16 warps): K/V loaded once for all four
    if group and g % 4 == 0 and 4 * block == 256 and es == 2 and bd <= 128:
        if es * (256 * bd + (256 * bdv if backward else 0) + 2 * block * (bd + bdv)) <= SMEM_LIMIT:
            out.append({"GP": 4, "num_warps": 16, "num_stages": 2, "BJ": 64})
            if fill and not backward:
                # 16 warps sit at 128 registers: a 32-wide fill chunk spills 24-32 bytes where
                # the 64-wide one spills 128 (compile_check); its own 3-stage fill pipeline
                out.append({"GP": 4, "num_warps": 16, "num_stages": 2, "BJ": 32, "FILL_STAGES": 3})
    if fill and not backward and es == 2 and block == 64 and bd <= 128:
        # one head, 128-landmark fill chunks: half the online-softmax rescales per landmark
        if es * (block * bd + 2 * 128 * (bd + bdv)) <= SMEM_LIMIT:
            out.append({"GP": 1, "num_warps": 4, "num_stages": 2, "BJ": 128})
    return out or [{"GP": 1, "num_warps": 4, "num_stages": 1, "BJ": 64}]


def key_block_candidates(block: int, d: int, dv: int, dtype: torch.dtype) -> list[dict]:
    """Configs of the per-key-block kernels (dk/dv, landmark gradients). First = default
    (4 warps, 2 stages: the fastest measured on H200 for D=128 bf16)."""
    bd, bdv = triton.next_power_of_2(d), triton.next_power_of_2(dv)
    es = _esize(dtype)
    order = [(4, 2), (4, 3), (8, 2)] if block * bd <= 64 * 128 and es == 2 else [(8, 2), (8, 1), (4, 2), (4, 1)]
    out = []
    for w, s in order:
        smem = es * (block * (bd + bdv) + s * max(block, 64) * (bd + bdv))
        if smem <= SMEM_LIMIT:
            out.append({"num_warps": w, "num_stages": s, "BJ": 64})
    return out or [{"num_warps": 8, "num_stages": 1, "BJ": 64}]
