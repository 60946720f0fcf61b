"""Tensors that do not fit a kernel are clear errors before anything runs."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import sparsedsl as sd

EXAMPLE = Path(__file__).parents[2] / "examples" / "linear.sdsl"


@pytest.fixture(scope="module")
def prog():
    return sd.compile(EXAMPLE)


@pytest.fixture(scope="module")
def weight(prog):
    w = torch.randn(16, 32)
    w[:, ::2] = 0
    return prog.pack("CSR", w)


def test_api_shape(prog, weight):
    assert set(prog.kernels) == {"linear", "linear_gelu", "linear_t", "sddmm"}
    assert weight.format.label == "CSR" and weight.shape == (16, 32) and weight.nnz == 256
    assert "linear" in dir(prog)
    y = prog.linear(torch.randn(3, 32), weight, torch.zeros(16))
    assert y.shape == (3, 16)


@pytest.mark.parametrize(
    "args, message",
    [
        (
            lambda w: (torch.randn(3, 31), w, torch.zeros(16)),
            "'X' gives K = 31, 'W' has shape (16, 32) for [N, K], so K = 32",
        ),
        (lambda w: (torch.randn(3, 32, dtype=torch.float64), w, torch.zeros(16)), "'X' must be float32"),
        (lambda w: (torch.randn(32, 3).T, w, torch.zeros(16)), "'X' must be contiguous"),
        (lambda w: (torch.randn(3, 32), w, torch.zeros(15)), "'W' and 'b' disagree on N"),
        (lambda w: (torch.randn(3, 32), w.to_dense(), torch.zeros(16)), "'W' must be a sparse tensor"),
        (lambda w: (torch.randn(3, 32), w), "takes 3 arguments (X, W, b), got 2"),
        (lambda w: (torch.randn(32), w, torch.zeros(16)), "'X' must have 2 dimensions"),
        (lambda w: ([[1.0]], w, torch.zeros(16)), "'X' must be a torch.Tensor"),
    ],
)
def test_argument_errors(prog, weight, args, message):
    with pytest.raises(sd.ArgumentError) as err:
        prog.linear(*args(weight))
    assert message in str(err.value)


@pytest.mark.parametrize(
    "fmt, shape, message",
    [
        ("NM(2, 4)", (4, 8), "3 nonzeros in a group of 4"),
        ("BSR(4, 1)", (6, 8), "not divisible by 4"),
        ("ELL(2)", (4, 8), "fixed(2) stores at most 2"),
    ],
)
def test_pack_errors(prog, fmt, shape, message):
    w = torch.zeros(shape)
    w[1, :3] = 1.0
    with pytest.raises(sd.PackError) as err:
        prog.pack(fmt, w)
    assert message in str(err.value)


def test_pack_error_names_the_group(prog):
    w = torch.zeros(8, 8)
    w[5, 4:7] = 1.0
    with pytest.raises(sd.PackError, match=r"i = 5, j in 4\.\.7"):
        prog.pack("NM(2, 4)", w)


def test_unknown_format(prog):
    with pytest.raises(sd.SdslError, match="unknown format 'BRS'"):
        prog.pack("BRS(4, 1)", torch.zeros(4, 4))


def test_sources(prog):
    k = prog.kernels["linear"]
    assert "for m_o" in k.source("ir")
    assert "T.prim_func" in k.source("tir")
    assert "define" in k.source("llvm")
    assert "vfmadd" in k.source("asm") or "vfmadd" in k.source("llvm").lower() or "fmul" in k.source("llvm")
