"""Magnitude pruning to any format expressed by levels.

The weight is cut into *units*: the blocks that the format stores or drops as a whole (entries for
CSR/COO/ELL, bm x bn blocks for BSR, 4-row column strips for a vector-wise N:M). Units are scored
by their L2 norm. Every slotted level (``nm(n, m)``, ``fixed(w)``) keeps, per parent, the children
with the largest total score; then, if a sparsity is asked for and the format has a compressed level,
the lowest-scoring units of the whole tensor are dropped until the density is ``1 - sparsity``
(per-layer magnitude pruning). A format of only dense and slotted levels has a fixed density.
"""

from __future__ import annotations

import math

import torch

from sparsedsl.errors import PackError
from sparsedsl.ir import levels as lv
from sparsedsl.ir.formats import Format


def _rank_in_group(group: torch.Tensor, score: torch.Tensor) -> torch.Tensor:
    """Rank (0 = best) of each item among the items of its group, by descending score."""
    order = torch.argsort(score, descending=True, stable=True)
    order = order[torch.argsort(group[order], stable=True)]
    sorted_groups = group[order]
    first = torch.searchsorted(sorted_groups, sorted_groups)  # first position of each group
    rank = torch.empty_like(order)
    rank[order] = torch.arange(order.numel()) - first
    return rank


def prune(weight: torch.Tensor, fmt: Format, sparsity: float | None = None) -> torch.Tensor:
    """A copy of ``weight`` with the smallest units zeroed so that it fits ``fmt``."""
    if sparsity is not None and not 0 <= sparsity < 1:
        raise PackError(f"sparsity must be in [0, 1), got {sparsity}")
    w = weight.detach()
    extents = fmt.extents(tuple(w.shape))
    stored = [i for i, lvl in enumerate(fmt.levels) if not isinstance(lvl, lv.Dense)]
    if not stored:
        return w.clone()
    last = stored[-1]
    grids = torch.meshgrid(*[torch.arange(s) for s in w.shape], indexing="ij")
    coords = torch.stack([m.coordinate(grids[m.dim].reshape(-1)) for m in fmt.maps], dim=1)
    _, inverse = torch.unique(lv.key(coords[:, : last + 1], extents), return_inverse=True)
    unit_coords = lv.unique_rows(coords[:, : last + 1], extents)
    units = unit_coords.shape[0]
    score = torch.zeros(units, dtype=torch.float64).index_add_(0, inverse, w.reshape(-1).double() ** 2)
    keep = torch.ones(units, dtype=torch.bool)
    for l in stored:
        level = fmt.levels[l]
        if not isinstance(level, lv.Slotted):
            continue
        parent = lv.key(unit_coords[:, :l], extents)
        child = parent * extents[l] + unit_coords[:, l]
        child_ids, child_of_unit = torch.unique(child, return_inverse=True)
        child_score = torch.zeros(child_ids.numel(), dtype=torch.float64).index_add_(0, child_of_unit, score * keep)
        child_parent = torch.div(child_ids, extents[l], rounding_mode="floor")
        kept_child = _rank_in_group(child_parent, child_score) < level.slots
        keep &= kept_child[child_of_unit]
    if sparsity is not None and any(isinstance(fmt.levels[l], lv.Compressed) for l in stored):
        budget = math.ceil((1 - sparsity) * units)
        if int(keep.sum()) > budget:
            ranked = torch.argsort(torch.where(keep, score, -1.0), descending=True, stable=True)
            keep = torch.zeros(units, dtype=torch.bool)
            keep[ranked[:budget]] = True
    mask = keep[inverse].reshape(w.shape)
    return w * mask
