"""The llvmlite backend: never imports TVM, AOT builds, schedule support, compile_model."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import sparsedsl as sd
from sparsedsl.backends import host
from sparsedsl.cli import main as cli
from sparsedsl.runtime import calls

ROOT = Path(__file__).parents[2]


def test_llvm_backend_never_imports_tvm(tmp_path):
    """Neither compiling nor loading an AOT build of examples/minilm.sdsl, nor running a BERT
    compiled from it (its attention rule by the build's attention kernel, computing what SDPA
    does), imports TVM."""
    script = (
        "import sys, torch, sparsedsl as sd\n"
        f"prog = sd.compile({str(ROOT / 'examples' / 'linear.sdsl')!r}, backend='llvm')\n"
        "w = sd.prune(torch.randn(32, 16), 'NM(2, 4)', 0.5)\n"
        "x = torch.randn(5, 16)\n"
        "assert torch.allclose(prog.linear(x, prog.pack('NM(2, 4)', w), torch.zeros(32)), x @ w.T, atol=1e-5)\n"
        f"sd.load({str(tmp_path)!r})\n"
        f"sys.path.insert(0, {str(ROOT)!r})\n"
        "from tests.models import padded_tiny_bert\n"
        "from sparsedsl.runtime.attention import PLAN\n"
        "model, ids, mask, _ = padded_tiny_bert(24, (10, 3))\n"
        f"compiled = sd.compile_model(model, None, aot={str(tmp_path)!r})\n"
        "with torch.inference_mode():\n"
        "    got = compiled(input_ids=ids, attention_mask=mask).last_hidden_state\n"
        "    compiled.set_attn_implementation('sdpa')\n"
        "    want = compiled(input_ids=ids, attention_mask=mask).last_hidden_state\n"
        "kernels = getattr(compiled.encoder.layer[0].attention.self, PLAN).program.kernels\n"
        "assert kernels['attention_bthd'].bound.calls, 'the attention kernel did not run'\n"
        "assert (got - want).abs().max() < 1e-4, (got - want).abs().max()\n"
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


def test_the_few_token_variants_run_on_every_thread_and_gather(monkeypatch, set_threads):
    """A body that is not one parallel loop (the few-token variants: staging, rows and write-out
    each parallel) hands the call's thread count to each parallel loop in it; its vector loop over a
    row's nonzeros reads the activations as one vector: an N:M row's as a window it permutes
    (where the CPU has the permute: ir/windows.py), a CSR row's gathered (``masked.gather``),
    instead of lane by lane."""
    set_threads(2)
    monkeypatch.setattr(calls, "PARALLEL_WORK", 1)
    prog = sd.compile(ROOT / "examples" / "linear.sdsl", backend="llvm")
    # 76 stored values a row: whole groups of lanes, a leftover group and values alone
    w = prog.pack("NM(2, 4)", sd.prune(torch.randn(64, 152), "NM(2, 4)"))
    x, b = torch.randn(1, 152), torch.randn(64)
    inst = prog.linear.instance_for(w)
    kernel = inst.built.functions["linear_rows_one"]
    assert not kernel.parallel
    seen, run = [], kernel.cfunc
    kernel.cfunc = lambda *args: seen.append(args[-1]) or run(*args)
    torch.testing.assert_close(prog.linear(x, w, b), x @ w.to_dense().T + b)
    assert seen == [2]
    permuted = "avx2" in host.present()
    assert ("llvm.x86.avx" in inst.built.source("llvm")) == permuted
    assert ("llvm.masked.gather" in inst.built.source("llvm")) != permuted
    csr = prog.pack("CSR", sd.prune(torch.randn(64, 152), "CSR", 0.5))
    torch.testing.assert_close(prog.linear(x, csr, b), x @ csr.to_dense().T + b)
    assert "llvm.masked.gather" in prog.linear.instance_for(csr).built.source("llvm")


def test_local_buffers_start_on_a_cache_line():
    """Staged tiles and partial sums start on a 64-byte line (heap: ``aligned_alloc``; stack:
    ``align 64``): a 16-token row of a staged tile is one line, not two. With malloc's 16-byte
    alignment the few-token N:M kernel took 1.5x TVM's time (docs/BENCHMARKS.md)."""
    prog = sd.compile(ROOT / "examples" / "linear.sdsl", backend="llvm")
    w = prog.pack("NM(2, 4)", sd.prune(torch.randn(64, 152), "NM(2, 4)"))
    x, b = torch.randn(3, 152), torch.randn(64)
    torch.testing.assert_close(prog.linear(x, w, b), x @ w.to_dense().T + b)
    code = prog.linear.instance_for(w).built.source("llvm")
    assert "@\"malloc\"" not in code
    assert '@"aligned_alloc"(i64 64,' in code
    allocas = [line for line in code.splitlines() if " = alloca [" in line]
    assert allocas and all(line.endswith("align 64") for line in allocas)
