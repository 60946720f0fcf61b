"""TVM kernels run their parallel loops on torch's OpenMP threads (backends/tvm/pool.py): no second
pool is started, nothing in the environment changes, and the numbers hold at any thread count."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import sparsedsl as sd
from sparsedsl.runtime import calls

EXAMPLE = Path(__file__).parents[2] / "examples" / "linear.sdsl"

# In a fresh process: torch's OpenMP pool started first, then a TVM kernel with parallel rows built
# and run (no kernel cache, so the library comes from the compiler) and loaded again from a cache.
CHILD = """
import os, sys, torch
torch.set_num_threads(2)
torch.nn.functional.linear(torch.randn(256, 256), torch.randn(256, 256))
before_threads, before_env = len(os.listdir("/proc/self/task")), dict(os.environ)
import sparsedsl as sd
for cache in ("off", sys.argv[1], sys.argv[1]):
    os.environ["SPARSEDSL_CACHE_DIR"] = cache
    prog = sd.compile(sys.argv[2], backend="tvm")
    w = torch.randn(64, 64) * (torch.rand(64, 64) < 0.3)
    x = torch.randn(40, 64)
    torch.testing.assert_close(prog.linear(x, prog.pack("CSR", w), torch.zeros(64)), x @ w.T)
os.environ["SPARSEDSL_CACHE_DIR"] = before_env.get("SPARSEDSL_CACHE_DIR", "")
changed = sorted(k for k in set(os.environ) | set(before_env) if os.environ.get(k) != before_env.get(k))
assert not changed, changed
threads = len(os.listdir("/proc/self/task"))
assert threads == before_threads, (before_threads, threads)
"""


def test_tvm_kernels_start_no_pool_and_change_no_environment(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("TVM_")}
    env["SPARSEDSL_NUM_THREADS"] = "2"
    result = subprocess.run(
        [sys.executable, "-c", CHILD, str(tmp_path / "cache"), str(EXAMPLE)],
        capture_output=True,
        text=True,
        env=env,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-3000:]


@pytest.mark.parametrize("threads", [1, 2, 3, 8])
def test_any_thread_count_gives_the_dense_answer(threads, monkeypatch, set_threads):
    """The thread count, torch's, is read at each call: the lambda splits its loop by the count it
    is given (every call forks here, however small its work)."""
    set_threads(threads)
    monkeypatch.setattr(calls, "PARALLEL_WORK", 1)
    prog = sd.compile(EXAMPLE, backend="tvm")
    torch.manual_seed(int(threads))
    for fmt, n, k, m in [("CSR", 96, 80, 1), ("BSR(4, 1)", 64, 48, 37), ("CSR", 5, 16, 300)]:
        w = torch.randn(n, k) * (torch.rand(n, k) < 0.3)
        packed = prog.pack(fmt, sd.prune(w, prog.format(fmt), 0.5))
        x = torch.randn(m, k)
        torch.testing.assert_close(prog.linear(x, packed, torch.ones(n)), x @ packed.to_dense().T + 1)
