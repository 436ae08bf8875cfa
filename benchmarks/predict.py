"""`bertflow predict` (streamed through Ray Data) against a plain `transformers` pipeline loop. Prints ONE JSON object.

The model: a `--config` preset (`tiny` by default: 2 layers, hidden 128; `mini`: 4 layers, hidden 256) with
the bert-base-uncased WordPiece vocabulary and a 2-label SST-2 classification head, randomly initialised
(seed 0; throughput and memory do not depend on the weights), saved as a fine-tuned bertflow checkpoint and
converted with `bertflow convert --to-hf` into the Hugging Face layout the peer loads (local files only).
The input: SST-2 train sentences (../shared/datasets/glue/SST-2) repeated to `--rows` rows, as JSONL.

For each size in `--rows`, in one run:
* **bertflow**: `bertflow predict` in its own process (`--concurrency` actors of `--threads` torch threads,
  blocks of `--block-rows` rows, `--batch-size` rows per forward pass), from a fresh local Ray runtime.
* **transformers**: `pipeline("text-classification", top_k=None)` over the same JSONL in its own process,
  `--batch-size` rows per call, `concurrency x threads` torch threads, each answer written as a JSON line
  (label and probabilities, as predict writes them); truncation at the checkpoint's sequence length.
Each process's wall time from start to exit (model loading and, for bertflow, Ray's start included);
rows/s; and the peak RSS and PSS of the driver process alone (bertflow: the `bertflow predict` process, not
its Ray workers: what must stay flat as the input grows; transformers: its one process), sampled every
0.2 s. `uptime`'s load average is recorded before and after each measurement: on a shared machine only
ratios within one run mean anything.

    python benchmarks/predict.py [--rows 100000,1000000] [--config tiny] [--peer-rows 100000,1000000]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
DATASETS = Path(os.environ.get("BERTFLOW_DATASETS", ROOT.parent / "shared" / "datasets"))
MAX_SEQ_LENGTH = 64


def make_checkpoint(config_name: str, workdir: Path) -> tuple[Path, Path]:
    """(bertflow checkpoint dir, its Hugging Face conversion)."""
    import torch

    from bert.checkpoint import build_model, save_pretrained
    from bert.config import preset
    from bert.inference import write_task_file
    from bert.tokenizer import Tokenizer
    from pipelines.cli import main

    tokenizer = Tokenizer.from_vocab_file(DATASETS / "bert-base-uncased" / "vocab.txt")
    tokenizer.save(workdir / "tokenizer")
    torch.manual_seed(0)
    model = build_model(preset(config_name, vocab_size=tokenizer.vocab_size), "sequence_classification", num_labels=2)
    model.labels = ("0", "1")
    checkpoint = save_pretrained(model, workdir / "checkpoint", tokenizer_dir=workdir / "tokenizer")
    write_task_file(checkpoint, "sst2", MAX_SEQ_LENGTH)
    assert main(["convert", "--to-hf", str(checkpoint), "--out", str(workdir / "hf")]) == 0
    return checkpoint, workdir / "hf"


def make_input(rows: int, path: Path) -> Path:
    lines = (DATASETS / "glue" / "SST-2" / "train.tsv").read_text(encoding="utf-8").splitlines()[1:]
    sentences = [line.split("\t")[0].strip() for line in lines]
    with open(path, "w", encoding="utf-8") as f:
        for i in range(rows):
            f.write(json.dumps({"id": str(i), "text": sentences[i % len(sentences)]}) + "\n")
    return path


class Sampler:
    """Peak RSS and PSS of one process, sampled every 0.2 s while it runs."""

    def __init__(self, pid: int):
        import psutil

        self.process, self.peak_rss, self.peak_pss = psutil.Process(pid), 0, 0
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.run, daemon=True)
        self.thread.start()

    def run(self) -> None:
        import psutil

        while not self.stop.wait(0.2):
            try:
                info = self.process.memory_full_info()
            except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
                return
            self.peak_rss, self.peak_pss = max(self.peak_rss, info.rss), max(self.peak_pss, info.pss)

    def finish(self) -> dict[str, float]:
        self.stop.set()
        self.thread.join()
        return {"driver_peak_rss_mb": round(self.peak_rss / 2**20, 1), "driver_peak_pss_mb": round(self.peak_pss / 2**20, 1)}


def load() -> str:
    return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip().split("load average:")[-1].strip()


def measure(command: list[str], rows: int, log: Path, env: dict[str, str]) -> dict:
    before = load()
    started = time.perf_counter()
    with open(log, "w") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
        sampler = Sampler(process.pid)
        code = process.wait()
    wall = time.perf_counter() - started
    memory = sampler.finish()
    if code != 0:
        raise SystemExit(f"{command[:4]} failed ({code}); see {log}")
    return {"rows": rows, "wall_s": round(wall, 2), "rows_per_s": round(rows / wall, 1), **memory,
            "load_before": before, "load_after": load()}


PEER = """
import json, sys, torch
from transformers import pipeline
source, target, batch_size, threads, max_length = sys.argv[1:6]
torch.set_num_threads(int(threads))
pipe = pipeline("text-classification", model=sys.argv[6], tokenizer=sys.argv[6], device=-1, top_k=None)
def texts():
    with open(source, encoding="utf-8") as f:
        for line in f:
            yield json.loads(line)["text"]
with open(target, "w", encoding="utf-8") as out:
    for row, scores in enumerate(pipe(texts(), batch_size=int(batch_size), truncation=True,
                                      max_length=int(max_length))):
        best = max(scores, key=lambda s: s["score"])
        out.write(json.dumps({"row": row, "label": best["label"],
                              "probabilities": {s["label"]: s["score"] for s in scores}}) + "\\n")
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", default="100000,1000000")
    parser.add_argument("--peer-rows", default=None, help="sizes the transformers loop runs (default: --rows)")
    parser.add_argument("--config", default="tiny", choices=("tiny", "mini"))
    parser.add_argument("--concurrency", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--block-rows", type=int, default=10_000)
    parser.add_argument("--workdir", default=None)
    args = parser.parse_args()
    sizes = [int(n) for n in args.rows.split(",")]
    peer_sizes = [int(n) for n in (args.peer_rows or args.rows).split(",")]
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="bench-predict-"))
    checkpoint, hf_dir = make_checkpoint(args.config, workdir)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}
    results: dict = {"config": args.config, "max_seq_length": MAX_SEQ_LENGTH, "concurrency": args.concurrency,
                     "threads_per_actor": args.threads, "batch_size": args.batch_size, "block_rows": args.block_rows,
                     "cores": os.cpu_count(), "sizes": {}}
    for rows in sizes:
        source = make_input(rows, workdir / f"in-{rows}.jsonl")
        bertflow = measure([sys.executable, "-m", "pipelines.cli", "predict", "--checkpoint", str(checkpoint),
                            "--input", str(source), "--out", str(workdir / f"out-{rows}"),
                            "--concurrency", str(args.concurrency), "--threads-per-actor", str(args.threads),
                            "--batch-size", str(args.batch_size), "--block-rows", str(args.block_rows)],
                           rows, workdir / f"bertflow-{rows}.log", env)
        entry = {"bertflow": bertflow}
        if rows in peer_sizes:
            entry["transformers"] = measure(
                [sys.executable, "-c", PEER, str(source), str(workdir / f"peer-{rows}.jsonl"), str(args.batch_size),
                 str(args.concurrency * args.threads), str(MAX_SEQ_LENGTH), str(hf_dir)],
                rows, workdir / f"peer-{rows}.log", env)
            entry["rows_per_s_ratio"] = round(bertflow["rows_per_s"] / entry["transformers"]["rows_per_s"], 3)
        results["sizes"][str(rows)] = entry
        source.unlink()
    if len(sizes) > 1:
        small, large = (results["sizes"][str(n)]["bertflow"] for n in (sizes[0], sizes[-1]))
        results["bertflow_driver_pss_growth"] = round(large["driver_peak_pss_mb"] / small["driver_peak_pss_mb"], 3)
    results["workdir"] = str(workdir)
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
