"""Bit allocation: one bit width per layer, chosen exactly as a multiple-choice knapsack.

Given a cost table c_l(b) (the predicted loss change of layer l at b bits), the allocation either
minimises sum_l c_l(b_l) subject to a weight-compression target, or minimises the total bits
sum_l n_l b_l subject to sum_l c_l(b_l) <= a tolerance. Both use one binary variable per
(layer, bit width) and ``scipy.optimize.milp`` (HiGHS).
"""

from __future__ import annotations

import contextlib
import ctypes
import numbers
import os
import sys
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np
from scipy.optimize import Bounds, LinearConstraint, milp

from .quantize import MAX_BITS, MIN_BITS

__all__ = ["Allocation", "InfeasibleTargetError", "allocate_bits", "compression_ratio", "reachable_ratios"]

FLOAT_BITS = 32
_MAX_SOLVES = 5
_MAX_TOLERANCE_SOLVES = 20


# One discarding block at a time: two threads swapping file descriptor 1 could restore each other's null device.
_STDOUT_LOCK = threading.Lock()


@contextlib.contextmanager
def _native_stdout_discarded() -> Iterator[None]:
    """Discard what native code writes to file descriptor 1 (the process's standard output) inside the block.

    The HiGHS build in SciPy 1.17.1 (HiGHS 1.12.0) prints a debug line,
    "HighsMipSolverData::transformNewIntegerFeasibleSolution tmpSolver.run();", to the C standard output
    during some solves, even with disp=False (the default). Blocks in several threads run one at a time.
    """
    # NOTE: while a block runs, anything another thread writes to file descriptor 1 is discarded too.
    with _STDOUT_LOCK:
        with contextlib.suppress(AttributeError, ValueError, OSError):
            sys.stdout.flush()
        _flush_c_streams()
        saved = _open_or_none(lambda: os.dup(1))
        devnull = _open_or_none(lambda: os.open(os.devnull, os.O_WRONLY)) if saved is not None else None
        if devnull is None:
            if saved is not None:
                os.close(saved)
            # Without a copy of file descriptor 1 or a null device, the solver's output is left alone.
            yield
            return
        try:
            os.dup2(devnull, 1)
            yield
        finally:
            _flush_c_streams()
            os.dup2(saved, 1)
            os.close(saved)
            os.close(devnull)


def _open_or_none(open_descriptor: Callable[[], int]) -> int | None:
    """Return the file descriptor that ``open_descriptor`` opens, or None when that raises OSError."""
    try:
        return open_descriptor()
    except OSError:
        return None


def _flush_c_streams() -> None:
    """Flush the C library's output buffers, so that the solver's buffered text is written before fd 1 changes."""
    try:
        libc = ctypes.CDLL(None)
        libc.fflush(None)
    except (OSError, AttributeError, TypeError):
        # NOTE: on Windows CDLL(None) raises TypeError, so buffered solver text may appear after the block.
        pass


class InfeasibleTargetError(ValueError):
    """Raised when no allocation over the given bit widths can reach the requested target."""


@dataclass
class Allocation:
    """The chosen bit width of every layer, with its predicted cost and compression ratio."""

    bit_widths: list[int]
    predicted_cost: float
    weight_compression_ratio: float


def compression_ratio(sizes: Sequence[int], bit_widths: Sequence[int]) -> float:
    """Return R = 32 sum n_l / sum n_l b_l, the weight-compression ratio against float32.

    Raises:
        ValueError: the two lists differ in length, or the layers have no weights to quantize.
    """
    sizes = np.asarray(sizes, dtype=np.float64).reshape(-1)
    widths = np.asarray(bit_widths, dtype=np.float64).reshape(-1)
    if len(sizes) != len(widths):
        raise ValueError(f"got {len(sizes)} layer sizes but {len(widths)} bit widths; pass one bit width per layer")
    quantized_bits = float(np.dot(sizes, widths))
    if not quantized_bits > 0:
        raise ValueError(
            f"the layers have no weights to quantize (sizes {sizes.tolist()}, bit widths {widths.tolist()})"
        )
    return float(FLOAT_BITS * sizes.sum() / quantized_bits)


def reachable_ratios(bit_widths: Sequence[int]) -> tuple[float, float]:
    """Return the smallest and largest weight-compression ratios reachable with these bit widths."""
    widths = _validate_bit_widths(bit_widths)
    return FLOAT_BITS / max(widths), FLOAT_BITS / min(widths)


def _validate_bit_widths(bit_widths: Sequence[int]) -> list[int]:
    if isinstance(bit_widths, (set, frozenset)):
        # The cost table's columns follow the order of the bit widths, which a set does not keep.
        raise TypeError(
            f"invalid bit widths {set(bit_widths)}: a set has no order, but the columns of the cost table follow "
            f"the order of the bit widths; pass a list such as {sorted(bit_widths)}"
        )
    widths = list(bit_widths)
    if not widths:
        raise ValueError("invalid bit widths: the list is empty; pass e.g. [2, 3, 4, 5, 6, 8]")
    for b in widths:
        if isinstance(b, bool) or not isinstance(b, numbers.Integral) or not MIN_BITS <= b <= MAX_BITS:
            raise ValueError(f"invalid bit width {b!r}: each must be an integer from {MIN_BITS} to {MAX_BITS}")
    if len(set(widths)) != len(widths):
        raise ValueError(f"invalid bit widths {widths}: each may appear only once")
    return [int(b) for b in widths]


def allocate_bits(
    costs: np.ndarray, sizes: Sequence[int], bit_widths: Sequence[int], target_ratio: float | None = None,
    *, tolerance: float | None = None,
) -> Allocation:
    """Choose one bit width per layer, either for a compression target or for a predicted-cost tolerance.

    With ``target_ratio`` the allocation minimises the total predicted cost within the compression target.
    With ``tolerance`` it minimises the total number of weight bits sum n_l b_l subject to a total
    predicted cost of at most ``tolerance``, and takes the cheapest among allocations of that size.
    ``tolerance=0`` selects the smallest model predicted to be no worse than the float32 one.

    Args:
        costs: (L, B) table; costs[l, j] is the predicted loss change of layer l at ``bit_widths[j]``.
            Negative entries are allowed.
        sizes: (L,) number of weights per layer.
        bit_widths: the B candidate bit widths.
        target_ratio: the allocation satisfies sum n_l b_l <= 32 sum n_l / target_ratio.
        tolerance: the allocation satisfies sum_l costs[l, j_l] <= tolerance, evaluated in float64 exactly
            as ``Allocation.predicted_cost`` reports it. Pass exactly one of the two targets.

    Raises:
        InfeasibleTargetError: the target lies outside the reachable range, which the message names.
        ValueError: both targets or neither are given, a target is not a finite number, shapes disagree,
            sizes are not whole numbers, or costs are complex, not finite or so large that their sums overflow.
        TypeError: ``bit_widths`` is a set, whose order need not match the table's columns.
        RuntimeError: the solver failed for another reason.
    """
    if (target_ratio is None) == (tolerance is None):
        raise ValueError(
            "pass exactly one of target_ratio (a compression target) and tolerance (a predicted-cost limit); "
            f"got target_ratio={target_ratio!r}, tolerance={tolerance!r}"
        )
    widths = _validate_bit_widths(bit_widths)
    if np.iscomplexobj(costs):
        raise ValueError("cost table is complex; pass the real predicted loss changes")
    costs = np.asarray(costs, dtype=np.float64)
    sizes = np.asarray(sizes, dtype=np.float64)
    if sizes.ndim != 1 or len(sizes) == 0:
        raise ValueError(f"invalid layer sizes of shape {sizes.shape}: expected a non-empty 1-D list of weight counts")
    if not np.isfinite(sizes).all() or (sizes < 0).any() or sizes.sum() <= 0 or (sizes != np.round(sizes)).any():
        raise ValueError(
            f"invalid layer sizes {sizes.tolist()}: each must be a non-negative whole number of weights, not all zero"
        )
    num_layers = len(sizes)
    if costs.shape != (num_layers, len(widths)):
        raise ValueError(f"cost table of shape {costs.shape} does not match {num_layers} layers by {len(widths)} bit widths")
    if not np.isfinite(costs).all():
        raise ValueError("cost table contains NaN or infinity; check the Hessian analysis of the offending layers")
    # The solver set-up subtracts each layer's smallest cost from its row and sums costs over layers.
    with np.errstate(over="ignore"):
        overflows = not np.isfinite(2 * np.abs(costs).max(axis=1).sum())
    if overflows:
        raise ValueError(
            "cost table entries are so large that their sums overflow float64; divide the costs by a common scale"
        )

    if tolerance is not None:
        choice = _smallest_within_tolerance(costs, sizes, widths, tolerance)
    else:
        choice = _cheapest_within_ratio(costs, sizes, widths, target_ratio)
    chosen = [widths[j] for j in choice]
    return Allocation(chosen, _total_cost(costs, choice), compression_ratio(sizes, chosen))


def _total_cost(costs: np.ndarray, choice: np.ndarray) -> float:
    """Return the predicted cost of ``choice``; the tolerance check and the reported cost both use this sum."""
    return float(costs[np.arange(len(costs)), choice].sum())


def _cheapest_within_ratio(costs: np.ndarray, sizes: np.ndarray, widths: list[int], target_ratio: float) -> np.ndarray:
    """Return the column of every layer that minimises the total cost within the compression target."""
    low, high = reachable_ratios(widths)
    if (isinstance(target_ratio, bool) or not isinstance(target_ratio, numbers.Real) or not np.isfinite(target_ratio)
            or target_ratio <= 0):
        raise ValueError(f"invalid target ratio {target_ratio!r}: must be a finite positive number, such as 8.0")
    budget = FLOAT_BITS * sizes.sum() / target_ratio
    if target_ratio > high * (1 + 1e-12):
        raise InfeasibleTargetError(
            f"target ratio {target_ratio:g}x is not reachable with bit widths {widths}: "
            f"the reachable range is {low:g}x to {high:g}x; lower the target or add smaller bit widths"
        )
    infeasible_message = f"target ratio {target_ratio:g}x is infeasible; the reachable range is {low:g}x to {high:g}x"
    return _cheapest_within_budget(costs, sizes, widths, np.floor(budget * (1 + 1e-12)), infeasible_message)


def _cheapest_within_budget(
    costs: np.ndarray, sizes: np.ndarray, widths: list[int], allowed_bits: float, infeasible_message: str,
) -> np.ndarray:
    """Return the column of every layer that minimises the total cost using at most ``allowed_bits`` bits."""
    num_layers = len(sizes)
    # HiGHS stops at an absolute optimality gap of 1e-6, which scipy does not expose. Subtracting each
    # layer's smallest cost (a constant) and scaling by the largest remaining cost makes that gap
    # relative to the cost range. A second solve, scaled by the first optimum, makes it relative to the
    # optimum itself.
    offsets = costs.min(axis=1, keepdims=True)
    shifted = costs - offsets
    scale = shifted.max() or 1.0
    choice = _solve(shifted / scale, sizes, widths, allowed_bits, infeasible_message)
    optimum = float(shifted[np.arange(num_layers), choice].sum())
    if optimum > 0:
        choice = _solve(shifted / optimum, sizes, widths, allowed_bits, infeasible_message)
    return choice


def _solve(
    objective_table: np.ndarray, sizes: np.ndarray, widths: list[int], allowed_bits: float, infeasible_message: str,
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
    bound = allowed_bits + 0.5
    for _ in range(_MAX_SOLVES):
        within_budget = LinearConstraint(size_row, -np.inf, bound)
        with _native_stdout_discarded():
            result = milp(objective, constraints=[one_per_layer, within_budget],
                          integrality=np.ones_like(objective), bounds=Bounds(0, 1), options={"mip_rel_gap": 0.0})
        if result.status == 2:
            raise InfeasibleTargetError(infeasible_message)
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


def _smallest_within_tolerance(costs: np.ndarray, sizes: np.ndarray, widths: list[int], tolerance: float) -> np.ndarray:
    """Return the column of every layer with the fewest total bits whose total cost is at most ``tolerance``.

    Among allocations of that size the cheapest is returned.
    """
    if isinstance(tolerance, bool) or not isinstance(tolerance, numbers.Real) or not np.isfinite(tolerance):
        raise ValueError(f"invalid tolerance {tolerance!r}: must be a finite number, the largest allowed predicted cost")
    num_layers = len(sizes)
    cheapest = costs.argmin(axis=1)
    minimum_cost = _total_cost(costs, cheapest)
    if minimum_cost > tolerance:
        narrowest_cost = _total_cost(costs, np.full(num_layers, int(np.argmin(widths))))
        raise InfeasibleTargetError(
            f"tolerance {tolerance:g} is not reachable with bit widths {widths}: the predicted cost ranges from "
            f"{minimum_cost:g} (the cheapest width of every layer) to {narrowest_cost:g} (the narrowest width "
            f"everywhere); raise the tolerance to at least {minimum_cost:g} or add wider bit widths"
        )

    choice = _fewest_bits_within_tolerance(costs, sizes, widths, tolerance)
    # The first solve only minimises the size. Minimising the cost at that size picks the cheapest of
    # equal-sized allocations. If the solver's optimality gap puts that result above the tolerance, the
    # first choice is kept.
    allowed_bits = float(np.dot(sizes, [widths[j] for j in choice]))
    try:
        cheaper = _cheapest_within_budget(costs, sizes, widths, allowed_bits, "no allocation fits the size just found")
    except InfeasibleTargetError:
        return choice
    if _total_cost(costs, cheaper) <= min(tolerance, _total_cost(costs, choice)):
        return cheaper
    return choice


def _fewest_bits_within_tolerance(costs: np.ndarray, sizes: np.ndarray, widths: list[int], tolerance: float) -> np.ndarray:
    """Solve min sum n_l b_l subject to total cost <= tolerance with milp; return the chosen columns.

    The caller has checked that the cheapest width of every layer meets the tolerance, so a solution exists.
    """
    num_layers = len(sizes)
    variables = num_layers * len(widths)
    # The objective counts bits, so its values are integers and HiGHS's absolute gap of 1e-6 cannot
    # hide a smaller allocation.
    objective = np.outer(sizes, widths).ravel()
    one_per_layer = LinearConstraint(np.kron(np.eye(num_layers), np.ones(len(widths))), 1, 1)
    # HiGHS accepts a MIP solution that violates a constraint by up to its mip_feasibility_tolerance,
    # an absolute 1e-6 by default. Subtracting each layer's smallest cost and scaling by the largest
    # remaining cost puts the cost row on a scale of 1, so that slack is small relative to the costs.
    # A solution whose float64 total still exceeds the tolerance is then excluded by a cut that forbids
    # exactly that combination, and the problem is solved again. The cuts never exclude the cheapest
    # allocation, which meets the tolerance, so a solution remains.
    offsets = costs.min(axis=1)
    shifted = costs - offsets[:, None]
    scale = shifted.max() or 1.0
    cost_row = LinearConstraint((shifted / scale).ravel()[None, :], -np.inf, (tolerance - offsets.sum()) / scale)
    cuts = []
    for _ in range(_MAX_TOLERANCE_SOLVES):
        constraints = [one_per_layer, cost_row]
        if cuts:
            constraints.append(LinearConstraint(np.array(cuts), -np.inf, num_layers - 1))
        with _native_stdout_discarded():
            result = milp(objective, constraints=constraints, integrality=np.ones(variables), bounds=Bounds(0, 1),
                          options={"mip_rel_gap": 0.0})
        if result.status != 0 or result.x is None:
            raise RuntimeError(f"allocation solver failed: {result.message}")
        choice = result.x.reshape(num_layers, len(widths)).argmax(axis=1)
        if _total_cost(costs, choice) <= tolerance:
            return choice
        cut = np.zeros(variables)
        cut[np.arange(num_layers) * len(widths) + choice] = 1.0
        cuts.append(cut)
    raise RuntimeError(
        f"allocation solver kept returning allocations whose predicted cost exceeds the tolerance {tolerance:g}, "
        f"after {_MAX_TOLERANCE_SOLVES} solves"
    )
