"""What "the same model" means across resizes, measured (issue: spot-proof pretraining, item 3).

Three pretraining runs of the same job on the same shards, every step logged:

    two      2 workers, uninterrupted
    one      1 worker, uninterrupted
    resized  2 workers to step N/3, then 1 worker to 2N/3, then 2 workers to N (stopped and resumed
             with `--num-workers` changed, as a lost and a regained node do)

and, from `bert.example_order.GlobalStream`, the example ids of every step as 1 and 2 workers read them
(from step 0 and from each resume point). Prints JSON: whether the ids per step are identical, the
loss curves' largest and final |difference| against the 2-worker run, and the final weights' largest
|difference| — float32 sums in another order are not bit-exact, so the differences are rounding,
grown by Adam's normalisation over the steps; the JSON says how much after N steps.

    python benchmarks/elastic.py --steps 60 [--shards DIR] [--model tiny]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

DATASETS = ROOT.parent / "shared" / "datasets"


def build_shards(out: Path) -> Path:
    from bert.pretraining_data import PretrainingDataConfig
    from pipelines.jobs.shards import build_shards as build

    wiki = DATASETS / "wikipedia_en_extract" / "AA"
    build([wiki / "wiki_00.gz", wiki / "wiki_01.gz"], DATASETS / "bert-base-uncased" / "vocab.txt", out,
          PretrainingDataConfig(dupe_factor=1, num_shards=2))
    return out


def run(shards: Path, out: Path, workers: int, steps: int, stop_at: int | None, model: str) -> dict:
    from pipelines.jobs.configs import PretrainConfig
    from pipelines.jobs.pretrain import run_pretraining

    started = time.time()
    result = run_pretraining(PretrainConfig(
        shards=str(shards), out=str(out), model=model, num_workers=workers, global_batch_size=16, micro_batch_size=4,
        max_steps=steps, warmup_steps=max(steps // 10, 1), learning_rate=1e-3, log_every=1, checkpoint_every=10_000,
        precision="fp32", stop_at_step=stop_at))
    return {"step": result["step"], "seconds": round(time.time() - started, 1)}


def losses(out: Path) -> dict[int, float]:
    from mlflow import MlflowClient

    record = json.loads((out / "mlflow_run.json").read_text())
    history = MlflowClient(record["tracking_uri"]).get_metric_history(record["run_id"], "loss")
    by_step: dict[int, list[float]] = {}
    for metric in history:
        by_step.setdefault(metric.step, []).append(metric.value)
    twice = [s for s, values in by_step.items() if len(values) > 1]
    if twice:
        raise SystemExit(f"{out}: steps logged twice: {twice[:10]}")
    return {s: values[0] for s, values in sorted(by_step.items())}


def ids_identical(shards: Path, steps: int, resume_points: list[int]) -> bool:
    """The example ids of each global step read by 1 and by 2 workers, from 0 and from each resume point."""
    from bert.example_order import GlobalStream
    from bert.shards import ShardSet

    from pipelines.jobs.configs import PretrainConfig

    stream = GlobalStream(ShardSet.open(shards), seed=PretrainConfig().seed)  # the runs' seed
    micro, per_step = 4, 4

    def step_ids(world: int, start: int, count: int) -> list[list[int]]:
        ranks = [stream.rank_batches(micro, start * per_step * micro, r, world) for r in range(world)]
        out = []
        for _ in range(count):
            blocks = {}
            for r, batches in enumerate(ranks):
                for m in range(per_step // world):
                    blocks[m * world + r] = [hash(tuple(row["input_ids"])) for row in next(batches)]
            out.append([i for b in sorted(blocks) for i in blocks[b]])
        return out

    one = step_ids(1, 0, steps)
    if step_ids(2, 0, steps) != one:
        return False
    return all(step_ids(w, p, steps - p) == one[p:] for p in resume_points for w in (1, 2))


def max_weight_diff(a: Path, b: Path) -> float:
    from safetensors.torch import load_file

    wa, wb = load_file(str(a / "checkpoint" / "model.safetensors")), load_file(str(b / "checkpoint" / "model.safetensors"))
    return max(float((wa[k] - wb[k]).abs().max()) for k in wa)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--shards", type=Path, help="pretraining shards (default: built from two Wikipedia files)")
    parser.add_argument("--model", default="tiny")
    parser.add_argument("--workdir", type=Path, help="where the runs go (default: a temporary dir)")
    args = parser.parse_args()

    from pipelines.ray_runtime import start_local_ray

    start_local_ray(4, {"PYTHONPATH": str(ROOT)}, configure_logging=False)
    work = args.workdir or Path(tempfile.mkdtemp(prefix="elastic-"))
    shards = args.shards or build_shards(work / "shards")
    n = args.steps
    third, two_thirds = n // 3, 2 * n // 3
    timing = {
        "two": run(shards, work / "two", 2, n, None, args.model),
        "one": run(shards, work / "one", 1, n, None, args.model),
        "resized": [run(shards, work / "resized", 2, n, third, args.model),
                    run(shards, work / "resized", 1, n, two_thirds, args.model),
                    run(shards, work / "resized", 2, n, None, args.model)],
    }
    curves = {name: losses(work / name) for name in ("two", "one", "resized")}
    if any(sorted(c) != list(range(1, n + 1)) for c in curves.values()):
        raise SystemExit(f"a run did not log every step once: {[len(c) for c in curves.values()]}")

    def compare(name: str) -> dict:
        diffs = [abs(curves[name][s] - curves["two"][s]) for s in range(1, n + 1)]
        worst = max(range(n), key=diffs.__getitem__)
        return {"max_loss_diff": diffs[worst], "at_step": worst + 1, "final_loss_diff": diffs[-1],
                "max_weight_diff": max_weight_diff(work / name, work / "two")}

    print(json.dumps({
        "steps": n, "model": args.model, "global_batch_size": 16, "resized_at": [third, two_thirds],
        "ids_per_step_identical": ids_identical(shards, n, [third, two_thirds]),
        "final_loss_two_workers": curves["two"][n],
        "one_vs_two": compare("one"), "resized_vs_two": compare("resized"),
        "run_seconds": timing, "workdir": str(work),
    }, indent=2))


if __name__ == "__main__":
    main()
