"""Pretraining throughput: tokens/s per worker and MFU, 1 vs 2 DDP workers (and one GPU where present).

Runs the real `bertflow pretrain` job (Ray Train, gloo on CPU) on real Wikipedia shards for the
`mini` preset with 1 and then 2 workers, and reads the per-step throughput and model-FLOPs
utilisation the job logged to MLflow (MFU is against the matmul peak each worker measures on
its own device at start-up). The peer is the 1-worker run: `scaling_efficiency` is the 2-worker
per-worker throughput divided by the 1-worker one. With a CUDA device, BERT-base phase 1
(sequence length 128, bf16 autocast) on one GPU is measured too. Prints one JSON object.

    python benchmarks/pretrain.py [--shards DIR] [--steps 30] [--micro-batch 16]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATASETS = Path(os.environ.get("BERTFLOW_DATASETS", ROOT.parent / "shared" / "datasets"))


def build_default_shards(workdir: Path) -> Path:
    from bert.pretraining_data import PretrainingDataConfig
    from pipelines.jobs.shards import build_shards

    wiki = DATASETS / "wikipedia_en_extract" / "AA"
    out = workdir / "shards"
    build_shards([wiki / "wiki_00.gz", wiki / "wiki_01.gz"], DATASETS / "bert-base-uncased" / "vocab.txt", out,
                 PretrainingDataConfig(dupe_factor=1, num_shards=4))
    return out


def measure(shards: Path, workdir: Path, *, name: str, preset: str, workers: int, micro: int, steps: int,
            use_gpu: bool = False) -> dict:
    from mlflow.tracking import MlflowClient

    from pipelines.jobs.pretrain import PretrainConfig, run_pretraining

    out = workdir / name
    tracking = f"sqlite:///{workdir / 'mlflow.db'}"
    manifest = run_pretraining(PretrainConfig(
        shards=str(shards), out=str(out), model=preset, num_workers=workers, use_gpu=use_gpu,
        global_batch_size=micro * workers, micro_batch_size=micro, max_steps=steps, warmup_steps=1,
        log_every=2, checkpoint_every=steps, tracking_uri=tracking, experiment="benchmark-pretrain",
    ))
    client = MlflowClient(tracking)
    run_id = manifest["mlflow"]["run_id"]

    def median_after_warmup(key: str) -> float:
        history = sorted(client.get_metric_history(run_id, key), key=lambda m: m.step)
        values = [m.value for m in history[1:]] or [m.value for m in history]  # first window includes start-up
        return statistics.median(values)

    return {
        "preset": preset,
        "workers": workers,
        "device": "cuda" if use_gpu else "cpu",
        "micro_batch": micro,
        "steps": steps,
        "tokens_per_s_per_worker": round(median_after_warmup("tokens_per_s_per_worker"), 1),
        "mfu": round(median_after_warmup("mfu"), 4),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shards", type=Path, help="shards dir (default: built from two Wikipedia files)")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--micro-batch", type=int, default=16)
    args = p.parse_args()

    import torch

    from pipelines.ray_runtime import ensure_ray

    ensure_ray()
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        shards = args.shards or build_default_shards(workdir)
        runs = [measure(shards, workdir, name=f"mini-{w}", preset="mini", workers=w, micro=args.micro_batch,
                        steps=args.steps) for w in (1, 2)]
        result = {
            "benchmark": "pretrain",
            "cpus": os.cpu_count(),
            "runs": runs,
            "scaling_efficiency_2_vs_1_workers": round(runs[1]["tokens_per_s_per_worker"] / runs[0]["tokens_per_s_per_worker"], 3),
            "note": "2 workers on a 2-core machine share the cores with the Ray driver and each other",
        }
        if torch.cuda.is_available():
            result["gpu"] = measure(shards, workdir, name="base-gpu", preset="base", workers=1, micro=64,
                                    steps=args.steps, use_gpu=True)
    json.dump(result, sys.stdout, indent=2)
    print()


if __name__ == "__main__":
    main()
