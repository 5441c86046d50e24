"""Major-axis rounding against round-to-nearest and against brute force on tiny layers."""

import itertools

import pytest
import torch

from cet.geometry import LowRankSurrogate
from cet.quantize import quantize_per_channel
from cet.rounding import major_axis_round, surrogate_loss_change


def _random_surrogate(n, k, generator, rho=0.01, negative=False):
    vectors, _ = torch.linalg.qr(torch.randn(n, k, generator=generator, dtype=torch.float64))
    values = torch.rand(k, generator=generator, dtype=torch.float64) * 10 + 1
    if negative:
        values[-1] = -2.0
    return LowRankSurrogate(values.sort(descending=True).values, vectors.float(), rho)


def _brute_force(weight, bits, surrogate):
    nearest = quantize_per_channel(weight, bits, 0)
    levels = 2 ** (bits - 1) - 1
    low = torch.floor(weight / nearest.scale)
    best = float("inf")
    for choice in itertools.product([0, 1], repeat=weight.numel()):
        codes = (low + torch.tensor(choice, dtype=low.dtype).reshape(weight.shape)).clamp(-levels, levels)
        best = min(best, surrogate_loss_change(surrogate, codes * nearest.scale - weight))
    return best


@pytest.mark.parametrize("seed", range(8))
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_never_worse_than_nearest(seed, bits):
    generator = torch.Generator().manual_seed(seed)
    weight = torch.randn(4, 6, generator=generator)
    surrogate = _random_surrogate(24, 3, generator, negative=seed % 2 == 1)
    gradient = torch.randn(24, generator=generator) * 0.1 if seed % 4 == 0 else None
    result = major_axis_round(weight, bits, 0, surrogate, gradient)
    assert result.surrogate_cost <= result.nearest_surrogate_cost + 1e-12
    assert result.surrogate_cost == pytest.approx(
        surrogate_loss_change(surrogate, result.quantized.dequantize() - weight, gradient), abs=1e-9)


@pytest.mark.parametrize("seed", range(5))
def test_codes_stay_on_neighbours(seed):
    generator = torch.Generator().manual_seed(seed)
    weight = torch.randn(3, 8, generator=generator)
    result = major_axis_round(weight, 3, 0, _random_surrogate(24, 4, generator, rho=1e-4))
    levels = 3
    assert result.quantized.codes.abs().max() <= levels
    assert torch.equal(result.quantized.scale, result.nearest.scale)
    # Each code is one of the weight's two grid neighbours.
    position = weight / result.quantized.scale
    assert ((result.quantized.codes - position).abs() < 1 + 1e-6).all()
    assert ((result.quantized.codes - result.nearest.codes).abs() <= 1).all()
    assert result.moved_weights == int((result.quantized.codes != result.nearest.codes).sum())


@pytest.mark.parametrize("seed", range(6))
def test_separable_surrogate_matches_brute_force(seed):
    # With eigenvectors on coordinate axes the cost separates by weight, so the greedy descent is exact.
    generator = torch.Generator().manual_seed(seed)
    weight = torch.randn(2, 5, generator=generator)
    axes = torch.eye(10)[:, torch.randperm(10, generator=generator)[:3]]
    surrogate = LowRankSurrogate(torch.tensor([9.0, 4.0, 2.0], dtype=torch.float64), axes, 0.05)
    result = major_axis_round(weight, 3, 0, surrogate)
    assert result.surrogate_cost == pytest.approx(_brute_force(weight, 3, surrogate), rel=1e-9, abs=1e-12)


@pytest.mark.parametrize("seed", range(6))
def test_no_single_move_improves(seed):
    generator = torch.Generator().manual_seed(seed)
    weight = torch.randn(2, 6, generator=generator)
    surrogate = _random_surrogate(12, 2, generator)
    result = major_axis_round(weight, 3, 0, surrogate, rtol=0.0)
    codes = result.quantized.codes.reshape(-1)
    scale = result.quantized.scale.expand_as(result.quantized.codes).reshape(-1)
    flat = weight.reshape(-1)
    for i in range(len(codes)):
        position = flat[i] / scale[i]
        other = codes[i] + (1 if position > codes[i] else -1)
        if position == codes[i] or abs(other) > 3:
            continue
        moved = codes.clone()
        moved[i] = other
        cost = surrogate_loss_change(surrogate, moved.reshape(weight.shape) * result.quantized.scale - weight)
        assert cost >= result.surrogate_cost - 1e-9


def test_large_layer_beats_nearest_on_top_axes():
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(64, 32, 3, 3, generator=generator)
    surrogate = _random_surrogate(weight.numel(), 8, generator, rho=1e-6)
    result = major_axis_round(weight, 4, 0, surrogate)
    assert result.moved_weights > 0
    # Nearly all of round-to-nearest's cost lies on the top axes, and the descent removes most of it.
    assert result.surrogate_cost < 0.1 * result.nearest_surrogate_cost


def test_weight_on_grid_never_moves():
    weight = torch.tensor([[1.0, -1.0, 0.0, 0.5]])
    surrogate = LowRankSurrogate(torch.tensor([100.0], dtype=torch.float64), torch.ones(4, 1) / 2, 0.0)
    result = major_axis_round(weight, 2, 0, surrogate)
    # At 2 bits the grid is {-1, 0, 1} times max|w|, so only the weight 0.5 has a second neighbour.
    assert result.quantized.codes[0, :3].tolist() == [1, -1, 0]


def test_wrong_surrogate_size_raises():
    surrogate = LowRankSurrogate(torch.ones(1, dtype=torch.float64), torch.ones(5, 1) / 5 ** 0.5, 0.0)
    with pytest.raises(ValueError, match="surrogate of this layer"):
        major_axis_round(torch.randn(2, 3), 4, 0, surrogate)


def test_eigenvalue_count_mismatch_raises():
    surrogate = LowRankSurrogate(torch.ones(3, dtype=torch.float64), torch.ones(6, 2) / 6 ** 0.5, 0.0)
    with pytest.raises(ValueError, match=r"eigenvalues of shape \(3,\) and eigenvectors of shape \(6, 2\)"):
        major_axis_round(torch.randn(2, 3), 4, 0, surrogate)


def test_wrong_gradient_size_raises():
    surrogate = LowRankSurrogate(torch.ones(1, dtype=torch.float64), torch.ones(6, 1) / 6 ** 0.5, 0.0)
    with pytest.raises(ValueError, match="gradient has 5 entries"):
        major_axis_round(torch.randn(2, 3), 4, 0, surrogate, gradient=torch.zeros(5))


def test_nonfinite_surrogate_raises():
    generator = torch.Generator().manual_seed(0)
    surrogate = _random_surrogate(6, 2, generator)
    surrogate.eigenvalues[0] = float("nan")
    with pytest.raises(ValueError, match="surrogate contains NaN or infinity"):
        major_axis_round(torch.randn(2, 3, generator=generator), 3, 0, surrogate)


def test_nonfinite_gradient_raises():
    generator = torch.Generator().manual_seed(0)
    gradient = torch.zeros(6)
    gradient[4] = float("inf")
    with pytest.raises(ValueError, match="gradient contains NaN or infinity"):
        major_axis_round(torch.randn(2, 3, generator=generator), 3, 0, _random_surrogate(6, 2, generator), gradient)


def test_update_matches_direct_recomputation():
    # The change of q for one weight's step, as the descent prices it, equals q after minus q before.
    generator = torch.Generator().manual_seed(3)
    surrogate = _random_surrogate(20, 3, generator, negative=True)
    gradient = torch.randn(20, generator=generator, dtype=torch.float64)
    error = torch.randn(20, generator=generator, dtype=torch.float64)
    vectors = surrogate.eigenvectors.double()
    shifted = surrogate.eigenvalues.double() - surrogate.rho
    projection = vectors.T @ error
    before = surrogate_loss_change(surrogate, error, gradient)
    for i in range(20):
        step = 0.3 if i % 2 else -0.7
        coupling = torch.dot(vectors[i] * shifted, projection).item()
        diagonal = surrogate.rho + torch.dot(vectors[i].square(), shifted).item()
        predicted = step * (gradient[i].item() + surrogate.rho * error[i].item() + coupling) + 0.5 * step ** 2 * diagonal
        moved = error.clone()
        moved[i] += step
        assert predicted == pytest.approx(surrogate_loss_change(surrogate, moved, gradient) - before, abs=1e-12)

