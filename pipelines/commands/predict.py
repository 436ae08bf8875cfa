"""`bertflow predict`: run a fine-tuned checkpoint on new text (JSONL, TSV, CSV, parquet), streamed through Ray Data."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    from pipelines.config_args import add_dataclass_arguments
    from pipelines.jobs.predict import PredictConfig

    q = sub.add_parser(
        "predict",
        help="run a fine-tuned checkpoint on new text (JSONL, TSV, CSV, parquet), streamed through Ray Data",
        description="Predict with a fine-tuned checkpoint, streaming the input through Ray Data (the driver's memory "
        "does not grow with it). Writes the new dir --out (a local path or an s3:// URI; never the input, never an "
        "existing path, except on an object store this job's unfinished run): part-<first row>.jsonl files, one JSON "
        "line per input row, in input order, and _manifest.json, written last (locally the dir is renamed into "
        "place when complete). Each line has row (and id) and the fields an MLflow model of the checkpoint "
        "answers: label and probabilities (classification), score (regression), answer, start, end and score "
        "(QA), entities (NER).",
    )
    add_dataclass_arguments(
        q,
        PredictConfig,
        required=("checkpoint", "input", "out"),
        help={
            "checkpoint": "a fine-tuned checkpoint dir (or a `bertflow finetune` output dir); a local path or an "
            "s3:// URI (downloaded once per node)",
            "input": "JSONL (.jsonl), CSV (.csv) or TSV (else) with a header line (.gz too), or parquet (.parquet); "
            "a local path or an s3:// URI",
            "out": "output dir to create (local or s3://): must not exist, nor be the input or lie inside the checkpoint",
            "block_rows": "rows per Ray Data block: per model-actor call and per output part",
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
    print(f"[predict] {summary['rows']} predictions ({summary['task']}) written to {summary['output']} "
          f"({summary['parts']} parts)")
    return 0
