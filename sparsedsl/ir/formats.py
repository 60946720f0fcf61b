"""Formats: a tensor's dimensions mapped onto an ordered list of storage levels.

``FormatDef`` is a declaration with parameters (``BSR(bm, bn)``); ``Format`` is an instance with
integers bound (``BSR(4, 1)``). Packing, unpacking and iteration are composed from the levels in
``sparsedsl.ir.levels``; nothing here knows any particular format.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from functools import cached_property

import torch

from sparsedsl.errors import PackError, SdslSemanticError, Span
from sparsedsl.ir import levels as lv
from sparsedsl.ir import loop_ir as L


@dataclass(frozen=True)
class LevelMap:
    """Which part of which dimension a level stores: ``dim``, ``dim / factor`` or ``dim % factor``."""

    dim: int
    op: str | None  # None, "/" or "%"
    factor: int  # 1 for a whole dimension

    def coordinate(self, index):
        """The level coordinate of a dimension index (ints, tensors or loop-IR expressions)."""
        if self.op == "/":
            return L.floordiv(index, L.const(self.factor)) if _is_ir(index) else index // self.factor
        if self.op == "%":
            return L.mod(index, L.const(self.factor)) if _is_ir(index) else index % self.factor
        return index

    def contribution(self, coord):
        """This level's share of the dimension index, given its coordinate."""
        if self.op == "/":
            return L.mul(coord, L.const(self.factor)) if _is_ir(coord) else coord * self.factor
        return coord

    def extent(self, size):
        """The coordinate extent, given the dimension size (int or loop-IR expression)."""
        if self.op == "%":
            return L.const(self.factor) if _is_ir(size) else self.factor
        if self.op == "/":
            return L.floordiv(size, L.const(self.factor)) if _is_ir(size) else size // self.factor
        return size

    def text(self, dims: tuple[str, ...]) -> str:
        name = dims[self.dim]
        return name if self.op is None else f"{name} {self.op} {self.factor}"


def _is_ir(x) -> bool:
    return isinstance(x, L.Var | L.SizeVar | L.Const | L.Bin | L.Load | L.Cast)


@dataclass(frozen=True)
class Format:
    """A format with all parameters bound: ``BSR(4, 1)``."""

    name: str
    args: tuple[int, ...]
    dims: tuple[str, ...]
    maps: tuple[LevelMap, ...]
    levels: tuple[lv.Level, ...]

    @property
    def label(self) -> str:
        """``BSR(4, 1)``: how users write this format."""
        return f"{self.name}({', '.join(map(str, self.args))})" if self.args else self.name

    @property
    def rank(self) -> int:
        return len(self.dims)

    @cached_property
    def text(self) -> str:
        """The format's definition, as .sdsl; two formats are equal when their texts are."""
        inner = ", ".join(f"{m.text(self.dims)}: {lvl.describe()}" for m, lvl in zip(self.maps, self.levels))
        return f"{self.label} = ({', '.join(self.dims)}) -> ({inner})"

    def __str__(self) -> str:
        return self.text

    def __hash__(self) -> int:
        return hash(self.text)

    def __eq__(self, other) -> bool:
        return isinstance(other, Format) and self.text == other.text

    def buffer_keys(self) -> list[str]:
        """Keys of the index buffers (``{level}_{suffix}``), level by level."""
        return [f"{i}_{suffix}" for i, lvl in enumerate(self.levels) for suffix in lvl.buffers()]

    def buffer_names(self, tensor: str) -> list[str]:
        """Names of the index buffers of a tensor stored in this format, then its values."""
        return [*(f"{tensor}_{k}" for k in self.buffer_keys()), f"{tensor}_vals"]

    def index_dtypes(self, shape: tuple[int, ...]) -> dict[str, torch.dtype]:
        """The integer type of each index buffer (keys as ``buffer_keys``) of a ``shape`` tensor,
        as its level chooses from its extent (``Level.dtype``): a CSR's columns over K <= 65536
        take two bytes, an N:M level's offsets one."""
        extents = self.extents(shape)
        return {f"{i}_{s}": lvl.dtype(s, extents[i]) for i, lvl in enumerate(self.levels) for s in lvl.buffers()}

    def index_dtype_choices(self) -> list[tuple[torch.dtype, ...]]:
        """Every combination of index buffer types (in ``buffer_keys`` order) that tensors of some
        shape take: one type for a level whose extent the format fixes (``j % 4``), one per
        coordinate type for a level whose extent follows the shape (what an AOT build compiles)."""
        choices = []
        for m, lvl in zip(self.maps, self.levels):
            extents = (m.factor,) if m.op == "%" else tuple(most for _, most in lv.COORDINATE_DTYPES)
            choices += [tuple(dict.fromkeys(lvl.dtype(s, e) for e in extents)) for s in lvl.buffers()]
        return list(itertools.product(*choices))

    def extents(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        """Concrete coordinate extent of each level; a shape that does not fit is a PackError."""
        if len(shape) != self.rank:
            raise PackError(f"{self.label} stores {self.rank}-d tensors, got shape {tuple(shape)}")
        for m in self.maps:
            if m.op is not None and shape[m.dim] % m.factor:
                raise PackError(
                    f"dimension {m.dim} ({self.dims[m.dim]}) of size {shape[m.dim]} is not divisible "
                    f"by {m.factor}, as {self.label} requires"
                )
        return tuple(m.extent(shape[m.dim]) for m in self.maps)

    def to_index(self, coords: list) -> list:
        """Dimension indices from the coordinates of every level (ints, tensors or IR)."""
        index = [None] * self.rank
        for m, c in zip(self.maps, coords):
            part = m.contribution(c)
            prev = index[m.dim]
            index[m.dim] = part if prev is None else (L.add(prev, part) if _is_ir(part) else prev + part)
        return index

    def _where(self, prefix: torch.Tensor) -> str:
        """Name a parent position by the dimension ranges its coordinates pin down."""
        parts = []
        for d, dim in enumerate(self.dims):
            known = [(m, int(prefix[i])) for i, m in enumerate(self.maps[: len(prefix)]) if m.dim == d]
            if not known:
                continue
            lo = sum(m.contribution(c) for m, c in known)
            whole = any(m.op != "/" for m, _ in known)
            width = 1 if whole else next(m.factor for m, _ in known if m.op == "/")
            parts.append(f"{dim} = {lo}" if width == 1 else f"{dim} in {lo}..{lo + width - 1}")
        return "at " + ", ".join(parts) if parts else "at the top level"

    def pack(self, dense: torch.Tensor) -> dict[str, torch.Tensor]:
        """Level buffers (keys ``{level}_{suffix}``) and ``vals`` of a dense tensor."""
        extents = self.extents(tuple(dense.shape))
        nz_index = torch.nonzero(dense).T  # [rank, Z]
        coords = torch.stack([m.coordinate(nz_index[m.dim]) for m in self.maps], dim=1)
        nonzeros = lv.unique_rows(coords, extents)
        table = torch.zeros(1, 0, dtype=torch.int64)
        bufs: dict[str, torch.Tensor] = {}
        for i, level in enumerate(self.levels):
            state = lv.PackState(i, table, nonzeros, extents, self._where)
            table, level_bufs = level.pack(state)
            bufs.update({f"{i}_{k}": v for k, v in level_bufs.items()})
        index = self.to_index([table[:, i] for i in range(len(self.levels))])
        bufs["vals"] = dense[tuple(index)].contiguous()
        return bufs

    def validate(self, bufs: dict[str, torch.Tensor], shape: tuple[int, ...]) -> dict[str, torch.Tensor]:
        """Check buffers that come from outside the packer against this format and ``shape``: the
        buffers present, integer 1-D index buffers on the values' device, and each level's own
        invariants (``Level.validate``), in one vectorised pass; then ``vals`` holds one value per
        stored position. Returns the buffers with index buffers contiguous, each in the type its
        level chooses (``index_dtypes``; integers of another width are converted once they are
        known to fit). Anything else is a PackError naming the level, the buffer and the first
        offending position."""
        if any(s < 0 for s in shape):
            raise PackError(f"a shape is a tuple of sizes >= 0, got {tuple(shape)}")
        if math.prod(shape) >= 1 << 62:  # the coordinate keys below are int64
            raise PackError(f"a {tuple(shape)} tensor has more entries than 64-bit indices can count")
        extents = self.extents(tuple(shape))
        keys = self.buffer_keys()
        missing = [k for k in (*keys, "vals") if k not in bufs]
        extra = [k for k in bufs if k not in (*keys, "vals")]
        if missing or extra:
            raise PackError(
                f"{self.label} stores buffers {', '.join(keys + ['vals'])}; "
                + (f"missing {', '.join(missing)}" if missing else f"unknown {', '.join(map(str, extra))}")
            )
        vals = bufs["vals"]
        if not isinstance(vals, torch.Tensor) or not _value_type(vals) or vals.dim() != 1:
            what = f"a {vals.dim()}-d {vals.dtype} tensor" if isinstance(vals, torch.Tensor) else type(vals).__name__
            raise PackError(f"'vals' must be a 1-d floating-point or 8-bit integer tensor, got {what}")
        if not vals.is_contiguous():
            raise PackError("'vals' must be contiguous (call .contiguous() first)")
        out = {}
        for k in keys:
            buf = bufs[k]
            if not isinstance(buf, torch.Tensor):
                raise PackError(f"index buffer '{k}' must be a torch.Tensor, got {type(buf).__name__}")
            if buf.is_floating_point() or buf.is_complex() or buf.dtype == torch.bool or buf.dim() != 1:
                raise PackError(f"index buffer '{k}' must be a 1-d integer tensor, got a {buf.dim()}-d {buf.dtype} one")
            if buf.device != vals.device:
                raise PackError(f"index buffer '{k}' is on {buf.device}, but 'vals' on {vals.device}")
            out[k] = buf
        positions = torch.zeros(1, dtype=torch.int64, device=vals.device)
        most = max(b.numel() for b in (*out.values(), vals))
        for i, level in enumerate(self.levels):
            mine = {s: out[f"{i}_{s}"] for s in level.buffers()}

            def where(key: int, i: int = i) -> str:
                return self._where(lv.decode(torch.tensor([key]), extents[:i])[0])

            name = f"level {i} ({level.describe()}, {self.maps[i].text(self.dims)})"
            positions = level.validate(lv.CheckState(positions, extents[i], mine, name, where, most))
        if vals.numel() != positions.numel():
            raise PackError(
                f"'vals' must hold one value per stored position, {positions.numel()}, it has {vals.numel()}"
            )
        dtypes = self.index_dtypes(tuple(shape))
        return {**{k: v.to(dtypes[k]).contiguous() for k, v in out.items()}, "vals": vals}

    def indices(self, bufs: dict[str, torch.Tensor], shape: tuple[int, ...]) -> list[torch.Tensor]:
        """The dimension indices of every stored position, in storage order (int64, on the CPU;
        padded slots included: each stores a value at its coordinate)."""
        extents = self.extents(shape)
        table = torch.zeros(1, 0, dtype=torch.int64)
        for i, level in enumerate(self.levels):
            mine = {s: bufs[f"{i}_{s}"].cpu() for s in level.buffers()}
            table = level.unpack(table, extents[i], mine)
        return self.to_index([table[:, i] for i in range(len(self.levels))])

    def unpack(self, bufs: dict[str, torch.Tensor], shape: tuple[int, ...]) -> torch.Tensor:
        """The dense tensor stored in ``bufs`` (the inverse of ``pack``)."""
        index = self.indices(bufs, shape)
        vals = bufs["vals"]
        dense = torch.zeros(shape, dtype=vals.dtype, device=vals.device)
        return dense.index_put_(tuple(i.to(vals.device) for i in index), vals, accumulate=True)


@dataclass(frozen=True)
class LevelTemplate:
    """A level of a format declaration, parameters still by name."""

    dim: int
    op: str | None
    factor: int | str
    level_type: str
    args: tuple[int | str, ...]
    span: Span
    arg_spans: tuple[Span, ...]


@dataclass(frozen=True)
class FormatDef:
    """A checked format declaration: ``format BSR(bm, bn) = (i, j) -> (...)``."""

    name: str
    params: tuple[str, ...]
    dims: tuple[str, ...]
    levels: tuple[LevelTemplate, ...]
    span: Span | None = None

    def instantiate(self, args: tuple[int, ...], span: Span | None = None) -> Format:
        """Bind the parameters; a wrong arity or an invalid value is an SdslSemanticError."""
        if len(args) != len(self.params):
            want = f"{len(self.params)} parameter{'s' if len(self.params) != 1 else ''}"
            raise SdslSemanticError(
                f"format '{self.name}' takes {want} ({', '.join(self.params) or 'none'}), got {len(args)}", span
            )
        env = dict(zip(self.params, args))

        def value(v: int | str) -> int:
            return env[v] if isinstance(v, str) else v

        maps, levels = [], []
        for t in self.levels:
            factor = value(t.factor)
            if factor < 1:
                raise SdslSemanticError(f"block size must be at least 1, got {factor}", span or t.span)
            maps.append(LevelMap(t.dim, t.op if factor != 1 or t.op == "%" else None, factor))
            levels.append(
                make_level(t.level_type, tuple(value(a) if a != "nonunique" else a for a in t.args), span or t.span)
            )
        return Format(self.name, tuple(args), self.dims, tuple(maps), tuple(levels))


def make_level(kind: str, args: tuple, span: Span | None) -> lv.Level:
    """A level object from its type name and integer arguments, validated."""
    if kind == "nm":
        n, m = args
        if not 1 <= n <= m:
            raise SdslSemanticError(f"nm(n, m) needs 1 <= n <= m, got nm({n}, {m})", span)
        return lv.NM(n, m)
    if kind == "fixed":
        (w,) = args
        if w < 1:
            raise SdslSemanticError(f"fixed(w) needs w >= 1, got fixed({w})", span)
        return lv.Fixed(w)
    if kind == "compressed":
        return lv.Compressed(unique=not args)
    return lv.LEVEL_TYPES[kind]()


def _value_type(vals: torch.Tensor) -> bool:
    """Whether ``vals`` has a type stored values may have: a float, or a quantized 8-bit integer."""
    return vals.is_floating_point() or vals.dtype in (torch.int8, torch.uint8)
