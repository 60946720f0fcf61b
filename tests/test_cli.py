"""`sparsedsl check` reports what only lowering can tell, for every target the file schedules,
located, with exit status 1."""

from __future__ import annotations

import pytest

from sparsedsl.cli import main

CASES = [
    (
        "kernel f(X: f32[M, K], W: f32[N, K] @ CSR) -> (Y: f32[M, N]) {\n    Y[m, n] = sum(k) (X[m, k] + W[n, k])\n}\n",
        "1:1: error: 'W' must be a factor of the summed product",
    ),
    (
        "kernel f(X: f32[M, K], W: f32[N, K] @ CSR) -> (Y: f32[M, N]) {\n    Y[m, n] = sum(k) X[m, k] * W[n, k]\n}\n"
        "schedule f on cpu {\n    unroll q\n}\n",
        "5:5: error: kernel 'f' has no loop 'q'",
    ),
    (  # a GPU schedule is checked as the GPU mapping sees it (no TVM or nvcc needed)
        "kernel f(W: f32[N, K] @ CSR, x: f32[K]) -> (y: f32[N]) {\n    y[n] = sum(k) W[n, k] * x[k]\n}\n"
        "schedule f on cuda { stage x in shared at nope }\n",
        "4:22: error: kernel 'f' has no loop 'nope'",
    ),
]


@pytest.mark.parametrize("text, message", CASES)
def test_check_runs_lowering_checks(tmp_path, capsys, text, message):
    path = tmp_path / "bad.sdsl"
    path.write_text(text)
    assert main(["check", str(path)]) == 1
    assert f"{path}:{message}" in capsys.readouterr().err
