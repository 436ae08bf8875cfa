"""What a training run records beside each checkpoint, and how a complete checkpoint is told from a torn one.

Pretraining (`bert.pretrain.TrainState`, `train_state.json`) and fine-tuning
(`bert.finetune.FinetuneState`, `finetune_state.json`) both keep a small JSON record next to
the weights and `optimizer.pt`. The record is written last and lists the size of every other
file of the checkpoint, so a save killed half-way is never taken for a complete checkpoint:

    state.write(directory)          the record, after every other file is in place
    State.complete(directory)       every listed file exists at its recorded size
    State.latest(directories)       the newest complete one of an ordered list (None if none)

A checkpoint is written in a local dir; it may be read (`read`, `complete`, `latest`) where it
was stored, a local dir or an object-store prefix (`bert/storage.py`). On a store the record is
the checkpoint's manifest: uploaded after every other file, so a listing that shows it with all
its files at their sizes is a complete checkpoint, whatever a killed upload left beside it.

Also the optimizer state both training loops restore (`load_optimizer_state`).
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable
from dataclasses import asdict, fields
from pathlib import Path
from typing import Any, ClassVar, TypeVar

import torch

from bert import storage
from bert.errors import InputError

OPTIMIZER_STATE = "optimizer.pt"

S = TypeVar("S", bound="RunState")


class RunState:
    """A mixin for the dataclass that records where a run is; it needs a `files: dict[str, int]` field.

    `STATE_FILE` names the record. Floats that JSON cannot hold (NaN, +-inf) are written as null
    and read back as `NULL_FLOATS` says (e.g. a best score of -inf before any epoch).
    """

    STATE_FILE: ClassVar[str]
    NULL_FLOATS: ClassVar[dict[str, float]] = {}

    @classmethod
    def read(cls: type[S], directory: storage.Location) -> S:
        data = json.loads(storage.read_text(storage.join(directory, cls.STATE_FILE)))
        for name, value in cls.NULL_FLOATS.items():
            if data.get(name) is None:
                data[name] = value
        known = {f.name for f in fields(cls)}  # records from older versions may hold more
        return cls(**{k: v for k, v in data.items() if k in known})

    def write(self, directory: Path) -> None:
        """The record, listing every other file of `directory` with its size: call it after they are written."""
        directory = Path(directory)
        self.files = {p.name: p.stat().st_size for p in directory.iterdir()
                      if p.is_file() and p.name != self.STATE_FILE}
        data = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in asdict(self).items()}
        (directory / self.STATE_FILE).write_text(json.dumps(data, indent=2, allow_nan=False))

    @classmethod
    def complete(cls, directory: storage.Location) -> bool:
        """True when the record exists and every file it lists is there at its recorded size."""
        try:
            files: dict[str, Any] = cls.read(directory).files
            present = dict(storage.walk_files(directory))
        except (OSError, ValueError, TypeError, InputError):
            return False
        return bool(files) and all(present.get(name) == size for name, size in files.items())

    @classmethod
    def latest(cls, directories: Iterable[storage.Location]) -> storage.Location | None:
        """The last complete checkpoint of `directories` (given oldest first); a torn save is skipped."""
        return next((d for d in reversed(list(directories)) if cls.complete(d)), None)


def load_optimizer_state(optimizer: torch.optim.Optimizer, directory: Path, device: torch.device) -> None:
    """The optimizer state saved beside a checkpoint's weights (tensors only: `weights_only=True`)."""
    state = torch.load(Path(directory) / OPTIMIZER_STATE, map_location=device, weights_only=True)
    optimizer.load_state_dict(state)


def save_optimizer_state(optimizer: torch.optim.Optimizer, directory: Path) -> None:
    torch.save(optimizer.state_dict(), Path(directory) / OPTIMIZER_STATE)
