"""Random mutations of a valid program: the frontend reports SdslError or accepts, nothing else."""

from __future__ import annotations

import re
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sparsedsl.errors import SdslError, Source
from sparsedsl.frontend.check import check

EXAMPLE = (Path(__file__).parents[2] / "examples" / "linear.sdsl").read_text()
TOKEN = re.compile(r"[A-Za-z_][A-Za-z_0-9]*|[0-9]+(?:\.[0-9]*)?|->|//|\s+|.", re.S)
TOKENS = TOKEN.findall(EXAMPLE)

# Words and characters of the language and a few outside it.
VOCABULARY = [
    *"()[]{},;:=@*/%+-.#\"'$?\\`~|&^!<>\t\n ",
    "->",
    "//",
    "sum",
    "format",
    "kernel",
    "schedule",
    "model",
    "linear",
    "use",
    "with",
    "sparsity",
    "split",
    "by",
    "into",
    "bind",
    "to",
    "blockIdx.x",
    "layout",
    "as",
    "tile",
    "on",
    "cpu",
    "cuda",
    "dense",
    "compressed",
    "singleton",
    "nm",
    "fixed",
    "nonunique",
    "f16",
    "f32",
    "bf16",
    "f64",
    "CSR",
    "BSR",
    "NM",
    "ELL",
    "COO",
    "X",
    "W",
    "Y",
    "b",
    "m",
    "n",
    "k",
    "M",
    "N",
    "K",
    "gelu",
    "max",
    "0",
    "1",
    "4",
    "0.5",
    "1.5",
    ".5",
    "1e9",
    "99999999999999999999",
    '"*.dense"',
    "é",
    "\u00d7",
    "\x00",
]


@st.composite
def mutation(draw, tokens: list[str]) -> list[str]:
    tokens = list(tokens)
    for _ in range(draw(st.integers(1, 3))):
        kinds = ["delete", "insert", "replace", "delete_char", "insert_char", "swap"]
        kind = draw(st.sampled_from(kinds))
        i = draw(st.integers(0, len(tokens) - 1))
        if kind == "delete":
            del tokens[i]
        elif kind == "insert":
            tokens.insert(i, draw(st.sampled_from(VOCABULARY)))
        elif kind == "replace":
            tokens[i] = draw(st.sampled_from([*VOCABULARY, *TOKENS]))
        elif kind == "swap":
            j = draw(st.integers(0, len(tokens) - 1))
            tokens[i], tokens[j] = tokens[j], tokens[i]
        else:
            token = tokens[i]
            at = draw(st.integers(0, len(token)))
            if kind == "delete_char":
                tokens[i] = token[: max(0, at - 1)] + token[at:]
            else:
                tokens[i] = token[:at] + draw(st.characters(codec="utf-8")) + token[at:]
        if not tokens:
            tokens = [""]
    return tokens


def check_reports_only_sdsl_errors(text: str) -> None:
    source = Source(text, "fuzz.sdsl")
    try:
        check(source)
    except SdslError as err:
        rendered = err.render()
        assert rendered.startswith("fuzz.sdsl:"), rendered
        assert err.span is not None, rendered
        lines = text.split("\n")
        assert 1 <= err.span.line <= len(lines), rendered
        assert 1 <= err.span.column <= len(lines[err.span.line - 1]) + 1, rendered


def test_example_is_valid():
    assert "".join(TOKENS) == EXAMPLE
    check(Source(EXAMPLE))


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(mutation(TOKENS))
def test_mutations_raise_only_sdsl_errors(tokens: list[str]):
    check_reports_only_sdsl_errors("".join(tokens))
