"""Readers for fine-tuning data: GLUE-style TSV, CoNLL column files, SQuAD v1.1 / v2.0 JSON.

Each reader turns files into frozen example records with a stable `id`, and each task reader
returns a `TaskData` (train examples, named eval splits, label set). Rules shared by all:

* Labels come from the files, never from a per-task list: the label set is the sorted set of
  train labels, and an eval label that train never showed is an error naming file, line, label
  and the known labels.
* Bad input raises `InputError` naming the file and line (or the SQuAD question id) and saying
  what was expected: missing file, missing column, ragged row, empty split, malformed tag.
"""

from __future__ import annotations

import csv
import itertools
import json
import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from bert.errors import InputError

# ----------------------------------------------------------------------------- examples


@dataclass(frozen=True)
class TextExample:
    """One sentence or sentence pair with its label (a label string, or a float for regression)."""

    id: str
    text_a: str
    text_b: str | None
    label: str | float


@dataclass(frozen=True)
class TokenExample:
    """One sentence of a CoNLL file: its words and one IOB2 tag per word."""

    id: str
    words: tuple[str, ...]
    tags: tuple[str, ...]


@dataclass(frozen=True)
class SquadAnswer:
    """An answer text and the character offset where it starts in the context."""

    text: str
    start: int


@dataclass(frozen=True)
class SquadExample:
    """One SQuAD question on its context paragraph.

    `answers` is empty exactly when `is_impossible` (SQuAD v2.0); `plausible_answers` are the
    v2.0 annotators' guesses for impossible questions (kept for analysis, never trained on).
    """

    id: str
    title: str
    context: str
    question: str
    answers: tuple[SquadAnswer, ...]
    is_impossible: bool = False
    plausible_answers: tuple[SquadAnswer, ...] = ()


Example = TextExample | TokenExample | SquadExample


@dataclass(frozen=True)
class TaskData:
    """What a task reader returns.

    `evals` maps an eval split name (the file stem: "dev", "dev_matched", "valid", ...) to its
    examples in file order. `labels` is the sorted label set of the train file (empty for
    regression and span tasks); a label's index in it is the class id. `skipped` counts the
    examples a reader dropped per split, for the job to report (SQuAD answers whose text is
    not at their stated offset).
    """

    train: tuple[Example, ...]
    evals: Mapping[str, tuple[Example, ...]]
    labels: tuple[str, ...] = ()
    skipped: Mapping[str, int] = field(default_factory=dict)


def _require_file(path: Path) -> Path:
    if not path.is_file():
        raise InputError(f"{path}: file not found")
    return path


def _check_unique_id(path: str | Path, where: str, example_id: str, seen: dict[str, str]) -> None:
    if example_id in seen:
        raise InputError(f"{path}: {where}: duplicate example id {example_id!r} (first seen at {seen[example_id]})")
    seen[example_id] = where


# ----------------------------------------------------------------------------- TSV (GLUE)

Column = str | int


@dataclass(frozen=True)
class TsvColumns:
    """Where a TSV file keeps its fields: each a header name, or a 0-based column index.

    `id` is optional: without it an example's id is its data-row index in the file ("0", "1",
    ...). A file with `header=False` (CoLA) can only be addressed by index.
    """

    text_a: Column
    label: Column
    text_b: Column | None = None
    id: Column | None = None
    header: bool = True

    def __post_init__(self) -> None:
        for name in ("text_a", "label", "text_b", "id"):
            value = getattr(self, name)
            if value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, (str, int)):
                raise InputError(f"TsvColumns.{name} must be a header name or a column index, got {value!r}")
            if isinstance(value, int) and value < 0:
                raise InputError(f"TsvColumns.{name} must be a non-negative column index, got {value}")
            if isinstance(value, str) and not self.header:
                raise InputError(
                    f"TsvColumns.{name} is the header name {value!r}, but header=False: use a column index"
                )


LabelKind = Literal["classification", "regression"]


def _tsv_rows(path: Path) -> Iterator[tuple[int, list[str]]]:
    """Yield (1-based line number, fields) for every non-blank line of a TSV file.

    Quoting is off (csv.QUOTE_NONE): GLUE text contains literal `"` characters that a quoting
    reader would swallow, merging rows. A UTF-8 byte-order mark (MRPC) is dropped.
    """
    with open(_require_file(path), encoding="utf-8-sig", newline="") as f:
        reader = csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE)
        for row in reader:
            if row:
                yield reader.line_num, row


def _column_index(path: Path, header: Sequence[str] | None, column: Column, role: str, width: int) -> int:
    if isinstance(column, int):
        if column >= width:
            raise InputError(
                f"{path}: column {column} ({role}) does not exist: the file has {width} columns (0-based indices)"
            )
        return column
    assert header is not None  # TsvColumns rejects names when header=False
    if column not in header:
        raise InputError(f"{path}: no column {column!r} ({role}) in the header {list(header)}")
    return header.index(column)


def _parse_label(path: Path, line: int, raw: str, kind: LabelKind, known_labels: Sequence[str] | None) -> str | float:
    if raw == "":
        raise InputError(f"{path}:{line}: empty label")
    if kind == "regression":
        try:
            return float(raw)
        except ValueError:
            raise InputError(f"{path}:{line}: label {raw!r} is not a number (regression task)") from None
    if known_labels is not None and raw not in known_labels:
        raise InputError(
            f"{path}:{line}: label {raw!r} does not occur in the train file; known labels: {list(known_labels)}"
        )
    return raw


def tsv_labels(path: str | Path, columns: TsvColumns) -> list[tuple[int, str]]:
    """(1-based line, raw label) of every data row of a TSV file: what label checks need, read cheaply."""
    path = Path(path)
    rows = _tsv_rows(path)
    header = [name.strip() for name in next(rows, (0, []))[1]] if columns.header else None
    found = []
    index: int | None = None
    for line, row in rows:
        if index is None:
            index = _column_index(path, header, columns.label, "label", len(header) if header is not None else len(row))
        if index < len(row):
            found.append((line, row[index]))
    return found


def read_tsv(
    path: str | Path,
    columns: TsvColumns,
    kind: LabelKind = "classification",
    known_labels: Sequence[str] | None = None,
) -> tuple[TextExample, ...]:
    """Read a labelled TSV file into examples.

    Every row must have as many fields as the header (or, without a header, as the first row).
    For "classification" the label is kept as the file's string; with `known_labels` (the
    train label set) an unseen label is an error. For "regression" the label must parse as a
    float. An empty label, a duplicate id and a file with no data rows are errors.
    """
    path = Path(path)
    rows = _tsv_rows(path)
    header: list[str] | None = None
    if columns.header:
        first_line = next(rows, None)
        if first_line is None:
            raise InputError(f"{path}: empty file, expected a header line")
        header = [name.strip() for name in first_line[1]]
    first = next(rows, None)
    if first is None:
        raise InputError(f"{path}: no examples (the file has no data rows)")
    width = len(header) if header is not None else len(first[1])
    text_a = _column_index(path, header, columns.text_a, "text_a", width)
    label = _column_index(path, header, columns.label, "label", width)
    text_b = None if columns.text_b is None else _column_index(path, header, columns.text_b, "text_b", width)
    id_column = None if columns.id is None else _column_index(path, header, columns.id, "id", width)
    examples: list[TextExample] = []
    seen: dict[str, str] = {}
    for line, row in itertools.chain([first], rows):
        if len(row) != width:
            expected = "as in the header" if header is not None else "as in the first row"
            raise InputError(f"{path}:{line}: expected {width} tab-separated fields ({expected}), found {len(row)}")
        example_id = row[id_column] if id_column is not None else str(len(examples))
        _check_unique_id(path, f"line {line}", example_id, seen)
        examples.append(
            TextExample(
                example_id,
                row[text_a],
                None if text_b is None else row[text_b],
                _parse_label(path, line, row[label], kind, known_labels),
            )
        )
    return tuple(examples)


def read_tsv_task(
    data_dir: str | Path,
    columns: TsvColumns,
    kind: LabelKind = "classification",
    train_file: str = "train.tsv",
    eval_files: Sequence[str] = ("dev.tsv",),
) -> TaskData:
    """Read a GLUE-layout task directory: the train file, then each eval file (split = file stem)."""
    data_dir = Path(data_dir)
    train = read_tsv(data_dir / train_file, columns, kind)
    labels = tuple(sorted({ex.label for ex in train})) if kind == "classification" else ()
    evals = {
        Path(name).stem: read_tsv(data_dir / name, columns, kind, labels if kind == "classification" else None)
        for name in eval_files
    }
    return TaskData(train=train, evals=evals, labels=labels)


# ----------------------------------------------------------------------------- CoNLL

_IOB_TAG = re.compile(r"^(O|[BI]-\S+)$")


def iob1_to_iob2(tags: Sequence[str]) -> tuple[str, ...]:
    """Rewrite IOB1 tags as IOB2: an I-X that starts a chunk (after O or another type) becomes B-X.

    IOB2 input comes back unchanged, so readers apply this to every file whatever its scheme.
    Chunk starts follow the conlleval rules, so scoring either form gives the same chunks.
    """
    out: list[str] = []
    previous = "O"
    for tag in tags:
        if tag.startswith("I-") and (previous == "O" or previous[2:] != tag[2:]):
            tag = "B-" + tag[2:]
        out.append(tag)
        previous = tag
    return tuple(out)


def read_conll(path: str | Path, known_labels: Sequence[str] | None = None) -> tuple[TokenExample, ...]:
    """Read a CoNLL column file: word in the first column, NER tag in the last.

    Sentences are separated by blank lines; `-DOCSTART-` lines are dropped. Columns are split on
    tabs if the first line has one, else on single spaces. Every line must have the first
    line's field count and a non-empty IOB tag (O, B-TYPE, I-TYPE). Tags are converted from
    IOB1 to IOB2. Example ids are sentence indices in the file ("0", "1", ...).
    """
    path = Path(path)
    examples: list[TokenExample] = []
    words: list[str] = []
    tags: list[str] = []
    tag_lines: list[int] = []
    separator: str | None = None
    width = 0

    def close_sentence() -> None:
        if not words:
            return
        converted = iob1_to_iob2(tags)
        if known_labels is not None:
            for tag, line in zip(converted, tag_lines):
                if tag not in known_labels:
                    raise InputError(
                        f"{path}:{line}: tag {tag!r} does not occur in the train file; known labels: {list(known_labels)}"
                    )
        examples.append(TokenExample(str(len(examples)), tuple(words), converted))
        words.clear()
        tags.clear()
        tag_lines.clear()

    with open(_require_file(path), encoding="utf-8") as f:
        for line_no, raw in enumerate(f, start=1):
            line = raw.rstrip("\r\n")
            if not line.strip():
                close_sentence()
                continue
            if separator is None:
                separator = "\t" if "\t" in line else " "
                width = len(line.split(separator))
                if width < 2:
                    raise InputError(f"{path}:{line_no}: expected at least 2 columns (word ... tag), found 1")
            fields = line.split(separator)
            if fields[0] == "-DOCSTART-":
                close_sentence()
                continue
            if len(fields) != width:
                raise InputError(
                    f"{path}:{line_no}: expected {width} {'tab' if separator == chr(9) else 'space'}-separated "
                    f"fields (as on the first line), found {len(fields)}"
                )
            tag = fields[-1]
            if not tag:
                raise InputError(f"{path}:{line_no}: empty tag in the last column")
            if not _IOB_TAG.match(tag):
                raise InputError(f"{path}:{line_no}: tag {tag!r} is not an IOB tag (expected O, B-TYPE or I-TYPE)")
            words.append(fields[0])
            tags.append(tag)
            tag_lines.append(line_no)
        close_sentence()
    if not examples:
        raise InputError(f"{path}: no sentences")
    return tuple(examples)


def conll_tags(path: str | Path) -> list[tuple[int, str]]:
    """(1-based line, tag in the last column) of every word line of a CoNLL file, for label checks."""
    found = []
    separator = None
    with open(_require_file(Path(path)), encoding="utf-8") as f:
        for line_no, raw in enumerate(f, start=1):
            line = raw.rstrip("\r\n")
            if not line.strip():
                continue
            separator = separator or ("\t" if "\t" in line else " ")
            fields = line.split(separator)
            if fields[0] != "-DOCSTART-" and len(fields) > 1:
                found.append((line_no, fields[-1]))
    return found


def read_conll_task(
    data_dir: str | Path,
    train_file: str = "train.txt",
    eval_files: Sequence[str] = ("valid.txt", "test.txt"),
) -> TaskData:
    """Read a CoNLL NER directory; the tag set is the sorted set of (IOB2) train tags."""
    data_dir = Path(data_dir)
    train = read_conll(data_dir / train_file)
    labels = tuple(sorted({tag for ex in train for tag in ex.tags}))
    evals = {Path(name).stem: read_conll(data_dir / name, labels) for name in eval_files}
    return TaskData(train=train, evals=evals, labels=labels)


# ----------------------------------------------------------------------------- SQuAD


def load_squad(path: str | Path) -> dict[str, Any]:
    """Load a SQuAD JSON file (v1.1 or v2.0): an object with a "data" list of articles."""
    path = Path(path)
    try:
        with open(_require_file(path), encoding="utf-8") as f:
            data = json.load(f)
    except json.JSONDecodeError as e:
        raise InputError(f"{path}:{e.lineno}: not valid JSON: {e.msg}") from None
    if not isinstance(data, dict) or not isinstance(data.get("data"), list):
        raise InputError(f'{path}: expected a SQuAD JSON object with a "data" list of articles')
    return data


def split_squad_by_article(data: Mapping[str, Any], n_train_articles: int = 24) -> tuple[dict, dict]:
    """Split SQuAD JSON into (first `n_train_articles` articles, the rest), both in SQuAD layout.

    The documented QA split of this project: SQuAD v1.1 train is not available, so the 48 dev
    articles become 24 for training and 24 for evaluation. Articles never straddle the split,
    so no context paragraph is seen in both halves.
    """
    articles = data["data"]
    if not 0 < n_train_articles < len(articles):
        raise InputError(
            f"cannot put {n_train_articles} of the {len(articles)} SQuAD articles in train "
            "and keep at least one for eval"
        )
    head = {key: value for key, value in data.items() if key != "data"}
    return {**head, "data": articles[:n_train_articles]}, {**head, "data": articles[n_train_articles:]}


def _squad_answers(source: str, qid: str, raw: Any, key: str) -> tuple[SquadAnswer, ...]:
    if not isinstance(raw, list):
        raise InputError(f"{source}: question {qid}: {key!r} must be a list")
    answers = []
    for answer in raw:
        if not isinstance(answer, dict) or "text" not in answer or "answer_start" not in answer:
            raise InputError(f'{source}: question {qid}: each of {key!r} needs "text" and "answer_start"')
        answers.append(SquadAnswer(str(answer["text"]), int(answer["answer_start"])))
    return tuple(answers)


def squad_examples(data: Mapping[str, Any], source: str) -> tuple[tuple[SquadExample, ...], int]:
    """Turn SQuAD JSON into examples; return (examples, number skipped).

    Every answer must sit at its stated offset: `context[start:start + len(text)] == text`.
    A question with an answer that does not is skipped and counted (the job reports the count),
    since training on it would teach the wrong span. `plausible_answers` are kept unchecked.
    Structural faults (missing keys, duplicate ids, an answerable question with no answer)
    are errors naming `source` (the file) and the question id.
    """
    examples: list[SquadExample] = []
    seen: dict[str, str] = {}
    skipped = 0
    first_skip = ""
    for a, article in enumerate(data["data"]):
        title = str(article.get("title", ""))
        for p, paragraph in enumerate(article.get("paragraphs", ())):
            where = f"article {a} paragraph {p}"
            if "context" not in paragraph or "qas" not in paragraph:
                raise InputError(f'{source}: {where}: expected "context" and "qas"')
            context = paragraph["context"]
            for qa in paragraph["qas"]:
                if "id" not in qa or "question" not in qa:
                    raise InputError(f'{source}: {where}: every question needs "id" and "question"')
                qid = str(qa["id"])
                _check_unique_id(source, where, qid, seen)
                impossible = bool(qa.get("is_impossible", False))
                answers = _squad_answers(source, qid, qa.get("answers", []), "answers")
                plausible = _squad_answers(source, qid, qa.get("plausible_answers", []), "plausible_answers")
                if impossible and answers:
                    raise InputError(f"{source}: question {qid}: is_impossible but has answers")
                if not impossible and not answers:
                    raise InputError(f"{source}: question {qid}: no answers and not marked is_impossible")
                misplaced = next((a for a in answers if context[a.start : a.start + len(a.text)] != a.text), None)
                if misplaced is not None:
                    skipped += 1
                    first_skip = first_skip or _misplaced_answer(qid, misplaced, context)
                    continue
                examples.append(SquadExample(qid, title, context, qa["question"], answers, impossible, plausible))
    if not examples and skipped:
        raise InputError(f"{source}: no usable questions: each of the {skipped} question(s) has an answer whose text "
                         f"is not at its answer_start in the context (a character offset into the context), e.g. "
                         f"{first_skip}")
    if not examples:
        raise InputError(f"{source}: no questions: {len(data['data'])} article(s) hold no paragraph with a question "
                         '(expected "data": [{"paragraphs": [{"context": ..., "qas": [...]}]}])')
    return tuple(examples), skipped


def _misplaced_answer(qid: str, answer: SquadAnswer, context: str) -> str:
    found = context.find(answer.text)
    there = context[answer.start : answer.start + len(answer.text)]
    hint = f"; the text is at offset {found}" if found >= 0 else "; the context does not contain it"
    return f"question {qid}: answer {answer.text!r} at answer_start {answer.start}, where the context reads {there!r}{hint}"


def read_squad_task(data_dir: str | Path, train_file: str, eval_file: str) -> TaskData:
    """Read SQuAD train and eval JSON files (v1.1 or v2.0) from a directory; the eval split is "dev"."""
    data_dir = Path(data_dir)
    train, train_skipped = squad_examples(load_squad(data_dir / train_file), str(data_dir / train_file))
    evals, eval_skipped = squad_examples(load_squad(data_dir / eval_file), str(data_dir / eval_file))
    return TaskData(train=train, evals={"dev": evals}, skipped={"train": train_skipped, "dev": eval_skipped})


def read_squad_dev_split_task(
    data_dir: str | Path, dev_file: str = "dev-v1.1.json", n_train_articles: int = 24
) -> TaskData:
    """Read the dev-file-only SQuAD setup: `split_squad_by_article`, eval split named "dev"."""
    path = Path(data_dir) / dev_file
    train_json, eval_json = split_squad_by_article(load_squad(path), n_train_articles)
    train, train_skipped = squad_examples(train_json, f"{path} (first {n_train_articles} articles)")
    evals, eval_skipped = squad_examples(eval_json, f"{path} (articles after the first {n_train_articles})")
    return TaskData(train=train, evals={"dev": evals}, skipped={"train": train_skipped, "dev": eval_skipped})
