"""SPAConfig validation: every bad value names the field, the value and what is allowed."""

from __future__ import annotations

import pytest

from spa_compile import SPAConfig


@pytest.mark.parametrize(
    "field, value, allowed",
    [
        ("mode", "fast", "one of 'auto', 'spa', 'dense'"),
        ("block_size", 48, "power of two"),
        ("block_size", 8, "power of two >= 16"),
        ("density", 0.0, r"\(0, 1\]"),
        ("density", 1.5, r"\(0, 1\]"),
        ("density", "0.2", r"\(0, 1\]"),
        ("density", True, r"\(0, 1\]"),
        ("topk", -1, "int >= 0"),
        ("topk", 2.5, "int >= 0"),
        ("sink_blocks", None, "int >= 0"),
        ("fill", "lowrank", "'landmark', 'none'"),
        ("selection", "per_head", "'group', 'head'"),
        ("min_seq_len", "never", "'auto' or an int"),
        ("inner_backend", "cudagraphs", "'inductor', 'aot_eager', 'eager'"),
        ("sites", {"model.*": "sparse"}, "'spa' \\| 'dense'"),
        ("projectors", 3, "path"),
    ],
)
def test_bad_values_name_field_value_and_allowed(field, value, allowed):
    with pytest.raises(ValueError, match=rf"SPAConfig\.{field} = .*{allowed}"):
        SPAConfig(**{field: value})


def test_min_above_max_blocks():
    with pytest.raises(ValueError, match="min_blocks = 5.*max_blocks \\(2\\)"):
        SPAConfig(min_blocks=5, max_blocks=2)


def test_unknown_option_suggests_the_close_name():
    with pytest.raises(ValueError, match="unknown SPA option 'blocksize'; did you mean 'block_size'"):
        SPAConfig.from_options({"blocksize": 32})


def test_options_mapping_and_overrides():
    cfg = SPAConfig.from_options({"density": 0.1, "mode": "spa"}, block_size=32)
    assert (cfg.density, cfg.mode, cfg.block_size) == (0.1, "spa", 32)
    assert SPAConfig.from_options(cfg) == cfg
    assert cfg.replace(fill="none").fill == "none"
    with pytest.raises(ValueError, match="dict of SPAConfig fields"):
        SPAConfig.from_options([("density", 0.1)])


def test_density_ppm_is_exact():
    assert SPAConfig(density=0.2).density_ppm == 200_000
    assert SPAConfig(density=1.0).density_ppm == 1_000_000
