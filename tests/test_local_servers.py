"""Local servers end with whoever started them: a stop ends the whole process group, and a starter killed with
SIGKILL (a cancelled CI job, ``kill -9`` on ``make airflow``) takes its servers with it instead of leaving them on
their ports."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

from pipeline.local_servers import start_group, stop_groups
from tests.conftest import REPO_ROOT

SLEEPER = [sys.executable, "-c", "import time; time.sleep(120)"]


def _alive(pid: int) -> bool:
    """Running, i.e. neither reaped nor a zombie waiting for its reaper."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return False
    return state != "Z"


def _gone_within(pid: int, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if not _alive(pid):
            return True
        time.sleep(0.05)
    return False


pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="parent-death signal and /proc are Linux-only")


def test_stop_groups_ends_the_servers_children_too(tmp_path: Path) -> None:
    # a server whose worker is its child (as uvicorn's): the worker's pid is printed, then the server waits
    server = [
        sys.executable,
        "-c",
        f"import subprocess; w = subprocess.Popen({SLEEPER!r}); print(w.pid, flush=True); w.wait()",
    ]
    with open(tmp_path / "server.log", "w") as out:
        proc = start_group(server, out)
    deadline = time.monotonic() + 30
    while not (tmp_path / "server.log").read_text().strip() and time.monotonic() < deadline:
        time.sleep(0.05)
    worker_pid = int((tmp_path / "server.log").read_text())
    assert _alive(proc.pid) and _alive(worker_pid)
    stop_groups([proc], timeout_s=10)
    assert proc.returncode is not None
    assert _gone_within(worker_pid, 10), "the server's worker outlived the stop"


def test_a_server_ends_with_the_process_that_started_it_even_on_sigkill() -> None:
    starter_code = (
        "import sys, time\n"
        "from pipeline.local_servers import start_group\n"
        f"proc = start_group({SLEEPER!r}, sys.stderr)\n"
        "print(proc.pid, flush=True)\n"
        "time.sleep(120)\n"
    )
    starter = subprocess.Popen([sys.executable, "-c", starter_code], cwd=REPO_ROOT, stdout=subprocess.PIPE, text=True)
    try:
        server_pid = int(starter.stdout.readline())
        assert _alive(server_pid)
        time.sleep(0.2)
        assert _alive(server_pid), "the server must keep running while its starter lives"
        starter.kill()
        starter.wait(timeout=10)
        assert _gone_within(server_pid, 10), "the server outlived the SIGKILLed process that started it"
    finally:
        starter.kill()
        starter.stdout.close()
