"""The one error type of the protocol: every rejected message or value raises it."""

from __future__ import annotations


class SecAggError(ValueError):
    """A secure-aggregation message or value was rejected; the text names what and why."""
