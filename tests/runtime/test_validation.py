"""Sparse structures from outside the packer are validated before any kernel reads them: every
corruption is a PackError naming the level, the buffer and the first offending position."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from torch import nn

import sparsedsl as sd
from tests.strategies import FORMATS, fuzz_examples, prune_to_fit

EXAMPLE = Path(__file__).parents[2] / "examples" / "linear.sdsl"


@pytest.fixture(scope="module")
def prog():
    return sd.compile(EXAMPLE, backend="llvm")


@pytest.fixture(scope="module")
def csr(prog):
    w = torch.randn(16, 32)
    w[:, ::2] = 0
    return prog.pack("CSR", w)


def corrupted(weight: sd.SparseTensor, buffer: int, edit) -> list[torch.Tensor]:
    """The structure in int64 (a narrow coordinate type could not hold a corruption), one buffer edited."""
    structure = [b.to(torch.int64, copy=True) for b in weight.structure()]
    structure[buffer] = edit(structure[buffer])
    return structure


def set_at(index: int, value):
    def edit(t):
        t[index] = value
        return t

    return edit


def repeat_previous(index: int):
    def edit(t):
        t[index] = t[index - 1].clone()
        return t

    return edit


@pytest.mark.parametrize(
    "buffer, edit, values, message",
    [
        (1, set_at(5, 99), None, "level 1 (compressed, j): crd[5] = 99 is outside [0, 32)"),
        (1, set_at(5, -1), None, "crd[5] = -1 is outside [0, 32)"),
        (0, set_at(16, 300), None, "'crd' must have 300 entries, it has 256"),
        (0, set_at(0, 1), None, "pos[0] = 1, but positions start at 0"),
        (0, set_at(3, 100), None, "pos[4] = 64 is smaller than pos[3] = 100 (at i = 3)"),
        (0, lambda t: t[:-1], None, "'pos' must have 17 entries, it has 16"),
        (1, repeat_previous(1), None, "crd[1] = 1 repeats the coordinate before it"),
        (1, lambda t: t.flip(0), None, "is smaller than the coordinate before it"),
        (1, lambda t: t.float(), None, "index buffer '1_crd' must be a 1-d integer tensor"),
        (1, lambda t: t.view(2, -1), None, "must be a 1-d integer tensor, got a 2-d"),
        (1, lambda t: t, lambda v: v[:-1], "'vals' must hold one value per stored position, 256, it has 255"),
        (1, lambda t: t, lambda v: v.int(), "'vals' must be a 1-d floating-point or 8-bit integer tensor"),
        (1, lambda t: t, lambda v: v.view(2, -1), "'vals' must be a 1-d floating-point or 8-bit integer tensor"),
    ],
)
def test_corrupted_csr_is_refused(csr, buffer, edit, values, message):
    structure = corrupted(csr, buffer, edit)
    vals = values(csr.values.clone()) if values else csr.values.clone()
    with pytest.raises(sd.PackError) as err:
        sd.SparseTensor.from_structure(csr.format, csr.shape, structure, vals)
    assert message in str(err.value)


@pytest.mark.parametrize(
    "fmt, shape, edit, message",
    [
        ("NM(2, 4)", (4, 8), repeat_previous(1), "level 2 (nm(2, 4), j % 4): crd[1] ="),
        ("NM(2, 4)", (4, 8), set_at(1, 4), "crd[1] = 4 is outside [0, 4)"),
        ("ELL(3)", (4, 8), set_at(2, 8), "level 1 (fixed(3), j): crd[2] = 8 is outside [0, 8)"),
        ("COO", (4, 8), set_at(2, 9), "level 1 (singleton, j): crd[2] = 9 is outside [0, 8)"),
        ("BSR(4, 1)", (8, 8), set_at(0, 3), "level 1 (compressed, j): pos[0] = 3"),
    ],
)
def test_corrupted_levels_are_refused(prog, fmt, shape, edit, message):
    weight = prog.pack(fmt, prune_to_fit(torch.randn(*shape), prog.format(fmt), 0.5))
    with pytest.raises(sd.PackError) as err:
        buffer = 0 if fmt == "BSR(4, 1)" else -1
        sd.SparseTensor.from_structure(weight.format, shape, corrupted(weight, buffer, edit), weight.values)
    assert message in str(err.value)


def test_coo_duplicate_entry_is_refused(prog):
    w = torch.zeros(4, 8)
    w[1, 2] = w[1, 5] = 1.0
    coo = prog.pack("COO", w)
    rows, cols = coo.buffers["0_crd"].clone(), coo.buffers["1_crd"].clone()
    cols[1] = cols[0]
    with pytest.raises(sd.PackError, match=r"level 1 \(singleton, j\): crd\[1\] = 2 repeats"):
        sd.SparseTensor.from_structure(coo.format, (4, 8), [coo.buffers["0_pos"], rows, cols], coo.values)


def test_buffer_count_keys_and_shape(prog, csr):
    with pytest.raises(sd.PackError, match="CSR has 2 index buffers"):
        sd.SparseTensor.from_structure(csr.format, csr.shape, csr.structure()[:1], csr.values)
    with pytest.raises(sd.PackError, match="missing 1_crd"):
        sd.SparseTensor(csr.format, csr.shape, {"1_pos": csr.buffers["1_pos"], "vals": csr.values})
    with pytest.raises(sd.PackError, match="not divisible by 4"):
        sd.SparseTensor.from_structure(prog.format("BSR(4, 1)"), (6, 8), csr.structure(), csr.values)
    with pytest.raises(sd.PackError, match="sizes >= 0"):
        sd.SparseTensor.from_structure(csr.format, (-16, 32), csr.structure(), csr.values)


def test_wider_integer_buffers_are_narrowed(prog, csr):
    wide = sd.SparseTensor.from_structure(csr.format, csr.shape, [b.long() for b in csr.structure()], csr.values)
    assert [b.dtype for b in wide.structure()] == [torch.int32, torch.uint8]  # the levels' types
    x = torch.randn(3, 32)
    torch.testing.assert_close(prog.linear(x, wide, torch.zeros(16)), x @ csr.to_dense().T)


def test_in_place_write_after_validation_is_caught_at_the_call(prog, csr):
    w = sd.SparseTensor.from_structure(csr.format, csr.shape, [b.clone() for b in csr.structure()], csr.values)
    x = torch.randn(3, 32)
    prog.linear(x, w, torch.zeros(16))
    w.buffers["1_crd"][3] = 200  # fits the byte of its type, not the extent
    with pytest.raises(sd.PackError, match=r"'W': .*crd\[3\] = 200 is outside"):
        prog.linear(x, w, torch.zeros(16))
    w.buffers["1_crd"][3] = csr.buffers["1_crd"][3]
    torch.testing.assert_close(prog.linear(x, w, torch.zeros(16)), x @ csr.to_dense().T)


def test_trusted_buffers_are_checked_once_written(prog, csr):
    structure = [b.clone() for b in csr.structure()]
    trusted = sd.SparseTensor.from_structure(csr.format, csr.shape, structure, csr.values, validate=False)
    structure[0][1] = 10**5
    with pytest.raises(sd.PackError, match="pos"):
        prog.linear(torch.randn(2, 32), trusted, torch.zeros(16))


def test_with_values_and_to(csr):
    with pytest.raises(sd.PackError, match="shape"):
        csr.with_values(torch.zeros(3))
    with pytest.raises(sd.PackError, match="floating-point"):
        csr.with_values(torch.zeros(csr.nnz, dtype=torch.int64))  # int8, uint8, int32 are kernel outputs
    assert csr.to(torch.float64).dtype == torch.float64
    assert csr.to("cpu").nnz == csr.nnz


def test_state_dict_corruption_names_the_layer():
    model = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 16))
    sparse = sd.compile_model(model, {"*": ("CSR", 0.8)}, backend="llvm")
    state = {k: v.clone() for k, v in sparse.state_dict().items()}
    state["2.structure_1"] = state["2.structure_1"].int()  # as saved before narrow index buffers
    state["2.structure_1"][4] = 10**6
    with pytest.raises(sd.PackError, match=r"layer '2': .*crd\[4\] = 1000000 is outside \[0, 32\)"):
        sparse.load_state_dict(state)


def test_state_dict_of_another_pattern_loads():
    model = nn.Sequential(nn.Linear(64, 32))
    a = sd.compile_model(model, {"*": ("CSR", 0.8)}, backend="llvm")
    b = sd.compile_model(model, {"*": ("CSR", 0.5)}, backend="llvm")
    a.load_state_dict(b.state_dict())
    x = torch.randn(5, 64)
    torch.testing.assert_close(a(x), b(x))


CORRUPTIONS = ("none", "set", "truncate", "extend", "swap", "dtype", "values")


@st.composite
def corruption(draw):
    fmt, rows, cols = draw(st.sampled_from([f for f in FORMATS if f[0] != "VNM"]))
    n = rows * draw(st.integers(1, 4))
    k = cols * draw(st.integers(1, 4))
    return fmt, n, k, draw(st.sampled_from(CORRUPTIONS)), draw(st.integers(0, 2**31 - 1))


def _corrupt(weight: sd.SparseTensor, kind: str, rng: torch.Generator) -> tuple[list[torch.Tensor], torch.Tensor]:
    structure = [b.to(torch.int64, copy=True) for b in weight.structure()]  # room for any corruption
    values = weight.values.clone()
    if kind == "values":
        return structure, values[: max(0, values.numel() - 1)]
    if kind == "none" or not structure:
        return structure, values
    i = int(torch.randint(len(structure), (1,), generator=rng))
    buf = structure[i]
    size = buf.numel()
    if kind == "set" and size:
        p = int(torch.randint(size, (1,), generator=rng))
        choices = [-1, 0, 1, int(buf[p]) + 1, int(buf[p]) - 1, max(weight.shape), 2**31 - 1, -(2**31)]
        buf[p] = choices[int(torch.randint(len(choices), (1,), generator=rng))]
    elif kind == "truncate" and size:
        structure[i] = buf[:-1]
    elif kind == "extend":
        structure[i] = torch.cat([buf, buf[-1:] if size else torch.zeros(1, dtype=buf.dtype)])
    elif kind == "swap" and size > 1:
        p = int(torch.randint(size - 1, (1,), generator=rng))
        buf[p], buf[p + 1] = buf[p + 1].clone(), buf[p].clone()
    elif kind == "dtype":
        structure[i] = buf.to([torch.float32, torch.int64, torch.int16, torch.bool][int(buf.sum()) % 4])
    return structure, values


@settings(max_examples=fuzz_examples(60), deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(case=corruption())
@example(case=("COO", 2, 2, "swap", 1))  # an unsorted top level: its error placed a key of no parent level
def test_fuzz_structures(prog, case):
    """A random (possibly corrupted) structure of any level type is refused with a PackError, or it
    is valid and the kernel gives the dense answer: never a crash, never a wrong number."""
    fmt, n, k, kind, seed = case
    torch.manual_seed(seed)
    rng = torch.Generator().manual_seed(seed)
    weight = prog.pack(fmt, prune_to_fit(torch.randn(n, k), prog.format(fmt), 0.6))
    structure, values = _corrupt(weight, kind, rng)
    try:
        w = sd.SparseTensor.from_structure(weight.format, (n, k), structure, values)
    except sd.PackError:
        assert kind != "none"
        return
    x = torch.randn(3, k)
    torch.testing.assert_close(prog.linear(x, w, torch.zeros(n)), x @ w.to_dense().T, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("backend", ["tvm", "llvm"])
@pytest.mark.parametrize("n, k, m", [(16, 32, 0), (0, 32, 2), (16, 0, 2), (16, 32, 2)])
def test_empty_weights_and_batches(backend, n, k, m):
    """Empty buffers (no stored value, no row, no token) run: torch calls any empty tensor
    contiguous, whatever its strides, and the compiled code's argument check would refuse them."""
    prog = sd.compile(EXAMPLE, backend=backend)
    w = prog.pack("CSR", torch.zeros(n, k))
    x = torch.randn(m, k)
    torch.testing.assert_close(prog.linear(x, w, torch.ones(n)), torch.ones(m, n))


@pytest.mark.parametrize(
    "fmt, shape, message",
    [
        ("CSR", (2**40, 4), "the shape gives it 1099511627776 positions, but the longest buffer has"),
        ("NM(2, 4)", (4, 2**44), "level 1 (dense, j / 4): the shape gives it"),
        ("COO", (2**40, 2**40), "more entries than 64-bit indices can count"),
    ],
)
def test_a_huge_shape_is_refused_before_anything_is_allocated(prog, fmt, shape, message):
    small = prog.pack(fmt, prune_to_fit(torch.randn(4, 8), prog.format(fmt), 0.5))
    with pytest.raises(sd.PackError, match=re.escape(message)):
        sd.SparseTensor.from_structure(small.format, shape, small.structure(), small.values)
