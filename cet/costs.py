"""Cost tables c_l(b): the predicted loss change of quantizing layer l to b bits, for each method.

All methods share the quantizer of :mod:`cet.quantize` and the solver of :mod:`cet.allocate`, and
differ only in how they price a layer's error d:

- ``cet``: 1/2 d^T H^ d with the low-rank-plus-isotropic surrogate H^ (exact on the top-k Ritz
  vectors, the minor axes, and isotropic elsewhere), with d from major-axis rounding
  (:mod:`cet.rounding`) where that was accepted;
- ``cet-rtn``: the same surrogate with round-to-nearest errors, the ablation of major-axis rounding;
- ``hawq-v1``: 1/2 lam_max |d|^2, the top-eigenvalue sensitivity of HAWQ (Dong et al., 2019);
- ``hawq-v2``: 1/2 (tr H_l / n_l) |d|^2, the average-trace sensitivity of HAWQ-V2 and HAWQ-V3;
- ``first-order``: g^T d alone, the gradient of the calibration loss times the error.

Both CET methods may add the first-order term g^T d, but only where it is significant against its
standard error over calibration chunks (|mean| > ``first_order_z`` standard errors). On a small
calibration set the term is mostly noise, and an allocator that trusted it would move bits to layers
whose noisy estimate happened to be negative.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import TensorDataset

from .allocate import _validate_bit_widths
from .analysis import LayerAnalysis
from .quantize import QuantizedTensor, channel_axis, quantize_per_channel

__all__ = ["METHODS", "CostTable", "GradientStatistics", "cost_table", "cost_tables", "gradient_statistics"]

METHODS = ("cet", "cet-rtn", "hawq-v1", "hawq-v2", "first-order")


@dataclass
class GradientStatistics:
    """Per-layer gradients of the calibration loss, over equal chunks of the calibration set."""

    chunk_gradients: dict[str, torch.Tensor]   # name -> (chunks, n) float32, flattened weights

    def mean(self, name: str) -> torch.Tensor:
        return self.chunk_gradients[name].mean(dim=0)

    def first_order(self, name: str, error: torch.Tensor) -> tuple[float, float]:
        """Return g^T d and its standard error over chunks."""
        per_chunk = self.chunk_gradients[name].double() @ error.reshape(-1).double()
        return per_chunk.mean().item(), (per_chunk.std() / len(per_chunk) ** 0.5).item()


@dataclass
class CostTable:
    """One method's (layers, bit widths) costs, with each entry's standard error."""

    method: str
    layers: list[str]
    bit_widths: list[int]
    costs: np.ndarray
    standard_errors: np.ndarray


def gradient_statistics(
    model: nn.Module, calibration: TensorDataset, layers: Mapping[str, nn.Module], num_chunks: int = 8,
    device: str | torch.device = "cpu",
) -> GradientStatistics:
    """Compute each layer's weight gradient of the mean cross-entropy on ``num_chunks`` equal chunks.

    The model runs in eval mode, so BatchNorm uses its running statistics. The chunks' mean is the
    gradient on the whole set when it divides evenly.
    """
    images, labels = calibration.tensors
    if not 2 <= num_chunks <= len(labels):
        raise ValueError(f"invalid num_chunks {num_chunks}: need 2 to {len(labels)} (the calibration size)")
    was_training = model.training
    model.eval()
    chunks: dict[str, list[torch.Tensor]] = {name: [] for name in layers}
    try:
        for part in torch.tensor_split(torch.arange(len(labels)), num_chunks):
            loss = F.cross_entropy(model(images[part].to(device)), labels[part].to(device))
            weights = [layers[name].weight for name in layers]
            grads = torch.autograd.grad(loss, weights, allow_unused=True)
            for name, weight, grad in zip(layers, weights, grads):
                grad = torch.zeros_like(weight) if grad is None else grad
                chunks[name].append(grad.detach().reshape(-1).float().cpu())
    finally:
        model.train(was_training)
    return GradientStatistics({name: torch.stack(values) for name, values in chunks.items()})


@torch.no_grad()
def cost_tables(
    methods: Sequence[str],
    model: nn.Module,
    analyses: Mapping[str, LayerAnalysis],
    bit_widths: Sequence[int],
    gradients: GradientStatistics | None = None,
    rounded: Mapping[tuple[str, int], QuantizedTensor] | None = None,
    first_order_z: float | None = 2.0,
) -> dict[str, CostTable]:
    """Return the cost table of every method, layers in the order of ``analyses``.

    Args:
        methods: names from :data:`METHODS`.
        gradients: needed by ``first-order``, and by the CET methods unless ``first_order_z`` is None.
        rounded: (layer, bits) -> codes chosen by major-axis rounding; ``cet`` uses them where present
            and round-to-nearest elsewhere.
        first_order_z: the CET methods add g^T d where |g^T d| exceeds this many standard errors;
            None leaves the term out.
    """
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise ValueError(f"unknown method {unknown[0]!r}: expected one of {', '.join(METHODS)}")
    needs_gradients = "first-order" in methods or (first_order_z is not None and {"cet", "cet-rtn"} & set(methods))
    if needs_gradients and gradients is None:
        raise ValueError("these methods need gradient statistics: pass gradients=gradient_statistics(...) "
                         "or first_order_z=None and no 'first-order' method")
    bit_widths = _validate_bit_widths(bit_widths)
    rounded = rounded or {}
    modules = dict(model.named_modules())
    names = list(analyses)
    for name in names:
        weight = getattr(modules.get(name), "weight", None)
        if not isinstance(weight, torch.Tensor) or weight.numel() != analyses[name].num_weights:
            found = "no such layer" if weight is None else f"{weight.numel()} weights"
            raise ValueError(
                f"the analysis of layer {name!r} covers {analyses[name].num_weights} weights, but the model has "
                f"{found}; pass the model that was analysed"
            )
    shape = (len(names), len(bit_widths))
    tables = {m: CostTable(m, names, list(bit_widths), np.zeros(shape), np.zeros(shape)) for m in methods}
    for row, name in enumerate(names):
        analysis = analyses[name]
        module = modules[name]
        weight = module.weight.detach().cpu()
        surrogate = analysis.surrogate
        # The isotropic curvature rho and the average curvature tr/n carry the trace's standard error.
        rho_error = analysis.trace.standard_error / max(analysis.num_weights - surrogate.eigenvectors.shape[1], 1)
        for column, bits in enumerate(bit_widths):
            nearest = quantize_per_channel(weight, bits, channel_axis(module)).dequantize() - weight
            errors = {"rtn": nearest}
            if (name, bits) in rounded:
                errors["major"] = rounded[(name, bits)].dequantize() - weight
            for method, table in tables.items():
                error = errors.get("major", nearest) if method == "cet" else nearest
                value, standard_error = _price(method, name, error, analysis, gradients, first_order_z, rho_error)
                table.costs[row, column] = value
                table.standard_errors[row, column] = standard_error
    return tables


def _price(
    method: str, name: str, error: torch.Tensor, analysis: LayerAnalysis, gradients: GradientStatistics | None,
    first_order_z: float | None, rho_error: float,
) -> tuple[float, float]:
    """Return one method's predicted loss change for one error, with its standard error."""
    squared_norm = error.double().square().sum().item()
    if method == "hawq-v1":
        # The top Ritz value is deterministic given the calibration set, so no sampling error is attached.
        return 0.5 * analysis.top_eigenvalue * squared_norm, 0.0
    if method == "hawq-v2":
        return (0.5 * analysis.trace.mean / analysis.num_weights * squared_norm,
                0.5 * analysis.trace.standard_error / analysis.num_weights * squared_norm)
    if method == "first-order":
        return gradients.first_order(name, error)

    surrogate = analysis.surrogate
    value = surrogate.quadratic_cost(error.double()).item()
    coordinates = surrogate.eigenvectors.double().T @ error.reshape(-1).double()
    complement = max(squared_norm - coordinates.square().sum().item(), 0.0)
    variance = (0.5 * rho_error * complement) ** 2
    if first_order_z is not None:
        first, first_error = gradients.first_order(name, error)
        if abs(first) > first_order_z * first_error:
            value += first
            variance += first_error ** 2
    return value, variance ** 0.5


def cost_table(
    method: str, model: nn.Module, analyses: Mapping[str, LayerAnalysis], bit_widths: Sequence[int],
    gradients: GradientStatistics | None = None, rounded: Mapping[tuple[str, int], QuantizedTensor] | None = None,
) -> np.ndarray:
    """Return the (layers, bit widths) cost table of ``method``, layers in the order of ``analyses``.

    Without ``gradients`` the CET methods leave the first-order term out.
    """
    first_order_z = 2.0 if gradients is not None else None
    return cost_tables([method], model, analyses, bit_widths, gradients, rounded, first_order_z)[method].costs
