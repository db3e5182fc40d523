"""Entry points of the SPA kernels: what ``spa_compile.ops`` calls on CUDA.

``spa_forward``  pool -> project -> select -> sparse attention with fill;
``spa_backward`` delta -> dq -> landmark gradients -> dk/dv (selection held fixed).
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..budget import max_selected
from ..config import SPAConfig
from ..projector import Projector
from ..visibility import Visibility
from . import autotune
from .bitmap import build_bitmap
from .blockinfo import BlockInfo, block_info
from .pooling import pool_fused, pool_kv, pool_q, pool_qkv
from .bound_selection import bound_select, key_range
from .fine_selection import fine_selection
from .selection import select, topk_capacity
from .sparse_backward import launch_delta, launch_dkdv, launch_dq, launch_landmark, landmark_splits, reverse_map
from .sparse_forward import launch_forward
from .switches import env_switch

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
MAX_HEAD_DIM = 256
MAX_BLOCK = 128


def unsupported_reason(q: Tensor, k: Tensor, v: Tensor, vis: Visibility, cfg: SPAConfig,
                       scale: float | None = None) -> str | None:
    """None when the kernels handle this call; else a short reason (the op then runs the reference)."""
    if scale is not None and scale == 0:
        return "scale 0 (the forward's softmax takes the row max of unscaled logits)"
    for name, x in (("q", q), ("k", k), ("v", v)):
        if x.dim() != 4:
            return f"{name} is not 4-D"
    if vis.mask is not None:
        return "a boolean/additive mask (the kernels take causal, offset, window and key padding only)"
    if q.dtype not in SUPPORTED_DTYPES:
        return f"dtype {q.dtype} (supported: float16, bfloat16, float32)"
    if not (q.dtype == k.dtype == v.dtype):
        return "q, k and v have different dtypes"
    for name, x in (("q", q), ("k", k), ("v", v)):
        if x.device.type != "cuda":
            return f"{name} is on {x.device.type}, the kernels need CUDA"
    b, hq, nq, d = q.shape
    hkv, nk = k.shape[1], k.shape[2]
    if nq == 0 or nk == 0 or b == 0:
        return "an empty sequence or batch"
    if hq % hkv:
        return f"q heads ({hq}) not a multiple of kv heads ({hkv})"
    if d > MAX_HEAD_DIM or v.shape[-1] > MAX_HEAD_DIM or d < 1:
        return f"head dim {max(d, v.shape[-1])} > {MAX_HEAD_DIM}"
    if cfg.block_size > MAX_BLOCK:
        return f"block_size {cfg.block_size} > {MAX_BLOCK}"
    if vis.key_valid is not None and tuple(vis.key_valid.shape[-1:]) != (nk,):
        return "key_valid does not have Nk entries"
    if vis.window is not None and vis.window < 0:
        return "a negative window"
    return None


def _size_class(info: BlockInfo) -> str:
    """Coarse length class of a tuning key: short sequences fill the card differently."""
    n = max(info.nq, info.nk)
    for limit, name in ((8192, "n<=8k"), (32768, "n<=32k"), (65536, "n<=64k")):
        if n <= limit:
            return name
    return "n>64k"


ROW_CLASS_BLOCKS = 64  # index rows up to this many blocks tune apart from longer ones


def _row_class(index: Tensor) -> str:
    """Row-length class of a tuning key: a top-k of 32 at 128K is a few dozen blocks a program
    scattered over 2,048 (K/V reads from HBM dominate), density 0.2 there is hundreds (neighbour
    programs share K/V through L2); one tuned config for both served one of them."""
    return "k<=64" if index.shape[-1] <= ROW_CLASS_BLOCKS else "k>64"


def _attention_config(kernel, q, k, v, hs, info, fill, run, index):
    b, hq, _, d = q.shape
    hkv = k.shape[1]
    g = hq // hkv
    cands = autotune.attention_candidates(g, info.block, d, v.shape[-1], q.dtype, hs == hkv and g > 1,
                                          backward=kernel != "fwd", fill=fill)
    key = (d, v.shape[-1], str(q.dtype).replace("torch.", ""), info.block, g, hs == hkv, info.causal,
           info.has_window, info.key_valid is not None, fill, _size_class(info), _row_class(index))
    return autotune.pick(kernel, key, cands, run, q.device)


def _key_block_config(kernel, q, k, v, hs, info, fill, run):
    b, hq, _, d = q.shape
    g = hq // k.shape[1]
    cands = autotune.key_block_candidates(info.block, d, v.shape[-1], q.dtype)
    key = (d, v.shape[-1], str(q.dtype).replace("torch.", ""), info.block, g, hs == k.shape[1], info.causal,
           info.has_window, info.key_valid is not None, fill, _size_class(info))
    return autotune.pick(kernel, key, cands, run, q.device)


def selection_stage(q, kbar, info: BlockInfo, scale, cfg, projector, kmax, k=None, qbar=None):
    """Pool q, project, score and select: (index, count). The arithmetic of
    reference.select_blocks: project each head, then ("group" selection) sum the query heads of
    a group, which the selection kernel does itself (one torch launch fewer).

    block_score "bound" / "hybrid" (``k`` is then needed for the key ranges): the projector pass
    keeps the forced blocks and ceil(k/2) ("hybrid") or none ("bound"), then bound_selection adds
    the rest by the key-range bound. ``qbar``: the query means when already pooled (``pool_qkv``)."""
    hkv = kbar.shape[1]
    qbar = pool_q(q, cfg.block_size) if qbar is None else qbar
    proj = projector or Projector.identity(hkv, qbar.shape[-1])
    qp, kp = proj.project_queries(qbar), proj.project_keys(kbar)
    group = qp.shape[1] // hkv if cfg.selection == "group" else 1
    if cfg.block_score == "projector":
        return select(qp, kp, info, scale, cfg, kmax, group=group)
    if k is None:
        raise ValueError(f"selection_stage: block_score={cfg.block_score!r} needs the keys k (their per-channel "
                         f"ranges): pass k=, or use block_score='projector'")
    first_cfg = cfg if cfg.block_score == "hybrid" else cfg.replace(topk=0, min_blocks=None, max_blocks=None)
    index1, count1 = select(qp, kp, info, scale, first_cfg, kmax, group=group, half=cfg.block_score == "hybrid")
    kmx, kmn = key_range(k, info)
    k2_cap = topk_capacity(info.nkb, cfg)
    k2_cap = k2_cap // 2 if cfg.block_score == "hybrid" else k2_cap  # k2 = k - ceil(k/2)
    return bound_select(q, kmx, kmn, info, scale, cfg, index1, count1, k2_cap)


# "1": the sparse forward runs the experimental Gluon kernel (codegen/gluon_forward.py: Hopper;
# on an H200 0.90-1.05x the Triton kernel) where it takes the shape, else the Triton kernel. Off by default.
GLUON_ENV = "SPA_GLUON_FORWARD"


def gluon_forward_enabled() -> bool:
    """$SPA_GLUON_FORWARD ("0" / "1", default "0")."""
    return env_switch(GLUON_ENV, False)


def sparse_stage(q, k, v, kbar, vbar, info: BlockInfo, index, count, scale, fill: bool):
    """The sparse attention kernel alone (exact part + optional fill): (out, lse)."""
    if gluon_forward_enabled():
        from . import gluon_forward  # Gluon (triton >= 3.6): imported only when asked for

        if gluon_forward.supported(q, k, v, info, fill) is None:
            lm = (kbar, vbar) if fill else (None, None)
            return gluon_forward.gluon_forward(q, k, v, info, index, count, scale, *lm)
    if kbar is None:  # no fill: the landmark pointers are never read
        kbar, vbar = k, v
    out = torch.empty(*q.shape[:3], v.shape[-1], device=q.device, dtype=q.dtype)
    lse = torch.empty(q.shape[:3], device=q.device, dtype=torch.float32)
    hs = index.shape[1]
    sel = build_bitmap(index, count, info.nkb) if fill else count

    def run(c):
        return launch_forward(q, k, v, kbar, vbar, info, index, count, scale, fill, c, out, lse, sel)

    config = _attention_config("fwd", q, k, v, hs, info, fill, run, index)
    return run(config)


def pool_means(q: Tensor, k: Tensor, v: Tensor, info: BlockInfo, cfg: SPAConfig, values: bool = True):
    """(qbar or None, kbar, vbar, kbar_lp, vbar_lp): the key and value means, with the query means
    in the same launch where ``pooling.pool_fused`` asks for it (the default; SPA_POOL_FUSED=0: apart) and the
    selection reads them (not block_score "fine"); qbar None: ``selection_stage`` pools them.
    ``values=False``: the key means alone (the selection's part, as pool_kv)."""
    if pool_fused() and cfg.block_score != "fine" and q.shape[-1] == k.shape[-1]:
        return pool_qkv(q, k, v, info, values=values)
    return (None,) + pool_kv(k, v, info, values=values)


def spa_forward(q: Tensor, k: Tensor, v: Tensor, vis: Visibility, scale: float, cfg: SPAConfig,
                projector: Projector | None):
    """out [B,Hq,Nq,Dv] (q.dtype), lse [B,Hq,Nq] f32, index [B,Hs,NQB,kmax] i32, count [B,Hs,NQB] i32."""
    b, hq, nq, d = q.shape
    nk = k.shape[2]
    info = block_info(vis, b, nq, nk, cfg.block_size, q.device)
    kmax = int(max_selected(nq, nk, vis, cfg))
    qbar, kbar, vbar, kbar_lp, vbar_lp = pool_means(q, k, v, info, cfg)
    if cfg.block_score == "fine":
        index, count = fine_selection(q, k, vis, scale, cfg, projector)  # PyTorch, no kernel yet
    else:
        index, count = selection_stage(q, kbar, info, scale, cfg, projector, kmax, k, qbar)
    out, lse = sparse_stage(q, k, v, kbar_lp, vbar_lp, info, index, count, scale, cfg.fill == "landmark")
    return out, lse, index, count


def spa_backward(grad_out: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, index: Tensor,
                 count: Tensor, vis: Visibility, scale: float, cfg: SPAConfig, deterministic: bool = False,
                 grad_lse: Tensor | None = None):
    """dq, dk, dv with the selection held fixed (paths through kbar/vbar included).

    Always deterministic: no atomics, every gradient element is written by one program
    (``deterministic`` is accepted for the op's signature). ``grad_lse`` (the gradient of
    the returned lse, optional) enters as ``delta - grad_lse``: d lse / d logit = p.
    """
    b, hq, nq, d = q.shape
    nk = k.shape[2]
    fill = cfg.fill == "landmark"
    info = block_info(vis, b, nq, nk, cfg.block_size, q.device)
    grad_out = grad_out if grad_out.stride(-1) == 1 else grad_out.contiguous()
    q, k, v = (x if x.stride(-1) == 1 else x.contiguous() for x in (q, k, v))
    out = out if out.stride(-1) == 1 else out.contiguous()
    lse = lse.contiguous()
    index, count = index.contiguous(), count.contiguous()
    hs = index.shape[1]
    _, _, kbar, vbar = pool_kv(k, v, info)
    delta = launch_delta(out, grad_out)
    if grad_lse is not None:
        delta -= torch.where(torch.isfinite(lse), grad_lse.float(), torch.zeros_like(delta))
    rev_off, rev_i = reverse_map(index, count, info.nkb)

    dq = torch.empty_like(q)
    sel = build_bitmap(index, count, info.nkb) if fill else count

    def run_dq(c):
        return launch_dq(q, k, v, grad_out, lse, delta, kbar, vbar, info, index, count, scale, fill, c, dq, sel)

    run_dq(_attention_config("dq", q, k, v, hs, info, fill, run_dq, index))

    dkbar = dvbar = None
    if fill:
        _, nsplit = landmark_splits(info.nqb)
        bufs = (torch.empty(nsplit, b, hq, info.nkb, d, device=q.device, dtype=torch.float32),
                torch.empty(nsplit, b, hq, info.nkb, v.shape[-1], device=q.device, dtype=torch.float32))

        def run_lm(c):
            return launch_landmark(q, grad_out, lse, delta, kbar, vbar, info, rev_off, rev_i, hs, scale, c, bufs)

        dkbar, dvbar = run_lm(_key_block_config("landmark", q, k, v, hs, info, fill, run_lm))

    dk, dv = torch.empty_like(k), torch.empty_like(v)

    def run_dkdv(c):
        return launch_dkdv(q, k, v, grad_out, lse, delta, dkbar, dvbar, info, rev_off, rev_i, hs, scale, fill, c,
                           (dk, dv))

    run_dkdv(_key_block_config("dkdv", q, k, v, hs, info, fill, run_dkdv))
    return dq, dk, dv
