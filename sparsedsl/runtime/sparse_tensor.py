"""SparseTensor: a tensor stored in a format's level buffers.

Buffers that come from outside the packer (the constructor, ``from_structure``, a module's
``load_state_dict``) are validated against the format (``Format.validate``) before any kernel can
read them. A validated set of buffers is remembered by a *stamp* kept on its values tensor (an
attribute, so it lives and dies with the tensor): the format, the shape, and the identity and
in-place version counter (``Tensor._version``) of every index buffer. Every kernel call compares
the stamp (a few attribute reads) and validates again if an index buffer was replaced or written in
place, so a kernel never reads through an index that was not checked.
"""

from __future__ import annotations

import operator
import weakref
from dataclasses import InitVar, dataclass

import torch

from sparsedsl.errors import PackError
from sparsedsl.ir.formats import Format

STAMP = "_sparsedsl_validated"  # the attribute of a values tensor holding its buffers' stamp

KERNEL_INTEGERS = (torch.int8, torch.uint8, torch.int32)  # the integer types of kernel outputs


def _forgotten() -> None:
    return None


class Transient(tuple):
    """A tuple kept on a tensor for this process only (a validation stamp, a cache): pickled,
    ``torch.save``d or deep-copied with the tensor, it becomes None, so the copy is checked again.
    Its weak references and compiled objects could not be pickled: ``torch.save(model)`` failed
    once a model had run."""

    __slots__ = ()

    def __reduce__(self):
        return _forgotten, ()


def stamp(fmt: Format, shape: tuple[int, ...], buffers: dict[str, torch.Tensor]) -> tuple:
    """What identifies a structure: the format, the shape, the values' length, dtype and device
    if ``buffers`` hold values (not the values themselves: they do not decide where a kernel
    reads), and each index buffer's identity and in-place version."""
    entries = tuple((k, weakref.ref(v), v._version) for k, v in buffers.items() if k != "vals")
    return fmt.text, tuple(shape), _values_key(buffers), entries


def unchanged(old: tuple | None, fmt: Format, shape: tuple[int, ...], buffers: dict[str, torch.Tensor]) -> bool:
    """Whether ``buffers`` are the very index buffers ``old`` was taken of, unwritten since, with
    values of the same length, dtype and device (a module's ``.half()`` converts them in place)."""
    if old is None:
        return False
    text, old_shape, values, entries = old
    if text != fmt.text or old_shape != shape or values != _values_key(buffers):
        return False
    if len(entries) != len(buffers) - (values is not None):
        return False
    for key, ref, version in entries:
        buffer = buffers.get(key)
        if buffer is not ref() or buffer._version != version:
            return False
    return True


def _values_key(buffers: dict[str, torch.Tensor]) -> tuple | None:
    values = buffers.get("vals")
    return None if values is None else (values.shape, values.dtype, values.is_cpu)


@dataclass
class SparseTensor:
    """The buffers of a tensor in ``format`` (keys ``{level}_{suffix}`` and ``vals``).

    ``validate=False`` vouches for the buffers (the packer's output, a copy of validated buffers):
    they are trusted until replaced or written in place, and checked again then."""

    format: Format
    shape: tuple[int, ...]
    buffers: dict[str, torch.Tensor]
    validate: InitVar[bool] = True

    def __post_init__(self, validate: bool) -> None:
        if not isinstance(self.format, Format):
            what = type(self.format).__name__
            raise PackError(f"a SparseTensor's format is a Format (prog.format('CSR')), got {what}")
        try:
            self.shape = tuple(operator.index(s) for s in self.shape)
        except TypeError:
            raise PackError(f"a shape is a tuple of integer sizes, got {self.shape!r}") from None
        if not isinstance(self.buffers, dict):
            raise PackError(f"buffers are a dict of tensors, got {type(self.buffers).__name__}")
        self.buffers = dict(self.buffers)
        if validate:
            self.check()
        else:
            self._mark()

    def check(self) -> None:
        """Validate the buffers unless they are the ones validated last and unchanged since (O(1));
        a structure that does not fit the format is a PackError. Every kernel call runs this."""
        if unchanged(getattr(self.buffers.get("vals"), STAMP, None), self.format, self.shape, self.buffers):
            return
        try:
            self.buffers = self.format.validate(self.buffers, self.shape)
        except PackError as err:
            raise PackError(f"a {self.shape} tensor as {self.format.label}: {err.message}") from None
        self._mark()

    def _mark(self) -> None:
        """Stamp the buffers as checked (``stamp``), on the values tensor. Index buffers made under
        ``torch.inference_mode`` count no in-place writes: they are copied into tensors that do."""
        untracked = [k for k, v in self.buffers.items() if k != "vals" and v.is_inference()]
        if untracked:
            with torch.inference_mode(False):
                self.buffers = {**self.buffers, **{k: self.buffers[k].clone() for k in untracked}}
        setattr(self.values, STAMP, Transient(stamp(self.format, self.shape, self.buffers)))

    @classmethod
    def pack(cls, fmt: Format, dense: torch.Tensor) -> SparseTensor:
        """Store a dense tensor in ``fmt``; a tensor that does not fit is a PackError."""
        if not isinstance(dense, torch.Tensor):
            raise PackError(f"pack expects a torch.Tensor, got {type(dense).__name__}")
        try:
            buffers = fmt.pack(dense.detach())
        except PackError as err:
            raise PackError(f"cannot store the {tuple(dense.shape)} tensor as {fmt.label}: {err.message}") from None
        return cls(fmt, tuple(dense.shape), buffers, validate=False)

    @classmethod
    def from_structure(
        cls,
        fmt: Format,
        shape: tuple[int, ...],
        structure: list[torch.Tensor],
        values: torch.Tensor,
        validate: bool = True,
    ) -> SparseTensor:
        """Inverse of ``structure()``: index buffers in format order, plus values; validated
        unless ``validate=False`` (see the class)."""
        keys = fmt.buffer_keys()
        if not isinstance(structure, list | tuple) or len(structure) != len(keys):
            got = f"{len(structure)}" if isinstance(structure, list | tuple) else f"a {type(structure).__name__}"
            raise PackError(f"{fmt.label} has {len(keys)} index buffers ({', '.join(keys) or 'none'}), got {got}")
        return cls(fmt, shape, {**dict(zip(keys, structure)), "vals": values}, validate)

    def structure(self) -> list[torch.Tensor]:
        """The index buffers, in the format's order (what a custom op or module stores)."""
        return [self.buffers[k] for k in self.format.buffer_keys()]

    @property
    def values(self) -> torch.Tensor:
        return self.buffers["vals"]

    @property
    def dtype(self) -> torch.dtype:
        return self.values.dtype

    @property
    def nnz(self) -> int:
        """Stored entries (explicit zeros of padded levels included)."""
        return self.values.numel()

    @property
    def density(self) -> float:
        numel = 1
        for s in self.shape:
            numel *= s
        return self.nnz / max(numel, 1)

    def with_values(self, values: torch.Tensor) -> SparseTensor:
        """The same structure holding other values (the output of a pattern kernel): one per
        stored position, 1-d, contiguous, floating point or an integer type a kernel computes
        (int8, uint8, int32), on this tensor's device."""
        numeric = isinstance(values, torch.Tensor) and (values.is_floating_point() or values.dtype in KERNEL_INTEGERS)
        if not numeric:
            what = values.dtype if isinstance(values, torch.Tensor) else type(values).__name__
            raise PackError(f"values must be a floating-point or int8, uint8, int32 tensor, got {what}")
        if values.shape != self.values.shape or not values.is_contiguous() or values.device != self.device:
            raise PackError(
                f"values must be a contiguous tensor of shape {tuple(self.values.shape)} on {self.device}, "
                f"got shape {tuple(values.shape)} on {values.device}" + ("" if values.is_contiguous() else ", strided")
            )
        self.check()
        return SparseTensor(self.format, self.shape, {**self.buffers, "vals": values}, validate=False)

    def to_dense(self) -> torch.Tensor:
        """The dense tensor (unpacked on the CPU, returned on this tensor's device)."""
        dense = self.format.unpack({k: v.cpu() for k, v in self.buffers.items()}, self.shape)
        return dense.to(self.device)

    @property
    def device(self) -> torch.device:
        return self.values.device

    def to(self, target: torch.dtype | torch.device | str) -> SparseTensor:
        """Values in another dtype, or every buffer on another device (``"cuda"``)."""
        if isinstance(target, torch.dtype):
            return self.with_values(self.values.to(target))
        self.check()
        return SparseTensor(self.format, self.shape, {k: v.to(target) for k, v in self.buffers.items()}, validate=False)

    def cuda(self) -> SparseTensor:
        return self.to("cuda")

    def cpu(self) -> SparseTensor:
        return self.to("cpu")

    def __repr__(self) -> str:
        return f"SparseTensor({self.format.label}, shape={self.shape}, nnz={self.nnz}, density={self.density:.3f})"
