"""Run-time choice between SPA and dense attention for a symbolic sequence length.

Under ``torch.compile(dynamic=True)`` (or ``mark_dynamic``) the key length of a site is a
symbol, so the compile-time decision cannot know it. The rewrite then emits
:func:`spa_or_dense` instead of ``torch.ops.spa.attention``: it takes the op's arguments plus
``threshold`` and runs SPA when ``Nk >= threshold``, dense SDPA otherwise.

- While tracing with a symbolic length (AOTAutograd, Inductor) it becomes one ``cond`` higher-order
  op with both branches in the graph: the predicate is evaluated on the host from the input
  sizes at every call, so lengths on either side of the threshold run the same compiled code,
  with no recompilation and no device sync. Autograd goes through ``cond``.
- With concrete sizes (the ``"eager"`` inner backend runs the graph in Python) it is a plain ``if``.

Both branches return a contiguous output and contiguous gradients, as ``cond`` requires.
:func:`spa_call` is what the rewrite uses to pick the target and arguments of a site.
"""

from __future__ import annotations

from typing import Any, Optional

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import Tensor

from . import ops  # noqa: F401  (registers torch.ops.spa.attention)

RUNTIME_THRESHOLD_META = "spa_runtime_threshold"  # the same key as passes.decision


class _ContiguousGrad(torch.autograd.Function):
    """Identity whose gradient is made contiguous (``cond`` needs equal strides from both branches)."""

    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        return grad.contiguous()


def _is_symbolic(x: Any) -> bool:
    return isinstance(x, torch.SymInt) and not getattr(x.node.expr, "is_number", False)


def dense_attention(
    q: Tensor, k: Tensor, v: Tensor, attn_mask: Optional[Tensor], key_valid: Optional[Tensor],
    scale: float, causal: bool, offset: int, window: int,
) -> Tensor:
    """SDPA with the visibility of ``spa::attention``'s arguments (SPEC.md): ``[B, Hq, Nq, Dv]``."""
    gqa = bool(q.shape[1] != k.shape[1])  # head counts are fixed: a guard, never a recompile per length
    if key_valid is None and offset == 0 and window < 0:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=causal, scale=scale,
                                              enable_gqa=gqa)
    nq, nk = q.shape[2], k.shape[2]
    t = torch.arange(nq, device=q.device)[:, None] + offset
    u = torch.arange(nk, device=q.device)[None, :]
    vis = torch.ones(nq, nk, dtype=torch.bool, device=q.device)
    if causal:
        vis = vis & (u <= t)
    if window >= 0:
        vis = vis & (u > t - window)
    vis = vis[None, None]
    if key_valid is not None:
        vis = vis & key_valid[:, None, None, :].to(torch.bool)
    if attn_mask is None:
        mask = vis
    elif attn_mask.dtype == torch.bool:
        mask = vis & attn_mask
    else:
        mask = torch.where(vis, 0.0, float("-inf")).to(attn_mask.dtype) + attn_mask
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=gqa)


def spa_or_dense(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    attn_mask: Optional[Tensor],
    key_valid: Optional[Tensor],
    pq: Optional[Tensor],
    pk: Optional[Tensor],
    scale: float,
    causal: bool,
    offset: int,
    window: int,
    config: str,
    threshold: int,
) -> tuple[Tensor]:
    """``(out,)``: SPA (``torch.ops.spa.attention``) when ``Nk >= threshold``, else dense SDPA.

    The arguments are those of ``torch.ops.spa.attention`` plus ``threshold``; the 1-tuple lets
    the rewrite keep its ``getitem(node, 0)``.
    """
    present = tuple(x is not None for x in (attn_mask, key_valid, pq, pk))
    optional = tuple(x for x in (attn_mask, key_valid, pq, pk) if x is not None)

    def unpack(tensors):
        q, k, v, *rest = tensors
        it = iter(rest)
        return (q, k, v, *(next(it) if p else None for p in present))

    def spa_branch(*tensors):
        q, k, v, m, kv, a, b = unpack(tensors)
        q, k, v = (_ContiguousGrad.apply(x) for x in (q, k, v))
        out = torch.ops.spa.attention(q, k, v, m, kv, a, b, scale, causal, offset, window, config)[0]
        return (out.contiguous(),)

    def dense_branch(*tensors):
        q, k, v, m, kv, _, _ = unpack(tensors)
        q, k, v = (_ContiguousGrad.apply(x) for x in (q, k, v))
        return (dense_attention(q, k, v, m, kv, scale, causal, offset, window).contiguous(),)

    nk = k.shape[2]
    operands = (q, k, v, *optional)
    if _is_symbolic(nk):
        return tuple(torch.ops.higher_order.cond(nk >= threshold, spa_branch, dense_branch, operands))
    return spa_branch(*operands) if int(nk) >= threshold else dense_branch(*operands)


def spa_call(node: fx.Node, args: tuple) -> tuple[Any, tuple]:
    """``(target, args)`` for the rewrite of the SDPA ``node``: ``torch.ops.spa.attention.default``
    with ``args``, or :func:`spa_or_dense` with ``args + (threshold,)`` where the decision left a
    run-time threshold on the node (a symbolic length)."""
    threshold = node.meta.get(RUNTIME_THRESHOLD_META)
    if threshold is None:
        return torch.ops.spa.attention.default, tuple(args)
    return spa_or_dense, (*args, int(threshold))
