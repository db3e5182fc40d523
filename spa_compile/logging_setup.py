"""Logging of the SPA backend: ``logging.getLogger("spa_compile")``.

The backend logs one INFO line per attention site with its decision and the
reason. Nothing is printed unless asked for:

- ``SPA_LOG=1`` (or ``info``): print those lines on stderr; ``SPA_LOG=debug``
  (or ``2``) adds DEBUG lines; ``SPA_LOG=0`` / unset: nothing.
- ``TORCH_LOGS=spa_compile`` (``+spa_compile`` for DEBUG): PyTorch's own log
  switch, which handles any importable module's logger; it prints through
  PyTorch's log handler and format.
- From Python: :func:`configure_logging` (``"info"``, ``"debug"``, ...) or the
  standard ``logging`` module on the ``"spa_compile"`` logger.
"""

from __future__ import annotations

import logging
import os
import sys

LOGGER_NAME = "spa_compile"
ENV_VAR = "SPA_LOG"

_LEVELS = {
    "1": logging.INFO, "true": logging.INFO, "yes": logging.INFO, "on": logging.INFO, "info": logging.INFO,
    "2": logging.DEBUG, "debug": logging.DEBUG, "+": logging.DEBUG,
    "warning": logging.WARNING, "warn": logging.WARNING, "error": logging.ERROR,
}
_OFF = ("", "0", "false", "no", "off", "none")


class _SPAHandler(logging.StreamHandler):
    """The handler SPA_LOG installs (marked, so it is installed once and can be removed)."""


def parse_level(value: str | int | None) -> int | None:
    """A log level from an ``SPA_LOG`` value; None means off. Raises ValueError on nonsense."""
    if value is None:
        return None
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in _OFF:
        return None
    if text in _LEVELS:
        return _LEVELS[text]
    raise ValueError(
        f"{ENV_VAR}={value!r} is not understood: use 1/info, 2/debug, warning, error, or 0/off"
    )


def configure_logging(level: str | int | None = "info", stream=None) -> logging.Logger:
    """Print the ``spa_compile`` logger's records at ``level`` on ``stream`` (stderr); None turns it off."""
    log = logging.getLogger(LOGGER_NAME)
    for h in [h for h in log.handlers if isinstance(h, _SPAHandler)]:
        log.removeHandler(h)
    lvl = parse_level(level)
    if lvl is None:
        return log
    handler = _SPAHandler(stream if stream is not None else sys.stderr)
    handler.setFormatter(logging.Formatter("[spa_compile] %(levelname)s %(message)s"))
    log.addHandler(handler)
    log.setLevel(lvl)
    return log


def configure_from_env() -> None:
    """Apply ``SPA_LOG`` (called when ``spa_compile`` is imported). A bad value warns, never fails."""
    value = os.environ.get(ENV_VAR)
    if value is None:
        return
    try:
        log = logging.getLogger(LOGGER_NAME)
        if any(not isinstance(h, _SPAHandler) for h in log.handlers):
            # TORCH_LOGS=spa_compile already installed PyTorch's handler: only the level, no second copy.
            level = parse_level(value)
            if level is not None:
                log.setLevel(level)
            return
        configure_logging(value)
    except ValueError as e:
        import warnings

        warnings.warn(str(e), stacklevel=2)
