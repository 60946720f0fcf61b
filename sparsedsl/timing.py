"""Timing for benchmarks and demos: medians of repeated runs, as these machines are noisy."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable


def median_time(fn: Callable[[], object], reps: int, warmup: int = 2, budget: float | None = None) -> float:
    """Median wall time in seconds of ``fn()`` over ``reps`` runs after ``warmup`` runs; with a
    ``budget`` in seconds, fewer runs when one run is slow (at least 3)."""
    for _ in range(warmup):
        fn()
    if budget is not None:
        start = time.perf_counter()
        fn()
        reps = max(3, min(reps, int(budget / max(time.perf_counter() - start, 1e-6))))
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)
