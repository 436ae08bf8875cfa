"""The one storage layer: every path a user gives is a local path or a URI (DESIGN.md, principle 11).

    resolve("out/shards")              -> (LocalFileSystem, "/abs/out/shards")
    resolve("file:///data/corpus")     -> (LocalFileSystem, "/data/corpus")
    resolve("s3://bucket/runs/x")      -> (S3FileSystem, "bucket/runs/x")
    resolve("gs://bucket/runs/x")      -> (GcsFileSystem, "bucket/runs/x")   (any scheme pyarrow knows)

Why `pyarrow.fs` and not fsspec: pyarrow is already a dependency (parquet I/O), Ray Train takes a
`pyarrow.fs.FileSystem` as `RunConfig(storage_filesystem=...)` and Ray Data reads and writes
through one (`filesystem=`), so the file system a job resolves here is the very object handed to
Ray: one client, one set of credentials and timeouts, no second I/O path. Its S3 client is the
AWS C++ SDK (multipart uploads, ranged reads for parquet footers, retries) with no extra package.

S3 and S3-compatible stores (MinIO, R2, the test server) are configured the way boto3 and the AWS
CLI read the environment: the endpoint from `AWS_ENDPOINT_URL_S3`, else `AWS_ENDPOINT_URL` (its
scheme picks http or https; pyarrow does not read these variables itself), the region from
`AWS_REGION` / `AWS_DEFAULT_REGION` (else, on AWS, the bucket's own region, asked once), keys from `AWS_ACCESS_KEY_ID` / `AWS_SECRET_ACCESS_KEY` /
`AWS_SESSION_TOKEN`; with no keys set, the SDK's default chain (profile, IAM instance profile).
Connections time out after `CONNECT_TIMEOUT_S` and are tried `ATTEMPTS` times, so an unreachable
endpoint fails in seconds; every failure becomes one `InputError` line naming the URI and the
cause (unreachable endpoint, credentials refused, bucket missing, object missing).

Publishing: `open_write` / `write_bytes` / `write_json` make an object visible only complete —
locally a temporary sibling renamed into place, on S3 a single PUT (or a multipart upload, which
S3 also shows only once completed) of data already spooled to a local file, so a failure in the
middle publishes nothing. There is no atomic rename of a directory on an object store: a
directory output is complete when its manifest, written last, exists (DESIGN.md, "Contracts").
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import io
import json
import os
import re
import shutil
import tempfile
import threading
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any, Union
from urllib.parse import unquote, urlsplit

import pyarrow as pa
import pyarrow.fs as pafs

from bert.errors import InputError

Location = Union[str, "os.PathLike[str]"]

CONNECT_TIMEOUT_S = 3.0  # per connection attempt
REQUEST_TIMEOUT_S = 30.0  # a stalled transfer
ATTEMPTS = 3  # AWS standard retry strategy (exponential backoff), first try included
LOCAL = pafs.LocalFileSystem()
_URI = re.compile(r"^([a-zA-Z][a-zA-Z0-9+.-]*)://(.*)$")
_filesystems: dict[tuple, pafs.FileSystem] = {}
_filesystems_lock = threading.Lock()
_regions: dict[str, str] = {}


# ----------------------------------------------------------------------------- resolving


def scheme(location: Location) -> str:
    """"s3", "gs", ... for a URI; "file" for a local path or a file:// URI."""
    match = _URI.match(os.fspath(location))
    return match.group(1).lower() if match else "file"


def is_remote(location: Location) -> bool:
    """True for an object-store URI (anything but a local path or file://)."""
    return scheme(location) != "file"


def local_path(location: Location) -> Path | None:
    """The local path a location names, or None for an object-store URI."""
    text = os.fspath(location)
    if scheme(text) != "file":
        return None
    if _URI.match(text):
        text = unquote(urlsplit(text).path)
    return Path(text).expanduser()


def resolve(location: Location) -> tuple[pafs.FileSystem, str]:
    """The file system holding `location` and the path inside it (no trailing slash)."""
    local = local_path(location)
    if local is not None:
        return LOCAL, str(local.absolute())
    text = os.fspath(location)
    kind, rest = _URI.match(text).group(1).lower(), _URI.match(text).group(2)
    path = rest.rstrip("/")
    if not path or path.startswith("/"):
        raise InputError(f"{text}: names no bucket (expected {kind}://<bucket>/<path>)")
    if kind in ("s3", "s3a"):
        return _s3(path.split("/")[0]), path
    with _errors(text, "open the file system"):
        fs, fs_path = pafs.FileSystem.from_uri(text)
    return fs, fs_path.rstrip("/")


def s3_options(env: Any = None) -> dict[str, Any]:
    """`S3FileSystem` arguments read from the environment the way boto3 and the AWS CLI read it."""
    env = os.environ if env is None else env
    options: dict[str, Any] = {"connect_timeout": CONNECT_TIMEOUT_S, "request_timeout": REQUEST_TIMEOUT_S}
    name = "AWS_ENDPOINT_URL_S3" if env.get("AWS_ENDPOINT_URL_S3") else "AWS_ENDPOINT_URL"
    endpoint = env.get(name)
    if endpoint:
        parts = urlsplit(endpoint)
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise InputError(f"{name}={endpoint!r}: expected http(s)://host[:port]")
        options.update(endpoint_override=parts.netloc, scheme=parts.scheme)
    region = env.get("AWS_REGION") or env.get("AWS_DEFAULT_REGION")
    if region or endpoint:
        options["region"] = region or "us-east-1"  # S3-compatible servers take any region
    if env.get("AWS_ACCESS_KEY_ID") and env.get("AWS_SECRET_ACCESS_KEY"):
        options.update(access_key=env["AWS_ACCESS_KEY_ID"], secret_key=env["AWS_SECRET_ACCESS_KEY"],
                       session_token=env.get("AWS_SESSION_TOKEN") or None)
    return options


def _s3(bucket: str) -> pafs.FileSystem:
    options = s3_options()
    if "region" not in options:  # AWS itself, no region set: ask where the bucket lives (once)
        options["region"] = _bucket_region(bucket)
    key = tuple(sorted(options.items()))  # the environment may change (tests, a job's env)
    with _filesystems_lock:
        if key not in _filesystems:
            strategy = pafs.AwsStandardS3RetryStrategy(max_attempts=ATTEMPTS)
            _filesystems[key] = pafs.S3FileSystem(**options, retry_strategy=strategy)
        return _filesystems[key]


def _bucket_region(bucket: str) -> str:
    if bucket not in _regions:
        try:
            _regions[bucket] = pafs.resolve_s3_region(bucket)
        except (OSError, pa.ArrowException):
            _regions[bucket] = "us-east-1"  # the SDK's own default; the first real request names the failure
    return _regions[bucket]


def join(base: Location, *parts: str) -> Path | str:
    """`base/part/...`: a `Path` for a local base, a URI string for a URI base."""
    text = os.fspath(base)
    if not _URI.match(text):
        return Path(text, *parts)
    pieces = [p.strip("/") for p in parts if p.strip("/")]
    return "/".join([text.rstrip("/"), *pieces])


def name(location: Location) -> str:
    """The last component of a path or URI."""
    return os.fspath(location).rstrip("/").rsplit("/", 1)[-1]


# ----------------------------------------------------------------------------- errors


def explain(exc: BaseException, location: str) -> str:
    """One line: what went wrong, in words, from a pyarrow / AWS SDK / botocore error."""
    text = " ".join(str(exc).split())
    if re.search(r"NETWORK_CONNECTION|curlCode|connect to|Couldn't resolve|timed? ?out|Connection refused", text, re.I):
        endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or "the default endpoint"
        return f"cannot reach the object store at {endpoint} (check AWS_ENDPOINT_URL and the network)"
    if re.search(r"ACCESS_DENIED|AccessDenied|InvalidAccessKeyId|SignatureDoesNotMatch|ExpiredToken|"
                 r"InvalidToken|HTTP status 403|Forbidden", text):
        return ("access denied: check the credentials (AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY / "
                "AWS_SESSION_TOKEN, or the instance profile) and the bucket policy")
    if re.search(r"Unable to locate credentials|NoCredentials", text):
        return ("no credentials found: set AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY, "
                "or run on a node with an instance profile")
    if re.search(r"NoSuchBucket|NO_SUCH_BUCKET|bucket does not exist", text, re.I):
        return f"bucket {_bucket(location)} does not exist"
    return text[:300]


def _bucket(location: str) -> str:
    match = _URI.match(location)
    return match.group(2).strip("/").split("/")[0] if match else location


def _missing(location: str) -> InputError:
    """`location` does not exist; for a URI, say whether its bucket is what is missing."""
    if is_remote(location):
        fs, _ = resolve(location)
        with contextlib.suppress(OSError, pa.ArrowException):
            if fs.get_file_info(_bucket(location)).type == pafs.FileType.NotFound:
                return InputError(f"{location}: bucket {_bucket(location)} does not exist")
    return InputError(f"{location}: does not exist")


@contextlib.contextmanager
def _errors(location: Location, doing: str) -> Iterator[None]:
    """Turn a storage failure into one `InputError` line naming `location` and the cause."""
    text = os.fspath(location)
    try:
        yield
    except InputError:
        raise
    except FileNotFoundError:
        raise _missing(text) from None
    except (OSError, pa.ArrowException) as exc:
        raise InputError(f"{text}: cannot {doing}: {explain(exc, text)}") from None


# ----------------------------------------------------------------------------- asking


def info(location: Location) -> pafs.FileInfo:
    fs, path = resolve(location)
    with _errors(location, "read"):
        return fs.get_file_info(path)


def exists(location: Location) -> bool:
    return info(location).type != pafs.FileType.NotFound


def check_bucket(location: Location) -> None:
    """Refuse (one line) a URI whose bucket does not exist, or whose store cannot be reached or refuses the
    credentials, before anything is written there; nothing to check for a local path."""
    if not is_remote(location):
        return
    fs, path = resolve(location)
    bucket = path.split("/")[0]
    with _errors(location, "read"):
        found = fs.get_file_info(bucket)
    if found.type == pafs.FileType.NotFound:
        raise InputError(f"{os.fspath(location)}: bucket {bucket} does not exist")


def is_file(location: Location) -> bool:
    return info(location).type == pafs.FileType.File


def is_dir(location: Location) -> bool:
    """A directory, or on an object store a prefix holding at least one object."""
    return info(location).type == pafs.FileType.Directory


def size(location: Location) -> int:
    found = info(location)
    if found.type != pafs.FileType.File:
        raise _missing(os.fspath(location)) if found.type == pafs.FileType.NotFound else \
            InputError(f"{os.fspath(location)}: is a directory, expected a file")
    return found.size


def list_dir(location: Location) -> list[str]:
    """The names directly under a directory (or prefix), sorted."""
    return sorted(name(f.path) for f in _infos(location, recursive=False))


def walk_files(location: Location) -> list[tuple[str, int]]:
    """(relative path, size) of every file under a directory, sorted."""
    return [(rel, size) for rel, size, _ in walk_file_infos(location)]


def walk_file_infos(location: Location) -> list[tuple[str, int, int | None]]:
    """(relative path, size, mtime_ns) of every file under a directory, sorted; on a store the mtime is the
    object's Last-Modified (None where the store gives none)."""
    _, root = resolve(location)
    return sorted((f.path[len(root) + 1:], f.size, f.mtime_ns) for f in _infos(location, recursive=True)
                  if f.type == pafs.FileType.File)


def _infos(location: Location, recursive: bool) -> list[pafs.FileInfo]:
    fs, path = resolve(location)
    with _errors(location, "list"):
        found = fs.get_file_info(path)
        if found.type == pafs.FileType.NotFound:
            raise _missing(os.fspath(location))
        if found.type != pafs.FileType.Directory:
            raise InputError(f"{os.fspath(location)}: is a file, expected a directory")
        return fs.get_file_info(pafs.FileSelector(path, recursive=recursive))


# ----------------------------------------------------------------------------- reading


@contextlib.contextmanager
def open_read(location: Location, mode: str = "rb", encoding: str = "utf-8",
              errors: str = "strict") -> Iterator[IO[Any]]:
    """A buffered reader of the file's bytes ("rb") or text ("r"/"rt"); `.gz` is decompressed.

    gzip is read by Python's `gzip` module on every file system, so a truncated `.gz` fails the
    same way (EOFError / zlib.error) locally and remotely.
    """
    if mode not in ("rb", "r", "rt"):
        raise ValueError(f"open_read: mode {mode!r}, expected 'rb', 'r' or 'rt'")
    fs, path = resolve(location)
    with _errors(location, "open for reading"):
        raw = open(path, "rb") if fs is LOCAL else fs.open_input_stream(path, compression=None)
    with contextlib.ExitStack() as stack:
        stack.callback(raw.close)
        stream: IO[bytes] = raw if fs is LOCAL else io.BufferedReader(raw, 1 << 20)  # type: ignore[arg-type]
        if os.fspath(location).endswith(".gz"):
            stream = io.BufferedReader(gzip.GzipFile(fileobj=stream, mode="rb"), 1 << 16)  # type: ignore[arg-type]
        yield stream if mode == "rb" else io.TextIOWrapper(stream, encoding=encoding, errors=errors)


def open_random(location: Location) -> pa.NativeFile:
    """A seekable reader (parquet footers, ranged reads): `pq.ParquetFile(storage.open_random(uri))`."""
    fs, path = resolve(location)
    with _errors(location, "open for reading"):
        return fs.open_input_file(path)


def read_bytes(location: Location) -> bytes:
    fs, path = resolve(location)
    with _errors(location, "read"):
        with fs.open_input_stream(path, compression=None) as f:
            return f.read()


def read_text(location: Location, encoding: str = "utf-8") -> str:
    data = read_bytes(location)
    try:
        return data.decode(encoding)
    except UnicodeDecodeError as exc:
        raise InputError(f"{os.fspath(location)}: not {encoding} text ({exc})") from None


def read_json(location: Location) -> Any:
    try:
        return json.loads(read_text(location))
    except json.JSONDecodeError as exc:
        raise InputError(f"{os.fspath(location)}: not valid JSON ({exc})") from None


def sha256(location: Location, chunk_size: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    fs, path = resolve(location)
    with _errors(location, "read"):
        with fs.open_input_stream(path, compression=None) as f:
            while chunk := f.read(chunk_size):
                digest.update(chunk)
    return digest.hexdigest()


# ----------------------------------------------------------------------------- publishing


@contextlib.contextmanager
def open_write(location: Location) -> Iterator[IO[bytes]]:
    """Write one file; it appears under its name only when the block ends without error.

    Local: a temporary sibling `.<name>.tmp-<id>`, renamed into place. Remote: a local spool
    file, uploaded when the block ends (one PUT, or a multipart upload S3 shows only once
    completed); a failure in the block uploads nothing.
    """
    fs, path = resolve(location)
    if fs is LOCAL:
        final = Path(path)
        with _errors(location, "write"):
            final.parent.mkdir(parents=True, exist_ok=True)
        tmp = final.with_name(f".{final.name}.tmp-{uuid.uuid4().hex[:12]}")
        try:
            with open(tmp, "wb") as f:
                yield f
            os.replace(tmp, final)
        finally:
            tmp.unlink(missing_ok=True)
        return
    with tempfile.TemporaryDirectory(prefix="bertflow-upload-") as spool:
        local = Path(spool) / "object"
        with open(local, "wb") as f:
            yield f
        with _errors(location, "write"):
            pafs.copy_files(str(local), path, source_filesystem=LOCAL, destination_filesystem=fs,
                            chunk_size=8 << 20, use_threads=False)


def write_bytes(location: Location, data: bytes) -> None:
    """Publish `data` at `location` (complete or not at all)."""
    fs, path = resolve(location)
    if fs is LOCAL:
        with open_write(location) as f:
            f.write(data)
        return
    with _errors(location, "write"):
        # compression=None: pyarrow would otherwise infer it from the name and gzip a `.gz` name's bytes again
        with fs.open_output_stream(path, compression=None) as f:  # the bytes are all here: one upload
            f.write(data)


def write_text(location: Location, text: str) -> None:
    write_bytes(location, text.encode("utf-8"))


def write_json(location: Location, data: Any) -> None:
    """Publish JSON (indented, sorted keys) at `location`; readers see the old file or the new one."""
    write_text(location, json.dumps(data, indent=2, sort_keys=True) + "\n")


def make_dirs(location: Location) -> None:
    """Create a local directory (and parents); nothing to do on an object store (no directories)."""
    fs, path = resolve(location)
    if fs is LOCAL:
        with _errors(location, "create"):
            Path(path).mkdir(parents=True, exist_ok=True)


def upload_dir(local_dir: Location, location: Location) -> None:
    """Copy a local directory's files to `location` (objects under the prefix on a store)."""
    src = local_path(local_dir)
    if src is None or not src.is_dir():
        raise InputError(f"{os.fspath(local_dir)}: not a local directory")
    fs, path = resolve(location)
    with _errors(location, "write"):
        pafs.copy_files(str(src.absolute()), path, source_filesystem=LOCAL, destination_filesystem=fs,
                        chunk_size=8 << 20, use_threads=True)


def download(location: Location, local: Location) -> Path:
    """Copy a file or a directory at `location` to the local path `local`; returns it."""
    dest = local_path(local)
    if dest is None:
        raise InputError(f"{os.fspath(local)}: expected a local path to download into")
    fs, path = resolve(location)
    kind = info(location).type
    if kind == pafs.FileType.NotFound:
        raise _missing(os.fspath(location))
    with _errors(location, "download"):
        (dest.parent if kind == pafs.FileType.File else dest).mkdir(parents=True, exist_ok=True)
        pafs.copy_files(path, str(dest.absolute()), source_filesystem=fs, destination_filesystem=LOCAL,
                        chunk_size=8 << 20, use_threads=True)
    return dest


def remove(location: Location) -> None:
    """Delete a file, or a directory / prefix and everything under it; absent is fine.

    Only for a command's own output, under its lock or lease (DESIGN.md, principle 10).
    """
    fs, path = resolve(location)
    kind = info(location).type
    with _errors(location, "delete"):
        if kind == pafs.FileType.Directory:
            if fs is LOCAL:
                shutil.rmtree(path)
            else:
                fs.delete_dir(path)
        elif kind == pafs.FileType.File:
            fs.delete_file(path)


def copy(source: Location, destination: Location) -> None:
    """Copy a file or a directory's files from `source` to `destination`, on one store or across two
    (a copy inside one S3 bucket is a server-side copy per object: no bytes pass through this machine)."""
    src_fs, src = resolve(source)
    dst_fs, dst = resolve(destination)
    kind = info(source).type
    if kind == pafs.FileType.NotFound:
        raise _missing(os.fspath(source))
    files = [("", 0)] if kind == pafs.FileType.File else walk_files(source)
    with _errors(destination, "write"):
        for rel, _ in files:
            target = f"{dst}/{rel}" if rel else dst
            if src_fs is LOCAL and dst_fs is LOCAL:
                Path(target).parent.mkdir(parents=True, exist_ok=True)
            if src_fs is dst_fs:
                src_fs.copy_file(f"{src}/{rel}" if rel else src, target)
            else:
                pafs.copy_files(f"{src}/{rel}" if rel else src, target, source_filesystem=src_fs,
                                destination_filesystem=dst_fs, chunk_size=8 << 20)


# ----------------------------------------------------------------------------- the local side of a remote location

ENVIRONMENT = ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_REGION", "AWS_DEFAULT_REGION", "AWS_ACCESS_KEY_ID",
               "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE", "AWS_EC2_METADATA_DISABLED", "BERTFLOW_CACHE")


def environment() -> dict[str, str]:
    """The variables that say which store and credentials this process uses (for worker processes that
    must see the same store: a Ray Train run's `worker_runtime_env`)."""
    return {name: os.environ[name] for name in ENVIRONMENT if os.environ.get(name)}


def cache_dir(kind: str, location: Location) -> Path:
    """A local dir for a copy of (or the local side of) the remote `location`: `$BERTFLOW_CACHE/<kind>/<hash>`
    (default `~/.cache/bertflow`), the same for the same URI on one machine."""
    root = Path(os.environ.get("BERTFLOW_CACHE") or Path.home() / ".cache" / "bertflow")
    digest = hashlib.sha256(os.fspath(location).rstrip("/").encode()).hexdigest()[:16]
    return root / kind / f"{name(location)}-{digest}"


@contextlib.contextmanager
def named(location: Location, local: Location) -> Iterator[None]:
    """Errors raised while reading `local`, the local copy of `location`, name `location` (the URI the user gave)."""
    try:
        yield
    except InputError as exc:
        text, here = str(exc), os.fspath(local)
        if not is_remote(location) or here not in text:
            raise
        raise type(exc)(text.replace(here, os.fspath(location).rstrip("/"))) from None


METADATA_BYTES = 16 << 20  # what `metadata_copy` downloads per file: configs and vocabularies, not weights


def metadata_copy(location: Location, kind: str = "inputs", limit: int = METADATA_BYTES) -> Path:
    """A local stand-in for the directory `location` to inspect, never to load: its files of up to `limit`
    bytes (configs, vocabularies, tokenizer models) copied, each larger one (weights) an empty file of
    the same name, so a check that a checkpoint is complete and readable costs kilobytes, not the model.
    A local `location` is itself. Named by the listing, like `local_copy`, under `<kind>-metadata`."""
    local = local_path(location)
    if local is not None:
        return local
    listing = walk_files(location)
    if not listing:
        raise _missing(os.fspath(location))
    version = hashlib.sha256(json.dumps([listing, limit]).encode()).hexdigest()[:12]
    base = cache_dir(f"{kind}-metadata", location)
    target = base.with_name(f"{base.name}-{version}")
    if target.exists():
        return target

    def fill(tmp: Path) -> None:
        for rel, nbytes in listing:
            dest = tmp / rel
            dest.parent.mkdir(parents=True, exist_ok=True)
            dest.write_bytes(read_bytes(join(location, rel)) if nbytes <= limit else b"")

    _put_in_place(target, fill)
    return target


def _put_in_place(target: Path, fill: Callable[[Path], Any]) -> None:
    """`fill` a fresh temporary dir beside `target`, then rename it to `target`: a reader sees the whole copy
    or none; when processes race, the first copy in place stays."""
    tmp = target.with_name(f".{target.name}.tmp-{uuid.uuid4().hex[:12]}")
    try:
        fill(tmp)
        try:
            os.rename(tmp, target)
        except OSError:  # another process put its copy in place meanwhile: use that one
            if not target.exists():
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def local_copy(location: Location, kind: str = "inputs") -> Path:
    """A local path holding `location`: itself when it is local, else a copy in the cache (for libraries
    that need files on disk: safetensors, tokenizers, torch.load).

    The copy is named by the remote listing (names and sizes), so an unchanged location is downloaded
    once, a changed one into a new copy, and a copy in use is never replaced under its reader; processes
    racing for one location each download, and the first copy in place stays.
    """
    local = local_path(location)
    if local is not None:
        return local
    directory = is_dir(location)
    listing = walk_files(location) if directory else [("", size(location))]
    version = hashlib.sha256(json.dumps(listing).encode()).hexdigest()[:12]
    base = cache_dir(kind, location)
    target = base.with_name(f"{base.name}-{version}")  # a file keeps its name inside it
    found = target if directory else target / name(location)
    if found.exists():
        return found
    _put_in_place(target, lambda tmp: download(location, tmp if directory else tmp / name(location)))
    return found
