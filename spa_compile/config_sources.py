"""Where SPAConfig values come from: defaults, config files, environment, options.

Layers, in rising precedence (a later layer replaces a field's value wholesale;
``sites`` is replaced, not merged):

1. the defaults of :class:`~spa_compile.config.SPAConfig`;
2. ``[tool.spa]`` in ``pyproject.toml`` of the working directory;
3. ``spa.toml`` of the working directory (top-level keys are fields);
4. ``SPA_<FIELD>`` environment variables (``SPA_DENSITY=0.3``, ``SPA_SITES='{"model.layers.0.*": "dense"}'``);
5. ``torch.compile(..., options={...})`` (and keyword overrides of ``SPAConfig.from_options``).

:func:`resolve` returns the config with the source of every value;
``print(resolve(options))`` or ``python -m spa_compile.config_sources`` prints it.
An invalid value fails with an :class:`~spa_compile.config.SPAConfigError` that names
the field, the value, its source and what is allowed.

Files are looked for in the working directory only (not its parents). In files and
environment variables, ``"none"`` stands for None (``topk``, ``min_blocks``,
``max_blocks``, ``projectors``), since TOML has no null.
"""

from __future__ import annotations

import difflib
import json
import os
import sys
import warnings
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Mapping

from .config import SPAConfig, SPAConfigError, _check_names

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    try:
        import tomli as tomllib  # type: ignore[no-redef]
    except ImportError:
        tomllib = None  # type: ignore[assignment]

ENV_PREFIX = "SPA_"
# SPA_* variables that are not config fields (read by other parts of spa_compile).
RESERVED_ENV = frozenset({"SPA_LOG", "SPA_AUTOTUNE", "SPA_TUNE_CACHE", "SPA_CACHE_DIR"})
_NONE_WORDS = ("none", "null", "")


@dataclass(frozen=True)
class Source:
    """Where a value came from. ``kind``: "default", "pyproject", "spa.toml", "env" or "options"."""

    kind: str
    detail: str

    def __str__(self) -> str:
        return self.detail


DEFAULT = Source("default", "default")
OPTIONS = Source("options", "options=")


@dataclass
class EffectiveConfig:
    """The resolved config and, per field, the layer its value came from."""

    config: SPAConfig
    sources: dict[str, Source] = field(default_factory=dict)
    files: list[str] = field(default_factory=list)  # config files that were read

    def source(self, name: str) -> str:
        return str(self.sources.get(name, DEFAULT))

    def to_dict(self) -> dict[str, Any]:
        return {
            name: {"value": getattr(self.config, name), "source": self.source(name)}
            for name in (f.name for f in fields(SPAConfig))
        }

    def __str__(self) -> str:
        rows = [(name, _fmt(getattr(self.config, name)), self.source(name)) for name in (f.name for f in fields(SPAConfig))]
        head = ("field", "value", "source")
        widths = [max(len(r[i]) for r in rows + [head]) for i in range(3)]
        line = lambda r: "  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip()  # noqa: E731
        read = ", ".join(self.files) if self.files else "none"
        return "\n".join(
            [f"spa_compile effective config (config files read: {read})", line(head),
             line(tuple("-" * w for w in widths)), *map(line, rows)]
        )


def _fmt(value: Any) -> str:
    if isinstance(value, Mapping):
        return json.dumps(dict(value))
    return repr(value)


# ---------------------------------------------------------------------------------------
# Files
# ---------------------------------------------------------------------------------------

_file_cache: dict[str, tuple[tuple[int, int], Any]] = {}


def _read_toml(path: Path) -> dict[str, Any]:
    """Parsed TOML, cached by (mtime, size): the backend resolves the config for every graph."""
    st = path.stat()
    key = (st.st_mtime_ns, st.st_size)
    hit = _file_cache.get(str(path))
    if hit is not None and hit[0] == key:
        return hit[1]
    if tomllib is None:  # pragma: no cover
        raise RuntimeError(f"reading {path} needs Python >= 3.11 (tomllib) or the tomli package")
    try:
        with open(path, "rb") as fh:
            data = tomllib.load(fh)
    except tomllib.TOMLDecodeError as exc:
        raise ValueError(f"{path} is not valid TOML: {exc}") from None
    _file_cache[str(path)] = (key, data)
    return data


def file_layers(cwd: str | os.PathLike | None = None) -> list[tuple[Source, dict[str, Any]]]:
    """The config-file layers of ``cwd`` (default: the working directory), lowest first."""
    try:
        base = Path(cwd) if cwd is not None else Path.cwd()
    except OSError:  # the working directory was removed: no file layers
        return []
    layers: list[tuple[Source, dict[str, Any]]] = []
    pyproject = base / "pyproject.toml"
    if pyproject.is_file():
        tool = _read_toml(pyproject).get("tool", {})
        section = tool.get("spa") if isinstance(tool, Mapping) else None
        if section is not None:
            src = Source("pyproject", f"[tool.spa] in {pyproject.resolve()}")
            if not isinstance(section, Mapping):
                raise ValueError(f"{src} must be a table of SPAConfig fields, got {section!r}")
            layers.append((src, dict(section)))
    spa_toml = base / "spa.toml"
    if spa_toml.is_file():
        data = dict(_read_toml(spa_toml))
        # A [tool.spa] table inside spa.toml is accepted too (copied from a pyproject.toml).
        tool = data.get("tool")
        if set(data) == {"tool"} and isinstance(tool, Mapping) and isinstance(tool.get("spa"), Mapping):
            data = dict(tool["spa"])
        layers.append((Source("spa.toml", str(spa_toml.resolve())), data))
    return layers


# ---------------------------------------------------------------------------------------
# Environment
# ---------------------------------------------------------------------------------------


def env_name(name: str) -> str:
    return ENV_PREFIX + name.upper()


def _field_types() -> dict[str, str]:
    return {f.name: str(f.type) for f in fields(SPAConfig)}


def parse_value(name: str, raw: str, source: str) -> Any:
    """An environment (or file) string turned into the field's type, leniently: what does not
    parse is passed on as the string, and SPAConfig's validation names the field and source."""
    kind = _field_types().get(name, "str")
    text = raw.strip()
    optional = "None" in kind
    if optional and text.lower() in _NONE_WORDS:
        return None
    if name == "sites" or "Mapping" in kind or "dict" in kind:
        return parse_sites(text, source)
    if name == "min_seq_len" or kind == "Any":
        return text if text == "auto" else _try(int, text)
    if "float" in kind:
        return _try(float, text)
    if "int" in kind:
        return _try(int, text)
    if "bool" in kind:
        low = text.lower()
        if low in ("1", "true", "yes", "on"):
            return True
        if low in ("0", "false", "no", "off"):
            return False
        return text
    return text


def _try(cast, text: str) -> Any:
    try:
        return cast(text)
    except ValueError:
        return text


def parse_sites(text: str, source: str) -> dict[str, str]:
    """``'{"model.layers.0.*": "dense"}'`` (JSON) or ``'model.layers.0.*=dense,model.head*=spa'``."""
    if not text:
        return {}
    if text.startswith("{"):
        try:
            value = json.loads(text)
        except json.JSONDecodeError as exc:
            raise SPAConfigError("sites", text, f"a JSON object of pattern -> 'spa' | 'dense' ({exc})", source) from None
        if not isinstance(value, dict):
            raise SPAConfigError("sites", text, "a JSON object of pattern -> 'spa' | 'dense'", source)
        return value
    out: dict[str, str] = {}
    for item in text.split(","):
        if not item.strip():
            continue
        pattern, sep, decision = item.partition("=")
        if not sep:
            raise SPAConfigError(
                "sites", text, "'pattern=spa|dense' items separated by commas, or a JSON object", source
            )
        out[pattern.strip()] = decision.strip()
    return out


def env_layer(environ: Mapping[str, str] | None = None) -> tuple[dict[str, Any], dict[str, Source]]:
    """Values and sources from ``SPA_<FIELD>`` variables. An unknown ``SPA_*`` name that is close
    to a field name warns (``SPA_DENSTY``); other ``SPA_*`` names belong to other tools."""
    env = os.environ if environ is None else environ
    known = {env_name(f.name): f.name for f in fields(SPAConfig)}
    values: dict[str, Any] = {}
    sources: dict[str, Source] = {}
    for var in sorted(env):
        if not var.startswith(ENV_PREFIX) or var in RESERVED_ENV:
            continue
        name = known.get(var)
        if name is None:
            close = difflib.get_close_matches(var, sorted(known), n=1, cutoff=0.8)
            if close:
                warnings.warn(f"environment variable {var} is not an SPA option; did you mean {close[0]}?", stacklevel=3)
            continue
        src = Source("env", f"environment variable {var}")
        values[name] = parse_value(name, env[var], str(src))
        sources[name] = src
    return values, sources


# ---------------------------------------------------------------------------------------
# Layering
# ---------------------------------------------------------------------------------------


def _check_layer(values: Mapping[str, Any], src: Source) -> None:
    known = {f.name for f in fields(SPAConfig)}
    for name in values:
        if name not in known:
            close = difflib.get_close_matches(str(name), sorted(known), n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise ValueError(f"unknown SPA option {name!r} in {src}{hint} Allowed options: {', '.join(sorted(known))}.")


def _file_value(name: str, value: Any, src: Source) -> Any:
    """TOML has no null: the string "none" stands for None in optional fields."""
    if isinstance(value, str) and value.strip().lower() in ("none", "null") and "None" in _field_types().get(name, ""):
        return None
    return value


def resolve(
    options: Mapping[str, Any] | None = None,
    overrides: Mapping[str, Any] | None = None,
    *,
    cwd: str | os.PathLike | None = None,
    environ: Mapping[str, str] | None = None,
) -> EffectiveConfig:
    """The effective config: defaults < pyproject.toml [tool.spa] < spa.toml < SPA_* env < options < overrides."""
    merged: dict[str, Any] = {}
    sources: dict[str, Source] = {}
    files: list[str] = []
    for src, values in file_layers(cwd):
        _check_layer(values, src)
        files.append(src.detail)
        for name, value in values.items():
            merged[name] = _file_value(name, value, src)
            sources[name] = src
    env_values, env_sources = env_layer(environ)
    merged.update(env_values)
    sources.update(env_sources)
    for layer in (options, overrides):
        if layer:
            _check_names(layer)
            merged.update(layer)
            sources.update({name: OPTIONS for name in layer})
    try:
        cfg = SPAConfig(**merged)
    except SPAConfigError as exc:
        raise SPAConfigError(exc.field, exc.value, exc.allowed, str(sources.get(exc.field, DEFAULT))) from None
    return EffectiveConfig(config=cfg, sources=sources, files=files)


def effective_config(options: Mapping[str, Any] | None = None, **kwargs: Any) -> EffectiveConfig:
    """Alias of :func:`resolve`: ``print(effective_config({"density": 0.3}))``."""
    return resolve(options, **kwargs)


def main(argv: list[str] | None = None) -> int:
    """``python -m spa_compile.config_sources [--options JSON] [--json]``: print the effective config."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m spa_compile.config_sources", description=main.__doc__)
    parser.add_argument("--options", default=None, help="options= as a JSON object, layered on top")
    parser.add_argument("--json", action="store_true", help="print JSON (field -> value, source)")
    args = parser.parse_args(argv)
    options = json.loads(args.options) if args.options else None
    try:
        eff = resolve(options)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(eff.to_dict(), indent=2, default=str) if args.json else eff)
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
