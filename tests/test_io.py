"""Tests of cet.io: atomic writes keep the previous file on any failure and leave no temporary file."""

import json
import math

import pytest
import torch

from cet.io import save_atomic, write_json_atomic

OLD_CONTENT = b'{"old": true}\n'


class FailsToPickle:
    """An object whose pickling raises after torch.save has started writing its archive."""

    def __reduce__(self):
        raise RuntimeError("simulated failure while writing")


def partial_files(directory):
    return sorted(p.name for p in directory.iterdir() if p.name.endswith(".partial"))


def test_write_json_round_trip(tmp_path):
    path = tmp_path / "results.json"
    obj = {"accuracy": 91.25, "bit_widths": {"conv1": 4, "fc": 8}, "runs": [1, 2.5, None]}

    returned = write_json_atomic(obj, path)

    assert returned == path
    assert json.loads(path.read_text()) == obj
    assert partial_files(tmp_path) == []


def test_write_json_replaces_file(tmp_path):
    path = tmp_path / "results.json"
    path.write_bytes(OLD_CONTENT)

    write_json_atomic({"new": 1}, path)

    assert json.loads(path.read_text()) == {"new": 1}


def test_write_json_creates_parent(tmp_path):
    path = tmp_path / "a" / "b" / "results.json"

    write_json_atomic([1, 2], path)

    assert json.loads(path.read_text()) == [1, 2]


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
def test_write_json_rejects_nonfinite(tmp_path, value):
    path = tmp_path / "results.json"
    path.write_bytes(OLD_CONTENT)

    with pytest.raises(ValueError):
        write_json_atomic({"loss": value}, path)

    assert path.read_bytes() == OLD_CONTENT
    assert partial_files(tmp_path) == []


def test_write_json_unserialisable_keeps_old(tmp_path):
    path = tmp_path / "results.json"
    path.write_bytes(OLD_CONTENT)

    with pytest.raises(TypeError):
        write_json_atomic({"model": object()}, path)

    assert path.read_bytes() == OLD_CONTENT
    assert partial_files(tmp_path) == []


def test_save_atomic_round_trip(tmp_path):
    path = tmp_path / "state.pt"
    state = {"weight": torch.arange(6.0).reshape(2, 3)}

    save_atomic(state, path)

    loaded = torch.load(path)
    assert torch.equal(loaded["weight"], state["weight"])
    assert partial_files(tmp_path) == []


def test_failed_save_keeps_old_file(tmp_path):
    # The failure happens inside the write callback, after the temporary file exists, so this
    # exercises the cleanup path of the atomic writer.
    path = tmp_path / "state.pt"
    path.write_bytes(OLD_CONTENT)

    with pytest.raises(RuntimeError, match="simulated failure"):
        save_atomic({"weight": torch.ones(2), "bad": FailsToPickle()}, path)

    assert path.read_bytes() == OLD_CONTENT
    assert partial_files(tmp_path) == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["state.pt"]


@pytest.mark.parametrize("name", ["folder", ""], ids=["folder", "empty"])
def test_directory_path_raises_before_writing(tmp_path, monkeypatch, name):
    # An empty path is the current directory.
    (tmp_path / "folder").mkdir()
    monkeypatch.chdir(tmp_path)

    with pytest.raises(IsADirectoryError, match="is a directory; name a file inside it"):
        save_atomic({"weight": torch.ones(2)}, name)

    assert partial_files(tmp_path) == []
    assert partial_files(tmp_path / "folder") == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["folder"]


def test_file_as_parent_raises(tmp_path):
    (tmp_path / "results").write_bytes(OLD_CONTENT)

    with pytest.raises(NotADirectoryError, match="results is a file, not a directory"):
        write_json_atomic({"new": 1}, tmp_path / "results" / "sub" / "run.json")

    assert (tmp_path / "results").read_bytes() == OLD_CONTENT
