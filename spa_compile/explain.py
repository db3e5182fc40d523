"""``spa_compile.explain``: which attention sites SPA would take, and why, without running kernels.

The model and inputs are copied into fake tensors (shapes and dtypes only) and
traced by Dynamo with the SPA passes; nothing is computed.
"""

from __future__ import annotations

import copy
import functools
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Mapping

import torch
from torch._subclasses.fake_tensor import FakeCopyMode, FakeTensorMode
from torch.utils._pytree import tree_map

from .backend import recording, spa_backend
from .config import SPAConfig
from .passes.decision import fmt_length, fmt_seconds


@dataclass
class SiteReport:
    name: str
    decision: str  # "spa" | "dense"
    reason: str
    mask: str
    q_shape: tuple
    k_shape: tuple
    v_shape: tuple
    pattern: str = "sdpa"
    predicted_dense_s: float | None = None  # cost model, on config.device_profile
    predicted_spa_s: float | None = None
    n_star: float | None = None  # predicted crossover length (inf: SPA never faster)


@dataclass
class Report:
    """What the SPA backend decided for every attention site it saw."""

    config: SPAConfig
    sites: list[SiteReport] = field(default_factory=list)

    def _add(self, record) -> None:
        site, decision = record
        self.sites.append(
            SiteReport(
                name=site.name, decision=decision.decision, reason=decision.reason, mask=site.mask_kind,
                q_shape=_dims(site.q_shape), k_shape=_dims(site.k_shape), v_shape=_dims(site.v_shape),
                pattern=site.pattern, predicted_dense_s=getattr(decision, "predicted_dense_s", None),
                predicted_spa_s=getattr(decision, "predicted_spa_s", None), n_star=getattr(decision, "n_star", None),
            )
        )

    @property
    def spa_sites(self) -> list[SiteReport]:
        return [s for s in self.sites if s.decision == "spa"]

    def to_dict(self) -> dict[str, Any]:
        return {"config": asdict(self.config), "sites": [asdict(s) for s in self.sites]}

    def __len__(self) -> int:
        return len(self.sites)

    def __str__(self) -> str:
        head = ("site", "decision", "mask", "q", "k", "t_dense", "t_spa", "N*", "reason")
        rows = [
            (s.name, s.decision, s.mask, _fmt_shape(s.q_shape), _fmt_shape(s.k_shape),
             fmt_seconds(s.predicted_dense_s), fmt_seconds(s.predicted_spa_s), fmt_length(s.n_star), s.reason)
            for s in self.sites
        ]
        if not rows:
            return "spa_compile.explain: no attention sites found"
        widths = [max(len(str(r[i])) for r in rows + [head]) for i in range(len(head))]
        line = lambda r: "  ".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip()  # noqa: E731
        n_spa = len(self.spa_sites)
        title = f"spa_compile.explain: {len(rows)} attention site(s), {n_spa} SPA, {len(rows) - n_spa} dense"
        return "\n".join([title, line(head), line(tuple("-" * w for w in widths)), *map(line, rows)])


def _dims(shape) -> tuple:
    return tuple(int(d) if not isinstance(d, torch.SymInt) else str(d) for d in shape)


def _fmt_shape(shape: tuple) -> str:
    return "x".join(str(d) for d in shape)


def _to_fake(mode: FakeTensorMode, value):
    return tree_map(lambda x: mode.from_tensor(x) if isinstance(x, torch.Tensor) else x, value)


def explain(
    model_or_fn: Callable, *args, config: SPAConfig | Mapping[str, Any] | None = None, **kwargs
) -> Report:
    """Trace ``model_or_fn(*args, **kwargs)`` on fake tensors and report every attention site.

    ``config`` is an :class:`SPAConfig` or a dict of its fields (as ``options=``).
    """
    cfg = config if isinstance(config, SPAConfig) else SPAConfig.from_options(config)
    cfg = cfg.replace(inner_backend="eager")  # nothing is compiled or run for real
    report = Report(config=cfg)
    mode = FakeTensorMode(allow_non_fake_inputs=True)
    target = model_or_fn
    if isinstance(model_or_fn, torch.nn.Module):
        with FakeCopyMode(mode):
            target = copy.deepcopy(model_or_fn)
    fake_args, fake_kwargs = _to_fake(mode, args), _to_fake(mode, kwargs)
    backend = functools.partial(spa_backend, options=cfg)
    compiled = torch.compile(target, backend=backend, dynamic=False)
    with _isolated_dynamo(), recording(report._add), mode:
        compiled(*fake_args, **fake_kwargs)
    return report


def _isolated_dynamo():
    """Dynamo settings for a one-off trace: the shapes as given, and no recompile limit
    (every explain() call is a new backend, which would otherwise count as a recompile)."""
    import torch._dynamo.config as dc

    patch = {"automatic_dynamic_shapes": False}
    for name in ("recompile_limit", "cache_size_limit"):
        if hasattr(dc, name):
            patch[name] = 1 << 20
    return dc.patch(**patch)
