"""Recover the structure of attention masks that the graph builds from index arithmetic.

Models build their masks as N x N tensors: ``arange`` comparisons, ``tril``/``triu``,
``where``/``masked_fill`` with ``finfo.min``, a padding vector indexed or expanded to
``[B, 1, Nq, Nk]``. This module evaluates the producer subgraph of such a mask
*symbolically*, with sympy, as a function of the indices of its dimensions, and
classifies the result as SPA's structured visibility:

* causal with an offset: ``u <= t + offset``;
* sliding window: ``u > t + offset - window``;
* key padding: a per-batch validity vector ``key_valid[b, u]`` (any Boolean
  expression of the batch and key indices and of the graph's input tensors);
* and their conjunctions.

Anything else (a per-head mask, packed sequences, a mask read from an input
tensor as a whole, a bias) is reported with the reason, and the caller keeps
the mask as an exact dense tensor.

Values are tracked per tensor as a function of symbols ``_spa_d0, _spa_d1, ...``
that stand for the indices of the tensor's own dimensions (a static size-1
dimension has index 0). Boolean tensors are sympy Booleans; numeric tensors are
a partition into ``(condition, value)`` pieces. A tensor the analysis does not
understand becomes an opaque *leaf* ``_spa_leafN(index expressions)``: leaves
that depend on the batch and key indices only become key padding; leaves that
depend on the query index stop the recovery.
"""

from __future__ import annotations

import math
import operator
from dataclasses import dataclass, field
from typing import Any

import sympy
import torch
import torch.fx as fx
from sympy.core.function import AppliedUndef
from sympy.logic.boolalg import Boolean

# Values at or below this count as "blocked" (-inf): finfo(float32).min, -1e9 and the
# -10000.0 of older models all drive exp() to exactly 0 in float32 for any realistic score.
BLOCK_THRESHOLD = -1.0e4
_MAX_DIMS = 8
D = [sympy.Symbol(f"_spa_d{i}", integer=True, nonnegative=True) for i in range(_MAX_DIMS)]
_D_SET = set(D)


class Unrecoverable(Exception):
    """The mask is not (or not provably) a structure SPA takes; the message says why."""


class BiasMask(Unrecoverable):
    """The additive mask has finite non-zero values: a bias, not a visibility mask."""


# --------------------------------------------------------------------------------------
# Symbolic values
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SymVal:
    ndim: int
    kind: str  # "bool" | "num"
    expr: Any  # bool: sympy Boolean; num: tuple of (condition, value) pairs partitioning the index space

    def xreplace(self, mapping: dict) -> "SymVal":
        if not mapping:
            return self
        if self.kind == "bool":
            return SymVal(self.ndim, "bool", _b(self.expr.xreplace(mapping)))
        pieces = []
        for c, v in self.expr:
            c2 = _b(c.xreplace(mapping))
            if c2 is not sympy.false:
                pieces.append((c2, v.xreplace(mapping)))
        return SymVal(self.ndim, "num", tuple(pieces))


def _b(x) -> Boolean:
    if x is True:
        return sympy.true
    if x is False:
        return sympy.false
    return x


def _const(value) -> SymVal:
    if isinstance(value, bool):
        return SymVal(0, "bool", _b(value))
    return SymVal(0, "num", ((sympy.true, _num(value)),))


def _num(value):
    if isinstance(value, bool):
        return sympy.Integer(int(value))
    if isinstance(value, int):
        return sympy.Integer(value)
    if isinstance(value, float):
        if math.isnan(value):
            raise Unrecoverable("a NaN constant in the mask")
        if math.isinf(value):
            return sympy.oo if value > 0 else -sympy.oo
        return sympy.Integer(int(value)) if value.is_integer() and abs(value) < 2**53 else sympy.Float(value)
    if isinstance(value, (torch.SymInt, torch.SymFloat)):
        return value.node.expr
    if isinstance(value, sympy.Basic):
        return value
    raise Unrecoverable(f"constant {value!r} is not a number")


def to_bool(v: SymVal) -> SymVal:
    if v.kind == "bool":
        return v
    return SymVal(v.ndim, "bool", _b(sympy.Or(*[sympy.And(c, sympy.Ne(x, 0)) for c, x in v.expr])))


def to_num(v: SymVal) -> SymVal:
    if v.kind == "num":
        return v
    return SymVal(v.ndim, "num", tuple(p for p in ((v.expr, sympy.Integer(1)), (_b(sympy.Not(v.expr)), sympy.Integer(0)))
                                      if p[0] is not sympy.false))


def _shift(v: SymVal, n: int) -> SymVal:
    """Right-align ``v`` in ``n`` dims (broadcasting)."""
    k = n - v.ndim
    if k < 0:
        raise Unrecoverable("broadcast to fewer dims")
    if k == 0:
        return v
    mapping = {D[i]: D[i + k] for i in range(v.ndim)}
    out = v.xreplace(mapping)
    return SymVal(n, out.kind, out.expr)


def _static(d) -> int | None:
    return d if type(d) is int else None


def _normalise(v: SymVal, shape) -> SymVal:
    """Index 0 for the static size-1 dims of ``shape`` (the tensor's own dims)."""
    mapping = {D[i]: sympy.Integer(0) for i, d in enumerate(shape) if _static(d) == 1}
    out = v.xreplace(mapping)
    return SymVal(len(shape), out.kind, out.expr)


def _binary_num(a: SymVal, b: SymVal, n: int, fn) -> SymVal:
    a, b = _shift(to_num(a), n), _shift(to_num(b), n)
    pieces = []
    for ca, va in a.expr:
        for cb, vb in b.expr:
            c = _b(sympy.And(ca, cb))
            if c is not sympy.false:
                val = fn(va, vb)
                if val is sympy.nan:
                    raise Unrecoverable("the mask arithmetic gives NaN (e.g. 0 * -inf)")
                pieces.append((c, val))
    return SymVal(n, "num", tuple(pieces))


def _compare(a: SymVal, b: SymVal, n: int, rel) -> SymVal:
    a, b = _shift(to_num(a), n), _shift(to_num(b), n)
    terms = []
    for ca, va in a.expr:
        for cb, vb in b.expr:
            terms.append(sympy.And(ca, cb, _b(rel(va, vb))))
    return SymVal(n, "bool", _b(sympy.Or(*terms)))


def _logical(a: SymVal, b: SymVal, n: int, fn) -> SymVal:
    a, b = _shift(to_bool(a), n), _shift(to_bool(b), n)
    return SymVal(n, "bool", _b(fn(a.expr, b.expr)))


def _where(c: SymVal, x: SymVal, y: SymVal, n: int) -> SymVal:
    c = _shift(to_bool(c), n)
    if x.kind == "bool" and y.kind == "bool":
        x, y = _shift(x, n), _shift(y, n)
        return SymVal(n, "bool", _b(sympy.Or(sympy.And(c.expr, x.expr), sympy.And(sympy.Not(c.expr), y.expr))))
    x, y = _shift(to_num(x), n), _shift(to_num(y), n)
    pieces = []
    for cond, vals in ((c.expr, x.expr), (_b(sympy.Not(c.expr)), y.expr)):
        for cv, v in vals:
            cc = _b(sympy.And(cond, cv))
            if cc is not sympy.false:
                pieces.append((cc, v))
    return SymVal(n, "num", tuple(pieces))


# --------------------------------------------------------------------------------------
# Operator names
# --------------------------------------------------------------------------------------

_OPERATORS = {
    operator.add: "add", operator.iadd: "add", operator.sub: "sub", operator.isub: "sub",
    operator.mul: "mul", operator.imul: "mul", operator.truediv: "truediv", operator.itruediv: "truediv",
    operator.floordiv: "floordiv", operator.ifloordiv: "floordiv", operator.mod: "mod", operator.neg: "neg",
    operator.le: "le", operator.lt: "lt", operator.ge: "ge", operator.gt: "gt", operator.eq: "eq",
    operator.ne: "ne", operator.and_: "and", operator.iand: "and", operator.or_: "or", operator.ior: "or",
    operator.xor: "xor", operator.ixor: "xor", operator.invert: "not", operator.not_: "not",
    operator.getitem: "getitem", operator.abs: "abs", operator.pos: "identity",
}
_ALIASES = {
    "__add__": "add", "__radd__": "add", "add_": "add", "iadd": "add",
    "__sub__": "sub", "sub_": "sub", "subtract": "sub", "__rsub__": "rsub",
    "__mul__": "mul", "__rmul__": "mul", "mul_": "mul", "multiply": "mul",
    "div": "truediv", "div_": "truediv", "divide": "truediv", "true_divide": "truediv", "__truediv__": "truediv",
    "floor_divide": "floordiv", "__floordiv__": "floordiv", "remainder": "mod", "__mod__": "mod",
    "negative": "neg", "__neg__": "neg", "absolute": "abs", "__abs__": "abs",
    "__le__": "le", "less_equal": "le", "__lt__": "lt", "less": "lt", "__ge__": "ge", "greater_equal": "ge",
    "__gt__": "gt", "greater": "gt", "__eq__": "eq", "__ne__": "ne", "not_equal": "ne",
    "logical_and": "and", "bitwise_and": "and", "__and__": "and", "__rand__": "and", "logical_and_": "and",
    "logical_or": "or", "bitwise_or": "or", "__or__": "or", "__ror__": "or",
    "logical_xor": "xor", "bitwise_xor": "xor", "__xor__": "xor",
    "logical_not": "not", "bitwise_not": "not", "__invert__": "not",
    "masked_fill_": "masked_fill", "tril_": "tril", "triu_": "triu", "__getitem__": "getitem",
}


def op_name(node: fx.Node) -> str | None:
    """A canonical name for what a call node computes (``"add"``, ``"softmax"``, ``"matmul"``...)."""
    if node.op == "call_method":
        return _ALIASES.get(node.target, node.target)
    if node.op != "call_function":
        return None
    target = node.target
    if target in _OPERATORS:
        return _OPERATORS[target]
    if isinstance(target, torch._ops.OpOverload):
        name = target._schema.name.split("::")[-1]
        return _ALIASES.get(name, name)
    name = getattr(target, "__name__", None)
    if name is None:
        return None
    module = getattr(target, "__module__", None) or ""
    qual = getattr(target, "__qualname__", "") or ""
    if module.startswith("torch") or qual.startswith(("Tensor.", "_TensorBase.", "TensorBase.")) or module == "":
        return _ALIASES.get(name, name)
    if module in ("math", "builtins", "_operator", "operator"):
        return _ALIASES.get(name, name)
    return None


def _arg(node: fx.Node, i: int, name: str, default=None):
    if len(node.args) > i:
        return node.args[i]
    return node.kwargs.get(name, default)


def example_value(node):
    if not isinstance(node, fx.Node):
        return None
    return node.meta.get("example_value", node.meta.get("val"))


def _same_dim(a, b) -> bool:
    if type(a) is int and type(b) is int:
        return a == b
    if isinstance(a, torch.SymInt) and isinstance(b, torch.SymInt):
        return a.node.expr == b.node.expr
    return False


# --------------------------------------------------------------------------------------
# The evaluator
# --------------------------------------------------------------------------------------


class MaskEvaluator:
    """Symbolic values of graph nodes, memoised (one evaluator per graph)."""

    def __init__(self, graph: fx.Graph):
        self.graph = graph
        self._memo: dict[fx.Node, SymVal | Unrecoverable] = {}
        self.leaves: dict[sympy.Function, fx.Node] = {}
        self._leaf_of: dict[fx.Node, Any] = {}
        self._mutations = None  # alias class -> in-place nodes writing to it (computed on first use)

    # -- in-place mutations ------------------------------------------------------------
    def _mutation_info(self):
        if self._mutations is None:
            from . import graph_analysis as ga

            self._classes = ga.alias_classes(self.graph)
            self._pos = {n: i for i, n in enumerate(self.graph.nodes)}
            self._mutations = {}
            for n in self.graph.nodes:
                target = ga.mutated_arg(n)
                if target is not None:
                    self._mutations.setdefault(self._classes.get(target), []).append(n)
        return self._mutations

    def _after_mutations(self, node: fx.Node, base: SymVal) -> SymVal:
        """``node``'s value as its readers see it: ``base`` with its in-place writes applied.

        Followed: writes to ``node`` itself whose results are unused (``m.masked_fill_(c, v)``,
        ``m.add_(x)``), all before any read; or one write whose result replaces ``node``
        (``m += x`` as Dynamo records it). Anything else (a write through a view,
        ``m[..., :k] = v``, or reads between writes) stops the analysis.
        """
        from . import graph_analysis as ga

        muts = self._mutation_info().get(self._classes.get(node), [])
        if not muts:
            return base
        direct = [m for m in muts if ga.mutated_arg(m) is node]
        for m in muts:
            target = ga.mutated_arg(m)
            if target is not node and ga.is_view(target):
                raise Unrecoverable("the mask is written in place through a view")
        if not direct:  # writes to the tensor this one views: its value already has them
            return base
        used = [m for m in direct if m.users]
        if used:  # ``r = m.add_(x)``: r carries the value; m itself must not be read otherwise
            if len(direct) != 1 or set(node.users) != {used[0]}:
                raise Unrecoverable("the mask is read and written in place in an order the analysis does not follow")
            return base
        last = max(self._pos.get(m, -1) for m in direct)
        members = [n for n, c in self._classes.items() if c == self._classes.get(node)]
        for member in members:
            for user in member.users:
                if user in members or ga.mutated_arg(user) is not None:
                    continue
                if self._pos.get(user, 1 << 60) < last:
                    raise Unrecoverable("the mask is read before it is written in place")
        value = base
        for m in sorted(direct, key=lambda n: self._pos.get(n, 0)):
            name = op_name(m)
            handler = getattr(self, f"_op_{name}", None) if name else None
            mv = example_value(m)
            if handler is None or not isinstance(mv, torch.Tensor):
                raise Unrecoverable(f"the mask is written in place by {op_name(m) or m.target} ({m.name})")
            self._memo[node] = value  # the handler reads node: give it the value so far
            value = handler(m, mv)
            value = _normalise(_shift(value, mv.dim()) if value.ndim < mv.dim() else value, mv.shape)
            value = to_bool(value) if mv.dtype == torch.bool else (to_num(value) if value.kind == "bool" else value)
        return value

    # -- public --------------------------------------------------------------------
    def value(self, node) -> SymVal:
        """The symbolic value of ``node`` (a node or a Python constant); raises Unrecoverable."""
        if not isinstance(node, fx.Node):
            return _const(node)
        got = self._memo.get(node)
        if got is None:
            try:
                got = self._eval(node)
                got = self._after_mutations(node, got)
            except Unrecoverable as e:
                got = e
            except (TypeError, ValueError, AttributeError, IndexError, KeyError, RecursionError) as e:
                got = Unrecoverable(f"cannot analyse {node.format_node()}: {e}")
            self._memo[node] = got
        if isinstance(got, Unrecoverable):
            raise got
        return got

    # -- leaves ----------------------------------------------------------------------
    def leaf(self, node: fx.Node) -> SymVal:
        val = example_value(node)
        if not isinstance(val, torch.Tensor):
            raise Unrecoverable(f"{node.name} is not a tensor")
        fn = self._leaf_of.get(node)
        if fn is None:
            fn = sympy.Function(f"_spa_leaf{len(self._leaf_of)}")
            self._leaf_of[node] = fn
            self.leaves[fn] = node
        shape = val.shape
        if len(shape) > _MAX_DIMS:
            raise Unrecoverable("mask has too many dims")
        args = [sympy.Integer(0) if _static(d) == 1 else D[i] for i, d in enumerate(shape)]
        app = fn(*args) if args else fn(sympy.Integer(0))
        if val.dtype == torch.bool:
            return SymVal(len(shape), "bool", _b(sympy.Ne(app, 0)))
        return SymVal(len(shape), "num", ((sympy.true, app),))

    # -- dispatch --------------------------------------------------------------------
    def _eval(self, node: fx.Node) -> SymVal:
        val = example_value(node)
        if isinstance(val, (torch.SymInt, torch.SymFloat, int, float)) and not isinstance(val, bool):
            return _const(val)
        if isinstance(val, (bool, torch.SymBool)):
            if isinstance(val, bool):
                return _const(val)
            raise Unrecoverable("a symbolic boolean in the mask")
        if not isinstance(val, torch.Tensor):
            raise Unrecoverable(f"{node.name} has no tensor value")
        if node.op in ("placeholder", "get_attr"):
            return self.leaf(node)
        name = op_name(node)
        handler = getattr(self, f"_op_{name}", None) if name else None
        if handler is None:
            return self.leaf(node)
        out = handler(node, val)
        if out is None:
            return self.leaf(node)
        out = _normalise(_shift(out, val.dim()) if out.ndim < val.dim() else out, val.shape)
        if val.dtype == torch.bool:
            out = to_bool(out)
        elif out.kind == "bool":
            out = to_num(out)
        return out

    def _v(self, x) -> SymVal:
        return self.value(x)

    # -- creation ------------------------------------------------------------------------
    def _op_arange(self, node, val):
        args = list(node.args)
        start, step = node.kwargs.get("start", 0), node.kwargs.get("step", 1)
        if len(args) == 1:
            pass
        elif len(args) == 2:
            start = args[0]
        elif len(args) >= 3:
            start, step = args[0], args[2]
        start, step = self._scalar(start), self._scalar(step)
        return SymVal(1, "num", ((sympy.true, start + step * D[0]),))

    def _scalar(self, x):
        v = self._v(x)
        if v.ndim != 0 or v.kind != "num" or len(v.expr) != 1:
            raise Unrecoverable("a non-scalar where a number was expected")
        return v.expr[0][1]

    def _fill(self, val, value):
        v = self._v(value)
        if v.ndim != 0:
            raise Unrecoverable("fill value is not a scalar")
        return SymVal(val.dim(), v.kind, v.expr)

    def _op_ones(self, node, val):
        return self._fill(val, True if val.dtype == torch.bool else 1)

    _op_ones_like = _op_new_ones = _op_ones

    def _op_zeros(self, node, val):
        return self._fill(val, False if val.dtype == torch.bool else 0)

    _op_zeros_like = _op_new_zeros = _op_zeros

    def _op_full(self, node, val):
        return self._fill(val, _arg(node, 1, "fill_value"))

    def _op_new_full(self, node, val):  # x.new_full(size, fill_value)
        return self._fill(val, _arg(node, 2, "fill_value"))

    def _op_full_like(self, node, val):
        return self._fill(val, _arg(node, 1, "fill_value"))

    def _op_tensor(self, node, val):
        data = _arg(node, 0, "data")
        if val.dim() != 0 or isinstance(data, (list, tuple)):
            return None
        return self._fill(val, data)

    _op_scalar_tensor = _op_as_tensor = _op_tensor

    # -- arithmetic ------------------------------------------------------------------------
    def _op_add(self, node, val):
        a, b = self._v(node.args[0]), self._v(_arg(node, 1, "other"))
        alpha = node.kwargs.get("alpha", 1)
        if alpha != 1:
            b = _binary_num(b, _const(alpha), b.ndim, operator.mul)
        if a.kind == "bool" and b.kind == "bool":
            return _logical(a, b, val.dim(), sympy.Or)
        return _binary_num(a, b, val.dim(), operator.add)

    def _op_sub(self, node, val):
        a, b = self._v(node.args[0]), self._v(_arg(node, 1, "other"))
        alpha = node.kwargs.get("alpha", 1)
        if alpha != 1:
            b = _binary_num(b, _const(alpha), b.ndim, operator.mul)
        return _binary_num(a, b, val.dim(), operator.sub)

    def _op_rsub(self, node, val):
        a, b = self._v(node.args[0]), self._v(_arg(node, 1, "other"))
        return _binary_num(b, a, val.dim(), operator.sub)

    def _op_mul(self, node, val):
        a, b = self._v(node.args[0]), self._v(_arg(node, 1, "other"))
        if a.kind == "bool" and b.kind == "bool":
            return _logical(a, b, val.dim(), sympy.And)
        return _binary_num(a, b, val.dim(), _mul)

    def _op_truediv(self, node, val):
        mode = node.kwargs.get("rounding_mode")
        a, b = self._v(node.args[0]), self._v(_arg(node, 1, "other"))
        if mode is None:
            return _binary_num(a, b, val.dim(), operator.truediv)
        if mode == "floor":
            return _binary_num(a, b, val.dim(), lambda x, y: sympy.floor(x / y))
        raise Unrecoverable(f"division with rounding_mode={mode!r}")

    def _op_floordiv(self, node, val):
        a, b = self._v(node.args[0]), self._v(node.args[1])
        return _binary_num(a, b, val.dim(), lambda x, y: sympy.floor(x / y))

    def _op_mod(self, node, val):
        a, b = self._v(node.args[0]), self._v(node.args[1])
        return _binary_num(a, b, val.dim(), sympy.Mod)

    def _op_neg(self, node, val):
        a = to_num(self._v(node.args[0]))
        return SymVal(a.ndim, "num", tuple((c, -v) for c, v in a.expr))

    def _op_abs(self, node, val):
        a = to_num(self._v(node.args[0]))
        return SymVal(a.ndim, "num", tuple((c, sympy.Abs(v)) for c, v in a.expr))

    def _op_identity(self, node, val):
        return self._v(node.args[0])

    # -- comparisons and logic --------------------------------------------------------------
    def _cmp(self, node, val, rel):
        a, b = self._v(node.args[0]), self._v(_arg(node, 1, "other"))
        if a.kind == "bool" and b.kind == "bool" and rel in (sympy.Eq, sympy.Ne):
            fn = sympy.Equivalent if rel is sympy.Eq else sympy.Xor
            return _logical(a, b, val.dim(), fn)
        return _compare(a, b, val.dim(), rel)

    def _op_le(self, node, val):
        return self._cmp(node, val, sympy.Le)

    def _op_lt(self, node, val):
        return self._cmp(node, val, sympy.Lt)

    def _op_ge(self, node, val):
        return self._cmp(node, val, sympy.Ge)

    def _op_gt(self, node, val):
        return self._cmp(node, val, sympy.Gt)

    def _op_eq(self, node, val):
        return self._cmp(node, val, sympy.Eq)

    def _op_ne(self, node, val):
        return self._cmp(node, val, sympy.Ne)

    def _op_and(self, node, val):
        a, b = self._v(node.args[0]), self._v(_arg(node, 1, "other"))
        if a.kind != "bool" or b.kind != "bool":
            if val.dtype != torch.bool:
                raise Unrecoverable("bitwise arithmetic on integers")
        return _logical(a, b, val.dim(), sympy.And)

    def _op_or(self, node, val):
        a, b = self._v(node.args[0]), self._v(_arg(node, 1, "other"))
        if (a.kind != "bool" or b.kind != "bool") and val.dtype != torch.bool:
            raise Unrecoverable("bitwise arithmetic on integers")
        return _logical(a, b, val.dim(), sympy.Or)

    def _op_xor(self, node, val):
        a, b = self._v(node.args[0]), self._v(_arg(node, 1, "other"))
        if (a.kind != "bool" or b.kind != "bool") and val.dtype != torch.bool:
            raise Unrecoverable("bitwise arithmetic on integers")
        return _logical(a, b, val.dim(), sympy.Xor)

    def _op_not(self, node, val):
        a = self._v(node.args[0])
        if a.kind != "bool" and val.dtype != torch.bool:
            raise Unrecoverable("bitwise not on integers")
        a = to_bool(a)
        return SymVal(a.ndim, "bool", _b(sympy.Not(a.expr)))

    def _op_where(self, node, val):
        if len(node.args) + len(node.kwargs) < 3:
            raise Unrecoverable("torch.where with one argument")
        if node.op == "call_method":  # x.where(cond, y)
            x, c, y = node.args[0], _arg(node, 1, "condition"), _arg(node, 2, "other")
        else:
            c, x, y = _arg(node, 0, "condition"), _arg(node, 1, "input"), _arg(node, 2, "other")
        return _where(self._v(c), self._v(x), self._v(y), val.dim())

    def _op_masked_fill(self, node, val):
        x, c, v = node.args[0], _arg(node, 1, "mask"), _arg(node, 2, "value")
        return _where(self._v(c), self._v(v), self._v(x), val.dim())

    def _op_tril(self, node, val, upper=False):
        x = self._v(node.args[0])
        d = self._scalar(_arg(node, 1, "diagonal", 0))
        n = val.dim()
        if n < 2:
            raise Unrecoverable("tril/triu of a vector")
        x = _shift(x, n)
        col, row = D[n - 1], D[n - 2]
        keep = _b(sympy.Ge(col - row, d) if upper else sympy.Le(col - row, d))
        if x.kind == "bool":
            return SymVal(n, "bool", _b(sympy.And(x.expr, keep)))
        return _where(SymVal(n, "bool", keep), x, _const(0), n)

    def _op_triu(self, node, val):
        return self._op_tril(node, val, upper=True)

    # -- dtype and device --------------------------------------------------------------------
    def _op_to(self, node, val):
        src = node.args[0]
        sv = example_value(src)
        out = self._v(src)
        if isinstance(sv, torch.Tensor) and sv.is_floating_point() and not val.is_floating_point() and val.dtype != torch.bool:
            raise Unrecoverable("float to integer conversion in the mask")
        return out

    _op_type = _op_type_as = _op_float = _op_double = _op_half = _op_bfloat16 = _op_bool = _op_to
    _op_long = _op_int = _op_short = _op_byte = _op_char = _op_to
    _op_contiguous = _op_clone = _op_detach = _op_cpu = _op_cuda = _op_to

    # -- views ---------------------------------------------------------------------------
    def _op_unsqueeze(self, node, val):
        x = self._v(node.args[0])
        n = val.dim()
        p = _arg(node, 1, "dim")
        p = p + n if p < 0 else p
        mapping = {D[i]: D[i if i < p else i + 1] for i in range(x.ndim)}
        out = x.xreplace(mapping)
        return SymVal(n, out.kind, out.expr)

    def _op_view(self, node, val):
        return self._reshape_like(node.args[0], val)

    _op_reshape = _op_flatten = _op_unflatten = _op_view_as = _op_reshape_as = _op_squeeze = _op_view

    def _reshape_like(self, src, val):
        x = self._v(src)
        sv = example_value(src)
        in_dims = [i for i, d in enumerate(sv.shape) if _static(d) != 1]
        out_dims = [i for i, d in enumerate(val.shape) if _static(d) != 1]
        if len(in_dims) != len(out_dims) or not all(_same_dim(sv.shape[i], val.shape[j]) for i, j in zip(in_dims, out_dims)):
            raise Unrecoverable("a reshape that merges or splits mask dims")
        mapping = {D[i]: D[j] for i, j in zip(in_dims, out_dims)}
        out = _shift(x, sv.dim()).xreplace(mapping)
        return SymVal(val.dim(), out.kind, out.expr)

    def _op_expand(self, node, val):
        x = self._v(node.args[0])
        return _shift(x, val.dim())

    _op_expand_as = _op_broadcast_to = _op_expand

    def _op_transpose(self, node, val):
        x = self._v(node.args[0])
        n = val.dim()
        a, b = _arg(node, 1, "dim0"), _arg(node, 2, "dim1")
        a, b = a % n, b % n
        perm = list(range(n))
        perm[a], perm[b] = perm[b], perm[a]
        return self._permuted(x, perm, n)

    _op_swapaxes = _op_swapdims = _op_transpose

    def _op_t(self, node, val):
        x = self._v(node.args[0])
        return self._permuted(x, [1, 0] if val.dim() == 2 else [0], val.dim())

    def _op_permute(self, node, val):
        x = self._v(node.args[0])
        dims = node.args[1:] if len(node.args) > 2 else _arg(node, 1, "dims")
        dims = list(dims) if isinstance(dims, (list, tuple)) else [dims]
        n = val.dim()
        return self._permuted(x, [d % n for d in dims], n)

    def _permuted(self, x: SymVal, perm, n) -> SymVal:
        # output dim j is input dim perm[j]
        mapping = {D[perm[j]]: D[j] for j in range(n)}
        out = _shift(x, n).xreplace(mapping)
        return SymVal(n, out.kind, out.expr)

    def _op_getitem(self, node, val):
        base_node, idx = node.args[0], node.args[1]
        bv = example_value(base_node)
        if not isinstance(bv, torch.Tensor):
            raise Unrecoverable("indexing a non-tensor")
        base = _shift(self._v(base_node), bv.dim())
        idx = idx if isinstance(idx, tuple) else (idx,)
        n_in = bv.dim()
        consuming = sum(1 for e in idx if e is not None and e is not Ellipsis)
        entries = []
        for e in idx:
            if e is Ellipsis:
                entries.extend([slice(None)] * (n_in - consuming))
            else:
                entries.append(e)
        n_cons = sum(1 for e in entries if e is not None)
        entries.extend([slice(None)] * (n_in - n_cons))
        tensors = [i for i, e in enumerate(entries) if isinstance(e, fx.Node) and isinstance(example_value(e), torch.Tensor)]
        if tensors:
            return self._advanced_index(base, bv, entries, tensors, val)
        mapping, out_dim, in_dim = {}, 0, 0
        for e in entries:
            if e is None:
                out_dim += 1
            elif isinstance(e, slice):
                size = bv.shape[in_dim]
                start = sympy.Integer(0) if e.start is None else self._scalar(e.start)
                step = sympy.Integer(1) if e.step is None else self._scalar(e.step)
                if not (isinstance(step, sympy.Integer) and step > 0):
                    raise Unrecoverable("a slice with a non-positive or symbolic step")
                if isinstance(start, sympy.Integer) and start < 0:
                    if _static(size) is None:
                        raise Unrecoverable("a negative slice start on a symbolic size")
                    start = max(start + size, 0)
                mapping[D[in_dim]] = start + step * D[out_dim]
                in_dim += 1
                out_dim += 1
            else:
                i = self._scalar(e)
                if isinstance(i, sympy.Integer) and i < 0:
                    size = bv.shape[in_dim]
                    if _static(size) is None:
                        raise Unrecoverable("a negative index on a symbolic size")
                    i = i + size
                mapping[D[in_dim]] = i
                in_dim += 1
        out = base.xreplace(mapping)
        return SymVal(val.dim(), out.kind, out.expr)

    def _advanced_index(self, base, bv, entries, tensors, val):
        if any(e is None or not (isinstance(e, slice) or i in tensors) for i, e in enumerate(entries)):
            raise Unrecoverable("advanced indexing mixed with None or integers")
        if any(isinstance(e, slice) and e != slice(None) for e in entries):
            raise Unrecoverable("advanced indexing mixed with partial slices")
        idx_vals = []
        for i in tensors:
            v = self._v(entries[i])
            if v.kind != "num" or len(v.expr) != 1:
                raise Unrecoverable("a boolean or piecewise index tensor")
            idx_vals.append(v)
        m = max(v.ndim for v in idx_vals)
        adjacent = tensors == list(range(tensors[0], tensors[0] + len(tensors)))
        offset = tensors[0] if adjacent else 0
        mapping = {}
        for i, v in zip(tensors, idx_vals):
            e = _shift(v, m).expr[0][1]
            e = e.xreplace({D[j]: D[j + offset] for j in range(m)}) if offset else e
            if e.is_nonnegative is not True:
                raise Unrecoverable("an index tensor that may be negative")
            mapping[D[i]] = e
        out_dim = 0 if adjacent else m
        for i, e in enumerate(entries):
            if i in tensors:
                if adjacent and i == tensors[0]:
                    out_dim += m
                continue
            mapping[D[i]] = D[out_dim]
            out_dim += 1
        # the index tensors' own symbols and the slice symbols share names: replace simultaneously
        out = base.xreplace(mapping)
        return SymVal(val.dim(), out.kind, out.expr)


def _mul(a, b):
    # 0 * (-inf) is NaN in torch as in sympy; 0 * leaf stays 0
    if a == 0 or b == 0:
        if (a.is_infinite if hasattr(a, "is_infinite") else False) or (b.is_infinite if hasattr(b, "is_infinite") else False):
            return sympy.nan
        return sympy.Integer(0)
    return a * b


# --------------------------------------------------------------------------------------
# Visibility of mask terms
# --------------------------------------------------------------------------------------


def blocked_value(value) -> bool | None:
    """True for -inf-like constants, False for 0, None for anything else (a bias or unknown)."""
    try:
        v = float(value)
    except (TypeError, ValueError):
        return None
    if v == 0:
        return False
    if v <= BLOCK_THRESHOLD:
        return True
    return None


def additive_visibility(v: SymVal, factor: float = 1.0, preconditions: list | None = None,
                        leaves: dict | None = None) -> Boolean:
    """Where an additive mask (times ``factor``) leaves the scores alone; raises for a bias.

    A value linear in one integer input tensor ``L`` (``(1 - attention_mask) * finfo.min``)
    is visible where it is 0 and blocked where it is very negative; the values of ``L`` that
    give neither (e.g. ``attention_mask == 2``) are excluded by a precondition appended to
    ``preconditions`` (checked at run time), or the analysis gives up when there is no list.
    Only integer (or boolean) tensors qualify: a float input may legitimately be a bias.
    """
    v = to_num(v)
    visible = []
    for cond, value in v.expr:
        value = sympy.expand(value * sympy.Float(factor)) if factor != 1.0 else value
        if value.has(AppliedUndef):
            vis, core = _leaf_linear_visible(value, preconditions is not None, leaves or {})
            preconditions.append((cond, core))  # only this piece's positions need the value domain
            visible.append(sympy.And(cond, vis))
            continue
        if _index_symbols(value):
            raise BiasMask(f"the additive mask's value {value} varies with the positions: a bias (such as ALiBi), "
                           "not a visibility mask")
        if not value.is_number:
            raise Unrecoverable(f"the additive mask's value {value} depends on sizes")
        kind = blocked_value(value)
        if kind is None:
            raise BiasMask(f"the additive mask has the finite non-zero value {float(value):g}: a bias, not a visibility mask")
        if kind is False:
            visible.append(cond)
    return _b(sympy.Or(*visible))


def _leaf_linear_visible(value, allowed: bool, leaves):
    """``(visible, domain)`` for a value ``a * L + c`` of one integer input ``L``: visible where it
    is 0, and the values of ``L`` that give 0 or a blocked value (the run-time precondition)."""
    apps = value.atoms(AppliedUndef)
    why = "the additive mask's values come from an input tensor (unknown at compile time)"
    if len(apps) != 1 or not allowed:
        raise Unrecoverable(why)
    (leaf,) = apps
    node_val = example_value(leaves.get(leaf.func))
    if not isinstance(node_val, torch.Tensor) or node_val.is_floating_point() or node_val.is_complex():
        raise Unrecoverable(why)
    a = value.coeff(leaf)
    c = sympy.expand(value - a * leaf)
    if not (a.is_number and c.is_number) or a == 0 or c.has(AppliedUndef) or _index_symbols(c):
        raise Unrecoverable(why)
    if not (a.is_finite and c.is_finite):
        raise Unrecoverable(why)
    a, c = sympy.Rational(float(a)), sympy.Rational(float(c))  # exact: the edges must not round
    root = -c / a
    if not root.is_integer:
        r = float(root)
        if not (math.isfinite(r) and r.is_integer()):
            raise Unrecoverable(why)
        root = sympy.Integer(int(r))
    # blocked: a * L + c <= BLOCK_THRESHOLD; L integer
    edge = (sympy.Rational(BLOCK_THRESHOLD) - c) / a
    blocked = sympy.Le(leaf, sympy.floor(edge)) if a > 0 else sympy.Ge(leaf, sympy.ceiling(edge))
    if blocked.subs(leaf, root) is sympy.true:
        raise Unrecoverable(why)
    return _b(sympy.Eq(leaf, root)), _b(sympy.Or(sympy.Eq(leaf, root), blocked))


# --------------------------------------------------------------------------------------
# Classification into SPA's structure
# --------------------------------------------------------------------------------------


@dataclass
class MaskStructure:
    """Visibility recovered from the graph: ``causal``/``offset``/``window`` and key padding.

    offset and window are sympy expressions (integers, or in the graph's size symbols).
    key_valid is a sympy Boolean in the batch and key index symbols and the leaves
    (``leaves`` maps each leaf function to the graph node it reads), or None.
    """

    ndim: int
    causal: bool = False
    offset: Any = sympy.Integer(0)
    window: Any = None
    key_valid: Any = None
    leaves: dict = field(default_factory=dict)
    preconditions: list = field(default_factory=list)  # Booleans in (b, u, leaves) checked at run time

    @property
    def batch_symbol(self):
        return D[0]

    @property
    def key_symbol(self):
        return D[self.ndim - 1]

    @property
    def kind(self) -> str:
        parts = []
        if self.causal:
            parts.append("causal" if self.offset == 0 else f"causal(offset={self.offset})")
        if self.window is not None:
            parts.append(f"window({self.window})" if self.causal or self.offset == 0
                         else f"window({self.window}, offset={self.offset})")
        if self.key_valid is not None:
            parts.append("key_padding")
        return "+".join(parts) or "none"

    @property
    def is_trivial(self) -> bool:
        return not self.causal and self.window is None and self.key_valid is None and not self.preconditions

    def leaf_nodes(self) -> list[fx.Node]:
        used = set()
        for expr in [self.key_valid, *self.preconditions]:
            if expr is not None:
                used |= {f.func for f in expr.atoms(AppliedUndef) if f.func in self.leaves}
        return [self.leaves[f] for f in used]


def _index_symbols(expr) -> set:
    return expr.free_symbols & _D_SET


def _split_abs(expr):
    """``|x| + r <= 0`` -> ``x + r <= 0 & -x + r <= 0`` (bidirectional windows)."""

    def split(rel):
        e = rel.lhs - rel.rhs
        abs_terms = [a for a in sympy.Add.make_args(e) if isinstance(a, sympy.Abs)]
        if len(abs_terms) != 1 or rel.rel_op not in ("<=", "<"):
            raise Unrecoverable("an absolute value in the mask outside a |t - u| <= w band")
        x = abs_terms[0].args[0]
        r = e - abs_terms[0]
        op = sympy.Le if rel.rel_op == "<=" else sympy.Lt
        return sympy.And(op(x + r, 0), op(-x + r, 0))

    return expr.replace(lambda x: isinstance(x, sympy.core.relational.Relational) and x.has(sympy.Abs), split)


def _band(rel, t, u):
    """A relation linear in ``u - t``: returns ("upper"|"lower"|"eq", c) for ``u - t <= c`` etc."""
    e = sympy.expand(rel.lhs - rel.rhs)
    au, at = e.coeff(u), e.coeff(t)
    rest = sympy.expand(e - au * u - at * t)
    if _index_symbols(rest) or not (au.is_number and at.is_number) or au == 0 or au != -at:
        raise Unrecoverable(f"the mask relation {rel} is not a band in (t, u)")
    c = -rest / au  # e op 0  <=>  au * (u - t) op -rest
    op = rel.rel_op
    if au < 0:
        op = {"<=": ">=", "<": ">", ">=": "<=", ">": "<", "==": "==", "!=": "!="}[op]
    if not c.is_integer:
        if not c.is_number:
            raise Unrecoverable(f"the mask relation {rel} has a non-integer symbolic offset")
    if op == "<=":
        return "upper", sympy.floor(c)
    if op == "<":
        return "upper", sympy.ceiling(c) - 1
    if op == ">=":
        return "lower", sympy.ceiling(c)
    if op == ">":
        return "lower", sympy.floor(c) + 1
    if op == "==":
        if not c.is_integer:
            raise Unrecoverable("the mask keeps no key")
        return "eq", c
    raise Unrecoverable(f"the mask relation {rel} excludes a single diagonal")


def _clause_band(clause, t, u):
    """A CNF clause as one band: a relation, or a disjunction of bounds on the same side
    (``u <= t | u <= t - 1`` is ``u <= t``)."""
    if isinstance(clause, sympy.core.relational.Relational):
        return _band(clause, t, u)
    if not isinstance(clause, sympy.Or):
        raise Unrecoverable(f"the mask condition {clause} is not a band in (t, u)")
    bands = []
    for lit in clause.args:
        if not isinstance(lit, sympy.core.relational.Relational) or _index_symbols(lit) - {t, u}:
            raise Unrecoverable(f"the mask condition {clause} is not a band in (t, u)")
        bands.append(_band(lit, t, u))
    kinds = {k for k, _ in bands}
    values = [c for _, c in bands]
    if kinds == {"upper"} and all(c.is_number for c in values):
        return "upper", max(values)
    if kinds == {"lower"} and all(c.is_number for c in values):
        return "lower", min(values)
    raise Unrecoverable(f"the mask condition {clause} is a union of bands")


def _always_true_in_rows(clause, t, nq) -> bool:
    if type(nq) is not int or nq <= 0:
        return False
    if isinstance(clause, sympy.core.relational.Relational):
        e = sympy.expand(clause.lhs - clause.rhs)
        if e.coeff(t).is_number and not _index_symbols(e - e.coeff(t) * t):
            return bool(clause.subs(t, 0)) is True and bool(clause.subs(t, nq - 1)) is True
    return False


def _pick(bounds, fn, what):
    if len(bounds) == 1:
        return bounds[0]
    if all(b.is_number for b in bounds):
        return fn(bounds)
    raise Unrecoverable(f"several symbolic {what} bounds")


def classify(visible: Boolean, ndim: int, shape, leaves: dict, preconditions=()) -> MaskStructure:
    """Turn ``visible(indices)`` over the scores' dims into a :class:`MaskStructure`."""
    if ndim not in (3, 4):
        raise Unrecoverable(f"scores with {ndim} dims")
    b, t, u = D[0], D[ndim - 2], D[ndim - 1]
    h = D[1] if ndim == 4 else None
    visible = _split_abs(visible) if visible.has(sympy.Abs) else visible
    if sympy.count_ops(visible) > 400:
        raise Unrecoverable("the mask expression is too large to analyse")
    cnf = sympy.to_cnf(visible, simplify=False)
    uppers, lowers, keys = [], [], []
    for clause in sympy.And.make_args(cnf):
        if clause is sympy.true:
            continue
        if clause is sympy.false:
            raise Unrecoverable("the mask hides every key")
        syms = _index_symbols(clause)
        if h is not None and h in syms:
            raise Unrecoverable("the mask differs per head")
        if syms <= {b, u}:
            if not syms:
                raise Unrecoverable(f"the mask depends on a run-time condition {clause}")
            keys.append(clause)
            continue
        if syms == {t}:
            if _always_true_in_rows(clause, t, shape[ndim - 2]):
                continue
            raise Unrecoverable("the mask hides whole query rows")
        if clause.atoms(AppliedUndef):
            names = sorted({leaves[a.func].name for a in clause.atoms(AppliedUndef) if a.func in leaves})
            raise Unrecoverable(
                f"the mask reads {', '.join(names) or 'an input tensor'} at (query, key) positions: an input "
                "tensor whose values are not known at compile time"
            )
        if b in syms:
            raise Unrecoverable("the mask's query/key structure differs per batch row")
        kind, c = _clause_band(clause, t, u)
        if kind in ("upper", "eq"):
            uppers.append(c)
        if kind in ("lower", "eq"):
            lowers.append(c)
    st = MaskStructure(ndim=ndim, leaves=dict(leaves))
    if uppers:
        st.causal, st.offset = True, _pick(uppers, min, "upper")
    if lowers:
        lo = _pick(lowers, max, "lower")
        if not st.causal:  # a lower bound alone: u >= t + lo is u > t + offset - window with offset lo, window 1
            st.offset = lo
        window = sympy.simplify(st.offset - lo + 1)
        if window.is_number and window < 1:
            raise Unrecoverable("the mask's band is empty")
        st.window = window
    if keys:
        st.key_valid = _b(sympy.And(*keys))
    for pre in preconditions:
        if _index_symbols(pre) - {b, u}:
            raise Unrecoverable("a precondition on the mask's values that depends on the query")
        st.preconditions.append(pre)
    for expr in (st.offset, st.window):
        if expr is not None and _index_symbols(sympy.sympify(expr)):
            raise Unrecoverable("an offset that depends on an index")
    return st


# --------------------------------------------------------------------------------------
# Mask terms of an attention site
# --------------------------------------------------------------------------------------


@dataclass
class MaskTerm:
    """One way a mask reaches the scores.

    kind "additive": ``scores + coef * node`` (scaled afterwards by ``factor``);
    kind "fill": ``scores.masked_fill(node, value)`` (blocked where ``node`` is True);
    kind "keep": ``where(node, scores, value)`` (visible where ``node`` is True);
    kind "bool": an SDPA boolean mask (visible where True).
    """

    kind: str
    node: Any
    coef: float = 1.0
    factor: float = 1.0
    value: Any = None


def analyse(evaluator: MaskEvaluator, terms: list[MaskTerm], scores_shape) -> MaskStructure:
    """The structure of the visibility all ``terms`` give together over scores of ``scores_shape``."""
    try:
        return _analyse(evaluator, terms, scores_shape)
    except Unrecoverable as e:
        raise type(e)(_readable(str(e), len(scores_shape), evaluator.leaves)) from None


def _readable(msg: str, ndim: int, leaves: dict) -> str:
    """Index symbols as b/h/t/u (batch, head, query, key) and leaves as their graph names."""
    names = ["b", "h", "t", "u"] if ndim == 4 else ["b", "t", "u"] if ndim == 3 else [f"i{i}" for i in range(ndim)]
    for i in reversed(range(min(ndim, _MAX_DIMS))):
        msg = msg.replace(f"_spa_d{i}", names[i] if i < len(names) else f"i{i}")
    for fn, node in sorted(leaves.items(), key=lambda kv: -len(str(kv[0]))):
        msg = msg.replace(str(fn), node.name)
    return msg


def _analyse(evaluator: MaskEvaluator, terms: list[MaskTerm], scores_shape) -> MaskStructure:
    n = len(scores_shape)
    parts, preconditions = [], []
    for term in terms:
        v = evaluator.value(term.node)
        if v.ndim > n:
            raise Unrecoverable("the mask has more dims than the scores")
        v = _shift(v, n)
        if term.kind == "additive":
            if v.kind == "bool":
                raise Unrecoverable("a boolean tensor added to the scores")
            parts.append(additive_visibility(v, term.coef * term.factor, preconditions, evaluator.leaves))
        elif term.kind == "fill":
            parts.append(_b(sympy.Not(to_bool(v).expr)))
        else:  # keep / bool
            parts.append(to_bool(v).expr)
    visible = _b(sympy.And(*parts)) if parts else sympy.true
    # the scores' own size-1 dims index 0
    norm = {d_: sympy.Integer(0) for d_, d in zip(D, scores_shape) if _static(d) == 1}
    visible = _normalise(SymVal(n, "bool", visible), scores_shape).expr
    checks = []
    keys = {D[0], D[n - 1]}
    for cond, core in preconditions:
        cond = _b(cond.xreplace(norm))
        # the check runs per key: keep the parts of the piece's condition that do not involve the
        # query (the piece's keys are among those; checking more keys is stronger, never weaker)
        kept = [c for c in sympy.And.make_args(cond) if not (_index_symbols(c) - keys)]
        pre = _b(sympy.Or(sympy.Not(sympy.And(*kept)), core.xreplace(norm)))
        if pre is not sympy.true and not _tautology(pre) and pre not in checks:
            checks.append(pre)
    visible = _propagate_equalities(_exclude_outside_domain(visible, checks))
    return classify(visible, n, scores_shape, evaluator.leaves, checks)


def _leaf_equality(rel):
    """``(L, r)`` when ``rel`` says that one input value ``L`` equals the number ``r``."""
    if not isinstance(rel, sympy.Eq):
        return None
    apps = rel.atoms(AppliedUndef)
    if len(apps) != 1:
        return None
    (app,) = apps
    e = sympy.expand(rel.lhs - rel.rhs)
    a = e.coeff(app)
    rest = sympy.expand(e - a * app)
    if not a.is_number or a == 0 or not rest.is_number:
        return None
    return app, -rest / a


def _propagate_equalities(expr):
    """Inside each conjunction, substitute ``L = r`` into the other conditions on ``L``."""
    if not isinstance(expr, (sympy.And, sympy.Or, sympy.Not)):
        return expr
    expr = _b(expr.func(*[_propagate_equalities(a) for a in expr.args]))
    if not isinstance(expr, sympy.And):
        return expr
    eqs = {}
    for a in expr.args:
        sol = _leaf_equality(a)
        if sol is not None:
            if sol[0] in eqs and eqs[sol[0]] != sol[1]:
                return sympy.false
            eqs[sol[0]] = sol[1]
    if not eqs:
        return expr
    rest = [_b(a.xreplace(eqs)) for a in expr.args if _leaf_equality(a) is None]
    return _b(sympy.And(*rest, *[sympy.Eq(app, val) for app, val in eqs.items()]))


def _tautology(pre) -> bool:
    """True for a condition on one integer input value ``L`` that holds for every ``L`` (linear
    relations in ``L`` change truth only at their constants: testing around them decides it)."""
    apps = pre.atoms(AppliedUndef)
    if len(apps) != 1 or _index_symbols(pre.xreplace({next(iter(apps)): sympy.Integer(0)})):
        return False
    (app,) = apps
    points = {0}
    for rel in pre.atoms(sympy.core.relational.Relational):
        e = sympy.expand(rel.lhs - rel.rhs)
        a = e.coeff(app)
        if not a.is_number or a == 0 or sympy.expand(e - a * app).has(app):
            return False
        c = -(e - a * app) / a
        if not c.is_number:
            return False
        f = int(math.floor(float(c)))
        points |= {f - 1, f, f + 1, f + 2}
    return all(_b(pre.xreplace({app: sympy.Integer(p)})) is sympy.true for p in points)


def _exclude_outside_domain(visible, checks):
    """``L == r`` is False where the run-time checks exclude the value ``r`` of ``L``."""
    if not checks:
        return visible
    repl = {}
    for eq in visible.atoms(sympy.Eq):
        app, val = (eq.lhs, eq.rhs) if isinstance(eq.lhs, AppliedUndef) else (eq.rhs, eq.lhs)
        if not isinstance(app, AppliedUndef) or not val.is_number:
            continue
        for pre in checks:
            if pre.has(app) and _b(pre.xreplace({app: val})) is sympy.false:
                repl[eq] = sympy.false
                break
    return _b(visible.xreplace(repl)) if repl else visible


# --------------------------------------------------------------------------------------
# Code generation: key_valid and offsets as graph nodes
# --------------------------------------------------------------------------------------


class SymbolNodes:
    """Graph nodes that compute the graph's size symbols (Dynamo lifts them as placeholders)."""

    def __init__(self, graph: fx.Graph):
        self.graph = graph
        self._map: dict[sympy.Symbol, Any] = {}
        for node in graph.nodes:
            if node.op != "placeholder":
                continue
            val = example_value(node)
            if isinstance(val, torch.SymInt) and isinstance(val.node.expr, sympy.Symbol):
                self._map.setdefault(val.node.expr, node)
            elif isinstance(val, torch.Tensor):
                for i, d in enumerate(val.shape):
                    if isinstance(d, torch.SymInt) and isinstance(d.node.expr, sympy.Symbol):
                        self._map.setdefault(d.node.expr, (node, i))

    def can_emit(self, expr) -> bool:
        expr = sympy.sympify(expr)
        return all(s in self._map for s in expr.free_symbols)

    def emit(self, expr):
        """A Python int or an FX node computing ``expr`` (insert point set by the caller)."""
        expr = sympy.sympify(expr)
        if expr.is_Integer:
            return int(expr)
        if expr.is_Symbol:
            ref = self._map.get(expr)
            if ref is None:
                raise Unrecoverable(f"no graph value for the size {expr}")
            if isinstance(ref, tuple):
                return self.graph.call_function(torch.ops.aten.sym_size.int, ref)
            return ref
        if isinstance(expr, sympy.Add):
            out = None
            for a in expr.args:
                x = self.emit(a)
                out = x if out is None else self.graph.call_function(operator.add, (out, x))
            return out
        if isinstance(expr, sympy.Mul):
            out = None
            for a in expr.args:
                x = self.emit(a)
                out = x if out is None else self.graph.call_function(operator.mul, (out, x))
            return out
        if isinstance(expr, sympy.floor):
            inner = expr.args[0]
            num, den = inner.as_numer_denom()
            return self.graph.call_function(operator.floordiv, (self.emit(num), self.emit(den)))
        raise Unrecoverable(f"cannot emit the size expression {expr}")


_REL_OPS = {"<=": operator.le, "<": operator.lt, ">=": operator.ge, ">": operator.gt, "==": operator.eq, "!=": operator.ne}


class KeyValidEmitter:
    """Emits ``key_valid[b, u]`` (bool ``[B, Nk]``) for a structure's key-padding expression."""

    def __init__(self, graph: fx.Graph, st: MaskStructure, batch, nk, device, symbols: SymbolNodes):
        self.graph, self.st, self.symbols, self.device = graph, st, symbols, device
        self.batch, self.nk = batch, nk
        self.b, self.u = st.batch_symbol, st.key_symbol
        self._aranges: dict = {}

    def _call(self, target, *args, **kwargs):
        return self.graph.call_function(target, args, kwargs)

    def _arange(self, which):
        if which not in self._aranges:
            size = self.batch if which == "b" else self.nk
            a = self._call(torch.arange, size, device=self.device)
            shape = (-1, 1) if which == "b" else (1, -1)
            self._aranges[which] = self.graph.call_method("view", (a, shape))
        return self._aranges[which]

    def emit_preconditions(self) -> list:
        """``torch._assert_async`` nodes for the structure's preconditions (values of an input mask)."""
        out = []
        for pre in self.st.preconditions:
            ok = self._expr(pre)
            if isinstance(ok, fx.Node):
                ok = self.graph.call_method("all", (ok,))
                out.append(self._call(torch._assert_async, ok,
                                      "spa_compile: an attention padding vector holds a value that makes its additive "
                                      "mask neither 0 nor -inf (the rewritten graph assumes it does not)"))
            elif not ok:
                raise Unrecoverable("a precondition that never holds")
        return out

    def emit(self):
        out = self._expr(self.st.key_valid)
        if not isinstance(out, fx.Node):  # a constant
            out = self._call(torch.full, (1, 1), bool(out), dtype=torch.bool, device=self.device)
        out = self.graph.call_method("to", (out,), {"dtype": torch.bool})
        out = self.graph.call_method("expand", (out, self.batch, self.nk))
        return self.graph.call_method("contiguous", (out,))

    def _expr(self, e):
        if e is sympy.true or e is True:
            return True
        if e is sympy.false or e is False:
            return False
        if isinstance(e, sympy.Symbol):
            if e == self.b:
                return self._arange("b")
            if e == self.u:
                return self._arange("u")
            return self.symbols.emit(e)
        if e.is_Integer:
            return int(e)
        if e.is_Number:
            return float(e)
        if isinstance(e, sympy.And):
            return self._fold(operator.and_, [self._expr(a) for a in e.args])
        if isinstance(e, sympy.Or):
            return self._fold(operator.or_, [self._expr(a) for a in e.args])
        if isinstance(e, sympy.Not):
            x = self._expr(e.args[0])
            return (not x) if isinstance(x, bool) else self._call(operator.invert, x)
        if isinstance(e, sympy.Xor):
            return self._fold(operator.xor, [self._expr(a) for a in e.args])
        if isinstance(e, sympy.core.relational.Relational):
            lhs, rhs = self._expr(e.lhs), self._expr(e.rhs)
            if not isinstance(lhs, fx.Node) and not isinstance(rhs, fx.Node):
                return _REL_OPS[e.rel_op](lhs, rhs)
            return self._call(_REL_OPS[e.rel_op], lhs, rhs)
        if isinstance(e, sympy.Add):
            return self._fold(operator.add, [self._expr(a) for a in e.args])
        if isinstance(e, sympy.Mul):
            return self._fold(operator.mul, [self._expr(a) for a in e.args])
        if isinstance(e, sympy.floor) and isinstance(e.args[0], sympy.Mul):
            num, den = e.args[0].as_numer_denom()
            return self._call(operator.floordiv, self._expr(num), self._expr(den))
        if isinstance(e, sympy.Mod):
            return self._call(operator.mod, self._expr(e.args[0]), self._expr(e.args[1]))
        if e.func in self.st.leaves:
            return self._leaf(e)
        raise Unrecoverable(f"cannot emit {e}")

    def _fold(self, op, xs):
        """``op`` over ``xs`` (commutative ops only): graph values first, constants folded."""
        consts = [x for x in xs if isinstance(x, (bool, int, float))]
        out = None
        for x in xs:
            if not isinstance(x, (bool, int, float)):
                out = x if out is None else self._call(op, out, x)
        if consts:
            c = consts[0]
            for x in consts[1:]:
                c = op(c, x)
            out = c if out is None else self._call(op, out, c)
        return out

    def _leaf(self, app):
        node = self.st.leaves[app.func]
        val = example_value(node)
        args = list(app.args)
        # fast path: the leaf read at (b, u) or (0, u) with size-1 dims elsewhere
        kept = [i for i, a in enumerate(args) if a != 0]
        if all(args[i] in (self.b, self.u) for i in kept) and [args[i] for i in kept] in ([self.b, self.u], [self.u], [self.b]):
            sizes = [val.shape[i] for i in kept]
            if [args[i] for i in kept] == [self.u]:
                shape = (1, -1)
            elif [args[i] for i in kept] == [self.b]:
                shape = (-1, 1)
            else:
                shape = (sizes[0], -1) if type(sizes[0]) is int else (-1, sizes[1] if type(sizes[1]) is int else None)
                if None in shape:
                    shape = None
            if shape is not None:
                return self.graph.call_method("reshape", (node, shape))
        index = tuple(self._expr(a) for a in args)
        if all(isinstance(i, int) for i in index):
            return self.graph.call_function(operator.getitem, (node, index))
        index = tuple(i if isinstance(i, fx.Node) else self._call(torch.full, (1, 1), i, dtype=torch.long, device=self.device)
                      for i in index)
        return self.graph.call_function(operator.getitem, (node, index))
