"""Errors a user can act on: each names what is wrong and where, so the CLI can print it without a traceback."""
from __future__ import annotations

__all__ = ["DarecError", "DataError", "ConfigError", "reject_unknown_keys"]


class DarecError(Exception):
    """Base class for every error the CLI reports as a one-line message and a non-zero exit."""


class ConfigError(DarecError):
    """A configuration value is missing, of the wrong type or out of range."""


class DataError(DarecError):
    """Bad input data, located as precisely as we can: file, 1-based line, column name, offending value."""

    def __init__(self, message: str, *, path: object = None, line: int | None = None,
                 column: str | None = None, value: object = None) -> None:
        self.path, self.line, self.column, self.value = path, line, column, value
        where = ", ".join(
            part for part in (
                f"file {path}" if path is not None else "",
                f"line {line}" if line is not None else "",
                f"column {column!r}" if column is not None else "",
                f"value {value!r}" if value is not None else "",
            ) if part
        )
        super().__init__(f"{message} ({where})" if where else message)


def reject_unknown_keys(data: dict, known: set[str], *, section: str) -> None:
    """Typos in configs fail loudly instead of being silently ignored."""
    unknown = sorted(set(data) - known)
    if unknown:
        raise ConfigError(f"unknown {section} option(s) {unknown}; known: {sorted(known)}")
