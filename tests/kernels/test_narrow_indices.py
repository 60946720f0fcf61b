"""Narrow index buffers: each level stores its coordinates in the narrowest integer type that holds
its extent (one byte up to 256, two up to 65536, else four; positions always int32). Every level
type at the type boundaries, both CPU backends and the CUDA code generator, packing round trips,
validation, modules' state dicts and AOT builds."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

import sparsedsl as sd
from sparsedsl.ir import levels as lv
from sparsedsl.ir import loop_ir as L
from sparsedsl.runtime import ops
from sparsedsl.runtime.aot import build
from tests.strategies import prune_to_fit

SOURCE = """
format CSC2 = (i, j) -> (j: dense, i: compressed)
format B4 = (i, j) -> (i: dense, j / 4: dense, j % 4: compressed)
kernel lin(X: f32[M, K], W: f32[N, K] @ CSR) -> (Y: f32[M, N]) {
    Y[m, n] = sum(k) X[m, k] * W[n, k]
}
"""

BOUNDARIES = [  # extent -> the type of its coordinates
    (255, torch.uint8),
    (256, torch.uint8),
    (257, torch.uint16),
    (65535, torch.uint16),
    (65536, torch.uint16),
    (65537, torch.int32),
]

# (format, the index buffer whose level's extent is the tested one, where that extent goes):
# every level type, over columns (K) or rows (N); the other dimension stays tiny
LEVELS = [
    ("CSR", "1_crd", "k"),  # compressed
    ("CSC2", "1_crd", "n"),  # compressed, over the rows
    ("COO", "0_crd", "n"),  # compressed(nonunique)
    ("COO", "1_crd", "k"),  # singleton
    ("ELL(2)", "1_crd", "k"),  # fixed(w)
    ("BSR(4, 1)", "1_crd", "k"),  # compressed, under a dense / 4 level
]


@pytest.fixture(scope="module", params=["tvm", "llvm"])
def prog(request):
    return sd.compile(SOURCE, backend=request.param)


def _weight(fmt: str, n: int, k: int, along: str) -> torch.Tensor:
    """A weight whose stored coordinates along ``along`` reach the extent's last value, its middle
    and the values whose top bit is set in a narrower type (128, 32768): a sign-extended load or a
    wrapped one reads another column."""
    extent = n if along == "n" else k
    marks = sorted({0, 127, 128, 32767, 32768, extent // 2, extent - 2, extent - 1} & set(range(extent)))
    gen = torch.Generator().manual_seed(extent)
    w = torch.zeros(n, k)
    if fmt.startswith("ELL"):  # two per row: a top bit and the last
        marks = [32768 if extent > 32768 else 128, extent - 1]
    if along == "k":
        w[:, marks] = torch.randn(n, len(marks), generator=gen)
    else:
        w[marks, :] = torch.randn(len(marks), k, generator=gen)
    return w


@pytest.mark.parametrize("extent, dtype", BOUNDARIES)
@pytest.mark.parametrize("fmt, buffer, along", LEVELS)
def test_every_level_type_at_the_type_boundaries(prog, fmt, buffer, along, extent, dtype):
    n, k = (extent, 2) if along == "n" else (4, extent)
    w = _weight(fmt, n, k, along)
    packed = prog.pack(fmt, w)
    assert packed.buffers[buffer].dtype == dtype
    assert all(packed.buffers[key].dtype == torch.int32 for key in packed.buffers if key.endswith("_pos"))
    assert torch.equal(packed.to_dense(), w)
    for m in (1, 3, 70):  # the one-token, few-token and tiled variants
        x = torch.randn(m, k, generator=torch.Generator().manual_seed(m))
        expected = x @ w.T
        torch.testing.assert_close(prog.lin(x, packed), expected, rtol=1e-4, atol=1e-4 * expected.abs().max().item())


@pytest.mark.parametrize("fmt", ["NM(2, 4)", "NM(1, 4)", "B4", "VNM"])
def test_levels_of_a_fixed_extent_take_a_byte_at_any_shape(fmt):
    prog = sd.compile(SOURCE + "format VNM = (i, j) -> (i / 4: dense, j / 4: dense, j % 4: nm(2, 4), i % 4: dense)\n")
    packed = prog.pack(fmt, prune_to_fit(torch.randn(4, 65540), prog.format(fmt), 0.5))
    (crd,) = [b for key, b in packed.buffers.items() if key.endswith("_crd")]
    assert crd.dtype == torch.uint8
    assert prog.format(fmt).index_dtype_choices() == [tuple(b.dtype for b in packed.structure())]


def test_coordinate_dtype():
    assert [lv.coordinate_dtype(e) for e, _ in BOUNDARIES] == [d for _, d in BOUNDARIES]
    assert lv.coordinate_dtype(0) == torch.uint8
    assert lv.coordinate_dtype(2**31) == torch.int32


@pytest.mark.parametrize("fmt", ["CSR", "CSC", "COO", "BSR(4, 1)", "BSR(8, 4)", "NM(2, 8)", "ELL(3)"])
@pytest.mark.parametrize("k", [8, 256, 264, 65536, 65544])
def test_pack_unpack_round_trips(fmt, k):
    prog = sd.compile(SOURCE)
    format_ = prog.format(fmt)
    w = prune_to_fit(torch.randn(8, k, generator=torch.Generator().manual_seed(k)), format_, 0.999)
    bufs = format_.pack(w)
    assert {key: b.dtype for key, b in bufs.items() if key != "vals"} == format_.index_dtypes((8, k))
    assert torch.equal(format_.unpack(bufs, (8, k)), w)
    assert all(i.dtype == torch.int64 for i in format_.indices(bufs, (8, k)))
    # a structure handed in wider (int64) is validated, then stored in the level's types
    wide = sd.SparseTensor.from_structure(format_, (8, k), [b.long() for b in bufs.values()][:-1], bufs["vals"])
    assert [b.dtype for b in wide.structure()] == list(format_.index_dtypes((8, k)).values())
    assert torch.equal(wide.to_dense(), w)


def test_validation_takes_the_narrow_types_and_narrows_others():
    prog = sd.compile(SOURCE)
    w = _weight("CSR", 4, 300, "k")
    packed = prog.pack("CSR", w)
    pos, crd = packed.structure()
    assert crd.dtype == torch.uint16
    same = sd.SparseTensor.from_structure(packed.format, (4, 300), [pos, crd], packed.values)
    assert same.structure()[1] is crd  # already the level's type: not copied
    for other in (torch.int16, torch.int32, torch.int64):
        narrowed = sd.SparseTensor.from_structure(packed.format, (4, 300), [pos, crd.to(other)], packed.values)
        assert narrowed.structure()[1].dtype == torch.uint16
        assert torch.equal(narrowed.to_dense(), w)
    # a byte-wide buffer where two bytes are expected is widened
    small = prog.pack("CSR", w[:, :250])
    widened = sd.SparseTensor.from_structure(packed.format, (4, 300), small.structure(), small.values)
    assert widened.structure()[1].dtype == torch.uint16


@pytest.mark.parametrize(
    "dtype, value, message",
    [
        (torch.int32, 300, r"crd\[3\] = 300 is outside \[0, 256\)"),
        (torch.int32, 65536 + 5, r"crd\[3\] = 65541 is outside \[0, 256\)"),  # would wrap to 5 in 16 bits
        (torch.int32, 256 + 7, r"crd\[3\] = 263 is outside \[0, 256\)"),  # would wrap to 7 in a byte
        (torch.int16, -1, r"crd\[3\] = -1 is outside \[0, 256\)"),
        (torch.uint16, 256, r"crd\[3\] = 256 is outside \[0, 256\)"),
    ],
)
def test_values_that_do_not_fit_the_level_are_refused(dtype, value, message):
    prog = sd.compile(SOURCE)
    packed = prog.pack("CSR", _weight("CSR", 4, 256, "k"))
    pos, crd = packed.structure()
    crd = crd.to(torch.int64)
    crd[3] = value
    with pytest.raises(sd.PackError, match=message):
        sd.SparseTensor.from_structure(packed.format, (4, 256), [pos, crd.to(dtype)], packed.values)


def test_loads_of_index_buffers_are_widened_before_any_arithmetic():
    """Every read of a narrow index buffer in the generated loop IR sits under a cast to int64."""
    prog = sd.compile(SOURCE, backend="llvm")
    packed = prog.pack("COO", _weight("COO", 300, 4, "n"))
    inst = prog.lin.instance_for(packed)
    assert [p.dtype for p in inst.params if isinstance(p, L.Buffer) and "_crd" in p.name] == ["uint16", "uint8"]
    for func in inst.variants.values():
        narrow = {p.name for p in func.params if isinstance(p, L.Buffer) and p.dtype.startswith("uint")}
        text = L.func_str(func)
        for name in narrow:
            reads = text.count(f"{name}[")
            assert reads and text.count(f"int64({name}[") == reads


def test_a_kernel_is_built_per_index_types():
    prog = sd.compile(SOURCE, backend="llvm")
    for k in (100, 300, 400):
        w = _weight("CSR", 4, k, "k")
        x = torch.randn(2, k)
        torch.testing.assert_close(prog.lin(x, prog.pack("CSR", w)), x @ w.T)
    assert sorted(key[1] for key in prog.lin.instances) == [("int32", "uint16"), ("int32", "uint8")]


def test_sparse_linear_state_dict_round_trip_and_old_int32_state_dicts():
    torch.manual_seed(0)
    linear = torch.nn.Linear(300, 6)
    layer = sd.SparseLinear.from_linear(linear, "CSR", 0.9)
    state = layer.state_dict()
    assert [state[f"structure_{i}"].dtype for i in range(2)] == [torch.int32, torch.uint16]
    x = torch.randn(5, 300)
    other = sd.SparseLinear.from_linear(torch.nn.Linear(300, 6), "CSR", 0.5)
    other.load_state_dict(state)
    torch.testing.assert_close(other(x), layer(x))
    # a state dict saved before narrow buffers: int32 coordinates, loaded into the level's types
    old = {key: v.int() if key.startswith("structure") else v for key, v in state.items()}
    fresh = sd.SparseLinear.from_linear(torch.nn.Linear(300, 6), "CSR", 0.5)
    fresh.load_state_dict(old)
    assert [b.dtype for b in fresh.structure()] == [torch.int32, torch.uint16]
    torch.testing.assert_close(fresh(x), layer(x))
    corrupt = dict(old, structure_1=old["structure_1"].clone())
    corrupt["structure_1"][0] = 70000
    with pytest.raises(sd.PackError, match=r"crd\[0\] = 70000 is outside \[0, 300\)"):
        fresh.load_state_dict(corrupt)


def test_values_gradient_reads_narrow_structures():
    torch.manual_seed(0)
    linear = torch.nn.Linear(40000, 3)
    layer = sd.SparseLinear.from_linear(linear, "CSR", 0.99)
    assert layer.structure()[1].dtype == torch.uint16
    x = torch.randn(2, 40000)
    layer(x).sum().backward()
    dense = layer.sparse_weight().to_dense().detach().requires_grad_()
    (x @ dense.T).sum().backward()
    positions = ops.stored_positions(layer.program.format("CSR"), [3, 40000], layer.structure())
    assert int(positions.max()) >= 32768  # columns past the top bit of an int16
    torch.testing.assert_close(layer.values.grad, dense.grad.reshape(-1)[positions])


def test_aot_builds_every_index_type_a_format_can_take(tmp_path):
    source = tmp_path / "tiny.sdsl"
    source.write_text(SOURCE.replace("@ CSR", "@ NM(2, 4)") + 'model tiny {\n    linear "*" use lin with CSR\n}\n')
    build(source, tmp_path / "out", backend="llvm")
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    built = sorted((k["format"], tuple(k["index_dtypes"])) for k in manifest["kernels"])
    assert built == [
        ("CSR", ("int32", "int32")),
        ("CSR", ("int32", "uint16")),
        ("CSR", ("int32", "uint8")),
        ("NM(2, 4)", ("uint8",)),
    ]
    prog = sd.load(tmp_path / "out")
    for fmt, k in (("CSR", 100), ("CSR", 300), ("CSR", 70000), ("NM(2, 4)", 64)):
        w = prune_to_fit(torch.randn(4, k), prog.format(fmt), 0.5)
        x = torch.randn(3, k)
        torch.testing.assert_close(prog.lin(x, prog.pack(fmt, w)), x @ w.T, rtol=1e-4, atol=1e-3)
    for fmt in ("CSR", "NM(2, 4)"):  # no tensor, no shape: the format's widest index types, always built
        prog.lin.source("llvm", fmt)


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc is not installed: CUDA code cannot be compiled here")
def test_cuda_kernels_read_narrow_buffers():
    prog = sd.compile(SOURCE, target="cuda", arch="sm_90")
    for fmt, types, c_type in (("CSR", ("int32", "uint16"), "ushort"), ("NM(2, 4)", ("uint8",), "uchar")):
        source = prog.lin.instance(prog.format(fmt), types).built.source("cuda")  # compiled by nvcc
        assert f"{c_type}* __restrict__ W_" in source.replace("unsigned short", "ushort").replace(
            "unsigned char", "uchar"
        ), source[:2000]
