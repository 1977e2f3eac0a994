"""Spreading the bit budget over the decoder linears by measured sensitivity.

`--gqsa w4s50` means 3.00 bits per weight on average over the decoder linears (6 bits per kept
weight x the kept fraction, docs/FORMAT.md; `w3s40` too, at 5 bits x 60 %); with `--allocation sensitivity` (the default) each
tensor may keep a different number of groups per row, chosen so that the tensors whose pruning
hurts most keep more. `--allocation uniform` keeps the paper's layout: every row of every tensor
keeps `format.kept_groups(width, sparsity)` groups.

In:  for every decoder linear a `TensorCurve`: its shape and the error measured when only that
     tensor is compressed to a few keep levels (`levels`, fractions of its groups; the error is the
     mean squared change of its decoder block's output on probe windows — oneshot.probe_block);
     the target sparsity.
Out: `allocate(curves, sparsity)` -> {name: n_kept}, whose kept groups sum(rows x n_kept) are
     never more than (1 - sparsity) of all the groups (`budget_bits`), and fewer by less than the
     cheapest single-group step of any tensor (one group in each row of the smallest tensor; the
     mean bits per weight is the spec's to well within 0.01 on real shapes).

How: the error of a tensor between measured levels is interpolated linearly in log(error); for a
Lagrange multiplier lam every tensor independently takes the n_kept minimising
error(n_kept) + lam x bits(n_kept); lam is bisected to the largest spend within the budget, and
what is left is filled greedily one group-column at a time where it buys the largest error drop
per bit. Each error is taken relative to the residual stream's mean square after its block
(`TensorCurve.energy`): the stream grows about tenfold from the first block to the last, and
absolute errors would hand nearly the whole budget to the last blocks (measured on SmolLM2-135M,
docs/quality.md: one-shot perplexity 5,898 with absolute errors, 767 with relative ones, 3,779
uniform).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from . import format as fmt
from .errors import GQSAError

__all__ = ["LEVELS", "AllocationError", "TensorCurve", "allocate", "budget_bits", "mean_bits", "uniform_bits"]

# keep fractions at which each tensor's error is measured (1.0 = dense 4-bit)
LEVELS = (0.25, 0.375, 0.5, 0.625, 0.75, 1.0)


class AllocationError(GQSAError, ValueError):
    """The curves are inconsistent or the budget cannot be met."""


@dataclass(frozen=True)
class TensorCurve:
    name: str
    rows: int
    width: int
    kept: tuple[int, ...]        # n_kept at each measured level, increasing
    errors: tuple[float, ...]    # error at each, same order
    energy: float = 1.0          # the mean square of what the error is measured against

    @property
    def groups(self) -> int:
        return self.width // fmt.GROUP_SIZE

    def error_at(self, n_kept: np.ndarray) -> np.ndarray:
        """Interpolated error (linear in log error between measured points; flat outside)."""
        xs = np.asarray(self.kept, dtype=np.float64)
        ys = np.log(np.maximum(np.asarray(self.errors, dtype=np.float64), 1e-30))
        return np.exp(np.interp(np.asarray(n_kept, dtype=np.float64), xs, ys))


def kept_step(width: int) -> int:
    """Granularity of the kept count: multiples of 8 groups for tensors of 128 groups or more
    (width >= 2048, the 1B-70B shapes), where the repacked AVX2 decode layout needs
    n_kept % 8 == 0 and one group per row is a negligible share of the budget; 1 below that."""
    return 8 if width // fmt.GROUP_SIZE >= 128 else 1


def level_kept(width: int, levels=LEVELS) -> tuple[int, ...]:
    """Distinct n_kept values of the keep fractions `levels` for a tensor of this width."""
    g = width // fmt.GROUP_SIZE
    return tuple(sorted({min(g, max(1, round(f * g))) for f in levels}))


def budget_bits(shapes: dict[str, tuple[int, int]], sparsity: float, bits: int = fmt.BITS) -> int:
    """Bits of the spec's budget: (1 - sparsity) of all the groups of the decoder linears, in blocks
    of the `bits`-bit type, rounded down to a whole group (so `--gqsa w4s50` and `w3s40` are 3.00
    bits per weight on any shape). The uniform layout rounds each row's kept count instead
    (`uniform_bits`), which can land above it: SmolLM2's 36-group rows keep 22 groups at w3s40,
    3.047 bits per weight."""
    unit = fmt.gqsa_type(bits).block_bytes * 8
    groups = sum(rows * (width // fmt.GROUP_SIZE) for rows, width in shapes.values())
    return unit * math.floor(groups * (1.0 - sparsity) + 1e-9)


def uniform_bits(shapes: dict[str, tuple[int, int]], sparsity: float, bits: int = fmt.BITS) -> int:
    """Bits of the uniform layout: every row keeps format.kept_groups(width, sparsity) groups of the
    `bits`-bit type (`--allocation uniform`, the paper's layout)."""
    unit = fmt.gqsa_type(bits).block_bytes * 8
    return sum(rows * fmt.kept_groups(width, sparsity) * unit for rows, width in shapes.values())


def mean_bits(shapes: dict[str, tuple[int, int]], kept: dict[str, int], bits: int = fmt.BITS) -> float:
    """Mean bits per logical weight of a layout {name: n_kept} of the `bits`-bit type."""
    unit = fmt.gqsa_type(bits).block_bytes * 8
    bits = sum(shapes[n][0] * k * unit for n, k in kept.items())
    return bits / sum(rows * width for rows, width in shapes.values())


def allocate(curves: list[TensorCurve], sparsity: float) -> dict[str, int]:
    """{name: n_kept} minimising the summed interpolated error within the spec's budget
    (`budget_bits`; the costs are in groups, so the code width does not change the choice)."""
    if not curves:
        raise AllocationError("no tensors to allocate")
    shapes = {c.name: (c.rows, c.width) for c in curves}
    budget = budget_bits(shapes, sparsity)
    unit = fmt.BLOCK_BYTES * 8
    lo_k = [min(c.kept) for c in curves]
    # per tensor: every n_kept from its smallest measured level to dense (in steps of `kept_step`),
    # error and cost of each
    ks = []
    for lo, c in zip(lo_k, curves):
        step = kept_step(c.width)
        k = np.arange(lo, c.groups + 1)
        ks.append(k[(k % step == 0) | (k == c.groups)])
    errs = [c.error_at(k) / c.energy for c, k in zip(curves, ks)]
    costs = [c.rows * k * unit for c, k in zip(curves, ks)]
    floor = sum(int(cost[0]) for cost in costs)
    if budget < floor <= uniform_bits(shapes, sparsity):
        # the smallest measured levels are the uniform layout's rounded counts (w4s75 on rows of an
        # odd number of 4-group quarters): every tensor at its floor, as the uniform layout would spend
        budget = floor
    if floor > budget:
        raise AllocationError(f"the smallest measured keep levels already need {floor} bits, more than the "
                              f"budget {budget} of sparsity {sparsity}")
    scale = max(float(e.max()) for e in errs) or 1.0

    def pick(lam: float) -> list[int]:
        return [int(np.argmin(e / scale + lam * cost / budget)) for e, cost in zip(errs, costs)]

    def spend(choice) -> int:
        return sum(int(cost[i]) for cost, i in zip(costs, choice))

    lo, hi = 0.0, 1.0
    while spend(pick(hi)) > budget:
        hi *= 2.0
        if hi > 1e30:
            raise AllocationError("could not meet the bit budget")
    for _ in range(100):
        mid = 0.5 * (lo + hi)
        if spend(pick(mid)) > budget:
            lo = mid
        else:
            hi = mid
    choice = pick(hi)
    left = budget - spend(choice)
    # fill what is left one group per row at a time, best error drop per bit first
    while True:
        best, best_gain = -1, 0.0
        for t, (e, cost, i) in enumerate(zip(errs, costs, choice)):
            if i + 1 < len(e):
                step = int(cost[i + 1] - cost[i])
                gain = (e[i] - e[i + 1]) / step
                if step <= left and gain > best_gain:
                    best, best_gain = t, gain
        if best < 0:
            break
        left -= int(costs[best][choice[best] + 1] - costs[best][choice[best]])
        choice[best] += 1
    out = {c.name: int(k[i]) for c, k, i in zip(curves, ks, choice)}
    if not math.isfinite(mean_bits(shapes, out)):
        raise AllocationError("allocation produced a non-finite mean")
    return out
