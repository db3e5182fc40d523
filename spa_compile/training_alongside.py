"""Keep fitting the projectors while the model trains under the SPA backend.

    trainer = ProjectorTrainer("projectors.safetensors", sample_blocks=2)   # starts from the file if it exists
    model = torch.compile(model, backend="spa", options={"mode": "spa", "projectors": trainer.path})
    for batch in data:
        loss = loss_fn(model(batch)); loss.backward(); opt.step(); opt.zero_grad()
        trainer.step()                 # one Adam step on the projectors
    trainer.save()                     # the file the next run (or inference) loads

How it works. When the backend attaches projectors from a path under which a trainer is
registered, it attaches the trainer's own tensors (so its in-place updates are seen by the
compiled graph at the next call, without recompiling) and puts a distillation tap,
``torch.ops.spa.projector_distill``, beside each SPA site. At every forward (every
``every``-th call of a site) the tap samples ``sample_blocks`` query blocks, computes their
dense attention rows against all keys (``sample_blocks * Bq x Nk`` logits, never Nq x Nk), the
true block mass ``A`` and the KL loss of SPEC.md for the current projector, and adds the
loss's gradient with respect to ``Pq``/``Pk`` to the trainer's gradient. Everything in it is
detached from the model: the model's own gradients are untouched. Its cost is about
``sample_blocks / NQB`` of one dense attention forward per site: a small fraction of the step.
"""

from __future__ import annotations

import itertools
import json
import os
import random
import warnings
from typing import Any, Optional

import torch
from torch import Tensor

from . import ops
from .calibrate import block_stats, valid_keys, visibility_from_args
from .config import SPAConfig
from .projector import Projector, distillation_grad
from .projector_file import (
    ProjectorFile, ProjectorFileError, SiteShape, load_projectors, register_live, save_projectors, unregister_live,
)
from .visibility import BiasMaskError, num_blocks

_TRAINERS: dict[int, "ProjectorTrainer"] = {}
_ids = itertools.count(1)


class ProjectorTrainer:
    """Projector parameters of every SPA site, fitted alongside the model's training.

    path:          projector file: loaded as the starting point if it exists, written by :meth:`save`;
                   pass it as ``options={"projectors": trainer.path}`` (or ``**trainer.options()``).
    rank:          ``r`` for sites the file does not have (default ``D``: identity start).
    lr:            Adam learning rate of the projectors.
    sample_blocks: query blocks sampled per site and call for the auxiliary loss.
    every:         distil on every n-th call of a site only (1: every call).
    loss_blocks:   "visible" (SPEC.md) or "selectable" (leave the forced blocks out of the loss).

    The taps run on every forward of the compiled model (not under ``torch.inference_mode``):
    :meth:`pause` them around evaluation passes, :meth:`resume` after.
    """

    def __init__(self, path: str | os.PathLike, *, rank: int | None = None, lr: float = 1e-3,
                 sample_blocks: int = 2, every: int = 1, loss_blocks: str = "visible", seed: int = 0):
        if sample_blocks < 1 or every < 1:
            raise ValueError("sample_blocks and every must be >= 1")
        self.path = os.fspath(path)
        self.rank, self.lr, self.sample_blocks, self.every = rank, lr, int(sample_blocks), int(every)
        self.loss_blocks = loss_blocks
        self.enabled = True
        self.id = next(_ids)
        self._rng = random.Random(seed)
        self._start: ProjectorFile | None = load_projectors(self.path) if os.path.exists(self.path) else None
        self.params: dict[str, tuple[torch.nn.Parameter, torch.nn.Parameter]] = {}
        self.shapes: dict[str, SiteShape] = {}
        self._calls: dict[str, int] = {}
        self._loss: dict[str, list[float]] = {}
        self._warned_fine = False
        self.block_size: int | None = None if self._start is None else self._start.block_size
        self.config: dict[str, Any] = {} if self._start is None else dict(self._start.config)
        self.optimizer: torch.optim.Optimizer | None = None
        self.steps = 0
        _TRAINERS[self.id] = self
        register_live(self.path, self)

    # -- what the backend asks for ---------------------------------------------------------
    def file_view(self) -> ProjectorFile | None:
        return self._start

    def tensors_for(self, site: str, shape: SiteShape, device, cfg: SPAConfig | None = None) -> tuple[Tensor, Tensor]:
        """The live ``(Pq, Pk)`` of ``site`` (created on first use), sharing the parameters' storage."""
        if cfg is not None:
            if self.block_size is not None and self.block_size != cfg.block_size:
                raise ProjectorFileError(
                    f"the projector trainer for {self.path!r} fits block_size={self.block_size}, but this "
                    f"model is compiled with block_size={cfg.block_size}"
                )
            self.block_size = cfg.block_size
            if not self.config:
                self.config = json.loads(ops.config_to_str(cfg))
        if site not in self.params:
            start = None if self._start is None else self._start.projectors.get(site)
            if start is None:
                start = Projector.eye(shape.hkv, shape.d, self.rank)
            pq = torch.nn.Parameter(start.pq.detach().to(device, torch.float32).clone())
            pk = torch.nn.Parameter(start.pk.detach().to(device, torch.float32).clone())
            self.params[site] = (pq, pk)
            self.shapes[site] = shape
            if self.optimizer is None:
                self.optimizer = torch.optim.Adam([pq, pk], lr=self.lr)
            else:
                self.optimizer.add_param_group({"params": [pq, pk]})
        elif self.shapes[site] != shape:
            raise ProjectorFileError(f"site {site!r} came back with shapes {shape}, the trainer has {self.shapes[site]}")
        pq, pk = self.params[site]
        return pq.detach(), pk.detach()

    # -- the distillation tap ----------------------------------------------------------------
    def _should_run(self, site: str) -> bool:
        n = self._calls.get(site, 0)
        self._calls[site] = n + 1
        return self.enabled and n % self.every == 0 and not torch.is_inference_mode_enabled()

    def distill(self, site: str, q: Tensor, k: Tensor, v: Tensor, attn_mask, key_valid, scale: float,
                causal: bool, offset: int, window: int, cfg: SPAConfig) -> float | None:
        """One auxiliary-loss evaluation on sampled query blocks; adds to the projector gradients."""
        if site not in self.params:
            return None
        try:
            vis = visibility_from_args(q, k, attn_mask, key_valid, causal, offset, window)
        except BiasMaskError:
            return None
        nqb = num_blocks(q.shape[2], cfg.block_size)
        blocks = sorted(self._rng.sample(range(nqb), min(self.sample_blocks, nqb)))
        if cfg.block_score == "fine":  # the closed-form gradient is the block-mean score's
            if not self._warned_fine:
                self._warned_fine = True
                warnings.warn("training alongside fits the projectors for the pooled block-mean score; with "
                              "block_score='fine' they are applied to row and sub-block means: fit those with "
                              "spa_compile.calibrate(config={'block_score': 'fine', ...}) instead", stacklevel=2)
            cfg = cfg.replace(block_score="projector")
        with torch.no_grad():
            st = block_stats(q.detach(), k.detach(), v.detach(), vis, float(scale), cfg, blocks=blocks)
        target, keep = st.loss_target(self.loss_blocks)
        pq, pk = self.params[site]
        # autograd is off inside a custom op's kernel: the gradient is in closed form
        loss, ga, gb = distillation_grad(Projector(pq.detach(), pk.detach()), st.qsel, st.kbar, float(scale),
                                         target, keep)
        with torch.no_grad():
            for p, g in ((pq, ga), (pk, gb)):
                if p.grad is None:
                    p.grad = g.clone()
                else:
                    p.grad.add_(g)
        value = float(loss)
        self._loss.setdefault(site, []).append(value)
        return value

    # -- the training loop's side ------------------------------------------------------------
    def step(self) -> dict[str, float]:
        """One optimizer step on the accumulated projector gradients; returns the mean auxiliary
        loss per site since the last step (empty when no tap ran)."""
        losses = {site: sum(v) / len(v) for site, v in self._loss.items() if v}
        self._loss.clear()
        if self.optimizer is not None and any(p.grad is not None for pair in self.params.values() for p in pair):
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
            self.steps += 1
        return losses

    def pause(self) -> None:
        self.enabled = False

    def resume(self) -> None:
        self.enabled = True

    def options(self, **options: Any) -> dict[str, Any]:
        """``options=`` for ``torch.compile(..., backend="spa")`` with this trainer's path."""
        return {**options, "projectors": self.path}

    def projector_file(self) -> ProjectorFile:
        projectors = {site: Projector(pq.detach().cpu().clone(), pk.detach().cpu().clone())
                      for site, (pq, pk) in self.params.items()}
        shapes = dict(self.shapes)
        if self._start is not None:  # sites this process has not seen keep their fitted state
            for site, proj in self._start.projectors.items():
                projectors.setdefault(site, proj)
                shapes.setdefault(site, self._start.shapes[site])
        if self.block_size is None:
            raise ProjectorFileError("the trainer has seen no SPA site yet: nothing to save")
        report = {"trained_alongside_steps": self.steps}
        return ProjectorFile(projectors, shapes, self.block_size, self.config, report)

    def save(self, path: str | os.PathLike | None = None) -> str:
        """Write the projectors (to ``path``, default the trainer's own path)."""
        return save_projectors(self.projector_file(), path or self.path)

    def close(self) -> None:
        """Unregister: later compilations read the file at ``path`` again."""
        _TRAINERS.pop(self.id, None)
        unregister_live(self.path, self)

    def __enter__(self) -> "ProjectorTrainer":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# ---------------------------------------------------------------------------------------
# The tap op and the graph insertion (called by passes.attach_projectors)
# ---------------------------------------------------------------------------------------


@torch.library.custom_op("spa::projector_distill", mutates_args=("calls",))
def projector_distill(
    q: Tensor, k: Tensor, v: Tensor, attn_mask: Optional[Tensor], key_valid: Optional[Tensor],
    pq: Tensor, pk: Tensor, calls: Tensor, scale: float, causal: bool, offset: int, window: int,
    config: str, site: str, trainer: int,
) -> None:
    """Auxiliary projector loss of one SPA site (see the module docstring); counts its calls."""
    calls.add_(1)
    tr = _TRAINERS.get(trainer)
    if tr is None or not tr._should_run(site):
        return
    tr.distill(site, q, k, v, attn_mask, key_valid, scale, causal, offset, window, ops.config_from_str(config))


@projector_distill.register_fake
def _projector_distill_fake(q, k, v, attn_mask, key_valid, pq, pk, calls, scale, causal, offset, window,
                            config, site, trainer) -> None:
    return None


def insert_distill_tap(gm: torch.fx.GraphModule, node: torch.fx.Node, trainer: ProjectorTrainer, site: str) -> None:
    """Put a ``spa.projector_distill`` call before the SPA op ``node`` (its q, k, v detached)."""
    from .passes.attach_projectors import PK_ARG, PQ_ARG, _register, site_shape

    _, device = site_shape(node)
    name = _register(gm, "_spa_distill_calls", torch.zeros((), dtype=torch.int64, device=device))
    a = node.args
    graph = gm.graph
    with graph.inserting_before(node):
        calls = graph.get_attr(name)
        q, k, v = (graph.call_method("detach", (x,)) for x in a[:3])
        graph.call_function(
            torch.ops.spa.projector_distill.default,
            (q, k, v, a[3], a[4], a[PQ_ARG], a[PK_ARG], calls, a[7], a[8], a[9], a[10], a[11], site, trainer.id),
        )


__all__ = ["ProjectorTrainer", "projector_distill", "insert_distill_tap"]
