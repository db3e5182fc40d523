"""The ``spa`` command: explain, inspect, config, calibrate and bench from a shell.

A model is given as ``package.module:factory`` or ``path/to/file.py[:factory]``
(the factory defaults to ``make_model``). The factory returns ``(model, args)``
or ``(model, args, kwargs)``: the module or function to compile and example
inputs for it; it gets ``seq_len=N`` when ``--seq-len N`` is given. Example::

    # model.py
    def make_model(seq_len=256):
        model = MyTransformer()
        return model, (torch.randn(2, seq_len, 64),)

    spa explain model.py --seq-len 4096
    spa inspect model.py --format mlir --stage after --set mode=spa
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import importlib.util
import inspect as pyinspect
import json
import os
import sys
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Callable, Sequence

EXIT_OK = 0
EXIT_ERROR = 1
EXIT_USAGE = 2
EXIT_UNAVAILABLE = 3

DEFAULT_FACTORY = "make_model"

MODEL_HELP = (
    "the model: package.module:factory or path/to/file.py[:factory] (factory defaults to "
    f"{DEFAULT_FACTORY}); the factory returns (model, args) or (model, args, kwargs) and gets "
    "seq_len=N when --seq-len is given"
)


class CLIError(Exception):
    """A problem with what the user asked for: printed as 'spa <cmd>: error: ...', exit status 2."""


# ---------------------------------------------------------------------------------------
# Models and configuration from the command line
# ---------------------------------------------------------------------------------------


@dataclass
class Target:
    spec: str
    model: Callable
    args: tuple
    kwargs: dict = field(default_factory=dict)


def _split_spec(spec: str) -> tuple[str, str]:
    # "C:\\x.py" style drive letters are not split: only the last ':' after the path counts.
    head, sep, tail = spec.rpartition(":")
    if sep and head and tail and "/" not in tail and "\\" not in tail and not tail.endswith(".py"):
        return head, tail
    return spec, DEFAULT_FACTORY


def load_factory(spec: str) -> Callable:
    """The factory function named by ``package.module:factory`` or ``file.py[:factory]``."""
    where, name = _split_spec(spec)
    if where.endswith(".py") or os.sep in where or "/" in where:
        path = Path(where)
        if not path.is_file():
            raise CLIError(f"model file {where!r} does not exist")
        mod_name = "_spa_model_" + "".join(c if c.isalnum() else "_" for c in str(path.resolve()))
        module = sys.modules.get(mod_name)
        if module is None:
            import_spec = importlib.util.spec_from_file_location(mod_name, path)
            module = importlib.util.module_from_spec(import_spec)
            sys.modules[mod_name] = module
            try:
                import_spec.loader.exec_module(module)
            except BaseException:
                del sys.modules[mod_name]
                raise
    else:
        try:
            module = importlib.import_module(where)
        except ModuleNotFoundError as e:
            raise CLIError(f"cannot import module {where!r} of model {spec!r}: {e}") from e
    factory = getattr(module, name, None)
    if factory is None or not callable(factory):
        public = sorted(n for n, v in vars(module).items() if callable(v) and not n.startswith("_"))
        raise CLIError(
            f"{where!r} has no factory function {name!r}; name one with {where}:<function> "
            f"(callables there: {', '.join(public) or 'none'})"
        )
    return factory


def load_target(spec: str, seq_len: int | None = None) -> Target:
    """Call the model factory (with ``seq_len`` when given) and check what it returned."""
    factory = load_factory(spec)
    call_kwargs = {}
    if seq_len is not None:
        params = pyinspect.signature(factory).parameters
        if "seq_len" not in params and not any(p.kind is p.VAR_KEYWORD for p in params.values()):
            raise CLIError(f"--seq-len was given, but the factory {spec!r} takes no seq_len argument")
        call_kwargs["seq_len"] = seq_len
    made = factory(**call_kwargs)
    if isinstance(made, dict):
        made = (made.get("model"), made.get("args", ()), made.get("kwargs", {}))
    if not isinstance(made, (tuple, list)) or len(made) not in (2, 3) or not callable(made[0]):
        raise CLIError(
            f"the factory {spec!r} must return (model, args) or (model, args, kwargs), "
            f"got {type(made).__name__}"
        )
    model, args = made[0], made[1]
    kwargs = dict(made[2]) if len(made) == 3 and made[2] else {}
    args = tuple(args) if isinstance(args, (tuple, list)) else (args,)
    return Target(spec=spec, model=model, args=args, kwargs=kwargs)


def _config_sources():
    """:mod:`spa_compile.config_sources` (config files, SPA_* variables, origins), or None if absent."""
    try:
        return importlib.import_module("spa_compile.config_sources")
    except ModuleNotFoundError as e:
        if e.name == "spa_compile.config_sources":
            return None
        raise


def parse_value(text: str, name: str | None = None) -> Any:
    """A --set value. Typed by the field where config_sources knows how (``topk=none``,
    ``sites=model.layers.0.*=dense``); otherwise JSON (numbers, null, true/false, objects),
    else the plain string."""
    sources = _config_sources()
    if sources is not None and name is not None and hasattr(sources, "parse_value"):
        return sources.parse_value(name, text, f"--set {name}")
    low = text.strip().lower()
    if low in ("none", "null"):
        return None
    if low in ("true", "false"):
        return low == "true"
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def parse_overrides(items: Sequence[str] | None) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for item in items or ():
        name, sep, value = item.partition("=")
        if not sep or not name.strip():
            raise CLIError(f"--set takes NAME=VALUE (such as density=0.1), got {item!r}")
        try:
            out[name.strip()] = parse_value(value, name.strip())
        except ValueError as e:
            raise CLIError(str(e)) from e
    return out


def resolve_config(overrides: dict[str, Any], **defaults: Any):
    """``(SPAConfig, {field: origin})``: the config files and SPA_* variables (where
    :mod:`spa_compile.config_sources` exists), then the ``--set`` overrides; ``defaults``
    (the command's own, such as bench's mode="spa") apply to fields no source set."""
    from .config import SPAConfig

    sources = _config_sources()
    try:
        if sources is not None and hasattr(sources, "resolve"):
            eff = sources.resolve(None, overrides)
            cfg = eff.config
            origins = {f.name: eff.source(f.name) for f in fields(cfg)}
            origins.update({name: "--set" for name in overrides})
        else:
            cfg = SPAConfig.from_options(dict(overrides))
            origins = {f.name: "--set" if f.name in overrides else "default" for f in fields(cfg)}
        fill = {k: v for k, v in defaults.items() if origins.get(k) == "default"}
        if fill:
            cfg = cfg.replace(**fill)
            origins.update({k: "spa command default" for k in fill})
    except (ValueError, TypeError) as e:
        raise CLIError(str(e)) from e
    return cfg, origins


def build_config(overrides: dict[str, Any], **defaults: Any):
    """The effective SPAConfig (see :func:`resolve_config`)."""
    return resolve_config(overrides, **defaults)[0]


def _write(args: argparse.Namespace, payload: str | bytes) -> None:
    out = getattr(args, "output", None)
    if out and out != "-":
        mode = "wb" if isinstance(payload, bytes) else "w"
        with open(out, mode) as f:
            f.write(payload)
        print(f"spa: wrote {out}", file=sys.stderr)
        return
    if isinstance(payload, bytes):
        if sys.stdout.isatty():
            raise CLIError("this format is binary; write it to a file with --output FILE")
        sys.stdout.flush()
        sys.stdout.buffer.write(payload)
        sys.stdout.buffer.flush()
        return
    sys.stdout.write(payload if payload.endswith("\n") else payload + "\n")


# ---------------------------------------------------------------------------------------
# Subcommands
# ---------------------------------------------------------------------------------------


def cmd_explain(args: argparse.Namespace) -> int:
    from .explain import explain

    target = load_target(args.model, args.seq_len)
    cfg = build_config(parse_overrides(args.set))
    report = explain(target.model, *target.args, config=cfg, **target.kwargs)
    if args.format == "json":
        _write(args, json.dumps(report.to_dict(), indent=2, default=str))
    else:
        _write(args, str(report))
    return EXIT_OK


def cmd_inspect(args: argparse.Namespace) -> int:
    from . import inspection

    if args.format == "mlir":
        inspection.torch_mlir_fx()
    if args.format in ("svg", "png"):
        inspection.graphviz_dot()
    target = load_target(args.model, args.seq_len)
    cfg = build_config(parse_overrides(args.set))
    cap = inspection.capture(target.model, *target.args, config=cfg, **target.kwargs)
    _write(args, cap.render(args.format, args.stage, verbose=args.verbose_code))
    return EXIT_OK


def _config_table(cfg, origins: dict[str, str]) -> str:
    rows = [(f.name, json.dumps(getattr(cfg, f.name), default=str), origins.get(f.name, "")) for f in fields(cfg)]
    w0 = max(len(r[0]) for r in rows)
    w1 = max(len(r[1]) for r in rows)
    lines = ["spa_compile effective config", f"  {'field'.ljust(w0)}  {'value'.ljust(w1)}  source"]
    lines += [f"  {a.ljust(w0)}  {b.ljust(w1)}  {c}".rstrip() for a, b, c in rows]
    return "\n".join(lines)


def _site_patterns(cfg, target: Target) -> list[dict[str, Any]]:
    """The model's attention sites (fake-tensor trace) and the ``sites`` pattern that names each."""
    import fnmatch

    from .explain import explain

    report = explain(target.model, *target.args, config=cfg, **target.kwargs)
    rows = []
    for site in report.sites:
        pattern = next((p for p in cfg.sites if fnmatch.fnmatchcase(site.name, p)), None)
        rows.append({"site": site.name, "pattern": pattern, "decision": site.decision, "reason": site.reason})
    return rows


def cmd_config(args: argparse.Namespace) -> int:
    cfg, origins = resolve_config(parse_overrides(args.set))
    sites = None
    if args.model:
        sites = _site_patterns(cfg, load_target(args.model, args.seq_len))
    if args.format == "json":
        data: dict[str, Any] = {f.name: {"value": getattr(cfg, f.name), "source": origins[f.name]} for f in fields(cfg)}
        if sites is not None:
            data = {"config": data, "sites": sites}
        _write(args, json.dumps(data, indent=2, default=str))
    else:
        text = _config_table(cfg, origins)
        if sites is not None:
            text += f"\n\nattention sites of {args.model} and the `sites` pattern naming each:\n"
            if not sites:
                text += "  (none found)"
            w = max([len(r["site"]) for r in sites] + [4])
            unused = [p for p in cfg.sites if not any(r["pattern"] == p for r in sites)]
            text += "\n".join(
                f"  {r['site'].ljust(w)}  {(r['pattern'] or '-'):<20}  {r['decision']}  ({r['reason']})" for r in sites
            )
            if unused:
                text += "\nsites patterns that name no site: " + ", ".join(repr(p) for p in unused)
        _write(args, text)
    return EXIT_OK


def cmd_calibrate(args: argparse.Namespace) -> int:
    from .calibrate import cli_main

    target = load_target(args.model, args.seq_len)
    cfg = build_config(parse_overrides(args.set))
    args.json = args.format == "json"
    return int(cli_main(args, target, cfg) or 0)


def _flat_tensors(value) -> list:
    import torch
    from torch.utils._pytree import tree_leaves

    return [x for x in tree_leaves(value) if isinstance(x, torch.Tensor)]


def bench(target: Target, cfg, device: str = "cpu", min_run_time: float = 0.5) -> dict[str, Any]:
    """Time the model compiled with SPA against the same model with every site dense.

    Both run through the ``spa`` backend with the same inner backend; the dense one has
    ``mode="dense"``. Timings are ``torch.utils.benchmark`` medians on ``device``.
    """
    import functools

    import torch
    import torch.utils.benchmark as tb
    from torch.utils._pytree import tree_map

    from .backend import recording, spa_backend
    from .explain import _isolated_dynamo

    if device.startswith("cuda") and not torch.cuda.is_available():
        raise CLIError("--device cuda was asked for, but torch sees no CUDA device")
    move = lambda x: x.to(device) if isinstance(x, torch.Tensor) else x  # noqa: E731
    model = target.model.to(device) if isinstance(target.model, torch.nn.Module) else target.model
    args, kwargs = tree_map(move, target.args), tree_map(move, target.kwargs)
    dense_cfg = cfg.replace(mode="dense")
    sites: list = []
    results: dict[str, Any] = {}
    outputs = {}
    with torch.no_grad(), _isolated_dynamo():
        for label, c in (("dense", dense_cfg), ("spa", cfg)):
            fn = torch.compile(model, backend=functools.partial(spa_backend, options=c), dynamic=False)
            if label == "spa":
                with recording(sites.append):
                    outputs[label] = fn(*args, **kwargs)  # compiles
            else:
                outputs[label] = fn(*args, **kwargs)
            timer = tb.Timer(
                stmt="fn(*args, **kwargs)", globals={"fn": fn, "args": args, "kwargs": kwargs},
                label="spa bench", sub_label=target.spec, description=label,
                num_threads=torch.get_num_threads(),
            )
            m = timer.blocked_autorange(min_run_time=min_run_time)
            results[label] = {"median_s": m.median, "iqr_s": m.iqr, "runs": len(m.times) * m.number_per_run}
    diffs = [
        (a.float() - b.float()).abs().max().item()
        for a, b in zip(_flat_tensors(outputs["spa"]), _flat_tensors(outputs["dense"]))
        if a.shape == b.shape and a.is_floating_point()
    ]
    n_spa = sum(1 for _, d in sites if d.decision == "spa")
    return {
        "model": target.spec,
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.startswith("cuda") else "cpu",
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "config": dataclasses.asdict(cfg),
        "sites": len(sites),
        "spa_sites": n_spa,
        "dense": results["dense"],
        "spa": results["spa"],
        "speedup": results["dense"]["median_s"] / results["spa"]["median_s"],
        "max_abs_diff": max(diffs) if diffs else None,
    }


def _ms(seconds: float) -> str:
    return f"{seconds * 1e3:.3f} ms"


def format_bench(r: dict[str, Any]) -> str:
    cfg = r["config"]
    lines = [
        f"spa bench: {r['model']} on {r['device']} ({r['device_name']}), torch {r['torch']}, {r['threads']} thread(s)",
        f"config: mode={cfg['mode']} density={cfg['density']} topk={cfg['topk']} block_size={cfg['block_size']} "
        f"fill={cfg['fill']} inner_backend={cfg['inner_backend']}",
        f"sites: {r['sites']} attention site(s), {r['spa_sites']} run SPA",
        f"  {'':6}{'median':>14}{'IQR':>14}{'runs':>8}",
    ]
    for label in ("dense", "spa"):
        m = r[label]
        lines.append(f"  {label:6}{_ms(m['median_s']):>14}{_ms(m['iqr_s']):>14}{m['runs']:>8}")
    lines.append(f"speedup (dense / spa median): {r['speedup']:.2f}x")
    if r["max_abs_diff"] is not None:
        lines.append(
            f"max |spa - dense| over the outputs: {r['max_abs_diff']:.3g} "
            "(SPA approximates attention; 0 up to rounding only when every visible block is selected)"
        )
    if r["spa_sites"] == 0:
        lines.append("note: no site ran SPA, so both rows time the same dense graph (see `spa explain`).")
    if not r["device"].startswith("cuda"):
        lines.append(
            "note: on CPU the spa.attention op runs the pure-PyTorch reference (the Triton kernels are "
            "CUDA-only); these numbers say nothing about GPU performance."
        )
    return "\n".join(lines)


def cmd_bench(args: argparse.Namespace) -> int:
    target = load_target(args.model, args.seq_len)
    cfg = build_config(parse_overrides(args.set), mode="spa", inner_backend="eager")
    result = bench(target, cfg, device=args.device, min_run_time=args.min_run_time)
    _write(args, json.dumps(result, indent=2, default=str) if args.format == "json" else format_bench(result))
    return EXIT_OK


# ---------------------------------------------------------------------------------------
# The parser
# ---------------------------------------------------------------------------------------

_SET_HELP = (
    "override an SPAConfig field, NAME=VALUE, repeatable, above config files and SPA_* variables "
    "(for example --set density=0.1 --set mode=spa --set topk=none --set 'sites=model.layers.0.*=dense' "
    "or --set 'sites={\"model.layers.0.*\": \"dense\"}'); values take the field's type"
)


class _Formatter(argparse.RawDescriptionHelpFormatter):
    pass


def _add_verbose(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "-v", "--verbose", action="count", default=argparse.SUPPRESS,
        help="log each site's decision on stderr (-v: info, -vv: debug); same as SPA_LOG=1 / SPA_LOG=debug",
    )


def _add_model_args(p: argparse.ArgumentParser, seq_len_help: str = "") -> None:
    _add_verbose(p)
    p.add_argument("model", metavar="MODEL", help=MODEL_HELP)
    p.add_argument(
        "--seq-len", type=int, metavar="N",
        help="sequence length passed to the factory as seq_len=N" + seq_len_help,
    )
    p.add_argument("--set", action="append", metavar="NAME=VALUE", default=[], help=_SET_HELP)


def _add_output_args(p: argparse.ArgumentParser, formats: Sequence[str], default: str, fmt_help: str) -> None:
    p.add_argument("--format", choices=formats, default=default, help=f"{fmt_help} (default: {default})")
    p.add_argument("--output", "-o", metavar="FILE", help="write to FILE instead of standard output")


def build_parser() -> argparse.ArgumentParser:
    from .config import SPAConfig

    field_names = ", ".join(f.name for f in fields(SPAConfig))
    parser = argparse.ArgumentParser(
        prog="spa",
        formatter_class=_Formatter,
        description=(
            "spa: the command line of spa_compile, the torch.compile backend that rewrites attention "
            "into Sparse Projected Attention (SPA)."
        ),
        epilog=(
            "MODEL is package.module:factory or path/to/file.py[:factory] (factory defaults to "
            f"{DEFAULT_FACTORY}).\nThe factory returns (model, args) or (model, args, kwargs) and gets "
            "seq_len=N from --seq-len.\n\n"
            f"SPAConfig fields for --set: {field_names}.\n\n"
            "Logging: -v prints each attention site's decision as the backend runs (as SPA_LOG=1 does);\n"
            "-vv adds debug lines. TORCH_LOGS=spa_compile works too.\n\n"
            "Examples:\n"
            "  spa explain model.py --seq-len 8192\n"
            "  spa inspect mypkg.models:tiny --format fx --stage after --set mode=spa\n"
            "  spa inspect model.py --format mlir --output after.mlir\n"
            "  spa inspect model.py --format svg --output sites.svg\n"
            "  spa config --set density=0.1\n"
            "  spa bench model.py --seq-len 1024 --set density=0.1\n\n"
            "Run 'spa COMMAND --help' for the options of each command."
        ),
    )
    from . import __version__

    parser.add_argument("--version", action="version", version=f"spa_compile {__version__}")
    parser.add_argument(
        "-v", "--verbose", action="count", default=0,
        help="log each site's decision on stderr (-v: info, -vv: debug); same as SPA_LOG=1 / SPA_LOG=debug",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", title="commands")

    p = sub.add_parser(
        "explain", formatter_class=_Formatter,
        help="which attention sites SPA takes and why (traced on fake tensors, nothing runs)",
        description=(
            "Trace the model on fake tensors through the SPA passes and print, per attention site, "
            "the decision (spa or dense), the mask kind, the shapes and the reason."
        ),
        epilog="Example:\n  spa explain model.py --seq-len 8192 --set mode=auto --format json",
    )
    _add_model_args(p)
    _add_output_args(p, ("text", "json"), "text", "output format")
    p.set_defaults(func=cmd_explain)

    p = sub.add_parser(
        "inspect", formatter_class=_Formatter,
        help="the graphs before/after the SPA passes: FX code, MLIR, or pictures",
        description=(
            "Show the FX graphs Dynamo captures, before or after the SPA passes.\n"
            "  fx    the graph code, each attention site annotated with a '# spa site' comment\n"
            "        (site name, decision, pattern, mask kind, k)\n"
            "  mlir  torch-dialect MLIR from torch-mlir's FX importer: SPA sites are\n"
            "        torch.operator \"torch.spa.attention\", dense sites the aten ops\n"
            "        (needs torch-mlir: pip install 'spa_compile[mlir]')\n"
            "  dot   Graphviz source of the attention subgraphs (SPA sites green, rewritten ops bold)\n"
            "  svg, png  the same drawn by Graphviz 'dot' (must be on PATH); png needs --output\n"
            "The model is traced on fake tensors: nothing runs."
        ),
        epilog=(
            "Examples:\n"
            "  spa inspect model.py --stage before\n"
            "  spa inspect model.py --format mlir --set mode=spa -o after.mlir\n"
            "  spa inspect model.py --format png -o sites.png"
        ),
    )
    _add_model_args(p)
    _add_output_args(p, ("fx", "mlir", "dot", "svg", "png"), "fx", "what to print")
    p.add_argument(
        "--stage", choices=("before", "after"), default="after",
        help="the graph as Dynamo captured it (before) or as the SPA passes left it (after; default)",
    )
    p.add_argument(
        "--source-lines", dest="verbose_code", action="store_true",
        help="in --format fx, keep the '# File: ...' source-location comments",
    )
    p.set_defaults(func=cmd_inspect)

    p = sub.add_parser(
        "config", formatter_class=_Formatter,
        help="print the effective SPAConfig and where each value came from",
        description=(
            "Print the effective SPAConfig and the source of each value: the defaults, [tool.spa] in "
            "./pyproject.toml, ./spa.toml, SPA_<FIELD> environment variables, then the --set overrides "
            "(highest)."
        ),
        epilog=(
            "Examples:\n  spa config --set density=0.1 --set mode=spa --format json\n"
            "  spa config model.py --set 'sites=model.layers.0.*=dense'"
        ),
    )
    _add_verbose(p)
    p.add_argument(
        "model", metavar="MODEL", nargs="?",
        help=MODEL_HELP + ". Optional: with it, config also lists the model's attention sites and the "
        "`sites` pattern that names each (a fake-tensor trace; nothing runs)",
    )
    p.add_argument("--seq-len", type=int, metavar="N", help="sequence length passed to the factory as seq_len=N")
    p.add_argument("--set", action="append", metavar="NAME=VALUE", default=[], help=_SET_HELP)
    _add_output_args(p, ("text", "json"), "text", "output format")
    p.set_defaults(func=cmd_config)

    p = sub.add_parser(
        "calibrate", formatter_class=_Formatter,
        help="train the projectors of a model's attention sites (spa_compile.calibrate)",
        description=(
            "Calibrate (distil) the SPA projectors of every attention site on the model's example "
            "inputs (one batch) and write them to --output; prints block recall and output error per "
            "site (spa_compile.calibrate).\n"
            "Use the file with --set projectors=FILE (or options={'projectors': FILE})."
        ),
        epilog="Example:\n  spa calibrate model.py --seq-len 4096 --steps 200 --output projectors.safetensors",
    )
    _add_model_args(p)
    p.add_argument("--output", "-o", metavar="FILE", help="where to write the projectors (safetensors)")
    p.add_argument("--steps", type=int, metavar="N", help="optimiser steps per site (default: 200)")
    p.add_argument("--rank", type=int, metavar="R", help="rank r of Pq/Pk (default: the head dim D)")
    p.add_argument("--lr", type=float, metavar="LR", help="learning rate (default: 0.01)")
    p.add_argument(
        "--format", choices=("text", "json"), default="text", help="report format (default: text)",
    )
    p.set_defaults(func=cmd_calibrate)

    p = sub.add_parser(
        "bench", formatter_class=_Formatter,
        help="time the model with SPA against the same model kept dense (CPU by default)",
        description=(
            "Compile the model twice through the spa backend, once with every site dense (mode=dense) "
            "and once with SPA, run both on the factory's inputs and report torch.utils.benchmark "
            "medians, the speedup and the largest output difference.\n"
            "Defaults for bench: mode=spa and inner_backend=eager (override with --set). On CPU the SPA "
            "op runs the pure-PyTorch reference, not the GPU kernels: CPU numbers say nothing about GPUs."
        ),
        epilog="Example:\n  spa bench model.py --seq-len 1024 --set density=0.1 --min-run-time 1",
    )
    _add_model_args(p)
    _add_output_args(p, ("text", "json"), "text", "output format")
    p.add_argument("--device", default="cpu", help="device to run on (default: cpu)")
    p.add_argument(
        "--min-run-time", type=float, default=0.5, metavar="SECONDS",
        help="least time spent timing each variant, for torch.utils.benchmark (default: 0.5)",
    )
    p.set_defaults(func=cmd_bench)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "command", None):
        parser.print_help(sys.stderr)
        return EXIT_USAGE
    if args.verbose:
        from .logging_setup import configure_logging

        configure_logging("debug" if args.verbose > 1 else "info")
    from .inspection import GraphvizUnavailableError, MLIRUnavailableError

    try:
        return args.func(args)
    except CLIError as e:
        print(f"spa {args.command}: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except (MLIRUnavailableError, GraphvizUnavailableError) as e:
        print(f"spa {args.command}: error: {e}", file=sys.stderr)
        return EXIT_UNAVAILABLE


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
