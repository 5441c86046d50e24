"""Models: torchvision's ResNet-34 adapted to 28x28 grey-scale images, and its quantizable layers."""

from __future__ import annotations

from collections import OrderedDict

import torch
from torch import nn
from torchvision.models import resnet34

__all__ = ["QUANTIZABLE_TYPES", "fashion_resnet34", "quantizable_layers"]

QUANTIZABLE_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)
"""Layer types whose weight tensors CET quantizes; every other parameter stays in float32."""


def fashion_resnet34(num_classes: int = 10) -> nn.Module:
    """Build torchvision's ResNet-34 with a one-channel stem for 28x28 inputs.

    Only ``conv1`` changes: a 3x3 convolution with stride 2 takes one channel instead of three. With the
    max-pool that follows, ``layer1`` sees 7x7 feature maps, as it sees 56x56 ones for 224x224 ImageNet
    images, so every stage keeps its relative resolution. All layer names are torchvision's, so state
    dicts and layer-wise reports read the same as for the ImageNet model.
    """
    model = resnet34(num_classes=num_classes)
    model.conv1 = nn.Conv2d(1, 64, kernel_size=3, stride=2, padding=1, bias=False)
    nn.init.kaiming_normal_(model.conv1.weight, mode="fan_out", nonlinearity="relu")
    return model


def quantizable_layers(model: nn.Module) -> OrderedDict[str, nn.Module]:
    """Return the layers whose weights are quantized, by qualified name, in module order.

    Layers whose weight does not require a gradient (frozen) are still listed: quantization does not
    need gradients, only the Hessian analysis does.
    """
    layers = OrderedDict()
    for name, module in model.named_modules():
        if isinstance(module, QUANTIZABLE_TYPES) and isinstance(getattr(module, "weight", None), torch.Tensor):
            layers[name] = module
    return layers
