"""Training a SentencePiece tokenizer on a corpus: a bounded sample, a guarded trainer, progress.

`Tokenizer.train_sentencepiece` (bert/tokenizer.py) is the entry point; this module does the work:

1. `sample_corpus`: the corpus is read by `bert.corpus` and streamed through a seeded reservoir, so
   only the sample is in memory; runs of more than `MAX_TRAINING_RUN_CHARS` characters without
   whitespace are dropped and counted (they cost SentencePiece minutes per megabyte and teach it
   nothing: no word of any language comes near 1000 characters; the longest run in the
   Wikipedia extract is 887, URL-encoded citation metadata).
2. `train_model`: SentencePiece trains in a child process (`spawn`), so Ctrl-C stops it at once,
   the child dies with its parent, a crash is a message, and a heartbeat line is printed every
   `TRAINING_HEARTBEAT_SECONDS`.
"""

from __future__ import annotations

import io
import multiprocessing
import os
import random
import re
import signal
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

import sentencepiece as spm

from bert.corpus import CorpusConfig, ReadStats, expand_inputs, read_documents
from bert.errors import InputError
from bert.tokenizer_backends import SPECIAL_TOKENS, SentencePieceModelType

MAX_TRAINING_RUN_CHARS = 1000
TRAINING_HEARTBEAT_SECONDS = 30.0  # a progress line this often while SentencePiece trains


def train_model(corpus_paths: Sequence[str | os.PathLike[str]], vocab_size: int, model_type: SentencePieceModelType,
                *, lowercase: bool, sample_sentences: int, round_to: int | None, character_coverage: float, seed: int,
                num_threads: int, corpus_config: CorpusConfig | None,
                progress: Callable[[str], None] | None) -> tuple[bytes, dict[str, Any]]:
    """(serialized SentencePiece model, how it was trained) for `Tokenizer.train_sentencepiece`."""
    if model_type not in ("unigram", "bpe"):
        raise InputError(f"model_type must be 'unigram' or 'bpe', got {model_type!r}")
    if sample_sentences < 1:
        raise InputError(f"sample_sentences must be at least 1, got {sample_sentences}")
    if round_to is not None and round_to < 1:
        raise InputError(f"round_to must be a positive integer or None, got {round_to}")
    target_size = vocab_size if round_to is None else -(-vocab_size // round_to) * round_to
    if target_size <= len(SPECIAL_TOKENS):
        raise InputError(f"vocab_size must exceed the {len(SPECIAL_TOKENS)} special tokens, got {vocab_size}")
    say = progress or (lambda message: None)

    sample, read = sample_corpus(corpus_paths, sample_sentences, seed, corpus_config or CorpusConfig(), say)
    options = trainer_options(model_type, target_size, lowercase, len(sample), read["max_sentence_chars"],
                              character_coverage, num_threads)
    what = (f"a {target_size}-piece {model_type} model on {len(sample):,} sentences "
            f"({read['sample_chars']:,} characters)")
    say(f"training {what}")
    started = time.monotonic()
    try:
        model = _train_in_child(sample, options, say)
    except _TrainingFailed as exc:
        raise InputError(
            f"sentencepiece could not train {what} sampled from {read['corpus_files'][0]} and "
            f"{len(read['corpus_files']) - 1} more file(s): {exc}"
        ) from None
    del sample
    say(f"trained {target_size} pieces in {time.monotonic() - started:.0f} s")
    training = {
        "model_type": model_type,
        "requested_vocab_size": vocab_size,
        "round_to": round_to,
        "sample_sentences": sample_sentences,
        "seed": seed,
        "character_coverage": character_coverage,
        "num_threads": num_threads,
        **read,
    }
    return model, training


def trainer_options(model_type: str, vocab_size: int, lowercase: bool, sample_size: int, max_sentence_chars: int,
                    character_coverage: float, num_threads: int) -> dict[str, Any]:
    """SentencePiece's settings: our special tokens as ids 0..4 (control pieces), the whole sample, no BOS/EOS."""
    return {
        "model_type": model_type,
        "vocab_size": vocab_size,
        "normalization_rule_name": "nmt_nfkc_cf" if lowercase else "nmt_nfkc",
        "pad_id": 0,
        "unk_id": 1,
        "bos_id": -1,
        "eos_id": -1,
        "pad_piece": SPECIAL_TOKENS["pad"],
        "unk_piece": SPECIAL_TOKENS["unk"],
        "control_symbols": [SPECIAL_TOKENS[role] for role in ("cls", "sep", "mask")],
        # the whole sample; sentencepiece refuses a size of 1..100, where 0 ("all") says the same
        "input_sentence_size": sample_size if sample_size > 100 else 0,
        "shuffle_input_sentence": False,
        "max_sentence_length": 4 * max_sentence_chars,  # in bytes: keep every sentence we sampled
        "character_coverage": character_coverage,
        "num_threads": num_threads,
        "minloglevel": 1,
    }


def sample_corpus(
    paths: Sequence[str | os.PathLike[str]],
    size: int,
    seed: int,
    config: CorpusConfig,
    progress: Callable[[str], None],
) -> tuple[list[str], dict[str, Any]]:
    """A uniform sample of at most `size` corpus sentences, and what reading met.

    The corpus is read by `bert.corpus` (plain, BERT-format, WikiExtractor, JSONL or parquet
    files, `.gz` or not; invalid UTF-8 replaced; sentences longer than its `max_sentence_chars`
    cut) and streamed through a reservoir (Algorithm R, seeded), so only the sample is in memory.
    Runs of more than `MAX_TRAINING_RUN_CHARS` non-whitespace characters are dropped from each
    sentence before it enters the reservoir (a sentence left empty is dropped), and counted.
    """
    files = expand_inputs(paths, config)
    stats = ReadStats()
    rng = random.Random(seed)
    sample: list[str] = []
    seen = 0
    runs_dropped = chars_dropped = sentences_dropped = 0
    unreadable: list[str] = []
    long_run = re.compile(rf"\S{{{MAX_TRAINING_RUN_CHARS + 1},}}")
    progress(f"reading {len(files)} corpus file(s) under {', '.join(map(str, paths))}")
    last_report = time.monotonic()
    for index, file in enumerate(files):
        before = stats.unreadable_files
        for document in read_documents(file, stats, config):
            for sentence in document.sentences:
                if len(sentence) > MAX_TRAINING_RUN_CHARS:
                    runs = long_run.findall(sentence)
                    if runs:
                        runs_dropped += len(runs)
                        chars_dropped += sum(map(len, runs))
                        sentence = long_run.sub(" ", sentence).strip()
                        if not sentence:
                            sentences_dropped += 1
                            continue
                seen += 1
                if len(sample) < size:
                    sample.append(sentence)
                else:
                    slot = rng.randrange(seen)
                    if slot < size:
                        sample[slot] = sentence
        if stats.unreadable_files > before:
            unreadable.append(str(file.path))
        if time.monotonic() - last_report >= 10 and index + 1 < len(files):
            progress(f"read {index + 1} of {len(files)} files: {seen:,} sentences")
            last_report = time.monotonic()
    dropped = (f"{runs_dropped:,} run(s) of more than {MAX_TRAINING_RUN_CHARS:,} characters without whitespace "
               f"({chars_dropped:,} characters; {sentences_dropped:,} sentence(s) left empty)")
    if not sample:
        raise InputError(
            f"no text in the corpus ({len(files)} file(s) starting with {files[0].path}; read: {stats.as_dict()}"
            + (f"; dropped {dropped}" if runs_dropped else "")
            + "); expected plain, BERT-format or WikiExtractor text"
        )
    sample_chars = sum(map(len, sample))
    progress(f"sampled {len(sample):,} of {seen:,} sentences ({sample_chars:,} characters) from {len(files)} file(s)"
             + (f"; dropped {dropped}" if runs_dropped else ""))
    return sample, {
        "corpus_files": [str(f.path) for f in files],
        "max_sentence_chars": config.max_sentence_chars,
        "sentences_seen": seen,
        "sentences_sampled": len(sample),
        "sample_chars": sample_chars,
        "max_run_chars": MAX_TRAINING_RUN_CHARS,
        "long_runs_dropped": runs_dropped,
        "long_run_chars_dropped": chars_dropped,
        "unreadable_files_skipped": unreadable,
        "read": stats.as_dict(),
    }


# ------------------------------------------------------------------------------- SentencePiece training


class _TrainingFailed(Exception):
    """SentencePiece refused the settings or the sample, or its process died."""


def _train_in_child(sample: list[str], options: dict[str, Any], progress: Callable[[str], None]) -> bytes:
    """The serialized model SentencePiece trains on `sample`, trained in a child process.

    The library's training is one long C++ call that never returns to Python, so in-process it
    ignores Ctrl-C until it is done. In a child, the parent waits in Python (a KeyboardInterrupt
    arrives at once; the child is killed on the way out) and reports progress meanwhile; the
    child asks the kernel to kill it when the parent dies. `spawn`, not `fork`: the caller may
    be a multithreaded process (a Ray worker).
    """
    context = multiprocessing.get_context("spawn")
    receiver, sender = context.Pipe(duplex=False)
    child = context.Process(target=_trainer_process, args=(sender, os.getpid(), sample, options),
                            name="sentencepiece-trainer", daemon=True)
    started = last = time.monotonic()
    try:
        # the child starts with SIGINT ignored (an ignored signal stays ignored across exec, and Python then
        # installs no KeyboardInterrupt handler): a Ctrl-C to the process group while it is still importing
        # never becomes a traceback there. The parent ignores SIGINT only while it forks and execs the child
        # (a Ctrl-C in those milliseconds is lost, not half-handled); the child ignores it while it runs.
        previous = signal.signal(signal.SIGINT, signal.SIG_IGN) if threading.current_thread() is threading.main_thread() else None
        try:
            child.start()  # inside the try: a Ctrl-C while the sample is still being sent kills the child too
        finally:
            if previous is not None:
                signal.signal(signal.SIGINT, previous)
        sender.close()
        while not receiver.poll(0.5):
            now = time.monotonic()
            if now - last >= TRAINING_HEARTBEAT_SECONDS:
                progress(f"training... {now - started:.0f} s")
                last = now
        try:
            status, payload = receiver.recv()
        except EOFError:
            child.join(5)
            code = child.exitcode
            how = f"killed by signal {-code}" if code is not None and code < 0 else f"exit code {code}"
            hint = "; out of memory? try fewer --sample-sentences" if code == -signal.SIGKILL else ""
            raise _TrainingFailed(f"the training process died ({how}{hint})") from None
    finally:
        sender.close()
        if child.pid is not None:  # started
            if child.is_alive():
                child.kill()
            child.join(5)
        receiver.close()
    if status != "ok":
        raise _TrainingFailed(payload)
    return payload


def _trainer_process(sender: Any, parent_pid: int, sample: list[str], options: dict[str, Any]) -> None:
    """Child process: train, send ("ok", model bytes) or ("error", message) to the parent."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C in a terminal reaches us too: the parent decides
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG: die with the parent
    except (OSError, AttributeError):
        pass
    if os.getppid() != parent_pid:  # the parent died before prctl
        return
    model = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(sentence_iterator=iter(sample), model_writer=model, **options)
    except (RuntimeError, ValueError, OSError) as exc:  # sentencepiece reports bad settings this way
        sender.send(("error", str(exc).strip() or type(exc).__name__))
    else:
        sender.send(("ok", model.getvalue()))
    sender.close()
