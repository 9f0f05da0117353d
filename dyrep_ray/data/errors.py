"""The one error type of the data layer."""

from __future__ import annotations

from ..errors import UserError


class DatasetError(UserError, ValueError):
    """A dataset is missing, malformed or misconfigured; the message is one line saying what to put where."""
