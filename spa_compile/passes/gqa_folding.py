"""Fold the K/V head expansion of grouped-query attention into SPA's GQA semantics.

Models with fewer K/V heads than query heads often copy K and V to every query
head before attention (Hugging Face's ``repeat_kv``)::

    x[:, :, None, :, :].expand(B, Hkv, G, N, D).reshape(B, Hkv * G, N, D)
    x.unsqueeze(2).expand(...).flatten(1, 2)
    x.repeat_interleave(G, dim=1)

Query head ``h`` then reads K/V head ``h // G``: exactly SPA's (and SDPA's
``enable_gqa``) grouping. :func:`unexpand_heads` finds the unexpanded tensor, so
that the rewrite passes it to the SPA op and the copy disappears as dead code.
(``x.repeat(1, G, 1, 1)`` tiles heads as ``h % Hkv`` instead, which is a
different grouping; it is left alone.)
"""

from __future__ import annotations

import torch
import torch.fx as fx

from .mask_recovery import example_value, op_name


def _val(node):
    v = example_value(node)
    return v if isinstance(v, torch.Tensor) else None


def _eq(a, b) -> bool:
    if type(a) is int and type(b) is int:
        return a == b
    if isinstance(a, torch.SymInt) and isinstance(b, torch.SymInt):
        return a.node.expr == b.node.expr
    return False


def _shape_eq(a, b) -> bool:
    return len(a) == len(b) and all(_eq(x, y) for x, y in zip(a, b))


def _is_new_axis_2(node: fx.Node):
    """``x[:, :, None]`` / ``x.unsqueeze(2)`` of a 4-D ``x``: returns x, or None."""
    if not isinstance(node, fx.Node):
        return None
    name = op_name(node)
    src = node.args[0] if node.args else None
    if not isinstance(src, fx.Node) or _val(src) is None or _val(node) is None:
        return None
    xs, us = _val(src).shape, _val(node).shape
    if len(xs) != 4 or len(us) != 5 or not _shape_eq(us, (xs[0], xs[1], 1, xs[2], xs[3])):
        return None
    if name == "unsqueeze":
        dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
        return src if isinstance(dim, int) and dim % 5 == 2 else None
    if name == "getitem":
        idx = node.args[1] if isinstance(node.args[1], tuple) else (node.args[1],)
        if sum(1 for e in idx if e is None) != 1:
            return None
        if not all(e is None or e is Ellipsis or e == slice(None) for e in idx):
            return None
        return src
    return None


def unexpand_heads(node) -> tuple[fx.Node, int] | None:
    """``(x, G)`` when ``node`` is ``x`` ([B, Hkv, N, D]) with every head repeated G times in place."""
    if not isinstance(node, fx.Node) or _val(node) is None or _val(node).dim() != 4:
        return None
    out = _val(node).shape
    name = op_name(node)
    if name in ("reshape", "view", "flatten"):
        e = node.args[0]
        if not isinstance(e, fx.Node) or op_name(e) not in ("expand", "expand_as", "broadcast_to"):
            return None
        ev = _val(e)
        x = _is_new_axis_2(e.args[0])
        if ev is None or x is None:
            return None
        xs = _val(x).shape
        g = ev.shape[2]
        if type(g) is not int or not _shape_eq(ev.shape, (xs[0], xs[1], g, xs[2], xs[3])):
            return None
        if not _eq(out[1], xs[1] * g):
            return None
        if not (_eq(out[0], xs[0]) and _eq(out[2], xs[2]) and _eq(out[3], xs[3])):
            return None
        return x, g
    if name == "repeat_interleave":
        x = node.args[0]
        reps = node.args[1] if len(node.args) > 1 else node.kwargs.get("repeats")
        dim = node.args[2] if len(node.args) > 2 else node.kwargs.get("dim")
        if not isinstance(x, fx.Node) or _val(x) is None or type(reps) is not int or dim is None or dim % 4 != 1:
            return None
        return x, reps
    return None


def fold_kv(k, v) -> tuple[fx.Node, fx.Node, int] | None:
    """Fold both K and V, or neither: ``(k0, v0, G)`` when both repeat their heads G times."""
    fk, fv = unexpand_heads(k), unexpand_heads(v)
    if fk is None or fv is None or fk[1] != fv[1]:
        return None
    if not _eq(_val(fk[0]).shape[1], _val(fv[0]).shape[1]):
        return None
    return fk[0], fv[0], fk[1]
