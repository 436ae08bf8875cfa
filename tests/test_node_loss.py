"""A worker node lost mid-job, for every kind of job that runs on the cluster's workers.

Each test builds a cluster on loopback (tests/loopback.py): a head without CPUs, where the job's
driver and Ray Train's controller live, and one worker node A with CPUs, so every worker of the job
runs on A. Once the job has made progress worth keeping (a checkpoint, a finished trial), node B
joins and A is lost: every process of A (raylet and workers) killed at once, as a preempted machine
goes. The job must finish on B with one MLflow run, no step logged twice and no temporaries left
(a shard build, which has no MLflow run, with the bytes a build without a fault makes).
(Pretraining's own node-loss tests, elastic 2 -> 1 workers, are in tests/test_pretrain.py.)

Minutes each on 2 cores: all `slow` (`python -m pytest -m slow tests/test_node_loss.py`).
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from loopback import LoopbackCluster

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]


def launch(cluster: LoopbackCluster, log: Path, *args: str, **popen) -> subprocess.Popen:
    """`bertflow ARGS` on the cluster, its output (stdout and stderr) to `log`, which `output` reads back."""
    job = cluster.bertflow(*args, stdout=open(log, "w"), stderr=subprocess.STDOUT, **popen)
    job.log = log
    return job


def output(job: subprocess.Popen, chars: int = 4000) -> str:
    return job.log.read_text(errors="replace")[-chars:]


def wait_for(predicate, timeout: float, what: str, job: subprocess.Popen) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return
        if job.poll() is not None:
            raise AssertionError(f"the job ended (rc {job.returncode}) before {what}:\n{output(job)}")
        time.sleep(1)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}; the job's output ends:\n{output(job)}")


def lose_node_a_for_b(cluster: LoopbackCluster, node_a: subprocess.Popen, cpus: int) -> float:
    """B joins, then A is lost (SIGKILL to its process group); returns when A was killed."""
    cluster.start(f"--num-cpus={cpus}", nodes=3)
    os.killpg(node_a.pid, signal.SIGKILL)
    return time.time()


def finish(job: subprocess.Popen, timeout: float = 1800) -> str:
    try:
        job.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        job.kill()
        raise AssertionError(f"the job did not end in {timeout:.0f} s; its output ends:\n{output(job)}") from None
    assert job.returncode == 0, output(job, 6000)
    return output(job, 1_000_000)


def temporaries(root: Path) -> list[Path]:
    """What a writer leaves only when killed mid-write: `.<name>.tmp-*` / `.<name>.old-*` siblings
    (pipelines/outdir.py) and a job's checkpoint staging dir (`STAGING` of the pretrain and fine-tune jobs)."""
    from pipelines.jobs.pretrain import STAGING

    return [p for p in root.rglob("*") if re.search(r"^\..*\.(tmp|old)-", p.name) or p.name == STAGING]


def no_step_twice(tracking_uri: str, run_id: str, key: str) -> list[int]:
    steps = [m.step for m in MlflowClient(tracking_uri).get_metric_history(run_id, key)]
    assert steps and len(steps) == len(set(steps)), f"{key} logged twice at some step: {sorted(steps)}"
    return steps


def mrpc(datasets_dir: Path, minilm_dir: Path, out: Path, *extra: str) -> list[str]:
    return ["--task", "mrpc", "--data", str(datasets_dir / "glue" / "MRPC"), "--checkpoint", str(minilm_dir),
            "--out", str(out), "--max-train-examples", "96", "--max-eval-examples", "64", "--batch-size", "16",
            "--learning-rate", "5e-5", "--log-every", "1", "--precision", "fp32", *extra]


def test_finetune_loses_its_node_and_finishes_on_another(datasets_dir, minilm_dir, tmp_path):
    with LoopbackCluster("rayf") as cluster:
        cluster.start("--num-cpus=0", nodes=1)
        node_a = cluster.start("--num-cpus=1", nodes=2)
        out = tmp_path / "out"
        job = launch(cluster, tmp_path / "job.log", "finetune",
                     *mrpc(datasets_dir, minilm_dir, out, "--epochs", "3", "--no-log-model", "--max-failures", "2"))
        first_epoch = out / "_ray" / "train" / "seed-42" / "epoch-001" / "finetune_state.json"
        wait_for(first_epoch.is_file, 1500, "the first epoch's checkpoint", job)
        node_of_a = json.loads((out / "_workers" / "rank0.json").read_text())["node_id"]
        lost_at = lose_node_a_for_b(cluster, node_a, cpus=1)
        text = finish(job)
        recovered_s = time.time() - lost_at
    worker = json.loads((out / "_workers" / "rank0.json").read_text())
    assert worker["node_id"] != node_of_a  # finished on B
    result = json.loads((out / "metrics.json").read_text())
    assert [h["epoch"] for h in result["history"]] == [1, 2, 3], text[-3000:]
    record = json.loads((out / "mlflow_run.json").read_text())
    client = MlflowClient(record["tracking_uri"])
    runs = client.search_runs([client.get_run(record["run_id"]).info.experiment_id],
                              filter_string=f"tags.`bertflow.out` = '{out.resolve()}'")
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    no_step_twice(record["tracking_uri"], record["run_id"], "train/loss")
    assert not temporaries(out)
    print(f"finetune: node lost, finished {recovered_s:.0f} s later")


def test_sweep_loses_the_node_of_a_running_trial_which_resumes_on_another(datasets_dir, minilm_dir, tmp_path):
    with LoopbackCluster("rays") as cluster:
        cluster.start("--num-cpus=0", nodes=1)
        node_a = cluster.start("--num-cpus=1", nodes=2)
        out, space = tmp_path / "out", tmp_path / "space.yaml"
        space.write_text("learning_rate: {grid: [5.0e-5, 3.0e-5]}\n")
        job = launch(cluster, tmp_path / "job.log", "sweep", *mrpc(datasets_dir, minilm_dir, out, "--epochs", "2"),
                     "--space", str(space), "--seeds", "none")
        trained = out / "trials" / "trial-000" / "_ray" / "train" / "seed-42" / "epoch-001" / "finetune_state.json"
        wait_for(trained.is_file, 1500, "trial-000's first epoch", job)
        lost_at = lose_node_a_for_b(cluster, node_a, cpus=1)
        finish(job)
        recovered_s = time.time() - lost_at
    result = json.loads((out / "sweep.json").read_text())
    assert [t["status"] for t in result["trials"]] == ["finished", "finished"]
    for name in ("trial-000", "trial-001"):
        record = json.loads((out / "trials" / name / "mlflow_run.json").read_text())
        steps = no_step_twice(record["tracking_uri"], record["run_id"], "train/loss")
        assert max(steps) == len(steps)  # every step once, none missing
        assert [h["epoch"] for h in json.loads((out / "trials" / name / "metrics.json").read_text())["history"]] == [1, 2]
    assert not temporaries(out)
    print(f"sweep: node lost, finished {recovered_s:.0f} s later")


def test_pipeline_loses_the_node_running_pretraining_and_finishes(tmp_path):
    """`bertflow run` of the quickstart up to phase 1 pretraining: the node running it is lost after its
    first checkpoint; the stage is retried on the node that joined and resumes from that checkpoint."""
    work = tmp_path / "work"
    fast = ["--set", "pretrain_phase1.max_steps=40", "--set", "pretrain_phase1.warmup_steps=2",
            "--set", "pretrain_phase1.checkpoint_every=10", "--set", "pretrain_phase1.log_every=1",
            "--set", "pretrain_phase1.eval_every=1000"]
    with LoopbackCluster("rayp") as cluster:
        cluster.start("--num-cpus=0", nodes=1)
        node_a = cluster.start("--num-cpus=2", nodes=2)
        job = launch(cluster, tmp_path / "job.log", "run", "pipelines/quickstart.yaml", "--workdir", str(work), *fast,
                     "--until", "pretrain_phase1", cwd=ROOT)

        def checkpointed() -> bool:
            return any((d / "train_state.json").is_file() for d in work.glob("pretrain/*.work/run/_ray/train/step-*"))

        wait_for(checkpointed, 1500, "phase 1's first checkpoint", job)
        lost_at = lose_node_a_for_b(cluster, node_a, cpus=2)
        text = finish(job)
        recovered_s = time.time() - lost_at
    assert "stage(s) ran" in text
    manifests = [json.loads(p.read_text()) for p in work.glob("pretrain/*/pretrain_manifest.json")]
    assert len(manifests) == 1 and manifests[0]["complete"] and manifests[0]["step"] == 40
    record = manifests[0]["mlflow"]
    steps = no_step_twice(record["tracking_uri"], record["run_id"], "loss")
    assert steps == list(range(1, 41))
    assert not list(work.glob("pretrain/*.work")) and not temporaries(work)
    print(f"pipeline: node lost, finished {recovered_s:.0f} s later")


def test_shard_build_loses_its_node_and_finishes_with_the_bytes_of_a_build_without_a_fault(wiki_dir, vocab_txt,
                                                                                             tmp_path):
    """`bertflow shards build` loses the node running its Ray Data tasks after the first bucket file is
    written. Ray Data retries the lost tasks (and rebuilds lost blocks from lineage) on the node that
    joined; every task writes its files whole under names of its own (a retry writes them again), so the
    build finishes with the part files, manifest and listing of a build on the same cluster without a fault."""
    import hashlib

    corpus = tmp_path / "wiki"
    corpus.mkdir()
    for i in range(30, 42):
        (corpus / f"wiki_{i:02d}.gz").symlink_to(wiki_dir / f"wiki_{i:02d}.gz")

    def build(out: Path) -> subprocess.Popen:
        return launch(cluster, out.with_suffix(".log"), "shards", "build", "--corpus", str(corpus), "--tokenizer",
                      str(vocab_txt), "--out", str(out), "--dupe-factor", "2", "--num-shards", "6",
                      "--files-per-task", "1")

    out, reference = tmp_path / "shards", tmp_path / "reference"
    with LoopbackCluster("rayd") as cluster:
        cluster.start("--num-cpus=0", nodes=1)
        node_a = cluster.start("--num-cpus=1", nodes=2)
        job = build(out)
        wait_for(lambda: any((out / "_work").rglob("*.parquet")), 1500, "the first bucket file", job)
        cluster.start("--num-cpus=1", nodes=3)
        assert job.poll() is None, f"the build ended before node A was lost:\n{output(job)}"
        pass_hit = "build (pass 2)" if (out / "_work" / "tokenized.json").is_file() else "tokenize (pass 1)"
        parts_before = len(list(out.glob("part-*.parquet")))
        os.killpg(node_a.pid, signal.SIGKILL)
        lost_at = time.time()
        text = finish(job)
        recovered_s = time.time() - lost_at
        finish(build(reference))

    def hashes(root: Path) -> dict[str, str]:
        return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.glob("part-*.parquet"))}

    assert len(hashes(out)) == 6 and hashes(out) == hashes(reference), text[-3000:]
    listing = [sorted(str(p.relative_to(root)) for p in root.rglob("*")) for root in (out, reference)]
    assert listing[0] == listing[1]  # no temporary, no `_work` left
    manifest, expected = (json.loads((root / "_manifest.json").read_text()) for root in (out, reference))
    assert manifest["parts"] == expected["parts"] and manifest["counts"] == expected["counts"]
    print(f"shards: node lost in {pass_hit} ({parts_before} of 6 parts written), finished {recovered_s:.0f} s later")
