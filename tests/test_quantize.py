"""Tests of cet.quantize: properties of the symmetric per-channel quantizer over bit widths and shapes."""

import copy

import pytest
import torch
from torch import nn

from cet.quantize import (
    QuantizedTensor, apply_quantized, channel_axis, quantization_error, quantize_layers, quantize_model, quantize_per_channel,
)

BITS = list(range(2, 9))

# (shape, axis): a Linear weight, a Conv2d weight, a ConvTranspose2d weight (channels on axis 1), a vector.
SHAPES = [((6, 5), 0), ((6, 5), 1), ((4, 3, 3, 3), 0), ((3, 4, 2, 2), 1), ((7,), 0)]


def random_weight(shape, seed, dtype=torch.float32):
    generator = torch.Generator().manual_seed(seed)
    # Channel scales that differ by orders of magnitude make a wrong reduction axis visible.
    return torch.randn(shape, generator=generator, dtype=torch.float64).mul(10.0 ** torch.randint(-2, 2, shape, generator=generator)).to(dtype)


def channel_max_abs(weight, axis):
    reduce_dims = [d for d in range(weight.dim()) if d != axis]
    return weight.abs().amax(dim=reduce_dims) if reduce_dims else weight.abs()


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize(("shape", "axis"), SHAPES)
def test_quantization_is_idempotent(bits, shape, axis):
    weight = random_weight(shape, bits)
    first = quantize_per_channel(weight, bits, axis)

    second = quantize_per_channel(first.dequantize(), bits, axis)

    assert torch.equal(second.codes, first.codes)
    torch.testing.assert_close(second.dequantize(), first.dequantize(), rtol=1e-6, atol=0)


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize(("shape", "axis"), SHAPES)
def test_error_within_half_step(bits, shape, axis):
    weight = random_weight(shape, bits + 10)
    quantized = quantize_per_channel(weight, bits, axis)

    error = (quantized.dequantize() - weight).abs()

    bound = quantized.scale / 2 * (1 + 1e-5)
    assert (error <= bound).all(), f"max error/step {(error / quantized.scale).max().item()}"


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize(("shape", "axis"), SHAPES)
def test_codes_within_symmetric_range(bits, shape, axis):
    quantized = quantize_per_channel(random_weight(shape, bits + 20), bits, axis)
    levels = 2 ** (bits - 1) - 1

    assert quantized.codes.dtype == torch.int32
    assert quantized.codes.max().item() <= levels
    assert quantized.codes.min().item() >= -levels


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize(("shape", "axis"), SHAPES)
def test_channel_max_abs_reproduced(bits, shape, axis):
    weight = random_weight(shape, bits + 30)
    quantized = quantize_per_channel(weight, bits, axis)

    reproduced = channel_max_abs(quantized.dequantize(), axis)

    torch.testing.assert_close(reproduced, channel_max_abs(weight, axis), rtol=1e-6, atol=0)


@pytest.mark.parametrize(("shape", "axis"), SHAPES[:4])
def test_one_scale_per_channel(shape, axis):
    weight = random_weight(shape, 40)
    quantized = quantize_per_channel(weight, 4, axis)

    assert quantized.scale.numel() == shape[axis]
    torch.testing.assert_close(quantized.scale.reshape(-1), channel_max_abs(weight, axis) / 7, rtol=1e-6, atol=0)


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_zero_channel_quantizes_to_zeros(bits):
    weight = random_weight((4, 6), 50)
    weight[2] = 0.0

    quantized = quantize_per_channel(weight, bits, 0)
    dequantized = quantized.dequantize()

    assert not torch.isnan(dequantized).any()
    assert torch.equal(dequantized[2], torch.zeros(6))
    assert torch.equal(quantized.codes[2], torch.zeros(6, dtype=torch.int32))


def test_all_zero_weight_quantizes_to_zeros():
    quantized = quantize_per_channel(torch.zeros(3, 3), 4, 0)

    assert torch.equal(quantized.dequantize(), torch.zeros(3, 3))


def test_two_bits_ternary():
    quantized = quantize_per_channel(random_weight((8, 16), 60), 2, 0)

    assert set(quantized.codes.unique().tolist()) <= {-1, 0, 1}
    assert set(quantized.codes.unique().tolist()) == {-1, 0, 1}


def test_quantization_error_is_difference():
    weight = random_weight((5, 4), 70)

    error = quantization_error(weight, 3, 1)

    torch.testing.assert_close(error, quantize_per_channel(weight, 3, 1).dequantize() - weight, rtol=0, atol=0)


def test_float64_weight_keeps_dtype():
    weight = random_weight((3, 4), 80, dtype=torch.float64)

    quantized = quantize_per_channel(weight, 4, 0)

    assert quantized.dequantize().dtype == torch.float64


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_nonfinite_weight_raises(value):
    weight = torch.ones(3, 3)
    weight[1, 2] = value
    with pytest.raises(ValueError, match="NaN or infinity"):
        quantize_per_channel(weight, 4)


@pytest.mark.parametrize("bits", [1, 0, -3, 2.5, 4.0, True, "4"])
def test_invalid_bits_raise(bits):
    with pytest.raises(ValueError, match="invalid bit width"):
        quantize_per_channel(torch.ones(3, 3), bits)


def test_negative_axis_matches_positive():
    weight = random_weight((6, 5), 90)

    negative = quantize_per_channel(weight, 4, -1)

    torch.testing.assert_close(negative.dequantize(), quantize_per_channel(weight, 4, 1).dequantize(), rtol=0, atol=0)

def test_16_bits_keeps_sign_float32():
    weight = torch.tensor([[1.0, -0.5]])

    quantized = quantize_per_channel(weight, 16, 0)

    half_step = quantized.scale.max().item() / 2
    torch.testing.assert_close(quantized.dequantize(), weight, rtol=0, atol=half_step * (1 + 1e-6))


def test_32_bits_rejected():
    with pytest.raises(ValueError, match="from 2 to 16"):
        quantize_per_channel(torch.tensor([[1.0, -0.5]]), 32, 0)


class SmallNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 3, 3)
        self.up = nn.ConvTranspose2d(3, 2, 2)
        self.fc = nn.Linear(4, 2)


def test_quantize_model_returns_modified_copy():
    torch.manual_seed(0)
    model = SmallNet()
    original = {key: value.clone() for key, value in model.state_dict().items()}

    quantized = quantize_model(model, {"conv": 2, "up": 3})

    assert quantized is not model
    for key, value in original.items():
        assert torch.equal(model.state_dict()[key], value), f"original {key} changed"
    expected_conv = quantize_per_channel(model.conv.weight.detach(), 2, 0).dequantize()
    expected_up = quantize_per_channel(model.up.weight.detach(), 3, 1).dequantize()
    assert torch.equal(quantized.conv.weight.detach(), expected_conv)
    assert torch.equal(quantized.up.weight.detach(), expected_up)
    assert torch.equal(quantized.fc.weight.detach(), model.fc.weight.detach())
    assert torch.equal(quantized.conv.bias.detach(), model.conv.bias.detach())


def test_quantize_model_unknown_layer_raises():
    with pytest.raises(KeyError, match="missing"):
        quantize_model(SmallNet(), {"conv": 4, "missing": 4})


@pytest.mark.parametrize(
    ("module", "expected"),
    [
        (nn.Linear(3, 2), 0),
        (nn.Conv1d(1, 2, 3), 0),
        (nn.Conv2d(1, 2, 3), 0),
        (nn.ConvTranspose1d(2, 3, 2), 1),
        (nn.ConvTranspose2d(2, 3, 2), 1),
        (nn.ConvTranspose3d(2, 3, 2), 1),
    ],
)
def test_channel_axis(module, expected):
    assert channel_axis(module) == expected
    assert module.weight.shape[channel_axis(module)] == (module.out_channels if hasattr(module, "out_channels") else module.out_features)


def reference_quantize_model(model, bit_widths):
    """Quantize a deep copy layer by layer, as quantize_model did before it was split in two."""
    quantized = copy.deepcopy(model)
    modules = dict(quantized.named_modules())
    with torch.no_grad():
        for name, bits in bit_widths.items():
            module = modules[name]
            module.weight.copy_(quantize_per_channel(module.weight, bits, channel_axis(module)).dequantize())
    return quantized


def test_quantize_model_matches_reference():
    torch.manual_seed(1)
    model = SmallNet()
    bit_widths = {"conv": 3, "up": 5, "fc": 16}

    quantized = quantize_model(model, bit_widths)

    expected = reference_quantize_model(model, bit_widths)
    for key, value in expected.state_dict().items():
        assert torch.equal(quantized.state_dict()[key], value), key


def test_quantize_model_is_apply_of_layers():
    torch.manual_seed(2)
    model = SmallNet()
    bit_widths = {"conv": 2, "up": 8}

    composed = apply_quantized(model, quantize_layers(model, bit_widths))

    direct = quantize_model(model, bit_widths)
    for key, value in direct.state_dict().items():
        assert torch.equal(composed.state_dict()[key], value), key


def test_quantize_layers_codes_and_axes():
    torch.manual_seed(3)
    model = SmallNet()

    layers = quantize_layers(model, {"conv": 4, "up": 6})

    assert set(layers) == {"conv", "up"}
    assert layers["conv"].bits == 4
    assert layers["up"].axis == 1
    assert torch.equal(layers["up"].codes, quantize_per_channel(model.up.weight.detach(), 6, 1).codes)
    assert not layers["conv"].codes.requires_grad


def test_quantize_layers_rejects_bad_layers():
    with pytest.raises(KeyError, match="missing"):
        quantize_layers(SmallNet(), {"missing": 4})
    with pytest.raises(TypeError, match="cannot be quantized"):
        quantize_layers(nn.Sequential(nn.Linear(2, 2), nn.ReLU()), {"1": 4})


def test_apply_quantized_accepts_other_rounding():
    # Codes one step away from round-to-nearest, still on the grid, must be applied as given.
    torch.manual_seed(4)
    model = SmallNet()
    nearest = quantize_layers(model, {"conv": 3})["conv"]
    levels = 3
    codes = torch.clamp(nearest.codes + torch.randint(-1, 2, nearest.codes.shape), -levels, levels)
    other = QuantizedTensor(codes, nearest.scale, 3, 0)

    applied = apply_quantized(model, {"conv": other})

    assert not torch.equal(codes, nearest.codes)
    assert torch.equal(applied.conv.weight.detach(), codes.float() * nearest.scale)
    assert torch.equal(applied.fc.weight.detach(), model.fc.weight.detach())


def apply_with(model, name, **changes):
    q = quantize_layers(model, {name: 4})[name]
    fields = {"codes": q.codes, "scale": q.scale, "bits": q.bits, "axis": q.axis, **changes}
    return apply_quantized(model, {name: QuantizedTensor(**fields)})


def test_apply_quantized_rejects_out_of_range_codes():
    model = SmallNet()
    codes = quantize_layers(model, {"conv": 4})["conv"].codes.clone()
    codes[0, 0, 0, 0] = 8

    with pytest.raises(ValueError, match=r"outside \[-7, 7\]"):
        apply_with(model, "conv", codes=codes)


def test_apply_quantized_rejects_wrong_shape():
    with pytest.raises(ValueError, match="do not match layer 'conv'"):
        apply_with(SmallNet(), "conv", codes=torch.zeros(3, 1, 2, 2, dtype=torch.int32))


def test_apply_quantized_rejects_float_codes():
    model = SmallNet()
    codes = quantize_layers(model, {"conv": 4})["conv"].codes.float()

    with pytest.raises(ValueError, match="integer dtype"):
        apply_with(model, "conv", codes=codes)


def test_apply_quantized_rejects_flat_scale():
    model = SmallNet()
    scale = quantize_layers(model, {"conv": 4})["conv"].scale.reshape(-1)

    with pytest.raises(ValueError, match="one scale per channel"):
        apply_with(model, "conv", scale=scale)


@pytest.mark.parametrize("scale_value", [0.0, -1.0, float("nan")])
def test_apply_quantized_rejects_bad_scale(scale_value):
    model = SmallNet()
    scale = quantize_layers(model, {"conv": 4})["conv"].scale.clone()
    scale[1] = scale_value

    with pytest.raises(ValueError, match="finite and positive"):
        apply_with(model, "conv", scale=scale)


def test_apply_quantized_rejects_bad_bits():
    with pytest.raises(ValueError, match="invalid bit width 17 for layer 'conv'"):
        apply_with(SmallNet(), "conv", bits=17)


def test_apply_quantized_rejects_unknown_layer():
    model = SmallNet()
    q = quantize_layers(model, {"conv": 4})["conv"]

    with pytest.raises(KeyError, match="missing"):
        apply_quantized(model, {"missing": q})


def test_apply_quantized_rejects_plain_tensor():
    model = SmallNet()
    with pytest.raises(TypeError, match=r"quantized\['conv'\] is a Tensor"):
        apply_quantized(model, {"conv": torch.zeros_like(model.conv.weight)})


@pytest.mark.parametrize("shape, axis", [((3, 0), 0), ((0, 3), 0), ((2, 0, 3, 3), 0), ((4, 0, 2), 1), ((0,), 0)])
def test_empty_weight_quantizes(shape, axis):
    quantized = quantize_per_channel(torch.zeros(shape), 4, axis)
    assert quantized.codes.shape == shape
    assert quantized.dequantize().shape == shape
    quantized.validate(shape)
