"""Issue 32, item 4: the tracking store is checked before Ray starts, the same way for every job.

One rule (pipelines/tracking.py): a store a job could not log into is refused with one line saying
what to do, before anything is created in --out; a job never runs without tracking. The probes: an
unwritable store was found after 49 s and 6 tracebacks with files left in --out; an unreachable
server gave a run that could never be logged; a Ctrl-C while a new SQLite store was created left it
half-migrated (`duplicate column name: creator` on every re-run).
"""

from __future__ import annotations

import signal
import socket
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
from cli_helpers import ROOT, assert_refused, cli, tree_hash, wait_for

from pipelines.tracking import (
    TrackingStoreError,
    check_tracking_store,
    ensure_sqlite_store,
    mlflow_schema_head,
    open_run,
)


def closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]  # closed again when the block ends: nothing listens there


@pytest.fixture
def sst2(datasets_dir, tmp_path) -> Path:
    data = tmp_path / "SST-2"
    data.mkdir()
    for name in ("train.tsv", "dev.tsv"):
        lines = (datasets_dir / "glue" / "SST-2" / name).read_text(encoding="utf-8").splitlines(keepends=True)
        (data / name).write_text("".join(lines[:41]), encoding="utf-8")
    return data


def job_commands(sst2: Path, checkpoint: Path, out: Path) -> dict[str, list[object]]:
    shards = sst2.parent / "shards"  # never read: the store is refused first
    return {
        "finetune": ["finetune", "--task", "sst2", "--data", sst2, "--checkpoint", checkpoint, "--out", out],
        "sweep": ["sweep", "--task", "sst2", "--data", sst2, "--checkpoint", checkpoint, "--out", out,
                  "--grid", "paper"],
        "pretrain": ["pretrain", "--shards", shards, "--out", out, "--max-steps", "2", "--warmup-steps", "1"],
    }


def test_an_unwritable_sqlite_store_is_refused_before_anything(sst2, minilm_dir, tmp_path, capsys):
    out = tmp_path / "out"
    before = tree_hash(tmp_path)
    for command, args in job_commands(sst2, minilm_dir, out).items():
        assert_refused(cli(capsys, *args, "--tracking-uri", "sqlite:////dev/null/x/mlflow.db"), command,
                       "cannot create the MLflow store /dev/null/x/mlflow.db: /dev/null is not a folder",
                       "nothing was created")
    assert tree_hash(tmp_path) == before and not out.exists()


def test_an_unreachable_server_is_refused_the_same_way_by_every_job(sst2, minilm_dir, tmp_path, capsys,
                                                                     monkeypatch):
    server = f"http://127.0.0.1:{closed_port()}"
    out = tmp_path / "out"
    before = tree_hash(tmp_path)
    for command, args in job_commands(sst2, minilm_dir, out).items():
        assert_refused(cli(capsys, *args, "--tracking-uri", server), command,
                       f"cannot reach MLflow tracking server {server}", "start the server")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", server)  # the same through the environment, and for `bertflow run`
    assert_refused(cli(capsys, *job_commands(sst2, minilm_dir, out)["finetune"]), "finetune",
                   f"cannot reach MLflow tracking server {server}")
    workdir = tmp_path / "work"
    assert_refused(cli(capsys, "run", ROOT / "pipelines" / "quickstart.yaml", "--workdir", workdir), "run",
                   f"cannot reach MLflow tracking server {server}")
    assert tree_hash(tmp_path) == before and not out.exists() and not workdir.exists()
    with pytest.raises(TrackingStoreError, match="cannot reach"):  # and no job opens a run without tracking
        open_run(server, "bertflow-test", run_name="never")


@pytest.fixture(scope="module")
def whole_store(tmp_path_factory) -> Path:
    """A real SQLite MLflow store, created by bertflow (whole: nothing else is left beside it)."""
    folder = tmp_path_factory.mktemp("store")
    ensure_sqlite_store(f"sqlite:///{folder / 'mlflow.db'}")
    assert sorted(p.name for p in folder.iterdir()) == ["mlflow.db"]
    check_tracking_store(f"sqlite:///{folder / 'mlflow.db'}")
    return folder / "mlflow.db"


def half_migrated(store: Path, into: Path, runs: int = 0) -> Path:
    """A copy of `store` as a stopped migration leaves it: the newest migration's table gone, the version
    one step back (MLflow re-runs that migration on it and fails)."""
    into.mkdir(parents=True)
    copy = into / "mlflow.db"
    copy.write_bytes(store.read_bytes())
    with sqlite3.connect(copy) as db:
        db.execute("UPDATE alembic_version SET version_num = ?", (previous_revision(mlflow_schema_head()),))
        db.execute("DROP TABLE IF EXISTS job_locks")
        for i in range(runs):
            db.execute("INSERT INTO runs (run_uuid, name, source_type, source_name, entry_point_name, user_id, "
                       "status, start_time, lifecycle_stage, experiment_id) VALUES "
                       "(?, 'r', 'LOCAL', '', '', 'u', 'FINISHED', 0, 'active', 0)", (f"run{i}",))
    return copy


def previous_revision(revision: str) -> str:
    """The schema revision before `revision`, from MLflow's migration scripts."""
    import re

    import mlflow

    for script in (Path(mlflow.__file__).parent / "store" / "db_migrations" / "versions").glob("*.py"):
        text = script.read_text()
        if re.search(rf'^revision = "{revision}"', text, re.MULTILINE):
            return re.search(r'^down_revision = "([0-9a-f]+)"', text, re.MULTILINE).group(1)
    raise AssertionError(f"no migration script for {revision}")


def test_a_half_created_store_is_refused_with_what_to_do(whole_store, sst2, tmp_path, capsys):
    empty = half_migrated(whole_store, tmp_path / "empty")
    used = half_migrated(whole_store, tmp_path / "used", runs=2)
    out = tmp_path / "out"
    args = job_commands(sst2, tmp_path / "no-checkpoint", out)["finetune"]
    before = tree_hash(tmp_path)
    assert_refused(cli(capsys, *args, "--tracking-uri", f"sqlite:///{empty}"), "finetune",
                   f"the MLflow store {empty} was left half-created", "holds no runs", f"rm {empty}")
    assert_refused(cli(capsys, *args, "--tracking-uri", f"sqlite:///{used}"), "finetune",
                   f"the MLflow store {used} holds 2 run(s)", f"mlflow db upgrade sqlite:///{used}")
    assert tree_hash(tmp_path) == before and not out.exists()
    empty.unlink()  # what the message says to do: the next run gets past the store (and stops at the checkpoint)
    assert_refused(cli(capsys, *args, "--tracking-uri", f"sqlite:///{empty}"), "finetune", "no-checkpoint")


def test_a_store_interrupted_while_being_created_leaves_nothing(tmp_path):
    """Ctrl-C while MLflow creates a new store's tables (seconds): no half-created store stays behind."""
    store = tmp_path / "mlflow.db"
    creator = subprocess.Popen(
        [sys.executable, "-c", (f"from pipelines.tracking import ensure_sqlite_store; "
                                f"ensure_sqlite_store('sqlite:///{store}')")],
        cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        wait_for(lambda: list(tmp_path.glob(".mlflow.db.tmp-*")), 300, "MLflow to start creating the store")
        creator.send_signal(signal.SIGINT)  # in the middle of the table creation
        creator.wait(timeout=120)
    finally:
        if creator.poll() is None:
            creator.kill()
    assert creator.returncode != 0, "the creation was not interrupted"
    assert "KeyboardInterrupt" in creator.stderr.read()
    assert list(tmp_path.iterdir()) == []  # neither a half store under the final name nor its temporary
