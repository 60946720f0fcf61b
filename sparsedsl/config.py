"""Settings: thread count and kernel cache location."""

from __future__ import annotations

import os
from functools import cache
from pathlib import Path

import torch


def num_threads() -> int:
    """Threads for the kernels' parallel loops, which run on torch's OpenMP pool: as many as torch
    uses (``torch.set_num_threads``: one pool, one setting, read at each call), unless
    ``SPARSEDSL_NUM_THREADS`` was set when the first kernel ran (read once, as OpenMP reads
    ``OMP_NUM_THREADS``: reading the environment costs a kernel call ~1 µs)."""
    return _fixed_threads() or torch.get_num_threads()


@cache
def _fixed_threads() -> int:
    return int(os.environ.get("SPARSEDSL_NUM_THREADS") or 0)


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
