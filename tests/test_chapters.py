"""Check the chapters: their committed form, their prose, and what their smoke execution writes.

The smoke execution itself is the session fixture ``smoke_book`` (tests/conftest.py), which runs every
chapter of ``_toc.yml`` once; the tests here read the executed notebooks and results files it leaves.
"""

from __future__ import annotations

import json
import math

import nbformat
import pytest

from cet.allocate import compression_ratio
from cet.book import KERNEL, SMOKE_PARAMETERS, chapter_parameters, chapters, check_prose, execute_chapter
from cet.models import fashion_resnet34, quantizable_layers


def test_toc_lists_every_chapter():
    names = [notebook.stem for notebook in chapters()]
    assert names == ["theory", "hessian", "resnet34", "verification", "allocation"]


def test_toc_pages_have_no_typed_results():
    assert check_prose() == {}


@pytest.mark.parametrize("notebook", chapters(), ids=lambda p: p.name)
def test_chapter_runs_on_named_kernel(notebook):
    content = nbformat.read(notebook, as_version=4)
    assert content.metadata["kernelspec"]["name"] == KERNEL


@pytest.mark.parametrize("notebook", chapters(), ids=lambda p: p.name)
def test_chapter_has_parameters_cell(notebook):
    assert chapter_parameters(notebook), f"{notebook.name} has no cell tagged 'parameters'"
    unknown = set(SMOKE_PARAMETERS.get(notebook.stem, {})) - set(chapter_parameters(notebook))
    assert unknown == set()


def _write_notebook(path, sources):
    notebook = nbformat.v4.new_notebook()
    parameters = nbformat.v4.new_code_cell(sources[0])
    parameters.metadata["tags"] = ["parameters"]
    notebook.cells = [parameters] + [nbformat.v4.new_code_cell(s) for s in sources[1:]]
    notebook.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nbformat.write(notebook, path)
    return path


def test_unknown_parameter_rejected(tmp_path):
    notebook = _write_notebook(tmp_path / "chapter.ipynb", ["size = 1", "print(size)"])
    with pytest.raises(ValueError, match="unknown parameters \\['sizes'\\]"):
        execute_chapter(notebook, tmp_path / "out.ipynb", {"sizes": 2})


def test_failing_chapter_named_in_error(tmp_path):
    notebook = _write_notebook(tmp_path / "broken.ipynb", ["size = 1", "raise ZeroDivisionError('on purpose')"])
    with pytest.raises(RuntimeError, match="chapter broken.ipynb failed in cell .*ZeroDivisionError"):
        execute_chapter(notebook, tmp_path / "out.ipynb", {"size": 2})


@pytest.mark.slow
def test_theory_checks_pass(smoke_book):
    # Every symbolic and numeric check of the chapter is an assert, so executing it is the test.
    executed = nbformat.read(smoke_book.notebook("theory"), as_version=4)
    printed = "".join(o.get("text", "") for c in executed.cells if c.cell_type == "code" for o in c.outputs)
    assert printed.count("checked symbolically") >= 10
    assert printed.count("checked numerically") >= 5


@pytest.mark.slow
def test_hessian_chapter_results(smoke_book):
    parameters = SMOKE_PARAMETERS["hessian"]
    results = json.loads((smoke_book.results / "hessian.json").read_text())
    assert len(results["layers"]) == 37
    for name, layer in results["layers"].items():
        assert len(layer["ritz_values"]) == parameters["top_k"], name
        assert layer["ritz_values"] == sorted(layer["ritz_values"], reverse=True), name
        assert all(math.isfinite(v) for v in layer["ritz_values"] + [layer["trace"]]), name
    assert set(results["densities"]) == {"conv1", "layer2.1.conv1", "layer4.2.conv2", "fc"}
    for name, density in results["densities"].items():
        assert len(density["weights"]) == parameters["density_probes"], name
        for weights in density["weights"]:
            assert min(weights) >= 0.0, name
            assert sum(weights) == pytest.approx(1.0, abs=1e-9), name
    expected = {(n, size, seed) for n in results["densities"] for size in parameters["study_sizes"]
                for seed in parameters["study_seeds"]}
    assert {(row["layer"], row["size"], row["seed"]) for row in results["study"]} == expected


@pytest.fixture(scope="module")
def resnet34_results(smoke_book):
    parameters = SMOKE_PARAMETERS["resnet34"]
    return parameters, json.loads((smoke_book.results / "resnet34.json").read_text())


@pytest.mark.slow
def test_resnet34_runs_complete(resnet34_results):
    parameters, results = resnet34_results
    expected = {("cet", 8.0), ("cet", 11.0), ("cet", 16.0), ("hawq-v2", 8.0), ("hawq-v2", 11.0), ("hawq-v2", 16.0),
                ("uniform-4bit", None), ("uniform-3bit", None)}
    found = {(run["method"], run["target_ratio"]) for run in results["runs"]}
    assert found == expected


@pytest.mark.slow
def test_resnet34_values_finite(resnet34_results):
    _, results = resnet34_results
    assert 0.0 <= results["fp32_accuracy"] <= 100.0
    for run in results["runs"]:
        assert 0.0 <= run["accuracy"] <= 100.0, run["method"]
        assert math.isfinite(run["weight_compression_ratio"]), run["method"]
        assert math.isfinite(run["model_compression_ratio"]), run["method"]


@pytest.mark.slow
def test_resnet34_allocations_within_budget(resnet34_results):
    _, results = resnet34_results
    sizes = {name: module.weight.numel() for name, module in quantizable_layers(fashion_resnet34()).items()}
    names = list(sizes)
    for run in results["runs"]:
        assert set(run["bit_widths"]) == set(sizes), run["method"]
        assert set(run["bit_widths"].values()) <= set(results["bit_width_candidates"]), run["method"]
        ratio = compression_ratio([sizes[n] for n in names], [run["bit_widths"][n] for n in names])
        assert ratio == pytest.approx(run["weight_compression_ratio"], rel=1e-12), run["method"]
        if run["target_ratio"] is not None:
            assert ratio >= run["target_ratio"] * (1 - 1e-9), (run["method"], run["target_ratio"])


@pytest.mark.slow
def test_resnet34_model_learned(resnet34_results):
    # A diverged smoke model has flat logits, all-zero curvature and chance accuracy (10%); the
    # analysis would then run on a degenerate network and check nothing.
    _, results = resnet34_results
    assert results["fp32_accuracy"] > 30.0


@pytest.mark.slow
def test_resnet34_layer_spectra_nondegenerate(resnet34_results):
    _, results = resnet34_results
    assert len(results["layers"]) == 37
    for name, layer in results["layers"].items():
        assert math.isfinite(layer["top_ritz_value"]), name
        assert layer["top_ritz_value"] > 0.0, name
        assert math.isfinite(layer["trace"]), name
        assert math.isfinite(layer["trace_standard_error"]), name
        assert layer["rho"] >= 0.0, name
    assert 0.0 <= results["zero_gradient_fraction"] < 1.0


@pytest.mark.slow
def test_executed_chapters_show_parameters(smoke_book):
    for notebook in chapters():
        executed = nbformat.read(smoke_book.notebook(notebook.stem), as_version=4)
        injected = [cell for cell in executed.cells if "injected-parameters" in cell.metadata.get("tags", [])]
        assert len(injected) == 1, notebook.name
        for name in SMOKE_PARAMETERS.get(notebook.stem, {}):
            assert f"{name} = " in injected[0].source, (notebook.name, name)


@pytest.mark.slow
def test_resnet34_uses_smoke_parameters(resnet34_results):
    parameters, results = resnet34_results
    assert results["evaluation_size"] == parameters["evaluation_size"]
    assert results["calibration_size"] == parameters["calibration_size"]


@pytest.mark.slow
def test_verification_results_complete(smoke_book):
    parameters = SMOKE_PARAMETERS["verification"]
    results = json.loads((smoke_book.results / "verification.json").read_text())
    assert [row["layer"] for row in results["direction_test"]] == parameters["direction_layers"]
    for row in results["direction_test"]:
        for kind in ("top", "random", "complement"):
            assert math.isfinite(row[kind]), (row["layer"], kind)
    assert -1.0 <= results["spearman_predicted_vs_measured"] <= 1.0
    assert -1.0 <= results["spearman_hawq_v2_vs_measured"] <= 1.0


@pytest.fixture(scope="module")
def allocation_results(smoke_book):
    parameters = SMOKE_PARAMETERS["allocation"]
    return parameters, json.loads((smoke_book.results / "allocation.json").read_text())


@pytest.mark.slow
def test_allocation_curves_complete(allocation_results):
    parameters, results = allocation_results
    assert 0.0 <= results["fp32_accuracy"] <= 100.0
    methods = ["cet", "cet-rtn", "hawq-v1", "hawq-v2", "first-order"]
    expected = {(m, s, t) for m in methods for s in parameters["calibration_seeds"] for t in parameters["target_ratios"]}
    found = {(c["method"], c["seed"], c["target_ratio"]) for c in results["curves"]}
    assert found == expected
    for curve in results["curves"]:
        assert curve["weight_compression_ratio"] >= curve["target_ratio"] * (1 - 1e-9), curve
        assert 0.0 <= curve["accuracy"] <= 100.0, curve


@pytest.mark.slow
def test_allocation_rounding_checked(allocation_results):
    _, results = allocation_results
    assert results["rounding"], "no rounding records"
    for record in results["rounding"]:
        if record["accepted"]:
            assert record["major_surrogate"] <= record["nearest_surrogate"], record
            assert record["major_calibration_loss"] <= record["nearest_calibration_loss"], record


@pytest.mark.slow
def test_allocation_export_smaller_than_fp32(allocation_results):
    _, results = allocation_results
    export = results["export"]
    assert export["file_bytes"] < export["fp32_state_dict_bytes"]
    assert 0.0 <= export["accuracy"] <= 100.0
