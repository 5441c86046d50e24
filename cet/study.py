"""Hessian analyses cached on disk, so that chapters sharing a model and settings analyse it once.

The analysis of all layers of the book's ResNet-34 takes minutes on a CPU, and several chapters need
the same one (the allocation study reuses the calibration seeds of the ResNet-34 chapter). The cache
lives beside the checkpoints, under :func:`cet.training.cache_dir`, keyed by the checkpoint file, the
analysis settings, the device type and a format version.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import TensorDataset

from .analysis import LayerAnalysis, analyze_layers
from .geometry import LowRankSurrogate
from .hessian import TraceEstimate
from .io import save_atomic
from .models import quantizable_layers
from .training import cache_dir

__all__ = ["analysis_cache_path", "analyze_or_load", "is_analysis_cached"]

logger = logging.getLogger(__name__)

# Bump when analyze_layers or the stored fields change, so that old analyses are not reused.
_CACHE_VERSION = 1


def analysis_cache_path(model_key: str, settings: dict) -> Path:
    """Return where the analysis of the model ``model_key`` with ``settings`` is cached.

    Raises:
        ValueError: ``model_key`` is empty or contains a path separator.
    """
    # The key becomes a file name, so a path in it would put the file outside the cache.
    if not isinstance(model_key, str) or not model_key or "/" in model_key or "\\" in model_key:
        raise ValueError(
            f"invalid model_key {model_key!r}: it names the cache file, so it must be a non-empty name without "
            "path separators, such as the checkpoint file's stem"
        )
    key = {"version": _CACHE_VERSION, "model": model_key, **settings}
    text = json.dumps(key, sort_keys=True, default=_json_setting)
    digest = hashlib.sha256(text.encode()).hexdigest()[:16]
    return cache_dir() / "analyses" / f"{model_key}-{digest}.pt"


def _json_setting(value: object) -> str:
    """Return the JSON form of a setting that ``json`` cannot write, such as ``dtype=torch.float64``."""
    if isinstance(value, torch.dtype):
        return str(value)
    raise TypeError(
        f"setting {value!r} of type {type(value).__name__} cannot be part of the cache key; "
        "pass numbers, strings, booleans or a torch.dtype"
    )


def _key_settings(calibration: TensorDataset, calibration_seed: int, device: str | torch.device, settings: dict) -> dict:
    reasons = {"seed": "calibration_seed seeds the analysis", "layers": "every quantizable layer is analysed"}
    for name, reason in reasons.items():
        if name in settings:
            raise TypeError(f"{name} is not a setting of analyze_or_load: {reason}")
    return {
        "calibration_size": len(calibration),
        "calibration_seed": calibration_seed,
        "device_type": torch.device(device).type,
        **settings,
    }


def is_analysis_cached(
    model_key: str, calibration: TensorDataset, calibration_seed: int, device: str | torch.device = "cpu", **settings
) -> bool:
    """Return whether :func:`analyze_or_load` with these arguments finds a cached file (it may still be unreadable)."""
    return analysis_cache_path(model_key, _key_settings(calibration, calibration_seed, device, settings)).exists()


def _to_state(analysis: LayerAnalysis) -> dict:
    return {
        "name": analysis.name,
        "num_weights": analysis.num_weights,
        "ritz_values": analysis.ritz_values,
        "ritz_residuals": analysis.ritz_residuals,
        "trace": [analysis.trace.mean, analysis.trace.standard_error, analysis.trace.num_probes],
        "eigenvalues": analysis.surrogate.eigenvalues,
        "eigenvectors": analysis.surrogate.eigenvectors,
        "rho": analysis.surrogate.rho,
        "quadric": analysis.quadric,
        "zero_eigenvalues_at_least": analysis.zero_eigenvalues_at_least,
    }


def _from_state(state: dict) -> LayerAnalysis:
    mean, standard_error, probes = state["trace"]
    return LayerAnalysis(
        name=state["name"],
        num_weights=int(state["num_weights"]),
        ritz_values=state["ritz_values"],
        ritz_residuals=state["ritz_residuals"],
        trace=TraceEstimate(float(mean), float(standard_error), int(probes)),
        surrogate=LowRankSurrogate(state["eigenvalues"], state["eigenvectors"], float(state["rho"])),
        quadric=state["quadric"],
        zero_eigenvalues_at_least=int(state["zero_eigenvalues_at_least"]),
    )


def _weights_fingerprint(model: nn.Module) -> str:
    """Return a SHA-256 digest of the names, shapes and values of the model's quantizable weights."""
    digest = hashlib.sha256()
    for name, module in quantizable_layers(model).items():
        weight = module.weight.detach().cpu().contiguous()
        digest.update(f"{name}:{tuple(weight.shape)}:{weight.dtype};".encode())
        digest.update(weight.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def _calibration_fingerprint(calibration: TensorDataset) -> str:
    """Return a SHA-256 digest of the shapes, dtypes and values of the calibration tensors."""
    digest = hashlib.sha256()
    for tensor in calibration.tensors:
        values = tensor.detach().cpu().contiguous()
        digest.update(f"{tuple(values.shape)}:{values.dtype};".encode())
        digest.update(values.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def _mismatch(stored: dict, model: nn.Module, fingerprint: str, calibration_fingerprint: str) -> str | None:
    """Return how a cached analysis differs from ``model`` and the calibration set, or None if it may be theirs."""
    if "fingerprint" in stored and stored["fingerprint"] != fingerprint:
        return "it was computed from other weights than this model's"
    # The key contains only the calibration set's size and seed, which another data source can share.
    if "calibration_fingerprint" in stored and stored["calibration_fingerprint"] != calibration_fingerprint:
        return "it was computed from another calibration set of the same size and seed"
    layers = quantizable_layers(model)
    for state in stored["layers"]:
        module = layers.get(state["name"])
        if module is None:
            return f"the model has no quantizable layer {state['name']!r}"
        if module.weight.numel() != int(state["num_weights"]):
            return f"layer {state['name']!r} has {module.weight.numel()} weights, the cached analysis {state['num_weights']}"
    return None


def analyze_or_load(
    model: nn.Module,
    model_key: str,
    calibration: TensorDataset,
    calibration_seed: int,
    device: str | torch.device = "cpu",
    recompute: bool = False,
    **settings,
) -> dict[str, LayerAnalysis]:
    """Return the cached analysis of ``model`` with these settings, or run :func:`analyze_layers` and cache it.

    Args:
        model: the network, already on ``device``.
        model_key: names the model's weights, such as its checkpoint file's stem. A cached file whose
            layers or weights differ from ``model`` is not used and is replaced (files written before
            the weights' digest was stored are checked by layer names and sizes only).
        calibration: the calibration set; its size is part of the key, its draw is fixed by ``calibration_seed``.
            A cached file computed from other samples is not used and is replaced (files written before
            the calibration digest was stored are not checked).
        calibration_seed: the seed that drew ``calibration``; it also seeds the Lanczos starts.
        settings: keyword arguments of :func:`analyze_layers` other than ``seed``, ``device`` and ``layers``
            (all layers are analysed).
        recompute: analyse again and replace the cached file.

    Raises:
        ValueError: ``model_key`` is empty or contains a path separator.
        TypeError: ``settings`` contains ``seed`` or ``layers``, or a value that cannot be part of the key.
    """
    key_settings = _key_settings(calibration, calibration_seed, device, settings)
    path = analysis_cache_path(model_key, key_settings)
    fingerprint = _weights_fingerprint(model)
    calibration_fingerprint = _calibration_fingerprint(calibration)
    if path.exists() and not recompute:
        try:
            stored = torch.load(path, map_location="cpu", weights_only=True)
            if stored.get("settings") != key_settings or stored.get("model") != model_key:
                raise ValueError("settings differ")
            mismatch = _mismatch(stored, model, fingerprint, calibration_fingerprint)
            if mismatch is not None:
                raise ValueError(mismatch)
            analyses = {state["name"]: _from_state(state) for state in stored["layers"]}
        except Exception as error:  # an unreadable or mismatched cache entry is recomputed, never trusted
            logger.warning("Ignoring cached analysis %s, which cannot be used (%s); analysing again", path, error)
        else:
            logger.info("Loaded cached analysis %s", path)
            return analyses

    analyses = analyze_layers(model, calibration, seed=calibration_seed, device=device, **settings)
    save_atomic(
        {"model": model_key, "settings": key_settings, "fingerprint": fingerprint,
         "calibration_fingerprint": calibration_fingerprint, "layers": [_to_state(a) for a in analyses.values()]}, path
    )
    logger.info("Saved the analysis to %s", path)
    return analyses
