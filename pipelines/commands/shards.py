"""`bertflow shards`: build MLM/NSP pretraining shards from a corpus, or inspect a shards dir."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from bert import storage
from bert.corpus import CorpusConfig
from bert.pretraining_data import PretrainingDataConfig
from pipelines.config_args import add_dataclass_arguments, dataclass_from_args


def register(sub: argparse._SubParsersAction) -> None:
    from pipelines.jobs.shards import BuildOptions

    p = sub.add_parser("shards", help="build or inspect MLM/NSP pretraining shards")
    shards_sub = p.add_subparsers(dest="shards_command", metavar="SUBCOMMAND")
    shards_sub.required = True

    b = shards_sub.add_parser(
        "build",
        help="corpus files -> part-*.parquet + _manifest.json (Ray Data)",
        description=(
            "Read documents (one-sentence-per-line text, WikiExtractor, JSONL, parquet; .gz too), "
            "tokenize them and write masked sentence-pair examples. The same corpus, settings, seed "
            "and shard count give byte-identical shards on any number of workers."
        ),
    )
    b.add_argument("--corpus", nargs="+", required=True, metavar="PATH",
                   help="corpus files or directories (local, or s3:// URIs)")
    b.add_argument("--tokenizer", required=True, metavar="DIR_OR_VOCAB",
                   help="a tokenizer dir, a checkpoint dir (ours or Hugging Face: its vocabulary and casing, for "
                   "continued pretraining with `bertflow pretrain --model DIR`), or a BERT vocab.txt")
    b.add_argument("--out", required=True, metavar="DIR",
                   help="shards dir to create, local or s3:// (must not exist, unless it is this build's unfinished "
                   "run, which is resumed; nor lie inside an input)")
    b.add_argument("--cased", action="store_true",
                   help="with a vocab.txt: keep case (default: lower-case); a dir brings its own casing")
    # every other option comes from the config types, listed once (their defaults live there)
    add_dataclass_arguments(b, CorpusConfig, help={
        "text_column": "text field of JSONL / parquet inputs",
        "language": "language of the sentence splitter (sentencex)",
        "max_sentence_chars": "a longer sentence is cut at whitespace into pieces of at most this many characters",
        "skip_unreadable": "a corrupt or truncated .gz / parquet input: keep the documents read before the fault and "
        "go on, with a warning naming it (else an error naming it)",
    })
    add_dataclass_arguments(b, PretrainingDataConfig, help={
        "whole_word_masking": "mask all pieces of a word together",
        "dynamic_masking": "write unmasked examples; the trainer masks them each epoch",
        "next_sentence_prediction": "sentence pairs with an NSP label; --no-next-sentence-prediction (or --no-nsp): "
        "single-segment examples [CLS] text [SEP] and no NSP loss (for single-sentence text such as a task's own "
        "training text)",
        "num_shards": "default: one per ~32 MiB of text",
    })
    b.add_argument("--no-nsp", dest="next_sentence_prediction", action="store_false", help=argparse.SUPPRESS)
    add_dataclass_arguments(b, BuildOptions, help={
        "num_workers": "concurrent Ray Data tasks (default: the physical cores on one machine, all CPUs on a cluster)",
        "files_per_task": "input files per tokenize task (default: a few tasks per worker)",
    })
    b.set_defaults(handler=run_build)

    i = shards_sub.add_parser("inspect", help="statistics and a few decoded examples of a shards dir")
    i.add_argument("dir", metavar="DIR", help="a shards dir")
    i.add_argument("--examples", type=int, default=3, help="how many examples to decode (default: 3)")
    i.set_defaults(handler=run_inspect)


def run_build(args: argparse.Namespace) -> int:
    from pipelines.jobs.shards import BuildOptions, build_shards, skipped_files

    if args.cased and storage.is_dir(args.tokenizer):  # a local dir or a prefix on an object store
        from bert.errors import InputError

        raise InputError(f"--cased applies to a vocab.txt; {args.tokenizer} is a dir with its own casing "
                         "(its tokenizer_config.json)")
    options = dataclass_from_args(BuildOptions, args)
    manifest = build_shards(
        args.corpus,
        args.tokenizer,
        args.out,
        dataclass_from_args(PretrainingDataConfig, args),
        dataclass_from_args(CorpusConfig, args),
        lowercase=not args.cased,
        num_workers=options.num_workers,
        files_per_task=options.files_per_task,
    )
    unreadable = skipped_files(manifest).get("unreadable", [])
    if unreadable:
        print(
            f"bertflow shards: warning: --skip-unreadable: {len(unreadable)} corrupt or truncated file(s) read only up "
            f"to the fault: {', '.join(unreadable)} (see 'skipped_files' in {args.out}/_manifest.json)",
            file=sys.stderr,
        )
    counts = manifest["counts"]
    print(
        f"wrote {len(manifest['parts'])} shards to {args.out}: {counts['examples']} examples from "
        f"{counts['documents']} documents ({counts['tokens']} tokens)"
    )
    return 0


def run_inspect(args: argparse.Namespace) -> int:
    import pyarrow.parquet as pq

    from bert.shards import MANIFEST, ShardSet
    from bert.tokenizer import Tokenizer

    shards = ShardSet.open(args.dir)  # every part file checked against the manifest
    manifest = shards.manifest
    tok = Tokenizer.load(manifest.tokenizer.dir)
    stats, counts = manifest.statistics, manifest.counts
    print(f"{args.dir}: {len(manifest.parts)} parts (verified), {counts['examples']} examples, "
          f"{counts['documents']} documents, {counts['tokens']} tokens (see {MANIFEST})")
    print(f"config: {manifest.raw['config']}")
    skipped = {k: v for k, v in manifest.skipped.items() if v}
    print(f"skipped: {skipped or 'nothing'}")
    split = stats["masked_split"]
    random_next = stats["next_sentence_random_fraction"]
    print(
        f"masked {stats['masked_fraction']:.2%} of maskable tokens: [MASK] {split['mask']:.1%}, "
        f"random {split['random']:.1%}, unchanged {split['keep']:.1%}; "
        f"{'no NSP (single segments)' if random_next is None else f'random next {random_next:.1%}'}; "
        f"mean length {stats['mean_length']:.1f}"
    )
    print("length histogram:")
    hist = stats["length_histogram"]
    peak = max(hist["counts"]) or 1
    for lo, hi, n in zip(hist["edges"], hist["edges"][1:], hist["counts"]):
        print(f"  {lo:5.0f}-{hi:<5.0f} {n:9d} {'#' * round(40 * n / peak)}")
    first = pq.ParquetFile(shards.path / shards.files[0])
    rows = first.read_row_group(0).slice(0, args.examples).to_pylist() if first.num_row_groups else []
    for n, row in enumerate(rows):
        print(f"\nexample {n}: next_sentence_label={row['next_sentence_label']} "
              f"A={row['a_doc_id']}[{row['a_sentence_start']}:{row['a_sentence_end']}] "
              f"B={row['b_doc_id']}[{row['b_sentence_start']}:{row['b_sentence_end']}]")
        print("  " + show_masks(tok, row))
    return 0


def show_masks(tok: Any, row: dict[str, Any]) -> str:
    """The example's tokens, each masked position shown as `[shown→original]`."""
    tokens = tok.convert_ids_to_tokens(row["input_ids"])
    for position, original in zip(row["masked_lm_positions"], row["masked_lm_ids"]):
        tokens[position] = f"[{tokens[position]}→{tok.id_to_token(original)}]"
    return " ".join(tokens)
