"""Decide, per attention site, whether it runs SPA or stays dense, and why.

Order: hard reasons (SPA cannot run the site), per-site overrides (``sites``), the mode, and in
mode "auto":

- ``min_seq_len`` set to an int: a plain threshold on the number of keys (it overrides the model);
- otherwise the cost model (:mod:`.cost_model`) on the hardware profile of ``device_profile``:
  SPA where predicted faster by ``margin``. Without a profile (``device_profile="auto"`` and the
  site is not on a GPU) the default threshold :data:`~spa_compile.config.DEFAULT_MIN_SEQ_LEN`.

A site whose key length is symbolic (``dynamic=True``, ``mark_dynamic``) is decided at run
time: the decision is "spa" with ``runtime_threshold`` set, and the rewrite emits
:func:`spa_compile.runtime_choice.spa_or_dense`, which runs SPA when ``Nk >= runtime_threshold``
and dense attention otherwise, in one compiled graph.
"""

from __future__ import annotations

import fnmatch
import math
from dataclasses import dataclass, field

import torch
import torch.fx as fx

from ..config import SPAConfig
from ..hardware import HardwareProfile, resolve_profile
from ..runtime_choice import RUNTIME_THRESHOLD_META  # the node.meta key runtime_choice.spa_call reads
from . import cost_model
from .find_attention import AttentionSite, example_value


@dataclass
class Decision:
    """What the backend does with one site, and why.

    predicted_dense_s / predicted_spa_s: predicted seconds of each path at the traced shape
        (None without a hardware profile);
    n_star: predicted crossover length (margin 0): SPA is faster from here on; ``math.inf`` if
        not up to ``cost_model.N_MAX``; for self-attention N = Nq = Nk, else N = Nk;
    switch_len: the length from which mode "auto" takes SPA (N* with the margin, or min_seq_len);
    runtime_threshold: for a symbolic length, the rewritten graph runs SPA when Nk >= this;
    profile: the hardware profile of the predictions; stages: predicted seconds per SPA stage.
    """

    decision: str  # "spa" | "dense"
    reason: str
    predicted_dense_s: float | None = None
    predicted_spa_s: float | None = None
    n_star: float | None = None
    switch_len: float | None = None
    runtime_threshold: int | None = None
    profile: str | None = None
    stages: dict[str, float] | None = field(default=None, repr=False)

    @property
    def predicted_speedup(self) -> float | None:
        if self.predicted_dense_s is None or not self.predicted_spa_s:
            return None
        return self.predicted_dense_s / self.predicted_spa_s


def unsupported_reason(site: AttentionSite) -> str | None:
    """Why SPA cannot run this site at all, or None."""
    # the analyses proved it unsafe to rewrite (weights with other users, softmax over the
    # wrong axis, a bias mask...): dense whatever the configuration says
    reject = getattr(site, "reject_reason", None)
    if reject:
        return reject
    q, k, v = (example_value(n) for n in (site.q, site.k, site.v))
    if q is None or k is None or v is None:
        return "q/k/v shapes unknown at trace time"
    if q.dim() not in (3, 4):
        return f"q has {q.dim()} dims; SPA takes [B, H, N, D] or [B*H, N, D]"
    if not (q.is_floating_point() and k.is_floating_point() and v.is_floating_point()):
        return "q/k/v are not floating point"
    if isinstance(site.dropout_p, fx.Node) or (site.dropout_p or 0.0) > 0.0:
        return "dropout_p > 0: SPA does not implement dropout"
    if isinstance(site.scale, fx.Node):
        return "the scale is a tensor computed at run time"
    if isinstance(site.is_causal, fx.Node):
        return "is_causal is not a constant"
    if site.attn_mask is not None and site.is_causal:
        return "attn_mask together with is_causal=True (SDPA rejects it too)"
    if site.attn_mask is not None and example_value(site.attn_mask) is None:
        return "attn_mask is not a tensor"
    if q.dim() == 4 and q.shape[1] != k.shape[1]:
        if not site.enable_gqa:
            return "q and k/v head counts differ without enable_gqa"
        if q.shape[1] % k.shape[1]:
            return "q heads are not a multiple of k/v heads"
    return None


def _site_override(name: str, cfg: SPAConfig) -> str | None:
    for pattern, decision in cfg.sites.items():
        if fnmatch.fnmatchcase(name, pattern):
            return decision
    return None


# ---------------------------------------------------------------------------------------
# Shapes
# ---------------------------------------------------------------------------------------


def _hint(x) -> int:
    """A concrete value for a possibly symbolic size (its hint)."""
    if isinstance(x, torch.SymInt):
        hint = x.node.hint
        return int(hint) if hint is not None else 1
    return int(x)


def _is_symbolic(x) -> bool:
    if not isinstance(x, torch.SymInt):
        return False
    try:
        return not x.node.is_constant() and not getattr(x.node.expr, "is_number", False)
    except Exception:  # pragma: no cover - older SymNode APIs
        return True


def _dense_mask(site: AttentionSite) -> bool:
    """A mask tensor SPA would have to take as is (none recovered): its kernels do not take it."""
    return site.attn_mask is not None and getattr(site, "structure", None) is None


def _dense_kind(site: AttentionSite) -> str:
    """What the site runs when it stays dense."""
    if getattr(site, "decomposed", site.pattern != "sdpa"):
        return "unfused"
    if site.attn_mask is not None or getattr(site, "mask_nodes", None) or getattr(site, "structure", None):
        return "masked"
    return "fused"


def _window(structure) -> int | None:
    window = getattr(structure, "window", None)
    if window is None:
        return None
    try:
        return int(window)  # a symbolic window (in the graph's sizes) is left out: SPA is not favoured
    except (TypeError, ValueError):
        return None


def site_shape(site: AttentionSite) -> cost_model.SiteShape:
    """The site's sizes (symbolic ones at their traced hints), mask structure and dense path."""
    q, k, v = (example_value(n) for n in (site.q, site.k, site.v))
    if q.dim() == 3:  # (B*H, N, D)
        b, hq, hkv = _hint(q.shape[0]), 1, 1
    else:
        b, hq, hkv = _hint(q.shape[0]), _hint(q.shape[1]), _hint(k.shape[1])
    structure = getattr(site, "structure", None)
    causal = bool(structure.causal) if structure is not None else site.is_causal is True
    return cost_model.SiteShape(
        b=b, hq=hq, hkv=hkv, nq=_hint(q.shape[-2]), nk=_hint(k.shape[-2]), d=_hint(q.shape[-1]),
        dv=_hint(v.shape[-1]), causal=causal, dtype_bytes=q.element_size(),
        fp32=q.dtype == torch.float32 or q.dtype == torch.float64,
        window=_window(structure) if causal else None, dense_kind=_dense_kind(site),
    )


def _length_scale(site: AttentionSite) -> str:
    """"both" when Nq and Nk are one length (self-attention), else "keys"."""
    nq, nk = example_value(site.q).shape[-2], example_value(site.k).shape[-2]
    if _is_symbolic(nq) or _is_symbolic(nk):
        same = _is_symbolic(nq) and _is_symbolic(nk) and nq.node.expr == nk.node.expr
        return "both" if same else "keys"
    return "both" if _hint(nq) == _hint(nk) else "keys"


# ---------------------------------------------------------------------------------------
# Formatting
# ---------------------------------------------------------------------------------------


def fmt_seconds(t: float | None) -> str:
    if t is None:
        return "-"
    if t >= 1.0:
        return f"{t:.2f} s"
    if t >= 1e-3:
        return f"{t * 1e3:.3g} ms"
    return f"{t * 1e6:.3g} us"


def fmt_length(n: float | None) -> str:
    if n is None:
        return "-"
    if math.isinf(n):
        return f"never (up to {cost_model.N_MAX})"
    return str(int(n))


# ---------------------------------------------------------------------------------------
# The decision
# ---------------------------------------------------------------------------------------


def _runtime(site: AttentionSite, threshold: int, reason: str, **extra) -> Decision:
    site.node.meta[RUNTIME_THRESHOLD_META] = int(threshold)
    return Decision("spa", reason, runtime_threshold=int(threshold), **extra)


def decide(site: AttentionSite, cfg: SPAConfig) -> Decision:
    reason = unsupported_reason(site)
    if reason is not None:
        return Decision("dense", reason)
    override = _site_override(site.name, cfg)
    if override is not None:
        return Decision(override, f"sites override -> {override}")
    if cfg.mode == "dense":
        return Decision("dense", "mode='dense'")
    if cfg.mode == "spa":
        return Decision("spa", "mode='spa'")
    return _decide_auto(site, cfg)


def _decide_auto(site: AttentionSite, cfg: SPAConfig) -> Decision:
    nk_raw = example_value(site.k).shape[-2]
    dynamic = _is_symbolic(nk_raw)
    shape = site_shape(site)
    nk = shape.nk
    length = f"Nk={nk_raw} (dynamic, traced at {nk})" if dynamic else f"Nk={nk}"
    device = example_value(site.q).device
    profile, note = resolve_profile(cfg.device_profile, device)

    extra: dict = {}
    if profile is not None:
        extra = _predictions(site, shape, cfg, profile)

    if cfg.min_seq_len != "auto" or profile is None:
        threshold = cfg.effective_min_seq_len
        source = (f"min_seq_len={threshold}" if cfg.min_seq_len != "auto"
                  else f"min_seq_len={threshold} (default threshold: {note})")
        extra["switch_len"] = float(threshold)
        if dynamic:
            return _runtime(site, threshold, f"{length}: chosen at run time, SPA when Nk >= {source}", **extra)
        if nk >= threshold:
            return Decision("spa", f"{length} >= {source}", **extra)
        return Decision("dense", f"{length} < {source}", **extra)

    if _dense_mask(site):
        return Decision(
            "dense",
            f"a dense attn_mask ({site.mask_kind}): the SPA kernels take causal/window/padding structure "
            "only, so the slow reference would run",
            **extra,
        )
    pred_txt = (f"{profile.name}: SPA {fmt_seconds(extra['predicted_spa_s'])} vs dense "
                f"{fmt_seconds(extra['predicted_dense_s'])}, N*={fmt_length(extra['n_star'])}")
    switch = extra["switch_len"]
    if dynamic:
        if math.isinf(switch):
            return Decision("dense", f"{length}: SPA predicted slower at every length ({pred_txt})", **extra)
        if switch <= cost_model.N_MIN:
            return Decision("spa", f"{length}: SPA predicted faster at every length ({pred_txt})", **extra)
        return _runtime(site, int(switch),
                        f"{length}: chosen at run time, SPA when Nk >= {int(switch)} ({pred_txt})", **extra)
    ratio = extra["predicted_dense_s"] / extra["predicted_spa_s"]
    if ratio >= 1.0 + cfg.margin:
        return Decision("spa", f"{length}: predicted {ratio:.2f}x faster on {pred_txt}", **extra)
    if ratio >= 1.0:
        why = f"predicted only {ratio:.2f}x faster (margin {cfg.margin:g})"
    else:
        why = f"predicted {1 / ratio:.2f}x slower"
    return Decision("dense", f"{length}: SPA {why} on {pred_txt}", **extra)


def _predictions(site: AttentionSite, shape, cfg: SPAConfig, profile: HardwareProfile) -> dict:
    pred = cost_model.predict(shape, cfg, profile)
    scale = _length_scale(site)
    return {
        "predicted_dense_s": pred.dense_s,
        "predicted_spa_s": pred.spa_s,
        "n_star": cost_model.crossover(shape, cfg, profile, margin=0.0, scale=scale),
        "switch_len": cost_model.crossover(shape, cfg, profile, margin=cfg.margin, scale=scale),
        "profile": profile.name,
        "stages": dict(pred.stages),
    }
