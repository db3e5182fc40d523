"""``spa_compile.inspect``: the FX graphs before and after the SPA passes, as text, MLIR or pictures.

    print(spa_compile.inspect(model, x, format="fx", stage="after"))

The model and inputs are copied into fake tensors and traced by Dynamo, as
:func:`spa_compile.explain` does: nothing is computed. Each graph Dynamo hands
to the backend is kept twice, as it came in (``stage="before"``) and as the
passes left it (``stage="after"``), and rendered in one of :data:`FORMATS`:

- ``"fx"``: the graph's Python code, each attention site annotated with a
  ``# spa site ...`` comment (site name, decision, pattern, mask kind, k);
- ``"mlir"``: torch-dialect MLIR through torch-mlir's FX importer. SPA sites
  are ``torch.operator "torch.spa.attention"`` calls (torch-mlir names a custom
  op ``torch.<namespace>.<name>``), dense sites stay aten ops such as
  ``torch.aten.scaled_dot_product_attention``. Needs the optional ``mlir`` extra;
- ``"dot"``: Graphviz source of the attention subgraphs, drawn from a networkx
  view of the graph, SPA sites filled green and rewritten ops outlined bold;
  ``"svg"`` and ``"png"`` run Graphviz's ``dot`` on it (``dot`` must be on PATH).
"""

from __future__ import annotations

import copy
import re
import shutil
import subprocess
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

import torch
import torch.fx as fx
from torch._subclasses.fake_tensor import FakeCopyMode, FakeTensorMode

from .backend import apply_spa_passes
from .config import SPAConfig
from .explain import _isolated_dynamo, _to_fake

FORMATS = ("fx", "mlir", "dot", "svg", "png")
STAGES = ("before", "after")

# Fill colours of the drawings: what the passes decided for a site.
_COLORS = {"spa": "palegreen", "dense": "lightgoldenrod1"}


class MLIRUnavailableError(RuntimeError):
    """``format="mlir"`` cannot run here: torch-mlir is missing or does not work with this torch."""


class GraphvizUnavailableError(RuntimeError):
    """``format="svg"``/``"png"`` needs Graphviz's ``dot`` program on PATH."""


# ---------------------------------------------------------------------------------------
# What one trace captured
# ---------------------------------------------------------------------------------------


@dataclass
class SiteInfo:
    """One attention site as the passes saw it; node fields are FX node names."""

    name: str
    decision: str
    reason: str
    pattern: str
    mask: str
    k: str  # "k/nkb" for an SPA site ("1/2"), "all" for a dense one
    node: str  # the site's output node in the "before" graph
    inputs: list[str]  # q, k, v (and the mask) nodes
    spa_node: str | None = None  # the torch.ops.spa.attention node in the "after" graph
    chain: list[str] = field(default_factory=list)  # a decomposed site's matched nodes (matmul ... matmul)

    def summary(self) -> str:
        return f"{self.name}: {self.decision} pattern={self.pattern} mask={self.mask} k={self.k} ({self.reason})"

    def comment(self) -> str:
        """The annotation written above the site's node: ``spa site NAME: DECISION ...``."""
        return f"spa site {self.summary()}"


@dataclass
class GraphCapture:
    before: fx.GraphModule
    after: fx.GraphModule
    example_inputs: list
    sites: list[SiteInfo] = field(default_factory=list)

    def module(self, stage: str) -> fx.GraphModule:
        return self.before if stage == "before" else self.after


@dataclass
class Capture:
    """Every graph of one trace, before and after the SPA passes; :meth:`render` draws them."""

    config: SPAConfig
    graphs: list[GraphCapture] = field(default_factory=list)

    @property
    def sites(self) -> list[SiteInfo]:
        return [s for g in self.graphs for s in g.sites]

    def render(self, format: str = "fx", stage: str = "after", verbose: bool = False) -> str | bytes:
        _check_choice("format", format, FORMATS)
        _check_choice("stage", stage, STAGES)
        if format == "fx":
            return render_fx(self, stage, verbose=verbose)
        if format == "mlir":
            return render_mlir(self, stage)
        dot = render_dot(self, stage)
        return dot if format == "dot" else run_graphviz(dot, format)


def _check_choice(name: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"inspect: {name}={value!r} is not one of {', '.join(map(repr, allowed))}")


def _k_label(site, decision: str, cfg: SPAConfig) -> str:
    """k of SPEC.md section 2 for a query block that sees every key block, over the key blocks."""
    if decision != "spa":
        return "all"
    shape = tuple(getattr(site, "k_shape", ()) or ())
    if len(shape) < 2:
        return "?"
    nk = shape[-2]
    if isinstance(nk, torch.SymInt):
        nk = nk.node.hint
    nkb = -(-int(nk) // cfg.block_size)
    k = cfg.topk if cfg.topk is not None else (nkb * cfg.density_ppm + 999_999) // 1_000_000
    if cfg.min_blocks is not None:
        k = max(k, cfg.min_blocks)
    if cfg.max_blocks is not None:
        k = min(k, cfg.max_blocks)
    return f"{min(k, nkb)}/{nkb}"


def _node_name(x: Any) -> str | None:
    return x.name if isinstance(x, fx.Node) else None


def _site_info(site, decision, cfg: SPAConfig) -> SiteInfo:
    inputs = [_node_name(getattr(site, a, None)) for a in ("q", "k", "v", "attn_mask")]
    return SiteInfo(
        name=site.name,
        decision=decision.decision,
        reason=decision.reason,
        pattern=getattr(site, "pattern", "sdpa"),
        mask=getattr(site, "mask_kind", "?"),
        k=_k_label(site, decision.decision, cfg),
        node=site.node.name,
        inputs=[n for n in inputs if n is not None],
        chain=[n.name for n in (getattr(site, "chain", None) or ()) if isinstance(n, fx.Node)],
    )


def _copy_module(gm: fx.GraphModule) -> fx.GraphModule:
    # Graph.__deepcopy__ copies nodes (names kept) and shares their meta values (fake tensors).
    return fx.GraphModule(gm, copy.deepcopy(gm.graph))


def capture(
    model_or_fn: Callable, *args, config: SPAConfig | Mapping[str, Any] | None = None, **kwargs
) -> Capture:
    """Trace ``model_or_fn(*args, **kwargs)`` on fake tensors through the SPA passes; keep every graph."""
    cfg = config if isinstance(config, SPAConfig) else SPAConfig.from_options(config)
    cfg = cfg.replace(inner_backend="eager")  # nothing is compiled or run for real
    result = Capture(config=cfg)

    def backend(gm: fx.GraphModule, example_inputs):
        before = _copy_module(gm)
        records = apply_spa_passes(gm, cfg)
        graph = GraphCapture(before=before, after=gm, example_inputs=list(example_inputs))
        spa_nodes = {
            n.meta["spa_site"]: n.name for n in gm.graph.nodes if n.op == "call_function" and "spa_site" in n.meta
        }
        for site, decision in records:
            info = _site_info(site, decision, cfg)
            info.spa_node = spa_nodes.get(info.name)
            graph.sites.append(info)
        result.graphs.append(graph)
        return gm.forward

    mode = FakeTensorMode(allow_non_fake_inputs=True)
    target = model_or_fn
    if isinstance(model_or_fn, torch.nn.Module):
        with FakeCopyMode(mode):
            target = copy.deepcopy(model_or_fn)
    fake_args, fake_kwargs = _to_fake(mode, args), _to_fake(mode, kwargs)
    compiled = torch.compile(target, backend=backend, dynamic=False)
    with _isolated_dynamo(), mode:
        compiled(*fake_args, **fake_kwargs)
    return result


def inspect(
    model_or_fn: Callable,
    *args,
    format: str = "fx",
    stage: str = "after",
    config: SPAConfig | Mapping[str, Any] | None = None,
    verbose: bool = False,
    **kwargs,
) -> str | bytes:
    """Show the graphs of ``model_or_fn(*args, **kwargs)`` before or after the SPA passes.

    format:  "fx" (annotated graph code), "mlir" (torch-mlir's FX importer; needs the
             ``mlir`` extra), "dot" (Graphviz source of the attention subgraphs), "svg"
             or "png" (rendered by Graphviz ``dot``; "png" returns bytes).
    stage:   "before" or "after" the passes.
    config:  an :class:`SPAConfig` or a dict of its fields (as ``options=``).
    verbose: in "fx", keep the source-location comments (``# File: ...``).

    The model is traced on fake tensors: shapes and dtypes only, nothing runs.
    ``format``, ``stage``, ``config`` and ``verbose`` are taken by ``inspect``;
    any other keyword argument goes to the model.
    """
    _check_choice("format", format, FORMATS)
    _check_choice("stage", stage, STAGES)
    if format == "mlir":
        torch_mlir_fx()  # fail before tracing when torch-mlir is missing
    if format in ("svg", "png"):
        graphviz_dot()
    return capture(model_or_fn, *args, config=config, **kwargs).render(format, stage, verbose=verbose)


# ---------------------------------------------------------------------------------------
# FX
# ---------------------------------------------------------------------------------------

# Source-location comments of print_readable, dropped unless verbose.
_FILE_COMMENT = re.compile(r"^\s*# (File: |No stacktrace found for following nodes)")


def _anchor(site: SiteInfo, stage: str) -> str:
    return site.spa_node if stage == "after" and site.spa_node else site.node


def _graph_header(cap: Capture, stage: str, i: int, comment: str) -> list[str]:
    g = cap.graphs[i]
    n_spa = sum(s.decision == "spa" for s in g.sites)
    return [
        f"{comment} spa_compile.inspect: stage={stage} graph {i + 1} of {len(cap.graphs)}: "
        f"{len(g.sites)} attention site(s), {n_spa} SPA, {len(g.sites) - n_spa} dense",
        *(f"{comment}   {s.summary()}" for s in g.sites),
    ]


def render_fx(cap: Capture, stage: str = "after", verbose: bool = False) -> str:
    if not cap.graphs:
        return "# spa_compile.inspect: Dynamo captured no graph\n"
    out: list[str] = []
    for i, g in enumerate(cap.graphs):
        code = g.module(stage).print_readable(print_output=False)
        lines = code.splitlines()
        if not verbose:
            kept: list[str] = []
            for ln in lines:
                m = _FILE_COMMENT.match(ln)
                if m is None:
                    kept.append(ln)
                elif m.group(1).startswith("No stacktrace") and kept and not kept[-1].strip():
                    kept.pop()  # nodes the passes inserted: no group of their own
            lines = kept
        anchors = {_anchor(s, stage): s for s in g.sites}
        annotated = []
        for ln in lines:
            m = re.match(r"^(\s*)([A-Za-z_][A-Za-z0-9_]*)(?:: \"[^\"]*\")? = ", ln)
            if m and m.group(2) in anchors:
                annotated.append(f"{m.group(1)}# {anchors[m.group(2)].comment()}")
            annotated.append(ln)
        out += _graph_header(cap, stage, i, "#") + annotated + [""]
    return "\n".join(out)


# ---------------------------------------------------------------------------------------
# MLIR
# ---------------------------------------------------------------------------------------


def torch_mlir_fx():
    """torch-mlir's ``torch_mlir.fx`` module, or :class:`MLIRUnavailableError` saying why not."""
    try:
        from torch_mlir import fx as tm_fx
    except ImportError as e:
        raise MLIRUnavailableError(
            "format='mlir' needs torch-mlir, which could not be imported "
            f"({type(e).__name__}: {e}). Install it with: pip install 'spa_compile[mlir]' "
            "(or pip install --no-deps torch-mlir next to an existing torch)"
        ) from e
    if not hasattr(tm_fx, "export_and_import"):
        raise MLIRUnavailableError(
            "format='mlir' needs torch_mlir.fx.export_and_import, which this torch-mlir "
            f"({getattr(tm_fx, '__file__', '?')}) does not have"
        )
    return tm_fx


def mlir_unavailable_reason() -> str | None:
    """Why ``format="mlir"`` cannot work here, or None when it can."""
    try:
        torch_mlir_fx()
    except MLIRUnavailableError as e:
        return str(e)
    return None


class _Wrap(torch.nn.Module):
    def __init__(self, gm: fx.GraphModule) -> None:
        super().__init__()
        self.gm = gm

    def forward(self, *args):
        return self.gm(*args)


def graph_to_mlir(gm: fx.GraphModule, example_inputs, func_name: str = "main") -> str:
    """torch-dialect MLIR of a Dynamo graph: exported to ATen (no decompositions), then imported."""
    tm_fx = torch_mlir_fx()
    try:
        program = torch.export.export(_Wrap(gm), tuple(example_inputs), strict=False)
        module = tm_fx.export_and_import(program, decomposition_table={}, func_name=func_name)
    except Exception as e:
        raise MLIRUnavailableError(
            f"torch-mlir could not import the graph ({type(e).__name__}: {e}); "
            f"torch {torch.__version__}, torch-mlir {_torch_mlir_version()}"
        ) from e
    return str(module)


def _torch_mlir_version() -> str:
    try:
        from importlib.metadata import version

        return version("torch-mlir")
    except Exception:
        return "?"


def render_mlir(cap: Capture, stage: str = "after") -> str:
    torch_mlir_fx()
    if not cap.graphs:
        return "// spa_compile.inspect: Dynamo captured no graph\n"
    parts = []
    for i, g in enumerate(cap.graphs):
        text = graph_to_mlir(g.module(stage), g.example_inputs, func_name=f"graph{i}" if i else "main")
        parts.append("\n".join(_graph_header(cap, stage, i, "//") + [text.rstrip()]))
    return "\n// -----\n".join(parts) + "\n"


# ---------------------------------------------------------------------------------------
# Pictures: networkx view -> Graphviz
# ---------------------------------------------------------------------------------------


def _short_target(node: fx.Node) -> str:
    if node.op == "placeholder":
        return "input"
    if node.op == "output":
        return "output"
    if node.op == "get_attr":
        return f"get_attr {node.target}"
    if node.op == "call_method":
        return f".{node.target}()"
    if node.op == "call_module":
        return f"module {node.target}"
    t = node.target
    if isinstance(t, torch._ops.OpOverload):
        return f"{t._schema.name.replace('::', '.')}"
    return getattr(t, "__name__", str(t))


def _shape_label(node: fx.Node) -> str:
    val = node.meta.get("example_value", node.meta.get("val"))
    if isinstance(val, torch.Tensor):
        dt = str(val.dtype).replace("torch.", "")
        return f"{dt}[{', '.join(str(d) for d in val.shape)}]"
    return ""


def to_networkx(gm: fx.GraphModule):
    """A networkx DiGraph of the FX graph: one vertex per node (by name), an edge per use."""
    import networkx as nx

    g = nx.DiGraph()
    for node in gm.graph.nodes:
        g.add_node(node.name, op=node.op, target=_short_target(node), shape=_shape_label(node))
    for node in gm.graph.nodes:
        for inp in node.all_input_nodes:
            g.add_edge(inp.name, node.name)
    return g


def _site_nodes(g, site: SiteInfo, stage: str) -> set[str]:
    """The nodes of one attention: everything on a path from q/k/v/mask to the site's output."""
    import networkx as nx

    out = _anchor(site, stage)
    if out not in g:
        return set()
    core = {out}
    if stage == "after" and site.spa_node:
        for user in g.successors(out):  # getitem(s), and the squeeze of a 3-D site
            core.add(user)
            core.update(u for u in g.successors(user) if g.nodes[u]["target"] == ".squeeze()")
    ancestors = nx.ancestors(g, out)
    for inp in site.inputs:
        if inp in g:
            core |= nx.descendants(g, inp) & ancestors
    core.update(n for n in site.chain if n in g)  # a decomposed chain, where the matcher recorded it
    return core


def _dot_quote(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'


def render_dot(cap: Capture, stage: str = "after", context: int = 1) -> str:
    """Graphviz source: per site a cluster of its nodes, ``context`` hops of neighbours around it."""
    lines = [
        "digraph spa_inspect {",
        f"  label={_dot_quote(f'spa_compile.inspect stage={stage}')};",
        "  labelloc=t; rankdir=TB;",
        '  node [shape=box, style="rounded,filled", fillcolor=white, fontname="Helvetica", fontsize=10];',
    ]
    if not any(g.sites for g in cap.graphs):
        lines.append('  none [label="no attention sites", shape=plaintext];')
    for gi, gcap in enumerate(cap.graphs):
        g = to_networkx(gcap.module(stage))
        clusters: dict[str, tuple[int, SiteInfo]] = {}
        keep: set[str] = set()
        for si, site in enumerate(gcap.sites):
            core = _site_nodes(g, site, stage)
            for n in core:
                clusters.setdefault(n, (si, site))
            around = set(core) | {i for i in site.inputs if i in g}
            for _ in range(context):
                around |= {p for n in around for p in g.predecessors(n)} | {s for n in around for s in g.successors(n)}
            keep |= around
        view = g.subgraph(keep)
        nid = lambda n: _dot_quote(f"g{gi}.{n}")  # noqa: E731
        by_cluster: dict[int, list[str]] = {}
        order = {n: i for i, n in enumerate(g.nodes)}  # FX order: topological, and stable across runs
        for n in sorted(view.nodes, key=order.__getitem__):
            attrs = view.nodes[n]
            label = "\n".join(x for x in (n, attrs["target"], attrs["shape"]) if x)
            style = {}
            if n in clusters:
                _, site = clusters[n]
                style["fillcolor"] = _COLORS.get(site.decision, "white")
                if stage == "after" and n == site.spa_node:
                    style["penwidth"] = "3"
                    label += "\n(rewritten)"
            else:
                style["color"] = "gray50"
                style["fontcolor"] = "gray30"
            attr = ", ".join([f"label={_dot_quote(label)}"] + [f"{k}={_dot_quote(v)}" for k, v in style.items()])
            line = f"    {nid(n)} [{attr}];"
            if n in clusters:
                by_cluster.setdefault(clusters[n][0], []).append(line)
            else:
                lines.append(line[2:])
        for si, body in sorted(by_cluster.items()):
            site = gcap.sites[si]
            title = f"{site.name}: {site.decision} (mask={site.mask}, k={site.k})"
            lines.append(f"  subgraph cluster_g{gi}_s{si} {{")
            lines.append(f"    label={_dot_quote(title)}; style=rounded; color={_dot_quote('gray40')};")
            lines += body
            lines.append("  }")
        for a, b in sorted(view.edges, key=lambda e: (order[e[1]], order[e[0]])):
            lines.append(f"  {nid(a)} -> {nid(b)};")
    lines.append("}")
    return "\n".join(lines) + "\n"


def graphviz_dot() -> str:
    path = shutil.which("dot")
    if path is None:
        raise GraphvizUnavailableError(
            "format='svg'/'png' needs Graphviz's 'dot' program on PATH, and there is none "
            "(install graphviz, e.g. apt-get install graphviz), or use format='dot' and render it elsewhere"
        )
    return path


def run_graphviz(dot_source: str, fmt: str) -> str | bytes:
    proc = subprocess.run(
        [graphviz_dot(), f"-T{fmt}"], input=dot_source.encode(), capture_output=True, check=False, timeout=120
    )
    if proc.returncode:
        raise RuntimeError(f"dot -T{fmt} failed: {proc.stderr.decode(errors='replace').strip()}")
    return proc.stdout.decode() if fmt == "svg" else proc.stdout


__all__ = [
    "FORMATS",
    "STAGES",
    "Capture",
    "GraphCapture",
    "SiteInfo",
    "GraphvizUnavailableError",
    "MLIRUnavailableError",
    "capture",
    "inspect",
    "mlir_unavailable_reason",
    "to_networkx",
]
