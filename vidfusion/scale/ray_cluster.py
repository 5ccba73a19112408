"""Joining a Ray cluster, for everything that runs on one (batch jobs, the service's worker pool)."""

from __future__ import annotations

from typing import Any


def connect(address: str) -> Any:
    """The `ray` module, connected: "local" starts an instance in this process, "auto" or an address joins a
    running cluster. Without Ray installed: a ValueError naming the extra to install."""
    try:
        import ray
    except ImportError:
        raise ValueError('--ray needs Ray: pip install "vidfusion[ray]"') from None
    if not ray.is_initialized():
        quiet = {"log_to_driver": False, "logging_level": "ERROR"}
        if address == "local":
            ray.init(include_dashboard=False, **quiet)
        else:
            ray.init(address=address, **quiet)
    return ray


def first_line(exc: BaseException) -> str:
    """The first non-empty line of an error (Ray's errors carry whole remote tracebacks), at most 300 characters."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return (lines[0] if lines else type(exc).__name__)[:300]
