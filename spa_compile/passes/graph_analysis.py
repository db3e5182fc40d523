"""Graph analyses on FX graphs, through networkx.

The attention passes need four questions answered about a Dynamo graph:

* reachability: does a mask depend on the scores it is applied to?
* escapes: does any node of an attention chain have a user outside the chain
  (attention weights that are returned or read elsewhere)?
* producer subgraphs: which nodes build a mask?
* dead code: which nodes are no longer needed once attention sites are rewritten?

FX's own ``Graph.eliminate_dead_code`` considers every ``call_method`` pure, so
it would delete ``scores.masked_fill_(...)`` whose result is unused, and change
what the program computes. :func:`eliminate_dead_code` here keeps an in-place
mutation exactly when the tensor it mutates (or any view of it) is still needed.
"""

from __future__ import annotations

import operator
from typing import Iterable

import networkx as nx
import torch
import torch.fx as fx

# --------------------------------------------------------------------------------------
# The graph as a networkx DiGraph
# --------------------------------------------------------------------------------------


def to_digraph(graph: fx.Graph) -> nx.DiGraph:
    """Data-flow graph: an edge ``a -> b`` for every node ``b`` that reads ``a``."""
    g = nx.DiGraph()
    for node in graph.nodes:
        g.add_node(node)
        for inp in node.all_input_nodes:
            g.add_edge(inp, node)
    return g


def producers(g: nx.DiGraph, roots: Iterable[fx.Node]) -> set[fx.Node]:
    """The producer subgraph of ``roots``: the roots and everything they are computed from."""
    out: set[fx.Node] = set()
    for root in roots:
        if isinstance(root, fx.Node) and root in g:
            out.add(root)
            out |= nx.ancestors(g, root)
    return out


def depends_on(g: nx.DiGraph, node, targets: Iterable[fx.Node]) -> bool:
    """True when ``node`` is computed (directly or not) from any of ``targets``."""
    if not isinstance(node, fx.Node) or node not in g:
        return False
    targets = {t for t in targets if isinstance(t, fx.Node)}
    if node in targets:
        return True
    return bool(nx.ancestors(g, node) & targets)


def escapes(g: nx.DiGraph, inner: Iterable[fx.Node], allowed: Iterable[fx.Node] = ()) -> list[tuple[fx.Node, fx.Node]]:
    """Edges ``(n, user)`` from a node of ``inner`` to a node outside ``inner | allowed``."""
    inner = set(inner)
    ok = inner | set(allowed)
    return [(n, u) for n in inner if n in g for u in g.successors(n) if u not in ok]


# --------------------------------------------------------------------------------------
# Mutation and aliasing
# --------------------------------------------------------------------------------------

_INPLACE_OPERATORS = {
    operator.iadd, operator.isub, operator.imul, operator.itruediv, operator.ifloordiv, operator.imod,
    operator.ipow, operator.iand, operator.ior, operator.ixor, operator.ilshift, operator.irshift,
    operator.imatmul,
}

# Methods and functions whose result may share storage with their first argument.
_VIEW_METHODS = {
    "view", "view_as", "reshape", "reshape_as", "transpose", "permute", "unsqueeze", "squeeze", "expand",
    "expand_as", "broadcast_to", "flatten", "unflatten", "narrow", "select", "t", "T", "mT", "H", "mH",
    "as_strided", "diagonal", "contiguous", "to", "type", "type_as", "float", "double", "half", "bfloat16",
    "int", "long", "bool", "detach", "split", "chunk", "unbind", "tensor_split", "movedim", "moveaxis",
    "swapaxes", "swapdims", "real", "imag", "view_as_real", "view_as_complex", "unfold", "__getitem__",
    "requires_grad_", "cpu", "cuda", "squeeze_", "unsqueeze_", "t_", "transpose_",
}
_VIEW_FUNCTIONS = {
    operator.getitem, torch.reshape, torch.transpose, torch.permute, torch.unsqueeze, torch.squeeze,
    torch.flatten, torch.narrow, torch.select, torch.t, torch.broadcast_to, torch.split, torch.chunk,
    torch.unbind, torch.tensor_split, torch.movedim, torch.swapaxes, torch.swapdims, torch.diagonal,
    torch.as_strided, torch.detach, torch.real, torch.imag, torch.view_as_real, torch.view_as_complex,
    torch.Tensor.view, torch.Tensor.reshape, torch.Tensor.transpose, torch.Tensor.permute,
    torch.Tensor.contiguous, torch.Tensor.to, torch.Tensor.expand, torch.Tensor.unsqueeze,
}


def mutated_arg(node: fx.Node) -> fx.Node | None:
    """The tensor an in-place node writes to, or None when the node mutates nothing we can name."""
    first = node.args[0] if node.args and isinstance(node.args[0], fx.Node) else None
    if node.op == "call_method":
        name = node.target
        if name.endswith("_") and not name.startswith("_") and name not in ("requires_grad_",):
            return first
        return None
    if node.op != "call_function":
        return None
    target = node.target
    if target in _INPLACE_OPERATORS or target is operator.setitem:
        return first
    if isinstance(target, torch._ops.OpOverload) and target._schema.is_mutable:
        for arg, a in zip(node.args, target._schema.arguments):
            if a.alias_info is not None and a.alias_info.is_write and isinstance(arg, fx.Node):
                return arg
        return first
    name = getattr(target, "__name__", "")
    if name.endswith("_") and not name.startswith("_") and getattr(target, "__module__", "") in ("torch", None):
        return first
    if isinstance(node.kwargs.get("out"), fx.Node):
        return node.kwargs["out"]
    if node.kwargs.get("inplace") is True:
        return first
    if target in (torch.nn.functional.dropout, torch.nn.functional.relu) and len(node.args) >= 4 and node.args[3] is True:
        return first
    return None


def is_mutation(node: fx.Node) -> bool:
    return mutated_arg(node) is not None


def _may_alias_first_arg(node: fx.Node) -> bool:
    if node.op == "call_method":
        return node.target in _VIEW_METHODS or is_mutation(node)
    if node.op == "call_function":
        return node.target in _VIEW_FUNCTIONS or is_mutation(node)
    return False


def is_view(node) -> bool:
    """A node whose value may be a view of its first argument (and is not itself a write)."""
    return isinstance(node, fx.Node) and _may_alias_first_arg(node) and not is_mutation(node)


def alias_classes(graph: fx.Graph) -> dict[fx.Node, int]:
    """Node -> alias class id: nodes in one class may share storage (conservative over views)."""
    g = nx.Graph()
    for node in graph.nodes:
        g.add_node(node)
        if _may_alias_first_arg(node) and node.args and isinstance(node.args[0], fx.Node):
            g.add_edge(node, node.args[0])
    classes = {}
    for i, comp in enumerate(nx.connected_components(g)):
        for n in comp:
            classes[n] = i
    return classes


# --------------------------------------------------------------------------------------
# Dead code
# --------------------------------------------------------------------------------------


def _is_seed(node: fx.Node) -> bool:
    """Nodes that must stay whatever uses them: outputs, inputs and side effects other than mutations."""
    if node.op in ("output", "placeholder"):
        return True
    if is_mutation(node):
        return False
    if node.op == "call_module":
        return node.is_impure()
    if node.op == "call_function":
        return node.is_impure()
    return False


def live_nodes(graph: fx.Graph, g: nx.DiGraph | None = None) -> set[fx.Node]:
    """Nodes the graph's outputs or side effects need, mutations of needed tensors included."""
    g = g if g is not None else to_digraph(graph)
    classes = alias_classes(graph)
    mutations = [n for n in graph.nodes if is_mutation(n)]
    external = {n for n in graph.nodes if n.op in ("placeholder", "get_attr")}
    seeds = {n for n in graph.nodes if _is_seed(n)}
    live: set[fx.Node] = set()
    while True:
        frontier = seeds - live
        for s in frontier:
            live.add(s)
            live |= nx.ancestors(g, s)
        live_classes = {classes[n] for n in live | external if n in classes}
        new = {m for m in mutations if m not in live and classes.get(mutated_arg(m)) in live_classes}
        if not new:
            return live
        seeds |= new


def dead_nodes(graph: fx.Graph, g: nx.DiGraph | None = None) -> list[fx.Node]:
    """Nodes no output or side effect needs, in reverse graph order (safe to erase one by one)."""
    live = live_nodes(graph, g)
    return [n for n in reversed(list(graph.nodes)) if n not in live]


def eliminate_dead_code(gm: fx.GraphModule) -> int:
    """Erase :func:`dead_nodes`; returns how many nodes went away."""
    removed = 0
    for node in dead_nodes(gm.graph):
        if not node.users:
            gm.graph.erase_node(node)
            removed += 1
    return removed


def has_node_like(graph: fx.Graph, predicate) -> list[fx.Node]:
    """Nodes whose recorded value satisfies ``predicate`` (tests use it on rewritten graphs)."""
    out = []
    for node in graph.nodes:
        val = node.meta.get("example_value", node.meta.get("val"))
        if isinstance(val, torch.Tensor) and predicate(val):
            out.append(node)
    return out
