"""One-shot pruning to any format expressed by levels: by magnitude, Wanda or SparseGPT.

The weight is cut into *units*: the blocks that the format stores or drops as a whole (entries for
CSR/COO/ELL, bm x bn blocks for BSR, 4-row column strips for a vector-wise N:M). Each entry has a
score and a unit scores the sum of its entries'. Every slotted level (``nm(n, m)``, ``fixed(w)``)
keeps, per parent, the children with the largest total score; then, if a sparsity is asked for and
the format has a compressed level, the lowest-scoring units of the whole tensor are dropped until
the density is ``1 - sparsity`` (per layer). A format of only dense and slotted levels has a fixed
density: a sparsity other than the one it gives is refused, never silently ignored.

The methods differ in the entry score and in what happens to the weights kept:

- ``magnitude``: ``W_ij^2`` (a unit scores its squared L2 norm); the kept weights are unchanged.
- ``wanda`` (Sun et al. 2023): ``(|W_ij| * ||x_j||)^2``, with ``x_j`` the layer's ``j``-th input
  feature over a sample of its inputs; the kept weights are unchanged.
- ``sparsegpt`` (Frantar & Alistarh 2023): from the inputs' Hessian ``H = X^T X`` (damped by 1% of
  its mean diagonal), the columns are swept in blocks of ``SWEEP_BLOCK``: at the start of each
  block the pattern of its columns is chosen from the scores ``W_ij^2 / [H^-1]_jj^2`` of the weights
  as updated so far (the columns before it keep the pattern chosen for them, the budget is the
  layer's), then each pruned weight's error is spread over the columns after it (the OBS update),
  through the Cholesky factor of ``H^-1``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from sparsedsl.errors import PackError
from sparsedsl.frontend.check import PRUNE_METHODS, SPARSITY_ROUNDING
from sparsedsl.ir import levels as lv
from sparsedsl.ir.formats import Format

SWEEP_BLOCK = 128  # columns whose pattern SparseGPT chooses at once
DAMPING = 0.01  # SparseGPT's damping of H: this fraction of its mean diagonal


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


def needs_inputs(method: str) -> bool:
    """Whether pruning ``method`` needs a sample of the layer's inputs (its calibration); False
    for a name that is no method, which ``prune`` refuses."""
    return PRUNE_METHODS.get(method, False)


@dataclass
class Gram:
    """``X^T X`` of a layer's inputs ``X`` (float64), summed over the tokens seen so far."""

    xtx: torch.Tensor

    @classmethod
    def empty(cls, features: int) -> Gram:
        """No tokens yet, for inputs of ``features`` features."""
        return cls(torch.zeros(features, features, dtype=torch.float64))

    def add(self, inputs: torch.Tensor) -> None:
        """Account for ``inputs``, ``[..., features]``."""
        x = inputs.detach().reshape(-1, inputs.shape[-1]).to(torch.float64)
        self.xtx.addmm_(x.T, x)


class _Units:
    """How ``fmt`` cuts a weight of ``shape`` into units, and the pattern of the best ones."""

    def __init__(self, fmt: Format, shape: torch.Size) -> None:
        self.fmt, self.shape = fmt, shape
        self.extents = fmt.extents(tuple(shape))
        self.stored = [i for i, lvl in enumerate(fmt.levels) if not isinstance(lvl, lv.Dense)]
        if not self.stored:
            return
        last = self.stored[-1]
        grids = torch.meshgrid(*[torch.arange(s) for s in shape], indexing="ij")
        coords = torch.stack([m.coordinate(grids[m.dim].reshape(-1)) for m in fmt.maps], dim=1)
        # Every combination of unit coordinates occurs in a dense tensor, so the mixed-radix key of a
        # unit is its index: no sorting needed.
        unit_extents = self.extents[: last + 1]
        self.inverse = lv.key(coords[:, : last + 1], self.extents)
        self.count = math.prod(unit_extents)
        self.unit_coords = lv.decode(torch.arange(self.count), unit_extents)

    def mask(self, score: torch.Tensor, sparsity: float | None) -> torch.Tensor:
        """Which entries to keep, from each entry's ``score`` (non-negative, of the weight's shape)."""
        if not self.stored:
            _check_fixed_density(self.fmt, self.shape, 1.0, sparsity)
            return torch.ones(self.shape, dtype=torch.bool)
        extents = self.extents
        unit_score = torch.zeros(self.count, dtype=torch.float64).index_add_(
            0, self.inverse, score.reshape(-1).double()
        )
        keep = torch.ones(self.count, dtype=torch.bool)
        for l in self.stored:
            level = self.fmt.levels[l]
            if not isinstance(level, lv.Slotted):
                continue
            if level.slots > extents[l]:
                raise PackError(f"{level.describe()} keeps {level.slots} of {extents[l]} coordinates: too few")
            # every parent has all ``extent`` children: keep the ``slots`` best of each
            child = lv.key(self.unit_coords[:, : l + 1], extents)
            child_score = torch.zeros(math.prod(extents[: l + 1]), dtype=torch.float64)
            child_score.index_add_(0, child, unit_score * keep)
            best = torch.topk(child_score.view(-1, extents[l]), level.slots, dim=1).indices
            kept = torch.zeros(child_score.numel() // extents[l], extents[l], dtype=torch.bool)
            kept.scatter_(1, best, True)
            keep &= kept.view(-1)[child]
        if fixed_density(self.fmt):
            _check_fixed_density(self.fmt, self.shape, int(keep.sum()) / self.count, sparsity)
        elif sparsity is not None:
            budget = math.ceil((1 - sparsity) * self.count)
            if int(keep.sum()) > budget:
                keep = _top(torch.where(keep, unit_score, -1.0), budget)
        return keep[self.inverse].reshape(self.shape)


def prune(
    weight: torch.Tensor,
    fmt: Format,
    sparsity: float | None = None,
    *,
    method: str = "magnitude",
    inputs: torch.Tensor | Gram | None = None,
) -> torch.Tensor:
    """A copy of ``weight`` pruned by ``method`` so that it fits ``fmt``.

    ``inputs`` is a sample of the layer's inputs, ``[tokens, K]`` (or their ``Gram``), required by
    ``wanda`` and ``sparsegpt``; ``magnitude`` does not use it."""
    if method not in PRUNE_METHODS:
        raise PackError(f"unknown pruning method '{method}' (known: {', '.join(PRUNE_METHODS)})")
    if sparsity is not None and not 0 <= sparsity < 1:
        raise PackError(f"sparsity must be in [0, 1), got {sparsity}")
    w = weight.detach()
    units = _Units(fmt, w.shape)
    if not needs_inputs(method):
        return w * units.mask(w.double() ** 2, sparsity)
    gram = _gram(method, w, inputs)
    if method == "wanda":
        return w * units.mask(w.double() ** 2 * gram.xtx.diagonal(), sparsity)
    return _sparsegpt(w, units, sparsity, gram.xtx)


def _gram(method: str, weight: torch.Tensor, inputs: torch.Tensor | Gram | None) -> Gram:
    """The ``Gram`` of ``inputs``, refused unless they are a sample of this layer's inputs."""
    if inputs is None:
        raise PackError(f"pruning by {method} needs inputs=: a [tokens, K] sample of the layer's inputs")
    if weight.dim() != 2:
        raise PackError(f"pruning by {method} takes a 2-d weight [N, K], got {weight.dim()}-d")
    features = weight.shape[1]
    if isinstance(inputs, Gram):
        gram = inputs
    elif not isinstance(inputs, torch.Tensor) or inputs.dim() < 1 or inputs.shape[-1] != features:
        got = list(inputs.shape) if isinstance(inputs, torch.Tensor) else type(inputs).__name__
        raise PackError(f"inputs must be [tokens, {features}] (the weight is {list(weight.shape)}), got {got}")
    elif inputs.numel() == 0:
        raise PackError(f"pruning by {method} needs inputs of at least one token, got {list(inputs.shape)}")
    else:
        gram = Gram.empty(features)
        gram.add(inputs)
    if gram.xtx.shape != (features, features):
        raise PackError(f"inputs have {gram.xtx.shape[0]} features, the weight takes {features}")
    return gram


def _sparsegpt(weight: torch.Tensor, units: _Units, sparsity: float | None, xtx: torch.Tensor) -> torch.Tensor:
    """SparseGPT's sweep: pattern per block of columns, OBS update of the weights kept."""
    w = weight.to(torch.float64).clone()
    h = xtx.clone()
    dead = h.diagonal() == 0
    h[dead, dead] = 1
    w[:, dead] = 0
    h.diagonal().add_(DAMPING * float(h.diagonal().mean()))
    hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)
    d2 = hinv.diagonal() ** 2
    forced = torch.tensor(torch.finfo(torch.float64).max / (w.numel() + 1), dtype=torch.float64)  # none outranks it
    columns = w.shape[1]
    mask = torch.ones_like(w, dtype=torch.bool)
    for c0 in range(0, columns, SWEEP_BLOCK):
        c1 = min(c0 + SWEEP_BLOCK, columns)
        score = w**2 / d2
        score[:, :c0] = torch.where(mask[:, :c0], forced, torch.zeros((), dtype=torch.float64))
        mask = units.mask(score, sparsity)
        block, hblock = w[:, c0:c1], hinv[c0:c1, c0:c1]
        err = torch.zeros_like(block)
        for i in range(c1 - c0):
            col = block[:, i]
            err[:, i] = col * ~mask[:, c0 + i] / hblock[i, i]
            block[:, i:] -= err[:, i : i + 1] * hblock[i : i + 1, i:]
        w[:, c1:] -= err @ hinv[c0:c1, c1:]
    return (w * mask).to(weight.dtype)


def _check_fixed_density(fmt: Format, shape: torch.Size, density: float, sparsity: float | None) -> None:
    """Refuse a sparsity that a format without compressed levels cannot give."""
    if sparsity is not None and abs(1 - sparsity - density) > SPARSITY_ROUNDING:
        dims = " x ".join(map(str, shape))
        raise PackError(
            f"{fmt.label} stores a fixed density of {density:.3g} (sparsity {1 - density:.3g}) for a {dims} "
            f"weight: sparsity {sparsity} cannot be reached (ask for {1 - density:.3g}, or none, or use a "
            "format with a compressed level)"
        )
