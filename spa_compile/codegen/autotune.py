"""Launch configurations: candidates, a measured choice per (kernel, shape class, card), cached.

The first call of a kernel for a key (head dims, dtype, block, group, flags, card, triton
version) times each candidate with ``triton.testing.do_bench`` (median) and keeps the
fastest, in memory and in a JSON file (``$SPA_TUNE_CACHE``, default
``~/.cache/spa_compile/tune.json``). Tuned files shipped in ``spa_compile/codegen/tuned/``
are read first. ``SPA_AUTOTUNE=0`` (and the Triton interpreter) skip the timing and use
the first candidate, the heuristic default.
"""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path

import torch
import triton

_LOCK = threading.Lock()
_MEMO: dict[str, dict] = {}
_LOADED = False
_SHIPPED = Path(__file__).with_name("tuned")


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _cache_path() -> Path:
    return Path(os.environ.get("SPA_TUNE_CACHE", Path.home() / ".cache" / "spa_compile" / "tune.json"))


def _load() -> None:
    global _LOADED
    if _LOADED:
        return
    _LOADED = True
    files = sorted(_SHIPPED.glob("*.json")) if _SHIPPED.is_dir() else []
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


def pick(kernel: str, key: tuple, candidates: list[dict], run, device) -> dict:
    """The best of ``candidates`` for ``key`` (``run(config)`` launches the kernel once)."""
    if not candidates:
        raise ValueError(f"no launch configuration for {kernel}")
    if interpreting() or os.environ.get("SPA_AUTOTUNE", "1") == "0" or len(candidates) == 1:
        return candidates[0]
    full = "|".join([kernel, card_name(device), triton.__version__] + [str(x) for x in key])
    with _LOCK:
        _load()
        hit = _MEMO.get(full)
    if hit is not None and hit in candidates:
        return hit
    timings = []
    for cand in candidates:
        try:
            ms = triton.testing.do_bench(lambda: run(cand), warmup=5, rep=20, return_mode="median")
        except Exception:  # a config the card cannot run (shared memory, registers): skip it
            continue
        timings.append((ms, cand))
    if not timings:
        raise RuntimeError(f"no launch configuration of {kernel} ran for {key}")
    best = min(timings, key=lambda x: x[0])[1]
    with _LOCK:
        _MEMO[full] = best
        _save()
    return best


def attention_candidates(g: int, block: int, d: int, dtype: torch.dtype, group: bool) -> list[dict]:
    """Configs of the per-query-block kernels (forward, dq). First = heuristic default."""
    out = []
    gps = [1]
    if group:
        gp = 2
        while gp <= g and g % gp == 0 and gp * block <= 128:
            gps.append(gp)
            gp *= 2
    big = d > 128 or dtype == torch.float32
    for gp in reversed(gps):
        bm = gp * block
        warps = [8, 4] if bm >= 128 else [4]
        for w in warps:
            for s in ([2] if big else [3, 2]):
                out.append({"GP": gp, "num_warps": w, "num_stages": s, "BJ": 64})
    return out[:6]


def key_block_candidates(block: int, d: int, dtype: torch.dtype) -> list[dict]:
    """Configs of the per-key-block kernels (dk/dv, landmark gradients)."""
    big = d > 128 or dtype == torch.float32
    stages = [2] if big else [2, 3]
    out = []
    for w in ([4, 8] if block * d >= 64 * 128 else [4]):
        for s in stages:
            out.append({"num_warps": w, "num_stages": s, "BJ": 64})
    return out
