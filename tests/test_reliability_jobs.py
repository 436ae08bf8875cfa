"""Reliability of the training jobs (issue #18), each finding reproduced as a user would, through the CLI.

Drivers that must be SIGKILLed run as `bertflow` subprocesses joined to the test session's Ray
runtime (so killing them leaves Ray up, as it would a cluster). Assertions are about what is on
disk (tree hashes before and after a refusal), step numbers and MLflow run histories.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import pickle
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from cli_helpers import wait_for
from pipelines.cli import main

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[1]


def cli(*argv: str) -> tuple[int, str]:
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        code = main(list(argv))
    return code, err.getvalue()


def tree_hash(root: Path) -> str:
    """Names, sizes and contents of everything under `root`."""
    digest = hashlib.sha256()
    for path in sorted(root.rglob("*")):
        digest.update(str(path.relative_to(root)).encode())
        if path.is_file():
            digest.update(path.read_bytes())
    return digest.hexdigest()


def driver(ray_local, *args: str, log: Path) -> subprocess.Popen:
    """`bertflow ARGS` as its own process, joined to the session's Ray runtime."""
    env = {**os.environ, "RAY_ADDRESS": ray_local.get_runtime_context().gcs_address, "PYTHONPATH": str(ROOT)}
    return subprocess.Popen([sys.executable, "-m", "pipelines.cli", *args], cwd=ROOT, env=env,
                            stdout=open(log, "w"), stderr=subprocess.STDOUT)


def runs_tagged(out: Path) -> list:
    record = json.loads((out / "mlflow_run.json").read_text())
    client = MlflowClient(record["tracking_uri"])
    experiment = client.get_run(record["run_id"]).info.experiment_id
    return client.search_runs([experiment], filter_string=f"tags.`bertflow.out` = '{out.resolve()}'")


def metric_steps(out: Path, key: str) -> list[int]:
    record = json.loads((out / "mlflow_run.json").read_text())
    return sorted(m.step for m in MlflowClient(record["tracking_uri"]).get_metric_history(record["run_id"], key))


def mrpc_args(datasets_dir: Path, minilm_dir: Path, out: Path, *extra: str) -> list[str]:
    return ["finetune", "--task", "mrpc", "--data", str(datasets_dir / "glue" / "MRPC"), "--checkpoint",
            str(minilm_dir), "--out", str(out), "--max-train-examples", "96", "--max-eval-examples", "64",
            "--batch-size", "16", "--learning-rate", "5e-5", "--no-log-model", "--log-every", "2",
            "--precision", "fp32", *extra]


# ----------------------------------------------------------------------------- refusals before any work


def test_pretrain_and_finetune_refuse_an_out_they_do_not_own(small_shards, datasets_dir, minilm_dir, tmp_path):
    other = tmp_path / "results"
    other.mkdir()
    (other / "metrics.json").write_text("{}")
    (other / "notes.txt").write_text("mine")
    before = tree_hash(tmp_path)
    code, err = cli("pretrain", "--shards", str(small_shards), "--out", str(other), "--max-steps", "2",
                    "--warmup-steps", "1")
    assert code == 2 and f"{other} already holds a fine-tune output (metrics.json)" in err
    code, err = cli(*mrpc_args(datasets_dir, minilm_dir, other))
    assert code == 2 and "refusing to write into it" in err
    # an output inside an input is refused too
    code, err = cli("pretrain", "--shards", str(small_shards), "--out", str(small_shards / "run"), "--max-steps", "2",
                    "--warmup-steps", "1")
    assert code == 2 and "lies inside the input" in err
    assert tree_hash(tmp_path) == before and not (small_shards / "run").exists()


def test_finetune_checks_a_malicious_checkpoint_before_ray_and_mlflow(datasets_dir, minilm_dir, tmp_path):
    """Finding 10: the refusal comes at once, not after 36 s in four Ray tracebacks with a FAILED run."""
    bad = tmp_path / "ckpt"
    bad.mkdir()
    for name in ("config.json", "vocab.txt", "tokenizer_config.json", "special_tokens_map.json"):
        if (minilm_dir / name).is_file():
            shutil.copy(minilm_dir / name, bad / name)
    marker = tmp_path / "pwned"
    with open(bad / "pytorch_model.bin", "wb") as f:
        pickle.dump({"embeddings.word_embeddings.weight": _Exploit(marker)}, f)
    out = tmp_path / "out"
    code, err = cli(*mrpc_args(datasets_dir, bad, out))
    assert code == 2 and "pytorch_model.bin: refused" in err, err
    assert not marker.exists() and not out.exists()  # nothing executed, nothing written, no MLflow store


class _Exploit:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def test_pretrain_names_a_truncated_part_before_any_worker(small_shards, tmp_path):
    """Finding 7: a truncated part-*.parquet is named, instead of `ArrowInvalid` deep in a worker."""
    shards = tmp_path / "shards"
    shutil.copytree(small_shards, shards)
    part = shards / "part-00001.parquet"
    part.write_bytes(part.read_bytes()[:1000])
    out = tmp_path / "run"
    code, err = cli("pretrain", "--shards", str(shards), "--out", str(out), "--max-steps", "2", "--warmup-steps", "1")
    assert code == 2 and "part-00001.parquet: not a readable parquet file" in err, err
    assert not out.exists()
    code, err = cli("shards", "inspect", str(shards))
    assert code == 2 and "part-00001.parquet" in err


# ----------------------------------------------------------------------------- concurrency and resumption


def test_two_finetunes_into_one_out_at_once(ray_local, datasets_dir, minilm_dir, tmp_path):
    """Finding 3: the second run is refused while the first holds the dir; the first finishes with one run."""
    out = tmp_path / "out"
    first = driver(ray_local, *mrpc_args(datasets_dir, minilm_dir, out, "--epochs", "1"), log=tmp_path / "first.log")
    try:
        wait_for(lambda: "pid" in ((out / ".lock").read_text() if (out / ".lock").is_file() else ""), 120,
                 "the first run to lock its output dir")
        code, err = cli(*mrpc_args(datasets_dir, minilm_dir, out, "--epochs", "1"))
        assert code == 2 and f"{out} is in use by another run (pid {first.pid}" in err, err
    finally:
        assert first.wait(timeout=600) == 0, (tmp_path / "first.log").read_text()[-3000:]
    assert len(runs_tagged(out)) == 1
    assert json.loads((out / "metrics.json").read_text())["best_epoch"] == 1


@pytest.mark.slow  # the default run's 30-minute budget; run with -m slow
def test_finetune_driver_killed_after_an_epoch_resumes_there(ray_local, datasets_dir, minilm_dir, tmp_path):
    """Finding 9 and 13: the re-run resumes after the last finished epoch, into the same MLflow run, and
    metrics.json keeps every epoch's dev metrics."""
    out = tmp_path / "out"
    args = mrpc_args(datasets_dir, minilm_dir, out, "--epochs", "3")
    first = driver(ray_local, *args, log=tmp_path / "first.log")
    epochs = out / "_ray" / "train" / "seed-42"
    try:
        wait_for(lambda: (epochs / "epoch-001" / "finetune_state.json").is_file(), 600, "the first epoch checkpoint")
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    assert not (out / "metrics.json").exists()
    log = tmp_path / "second.log"
    second = driver(ray_local, *args, log=log)
    assert second.wait(timeout=900) == 0, log.read_text()[-4000:]
    text = log.read_text()
    assert "resuming after epoch" in text
    resumed_at = int(text.split("resuming after epoch ")[1].split()[0])
    assert resumed_at >= 1
    metrics = json.loads((out / "metrics.json").read_text())
    assert [h["epoch"] for h in metrics["history"]] == [1, 2, 3]  # every epoch, whichever is best
    assert len(runs_tagged(out)) == 1
    steps = metric_steps(out, "train/loss")
    assert len(steps) == len(set(steps))  # no step logged twice
    assert not (out / "_ray").exists() and not (out / "_best").exists()


@pytest.mark.slow  # the default run's 30-minute budget; run with -m slow
def test_finetune_seeds_killed_in_the_second_seed_resume_it_and_keep_the_first(ray_local, datasets_dir, minilm_dir,
                                                                              tmp_path):
    """The seeds of one job share a Ray Train run; killed during seed 2, the re-run leaves seed 1's finished
    outputs untouched, resumes seed 2 after its last epoch, into the same MLflow runs."""
    out = tmp_path / "out"
    args = mrpc_args(datasets_dir, minilm_dir, out, "--epochs", "2", "--seeds", "1,2")
    first = driver(ray_local, *args, log=tmp_path / "first.log")
    try:
        wait_for(lambda: (out / "_ray" / "train" / "seed-2" / "epoch-001" / "finetune_state.json").is_file(), 600,
                 "seed 2's first epoch checkpoint")
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    assert (out / "seed-1" / "metrics.json").is_file() and not (out / "seed-2" / "metrics.json").exists()
    seed1 = tree_hash(out / "seed-1")
    runs_before = {s: json.loads((out / f"seed-{s}" / "mlflow_run.json").read_text())["run_id"] for s in (1, 2)}
    log = tmp_path / "second.log"
    second = driver(ray_local, *args, log=log)
    assert second.wait(timeout=900) == 0, log.read_text()[-4000:]
    text = log.read_text()
    assert f"{out / 'seed-1'} is complete (seed 1)" in text and "seed 2: resuming after epoch 1" in text, text[-3000:]
    assert tree_hash(out / "seed-1") == seed1  # seed 1 was not trained again
    metrics = json.loads((out / "metrics.json").read_text())
    assert sorted(metrics["per_seed"]) == ["1", "2"]
    seed2 = json.loads((out / "seed-2" / "metrics.json").read_text())
    assert [h["epoch"] for h in seed2["history"]] == [1, 2]
    client = MlflowClient(seed2["mlflow"]["tracking_uri"])
    for s in (1, 2):
        record = json.loads((out / f"seed-{s}" / "mlflow_run.json").read_text())
        assert record["run_id"] == runs_before[s] and client.get_run(record["run_id"]).info.status == "FINISHED"
        steps = metric_steps(out / f"seed-{s}", "train/loss")
        assert len(steps) == len(set(steps))  # no step logged twice
    assert not (out / "_ray").exists()


def test_finetune_worker_killed_mid_epoch_completes_in_one_run(ray_local, datasets_dir, minilm_dir, tmp_path):
    """A lost worker is replaced (max_failures) and restarts from the last finished epoch."""
    from pipelines.jobs.finetune import FinetuneConfig, run_finetune

    out = tmp_path / "out"
    config = FinetuneConfig(task="mrpc", data=str(datasets_dir / "glue" / "MRPC"), checkpoint=str(minilm_dir),
                            out=str(out), max_train_examples=96, max_eval_examples=64, batch_size=16, epochs=3,
                            learning_rate=5e-5, log_model=False, precision="fp32", max_failures=2)
    result: dict = {}
    thread = threading.Thread(target=lambda: result.update(run_finetune(config)))
    thread.start()
    wait_for(lambda: (out / "_ray" / "train" / "seed-42" / "epoch-001" / "finetune_state.json").is_file(), 600,
             "the first epoch checkpoint")
    victim = json.loads((out / "_workers" / "rank0.json").read_text())["pid"]
    os.kill(victim, signal.SIGKILL)
    thread.join(timeout=900)
    assert not thread.is_alive() and result, "the job did not complete"
    assert json.loads((out / "_workers" / "rank0.json").read_text())["pid"] != victim
    assert [h["epoch"] for h in result["history"]] == [1, 2, 3]
    assert len(runs_tagged(out)) == 1
    steps = metric_steps(out, "train/loss")
    assert len(steps) == len(set(steps))


@pytest.mark.slow  # the default run's 30-minute budget; run with -m slow
def test_pretrain_killed_resumes_from_the_newest_checkpoint_on_disk(ray_local, small_shards, tmp_path):
    """Finding 8: the re-run resumes from the checkpoint it names, logs no step twice, and leaves no temporaries."""
    out = tmp_path / "run"
    args = ["pretrain", "--shards", str(small_shards), "--out", str(out), "--model", "tiny", "--max-steps", "120",
            "--warmup-steps", "2", "--global-batch-size", "8", "--micro-batch-size", "8", "--checkpoint-every", "5",
            "--log-every", "1", "--precision", "fp32", "--learning-rate", "1e-3"]
    steps = out / "_ray" / "train"

    def newest() -> int:
        from bert.pretrain import TrainState

        return max((TrainState.read(d).step for d in steps.glob("step-*") if TrainState.complete(d)), default=0)

    first = driver(ray_local, *args, log=tmp_path / "first.log")
    try:
        wait_for(lambda: newest() >= 15, 600, "three checkpoints")
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    killed_at = newest()
    assert 15 <= killed_at < 120
    log = tmp_path / "second.log"
    second = driver(ray_local, *args, log=log)
    assert second.wait(timeout=900) == 0, log.read_text()[-4000:]
    text = log.read_text()
    assert f"(step {killed_at})" in text.split("resuming from", 1)[1].splitlines()[0], text[-3000:]
    assert json.loads((out / "_manifest.json").read_text())["step"] == 120
    loss_steps = metric_steps(out, "loss")
    assert loss_steps == list(range(1, 121))  # every step once
    assert len(runs_tagged(out)) == 1
    assert not (out / "_tmp").exists()


def test_stale_ray_sessions_are_pruned_and_live_ones_kept(tmp_path):
    """Finding 12: /tmp/ray grew by a session dir per run; a new local runtime removes those of exited ones."""
    from pipelines.ray_runtime import prune_ray_sessions

    stale, live, fresh = (tmp_path / f"session_2026-01-01_00-00-0{i}_1_{i}" for i in range(3))
    for session in (stale, live, fresh):
        (session / "logs").mkdir(parents=True)
        (session / "logs" / "raylet.out").write_text("log")
    for session in (stale, live):
        os.utime(session, (time.time() - 3600, time.time() - 3600))
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)", f"--session_dir={live}"])
    try:
        wait_for(lambda: str(live) in Path(f"/proc/{holder.pid}/cmdline").read_bytes().decode(errors="replace"), 10,
                 "the holder process")
        assert prune_ray_sessions(tmp_path) == [stale]
    finally:
        holder.kill()
        holder.wait()
    assert not stale.exists() and live.exists() and fresh.exists()  # fresh: maybe a runtime still starting
