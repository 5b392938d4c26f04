"""Starting and stopping local servers (``mlflow server``, ``mlflow models serve``): a free port on 127.0.0.1, a
wait for the first answer that fails early with the server's log, and a stop that ends the whole process group.
A server started here also ends when the process that started it dies, even by SIGKILL (Linux), so a killed test
run or launcher leaves no server holding its port.

Used by the tests and benchmarks that start real servers and by the local Airflow launcher; no stage depends on it.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import IO, Any


def free_port() -> int:
    """A local TCP port with nothing listening (bound, then released): for a server to take, or to find closed."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_group(
    command: Sequence[str], out: IO[Any], *, env: Mapping[str, str] | None = None, cwd: Path | None = None
) -> subprocess.Popen:
    """Start ``command`` as the leader of its own session (so :func:`stop_groups` ends its children too), output to
    ``out``, and — on Linux — with SIGTERM as its parent-death signal: it stops with the process that started it.
    The kernel ties that signal to the starting *thread*: start servers from a thread that outlives them."""
    if sys.platform == "linux":  # a tiny exec wrapper, not preexec_fn (unsafe in a process with threads)
        command = [sys.executable, "-c", _DIE_WITH_PARENT, str(os.getpid()), *command]
    return subprocess.Popen(
        list(command),
        cwd=cwd,
        env=None if env is None else dict(env),
        stdout=out,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )


# Runs as the started process before it execs the server (same pid): ask the kernel for SIGTERM when the parent
# dies (prctl PR_SET_PDEATHSIG, kept across exec); if the parent died before that took effect, exit at once.
_DIE_WITH_PARENT = """\
import ctypes, os, signal, sys
ctypes.CDLL(None, use_errno=True).prctl(1, int(signal.SIGTERM))
if os.getppid() != int(sys.argv[1]):
    os._exit(1)
os.execvp(sys.argv[2], sys.argv[2:])
"""


def wait_http(url: str, proc: subprocess.Popen, log: Path, timeout_s: float = 180) -> None:
    """Wait until ``url`` answers 200; fail early, with the log's tail, if ``proc`` exits first."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.3)
    raise RuntimeError(f"{url} did not answer within {timeout_s:.0f} s:\n{log.read_text()[-3000:]}")


def stop_group(proc: subprocess.Popen | None, timeout_s: float = 20) -> None:
    """Stop a server started in its own session (``start_new_session=True``) with its children (uvicorn workers)."""
    if proc is not None:
        stop_groups([proc], timeout_s)


def stop_groups(processes: Iterable[subprocess.Popen], timeout_s: float = 20) -> None:
    """Stop processes started in their own sessions, children included: SIGTERM to every group at once (each shuts
    down in parallel, within one shared ``timeout_s``), then SIGKILL to whatever is left of each group — also of a
    group whose leader has exited, so no child outlives its server."""
    processes = list(processes)
    for proc in processes:
        if proc.poll() is None:
            _signal_group(proc, signal.SIGTERM)
    deadline = time.monotonic() + timeout_s
    for proc in processes:
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=max(0.1, deadline - time.monotonic()))
        _signal_group(proc, signal.SIGKILL)  # normally nothing is left
        proc.wait(timeout=10)


def _signal_group(proc: subprocess.Popen, signum: int) -> None:
    with contextlib.suppress(ProcessLookupError):  # the group is gone already
        os.killpg(proc.pid, signum)
