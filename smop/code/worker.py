"""A long-lived sandbox worker: reads programs on stdin, runs each in a fresh forked child, answers on stdout.

Started by `smop.code.sandbox.Sandbox` as `python -I worker.py CONFIG_JSON`, never imported: it uses the
standard library only, so forking it is cheap (a small interpreter with the usual modules already imported).
Per program it forks a disposable "shim" (a new session, so one `killpg` reaches everything the program
starts) which forks the program itself; the program gets its own temporary folder, rlimits, a scrubbed
environment, stdin on /dev/null and, as root, an unprivileged uid and its own PID namespace. The worker is a
child subreaper, so anything the program leaves behind is re-parented here and killed before the next one.

Protocol, one JSON object per line. In: {"program": str}. Out: {"hello": {...}} once, then per program
{"started": pgid} and {"passed": bool, "reason": str}.
"""

from __future__ import annotations

# What a child usually imports: already in memory, a fork gets them for free (and as nobody, without a
# file lookup). The random module reseeds itself in every forked child.
import bisect  # noqa: F401
import collections  # noqa: F401
import contextlib
import copy  # noqa: F401
import ctypes
import functools  # noqa: F401
import heapq  # noqa: F401
import itertools  # noqa: F401
import json
import math
import operator  # noqa: F401
import os
import random  # noqa: F401
import re  # noqa: F401
import resource
import select
import shutil
import signal
import socket
import string  # noqa: F401
import sys
import tempfile
import time
import traceback  # noqa: F401
import typing  # noqa: F401

NOBODY = 65534
CLONE_NEWNET = 0x40000000
CLONE_NEWPID = 0x20000000
PR_SET_PDEATHSIG, PR_SET_DUMPABLE, PR_SET_NO_NEW_PRIVS, PR_SET_CHILD_SUBREAPER = 1, 4, 38, 36
LIBC = ctypes.CDLL(None, use_errno=True)
SCRIPT_DIR = os.path.dirname(os.path.abspath(__file__))
REASON_CHARS = 300


def prctl(option: int, value: int) -> bool:
    return LIBC.prctl(option, value, 0, 0, 0) == 0


def unshare(flags: int) -> bool:
    return LIBC.unshare(flags) == 0


def probe_pid_namespace() -> bool:
    """Whether this process may give each program its own PID namespace (root, or CAP_SYS_ADMIN)."""
    pid = os.fork()
    if pid == 0:
        os._exit(0 if unshare(CLONE_NEWPID) else 1)
    _, status = os.waitpid(pid, 0)
    return status == 0


def open_import_dirs() -> dict[str, int]:
    """Directory fds of every import path, opened while we may still read them.

    A child dropped to `nobody` cannot reach an interpreter installed under a private home (pyenv in /root,
    mode 0700); `/proc/self/fd/N/...` paths through these fds reach the same files without opening anything
    else in that home (looking up a name in /root still needs its x bit)."""
    fds = {}
    for path in dict.fromkeys(p for p in sys.path if p and p != SCRIPT_DIR):
        if os.path.isdir(path):
            fds[path] = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    return fds


def remap_imports(fds: dict[str, int]) -> None:
    """Point sys.path and every loaded package's __path__ at the inherited directory fds."""

    def remap(path: str) -> str:
        for original, fd in fds.items():
            if path == original or path.startswith(original + os.sep):
                return f"/proc/self/fd/{fd}{path[len(original) :]}"
        return path

    sys.path[:] = [remap(p) for p in sys.path if p != SCRIPT_DIR]
    for module in list(sys.modules.values()):
        package_path = getattr(module, "__path__", None)
        if isinstance(package_path, list):
            package_path[:] = [remap(p) for p in package_path]
    sys.path_importer_cache.clear()


def block_sockets() -> None:
    """When no network namespace could be made: creating an Internet socket raises PermissionError.

    A Python-level speed bump only (ctypes or a subprocess get past it). socket.socket's __init__ calls
    `_socket.socket.__init__` by name, so replacing that name guards both; AF_UNIX and wrapped fds still
    work, so that asyncio and multiprocessing do."""
    import _socket

    original = _socket.socket

    class GuardedSocket(original):
        def __init__(self, family: int = -1, type: int = -1, proto: int = -1, fileno: int | None = None) -> None:
            if fileno is None and family != socket.AF_UNIX:
                raise PermissionError("network access is disabled in the sandbox")
            original.__init__(self, family, type, proto, fileno)

    _socket.socket = GuardedSocket  # type: ignore[misc]


def describe(err: BaseException) -> str:
    """`Type: message (line N)` of an exception raised by the program, short and never raising itself."""
    try:
        name = type(err).__name__
        message = str(err)
        line = None
        tb = err.__traceback__
        while tb is not None:
            if tb.tb_frame.f_code.co_filename == "<program>":
                line = tb.tb_lineno
            tb = tb.tb_next
        text = f"{name}: {message}" if message else name
        if len(text) > REASON_CHARS:
            text = text[: REASON_CHARS - 3] + "..."
        return f"{text} (line {line})" if line else text
    except BaseException:  # a hostile __str__
        return "an exception that could not be described"


def run_program(program: str, folder: str, nonce: str, result_fd: int, config: dict, fds: dict[str, int]) -> None:
    """The program's own process: limits, identity, environment, then exec; reports only if it ran to the end."""
    write, exit_now, getpid = os.write, os._exit, os.getpid  # the program may replace these names
    try:
        os.chdir(folder)
        limits = {
            resource.RLIMIT_CPU: (math.ceil(config["timeout"]) + 1, math.ceil(config["timeout"]) + 2),
            resource.RLIMIT_AS: (config["memory_bytes"],) * 2,
            resource.RLIMIT_FSIZE: (config["file_bytes"],) * 2,
            resource.RLIMIT_NPROC: (config["nproc"],) * 2,
            resource.RLIMIT_CORE: (0, 0),
        }
        for which, value in limits.items():
            resource.setrlimit(which, value)
        if config["drop_to_nobody"]:
            os.setgroups([])
            os.setresgid(NOBODY, NOBODY, NOBODY)
            os.setresuid(NOBODY, NOBODY, NOBODY)
            prctl(PR_SET_DUMPABLE, 1)  # a uid change hides /proc/self/fd, which the imports go through
            remap_imports(fds)
        prctl(PR_SET_NO_NEW_PRIVS, 1)  # no setuid binary gives the privileges back
        prctl(PR_SET_PDEATHSIG, signal.SIGKILL)  # after the uid change, which clears it
        os.environ.clear()
        os.environ.update({"PATH": "/usr/local/bin:/usr/bin:/bin", "LANG": "C.UTF-8", "HOME": folder})
        os.environ["TMPDIR"] = folder
        sys.stdin = open(os.devnull)  # noqa: SIM115 - the child's stdin for its whole life
        sys.argv = ["<program>"]
        sys.dont_write_bytecode = True
        if config["network"] != "namespace":
            block_sockets()
        me = getpid()
    except BaseException as err:
        write(result_fd, json.dumps({"nonce": nonce, "passed": False, "reason": f"sandbox setup: {err}"}).encode())
        exit_now(0)
    try:
        namespace = {"__name__": "__main__", "__builtins__": __builtins__}
        exec(compile(program, "<program>", "exec"), namespace)
        passed, reason = True, "passed"
    except SystemExit as err:
        code = err.code if isinstance(err.code, int | None) else "..."
        passed, reason = False, f"exited before the end: sys.exit({code})"
    except MemoryError:
        passed, reason = False, "memory limit"
    except BaseException as err:
        passed, reason = False, describe(err)
    try:
        if getpid() == me:  # not a forked copy of the program finishing its text
            write(result_fd, json.dumps({"nonce": nonce, "passed": passed, "reason": reason}).encode())
        sys.stdout.flush()
        sys.stderr.flush()
    finally:
        exit_now(0)


def shim(program: str, folder: str, nonce: str, pipes: dict[str, int], config: dict, fds: dict[str, int]) -> None:
    """The program's disposable parent: a new session, fds 0-2 redirected, then waits and reports the status."""
    try:
        os.setsid()
        prctl(PR_SET_PDEATHSIG, signal.SIGKILL)  # the worker died: so do we (and the program, through its own)
        devnull = os.open(os.devnull, os.O_RDWR)
        os.dup2(devnull, 0)
        os.dup2(pipes["output"], 1)
        os.dup2(pipes["output"], 2)
        keep = {0, 1, 2, pipes["result"], pipes["status"], *fds.values()}
        for name in os.listdir("/proc/self/fd"):
            if int(name) not in keep:
                with contextlib.suppress(OSError):
                    os.close(int(name))
        if config["pid_namespace"]:
            unshare(CLONE_NEWPID)  # the program becomes PID 1: kill(-1) reaches only its own processes
        pid = os.fork()
        if pid == 0:
            os.close(pipes["status"])
            run_program(program, folder, nonce, pipes["result"], config, fds)
        os.close(pipes["result"])
        os.dup2(0, 1)
        os.dup2(0, 2)
        _, status = os.waitpid(pid, 0)
        os.write(pipes["status"], f"{status}\n".encode())
    finally:
        os._exit(0)


def children(parent: int) -> list[int]:
    """Processes whose parent is `parent` (leftovers re-parented to this subreaper)."""
    found = []
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                with open(f"/proc/{name}/stat", "rb") as handle:
                    fields = handle.read().rsplit(b")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == parent:
                found.append(int(name))
    return found


def processes_of(uid: int) -> int:
    count = 0
    for name in os.listdir("/proc"):
        with contextlib.suppress(OSError):
            count += name.isdigit() and os.stat(f"/proc/{name}").st_uid == uid
    return count


def kill_everything(group: int) -> bool:
    """Kill the program's session and anything re-parented here; True once no child of ours is left."""
    deadline = time.monotonic() + 10.0
    while True:
        with contextlib.suppress(OSError):
            os.killpg(group, signal.SIGKILL)
        try:
            while os.waitpid(-1, os.WNOHANG)[0]:
                continue  # reap every child that has exited; 0: some are still running
        except ChildProcessError:
            return True
        for pid in children(os.getpid()):
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)
        if time.monotonic() > deadline:
            return False
        time.sleep(0.002)


def remove_tree(folder: str) -> None:
    def make_writable_and_retry(function, path, _exc):  # the program may have chmod-ed its files
        with contextlib.suppress(OSError):  # what still resists is left to the system's /dev/shm or /tmp cleaning
            os.chmod(os.path.dirname(path), 0o700)
            os.chmod(path, 0o700)
            function(path)

    shutil.rmtree(folder, onerror=make_writable_and_retry)


def verdict(status: bytes, result: bytes, nonce: str) -> tuple[bool, str]:
    """Passed only if the program's process exited 0 after its wrapper reported reaching the end."""
    if not status.strip():
        return False, "its parent process was killed (by the program?)"
    code = int(status.split()[0])
    if os.WIFSIGNALED(code):
        number = os.WTERMSIG(code)
        named = {signal.SIGXCPU: "CPU time limit", signal.SIGXFSZ: "file size limit"}
        if number in named:
            return False, named[number]
        return False, f"killed by signal {number} ({signal.Signals(number).name})"
    if os.WEXITSTATUS(code) != 0:
        return False, f"exit code {os.WEXITSTATUS(code)}"
    start = result.find(b'{"nonce": "' + nonce.encode() + b'"')  # whatever the program wrote before it
    if start >= 0:
        with contextlib.suppress(ValueError, KeyError):  # a garbled report counts as no report
            message, _ = json.JSONDecoder().raw_decode(result[start:].decode("utf-8", "replace"))
            return bool(message["passed"]), str(message["reason"])[:REASON_CHARS]
    return False, "exited before the end (os._exit, or its report was lost)"


def read_all(fd: int, limit: int) -> bytes:
    os.set_blocking(fd, False)
    chunks, size = [], 0
    while size < limit:
        try:
            data = os.read(fd, 65536)
        except BlockingIOError:
            break
        if not data:
            break
        chunks.append(data)
        size += len(data)
    return b"".join(chunks)


def run_one(program: str, base: str, config: dict, fds: dict[str, int], send) -> dict:
    folder = tempfile.mkdtemp(dir=base)
    if config["drop_to_nobody"]:
        os.chown(folder, NOBODY, NOBODY)
    os.chmod(folder, 0o700)
    output_r, output_w = os.pipe()
    result_r, result_w = os.pipe()
    status_r, status_w = os.pipe()
    nonce = os.urandom(16).hex()
    started = time.monotonic()
    pid = os.fork()
    if pid == 0:
        pipes = {"output": output_w, "result": result_w, "status": status_w}
        shim(program, folder, nonce, pipes, config, fds)
    for fd in (output_w, result_w, status_w):
        os.close(fd)
    send({"started": pid})
    poller = select.poll()
    poller.register(output_r, select.POLLIN)
    poller.register(status_r, select.POLLIN)
    status, output, reason, shim_done = b"", 0, None, False
    while not shim_done and reason is None:
        left = started + config["timeout"] - time.monotonic()
        if left <= 0:
            reason = "timeout"
            break
        for fd, _ in poller.poll(left * 1000):
            data = os.read(fd, 65536)
            if fd == status_r:
                status += data
                shim_done = not data
            elif data:
                output += len(data)
                if output > config["max_output"]:
                    reason = "output limit"
            if not data:
                poller.unregister(fd)
    if shim_done:
        os.waitpid(pid, 0)
    clean = kill_everything(pid)
    result = read_all(result_r, 1 << 16)
    for fd in (output_r, result_r, status_r):
        os.close(fd)
    remove_tree(folder)
    passed, reason = (False, reason) if reason else verdict(status, result, nonce)
    if not clean:
        passed, reason = False, f"{reason}; left processes the sandbox could not kill"
    return {"passed": passed, "reason": reason}


def scratch_root() -> str | None:
    """/dev/shm when it is a writable tmpfs (a folder made and removed there costs microseconds, on a disk
    milliseconds); the usual temporary folder otherwise."""
    shm = "/dev/shm"
    if os.path.isdir(shm) and os.access(shm, os.W_OK | os.X_OK):
        return shm
    return None


def main() -> None:
    config = json.loads(sys.argv[1])
    prctl(PR_SET_PDEATHSIG, signal.SIGKILL)  # the scorer died: no worker outlives it
    if os.getppid() != config["parent"]:
        return
    prctl(PR_SET_CHILD_SUBREAPER, 1)
    root = os.geteuid() == 0 and config.get("privileged", True)  # false: the tests' look at the user path
    config["network"] = "namespace" if root and unshare(CLONE_NEWNET) else "sockets blocked"
    config["pid_namespace"] = root and probe_pid_namespace()
    config["drop_to_nobody"] = root
    # RLIMIT_NPROC counts every process of the uid, those that run already too
    config["nproc"] += processes_of(NOBODY if root else os.getuid())
    fds = open_import_dirs() if root else {}
    base = tempfile.mkdtemp(prefix="smop-sandbox-", dir=scratch_root())
    os.chmod(base, 0o711)  # nobody may enter its own folder, not list the others
    out = sys.stdout.buffer

    def send(message: dict) -> None:
        out.write(json.dumps(message).encode() + b"\n")
        out.flush()

    try:
        keys = ("network", "pid_namespace", "drop_to_nobody", "nproc")
        send({"hello": {"pid": os.getpid(), "base": base, **{key: config[key] for key in keys}}})
        for line in sys.stdin.buffer:
            send(run_one(json.loads(line)["program"], base, config, fds, send))
    finally:
        remove_tree(base)


if __name__ == "__main__":
    main()
