"""Tests of cet.export: bit packing, exact reloading, file sizes and the errors of damaged or mismatched files."""

import io
import math
import os

import pytest
import torch
import torchvision
from torch import nn

import cet.io
from cet.export import (
    FORMAT_VERSION, PackedFileError, load_packed, pack_codes, save_packed, unpack_codes,
)
from cet.quantize import QuantizedTensor, apply_quantized, quantize_layers, quantize_model


class SmallConvNet(nn.Module):
    """A convolution, a BatchNorm, a transposed convolution and a linear layer: every weight layout."""

    def __init__(self, channels=4):
        super().__init__()
        self.conv = nn.Conv2d(3, channels, 3, padding=1)
        self.norm = nn.BatchNorm2d(channels)
        self.up = nn.ConvTranspose2d(channels, 2, 2, stride=2)
        self.fc = nn.Linear(2 * 8 * 8, 5)

    def forward(self, x):
        x = torch.relu(self.norm(self.conv(x)))
        x = self.up(x)
        return self.fc(x.flatten(1))


def small_conv_net(seed=0, channels=4):
    torch.manual_seed(seed)
    model = SmallConvNet(channels)
    # Non-trivial running statistics, so that a BatchNorm buffer lost on the way would change the output.
    model.norm.running_mean.uniform_(-1, 1)
    model.norm.running_var.uniform_(0.5, 2)
    model.norm.num_batches_tracked.fill_(17)
    return model.eval()


def assert_same_state(actual, expected):
    assert actual.state_dict().keys() == expected.state_dict().keys()
    for key, value in expected.state_dict().items():
        assert actual.state_dict()[key].dtype == value.dtype, key
        assert torch.equal(actual.state_dict()[key], value), key


@pytest.mark.parametrize("bits", range(2, 17))
@pytest.mark.parametrize("count", [1, 3, 7, 8, 13, 1001])
def test_pack_round_trip(bits, count):
    levels = 2 ** (bits - 1) - 1
    generator = torch.Generator().manual_seed(bits * 10_000 + count)
    codes = torch.randint(-levels, levels + 1, (count,), generator=generator, dtype=torch.int32)
    codes[0] = -levels
    if count > 1:
        codes[-1] = levels
    if count > 2:
        codes[1] = 0

    packed = pack_codes(codes, bits)

    assert packed.dtype == torch.uint8
    assert packed.numel() == math.ceil(count * bits / 8)
    assert torch.equal(unpack_codes(packed, bits, count), codes)


@pytest.mark.parametrize("bits", [2, 3, 8, 16])
def test_pack_offset_binary_layout(bits):
    # The most negative code is 1 in offset binary, so its b bits are 0...01, most significant first.
    levels = 2 ** (bits - 1) - 1

    packed = pack_codes(torch.tensor([-levels] * 8), bits)

    expected_bits = ([0] * (bits - 1) + [1]) * 8
    expected = [int("".join(map(str, expected_bits[i:i + 8])), 2) for i in range(0, len(expected_bits), 8)]
    assert packed.tolist() == expected


def test_pack_keeps_shape_order():
    codes = torch.arange(-7, 8, dtype=torch.int32).reshape(3, 5)

    unpacked = unpack_codes(pack_codes(codes, 4), 4, codes.numel())

    assert torch.equal(unpacked.reshape(3, 5), codes)


@pytest.mark.parametrize("bad_code", [2, -2])
def test_pack_rejects_codes_outside_grid(bad_code):
    with pytest.raises(ValueError, match=r"outside \[-1, 1\]"):
        pack_codes(torch.tensor([0, bad_code]), 2)


def test_unpack_rejects_wrong_length():
    packed = pack_codes(torch.zeros(10, dtype=torch.int32), 3)

    with pytest.raises(PackedFileError, match="4 bytes"):
        unpack_codes(packed[:-1], 3, 10)


def test_unpack_rejects_nonzero_padding():
    packed = pack_codes(torch.zeros(3, dtype=torch.int32), 3).clone()
    packed[-1] |= 1

    with pytest.raises(PackedFileError, match="padding bits"):
        unpack_codes(packed, 3, 3)


def test_unpack_rejects_code_below_grid():
    with pytest.raises(PackedFileError, match="outside the symmetric 4-bit grid"):
        unpack_codes(torch.zeros(2, dtype=torch.uint8), 4, 4)


def test_small_net_outputs_equal_simulated(tmp_path):
    model = small_conv_net()
    bit_widths = {"conv": 3, "up": 2, "fc": 7}
    path = tmp_path / "small.pt"

    save_packed(model, quantize_layers(model, bit_widths), path)
    loaded = load_packed(path, SmallConvNet().eval())

    simulated = quantize_model(model, bit_widths)
    inputs = torch.randn(4, 3, 4, 4, generator=torch.Generator().manual_seed(5))
    assert torch.equal(loaded(inputs), simulated(inputs))
    assert_same_state(loaded, simulated)


def test_resnet18_outputs_equal_simulated(tmp_path):
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=10).eval()
    layer_names = [name for name, module in model.named_modules() if isinstance(module, (nn.Conv2d, nn.Linear))]
    widths = [2, 3, 4, 5, 6, 8, 11, 16]
    # Every other layer stays float32, so the file mixes packed and unchanged weights.
    bit_widths = {name: widths[i % len(widths)] for i, name in enumerate(layer_names) if i % 2 == 0}
    path = tmp_path / "resnet18.pt"

    info = save_packed(model, quantize_layers(model, bit_widths), path, {"architecture": "resnet18"})
    loaded = load_packed(path, torchvision.models.resnet18(num_classes=10).eval())

    simulated = quantize_model(model, bit_widths)
    inputs = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        assert torch.equal(loaded(inputs), simulated(inputs))
    assert_same_state(loaded, simulated)
    assert info.file_bytes < info.fp32_state_dict_bytes


def test_other_rounding_codes_round_trip(tmp_path):
    model = small_conv_net(seed=1)
    nearest = quantize_layers(model, {"conv": 4, "fc": 2})
    generator = torch.Generator().manual_seed(7)
    changed = {}
    for name, q in nearest.items():
        levels = 2 ** (q.bits - 1) - 1
        step = torch.randint(-1, 2, q.codes.shape, generator=generator, dtype=torch.int32)
        changed[name] = QuantizedTensor(torch.clamp(q.codes + step, -levels, levels), q.scale, q.bits, q.axis)
    path = tmp_path / "other.pt"

    save_packed(model, changed, path)
    loaded = load_packed(path, SmallConvNet().eval())

    payload = torch.load(path, weights_only=True)
    for name, q in changed.items():
        layer = payload["layers"][name]
        assert torch.equal(unpack_codes(layer["codes"], layer["bits"], q.codes.numel()).reshape(q.codes.shape), q.codes)
    assert_same_state(loaded, apply_quantized(model, changed))


def test_file_loads_with_weights_only(tmp_path):
    model = small_conv_net()
    path = tmp_path / "plain.pt"

    save_packed(model, quantize_layers(model, {"conv": 4}), path, {"run": "seed 0", "accuracy": 0.91, "widths": [2, 4]})

    payload = torch.load(path, weights_only=True)
    assert payload["format"] == "cet-packed"
    assert payload["version"] == FORMAT_VERSION
    assert payload["bit_widths"] == {"conv": 4}
    assert payload["architecture"].endswith("SmallConvNet")
    assert payload["metadata"] == {"run": "seed 0", "accuracy": 0.91, "widths": [2, 4]}
    assert "conv.weight" not in payload["state"]
    assert torch.equal(payload["state"]["norm.num_batches_tracked"], torch.tensor(17))
    assert torch.equal(payload["state"]["conv.bias"], model.conv.bias.detach())


@pytest.mark.parametrize("bits", [2, 4])
def test_file_smaller_than_fp32(tmp_path, bits):
    torch.manual_seed(8)
    model = nn.Sequential(nn.Linear(1024, 1023))
    count = 1024 * 1023
    path = tmp_path / "packed" / "linear.pt"

    info = save_packed(model, quantize_layers(model, {"0": bits}), path)

    fp32_path = tmp_path / "linear.pt"
    torch.save(model.state_dict(), fp32_path)
    assert info.packed_code_bytes == math.ceil(count * bits / 8)
    assert info.scale_bytes == 4 * 1023
    assert info.quantized_weight_count == count
    assert info.file_bytes == os.path.getsize(path)
    assert info.fp32_state_dict_bytes == os.path.getsize(fp32_path)
    assert info.weight_compression_ratio == pytest.approx(32 / bits, rel=1e-5)
    # The bias, the scales and the archive's overhead cost about 3% of the 2-bit file.
    assert 0.9 * 32 / bits < info.file_compression_ratio < 32 / bits
    assert info.file_compression_ratio == info.fp32_state_dict_bytes / info.file_bytes


def test_not_packed_file_raises(tmp_path):
    path = tmp_path / "state.pt"
    torch.save(small_conv_net().state_dict(), path)

    with pytest.raises(PackedFileError, match="not a packed model file"):
        load_packed(path, SmallConvNet())


def test_wrong_version_raises(tmp_path):
    model = small_conv_net()
    path = tmp_path / "future.pt"
    save_packed(model, quantize_layers(model, {"conv": 4}), path)
    payload = torch.load(path, weights_only=True)
    payload["version"] = FORMAT_VERSION + 1
    torch.save(payload, path)

    with pytest.raises(PackedFileError, match=f"version {FORMAT_VERSION + 1}"):
        load_packed(path, SmallConvNet())


def test_truncated_file_raises(tmp_path):
    model = small_conv_net()
    path = tmp_path / "truncated.pt"
    save_packed(model, quantize_layers(model, {"conv": 4}), path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])

    with pytest.raises(PackedFileError, match="damaged"):
        load_packed(path, SmallConvNet())


def test_flipped_bit_raises(tmp_path):
    # torch.load ignores the zip checksums, so without a check these flips would load as other weights.
    model = small_conv_net()
    path = tmp_path / "model.pt"
    save_packed(model, quantize_layers(model, {"conv": 4, "fc": 3}), path)
    data = path.read_bytes()
    damaged = tmp_path / "damaged.pt"
    # The entries' headers and data; the central directory after them is not covered by the checksums.
    for position in range(0, data.index(b"PK\x01\x02"), 5):
        flipped = bytearray(data)
        flipped[position] ^= 0x10
        damaged.write_bytes(bytes(flipped))
        try:
            loaded = load_packed(damaged, SmallConvNet())
        except PackedFileError:
            continue
        expected = load_packed(path, SmallConvNet()).state_dict()
        for key, value in loaded.state_dict().items():
            assert torch.equal(value, expected[key]), f"byte {position} changed {key} without an error"


def test_directory_raises(tmp_path):
    with pytest.raises(PackedFileError, match="is a directory"):
        load_packed(tmp_path, SmallConvNet())


def test_garbage_file_raises(tmp_path):
    path = tmp_path / "garbage.pt"
    path.write_bytes(os.urandom(1000))

    with pytest.raises(PackedFileError, match="cannot read"):
        load_packed(path, SmallConvNet())


def test_short_packed_codes_raise(tmp_path):
    model = small_conv_net()
    path = tmp_path / "short.pt"
    save_packed(model, quantize_layers(model, {"fc": 3}), path)
    payload = torch.load(path, weights_only=True)
    payload["layers"]["fc"]["codes"] = payload["layers"]["fc"]["codes"][:-1].clone()
    torch.save(payload, path)

    with pytest.raises(PackedFileError, match="layer 'fc'.*damaged"):
        load_packed(path, SmallConvNet())


def test_missing_field_raises(tmp_path):
    model = small_conv_net()
    path = tmp_path / "field.pt"
    save_packed(model, quantize_layers(model, {"fc": 3}), path)
    payload = torch.load(path, weights_only=True)
    del payload["layers"]["fc"]["scale"]
    torch.save(payload, path)

    with pytest.raises(PackedFileError, match="lacks a field"):
        load_packed(path, SmallConvNet())


def test_wrong_architecture_lists_keys(tmp_path):
    torch.manual_seed(9)
    model = torchvision.models.resnet18(num_classes=10)
    path = tmp_path / "resnet18.pt"
    save_packed(model, quantize_layers(model, {"conv1": 4}), path)

    with pytest.raises(ValueError, match="missing from the file: conv.bias") as raised:
        load_packed(path, SmallConvNet())

    message = str(raised.value)
    assert "not in the model: bn1.bias" in message
    assert "ResNet" in message
    assert "more" in message


def test_wrong_shapes_listed(tmp_path):
    model = small_conv_net(channels=4)
    path = tmp_path / "narrow.pt"
    save_packed(model, quantize_layers(model, {"conv": 4}), path)

    with pytest.raises(ValueError, match=r"shapes differ: conv.weight: file \(4, 3, 3, 3\), model \(6, 3, 3, 3\)"):
        load_packed(path, SmallConvNet(channels=6))


def test_missing_file_raises(tmp_path):
    with pytest.raises(FileNotFoundError):
        load_packed(tmp_path / "absent.pt", SmallConvNet())


def test_interrupted_write_keeps_old_file(tmp_path, monkeypatch):
    model = small_conv_net()
    path = tmp_path / "model.pt"
    save_packed(model, quantize_layers(model, {"conv": 4}), path)
    old_bytes = path.read_bytes()
    real_save = torch.save

    def save_half_then_fail(obj, stream):
        buffer = io.BytesIO()
        real_save(obj, buffer)
        stream.write(buffer.getvalue()[: buffer.tell() // 2])
        raise OSError("No space left on device")

    monkeypatch.setattr(cet.io.torch, "save", save_half_then_fail)

    with pytest.raises(OSError, match="No space left"):
        save_packed(model, quantize_layers(model, {"conv": 2, "fc": 2}), path)

    assert path.read_bytes() == old_bytes
    assert sorted(os.listdir(tmp_path)) == ["model.pt"]


def test_unknown_layer_raises(tmp_path):
    model = small_conv_net()
    q = quantize_layers(model, {"conv": 4})["conv"]

    with pytest.raises(KeyError, match="missing"):
        save_packed(model, {"missing": q}, tmp_path / "x.pt")
    assert not (tmp_path / "x.pt").exists()


def test_out_of_range_codes_raise(tmp_path):
    model = small_conv_net()
    q = quantize_layers(model, {"conv": 4})["conv"]
    codes = q.codes.clone()
    codes[0, 0, 0, 0] = -8

    with pytest.raises(ValueError, match=r"outside \[-7, 7\]"):
        save_packed(model, {"conv": QuantizedTensor(codes, q.scale, 4, 0)}, tmp_path / "x.pt")
    assert not (tmp_path / "x.pt").exists()


def test_float64_scale_raises(tmp_path):
    model = small_conv_net().double()

    with pytest.raises(ValueError, match="float32 scales"):
        save_packed(model, quantize_layers(model, {"conv": 4}), tmp_path / "x.pt")


@pytest.mark.parametrize("metadata", [{"weights": torch.ones(2)}, {1: "a"}, {"nested": [object()]}])
def test_invalid_metadata_raises(tmp_path, metadata):
    model = small_conv_net()

    with pytest.raises(ValueError, match="invalid (value|key)"):
        save_packed(model, quantize_layers(model, {"conv": 4}), tmp_path / "x.pt", metadata)


class TiedLinears(nn.Module):
    """Two linear layers that share one weight tensor."""

    def __init__(self):
        super().__init__()
        self.first = nn.Linear(4, 4)
        self.second = nn.Linear(4, 4)
        self.second.weight = self.first.weight

    def forward(self, x):
        return self.second(self.first(x))


def test_tied_weight_raises(tmp_path):
    # The file would keep the float copy under the other name, and loading it would undo the quantization.
    torch.manual_seed(0)
    model = TiedLinears()
    path = tmp_path / "tied.pt"

    with pytest.raises(ValueError, match=r"layer 'first' shares its weight with second\.weight"):
        save_packed(model, quantize_layers(model, {"first": 3}), path)
    assert not path.exists()


def test_root_layer_round_trip(tmp_path):
    torch.manual_seed(0)
    model = nn.Linear(6, 3)
    quantized = quantize_layers(model, {"": 4})
    path = tmp_path / "linear.pt"

    save_packed(model, quantized, path)
    loaded = load_packed(path, nn.Linear(6, 3))

    assert_same_state(loaded, apply_quantized(model, quantized))


def test_plain_tensor_codes_raise(tmp_path):
    model = small_conv_net()

    with pytest.raises(TypeError, match=r"quantized\['conv'\] is a Tensor"):
        save_packed(model, {"conv": torch.zeros(4, 3, 3, 3)}, tmp_path / "x.pt")
    assert not (tmp_path / "x.pt").exists()


@pytest.mark.parametrize("target", [None, SmallConvNet], ids=["none", "class"])
def test_load_into_non_module_raises(tmp_path, target):
    model = small_conv_net()
    path = tmp_path / "model.pt"
    save_packed(model, quantize_layers(model, {"conv": 4}), path)

    with pytest.raises(TypeError, match="model must be an nn.Module instance"):
        load_packed(path, target)
