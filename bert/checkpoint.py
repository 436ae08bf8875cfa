"""Checkpoint directories: ours, and the Hugging Face BERT layout, in both directions.

Our checkpoint dir (DESIGN.md, "Checkpoint dir"):
    config.json          {"bertflow": {format_version, head, labels}, "model": BertConfig fields}
    model.safetensors    parameters under the original names (`bert.encoder.layer.0...`)
    tokenizer files      when a tokenizer travels with the model

A Hugging Face dir has a `config.json` with `model_type: "bert"` (or the original
`bert_config.json` fields) and `model.safetensors`, a sharded safetensors index, or
`pytorch_model.bin`. Pickled weights are loaded with `torch.load(weights_only=True)`, which
refuses anything that is not tensors and plain containers: nothing in the file is executed.

Because our parameter names are the original ones, import and export copy tensors key for key;
what differs is the config file, legacy names (`gamma`/`beta`), the tied decoder copies that
some checkpoints carry, and the `bert.` prefix that encoder-only checkpoints omit.
"""

from __future__ import annotations

import json
import logging
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import Tensor, nn

from bert.config import BertConfig
from bert.errors import CheckpointError
from bert.fsutil import atomic_directory
from bert.model import HEADS

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
HF_SHARDED_INDEX = "model.safetensors.index.json"
HF_PICKLE_FILE = "pytorch_model.bin"

# our head name -> Hugging Face architecture class, and back
HF_ARCHITECTURES: dict[str | None, str] = {
    None: "BertModel",
    "pretraining": "BertForPreTraining",
    "sequence_classification": "BertForSequenceClassification",
    "token_classification": "BertForTokenClassification",
    "question_answering": "BertForQuestionAnswering",
}
HF_ARCHITECTURE_ALIASES = {"BertForMaskedLM": "pretraining"}  # MLM weights, NSP initialised
# heads with one output per named label (saved as `labels` / HF `id2label`); they are built with num_labels
LABELLED_HEADS = ("sequence_classification", "token_classification")

# parameter groups that belong to one head; a group is loaded whole or initialised whole
HEAD_GROUPS = ("cls.predictions.", "cls.seq_relationship.", "classifier.", "qa_outputs.")
OPTIONAL_GROUPS = ("bert.pooler.",)  # present in some encoders, absent in token-level heads
# Files of a tokenizer dir (bert/tokenizer.py) and of a Hugging Face BERT tokenizer.
TOKENIZER_FILES = ("vocab.txt", "spm.model", "tokenizer_config.json", "tokenizer.json", "special_tokens_map.json")


@dataclass(frozen=True)
class CheckpointInfo:
    """What a checkpoint dir declares about itself."""

    path: Path
    kind: str  # "bertflow" or "huggingface"
    config: BertConfig
    head: str | None  # head the weights were saved with (None: encoder only)
    labels: tuple[str, ...] | None  # label names of a classification head, in id order
    weights_file: Path


@dataclass
class LoadReport:
    """Which parameter groups came from the checkpoint, which were initialised, which were unused."""

    loaded: list[str] = field(default_factory=list)
    initialised: list[str] = field(default_factory=list)
    unused: list[str] = field(default_factory=list)


# ----------------------------------------------------------------------------- reading


def read_checkpoint_info(path: str | Path) -> CheckpointInfo:
    """Identify a checkpoint dir (ours or Hugging Face) and read its config, without loading weights."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"{path}: checkpoint directory not found")
    config_path = path / CONFIG_FILE
    if not config_path.is_file():
        legacy = path / "bert_config.json"
        if legacy.is_file():
            config_path = legacy
        else:
            raise CheckpointError(
                f"{path}: not a BERT checkpoint directory: {CONFIG_FILE} is missing "
                f"(expected {CONFIG_FILE} and {WEIGHTS_FILE} or {HF_PICKLE_FILE})"
            )
    try:
        raw = json.loads(config_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{config_path}: not valid JSON ({exc})") from None
    if not isinstance(raw, dict):
        raise CheckpointError(f"{config_path}: expected a JSON object")

    if "bertflow" in raw:
        meta = raw["bertflow"]
        if meta.get("format_version") != FORMAT_VERSION:
            raise CheckpointError(
                f"{config_path}: checkpoint format version {meta.get('format_version')!r}, "
                f"this bertflow reads version {FORMAT_VERSION}"
            )
        config = BertConfig.from_dict(raw.get("model", {}), source=str(config_path))
        head = meta.get("head")
        if head not in HEADS:
            raise CheckpointError(f"{config_path}: unknown head {head!r}; known heads: {list(HEADS)}")
        labels = tuple(meta["labels"]) if meta.get("labels") is not None else None
        return CheckpointInfo(path, "bertflow", config, head, labels, _weights_path(path, allow_pickle=False))

    model_type = raw.get("model_type", "bert")
    if model_type != "bert":
        raise CheckpointError(f"{config_path}: model_type is {model_type!r}, expected 'bert'")
    hidden_act = raw.get("hidden_act", "gelu")
    if hidden_act != "gelu":
        raise CheckpointError(
            f"{config_path}: hidden_act {hidden_act!r} is not supported (bertflow implements the exact 'gelu')"
        )
    position_type = raw.get("position_embedding_type", "absolute")
    if position_type != "absolute":
        raise CheckpointError(
            f"{config_path}: position_embedding_type {position_type!r} is not supported, expected 'absolute'"
        )
    config = BertConfig.from_dict(raw, source=str(config_path))
    architectures = raw.get("architectures") or []
    head = _head_of_architecture(architectures[0]) if architectures else None
    labels = None
    id2label = raw.get("id2label")
    if head in LABELLED_HEADS and isinstance(id2label, dict):
        labels = tuple(id2label[k] for k in sorted(id2label, key=int))
    return CheckpointInfo(path, "huggingface", config, head, labels, _weights_path(path, allow_pickle=True))


def _weights_path(path: Path, *, allow_pickle: bool) -> Path:
    for name in (WEIGHTS_FILE, HF_SHARDED_INDEX) + ((HF_PICKLE_FILE,) if allow_pickle else ()):
        if (path / name).is_file():
            return path / name
    expected = f"{WEIGHTS_FILE}" + (f", {HF_SHARDED_INDEX} or {HF_PICKLE_FILE}" if allow_pickle else "")
    raise CheckpointError(f"{path}: no weights file found (expected {expected})")


def _read_safetensors(file: Path) -> dict[str, Tensor]:
    try:
        with safe_open(str(file), framework="pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"{file}: cannot read safetensors file (truncated or corrupt?): {exc}") from None


def read_weights(file: Path) -> dict[str, Tensor]:
    """All tensors of a weights file (safetensors, sharded safetensors index, or tensors-only pickle)."""
    if file.name == HF_SHARDED_INDEX:
        try:
            index = json.loads(file.read_text(encoding="utf-8"))["weight_map"]
        except (json.JSONDecodeError, KeyError, UnicodeDecodeError) as exc:
            raise CheckpointError(f"{file}: not a safetensors index with a 'weight_map' ({exc})") from None
        state: dict[str, Tensor] = {}
        for shard in sorted(set(index.values())):
            state.update(_read_safetensors(file.parent / shard))
        return state
    if file.suffix == ".safetensors":
        return _read_safetensors(file)
    try:
        state = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unpickling failure means the file is refused
        raise CheckpointError(
            f"{file}: refused: not a plain tensor checkpoint (loaded with weights_only=True; "
            f"nothing in it was executed): {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
        ) from None
    if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
        raise CheckpointError(f"{file}: expected a dict of tensor names to tensors")
    return state


def canonical_state_dict(state: dict[str, Tensor], source: Path) -> dict[str, Tensor]:
    """Rename a checkpoint's tensors to our names: `bert.` prefix, `weight`/`bias`, no tied copies."""
    out: dict[str, Tensor] = {}
    for key, tensor in state.items():
        name = key.replace("LayerNorm.gamma", "LayerNorm.weight").replace("LayerNorm.beta", "LayerNorm.bias")
        if name.endswith("position_ids"):  # a buffer some exports include
            continue
        if name.startswith(("embeddings.", "encoder.", "pooler.")):
            name = "bert." + name
        out[name] = tensor
    decoder = out.pop("cls.predictions.decoder.weight", None)
    embeddings = out.get("bert.embeddings.word_embeddings.weight")
    if decoder is not None and embeddings is not None and not torch.equal(decoder, embeddings):
        raise CheckpointError(
            f"{source}: cls.predictions.decoder.weight differs from bert.embeddings.word_embeddings.weight; "
            "bertflow's MLM decoder is tied to the word embeddings, as in BERT"
        )
    decoder_bias = out.pop("cls.predictions.decoder.bias", None)
    if decoder_bias is not None and "cls.predictions.bias" not in out:
        out["cls.predictions.bias"] = decoder_bias
    return out


# ----------------------------------------------------------------------------- loading into a model


def _head_of_architecture(architecture: str) -> str | None:
    """Our head name for a Hugging Face architecture class name (None: an encoder, or one we do not know)."""
    heads = {arch: head for head, arch in HF_ARCHITECTURES.items()} | HF_ARCHITECTURE_ALIASES
    return heads.get(architecture)


def build_model(config: BertConfig, head: str | None, num_labels: int | None = None) -> nn.Module:
    if head not in HEADS:
        raise CheckpointError(f"unknown head {head!r}; known heads: {[h for h in HEADS if h]}")
    cls = HEADS[head]
    if head in LABELLED_HEADS:
        if num_labels is None:
            raise CheckpointError(f"head {head!r} needs num_labels (or labels) to build its classifier")
        return cls(config, num_labels)
    return cls(config)


def _group_of(name: str) -> str:
    for group in HEAD_GROUPS + OPTIONAL_GROUPS:
        if name.startswith(group):
            return group
    return "bert."


def load_state(model: nn.Module, state: dict[str, Tensor], source: Path, *, reinit_mismatched: bool) -> LoadReport:
    """Copy checkpoint tensors (canonical names) into `model`.

    The encoder must be complete and correctly shaped. Each head group (and the pooler) is
    loaded whole when the checkpoint has it, and otherwise keeps the initialisation it got when
    the model was built. A head group of the wrong shape is an error, unless `reinit_mismatched`
    (the caller asked for a different number of labels), in which case it is initialised.
    """
    encoder_only = isinstance(model, HEADS[None])
    # canonical name -> the model's own name (an encoder-only model has no `bert.` prefix)
    names = {("bert." + k if encoder_only else k): k for k in model.state_dict()}
    target = model.state_dict()
    report = LoadReport()
    by_group: dict[str, list[str]] = {}
    for name in names:
        by_group.setdefault(_group_of(name), []).append(name)
    new_state: dict[str, Tensor] = {}
    for group, members in by_group.items():
        present = [n for n in members if n in state]
        if group != "bert." and not present:
            report.initialised.append(group)
            continue
        missing = [n for n in members if n not in state]
        if missing:
            raise CheckpointError(
                f"{source}: tensor {missing[0]} is missing"
                + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else "")
                + f"; the checkpoint has {len(present)} of the {len(members)} tensors of '{group}'"
            )
        mismatched = [n for n in members if tuple(state[n].shape) != tuple(target[names[n]].shape)]
        if mismatched and (group == "bert." or not reinit_mismatched):
            n = mismatched[0]
            raise CheckpointError(
                f"{source}: tensor {n} has shape {tuple(state[n].shape)}, "
                f"expected {tuple(target[names[n]].shape)} for this config"
            )
        if mismatched:
            report.initialised.append(group)
            continue
        new_state.update({names[n]: state[n].to(target[names[n]].dtype) for n in members})
        report.loaded.append(group)
    stray = sorted(k for k in state if k not in names and _group_of(k) == "bert.")
    if stray:
        raise CheckpointError(f"{source}: tensor {stray[0]} is not part of a BERT encoder of this config")
    report.unused = sorted({_group_of(k) for k in state if k not in names})
    model.load_state_dict(new_state, strict=False)
    return report


def from_pretrained(
    path: str | Path,
    head: str | None = "auto",
    *,
    num_labels: int | None = None,
    labels: list[str] | tuple[str, ...] | None = None,
    config_overrides: dict[str, Any] | None = None,
    init_seed: int | None = None,
) -> nn.Module:
    """Load our checkpoint dir or a Hugging Face BERT dir into a model with the requested head.

    `head="auto"` keeps the head the checkpoint was saved with; otherwise the encoder is loaded
    and the requested head's weights are taken from the checkpoint if it has them, else
    initialised. A classifier saved with a different number of labels than requested is
    initialised afresh. `model.load_report` says what was loaded and what was initialised.

    A head the checkpoint lacks is initialised as BERT initialises it (`bert.model.init_weights`):
    for the pretraining head of an encoder-only checkpoint (a sentence-embedding model such as
    MiniLM) the MLM transform's dense weight is normal(0, initializer_range) with a zero bias, its
    LayerNorm ones and zeros, the output bias zeros, the decoder is the word-embedding matrix
    (tied), and the NSP classifier is normal(0, initializer_range) with a zero bias. With
    `init_seed` those draws come from that seed (and the global torch RNG is left as it was), so
    continued pretraining from such a checkpoint starts from the same weights every time.
    """
    info = read_checkpoint_info(path)
    if head == "auto":
        head = info.head
    if labels is not None:
        labels = tuple(labels)
        if num_labels is not None and num_labels != len(labels):
            raise CheckpointError(f"num_labels={num_labels} but {len(labels)} labels were given")
        num_labels = len(labels)
    requested_labels = num_labels is not None
    if num_labels is None and head in LABELLED_HEADS:
        if info.labels is not None and info.head == head:
            labels, num_labels = info.labels, len(info.labels)
        else:
            raise CheckpointError(
                f"{info.path}: the checkpoint has no '{head}' labels; pass num_labels or labels"
            )
    config = info.config.replace(**config_overrides) if config_overrides else info.config
    if init_seed is None:
        model = build_model(config, head, num_labels)
    else:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(init_seed)
            model = build_model(config, head, num_labels)
    state = canonical_state_dict(read_weights(info.weights_file), info.weights_file)
    model.load_report = load_state(model, state, info.weights_file, reinit_mismatched=requested_labels)
    if head in LABELLED_HEADS:
        if labels is None and info.head == head and info.labels and len(info.labels) == num_labels:
            labels = info.labels
        model.labels = labels
    for group in model.load_report.initialised:
        log.info("%s: '%s' not in checkpoint (or reshaped): initialised", info.path, group)
    return model


def tokenizer_mismatch(checkpoint: str | Path, tokenizer_dir: str | Path) -> str | None:
    """How the tokenizer in `tokenizer_dir` (e.g. a shards dir's) differs from the checkpoint's, or None.

    Compared: the vocabulary (id -> token, special ids) and the casing. A checkpoint without
    tokenizer files can only be compared by vocabulary size, which the caller checks.
    """
    from bert.tokenizer import Tokenizer

    if not Tokenizer.is_tokenizer_dir(checkpoint):
        return None
    ours, theirs = Tokenizer.load(checkpoint), Tokenizer.load(tokenizer_dir)
    if ours.fingerprint() != theirs.fingerprint():
        return (f"another vocabulary ({theirs.vocab_size} tokens, sha256 {theirs.fingerprint()[:12]} against the "
                f"checkpoint's {ours.vocab_size} tokens, {ours.fingerprint()[:12]})")
    if ours.lowercase != theirs.lowercase:
        return (f"the same vocabulary but {'lower-cased' if theirs.lowercase else 'cased'} text, where the "
                f"checkpoint's tokenizer is {'lower-cased' if ours.lowercase else 'cased'}")
    return None


# ----------------------------------------------------------------------------- saving


def _head_of(model: nn.Module) -> str | None:
    for head, cls in HEADS.items():
        if type(model) is cls:
            return head
    raise CheckpointError(f"cannot save a {type(model).__name__}: not a bertflow BERT model")


def _state_for_saving(model: nn.Module) -> dict[str, Tensor]:
    # safetensors needs contiguous, unshared storage: copy each tensor out.
    return {k: v.detach().to("cpu").contiguous().clone() for k, v in model.state_dict().items()}


def hf_config(model: nn.Module) -> dict[str, Any]:
    """The Hugging Face `config.json` for `model`."""
    head = _head_of(model)
    config: BertConfig = model.config
    out: dict[str, Any] = {
        "architectures": [HF_ARCHITECTURES[head]],
        "model_type": "bert",
        **config.to_dict(),
        "position_embedding_type": "absolute",
        "tie_word_embeddings": True,
    }
    if head in LABELLED_HEADS:
        labels = getattr(model, "labels", None) or tuple(f"LABEL_{i}" for i in range(model.num_labels))
        out["id2label"] = {str(i): name for i, name in enumerate(labels)}
        out["label2id"] = {name: i for i, name in enumerate(labels)}
        if head == "sequence_classification" and model.num_labels == 1:
            out["problem_type"] = "regression"
    return out


def save_pretrained(
    model: nn.Module,
    path: str | Path,
    hf: bool = False,
    *,
    tokenizer_dir: str | Path | None = None,
) -> Path:
    """Write `model` as a checkpoint dir (ours, or the Hugging Face layout with `hf=True`).

    The directory is written under a temporary name and renamed into place. With
    `tokenizer_dir`, the tokenizer files found there travel with the checkpoint.
    """
    path = Path(path)
    with atomic_directory(path) as tmp:
        write_checkpoint(model, tmp, hf=hf, tokenizer_dir=tokenizer_dir)
    return path


def write_checkpoint(model: nn.Module, directory: Path, *, hf: bool = False,
                     tokenizer_dir: str | Path | None = None) -> None:
    """Write the files of `model`'s checkpoint into the existing (new, empty) `directory`.

    `save_pretrained` and `convert` call it on a temporary dir they then rename into place.
    """
    head = _head_of(model)
    if hf:
        config = hf_config(model)
    else:
        labels = getattr(model, "labels", None)
        config = {
            "bertflow": {
                "format_version": FORMAT_VERSION,
                "head": head,
                "labels": list(labels) if labels else None,
            },
            "model": model.config.to_dict(),
        }
    (directory / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    save_file(_state_for_saving(model), str(directory / WEIGHTS_FILE), metadata={"format": "pt"})
    if tokenizer_dir is not None:
        copy_tokenizer_files(tokenizer_dir, directory)


def copy_tokenizer_files(src: str | Path, dst: str | Path) -> list[str]:
    """Copy the tokenizer files found in `src` (a tokenizer or checkpoint dir) into `dst`."""
    src, dst = Path(src), Path(dst)
    copied = []
    for name in TOKENIZER_FILES:
        if (src / name).is_file():
            shutil.copy2(src / name, dst / name)
            copied.append(name)
    return copied


def load_for_convert(src: str | Path, *, to_hf: bool) -> nn.Module:
    """Read and check the source of `bertflow convert` (weights included): the model to write.

    `to_hf=True` expects our checkpoint dir, `to_hf=False` a Hugging Face BERT dir.
    """
    info = read_checkpoint_info(src)
    if to_hf and info.kind != "bertflow":
        raise CheckpointError(f"{src}: --to-hf expects a bertflow checkpoint dir, found a {info.kind} dir")
    if not to_hf and info.kind != "huggingface":
        raise CheckpointError(f"{src}: --from-hf expects a Hugging Face BERT dir, found a {info.kind} dir")
    return from_pretrained(src)


def convert(src: str | Path, out: str | Path, *, to_hf: bool) -> Path:
    """HF dir -> our dir (`to_hf=False`) or our dir -> HF dir (`to_hf=True`), written to the new dir `out`.

    `out` must not exist, nor be, contain or lie inside `src`: nothing is ever overwritten. The
    source is read whole before anything is created; the output is written under a temporary
    name and renamed into place. (`bertflow convert` also locks `out`, see pipelines/outdir.py.)
    """
    src, out = Path(src), Path(out)
    source, target = src.resolve(), out.resolve()
    if target == source or source in target.parents or target in source.parents:
        raise CheckpointError(f"{out}: the output may not be, contain or lie inside the input {src}")
    if out.exists() or out.is_symlink():
        raise CheckpointError(f"{out}: already exists; convert writes a new dir only (nothing was changed)")
    model = load_for_convert(src, to_hf=to_hf)
    try:
        with atomic_directory(out, overwrite=False) as tmp:
            write_checkpoint(model, tmp, hf=to_hf, tokenizer_dir=src)
    except FileExistsError:
        raise CheckpointError(f"{out}: appeared while converting; left as it is, nothing written") from None
    return out
