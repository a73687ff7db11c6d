"""Run untrusted candidate programs for scoring: one process each, with limits, and nothing left behind.

A `Sandbox` keeps a pool of long-lived workers (`worker.py`, one per core by default), each a small Python
process started with a minimal environment that forks a fresh child per program: forking a pre-imported
interpreter costs about a millisecond, where starting one costs tens (benchmarks/code_eval.py measures
both). What each child gets (rlimits, temporary folder, uid, namespaces) is in worker.py and docs/code_eval.md;
this module hands out programs, reads the verdicts and replaces a worker that dies or stops answering.
It limits damage from careless or broken code; it is not a security boundary against a determined attacker.
"""

from __future__ import annotations

import contextlib
import json
import os
import selectors
import signal
import subprocess
import sys
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

WORKER = Path(__file__).with_name("worker.py")
# A worker that has not answered this long after a program's own timeout is replaced (its cleanup hung).
GRACE_SECONDS = 30.0
MINIMAL_ENV = {"PATH": "/usr/local/bin:/usr/bin:/bin", "LANG": "C.UTF-8", "HOME": "/nonexistent"}


@dataclass(frozen=True)
class Outcome:
    """A program's verdict: `reason` is "passed" or why not ("timeout", "memory limit", "exit code 3", ...)."""

    passed: bool
    reason: str


def _check(name: str, value: Any, kind: type, low: float, high: float) -> None:
    if isinstance(value, bool) or not isinstance(value, kind | int) or not low <= value <= high:
        raise ValueError(f"Sandbox {name}={value!r}: expected a {kind.__name__} in [{low}, {high}]")


class _Worker:
    """One worker process and the program it is running."""

    def __init__(self, config: dict[str, Any]) -> None:
        self.process = subprocess.Popen(
            [sys.executable, "-I", str(WORKER), json.dumps({**config, "parent": os.getpid()})],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            env=MINIMAL_ENV,
            cwd="/",
            start_new_session=True,
        )
        self.buffer = b""
        self.index: int | None = None  # the program it runs now
        self.group: int | None = None  # that program's process group
        self.deadline = 0.0
        self.hello = self._first_message()

    def _first_message(self) -> dict[str, Any]:
        messages: list[dict[str, Any]] | None = []
        while messages == []:
            messages = self.messages()
        if messages is None or "hello" not in messages[0]:
            self.kill()
            raise RuntimeError(f"the sandbox worker ({WORKER}) did not start: it said {messages!r}")
        return messages[0]["hello"]

    def fileno(self) -> int:
        return self.process.stdout.fileno()

    def send(self, index: int, program: str, timeout: float) -> None:
        self.index, self.group = index, None
        self.deadline = time.monotonic() + timeout + GRACE_SECONDS
        self.process.stdin.write(json.dumps({"program": program}).encode() + b"\n")
        self.process.stdin.flush()

    def messages(self) -> list[dict[str, Any]] | None:
        """The complete lines it has written; None when it has exited."""
        data = os.read(self.fileno(), 1 << 16)
        if not data:
            return None
        self.buffer += data
        *lines, self.buffer = self.buffer.split(b"\n")
        return [json.loads(line) for line in lines]

    def kill(self) -> None:
        """The worker and whatever its current program started (by group: nothing re-parents to us)."""
        for group in (self.group, self.process.pid):
            if group is not None:
                with contextlib.suppress(OSError):
                    os.killpg(group, signal.SIGKILL)
        self.process.kill()
        self.process.wait()
        for stream in (self.process.stdin, self.process.stdout):
            with contextlib.suppress(OSError):
                stream.close()

    def close(self) -> None:
        with contextlib.suppress(OSError, subprocess.TimeoutExpired):  # a dead or stuck worker is killed below
            self.process.stdin.close()  # the worker's loop ends, it removes its folder
            self.process.wait(timeout=5)
        self.kill()


class Sandbox:
    """Runs programs in parallel, each in its own limited process; a context manager that closes its workers."""

    def __init__(
        self,
        timeout: float = 10.0,
        memory_mb: int = 1024,
        workers: int | None = None,
        max_output: int = 64_000,
        max_processes: int = 64,
        max_file_mb: int = 16,
    ) -> None:
        _check("timeout", timeout, float, 0.01, 3600)
        _check("memory_mb", memory_mb, int, 64, 1 << 20)
        _check("max_output", max_output, int, 1, 1 << 30)
        _check("max_processes", max_processes, int, 1, 100_000)
        _check("max_file_mb", max_file_mb, int, 1, 1 << 20)
        if workers is None:
            workers = len(os.sched_getaffinity(0))
        _check("workers", workers, int, 1, 1024)
        if sys.platform != "linux":
            raise RuntimeError(f"the sandbox needs Linux (rlimits, /proc, namespaces); this is {sys.platform}")
        self.timeout, self.workers = float(timeout), workers
        self._config = {
            "timeout": self.timeout,
            "memory_bytes": memory_mb << 20,
            "file_bytes": max_file_mb << 20,
            "max_output": max_output,
            # the programs running at once share the count (as nobody, or as the user)
            "nproc": max_processes + workers,
        }
        self._pool: list[_Worker] = []

    def __enter__(self) -> Sandbox:
        self._fill()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        with contextlib.suppress(Exception):  # at interpreter shutdown: the workers die with us (PDEATHSIG)
            self.close()

    @property
    def isolation(self) -> dict[str, Any]:
        """What the workers could set up here: network namespace or blocked sockets, uid drop, PID namespaces."""
        self._fill()
        return dict(self._pool[0].hello)

    def close(self) -> None:
        for worker in getattr(self, "_pool", []):
            worker.close()
        self._pool = []

    def _fill(self) -> None:
        while len(self._pool) < self.workers:
            self._pool.append(_Worker(self._config))

    def run(self, programs: Sequence[str]) -> list[Outcome]:
        """Each program's outcome, in their order; a program passes when it exits 0 within the limits."""
        if isinstance(programs, str):
            raise TypeError("Sandbox.run takes a sequence of programs, not one program string")
        for position, program in enumerate(programs):
            if not isinstance(program, str):
                raise TypeError(f"program {position} is a {type(program).__name__}, not a str")
        outcomes: list[Outcome | None] = [None] * len(programs)
        queue = deque(range(len(programs)))
        self._fill()
        selector = selectors.DefaultSelector()
        try:
            for worker in self._pool:
                selector.register(worker, selectors.EVENT_READ)
            busy = 0
            while queue or busy:
                for worker in list(self._pool):
                    if worker.index is None and queue:
                        index = queue.popleft()
                        try:
                            worker.send(index, programs[index], self.timeout)
                        except OSError:  # it died between two programs: not this program's fault
                            worker.index = None
                            queue.appendleft(index)
                            self._replace(worker, selector, outcomes, "")
                            continue
                        busy += 1
                for key, _ in selector.select(timeout=1.0):
                    worker = key.fileobj
                    messages = worker.messages()
                    if messages is None:
                        busy -= self._replace(worker, selector, outcomes, "the sandbox worker died while running it")
                        continue
                    for message in messages:
                        if "started" in message:
                            worker.group = message["started"]
                        elif worker.index is not None:
                            outcomes[worker.index] = Outcome(bool(message["passed"]), str(message["reason"]))
                            worker.index = None
                            busy -= 1
                now = time.monotonic()
                for worker in list(self._pool):
                    if worker.index is not None and now > worker.deadline:
                        busy -= self._replace(worker, selector, outcomes, "the sandbox worker stopped answering")
        finally:
            selector.close()
        return [outcome for outcome in outcomes if outcome is not None]

    def _replace(self, worker: _Worker, selector: selectors.BaseSelector, outcomes: list, reason: str) -> int:
        """Fail its program, kill it and what it ran, start a fresh one; 1 when it was running a program."""
        selector.unregister(worker)
        running = worker.index is not None
        if running:
            outcomes[worker.index] = Outcome(False, reason)
        worker.kill()
        fresh = _Worker(self._config)
        self._pool[self._pool.index(worker)] = fresh
        selector.register(fresh, selectors.EVENT_READ)
        return int(running)
