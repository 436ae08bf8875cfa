"""Token-classification (NER) features and the mapping of token predictions back to word tags.

Each word is tokenized on its own (WordPiece splits words at spaces and punctuation anyway,
so this gives the same pieces as tokenizing the sentence). The first piece of a word carries
the word's tag id; its other pieces, [CLS] and [SEP] carry IGNORE_INDEX (-100) and add no loss.

Long sentences: a sentence whose pieces do not fit in `max_seq_length - 2` is cut at word
boundaries into several consecutive windows (extra features, no overlap), so every word is
scored exactly once. A single word with more pieces than a window holds keeps its first
`max_seq_length - 2` pieces (the first piece, which carries the label, always survives).
A word that tokenizes to nothing (e.g. a lone control character) becomes [UNK].
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from bert.errors import InputError
from bert.model import IGNORE_INDEX
from bert.tasks.featurize import pad_inputs, record_text, softmax
from bert.tasks.metrics import conll_chunks
from bert.tasks.readers import TokenExample
from bert.tokenizer import Tokenizer

_WORD = re.compile(r"\w+|[^\w\s]", re.UNICODE)  # words and single punctuation marks, as BERT's basic tokenizer


@dataclass(frozen=True, eq=False)
class TokenFeature:
    """One window of a sentence: `[CLS] the pieces of consecutive words [SEP]`.

    `labels` holds the tag id on each word's first piece and IGNORE_INDEX elsewhere;
    `word_ids` the sentence's word index of every token (-1 for [CLS] and [SEP]).
    """

    example_index: int
    input_ids: np.ndarray  # (T,) int32
    token_type_ids: np.ndarray  # (T,) int8
    labels: np.ndarray  # (T,) int64
    word_ids: np.ndarray  # (T,) int32


def featurize_ner(
    examples: Sequence[TokenExample], tokenizer: Tokenizer, labels: Sequence[str], max_seq_length: int = 128
) -> list[TokenFeature]:
    """Encode sentences word by word into one or more windows of at most `max_seq_length` tokens."""
    budget = max_seq_length - 2
    if budget < 1:
        raise InputError(f"max_seq_length must be at least 3 for [CLS] word [SEP], got {max_seq_length}")
    tag_id = {tag: i for i, tag in enumerate(labels)}
    vocabulary = sorted({word for ex in examples for word in ex.words})
    encodings = tokenizer.encode_batch(vocabulary, add_special_tokens=False) if vocabulary else []
    pieces = {word: (enc.ids or [tokenizer.unk_id])[:budget] for word, enc in zip(vocabulary, encodings)}
    features: list[TokenFeature] = []
    for index, ex in enumerate(examples):
        window: list[int] = []  # word indices of the window being filled
        used = 0
        for w, word in enumerate(ex.words):
            n = len(pieces[word])
            if window and used + n > budget:
                features.append(_window(index, ex, window, pieces, tag_id, tokenizer))
                window, used = [], 0
            window.append(w)
            used += n
        features.append(_window(index, ex, window, pieces, tag_id, tokenizer))
    return features


def _window(
    example_index: int,
    ex: TokenExample,
    words: list[int],
    pieces: dict[str, list[int]],
    tag_id: dict[str, int],
    tokenizer: Tokenizer,
) -> TokenFeature:
    input_ids = [tokenizer.cls_id]
    labels = [IGNORE_INDEX]
    word_ids = [-1]
    for w in words:
        word_pieces = pieces[ex.words[w]]
        tag = ex.tags[w]
        if tag not in tag_id:
            raise InputError(f"sentence {ex.id}: tag {tag!r} is not in the label set {list(tag_id)}")
        input_ids.extend(word_pieces)
        labels.extend([tag_id[tag]] + [IGNORE_INDEX] * (len(word_pieces) - 1))
        word_ids.extend([w] * len(word_pieces))
    input_ids.append(tokenizer.sep_id)
    labels.append(IGNORE_INDEX)
    word_ids.append(-1)
    return TokenFeature(
        example_index,
        np.asarray(input_ids, dtype=np.int32),
        np.zeros(len(input_ids), dtype=np.int8),
        np.asarray(labels, dtype=np.int64),
        np.asarray(word_ids, dtype=np.int32),
    )


def word_predictions(
    examples: Sequence[TokenExample],
    features: Sequence[TokenFeature],
    outputs: Sequence[np.ndarray],
    labels: Sequence[str],
) -> list[list[str]]:
    """Per-word tags for every sentence: the arg-max tag of each word's first piece.

    `outputs[i]` holds the logits (T', C) of `features[i]`, T' >= its length (padding ignored).
    """
    if len(outputs) != len(features):
        raise InputError(f"{len(outputs)} outputs for {len(features)} features: pass one output per feature, in order")
    tags: list[list[str | None]] = [[None] * len(ex.words) for ex in examples]
    for feature, logits in zip(features, outputs):
        word_ids = feature.word_ids
        first_piece = (word_ids >= 0) & np.concatenate([[True], word_ids[1:] != word_ids[:-1]])
        positions = np.flatnonzero(first_piece)
        predicted = np.argmax(np.asarray(logits)[positions], axis=-1)
        sentence = tags[feature.example_index]
        for w, label in zip(word_ids[positions], predicted):
            sentence[w] = labels[int(label)]
    for ex, sentence in zip(examples, tags):
        if None in sentence:
            raise InputError(f"sentence {ex.id}: no feature covers word {sentence.index(None)}")
    return tags


# ----------------------------------------------------------------------------- batches, records and raw input


def collate_tokens(features: Sequence[TokenFeature], pad_id: int) -> dict[str, torch.Tensor]:
    """The padded inputs and `labels` (B, T): tag ids on first pieces, IGNORE_INDEX elsewhere and on padding."""
    batch = pad_inputs(features, pad_id)
    labels = np.full(tuple(batch["input_ids"].shape), IGNORE_INDEX, dtype=np.int64)
    for i, f in enumerate(features):
        labels[i, : len(f.labels)] = f.labels
    batch["labels"] = torch.from_numpy(labels)
    return batch


def tags_record(example: TokenExample, prediction: Sequence[str]) -> dict[str, Any]:
    return {"prediction": list(prediction), "label": list(example.tags)}


def words_with_offsets(text: str) -> tuple[list[str], list[tuple[int, int]]]:
    """Split raw text into CoNLL-style words (punctuation separate) with their character spans."""
    matches = list(_WORD.finditer(text))
    return [m.group() for m in matches], [(m.start(), m.end()) for m in matches]


def word_examples(records: Sequence[Mapping[str, Any]], fields: Sequence[str],
                  labels: Sequence[str]) -> tuple[list[TokenExample], list]:
    """Examples of records with `tokens` (a list of words) or `text` (split into words and punctuation), and
    each record's word character spans (None where it gave words)."""
    examples, offsets = [], []
    for i, r in enumerate(records):
        tokens = r.get("tokens")
        if tokens is not None and not isinstance(tokens, str) and len(tokens) > 0:
            words, spans = [str(t) for t in tokens], None
        else:
            words, spans = words_with_offsets(record_text(r, "text", i))
        offsets.append(spans)
        examples.append(TokenExample(str(i), tuple(words) or ("[UNK]",), ("O",) * max(len(words), 1)))
    return examples, offsets


def entity_answers(run, records: Sequence[Mapping[str, Any]], labels: Sequence[str]) -> list[dict[str, Any]]:
    """{"entities": [{"type", "start", "end", "text", "score"}]} per record; `score` is the mean probability of
    the entity's predicted word tags; start/end (end exclusive) are character offsets into `text`, or word
    indices when the record gave `tokens`."""
    confidence = [[0.0] * len(ex.words) for ex in run.examples]
    for feature, logits in zip(run.features, run.outputs):
        word_ids = feature.word_ids
        first_piece = (word_ids >= 0) & np.concatenate([[True], word_ids[1:] != word_ids[:-1]])
        positions = np.flatnonzero(first_piece)
        probabilities = softmax(np.asarray(logits)[positions])
        for w, p in zip(word_ids[positions], probabilities.max(axis=-1)):
            confidence[feature.example_index][int(w)] = float(p)
    return [{"entities": _entities(ex, tags, spans, r, conf)} for ex, tags, spans, r, conf in
            zip(run.examples, run.predictions, run.extras, records, confidence)]


def plain_entities(run, records: Sequence[Mapping[str, Any]], labels: Sequence[str]) -> list[list[dict[str, Any]]]:
    """Per record its entities [{"type", "start", "end", "text"}] (`entity_answers` without scores)."""
    return [[{k: e[k] for k in ("type", "start", "end", "text")} for e in answer["entities"]]
            for answer in entity_answers(run, records, labels)]


def _entities(example: TokenExample, tags: Sequence[str], spans, record: Mapping[str, Any],
              confidence: Sequence[float]) -> list[dict[str, Any]]:
    entities = []
    for kind, first, last in conll_chunks(list(tags)):
        score = float(np.mean(confidence[first : last + 1]))
        if spans is None:  # word indices into the given tokens
            entities.append({"type": kind, "start": first, "end": last + 1,
                             "text": " ".join(example.words[first : last + 1]), "score": score})
        else:  # character offsets into the given text
            start, end = spans[first][0], spans[last][1]
            entities.append({"type": kind, "start": start, "end": end, "text": str(record["text"])[start:end],
                             "score": score})
    return entities
