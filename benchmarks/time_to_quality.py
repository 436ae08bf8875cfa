"""Pretraining time to quality: `bertflow pretrain` against a plain `transformers` loop, side by side.

Both systems get the same shards (Wikipedia extract: wiki_00-89 train, wiki_90-99 held out,
bert-base-uncased vocab, sequence length 128, static masks as the original BERT writes them), the
same model shape (`--config`, default mini), the same initial weights (one random init, saved in
both layouts), the same global batch, the same schedule shape (warmup, then linear decay to zero
at the end of each system's own wall-clock budget, so the slower system is not cut off mid-decay)
and the same budget (`--minutes`, default 20). Both are evaluated every `--eval-seconds` on the
same held-out examples with the same masks: MLM loss, MLM accuracy, NSP accuracy. Evaluation is
measurement, not training: both time axes leave it out (the peer's fp32 evaluation is slower than
bertflow's), and the peer's budget counts training time only; bertflow's time limit counts its
evaluations too (against it).

The peer is what a user writes without bertflow: `transformers.BertForPreTraining` (sdpa attention,
fp32) in a plain PyTorch loop with torch's default AdamW (same betas, eps, weight-decay groups,
clipping), fed the very same batches from the same parquet shards in the same order. Its peak
learning rate is the best of {bertflow's, x0.5, x2} by a short probe (`--probe-minutes` each).
bertflow is the real job, `bertflow pretrain` on Ray Train, with its own system levers (precision
policy, CPU dropout and attention, masked-positions-only MLM head, fused AdamW).

Figure of merit: the time the peer takes to reach its final held-out MLM loss, divided by the time
bertflow takes to reach the same loss (both from launch, start-up included). Also: tokens/s, MFU
(bertflow's), the most-frequent-token MLM baseline, and (with `--downstream`) fine-tuning of
bertflow's checkpoint, the peer's, and the random init on SST-2 (1 epoch) and MRPC (3 epochs) with
`bertflow finetune`. Prints one JSON object; writes `time_to_quality.png` next to the work dir.

    python benchmarks/time_to_quality.py [--minutes 20] [--config mini] [--learning-rate 5e-4]
        [--workdir out/bench/ttq] [--downstream]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATASETS = Path(os.environ.get("BERTFLOW_DATASETS", ROOT.parent / "shared" / "datasets"))
WIKI = DATASETS / "wikipedia_en_extract" / "AA"
VOCAB = DATASETS / "bert-base-uncased" / "vocab.txt"


def log(message: str) -> None:
    print(f"[ttq {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------- shared inputs


def build_inputs(work: Path, config_name: str, seed: int) -> dict[str, Path]:
    """Shards (train, held-out) and the initial weights in both layouts, built once and reused."""
    from bert.checkpoint import save_pretrained
    from bert.config import preset
    from bert.model import BertForPreTraining
    from bert.pretraining_data import PretrainingDataConfig
    from pipelines.jobs.shards import build_shards

    paths = {"train": work / "shards-train", "val": work / "shards-val", "init": work / f"init-{config_name}",
             "init_hf": work / f"init-{config_name}-hf"}
    data = PretrainingDataConfig(max_seq_length=128, max_predictions_per_seq=20, dupe_factor=1)
    if not paths["train"].exists():
        log("building training shards from wiki_00..89")
        build_shards([WIKI / f"wiki_{i:02d}.gz" for i in range(90)], VOCAB, paths["train"], data)
    if not paths["val"].exists():
        log("building held-out shards from wiki_90..99")
        build_shards([WIKI / f"wiki_{i:02d}.gz" for i in range(90, 100)], VOCAB, paths["val"], data)
    if not paths["init"].exists():
        import torch

        torch.manual_seed(seed)
        model = BertForPreTraining(preset(config_name, vocab_size=30522))
        save_pretrained(model, paths["init"], tokenizer_dir=paths["train"] / "tokenizer")
        save_pretrained(model, paths["init_hf"], hf=True, tokenizer_dir=paths["train"] / "tokenizer")
    return paths


# ----------------------------------------------------------------------------- the peer


def hf_batch(rows, pad_id: int):
    """Our shard rows as `transformers.BertForPreTraining` inputs: full-length labels, -100 off the masks."""
    from bert.pretrain import collate

    b = collate(rows, pad_id, 20)
    labels = b.input_ids.new_full(b.input_ids.shape, -100)
    real = b.masked_lm_ids != -100
    rows_idx = real.nonzero()[:, 0]
    labels[rows_idx, b.masked_lm_positions[real]] = b.masked_lm_ids[real]
    return b, labels


def peer_evaluate(model, val_rows, pad_id: int) -> dict[str, float]:
    """Held-out MLM loss and accuracy at the masked positions, NSP accuracy: the same quantities as bertflow's."""
    import torch
    import torch.nn.functional as F

    model.eval()
    loss_sum = correct = count = nsp_correct = 0.0
    with torch.inference_mode():
        for i in range(0, len(val_rows), 64):
            b, _ = hf_batch(val_rows[i : i + 64], pad_id)
            out = model(input_ids=b.input_ids, token_type_ids=b.token_type_ids, attention_mask=b.attention_mask)
            real = b.masked_lm_ids != -100
            logits = torch.gather(out.prediction_logits, 1,
                                  b.masked_lm_positions.unsqueeze(-1).expand(-1, -1, out.prediction_logits.shape[-1]))
            loss_sum += float(F.cross_entropy(logits[real].float(), b.masked_lm_ids[real], reduction="sum"))
            correct += float((logits.argmax(-1) == b.masked_lm_ids)[real].sum())
            count += float(real.sum())
            nsp_correct += float((out.seq_relationship_logits.argmax(-1) == b.next_sentence_label).sum())
    model.train()
    return {"val_mlm_loss": loss_sum / count, "val_mlm_accuracy": correct / count,
            "val_nsp_accuracy": nsp_correct / len(val_rows)}


def run_peer(paths: dict, args, lr: float, minutes: float, eval_seconds: float, save: Path | None = None) -> dict:
    """The plain loop for `minutes` (schedule fitted to its measured speed); its held-out curve from launch."""
    import torch
    import transformers

    from bert.optim import lr_multiplier
    from bert.example_order import GlobalStream
    from bert.shards import ShardSet, read_rows

    launched = time.time()
    torch.set_num_threads(os.cpu_count() or 1)
    torch.manual_seed(args.seed)
    model = transformers.BertForPreTraining.from_pretrained(paths["init_hf"], attn_implementation="sdpa")
    model.train()
    groups = [{"params": [p for n, p in model.named_parameters() if not (n.endswith("bias") or "LayerNorm" in n)],
               "weight_decay": 0.01},
              {"params": [p for n, p in model.named_parameters() if n.endswith("bias") or "LayerNorm" in n],
               "weight_decay": 0.0}]
    optimizer = torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.999), eps=1e-6)
    shards = ShardSet.open(paths["train"])
    val_rows = read_rows(ShardSet.open(paths["val"]), args.eval_examples)
    rows = GlobalStream(shards, args.seed).rank_batches(args.micro_batch, 0, 0, 1)  # bertflow's order, one rank
    accumulation = args.batch // args.micro_batch
    budget = minutes * 60
    total = args.peer_steps_hint or 10**9  # refined after the first steps from the measured speed
    curve, step, tokens, last_eval, train_started, eval_total = [], 0, 0, time.time(), time.time(), 0.0

    def training_time() -> float:  # from launch, evaluations left out (they are measurement, not training)
        return time.time() - launched - eval_total

    while True:
        for group in optimizer.param_groups:
            group["lr"] = lr * lr_multiplier(step, warmup_steps=max(1, int(args.warmup * total)), total_steps=total)
        optimizer.zero_grad(set_to_none=True)
        for _ in range(accumulation):
            b, labels = hf_batch(next(rows), 0)
            out = model(input_ids=b.input_ids, token_type_ids=b.token_type_ids, attention_mask=b.attention_mask,
                        labels=labels, next_sentence_label=b.next_sentence_label)
            (out.loss / accumulation).backward()
            tokens += int(b.attention_mask.sum())
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        step += 1
        now = time.time()
        if step == 10 and not args.peer_steps_hint:  # the schedule's length: what fits in the rest of the budget
            total = int(10 + (budget - training_time()) * 10 / (now - train_started - eval_total))
        over = training_time() >= budget or step >= total
        if now - last_eval >= eval_seconds or over:
            eval_started = time.time()
            point = peer_evaluate(model, val_rows, 0)
            eval_total += time.time() - eval_started
            curve.append(point | {"t": training_time(), "step": step})
            log(f"peer lr {lr:.1e} step {step}/{total} t {curve[-1]['t']:.0f}s val_mlm_loss {point['val_mlm_loss']:.4f}")
            last_eval = time.time()
            if over:
                break
    if save is not None:
        model.save_pretrained(save)
    elapsed = time.time() - train_started - eval_total
    return {"learning_rate": lr, "eval_seconds_total": eval_total, "steps": step, "scheduled_steps": total, "curve": curve,
            "tokens_per_s": tokens / elapsed}


# ----------------------------------------------------------------------------- bertflow


def run_bertflow(paths: dict, args, out: Path, max_steps: int, eval_every: int, minutes: float,
                 checkpoints: int = 1) -> dict:
    """`bertflow pretrain` as a user runs it (the CLI, Ray Train); its held-out curve read from MLflow.

    `checkpoints`: how many evenly spaced checkpoints the run writes and keeps (the last at `max_steps`)."""
    from mlflow.tracking import MlflowClient

    launched = time.time()
    cmd = [sys.executable, "-m", "pipelines.cli", "pretrain", "--shards", str(paths["train"]),
           "--val-shards", str(paths["val"]), "--model", str(paths["init"]), "--out", str(out),
           "--global-batch-size", str(args.batch), "--micro-batch-size", str(args.micro_batch),
           "--max-steps", str(max_steps), "--warmup-steps", str(max(1, int(args.warmup * max_steps))),
           "--learning-rate", str(args.learning_rate), "--eval-every", str(eval_every),
           "--eval-examples", str(args.eval_examples), "--checkpoint-every", str(max(1, max_steps // checkpoints)),
           "--keep-checkpoints", str(checkpoints + 1), "--log-every", "10", "--seed", str(args.seed),
           "--time-limit-minutes", str(minutes),
           "--threads-per-worker", str(os.cpu_count() or 1), *args.bertflow_args]
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{out.parent / 'mlflow.db'}"}
    result = subprocess.run(cmd, check=False, cwd=ROOT, env=env, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"bertflow pretrain failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
    record = json.loads((out / "mlflow_run.json").read_text())
    client = MlflowClient(record["tracking_uri"])

    def history(key: str) -> list:
        return sorted(client.get_metric_history(record["run_id"], key), key=lambda m: m.step)

    curve, eval_total = [], 0.0
    evals = history("eval_seconds")
    for loss, acc, nsp, took in zip(history("val_mlm_loss"), history("val_mlm_accuracy"), history("val_nsp_accuracy"),
                                    evals):
        eval_total += took.value  # the time axis leaves evaluations out, as the peer's does
        curve.append({"t": loss.timestamp / 1000 - launched - eval_total, "step": loss.step, "val_mlm_loss": loss.value,
                      "val_mlm_accuracy": acc.value, "val_nsp_accuracy": nsp.value})
    tps = [m.value for m in history("tokens_per_s")[1:]]
    mfu = [m.value for m in history("mfu")[1:]]
    # A run stopped by its time limit is resumable, not complete: no manifest, its newest training checkpoint
    # is the model it reached (loadable as a Hugging Face-style dir), and the baseline is in MLflow either way.
    from pipelines.jobs.pretrain import latest_checkpoint

    done = out / "checkpoint" if (out / "_manifest.json").is_file() else latest_checkpoint(out)
    baseline = history("val_mlm_majority_baseline")
    params = client.get_run(record["run_id"]).data.params
    return {"steps": curve[-1]["step"] if curve else 0, "scheduled_steps": max_steps, "curve": curve,
            "tokens_per_s": sorted(tps)[len(tps) // 2] if tps else None, "mfu": sorted(mfu)[len(mfu) // 2] if mfu else None,
            "precision": params.get("precision"), "precision_reason": params.get("precision_reason"),
            "most_frequent_token_baseline": baseline[-1].value if baseline else None,
            "checkpoint": str(done) if done else None, "wall_s": time.time() - launched,
            "eval_seconds_total": eval_total}


def bertflow_speed(paths: dict, args, work: Path) -> float:
    """Optimiser steps per second of bertflow's training loop (a short run; start-up excluded)."""
    from mlflow.tracking import MlflowClient

    out = work / "bertflow-probe"
    if not (out / "_manifest.json").is_file():
        subprocess.run([sys.executable, "-m", "pipelines.cli", "pretrain", "--shards", str(paths["train"]),
                        "--model", str(paths["init"]), "--out", str(out), "--global-batch-size", str(args.batch),
                        "--micro-batch-size", str(args.micro_batch), "--max-steps", "40", "--warmup-steps", "4",
                        "--log-every", "10", "--checkpoint-every", "40", "--threads-per-worker",
                        str(os.cpu_count() or 1), *args.bertflow_args], cwd=ROOT, check=True, capture_output=True,
                       env={**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{work / 'mlflow.db'}"})
    record = json.loads((out / "mlflow_run.json").read_text())
    tps = sorted(m.value for m in MlflowClient(record["tracking_uri"]).get_metric_history(record["run_id"], "tokens_per_s"))
    tokens_per_step = args.batch * 120  # ~mean example length at seq 128
    return tps[len(tps) // 2] / tokens_per_step


def bertflow_plan(paths: dict, args, work: Path) -> tuple[int, int]:
    """bertflow's step budget for `--minutes` (~45 s of start-up in it) and its evaluation interval, in steps."""
    steps_per_s = bertflow_speed(paths, args, work)
    return max(20, int(steps_per_s * (args.minutes * 60 - 45))), max(1, int(steps_per_s * args.eval_seconds))


# ----------------------------------------------------------------------------- figure of merit


def time_to_reach(curve: list[dict], loss: float) -> float | None:
    """First time the held-out MLM loss is at or below `loss`, interpolated between evaluations."""
    previous = None
    for point in curve:
        if point["val_mlm_loss"] <= loss:
            if previous is None:
                return point["t"]
            fraction = (previous["val_mlm_loss"] - loss) / (previous["val_mlm_loss"] - point["val_mlm_loss"])
            return previous["t"] + fraction * (point["t"] - previous["t"])
        previous = point
    return None


def plot(path: Path, curves: dict[str, list[dict]]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    for ax, key in zip(axes, ("val_mlm_loss", "val_mlm_accuracy", "val_nsp_accuracy")):
        for name, curve in curves.items():
            ax.plot([p["t"] / 60 for p in curve], [p[key] for p in curve], marker=".", label=name)
        ax.set_xlabel("minutes from launch")
        ax.set_title(key)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def downstream(work: Path, models: dict[str, Path], tokenizer: Path) -> dict:
    """`bertflow finetune` of each model on SST-2 (1 epoch) and MRPC (3 epochs): dev metric per model."""
    table: dict = {}
    for task, epochs in (("sst2", 1), ("mrpc", 3)):
        for name, checkpoint in models.items():
            out = work / "downstream" / f"{task}-{name}"
            if not (out / "metrics.json").is_file():
                subprocess.run([sys.executable, "-m", "pipelines.cli", "finetune", "--task", task, "--data",
                                str(DATASETS), "--checkpoint", str(checkpoint), "--tokenizer", str(tokenizer),
                                "--out", str(out), "--epochs",
                                str(epochs), "--learning-rate", "1e-4", "--no-log-model"], cwd=ROOT, check=True,
                               capture_output=True)
            metrics = json.loads((out / "metrics.json").read_text())
            table.setdefault(task, {})[name] = {"metric": metrics["primary_metric"],
                                                "value": metrics["metrics"][metrics["primary_metric"]],
                                                "train_time_s": metrics["train_time_s"]}
            log(f"downstream {task} {name}: {table[task][name]}")
    return table


def downstream_curve(work: Path, run: Path, seeds: str) -> dict:
    """The `evaluate_checkpoints` stage on the checkpoints a run kept: SST-2 (1 epoch), MRPC (3 epochs), from each
    and from a random init of the same shape, as `downstream` fine-tunes them (learning rate 1e-4)."""
    import yaml

    spec = {
        "name": "ttq-curve", "workdir": str(work / "curve"), "experiment": "bertflow-ttq-curve",
        "max_concurrent": 1, "ray": {"num_cpus": 4},
        "stages": {"curve": {"kind": "evaluate_checkpoints", "config": {
            "checkpoints": str(run / "_ray" / "train"), "every": 1, "seeds": [int(x) for x in seeds.split(",")],
            "data": str(DATASETS), "tasks": {"sst2": {"epochs": 1}, "mrpc": {"epochs": 3}},
            "learning_rate": 1e-4, "random_init": True, "max_concurrent": 2}}},
    }
    path = work / "curve.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{work / 'mlflow.db'}"}
    subprocess.run([sys.executable, "-m", "pipelines.cli", "run", str(path)], cwd=ROOT, check=True, env=env)
    stage = next((work / "curve" / "evaluate_checkpoints").glob("*/curves.json"))
    return {"curves_json": str(stage), "curves_png": str(stage.with_name("curves.png")),
            "curves": json.loads(stage.read_text())}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--minutes", type=float, default=20.0)
    p.add_argument("--probe-minutes", type=float, default=3.0)
    p.add_argument("--config", default="mini")
    p.add_argument("--learning-rate", type=float, default=5e-4, help="bertflow's peak learning rate")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--micro-batch", type=int, default=32)
    p.add_argument("--warmup", type=float, default=0.02, help="warmup as a fraction of the scheduled steps")
    p.add_argument("--eval-seconds", type=float, default=60.0)
    p.add_argument("--eval-examples", type=int, default=2048)
    p.add_argument("--seed", type=int, default=12345)
    p.add_argument("--workdir", type=Path, default=ROOT / "out" / "bench" / "ttq")
    p.add_argument("--downstream", action="store_true")
    p.add_argument("--curve", type=int, default=0, metavar="N",
                   help="instead of the comparison: bertflow's run alone, keeping N evenly spaced checkpoints, then "
                   "the evaluate_checkpoints stage on them (SST-2 1 epoch, MRPC 3 epochs, and a random init)")
    p.add_argument("--curve-seeds", default="1,2", help="fine-tune seeds per point of the curve (default: 1,2)")
    p.add_argument("--peer-steps-hint", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--bertflow-args", nargs=argparse.REMAINDER, default=[],
                   help="extra `bertflow pretrain` options (last on the line), e.g. --precision fp32")
    args = p.parse_args()
    work = args.workdir.resolve()
    work.mkdir(parents=True, exist_ok=True)

    from pipelines.ray_runtime import ensure_ray

    ensure_ray()  # shard building only; the bertflow runs start their own
    paths = build_inputs(work, args.config, args.seed)
    import ray

    ray.shutdown()

    if args.curve:
        max_steps, eval_every = bertflow_plan(paths, args, work)
        run = work / f"bertflow-curve-{args.curve}"
        ours = run_bertflow(paths, args, run, max_steps, eval_every, args.minutes, checkpoints=args.curve)
        report = {"benchmark": "time_to_quality downstream curve", "config": args.config, "minutes": args.minutes,
                  "bertflow": {k: v for k, v in ours.items() if k != "curve"}, "pretraining_curve": ours["curve"],
                  **downstream_curve(work, run, args.curve_seeds)}
        print(json.dumps(report, indent=2, default=lambda x: None if isinstance(x, float) and math.isnan(x) else x))
        return

    probes = {lr: run_peer(paths, args, lr, args.probe_minutes, args.probe_minutes * 60)
              for lr in (args.learning_rate * 0.5, args.learning_rate, args.learning_rate * 2)}
    best_lr = min(probes, key=lambda lr: probes[lr]["curve"][-1]["val_mlm_loss"])
    log(f"peer learning rate: {best_lr:.1e} ({ {f'{k:.1e}': round(v['curve'][-1]['val_mlm_loss'], 4) for k, v in probes.items()} })")
    peer = run_peer(paths, args, best_lr, args.minutes, args.eval_seconds, save=work / "peer-checkpoint")

    max_steps, eval_every = bertflow_plan(paths, args, work)
    ours = run_bertflow(paths, args, work / f"bertflow-{int(time.time())}", max_steps, eval_every, args.minutes)

    final_peer_loss = peer["curve"][-1]["val_mlm_loss"]
    t_peer = time_to_reach(peer["curve"], final_peer_loss)
    t_ours = time_to_reach(ours["curve"], final_peer_loss)
    plot(work / "time_to_quality.png", {"bertflow": ours["curve"], f"transformers loop (lr {best_lr:.1e})": peer["curve"]})
    report = {
        "benchmark": "time_to_quality", "config": args.config, "minutes": args.minutes, "global_batch": args.batch,
        "cpus": os.cpu_count(), "peer_learning_rate_probe": {f"{k:.2e}": v["curve"][-1]["val_mlm_loss"]
                                                             for k, v in probes.items()},
        "peer_learning_rate": best_lr, "bertflow_learning_rate": args.learning_rate,
        "peer": {k: v for k, v in peer.items() if k != "curve"} | {"final": peer["curve"][-1]},
        "bertflow": {k: v for k, v in ours.items() if k != "curve"} | {"final": ours["curve"][-1] if ours["curve"] else None},
        "peer_final_val_mlm_loss": final_peer_loss, "peer_time_s": t_peer, "bertflow_time_to_peer_loss_s": t_ours,
        "time_to_quality_ratio": (t_peer / t_ours) if t_ours else None,
        "tokens_per_s_ratio": ours["tokens_per_s"] / peer["tokens_per_s"] if ours["tokens_per_s"] else None,
        "curves": {"bertflow": ours["curve"], "peer": peer["curve"]}, "plot": str(work / "time_to_quality.png"),
    }
    if args.downstream:
        report["downstream"] = downstream(work, {"bertflow": Path(ours["checkpoint"]), "peer": work / "peer-checkpoint",
                                                 "random_init": paths["init"]}, paths["train"] / "tokenizer")
    print(json.dumps(report, indent=2, default=lambda x: None if isinstance(x, float) and math.isnan(x) else x))


if __name__ == "__main__":
    main()
