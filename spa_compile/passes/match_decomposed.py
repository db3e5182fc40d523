"""Match decomposed attention in Dynamo FX graphs: ``softmax(q k^T * s + mask) v``.

The matcher starts from every softmax and walks

* backwards through casts, scale factors, masks (``+``, ``+=``, ``masked_fill``,
  ``where``, in-place variants) and batch-regrouping views to the scores product
  (``matmul``, ``@``, ``bmm``, ``baddbmm`` or ``einsum``), then through scalar
  factors and transposes of its operands to ``q`` and ``k``;
* forwards through casts and dropout to the product with ``v``.

It records what it finds as a :class:`DecomposedMatch`; anything that stops the
rewrite from being the same function is a ``reason`` (the site stays dense and
``explain`` shows it). This covers the pattern families of
``torch/_inductor/fx_passes/fuse_attention.py`` (its ``_sfdp_pattern_1..24``) and
the ``eager_attention_forward`` of Hugging Face models.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any

import sympy
import torch
import torch.fx as fx

from . import graph_analysis as ga
from .mask_recovery import MaskTerm, blocked_value, example_value, op_name

SOFTMAX_NAMES = {"softmax", "_softmax"}
PRODUCT_NAMES = {"matmul", "bmm", "baddbmm", "einsum"}
CAST_NAMES = {"to", "float", "double", "half", "bfloat16", "type", "type_as", "contiguous", "clone"}
VIEW_NAMES = {"view", "reshape", "unflatten", "flatten", "view_as", "reshape_as"}
DROPOUT_NAMES = {"dropout"}
_MAX_WALK = 24


class NotAttention(Exception):
    """The softmax is not part of an attention (nothing to report)."""


# --------------------------------------------------------------------------------------
# Scalars: constants, sizes, run-time tensors
# --------------------------------------------------------------------------------------

_CONST_OPS = {
    "tensor", "scalar_tensor", "as_tensor", "full", "ones", "zeros", "sqrt", "rsqrt", "reciprocal", "pow", "mul",
    "truediv", "add", "sub", "neg", "to", "float", "double", "half", "bfloat16", "type", "type_as", "log", "exp",
    "sym_sqrt", "_sym_sqrt", "sym_float", "sym_int", "clone", "detach", "contiguous", "floordiv", "abs", "item",
    "squeeze", "view", "reshape", "float_power", "__pow__", "__rpow__", "rpow",
}


@dataclass
class Scalar:
    status: str  # "const" | "sym" | "runtime"
    value: Any = None  # float for "const"
    node: Any = None  # the graph value for "sym"


def scalar_value(x, depth: int = 0) -> Scalar | None:
    """What a scale factor is: a constant (folded to a float), a value computed from sizes only
    (kept as a graph value), or a tensor that varies at run time. None: not a scalar."""
    if isinstance(x, bool):
        return None
    if isinstance(x, (int, float)):
        return Scalar("const", float(x))
    if isinstance(x, (torch.SymInt, torch.SymFloat)):
        return Scalar("sym", node=x)
    if not isinstance(x, fx.Node):
        return None
    val = example_value(x)
    if isinstance(val, (int, float)) and not isinstance(val, bool):
        return Scalar("const", float(val))
    if isinstance(val, (torch.SymInt, torch.SymFloat)):
        return Scalar("sym", node=x)
    if not isinstance(val, torch.Tensor) or val.dim() > 0 and _numel(val) != 1:
        return None
    if x.op in ("placeholder", "get_attr"):
        return Scalar("runtime", node=x)
    if depth > 12 or x.op not in ("call_function", "call_method") or op_name(x) not in _CONST_OPS:
        return Scalar("runtime", node=x)
    status = "const"
    for a in list(x.args) + list(x.kwargs.values()):
        for leaf in _flat(a):
            if isinstance(leaf, fx.Node):
                s = scalar_value(leaf, depth + 1)
                if s is None:
                    sub = example_value(leaf)
                    if isinstance(sub, torch.Tensor):
                        return Scalar("runtime", node=x)
                    continue
                if s.status == "runtime":
                    return Scalar("runtime", node=x)
                if s.status == "sym":
                    status = "sym"
    if status == "sym":
        return Scalar("sym", node=x)
    value = _run_const(x)
    if value is None:
        return Scalar("runtime", node=x)
    return Scalar("const", value)


def _numel(val) -> int | None:
    n = 1
    for d in val.shape:
        if type(d) is not int:
            return None
        n *= d
    return n


def _flat(a):
    if isinstance(a, (list, tuple)):
        for x in a:
            yield from _flat(x)
    elif isinstance(a, dict):
        for x in a.values():
            yield from _flat(x)
    else:
        yield a


def _run_const(node: fx.Node) -> float | None:
    """Evaluate a constant scalar subgraph for real (on CPU, outside any fake mode)."""
    from torch._subclasses.fake_tensor import unset_fake_temporarily

    def ev(a):
        if isinstance(a, fx.Node):
            val = example_value(a)
            if isinstance(val, (int, float)):
                return val
            return _run(a)
        if isinstance(a, (list, tuple)):
            return type(a)(ev(x) for x in a)
        if isinstance(a, torch.device):
            return torch.device("cpu")
        return a

    def _run(n):
        args = [ev(a) for a in n.args]
        kwargs = {k: ev(v) for k, v in n.kwargs.items()}
        if "device" in kwargs:
            kwargs["device"] = "cpu"
        if n.op == "call_method":
            obj = args[0]
            if not isinstance(obj, torch.Tensor):
                obj = torch.tensor(obj)
            return getattr(obj, n.target)(*args[1:], **kwargs)
        return n.target(*args, **kwargs)

    try:
        with unset_fake_temporarily(), torch.no_grad():
            out = _run(node)
        if isinstance(out, torch.Tensor):
            if out.numel() != 1:
                return None
            out = out.item()
        out = float(out)
        return out if math.isfinite(out) else None
    except Exception:  # noqa: BLE001 - anything that does not evaluate is not a constant
        return None


# --------------------------------------------------------------------------------------
# Small helpers on nodes
# --------------------------------------------------------------------------------------


def _arg(node: fx.Node, i: int, name: str, default=None):
    if len(node.args) > i:
        return node.args[i]
    return node.kwargs.get(name, default)


def _tensor(x) -> bool:
    return isinstance(x, fx.Node) and isinstance(example_value(x), torch.Tensor)


def _ndim(x) -> int:
    return example_value(x).dim()


def _is_scalar_operand(x) -> bool:
    """A Python number, a size-derived number, or a one-element tensor."""
    if not isinstance(x, fx.Node):
        return isinstance(x, (int, float, torch.SymInt, torch.SymFloat)) and not isinstance(x, bool)
    val = example_value(x)
    if isinstance(val, (int, float, torch.SymInt, torch.SymFloat)):
        return not isinstance(val, bool)
    return isinstance(val, torch.Tensor) and _numel(val) == 1


def scale_factor(node: fx.Node):
    """``(tensor_operand, "mul"|"div", factor)`` when ``node`` scales a tensor by a scalar, else None."""
    name = op_name(node)
    if name not in ("mul", "truediv") or len(node.args) + len(node.kwargs) < 2:
        return None
    if name == "truediv" and node.kwargs.get("rounding_mode") is not None:
        return None
    a, b = node.args[0], _arg(node, 1, "other")
    out = example_value(node)
    if not isinstance(out, torch.Tensor):
        return None

    def big(x):
        return _tensor(x) and _numel(example_value(x)) != 1 and _same(example_value(x).shape, out.shape)

    if big(a) and _is_scalar_operand(b):
        return a, ("mul" if name == "mul" else "div"), b
    if name == "mul" and big(b) and _is_scalar_operand(a):
        return b, "mul", a
    return None


def is_cast(node: fx.Node) -> bool:
    """A dtype cast (or a copy) that keeps shape and values: ``.float()``, ``.to(dtype)``, ``.type_as(q)``..."""
    name = op_name(node)
    if name not in CAST_NAMES or not node.args or not _tensor(node.args[0]):
        return False
    src, out = example_value(node.args[0]), example_value(node)
    if not isinstance(out, torch.Tensor) or tuple(out.shape) != tuple(src.shape) or out.device != src.device:
        return False
    return out.is_floating_point() and src.is_floating_point()


def softmax_dim(node: fx.Node):
    """The softmax's ``dim`` argument (None when implicit)."""
    return _arg(node, 1, "dim")


def softmax_input(node: fx.Node):
    return node.args[0] if node.args else node.kwargs.get("input")


def _is_transpose_last2(node: fx.Node) -> bool:
    name = op_name(node)
    if not node.args or not _tensor(node.args[0]):
        return False
    n = _ndim(node.args[0])
    if name in ("transpose", "swapaxes", "swapdims"):
        a, b = _arg(node, 1, "dim0"), _arg(node, 2, "dim1")
        return isinstance(a, int) and isinstance(b, int) and {a % n, b % n} == {n - 2, n - 1}
    if name == "permute":
        dims = node.args[1:] if len(node.args) > 2 else _arg(node, 1, "dims")
        dims = [d % n for d in (dims if isinstance(dims, (list, tuple)) else [dims])]
        return dims == list(range(n - 2)) + [n - 1, n - 2]
    if name == "t":
        return n == 2
    if node.op == "call_function" and node.target is getattr and node.args[1] in ("mT", "T") and n >= 2:
        return node.args[1] == "mT" or n == 2
    return False


def _is_dropout(node: fx.Node) -> bool:
    return op_name(node) in DROPOUT_NAMES


def dropout_p(node: fx.Node):
    """0.0 when the dropout is the identity (p == 0 or not training), else p (a node when not constant)."""
    if node.op == "call_function" and node.target in (torch.dropout, torch._C._VariableFunctions.dropout):
        p, train = _arg(node, 1, "p", 0.5), _arg(node, 2, "train", True)
    else:
        p, train = _arg(node, 1, "p", 0.5), _arg(node, 2, "training", True)
    if isinstance(p, fx.Node):
        return p
    if isinstance(train, fx.Node):
        return train if p else 0.0
    return 0.0 if (not train or p == 0) else float(p)


# --------------------------------------------------------------------------------------
# The match
# --------------------------------------------------------------------------------------


@dataclass
class Operand:
    """How to get a canonical operand from a graph value: ``node`` then ``ops`` (applied in order).

    ops are ``("method", name, args)`` entries (transpose, permute, unsqueeze, expand, reshape).
    """

    node: fx.Node
    ops: list = field(default_factory=list)


@dataclass
class DecomposedMatch:
    softmax: fx.Node
    pv: fx.Node | None = None  # the node whose value the site replaces
    scores: fx.Node | None = None  # the scores product
    pattern: str = "decomposed"
    q: Operand | None = None
    k: Operand | None = None
    v: Operand | None = None
    ndim: int = 4  # of the canonical layout
    canonical_shape: tuple | None = None  # scores layout of the masks (batch..., Nq, Nk)
    scale: float = 1.0
    scale_nodes: list = field(default_factory=list)  # [("mul"|"div", value)] size-derived factors
    terms: list = field(default_factory=list)  # MaskTerm
    dropout_p: Any = 0.0
    out_ops: list = field(default_factory=list)  # ops from the canonical op output to the pv node's value
    chain: list = field(default_factory=list)  # every node of the scores/weights chain
    reason: str | None = None
    notes: list = field(default_factory=list)


def _product_name(node) -> str | None:
    name = op_name(node)
    if name in PRODUCT_NAMES:
        return name
    if name == "__matmul__":
        return "matmul"
    return None


def _reaches_product(node, depth=0) -> bool:
    """Does ``node`` come from a scores product through steps the backward walk accepts?"""
    if not isinstance(node, fx.Node) or depth > _MAX_WALK:
        return False
    if _product_name(node):
        return True
    if is_cast(node) or _is_view_step(node):
        return _reaches_product(node.args[0], depth + 1)
    sf = scale_factor(node)
    if sf is not None:
        return _reaches_product(sf[0], depth + 1)
    name = op_name(node)
    if name in ("add", "sub"):
        return any(_reaches_product(a, depth + 1) for a in node.args[:2])
    if name == "masked_fill":
        return _reaches_product(node.args[0], depth + 1)
    if name == "where" and node.op == "call_function" and len(node.args) >= 3:
        return any(_reaches_product(a, depth + 1) for a in node.args[1:3])
    return False


def _is_view_step(node) -> bool:
    if op_name(node) not in VIEW_NAMES or not node.args or not _tensor(node.args[0]):
        return False
    src, out = example_value(node.args[0]), example_value(node)
    if not isinstance(out, torch.Tensor) or out.dim() < 2 or src.dim() < 2:
        return False
    return _same(src.shape[-2:], out.shape[-2:])


def _dim_expr(x):
    if type(x) is int:
        return sympy.Integer(x)
    if isinstance(x, torch.SymInt):
        return x.node.expr
    return None


def _same(a, b) -> bool:
    """Equal sizes, compared symbolically (no guards on symbolic sizes)."""
    if len(a) != len(b):
        return False
    for x, y in zip(a, b):
        ex, ey = _dim_expr(x), _dim_expr(y)
        if ex is None or ey is None:
            return False
        if ex != ey and sympy.expand(ex - ey) != 0:
            return False
    return True


def _mutators(node: fx.Node, before: fx.Node | None) -> list[fx.Node]:
    """In-place users of ``node`` (mutating it), in graph order."""
    out = [u for u in node.users if ga.mutated_arg(u) is node and u is not before]
    return sorted(out, key=_position)


_POS: dict = {}


def _position(node: fx.Node) -> int:
    graph = node.graph
    key = id(graph)
    table = _POS.get(key)
    if table is None or node not in table[1]:
        table = (graph, {n: i for i, n in enumerate(graph.nodes)})
        _POS[key] = table
    return table[1][node]


def reset_positions() -> None:
    _POS.clear()


def match_softmax(softmax: fx.Node) -> DecomposedMatch:
    """Match the attention around ``softmax``; raises NotAttention when it is none."""
    m = DecomposedMatch(softmax=softmax)
    x = softmax_input(softmax)
    if not _tensor(x):
        raise NotAttention
    # ---- forwards: casts and dropout to the product with v ----
    fwd, pv, fwd_reason = [softmax], None, None
    cur = softmax
    for _ in range(_MAX_WALK):
        users = list(cur.users)
        if len(users) != 1:
            fwd_reason = _escape_reason(cur, users)
            break
        user = users[0]
        if ga.mutated_arg(user) is cur:
            fwd_reason = f"the attention weights are modified in place by {user.format_node()}"
            break
        if is_cast(user):
            fwd.append(user)
            cur = user
            continue
        if _is_dropout(user) and user.args and user.args[0] is cur:
            p = dropout_p(user)
            if isinstance(p, fx.Node) or p:
                m.dropout_p = p
            fwd.append(user)
            cur = user
            continue
        name = _product_name(user)
        if name in ("matmul", "bmm", "einsum"):
            pv = user
        else:
            fwd_reason = f"the attention weights feed {_describe(user)}, not a product with v"
        break
    reaches = _reaches_product(x)
    if not reaches:
        raise NotAttention
    product_out = example_value(x)
    if pv is None and product_out.dim() < 3:
        raise NotAttention
    m.pv = pv
    # ---- backwards: the scores chain ----
    _walk_scores(m, x)
    if pv is None and not _activation_product(m.scores):
        raise NotAttention  # softmax(x @ W) not multiplied by anything: a classifier head
    m.chain = m.chain + fwd
    if m.reason is None and fwd_reason is not None:
        m.reason = fwd_reason
    if m.reason is None:
        _check_softmax(m)
    if m.reason is None and pv is not None:
        _match_pv(m, pv, cur)
    if m.reason is None:
        _check_escapes(m)
    return m


def _activation_product(prod: fx.Node) -> bool:
    """Both operands of the scores product are batched (>= 3 dims): q k^T, not x @ W."""
    name = _product_name(prod)
    if name == "einsum":
        ops = list(prod.args[1:])
        if len(ops) == 1 and isinstance(ops[0], (list, tuple)):
            ops = list(ops[0])
    elif name == "baddbmm":
        ops = [prod.args[1] if len(prod.args) > 1 else None, prod.args[2] if len(prod.args) > 2 else None]
    else:
        ops = list(prod.args[:2])
    return len(ops) == 2 and all(_tensor(o) and _ndim(o) >= 3 for o in ops)


def _describe(node: fx.Node) -> str:
    if node.op == "output":
        return "the graph output (the attention weights are returned)"
    name = op_name(node) or str(node.target)
    return f"{name} ({node.name})"


def _escape_reason(node: fx.Node, users) -> str:
    if not users:
        return "the attention weights are not used"
    outside = [u for u in users if u.op == "output"]
    if outside:
        return "the attention weights are returned by the graph (they must stay dense)"
    names = ", ".join(_describe(u) for u in users)
    return f"the attention weights have other users ({names}): they must stay dense"


def _check_softmax(m: DecomposedMatch) -> None:
    dim = softmax_dim(m.softmax)
    x = softmax_input(m.softmax)
    n = _ndim(x)
    if dim is None:
        m.reason = "softmax with an implicit dim"
        return
    if isinstance(dim, (list, tuple)) or not isinstance(dim, int):
        m.reason = f"softmax over dim {dim!r}"
        return
    if dim % n != n - 1:
        m.reason = f"softmax over dim {dim} of a {n}-dim tensor, not over the key axis ({n - 1})"


def _walk_scores(m: DecomposedMatch, x: fx.Node) -> None:
    """Backwards from the softmax input to the scores product; fills terms, scale and chain."""
    spine = []  # from softmax input back to the product
    cur = x
    for _ in range(_MAX_WALK):
        spine.append(cur)
        if _product_name(cur):
            break
        if is_cast(cur) or _is_view_step(cur):
            cur = cur.args[0]
            continue
        sf = scale_factor(cur)
        if sf is not None:
            cur = sf[0]
            continue
        name = op_name(cur)
        if name in ("add", "sub"):
            a, b = cur.args[0], _arg(cur, 1, "other")
            if _reaches_product(a):
                cur = a
            elif name == "add" and _reaches_product(b):
                cur = b
            else:
                raise NotAttention
            continue
        if name == "masked_fill":
            cur = cur.args[0]
            continue
        if name == "where" and cur.op == "call_function" and len(cur.args) >= 3:
            cur = cur.args[1] if _reaches_product(cur.args[1]) else cur.args[2]
            continue
        if m.reason is None:
            m.reason = f"the scores pass through {_describe(cur)}"
        cur = cur.args[0] if cur.args and isinstance(cur.args[0], fx.Node) else None
        if cur is None:
            raise NotAttention
    else:
        raise NotAttention
    if not _product_name(spine[-1]):
        raise NotAttention
    spine.reverse()
    m.scores = spine[0]
    m.chain = list(spine)
    _scores_product(m, spine[0])
    layout = tuple(example_value(spine[0]).shape)
    pending = []  # additive terms waiting for the scale factors applied after them
    layouts = []  # the layouts the masks are applied in (SymInts do not hash: a list)
    for i, node in enumerate(spine):
        nxt = spine[i + 1] if i + 1 < len(spine) else m.softmax
        steps = [] if i == 0 else [node]
        steps += _mutators(node, nxt)
        for step in steps:
            if step is not node:
                m.chain.append(step)
                if _position(step) > _position(nxt):
                    m.reason = m.reason or f"the scores are modified in place after use ({step.format_node()})"
            src = spine[i - 1] if step is node else node
            layout = _apply_step(m, step, src, layout, pending, layouts)
            if m.reason is not None:
                return
    if any(not _same(x, layouts[0]) for x in layouts[1:]):
        m.reason = "the masks are applied in different layouts of the scores"
        return
    m.canonical_shape = layouts[0] if layouts else tuple(example_value(m.scores).shape)


def _apply_step(m, step, src, layout, pending, layouts):
    """Interpret one step of the scores chain (``src`` is the scores value it reads)."""
    if is_cast(step):
        return layout
    if _is_view_step(step):
        return tuple(example_value(step).shape)
    sf = scale_factor(step)
    if sf is not None and sf[0] is src:
        _add_scale(m, sf[1], sf[2], where="scores", pending=pending)
        return layout
    name = op_name(step)
    if name in ("add", "sub"):
        a, b = step.args[0], _arg(step, 1, "other")
        other = b if a is src else a
        alpha = step.kwargs.get("alpha", 1)
        if not isinstance(alpha, (int, float)):
            m.reason = "add with a non-constant alpha"
            return layout
        coef = float(alpha) * (-1.0 if name == "sub" else 1.0)
        if name == "sub" and a is not src:
            m.reason = "the scores are subtracted from a mask"
            return layout
        if not _tensor(other):
            s = scalar_value(other)
            if s is not None and s.status == "const":
                return layout  # a constant shift: softmax does not see it
            m.reason = f"the scores are shifted by {other!r}"
            return layout
        if _numel(example_value(other)) == 1:
            return layout  # a scalar shift cancels in the softmax
        term = MaskTerm("additive", other, coef=coef)
        m.terms.append(term)
        pending.append(term)
        layouts.append(layout)
        return layout
    if name == "masked_fill":
        cond, value = _arg(step, 1, "mask"), _arg(step, 2, "value")
        if not _fill_blocks(m, value):
            return layout
        m.terms.append(MaskTerm("fill", cond, value=value))
        layouts.append(layout)
        return layout
    if name == "where":
        cond, a, b = step.args[0], step.args[1], step.args[2]
        if a is src:
            if not _fill_blocks(m, b):
                return layout
            m.terms.append(MaskTerm("keep", cond, value=b))
        else:
            if not _fill_blocks(m, a):
                return layout
            m.terms.append(MaskTerm("fill", cond, value=a))
        layouts.append(layout)
        return layout
    m.reason = m.reason or f"the scores pass through {_describe(step)}"
    return layout


def _fill_blocks(m, value) -> bool:
    s = scalar_value(value)
    if s is None or s.status != "const":
        m.reason = f"the mask fill value {value!r} is not a constant"
        return False
    kind = blocked_value(s.value)
    if kind is not True:
        m.reason = f"the mask fills {s.value:g}, a finite value: a bias, not a visibility mask"
        return False
    return True


def _add_scale(m, kind, factor, where, pending=None):
    s = scalar_value(factor)
    if s is None:
        m.reason = f"the {where} are scaled by a non-scalar"
        return
    if s.status == "runtime":
        m.reason = f"the scale ({factor.name if isinstance(factor, fx.Node) else factor}) is a tensor that varies at run time"
        return
    if s.status == "sym":
        m.scale_nodes.append((kind, s.node))
        if pending:
            m.reason = "a size-dependent scale applied after the mask"
        return
    value = s.value if kind == "mul" else 1.0 / s.value if s.value != 0 else math.inf
    if not math.isfinite(value) or value == 0:
        m.reason = f"the {where} are scaled by {value}"
        return
    m.scale *= value
    if pending:
        if value < 0:
            m.reason = "a negative scale after the mask"
        for term in pending:
            term.factor *= value


# --------------------------------------------------------------------------------------
# The products
# --------------------------------------------------------------------------------------


def _scores_product(m: DecomposedMatch, prod: fx.Node) -> None:
    name = _product_name(prod)
    if name == "einsum":
        return _scores_einsum(m, prod)
    if name == "baddbmm":
        inp, a, bt = prod.args[0], _arg(prod, 1, "batch1"), _arg(prod, 2, "batch2")
        beta, alpha = prod.kwargs.get("beta", 1), prod.kwargs.get("alpha", 1)
        _add_scale(m, "mul", alpha, "scores")
        if beta != 0:
            if _tensor(inp) and _numel(example_value(inp)) != 1:
                m.terms.append(MaskTerm("additive", inp, coef=float(beta) if isinstance(beta, (int, float)) else 1.0))
                if not isinstance(beta, (int, float)):
                    m.reason = m.reason or "baddbmm with a non-constant beta"
        m.pattern = "baddbmm"
    else:
        a, bt = prod.args[0], _arg(prod, 1, "other", _arg(prod, 1, "mat2"))
        m.pattern = name
    if not (_tensor(a) and _tensor(bt)):
        raise NotAttention
    na, nb = _ndim(a), _ndim(bt)
    if na not in (3, 4) or nb < 2 or nb > na:
        m.reason = m.reason or f"scores from a product of {na}-dim and {nb}-dim tensors (SPA takes [B, H, N, D] or [B*H, N, D])"
        return
    m.ndim = na
    q_node, q_t = _peel(m, a, "query")
    k_node, k_t = _peel(m, bt, "key")
    m.q = Operand(q_node, [("transpose", (-2, -1))] if q_t else [])
    m.k = Operand(k_node, [] if k_t else [("transpose", (-2, -1))])
    if nb < na:
        m.k.ops += [("unsqueeze", (0,))] * (na - nb)


def _peel(m, node, what):
    """Strip scalar factors and last-two-dim transposes; returns (node, transposed)."""
    transposed = False
    for _ in range(_MAX_WALK):
        if _is_transpose_last2(node):
            transposed = not transposed
            node = node.args[0]
            continue
        sf = scale_factor(node)
        if sf is not None:
            s = scalar_value(sf[2])
            if s is not None and s.status in ("const", "sym"):
                _add_scale(m, sf[1], sf[2], what)
                node = sf[0]
                continue
        break
    return node, transposed


_EINSUM_LETTERS = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"


def _parse_einsum(node: fx.Node):
    eq = node.args[0]
    ops = list(node.args[1:])
    if len(ops) == 1 and isinstance(ops[0], (list, tuple)):
        ops = list(ops[0])
    if not isinstance(eq, str) or len(ops) != 2 or "->" not in eq:
        return None
    eq = eq.replace(" ", "")
    lhs, out = eq.split("->")
    ins = lhs.split(",")
    if len(ins) != 2:
        return None
    if any("..." in s for s in ins + [out]):
        used = set(re.sub(r"[^A-Za-z]", "", eq))
        free = [c for c in _EINSUM_LETTERS if c not in used]
        nd = [_ndim(o) - (len(s) - 3) for o, s in zip(ops, ins) if "..." in s]
        ell = max(nd) if nd else 0
        fill = "".join(free[:ell])
        ins = [s.replace("...", fill[ell - (_ndim(o) - (len(s) - 3)):]) if "..." in s else s for s, o in zip(ins, ops)]
        out = out.replace("...", fill)
    return ins, out, ops


def _perm(src: str, dst: str):
    return [src.index(c) for c in dst]


def _scores_einsum(m: DecomposedMatch, prod: fx.Node) -> None:
    m.pattern = "einsum"
    parsed = _parse_einsum(prod)
    if parsed is None:
        m.reason = "an einsum that is not a two-operand product"
        return
    (sa, sb), so, (a, b) = parsed
    if len(set(sa)) != len(sa) or len(set(sb)) != len(sb) or len(set(so)) != len(so):
        m.reason = "an einsum with a repeated index"
        return
    if len(so) not in (3, 4):
        m.reason = f"scores with {len(so)} dims"
        return
    ql, kl, batch = so[-2], so[-1], so[:-2]
    contracted = [c for c in sa if c in sb and c not in so]
    if ql in sb and kl in sa and ql not in sa:
        m.reason = f"the einsum {sa},{sb}->{so} puts the key axis before the query axis"
        return
    ok = (
        len(contracted) == 1 and ql in sa and ql not in sb and kl in sb and kl not in sa
        and all(c in batch + ql + contracted[0] for c in sa) and all(c in batch + kl + contracted[0] for c in sb)
        and all(c in sa for c in batch)
    )
    if not ok:
        m.reason = f"the einsum {sa},{sb}->{so} is not q k^T"
        return
    m.ndim = len(so)
    d = contracted[0]
    qa = batch + ql + d
    kb = "".join(c for c in batch if c in sb) + kl + d
    q_node, _ = _peel(m, a, "query")
    k_node, _ = _peel(m, b, "key")
    m.q = Operand(q_node, [] if sa == qa else [("permute", tuple(_perm(sa, qa)))])
    k_ops = [] if sb == kb else [("permute", tuple(_perm(sb, kb)))]
    for i, c in enumerate(batch):  # a batch index the keys do not carry: broadcast
        if c not in sb:
            k_ops.append(("unsqueeze", (i,)))
    m.k = Operand(k_node, k_ops)


def _match_pv(m: DecomposedMatch, pv: fx.Node, p: fx.Node) -> None:
    name = _product_name(pv)
    out_shape = tuple(example_value(pv).shape)
    if name == "einsum":
        parsed = _parse_einsum(pv)
        if parsed is None:
            m.reason = "the weights feed an einsum that is not a two-operand product"
            return
        (sp, sv), so, (a, b) = parsed
        if a is not p:
            m.reason = "the weights are the right operand of the product with v"
            return
        if len(sp) != len(example_value(p).shape):
            m.reason = "einsum subscripts do not match the weights"
            return
        tq, tk = sp[-2], sp[-1]
        batch = sp[:-2]
        dv = [c for c in sv if c not in sp]
        if len(dv) != 1 or tk not in sv or tq in sv or sorted(so) != sorted(batch + tq + dv[0]) or \
                any(c not in batch + tk + dv[0] for c in sv):
            m.reason = f"the einsum {sp},{sv}->{so} does not contract the weights over the key axis"
            return
        vb = "".join(c for c in batch if c in sv) + tk + dv[0]
        v_ops = [] if sv == vb else [("permute", tuple(_perm(sv, vb)))]
        for i, c in enumerate(batch):
            if c not in sv:
                v_ops.append(("unsqueeze", (i,)))
        m.v = Operand(b, v_ops)
        canon_out = batch + tq + dv[0]
        if so != canon_out:
            m.out_ops.append(("permute", tuple(_perm(canon_out, so))))
        m.pattern += "/softmax/einsum"
        p_layout = tuple(example_value(p).shape)
    else:
        a, v = pv.args[0], _arg(pv, 1, "other", _arg(pv, 1, "mat2"))
        if a is not p:
            m.reason = "the weights are the right operand of the product with v (contracted over the query axis)"
            return
        if not _tensor(v):
            m.reason = "v is not a tensor"
            return
        nv = _ndim(v)
        p_layout = tuple(example_value(p).shape)
        if nv < 2 or nv > len(p_layout):
            m.reason = f"v has {nv} dims"
            return
        m.v = Operand(v, [("unsqueeze", (0,))] * (len(p_layout) - nv))
        m.pattern += f"/softmax/{name}"
    # layouts: scores product, masks (canonical), weights: all regroup the leading dims only
    canon = m.canonical_shape
    prod_layout = tuple(example_value(m.scores).shape)
    if not _same(canon, prod_layout):
        if not all(type(d) is int for d in canon + prod_layout + p_layout):
            m.reason = "the scores are reshaped with dynamic sizes"
            return
        m.q.ops.append(("reshape", (canon[:-1] + (_shape_after(m.q)[-1],),)))
        for opnd in (m.k, m.v):
            opnd.ops.append(("expand", (*prod_layout[:-2], -1, -1)))
            opnd.ops.append(("reshape", (canon[:-2] + (canon[-1], _shape_after(opnd)[-1]),)))
        m.ndim = len(canon)
        if len(canon) not in (3, 4):
            m.reason = f"masks applied to a {len(canon)}-dim view of the scores"
            return
        if not m.out_ops:
            m.out_ops.append(("reshape", (out_shape,)))
        else:
            m.reason = "einsum output with a reshaped scores layout"
            return
    elif not _same(p_layout, prod_layout):
        m.reason = "the weights are reshaped before the product with v"


def _shape_after(op: Operand) -> tuple:
    from torch._subclasses.fake_tensor import unset_fake_temporarily

    val = example_value(op.node)
    with unset_fake_temporarily():
        for kind, args in op.ops:
            val = getattr(val, kind)(*args)
    return tuple(val.shape)


def _check_escapes(m: DecomposedMatch) -> None:
    graph = m.softmax.graph
    g = ga.to_digraph(graph)
    inner = set(m.chain)
    allowed = {m.pv} if m.pv is not None else set()
    bad = ga.escapes(g, inner, allowed)
    if bad:
        src, user = bad[0]
        if user.op == "output":
            m.reason = "the attention scores or weights are returned by the graph: the site stays dense"
        else:
            m.reason = f"the attention scores or weights have another user ({_describe(user)}): the site stays dense"
        return
    for term in m.terms:
        if ga.depends_on(g, term.node, inner):
            m.reason = "the mask is computed from the scores"
            return
    for opnd, what in ((m.q, "q"), (m.k, "k"), (m.v, "v")):
        if opnd is not None and ga.depends_on(g, opnd.node, inner):
            m.reason = f"{what} is computed from the attention scores"
            return


def find_softmaxes(graph: fx.Graph) -> list[fx.Node]:
    return [n for n in graph.nodes if n.op in ("call_function", "call_method") and op_name(n) in SOFTMAX_NAMES]
