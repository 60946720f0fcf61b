"""Integer and bf16 block products onto the CPU's dot-product instructions (a loop-IR rewrite).

An int8 kernel whose stored blocks hold consecutive k of one output row (``BSR(1, 4)``: each stored
value group is 4 k of one row) sums, per token, products that belong to the same accumulator lane:
exactly what ``vpdpbusd`` (AVX-512 VNNI / AVX-VNNI: 4 u8 x s8 products summed into an i32 lane) and
``vpmaddwd`` (AVX2: 2 i16 x i16 products) compute. The lowering stages the activations
``X_t[k, tile]`` and multiplies each stored value by a vector of tokens, one k at a time:

    for k_i in [0, 4) unrolled:
        for m_i in [0, T) vectorized:
            acc[n_i, m_i] = acc[n_i, m_i] + int32(X_t[base + k_i, m_i]) * int32(W_vals[w + k_i])

``rewrite(func, group)`` turns that into ``group`` (4 or 2) consecutive k per step:

* the activations are staged once per tile as words ``X_q[k / group, tile]`` (int32), each holding a
  token's ``group`` consecutive values (``pack``): for 4, bytes as u8, an i8 activation offset by
  128; for 2, i16 halves, sign-extended;
* the block product becomes ``acc = dot(acc, X_q[kb, m_i], w_0, ..., w_{group-1})`` (``dot``: the
  word's ``group`` elements times the weights, summed into the lane): the backend emits
  ``vpdpbusd`` or ``vpmaddwd`` + ``vpaddd`` for it where the target has them;
* for 4 with i8 activations, the offset's contribution ``128 * sum(w)`` is summed per row
  (``wsum``, one scalar add per stored block) and subtracted wherever the accumulator is read
  after the sum.

Every integer stays exact: u8 x s8 and i16 x i16 products and their sums fit int32 lanes (as they
do in the unrewritten kernel).

``rewrite(func, 2, "bf16")`` does the same for a bf16 kernel (``acc[.., m_i] += float32(X_t[base +
k_i, m_i]) * float32(W_vals[w + k_i])``, f32 accumulators): the words hold a token's 2 consecutive
bf16 activations (the first in the low half, 0 past K) and ``dot(acc, word, w_0, w_1)`` takes the
two bf16 weights themselves; the backend emits ``vdpbf16ps`` (AVX-512 BF16) for it, or two f32 FMAs
on the widened halves, the unrewritten kernel's arithmetic in its order. A bf16 product is exact
in f32, so ``vdpbf16ps`` rounds once per product as those FMAs do, adding the pair's second product
first and reading bf16 denormals as 0 and flushing denormal sums to 0 (Intel's DAZ / FTZ).

A function whose staged activations are read any other way is returned unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from sparsedsl.errors import BackendError
from sparsedsl.ir import loop_ir as L
from sparsedsl.ir.schedule import loops, substitute

GROUPS = (2, 4)  # int8 products per int32 lane: vpmaddwd's, vpdpbusd's
BF16_GROUP = 2  # bf16 products per f32 lane: vdpbf16ps's
OFFSET = 128  # i8 -> u8 for vpdpbusd's unsigned operand


@dataclass(frozen=True)
class _Operands:
    """The products a rewrite takes: the accumulator's dtype, the stored dtypes of the activations
    and weights it reads (each cast to the accumulator's dtype), the groups it sums."""

    acc: str
    activations: tuple[str, ...]
    weights: tuple[str, ...]
    groups: tuple[int, ...]

    def weight(self, factor: L.Cast) -> L.Expr:
        """The ``dot`` operand of a weight factor: the int32 cast, or the bf16 value itself."""
        return factor if self.acc == "int32" else factor.value

    def element(self, read: L.Load, offset: int) -> tuple[L.Expr, L.Expr]:
        """A staged word's element from an activation read, and the element past K."""
        if self.acc == "int32":
            return L.Bin("+", L.Cast("int32", read), L.const(offset, "int32")), L.const(offset, "int32")
        return read, L.Const(0.0, read.buffer.dtype)


OPERANDS = {
    "int8": _Operands("int32", ("int8", "uint8"), ("int8",), GROUPS),
    "bf16": _Operands("float32", ("bfloat16",), ("bfloat16",), (BF16_GROUP,)),
}


@dataclass(frozen=True)
class _Product:
    """One matched block product: the staged activations, the weight reads, the accumulator."""

    staged: L.Buffer
    x_block: L.Expr  # the staged row index of k_i = 0, divided by the group
    weight: L.Cast  # the weight factor (a cast of a load to the accumulator's dtype) at k_i
    k_i: str
    lane: L.Var
    extent: int
    acc_store: L.Store


def rewrite(func: L.LoopFunc, group: int, dtype: str = "int8") -> L.LoopFunc:
    """``func`` with its ``dtype`` (a key of ``OPERANDS``) block products summed ``group`` (one of
    its groups) k at a time (see the module's docstring); unchanged when it has none or reads its
    staged activations another way."""
    operands = OPERANDS[dtype]
    if group not in operands.groups:
        raise BackendError(f"{dtype} dot products sum {' or '.join(map(str, operands.groups))} k, not {group}")
    local = {b.name for b in L.allocs(func.body)}
    products = [p for p in _products(func.body, group, operands) if p.staged.name in local]
    staged = {p.staged.name for p in products}
    if len(staged) != 1:
        return func
    x_t = products[0].staged
    reads = [ld for ld in L.loads(func.body) if ld.buffer.name == x_t.name]
    copy = _staging_copy(func.body, x_t)
    if len(reads) != len(products) or copy is None:  # each product reads it once
        return func
    signed = L.dtype_of(copy.value) == "int8"
    x_q = L.Buffer(f"{x_t.name}q", "int32", (L.ceildiv(x_t.shape[0], group), x_t.shape[1]), x_t.scope)
    compensate = group == 4 and signed
    accs = {p.acc_store.buffer.name: p.acc_store.buffer for p in products}
    sums = {name: L.Buffer(f"{name}_wsum", "int32", acc.shape[:-1], acc.scope) for name, acc in accs.items()}
    by_store = {id(p.acc_store.value): p for p in products}
    rw = _Rewriter(group, operands, x_t, x_q, by_store, sums if compensate else {})
    return replace(func, body=rw.stmt(func.body))


def _staging_copy(body: L.Stmt, x_t: L.Buffer) -> L.Store | None:
    """The lowering's one copy ``X_t[k, m_i] = X[..., k]`` into the staged tile, or None."""
    copies = [s for s in L.stores(body) if s.buffer.name == x_t.name]
    if len(copies) != 1 or not isinstance(copies[0].value, L.Load):
        return None
    copy = copies[0]
    if copy.value.indices[-1] != copy.indices[0] or not isinstance(copy.indices[1], L.Var):
        return None
    return copy


def _offset_of(e: L.Expr, k_i: str) -> L.Expr | None:
    """``base`` when ``e`` is ``base + k_i`` (``base`` free of ``k_i``), else None."""
    if isinstance(e, L.Var) and e.name == k_i:
        return L.const(0)
    if isinstance(e, L.Bin) and e.op == "+":
        for a, b in ((e.a, e.b), (e.b, e.a)):
            if isinstance(b, L.Var) and b.name == k_i and not L.uses(a, k_i):
                return a
    return None


def _divided(e: L.Expr, group: int) -> L.Expr | None:
    """``e / group`` when ``e`` is visibly a multiple of it (``x * c`` with ``group | c``, or 0)."""
    if isinstance(e, L.Const) and e.value % group == 0:
        return L.const(e.value // group)
    if isinstance(e, L.Bin) and e.op == "*":
        for a, b in ((e.a, e.b), (e.b, e.a)):
            if isinstance(b, L.Const) and b.value % group == 0:
                return L.mul(a, L.const(b.value // group))
    return None


def _read(e: L.Expr, acc: str, dtypes: tuple[str, ...]) -> L.Load | None:
    """The load of ``e`` when it is a cast to ``acc`` of a load of one of ``dtypes``."""
    if isinstance(e, L.Cast) and e.dtype == acc and isinstance(e.value, L.Load):
        return e.value if e.value.buffer.dtype in dtypes else None
    return None


def _match(loop: L.For, group: int, operands: _Operands) -> _Product | None:
    """The block product ``for k_i: for m_i vectorized: acc[.., m_i] += X_t[base + k_i, m_i] * w``."""
    inner = loop.body
    if not (isinstance(loop.extent, L.Const) and loop.extent.value % group == 0 and isinstance(inner, L.For)):
        return None
    if inner.kind is not L.LoopKind.VECTORIZED or not isinstance(inner.body, L.Store):
        return None
    store, k_i, lane = inner.body, loop.var.name, inner.var.name
    value = store.value
    if store.buffer.dtype != operands.acc or not (isinstance(value, L.Bin) and value.op == "+"):
        return None
    if value.a != L.Load(store.buffer, store.indices) or not (isinstance(value.b, L.Bin) and value.b.op == "*"):
        return None
    for x, w in ((value.b.a, value.b.b), (value.b.b, value.b.a)):
        xl, wl = _read(x, operands.acc, operands.activations), _read(w, operands.acc, operands.weights)
        if xl is None or wl is None:
            continue
        if len(xl.indices) != 2 or xl.indices[1] != L.Var(lane) or L.uses(w, lane):
            continue
        base = _offset_of(xl.indices[0], k_i)
        block = _divided(base, group) if base is not None else None
        if block is not None:
            return _Product(xl.buffer, block, w, k_i, L.Var(lane), int(loop.extent.value), store)
    return None


def _products(s: L.Stmt, group: int, operands: _Operands) -> list[_Product]:
    found = []
    match s:
        case L.For(body=body):
            product = _match(s, group, operands)
            found += [product] if product is not None else _products(body, group, operands)
        case L.Seq(stmts):
            for st in stmts:
                found += _products(st, group, operands)
        case L.If(_, then):
            found += _products(then, group, operands)
    return found


@dataclass
class _Rewriter:
    group: int
    operands: _Operands
    x_t: L.Buffer
    x_q: L.Buffer
    products: dict[int, _Product]  # by the identity of the matched store's value
    sums: dict[str, L.Buffer]  # accumulator -> its weight sum (for u8-offset activations)

    def stmt(self, s: L.Stmt) -> L.Stmt:
        match s:
            case L.Seq(stmts):
                out: list[L.Stmt] = []
                for st in stmts:
                    out += self._spliced(st)
                return L.Seq(tuple(out))
            case L.For(body=body):
                if isinstance(body, L.For) and isinstance(body.body, L.Store):
                    product = self.products.get(id(body.body.value))
                    if product is not None:
                        return self._dot(body, product)
                stores = L.stores(s)
                if stores and all(st.buffer.name == self.x_t.name for st in stores):
                    return self._staging(s)
                if s.kind is L.LoopKind.VECTORIZED and isinstance(body, L.Store) and self._zeroes_acc(body):
                    wsum = self.sums[body.buffer.name]
                    return L.seq(L.Store(wsum, body.indices[:-1], L.const(0, "int32")), s)
                return replace(s, body=self.stmt(body))
            case L.If(cond, then):
                return L.If(self._reads(cond), self.stmt(then))
            case L.Store(_, idx, value):
                return replace(s, indices=tuple(self._reads(i) for i in idx), value=self._reads(value))
            case L.Let(var, value):
                return L.Let(var, self._reads(value))
        return s

    def _spliced(self, s: L.Stmt) -> list[L.Stmt]:
        if isinstance(s, L.Alloc) and s.buffer.name == self.x_t.name:
            return [L.Alloc(self.x_q)]
        if isinstance(s, L.Alloc) and s.buffer.name in self.sums:
            return [s, L.Alloc(self.sums[s.buffer.name])]
        return [self.stmt(s)]

    def _zeroes_acc(self, store: L.Store) -> bool:
        return store.buffer.name in self.sums and isinstance(store.value, L.Const)

    def _reads(self, e: L.Expr) -> L.Expr:
        """``e`` with each read of a compensated accumulator less its row's weight sum."""
        match e:
            case L.Load(buf, idx) if buf.name in self.sums:
                return L.Bin("-", e, L.Load(self.sums[buf.name], idx[:-1]))
            case L.Bin(op, a, b):
                return L.Bin(op, self._reads(a), self._reads(b))
            case L.Cast(dt, v):
                return L.Cast(dt, self._reads(v))
            case L.Call(f, args, dt):
                return L.Call(f, tuple(self._reads(a) for a in args), dt)
            case L.Select(c, t, o):
                return L.Select(self._reads(c), self._reads(t), self._reads(o))
        return e

    def _dot(self, lanes: L.For, p: _Product) -> L.Stmt:
        """The k_i loop as ``extent / group`` dot steps in the lane loop (and the weight sum)."""
        g, store = self.group, p.acc_store
        acc = L.Load(store.buffer, store.indices)
        steps, weights = [], []
        for t in range(p.extent // g):
            ws = [substitute(p.weight, p.k_i, L.const(t * g + j)) for j in range(g)]
            word = L.Load(self.x_q, (L.add(p.x_block, L.const(t)), p.lane))
            operands = (acc, word, *(self.operands.weight(w) for w in ws))
            steps.append(L.Store(store.buffer, store.indices, L.Call("dot", operands, store.buffer.dtype)))
            weights += ws
        body = L.seq(*steps) if len(steps) > 1 else steps[0]
        vector = replace(lanes, body=body)
        wsum = self.sums.get(store.buffer.name)
        if wsum is None:
            return vector
        total = weights[0]
        for w in weights[1:]:
            total = L.Bin("+", total, w)
        row = store.indices[:-1]
        offset = L.Bin("*", L.const(OFFSET, "int32"), total)
        return L.seq(L.Store(wsum, row, L.Bin("+", L.Load(wsum, row), offset)), vector)

    def _staging(self, nest: L.For) -> L.Stmt:
        """The copy into ``X_t[k, m_i]`` as a copy of words ``X_q[kb, m_i]`` (same outer loop kind)."""
        store = next(s for s in L.stores(nest) if s.buffer.name == self.x_t.name)  # _staging_copy's
        source = store.value
        g, extent = self.group, self.x_t.shape[0]
        kb, m_i = L.Var(f"{self.x_q.name}_k"), store.indices[1]
        lane_loop = next(f for f in loops(nest) if f.var == m_i)
        offset = OFFSET if g == 4 and source.buffer.dtype == "int8" else 0
        elements = []
        for j in range(g):
            k = L.add(L.mul(kb, L.const(g)), L.const(j))
            read = replace(source, indices=(*source.indices[:-1], L.minimum(k, L.sub(extent, L.const(1)))))
            value, past = self.operands.element(read, offset)
            elements.append(L.Select(L.Bin("<", k, extent), value, past))
        copy = L.Store(self.x_q, (kb, m_i), L.Call("pack", tuple(elements), "int32"))
        lanes = L.For(m_i, lane_loop.start, lane_loop.extent, copy)
        return L.For(kb, L.const(0), self.x_q.shape[0], lanes, nest.kind)
