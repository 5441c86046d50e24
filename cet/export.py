"""A compressed model file: bit-packed integer codes with per-channel scales, plus the float remainder.

``save_packed`` writes one ``torch.save`` file of plain containers and tensors, so ``torch.load`` reads
it with ``weights_only=True``. For every quantized layer the file stores its bit width, channel axis,
weight shape, float32 scales and its codes packed b bits each into a uint8 tensor. Every other
state-dict entry (biases, BatchNorm parameters and buffers, layers left in float) is stored unchanged.
``load_packed`` rebuilds each weight as ``codes.float32 * scale``, the computation of
``QuantizedTensor.dequantize``, so the loaded model equals ``apply_quantized(model, quantized)`` exactly.

Packing: a code q of a b-bit layer is stored in offset binary as u = q + 2^(b-1), which lies in
[1, 2^b - 1]. The b bits of each u, most significant first, are concatenated over the weights in
row-major order and packed into bytes with ``numpy.packbits``. The last byte is padded with zero bits,
so the codes take exactly ceil(n b / 8) bytes.
"""

from __future__ import annotations

import math
import os
import pickle
import tempfile
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .io import save_atomic
from .quantize import MAX_BITS, MIN_BITS, QuantizedTensor, _check_quantized_tensor, _weight_layer

__all__ = [
    "FORMAT_NAME", "FORMAT_VERSION", "PackedFileError", "PackedFileInfo", "load_packed", "pack_codes", "save_packed", "unpack_codes",
]

FORMAT_NAME = "cet-packed"
FORMAT_VERSION = 1


class PackedFileError(ValueError):
    """Raised when a file is not a packed model this version can read, or its contents are damaged."""


@dataclass
class PackedFileInfo:
    """Sizes of a packed model file and of the float32 model it replaces.

    ``fp32_state_dict_bytes`` is measured, not estimated: it is the size of ``torch.save(model.state_dict())``
    written to a temporary file of the same name. ``weight_compression_ratio`` counts the codes of the quantized layers only
    (32 sum n / 8 packed_code_bytes, the measured counterpart of ``cet.allocate.compression_ratio``);
    ``file_compression_ratio`` is fp32_state_dict_bytes / file_bytes, with scales, the float remainder and
    the container's overhead included.
    """

    path: Path
    file_bytes: int
    fp32_state_dict_bytes: int
    packed_code_bytes: int         # the uint8 code tensors of all quantized layers
    scale_bytes: int               # their float32 scales
    quantized_weight_count: int    # weights in the quantized layers
    weight_compression_ratio: float
    file_compression_ratio: float


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack integer codes in [-(2^(b-1) - 1), 2^(b-1) - 1] into a uint8 tensor of ceil(n b / 8) bytes.

    Raises:
        ValueError: ``bits`` is not an integer from 2 to 16, or a code lies outside that range.
    """
    if isinstance(bits, bool) or not isinstance(bits, int) or not MIN_BITS <= bits <= MAX_BITS:
        raise ValueError(f"invalid bit width {bits!r}: must be an integer from {MIN_BITS} to {MAX_BITS}")
    levels = 2 ** (bits - 1) - 1
    flat = codes.detach().reshape(-1).to(torch.int64).cpu().numpy()
    if flat.size and (flat.min() < -levels or flat.max() > levels):
        raise ValueError(
            f"codes range from {flat.min()} to {flat.max()}, outside [-{levels}, {levels}] of the {bits}-bit grid; "
            "clamp them or use more bits"
        )
    offset_binary = (flat + 2 ** (bits - 1)).astype(np.uint32)
    bit_matrix = np.empty((flat.size, bits), dtype=np.uint8)
    for position in range(bits):
        bit_matrix[:, position] = (offset_binary >> (bits - 1 - position)) & 1
    return torch.from_numpy(np.packbits(bit_matrix.reshape(-1)))


def unpack_codes(packed: torch.Tensor, bits: int, count: int) -> torch.Tensor:
    """Return the ``count`` int32 codes that ``pack_codes`` packed at ``bits`` bits, as a flat tensor.

    Raises:
        PackedFileError: the data is damaged. The byte count is not ceil(count bits / 8), the padding
            bits are not zero, or a value decodes outside the symmetric grid.
    """
    expected_bytes = math.ceil(count * bits / 8)
    if packed.dtype != torch.uint8 or packed.dim() != 1 or packed.numel() != expected_bytes:
        raise PackedFileError(
            f"packed codes are {packed.numel()} {packed.dtype} values in {packed.dim()} dimensions, but "
            f"{count} codes at {bits} bits need a flat uint8 tensor of {expected_bytes} bytes; the file is damaged"
        )
    all_bits = np.unpackbits(packed.cpu().numpy())
    if all_bits[count * bits:].any():
        raise PackedFileError("the padding bits after the last code are not zero; the file is damaged")
    bit_matrix = all_bits[: count * bits].reshape(count, bits)
    offset_binary = np.zeros(count, dtype=np.int32)
    for position in range(bits):
        offset_binary = (offset_binary << 1) | bit_matrix[:, position]
    if count and offset_binary.min() == 0:
        raise PackedFileError(f"a code decodes to -{2 ** (bits - 1)}, outside the symmetric {bits}-bit grid; the file is damaged")
    return torch.from_numpy(offset_binary - 2 ** (bits - 1))


def save_packed(
    model: nn.Module, quantized: Mapping[str, QuantizedTensor], path: str | os.PathLike, metadata: dict | None = None,
) -> PackedFileInfo:
    """Write ``model`` with the layers in ``quantized`` stored as packed codes to ``path``, atomically.

    Args:
        model: the float model; its state dict supplies every entry other than the quantized weights.
        quantized: layer name to codes and scales, from ``quantize_layers`` or any other rounding scheme
            whose codes lie on the symmetric grid.
        path: the output file. It is written to a temporary file beside it and renamed into place, so an
            interrupted write leaves an existing file unchanged.
        metadata: extra information stored in the file, for example the training run. It may contain
            only str, int, float, bool, None, lists, tuples and dicts with str keys.

    Raises:
        KeyError: a name in ``quantized`` is not a module of the model.
        TypeError: the named module is not a convolution or a linear layer, or an entry is not a QuantizedTensor.
        ValueError: codes or scales do not fit their layer, a scale is not float32, a quantized weight is
            tied to another state-dict entry, or the metadata contains a type that
            ``torch.load(weights_only=True)`` cannot read.
    """
    metadata = {} if metadata is None else metadata
    _check_plain(metadata, "metadata")
    modules = dict(model.named_modules())
    state = {key: value.detach() for key, value in model.state_dict().items()}
    keys_by_storage: dict[int, list[str]] = {}
    for key, value in state.items():
        if value.untyped_storage().nbytes():
            keys_by_storage.setdefault(value.untyped_storage().data_ptr(), []).append(key)
    layers = {}
    for name, q in quantized.items():
        module = _weight_layer(modules, name)
        _check_quantized_tensor(q, name)
        key = _weight_key(name)
        # The state dict lists a tied weight under every name. The float copy under another name would be
        # stored and, on loading, overwrite the quantized weight.
        same_storage = keys_by_storage.get(module.weight.untyped_storage().data_ptr(), [])
        shared = [other for other in same_storage if other != key]
        if shared:
            raise ValueError(
                f"layer {name!r} shares its weight with {', '.join(shared)} (tied weights), which a packed file "
                "cannot store; untie the weights or leave the layer unquantized"
            )
        q.validate(module.weight.shape, f"layer {name!r}")
        if q.scale.dtype != torch.float32:
            raise ValueError(
                f"scale of layer {name!r} has dtype {q.scale.dtype}; packed files store float32 scales, "
                "so quantize the float32 model"
            )
        layers[name] = {
            "bits": int(q.bits),
            "axis": int(q.axis),
            "shape": list(module.weight.shape),
            "codes": pack_codes(q.codes, int(q.bits)),
            "scale": q.scale.detach().reshape(-1).cpu().clone(),
        }
        del state[key]

    payload = {
        "format": FORMAT_NAME,
        "version": FORMAT_VERSION,
        "architecture": f"{type(model).__module__}.{type(model).__qualname__}",
        "bit_widths": {name: layer["bits"] for name, layer in layers.items()},
        "metadata": metadata,
        "layers": layers,
        "state": {key: value.cpu() for key, value in state.items()},
    }
    path = save_atomic(payload, path)

    # torch.save names the archive's folder after the file, so the float32 file is measured under the same name.
    with tempfile.TemporaryDirectory() as directory:
        fp32_path = Path(directory) / path.name
        torch.save(model.state_dict(), fp32_path)
        fp32_bytes = os.path.getsize(fp32_path)
    file_bytes = os.path.getsize(path)
    code_bytes = sum(layer["codes"].numel() for layer in layers.values())
    weight_count = sum(math.prod(layer["shape"]) for layer in layers.values())
    return PackedFileInfo(
        path=path,
        file_bytes=file_bytes,
        fp32_state_dict_bytes=fp32_bytes,
        packed_code_bytes=code_bytes,
        scale_bytes=sum(4 * layer["scale"].numel() for layer in layers.values()),
        quantized_weight_count=weight_count,
        weight_compression_ratio=32 * weight_count / (8 * code_bytes) if code_bytes else float("nan"),
        file_compression_ratio=fp32_bytes / file_bytes,
    )


def load_packed(path: str | os.PathLike, model: nn.Module) -> nn.Module:
    """Load a file written by ``save_packed`` into ``model`` and return it.

    ``model`` must have the architecture that was saved, freshly constructed (for example
    ``torchvision.models.resnet34()``); every state-dict entry is replaced, as with
    ``load_state_dict(strict=True)``.

    Raises:
        TypeError: ``model`` is not an ``nn.Module`` instance.
        FileNotFoundError: ``path`` does not exist.
        PackedFileError: the file is not a packed model, has another format version, or is damaged
            (truncated, packed codes of the wrong length, missing fields).
        ValueError: the model's state-dict keys or shapes differ from the file's; the message lists them.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(
            f"model must be an nn.Module instance of the saved architecture, got {model!r}; "
            "construct it first, for example torchvision.models.resnet34()"
        )
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"packed model file {path} not found")
    # torch.save writes a zip archive. Checking for one first keeps torch.load from unpickling arbitrary
    # bytes, which fails with unpredictable exception types.
    if path.is_dir():
        raise PackedFileError(f"cannot read {path} as a packed model: it is a directory; name the packed file inside it")
    _check_archive(path)
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, EOFError, pickle.UnpicklingError, zipfile.BadZipFile, UnicodeDecodeError, ValueError,
            KeyError, IndexError, TypeError) as error:
        raise PackedFileError(f"cannot read {path} as a packed model: {error}; the file is damaged or of another kind") from error
    if not isinstance(payload, dict) or payload.get("format") != FORMAT_NAME:
        raise PackedFileError(f"{path} is not a packed model file (no {FORMAT_NAME!r} format marker); write it with cet.export.save_packed")
    if payload.get("version") != FORMAT_VERSION:
        raise PackedFileError(
            f"{path} has packed format version {payload.get('version')!r}, but this version of cet reads only "
            f"version {FORMAT_VERSION}; re-export the model with this version"
        )
    try:
        state = dict(payload["state"])
        layers = payload["layers"]
        architecture = payload["architecture"]
        if not all(isinstance(value, torch.Tensor) for value in state.values()):
            raise TypeError("a state-dict entry is not a tensor")
        for name, layer in layers.items():
            state[_weight_key(name)] = _dequantize_layer(layer)
    except (KeyError, TypeError, AttributeError) as error:
        raise PackedFileError(f"{path} lacks a field or has one of the wrong type ({error!r}); the file is damaged") from error
    except PackedFileError as error:
        raise PackedFileError(f"{path}: layer {name!r}: {error}") from error

    _check_architecture(model, state, architecture)
    with torch.no_grad():
        model.load_state_dict(state, strict=True)
    return model


def _weight_key(name: str) -> str:
    """Return the state-dict key of the weight of layer ``name``; the model itself is the layer named ''."""
    return f"{name}.weight" if name else "weight"


def _check_archive(path: Path) -> None:
    """Raise PackedFileError unless ``path`` is a zip archive whose every entry matches its CRC-32.

    torch.load does not check the checksums, so without this check a flipped bit in the codes, scales
    or float tensors would load silently as different weights.

    NOTE: the checksums cover the entries' data only. Damage to fields of the central directory that
    zipfile ignores (such as the external attributes) can still make torch.load read other bytes.
    """
    not_archive = f"cannot read {path} as a packed model: it is not a torch.save zip archive, so it is damaged or of another kind"
    try:
        is_archive = zipfile.is_zipfile(path)
        damaged = None
        if is_archive:
            with zipfile.ZipFile(path) as archive:
                damaged = archive.testzip()
    except (zipfile.BadZipFile, OSError, ValueError, EOFError, NotImplementedError) as error:
        raise PackedFileError(f"cannot read {path} as a packed model: {error}; the file is damaged") from error
    if not is_archive:
        raise PackedFileError(not_archive)
    if damaged is not None:
        raise PackedFileError(
            f"{path} is damaged: its entry {damaged!r} fails the zip checksum or header check; copy or export the file again"
        )


def _dequantize_layer(layer: Mapping) -> torch.Tensor:
    """Unpack one layer's codes and multiply by its scales, exactly as ``QuantizedTensor.dequantize`` does."""
    bits, axis, shape = layer["bits"], layer["axis"], tuple(layer["shape"])
    if not (isinstance(bits, int) and MIN_BITS <= bits <= MAX_BITS and isinstance(axis, int) and 0 <= axis < max(len(shape), 1)):
        raise PackedFileError(f"invalid bit width {bits!r} or channel axis {axis!r} for shape {shape}; the file is damaged")
    scale = layer["scale"]
    channels = shape[axis] if shape else 1
    if scale.dtype != torch.float32 or scale.shape != (channels,):
        raise PackedFileError(
            f"scales are {scale.dtype} of shape {tuple(scale.shape)}, expected float32 of shape ({channels},); the file is damaged"
        )
    codes = unpack_codes(layer["codes"], bits, math.prod(shape)).reshape(shape)
    scale_shape = tuple(size if d == axis else 1 for d, size in enumerate(shape)) if len(shape) > 1 else (channels,)
    return QuantizedTensor(codes, scale.reshape(scale_shape), bits, axis).dequantize()


def _check_architecture(model: nn.Module, state: Mapping[str, torch.Tensor], architecture: str) -> None:
    """Raise ValueError listing the keys and shapes in which ``model`` differs from the saved state dict."""
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    mismatched = [
        f"{key}: file {tuple(state[key].shape)}, model {tuple(expected[key].shape)}"
        for key in expected
        if key in state and state[key].shape != expected[key].shape
    ]
    if not (missing or unexpected or mismatched):
        return
    problems = []
    if missing:
        problems.append(f"missing from the file: {_summarise(missing)}")
    if unexpected:
        problems.append(f"not in the model: {_summarise(unexpected)}")
    if mismatched:
        problems.append(f"shapes differ: {_summarise(mismatched)}")
    raise ValueError(
        f"the model does not match the packed file, which was saved from a {architecture}; "
        + "; ".join(problems)
        + ". Construct the same architecture that was saved"
    )


def _summarise(items: list[str], limit: int = 10) -> str:
    listed = ", ".join(items[:limit])
    return listed if len(items) <= limit else f"{listed} and {len(items) - limit} more"


def _check_plain(value: object, where: str) -> None:
    """Raise ValueError if ``value`` contains anything but the plain types that weights_only loading accepts."""
    if value is None or type(value) in (str, bool, int, float):
        return
    if isinstance(value, (list, tuple)):
        for index, item in enumerate(value):
            _check_plain(item, f"{where}[{index}]")
        return
    if type(value) is dict:
        for key, item in value.items():
            if not isinstance(key, str):
                raise ValueError(f"invalid key {key!r} in {where}: metadata keys must be strings")
            _check_plain(item, f"{where}[{key!r}]")
        return
    raise ValueError(
        f"invalid value of type {type(value).__name__} in {where}: metadata may contain only str, int, float, "
        "bool, None, lists, tuples and dicts; convert it, for example with str() or .tolist()"
    )
