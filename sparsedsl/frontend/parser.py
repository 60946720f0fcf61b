"""Lark parse tree -> AST with spans; syntax errors translated into human words."""

from __future__ import annotations

from functools import cache
from importlib import resources

from lark import Lark, Token, Transformer, Tree, v_args
from lark.exceptions import UnexpectedCharacters, UnexpectedEOF, UnexpectedInput, UnexpectedToken

from sparsedsl.errors import SdslSyntaxError, Source, Span
from sparsedsl.frontend import ast

_TERMINAL_WORDS = {
    "NAME": "a name",
    "INT": "an integer",
    "NUMBER": "a number",
    "DTYPE": "a dtype (f32, f16, bf16, f64)",
    "STRING": "a quoted string",
    "THREAD_AXIS": "a GPU axis such as blockIdx.x or threadIdx.x",
    "DIMOP": "'/' or '%'",
    "$END": "end of file",
}


@cache
def _lark() -> Lark:
    grammar = resources.files("sparsedsl.frontend").joinpath("grammar.lark").read_text()
    return Lark(grammar, parser="lalr", propagate_positions=True, maybe_placeholders=False)


def _span_of(item: Token | Tree) -> Span:
    if isinstance(item, Token):
        return Span(item.line, item.column, item.end_line, item.end_column)
    meta = item.meta
    return Span(meta.line, meta.column, meta.end_line, meta.end_column)


def _name(token: Token) -> ast.Name:
    return ast.Name(str(token), _span_of(token))


def _param(token: Token) -> ast.Param:
    value: int | str = int(token) if token.type == "INT" else str(token)
    return ast.Param(value, _span_of(token))


@v_args(meta=True)
class _ToAst(Transformer):
    """Builds AST nodes; no semantic checks here (see check.py)."""

    @staticmethod
    def _span(meta) -> Span:
        return Span(meta.line, meta.column, meta.end_line, meta.end_column)

    def start(self, meta, decls):
        return ast.Module(tuple(decls))

    # formats
    def format_decl(self, meta, children):
        name, *rest = children
        params: tuple[ast.Name, ...] = ()
        if len(rest) == 3:
            params, dims, levels = rest
        else:
            dims, levels = rest
        return ast.FormatDecl(_name(name), params, dims, levels, self._span(meta))

    def format_params(self, meta, children):
        return children[0]

    def name_list(self, meta, names):
        return tuple(_name(n) for n in names)

    def level_list(self, meta, levels):
        return tuple(levels)

    def level(self, meta, children):
        dim, kind, *args = children
        return ast.LevelDecl(dim, _name(kind), tuple(args[0]) if args else (), self._span(meta))

    def level_args(self, meta, args):
        return tuple(args)

    def int_arg(self, meta, children):
        return _param(children[0])

    name_arg = int_arg

    def dim_expr(self, meta, children):
        dim = _name(children[0])
        if len(children) == 1:
            return ast.DimExpr(dim, None, None, self._span(meta))
        return ast.DimExpr(dim, str(children[1]), children[2], self._span(meta))

    # kernels
    def kernel_decl(self, meta, children):
        name, *rest = children
        if isinstance(rest[0], tuple) and len(rest) >= 2 and isinstance(rest[1], tuple):
            inputs, outputs, *body = rest
        else:
            inputs, (outputs, *body) = (), rest
        return ast.KernelDecl(_name(name), inputs, outputs, tuple(body), self._span(meta))

    def tensor_list(self, meta, tensors):
        return tuple(tensors)

    def tensor_decl(self, meta, children):
        name, dtype, *rest = children
        shape = next((r for r in rest if isinstance(r, tuple)), None)
        storage = next((r for r in rest if isinstance(r, ast.FormatRef)), None)
        return ast.TensorDecl(_name(name), _name(dtype), shape, storage, self._span(meta))

    def shape(self, meta, names):
        return tuple(_name(n) for n in names)

    def storage(self, meta, children):
        return children[0]

    def format_ref(self, meta, children):
        name, *args = children
        return ast.FormatRef(_name(name), tuple(args[0]) if args else (), self._span(meta))

    def format_args(self, meta, args):
        return tuple(_param(a) for a in args)

    def assign(self, meta, children):
        return ast.Assign(children[0], children[1], self._span(meta))

    def access(self, meta, children):
        tensor, *indices = children
        return ast.Access(_name(tensor), tuple(_name(i) for i in indices), self._span(meta))

    def _binop(op):
        def build(self, meta, children):
            return ast.BinOp(op, children[0], children[1], self._span(meta))

        return build

    add, sub, mul, div = _binop("+"), _binop("-"), _binop("*"), _binop("/")

    def neg(self, meta, children):
        return ast.Neg(children[0], self._span(meta))

    def number(self, meta, children):
        return ast.Number(float(children[0]), self._span(meta))

    def scalar_ref(self, meta, children):
        return ast.ScalarRef(_name(children[0]), self._span(meta))

    def reduction(self, meta, children):
        *indices, body = children
        return ast.Reduction(tuple(_name(i) for i in indices), body, self._span(meta))

    def call(self, meta, children):
        func, *args = children
        return ast.Call(_name(func), tuple(args), self._span(meta))

    # schedules
    def schedule_decl(self, meta, children):
        kernel, target, *directives = children
        return ast.ScheduleDecl(_name(kernel), _name(target), tuple(directives), self._span(meta))

    def _directive(verb):
        def build(self, meta, children):
            names = tuple(_name(c) for c in children if c.type == "NAME")
            ints = [int(c) for c in children if c.type == "INT"]
            axis = next((str(c) for c in children if c.type == "THREAD_AXIS"), None)
            return ast.Directive(verb, names, ints[0] if ints else None, self._span(meta), axis)

        return build

    split, reorder, vectorize = _directive("split"), _directive("reorder"), _directive("vectorize")
    parallel, unroll, layout = _directive("parallel"), _directive("unroll"), _directive("layout")
    tile, bind = _directive("tile"), _directive("bind")

    # model rules
    def model_decl(self, meta, children):
        name, *rules = children
        return ast.ModelDecl(_name(name), tuple(rules), self._span(meta))

    def rule(self, meta, children):
        pattern, kernel, *rest = children
        fmt = next((r for r in rest if isinstance(r, ast.FormatRef)), None)
        sparsity = next((float(r) for r in rest if isinstance(r, Token)), None)
        return ast.Rule(str(pattern)[1:-1], _name(kernel), fmt, sparsity, self._span(meta))


def _describe(terminal: str) -> str:
    if terminal in _TERMINAL_WORDS:
        return _TERMINAL_WORDS[terminal]
    for term in _lark().terminals:
        if term.name == terminal and term.pattern.type == "str":
            return f"'{term.pattern.value}'"
    return terminal.lower()


def _expected(names) -> str:
    words = sorted({_describe(n) for n in names})
    if len(words) == 1:
        return words[0]
    return ", ".join(words[:-1]) + " or " + words[-1]


def _syntax_error(err: UnexpectedInput, source: Source) -> SdslSyntaxError:
    line, column = max(err.line, 1), max(err.column, 1)
    if isinstance(err, UnexpectedToken) and err.token.type != "$END":
        tok = err.token
        span = Span(tok.line, tok.column, tok.end_line or tok.line, tok.end_column or tok.column + 1)
        message = f"expected {_expected(err.expected)}, found '{tok}'"
    elif isinstance(err, UnexpectedCharacters):
        span = Span(line, column, line, column + 1)
        char = source.text[err.pos_in_stream] if err.pos_in_stream < len(source.text) else "?"
        message = f"unexpected character '{char}'"
        if err.allowed:
            message += f"; expected {_expected(err.allowed)}"
    else:
        lines = source.text.splitlines() or [""]
        line = len(lines)
        column = len(lines[-1]) + 1
        span = Span(line, column, line, column + 1)
        expected = getattr(err, "expected", None)
        message = "unexpected end of file"
        if expected:
            message += f"; expected {_expected(expected)}"
    return SdslSyntaxError(message, span, source)


def parse(source: Source) -> ast.Module:
    """Parse a .sdsl source into its AST; raises SdslSyntaxError with a span."""
    try:
        tree = _lark().parse(source.text)
    except (UnexpectedToken, UnexpectedCharacters, UnexpectedEOF) as err:
        raise _syntax_error(err, source) from None
    return _ToAst().transform(tree)
