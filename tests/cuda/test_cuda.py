"""The CUDA target: every prelude format and the three kernels generate CUDA that nvcc compiles
for sm_80 and sm_90 (no GPU needed); on a machine with a GPU the differential tests run there."""

from __future__ import annotations

import functools
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import sparsedsl as sd
from sparsedsl.cli import main as cli
from tests.cuda.gpu_cases import (
    GATHERING,
    SDDMM,
    STAGED,
    TENSOR_CORES,
    TENSOR_CORES_NM,
    VECTOR_TOKENS,
    staged_source,
    tensor_core_source,
    vector_source,
    warp_schedule,
)
from tests.strategies import FORMATS, prune_to_fit, sparse_case

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
    _nvcc(source, prog.arch, tmp_path)


def _nvcc(source: str, arch: str, tmp_path: Path) -> None:
    cu = tmp_path / "kernel.cu"
    cu.write_text(source)
    result = subprocess.run(
        [NVCC, f"-arch={arch}", "-c", str(cu), "-o", str(tmp_path / "kernel.o")],
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


def _emulate(source) -> sd.Program:
    """A CPU program whose kernels are those of ``source`` compiled for CUDA (default mapping and
    ``on cuda`` schedules) with their grid and thread loops run serially: checks the GPU mapping
    (lanes to threads, accumulators, guards, cross-thread sums) numerically without a GPU."""
    from sparsedsl.ir.emulate import serial_equivalent

    gpu = sd.compile(source, target="cuda", arch="sm_80", cache_dir="off")
    prog = sd.compile(source, cache_dir="off")
    for name, compiled in prog.kernels.items():

        def serial(fmt, index_dtypes=None, mapped=gpu.kernels[name]):
            return {"cuda": serial_equivalent(mapped.lowered(fmt, index_dtypes)["cuda"])}

        compiled.lowered = serial
    return prog


@pytest.fixture(scope="module")
def emulated():
    return _emulate(KERNELS)


@pytest.mark.parametrize("fmt", [f for f, _, _ in FORMATS])
@pytest.mark.parametrize("m", [1, 45])
def test_gpu_mapping_computes_the_right_numbers(emulated, fmt, m):
    _check_layer(emulated, ("bias_gelu", "transposed", "sddmm"), fmt, 32, 64, m, 0.7, m)


def _check_layer(prog, kernels, fmt, n, k, m, sparsity, seed) -> None:
    """A linear layer with bias and GELU, its transposed product and (if named) its SDDMM on a
    pruned ``n x k`` weight, against dense torch."""
    linear, transposed, sddmm = kernels
    gen = torch.Generator().manual_seed(seed)
    w = prune_to_fit(torch.randn(n, k, generator=gen), prog.format(fmt), sparsity)
    W = prog.pack(fmt, w)
    x, b, g = torch.randn(m, k, generator=gen), torch.randn(n, generator=gen), torch.randn(m, n, generator=gen)
    close = {"rtol": 1e-4, "atol": 1e-4}
    torch.testing.assert_close(getattr(prog, linear)(x, W, b), torch.nn.functional.gelu(x @ w.T + b), **close)
    torch.testing.assert_close(getattr(prog, transposed)(g, W), g @ w, **close)
    if sddmm:
        pattern = W.with_values(torch.ones_like(W.values)).to_dense()
        torch.testing.assert_close(getattr(prog, sddmm)(g, x, W).to_dense(), (g.T @ x) * pattern, **close)


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(case=sparse_case())
def test_matrix_vector_products_on_the_gpu_mapping(emulated, case):
    """Without tokens: the product a thread per row (or block row), the transposed product as a
    zeroing kernel then a thread per row adding atomically into the output, run serially."""
    fmt, n, k, _, sparsity, seed = case
    gen = torch.Generator().manual_seed(seed)
    w = prune_to_fit(torch.randn(n, k, generator=gen), emulated.format(fmt), sparsity)
    W = emulated.pack(fmt, w)
    x, b, v = torch.randn(k, generator=gen), torch.randn(n, generator=gen), torch.randn(n, generator=gen)
    close = {"rtol": 1e-4, "atol": 1e-4}
    torch.testing.assert_close(emulated.matvec(W, x, b), torch.relu(w @ x + b), **close)
    torch.testing.assert_close(emulated.matvec_t(W, v), w.T @ v, **close)


@needs_nvcc
@pytest.mark.parametrize("fmt", ["CSR", "COO", "BSR(16, 16)", "NM(2, 4)", "ELL(3)"])  # every mapping
def test_matrix_vector_products_compile(fmt, tmp_path):
    prog = sd.compile(KERNELS, target="cuda", arch="sm_90")
    for kernel in (prog.matvec, prog.matvec_t):
        _nvcc(kernel.source("cuda", fmt), "sm_90", tmp_path)


@needs_nvcc
def test_a_scatter_without_tokens_launches_its_kernels_in_turn(tmp_path):
    """Zero the float32 sum, add into it a thread per row, apply the epilogue a thread per element;
    the launches survive export/load."""
    from sparsedsl.backends.cuda.module import CudaModule

    prog = sd.compile(
        "kernel t(W: f16[N, K] @ CSR, x: f16[N], b: f16[K]) -> (y: f16[K]) {"
        " y[k] = relu(sum(n) W[n, k] * x[n] + b[k]) }",
        target="cuda",
        arch="sm_80",
        cache_dir="off",
    )
    inst = prog.t.instance()
    W = prog.pack("CSR", sd.prune(torch.randn(300, 1000), "CSR", 0.5).half())
    x, b, y, acc = torch.empty(300), torch.empty(1000), torch.empty(1000), torch.empty(1000)
    sources = {"arg": {"x": x, "b": b}, "out": {None: y}, "sparse": W.buffers, "scratch": {("K",): acc}}
    flat = [sources[kind][key] for kind, key in inst.plan(prog.t.kernel)]
    assert "atomicAdd" in prog.t.source("cuda")
    (launches,) = inst.built.launches.values()
    grids = [la.dims(flat) for la in launches]
    assert grids == [((8, 1, 1), (128, 1, 1)), ((3, 1, 1), (128, 1, 1)), ((8, 1, 1), (128, 1, 1))]
    inst.built.export(tmp_path / "m.json")
    assert CudaModule.load(tmp_path / "m.json").launches == inst.built.launches


@settings(
    max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture]
)
@given(case=sparse_case(), m=st.integers(1, 300))
def test_gpu_mapping_matches_dense_on_random_cases(emulated, case, m):
    """The default GPU mapping of the three kernels, run serially, over random formats, shapes
    (token counts across the 128-token tiles) and sparsities."""
    fmt, n, k, _, sparsity, seed = case
    _check_layer(emulated, ("bias_gelu", "transposed", "sddmm"), fmt, n, k, m, sparsity, seed)


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
    (launch,) = next(iter(loaded.launches.values()))
    grid, block = launch.dims(flat)
    assert grid == (40, 1, 1) and block == (32, 1, 1)  # a block per row, 128 tokens: 4 a thread


@pytest.mark.parametrize("threads", [32, 64, 96])
@pytest.mark.parametrize("fmt", ["CSR", "BSR(2, 4)"])
def test_a_reduction_bound_to_threads_sums_across_them(threads, fmt):
    """``bind`` on a loop that sums into an outer accumulator: a cross-thread reduction."""
    prog = _emulate(warp_schedule(threads))
    gen = torch.Generator().manual_seed(threads)
    a, b = torch.randn(70, 16, generator=gen), torch.randn(70, 24, generator=gen)
    S = prog.pack(fmt, prune_to_fit(torch.randn(16, 24, generator=gen), prog.format(fmt), 0.6))
    pattern = S.with_values(torch.ones_like(S.values)).to_dense()
    torch.testing.assert_close(prog.sddmm(a, b, S).to_dense(), (a.T @ b) * pattern, rtol=1e-4, atol=1e-4)


@needs_nvcc
def test_cross_thread_reductions_compile_to_shuffles(tmp_path):
    for threads in (32, 128):
        source = sd.compile(warp_schedule(threads), target="cuda", arch="sm_90", cache_dir="off").sddmm.source("cuda")
        assert "__shfl_down_sync" in source and f"__launch_bounds__({threads})" in source
    default = sd.compile(SDDMM, target="cuda", arch="sm_90", cache_dir="off").sddmm
    assert "threadIdx" in default.source("ir") and "__shfl_down_sync" in default.source("cuda")


@pytest.mark.parametrize(
    "kernel, directives, message",
    [
        (SDDMM, "bind m_o to threadIdx.x", "its extent must be a constant"),
        (SDDMM, "split m by 2048 into mo, mt; bind mt to threadIdx.x", "at most 1024"),
        (SDDMM, "split k by 32 into ko, kt; bind kt to threadIdx.x", "'m_t' around or inside it"),
        (SDDMM, "split m by 32 into mo, mt; bind mo to blockIdx.y", "cannot bind to blockIdx.y loop 'mo'"),
        (
            SDDMM,
            "split m by 1 into mo, mt; reorder mt, mo; bind mt to threadIdx.x; bind z0 to threadIdx.x",
            "write a register buffer declared outside the loop",
        ),
        (
            "kernel lin(X: f32[M, K], W: f32[N, K] @ CSR) -> (Y: f32[M, N]) { Y[m, n] = sum(k) X[m, k] * W[n, k] }",
            "split k by 4 into ko, ki; bind ki to threadIdx.x",
            "'m_t' around or inside it",
        ),
        (SDDMM, "stage A in shared at k", "not an offset plus constant multiples"),
        (SDDMM, "stage Y in shared at k", "not a tensor argument"),
        (SDDMM, "stage S_vals in shared at k", "the loop does not read it"),
        (SDDMM, "stage A in shared at nope", "has no loop 'nope'"),
        (
            "kernel lin(X: f32[M, K], W: f32[N, K] @ BSR(32, 32)) -> (Y: f32[M, N]) {"
            " Y[m, n] = sum(k) X[m, k] * W[n, k] }",
            "tile m by 512; stage X in shared at k_o",
            "more than 49152",
        ),
    ],
)
def test_illegal_gpu_schedules_are_located_errors(kernel, directives, message):
    with pytest.raises(sd.ScheduleError, match=message) as err:
        name = kernel.split()[1].split("(")[0]
        sd.compile(f"{kernel}\nschedule {name} on cuda {{\n  {directives}\n}}", target="cuda")
    assert "^" in err.value.render()


def test_thread_reductions_must_be_plain_sums():
    """Only ``acc[i] = acc[i] + e`` (acc declared outside, not read otherwise) may span threads."""
    from sparsedsl.ir import loop_ir as L
    from sparsedsl.ir.schedule import set_kind

    acc, x = L.Buffer("acc", "float32", (L.const(1),), "local"), L.Buffer("x", "float32", (L.const(32),))
    t, zero = L.Var("t"), L.const(0)

    def func(*body):
        loop = L.For(t, zero, L.const(32), L.seq(*body))
        return L.LoopFunc("f", (x,), L.seq(L.Alloc(acc), loop))

    summed = L.Store(acc, (zero,), L.add(L.load(acc, zero), L.load(x, t)))
    set_kind(func(summed), "t", L.LoopKind.THREAD_X)
    scaled = L.Store(acc, (zero,), L.mul(L.load(acc, zero), L.load(x, t)))
    with pytest.raises(sd.ScheduleError, match="not as a sum"):
        set_kind(func(scaled), "t", L.LoopKind.THREAD_X)
    peek = L.Store(x, (t,), L.load(acc, zero))
    with pytest.raises(sd.ScheduleError, match="read inside it"):
        set_kind(func(summed, peek), "t", L.LoopKind.THREAD_X)
    with pytest.raises(sd.ScheduleError, match="all write 'x'"):
        set_kind(func(L.Store(x, (zero,), L.load(x, t))), "t", L.LoopKind.THREAD_X)


@pytest.mark.parametrize("fmt, linear_loop, transposed_loop", STAGED)
@pytest.mark.parametrize("m", [1, 130])
def test_staging_in_shared_memory_keeps_the_numbers(fmt, linear_loop, transposed_loop, m):
    prog = _emulate(staged_source(fmt, linear_loop, transposed_loop))
    assert "shared X_s" in sd.compile(staged_source(fmt, linear_loop, transposed_loop), target="cuda").lin.source("ir")
    _check_layer(prog, ("lin", "tr", None), fmt, 32, 64, m, 0.7, m)


@needs_nvcc
@pytest.mark.parametrize("fmt, linear_loop, transposed_loop", STAGED[::3])
def test_staged_kernels_compile(fmt, linear_loop, transposed_loop, tmp_path):
    """TVM's ThreadSync adds the barriers a thread's reads of others' copies need (none where each
    thread reads only what it copied)."""
    prog = sd.compile(staged_source(fmt, linear_loop, transposed_loop), target="cuda", arch="sm_90", cache_dir="off")
    for kernel in (prog.lin, prog.tr):
        source = kernel.source("cuda")
        assert "__shared__" in source
        _nvcc(source, "sm_90", tmp_path)


def test_staging_needs_a_box_known_from_loop_bounds_and_a_place():
    """N:M reads its group at a stored slot coordinate: no constant box to stage."""
    with pytest.raises(sd.ScheduleError, match=r"index \(\(k_o \* 4\) \+ k_i_c\) is not an offset"):
        sd.compile(staged_source("NM(2, 4)", "k_o", "n"), target="cuda")
    with pytest.raises(sd.ScheduleError, match="'k_i': it is not directly inside the thread loop"):
        sd.compile(staged_source("BSR(4, 4)", "k_i", "n_o"), target="cuda")


def test_staging_belongs_to_gpu_schedules_in_shared_memory():
    for schedule, message in [
        ("schedule sddmm on cpu { stage A in shared at k }", "GPU schedules only"),
        ("schedule sddmm on cuda { stage A in global at k }", "in 'shared' memory only"),
    ]:
        with pytest.raises(sd.SdslError, match=message):
            sd.compile(SDDMM + schedule, target="cuda")


@pytest.mark.parametrize("fmt, dtype, tile", [case for case in TENSOR_CORES if case[1] == "f16"])
@pytest.mark.parametrize("m", [1, 70, 128, 130])
def test_tensor_core_mapping_keeps_the_numbers(fmt, dtype, tile, m):
    """The wmma tiles, the activation tiles (from X_T when whole and aligned: 128 tokens; else
    staged) and the write-out through shared memory, run serially: products of the rounded operands
    summed in float32 (f16: TVM has no bf16 CPU code
    generator here; bf16 compiles below and runs in the GPU tests)."""
    torch_dtype = {"f16": torch.float16, "bf16": torch.bfloat16}[dtype]
    prog = _emulate(tensor_core_source(fmt, dtype, tile))
    gen = torch.Generator().manual_seed(m)
    w = prune_to_fit(torch.randn(64, 96, generator=gen), prog.format(fmt), 0.6).to(torch_dtype)
    x, b = torch.randn(m, 96, generator=gen).to(torch_dtype), torch.randn(64, generator=gen).to(torch_dtype)
    expected = torch.nn.functional.gelu(x.float() @ w.float().T + b.float())
    actual = prog.lin(x, prog.pack(fmt, w), b).float()
    assert ((actual - expected).norm() / expected.norm()).item() < 1e-2


@pytest.fixture(scope="module")
def tensor_core_programs():
    return {case: _emulate(tensor_core_source(*case)) for case in TENSOR_CORES if case[1] == "f16"}


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_tensor_cores_match_dense_on_random_cases(tensor_core_programs, data):
    """Random block counts, token counts (aligned, partial and unaligned tiles) and sparsities."""
    (fmt, dtype, tile), prog = data.draw(st.sampled_from(sorted(tensor_core_programs.items())))
    bm, bn = (int(v) for v in fmt[4:-1].split(", "))
    n, k = bm * data.draw(st.integers(1, 4)), bn * data.draw(st.integers(1, 4))
    m, sparsity = data.draw(st.integers(1, 200)), data.draw(st.floats(0.0, 0.95))
    gen = torch.Generator().manual_seed(data.draw(st.integers(0, 2**31 - 1)))
    w = prune_to_fit(torch.randn(n, k, generator=gen), prog.format(fmt), sparsity).half()
    x, b = torch.randn(m, k, generator=gen).half(), torch.randn(n, generator=gen).half()
    expected = torch.nn.functional.gelu(x.float() @ w.float().T + b.float())
    actual = prog.lin(x, prog.pack(fmt, w), b).float()
    assert ((actual - expected).norm() / max(expected.norm().item(), 1e-6)).item() < 1e-2


@needs_nvcc
@pytest.mark.parametrize("arch", ["sm_80", "sm_90"])
def test_tensor_core_kernels_compile_to_wmma(arch, tmp_path):
    cases = TENSOR_CORES + TENSOR_CORES_NM if arch == "sm_90" else [TENSOR_CORES[0], TENSOR_CORES_NM[-1]]
    for case in cases:  # every case for sm_90; for sm_80 one of each kind (f16 BSR, bf16 N:M)
        source = sd.compile(tensor_core_source(*case), target="cuda", arch=arch, cache_dir="off").lin.source("cuda")
        assert "wmma::mma_sync" in source and "wmma::load_matrix_sync" in source
        _nvcc(source, arch, tmp_path)


@pytest.mark.parametrize(
    "fmt, dtype, tile, message",
    [
        ("BSR(16, 16)", "f32", 64, "float16 or bfloat16"),
        ("BSR(4, 1)", "f16", 64, "weight blocks are 4 x 1 with a 64-token tile; tensor cores need block sides"),
        ("BSR(16, 16)", "f16", 16, "token tile that is a multiple of 32"),
        ("BSR(64, 16)", "f16", 128, "more than 16 fragments"),
        ("CSR", "f16", 64, "no block product"),
        ("BSR(16, 512)", "f16", 64, "more than 49152"),
        ("NM(1, 3)", "f16", 64, "groups of 3 columns must divide 16"),
        ("ELL(3)", "f16", 64, "no N:M product"),
    ],
)
def test_tensorize_refuses_what_tensor_cores_cannot_do(fmt, dtype, tile, message):
    with pytest.raises(sd.ScheduleError, match=message) as err:
        sd.compile(tensor_core_source(fmt, dtype, tile), target="cuda")
    assert "tensorize" in err.value.render()


@pytest.mark.parametrize(
    "source, tokens",
    [
        ("kernel tr(G: f16[M, N], W: f16[N, K] @ CSR) -> (Y: f16[M, K]) { Y[m, k] = sum(n) G[m, n] * W[n, k] }", 3),
        ("kernel tr(G: f16[N], W: f16[N, K] @ CSR) -> (Y: f16[K]) { Y[k] = sum(n) G[n] * W[n, k] }", None),
    ],
)
def test_half_precision_scatter_sums_in_float32(source, tokens):
    """The transposed product in f16 (with tokens, and the matrix-vector one) accumulates a thousand
    terms per output in a float32 scratch: the error is the output's rounding, not the sum's (f16
    sums would be ~10x worse)."""
    prog = _emulate(source)
    gen = torch.Generator().manual_seed(3)
    w = sd.prune(torch.randn(2048, 8, generator=gen), "CSR", 0.5).half()
    g = torch.randn(*([tokens] if tokens else []), 2048, generator=gen).half()
    expected = g.float() @ w.float()
    actual = prog.tr(g, prog.pack("CSR", w)).float()
    assert ((actual - expected).norm() / expected.norm()).item() < 1e-3


def test_tensor_cores_get_aligned_weight_values():
    """A values view that starts off 32 bytes is copied before wmma loads from it."""
    from sparsedsl.runtime.program import _aligned

    values = torch.zeros(40, dtype=torch.float16)
    views = _aligned({"vals": values[3:], "pos": values[:16]})
    assert views["vals"].data_ptr() % 32 == 0 and torch.equal(views["vals"], values[3:])
    assert views["pos"].data_ptr() == values.data_ptr()


def test_tensorize_maps_the_kernel_alone():
    """Tile statements are warp-wide: no thread binding or staging may follow them."""
    source = tensor_core_source("BSR(16, 16)", "f16", 64).replace(
        "tensorize }", "tensorize; bind tile_k to threadIdx.x }"
    )
    with pytest.raises(sd.ScheduleError, match="'bind' cannot follow 'tensorize'"):
        sd.compile(source, target="cuda")


@needs_nvcc
def test_coo_sddmm_spreads_its_positions_over_blocks():
    """A compressed root level (COO) has no row count on the host: a block per stored position."""
    prog = sd.compile(SDDMM.replace("@ CSR", "@ COO"), target="cuda", arch="sm_80", cache_dir="off")
    inst = prog.sddmm.instance(prog.format("COO"))
    S = prog.pack("COO", sd.prune(torch.randn(16, 24), "COO", 0.7))
    a, b = torch.randn(24, 16), torch.randn(24, 24)  # passed transposed ([N, M], [K, M])
    sources = {"transposed": {"A": a, "B": b}, "out": {None: torch.empty(S.nnz)}, "sparse": S.buffers}
    flat = [sources[kind][key] for kind, key in inst.plan(prog.sddmm.kernel)]
    (launch,) = next(iter(inst.built.launches.values()))
    grid, block = launch.dims(flat)
    assert grid == (S.nnz, 1, 1) and block == (32, 1, 1)


@pytest.mark.parametrize("fmt, n, k", [("NM(2, 4)", 40, 24), ("NM(1, 4)", 32, 64), ("NM(2, 8)", 48, 40)])
@pytest.mark.parametrize("m", [1, 70, 128])
def test_tensor_cores_for_n_m_decompress_each_tile(fmt, n, k, m):
    """N:M on tensor cores: each 16 x 16 weight tile decompressed in shared memory, run serially
    (rows and columns that are not multiples of 16 included)."""
    prog = _emulate(tensor_core_source(fmt, "f16", 64))
    gen = torch.Generator().manual_seed(m + n)
    w = sd.prune(torch.randn(n, k, generator=gen), prog.format(fmt)).half()
    x, b = torch.randn(m, k, generator=gen).half(), torch.randn(n, generator=gen).half()
    expected = torch.nn.functional.gelu(x.float() @ w.float().T + b.float())
    actual = prog.lin(x, prog.pack(fmt, w), b).float()
    assert ((actual - expected).norm() / expected.norm()).item() < 1e-2


@settings(max_examples=25, deadline=None)
@given(case=sparse_case(GATHERING), m=st.integers(1, 300))
def test_vector_tokens_keep_the_numbers(case, m):
    """``vectorize m_j``: each thread's tokens adjacent, read from activations padded to whole
    tiles without clamps, run serially over random formats, shapes and token counts."""
    fmt, n, k, _, sparsity, seed = case
    prog = _vector_programs(fmt)
    gen = torch.Generator().manual_seed(seed)
    w = prune_to_fit(torch.randn(n, k, generator=gen), prog.format(fmt), sparsity)
    x, b = torch.randn(m, k, generator=gen), torch.randn(n, generator=gen)
    expected = torch.nn.functional.gelu(x @ w.T + b)
    torch.testing.assert_close(prog.lin(x, prog.pack(fmt, w), b), expected, rtol=1e-4, atol=1e-4)


@functools.cache
def _vector_programs(fmt: str) -> sd.Program:
    return _emulate(vector_source(fmt, "f32"))


@needs_nvcc
def test_vector_tokens_compile_to_vector_loads(tmp_path):
    for fmt, dtype in VECTOR_TOKENS[::2]:  # each dtype
        source = sd.compile(vector_source(fmt, dtype), target="cuda", arch="sm_90", cache_dir="off").lin.source("cuda")
        assert re.search(r"\*\(\w+4\*\)\(X_ptr", source), (fmt, dtype)  # float4, half4...: 4 tokens a load
        _nvcc(source, "sm_90", tmp_path)


@pytest.mark.parametrize(
    "schedule, message",
    [
        ("schedule tr on cuda { vectorize m_j }", "only a kernel that gathers along its tokens"),
        ("schedule lin on cuda { tile m by 32; vectorize m_j }", "each thread computes one token"),
        ("schedule sddmm on cuda { vectorize m_j }", "has no loop 'm_j'"),  # no tokens: no such loop
    ],
)
def test_vector_tokens_need_several_gathered_tokens_a_thread(schedule, message):
    source = vector_source("CSR", "f32").replace("schedule lin on cuda { vectorize m_j }", "") + SDDMM
    source += "kernel tr(G: f32[M, N], W: f32[N, K] @ CSR) -> (Y: f32[M, K]) { Y[m, k] = sum(n) G[m, n] * W[n, k] }\n"
    with pytest.raises(sd.ScheduleError, match=message) as err:
        sd.compile(source + schedule, target="cuda")
    assert "vectorize" in err.value.render()
