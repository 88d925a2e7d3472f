"""The errors a run reports to its user, each with one clear line.

ConfigError   bad input, found before any model is built: exit status 2, no results file.
RunStopped    the run ends early with a status other than "failed": Diverged (the loss or
              gradient norm went non-finite, or steps were skipped beyond what float16 loss
              scaling explains) and Interrupted (SIGINT / SIGTERM, stopped at a safe point).
              Every rank raises the same one; the results so far are kept.
"""

from __future__ import annotations


class ConfigError(ValueError):
    """A bad option or option combination; the message is shown to the user as is."""


class RunStopped(RuntimeError):
    status = "failed"

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


class Diverged(RunStopped):
    """The run stopped training the model: its numbers are not a benchmark result."""

    status = "diverged"


class Interrupted(RunStopped):
    """A signal asked the run to stop; it did, at the next safe point."""

    status = "interrupted"
