"""The errors of privacy accounting and of the site's privacy records."""

from __future__ import annotations


class PrivacyError(ValueError):
    """A privacy parameter or accounting state that cannot be right."""


class LedgerError(ValueError):
    """A ledger or identity file that cannot be trusted as it stands."""
