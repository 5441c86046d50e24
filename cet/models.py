"""Models: torchvision's ResNet-34 adapted to 28x28 grey-scale images, and its quantizable layers."""

from __future__ import annotations

from collections import OrderedDict

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models import resnet34

__all__ = ["QUANTIZABLE_TYPES", "fashion_resnet34", "quantizable_layers", "zero_gradient_weights"]

QUANTIZABLE_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)
"""Layer types whose weight tensors CET quantizes; every other parameter stays in float32."""


def fashion_resnet34(num_classes: int = 10) -> nn.Module:
    """Build torchvision's ResNet-34 with a one-channel stem for 28x28 inputs.

    Only ``conv1`` changes: a 3x3 convolution with stride 2 takes one channel instead of three. With the
    max-pool that follows, the stages see 7x7, 4x4, 2x2 and 1x1 feature maps (ImageNet's 224x224 images
    give 56x56 to 7x7), which keeps training affordable on a CPU. All layer names are torchvision's, so
    state dicts and layer-wise reports read the same as for the ImageNet model.
    """
    # Limitation: on 1x1 maps a 3x3 convolution with padding 1 uses only its centre tap. Most weights of
    # layer4 therefore never touch the data and quantize for free (see zero_gradient_weights).

    # Zero-initialising the last BatchNorm of each residual block makes every block start as the
    # identity, which keeps the first epochs stable (Goyal et al., 2017).
    model = resnet34(num_classes=num_classes, zero_init_residual=True)
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


def zero_gradient_weights(model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor) -> dict[str, int]:
    """Count, per quantizable layer, the weights whose cross-entropy gradient on a batch is exactly zero.

    Such weights (kernel taps that only ever meet padding, or channels that ReLU always silences) do
    not change the outputs on these inputs, so quantizing them costs nothing. The model is evaluated in
    eval mode and left in its original mode; gradients already stored on parameters are not touched.
    """
    was_training = model.training
    model.eval()
    layers = quantizable_layers(model)
    weights = [module.weight for module in layers.values()]
    try:
        loss = F.cross_entropy(model(inputs), targets)
        gradients = torch.autograd.grad(loss, weights, allow_unused=True)
    finally:
        model.train(was_training)
    return {
        name: weight.numel() if gradient is None else int((gradient == 0).sum())
        for (name, weight), gradient in zip(((n, m.weight) for n, m in layers.items()), gradients)
    }
