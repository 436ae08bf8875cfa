"""The architecture's rules (DESIGN.md, "Layout"), checked on every module rather than trusted.

- `bert/` is single-device code: no module of it imports Ray, MLflow or `torch.distributed`,
  neither in its source nor, transitively, when it is imported.
- No function in `bert/` or `pipelines/` runs past 80 lines and no file past 500.
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


def test_functions_and_files_stay_short():
    long_functions, long_files = [], []
    for path in sorted([*(ROOT / "bert").rglob("*.py"), *(ROOT / "pipelines").rglob("*.py")]):
        source = path.read_text()
        if source.count("\n") > 500:
            long_files.append(f"{path.relative_to(ROOT)}: {source.count(chr(10))} lines")
        for node in ast.walk(ast.parse(source)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno >= 80:
                long_functions.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name}")
    assert not long_files and not long_functions, (long_files, long_functions)
