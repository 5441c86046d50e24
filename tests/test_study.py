"""The analysis cache: hits return the stored analysis, and unreadable or foreign files are not trusted."""

import logging

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from cet import study
from cet.study import analysis_cache_path, analyze_or_load, is_analysis_cached

SETTINGS = {"batch_size": 8, "lanczos_steps": 4, "top_k": 2, "trace_probes": 2}


@pytest.fixture
def setup(tmp_path, monkeypatch):
    monkeypatch.setenv("CET_CACHE", str(tmp_path))
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 3, 3), nn.ReLU(), nn.Flatten(), nn.Linear(12, 3)).eval()
    calibration = TensorDataset(torch.randn(16, 1, 4, 4), torch.randint(0, 3, (16,)))
    return model, calibration


def _assert_same(first, second):
    assert list(first) == list(second)
    for name in first:
        a, b = first[name], second[name]
        assert torch.equal(a.ritz_values, b.ritz_values), name
        assert torch.equal(a.surrogate.eigenvectors, b.surrogate.eigenvectors), name
        assert a.surrogate.rho == b.surrogate.rho, name
        assert a.trace == b.trace, name
        assert a.quadric == b.quadric, name


def test_cache_hit_returns_stored_analysis(setup, monkeypatch):
    model, calibration = setup
    assert not is_analysis_cached("m", calibration, 0, **SETTINGS)
    first = analyze_or_load(model, "m", calibration, 0, **SETTINGS)
    assert is_analysis_cached("m", calibration, 0, **SETTINGS)

    def fail(*args, **kwargs):
        raise AssertionError("analyze_layers ran on a cache hit")

    monkeypatch.setattr(study, "analyze_layers", fail)
    _assert_same(first, analyze_or_load(model, "m", calibration, 0, **SETTINGS))


def test_cache_keyed_by_settings(setup):
    model, calibration = setup
    analyze_or_load(model, "m", calibration, 0, **SETTINGS)
    assert not is_analysis_cached("m", calibration, 1, **SETTINGS)
    assert not is_analysis_cached("other", calibration, 0, **SETTINGS)
    assert not is_analysis_cached("m", calibration, 0, **{**SETTINGS, "lanczos_steps": 5})


def test_unreadable_cache_recomputed(setup, caplog):
    model, calibration = setup
    first = analyze_or_load(model, "m", calibration, 0, **SETTINGS)
    path = next((analysis_cache_path("m", {}).parent).glob("*.pt"))
    path.write_bytes(b"not a torch file")
    with caplog.at_level(logging.WARNING, logger="cet.study"):
        again = analyze_or_load(model, "m", calibration, 0, **SETTINGS)
    assert "Ignoring cached analysis" in caplog.text
    _assert_same(first, again)
    # The recomputed analysis replaced the broken file.
    torch.load(path, weights_only=True)


def test_recompute_replaces_cache(setup, monkeypatch):
    model, calibration = setup
    analyze_or_load(model, "m", calibration, 0, **SETTINGS)
    calls = []
    original = study.analyze_layers
    monkeypatch.setattr(study, "analyze_layers", lambda *a, **k: calls.append(1) or original(*a, **k))
    analyze_or_load(model, "m", calibration, 0, recompute=True, **SETTINGS)
    assert calls == [1]


def test_cache_of_other_weights_recomputed(setup, caplog):
    model, calibration = setup
    analyze_or_load(model, "m", calibration, 0, **SETTINGS)
    with torch.no_grad():
        model[0].weight.mul_(2)
    with caplog.at_level(logging.WARNING, logger="cet.study"):
        again = analyze_or_load(model, "m", calibration, 0, **SETTINGS)
    assert "computed from other weights than this model's" in caplog.text
    _assert_same(analyze_or_load(model, "m", calibration, 0, recompute=True, **SETTINGS), again)


def test_cache_without_digest_checks_layers(setup, caplog):
    # Files written before the digest was stored are checked by layer names and sizes.
    model, calibration = setup
    analyze_or_load(model, "m", calibration, 0, **SETTINGS)
    path = next((analysis_cache_path("m", {}).parent).glob("*.pt"))
    stored = torch.load(path, weights_only=True)
    del stored["fingerprint"]
    torch.save(stored, path)
    with caplog.at_level(logging.WARNING, logger="cet.study"):
        analyze_or_load(model, "m", calibration, 0, **SETTINGS)
    assert caplog.text == ""
    renamed = nn.Sequential(nn.Identity(), *model).eval()
    with caplog.at_level(logging.WARNING, logger="cet.study"):
        analyze_or_load(renamed, "m", calibration, 0, **SETTINGS)
    assert "the model has no quantizable layer '0'" in caplog.text


@pytest.mark.parametrize("model_key", ["../outside", "a/b", "a\\b", ""])
def test_model_key_with_path_rejected(setup, model_key):
    # The key names a file in the cache directory, so a path in it would write elsewhere.
    model, calibration = setup
    with pytest.raises(ValueError, match="invalid model_key"):
        analyze_or_load(model, model_key, calibration, 0, **SETTINGS)


def test_dtype_setting_cached(setup, monkeypatch):
    model, calibration = setup
    first = analyze_or_load(model, "m", calibration, 0, dtype=torch.float64, **SETTINGS)
    assert is_analysis_cached("m", calibration, 0, dtype=torch.float64, **SETTINGS)
    assert not is_analysis_cached("m", calibration, 0, **SETTINGS)

    def fail(*args, **kwargs):
        raise AssertionError("analyze_layers ran on a cache hit")

    monkeypatch.setattr(study, "analyze_layers", fail)
    _assert_same(first, analyze_or_load(model, "m", calibration, 0, dtype=torch.float64, **SETTINGS))


@pytest.mark.parametrize("setting", [{"seed": 1}, {"layers": {}}], ids=["seed", "layers"])
def test_reserved_setting_rejected(setup, setting):
    model, calibration = setup
    with pytest.raises(TypeError, match=f"{next(iter(setting))} is not a setting of analyze_or_load"):
        analyze_or_load(model, "m", calibration, 0, **setting, **SETTINGS)


def test_cache_of_other_calibration_recomputed(setup, caplog):
    # Same size and seed, but other samples: the key alone cannot tell the two sets apart.
    model, calibration = setup
    analyze_or_load(model, "m", calibration, 0, **SETTINGS)
    generator = torch.Generator().manual_seed(5)
    images = torch.randn(16, 1, 4, 4, generator=generator)
    other = TensorDataset(images, torch.randint(0, 3, (16,), generator=generator))
    with caplog.at_level(logging.WARNING, logger="cet.study"):
        again = analyze_or_load(model, "m", other, 0, **SETTINGS)
    assert "computed from another calibration set" in caplog.text
    _assert_same(analyze_or_load(model, "m", other, 0, recompute=True, **SETTINGS), again)
