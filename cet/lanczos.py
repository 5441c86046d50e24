"""Lanczos iteration with full reorthogonalization for symmetric linear operators.

The operator is only touched through matrix-vector products, so it can be a layer's Hessian reached by
Hessian-vector products. The tridiagonal matrix is solved with ``eigh`` in float64.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

__all__ = ["LanczosResult", "SpectralDensity", "lanczos", "stochastic_lanczos_quadrature"]


@dataclass
class LanczosResult:
    """Ritz pairs of a symmetric operator, in descending order of Ritz value.

    Attributes:
        ritz_values: (m,) float64, descending; m is the number of Lanczos steps taken.
        ritz_vectors: (n, m) in the dtype of the iteration, unit columns matching ``ritz_values``. Each
            is signed so that its first coordinate in the Lanczos basis (its component along the
            normalised start vector) is non-negative.
        residuals: (m,) float64 estimates of |A y - theta y| for each pair, |beta_m s_mi|, which are
            exact in exact arithmetic and reliable under full reorthogonalization.
        alpha: (m,) float64 diagonal of the tridiagonal matrix.
        beta: (m - 1,) float64 off-diagonal of the tridiagonal matrix.
        breakdown: whether the iteration stopped early on an invariant subspace; then the Ritz pairs are
            exact eigenpairs of the operator restricted to that subspace.
    """

    ritz_values: torch.Tensor
    ritz_vectors: torch.Tensor
    residuals: torch.Tensor
    alpha: torch.Tensor
    beta: torch.Tensor
    breakdown: bool

    @property
    def num_steps(self) -> int:
        return len(self.alpha)

    def top(self, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Return the k algebraically largest Ritz values and their vectors."""
        return self.ritz_values[:k], self.ritz_vectors[:, :k]

    def bottom(self, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Return the k algebraically smallest Ritz values (ascending) and their vectors."""
        return self.ritz_values.flip(0)[:k], self.ritz_vectors.flip(1)[:, :k]

    def pairs(self, k: int, which: str = "top") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Return the k algebraically largest (``"top"``) or smallest (``"bottom"``) Ritz pairs and residuals.

        Returns:
            (values, vectors, residuals): as :meth:`top` or :meth:`bottom`, plus the matching |A y - theta y|.
        """
        if which == "top":
            return self.ritz_values[:k], self.ritz_vectors[:, :k], self.residuals[:k]
        if which == "bottom":
            return self.ritz_values.flip(0)[:k], self.ritz_vectors.flip(1)[:, :k], self.residuals.flip(0)[:k]
        raise ValueError(f"invalid which {which!r}: expected 'top' or 'bottom'")


def lanczos(
    matvec: Callable[[torch.Tensor], torch.Tensor],
    start: torch.Tensor,
    num_steps: int,
    breakdown_atol: float = 1e-30,
    breakdown_rtol: float = 1e-10,
    host_checks: bool | None = None,
    stop_residual: float | None = None,
    stop_count: int = 1,
) -> LanczosResult:
    """Run ``num_steps`` Lanczos steps on the symmetric operator ``matvec`` from ``start``.

    Each new basis vector is orthogonalized against all previous ones by classical Gram-Schmidt, and a
    second pass is applied when the first one removed more than 1 - 1/sqrt(2) of the vector's norm
    (Kahan's criterion, "twice is enough"). This keeps the basis orthogonal to working precision and
    prevents the spurious copies of converged Ritz values that plain Lanczos produces.

    Args:
        matvec: v -> A v for a symmetric A, on vectors shaped like ``start``.
        start: a nonzero start vector (flattened internally); its dtype and device set the iteration's.
        num_steps: at most this many steps, capped at the dimension n.
        breakdown_atol, breakdown_rtol: the iteration stops when the next off-diagonal entry beta falls
            below ``breakdown_atol + breakdown_rtol * max(|alpha|, |beta|)`` seen so far, because the
            Krylov subspace is then (numerically) invariant.
        host_checks: decide breakdown and the second pass on the host after every step. The default
            does so on the CPU, where reading a value costs nothing. On an accelerator the default keeps
            the whole loop on the device: after a breakdown the remaining steps run on zero vectors and
            are cut off after the loop, so the only host synchronisation is that final cut.
            Both ways give the same result. NOTE: the tests run the device path on the CPU only.
        stop_residual, stop_count: stop early once each of the ``stop_count`` algebraically largest
            Ritz pairs has a residual |A y - theta y| of at most ``stop_residual * |theta|``. The residual
            bounds the distance from theta to the nearest eigenvalue, so this is a relative accuracy
            request. Checking needs the Ritz values after every step, which on an accelerator costs one
            host synchronisation per step.

    Returns:
        The Ritz pairs; see :class:`LanczosResult`.

    Raises:
        ValueError: ``num_steps`` is not positive, or ``start`` is zero or not finite.
        FloatingPointError: the operator returned NaN or infinity.
    """
    if num_steps < 1:
        raise ValueError(f"invalid num_steps {num_steps}: must be at least 1")
    if stop_residual is not None and (stop_residual <= 0 or stop_count < 1):
        raise ValueError(f"invalid stop_residual {stop_residual} or stop_count {stop_count}: both must be positive")
    shape = start.shape
    vector = start.reshape(-1)
    norm = torch.linalg.vector_norm(vector)
    if not torch.isfinite(norm) or norm == 0:
        raise ValueError(f"invalid Lanczos start vector: norm {norm.item()}; use a nonzero finite vector")
    num_steps = min(num_steps, vector.numel())
    if host_checks is None:
        host_checks = vector.device.type == "cpu"
    float64 = {"dtype": torch.float64, "device": vector.device}

    # Rows are written before they are read; torch.zeros would spend as long as several products on
    # touching every page of a large layer's basis up front.
    basis = torch.empty(num_steps, vector.numel(), dtype=vector.dtype, device=vector.device)
    basis[0] = vector / norm
    alphas = torch.zeros(num_steps, **float64)
    betas = torch.zeros(num_steps, **float64)
    scale = torch.zeros((), **float64)
    # Number of steps before the first breakdown, counted on the device: num_steps when none happened.
    steps_done = torch.full((), num_steps, dtype=torch.long, device=vector.device)
    alive = torch.ones((), dtype=torch.bool, device=vector.device)
    threshold = 1 / math.sqrt(2)
    steps = num_steps

    for j in range(num_steps):
        w = matvec(basis[j].reshape(shape)).reshape(-1).to(vector.dtype)
        alpha = torch.dot(w, basis[j])
        active = basis[: j + 1]
        before = torch.linalg.vector_norm(w)
        w = torch.addmv(w, active.T, active @ w, alpha=-1)
        after = torch.linalg.vector_norm(w)
        if host_checks:
            if not (torch.isfinite(alpha) and torch.isfinite(before)):
                raise FloatingPointError(
                    f"Lanczos step {j + 1}: the operator returned NaN or infinity; check the model and its loss"
                )
            if after < threshold * before:
                w = torch.addmv(w, active.T, active @ w, alpha=-1)
        else:
            w = torch.where(after < threshold * before, torch.addmv(w, active.T, active @ w, alpha=-1), w)
        beta = torch.linalg.vector_norm(w)
        alphas[j] = alpha.double()
        scale = torch.maximum(scale, torch.maximum(alpha.double().abs(), beta.double()))
        stopped = beta.double() <= breakdown_atol + breakdown_rtol * scale
        if host_checks:
            if stopped:
                steps = j + 1
                break
            betas[j] = beta.double()
            if j + 1 < num_steps:
                basis[j + 1] = w / beta
            if stop_residual is not None and j + 1 >= stop_count and _converged(alphas, betas, j + 1, stop_residual, stop_count):
                steps = j + 1
                break
        else:
            steps_done = torch.where(alive & stopped, j + 1, steps_done)
            alive = alive & ~stopped
            betas[j] = torch.where(alive, beta.double(), 0.0)
            if j + 1 < num_steps:
                basis[j + 1] = torch.where(alive, w / torch.where(alive, beta, 1.0), 0.0)
            if stop_residual is not None and j + 1 >= stop_count and bool(alive):
                if _converged(alphas, betas, j + 1, stop_residual, stop_count):
                    steps_done = torch.full_like(steps_done, j + 1)
                    break

    if not host_checks:
        # The one host synchronisation of the device path: where to cut, and whether the values are finite.
        steps = int(steps_done)
        if not bool(torch.isfinite(alphas[:steps]).all() and torch.isfinite(betas[:steps]).all()):
            raise FloatingPointError("Lanczos: the operator returned NaN or infinity; check the model and its loss")
    breakdown = bool(betas[steps - 1] == 0) and steps < vector.numel()
    alpha = alphas[:steps]
    beta = betas[: steps - 1]
    residual_beta = betas[steps - 1]
    tridiagonal = torch.diag(alpha) + torch.diag(beta, 1) + torch.diag(beta, -1)
    values, vectors = torch.linalg.eigh(tridiagonal)
    order = torch.argsort(values, descending=True)
    values, vectors = values[order], vectors[:, order]
    # eigh leaves each eigenvector's sign to the LAPACK build and the processor's kernels. Each Ritz vector
    # gets a non-negative first coordinate in the Lanczos basis, so that a direction combining Ritz vectors
    # with chosen coefficients does not flip between machines.
    # NOTE: where that coordinate is at rounding level the sign is still arbitrary.
    vectors = vectors * torch.where(vectors[0] < 0, -1.0, 1.0).to(vectors.dtype)
    ritz_vectors = basis[:steps].T @ vectors.to(basis.dtype)
    residuals = (residual_beta * vectors[-1]).abs()
    return LanczosResult(values, ritz_vectors, residuals, alpha, beta, breakdown)


def _converged(alphas: torch.Tensor, betas: torch.Tensor, steps: int, tolerance: float, count: int) -> bool:
    """Return whether the top ``count`` Ritz pairs after ``steps`` steps have relative residuals within ``tolerance``."""
    alpha, beta = alphas[:steps].cpu(), betas[:steps].cpu()
    tridiagonal = torch.diag(alpha) + torch.diag(beta[:-1], 1) + torch.diag(beta[:-1], -1)
    values, vectors = torch.linalg.eigh(tridiagonal)
    top = torch.argsort(values, descending=True)[:count]
    residuals = (beta[-1] * vectors[-1, top]).abs()
    return bool((residuals <= tolerance * values[top].abs()).all())


@dataclass
class SpectralDensity:
    """A spectral density estimated by stochastic Lanczos quadrature (SLQ).

    Each probe z gives a Gauss quadrature of the measure sum_i (q_i^T z)^2 delta(t - lambda_i), with
    unit z: its nodes are the Ritz values of a Lanczos run from z and its weights the squared first
    components of the tridiagonal's eigenvectors. The weights of one probe are non-negative and sum to
    one; averaging over probes estimates the density (1/n) sum_i delta(t - lambda_i).

    Attributes:
        nodes: (probes, m) float64 Ritz values; rows of runs that broke down early are padded with zeros.
        weights: (probes, m) float64 quadrature weights; padding has weight zero.
    """

    nodes: torch.Tensor
    weights: torch.Tensor

    @property
    def num_probes(self) -> int:
        return self.nodes.shape[0]

    def moment(self, power: int) -> float:
        """Return the estimate of (1/n) tr A^power; exact per probe for power < 2 m when A has m distinct eigenvalues."""
        return (self.weights * self.nodes**power).sum(dim=1).mean().item()

    def smoothed(self, grid: torch.Tensor, width: float) -> torch.Tensor:
        """Return the density convolved with a Gaussian of standard deviation ``width`` on ``grid``."""
        if width <= 0:
            raise ValueError(f"invalid width {width}: must be positive")
        grid = grid.to(torch.float64).reshape(-1, 1, 1)
        kernel = torch.exp(-0.5 * ((grid - self.nodes) / width) ** 2) / (width * math.sqrt(2 * math.pi))
        return (kernel * self.weights).sum(dim=2).mean(dim=1)


def stochastic_lanczos_quadrature(
    matvec: Callable[[torch.Tensor], torch.Tensor],
    like: torch.Tensor,
    num_probes: int,
    num_steps: int,
    generator: torch.Generator,
) -> SpectralDensity:
    """Estimate the spectral density of a symmetric operator by stochastic Lanczos quadrature.

    Follows Ubaru, Chen and Saad (2017) and Ghorbani, Krishnan and Xiao (2019): ``num_probes`` Lanczos
    runs of ``num_steps`` steps from Rademacher vectors, drawn on the CPU with ``generator`` so the
    estimate does not depend on the device.
    """
    if num_probes < 1:
        raise ValueError(f"invalid num_probes {num_probes}: must be at least 1")
    probes = (torch.randint(0, 2, (num_probes, *like.shape), generator=generator) * 2 - 1).to(like.dtype)
    probes = probes.to(like.device)
    steps = min(num_steps, like.numel())
    nodes = torch.zeros(num_probes, steps, dtype=torch.float64)
    weights = torch.zeros(num_probes, steps, dtype=torch.float64)
    for i in range(num_probes):
        result = lanczos(matvec, probes[i], steps)
        tridiagonal = torch.diag(result.alpha) + torch.diag(result.beta, 1) + torch.diag(result.beta, -1)
        values, vectors = torch.linalg.eigh(tridiagonal)
        m = len(values)
        nodes[i, :m] = values.cpu()
        weights[i, :m] = vectors[0].cpu() ** 2
    return SpectralDensity(nodes, weights)
