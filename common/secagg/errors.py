"""The errors of the protocol: every rejected message or value raises ``SecAggError``;
``SecAggAbort`` says the whole round cannot complete securely."""

from __future__ import annotations


class SecAggError(ValueError):
    """A secure-aggregation message or value was rejected; the text names what and why."""


class SecAggAbort(SecAggError):
    """The round cannot complete securely; the sum must not be used."""
