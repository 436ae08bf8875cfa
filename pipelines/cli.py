"""`bertflow` command line.

Each command group lives in its own module under `pipelines/commands/` and exposes
`register(subparsers)`; the module is imported only to build the parser, and heavy
dependencies (torch, ray, mlflow) are imported inside the handlers, so `bertflow --help`
stays fast.
"""

from __future__ import annotations

import argparse
import errno
import importlib
import os
import re
import resource
import sys
from pathlib import Path

from bert.errors import BertflowError
from pipelines import signals

# command name -> module that registers it (in the order `--help` lists them)
COMMAND_MODULES = (
    "pipelines.commands.convert",
    "pipelines.commands.tokenizer",
    "pipelines.commands.shards",
    "pipelines.commands.pretrain",
    "pipelines.commands.finetune",
    "pipelines.commands.sweep",
    "pipelines.commands.predict",
    "pipelines.commands.pipeline",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="bertflow",
        description="BERT pretraining and fine-tuning as a distributed pipeline on Ray.",
    )
    parser.add_argument("--version", action="version", version=f"bertflow {_version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name in COMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name == name:  # command group not built yet
                continue
            raise
        module.register(sub)
    return parser


def _version() -> str:
    """The installed distribution's version (pyproject.toml), e.g. 0.1.0."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("bertflow")
    except PackageNotFoundError:  # run from a source tree that was never installed
        return "unknown (not installed)"


def main(argv: list[str] | None = None) -> int:
    """Run one command. Without `argv` this is the process's entry point: it owns the process's signals
    (`pipelines/signals.py`: SIGINT/SIGTERM stop the work, one line, exit 130/143)."""
    if argv is not None:  # called as a function (tests, notebooks): signals stay the caller's
        return run_command(build_parser().parse_args(argv))
    policy = signals.install()  # first: a signal at start-up follows it too
    args = None
    try:
        try:
            args = build_parser().parse_args(argv)
            code = run_command(args)
        finally:
            policy.hold()  # from here on a signal is only noted: shutting down is never interrupted
    except BaseException:
        if policy.received is None:
            policy.settle()  # the command failed on its own; a signal now would only hide its traceback and code
            raise
        code = None  # interrupted: whatever the signal unwound into, the line below says what happened
    release_ray()
    policy.settle()  # a signal from here on is ignored: the command is over (below: one that came before it)
    if policy.received is None:
        return code
    command = f"bertflow {args.command}" if args is not None else "bertflow"
    if code is None:
        print(f"{command}: interrupted ({policy.name}): stopped; {_after_interrupt(args)}", file=sys.stderr)
    elif code == 0:
        print(f"{command}: interrupted ({policy.name}) while shutting down; the work was done", file=sys.stderr)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(policy.exit_code)  # no interpreter teardown: Ray's and torch's threads could crash it (exit 139)


def run_command(args: argparse.Namespace) -> int:
    """The command's handler, with bad input, a full disk and Ctrl-C turned into one line on stderr."""
    try:
        result = args.handler(args)
    except BertflowError as exc:
        # Errors from bad input carry a message written for people; show it without a traceback.
        print(f"bertflow {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except Exception as exc:  # only OS errors a user can act on are caught; the rest re-raised
        message = os_error_message(exc, output_of(args))
        if message is None:
            raise
        print(f"bertflow {args.command}: error: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        if signals.received() is not None:
            raise  # the process's signal policy reports it (`main`), whatever library re-raised it
        # Ctrl-C: outputs are written under temporary names or resumable checkpoints, so nothing
        # half-written is left under a final name; a re-run resumes or starts clean.
        print(f"bertflow {args.command}: interrupted", file=sys.stderr)
        return 130
    return int(result or 0)


def output_of(args: argparse.Namespace) -> str | None:
    """The output path the command was given (--out, --output, --workdir), for messages."""
    for name in ("out", "output", "workdir"):
        value = getattr(args, name, None)
        if isinstance(value, str) and value:
            return value
    return None


NAME_MAX = 255  # bytes in one path component (Linux, macOS)
TEMPORARY_SUFFIX = len(".") + len(".tmp-") + 12  # `pipelines/outdir.atomic_output` builds `.<name>.tmp-<12 hex>`
# an OS error a library or a Ray worker passed on as text: Rust's "(os error 28)" (safetensors, tokenizers),
# Python's "[Errno 28] No space left on device: '/path'" (inside a Ray worker's traceback)
_OS_ERROR_TEXT = re.compile(r"\(os error (\d+)\)|\[Errno (\d+)\][^\n']*(?:'([^'\n]+)')?")


def os_error_of(exc: BaseException) -> tuple[int, str | None] | None:
    """(errno, file name) of an OS error, also when a library wrapped it (its cause, or Rust's "(os error N)")."""
    seen = exc
    while seen is not None:
        if isinstance(seen, OSError) and seen.errno is not None:
            return seen.errno, seen.filename
        if isinstance(seen, RuntimeError) and str(seen).startswith("Symlink loop from "):  # pathlib before 3.13
            return errno.ELOOP, str(seen).removeprefix("Symlink loop from ").strip("'")
        match = _OS_ERROR_TEXT.search(str(seen))
        if match:
            return int(match.group(1) or match.group(2)), match.group(3)
        seen = seen.__cause__ or seen.__context__
    return None


def os_error_message(exc: BaseException, output: str | None) -> str | None:
    """One line naming the cause of an OS error a user can act on (full disk, file-size limit, path too long,
    symlink loop, read-only or forbidden path); None for the others, which keep their traceback."""
    found = os_error_of(exc)
    if found is None:
        return None
    code, filename = found
    where = filename or output or "the output"
    if code in (errno.ENOSPC, errno.EDQUOT):
        return (f"no space left on {where} ({os.strerror(code)}); nothing half-written is kept under a final "
                "name: free some space and re-run")
    if code == errno.EFBIG:
        limit = resource.getrlimit(resource.RLIMIT_FSIZE)[0]
        shown = "unlimited" if limit == resource.RLIM_INFINITY else f"{limit:,} bytes"
        return (f"writing {where} went past the file-size limit (ulimit -f: {shown}); nothing half-written is "
                "kept under a final name: raise the limit and re-run")
    if code == errno.ENAMETOOLONG:
        name = Path(output).name if output else Path(where).name
        return (f"{output or where}: the name ({len(name.encode())} bytes) is too long for the file system once "
                f"bertflow adds its temporary and lock suffixes ('.NAME.tmp-' + 12 characters): use at most "
                f"{NAME_MAX - TEMPORARY_SUFFIX} bytes ({os.strerror(code)})")
    if code == errno.ELOOP:
        return f"{where}: the path goes round a loop of symbolic links; choose another path"
    if code in (errno.EROFS, errno.EACCES, errno.EPERM):
        return f"{where}: {os.strerror(code)}; check its permissions, or choose another path"
    return None


def release_ray() -> None:
    """Disconnect from Ray if this process connected (a private local runtime stops with it)."""
    ray = sys.modules.get("ray")
    if ray is not None and ray.is_initialized():
        try:
            ray.shutdown()
        except Exception as exc:  # noqa: BLE001 - the command's work is over either way
            print(f"bertflow: warning: Ray did not shut down cleanly: {exc}", file=sys.stderr)


def _after_interrupt(args: argparse.Namespace | None) -> str:
    if args is None:
        return "nothing was done"
    if args.command in ("pretrain", "finetune", "sweep", "run"):
        return "re-run the same command to resume"
    output = output_of(args)
    if args.command == "shards" and output and _exists(output):  # pass 1 had finished: the build keeps it
        return f"{output} holds the unfinished build: re-run the same command to resume"
    return f"nothing was written to {output}" if output else "nothing was written"


def _exists(location: str) -> bool:
    from bert import storage

    try:
        return storage.exists(location)
    except BertflowError:
        return False


if __name__ == "__main__":
    sys.exit(main())
