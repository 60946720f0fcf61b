"""The loop IR: what lowering produces, schedules rewrite and backends consume.

Small frozen dataclasses; expressions are built through the helpers at the bottom, which fold
constants so that index arithmetic of block formats stays readable.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from enum import Enum


class LoopKind(Enum):
    SERIAL = "serial"
    PARALLEL = "parallel"
    VECTORIZED = "vectorized"
    UNROLLED = "unrolled"
    BLOCK_X = "blockIdx.x"  # GPU grid and block axes
    BLOCK_Y = "blockIdx.y"
    THREAD_X = "threadIdx.x"  # summing into a local buffer declared outside it: a cross-thread reduction


# ---- expressions ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Var:
    """A loop variable or bound scalar (int64 index unless said otherwise)."""

    name: str
    dtype: str = "int64"


@dataclass(frozen=True)
class SizeVar:
    """A symbolic size bound at call time from the shape of an argument (``M``, ``W_crd_len``)."""

    name: str
    dtype: str = "int64"


@dataclass(frozen=True)
class Const:
    value: int | float
    dtype: str = "int64"


@dataclass(frozen=True)
class Bin:
    """Binary operation: + - * / // % min max < <= == and."""

    op: str
    a: Expr
    b: Expr


@dataclass(frozen=True)
class Load:
    buffer: Buffer
    indices: tuple[Expr, ...]


@dataclass(frozen=True)
class Call:
    """An elementwise math function: exp, tanh, erf, sqrt, sigmoid."""

    func: str
    args: tuple[Expr, ...]
    dtype: str


@dataclass(frozen=True)
class Cast:
    dtype: str
    value: Expr


@dataclass(frozen=True)
class Select:
    cond: Expr
    then: Expr
    other: Expr


Expr = Var | SizeVar | Const | Bin | Load | Call | Cast | Select


@dataclass(frozen=True)
class Buffer:
    """A kernel argument (scope ``global``) or a kernel-local array: ``local`` (registers on a GPU),
    ``shared`` (a CUDA block's shared memory) or ``thread`` (a GPU block's threads each own a
    slice: the first index is the thread, implicit in the generated code)."""

    name: str
    dtype: str
    shape: tuple[Expr, ...]
    scope: str = "global"


# ---- statements ----------------------------------------------------------------------------


@dataclass(frozen=True)
class For:
    var: Var
    start: Expr
    extent: Expr
    body: Stmt | None = None
    kind: LoopKind = LoopKind.SERIAL


@dataclass(frozen=True)
class Seq:
    stmts: tuple[Stmt, ...]


@dataclass(frozen=True)
class Store:
    """``buffer[indices] = value``. ``atomic``: the value is ``buffer[indices] + v`` and threads of a
    GPU grid may add into the same element at once, so the add is one indivisible step (CUDA's
    ``atomicAdd``); read serially it is the plain store."""

    buffer: Buffer
    indices: tuple[Expr, ...]
    value: Expr
    atomic: bool = False


@dataclass(frozen=True)
class Let:
    """Bind ``var`` to ``value`` for the statements that follow in the same ``Seq``."""

    var: Var
    value: Expr


@dataclass(frozen=True)
class Alloc:
    """A local buffer, live for the statements that follow in the same ``Seq``."""

    buffer: Buffer


@dataclass(frozen=True)
class If:
    cond: Expr
    then: Stmt


TILE = 16  # a tensor-core tile is TILE x TILE


@dataclass(frozen=True)
class TileFill:
    """Zero tile ``tile`` (row and column of tiles) of a tensor-core fragment buffer (scope
    ``wmma.accumulator``). Tile statements are warp-wide: run by every thread of the warp alike,
    outside thread loops; ``ir/emulate.py`` gives their serial meaning."""

    frag: Buffer
    tile: tuple[Expr, Expr]


@dataclass(frozen=True)
class TileCopy:
    """Between tile ``tile`` of a fragment and the 16 x 16 row-major block of ``memory`` at flat
    element ``offset`` with row stride ``ld``: ``load`` fills a ``wmma.matrix_a`` / ``matrix_b``
    tile from memory, else an accumulator tile is stored to memory."""

    frag: Buffer
    tile: tuple[Expr, Expr]
    memory: Buffer
    offset: Expr
    ld: Expr
    load: bool


@dataclass(frozen=True)
class TileMma:
    """Accumulator tile ``c[c_tile] += a[a_tile] @ b[b_tile]`` (products exact, sums in float32)."""

    c: Buffer
    c_tile: tuple[Expr, Expr]
    a: Buffer
    a_tile: tuple[Expr, Expr]
    b: Buffer
    b_tile: tuple[Expr, Expr]


Tile = TileFill | TileCopy | TileMma


@dataclass(frozen=True)
class Transpose:
    """A square block copied transposed, in vector shuffles (CPU backends; ``ir/transposes.py``
    makes them): ``dst[dst_at[c] with lane r added to its last index] = src[src_at[r] with lane c
    added to its last index]`` for every ``r``, ``c`` below ``len(src_at)``. Each ``src_at[r]`` and
    ``dst_at[c]`` starts a run of contiguous elements, every one of them in bounds. ``convert``,
    if any, is what is stored of each element: an expression of ``element(src.dtype)`` (the
    source element) and constants, such as a float tile rounded and saturated into int8."""

    dst: Buffer
    dst_at: tuple[tuple[Expr, ...], ...]
    src: Buffer
    src_at: tuple[tuple[Expr, ...], ...]
    convert: Expr | None = None


def element(dtype: str) -> Var:
    """The source element in a ``Transpose``'s ``convert`` (no loop or scalar has this name)."""
    return Var("@element", dtype)


@dataclass(frozen=True)
class Prefetch:
    """A hint that ``buffer[indices]`` will be read soon: its cache line is fetched ahead (CPU
    backends: ``prefetcht0``). Not a read: it never faults, and the passes that make it keep its
    element inside the buffer anyway."""

    buffer: Buffer
    indices: tuple[Expr, ...]


Stmt = For | Seq | Store | Let | Alloc | If | Tile | Transpose | Prefetch


@dataclass(frozen=True)
class LoopFunc:
    """A kernel in loop IR: its argument buffers and scalars in call order, and its body."""

    name: str
    params: tuple[Buffer | Var, ...]
    body: Stmt
    meta: dict = field(default_factory=dict, compare=False, hash=False)


# ---- builders with constant folding ---------------------------------------------------------


def const(value: int | float, dtype: str = "int64") -> Const:
    return Const(value, dtype)


def _is(e: Expr, value: int) -> bool:
    return isinstance(e, Const) and e.value == value


def add(a: Expr, b: Expr) -> Expr:
    if _is(a, 0):
        return b
    if _is(b, 0):
        return a
    if isinstance(a, Const) and isinstance(b, Const):
        return Const(a.value + b.value, a.dtype)
    return Bin("+", a, b)


def sub(a: Expr, b: Expr) -> Expr:
    if _is(b, 0):
        return a
    if isinstance(a, Const) and isinstance(b, Const):
        return Const(a.value - b.value, a.dtype)
    return Bin("-", a, b)


def mul(a: Expr, b: Expr) -> Expr:
    if _is(a, 1):
        return b
    if _is(b, 1):
        return a
    if _is(a, 0) or _is(b, 0):
        return Const(0, a.dtype if isinstance(a, Const) else b.dtype)
    if isinstance(a, Const) and isinstance(b, Const):
        return Const(a.value * b.value, a.dtype)
    return Bin("*", a, b)


def floordiv(a: Expr, b: Expr) -> Expr:
    if _is(b, 1):
        return a
    if isinstance(a, Const) and isinstance(b, Const) and isinstance(a.value, int) and b.value:
        return Const(a.value // b.value, a.dtype)
    return Bin("//", a, b)


def mod(a: Expr, b: Expr) -> Expr:
    if _is(b, 1):
        return Const(0)
    return Bin("%", a, b)


def ceildiv(a: Expr, b: int) -> Expr:
    """``a / b`` rounded up."""
    return floordiv(add(a, const(b - 1)), const(b))


def unflatten(flat: Expr, extents: tuple[Expr, ...] | list[Expr]) -> tuple[Expr, ...]:
    """The indices, outermost first, of row-major element ``flat`` of a nest (or an array) of these
    extents (the outermost extent is not needed)."""
    indices: list[Expr] = []
    for extent in reversed(extents[1:]):
        indices.insert(0, mod(flat, extent))
        flat = floordiv(flat, extent)
    return (flat, *indices)


def minimum(a: Expr, b: Expr) -> Expr:
    return Bin("min", a, b)


def load(buffer: Buffer, *indices: Expr) -> Load:
    return Load(buffer, tuple(indices))


def seq(*stmts: Stmt | None) -> Stmt:
    flat: list[Stmt] = []
    for s in stmts:
        if s is None:
            continue
        flat.extend(s.stmts if isinstance(s, Seq) else (s,))
    return flat[0] if len(flat) == 1 else Seq(tuple(flat))


def nest(body: Stmt, loops: Sequence[tuple[Var, Expr, LoopKind]]) -> Stmt:
    """``body`` inside ``loops``, outermost first, each ``(variable, extent, kind)`` from 0."""
    for var, extent, kind in reversed(loops):
        body = For(var, const(0), extent, body, kind)
    return body


def with_body(loop: For, body: Stmt) -> For:
    return replace(loop, body=body)


# ---- queries -------------------------------------------------------------------------------


def uses(e: Expr, name: str) -> bool:
    """Whether expression ``e`` reads variable ``name``."""
    match e:
        case Var(n):
            return n == name
        case Bin(_, a, b):
            return uses(a, name) or uses(b, name)
        case Load(_, idx):
            return any(uses(i, name) for i in idx)
        case Call(_, args, _):
            return any(uses(a, name) for a in args)
        case Cast(_, v):
            return uses(v, name)
        case Select(c, t, o):
            return uses(c, name) or uses(t, name) or uses(o, name)
    return False


def subexprs(e: Expr) -> list[Expr]:
    """``e`` and every expression inside it."""
    match e:
        case Bin(_, a, b):
            inner = [a, b]
        case Load(_, idx):
            inner = list(idx)
        case Call(_, args, _):
            inner = list(args)
        case Cast(_, v):
            inner = [v]
        case Select(c, t, o):
            inner = [c, t, o]
        case _:
            inner = []
    return [e, *(x for i in inner for x in subexprs(i))]


def stmt_exprs(s: Stmt) -> list[Expr]:
    """The expressions a statement tree evaluates: loop bounds, indices, values, conditions.
    Like ``stores`` and ``allocs``, it does not look into tile statements: they appear only once
    ``tensorize`` has mapped a kernel, and no checked rewrite may follow it."""
    match s:
        case For(_, start, extent, body, _):
            return [start, extent, *stmt_exprs(body)]
        case Seq(stmts):
            return [e for st in stmts for e in stmt_exprs(st)]
        case Store(_, idx, value):
            return [*idx, value]
        case Let(_, value):
            return [value]
        case If(cond, then):
            return [cond, *stmt_exprs(then)]
        case Transpose(_, dst_at, _, src_at, convert):
            return [i for at in (*dst_at, *src_at) for i in at] + ([convert] if convert is not None else [])
        case Prefetch(_, idx):
            return list(idx)
    return []


def loads(s: Stmt) -> list[Load]:
    """Every read of a buffer in a statement tree (in bounds, indices, values and conditions)."""
    return [e for x in stmt_exprs(s) for e in subexprs(x) if isinstance(e, Load)]


def leaves(s: Stmt) -> list[Stmt]:
    """Every statement of a tree that holds no other (stores, lets, allocs, tile statements), in
    order; ``allocs``, ``stores`` and the passes filter it."""
    match s:
        case For(body=body) | If(then=body):
            return leaves(body)
        case Seq(stmts):
            return [x for st in stmts for x in leaves(st)]
    return [s]


def allocs(s: Stmt) -> list[Buffer]:
    """The local buffers a statement tree declares."""
    return [x.buffer for x in leaves(s) if isinstance(x, Alloc)]


def stores(s: Stmt) -> list[Store]:
    """Every store in a statement tree (tile statements are not stores: see ``stmt_exprs``)."""
    return [x for x in leaves(s) if isinstance(x, Store)]


def dtype_of(e: Expr) -> str:
    """The element type of an expression (``bool`` for comparisons)."""
    match e:
        case Load(buf, _):
            return buf.dtype
        case Const(_, dtype) | Cast(dtype, _) | Var(_, dtype) | Call(_, _, dtype) | SizeVar(_, dtype):
            return dtype
        case Bin(op, a, _):
            return "bool" if op in ("<", "<=", "==", "and") else dtype_of(a)
        case Select(_, t, _):
            return dtype_of(t)
    return "int64"


# ---- printing (sparsedsl emit --stage ir) --------------------------------------------------


def expr_str(e: Expr) -> str:
    match e:
        case Var(name) | SizeVar(name):
            return name
        case Const(value, dtype):
            return repr(value) if dtype.startswith(("int", "uint")) else f"{value!r}f"
        case Bin(op, a, b) if op in ("min", "max"):
            return f"{op}({expr_str(a)}, {expr_str(b)})"
        case Bin(op, a, b):
            return f"({expr_str(a)} {op} {expr_str(b)})"
        case Load(buf, idx):
            return f"{buf.name}[{', '.join(expr_str(i) for i in idx)}]"
        case Call(func, args, _):
            return f"{func}({', '.join(expr_str(a) for a in args)})"
        case Cast(dtype, value):
            return f"{dtype}({expr_str(value)})"
        case Select(c, t, o):
            return f"select({expr_str(c)}, {expr_str(t)}, {expr_str(o)})"
    raise TypeError(e)


def stmt_lines(s: Stmt, indent: int = 0) -> list[str]:
    pad = "    " * indent
    match s:
        case For(var, start, extent, body, kind):
            tag = "" if kind is LoopKind.SERIAL else f" {kind.value}"
            end = expr_str(add(start, extent))
            head = f"{pad}for {var.name} in [{expr_str(start)}, {end}){tag}:"
            return [head, *stmt_lines(body, indent + 1)]
        case Seq(stmts):
            return [line for st in stmts for line in stmt_lines(st, indent)]
        case Store(buf, idx, value, atomic):
            target = f"{buf.name}[{', '.join(expr_str(i) for i in idx)}]"
            return [f"{pad}{'atomic ' if atomic else ''}{target} = {expr_str(value)}"]
        case Let(var, value):
            return [f"{pad}let {var.name} = {expr_str(value)}"]
        case Alloc(buf):
            scope = "local" if buf.scope == "global" else buf.scope
            return [f"{pad}{scope} {buf.name}: {buf.dtype}[{', '.join(expr_str(d) for d in buf.shape)}]"]
        case If(cond, then):
            return [f"{pad}if {expr_str(cond)}:", *stmt_lines(then, indent + 1)]
        case TileFill(frag, tile):
            return [f"{pad}{_tile_str(frag, tile)} = 0"]
        case TileCopy(frag, tile, memory, offset, ld, load):
            block = f"tile({memory.name}, {expr_str(offset)}, ld={expr_str(ld)})"
            target, source = (_tile_str(frag, tile), block) if load else (block, _tile_str(frag, tile))
            return [f"{pad}{target} = {source}"]
        case TileMma(c, c_tile, a, a_tile, b, b_tile):
            return [f"{pad}{_tile_str(c, c_tile)} += {_tile_str(a, a_tile)} @ {_tile_str(b, b_tile)}"]
        case Prefetch(buf, idx):
            return [f"{pad}prefetch {buf.name}[{', '.join(expr_str(i) for i in idx)}]"]
        case Transpose(dst, dst_at, src, src_at, convert):
            n = len(src_at)
            runs = [f"{src.name}[{', '.join(expr_str(i) for i in at)} +: {n}]" for at in src_at]
            each = f" as {expr_str(convert)}" if convert is not None else ""
            return [
                f"{pad}{dst.name}[{', '.join(expr_str(i) for i in dst_at[0])} +: {n}]... = "
                f"transpose({', '.join(runs)}){each}"
            ]
    raise TypeError(s)


def _tile_str(frag: Buffer, tile: tuple[Expr, Expr]) -> str:
    return f"{frag.name}.tile[{expr_str(tile[0])}, {expr_str(tile[1])}]"


def func_str(f: LoopFunc) -> str:
    params = []
    for p in f.params:
        if isinstance(p, Buffer):
            params.append(f"{p.name}: {p.dtype}[{', '.join(expr_str(d) for d in p.shape)}]")
        else:
            params.append(f"{p.name}: {p.dtype}")
    return "\n".join([f"def {f.name}({', '.join(params)}):", *stmt_lines(f.body, 1)])
