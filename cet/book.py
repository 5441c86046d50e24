"""Execute the book's chapters with papermill, then build the HTML with jupyter-book.

``python -m cet.book execute`` runs every notebook listed in ``_toc.yml`` into the profile's source
folder and copies the other pages and the configuration beside them. ``python -m cet.book build`` then
builds the HTML from those executed copies without executing anything again. Each profile has its own
folders, so a smoke run never replaces the full book:

- ``--profile full`` executes into ``_build/source`` and builds ``_build/html/index.html``;
- ``--profile smoke`` executes into ``_build/smoke/source`` and builds ``_build/smoke/_build/html/index.html``.

The chapters are executed into a sibling ``.partial`` folder, which replaces the source folder only
when every chapter succeeded. A chapter that raises stops the run with the chapter's name and
papermill's report of the failing cell, and leaves the previous executed book in place.
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import yaml

__all__ = [
    "build_html", "chapter_parameters", "chapters", "execute_book", "execute_chapter", "html_index", "main",
    "source_dir",
]

logger = logging.getLogger(__name__)

# The functions below read these paths when called, so tests can point them at temporary folders.
ROOT = Path(__file__).resolve().parent.parent
BUILD = ROOT / "_build"
KERNEL = "python3"
PROFILES = ("full", "smoke")

# Parameters that make every chapter run in a few minutes; the tests use them for a smoke run.
# The training settings are shared, so that all chapters reuse one cached smoke checkpoint.
_SMOKE_TRAINING = {"epochs": 2, "train_size": 4_000, "fine_tune_epochs": 1}
_SMOKE_HESSIAN = {"calibration_size": 64, "hessian_batch_size": 32, "lanczos_steps": 4, "top_k": 2}
SMOKE_PARAMETERS = {
    "theory": {**_SMOKE_TRAINING, **_SMOKE_HESSIAN, "grid_points": 5, "numeric_trials": 20},
    "resnet34": {**_SMOKE_TRAINING, **_SMOKE_HESSIAN, "trace_probes": 2, "evaluation_size": 500},
    "hessian": {**_SMOKE_TRAINING, **_SMOKE_HESSIAN, "trace_probes": 2, "density_probes": 2, "density_steps": 4,
                "study_sizes": [16, 32], "study_seeds": [0, 1], "study_steps": 3},
    "verification": {**_SMOKE_TRAINING, **_SMOKE_HESSIAN, "trace_probes": 2,
                     "direction_layers": ["conv1", "fc"], "direction_seeds": [0, 1]},
    "allocation": {**_SMOKE_TRAINING, **_SMOKE_HESSIAN, "trace_probes": 2, "calibration_seeds": [0, 1],
                   "gradient_chunks": 4, "target_ratios": [8.0, 11.0, 16.0], "pareto_ratios": [4.0, 8.0, 16.0],
                   "uniform_bits": [4], "evaluation_size": 500},
}


def _profile_dir(profile: str) -> Path:
    if profile not in PROFILES:
        raise ValueError(f"invalid profile {profile!r}: expected one of {', '.join(PROFILES)}")
    return BUILD if profile == "full" else BUILD / profile


def source_dir(profile: str = "full") -> Path:
    """Return the folder of the profile's executed book: ``_build/source`` or ``_build/smoke/source``."""
    return _profile_dir(profile) / "source"


def _html_output_root(profile: str) -> Path:
    # jupyter-book 1.x writes into <--path-output>/_build/html. For the full profile that is
    # _build/html, the path that the README names.
    return BUILD.parent if profile == "full" else _profile_dir(profile)


def html_index(profile: str = "full") -> Path:
    """Return the path of the profile's built ``index.html``."""
    return _html_output_root(profile) / "_build" / "html" / "index.html"


def chapters(root: Path | None = None) -> list[Path]:
    """Return the notebooks listed in ``root/_toc.yml`` (default ``ROOT``), in the table of contents' order."""
    root = ROOT if root is None else root
    toc = yaml.safe_load((root / "_toc.yml").read_text())
    files = [toc["root"]]

    def collect(node: object) -> None:
        if isinstance(node, dict):
            if "file" in node:
                files.append(node["file"])
            for value in node.values():
                collect(value)
        elif isinstance(node, list):
            for item in node:
                collect(item)

    collect(toc.get("parts", toc.get("chapters", [])))
    notebooks = [root / f"{f}.ipynb" for f in files if (root / f"{f}.ipynb").exists()]
    return notebooks


def chapter_parameters(notebook: Path) -> list[str]:
    """Return the names defined in the chapter's cell tagged ``parameters``."""
    import papermill

    return list(papermill.inspect_notebook(str(notebook)))


def execute_chapter(
    notebook: Path, output: Path, parameters: dict | None = None, cwd: Path = ROOT, timeout: int | None = None
) -> float:
    """Execute one chapter with papermill into ``output``; return the wall time in seconds.

    Raises:
        ValueError: a parameter is not defined in the chapter's ``parameters`` cell (a misspelt name
            would otherwise be injected silently and ignored).
        RuntimeError: the chapter raised; the message names the chapter and the executed copy to read.
    """
    import papermill

    parameters = parameters or {}
    unknown = sorted(set(parameters) - set(chapter_parameters(notebook)))
    if unknown:
        raise ValueError(
            f"unknown parameters {unknown} for chapter {notebook.name}; "
            f"its parameters cell defines {sorted(chapter_parameters(notebook))}"
        )
    output.parent.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    # The kernel inherits this process's environment. Progress bars are turned off there, because in
    # an executed notebook they are only noise in the published page.
    previous = os.environ.get("TQDM_DISABLE")
    os.environ["TQDM_DISABLE"] = "1"
    try:
        papermill.execute_notebook(
            str(notebook), str(output), parameters=parameters, kernel_name=KERNEL,
            cwd=str(cwd), progress_bar=False, execution_timeout=timeout,
        )
    except papermill.PapermillExecutionError as error:
        raise RuntimeError(
            f"chapter {notebook.name} failed in cell {error.exec_count}: {error.ename}: {error.evalue}. "
            f"The executed copy with the traceback is {output}"
        ) from error
    finally:
        if previous is None:
            os.environ.pop("TQDM_DISABLE", None)
        else:
            os.environ["TQDM_DISABLE"] = previous
    return time.perf_counter() - start


def execute_book(profile: str = "full", results_dir: Path | None = None) -> dict[str, float]:
    """Execute every chapter into the profile's source folder and copy the book's other files beside them.

    The chapters are executed into a sibling ``.partial`` folder, which replaces :func:`source_dir`
    only when every chapter succeeded. When a chapter fails, its executed copy is moved to the
    profile's ``failed`` folder, the ``.partial`` folder is removed, and the error is raised again.

    Results files go to ``results_dir`` when given. Otherwise the full profile leaves them at each
    chapter's ``results_path`` parameter (``results/``), and the smoke profile writes them to
    ``_build/smoke-results`` so that it never replaces the results of a full run.
    """
    source = source_dir(profile)
    partial = source.with_name(source.name + ".partial")
    failed_dir = _profile_dir(profile) / "failed"
    if profile == "smoke" and results_dir is None:
        results_dir = BUILD / "smoke-results"

    for stale in (partial, failed_dir):
        if stale.exists():
            shutil.rmtree(stale)
    try:
        times = _execute_into(partial, profile, results_dir, failed_dir)
    except BaseException:
        # BaseException also covers KeyboardInterrupt, so an interrupted run leaves no .partial folder.
        shutil.rmtree(partial, ignore_errors=True)
        raise

    if source.exists():
        shutil.rmtree(source)
    partial.rename(source)
    return times


def _execute_into(target: Path, profile: str, results_dir: Path | None, failed_dir: Path) -> dict[str, float]:
    target.mkdir(parents=True)
    for name in ("_config.yml", "_toc.yml"):
        shutil.copy2(ROOT / name, target / name)
    shutil.copytree(ROOT / "book", target / "book", ignore=shutil.ignore_patterns("*.ipynb", ".ipynb_checkpoints"))

    times = {}
    for notebook in chapters(ROOT):
        stem = notebook.stem
        parameters = dict(SMOKE_PARAMETERS.get(stem, {})) if profile == "smoke" else {}
        if results_dir is not None and "results_path" in chapter_parameters(notebook):
            parameters["results_path"] = str(results_dir / f"{stem}.json")
        output = target / notebook.relative_to(ROOT)
        logger.info("Executing %s", notebook.relative_to(ROOT))
        try:
            times[stem] = execute_chapter(notebook, output, parameters, cwd=ROOT)
        except RuntimeError as error:
            if not output.exists():
                raise
            # The error names the executed copy, which lies in the folder that execute_book removes.
            failed_dir.mkdir(parents=True, exist_ok=True)
            failed_copy = failed_dir / output.name
            shutil.move(output, failed_copy)
            raise RuntimeError(f"{error} (moved to {failed_copy})") from error
        logger.info("%s executed in %.0f s", stem, times[stem])
    return times


def build_html(profile: str = "full") -> Path:
    """Build the profile's HTML from its executed chapters and return the ``index.html`` path.

    Notebooks are not executed again. The full book goes to ``_build/html`` and the smoke book to
    ``_build/smoke/_build/html``.
    """
    command = ["jupyter-book", "build", str(source_dir(profile)), "--path-output", str(_html_output_root(profile))]
    executable = Path(sys.executable).parent / "jupyter-book"
    if executable.exists():
        command[0] = str(executable)
    subprocess.run(command, check=True)
    return html_index(profile)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m cet.book", description=__doc__.splitlines()[0])
    parser.add_argument("step", choices=["execute", "build", "all"], help="execute the chapters, build the HTML, or both")
    parser.add_argument("--profile", choices=PROFILES, default="full",
                        help="full: the book's parameters, in _build/source and _build/html; "
                             "smoke: small parameters that run in minutes, in _build/smoke")
    arguments = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")

    if arguments.step in ("execute", "all"):
        times = execute_book(arguments.profile)
        for name, seconds in times.items():
            logger.info("chapter %s: %.0f s", name, seconds)
    if arguments.step in ("build", "all"):
        source = source_dir(arguments.profile)
        if not source.exists():
            parser.error(f"{source} not found: run the execute step with --profile {arguments.profile} first")
        index = build_html(arguments.profile)
        logger.info("The book is at %s", index)
    return 0


if __name__ == "__main__":
    sys.exit(main())
