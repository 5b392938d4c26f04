"""Starting and stopping local servers (``mlflow server``, ``mlflow models serve``): a free port on 127.0.0.1, a
wait for the first answer that fails early with the server's log, and a stop that ends the whole process group.

Used by the tests and the benchmarks that start real servers; nothing in the pipeline's stages depends on it.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path


def free_port() -> int:
    """A local TCP port with nothing listening (bound, then released): for a server to take, or to find closed."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


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
    """Stop a server started in its own session (``start_new_session=True``) with its children (uvicorn workers):
    SIGTERM, then SIGKILL after ``timeout_s``."""
    if proc is None or proc.poll() is not None:
        return
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
