"""Label sanity: every label of a task's files lies in the task's label set, checked before any training.

A stray label (a `2` or `positive` in a binary GLUE file) would otherwise widen the head and train a
model that is silently wrong. The label set of a task is:

* **known** for the published tasks: GLUE's nine (e.g. SST-2 `0 1`, MNLI `contradiction entailment
  neutral`, STS-B scores in [0, 5]) and CoNLL-2003's nine IOB2 tags. Any other label in the train or
  an eval file is refused; there is no way around it, since the benchmark defines the set;
* **inferred** for your own TSV task (`tsv:...`): the labels of its eval files. A train label that no
  eval file holds can never be scored and is almost always a typo, so it is refused too, unless
  `--allow-new-labels` says the class is meant (a rare class missing from a small dev file). An eval
  label that train never shows is refused by the reader whatever the flag (`bert/tasks/readers.py`).

Refusals name the file, the lines (the first few) and the offending values, with the label set.
SQuAD has no label set: its answers are checked against their contexts by the reader.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path

from bert.errors import InputError
from bert.tasks.readers import conll_tags, read_conll_task, read_tsv_task, tsv_labels
from bert.tasks.table import TSV_PREFIX, TaskSpec

_BINARY = ("0", "1")
_ENTAILMENT = ("entailment", "not_entailment")
CONLL_2003_TAGS = ("O", "B-PER", "I-PER", "B-LOC", "I-LOC", "B-ORG", "I-ORG", "B-MISC", "I-MISC")

# The label set each published task defines (GLUE, from its data release; CoNLL-2003, IOB1 and IOB2 tags).
KNOWN_LABELS: dict[str, tuple[str, ...]] = {
    "cola": _BINARY, "sst2": _BINARY, "mrpc": _BINARY, "qqp": _BINARY, "wnli": _BINARY,
    "mnli": ("contradiction", "entailment", "neutral"), "qnli": _ENTAILMENT, "rte": _ENTAILMENT,
    "conll2003": CONLL_2003_TAGS,
}
KNOWN_RANGES: dict[str, tuple[float, float]] = {"stsb": (0.0, 5.0)}  # STS-B similarity scores
SHOWN_LINES = 5


def check_task_labels(spec: TaskSpec, task_dir: str | Path, allow_new_labels: bool = False) -> None:
    """Refuse labels outside `spec`'s label set in the files of `task_dir` (see the module docstring)."""
    task_dir = Path(task_dir)
    reader = getattr(spec.reader, "func", spec.reader)  # the label files are the reader's: CoNLL or TSV
    if reader is read_conll_task:
        known = KNOWN_LABELS.get(spec.name)
        if known is not None:
            for name in ("train.txt", "valid.txt", "test.txt"):
                if (task_dir / name).is_file():
                    _refuse_outside(task_dir / name, conll_tags(task_dir / name), known, f"{spec.name}'s tag set")
        return
    if reader is not read_tsv_task:
        return  # SQuAD: no label set (the reader checks answers against contexts)
    tsv = spec.reader.keywords  # partial(read_tsv_task, columns=..., kind=..., train_file=..., eval_files=...)
    columns, train_file, eval_files = tsv["columns"], tsv["train_file"], tsv["eval_files"]
    files = [task_dir / train_file] + [task_dir / name for name in eval_files]
    if any(not f.is_file() for f in files):
        return  # the reader names the missing file
    if tsv["kind"] == "regression":
        if spec.name in KNOWN_RANGES:
            for path in files:
                _refuse_out_of_range(path, tsv_labels(path, columns), *KNOWN_RANGES[spec.name], spec.name)
        return
    known = KNOWN_LABELS.get(spec.name)
    if known is not None:
        for path in files:
            _refuse_outside(path, tsv_labels(path, columns), known, f"{spec.name}'s label set")
        return
    if spec.name.startswith(TSV_PREFIX) and not allow_new_labels:
        inferred = sorted({label for path in files[1:] for _, label in tsv_labels(path, columns)})
        where = " + ".join(eval_files)
        _refuse_outside(files[0], tsv_labels(files[0], columns), inferred,
                        f"the label set of the eval file(s) {where}",
                        "; a train label no eval file holds cannot be scored: fix the file, or pass "
                        "--allow-new-labels if the class is meant")


def _refuse_outside(path: Path, rows: Iterable[tuple[int, str]], allowed: Sequence[str], what: str,
                    hint: str = "") -> None:
    allowed_set = set(allowed)
    stray: dict[str, list[int]] = {}
    for line, label in rows:
        if label not in allowed_set:
            stray.setdefault(label, []).append(line)
    if stray:
        raise InputError(f"{path}: {sum(map(len, stray.values()))} row(s) with labels outside {what} "
                         f"{list(allowed)}: {_listing(stray)}{hint}")


def _refuse_out_of_range(path: Path, rows: Iterable[tuple[int, str]], low: float, high: float, task: str) -> None:
    stray: dict[str, list[int]] = {}
    for line, label in rows:
        try:
            inside = low <= float(label) <= high
        except ValueError:
            inside = False
        if not inside:
            stray.setdefault(label, []).append(line)
    if stray:
        raise InputError(f"{path}: {sum(map(len, stray.values()))} row(s) with scores outside {task}'s range "
                         f"[{low:g}, {high:g}]: {_listing(stray)}")


def _listing(stray: dict[str, list[int]]) -> str:
    """"'2' (lines 5, 9), 'positive' (line 12)": each value with its first lines."""
    parts = []
    for label, lines in stray.items():
        shown = ", ".join(map(str, lines[:SHOWN_LINES])) + (f", ... ({len(lines)} in all)" if len(lines) > SHOWN_LINES
                                                           else "")
        parts.append(f"{label!r} (line{'s' if len(lines) > 1 else ''} {shown})")
    return ", ".join(parts)
