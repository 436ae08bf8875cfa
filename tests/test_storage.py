"""The storage layer (bert/storage.py) against local disk and a real S3 API (moto server on loopback)."""

from __future__ import annotations

import gzip
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.fs as pafs
import pytest

from bert import storage
from bert.errors import InputError

ROOT = Path(__file__).resolve().parents[1]


def test_resolve_local_paths_file_uris_and_s3(tmp_path, s3_server):
    fs, path = storage.resolve(tmp_path / "a")
    assert fs is storage.LOCAL and path == str(tmp_path / "a")
    fs, path = storage.resolve(f"file://{tmp_path}/b")
    assert fs is storage.LOCAL and path == f"{tmp_path}/b"
    fs, path = storage.resolve("s3://bertflow-test/runs/x/")
    assert isinstance(fs, pafs.S3FileSystem) and path == "bertflow-test/runs/x"
    assert storage.join("s3://b/x/", "y", "z.json") == "s3://b/x/y/z.json"
    assert storage.join(tmp_path, "y") == tmp_path / "y"
    assert not storage.is_remote(tmp_path) and not storage.is_remote(f"file://{tmp_path}") and storage.is_remote("gs://b/x")
    with pytest.raises(InputError, match="names no bucket"):
        storage.resolve("s3:///key")


def test_s3_options_read_the_endpoint_and_credentials_as_boto3_does():
    env = {"AWS_ENDPOINT_URL": "http://10.0.0.1:9000", "AWS_ENDPOINT_URL_S3": "https://s3.example.org",
           "AWS_ACCESS_KEY_ID": "k", "AWS_SECRET_ACCESS_KEY": "s", "AWS_SESSION_TOKEN": "t", "AWS_DEFAULT_REGION": "eu-west-1"}
    options = storage.s3_options(env)
    assert (options["endpoint_override"], options["scheme"]) == ("s3.example.org", "https")  # the S3-specific one wins
    assert (options["access_key"], options["secret_key"], options["session_token"], options["region"]) == ("k", "s", "t", "eu-west-1")
    options = storage.s3_options({"AWS_ENDPOINT_URL": "http://127.0.0.1:9000"})
    assert (options["endpoint_override"], options["scheme"], options["region"]) == ("127.0.0.1:9000", "http", "us-east-1")
    assert "access_key" not in options  # the SDK's default chain (profile, instance profile)
    assert "endpoint_override" not in storage.s3_options({})
    with pytest.raises(InputError, match="AWS_ENDPOINT_URL='minio:9000': expected http"):
        storage.s3_options({"AWS_ENDPOINT_URL": "minio:9000"})


@pytest.mark.parametrize("where", ["local", "s3"])
def test_round_trips(where, tmp_path, s3_uri):
    base = str(tmp_path / "out") if where == "local" else s3_uri
    storage.write_json(storage.join(base, "a", "m.json"), {"b": 1, "a": [1, 2]})
    storage.write_bytes(storage.join(base, "raw.bin"), bytes(range(256)))
    with storage.open_write(storage.join(base, "text.txt.gz")) as f:
        f.write(gzip.compress("héllo\nwörld\n".encode()))
    assert storage.read_json(storage.join(base, "a", "m.json")) == {"a": [1, 2], "b": 1}
    assert storage.read_bytes(storage.join(base, "raw.bin")) == bytes(range(256))
    with storage.open_read(storage.join(base, "text.txt.gz"), "rt") as f:
        assert f.read().splitlines() == ["héllo", "wörld"]
    assert storage.list_dir(base) == ["a", "raw.bin", "text.txt.gz"]
    assert storage.is_dir(storage.join(base, "a")) and storage.is_file(storage.join(base, "raw.bin"))
    assert not storage.exists(storage.join(base, "nope")) and storage.size(storage.join(base, "raw.bin")) == 256
    down = storage.download(base, tmp_path / "down")
    assert sorted(str(p.relative_to(down)) for p in down.rglob("*") if p.is_file()) == ["a/m.json", "raw.bin", "text.txt.gz"]
    storage.remove(storage.join(base, "a"))
    assert storage.list_dir(base) == ["raw.bin", "text.txt.gz"]


@pytest.mark.parametrize("where", ["local", "s3"])
def test_bytes_are_stored_as_given_whatever_the_name_ends_with(where, tmp_path, s3_uri):
    """write_bytes / open_write / copy never compress or decompress: a `.gz` name holds the gzip bytes it was given
    (pyarrow's output streams infer compression from the extension unless told not to)."""
    base = str(tmp_path / "out") if where == "local" else s3_uri
    data = gzip.compress(b"one sentence.\n\nanother document.\n")
    storage.write_bytes(storage.join(base, "a.txt.gz"), data)
    assert storage.read_bytes(storage.join(base, "a.txt.gz")) == data
    assert storage.size(storage.join(base, "a.txt.gz")) == len(data)
    storage.copy(storage.join(base, "a.txt.gz"), storage.join(base, "copy", "b.gz"))
    assert storage.read_bytes(storage.join(base, "copy", "b.gz")) == data
    with storage.open_read(storage.join(base, "copy", "b.gz"), "rt") as f:
        assert f.read() == "one sentence.\n\nanother document.\n"
    storage.write_bytes(storage.join(base, "x.bz2"), b"not bzip2 at all")
    assert storage.read_bytes(storage.join(base, "x.bz2")) == b"not bzip2 at all"


def test_upload_dir_then_walk(tmp_path, s3_uri):
    (tmp_path / "src" / "sub").mkdir(parents=True)
    (tmp_path / "src" / "x.txt").write_text("x")
    (tmp_path / "src" / "sub" / "y.bin").write_bytes(b"yy")
    storage.upload_dir(tmp_path / "src", s3_uri)
    assert storage.walk_files(s3_uri) == [("sub/y.bin", 2), ("x.txt", 1)]
    assert storage.sha256(storage.join(s3_uri, "x.txt")) == storage.sha256(tmp_path / "src" / "x.txt")


@pytest.mark.parametrize("where", ["local", "s3"])
def test_a_failed_write_publishes_nothing(where, tmp_path, s3_uri):
    base = str(tmp_path) if where == "local" else s3_uri
    target = storage.join(base, "model.bin")
    storage.write_bytes(target, b"old")
    with pytest.raises(RuntimeError, match="killed mid-write"):
        with storage.open_write(target) as f:
            f.write(b"new, half written")
            raise RuntimeError("killed mid-write")
    assert storage.read_bytes(target) == b"old"
    assert storage.list_dir(base) == ["model.bin"]  # no temporary left beside it


def test_missing_object_and_missing_bucket_are_named(s3_server, s3_uri):
    with pytest.raises(InputError, match=rf"^{s3_uri}/absent.json: does not exist$"):
        storage.read_json(f"{s3_uri}/absent.json")
    with pytest.raises(InputError, match=r"^s3://no-such-bucket-here/x.json: bucket no-such-bucket-here does not exist$"):
        storage.read_json("s3://no-such-bucket-here/x.json")
    with pytest.raises(InputError, match=r"^s3://no-such-bucket-here/x.json: cannot write: .*"):
        storage.write_json("s3://no-such-bucket-here/x.json", {})


def test_refused_credentials_are_one_line(s3_server, s3_uri):
    storage.write_bytes(f"{s3_uri}/x", b"x")
    with s3_server.checking_credentials():
        started = time.monotonic()
        with pytest.raises(InputError) as caught:
            storage.read_bytes(f"{s3_uri}/x")
        elapsed = time.monotonic() - started
    message = str(caught.value)
    assert "\n" not in message and message.startswith(f"{s3_uri}/x: ") and "access denied" in message, message
    assert elapsed < 30, elapsed  # a bound on retries, not a speed claim: minutes would mean they loop


def test_unreachable_endpoint_is_one_line_within_seconds(tmp_path):
    """In a fresh interpreter with an endpoint nobody listens on: the CLI-facing error, one line."""
    from s3server import free_port

    env = {**{k: v for k, v in os.environ.items() if k != "AWS_ENDPOINT_URL_S3"},
           "AWS_ENDPOINT_URL": f"http://127.0.0.1:{free_port()}", "AWS_ACCESS_KEY_ID": "k",
           "AWS_SECRET_ACCESS_KEY": "s", "AWS_EC2_METADATA_DISABLED": "true"}
    probe = ("from bert import storage\nfrom bert.errors import InputError\n"
             "try:\n    storage.read_json('s3://bucket/runs/x/_manifest.json')\n"
             "except InputError as e:\n    print(e)\n")
    started = time.monotonic()
    out = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    elapsed = time.monotonic() - started
    lines = out.stdout.strip().splitlines()
    assert out.returncode == 0 and len(lines) == 1, (out.stdout, out.stderr[-2000:])
    assert lines[0].startswith("s3://bucket/runs/x/_manifest.json: cannot ") and "cannot reach the object store" in lines[0]
    assert elapsed < 60, elapsed  # bounded retries: the default SDK settings take minutes here


def test_write_json_is_stable_text(tmp_path):
    storage.write_json(tmp_path / "m.json", {"b": 2, "a": 1})
    assert (tmp_path / "m.json").read_text() == json.dumps({"a": 1, "b": 2}, indent=2) + "\n"


# ----------------------------------------------------------------------------- the one-writer lease


def test_a_second_writer_is_refused_and_changes_nothing(s3_server, s3_uri):
    from pipelines import lease

    prefix = s3_uri.split("/", 3)[3]
    with lease.acquire(s3_uri, job="pretrain") as first:
        first.commit(f"{s3_uri}/_manifest.json", {"step": 1})
        before = s3_server.keys(prefix)
        with pytest.raises(InputError, match=rf"^{s3_uri} is in use by another writer: pretrain \(pid {os.getpid()} .*generation 1"):
            with lease.acquire(s3_uri, job="pretrain"):
                storage.write_json(f"{s3_uri}/_manifest.json", {"step": 666})  # never runs
        assert s3_server.keys(prefix) == before
        first.check()  # still the holder
    assert storage.read_json(f"{s3_uri}/_manifest.json") == {"step": 1}
    with lease.acquire(s3_uri, job="pretrain") as second:  # released: taken over at once, generation 2
        assert second.generation == 2 and second.previous["released"] and second.previous["owner"] == first.owner
    with pytest.raises(lease.LeaseLost, match="no longer the holder"):
        first.check()


def test_an_expired_lease_is_taken_over_and_fences_its_old_holder(s3_uri):
    from pipelines import lease

    stale = lease.S3Lease(s3_uri, "finetune", ttl_s=2)
    stale.acquire()  # never renewed: a writer frozen or killed
    with pytest.raises(InputError, match="in use by another writer"):
        lease.S3Lease(s3_uri, "finetune", ttl_s=2).acquire()
    time.sleep(4.5)  # ttl + the store's one-second clock + slack
    with lease.acquire(s3_uri, job="finetune", ttl_s=2) as fresh:
        assert fresh.generation == 2 and fresh.previous["owner"] == stale.owner
        with pytest.raises(lease.LeaseLost):
            stale.renew()  # its ETag no longer matches
        with pytest.raises(lease.LeaseLost):
            stale.commit(f"{s3_uri}/_manifest.json", {"late": True})
        assert not storage.exists(f"{s3_uri}/_manifest.json")
        fresh.check()


def test_renewal_keeps_a_running_writer_live(s3_uri):
    from pipelines import lease

    with lease.acquire(s3_uri, job="shards build", ttl_s=3) as held:
        time.sleep(5)  # longer than the ttl: only the renewal thread keeps it
        with pytest.raises(InputError, match="in use by another writer"):
            lease.S3Lease(s3_uri, "shards build", ttl_s=3).acquire()
        held.check()


def test_clear_unfinished_keeps_the_lease(s3_uri):
    from pipelines import lease

    storage.write_bytes(f"{s3_uri}/part-00000.parquet", b"half")  # what a killed writer left
    storage.write_bytes(f"{s3_uri}/ckpt/model.bin", b"half")
    with lease.acquire(s3_uri, job="shards build") as held:
        assert lease.clear_unfinished(held) == ["ckpt", "part-00000.parquet"]
        assert storage.list_dir(s3_uri) == ["_lease.json"]


def test_local_outputs_keep_the_flock(tmp_path):
    from pipelines import lease

    with lease.acquire(tmp_path / "out", job="convert") as held:
        assert isinstance(held, lease.LocalLease)
        with pytest.raises(InputError, match="in use"):
            with lease.acquire(tmp_path / "out", job="convert"):
                pass
    with lease.acquire(tmp_path / "out", job="convert"):
        pass
    with pytest.raises(InputError, match="s3:// only"):
        with lease.acquire("gs://bucket/out"):
            pass


# ----------------------------------------------------------------------------- shards from the object store


@pytest.fixture(scope="module")
def s3_shards(small_shards, s3_server) -> str:
    """The session's local shards, uploaded as they are."""
    uri = s3_server.uri("shards", "train")
    storage.upload_dir(small_shards, uri)
    return uri


def test_shards_from_s3_read_the_same_rows_and_batches_as_local(small_shards, s3_shards, tmp_path):
    from bert.example_order import GlobalStream
    from bert.shards import PartCache, ShardSet, read_rows

    local = ShardSet.open(small_shards)
    remote = ShardSet.open(s3_shards, cache=PartCache(tmp_path / "cache", max_bytes=1))  # cap: evict all it may
    assert remote.path == s3_shards and remote.files == local.files and remote.rows == local.rows
    assert remote.tokenizer.dir == f"{s3_shards}/tokenizer" and remote.tokenizer.fingerprint == local.tokenizer.fingerprint
    assert read_rows(remote, 50) == read_rows(local, 50)
    from bert.tokenizer import Tokenizer

    assert Tokenizer.load(remote.tokenizer_dir()).fingerprint() == local.tokenizer.fingerprint
    for rank, world in [(0, 1), (1, 2)]:
        epoch = GlobalStream(local, seed=7).epoch_size
        start = (epoch - 5) // (8 * world) * (8 * world)  # resume near the end of an epoch: it crosses into the next
        mine = GlobalStream(remote, seed=7).rank_batches(8, start, rank, world)
        theirs = GlobalStream(local, seed=7).rank_batches(8, start, rank, world)
        for _ in range(2 + epoch // (8 * world)):
            assert next(mine) == next(theirs)
    cached = sorted(p.name for p in (tmp_path / "cache").glob("*.parquet"))
    assert 1 <= len(cached) <= 2, cached  # the cap holds: only the part in use and the one read ahead


def test_a_cache_shared_across_opens_downloads_once(s3_shards, tmp_path):
    from bert.shards import PartCache, ShardSet

    cache = PartCache(tmp_path / "cache", max_bytes=1 << 30)
    shards = ShardSet.open(s3_shards, cache=cache)
    shards.prefetch(shards.files[1])
    first = shards.read_part(shards.files[1])
    stamp = {p.name: p.stat().st_ino for p in (tmp_path / "cache").glob("*.parquet")}
    again = ShardSet.open(s3_shards, cache=cache).read_part(shards.files[1])
    assert again.equals(first) and stamp == {p.name: p.stat().st_ino for p in (tmp_path / "cache").glob("*.parquet")}


def test_a_truncated_part_object_is_named(small_shards, s3_server, tmp_path):
    from bert.shards import PartCache, ShardSet

    uri = s3_server.uri("shards", "truncated")
    storage.upload_dir(small_shards, uri)
    part = storage.join(uri, "part-00001.parquet")
    data = storage.read_bytes(part)
    storage.write_bytes(part, data[: len(data) // 2])
    with pytest.raises(InputError, match=rf"^{part}: {len(data) // 2:,} bytes, _manifest.json records {len(data):,}: truncated"):
        ShardSet.open(uri, cache=PartCache(tmp_path, 1 << 30))
    storage.write_bytes(part, data[:-4] + b"XXXX")  # same size, other bytes: caught on download
    shards = ShardSet.open(uri, cache=PartCache(tmp_path, 1 << 30))
    with pytest.raises(InputError, match=rf"^{part}: .* sha256 .*truncated or overwritten"):
        shards.read_part("part-00001.parquet")
    assert not list(tmp_path.glob("*.parquet"))  # nothing unverified is cached


def test_a_lease_refused_by_the_store_is_one_line(s3_server, s3_uri):
    from pipelines import lease

    with s3_server.checking_credentials():
        with pytest.raises(InputError) as caught:
            with lease.acquire(s3_uri, job="pretrain"):
                pass
    message = str(caught.value)
    assert "\n" not in message and message.startswith(f"{s3_uri}/_lease.json: cannot put object: access denied"), message
    assert not storage.exists(f"{s3_uri}/_lease.json")


def test_a_fence_handed_to_a_worker_stops_its_late_commit(s3_uri):
    import pickle

    from pipelines import lease

    with lease.acquire(s3_uri, job="pretrain") as held:
        fence = pickle.loads(pickle.dumps(held.fence()))  # as a Ray Train worker receives it
        fence.commit(f"{s3_uri}/ckpt-1/_manifest.json", {"step": 1})
    with lease.acquire(s3_uri, job="pretrain"):  # the next run (generation 2)
        with pytest.raises(lease.LeaseLost, match="generation 1 no longer holds"):
            fence.commit(f"{s3_uri}/ckpt-2/_manifest.json", {"step": 2})
    assert storage.list_dir(s3_uri) == ["_lease.json", "ckpt-1"]


@pytest.mark.slow
@pytest.mark.integration
def test_ray_train_checkpoints_through_the_resolved_filesystem(ray_local, s3_uri):
    """Ray Train takes `storage.resolve(uri)` as its storage: the checkpoint lands on S3 (workers get
    the pickled file system, endpoint and keys included, so they need no AWS_* variables)."""
    import ray.train
    from ray.train.torch import TorchTrainer

    def loop(config):
        import tempfile

        with tempfile.TemporaryDirectory() as d:
            Path(d, "train_state.json").write_text(json.dumps({"step": 1}))
            ray.train.report({"step": 1}, checkpoint=ray.train.Checkpoint.from_directory(d))

    fs, path = storage.resolve(s3_uri)
    result = TorchTrainer(loop, scaling_config=ray.train.ScalingConfig(num_workers=1),
                          run_config=ray.train.RunConfig(name="run", storage_path=path, storage_filesystem=fs)).fit()
    written = storage.join(s3_uri, "run", storage.name(result.checkpoint.path), "train_state.json")
    assert storage.read_json(written) == {"step": 1}
