"""Tests of cet.training: the checkpoint cache and the fine-tuning stage, on a few images."""

import torch
from torch.utils.data import TensorDataset

from cet.training import FineTuneConfig, TrainConfig, fine_tune_or_load, reference_model, train_or_load


def tiny_train_set():
    generator = torch.Generator().manual_seed(0)
    return TensorDataset(torch.randn(16, 1, 28, 28, generator=generator), torch.randint(0, 10, (16,), generator=generator))


def test_second_call_loads_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("CET_CACHE", str(tmp_path))
    config = TrainConfig(epochs=1, train_size=16, batch_size=8)
    first = train_or_load(config, tiny_train_set())
    second = train_or_load(config, tiny_train_set())
    assert not first.from_cache
    assert second.from_cache
    for key, tensor in first.model.state_dict().items():
        torch.testing.assert_close(second.model.state_dict()[key], tensor, rtol=0, atol=0)


def test_fine_tune_leaves_base_untouched(tmp_path, monkeypatch):
    monkeypatch.setenv("CET_CACHE", str(tmp_path))
    config = TrainConfig(epochs=1, train_size=16, batch_size=8)
    base = train_or_load(config, tiny_train_set())
    before = {k: v.clone() for k, v in base.model.state_dict().items()}

    tuned = fine_tune_or_load(base, FineTuneConfig(epochs=1, learning_rate=0.01), tiny_train_set())

    for key, tensor in before.items():
        torch.testing.assert_close(base.model.state_dict()[key], tensor, rtol=0, atol=0)
    assert not torch.equal(tuned.model.fc.weight, base.model.fc.weight)
    assert tuned.path != base.path
    assert tuned.train_seconds >= base.train_seconds


def test_reference_model_caches_both_stages(tmp_path, monkeypatch):
    monkeypatch.setenv("CET_CACHE", str(tmp_path))
    config = TrainConfig(epochs=1, train_size=16, batch_size=8)
    fine_tune = FineTuneConfig(epochs=1)
    first = reference_model(config, fine_tune, tiny_train_set())
    second = reference_model(config, fine_tune, tiny_train_set())
    assert second.from_cache
    assert len(list((tmp_path / "checkpoints").glob("*.pt"))) == 2
    torch.testing.assert_close(second.model.fc.weight, first.model.fc.weight, rtol=0, atol=0)
