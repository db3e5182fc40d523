"""Find the attention sites of a Dynamo FX graph.

This pass finds explicit ``F.scaled_dot_product_attention`` calls; decomposed
``matmul -> softmax -> matmul`` chains are matched by their own pass.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx

SDPA_TARGETS = {torch.nn.functional.scaled_dot_product_attention, torch._C._nn.scaled_dot_product_attention}
_SDPA_PARAMS = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")
_SDPA_DEFAULTS = {"attn_mask": None, "dropout_p": 0.0, "is_causal": False, "scale": None, "enable_gqa": False}


@dataclass
class AttentionSite:
    """One attention in a graph, with the arguments SDPA would get."""

    node: fx.Node
    name: str
    q: fx.Node
    k: fx.Node
    v: fx.Node
    attn_mask: Any = None
    dropout_p: Any = 0.0
    is_causal: Any = False
    scale: Any = None
    enable_gqa: Any = False
    pattern: str = "sdpa"
    notes: list[str] = field(default_factory=list)

    @property
    def q_shape(self) -> tuple:
        return _shape(self.q)

    @property
    def k_shape(self) -> tuple:
        return _shape(self.k)

    @property
    def v_shape(self) -> tuple:
        return _shape(self.v)

    @property
    def mask_kind(self) -> str:
        if self.attn_mask is None:
            return "causal" if self.is_causal is True else "none"
        val = example_value(self.attn_mask)
        if val is None:
            return "mask(?)"
        return "bool" if val.dtype == torch.bool else "additive"


def example_value(node: Any) -> torch.Tensor | None:
    """The fake tensor Dynamo recorded for a node, if any."""
    if not isinstance(node, fx.Node):
        return None
    val = node.meta.get("example_value", node.meta.get("val"))
    return val if isinstance(val, torch.Tensor) else None


def _shape(node: fx.Node) -> tuple:
    val = example_value(node)
    return tuple(val.shape) if val is not None else ()


def normalize_sdpa_args(node: fx.Node) -> dict[str, Any]:
    """SDPA's arguments by name, whether the call passed them by position or keyword."""
    args = dict(zip(_SDPA_PARAMS, node.args))
    for key, value in node.kwargs.items():
        if key not in _SDPA_PARAMS:
            raise ValueError(f"unexpected SDPA keyword {key!r} at {node.format_node()}")
        args[key] = value
    for key, value in _SDPA_DEFAULTS.items():
        args.setdefault(key, value)
    return args


_INDEX = re.compile(r"\[(\d+)\]")
_MODULES = re.compile(r"\._modules\[['\"]([^'\"]+)['\"]\]|\[['\"]([^'\"]+)['\"]\]")


def module_path(node: fx.Node, root: str = "model") -> str:
    """Dotted path of the innermost module that made ``node``.

    Dynamo writes paths such as ``L['self'].layers[3].attn`` or
    ``L['self']._modules['layers']._modules['3']``; both become
    ``model.layers.3.attn`` (``root`` stands for the compiled module). A module
    that reached the graph as an argument keeps its argument name:
    ``L['encoder'].layers[0]`` becomes ``encoder.layers.0``.
    """
    stack = node.meta.get("nn_module_stack") or {}
    if not stack:
        return root
    path = list(stack.values())[-1][0]
    path = re.sub(r"^L\[['\"]self['\"]\]", root, path)
    path = re.sub(r"^L\[['\"]([^'\"]+)['\"]\]", r"\1", path)
    path = _MODULES.sub(lambda m: "." + (m.group(1) or m.group(2)), path)
    path = _INDEX.sub(r".\1", path)
    return re.sub(r"\.+", ".", path).strip(".")


def find_sdpa_sites(gm: fx.GraphModule, root: str = "model") -> list[AttentionSite]:
    """Every ``F.scaled_dot_product_attention`` call in the graph, in graph order."""
    sites: list[AttentionSite] = []
    seen: dict[str, int] = {}
    for node in gm.graph.nodes:
        if node.op != "call_function" or node.target not in SDPA_TARGETS:
            continue
        args = normalize_sdpa_args(node)
        name = module_path(node, root)
        n = seen.get(name, 0)
        seen[name] = n + 1
        if n:
            name = f"{name}#{n}"
        sites.append(
            AttentionSite(
                node=node, name=name, q=args["query"], k=args["key"], v=args["value"],
                attn_mask=args["attn_mask"], dropout_p=args["dropout_p"], is_causal=args["is_causal"],
                scale=args["scale"], enable_gqa=args["enable_gqa"],
            )
        )
    return sites

