"""Magnitude pruning to any format expressed by levels.

The weight is cut into *units*: the blocks that the format stores or drops as a whole (entries for
CSR/COO/ELL, bm x bn blocks for BSR, 4-row column strips for a vector-wise N:M). Units are scored
by their L2 norm. Every slotted level (``nm(n, m)``, ``fixed(w)``) keeps, per parent, the children
with the largest total score; then, if a sparsity is asked for and the format has a compressed level,
the lowest-scoring units of the whole tensor are dropped until the density is ``1 - sparsity``
(per-layer magnitude pruning). A format of only dense and slotted levels has a fixed density: a
sparsity other than the one it gives is refused, never silently ignored.
"""

from __future__ import annotations

import math

import torch

from sparsedsl.errors import PackError
from sparsedsl.frontend.check import SPARSITY_ROUNDING
from sparsedsl.ir import levels as lv
from sparsedsl.ir.formats import Format


def _top(score: torch.Tensor, count: int) -> torch.Tensor:
    """Mask of the ``count`` largest scores (ties broken by position), in linear time."""
    if count <= 0:
        return torch.zeros_like(score, dtype=torch.bool)
    threshold = torch.kthvalue(score, score.numel() - count + 1).values
    keep = score > threshold
    ties = torch.nonzero(score == threshold).flatten()[: count - int(keep.sum())]
    keep[ties] = True
    return keep


def fixed_density(fmt: Format) -> bool:
    """Whether ``fmt``'s levels fix its density (it has no compressed level): ``prune`` then
    accepts no sparsity but the one the format gives."""
    return not any(isinstance(level, lv.Compressed) for level in fmt.levels)


def prune(weight: torch.Tensor, fmt: Format, sparsity: float | None = None) -> torch.Tensor:
    """A copy of ``weight`` with the smallest units zeroed so that it fits ``fmt``."""
    if sparsity is not None and not 0 <= sparsity < 1:
        raise PackError(f"sparsity must be in [0, 1), got {sparsity}")
    w = weight.detach()
    extents = fmt.extents(tuple(w.shape))
    stored = [i for i, lvl in enumerate(fmt.levels) if not isinstance(lvl, lv.Dense)]
    if not stored:
        _check_fixed_density(fmt, w.shape, 1.0, sparsity)
        return w.clone()
    last = stored[-1]
    grids = torch.meshgrid(*[torch.arange(s) for s in w.shape], indexing="ij")
    coords = torch.stack([m.coordinate(grids[m.dim].reshape(-1)) for m in fmt.maps], dim=1)
    # Every combination of unit coordinates occurs in a dense tensor, so the mixed-radix key of a
    # unit is its index: no sorting needed.
    unit_extents = extents[: last + 1]
    inverse = lv.key(coords[:, : last + 1], extents)
    units = math.prod(unit_extents)
    unit_coords = lv.decode(torch.arange(units), unit_extents)
    score = torch.zeros(units, dtype=torch.float64).index_add_(0, inverse, w.reshape(-1).double() ** 2)
    keep = torch.ones(units, dtype=torch.bool)
    for l in stored:
        level = fmt.levels[l]
        if not isinstance(level, lv.Slotted):
            continue
        if level.slots > extents[l]:
            raise PackError(f"{level.describe()} keeps {level.slots} of {extents[l]} coordinates: too few")
        # every parent has all ``extent`` children: keep the ``slots`` best of each
        child = lv.key(unit_coords[:, : l + 1], extents)
        child_score = torch.zeros(math.prod(extents[: l + 1]), dtype=torch.float64)
        child_score.index_add_(0, child, score * keep)
        best = torch.topk(child_score.view(-1, extents[l]), level.slots, dim=1).indices
        kept = torch.zeros(child_score.numel() // extents[l], extents[l], dtype=torch.bool)
        kept.scatter_(1, best, True)
        keep &= kept.view(-1)[child]
    if fixed_density(fmt):
        _check_fixed_density(fmt, w.shape, int(keep.sum()) / units, sparsity)
    elif sparsity is not None:
        budget = math.ceil((1 - sparsity) * units)
        if int(keep.sum()) > budget:
            keep = _top(torch.where(keep, score, -1.0), budget)
    mask = keep[inverse].reshape(w.shape)
    return w * mask


def _check_fixed_density(fmt: Format, shape: torch.Size, density: float, sparsity: float | None) -> None:
    """Refuse a sparsity that a format without compressed levels cannot give."""
    if sparsity is not None and abs(1 - sparsity - density) > SPARSITY_ROUNDING:
        dims = " x ".join(map(str, shape))
        raise PackError(
            f"{fmt.label} stores a fixed density of {density:.3g} (sparsity {1 - density:.3g}) for a {dims} "
            f"weight: sparsity {sparsity} cannot be reached (ask for {1 - density:.3g}, or none, or use a "
            "format with a compressed level)"
        )
