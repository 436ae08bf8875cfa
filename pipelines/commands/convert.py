"""`bertflow convert`: import a Hugging Face BERT dir, or export ours to the Hugging Face layout.

`--to-hf` writes what `transformers` loads: `config.json` (with `id2label` for classifiers) and the
weights for `AutoModelFor...`, and the tokenizer for `AutoTokenizer` with bertflow's ids (a
SentencePiece tokenizer as `tokenizer.json`: `bert.tokenizer.Tokenizer.save_for_transformers`).

The output is a new dir, through the job skeleton (`pipelines/jobs/convert.py`): an existing --out is
refused, as is one that is, contains or lies inside the input; the input is read whole (config and
weights) before anything is created; the dir appears under its name only when complete.
"""

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
    p.add_argument("--out", required=True, metavar="DIR",
                   help="checkpoint dir to create (must not exist, nor lie inside the input; written atomically)")
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from pipelines.jobs.convert import ConvertConfig, run_convert

    # --out and the input: a local path or an object-store URI (bert/storage.py)
    info = run_convert(ConvertConfig(source=args.to_hf or args.from_hf, out=args.out, to_hf=args.to_hf is not None))
    print(f"wrote {info['kind']} checkpoint {args.out} (head: {info['head'] or 'encoder only'})")
    return 0
