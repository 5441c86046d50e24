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


def make_large_data(num_samples=64):
    generator = torch.Generator().manual_seed(9)
    inputs = torch.randn(num_samples, 1, 6, 6, generator=generator, dtype=torch.float64)
    targets = torch.randint(0, NUM_CLASSES, (num_samples,), generator=generator)
    return inputs, targets


@pytest.mark.parametrize("engine", ["graph", "forward"])
def test_one_batch_of_64_equals_four_of_16(engine):
    model = make_model()
    inputs, targets = make_large_data()
    generator = torch.Generator().manual_seed(10)
    vectors = {n: torch.randn(getattr(model, n).weight.shape, generator=generator, dtype=torch.float64) for n in ("conv", "fc")}

    with LayerHessian(model, tiny_layers(model), [(inputs, targets)], engine=engine) as whole:
        expected = {n: whole.hvp(n, v) for n, v in vectors.items()}
        expected_loss = whole.loss
    batches = list(zip(inputs.split(16), targets.split(16)))
    assert len(batches) == 4
    with LayerHessian(model, tiny_layers(model), batches, engine=engine) as split_hessian:
        for name, vector in vectors.items():
            torch.testing.assert_close(split_hessian.hvp(name, vector), expected[name], rtol=1e-12, atol=1e-14)
        assert split_hessian.loss == pytest.approx(expected_loss, rel=1e-13)


@pytest.mark.parametrize("name", ["conv", "fc"])
def test_three_hvp_methods_agree(name):
    model = make_model()
    inputs, targets = make_data()
    batches = [(inputs[:5], targets[:5]), (inputs[5:], targets[5:])]
    weight = getattr(model, name).weight
    vector = torch.randn(weight.shape, generator=torch.Generator().manual_seed(11), dtype=torch.float64)

    with LayerHessian(model, tiny_layers(model), batches, engine="graph") as graph:
        double_backward = graph.hvp(name, vector)
    with LayerHessian(model, tiny_layers(model), batches, engine="forward") as forward:
        forward_over_reverse = forward.hvp(name, vector)

    def gradient_at(shift):
        with torch.no_grad():
            weight.add_(shift)
        try:
            (gradient,) = torch.autograd.grad(dense_loss(model, inputs, targets, {}), weight)
        finally:
            with torch.no_grad():
                weight.sub_(shift)
        return gradient

    step = 1e-5
    central = (gradient_at(step * vector) - gradient_at(-step * vector)) / (2 * step)

    assert double_backward.abs().max() > 1e-3
    torch.testing.assert_close(forward_over_reverse, double_backward, rtol=1e-11, atol=1e-13)
    # Central differences have truncation error O(step^2) and rounding error O(eps / step), so an
    # estimated 1e-10 here.
    torch.testing.assert_close(central, double_backward, rtol=1e-7, atol=1e-8)


def test_forward_engine_keeps_batchnorm_state():
    model = make_model()
    model.train()
    inputs, targets = make_data()
    before = {key: value.clone() for key, value in model.bn.state_dict().items()}

    with LayerHessian(model, tiny_layers(model), [(inputs, targets)], engine="forward") as layer_hessian:
        layer_hessian.hvp("conv", torch.ones_like(model.conv.weight))
        layer_hessian.gradient("fc")

    assert model.training
    for key, value in before.items():
        assert torch.equal(model.bn.state_dict()[key], value), f"BatchNorm buffer {key} changed"


def test_forward_engine_rejects_joint_products():
    model = make_model()
    inputs, targets = make_data()
    with LayerHessian(model, tiny_layers(model), [(inputs, targets)], engine="forward") as layer_hessian:
        with pytest.raises(NotImplementedError, match="engine='graph'"):
            layer_hessian.joint_hvp({"conv": torch.ones_like(model.conv.weight), "fc": torch.ones_like(model.fc.weight)})


def test_unknown_engine_rejected():
    model = make_model()
    inputs, targets = make_data()
    with pytest.raises(ValueError, match="invalid engine"):
        LayerHessian(model, tiny_layers(model), [(inputs, targets)], engine="reverse")


class NetWithUnusedHead(TinyNet):
    """TinyNet with a second classification head that forward never calls."""

    def __init__(self):
        super().__init__()
        self.head = nn.Linear(2 * 4 * 4, NUM_CLASSES)


@pytest.mark.parametrize("engine", ["graph", "forward"])
def test_unused_head_skipped_and_reported(engine, caplog):
    model = make_model(NetWithUnusedHead)
    inputs, targets = make_data()
    layers = {"conv": model.conv, "fc": model.fc, "head": model.head}

    with caplog.at_level("WARNING", logger="cet.hessian"):
        with LayerHessian(model, layers, [(inputs, targets)], engine=engine) as layer_hessian:
            assert layer_hessian.skipped == {"head": "weight does not reach the loss (unused)"}
            assert layer_hessian.layer_names == ["conv", "fc"]
            block = dense_block(model, "fc", inputs, targets)
            vector = torch.randn(model.fc.weight.shape, generator=torch.Generator().manual_seed(12), dtype=torch.float64)
            expected = (block @ vector.reshape(-1)).reshape(vector.shape)
            torch.testing.assert_close(layer_hessian.hvp("fc", vector), expected, rtol=1e-10, atol=1e-12)
    assert "head" in caplog.text


def test_frozen_backbone_analysed_without_crash():
    from cet.analysis import analyze_layers
    from torch.utils.data import TensorDataset

    model = make_model()
    for parameter in list(model.conv.parameters()) + list(model.bn.parameters()):
        parameter.requires_grad_(False)
    inputs, targets = make_data()

    with LayerHessian(model, tiny_layers(model), [(inputs, targets)]) as layer_hessian:
        assert layer_hessian.skipped == {"conv": "weight does not require a gradient (frozen)"}
        block = dense_block(model, "fc", inputs, targets)
        vector = torch.randn(model.fc.weight.shape, generator=torch.Generator().manual_seed(13), dtype=torch.float64)
        expected = (block @ vector.reshape(-1)).reshape(vector.shape)
        torch.testing.assert_close(layer_hessian.hvp("fc", vector), expected, rtol=1e-10, atol=1e-12)

    analyses = analyze_layers(model, TensorDataset(inputs, targets), batch_size=4, lanczos_steps=4, top_k=2,
                              trace_probes=2, layers=tiny_layers(model))
    assert list(analyses) == ["fc"]
    eigenvalues = torch.linalg.eigvalsh(block)
    assert analyses["fc"].top_eigenvalue <= eigenvalues[-1].item() * (1 + 1e-10)


def test_float32_model_casts_float64_inputs():
    model = make_model().float()
    inputs, targets = make_data()
    with LayerHessian(model, tiny_layers(model), [(inputs, targets)]) as layer_hessian:
        product = layer_hessian.hvp("fc", torch.ones_like(model.fc.weight))
    assert product.dtype == torch.float32


@pytest.mark.parametrize("shift", [1.0, -1.0])
def test_hutchinson_stopping_rule_symmetric_in_sign(shift):
    # The stopping rule reads |mean|, so A and -A stop after the same probes with opposite estimates.
    generator = torch.Generator().manual_seed(14)
    factor = torch.randn(30, 30, generator=generator, dtype=torch.float64)
    matrix = shift * (factor @ factor.T / 30 + 0.3 * (factor + factor.T) / 2)
    like = torch.zeros(30, dtype=torch.float64)

    estimate = hutchinson_trace(lambda v: matrix @ v, like, 200, torch.Generator().manual_seed(15), min_probes=5, rtol=0.05)
    mirrored = hutchinson_trace(lambda v: -matrix @ v, like, 200, torch.Generator().manual_seed(15), min_probes=5, rtol=0.05)

    assert 5 <= estimate.num_probes < 200
    assert mirrored.num_probes == estimate.num_probes
    assert mirrored.mean == pytest.approx(-estimate.mean, rel=1e-14)
    assert estimate.standard_error <= 0.05 * abs(estimate.mean)
    assert abs(estimate.mean - matrix.trace().item()) <= 5 * estimate.standard_error


def test_hutchinson_stopping_rule_keeps_minimum_probes():
    diagonal = torch.linspace(-3.0, 1.0, 9, dtype=torch.float64)
    estimate = hutchinson_trace(lambda v: diagonal * v, diagonal, 50, torch.Generator().manual_seed(16), min_probes=7, rtol=0.01)
    assert estimate.num_probes == 7
    assert estimate.mean == pytest.approx(diagonal.sum().item(), rel=1e-14)


def test_hutchinson_zero_trace_runs_to_maximum():
    # A trace of zero can never be known to relative precision: without atol the rule runs to the maximum.
    matrix = torch.tensor([[0.0, 1.0], [1.0, 0.0]], dtype=torch.float64)
    like = torch.zeros(2, dtype=torch.float64)
    estimate = hutchinson_trace(lambda v: matrix @ v, like, 20, torch.Generator().manual_seed(17), min_probes=4, rtol=0.1)
    assert estimate.num_probes == 20
    stopped = hutchinson_trace(lambda v: matrix @ v, like, 20, torch.Generator().manual_seed(17), min_probes=4, rtol=0.1, atol=10.0)
    assert stopped.num_probes == 4


def test_hutchinson_rejects_bad_minimum():
    like = torch.zeros(3, dtype=torch.float64)
    with pytest.raises(ValueError, match="min_probes"):
        hutchinson_trace(lambda v: v, like, 5, torch.Generator().manual_seed(0), min_probes=6, rtol=0.1)


def _free_port():
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _distributed_products(batches, vectors):
    """Return the products, loss, gradient and a short analysis that the distributed test compares."""
    from cet.analysis import analyze_layers
    from torch.utils.data import TensorDataset

    model = make_model()
    with LayerHessian(model, tiny_layers(model), batches) as layer_hessian:
        result = {f"hvp.{n}": layer_hessian.hvp(n, v) for n, v in vectors.items()}
        result["joint"] = layer_hessian.joint_hvp(vectors)["conv"]
        result["gradient"] = layer_hessian.gradient("conv")
        result["loss"] = torch.tensor(layer_hessian.loss)
        result["num_samples"] = torch.tensor(layer_hessian.num_samples)
    inputs = torch.cat([b[0] for b in batches])
    targets = torch.cat([b[1] for b in batches])
    analyses = analyze_layers(model, TensorDataset(inputs, targets), batch_size=13, lanczos_steps=5, top_k=2,
                              trace_probes=2, layers=tiny_layers(model))
    for name, analysis in analyses.items():
        result[f"ritz.{name}"] = analysis.ritz_values
        result[f"trace.{name}"] = torch.tensor(analysis.trace.mean)
    return result


def _distributed_worker(rank, world_size, port, batches, vectors, directory):
    import os

    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
    torch.distributed.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size
    )
    try:
        torch.save(_distributed_products(batches, vectors), f"{directory}/rank{rank}.pt")
    finally:
        torch.distributed.destroy_process_group()


def test_gloo_pair_matches_single_process(tmp_path):
    inputs, targets = make_large_data(40)
    batches = list(zip(inputs.split(13), targets.split(13)))  # 4 batches of 13, 13, 13 and 1 samples
    model = make_model()
    generator = torch.Generator().manual_seed(18)
    vectors = {n: torch.randn(getattr(model, n).weight.shape, generator=generator, dtype=torch.float64) for n in ("conv", "fc")}
    expected = _distributed_products(batches, vectors)

    torch.multiprocessing.spawn(
        _distributed_worker, args=(2, _free_port(), batches, vectors, str(tmp_path)), nprocs=2, join=True
    )

    for rank in range(2):
        result = torch.load(tmp_path / f"rank{rank}.pt")
        assert set(result) == set(expected)
        for key, value in expected.items():
            torch.testing.assert_close(result[key], value, rtol=1e-11, atol=1e-13, msg=f"rank {rank}, {key}")


def test_float64_analysis_leaves_model_alone():
    from cet.analysis import analyze_layers
    from torch.utils.data import TensorDataset

    model = make_model().float()
    inputs, targets = make_data()
    before = {key: value.clone() for key, value in model.state_dict().items()}

    analyses = analyze_layers(model, TensorDataset(inputs.float(), targets), batch_size=4, lanczos_steps=40, top_k=2,
                              trace_probes=2, density_probes=3, dtype=torch.float64, layers=tiny_layers(model))

    assert all(value.dtype == torch.float32 for value in model.state_dict().values() if value.is_floating_point())
    assert all(torch.equal(model.state_dict()[key], value) for key, value in before.items())
    # The float64 copy holds the float32 weights and inputs exactly, so the reference is computed from them.
    reference = torch.linalg.eigvalsh(dense_block(model.double(), "fc", inputs.float().double(), targets))
    assert analyses["fc"].top_eigenvalue == pytest.approx(reference[-1].item(), rel=1e-10)
    density = analyses["fc"].density
    assert density.num_probes == 3
    torch.testing.assert_close(density.weights.sum(dim=1), torch.ones(3, dtype=torch.float64), rtol=0, atol=1e-12)
