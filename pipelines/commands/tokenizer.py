"""`bertflow tokenizer`: train a SentencePiece tokenizer, or write a tokenizer dir from a BERT vocab.txt.

Both write a new dir, through the job skeleton (`pipelines/jobs/tokenizer.py`): an existing --out is refused,
as is one that is, contains or lies inside an input; the dir appears under its name only when complete.
"""

from __future__ import annotations

import argparse
import sys


def register(sub: argparse._SubParsersAction) -> None:
    group = sub.add_parser(
        "tokenizer",
        help="build tokenizer dirs (SentencePiece trained on a corpus, or WordPiece from a vocab.txt)",
        description="Build a self-describing tokenizer dir (model file + tokenizer_config.json).",
    )
    commands = group.add_subparsers(dest="tokenizer_command", metavar="SUBCOMMAND")
    commands.required = True

    train = commands.add_parser(
        "train",
        help="train a SentencePiece model on a corpus",
        description="Train a SentencePiece model on a reservoir sample of the corpus sentences "
        "([PAD] [UNK] [CLS] [SEP] [MASK] are ids 0..4). Runs of more than 1000 characters without whitespace "
        "(base64, minified code, ...) are dropped from the sample, and counted. Ctrl-C stops the training.",
    )
    train.add_argument("--corpus", nargs="+", required=True, metavar="PATH",
                       help="text / WikiExtractor / JSONL / parquet files (.gz or not), or directories of them")
    train.add_argument("--vocab-size", type=int, required=True, metavar="N",
                       help="vocabulary size, special tokens included (rounded up to a multiple of 64)")
    train.add_argument("--out", required=True, metavar="DIR",
                       help="tokenizer dir to create (must not exist, nor lie inside a corpus path)")
    train.add_argument("--model-type", choices=("unigram", "bpe"), default="unigram")
    train.add_argument("--sample-sentences", type=int, metavar="N",
                       help="sentences sampled from the corpus and trained on; bounds memory (default: 1,000,000)")
    train.add_argument("--no-round", action="store_true", help="use exactly --vocab-size, not a multiple of 64")
    case = train.add_mutually_exclusive_group()
    case.add_argument("--lowercase", dest="lowercase", action="store_true", default=True,
                      help="lower-case text before tokenizing (default)")
    case.add_argument("--cased", dest="lowercase", action="store_false", help="keep case")
    train.add_argument("--seed", type=int, default=0, help="seed of the sentence sample (default: %(default)s)")
    train.add_argument(
        "--skip-unreadable",
        action="store_true",
        help="a corrupt or truncated .gz / parquet input: keep the sentences read before the fault and go on, "
        "with a warning naming it (default: an error naming it)",
    )
    train.set_defaults(handler=run_train)

    from_vocab = commands.add_parser(
        "from-vocab",
        help="write a WordPiece tokenizer dir from a BERT vocab.txt",
        description="Write a WordPiece tokenizer dir from the vocab.txt of a BERT checkpoint.",
    )
    from_vocab.add_argument("--vocab", required=True, metavar="FILE", help="a BERT vocab.txt")
    from_vocab.add_argument("--out", required=True, metavar="DIR",
                            help="tokenizer dir to create (must not exist, nor contain the vocab file)")
    from_vocab.add_argument("--cased", action="store_true",
                            help="the vocabulary is cased: keep case and accents (default: uncased)")
    from_vocab.set_defaults(handler=run_from_vocab)


def _progress(message: str) -> None:
    print(f"[tokenizer] {message}", flush=True)


def run_train(args: argparse.Namespace) -> int:
    from bert.corpus import CorpusConfig
    from pipelines.jobs.tokenizer import TrainConfig, train_tokenizer

    config = TrainConfig(corpus=tuple(args.corpus), vocab_size=args.vocab_size, out=args.out,
                         model_type=args.model_type, sample_sentences=args.sample_sentences,
                         round_vocab=not args.no_round, lowercase=args.lowercase, seed=args.seed,
                         corpus_config=CorpusConfig(skip_unreadable=args.skip_unreadable))
    try:
        trained = train_tokenizer(config, progress=_progress)
    except KeyboardInterrupt:
        print(f"bertflow tokenizer: interrupted: training stopped, nothing was written to {args.out}", file=sys.stderr)
        return 130
    skipped = trained["unreadable_files_skipped"]
    if skipped:
        print(
            f"bertflow tokenizer: warning: --skip-unreadable: {len(skipped)} corrupt or truncated file(s) read only "
            f"up to the fault: {', '.join(skipped)} (see 'training' in {args.out}/tokenizer_config.json)",
            file=sys.stderr,
        )
    print(f"wrote {args.out}: {trained['tokenizer']!r}")
    return 0


def run_from_vocab(args: argparse.Namespace) -> int:
    from pipelines.jobs.tokenizer import FromVocabConfig, tokenizer_from_vocab

    made = tokenizer_from_vocab(FromVocabConfig(vocab=args.vocab, out=args.out, lowercase=not args.cased))
    print(f"wrote {args.out}: {made['tokenizer']!r}")
    return 0
