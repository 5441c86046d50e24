"""Per-layer Hessian-vector products of the calibration loss, and Hutchinson's trace estimator.

The loss is the mean cross-entropy over the calibration set. Its Hessian is treated as block-diagonal
over layers: layer l's block H_l is the second derivative with respect to that layer's weight tensor.
# Limitation: cross-layer blocks H_lm are ignored, as in the block-diagonal error model of the book.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["LayerHessian", "TraceEstimate", "hutchinson_trace"]

logger = logging.getLogger(__name__)


class LayerHessian:
    """Hessian-vector products for the weight tensors of chosen layers, averaged over calibration batches.

    The constructor runs one forward pass and one first backward pass (with ``create_graph``) per
    batch and keeps those graphs, so every later product, for any layer and any Lanczos step, costs only
    a second backward pass. Products are weighted by batch size, so the result does not depend on how
    the calibration set is split into batches.

    The model is put in eval mode: BatchNorm uses its running statistics and never updates them.
    Layers whose weight does not require a gradient, or does not reach the loss, are skipped and listed
    in :attr:`skipped`.

    Args:
        model: the network; its mode is set to eval and restored by :meth:`close`.
        layers: name -> module for the layers whose weight blocks are wanted.
        batches: (inputs, targets) pairs making up the calibration set.
        loss_fn: mean loss over a batch; cross-entropy by default.
        device: where the graphs and products live; the model must already be there.
    """

    def __init__(
        self,
        model: nn.Module,
        layers: dict[str, nn.Module],
        batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
        loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = F.cross_entropy,
        device: str | torch.device = "cpu",
    ):
        self.model = model
        self._was_training = model.training
        self._gradients: list[dict[str, torch.Tensor]] = []
        self._weights: list[float] = []
        self.skipped: dict[str, str] = {}
        candidates = {}
        for name, module in layers.items():
            if not module.weight.requires_grad:
                self.skipped[name] = "weight does not require a gradient (frozen)"
            else:
                candidates[name] = module.weight
        if not candidates:
            raise ValueError("no layer with a trainable weight to analyse; unfreeze at least one quantizable layer")
        model.eval()
        try:
            self._build_graphs(candidates, batches, loss_fn, device)
        except BaseException:
            self.close()
            raise

    def _build_graphs(self, candidates, batches, loss_fn, device) -> None:
        """Run one forward and one first backward pass per batch and keep the gradients' graphs."""
        model = self.model
        total = 0
        loss_sum = torch.zeros((), device=device, dtype=torch.float64)
        names = list(candidates)
        for inputs, targets in batches:
            inputs, targets = inputs.to(device), targets.to(device)
            outputs = model(inputs)
            self.num_outputs = outputs.shape[-1]
            loss = loss_fn(outputs, targets)
            grads = torch.autograd.grad(loss, [candidates[n] for n in names], create_graph=True, allow_unused=True)
            self._gradients.append(dict(zip(names, grads)))
            self._weights.append(float(len(targets)))
            loss_sum += loss.detach().double() * len(targets)
            total += len(targets)
        if total == 0:
            raise ValueError("empty calibration set: pass at least one batch")
        self._weights = [w / total for w in self._weights]
        self.loss = (loss_sum / total).item()
        self.num_samples = total
        if not math.isfinite(self.loss):
            raise FloatingPointError(
                f"calibration loss is {self.loss}: the model produces NaN or infinite outputs; check its weights and inputs"
            )

        for name in names:
            if all(g[name] is None for g in self._gradients):
                self.skipped[name] = "weight does not reach the loss (unused)"
        if self.skipped:
            logger.warning("Skipped layers in the Hessian analysis: %s", self.skipped)
        self.parameters = {n: candidates[n] for n in names if n not in self.skipped}
        if not self.parameters:
            raise ValueError(f"no analysable layer: every layer was skipped ({self.skipped})")

    @property
    def layer_names(self) -> list[str]:
        return list(self.parameters)

    def gradient(self, name: str) -> torch.Tensor:
        """Return the mean gradient of the loss with respect to the layer's weight (detached)."""
        self._parameter(name)
        return sum(w * g[name].detach() for w, g in zip(self._weights, self._gradients))

    def batch_gradients(self, name: str) -> list[torch.Tensor]:
        """Return the per-batch gradients of the layer's weight, for standard errors of first-order terms."""
        self._parameter(name)
        return [g[name].detach() for g in self._gradients]

    def _check_open(self) -> None:
        if not self._gradients:
            raise RuntimeError("LayerHessian is closed: its graphs were freed; create a new one")

    def _parameter(self, name: str) -> torch.Tensor:
        self._check_open()
        if name not in self.parameters:
            raise KeyError(f"layer {name!r} not analysable here; expected one of {self.layer_names}")
        return self.parameters[name]

    def hvp(self, name: str, vector: torch.Tensor) -> torch.Tensor:
        """Return H_l v for layer ``name``; ``vector`` is shaped like the layer's weight."""
        parameter = self._parameter(name)
        if vector.shape != parameter.shape:
            raise ValueError(f"vector of shape {tuple(vector.shape)} does not match layer {name} of shape {tuple(parameter.shape)}")
        vector = vector.to(parameter.dtype)
        result = torch.zeros_like(parameter)
        for weight, grads in zip(self._weights, self._gradients):
            (product,) = torch.autograd.grad(grads[name], parameter, grad_outputs=vector, retain_graph=True)
            result += weight * product
        return result.detach()

    def joint_hvp(self, vectors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Return the blocks (H v)_l of the full Hessian (cross-layer terms included) for every layer.

        One second backward pass serves all layers, which makes this the cheap way to probe every block
        at once, as :meth:`block_traces` does.
        """
        self._check_open()
        names = self.layer_names
        parameters = [self.parameters[n] for n in names]
        result = [torch.zeros_like(p) for p in parameters]
        for weight, grads in zip(self._weights, self._gradients):
            inner = sum((grads[n] * vectors[n].to(grads[n].dtype)).sum() for n in names)
            products = torch.autograd.grad(inner, parameters, retain_graph=True)
            for total, product in zip(result, products):
                total += weight * product
        return {n: r.detach() for n, r in zip(names, result)}

    def block_traces(self, num_probes: int, generator: torch.Generator) -> dict[str, TraceEstimate]:
        """Estimate tr H_l of every layer with Hutchinson probes shared by all layers.

        With one Rademacher probe z over all layers, z_l^T (H z)_l has expectation tr H_l because the
        cross-layer terms z_l^T H_lm z_m have mean zero for independent signs. Every probe costs one
        product for all layers instead of one per layer. The cross terms add the variance of every
        other layer's coupling, sum_m |H_lm|_F^2, which on a deep network can dwarf tr H_l itself: check
        the standard error, and prefer per-layer probes (:func:`hutchinson_trace` with :meth:`hvp`) when
        each layer's trace matters.
        """
        if num_probes < 2:
            raise ValueError(f"invalid num_probes {num_probes}: at least 2 are needed for a standard error")
        samples: dict[str, list[torch.Tensor]] = {n: [] for n in self.layer_names}
        for _ in range(num_probes):
            probes = {n: _rademacher(p, generator) for n, p in self.parameters.items()}
            products = self.joint_hvp(probes)
            for n in self.layer_names:
                samples[n].append(torch.dot(probes[n].reshape(-1), products[n].reshape(-1)))
        return {n: _trace_estimate(torch.stack(v)) for n, v in samples.items()}

    def close(self) -> None:
        """Free the retained graphs and restore the model's training mode."""
        self._gradients.clear()
        self.model.train(self._was_training)

    def __enter__(self) -> LayerHessian:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


@dataclass
class TraceEstimate:
    """Hutchinson estimate of tr H with its standard error over probes."""

    mean: float
    standard_error: float
    num_probes: int


def hutchinson_trace(
    matvec: Callable[[torch.Tensor], torch.Tensor],
    like: torch.Tensor,
    num_probes: int,
    generator: torch.Generator,
) -> TraceEstimate:
    """Estimate tr A as the mean of z^T A z over Rademacher probes z (Hutchinson, 1990).

    Probes are drawn on the CPU with ``generator`` and moved to ``like``'s device, so the estimate is the
    same on every device up to floating-point rounding.
    """
    if num_probes < 2:
        raise ValueError(f"invalid num_probes {num_probes}: at least 2 are needed for a standard error")
    samples = []
    for _ in range(num_probes):
        probe = _rademacher(like, generator)
        samples.append(torch.dot(probe.reshape(-1), matvec(probe).reshape(-1)))
    return _trace_estimate(torch.stack(samples))


def _rademacher(like: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Draw random signs on the CPU with ``generator``, then move them to ``like``'s device and dtype."""
    return (torch.randint(0, 2, like.shape, generator=generator) * 2 - 1).to(dtype=like.dtype, device=like.device)


def _trace_estimate(samples: torch.Tensor) -> TraceEstimate:
    values = samples.double()
    return TraceEstimate(values.mean().item(), (values.std() / len(values) ** 0.5).item(), len(values))
