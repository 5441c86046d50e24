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

import numbers
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

    Raises:
        ValueError: a layer in ``layers`` is not a module of ``model``, or ``num_chunks`` is not between 2
            and the calibration size.
    """
    images, labels = calibration.tensors
    own_modules = {id(module) for module in model.modules()}
    for name, layer in layers.items():
        if id(layer) not in own_modules:
            # The loss does not depend on a layer outside the model, so its gradient would read as zero.
            raise ValueError(
                f"layer {name!r} is not a module of the model; pass the model's own layers, "
                "for example from quantizable_layers(model)"
            )
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

    Raises:
        ValueError: ``first_order_z`` is negative or NaN, an analysis does not fit the model's layer or
            contains NaN or infinity, the gradient statistics lack a layer or do not fit it, or rounded codes
            do not fit the layer and bit width they are filed under.
        TypeError: ``methods`` is a string, or a rounded entry is not a QuantizedTensor.
    """
    if isinstance(methods, str):
        raise TypeError(f"methods is the string {methods!r}; pass a list of method names, such as [{methods!r}]")
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise ValueError(f"unknown method {unknown[0]!r}: expected one of {', '.join(METHODS)}")
    needs_gradients = "first-order" in methods or (first_order_z is not None and {"cet", "cet-rtn"} & set(methods))
    if needs_gradients and gradients is None:
        raise ValueError("these methods need gradient statistics: pass gradients=gradient_statistics(...) "
                         "or first_order_z=None and no 'first-order' method")
    if first_order_z is not None and not (isinstance(first_order_z, numbers.Real) and first_order_z >= 0):
        raise ValueError(
            f"invalid first_order_z {first_order_z!r}: must be a non-negative number of standard errors, or None "
            "to leave the first-order term out"
        )
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
    for name in names:
        _check_analysis(name, analyses[name])
        if needs_gradients:
            _check_gradients(gradients, name, analyses[name].num_weights)
        if "cet" in methods:
            for bits in bit_widths:
                if (name, bits) in rounded:
                    _check_rounded_codes(rounded[(name, bits)], name, bits, modules[name].weight.shape)
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


def _check_analysis(name: str, analysis: LayerAnalysis) -> None:
    """Raise ValueError if the analysis of layer ``name`` is inconsistent or contains NaN or infinity."""
    surrogate = analysis.surrogate
    if surrogate.eigenvectors.shape[0] != analysis.num_weights:
        raise ValueError(
            f"the surrogate of layer {name!r} has eigenvectors of length {surrogate.eigenvectors.shape[0]}, but the "
            f"analysis covers {analysis.num_weights} weights; analyse the layer again"
        )
    if surrogate.eigenvectors.dim() != 2 or surrogate.eigenvalues.shape != (surrogate.eigenvectors.shape[1],):
        raise ValueError(
            f"the surrogate of layer {name!r} has eigenvalues of shape {tuple(surrogate.eigenvalues.shape)} and "
            f"eigenvectors of shape {tuple(surrogate.eigenvectors.shape)}, but needs (k,) and (n, k); "
            "analyse the layer again"
        )
    scalars = torch.tensor([analysis.trace.mean, analysis.trace.standard_error, float(surrogate.rho)])
    tensors = [analysis.ritz_values, surrogate.eigenvalues, surrogate.eigenvectors, scalars]
    if not all(torch.isfinite(tensor).all() for tensor in tensors):
        # A NaN cost would only be caught by the allocator, which cannot name the layer.
        raise ValueError(
            f"the analysis of layer {name!r} contains NaN or infinity; check the model's loss on the calibration "
            "set and analyse the layer again"
        )


def _check_gradients(gradients: GradientStatistics, name: str, num_weights: int) -> None:
    """Raise ValueError unless ``gradients`` has at least two finite chunk gradients of layer ``name``."""
    chunks = gradients.chunk_gradients.get(name)
    if chunks is None:
        raise ValueError(
            f"the gradient statistics contain no gradient of layer {name!r}; compute them with "
            "gradient_statistics() for the analysed layers"
        )
    # With one chunk the standard error is NaN, and the significance test would drop the term silently.
    if chunks.dim() != 2 or chunks.shape[0] < 2 or chunks.shape[1] != num_weights:
        raise ValueError(
            f"the chunk gradients of layer {name!r} have shape {tuple(chunks.shape)}, but the analysis needs "
            f"(chunks, {num_weights}) with at least 2 chunks; compute them for this model with gradient_statistics()"
        )
    if not torch.isfinite(chunks).all():
        raise ValueError(
            f"the chunk gradients of layer {name!r} contain NaN or infinity; "
            "check the model's loss on the calibration set"
        )


def _check_rounded_codes(codes: object, name: str, bits: int, shape: Sequence[int]) -> None:
    """Raise unless ``codes``, filed under (``name``, ``bits``), are ``bits``-bit codes for a weight of ``shape``."""
    key = (name, bits)
    if not isinstance(codes, QuantizedTensor):
        raise TypeError(
            f"rounded[{key!r}] is a {type(codes).__name__}; expected a QuantizedTensor, as round_layers returns"
        )
    if codes.bits != bits:
        raise ValueError(
            f"rounded[{key!r}] has {codes.bits}-bit codes; file each rounding under the bit width it was rounded to"
        )
    codes.validate(shape, f"layer {name!r}")


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
