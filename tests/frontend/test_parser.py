"""Well-formed .sdsl text: every declaration kind parses to the right AST, with spans."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sparsedsl.errors import SdslError, SdslSemanticError, SdslSyntaxError, Source, Span
from sparsedsl.frontend import ast
from sparsedsl.frontend.check import check
from sparsedsl.frontend.parser import parse

ROOT = Path(__file__).parents[2]

LINEAR = "kernel linear(X: f32[M, K], W: f32[N, K] @ BSR(4, 1), b: f32[N]) -> (Y: f32[M, N]) {\n"
LINEAR += "    Y[m, n] = sum(k) X[m, k] * W[n, k] + b[n]\n}\n"


def one(text: str):
    (decl,) = parse(Source(text)).decls
    return decl


def span_text(text: str, span: Span) -> str:
    """The source text a single-line span covers."""
    assert span.line == span.end_line
    return text.splitlines()[span.line - 1][span.column - 1 : span.end_column - 1]


# ---- declarations --------------------------------------------------------------------------


def test_format_declaration():
    text = "format BSR2(bm, bn) = (i, j) -> (i / bm: dense, j / bn: compressed, i % bm: dense, j % 4: nm(2, bn))"
    decl = one(text)
    assert isinstance(decl, ast.FormatDecl)
    assert decl.name.text == "BSR2" and span_text(text, decl.name.span) == "BSR2"
    assert [p.text for p in decl.params] == ["bm", "bn"]
    assert [d.text for d in decl.dims] == ["i", "j"]
    assert decl.span == Span(1, 1, 1, len(text) + 1)
    dims = [(v.dim.dim.text, v.dim.op, v.dim.operand and v.dim.operand.value) for v in decl.levels]
    assert dims == [("i", "/", "bm"), ("j", "/", "bn"), ("i", "%", "bm"), ("j", "%", 4)]
    assert [lvl.level_type.text for lvl in decl.levels] == ["dense", "compressed", "dense", "nm"]
    nm = decl.levels[-1]
    assert [a.value for a in nm.args] == [2, "bn"]
    assert span_text(text, nm.span) == "j % 4: nm(2, bn)"
    assert span_text(text, nm.dim.span) == "j % 4"
    assert span_text(text, nm.args[1].span) == "bn"


def test_format_without_parameters_and_nonunique():
    decl = one("format COO2 = (i, j) -> (i: compressed(nonunique), j: singleton)")
    assert decl.params == ()
    first, second = decl.levels
    assert first.dim.op is None and first.dim.operand is None
    assert [a.value for a in first.args] == ["nonunique"]
    assert second.level_type.text == "singleton" and second.args == ()


def test_kernel_declaration():
    text = (
        "kernel k(X: f32[M, K], W: bf16[N, K] @ BSR(4, 1), alpha: f16) -> (Y: f64[M, N]) {\n"
        "    Y[m, n] = relu(X[m, n]);\n"
        "}"
    )
    decl = one(text)
    assert isinstance(decl, ast.KernelDecl)
    assert decl.name.text == "k" and decl.span == Span(1, 1, 3, 2)
    x, w, alpha = decl.inputs
    assert (x.name.text, x.dtype.text, [s.text for s in x.shape]) == ("X", "f32", ["M", "K"])
    assert x.storage is None
    assert span_text(text, x.span) == "X: f32[M, K]"
    assert w.dtype.text == "bf16" and w.storage.name.text == "BSR"
    assert [a.value for a in w.storage.args] == [4, 1]
    assert span_text(text, w.storage.span) == "BSR(4, 1)"
    assert alpha.shape is None and alpha.storage is None and alpha.dtype.text == "f16"
    (y,) = decl.outputs
    assert y.dtype.text == "f64" and [s.text for s in y.shape] == ["M", "N"]
    (stmt,) = decl.body
    assert stmt.target.tensor.text == "Y" and [i.text for i in stmt.target.indices] == ["m", "n"]
    assert span_text(text, stmt.target.span) == "Y[m, n]"
    assert isinstance(stmt.value, ast.Call) and stmt.value.func.text == "relu"
    assert span_text(text, stmt.value.span) == "relu(X[m, n])"


def test_kernel_with_sparse_output_pattern():
    decl = one(
        "kernel sddmm(G: f32[M, N], X: f32[M, K], W: f32[N, K] @ CSR) -> (D: f32[N, K] @ W) {\n"
        "    D[n, k] = sum(m) G[m, n] * X[m, k]\n}"
    )
    (d,) = decl.outputs
    assert d.storage.name.text == "W" and d.storage.args == ()


def test_schedule_declaration_every_directive():
    text = (
        "schedule linear on cuda {\n"
        "    split m by 64 into mo, mi;\n"
        "    reorder mo, n, mi\n"
        "    vectorize mi\n"
        "    parallel mo\n"
        "    unroll k\n"
        "    layout X as [k, m]\n"
        "    tile n by 16\n"
        "    bind mo to blockIdx.x\n"
        "    bind mi to threadIdx.y;\n"
        "}"
    )
    decl = one(text)
    assert isinstance(decl, ast.ScheduleDecl)
    assert decl.kernel.text == "linear" and decl.target.text == "cuda"
    got = [(d.verb, [n.text for n in d.loops], d.factor, d.target) for d in decl.directives]
    assert got == [
        ("split", ["m", "mo", "mi"], 64, None),
        ("reorder", ["mo", "n", "mi"], None, None),
        ("vectorize", ["mi"], None, None),
        ("parallel", ["mo"], None, None),
        ("unroll", ["k"], None, None),
        ("layout", ["X", "k", "m"], None, None),
        ("tile", ["n"], 16, None),
        ("bind", ["mo"], None, "blockIdx.x"),
        ("bind", ["mi"], None, "threadIdx.y"),
    ]
    split = decl.directives[0]
    assert split.span.line == 2 and split.span.column == 5
    assert span_text(text, split.factor_span) == "64"
    assert decl.directives[-1].span.line == 10


def test_model_declaration():
    text = (
        "model minilm {\n"
        '    linear "*.intermediate.dense" use linear with BSR(4, 1) sparsity 0.9;\n'
        '    linear "*" use k\n'
        "}"
    )
    decl = one(text)
    assert isinstance(decl, ast.ModelDecl) and decl.name.text == "minilm"
    first, second = decl.rules
    assert first.pattern == "*.intermediate.dense" and first.kernel.text == "linear"
    assert first.format.name.text == "BSR" and [a.value for a in first.format.args] == [4, 1]
    assert first.sparsity == pytest.approx(0.9)
    assert span_text(text, first.sparsity_span) == "0.9"
    assert span_text(text, first.kernel.span) == "linear"
    assert (second.pattern, second.kernel.text) == ("*", "k")
    assert second.format is None and second.sparsity is None and second.sparsity_span is None


def test_every_declaration_kind_checks():
    text = (
        "format B84 = (i, j) -> (i / 8: dense, j / 4: compressed, i % 8: dense, j % 4: dense)\n"
        + LINEAR
        + "schedule linear on cpu { split m by 64 into mo, mi; parallel mo; vectorize mi }\n"
        + 'model m { linear "*.dense" use linear with B84 sparsity 0.5 }\n'
    )
    program = check(Source(text, "all.sdsl"))
    assert "B84" in program.formats and "CSR" in program.formats
    assert list(program.kernels) == ["linear"]
    assert ("linear", "cpu") in program.schedules
    assert list(program.models) == ["m"]
    kernel = program.kernels["linear"]
    assert kernel.indices == ("m", "n") and kernel.sparse_input.name == "W"
    assert kernel.sparse_input.format.label == "BSR(4, 1)"


# ---- the prelude and user formats ----------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "levels"),
    [
        ("CSR", ["dense", "compressed"]),
        ("CSC", ["dense", "compressed"]),
        ("COO", ["compressed(nonunique)", "singleton"]),
        ("BSR(4, 1)", ["dense", "compressed", "dense", "dense"]),
        ("BSR(8, 4)", ["dense", "compressed", "dense", "dense"]),
        ("NM(2, 4)", ["dense", "dense", "nm(2, 4)"]),
        ("ELL(3)", ["dense", "fixed(3)"]),
    ],
)
def test_prelude_formats_instantiate(text: str, levels: list[str]):
    program = check(Source(""))
    fmt = program.parse_format(text)
    assert fmt.label == text and fmt.rank == 2
    described = [lvl.describe() for lvl in fmt.levels]
    assert [d.replace(" ", "") for d in described] == [lv.replace(" ", "") for lv in levels]


def test_user_formats_check_and_instantiate():
    text = (
        "format B84 = (i, j) -> (i / 8: dense, j / 4: compressed, i % 8: dense, j % 4: dense)\n"
        "format BLK(b) = (i, j) -> (i: dense, j / b: compressed, j % b: dense)\n"
        "format VNM = (i, j) -> (i / 4: dense, j / 4: dense, j % 4: nm(2, 4), i % 4: dense)\n"
        "kernel v(X: f32[M, K], W: f32[N, K] @ VNM) -> (Y: f32[M, N]) {\n"
        "    Y[m, n] = sum(k) X[m, k] * W[n, k]\n}\n"
    )
    program = check(Source(text, "user.sdsl"))
    assert program.parse_format("B84").rank == 2
    assert program.parse_format("BLK(16)").label == "BLK(16)"
    vnm = program.kernels["v"].sparse_input.format
    assert vnm.label == "VNM" and len(vnm.levels) == 4
    assert [m.op for m in vnm.maps] == ["/", "/", "%", "%"]
    assert [m.factor for m in vnm.maps] == [4, 4, 4, 4]


@pytest.mark.parametrize(
    ("text", "error", "column", "message"),
    [
        ("CSR sparsity 0.5", SdslSyntaxError, 5, "expected end of the format, found 'sparsity'"),
        ("NM(2, 4) x", SdslSyntaxError, 10, "expected end of the format, found 'x'"),
        ("NM(2,4", SdslSyntaxError, 7, "unexpected end of the format; expected ')' or ','"),
        ("", SdslSyntaxError, 1, "unexpected end of the format; expected a name"),
        ("BSR(4)", SdslSemanticError, 1, "format 'BSR' takes 2 parameters"),
        ("ELL(4294967296)", SdslSemanticError, 5, "format argument 4294967296 is too large"),
    ],
)
def test_format_text_is_a_format_alone(text, error, column, message):
    """What users pass to ``prog.format``: nothing after the format, errors located in their text."""
    with pytest.raises(error) as info:
        check(Source("")).parse_format(text)
    err = info.value
    assert err.message.startswith(f"invalid format '{text}': {message}")
    assert err.source.text == text and err.span.line == 1 and err.span.column == column


@settings(max_examples=60, deadline=None)
@given(st.lists(st.sampled_from(["CSR", "BSR", "NM", "(", ")", ",", " ", "2", "4", "0.5", "sparsity", "x", "é", "\n"])))
def test_any_format_text_is_a_format_or_an_error_located_in_it(parts):
    text = "".join(parts)
    try:
        check(Source("")).parse_format(text)
    except SdslError as err:
        lines = text.split("\n")
        assert err.source.text == text and 1 <= err.span.line <= len(lines), err.render()
        assert 1 <= err.span.column <= len(lines[err.span.line - 1]) + 1, err.render()


def test_examples_check():
    for path in [ROOT / "examples" / "linear.sdsl", ROOT / "sparsedsl" / "nn.sdsl"]:
        program = check(Source(path.read_text(), str(path)))
        assert program.kernels


# ---- expressions ---------------------------------------------------------------------------


def value_of(expr: str):
    decl = one(f"kernel k(X: f32[M, K]) -> (Y: f32[M, N]) {{ Y[m, n] = {expr} }}")
    return decl.body[0].value


def shape(node) -> str:
    """A fully parenthesised rendering of an expression tree."""
    match node:
        case ast.BinOp(op, lhs, rhs):
            return f"({shape(lhs)} {op} {shape(rhs)})"
        case ast.Neg(operand):
            return f"(-{shape(operand)})"
        case ast.Reduction(indices, body):
            return f"sum({', '.join(i.text for i in indices)})({shape(body)})"
        case ast.Call(func, args):
            return f"{func.text}({', '.join(shape(a) for a in args)})"
        case ast.Access(tensor, indices):
            return tensor.text
        case ast.ScalarRef(name):
            return name.text
        case ast.Number(value):
            return f"{value:g}"
    raise AssertionError(node)


@pytest.mark.parametrize(
    ("expr", "tree"),
    [
        ("alpha * sum(k) X[m,k]*W[n,k] + b[n]", "((alpha * sum(k)((X * W))) + b)"),
        ("sum(k) X[m, k] * W[n, k] + b[n]", "(sum(k)((X * W)) + b)"),
        ("a + b * c", "(a + (b * c))"),
        ("a - b - c", "((a - b) - c)"),
        ("a / b * c", "((a / b) * c)"),
        ("-a * b", "((-a) * b)"),
        ("a * -b", "(a * (-b))"),
        ("(a + b) * c", "((a + b) * c)"),
        ("gelu(sum(k, j) X[m, k] * W[n, j]) + 1", "(gelu(sum(k, j)((X * W))) + 1)"),
        ("max(a, b + 2.5e-1)", "max(a, (b + 0.25))"),
        ("sum(k) X[m, k] / 2 - b[n]", "(sum(k)((X / 2)) - b)"),
    ],
)
def test_precedence(expr: str, tree: str):
    assert shape(value_of(expr)) == tree


def test_expression_spans():
    text = "kernel k(X: f32[M, K]) -> (Y: f32[M, N]) {\n    Y[m, n] = alpha * sum(k) X[m, k] * W[n, k] + b[n]\n}"
    value = one(text).body[0].value
    assert span_text(text, value.span) == "alpha * sum(k) X[m, k] * W[n, k] + b[n]"
    reduction = value.lhs.rhs
    assert isinstance(reduction, ast.Reduction)
    assert span_text(text, reduction.span) == "sum(k) X[m, k] * W[n, k]"
    assert span_text(text, reduction.indices[0].span) == "k"
    assert span_text(text, reduction.body.rhs.span) == "W[n, k]"


# ---- lexical details -----------------------------------------------------------------------


def test_comments_and_whitespace():
    text = (
        "# a hash comment\n"
        "// a slash comment\n"
        "format\tT = (i, j)  // trailing\n"
        "    -> (i: dense,   # inside a declaration\n"
        "        j: compressed)\r\n"
        "kernel k(X: f32[M, K] # between parameters\n"
        "         , W: f32[N, K] @ T) -> (Y: f32[M, N]) { // the body\n"
        "    Y[m, n] = sum(k) X[m, k] * W[n, k]  # 'sum' over k\n"
        "}\n"
    )
    program = check(Source(text, "comments.sdsl"))
    assert "T" in program.formats and list(program.kernels) == ["k"]
    fmt, kernel = parse(Source(text)).decls
    assert fmt.span.line == 3 and fmt.levels[1].span.line == 5
    assert kernel.span.line == 6 and kernel.inputs[1].span == Span(7, 12, 7, 28)


def test_empty_and_comment_only_files():
    assert parse(Source("")).decls == ()
    assert parse(Source("# nothing\n// at all\n\n")).decls == ()
    assert check(Source("# nothing\n")).kernels == {}


def test_numbers():
    values = [n.value for n in (value_of(t) for t in ["1", "2.5", ".5", "1e3", "2.E-2"])]
    assert values == [1.0, 2.5, 0.5, 1000.0, 0.02]
