"""Tests of the data sources (image folders, CIFAR-10) and of loading weights from local files."""

import pickle

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn
from torch.utils.data import TensorDataset

from cet.data import (
    CIFAR10_MEAN,
    CIFAR10_STD,
    IMAGENET_MEAN,
    IMAGENET_STD,
    DataNotFoundError,
    calibration_set,
    draw_calibration_set,
    load_cifar10,
    load_data_source,
    load_image_folder,
)
from cet.models import (
    WeightsError,
    load_state_dict_file,
    load_torchvision_model,
    load_weights,
    unquantizable_layers,
)


def write_cifar10(directory, train_per_batch=2, test_count=3, seed=0):
    """Write the six python-format CIFAR-10 batches with random pixels; return the arrays written."""
    rng = np.random.default_rng(seed)
    directory.mkdir(parents=True, exist_ok=True)
    written = {}
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    for name in names:
        count = test_count if name == "test_batch" else train_per_batch
        pixels = rng.integers(0, 256, size=(count, 3072), dtype=np.uint8)
        labels = rng.integers(0, 10, size=count).tolist()
        with open(directory / name, "wb") as handle:
            pickle.dump({b"data": pixels, b"labels": labels, b"batch_label": name.encode()}, handle)
        written[name] = (pixels, labels)
    return written


def write_image_folder(directory, classes=("n01440764", "n01443537"), per_class=2, size=(40, 30), seed=0):
    """Write random RGB PNG images in one sub-folder per class (ImageNet's validation layout)."""
    rng = np.random.default_rng(seed)
    for name in classes:
        (directory / name).mkdir(parents=True, exist_ok=True)
        for index in range(per_class):
            pixels = rng.integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8)
            Image.fromarray(pixels).save(directory / name / f"image_{index}.png")


def test_cifar10_reads_batches_in_order(tmp_path):
    written = write_cifar10(tmp_path)
    train, test = load_cifar10(tmp_path)

    assert train.tensors[0].shape == (10, 3, 32, 32)
    assert test.tensors[0].shape == (3, 3, 32, 32)
    pixels, labels = written["data_batch_2"]
    # The third training image is the first of data_batch_2; channel-major rows, red plane first.
    expected = (pixels[0].reshape(3, 32, 32) / 255.0 - np.array(CIFAR10_MEAN)[:, None, None]) / np.array(CIFAR10_STD)[:, None, None]
    np.testing.assert_allclose(train.tensors[0][2].numpy(), expected, rtol=1e-5, atol=1e-5)
    assert train.tensors[1][2].item() == labels[0]
    assert test.tensors[1].tolist() == written["test_batch"][1]


def test_cifar10_finds_archive_folder(tmp_path):
    write_cifar10(tmp_path / "cifar-10-batches-py")
    source = load_data_source(f"cifar10:{tmp_path}")
    assert source.num_classes == 10
    assert len(source.calibration_pool) == 10
    assert len(source.evaluation) == 3


def test_cifar10_missing_batches_listed(tmp_path):
    with pytest.raises(DataNotFoundError, match="missing data_batch_1, .*test_batch"):
        load_cifar10(tmp_path)


def test_cifar10_rejects_foreign_pickle(tmp_path):
    write_cifar10(tmp_path)
    with open(tmp_path / "data_batch_3", "wb") as handle:
        pickle.dump([1, 2, 3], handle)
    with pytest.raises(ValueError, match="invalid CIFAR-10 batch .*data_batch_3"):
        load_cifar10(tmp_path)


def test_image_folder_applies_imagenet_transform(tmp_path):
    write_image_folder(tmp_path, size=(40, 30))
    calibration_pool, evaluation = load_image_folder(tmp_path, crop_size=16)

    assert calibration_pool is evaluation
    assert evaluation.classes == ["n01440764", "n01443537"]
    image, label = evaluation[2]
    assert image.shape == (3, 16, 16)
    assert label == 1
    # A uniform grey image survives resizing and cropping unchanged, so normalisation is checked exactly.
    grey = tmp_path / "n01440764" / "image_0.png"
    Image.fromarray(np.full((30, 40, 3), 128, dtype=np.uint8)).save(grey)
    image, _ = evaluation[0]
    expected = (128 / 255 - torch.tensor(IMAGENET_MEAN)) / torch.tensor(IMAGENET_STD)
    torch.testing.assert_close(image[:, 0, 0], expected)


def test_image_folder_uses_train_and_val(tmp_path):
    write_image_folder(tmp_path / "train", per_class=3)
    write_image_folder(tmp_path / "val", per_class=1)
    source = load_data_source(f"imagefolder:{tmp_path}", image_size=8)
    assert len(source.calibration_pool) == 6
    assert len(source.evaluation) == 2
    assert source.num_classes == 2


@pytest.mark.parametrize("kind", ["imagefolder", "cifar10", "fashion-mnist"])
def test_missing_data_directory_named(tmp_path, kind):
    missing = tmp_path / "nowhere"
    with pytest.raises(DataNotFoundError, match="not found") as error:
        load_data_source(f"{kind}:{missing}")
    assert str(missing) in str(error.value)


def test_empty_image_folder_named(tmp_path):
    with pytest.raises(DataNotFoundError, match="contains no images in class sub-folders") as error:
        load_data_source(f"imagefolder:{tmp_path}")
    assert str(tmp_path) in str(error.value)


def test_image_folder_empty_classes_named(tmp_path):
    (tmp_path / "n01440764").mkdir()
    with pytest.raises(DataNotFoundError, match="contains no images"):
        load_data_source(f"imagefolder:{tmp_path}")


@pytest.mark.parametrize("spec", ["mnist:/data", "imagefolder", "cifar10:"])
def test_data_spec_rejected(spec):
    with pytest.raises(ValueError, match="invalid data specification"):
        load_data_source(spec)


def test_calibration_draw_matches_tensor_draw():
    dataset = TensorDataset(torch.arange(20.0).view(20, 1), torch.arange(20))
    drawn = draw_calibration_set(dataset, 5, seed=3)
    reference = calibration_set(dataset, 5, seed=3)
    assert torch.equal(drawn.tensors[0], reference.tensors[0])


def test_calibration_draw_from_image_folder(tmp_path):
    write_image_folder(tmp_path, per_class=3)
    _, evaluation = load_image_folder(tmp_path, crop_size=8)
    drawn = draw_calibration_set(evaluation, 4, seed=0)
    assert drawn.tensors[0].shape == (4, 3, 8, 8)
    assert drawn.tensors[1].dtype == torch.int64


def test_calibration_larger_than_data_named():
    dataset = TensorDataset(torch.zeros(6, 1), torch.zeros(6, dtype=torch.long))
    with pytest.raises(ValueError, match="the data provide 6 samples to draw from; choose a calibration size from 1 to 6"):
        draw_calibration_set(dataset, 7, seed=0)


def small_resnet_state(num_classes=10):
    import torchvision

    torch.manual_seed(0)
    return torchvision.models.resnet18(num_classes=num_classes).state_dict()


def test_weights_state_dict_loads(tmp_path):
    state = small_resnet_state()
    torch.save(state, tmp_path / "w.pt")
    model = load_torchvision_model("resnet18", tmp_path / "w.pt", num_classes=10)
    assert torch.equal(model.fc.weight, state["fc.weight"])
    assert not model.training


def test_weights_checkpoint_and_prefix(tmp_path):
    state = small_resnet_state()
    wrapped = {"epoch": 3, "state_dict": {f"module.{key}": value for key, value in state.items()}}
    torch.save(wrapped, tmp_path / "checkpoint.pth")
    loaded = load_state_dict_file(tmp_path / "checkpoint.pth")
    assert loaded.keys() == state.keys()
    model = load_torchvision_model("resnet18", tmp_path / "checkpoint.pth", num_classes=10)
    assert torch.equal(model.conv1.weight, state["conv1.weight"])


def test_partial_weights_list_keys(tmp_path):
    state = small_resnet_state()
    del state["layer1.0.conv1.weight"]
    state["extra.weight"] = torch.zeros(1)
    torch.save(state, tmp_path / "w.pt")
    with pytest.raises(WeightsError, match="partial load is not allowed") as error:
        load_torchvision_model("resnet18", tmp_path / "w.pt", num_classes=10)
    assert "missing keys: layer1.0.conv1.weight" in str(error.value)
    assert "unexpected keys: extra.weight" in str(error.value)


def test_class_count_mismatch_explained(tmp_path):
    torch.save(small_resnet_state(num_classes=10), tmp_path / "w.pt")
    with pytest.raises(WeightsError, match="have 10 output classes in fc.weight, but the model was built for 1000; "
                                          "pass --num-classes 10"):
        load_torchvision_model("resnet18", tmp_path / "w.pt")


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_nonfinite_weights_named(tmp_path, value):
    state = small_resnet_state()
    state["layer2.0.conv2.weight"][0, 0, 0, 0] = value
    torch.save(state, tmp_path / "w.pt")
    with pytest.raises(WeightsError, match=r"NaN or infinity in layer2\.0\.conv2\.weight \(1 of 147456 values\)"):
        load_torchvision_model("resnet18", tmp_path / "w.pt", num_classes=10)


def test_unknown_architecture_named(tmp_path):
    with pytest.raises(ValueError, match="unknown torchvision architecture 'resnet35'"):
        load_torchvision_model("resnet35", tmp_path / "w.pt")


def test_weights_file_without_state_dict(tmp_path):
    torch.save([1, 2, 3], tmp_path / "w.pt")
    with pytest.raises(WeightsError, match="contains no state dict"):
        load_state_dict_file(tmp_path / "w.pt")


def test_load_weights_strict_for_own_model():
    model = nn.Sequential(nn.Linear(2, 3), nn.Linear(3, 2))
    state = {"0.weight": torch.zeros(3, 2), "0.bias": torch.zeros(3), "1.weight": torch.zeros(2, 3)}
    with pytest.raises(WeightsError, match="missing keys: 1.bias"):
        load_weights(model, state, "test")


def test_unquantizable_layers_listed():
    class Mixer(nn.Module):
        def __init__(self):
            super().__init__()
            self.mix = nn.Parameter(torch.eye(3))

    model = nn.Sequential(nn.Conv2d(1, 3, 1), nn.BatchNorm2d(3), nn.Embedding(4, 3), Mixer())
    assert unquantizable_layers(model) == {"2": "Embedding", "3": "Mixer"}
