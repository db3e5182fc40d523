"""Find the attention sites of a Dynamo FX graph.

Two kinds of site:

* explicit ``F.scaled_dot_product_attention`` calls (:func:`find_sdpa_sites`);
* decomposed ``matmul -> softmax -> matmul`` chains, in any of the spellings
  :mod:`.match_decomposed` knows.

:func:`find_attention_sites` finds both, in graph order, and for each one

* folds K/V head expansion into grouped-query attention (:mod:`.gqa_folding`);
* recovers the structure of a mask the graph builds (:mod:`.mask_recovery`):
  causal with an offset, sliding window, key padding; a mask it cannot recover
  stays an exact dense mask and the site says why (``mask_note``);
* records why a site must stay dense (``reject_reason``): attention weights
  with other users, softmax over the wrong axis, a run-time scale...
"""

from __future__ import annotations

import logging
import operator
import re
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx

from . import gqa_folding
from . import mask_recovery as mr
from . import match_decomposed as md

SDPA_TARGETS = {torch.nn.functional.scaled_dot_product_attention, torch._C._nn.scaled_dot_product_attention}
_SDPA_PARAMS = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")
_SDPA_DEFAULTS = {"attn_mask": None, "dropout_p": 0.0, "is_causal": False, "scale": None, "enable_gqa": False}
log = logging.getLogger("spa_compile")


@dataclass
class AttentionSite:
    """One attention in a graph, with the arguments SDPA would get.

    ``q``, ``k``, ``v`` are in SPA's layout (``[B, H, N, D]`` or ``[B*H, N, D]``);
    for a decomposed site they may be new view nodes of the model's tensors. With
    ``enable_gqa`` K/V have fewer heads than Q (``kv_groups`` query heads each).

    The mask is either ``structure`` (recovered: causal/offset/window/key padding,
    no N x N tensor), or ``attn_mask`` (a dense mask node, bool or additive), or
    neither (``is_causal`` decides). ``reject_reason`` is set when the site must
    stay dense whatever the configuration says; ``mask_note`` when a mask could
    not be recovered and stays dense.
    """

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
    # --- found by the analyses ---
    structure: Any = None  # mask_recovery.MaskStructure
    reject_reason: str | None = None
    mask_note: str | None = None
    scale_nodes: list = field(default_factory=list)  # [("mul"|"div", graph value)] size-derived scale factors
    out_ops: list = field(default_factory=list)  # [(method, args)] from the op's output to ``node``'s value
    kv_groups: int = 1
    chain: list = field(default_factory=list)  # nodes of a decomposed chain (scores ... weights)
    mask_nodes: list = field(default_factory=list)  # the masks as the model applied them

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
        if self.structure is not None:
            return self.structure.kind
        if self.attn_mask is None:
            return "causal" if self.is_causal is True else "none"
        val = example_value(self.attn_mask)
        if val is None:
            return "mask(?)"
        return "bool" if val.dtype == torch.bool else "additive"  # a dense mask (``mask_note`` says why)

    @property
    def decomposed(self) -> bool:
        return self.pattern != "sdpa"


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
_ROOTS = re.compile(r"^L\[['\"]self['\"]\]|^L\[['\"]args['\"]\]\[0\]")


def module_path(node: fx.Node, root: str = "model") -> str:
    """Dotted path of the innermost module that made ``node``.

    Dynamo writes paths such as ``L['self'].layers[3].attn`` or
    ``L['self']._modules['layers']._modules['3']``; both become
    ``model.layers.3.attn`` (``root`` stands for the compiled module). A module
    whose ``forward`` is wrapped by a ``*args`` decorator (Hugging Face models)
    shows up as ``L['args'][0]``: that is the root too. A module that reached the graph as an argument keeps its argument name:
    ``L['encoder'].layers[0]`` becomes ``encoder.layers.0``.
    """
    stack = node.meta.get("nn_module_stack") or {}
    if not stack:
        return root
    path = list(stack.values())[-1][0]
    path = _ROOTS.sub(root, path)
    path = re.sub(r"^L\[['\"]([^'\"]+)['\"]\]", r"\1", path)
    path = _MODULES.sub(lambda m: "." + (m.group(1) or m.group(2)), path)
    path = _INDEX.sub(r".\1", path)
    return re.sub(r"\.+", ".", path).strip(".")


def find_sdpa_sites(gm: fx.GraphModule, root: str = "model") -> list[AttentionSite]:
    """Every ``F.scaled_dot_product_attention`` call in the graph, in graph order (no analyses)."""
    sites: list[AttentionSite] = []
    for node in gm.graph.nodes:
        if node.op == "call_function" and node.target in SDPA_TARGETS:
            sites.append(_sdpa_site(node, root))
    _unique_names(sites)
    return sites


def _sdpa_site(node: fx.Node, root: str) -> AttentionSite:
    args = normalize_sdpa_args(node)
    return AttentionSite(
        node=node, name=module_path(node, root), q=args["query"], k=args["key"], v=args["value"],
        attn_mask=args["attn_mask"], dropout_p=args["dropout_p"], is_causal=args["is_causal"],
        scale=args["scale"], enable_gqa=args["enable_gqa"],
    )


def _unique_names(sites: list[AttentionSite]) -> None:
    seen: dict[str, int] = {}
    for site in sites:
        n = seen.get(site.name, 0)
        seen[site.name] = n + 1
        if n:
            site.name = f"{site.name}#{n}"


# --------------------------------------------------------------------------------------
# All sites, with the analyses
# --------------------------------------------------------------------------------------


def find_attention_sites(gm: fx.GraphModule, root: str = "model") -> list[AttentionSite]:
    """Every attention site (SDPA calls and decomposed chains), analysed, in graph order."""
    graph = gm.graph
    md.reset_positions()
    ctx = _Context(graph)
    sites: list[AttentionSite] = []
    for node in list(graph.nodes):
        if node.op == "call_function" and node.target in SDPA_TARGETS:
            site = _sdpa_site(node, root)
            try:
                _analyse_sdpa(site, ctx)
            except Exception as e:  # noqa: BLE001 - an analysis bug must not break compilation
                log.warning("spa: analysis of %s failed (%s); the site keeps its SDPA arguments", site.name, e)
                site = _sdpa_site(node, root)
                site.notes.append(f"analysis failed: {e}")
            sites.append(site)
        elif node.op in ("call_function", "call_method") and mr.op_name(node) in md.SOFTMAX_NAMES:
            try:
                match = md.match_softmax(node)
                sites.append(_decomposed_site(match, ctx, root))
            except md.NotAttention:
                continue
            except Exception as e:  # noqa: BLE001 - an analysis bug must not break compilation
                log.warning("spa: analysis of the softmax %s failed (%s); left as it is", node.name, e)
                sites.append(AttentionSite(node=node, name=module_path(node, root), q=None, k=None, v=None,
                                           pattern="decomposed", reject_reason=f"analysis failed: {e}"))
    _unique_names(sites)
    return sites


class _Context:
    def __init__(self, graph: fx.Graph):
        self.graph = graph
        self.evaluator = mr.MaskEvaluator(graph)
        self.symbols = mr.SymbolNodes(graph)


def _fake_mode(*vals):
    """The fake mode of the example values (the graph's own; not necessarily the ambient one)."""
    for v in vals:
        mode = getattr(v, "fake_mode", None)
        if mode is not None:
            return mode
    from torch._guards import detect_fake_mode

    return detect_fake_mode()


def emit(graph: fx.Graph, anchor: fx.Node, op: str, target, args=(), kwargs=None) -> fx.Node:
    """Insert a node before ``anchor``, with its example value computed on fake tensors."""
    kwargs = kwargs or {}
    with graph.inserting_before(anchor):
        node = graph.create_node(op, target, tuple(args), dict(kwargs))
    if "nn_module_stack" in anchor.meta:
        node.meta["nn_module_stack"] = anchor.meta["nn_module_stack"]
    set_example_value(node)
    return node


def set_example_value(node: fx.Node) -> None:
    """Record ``node``'s value on the fake tensors of its inputs (nothing when that fails)."""
    from torch._subclasses.fake_tensor import unset_fake_temporarily

    def ev(a):
        if isinstance(a, fx.Node):
            return a.meta.get("example_value", a.meta.get("val"))
        if isinstance(a, (list, tuple)):
            return type(a)(ev(x) for x in a)
        return a

    vals, kws = ev(tuple(node.args)), {k: ev(v) for k, v in node.kwargs.items()}
    if any(isinstance(a, fx.Node) and ev(a) is None for a in node.all_input_nodes):
        return
    try:
        mode = _fake_mode(*[v for v in vals if isinstance(v, torch.Tensor)])
        with unset_fake_temporarily():
            if mode is not None:
                with mode:
                    out = _call(node.op, node.target, vals, kws)
            else:
                out = _call(node.op, node.target, vals, kws)
        node.meta["example_value"] = out
    except Exception:  # noqa: BLE001 - the value is informative only
        pass


def _call(op, target, args, kwargs):
    if op == "call_method":
        return getattr(args[0], target)(*args[1:], **kwargs)
    return target(*args, **kwargs)


def materialize(graph: fx.Graph, anchor: fx.Node, opnd: md.Operand) -> fx.Node:
    node = opnd.node
    for kind, args in opnd.ops:
        node = emit(graph, anchor, "call_method", kind, (node, *args))
    return node


def _fix_broadcast(graph, anchor, q, k, v):
    """Make k and v carry q's batch (and, unless grouped, head) dims: returns (k, v, gqa)."""
    qv, kv, vv = (example_value(x) for x in (q, k, v))
    if qv is None or kv is None or vv is None or kv.dim() != qv.dim() or vv.dim() != qv.dim():
        return k, v, False
    gqa = False
    if qv.dim() == 4:
        hq, hk, hv = qv.shape[1], kv.shape[1], vv.shape[1]
        if type(hk) is int and type(hv) is int and hk != hv:
            # one side broadcasts its single head: give it the other's heads
            if hk == 1:
                k = emit(graph, anchor, "call_method", "expand", (k, -1, hv, -1, -1))
            elif hv == 1:
                v = emit(graph, anchor, "call_method", "expand", (v, -1, hk, -1, -1))
            kv, vv = example_value(k), example_value(v)
        if type(kv.shape[1]) is int and type(hq) is int and kv.shape[1] != hq:
            gqa = True
    for x_name in ("k", "v"):
        x = k if x_name == "k" else v
        xv = example_value(x)
        if type(xv.shape[0]) is int and xv.shape[0] == 1 and not (type(qv.shape[0]) is int and qv.shape[0] == 1):
            sizes = (qv.shape[0],) + (-1,) * (xv.dim() - 1)
            if not all(type(s) is int for s in sizes):
                continue
            x = emit(graph, anchor, "call_method", "expand", (x, *sizes))
            if x_name == "k":
                k = x
            else:
                v = x
    return k, v, gqa


def _fold_gqa(site: AttentionSite) -> None:
    q = example_value(site.q)
    if q is None or q.dim() != 4:
        return
    folded = gqa_folding.fold_kv(site.k, site.v)
    if folded is None:
        return
    k0, v0, g = folded
    site.k, site.v = k0, v0
    site.enable_gqa = True
    site.kv_groups = g * max(1, site.kv_groups)
    site.notes.append(f"K/V head expansion x{g} folded into grouped-query attention")


def _scores_shape(q, k) -> tuple | None:
    qv, kv = example_value(q), example_value(k)
    if qv is None or kv is None:
        return None
    return tuple(qv.shape[:-1]) + (kv.shape[-2],)


def _recover(site: AttentionSite, ctx: _Context, terms, scores_shape) -> bool:
    """Try to recover the mask structure; returns True on success (``site.structure`` set or no mask)."""
    try:
        st = mr.analyse(ctx.evaluator, terms, scores_shape)
    except mr.BiasMask as e:
        site.reject_reason = f"{e}; SPA keeps such a site dense"
        return False
    except mr.Unrecoverable as e:
        site.mask_note = f"mask kept dense: {e}"
        return False
    for expr in (st.offset, st.window):
        if expr is not None and not ctx.symbols.can_emit(expr):
            site.mask_note = f"mask kept dense: the offset {expr} has no graph value"
            return False
    for expr in [st.key_valid, *st.preconditions]:
        if expr is None:
            continue
        free = {s for s in expr.free_symbols if s not in mr._D_SET}
        if not all(ctx.symbols.can_emit(s) for s in free):
            site.mask_note = "mask kept dense: key padding depends on sizes without a graph value"
            return False
    if st.preconditions:
        site.notes.append("the padding mask's values are checked at run time (0 or 1)")
    if st.key_valid is not None or st.preconditions:
        for leaf in st.leaf_nodes():
            if _mutated_in_place(leaf):
                site.mask_note = f"mask kept dense: {leaf.name} is modified in place"
                return False
    site.structure = None if st.is_trivial else st
    return True


def _mutated_in_place(node: fx.Node) -> bool:
    from . import graph_analysis as ga

    classes = ga.alias_classes(node.graph)
    cls = classes.get(node)
    return any(ga.is_mutation(n) and classes.get(ga.mutated_arg(n)) == cls for n in node.graph.nodes)


def _analyse_sdpa(site: AttentionSite, ctx: _Context) -> None:
    _fold_gqa(site)
    if isinstance(site.scale, fx.Node):
        val = site.scale.meta.get("example_value")
        if isinstance(val, (torch.SymFloat, torch.SymInt)):  # a Python number traced as a graph value
            site.scale_nodes, site.scale = [("mul", site.scale)], 1.0
            site.notes.append("graph-valued scale folded into q")
    mask = site.attn_mask
    if not isinstance(mask, fx.Node) or example_value(mask) is None or site.is_causal is True:
        return
    shape = _scores_shape(site.q, site.k)
    if shape is None or len(shape) not in (3, 4):
        return
    kind = "bool" if example_value(mask).dtype == torch.bool else "additive"
    site.mask_nodes = [mask]
    if _recover(site, ctx, [mr.MaskTerm(kind, mask)], shape):
        site.attn_mask = None


def _decomposed_site(m: md.DecomposedMatch, ctx: _Context, root: str) -> AttentionSite:
    graph = ctx.graph
    anchor = m.pv if m.pv is not None else m.softmax
    raw = lambda o: o.node if o is not None else None  # noqa: E731
    site = AttentionSite(
        node=anchor, name=module_path(anchor, root), q=raw(m.q), k=raw(m.k), v=raw(m.v),
        dropout_p=m.dropout_p, scale=m.scale, pattern=m.pattern, chain=list(m.chain),
        mask_nodes=[t.node for t in m.terms],
    )
    site.notes.extend(m.notes)
    if m.reason is not None or m.pv is None:
        site.reject_reason = m.reason or "no product with v"
        return site
    q = materialize(graph, anchor, m.q)
    k = materialize(graph, anchor, m.k)
    v = materialize(graph, anchor, m.v)
    k, v, gqa = _fix_broadcast(graph, anchor, q, k, v)
    site.q, site.k, site.v = q, k, v
    site.enable_gqa = gqa
    site.scale_nodes = list(m.scale_nodes)
    site.out_ops = list(m.out_ops)
    if site.scale_nodes:
        site.notes.append("size-dependent scale folded into q")
    why = _shapes_mismatch(q, k, v, m.canonical_shape)
    if why is not None:
        site.reject_reason = f"the shapes do not line up: {why}"
        return site
    _fold_gqa(site)
    if m.terms:
        shape = m.canonical_shape
        if not _recover(site, ctx, m.terms, shape) and site.reject_reason is None:
            site.attn_mask = _dense_mask(graph, anchor, m.terms)
    return site


def _shapes_mismatch(q, k, v, scores_shape) -> str | None:
    """Why q, k, v (SPA layout) do not make attention of ``scores_shape``, or None."""
    qv, kv, vv = (example_value(x) for x in (q, k, v))
    if qv is None or kv is None or vv is None:
        return "q/k/v shapes unknown"
    if not (qv.dim() == kv.dim() == vv.dim()) or qv.dim() not in (3, 4):
        return f"q/k/v have {qv.dim()}/{kv.dim()}/{vv.dim()} dims"
    same = md._same
    if not same(qv.shape[:1], kv.shape[:1]) or not same(kv.shape[:1], vv.shape[:1]):
        return f"batch {qv.shape[0]}/{kv.shape[0]}/{vv.shape[0]}"
    if qv.dim() == 4:
        hq, hk, hv = qv.shape[1], kv.shape[1], vv.shape[1]
        if not same((hk,), (hv,)) or not (type(hq) is int and type(hk) is int and hq % hk == 0 or same((hq,), (hk,))):
            return f"heads {hq}/{hk}/{hv}"
    if not same(qv.shape[-1:], kv.shape[-1:]):
        return f"q and k head dims {qv.shape[-1]}/{kv.shape[-1]}"
    if not same(kv.shape[-2:-1], vv.shape[-2:-1]):
        return f"k and v lengths {kv.shape[-2]}/{vv.shape[-2]}"
    if scores_shape is not None and not same(tuple(scores_shape)[-2:], (qv.shape[-2], kv.shape[-2])):
        return f"scores {tuple(scores_shape)} for q {tuple(qv.shape)} and k {tuple(kv.shape)}"
    return None


def _dense_mask(graph: fx.Graph, anchor: fx.Node, terms) -> fx.Node:
    """One exact mask for all of a chain's terms: additive (scaled as applied) and/or boolean."""
    additive, visible = None, None
    for t in terms:
        if t.kind == "additive":
            x = t.node
            c = t.coef * t.factor
            if c != 1.0:
                x = emit(graph, anchor, "call_function", operator.mul, (x, c))
            additive = x if additive is None else emit(graph, anchor, "call_function", operator.add, (additive, x))
        else:
            x = t.node
            if t.kind == "fill":
                x = emit(graph, anchor, "call_function", torch.logical_not, (x,))
            visible = x if visible is None else emit(graph, anchor, "call_function", torch.logical_and, (visible, x))
    if additive is None:
        return visible
    if visible is None:
        return additive
    hidden = emit(graph, anchor, "call_function", torch.logical_not, (visible,))
    return emit(graph, anchor, "call_method", "masked_fill", (additive, hidden, float("-inf")))
