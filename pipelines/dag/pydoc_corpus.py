"""The `pydoc_corpus` stage: English text every Python installation ships, and a labelled task from it.

Corpus: the docstrings of ~110 pure-Python stdlib modules and the language-reference topics of
`pydoc_data` (about 1.1 MB), as JSONL documents: `corpus/` for pretraining, `heldout/` (the
docstrings of the dev modules, never pretrained on) for held-out MLM accuracy. Task: the first paragraph of a public object's
docstring, labelled with what the object is (class, exception, function, method, read off the
object by `inspect`), in the SST-2 TSV layout so the `sst2` row of the task table reads it; split
into train/dev by module, so dev modules are unseen in training. The quickstart pipeline runs on it
offline on any machine.
"""

from __future__ import annotations

import hashlib
import json
import platform
import re
from dataclasses import dataclass
from typing import Any

from bert.errors import InputError
from pipelines.dag.graph import StageContext

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
    for name in ("corpus", "heldout", "task"):
        (ctx.out / name).mkdir()
    documents = {"corpus": 0, "heldout": 0}
    examples: dict[str, list[tuple[str, str]]] = {"train": [], "dev": []}
    labels_of_text: dict[str, set[str]] = {}
    with (open(ctx.out / "corpus" / "docs.jsonl", "w", encoding="utf-8") as corpus,
          open(ctx.out / "heldout" / "docs.jsonl", "w", encoding="utf-8") as heldout):
        for module in config.modules:
            split = "dev" if _unit_hash(module) < config.dev_fraction else "train"
            for name, kind, doc in _documented_objects(module):
                paragraphs = _paragraphs(doc)
                if not paragraphs:
                    continue
                # the dev modules' text is held out from pretraining: held-out MLM is measured on it
                (heldout if split == "dev" else corpus).write(json.dumps({"id": name, "text": "\n".join(paragraphs)}) + "\n")
                documents["heldout" if split == "dev" else "corpus"] += 1
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
                    documents["corpus"] += 1
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
    ctx.log(f"{documents['corpus']} documents ({documents['heldout']} held out); task examples train "
            f"{counts['train']}, dev {counts['dev']}")
    return {"documents": documents["corpus"], "heldout_documents": documents["heldout"], "task_examples": counts,
            "python": platform.python_version()}


def _unit_hash(text: str) -> float:
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "little") / 2**64
