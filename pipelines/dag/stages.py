"""The stage table: every stage kind a spec can name, its typed config and the function it runs.

| kind | reads (inputs) | writes (its output dir) | wraps |
|---|---|---|---|
| `pydoc_corpus` | - | `corpus/docs.jsonl`, `task/{train,dev}.tsv` | stdlib docstrings + `pydoc_data` |
| `tokenizer` | `corpus` (optional) | a tokenizer dir | `Tokenizer.train_sentencepiece` / `from_vocab_file` |
| `shards` | `tokenizer`, `corpus` (optional) | `shards/` (a shards dir) | `pipelines.jobs.shards.build_shards` |
| `pretrain` | `shards`, `init` (optional) | `checkpoint/`, `pretrain_manifest.json` | `pipelines.jobs.pretrain.run_pretraining` |
| `finetune` | `checkpoint`, `data` (both optional) | one node per task x seed: `metrics.json`, `predictions.jsonl`, `checkpoint/` | `pipelines.jobs.finetune.run_finetune` |
| `report` | any stages | `report.md`, `results.json`, `pretrain_curves.png` | `pipelines.dag.report.write_report` |

A stage's config is a flat mapping routed to the config dataclasses of what it wraps (for
example `pretrain` takes every field of `PretrainConfig` except the ones the pipeline sets:
`shards`, `out`, tracking). Its key hashes the fields that change its output; settings that
only change speed or logging (`num_workers` of the shards build, `log_every`, time limits)
are left out. Paths in configs (`corpus`, `vocab`, `checkpoint`, `data`) are fingerprinted
by the size and modification time of the files under them.

Long stages (pretrain, finetune) run in the stable work dir `<key>.work/` and publish only
their final files: pretraining resumes from its own checkpoints there after a kill.

Bump a kind's `VERSION` when its output format changes: every key of that kind changes.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import platform
import re
import shutil
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bert.corpus import CorpusConfig
from bert.errors import InputError
from bert.pretraining_data import PretrainingDataConfig
from pipelines.dag.graph import Stage, StageContext
from pipelines.dag.spec import Spec, StageSpec, check_value, expand_path, split_section

# ----------------------------------------------------------------------------- helpers


def path_fingerprint(paths: tuple[str, ...] | list[str]) -> list[list[Any]]:
    """[(path, size, mtime_ns)] of every file under the paths: changes when an input file does."""
    out: list[list[Any]] = []
    for p in paths:
        root = Path(p)
        if root.is_file():
            files = [root]
        else:
            files = sorted(f for f in root.rglob("*") if f.is_file() and not f.name.startswith("."))
        for f in files:
            st = f.stat()
            out.append([str(f), st.st_size, st.st_mtime_ns])
    return out


def require_paths(paths: tuple[str, ...] | list[str], where: str) -> None:
    for p in paths:
        if not Path(p).exists():
            raise InputError(f"{where}: path {p} does not exist")


def link_tree(src: Path, dst: Path) -> None:
    """Copy a file or dir by hard links (no extra space, instant); plain copies across file systems."""
    def link(a: str, b: str) -> None:
        try:
            os.link(a, b)
        except OSError:
            shutil.copy2(a, b)

    if src.is_dir():
        shutil.copytree(src, dst, copy_function=link)
    else:
        link(str(src), str(dst))


def _tracking_kwargs(ctx: StageContext) -> dict[str, Any]:
    if not ctx.tracking:
        return {"tracking_uri": None, "parent_run_id": None}
    return {"tracking_uri": ctx.tracking["tracking_uri"], "parent_run_id": ctx.tracking["run_id"],
            "experiment": ctx.tracking["experiment"]}


def _fields(cls: type, exclude: tuple[str, ...] = ()) -> tuple[str, ...]:
    return tuple(f.name for f in dataclasses.fields(cls) if f.name not in exclude)


# ----------------------------------------------------------------------------- pydoc_corpus

# Pure-Python, cross-platform stdlib modules with plenty of prose and no import side effects.
DEFAULT_MODULES = (
    "abc argparse array ast asyncio.events asyncio.streams asyncio.tasks base64 bisect builtins calendar cmath "
    "codecs collections concurrent.futures configparser contextlib copy csv dataclasses datetime decimal difflib "
    "email.message enum fractions ftplib functools gettext glob gzip hashlib heapq hmac html.parser http.client "
    "http.cookiejar http.server imaplib inspect io ipaddress itertools json logging logging.handlers lzma mailbox "
    "math mimetypes multiprocessing.pool numbers operator optparse os pathlib pickle pickletools platform plistlib "
    "poplib pprint queue random re sched secrets selectors shelve shlex shutil signal smtplib socket socketserver "
    "sqlite3 ssl statistics string struct subprocess sys tarfile tempfile textwrap threading timeit tokenize trace "
    "traceback types typing unittest.case unittest.mock urllib.parse urllib.request uuid warnings weakref "
    "xml.dom.minidom xml.etree.ElementTree zipfile zlib"
).split()
KIND_LABELS = ("class", "exception", "function", "method")


@dataclass(frozen=True)
class PydocCorpusConfig:
    """English text every Python ships: stdlib docstrings and the language reference topics.

    Also writes a labelled task in the SST-2 layout (`sentence`, `label`): the first paragraph
    of a public object's docstring, labelled with what the object is (class, exception,
    function, method), split into train/dev by module so dev modules are unseen in training.
    """

    modules: tuple[str, ...] = tuple(DEFAULT_MODULES)
    topics: bool = True  # the `pydoc_data.topics` language-reference sections
    dev_fraction: float = 0.25

    def __post_init__(self) -> None:
        if not 0 < self.dev_fraction < 1:
            raise InputError(f"pydoc_corpus: dev_fraction must be in (0, 1), got {self.dev_fraction}")


_CODE_LINE = re.compile(r"^\s*(>>>|\.\.\.|\$ |[-=~^*]{3,}\s*$)")


def _paragraphs(doc: str) -> list[str]:
    """Prose paragraphs of a docstring: blocks split at blank lines, code and indented blocks dropped."""
    out = []
    for block in re.split(r"\n\s*\n", doc.strip()):
        lines = block.splitlines()
        if not lines or any(_CODE_LINE.match(line) for line in lines) or lines[0].startswith((" ", "\t")):
            continue
        text = " ".join(line.strip() for line in lines)
        if len(text.split()) >= 3:
            out.append(text)
    return out


def _documented_objects(module_name: str):
    """(qualified name, kind, docstring) of the module's public classes, functions and methods."""
    import importlib
    import inspect

    try:
        module = importlib.import_module(module_name)
    except ImportError:
        return
    if inspect.getdoc(module):
        yield module_name, "module", inspect.getdoc(module)
    for name, obj in sorted(vars(module).items()):
        if name.startswith("_") or getattr(obj, "__module__", None) != module.__name__:
            continue
        doc = inspect.getdoc(obj)
        if inspect.isclass(obj):
            kind = "exception" if issubclass(obj, BaseException) else "class"
            if doc:
                yield f"{module_name}.{name}", kind, doc
            for attr, member in sorted(vars(obj).items()):
                if attr.startswith("_") or not callable(member):
                    continue
                member_doc = member.__doc__ if isinstance(member.__doc__, str) else None
                if member_doc:
                    yield f"{module_name}.{name}.{attr}", "method", inspect.cleandoc(member_doc)
        elif callable(obj) and doc:
            yield f"{module_name}.{name}", "function", doc


def pydoc_corpus(ctx: StageContext) -> dict[str, Any]:
    config: PydocCorpusConfig = ctx.config
    (ctx.out / "corpus").mkdir()
    (ctx.out / "task").mkdir()
    documents = 0
    examples: dict[str, list[tuple[str, str]]] = {"train": [], "dev": []}
    labels_of_text: dict[str, set[str]] = {}
    with open(ctx.out / "corpus" / "docs.jsonl", "w", encoding="utf-8") as corpus:
        for module in config.modules:
            split = "dev" if _unit_hash(module) < config.dev_fraction else "train"
            for name, kind, doc in _documented_objects(module):
                paragraphs = _paragraphs(doc)
                if not paragraphs:
                    continue
                corpus.write(json.dumps({"id": name, "text": "\n".join(paragraphs)}) + "\n")
                documents += 1
                if kind in KIND_LABELS:
                    text = paragraphs[0].replace("\t", " ")
                    examples[split].append((text, kind))
                    labels_of_text.setdefault(text, set()).add(kind)
        if config.topics:
            from pydoc_data.topics import topics

            for name in sorted(topics):
                paragraphs = _paragraphs(topics[name])
                if paragraphs:
                    corpus.write(json.dumps({"id": f"topic:{name}", "text": "\n".join(paragraphs)}) + "\n")
                    documents += 1
    counts = {}
    for split, rows in examples.items():
        seen: set[str] = set()
        kept = []
        for text, label in rows:  # drop texts that are ambiguous (two kinds) or repeated
            if len(labels_of_text[text]) == 1 and text not in seen:
                seen.add(text)
                kept.append((text, label))
        with open(ctx.out / "task" / f"{split}.tsv", "w", encoding="utf-8") as f:
            f.write("sentence\tlabel\n")
            f.writelines(f"{text}\t{label}\n" for text, label in kept)
        counts[split] = len(kept)
        counts[f"{split}_labels"] = {label: sum(1 for _, l in kept if l == label) for label in KIND_LABELS}
    ctx.log(f"{documents} documents; task examples train {counts['train']}, dev {counts['dev']}")
    return {"documents": documents, "task_examples": counts, "python": platform.python_version()}


def _unit_hash(text: str) -> float:
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "little") / 2**64


# ----------------------------------------------------------------------------- tokenizer


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


def tokenizer_stage(ctx: StageContext) -> dict[str, Any]:
    from bert.tokenizer import Tokenizer

    config: TokenizerStageConfig = ctx.config
    if config.vocab:
        tokenizer = Tokenizer.from_vocab_file(config.vocab, lowercase=config.lowercase)
        tokenizer.save(ctx.out)
    else:
        corpus = list(config.corpus) + ([str(ctx.inputs["corpus"] / "corpus")] if "corpus" in ctx.inputs else [])
        tokenizer = Tokenizer.train_sentencepiece(
            corpus, config.vocab_size, ctx.out, model_type=config.model_type, lowercase=config.lowercase,
            sample_sentences=config.sample_sentences, seed=config.seed)
    ctx.log(repr(tokenizer))
    return {"vocab_size": tokenizer.vocab_size, "backend": tokenizer.backend}


# ----------------------------------------------------------------------------- shards


@dataclass(frozen=True)
class ShardsStageConfig:
    """Where the text comes from (input `corpus` and/or paths) and how it is read; the rest of a
    shards stage's settings are `PretrainingDataConfig`'s."""

    corpus: tuple[str, ...] = ()
    text_column: str = "text"
    lowercase: bool = True
    num_workers: int | None = None  # concurrent Ray tasks: speed only, not in the key


def shards_stage(ctx: StageContext) -> dict[str, Any]:
    from pipelines.jobs.shards import build_shards

    source, data = ctx.config
    corpus = list(source.corpus) + ([str(ctx.inputs["corpus"] / "corpus")] if "corpus" in ctx.inputs else [])
    manifest = build_shards(corpus, ctx.inputs["tokenizer"], ctx.out / "shards", data,
                            CorpusConfig(text_column=source.text_column), lowercase=source.lowercase,
                            num_workers=source.num_workers)
    counts = manifest["counts"]
    ctx.log(f"{len(manifest['parts'])} parts, {counts['examples']} examples, {counts['tokens']} tokens")
    return {"parts": len(manifest["parts"]), "examples": counts["examples"], "tokens": counts["tokens"]}


# ----------------------------------------------------------------------------- pretrain

PRETRAIN_SET_BY_PIPELINE = ("shards", "out", "val_shards", "tracking_uri", "parent_run_id", "experiment")
PRETRAIN_NOT_IN_KEY = ("log_every", "time_limit_minutes", "stop_at_step", "max_failures", "keep_checkpoints",
                       "checkpoint_every", "compile")


def pretrain_stage(ctx: StageContext) -> dict[str, Any]:
    from pipelines.jobs.pretrain import run_pretraining

    fields = dict(ctx.config)
    if "init" in ctx.inputs:
        fields["model"] = str(ctx.inputs["init"] / "checkpoint")
    from pipelines.jobs.pretrain import PretrainConfig

    run_dir = ctx.work / "run"  # stable: a re-run after a kill resumes from its checkpoints
    config = PretrainConfig(shards=str(ctx.inputs["shards"] / "shards"), out=str(run_dir),
                            **_tracking_kwargs(ctx), **fields)
    manifest = run_pretraining(config)
    if not manifest.get("complete"):
        raise RuntimeError(f"pretraining stopped at step {manifest['step']} before max_steps "
                           f"({config.max_steps}); run the pipeline again to resume from {manifest['checkpoint']}")
    link_tree(run_dir / "checkpoint", ctx.out / "checkpoint")
    link_tree(run_dir / "_manifest.json", ctx.out / "pretrain_manifest.json")
    result = {"step": manifest["step"], "tokens_seen": manifest["tokens_seen"], "mlflow": manifest.get("mlflow")}
    result.update({f"final_{k}": v for k, v in (manifest.get("final_metrics") or {}).items()})
    return result


# ----------------------------------------------------------------------------- finetune

FINETUNE_SET_BY_PIPELINE = ("task", "data", "checkpoint", "out", "tokenizer", "seed", "seeds", "tracking_uri",
                            "parent_run_id", "experiment")
FINETUNE_NOT_IN_KEY = ("log_every", "eval_batch_size", "threads_per_worker", "log_model")


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


def finetune_stage(ctx: StageContext) -> dict[str, Any]:
    from pipelines.jobs.finetune import FinetuneConfig, run_finetune

    run_dir = ctx.work / "run"
    config = FinetuneConfig(out=str(run_dir), **ctx.config, **_tracking_kwargs(ctx))
    metrics = run_finetune(config)
    for name in ("metrics.json", "predictions.jsonl", "checkpoint"):
        link_tree(run_dir / name, ctx.out / name)
    primary = metrics["primary_metric"]
    return {"task": config.task, "seed": config.seed, "primary_metric": primary,
            "metrics": metrics["metrics"], "mlflow": metrics.get("mlflow")}


# ----------------------------------------------------------------------------- report


@dataclass(frozen=True)
class ReportConfig:
    title: str = "bertflow pipeline report"


def report_stage(ctx: StageContext) -> dict[str, Any]:
    from pipelines.dag.report import write_report

    return write_report(ctx.out, ctx.inputs, ctx.config.title)


# ----------------------------------------------------------------------------- the table


@dataclass(frozen=True)
class StageKind:
    name: str
    version: int
    fn: Any
    inputs: tuple[str, ...]  # known input roles (None: any)
    required_inputs: tuple[str, ...]
    resources: Mapping[str, float]


KINDS: dict[str, StageKind] = {
    k.name: k
    for k in (
        StageKind("pydoc_corpus", 1, pydoc_corpus, (), (), {"num_cpus": 1}),
        StageKind("tokenizer", 1, tokenizer_stage, ("corpus",), (), {"num_cpus": 1}),
        # the three below drive Ray Data / Ray Train workers, which hold the CPUs
        StageKind("shards", 1, shards_stage, ("tokenizer", "corpus"), ("tokenizer",), {"num_cpus": 0}),
        StageKind("pretrain", 1, pretrain_stage, ("shards", "init"), ("shards",), {"num_cpus": 0}),
        StageKind("finetune", 1, finetune_stage, ("checkpoint", "data"), (), {"num_cpus": 0}),
        StageKind("report", 1, report_stage, (), (), {"num_cpus": 0}),
    )
}


def build_stages(spec: Spec) -> list[Stage]:
    """Check every stage of the spec against the table and expand it into DAG nodes."""
    expanded: dict[str, list[str]] = {}  # spec stage -> node names (finetune fans out)
    for name, s in spec.stages.items():
        if s.kind not in KINDS:
            raise InputError(f"{spec.path}: stage {name}: unknown kind {s.kind!r}; known kinds: {', '.join(KINDS)}")
        if s.kind == "finetune":
            section = _finetune_section(s, spec)
            expanded[name] = [f"{name}.{task}.seed{seed}" for task in section.tasks for seed in section.seeds]
        else:
            expanded[name] = [name]
    stages: list[Stage] = []
    for name, s in spec.stages.items():
        kind = KINDS[s.kind]
        where = f"{spec.path}: stage {name}"
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
        resources = dict(s.resources if s.resources is not None else kind.resources)
        common = dict(kind=s.kind, version=kind.version, fn=kind.fn, max_retries=s.max_retries, resources=resources)
        stages.extend(_configure(name, s, spec, where, inputs, common))
    return stages


def _configure(name: str, s: StageSpec, spec: Spec, where: str, inputs: dict[str, str],
               common: dict[str, Any]) -> list[Stage]:
    section = s.config
    if s.kind == "pydoc_corpus":
        (values,) = split_section(section, [PydocCorpusConfig], where)
        config = PydocCorpusConfig(**values)
        fields = dataclasses.asdict(config) | {"python": platform.python_version()}
        return [Stage(name=name, config=config, config_fields=fields, inputs=inputs, **common)]

    if s.kind == "tokenizer":
        (values,) = split_section(section, [TokenizerStageConfig], where)
        config = TokenizerStageConfig(**values)
        if config.vocab:
            config = dataclasses.replace(config, vocab=expand_path(config.vocab))
            require_paths([config.vocab], where)
            if config.vocab_size or config.corpus or "corpus" in inputs:
                raise InputError(f"{where}: give either vocab (a vocab.txt) or a corpus and vocab_size, not both")
        else:
            config = dataclasses.replace(config, corpus=tuple(expand_path(p) for p in config.corpus))
            require_paths(config.corpus, where)
            if not config.vocab_size or not (config.corpus or "corpus" in inputs):
                raise InputError(f"{where}: needs vocab (a BERT vocab.txt), or vocab_size and a corpus "
                                 "(input corpus or corpus paths) to train SentencePiece on")
        fields = dataclasses.asdict(config) | {"files": path_fingerprint(list(config.corpus) + ([config.vocab] if config.vocab else []))}
        return [Stage(name=name, config=config, config_fields=fields, inputs=inputs, **common)]

    if s.kind == "shards":
        source_values, data_values = split_section(section, [ShardsStageConfig, PretrainingDataConfig], where)
        source = ShardsStageConfig(**source_values)
        source = dataclasses.replace(source, corpus=tuple(expand_path(p) for p in source.corpus))
        require_paths(source.corpus, where)
        if not source.corpus and "corpus" not in inputs:
            raise InputError(f"{where}: needs a corpus: an input `corpus` stage or `corpus` paths")
        data = _construct(PretrainingDataConfig, data_values, where)
        CorpusConfig(text_column=source.text_column)
        fields = {k: v for k, v in dataclasses.asdict(source).items() if k != "num_workers"}
        fields |= {"data": dataclasses.asdict(data), "files": path_fingerprint(source.corpus)}
        return [Stage(name=name, config=(source, data), config_fields=fields, inputs=inputs, **common)]

    if s.kind == "pretrain":
        from pipelines.jobs.pretrain import PretrainConfig

        (values,) = split_section(section, [PretrainConfig], where, excluded=PRETRAIN_SET_BY_PIPELINE)
        if "init" in inputs and "model" in values:
            raise InputError(f"{where}: the model comes from input `init`; drop the `model` setting")
        _construct(PretrainConfig, {"shards": "-", "out": "-", **values}, where)  # its own checks, now
        full = {k: v for k, v in dataclasses.asdict(PretrainConfig(shards="-", out="-", **values)).items()
                if k not in PRETRAIN_SET_BY_PIPELINE}
        if "init" in inputs:
            full.pop("model")
        elif full["model"] not in _presets():
            full["model"] = expand_path(full["model"])
            require_paths([full["model"]], where)
            values["model"] = full["model"]
            full["files"] = path_fingerprint([full["model"]])
        key_fields = {k: v for k, v in full.items() if k not in PRETRAIN_NOT_IN_KEY}
        return [Stage(name=name, config=values, config_fields=key_fields, inputs=inputs, **common)]

    if s.kind == "finetune":
        return _finetune_nodes(name, s, spec, where, inputs, common)

    if s.kind == "report":
        (values,) = split_section(section, [ReportConfig], where)
        config = ReportConfig(**values)
        return [Stage(name=name, config=config, config_fields=dataclasses.asdict(config), inputs=inputs, **common)]
    raise AssertionError(s.kind)


def _presets() -> tuple[str, ...]:
    from bert.config import PRESETS

    return tuple(PRESETS)


def _construct(cls: type, values: Mapping[str, Any], where: str) -> Any:
    try:
        return cls(**values)
    except InputError as exc:
        raise InputError(f"{where}: {exc}") from None


def _finetune_section(s: StageSpec, spec: Spec) -> FinetuneStageConfig:
    from pipelines.jobs.finetune import FinetuneConfig

    where = f"{spec.path}: stage {s.name}"
    own, _ = split_section(s.config, [FinetuneStageConfig, FinetuneConfig], where, excluded=FINETUNE_SET_BY_PIPELINE)
    if "tasks" not in own or not own["tasks"]:
        raise InputError(f"{where}: tasks is missing or empty: name at least one task, e.g. tasks: {{sst2: {{}}}}")
    seeds = own.get("seeds", (1,))
    if not seeds or len(set(seeds)) != len(seeds):
        raise InputError(f"{where}: seeds must list distinct integers, got {list(seeds)}")
    for task in own["tasks"]:
        if not re.fullmatch(r"[A-Za-z0-9_\-]+", task):
            raise InputError(f"{where}: task entry name {task!r} must be letters, digits, '_' or '-'")
    return FinetuneStageConfig(**own)


def _finetune_nodes(name: str, s: StageSpec, spec: Spec, where: str, inputs: dict[str, str],
                    common: dict[str, Any]) -> list[Stage]:
    from bert.tasks import get_task
    from pipelines.jobs.finetune import FinetuneConfig

    section = _finetune_section(s, spec)
    _, shared = split_section(s.config, [FinetuneStageConfig, FinetuneConfig], where, excluded=FINETUNE_SET_BY_PIPELINE)
    checkpoint = expand_path(section.checkpoint) if section.checkpoint else None
    if ("checkpoint" in inputs) == (checkpoint is not None):
        raise InputError(f"{where}: give the model either as input `checkpoint` (a pretrain stage) or as a "
                         "`checkpoint` path (e.g. an imported Hugging Face dir), exactly one")
    if checkpoint:
        require_paths([checkpoint], where)
    nodes = []
    for entry, task_settings in section.tasks.items():
        task_where = f"{where}.tasks.{entry}"
        task_settings = dict(task_settings or {})
        task_name = check_value(task_settings.pop("task", entry), str, f"{task_where}.task")
        try:
            get_task(task_name)
        except InputError as exc:
            raise InputError(f"{task_where}: {exc}") from None
        data = check_value(task_settings.pop("data", section.data), str | None, f"{task_where}.data")
        (overrides,) = split_section(task_settings, [FinetuneConfig], task_where, excluded=FINETUNE_SET_BY_PIPELINE)
        settings = shared | overrides
        data_is_input = "data" in inputs
        if data is None and not data_is_input:
            raise InputError(f"{task_where}: no data: set `data` (a task dir or datasets root) or give the stage "
                             "a `data` input")
        if not data_is_input:
            data = expand_path(data)
            require_paths([data], task_where)
        for seed in section.seeds:
            values = {"task": task_name, "seed": seed, **settings}
            _construct(FinetuneConfig, {"data": "-", "checkpoint": "-", "out": "-", **values}, task_where)
            full = dataclasses.asdict(FinetuneConfig(data="-", checkpoint="-", out="-", **values))
            key_fields = {k: v for k, v in full.items()
                          if k not in FINETUNE_NOT_IN_KEY + ("data", "checkpoint", "out", "tracking_uri",
                                                              "parent_run_id", "experiment", "tokenizer")}
            key_fields["data"] = data if not data_is_input else {"input": data}
            if not data_is_input:
                key_fields["files"] = path_fingerprint([data])
            if checkpoint:
                key_fields["checkpoint"] = checkpoint
                key_fields["checkpoint_files"] = path_fingerprint([checkpoint])
            nodes.append(Stage(
                name=f"{name}.{entry}.seed{seed}", config=_FinetuneNodeConfig(values, data, data_is_input, checkpoint),
                config_fields=key_fields, inputs=dict(inputs), **{**common, "fn": finetune_node},
            ))
    return nodes


@dataclass(frozen=True)
class _FinetuneNodeConfig:
    values: Mapping[str, Any]  # FinetuneConfig fields (task, seed, settings)
    data: str | None  # a path, or a path inside the `data` input
    data_is_input: bool
    checkpoint: str | None  # a path, when there is no `checkpoint` input


def finetune_node(ctx: StageContext) -> dict[str, Any]:
    """One (task, seed) of a finetune stage: resolve its checkpoint and data dirs, then fine-tune."""
    node: _FinetuneNodeConfig = ctx.config
    checkpoint = str(ctx.inputs["checkpoint"] / "checkpoint") if "checkpoint" in ctx.inputs else node.checkpoint
    if node.data_is_input:
        data = str(ctx.inputs["data"] / (node.data or ""))
    else:
        data = node.data
    inner = dataclasses.replace(ctx, config={**node.values, "data": data, "checkpoint": checkpoint})
    return finetune_stage(inner)
