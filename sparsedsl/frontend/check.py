"""Semantic checks: AST -> checked program (formats, kernel IR, schedules, model rules).

Every problem is an SdslSemanticError at the span of the offending text.
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass, field, replace
from functools import cache
from importlib import resources

import sympy

from sparsedsl.errors import SdslError, SdslSemanticError, Source, Span
from sparsedsl.frontend import ast
from sparsedsl.frontend.parser import parse, parse_format_ref
from sparsedsl.ir import kernel_ir as K
from sparsedsl.ir import levels as lv
from sparsedsl.ir.buffer_names import DERIVED, RESERVED
from sparsedsl.ir.formats import Format, FormatDef, LevelTemplate, make_level
from sparsedsl.ir.schedule import MAX_LANES

LEVEL_ARITY = {"dense": (0,), "compressed": (0, 1), "singleton": (0,), "nm": (2,), "fixed": (1,)}
TARGETS = ("cpu", "cuda")
INT_MAX = 2**31 - 1  # every target indexes with int32: no integer literal may exceed it
MAX_TILE = MAX_LANES  # a token tile is one vector of T lanes: TVM refuses 32768, and takes minutes past 8192
DTYPE_MAX = {  # the largest finite value of each dtype: a number literal must fit the kernel's
    "float16": 65504.0,
    "bfloat16": 3.3895313892515355e38,
    "float32": 3.4028234663852886e38,
    "float64": sys.float_info.max,
    "int8": 127.0,
    "uint8": 255.0,
    "int32": float(INT_MAX),
}
HALVES = ("float16", "bfloat16")  # a sum of them accumulates in f32, and may meet f32 as f32
_SPELLING = {v: k for k, v in K.DTYPES.items()}  # float32 -> f32: messages use the names users write


def _dt(dtype: str) -> str:
    return _SPELLING.get(dtype, dtype)


@dataclass
class Program:
    """A checked .sdsl file: its formats (prelude included), kernels, schedules and model rules."""

    source: Source
    formats: dict[str, FormatDef] = field(default_factory=dict)
    kernels: dict[str, K.Kernel] = field(default_factory=dict)
    schedules: dict[tuple[str, str], ast.ScheduleDecl] = field(default_factory=dict)
    models: dict[str, ast.ModelDecl] = field(default_factory=dict)

    def format(self, ref: ast.FormatRef) -> Format:
        """Instantiate a format reference such as ``BSR(4, 1)``."""
        fdef = self.formats.get(ref.name.text)
        if fdef is None:
            known = ", ".join(sorted(self.formats))
            raise SdslSemanticError(f"unknown format '{ref.name.text}' (known: {known})", ref.name.span)
        for arg in ref.args:
            _check_int(int(arg.value), arg.span, "format argument")
        fmt = fdef.instantiate(tuple(int(a.value) for a in ref.args), ref.span)
        for level_map, level in zip(fmt.maps, fmt.levels):
            if isinstance(level, lv.NM) and (level_map.op != "%" or level_map.factor != level.m):
                where = level_map.text(fmt.dims)
                raise SdslSemanticError(
                    f"{fmt.label} stores {level.describe()} on '{where}': an nm(n, m) level must store "
                    f"'{fmt.dims[level_map.dim]} % {level.m}'",
                    ref.span,
                )
        return fmt

    def parse_format(self, text: str) -> Format:
        """A format written as text, as users pass it to ``pack``: ``"BSR(4, 1)"``. An error keeps
        its class, says ``invalid format '...'`` and is located in that text."""
        source = Source(text, "<format>")
        try:
            return self.format(parse_format_ref(source))
        except SdslError as err:
            raise type(err)(f"invalid format '{text}': {err.message}", err.span, source) from None


@cache
def _prelude() -> ast.Module:
    text = resources.files("sparsedsl").joinpath("prelude.sdsl").read_text()
    return parse(Source(text, "<prelude>"))


def check(source: Source, formats: dict[str, FormatDef] | None = None) -> Program:
    """Parse and check a .sdsl source; raises an SdslError carrying span and source.
    ``formats`` are known in addition to the prelude (those of another program)."""
    try:
        module = parse(source)
        program = Program(source)
        for decl in _prelude().decls:
            program.formats[decl.name.text] = _check_format(decl)
        program.formats.update(formats or {})
        user_formats: set[str] = set()
        for decl in module.decls:
            try:
                _check_decl(decl, program, user_formats)
            except RecursionError:
                raise SdslSemanticError("this declaration is nested too deeply", decl.span) from None
        return program
    except SdslError as err:
        raise err.with_source(source) from None


def _check_decl(decl: ast.Decl, program: Program, user_formats: set[str]) -> None:
    match decl:
        case ast.FormatDecl():
            if decl.name.text in user_formats:
                raise SdslSemanticError(f"format '{decl.name.text}' is defined twice", decl.name.span)
            user_formats.add(decl.name.text)
            program.formats[decl.name.text] = _check_format(decl)
        case ast.KernelDecl():
            if decl.name.text in program.kernels:
                raise SdslSemanticError(f"kernel '{decl.name.text}' is defined twice", decl.name.span)
            program.kernels[decl.name.text] = _check_kernel(decl, program)
        case ast.ScheduleDecl():
            _check_schedule(decl, program)
        case ast.ModelDecl():
            _check_model(decl, program)


def _join(a: Span, b: Span) -> Span:
    """The span from the start of ``a`` to the end of ``b``."""
    return Span(a.line, a.column, b.end_line, b.end_column)


def _check_int(value: int, span: Span, what: str) -> None:
    """An integer literal the generated code can hold (``INT_MAX``)."""
    if value > INT_MAX:
        raise SdslSemanticError(
            f"{what} {value} is too large: the generated code indexes with int32 (at most {INT_MAX})", span
        )


# ---- formats -------------------------------------------------------------------------------


def _check_format(decl: ast.FormatDecl) -> FormatDef:
    params = [p.text for p in decl.params]
    dims = [d.text for d in decl.dims]
    for names, what in ((decl.params, "parameter"), (decl.dims, "dimension")):
        seen: set[str] = set()
        for n in names:
            if n.text in seen:
                raise SdslSemanticError(f"{what} '{n.text}' is named twice", n.span)
            seen.add(n.text)

    def param_value(p: ast.Param, what: str) -> int | str:
        if isinstance(p.value, int):
            if p.value < 1:
                raise SdslSemanticError(f"{what} must be at least 1, got {p.value}", p.span)
            _check_int(p.value, p.span, what)
            return p.value
        if p.value not in params:
            raise SdslSemanticError(f"unknown format parameter '{p.value}'", p.span)
        return p.value

    levels: list[LevelTemplate] = []
    parts: dict[str, list[tuple[str | None, int | str, ast.LevelDecl]]] = {d: [] for d in dims}
    for lvl in decl.levels:
        dim = lvl.dim.dim.text
        if dim not in dims:
            raise SdslSemanticError(f"'{dim}' is not a dimension of format '{decl.name.text}'", lvl.dim.dim.span)
        kind = lvl.level_type.text
        if kind not in LEVEL_ARITY:
            known = ", ".join(LEVEL_ARITY)
            raise SdslSemanticError(f"unknown level type '{kind}' (known: {known})", lvl.level_type.span)
        kind_span = _join(lvl.level_type.span, lvl.span)  # 'nm(2, 4)': the type and its arguments
        if len(lvl.args) not in LEVEL_ARITY[kind]:
            want = " or ".join(map(str, LEVEL_ARITY[kind]))
            raise SdslSemanticError(f"level type '{kind}' takes {want} arguments, got {len(lvl.args)}", kind_span)
        if kind == "compressed" and lvl.args and lvl.args[0].value != "nonunique":
            raise SdslSemanticError("compressed takes only the option 'nonunique'", lvl.args[0].span)
        if kind == "compressed":
            args = tuple(a.value for a in lvl.args)
        else:
            args = tuple(param_value(a, f"{kind} argument") for a in lvl.args)
            if args and all(isinstance(a, int) for a in args):
                make_level(kind, args, kind_span)  # literal arguments are validated here, not at use
        factor = param_value(lvl.dim.operand, "block size") if lvl.dim.operand else 1
        if kind == "nm":
            # A group of m coordinates: the level must be 'j % m' (checked at use when they differ by name).
            m = args[1]
            written = dim if lvl.dim.op is None else f"{dim} {lvl.dim.op} {factor}"
            if lvl.dim.op != "%" or (isinstance(factor, int) and isinstance(m, int) and factor != m):
                raise SdslSemanticError(f"an nm(n, m) level must store '{dim} % {m}', not '{written}'", lvl.dim.span)
        parts[dim].append((lvl.dim.op, factor, lvl))
        arg_spans = tuple(a.span for a in lvl.args)
        levels.append(LevelTemplate(dims.index(dim), lvl.dim.op, factor, kind, args, lvl.span, arg_spans))
    for dim_name, dim in zip(dims, decl.dims):
        ops = sorted((op or "") for op, _, _ in parts[dim_name])
        if not parts[dim_name]:
            raise SdslSemanticError(f"dimension '{dim_name}' is stored by no level", dim.span)
        if ops == ["%", "/"]:
            (f1, f2) = (f for _, f, _ in parts[dim_name])
            if f1 != f2:
                lvl = parts[dim_name][1][2]
                raise SdslSemanticError(f"'{dim_name}' is split by {f1} and by {f2}: use one factor", lvl.dim.span)
        elif ops != [""]:
            lvl = parts[dim_name][-1][2]
            raise SdslSemanticError(
                f"dimension '{dim_name}' must be stored exactly once: either '{dim_name}' or both "
                f"'{dim_name} / b' and '{dim_name} % b'",
                lvl.dim.span,
            )
    _check_level_order(decl, levels)
    return FormatDef(decl.name.text, tuple(params), tuple(dims), tuple(levels), decl.span)


def _check_level_order(decl: ast.FormatDecl, levels: list[LevelTemplate]) -> None:
    nonunique = False
    for t, lvl in zip(levels, decl.levels):
        where = _join(lvl.level_type.span, lvl.span)
        if t.level_type == "singleton" and not nonunique:
            raise SdslSemanticError("a singleton level must follow a compressed(nonunique) level", where)
        if nonunique and t.level_type != "singleton":
            raise SdslSemanticError("only singleton levels may follow a compressed(nonunique) level", where)
        nonunique = nonunique or (t.level_type == "compressed" and bool(t.args))
    t, lvl = levels[-1], decl.levels[-1]
    if t.level_type == "compressed" and t.args:
        where = _join(lvl.level_type.span, lvl.span)
        raise SdslSemanticError("compressed(nonunique) must be followed by singleton levels", where)


# ---- kernels -------------------------------------------------------------------------------


def _check_tensor(
    decl: ast.TensorDecl, program: Program, inputs: dict[str, K.TensorParam], output: bool
) -> K.TensorParam:
    dtype = K.DTYPES[decl.dtype.text]
    shape = tuple(s.text for s in decl.shape) if decl.shape is not None else None
    if decl.storage is None:
        return K.TensorParam(decl.name.text, dtype, shape, span=decl.span)
    if shape is None:
        raise SdslSemanticError(f"scalar '{decl.name.text}' cannot have a sparse format", decl.storage.span)
    ref = decl.storage
    if output and ref.name.text in inputs and not ref.args:
        src = inputs[ref.name.text]
        if not src.sparse:
            raise SdslSemanticError(f"output pattern '{ref.name.text}' is not a sparse input", ref.name.span)
        if len(src.shape) != len(shape):
            raise SdslSemanticError(
                f"'{decl.name.text}' has rank {len(shape)} but its pattern '{src.name}' has rank {len(src.shape)}",
                decl.span,
            )
        if shape != src.shape:
            raise SdslSemanticError(
                f"'{decl.name.text}' has shape [{', '.join(shape)}] but its pattern '{src.name}' has "
                f"[{', '.join(src.shape)}]: a sparse output has the shape of its pattern",
                decl.span,
            )
        return K.TensorParam(decl.name.text, dtype, shape, src.format, True, src.name, decl.span)
    if output:
        raise SdslSemanticError(
            "a sparse output takes the pattern of a sparse input: "
            f"write '@ S' with S an input, not '@ {ref.name.text}'",
            ref.span,
        )
    fmt = program.format(ref)
    if fmt.rank != len(shape):
        raise SdslSemanticError(
            f"format {fmt.label} stores {fmt.rank}-d tensors, but '{decl.name.text}' has rank {len(shape)}", ref.span
        )
    return K.TensorParam(decl.name.text, dtype, shape, fmt, True, None, decl.span)


def _check_names(tensors: list[ast.Name]) -> None:
    """Tensor names must not be ones the compiler gives its own buffers: ``acc``, a copy of another
    tensor (``X_t``, ``X_s``, ``X_frag``), or a level buffer of another (``W_vals``, ``W_1_pos``)."""
    names = [t.text for t in tensors]
    for t in tensors:
        name = t.text
        owner = next(
            (
                n
                for n in names
                if n != name
                and name.startswith(n + "_")
                and (name[len(n) :] in DERIVED or name[len(n) + 1 : len(n) + 2].isdigit())
            ),
            None,
        )
        if name in RESERVED or owner is not None:
            what = f"the compiler's own copy of '{owner}'" if owner else "a buffer the compiler declares"
            raise SdslSemanticError(f"tensor name '{name}' is reserved for {what}: rename it", t.span)


def _check_kernel(decl: ast.KernelDecl, program: Program) -> K.Kernel:
    *lets, stmt = decl.body
    _check_names([*(t.name for t in (*decl.inputs, *decl.outputs)), *(s.target.tensor for s in lets)])
    params: dict[str, K.TensorParam] = {}
    for t in decl.inputs:
        if t.name.text in params:
            raise SdslSemanticError(f"parameter '{t.name.text}' is declared twice", t.name.span)
        params[t.name.text] = _check_tensor(t, program, params, output=False)
    sparse = [p for p in params.values() if p.sparse]
    if len(sparse) > 1:
        raise SdslSemanticError(
            "kernels with more than one sparse input are not supported yet "
            f"('{sparse[0].name}' and '{sparse[1].name}')",
            sparse[1].span,
        )
    if len(decl.outputs) != 1:
        raise SdslSemanticError("a kernel has exactly one output", decl.outputs[1].span)
    out_decl = decl.outputs[0]
    if out_decl.name.text in params:
        raise SdslSemanticError(f"output '{out_decl.name.text}' has the name of an input", out_decl.name.span)
    if out_decl.shape is None:
        raise SdslSemanticError("the output must be a tensor with a shape", out_decl.span)
    output = _check_tensor(out_decl, program, params, output=True)
    _check_order(decl.body, output.name, params)
    scope = {**params, output.name: output}
    checked_lets = tuple(_check_let(s, scope, output.dtype, program) for s in lets)
    extents: dict[str, tuple[sympy.Expr, str, ast.Name]] = {}
    out_indices = _check_access(stmt.target, scope, extents)
    _check_sums(stmt.value)
    value, dtype = _check_expr(stmt.value, scope, extents, frozenset(out_indices), set(), program)
    if dtype is not None and dtype != output.dtype and not (output.dtype in K.INTEGERS and dtype not in K.INTEGERS):
        raise SdslSemanticError(
            f"the value has dtype {_dt(dtype)} but the output '{output.name}' is {_dt(output.dtype)}", stmt.value.span
        )
    _check_numbers(stmt.value, output.dtype, program.source)
    given = {d for p in params.values() for d in p.shape or ()}
    for idx, dim in zip(stmt.target.indices, output.shape):
        if dim not in given:
            raise SdslSemanticError(
                f"output index '{idx.text}' is neither used on the right nor summed, "
                f"and no input gives its extent {dim}",
                idx.span,
            )
    kernel = K.Kernel(decl.name.text, tuple(params.values()), output, out_indices, value, decl.span, checked_lets)
    if kernel.batch:
        _check_batch(kernel, decl)
        _check_rows(kernel.unbatched(), decl)
    elif kernel.rowwise:
        _check_rows(kernel, decl)
    else:
        _check_structure(kernel, stmt)
    return kernel


def _check_order(body: tuple[ast.Assign, ...], output: str, params: dict[str, K.TensorParam]) -> None:
    """Intermediates (``let``) first, each defined once before it is read and read at least once;
    the output assigned once, last, and never read."""
    defined: dict[str, Span] = {}
    for n, stmt in enumerate(body):
        name, last = stmt.target.tensor.text, n == len(body) - 1
        for read in _reads(stmt.value):
            later = next((s for s in body[n:] if s.local and s.target.tensor.text == read.tensor.text), None)
            if read.tensor.text == output:
                raise SdslSemanticError(f"the output '{output}' cannot be read: it is being written", read.span)
            if later is not None and read.tensor.text not in defined and read.tensor.text not in params:
                raise SdslSemanticError(
                    f"'{read.tensor.text}' is used before its definition (line {later.span.line})", read.span
                )
        where = stmt.target.tensor.span
        if stmt.local:
            if name == output:
                raise SdslSemanticError(f"the output '{output}' is assigned without 'let'", stmt.span)
            if name in params:
                raise SdslSemanticError(f"'{name}' is an input: an intermediate needs a name of its own", where)
            if name in defined:
                raise SdslSemanticError(f"intermediate '{name}' is defined twice (first at {defined[name]})", where)
            if last:
                raise SdslSemanticError(f"the last statement must assign the output '{output}'", stmt.span)
            defined[name] = where
        elif name != output or not last:
            if name == output:
                what = f"the output '{output}' is assigned before the last statement"
                raise SdslSemanticError(f"{what}: it is assigned once, after the intermediates ('let')", where)
            what = "an input" if name in params else "not the output"
            hint = "" if name in params else f" (or define an intermediate: 'let {name}[...] = ...')"
            raise SdslSemanticError(f"'{name}' is {what}: assign to the output '{output}'{hint}", where)
    for name, where in defined.items():
        if not any(r.tensor.text == name for s in body for r in _reads(s.value)):
            raise SdslSemanticError(f"intermediate '{name}' is never read", where)


def _check_let(stmt: ast.Assign, scope: dict[str, K.TensorParam], dtype: str, program: Program) -> K.Let:
    """An intermediate: checked like an output whose shape its indices take on the right; added to
    ``scope`` for the statements after it."""
    name = stmt.target.tensor.text
    indices = tuple(i.text for i in stmt.target.indices)
    for n, idx in enumerate(stmt.target.indices):
        if idx.text in indices[:n]:
            raise SdslSemanticError(
                f"index '{idx.text}' is repeated in one access (diagonals are not supported)", idx.span
            )
    extents: dict[str, tuple[sympy.Expr, str, ast.Name]] = {}
    _check_sums(stmt.value)
    value, value_dtype = _check_expr(stmt.value, scope, extents, frozenset(indices), set(), program)
    for idx in stmt.target.indices:
        if idx.text not in extents:
            raise SdslSemanticError(
                f"index '{idx.text}' of intermediate '{name}' is not used on the right: its extent is unknown",
                idx.span,
            )
    dtype = value_dtype or dtype
    _check_numbers(stmt.value, dtype, program.source)
    target = K.TensorParam(name, dtype, tuple(str(extents[i][0]) for i in indices), span=stmt.target.span)
    scope[name] = target
    return K.Let(target, indices, value)


def _check_rows(kernel: K.Kernel, decl: ast.KernelDecl) -> None:
    """A kernel of several statements (or with a max) is lowered row by row: an optional first
    statement computes the rows ``H[t, r]`` as a one-statement kernel would (it alone may read the
    sparse input or sum over other indices); every later statement is indexed ``[t, r]`` or
    ``[t]`` and reduces over the row index ``r`` only; an output indexed ``[t, c]`` (``c`` not the
    row) is one sum over ``r`` (attention's ``O[t, d] = sum(j) P[t, j] * V[j, d]``)."""
    out_decl = decl.outputs[0]
    if kernel.output.pattern_of or len(kernel.indices) != 2:
        raise SdslSemanticError(
            f"kernel '{kernel.name}' computes its output row by row (it has intermediates or a max): the "
            "output must be a dense matrix, indexed [token, row]",
            out_decl.span,
        )
    token, row = kernel.indices[0], kernel.row
    sparse = kernel.sparse_input
    first, stmts = kernel.statements[0], kernel.statements
    producer = kernel.product_first
    if producer:
        stmt = decl.body[0]
        if first.indices != (token, row):
            raise SdslSemanticError(
                f"the first statement computes the rows that the others read: index it [{token}, {row}], like "
                "the output",
                stmt.target.span,
            )
        maxes = [r for r in _ast_sums(stmt.value) if r.op != "sum"]
        if maxes:
            raise SdslSemanticError(
                f"the first statement's reduction is a sum; a max runs over the row index '{row}' in a later one",
                maxes[0].span,
            )
        rows = K.Kernel(kernel.name, kernel.inputs, first.target, first.indices, first.value, kernel.span)
        _check_structure(rows, stmt)
        for read in _reads(stmt.value):
            indices = tuple(i.text for i in read.indices)
            if sparse is not None and read.tensor.text == sparse.name and token in indices and indices != first.indices:
                raise SdslSemanticError(
                    f"the rows run along the output's first index '{token}', one token tile at a time: the sparse "
                    f"input stores it only as a mask of the rows (index '{sparse.name}' [{token}, {row}], or by the "
                    "row and summed indices)",
                    read.span,
                )
    for checked, stmt in zip(stmts[producer:], decl.body[producer:]):
        if checked.target is kernel.output and row != kernel.indices[1]:
            _check_row_sum(stmt, row)
        elif checked.indices not in ((token, row), (token,)):
            raise SdslSemanticError(
                f"a row-wise statement is indexed [{token}, {row}] or [{token}], like the output's rows",
                stmt.target.span,
            )
        for read in _reads(stmt.value):
            if sparse is not None and read.tensor.text == sparse.name:
                raise SdslSemanticError(
                    f"only the first statement may read the sparse input '{sparse.name}' (as a factor of its sum)",
                    read.span,
                )
        for reduction in _ast_sums(stmt.value):
            if [i.text for i in reduction.indices] != [row]:
                raise SdslSemanticError(
                    f"a row-wise reduction runs over the row index '{row}' only (the first statement may sum "
                    "over others)",
                    reduction.span,
                )
    if sparse is not None and not producer:
        raise SdslSemanticError(f"sparse input '{sparse.name}' is not used", sparse.span)


def _check_batch(kernel: K.Kernel, decl: ast.KernelDecl) -> None:
    """A row-wise kernel with batch indices (``K.Kernel.batch``): every statement is indexed by all
    of them, each tensor reads them at the same dimensions in every access, and the sparse input by
    none (one pattern for every batch element)."""
    batch, sparse = kernel.batch, kernel.sparse_input
    names = ", ".join(f"'{b}'" for b in batch)
    seen: dict[str, tuple[str, Span]] = {}  # tensor -> its batch dimensions, where first read
    for checked, stmt in zip(kernel.statements, decl.body):
        missing = [b for b in batch if b not in checked.indices]
        if missing:
            raise SdslSemanticError(
                f"a batched kernel indexes every statement by its batch indices {names} (the first statement's "
                f"indices before its token): '{missing[0]}' is missing",
                stmt.target.span,
            )
        for access in (stmt.target, *_reads(stmt.value)):
            name, indices = access.tensor.text, [i.text for i in access.indices]
            dims = "[" + ", ".join(i if i in batch else "_" for i in indices) + "]"
            if sparse is not None and name == sparse.name and any(i in batch for i in indices):
                raise SdslSemanticError(
                    f"the sparse input '{name}' is one pattern for every batch element: it is not indexed by the "
                    f"batch indices {names}",
                    access.span,
                )
            first, where = seen.setdefault(name, (dims, access.span))
            if dims != first:
                raise SdslSemanticError(
                    f"'{name}' is read with its batch indices at {dims} here but at {first} on line {where.line}: "
                    "a tensor's batch dimensions are the same in every access",
                    access.span,
                )


def _check_row_sum(stmt: ast.Assign, row: str) -> None:
    """The output statement of a row-wise kernel whose output is not indexed by the row: its
    value is one ``sum`` over the row (the rows reduced into ``[t, c]``), with an epilogue (at most
    one reduction, over the row: checked before)."""
    reductions = _ast_sums(stmt.value)
    if not reductions or reductions[0].op != "sum":
        where = reductions[0].span if reductions else stmt.value.span
        raise SdslSemanticError(
            f"the output is not indexed by the row '{row}': its value sums the rows, one 'sum({row})' and an epilogue",
            where,
        )


def _walk(node) -> list:
    """An AST expression and all its subexpressions, outermost first, in source order."""
    match node:
        case ast.BinOp(_, lhs, rhs):
            children = [lhs, rhs]
        case ast.Neg(operand) | ast.Reduction(_, operand):
            children = [operand]
        case ast.Call(_, args):
            children = list(args)
        case _:
            children = []
    return [node, *(n for child in children for n in _walk(child))]


def _reads(node) -> list[ast.Access]:
    """Every tensor access in an AST expression."""
    return [n for n in _walk(node) if isinstance(n, ast.Access)]


def _check_access(node: ast.Access, scope, extents) -> tuple[str, ...]:
    name = node.tensor.text
    if name not in scope:
        raise SdslSemanticError(f"unknown tensor '{name}'", node.tensor.span)
    param = scope[name]
    if param.shape is None:
        raise SdslSemanticError(f"'{name}' is a scalar and takes no indices", node.span)
    if len(node.indices) != len(param.shape):
        raise SdslSemanticError(
            f"'{name}' has rank {len(param.shape)} but is indexed with {len(node.indices)} indices", node.span
        )
    seen: set[str] = set()
    for idx, dim in zip(node.indices, param.shape):
        if idx.text in seen:
            raise SdslSemanticError(
                f"index '{idx.text}' is repeated in one access (diagonals are not supported)", idx.span
            )
        seen.add(idx.text)
        size = sympy.Symbol(dim, positive=True, integer=True)
        if idx.text in extents:
            other, where, _ = extents[idx.text]
            if sympy.simplify(size - other) != 0:
                raise SdslSemanticError(
                    f"index '{idx.text}' has extent {dim} in '{name}' but {other} in '{where}'", idx.span
                )
        else:
            extents[idx.text] = (size, name, idx)
    return tuple(i.text for i in node.indices)


def _check_expr(node, scope, extents, bound: frozenset[str], used: set[str], program) -> tuple[K.KExpr, str | None]:
    """Kernel-IR expression and its dtype (None for untyped literals)."""
    match node:
        case ast.Access():
            indices = _check_access(node, scope, extents)
            for idx, name in zip(indices, node.indices):
                if idx not in bound:
                    raise SdslSemanticError(
                        f"index '{idx}' is neither an index of the output nor summed over", name.span
                    )
            used.update(indices)
            if scope[node.tensor.text].pattern_of:
                raise SdslSemanticError(f"the output '{node.tensor.text}' cannot be read", node.span)
            return K.KAccess(node.tensor.text, indices), scope[node.tensor.text].dtype
        case ast.Number():
            return K.KConst(node.value), None
        case ast.ScalarRef():
            name = node.name.text
            if name not in scope and any(name in (p.shape or ()) for p in scope.values()):
                return K.KSize(name), None
            if name not in scope:
                raise SdslSemanticError(f"unknown name '{name}'", node.span)
            if scope[name].shape is not None:
                raise SdslSemanticError(f"'{name}' is a tensor: index it, as in {name}[...]", node.span)
            return K.KScalar(name), scope[name].dtype
        case ast.Neg():
            inner, dtype = _check_expr(node.operand, scope, extents, bound, used, program)
            return K.KBin("-", K.KConst(0.0), inner), dtype
        case ast.BinOp():
            a, da = _check_expr(node.lhs, scope, extents, bound, used, program)
            b, db = _check_expr(node.rhs, scope, extents, bound, used, program)
            return K.KBin(node.op, a, b), _binary_dtype(da, db, node, a, b)
        case ast.Call():
            func = node.func.text
            if func not in K.FUNCTIONS:
                known = ", ".join(sorted(K.FUNCTIONS))
                raise SdslSemanticError(f"unknown function '{func}' (known: {known})", node.func.span)
            if len(node.args) != K.FUNCTIONS[func]:
                raise SdslSemanticError(
                    f"'{func}' takes {K.FUNCTIONS[func]} argument(s), got {len(node.args)}", node.span
                )
            checked = [_check_expr(a, scope, extents, bound, used, program) for a in node.args]
            dtypes = {d for _, d in checked if d}
            if len(dtypes) > 1:
                raise SdslSemanticError(
                    f"dtype mismatch in arguments of '{func}': {', '.join(sorted(map(_dt, dtypes)))}", node.span
                )
            if dtypes & set(K.INTEGERS):
                raise SdslSemanticError(
                    f"'{func}' takes float arguments, got {', '.join(sorted(map(_dt, dtypes)))}: "
                    "dequantize first, as in (sum(k) X[m, k] * W[n, k]) * scale[n]",
                    node.span,
                )
            return K.KCall(func, tuple(e for e, _ in checked)), next(iter(dtypes), None)
        case ast.Reduction():
            for idx in node.indices:
                if idx.text in bound:
                    raise SdslSemanticError(
                        f"index '{idx.text}' is already bound; a {node.op} needs a new index", idx.span
                    )
            inner_used: set[str] = set()
            inner_bound = bound | {i.text for i in node.indices}
            body, dtype = _check_expr(node.body, scope, extents, inner_bound, inner_used, program)
            for idx in node.indices:
                if idx.text not in inner_used:
                    what = "summed" if node.op == "sum" else "reduced"
                    raise SdslSemanticError(f"{what} index '{idx.text}' is not used in the {node.op}", idx.span)
            used.update(inner_used)
            # a sum of integer products is an int32 (its accumulator); a float sum keeps its type
            return K.KSum(tuple(i.text for i in node.indices), body, node.op), "int32" if dtype in K.INTEGERS else dtype
    raise AssertionError(node)


def _binary_dtype(da: str | None, db: str | None, node: ast.BinOp, a: K.KExpr, b: K.KExpr) -> str | None:
    """The dtype of ``a op b``: both the same; two integer types give int32 (i8 x u8, VNNI's
    operands); an int32 (a sum of integer products, the accumulator) meets a float type and
    becomes that float: the dequantization ``(sum(k) X * W) * scale``; a sum of f16 or bf16
    products (accumulated in f32) meets f32 as f32 (a bf16 product plus an f32 bias)."""
    if not (da and db) or da == db:
        return da or db
    if da in K.INTEGERS and db in K.INTEGERS:
        return "int32"
    for narrow, wide, e in ((da, db, a), (db, da, b)):
        if narrow == "int32" and wide not in K.INTEGERS:
            return wide
        if narrow in HALVES and wide == "float32" and isinstance(e, K.KSum):
            return wide
    raise SdslSemanticError(f"dtype mismatch: {_dt(da)} {node.op} {_dt(db)}", node.span)


def _ast_sums(node) -> list[ast.Reduction]:
    """The sums of an expression, outermost first, in source order."""
    return [n for n in _walk(node) if isinstance(n, ast.Reduction)]


def _check_sums(value) -> None:
    """One sum per statement, not nested: reported at the second sum."""
    sums = _ast_sums(value)
    for outer in sums:
        inner = _ast_sums(outer.body)
        if inner:
            raise SdslSemanticError(
                "nested sums are not supported: sum over all indices at once, as in sum(i, j)", inner[0].span
            )
    if len(sums) > 1:
        raise SdslSemanticError("a statement may contain only one sum", sums[1].span)


def _check_structure(kernel: K.Kernel, stmt: ast.Assign) -> None:
    """Constraints of the lowering: one reduction, not nested; sparse tensor summed directly."""
    reduction, epilogue = K.split_reduction(kernel.value)
    if reduction is not None and any(isinstance(x, K.KSum) for x in _subexprs(reduction.body)):
        raise SdslSemanticError("nested sums are not supported: write sum(i, j) instead", stmt.value.span)
    if any(isinstance(x, K.KSum) for x in _subexprs(epilogue)):
        raise SdslSemanticError("a statement may contain only one sum", stmt.value.span)
    sparse = kernel.sparse_input
    if sparse is not None:
        in_epilogue = [a for a in K.accesses(epilogue) if a.tensor == sparse.name]
        if in_epilogue and reduction is not None and not kernel.output.pattern_of:
            raise SdslSemanticError(f"the sparse tensor '{sparse.name}' must be used inside the sum", stmt.value.span)
    out_idx = set(kernel.indices)
    for access in K.accesses(epilogue):
        for idx in access.indices:
            if idx not in out_idx:
                raise SdslSemanticError(f"index '{idx}' outside the sum must be an output index", stmt.value.span)
    if kernel.output.pattern_of:
        pattern = kernel.param(kernel.output.pattern_of)
        for a in K.accesses(kernel.value):
            if a.tensor == pattern.name and a.indices != kernel.indices:
                raise SdslSemanticError(f"'{pattern.name}' must be indexed like the output", stmt.value.span)
    elif sparse is not None:
        _check_dense_output(sparse, stmt)


def _check_dense_output(sparse: K.TensorParam, stmt: ast.Assign) -> None:
    """A dense output is written everywhere, which a read of the sparse input can do only as a factor
    of the summed product: the entries it does not store then contribute nothing."""
    reads = [a for a in _reads(stmt.value) if a.tensor.text == sparse.name]
    if not reads:
        raise SdslSemanticError(f"sparse input '{sparse.name}' is not used", sparse.span)
    sums = _ast_sums(stmt.value)
    if not sums:
        raise SdslSemanticError(
            f"'{sparse.name}' is read without a sum into a dense output, which would be left unwritten where "
            f"'{sparse.name}' stores nothing: make the output sparse ('@ {sparse.name}') or sum",
            reads[0].span,
        )
    if not _is_factor(sums[0].body, sparse.name):
        raise SdslSemanticError(
            f"'{sparse.name}' must be a factor of the summed product, so that its zeros contribute nothing",
            reads[0].span,
        )


def _is_factor(node, tensor: str) -> bool:
    """Whether ``tensor`` is a factor of the product ``node`` (so its zeros annihilate it)."""
    match node:
        case ast.Access():
            return node.tensor.text == tensor
        case ast.BinOp("*", lhs, rhs):
            return _is_factor(lhs, tensor) or _is_factor(rhs, tensor)
        case ast.BinOp("/", lhs, _):
            return _is_factor(lhs, tensor)
    return False


def _check_numbers(value, dtype: str, source: Source) -> None:
    """Number literals the kernel's dtype can hold: 70000.0 is no f16, 1e999 no float at all."""
    for node in _walk(value):
        if isinstance(node, ast.Number) and not abs(node.value) <= DTYPE_MAX[dtype]:
            span = node.span
            text = source.line_text(span.line)[span.column - 1 : span.end_column - 1]
            raise SdslSemanticError(
                f"the number {text} does not fit in {_dt(dtype)} (at most {DTYPE_MAX[dtype]:g})", span
            )


def _subexprs(e: K.KExpr) -> list[K.KExpr]:
    match e:
        case K.KBin(_, a, b):
            return [a, b, *_subexprs(a), *_subexprs(b)]
        case K.KCall(_, args):
            return [x for a in args for x in (a, *_subexprs(a))]
        case K.KSum(_, body):
            return [body, *_subexprs(body)]
    return []


# ---- schedules and models ------------------------------------------------------------------


def _check_schedule(decl: ast.ScheduleDecl, program: Program) -> None:
    if decl.kernel.text not in program.kernels:
        raise SdslSemanticError(f"schedule for unknown kernel '{decl.kernel.text}'", decl.kernel.span)
    if decl.target.text not in TARGETS:
        known = ", ".join(TARGETS)
        raise SdslSemanticError(f"unknown target '{decl.target.text}' (known: {known})", decl.target.span)
    key = (decl.kernel.text, decl.target.text)
    if key in program.schedules:
        raise SdslSemanticError(f"kernel '{key[0]}' already has a schedule on {key[1]}", decl.kernel.span)
    for d in decl.directives:
        if d.factor is not None and d.factor < 1:
            raise SdslSemanticError(
                f"the factor of '{d.verb}' must be at least 1, got {d.factor}", d.factor_span or d.span
            )
        if d.factor is not None:
            _check_int(d.factor, d.factor_span or d.span, f"the factor of '{d.verb}'")
        if d.verb == "tile" and d.factor > MAX_TILE:
            raise SdslSemanticError(
                f"a token tile of {d.factor} is too large: it is one vector of that many lanes (at most {MAX_TILE})",
                d.factor_span or d.span,
            )
        if d.verb in ("bind", "stage", "tensorize") and decl.target.text != "cuda":
            raise SdslSemanticError(f"'{d.verb}' applies to GPU schedules only ('on cuda')", d.span)
        if d.verb == "block" and decl.target.text != "cpu":
            raise SdslSemanticError("'block' applies to CPU schedules only ('on cpu')", d.span)
        if d.verb == "stage" and d.loops[1].text != "shared":
            raise SdslSemanticError(f"can stage in 'shared' memory only, not '{d.loops[1].text}'", d.loops[1].span)
    program.schedules[key] = decl


def _check_model(decl: ast.ModelDecl, program: Program) -> None:
    if decl.name.text in program.models:
        raise SdslSemanticError(f"model '{decl.name.text}' is defined twice", decl.name.span)
    for rule in decl.rules:
        kernel = program.kernels.get(rule.kernel.text)
        if kernel is None:
            raise SdslSemanticError(f"rule uses unknown kernel '{rule.kernel.text}'", rule.kernel.span)
        weight = kernel.sparse_input
        if weight is None:
            raise SdslSemanticError(
                f"kernel '{rule.kernel.text}' has no sparse input to store a weight in", rule.kernel.span
            )
        misfit = _norm_misfit(kernel) if kernel.rowwise else _linear_misfit(kernel)
        if misfit is not None:
            call = LINEAR_NORM_CALL if kernel.rowwise else LINEAR_CALL
            raise SdslSemanticError(
                f"kernel '{kernel.name}' cannot run a linear layer, which calls it as {call}: {misfit}",
                rule.kernel.span,
            )
        if kernel.rowwise and rule.fuse is None:
            raise SdslSemanticError(
                f"kernel '{kernel.name}' normalises the rows of x W^T + b + R: the rule must name the norm module "
                'that it replaces, next to the layer (fuse "GLOB")',
                rule.kernel.span,
            )
        epilogue = K.split_reduction(kernel.value)[1]
        applies = kernel.rowwise or any(isinstance(e, K.KCall) for e in (epilogue, *_subexprs(epilogue)))
        if rule.fuse is not None and not applies:
            raise SdslSemanticError(
                f"fuse \"{rule.fuse}\" replaces a module by the epilogue of kernel '{kernel.name}', but it applies "
                "no function to its sum",
                rule.span,
            )
        if rule.fuse is None and not _adds_only_bias(kernel, epilogue):
            raise SdslSemanticError(
                f"kernel '{kernel.name}' computes more than the layer's x W^T + b after its sum: the rule must "
                "name the module that computes the rest of it in the model (fuse \"GLOB\")",
                rule.kernel.span,
            )
        if rule.format is not None:
            fmt = program.format(rule.format)
            if fmt.rank != len(weight.shape):
                raise SdslSemanticError(
                    f"format {fmt.label} stores {fmt.rank}-d tensors, but '{weight.name}' of kernel "
                    f"'{kernel.name}' has rank {len(weight.shape)}",
                    rule.format.span,
                )
        elif weight.format is None:
            raise SdslSemanticError(
                f"rule for \"{rule.pattern}\" names no format and '{rule.kernel.text}' has none", rule.span
            )
        if rule.sparsity is not None and not 0 <= rule.sparsity < 1:
            raise SdslSemanticError(f"sparsity must be in [0, 1), got {rule.sparsity}", rule.sparsity_span or rule.span)
        fmt = program.format(rule.format) if rule.format is not None else weight.format
        density = _nm_density(fmt)
        if rule.sparsity is not None and density is not None and abs(1 - rule.sparsity - density) > SPARSITY_ROUNDING:
            raise SdslSemanticError(
                f"{fmt.label} stores a fixed density of {density:.3g}: sparsity {rule.sparsity} cannot be reached "
                f"(write {1 - density:.3g}, or none)",
                rule.sparsity_span,
            )
        if rule.prune is not None and rule.prune.text not in PRUNE_METHODS:
            raise SdslSemanticError(
                f"unknown pruning method '{rule.prune.text}' (known: {', '.join(PRUNE_METHODS)})", rule.prune.span
            )
        if rule.dtype is not None and rule.dtype.text not in QUANTIZED_DTYPES:
            known = ", ".join(QUANTIZED_DTYPES)
            raise SdslSemanticError(f"unknown dtype '{rule.dtype.text}' (known: {known})", rule.dtype.span)
        if rule.dtype is not None:
            _check_quantized_rule(rule, kernel, epilogue)
    for attention in decl.attention:
        _check_attention_rule(attention, program)
    program.models[decl.name.text] = decl


def _check_quantized_rule(rule: ast.Rule, kernel: K.Kernel, epilogue: K.KExpr) -> None:
    """A rule with a ``dtype``: the layer runs nn.sdsl's quantized kernels, which fuse an
    activation (``QUANTIZED_ACTIVATIONS``) and no norm; ``static`` / ``dynamic`` scale int8 inputs."""
    if kernel.rowwise:
        raise SdslSemanticError(
            f"an {rule.dtype.text} layer runs sparsedsl's quantized linear kernels, which fuse no norm: "
            "drop the dtype or use a kernel without one",
            rule.dtype.span,
        )
    applied = quantized_activation(kernel) if rule.fuse is not None else None
    if rule.fuse is not None and applied not in QUANTIZED_ACTIVATIONS:
        raise SdslSemanticError(
            f"an {rule.dtype.text} layer fuses {' or '.join(QUANTIZED_ACTIVATIONS)} into its quantized kernel, but "
            f"kernel '{kernel.name}' applies {_applied(epilogue)}: drop 'fuse' or the dtype",
            rule.dtype.span,
        )
    if rule.activations is None:
        return
    if rule.activations.text not in ACTIVATION_SCALES:
        raise SdslSemanticError(
            f"unknown activation scaling '{rule.activations.text}' (known: {', '.join(ACTIVATION_SCALES)})",
            rule.activations.span,
        )
    if rule.dtype.text != "int8":
        raise SdslSemanticError(
            f"'{rule.activations.text}' scales the activations of an int8 layer; {rule.dtype.text} layers keep "
            "theirs in bf16",
            rule.activations.span,
        )


def quantized_activation(kernel: K.Kernel) -> str | None:
    """The function a linear kernel applies to ``x W^T + b`` (``gelu(sum ... + b[n])``), or None."""
    epilogue = K.split_reduction(kernel.value)[1]
    if isinstance(epilogue, K.KCall) and len(epilogue.args) == 1 and _adds_only_bias(kernel, epilogue.args[0]):
        return epilogue.func
    return None


def _applied(epilogue: K.KExpr) -> str:
    calls = [e.func for e in (epilogue, *_subexprs(epilogue)) if isinstance(e, K.KCall)]
    return f"{', '.join(dict.fromkeys(calls))} in its epilogue" if calls else "no function to its sum"


def _check_attention_rule(rule: ast.AttentionRule, program: Program) -> None:
    """An ``attention`` rule's block pattern: a 2-d format ([tokens, keys]) and a window the
    generated code can index with. Whether the attention kernel can read the format is the
    lowering's to say, when ``compile_model`` builds it."""
    if rule.format is None:
        return
    fmt = program.format(rule.format)
    if fmt.rank != 2:
        raise SdslSemanticError(
            f"format {fmt.label} stores {fmt.rank}-d tensors, but an attention block pattern is [tokens, keys]",
            rule.format.span,
        )
    _check_int(rule.window, rule.window_span, "the window")


# The types a model rule may store a layer's values in (``dtype T``): sparsedsl/runtime/quantized.py.
QUANTIZED_DTYPES = ("int8", "bf16")
# How an int8 layer scales its inputs (``dtype int8 static``): per token when called, or by one scale
# calibrated ahead (runtime/quantized.py).
ACTIVATION_SCALES = ("dynamic", "static")
# The activations a quantized layer's kernel computes in its epilogue (``fuse``): nn.sdsl's qlinear_bias_*.
QUANTIZED_ACTIVATIONS = ("gelu", "relu")

# A sparsity asked of a fixed-density format is accepted if it is the format's own, rounded to a
# percent ("NM(1, 3)" with 0.67).
SPARSITY_ROUNDING = 0.005

# The pruning methods a model rule may name (``prune METHOD``), each with whether it needs a sample
# of the layer's inputs (``compile_model(..., calibration=)``): sparsedsl/runtime/prune.py.
PRUNE_METHODS = {"magnitude": False, "wanda": True, "sparsegpt": True}


def _nm_density(fmt: Format) -> float | None:
    """The density of a format of dense and ``nm`` levels only, whatever the tensor's shape; None
    for any other format (``fixed(w)`` depends on the shape: pruning checks those)."""
    if not all(isinstance(level, lv.Dense | lv.NM) for level in fmt.levels):
        return None
    return math.prod(level.n / level.m for level in fmt.levels if isinstance(level, lv.NM))


LINEAR_CALL = "(X: [M, K], W: [N, K] @ format[, b: [N]]) -> (Y: [M, N])"


def _linear_misfit(kernel: K.Kernel) -> str | None:
    """Why ``kernel`` cannot compute a linear layer, called with (input, weight[, bias]); None if it can."""
    if len(kernel.inputs) not in (2, 3):
        return f"it takes {len(kernel.inputs)} inputs"
    x, w, *bias = kernel.inputs
    out = kernel.output
    if not w.sparse:
        return f"its second input '{w.name}' is not the sparse weight"
    for p, rank in ((x, 2), (w, 2), *((b, 1) for b in bias), (out, 2)):
        if p.shape is None:
            return f"'{p.name}' is a scalar"
        if len(p.shape) != rank:
            return f"'{p.name}' has rank {len(p.shape)}, not {rank}"
        if p is not w and (p.sparse or p.pattern_of):
            return f"'{p.name}' is sparse"
    (m, k), (n, w_k) = x.shape, w.shape
    if w_k != k:
        return f"'{w.name}' is [{n}, {w_k}], but a weight is [out, in]: its last dimension is {k}, as in '{x.name}'"
    if m in (n, k):
        return f"'{x.name}' is [{m}, {k}]: its first dimension counts tokens, it needs a name of its own"
    for p, want in (*((b, (n,)) for b in bias), (out, (m, n))):
        if p.shape != want:
            return f"'{p.name}' is [{', '.join(p.shape)}], not [{', '.join(want)}]"
    return None


LINEAR_NORM_CALL = "(X: [M, K], W: [N, K] @ format, b: [N], R: [M, N], gamma: [N], beta: [N], eps) -> (Y: [M, N])"


def _norm_misfit(kernel: K.Kernel) -> str | None:
    """Why a row-wise ``kernel`` cannot compute ``norm(x W^T + b + residual)`` for a linear layer
    and the norm after it, called as ``LINEAR_NORM_CALL``; None if it can."""
    if len(kernel.inputs) != 7:
        return f"it takes {len(kernel.inputs)} inputs"
    x, w, b, r, gamma, beta, eps = kernel.inputs
    misfit = _linear_misfit(replace(kernel, inputs=(x, w, b)))
    if misfit is not None:
        return misfit
    (m, _), (n, _) = x.shape, w.shape
    for p, want in ((r, (m, n)), (gamma, (n,)), (beta, (n,))):
        if p.shape != want or p.sparse:
            shape = "a scalar" if p.shape is None else f"[{', '.join(p.shape)}]" + (" sparse" if p.sparse else "")
            return f"'{p.name}' is {shape}, not [{', '.join(want)}]"
    if eps.shape is not None:
        return f"its last input '{eps.name}' (the norm's epsilon) must be a scalar"
    return None


def _adds_only_bias(kernel: K.Kernel, epilogue: K.KExpr) -> bool:
    """Whether a linear-layer kernel's epilogue is its sum, plus the bias if it takes one."""
    bias = [K.KAccess(p.name, kernel.indices[1:]) for p in kernel.inputs[2:]]
    return epilogue == K.KAcc() or any(epilogue in (K.KBin("+", K.KAcc(), b), K.KBin("+", b, K.KAcc())) for b in bias)
