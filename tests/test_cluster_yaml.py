"""cluster.yaml starts as written: Ray's own validation passes, every variable a command uses is defined
on the node that runs it, storage is one S3 bucket named once, and the bucket check a node runs works."""

from __future__ import annotations

import copy
import os
import re
import subprocess
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
SHELL = {"HOME", "USER", "PATH", "PWD", "SHELL"}  # defined in any login shell on the node
RAY_WORKER = {"RAY_HEAD_IP"}  # exported by the Ray autoscaler into a worker's setup and start commands
VARIABLE = re.compile(r"\$\{?([A-Za-z_][A-Za-z0-9_]*)|environ\[['\"]([A-Za-z_][A-Za-z0-9_]*)")
PROFILE_EXPORT = re.compile(r"export ([A-Za-z_][A-Za-z0-9_]*)=")


@pytest.fixture(scope="module")
def config() -> dict:
    return yaml.safe_load((ROOT / "cluster.yaml").read_text())


def test_ray_validates_the_cluster_config(config):
    from ray.autoscaler._private.util import prepare_config, validate_config

    prepared = prepare_config(copy.deepcopy(config))  # what `ray up` does before it calls AWS
    validate_config(prepared)
    assert prepared["head_node_type"] in prepared["available_node_types"]


def _commands(config: dict, kind: str) -> list[str]:
    """A node's commands in the order the cluster launcher runs them."""
    return [*config["initialization_commands"], *config["setup_commands"], *config[f"{kind}_setup_commands"],
            *config[f"{kind}_start_ray_commands"]]


@pytest.mark.parametrize("kind", ["head", "worker"])
def test_every_variable_is_defined_on_the_node(config, kind):
    """Nothing comes from the launching shell: a variable is the shell's, Ray's, or exported earlier
    on the node through /etc/profile.d (every command runs in a login shell)."""
    defined = SHELL | (RAY_WORKER if kind == "worker" else set())
    undefined = []
    for command in _commands(config, kind):
        used = {a or b for a, b in VARIABLE.findall(command)}
        undefined += [f"{name} in: {command}" for name in sorted(used - defined)]
        if "/etc/profile.d/" in command:
            defined |= set(PROFILE_EXPORT.findall(command))
    assert not undefined, undefined


def test_storage_is_one_bucket_named_once_and_no_shared_file_system(config):
    commands = [c for kind in ("head", "worker") for c in _commands(config, kind)]
    unique = list(dict.fromkeys(commands))
    named = [c for c in unique if "s3://" in c]
    assert len(named) == 1 and "/etc/profile.d/" in named[0], named
    text = " ".join(unique).lower()
    for banned in ("efs", "nfs", "mount ", "|| true"):
        assert banned not in text, banned
    for name, node_type in config["available_node_types"].items():
        assert "IamInstanceProfile" in node_type["node_config"], f"{name}: no instance profile, no S3 access"


def test_the_node_bucket_check_runs_as_written(config, s3_server, s3_uri):
    """The setup command that proves a node can write to the bucket, run here against the S3 server."""
    [check] = [c for c in config["setup_commands"] if "storage.write_json" in c]
    command = check.replace("cd /home/ubuntu/bertflow && ", "")
    env = {**os.environ, "BERTFLOW_STORAGE": s3_uri}
    out = subprocess.run(["bash", "-c", command], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    from bert import storage

    assert len(storage.list_dir(f"{s3_uri}/nodes")) == 1
