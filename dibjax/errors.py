"""Errors whose message says everything a user needs to act on.

A :class:`RunError` is raised for a failure caused by what dibjax was given or where it runs — a bad
configuration value, data of the wrong form or in the wrong place, a download that cannot be made, a workdir
that cannot be written, a checkpoint that fails its checksum, a loss that became NaN — never for a bug in
dibjax. Its message names the bad value or path and what is accepted. The command-line tools
(``python -m dibjax.main``, ``python -m dibjax.analysis``) print it as one line, without a traceback, and exit
with status 1; ``--traceback`` shows the traceback too. Any other exception is a bug and keeps its traceback.

Each subclass also derives from the built-in exception a Python caller would expect (``ValueError``,
``FileNotFoundError``, ``ConnectionError``, ``OSError``, ``FloatingPointError``), so ``except ValueError``
keeps working.

:class:`RunInterrupted` is not a :class:`RunError`: it derives from ``KeyboardInterrupt`` so that ``except
Exception`` does not swallow a stop request.
"""

from __future__ import annotations

__all__ = [
    "CheckpointError",
    "ConfigError",
    "DataError",
    "DataNotFoundError",
    "DownloadError",
    "NonFiniteLossError",
    "RunError",
    "RunInterrupted",
    "WorkdirError",
]


class RunError(Exception):
    """A failure caused by the input or the environment, with a message that names the cause and the fix."""


class ConfigError(RunError, ValueError):
    """A configuration value that is unknown, out of range or inconsistent with another."""


class DataError(RunError, ValueError):
    """Data of the wrong form: dtype, shape, labels, keys, or an archive that fails its checksum."""


class DataNotFoundError(RunError, FileNotFoundError):
    """Data that is not where the configuration says."""


class DownloadError(RunError, ConnectionError):
    """A download that failed: the message gives the URL and how to proceed without network access."""


class WorkdirError(RunError, OSError):
    """A workdir that cannot be created or written (permissions, a full disk), or that holds another run."""


class CheckpointError(RunError):
    """No checkpoint of a run can be restored intact."""


class NonFiniteLossError(RunError, FloatingPointError):
    """The training loss became NaN or Inf; the state was not updated from that step on."""


class RunInterrupted(KeyboardInterrupt):
    """Training stopped on SIGINT or SIGTERM; the message says from which epoch a rerun resumes.

    Attributes:
        signal_number: the signal that stopped the run (``signal.SIGINT`` for Ctrl-C).
    """

    def __init__(self, message: str, signal_number: int):
        super().__init__(message)
        self.signal_number = signal_number
