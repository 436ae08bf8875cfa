"""MLflow models of fine-tuned checkpoints: logging (signature, input example, pinned requirements) and registration.

Every fine-tuned model a job logs is an `mlflow.pyfunc` model (`pipelines/pyfunc_model.py`) with
- a signature from the task's kind (`bert.tasks.kinds`): the input columns `Predictor` reads (required, so a
  frame without them is refused by MLflow's schema enforcement before the model runs) and the output columns
  it answers (label + probabilities, score, answer + start + end + score, entities);
- the kind's input example (MLflow stores it as `serving_input_example.json`, the body of a request to
  `mlflow models serve`);
- pip requirements pinned to the versions installed where it was trained (a local version label
  such as torch's "+cpu" is dropped: pip accepts the plain version for it, and it is what PyPI has);
- the `bert` and `pipelines` source trees (`code_paths`), so it loads where bertflow is not installed.

`register_finetuned` registers the model a finished `bertflow finetune --register-as NAME` job logged as
a new version of NAME, tagged with its dev metrics; with `--seeds`, the best seed's model (the job's
primary metric), and its tags say so. Registering again after a re-run finds the version it made and
makes no new one. A registry needs a database-backed store (SQLite, the default; or a tracking server).
"""

from __future__ import annotations

import importlib.metadata
import json
from pathlib import Path
from typing import Any

from bert import storage
from bert.errors import InputError
from bert.inference import TASK_FILE

MODEL_NAME = "model"  # the model's name inside its run
RUN_TAG = "bertflow.run_id"  # a registered version's tag: the MLflow run (the seed's) whose model it is
# Distributions the logged model imports when it loads and predicts (the pyfunc wrapper and `bert.inference`).
REQUIREMENTS = ("mlflow", "torch", "numpy", "pandas", "safetensors", "sentencepiece", "tokenizers")

def pinned_requirements() -> list[str]:
    """`name==version` of every distribution in REQUIREMENTS, as installed in this process."""
    pins = []
    for dist in REQUIREMENTS:
        version = importlib.metadata.version(dist).split("+", 1)[0]  # torch 2.x.y+cpu -> 2.x.y
        pins.append(f"{dist}=={version}")
    return pins


def task_of(checkpoint: str | Path) -> tuple[Any, tuple[str, ...]]:
    """The task row and the labels of a fine-tuned checkpoint dir."""
    from bert.checkpoint import read_checkpoint_info
    from bert.tasks import get_task

    task_file = Path(checkpoint) / TASK_FILE
    if not task_file.is_file():
        raise InputError(f"{checkpoint}: not a fine-tuned bertflow checkpoint ({TASK_FILE} is missing)")
    spec = get_task(json.loads(task_file.read_text())["task"])
    return spec, tuple(read_checkpoint_info(checkpoint).labels or ())


def model_signature(spec, labels: tuple[str, ...]):
    """The `ModelSignature` of a task row's model: input columns and output columns (its kind's `inputs` and
    `outputs`, `bert.tasks.kinds`). An input with alternatives (NER: tokens or text) is optional in each of them."""
    from mlflow.models import ModelSignature
    from mlflow.types.schema import ColSpec, Schema

    inputs = [ColSpec(mlflow_type(f.type, labels), f.name, required=len(slot) == 1)
              for slot in spec.inputs for f in slot]
    outputs = [ColSpec(mlflow_type(f.type, labels), f.name) for f in spec.kind_spec.outputs]
    return ModelSignature(inputs=Schema(inputs), outputs=Schema(outputs))


def mlflow_type(field_type: Any, labels: tuple[str, ...]):
    """An MLflow schema type for a kind's field type: "string" / "long" / "double", ("array", T),
    ("object", ((name, T), ...)), or ("per_label", T) (an object with one T per label)."""
    from mlflow.types.schema import Array, Object, Property

    if isinstance(field_type, str):
        return field_type
    shape, inner = field_type
    if shape == "array":
        return Array(mlflow_type(inner, labels))
    members = inner if shape == "object" else tuple((label, inner) for label in labels)
    return Object([Property(name, mlflow_type(t, labels)) for name, t in members])


def input_example(spec):
    """One input row for the task row's model, as a DataFrame."""
    import pandas as pd

    return pd.DataFrame([spec.input_example()])


def log_finetuned_model(checkpoint: str | Path, name: str = MODEL_NAME) -> str:
    """Log `checkpoint` as an MLflow pyfunc model into the active run; returns the model URI."""
    import mlflow.pyfunc

    from pipelines.pyfunc_model import BertflowPyfunc

    spec, labels = task_of(checkpoint)
    root = Path(__file__).resolve().parents[1]
    info = mlflow.pyfunc.log_model(
        name=name,
        python_model=BertflowPyfunc(),
        artifacts={"checkpoint": str(checkpoint)},
        code_paths=[str(root / "bert"), str(root / "pipelines")],
        signature=model_signature(spec, labels),
        input_example=input_example(spec),
        pip_requirements=pinned_requirements(),
        metadata={"bertflow_task": spec.name, "bertflow_task_kind": spec.kind},
    )
    return info.model_uri


def registered_seed_result(config, result: dict[str, Any]) -> dict[str, Any]:
    """The metrics.json of the seed whose model is registered: the job's only seed, or its best."""
    if "best_seed" not in result:
        return result
    return storage.read_json(storage.join(config.out, f"seed-{result['best_seed']}", "metrics.json"))


def version_tags(config, result: dict[str, Any], seed_result: dict[str, Any]) -> dict[str, str]:
    """Tags of a registered version: its dev metrics, task, seed, and how the seed was chosen."""
    seeds = list(config.seed_list)
    primary = result["primary_metric"]
    tags = {key: f"{value:.6g}" for key, value in seed_result["metrics"].items() if isinstance(value, (int, float))}
    tags |= {"bertflow.task": config.task, "bertflow.seed": str(seed_result["seed"]),
             "bertflow.primary_metric": primary, "bertflow.out": str(config.out)}
    if len(seeds) > 1:
        tags["bertflow.best_seed"] = "true"
        tags["bertflow.selected"] = (f"best of seeds {','.join(map(str, seeds))} by {primary} "
                                     f"(mean {result['metrics'][primary]:.4f} +- {result['std'][primary]:.4f})")
        tags |= {f"mean.{k}": f"{v:.6g}" for k, v in result["metrics"].items() if isinstance(v, (int, float))}
    else:
        tags["bertflow.selected"] = "the job's only seed"
    return tags


def register_finetuned(config, result: dict[str, Any]):
    """Register the model of a finished fine-tune job (`result`: its metrics.json) as a version of
    `config.register_as`; returns the `ModelVersion` (an existing one if this run was registered before)."""
    import mlflow
    from mlflow.tracking import MlflowClient

    from pipelines.tracking import fluent_tracking_uri

    name = config.register_as
    seed_result = registered_seed_result(config, result)
    run = seed_result.get("mlflow") or {}
    if not run.get("model_uri"):
        raise InputError(f"finetune --register-as {name}: seed {seed_result['seed']} logged no MLflow model "
                         f"({storage.join(config.out, 'metrics.json')}: mlflow.model_uri is empty); run with model "
                         "logging on and a reachable tracking store")
    client = MlflowClient(run["tracking_uri"], registry_uri=run["tracking_uri"])
    existing = [v for v in client.search_model_versions(f"name = '{name}'") if v.tags.get(RUN_TAG) == run["run_id"]]
    if existing:
        return existing[0]
    tags = version_tags(config, result, seed_result) | {RUN_TAG: run["run_id"]}
    with fluent_tracking_uri(run["tracking_uri"]):  # the registry is the tracking store unless told otherwise
        version = mlflow.register_model(run["model_uri"], name, tags=tags)
    client.update_model_version(name, version.version, description=(
        f"bertflow finetune {config.task}, seed {seed_result['seed']} ({tags['bertflow.selected']}); "
        f"{result['primary_metric']} {seed_result['metrics'].get(result['primary_metric'])}"))
    return version


def maybe_register(config, result: dict[str, Any]) -> dict[str, Any]:
    """`register_finetuned` when the job has `register_as`; returns `result` unchanged."""
    if getattr(config, "register_as", None):
        version = register_finetuned(config, result)
        print(f"[finetune] registered model {version.name} version {version.version} "
              f"(models:/{version.name}/{version.version})", flush=True)
    return result
