"""`bertflow convert`: import a Hugging Face BERT dir, or export ours to the Hugging Face layout."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "convert",
        help="convert checkpoints between the Hugging Face BERT layout and ours",
        description="Convert a checkpoint dir. Heads present in the source are kept; tokenizer files travel along.",
    )
    direction = p.add_mutually_exclusive_group(required=True)
    direction.add_argument("--from-hf", metavar="DIR", help="a Hugging Face BERT dir to import")
    direction.add_argument("--to-hf", metavar="DIR", help="a bertflow checkpoint dir to export")
    p.add_argument("--out", required=True, metavar="DIR", help="output checkpoint dir (written atomically)")
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from bert.checkpoint import convert, read_checkpoint_info

    src = args.to_hf or args.from_hf
    out = convert(src, args.out, to_hf=args.to_hf is not None)
    info = read_checkpoint_info(out)
    print(f"wrote {info.kind} checkpoint {out} (head: {info.head or 'encoder only'})")
    return 0
