"""`bertflow tokenizer` as jobs: train a SentencePiece tokenizer, or write one from a BERT vocab.txt.

Both are NEW outputs of the job skeleton (`pipelines/jobs/skeleton.run_job`): an existing --out is
refused, as is one that is, contains or lies inside an input; preflight finds every corpus path (or
reads the vocabulary) before anything is created; the run writes the skeleton's temporary, which
appears under its name only when complete. No Ray, no MLflow.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from bert import storage
from bert.corpus import CorpusConfig
from pipelines.jobs.skeleton import BuildJob, Claimed, run_job


@dataclass(frozen=True)
class TrainConfig:
    corpus: tuple[str, ...]  # files or directories of them
    vocab_size: int  # special tokens included
    out: str
    model_type: str = "unigram"  # or "bpe"
    sample_sentences: int | None = None  # None: the library's default
    round_vocab: bool = True  # up to a multiple of `bert.tokenizer.VOCAB_MULTIPLE`
    lowercase: bool = True
    seed: int = 0
    corpus_config: CorpusConfig = field(default_factory=CorpusConfig)


@dataclass(frozen=True)
class FromVocabConfig:
    vocab: str  # a BERT vocab.txt
    out: str
    lowercase: bool = True


class TrainJob(BuildJob[TrainConfig]):
    """`run_job(TrainJob(progress), config)`: train SentencePiece on a reservoir sample of the corpus; `progress`
    is told how the training goes, a line at a time."""

    name = "tokenizer train"
    required = ("corpus", "out")

    def __init__(self, progress: Callable[[str], None] | None = None):
        self.progress = progress

    def inputs(self, config: TrainConfig) -> list[Any]:
        return list(config.corpus)

    def preflight(self, config: TrainConfig) -> None:
        from bert.corpus import expand_inputs

        expand_inputs(config.corpus, config.corpus_config)  # a missing corpus path is refused before anything is created

    def run(self, claimed: Claimed[TrainConfig], checked: None) -> dict[str, Any]:
        """The tokenizer, trained into the temporary."""
        from bert.tokenizer import VOCAB_MULTIPLE, Tokenizer

        config = claimed.config
        sample = {} if config.sample_sentences is None else {"sample_sentences": config.sample_sentences}
        tokenizer = Tokenizer.train_sentencepiece(
            config.corpus, config.vocab_size, claimed.into, model_type=config.model_type,
            lowercase=config.lowercase, round_to=VOCAB_MULTIPLE if config.round_vocab else None, seed=config.seed,
            corpus_config=config.corpus_config, progress=self.progress, **sample)
        return {"tokenizer": tokenizer,
                "unreadable_files_skipped": tokenizer._backend.training.get("unreadable_files_skipped", [])}


class FromVocabJob(BuildJob[FromVocabConfig]):
    """`run_job(FromVocabJob(), config)`: a WordPiece tokenizer dir from a BERT vocab.txt."""

    name = "tokenizer from-vocab"
    required = ("vocab", "out")

    def inputs(self, config: FromVocabConfig) -> list[Any]:
        return [config.vocab]

    def preflight(self, config: FromVocabConfig) -> Any:
        """The tokenizer: the input is read before anything is created."""
        from bert.tokenizer import Tokenizer

        vocab = storage.local_copy(config.vocab, "inputs")
        with storage.named(config.vocab, vocab):
            return Tokenizer.from_vocab_file(vocab, lowercase=config.lowercase)

    def run(self, claimed: Claimed[FromVocabConfig], tokenizer: Any) -> dict[str, Any]:
        tokenizer.save(claimed.into)
        return {"tokenizer": tokenizer}


def train_tokenizer(config: TrainConfig, progress: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Check, train, write the new tokenizer dir. Returns {"tokenizer", "unreadable_files_skipped"}."""
    return run_job(TrainJob(progress), config)


def tokenizer_from_vocab(config: FromVocabConfig) -> dict[str, Any]:
    """Check, read the vocabulary, write the new tokenizer dir. Returns {"tokenizer"}."""
    return run_job(FromVocabJob(), config)
