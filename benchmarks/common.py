"""The trained ResNet-34 and a calibration batch, shared by the benchmark scripts."""

from __future__ import annotations

import torch

from cet.data import calibration_set, load_fashion_mnist
from cet.training import FineTuneConfig, TrainConfig, reference_model


def trained_resnet34(device: str = "cpu"):
    """Return the book's float32 ResNet-34 (from the checkpoint cache) and the Fashion-MNIST training split."""
    data = load_fashion_mnist()
    model = reference_model(TrainConfig(), FineTuneConfig(), data.train, device=device).model
    return model, data.train


def calibration_batch(train, size: int, seed: int = 0, device: str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """Return the book's calibration images and labels as one batch."""
    images, labels = calibration_set(train, size, seed).tensors
    return images.to(device), labels.to(device)


def synchronize(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()
