"""The CUDA target: every prelude format and the three kernels generate CUDA that nvcc compiles
for sm_80 and sm_90 (no GPU needed); on a machine with a GPU the differential tests run there."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
import torch

import sparsedsl as sd
from sparsedsl.cli import main as cli
from tests.strategies import FORMATS

HERE = Path(__file__).parent
KERNELS = HERE.parent / "kernels" / "epilogues.sdsl"
NAMES = ["bias_gelu", "transposed", "sddmm"]
NVCC = shutil.which("nvcc")
needs_nvcc = pytest.mark.skipif(NVCC is None, reason="nvcc is not installed: CUDA code cannot be compiled here")


@pytest.fixture(scope="module", params=["sm_80", "sm_90"])
def prog(request):
    return sd.compile(KERNELS, target="cuda", arch=request.param)


@needs_nvcc
@pytest.mark.parametrize("fmt", [f for f, _, _ in FORMATS])
@pytest.mark.parametrize("kernel", NAMES)
def test_cuda_source_compiles_with_nvcc(prog, kernel, fmt, tmp_path):
    source = prog.kernels[kernel].source("cuda", fmt)  # built by TVM for prog.arch
    assert "__global__" in source
    cu = tmp_path / "kernel.cu"
    cu.write_text(source)
    result = subprocess.run(
        [NVCC, f"-arch={prog.arch}", "-c", str(cu), "-o", str(tmp_path / "kernel.o")],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-2000:]


@needs_nvcc
def test_emit_cuda_stage(capsys):
    assert cli(["emit", str(KERNELS), "--kernel", "bias_gelu", "--stage", "cuda", "--arch", "sm_90"]) == 0
    assert "__global__" in capsys.readouterr().out


@needs_nvcc
def test_half_precision_kernels_build():
    prog = sd.compile(
        """
kernel h(X: f16[M, K], W: f16[N, K] @ BSR(4, 1), b: f16[N]) -> (Y: f16[M, N]) {
    Y[m, n] = gelu(sum(k) X[m, k] * W[n, k] + b[n])
}
kernel bh(X: bf16[M, K], W: bf16[N, K] @ NM(2, 4)) -> (Y: bf16[M, N]) {
    Y[m, n] = sum(k) X[m, k] * W[n, k]
}""",
        target="cuda",
        arch="sm_90",
    )
    assert "half" in prog.h.source("cuda")
    assert "bfloat16" in prog.bh.source("cuda")


def test_cpu_tensors_are_refused_before_running():
    prog = sd.compile(KERNELS, target="cuda", arch="sm_80")
    w = sd.prune(torch.randn(8, 8), "CSR", 0.5)
    with pytest.raises(sd.ArgumentError, match="compiled for cuda"):
        prog.plain(torch.randn(2, 8), prog.pack("CSR", w))


@needs_nvcc
def test_compile_model_for_cuda_and_aot(tmp_path):
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 8))
    sparse = sd.compile_model(model, {"0": ("BSR(4, 1)", 0.5), "2": ("NM(2, 4)", 0.5)}, target="cuda")
    assert all(r.sparse for r in sd.report(sparse))
    with pytest.raises(sd.ArgumentError, match="compiled for cuda"):
        sparse(torch.randn(3, 16))
    rules = tmp_path / "r.sdsl"
    rules.write_text(
        "kernel lin(X: f32[M, K], W: f32[N, K] @ BSR(4, 1), b: f32[N]) -> (Y: f32[M, N]) {\n"
        "    Y[m, n] = sum(k) X[m, k] * W[n, k] + b[n]\n}\n"
    )
    out = tmp_path / "build"
    assert cli(["build", str(rules), "-o", str(out), "--target", "cuda", "--arch", "sm_80"]) == 0
    loaded = sd.load(out)  # a cubin and its launch data: loads without TVM or a GPU
    assert loaded.target == "cuda"
    assert "__global__" in loaded.lin.source("cuda", "BSR(4, 1)")


def _serial(s):
    """The GPU-mapped loop nest with its grid and block loops run as plain loops."""
    from sparsedsl.ir import loop_ir as L

    match s:
        case L.For(var, start, extent, body, kind):
            gpu = kind in (L.LoopKind.BLOCK_X, L.LoopKind.BLOCK_Y, L.LoopKind.THREAD_X)
            return L.For(var, start, extent, _serial(body), L.LoopKind.SERIAL if gpu else kind)
        case L.Seq(stmts):
            return L.Seq(tuple(_serial(st) for st in stmts))
        case L.If(cond, then):
            return L.If(cond, _serial(then))
    return s


@pytest.fixture(scope="module")
def emulated():
    """The CPU program whose kernels are the CUDA mapping run serially: checks the grid mapping
    (lanes to threads, accumulators, guards) numerically without a GPU."""
    from dataclasses import replace

    from sparsedsl.ir.gpu import map_to_gpu
    from sparsedsl.ir.lowering import LowerOptions, lower
    from sparsedsl.runtime.program import _token_major

    prog = sd.compile(KERNELS, cache_dir="off")
    prog.cache_dir = None
    for compiled in prog.kernels.values():

        def gpu_lowered(fmt, compiled=compiled):
            kernel = compiled.kernel.with_format(fmt) if fmt is not None else compiled.kernel
            func = map_to_gpu(lower(kernel, LowerOptions(tile=128, gpu=True)), kernel.output.name, _token_major(kernel))
            return {"cuda": replace(func, body=_serial(func.body))}

        compiled.lowered = gpu_lowered
    return prog


@pytest.mark.parametrize("fmt", [f for f, _, _ in FORMATS])
@pytest.mark.parametrize("m", [1, 45])
def test_gpu_mapping_computes_the_right_numbers(emulated, fmt, m):
    gen = torch.Generator().manual_seed(m)
    w = sd.prune(torch.randn(32, 64, generator=gen), emulated.format(fmt), 0.7)
    W = emulated.pack(fmt, w)
    x, b, g = torch.randn(m, 64, generator=gen), torch.randn(32, generator=gen), torch.randn(m, 32, generator=gen)
    torch.testing.assert_close(emulated.bias_gelu(x, W, b), torch.nn.functional.gelu(x @ w.T + b), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(emulated.transposed(g, W), g @ w, rtol=1e-4, atol=1e-4)
    pattern = W.with_values(torch.ones_like(W.values)).to_dense()
    torch.testing.assert_close(emulated.sddmm(g, x, W).to_dense(), (g.T @ x) * pattern, rtol=1e-4, atol=1e-4)


@needs_nvcc
def test_cuda_module_round_trips_and_sizes_its_launch(tmp_path):
    """The cubin + launch data survive export/load; grid and block come from the call's shapes."""
    from sparsedsl.backends.cuda.module import CudaModule

    prog = sd.compile(KERNELS, target="cuda", arch="sm_80", cache_dir="off")
    inst = prog.plain.instance(prog.format("CSR"))
    inst.built.export(tmp_path / "m.json")
    loaded = CudaModule.load(tmp_path / "m.json")
    assert loaded.launches == inst.built.launches and loaded.cubin == inst.built.cubin
    W = prog.pack("CSR", sd.prune(torch.randn(40, 24), "CSR", 0.5))
    x, y = torch.randn(24, 70), torch.empty(70, 40)  # x is passed transposed ([K, M])
    sources = {"transposed": {"X": x}, "out": {None: y}, "sparse": W.buffers}
    flat = [sources[kind][key] for kind, key in inst.plan(prog.plain.kernel)]
    grid, block = next(iter(loaded.launches.values())).dims(flat)
    assert grid == (40, 1, 1) and block == (32, 1, 1)  # a block per row, 128 tokens: 4 a thread
