"""Execute the book's chapters with papermill, then build the HTML with jupyter-book.

``python -m cet.book execute`` runs every notebook listed in ``_toc.yml`` into ``_build/source`` and
copies the other pages and the configuration beside them. ``python -m cet.book build`` then builds
``_build/html`` from those executed copies without executing anything again. A chapter that raises
stops the run with the chapter's name and papermill's report of the failing cell.
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

__all__ = ["build_html", "chapter_parameters", "chapters", "execute_book", "execute_chapter", "main"]

logger = logging.getLogger(__name__)

ROOT = Path(__file__).resolve().parent.parent
BUILD = ROOT / "_build"
SOURCE = BUILD / "source"
KERNEL = "python3"

# Parameters that make every chapter run in a few minutes; the tests use them for a smoke run.
# The training settings are shared, so that all chapters reuse one cached smoke checkpoint.
_SMOKE_TRAINING = {"epochs": 1, "train_size": 2_000, "learning_rate": 0.05}
_SMOKE_HESSIAN = {"calibration_size": 64, "hessian_batch_size": 32, "lanczos_steps": 4, "top_k": 2}
SMOKE_PARAMETERS = {
    "theory": {**_SMOKE_TRAINING, **_SMOKE_HESSIAN, "grid_points": 5, "numeric_trials": 20},
    "resnet34": {**_SMOKE_TRAINING, **_SMOKE_HESSIAN, "trace_probes": 2, "evaluation_size": 500},
    "verification": {**_SMOKE_TRAINING, **_SMOKE_HESSIAN, "trace_probes": 2,
                     "direction_layers": ["conv1", "fc"], "direction_seeds": [0, 1]},
}


def chapters(root: Path = ROOT) -> list[Path]:
    """Return the notebooks listed in ``_toc.yml``, in the table of contents' order."""
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
    """Execute every chapter into ``_build/source`` and copy the book's other files beside them.

    Results files go to ``results_dir`` when given. Otherwise the full profile leaves them at each
    chapter's ``results_path`` parameter (``results/``), and the smoke profile writes them to
    ``_build/smoke-results`` so that it never replaces the results of a full run.
    """
    if profile == "smoke" and results_dir is None:
        results_dir = BUILD / "smoke-results"
    if SOURCE.exists():
        shutil.rmtree(SOURCE)
    SOURCE.mkdir(parents=True)
    for name in ("_config.yml", "_toc.yml"):
        shutil.copy2(ROOT / name, SOURCE / name)
    shutil.copytree(ROOT / "book", SOURCE / "book", ignore=shutil.ignore_patterns("*.ipynb", ".ipynb_checkpoints"))

    times = {}
    for notebook in chapters():
        stem = notebook.stem
        parameters = dict(SMOKE_PARAMETERS.get(stem, {})) if profile == "smoke" else {}
        if results_dir is not None and "results_path" in chapter_parameters(notebook):
            parameters["results_path"] = str(results_dir / f"{stem}.json")
        logger.info("Executing %s", notebook.relative_to(ROOT))
        times[stem] = execute_chapter(notebook, SOURCE / notebook.relative_to(ROOT), parameters)
        logger.info("%s executed in %.0f s", stem, times[stem])
    return times


def build_html() -> Path:
    """Build ``_build/html`` from the executed chapters; notebooks are not executed again."""
    command = ["jupyter-book", "build", str(SOURCE), "--path-output", str(ROOT)]
    executable = Path(sys.executable).parent / "jupyter-book"
    if executable.exists():
        command[0] = str(executable)
    subprocess.run(command, check=True)
    return BUILD / "html" / "index.html"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m cet.book", description=__doc__.splitlines()[0])
    parser.add_argument("step", choices=["execute", "build", "all"], help="execute the chapters, build the HTML, or both")
    parser.add_argument("--profile", choices=["full", "smoke"], default="full",
                        help="full: the book's parameters; smoke: small parameters that run in minutes")
    arguments = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")

    if arguments.step in ("execute", "all"):
        times = execute_book(arguments.profile)
        for name, seconds in times.items():
            logger.info("chapter %s: %.0f s", name, seconds)
    if arguments.step in ("build", "all"):
        if not SOURCE.exists():
            parser.error(f"{SOURCE} not found: run the execute step first")
        index = build_html()
        logger.info("The book is at %s", index)
    return 0


if __name__ == "__main__":
    sys.exit(main())
