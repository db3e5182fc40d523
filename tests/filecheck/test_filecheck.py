"""Lit-style FileCheck cases for ``spa inspect``: every ``*.py`` case file in this folder.

A case file is a model file the ``spa`` command can load (a ``make_model`` factory) with
``# RUN:`` lines of the form

    # RUN: spa inspect %s [spa options] | filecheck %s --check-prefix=PREFIX

and ``# PREFIX:`` check lines (CHECK, -NEXT, -SAME, -NOT, -DAG, -LABEL, regexes ``{{...}}`` and
variables ``[[X:...]]``, as LLVM FileCheck). ``%s`` is the case file. Each RUN line is one
test; the left side runs in-process (``spa inspect`` traces are cached per model and options),
the right side runs the ``filecheck`` package. RUN lines with ``--format mlir`` skip, with the
reason, where torch-mlir is not usable. Any other ``spa`` subcommand runs through ``spa`` itself.

To add a case: drop a ``.py`` file with RUN lines here (not named ``test_*``).
"""

from __future__ import annotations

import contextlib
import io
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from spa_compile import cli, inspection

CASE_DIR = Path(__file__).resolve().parent
_RUN = re.compile(r"^\s*#\s*RUN:\s?(.*?)\s*$")


def case_files() -> list[Path]:
    return sorted(
        p for p in CASE_DIR.glob("*.py") if not p.name.startswith(("test_", "_", "conftest")) and _runs(p)
    )


def _runs(path: Path) -> list[tuple[int, str]]:
    """The RUN commands of a case file, with their line numbers (a trailing backslash continues a line)."""
    runs, pending, start = [], "", 0
    for i, line in enumerate(path.read_text().splitlines(), 1):
        m = _RUN.match(line)
        if not m:
            continue
        if not pending:
            start = i
        text = m.group(1)
        if text.endswith("\\"):
            pending += text[:-1] + " "
            continue
        runs.append((start, pending + text))
        pending = ""
    return runs


def _params():
    out = []
    for path in case_files():
        for lineno, cmd in _runs(path):
            out.append(pytest.param(path, cmd, id=f"{path.stem}:{lineno}"))
    return out


_captures: dict[tuple, inspection.Capture] = {}


def _run_spa(argv: list[str]) -> str:
    """The output of ``spa ARGV``, in-process; ``inspect`` reuses one trace per model and options."""
    args = cli.build_parser().parse_args(argv)
    if args.command == "inspect":
        if args.format == "mlir":
            reason = inspection.mlir_unavailable_reason()
            if reason:
                pytest.skip(reason)
        key = (args.model, args.seq_len, tuple(args.set))
        if key not in _captures:
            target = cli.load_target(args.model, args.seq_len)
            cfg = cli.build_config(cli.parse_overrides(args.set))
            _captures[key] = inspection.capture(target.model, *target.args, config=cfg, **target.kwargs)
        out = _captures[key].render(args.format, args.stage, verbose=args.verbose_code)
        assert isinstance(out, str), f"--format {args.format} is binary; FileCheck needs text"
        return out
    buf, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(buf), contextlib.redirect_stderr(err):
        rc = cli.main(argv)
    assert rc == 0, f"spa {' '.join(argv)} exited with {rc}:\n{err.getvalue()}"
    return buf.getvalue()


@pytest.mark.parametrize("case, command", _params())
def test_filecheck(case: Path, command: str) -> None:
    command = command.replace("%s", shlex.quote(str(case)))
    left, sep, right = command.partition("|")
    assert sep, f"RUN line needs 'spa ... | filecheck ...': {command}"
    producer, checker = shlex.split(left), shlex.split(right)
    assert producer[:1] == ["spa"], f"RUN line must start with 'spa': {command}"
    assert checker[:1] == ["filecheck"], f"RUN line must pipe into 'filecheck': {command}"
    text = _run_spa(producer[1:])
    proc = subprocess.run(
        [sys.executable, "-m", "filecheck", *checker[1:]], input=text, capture_output=True, text=True, timeout=120
    )
    if proc.returncode:
        pytest.fail(
            f"filecheck failed for RUN: {command}\n{proc.stdout}{proc.stderr}\n--- input ---\n{text}", pytrace=False
        )


def test_every_case_has_runs() -> None:
    """A .py file here without RUN lines is a mistake: it would silently test nothing."""
    empty = [p.name for p in CASE_DIR.glob("*.py") if not p.name.startswith(("test_", "_", "conftest")) and not _runs(p)]
    assert not empty, f"case files without '# RUN:' lines: {empty}"
