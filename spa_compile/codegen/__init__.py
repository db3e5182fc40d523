"""Fused Triton kernels for SPA (selection, sparse attention with landmark fill, backward).

Modules, one concern each: ``blockinfo`` (host-side block structure of a structured
visibility), ``pooling`` (block means), ``selection`` (projector scores + streaming
top-k), ``sparse_forward`` / ``sparse_backward`` (the attention kernels), ``autotune``
(launch configurations, cached per card), ``api`` (the entry points below).
"""

import os as _os

import torch as _torch

# Without a CUDA device, Triton kernels can only run in its interpreter, and Triton picks
# interpreter or compiler when a kernel is defined (at import): choose it before that.
if not _torch.cuda.is_available():
    _os.environ.setdefault("TRITON_INTERPRET", "1")

from .api import spa_backward, spa_forward, unsupported_reason

__all__ = ["spa_forward", "spa_backward", "unsupported_reason"]
