"""SPA as a ``torch.library`` custom op: ``torch.ops.spa.attention``.

The op is what the backend writes into rewritten graphs. It is opaque to
Inductor (which compiles the rest of the graph around it), has a fake
implementation for tracing with symbolic shapes, and a registered backward that
holds the selection fixed (SPEC.md, Gradients).

On CUDA it runs the Triton kernels of :mod:`spa_compile.codegen` where they
support the call; everywhere else it runs :mod:`spa_compile.reference`.
"""

from __future__ import annotations

import functools
import json
import math
from typing import Optional

import torch
from torch import Tensor

from . import reference
from .budget import max_selected
from .config import SPAConfig
from .projector import Projector
from .visibility import BiasMaskError, Visibility, mask_to_visibility, num_blocks

# The fields of SPAConfig that change what the op computes; the rest steer the backend.
OP_FIELDS = ("block_size", "density", "topk", "min_blocks", "max_blocks", "sink_blocks", "local_blocks", "fill",
             "selection", "block_score")


@torch.compiler.assume_constant_result  # a config is a constant of the traced program
def config_to_str(cfg: SPAConfig) -> str:
    """The op's ``config`` argument: a compact JSON string of :data:`OP_FIELDS`."""
    fields = OP_FIELDS + (("fine_rows", "fine_keys") if cfg.block_score == "fine" else ())
    return json.dumps({f: getattr(cfg, f) for f in fields}, separators=(",", ":"), sort_keys=True)


@functools.lru_cache(maxsize=256)
def config_from_str(text: str) -> SPAConfig:
    return SPAConfig(**json.loads(text))


def _visibility(nq, nk, attn_mask, key_valid, causal, offset, window, check_bias: bool) -> Visibility:
    mask = attn_mask
    if mask is not None and check_bias:
        mask = mask_to_visibility(mask)  # raises BiasMaskError for a bias
    return Visibility(
        nq=nq, nk=nk, causal=causal, offset=offset, window=None if window < 0 else window,
        key_valid=key_valid, mask=mask,
    )


def _is_bias(attn_mask: Optional[Tensor]) -> bool:
    if attn_mask is None or attn_mask.dtype == torch.bool:
        return False
    try:
        mask_to_visibility(attn_mask)
    except BiasMaskError:
        return True
    return False


def _codegen():
    """The Triton kernels, or None where they cannot run (no CUDA, no triton)."""
    try:
        from . import codegen
    except ImportError:  # pragma: no cover - triton missing
        return None
    return codegen if hasattr(codegen, "spa_forward") else None


def _use_kernels(q, k, v, vis: Visibility, cfg: SPAConfig, scale: float) -> bool:
    if not q.is_cuda or not vis.structured:
        return False
    cg = _codegen()
    return cg is not None and cg.unsupported_reason(q, k, v, vis, cfg, scale) is None


# ---------------------------------------------------------------------------------------
# Dense path for a bias (SPEC.md: such a site stays dense)
# ---------------------------------------------------------------------------------------


def _dense_with_bias(q, k, v, bias, scale):
    dt = reference.compute_dtype(q)
    g = q.shape[1] // k.shape[1]
    kk = k.to(dt).repeat_interleave(g, dim=1)
    vv = v.to(dt).repeat_interleave(g, dim=1)
    logits = torch.einsum("bhtd,bhud->bhtu", q.to(dt), kk) * scale + bias.to(dt)
    lse = torch.logsumexp(logits, dim=-1)
    out = torch.einsum("bhtu,bhud->bhtd", (logits - lse[..., None]).exp(), vv)
    return out.to(q.dtype), lse.to(torch.float32)


def _dense_with_bias_backward(grad_out, grad_lse, q, k, v, bias, scale):
    dt = reference.compute_dtype(q)
    g = q.shape[1] // k.shape[1]
    qf, go = q.to(dt), grad_out.to(dt)
    kk = k.to(dt).repeat_interleave(g, dim=1)
    vv = v.to(dt).repeat_interleave(g, dim=1)
    logits = torch.einsum("bhtd,bhud->bhtu", qf, kk) * scale + bias.to(dt)
    p = torch.softmax(logits, dim=-1)
    dp = go @ vv.transpose(-1, -2)
    delta = (dp * p).sum(-1, keepdim=True)
    if grad_lse is not None:
        delta = delta - grad_lse.to(dt)[..., None]
    ds = p * (dp - delta)
    dq = scale * ds @ kk
    dk = (scale * ds.transpose(-1, -2) @ qf).unflatten(1, (k.shape[1], g)).sum(2)
    dv = (p.transpose(-1, -2) @ go).unflatten(1, (k.shape[1], g)).sum(2)
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)


# ---------------------------------------------------------------------------------------
# The forward op
# ---------------------------------------------------------------------------------------


@torch.library.custom_op("spa::attention", mutates_args=())
def attention(
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
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """SPA on ``[B, H, N, D]`` inputs. Returns ``(out, lse, block_index, block_count)``.

    ``window < 0`` means no sliding window. ``config`` is :func:`config_to_str`.
    """
    cfg = config_from_str(config)
    b, hq, nq, _ = q.shape
    nk = k.shape[2]
    try:
        vis = _visibility(nq, nk, attn_mask, key_valid, causal, offset, window, check_bias=True)
    except BiasMaskError:
        out, lse = _dense_with_bias(q, k, v, attn_mask, scale)
        index, count = _empty_selection(q, k, attn_mask, key_valid, causal, offset, window, cfg)
        return out, lse, index, count
    projector = None if pq is None else Projector(pq, pk)
    if _use_kernels(q, k, v, vis, cfg, scale):
        out, lse, index, count = _codegen().spa_forward(q, k, v, vis, scale, cfg, projector)
        return out, lse, index, count
    valid = reference.valid_keys(vis, b, k.shape[1], cfg.block_size, q.device)
    pooled = reference.pool_for(cfg, k, v, valid)
    sel = reference.select_blocks(q, pooled, vis, valid, scale, cfg, projector)
    out, lse = reference.sparse_attention(q, k, v, sel, pooled, vis, valid, scale, cfg.fill, cfg.block_size)
    return out.contiguous(), lse.to(torch.float32).contiguous(), sel.index, sel.count


def _selection_shape(q, k, attn_mask, key_valid, causal, offset, window, cfg):
    b, hq, nq, _ = q.shape
    nk = k.shape[2]
    vis = _visibility(nq, nk, attn_mask, key_valid, causal, offset, window, check_bias=False)
    hs = k.shape[1] if cfg.selection == "group" else hq
    return (b, hs, num_blocks(nq, cfg.block_size), max_selected(nq, nk, vis, cfg))


def _empty_selection(q, k, attn_mask, key_valid, causal, offset, window, cfg):
    shape = _selection_shape(q, k, attn_mask, key_valid, causal, offset, window, cfg)
    index = torch.full(shape, -1, dtype=torch.int32, device=q.device)
    return index, torch.zeros(shape[:3], dtype=torch.int32, device=q.device)


@attention.register_fake
def _attention_fake(q, k, v, attn_mask, key_valid, pq, pk, scale, causal, offset, window, config):
    cfg = config_from_str(config)
    shape = _selection_shape(q, k, attn_mask, key_valid, causal, offset, window, cfg)
    out = q.new_empty((*q.shape[:3], v.shape[-1]))
    lse = q.new_empty(q.shape[:3], dtype=torch.float32)
    index = q.new_empty(shape, dtype=torch.int32)
    count = q.new_empty(shape[:3], dtype=torch.int32)
    return out, lse, index, count


# ---------------------------------------------------------------------------------------
# The backward op
# ---------------------------------------------------------------------------------------


@torch.library.custom_op("spa::attention_backward", mutates_args=())
def attention_backward(
    grad_out: Tensor,
    grad_lse: Optional[Tensor],
    q: Tensor,
    k: Tensor,
    v: Tensor,
    out: Tensor,
    lse: Tensor,
    index: Tensor,
    count: Tensor,
    attn_mask: Optional[Tensor],
    key_valid: Optional[Tensor],
    scale: float,
    causal: bool,
    offset: int,
    window: int,
    config: str,
) -> tuple[Tensor, Tensor, Tensor]:
    """Exact gradients of :func:`attention` with the selection ``(index, count)`` held fixed."""
    cfg = config_from_str(config)
    nq, nk = q.shape[2], k.shape[2]
    if _is_bias(attn_mask):
        return _dense_with_bias_backward(grad_out, grad_lse, q, k, v, attn_mask, scale)
    vis = _visibility(nq, nk, attn_mask, key_valid, causal, offset, window, check_bias=True)
    if _use_kernels(q, k, v, vis, cfg, scale):
        return _codegen().spa_backward(grad_out, q, k, v, out, lse, index, count, vis, scale, cfg, grad_lse=grad_lse)
    valid = reference.valid_keys(vis, q.shape[0], k.shape[1], cfg.block_size, q.device)
    sel = reference.Selection(index=index, count=count)
    return reference.sparse_attention_backward(
        grad_out, grad_lse, q, k, v, sel, vis, valid, scale, cfg.fill, cfg.block_size
    )


@attention_backward.register_fake
def _attention_backward_fake(grad_out, grad_lse, q, k, v, *rest):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _setup_context(ctx, inputs, output):
    q, k, v, attn_mask, key_valid, pq, pk, scale, causal, offset, window, config = inputs
    out, lse, index, count = output
    ctx.save_for_backward(q, k, v, out, lse, index, count, attn_mask, key_valid)
    ctx.args = (scale, causal, offset, window, config)
    ctx.mark_non_differentiable(index, count)
    ctx.set_materialize_grads(False)  # an unused lse then gives grad_lse None: no work for it


def _backward(ctx, grad_out, grad_lse, _grad_index, _grad_count):
    q, k, v, out, lse, index, count, attn_mask, key_valid = ctx.saved_tensors
    scale, causal, offset, window, config = ctx.args
    if grad_out is None:
        grad_out = torch.zeros_like(ctx.saved_tensors[3])
    dq, dk, dv = attention_backward(
        grad_out.contiguous(), grad_lse, q, k, v, out, lse, index, count, attn_mask, key_valid,
        scale, causal, offset, window, config,
    )
    return dq, dk, dv, None, None, None, None, None, None, None, None, None


torch.library.register_autograd("spa::attention", _backward, setup_context=_setup_context)


def default_scale(head_dim) -> float:
    return 1.0 / math.sqrt(head_dim)
