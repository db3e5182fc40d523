"""Projector files: the learned ``Pq``/``Pk`` of every attention site, in safetensors.

Layout. One pair of tensors per site, keyed by the site name the backend gives it
(``model.layers.3.self_attn``): ``"<site>/pq"`` and ``"<site>/pk"``, float32
``[Hkv, D, r]``. The safetensors metadata (strings) holds

- ``format``: ``"spa_compile.projectors"``, ``version``: ``"1"``;
- ``block_size``: the block size the projectors were fitted for;
- ``rank``: ``r`` (or ``"mixed"`` when sites differ);
- ``config``: JSON of the SPA config they were fitted for (the op fields);
- ``sites``: JSON ``{site: {"hq", "hkv", "d", "dv", "rank"}}``: the attention shapes;
- ``fingerprint``: a digest of those shapes (what the file fits);
- ``report``: optional JSON summary of the calibration (recall before / after).

Loading checks a file against the sites of a graph (:func:`match_sites`): a different
block size or a site whose shapes differ is an error (:class:`ProjectorFileError`);
sites missing from the file run on with the identity projector and entries for sites
the graph does not have are ignored, each with one warning listing them
(:class:`ProjectorWarning`).

Training alongside (:mod:`spa_compile.training_alongside`) registers a *live* source
under the file's path: the backend then attaches the trainer's tensors (updated in place
by its optimizer) instead of reading the file.
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from dataclasses import dataclass, field
from typing import Any, Mapping, Protocol

import torch
from torch import Tensor

from .projector import Projector

FORMAT = "spa_compile.projectors"
VERSION = "1"


class ProjectorFileError(ValueError):
    """A projector file that cannot be used for this model or config."""


class ProjectorWarning(UserWarning):
    """A projector file that fits only partly: the listed sites run with the identity projector."""


@dataclass(frozen=True)
class SiteShape:
    """The attention shapes of one site, as the op sees them."""

    hq: int
    hkv: int
    d: int
    dv: int

    def to_dict(self) -> dict[str, int]:
        return {"hq": self.hq, "hkv": self.hkv, "d": self.d, "dv": self.dv}


def fingerprint(shapes: Mapping[str, SiteShape]) -> str:
    """A short digest of the model's attention sites and shapes."""
    text = "\n".join(f"{name}:{s.hq},{s.hkv},{s.d},{s.dv}" for name, s in sorted(shapes.items()))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


@dataclass
class ProjectorFile:
    """The content of a projector file: projectors by site plus what they were fitted for."""

    projectors: dict[str, Projector]
    shapes: dict[str, SiteShape]
    block_size: int
    config: dict[str, Any] = field(default_factory=dict)
    report: dict[str, Any] | None = None
    path: str | None = None

    @property
    def rank(self) -> int | str:
        ranks = {p.rank for p in self.projectors.values() if p.rank is not None}
        return ranks.pop() if len(ranks) == 1 else ("mixed" if ranks else "identity")

    @property
    def fingerprint(self) -> str:
        return fingerprint(self.shapes)

    def metadata(self) -> dict[str, str]:
        sites = {
            name: {**self.shapes[name].to_dict(), "rank": self.projectors[name].rank}
            for name in sorted(self.projectors)
        }
        meta = {
            "format": FORMAT,
            "version": VERSION,
            "block_size": str(self.block_size),
            "rank": str(self.rank),
            "config": json.dumps(self.config, sort_keys=True),
            "sites": json.dumps(sites, sort_keys=True),
            "fingerprint": self.fingerprint,
        }
        if self.report is not None:
            meta["report"] = json.dumps(self.report, sort_keys=True, default=float)
        return meta

    def save(self, path: str | os.PathLike) -> str:
        return save_projectors(self, path)


def _safetensors():
    try:
        import safetensors.torch as st
    except ImportError as e:  # pragma: no cover - safetensors comes with transformers
        raise ImportError("projector files need the safetensors package: pip install safetensors") from e
    return st


def save_projectors(pf: ProjectorFile, path: str | os.PathLike) -> str:
    """Write ``pf`` to ``path`` (safetensors); returns the path."""
    tensors: dict[str, Tensor] = {}
    for name, proj in sorted(pf.projectors.items()):
        if proj.pq is None:
            raise ProjectorFileError(f"site {name!r}: the tensor-free identity has nothing to save (use Projector.eye)")
        if "/" in name:
            raise ProjectorFileError(f"site name {name!r} contains '/', which separates the tensor suffix")
        tensors[f"{name}/pq"] = proj.pq.detach().to("cpu", torch.float32).contiguous()
        tensors[f"{name}/pk"] = proj.pk.detach().to("cpu", torch.float32).contiguous()
    path = os.fspath(path)
    tmp = f"{path}.tmp{os.getpid()}"
    _safetensors().save_file(tensors, tmp, metadata=pf.metadata())
    os.replace(tmp, path)  # readers never see a half-written file
    return path


def load_projectors(path: str | os.PathLike, device: str | torch.device = "cpu") -> ProjectorFile:
    """Read a projector file, checking its format and its internal consistency."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise ProjectorFileError(
            f"projector file {path!r} does not exist (calibrate one with spa_compile.calibrate(..., out=...) "
            "or `spa calibrate MODEL --output FILE`, or drop the 'projectors' option for the identity projector)"
        )
    _safetensors()  # a clear ImportError when the package is missing
    try:
        from safetensors import safe_open

        with safe_open(path, framework="pt", device=str(device)) as f:
            meta = dict(f.metadata() or {})
            tensors = {key: f.get_tensor(key) for key in f.keys()}
    except Exception as e:  # noqa: BLE001 - any parse failure is a bad file
        raise ProjectorFileError(f"{path!r} is not a readable safetensors file: {e}") from e
    if meta.get("format") != FORMAT:
        raise ProjectorFileError(
            f"{path!r} is not an SPA projector file (metadata format={meta.get('format')!r}, expected {FORMAT!r})"
        )
    if meta.get("version") != VERSION:
        raise ProjectorFileError(f"{path!r}: projector file version {meta.get('version')!r}, this spa_compile reads {VERSION!r}")
    try:
        block_size = int(meta["block_size"])
        config = json.loads(meta.get("config", "{}"))
        sites = json.loads(meta["sites"])
        report = json.loads(meta["report"]) if "report" in meta else None
    except (KeyError, ValueError) as e:
        raise ProjectorFileError(f"{path!r}: damaged metadata ({e})") from e
    projectors: dict[str, Projector] = {}
    shapes: dict[str, SiteShape] = {}
    names = {key.rsplit("/", 1)[0] for key in tensors}
    for name in sorted(names | set(sites)):
        pq, pk = tensors.get(f"{name}/pq"), tensors.get(f"{name}/pk")
        info = sites.get(name)
        if pq is None or pk is None or info is None:
            raise ProjectorFileError(
                f"{path!r}: site {name!r} is incomplete (pq: {pq is not None}, pk: {pk is not None}, "
                f"metadata: {info is not None})"
            )
        shape = SiteShape(int(info["hq"]), int(info["hkv"]), int(info["d"]), int(info["dv"]))
        want = (shape.hkv, shape.d, int(info["rank"]))
        for label, t in (("pq", pq), ("pk", pk)):
            if tuple(t.shape) != want:
                raise ProjectorFileError(
                    f"{path!r}: site {name!r} {label} has shape {tuple(t.shape)}, its metadata says {want} "
                    "([Hkv, D, rank])"
                )
        projectors[name] = Projector(pq.float(), pk.float())
        shapes[name] = shape
    pf = ProjectorFile(projectors, shapes, block_size, config, report, path)
    if meta.get("fingerprint") not in (None, pf.fingerprint):
        raise ProjectorFileError(f"{path!r}: the fingerprint does not match the sites it lists (damaged file?)")
    return pf


# ---------------------------------------------------------------------------------------
# Matching a file to the sites of a graph
# ---------------------------------------------------------------------------------------


@dataclass
class Match:
    """What :func:`match_sites` decided: the projectors to attach and what it warned about."""

    attach: dict[str, Projector]
    missing: list[str]  # SPA sites without an entry: identity projector
    extra: list[str]  # entries for sites this graph does not have: ignored


def match_sites(
    pf: ProjectorFile,
    spa_sites: Mapping[str, SiteShape],
    all_sites: list[str] | None = None,
    block_size: int | None = None,
    selection: str | None = None,
    warn: bool = True,
) -> Match:
    """Check a projector file against the SPA sites of one graph.

    Errors (:class:`ProjectorFileError`): a different block size; a site whose ``Hkv`` or
    ``D`` differ from the file's (the projector cannot be applied). Warnings
    (:class:`ProjectorWarning`, one per kind, listing the sites): SPA sites missing from
    the file (they run with the identity projector, the training-free default) and file
    entries for no site of this graph (ignored; with graph breaks, another graph may use them).
    """
    where = pf.path or "the projector file"
    if block_size is not None and pf.block_size != block_size:
        raise ProjectorFileError(
            f"{where} was fitted for block_size={pf.block_size}, but the config has block_size={block_size}: "
            f"recalibrate with block_size={block_size}, or run with block_size={pf.block_size}"
        )
    wrong = []
    attach: dict[str, Projector] = {}
    missing = []
    for name, shape in spa_sites.items():
        proj = pf.projectors.get(name)
        if proj is None:
            missing.append(name)
            continue
        fitted = pf.shapes[name]
        if (fitted.hkv, fitted.d) != (shape.hkv, shape.d) or (fitted.hq, fitted.dv) != (shape.hq, shape.dv):
            wrong.append(
                f"{name}: file has Hq={fitted.hq} Hkv={fitted.hkv} D={fitted.d} Dv={fitted.dv}, "
                f"the model has Hq={shape.hq} Hkv={shape.hkv} D={shape.d} Dv={shape.dv}"
            )
            continue
        attach[name] = proj
    if wrong:
        raise ProjectorFileError(
            f"{where} does not fit this model (fingerprint {pf.fingerprint}); wrong shapes at "
            f"{len(wrong)} site(s):\n  " + "\n  ".join(wrong) + "\nrecalibrate the projectors for this model"
        )
    known = set(all_sites if all_sites is not None else spa_sites)
    extra = sorted(set(pf.projectors) - known)
    if warn and missing:
        warnings.warn(
            ProjectorWarning(
                f"{where} has no projector for {len(missing)} SPA site(s), which run with the identity "
                f"(pooled) projector: {', '.join(sorted(missing))}"
                + (f" (the file has: {', '.join(sorted(pf.projectors)[:8])}{' ...' if len(pf.projectors) > 8 else ''})"
                   if pf.projectors else "")
            ),
            stacklevel=2,
        )
    if warn and extra:
        warnings.warn(
            ProjectorWarning(
                f"{where} has projectors for {len(extra)} site(s) this graph does not have, ignored "
                f"(another graph of a model with graph breaks may use them): {', '.join(extra)}"
            ),
            stacklevel=2,
        )
    if warn and selection is not None and pf.config.get("selection") not in (None, selection):
        warnings.warn(
            ProjectorWarning(
                f"{where} was fitted for selection={pf.config.get('selection')!r}, the config has "
                f"selection={selection!r}: recalibrate for the best recall"
            ),
            stacklevel=2,
        )
    return Match(attach, sorted(missing), extra)


# ---------------------------------------------------------------------------------------
# Sources the backend reads: files (cached) and live trainers
# ---------------------------------------------------------------------------------------


class LiveSource(Protocol):
    """What :class:`spa_compile.training_alongside.ProjectorTrainer` offers the backend."""

    def tensors_for(self, site: str, shape: SiteShape, device: torch.device, cfg: Any = None) -> tuple[Tensor, Tensor]: ...

    def file_view(self) -> ProjectorFile | None: ...


_live: dict[str, LiveSource] = {}
_cache: dict[tuple, ProjectorFile] = {}


def _key(path: str | os.PathLike) -> str:
    return os.path.abspath(os.fspath(path))


def register_live(path: str | os.PathLike, source: LiveSource) -> None:
    _live[_key(path)] = source


def unregister_live(path: str | os.PathLike, source: LiveSource | None = None) -> None:
    key = _key(path)
    if source is None or _live.get(key) is source:
        _live.pop(key, None)


def live_source(path: str | os.PathLike | None) -> LiveSource | None:
    return None if path is None else _live.get(_key(path))


def load_cached(path: str | os.PathLike) -> ProjectorFile:
    """:func:`load_projectors`, read again only when the file changed (size or mtime)."""
    key = _key(path)
    try:
        st = os.stat(key)
        stamp = (key, st.st_mtime_ns, st.st_size)
    except OSError:
        return load_projectors(path)
    pf = _cache.get(stamp)
    if pf is None:
        pf = load_projectors(path)
        for old in [k for k in _cache if k[0] == key]:
            del _cache[old]
        _cache[stamp] = pf
    return pf
