"""The quickstart pipeline end to end, with real processes.

One module-scoped cluster: `ray start --head` on loopback (its own ports and temp dir, 4 logical
CPUs) and `mlflow server` on SQLite (its own port). The quickstart spec, with fewer steps, is
submitted with `bertflow submit --wait`; the tests then read MLflow over HTTP, re-run the spec
(all cache hits), change one fine-tune setting (only that fine-tune and the report re-run), and
SIGKILL a `bertflow run` during pretraining (the re-run resumes from the last checkpoint).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SPEC = "pipelines/quickstart.yaml"
BIN = Path(sys.executable).parent
# Small but real: every stage runs, the fine-tune trains on the whole task for one epoch.
FAST = [
    "--set", "pretrain_phase1.max_steps=20", "--set", "pretrain_phase1.warmup_steps=2",
    "--set", "pretrain_phase1.checkpoint_every=10",
    "--set", "pretrain_phase2.max_steps=6", "--set", "pretrain_phase2.warmup_steps=1",
    "--set", "finetune.epochs=1", "--set", "finetune.max_train_examples=512",
]

# ~10 minutes on 2 loaded cores: kept out of the default run (python -m pytest -m slow runs it).
pytestmark = [pytest.mark.integration, pytest.mark.slow]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(predicate, timeout: float, what: str, interval: float = 0.5):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {what}")


def http_ok(url: str) -> bool:
    import urllib.request

    try:
        with urllib.request.urlopen(url, timeout=2) as r:
            return r.status == 200
    except OSError:
        return False


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """A Ray head and an MLflow server, both on loopback with ports of their own; stopped at the end."""
    base = tmp_path_factory.mktemp("e2e")
    temp_dir = Path("/tmp") / f"rayt-{os.getpid()}"  # short: Ray's socket paths have a length limit
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", "RAY_AUTH_MODE": "disabled",
           "PYTHONPATH": str(ROOT)}
    env.pop("RAY_ADDRESS", None)
    env.pop("MLFLOW_TRACKING_URI", None)
    gcs, dashboard = free_port(), free_port()
    ports = {name: free_port() for name in ("--ray-client-server-port", "--dashboard-agent-listen-port",
                                            "--dashboard-agent-grpc-port", "--metrics-export-port",
                                            "--runtime-env-agent-port", "--node-manager-port",
                                            "--object-manager-port")}
    subprocess.run(
        [str(BIN / "ray"), "start", "--head", "--node-ip-address", "127.0.0.1", "--port", str(gcs),
         "--num-cpus", "4", "--temp-dir", str(temp_dir), "--include-dashboard", "true",
         "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dashboard),
         "--min-worker-port", "0", "--max-worker-port", "0",
         *[x for name, port in ports.items() for x in (name, str(port))], "--disable-usage-stats"],
        env=env, check=True, capture_output=True, timeout=180,
    )
    mlflow_port = free_port()
    mlflow_log = open(base / "mlflow.log", "w")
    mlflow = subprocess.Popen(
        [str(BIN / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(mlflow_port),
         "--backend-store-uri", f"sqlite:///{base / 'mlflow-server.db'}",
         "--artifacts-destination", str(base / "mlflow-artifacts"), "--workers", "1"],
        env=env, stdout=mlflow_log, stderr=subprocess.STDOUT, start_new_session=True,
    )
    try:
        wait_for(lambda: http_ok(f"http://127.0.0.1:{dashboard}/api/version"), 120, "the Ray dashboard")
        wait_for(lambda: http_ok(f"http://127.0.0.1:{mlflow_port}/health"), 120, "the MLflow server")
        yield {
            "address": f"http://127.0.0.1:{dashboard}",
            "gcs": f"127.0.0.1:{gcs}",
            "mlflow": f"http://127.0.0.1:{mlflow_port}",
            "env": env,
            "workdir": base / "work",
        }
    finally:
        os.killpg(mlflow.pid, signal.SIGTERM)
        try:
            mlflow.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(mlflow.pid, signal.SIGKILL)
        mlflow_log.close()
        stop_processes_mentioning(str(temp_dir))  # our Ray node only: `ray stop` would stop every Ray here
        shutil.rmtree(temp_dir, ignore_errors=True)


def stop_processes_mentioning(marker: str) -> None:
    """SIGTERM, then SIGKILL, the processes whose command line contains `marker` (our Ray temp dir)."""
    def ours() -> list[int]:
        pids = []
        for proc in Path("/proc").iterdir():
            if proc.name.isdigit() and int(proc.name) != os.getpid():
                try:
                    if marker in (proc / "cmdline").read_bytes().decode(errors="replace"):
                        pids.append(int(proc.name))
                except OSError:
                    continue
        return pids

    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in ours():
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        try:
            wait_for(lambda: not ours(), 20, "our Ray processes to exit")
            return
        except TimeoutError:
            continue


def bertflow(cluster, *args: str, timeout: float = 600, tracking: bool = True) -> subprocess.CompletedProcess:
    env = {**cluster["env"], "RAY_ADDRESS": cluster["gcs"]}
    if tracking:
        env["MLFLOW_TRACKING_URI"] = cluster["mlflow"]
    result = subprocess.run([sys.executable, "-m", "pipelines.cli", *args], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=timeout)
    return result


def manifests(workdir: Path) -> set[tuple[str, str, float]]:
    """(stage name, key, finish time) of every finished stage dir in the workdir."""
    out = set()
    for path in workdir.glob("*/*/_manifest.json"):
        m = json.loads(path.read_text())
        out.add((m["name"], m["key"], m["finished"]))
    return out


@pytest.fixture(scope="module")
def submitted(cluster):
    """The quickstart, submitted as a Ray job (the project shipped as its working dir)."""
    started = time.time()
    result = bertflow(cluster, "submit", SPEC, "--address", cluster["address"], "--workdir", str(cluster["workdir"]),
                      *FAST, "--wait", timeout=900)
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-3000:]
    return {"stdout": result.stdout, "seconds": time.time() - started}


def test_submit_tracks_everything_in_mlflow(cluster, submitted):
    from mlflow.tracking import MlflowClient

    assert "SUCCEEDED" in submitted["stdout"]
    client = MlflowClient(tracking_uri=cluster["mlflow"])
    experiment = client.get_experiment_by_name("bertflow-quickstart")
    runs = client.search_runs([experiment.experiment_id], max_results=500)
    parents = [r for r in runs if "bertflow.run_key" in r.data.tags]
    assert len(parents) == 1
    parent = parents[0]
    assert parent.info.status == "FINISHED"
    assert parent.data.tags["bertflow.spec_name"] == "quickstart" and parent.data.tags["bertflow.git_revision"]
    nested = {r.data.tags["bertflow.node"]: r for r in runs
              if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id and "bertflow.node" in r.data.tags}
    assert set(nested) == {"corpus", "tokenizer", "shards_128", "shards_256", "pretrain_phase1", "pretrain_phase2",
                           "finetune.pydoc_kind.seed1", "finetune.pydoc_kind.seed2", "report"}
    assert all(r.info.status == "FINISHED" and "seconds" in r.data.metrics for r in nested.values())
    assert nested["shards_128"].data.metrics["examples"] > 1000
    assert 0.0 < nested["finetune.pydoc_kind.seed1"].data.metrics["dev/accuracy"] <= 1.0
    # the training runs of pretrain and finetune nest under their stage runs, with their curves
    train_runs = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == nested["pretrain_phase1"].info.run_id]
    assert len(train_runs) == 1
    assert len(client.get_metric_history(train_runs[0].info.run_id, "loss")) >= 2
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id, "report")}
    assert {"report/report.md", "report/pretrain_curves.png", "report/results.json"} <= artifacts
    report = client.download_artifacts(parent.info.run_id, "report/report.md")
    text = Path(report).read_text()
    assert "| finetune.pydoc_kind (sst2) | 2 | dev/accuracy |" in text and " ± " in text


def test_rerun_is_all_cache_hits_and_one_change_reruns_only_downstream(cluster, submitted):
    work = cluster["workdir"]
    before = manifests(work)
    status = bertflow(cluster, "status", SPEC, "--workdir", str(work), *FAST)
    assert status.returncode == 0, status.stderr
    assert "9 cached" in status.stdout and "missing" not in status.stdout

    again = bertflow(cluster, "run", SPEC, "--workdir", str(work), *FAST)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert "0 stage(s) ran, 9 cached" in again.stdout
    assert manifests(work) == before  # same files, same timestamps: nothing recomputed

    changed = bertflow(cluster, "run", SPEC, "--workdir", str(work), *FAST,
                       "--set", "finetune.tasks.pydoc_kind.learning_rate=3e-4", "--set", "finetune.seeds=[1]")
    assert changed.returncode == 0, changed.stdout[-3000:] + changed.stderr[-3000:]
    new = manifests(work) - before
    assert sorted(name for name, _, _ in new) == ["finetune.pydoc_kind.seed1", "report"]
    assert "2 stage(s) ran, 6 cached" in changed.stdout


def test_killed_during_pretraining_resumes(cluster):
    work = cluster["workdir"].with_name("work-kill")
    longer = [*FAST, "--set", "pretrain_phase1.max_steps=60", "--set", "pretrain_phase1.checkpoint_every=10"]
    env = {**cluster["env"], "RAY_ADDRESS": cluster["gcs"]}
    upstream = bertflow(cluster, "run", SPEC, "--workdir", str(work), *longer, "--until", "shards_128")
    assert upstream.returncode == 0, upstream.stdout[-3000:] + upstream.stderr[-3000:]
    plan = bertflow(cluster, "run", SPEC, "--workdir", str(work), *longer, "--until", "pretrain_phase1", "--dry-run")
    key = next(re.search(r"\b([0-9a-f]{16})\b", line).group(1) for line in plan.stdout.splitlines()
               if line.startswith("pretrain_phase1 "))
    final = work / "pretrain" / key
    steps = final.with_name(key + ".work") / "run" / "_ray" / "train"
    log = open(work.parent / "killed.log", "w")
    driver = subprocess.Popen([sys.executable, "-m", "pipelines.cli", "run", SPEC, "--workdir", str(work), *longer,
                               "--until", "pretrain_phase1"], cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_for(lambda: any((d / "train_state.json").is_file() for d in steps.glob("step-*")), 400,
                 "the first pretraining checkpoint")
    finally:
        driver.send_signal(signal.SIGKILL)
        driver.wait()
        log.close()
    assert not (final / "_manifest.json").exists()
    killed_at = max(json.loads((d / "train_state.json").read_text())["step"]
                    for d in steps.glob("step-*") if (d / "train_state.json").is_file())
    assert 0 < killed_at < 60
    assert bertflow(cluster, "status", SPEC, "--workdir", str(work), *longer).stdout.count("missing") >= 1

    resumed = bertflow(cluster, "run", SPEC, "--workdir", str(work), *longer, "--until", "pretrain_phase1")
    assert resumed.returncode == 0, resumed.stdout[-4000:] + resumed.stderr[-3000:]
    out = resumed.stdout + resumed.stderr
    assert "1 stage(s) ran, 3 cached" in resumed.stdout  # corpus, tokenizer, shards_128 reused
    match = re.search(r"\[pretrain\] resuming from \S+ \(step (\d+)\)", out)
    assert match and int(match.group(1)) >= killed_at, out[-4000:]
    manifest = json.loads((final / "pretrain_manifest.json").read_text())
    assert manifest["complete"] and manifest["step"] == 60
    assert not list(final.parent.glob(f".{key}.tmp-*")) and not final.with_name(key + ".work").exists()


def test_two_runs_of_one_workdir_at_once(cluster):
    """While a run holds the workdir, a second run of the same spec refuses."""
    work = cluster["workdir"].with_name("work-lock")
    env = {**cluster["env"], "RAY_ADDRESS": cluster["gcs"]}
    first = subprocess.Popen([sys.executable, "-m", "pipelines.cli", "run", SPEC, "--workdir", str(work), *FAST,
                              "--until", "tokenizer"], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True)
    try:
        wait_for(lambda: "pid" in ((work / ".lock").read_text() if (work / ".lock").exists() else ""), 60,
                 "the first run to take the lock")
        second = bertflow(cluster, "run", SPEC, "--workdir", str(work), *FAST, tracking=False)
        assert second.returncode == 2
        assert "is in use by another pipeline run (pid" in second.stderr
    finally:
        out, _ = first.communicate(timeout=300)
    assert first.returncode == 0, out[-3000:]


def test_submitted_job_whose_driver_dies_is_submitted_again_and_resumes(cluster):
    """Driver loss: the driver of a `bertflow submit` job (the job's entrypoint, `bertflow run` on the head) is
    killed mid-pretraining; the job ends FAILED and what it had done stays. Submitting the same spec again is
    what the user does: the finished stages are cache hits and pretraining resumes from its newest checkpoint."""
    from ray.job_submission import JobStatus, JobSubmissionClient

    work = cluster["workdir"].with_name("work-driver")
    longer = [*FAST, "--set", "pretrain_phase1.max_steps=60", "--set", "pretrain_phase1.checkpoint_every=10"]
    plan = bertflow(cluster, "run", SPEC, "--workdir", str(work), *longer, "--until", "pretrain_phase1", "--dry-run")
    key = next(re.search(r"\b([0-9a-f]{16})\b", line).group(1) for line in plan.stdout.splitlines()
               if line.startswith("pretrain_phase1 "))
    steps = work / "pretrain" / (key + ".work") / "run" / "_ray" / "train"
    submitted = bertflow(cluster, "submit", SPEC, "--address", cluster["address"], "--workdir", str(work), *longer)
    assert submitted.returncode == 0, submitted.stdout[-3000:] + submitted.stderr[-3000:]
    job_id = re.search(r"submitted job (\S+) to", submitted.stdout).group(1)
    client = JobSubmissionClient(cluster["address"])
    wait_for(lambda: any((d / "train_state.json").is_file() for d in steps.glob("step-*"))
             or client.get_job_status(job_id).is_terminal(), 900, "the first pretraining checkpoint")
    assert not client.get_job_status(job_id).is_terminal(), client.get_job_logs(job_id)[-4000:]
    os.kill(int(client.get_job_info(job_id).driver_info.pid), signal.SIGKILL)
    wait_for(lambda: client.get_job_status(job_id).is_terminal(), 120, "the job to end")
    assert client.get_job_status(job_id) == JobStatus.FAILED
    killed_at = max(json.loads((d / "train_state.json").read_text())["step"]
                    for d in steps.glob("step-*") if (d / "train_state.json").is_file())

    again = bertflow(cluster, "submit", SPEC, "--address", cluster["address"], "--workdir", str(work), *longer,
                     "--wait", timeout=1200)
    assert again.returncode == 0 and "SUCCEEDED" in again.stdout, again.stdout[-6000:] + again.stderr[-3000:]
    match = re.search(r"\[pretrain\] resuming from \S+ \(step (\d+)\)", again.stdout)
    assert match and int(match.group(1)) >= killed_at, again.stdout[-4000:]
    manifest = json.loads((work / "pretrain" / key / "pretrain_manifest.json").read_text())
    assert manifest["complete"] and manifest["step"] == 60
    from mlflow.tracking import MlflowClient

    history = MlflowClient(manifest["mlflow"]["tracking_uri"]).get_metric_history(manifest["mlflow"]["run_id"], "loss")
    assert len({m.step for m in history}) == len(history)  # no step logged twice across the two drivers
