"""Every file in malformed/ holds one error; the compiler must report it, and only it, precisely.

The first line of each file is ``# expect: LINE:COL: SUBSTRING``: the location the error must be
reported at (1-based, as rendered) and a part of its message.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from sparsedsl.cli import main
from sparsedsl.errors import SdslError, Source
from sparsedsl.frontend.check import check

HERE = Path(__file__).parent
MALFORMED = sorted((HERE / "malformed").glob("*.sdsl"))
EXAMPLE = HERE.parents[1] / "examples" / "linear.sdsl"
EXPECT = re.compile(r"# expect: (\d+):(\d+): (.+)")


def expectation(path: Path) -> tuple[int, int, str]:
    first = path.read_text().splitlines()[0]
    match = EXPECT.fullmatch(first)
    assert match, f"{path.name}: the first line must be '# expect: LINE:COL: message'"
    return int(match[1]), int(match[2]), match[3]


def diagnostic(path: Path) -> SdslError:
    text = path.read_text()
    try:
        check(Source(text, str(path)))
    except SdslError as err:
        return err
    pytest.fail(f"{path.name}: no error reported")


def test_corpus_is_large_enough():
    assert len(MALFORMED) >= 48
    kinds = {p.name.split("_")[0] for p in MALFORMED}
    assert {"syntax", "format", "kernel", "schedule", "model"} <= kinds


@pytest.mark.parametrize("path", MALFORMED, ids=lambda p: p.stem)
def test_malformed(path: Path):
    line, column, substring = expectation(path)
    err = diagnostic(path)  # any other exception fails the test with its traceback
    rendered = err.render().splitlines()
    assert len(rendered) == 3, err.render()
    head, text, caret = rendered
    assert head.startswith(f"{path}:{line}:{column}: error: "), err.render()
    assert substring in head, err.render()
    assert text == path.read_text().splitlines()[line - 1]
    assert re.fullmatch(" " * (column - 1) + r"\^~*", caret), err.render()
    span = err.span
    assert (span.end_line, span.end_column) > (span.line, span.column), span


@pytest.mark.parametrize(
    "name",
    [
        "syntax_missing_rparen_inputs",
        "syntax_unterminated_string",
        "kernel_shape_mismatch",
        "model_unknown_kernel",
    ],
)
def test_cli_reports_diagnostics(name: str, capsys):
    path = HERE / "malformed" / f"{name}.sdsl"
    line, column, substring = expectation(path)
    assert main(["check", str(path)]) == 1
    captured = capsys.readouterr()
    assert captured.out == ""
    lines = captured.err.splitlines()
    assert lines[0].startswith(f"{path}:{line}:{column}: error: ") and substring in lines[0]
    assert len(lines) == 3 and lines[2].strip().startswith("^")


def test_cli_accepts_the_example(capsys):
    assert main(["check", str(EXAMPLE)]) == 0
    captured = capsys.readouterr()
    assert "ok (4 kernels: linear, linear_gelu, linear_t, sddmm)" in captured.out
    assert captured.err == ""
