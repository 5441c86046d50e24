"""Cost tables c_l(b): the predicted loss change of quantizing layer l to b bits, for each method.

All methods share the quantizer of :mod:`cet.quantize` and differ only in how they price its error d:

- ``cet``: 1/2 d^T H^ d with the low-rank-plus-isotropic surrogate H^ (exact on the top-k Ritz
  vectors, the minor axes, and isotropic elsewhere), so error along the minor axes costs the most;
- ``hawq-v2``: 1/2 (tr H_l / n_l) |d|^2, the average-trace sensitivity of HAWQ-V2.

The first-order term g^T d is left out of both. On a small calibration set it is dominated by noise,
and the allocator would reward that noise.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import nn

from .analysis import LayerAnalysis
from .quantize import channel_axis, quantization_error

__all__ = ["METHODS", "cost_table"]

METHODS = ("cet", "hawq-v2")


@torch.no_grad()
def cost_table(
    method: str, model: nn.Module, analyses: dict[str, LayerAnalysis], bit_widths: Sequence[int]
) -> np.ndarray:
    """Return the (layers, bit widths) cost table of ``method``, layers in the order of ``analyses``."""
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}: expected one of {', '.join(METHODS)}")
    modules = dict(model.named_modules())
    table = np.zeros((len(analyses), len(bit_widths)))
    for row, (name, analysis) in enumerate(analyses.items()):
        module = modules[name]
        weight = module.weight.detach().cpu()
        for column, bits in enumerate(bit_widths):
            error = quantization_error(weight, bits, channel_axis(module))
            if method == "cet":
                table[row, column] = analysis.surrogate.quadratic_cost(error).item()
            else:
                curvature = analysis.trace.mean / analysis.num_weights
                table[row, column] = 0.5 * curvature * error.double().square().sum().item()
    return table
