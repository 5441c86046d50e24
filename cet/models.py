"""Models: torchvision's ResNet-34 adapted to 28x28 grey-scale images, its quantizable layers, and
torchvision architectures or the user's own models loaded from local weights files."""

from __future__ import annotations

import importlib
import logging
import os
import sys
from collections import OrderedDict
from collections.abc import Mapping
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models import resnet34

__all__ = [
    "QUANTIZABLE_TYPES",
    "WeightsError",
    "check_finite_weights",
    "fashion_resnet34",
    "import_model_factory",
    "load_state_dict_file",
    "load_torchvision_model",
    "load_weights",
    "quantizable_layers",
    "unquantizable_layers",
    "zero_gradient_weights",
]

logger = logging.getLogger(__name__)

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


class WeightsError(ValueError):
    """Raised when a weights file cannot be loaded into a model; the message names the keys or tensors."""


def unquantizable_layers(model: nn.Module) -> dict[str, str]:
    """Return the layers with a weight matrix or kernel that CET cannot quantize, with their type names.

    These are modules owning a weight of two or more dimensions (embeddings, bilinear layers, transposed
    convolutions, attention projections held as bare parameters) that are not in
    :data:`QUANTIZABLE_TYPES`. Their weights stay float32. Normalisation layers own one-dimensional
    weights and are not listed, since CET never quantizes them.
    """
    skipped = {}
    for name, module in model.named_modules():
        if isinstance(module, QUANTIZABLE_TYPES):
            continue
        if any(parameter.dim() >= 2 for parameter in module.parameters(recurse=False)):
            skipped[name] = type(module).__name__
    return skipped


def check_finite_weights(model: nn.Module, source: str) -> None:
    """Raise :class:`WeightsError` when a parameter or buffer of ``model`` contains NaN or infinity.

    ``source`` names where the weights came from, for the message.
    """
    bad = [
        f"{name} ({int((~torch.isfinite(tensor)).sum())} of {tensor.numel()} values)"
        for name, tensor in model.state_dict().items()
        if tensor.is_floating_point() and not torch.isfinite(tensor).all()
    ]
    if bad:
        listed = ", ".join(bad[:5]) + (f" and {len(bad) - 5} more" if len(bad) > 5 else "")
        raise WeightsError(
            f"the weights from {source} contain NaN or infinity in {listed}; the model cannot be analysed "
            "or quantized. Use a checkpoint saved before training diverged"
        )


def load_state_dict_file(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read a state dict from a file saved with ``torch.save``.

    The file contains either the state dict itself or a checkpoint dictionary with the state dict under
    ``state_dict``, ``model_state_dict`` or ``model``. A ``module.`` prefix on every key, left by
    ``DataParallel`` or ``DistributedDataParallel``, is stripped. The file is loaded with
    ``weights_only=True``, so it cannot run code.

    Raises:
        FileNotFoundError: the file does not exist.
        WeightsError: the file is unreadable or contains no state dict.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"weights file {path} not found")
    try:
        content = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        raise WeightsError(f"weights file {path} is unreadable ({type(error).__name__}: {error})") from error
    state = content
    if isinstance(content, Mapping):
        for key in ("state_dict", "model_state_dict", "model"):
            if isinstance(content.get(key), Mapping):
                state = content[key]
                break
    if not isinstance(state, Mapping) or not state or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise WeightsError(
            f"weights file {path} contains no state dict: expected a dictionary of tensors, or a checkpoint with one "
            "under 'state_dict', 'model_state_dict' or 'model'; save it with torch.save(model.state_dict(), path)"
        )
    state = dict(state)
    if all(key.startswith("module.") for key in state):
        state = {key[len("module."):]: tensor for key, tensor in state.items()}
    return state


def _output_layer(model: nn.Module) -> tuple[str, nn.Module] | None:
    """Return the last linear layer, which maps to the classes in torchvision's classifiers."""
    linear = [(name, module) for name, module in model.named_modules() if isinstance(module, nn.Linear)]
    return linear[-1] if linear else None


def _list_keys(keys: list[str], limit: int = 10) -> str:
    if not keys:
        return "none"
    listed = ", ".join(keys[:limit])
    if len(keys) > limit:
        listed += f" and {len(keys) - limit} more"
    return listed


def load_weights(model: nn.Module, state: Mapping[str, torch.Tensor], source: str) -> nn.Module:
    """Load ``state`` into ``model`` strictly; a partial load or a shape mismatch raises with the details.

    Raises:
        WeightsError: keys are missing or unexpected (both are listed), or tensor shapes differ. When
            the output layer alone differs, the message gives the class counts of both sides.
    """
    expected = model.state_dict()
    missing = [key for key in expected if key not in state]
    unexpected = [key for key in state if key not in expected]
    if missing or unexpected:
        raise WeightsError(
            f"the weights from {source} do not fit the model ({type(model).__name__}): "
            f"missing keys: {_list_keys(missing)}; unexpected keys: {_list_keys(unexpected)}. "
            "A partial load is not allowed: check that the architecture matches the weights"
        )
    mismatched = [key for key in expected if state[key].shape != expected[key].shape]
    output = _output_layer(model)
    if output is not None and mismatched:
        name, layer = output
        prefix = f"{name}." if name else ""
        if all(key.startswith(prefix) and key[len(prefix):] in ("weight", "bias") for key in mismatched):
            classes = state[f"{prefix}weight"].shape[0]
            raise WeightsError(
                f"class-count mismatch: the weights from {source} have {classes} output classes in "
                f"{prefix}weight, but the model was built for {layer.out_features}; "
                f"pass --num-classes {classes} (num_classes={classes} in the API)"
            )
    if mismatched:
        details = ", ".join(f"{key} {tuple(state[key].shape)} != {tuple(expected[key].shape)}" for key in mismatched[:5])
        raise WeightsError(f"the weights from {source} do not fit the model: tensor shapes differ in {details}")
    model.load_state_dict(state)
    check_finite_weights(model, source)
    return model


def load_torchvision_model(architecture: str, weights_path: str | os.PathLike, num_classes: int = 1000) -> nn.Module:
    """Build a torchvision classifier by name and load its weights from a local file, in eval mode.

    Args:
        architecture: a name of ``torchvision.models.list_models()``, e.g. ``resnet34``.
        weights_path: a state dict (or a checkpoint containing one) saved with ``torch.save``; the files
            that torchvision downloads, such as ``resnet34-b627a593.pth``, are state dicts.
        num_classes: the size of the output layer.

    Raises:
        ValueError: the architecture is unknown.
        FileNotFoundError, WeightsError: see :func:`load_state_dict_file` and :func:`load_weights`.
    """
    import torchvision

    known = torchvision.models.list_models(module=torchvision.models)
    if architecture not in known:
        raise ValueError(
            f"unknown torchvision architecture {architecture!r}; expected one of torchvision.models.list_models(), "
            f"e.g. {', '.join(name for name in ('resnet18', 'resnet34', 'resnet50', 'mobilenet_v2') if name in known)}"
        )
    state = load_state_dict_file(weights_path)
    model = torchvision.models.get_model(architecture, weights=None, num_classes=num_classes)
    return load_weights(model, state, str(weights_path)).eval()


def import_model_factory(spec: str) -> nn.Module:
    """Call ``function()`` of ``module`` for a ``module:function`` specification and return the model.

    The current directory is searched first, so a ``mymodel.py`` beside the data works as ``mymodel:build``.

    Raises:
        ValueError: the specification is malformed, the module or function is missing, or the function
            returns something other than an ``nn.Module``.
    """
    module_name, _, function_name = spec.partition(":")
    if not module_name or not function_name.isidentifier():
        raise ValueError(f"invalid model specification {spec!r}: expected module:function, e.g. mymodels:build_net")
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as error:
        raise ValueError(f"module {module_name!r} of model {spec!r} not found ({error}); run from its directory or install it") from error
    factory = getattr(module, function_name, None)
    if not callable(factory):
        raise ValueError(f"module {module_name!r} has no function {function_name!r} for model {spec!r}")
    model = factory()
    if not isinstance(model, nn.Module):
        raise ValueError(f"{spec}() returned a {type(model).__name__}, expected a torch.nn.Module")
    check_finite_weights(model, spec)
    return model.eval()
