"""The names the compiler gives its own buffers, in one place: lowering and the GPU passes build
them here, and the checker (``frontend/check.py``) refuses tensor names that would collide."""

from __future__ import annotations

ACC = "acc"  # the accumulator; a GPU scatter's float32 sum of a 16-bit output
ACC_SHARED = "acc_s"  # tensor cores: the accumulator tiles spilled to shared memory
DIRECT = "direct"  # tensor cores: whether an activation tile loads straight from memory
ROW_SUM = "acc_r"  # a row-wise kernel's sum over the rows into one output column of a token tile
ROW_OUT = "acc_o"  # those columns, [other output dim, tile], written out blocked
RESERVED = (ACC, ACC_SHARED, DIRECT, ROW_SUM, ROW_OUT)

TILE_COPY, SHARED_COPY, FRAGMENT, VALUES, BATCH_COPY = "_t", "_s", "_frag", "_vals", "_b"
DERIVED = (TILE_COPY, SHARED_COPY, FRAGMENT, VALUES, BATCH_COPY)  # suffixes of buffers derived from a tensor


def tile_copy(tensor: str) -> str:
    """A tensor's token-tile copy (a CPU kernel's staged input, its output tile)."""
    return tensor + TILE_COPY


def batch_copy(tensor: str) -> str:
    """A batched kernel's compact copy of one batch element's slice of a strided input."""
    return tensor + BATCH_COPY


def shared_copy(tensor: str) -> str:
    """A tensor's copy in a CUDA block's shared memory."""
    return tensor + SHARED_COPY


def fragment(tensor: str) -> str:
    """A tensor's tensor-core fragment."""
    return tensor + FRAGMENT


def stored_values(tensor: str) -> str:
    """A sparse tensor's stored values."""
    return tensor + VALUES
