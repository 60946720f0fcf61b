"""Integer (i8 / u8 operands, i32 accumulators) and bf16 kernels, every format, both CPU backends:
integer results bit-exact against torch's int32 matmul, bf16 within f32 accumulation's bound (and
``vdpbf16ps``'s denormals read and flushed as 0); floats stored as integers rounded to nearest (even)
and saturated, as torch does."""

from __future__ import annotations

import json
import re
from pathlib import Path

import llvmlite.binding as llvm_ir
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import sparsedsl as sd
from sparsedsl.backends import host
from sparsedsl.backends.llvm.codegen import generate
from sparsedsl.ir import dot_products
from sparsedsl.runtime.ops import nn_program
from tests.strategies import FORMATS, fuzz_examples, prune_to_fit, sparse_case

SOURCE = """
format VNM = (i, j) -> (i / 4: dense, j / 4: dense, j % 4: nm(2, 4), i % 4: dense)

kernel imatmul(X: i8[M, K], W: i8[N, K] @ CSR) -> (Y: i32[M, N]) {
    Y[m, n] = sum(k) X[m, k] * W[n, k]
}
kernel umatmul(X: u8[M, K], W: i8[N, K] @ CSR) -> (Y: i32[M, N]) {
    Y[m, n] = sum(k) X[m, k] * W[n, k]
}
kernel itransposed(G: i8[M, N], W: i8[N, K] @ CSR) -> (Y: i32[M, K]) {
    Y[m, k] = sum(n) G[m, n] * W[n, k]
}
kernel qlinear(X: i8[M, K], sx: f32[M], W: i8[N, K] @ CSR, sw: f32[N], b: f32[N]) -> (Y: f32[M, N]) {
    Y[m, n] = relu((sum(k) X[m, k] * W[n, k]) * sx[m] * sw[n] + b[n])
}
kernel quantize(X: f32[M, K], inv: f32[M]) -> (Q: i8[M, K]) {
    Q[m, k] = X[m, k] * inv[m]
}
kernel requantize(X: i8[M, K], W: i8[N, K] @ CSR, s: f32[N]) -> (Y: u8[M, N]) {
    Y[m, n] = (sum(k) X[m, k] * W[n, k]) * s[n] + 128.0
}
kernel isddmm(G: i8[M, N], X: i8[M, K], W: i8[N, K] @ CSR) -> (D: i32[N, K] @ W) {
    D[n, k] = sum(m) G[m, n] * X[m, k]
}
kernel blinear(X: bf16[M, K], W: bf16[N, K] @ CSR, b: f32[N]) -> (Y: f32[M, N]) {
    Y[m, n] = sum(k) X[m, k] * W[n, k] + b[n]
}
"""
SETTINGS = settings(max_examples=fuzz_examples(8), deadline=None, suppress_health_check=[HealthCheck.too_slow])


@pytest.fixture(scope="module", params=["tvm", "llvm"])
def prog(request):
    return sd.compile(SOURCE, backend=request.param)


def _int8_weight(prog, case) -> tuple[torch.Tensor, sd.SparseTensor, torch.Generator]:
    """A pruned int8 weight over the whole range, -128 and 127 included, and its packed form."""
    fmt, n, k, _, sparsity, seed = case
    gen = torch.Generator().manual_seed(seed)
    mask = prune_to_fit(torch.randn(n, k, generator=gen), prog.format(fmt), sparsity) != 0
    w = torch.randint(-128, 128, (n, k), generator=gen, dtype=torch.int8) * mask
    return w, prog.pack(fmt, w), gen


def _imm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """The integer reference: int32 products, int32 sums."""
    return a.to(torch.int32) @ b.to(torch.int32)


@SETTINGS
@given(case=sparse_case())
def test_int8_bit_exact(prog, case):
    w, W, gen = _int8_weight(prog, case)
    m, k = case[3], w.shape[1]
    x = torch.randint(-128, 128, (m, k), generator=gen, dtype=torch.int8)
    y = prog.imatmul(x, W)
    assert y.dtype == torch.int32
    assert torch.equal(y, _imm(x, w.T))


@SETTINGS
@given(case=sparse_case())
def test_uint8_activations_bit_exact(prog, case):
    w, W, gen = _int8_weight(prog, case)
    x = torch.randint(0, 256, (case[3], w.shape[1]), generator=gen, dtype=torch.uint8)
    assert torch.equal(prog.umatmul(x, W), _imm(x, w.T))


@SETTINGS
@given(case=sparse_case())
def test_int8_transposed_bit_exact(prog, case):
    w, W, gen = _int8_weight(prog, case)
    g = torch.randint(-128, 128, (case[3], w.shape[0]), generator=gen, dtype=torch.int8)
    assert torch.equal(prog.itransposed(g, W), _imm(g, w))


@SETTINGS
@given(case=sparse_case())
def test_dequantized_epilogue(prog, case):
    """The i32 accumulator exact, then the f32 epilogue: as torch computes it from the int result."""
    w, W, gen = _int8_weight(prog, case)
    m, (n, k) = case[3], w.shape
    x = torch.randint(-128, 128, (m, k), generator=gen, dtype=torch.int8)
    sx, sw, b = torch.rand(m, generator=gen), torch.rand(n, generator=gen), torch.randn(n, generator=gen)
    expected = torch.relu(_imm(x, w.T).float() * sx[:, None] * sw + b)
    torch.testing.assert_close(prog.qlinear(x, sx, W, sw, b), expected, rtol=1e-6, atol=1e-5)


@SETTINGS
@given(case=sparse_case())
def test_int8_sampled_product_bit_exact(prog, case):
    """A sparse i32 output (SDDMM): the integer product at W's stored positions."""
    w, W, gen = _int8_weight(prog, case)
    m, (n, k) = case[3], w.shape
    g = torch.randint(-128, 128, (m, n), generator=gen, dtype=torch.int8)
    x = torch.randint(-128, 128, (m, k), generator=gen, dtype=torch.int8)
    d = prog.isddmm(g, x, W)
    assert d.values.dtype == torch.int32
    stored = W.with_values(torch.ones_like(W.values)).to_dense() != 0  # padding slots and zeros too
    assert torch.equal(d.to_dense(), _imm(g.T, x) * stored)


def test_a_float_stored_as_int8_is_rounded_to_even_and_saturated(prog):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(70, 100, generator=gen) * 3
    x[0, :6] = torch.tensor([0.5, 1.5, -2.5, 1000.0, -1000.0, float("inf")])
    inv = torch.rand(70, generator=gen) * 60
    inv[0] = 1.0
    expected = torch.round(x * inv[:, None]).clamp(-128, 127).to(torch.int8)
    assert torch.equal(prog.quantize(x, inv), expected)


@SETTINGS
@given(case=sparse_case())
def test_requantized_output(prog, case):
    """An integer sum dequantized and stored as u8 (the next layer's input, quantized in the
    epilogue): round(acc * s + 128) saturated to [0, 255]."""
    w, W, gen = _int8_weight(prog, case)
    x = torch.randint(-128, 128, (case[3], w.shape[1]), generator=gen, dtype=torch.int8)
    s = torch.rand(w.shape[0], generator=gen) / 64
    expected = torch.round(_imm(x, w.T).float() * s + 128.0).clamp(0, 255).to(torch.uint8)
    assert torch.equal(prog.requantize(x, W, s), expected)


# Blocks of 2j consecutive k in one row: the llvm backend sums them in pairs with vdpbf16ps where the
# CPU has AVX-512 BF16 (and BSR(8, 4), BSR(16, 16) of FORMATS too).
BF16_DOT_FORMATS = [("BSR(1, 2)", 1, 2), ("BSR(1, 4)", 1, 4), ("BSR(2, 4)", 2, 4)]
FLT_MIN = torch.finfo(torch.float32).tiny  # the smallest normal f32 (and bf16)


def _bf16_inputs(prog, case) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """bf16 activations, a pruned bf16 weight and a bias, over many magnitudes: a fifth of the
    tokens and of the weight's rows scaled by 2^-70 (their products underflow f32), a fifth by
    2^-130 (bf16 denormals); no bias on the scaled rows, whose outputs are all tiny."""
    fmt, n, k, m, sparsity, seed = case
    gen = torch.Generator().manual_seed(seed)

    def scale(rows: int) -> torch.Tensor:
        u = torch.rand(rows, 1, generator=gen)
        return torch.where(u < 0.2, 2.0**-70, 1.0) * torch.where(u > 0.8, 2.0**-130, 1.0)

    w_scale = scale(n)
    w = (prune_to_fit(torch.randn(n, k, generator=gen), prog.format(fmt), sparsity) * w_scale).bfloat16()
    x = (torch.randn(m, k, generator=gen) * scale(m)).bfloat16()
    return x, w, torch.randn(n, generator=gen) * (w_scale[:, 0] == 1)


def _bf16_bound(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """How far a bf16 kernel may be from the exact ``x w^T + b``: bf16 products are exact in f32,
    the f32 sum of K + 1 terms rounds K + 1 times (at most K + 1 ulp of sum |x w| + |b|);
    ``vdpbf16ps`` also reads a bf16 denormal as 0 (DAZ: its products lost) and flushes a denormal
    sum to 0 (FTZ: less than the smallest normal f32 per product)."""
    xd, wd, k = x.double(), w.double(), x.shape[1]
    rounding = (k + 1) * torch.finfo(torch.float32).eps * (xd.abs() @ wd.abs().T + b.double().abs())

    def denormal(t: torch.Tensor) -> torch.Tensor:
        return t.abs() * (t.abs() < FLT_MIN)

    lost = denormal(xd) @ wd.abs().T + xd.abs() @ denormal(wd).T
    return rounding + lost + k * FLT_MIN


@SETTINGS
@given(case=sparse_case([*FORMATS, *BF16_DOT_FORMATS]))
def test_bf16_within_rounding_bound(prog, case):
    """Against the exact sum of the bf16 values, every format, tiny and denormal values included."""
    x, w, b = _bf16_inputs(prog, case)
    y = prog.blinear(x, prog.pack(case[0], w), b)
    assert y.dtype == torch.float32
    assert ((y.double() - (x.double() @ w.double().T + b.double())).abs() <= _bf16_bound(x, w, b)).all()


def test_integer_dtypes_in_the_checker():
    with pytest.raises(sd.SdslError, match="dtype mismatch: i8 \\* f32"):
        sd.compile("kernel k(X: i8[M, K], W: f32[N, K] @ CSR) -> (Y: f32[M, N]) { Y[m, n] = sum(k) X[m, k] * W[n, k] }")
    with pytest.raises(sd.SdslError, match="'relu' takes float arguments"):
        sd.compile(
            "kernel k(X: i8[M, K], W: i8[N, K] @ CSR) -> (Y: i32[M, N]) { Y[m, n] = relu(sum(k) X[m, k] * W[n, k]) }"
        )
    with pytest.raises(sd.SdslError, match="does not fit in i8"):
        sd.compile("kernel k(X: i8[M, K]) -> (Y: i8[M, K]) { Y[m, k] = X[m, k] * 300 }")


# ---- int8 block products on the dot-product instructions (ir/dot_products.py) -------------------

# Blocks of consecutive k in one row: the llvm backend sums them 2 (vpmaddwd) or 4 (vpdpbusd) k at
# a time; BSR(1, 2) only 2 at a time (and BSR(8, 4), BSR(16, 16) of FORMATS are rewritten too).
DOT_FORMATS = [("BSR(1, 4)", 1, 4), ("BSR(2, 4)", 2, 4), ("BSR(1, 8)", 1, 8), ("BSR(1, 2)", 1, 2)]


def _check_dot_kernels(prog, case):
    """imatmul, umatmul (u8 activations: no offset) and qlinear bit-exact against the integer
    reference, activations over the whole range (-128 and 255 included)."""
    w, W, gen = _int8_weight(prog, case)
    m, (n, k) = case[3], w.shape
    x = torch.randint(-128, 128, (m, k), generator=gen, dtype=torch.int8)
    x[0, :4] = -128
    u = torch.randint(0, 256, (m, k), generator=gen, dtype=torch.uint8)
    u[0, :4] = 255
    assert torch.equal(prog.imatmul(x, W), _imm(x, w.T))
    assert torch.equal(prog.umatmul(u, W), _imm(u, w.T))
    sx, sw, b = torch.rand(m, generator=gen), torch.rand(n, generator=gen), torch.randn(n, generator=gen)
    expected = torch.relu(_imm(x, w.T).float() * sx[:, None] * sw + b)
    torch.testing.assert_close(prog.qlinear(x, sx, W, sw, b), expected, rtol=1e-6, atol=1e-5)


@SETTINGS
@given(case=sparse_case(DOT_FORMATS))
def test_dot_product_blocks_bit_exact(prog, case):
    """Both backends, the llvm one with this CPU's dot-product instruction."""
    _check_dot_kernels(prog, case)


@pytest.mark.parametrize("group", dot_products.GROUPS)
@settings(max_examples=4, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=sparse_case(DOT_FORMATS))
def test_each_dot_product_group_bit_exact(group, case):
    """The 2- and 4-product rewrites on any CPU: without the instruction (vpdpbusd needs VNNI) the
    llvm backend computes ``dot`` in plain integer vector operations, so the staging, the u8 offset
    and its weight-sum correction are checked here too."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(host, "dot_group", lambda features: group)
        _check_dot_kernels(sd.compile(SOURCE, backend="llvm"), case)


def _assembly(
    source: str, kernel: str, group: int, cpu: str, features: set[str], bits: int, fmt="BSR(1, 4)", dtype="int8"
) -> str:
    """The optimised assembly of ``kernel`` on ``fmt`` for another CPU, its ``dtype`` products
    rewritten for ``group``."""
    llvm_ir.initialize_native_target()
    llvm_ir.initialize_native_asmprinter()
    prog = sd.compile(source, backend="llvm")
    lowered = prog.kernels[kernel].lowered(prog.format(fmt)).values()
    funcs = [dot_products.rewrite(f, group, dtype) for f in lowered]
    module = llvm_ir.parse_assembly(str(generate(funcs, bits, "x86_64-unknown-linux-gnu", frozenset(features))))
    machine = llvm_ir.Target.from_triple("x86_64-unknown-linux-gnu").create_target_machine(cpu=cpu, opt=3)
    passes = llvm_ir.create_pass_builder(machine, llvm_ir.create_pipeline_tuning_options(speed_level=3))
    passes.getModulePassManager().run(module, passes)
    return machine.emit_assembly(module)


VNNI_CPUS = [  # (LLVM CPU name, the features the backend would see there, vector bits)
    ("icelake-server", {"avx2", "avx512f", "avx512bw", "avx512vl", "avx512vnni"}, 512),
    ("icelake-server", {"avx2", "avx512f", "avx512bw", "avx512vl", "avx512vnni"}, 256),
    ("sapphirerapids", {"avx2", "avx512f", "avx512bw", "avx512vl", "avx512vnni", "avxvnni"}, 256),
    ("alderlake", {"avx2", "avxvnni"}, 256),
]


@pytest.mark.parametrize(("cpu", "features", "bits"), VNNI_CPUS)
def test_vnni_targets_get_vpdpbusd(cpu, features, bits):
    """Compiled (not run: this machine may lack VNNI) for a VNNI CPU, the 4-product rewrite is one
    ``vpdpbusd`` per 4 k of a block and vector of tokens, with no widening multiply left."""
    assert host.dot_group(features) == 4
    asm = _assembly(dot_products_source(), "qlinear_bias", 4, cpu, features, bits)
    assert "vpdpbusd" in asm
    assert "vpmulld" not in asm
    if "avx512vnni" not in features:
        assert re.search(r"\{vex\}\s+vpdpbusd", asm)  # AVX-VNNI's encoding


def test_avx2_targets_get_vpmaddwd():
    """Without VNNI: i16 pairs, ``vpmaddwd`` + ``vpaddd`` per 2 k, no ``vpmulld``."""
    features = {"avx2", "fma"}
    assert host.dot_group(features) == 2
    asm = _assembly(dot_products_source(), "qlinear_bias", 2, "znver3", features, 256)
    assert "vpmaddwd" in asm
    assert "vpmulld" not in asm
    assert "vpdpbusd" not in asm


BF16_CPUS = [  # (LLVM CPU name, the features the backend would see there, vector bits)
    ("znver5", {"avx2", "avx512f", "avx512bw", "avx512vl", "avx512bf16"}, 512),
    ("sapphirerapids", {"avx2", "avx512f", "avx512bw", "avx512vl", "avx512bf16"}, 256),
]


@pytest.mark.parametrize(("cpu", "features", "bits"), BF16_CPUS)
def test_bf16_targets_get_vdpbf16ps(cpu, features, bits):
    """Compiled for an AVX-512 BF16 CPU, a BSR(1, 2) bf16 block is one ``vdpbf16ps`` per vector of
    tokens, the pair of weights one broadcast word."""
    assert host.bf16_dot(features)
    asm = _assembly(dot_products_source(), "blinear_bias", 2, cpu, features, bits, "BSR(1, 2)", "bf16")
    assert "vdpbf16ps" in asm


def test_avx2_targets_keep_f32_fmas_for_bf16():
    """Without AVX-512 BF16 the rewrite is not made (``host.bf16_dot``); made anyway, its ``dot`` is
    the f32 FMAs on the widened halves."""
    features = {"avx2", "fma"}
    assert not host.bf16_dot(features)
    asm = _assembly(dot_products_source(), "blinear_bias", 2, "znver3", features, 256, "BSR(1, 2)", "bf16")
    assert "vdpbf16ps" not in asm
    assert "vfmadd" in asm


def test_bf16_plain_dot_is_the_unrewritten_kernel():
    """The rewrite's plain ``dot`` (a CPU without the instruction; scalar and 1-token loops on any)
    adds the two widened products in order, as the unrewritten kernel does: bit-identical to it,
    tiny and denormal values included."""
    without = host.present() - {"avx512bf16"}
    cases = [(fmt, 24, 40, m, 0.5, seed) for seed, fmt in enumerate(("BSR(1, 2)", "BSR(2, 4)")) for m in (1, 70)]
    results = {}
    for rewritten in (True, False):
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(host, "present", lambda: without)
            patch.setattr(host, "bf16_dot", lambda features, rewritten=rewritten: rewritten)
            prog = sd.compile(SOURCE, backend="llvm")
            for case in cases:
                x, w, b = _bf16_inputs(prog, case)
                results.setdefault(case, []).append(prog.blinear(x, prog.pack(case[0], w), b))
                llvm = prog.kernels["blinear"].source("llvm", case[0])
                assert ("X_tq" in llvm) == rewritten and "dpbf16ps" not in llvm
    for case, (plain, unrewritten) in results.items():
        assert torch.equal(plain, unrewritten), case


def test_this_cpu_runs_its_dot_product_instructions():
    """The kernels built here (not cross-compiled) use the dot-product instructions this CPU has."""
    prog = sd.compile(dot_products_source(), backend="llvm")
    int8 = prog.kernels["qlinear_bias"].source("asm", "BSR(1, 4)")
    bf16 = prog.kernels["blinear_bias"].source("asm", "BSR(1, 2)")
    assert ("vpdpbusd" if host.dot_group(host.present()) == 4 else "vpmaddwd") in int8
    assert ("vdpbf16ps" in bf16) == host.bf16_dot(host.present())


def dot_products_source() -> str:
    return (Path(sd.__file__).parent / "nn.sdsl").read_text()


def test_ahead_of_time_dot_product_kernel(tmp_path):
    """An llvm AOT build of a BSR(1, 4) int8 kernel loads and stays bit-exact, a BSR(1, 2) bf16 one
    within its bound; its manifest's features give the dot-product choices the build made (vpdpbusd
    needs avxvnni / avx512vnni, vdpbf16ps avx512bf16)."""
    source = """
kernel ilin(X: i8[M, K], W: i8[N, K] @ BSR(1, 4)) -> (Y: i32[M, N]) {Y[m, n] = sum(k) X[m, k] * W[n, k]}
kernel blin(X: bf16[M, K], W: bf16[N, K] @ BSR(1, 2), b: f32[N]) -> (Y: f32[M, N]) {
    Y[m, n] = sum(k) X[m, k] * W[n, k] + b[n]
}"""
    sd.build(source, tmp_path, backend="llvm")
    prog = sd.load(tmp_path)
    fmt = prog.format("BSR(1, 4)")
    gen = torch.Generator().manual_seed(0)
    w = torch.randint(-128, 128, (16, 32), generator=gen, dtype=torch.int8)
    w = w * (sd.prune(torch.randn(16, 32, generator=gen), fmt, 0.5) != 0)
    for m in (1, 5, 70):
        x = torch.randint(-128, 128, (m, 32), generator=gen, dtype=torch.int8)
        assert torch.equal(prog.ilin(x, prog.pack(fmt, w)), _imm(x, w.T))
    x, wb, b = _bf16_inputs(prog, ("BSR(1, 2)", 16, 32, 70, 0.5, 0))
    y = prog.blin(x, prog.pack(prog.format("BSR(1, 2)"), wb), b)
    assert ((y.double() - (x.double() @ wb.double().T + b.double())).abs() <= _bf16_bound(x, wb, b)).all()
    features = json.loads((tmp_path / "manifest.json").read_text())["target"]["features"]
    assert host.dot_group(features) == host.dot_group(host.present())
    assert host.bf16_dot(features) == host.bf16_dot(host.present())


# ---- nn.sdsl's kernels that write the next layer's int8 input (runtime/requantize.py) -----------

NEXT_INPUT_FORMATS = [f for f in FORMATS if f[0] in ("CSR", "BSR(4, 1)", "NM(2, 4)")]
ACTIVATIONS = {"": lambda y: y, "_gelu": torch.nn.functional.gelu, "_relu": torch.relu}


@pytest.fixture(scope="module", params=["tvm", "llvm"])
def nn_prog(request):
    return nn_program(None, "cpu", request.param)


@settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=sparse_case(NEXT_INPUT_FORMATS), activation=st.sampled_from(sorted(ACTIVATIONS)))
def test_next_layer_input_rounded_and_saturated(nn_prog, case, activation):
    """``qlinear_bias[_act]_quant``: ``act(acc * sx * sw + b) * inv_s`` stored as int8, rounded half
    to even and saturated, as torch computes it in f32; an element may differ by one only where
    the f32 value lies within rounding noise of a half (the kernel may contract a product and a sum
    into one FMA; its erf is a polynomial)."""
    w, W, gen = _int8_weight(nn_prog, case)
    m, (n, k) = case[3], w.shape
    x = torch.randint(-128, 128, (m, k), generator=gen, dtype=torch.int8)
    sx, sw, b = torch.rand(m, generator=gen) / 8, torch.rand(n, generator=gen) / 8, torch.randn(n, generator=gen)
    inv = float(torch.rand(1, generator=gen)) * 4  # some outputs saturate at -128 or 127
    value = ACTIVATIONS[activation](_imm(x, w.T).float() * sx[:, None] * sw + b) * inv
    expected = torch.round(value).clamp(-128, 127).to(torch.int8)
    got = nn_prog.kernels[f"qlinear_bias{activation}_quant"](x, sx, W, sw, b, inv)
    assert got.dtype == torch.int8
    off = got.int() != expected.int()
    near_half = ((value - value.floor() - 0.5).abs() <= 1e-4 * value.abs().clamp(min=1)) & (value.abs() < 128)
    assert not (off & ~near_half).any() and (got.int() - expected.int()).abs().max() <= 1
