"""The one exception type the collector raises for bad input (printed as one line, exit 2)."""

from __future__ import annotations


class CollectError(ValueError):
    """Bad model, prompt set or settings; the message is meant for the user as is."""
