"""Tests of cet.hessian against dense Hessians from torch.autograd.functional.hessian (float64)."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.functional import hessian
from torch.func import functional_call

from cet.hessian import LayerHessian, hutchinson_trace

NUM_SAMPLES = 8
NUM_CLASSES = 3


class TinyNet(nn.Module):
    """Conv2d -> Tanh -> BatchNorm2d -> flatten -> Linear on 1x6x6 inputs, smooth so the Hessian exists everywhere."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 2, 3)
        self.bn = nn.BatchNorm2d(2)
        self.fc = nn.Linear(2 * 4 * 4, NUM_CLASSES)

    def forward(self, x):
        x = torch.tanh(self.conv(x))
        x = self.bn(x)
        x = x.flatten(1)
        return self.fc(x)


class NetWithFrozenAndUnused(TinyNet):
    """TinyNet followed by a frozen Linear, plus a registered Linear that forward never calls."""

    def __init__(self):
        super().__init__()
        self.frozen = nn.Linear(NUM_CLASSES, NUM_CLASSES)
        self.frozen.weight.requires_grad_(False)
        self.unused = nn.Linear(NUM_CLASSES, NUM_CLASSES)

    def forward(self, x):
        return self.frozen(super().forward(x))


def make_model(cls=TinyNet):
    """Build a float64 model whose BatchNorm running statistics are not the defaults (0 and 1)."""
    torch.manual_seed(0)
    model = cls().double()
    with torch.no_grad():
        model.bn.running_mean.copy_(torch.tensor([0.1, -0.2], dtype=torch.float64))
        model.bn.running_var.copy_(torch.tensor([0.5, 2.0], dtype=torch.float64))
        model.bn.weight.copy_(torch.tensor([1.5, 0.7], dtype=torch.float64))
        model.bn.bias.copy_(torch.tensor([0.3, -0.1], dtype=torch.float64))
    return model


def make_data():
    generator = torch.Generator().manual_seed(1)
    inputs = torch.randn(NUM_SAMPLES, 1, 6, 6, generator=generator, dtype=torch.float64)
    targets = torch.randint(0, NUM_CLASSES, (NUM_SAMPLES,), generator=generator)
    return inputs, targets


def tiny_layers(model):
    return {"conv": model.conv, "fc": model.fc}


def dense_loss(model, inputs, targets, weights):
    """Return the eval-mode mean cross-entropy with the given weights substituted by name."""
    model.eval()
    outputs = functional_call(model, weights, (inputs,))
    return F.cross_entropy(outputs, targets)


def dense_block(model, name, inputs, targets):
    """Return the dense (n, n) Hessian block of layer ``name``'s weight."""
    key = f"{name}.weight"
    weight = dict(model.named_parameters())[key].detach().clone()
    block = hessian(lambda w: dense_loss(model, inputs, targets, {key: w}), weight)
    return block.reshape(weight.numel(), weight.numel())


def dense_full_hessian(model, names, inputs, targets):
    """Return the dense Hessian over the concatenated flattened weights of ``names``, in that order."""
    keys = [f"{name}.weight" for name in names]
    parameters = dict(model.named_parameters())
    weights = tuple(parameters[key].detach().clone() for key in keys)

    def loss_of(*tensors):
        return dense_loss(model, inputs, targets, dict(zip(keys, tensors)))

    blocks = hessian(loss_of, weights)
    sizes = [w.numel() for w in weights]
    rows = [torch.cat([blocks[i][j].reshape(sizes[i], sizes[j]) for j in range(len(keys))], dim=1) for i in range(len(keys))]
    return torch.cat(rows, dim=0)


@pytest.mark.parametrize("name", ["conv", "fc"])
def test_hvp_matches_dense_block(name):
    model = make_model()
    inputs, targets = make_data()
    block = dense_block(model, name, inputs, targets)
    weight = getattr(model, name).weight
    generator = torch.Generator().manual_seed(2)

    with LayerHessian(model, tiny_layers(model), [(inputs, targets)]) as layer_hessian:
        for _ in range(4):
            vector = torch.randn(weight.shape, generator=generator, dtype=torch.float64)
            product = layer_hessian.hvp(name, vector)
            expected = (block @ vector.reshape(-1)).reshape(weight.shape)
            torch.testing.assert_close(product, expected, rtol=1e-10, atol=1e-12)


def test_dense_block_is_symmetric_and_nonzero():
    # A zero or asymmetric reference block would make the other comparisons meaningless, so check it first.
    model = make_model()
    inputs, targets = make_data()
    block = dense_block(model, "conv", inputs, targets)
    torch.testing.assert_close(block, block.T, rtol=1e-12, atol=1e-14)
    assert block.abs().max() > 1e-3


def test_loss_and_gradient_match_dense():
    model = make_model()
    inputs, targets = make_data()
    loss = dense_loss(model, inputs, targets, {})
    (expected_gradient,) = torch.autograd.grad(loss, model.conv.weight)

    with LayerHessian(model, tiny_layers(model), [(inputs[:3], targets[:3]), (inputs[3:], targets[3:])]) as layer_hessian:
        assert layer_hessian.loss == pytest.approx(loss.item(), rel=1e-12)
        assert layer_hessian.num_samples == NUM_SAMPLES
        torch.testing.assert_close(layer_hessian.gradient("conv"), expected_gradient, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("split", [[8], [4, 4], [3, 5], [1, 2, 5]])
def test_hvp_independent_of_batch_split(split):
    model = make_model()
    inputs, targets = make_data()
    generator = torch.Generator().manual_seed(3)
    vector = torch.randn(model.fc.weight.shape, generator=generator, dtype=torch.float64)

    with LayerHessian(model, tiny_layers(model), [(inputs, targets)]) as whole:
        expected = whole.hvp("fc", vector)
    batches = list(zip(inputs.split(split), targets.split(split)))
    with LayerHessian(model, tiny_layers(model), batches) as split_hessian:
        product = split_hessian.hvp("fc", vector)

    torch.testing.assert_close(product, expected, rtol=1e-10, atol=1e-12)


def test_batchnorm_statistics_unchanged():
    model = make_model()
    model.train()
    inputs, targets = make_data()
    before = {key: value.clone() for key, value in model.bn.state_dict().items()}

    layer_hessian = LayerHessian(model, tiny_layers(model), [(inputs, targets)])
    layer_hessian.hvp("conv", torch.ones_like(model.conv.weight))
    layer_hessian.joint_hvp({"conv": torch.ones_like(model.conv.weight), "fc": torch.ones_like(model.fc.weight)})
    layer_hessian.close()

    for key, value in before.items():
        assert torch.equal(model.bn.state_dict()[key], value), f"BatchNorm buffer {key} changed"


@pytest.mark.parametrize("training", [True, False])
def test_close_restores_training_mode(training):
    model = make_model()
    model.train(training)
    inputs, targets = make_data()

    layer_hessian = LayerHessian(model, tiny_layers(model), [(inputs, targets)])
    assert not model.training, "the analysis must run in eval mode"
    layer_hessian.close()

    assert model.training == training


def test_context_manager_restores_training_mode():
    model = make_model()
    model.train()
    inputs, targets = make_data()
    with LayerHessian(model, tiny_layers(model), [(inputs, targets)]):
        pass
    assert model.training


def test_frozen_and_unused_layers_skipped():
    model = make_model(NetWithFrozenAndUnused)
    inputs, targets = make_data()
    layers = {"conv": model.conv, "fc": model.fc, "frozen": model.frozen, "unused": model.unused}

    with LayerHessian(model, layers, [(inputs[:4], targets[:4]), (inputs[4:], targets[4:])]) as layer_hessian:
        assert set(layer_hessian.skipped) == {"frozen", "unused"}
        assert layer_hessian.layer_names == ["conv", "fc"]
        product = layer_hessian.hvp("conv", torch.ones_like(model.conv.weight))
        assert torch.isfinite(product).all()
        traces = layer_hessian.block_traces(2, torch.Generator().manual_seed(0))
        assert set(traces) == {"conv", "fc"}


def test_only_frozen_layers_raise():
    model = make_model(NetWithFrozenAndUnused)
    inputs, targets = make_data()
    with pytest.raises(ValueError, match="no layer with a trainable weight"):
        LayerHessian(model, {"frozen": model.frozen}, [(inputs, targets)])


def test_empty_calibration_set_raises():
    model = make_model()
    with pytest.raises(ValueError, match="empty calibration set"):
        LayerHessian(model, tiny_layers(model), [])


def test_hvp_rejects_wrong_shape():
    model = make_model()
    inputs, targets = make_data()
    with LayerHessian(model, tiny_layers(model), [(inputs, targets)]) as layer_hessian:
        with pytest.raises(ValueError, match="does not match layer conv"):
            layer_hessian.hvp("conv", torch.ones(3, dtype=torch.float64))


def test_joint_hvp_matches_dense_hessian():
    model = make_model()
    inputs, targets = make_data()
    names = ["conv", "fc"]
    full = dense_full_hessian(model, names, inputs, targets)
    weights = [getattr(model, name).weight for name in names]
    generator = torch.Generator().manual_seed(4)
    vectors = {name: torch.randn(w.shape, generator=generator, dtype=torch.float64) for name, w in zip(names, weights)}
    expected = full @ torch.cat([vectors[name].reshape(-1) for name in names])
    expected_blocks = dict(zip(names, expected.split([w.numel() for w in weights])))

    with LayerHessian(model, tiny_layers(model), [(inputs[:5], targets[:5]), (inputs[5:], targets[5:])]) as layer_hessian:
        products = layer_hessian.joint_hvp(vectors)

    for name, weight in zip(names, weights):
        torch.testing.assert_close(products[name], expected_blocks[name].reshape(weight.shape), rtol=1e-10, atol=1e-12)


def test_joint_hvp_has_cross_terms():
    # With an fc probe alone, the conv block of H v is H_conv,fc v_fc, which is nonzero for this model.
    # The probe is random because an all-ones fc probe shifts every logit equally and leaves the loss unchanged.
    model = make_model()
    inputs, targets = make_data()
    generator = torch.Generator().manual_seed(8)
    fc_probe = torch.randn(model.fc.weight.shape, generator=generator, dtype=torch.float64)
    vectors = {"conv": torch.zeros_like(model.conv.weight), "fc": fc_probe}
    with LayerHessian(model, tiny_layers(model), [(inputs, targets)]) as layer_hessian:
        products = layer_hessian.joint_hvp(vectors)
    assert products["conv"].abs().max() > 1e-6


def test_block_traces_match_exact_traces():
    model = make_model()
    inputs, targets = make_data()
    exact = {name: dense_block(model, name, inputs, targets).trace().item() for name in ("conv", "fc")}

    with LayerHessian(model, tiny_layers(model), [(inputs, targets)]) as layer_hessian:
        estimates = layer_hessian.block_traces(400, torch.Generator().manual_seed(5))

    for name, trace in exact.items():
        estimate = estimates[name]
        assert estimate.num_probes == 400
        assert estimate.standard_error > 0, f"{name}: zero standard error with cross-layer terms present"
        assert abs(estimate.mean - trace) <= 4 * estimate.standard_error, f"{name}: {estimate} vs exact {trace}"


def test_block_traces_reject_one_probe():
    model = make_model()
    inputs, targets = make_data()
    with LayerHessian(model, tiny_layers(model), [(inputs, targets)]) as layer_hessian:
        with pytest.raises(ValueError, match="num_probes"):
            layer_hessian.block_traces(1, torch.Generator().manual_seed(0))


@pytest.mark.parametrize("shape", [(7,), (3, 4)])
def test_hutchinson_exact_on_diagonal(shape):
    diagonal = torch.linspace(-2.0, 5.0, torch.Size(shape).numel(), dtype=torch.float64).reshape(shape)

    estimate = hutchinson_trace(lambda v: diagonal * v, diagonal, 5, torch.Generator().manual_seed(6))

    assert estimate.mean == pytest.approx(diagonal.sum().item(), rel=1e-14)
    assert estimate.standard_error == 0.0
    assert estimate.num_probes == 5


def test_hutchinson_mean_near_dense_trace():
    generator = torch.Generator().manual_seed(7)
    factor = torch.randn(10, 10, generator=generator, dtype=torch.float64)
    matrix = factor + factor.T
    like = torch.zeros(10, dtype=torch.float64)

    estimate = hutchinson_trace(lambda v: matrix @ v, like, 400, generator)

    assert estimate.standard_error > 0
    assert abs(estimate.mean - matrix.trace().item()) <= 4 * estimate.standard_error


def test_hutchinson_rejects_one_probe():
    like = torch.zeros(3, dtype=torch.float64)
    with pytest.raises(ValueError, match="num_probes"):
        hutchinson_trace(lambda v: v, like, 1, torch.Generator().manual_seed(0))



def test_failed_construction_keeps_training_mode():
    model = make_model(NetWithFrozenAndUnused)
    model.train()
    inputs, targets = make_data()
    with pytest.raises(ValueError):
        LayerHessian(model, {"frozen": model.frozen}, [(inputs, targets)])
    assert model.training
