"""Settings read from the environment: thread count and kernel cache location."""

from __future__ import annotations

import os
from functools import cache
from pathlib import Path


def num_threads() -> int:
    """Threads for the kernels' parallel loops: ``SPARSEDSL_NUM_THREADS``, else every CPU this
    process could run on when it first asked (read once: every kernel call asks)."""
    return int(os.environ.get("SPARSEDSL_NUM_THREADS") or 0) or _cpus()


@cache
def _cpus() -> int:
    return len(os.sched_getaffinity(0))


def cache_dir() -> Path | None:
    """Where compiled kernels are cached: ``SPARSEDSL_CACHE_DIR`` (empty or ``off`` disables the
    cache), else ``$XDG_CACHE_HOME/sparsedsl`` (``~/.cache/sparsedsl``)."""
    value = os.environ.get("SPARSEDSL_CACHE_DIR")
    if value is not None:
        return cache_path(value)
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "sparsedsl"


def cache_path(value: str | os.PathLike) -> Path | None:
    """A cache directory as given by a user: ``""`` or ``"off"`` means no cache."""
    return None if str(value) in ("", "off") else Path(value)
