"""One signal policy for every `bertflow` command: SIGINT and SIGTERM stop the work, Ray is released, one line.

The process entry point (`pipelines.cli.main()` without arguments) installs it before any work:

* the first SIGINT (Ctrl-C) or SIGTERM (`kill`, a scheduler) raises `Interrupted` in the main thread,
  wherever the command is (start-up, reading, waiting on Ray Train or Ray Data, writing). It is a
  `KeyboardInterrupt`, so the code that already cleans up on Ctrl-C (temporaries removed, locks
  released, Ray tasks cancelled) does so for SIGTERM too;
* every later signal, and any signal while the command shuts down, is only noted: cleaning up is
  never interrupted, and no traceback is printed during it;
* inside `deferred()` (taking a lock, creating a temporary, removing one) the first signal is noted
  and raised when the block ends, so a signal never lands between creating a thing and the `try`
  that removes it; after `deferred(commit=True)` (the rename that publishes a one-piece output) the
  work is done, and a signal is only noted;
* the command then prints one line, disconnects from Ray (stopping a private local runtime), and the
  process exits 130 (SIGINT) or 143 (SIGTERM) at once, without the interpreter's teardown (where
  Ray's and torch's threads could crash it: exit 139);
* once the command is over and Ray released, both signals are ignored (`settle()`): a signal that
  lands after that leaves the command's own exit code (Python's teardown would otherwise die of it).

`ray.init` installs a SIGTERM handler of its own (and Ray's C++ core a failure-signal handler that
dumps a stack and aborts, exit 134), so `pipelines.ray_runtime.ensure_ray` calls `reinstall()`
after it. Ray Train's `fit()` replaces the SIGINT handler while it runs with its own graceful abort
(it stops the workers, then the driver's wait fails): the policy still learns of that signal from
Python's wakeup fd, which every Python-level handler feeds, and reports it the same way. Called as a function (`main([...])`, tests, notebooks), bertflow leaves the process's
signals to its caller.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
from collections.abc import Iterator

EXIT_CODES = {signal.SIGINT: 130, signal.SIGTERM: 143}
NAMES = {signal.SIGINT: "SIGINT", signal.SIGTERM: "SIGTERM"}


class Interrupted(KeyboardInterrupt):
    """Raised in the main thread by the first SIGINT or SIGTERM."""

    def __init__(self, signum: int):
        super().__init__(NAMES.get(signum, str(signum)))
        self.signum = signum


class SignalPolicy:
    """The installed policy: which signal arrived first (None: none yet), and whether one may still raise."""

    def __init__(self) -> None:
        self._received: int | None = None
        self._raising = True
        self._wakeup: int | None = None  # read end of the pipe Python writes each caught signal's number into
        self._deferring = 0  # depth of `deferred()` blocks the main thread is in
        self._pending = False  # a signal arrived inside one: raised when the outermost block ends

    @property
    def received(self) -> int | None:
        """The first SIGINT/SIGTERM, whichever handler took it (ours, or one a library put in its place)."""
        if self._received is None and self._wakeup is not None:
            try:
                numbers = os.read(self._wakeup, 512)
            except (BlockingIOError, OSError):
                numbers = b""
            self._received = next((n for n in numbers if n in EXIT_CODES), None)
        return self._received

    @property
    def exit_code(self) -> int:
        return EXIT_CODES.get(self.received, 128 + int(self.received or 0))

    @property
    def name(self) -> str:
        return NAMES.get(self.received, str(self.received))

    def handle(self, signum: int, frame) -> None:
        first = self._received is None
        if first:
            self._received = signum
        if first and self._raising:
            if self._deferring:
                self._pending = True
                return
            self._raising = False  # later signals are noted, never raised: cleanup runs to its end
            raise Interrupted(signum)

    @contextlib.contextmanager
    def deferred(self, *, commit: bool = False) -> Iterator[None]:
        """A block no signal interrupts; a signal that arrived in it is raised when it ends. With `commit` the
        block finishes the command's work (a rename that publishes its output): after it a signal is only
        noted, and the command reports that the work was done."""
        self._deferring += 1
        try:
            yield
        except BaseException:
            self._leave(raise_pending=False)  # the block's own exception goes on; the signal is already noted
            raise
        if commit:
            self._raising = False
        self._leave(raise_pending=True)

    def _leave(self, raise_pending: bool) -> None:
        self._deferring -= 1
        if self._deferring or not self._pending:
            return
        self._pending = False
        raising, self._raising = self._raising, False
        if raise_pending and raising:
            raise Interrupted(self._received)

    def install(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return
        for signum in EXIT_CODES:
            signal.signal(signum, self.handle)
        if self._wakeup is None:
            read, write = os.pipe()
            os.set_blocking(read, False)
            os.set_blocking(write, False)
            signal.set_wakeup_fd(write, warn_on_full_buffer=False)
            self._wakeup = read

    def hold(self) -> None:
        """From now on a signal is only noted (the command is shutting down; nothing may interrupt that)."""
        self._raising = False

    def settle(self) -> None:
        """The command is over: ignore SIGINT and SIGTERM from now on. Without this a signal during the
        interpreter's teardown, after Python put back each signal's default action, killed the process
        (exit -15 after the work was done and reported). `received` still reports one that came before."""
        self.hold()
        if threading.current_thread() is threading.main_thread():
            for signum in EXIT_CODES:
                signal.signal(signum, signal.SIG_IGN)  # Python leaves an ignored signal ignored at teardown


_policy: SignalPolicy | None = None


def install() -> SignalPolicy:
    """Install the policy for this process (the CLI's entry point does, once)."""
    global _policy
    _policy = SignalPolicy()
    _policy.install()
    return _policy


def reinstall() -> None:
    """Put the policy's handlers back after a library replaced them (`ray.init`); nothing if none is installed."""
    if _policy is not None:
        _policy.install()


def deferred(*, commit: bool = False) -> contextlib.AbstractContextManager[None]:
    """`SignalPolicy.deferred` of the installed policy; without one (called as a function, in a Ray worker, or
    off the main thread) a plain block: signals are then the caller's."""
    if _policy is None or threading.current_thread() is not threading.main_thread():
        return contextlib.nullcontext()
    return _policy.deferred(commit=commit)


def received() -> int | None:
    """The signal the installed policy caught (None: none, or no policy installed)."""
    return _policy.received if _policy is not None else None
