"""Rewrite attention sites of an FX graph into the SPA custom op."""

from __future__ import annotations

import math
import operator

import torch
import torch.fx as fx

from .. import ops
from ..config import SPAConfig
from .find_attention import AttentionSite, example_value


def _copy_meta(new: fx.Node, old: fx.Node) -> None:
    for key in ("nn_module_stack", "stack_trace", "source_fn_stack"):
        if key in old.meta:
            new.meta[key] = old.meta[key]


def rewrite_site(gm: fx.GraphModule, site: AttentionSite, cfg: SPAConfig) -> fx.Node:
    """Replace the site's output by ``torch.ops.spa.attention(...)[0]``; returns the op node."""
    graph = gm.graph
    node = site.node
    q_val = example_value(site.q)
    scale = site.scale if site.scale is not None else 1.0 / math.sqrt(q_val.shape[-1])
    three_d = q_val.dim() == 3
    with graph.inserting_before(node):
        q, k, v = site.q, site.k, site.v
        if three_d:  # (B*H, N, D) -> (B*H, 1, N, D)
            q, k, v = (graph.call_method("unsqueeze", (x, 1)) for x in (q, k, v))
        spa = graph.call_function(
            torch.ops.spa.attention.default,
            (q, k, v, site.attn_mask, None, None, None, float(scale), bool(site.is_causal), 0, -1,
             ops.config_to_str(cfg)),
        )
        out = graph.call_function(operator.getitem, (spa, 0))
        if three_d:
            out = graph.call_method("squeeze", (out, 1))
    for new in (spa, out):
        _copy_meta(new, node)
    spa.meta["spa_site"] = site.name
    if "example_value" in node.meta:
        out.meta["example_value"] = node.meta["example_value"]
    node.replace_all_uses_with(out)
    graph.erase_node(node)
    return spa

