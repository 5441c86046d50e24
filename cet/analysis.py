"""Per-layer Hessian analysis: top Ritz pairs by Lanczos, traces by Hutchinson, and each layer's quadric."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.data import TensorDataset
from tqdm import tqdm

from .geometry import LowRankSurrogate, classify_quadric
from .hessian import LayerHessian, TraceEstimate
from .lanczos import lanczos
from .models import quantizable_layers

__all__ = ["LayerAnalysis", "analyze_layers"]

logger = logging.getLogger(__name__)


@dataclass
class LayerAnalysis:
    """What CET knows about one layer's Hessian block."""

    name: str
    num_weights: int
    ritz_values: torch.Tensor      # (m,) float64, descending; m = number of Lanczos steps taken
    ritz_residuals: torch.Tensor   # (m,) float64, |H y - theta y| estimates
    trace: TraceEstimate           # Hutchinson estimate of tr H_l
    surrogate: LowRankSurrogate    # top-k Ritz pairs plus isotropic remainder
    quadric: str                   # kind of quadric seen in the Ritz values, see classify_quadric

    @property
    def top_eigenvalue(self) -> float:
        return self.ritz_values[0].item()

    @property
    def bottom_ritz_value(self) -> float:
        """Return the smallest Ritz value, an upper bound on the smallest eigenvalue."""
        return self.ritz_values[-1].item()


def analyze_layers(
    model: nn.Module,
    calibration: TensorDataset,
    batch_size: int = 128,
    lanczos_steps: int = 16,
    top_k: int = 8,
    trace_probes: int = 16,
    seed: int = 0,
    device: str | torch.device = "cpu",
    layers: dict[str, nn.Module] | None = None,
) -> dict[str, LayerAnalysis]:
    """Analyse the Hessian block of every quantizable layer on the calibration set.

    Each layer gets ``lanczos_steps`` Lanczos steps from a seeded random start; its top ``top_k`` Ritz pairs
    and its trace define the low-rank-plus-isotropic surrogate. Traces come from ``trace_probes``
    Hutchinson probes shared by all layers (see :meth:`LayerHessian.block_traces`).

    The quadric kind is read from the Ritz values only. A negative Ritz value proves an indefinite block
    (Ritz values lie inside the spectrum), but all-positive Ritz values do not prove a positive definite
    one, because Lanczos sees only a Krylov subspace.

    Returns:
        Layer name -> analysis, in module order; frozen or unused layers are absent (and logged).
    """
    if not 0 < top_k <= lanczos_steps:
        raise ValueError(f"invalid top_k {top_k}: must be between 1 and lanczos_steps ({lanczos_steps})")
    if batch_size < 1:
        raise ValueError(f"invalid batch_size {batch_size}: must be at least 1")
    layers = quantizable_layers(model) if layers is None else layers
    images, labels = calibration.tensors
    batches = [(images[i:i + batch_size], labels[i:i + batch_size]) for i in range(0, len(labels), batch_size)]
    generator = torch.Generator().manual_seed(seed)

    analyses: dict[str, LayerAnalysis] = {}
    with LayerHessian(model, layers, batches, device=device) as hessian:
        traces = hessian.block_traces(trace_probes, generator)
        for name in tqdm(hessian.layer_names, desc="Lanczos per layer", unit="layer"):
            weight = hessian.parameters[name]
            start = torch.randn(weight.shape, generator=generator).to(device=device, dtype=weight.dtype)
            result = lanczos(lambda v, name=name: hessian.hvp(name, v), start, lanczos_steps)
            k = min(top_k, result.num_steps)
            values, vectors = result.top(k)
            surrogate = LowRankSurrogate.from_trace(
                values.cpu(), vectors.detach().cpu().float(), traces[name].mean
            )
            analyses[name] = LayerAnalysis(
                name=name,
                num_weights=weight.numel(),
                ritz_values=result.ritz_values.cpu(),
                ritz_residuals=result.residuals.cpu(),
                trace=traces[name],
                surrogate=surrogate,
                quadric=classify_quadric(result.ritz_values),
            )
            logger.debug("%s: top Ritz value %.4g, trace %.4g", name, values[0].item(), traces[name].mean)
    return analyses
