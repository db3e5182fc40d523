"""The ``spa`` command: help, model loading, --set, and each subcommand on a tiny model."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from importlib.metadata import entry_points
from pathlib import Path

import pytest

from spa_compile import cli, inspection

MODEL_PY = textwrap.dedent(
    '''
    import torch
    import torch.nn as nn
    import torch.nn.functional as F


    class Attention(nn.Module):
        def forward(self, q, k, v):
            return F.scaled_dot_product_attention(q, k, v, is_causal=True)


    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.attn = Attention()

        def forward(self, q, k, v):
            return self.attn(q, k, v)


    def make_model(seq_len=128):
        torch.manual_seed(0)
        q, k, v = (torch.randn(1, 2, seq_len, 16) for _ in range(3))
        return Model(), (q, k, v)


    def as_dict(seq_len=64):
        model, args = make_model(seq_len)
        return {"model": model, "args": args}


    def no_seq_len():
        return make_model(64)


    def bad():
        return 42
    '''
)


@pytest.fixture(autouse=True)
def _clean_config_env(monkeypatch, tmp_path):
    """No SPA_* variables or config files of the caller leak into the effective config."""
    for name in list(os.environ):
        if name.startswith("SPA_"):
            monkeypatch.delenv(name)
    monkeypatch.chdir(tmp_path)


@pytest.fixture
def model_file(tmp_path) -> Path:
    path = tmp_path / "tiny_model.py"
    path.write_text(MODEL_PY)
    return path


def run(capsys, *argv):
    rc = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


# ---------------------------------------------------------------------------------------
# Help
# ---------------------------------------------------------------------------------------

COMMANDS = ("explain", "inspect", "config", "calibrate", "bench")


def _subparsers(parser):
    import argparse

    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return action.choices


def test_top_level_help_lists_every_command():
    text = cli.build_parser().format_help()
    for cmd in COMMANDS:
        assert cmd in text
    for word in ("package.module:factory", "--set", "SPA_LOG", "TORCH_LOGS=spa_compile", "Examples"):
        assert word in text


@pytest.mark.parametrize("cmd", COMMANDS)
def test_each_command_help_is_complete(cmd):
    sub = _subparsers(cli.build_parser())[cmd]
    text = sub.format_help()
    assert sub.description and "Example" in text
    options = [s for a in sub._actions for s in a.option_strings]
    for a in sub._actions:  # every argument has a help text
        assert a.help, (cmd, a.dest)
    expected = {"--set"}
    if cmd != "config":
        expected |= {"--seq-len"}
        assert "MODEL" in text
    if cmd in ("explain", "inspect", "config", "bench"):
        expected |= {"--format", "--output"}
    if cmd == "calibrate":
        expected |= {"--output"}
    assert expected <= set(options), (cmd, options)
    for opt in expected:
        assert opt in text


def test_no_command_prints_help(capsys):
    rc, out, err = run(capsys)
    assert rc == cli.EXIT_USAGE and "commands" in err


def test_console_script_is_declared():
    pyproject = (Path(__file__).resolve().parents[1] / "pyproject.toml").read_text()
    assert 'spa = "spa_compile.cli:main"' in pyproject
    scripts = {e.name: e.value for e in entry_points(group="console_scripts")}
    if "spa" in scripts:  # installed (pip install -e .)
        assert scripts["spa"] == "spa_compile.cli:main"


# ---------------------------------------------------------------------------------------
# Models and --set
# ---------------------------------------------------------------------------------------


def test_load_target_from_file_and_module(model_file, monkeypatch):
    t = cli.load_target(str(model_file), seq_len=96)
    assert t.args[0].shape == (1, 2, 96, 16)
    t = cli.load_target(f"{model_file}:as_dict")
    assert t.args[0].shape[2] == 64 and t.kwargs == {}
    monkeypatch.syspath_prepend(str(model_file.parent))
    t = cli.load_target("tiny_model:make_model", seq_len=32)
    assert t.args[0].shape[2] == 32


@pytest.mark.parametrize(
    "spec, seq_len, message",
    [
        ("missing.py", None, "does not exist"),
        ("{file}:nope", None, "no factory function 'nope'"),
        ("{file}:no_seq_len", 64, "takes no seq_len"),
        ("{file}:bad", None, "must return (model, args)"),
        ("no_such_pkg_xyz.mod:f", None, "cannot import module"),
    ],
)
def test_load_target_errors(model_file, spec, seq_len, message):
    with pytest.raises(cli.CLIError, match=message.replace("(", r"\(").replace(")", r"\)")):
        cli.load_target(spec.format(file=model_file), seq_len)


def test_set_overrides():
    o = cli.parse_overrides(["density=0.1", "topk=none", "mode=spa", 'sites={"model.*": "dense"}', "block_size=32"])
    assert o == {"density": 0.1, "topk": None, "mode": "spa", "sites": {"model.*": "dense"}, "block_size": 32}
    cfg = cli.build_config(o)
    assert cfg.density == 0.1 and cfg.block_size == 32 and cfg.sites == {"model.*": "dense"}
    with pytest.raises(cli.CLIError, match="NAME=VALUE"):
        cli.parse_overrides(["density"])


def test_unknown_option_is_a_usage_error(capsys, model_file):
    rc, out, err = run(capsys, "explain", model_file, "--set", "densty=0.1")
    assert rc == cli.EXIT_USAGE and "densty" in err and "density" in err


# ---------------------------------------------------------------------------------------
# Subcommands
# ---------------------------------------------------------------------------------------


def test_explain(capsys, model_file):
    rc, out, _ = run(capsys, "explain", model_file, "--set", "mode=spa", "--format", "json")
    assert rc == 0
    sites = json.loads(out)["sites"]
    assert [(s["name"], s["decision"], s["mask"]) for s in sites] == [("model.attn", "spa", "causal")]
    rc, out, _ = run(capsys, "explain", model_file, "--seq-len", "256")
    assert rc == 0 and "model.attn" in out


def test_inspect_to_file(capsys, model_file, tmp_path):
    dest = tmp_path / "before.txt"
    rc, out, err = run(capsys, "inspect", model_file, "--stage", "before", "--set", "mode=spa", "-o", dest)
    assert rc == 0 and out == "" and str(dest) in err
    text = dest.read_text()
    assert "# spa site model.attn: spa pattern=sdpa mask=causal" in text and "scaled_dot_product_attention(" in text
    rc, out, _ = run(capsys, "inspect", model_file, "--format", "dot", "--set", "mode=spa")
    assert rc == 0 and "spa.attention\\n(rewritten)" in out


def test_inspect_mlir_without_torch_mlir(capsys, model_file, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch_mlir", None)
    rc, out, err = run(capsys, "inspect", model_file, "--format", "mlir")
    assert rc == cli.EXIT_UNAVAILABLE and "torch-mlir" in err and "pip install" in err


def test_inspect_png_without_graphviz(capsys, model_file, monkeypatch):
    monkeypatch.setattr(inspection.shutil, "which", lambda name: None)
    rc, out, err = run(capsys, "inspect", model_file, "--format", "png", "-o", "x.png")
    assert rc == cli.EXIT_UNAVAILABLE and "Graphviz" in err


def test_config(capsys):
    rc, out, _ = run(capsys, "config", "--set", "density=0.1", "--format", "json")
    assert rc == 0
    data = json.loads(out)
    assert data["density"] == {"value": 0.1, "source": "--set"}
    assert data["mode"]["value"] == "auto" and data["mode"]["source"] == "default"
    rc, out, _ = run(capsys, "config", "--set", "block_size=32")
    assert rc == 0 and "block_size" in out and "--set" in out and "density" in out


def test_config_with_a_model_names_the_sites(capsys, model_file):
    rc, out, _ = run(capsys, "config", model_file, "--set", "sites=model.attn=dense,model.head*=spa", "--format", "json")
    assert rc == 0
    data = json.loads(out)
    assert data["config"]["sites"]["source"] == "--set"
    assert [(r["site"], r["pattern"], r["decision"]) for r in data["sites"]] == [("model.attn", "model.attn", "dense")]
    rc, out, _ = run(capsys, "config", model_file, "--set", "sites=model.head*=spa")
    assert rc == 0 and "sites patterns that name no site: 'model.head*'" in out


def test_config_reports_environment(capsys, monkeypatch):
    pytest.importorskip("spa_compile.config_sources")
    monkeypatch.setenv("SPA_DENSITY", "0.3")
    rc, out, _ = run(capsys, "config", "--format", "json")
    assert rc == 0 and json.loads(out)["density"] == {"value": 0.3, "source": "environment variable SPA_DENSITY"}


def test_calibrate_runs_spa_compile_calibrate(capsys, model_file, tmp_path):
    dest = tmp_path / "proj.safetensors"
    rc, out, err = run(capsys, "calibrate", model_file, "--steps", "2", "--output", dest, "--format", "json")
    assert rc == 0, err
    assert dest.is_file() and "model.attn" in out


def test_bench(capsys, model_file):
    rc, out, _ = run(capsys, "bench", model_file, "--seq-len", "128", "--min-run-time", "0.02", "--format", "json")
    assert rc == 0
    r = json.loads(out)
    assert r["device"] == "cpu" and r["sites"] == 1 and r["spa_sites"] == 1
    assert r["config"]["mode"] == "spa" and r["config"]["inner_backend"] == "eager"
    assert r["dense"]["median_s"] > 0 and r["spa"]["median_s"] > 0 and r["dense"]["runs"] >= 1
    # 128 keys = 2 blocks, all of them forced (sink + local): SPA is exact here.
    assert r["max_abs_diff"] < 1e-4
    text = cli.format_bench(r)
    assert "speedup" in text and "say nothing about GPU performance" in text


def test_spa_command_end_to_end_with_spa_log(model_file):
    """The installed console script (or python -m spa_compile.cli), with SPA_LOG=1."""
    exe = shutil.which("spa", path=os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")]))
    cmd = [exe] if exe else [sys.executable, "-m", "spa_compile.cli"]
    env = {k: v for k, v in os.environ.items() if not k.startswith("SPA_")}
    env["SPA_LOG"] = "1"
    proc = subprocess.run(
        [*cmd, "explain", str(model_file), "--set", "mode=spa"], capture_output=True, text=True, env=env, timeout=300
    )
    assert proc.returncode == 0, proc.stderr
    assert "spa_compile.explain: 1 attention site(s), 1 SPA, 0 dense" in proc.stdout
    assert "[spa_compile] INFO spa site model.attn: spa (" in proc.stderr
