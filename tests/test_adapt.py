"""Continued pretraining of a public BERT on your own text (pipelines/adapt.yaml's path), piece by piece.

MiniLM-L6-H384 is a sentence-embedding checkpoint without MLM or NSP head: shards are built with its
own tokenizer (its dir as --tokenizer), without NSP, with whole-word masking; pretraining starts
from it with both heads initialised as BERT initialises them, and its MLM loss falls.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from bert.errors import InputError
from bert.pretraining_data import PretrainingDataConfig
from bert.tokenizer import Tokenizer
from pipelines.jobs.pretrain import PretrainConfig, run_pretraining
from pipelines.jobs.shards import build_shards

pytestmark = pytest.mark.integration

ADAPT_DATA = PretrainingDataConfig(max_seq_length=64, max_predictions_per_seq=10, dupe_factor=1, num_shards=1,
                                   whole_word_masking=True, dynamic_masking=True, next_sentence_prediction=False)


def write_sst2_text(datasets_dir: Path, out: Path, limit: int = 3000, per_document: int = 25) -> Path:
    """SST-2 training sentences without their labels: one per line, a blank line every `per_document`."""
    rows = (datasets_dir / "glue" / "SST-2" / "train.tsv").read_text(encoding="utf-8").splitlines()[1 : limit + 1]
    lines = []
    for i, row in enumerate(rows):
        lines += ([""] if i and i % per_document == 0 else []) + [row.split("\t")[0]]
    out.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return out


@pytest.fixture(scope="module")
def task_text(datasets_dir, tmp_path_factory) -> Path:
    return write_sst2_text(datasets_dir, tmp_path_factory.mktemp("text") / "sst2.txt")


def history(manifest: dict, key: str) -> list[float]:
    run = manifest["mlflow"]
    return [m.value for m in sorted(MlflowClient(run["tracking_uri"]).get_metric_history(run["run_id"], key),
                                    key=lambda m: m.step)]


@pytest.mark.slow  # the default run's 30-minute budget; run with -m slow
def test_a_checkpoint_without_mlm_head_continues_pretraining(ray_local, minilm_dir, task_text, tmp_path):
    manifest = build_shards([task_text], minilm_dir, tmp_path / "shards", ADAPT_DATA)  # the checkpoint dir's tokenizer
    assert manifest["tokenizer"]["vocab_sha256"] == Tokenizer.load(minilm_dir).fingerprint()
    assert manifest["statistics"]["next_sentence_random_fraction"] is None
    result = run_pretraining(PretrainConfig(
        shards=str(tmp_path / "shards"), out=str(tmp_path / "adapted"), model=str(minilm_dir), max_steps=12,
        global_batch_size=16, micro_batch_size=16, warmup_steps=1, learning_rate=5e-4, log_every=1,
        checkpoint_every=100, precision="fp32"))
    assert result["complete"] and result["step"] == 12
    loss, mlm_loss = history(result, "loss"), history(result, "mlm_loss")
    assert len(loss) == 12 and loss == mlm_loss  # no NSP loss without NSP
    assert history(result, "nsp_accuracy") == []
    assert sum(loss[-3:]) / 3 < sum(loss[:3]) / 3 - 1.0, loss  # the initialised MLM head learns at once
    state = json.loads((tmp_path / "adapted" / "checkpoint" / "train_state.json").read_text())
    assert state["final"] and state["step"] == 12
    assert Tokenizer.load(tmp_path / "adapted" / "checkpoint").fingerprint() == Tokenizer.load(minilm_dir).fingerprint()


def test_shards_from_another_tokenizer_are_refused_before_work(ray_local, minilm_dir, task_text, tmp_path):
    """The same vocabulary, but cased: refused before the output dir is created or Ray Train starts."""
    Tokenizer.from_vocab_file(minilm_dir / "vocab.txt", lowercase=False).save(tmp_path / "cased")
    build_shards([task_text], tmp_path / "cased", tmp_path / "shards", ADAPT_DATA)
    with pytest.raises(InputError, match="different tokenizer than checkpoint.*cased"):
        run_pretraining(PretrainConfig(shards=str(tmp_path / "shards"), out=str(tmp_path / "o"), model=str(minilm_dir),
                                       max_steps=2, global_batch_size=16, micro_batch_size=16, warmup_steps=0))
    assert not (tmp_path / "o").exists()


def test_adapt_spec_validates(datasets_dir, minilm_dir, tmp_path, monkeypatch):
    from pipelines.dag.graph import Graph
    from pipelines.dag.spec import load_spec
    from pipelines.dag.stages import build_stages

    monkeypatch.setenv("BERTFLOW_DATASETS", str(datasets_dir))
    spec = load_spec(Path(__file__).resolve().parents[1] / "pipelines" / "adapt.yaml", [f"base.path={minilm_dir}"],
                     str(tmp_path))
    graph = Graph.build(build_stages(spec), spec.workdir)
    seeds = [f"sst2.seed{s}" for s in (1, 2, 3)]
    assert list(graph.nodes) == ["base", "text", "shards", "adapt", *(f"finetune_adapted.{s}" for s in seeds),
                                 *(f"finetune_original.{s}" for s in seeds), "report"]
    # the two fine-tunes differ only in their checkpoint: same settings, same seeds
    a, o = graph.nodes["finetune_adapted.sst2.seed1"].stage, graph.nodes["finetune_original.sst2.seed1"].stage
    assert a.config_fields == o.config_fields and a.inputs == {"checkpoint": "adapt"} and o.inputs == {"checkpoint": "base"}


@pytest.mark.slow
def test_adapt_pipeline_end_to_end(ray_local, datasets_dir, minilm_dir, tmp_path, monkeypatch):
    """pipelines/adapt.yaml at a toy budget: every stage runs and the report holds the lift."""
    from pipelines.cli import main as cli

    monkeypatch.setenv("BERTFLOW_DATASETS", str(datasets_dir))
    spec = Path(__file__).resolve().parents[1] / "pipelines" / "adapt.yaml"
    small = {"max_train_examples": 64, "max_eval_examples": 128, "epochs": 1}
    overrides = [f"base.path={minilm_dir}", "text.max_examples=2000", "shards.max_seq_length=64",
                 "shards.max_predictions_per_seq=10", "shards.num_shards=1", "adapt.max_steps=6", "adapt.warmup_steps=1",
                 "adapt.head_only_steps=2",
                 "adapt.global_batch_size=16", "adapt.micro_batch_size=16", "adapt.checkpoint_every=3",
                 f"finetune_adapted.tasks={json.dumps({'sst2': small})}",
                 f"finetune_original.tasks={json.dumps({'sst2': small})}",
                 "finetune_adapted.seeds=[1, 2]", "finetune_original.seeds=[1, 2]"]
    args = ["run", str(spec), "--workdir", str(tmp_path / "work")] + [a for o in overrides for a in ("--set", o)]
    assert cli(args) == 0
    (report,) = [d for d in (tmp_path / "work" / "report").iterdir() if (d / "_manifest.json").is_file()]
    results = json.loads((report / "results.json").read_text())
    lift = results["lift"]["finetune_adapted.sst2"]
    assert lift["baseline"] == "finetune_original.sst2" and lift["seeds"] == [1, 2]
    assert lift["lift"] == pytest.approx(lift["mean"] - lift["baseline_mean"])
    assert "Lift over the baseline" in (report / "report.md").read_text()
    (adapt,) = [d for d in (tmp_path / "work" / "pretrain").iterdir() if (d / "_manifest.json").is_file()]
    assert sorted(p.name for p in (adapt / "checkpoints").iterdir()) == ["step-00000003", "step-00000006"]


def test_head_only_steps_leave_the_encoder_untouched_then_warm_it_up_and_resume_exactly(small_shards):
    """`head_only_steps`: in the first N steps the encoder's gradients are dropped (no update, no Adam state, no part
    in the clipped norm) while the heads learn; then the encoder's rate warms up from 0 over warmup_steps. A run
    stopped inside the head-only steps and resumed from its model and optimizer state ends bit-identical."""
    import io

    import torch

    from bert.config import preset
    from bert.example_order import GlobalStream
    from bert.model import BertForPreTraining
    from bert.optim import build_optimizer
    from bert.precision import Precision
    from bert.pretrain import StepConfig, train_step
    from bert.shards import ShardSet

    shards = ShardSet.open(small_shards)
    stream = GlobalStream(shards, seed=3).rank_batches(8, 0, 0, 1)
    rows = [next(stream) for _ in range(4)]
    config = StepConfig(accumulation=1, micro_batch_size=8, learning_rate=1e-3, warmup_steps=2, total_steps=4, seed=5,
                        max_predictions=shards.data.max_predictions_per_seq, head_only_steps=2)
    assert [config.encoder_factor(s) for s in range(4)] == [0.0, 0.0, 0.5, 1.0]

    def fresh():
        torch.manual_seed(0)
        model = BertForPreTraining(preset("tiny", vocab_size=shards.tokenizer.vocab_size)).train()
        return model, build_optimizer(model, "adamw", lr=1e-3, weight_decay=0.01, split_encoder=True)

    def run(model, optimizer, steps):
        for step in steps:
            train_step(model, optimizer, iter(rows[step:step + 1]), config, step, 0, Precision("fp32", "cpu"))

    model, optimizer = fresh()
    start = {k: v.clone() for k, v in model.state_dict().items()}
    encoder = [p for g in optimizer.param_groups if g["encoder"] for p in g["params"]]
    assert model.bert.embeddings.word_embeddings.weight in encoder  # the tied MLM decoder is the encoder's
    run(model, optimizer, [0, 1])
    moved = {k for k, v in model.state_dict().items() if not torch.equal(v, start[k])}
    assert moved and all(k.startswith("cls.") for k in moved), moved
    assert not any(p in optimizer.state for p in encoder)
    saved = io.BytesIO()
    torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict()}, saved)
    run(model, optimizer, [2])
    assert [g["lr"] for g in optimizer.param_groups if g["encoder"]] == [config.lr(2) * 0.5] * 2
    assert not torch.equal(model.bert.encoder.layer[0].attention.self.query.weight,
                           start["bert.encoder.layer.0.attention.self.query.weight"])
    run(model, optimizer, [3])

    saved.seek(0)
    state = torch.load(saved, weights_only=True)
    resumed, resumed_optimizer = fresh()
    resumed.load_state_dict(state["model"])
    resumed_optimizer.load_state_dict(state["optimizer"])
    run(resumed, resumed_optimizer, [2, 3])
    for k, v in model.state_dict().items():
        assert torch.equal(resumed.state_dict()[k], v), k

    with pytest.raises(InputError, match="head_only_steps"):
        PretrainConfig(shards="x", out="y", max_steps=10, warmup_steps=1, head_only_steps=10)


def test_head_learning_rate_scales_the_heads_groups_only_and_is_refused_when_not_positive(small_shards):
    """`head_learning_rate`: the heads (MLM transform and bias, NSP; not the tied decoder, which is the word
    embeddings) step at the schedule's rate times head_learning_rate / learning_rate, the encoder at the rate."""
    import torch

    from bert.config import preset
    from bert.model import BertForPreTraining
    from bert.optim import build_optimizer, set_lr
    from bert.shards import ShardSet

    torch.manual_seed(0)
    model = BertForPreTraining(preset("tiny", vocab_size=ShardSet.open(small_shards).tokenizer.vocab_size))
    optimizer = build_optimizer(model, "adamw", lr=1e-4, weight_decay=0.01, head_lr_scale=10.0)
    set_lr(optimizer, 2e-5)
    rates = {id(p): g["lr"] for g in optimizer.param_groups for p in g["params"]}
    named = dict(model.named_parameters())
    assert rates[id(named["cls.predictions.transform.dense.weight"])] == pytest.approx(2e-4)
    assert rates[id(named["cls.predictions.bias"])] == pytest.approx(2e-4)
    assert rates[id(named["cls.seq_relationship.weight"])] == pytest.approx(2e-4)
    assert rates[id(model.bert.embeddings.word_embeddings.weight)] == pytest.approx(2e-5)  # the tied decoder
    assert rates[id(named["bert.encoder.layer.0.attention.self.query.weight"])] == pytest.approx(2e-5)
    assert len(rates) == len(list(model.parameters()))
    for bad in (0.0, -1e-3, float("nan")):
        with pytest.raises(InputError, match="head_learning_rate must be positive"):
            PretrainConfig(shards="x", out="y", max_steps=10, warmup_steps=1, head_learning_rate=bad)


def test_head_only_steps_at_its_default_leaves_job_identities_and_stage_keys_as_they_were():
    """A pretraining dir or a cached pretrain stage recorded before the option existed still matches."""
    from pipelines.jobs.configs import recorded_settings, result_settings

    before = PretrainConfig(shards="s", out="o", max_steps=10, warmup_steps=1)
    for name in ("head_only_steps", "head_learning_rate"):
        assert name not in before.identity() and name not in result_settings(before)
    recorded = before.to_dict()  # what a finished run's manifest holds, then and now
    assert recorded_settings(PretrainConfig, recorded) == before.identity()
    recorded.pop("head_only_steps")
    recorded.pop("head_learning_rate")
    assert recorded_settings(PretrainConfig, recorded) == before.identity()
    assert PretrainConfig(shards="s", out="o", max_steps=10, warmup_steps=1, head_only_steps=2).identity()[
        "head_only_steps"] == 2
