"""The ResNet-34 experiment of the book: allocate bits with each method at each target, then measure."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import TensorDataset
from tqdm import tqdm

from .allocate import FLOAT_BITS, _validate_bit_widths, allocate_bits, compression_ratio
from .analysis import LayerAnalysis
from .costs import CostTable, _check_rounded_codes, cost_table
from .quantize import (
    QuantizedTensor, _check_bits, _weight_layer, apply_quantized, channel_axis, quantize_layers, quantize_model,
)
from .rounding import major_axis_round
from .training import evaluate

__all__ = [
    "RoundingRecord", "Run", "calibration_loss", "layer_codes", "model_compression_ratio", "pareto_front", "quantize_with_codes",
    "round_layers", "run_allocations", "run_study", "run_uniform",
]

logger = logging.getLogger(__name__)


@dataclass
class Run:
    """One quantized model and its measured accuracy, as stored in the results file."""

    method: str
    target_ratio: float | None       # None for uniform bit widths
    weight_compression_ratio: float  # 32 sum n_l / sum n_l b_l over quantized weights
    model_compression_ratio: float   # the whole state dict, counting scales and float32 tensors
    accuracy: float                  # percent, on the evaluation set
    predicted_cost: float | None     # the method's summed cost table entries; None for uniform
    bit_widths: dict[str, int]
    seed: int | None = None          # calibration seed of the analysis behind the allocation
    predicted_standard_error: float | None = None  # of predicted_cost, adding the entries' variances

    def to_dict(self) -> dict:
        return asdict(self)


def model_compression_ratio(model: nn.Module, bit_widths: dict[str, int]) -> float:
    """Return the float32 size of the state dict over its size with quantized weights.

    Quantized weights count b bits each plus one float32 scale per output channel; every other floating
    tensor (biases, BatchNorm parameters and statistics) counts 32 bits. Integer buffers are ignored.

    Raises:
        KeyError: a name in ``bit_widths`` is not a module of the model.
        TypeError: the named module is not a convolution or a linear layer.
        ValueError: a bit width is not an integer from 2 to 16.
    """
    modules = dict(model.named_modules())
    quantized_bits = 0.0
    quantized_names = set()
    for name, bits in bit_widths.items():
        module = _weight_layer(modules, name)
        _check_bits(bits, f"layer {name!r}")
        weight = module.weight
        channels = weight.shape[channel_axis(module)]
        quantized_bits += weight.numel() * bits + channels * FLOAT_BITS
        quantized_names.add(f"{name}.weight" if name else "weight")
    float_values = sum(t.numel() for t in model.state_dict().values() if t.is_floating_point())
    other_values = sum(
        t.numel() for key, t in model.state_dict().items() if t.is_floating_point() and key not in quantized_names
    )
    return FLOAT_BITS * float_values / (quantized_bits + FLOAT_BITS * other_values)


def _measure(
    method: str, target: float | None, model: nn.Module, names: list[str], bits: Sequence[int],
    cost: float | None, evaluation: TensorDataset, device: str | torch.device,
) -> Run:
    sizes = [dict(model.named_modules())[n].weight.numel() for n in names]
    bit_widths = {n: int(b) for n, b in zip(names, bits)}
    accuracy = evaluate(quantize_model(model, bit_widths), evaluation, device=device)
    run = Run(
        method=method,
        target_ratio=target,
        weight_compression_ratio=compression_ratio(sizes, bits),
        model_compression_ratio=model_compression_ratio(model, bit_widths),
        accuracy=accuracy,
        predicted_cost=cost,
        bit_widths=bit_widths,
    )
    logger.info("%s at %s: %.2fx, accuracy %.2f%%", method, target, run.weight_compression_ratio, accuracy)
    return run


def run_allocations(
    model: nn.Module,
    analyses: dict[str, LayerAnalysis],
    methods: Sequence[str],
    target_ratios: Sequence[float],
    bit_widths: Sequence[int],
    evaluation: TensorDataset,
    device: str | torch.device = "cpu",
) -> list[Run]:
    """Allocate bits with every method at every target ratio, quantize, and measure accuracy."""
    names = list(analyses)
    sizes = [analyses[n].num_weights for n in names]
    runs = []
    for method in methods:
        table = cost_table(method, model, analyses, bit_widths)
        for target in tqdm(target_ratios, desc=f"{method} allocations", unit="target"):
            allocation = allocate_bits(table, sizes, bit_widths, target)
            runs.append(_measure(method, float(target), model, names, allocation.bit_widths,
                                 allocation.predicted_cost, evaluation, device))
    return runs


def run_uniform(
    model: nn.Module, names: Sequence[str], bit_widths: Sequence[int], evaluation: TensorDataset,
    device: str | torch.device = "cpu",
) -> list[Run]:
    """Quantize every listed layer to the same bit width, for each width in ``bit_widths``."""
    return [
        _measure(f"uniform-{bits}bit", None, model, list(names), [bits] * len(names), None, evaluation, device)
        for bits in bit_widths
    ]


@dataclass
class RoundingRecord:
    """Major-axis rounding against round-to-nearest for one layer at one bit width."""

    layer: str
    bits: int
    nearest_surrogate: float          # predicted loss change of round-to-nearest
    major_surrogate: float            # predicted loss change of major-axis rounding
    nearest_calibration_loss: float   # measured, with only this layer quantized
    major_calibration_loss: float
    accepted: bool                    # both no worse than round-to-nearest
    moved_weights: int


@torch.no_grad()
def calibration_loss(model: nn.Module, calibration: TensorDataset, batch_size: int = 256,
                     device: str | torch.device = "cpu") -> float:
    """Return the mean cross-entropy of ``model`` (in eval mode) on ``calibration``."""
    images, labels = calibration.tensors
    if len(labels) == 0:
        raise ValueError("the calibration set is empty; pass at least one sample")
    was_training = model.training
    model.eval()
    total = 0.0
    for start in range(0, len(labels), batch_size):
        logits = model(images[start:start + batch_size].to(device))
        total += F.cross_entropy(logits, labels[start:start + batch_size].to(device), reduction="sum").item()
    model.train(was_training)
    return total / len(labels)


@torch.no_grad()
def round_layers(
    model: nn.Module,
    analyses: dict[str, LayerAnalysis],
    bit_widths: Sequence[int],
    calibration: TensorDataset,
    device: str | torch.device = "cpu",
) -> tuple[dict[tuple[str, int], QuantizedTensor], list[RoundingRecord]]:
    """Round every analysed layer at every bit width along the major axes, and keep what is accepted.

    A rounding is accepted only when both its surrogate cost and the measured calibration loss (with
    that layer alone quantized) are no worse than round-to-nearest's. Returns the accepted codes, keyed
    by (layer, bits), and a record of every comparison.

    Raises:
        KeyError: a layer of ``analyses`` is not a module of the model.
        TypeError: the named module is not a convolution or a linear layer.
        ValueError: the bit widths are empty, repeat or lie outside 2 to 16, or an analysis does not fit its layer.
    """
    bit_widths = _validate_bit_widths(bit_widths)
    modules = dict(model.named_modules())
    layers = {name: _weight_layer(modules, name) for name in analyses}
    accepted: dict[tuple[str, int], QuantizedTensor] = {}
    records = []
    for name in tqdm(analyses, desc="major-axis rounding", unit="layer"):
        module = layers[name]
        original = module.weight.detach().clone()

        def loss_with(codes: QuantizedTensor) -> float:
            module.weight.copy_(codes.dequantize().to(original.device, original.dtype))
            return calibration_loss(model, calibration, device=device)

        try:
            for bits in bit_widths:
                result = major_axis_round(original.cpu(), bits, channel_axis(module), analyses[name].surrogate)
                nearest_loss = loss_with(result.nearest)
                major_loss = loss_with(result.quantized) if result.moved_weights else nearest_loss
                ok = (result.moved_weights > 0 and result.surrogate_cost <= result.nearest_surrogate_cost
                      and major_loss <= nearest_loss)
                if ok:
                    accepted[(name, bits)] = result.quantized
                records.append(RoundingRecord(name, bits, result.nearest_surrogate_cost, result.surrogate_cost,
                                              nearest_loss, major_loss, ok, result.moved_weights))
        finally:
            module.weight.copy_(original)
    return accepted, records


def pareto_front(table: CostTable, sizes: Sequence[int], ratios: Sequence[float]) -> list[dict]:
    """Allocate at every ratio and return each point: target, achieved ratio, predicted cost and bits.

    Raises:
        ValueError: the table's layer names, costs and standard errors disagree, or an allocation fails
            (see :func:`cet.allocate.allocate_bits`).
    """
    _check_cost_table(table)
    front = []
    for target in ratios:
        allocation = allocate_bits(table.costs, sizes, table.bit_widths, float(target))
        chosen = [table.bit_widths.index(b) for b in allocation.bit_widths]
        rows = np.arange(len(chosen))
        front.append({
            "method": table.method,
            "target_ratio": float(target),
            "weight_compression_ratio": allocation.weight_compression_ratio,
            "predicted_cost": allocation.predicted_cost,
            "predicted_standard_error": float(np.sqrt(np.square(table.standard_errors[rows, chosen]).sum())),
            "bit_widths": dict(zip(table.layers, allocation.bit_widths)),
        })
    return front


def _check_cost_table(table: CostTable) -> None:
    """Raise ValueError unless the table has one distinct layer name per row and errors shaped like its costs."""
    costs_shape = np.shape(table.costs)
    rows = costs_shape[0] if costs_shape else 0
    if len(table.layers) != rows:
        raise ValueError(f"cost table {table.method!r} has {len(table.layers)} layer names for {rows} rows of costs")
    if len(set(table.layers)) != len(table.layers):
        raise ValueError(
            f"cost table {table.method!r}: layer names repeat in {table.layers}; each row must price another layer"
        )
    if np.shape(table.standard_errors) != costs_shape:
        raise ValueError(
            f"cost table {table.method!r} has standard errors of shape {np.shape(table.standard_errors)} "
            f"but costs of shape {costs_shape}"
        )


def layer_codes(
    model: nn.Module, bit_widths: dict[str, int], rounded: dict[tuple[str, int], QuantizedTensor] | None = None
) -> dict[str, QuantizedTensor]:
    """Return each listed layer's codes: from ``rounded`` where it has (layer, bits), else round-to-nearest.

    Raises:
        KeyError, TypeError, ValueError: as :func:`cet.quantize.quantize_layers`.
        TypeError: a rounded entry is not a QuantizedTensor.
        ValueError: rounded codes do not fit their layer's shape or the bit width they are filed under.
    """
    codes = quantize_layers(model, bit_widths)
    modules = dict(model.named_modules())
    for name, bits in bit_widths.items():
        if rounded and (name, bits) in rounded:
            _check_rounded_codes(rounded[(name, bits)], name, bits, modules[name].weight.shape)
            codes[name] = rounded[(name, bits)]
    return codes


def quantize_with_codes(
    model: nn.Module, bit_widths: dict[str, int], rounded: dict[tuple[str, int], QuantizedTensor] | None = None
) -> nn.Module:
    """Return a quantized copy of ``model`` with :func:`layer_codes`' codes."""
    return apply_quantized(model, layer_codes(model, bit_widths, rounded))


def run_study(
    model: nn.Module,
    tables: dict[str, CostTable],
    target_ratios: Sequence[float],
    evaluation: TensorDataset,
    seed: int,
    rounded: dict[tuple[str, int], QuantizedTensor] | None = None,
    device: str | torch.device = "cpu",
) -> list[Run]:
    """Allocate with every method's table at every target, quantize and measure accuracy.

    Only the ``cet`` method uses the major-axis codes in ``rounded``. Allocations that quantize the
    model identically are evaluated once.
    """
    modules = dict(model.named_modules())
    measured: dict[tuple, float] = {}
    runs = []
    for method, table in tables.items():
        sizes = [_weight_layer(modules, n).weight.numel() for n in table.layers]
        codes = rounded if method == "cet" else None
        for point in tqdm(pareto_front(table, sizes, target_ratios), desc=f"{method} (seed {seed})", unit="target"):
            bit_widths = point["bit_widths"]
            uses_rounding = codes is not None and any((n, b) in codes for n, b in bit_widths.items())
            key = (uses_rounding, tuple(bit_widths.values()))
            if key not in measured:
                measured[key] = evaluate(quantize_with_codes(model, bit_widths, codes), evaluation, device=device)
            runs.append(Run(
                method=method,
                target_ratio=point["target_ratio"],
                weight_compression_ratio=point["weight_compression_ratio"],
                model_compression_ratio=model_compression_ratio(model, bit_widths),
                accuracy=measured[key],
                predicted_cost=point["predicted_cost"],
                bit_widths=bit_widths,
                seed=seed,
                predicted_standard_error=point["predicted_standard_error"],
            ))
            logger.info("%s seed %d at %gx: accuracy %.2f%%", method, seed, point["target_ratio"], measured[key])
    return runs
