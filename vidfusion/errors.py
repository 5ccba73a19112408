"""The error classes every layer raises (clear messages naming the file, keys or argument and the fix), and
`first_keys` for listing offending keys in them. A leaf: imports nothing from vidfusion."""

from __future__ import annotations

from collections.abc import Iterable


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded: the message names the file or keys and how to fix it."""


class CheckpointNotFoundError(CheckpointError, FileNotFoundError):
    """A checkpoint folder, subfolder or file that does not exist."""


class ConversionError(CheckpointError):
    """A file or state dict that does not fit the original ModelScope format: names the file and the first keys."""


class LoraError(ValueError):
    """A LoRA file that cannot be applied: names the format detected and the first keys that failed."""


def first_keys(keys: Iterable[str], limit: int = 8) -> str:
    """The first `limit` keys (or names) for an error message, and how many there are in all."""
    keys = list(keys)
    shown = ", ".join(keys[:limit])
    return shown + (f" ... ({len(keys)} in all)" if len(keys) > limit else "")
