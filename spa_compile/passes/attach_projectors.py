"""Attach learned projectors to the rewritten SPA sites of a graph (runs after the rewrite).

For every ``spa.attention`` node (or its run-time choice ``spa_or_dense``) carrying
``meta["spa_site"]``, the site's ``Pq``/``Pk`` become buffers of the GraphModule
(``_spa_pq_<i>``, ``_spa_pk_<i>``) and the op's ``pq``/``pk`` arguments become
``get_attr`` nodes reading them. AOTAutograd lifts the buffers as graph inputs and
passes the same tensor objects at every call, so a projector updated in place (the
trainer of :mod:`spa_compile.training_alongside`) is seen without recompiling.

The source is ``cfg.projectors``: a live trainer registered under that path, else the
file there (read once per backend call; cached while it does not change). Mismatches
are reported by :func:`spa_compile.projector_file.match_sites`.
"""

from __future__ import annotations

import logging
from typing import Any, Iterable

import torch
import torch.fx as fx

from .. import projector_file as pfile
from ..config import SPAConfig
from .find_attention import example_value

log = logging.getLogger("spa_compile")

SITE_META = "spa_site"
PQ_ARG, PK_ARG = 5, 6


def _spa_targets() -> set:
    targets = {torch.ops.spa.attention.default}
    try:
        from ..runtime_choice import spa_or_dense

        targets.add(spa_or_dense)
    except ImportError:  # pragma: no cover - before the run-time choice lands
        pass
    return targets


def spa_nodes(gm: fx.GraphModule) -> list[fx.Node]:
    """The rewritten SPA op nodes of ``gm`` that name their site, in graph order."""
    targets = _spa_targets()
    return [
        n for n in gm.graph.nodes
        if n.op == "call_function" and n.target in targets and SITE_META in n.meta
    ]


def _shape_and_device(node: Any) -> tuple[tuple, torch.device | None]:
    """Shape of a graph value, following the shape-preserving nodes the rewrite adds without
    example values (scale factors, ``unsqueeze(x, 1)`` of 3-D sites)."""
    val = example_value(node)
    if val is not None:
        return tuple(val.shape), val.device
    if isinstance(node, fx.Node) and node.args:
        shape, device = _shape_and_device(node.args[0])
        if node.op == "call_method" and node.target == "unsqueeze" and shape:
            dim = node.args[1] % (len(shape) + 1)
            shape = shape[:dim] + (1,) + shape[dim:]
        return shape, device
    return (), None


def site_shape(node: fx.Node) -> tuple[pfile.SiteShape, torch.device | None]:
    """The attention shapes of an SPA op node: ``Hq``, ``Hkv``, ``D``, ``Dv`` (op layout [B, H, N, D])."""
    (qs, qdev), (ks, _), (vs, _) = (_shape_and_device(node.args[i]) for i in range(3))
    if len(qs) != 4 or len(ks) != 4 or len(vs) != 4:
        raise pfile.ProjectorFileError(
            f"cannot tell the attention shapes of site {node.meta.get(SITE_META)!r} (q {qs}, k {ks}, v {vs})"
        )
    dims = [qs[1], ks[1], qs[3], vs[3]]
    if not all(type(x) is int for x in dims):
        raise pfile.ProjectorFileError(
            f"site {node.meta.get(SITE_META)!r} has symbolic head counts or head dims {dims}: projectors need them static"
        )
    return pfile.SiteShape(*dims), qdev


def _register(gm: fx.GraphModule, name: str, tensor: torch.Tensor) -> str:
    base, i = name, 0
    while hasattr(gm, name):
        i += 1
        name = f"{base}_{i}"
    gm.register_buffer(name, tensor)
    # AOTAutograd lifts a Dynamo graph's buffers as inputs and wants a source for each
    sources = getattr(gm, "_param_name_to_source", None)
    if sources is not None:
        from torch._dynamo.source import ConstantSource

        gm._param_name_to_source = {**sources, name: ConstantSource(f"__spa_projector_{name}")}
    return name


def attach_projectors(
    gm: fx.GraphModule, cfg: SPAConfig, results: Iterable[tuple[Any, Any]] = ()
) -> dict[str, Any]:
    """Attach the projectors of ``cfg.projectors`` to the SPA sites of ``gm``; returns {site: what}.

    ``results``: the (site, decision) pairs of the passes, so that entries for sites of this
    graph that stayed dense are not reported as extra. Does nothing without ``cfg.projectors``.
    """
    path = cfg.projectors
    if path is None:
        return {}
    nodes = spa_nodes(gm)
    all_sites = [getattr(site, "name", None) for site, _ in results]
    live = pfile.live_source(path)
    from torch._subclasses.fake_tensor import unset_fake_temporarily

    with unset_fake_temporarily():  # explain() traces on fake tensors; projectors are real
        shapes, devices = {}, {}
        for node in nodes:
            shapes[node.meta[SITE_META]], devices[node.meta[SITE_META]] = site_shape(node)
        known = [s for s in all_sites if s is not None] + list(shapes)
        if live is not None:
            view = live.file_view()
            if view is not None:  # a trainer started from a file: same checks
                pfile.match_sites(view, shapes, known, cfg.block_size, cfg.selection, warn=False)
            tensors = {name: live.tensors_for(name, shapes[name], devices[name], cfg) for name in shapes}
        else:
            pf = pfile.load_cached(path)
            match = pfile.match_sites(pf, shapes, known, cfg.block_size, cfg.selection)
            tensors = {}
            for name, proj in match.attach.items():
                dev = devices[name] or torch.device("cpu")
                tensors[name] = (proj.pq.to(dev, torch.float32), proj.pk.to(dev, torch.float32))
    attached: dict[str, Any] = {}
    graph = gm.graph
    for i, node in enumerate(nodes):
        name = node.meta[SITE_META]
        if name not in tensors:
            attached[name] = "identity"
            continue
        pq, pk = tensors[name]
        pq_name = _register(gm, f"_spa_pq_{i}", pq)
        pk_name = _register(gm, f"_spa_pk_{i}", pk)
        with graph.inserting_before(node):
            pq_node = graph.get_attr(pq_name)
            pk_node = graph.get_attr(pk_name)
        args = list(node.args)
        args[PQ_ARG], args[PK_ARG] = pq_node, pk_node
        node.args = tuple(args)
        attached[name] = tuple(pq.shape)
        if live is not None:
            from ..training_alongside import insert_distill_tap

            insert_distill_tap(gm, node, live, name)
    if nodes:
        graph.lint()
        gm.recompile()
    log.info(
        "spa projectors from %s%s: %d site(s) attached, %d with the identity",
        path, " (live trainer)" if live is not None else "",
        sum(v != "identity" for v in attached.values()), sum(v == "identity" for v in attached.values()),
    )
    return attached


__all__ = ["attach_projectors", "spa_nodes", "site_shape"]
