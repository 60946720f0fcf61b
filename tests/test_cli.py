"""`sparsedsl check` reports what only lowering can tell, located, with exit status 1."""

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
]


@pytest.mark.parametrize("text, message", CASES)
def test_check_runs_lowering_checks(tmp_path, capsys, text, message):
    path = tmp_path / "bad.sdsl"
    path.write_text(text)
    assert main(["check", str(path)]) == 1
    assert f"{path}:{message}" in capsys.readouterr().err
