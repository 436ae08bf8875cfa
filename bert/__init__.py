"""bertflow's single-device library: config, model, tokenizer, checkpoint I/O, data and tasks.

Never imports Ray, MLflow or torch.distributed (DESIGN.md): distribution and tracking live in
`pipelines/`. The public names below are resolved on first use, so importing a light module
(`bert.errors`, `bert.config`) does not pay for importing torch.
"""

from __future__ import annotations

import importlib
from typing import Any

_PUBLIC = {
    "BertConfig": "bert.config",
    "preset": "bert.config",
    "from_pretrained": "bert.checkpoint",
    "save_pretrained": "bert.checkpoint",
}

__all__ = sorted(_PUBLIC)


def __getattr__(name: str) -> Any:
    if name in _PUBLIC:
        return getattr(importlib.import_module(_PUBLIC[name]), name)
    raise AttributeError(f"module 'bert' has no attribute {name!r}")
