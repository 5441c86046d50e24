"""Bad inputs across the package: each gets an error that names the problem, and nothing is lost."""

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from cet import data
from cet.allocate import allocate_bits
from cet.geometry import classify_quadric, semi_axes
from cet.hessian import LayerHessian
from cet.quantize import quantize_model, quantize_per_channel
from cet.training import TrainConfig, checkpoint_path, train_or_load


def tiny_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))


def tiny_batches():
    generator = torch.Generator().manual_seed(1)
    return [(torch.randn(6, 3, generator=generator), torch.randint(0, 2, (6,), generator=generator))]


@pytest.mark.parametrize("content", [b"", b"not a checkpoint", b"PK\x03\x04truncated"])
def test_corrupt_checkpoint_named(tmp_path, monkeypatch, content):
    monkeypatch.setenv("CET_CACHE", str(tmp_path))
    config = TrainConfig(epochs=1, train_size=8)
    path = checkpoint_path(config)
    path.parent.mkdir(parents=True)
    path.write_bytes(content)
    train_set = TensorDataset(torch.zeros(8, 1, 28, 28), torch.zeros(8, dtype=torch.long))

    with pytest.raises(ValueError, match="retrain=True") as error:
        train_or_load(config, train_set)

    assert str(path) in str(error.value)
    assert path.read_bytes() == content


def test_unwritable_cache_fails_before_training(tmp_path, monkeypatch):
    blocker = tmp_path / "file"
    blocker.write_text("")
    monkeypatch.setenv("CET_CACHE", str(blocker))
    train_set = TensorDataset(torch.zeros(8, 1, 28, 28), torch.zeros(8, dtype=torch.long))
    with pytest.raises(OSError, match="CET_CACHE"):
        train_or_load(TrainConfig(epochs=1, train_size=8), train_set)


def test_nan_weights_fail_hessian():
    model = tiny_model()
    with torch.no_grad():
        model[0].weight[0, 0] = float("nan")
    with pytest.raises(FloatingPointError, match="NaN or infinite outputs"):
        LayerHessian(model, {"0": model[0]}, tiny_batches())


def test_closed_hessian_rejects_products():
    model = tiny_model()
    hessian = LayerHessian(model, {"0": model[0]}, tiny_batches())
    hessian.close()
    with pytest.raises(RuntimeError, match="closed"):
        hessian.hvp("0", torch.ones(4, 3))
    with pytest.raises(RuntimeError, match="closed"):
        hessian.gradient("0")


def test_unknown_layer_named():
    model = tiny_model()
    with LayerHessian(model, {"0": model[0]}, tiny_batches()) as hessian:
        with pytest.raises(KeyError, match="'9'"):
            hessian.hvp("9", torch.ones(4, 3))


def test_missing_cet_data_not_skipped(tmp_path, monkeypatch):
    monkeypatch.setenv("CET_DATA", str(tmp_path / "nowhere"))
    with pytest.raises(data.DataNotFoundError, match="CET_DATA is set to"):
        data.find_fashion_mnist()


def test_corrupt_gzip_names_file(tmp_path):
    path = tmp_path / "labels-idx1-ubyte.gz"
    path.write_bytes(b"hello, not gzip")
    with pytest.raises(ValueError, match="labels-idx1-ubyte.gz"):
        data.read_idx(path)


@pytest.mark.parametrize("eigenvalues", [[1.0, float("nan")], [float("inf"), 1.0], [float("-inf"), 1.0]])
def test_nonfinite_eigenvalues_rejected(eigenvalues):
    with pytest.raises(ValueError, match="finite"):
        classify_quadric(torch.tensor(eigenvalues))
    with pytest.raises(ValueError, match="finite"):
        semi_axes(torch.tensor(eigenvalues), 1.0)


def test_negative_known_zeros_rejected():
    with pytest.raises(ValueError, match="known_zero_eigenvalues"):
        classify_quadric(torch.tensor([1.0]), known_zero_eigenvalues=-1)


@pytest.mark.parametrize("sizes", [[float("nan"), 200], [-5, 200], [0, 0], [], [[10, 20]]])
def test_invalid_sizes_rejected(sizes):
    costs = np.zeros((max(len(sizes), 1), 2)) if sizes and not isinstance(sizes[0], list) else np.zeros((1, 2))
    with pytest.raises(ValueError, match="invalid layer sizes"):
        allocate_bits(costs, sizes, [2, 4], 8.0)


def test_numpy_integer_bits_accepted():
    weight = torch.randn(3, 4)
    expected = quantize_per_channel(weight, 4).dequantize()
    torch.testing.assert_close(quantize_per_channel(weight, np.int64(4)).dequantize(), expected)


def test_quantize_model_rejects_activation():
    with pytest.raises(TypeError, match="ReLU, which cannot be quantized"):
        quantize_model(tiny_model(), {"1": 4})
