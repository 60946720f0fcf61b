"""Storage level types (TACO's level interface, in Python).

A format is an ordered list of levels. Each level stores the coordinates of one part of a tensor
dimension under the positions of its parent level, and knows three things, nothing about formats:

* its buffers and its properties (``unique``; ``padded``: stores a fixed number of slots, some
  possibly holding explicit zeros);
* ``dtype``: the integer type of each buffer, given the level's extent: positions are int32,
  coordinates the narrowest type that holds every coordinate of the extent (``coordinate_dtype``:
  a byte up to 256, two up to 65536);
* ``pack``: given the coordinate table of its parent positions and the nonzero entries, the
  coordinate table of its own positions and its buffers (vectorised torch, no per-nonzero loop);
* ``unpack``: given its parent's coordinate table and its buffers, its own coordinate table;
* ``iterate``: the loop-IR of one step of iteration (see ``sparsedsl.ir.lowering``);
* ``validate``: given the keys of its parent positions and buffers handed in from outside the
  packer, check its own invariants (lengths, bounds, monotone positions, sorted unique
  coordinates) in one vectorised pass and return the keys of its own positions.

A *coordinate table* is an int64 tensor [positions, levels so far], sorted lexicographically,
holding for each stored position the coordinates of every level above and at it. Validation uses
its mixed-radix *keys* instead (one int64 per position, ``key``): a table is sorted iff its keys
never decrease, and holds distinct rows iff they strictly increase.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import NoReturn

import torch

from sparsedsl.errors import PackError
from sparsedsl.ir import loop_ir as L

POS_DTYPE = torch.int32  # a position counts stored entries: int32, whatever the extent
# The coordinate types, narrowest first, with the largest extent each holds. Two-byte coordinates
# are torch.uint16: torch stores, copies, moves, concatenates, indexes, saves and hands it over by
# DLPack, but has no arithmetic on it; everything here widens with .long() before computing, and
# the generated code zero-extends each load to int64 (an int16 read as unsigned would show users
# negative columns past 32767 and need a mask at every consumer).
COORDINATE_DTYPES = ((torch.uint8, 1 << 8), (torch.uint16, 1 << 16), (torch.int32, 1 << 31))


def type_name(dtype: torch.dtype) -> str:
    """The loop-IR name of an index buffer's type: ``"uint16"`` for ``torch.uint16``."""
    return str(dtype).removeprefix("torch.")


def coordinate_dtype(extent: int) -> torch.dtype:
    """The narrowest integer type that holds every coordinate in ``[0, extent)``."""
    return next((dtype for dtype, most in COORDINATE_DTYPES if extent <= most), torch.int64)


@dataclass(frozen=True)
class PackState:
    """What a level sees while packing: parent coordinate table and the nonzeros' coordinates."""

    level: int  # index of the level being packed
    table: torch.Tensor  # [P, >= level] coordinates of the parent positions
    nonzeros: torch.Tensor  # [Z, L] level coordinates of every nonzero entry, sorted
    extents: tuple[int, ...]  # coordinate extent of every level
    where: Callable[[torch.Tensor], str]  # names a parent position for error messages

    @property
    def extent(self) -> int:
        return self.extents[self.level]

    @property
    def parents(self) -> torch.Tensor:
        return self.table[:, : self.level]


@dataclass(frozen=True)
class CheckState:
    """What a level sees while validating buffers that come from outside the packer."""

    keys: torch.Tensor  # int64 [P], the key of each parent position; never decreasing
    extent: int  # coordinate extent of the level
    bufs: dict[str, torch.Tensor]  # the level's buffers (suffix -> 1-D integer tensor)
    name: str  # the level as errors name it: "level 1 (compressed, j)"
    where: Callable[[int], str]  # names a parent position, given its key
    most: int  # the longest buffer of the tensor: no level of a valid one has more positions

    def fail(self, suffix: str, index: int, message: str, parent: int | None = None) -> NoReturn:
        """A PackError naming this level, its buffer and the first offending position."""
        place = f" ({self.where(int(self.keys[parent]))})" if parent is not None else ""
        raise PackError(f"{self.name}: {suffix}[{index}] {message}{place}")

    def buffer(self, suffix: str, length: int) -> torch.Tensor:
        """A buffer of the level widened to int64, refused unless it has ``length`` entries."""
        buf = self.bufs[suffix]
        if buf.numel() != length:
            raise PackError(f"{self.name}: '{suffix}' must have {length} entries, it has {buf.numel()}")
        return buf.long()

    def coordinates(self, suffix: str, length: int) -> torch.Tensor:
        """A coordinate buffer of ``length`` entries, each refused unless in [0, extent)."""
        crd = self.buffer(suffix, length)
        outside = (crd < 0) | (crd >= self.extent)
        if bool(outside.any()):
            q = int(torch.argmax(outside.to(torch.uint8)))
            self.fail(suffix, q, f"= {int(crd[q])} is outside [0, {self.extent})")
        return crd

    def ordered(self, suffix: str, keys: torch.Tensor, parent: torch.Tensor, strict: bool) -> torch.Tensor:
        """``keys`` of this level's positions, refused unless they increase (strictly if ``strict``):
        coordinates sorted, and distinct where the level is unique."""
        step = keys[1:] - keys[:-1]
        bad = step <= 0 if strict else step < 0
        if bool(bad.any()):
            q = int(torch.argmax(bad.to(torch.uint8))) + 1
            what = "repeats" if bool(step[q - 1] == 0) else "is smaller than"
            crd = self.bufs[suffix]
            self.fail(
                suffix,
                q,
                f"= {int(crd[q])} {what} the coordinate before it (they must be sorted{', distinct' * strict})",
                int(parent[q]),
            )
        return keys


@dataclass(frozen=True)
class LevelIter:
    """One level's step of iteration in loop IR: wrap a body, giving position and coordinate."""

    loop: L.For | None  # the loop it opens (None for a singleton: no loop)
    position: L.Expr  # the position of the current child
    coordinate: L.Expr  # the coordinate stored at that position


def _index(buf: L.Buffer, i: L.Expr) -> L.Expr:
    """A coordinate read from an index buffer, widened to the int64 of loop arithmetic."""
    return L.Cast("int64", L.load(buf, i))


def key(table: torch.Tensor, extents: tuple[int, ...]) -> torch.Tensor:
    """Mixed-radix key of each row: equal keys iff equal rows, order = lexicographic order."""
    key = torch.zeros(table.shape[0], dtype=torch.int64)
    for col, extent in enumerate(extents[: table.shape[1]]):
        key = key * extent + table[:, col]
    return key


def decode(keys: torch.Tensor, extents: tuple[int, ...]) -> torch.Tensor:
    """Inverse of ``key``: the coordinate rows [len(keys), len(extents)] of mixed-radix keys."""
    cols = []
    for extent in reversed(extents):
        cols.append(keys % extent)
        keys = torch.div(keys, extent, rounding_mode="floor")
    return torch.stack(cols[::-1], dim=1) if cols else keys.new_zeros((len(keys), 0))


def unique_rows(table: torch.Tensor, extents: tuple[int, ...]) -> torch.Tensor:
    """The distinct rows of a coordinate table, in lexicographic order (fast: 1-d keys)."""
    width = table.shape[1]
    return decode(torch.unique(key(table, extents)), extents[:width])


def _parent_index(state: PackState, rows: torch.Tensor) -> torch.Tensor:
    """Index of the parent position of each row of ``rows`` (rows of nonzero coordinates)."""
    parent_keys = key(state.parents, state.extents)
    return torch.searchsorted(parent_keys, key(rows[:, : state.level], state.extents))


def _expand(table: torch.Tensor, count: int, coords: torch.Tensor) -> torch.Tensor:
    """Each parent row repeated ``count`` times with a new column ``coords`` ([P * count])."""
    return torch.cat([table.repeat_interleave(count, dim=0), coords.view(-1, 1)], dim=1)


class Level:
    """Base class of the level types; subclasses implement the interface described above."""

    name = "level"
    unique = True
    padded = False
    sorted = False  # coordinates read from a buffer that never decrease along a parent's positions

    def buffers(self) -> tuple[str, ...]:
        """Suffixes of the buffers this level stores (``pos``, ``crd``...)."""
        return ()

    def dtype(self, suffix: str, extent: int) -> torch.dtype:
        """The integer type of buffer ``suffix`` at coordinate extent ``extent``: ``pos`` int32,
        coordinates the narrowest type that holds the extent."""
        return POS_DTYPE if suffix == "pos" else coordinate_dtype(extent)

    def pack(self, state: PackState) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The coordinate table of this level's positions and its buffers."""
        raise NotImplementedError

    def unpack(self, table: torch.Tensor, extent: int, bufs: dict[str, torch.Tensor]) -> torch.Tensor:
        """The coordinate table of this level's positions, read back from its buffers."""
        raise NotImplementedError

    def iterate(self, parent: L.Expr, extent: L.Expr, bufs: dict[str, L.Buffer], var: str) -> LevelIter:
        """One step of iteration below parent position ``parent``."""
        raise NotImplementedError

    def iterate_range(
        self, parent: L.Expr, extent: L.Expr, bufs: dict[str, L.Buffer], var: str, lo: L.Expr, count: int
    ) -> LevelIter | None:
        """``iterate`` restricted to the coordinates in ``[lo, lo + count)`` (and below ``extent``),
        or None when the level cannot bound that range without searching its coordinates (K-blocking
        asks: ``block k by kc``)."""
        return None

    def validate(self, state: CheckState) -> torch.Tensor:
        """The keys of this level's positions; buffers that break its invariants are a PackError."""
        raise NotImplementedError

    def describe(self) -> str:
        return self.name


class Dense(Level):
    """Every coordinate in [0, extent) is stored; position = parent * extent + coordinate."""

    name = "dense"

    def pack(self, state):
        coords = torch.arange(state.extent, dtype=torch.int64).repeat(state.table.shape[0])
        return _expand(state.parents, state.extent, coords), {}

    def unpack(self, table, extent, bufs):
        return _expand(table, extent, torch.arange(extent, dtype=torch.int64).repeat(table.shape[0]))

    def iterate(self, parent, extent, bufs, var):
        c = L.Var(var)
        return LevelIter(L.For(c, L.const(0), extent), L.add(L.mul(parent, extent), c), c)

    def iterate_range(self, parent, extent, bufs, var, lo, count):
        c = L.Var(var)
        loop = L.For(c, lo, L.minimum(L.const(count), L.sub(extent, lo)))
        return LevelIter(loop, L.add(L.mul(parent, extent), c), c)

    def validate(self, state):
        positions = state.keys.numel() * state.extent
        if positions > state.most:
            raise PackError(
                f"{state.name}: the shape gives it {positions} positions, but the longest buffer has "
                f"{state.most} entries: buffers of another shape"
            )
        coords = torch.arange(state.extent, dtype=torch.int64, device=state.keys.device)
        return (state.keys.view(-1, 1) * state.extent + coords).view(-1)


class Compressed(Level):
    """The stored coordinates of each parent, sorted, in ``crd[pos[p]:pos[p+1]]``."""

    name = "compressed"
    sorted = True

    def __init__(self, unique: bool = True):
        self.unique = unique

    def buffers(self):
        return ("pos", "crd")

    def describe(self):
        return "compressed" if self.unique else "compressed(nonunique)"

    def pack(self, state):
        # A non-unique level keeps one position per distinct entry of the whole remaining key
        # (the singleton levels below it read their coordinates from the carried columns).
        width = state.level + 1 if self.unique else state.nonzeros.shape[1]
        children = unique_rows(state.nonzeros[:, :width], state.extents)
        parent = _parent_index(state, children)
        counts = torch.bincount(parent, minlength=state.table.shape[0])
        pos = torch.zeros(state.table.shape[0] + 1, dtype=torch.int64)
        pos[1:] = torch.cumsum(counts, 0)
        crd = children[:, state.level]
        dtypes = {suffix: self.dtype(suffix, state.extent) for suffix in self.buffers()}
        return children, {"pos": pos.to(dtypes["pos"]), "crd": crd.to(dtypes["crd"])}

    def unpack(self, table, extent, bufs):
        pos = bufs["pos"].long()
        parent = torch.repeat_interleave(torch.arange(table.shape[0]), pos[1:] - pos[:-1])
        return torch.cat([table[parent], bufs["crd"].long().view(-1, 1)], dim=1)

    def iterate(self, parent, extent, bufs, var):
        q = L.Var(var)
        pos = bufs["pos"]
        start = _index(pos, parent)
        stop = _index(pos, L.add(parent, L.const(1)))
        return LevelIter(L.For(q, start, L.sub(stop, start)), q, _index(bufs["crd"], q))

    def validate(self, state):
        parents = state.keys.numel()
        pos = state.buffer("pos", parents + 1)
        if int(pos[0]) != 0:
            state.fail("pos", 0, f"= {int(pos[0])}, but positions start at 0")
        counts = pos[1:] - pos[:-1]
        if bool((counts < 0).any()):
            p = int(torch.argmax((counts < 0).to(torch.uint8)))
            state.fail("pos", p + 1, f"= {int(pos[p + 1])} is smaller than pos[{p}] = {int(pos[p])}", p)
        if int(pos[-1]) > torch.iinfo(POS_DTYPE).max:
            state.fail("pos", parents, f"= {int(pos[-1])} does not fit the {POS_DTYPE} of positions")
        crd = state.coordinates("crd", int(pos[-1]))
        parent = torch.repeat_interleave(torch.arange(parents, device=crd.device), counts)
        return state.ordered("crd", state.keys[parent] * state.extent + crd, parent, self.unique)


class Singleton(Level):
    """Exactly one coordinate per parent position, ``crd[p]`` (the inner levels of COO)."""

    name = "singleton"

    def buffers(self):
        return ("crd",)

    def pack(self, state):
        return state.table, {"crd": state.table[:, state.level].to(self.dtype("crd", state.extent))}

    def unpack(self, table, extent, bufs):
        return torch.cat([table, bufs["crd"].long().view(-1, 1)], dim=1)

    def iterate(self, parent, extent, bufs, var):
        return LevelIter(None, parent, _index(bufs["crd"], parent))

    def validate(self, state):
        crd = state.coordinates("crd", state.keys.numel())
        parent = torch.arange(crd.numel(), device=crd.device)
        return state.ordered("crd", state.keys * state.extent + crd, parent, self.unique)


class Slotted(Level):
    """A fixed number of slots per parent, each holding a coordinate: ``crd[p * slots + s]``.

    Parents with fewer entries than slots are padded with explicit zeros at unused coordinates, so
    stored coordinates stay unique and every parent has the same shape (branch-free kernels).
    """

    padded = True

    def __init__(self, slots: int):
        self.slots = slots

    def buffers(self):
        return ("crd",)

    def too_many(self, count: int) -> str:
        raise NotImplementedError

    def pack(self, state):
        group = state.extent
        if self.slots > group:
            raise PackError(f"{self.describe()} needs at least {self.slots} coordinates, but the extent is {group}")
        parents = state.table.shape[0]
        present = torch.zeros(parents, group, dtype=torch.bool)
        parent = _parent_index(state, state.nonzeros)
        present[parent, state.nonzeros[:, state.level]] = True
        counts = present.sum(dim=1)
        worst = int(torch.argmax(counts)) if parents else 0
        if parents and int(counts[worst]) > self.slots:
            raise PackError(f"{state.where(state.parents[worst])}: {self.too_many(int(counts[worst]))}")
        # Present coordinates first, then the smallest absent ones as padding; each in order.
        rank = (~present).to(torch.int64) * group + torch.arange(group)
        chosen = torch.sort(torch.topk(rank, self.slots, dim=1, largest=False).indices, dim=1).values
        coords = chosen.reshape(-1)
        return _expand(state.parents, self.slots, coords), {"crd": coords.to(self.dtype("crd", group))}

    def unpack(self, table, extent, bufs):
        return _expand(table, self.slots, bufs["crd"].long())

    def iterate(self, parent, extent, bufs, var):
        s = L.Var(var)
        q = L.add(L.mul(parent, L.const(self.slots)), s)
        return LevelIter(L.For(s, L.const(0), L.const(self.slots)), q, _index(bufs["crd"], q))

    def validate(self, state):
        parents = state.keys.numel()
        crd = state.coordinates("crd", parents * self.slots)
        parent = torch.arange(parents, device=crd.device).repeat_interleave(self.slots)
        return state.ordered("crd", state.keys[parent] * state.extent + crd, parent, True)


class NM(Slotted):
    """N:M semi-structured: ``n`` of every ``m`` consecutive coordinates, offsets as small ints."""

    name = "nm"

    def __init__(self, n: int, m: int):
        super().__init__(n)
        self.n, self.m = n, m

    def describe(self):
        return f"nm({self.n}, {self.m})"

    def _check_extent(self, extent: int) -> None:
        if extent != self.m:
            raise PackError(
                f"nm({self.n}, {self.m}) must store a coordinate of extent {self.m} "
                f"(write 'j % {self.m}: nm({self.n}, {self.m})'), but its extent is {extent}"
            )

    def pack(self, state):
        self._check_extent(state.extent)
        return super().pack(state)

    def validate(self, state):
        self._check_extent(state.extent)
        return super().validate(state)

    def too_many(self, count):
        return f"{count} nonzeros in a group of {self.m}, but nm({self.n}, {self.m}) keeps at most {self.n}"


class Fixed(Slotted):
    """Constant fan-in (ELL): exactly ``w`` coordinates per parent."""

    name = "fixed"

    def describe(self):
        return f"fixed({self.slots})"

    def too_many(self, count):
        return f"{count} nonzeros, but fixed({self.slots}) stores at most {self.slots}"


LEVEL_TYPES = {
    "dense": Dense,
    "compressed": Compressed,
    "singleton": Singleton,
    "nm": NM,
    "fixed": Fixed,
}
