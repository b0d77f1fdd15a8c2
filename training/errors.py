"""The error types of ``training/``, below every module that raises or catches them.

``TrainingError`` used to live in ``training/runner.py``, so ``training/snapshots.py`` imported the runner to raise
it while the runner imported the snapshot reader: an import circle (issue 19). An error type has no dependencies,
so it sits here, at the bottom, and every module imports it from here (``training.runner`` re-exports it for the
recipes and tests that import it from there).
"""

from __future__ import annotations


class TrainingError(RuntimeError):
    """A run that cannot start or finish; the message is one sentence saying what to do."""


class EvalError(RuntimeError):
    """Evaluation cannot run; the message says what to do."""


class ConfigError(ValueError):
    """A config that cannot run; the message says which key and what to do (re-exported by ``training.config``)."""
