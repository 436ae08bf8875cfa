"""Pretraining on Ray Train: exact resume, a killed worker, two Ray nodes, bad input."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import threading
import time
from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient
from safetensors.torch import load_file

import bert
from bert.config import BertConfig
from bert.errors import InputError
from bert.model import BertForPreTraining
from pipelines.jobs.pretrain import PretrainConfig, latest_checkpoint, run_pretraining
from loopback import LoopbackCluster
from pipelines.jobs.shards import load_tokenizer

pytestmark = pytest.mark.integration

TINY_RUN = dict(
    model="tiny",
    num_workers=2,
    global_batch_size=16,
    micro_batch_size=4,
    warmup_steps=2,
    learning_rate=1e-3,
    log_every=2,
    checkpoint_every=100,
)


def weights(out: Path) -> dict[str, torch.Tensor]:
    return load_file(out / "checkpoint" / "model.safetensors")


def runs_for(out: Path) -> list:
    """The MLflow runs that logged for pretraining output dir `out`."""
    run = json.loads((out / "mlflow_run.json").read_text())
    client = MlflowClient(run["tracking_uri"])
    experiment = client.get_run(run["run_id"]).info.experiment_id
    return client.search_runs([experiment], filter_string=f"tags.`bertflow.out` = '{out.resolve()}'")


@pytest.fixture(scope="module")
def uninterrupted(small_shards, tmp_path_factory):
    """precision -> the output dir of an uninterrupted 2-worker run of 6 steps, run once per module: the run the
    stopped-and-resumed and the resized runs are compared with (the same settings as theirs)."""
    runs: dict[str, Path] = {}

    def get(precision: str) -> Path:
        if precision not in runs:
            out = tmp_path_factory.mktemp(f"uninterrupted-{precision}") / "full"
            full = run_pretraining(PretrainConfig(**dict(TINY_RUN, shards=str(small_shards), max_steps=6,
                                                         precision=precision), out=str(out)))
            assert full["complete"] and full["step"] == 6
            runs[precision] = out
        return runs[precision]

    return get


@pytest.mark.parametrize("precision", ["fp32", pytest.param("bf16", marks=pytest.mark.slow)])  # bf16: -m slow (budget)
def test_resume_is_exact_with_two_workers(small_shards, uninterrupted, tmp_path, precision):
    """Stopped at step k and resumed, a run reaches step 2k with the weights of an uninterrupted run (per precision)."""
    common = dict(TINY_RUN, shards=str(small_shards), max_steps=6, precision=precision)
    full = uninterrupted(precision)

    first = run_pretraining(PretrainConfig(**common, out=str(tmp_path / "resumed"), stop_at_step=3))
    assert not first["complete"] and first["step"] == 3
    assert not (tmp_path / "resumed" / "checkpoint").exists()  # nothing published before the end
    second = run_pretraining(PretrainConfig(**common, out=str(tmp_path / "resumed"), stop_at_step=3))
    assert second["complete"] and second["step"] == 6

    a, b = weights(full), weights(tmp_path / "resumed")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    # the final checkpoint is a complete training checkpoint and a loadable model dir
    state = json.loads((tmp_path / "resumed" / "checkpoint" / "train_state.json").read_text())
    assert state["step"] == 6 and state["world_size"] == 2 and state["final"] and state["precision"] == precision
    model = bert.from_pretrained(tmp_path / "resumed" / "checkpoint")
    assert isinstance(model, BertForPreTraining)
    assert (tmp_path / "resumed" / "checkpoint" / "vocab.txt").is_file()
    # one MLflow run for the stopped-and-resumed output dir
    assert len(runs_for(tmp_path / "resumed")) == 1
    # re-running a finished run does nothing
    assert run_pretraining(PretrainConfig(**common, out=str(tmp_path / "resumed"), stop_at_step=3))["step"] == 6


def test_a_stopped_run_reports_the_baseline_and_its_checkpoint(small_shards, small_val_shards, tmp_path):
    """A run stopped before max_steps (time limit, stop step) is resumable, and what it reached is usable:
    the most-frequent-token baseline is in its result and in MLflow, its newest checkpoint loads as a model."""
    out = tmp_path / "stopped"
    config = PretrainConfig(**dict(TINY_RUN, num_workers=1), shards=str(small_shards), val_shards=str(small_val_shards),
                            eval_examples=64, eval_every=2, max_steps=8, stop_at_step=2, out=str(out))
    result = run_pretraining(config)
    assert not result["complete"] and result["step"] == 2
    assert 0 < result["val_mlm_majority_baseline"] < 1
    run = json.loads((out / "mlflow_run.json").read_text())
    logged = MlflowClient(run["tracking_uri"]).get_metric_history(run["run_id"], "val_mlm_majority_baseline")
    assert [m.value for m in logged] == [result["val_mlm_majority_baseline"]]
    assert isinstance(bert.from_pretrained(latest_checkpoint(out)), BertForPreTraining)


def test_killed_worker_is_replaced_and_training_completes(small_shards, small_val_shards, tmp_path):
    out = tmp_path / "run"
    config = PretrainConfig(
        **dict(TINY_RUN, checkpoint_every=4, eval_every=20, log_every=4),
        shards=str(small_shards),
        val_shards=str(small_val_shards),
        eval_examples=128,
        max_steps=60,
        out=str(out),
        max_failures=2,
    )
    result: dict = {}
    thread = threading.Thread(target=lambda: result.update(run_pretraining(config)))
    thread.start()
    deadline = time.time() + 300
    while latest_checkpoint(out) is None and thread.is_alive() and time.time() < deadline:
        time.sleep(0.2)
    assert latest_checkpoint(out) is not None, "no checkpoint appeared"
    victim = json.loads((out / "_workers" / "rank1.json").read_text())["pid"]
    os.kill(victim, signal.SIGKILL)
    thread.join(timeout=600)
    assert not thread.is_alive()
    assert result["complete"] and result["step"] == 60
    replacement = json.loads((out / "_workers" / "rank1.json").read_text())["pid"]
    assert replacement != victim  # a new worker process finished the run

    run = json.loads((out / "mlflow_run.json").read_text())
    client = MlflowClient(run["tracking_uri"])
    assert len(runs_for(out)) == 1  # the restart logged into the same run
    loss = sorted(client.get_metric_history(run["run_id"], "loss"), key=lambda m: m.step)
    assert loss[-1].value < loss[0].value  # it learns
    for key in ("mlm_loss", "nsp_loss", "mlm_accuracy", "nsp_accuracy", "learning_rate", "grad_norm",
                "tokens_per_s", "mfu", "val_mlm_accuracy", "val_nsp_accuracy"):
        assert client.get_metric_history(run["run_id"], key), key
    assert result["val_mlm_majority_baseline"] > 0
    artifacts = [a.path for a in client.list_artifacts(run["run_id"], "checkpoint")]
    assert "checkpoint/model.safetensors" in artifacts


@pytest.mark.slow  # the default run's 30-minute budget; run with -m slow
def test_two_ray_nodes_run_ddp_with_one_worker_each(small_shards, tmp_path):
    """Two `ray start` processes on loopback form a two-node cluster; DDP places one worker per node."""
    with LoopbackCluster("rayn") as cluster:
        cluster.start("--num-cpus=2", nodes=1)
        cluster.start("--num-cpus=2", nodes=2)
        out = tmp_path / "run"
        job = cluster.bertflow(
            "pretrain", "--shards", str(small_shards), "--out", str(out),
            "--config", "tiny", "--num-workers", "2", "--placement-strategy", "STRICT_SPREAD",
            "--global-batch-size", "8", "--micro-batch-size", "4", "--max-steps", "4", "--warmup-steps", "1",
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        stdout, stderr = job.communicate(timeout=600)
        assert job.returncode == 0, stdout[-3000:] + stderr[-3000:]
        worker_nodes = {json.loads((out / "_workers" / f"rank{r}.json").read_text())["node_id"] for r in (0, 1)}
        assert len(worker_nodes) == 2
        assert json.loads((out / "_manifest.json").read_text())["step"] == 4


# ----------------------------------------------------------------------------- bad input (no worker starts)


def test_missing_or_empty_shards_dir(tmp_path):
    with pytest.raises(InputError, match="shards dir .*nope does not exist"):
        run_pretraining(PretrainConfig(shards=str(tmp_path / "nope"), out=str(tmp_path / "o")))
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="not a finished shards dir"):
        run_pretraining(PretrainConfig(shards=str(tmp_path / "empty"), out=str(tmp_path / "o")))


def test_batch_arithmetic_is_checked():
    with pytest.raises(InputError, match="global batch 100 is not divisible by workers x micro-batch = 2 x 32 = 64"):
        PretrainConfig(shards="s", out="o", num_workers=2, micro_batch_size=32, global_batch_size=100)


def test_shards_from_another_vocabulary_are_refused(small_shards, tmp_path):
    other = BertForPreTraining(BertConfig(vocab_size=1000, hidden_size=64, num_hidden_layers=1, num_attention_heads=1, intermediate_size=64))
    bert.save_pretrained(other, tmp_path / "ckpt")
    with pytest.raises(InputError, match="30522-token vocabulary but checkpoint .* has vocab_size 1000"):
        run_pretraining(PretrainConfig(shards=str(small_shards), out=str(tmp_path / "o"), model=str(tmp_path / "ckpt")))
    # same size, different tokens: the vocabulary fingerprint tells them apart
    vocab = load_tokenizer(small_shards / "tokenizer").convert_ids_to_tokens(range(30522))
    vocab[2000], vocab[2001] = vocab[2001], vocab[2000]
    (tmp_path / "vocab.txt").write_text("\n".join(vocab) + "\n", encoding="utf-8")
    same_size = BertForPreTraining(bert.preset("tiny"))
    load_tokenizer(tmp_path / "vocab.txt").save(tmp_path / "tok")
    bert.save_pretrained(same_size, tmp_path / "ckpt2", tokenizer_dir=tmp_path / "tok")
    with pytest.raises(InputError, match="different tokenizer"):
        run_pretraining(PretrainConfig(shards=str(small_shards), out=str(tmp_path / "o"), model=str(tmp_path / "ckpt2")))


def test_sequences_longer_than_the_model_are_refused(small_shards, tmp_path):
    short = BertForPreTraining(bert.preset("tiny", max_position_embeddings=64))
    shutil.copytree(small_shards / "tokenizer", tmp_path / "tok")
    bert.save_pretrained(short, tmp_path / "ckpt", tokenizer_dir=tmp_path / "tok")
    with pytest.raises(InputError, match="up to 128 tokens, above the model's max_position_embeddings \\(64\\)"):
        run_pretraining(PretrainConfig(shards=str(small_shards), out=str(tmp_path / "o"), model=str(tmp_path / "ckpt")))


def test_a_run_resized_from_two_workers_to_one_makes_the_model_an_uninterrupted_run_makes(small_shards, uninterrupted,
                                                                                          tmp_path):
    """Elastic determinism end to end: stopped on 2 workers, resumed on 1, against an uninterrupted 2-worker run.

    The global batches, masks and dropout are the same (tests/test_elastic.py checks the ids per step); only
    the order of the float32 sums differs, so the weights agree to rounding, amplified a little by Adam's
    normalisation over the steps (measured: max |diff| ~1e-6 after 6 steps; asserted < 1e-4).
    """
    common = dict(TINY_RUN, shards=str(small_shards), max_steps=6, precision="fp32")
    straight = uninterrupted("fp32")
    first = run_pretraining(PretrainConfig(**common, out=str(tmp_path / "resized"), stop_at_step=3))
    assert not first["complete"] and first["step"] == 3
    second = run_pretraining(PretrainConfig(**{**common, "num_workers": 1}, out=str(tmp_path / "resized")))
    assert second["complete"] and second["step"] == 6
    state = json.loads((tmp_path / "resized" / "checkpoint" / "train_state.json").read_text())
    assert state["world_size"] == 1
    a, b = weights(straight), weights(tmp_path / "resized")
    worst = max(float((a[k] - b[k]).abs().max()) for k in a)
    assert worst < 1e-4, worst
    assert len(runs_for(tmp_path / "resized")) == 1  # one MLflow run across the resize


@pytest.mark.slow
def test_a_lost_node_shrinks_an_elastic_run_which_grows_back_when_a_node_returns(small_shards, tmp_path):
    """Three `ray start` nodes on loopback (a head without CPUs, two worker nodes of one CPU each); an
    elastic run (`--num-workers 1-2`, one worker per node) loses a worker node mid-job: every process of that
    node is killed by process group. The run goes on with one worker from its newest checkpoint (2 -> 1);
    once it has checkpointed on one worker a node joins again, and Ray Train's resize check (every 60 s while
    the group is healthy) restarts it on two workers from the newest checkpoint (1 -> 2). It finishes with one
    MLflow run and no step logged twice.

    The run must outlast the regrowth: 1000 steps of a tiny model (seconds each on an idle machine: minutes
    in all), else the test fails saying so rather than passing without having seen it."""
    with LoopbackCluster("rayl") as cluster:
        # A lost node's CPU counts as reserved until the GCS declares the node dead, so the restart after the
        # loss first asks for two workers again and waits out the worker-group start timeout before it tries
        # one: Ray Train's default 60 s is what a user loses there; the loopback's 600 s would stall the test.
        cluster.env["RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S"] = "90"
        cluster.start("--num-cpus=0", nodes=1)
        cluster.start("--num-cpus=1", nodes=2)
        doomed = cluster.start("--num-cpus=1", nodes=3)
        out, log = tmp_path / "run", tmp_path / "job.log"
        job = cluster.bertflow(
            "pretrain", "--shards", str(small_shards), "--out", str(out), "--config", "tiny", "--num-workers", "1-2",
            "--placement-strategy", "SPREAD", "--global-batch-size", "8", "--micro-batch-size", "4",
            "--max-steps", "1000", "--warmup-steps", "1", "--checkpoint-every", "10", "--log-every", "10",
            stdout=open(log, "w"), stderr=subprocess.STDOUT)

        def newest(world: int) -> bool:
            """A checkpoint made on `world` workers is the newest (fails if the job ended first)."""
            assert job.poll() is None, f"the run ended (rc {job.returncode}) early:\n{log.read_text()[-4000:]}"
            found = latest_checkpoint(out)
            return found is not None and json.loads((Path(found) / "train_state.json").read_text())["world_size"] == world

        def wait(world: int, what: str) -> int:
            deadline = time.time() + 1500
            while not newest(world):
                assert time.time() < deadline, f"no checkpoint {what}:\n{log.read_text()[-4000:]}"
                time.sleep(1)
            return json.loads((Path(latest_checkpoint(out)) / "train_state.json").read_text())["step"]

        wait(2, "on two workers before the node loss")
        os.killpg(doomed.pid, signal.SIGKILL)  # the node's raylet and every worker on it
        lost_at = time.time()
        shrunk_at = wait(1, "on one worker after the node loss")
        cluster.start("--num-cpus=1", nodes=3)  # the node comes back (a new one in its place)
        returned_at = time.time()
        grown_at = wait(2, "on two workers after a node returned (did the run finish on one? raise --max-steps)")
        job.wait(timeout=1800)
        finished_at = time.time()
        text = log.read_text()
        assert job.returncode == 0, text[-4000:]
    assert "of a run on 2 worker(s) on 1" in text and "of a run on 1 worker(s) on 2" in text, text[-4000:]
    manifest = json.loads((out / "_manifest.json").read_text())
    assert manifest["step"] == 1000 and shrunk_at < grown_at
    assert json.loads((out / "checkpoint" / "train_state.json").read_text())["world_size"] == 2
    assert len(runs_for(out)) == 1
    record = json.loads((out / "mlflow_run.json").read_text())
    steps = sorted(m.step for m in MlflowClient(record["tracking_uri"]).get_metric_history(record["run_id"], "loss"))
    assert steps == list(range(10, 1001, 10)), steps  # every logged step once, across three worker groups
    print(f"pretrain elastic: node lost, on 1 worker from step <= {shrunk_at}; node back, on 2 workers from "
          f"step <= {grown_at}; finished {finished_at - lost_at:.0f} s after the loss, "
          f"{finished_at - returned_at:.0f} s after the node returned")
