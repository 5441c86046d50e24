"""Tests of cet.allocate against brute-force enumeration of every bit-width combination."""

import concurrent.futures
import ctypes
import itertools
import os
import subprocess
import sys
import time

import numpy as np
import pytest
import scipy.optimize

import cet.allocate as allocate_module
from cet.allocate import InfeasibleTargetError, allocate_bits, compression_ratio, reachable_ratios

BIT_WIDTHS = [2, 4, 8]


def random_instance(seed, negative):
    """Return (costs, sizes) for 4 layers and 3 bit widths, with costs that decrease as bits grow."""
    rng = np.random.default_rng(seed)
    sizes = rng.integers(10, 5000, size=4)
    steps = rng.uniform(0.01, 10.0, size=(4, 3))
    costs = np.cumsum(steps[:, ::-1], axis=1)[:, ::-1]
    if negative:
        costs = costs - rng.uniform(0.0, 15.0, size=(4, 1))
    return costs, sizes


def brute_force(costs, sizes, bit_widths, target_ratio):
    """Return the minimum total cost over all combinations that meet the target."""
    best = np.inf
    for choice in itertools.product(range(len(bit_widths)), repeat=len(sizes)):
        chosen = [bit_widths[j] for j in choice]
        if compression_ratio(sizes, chosen) >= target_ratio * (1 - 1e-12):
            best = min(best, sum(costs[layer, j] for layer, j in enumerate(choice)))
    return best


@pytest.mark.parametrize("negative", [False, True])
@pytest.mark.parametrize("seed", range(10))
def test_allocation_matches_brute_force(seed, negative):
    costs, sizes = random_instance(seed, negative)
    low, high = reachable_ratios(BIT_WIDTHS)
    target = np.random.default_rng(seed + 1000).uniform(low, high)

    allocation = allocate_bits(costs, sizes, BIT_WIDTHS, target)

    assert allocation.weight_compression_ratio >= target * (1 - 1e-9)
    assert allocation.predicted_cost == pytest.approx(brute_force(costs, sizes, BIT_WIDTHS, target), rel=1e-9, abs=1e-12)


@pytest.mark.parametrize("seed", range(5))
def test_allocation_fields_consistent(seed):
    costs, sizes = random_instance(seed, negative=True)

    allocation = allocate_bits(costs, sizes, BIT_WIDTHS, 7.0)

    chosen_columns = [BIT_WIDTHS.index(b) for b in allocation.bit_widths]
    assert allocation.predicted_cost == pytest.approx(sum(costs[layer, j] for layer, j in enumerate(chosen_columns)), rel=1e-12)
    assert allocation.weight_compression_ratio == pytest.approx(compression_ratio(sizes, allocation.bit_widths), rel=1e-12)


def test_cost_scale_does_not_change_choice():
    costs, sizes = random_instance(3, negative=False)

    small = allocate_bits(costs * 1e-9, sizes, BIT_WIDTHS, 8.0)
    large = allocate_bits(costs * 1e9, sizes, BIT_WIDTHS, 8.0)

    assert small.bit_widths == large.bit_widths


def test_low_target_picks_cheapest():
    # Below the reachable range every combination meets the target, so each layer takes its cheapest width.
    costs = np.array([[1.0, 2.0, 3.0], [3.0, 0.5, 1.0]])

    allocation = allocate_bits(costs, [10, 20], BIT_WIDTHS, 1.0)

    assert allocation.bit_widths == [2, 4]


def test_target_at_maximum_is_feasible():
    costs, sizes = random_instance(4, negative=False)

    allocation = allocate_bits(costs, sizes, BIT_WIDTHS, 32 / min(BIT_WIDTHS))

    assert allocation.bit_widths == [2, 2, 2, 2]


def test_target_above_maximum_raises():
    costs, sizes = random_instance(5, negative=False)

    with pytest.raises(InfeasibleTargetError) as raised:
        allocate_bits(costs, sizes, BIT_WIDTHS, 20.0)

    message = str(raised.value)
    assert "20x" in message
    assert "4x to 16x" in message


def test_infeasible_error_is_value_error():
    assert issubclass(InfeasibleTargetError, ValueError)

def test_one_bit_over_budget_excluded():
    # With two layers of about 1e7 weights, the cheapest choice (2, 4) with cost 5 needs one bit more
    # than the budget, so the optimum is (4, 2) with cost 6.
    n = 10_000_000
    sizes = [n, n + 1]
    costs = np.array([[5.0, 0.0], [6.0, 0.0]])
    budget_bits = 6 * n + 3
    target = 32 * (2 * n + 1) / budget_bits

    allocation = allocate_bits(costs, sizes, [2, 4], target)

    assert allocation.bit_widths == [4, 2]


@pytest.mark.parametrize("bit_widths", [[], [2, 2, 4], [1, 4], [4, 40], [2.5, 4], [True, 4], [0, 4]])
def test_invalid_bit_widths_raise(bit_widths):
    costs = np.zeros((2, len(bit_widths)))
    with pytest.raises(ValueError, match="invalid bit width"):
        allocate_bits(costs, [10, 20], bit_widths, 4.0)


def test_set_of_bit_widths_rejected():
    # A set's iteration order need not follow the cost table's columns ({2, 4, 8} iterates as 8, 2, 4).
    costs = np.array([[0.0, 1.0, 2.0]])

    with pytest.raises(TypeError, match="a set has no order"):
        allocate_bits(costs, [10], {2, 4, 8}, 4.0)


def test_numpy_integer_bit_widths_accepted():
    allocation = allocate_bits(np.zeros((1, 2)), [10], np.array([2, 8]), 16.0)

    assert allocation.bit_widths == [2]
    assert type(allocation.bit_widths[0]) is int


@pytest.mark.parametrize("shape", [(3, 3), (2, 2), (2, 3, 1), (6,)])
def test_cost_table_wrong_shape_raises(shape):
    with pytest.raises(ValueError, match="does not match"):
        allocate_bits(np.zeros(shape), [10, 20], BIT_WIDTHS, 4.0)


@pytest.mark.parametrize("bad_value", [np.nan, np.inf, -np.inf])
def test_nonfinite_costs_raise(bad_value):
    costs = np.zeros((2, 3))
    costs[1, 2] = bad_value
    with pytest.raises(ValueError, match="NaN or infinity"):
        allocate_bits(costs, [10, 20], BIT_WIDTHS, 4.0)


@pytest.mark.parametrize("target", [0.0, -2.0, np.nan, np.inf, "8", [8.0], 8 + 0j, True])
def test_invalid_target_raises(target):
    with pytest.raises(ValueError, match="invalid target ratio"):
        allocate_bits(np.zeros((2, 3)), [10, 20], BIT_WIDTHS, target)


def test_complex_costs_raise():
    # Converting to float64 would drop the imaginary parts with only a warning.
    costs = np.zeros((2, 3), dtype=complex)
    costs[0, 1] = 1j

    with pytest.raises(ValueError, match="complex"):
        allocate_bits(costs, [10, 20], BIT_WIDTHS, 4.0)


@pytest.mark.parametrize("tolerance", [None, 1.0])
def test_cost_range_overflow_raises(tolerance):
    # Each entry is finite, but differences and sums of them overflow float64 inside the solver set-up.
    costs = np.array([[1e308, 0.0, -1e308], [1e308, 1e308, 1e308]])
    target = 4.0 if tolerance is None else None

    with pytest.raises(ValueError, match="overflow"):
        allocate_bits(costs, [10, 20], BIT_WIDTHS, target, tolerance=tolerance)


@pytest.mark.parametrize("sizes", [[1.5, 20], [10, 20.25]])
def test_fractional_sizes_raise(sizes):
    with pytest.raises(ValueError, match="invalid layer sizes"):
        allocate_bits(np.zeros((2, 3)), sizes, BIT_WIDTHS, 4.0)


def test_compression_ratio_hand_example():
    # 32 * (100 + 300) / (100 * 8 + 300 * 4) = 12800 / 2000
    assert compression_ratio([100, 300], [8, 4]) == 6.4


def test_compression_ratio_uniform():
    assert compression_ratio([7, 11, 13], [4, 4, 4]) == 8.0


def test_reachable_ratios_hand_example():
    assert reachable_ratios([2, 4, 8]) == (4.0, 16.0)
    assert reachable_ratios([8, 3, 5]) == (4.0, 32 / 3)


def test_compression_ratio_length_mismatch_raises():
    with pytest.raises(ValueError, match="3 layer sizes but 2 bit widths"):
        compression_ratio([100, 200, 300], [8, 4])


def test_compression_ratio_without_weights_raises():
    with pytest.raises(ValueError, match="no weights"):
        compression_ratio([0, 0], [8, 4])


@pytest.mark.parametrize("bit_widths", [[], [0, 4], [4, 40]])
def test_reachable_ratios_invalid_bits_raise(bit_widths):
    with pytest.raises(ValueError, match="invalid bit width"):
        reachable_ratios(bit_widths)


def test_wide_cost_range_matches_brute_force():
    # Costs over five decades: a solver gap relative to the largest cost would pick a worse allocation.
    generator = np.random.default_rng(11)
    for _ in range(20):
        num_layers = 6
        widths = [2, 4, 8]
        sizes = generator.integers(1_000, 3_000_000, num_layers)
        magnitude = 10.0 ** generator.uniform(-6, -1, num_layers)
        costs = magnitude[:, None] * np.array([1.0, 0.05, 0.001])[None, :] * generator.uniform(0.5, 2.0, (num_layers, 3))
        target = float(generator.uniform(5.0, 14.0))

        allocation = allocate_bits(costs, sizes, widths, target)

        budget = 32 * sizes.sum() / target
        best = min(
            sum(costs[l, j] for l, j in enumerate(choice))
            for choice in itertools.product(range(3), repeat=num_layers)
            if sum(sizes[l] * widths[j] for l, j in enumerate(choice)) <= budget
        )
        assert allocation.predicted_cost == pytest.approx(best, rel=1e-9, abs=0)


def brute_force_tolerance(costs, sizes, bit_widths, tolerance):
    """Return (total bits, total cost) of the smallest allocation within the tolerance, cheapest among equals."""
    best = None
    for choice in itertools.product(range(len(bit_widths)), repeat=len(sizes)):
        cost = float(costs[np.arange(len(sizes)), list(choice)].sum())
        if cost <= tolerance:
            key = (sum(sizes[layer] * bit_widths[j] for layer, j in enumerate(choice)), cost)
            best = key if best is None or key < best else best
    return best


def total_bits(sizes, bit_widths):
    return int(np.dot(sizes, bit_widths))


@pytest.mark.parametrize("negative", [False, True])
@pytest.mark.parametrize("seed", range(10))
def test_tolerance_matches_brute_force(seed, negative):
    costs, sizes = random_instance(seed, negative)
    low = costs.min(axis=1).sum()
    high = costs[:, 0].sum()
    tolerance = float(np.random.default_rng(seed + 2000).uniform(low, high))

    allocation = allocate_bits(costs, sizes, BIT_WIDTHS, tolerance=tolerance)

    expected_bits, expected_cost = brute_force_tolerance(costs, sizes, BIT_WIDTHS, tolerance)
    assert allocation.predicted_cost <= tolerance
    assert total_bits(sizes, allocation.bit_widths) == expected_bits
    assert allocation.predicted_cost == pytest.approx(expected_cost, rel=1e-9, abs=1e-12)


@pytest.mark.parametrize("seed", range(10))
def test_tolerance_at_allocation_cost(seed):
    # A tolerance equal to the cost of some allocation leaves that allocation exactly on the boundary.
    costs, sizes = random_instance(seed, negative=True)
    rng = np.random.default_rng(seed + 3000)
    choice = rng.integers(0, len(BIT_WIDTHS), size=len(sizes))
    tolerance = float(costs[np.arange(len(sizes)), choice].sum())

    allocation = allocate_bits(costs, sizes, BIT_WIDTHS, tolerance=tolerance)

    expected_bits, expected_cost = brute_force_tolerance(costs, sizes, BIT_WIDTHS, tolerance)
    assert allocation.predicted_cost <= tolerance
    assert total_bits(sizes, allocation.bit_widths) == expected_bits
    assert total_bits(sizes, allocation.bit_widths) <= total_bits(sizes, [BIT_WIDTHS[j] for j in choice])
    assert allocation.predicted_cost == pytest.approx(expected_cost, rel=1e-9, abs=1e-12)


def test_tolerance_wide_cost_range_matches_brute_force():
    generator = np.random.default_rng(12)
    for _ in range(10):
        num_layers = 6
        widths = [2, 4, 8]
        sizes = generator.integers(1_000, 3_000_000, num_layers)
        magnitude = 10.0 ** generator.uniform(-6, -1, num_layers)
        costs = magnitude[:, None] * np.array([1.0, 0.05, 0.001])[None, :] * generator.uniform(0.5, 2.0, (num_layers, 3))
        tolerance = float(costs[:, 2].sum() * 10.0 ** generator.uniform(0, 3))

        allocation = allocate_bits(costs, sizes, widths, tolerance=tolerance)

        expected_bits, expected_cost = brute_force_tolerance(costs, sizes, widths, tolerance)
        assert allocation.predicted_cost <= tolerance
        assert total_bits(sizes, allocation.bit_widths) == expected_bits
        assert allocation.predicted_cost == pytest.approx(expected_cost, rel=1e-9, abs=0)


def test_tolerance_prefers_cheaper_of_equal_sizes():
    # (2, 4) and (4, 2) both use 60 bits; (4, 2) costs less.
    costs = np.array([[1.0, 0.5, 0.0], [0.2, 0.1, 0.0]])

    allocation = allocate_bits(costs, [10, 10], BIT_WIDTHS, tolerance=1.0)

    assert allocation.bit_widths == [4, 2]
    assert allocation.predicted_cost == 0.7


def test_tolerance_zero_with_negative_costs():
    costs, sizes = random_instance(7, negative=True)
    # Shift every layer equally so the all-widest allocation is predicted to lower the loss by 1.
    costs = costs - (costs[:, 2].sum() + 1.0) / len(sizes)

    allocation = allocate_bits(costs, sizes, BIT_WIDTHS, tolerance=0)

    expected_bits, expected_cost = brute_force_tolerance(costs, sizes, BIT_WIDTHS, 0.0)
    assert allocation.predicted_cost <= 0
    assert total_bits(sizes, allocation.bit_widths) == expected_bits
    assert allocation.predicted_cost == pytest.approx(expected_cost, rel=1e-9, abs=1e-12)


def test_tolerance_zero_reached_exactly():
    # Only the widest width is predicted to cost nothing, so e = 0 forces it in every layer.
    costs = np.array([[3.0, 1.0, 0.0], [2.0, 0.5, 0.0], [4.0, 0.1, 0.0]])

    allocation = allocate_bits(costs, [100, 200, 300], BIT_WIDTHS, tolerance=0.0)

    assert allocation.bit_widths == [8, 8, 8]
    assert allocation.predicted_cost == 0.0


def test_tolerance_above_narrowest_cost_picks_narrowest():
    costs, sizes = random_instance(2, negative=False)

    allocation = allocate_bits(costs, sizes, BIT_WIDTHS, tolerance=float(costs[:, 0].sum()))

    assert allocation.bit_widths == [2, 2, 2, 2]


def test_tolerance_infeasible_names_range():
    costs = np.array([[3.0, 1.0, 0.5], [2.0, 0.5, 0.25]])

    with pytest.raises(InfeasibleTargetError) as raised:
        allocate_bits(costs, [10, 20], BIT_WIDTHS, tolerance=0.0)

    message = str(raised.value)
    assert "tolerance 0 is not reachable" in message
    assert "from 0.75" in message
    assert "to 5 " in message
    assert "raise the tolerance to at least 0.75" in message


@pytest.mark.parametrize("tolerance", [np.nan, np.inf, -np.inf, "0.1", True])
def test_invalid_tolerance_raises(tolerance):
    with pytest.raises(ValueError, match="invalid tolerance"):
        allocate_bits(np.zeros((2, 3)), [10, 20], BIT_WIDTHS, tolerance=tolerance)


def test_both_targets_raise():
    with pytest.raises(ValueError, match="exactly one of target_ratio"):
        allocate_bits(np.zeros((2, 3)), [10, 20], BIT_WIDTHS, 4.0, tolerance=0.0)


def test_neither_target_raises():
    with pytest.raises(ValueError, match="exactly one of target_ratio"):
        allocate_bits(np.zeros((2, 3)), [10, 20], BIT_WIDTHS)


def test_target_ratio_by_keyword():
    costs, sizes = random_instance(1, negative=True)

    assert allocate_bits(costs, sizes, BIT_WIDTHS, target_ratio=7.0) == allocate_bits(costs, sizes, BIT_WIDTHS, 7.0)


def test_tolerance_violation_resolved(monkeypatch):
    # The first solve is made to return the all-narrowest allocation, which is over the tolerance, as a
    # solver within its feasibility tolerance could. The allocation must exclude it and solve again.
    import cet.allocate

    costs, sizes = random_instance(4, negative=False)
    tolerance = float(costs[:, 1].sum())
    real_milp = cet.allocate.milp
    calls = []

    def first_answer_over_tolerance(objective, **kwargs):
        result = real_milp(objective, **kwargs)
        if not calls:
            narrowest = np.zeros((len(sizes), len(BIT_WIDTHS)))
            narrowest[:, 0] = 1.0
            result.x = narrowest.ravel()
        calls.append(len(kwargs["constraints"]))
        return result

    monkeypatch.setattr(cet.allocate, "milp", first_answer_over_tolerance)

    allocation = allocate_bits(costs, sizes, BIT_WIDTHS, tolerance=tolerance)

    expected_bits, expected_cost = brute_force_tolerance(costs, sizes, BIT_WIDTHS, tolerance)
    assert calls[1] == calls[0] + 1, "the second solve should carry one cut"
    assert allocation.predicted_cost <= tolerance
    assert total_bits(sizes, allocation.bit_widths) == expected_bits
    assert allocation.predicted_cost == pytest.approx(expected_cost, rel=1e-9, abs=1e-12)


# A 37-layer table on which HiGHS (SciPy 1.17.1) prints its debug line at the 8.5x target.
_NOISY_SOLVES = """
import numpy as np
from cet.allocate import allocate_bits
rng = np.random.default_rng(0)
bits = [2, 3, 4, 5, 6, 8]
sizes = rng.integers(500, 2_400_000, 37).tolist()
costs = rng.lognormal(0, 3, (37, 1)) * 4.0 ** -np.array(bits)[None, :] * 1e4 + rng.normal(0, 1e-3, (37, 6))
for ratio in (8.0, 8.5, 9.0):
    allocate_bits(costs, sizes, bits, ratio)
    print("solved", ratio)
allocate_bits(costs, sizes, bits, tolerance=float(costs[:, 2].sum()))
print("solved tolerance")
"""


def noisy_milp(*args, **kwargs):
    """Call scipy's milp after writing to file descriptor 1 directly and through C's buffered stdout."""
    os.write(1, b"unbuffered native line\n")
    libc = ctypes.CDLL(None)
    libc.printf(b"buffered native line\n")
    return scipy.optimize.milp(*args, **kwargs)


@pytest.mark.skipif(sys.platform == "win32", reason="the C library's printf is reached through CDLL(None)")
def test_native_solver_output_discarded(monkeypatch, capfd):
    monkeypatch.setattr(allocate_module, "milp", noisy_milp)
    costs, sizes = random_instance(0, negative=False)
    print("before", flush=True)
    allocate_bits(costs, sizes, BIT_WIDTHS, 3.0)
    allocate_bits(costs, sizes, BIT_WIDTHS, tolerance=float(costs[:, 1].sum()))
    print("after", flush=True)
    assert capfd.readouterr().out == "before\nafter\n"


@pytest.mark.skipif(sys.platform == "win32", reason="the C library's printf is reached through CDLL(None)")
def test_solver_output_restored_after_threads(monkeypatch, capfd):
    def slow_noisy_milp(*args, **kwargs):
        time.sleep(0.01)  # lets the other threads reach the solver while this one is inside it
        return noisy_milp(*args, **kwargs)

    monkeypatch.setattr(allocate_module, "milp", slow_noisy_milp)
    costs, sizes = random_instance(1, negative=False)
    standard_output = os.fstat(1)
    with concurrent.futures.ThreadPoolExecutor(max_workers=3) as pool:
        list(pool.map(lambda _: allocate_bits(costs, sizes, BIT_WIDTHS, 3.0), range(15)))
    after = os.fstat(1)
    assert (after.st_dev, after.st_ino) == (standard_output.st_dev, standard_output.st_ino)
    print("still visible", flush=True)
    assert capfd.readouterr().out == "still visible\n"


def test_solver_output_stays_silent():
    # The real solver prints its line with SciPy 1.17.1 (HiGHS 1.12.0). Where it prints nothing this test
    # passes trivially, and the tests above, with a stand-in solver, still check the mechanism.
    result = subprocess.run([sys.executable, "-c", _NOISY_SOLVES], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "Highs" not in result.stdout
    assert result.stdout.splitlines() == ["solved 8.0", "solved 8.5", "solved 9.0", "solved tolerance"]
