"""Host-side block structure of a structured visibility (no N x N tensor).

For structured visibility (causal with an offset, sliding window, key padding),
``valid[b, u]`` (SPEC.md: keys some query row may see) is

    key_valid[b, u] & (u <= Nq - 1 + offset if causal) & (u > offset - window if window)

and the block classification of SPEC.md needs, per key block ``j``, only

* ``n[b, j]``     number of valid keys (the landmark count),
* ``first[b, j]`` / ``last[b, j]``  first and last valid key of the block,
* ``cs[b, u]``    number of valid keys before ``u`` (prefix count, ``Nk + 1`` entries).

With them, for query block ``i`` with rows ``t0 .. t1 - 1``:

* ``j`` is visible  iff some valid key of ``j`` lies in ``[t0 + off - W + 1, t1 - 1 + off]``
  (a difference of two prefix counts: exact, also when ``key_valid`` has holes);
* ``j`` is fully visible iff ``n > 0``, ``last <= t0 + off`` (causal) and
  ``first > t1 - 1 + off - W`` (window): exact for any ``key_valid``.

Everything here is O(B * Nk) integer work done with torch ops on the device.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import torch
from torch import Tensor

from ..visibility import Visibility, num_blocks

EMPTY_FIRST = 2**30  # ``first`` of a block without valid keys
EMPTY_LAST = -(2**30)  # ``last`` of a block without valid keys


@dataclass
class BlockInfo:
    valid: Tensor  # [B, Nk] int8: valid keys
    key_valid: Tensor | None  # [B, Nk] int8 or None (no padding)
    n: Tensor  # [B, NKB] int32
    first: Tensor  # [B, NKB] int32
    last: Tensor  # [B, NKB] int32
    cs: Tensor  # [B, Nk + 1] int32
    nq: int
    nk: int
    nqb: int
    nkb: int
    block: int
    causal: bool
    offset: int
    window: int | None

    @property
    def has_window(self) -> bool:
        return self.window is not None

    @property
    def win(self) -> int:
        return 0 if self.window is None else int(self.window)


def all_keys_valid(info: BlockInfo) -> bool:
    """Whether every key below Nk is valid (``valid``'s definition above), from the geometry alone
    (no device read): no key padding, (causal) the last query row sees the last key, and (window)
    the first row's window reaches key 0."""
    if info.key_valid is not None:
        return False
    if info.causal and info.nq - 1 + info.offset < info.nk - 1:
        return False
    return not info.has_window or info.offset - info.win < 0


# Without key padding the summary depends on the shapes and flags alone: it is kept per key
# (about ten small launches saved per op call; the kernels only read these tensors).
_CACHE: OrderedDict = OrderedDict()
CACHE_SIZE = 16


def _capturing(device) -> bool:
    return torch.device(device).type == "cuda" and torch.cuda.is_current_stream_capturing()


def block_info(vis: Visibility, batch: int, nq: int, nk: int, block: int, device) -> BlockInfo:
    """The per-key-block summary of ``vis`` that every kernel reads."""
    if vis.mask is not None or vis.key_valid is not None or _capturing(device):
        return _block_info(vis, batch, nq, nk, block, device)
    key = (batch, nq, nk, block, bool(vis.causal), int(vis.offset), vis.window, str(torch.device(device)))
    info = _CACHE.get(key)
    if info is None:
        info = _CACHE[key] = _block_info(vis, batch, nq, nk, block, device)
        while len(_CACHE) > CACHE_SIZE:
            _CACHE.popitem(last=False)
    else:
        _CACHE.move_to_end(key)
    return info


def _block_info(vis: Visibility, batch: int, nq: int, nk: int, block: int, device) -> BlockInfo:
    if vis.mask is not None:
        raise ValueError("block_info needs a structured visibility (mask None)")
    nkb = num_blocks(nk, block)
    u = torch.arange(nk, device=device)
    if vis.key_valid is not None:
        kv = vis.key_valid.to(device=device, dtype=torch.bool)
        if kv.dim() == 1:
            kv = kv[None]
        kv = kv.expand(batch, nk)
        valid = kv.clone()
    else:
        kv = None
        valid = torch.ones(batch, nk, dtype=torch.bool, device=device)
    if vis.causal:
        valid &= (u <= nq - 1 + vis.offset)[None]
    if vis.window is not None:
        valid &= (u > vis.offset - vis.window)[None]
    padded = torch.nn.functional.pad(valid, (0, nkb * block - nk), value=False).view(batch, nkb, block)
    pos = torch.arange(nkb * block, device=device, dtype=torch.int32).view(1, nkb, block)
    n = padded.sum(-1, dtype=torch.int32)
    first = torch.where(padded, pos, torch.full_like(pos, EMPTY_FIRST)).amin(-1)
    last = torch.where(padded, pos, torch.full_like(pos, EMPTY_LAST)).amax(-1)
    cs = torch.zeros(batch, nk + 1, dtype=torch.int32, device=device)
    cs[:, 1:] = valid.cumsum(1, dtype=torch.int32)
    return BlockInfo(
        valid=valid.to(torch.int8).contiguous(),
        key_valid=None if kv is None else kv.to(torch.int8).contiguous(),
        n=n.contiguous(),
        first=first.to(torch.int32).contiguous(),
        last=last.to(torch.int32).contiguous(),
        cs=cs,
        nq=nq,
        nk=nk,
        nqb=num_blocks(nq, block),
        nkb=nkb,
        block=block,
        causal=bool(vis.causal),
        offset=int(vis.offset),
        window=None if vis.window is None else int(vis.window),
    )
