"""The errors a user can fix, apart from bugs.

Anything raised as a :class:`PipelineError` was caused by the input, the parameters or the environment (a malformed
file, a wrong key, an unreachable server): the CLI prints it as one line, ``error: <stage>: <message>``, and the
message says what, where and how to fix it. Every other exception is a bug and keeps its traceback.
"""

from __future__ import annotations

import reprlib


class PipelineError(Exception):
    """A failure caused by input, parameters or the environment, not by a bug in the pipeline."""


class BadInputError(PipelineError, ValueError):
    """Input that cannot be turned into interactions: too many bad rows, empty, unreadable or missing columns."""


class ParamsError(PipelineError, ValueError):
    """A parameter problem: unknown key, wrong type or invalid value (``params.yaml``, ``--set`` or a run's conf)."""


class TrainingDivergedError(PipelineError, ArithmeticError):
    """Training produced a non-finite loss: the weights are lost, and going on would only train on NaN."""


MAX_ECHO = 120  # characters of a user's value an error message repeats: a 5 MB value never becomes a 5 MB error


def shown(value: object) -> str:
    """``repr(value)`` for an error message, cut at :data:`MAX_ECHO` characters.

    A deep or huge value (a nested YAML list, a long string) is only walked as far as the cut needs, so echoing it
    costs as little as the message it ends in.
    """
    return cut(_SHORT_REPR.repr(value))


def cut(text: str, limit: int = MAX_ECHO) -> str:
    """``text`` (a key, a message's tail) cut at ``limit`` characters, "..." included."""
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _short_repr() -> reprlib.Repr:
    short = reprlib.Repr()
    short.maxlevel = 3
    short.maxstring = short.maxother = short.maxlong = MAX_ECHO
    short.maxlist = short.maxtuple = short.maxdict = short.maxset = 10
    return short


_SHORT_REPR = _short_repr()
