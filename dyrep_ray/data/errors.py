"""The one error type of the data layer."""

from __future__ import annotations


class DatasetError(ValueError):
    """A dataset is missing, malformed or misconfigured; the message is one line saying what to put where."""
