"""Tests of cet.models: the Fashion-MNIST ResNet-34 and its quantizable layers."""

import torch
from torch import nn

from cet.models import fashion_resnet34, quantizable_layers, zero_gradient_weights


def test_resnet34_keeps_torchvision_names():
    layers = quantizable_layers(fashion_resnet34())
    assert len(layers) == 37
    assert list(layers)[0] == "conv1"
    assert list(layers)[-1] == "fc"
    assert "layer4.0.downsample.0" in layers


def test_resnet34_accepts_grey_28x28():
    logits = fashion_resnet34().eval()(torch.zeros(2, 1, 28, 28))
    assert logits.shape == (2, 10)


def test_zero_gradient_counts_padding_taps():
    torch.manual_seed(0)
    # On a 1x1 input with padding 1, only the centre tap of a 3x3 kernel meets data.
    model = nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.Flatten(), nn.Linear(3, 4))
    model.train()
    counts = zero_gradient_weights(model, torch.randn(5, 2, 1, 1), torch.randint(0, 4, (5,)))
    assert counts["0"] == 2 * 3 * 8
    assert counts["2"] == 0
    assert model.training
