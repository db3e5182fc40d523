"""Rewrite attention sites of an FX graph into the SPA custom op.

A site (SDPA call or decomposed chain, see :mod:`.find_attention`) becomes::

    out, lse, index, count = torch.ops.spa.attention(q, k, v, attn_mask, key_valid, None, None,
                                                     scale, causal, offset, window, config)

with the recovered mask structure passed as ``causal``/``offset``/``window``/``key_valid``
(built from B x Nk vectors, never N x N); the model's own mask, scores and weights
are left without users and go away with dead-code elimination.
"""

from __future__ import annotations

import math
import operator

import sympy
import torch
import torch.fx as fx

from .. import ops
from ..config import SPAConfig
from . import mask_recovery as mr
from .find_attention import AttentionSite, example_value

_REPLACED = "spa_replaced_by"


def _spa_target(node: fx.Node, args: tuple):
    """The op and its arguments; a site whose length is only known at run time (the decision left a
    threshold on the node) gets ``runtime_choice.spa_or_dense`` instead (cost-model issue)."""
    try:
        from ..runtime_choice import spa_call
    except ImportError:  # pragma: no cover - before the run-time choice lands
        return torch.ops.spa.attention.default, args
    return spa_call(node, args)


def _copy_meta(new: fx.Node, old: fx.Node) -> None:
    for key in ("nn_module_stack", "stack_trace", "source_fn_stack"):
        if key in old.meta:
            new.meta[key] = old.meta[key]


def resolve(value):
    """Follow replacements made by earlier rewrites (one site's output can feed another site)."""
    while isinstance(value, fx.Node) and _REPLACED in value.meta:
        value = value.meta[_REPLACED]
    return value


def _size(graph: fx.Graph, node: fx.Node, dim: int):
    d = example_value(node).shape[dim]
    if type(d) is int:
        return d
    return graph.call_function(torch.ops.aten.sym_size.int, (node, dim % example_value(node).dim()))


def _emit_int(graph, symbols: mr.SymbolNodes, expr, default: int):
    if expr is None:
        return default
    expr = sympy.sympify(expr)
    if expr.is_Integer:
        return int(expr)
    return symbols.emit(expr)


def rewrite_site(gm: fx.GraphModule, site: AttentionSite, cfg: SPAConfig) -> fx.Node:
    """Replace the site's value by ``torch.ops.spa.attention(...)[0]``; returns the op node."""
    graph = gm.graph
    node = site.node
    q, k, v = resolve(site.q), resolve(site.k), resolve(site.v)
    q0 = q
    q_val = example_value(q)
    d = q_val.shape[-1]
    if site.scale is not None:
        scale = float(site.scale)
    else:
        scale = 1.0 / math.sqrt(int(d))
    three_d = q_val.dim() == 3
    st = site.structure
    with graph.inserting_before(node):
        for kind, factor in site.scale_nodes:  # sizes-derived factors: fold them into q
            op = operator.mul if kind == "mul" else operator.truediv
            q = graph.call_function(op, (q, resolve(factor)))
        mask = resolve(site.attn_mask) if st is None else None
        key_valid, causal, offset, window = None, bool(site.is_causal) if st is None else st.causal, 0, -1
        if st is not None:
            symbols = mr.SymbolNodes(graph)
            offset = _emit_int(graph, symbols, st.offset, 0)
            window = _emit_int(graph, symbols, st.window, -1)
            if st.key_valid is not None or st.preconditions:
                batch, nk = _size(graph, q0, 0), _size(graph, k, -2)
                emitter = mr.KeyValidEmitter(graph, st, batch, nk, q_val.device, symbols)
                emitter.emit_preconditions()
                if st.key_valid is not None:
                    key_valid = emitter.emit()
        if three_d:  # (B*H, N, D) -> (B*H, 1, N, D)
            q, k, v = (graph.call_method("unsqueeze", (x, 1)) for x in (q, k, v))
            if mask is not None and example_value(mask) is not None and example_value(mask).dim() == 3:
                mask = graph.call_method("unsqueeze", (mask, 1))
        target, args = _spa_target(
            node, (q, k, v, mask, key_valid, None, None, scale, causal, offset, window, ops.config_to_str(cfg))
        )
        spa = graph.call_function(target, args)
        out = graph.call_function(operator.getitem, (spa, 0))
        if three_d:
            out = graph.call_method("squeeze", (out, 1))
        for kind, args in site.out_ops:
            out = graph.call_method(kind, (out, *args))
        node_val = example_value(node)
        if node_val is not None and node_val.dtype != q_val.dtype:
            out = graph.call_method("to", (out, node_val.dtype))
    for new in (spa, out):
        _copy_meta(new, node)
    spa.meta["spa_site"] = site.name
    if node_val is not None:
        out.meta["example_value"] = node_val
    node.replace_all_uses_with(out)
    node.meta[_REPLACED] = out  # the old value, its mask and its scores are dead code now
    return spa
