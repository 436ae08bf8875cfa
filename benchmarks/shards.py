"""Benchmark of the shards stage against its bound: the `tokenizers` WordPiece on one thread.

Prints ONE JSON object. Measured in the same run, on the Wikipedia extract (raw WikiExtractor
input, bert-base-uncased WordPiece, the default `PretrainingDataConfig`: sequence length 128,
20 predictions, dupe factor 5):

* **The bound** — the `tokenizers` library object our WordPiece `Tokenizer` wraps (the same
  normalizer, pre-tokenizer and model) encoding the text of the extract on one thread
  (`TOKENIZERS_PARALLELISM=false`, `RAYON_NUM_THREADS=1`), in a fresh process, the text
  already in memory: every body line of every article (the paragraphs, as the files hold
  them), with `encode_batch` (ids, offsets, tokens: the library's usual call) and with
  `encode_batch_fast` (ids only: what the build asks for). Corpus tokens per second. Also
  `all_cores`: one such process per core, all started on the same tick (on 10 files, or the
  large run's 20): what the cores give the tokenizer when all of them run it, per core (two
  logical CPUs sharing a core, or a memory path, give less than twice one).
* **The build** — `build_shards` end to end (Ray Data: reading, decompressing, sentence splitting,
  tokenizing, buckets, pair drawing, masking, parquet), in a fresh process with its own local
  Ray runtime (`num_cpus` = max(4, CPUs), as `start_local_ray`, a worker per CPU booted before
  the clock starts), at 1x with 1 and 2 workers and with the default, and at 10x with the
  default. The Nx corpus is the extract linked N times under different directory names, so
  every document id is distinct and the default shard count grows with the corpus.
* **The peer** (`--peer-root DIR`: a checkout of another commit, e.g. `git worktree add
  /tmp/base a8037b9`) — the same builds at 1x and 10x with that checkout's code (its driver
  and its Ray workers import it), for `vs_peer`: its wall and CPU seconds over ours.
* **The large run** (`--scale N`, e.g. 46 for a billion corpus tokens; `--dupe-factor`,
  `--workdir` for the room it needs): a 1x and an Nx build of this code, nothing else, and
  `scale_big`: the Nx build's wall, CPU and peak PSS over the 1x build's.

Per build: wall seconds, corpus tokens per wall second per core (cores =
the physical CPUs the build could use, at most its workers), the CPU seconds of the whole
process tree (driver, Ray runtime, workers) and corpus tokens per CPU second, and memory: PSS
(proportional set size, which splits shared pages among the processes mapping them, so the
sum counts each page once) summed over the driver and every process below it, sampled every
0.25 s: `peak_pss_mb` the largest sum during the build, `idle_pss_mb` the idle runtime just
before it, `build_pss_mb` the difference; `ray_spilled`: what Ray spilled from its object store to
disk (its memory summary), `output_bytes`: the part files' bytes.

`fraction_of_bound`: the build's corpus tokens per second per core (default workers, 1x) over
the bound's tokens per second; by wall time (what a user waits for, hurt by anything else the
machine runs) and by CPU time (the work the build does per token). As a shared machine's speed
drifts, the bound is also measured on the first 5 files just before and just after each
build (`bound_nearby_tokens_per_s`, their mean), and each build's `fraction_of_nearby_bound`
is against it. `scale_big`: the 10x (or Nx)
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
NEARBY_FILES = 5  # the text of the bound measured just before and after each build (encode_batch_fast, once)
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


def child_bound(files: int | None, quick: bool = False, start_at: float | None = None) -> dict:
    """Tokens per second of the `tokenizers` WordPiece alone, one thread (run with the env set by the parent).

    `quick` (the bound measured around each build): `encode_batch_fast` only, once. `start_at`
    (epoch seconds): the text is loaded, then the clock waits for that moment (processes started
    together measure together)."""
    sys.path.insert(0, str(ROOT))
    from bert.tokenizer import Tokenizer

    library = Tokenizer.from_vocab_file(VOCAB)._backend._library  # the very pipeline the build runs
    lines = body_lines(sorted(WIKI.glob("wiki_*.gz"))[:files])
    result = {"lines": len(lines), "characters": sum(map(len, lines))}
    if start_at:
        time.sleep(max(0.0, start_at - time.time()))
    calls = [("encode_batch_fast", library.encode_batch_fast)]
    if not quick:
        calls.insert(0, ("encode_batch", library.encode_batch))
    for name, call in calls:
        best_wall = best_cpu = float("inf")
        for _ in range(1 if quick else 2):
            wall, cpu = time.perf_counter(), time.process_time()
            tokens = sum(len(e.ids) for e in call(lines, add_special_tokens=False))
            best_wall = min(best_wall, time.perf_counter() - wall)
            best_cpu = min(best_cpu, time.process_time() - cpu)
        result[name] = {"tokens": tokens, "wall_s": round(best_wall, 2), "cpu_s": round(best_cpu, 2),
                        "tokens_per_s": round(tokens / best_wall), "tokens_per_cpu_s": round(tokens / best_cpu)}
    return result


def all_cores_bound(files: list[str], processes: int) -> dict:
    """The bound when every core tokenizes at once: `processes` one-thread bounds started together.

    Cores that share a physical core's units or a memory path do not each run at the one-thread
    speed; this is the most the machine's cores give a tokenizer together, per core."""
    start_at = time.time() + 20  # each child loads its text (a few seconds), then all start on the same tick
    command = [sys.executable, str(Path(__file__).resolve()), "--child", "bound", "--quick", *files,
               "--start-at", str(start_at)]
    children = [subprocess.Popen(command, stdout=subprocess.PIPE, text=True, env={**os.environ, **ONE_THREAD})
                for _ in range(processes)]
    rates = [json.loads(child.communicate()[0].strip().splitlines()[-1])["encode_batch_fast"]["tokens_per_s"]
             for child in children]
    return {"processes": processes, "tokens_per_s_each": rates, "tokens_per_s_per_core": round(sum(rates) / processes)}


# ----------------------------------------------------------------------------- levers, each alone


def child_levers(files: int) -> dict:
    """The reading levers alone, one thread, on the first `files` files: CPU seconds of each way.

    * reading: `read_documents` streaming a file (gzip and UTF-8 line by line, before) against the
      same function on the file's bytes (one `gzip.decompress`, one `decode`: what the build does);
    * sentence splitting: sentencex per paragraph (what the build does) against one call per
      document (its paragraphs joined by newlines), and how many documents come out the same.
    """
    sys.path.insert(0, str(ROOT))
    from sentencex import segment

    from bert.corpus import InputFile, ReadStats, _text_docs, _text_lines, read_documents

    paths = sorted(WIKI.glob("wiki_*.gz"))[:files]
    inputs = [InputFile(p, f"wiki/{p.name}") for p in paths]
    data = [p.read_bytes() for p in paths]

    def cpu(fn) -> tuple[float, object]:
        best, out = float("inf"), None
        for _ in range(2):
            start = time.process_time()
            out = fn()
            best = min(best, time.process_time() - start)
        return round(best, 3), out

    stream_s, a = cpu(lambda: [d for f in inputs for d in read_documents(f, ReadStats())])
    bytes_s, b = cpu(lambda: [d for f, raw in zip(inputs, data) for d in read_documents(f, ReadStats(), data=raw)])
    docs = [texts for raw in data for _, texts in _text_docs(_text_lines(gzip.decompress(raw), ReadStats()))]
    per_paragraph_s, x = cpu(lambda: [[s.strip() for p in t if p.strip() for s in segment("en", p) if s.strip()]
                                      for t in docs])
    per_document_s, y = cpu(lambda: [[s.strip() for s in segment("en", "\n".join(p for p in t if p.strip()))
                                      if s.strip()] for t in docs])
    return {
        "files": files,
        "read_streaming_cpu_s": stream_s, "read_bytes_cpu_s": bytes_s, "same_documents": a == b,
        "split_per_paragraph_cpu_s": per_paragraph_s, "split_per_document_cpu_s": per_document_s,
        "split_documents_agreeing": sum(p == q for p, q in zip(x, y)), "documents": len(docs),
    }


# ----------------------------------------------------------------------------- one build


def child_build(scale: int, workers: int | None, files: int | None, workdir: Path, root: Path,
                dupe_factor: int, deadline: float | None = None) -> dict:
    """Build one scale in this process (its own local Ray runtime) with the code under `root`; its measurements.

    At `deadline` (epoch seconds) a build still running is stopped: what it had done is printed
    (`partial`) and the process tree killed."""
    sys.path.insert(0, str(root))
    import ray

    from bert.pretraining_data import PretrainingDataConfig
    from pipelines.jobs import shards as job

    corpus = workdir / f"corpus-{scale}x"
    corpus.mkdir()
    for copy in range(scale):  # the extract's files under distinct names: every document id is distinct
        target = corpus / f"copy{copy}"
        if files is None:
            target.symlink_to(WIKI, target_is_directory=True)
        else:  # a quick run on the first files
            target.mkdir()
            for path in sorted(WIKI.glob("wiki_*.gz"))[:files]:
                (target / path.name).symlink_to(path)
    num_cpus = max(4, os.cpu_count() or 1)
    for attempt in range(3):  # a loaded machine may take longer than Ray's 30 s to start a raylet
        try:
            ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, configure_logging=False,
                     log_to_driver=False, runtime_env={"env_vars": {"PYTHONPATH": str(root)}})
            break
        except Exception:
            ray.shutdown()
            if attempt == 2:
                raise
            time.sleep(10)
    # the runtime's start is not the build's: boot a worker per CPU and let it settle before measuring
    ray.get([ray.remote(num_cpus=1)(_pause).remote(0.5) for _ in range(num_cpus)])
    time.sleep(2.0)
    config = PretrainingDataConfig(dupe_factor=dupe_factor)
    with TreeMeter(os.getpid()) as meter:
        idle = meter.sample()
        start = time.perf_counter()
        if deadline:
            threading.Thread(target=_stop_at, args=(deadline, meter, start, idle, workdir / f"shards-{scale}x"),
                             daemon=True).start()
        manifest = job.build_shards([corpus], VOCAB, workdir / f"shards-{scale}x", config, num_workers=workers)
        wall = time.perf_counter() - start
    spilled = spilled_mib()
    ray.shutdown()
    cores = min(workers or num_cpus, num_cpus, len(os.sched_getaffinity(0)))  # a default uses them all
    tokens = manifest["counts"]["tokens"]
    parts = manifest["parts"]
    return {
        "code": str(root),
        "scale": scale,
        "dupe_factor": dupe_factor,
        "workers": workers or "default",
        "cores": cores,
        "documents": manifest["counts"]["documents"],
        "tokens": tokens,
        "examples": manifest["counts"]["examples"],
        "num_shards": len(parts),
        "output_bytes": sum(p["bytes"] for p in parts),
        "part_mb_min_max": [round(min(p["bytes"] for p in parts) / 2**20, 1),
                            round(max(p["bytes"] for p in parts) / 2**20, 1)],
        "wall_s": round(wall, 1),
        "tokens_per_s_per_core": round(tokens / wall / cores),
        "cpu_s": round(meter.cpu_s, 1),
        "tokens_per_cpu_s": round(tokens / meter.cpu_s),
        "idle_pss_mb": round(idle / 2**20),
        "peak_pss_mb": round(meter.peak_pss / 2**20),
        "build_pss_mb": round((meter.peak_pss - idle) / 2**20),
        "ray_spilled": spilled,
        "load_average_after": load_average(),
    }


def _stop_at(deadline: float, meter: TreeMeter, start: float, idle: int, out: Path) -> None:
    """Past the deadline: print how far the build got, kill this process's tree, exit 3."""
    import psutil

    time.sleep(max(0.0, deadline - time.time()))
    buckets = sum(p.stat().st_size for p in (out / "_work" / "buckets").rglob("*.parquet"))
    print(json.dumps({
        "partial": True, "wall_s": round(time.perf_counter() - start, 1),
        "tokenize_pass_done": (out / "_work" / "tokenized.json").is_file(),
        "bucket_mb": round(buckets / 2**20), "parts_done": len(list(out.glob("part-*.parquet"))),
        "peak_pss_mb": round(meter.peak_pss / 2**20), "idle_pss_mb": round(idle / 2**20),
        "load_average": load_average(),
    }), flush=True)
    for proc in psutil.Process().children(recursive=True):
        proc.kill()
    os._exit(3)


def spilled_mib() -> dict:
    """What Ray spilled from its object store to disk during the runtime's life (its memory summary)."""
    import re

    import ray
    from ray._private.internal_api import memory_summary

    text = memory_summary(ray.get_runtime_context().gcs_address, stats_only=True)
    found = re.search(r"Spilled (\d+) MiB, (\d+) objects", text)
    return {"mib": int(found.group(1)) if found else 0, "objects": int(found.group(2)) if found else 0}


def _pause(seconds: float) -> None:
    time.sleep(seconds)


# ----------------------------------------------------------------------------- the run


def run_child(args: list[str], env: dict[str, str] | None = None, cwd: Path = ROOT) -> dict:
    """This script in a fresh process; `cwd` is the code root its Ray workers import first (Ray puts the
    driver's directory ahead of PYTHONPATH, and the editable install's root after it)."""
    command = [sys.executable, str(Path(__file__).resolve()), *args]
    done = subprocess.run(command, stdout=subprocess.PIPE, text=True, cwd=cwd, env={**os.environ, **(env or {})})
    lines = done.stdout.strip().splitlines()
    result = json.loads(lines[-1]) if lines and lines[-1].startswith("{") else None
    if done.returncode != 0 and not (result or {}).get("partial"):
        raise subprocess.CalledProcessError(done.returncode, command, done.stdout)
    return result


ONE_THREAD = {"TOKENIZERS_PARALLELISM": "false", "RAYON_NUM_THREADS": "1"}


def measured_build(scale: int, workers: int | None, files: list[str], root: Path, dupe_factor: int,
                   workdir: Path | None, deadline: float | None = None) -> dict:
    """One build in a fresh process, with the bound measured on part of the text just before and after it."""
    nearby = ["--files", str(min(int(files[1]) if files else NEARBY_FILES, NEARBY_FILES)), "--quick"]
    before = run_child(["--child", "bound", *nearby], ONE_THREAD)
    with tempfile.TemporaryDirectory(prefix="bertflow-bench-shards-", dir=workdir) as tmp:
        extra = [] if workers is None else ["--workers", str(workers)]
        build = run_child(["--child", "build", "--scale", str(scale), "--workdir", tmp, "--root", str(root),
                           "--dupe-factor", str(dupe_factor), *extra, *files,
                           *(["--deadline", str(deadline)] if deadline else [])],
                          {"PYTHONPATH": str(root)}, cwd=root)
    if build.get("partial"):
        print(f"{root.name} {scale}x dupe {dupe_factor}: stopped at the deadline: {build}", file=sys.stderr)
        return build
    after = run_child(["--child", "bound", *nearby], ONE_THREAD)
    # the machine's speed drifts (other tenants): the bound on a part of the text just before and after
    build["bound_nearby_tokens_per_s"] = round((before["encode_batch_fast"]["tokens_per_s"]
                                                + after["encode_batch_fast"]["tokens_per_s"]) / 2)
    build["fraction_of_nearby_bound"] = round(build["tokens_per_s_per_core"] / build["bound_nearby_tokens_per_s"], 2)
    print(f"{root.name} {scale}x dupe {dupe_factor}, workers {build['workers']}: {build['wall_s']} s, "
          f"{build['fraction_of_nearby_bound']} of the bound measured around it, load {load_average()}",
          file=sys.stderr)
    return build


def ratios(big: dict, one: dict) -> dict:
    return {
        "scale": big["scale"],
        "tokens_ratio": round(big["tokens"] / one["tokens"], 2),
        "wall_ratio": round(big["wall_s"] / one["wall_s"], 2),
        "cpu_ratio": round(big["cpu_s"] / one["cpu_s"], 2),
        "peak_pss_ratio": round(big["peak_pss_mb"] / one["peak_pss_mb"], 2),
        "build_pss_ratio": round(big["build_pss_mb"] / max(1, one["build_pss_mb"]), 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--files", type=int, default=None, help="only the first N files of the extract (quick runs)")
    parser.add_argument("--big-scale", type=int, default=10, help="the large corpus multiple (default: 10)")
    parser.add_argument("--skip-scaling", action="store_true", help="leave out the 1x builds with 1 and 2 workers")
    parser.add_argument("--peer-root", type=Path, default=None,
                        help="a checkout of another commit (git worktree): its build at 1x and --big-scale too, "
                        "for the ratios against it")
    parser.add_argument("--scale", type=int, default=None,
                        help="the large-scale run instead: a 1x and an N x build of this code only (no peer, no "
                        "scaling runs), e.g. --scale 46 for a billion corpus tokens")
    parser.add_argument("--dupe-factor", type=int, default=5, help="examples per sentence pass (default: 5)")
    parser.add_argument("--workdir", type=Path, default=None, help="where corpora and shards go (default: $TMPDIR)")
    parser.add_argument("--child", choices=("bound", "build", "levers"), default=None, help=argparse.SUPPRESS)
    parser.add_argument("--quick", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--deadline", type=float, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--minutes", type=float, default=None,
                        help="stop the large build (--scale) this many minutes after the start, reporting how far it got")
    parser.add_argument("--workers", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--start-at", type=float, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--root", type=Path, default=ROOT, help=argparse.SUPPRESS)
    args = parser.parse_args()

    files = [] if args.files is None else ["--files", str(args.files)]
    if args.child == "bound":
        print(json.dumps(child_bound(args.files, args.quick, args.start_at)))
        return
    if args.child == "levers":
        print(json.dumps(child_levers(args.files or 20)))
        return
    if args.child == "build":
        print(json.dumps(child_build(args.scale, args.workers, args.files, args.workdir, args.root,
                                     args.dupe_factor, args.deadline)))
        return

    load_before = load_average()
    # the large run: the bound on part of the text (each build has its own nearby bound too)
    bound_files = files or (["--files", "20"] if args.scale else [])
    bound = run_child(["--child", "bound", *bound_files], ONE_THREAD)
    bound["all_cores"] = all_cores_bound(bound_files or ["--files", str(NEARBY_FILES * 2)], len(os.sched_getaffinity(0)))
    big_scale = args.scale or args.big_scale
    levers = None if args.scale else run_child(["--child", "levers", *files], ONE_THREAD)
    # 1 worker; 4 (one per Ray CPU, the default before, beside the physical cores' default); ours and the
    # peer's alternating, so the machine's drift falls on both
    plan = [] if args.skip_scaling or args.scale else [(1, 1, ROOT), (1, max(4, os.cpu_count() or 1), ROOT)]
    peer_root = args.peer_root.resolve() if args.peer_root and not args.scale else None
    for scale in (1, big_scale):
        plan += [(scale, None, ROOT)] + ([(scale, None, peer_root)] if peer_root else [])
    deadline = time.time() + 60 * args.minutes if args.minutes else None
    builds = [measured_build(scale, workers, files, root, args.dupe_factor, args.workdir,
                             deadline if scale == big_scale else None) for scale, workers, root in plan]
    if builds[-1].get("partial"):  # the large build did not finish: what it got to, and the 1x build
        print(json.dumps({"load_average_before": load_before, "load_average_after": load_average(), "bound": bound,
                          "builds": builds}))
        return
    mine = [b for b in builds if b["code"] == str(ROOT)]
    one = next(b for b in mine if b["scale"] == 1 and b["workers"] == "default")
    big = next(b for b in mine if b["scale"] == big_scale)
    fast, usual = bound["encode_batch_fast"], bound["encode_batch"]
    by_workers = {b["workers"]: b for b in mine if b["scale"] == 1 and isinstance(b["workers"], int)}
    report = {
        "benchmark": "shards build vs the tokenizers WordPiece alone (Wikipedia extract, bert-base-uncased)",
        "config": f"max_seq_length 128, max_predictions_per_seq 20, dupe_factor {args.dupe_factor}, "
                  "raw WikiExtractor input",
        "cpus_physical": len(os.sched_getaffinity(0)),
        "ray_num_cpus": max(4, os.cpu_count() or 1),
        "load_average_before": load_before,
        "load_average_after": load_average(),
        "bound": bound,
        "levers": levers,
        "builds": builds,
        "fraction_of_bound": {
            "by_wall_per_core_vs_nearby_encode_batch_fast": one["fraction_of_nearby_bound"],
            "big_by_wall_per_core_vs_nearby_encode_batch_fast": big["fraction_of_nearby_bound"],
            "by_wall_per_core_vs_encode_batch_fast": round(one["tokens_per_s_per_core"] / fast["tokens_per_s"], 2),
            "big_by_wall_per_core_vs_all_cores_bound": round(big["tokens_per_s_per_core"]
                                                            / bound["all_cores"]["tokens_per_s_per_core"], 2),
            "by_wall_per_core_vs_encode_batch": round(one["tokens_per_s_per_core"] / usual["tokens_per_s"], 2),
            "by_cpu_vs_encode_batch_fast": round(one["tokens_per_cpu_s"] / fast["tokens_per_cpu_s"], 2),
            "by_cpu_vs_encode_batch": round(one["tokens_per_cpu_s"] / usual["tokens_per_cpu_s"], 2),
        },
        "default_workers_vs_one_per_ray_cpu_wall": (round(by_workers[max(by_workers)]["wall_s"] / one["wall_s"], 2)
                                                     if len(by_workers) > 1 else None),
        "scaling_1_worker_to_default": (round(by_workers[1]["wall_s"] / one["wall_s"], 2) if 1 in by_workers
                                        else None),
        "scale_big": ratios(big, one),
        "before": BEFORE_TODAY,
    }
    peer = [b for b in builds if b["code"] != str(ROOT)]
    if peer:
        peer_one = next(b for b in peer if b["scale"] == 1)
        peer_big = next(b for b in peer if b["scale"] == big_scale)
        report["vs_peer"] = {
            "peer": str(args.peer_root),
            "speedup_1x_wall": round(peer_one["wall_s"] / one["wall_s"], 2),
            "speedup_big_wall": round(peer_big["wall_s"] / big["wall_s"], 2),
            "speedup_big_cpu": round(peer_big["cpu_s"] / big["cpu_s"], 2),
            "peak_pss_big_ratio": round(big["peak_pss_mb"] / peer_big["peak_pss_mb"], 2),
            "peer_scale_big": ratios(peer_big, peer_one),
        }
    print(json.dumps(report))


if __name__ == "__main__":
    main()
