"""Tests of the cet command line: the four steps end to end, and bad input with clear messages.

The models here are built by functions of this module, which the command line imports through the
``module:function`` model specification (pytest puts the tests folder on ``sys.path``).
"""

import json
import subprocess
import sys

import pytest
import torch
from test_loaders import write_cifar10, write_image_folder
from torch import nn

import cet.io
from cet.cli import EXIT_CODES, main
from cet.export import load_packed

FAST_ANALYSIS = ["--lanczos-steps", "4", "--top-k", "2", "--trace-probes", "2", "--device", "cpu"]


def tiny_net():
    """A CIFAR-sized network small enough for every step to take well under a second."""
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, stride=2), nn.ReLU(),
        nn.Conv2d(4, 6, 3, stride=2), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(6, 10),
    )


def tiny_net_zero_channel():
    model = tiny_net()
    with torch.no_grad():
        model[2].weight[3].zero_()
    return model


class Mixer(nn.Module):
    """Mixes features with a bare weight matrix, a layer type that CET cannot quantize."""

    def __init__(self, features):
        super().__init__()
        self.mix = nn.Parameter(torch.eye(features) + 0.1)

    def forward(self, x):
        return x @ self.mix


def tiny_net_with_mixer():
    model = tiny_net()
    return nn.Sequential(*model[:6], Mixer(6), model[6])


class EmptyBranch(nn.Module):
    """Adds a linear layer with no inputs, as a pruned branch leaves it: its weight has shape (10, 0)."""

    def __init__(self, body):
        super().__init__()
        self.body = body
        self.empty = nn.Linear(0, 10)

    def forward(self, x):
        features = self.body(x)
        return features + self.empty(features[:, :0])


def tiny_net_with_empty_layer():
    return EmptyBranch(tiny_net())


def tiny_net_nan():
    model = tiny_net()
    with torch.no_grad():
        model[0].weight[0, 0, 0, 0] = float("nan")
    return model


@pytest.fixture
def cifar(tmp_path):
    directory = tmp_path / "cifar"
    write_cifar10(directory)
    return f"cifar10:{directory}"


def run(capsys, *arguments):
    code = main([str(a) for a in arguments])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def assert_nothing_written(path):
    assert not path.exists()
    assert not list(path.parent.glob("*.partial"))


def analyze(capsys, tmp_path, data, model="test_cli:tiny_net", *extra):
    output = tmp_path / "analysis.json"
    code, out, err = run(capsys, "analyze", "--model", model, "--data", data, "--calibration-size", 8,
                         "--bits", "2,4,8", *FAST_ANALYSIS, "-o", output, *extra)
    assert code == 0, err
    return output, out


def test_help_lists_steps_and_exit_codes():
    result = subprocess.run([sys.executable, "-m", "cet", "--help"], capture_output=True, text=True, check=True)
    for step in ("analyze", "allocate", "quantize", "evaluate"):
        assert f"cet {step}" in result.stdout
    for code in EXIT_CODES:
        assert f"  {code} " in result.stdout


def test_pipeline_on_user_model(capsys, tmp_path, cifar):
    analysis_path, _ = analyze(capsys, tmp_path, cifar)
    analysis = json.loads(analysis_path.read_text())
    assert [layer["name"] for layer in analysis["layers"]] == ["0", "2", "6"]
    assert analysis["bit_widths"] == [2, 4, 8]
    first = analysis["layers"][0]
    assert first["num_weights"] == 4 * 3 * 9
    assert len(first["ritz_values"]) == 4
    assert len(first["costs"]["cet-rtn"]) == 3
    assert len(first["cost_standard_errors"]["hawq-v2"]) == 3
    assert first["trace_standard_error"] >= 0

    plan_path = tmp_path / "plan.json"
    code, out, err = run(capsys, "allocate", "--analysis", analysis_path, "--target-ratio", 8, "-o", plan_path)
    assert code == 0, err
    plan = json.loads(plan_path.read_text())
    assert plan["weight_compression_ratio"] >= 8
    assert set(plan["bit_widths"]) == {"0", "2", "6"}
    assert "weight compression" in out

    packed_path = tmp_path / "model.cetq"
    code, out, err = run(capsys, "quantize", "--model", "test_cli:tiny_net", "--plan", plan_path, "-o", packed_path)
    assert code == 0, err
    assert packed_path.is_file()

    accuracies = {}
    for variant in ([], ["--plan", plan_path], ["--packed", packed_path]):
        result_path = tmp_path / "accuracy.json"
        code, out, err = run(capsys, "evaluate", "--model", "test_cli:tiny_net", "--data", cifar, "--device", "cpu",
                             *variant, "-o", result_path)
        assert code == 0, err
        assert "top-1 accuracy" in out
        result = json.loads(result_path.read_text())
        assert result["num_samples"] == 3
        accuracies[tuple(map(str, variant[:1]))] = result["accuracy"]
    # The packed file contains exactly the simulated weights, so both give the same predictions.
    assert accuracies[("--packed",)] == accuracies[("--plan",)]


def test_cli_methods_match_steps():
    from cet.cli import COST_METHODS as parser_methods
    from cet.cli.steps import COST_METHODS

    assert parser_methods == COST_METHODS


def test_allocate_for_tolerance(capsys, tmp_path, cifar):
    analysis_path, _ = analyze(capsys, tmp_path, cifar)
    plan_path = tmp_path / "plan.json"
    code, _, err = run(capsys, "allocate", "--analysis", analysis_path, "--tolerance", 1e9, "-o", plan_path)
    assert code == 0, err
    plan = json.loads(plan_path.read_text())
    # Every cost is finite and far below the tolerance, so the smallest model is chosen: 2 bits everywhere.
    assert set(plan["bit_widths"].values()) == {2}
    assert plan["tolerance"] == 1e9


def test_quiet_prints_nothing(capsys, tmp_path, cifar):
    analysis_path, _ = analyze(capsys, tmp_path, cifar)
    code, out, err = run(capsys, "allocate", "--quiet", "--analysis", analysis_path, "--target-ratio", 8,
                         "-o", tmp_path / "plan.json")
    assert code == 0
    assert out == ""
    assert err == ""


def test_resnet34_on_image_folder(capsys, tmp_path):
    import torchvision

    torch.manual_seed(0)
    weights = tmp_path / "resnet34.pth"
    # A DataParallel-style checkpoint, to exercise the prefix stripping on the real architecture.
    state = {f"module.{key}": value for key, value in torchvision.models.resnet34().state_dict().items()}
    torch.save({"state_dict": state}, weights)
    images = tmp_path / "val"
    write_image_folder(images, classes=("n01440764", "n01443537", "n01484850"), per_class=1, size=(80, 64))
    model = ["--model", "resnet34", "--weights", weights, "--image-size", 64, "--batch-size", 2]

    analysis_path = tmp_path / "analysis.json"
    code, out, err = run(capsys, "analyze", *model, "--data", f"imagefolder:{images}", "--calibration-size", 2,
                         "--bits", "4,8", "--lanczos-steps", 2, "--top-k", 1, "--trace-probes", 2, "--device", "cpu",
                         "-o", analysis_path)
    assert code == 0, err
    analysis = json.loads(analysis_path.read_text())
    assert len(analysis["layers"]) == 37
    assert analysis["skipped"] == {}

    plan_path = tmp_path / "plan.json"
    code, _, err = run(capsys, "allocate", "--analysis", analysis_path, "--target-ratio", 6, "-o", plan_path)
    assert code == 0, err

    packed_path = tmp_path / "resnet34.cetq"
    code, out, err = run(capsys, "quantize", "--model", "resnet34", "--weights", weights, "--plan", plan_path,
                         "-o", packed_path)
    assert code == 0, err
    assert packed_path.stat().st_size < weights.stat().st_size / 4

    code, out, err = run(capsys, "evaluate", *model, "--data", f"imagefolder:{images}", "--packed", packed_path,
                         "--device", "cpu")
    assert code == 0, err
    assert "on 3 samples" in out


# Bad input: every case gets a message naming the problem, and no output file appears.

@pytest.mark.parametrize("kind", ["imagefolder", "cifar10"])
def test_missing_data_directory(capsys, tmp_path, kind):
    output = tmp_path / "analysis.json"
    code, _, err = run(capsys, "analyze", "--model", "test_cli:tiny_net", "--data", f"{kind}:{tmp_path / 'absent'}",
                       "-o", output)
    assert code == 1
    assert f"{tmp_path / 'absent'} not found" in err
    assert_nothing_written(output)


def test_empty_data_directory(capsys, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    output = tmp_path / "analysis.json"
    code, _, err = run(capsys, "analyze", "--model", "test_cli:tiny_net", "--data", f"imagefolder:{empty}", "-o", output)
    assert code == 1
    assert f"image folder {empty} contains no images in class sub-folders" in err
    assert_nothing_written(output)


@pytest.mark.parametrize("value", ["nan", "inf"])
def test_nonfinite_weights_file(capsys, tmp_path, cifar, value):
    state = tiny_net().state_dict()
    state["2.weight"][1, 0, 0, 0] = float(value)
    torch.save(state, tmp_path / "weights.pt")
    output = tmp_path / "analysis.json"
    code, _, err = run(capsys, "analyze", "--model", "test_cli:tiny_net", "--weights", tmp_path / "weights.pt",
                       "--data", cifar, "--calibration-size", 8, "-o", output)
    assert code == 1
    assert "contain NaN or infinity in 2.weight (1 of 216 values)" in err
    assert_nothing_written(output)


def test_nonfinite_weights_built(capsys, tmp_path, cifar):
    output = tmp_path / "analysis.json"
    code, _, err = run(capsys, "analyze", "--model", "test_cli:tiny_net_nan", "--data", cifar,
                       "--calibration-size", 8, "-o", output)
    assert code == 1
    assert "the weights from test_cli:tiny_net_nan contain NaN or infinity in 0.weight" in err
    assert_nothing_written(output)


def test_zero_channel_quantizes_to_zeros(capsys, tmp_path, cifar):
    model = "test_cli:tiny_net_zero_channel"
    analysis_path, _ = analyze(capsys, tmp_path, cifar, model)
    plan_path = tmp_path / "plan.json"
    assert run(capsys, "allocate", "--analysis", analysis_path, "--target-ratio", 16, "-o", plan_path)[0] == 0
    packed_path = tmp_path / "model.cetq"
    code, _, err = run(capsys, "quantize", "--model", model, "--plan", plan_path, "-o", packed_path)
    assert code == 0, err

    loaded = load_packed(packed_path, tiny_net())
    assert torch.equal(loaded[2].weight[3], torch.zeros_like(loaded[2].weight[3]))
    assert loaded[2].weight[2].abs().sum() > 0


def test_unquantizable_layer_skipped_and_reported(capsys, tmp_path, cifar):
    analysis_path, out = analyze(capsys, tmp_path, cifar, "test_cli:tiny_net_with_mixer")
    assert "skipped 6: a Mixer cannot be quantized; its weights stay float32" in out
    analysis = json.loads(analysis_path.read_text())
    assert analysis["skipped"] == {"6": "a Mixer cannot be quantized; its weights stay float32"}
    assert [layer["name"] for layer in analysis["layers"]] == ["0", "2", "7"]

    plan_path = tmp_path / "plan.json"
    assert run(capsys, "allocate", "--analysis", analysis_path, "--target-ratio", 8, "-o", plan_path)[0] == 0
    packed_path = tmp_path / "model.cetq"
    code, _, err = run(capsys, "quantize", "--model", "test_cli:tiny_net_with_mixer", "--plan", plan_path, "-o", packed_path)
    assert code == 0, err
    loaded = load_packed(packed_path, tiny_net_with_mixer())
    assert torch.equal(loaded[6].mix, tiny_net_with_mixer()[6].mix)


@pytest.mark.parametrize("ratio", [17, 0.5])
def test_target_ratio_out_of_range(capsys, tmp_path, cifar, ratio):
    analysis_path, _ = analyze(capsys, tmp_path, cifar)
    plan_path = tmp_path / "plan.json"
    code, _, err = run(capsys, "allocate", "--analysis", analysis_path, "--target-ratio", ratio, "-o", plan_path)
    if ratio > 16:
        assert code == 4
        assert "the reachable range is 4x to 16x" in err
        assert_nothing_written(plan_path)
    else:
        # A target below the smallest reachable ratio is met by every allocation.
        assert code == 0, err


@pytest.mark.parametrize("bits, message", [
    ("2,x", "invalid bit width 'x' in '2,x': expected integers"),
    ("1,4", "invalid bit width 1 in '1,4': each must be from 2 to 16"),
    ("4,4", "invalid bit widths '4,4': 4 appears more than once"),
    ("", "invalid bit widths: the list is empty"),
])
def test_invalid_bit_list(capsys, tmp_path, cifar, bits, message):
    output = tmp_path / "analysis.json"
    with pytest.raises(SystemExit) as exit_info:
        main(["analyze", "--model", "test_cli:tiny_net", "--data", cifar, "--bits", bits, "-o", str(output)])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err
    assert_nothing_written(output)


def test_bits_not_analysed(capsys, tmp_path, cifar):
    analysis_path, _ = analyze(capsys, tmp_path, cifar)
    plan_path = tmp_path / "plan.json"
    code, _, err = run(capsys, "allocate", "--analysis", analysis_path, "--target-ratio", 8, "--bits", "3,4",
                       "-o", plan_path)
    assert code == 1
    assert "bit widths [3] were not analysed (the analysis has [2, 4, 8])" in err
    assert_nothing_written(plan_path)


def test_calibration_larger_than_data(capsys, tmp_path, cifar):
    output = tmp_path / "analysis.json"
    code, _, err = run(capsys, "analyze", "--model", "test_cli:tiny_net", "--data", cifar, "--calibration-size", 11,
                       "-o", output)
    assert code == 1
    assert "invalid calibration size 11: the data provide 10 samples to draw from" in err
    assert_nothing_written(output)


def model_that_must_not_load():
    raise AssertionError("the model was loaded before the other inputs were checked")


def test_calibration_size_checked_before_loading(capsys, tmp_path, cifar):
    # Loading the book's model can mean training it first, so a bad size must fail before that.
    output = tmp_path / "analysis.json"
    code, _, err = run(capsys, "analyze", "--model", "test_cli:model_that_must_not_load", "--data", cifar,
                       "--calibration-size", 11, "-o", output)
    assert code == 1
    assert "invalid calibration size 11: the data provide 10 samples to draw from" in err
    assert_nothing_written(output)


def test_missing_plan_checked_before_loading(capsys, tmp_path):
    output = tmp_path / "model.cetq"
    code, _, err = run(capsys, "quantize", "--model", "test_cli:model_that_must_not_load",
                       "--plan", tmp_path / "missing.json", "-o", output)
    assert code == 1
    assert "missing.json" in err
    assert_nothing_written(output)


def test_missing_packed_file_checked_before_loading(capsys, tmp_path, cifar):
    code, _, err = run(capsys, "evaluate", "--model", "test_cli:model_that_must_not_load", "--data", cifar,
                       "--packed", tmp_path / "missing.cetq")
    assert code == 1
    assert f"packed model file {tmp_path / 'missing.cetq'} not found" in err


def test_unwritable_output_path(capsys, tmp_path, cifar):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    output = blocker / "analysis.json"
    code, _, err = run(capsys, "analyze", "--model", "test_cli:tiny_net", "--data", cifar, "-o", output)
    assert code == 3
    assert f"cannot write the output file {output}" in err
    assert blocker.read_text() == "not a folder"
    assert not list(tmp_path.glob("**/*.partial"))


def test_output_path_is_directory(capsys, tmp_path, cifar):
    code, _, err = run(capsys, "analyze", "--model", "test_cli:tiny_net", "--data", cifar, "-o", tmp_path)
    assert code == 3
    assert f"cannot write the output file {tmp_path}: it is a directory" in err


@pytest.mark.parametrize("step", ["allocate", "quantize"])
def test_interrupted_write_keeps_old_file(capsys, tmp_path, cifar, monkeypatch, step):
    analysis_path, _ = analyze(capsys, tmp_path, cifar)
    plan_path = tmp_path / "plan.json"
    assert run(capsys, "allocate", "--analysis", analysis_path, "--target-ratio", 8, "-o", plan_path)[0] == 0
    output = tmp_path / ("new-plan.json" if step == "allocate" else "model.cetq")
    output.write_bytes(b"the previous file")

    def interrupt(descriptor):
        raise KeyboardInterrupt

    # The temporary file is complete but not yet renamed when fsync runs, the last moment to interrupt.
    monkeypatch.setattr(cet.io.os, "fsync", interrupt)
    files_before = sorted(path.name for path in tmp_path.iterdir())
    if step == "allocate":
        arguments = ["allocate", "--analysis", analysis_path, "--target-ratio", 8, "-o", output]
    else:
        arguments = ["quantize", "--model", "test_cli:tiny_net", "--plan", plan_path, "-o", output]
    code, _, err = run(capsys, *arguments)
    assert code == 130
    assert "interrupted; any existing output file was left unchanged" in err
    assert output.read_bytes() == b"the previous file"
    assert sorted(path.name for path in tmp_path.iterdir()) == files_before


def test_class_count_mismatch_with_data(capsys, tmp_path, cifar):
    import torchvision

    torch.save(torchvision.models.resnet18(num_classes=5).state_dict(), tmp_path / "weights.pt")
    output = tmp_path / "accuracy.json"
    code, _, err = run(capsys, "evaluate", "--model", "resnet18", "--weights", tmp_path / "weights.pt",
                       "--num-classes", 5, "--data", cifar, "--device", "cpu", "-o", output)
    assert code == 1
    assert "class-count mismatch: the model has 5 outputs, but" in err
    assert "has 10 classes" in err
    assert_nothing_written(output)


def test_model_without_weights_named(capsys, tmp_path, cifar):
    code, _, err = run(capsys, "evaluate", "--model", "resnet34", "--data", cifar)
    assert code == 1
    assert "model 'resnet34' needs a weights file: pass --weights FILE" in err


def test_plan_for_other_model_rejected(capsys, tmp_path, cifar):
    analysis_path, _ = analyze(capsys, tmp_path, cifar, "test_cli:tiny_net_with_mixer")
    plan_path = tmp_path / "plan.json"
    assert run(capsys, "allocate", "--analysis", analysis_path, "--target-ratio", 8, "-o", plan_path)[0] == 0
    output = tmp_path / "model.cetq"
    code, _, err = run(capsys, "quantize", "--model", "test_cli:tiny_net", "--plan", plan_path, "-o", output)
    assert code == 1
    assert "the plan names layers that the model has no quantizable layer for: 7" in err
    assert_nothing_written(output)


def test_empty_layer_skipped(capsys, tmp_path, cifar):
    analysis_path, out = analyze(capsys, tmp_path, cifar, "test_cli:tiny_net_with_empty_layer")
    assert "skipped empty: it has no weights (a dimension of size 0)" in out
    analysis = json.loads(analysis_path.read_text())
    assert [layer["name"] for layer in analysis["layers"]] == ["body.0", "body.2", "body.6"]


@pytest.mark.parametrize("change, message", [
    (lambda a: a.pop("bit_widths"), "'bit_widths' is None"),
    (lambda a: a["layers"][0].pop("costs"), "layer '0' lacks 3 numeric cet-rtn costs"),
    (lambda a: a["layers"][0]["costs"]["hawq-v1"].pop(), "layer '0' lacks 3 numeric hawq-v1 costs"),
    (lambda a: a["layers"][1]["costs"]["cet-rtn"].__setitem__(0, None), "layer '2' lacks 3 numeric cet-rtn costs"),
    (lambda a: a.__setitem__("layers", 5), "'layers' is int, not a list"),
    (lambda a: a["layers"][0].__setitem__("num_weights", "108"), "'num_weights' '108', not a non-negative integer"),
])
def test_damaged_analysis_rejected(capsys, tmp_path, cifar, change, message):
    analysis_path, _ = analyze(capsys, tmp_path, cifar)
    analysis = json.loads(analysis_path.read_text())
    change(analysis)
    analysis_path.write_text(json.dumps(analysis))
    plan_path = tmp_path / "plan.json"
    code, _, err = run(capsys, "allocate", "--analysis", analysis_path, "--target-ratio", 8, "-o", plan_path)
    assert code == 1
    assert message in err
    assert "create it again with `cet analyze`" in err
    assert_nothing_written(plan_path)


@pytest.mark.parametrize("bits", [4.7, "4", None, 1, 17, True])
def test_invalid_plan_bit_width_rejected(capsys, tmp_path, cifar, bits):
    analysis_path, _ = analyze(capsys, tmp_path, cifar)
    plan_path = tmp_path / "plan.json"
    assert run(capsys, "allocate", "--analysis", analysis_path, "--target-ratio", 8, "-o", plan_path)[0] == 0
    plan = json.loads(plan_path.read_text())
    plan["bit_widths"]["2"] = bits
    plan_path.write_text(json.dumps(plan))
    output = tmp_path / "model.cetq"
    code, _, err = run(capsys, "quantize", "--model", "test_cli:tiny_net", "--plan", plan_path, "-o", output)
    assert code == 1
    assert f"layer '2' has bit width {bits!r}, not an integer from 2 to 16" in err
    assert_nothing_written(output)


def test_plan_without_bit_widths_rejected(capsys, tmp_path, cifar):
    plan_path = tmp_path / "plan.json"
    plan_path.write_text(json.dumps({"format": "cet-plan/1", "model": "test_cli:tiny_net"}))
    output = tmp_path / "model.cetq"
    code, _, err = run(capsys, "quantize", "--model", "test_cli:tiny_net", "--plan", plan_path, "-o", output)
    assert code == 1
    assert "'bit_widths' is NoneType, not a mapping from layer names to bit widths" in err
    assert_nothing_written(output)
