"""Symmetric uniform per-channel quantization with a max-abs scale.

For b bits the integer codes lie in [-(2^(b-1) - 1), 2^(b-1) - 1], a grid symmetric about zero; at 2 bits
it is ternary {-1, 0, 1}. Each output channel has its own scale max|w_c| / (2^(b-1) - 1), so the largest
weight of every channel is represented exactly and the rounding error is at most half a step.
"""

from __future__ import annotations

import copy
import numbers
from dataclasses import dataclass

import torch
from torch import nn

__all__ = ["MAX_BITS", "MIN_BITS", "QuantizedTensor", "channel_axis", "quantization_error", "quantize_model", "quantize_per_channel"]

MIN_BITS = 2
MAX_BITS = 16
_WEIGHT_LAYERS = (
    nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d, nn.Linear,
)


@dataclass
class QuantizedTensor:
    """Integer codes and per-channel scales; ``dequantize()`` gives codes * scale."""

    codes: torch.Tensor   # int32, the weight's shape
    scale: torch.Tensor   # float, one entry per channel, shaped to broadcast against ``codes``
    bits: int
    axis: int

    def dequantize(self) -> torch.Tensor:
        return self.codes.to(self.scale.dtype) * self.scale


def channel_axis(module: nn.Module) -> int:
    """Return the output-channel axis of a layer's weight: 1 for transposed convolutions, else 0."""
    return 1 if isinstance(module, (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)) else 0


def quantize_per_channel(weight: torch.Tensor, bits: int, axis: int = 0) -> QuantizedTensor:
    """Quantize ``weight`` to ``bits`` bits, one max-abs scale per slice along ``axis``.

    A channel whose weights are all zero gets scale 1 and codes 0, so it quantizes to exact zeros.

    Raises:
        ValueError: ``bits`` is outside 2 to 16, ``axis`` is not a dimension of the weight, or the
            weight contains NaN or infinity. The symmetric grid needs at least the ternary levels, and
            float32 represents every code exactly only up to 16 bits.
    """
    if isinstance(bits, bool) or not isinstance(bits, numbers.Integral) or not MIN_BITS <= bits <= MAX_BITS:
        raise ValueError(f"invalid bit width {bits!r}: must be an integer from {MIN_BITS} to {MAX_BITS}")
    bits = int(bits)
    if not -weight.dim() <= axis < max(weight.dim(), 1):
        raise ValueError(f"invalid channel axis {axis} for a weight of shape {tuple(weight.shape)}")
    axis = axis % max(weight.dim(), 1)
    if not torch.isfinite(weight).all():
        raise ValueError("cannot quantize a weight that contains NaN or infinity; check the model's weights")
    levels = 2 ** (bits - 1) - 1
    reduce_dims = [d for d in range(weight.dim()) if d != axis]
    max_abs = weight.abs().amax(dim=reduce_dims, keepdim=True) if reduce_dims else weight.abs()
    scale = torch.where(max_abs > 0, max_abs / levels, torch.ones_like(max_abs))
    codes = torch.clamp(torch.round(weight / scale), -levels, levels).to(torch.int32)
    return QuantizedTensor(codes, scale, bits, axis)


def quantization_error(weight: torch.Tensor, bits: int, axis: int = 0) -> torch.Tensor:
    """Return d = Q_b(w) - w."""
    return quantize_per_channel(weight, bits, axis).dequantize() - weight


@torch.no_grad()
def quantize_model(model: nn.Module, bit_widths: dict[str, int]) -> nn.Module:
    """Return a copy of ``model`` whose listed layers carry their quantized (dequantized) weights.

    The original model is not modified. Layers not in ``bit_widths`` keep float32 weights.

    Raises:
        KeyError: a name in ``bit_widths`` is not a module of the model.
        TypeError: the named module is not a convolution or a linear layer.
    """
    quantized = copy.deepcopy(model)
    modules = dict(quantized.named_modules())
    for name, bits in bit_widths.items():
        if name not in modules:
            raise KeyError(f"layer {name!r} not found in the model; expected one of the quantizable layer names")
        module = modules[name]
        if not isinstance(module, _WEIGHT_LAYERS):
            raise TypeError(
                f"layer {name!r} is a {type(module).__name__}, which cannot be quantized; "
                "only convolutions and linear layers can"
            )
        module.weight.copy_(quantize_per_channel(module.weight, bits, channel_axis(module)).dequantize())
    return quantized
