"""SPAConfig: every knob of the SPA backend, validated on construction.

Errors name the field, the value and what is allowed, so that a typo in
``torch.compile(..., options={...})`` fails at once with a way out.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
from dataclasses import dataclass, field, fields
from typing import Any, Mapping

MODES = ("auto", "spa", "dense")
FILLS = ("landmark", "none")
SELECTIONS = ("group", "head")
# How the top-k blocks are scored (docs/design.md, "A retrieval-aware block score"): "projector" is
# SPEC.md section 1; "bound" and "hybrid" add the key-range bound (an extension proposed for SPEC.md).
BLOCK_SCORES = ("projector", "hybrid", "bound", "fine")
INNER_BACKENDS = ("inductor", "aot_eager", "eager")
SITE_DECISIONS = ("spa", "dense")
# Built-in hardware profiles (spa_compile.hardware.BUILTIN_PROFILES); "auto" measures the present GPU.
DEVICE_PROFILES = ("auto", "h100", "h200", "a100")

# The plain threshold used in mode "auto" when no hardware profile applies (the site's
# tensors are not on a GPU and device_profile is "auto"): below it a dense kernel wins.
DEFAULT_MIN_SEQ_LEN = 4096


class SPAConfigError(ValueError):
    """An invalid SPAConfig value: names the field, the value and what is allowed.

    ``source`` says where the value came from (``"options="``, an environment variable,
    a config file) when :mod:`spa_compile.config_sources` knows it.
    """

    def __init__(self, field: str, value: Any, allowed: str, source: str | None = None):
        self.field, self.value, self.allowed, self.source = field, value, allowed, source
        where = f" (from {source})" if source else ""
        super().__init__(f"SPAConfig.{field} = {value!r}{where} is not allowed: expected {allowed}.")


@dataclass(frozen=True)
class SPAConfig:
    """Configuration of Sparse Projected Attention (see SPEC.md for the semantics).

    mode:          "auto" (SPA where the cost model predicts it faster by ``margin``), "spa" (always), "dense" (never).
    block_size:    rows per query block and keys per key block (Bq = Bk).
    density:       share of the visible key blocks picked by top-k when ``topk`` is None.
    topk:          fixed number of top-k blocks per query block (overrides ``density``).
    min_blocks / max_blocks: clip the top-k count.
    sink_blocks:   first visible blocks always kept (attention sinks).
    local_blocks:  visible blocks nearest to the diagonal always kept.
    fill:          "landmark" keeps the mass of dropped blocks with one pseudo-key per block; "none" drops it.
    selection:     "group" shares one selection across the query heads of a kv head; "head" selects per head.
    block_score:   how the top-k blocks are picked: "projector" (SPEC.md: the projected pooled score),
                   "bound" (a per-row upper bound of q . k from each key block's per-channel key range:
                   finds a single matching key, e.g. a retrieval lookup, that block means average away)
                   or "hybrid" (half of the top-k by each: ceil(k/2) by projector, the rest by bound), or
                   "fine" (the attention mass each block gets from ``fine_rows`` row means of the query
                   block over ``fine_keys`` sub-block key means per block: closer to the true block mass,
                   ~fine_rows * fine_keys times the pooled score's work; selection runs in PyTorch).
    fine_rows / fine_keys: the "fine" score's query row means per query block and key sub-block
                   means per key block (powers of two, at most block_size).
    projectors:    path of a projector file (safetensors) or None for the identity (pooled) projector.
    min_seq_len:   "auto" (the cost model's crossover) or an int that overrides it: in mode "auto",
                   sites with fewer keys stay dense and the others take SPA.
    inner_backend: compiler for the rewritten graph: "inductor", "aot_eager" or "eager".
    sites:         per-site overrides, ``{"model.layers.0.*": "dense"}`` (fnmatch patterns on site names).
    device_profile: hardware the cost model predicts for: "auto" (the GPU the site runs on, measured
                   once and cached), a built-in profile ("h100", "h200", "a100") or a profile JSON file.
    margin:        in mode "auto", SPA is chosen only where predicted at least this much faster:
                   ``t_spa * (1 + margin) <= t_dense``.

    ``from_options`` layers, in rising precedence: the defaults, ``[tool.spa]`` in ./pyproject.toml,
    ./spa.toml, ``SPA_*`` environment variables, the options (see :mod:`spa_compile.config_sources`).
    """

    mode: str = "auto"
    block_size: int = 64
    density: float = 0.2
    topk: int | None = None
    min_blocks: int | None = None
    max_blocks: int | None = None
    sink_blocks: int = 1
    local_blocks: int = 2
    fill: str = "landmark"
    selection: str = "group"
    block_score: str = "projector"
    fine_rows: int = 16
    fine_keys: int = 16
    projectors: str | None = None
    min_seq_len: Any = "auto"
    inner_backend: str = "inductor"
    sites: Mapping[str, str] = field(default_factory=dict)
    device_profile: str = "auto"
    margin: float = 0.1

    def __post_init__(self) -> None:
        _validate(self)

    # -- construction -----------------------------------------------------------------
    @classmethod
    def from_options(cls, options: Mapping[str, Any] | "SPAConfig" | None = None, **overrides: Any) -> "SPAConfig":
        """Build from a mapping of field names (``torch.compile(options=...)``) plus overrides.

        A mapping (or None) is layered over the config files and ``SPA_*`` environment variables
        of :mod:`spa_compile.config_sources`; an SPAConfig is taken as complete (no layering).
        """
        if isinstance(options, SPAConfig):
            base = dataclasses.asdict(options)
            base.update(overrides)
            _check_names(base)
            return cls(**base)
        if options is not None and not isinstance(options, Mapping):
            raise ValueError(
                f"SPA options must be a dict of SPAConfig fields or an SPAConfig, got {type(options).__name__}"
            )
        from .config_sources import resolve

        return resolve(options, overrides).config

    def replace(self, **changes: Any) -> "SPAConfig":
        _check_names(changes)
        return dataclasses.replace(self, **changes)

    # -- derived values ---------------------------------------------------------------
    @property
    def density_ppm(self) -> int:
        """Density in parts per million: the top-k count is computed in integers from it."""
        return int(round(self.density * 1_000_000))

    @property
    def effective_min_seq_len(self) -> int:
        return DEFAULT_MIN_SEQ_LEN if self.min_seq_len == "auto" else int(self.min_seq_len)


def _check_names(values: Mapping[str, Any]) -> None:
    known = {f.name for f in fields(SPAConfig)}
    for name in values:
        if name not in known:
            close = difflib.get_close_matches(str(name), sorted(known), n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise ValueError(
                f"unknown SPA option {name!r}{hint} Allowed options: {', '.join(sorted(known))}."
            )


def _fail(name: str, value: Any, allowed: str) -> None:
    raise SPAConfigError(name, value, allowed)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _choice(cfg: SPAConfig, name: str, choices: tuple[str, ...]) -> None:
    value = getattr(cfg, name)
    if value not in choices:
        _fail(name, value, "one of " + ", ".join(repr(c) for c in choices))


def _int_at_least(cfg: SPAConfig, name: str, low: int, optional: bool = False) -> None:
    value = getattr(cfg, name)
    if optional and value is None:
        return
    if not _is_int(value) or value < low:
        _fail(name, value, f"an int >= {low}" + (" or None" if optional else ""))


def _validate(cfg: SPAConfig) -> None:
    _choice(cfg, "mode", MODES)
    _choice(cfg, "fill", FILLS)
    _choice(cfg, "selection", SELECTIONS)
    _choice(cfg, "block_score", BLOCK_SCORES)
    _choice(cfg, "inner_backend", INNER_BACKENDS)
    if not _is_int(cfg.block_size) or cfg.block_size < 16 or cfg.block_size & (cfg.block_size - 1):
        _fail("block_size", cfg.block_size, "a power of two >= 16 (16, 32, 64, 128, ...)")
    if isinstance(cfg.density, bool) or not isinstance(cfg.density, (int, float)) or not (
        math.isfinite(cfg.density) and 0.0 < cfg.density <= 1.0
    ):
        _fail("density", cfg.density, "a float in (0, 1]")
    _int_at_least(cfg, "topk", 0, optional=True)
    _int_at_least(cfg, "min_blocks", 0, optional=True)
    _int_at_least(cfg, "max_blocks", 0, optional=True)
    if cfg.min_blocks is not None and cfg.max_blocks is not None and cfg.min_blocks > cfg.max_blocks:
        _fail("min_blocks", cfg.min_blocks, f"at most max_blocks ({cfg.max_blocks})")
    for name in ("fine_rows", "fine_keys"):
        value = getattr(cfg, name)
        if not _is_int(value) or value < 1 or value & (value - 1) or value > cfg.block_size:
            _fail(name, value, f"a power of two between 1 and block_size ({cfg.block_size})")
    _int_at_least(cfg, "sink_blocks", 0)
    _int_at_least(cfg, "local_blocks", 0)
    if cfg.projectors is not None and not isinstance(cfg.projectors, str):
        if not hasattr(cfg.projectors, "__fspath__"):
            _fail("projectors", cfg.projectors, "a path (str or os.PathLike) or None")
        object.__setattr__(cfg, "projectors", str(cfg.projectors))
    if cfg.min_seq_len != "auto" and (not _is_int(cfg.min_seq_len) or cfg.min_seq_len < 0):
        _fail("min_seq_len", cfg.min_seq_len, "'auto' or an int >= 0")
    if not isinstance(cfg.sites, Mapping):
        _fail("sites", cfg.sites, "a dict of site-name pattern -> 'spa' | 'dense'")
    for pattern, decision in cfg.sites.items():
        if not isinstance(pattern, str) or decision not in SITE_DECISIONS:
            _fail("sites", {pattern: decision}, "a dict of site-name pattern (str) -> 'spa' | 'dense'")
    _validate_device_profile(cfg)
    if isinstance(cfg.margin, bool) or not isinstance(cfg.margin, (int, float)) or not (
        math.isfinite(cfg.margin) and 0.0 <= cfg.margin <= 10.0
    ):
        _fail("margin", cfg.margin, "a float in [0, 10] (0.1: SPA must be predicted 10% faster)")


def _validate_device_profile(cfg: SPAConfig) -> None:
    value = cfg.device_profile
    if hasattr(value, "__fspath__"):
        value = str(value.__fspath__())
    allowed = "one of " + ", ".join(repr(p) for p in DEVICE_PROFILES) + " or the path of a profile .json file"
    if not isinstance(value, str):
        _fail("device_profile", cfg.device_profile, allowed)
    if value.lower() in DEVICE_PROFILES:
        value = value.lower()
    elif not value.endswith(".json"):
        _fail("device_profile", cfg.device_profile, allowed)
    object.__setattr__(cfg, "device_profile", value)
