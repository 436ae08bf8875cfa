"""`bertflow predict`: run a fine-tuned checkpoint on new text (TSV or JSONL) with Ray Data."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    from pipelines.config_args import add_dataclass_arguments
    from pipelines.jobs.predict import PredictConfig

    q = sub.add_parser(
        "predict",
        help="run a fine-tuned checkpoint on new text (TSV or JSONL) with Ray Data",
        description="Predict with a fine-tuned checkpoint; writes JSONL, one line per input row, in input order, "
        "to the new file --output (never the input, never an existing file; written atomically). Each line has "
        "row (and id) and the fields an MLflow model of the checkpoint answers: label and probabilities "
        "(classification), score (regression), answer, start, end and score (QA), entities (NER).",
    )
    add_dataclass_arguments(
        q,
        PredictConfig,
        required=("checkpoint", "input", "output"),
        help={
            "checkpoint": "a fine-tuned checkpoint dir (or a `bertflow finetune` output dir)",
            "input": "TSV with a header line, or JSONL (.jsonl)",
            "output": "output JSONL file to create: must not exist, nor be the input or lie inside the checkpoint",
            "pair_column": "second text of pair tasks (default: text_pair)",
            "tokens_column": "NER: a list of words per row (JSONL); else --text-column is split into words",
            "concurrency": "number of model actors",
        },
    )
    q.set_defaults(handler=run_predict_command)


def run_predict_command(args: argparse.Namespace) -> int:
    from pipelines.config_args import dataclass_from_args
    from pipelines.jobs.predict import PredictConfig, run_predict

    summary = run_predict(dataclass_from_args(PredictConfig, args))
    print(f"[predict] {summary['rows']} predictions ({summary['task']}) written to {summary['output']}")
    return 0
