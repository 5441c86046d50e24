"""Symmetric uniform per-channel quantization with a max-abs scale.

For b bits the integer codes lie in [-(2^(b-1) - 1), 2^(b-1) - 1], a grid symmetric about zero; at 2 bits
it is ternary {-1, 0, 1}. Each output channel has its own scale max|w_c| / (2^(b-1) - 1), so the largest
weight of every channel is represented exactly and the rounding error is at most half a step.
"""

from __future__ import annotations

import copy
import numbers
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import nn

__all__ = [
    "MAX_BITS", "MIN_BITS", "QuantizedTensor", "apply_quantized", "channel_axis", "quantization_error",
    "quantize_layers", "quantize_model", "quantize_per_channel",
]

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

    def validate(self, shape: Sequence[int], name: str = "weight") -> None:
        """Check that these codes and scales can stand for a weight of ``shape``.

        The codes may come from any rounding scheme, so only the grid is checked. The codes must be
        integers in [-(2^(b-1) - 1), 2^(b-1) - 1]. The scale must contain one finite, positive value per
        channel along ``axis``, shaped as ``quantize_per_channel`` shapes it (size 1 on every other axis).

        Raises:
            ValueError: naming ``name`` and the first property that does not hold.
        """
        shape = tuple(shape)
        _check_bits(self.bits, name)
        if isinstance(self.axis, bool) or not isinstance(self.axis, numbers.Integral) or not 0 <= self.axis < max(len(shape), 1):
            raise ValueError(f"invalid channel axis {self.axis!r} for {name} of shape {shape}: expected 0 to {max(len(shape), 1) - 1}")
        if tuple(self.codes.shape) != shape:
            raise ValueError(f"codes of shape {tuple(self.codes.shape)} do not match {name} of shape {shape}")
        if self.codes.dtype.is_floating_point or self.codes.dtype.is_complex or self.codes.dtype == torch.bool:
            raise ValueError(f"codes of {name} have dtype {self.codes.dtype}; convert them to an integer dtype such as torch.int32")
        levels = 2 ** (self.bits - 1) - 1
        if self.codes.numel() and (self.codes.min().item() < -levels or self.codes.max().item() > levels):
            raise ValueError(
                f"codes of {name} range from {self.codes.min().item()} to {self.codes.max().item()}, outside "
                f"[-{levels}, {levels}] of the {self.bits}-bit grid; clamp them or use more bits"
            )
        scale_shape = _channel_scale_shape(shape, int(self.axis))
        if tuple(self.scale.shape) != scale_shape:
            raise ValueError(
                f"scale of shape {tuple(self.scale.shape)} for {name} is not one scale per channel; "
                f"expected shape {scale_shape}"
            )
        if not self.scale.dtype.is_floating_point:
            raise ValueError(f"scale of {name} has dtype {self.scale.dtype}; expected a floating-point dtype")
        if not (torch.isfinite(self.scale).all() and (self.scale > 0).all()):
            raise ValueError(f"scale of {name} contains a value that is not finite and positive")


def _check_quantized_tensor(value: object, name: str) -> None:
    """Raise TypeError unless ``value``, the entry of layer ``name``, is a QuantizedTensor."""
    if not isinstance(value, QuantizedTensor):
        raise TypeError(
            f"quantized[{name!r}] is a {type(value).__name__}; expected a QuantizedTensor, "
            "for example from quantize_layers(model, bit_widths)"
        )


def _check_bits(bits: object, name: str | None = None) -> None:
    if isinstance(bits, bool) or not isinstance(bits, numbers.Integral) or not MIN_BITS <= bits <= MAX_BITS:
        where = f" for {name}" if name else ""
        raise ValueError(f"invalid bit width {bits!r}{where}: must be an integer from {MIN_BITS} to {MAX_BITS}")


def _channel_scale_shape(shape: tuple[int, ...], axis: int) -> tuple[int, ...]:
    """Return the shape of a per-channel scale: the weight's size along ``axis`` and 1 elsewhere."""
    if len(shape) <= 1:
        return shape
    return tuple(size if d == axis else 1 for d, size in enumerate(shape))


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
    _check_bits(bits)
    bits = int(bits)
    if not -weight.dim() <= axis < max(weight.dim(), 1):
        raise ValueError(f"invalid channel axis {axis} for a weight of shape {tuple(weight.shape)}")
    axis = axis % max(weight.dim(), 1)
    if not torch.isfinite(weight).all():
        raise ValueError("cannot quantize a weight that contains NaN or infinity; check the model's weights")
    levels = 2 ** (bits - 1) - 1
    reduce_dims = [d for d in range(weight.dim()) if d != axis]
    if weight.numel() == 0:
        # amax cannot reduce over a dimension of size 0, and a weight without entries needs no scale.
        max_abs = torch.zeros([size if d == axis else 1 for d, size in enumerate(weight.shape)], dtype=weight.dtype)
    elif reduce_dims:
        max_abs = weight.abs().amax(dim=reduce_dims, keepdim=True)
    else:
        max_abs = weight.abs()
    scale = torch.where(max_abs > 0, max_abs / levels, torch.ones_like(max_abs))
    codes = torch.clamp(torch.round(weight / scale), -levels, levels).to(torch.int32)
    return QuantizedTensor(codes, scale, bits, axis)


def quantization_error(weight: torch.Tensor, bits: int, axis: int = 0) -> torch.Tensor:
    """Return d = Q_b(w) - w."""
    return quantize_per_channel(weight, bits, axis).dequantize() - weight


def _weight_layer(modules: Mapping[str, nn.Module], name: str) -> nn.Module:
    """Return the module called ``name``, checking that it is a convolution or a linear layer."""
    if name not in modules:
        raise KeyError(f"layer {name!r} not found in the model; expected one of the quantizable layer names")
    module = modules[name]
    if not isinstance(module, _WEIGHT_LAYERS):
        raise TypeError(
            f"layer {name!r} is a {type(module).__name__}, which cannot be quantized; "
            "only convolutions and linear layers can"
        )
    return module


@torch.no_grad()
def quantize_layers(model: nn.Module, bit_widths: Mapping[str, int]) -> dict[str, QuantizedTensor]:
    """Quantize the weight of every layer in ``bit_widths`` by rounding to nearest, one scale per output channel.

    The model is not modified.

    Raises:
        KeyError: a name in ``bit_widths`` is not a module of the model.
        TypeError: the named module is not a convolution or a linear layer.
        ValueError: a bit width is outside 2 to 16, or a weight contains NaN or infinity.
    """
    modules = dict(model.named_modules())
    quantized = {}
    for name, bits in bit_widths.items():
        module = _weight_layer(modules, name)
        quantized[name] = quantize_per_channel(module.weight.detach(), bits, channel_axis(module))
    return quantized


@torch.no_grad()
def apply_quantized(model: nn.Module, quantized: Mapping[str, QuantizedTensor]) -> nn.Module:
    """Return a copy of ``model`` whose listed layers carry the weights ``q.dequantize()``.

    The codes may come from any rounding scheme; ``QuantizedTensor.validate`` checks each against its
    layer first. The original model is not modified, and layers not in ``quantized`` keep their weights.

    Raises:
        KeyError: a name in ``quantized`` is not a module of the model.
        TypeError: the named module is not a convolution or a linear layer, or an entry is not a QuantizedTensor.
        ValueError: codes or scales do not fit the layer's weight (shape, bit range, scale shape).
    """
    result = copy.deepcopy(model)
    modules = dict(result.named_modules())
    layers = {name: _weight_layer(modules, name) for name in quantized}
    for name, q in quantized.items():
        _check_quantized_tensor(q, name)
        q.validate(layers[name].weight.shape, f"layer {name!r}")
    for name, q in quantized.items():
        layers[name].weight.copy_(q.dequantize())
    return result


def quantize_model(model: nn.Module, bit_widths: dict[str, int]) -> nn.Module:
    """Return a copy of ``model`` whose listed layers carry their quantized (dequantized) weights.

    Equal to ``apply_quantized(model, quantize_layers(model, bit_widths))``. The original model is not
    modified. Layers not in ``bit_widths`` keep float32 weights.

    Raises:
        KeyError: a name in ``bit_widths`` is not a module of the model.
        TypeError: the named module is not a convolution or a linear layer.
    """
    return apply_quantized(model, quantize_layers(model, bit_widths))
