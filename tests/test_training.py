"""Tests of cet.training: the checkpoint cache and the fine-tuning stage, on a few images."""

import dataclasses
import hashlib
import json
import logging
import sys
import threading
import time

import pytest
import torch
from torch.utils.data import TensorDataset

from cet import training
from cet.io import save_atomic
from cet.training import FineTuneConfig, TrainConfig, checkpoint_path, fine_tune_or_load, reference_model, train_or_load


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


@pytest.mark.skipif(sys.platform == "win32", reason="the training lock uses fcntl.flock")
def test_waiting_process_loads_checkpoint(tmp_path, monkeypatch, caplog):
    # Another process holds the training lock: this one waits, then loads that process's checkpoint.
    import fcntl

    monkeypatch.setenv("CET_CACHE", str(tmp_path))
    config = TrainConfig(epochs=1, train_size=16, batch_size=8)
    path = checkpoint_path(config)
    path.parent.mkdir(parents=True)
    trained = []
    original_train = training.train
    monkeypatch.setattr(training, "train", lambda *args, **kwargs: trained.append(1) or original_train(*args, **kwargs))
    results = []
    with open(path.with_name(path.name + ".lock"), "a") as lock, caplog.at_level(logging.WARNING, logger="cet.training"):
        fcntl.flock(lock, fcntl.LOCK_EX)
        waiter = threading.Thread(target=lambda: results.append(train_or_load(config, tiny_train_set())))
        waiter.start()
        deadline = time.monotonic() + 30
        while "Another process is training" not in caplog.text and time.monotonic() < deadline:
            time.sleep(0.05)
        assert "Another process is training" in caplog.text
        model, seconds = original_train(config, tiny_train_set())
        save_atomic({"config": config.settings(), "state_dict": model.state_dict(), "train_seconds": seconds}, path)
        fcntl.flock(lock, fcntl.LOCK_UN)
    waiter.join(timeout=60)
    assert not waiter.is_alive()
    assert trained == []
    assert results[0].from_cache
    torch.testing.assert_close(results[0].model.fc.weight, model.fc.weight, rtol=0, atol=0)


def test_float64_training_round_trip(tmp_path, monkeypatch):
    monkeypatch.setenv("CET_CACHE", str(tmp_path))
    config = TrainConfig(epochs=1, train_size=16, batch_size=8, precision="float64")
    fine_tune = FineTuneConfig(epochs=1)

    base = train_or_load(config, tiny_train_set())
    tuned = fine_tune_or_load(base, fine_tune, tiny_train_set())
    reloaded = fine_tune_or_load(base, fine_tune, tiny_train_set())
    reference = reference_model(config, fine_tune, tiny_train_set())

    assert base.model.fc.weight.dtype == torch.float64
    assert not tuned.from_cache
    assert reloaded.from_cache
    torch.testing.assert_close(reloaded.model.fc.weight, tuned.model.fc.weight, rtol=0, atol=0)
    assert {p.dtype for p in reference.model.parameters()} == {torch.float32}
    torch.testing.assert_close(reference.model.fc.weight, tuned.model.fc.weight.float(), rtol=0, atol=0)
    # evaluate feeds a float64 model float64 inputs.
    assert training.evaluate(base.model, tiny_train_set()) == training.evaluate(base.model.float(), tiny_train_set())


def test_precision_key_keeps_old_keys():
    config = TrainConfig(epochs=3, train_size=100)
    # The payload as hashed before the precision setting existed.
    old = {"recipe": training._RECIPE_VERSION, **{k: v for k, v in dataclasses.asdict(config).items() if k != "precision"}}
    old_key = hashlib.sha256(json.dumps(old, sort_keys=True).encode()).hexdigest()[:16]

    assert config.key() == old_key
    assert TrainConfig().key() == "90cb61987fca6c2f"  # the book's cached checkpoint, trained before the setting
    assert TrainConfig(epochs=3, train_size=100, precision="float64").key() != old_key


def test_invalid_precision_is_rejected():
    with pytest.raises(ValueError, match="invalid precision 'float16'"):
        TrainConfig(precision="float16")
