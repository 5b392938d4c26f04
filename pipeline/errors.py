"""The errors a user can fix, apart from bugs.

Anything raised as a :class:`PipelineError` was caused by the input, the parameters or the environment (a malformed
file, a wrong key, an unreachable server): the CLI prints it as one line, ``error: <stage>: <message>``, and the
message says what, where and how to fix it. Every other exception is a bug and keeps its traceback.
"""

from __future__ import annotations


class PipelineError(Exception):
    """A failure caused by input, parameters or the environment, not by a bug in the pipeline."""


class BadInputError(PipelineError, ValueError):
    """Input that cannot be turned into interactions: too many bad rows, empty, unreadable or missing columns."""


class ParamsError(PipelineError, ValueError):
    """A parameter problem: unknown key, wrong type or invalid value (``params.yaml``, ``--set`` or a run's conf)."""
