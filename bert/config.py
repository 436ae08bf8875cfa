"""Model configuration: one frozen dataclass, validated on construction, and the published presets.

Field names are those of the original `bert_config.json` (google-research/bert), which the
Hugging Face BERT config also uses, so a config maps 1:1 onto both.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, fields
from typing import Any

from bert.errors import InputError

# Activations we implement. The original BERT uses the exact (erf) GELU.
SUPPORTED_ACTIVATIONS = ("gelu",)


@dataclass(frozen=True)
class BertConfig:
    """Architecture of a BERT encoder. Defaults are BERT-base, uncased vocabulary."""

    vocab_size: int = 30522
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    hidden_dropout_prob: float = 0.1
    attention_probs_dropout_prob: float = 0.1
    layer_norm_eps: float = 1e-12
    initializer_range: float = 0.02
    pad_token_id: int = 0
    hidden_act: str = "gelu"

    def __post_init__(self) -> None:
        for name in (
            "vocab_size",
            "hidden_size",
            "num_hidden_layers",
            "num_attention_heads",
            "intermediate_size",
            "max_position_embeddings",
            "type_vocab_size",
        ):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise InputError(f"BertConfig.{name} must be a positive integer, got {value!r}")
        if self.hidden_size % self.num_attention_heads:
            raise InputError(
                f"BertConfig.hidden_size ({self.hidden_size}) must be divisible by "
                f"num_attention_heads ({self.num_attention_heads})"
            )
        for name in ("hidden_dropout_prob", "attention_probs_dropout_prob"):
            value = getattr(self, name)
            if not 0.0 <= value < 1.0:
                raise InputError(f"BertConfig.{name} must be in [0, 1), got {value!r}")
        if not self.layer_norm_eps > 0:
            raise InputError(f"BertConfig.layer_norm_eps must be positive, got {self.layer_norm_eps!r}")
        if not self.initializer_range > 0:
            raise InputError(f"BertConfig.initializer_range must be positive, got {self.initializer_range!r}")
        if not 0 <= self.pad_token_id < self.vocab_size:
            raise InputError(
                f"BertConfig.pad_token_id ({self.pad_token_id}) must be a token id below vocab_size ({self.vocab_size})"
            )
        if self.hidden_act not in SUPPORTED_ACTIVATIONS:
            raise InputError(
                f"BertConfig.hidden_act {self.hidden_act!r} is not supported; expected one of {SUPPORTED_ACTIVATIONS}"
            )

    @property
    def head_size(self) -> int:
        return self.hidden_size // self.num_attention_heads

    def check_sequence_length(self, length: int, what: str) -> None:
        """The one sequence-length check: `what` (e.g. "shards /x hold sequences") of up to `length`
        tokens must fit the model's learned position embeddings."""
        if length > self.max_position_embeddings:
            raise InputError(f"{what} of up to {length} tokens, above the model's max_position_embeddings "
                             f"({self.max_position_embeddings})")

    def replace(self, **changes: Any) -> BertConfig:
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any], *, source: str = "config") -> BertConfig:
        """Build from a dict that may hold extra keys (a Hugging Face config.json does); unknown keys are ignored."""
        known = {f.name for f in fields(cls)}
        kwargs = {k: v for k, v in data.items() if k in known and v is not None}
        missing = [n for n in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads") if n not in kwargs]
        if missing:
            raise InputError(f"{source}: missing required BERT config fields {missing}")
        try:
            return cls(**kwargs)
        except InputError as exc:
            raise InputError(f"{source}: {exc}") from None
        except TypeError as exc:
            raise InputError(f"{source}: {exc}") from None


def _preset(layers: int, hidden: int, **overrides: Any) -> BertConfig:
    # Published sizes use 64-dimensional heads and a 4x feed-forward expansion.
    return BertConfig(
        num_hidden_layers=layers,
        hidden_size=hidden,
        num_attention_heads=hidden // 64,
        intermediate_size=4 * hidden,
        **overrides,
    )


# Presets from the BERT paper (base, large) and Turc et al. 2019 "Well-Read Students" (tiny..medium).
def tiny(**overrides: Any) -> BertConfig:
    return _preset(2, 128, **overrides)


def mini(**overrides: Any) -> BertConfig:
    return _preset(4, 256, **overrides)


def small(**overrides: Any) -> BertConfig:
    return _preset(4, 512, **overrides)


def medium(**overrides: Any) -> BertConfig:
    return _preset(8, 512, **overrides)


def base(**overrides: Any) -> BertConfig:
    return _preset(12, 768, **overrides)


def large(**overrides: Any) -> BertConfig:
    return _preset(24, 1024, **overrides)


PRESETS = {"tiny": tiny, "mini": mini, "small": small, "medium": medium, "base": base, "large": large}


def preset(name: str, **overrides: Any) -> BertConfig:
    """A published size by name, e.g. `preset("mini", vocab_size=32000)`."""
    try:
        factory = PRESETS[name]
    except KeyError:
        raise InputError(f"unknown model preset {name!r}; known presets: {', '.join(PRESETS)}") from None
    return factory(**overrides)


def check_model_name(name: str) -> None:
    """`name` is a preset or an existing path (a checkpoint dir, checked when read; a local path or a prefix on an
    object store); else the presets are listed."""
    from bert import storage

    if name in PRESETS or storage.exists(name):
        return
    raise InputError(f"model {name!r} is neither a model preset (known presets: {', '.join(PRESETS)}) nor an "
                     "existing checkpoint dir")
