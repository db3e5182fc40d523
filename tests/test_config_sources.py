"""Config sources: defaults < pyproject.toml [tool.spa] < spa.toml < SPA_* env < options=,
the effective config with the source of each value, and errors that name field, value,
source and what is allowed."""

from __future__ import annotations

import os
import warnings

import pytest

from spa_compile import SPAConfig
from spa_compile.config import SPAConfigError
from spa_compile.config_sources import main, parse_sites, resolve


@pytest.fixture(autouse=True)
def clean(monkeypatch, tmp_path):
    """An empty working directory and no SPA_* configuration variables."""
    for var in list(os.environ):
        if var.startswith("SPA_"):
            monkeypatch.delenv(var)
    monkeypatch.chdir(tmp_path)
    return tmp_path


def _pyproject(path, body: str) -> None:
    (path / "pyproject.toml").write_text('[project]\nname = "x"\n\n[tool.spa]\n' + body)


def test_defaults_without_files_or_env():
    eff = resolve()
    assert eff.config == SPAConfig()
    assert eff.files == [] and all(eff.source(f) == "default" for f in ("mode", "density", "sites"))
    assert SPAConfig.from_options(None) == SPAConfig() == SPAConfig.from_options({})


def test_layers_in_rising_precedence(clean, monkeypatch):
    _pyproject(clean, 'density = 0.3\nblock_size = 32\nfill = "none"\nmargin = 0.5\n'
                      '[tool.spa.sites]\n"model.layers.0.*" = "dense"\n')
    (clean / "spa.toml").write_text("density = 0.25\nblock_size = 128\nmargin = 0.3\n")
    monkeypatch.setenv("SPA_BLOCK_SIZE", "16")
    monkeypatch.setenv("SPA_MARGIN", "0.2")
    eff = resolve({"margin": 0.0})
    cfg = eff.config
    assert (cfg.fill, cfg.density, cfg.block_size, cfg.margin) == ("none", 0.25, 16, 0.0)
    assert cfg.sites == {"model.layers.0.*": "dense"}
    assert eff.source("fill") == f"[tool.spa] in {clean / 'pyproject.toml'}"
    assert eff.source("sites").startswith("[tool.spa] in")
    assert eff.source("density") == str(clean / "spa.toml")
    assert eff.source("block_size") == "environment variable SPA_BLOCK_SIZE"
    assert eff.source("margin") == "options="
    assert eff.source("mode") == "default"
    # the backend's entry point applies the same layers beneath options=
    assert SPAConfig.from_options({"margin": 0.0}) == cfg
    assert SPAConfig.from_options({"margin": 0.0}, fill="landmark").fill == "landmark"


def test_an_spaconfig_is_taken_as_complete(monkeypatch):
    monkeypatch.setenv("SPA_DENSITY", "0.5")
    cfg = SPAConfig(density=0.1)
    assert SPAConfig.from_options(cfg) == cfg
    assert SPAConfig.from_options(None).density == 0.5


def test_pyproject_without_tool_spa_and_tool_table_in_spa_toml(clean):
    (clean / "pyproject.toml").write_text('[project]\nname = "x"\n')
    assert resolve().files == []
    (clean / "spa.toml").write_text("[tool.spa]\ntopk = 4\n")
    assert resolve().config.topk == 4


def test_env_value_parsing(monkeypatch):
    monkeypatch.setenv("SPA_TOPK", "none")
    monkeypatch.setenv("SPA_MIN_BLOCKS", "2")
    monkeypatch.setenv("SPA_MIN_SEQ_LEN", "8192")
    monkeypatch.setenv("SPA_SITES", '{"model.layers.0.*": "dense"}')
    monkeypatch.setenv("SPA_DEVICE_PROFILE", "H100")
    monkeypatch.setenv("SPA_PROJECTORS", "")
    cfg = resolve().config
    assert (cfg.topk, cfg.min_blocks, cfg.min_seq_len, cfg.device_profile, cfg.projectors) == (
        None, 2, 8192, "h100", None)
    assert cfg.sites == {"model.layers.0.*": "dense"}
    monkeypatch.setenv("SPA_MIN_SEQ_LEN", "auto")
    monkeypatch.setenv("SPA_SITES", "model.layers.0.*=dense, model.head*=spa")
    cfg = resolve().config
    assert cfg.min_seq_len == "auto" and cfg.sites == {"model.layers.0.*": "dense", "model.head*": "spa"}
    assert parse_sites("", "x") == {}


@pytest.mark.parametrize(
    "var, value, field, allowed",
    [
        ("SPA_DENSITY", "1.5", "density", r"\(0, 1\]"),
        ("SPA_DENSITY", "lots", "density", r"\(0, 1\]"),
        ("SPA_TOPK", "two", "topk", "int >= 0 or None"),
        ("SPA_MODE", "fast", "mode", "'auto', 'spa', 'dense'"),
        ("SPA_MARGIN", "-1", "margin", r"\[0, 10\]"),
        ("SPA_DEVICE_PROFILE", "b200", "device_profile", "'h100'.*json"),
        ("SPA_SITES", "model.*", "sites", "pattern=spa\\|dense"),
        ("SPA_SITES", '{"model.*": "sparse"}', "sites", "'spa' \\| 'dense'"),
        ("SPA_MIN_SEQ_LEN", "short", "min_seq_len", "'auto' or an int"),
    ],
)
def test_bad_env_value_names_field_value_source_and_allowed(monkeypatch, var, value, field, allowed):
    monkeypatch.setenv(var, value)
    with pytest.raises(SPAConfigError, match=rf"SPAConfig\.{field} = .*\(from environment variable {var}\) "
                                             rf"is not allowed: expected .*{allowed}") as info:
        SPAConfig.from_options(None)
    assert info.value.field == field and info.value.source == f"environment variable {var}"


def test_bad_file_values_name_the_file(clean):
    _pyproject(clean, "block_size = 48\n")
    with pytest.raises(ValueError, match=r"SPAConfig\.block_size = 48 \(from \[tool\.spa\] in .*pyproject\.toml\) "
                                         "is not allowed: expected a power of two"):
        resolve()
    (clean / "pyproject.toml").unlink()
    (clean / "spa.toml").write_text("densty = 0.3\n")
    with pytest.raises(ValueError, match=r"unknown SPA option 'densty' in .*spa\.toml; did you mean 'density'"):
        resolve()
    (clean / "spa.toml").write_text("density = [0.3\n")
    with pytest.raises(ValueError, match=r"spa\.toml is not valid TOML"):
        resolve()


def test_bad_option_value_says_options_and_unknown_option_keeps_its_message():
    with pytest.raises(SPAConfigError, match=r"SPAConfig\.margin = 'big' \(from options=\) is not allowed"):
        SPAConfig.from_options({"margin": "big"})
    with pytest.raises(ValueError, match="unknown SPA option 'blocksize'; did you mean 'block_size'"):
        SPAConfig.from_options({"blocksize": 32})


def test_cross_field_error_names_the_source(monkeypatch):
    monkeypatch.setenv("SPA_MIN_BLOCKS", "5")
    with pytest.raises(SPAConfigError, match=r"min_blocks = 5 \(from environment variable SPA_MIN_BLOCKS\).*"
                                             r"max_blocks \(2\)"):
        SPAConfig.from_options({"max_blocks": 2})


def test_unknown_env_vars_warn_only_when_close_to_a_field(monkeypatch):
    monkeypatch.setenv("SPA_DENSTY", "0.3")
    with pytest.warns(UserWarning, match="SPA_DENSTY is not an SPA option; did you mean SPA_DENSITY"):
        assert resolve().config.density == SPAConfig().density
    monkeypatch.delenv("SPA_DENSTY")
    monkeypatch.setenv("SPA_LOG", "1")
    monkeypatch.setenv("SPA_SOMETHING_ELSE", "x")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        resolve()


def test_effective_config_printing(clean, monkeypatch, capsys):
    (clean / "spa.toml").write_text('mode = "spa"\n')
    monkeypatch.setenv("SPA_DENSITY", "0.3")
    text = str(resolve({"margin": 0.25}))
    lines = {line.split()[0]: line for line in text.splitlines()[3:]}
    assert set(lines) >= {"mode", "density", "margin", "device_profile", "sites"}
    assert lines["mode"].split()[1:] == ["'spa'", str(clean / "spa.toml")]
    assert lines["density"].endswith("environment variable SPA_DENSITY")
    assert lines["margin"].endswith("options=") and lines["fill"].endswith("default")
    assert str(clean / "spa.toml") in text.splitlines()[0]
    d = resolve().to_dict()
    assert d["density"] == {"value": 0.3, "source": "environment variable SPA_DENSITY"}

    assert main(["--options", '{"topk": 3}']) == 0
    out = capsys.readouterr().out
    assert "topk" in out and "options=" in out
    monkeypatch.setenv("SPA_DENSITY", "2")
    assert main([]) == 2
    assert "SPA_DENSITY" in capsys.readouterr().err


def test_new_fields_validate():
    assert SPAConfig(device_profile="H200").device_profile == "h200"
    assert SPAConfig(device_profile="prof.json").device_profile == "prof.json"
    for bad in ("b200", 3, None):
        with pytest.raises(SPAConfigError, match="SPAConfig.device_profile"):
            SPAConfig(device_profile=bad)
    for bad in (-0.1, float("nan"), True, "0.1", 11):
        with pytest.raises(SPAConfigError, match="SPAConfig.margin"):
            SPAConfig(margin=bad)
