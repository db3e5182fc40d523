"""The ``"spa"`` torch.compile backend.

``torch.compile(model, backend="spa", options={...})``: Dynamo hands over each
captured FX graph; the passes find its attention sites, decide per site, rewrite
the chosen ones into ``torch.ops.spa.attention`` and hand the whole graph on to
the inner backend (Inductor by default), which compiles everything around the op.
"""

from __future__ import annotations

import dataclasses
import logging
from contextlib import contextmanager
from typing import Any, Callable, Iterator, Mapping

import torch.fx as fx

from . import ops  # noqa: F401  (registers torch.ops.spa.*)
from .config import SPAConfig
from .passes import graph_analysis
from .passes.decision import decide
from .passes.find_attention import find_attention_sites
from .passes.attach_projectors import attach_projectors
from .passes.rewrite import rewrite_site

log = logging.getLogger("spa_compile")

# Reports that explain() is filling in; the backend appends every site it sees.
_recorders: list[Callable[[Any], None]] = []


@contextmanager
def recording(callback: Callable[[Any], None]) -> Iterator[None]:
    _recorders.append(callback)
    try:
        yield
    finally:
        _recorders.remove(callback)


def inner_compile(gm: fx.GraphModule, example_inputs, inner: str):
    if inner == "eager":
        return gm.forward
    if inner == "aot_eager":
        from torch._dynamo.backends.registry import lookup_backend

        return lookup_backend("aot_eager")(gm, example_inputs)
    from torch._inductor.compile_fx import compile_fx

    return compile_fx(gm, example_inputs)


def apply_spa_passes(gm: fx.GraphModule, cfg: SPAConfig) -> list[tuple[Any, Any]]:
    """Find, decide and rewrite every attention site of ``gm`` in place; returns (site, decision) pairs."""
    results = []
    for site in find_attention_sites(gm):
        decision = decide(site, cfg)
        if decision.decision == "spa" and getattr(site, "mask_note", None):
            decision = dataclasses.replace(decision, reason=f"{decision.reason}; {site.mask_note}")
        record = (site, decision)
        results.append(record)
        log.info(
            "spa site %s: %s (%s) [pattern=%s mask=%s q=%s k=%s]", site.name, decision.decision, decision.reason,
            getattr(site, "pattern", "sdpa"), getattr(site, "mask_kind", "?"),
            "x".join(map(str, getattr(site, "q_shape", ()))), "x".join(map(str, getattr(site, "k_shape", ()))),
        )
        for callback in _recorders:
            callback(record)
        if decision.decision == "spa":
            rewrite_site(gm, site, cfg)
    attach_projectors(gm, cfg, results)  # learned Pq/Pk of cfg.projectors onto the rewritten sites
    # the rewritten sites' scores, weights and masks are dead now; in-place ops are kept
    # exactly when they write to a tensor still needed (FX's own DCE drops them all)
    graph_analysis.eliminate_dead_code(gm)
    gm.graph.lint()
    gm.recompile()
    log.debug(
        "spa passes: %d attention site(s) in this graph, %d rewritten into spa.attention",
        len(results), sum(d.decision == "spa" for _, d in results),
    )
    return results


def spa_backend(gm: fx.GraphModule, example_inputs, options: Mapping[str, Any] | SPAConfig | None = None, **kwargs):
    """Dynamo backend entry point (registered as ``"spa"`` through ``torch_dynamo_backends``)."""
    if kwargs.get("mode") not in (None, "default"):
        raise ValueError(f"backend='spa' takes no mode= (got {kwargs['mode']!r}); pass options={{...}} instead")
    cfg = SPAConfig.from_options(options)
    apply_spa_passes(gm, cfg)
    return inner_compile(gm, example_inputs, cfg.inner_backend)
