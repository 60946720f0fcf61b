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
}


@cache
def _lark() -> Lark:
    grammar = resources.files("sparsedsl.frontend").joinpath("grammar.lark").read_text()
    return Lark(
        grammar, parser="lalr", start=["start", "format_ref"], propagate_positions=True, maybe_placeholders=False
    )


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

    def let_assign(self, meta, children):
        return ast.Assign(children[0], children[1], self._span(meta), local=True)

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

    def max_reduction(self, meta, children):
        index, body = children
        return ast.Reduction((_name(index),), body, self._span(meta), op="max")

    def call(self, meta, children):
        func, *args = children
        return ast.Call(_name(func), tuple(args), self._span(meta))

    def max_call(self, meta, children):
        span = self._span(meta)
        func = ast.Name("max", Span(span.line, span.column, span.line, span.column + 3))
        return ast.Call(func, tuple(children), span)

    # schedules
    def schedule_decl(self, meta, children):
        kernel, target, *directives = children
        return ast.ScheduleDecl(_name(kernel), _name(target), tuple(directives), self._span(meta))

    def _directive(verb):
        def build(self, meta, children):
            names = tuple(_name(c) for c in children if c.type == "NAME")
            ints = [c for c in children if c.type == "INT"]
            axis = next((str(c) for c in children if c.type == "THREAD_AXIS"), None)
            factor, factor_span = (int(ints[0]), _span_of(ints[0])) if ints else (None, None)
            return ast.Directive(verb, names, factor, self._span(meta), axis, factor_span)

        return build

    split, reorder, vectorize = _directive("split"), _directive("reorder"), _directive("vectorize")
    parallel, unroll, layout = _directive("parallel"), _directive("unroll"), _directive("layout")
    tile, bind, stage, tensorize = _directive("tile"), _directive("bind"), _directive("stage"), _directive("tensorize")
    block = _directive("block")

    # model rules
    def model_decl(self, meta, children):
        name, *rules = children
        linear = tuple(r for r in rules if isinstance(r, ast.Rule))
        attention = tuple(r for r in rules if isinstance(r, ast.AttentionRule))
        return ast.ModelDecl(_name(name), linear, self._span(meta), attention)

    def rule(self, meta, children):
        pattern, kernel, *rest = children
        fmt = next((r for r in rest if isinstance(r, ast.FormatRef)), None)
        number = next((r for r in rest if isinstance(r, Token) and r.type == "NUMBER"), None)
        sparsity, sparsity_span = (float(number), _span_of(number)) if number is not None else (None, None)
        fuse = next((r for r in rest if isinstance(r, str) and not isinstance(r, Token)), None)
        method = next((r for r in rest if isinstance(r, ast.Name)), None)
        dtype, activations = next((r[1:] for r in rest if isinstance(r, tuple)), (None, None))
        return ast.Rule(
            str(pattern)[1:-1],
            _name(kernel),
            fmt,
            sparsity,
            self._span(meta),
            sparsity_span,
            fuse,
            method,
            dtype,
            activations,
        )

    def attention_rule(self, meta, children):
        pattern, *pattern_of = children
        fmt, window = pattern_of or (None, None)
        number, span = (None, None) if window is None else (int(window), _span_of(window))
        return ast.AttentionRule(str(pattern)[1:-1], fmt, number, self._span(meta), span)

    def prune(self, meta, children):
        return _name(children[0])

    def fuse(self, meta, children):
        return str(children[0])[1:-1]

    def dtype(self, meta, children):
        activations = _name(children[1]) if len(children) > 1 else None
        return ("dtype", _name(children[0]), activations)  # tagged: ``prune`` gives a bare Name


def _describe(terminal: str, end: str) -> str:
    if terminal == "$END":
        return end
    if terminal in _TERMINAL_WORDS:
        return _TERMINAL_WORDS[terminal]
    for term in _lark().terminals:
        if term.name == terminal and term.pattern.type == "str":
            return f"'{term.pattern.value}'"
    return terminal.lower()


def _expected(names, end: str) -> str:
    words = sorted({w for n in names for w in (("'%'", "'/'") if n == "DIMOP" else (_describe(n, end),))})
    if len(words) == 1:
        return words[0]
    return ", ".join(words[:-1]) + " or " + words[-1]


def _accepted(err: UnexpectedInput, fallback) -> set[str]:
    """The terminals that could really come next. Lark's ``expected`` is the LALR lookahead set of
    the state, which over-approximates; trying each terminal on the parser stack is exact. None at
    all: the input parsed completely (a format alone), so only its end could come next."""
    parser = getattr(err, "interactive_parser", None)
    if parser is not None:
        try:
            accepts = parser.accepts()
        except Exception:  # noqa: BLE001 - a better message is optional, the error is not
            accepts = None
        if accepts:
            return set(accepts)
    return set(fallback or ()) or {"$END"}


_DIRECTIVES = (
    "split",
    "reorder",
    "vectorize",
    "parallel",
    "unroll",
    "layout",
    "tile",
    "block",
    "bind",
    "stage",
    "tensorize",
)


def _unexpected_token(tok: Token, accepts: set[str], source: Source, end: str) -> tuple[str, Span]:
    span = Span(tok.line, tok.column, tok.end_line or tok.line, tok.end_column or tok.column + 1)
    words = {_describe(n, end) for n in accepts}
    if tok.type == "NAME" and "'split'" in words:
        return f"unknown schedule directive '{tok}' (known: {', '.join(_DIRECTIVES)})", span
    if tok.type == "NAME" and "'format'" in words and "'kernel'" in words:
        return f"expected a declaration (format, kernel, schedule or model), found '{tok}'", span
    if tok.type == "NUMBER" and tok.start_pos is not None:
        # '4.0' where an integer belongs lexes as INT '4' then NUMBER '.0': report all of '4.0'.
        start = tok.start_pos
        while start > 0 and source.text[start - 1].isdigit():
            start -= 1
        before = source.text[start - 1] if start > 0 else " "
        if start < tok.start_pos and not (before.isalnum() or before in "_."):
            text = source.text[start : tok.end_pos]
            span = Span(tok.line, tok.column - (tok.start_pos - start), span.end_line, span.end_column)
            return f"expected an integer, found '{text}'", span
    return f"expected {_expected(accepts, end)}, found '{tok}'", span


def _syntax_error(err: UnexpectedInput, source: Source, end: str) -> SdslSyntaxError:
    """The error in words; ``end`` names the end of the input ("end of file")."""
    line, column = max(err.line, 1), max(err.column, 1)
    if isinstance(err, UnexpectedToken) and err.token.type != "$END":
        message, span = _unexpected_token(err.token, _accepted(err, err.expected), source, end)
    elif isinstance(err, UnexpectedCharacters):
        span = Span(line, column, line, column + 1)
        char = source.text[err.pos_in_stream] if err.pos_in_stream < len(source.text) else "?"
        rest_of_line = source.text[err.pos_in_stream + 1 :].split("\n", 1)[0]
        if char == '"' and '"' not in rest_of_line:
            message = "unterminated string: a string ends with '\"' on the same line"
        else:
            shown = char if char.isprintable() else ascii(char)[1:-1]
            message = f"unexpected character '{shown}'"
            accepts = _accepted(err, err.allowed)
            if accepts:
                message += f"; expected {_expected(accepts, end)}"
    else:
        # End of file: report it just after the last token, not on trailing blank or comment lines.
        tok = getattr(err, "token", None)
        if tok is not None and getattr(tok, "end_line", None):
            line, column = tok.end_line, tok.end_column
        else:
            lines = source.text.splitlines() or [""]
            line, column = len(lines), len(lines[-1]) + 1
        span = Span(line, column, line, column + 1)
        expected = _accepted(err, getattr(err, "expected", None))
        message = f"unexpected {end}"
        if expected:
            message += f"; expected {_expected(expected, end)}"
    return SdslSyntaxError(message, span, source)


def parse(source: Source) -> ast.Module:
    """Parse a .sdsl source into its AST; raises SdslSyntaxError with a span."""
    try:
        tree = _lark().parse(source.text, start="start")
    except (UnexpectedToken, UnexpectedCharacters, UnexpectedEOF) as err:
        raise _syntax_error(err, source, "end of file") from None
    decls = []
    for decl in tree.children:
        try:
            decls.append(_ToAst().transform(decl))
        except RecursionError:
            span = _span_of(decl)
            raise SdslSyntaxError("this declaration is nested too deeply", span, source) from None
    return ast.Module(tuple(decls))


def parse_format_ref(source: Source) -> ast.FormatRef:
    """Parse a format written alone, as users pass it to ``pack``: ``"BSR(4, 1)"``, nothing after it;
    a syntax error is located in that text."""
    try:
        tree = _lark().parse(source.text, start="format_ref")
    except (UnexpectedToken, UnexpectedCharacters, UnexpectedEOF) as err:
        raise _syntax_error(err, source, "end of the format") from None
    return _ToAst().transform(tree)
