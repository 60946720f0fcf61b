"""Loop IR -> LLVM IR, built with ``llvmlite.ir``.

Each loop function becomes an exported function taking, in order: its parameters (buffers as
pointers, scalars by value), every size name its shapes and bounds use (i64, sorted by name), then
``nthreads``. An outermost parallel loop is split into ``nthreads`` equal chunks run on OpenMP
threads (see ``_entry``); a parallel loop anywhere else is an error.

Vectorised loops are emitted with explicit vector types ``<W x float>`` for the host's widest
vectors when their body is ``let``s then stores contiguous in the loop variable; a lane-dependent
load is a vector load where it is contiguous too, else a gather (``llvm.masked.gather``); other
vectorised loops are scalar loops. Unrolled loops are unrolled here, so accumulators indexed by
them become constant offsets that LLVM keeps in registers.

The ``dot`` of ``ir/dot_products.py`` becomes the target's dot-product instruction where
``features`` has it (``DOT_INTRINSICS``: ``vpdpbusd`` with AVX-512 VNNI or AVX-VNNI, ``vpmaddwd``
with AVX2 / AVX-512 BW, ``vdpbf16ps`` with AVX-512 BF16), else its meaning in plain integer vector
operations, or for bf16 in two f32 FMAs on the widened halves.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from llvmlite import ir

from sparsedsl.errors import BackendError
from sparsedsl.ir import loop_ir as L
from sparsedsl.ir import windows
from sparsedsl.ir.schedule import unflattened
from sparsedsl.ir.staging import BYTES
from sparsedsl.ir.transposes import shuffles, vector_transposes

I1, I32, I64 = ir.IntType(1), ir.IntType(32), ir.IntType(64)


class BFloatType(ir.Type):
    """LLVM's ``bfloat`` (llvmlite.ir has no type for it): loads widen with ``fpext``, which LLVM
    lowers to a 16-bit shift, exact."""

    def _to_string(self) -> str:
        return "bfloat"

    def __eq__(self, other) -> bool:
        return isinstance(other, BFloatType)

    def __hash__(self) -> int:
        return hash("bfloat")


TYPES = {
    "float32": ir.FloatType(),
    "float64": ir.DoubleType(),
    "int32": I32,
    "int64": I64,
    "float16": ir.HalfType(),
    "uint8": ir.IntType(8),  # narrow coordinate buffers (ir/levels.py), zero-extended when read
    "uint16": ir.IntType(16),
    "int8": ir.IntType(8),  # quantized values, sign-extended when read
    "bfloat16": BFloatType(),
}
FLOATS = ("float32", "float64", "float16", "bfloat16")
UNSIGNED = ("uint8", "uint16")
VECTOR_STORES = (*FLOATS, "int32", "int8", "uint8")  # what vectorised loops store (values, accumulators)
STACK_LIMIT = 1 << 14  # bytes: larger constant buffers and symbolic ones go to the heap
# bytes: local buffers start on a cache line, so that a row of a staged tile (64 bytes at 16 tokens)
# is one line, not two: malloc's 16-byte alignment made llvm's few-token N:M kernel 1.5x tvm's
ALIGNMENT = 64
# (operands, products per lane, lanes) -> (intrinsic, the features any one of which provides it,
# whether the intrinsic adds the accumulator itself). LLVM 22's vpdpbusd takes its operands as i8
# vectors, vdpbf16ps as bfloat vectors.
DOT_INTRINSICS = {
    ("int8", 4, 4): ("llvm.x86.avx512.vpdpbusd.128", ("avxvnni", "avx512vnni+avx512vl"), True),
    ("int8", 4, 8): ("llvm.x86.avx512.vpdpbusd.256", ("avxvnni", "avx512vnni+avx512vl"), True),
    ("int8", 4, 16): ("llvm.x86.avx512.vpdpbusd.512", ("avx512vnni",), True),
    ("int8", 2, 4): ("llvm.x86.sse2.pmadd.wd", ("sse2",), False),
    ("int8", 2, 8): ("llvm.x86.avx2.pmadd.wd", ("avx2",), False),
    ("int8", 2, 16): ("llvm.x86.avx512.pmaddw.d.512", ("avx512bw",), False),
    ("bf16", 2, 4): ("llvm.x86.avx512bf16.dpbf16ps.128", ("avx512bf16+avx512vl",), True),
    ("bf16", 2, 8): ("llvm.x86.avx512bf16.dpbf16ps.256", ("avx512bf16+avx512vl",), True),
    ("bf16", 2, 16): ("llvm.x86.avx512bf16.dpbf16ps.512", ("avx512bf16",), True),
}


def provides(intrinsic: tuple, features: frozenset[str]) -> bool:
    """Whether a CPU with ``features`` has a ``DOT_INTRINSICS`` or ``windows.PERMUTES`` entry's instruction."""
    return any(set(f.split("+")) <= features for f in intrinsic[1])


def size_names(func: L.LoopFunc) -> list[str]:
    """Every size name the function's shapes and bounds use, sorted."""
    names: set[str] = set()

    def expr(e):
        match e:
            case L.SizeVar(n):
                names.add(n)
            case L.Bin(_, a, b):
                expr(a)
                expr(b)
            case L.Load(buf, idx):
                for d in buf.shape:
                    expr(d)
                for i in idx:
                    expr(i)
            case L.Call(_, args, _):
                for a in args:
                    expr(a)
            case L.Cast(_, v):
                expr(v)
            case L.Select(c, t, o):
                for x in (c, t, o):
                    expr(x)

    def stmt(s):
        match s:
            case L.For(_, start, extent, body, _):
                expr(start)
                expr(extent)
                stmt(body)
            case L.Seq(stmts):
                for st in stmts:
                    stmt(st)
            case L.Store(buf, idx, value):
                expr(L.Load(buf, idx))
                expr(value)
            case L.Let(_, value):
                expr(value)
            case L.Alloc(buf):
                for d in buf.shape:
                    expr(d)
            case L.If(cond, then):
                expr(cond)
                stmt(then)

    for p in func.params:
        if isinstance(p, L.Buffer):
            for d in p.shape:
                expr(d)
    stmt(func.body)
    params = {p.name for p in func.params if isinstance(p, L.Var)}
    return sorted(names - params)


def _unit_stride(e, name: str) -> bool:
    """Whether ``e`` is ``invariant + name`` (so consecutive lanes are consecutive elements), also
    written as ``(invariant + x // c) * c + x % c`` with ``x`` unit-stride (a fused loop's split,
    ``schedule.unflattened``)."""
    if isinstance(e, L.Var) and e.name == name:
        return True
    if isinstance(e, L.Bin) and e.op == "+":
        folded = unflattened(e)
        if folded is not e:
            return _unit_stride(folded, name)
        a, b = e.a, e.b
        return (_unit_stride(a, name) and not L.uses(b, name)) or (_unit_stride(b, name) and not L.uses(a, name))
    return False


def _mangled(ty: ir.Type) -> str:
    """An element type as LLVM's intrinsic names spell it (``f32``, ``i8``)."""
    return (
        f"i{ty.width}"
        if isinstance(ty, ir.IntType)
        else {"float": "f32", "double": "f64", "half": "f16", "bfloat": "bf16"}[str(ty)]
    )


def _uses_any(e: L.Expr, names: set[str]) -> bool:
    """Whether ``e`` reads any of ``names``."""
    return any(L.uses(e, n) for n in names)


def _contiguous(idx: tuple[L.Expr, ...], name: str, varying: set[str]) -> bool:
    """Whether a load or store at ``idx`` reads consecutive elements in consecutive lanes of loop
    ``name`` (``varying``: the names whose values differ between lanes)."""
    return (
        not _uses_any(idx[-1], varying - {name})
        and all(not _uses_any(i, varying) for i in idx[:-1])
        and _unit_stride(idx[-1], name)
    )


def _vectorizable(loop: L.For) -> bool:
    """Stores, after any ``let``s, whose lane-dependent stores are unit-stride in the last index; a
    lane-dependent load is unit-stride there too, or any other index (a gather)."""
    stmts = loop.body.stmts if isinstance(loop.body, L.Seq) else (loop.body,)
    varying = {loop.var.name}

    def ok_expr(e) -> bool:
        match e:
            case L.Load(_, idx):
                return all(ok_expr(i) for i in idx)
            case L.Bin(op, a, b):
                return op in ("+", "-", "*", "/", "//", "%", "min", "max") and ok_expr(a) and ok_expr(b)
            case L.Cast(_, v):
                return ok_expr(v)
            case L.Call(_, args, _):
                return all(ok_expr(a) for a in args)
            case L.Var() | L.Const() | L.SizeVar():
                return True
        return False

    stores = 0
    for s in stmts:
        if isinstance(s, L.Let) and not stores and ok_expr(s.value):
            if _uses_any(s.value, varying):
                varying.add(s.var.name)
            continue
        if not isinstance(s, L.Store) or not ok_expr(s.value) or s.buffer.dtype not in VECTOR_STORES:
            return False
        if not _contiguous(s.indices, loop.var.name, varying):
            return False
        stores += 1
    return stores > 0 and isinstance(loop.extent, L.Const)


@dataclass
class _Scope:
    values: dict[str, ir.Value] = field(default_factory=dict)
    frees: list[ir.Value] = field(default_factory=list)


class Codegen:
    """Builds one LLVM function for one loop function."""

    def __init__(self, module: ir.Module, func: L.LoopFunc, vector_width: int, features: frozenset[str] = frozenset()):
        self.module = module
        self.func = func
        self.width = vector_width
        self.varying: set[str] = set()  # in a vector loop: the names whose values differ between lanes
        self.features = features
        self.sizes = size_names(func)
        arg_types = []
        for p in func.params:
            arg_types.append(TYPES[p.dtype].as_pointer() if isinstance(p, L.Buffer) else TYPES[p.dtype])
        arg_types += [I64] * (len(self.sizes) + 2)
        self.fn = ir.Function(module, ir.FunctionType(ir.VoidType(), arg_types), name=f"{func.name}.body")
        self.fn.linkage = "internal"
        entry = self.fn.append_basic_block("entry")
        self.alloca_builder = ir.IRBuilder(entry)
        body = self.fn.append_basic_block("body")
        self.b = ir.IRBuilder(body)
        self.scopes = [_Scope()]
        self.memo: dict = {}  # (expression, lane) -> value, for the statement being emitted
        self.buffers: dict[str, tuple[ir.Value, L.Buffer]] = {}
        args = list(self.fn.args)
        for p, a in zip(func.params, args):
            a.name = p.name
            if isinstance(p, L.Buffer):
                a.add_attribute("noalias")
                self.buffers[p.name] = (a, p)
            else:
                self.scopes[0].values[p.name] = a
        for name, a in zip(self.sizes, args[len(func.params) :]):
            a.name = name
            self.scopes[0].values[name] = a
        self.tid, self.nthreads = args[-2], args[-1]
        self.tid.name, self.nthreads.name = "tid", "nthreads"

    # ---- helpers ---------------------------------------------------------------------------

    def lookup(self, name: str) -> ir.Value:
        for scope in reversed(self.scopes):
            if name in scope.values:
                return scope.values[name]
        raise BackendError(f"llvm backend: unbound name '{name}' in kernel '{self.func.name}'")

    def _intrinsic(self, name: str, ty: ir.Type) -> ir.Function:
        """An overloaded float intrinsic (``llvm.exp``...) for a scalar or vector type."""
        element = ty.element if isinstance(ty, ir.VectorType) else ty
        suffix = {"float": "f32", "double": "f64", "half": "f16"}[str(element)]
        if isinstance(ty, ir.VectorType):
            suffix = f"v{ty.count}{suffix}"
        full = f"{name}.{suffix}"
        fn = self.module.globals.get(full)
        if fn is None:
            arity = 2 if name in ("llvm.minnum", "llvm.maxnum") else 1
            fn = ir.Function(self.module, ir.FunctionType(ty, [ty] * arity), name=full)
        return fn

    def _splat(self, value: ir.Value, ty: ir.VectorType) -> ir.Value:
        if isinstance(value.type, ir.VectorType):
            return value
        vec = self.b.insert_element(ir.Constant(ty, ir.Undefined), value, ir.Constant(I32, 0))
        return self.b.shuffle_vector(
            vec, ir.Constant(ty, ir.Undefined), ir.Constant(ir.VectorType(I32, ty.count), [0] * ty.count)
        )

    def _flat(self, buf: L.Buffer, indices, lane: str | None = None, vec: ir.VectorType | None = None) -> ir.Value:
        """The row-major element number of ``buf[indices]``: a vector of them in vector mode."""
        decl = self.buffers[buf.name][1]
        flat = None
        for i, idx in enumerate(indices):
            v = self._cast(self.expr(idx, lane, vec), "int64", L.dtype_of(idx))  # an int32 index too
            if flat is not None:
                extent = self.expr(decl.shape[i])
                if isinstance(v.type, ir.VectorType) or isinstance(flat.type, ir.VectorType):
                    flat, extent, v = (self._splat(x, vec) for x in (flat, extent, v))
                v = self.b.add(self.b.mul(flat, extent), v)
            flat = v
        return flat if flat is not None else ir.Constant(I64, 0)

    def _address(self, buf: L.Buffer, indices) -> ir.Value:
        return self.b.gep(self.buffers[buf.name][0], [self._flat(buf, indices)])

    def _gather(self, buf: L.Buffer, indices, lane: str, vty: ir.VectorType) -> ir.Value:
        """``buf[indices]`` in each lane, the indices differing between lanes: one ``masked.gather``
        (``vgather`` where the CPU has it) of addresses ``base + flat * size``."""
        b, count = self.b, vty.count
        i64s = ir.VectorType(I64, count)
        flat = self._splat(self._flat(buf, indices, lane, i64s), i64s)
        base = self._splat(b.ptrtoint(self.buffers[buf.name][0], I64), i64s)
        size = ir.Constant(i64s, [BYTES[buf.dtype]] * count)
        pointers = b.inttoptr(b.add(base, b.mul(flat, size)), ir.VectorType(vty.element.as_pointer(), count))
        name = f"llvm.masked.gather.v{count}{_mangled(vty.element)}.v{count}p0{_mangled(vty.element)}"
        mask = ir.VectorType(ir.IntType(1), count)
        gather = self.module.globals.get(name) or ir.Function(
            self.module, ir.FunctionType(vty, [pointers.type, I32, mask, vty]), name=name
        )
        alignment = ir.Constant(I32, BYTES[buf.dtype])
        return b.call(gather, [pointers, alignment, ir.Constant(mask, [1] * count), ir.Constant(vty, ir.Undefined)])

    # ---- expressions -----------------------------------------------------------------------

    def expr(self, e: L.Expr, lane: str | None = None, vec: ir.VectorType | None = None) -> ir.Value:
        """The value of ``e``; in vector mode (``lane`` set) lane-dependent parts are vectors.
        Within one statement a repeated subexpression is emitted once (epilogues such as gelu
        reuse their argument many times)."""
        if isinstance(e, L.Var | L.SizeVar | L.Const):
            return self._expr(e, lane, vec)
        key = (id(e), lane)  # the lowering shares a repeated subexpression's node: identity suffices
        if key not in self.memo:
            self.memo[key] = self._expr(e, lane, vec)
        return self.memo[key]

    def _expr(self, e: L.Expr, lane: str | None, vec: ir.VectorType | None) -> ir.Value:
        b = self.b
        match e:
            case L.Var(name) if name == lane:  # lane i of the vector loop's chunk: first + i
                count = vec.count
                return b.add(
                    self._splat(self.lookup(name), ir.VectorType(I64, count)),
                    ir.Constant(ir.VectorType(I64, count), list(range(count))),
                )
            case L.Var(name) | L.SizeVar(name):
                return self.lookup(name)
            case L.Const(value, dtype):
                return ir.Constant(TYPES[dtype], value if dtype in FLOATS else int(value))
            case L.Load(buf, idx):
                if lane is None or not any(_uses_any(i, self.varying) for i in idx):
                    return b.load(self._address(buf, idx))
                vty = ir.VectorType(TYPES[buf.dtype], vec.count)
                if not _contiguous(idx, lane, self.varying):
                    return self._gather(buf, idx, lane, vty)
                ptr = self._address(buf, idx)  # the address of the first lane
                return b.load(b.bitcast(ptr, vty.as_pointer()), align=BYTES[buf.dtype])
            case L.Cast(dtype, value):
                return self._cast(self.expr(value, lane, vec), dtype, L.dtype_of(value))
            case L.Bin(op, x, y):
                return self._bin(op, x, y, lane, vec)
            case L.Call(windows.WINDOW):
                return self._window(e, lane, vec)
            case L.Call(fname, args, dtype):
                return self._call(fname, [self.expr(a, lane, vec) for a in args])
            case L.Select(c, t, o):
                return b.select(self.expr(c, lane, vec), self.expr(t, lane, vec), self.expr(o, lane, vec))
        raise BackendError(f"llvm backend: cannot generate {e}")

    def _cast(self, v: ir.Value, dtype: str, src: str) -> ir.Value:
        to = TYPES[dtype]
        if isinstance(v.type, ir.VectorType):
            to = ir.VectorType(to, v.type.count)
        if src == dtype:
            return v
        if src in FLOATS and dtype in FLOATS:
            if dtype == "bfloat16":  # LLVM's fptrunc to bfloat is a libcall the JIT may not find
                return self._to_bfloat(self._cast(v, "float32", src))
            if src == "bfloat16" and dtype == "float16":
                return self._cast(self._cast(v, "float32", src), dtype, "float32")
            return self.b.fpext(v, to) if BYTES[dtype] > BYTES[src] else self.b.fptrunc(v, to)
        if src in FLOATS:
            return self.b.fptoui(v, to) if dtype in UNSIGNED else self.b.fptosi(v, to)
        if dtype in FLOATS:
            return self.b.uitofp(v, to) if src in UNSIGNED else self.b.sitofp(v, to)
        if BYTES[dtype] <= BYTES[src]:
            return self.b.trunc(v, to)
        return self.b.zext(v, to) if src in UNSIGNED else self.b.sext(v, to)

    def _to_bfloat(self, v: ir.Value) -> ir.Value:
        """float -> bfloat, rounded to nearest even; a NaN stays a (quiet) NaN."""
        b = self.b
        count = v.type.count if isinstance(v.type, ir.VectorType) else None

        def ty(t: ir.Type) -> ir.Type:
            return ir.VectorType(t, count) if count else t

        def c(value: int) -> ir.Constant:
            return ir.Constant(ty(I32), [value] * count if count else value)

        bits = b.bitcast(v, ty(I32))
        odd = b.and_(b.lshr(bits, c(16)), c(1))
        rounded = b.lshr(b.add(bits, b.add(odd, c(0x7FFF))), c(16))
        nan = b.icmp_unsigned(">", b.and_(bits, c(0x7FFFFFFF)), c(0x7F800000))
        quiet = b.or_(b.lshr(bits, c(16)), c(0x40))
        half = b.trunc(b.select(nan, quiet, rounded), ty(ir.IntType(16)))
        return b.bitcast(half, ty(TYPES["bfloat16"]))

    def _bin(self, op, x, y, lane, vec):
        b = self.b
        a, c = self.expr(x, lane, vec), self.expr(y, lane, vec)
        if isinstance(a.type, ir.VectorType) != isinstance(c.type, ir.VectorType):
            ty = a.type if isinstance(a.type, ir.VectorType) else c.type
            a, c = self._splat(a, ty), self._splat(c, ty)
        scalar = a.type.element if isinstance(a.type, ir.VectorType) else a.type
        is_float = isinstance(scalar, ir.FloatType | ir.DoubleType | ir.HalfType | BFloatType)
        if op == "and":
            return b.and_(a, c)
        if op in ("<", "<=", "=="):
            pred = {"<": "<", "<=": "<=", "==": "=="}[op]
            return b.fcmp_ordered(pred, a, c) if is_float else b.icmp_signed(pred, a, c)
        if op in ("min", "max"):
            if is_float:
                return b.call(self._intrinsic("llvm.minnum" if op == "min" else "llvm.maxnum", a.type), [a, c])
            cmp = b.icmp_signed("<" if op == "min" else ">", a, c)
            return b.select(cmp, a, c)
        if is_float:
            result = {"+": b.fadd, "-": b.fsub, "*": b.fmul, "/": b.fdiv}[op](a, c)
            if op != "/":  # a product and a sum may fuse into one FMA (one rounding fewer), as TVM's code does
                result.flags.append("contract")
            return result
        return {"+": b.add, "-": b.sub, "*": b.mul, "//": b.sdiv, "%": b.srem, "/": b.sdiv}[op](a, c)

    def _call(self, name: str, args: list[ir.Value]) -> ir.Value:
        b = self.b
        x = args[0]
        if name == "floor":
            return b.call(self._intrinsic("llvm.floor", x.type), [x])
        if name == "round_even":
            return b.call(self._intrinsic("llvm.roundeven", x.type), [x])
        if name == "exp2i":  # 2^n for an integral float n in [-126, 127], from the exponent bits
            vec = isinstance(x.type, ir.VectorType)
            int_t = ir.VectorType(I32, x.type.count) if vec else I32

            def splat(v: int) -> ir.Constant:
                return ir.Constant(int_t, [v] * x.type.count) if vec else ir.Constant(I32, v)

            bits = b.shl(b.add(b.fptosi(x, int_t), splat(127)), splat(23))
            return b.bitcast(bits, x.type)
        if name == "sqrt":
            return b.call(self._intrinsic("llvm.sqrt", x.type), [x])
        if name == "abs":
            return b.call(self._intrinsic("llvm.fabs", x.type), [x])
        if name == "pack":
            return self._pack(args)
        if name == "dot":
            return self._dot(args[0], args[1], args[2:])
        raise BackendError(f"llvm backend: no function '{name}'")

    def _window(self, call: L.Call, lane: str | None, vec: ir.VectorType | None) -> ir.Value:
        """A window read (``ir/windows.py``): in vector mode the window's vectors loaded whole, each
        lane's element picked by a variable permute (``windows.PERMUTES``), the picks of the vectors
        after the first taking over where a lane's offset reaches them; the plain read otherwise."""
        plain, start, offset, width, _ = windows.window_parts(call)
        permute = windows.PERMUTES.get((plain.buffer.dtype, vec.count)) if lane is not None else None
        if permute is None or not provides(permute, self.features):
            return self.expr(plain, lane, vec)
        b, count = self.b, vec.count
        i32s = ir.VectorType(I32, count)
        picks = self._cast(self.expr(offset, lane, vec), "int32", L.dtype_of(offset))
        vty = ir.VectorType(TYPES[plain.buffer.dtype], count)
        first = b.bitcast(self._address(start.buffer, start.indices), vty.as_pointer())
        fn = _declare(self.module, permute[0], ir.FunctionType(vty, [vty, i32s]))
        result = None
        for j in range(-(-width // count)):
            chunk = b.load(b.gep(first, [ir.Constant(I64, j)]), align=BYTES[plain.buffer.dtype])
            picked = b.call(fn, [chunk, picks])
            reached = b.icmp_signed(">=", picks, ir.Constant(i32s, [j * count] * count))
            result = picked if result is None else b.select(reached, picked, result)
        return result

    def _int32s(self, like: ir.Value, value: int) -> ir.Constant:
        if isinstance(like.type, ir.VectorType):
            return ir.Constant(like.type, [value] * like.type.count)
        return ir.Constant(I32, value)

    def _pack(self, parts: list[ir.Value]) -> ir.Value:
        """``len(parts)`` integers as the low bytes (4) or halves (2) of an int32 word, first lowest;
        bf16 values by their bits."""
        bits = 32 // len(parts)
        parts = [self._bf16_bits(p) for p in parts]
        count = next((p.type.count for p in parts if isinstance(p.type, ir.VectorType)), None)
        if count is not None:
            parts = [self._splat(p, ir.VectorType(I32, count)) for p in parts]
        word = None
        for j, p in enumerate(parts):
            part = self.b.shl(self.b.and_(p, self._int32s(p, (1 << bits) - 1)), self._int32s(p, bits * j))
            word = part if word is None else self.b.or_(word, part)
        return word

    def _bf16_bits(self, v: ir.Value) -> ir.Value:
        """A bf16 value's (or vector's) bits in the low half of an int32; other values as they are."""
        element = v.type.element if isinstance(v.type, ir.VectorType) else v.type
        if not isinstance(element, BFloatType):
            return v
        count = v.type.count if isinstance(v.type, ir.VectorType) else None
        i16 = ir.VectorType(ir.IntType(16), count) if count else ir.IntType(16)
        return self.b.zext(self.b.bitcast(v, i16), ir.VectorType(I32, count) if count else I32)

    def _dot(self, acc: ir.Value, word: ir.Value, weights: list[ir.Value]) -> ir.Value:
        """``acc + sum_j element_j(word) * weights[j]``: 4 u8 bytes or 2 s16 halves per int32 lane,
        or 2 bf16 halves per f32 lane (with bf16 weights)."""
        b, group = self.b, len(weights)
        if not isinstance(word.type, ir.VectorType):
            return self._dot_plain(acc, word, weights)
        lanes = word.type.count
        bf16 = isinstance(weights[0].type, BFloatType)
        acc = self._splat(acc, ir.VectorType(TYPES["float32"] if bf16 else I32, lanes))
        intrinsic = DOT_INTRINSICS.get(("bf16" if bf16 else "int8", group, lanes))
        if intrinsic is None or not provides(intrinsic, self.features):
            return self._dot_plain(acc, word, weights)
        name, _, accumulates = intrinsic
        wword = self._splat(self._pack(weights), word.type)
        ety = ir.VectorType(TYPES["bfloat16"] if bf16 else ir.IntType(32 // group), lanes * group)
        operands = [b.bitcast(word, ety), b.bitcast(wword, ety)]
        if accumulates:
            fn = _declare(self.module, name, ir.FunctionType(acc.type, [acc.type, ety, ety]))
            return b.call(fn, [acc, *operands])
        fn = _declare(self.module, name, ir.FunctionType(acc.type, [ety, ety]))
        return b.add(acc, b.call(fn, operands))

    def _dot_plain(self, acc: ir.Value, word: ir.Value, weights: list[ir.Value]) -> ir.Value:
        """``dot`` without the instruction (scalars, or a target without it): integer elements
        multiplied and added; bf16 halves widened to f32 and multiply-added in order, the
        unrewritten kernel's FMAs."""
        b, group = self.b, len(weights)
        bits = 32 // group
        vector = isinstance(word.type, ir.VectorType)
        for j, weight in enumerate(weights):
            if isinstance(weight.type, BFloatType):  # half j's bits as the high half of an f32
                high = b.shl(word, self._int32s(word, 16)) if j == 0 else b.and_(word, self._int32s(word, -(1 << 16)))
                w = self._cast(weight, "float32", "bfloat16")
                product = b.fmul(b.bitcast(high, acc.type), self._splat(w, acc.type) if vector else w)
                acc = b.fadd(acc, product)
                product.flags.append("contract")
                acc.flags.append("contract")
                continue
            if group == 4:  # unsigned byte j
                element = b.and_(b.lshr(word, self._int32s(word, bits * j)), self._int32s(word, 255))
            else:  # signed half j
                element = b.ashr(b.shl(word, self._int32s(word, bits * (1 - j))), self._int32s(word, bits))
            acc = b.add(acc, b.mul(element, self._splat(weight, word.type) if vector else weight))
        return acc

    # ---- statements ------------------------------------------------------------------------

    def stmt(self, s: L.Stmt, top: bool = False) -> None:
        self.memo = {}  # values of another statement may sit in another block or scope
        match s:
            case L.Seq(stmts):
                self.scopes.append(_Scope())
                for st in stmts:
                    self.stmt(st, top)
                self._close_scope()
            case L.For():
                self._for(s, top)
            case L.Store(buf, idx, value):
                v = self._cast(self.expr(value), buf.dtype, L.dtype_of(value))
                self.b.store(v, self._address(buf, idx))
            case L.Let(var, value):
                v = self.expr(value)
                self.scopes[-1].values[var.name] = v
            case L.Alloc(buf):
                self._alloc(buf)
            case L.If(cond, then):
                with self.b.if_then(self.expr(cond)):
                    self.scopes.append(_Scope())
                    self.stmt(then)
                    self._close_scope()
            case L.Transpose(dst, dst_at, src, src_at, convert):
                self._transpose(dst, dst_at, src, src_at, convert)
            case L.Prefetch(buf, idx):
                i8p = ir.IntType(8).as_pointer()
                fn = _declare(self.module, "llvm.prefetch.p0", ir.FunctionType(ir.VoidType(), [i8p, I32, I32, I32]))
                read, keep, data = (ir.Constant(I32, v) for v in (0, 3, 1))  # a read, into every level, of data
                self.b.call(fn, [self.b.bitcast(self._address(buf, idx), i8p), read, keep, data])
            case _:
                raise BackendError(f"llvm backend: cannot generate {s}")

    def _transpose(self, dst: L.Buffer, dst_at, src: L.Buffer, src_at, convert: L.Expr | None) -> None:
        """``L.Transpose``: vector loads, the shuffles of ``transposes.shuffles``, ``convert`` of
        each vector (the element bound to it), vector stores."""
        lanes = len(src_at)
        vector = ir.VectorType(TYPES[src.dtype], lanes).as_pointer()
        values = {
            f"r{r}": self.b.load(self.b.bitcast(self._address(src, at), vector), align=BYTES[src.dtype])
            for r, at in enumerate(src_at)
        }
        for out, first, second, picks in shuffles():
            mask = ir.Constant(ir.VectorType(I32, lanes), list(picks))
            values[out] = self.b.shuffle_vector(values[first], values[second], mask)
        stored = ir.VectorType(TYPES[dst.dtype], lanes).as_pointer()
        for c, at in enumerate(dst_at):
            value = values[f"o{c}"]
            if convert is not None:
                self.memo = {}  # the same expression nodes, another element bound
                self.scopes.append(_Scope({L.element(src.dtype).name: value}))
                value = self.expr(convert)
                self.scopes.pop()
            self.b.store(value, self.b.bitcast(self._address(dst, at), stored), align=BYTES[dst.dtype])

    def _close_scope(self) -> None:
        scope = self.scopes.pop()
        free = self.module.globals.get("free") or ir.Function(
            self.module, ir.FunctionType(ir.VoidType(), [ir.IntType(8).as_pointer()]), name="free"
        )
        for ptr in scope.frees:
            self.b.call(free, [self.b.bitcast(ptr, ir.IntType(8).as_pointer())])

    def _alloc(self, buf: L.Buffer) -> None:
        ty = TYPES[buf.dtype]
        if all(isinstance(d, L.Const) for d in buf.shape):
            count = 1
            for d in buf.shape:
                count *= int(d.value)
            if count * BYTES[buf.dtype] <= STACK_LIMIT:
                ptr = self.alloca_builder.alloca(ir.ArrayType(ty, count), name=buf.name)
                ptr.align = ALIGNMENT
                self.buffers[buf.name] = (self.alloca_builder.bitcast(ptr, ty.as_pointer()), buf)
                return
        aligned_alloc = self.module.globals.get("aligned_alloc") or ir.Function(
            self.module, ir.FunctionType(ir.IntType(8).as_pointer(), [I64, I64]), name="aligned_alloc"
        )
        count = ir.Constant(I64, BYTES[buf.dtype])
        for d in buf.shape:
            count = self.b.mul(count, self.expr(d))
        whole = self.b.and_(self.b.add(count, ir.Constant(I64, ALIGNMENT - 1)), ir.Constant(I64, -ALIGNMENT))
        raw = self.b.call(aligned_alloc, [ir.Constant(I64, ALIGNMENT), whole])
        ptr = self.b.bitcast(raw, ty.as_pointer(), name=buf.name)
        self.buffers[buf.name] = (ptr, buf)
        self.scopes[-1].frees.append(ptr)

    def _for(self, loop: L.For, top: bool) -> None:
        if loop.kind is L.LoopKind.UNROLLED and isinstance(loop.extent, L.Const):
            start = self.expr(loop.start)
            for i in range(int(loop.extent.value)):
                self.scopes.append(_Scope({loop.var.name: self.b.add(start, ir.Constant(I64, i))}))
                self.stmt(loop.body)
                self._close_scope()
            return
        if loop.kind is L.LoopKind.VECTORIZED and _vectorizable(loop) and loop.extent.value % self._lanes(loop) == 0:
            self._vector_for(loop)
            return
        if loop.kind is L.LoopKind.PARALLEL and not top:
            self._outlined_parallel(loop)
            return
        start = self.expr(loop.start)
        stop = self.b.add(start, self.expr(loop.extent))
        if loop.kind is L.LoopKind.PARALLEL:
            # this thread's chunk of the iterations
            count = self.b.sub(stop, start)
            chunk = self.b.sdiv(self.b.add(count, self.b.sub(self.nthreads, ir.Constant(I64, 1))), self.nthreads)
            lo = self.b.add(start, self.b.mul(self.tid, chunk))
            hi = self.b.add(lo, chunk)
            start = lo
            stop = self.b.select(self.b.icmp_signed("<", hi, stop), hi, stop)
        self._loop(loop.var.name, start, stop, lambda: self.stmt(loop.body))

    def _outlined_parallel(self, loop: L.For) -> None:
        """A parallel loop inside others: its body outlined into a function that each OpenMP thread
        runs on its chunk (``GOMP_parallel``, or called here when the call has one thread), every
        value and buffer in scope passed in a frame. Nested in a parallel loop, OpenMP runs it on
        the thread that meets it."""
        i8p, i32 = ir.IntType(8).as_pointer(), ir.IntType(32)
        values = {name: v for scope in self.scopes for name, v in scope.values.items()}
        start = self.expr(loop.start)
        values |= {"@start": start, "@stop": self.b.add(start, self.expr(loop.extent))}
        names, buffers = list(values), dict(self.buffers)
        frame_type = ir.LiteralStructType([values[n].type for n in names] + [p.type for p, _ in buffers.values()])
        frame = self.alloca_builder.alloca(frame_type)
        for i, value in enumerate([*(values[n] for n in names), *(p for p, _ in buffers.values())]):
            self.b.store(value, self.b.gep(frame, [ir.Constant(i32, 0), ir.Constant(i32, i)]))
        name = f"{self.fn.name}.{loop.var.name}"
        outlined = ir.Function(self.module, ir.FunctionType(ir.VoidType(), [i8p]), name=name)
        outlined.linkage = "internal"
        saved = (self.fn, self.b, self.alloca_builder, self.scopes, self.buffers, self.tid, self.nthreads, self.memo)
        self.fn, self.memo = outlined, {}
        self.alloca_builder = ir.IRBuilder(outlined.append_basic_block("entry"))
        self.b = ir.IRBuilder(outlined.append_basic_block("body"))
        typed = self.b.bitcast(outlined.args[0], frame_type.as_pointer())
        fields = [
            self.b.load(self.b.gep(typed, [ir.Constant(i32, 0), ir.Constant(i32, i)]))
            for i in range(len(frame_type.elements))
        ]
        self.scopes = [_Scope(dict(zip(names, fields)))]
        self.buffers = {name: (ptr, buf) for (name, (_, buf)), ptr in zip(buffers.items(), fields[len(names) :])}
        self.tid, self.nthreads = _thread_position(self.module, self.b)
        self._for(replace(loop, start=L.Var("@start"), extent=L.sub(L.Var("@stop"), L.Var("@start"))), top=True)
        self._close_scope()
        self.b.ret_void()
        self.alloca_builder.branch(outlined.blocks[1])
        self.fn, self.b, self.alloca_builder, self.scopes, self.buffers, self.tid, self.nthreads, self.memo = saved
        raw = self.b.bitcast(frame, i8p)
        threads = self.b.trunc(self.nthreads, i32)
        with self.b.if_else(self.b.icmp_signed("<=", threads, ir.Constant(i32, 1))) as (alone, forked):
            with alone:
                self.b.call(outlined, [raw])
            with forked:
                self.b.call(_gomp_parallel(self.module), [outlined, raw, threads, ir.Constant(i32, 0)])

    def _loop(self, name: str, start: ir.Value, stop: ir.Value, body, step: int = 1) -> None:
        b = self.b
        pre = b.block
        cond = self.fn.append_basic_block(f"{name}.cond")
        inner = self.fn.append_basic_block(f"{name}.body")
        done = self.fn.append_basic_block(f"{name}.done")
        b.branch(cond)
        b.position_at_end(cond)
        var = b.phi(I64, name=name)
        var.add_incoming(start, pre)
        b.cbranch(b.icmp_signed("<", var, stop), inner, done)
        b.position_at_end(inner)
        self.scopes.append(_Scope({name: var}))
        body()
        self._close_scope()
        nxt = b.add(var, ir.Constant(I64, step))
        var.add_incoming(nxt, b.block)
        b.branch(cond)
        b.position_at_end(done)

    def _lanes(self, loop: L.For) -> int:
        stmts = loop.body.stmts if isinstance(loop.body, L.Seq) else (loop.body,)
        bits = max(8 * BYTES[s.buffer.dtype] for s in stmts if isinstance(s, L.Store))
        return max(1, min(int(loop.extent.value), self.width // bits))

    def _vector_for(self, loop: L.For) -> None:
        """``W`` lanes at a time, chunks unrolled (constant offsets keep accumulators in registers);
        a ``let`` whose value differs between lanes holds a vector (of gather indices, say)."""
        lanes = self._lanes(loop)
        start = self.expr(loop.start)
        name = loop.var.name
        stmts = loop.body.stmts if isinstance(loop.body, L.Seq) else (loop.body,)
        for chunk in range(int(loop.extent.value) // lanes):
            base = self.b.add(start, ir.Constant(I64, chunk * lanes))
            self.scopes.append(_Scope({name: base}))
            self.varying = {name}
            for s in stmts:
                self.memo = {}
                if isinstance(s, L.Let):
                    if _uses_any(s.value, self.varying):
                        vty = ir.VectorType(TYPES[s.var.dtype], lanes)
                        value = self._cast(self.expr(s.value, lane=name, vec=vty), s.var.dtype, L.dtype_of(s.value))
                        self.varying.add(s.var.name)
                    else:
                        value = self.expr(s.value)
                    self.scopes[-1].values[s.var.name] = value
                    continue
                vty = ir.VectorType(TYPES[s.buffer.dtype], lanes)
                value = self.expr(s.value, lane=name, vec=vty)
                value = self._splat(self._cast(value, s.buffer.dtype, L.dtype_of(s.value)), vty)
                ptr = self._address(s.buffer, s.indices)
                self.b.store(value, self.b.bitcast(ptr, vty.as_pointer()), align=BYTES[s.buffer.dtype])
            self.scopes.pop()
        self.varying = set()

    def finish(self) -> ir.Function:
        self.stmt(self.func.body, top=parallel_on_top(self.func))
        self.b.ret_void()
        self.alloca_builder.branch(self.fn.blocks[1])
        return self.fn


def parallel_on_top(func: L.LoopFunc) -> bool:
    """Whether the whole body is one parallel loop (then threads split it; else it runs serially)."""
    return isinstance(func.body, L.For) and func.body.kind is L.LoopKind.PARALLEL


def _declare(module: ir.Module, name: str, ty: ir.FunctionType) -> ir.Function:
    """An external function, declared once per module."""
    return module.globals.get(name) or ir.Function(module, ty, name=name)


def _entry(module: ir.Module, body: ir.Function, func: L.LoopFunc) -> None:
    """The exported function ``func.name(params..., sizes..., i64 nthreads)``. A body that is one
    parallel loop runs on ``nthreads`` OpenMP threads (``GOMP_parallel``: the pool torch already
    uses, so the two never compete), each taking its chunk, or here without a fork when
    ``nthreads`` is 1; any other body runs once, each parallel loop in it on ``nthreads`` threads."""
    arg_types = [a.type for a in body.args][:-2]
    entry = ir.Function(module, ir.FunctionType(ir.VoidType(), [*arg_types, I64]), name=func.name)
    b = ir.IRBuilder(entry.append_basic_block("entry"))
    args, nthreads = list(entry.args[:-1]), entry.args[-1]
    if not parallel_on_top(func):  # its parallel loops inside fork a team of ``nthreads`` each
        b.call(body, [*args, ir.Constant(I64, 0), nthreads])
        b.ret_void()
        return
    i8p, i32 = ir.IntType(8).as_pointer(), ir.IntType(32)
    frame_type = ir.LiteralStructType(arg_types)
    # the outlined function each thread runs: unpack the arguments, run this thread's chunk
    outlined = ir.Function(module, ir.FunctionType(ir.VoidType(), [i8p]), name=f"{func.name}.omp")
    outlined.linkage = "internal"
    ob = ir.IRBuilder(outlined.append_basic_block("entry"))
    frame = ob.bitcast(outlined.args[0], frame_type.as_pointer())
    unpacked = [ob.load(ob.gep(frame, [ir.Constant(i32, 0), ir.Constant(i32, i)])) for i in range(len(arg_types))]
    ob.call(body, [*unpacked, *_thread_position(module, ob)])
    ob.ret_void()
    with b.if_then(b.icmp_signed("<=", nthreads, ir.Constant(I64, 1))):  # one thread: no fork
        b.call(body, [*args, ir.Constant(I64, 0), ir.Constant(I64, 1)])
        b.ret_void()
    frame_ptr = b.alloca(frame_type)
    for i, a in enumerate(args):
        b.store(a, b.gep(frame_ptr, [ir.Constant(i32, 0), ir.Constant(i32, i)]))
    b.call(_gomp_parallel(module), [outlined, b.bitcast(frame_ptr, i8p), b.trunc(nthreads, i32), ir.Constant(i32, 0)])
    b.ret_void()


def _thread_position(module: ir.Module, b: ir.IRBuilder) -> tuple[ir.Value, ir.Value]:
    """This OpenMP thread's number and the team's size, as i64."""
    i32 = ir.IntType(32)
    tid = b.call(_declare(module, "omp_get_thread_num", ir.FunctionType(i32, [])), [])
    count = b.call(_declare(module, "omp_get_num_threads", ir.FunctionType(i32, [])), [])
    return b.sext(tid, I64), b.sext(count, I64)


def _gomp_parallel(module: ir.Module) -> ir.Function:
    """libgomp's ``GOMP_parallel(fn, data, num_threads, flags)``: ``fn(data)`` on each thread."""
    i8p, i32 = ir.IntType(8).as_pointer(), ir.IntType(32)
    task = ir.FunctionType(ir.VoidType(), [i8p]).as_pointer()
    return _declare(module, "GOMP_parallel", ir.FunctionType(ir.VoidType(), [task, i8p, i32, i32]))


def generate(
    funcs: list[L.LoopFunc], vector_width: int, triple: str, features: frozenset[str] = frozenset()
) -> ir.Module:
    """An LLVM module with one exported function per loop function (see ``_entry``), using the
    instructions of ``features`` (LLVM's names) that it emits by intrinsic (``DOT_INTRINSICS``)."""
    module = ir.Module(name=funcs[0].name)
    module.triple = triple
    for f in funcs:
        _entry(module, Codegen(module, vector_transposes(f), vector_width, features).finish(), f)
    return module
