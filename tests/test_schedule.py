"""`bertflow schedule`: the RayCronJob validates against KubeRay's CRD schema; the image holds bertflow; the crontab line runs.

The CRD (`../shared/kuberay/ray.io_raycronjobs.yaml`, KubeRay v1.6) is the reference. The API server
refuses fields a CRD does not declare (kubectl's strict field validation), which a plain JSON-schema
check would let through, so the schema is made strict the same way: an object with declared
properties and no `x-kubernetes-preserve-unknown-fields` takes no others.
"""

from __future__ import annotations

import copy
import re
import shlex
import subprocess
import sys
from pathlib import Path

import jsonschema
import pytest
import yaml

from pipelines.cli import main

ROOT = Path(__file__).resolve().parents[1]
CRD = ROOT.parent / "shared" / "kuberay" / "ray.io_raycronjobs.yaml"
QUICKSTART = ROOT / "pipelines" / "quickstart.yaml"


def strict(schema):
    """The schema with `additionalProperties: false` wherever Kubernetes would refuse unknown fields."""
    if isinstance(schema, dict):
        schema = {k: strict(v) for k, v in schema.items()}
        if ("properties" in schema and "additionalProperties" not in schema
                and not schema.get("x-kubernetes-preserve-unknown-fields")):
            schema["additionalProperties"] = False
        return schema
    if isinstance(schema, list):
        return [strict(v) for v in schema]
    return schema


@pytest.fixture(scope="module")
def validator() -> jsonschema.Draft7Validator:
    if not CRD.is_file():
        pytest.fail(f"KubeRay CRD missing: {CRD}")
    crd = yaml.safe_load(CRD.read_text())
    (served,) = [v for v in crd["spec"]["versions"] if v["served"] and v["name"] == "v1"]
    schema = strict(served["schema"]["openAPIV3Schema"])
    jsonschema.Draft7Validator.check_schema(schema)
    return jsonschema.Draft7Validator(schema)


def schedule(capsys, *argv: str) -> tuple[str, dict]:
    assert main(["schedule", str(QUICKSTART), "--cron", "0 3 * * *", *argv]) == 0
    out = capsys.readouterr().out
    crontab = next(line for line in out.splitlines() if line.startswith("0 3 * * * "))
    return crontab, yaml.safe_load(out.split("---\n", 1)[1])


def test_raycronjob_validates_against_the_kuberay_crd(validator, capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://mlflow.example:5000")
    _, manifest = schedule(capsys, "--workdir", str(tmp_path / "nightly"), "--set", "pretrain.max_steps=50")
    errors = [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(manifest)]
    assert not errors, errors
    assert manifest["apiVersion"] == "ray.io/v1" and "concurrencyPolicy" not in manifest["spec"]
    requires = manifest["metadata"]["annotations"]["bertflow/requires"]
    assert "KubeRay >= v1.6.0" in requires and "--feature-gates=RayCronJob=true" in requires
    job = manifest["spec"]["jobTemplate"]
    env = yaml.safe_load(job["runtimeEnvYAML"])["env_vars"]
    assert env["BERTFLOW_WORKDIR"] == "/mnt/bertflow/work/nightly"
    assert env["MLFLOW_TRACKING_URI"] == "http://mlflow.example:5000"
    assert shlex.split(job["entrypoint"]) == ["bertflow", "run", "/workspace/bertflow/pipelines/quickstart.yaml",
                                              "--workdir", "$BERTFLOW_WORKDIR", "--wait-lock",
                                              "--set", "pretrain.max_steps=50"]
    # nothing of this machine in it: no local path, no interpreter, no local tracking store
    text = yaml.safe_dump(manifest)
    for local in (str(tmp_path), str(ROOT), sys.executable, str(Path.home())):
        assert local not in text
    images = {c["image"] for group in [job["rayClusterSpec"]["headGroupSpec"], *job["rayClusterSpec"]["workerGroupSpecs"]]
              for c in group["template"]["spec"]["containers"]}
    assert images == {"bertflow:0.1.0"}
    # the strict schema refuses what the CRD does not have (the old manifest's concurrencyPolicy)
    broken = copy.deepcopy(manifest)
    broken["spec"]["concurrencyPolicy"] = "Forbid"
    assert any("concurrencyPolicy" in e.message for e in validator.iter_errors(broken))


def test_local_tracking_store_is_not_put_into_the_manifest(capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/mlflow.db")
    _, manifest = schedule(capsys, "--workdir", str(tmp_path / "w"), "--image", "registry.example/bertflow:0.1.0")
    env = yaml.safe_load(manifest["spec"]["jobTemplate"]["runtimeEnvYAML"])["env_vars"]
    assert "MLFLOW_TRACKING_URI" not in env and str(tmp_path) not in yaml.safe_dump(manifest)
    assert "registry.example/bertflow:0.1.0" in yaml.safe_dump(manifest)


def test_dockerfile_base_image_matches_the_project_ray():
    import importlib.metadata

    import tomllib
    from packaging.requirements import Requirement

    from pipelines.dag.schedule import RAY_VERSION

    dockerfile = (ROOT / "Dockerfile").read_text()
    assert re.search(r"^ARG RAY_VERSION=(\S+)$", dockerfile, re.MULTILINE).group(1) == RAY_VERSION
    assert re.search(r"^FROM rayproject/ray:\$\{RAY_VERSION\}-", dockerfile, re.MULTILINE)
    assert re.search(r"pip install .* -e \.", dockerfile)  # the project, into the image
    assert importlib.metadata.version("ray") == RAY_VERSION
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    (ray,) = [Requirement(r) for r in pyproject["project"]["dependencies"] if Requirement(r).name == "ray"]
    assert ray.specifier.contains(RAY_VERSION)


def test_crontab_line_runs(capsys, tmp_path):
    """The crontab command (cron fields cut off) runs as cron would run it; here with `status`, which plans
    the same spec and workdir without running the pipeline."""
    crontab, _ = schedule(capsys, "--workdir", str(tmp_path / "w"))
    command = crontab.split(" ", 5)[5]  # cron runs it with /bin/sh and a bare PATH
    assert " -m pipelines.cli run " in command and "--wait-lock" in command
    status = command.replace(" -m pipelines.cli run ", " -m pipelines.cli status ").replace(" --wait-lock", "")
    done = subprocess.run(["/bin/sh", "-c", status], capture_output=True, text=True, timeout=300, check=False,
                          env={"PATH": "/usr/bin:/bin"})
    assert done.returncode == 0, done.stderr
    log = (tmp_path / "w" / "cron.log").read_text()
    assert "corpus" in log and "tokenizer" in log


def test_every_imported_package_is_declared():
    """The image installs the project from pyproject.toml: a package bert/ or pipelines/ imports must be in its
    dependencies, or the image (and any clean install) fails at that import."""
    import ast
    import importlib.metadata
    import tomllib

    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    declared = {canonicalize_name(Requirement(r).name) for r in pyproject["project"]["dependencies"]}
    distributions = importlib.metadata.packages_distributions()
    missing = {}
    for path in [*(ROOT / "bert").rglob("*.py"), *(ROOT / "pipelines").rglob("*.py")]:
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module] if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module else []
            for top in {name.split(".")[0] for name in names} - set(sys.stdlib_module_names) - {"bert", "pipelines"}:
                if not {canonicalize_name(d) for d in distributions.get(top, [top])} & declared:
                    missing.setdefault(top, str(path.relative_to(ROOT)))
    assert not missing, f"imported but not in pyproject.toml's dependencies: {missing}"
