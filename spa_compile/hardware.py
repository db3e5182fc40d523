"""Hardware profiles for the cost model: rates, overheads and kernel efficiencies of a GPU.

- Built-in profiles (:data:`BUILTIN_PROFILES`: ``"h100"``, ``"h200"``, ``"a100"``) let the cost
  model and ``explain`` work on a machine without a GPU (``device_profile="h100"``).
- On a GPU, ``device_profile="auto"`` measures the card once with a short microbenchmark
  (:func:`measure_profile`: bf16 matmul rate, copy bandwidth, launch gap, host overheads,
  achieved efficiency of SDPA and of the SPA kernels) and caches the result as JSON under
  the user's cache folder (:func:`cache_dir`), keyed by card, compute capability and the
  versions of torch, triton, CUDA, spa_compile and the SPA kernel sources.
- A profile JSON written by ``benchmarks/bench_cost_model.py --refit`` can be named directly:
  ``device_profile="path/to/profile.json"``.

Kernel efficiencies are the fraction of the roofline (see :mod:`spa_compile.passes.cost_model`)
a kernel achieves. The built-in SPA efficiencies are *provisional* (listed in
``HardwareProfile.provisional``) until the benchmark refits them from measurements.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import os
import re
import statistics
import sys
import time
import warnings
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Mapping

import torch

SCHEMA = 3  # 2: host_overhead_s["spa"] is the op's measured per-call floor; L2 and launch gap by CUDA graphs;
# 3: several SPA probes (SPA_PROBES) fit the stage efficiencies (measurements["spa_probes"])
EFFICIENCY_STAGES = ("pool", "select", "exact", "fill")


@dataclass(frozen=True)
class HardwareProfile:
    """What the cost model needs to know about a card. Rates are *achieved* rates, not peaks.

    matmul_flops:      dense bf16/fp16 tensor-core matmul rate, FLOP/s
    vector_flops:      fp32 CUDA-core rate, FLOP/s (softmax, top-k; and every FLOP of fp32 inputs)
    mem_bw:            device-memory copy bandwidth, bytes/s (read + write)
    l2_bw:             L2 bandwidth, bytes/s (a copy within L2): re-read K/V tiles come from L2
    sm_count:          streaming multiprocessors (a wave of CTAs)
    launch_s:          GPU-side gap per kernel launch, s
    host_overhead_s:   the per-call floor of a path, s: {"dense": SDPA, "spa": the SPA op}. Measured as the
                       wall time per call of tiny calls issued back to back (host work, launches and
                       any synchronisation): a call takes max(floor, GPU time) (see cost_model)
    dense_efficiency:  fraction of the roofline the dense path achieves: {"sdpa": what SDPA picks by
                       default without a mask, "flash", "cudnn": those backends, "masked": SDPA with a
                       mask tensor, "unfused": a decomposed matmul/softmax/matmul chain}
    spa_efficiency:    the same per SPA stage: {"pool", "select", "exact", "fill"}
    dense_tile:        query/key tile of the dense kernel (its causal diagonal tiles run whole)
    provisional:       names of the values not yet measured on this card by the benchmark
    sources:           where the numbers come from
    """

    name: str
    device_name: str
    matmul_flops: float
    vector_flops: float
    mem_bw: float
    l2_bw: float
    sm_count: int
    launch_s: float
    host_overhead_s: Mapping[str, float]
    dense_efficiency: Mapping[str, float]
    spa_efficiency: Mapping[str, float]
    dense_tile: int = 128
    provisional: tuple[str, ...] = ()
    sources: Mapping[str, str] = field(default_factory=dict)
    versions: Mapping[str, str] = field(default_factory=dict)
    measured_at: str | None = None
    measurements: Mapping[str, Any] = field(default_factory=dict)  # the microbenchmark's raw numbers
    schema: int = SCHEMA

    def __post_init__(self) -> None:
        for name in ("matmul_flops", "vector_flops", "mem_bw", "l2_bw", "launch_s"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
                raise ValueError(f"HardwareProfile {self.name!r}: {name} = {value!r} is not a rate >= 0")
        for group, keys in (("host_overhead_s", ("dense", "spa")), ("dense_efficiency", ("sdpa",)),
                            ("spa_efficiency", EFFICIENCY_STAGES)):
            values = getattr(self, group)
            for key in keys:
                if key not in values:
                    raise ValueError(f"HardwareProfile {self.name!r}: {group} lacks {key!r}")
            if group != "host_overhead_s":
                for key, value in values.items():
                    if not (isinstance(value, (int, float)) and 0.0 < value <= 1.0):
                        raise ValueError(f"HardwareProfile {self.name!r}: {group}[{key!r}] = {value!r} is not in (0, 1]")
        object.__setattr__(self, "provisional", tuple(self.provisional))

    # -- identity and (de)serialisation -------------------------------------------------
    def cache_token(self) -> tuple:
        """A hashable summary of every number the cost model reads."""
        return (
            self.name, self.matmul_flops, self.vector_flops, self.mem_bw, self.l2_bw, self.sm_count, self.launch_s,
            self.dense_tile, tuple(sorted(self.host_overhead_s.items())),
            tuple(sorted(self.dense_efficiency.items())), tuple(sorted(self.spa_efficiency.items())),
        )

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["provisional"] = list(self.provisional)
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "HardwareProfile":
        known = set(cls.__dataclass_fields__)
        values = {key: value for key, value in data.items() if key in known}
        values["provisional"] = tuple(values.get("provisional", ()))
        for key in ("host_overhead_s", "dense_efficiency", "spa_efficiency", "sources", "versions", "measurements"):
            if key in values:
                values[key] = dict(values[key])
        return cls(**values)

    def save(self, path: str | os.PathLike) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(self.to_dict(), indent=2, sort_keys=True))
        os.replace(tmp, path)  # atomic: a concurrent reader sees the old or the new file
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> "HardwareProfile":
        path = Path(path)
        try:
            data = json.loads(path.read_text())
            return cls.from_dict(data)
        except FileNotFoundError:
            raise
        except (ValueError, TypeError) as exc:
            raise ValueError(f"{path} is not a valid hardware profile: {exc}") from None

    def dense_eff(self, kind: str) -> float:
        """Efficiency of the dense path of a site: "fused" (SDPA), "masked" or "unfused"."""
        if kind == "fused":
            return self.dense_efficiency["sdpa"]
        if kind in self.dense_efficiency:
            return self.dense_efficiency[kind]
        return DEFAULT_DENSE_EFFICIENCY[kind](self.dense_efficiency["sdpa"])

    def replace(self, **changes: Any) -> "HardwareProfile":
        return replace(self, **changes)

    def summary(self) -> str:
        prov = f"; provisional: {', '.join(self.provisional)}" if self.provisional else ""
        return (
            f"{self.name} ({self.device_name}): {self.matmul_flops / 1e12:.0f} TFLOP/s matmul, "
            f"{self.mem_bw / 1e12:.2f} TB/s, {self.sm_count} SMs, SDPA eff {self.dense_efficiency['sdpa']:.2f}, "
            f"SPA exact eff {self.spa_efficiency['exact']:.2f}{prov}"
        )


# ---------------------------------------------------------------------------------------
# Built-in profiles
# ---------------------------------------------------------------------------------------
#
# The H200 profile was FITTED to the sixth run of benchmarks/bench_cost_model.py --refit (H200, torch 2.11,
# triton 3.6, CUDA 13.0, 2026-11-28, TMA forward on; benchmarks/results/bench_cost_model_nvidia-h200_2026-11-28_run7.*,
# builtin_refit_h200_run7.json): B=1, Hq=Hkv=32, D=128, bf16 causal, N 512..128K, densities 0.1..0.5, with the
# model of that run: the host/GPU p-norm (cost_model.host_and_gpu, p = 2) and the L2 rate of tile reads. The
# efficiencies are relative to the rates that run's microbenchmark measured, which are therefore the rates
# here (780 TFLOP/s, 3.96 TB/s, L2 tile reads 8.37 TB/s (a copy: 4.80), launch gap 1.12 us). Dense: SDPA's
# default picked cuDNN: "sdpa" 0.80, flash 0.44, cuDNN 0.80. SPA: the four stage efficiencies and the op's
# per-call floor fitted jointly in log time (hardware.fit_spa): pool 1.0, select 0.93, exact 0.70, fill 0.27,
# floor 0.69 ms; in-sample 95.6% decisions, every N* within 1.37x; fitted on densities 0.1/0.3/0.5 it
# predicts 0.2/0.4 at 94.4%, N* 1.08x/1.13x. On a GPU, device_profile="auto" measures the card instead
# (the rates, floors and SPA probes, with these efficiencies as the prior); these numbers serve `explain`
# without a GPU. Earlier fits (run 1: op overhead 1.59 ms; run 3: max(host, GPU) and the copy L2 rate) are
# kept in SUPERSEDED_PROFILES for the offline checks.
#
# The H100 has the same SMs, clocks and L2 as the H200 (less and slower HBM): its efficiencies, L2 rate
# and launch gap are the H200's carried over (derived, provisional: not measured on an H100).

_SPA_PROVISIONAL = ("spa_efficiency", "host_overhead_s", "launch_s")
# Dense paths a profile does not list: SDPA with a mask runs the memory-efficient kernel (about
# 0.6 of flash on Hopper, provisional); an unfused chain is bound by the N x N score traffic.
DEFAULT_DENSE_EFFICIENCY = {"masked": lambda sdpa: 0.6 * sdpa, "unfused": lambda sdpa: 0.7}

_H200_RUN7 = "fitted to bench_cost_model --refit on an H200, 2026-11-28 run 7 (TMA forward, host/GPU p-norm)"
H200 = HardwareProfile(
    name="h200",
    device_name="NVIDIA H200 (SXM, 141 GB HBM3e)",
    matmul_flops=780e12,
    vector_flops=60e12,
    mem_bw=3.96e12,
    l2_bw=8.37e12,
    sm_count=132,
    launch_s=1.12e-6,
    host_overhead_s={"dense": 19e-6, "spa": 0.688e-3},
    dense_efficiency={"sdpa": 0.80, "flash": 0.44, "cudnn": 0.80},
    spa_efficiency={"pool": 1.0, "select": 0.93, "exact": 0.70, "fill": 0.27},
    provisional=(),
    sources={
        "matmul_flops": "measured by the microbenchmark of the 2026-11-28 H200 run 7 (bf16 8K matmul, 780 TFLOP/s)",
        "mem_bw": "measured by the microbenchmark of the 2026-11-28 H200 run 7 (256 MiB copy, 3.96 TB/s)",
        "l2_bw": "measured by the microbenchmark of the 2026-11-28 H200 run 7 (tile reads of a 16 MiB buffer "
        "in a CUDA graph, 8.37 TB/s; a 16 MiB copy: 4.80 TB/s)",
        "launch_s": "measured by the microbenchmark of the 2026-11-28 H200 run 7 (tiny kernels in a CUDA graph)",
        "vector_flops": "datasheet 67 TFLOP/s fp32, ~90% achieved",
        "sm_count": "datasheet (H200 SXM)",
        "dense_efficiency": _H200_RUN7 + " (torch 2.11: SDPA's default = cuDNN)",
        "spa_efficiency": _H200_RUN7 + " (jointly with the per-call floor)",
        "host_overhead_s": "spa: " + _H200_RUN7 + " (the op's per-call floor, 0.69 ms); dense: measured there (19 us)",
    },
)

H100 = H200.replace(
    name="h100",
    device_name="NVIDIA H100 80GB HBM3 (SXM5)",
    matmul_flops=790e12,
    mem_bw=3.0e12,
    provisional=_SPA_PROVISIONAL + ("dense_efficiency", "l2_bw"),
    sources={
        **H200.sources,
        "matmul_flops": "measured in this workplace (bf16 dense matmul, ~790 TFLOP/s)",
        "mem_bw": "measured in this workplace (copy, ~3.0 TB/s)",
        "l2_bw": "the H200's measured L2 rate carried over (same L2; provisional)",
        "launch_s": "the H200's measured launch gap carried over (provisional)",
        "sm_count": "datasheet (H100 SXM5)",
        "dense_efficiency": "derived: the H200 run-7 fit carried over (same SMs and clocks; provisional)",
        "spa_efficiency": "derived: the H200 run-7 fit carried over (same SMs and clocks); not measured on an H100",
        "host_overhead_s": "derived: the H200 run-7 floors carried over (host-side; provisional)",
    },
)

A100 = HardwareProfile(
    name="a100",
    device_name="NVIDIA A100-SXM4-80GB",
    matmul_flops=280e12,
    vector_flops=17.5e12,
    mem_bw=1.75e12,
    l2_bw=4.0e12,
    sm_count=108,
    launch_s=4e-6,
    host_overhead_s={"dense": 15e-6, "spa": 80e-6},
    dense_efficiency={"sdpa": 0.68, "flash": 0.68, "cudnn": 0.56},
    spa_efficiency={"pool": 0.6, "select": 0.3, "exact": 0.37, "fill": 0.37},
    provisional=_SPA_PROVISIONAL + ("matmul_flops", "mem_bw", "l2_bw", "vector_flops", "dense_efficiency"),
    sources={
        "l2_bw": "estimate (provisional)",
        "matmul_flops": "datasheet 312 TFLOP/s bf16, ~90% achieved by cuBLAS (not measured here)",
        "mem_bw": "datasheet 2.04 TB/s, ~86% achieved by a copy (not measured here)",
        "vector_flops": "datasheet 19.5 TFLOP/s fp32, ~90% achieved",
        "sm_count": "datasheet (A100 SXM4)",
        "dense_efficiency": "FlashAttention-2 paper (~190 TFLOP/s causal forward, D=128); cuDNN ~0.82x of "
        "flash on A100 (transformers PR #48163)",
        "spa_efficiency": "provisional: the H100 ratio of the Triton proxy to flash (0.23/0.425) times A100's flash",
        "host_overhead_s": "provisional estimate",
        "launch_s": "provisional estimate",
    },
)

BUILTIN_PROFILES: dict[str, HardwareProfile] = {"h100": H100, "h200": H200, "a100": A100}
# Earlier fits, not offered as device_profile: the offline checks of the microbenchmark
# (bench_cost_model.py --from-json ... --base-profile h200-run1) read a run against a prior that was
# not fitted to it.
SUPERSEDED_PROFILES: dict[str, HardwareProfile] = {"h200-run1": HardwareProfile(
    # fitted to the first 2026-11-28 H200 run (op overhead 1.59 ms then), the built-in h200 until run 3
    name="h200-run1", device_name="NVIDIA H200 (SXM, 141 GB HBM3e)", matmul_flops=790e12, vector_flops=60e12,
    mem_bw=4.3e12, l2_bw=7.0e12, sm_count=132, launch_s=4e-6, host_overhead_s={"dense": 31e-6, "spa": 1.59e-3},
    dense_efficiency={"sdpa": 0.73, "flash": 0.39, "cudnn": 0.72},
    spa_efficiency={"pool": 0.73, "select": 0.32, "exact": 0.59, "fill": 0.28},
    provisional=("host_overhead_s", "launch_s", "l2_bw"),
    sources={"all": "fitted to bench_cost_model_nvidia-h200_2026-11-28 (run 1); superseded by the run-3 fit"}),
    "h200-run3": HardwareProfile(
        # fitted to run 3 with max(host, GPU) and the L2 copy rate, the built-in h200 until run 7
        name="h200-run3", device_name="NVIDIA H200 (SXM, 141 GB HBM3e)", matmul_flops=780e12, vector_flops=60e12,
        mem_bw=4.04e12, l2_bw=4.86e12, sm_count=132, launch_s=1.13e-6, host_overhead_s={"dense": 20e-6, "spa": 0.637e-3},
        dense_efficiency={"sdpa": 1.0, "flash": 0.55, "cudnn": 0.99},
        spa_efficiency={"pool": 1.0, "select": 0.53, "exact": 1.0, "fill": 0.53}, provisional=(),
        sources={"all": "fitted to bench_cost_model_nvidia-h200_2026-11-28_run3 (max(host, GPU), L2 copy rate); "
                 "superseded by the run-7 fit"})}


def builtin_profile(name: str) -> HardwareProfile:
    try:
        return BUILTIN_PROFILES[name.lower()]
    except KeyError:
        raise ValueError(
            f"no built-in hardware profile {name!r}; built-in: {', '.join(BUILTIN_PROFILES)}"
        ) from None


def closest_builtin(device_name: str) -> HardwareProfile:
    """The built-in profile whose efficiencies best stand in for an unmeasured kernel on this card."""
    upper = device_name.upper()
    if "H200" in upper or "GH200" in upper:
        return H200
    if "A100" in upper or "A800" in upper:
        return A100
    return H100


# ---------------------------------------------------------------------------------------
# The cache
# ---------------------------------------------------------------------------------------


def cache_dir() -> Path:
    """``$SPA_CACHE_DIR``, else ``$XDG_CACHE_HOME/spa_compile``, else ``~/.cache/spa_compile``
    (``%LOCALAPPDATA%\\spa_compile`` on Windows)."""
    explicit = os.environ.get("SPA_CACHE_DIR")
    if explicit:
        return Path(explicit).expanduser()
    if sys.platform == "win32" and os.environ.get("LOCALAPPDATA"):
        return Path(os.environ["LOCALAPPDATA"]) / "spa_compile"
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "spa_compile"


@functools.lru_cache(maxsize=1)
def _kernel_sources_hash() -> str:
    """A short hash of the SPA kernel sources: a changed kernel is measured again."""
    root = Path(__file__).parent / "codegen"
    h = hashlib.sha256()
    for path in sorted(root.glob("*.py")):
        h.update(path.name.encode())
        h.update(path.read_bytes())
    return h.hexdigest()[:10]


def current_versions() -> dict[str, str]:
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:  # pragma: no cover
        triton_version = "none"
    try:
        from importlib.metadata import version

        spa_version = version("spa_compile")
    except Exception:  # pragma: no cover - not installed
        spa_version = "0"
    return {
        "torch": torch.__version__,
        "triton": triton_version,
        "cuda": str(torch.version.cuda),
        "spa_compile": spa_version,
        "kernels": _kernel_sources_hash(),
        "schema": str(SCHEMA),
    }


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9.]+", "-", text).strip("-").lower()


def cache_key(device_name: str, capability: tuple[int, int], versions: Mapping[str, str]) -> str:
    parts = [_slug(device_name), f"sm{capability[0]}{capability[1]}"]
    parts += [f"{key}{_slug(str(versions[key]))}" for key in sorted(versions)]
    return "-".join(parts)


def cache_path(key: str) -> Path:
    return cache_dir() / "hardware" / f"{key}.json"


def load_cached(key: str) -> HardwareProfile | None:
    path = cache_path(key)
    if not path.is_file():
        return None
    try:
        return HardwareProfile.load(path)
    except (ValueError, OSError) as exc:
        warnings.warn(f"spa_compile: ignoring the unreadable hardware profile cache {path}: {exc}", stacklevel=2)
        return None


# ---------------------------------------------------------------------------------------
# Measurement
# ---------------------------------------------------------------------------------------

# The shapes the microbenchmark times the attention kernels at (bf16, causal).
DENSE_PROBE = dict(b=1, hq=16, hkv=16, n=4096, d=128)
# GPU-bound on an H100/H200 even with a per-call floor of ~1.5 ms (about 6 ms there): a probe the
# floor explains says nothing about the kernels' efficiency (the 8K probe of schema 1 was such a one).
SPA_PROBE = dict(b=1, hq=16, hkv=16, n=32768, d=128, density=0.3)
# Schema 3: the SPA op at several points of one shape (the grid's D=128 bf16 causal kernels, 16 heads,
# 32K: 2-6 ms each on an H200, ~0.3 s for all) that weight the stages differently, so that
# fit_spa can pin the stage efficiencies (the single probe of schema 2 scaled the built-in ratios):
# density 0.1 -> 0.3 moves time from the fill to the exact stage (exact ~ k, fill ~ visible - k);
# fill "none" at 0.2 removes the fill stage (its difference to "landmark" at 0.2 is the fill);
# 0.3 is SPA_PROBE (at 32K it runs the selection's wide-buffer path, 0.1-0.2 the narrow one).
# Pool and selection do not change with density at one shape: the base profile's ratio splits them
# (they are ~5% of the time here).
SPA_PROBES = {
    "n32k_d0.1": dict(SPA_PROBE, density=0.1, fill="landmark"),
    "n32k_d0.2": dict(SPA_PROBE, density=0.2, fill="landmark"),
    "n32k_d0.2_nofill": dict(SPA_PROBE, density=0.2, fill="none"),
    "n32k_d0.3": dict(SPA_PROBE, density=0.3, fill="landmark"),
}
# The prior's weight in the probe fit (fit_spa's lam): small, so that the probes decide what they can
# tell apart (the fill is 5-10% of a probe's time); the prior still splits pool from selection.
PROBE_FIT_PRIOR = 1e-3
SPA_PROBE_FLOOR_RATIO = 1.5  # a probe within this factor of the per-call floor does not measure the kernels
# The per-call floor of the SPA op: the whole op at this tiny shape, calls issued back to back.
SPA_FLOOR_PROBE = dict(b=1, hq=1, hkv=1, n=128, d=64)


def _graph_time(fn: Callable[[], Any], reps: int = 5) -> float | None:
    """Median seconds of one replay of a CUDA graph of ``fn`` (no host launch cost); None where
    capture is not possible."""
    try:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            fn()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            fn()
        return _median_cuda_time(graph.replay, reps=reps, warmup=2)
    except Exception:  # pragma: no cover - capture unsupported: the caller falls back
        return None


def cuda_times(fn: Callable[[], Any], reps: int = 10, warmup: int = 3,
               before: Callable[[], Any] | None = None) -> list[float]:
    """Seconds of each of ``reps`` calls of ``fn`` on the current stream, by CUDA events, each
    synchronized; ``before`` (untimed, e.g. an L2 flush) runs ahead of every timed call."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        if before is not None:
            before()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return times


def _median_cuda_time(fn: Callable[[], Any], reps: int = 10, warmup: int = 3) -> float:
    """Median seconds of ``fn`` on the current stream, by CUDA events."""
    return statistics.median(cuda_times(fn, reps, warmup))


def _host_time(fn: Callable[[], Any], reps: int = 30, batches: int = 3) -> float:
    """Wall seconds per call of a tiny call issued back to back: the CPU cost of issuing it.

    The fastest of ``batches`` batches: background work on the host (other threads, compile
    workers) only ever adds time, and it came and went within one run (H200, bench_cost_model run 4)."""
    for _ in range(5):
        fn()
    torch.cuda.synchronize()
    best = float("inf")
    for _ in range(batches):
        t0 = time.perf_counter()
        for _ in range(reps):
            fn()
        torch.cuda.synchronize()
        best = min(best, (time.perf_counter() - t0) / reps)
    return best


def _l2_read_rate(device, props_sms: int) -> float | None:
    """Bytes/s of K/V-sized tiles read by 8 programs per SM from a 16 MiB (L2-resident) buffer, in
    a CUDA graph (``codegen.l2_read_probe``); None where it cannot run."""
    try:
        from .codegen.l2_read_probe import l2_read

        x = torch.randn(8 << 20, device=device, dtype=torch.bfloat16)  # 16 MiB
        programs, iters = 8 * props_sms, 256
        _, nbytes = l2_read(x, programs, iters)  # compile, and warm L2
        seconds = _graph_time(lambda: l2_read(x, programs, iters)) or _median_cuda_time(
            lambda: l2_read(x, programs, iters), reps=5, warmup=2)
        return nbytes / seconds
    except Exception:  # pragma: no cover - the copy rate stands
        return None


def _attention_inputs(device, b, hq, hkv, n, d, dtype=torch.bfloat16):
    gen = torch.Generator(device=device).manual_seed(0)
    q = torch.randn(b, hq, n, d, device=device, dtype=dtype, generator=gen)
    k = torch.randn(b, hkv, n, d, device=device, dtype=dtype, generator=gen)
    v = torch.randn(b, hkv, n, d, device=device, dtype=dtype, generator=gen)
    return q, k, v


def _sdpa_backends():
    from torch.nn.attention import SDPBackend

    return {"flash": SDPBackend.FLASH_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION}


def run_microbenchmarks(device: torch.device, spa: bool = True) -> dict[str, Any]:
    """Time the primitives on a CUDA device; returns raw seconds and rates (see :func:`profile_from_measurements`)."""
    import torch.nn.functional as F
    from torch.nn.attention import sdpa_kernel

    raw: dict[str, Any] = {}
    with torch.no_grad(), torch.cuda.device(device):
        n = 8192
        a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
        bm = torch.randn(n, n, device=device, dtype=torch.bfloat16)
        raw["matmul_flops"] = 2 * n**3 / _median_cuda_time(lambda: a @ bm)
        del a, bm
        x = torch.empty(64 << 20, device=device, dtype=torch.float32)  # 256 MiB, far beyond L2
        y = torch.empty_like(x)
        raw["mem_bw"] = 2 * x.numel() * 4 / _median_cuda_time(lambda: y.copy_(x))
        del x, y
        xs = torch.empty(2 << 20, device=device, dtype=torch.float32)  # 8 MiB + 8 MiB: stays in L2
        ys = torch.empty_like(xs)

        def l2_copies():
            for _ in range(50):
                ys.copy_(xs)

        # In a CUDA graph: 50 eager copies of 16 MiB time the host's launches, not L2 (schema 1
        # measured 1.6 TB/s on an H200, below its HBM bandwidth).
        l2_time = _graph_time(l2_copies) or _median_cuda_time(l2_copies, reps=5, warmup=2)
        raw["l2_bw"] = 50 * 2 * xs.numel() * 4 / l2_time
        del xs, ys
        if _kernels_available():
            raw["l2_read_bw"] = _l2_read_rate(device, props_sms=torch.cuda.get_device_properties(device).multi_processor_count)
        z = torch.zeros(1, device=device)

        def burst():
            for _ in range(200):
                z.add_(1)

        # GPU-side gap per kernel: a graph of tiny kernels (eager, the host's issue rate shows instead)
        raw["launch_s"] = (_graph_time(burst) or _median_cuda_time(burst, reps=5, warmup=2)) / 200
        fp = SPA_FLOOR_PROBE
        tq, tk, tv = _attention_inputs(device, fp["b"], fp["hq"], fp["hkv"], fp["n"], fp["d"])
        raw["host_dense_s"] = _host_time(lambda: F.scaled_dot_product_attention(tq, tk, tv, is_causal=True))
        p = DENSE_PROBE
        q, k, v = _attention_inputs(device, p["b"], p["hq"], p["hkv"], p["n"], p["d"])
        dense = {"sdpa": _median_cuda_time(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True))}
        for name, backend in _sdpa_backends().items():
            try:
                with sdpa_kernel([backend]):
                    dense[name] = _median_cuda_time(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True))
            except RuntimeError:  # backend not available for this call
                pass
        raw["dense"] = dense
        del q, k, v
        if spa and _kernels_available():
            from . import ops
            from .config import SPAConfig

            def spa_call(q, k, v, cfg):
                return torch.ops.spa.attention(q, k, v, None, None, None, None, 1.0 / math.sqrt(q.shape[-1]),
                                               True, 0, -1, ops.config_to_str(cfg))

            cfg_small = SPAConfig()
            # The op's per-call floor: wall time per call of back-to-back calls at a tiny shape,
            # which is what CUDA-event timing (do_bench) reports while the host is the slower side.
            raw["host_spa_s"] = _host_time(lambda: spa_call(tq, tk, tv, cfg_small))
            probes: dict[str, float] = {}
            inputs: dict[tuple, tuple] = {}
            for name, p in SPA_PROBES.items():
                key = (p["b"], p["hq"], p["hkv"], p["n"], p["d"])
                if key not in inputs:
                    inputs[key] = _attention_inputs(device, *key)
                q, k, v = inputs[key]
                cfg = spa_probe_config(p)
                # a longer warm-up than the other probes: the first GPU-bound SPA calls of a process ran
                # ~10% slower per head than the grid in the 2026-11-28 run 2 (16 heads: 6.7 ms vs 11.9 ms at 32)
                probes[name] = _median_cuda_time(lambda: spa_call(q, k, v, cfg), reps=10, warmup=10)
            del inputs
            raw["spa_probes"] = probes
            raw["spa_s"] = probes["n32k_d0.3"]  # schema 2's single probe (SPA_PROBE), kept for comparison
    return raw


# The no-fill probe's exact stage reads (cost model) what the kernel read from L2 in at most the
# probe's time: a lower bound on the L2 read rate (the copy rate alone was 1.2x below it: bench_cost_model run 5).
L2_BOUND_PROBE = "n32k_d0.2_nofill"


def _l2_read_bound(raw: Mapping[str, Any], l2_bw: float, base: HardwareProfile) -> tuple[float, str | None]:
    """The L2 rate the cost model uses for reads of K/V tiles: the largest of the copy rate, the
    tile-read probe (``l2_read_bw``) and the no-fill SPA probe's bound. Returns (rate, how) with
    ``how`` None where the copy rate stands."""
    from .passes.cost_model import stage_l2_bytes

    best, how = l2_bw, None
    read = raw.get("l2_read_bw")
    if read and float(read) > best:
        best, how = float(read), f"tile-read probe {float(read) / 1e12:.2f} TB/s (the copy: {l2_bw / 1e12:.2f})"
    t = raw.get("spa_probes", {}).get(L2_BOUND_PROBE)
    if t:
        p = SPA_PROBES[L2_BOUND_PROBE]
        bound = stage_l2_bytes(spa_probe_shape(p), spa_probe_config(p), "exact") / float(t)
        if bound > best:
            best, how = bound, (f"bound by the {L2_BOUND_PROBE} probe: its exact stage read "
                                f"{bound / 1e12:.2f} TB/s from L2 (copy {l2_bw / 1e12:.2f}"
                                + (f", tile-read probe {float(read) / 1e12:.2f})" if read else ")"))
    return best, how


def spa_probe_config(p: Mapping[str, Any]):
    from .config import SPAConfig

    return SPAConfig(density=p["density"], fill=p.get("fill", "landmark"))


def spa_probe_shape(p: Mapping[str, Any]):
    from .passes.cost_model import SiteShape

    return SiteShape(b=p["b"], hq=p["hq"], hkv=p["hkv"], nq=p["n"], nk=p["n"], d=p["d"], dv=p["d"], causal=True)


def _kernels_available() -> bool:
    try:
        from . import codegen
    except ImportError:  # pragma: no cover - triton missing
        return False
    return hasattr(codegen, "spa_forward")


def profile_from_measurements(
    raw: Mapping[str, Any], base: HardwareProfile, device_name: str, sm_count: int, versions: Mapping[str, str]
) -> HardwareProfile:
    """A profile from :func:`run_microbenchmarks`' numbers; what was not measured comes from ``base``."""
    from .config import SPAConfig
    from .passes.cost_model import SiteShape, predict

    mem_bw = float(raw["mem_bw"])
    l2_bw = float(raw.get("l2_bw", base.l2_bw))
    l2_note = None
    if l2_bw < mem_bw:  # an L2-resident copy slower than HBM: launch-bound, not a bandwidth
        l2_note = (f"built-in estimate scaled by the measured HBM bandwidth (the L2 copy measured "
                   f"{l2_bw / 1e12:.2f} TB/s, below HBM: launch bound)")
        l2_bw = base.l2_bw * mem_bw / base.mem_bw
    l2_bw, l2_how = _l2_read_bound(raw, l2_bw, base)
    if l2_how:
        l2_note = (l2_note + "; " if l2_note else "") + l2_how
    prof = base.replace(
        name=f"measured:{_slug(device_name)}",
        device_name=device_name,
        matmul_flops=float(raw["matmul_flops"]),
        mem_bw=mem_bw,
        l2_bw=l2_bw,
        sm_count=int(sm_count),
        launch_s=float(raw["launch_s"]),
        versions=dict(versions),
        measured_at=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        measurements=_plain(raw),
    )
    measured = {"matmul_flops", "mem_bw", "launch_s"} | ({"l2_bw"} if "l2_bw" in raw and not l2_note else set())
    if l2_note and l2_how:
        measured.add("l2_bw")
    provisional = set(base.provisional) - measured
    sources = dict(base.sources)
    for key in measured:
        sources[key] = "measured by spa_compile.hardware.run_microbenchmarks"
    if l2_note:
        sources["l2_bw"] = l2_note
    host = dict(base.host_overhead_s)
    if "host_dense_s" in raw:
        host["dense"] = float(raw["host_dense_s"])
    if "host_spa_s" in raw:
        host["spa"] = float(raw["host_spa_s"])
        provisional.discard("host_overhead_s")
        sources["host_overhead_s"] = "measured (tiny calls issued back to back: the per-call floor)"
    prof = prof.replace(host_overhead_s=host)
    unit = prof.replace(
        host_overhead_s={"dense": 0.0, "spa": 0.0},
        dense_efficiency={key: 1.0 for key in prof.dense_efficiency},
        spa_efficiency={key: 1.0 for key in EFFICIENCY_STAGES},
    )
    dense_eff = dict(prof.dense_efficiency)
    p = DENSE_PROBE
    shape = SiteShape(b=p["b"], hq=p["hq"], hkv=p["hkv"], nq=p["n"], nk=p["n"], d=p["d"], dv=p["d"], causal=True)
    roof = predict(shape, SPAConfig(), unit).dense_s - unit.launch_s
    for key, seconds in raw.get("dense", {}).items():
        dense_eff[key] = _clip_eff(roof / max(seconds - unit.launch_s, 1e-9))
    if "sdpa" in raw.get("dense", {}):
        provisional.discard("dense_efficiency")
        sources["dense_efficiency"] = "measured (SDPA default, flash and cuDNN backends at the probe shape)"
    spa_eff = dict(prof.spa_efficiency)
    probes = {name: float(t) for name, t in raw.get("spa_probes", {}).items() if name in SPA_PROBES}
    usable = {name: t for name, t in probes.items() if t >= SPA_PROBE_FLOOR_RATIO * host["spa"]}
    if len(usable) >= 2:
        # the stage efficiencies fitted to the probes (hardware.fit_spa, least squares in log time,
        # the measured floor held); base's efficiencies are the prior for what the probes cannot split
        points = [(spa_probe_shape(SPA_PROBES[name]), spa_probe_config(SPA_PROBES[name]), t)
                  for name, t in usable.items()]
        spa_eff, _, stats = fit_spa(points, prof, fit_fixed=False, lam=PROBE_FIT_PRIOR)
        provisional.discard("spa_efficiency")
        sources["spa_efficiency"] = (f"fitted to {len(points)} microbenchmark probes ({', '.join(usable)}; "
                                     f"rms log error {stats['rms_log_error']:.3f}; prior {base.name})")
    elif probes:
        sources["spa_efficiency"] = (f"{base.name}'s ({len(probes) - len(usable)} of {len(probes)} microbenchmark "
                                     "probes within 1.5x of the per-call floor: they do not measure the kernels)")
    elif "spa_s" in raw:  # a schema-2 measurement: one probe scales the base's stage ratios
        probe = [(_probe_spa_shape(), SPAConfig(density=SPA_PROBE["density"]), float(raw["spa_s"]))]
        if float(raw["spa_s"]) >= SPA_PROBE_FLOOR_RATIO * host["spa"]:
            spa_eff = refit_spa_scale(prof, probe)
            sources["spa_efficiency"] = ("one-point scale of the built-in stage ratios (microbenchmark probe "
                                         f"{SPA_PROBE})")
        else:
            sources["spa_efficiency"] = (f"{base.name}'s (the microbenchmark probe took {float(raw['spa_s']):.2e} s, "
                                         "within 1.5x of the per-call floor: it does not measure the kernels)")
    return prof.replace(host_overhead_s=host, dense_efficiency=dense_eff, spa_efficiency=spa_eff,
                        provisional=tuple(sorted(provisional)), sources=sources)


def _plain(raw: Mapping[str, Any]) -> dict[str, Any]:
    return {key: (_plain(value) if isinstance(value, Mapping) else float(value)) for key, value in raw.items()}


def _probe_spa_shape():
    return spa_probe_shape(SPA_PROBE)


def _clip_eff(value: float) -> float:
    return float(min(1.0, max(1e-3, value)))


def spa_rooflines(points, profile: HardwareProfile) -> list[tuple[list[float], float, float]]:
    """Per measured ``(shape, cfg, seconds)`` point: the SPA stages' roofline seconds at efficiency 1
    (:data:`EFFICIENCY_STAGES` order), the GPU-side launch gaps, and the measured seconds."""
    from .passes.cost_model import predict

    unit = profile.replace(launch_s=0.0, host_overhead_s={"dense": 0.0, "spa": 0.0},
                           spa_efficiency={key: 1.0 for key in EFFICIENCY_STAGES})
    out = []
    for shape, cfg, seconds in points:
        stages = predict(shape, cfg, unit).stages
        out.append(([stages[s] for s in EFFICIENCY_STAGES], SPA_LAUNCHES * profile.launch_s, float(seconds)))
    return out


SPA_LAUNCHES = 4  # kernels of one SPA forward (pool k/v, pool q, select, sparse attention)
FIT_FIXED_FLOOR = 1e-6  # the least per-call floor a fit may give


def spa_time(fixed: float, inv_eff: list[float], roofs: list[float], launches: float) -> float:
    """The cost model's SPA time of one call: ``host_and_gpu(fixed, sum_s roof_s / eff_s + launches)``."""
    from .passes.cost_model import host_and_gpu

    return host_and_gpu(fixed, sum(r * x for r, x in zip(roofs, inv_eff)) + launches)


def fit_spa(points, profile: HardwareProfile, fit_fixed: bool = True, lam: float = 0.05,
            iterations: int = 60) -> tuple[dict[str, float], float, dict[str, float]]:
    """SPA stage efficiencies and the op's per-call floor fitted jointly to measured points.

    Minimises ``sum_i (log t_pred_i - log t_i)^2 + lam * sum_s (log(1/e_s) - log(1/e0_s))^2`` with
    ``t_pred = max(F, sum_s roof_s / e_s + launches)`` (:func:`spa_time`), ``0 < e_s <= 1``, over the
    four efficiencies ``e_s`` and (``fit_fixed``) the floor ``F``, by projected Gauss-Newton
    (Levenberg-Marquardt) in log parameters. ``e0`` (the prior, from ``profile``) only decides what
    the points cannot tell apart (selection and fill both grow as N^2 at a fixed density).
    Points where ``F`` dominates inform ``F`` only; the efficiencies come from the GPU-bound ones.

    Returns ``(efficiencies, F, stats)`` (``stats``: rms log error, points, points above F).
    """
    data = spa_rooflines(points, profile)
    if not data:
        return dict(profile.spa_efficiency), float(profile.host_overhead_s["spa"]), {"points": 0}
    prior = [math.log(1.0 / profile.spa_efficiency[s]) for s in EFFICIENCY_STAGES]
    fixed0 = profile.host_overhead_s["spa"]
    if fit_fixed:  # start the floor at the fastest measured call
        fixed0 = min(t for _, _, t in data)
    m = len(EFFICIENCY_STAGES)
    theta = prior + [math.log(max(fixed0, FIT_FIXED_FLOOR))]
    lo = [0.0] * m + [math.log(FIT_FIXED_FLOOR)]
    hi = [math.log(1e3)] * m + [math.log(10.0)]
    sl = math.sqrt(lam)

    def residuals(th):
        inv = [math.exp(v) for v in th[:m]]
        fixed = math.exp(th[m])
        res = [math.log(spa_time(fixed, inv, roofs, launch) / t) for roofs, launch, t in data]
        return res + [sl * (th[j] - prior[j]) for j in range(m)]

    free = list(range(m + 1)) if fit_fixed else list(range(m))
    damping = 1e-3
    cost = sum(r * r for r in residuals(theta))
    for _ in range(iterations):
        base = residuals(theta)
        jac = []
        for j in free:  # forward differences (max() makes the residuals piecewise smooth)
            step = list(theta)
            step[j] += 1e-6
            jac.append([(a - b) / 1e-6 for a, b in zip(residuals(step), base)])
        jt = torch.tensor(jac, dtype=torch.float64)
        r = torch.tensor(base, dtype=torch.float64)
        jtj, jtr = jt @ jt.T, jt @ r
        improved = False
        for _ in range(12):
            a = jtj + damping * torch.diag(torch.diagonal(jtj).clamp_min(1e-12))
            delta = torch.linalg.solve(a, -jtr).tolist()
            trial = list(theta)
            for j, dv in zip(free, delta):
                trial[j] = min(hi[j], max(lo[j], trial[j] + dv))
            new_cost = sum(x * x for x in residuals(trial))
            if new_cost < cost - 1e-15:
                theta, cost, improved = trial, new_cost, True
                damping = max(damping / 3, 1e-9)
                break
            damping *= 4
        if not improved:
            break
    eff = {s: _clip_eff(math.exp(-theta[j])) for j, s in enumerate(EFFICIENCY_STAGES)}
    fixed = math.exp(theta[m]) if fit_fixed else fixed0
    inv = [1 / eff[s] for s in EFFICIENCY_STAGES]
    fit = [spa_time(fixed, inv, roofs, launch) for roofs, launch, _ in data]
    errors = [math.log(p / t) for p, (_, _, t) in zip(fit, data)]
    gpu = [sum(r * x for r, x in zip(roofs, inv)) + launch for roofs, launch, _ in data]
    stats = {"points": len(data), "rms_log_error": math.sqrt(sum(e * e for e in errors) / len(errors)),
             "gpu_bound_points": sum(g > fixed for g in gpu)}  # kernels longer than the host issue
    return eff, fixed, stats


def refit_spa_scale(profile: HardwareProfile, points) -> dict[str, float]:
    """SPA stage efficiencies scaled by one factor (the stage ratios kept) so that the predicted GPU
    time matches measured ``(shape, cfg, seconds)`` points; the per-call floor
    (``host_overhead_s["spa"]``) is held. Points the floor explains (measured below 1.5 times it) say
    nothing about the GPU time and are skipped; with none left the efficiencies stay as they are."""
    fixed = profile.host_overhead_s["spa"]
    logs = []
    for roofs, launches, seconds in spa_rooflines(points, profile):
        if seconds < 1.5 * fixed:
            continue
        gpu = sum(r / profile.spa_efficiency[s] for r, s in zip(roofs, EFFICIENCY_STAGES))
        logs.append(math.log(max(gpu, 1e-12) / max(seconds - launches, 1e-12)))
    if not logs:
        return dict(profile.spa_efficiency)
    scale = math.exp(sum(logs) / len(logs))
    return {key: _clip_eff(value * scale) for key, value in profile.spa_efficiency.items()}


def measure_profile(device: torch.device | int | str | None = None, spa: bool = True) -> HardwareProfile:
    """Measure the CUDA device (a few seconds; the SPA kernels' first compile may add more)."""
    from torch._subclasses.fake_tensor import unset_fake_temporarily

    if not torch.cuda.is_available():
        raise RuntimeError("measure_profile needs a CUDA device")
    dev = torch.device("cuda", torch.cuda.current_device()) if device is None else torch.device(device)
    if dev.index is None:
        dev = torch.device("cuda", torch.cuda.current_device())
    props = torch.cuda.get_device_properties(dev)
    with unset_fake_temporarily():
        raw = torch._dynamo.disable(run_microbenchmarks)(dev, spa=spa)
    return profile_from_measurements(raw, closest_builtin(props.name), props.name, props.multi_processor_count,
                                     current_versions())


_memo: dict[str, HardwareProfile] = {}


def profile_for_device(device: torch.device, measure: Callable[..., HardwareProfile] | None = None) -> HardwareProfile:
    """The measured profile of a CUDA device: from this process, the disk cache, or measured now."""
    dev = torch.device(device)
    index = dev.index if dev.index is not None else torch.cuda.current_device()
    props = torch.cuda.get_device_properties(index)
    return cached_profile(props.name, (props.major, props.minor),
                          lambda: (measure or measure_profile)(torch.device("cuda", index)))


def cached_profile(device_name: str, capability: tuple[int, int], measure: Callable[[], HardwareProfile],
                   versions: Mapping[str, str] | None = None) -> HardwareProfile:
    """The profile of a card from this process's memo, else the disk cache, else ``measure()``
    (then written to the cache). Keyed by :func:`cache_key`."""
    key = cache_key(device_name, capability, versions or current_versions())
    if key in _memo:
        return _memo[key]
    prof = load_cached(key)
    if prof is None:
        prof = measure()
        try:
            prof.save(cache_path(key))
        except OSError as exc:  # a read-only home: keep it for this process
            warnings.warn(f"spa_compile: could not cache the hardware profile at {cache_path(key)}: {exc}",
                          stacklevel=2)
    _memo[key] = prof
    return prof


def resolve_profile(spec: str, device: torch.device | None) -> tuple[HardwareProfile | None, str]:
    """The profile ``device_profile=spec`` means for a site on ``device``, and a note on it.

    None (with the reason) where "auto" has no GPU to measure: the site's tensors are not on
    CUDA, or no CUDA device is present. A built-in name or a JSON path applies anywhere.
    """
    if spec != "auto":
        if spec.lower() in BUILTIN_PROFILES:
            return builtin_profile(spec), f"built-in profile {spec.lower()}"
        path = Path(spec).expanduser()
        if not path.is_file():
            raise ValueError(f"SPAConfig.device_profile = {spec!r}: no such profile file")
        return _load_file_profile(path), f"profile file {path}"
    if device is None or device.type != "cuda":
        where = "unknown" if device is None else device.type
        return None, f"the site's tensors are on {where}, not a GPU"
    if not torch.cuda.is_available():
        return None, "no CUDA device to measure"
    try:
        return profile_for_device(device), "measured on this GPU"
    except Exception as exc:  # a failed measurement must not fail the compile
        prof = closest_builtin(torch.cuda.get_device_name(device))
        warnings.warn(f"spa_compile: measuring the GPU failed ({exc!r}); using the built-in {prof.name} profile",
                      stacklevel=2)
        return prof, f"built-in profile {prof.name} (measuring failed)"


_file_memo: dict[tuple[str, int], HardwareProfile] = {}


def _load_file_profile(path: Path) -> HardwareProfile:
    key = (str(path.resolve()), path.stat().st_mtime_ns)
    if key not in _file_memo:
        _file_memo[key] = HardwareProfile.load(path)
    return _file_memo[key]
