"""The kernels' "0" / "1" environment switches (SPA_SELECT_KT, SPA_SELECT_WIDE, SPA_SELECT_LPT,
SPA_POOL_FUSED, SPA_GLUON_FORWARD): read per call, so tests and benchmarks can flip them."""

from __future__ import annotations

import os


def env_switch(name: str, default: bool) -> bool:
    """$name as a bool ("1" on, "0" off), ``default`` when unset or empty; any other value is an
    error that names the variable."""
    env = os.environ.get(name, "")
    if env not in ("", "0", "1"):
        raise ValueError(f"{name} must be 0 or 1, not {env!r}")
    return default if env == "" else env == "1"
