"""Sentence(-pair) features, batching and the post-processing of sequence-level outputs.

Features are unpadded: padding is the collator's business. `pad_inputs` pads one batch to its
longest sequence (dynamic padding), each kind's collator adds its targets (`collate_pairs` here),
and `length_grouped_batches` groups examples of similar length so that little of each batch is
padding. The sentence kinds' rows in `bert.tasks.kinds` take their collator, prediction records
and raw-input adapters from this module.

The fine-tune job runs the model over features in order and hands back one output array per
feature (the head's output for that sequence; padded positions past the feature's length are
allowed and ignored), which the post-processing functions turn into one prediction per example.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from bert.errors import InputError
from bert.tasks.readers import TextExample
from bert.tokenizer import Tokenizer

ENCODE_CHUNK = 8192  # texts per tokenizer call: bounds the memory of full encodings


@dataclass(frozen=True, eq=False)
class PairFeature:
    """`[CLS] A [SEP]` or `[CLS] A [SEP] B [SEP]` for one example.

    `label` is the class id (index in the task's label set) or, for regression, the target value.
    """

    example_index: int
    input_ids: np.ndarray  # (T,) int32
    token_type_ids: np.ndarray  # (T,) int8
    label: int | float


def featurize_pairs(
    examples: Sequence[TextExample], tokenizer: Tokenizer, labels: Sequence[str], max_seq_length: int = 128
) -> list[PairFeature]:
    """Encode examples as BERT inputs, truncating the longer text first to `max_seq_length`.

    `labels` is the task's label set; empty for regression, where the label is the value itself.
    Texts are encoded in chunks of ENCODE_CHUNK, so a large train set (MNLI, QQP) never holds
    more than one chunk of full tokenizer encodings in memory.
    """
    label_id = {label: i for i, label in enumerate(labels)}
    pairs = [ex.text_b for ex in examples]
    if any(text is None for text in pairs) and not all(text is None for text in pairs):
        raise InputError("featurize_pairs: some examples have a second text and some do not")
    features = []
    for start in range(0, len(examples), ENCODE_CHUNK):
        chunk = examples[start : start + ENCODE_CHUNK]
        encodings = tokenizer.encode_batch(
            [ex.text_a for ex in chunk],
            pairs=None if pairs[0] is None else pairs[start : start + ENCODE_CHUNK],
            max_length=max_seq_length,
            truncation="longest_first",
        )
        for i, (ex, enc) in enumerate(zip(chunk, encodings), start=start):
            if label_id:
                if ex.label not in label_id:
                    raise InputError(f"example {ex.id}: label {ex.label!r} is not in the label set {list(labels)}")
                label: int | float = label_id[ex.label]
            else:
                label = float(ex.label)
            ids = np.asarray(enc.ids, dtype=np.int32)
            features.append(PairFeature(i, ids, np.asarray(enc.token_type_ids, dtype=np.int8), label))
    return features


def _check_aligned(examples: Sequence, features: Sequence, outputs: Sequence) -> None:
    if len(outputs) != len(features):
        raise InputError(f"{len(outputs)} outputs for {len(features)} features: pass one output per feature, in order")
    if len(features) != len(examples) or any(f.example_index != i for i, f in enumerate(features)):
        raise InputError("sentence-level features must be one per example, in example order")


def class_predictions(
    examples: Sequence[TextExample],
    features: Sequence[PairFeature],
    outputs: Sequence[np.ndarray],
    labels: Sequence[str],
) -> list[str]:
    """The predicted label of each example: the label of the highest logit, (C,) per feature."""
    _check_aligned(examples, features, outputs)
    return [labels[int(np.argmax(logits))] for logits in outputs]


def regression_predictions(
    examples: Sequence[TextExample],
    features: Sequence[PairFeature],
    outputs: Sequence[np.ndarray],
    labels: Sequence[str],
) -> list[float]:
    """The predicted value of each example: the single model output, () or (1,) per feature."""
    _check_aligned(examples, features, outputs)
    return [float(np.asarray(value).reshape(-1)[0]) for value in outputs]


def pad_inputs(features: Sequence, pad_id: int) -> dict[str, torch.Tensor]:
    """`input_ids`, `token_type_ids`, `attention_mask` (B, T) of features with (T_i,) inputs, padded to the longest."""
    B, T = len(features), max(len(f.input_ids) for f in features)
    input_ids = np.full((B, T), pad_id, dtype=np.int64)
    token_type_ids = np.zeros((B, T), dtype=np.int64)
    attention_mask = np.zeros((B, T), dtype=np.int64)
    for i, f in enumerate(features):
        n = len(f.input_ids)
        input_ids[i, :n] = f.input_ids
        token_type_ids[i, :n] = f.token_type_ids
        attention_mask[i, :n] = 1
    return {
        "input_ids": torch.from_numpy(input_ids),
        "token_type_ids": torch.from_numpy(token_type_ids),
        "attention_mask": torch.from_numpy(attention_mask),
    }


def collate_pairs(features: Sequence[PairFeature], pad_id: int) -> dict[str, torch.Tensor]:
    """The padded inputs and `labels` (B,): class ids (long), or target values (float) for regression."""
    batch = pad_inputs(features, pad_id)
    dtype = torch.float32 if isinstance(features[0].label, float) else torch.long
    batch["labels"] = torch.tensor([f.label for f in features], dtype=dtype)
    return batch


# ----------------------------------------------------------------------------- records and raw input


def class_record(example: TextExample, prediction: str) -> dict[str, Any]:
    return {"prediction": prediction, "label": example.label}


def value_record(example: TextExample, prediction: float) -> dict[str, Any]:
    return {"prediction": float(prediction), "label": float(example.label)}


def text_examples(records: Sequence[Mapping[str, Any]], fields: Sequence[str],
                  labels: Sequence[str]) -> tuple[list[TextExample], list]:
    """Examples of raw `text` records (and `text_pair`, when the task's `fields` name it); the label is a
    placeholder (the first label, or 0.0 for regression)."""
    placeholder: str | float = labels[0] if labels else 0.0
    pair = "text_pair" in fields
    return [TextExample(str(i), record_text(r, "text", i), record_text(r, "text_pair", i) if pair else None,
                        placeholder) for i, r in enumerate(records)], []


def label_answers(run, records: Sequence[Mapping[str, Any]], labels: Sequence[str]) -> list[dict[str, Any]]:
    """{"label", "probabilities": {label: p}} (softmax over the logits, sums to 1) per record."""
    return [{"label": label, "probabilities": dict(zip(labels, map(float, softmax(run.outputs[i]))))}
            for i, label in enumerate(run.predictions)]


def score_answers(run, records: Sequence[Mapping[str, Any]], labels: Sequence[str]) -> list[dict[str, Any]]:
    """{"score"} per record (regression)."""
    return [{"score": float(value)} for value in run.predictions]


def plain_predictions(run, records: Sequence[Mapping[str, Any]], labels: Sequence[str]) -> list[Any]:
    """The task's predictions as they are: a label or a float per record."""
    return list(run.predictions)


def json_number(value: float | None) -> float | None:
    """Finite floats as they are; NaN and +-inf as null (JSON has no such numbers)."""
    if value is None:
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def softmax(logits: np.ndarray) -> np.ndarray:
    """Probabilities over the last axis, computed in float64 (they sum to 1 to rounding)."""
    z = np.asarray(logits, dtype=np.float64)
    z = np.exp(z - z.max(axis=-1, keepdims=True))
    return z / z.sum(axis=-1, keepdims=True)


def record_text(record: Mapping[str, Any], field: str, index: int) -> str:
    """A record's text field as a string; a missing (None, NaN) value names the record and field."""
    value = record.get(field)
    if value is None or (isinstance(value, float) and np.isnan(value)):
        raise InputError(f"input row {index}: missing {field!r}")
    return str(value)


MEGA_BATCH_FACTOR = 4  # batches per mega-batch: see `length_grouped_batches`


def length_grouped_batches(
    lengths: Sequence[int], batch_size: int, seed: int, epoch: int, mega_batch_factor: int = MEGA_BATCH_FACTOR
) -> list[list[int]]:
    """Batches of indices in which sequences have similar lengths; the same for the same seed/epoch.

    Shuffle all indices, cut them into mega-batches of `mega_batch_factor * batch_size`, sort each
    mega-batch by length (longest first), cut it into batches, then shuffle the batch order.
    Every index appears exactly once; only the last batch may be smaller than `batch_size`.
    `mega_batch_factor=1` is a plain shuffle: consecutive slices of a random permutation.

    Each batch is one of `mega_batch_factor` length strata of a random sample, so the factor trades
    padding against how random a batch's content is. The default, 4, removes most of the padding a
    plain shuffle leaves (MRPC: 13.6% of tokens instead of 33.5%) while each batch still spans a
    quarter of the length distribution. A large factor (50, the Hugging Face Trainer's
    `group_by_length`) leaves a few percent of padding but makes every batch nearly one length; with
    it, fine-tuning scored 3.5 points below shuffled batches on a single-sentence GLUE task (issue
    #15). With 4, MRPC (MiniLM, 3 epochs, 3 seeds) pads 13.6% of tokens against a shuffle's 33.5%
    and its dev F1 is 0.8 above the shuffled peer's (benchmarks/finetune_vs_hf.py).
    """
    if batch_size < 1 or mega_batch_factor < 1:
        raise InputError(f"batch_size ({batch_size}) and mega_batch_factor ({mega_batch_factor}) must be >= 1")
    rng = np.random.default_rng([seed, epoch])
    order = rng.permutation(len(lengths))
    lengths_array = np.asarray(lengths)
    mega = batch_size * mega_batch_factor
    batches: list[list[int]] = []
    for start in range(0, len(order), mega):
        chunk = order[start : start + mega]
        chunk = chunk[np.argsort(-lengths_array[chunk], kind="stable")]
        batches.extend(chunk[i : i + batch_size].tolist() for i in range(0, len(chunk), batch_size))
    # Only the very last mega-batch can end in a short batch; keep it last after shuffling.
    full, last = (batches[:-1], batches[-1:]) if batches and len(batches[-1]) < batch_size else (batches, [])
    return [full[i] for i in rng.permutation(len(full))] + last


def padding_fraction(lengths: Sequence[int], batches: Sequence[Sequence[int]], width: int | None = None) -> float:
    """Padded tokens / all tokens when every batch is padded to `width` (default: its longest sequence)."""
    slots = sum((width or max(lengths[i] for i in b)) * len(b) for b in batches)
    return 1.0 - sum(lengths[i] for b in batches for i in b) / slots
