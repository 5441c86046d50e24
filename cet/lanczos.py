"""Lanczos iteration with full reorthogonalization for symmetric linear operators.

The operator is only touched through matrix-vector products, so it can be a layer's Hessian reached by
Hessian-vector products. The tridiagonal matrix is solved with ``eigh`` in float64.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

__all__ = ["LanczosResult", "lanczos"]


@dataclass
class LanczosResult:
    """Ritz pairs of a symmetric operator, in descending order of Ritz value.

    Attributes:
        ritz_values: (m,) float64, descending; m is the number of Lanczos steps taken.
        ritz_vectors: (n, m) in the dtype of the iteration, unit columns matching ``ritz_values``.
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


def lanczos(
    matvec: Callable[[torch.Tensor], torch.Tensor],
    start: torch.Tensor,
    num_steps: int,
    breakdown_atol: float = 1e-30,
    breakdown_rtol: float = 1e-10,
) -> LanczosResult:
    """Run ``num_steps`` Lanczos steps on the symmetric operator ``matvec`` from ``start``.

    Each new basis vector is orthogonalized against all previous ones twice (classical Gram-Schmidt
    applied twice), which keeps the basis orthogonal to working precision and prevents the spurious
    copies of converged Ritz values that plain Lanczos produces.

    Args:
        matvec: v -> A v for a symmetric A, on vectors shaped like ``start``.
        start: a nonzero start vector (flattened internally); its dtype and device set the iteration's.
        num_steps: at most this many steps, capped at the dimension n.
        breakdown_atol, breakdown_rtol: the iteration stops when the next off-diagonal entry beta falls
            below ``breakdown_atol + breakdown_rtol * max(|alpha|, |beta|)`` seen so far, because the
            Krylov subspace is then (numerically) invariant.

    Returns:
        The Ritz pairs; see :class:`LanczosResult`.

    Raises:
        ValueError: ``num_steps`` is not positive, or ``start`` is zero or not finite.
    """
    if num_steps < 1:
        raise ValueError(f"invalid num_steps {num_steps}: must be at least 1")
    shape = start.shape
    vector = start.reshape(-1)
    norm = torch.linalg.vector_norm(vector)
    if not torch.isfinite(norm) or norm == 0:
        raise ValueError(f"invalid Lanczos start vector: norm {norm.item()}; use a nonzero finite vector")
    num_steps = min(num_steps, vector.numel())

    basis = torch.zeros(num_steps, vector.numel(), dtype=vector.dtype, device=vector.device)
    basis[0] = vector / norm
    alphas: list[torch.Tensor] = []
    betas: list[torch.Tensor] = []
    scale = torch.zeros((), dtype=torch.float64, device=vector.device)
    breakdown = False
    residual_beta = torch.zeros((), dtype=torch.float64, device=vector.device)

    for j in range(num_steps):
        w = matvec(basis[j].reshape(shape)).reshape(-1).to(vector.dtype)
        alpha = torch.dot(w, basis[j])
        active = basis[: j + 1]
        # Two passes of classical Gram-Schmidt against the whole basis ("twice is enough").
        for _ in range(2):
            w = w - active.T @ (active @ w)
        beta = torch.linalg.vector_norm(w)
        if not (torch.isfinite(alpha) and torch.isfinite(beta)):
            raise FloatingPointError(
                f"Lanczos step {j + 1}: the operator returned NaN or infinity; check the model and its loss"
            )
        alphas.append(alpha.double())
        scale = torch.maximum(scale, torch.maximum(alpha.double().abs(), beta.double()))
        # One host synchronisation per step decides whether to stop; it is the price of breakdown handling.
        if beta.double() <= breakdown_atol + breakdown_rtol * scale:
            breakdown = j + 1 < vector.numel()
            residual_beta = torch.zeros((), dtype=torch.float64, device=vector.device)
            break
        residual_beta = beta.double()
        if j + 1 < num_steps:
            betas.append(beta.double())
            basis[j + 1] = w / beta

    steps = len(alphas)
    alpha = torch.stack(alphas)
    beta = torch.stack(betas[: steps - 1]) if steps > 1 else alpha.new_zeros(0)
    tridiagonal = torch.diag(alpha) + torch.diag(beta, 1) + torch.diag(beta, -1)
    values, vectors = torch.linalg.eigh(tridiagonal)
    order = torch.argsort(values, descending=True)
    values, vectors = values[order], vectors[:, order]
    ritz_vectors = basis[:steps].T @ vectors.to(basis.dtype)
    residuals = (residual_beta * vectors[-1]).abs()
    return LanczosResult(values, ritz_vectors, residuals, alpha, beta, breakdown)
