"""Errors that are the user's to fix (a bad knob, a missing input, an unreachable bucket, a busy run root).

The CLI prints them as one clear line and exits non-zero without a traceback (``--debug`` shows it);
anything else is a bug or an outage and keeps its traceback.
"""

from __future__ import annotations


class UserError(Exception):
    """Base class: the message says what is wrong and what to do."""


class InputsError(UserError, FileNotFoundError):
    """The configured inputs hold nothing to work on (a missing folder, no images)."""


class UpstreamError(UserError):
    """A stage was asked to run on upstream outputs that are missing, unfinished or from another config."""


class LeaseHeldError(UserError):
    """Another driver holds the run root's lease."""
