"""Run one measurement in a child process and read its own peak memory (``ru_maxrss`` of that child via wait4).

A benchmark that ran several cases in one process would report the largest case's peak for all of them.
"""

from __future__ import annotations

import os
import subprocess
import sys


def run_child(code: str, *args: str, pythonpath: str | None = None) -> tuple[str, float, int]:
    """``python -c code args...`` in ``pythonpath`` (when given); returns (stdout, peak RSS in MiB, exit code).

    ``python -c`` puts the working directory first on ``sys.path``, ahead of ``PYTHONPATH``: the child runs inside
    ``pythonpath`` so that tree's ``pipeline`` is the one imported, not the caller's.
    """
    env = {**os.environ, "PYTHONPATH": pythonpath} if pythonpath else None
    child = subprocess.Popen(
        [sys.executable, "-c", code, *args], stdout=subprocess.PIPE, text=True, env=env, cwd=pythonpath
    )
    stdout = child.stdout.read()
    _, status, usage = os.wait4(child.pid, 0)  # this child's own rusage, not the max over all children
    return stdout, usage.ru_maxrss / 1024, os.waitstatus_to_exitcode(status)
