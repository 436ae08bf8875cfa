"""Fine-tuned models as MLflow models: signature, registry versions, and `mlflow models serve` over real HTTP.

Two tiny real fine-tunes of MiniLM (MRPC with two seeds, a SQuAD split with one), each registered
with `register_as` in a SQLite tracking store; a real `mlflow models serve -m models:/NAME/1
--env-manager local` per model on 127.0.0.1, queried with JSON `dataframe_records`; its answers
are compared with `bertflow predict` on the same rows.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from pipelines.jobs.configs import FinetuneConfig
from pipelines.jobs.finetune import run_finetune

pytestmark = pytest.mark.integration

MRPC_NAME, QA_NAME = "bertflow-test-mrpc", "bertflow-test-squad"


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> str:
    return f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlflow.db'}"


@pytest.fixture(scope="module")
def mrpc_model(ray_local, store, datasets_dir, minilm_dir, tmp_path_factory):
    config = FinetuneConfig(task="mrpc", data=str(datasets_dir / "glue" / "MRPC"), checkpoint=str(minilm_dir),
                            out=str(tmp_path_factory.mktemp("ft") / "mrpc"), max_train_examples=32,
                            max_eval_examples=32, epochs=1, learning_rate=5e-5, seeds="1,2", tracking_uri=store,
                            register_as=MRPC_NAME)
    return config, run_finetune(config)


@pytest.fixture(scope="module")
def qa_model(ray_local, store, datasets_dir, minilm_dir, tmp_path_factory):
    config = FinetuneConfig(task="squad_v1_dev_split", data=str(datasets_dir / "squad_v1.1"),
                            checkpoint=str(minilm_dir), out=str(tmp_path_factory.mktemp("ft") / "qa"),
                            max_train_examples=16, max_eval_examples=16, max_seq_length=128, epochs=1,
                            learning_rate=1e-4, tracking_uri=store, register_as=QA_NAME)
    return config, run_finetune(config)


def mrpc_rows(datasets_dir: Path, n: int) -> list[dict[str, str]]:
    lines = (datasets_dir / "glue" / "MRPC" / "dev.tsv").read_text(encoding="utf-8-sig").splitlines()
    header = lines[0].split("\t")
    rows = [dict(zip(header, line.split("\t"))) for line in lines[-n:]]  # the end of dev: not seen in training
    return [{"text": r["#1 String"], "text_pair": r["#2 String"]} for r in rows]


def squad_rows(datasets_dir: Path, n: int) -> list[dict[str, str]]:
    data = json.loads((datasets_dir / "squad_v1.1" / "dev-v1.1.json").read_text())["data"]
    paragraph = data[-1]["paragraphs"][0]
    return [{"question": qa["question"], "context": paragraph["context"]} for qa in paragraph["qas"][:n]]


def test_registered_versions_carry_signature_metrics_and_the_best_seed(mrpc_model, qa_model, store):
    import mlflow
    from mlflow.tracking import MlflowClient

    from pipelines.tracking import fluent_tracking_uri

    config, result = mrpc_model
    client = MlflowClient(store, registry_uri=store)
    (version,) = client.search_model_versions(f"name = '{MRPC_NAME}'")
    best = json.loads((Path(config.out) / f"seed-{result['best_seed']}" / "metrics.json").read_text())
    assert str(version.version) == "1" and version.tags["bertflow.seed"] == str(result["best_seed"])
    assert version.tags["bertflow.best_seed"] == "true" and "best of seeds 1,2 by dev/f1" in version.tags["bertflow.selected"]
    assert float(version.tags["dev/f1"]) == pytest.approx(best["metrics"]["dev/f1"], rel=1e-5)
    assert float(version.tags["dev/accuracy"]) == pytest.approx(best["metrics"]["dev/accuracy"], rel=1e-5)
    assert version.tags["bertflow.run_id"] == best["mlflow"]["run_id"]
    # a re-run of the finished job registers nothing new
    assert run_finetune(config) == json.loads(json.dumps(result))  # metrics.json as read back (lists, not tuples)
    assert len(client.search_model_versions(f"name = '{MRPC_NAME}'")) == 1

    with fluent_tracking_uri(store):
        for name, inputs, outputs in ((MRPC_NAME, ["text", "text_pair"], ["label", "probabilities"]),
                                      (QA_NAME, ["question", "context"], ["answer", "start", "end", "score"])):
            info = mlflow.models.get_model_info(f"models:/{name}/1")
            assert info.signature.inputs.input_names() == inputs
            assert info.signature.outputs.input_names() == outputs
            assert info.saved_input_example_info is not None
            requirements = Path(mlflow.artifacts.download_artifacts(f"models:/{name}/1/requirements.txt")).read_text()
            for dist in ("torch", "mlflow", "tokenizers", "numpy", "pandas"):
                assert f"\n{dist}==" in "\n" + requirements, requirements


def test_signature_is_enforced_and_probabilities_sum_to_one(mrpc_model, store, datasets_dir):
    import mlflow
    import pandas as pd
    from mlflow.exceptions import MlflowException

    from pipelines.tracking import fluent_tracking_uri

    with fluent_tracking_uri(store):
        model = mlflow.pyfunc.load_model(f"models:/{MRPC_NAME}/1")
    rows = mrpc_rows(datasets_dir, 6)
    with pytest.raises(MlflowException, match=r"missing inputs.*text_pair"):
        model.predict(pd.DataFrame([{"text": r["text"], "second": r["text_pair"]} for r in rows]))
    answers = model.predict(pd.DataFrame(rows))
    assert list(answers.columns) == ["label", "probabilities"] and len(answers) == 6
    for label, probabilities in zip(answers["label"], answers["probabilities"]):
        assert set(probabilities) == {"0", "1"} and sum(probabilities.values()) == pytest.approx(1.0, abs=1e-9)
        assert label == max(probabilities, key=probabilities.get)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(name: str, store: str, log: Path) -> tuple[subprocess.Popen, str]:
    port = free_port()
    command = [str(Path(sys.executable).parent / "mlflow"), "models", "serve", "-m", f"models:/{name}/1",
               "--env-manager", "local", "-h", "127.0.0.1", "-p", str(port), "-w", "1"]
    env = {**os.environ, "MLFLOW_TRACKING_URI": store}
    with open(log, "w") as f:
        process = subprocess.Popen(command, env=env, stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
    return process, f"http://127.0.0.1:{port}"


def wait_ready(process: subprocess.Popen, url: str, log: Path, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(f"mlflow models serve exited with {process.returncode}:\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(f"{url}/ping", timeout=5) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            time.sleep(1)
    pytest.fail(f"mlflow models serve did not answer /ping in {timeout} s:\n{log.read_text()[-3000:]}")


def invoke(url: str, rows: list[dict]) -> list[dict]:
    body = json.dumps({"dataframe_records": rows}).encode()
    request = urllib.request.Request(f"{url}/invocations", data=body, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=120) as response:
        return json.loads(response.read())["predictions"]


def stop(process: subprocess.Popen) -> None:
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGTERM)  # the server and its uvicorn worker: the group this test started
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


def bertflow_predict(checkpoint: Path, rows: list[dict], tmp_path: Path, name: str) -> list[dict]:
    from pipelines.cli import main
    from pipelines.jobs.predict import read_predictions

    (tmp_path / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert main(["predict", "--checkpoint", str(checkpoint), "--input", str(tmp_path / f"{name}.jsonl"),
                 "--out", str(tmp_path / f"{name}.out")]) == 0
    lines = list(read_predictions(str(tmp_path / f"{name}.out")))
    assert [line.pop("row") for line in lines] == list(range(len(rows)))
    return lines


def test_http_answers_equal_bertflow_predict(mrpc_model, qa_model, store, datasets_dir, tmp_path):
    servers = {name: start_server(name, store, tmp_path / f"{name}.log") for name in (MRPC_NAME, QA_NAME)}
    try:
        cases = {MRPC_NAME: (mrpc_model, mrpc_rows(datasets_dir, 8)), QA_NAME: (qa_model, squad_rows(datasets_dir, 6))}
        for name, ((config, _), rows) in cases.items():
            process, url = servers[name]
            wait_ready(process, url, tmp_path / f"{name}.log")
            served = invoke(url, rows)
            expected = bertflow_predict(Path(config.out) / "checkpoint", rows, tmp_path, name)
            assert [set(s) for s in served] == [set(e) for e in expected]
            for s, e in zip(served, expected):
                if name == MRPC_NAME:
                    assert s["label"] == e["label"]
                    assert s["probabilities"] == pytest.approx(e["probabilities"], abs=1e-5)
                else:
                    assert (s["answer"], s["start"], s["end"]) == (e["answer"], e["start"], e["end"])
                    assert s["score"] == pytest.approx(e["score"], abs=1e-5)
                    assert rows[0]["context"][s["start"] : s["end"]] == s["answer"]
            # a request without the signature's columns is refused with a message naming them
            with pytest.raises(urllib.error.HTTPError) as refused:
                invoke(url, [{"wrong": "column"}])
            assert refused.value.code == 400 and "missing inputs" in refused.value.read().decode()
    finally:
        for process, _ in servers.values():
            stop(process)


@pytest.mark.parametrize("task,head,fields", [("stsb", "sequence_classification", ["score"]),
                                              ("conll2003", "token_classification", ["entities"])])
def test_every_task_kind_logs_a_model_that_answers_its_input_example(task, head, fields, minilm_dir, datasets_dir,
                                                                     tmp_path):
    """Regression and NER models (MiniLM with a fresh head; what matters is the model's contract, not its skill):
    signature, input example, and answers with the kind's fields, equal to `Predictor.predict_records`."""
    import mlflow
    import torch

    from bert.checkpoint import from_pretrained, save_pretrained
    from bert.inference import Predictor, write_task_file
    from bert.tasks import get_task
    from pipelines.models import input_example, log_finetuned_model
    from pipelines.tracking import fluent_tracking_uri

    spec = get_task(task)
    from bert.tasks.readers import read_conll

    labels = sorted({t for ex in read_conll(datasets_dir / "conll2003" / "valid.txt") for t in ex.tags}) \
        if spec.kind == "token_classification" else None
    torch.manual_seed(0)
    model = from_pretrained(minilm_dir, head=head, **({"labels": labels} if labels else {"num_labels": 1}))
    checkpoint = save_pretrained(model, tmp_path / task, tokenizer_dir=minilm_dir)
    write_task_file(checkpoint, task, 128)
    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    with fluent_tracking_uri(store):
        experiment = mlflow.MlflowClient().create_experiment("kinds", artifact_location=(tmp_path / "a").as_uri())
        with mlflow.start_run(experiment_id=experiment):
            uri = log_finetuned_model(checkpoint)
        info = mlflow.models.get_model_info(uri)
        loaded = mlflow.pyfunc.load_model(uri)
    assert info.signature.outputs.input_names() == fields
    example = input_example(spec)
    answers = loaded.predict(example)
    assert list(answers.columns) == fields
    expected = Predictor(checkpoint).predict_records(example.to_dict(orient="records"))
    assert answers.to_dict(orient="records") == expected
    if spec.kind == "regression":
        assert isinstance(expected[0]["score"], float)
    else:
        text = example["text"][0]
        for entity in expected[0]["entities"]:
            assert text[entity["start"] : entity["end"]] == entity["text"] and 0 < entity["score"] <= 1
