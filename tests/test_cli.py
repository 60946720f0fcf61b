"""The command line: `sparsedsl check` reports what only lowering can tell, for every target the
file schedules; every command refuses a file that is no source text in one located line; `--format`
errors are located in the user's text; a closed pipe ends the output quietly. Exit status 1, no
traceback."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from sparsedsl.cli import EXIT_SIGPIPE, main
from tests.frontend.test_source import BAD_FILES, KERNEL, bad_path, unreadable

ROOT = Path(__file__).parents[1]
LINEAR = str(ROOT / "examples" / "linear.sdsl")

CASES = [
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


def command(name: str, path: Path, tmp_path: Path) -> list[str]:
    extra = {"check": [], "emit": ["--kernel", "k"], "build": ["-o", str(tmp_path / "out")]}[name]
    return [name, str(path), *extra]


@pytest.mark.parametrize("name", BAD_FILES)
@pytest.mark.parametrize("verb", ["check", "emit", "build"])
def test_bad_files(tmp_path, capsys, verb, name):
    path = bad_path(tmp_path, name)
    assert main(command(verb, path, tmp_path)) == 1
    out, err = capsys.readouterr()
    assert out == ""
    assert len(err.splitlines()) == 1 and err.startswith(f"{path}:"), err
    assert BAD_FILES[name][1] in err, err


@pytest.mark.parametrize("verb", ["check", "emit", "build"])
def test_unreadable_file(tmp_path, capsys, monkeypatch, verb):
    path = unreadable(tmp_path, monkeypatch)
    assert main(command(verb, path, tmp_path)) == 1
    assert capsys.readouterr().err == f"{path}: error: cannot read: Permission denied\n"


def test_closed_pipe_ends_quietly():
    """`sparsedsl emit ... | head -1`, in a real process: the reader is gone before the first line
    is written. Exit status 141, as a Unix tool killed by SIGPIPE, and nothing on stderr."""
    argv = [sys.executable, "-m", "sparsedsl.cli", "emit", LINEAR, "--kernel", "linear", "--stage", "ir"]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    proc.stdout.close()
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=120) == EXIT_SIGPIPE
    assert err == ""


@pytest.mark.parametrize(
    "text, column, message",
    [
        ("NM(2,4", 7, "unexpected end of the format; expected ')' or ','"),
        ("CSR sparsity 0.5", 5, "expected end of the format, found 'sparsity'"),
        ("BSR(99999999999999999999999, 1)", 5, "format argument 99999999999999999999999 is too large"),
    ],
)
def test_format_option_errors_quote_the_option(capsys, text, column, message):
    assert main(["emit", LINEAR, "--kernel", "linear", "--stage", "ir", "--format", text]) == 1
    head, line, caret = capsys.readouterr().err.splitlines()
    assert head.startswith(f"<format>:1:{column}: error: invalid format '{text}': {message}"), head
    assert line == text and caret.index("^") == column - 1


def test_literal_too_large_for_emit(tmp_path, capsys):
    path = tmp_path / "huge_block.sdsl"
    path.write_text(KERNEL.replace("@ CSR", "@ BSR(99999999999999999999999, 1)"))
    assert main(["emit", str(path), "--kernel", "k", "--stage", "tir"]) == 1
    assert capsys.readouterr().err.startswith(f"{path}:1:43: error: format argument 99999999999999999999999")


def test_build_into_a_file(tmp_path, capsys):
    path, out = tmp_path / "k.sdsl", tmp_path / "not_a_directory"
    path.write_text(KERNEL)
    out.write_text("")
    assert main(["build", str(path), "-o", str(out)]) == 1
    assert capsys.readouterr().err == f"{out}: error: File exists\n"
