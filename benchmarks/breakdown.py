"""Where a model's forward time goes: linears, attention, norms and the rest, from torch.profiler.

Every operator's own time (its children's left out, so nothing counts twice) is put in the first
category whose name pattern it matches: sparsedsl's kernels show in the profiler as
``sparsedsl::<kernel>`` (eager calls and the custom op under torch.compile), torch's as ``aten::``
names. ``other`` is the wall time less the three: small ops, Python, dispatch, and what inductor
fused into kernels of its own (which the profiler shows as one compiled region).
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch

CATEGORIES = {  # checked in this order: a linear kernel with a fused norm counts as a linear
    "attention": ("attention", "scaled_dot_product", "softmax", "aten::bmm", "aten::baddbmm"),
    "linears": ("linear", "aten::addmm", "aten::mm"),
    "norms": ("norm",),
}
SHOWN = ("linears", "attention", "norms", "other")


def category(name: str) -> str | None:
    """The category an operator's time counts in (None: other)."""
    lowered = name.lower()
    for kind, patterns in CATEGORIES.items():
        if any(p in lowered for p in patterns):
            return kind
    return None


def breakdown(fn: Callable[[], object], calls: int = 3) -> dict[str, float]:
    """Milliseconds per call of ``fn`` in each category, and ``total``, over ``calls`` profiled calls
    (after one unprofiled call, so that nothing is compiled or bound while profiling)."""
    with torch.inference_mode():
        fn()
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            start = time.perf_counter()
            for _ in range(calls):
                fn()
            total = (time.perf_counter() - start) * 1e3 / calls
    times = dict.fromkeys(CATEGORIES, 0.0)
    for event in prof.key_averages():
        kind = category(event.key)
        if kind is not None:
            times[kind] += event.self_cpu_time_total / 1e3 / calls
    times["other"] = max(total - sum(times.values()), 0.0)
    times["total"] = total
    return times


def line(times: dict[str, float]) -> str:
    """``linears 12.1 ms (40%) · attention ...`` for a table."""
    total = times["total"]
    parts = [f"{k} {times[k]:.1f} ms ({times[k] / total:.0%})" for k in SHOWN]
    return " · ".join(parts)
