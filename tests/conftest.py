"""Shared pytest settings and the smoke execution of the book, which several test files read."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from cet import book

# The unit tests use tiny tensors, for which one intra-op thread is faster than several.
torch.set_num_threads(1)


@dataclass(frozen=True)
class SmokeBook:
    """Where the smoke execution left the executed chapters and their results files."""

    source: Path
    results: Path
    times: dict[str, float]

    def notebook(self, name: str) -> Path:
        return self.source / "book" / f"{name}.ipynb"


@pytest.fixture(scope="session")
def smoke_book(tmp_path_factory) -> SmokeBook:
    """Execute every chapter of ``_toc.yml`` with the smoke parameters, as ``make book-smoke`` does.

    The executed notebooks go to ``_build/smoke/source``, from which ``make test`` then builds the smoke
    book without executing the chapters again, and the results files to ``_build/smoke-results``. A
    fresh checkpoint cache keeps the run independent of any model trained before.

    The kernels run on one CPU thread, and the smoke model trains in float64 (the profile's
    ``train_precision``). It trains for two epochs and fine-tunes for one. In float32 that run is
    chaotic: two threads instead of one moved its curvatures by 20 to 60% and some accuracies by 8
    points (measured on a 2-core CPU), far outside the tolerances of tests/regression/smoke.json, and
    another machine's processor moved them as far. In float64, two threads instead of one changed 2
    of its 21 million weights, by one float32 step.
    """
    cache = tmp_path_factory.mktemp("cache")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("CET_CACHE", str(cache))
        patch.setenv("OMP_NUM_THREADS", "1")
        patch.setenv("MKL_NUM_THREADS", "1")
        times = book.execute_book("smoke")
    return SmokeBook(source=book.source_dir("smoke"), results=book.BUILD / "smoke-results", times=times)
