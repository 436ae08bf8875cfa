"""Benchmark of the object-store path against local disk, in the same run. Prints ONE JSON object.

The object store is moto's S3 server in its own process on 127.0.0.1 (a real HTTP S3 API; no
network latency or bandwidth limit, so the figures are the cost of the S3 protocol and of our
client path, not of a region's network). Measured:

* **Shard build** — `build_shards` (the `bertflow shards build` job: Ray Data tokenize and build passes, the
  manifest last) of the first `--build-files` Wikipedia files with the corpus and `--out` on local disk, then
  with both on S3 (the corpus files uploaded first; the vocab stays local), after one unmeasured local build
  (Ray Data's worker start-up), alternated `--build-repeats` times:
  tokens of the output (the manifest's count) per second of the job's wall time, median, and S3 over local;
  and whether the two outputs' parts are byte-identical.
* **Reading shards** — one rank's `GlobalStream` (world size 1, batches of 32) over one epoch of
  the same shards: from local disk; from S3 with an empty cache (every part downloaded and
  sha256-checked, the next part read ahead); from S3 with the cache warm. Tokens (the `length`
  column) per second, and the S3 figures over the local one. Alternated `--repeats` times; the
  median is reported.
* **Upload** — `storage.upload_dir` of the shards dir to S3, MB/s (what a shards build or a
  checkpoint copy-out adds when its output is on S3).
* **The commit protocol per checkpoint** — on S3: `lease.commit()` (the fence: one GET of
  `_lease.json`, then the manifest PUT) against a bare manifest PUT, and acquire + release of the
  lease (once per job); locally: `storage.write_json` (temp file + rename). Milliseconds, median of
  `--commits`.
* **Pretraining** (`--pretrain-steps N`, 0 to skip) — the same `bertflow pretrain` job (model
  `tiny`, one worker, a checkpoint every `--checkpoint-every` steps) with shards and `--out` on
  local disk, then with both on S3, in the same run: tokens/s (median of the logged windows, which
  include the checkpoint saves), the job's wall time, and the time of one checkpoint save measured
  in the job's worker (`report_checkpoint`: write, upload, fenced commit of the record) on each.

    python benchmarks/storage.py [--shards DIR] [--files N] [--repeats 3] [--commits 50] [--pretrain-steps 40]
                                 [--build-files 2] [--build-repeats 2] [--only shard_build,reading,commits,pretraining]

Without `--shards`, shards are built first from the first `--files` Wikipedia files (Ray).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))
DATASETS = Path(os.environ.get("BERTFLOW_DATASETS", ROOT.parent / "shared" / "datasets"))


def start_s3_server() -> tuple[subprocess.Popen, str]:
    from s3server import free_port

    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    endpoint = f"http://127.0.0.1:{port}"
    for _ in range(200):
        try:
            urllib.request.urlopen(f"{endpoint}/moto-api/", timeout=1).read()
            break
        except OSError:
            time.sleep(0.1)
    os.environ.update(AWS_ENDPOINT_URL=endpoint, AWS_ACCESS_KEY_ID="bench", AWS_SECRET_ACCESS_KEY="bench",
                      AWS_REGION="us-east-1", AWS_EC2_METADATA_DISABLED="true")
    import boto3

    boto3.client("s3").create_bucket(Bucket="bench")
    return server, endpoint


def ray_runtime() -> None:
    """One local Ray runtime for every measurement of the run that needs one (started by the first)."""
    import ray

    from pipelines.ray_runtime import start_local_ray

    if not ray.is_initialized():
        start_local_ray(4, {"PYTHONPATH": str(ROOT)}, configure_logging=False)


def build(files: int, out: Path) -> Path:
    from bert.pretraining_data import PretrainingDataConfig
    from pipelines.jobs.shards import build_shards

    ray_runtime()
    wiki = sorted((DATASETS / "wikipedia_en_extract" / "AA").glob("wiki_*.gz"))[:files]
    build_shards(wiki, DATASETS / "bert-base-uncased" / "vocab.txt", out, PretrainingDataConfig(dupe_factor=1, num_shards=4))
    return out


def shard_build(files: int, repeats: int, scratch: Path) -> dict:
    """The same shards build with corpus and --out on local disk and on S3, alternated; see the module docstring."""
    import hashlib

    from bert import storage
    from bert.pretraining_data import PretrainingDataConfig
    from pipelines.jobs.shards import build_shards

    ray_runtime()
    wiki = sorted((DATASETS / "wikipedia_en_extract" / "AA").glob("wiki_*.gz"))[:files]
    vocab = DATASETS / "bert-base-uncased" / "vocab.txt"
    remote_corpus = [f"s3://bench/corpus/{f.name}" for f in wiki]
    for f, uri in zip(wiki, remote_corpus):
        storage.write_bytes(uri, f.read_bytes())
    config = PretrainingDataConfig(dupe_factor=1, num_shards=2)
    build_shards(wiki, vocab, scratch / "build-warmup", config)  # not measured: Ray Data's workers start, imports
    runs: dict[str, list[float]] = {"local": [], "s3": []}
    tokens, outputs = 0, {}
    for repeat in range(repeats):
        for where, corpus, out in (("local", wiki, scratch / f"build-{repeat}"),
                                   ("s3", remote_corpus, f"s3://bench/build-{repeat}")):
            started = time.perf_counter()
            manifest = build_shards(corpus, vocab, out, config)
            runs[where].append(manifest["counts"]["tokens"] / (time.perf_counter() - started))
            tokens, outputs[where] = manifest["counts"]["tokens"], out

    def parts(out) -> dict[str, str]:
        return {rel: hashlib.sha256(storage.read_bytes(storage.join(out, rel))).hexdigest()
                for rel, _ in storage.walk_files(out) if rel.endswith(".parquet")}

    medians = {k: statistics.median(v) for k, v in runs.items()}
    return {"files": [f.name for f in wiki], "corpus_bytes": sum(f.stat().st_size for f in wiki), "tokens": tokens,
            "tokens_per_s": {k: round(v) for k, v in medians.items()},
            "all_runs_tokens_per_s": {k: [round(x) for x in v] for k, v in runs.items()},
            "s3_over_local": round(medians["s3"] / medians["local"], 3),
            "parts_byte_identical": parts(outputs["local"]) == parts(outputs["s3"])}


def read_epoch(location, cache) -> tuple[float, int]:
    from bert.example_order import GlobalStream
    from bert.shards import ShardSet

    started = time.perf_counter()
    shards = ShardSet.open(location, cache=cache)
    stream = GlobalStream(shards, seed=0)
    tokens, seen = 0, 0
    for batch in stream.rank_batches(32, 0, 0, 1):
        tokens += sum(row["length"] for row in batch)
        seen += len(batch)
        if seen + 32 > stream.epoch_size:
            break
    return time.perf_counter() - started, tokens


def reading(local: Path, remote: str, repeats: int, scratch: Path) -> dict:
    from bert.shards import PartCache

    runs: dict[str, list[float]] = {"local": [], "s3_cold_cache": [], "s3_warm_cache": []}
    read_epoch(local, None)  # warm-up: imports, the page cache
    tokens = 0
    for repeat in range(repeats):
        seconds, tokens = read_epoch(local, None)
        runs["local"].append(tokens / seconds)
        cache = PartCache(scratch / f"cache-{repeat}", 1 << 34)
        seconds, _ = read_epoch(remote, cache)
        runs["s3_cold_cache"].append(tokens / seconds)
        seconds, _ = read_epoch(remote, cache)
        runs["s3_warm_cache"].append(tokens / seconds)
    medians = {k: statistics.median(v) for k, v in runs.items()}
    return {"tokens_per_epoch": tokens, "tokens_per_s": {k: round(v) for k, v in medians.items()},
            "all_runs_tokens_per_s": {k: [round(x) for x in v] for k, v in runs.items()},
            "s3_over_local": {k: round(medians[k] / medians["local"], 3) for k in ("s3_cold_cache", "s3_warm_cache")}}


def timed_ms(fn, n: int) -> float:
    samples = []
    for i in range(n):
        started = time.perf_counter()
        fn(i)
        samples.append((time.perf_counter() - started) * 1000)
    return round(statistics.median(samples), 2)


def commits(n: int, scratch: Path) -> dict:
    from bert import storage
    from pipelines import lease

    manifest = {"step": 0, "files": [f"part-{i:05d}" for i in range(20)]}
    base = "s3://bench/commit"
    out: dict[str, float] = {}
    out["s3_manifest_put_ms"] = timed_ms(lambda i: storage.write_json(f"{base}/bare/_manifest.json", {**manifest, "step": i}), n)

    def cycle(i: int) -> None:
        with lease.acquire(f"{base}/cycle", job="bench"):
            pass

    out["s3_lease_acquire_release_ms"] = timed_ms(cycle, max(5, n // 5))
    with lease.acquire(f"{base}/held", job="bench") as held:
        out["s3_fenced_commit_ms"] = timed_ms(lambda i: held.commit(f"{base}/held/_manifest.json", {**manifest, "step": i}), n)
        out["s3_fence_check_ms"] = timed_ms(lambda i: held.check(), n)
    out["local_manifest_write_ms"] = timed_ms(lambda i: storage.write_json(scratch / "_manifest.json", {**manifest, "step": i}), n)
    out["s3_fence_overhead_per_checkpoint_ms"] = round(out["s3_fenced_commit_ms"] - out["s3_manifest_put_ms"], 2)
    return out


def pretraining(local: Path, remote: str, steps: int, every: int, scratch: Path) -> dict:
    """The same tiny pretraining job on local disk and on S3 (shards and --out); see the module docstring."""
    from mlflow.tracking import MlflowClient

    from pipelines.jobs.configs import PretrainConfig
    from pipelines.jobs.pretrain import run_pretraining

    ray_runtime()
    common = dict(model="tiny", num_workers=1, global_batch_size=32, micro_batch_size=32, warmup_steps=2,
                  learning_rate=1e-3, log_every=every, checkpoint_every=every, max_steps=steps, precision="fp32")
    result = {"steps": steps, "checkpoint_every": every}
    for where, shards, out in (("local", str(local), str(scratch / "pretrain")), ("s3", remote, "s3://bench/pretrain")):
        started = time.perf_counter()
        manifest = run_pretraining(PretrainConfig(**common, shards=shards, out=out))
        wall = time.perf_counter() - started
        client = MlflowClient(manifest["mlflow"]["tracking_uri"])
        history = client.get_metric_history(manifest["mlflow"]["run_id"], "tokens_per_s")
        saves = client.get_metric_history(manifest["mlflow"]["run_id"], "checkpoint_seconds")
        result[where] = {"tokens_per_s": round(statistics.median(m.value for m in history)),
                         "wall_s": round(wall, 1), "tokens_seen": manifest["tokens_seen"],
                         "checkpoint_save_s": round(statistics.median(m.value for m in saves), 3) if saves else None}
    result["s3_over_local_tokens_per_s"] = round(result["s3"]["tokens_per_s"] / result["local"]["tokens_per_s"], 3)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shards", type=Path, help="an existing local shards dir (default: build one)")
    parser.add_argument("--build-only", type=Path, metavar="DIR", help="only build the shards into DIR (for --shards)")
    parser.add_argument("--files", type=int, default=4, help="Wikipedia files to build shards from")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--commits", type=int, default=50)
    parser.add_argument("--pretrain-steps", type=int, default=40, help="0: no pretraining runs")
    parser.add_argument("--checkpoint-every", type=int, default=10)
    parser.add_argument("--build-files", type=int, default=2, help="Wikipedia files of the shard build comparison")
    parser.add_argument("--build-repeats", type=int, default=2)
    parser.add_argument("--only", default="shard_build,reading,commits,pretraining",
                        help="comma-separated: which of shard_build, reading, commits, pretraining to measure")
    args = parser.parse_args()
    only = set(args.only.split(","))
    unknown = only - {"shard_build", "reading", "commits", "pretraining"}
    if unknown:
        parser.error(f"--only: unknown measurement(s) {', '.join(sorted(unknown))}")
    if args.build_only:
        print(json.dumps({"built": str(build(args.files, args.build_only))}))
        return
    server, endpoint = start_s3_server()
    os.environ.setdefault("BERTFLOW_CACHE", tempfile.mkdtemp(prefix="bertflow-bench-cache-"))
    os.environ.pop("MLFLOW_TRACKING_URI", None)
    try:
        with tempfile.TemporaryDirectory(prefix="bertflow-bench-storage-") as scratch:
            scratch = Path(scratch)
            result = {"benchmark": "storage", "object_store": f"moto S3 server, own process, {endpoint}"}
            if "shard_build" in only:
                result["shard_build"] = shard_build(args.build_files, args.build_repeats, scratch)
            if only & {"reading", "pretraining"}:
                local = args.shards or build(args.files, scratch / "shards")
                from bert import storage

                size = sum(p.stat().st_size for p in local.rglob("*") if p.is_file())
                started = time.perf_counter()
                storage.upload_dir(local, "s3://bench/shards")
                upload_s = time.perf_counter() - started
                result |= {"shards_bytes": size, "upload_mb_per_s": round(size / upload_s / 1e6, 1)}
            if "reading" in only:
                result["reading"] = reading(local, "s3://bench/shards", args.repeats, scratch)
            if "commits" in only:
                result["commit_protocol"] = commits(args.commits, scratch)
            if "pretraining" in only and args.pretrain_steps:
                result["pretraining"] = pretraining(local, "s3://bench/shards", args.pretrain_steps,
                                                    args.checkpoint_every, scratch)
            result |= {"load_average": os.getloadavg(), "cpus": os.cpu_count()}
    finally:
        server.terminate()
        server.wait(timeout=30)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
