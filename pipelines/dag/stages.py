"""The stage table: every stage kind a spec can name, its typed config and the job it runs.

| kind | reads (inputs) | writes (its output dir) | wraps |
|---|---|---|---|
| `pydoc_corpus` | - | `corpus/docs.jsonl`, `heldout/docs.jsonl`, `task/{train,dev}.tsv` | stdlib docstrings (`pipelines/dag/pydoc_corpus.py`) |
| `tokenizer` | `corpus` (optional) | a tokenizer dir | `Tokenizer.train_sentencepiece` / `from_vocab_file` |
| `shards` | `tokenizer`, `corpus` (optional) | `shards/` (a shards dir) | `pipelines.jobs.shards.build_shards` |
| `pretrain` | `shards`, `init`, `val` (both optional) | `checkpoint/`, `checkpoints/step-*` (those the run kept), `pretrain_manifest.json` | `pipelines.jobs.pretrain.run_pretraining` |
| `random_init` | `tokenizer` | `checkpoint/`: a model of a preset shape, randomly initialised (a from-scratch baseline) | `bert.model.BertForPreTraining` |
| `finetune` | `checkpoint`, `data` (both optional) | one node per task x seed: `metrics.json`, `predictions.jsonl`, `checkpoint/` | `pipelines.jobs.finetune.run_finetune` |
| `sweep` | `checkpoint`, `data` (both optional) | one node (one task): `sweep.json`, `trials.csv`, `sweep.png`, `best/` | `pipelines.jobs.sweep.run_sweep` (`pipelines/dag/sweep_stage.py`) |
| `report` | any stages | `report.md`, `results.json`, `pretrain_curves.png` | `pipelines.dag.report.write_report` |
| `checkpoint` | - | `checkpoint/` (an existing BERT, our layout) and its tokenizer files | `pipelines/dag/adapt_stages.py` |
| `task_text` | - | `corpus/text.txt`: a task's training text without labels | `pipelines/dag/adapt_stages.py` |
| `evaluate_checkpoints` | `pretrain`, `data` (both optional) | `curves.json`, `curves.png`: fine-tunes of every k-th checkpoint | `pipelines/dag/evaluate_stage.py` |

A kind is a row of `KINDS`: its code version, its function, its input roles, its Ray resources,
and `configure`, which parses the stage's flat config section once into typed config objects
(the dataclasses of what it wraps; their own `__post_init__` checks run here, before anything
runs) and turns them into DAG nodes. A node's key hashes the settings that change its output;
settings that only change speed or logging (`num_workers` of the shards build, `log_every`,
time limits) are left out. Paths in configs (`corpus`, `vocab`, `checkpoint`, `data`) are
fingerprinted by the size and modification time of the files under them.

Long stages (pretrain, finetune) run in the stable work dir `<key>.work/` and publish only
their final files: they resume from their own checkpoints there after a kill.

Bump a kind's version when its output format changes: every key of that kind changes.
"""

from __future__ import annotations

import dataclasses
import platform
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from bert import storage
from bert.errors import InputError
from bert.pretraining_data import PretrainingDataConfig
from pipelines.dag.graph import Stage, StageContext, path_fingerprint, require_paths, task_seed_section
from pipelines.dag.pydoc_corpus import PydocCorpusConfig, pydoc_corpus
from pipelines.config_args import check_value, construct, split_section
from pipelines.dag.spec import Spec, StageSpec, expand_path
from pipelines.dag.sweep_stage import configure_sweep, sweep_stage
from pipelines.dag.adapt_stages import checkpoint_stage, configure_checkpoint, configure_task_text, task_text_stage
from pipelines.dag.evaluate_stage import configure_evaluate, evaluate_stage

# ----------------------------------------------------------------------------- helpers


@dataclass(frozen=True)
class Where:
    """Everything `configure` needs besides the section: the stage, its resolved inputs, node defaults."""

    name: str
    spec: StageSpec
    text: str  # "spec.yaml: stage NAME", for error messages
    inputs: dict[str, str]  # input role -> upstream node name
    common: dict[str, Any]  # kind, version, fn, max_retries, resources

    def stage(self, config: Any, fields: Mapping[str, Any], **changes: Any) -> Stage:
        return Stage(**{"name": self.name, "config": config, "config_fields": fields, "inputs": dict(self.inputs),
                        **self.common, **changes})


# ----------------------------------------------------------------------------- corpus, tokenizer, shards, report


def configure_pydoc_corpus(w: Where) -> list[Stage]:
    (values,) = split_section(w.spec.config, [PydocCorpusConfig], w.text)
    config = construct(PydocCorpusConfig, values, w.text)
    return [w.stage(config, dataclasses.asdict(config) | {"python": platform.python_version()})]


@dataclass(frozen=True)
class TokenizerStageConfig:
    """Train SentencePiece on the corpus (input `corpus` or `corpus` paths), or read a BERT `vocab`."""

    vocab_size: int | None = None
    vocab: str | None = None  # a BERT vocab.txt: WordPiece, nothing trained
    corpus: tuple[str, ...] = ()
    model_type: str = "unigram"
    lowercase: bool = True
    sample_sentences: int = 1_000_000
    seed: int = 0


def configure_tokenizer(w: Where) -> list[Stage]:
    (values,) = split_section(w.spec.config, [TokenizerStageConfig], w.text)
    config = TokenizerStageConfig(**values)
    if config.vocab:
        config = dataclasses.replace(config, vocab=expand_path(config.vocab))
        require_paths([config.vocab], w.text)
        if config.vocab_size or config.corpus or "corpus" in w.inputs:
            raise InputError(f"{w.text}: give either vocab (a vocab.txt) or a corpus and vocab_size, not both")
    else:
        config = dataclasses.replace(config, corpus=tuple(expand_path(p) for p in config.corpus))
        require_paths(config.corpus, w.text)
        if not config.vocab_size or not (config.corpus or "corpus" in w.inputs):
            raise InputError(f"{w.text}: needs vocab (a BERT vocab.txt), or vocab_size and a corpus "
                             "(input corpus or corpus paths) to train SentencePiece on")
    files = path_fingerprint(list(config.corpus) + ([config.vocab] if config.vocab else []))
    return [w.stage(config, dataclasses.asdict(config) | {"files": files})]


def tokenizer_stage(ctx: StageContext) -> dict[str, Any]:
    from bert.tokenizer import Tokenizer

    config: TokenizerStageConfig = ctx.config
    if config.vocab:
        tokenizer = Tokenizer.from_vocab_file(storage.local_copy(config.vocab), lowercase=config.lowercase)
        tokenizer.save(ctx.out)
    else:
        corpus = list(config.corpus) + ([str(ctx.inputs["corpus"] / "corpus")] if "corpus" in ctx.inputs else [])
        tokenizer = Tokenizer.train_sentencepiece(
            corpus, config.vocab_size, ctx.out, model_type=config.model_type, lowercase=config.lowercase,
            sample_sentences=config.sample_sentences, seed=config.seed)
    ctx.log(repr(tokenizer))
    return {"vocab_size": tokenizer.vocab_size, "backend": tokenizer.backend}


@dataclass(frozen=True)
class ShardsStageConfig:
    """Where the text comes from (input `corpus` and/or paths) and how it is read; the rest of a
    shards stage's settings are `PretrainingDataConfig`'s."""

    corpus: tuple[str, ...] = ()
    corpus_dir: str = "corpus"  # the folder of the `corpus` input that holds the text (e.g. heldout)
    text_column: str = "text"
    lowercase: bool = True
    num_workers: int | None = None  # concurrent Ray tasks: speed only, not in the key


def configure_shards(w: Where) -> list[Stage]:
    source_values, data_values = split_section(w.spec.config, [ShardsStageConfig, PretrainingDataConfig], w.text)
    source = ShardsStageConfig(**source_values)
    source = dataclasses.replace(source, corpus=tuple(expand_path(p) for p in source.corpus))
    require_paths(source.corpus, w.text)
    if not source.corpus and "corpus" not in w.inputs:
        raise InputError(f"{w.text}: needs a corpus: an input `corpus` stage or `corpus` paths")
    data = construct(PretrainingDataConfig, data_values, w.text)
    fields = {k: v for k, v in dataclasses.asdict(source).items() if k != "num_workers"}
    data_fields = dataclasses.asdict(data)
    if data.next_sentence_prediction:  # the default: keys of shards built before the option stay as they were
        del data_fields["next_sentence_prediction"]
    fields |= {"data": data_fields, "files": path_fingerprint(source.corpus)}
    return [w.stage((source, data), fields)]


def shards_stage(ctx: StageContext) -> dict[str, Any]:
    from bert.corpus import CorpusConfig
    from pipelines.jobs.shards import build_shards

    source, data = ctx.config
    corpus = list(source.corpus) + ([str(ctx.inputs["corpus"] / source.corpus_dir)] if "corpus" in ctx.inputs else [])
    manifest = build_shards(corpus, ctx.inputs["tokenizer"], ctx.out / "shards", data,
                            CorpusConfig(text_column=source.text_column), lowercase=source.lowercase,
                            num_workers=source.num_workers)
    counts = manifest["counts"]
    ctx.log(f"{len(manifest['parts'])} parts, {counts['examples']} examples, {counts['tokens']} tokens")
    return {"parts": len(manifest["parts"]), "examples": counts["examples"], "tokens": counts["tokens"]}


@dataclass(frozen=True)
class ReportConfig:
    title: str = "bertflow pipeline report"
    baseline: str | None = None  # a finetune stage: the lift of every other one over it, task by task


def configure_report(w: Where) -> list[Stage]:
    (values,) = split_section(w.spec.config, [ReportConfig], w.text)
    config = ReportConfig(**values)
    if config.baseline and not any(n.startswith(config.baseline + ".") for n in w.inputs):
        raise InputError(f"{w.text}.baseline: {config.baseline!r} is not a finetune stage among the report's inputs")
    fields = {k: v for k, v in dataclasses.asdict(config).items() if v is not None}  # no baseline: keys as before
    return [w.stage(config, fields)]


def report_stage(ctx: StageContext) -> dict[str, Any]:
    from pipelines.dag.report import write_report

    return write_report(ctx.out, ctx.inputs, ctx.config.title, baseline=ctx.config.baseline)


# ----------------------------------------------------------------------------- pretrain

PRETRAIN_SET_BY_PIPELINE = ("shards", "out", "val_shards", "tracking_uri", "parent_run_id", "experiment")


def configure_pretrain(w: Where) -> list[Stage]:
    from bert.config import PRESETS
    from pipelines.jobs.configs import PretrainConfig, result_settings

    (values,) = split_section(w.spec.config, [PretrainConfig], w.text, excluded=PRETRAIN_SET_BY_PIPELINE)
    if "init" in w.inputs and "model" in values:
        raise InputError(f"{w.text}: the model comes from input `init`; drop the `model` setting")
    config = construct(PretrainConfig, values, w.text)  # paths are set when it runs
    fields = {k: v for k, v in result_settings(config).items() if k not in PRETRAIN_SET_BY_PIPELINE}
    if "init" in w.inputs:
        fields.pop("model")
    elif config.model not in PRESETS:
        config = dataclasses.replace(config, model=expand_path(config.model))
        require_paths([config.model], w.text)
        fields |= {"model": config.model, "files": path_fingerprint([config.model])}
    return [w.stage(config, fields)]


def pretrain_stage(ctx: StageContext) -> dict[str, Any]:
    from pipelines.dag.evaluate_stage import checkpoint_dirs
    from pipelines.jobs.pretrain import run_pretraining

    run_dir = storage.join(ctx.work, "run")  # stable: a re-run after a kill resumes from its checkpoints
    config = dataclasses.replace(ctx.config, shards=str(ctx.inputs["shards"] / "shards"), out=str(run_dir),
                                 **({"model": str(ctx.inputs["init"] / "checkpoint")} if "init" in ctx.inputs else {}),
                                 **({"val_shards": str(ctx.inputs["val"] / "shards")} if "val" in ctx.inputs else {}),
                                 **ctx.job_tracking())
    manifest = run_pretraining(config)
    if not manifest.get("complete"):
        raise RuntimeError(f"pretraining stopped at step {manifest['step']} before max_steps "
                           f"({config.max_steps}); run the pipeline again to resume from {manifest['checkpoint']}")
    ctx.adopt(storage.join(run_dir, "checkpoint"), "checkpoint")
    for kept in checkpoint_dirs(storage.join(run_dir, "_ray", "train")):  # what the run kept, for evaluate_checkpoints
        ctx.adopt(kept, f"checkpoints/{storage.name(kept)}")
    ctx.adopt(storage.join(run_dir, "_manifest.json"), "pretrain_manifest.json")
    result = {"step": manifest["step"], "tokens_seen": manifest["tokens_seen"], "mlflow": manifest.get("mlflow")}
    result.update({f"final_{k}": v for k, v in (manifest.get("final_metrics") or {}).items()})
    return result


@dataclass(frozen=True)
class RandomInitConfig:
    """A model of a preset shape with random weights: what "from scratch" starts from (the same
    weights a `pretrain` stage with this preset and seed starts from)."""

    model: str = "tiny"
    seed: int = 12345


def configure_random_init(w: Where) -> list[Stage]:
    from bert.config import PRESETS

    (values,) = split_section(w.spec.config, [RandomInitConfig], w.text)
    config = RandomInitConfig(**values)
    if config.model not in PRESETS:
        raise InputError(f"{w.text}.model: {config.model!r} is not a preset; known: {', '.join(PRESETS)}")
    return [w.stage(config, dataclasses.asdict(config))]


def random_init_stage(ctx: StageContext) -> dict[str, Any]:
    import torch

    from bert.checkpoint import save_pretrained
    from bert.config import preset
    from bert.model import BertForPreTraining
    from bert.tokenizer import Tokenizer

    config: RandomInitConfig = ctx.config
    tokenizer = Tokenizer.load(ctx.inputs["tokenizer"])
    torch.manual_seed(config.seed)
    model = BertForPreTraining(preset(config.model, vocab_size=tokenizer.vocab_size, pad_token_id=tokenizer.pad_id))
    save_pretrained(model, ctx.out / "checkpoint", tokenizer_dir=ctx.inputs["tokenizer"])
    return {"model": config.model, "parameters": sum(p.numel() for p in model.parameters())}


# ----------------------------------------------------------------------------- finetune

FINETUNE_SET_BY_PIPELINE = ("task", "data", "checkpoint", "out", "tokenizer", "seed", "seeds", "tracking_uri",
                            "parent_run_id", "experiment")


@dataclass(frozen=True)
class FinetuneStageConfig:
    """The fan-out of a finetune stage: `tasks` (name -> per-task settings) x `seeds`.

    A task entry may name the task-table row (`task:`, default: the entry's name), its data
    (`data:`, a path, or a path inside the `data` input), and override any fine-tune setting.
    `checkpoint` is a path used when the stage has no `checkpoint` input (an imported model).
    """

    tasks: dict[str, Any]
    seeds: tuple[int, ...] = (1,)
    checkpoint: str | None = None
    data: str | None = None  # datasets root or task dir shared by the tasks


@dataclass(frozen=True)
class FinetuneNode:
    """One (task, seed) of a finetune stage: its typed config, and where its checkpoint and data come from."""

    config: Any  # FinetuneConfig without paths (set when it runs)
    data: str | None  # a path, or a path inside the `data` input
    data_is_input: bool
    checkpoint: str | None  # a path, when there is no `checkpoint` input


def finetune_section(s: StageSpec, where: str) -> tuple[FinetuneStageConfig, dict[str, Any]]:
    """The stage's fan-out and the fine-tune settings shared by its tasks, each parsed once."""
    from pipelines.jobs.configs import FinetuneConfig

    own, shared = task_seed_section(s.config, [FinetuneStageConfig, FinetuneConfig], where, FINETUNE_SET_BY_PIPELINE)
    for task in own["tasks"]:
        if not re.fullmatch(r"[A-Za-z0-9_\-]+", task):
            raise InputError(f"{where}: task entry name {task!r} must be letters, digits, '_' or '-'")
    return FinetuneStageConfig(**own), shared


def node_names(name: str, s: StageSpec, where: str) -> list[str]:
    """The DAG nodes a spec stage becomes: itself, or one per task x seed for a finetune stage."""
    if s.kind != "finetune":
        return [name]
    section, _ = finetune_section(s, where)
    return [f"{name}.{task}.seed{seed}" for task in section.tasks for seed in section.seeds]


def configure_finetune(w: Where) -> list[Stage]:
    from bert.tasks import get_task
    from pipelines.jobs.configs import FinetuneConfig, result_settings

    section, shared = finetune_section(w.spec, w.text)
    checkpoint = expand_path(section.checkpoint) if section.checkpoint else None
    if ("checkpoint" in w.inputs) == (checkpoint is not None):
        raise InputError(f"{w.text}: give the model either as input `checkpoint` (a pretrain stage) or as a "
                         "`checkpoint` path (e.g. an imported Hugging Face dir), exactly one")
    if checkpoint:
        require_paths([checkpoint], w.text)
    data_is_input = "data" in w.inputs
    nodes = []
    for entry, task_settings in section.tasks.items():
        where = f"{w.text}.tasks.{entry}"
        task_settings = dict(task_settings or {})
        task = check_value(task_settings.pop("task", entry), str, f"{where}.task")
        try:
            get_task(task)
        except InputError as exc:
            raise InputError(f"{where}: {exc}") from None
        data = check_value(task_settings.pop("data", section.data), str | None, f"{where}.data")
        (overrides,) = split_section(task_settings, [FinetuneConfig], where, excluded=FINETUNE_SET_BY_PIPELINE)
        if data is None and not data_is_input:
            raise InputError(f"{where}: no data: set `data` (a task dir or datasets root) or give the stage a "
                             "`data` input")
        if not data_is_input:
            data = expand_path(data)
            require_paths([data], where)
        for seed in section.seeds:
            config = construct(FinetuneConfig, {"task": task, "seed": seed, **shared, **overrides}, where)
            fields = {k: v for k, v in result_settings(config).items()
                      if k not in FINETUNE_SET_BY_PIPELINE + ("seed",)}
            fields |= {"task": task, "seed": seed, "seeds": None}
            fields |= {"data": {"input": data}} if data_is_input else {"data": data, "files": path_fingerprint([data])}
            if checkpoint:
                fields |= {"checkpoint": checkpoint, "checkpoint_files": path_fingerprint([checkpoint])}
            nodes.append(w.stage(FinetuneNode(config, data, data_is_input, checkpoint), fields,
                                 name=f"{w.name}.{entry}.seed{seed}"))
    return nodes


def finetune_stage(ctx: StageContext) -> dict[str, Any]:
    """One (task, seed) of a finetune stage: resolve its checkpoint and data dirs, then fine-tune."""
    from pipelines.jobs.finetune import run_finetune

    node: FinetuneNode = ctx.config
    checkpoint = str(ctx.inputs["checkpoint"] / "checkpoint") if "checkpoint" in ctx.inputs else node.checkpoint
    data = str(ctx.inputs["data"] / (node.data or "")) if node.data_is_input else node.data
    run_dir = storage.join(ctx.work, "run")
    config = dataclasses.replace(node.config, data=data, checkpoint=checkpoint, out=str(run_dir), **ctx.job_tracking())
    metrics = run_finetune(config)
    for name in ("metrics.json", "predictions.jsonl", "checkpoint"):
        ctx.adopt(storage.join(run_dir, name), name)
    return {"task": config.task, "seed": config.seed, "primary_metric": metrics["primary_metric"],
            "metrics": metrics["metrics"], "mlflow": metrics.get("mlflow")}


# ----------------------------------------------------------------------------- the table


@dataclass(frozen=True)
class StageKind:
    name: str
    version: int
    fn: Callable[[StageContext], Mapping[str, Any] | None]
    inputs: tuple[str, ...]  # known input roles (empty: any)
    required_inputs: tuple[str, ...]
    resources: Mapping[str, float]
    configure: Callable[[Where], list[Stage]]  # typed configs parsed and checked once; the kind's DAG nodes


KINDS: dict[str, StageKind] = {
    k.name: k
    for k in (
        StageKind("pydoc_corpus", 2, pydoc_corpus, (), (), {"num_cpus": 1}, configure_pydoc_corpus),
        StageKind("tokenizer", 1, tokenizer_stage, ("corpus",), (), {"num_cpus": 1}, configure_tokenizer),
        # the Ray tasks / Ray Train workers these stages drive hold the CPUs (versions: 2 since the
        # shards' bytes, the training numerics and the fine-tune batches changed; finetune 3: the span loss
        # leaves padded positions out; pretrain 3: its key leaves out cpus_per_worker and placement_strategy,
        # read with every other run-only setting from the config's `run_only` marks; pretrain 4: it also publishes
        # the checkpoints its run kept, under checkpoints/, for evaluate_checkpoints)
        StageKind("shards", 2, shards_stage, ("tokenizer", "corpus"), ("tokenizer",), {"num_cpus": 0},
                  configure_shards),
        StageKind("pretrain", 4, pretrain_stage, ("shards", "init", "val"), ("shards",), {"num_cpus": 0},
                  configure_pretrain),
        StageKind("random_init", 1, random_init_stage, ("tokenizer",), ("tokenizer",), {"num_cpus": 1},
                  configure_random_init),
        StageKind("finetune", 3, finetune_stage, ("checkpoint", "data"), (), {"num_cpus": 0}, configure_finetune),
        StageKind("sweep", 1, sweep_stage, ("checkpoint", "data"), (), {"num_cpus": 0}, configure_sweep),
        StageKind("report", 1, report_stage, (), (), {"num_cpus": 0}, configure_report),
        # continued pretraining of an existing BERT (pipelines/adapt_stages.py) and curves along a run
        StageKind("checkpoint", 1, checkpoint_stage, (), (), {"num_cpus": 1}, configure_checkpoint),
        StageKind("task_text", 1, task_text_stage, (), (), {"num_cpus": 1}, configure_task_text),
        StageKind("evaluate_checkpoints", 1, evaluate_stage, ("pretrain", "data"), (), {"num_cpus": 0},
                  configure_evaluate),
    )
}


def build_stages(spec: Spec) -> list[Stage]:
    """Check every stage of the spec against the table and expand it into DAG nodes."""
    expanded: dict[str, list[str]] = {}  # spec stage -> node names (finetune fans out)
    for name, s in spec.stages.items():
        if s.kind not in KINDS:
            raise InputError(f"{spec.path}: stage {name}: unknown kind {s.kind!r}; known kinds: {', '.join(KINDS)}")
        expanded[name] = node_names(name, s, f"{spec.path}: stage {name}")
    stages: list[Stage] = []
    for name, s in spec.stages.items():
        kind, where = KINDS[s.kind], f"{spec.path}: stage {name}"
        inputs = _resolve_inputs(s, kind, spec, expanded, where)
        resources = dict(s.resources if s.resources is not None else kind.resources)
        common = dict(kind=s.kind, version=kind.version, fn=kind.fn, max_retries=s.max_retries, resources=resources)
        stages.extend(kind.configure(Where(name, s, where, inputs, common)))
    return stages


def _resolve_inputs(s: StageSpec, kind: StageKind, spec: Spec, expanded: dict[str, list[str]], where: str) -> dict[str, str]:
    """Input role -> upstream node name, checked against the kind's roles; a report takes a fan-out whole."""
    for role, upstream in s.inputs.items():
        if upstream not in spec.stages:
            raise InputError(f"{where}: input {role!r} names stage {upstream!r}, which is not in the spec; "
                             f"stages: {', '.join(spec.stages)}")
        if kind.inputs and role not in kind.inputs:
            raise InputError(f"{where}: unknown input {role!r}; a {s.kind} stage takes {', '.join(kind.inputs)}")
    for role in kind.required_inputs:
        if role not in s.inputs:
            raise InputError(f"{where}: missing input {role!r} (the stage that provides it)")
    inputs: dict[str, str] = {}
    for role, upstream in s.inputs.items():
        nodes = expanded[upstream]
        if len(nodes) == 1:
            inputs[role] = nodes[0]
        elif s.kind == "report":
            inputs.update({n: n for n in nodes})
        else:
            raise InputError(f"{where}: input {role!r} names {upstream}, which fans out into {len(nodes)} "
                             f"stages; only a report stage can take them all")
    return inputs
