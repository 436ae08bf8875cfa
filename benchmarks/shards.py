"""Benchmark of the shards stage: throughput and peak memory at 1x and 4x the Wikipedia extract.

Prints ONE JSON object. Each scale is built in a fresh subprocess with its own local Ray
runtime (`ray.init(address="local", num_cpus=max(4, cpu_count))`), with the default `PretrainingDataConfig`
unless `--dupe-factor` says otherwise. The 4x corpus is the extract linked four times under
different directory names, so every document id is distinct and the default shard count
grows with the corpus.

Memory is sampled every 0.25 s over the driver and every process below it (GCS, raylet, Ray
workers) as PSS, the proportional set size, which splits shared pages (the object store,
shared libraries) among the processes that map them, so the sum counts each page once.
`peak_memory_mb` is the largest sum seen during the build; `idle_memory_mb` is the same sum
for the idle runtime just before the build, and `build_memory_mb` the difference: what the
build itself added. If the stage streams as designed, `build_memory_mb` stays flat from 1x to
4x. tokens/s/core divides corpus tokens per wall second by the physical cores Ray could use.
"""

from __future__ import annotations

import sys
from pathlib import Path

import argparse
import json
import os
import subprocess
import tempfile
import threading
import time

ROOT = Path(__file__).resolve().parents[1]
DATASETS = Path(os.environ.get("BERTFLOW_DATASETS", ROOT.parent / "shared" / "datasets"))
WIKI = DATASETS / "wikipedia_en_extract" / "AA"
VOCAB = DATASETS / "bert-base-uncased" / "vocab.txt"


def tree_pss_bytes(root_pid: int) -> int:
    import psutil

    total = 0
    try:
        root = psutil.Process(root_pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return 0
    for proc in procs:
        try:
            total += proc.memory_full_info().pss
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass
    return total


class PeakSampler:
    """Samples the process tree's PSS in a background thread and keeps the maximum."""

    def __init__(self, pid: int, interval_s: float = 0.25) -> None:
        self.pid, self.interval_s, self.peak = pid, interval_s, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, tree_pss_bytes(self.pid))
            self._stop.wait(self.interval_s)

    def __enter__(self) -> PeakSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, tree_pss_bytes(self.pid))


def child(scale: int, dupe_factor: int | None, workdir: Path) -> dict:
    """Build one scale in this process and return its measurements."""
    import ray

    from bert.pretraining_data import PretrainingDataConfig
    from pipelines.jobs.shards import build_shards

    corpus = workdir / f"corpus-{scale}x"
    corpus.mkdir()
    for copy in range(scale):
        (corpus / f"copy{copy}").symlink_to(WIKI, target_is_directory=True)
    num_cpus = max(4, os.cpu_count() or 1)
    ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, configure_logging=False, log_to_driver=False)
    time.sleep(2.0)  # let the runtime settle before the idle measurement
    idle = tree_pss_bytes(os.getpid())
    config = PretrainingDataConfig() if dupe_factor is None else PretrainingDataConfig(dupe_factor=dupe_factor)
    with PeakSampler(os.getpid()) as sampler:
        start = time.perf_counter()
        manifest = build_shards([corpus], VOCAB, workdir / f"shards-{scale}x", config)
        wall = time.perf_counter() - start
    ray.shutdown()
    cores = min(num_cpus, len(os.sched_getaffinity(0)))
    tokens = manifest["counts"]["tokens"]
    parts = manifest["parts"]
    return {
        "scale": scale,
        "dupe_factor": config.dupe_factor,
        "documents": manifest["counts"]["documents"],
        "tokens": tokens,
        "examples": manifest["counts"]["examples"],
        "num_shards": len(parts),
        "part_mb_min_max": [round(min(p["bytes"] for p in parts) / 2**20, 1), round(max(p["bytes"] for p in parts) / 2**20, 1)],
        "wall_s": round(wall, 1),
        "tokens_per_s_per_core": round(tokens / wall / cores),
        "idle_memory_mb": round(idle / 2**20),
        "peak_memory_mb": round(sampler.peak / 2**20),
        "build_memory_mb": round((sampler.peak - idle) / 2**20),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scales", default="1,4", help="corpus multiples to build (default: 1,4)")
    parser.add_argument("--dupe-factor", type=int, default=None, help="default: the config default (5)")
    parser.add_argument("--child", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--workdir", type=Path, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.child is not None:
        print(json.dumps(child(args.child, args.dupe_factor, args.workdir)))
        return

    results = []
    for scale in (int(s) for s in args.scales.split(",")):
        with tempfile.TemporaryDirectory(prefix="bertflow-bench-shards-") as workdir:
            command = [sys.executable, __file__, "--child", str(scale), "--workdir", workdir]
            if args.dupe_factor is not None:
                command += ["--dupe-factor", str(args.dupe_factor)]
            done = subprocess.run(command, check=True, stdout=subprocess.PIPE, text=True, cwd=ROOT)
            results.append(json.loads(done.stdout.strip().splitlines()[-1]))
    print(json.dumps({
        "benchmark": "shards build (Wikipedia extract, bert-base-uncased WordPiece)",
        "dupe_factor": results[0]["dupe_factor"],
        "cpus_physical": len(os.sched_getaffinity(0)),
        "ray_num_cpus": max(4, os.cpu_count() or 1),
        "memory_note": "PSS summed over the driver and all Ray processes; build = peak - idle runtime",
        "runs": results,
        "build_memory_ratio_last_to_first": round(results[-1]["build_memory_mb"] / max(1, results[0]["build_memory_mb"]), 2),
    }))


if __name__ == "__main__":
    main()
