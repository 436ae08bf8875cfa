"""Benchmark of the shards stage against its bound: the `tokenizers` WordPiece on one thread.

Prints ONE JSON object. Measured in the same run, on the Wikipedia extract (raw WikiExtractor
input, bert-base-uncased WordPiece, the default `PretrainingDataConfig`: sequence length 128,
20 predictions, dupe factor 5):

* **The bound** — the `tokenizers` library object our WordPiece `Tokenizer` wraps (the same
  normalizer, pre-tokenizer and model) encoding the text of the extract on one thread
  (`TOKENIZERS_PARALLELISM=false`, `RAYON_NUM_THREADS=1`), in a fresh process, the text
  already in memory: every body line of every article (the paragraphs, as the files hold
  them), with `encode_batch` (ids, offsets, tokens: the library's usual call) and with
  `encode_batch_fast` (ids only: what the build asks for). Corpus tokens per second.
* **The build** — `build_shards` end to end (reading and decompressing, sentence splitting,
  tokenizing, buckets, pair drawing, masking, parquet), in a fresh process with its own local
  Ray runtime (`num_cpus` = max(4, CPUs), as `start_local_ray`, a worker per CPU booted before
  the clock starts), at 1x with 1 and 2 workers
  and with the default (as many tasks as Ray CPUs), and at 10x with the default. The 10x
  corpus is the extract linked ten times under different directory names, so every document
  id is distinct and the default shard count grows with the corpus.

Per build: wall seconds (and of each pass), corpus tokens per wall second per core (cores =
the physical CPUs the build could use, at most its workers), the CPU seconds of the whole
process tree (driver, Ray runtime, workers) and corpus tokens per CPU second, and memory: PSS
(proportional set size, which splits shared pages among the processes mapping them, so the
sum counts each page once) summed over the driver and every process below it, sampled every
0.25 s: `peak_pss_mb` the largest sum during the build, `idle_pss_mb` the idle runtime just
before it, `build_pss_mb` the difference.

`fraction_of_bound`: the build's corpus tokens per second per core (default workers, 1x) over
the bound's tokens per second; by wall time (what a user waits for, hurt by anything else the
machine runs) and by CPU time (the work the build does per token). As a shared machine's speed
drifts, the bound is also measured on the first 20 files just before and just after each
build (`bound_nearby_tokens_per_s`, their mean), and each build's `fraction_of_nearby_bound`
is against it. `scale_10x`: the 10x
build's wall time and peak PSS over the 1x build's. The machine's load average is recorded
before and after: on a shared machine, read the wall-time figures with it.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Self

ROOT = Path(__file__).resolve().parents[1]
DATASETS = Path(os.environ.get("BERTFLOW_DATASETS", ROOT.parent / "shared" / "datasets"))
WIKI = DATASETS / "wikipedia_en_extract" / "AA"
VOCAB = DATASETS / "bert-base-uncased" / "vocab.txt"
NEARBY_FILES = 20  # the text of the bound measured just before and after each build
BEFORE_TODAY = {"issue": 16, "tokens_per_s_per_core": 85_000, "fraction_of_bound": 0.2,
                "note": "the build before this work, measured on a quiet 2-core machine (issue #16)"}


# ----------------------------------------------------------------------------- measuring a process tree


def _tree(root_pid: int) -> list:
    import psutil

    try:
        root = psutil.Process(root_pid)
        return [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


class TreeMeter:
    """Samples a process tree in a background thread: the peak of its summed PSS, and its CPU seconds.

    CPU seconds are each process's user + system time, counted from the start of the
    measurement (or from the process's start, if it started later), at the last sample that
    saw it: a process that exits between samples loses at most one interval.
    """

    def __init__(self, pid: int, interval_s: float = 0.25) -> None:
        self.pid, self.interval_s = pid, interval_s
        self.peak_pss = 0
        self._start: dict[int, float] = {}
        self._last: dict[int, float] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def sample(self, first: bool = False) -> int:
        import psutil

        pss = 0
        for proc in _tree(self.pid):
            try:
                times = proc.cpu_times()
                pss += proc.memory_full_info().pss
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                continue
            cpu = times.user + times.system
            if first:
                self._start[proc.pid] = cpu
            self._start.setdefault(proc.pid, 0.0)
            self._last[proc.pid] = cpu
        return pss

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak_pss = max(self.peak_pss, self.sample())
            self._stop.wait(self.interval_s)

    @property
    def cpu_s(self) -> float:
        return sum(self._last[pid] - self._start[pid] for pid in self._last)

    def __enter__(self) -> Self:
        self.sample(first=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak_pss = max(self.peak_pss, self.sample())


def load_average() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


# ----------------------------------------------------------------------------- the bound


def body_lines(files: list[Path]) -> list[str]:
    """The paragraphs of WikiExtractor files: every non-empty line outside the `<doc>` markup."""
    lines = []
    for path in files:
        with gzip.open(path, "rt", encoding="utf-8") as f:
            for line in f:
                line = line.strip()
                if line and not line.startswith("<doc") and line != "</doc>":
                    lines.append(line)
    return lines


def child_bound(files: int | None) -> dict:
    """Tokens per second of the `tokenizers` WordPiece alone, one thread (run with the env set by the parent)."""
    sys.path.insert(0, str(ROOT))
    from bert.tokenizer import Tokenizer

    library = Tokenizer.from_vocab_file(VOCAB)._backend._library  # the very pipeline the build runs
    lines = body_lines(sorted(WIKI.glob("wiki_*.gz"))[:files])
    result = {"lines": len(lines), "characters": sum(map(len, lines))}
    for name, call in (("encode_batch", library.encode_batch), ("encode_batch_fast", library.encode_batch_fast)):
        best_wall = best_cpu = float("inf")
        for _ in range(2):
            wall, cpu = time.perf_counter(), time.process_time()
            tokens = sum(len(e.ids) for e in call(lines, add_special_tokens=False))
            best_wall = min(best_wall, time.perf_counter() - wall)
            best_cpu = min(best_cpu, time.process_time() - cpu)
        result[name] = {"tokens": tokens, "wall_s": round(best_wall, 2), "cpu_s": round(best_cpu, 2),
                        "tokens_per_s": round(tokens / best_wall), "tokens_per_cpu_s": round(tokens / best_cpu)}
    return result


# ----------------------------------------------------------------------------- one build


def child_build(scale: int, workers: int | None, files: int | None, workdir: Path) -> dict:
    """Build one scale in this process (its own local Ray runtime) and return its measurements."""
    sys.path.insert(0, str(ROOT))
    import ray

    from bert.pretraining_data import PretrainingDataConfig
    from pipelines.jobs import shards as job

    corpus = workdir / f"corpus-{scale}x"
    corpus.mkdir()
    for copy in range(scale):
        target = corpus / f"copy{copy}"
        if files is None:
            target.symlink_to(WIKI, target_is_directory=True)
        else:  # a quick run on the first files
            target.mkdir()
            for path in sorted(WIKI.glob("wiki_*.gz"))[:files]:
                (target / path.name).symlink_to(path)
    num_cpus = max(4, os.cpu_count() or 1)
    ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, configure_logging=False,
             log_to_driver=False)
    # the runtime's start is not the build's: boot a worker per CPU and let it settle before measuring
    ray.get([ray.remote(num_cpus=1)(_pause).remote(0.5) for _ in range(num_cpus)])
    time.sleep(2.0)
    passes: dict[str, float] = {}
    for name in ("_run_tokenize_pass", "_run_build_pass"):
        original = getattr(job, name)

        def timed(*args, _original=original, _name=name, **kwargs):
            start = time.perf_counter()
            try:
                return _original(*args, **kwargs)
            finally:
                passes[_name] = round(time.perf_counter() - start, 1)

        setattr(job, name, timed)
    config = PretrainingDataConfig()
    with TreeMeter(os.getpid()) as meter:
        idle = meter.sample()
        start = time.perf_counter()
        manifest = job.build_shards([corpus], VOCAB, workdir / f"shards-{scale}x", config, num_workers=workers)
        wall = time.perf_counter() - start
    ray.shutdown()
    cores = min(workers or num_cpus, num_cpus, len(os.sched_getaffinity(0)))
    tokens = manifest["counts"]["tokens"]
    parts = manifest["parts"]
    return {
        "scale": scale,
        "workers": workers or f"default ({num_cpus} Ray CPUs)",
        "cores": cores,
        "documents": manifest["counts"]["documents"],
        "tokens": tokens,
        "examples": manifest["counts"]["examples"],
        "num_shards": len(parts),
        "part_mb_min_max": [round(min(p["bytes"] for p in parts) / 2**20, 1),
                            round(max(p["bytes"] for p in parts) / 2**20, 1)],
        "wall_s": round(wall, 1),
        "tokenize_pass_s": passes.get("_run_tokenize_pass"),
        "build_pass_s": passes.get("_run_build_pass"),
        "tokens_per_s_per_core": round(tokens / wall / cores),
        "cpu_s": round(meter.cpu_s, 1),
        "tokens_per_cpu_s": round(tokens / meter.cpu_s),
        "idle_pss_mb": round(idle / 2**20),
        "peak_pss_mb": round(meter.peak_pss / 2**20),
        "build_pss_mb": round((meter.peak_pss - idle) / 2**20),
        "load_average_after": load_average(),
    }


def _pause(seconds: float) -> None:
    time.sleep(seconds)


# ----------------------------------------------------------------------------- the run


def run_child(args: list[str], env: dict[str, str] | None = None) -> dict:
    command = [sys.executable, __file__, *args]
    done = subprocess.run(command, check=True, stdout=subprocess.PIPE, text=True, cwd=ROOT,
                          env={**os.environ, **(env or {})})
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--files", type=int, default=None, help="only the first N files of the extract (quick runs)")
    parser.add_argument("--big-scale", type=int, default=10, help="the large corpus multiple (default: 10)")
    parser.add_argument("--skip-scaling", action="store_true", help="leave out the 1x builds with 1 and 2 workers")
    parser.add_argument("--child", choices=("bound", "build"), default=None, help=argparse.SUPPRESS)
    parser.add_argument("--scale", type=int, default=1, help=argparse.SUPPRESS)
    parser.add_argument("--workers", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--workdir", type=Path, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()

    files = [] if args.files is None else ["--files", str(args.files)]
    if args.child == "bound":
        print(json.dumps(child_bound(args.files)))
        return
    if args.child == "build":
        print(json.dumps(child_build(args.scale, args.workers, args.files, args.workdir)))
        return

    load_before = load_average()
    one_thread = {"TOKENIZERS_PARALLELISM": "false", "RAYON_NUM_THREADS": "1"}
    bound = run_child(["--child", "bound", *files], one_thread)
    plan = [(1, None)] if args.skip_scaling else [(1, 1), (1, 2), (1, None)]
    plan.append((args.big_scale, None))
    builds = []
    nearby = ["--files", str(min(args.files or NEARBY_FILES, NEARBY_FILES))]
    for scale, workers in plan:
        before = run_child(["--child", "bound", *nearby], one_thread)
        with tempfile.TemporaryDirectory(prefix="bertflow-bench-shards-") as workdir:
            extra = [] if workers is None else ["--workers", str(workers)]
            build = run_child(["--child", "build", "--scale", str(scale), "--workdir", workdir, *extra, *files])
        after = run_child(["--child", "bound", *nearby], one_thread)
        # the machine's speed drifts (other tenants): the bound on a part of the text just before and after
        build["bound_nearby_tokens_per_s"] = round((before["encode_batch_fast"]["tokens_per_s"]
                                                    + after["encode_batch_fast"]["tokens_per_s"]) / 2)
        build["fraction_of_nearby_bound"] = round(build["tokens_per_s_per_core"] / build["bound_nearby_tokens_per_s"], 2)
        builds.append(build)
        print(f"{scale}x, workers {build['workers']}: {build['wall_s']} s, {build['fraction_of_nearby_bound']} of the "
              "bound measured around it", file=sys.stderr)
    one = next(b for b in builds if b["scale"] == 1 and not isinstance(b["workers"], int))
    big = builds[-1]
    fast = bound["encode_batch_fast"]
    usual = bound["encode_batch"]
    by_workers = {b["workers"]: b for b in builds if b["scale"] == 1 and isinstance(b["workers"], int)}
    print(json.dumps({
        "benchmark": "shards build vs the tokenizers WordPiece alone (Wikipedia extract, bert-base-uncased)",
        "config": "max_seq_length 128, max_predictions_per_seq 20, dupe_factor 5, raw WikiExtractor input",
        "cpus_physical": len(os.sched_getaffinity(0)),
        "ray_num_cpus": max(4, os.cpu_count() or 1),
        "load_average_before": load_before,
        "load_average_after": load_average(),
        "bound": bound,
        "builds": builds,
        "fraction_of_bound": {
            "by_wall_per_core_vs_nearby_encode_batch_fast": one["fraction_of_nearby_bound"],
            "by_wall_per_core_vs_encode_batch_fast": round(one["tokens_per_s_per_core"] / fast["tokens_per_s"], 2),
            "by_wall_per_core_vs_encode_batch": round(one["tokens_per_s_per_core"] / usual["tokens_per_s"], 2),
            "by_cpu_vs_encode_batch_fast": round(one["tokens_per_cpu_s"] / fast["tokens_per_cpu_s"], 2),
            "by_cpu_vs_encode_batch": round(one["tokens_per_cpu_s"] / usual["tokens_per_cpu_s"], 2),
        },
        "scaling_1_to_2_workers": (round(by_workers[1]["wall_s"] / by_workers[2]["wall_s"], 2)
                                   if {1, 2} <= set(by_workers) else None),
        "scale_10x": {
            "scale": big["scale"],
            "tokens_ratio": round(big["tokens"] / one["tokens"], 2),
            "wall_ratio": round(big["wall_s"] / one["wall_s"], 2),
            "cpu_ratio": round(big["cpu_s"] / one["cpu_s"], 2),
            "peak_pss_ratio": round(big["peak_pss_mb"] / one["peak_pss_mb"], 2),
            "build_pss_ratio": round(big["build_pss_mb"] / max(1, one["build_pss_mb"]), 2),
        },
        "before": BEFORE_TODAY,
    }))


if __name__ == "__main__":
    main()
