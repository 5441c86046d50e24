"""Cost tables of every method, the first-order statistics, and the allocation study helpers."""

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import TensorDataset

from cet.analysis import analyze_layers
from cet.costs import METHODS, CostTable, GradientStatistics, cost_table, cost_tables, gradient_statistics
from cet.experiment import (
    calibration_loss, layer_codes, model_compression_ratio, pareto_front, quantize_with_codes, round_layers, run_study,
)
from cet.models import quantizable_layers
from cet.quantize import quantization_error, quantize_layers, quantize_model

BITS = [2, 3, 4, 8]


def _tiny_model():
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
        nn.Conv2d(4, 6, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(24, 3),
    ).eval()


@pytest.fixture(scope="module")
def setup():
    model = _tiny_model()
    generator = torch.Generator().manual_seed(1)
    calibration = TensorDataset(torch.randn(32, 1, 6, 6, generator=generator), torch.randint(0, 3, (32,), generator=generator))
    analyses = analyze_layers(model, calibration, batch_size=16, lanczos_steps=6, top_k=3, trace_probes=4)
    gradients = gradient_statistics(model, calibration, quantizable_layers(model), num_chunks=4)
    return model, calibration, analyses, gradients


def test_gradient_chunks_average_to_full_gradient(setup):
    model, calibration, _, gradients = setup
    images, labels = calibration.tensors
    loss = F.cross_entropy(model(images), labels)
    weight = model[3].weight
    (full,) = torch.autograd.grad(loss, [weight])
    torch.testing.assert_close(gradients.mean("3"), full.reshape(-1), rtol=1e-4, atol=1e-6)


def test_first_order_standard_error(setup):
    model, _, _, gradients = setup
    error = quantization_error(model[3].weight.detach(), 3)
    per_chunk = gradients.chunk_gradients["3"].double() @ error.reshape(-1).double()
    value, standard_error = gradients.first_order("3", error)
    assert value == pytest.approx(per_chunk.mean().item())
    assert standard_error == pytest.approx(per_chunk.std().item() / 2)


def test_hawq_costs_match_formulas(setup):
    model, _, analyses, gradients = setup
    tables = cost_tables(["hawq-v1", "hawq-v2"], model, analyses, BITS, gradients)
    for row, name in enumerate(analyses):
        weight = dict(model.named_modules())[name].weight.detach()
        a = analyses[name]
        for column, bits in enumerate(BITS):
            squared = quantization_error(weight, bits).double().square().sum().item()
            assert tables["hawq-v1"].costs[row, column] == pytest.approx(0.5 * a.top_eigenvalue * squared)
            assert tables["hawq-v2"].costs[row, column] == pytest.approx(0.5 * a.trace.mean / a.num_weights * squared)
            assert tables["hawq-v2"].standard_errors[row, column] == pytest.approx(
                0.5 * a.trace.standard_error / a.num_weights * squared)


def test_cet_without_gradient_is_surrogate(setup):
    model, _, analyses, _ = setup
    table = cost_table("cet", model, analyses, BITS)
    name = list(analyses)[0]
    weight = dict(model.named_modules())[name].weight.detach()
    expected = analyses[name].surrogate.quadratic_cost(quantization_error(weight, 4).double()).item()
    assert table[0, BITS.index(4)] == pytest.approx(expected)


def test_first_order_term_gated_by_significance(setup):
    model, _, analyses, gradients = setup
    without = cost_tables(["cet-rtn"], model, analyses, BITS, gradients, first_order_z=None)["cet-rtn"]
    always = cost_tables(["cet-rtn"], model, analyses, BITS, gradients, first_order_z=0.0)["cet-rtn"]
    never = cost_tables(["cet-rtn"], model, analyses, BITS, gradients, first_order_z=1e9)["cet-rtn"]
    first = cost_tables(["first-order"], model, analyses, BITS, gradients)["first-order"]
    np.testing.assert_allclose(never.costs, without.costs)
    np.testing.assert_allclose(always.costs, without.costs + first.costs, rtol=1e-9, atol=1e-12)


def test_cet_uses_rounded_codes(setup):
    model, calibration, analyses, gradients = setup
    rounded, records = round_layers(model, analyses, BITS, calibration)
    tables = cost_tables(["cet", "cet-rtn"], model, analyses, BITS, gradients, rounded, first_order_z=None)
    for row, name in enumerate(analyses):
        for column, bits in enumerate(BITS):
            if (name, bits) in rounded:
                assert tables["cet"].costs[row, column] <= tables["cet-rtn"].costs[row, column] + 1e-12
            else:
                assert tables["cet"].costs[row, column] == tables["cet-rtn"].costs[row, column]
    assert len(records) == len(analyses) * len(BITS)


def test_round_layers_accepts_only_improvements(setup):
    model, calibration, analyses, _ = setup
    before = {k: v.clone() for k, v in model.state_dict().items()}
    rounded, records = round_layers(model, analyses, BITS, calibration)
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), f"{key} changed"
    for record in records:
        assert record.accepted == ((record.layer, record.bits) in rounded)
        if record.accepted:
            assert record.major_surrogate <= record.nearest_surrogate
            assert record.major_calibration_loss <= record.nearest_calibration_loss
    # The measured loss of an accepted rounding is reproducible from its codes.
    for record in records:
        if record.accepted:
            quantized = quantize_with_codes(model, {record.layer: record.bits}, rounded)
            assert calibration_loss(quantized, calibration) == pytest.approx(record.major_calibration_loss, rel=1e-6)
            break


def test_pareto_front_meets_targets(setup):
    model, _, analyses, gradients = setup
    table = cost_tables(["hawq-v2"], model, analyses, BITS, gradients)["hawq-v2"]
    sizes = [a.num_weights for a in analyses.values()]
    front = pareto_front(table, sizes, [4, 6, 8, 12, 16])
    assert [p["target_ratio"] for p in front] == [4, 6, 8, 12, 16]
    for point in front:
        assert point["weight_compression_ratio"] >= point["target_ratio"] * (1 - 1e-12)
    costs = [p["predicted_cost"] for p in front]
    assert costs == sorted(costs)


def test_run_study_evaluates_every_method(setup):
    model, calibration, analyses, gradients = setup
    tables = cost_tables(list(METHODS), model, analyses, BITS, gradients, first_order_z=2.0)
    runs = run_study(model, tables, [8, 16], calibration, seed=3)
    assert len(runs) == len(METHODS) * 2
    assert {r.seed for r in runs} == {3}
    at_16 = {r.accuracy for r in runs if r.target_ratio == 16}
    assert len(at_16) == 1   # every method puts every layer at 2 bits
    for run in runs:
        quantized = quantize_model(model, run.bit_widths)
        if run.method != "cet":
            images, labels = calibration.tensors
            expected = 100.0 * (quantized(images).argmax(1) == labels).float().mean().item()
            assert run.accuracy == pytest.approx(expected)


def test_unknown_method_raises(setup):
    model, _, analyses, gradients = setup
    with pytest.raises(ValueError, match="unknown method 'hawq-v9'"):
        cost_tables(["hawq-v9"], model, analyses, BITS, gradients)


def test_missing_gradients_raise(setup):
    model, _, analyses, _ = setup
    with pytest.raises(ValueError, match="gradient statistics"):
        cost_tables(["first-order"], model, analyses, BITS)


def test_invalid_chunk_count_raises(setup):
    model, calibration, _, _ = setup
    with pytest.raises(ValueError, match="invalid num_chunks 1"):
        gradient_statistics(model, calibration, quantizable_layers(model), num_chunks=1)


def test_analysis_of_other_model_raises(setup):
    _, _, analyses, _ = setup
    other = nn.Sequential(nn.Conv2d(1, 4, 5, padding=2), nn.BatchNorm2d(4))
    with pytest.raises(ValueError, match="layer '0' covers 36 weights, but the model has 100 weights"):
        cost_tables(["hawq-v1"], other, analyses, BITS, first_order_z=None)
    with pytest.raises(ValueError, match="layer '3' covers 216 weights, but the model has no such layer"):
        cost_tables(["hawq-v1"], nn.Sequential(nn.Conv2d(1, 4, 3)), analyses, BITS, first_order_z=None)


@pytest.mark.parametrize("bits, message", [([], "the list is empty"), ([4, 4], "each may appear only once"),
                                           ([1, 4], "invalid bit width 1")])
def test_invalid_bit_widths_raise(setup, bits, message):
    model, _, analyses, _ = setup
    with pytest.raises(ValueError, match=message):
        cost_tables(["hawq-v1"], model, analyses, bits, first_order_z=None)


def test_rounded_codes_of_other_bits_raise(setup):
    # 4-bit codes filed under 2 bits would be priced as the 2-bit entry.
    model, _, analyses, _ = setup
    four_bit = quantize_layers(model, {"0": 4})["0"]
    with pytest.raises(ValueError, match=r"rounded\[\('0', 2\)\] has 4-bit codes"):
        cost_tables(["cet"], model, analyses, BITS, rounded={("0", 2): four_bit}, first_order_z=None)


def test_rounded_codes_of_other_layer_raise(setup):
    model, _, analyses, _ = setup
    other_layer = quantize_layers(model, {"3": 2})["3"]
    with pytest.raises(ValueError, match=r"codes of shape \(6, 4, 3, 3\) do not match"):
        cost_tables(["cet"], model, analyses, BITS, rounded={("0", 2): other_layer}, first_order_z=None)


def test_rounded_plain_tensor_raises(setup):
    model, _, analyses, _ = setup
    with pytest.raises(TypeError, match="QuantizedTensor"):
        cost_tables(["cet"], model, analyses, BITS, rounded={("0", 2): torch.zeros(4, 1, 3, 3)}, first_order_z=None)


@pytest.mark.parametrize("change, message", [
    (lambda chunks: {("x" + name): value for name, value in chunks.items()}, "no gradient of layer '0'"),
    (lambda chunks: {name: value[:, :5] for name, value in chunks.items()}, r"shape \(4, 5\)"),
    (lambda chunks: {name: value[:1] for name, value in chunks.items()}, r"shape \(1, 36\)"),
    (lambda chunks: {name: value * float("nan") for name, value in chunks.items()}, "NaN or infinity"),
], ids=["other-layers", "short", "one-chunk", "nan"])
def test_invalid_gradients_raise(setup, change, message):
    model, _, analyses, gradients = setup
    broken = GradientStatistics(change(gradients.chunk_gradients))
    for method in ["cet", "first-order"]:
        with pytest.raises(ValueError, match=message):
            cost_tables([method], model, analyses, BITS, broken)


@pytest.mark.parametrize("method, damage", [
    ("hawq-v1", lambda a: a.ritz_values.__setitem__(0, float("nan"))),
    ("hawq-v2", lambda a: setattr(a, "trace", type(a.trace)(float("nan"), 0.0, 2))),
    ("cet-rtn", lambda a: a.surrogate.eigenvalues.__setitem__(0, float("nan"))),
    ("cet-rtn", lambda a: setattr(a.surrogate, "rho", float("inf"))),
], ids=["ritz-value", "trace", "eigenvalue", "rho"])
def test_nonfinite_analysis_raises(setup, method, damage):
    model, _, analyses, _ = setup
    damaged = copy.deepcopy(analyses)
    damage(damaged["3"])
    with pytest.raises(ValueError, match="analysis of layer '3' contains NaN or infinity"):
        cost_tables([method], model, damaged, BITS, first_order_z=None)


def test_surrogate_of_other_size_raises(setup):
    model, _, analyses, _ = setup
    swapped = copy.deepcopy(analyses)
    swapped["3"].surrogate = analyses["0"].surrogate
    with pytest.raises(ValueError, match="surrogate of layer '3' has eigenvectors of length 36"):
        cost_tables(["cet-rtn"], model, swapped, BITS, first_order_z=None)


def test_surrogate_eigenvalue_count_mismatch_raises(setup):
    model, _, analyses, _ = setup
    damaged = copy.deepcopy(analyses)
    damaged["3"].surrogate.eigenvalues = torch.ones(5, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"layer '3' has eigenvalues of shape \(5,\)"):
        cost_tables(["cet-rtn"], model, damaged, BITS, first_order_z=None)


def test_method_string_raises(setup):
    model, _, analyses, gradients = setup
    with pytest.raises(TypeError, match=r"pass a list of method names, such as \['cet'\]"):
        cost_tables("cet", model, analyses, BITS, gradients)


@pytest.mark.parametrize("first_order_z", [-1.0, float("nan"), "2"])
def test_invalid_first_order_z_raises(setup, first_order_z):
    model, _, analyses, gradients = setup
    with pytest.raises(ValueError, match="invalid first_order_z"):
        cost_tables(["cet"], model, analyses, BITS, gradients, first_order_z=first_order_z)


def test_gradients_of_foreign_layer_raise(setup):
    # A layer outside the model gets no gradient, which would be reported as zero.
    model, calibration, _, _ = setup
    copied = copy.deepcopy(model)
    with pytest.raises(ValueError, match="layer '3' is not a module of the model"):
        gradient_statistics(model, calibration, {"3": copied[3]}, num_chunks=2)


def test_layer_codes_of_other_bits_raise(setup):
    # The plan requests 2 bits, so returning the 4-bit codes filed there would change the model's size.
    model, _, _, _ = setup
    four_bit = quantize_layers(model, {"0": 4})["0"]
    with pytest.raises(ValueError, match=r"rounded\[\('0', 2\)\] has 4-bit codes"):
        layer_codes(model, {"0": 2}, {("0", 2): four_bit})


def test_layer_codes_of_other_shape_raise(setup):
    model, _, _, _ = setup
    other_layer = quantize_layers(model, {"3": 2})["3"]
    with pytest.raises(ValueError, match=r"codes of shape \(6, 4, 3, 3\) do not match"):
        layer_codes(model, {"0": 2}, {("0", 2): other_layer})


def test_layer_codes_plain_tensor_raises(setup):
    model, _, _, _ = setup
    with pytest.raises(TypeError, match="QuantizedTensor"):
        layer_codes(model, {"0": 2}, {("0", 2): torch.zeros(4, 1, 3, 3)})


def test_round_layers_names_bad_layers(setup):
    model, calibration, analyses, _ = setup
    with pytest.raises(KeyError, match="layer 'missing' not found"):
        round_layers(model, {"missing": analyses["0"]}, BITS, calibration)
    with pytest.raises(TypeError, match="layer '2' is a ReLU"):
        round_layers(model, {"2": analyses["0"]}, BITS, calibration)


def test_round_layers_repeated_bits_raise(setup):
    model, calibration, analyses, _ = setup
    with pytest.raises(ValueError, match="each may appear only once"):
        round_layers(model, analyses, [4, 4], calibration)


def test_empty_calibration_raises(setup):
    model, _, _, _ = setup
    empty = TensorDataset(torch.zeros(0, 1, 6, 6), torch.zeros(0, dtype=torch.long))
    with pytest.raises(ValueError, match="calibration set is empty"):
        calibration_loss(model, empty)


def test_model_compression_ratio_bad_layers(setup):
    model, _, _, _ = setup
    with pytest.raises(KeyError, match="layer 'missing' not found"):
        model_compression_ratio(model, {"missing": 4})
    with pytest.raises(TypeError, match="layer '2' is a ReLU"):
        model_compression_ratio(model, {"2": 4})
    with pytest.raises(ValueError, match="invalid bit width 0"):
        model_compression_ratio(model, {"0": 0})


@pytest.mark.parametrize("layers, errors_shape, message", [
    (["0", "3"], (3, 4), "2 layer names for 3 rows"),
    (["0", "0", "7"], (3, 4), "layer names repeat"),
    (["0", "3", "7"], (1, 4), r"standard errors of shape \(1, 4\)"),
], ids=["short", "repeated", "errors-shape"])
def test_pareto_front_malformed_table_raises(setup, layers, errors_shape, message):
    model, _, analyses, gradients = setup
    table = cost_tables(["hawq-v2"], model, analyses, BITS, gradients)["hawq-v2"]
    sizes = [a.num_weights for a in analyses.values()]
    broken = CostTable(table.method, layers, table.bit_widths, table.costs, np.zeros(errors_shape))
    with pytest.raises(ValueError, match=message):
        pareto_front(broken, sizes, [8])
