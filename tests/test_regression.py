"""Compare the smoke run's results files with expected values stored from a real smoke run.

The expected values are in ``tests/regression/smoke.json``: every number and string of each chapter's
results file, flattened to dotted keys (``resnet34.runs.0.accuracy``), and a list of tolerance rules.
The first rule whose pattern (``fnmatch``) matches a key applies: ``abs`` and ``rel`` bound the
difference like ``math.isclose``, and ``ignore`` (with the reason) skips the key. Strings must match
exactly unless ignored. The smoke run is seeded, runs its kernels on one CPU thread (the
``smoke_book`` fixture) and is deterministic on one machine; the tolerances absorb the differences that
another CPU or BLAS build brings.

NOTE: the expected values come from a CPU run. On a machine with CUDA the chapters run on the GPU
(their ``device`` parameter is "auto"), and the values are expected to move out of tolerance.

To regenerate the expected values after an intended change, run the smoke chapters with::

    CET_REGENERATE_EXPECTED=1 .venv/bin/python -m pytest tests/test_regression.py

which rewrites the values (keeping the rules) and skips the comparison; review and commit the diff.
"""

from __future__ import annotations

import fnmatch
import json
import math
import os
from pathlib import Path

import pytest

from cet.io import write_json_atomic

EXPECTED = Path(__file__).parent / "regression" / "smoke.json"
REGENERATE = "CET_REGENERATE_EXPECTED"


def flatten(value, prefix=""):
    """Flatten nested dicts and lists into ``{dotted key: number or string}``; lists use their indexes."""
    if isinstance(value, dict):
        items = value.items()
    elif isinstance(value, list):
        items = enumerate(value)
    else:
        return {prefix: value}
    flat = {}
    for key, item in items:
        flat.update(flatten(item, f"{prefix}.{key}" if prefix else str(key)))
    return flat


def compare(expected: dict, actual: dict, rules: list[dict]) -> list[str]:
    """Return one message per key whose actual value is missing, extra or outside its tolerance."""
    problems = []
    for key in sorted(set(expected) | set(actual)):
        rule = next((r for r in rules if fnmatch.fnmatchcase(key, r["pattern"])), None)
        if rule is None:
            problems.append(f"{key}: no tolerance rule matches; add one to {EXPECTED.name}")
            continue
        if "ignore" in rule:
            continue
        if key not in actual:
            problems.append(f"{key}: missing from the results (expected {expected[key]!r})")
            continue
        if key not in expected:
            problems.append(f"{key}: not in the expected values (got {actual[key]!r}); regenerate them")
            continue
        want, got = expected[key], actual[key]
        numbers = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (want, got))
        if numbers:
            if not math.isclose(got, want, rel_tol=rule.get("rel", 0.0), abs_tol=rule.get("abs", 0.0)):
                problems.append(f"{key}: {got!r} is outside rel {rule.get('rel', 0.0)} / abs {rule.get('abs', 0.0)} "
                                f"of the expected {want!r}")
        elif want != got:
            problems.append(f"{key}: {got!r} differs from the expected {want!r}")
    return problems


def _smoke_values(results_dir: Path, chapters: list[str]) -> dict:
    # Only the chapters that this session executed: a results file left by a removed chapter is stale.
    values = {}
    for name in chapters:
        path = results_dir / f"{name}.json"
        if path.exists():
            values.update(flatten(json.loads(path.read_text()), name))
    return values


@pytest.fixture(scope="module")
def stored():
    return json.loads(EXPECTED.read_text())


def test_rules_cover_every_key(stored):
    unmatched = [key for key in stored["values"]
                 if not any(fnmatch.fnmatchcase(key, rule["pattern"]) for rule in stored["tolerances"])]
    assert unmatched == []


def test_value_out_of_tolerance_fails(stored):
    expected = stored["values"]
    key = "resnet34.fp32_accuracy"
    rule = next(r for r in stored["tolerances"] if fnmatch.fnmatchcase(key, r["pattern"]))
    inside = dict(expected, **{key: expected[key] + 0.5 * rule["abs"]})
    outside = dict(expected, **{key: expected[key] + 2 * rule["abs"]})
    assert compare(expected, inside, stored["tolerances"]) == []
    [problem] = compare(expected, outside, stored["tolerances"])
    assert problem.startswith(f"{key}: ")
    assert "outside" in problem


def test_changed_string_fails(stored):
    expected = stored["values"]
    key = "resnet34.runs.0.method"
    changed = dict(expected, **{key: "other"})
    assert compare(expected, changed, stored["tolerances"]) == [f"{key}: 'other' differs from the expected 'cet'"]


def test_missing_and_extra_keys_fail(stored):
    expected = stored["values"]
    actual = dict(expected)
    del actual["verification.spearman_predicted_vs_measured"]
    actual["verification.new_value"] = 1.0
    problems = compare(expected, actual, stored["tolerances"])
    assert len(problems) == 2
    assert problems[0].startswith("verification.new_value: not in the expected values")
    assert problems[1].startswith("verification.spearman_predicted_vs_measured: missing from the results")


@pytest.mark.slow
def test_smoke_results_match_expected(smoke_book, stored):
    actual = _smoke_values(smoke_book.results, list(smoke_book.times))
    if os.environ.get(REGENERATE) == "1":
        write_json_atomic({**stored, "values": actual}, EXPECTED)
        pytest.skip(f"{REGENERATE}=1: wrote {len(actual)} expected values to {EXPECTED}")
    problems = compare(stored["values"], actual, stored["tolerances"])
    assert problems == [], (
        f"{len(problems)} smoke results moved out of tolerance; if the change is intended, regenerate with "
        f"{REGENERATE}=1 (see this file's docstring):\n" + "\n".join(problems)
    )
