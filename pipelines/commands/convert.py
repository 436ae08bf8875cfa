"""`bertflow convert`: import a Hugging Face BERT dir, or export ours to the Hugging Face layout.

`--to-hf` writes what `transformers` loads: `config.json` (with `id2label` for classifiers) and the
weights for `AutoModelFor...`, and the tokenizer for `AutoTokenizer` with bertflow's ids (a
SentencePiece tokenizer as `tokenizer.json`: `bert.tokenizer.Tokenizer.save_for_transformers`).

The output is a new dir (pipelines/outdir.py, `atomic_output`): an existing --out is refused,
as is one that is, contains or lies inside the input; the input is read whole (config and
weights) before anything is created; the dir appears under its name only when complete.
"""

from __future__ import annotations

import argparse

JOB = "convert"


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
    from bert import storage
    from bert.checkpoint import load_for_convert, read_checkpoint_info, write_checkpoint
    from bert.tokenizer import Tokenizer
    from pipelines.outdir import atomic_output, check_disjoint, check_new

    src = args.to_hf or args.from_hf
    to_hf = args.to_hf is not None
    out = args.out  # a local path or an object-store URI (bert/storage.py), as is the input
    check_disjoint(out, [src], "--out")
    check_new(out, JOB)
    local = storage.local_copy(src, "inputs")
    with storage.named(src, local):
        model = load_for_convert(local, to_hf=to_hf)  # the whole input is read before anything is created
    with atomic_output(out, JOB, inputs=[src]) as tmp:
        write_checkpoint(model, tmp, hf=to_hf, tokenizer_dir=local)
        if to_hf and Tokenizer.is_tokenizer_dir(tmp):  # AutoTokenizer loads it, SentencePiece included
            Tokenizer.load(tmp).save_for_transformers(tmp, model.config.max_position_embeddings)
        info = read_checkpoint_info(tmp)
    print(f"wrote {info.kind} checkpoint {out} (head: {info.head or 'encoder only'})")
    return 0
