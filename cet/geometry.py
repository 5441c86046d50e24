"""Geometry of a layer's second-order error model q(d) = g^T d + 1/2 d^T H d.

With H = V diag(lam) V^T, the graph of q is a paraboloid whose kind follows from the signs of the
eigenvalues (Sylvester's law of inertia). An error of fixed norm costs least along the major axis, the
eigenvector of the smallest eigenvalue. It costs most along the minor axis, that of the largest.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

__all__ = [
    "Inertia",
    "LowRankSurrogate",
    "classify_quadric",
    "complement_projection",
    "inertia",
    "quadric_center",
    "semi_axes",
    "subspace_projection",
]


@dataclass(frozen=True)
class Inertia:
    """Counts of positive, negative and zero eigenvalues (zero within a tolerance)."""

    positive: int
    negative: int
    zero: int


def _finite_eigenvalues(eigenvalues: torch.Tensor) -> torch.Tensor:
    values = torch.as_tensor(eigenvalues, dtype=torch.float64)
    if not torch.isfinite(values).all():
        raise ValueError(f"eigenvalues must be finite, found {values[~torch.isfinite(values)].tolist()}")
    return values


def inertia(eigenvalues: torch.Tensor, rtol: float = 1e-6) -> Inertia:
    """Count eigenvalue signs, treating |lam| <= rtol * max |lam| as zero.

    The tolerance is relative to the largest magnitude (our choice), so a round-off eigenvalue just below
    zero of a positive semidefinite matrix counts as zero, not as negative.
    """
    values = _finite_eigenvalues(eigenvalues)
    threshold = rtol * values.abs().max().item() if values.numel() else 0.0
    positive = int((values > threshold).sum())
    negative = int((values < -threshold).sum())
    return Inertia(positive, negative, values.numel() - positive - negative)


def classify_quadric(eigenvalues: torch.Tensor, rtol: float = 1e-6, known_zero_eigenvalues: int = 0) -> str:
    """Name the graph of q(d) from the signs of the eigenvalues of H.

    ``known_zero_eigenvalues`` adds zero eigenvalues known by other means, for eigenvalues that are only a
    part of the spectrum (Ritz values, for instance).

    Returns "elliptic paraboloid" when all eigenvalues are positive (the level sets are ellipsoids),
    "inverted elliptic paraboloid" when all are negative, and "hyperbolic paraboloid" (a saddle) when
    both signs occur. When some eigenvalues are zero, the name is prefixed by "cylinder over a(n)",
    because those axes are infinite. When every eigenvalue is zero, it returns "flat".
    """
    if known_zero_eigenvalues < 0:
        raise ValueError(f"invalid known_zero_eigenvalues {known_zero_eigenvalues}: must be non-negative")
    counts = inertia(eigenvalues, rtol)
    counts = Inertia(counts.positive, counts.negative, counts.zero + known_zero_eigenvalues)
    if counts.positive and counts.negative:
        kind = "hyperbolic paraboloid"
    elif counts.positive:
        kind = "elliptic paraboloid"
    elif counts.negative:
        kind = "inverted elliptic paraboloid"
    else:
        return "flat"
    if counts.zero:
        article = "an" if kind[0] in "aeiou" else "a"
        return f"cylinder over {article} {kind}"
    return kind


def semi_axes(eigenvalues: torch.Tensor, level: float, rtol: float = 1e-6) -> torch.Tensor:
    """Return the semi-axis lengths sqrt(2 level / |lam_i|) of the level set {1/2 a^T diag(lam) a = level}.

    ``level`` is measured from the centre of the quadric, i.e. e + 1/2 g^T H^{-1} g for the level e of q.
    A zero eigenvalue (within ``rtol`` of the largest magnitude) gives an infinite axis. For a negative
    eigenvalue the length is that of the hyperbola's axis in that direction, so no square root of a
    negative number is ever taken. The sign of lam shows on which side of the level the axis lies.

    Raises:
        ValueError: the level set is empty: ``level`` is negative and every nonzero eigenvalue positive
            (below the minimum of the quadric), or positive and every nonzero eigenvalue negative.
    """
    values = _finite_eigenvalues(eigenvalues)
    threshold = rtol * values.abs().max().item() if values.numel() else 0.0
    positive, negative = (values > threshold).any(), (values < -threshold).any()
    if level < 0 and positive and not negative:
        raise ValueError(f"empty level set: level {level} lies below the minimum of a quadric with no negative eigenvalue")
    if level > 0 and negative and not positive:
        raise ValueError(f"empty level set: level {level} lies above the maximum of a quadric with no positive eigenvalue")
    lengths = torch.full_like(values, math.inf)
    nonzero = values.abs() > threshold
    lengths[nonzero] = torch.sqrt(2.0 * abs(level) / values[nonzero].abs())
    return lengths


def quadric_center(
    eigenvalues: torch.Tensor, eigenvectors: torch.Tensor, gradient: torch.Tensor, rtol: float = 1e-6
) -> tuple[torch.Tensor, float]:
    """Return the stationary point d* = -H^{-1} g of q and the value q(d*) = -1/2 g^T H^{-1} g.

    ``eigenvectors`` contains the full orthonormal eigenbasis of H as columns.

    Raises:
        ValueError: an eigenvalue is zero within ``rtol`` of the largest magnitude, so H is singular and
            q has no unique stationary point.
    """
    values = torch.as_tensor(eigenvalues, dtype=torch.float64)
    if inertia(values, rtol).zero:
        raise ValueError("H is singular (a zero eigenvalue): q has no unique centre; the quadric is a cylinder")
    vectors = eigenvectors.to(torch.float64)
    coordinates = vectors.T @ gradient.reshape(-1).to(torch.float64)
    center = -(vectors @ (coordinates / values))
    return center, float(-0.5 * (coordinates.square() / values).sum())


def subspace_projection(vectors: torch.Tensor, error: torch.Tensor) -> torch.Tensor:
    """Return V V^T d, the part of d in the span of the orthonormal columns of V, shaped like d."""
    flat = error.reshape(-1)
    basis = vectors.to(flat.dtype)
    return (basis @ (basis.T @ flat)).reshape(error.shape)


def complement_projection(vectors: torch.Tensor, error: torch.Tensor) -> torch.Tensor:
    """Return (I - V V^T) d, the part of d orthogonal to the span of the columns of V, shaped like d."""
    return error - subspace_projection(vectors, error)


@dataclass
class LowRankSurrogate:
    """The low-rank-plus-isotropic model of one layer's Hessian block (our choice of surrogate).

    H^ = V_k diag(lam_k) V_k^T + rho (I - V_k V_k^T): exact on the span of the top-k Ritz vectors (the
    minor axes), and isotropic with the mean remaining curvature on its complement,
    rho = max(0, (tr H - sum lam_k) / (n - k)).

    Attributes:
        eigenvalues: (k,) top Ritz values.
        eigenvectors: (n, k) orthonormal Ritz vectors (flattened weight coordinates).
        rho: curvature on the complement of the top-k subspace.
    """

    eigenvalues: torch.Tensor
    eigenvectors: torch.Tensor
    rho: float

    @classmethod
    def from_trace(cls, eigenvalues: torch.Tensor, eigenvectors: torch.Tensor, trace: float) -> LowRankSurrogate:
        """Build the surrogate with rho from the trace (clipped at zero)."""
        n, k = eigenvectors.shape
        rho = max(0.0, (trace - eigenvalues.sum().item()) / (n - k)) if n > k else 0.0
        return cls(eigenvalues, eigenvectors, rho)

    def quadratic_cost(self, error: torch.Tensor) -> torch.Tensor:
        """Return 1/2 d^T H^ d in O(nk) for an error d of any shape (it is flattened)."""
        flat = error.reshape(-1)
        coordinates = self.eigenvectors.to(flat.dtype).T @ flat
        in_subspace = (self.eigenvalues.to(flat.dtype) * coordinates.square()).sum()
        complement = flat.square().sum() - coordinates.square().sum()
        return 0.5 * (in_subspace + self.rho * complement)

    def matvec(self, vector: torch.Tensor) -> torch.Tensor:
        """Return H^ v in O(nk)."""
        flat = vector.reshape(-1)
        vectors = self.eigenvectors.to(flat.dtype)
        coordinates = vectors.T @ flat
        return (self.rho * flat + vectors @ ((self.eigenvalues.to(flat.dtype) - self.rho) * coordinates)).reshape(vector.shape)
