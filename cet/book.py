"""Execute the book's chapters with papermill, then build the HTML with jupyter-book.

``python -m cet.book execute`` runs every notebook listed in ``_toc.yml`` into the profile's source
folder and copies the other pages and the configuration beside them. ``python -m cet.book build`` then
builds the HTML from those executed copies without executing anything again. Each profile has its own
folders, so a smoke run never replaces the full book:

- ``--profile full`` executes into ``_build/source`` and builds ``_build/html/index.html``;
- ``--profile smoke`` executes into ``_build/smoke/source`` and builds ``_build/smoke/_build/html/index.html``.

The chapters are executed into a sibling ``.partial`` folder, which replaces the source folder only
when every chapter succeeded. A chapter that raises, or a cell that runs past the per-cell timeout,
stops the run with the chapter's name and the failing cell, and leaves the previous executed book in
place. Before anything runs, every chapter's prose is checked for typed result numbers
(:mod:`cet.prose`) and every parameter against the chapter's ``parameters`` cell.

Strictness, as enforced here and by the tests:

- parameters are injected by papermill into a cell tagged ``injected-parameters``, which the built
  page shows; a name that the ``parameters`` cell does not define is rejected before execution;
- every chapter runs on the kernel named by ``KERNEL``, with a per-cell timeout (``CELL_TIMEOUTS``);
- the wall time of each chapter, the machine and the library versions are written to
  ``book/execution-times.json`` and rendered as the book's execution-time page;
- the build treats every Sphinx warning as an error (an unresolved glue key, citation or cross-reference).
"""

from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import logging
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

import yaml

from cet.io import write_json_atomic
from cet.prose import chapter_markdown, find_unglued_numbers

__all__ = [
    "build_html", "chapter_parameters", "chapters", "check_prose", "execute_book", "execute_chapter", "html_index",
    "install_mathjax", "main", "render_execution_table", "source_dir", "toc_pages",
]

logger = logging.getLogger(__name__)

# The functions below read these paths when called, so tests can point them at temporary folders.
ROOT = Path(__file__).resolve().parent.parent
BUILD = ROOT / "_build"
# The kernel every chapter runs on. "python3" is ipykernel's own kernel, which jupyter_client starts with
# the interpreter that runs papermill (the project's .venv under make), whatever kernel the notebook's metadata names.
KERNEL = "python3"
PROFILES = ("full", "smoke")
# Seconds one cell may run before its chapter fails. The full book's longest cell trains ResNet-34 when
# the checkpoint is not cached (about 2 hours on 2 CPU cores). The smoke profile's longest cell trains
# the smoke model in float64, about 10 minutes on one thread. The others take a minute or two.
CELL_TIMEOUTS = {"full": 3 * 3600, "smoke": 2400}
# The execution-time page's data and table, generated into the executed book's book/ folder.
TIMES_JSON = "execution-times.json"
TIMES_TABLE = "execution-times-table.md"
# The libraries whose versions the execution-time page lists.
LIBRARIES = ("torch", "torchvision", "numpy", "scipy", "sympy", "pandas", "matplotlib", "papermill", "nbclient",
             "ipykernel", "jupyter-book", "myst-nb", "sphinx")

# Parameters that make every chapter run in a few minutes; the tests use them for a smoke run.
# The training settings are shared, so that all chapters reuse one cached smoke checkpoint. The smoke
# model trains in float64. Its short run is chaotic: in float32, another machine's processor moved the
# regression values far outside their tolerances (curvatures by tens of percent).
_SMOKE_TRAINING = {"epochs": 2, "train_size": 4_000, "fine_tune_epochs": 1, "train_precision": "float64"}
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
                   "uniform_bits": [4], "evaluation_size": 500,
                   "export_path": "_build/smoke-results/resnet34-cet.pt"},
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


def toc_pages(root: Path | None = None) -> list[Path]:
    """Return the pages listed in ``root/_toc.yml`` (default ``ROOT``) that exist, notebooks and markdown, in order."""
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
    pages = []
    for name in files:
        for suffix in (".ipynb", ".md"):
            if (root / f"{name}{suffix}").exists():
                pages.append(root / f"{name}{suffix}")
                break
    return pages


def chapters(root: Path | None = None) -> list[Path]:
    """Return the notebooks listed in ``root/_toc.yml`` (default ``ROOT``), in the table of contents' order."""
    return [page for page in toc_pages(root) if page.suffix == ".ipynb"]


def check_prose(root: Path | None = None) -> dict[str, list[str]]:
    """Return, for each page of the table of contents with typed result numbers, those numbers.

    See :mod:`cet.prose` for what counts as a result number; an empty dict means every page passes.
    """
    root = ROOT if root is None else root
    problems = {}
    for page in toc_pages(root):
        numbers = [number for markdown in chapter_markdown(page) for number in find_unglued_numbers(markdown)]
        if numbers:
            problems[str(page.relative_to(root))] = numbers
    return problems


def chapter_parameters(notebook: Path) -> list[str]:
    """Return the names defined in the chapter's cell tagged ``parameters``."""
    import papermill

    return list(papermill.inspect_notebook(str(notebook)))


def execute_chapter(
    notebook: Path, output: Path, parameters: dict | None = None, cwd: Path = ROOT, timeout: int | None = None
) -> float:
    """Execute one chapter with papermill into ``output``; return the wall time in seconds.

    ``timeout`` is the limit in seconds for each cell (None: no limit).

    Raises:
        ValueError: a parameter is not defined in the chapter's ``parameters`` cell (a misspelt name
            would otherwise be injected silently and ignored), or the chapter has no such cell.
        RuntimeError: the chapter raised, or a cell ran past ``timeout``; the message names the chapter,
            the cell and the executed copy to read.
    """
    import papermill
    from nbclient.exceptions import CellTimeoutError

    parameters = parameters or {}
    defined = chapter_parameters(notebook)
    if parameters and not defined:
        raise ValueError(
            f"chapter {notebook.name} has no cell tagged 'parameters', so it cannot take {sorted(parameters)}; "
            f"tag the cell that defines its parameters"
        )
    unknown = sorted(set(parameters) - set(defined))
    if unknown:
        raise ValueError(
            f"unknown parameters {unknown} for chapter {notebook.name}; "
            f"its parameters cell defines {sorted(defined)}"
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
            f"chapter {notebook.name} failed in {_failed_cell(output, error.exec_count)}: "
            f"{error.ename}: {error.evalue}. The executed copy with the traceback is {output}"
        ) from error
    except CellTimeoutError as error:
        raise RuntimeError(
            f"chapter {notebook.name} timed out in {_failed_cell(output, None)}: the cell ran longer than "
            f"{timeout} s. Raise the per-cell timeout or make the cell faster. The executed copy is {output}"
        ) from error
    finally:
        if previous is None:
            os.environ.pop("TQDM_DISABLE", None)
        else:
            os.environ["TQDM_DISABLE"] = previous
    return time.perf_counter() - start


_PAPERMILL_TAGS = {"injected-parameters", "papermill-error-cell-tag"}


def _failed_cell(output: Path, execution_count: int | None) -> str:
    """Describe the cell that stopped papermill's executed copy: its index in the chapter and first line.

    papermill marks a cell that raised with ``exception``; a cell that timed out is the last one that
    papermill started, since execution stops there. The index counts the chapter's own cells, without
    the ones papermill adds (the injected parameters and the error banner).
    """
    import nbformat

    description = "an unknown cell" if execution_count is None else f"the cell executed as [{execution_count}]"
    if not output.exists():
        return description
    notebook = nbformat.read(output, as_version=4)
    started = [(index, cell) for index, cell in enumerate(notebook.cells)
               if cell.get("metadata", {}).get("papermill", {}).get("start_time")]
    failed = [(index, cell) for index, cell in started if cell.metadata.papermill.get("exception")]
    candidates = failed or started
    if not candidates:
        return description
    index, cell = candidates[0] if failed else candidates[-1]
    added = [c for c in notebook.cells[:index] if set(c.get("metadata", {}).get("tags", [])) & _PAPERMILL_TAGS]
    index -= len(added)
    first_line = next((line.strip() for line in cell.source.splitlines() if line.strip()), "")
    return f"cell {index} ({first_line[:80]!r})"


def execute_book(
    profile: str = "full", results_dir: Path | None = None, cell_timeout: int | None = None
) -> dict[str, float]:
    """Execute every chapter into the profile's source folder and copy the book's other files beside them.

    Before any chapter runs, the prose of every page is checked for typed result numbers and every
    chapter's parameters against its ``parameters`` cell, so a mistake fails in seconds, not after the
    chapters before it. ``cell_timeout`` is the per-cell limit in seconds (default: ``CELL_TIMEOUTS``).

    The chapters are executed into a sibling ``.partial`` folder, which replaces :func:`source_dir`
    only when every chapter succeeded. When a chapter fails, its executed copy is moved to the
    profile's ``failed`` folder, the ``.partial`` folder is removed, and the error is raised again.

    Results files go to ``results_dir`` when given. Otherwise the full profile leaves them at each
    chapter's ``results_path`` parameter (``results/``), and the smoke profile writes them to
    ``_build/smoke-results`` so that it never replaces the results of a full run.

    Raises:
        ValueError: a page has typed result numbers, or a chapter gets a parameter it does not define.
        RuntimeError: a chapter raised or timed out.
    """
    typed = check_prose(ROOT)
    if typed:
        listing = "; ".join(f"{page}: {', '.join(numbers)}" for page, numbers in typed.items())
        raise ValueError(
            f"result numbers typed into the prose instead of glued: {listing}. Glue each value from the "
            f"notebook with myst_nb.glue and write {{glue:text}}`name` (see cet.prose for the rule)"
        )
    if cell_timeout is None:
        cell_timeout = CELL_TIMEOUTS[profile]
    if profile == "smoke" and results_dir is None:
        results_dir = BUILD / "smoke-results"
    plan = [(notebook, _chapter_run_parameters(notebook, profile, results_dir)) for notebook in chapters(ROOT)]
    for notebook, parameters in plan:
        unknown = sorted(set(parameters) - set(chapter_parameters(notebook)))
        if unknown:
            raise ValueError(
                f"unknown parameters {unknown} for chapter {notebook.name} in the {profile} profile; "
                f"its parameters cell defines {sorted(chapter_parameters(notebook))}"
            )

    source = source_dir(profile)
    partial = source.with_name(source.name + ".partial")
    failed_dir = _profile_dir(profile) / "failed"

    for stale in (partial, failed_dir):
        if stale.exists():
            shutil.rmtree(stale)
    try:
        times = _execute_into(partial, plan, profile, cell_timeout, failed_dir)
    except BaseException:
        # BaseException also covers KeyboardInterrupt, so an interrupted run leaves no .partial folder.
        shutil.rmtree(partial, ignore_errors=True)
        raise

    if source.exists():
        shutil.rmtree(source)
    partial.rename(source)
    return times


def _chapter_run_parameters(notebook: Path, profile: str, results_dir: Path | None) -> dict:
    parameters = dict(SMOKE_PARAMETERS.get(notebook.stem, {})) if profile == "smoke" else {}
    if results_dir is not None and "results_path" in chapter_parameters(notebook):
        parameters["results_path"] = str(results_dir / f"{notebook.stem}.json")
    return parameters


def _execute_into(
    target: Path, plan: list[tuple[Path, dict]], profile: str, cell_timeout: int | None, failed_dir: Path
) -> dict[str, float]:
    target.mkdir(parents=True)
    for name in ("_config.yml", "_toc.yml"):
        shutil.copy2(ROOT / name, target / name)
    shutil.copytree(ROOT / "book", target / "book", ignore=shutil.ignore_patterns("*.ipynb", ".ipynb_checkpoints"))

    times = {}
    for notebook, parameters in plan:
        stem = notebook.stem
        output = target / notebook.relative_to(ROOT)
        logger.info("Executing %s", notebook.relative_to(ROOT))
        try:
            times[stem] = execute_chapter(notebook, output, parameters, cwd=ROOT, timeout=cell_timeout)
        except RuntimeError as error:
            if not output.exists():
                raise
            # The error names the executed copy, which lies in the folder that execute_book removes.
            failed_dir.mkdir(parents=True, exist_ok=True)
            failed_copy = failed_dir / output.name
            shutil.move(output, failed_copy)
            raise RuntimeError(f"{error} (moved to {failed_copy})") from error
        logger.info("%s executed in %.0f s", stem, times[stem])

    record = _execution_record(times, profile, cell_timeout)
    write_json_atomic(record, target / "book" / TIMES_JSON)
    (target / "book" / TIMES_TABLE).write_text(render_execution_table(record))
    return times


def _execution_record(times: dict[str, float], profile: str, cell_timeout: int | None) -> dict:
    """Collect the chapter times with the machine and library versions that produced them."""
    versions = {"python": platform.python_version()}
    for name in ("cet", *LIBRARIES):
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return {
        "profile": profile,
        "finished_utc": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "cell_timeout_seconds": cell_timeout,
        "chapters": {name: round(seconds, 1) for name, seconds in times.items()},
        "machine": _machine_description(),
        "versions": versions,
    }


def _machine_description() -> dict[str, str]:
    cpu = platform.processor() or platform.machine()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        models = [line.split(":", 1)[1].strip() for line in cpuinfo.read_text().splitlines()
                  if line.startswith("model name")]
        cpu = models[0] if models else cpu
    try:
        import torch

        gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "none"
    except (ImportError, RuntimeError) as error:
        gpu = f"unknown ({error})"
    return {
        "system": platform.platform(),
        "cpu": cpu,
        "cpu_cores": str(os.cpu_count()),
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS", "not set"),
        "gpu": gpu,
    }


def render_execution_table(record: dict) -> str:
    """Render the execution record as the markdown tables of the book's execution-time page."""
    lines = [
        f"Profile `{record['profile']}`, finished {record['finished_utc']}, "
        f"per-cell timeout {record['cell_timeout_seconds']} s.",
        "",
        "| chapter | seconds |",
        "| --- | ---: |",
    ]
    lines += [f"| {name} | {seconds:.1f} |" for name, seconds in record["chapters"].items()]
    lines.append(f"| **total** | **{sum(record['chapters'].values()):.1f}** |")
    lines += ["", "| machine | |", "| --- | --- |"]
    lines += [f"| {key.replace('_', ' ')} | {value} |" for key, value in record["machine"].items()]
    lines += ["", "| library | version |", "| --- | --- |"]
    lines += [f"| {name} | {version} |" for name, version in record["versions"].items()]
    return "\n".join(lines) + "\n"


def build_html(profile: str = "full") -> Path:
    """Build the profile's HTML from its executed chapters and return the ``index.html`` path.

    Notebooks are not executed again. The full book goes to ``_build/html`` and the smoke book to
    ``_build/smoke/_build/html``. Every Sphinx warning fails the build (``--warningiserror``), after
    ``--keep-going`` has listed all of them. MathJax is copied into the book's ``_mathjax`` folder
    (``html_static_path`` in ``_config.yml``), so that the pages render their math without the network.

    Raises:
        subprocess.CalledProcessError: jupyter-book failed; its output above names each warning.
    """
    source = source_dir(profile)
    install_mathjax(source / "_mathjax")
    command = [
        "jupyter-book", "build", str(source), "--path-output", str(_html_output_root(profile)),
        "--warningiserror", "--keep-going",
    ]
    executable = Path(sys.executable).parent / "jupyter-book"
    if executable.exists():
        command[0] = str(executable)
    subprocess.run(command, check=True)
    return html_index(profile)


# The parts of MathJax 3 that the tex-mml-chtml component loads: itself, the TeX extensions it may
# autoload, the CommonHTML fonts, and the accessibility and menu modules. The speech rule engine and
# the SVG output (most of the 24 MB) are left out.
_MATHJAX_PARTS = ("tex-mml-chtml.js", "input", "output/chtml", "output/chtml.js", "a11y", "ui", "adaptors")


def install_mathjax(static: Path) -> Path:
    """Copy MathJax 3 from the ``django-static-mathjax`` package into ``static/mathjax``; return that folder.

    ``_config.yml`` lists ``static`` (the book's ``_mathjax``) in ``html_static_path`` and points
    ``mathjax_path`` at ``mathjax/tex-mml-chtml.js`` there.
    """
    import mathjax

    package = Path(mathjax.__file__).resolve().parent / "static" / "mathjax" / "es5"
    if not (package / "tex-mml-chtml.js").is_file():
        raise FileNotFoundError(
            f"MathJax's tex-mml-chtml.js not found in {package}; reinstall the package with "
            f"`pip install --force-reinstall django-static-mathjax`"
        )
    target = static / "mathjax"
    if target.exists():
        shutil.rmtree(target)
    for part in _MATHJAX_PARTS:
        (target / part).parent.mkdir(parents=True, exist_ok=True)
        if (package / part).is_dir():
            shutil.copytree(package / part, target / part)
        else:
            shutil.copy2(package / part, target / part)
    return target


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m cet.book", description=__doc__.splitlines()[0])
    parser.add_argument("step", choices=["execute", "build", "all"], help="execute the chapters, build the HTML, or both")
    parser.add_argument("--profile", choices=PROFILES, default="full",
                        help="full: the book's parameters, in _build/source and _build/html; "
                             "smoke: small parameters that run in minutes, in _build/smoke")
    parser.add_argument("--cell-timeout", type=int, default=None, metavar="SECONDS",
                        help="seconds one cell may run before its chapter fails "
                             f"(default: {CELL_TIMEOUTS['full']} for full, {CELL_TIMEOUTS['smoke']} for smoke)")
    arguments = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")

    if arguments.step in ("execute", "all"):
        try:
            times = execute_book(arguments.profile, cell_timeout=arguments.cell_timeout)
        except (ValueError, RuntimeError) as error:
            logger.error("%s", error)
            return 1
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
