"""The four compression steps as plain functions: analyze, allocate, quantize, evaluate.

Each step reads what the previous one wrote, so the steps can run on different days or machines:

1. :func:`analyze` estimates every quantizable layer's Hessian information on a calibration set and
   prices each candidate bit width. The analysis file stores the cost tables of the methods in
   :data:`COST_METHODS` for the analysed bit widths, next to the Ritz values and traces. The Ritz
   vectors that the CET costs need are not stored, because for ResNet-34 they would take about
   700 MB at eight vectors per layer. A new bit width therefore needs a new analysis.
2. :func:`allocate` chooses a bit width per layer from those costs, for a target compression ratio or
   a tolerance on the summed predicted loss change.
3. :func:`quantize` quantizes the model with that plan and writes the bit-packed model file.
4. :func:`evaluate` measures top-1 accuracy of the float32, simulated or packed model.

Every file is written atomically, so an interrupted step leaves the previous file in place.
"""

from __future__ import annotations

import logging
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from ..data import DataSource, draw_calibration_set, load_fashion_mnist
from ..io import write_json_atomic
from ..models import (
    check_finite_weights,
    import_model_factory,
    load_state_dict_file,
    load_torchvision_model,
    load_weights,
    quantizable_layers,
    unquantizable_layers,
)
from ..quantize import MAX_BITS, MIN_BITS

__all__ = [
    "ANALYSIS_FORMAT",
    "BUNDLED_MODEL",
    "COST_METHODS",
    "InputError",
    "OutputError",
    "PLAN_FORMAT",
    "allocate",
    "analyze",
    "check_output_classes",
    "check_writable",
    "evaluate",
    "load_model",
    "parse_bit_widths",
    "quantize",
    "read_analysis",
    "read_plan",
    "resolve_device",
    "simulated_model",
    "write_document",
]

logger = logging.getLogger(__name__)

ANALYSIS_FORMAT = "cet-analysis/1"
PLAN_FORMAT = "cet-plan/1"
BUNDLED_MODEL = "fashion-resnet34"
"""Model specification of the book's Fashion-MNIST ResNet-34, trained with the book's default settings."""

# The steps quantize by round-to-nearest, so CET prices round-to-nearest errors (``cet-rtn``).
# NOTE: major-axis rounding (the ``cet`` method of cet.costs, see cet.rounding) is not offered here,
# because quantize would need the Ritz vectors that the analysis file does not store.
COST_METHODS = ("cet-rtn", "hawq-v1", "hawq-v2")


class InputError(ValueError):
    """Raised when an input file or setting of a step is invalid; the message names it and the fix."""


class OutputError(OSError):
    """Raised when an output file cannot be written; nothing is written in that case."""


def parse_bit_widths(text: str | Sequence[int]) -> list[int]:
    """Parse a bit-width list such as ``"2,3,4,8"``; each must be an integer from 2 to 16, listed once.

    Raises:
        InputError: the list is empty, contains a non-integer, a value out of range or a repeat.
    """
    items = [item.strip() for item in text.split(",")] if isinstance(text, str) else list(text)
    if not items or items == [""]:
        raise InputError("invalid bit widths: the list is empty; pass e.g. 2,3,4,5,6,8")
    widths = []
    for item in items:
        try:
            bits = int(item)
        except (TypeError, ValueError):
            raise InputError(f"invalid bit width {item!r} in {text!r}: expected integers, e.g. 2,3,4,5,6,8") from None
        if not MIN_BITS <= bits <= MAX_BITS:
            raise InputError(f"invalid bit width {bits} in {text!r}: each must be from {MIN_BITS} to {MAX_BITS}")
        if bits in widths:
            raise InputError(f"invalid bit widths {text!r}: {bits} appears more than once")
        widths.append(bits)
    return sorted(widths)


def resolve_device(device: str) -> torch.device:
    """Turn ``auto``, ``cpu``, ``cuda`` or ``cuda:N`` into a device, checking that CUDA is there."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except RuntimeError as error:
        raise InputError(f"invalid device {device!r}: expected auto, cpu, cuda or cuda:N") from error
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise InputError(f"device {device!r} requested, but PyTorch finds no CUDA GPU; use --device cpu")
    return resolved


def check_writable(path: str | os.PathLike) -> Path:
    """Check, before any work, that ``path`` can be written; create its parent folders if needed.

    A temporary file is created and removed in the target folder, which tests the real permissions
    (also for root on a read-only file system), and the file at ``path`` itself is not touched.

    Raises:
        OutputError: the path is a folder, or its folder cannot be created or written.
    """
    path = Path(path)
    if path.is_dir():
        raise OutputError(f"cannot write the output file {path}: it is a directory; name a file inside it")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        handle, probe = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".partial")
    except OSError as error:
        raise OutputError(f"cannot write the output file {path}: {error.strerror or error}; choose a writable location") from error
    os.close(handle)
    os.unlink(probe)
    return path


def load_model(
    spec: str, weights: str | os.PathLike | None = None, num_classes: int = 1000, fashion_mnist_dir: str | None = None,
) -> nn.Module:
    """Load a model in eval mode on the CPU from its specification.

    Args:
        spec: ``fashion-resnet34`` (the book's model, loaded from the checkpoint cache or trained with
            the book's default settings), a torchvision architecture name such as ``resnet34``
            (needs ``weights``), or ``module:function`` for a function that builds the user's model.
        weights: a state dict file, or a checkpoint holding one. Optional for ``module:function``.
        num_classes: the output size of a torchvision architecture.
        fashion_mnist_dir: where Fashion-MNIST is, in case the bundled model must be trained.

    Raises:
        InputError: the specification or the weights are invalid; the message names the fix.
        FileNotFoundError: the weights file does not exist.
    """
    if spec == BUNDLED_MODEL:
        if weights is not None:
            raise InputError(f"--weights does not apply to {BUNDLED_MODEL}, which loads the book's checkpoint")
        from ..training import FineTuneConfig, TrainConfig, checkpoint_path, reference_model

        if not checkpoint_path(TrainConfig()).exists():
            logger.warning("No cached checkpoint of %s: training it now (about 45 minutes on a CPU)", BUNDLED_MODEL)
        train_set = load_fashion_mnist(fashion_mnist_dir).train
        return reference_model(TrainConfig(), FineTuneConfig(), train_set).model.cpu().eval()
    if ":" in spec:
        model = import_model_factory(spec)
        if weights is not None:
            load_weights(model, load_state_dict_file(weights), str(weights))
        return model.cpu().eval()
    if weights is None:
        raise InputError(
            f"model {spec!r} needs a weights file: pass --weights FILE, a state dict saved with torch.save "
            "(for ImageNet, torchvision's resnet34-b627a593.pth)"
        )
    return load_torchvision_model(spec, weights, num_classes).cpu()


@torch.no_grad()
def check_output_classes(model: nn.Module, data: DataSource, device: torch.device) -> None:
    """Raise :class:`InputError` when the model has fewer outputs than the data have classes."""
    image, _ = data.evaluation[0]
    outputs = model.eval()(image.unsqueeze(0).to(device)).shape[-1]
    if outputs < data.num_classes:
        raise InputError(
            f"class-count mismatch: the model has {outputs} outputs, but {data.spec} has {data.num_classes} classes; "
            "use weights trained on these classes, or set --num-classes to match the weights"
        )


def analyze(
    model: nn.Module,
    data: DataSource,
    bit_widths: Sequence[int],
    calibration_size: int = 256,
    batch_size: int = 128,
    lanczos_steps: int = 16,
    top_k: int = 8,
    trace_probes: int = 8,
    seed: int = 0,
    device: str | torch.device = "cpu",
    model_spec: str = "",
) -> dict:
    """Analyse every quantizable layer and price each bit width; return the analysis document.

    The calibration set is drawn from ``data.calibration_pool`` with ``seed``. Layers that cannot be
    quantized (their type is not a convolution or linear layer) and layers the analysis skips (frozen
    or unused weights) are listed under ``skipped`` with the reason, and keep float32 weights.

    Returns:
        A JSON-ready dictionary: the settings, one entry per layer (weights, Ritz values and residuals,
        trace with its standard error, the surrogate's remainder curvature, the quadric, and the cost
        of each bit width for each method), and the skipped layers.
    """
    from ..analysis import analyze_layers
    from ..costs import cost_tables

    widths = parse_bit_widths(bit_widths)
    device = torch.device(device)
    check_finite_weights(model, model_spec or "the model")
    calibration = draw_calibration_set(data.calibration_pool, calibration_size, seed)
    model = model.to(device).eval()
    check_output_classes(model, data, device)

    skipped = {name: f"a {kind} cannot be quantized; its weights stay float32" for name, kind in unquantizable_layers(model).items()}
    layers = quantizable_layers(model)
    for name in [name for name, module in layers.items() if module.weight.numel() == 0]:
        # Lanczos needs a nonzero start vector, and a layer without weights has nothing to quantize.
        skipped[name] = "it has no weights (a dimension of size 0)"
        del layers[name]
    if not layers:
        raise InputError(f"model {model_spec!r} has no convolution or linear layer with weights to quantize")
    analyses = analyze_layers(
        model, calibration, batch_size=batch_size, lanczos_steps=lanczos_steps, top_k=top_k,
        trace_probes=trace_probes, seed=seed, device=device, layers=layers,
    )
    for name in layers:
        if name not in analyses:
            skipped[name] = "its weight is frozen or does not reach the loss; its weights stay float32"
    # The first-order term is left out: it needs gradient statistics, and on a small calibration set
    # it is mostly noise.
    tables = cost_tables(COST_METHODS, model, analyses, widths, first_order_z=None)

    entries = []
    for row, (name, analysis) in enumerate(analyses.items()):
        entries.append({
            "name": name,
            "type": type(layers[name]).__name__,
            "num_weights": analysis.num_weights,
            "ritz_values": analysis.ritz_values.tolist(),
            "ritz_residuals": analysis.ritz_residuals.tolist(),
            "trace": analysis.trace.mean,
            "trace_standard_error": analysis.trace.standard_error,
            "trace_probes": analysis.trace.num_probes,
            "rho": analysis.surrogate.rho,
            "quadric": analysis.quadric,
            "costs": {method: tables[method].costs[row].tolist() for method in COST_METHODS},
            "cost_standard_errors": {method: tables[method].standard_errors[row].tolist() for method in COST_METHODS},
        })
    for name, reason in skipped.items():
        logger.warning("Skipped layer %s: %s", name, reason)
    return {
        "format": ANALYSIS_FORMAT,
        "model": model_spec,
        "data": data.spec,
        "calibration_size": calibration_size,
        "seed": seed,
        "lanczos_steps": lanczos_steps,
        "top_k": top_k,
        "bit_widths": widths,
        "layers": entries,
        "skipped": skipped,
    }


def _read_document(path: str | os.PathLike, expected_format: str, producer: str) -> dict:
    import json

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found; create it with `cet {producer}`")
    try:
        document = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise InputError(f"{path} is not valid JSON ({error}); create it again with `cet {producer}`") from error
    if not isinstance(document, dict) or document.get("format") != expected_format:
        found = document.get("format") if isinstance(document, dict) else type(document).__name__
        raise InputError(f"{path} is not a {expected_format} file (format {found!r}); create it with `cet {producer}`")
    return document


def _is_bit_width(value: object) -> bool:
    return type(value) is int and MIN_BITS <= value <= MAX_BITS


def _analysis_problem(document: dict) -> str | None:
    """Return what is missing or malformed in an analysis document, or None when :func:`allocate` can use it."""
    widths = document.get("bit_widths")
    if not isinstance(widths, list) or not widths or not all(_is_bit_width(b) for b in widths):
        return f"'bit_widths' is {widths!r}, not a list of integers from {MIN_BITS} to {MAX_BITS}"
    layers = document.get("layers")
    if not isinstance(layers, list):
        return f"'layers' is {type(layers).__name__}, not a list"
    for index, layer in enumerate(layers):
        if not isinstance(layer, dict) or not isinstance(layer.get("name"), str):
            return f"layer {index} has no name"
        count = layer.get("num_weights")
        if type(count) is not int or count < 0:
            return f"layer {layer['name']!r} has 'num_weights' {count!r}, not a non-negative integer"
        costs = layer.get("costs")
        for method in COST_METHODS:
            row = costs.get(method) if isinstance(costs, dict) else None
            if not isinstance(row, list) or len(row) != len(widths) or not all(
                    isinstance(c, (int, float)) and not isinstance(c, bool) for c in row):
                return f"layer {layer['name']!r} lacks {len(widths)} numeric {method} costs, one per bit width"
    return None


def read_analysis(path: str | os.PathLike) -> dict:
    """Read an analysis file written by :func:`analyze`, checking the fields that :func:`allocate` uses.

    Raises:
        FileNotFoundError: the file does not exist.
        InputError: the file is not an analysis document, or a field is missing or malformed.
    """
    document = _read_document(path, ANALYSIS_FORMAT, "analyze")
    problem = _analysis_problem(document)
    if problem is not None:
        raise InputError(f"invalid analysis file {path}: {problem}; create it again with `cet analyze`")
    return document


def read_plan(path: str | os.PathLike) -> dict:
    """Read a bit-width plan written by :func:`allocate`, checking its bit widths.

    Raises:
        FileNotFoundError: the file does not exist.
        InputError: the file is not a plan, or its ``bit_widths`` is not a mapping from layer names to
            integers from 2 to 16.
    """
    document = _read_document(path, PLAN_FORMAT, "allocate")
    widths = document.get("bit_widths")
    if not isinstance(widths, dict):
        raise InputError(f"invalid plan file {path}: 'bit_widths' is {type(widths).__name__}, not a mapping from "
                         "layer names to bit widths; create it again with `cet allocate`")
    for name, bits in widths.items():
        if not _is_bit_width(bits):
            raise InputError(f"invalid plan file {path}: layer {name!r} has bit width {bits!r}, not an integer from "
                             f"{MIN_BITS} to {MAX_BITS}; create the plan again with `cet allocate`")
    return document


def allocate(
    analysis: dict,
    target_ratio: float | None = None,
    tolerance: float | None = None,
    method: str = "cet-rtn",
    bit_widths: Sequence[int] | None = None,
) -> dict:
    """Choose a bit width per layer from an analysis document; return the plan document.

    Exactly one of ``target_ratio`` (the weight-compression ratio against float32 to reach at least)
    and ``tolerance`` (the maximum summed predicted loss change) is given. ``bit_widths`` restricts
    the candidates to a subset of the analysed ones.

    Raises:
        InputError: both or neither criterion is given, the method is unknown, or a bit width was not
            analysed.
        cet.allocate.InfeasibleTargetError: the target ratio lies outside the reachable range, which the
            message names.
    """
    from ..allocate import allocate_bits

    if (target_ratio is None) == (tolerance is None):
        raise InputError("give exactly one of a target ratio (--target-ratio) and a loss tolerance (--tolerance)")
    if method not in COST_METHODS:
        raise InputError(f"unknown method {method!r}: expected one of {', '.join(COST_METHODS)}")
    analysed = list(analysis["bit_widths"])
    widths = analysed if bit_widths is None else parse_bit_widths(bit_widths)
    missing = [b for b in widths if b not in analysed]
    if missing:
        raise InputError(
            f"bit widths {missing} were not analysed (the analysis has {analysed}); "
            f"run `cet analyze --bits {','.join(map(str, sorted(set(analysed) | set(widths))))}` again"
        )
    layers = analysis["layers"]
    if not layers:
        raise InputError("the analysis contains no layer to allocate bits to")
    columns = [analysed.index(b) for b in widths]
    costs = np.array([[layer["costs"][method][c] for c in columns] for layer in layers], dtype=np.float64)
    sizes = [layer["num_weights"] for layer in layers]
    if tolerance is None:
        result = allocate_bits(costs, sizes, widths, target_ratio)
    else:
        result = allocate_bits(costs, sizes, widths, None, tolerance=tolerance)
    return {
        "format": PLAN_FORMAT,
        "model": analysis.get("model", ""),
        "data": analysis.get("data", ""),
        "method": method,
        "target_ratio": target_ratio,
        "tolerance": tolerance,
        "candidate_bit_widths": widths,
        "weight_compression_ratio": result.weight_compression_ratio,
        "predicted_cost": result.predicted_cost,
        "bit_widths": {layer["name"]: int(bits) for layer, bits in zip(layers, result.bit_widths)},
        "skipped": analysis.get("skipped", {}),
    }


def _plan_bit_widths(model: nn.Module, plan: dict) -> dict[str, int]:
    """Return the plan's bit widths after checking that every layer exists in ``model`` and is quantizable."""
    layers = quantizable_layers(model)
    unknown = [name for name in plan["bit_widths"] if name not in layers]
    if unknown:
        raise InputError(
            f"the plan names layers that the model has no quantizable layer for: {', '.join(unknown[:5])}; "
            f"the plan was made for model {plan.get('model')!r}, so pass that model"
        )
    return {name: int(bits) for name, bits in plan["bit_widths"].items()}


def quantize(model: nn.Module, plan: dict, path: str | os.PathLike, metadata: dict | None = None):
    """Quantize ``model`` with the plan's bit widths and write the bit-packed model file atomically.

    Returns:
        The :class:`cet.export.PackedFileInfo` of the written file.
    """
    from ..export import save_packed
    from ..quantize import quantize_layers

    check_finite_weights(model, plan.get("model") or "the model")
    quantized = quantize_layers(model, _plan_bit_widths(model, plan))
    info = {"model": plan.get("model", ""), "method": plan.get("method"), "target_ratio": plan.get("target_ratio"),
            "tolerance": plan.get("tolerance"), **(metadata or {})}
    return save_packed(model, quantized, path, metadata=info)


def simulated_model(model: nn.Module, plan: dict) -> nn.Module:
    """Return a copy of ``model`` whose planned layers carry quantized-then-dequantized float32 weights."""
    from ..quantize import quantize_model

    return quantize_model(model, _plan_bit_widths(model, plan))


@torch.no_grad()
def evaluate(
    model: nn.Module, dataset: Dataset, batch_size: int = 128, device: str | torch.device = "cpu",
    workers: int = 0, progress: bool = True,
) -> tuple[float, int]:
    """Return the top-1 accuracy of ``model`` on ``dataset`` in percent, and the number of samples.

    The model runs in eval mode; ``workers`` processes load and transform images in parallel.
    """
    device = torch.device(device)
    model = model.to(device).eval()
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=workers)
    correct = 0
    total = 0
    for inputs, labels in tqdm(loader, desc="evaluating", unit="batch", disable=not progress):
        predictions = model(inputs.to(device)).argmax(dim=1).cpu()
        correct += int((predictions == labels).sum())
        total += len(labels)
    if total == 0:
        raise InputError("the evaluation split contains no samples")
    return 100.0 * correct / total, total


def write_document(document: dict, path: str | os.PathLike) -> Path:
    """Write an analysis or plan document as JSON, atomically."""
    return write_json_atomic(document, path)
