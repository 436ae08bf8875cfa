"""`bertflow pretrain`: MLM + NSP pretraining on Ray Train (DDP)."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    from pipelines.config_args import add_dataclass_arguments
    from pipelines.jobs.configs import PretrainConfig

    p = sub.add_parser(
        "pretrain",
        help="pretrain BERT (MLM + NSP) on shards with Ray Train",
        description="Pretrain BERT on `bertflow shards build` output. Re-running the same command "
        "resumes from the last checkpoint in --out.",
    )
    add_dataclass_arguments(
        p,
        PretrainConfig,
        required=("shards", "out"),
        help={
            "shards": "shards dir (from `bertflow shards build`)",
            "out": "output dir: checkpoints, final checkpoint, manifest",
            "model": "preset name (tiny, mini, small, medium, base, large) or a checkpoint dir to start from (phase 2)",
            "val_shards": "held-out shards dir for MLM/NSP accuracy",
            "global_batch_size": "examples per optimiser step = micro-batch x accumulation x workers",
            "stop_at_step": "stop early at this step with a checkpoint; re-run to resume",
        },
    )
    p.add_argument("--config", dest="model", default=argparse.SUPPRESS, help="alias of --model (a preset name)")
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from pipelines.config_args import dataclass_from_args
    from pipelines.jobs.pretrain import PretrainConfig, describe_finish, run_pretraining

    from pipelines.preflight import check_pretrain_start

    config = dataclass_from_args(PretrainConfig, args)
    check_pretrain_start(config)  # model, output vs inputs, tracking store: before Ray, MLflow or --out
    manifest = run_pretraining(config)
    print(f"[pretrain] {describe_finish(manifest)}")
    return 0
