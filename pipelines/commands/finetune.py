"""`bertflow finetune` (Ray Train). (`bertflow predict` lives in pipelines/commands/predict.py.)"""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    from pipelines.config_args import add_dataclass_arguments
    from pipelines.jobs.configs import FinetuneConfig

    p = sub.add_parser(
        "finetune",
        help="fine-tune a checkpoint on a task of the task table (GLUE, CoNLL NER, SQuAD) with Ray Train",
        description="Fine-tune a BERT checkpoint on one task; writes metrics.json, predictions.jsonl and "
        "checkpoint/ to --out. Re-running a finished job does nothing.",
    )
    add_dataclass_arguments(
        p,
        FinetuneConfig,
        required=("task", "data", "checkpoint", "out"),
        help={
            "task": "task name (a row of the task table, e.g. mrpc, sst2, stsb, conll2003, squad_v1_dev_split)",
            "data": "the task's data dir, or a datasets root that holds it (e.g. glue/MRPC under it)",
            "checkpoint": "starting checkpoint: a bertflow or Hugging Face BERT dir",
            "out": "output dir: metrics.json, predictions.jsonl, checkpoint/",
            "tokenizer": "tokenizer dir (default: the checkpoint dir)",
            "batch_size": "global batch size, split across workers",
            "epochs": "training epochs (fractions allowed)",
            "max_seq_length": "default: the task row's",
            "warmup_ratio": "fraction of the steps with linear warmup; linear decay after",
            "seeds": "comma-separated seeds: one training run each, mean +- std in metrics.json",
            "freeze_encoder": "feature extraction: train only the task head",
            "freeze_layers": "freeze the embeddings and the bottom K layers",
            "layer_lr_decay": "layer-wise lr decay: head x1, top layer x d, ..., embeddings x d^(L+1)",
            "length_grouping": "batches per length-sorted mega-batch when training: 1 is a plain shuffle, larger pads "
                               "less but makes each batch more nearly one length (default: 4)",
            "max_train_examples": "train on the first N examples only",
            "max_eval_examples": "evaluate on the first N examples of each eval split only",
            "parent_run_id": "nest the MLflow run(s) under this run",
            "tracking_uri": "MLflow tracking URI (default: MLFLOW_TRACKING_URI, else SQLite under --out)",
        },
    )
    add_allow_new_labels(p)
    p.set_defaults(handler=run_finetune_command)


def add_allow_new_labels(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--allow-new-labels", action="store_true",
                        help="your own tsv: task only: accept train labels that no eval file holds (a class the eval "
                             "files lack); GLUE's and CoNLL-2003's label sets are fixed")


def run_finetune_command(args: argparse.Namespace) -> int:
    from pipelines.config_args import dataclass_from_args
    from pipelines.jobs.finetune import FinetuneConfig, run_finetune
    from pipelines.jobs.finetune_outputs import describe

    from pipelines.preflight import check_finetune_start

    config = dataclass_from_args(FinetuneConfig, args)
    check_finetune_start(config, args.allow_new_labels)  # data, labels, output, tracking: before Ray or --out
    result = run_finetune(config)
    print(f"[finetune] {describe(result)}; outputs in {result['config']['out']}")
    return 0
