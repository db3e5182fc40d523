"""Decide, per attention site, whether it runs SPA or stays dense, and why.

Hard reasons (SPA cannot run the site) come first; then per-site overrides,
the mode, and in mode "auto" the length threshold. The cost-model issue
replaces the threshold with per-card predictions.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass

import torch
import torch.fx as fx

from ..config import SPAConfig
from .find_attention import AttentionSite, example_value


@dataclass
class Decision:
    decision: str  # "spa" | "dense"
    reason: str


def unsupported_reason(site: AttentionSite) -> str | None:
    """Why SPA cannot run this site at all, or None."""
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
    nk = example_value(site.k).shape[-2]
    threshold = cfg.effective_min_seq_len
    if isinstance(nk, torch.SymInt):
        hint = nk.node.hint
        note = f"dynamic length (decided at the traced length {hint})"
        nk = hint
    else:
        note = f"Nk={nk}"
    if nk >= threshold:
        return Decision("spa", f"{note} >= min_seq_len={threshold}")
    return Decision("dense", f"{note} < min_seq_len={threshold}")
