"""The one base class of every error a user can cause and fix (bad config, data, checkpoint, cluster).

It lives at the bottom of the package (no imports) so that every layer, ``rep/`` included, can derive
from it; the CLI catches exactly this type and prints its message as one line with exit code 2.
"""

from __future__ import annotations


class UserError(Exception):
    """A problem the user can fix; the message is one line naming the problem and the fix."""
