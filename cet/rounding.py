"""Major-axis rounding: move each layer's quantization error off the top Hessian eigenvectors.

Round-to-nearest makes every weight's error as small as possible, but it spreads the error over all
directions, including the top eigenvectors of the layer's Hessian block, the minor axes of its error
quadric, where error costs the most. Each weight has two neighbours on the quantization grid, and
choosing the farther one for a few weights can cancel the error's component along those axes, pushing
it onto the major axes, where the curvature is small.

The procedure is ours (the CET paper does not spell one out). It is greedy coordinate descent on the
surrogate q(d) = g^T d + 1/2 d^T H^ d over the two-neighbour lattice, starting from round-to-nearest,
with H^ the layer's low-rank-plus-isotropic surrogate (:class:`cet.geometry.LowRankSurrogate`):
the change of q when weight i moves by one step t_i is

    t_i (g_i + rho d_i + sum_j (lam_j - rho) r_j V_ij) + 1/2 t_i^2 (rho + sum_j (lam_j - rho) V_ij^2),

with r = V^T d. Each pass prices every weight at once in O(nk), then moves the most promising weights
one at a time, re-pricing each in O(k) against the updated r before it moves, so every move lowers q
exactly. Relaxing to a continuous problem and rounding afterwards does worse here: the final rounding
re-introduces an error along the top eigenvectors of the same size as round-to-nearest's.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import torch

from .geometry import LowRankSurrogate
from .quantize import QuantizedTensor, quantize_per_channel

__all__ = ["RoundingResult", "major_axis_round", "surrogate_loss_change"]

logger = logging.getLogger(__name__)


@dataclass
class RoundingResult:
    """A layer's major-axis rounding at one bit width, with round-to-nearest for comparison.

    Costs are the surrogate's predicted loss change q(d) = g^T d + 1/2 d^T H^ d (without the first term
    when no gradient was given).
    """

    quantized: QuantizedTensor   # the codes chosen, on round-to-nearest's scales
    nearest: QuantizedTensor     # round-to-nearest
    surrogate_cost: float
    nearest_surrogate_cost: float
    moved_weights: int           # weights whose code differs from round-to-nearest
    passes: int


def surrogate_loss_change(surrogate: LowRankSurrogate, error: torch.Tensor, gradient: torch.Tensor | None = None) -> float:
    """Return q(d) = g^T d + 1/2 d^T H^ d in float64; without ``gradient``, only the quadratic term."""
    error = error.double()
    cost = surrogate.quadratic_cost(error).item()
    if gradient is not None:
        cost += torch.dot(gradient.reshape(-1).double(), error.reshape(-1)).item()
    return cost


def major_axis_round(
    weight: torch.Tensor,
    bits: int,
    axis: int,
    surrogate: LowRankSurrogate,
    gradient: torch.Tensor | None = None,
    max_passes: int = 50,
    moves_per_pass: int = 2048,
    rtol: float = 1e-4,
) -> RoundingResult:
    """Choose each weight's grid neighbour to minimise the surrogate loss change, from round-to-nearest.

    The scales are round-to-nearest's per-channel max-abs scales, so the result stores and loads
    exactly like round-to-nearest; only codes change, each by at most one step, and always to the
    weight's other grid neighbour. The surrogate cost never ends above round-to-nearest's, because
    every move lowers it.

    Args:
        weight: the layer's float weight.
        bits, axis: as in :func:`cet.quantize.quantize_per_channel`.
        surrogate: the layer's H^, whose eigenvectors are (n, k) in the weight's flattened order.
        gradient: g, the gradient of the loss at the weight; None leaves the first-order term out.
        max_passes: the most pricing passes.
        moves_per_pass: the most moves tried per pass, the most promising first.
        rtol: the descent stops after a pass that lowers q by less than ``rtol`` times round-to-nearest's
            |q|, or when no move lowers q.
    """
    nearest = quantize_per_channel(weight, bits, axis)
    num_weights = weight.numel()
    vectors = surrogate.eigenvectors
    if vectors.shape[0] != num_weights:
        raise ValueError(
            f"surrogate has eigenvectors of length {vectors.shape[0]} but the weight has {num_weights} entries; "
            "pass the surrogate of this layer"
        )
    if vectors.dim() != 2 or surrogate.eigenvalues.shape != (vectors.shape[1],):
        raise ValueError(
            f"surrogate has eigenvalues of shape {tuple(surrogate.eigenvalues.shape)} and eigenvectors of shape "
            f"{tuple(vectors.shape)}, but needs (k,) and (n, k); pass the Ritz pairs of one Lanczos run"
        )
    if gradient is not None and gradient.numel() != num_weights:
        raise ValueError(f"gradient has {gradient.numel()} entries but the weight has {num_weights}")
    surrogate_finite = (torch.isfinite(surrogate.eigenvalues).all() and torch.isfinite(vectors).all()
                        and np.isfinite(float(surrogate.rho)))
    if not surrogate_finite:
        # NaN costs compare false with everything, so the descent would stop at once and hide the problem.
        raise ValueError("the surrogate contains NaN or infinity; check the Hessian analysis of this layer")
    if gradient is not None and not torch.isfinite(gradient).all():
        raise ValueError("the gradient contains NaN or infinity; check the model's loss on the calibration set")
    if max_passes < 0 or moves_per_pass < 1:
        raise ValueError(f"invalid max_passes {max_passes} or moves_per_pass {moves_per_pass}: need >= 0 and >= 1")

    levels = 2 ** (bits - 1) - 1
    w = weight.detach().double().cpu().reshape(-1).numpy()
    scale = nearest.scale.double().cpu().expand_as(nearest.codes).reshape(-1).numpy()
    codes = nearest.codes.cpu().reshape(-1).numpy().astype(np.int64)
    v = vectors.double().cpu().numpy()
    rho = float(surrogate.rho)
    shifted = surrogate.eigenvalues.double().cpu().numpy() - rho   # lam_j - rho
    g = np.zeros(num_weights) if gradient is None else gradient.detach().double().cpu().reshape(-1).numpy()

    error = scale * codes - w
    # The other neighbour lies one step away, on the far side of the weight; a weight exactly on the
    # grid (the channel's max-abs weight, or zero) has no other neighbour and never moves.
    direction = np.where(w / scale >= codes, 1, -1)
    movable = (error != 0) & (np.abs(codes + direction) <= levels)
    projection = v.T @ error
    diagonal = rho + (v * v) @ shifted   # H^_ii

    nearest_cost = surrogate_loss_change(surrogate, nearest.dequantize() - weight.detach().cpu(), gradient)
    passes = 0
    for passes in range(1, max_passes + 1):
        step = direction * scale
        coupling = v @ (shifted * projection)
        change = step * (g + rho * error + coupling) + 0.5 * step * step * diagonal
        change[~movable] = 0.0
        candidates = np.flatnonzero(change < 0)
        if candidates.size == 0:
            passes -= 1
            break
        if candidates.size > moves_per_pass:
            candidates = candidates[np.argpartition(change[candidates], moves_per_pass)[:moves_per_pass]]
        order = candidates[np.argsort(change[candidates])]
        moved = 0
        lowered = 0.0
        for i in order:
            row = v[i]
            t = step[i]
            exact = t * (g[i] + rho * error[i] + float(np.dot(shifted * projection, row))) + 0.5 * t * t * diagonal[i]
            if exact >= 0:
                continue
            error[i] += t
            codes[i] += direction[i]
            projection += t * row
            # Moving back is the only other option for this weight, and it stays within the grid.
            direction[i] = -direction[i]
            step[i] = -t
            moved += 1
            lowered -= exact
        if moved == 0 or lowered < rtol * abs(nearest_cost):
            break

    chosen = QuantizedTensor(
        torch.from_numpy(codes.astype(np.int32)).reshape(nearest.codes.shape), nearest.scale, nearest.bits, nearest.axis
    )
    chosen_cost = surrogate_loss_change(surrogate, chosen.dequantize() - weight.detach().cpu(), gradient)
    if chosen_cost > nearest_cost:
        # Float32 storage of codes * scale can differ from the float64 bookkeeping by rounding only.
        logger.debug("major-axis rounding ended above round-to-nearest by %.3g; keeping round-to-nearest", chosen_cost - nearest_cost)
        chosen, chosen_cost = nearest, nearest_cost
    moved_weights = int((chosen.codes != nearest.codes).sum())
    return RoundingResult(chosen, nearest, chosen_cost, nearest_cost, moved_weights, passes)
