"""Execute every chapter with papermill on small parameters and check the files it writes."""

from __future__ import annotations

import json
import math

import nbformat
import pytest

from cet.allocate import compression_ratio
from cet.book import ROOT, SMOKE_PARAMETERS, chapters, execute_chapter
from cet.models import fashion_resnet34, quantizable_layers


def test_toc_lists_existing_chapters():
    names = [notebook.stem for notebook in chapters()]
    assert "resnet34" in names


@pytest.mark.parametrize("notebook", sorted((ROOT / "book").glob("*.ipynb")), ids=lambda p: p.name)
def test_committed_notebook_has_no_outputs(notebook):
    content = nbformat.read(notebook, as_version=4)
    with_outputs = [i for i, cell in enumerate(content.cells) if cell.get("outputs")]
    assert with_outputs == [], f"{notebook.name} has outputs in cells {with_outputs}; clear them before committing"


@pytest.fixture(scope="module")
def resnet34_results(tmp_path_factory):
    directory = tmp_path_factory.mktemp("resnet34")
    parameters = dict(SMOKE_PARAMETERS["resnet34"], results_path=str(directory / "resnet34.json"))
    with pytest.MonkeyPatch.context() as patch:
        # A private checkpoint cache keeps the test independent of any model trained before.
        patch.setenv("CET_CACHE", str(directory / "cache"))
        execute_chapter(ROOT / "book" / "resnet34.ipynb", directory / "resnet34.ipynb", parameters)
    return parameters, json.loads((directory / "resnet34.json").read_text())


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
    for run in results["runs"]:
        assert set(run["bit_widths"]) == set(sizes), run["method"]
        assert set(run["bit_widths"].values()) <= set(results["bit_width_candidates"]), run["method"]
        names = list(sizes)
        ratio = compression_ratio([sizes[n] for n in names], [run["bit_widths"][n] for n in names])
        assert ratio == pytest.approx(run["weight_compression_ratio"], rel=1e-12), run["method"]
        if run["target_ratio"] is not None:
            assert ratio >= run["target_ratio"] * (1 - 1e-9), (run["method"], run["target_ratio"])


@pytest.mark.slow
def test_resnet34_uses_smoke_parameters(resnet34_results):
    parameters, results = resnet34_results
    assert results["evaluation_size"] == parameters["evaluation_size"]
    assert results["calibration_size"] == parameters["calibration_size"]
