"""Measured variant choice: which compiled variant of a kernel runs a call.

A kernel's default schedule compiles several variants (parallel token tiles, parallel rows, a
16-token and a 1-token tile). Rules of thumb (``schedule.pick``) choose well on the machines they
were written on; elsewhere the best variant depends on the cache sizes and the core count. So the
first call of a shape bucket (the token count rounded up to a power of two, every other size
exact) at a thread count times every variant on the call's own arguments and keeps the fastest,
under a key naming the variants' code: in the process, in the kernel cache directory (one JSON
file per CPU), and in AOT builds (``sd.build`` copies the choices made for its kernels so far; ``sd.load``
starts from them). Calls whose work is below ``MEASURED_WORK`` keep the rule: timing them would
measure the call, not the variant. ``SPARSEDSL_TUNE=0`` turns measuring off.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from sparsedsl import cache

MEASURED_WORK = 1 << 20  # multiply-adds from which a call's variant is measured
RUNS = 3  # timed runs of each variant at least (after one to warm it), the fastest counted
MIN_SPAN_S = 0.02  # seconds the rounds span at least, while under MAX_ROUNDS
MAX_ROUNDS = 25


def enabled() -> bool:
    """Whether variants are measured (``SPARSEDSL_TUNE``, on unless ``0``)."""
    return os.environ.get("SPARSEDSL_TUNE", "1") != "0"


def key(code: str, sizes: dict[str, int], token: str | None, threads: int) -> str:
    """The choice's key: the variants' code (``code``, a digest), the sizes with the token count
    ``token`` rounded up to a power of two, and the thread count."""
    bucket = {name: 1 << max(size - 1, 0).bit_length() if name == token else size for name, size in sizes.items()}
    return f"{code}|{','.join(f'{n}={s}' for n, s in sorted(bucket.items()))}|{threads}"


def fastest(runs: dict[str, Callable[[], None]]) -> str:
    """The name of the fastest of ``runs``: each run once, then rounds in turn, the best time of each
    counted: at least ``RUNS`` rounds, and more until they span ``MIN_SPAN_S`` (at most
    ``MAX_ROUNDS``). Rounds in turn, so that a slow moment of a shared machine hits them all; over
    a span, so that it cannot hit every run of one variant: in three rounds of a few hundred µs,
    one stall of a few ms made the slowest-but-one variant of a MiniLM layer the choice, 1.8x
    the fastest's time, in one first forward of three."""
    for run in runs.values():
        run()
    best = dict.fromkeys(runs, float("inf"))
    start = time.perf_counter()
    rounds = 0
    while rounds < RUNS or (rounds < MAX_ROUNDS and time.perf_counter() - start < MIN_SPAN_S):
        for name, run in runs.items():
            began = time.perf_counter()
            run()
            best[name] = min(best[name], time.perf_counter() - began)
        rounds += 1
    return min(best, key=best.__getitem__)


@dataclass
class Choices:
    """Measured choices by key, read from and written to the JSON file ``path`` (None: kept in
    this process only); ``known`` the choices read or made."""

    path: Path | None
    known: dict[str, str] = field(default_factory=dict)
    read: bool = False

    def get(self, choice: str) -> str | None:
        if not self.read and self.path is not None:
            self.known = {**_read(self.path), **self.known}
        self.read = True
        return self.known.get(choice)

    def put(self, choice: str, variant: str) -> None:
        self.known[choice] = variant
        if self.path is not None:
            merged = {**_read(self.path), choice: variant}
            with contextlib.suppress(OSError):  # a cache that cannot be written: this process keeps it
                cache.atomic_write(self.path, lambda p: p.write_text(json.dumps(merged, indent=0)))

    def of(self, codes: set[str]) -> dict[str, str]:
        """The choices made for variants of these codes (what an AOT build carries)."""
        self.get("")
        return {k: v for k, v in self.known.items() if k.split("|", 1)[0] in codes}


def choices_file(cache_dir: Path, cpu: str) -> Path:
    """Where the choices of this CPU live in a kernel cache directory."""
    return Path(cache_dir) / f"choices-{cpu}.json"


def _read(path: Path) -> dict[str, str]:
    """The choices in a file; a missing or damaged one holds none."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    if not isinstance(data, dict):
        return {}
    return {k: v for k, v in data.items() if isinstance(v, str)}
