"""Check where ``cet.book`` executes and builds each profile, on a one-chapter book in a temporary folder.

Each execution runs a two-cell notebook with papermill, which takes a few seconds. The tests never run
jupyter-book: they check the command that would run it.
"""

from __future__ import annotations

import json
import subprocess

import nbformat
import pytest

from cet import book


def _write_chapter(path, source):
    notebook = nbformat.v4.new_notebook()
    parameters = nbformat.v4.new_code_cell("size = 1")
    parameters.metadata["tags"] = ["parameters"]
    notebook.cells = [parameters, nbformat.v4.new_code_cell(source)]
    notebook.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nbformat.write(notebook, path)


@pytest.fixture
def tiny_book(tmp_path, monkeypatch):
    """Return the root of a book with an intro page and one chapter, with cet.book's paths pointed at it."""
    root = tmp_path / "project"
    (root / "book").mkdir(parents=True)
    (root / "_toc.yml").write_text("format: jb-book\nroot: book/intro\nchapters:\n  - file: book/chapter\n")
    (root / "_config.yml").write_text('title: "Tiny"\n')
    (root / "book" / "intro.md").write_text("# Intro\n")
    _write_chapter(root / "book" / "chapter.ipynb", "print('executed', size)")
    monkeypatch.setattr(book, "ROOT", root)
    monkeypatch.setattr(book, "BUILD", root / "_build")
    return root


def _previous_full_source(root):
    """Create a stand-in for the executed book of an earlier full run and return its marker file."""
    marker = root / "_build" / "source" / "book" / "earlier-run.txt"
    marker.parent.mkdir(parents=True)
    marker.write_text("earlier run")
    return marker


def _printed(notebook_path):
    executed = nbformat.read(notebook_path, as_version=4)
    return "".join(output.get("text", "") for cell in executed.cells for output in cell.get("outputs", []))


def test_profile_paths_separate(tiny_book):
    build = tiny_book / "_build"
    assert book.source_dir("full") == build / "source"
    assert book.source_dir("smoke") == build / "smoke" / "source"
    assert book.html_index("full") == build / "html" / "index.html"
    assert book.html_index("smoke") == build / "smoke" / "_build" / "html" / "index.html"


def test_unknown_profile_rejected(tiny_book):
    with pytest.raises(ValueError, match="invalid profile 'large'"):
        book.source_dir("large")


def test_smoke_execution_keeps_full_source(tiny_book):
    marker = _previous_full_source(tiny_book)

    times = book.execute_book("smoke")

    assert list(times) == ["chapter"]
    assert marker.read_text() == "earlier run"
    assert sorted(p.name for p in (tiny_book / "_build" / "source").rglob("*")) == ["book", "earlier-run.txt"]
    smoke = tiny_book / "_build" / "smoke" / "source"
    assert "executed 1" in _printed(smoke / "book" / "chapter.ipynb")
    assert (smoke / "book" / "intro.md").is_file()
    assert (smoke / "_toc.yml").is_file()
    assert (smoke / "_config.yml").is_file()
    assert not (tiny_book / "_build" / "smoke" / "source.partial").exists()


def test_successful_execution_replaces_source(tiny_book):
    marker = _previous_full_source(tiny_book)
    stale = tiny_book / "_build" / "source.partial"
    (stale / "book").mkdir(parents=True)
    (stale / "book" / "interrupted.txt").write_text("left by an interrupted run")

    book.execute_book("full")

    source = tiny_book / "_build" / "source"
    assert not marker.exists()
    assert "executed 1" in _printed(source / "book" / "chapter.ipynb")
    assert not (source / "book" / "interrupted.txt").exists()
    assert not stale.exists()


def test_failed_chapter_keeps_previous_source(tiny_book):
    marker = _previous_full_source(tiny_book)
    _write_chapter(tiny_book / "book" / "chapter.ipynb", "raise ZeroDivisionError('on purpose')")

    with pytest.raises(RuntimeError, match="chapter chapter.ipynb failed in cell .*ZeroDivisionError") as raised:
        book.execute_book("full")

    assert marker.read_text() == "earlier run"
    assert not (tiny_book / "_build" / "source" / "book" / "chapter.ipynb").exists()
    assert not (tiny_book / "_build" / "source.partial").exists()
    failed_copy = tiny_book / "_build" / "failed" / "chapter.ipynb"
    assert str(failed_copy) in str(raised.value)
    executed = nbformat.read(failed_copy, as_version=4)
    error_names = [output.get("ename") for cell in executed.cells for output in cell.get("outputs", [])]
    assert "ZeroDivisionError" in error_names


def test_failed_chapter_names_cell(tiny_book):
    _write_chapter(tiny_book / "book" / "chapter.ipynb", "x = 1\nraise ZeroDivisionError('on purpose')")

    with pytest.raises(RuntimeError) as raised:
        book.execute_book("smoke")

    # Cell 0 of the chapter is its parameters cell; the cells that papermill adds are not counted.
    assert "chapter chapter.ipynb failed in cell 1 ('x = 1')" in str(raised.value)


def test_cell_timeout_fails_chapter(tiny_book):
    _write_chapter(tiny_book / "book" / "chapter.ipynb", "import time\ntime.sleep(60)")

    with pytest.raises(RuntimeError) as raised:
        book.execute_book("smoke", cell_timeout=2)

    message = str(raised.value)
    assert "chapter chapter.ipynb timed out in cell 1 ('import time')" in message
    assert "longer than 2 s" in message
    assert not (tiny_book / "_build" / "smoke" / "source").exists()


def test_injected_parameters_shown(tiny_book, monkeypatch):
    monkeypatch.setitem(book.SMOKE_PARAMETERS, "chapter", {"size": 7})

    book.execute_book("smoke")

    executed = nbformat.read(tiny_book / "_build" / "smoke" / "source" / "book" / "chapter.ipynb", as_version=4)
    injected = [cell for cell in executed.cells if "injected-parameters" in cell.metadata.get("tags", [])]
    assert len(injected) == 1
    assert "size = 7" in injected[0].source
    assert "executed 7" in _printed(tiny_book / "_build" / "smoke" / "source" / "book" / "chapter.ipynb")


def test_unknown_smoke_parameter_rejected_first(tiny_book, monkeypatch):
    monkeypatch.setitem(book.SMOKE_PARAMETERS, "chapter", {"sizes": 7})

    with pytest.raises(ValueError, match="unknown parameters \\['sizes'\\] for chapter chapter.ipynb in the smoke"):
        book.execute_book("smoke")

    assert not (tiny_book / "_build" / "smoke").exists()


def test_typed_number_stops_execution(tiny_book):
    (tiny_book / "book" / "intro.md").write_text("# Intro\n\nThe model reaches 91.5% accuracy.\n")

    with pytest.raises(ValueError, match="book/intro.md: 91.5%"):
        book.execute_book("smoke")

    assert not (tiny_book / "_build" / "smoke").exists()


def test_execution_times_written(tiny_book):
    times = book.execute_book("smoke")

    pages = tiny_book / "_build" / "smoke" / "source" / "book"
    record = json.loads((pages / book.TIMES_JSON).read_text())
    assert record["profile"] == "smoke"
    assert record["chapters"] == {"chapter": round(times["chapter"], 1)}
    assert record["cell_timeout_seconds"] == book.CELL_TIMEOUTS["smoke"]
    assert record["versions"]["papermill"] != "not installed"
    table = (pages / book.TIMES_TABLE).read_text()
    assert f"| chapter | {times['chapter']:.1f} |" in table
    assert f"| cpu cores | {record['machine']['cpu_cores']} |" in table


def test_build_uses_profile_folders(tiny_book, monkeypatch):
    commands = []
    monkeypatch.setattr(book.subprocess, "run", lambda command, check: commands.append(command))

    index = book.build_html("smoke")

    assert index == tiny_book / "_build" / "smoke" / "_build" / "html" / "index.html"
    [command] = commands
    assert command[1:3] == ["build", str(tiny_book / "_build" / "smoke" / "source")]
    assert command[3:5] == ["--path-output", str(tiny_book / "_build" / "smoke")]
    assert command[5:] == ["--warningiserror", "--keep-going"]
    assert (tiny_book / "_build" / "smoke" / "source" / "_mathjax" / "mathjax" / "tex-mml-chtml.js").is_file()


def test_build_full_writes_build_html(tiny_book, monkeypatch):
    commands = []
    monkeypatch.setattr(book.subprocess, "run", lambda command, check: commands.append(command))

    index = book.build_html("full")

    assert index == tiny_book / "_build" / "html" / "index.html"
    [command] = commands
    assert command[1:] == ["build", str(tiny_book / "_build" / "source"), "--path-output", str(tiny_book),
                           "--warningiserror", "--keep-going"]


def test_build_without_smoke_source_rejected(tiny_book, capsys):
    _previous_full_source(tiny_book)

    with pytest.raises(SystemExit) as raised:
        book.main(["build", "--profile", "smoke"])

    assert raised.value.code == 2
    assert "smoke/source not found" in capsys.readouterr().err


@pytest.mark.slow
def test_build_warning_fails(tiny_book):
    # A real jupyter-book build (about 15 s): a reference to a figure that does not exist is a warning,
    # which the strict build turns into an error.
    (tiny_book / "book" / "intro.md").write_text("# Intro\n\nSee {numref}`fig-missing`.\n")
    book.execute_book("smoke")

    with pytest.raises(subprocess.CalledProcessError):
        book.build_html("smoke")
