"""The llvmlite backend: never imports TVM, AOT builds, schedule support, compile_model."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import sparsedsl as sd
from sparsedsl.cli import main as cli
from sparsedsl.runtime import calls

ROOT = Path(__file__).parents[2]


def test_llvm_backend_never_imports_tvm(tmp_path):
    script = (
        "import sys, torch, sparsedsl as sd\n"
        f"prog = sd.compile({str(ROOT / 'examples' / 'linear.sdsl')!r}, backend='llvm')\n"
        "w = sd.prune(torch.randn(32, 16), 'NM(2, 4)', 0.5)\n"
        "x = torch.randn(5, 16)\n"
        "assert torch.allclose(prog.linear(x, prog.pack('NM(2, 4)', w), torch.zeros(32)), x @ w.T, atol=1e-5)\n"
        f"sd.load({str(tmp_path)!r})\n"
        "assert 'tvm' not in sys.modules, 'tvm was imported'\n"
    )
    assert cli(["build", str(ROOT / "examples" / "minilm.sdsl"), "-o", str(tmp_path), "--backend", "llvm"]) == 0
    subprocess.run([sys.executable, "-c", script], check=True)


def test_emit_llvm_backend(capsys):
    assert (
        cli(
            [
                "emit",
                str(ROOT / "examples" / "linear.sdsl"),
                "--kernel",
                "linear",
                "--stage",
                "llvm",
                "--backend",
                "llvm",
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "define void" in out and "<16 x float>" in out or "<8 x float>" in out


@pytest.mark.parametrize("threads", [1, 2, 3])
def test_a_nested_parallel_loop_runs_on_every_thread_count(threads, monkeypatch, set_threads):
    """A parallel loop inside others is outlined and forked where it is met (codegen._outlined_parallel)."""
    set_threads(threads)
    monkeypatch.setattr(calls, "PARALLEL_WORK", 1)
    source = """
kernel lin(X: f32[M, K], W: f32[N, K] @ CSR, b: f32[N]) -> (Y: f32[M, N]) {
    Y[m, n] = relu(sum(k) X[m, k] * W[n, k] + b[n])
}
schedule lin on cpu { parallel n }
"""
    prog = sd.compile(source, backend="llvm")
    assert "lin.body.n" in prog.lin.source("llvm", "CSR")
    for m, n in [(1, 37), (5, 64), (33, 3)]:
        w = prog.pack("CSR", torch.randn(n, 48) * (torch.rand(n, 48) < 0.4))
        x, b = torch.randn(m, 48), torch.randn(n)
        torch.testing.assert_close(prog.lin(x, w, b), torch.relu(x @ w.to_dense().T + b))


def test_compile_model_llvm_backend():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 8))
    sparse = sd.compile_model(model, {"0": ("BSR(4, 1)", 0.5), "2": ("CSR", 0.5)}, backend="llvm")
    reference = nn.Sequential(sparse[0].to_dense(), nn.ReLU(), sparse[2].to_dense())
    x = torch.randn(70, 16, requires_grad=True)
    torch.testing.assert_close(sparse(x), reference(x), rtol=1e-4, atol=1e-5)
    sparse(x).sum().backward()
    assert sparse[0].values.grad is not None
