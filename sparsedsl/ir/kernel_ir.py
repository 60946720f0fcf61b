"""The kernel IR: a checked kernel in index notation, names resolved, one statement per output."""

from __future__ import annotations

from dataclasses import dataclass, replace

from sparsedsl.errors import Span
from sparsedsl.ir.formats import Format

DTYPES = {
    "f32": "float32",
    "f16": "float16",
    "bf16": "bfloat16",
    "f64": "float64",
    "i8": "int8",
    "u8": "uint8",
    "i32": "int32",
}
INTEGERS = ("int8", "uint8", "int32")


def accumulator(dtype: str) -> str:
    """The type a sum of ``dtype`` products accumulates in: int32 for integers (a u8 x i8
    product is at most 32640 in magnitude, so K <= 65536 of them fit), float32 for every float."""
    return "int32" if dtype in INTEGERS else "float32"


@dataclass(frozen=True)
class TensorParam:
    """A kernel parameter. ``shape`` None means a scalar; ``format`` marks a sparse tensor (its
    default format: a kernel is instantiated for the format of the tensor it is called with);
    ``pattern_of`` marks a sparse output that shares the structure of that sparse input."""

    name: str
    dtype: str
    shape: tuple[str, ...] | None
    format: Format | None = None
    sparse: bool = False
    pattern_of: str | None = None
    span: Span | None = None


@dataclass(frozen=True)
class KAccess:
    tensor: str
    indices: tuple[str, ...]


@dataclass(frozen=True)
class KConst:
    value: float


@dataclass(frozen=True)
class KScalar:
    name: str


@dataclass(frozen=True)
class KBin:
    op: str
    a: KExpr
    b: KExpr


@dataclass(frozen=True)
class KCall:
    func: str
    args: tuple[KExpr, ...]


@dataclass(frozen=True)
class KSize:
    """A shape name used as a value (``N`` in ``sum(n) H[m, n] / N``)."""

    name: str


@dataclass(frozen=True)
class KSum:
    """A reduction of ``body`` over ``indices``: ``op`` "sum" or "max"."""

    indices: tuple[str, ...]
    body: KExpr
    op: str = "sum"


@dataclass(frozen=True)
class KAcc:
    """Stands for the value of the statement's reduction inside its epilogue."""


KExpr = KAccess | KConst | KScalar | KSize | KBin | KCall | KSum | KAcc

FUNCTIONS = {
    "relu": 1,
    "gelu": 1,
    "silu": 1,
    "sigmoid": 1,
    "tanh": 1,
    "exp": 1,
    "sqrt": 1,
    "abs": 1,
    "max": 2,
    "min": 2,
}


@dataclass(frozen=True)
class Let:
    """``let target[indices] = value``: an intermediate tensor of a kernel (``target`` has the
    shape its indices take in ``value``), read by the statements after it."""

    target: TensorParam
    indices: tuple[str, ...]
    value: KExpr


@dataclass(frozen=True)
class Kernel:
    """``lets...; output[indices] = value``; inputs and outputs in call order."""

    name: str
    inputs: tuple[TensorParam, ...]
    output: TensorParam
    indices: tuple[str, ...]
    value: KExpr
    span: Span | None = None
    lets: tuple[Let, ...] = ()

    def param(self, name: str) -> TensorParam:
        """An input, the output or an intermediate, by name."""
        return next(p for p in (*self.inputs, self.output, *(s.target for s in self.lets)) if p.name == name)

    @property
    def statements(self) -> tuple[Let, ...]:
        """Every statement in order, the output's last (as a ``Let`` of the output)."""
        return (*self.lets, Let(self.output, self.indices, self.value))

    @property
    def rowwise(self) -> bool:
        """Whether the kernel computes its output row by row after a first statement (it defines
        intermediates or takes a max): ``lowering`` fuses its statements per tile of rows."""
        reductions = [e for s in self.statements for e in subexprs(s.value) if isinstance(e, KSum)]
        return bool(self.lets) or any(r.op != "sum" for r in reductions)

    @property
    def batch(self) -> tuple[str, ...]:
        """A row-wise kernel's **batch** indices: its first statement's indices before its token,
        the last of them that is not a row (a row: the output's last index or one a later statement
        reduces over). ``s[b, h, t, j]`` has batch ``b, h``, token ``t``, row ``j``. Every statement
        is indexed by all of them, at any position (``O[b, t, h, d]``), and each tensor reads them at
        the same dimensions in every access (``batch_dims``); the kernel is the 2-d one of
        ``unbatched`` once per batch element."""
        if not self.rowwise:
            return ()
        later = (e for s in self.statements[1:] for e in subexprs(s.value) if isinstance(e, KSum))
        rows = {self.indices[-1], *(i for e in later for i in e.indices)}
        first = self.statements[0].indices
        return (first[:-1] if first[-1] in rows else first)[:-1]

    def batch_dims(self, name: str) -> dict[int, str]:
        """The dimensions of tensor ``name`` read by batch indices (dimension -> index), as its
        first access (or definition) reads them: frontend/check.py holds every access to them."""
        batch = self.batch
        for s in self.statements:
            for a in (KAccess(s.target.name, s.indices), *accesses(s.value)):
                if a.tensor == name:
                    return {n: i for n, i in enumerate(a.indices) if i in batch}
        return {}

    def unbatched(self) -> Kernel:
        """This kernel without its batch indices: each tensor's batch dimensions dropped."""
        batch = self.batch

        def param(p: TensorParam) -> TensorParam:
            dims = self.batch_dims(p.name) if p.shape else {}
            return replace(p, shape=tuple(d for n, d in enumerate(p.shape) if n not in dims)) if dims else p

        def drop(indices: tuple[str, ...]) -> tuple[str, ...]:
            return tuple(i for i in indices if i not in batch)

        def expr(e: KExpr) -> KExpr:
            match e:
                case KAccess(t, indices):
                    return KAccess(t, drop(indices))
                case KBin(op, a, c):
                    return KBin(op, expr(a), expr(c))
                case KCall(f, args):
                    return KCall(f, tuple(expr(a) for a in args))
                case KSum(indices, body, op):
                    return KSum(indices, expr(body), op)
            return e

        lets = tuple(Let(param(s.target), drop(s.indices), expr(s.value)) for s in self.lets)
        inputs = tuple(param(p) for p in self.inputs)
        output, indices, value = param(self.output), drop(self.indices), expr(self.value)
        return replace(self, inputs=inputs, output=output, indices=indices, value=value, lets=lets)

    @property
    def row(self) -> str:
        """A row-wise kernel's row index ``r``: the last index of its first statement indexed
        ``[t, r]`` (``j`` of attention's scores ``s[t, j]``), else the output's last index. An
        output indexed ``[t, c]`` with ``c`` another index is a sum over ``r`` (``O[t, d] = sum(j)
        P[t, j] * V[j, d]``)."""
        return next((s.indices[-1] for s in self.lets if len(s.indices) == 2), self.indices[-1])

    @property
    def product_first(self) -> bool:
        """Whether a row-wise kernel's first statement is a product, computing the rows as a
        one-statement kernel would: it reads the sparse input, or sums over an index other than
        the row (the output's last index)."""
        if not self.lets:
            return False
        first, sparse, row = self.lets[0], self.sparse_input, self.row
        return any(sparse is not None and a.tensor == sparse.name for a in accesses(first.value)) or any(
            isinstance(e, KSum) and e.indices != (row,) for e in subexprs(first.value)
        )

    @property
    def sparse_input(self) -> TensorParam | None:
        return next((p for p in self.inputs if p.sparse), None)

    def with_format(self, fmt: Format) -> Kernel:
        """This kernel specialised to its sparse input (and pattern output) stored as ``fmt``."""
        sparse = self.sparse_input
        inputs = tuple(replace(p, format=fmt) if p is sparse else p for p in self.inputs)
        out = replace(self.output, format=fmt) if self.output.pattern_of else self.output
        return replace(self, inputs=inputs, output=out)


def split_reduction(value: KExpr) -> tuple[KSum | None, KExpr]:
    """The statement's one reduction and its epilogue (the value with the sum replaced by KAcc)."""
    found: list[KSum] = []

    def walk(e: KExpr) -> KExpr:
        match e:
            case KSum():
                found.append(e)
                return KAcc()
            case KBin(op, a, b):
                return KBin(op, walk(a), walk(b))
            case KCall(f, args):
                return KCall(f, tuple(walk(a) for a in args))
        return e

    epilogue = walk(value)
    return (found[0] if found else None), epilogue


def subexprs(e: KExpr) -> list[KExpr]:
    """An expression and all its subexpressions, outermost first."""
    match e:
        case KBin(_, a, b):
            return [e, *subexprs(a), *subexprs(b)]
        case KCall(_, args):
            return [e, *(x for a in args for x in subexprs(a))]
        case KSum(_, body):
            return [e, *subexprs(body)]
    return [e]


def accesses(e: KExpr) -> list[KAccess]:
    """Every tensor access in an expression, in order."""
    match e:
        case KAccess():
            return [e]
        case KBin(_, a, b):
            return accesses(a) + accesses(b)
        case KCall(_, args):
            return [x for a in args for x in accesses(a)]
        case KSum(_, body):
            return accesses(body)
    return []


def scalars(e: KExpr) -> list[str]:
    """Every scalar parameter an expression reads, in order."""
    match e:
        case KScalar(name):
            return [name]
        case KBin(_, a, b):
            return scalars(a) + scalars(b)
        case KCall(_, args):
            return [x for a in args for x in scalars(a)]
        case KSum(_, body):
            return scalars(body)
    return []
