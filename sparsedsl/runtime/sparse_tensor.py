"""SparseTensor: a tensor stored in a format's level buffers."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from sparsedsl.errors import PackError
from sparsedsl.ir.formats import Format


@dataclass
class SparseTensor:
    """The buffers of a tensor in ``format`` (keys ``{level}_{suffix}`` and ``vals``)."""

    format: Format
    shape: tuple[int, ...]
    buffers: dict[str, torch.Tensor]

    @classmethod
    def pack(cls, fmt: Format, dense: torch.Tensor) -> SparseTensor:
        """Store a dense tensor in ``fmt``; a tensor that does not fit is a PackError."""
        if not isinstance(dense, torch.Tensor):
            raise PackError(f"pack expects a torch.Tensor, got {type(dense).__name__}")
        try:
            buffers = fmt.pack(dense.detach())
        except PackError as err:
            raise PackError(f"cannot store the {tuple(dense.shape)} tensor as {fmt.label}: {err.message}") from None
        return cls(fmt, tuple(dense.shape), buffers)

    @classmethod
    def from_structure(
        cls, fmt: Format, shape: tuple[int, ...], structure: list[torch.Tensor], values: torch.Tensor
    ) -> SparseTensor:
        """Inverse of ``structure()``: index buffers in format order, plus values."""
        return cls(fmt, tuple(shape), {**dict(zip(fmt.buffer_keys(), structure, strict=True)), "vals": values})

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
        """The same structure holding other values (the output of a pattern kernel)."""
        return SparseTensor(self.format, self.shape, {**self.buffers, "vals": values})

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
        return SparseTensor(self.format, self.shape, {k: v.to(target) for k, v in self.buffers.items()})

    def cuda(self) -> SparseTensor:
        return self.to("cuda")

    def cpu(self) -> SparseTensor:
        return self.to("cpu")

    def __repr__(self) -> str:
        return f"SparseTensor({self.format.label}, shape={self.shape}, nnz={self.nnz}, density={self.density:.3f})"
