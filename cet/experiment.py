"""The ResNet-34 experiment of the book: allocate bits with each method at each target, then measure."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import torch
from torch import nn
from torch.utils.data import TensorDataset
from tqdm import tqdm

from .allocate import FLOAT_BITS, allocate_bits, compression_ratio
from .analysis import LayerAnalysis
from .costs import cost_table
from .quantize import channel_axis, quantize_model
from .training import evaluate

__all__ = ["Run", "model_compression_ratio", "run_allocations", "run_uniform"]

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

    def to_dict(self) -> dict:
        return asdict(self)


def model_compression_ratio(model: nn.Module, bit_widths: dict[str, int]) -> float:
    """Return the float32 size of the state dict over its size with quantized weights.

    Quantized weights count b bits each plus one float32 scale per output channel; every other floating
    tensor (biases, BatchNorm parameters and statistics) counts 32 bits. Integer buffers are ignored.
    """
    modules = dict(model.named_modules())
    quantized_bits = 0.0
    quantized_names = set()
    for name, bits in bit_widths.items():
        weight = modules[name].weight
        channels = weight.shape[channel_axis(modules[name])]
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
