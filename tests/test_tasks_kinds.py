"""The kind table (`bert.tasks.kinds`): a new task kind, added in one place, reaches every consumer.

The new kind is multiple choice (the BERT paper's SWAG setup: each choice encoded with the context as a
sentence pair, the [CLS] vector of each pair scored by one linear layer, softmax over the choices). No
SWAG here, so its task is built from real data: SQuAD v1.1 dev questions, each with four sentences of its
paragraph as the choices, the right one the sentence that holds the answer (answer-sentence selection,
as QNLI is built from SQuAD). Everything the kind needs is in the `multiple_choice` fixture: its head
(`bert.model.HEADS` and the checkpoint head map), its kind row and its task row. Nothing in `pipelines/`
knows about it, yet the fine-tune core, evaluation, inference, the MLflow signature and `bertflow predict`'s
column mapping all serve it. The head is checked against Hugging Face `transformers.BertForMultipleChoice`.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from sklearn.metrics import accuracy_score
from torch import nn

from bert import checkpoint as ckpt
from bert import model as bert_model
from bert.checkpoint import from_pretrained, save_pretrained
from bert.errors import InputError
from bert.finetune import Schedule, layerwise_groups, prediction_records, prepare, score, task_model, train_lengths, train_step
from bert.inference import Predictor, head_outputs, length_sorted_chunks, write_task_file
from bert.optim import adamw
from bert.precision import Precision
from bert.tasks import KINDS, TASKS, KindSpec, collate, feature_length, register_kind
from bert.tasks.featurize import json_number, pad_inputs, record_text, softmax
from bert.tasks.kinds import Field
from bert.tasks.readers import TaskData, load_squad, split_squad_by_article
from bert.tasks.table import TaskSpec, accuracy_metric
from bert.tokenizer import Tokenizer

CHOICES = 4
_SENTENCE = re.compile(r"[^.!?]+[.!?]+(?:\s+|$)")


# ----------------------------------------------------------------------------- the new kind, in one place


class BertForMultipleChoice(nn.Module):
    """[CLS] pooled output of each (context, choice) pair -> dropout -> linear(D, 1); softmax over choices."""

    head = "multiple_choice"

    def __init__(self, config):
        super().__init__()
        self.config = config
        self.bert = bert_model.BertModel(config)
        self.dropout = bert_model.Dropout(config.hidden_dropout_prob)
        self.classifier = nn.Linear(config.hidden_size, 1)
        bert_model.init_weights(self.classifier, config.initializer_range)

    def forward(self, input_ids, token_type_ids=None, attention_mask=None, labels=None):
        B, C, T = input_ids.shape
        flat = [x.reshape(B * C, T) if x is not None else None for x in (input_ids, token_type_ids, attention_mask)]
        encoded = self.bert(*flat)
        logits = self.classifier(self.dropout(encoded.pooled_output)).view(B, C)  # (B, C)
        out = bert_model.TaskOutput(logits, encoded.sequence_output, encoded.pooled_output)
        if labels is not None:
            out.loss = F.cross_entropy(logits.float(), labels.long())
        return out


@dataclass(frozen=True)
class ChoiceExample:
    id: str
    context: str
    choices: tuple[str, ...]
    label: str  # index of the right choice


@dataclass(frozen=True, eq=False)
class ChoiceFeature:
    example_index: int
    input_ids: tuple[np.ndarray, ...]  # C x (T_c,)
    token_type_ids: tuple[np.ndarray, ...]
    label: int


def featurize_choices(examples, tokenizer: Tokenizer, labels, max_seq_length: int = 128) -> list[ChoiceFeature]:
    """One feature per example: its (context, choice) pairs; the label is the right choice's index."""
    features = []
    for i, ex in enumerate(examples):
        encodings = tokenizer.encode_batch([ex.context] * len(ex.choices), pairs=list(ex.choices),
                                           max_length=max_seq_length, truncation="longest_first")
        features.append(ChoiceFeature(i, tuple(np.asarray(e.ids, dtype=np.int32) for e in encodings),
                                      tuple(np.asarray(e.token_type_ids, dtype=np.int8) for e in encodings),
                                      int(ex.label)))
    return features


def collate_choices(features, pad_id: int) -> dict[str, torch.Tensor]:
    """(B, C, T) inputs: every choice of every feature padded to the batch's longest pair."""
    @dataclass
    class Pair:
        input_ids: np.ndarray
        token_type_ids: np.ndarray

    flat = pad_inputs([Pair(ids, types) for f in features for ids, types in zip(f.input_ids, f.token_type_ids)],
                      pad_id)
    batch = {k: v.view(len(features), CHOICES, -1) for k, v in flat.items()}
    batch["labels"] = torch.tensor([f.label for f in features], dtype=torch.long)
    return batch


def choice_predictions(examples, features, outputs, labels) -> list[str]:
    return [str(int(np.argmax(logits))) for logits in outputs]


def choice_examples(records, fields, labels):
    return [ChoiceExample(str(i), record_text(r, "question", i), tuple(str(c) for c in r["choices"]), "0")
            for i, r in enumerate(records)], []


def choice_answers(run, records, labels):
    return [{"choice": int(np.argmax(logits)), "probabilities": [json_number(p) for p in softmax(logits)]}
            for logits in run.outputs]


def read_sentence_choice(data_dir) -> TaskData:
    """SQuAD v1.1 dev, split by article: each question with four sentences of its paragraph as choices."""
    train, dev = split_squad_by_article(load_squad(data_dir / "dev-v1.1.json"))

    def examples(data, limit):
        out = []
        for article in data["data"]:
            for paragraph in article["paragraphs"]:
                spans = [(m.start(), m.end()) for m in _SENTENCE.finditer(paragraph["context"])]
                for qa in paragraph["qas"]:
                    answer = qa["answers"][0]
                    start, end = answer["answer_start"], answer["answer_start"] + len(answer["text"])
                    right = next((i for i, (a, b) in enumerate(spans) if a <= start and end <= b), None)
                    if right is None or len(spans) < CHOICES:
                        continue  # the answer spans two sentences, or the paragraph has too few
                    first = max(0, min(right - len(out) % CHOICES, len(spans) - CHOICES))  # the right one moves
                    window = spans[first : first + CHOICES]
                    out.append(ChoiceExample(qa["id"], qa["question"],
                                             tuple(paragraph["context"][a:b].strip() for a, b in window),
                                             str(right - first)))
                    if len(out) == limit:
                        return tuple(out)
        return tuple(out)

    return TaskData(examples(train, 8), {"dev": examples(dev, 12)}, tuple(str(i) for i in range(CHOICES)))


@pytest.fixture(scope="module")
def multiple_choice():
    """Register the head, the kind and a task of it; remove them afterwards. This is all a new kind is."""
    bert_model.HEADS["multiple_choice"] = BertForMultipleChoice
    ckpt.HF_ARCHITECTURES["multiple_choice"] = "BertForMultipleChoice"
    register_kind(KindSpec(
        "multiple_choice", head="multiple_choice", head_arguments=lambda labels: {}, num_outputs=len,
        feature_type=ChoiceFeature, collate=collate_choices, feature_length=lambda f: max(map(len, f.input_ids)),
        prediction_record=lambda ex, p: {"prediction": p, "label": ex.label},
        inputs=((Field("question"),), (Field("choices", ("array", "string")),)),
        outputs=(Field("choice", "long"), Field("probabilities", ("array", "double"))),
        input_example={"question": "Where do penguins live?",
                       "choices": ["In the Antarctic.", "In the Sahara.", "On the Moon.", "In Paris."]},
        examples=choice_examples, answers=choice_answers,
        plain=lambda run, records, labels: [a["choice"] for a in choice_answers(run, records, labels)],
        min_labels=2))
    TASKS["squad_sentence_choice"] = TaskSpec(
        name="squad_sentence_choice", kind="multiple_choice", subdir="squad_v1.1", reader=read_sentence_choice,
        text_fields=("question", "choices"), featurize=featurize_choices, postprocess=choice_predictions,
        metric=accuracy_metric, primary_metric="dev/accuracy", max_seq_length=64)
    try:
        yield TASKS["squad_sentence_choice"]
    finally:
        del TASKS["squad_sentence_choice"], KINDS["multiple_choice"]
        del ckpt.HF_ARCHITECTURES["multiple_choice"], bert_model.HEADS["multiple_choice"]


@pytest.fixture(scope="module")
def prepared(multiple_choice, minilm_dir, datasets_dir):
    return prepare(multiple_choice, datasets_dir, Tokenizer.load(minilm_dir), minilm_dir, 64)


# ----------------------------------------------------------------------------- the checks


def test_the_real_data_makes_four_choices_with_the_answer_in_the_labelled_one(prepared, datasets_dir):
    squad = {qa["id"]: qa for a in load_squad(datasets_dir / "squad_v1.1" / "dev-v1.1.json")["data"]
             for p in a["paragraphs"] for qa in p["qas"]}
    dev = prepared.eval_examples["dev"]
    assert len(prepared.train_features) == 8 and len(dev) == 12
    for ex in dev:
        assert len(ex.choices) == CHOICES and squad[ex.id]["answers"][0]["text"] in ex.choices[int(ex.label)]
    assert len({ex.label for ex in dev}) > 1  # the right choice is not always in the same place


def test_batches_lengths_and_the_head_come_from_the_kind_row(multiple_choice, prepared, minilm_dir):
    features = prepared.train_features[:3]
    batch = collate(features, prepared.pad_id)
    longest = max(len(ids) for f in features for ids in f.input_ids)
    assert batch["input_ids"].shape == (3, CHOICES, longest) and batch["labels"].tolist() == [f.label for f in features]
    assert train_lengths(prepared) == [max(map(len, f.input_ids)) for f in prepared.train_features]
    assert feature_length(features[0]) == max(map(len, features[0].input_ids))
    model = task_model(minilm_dir, multiple_choice, prepared.labels, seed=1)
    assert type(model) is BertForMultipleChoice and model.load_report.initialised == ["classifier."]
    assert multiple_choice.num_outputs(prepared.labels) == CHOICES


def test_the_head_matches_transformers_and_round_trips_both_checkpoint_layouts(multiple_choice, prepared, minilm_dir,
                                                                               tmp_path):
    import transformers

    model = task_model(minilm_dir, multiple_choice, prepared.labels, seed=3).eval()
    batch = collate(prepared.eval_features["dev"][:4], prepared.pad_id)
    inputs = {k: batch[k] for k in ("input_ids", "token_type_ids", "attention_mask")}
    with torch.no_grad():
        ours = model(**inputs).logits
        save_pretrained(model, tmp_path / "hf", hf=True)
        theirs = transformers.BertForMultipleChoice.from_pretrained(tmp_path / "hf").eval()(**inputs).logits
        again = from_pretrained(save_pretrained(model, tmp_path / "ours")).eval()(**inputs).logits
    assert ours.shape == (4, CHOICES)
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-4)
    assert torch.equal(ours, again)
    assert from_pretrained(tmp_path / "hf").head == "multiple_choice"


def test_training_evaluation_records_and_inference_serve_the_new_kind(multiple_choice, prepared, minilm_dir, tmp_path):
    model = task_model(minilm_dir, multiple_choice, prepared.labels, seed=1)
    optimizer = adamw(layerwise_groups(model, 0.01, 0.9), lr=5e-5)  # the job's groups: the new head at the top
    schedule = Schedule.of(len(prepared.train_features), 4, 1, 0.5, 1, peak=5e-5)
    before = model.classifier.weight.detach().clone()
    for step, start in enumerate(range(0, 8, 4)):
        loss, _ = train_step(model, optimizer, prepared.train_features[start : start + 4], prepared.pad_id,
                             lr=schedule.lr(step), max_grad_norm=1.0, precision=Precision("fp32", "cpu"),
                             dropout_seed=step, trainable=list(model.parameters()))
        assert np.isfinite(loss)
    assert not torch.equal(before, model.classifier.weight)

    features = prepared.eval_features["dev"]
    outputs = head_outputs(model, features, prepared.pad_id, length_sorted_chunks(features, 8))
    assert outputs[0].shape == (CHOICES,)
    metrics, records = score(multiple_choice, prepared, {"dev": [outputs[i] for i in range(len(features))]})
    predicted = [str(int(np.argmax(outputs[i]))) for i in range(len(features))]
    gold = [ex.label for ex in prepared.eval_examples["dev"]]
    assert metrics["dev/accuracy"] == pytest.approx(accuracy_score(gold, predicted))
    assert records == prediction_records(multiple_choice, "dev", prepared.eval_examples["dev"], predicted)
    assert records[0] == {"split": "dev", "id": prepared.eval_examples["dev"][0].id, "prediction": predicted[0],
                          "label": gold[0]}

    checkpoint = save_pretrained(model, tmp_path / "mc", tokenizer_dir=minilm_dir)
    write_task_file(checkpoint, multiple_choice.name, 64)
    predictor = Predictor(checkpoint)
    rows = [{"question": ex.context, "choices": list(ex.choices)} for ex in prepared.eval_examples["dev"][:5]]
    assert predictor.input_fields == ("question", "choices") and predictor.output_fields == ("choice", "probabilities")
    answers = predictor.predict_records(rows)
    assert [a["choice"] for a in answers] == [int(p) for p in predicted[:5]] == predictor.predict(rows)
    assert all(sum(a["probabilities"]) == pytest.approx(1.0) for a in answers)


def test_mlflow_signature_and_predict_columns_serve_the_new_kind(multiple_choice, prepared):
    from pipelines.models import input_example, model_signature

    signature = json.loads(json.dumps(model_signature(multiple_choice, prepared.labels).to_dict()))
    inputs, outputs = json.loads(signature["inputs"]), json.loads(signature["outputs"])
    assert [(c["name"], c["type"], c["required"]) for c in inputs] == [("question", "string", True),
                                                                        ("choices", "array", True)]
    assert [(c["name"], c["type"]) for c in outputs] == [("choice", "long"), ("probabilities", "array")]
    assert list(input_example(multiple_choice).columns) == ["question", "choices"]

    from pipelines.jobs.predict import PredictConfig, task_columns

    columns = task_columns(PredictConfig(checkpoint="ck", input="in.jsonl", out="out", question_column="q"),
                           multiple_choice)
    row = {"q": "Where do penguins live?", "choices": ["Antarctica", "Sahara"], "id": 7}
    assert columns.item(0, "in.jsonl:1", row) == {"row": 0, "id": "7", "question": row["q"],
                                                  "choices": ["Antarctica", "Sahara"]}
    assert str(columns.schema().field("choices").type) == "list<item: string>"
    with pytest.raises(InputError, match=r"in.jsonl:2: no 'choices' column \(the model reads 'choices' from it\)"):
        columns.item(1, "in.jsonl:2", {"q": "Why?", "choices": []})
