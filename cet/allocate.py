"""Bit allocation: one bit width per layer, chosen exactly as a multiple-choice knapsack.

Given a cost table c_l(b) (the predicted loss change of layer l at b bits), the allocation minimises
sum_l c_l(b_l) subject to a weight-compression target, using one binary variable per (layer, bit width)
and ``scipy.optimize.milp`` (HiGHS).
"""

from __future__ import annotations

import numbers
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy.optimize import Bounds, LinearConstraint, milp

from .quantize import MAX_BITS, MIN_BITS

__all__ = ["Allocation", "InfeasibleTargetError", "allocate_bits", "compression_ratio", "reachable_ratios"]

FLOAT_BITS = 32
_MAX_SOLVES = 5


class InfeasibleTargetError(ValueError):
    """Raised when no allocation over the given bit widths can reach the requested target."""


@dataclass
class Allocation:
    """The chosen bit width of every layer, with its predicted cost and compression ratio."""

    bit_widths: list[int]
    predicted_cost: float
    weight_compression_ratio: float


def compression_ratio(sizes: Sequence[int], bit_widths: Sequence[int]) -> float:
    """Return R = 32 sum n_l / sum n_l b_l, the weight-compression ratio against float32."""
    sizes = np.asarray(sizes, dtype=np.float64)
    return FLOAT_BITS * sizes.sum() / float(np.dot(sizes, np.asarray(bit_widths, dtype=np.float64)))


def reachable_ratios(bit_widths: Sequence[int]) -> tuple[float, float]:
    """Return the smallest and largest weight-compression ratios reachable with these bit widths."""
    return FLOAT_BITS / max(bit_widths), FLOAT_BITS / min(bit_widths)


def _validate_bit_widths(bit_widths: Sequence[int]) -> list[int]:
    widths = list(bit_widths)
    if not widths:
        raise ValueError("invalid bit widths: the list is empty; pass e.g. [2, 3, 4, 5, 6, 8]")
    for b in widths:
        if isinstance(b, bool) or not isinstance(b, numbers.Integral) or not MIN_BITS <= b <= MAX_BITS:
            raise ValueError(f"invalid bit width {b!r}: each must be an integer from {MIN_BITS} to {MAX_BITS}")
    if len(set(widths)) != len(widths):
        raise ValueError(f"invalid bit widths {widths}: each may appear only once")
    return [int(b) for b in widths]


def allocate_bits(costs: np.ndarray, sizes: Sequence[int], bit_widths: Sequence[int], target_ratio: float) -> Allocation:
    """Choose one bit width per layer minimising the total cost within a weight-compression target.

    Args:
        costs: (L, B) table; costs[l, j] is the predicted loss change of layer l at ``bit_widths[j]``.
            Negative entries are allowed.
        sizes: (L,) number of weights per layer.
        bit_widths: the B candidate bit widths.
        target_ratio: the allocation satisfies sum n_l b_l <= 32 sum n_l / target_ratio.

    Raises:
        InfeasibleTargetError: the target lies outside the reachable range, which the message names.
        ValueError: shapes disagree, or costs are not finite.
        RuntimeError: the solver failed for another reason.
    """
    widths = _validate_bit_widths(bit_widths)
    costs = np.asarray(costs, dtype=np.float64)
    sizes = np.asarray(sizes, dtype=np.float64)
    if sizes.ndim != 1 or len(sizes) == 0:
        raise ValueError(f"invalid layer sizes of shape {sizes.shape}: expected a non-empty 1-D list of weight counts")
    if not np.isfinite(sizes).all() or (sizes < 0).any() or sizes.sum() <= 0:
        raise ValueError(f"invalid layer sizes {sizes.tolist()}: each must be a finite, non-negative weight count, not all zero")
    num_layers = len(sizes)
    if costs.shape != (num_layers, len(widths)):
        raise ValueError(f"cost table of shape {costs.shape} does not match {num_layers} layers by {len(widths)} bit widths")
    if not np.isfinite(costs).all():
        raise ValueError("cost table contains NaN or infinity; check the Hessian analysis of the offending layers")
    low, high = reachable_ratios(widths)
    if not np.isfinite(target_ratio) or target_ratio <= 0:
        raise ValueError(f"invalid target ratio {target_ratio}: must be a positive number")
    budget = FLOAT_BITS * sizes.sum() / target_ratio
    if target_ratio > high * (1 + 1e-12):
        raise InfeasibleTargetError(
            f"target ratio {target_ratio:g}x is not reachable with bit widths {widths}: "
            f"the reachable range is {low:g}x to {high:g}x; lower the target or add smaller bit widths"
        )

    # HiGHS stops at an absolute optimality gap of 1e-6, which scipy does not expose. Subtracting each
    # layer's smallest cost (a constant) and scaling by the largest remaining cost makes that gap
    # relative to the cost range. A second solve, scaled by the first optimum, makes it relative to the
    # optimum itself.
    offsets = costs.min(axis=1, keepdims=True)
    shifted = costs - offsets
    scale = shifted.max() or 1.0
    choice = _solve(shifted / scale, sizes, widths, budget, low, high, target_ratio)
    optimum = float(shifted[np.arange(num_layers), choice].sum())
    if optimum > 0:
        choice = _solve(shifted / optimum, sizes, widths, budget, low, high, target_ratio)

    chosen = [widths[j] for j in choice]
    return Allocation(chosen, float(costs[np.arange(num_layers), choice].sum()), compression_ratio(sizes, chosen))


def _solve(
    objective_table: np.ndarray, sizes: np.ndarray, widths: list[int], budget: float,
    low: float, high: float, target_ratio: float,
) -> np.ndarray:
    """Solve the multiple-choice knapsack with milp; return the chosen column of every layer."""
    num_layers = len(sizes)
    objective = objective_table.ravel()
    one_per_layer = LinearConstraint(np.kron(np.eye(num_layers), np.ones(len(widths))), 1, 1)
    # The size row counts bits, so its activity is an integer. The largest allowed total is the budget
    # rounded down, after absorbing round-off in 32 sum n / R. A bound half a bit above it keeps HiGHS's
    # feasibility tolerance from admitting one bit too many, and a solution over the budget all the
    # same is excluded by tightening the bound and solving again.
    size_row = np.outer(sizes, widths).ravel()[None, :]
    allowed_bits = np.floor(budget * (1 + 1e-12))
    bound = allowed_bits + 0.5
    for _ in range(_MAX_SOLVES):
        within_budget = LinearConstraint(size_row, -np.inf, bound)
        result = milp(objective, constraints=[one_per_layer, within_budget],
                      integrality=np.ones_like(objective), bounds=Bounds(0, 1), options={"mip_rel_gap": 0.0})
        if result.status == 2:
            raise InfeasibleTargetError(
                f"target ratio {target_ratio:g}x is infeasible; the reachable range is {low:g}x to {high:g}x"
            )
        if result.status != 0 or result.x is None:
            raise RuntimeError(f"allocation solver failed: {result.message}")
        choice = result.x.reshape(num_layers, len(widths)).argmax(axis=1)
        bits_used = float(np.dot(sizes, [widths[j] for j in choice]))
        if bits_used <= allowed_bits:
            break
        bound -= bits_used - allowed_bits
    else:
        raise RuntimeError(f"allocation solver kept returning {bits_used:.0f} bits, above the budget of {allowed_bits:.0f}")
    return choice
