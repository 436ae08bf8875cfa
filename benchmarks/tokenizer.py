"""Tokenizer throughput on the Wikipedia extract: WordPiece and SentencePiece, ours vs transformers.

Input: the sentences (as `bert.corpus` reads and splits them, i.e. what the shards stage
tokenizes) of a fixed subset of the extract, the first `--files` shards in sorted order. All in
this one process, each tokenizer is timed

- batched: `encode_batch` on `--batch` sentences a call (the libraries use every core), and
- one call per sentence, on the first `--single` sentences.

WordPiece (the `bert-base-uncased` vocab.txt) is compared with `transformers.BertTokenizerFast`
doing the same work (ids, token type ids and offsets). The contenders take turns chunk by chunk
(a batch, or 256 single calls), in alternating order, for `--rounds` passes, so that drift in
the load of a shared machine hits all of them alike. Tokens/s count the tokens of the texts,
not [CLS]/[SEP].

SentencePiece: a model trained by `bertflow tokenizer train` (32000 pieces on the whole
extract unless `--sp-dir` names an existing tokenizer dir); the training runs in a child
process whose wall time and peak resident memory are reported.

Prints one JSON object.

    python benchmarks/tokenizer.py [--files 10] [--rounds 2] [--sp-dir DIR]
"""

from __future__ import annotations

import sys
from pathlib import Path

import argparse
import json
import os
import platform
import resource
import subprocess
import tempfile
import time
from collections.abc import Callable

ROOT = Path(__file__).resolve().parents[1]
DATASETS = Path(os.environ.get("BERTFLOW_DATASETS", ROOT.parent / "shared" / "datasets"))
WIKI = DATASETS / "wikipedia_en_extract"
SINGLE_CHUNK = 256  # single calls timed in one go

Contender = Callable[[list[str]], int]  # encodes a chunk of sentences, returns its text tokens


def subset_sentences(n_files: int) -> tuple[list[Path], list[str]]:
    from bert.corpus import ReadStats, expand_inputs, read_documents

    files = expand_inputs([WIKI])[:n_files]
    stats = ReadStats()
    return [f.path for f in files], [s for f in files for doc in read_documents(f, stats) for s in doc.sentences]


def train_sentencepiece(out: Path, vocab_size: int) -> dict:
    """`bertflow tokenizer train` on the whole extract in a child process: wall time and peak RSS."""
    command = [sys.executable, "-m", "pipelines.cli", "tokenizer", "train", "--corpus", str(WIKI),
               "--vocab-size", str(vocab_size), "--out", str(out)]
    start = time.perf_counter()
    subprocess.run(command, cwd=ROOT, check=True, capture_output=True)
    seconds = time.perf_counter() - start
    config = json.loads((out / "tokenizer_config.json").read_text())
    return {
        "corpus": "wikipedia_en_extract (all 100 shards)",
        "vocab_size": config["vocab_size"],
        "sentences_seen": config["training"]["sentences_seen"],
        "sentences_sampled": config["training"]["sentences_sampled"],
        "seconds": round(seconds, 1),
        "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024),
    }


def race(contenders: dict[str, Contender], chunks: list[list[str]], rounds: int) -> dict[str, dict[str, int]]:
    """Tokens and tokens/s of each contender, timed chunk by chunk in turn (order flipped every chunk)."""
    for contender in contenders.values():  # warm up: thread pools, caches
        contender(chunks[0])
    seconds = dict.fromkeys(contenders, 0.0)
    tokens = dict.fromkeys(contenders, 0)
    order = list(contenders)
    for _ in range(rounds):
        for chunk in chunks:
            for name in order:
                start = time.perf_counter()
                tokens[name] += contenders[name](chunk)
                seconds[name] += time.perf_counter() - start
            order.reverse()
    return {name: {"tokens": tokens[name] // rounds, "tokens_per_s": round(tokens[name] / seconds[name])}
            for name in contenders}


def chunked(items: list[str], size: int) -> list[list[str]]:
    return [items[i : i + size] for i in range(0, len(items), size)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--files", type=int, default=10, help="shards of the extract to tokenize (default: 10)")
    parser.add_argument("--batch", type=int, default=1024, help="sentences per encode_batch call")
    parser.add_argument("--single", type=int, default=20_000, help="sentences encoded one per call")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--sp-dir", type=Path, help="an existing SentencePiece tokenizer dir (skips training)")
    parser.add_argument("--sp-vocab-size", type=int, default=32_000)
    args = parser.parse_args()

    import sentencepiece
    import tokenizers
    import transformers
    from transformers import BertTokenizerFast

    from bert.tokenizer import Tokenizer

    files, sentences = subset_sentences(args.files)
    single = sentences[: args.single]
    result: dict = {
        "subset": {
            "files": [str(f.relative_to(DATASETS)) for f in files],
            "sentences": len(sentences),
            "characters": sum(map(len, sentences)),
            "single_call_sentences": len(single),
        },
        "machine": {"cpus": os.cpu_count(), "load_average_1min_at_start": round(os.getloadavg()[0], 1),
                    "python": platform.python_version(), "tokenizers": tokenizers.__version__,
                    "sentencepiece": sentencepiece.__version__, "transformers": transformers.__version__},
    }

    with tempfile.TemporaryDirectory() as tmp:
        sp_dir = args.sp_dir
        if sp_dir is None:
            sp_dir = Path(tmp) / "spm"
            result["sentencepiece_training"] = train_sentencepiece(sp_dir, args.sp_vocab_size)
        sp = Tokenizer.load(sp_dir)

    vocab = DATASETS / "bert-base-uncased" / "vocab.txt"
    wordpiece = Tokenizer.from_vocab_file(vocab)
    reference = BertTokenizerFast.from_pretrained(str(vocab.parent))

    def ours(tokenizer: Tokenizer) -> tuple[Contender, Contender]:
        def batch(texts: list[str]) -> int:
            return sum(len(e) - 2 for e in tokenizer.encode_batch(texts))

        def one_by_one(texts: list[str]) -> int:
            return sum(len(tokenizer.encode(t)) - 2 for t in texts)

        return batch, one_by_one

    def reference_batch(texts: list[str]) -> int:
        out = reference(texts, return_offsets_mapping=True, return_token_type_ids=True)
        return sum(len(ids) - 2 for ids in out["input_ids"])

    def reference_one_by_one(texts: list[str]) -> int:
        return sum(len(reference(t, return_offsets_mapping=True, return_token_type_ids=True)["input_ids"]) - 2
                   for t in texts)

    # SentencePiece runs on its own: its worker threads, still spinning after a call, would slow
    # down whichever contender came next.
    wp_batch, wp_single = ours(wordpiece)
    sp_batch, sp_single = ours(sp)
    batches, single_chunks = chunked(sentences, args.batch), chunked(single, SINGLE_CHUNK)
    batched = race({"wordpiece": wp_batch, "hf_fast": reference_batch}, batches, args.rounds)
    singles = race({"wordpiece": wp_single, "hf_fast": reference_one_by_one}, single_chunks, args.rounds)
    batched |= race({"sentencepiece": sp_batch}, batches, args.rounds)
    singles |= race({"sentencepiece": sp_single}, single_chunks, args.rounds)
    assert batched["wordpiece"]["tokens"] == batched["hf_fast"]["tokens"], "ours and transformers disagree"

    result["wordpiece"] = {
        "vocab": "bert-base-uncased vocab.txt",
        "tokens": batched["wordpiece"]["tokens"],
        "batched_tokens_per_s": batched["wordpiece"]["tokens_per_s"],
        "single_call_tokens_per_s": singles["wordpiece"]["tokens_per_s"],
        "hf_fast_batched_tokens_per_s": batched["hf_fast"]["tokens_per_s"],
        "hf_fast_single_call_tokens_per_s": singles["hf_fast"]["tokens_per_s"],
        "ratio_batched_vs_hf_fast": round(batched["wordpiece"]["tokens_per_s"] / batched["hf_fast"]["tokens_per_s"], 3),
        "ratio_single_call_vs_hf_fast": round(
            singles["wordpiece"]["tokens_per_s"] / singles["hf_fast"]["tokens_per_s"], 3
        ),
    }
    result["sentencepiece"] = {
        "model": "trained above" if args.sp_dir is None else str(args.sp_dir),
        "vocab_size": sp.vocab_size,
        "tokens": batched["sentencepiece"]["tokens"],
        "batched_tokens_per_s": batched["sentencepiece"]["tokens_per_s"],
        "single_call_tokens_per_s": singles["sentencepiece"]["tokens_per_s"],
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
