"""Options several commands share."""

from __future__ import annotations

import tomllib
from typing import Any

from common.config import ConfigError


def parse_set(items: list[str]) -> dict[str, Any]:
    """``--set KEY=VALUE`` items as run-config overrides: each value read as a TOML
    value (numbers, booleans, quoted strings), else kept as a bare string."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--set expects KEY=VALUE, got {item!r}")
        try:
            out[key.strip()] = tomllib.loads(f"v = {value}")["v"]
        except tomllib.TOMLDecodeError:
            out[key.strip()] = value  # a bare string
    return out
