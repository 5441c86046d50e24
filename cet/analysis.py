"""Per-layer Hessian analysis: top Ritz pairs by Lanczos, traces by Hutchinson, and each layer's quadric."""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.data import TensorDataset
from tqdm import tqdm

from .geometry import LowRankSurrogate, classify_quadric, complement_projection
from .hessian import LayerHessian, TraceEstimate, hutchinson_trace
from .lanczos import SpectralDensity, lanczos, stochastic_lanczos_quadrature
from .models import quantizable_layers

__all__ = ["LayerAnalysis", "analyze_layers"]

logger = logging.getLogger(__name__)


@dataclass
class LayerAnalysis:
    """The Hessian information CET keeps for one layer."""

    name: str
    num_weights: int
    ritz_values: torch.Tensor      # (m,) float64, descending; m = number of Lanczos steps taken
    ritz_residuals: torch.Tensor   # (m,) float64, |H y - theta y| estimates
    trace: TraceEstimate           # tr H_l: the top-k Ritz values plus a Hutchinson estimate of the rest
    surrogate: LowRankSurrogate    # top-k Ritz pairs plus isotropic remainder
    quadric: str                   # kind of quadric, see classify_quadric
    zero_eigenvalues_at_least: int # proven zero eigenvalues (0 when nothing is proven)
    density: SpectralDensity | None = None  # stochastic Lanczos quadrature, when density_probes > 0

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
    trace_probes: int = 8,
    seed: int = 0,
    device: str | torch.device = "cpu",
    layers: dict[str, nn.Module] | None = None,
    piecewise_linear: bool = False,
    density_probes: int = 0,
    engine: str = "graph",
    dtype: torch.dtype | None = None,
) -> dict[str, LayerAnalysis]:
    """Analyse the Hessian block of every quantizable layer on the calibration set.

    Each layer gets ``lanczos_steps`` Lanczos steps from a seeded random start; its top ``top_k`` Ritz pairs
    and its trace define the low-rank-plus-isotropic surrogate. The trace is the sum of the top-k Ritz
    values plus ``trace_probes`` Hutchinson probes of the deflated block (I - P) H (I - P), P the projector
    on the Ritz vectors. Both parts are exact in expectation, because tr H = tr PHP + tr (I-P)H(I-P),
    and deflation removes the largest eigenvalues from the estimator's variance.

    The quadric kind is read from the Ritz values. A negative Ritz value proves an indefinite block
    (Ritz values lie inside the spectrum), but all-positive Ritz values do not prove a positive definite
    one, because Lanczos explores only a Krylov subspace. With ``piecewise_linear`` set, the caller states
    that the network's outputs are piecewise linear in each layer's weight (ReLU, max-pooling,
    BatchNorm in eval mode, linear layers). Then H_l is the Gauss-Newton matrix J^T H_out J, whose rank is
    at most N (C - 1) for N samples and C classes under cross-entropy. A larger layer therefore has at
    least n - N (C - 1) zero eigenvalues, and its quadric is a cylinder.

    With ``density_probes`` > 0, each layer also gets a spectral density by stochastic Lanczos
    quadrature, from that many Rademacher probes of ``lanczos_steps`` steps each. ``engine`` selects
    how products are computed (see :class:`cet.hessian.LayerHessian`). With ``dtype=torch.float64`` a
    float64 copy of the model is analysed, and the model itself is left as it was. Under
    ``torch.distributed`` the calibration batches are shared out among the processes, and every process
    gets the same result.

    Returns:
        Layer name -> analysis, in module order; frozen or unused layers are absent (and logged).
    """
    if lanczos_steps < 1:
        raise ValueError(f"invalid lanczos_steps {lanczos_steps}: must be at least 1")
    if not 0 < top_k <= lanczos_steps:
        raise ValueError(f"invalid top_k {top_k}: must be between 1 and lanczos_steps ({lanczos_steps})")
    if batch_size < 1:
        raise ValueError(f"invalid batch_size {batch_size}: must be at least 1")
    if density_probes < 0:
        raise ValueError(f"invalid density_probes {density_probes}: must not be negative")
    if dtype is not None:
        names = {id(module): name for name, module in model.named_modules()}
        model = copy.deepcopy(model).to(dtype)
        copies = dict(model.named_modules())
        chosen = quantizable_layers(model) if layers is None else {n: copies[names[id(m)]] for n, m in layers.items()}
        layers = chosen
    layers = quantizable_layers(model) if layers is None else layers
    images, labels = calibration.tensors
    batches = [(images[i:i + batch_size], labels[i:i + batch_size]) for i in range(0, len(labels), batch_size)]
    generator = torch.Generator().manual_seed(seed)

    analyses: dict[str, LayerAnalysis] = {}
    with LayerHessian(model, layers, batches, device=device, engine=engine) as hessian:
        rank_bound = hessian.num_samples * (hessian.num_outputs - 1)
        for name in tqdm(hessian.layer_names, desc="Lanczos per layer", unit="layer"):
            weight = hessian.parameters[name]
            start = torch.randn(weight.shape, generator=generator).to(device=device, dtype=weight.dtype)
            result = lanczos(lambda v, name=name: hessian.hvp(name, v), start, lanczos_steps)
            k = min(top_k, result.num_steps)
            values, vectors = result.top(k)

            def deflated_hvp(probe, name=name, vectors=vectors):
                outside = complement_projection(vectors, probe)
                return complement_projection(vectors, hessian.hvp(name, outside))

            remainder = hutchinson_trace(deflated_hvp, weight.detach(), trace_probes, generator)
            trace = TraceEstimate(values.sum().item() + remainder.mean, remainder.standard_error, trace_probes)
            surrogate = LowRankSurrogate.from_trace(values.cpu(), vectors.detach().cpu().float(), trace.mean)
            zeros = max(0, weight.numel() - rank_bound) if piecewise_linear else 0
            density = None
            if density_probes:
                density = stochastic_lanczos_quadrature(
                    lambda v, name=name: hessian.hvp(name, v), weight.detach(), density_probes, lanczos_steps, generator
                )
            analyses[name] = LayerAnalysis(
                name=name,
                num_weights=weight.numel(),
                ritz_values=result.ritz_values.cpu(),
                ritz_residuals=result.residuals.cpu(),
                trace=trace,
                surrogate=surrogate,
                quadric=classify_quadric(result.ritz_values, known_zero_eigenvalues=zeros),
                zero_eigenvalues_at_least=zeros,
                density=density,
            )
            logger.debug("%s: top Ritz value %.4g, trace %.4g", name, values[0].item(), trace.mean)
    return analyses
