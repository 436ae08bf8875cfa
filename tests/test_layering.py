"""The architecture's rules (DESIGN.md, "Layout"), checked on every module rather than trusted.

- `bert/` is single-device code: no module of it imports Ray, MLflow or `torch.distributed`,
  neither in its source nor, transitively, when it is imported.
- Imports point down the layers and never in a circle: the graph of every import in `bert/` and
  `pipelines/` (inside functions and under `TYPE_CHECKING` too: a lazy import is still a
  dependency) has no cycle, and no module imports one of a higher layer.
- No function in `bert/` or `pipelines/` runs past 80 lines. (Files are split where their
  concepts split, not at a line count.)
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BERT_MODULES = sorted(".".join(p.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
                      for p in (ROOT / "bert").rglob("*.py"))
FORBIDDEN = ("ray", "mlflow", "torch.distributed")


def imported_modules(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names.update(f"{node.module}.{a.name}" for a in node.names)
    return names


@pytest.mark.parametrize("path", sorted((ROOT / "bert").rglob("*.py")), ids=lambda p: str(p.relative_to(ROOT)))
def test_no_bert_source_imports_distribution_or_tracking(path):
    bad = {name for name in imported_modules(path) for f in FORBIDDEN if name == f or name.startswith(f + ".")}
    assert not bad, f"{path.relative_to(ROOT)} imports {sorted(bad)}: bert/ is single-device code"


def test_importing_every_bert_module_loads_no_distribution_or_tracking():
    """Transitively too: importing all of bert/ in a fresh interpreter leaves ray and mlflow unloaded,
    and torch.distributed untouched by bert (torch itself may load it lazily; we check our modules do not)."""
    probe = ("import importlib, sys\n"
             f"for m in {BERT_MODULES!r}: importlib.import_module(m)\n"
             "print(sorted(m for m in sys.modules if m.split('.')[0] in ('ray', 'mlflow')))")
    out = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "[]", out.stdout


def test_functions_stay_short():
    long_functions = []
    for path in sorted([*(ROOT / "bert").rglob("*.py"), *(ROOT / "pipelines").rglob("*.py")]):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno >= 80:
                long_functions.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name}")
    assert not long_functions, long_functions


# ----------------------------------------------------------------------------- the import graph

# Layers, lowest first (DESIGN.md, "Layout"); a module not named here is in the layer of its package.
LAYERS = (
    ("bert",),  # single-device library
    ("pipelines.config_args", "pipelines.outdir", "pipelines.tracking", "pipelines.ray_runtime",
     "pipelines.lease", "pipelines.pyfunc_model", "pipelines.models", "pipelines"),  # what every job shares
    ("pipelines.jobs",),  # one Ray job per command
    ("pipelines.dag",),  # pipelines of jobs
    ("pipelines.commands",),  # the command line
    ("pipelines.cli",),
)
PROJECT_MODULES = {".".join(p.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__"): p
                   for p in sorted([*(ROOT / "bert").rglob("*.py"), *(ROOT / "pipelines").rglob("*.py")])}


def layer_of(module: str) -> int:
    best = max(((len(prefix), i) for i, names in enumerate(LAYERS) for prefix in names
                if module == prefix or module.startswith(prefix + ".")), default=None)
    assert best is not None, f"{module} is in no layer of LAYERS"
    return best[1]


def project_imports(module: str, path: Path) -> set[str]:
    """The project modules `module` imports anywhere in its source: `from pkg import sub` counts as an import
    of `pkg.sub` when that is a module (not of `pkg`, whose `__init__` Python runs on the way)."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parts + ([node.module] if node.module else []))
            subs = [f"{base}.{a.name}" for a in node.names if f"{base}.{a.name}" in PROJECT_MODULES]
            found.update(subs if len(subs) == len(node.names) else [base, *subs])
    resolved = set()
    for name in found:
        while name and name not in PROJECT_MODULES:
            name = name.rpartition(".")[0]
        if name and name != module:
            resolved.add(name)
    return resolved


def import_graph() -> dict[str, set[str]]:
    return {module: project_imports(module, path) for module, path in PROJECT_MODULES.items()}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for nxt in sorted(graph[node]):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_the_import_graph_has_no_cycle():
    assert cycles(import_graph()) == []


def test_no_module_imports_a_higher_layer():
    upward = [f"{module} (layer {layer_of(module)}) imports {target} (layer {layer_of(target)})"
              for module, targets in import_graph().items() for target in sorted(targets)
              if layer_of(target) > layer_of(module)]
    assert upward == []


def test_the_graph_checks_find_what_they_look_for():
    """The checks themselves: a made-up circle and a made-up upward import are found."""
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert layer_of("pipelines.dag.spec") > layer_of("pipelines.jobs.sweep_space") > layer_of("pipelines.tracking")
    assert layer_of("bert.tasks.table") == 0 and layer_of("pipelines.cli") == len(LAYERS) - 1
