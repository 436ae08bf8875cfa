"""`bertflow convert` as a job: import a Hugging Face BERT dir, or export ours to the Hugging Face layout.

A NEW output of the job skeleton (`pipelines/jobs/skeleton.run_job`): an existing --out is refused, as is
one that is, contains or lies inside the input; preflight reads the whole input (config and weights)
before anything is created; the run writes the skeleton's temporary, which appears under its name only
when complete (`pipelines/outdir.atomic_output`). No Ray, no MLflow.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bert import storage
from pipelines.jobs.skeleton import BuildJob, Claimed, run_job


@dataclass(frozen=True)
class ConvertConfig:
    source: str  # a Hugging Face BERT dir (import) or a bertflow checkpoint dir (export, `to_hf`)
    out: str  # the checkpoint dir to create
    to_hf: bool = False


class ConvertJob(BuildJob[ConvertConfig]):
    """`run_job(ConvertJob(), config)`: the skeleton's steps for a conversion."""

    name = "convert"
    required = ("source", "out")

    def inputs(self, config: ConvertConfig) -> list[Any]:
        return [config.source]

    def preflight(self, config: ConvertConfig) -> tuple[Any, Path]:
        """(the model, a local copy of the source): the whole input is read before anything is created."""
        from bert.checkpoint import load_for_convert

        local = storage.local_copy(config.source, "inputs")
        with storage.named(config.source, local):
            return load_for_convert(local, to_hf=config.to_hf), local

    def run(self, claimed: Claimed[ConvertConfig], checked: tuple[Any, Path]) -> dict[str, Any]:
        """The checkpoint (and the tokenizer files) written into the temporary; its kind and head."""
        from bert.checkpoint import read_checkpoint_info, write_checkpoint
        from bert.tokenizer import Tokenizer

        (model, local), tmp, to_hf = checked, claimed.into, claimed.config.to_hf
        write_checkpoint(model, tmp, hf=to_hf, tokenizer_dir=local)
        if to_hf and Tokenizer.is_tokenizer_dir(tmp):  # AutoTokenizer loads it, SentencePiece included
            Tokenizer.load(tmp).save_for_transformers(tmp, model.config.max_position_embeddings)
        info = read_checkpoint_info(tmp)
        return {"kind": info.kind, "head": info.head}


def run_convert(config: ConvertConfig) -> dict[str, Any]:
    """Check, read the source whole, write the new checkpoint dir. Returns its kind and head."""
    return run_job(ConvertJob(), config)
