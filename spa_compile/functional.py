"""``spa_compile.spa_attention``: a drop-in for ``F.scaled_dot_product_attention``."""

from __future__ import annotations

import math
import warnings

import torch
import torch.nn.functional as F
from torch import Tensor

from . import ops  # noqa: F401  (registers torch.ops.spa.*)
from .config import SPAConfig
from .projector import Projector
from .reference import canonical_inputs
from .visibility import Visibility


def spa_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    attn_mask: Tensor | None = None,
    is_causal: bool = False,
    scale: float | None = None,
    enable_gqa: bool = False,
    *,
    config: SPAConfig | None = None,
    projector: Projector | None = None,
    return_lse: bool = False,
    dropout_p: float = 0.0,
    visibility: Visibility | None = None,
):
    """Sparse Projected Attention with SDPA's arguments (SPEC.md).

    Runs the Triton kernels on CUDA where they support the call, the reference
    otherwise; differentiable in q, k, v with the selection held fixed. With
    ``return_lse`` it returns ``(out, lse)``. ``visibility`` replaces
    ``attn_mask``/``is_causal`` by a structured predicate (causal offset, sliding
    window, key padding).

    SPA does not implement dropout: with ``dropout_p > 0`` the call runs dense
    SDPA and warns (SPEC.md, Dropout).
    """
    cfg = config or SPAConfig()
    if dropout_p > 0.0:
        if return_lse:
            raise ValueError("return_lse=True needs dropout_p=0: SPA does not implement dropout")
        warnings.warn("spa_attention: dropout_p > 0 is not supported by SPA; running dense SDPA", stacklevel=2)
        return F.scaled_dot_product_attention(
            q, k, v, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal, scale=scale, enable_gqa=enable_gqa
        )
    squeeze = q.dim() == 3
    q, k, v = canonical_inputs(q, k, v, enable_gqa)
    if visibility is not None:
        if attn_mask is not None or is_causal:
            raise ValueError("pass either visibility= or attn_mask/is_causal, not both")
        attn_mask, key_valid = visibility.mask, visibility.key_valid
        causal, offset = visibility.causal, visibility.offset
        window = -1 if visibility.window is None else visibility.window
    else:
        if attn_mask is not None and is_causal:
            raise ValueError("attn_mask and is_causal=True were both given; SDPA rejects this too")
        key_valid, causal, offset, window = None, bool(is_causal), 0, -1
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    pq, pk = (None, None) if projector is None else (projector.pq, projector.pk)
    out, lse, _, _ = torch.ops.spa.attention(
        q, k, v, attn_mask, key_valid, pq, pk, scale, causal, offset, window, ops.config_to_str(cfg)
    )
    if squeeze:
        out, lse = out.squeeze(1), lse.squeeze(1)
    return (out, lse) if return_lse else out
