"""`bertflow tokenizer`: train a SentencePiece tokenizer, or write a tokenizer dir from a BERT vocab.txt."""

from __future__ import annotations

import argparse


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
        "([PAD] [UNK] [CLS] [SEP] [MASK] are ids 0..4).",
    )
    train.add_argument("--corpus", nargs="+", required=True, metavar="PATH",
                       help="text / WikiExtractor / JSONL / parquet files (.gz or not), or directories of them")
    train.add_argument("--vocab-size", type=int, required=True, metavar="N",
                       help="vocabulary size, special tokens included (rounded up to a multiple of 64)")
    train.add_argument("--out", required=True, metavar="DIR", help="tokenizer dir to write")
    train.add_argument("--model-type", choices=("unigram", "bpe"), default="unigram")
    train.add_argument("--sample-sentences", type=int, metavar="N",
                       help="sentences sampled from the corpus and trained on; bounds memory (default: 1,000,000)")
    train.add_argument("--no-round", action="store_true", help="use exactly --vocab-size, not a multiple of 64")
    case = train.add_mutually_exclusive_group()
    case.add_argument("--lowercase", dest="lowercase", action="store_true", default=True,
                      help="lower-case text before tokenizing (default)")
    case.add_argument("--cased", dest="lowercase", action="store_false", help="keep case")
    train.add_argument("--seed", type=int, default=0, help="seed of the sentence sample (default: %(default)s)")
    train.set_defaults(handler=run_train)

    from_vocab = commands.add_parser(
        "from-vocab",
        help="write a WordPiece tokenizer dir from a BERT vocab.txt",
        description="Write a WordPiece tokenizer dir from the vocab.txt of a BERT checkpoint.",
    )
    from_vocab.add_argument("--vocab", required=True, metavar="FILE", help="a BERT vocab.txt")
    from_vocab.add_argument("--out", required=True, metavar="DIR", help="tokenizer dir to write")
    from_vocab.add_argument("--cased", action="store_true",
                            help="the vocabulary is cased: keep case and accents (default: uncased)")
    from_vocab.set_defaults(handler=run_from_vocab)


def run_train(args: argparse.Namespace) -> int:
    from bert.tokenizer import VOCAB_MULTIPLE, Tokenizer

    sample = {} if args.sample_sentences is None else {"sample_sentences": args.sample_sentences}
    tokenizer = Tokenizer.train_sentencepiece(
        args.corpus,
        args.vocab_size,
        args.out,
        model_type=args.model_type,
        lowercase=args.lowercase,
        round_to=None if args.no_round else VOCAB_MULTIPLE,
        seed=args.seed,
        **sample,
    )
    print(f"wrote {args.out}: {tokenizer!r}")
    return 0


def run_from_vocab(args: argparse.Namespace) -> int:
    from bert.tokenizer import Tokenizer

    tokenizer = Tokenizer.from_vocab_file(args.vocab, lowercase=not args.cased)
    tokenizer.save(args.out)
    print(f"wrote {args.out}: {tokenizer!r}")
    return 0
