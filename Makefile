# The two commands of the README: `make book` (the main job) and `make test`.
# Each creates the virtual environment and installs the data when they are missing.

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# The book that `make check-book` opens: full (_build/html) or smoke (_build/smoke/_build/html).
PROFILE ?= full

.PHONY: book book-smoke check-book chromium test data lab clean help

help:
	@echo "make book        create .venv, install the data, execute every chapter, build _build/html"
	@echo "make test        create .venv, install the data and Chromium, run the unit tests and the smoke chapters, build the smoke book and check it in Chromium"
	@echo "make book-smoke  the book with small parameters (minutes) in _build/smoke, for checking the pipeline"
	@echo "make check-book  open every page of the built book in headless Chromium (PROFILE=full or smoke)"
	@echo "make lab         JupyterLab on this repository, with .venv registered as the kernel 'Python (cet)'"
	@echo "make clean       remove _build (the checkpoint cache and .venv stay)"

# The environment counts as usable only when pip runs in it: on Debian without python3-venv,
# `python3 -m venv` fails in ensurepip but leaves .venv/bin/python behind, so that test is not enough.
$(STAMP): pyproject.toml
	@if ! $(PY) -m pip --version >/dev/null 2>&1; then \
		echo "Creating $(VENV) with $(PYTHON) -m venv"; \
		if ! $(PYTHON) -m venv --clear $(VENV); then \
			if command -v apt-get >/dev/null 2>&1 && [ "$$(id -u)" = 0 ]; then \
				echo "$(PYTHON) -m venv failed; installing Debian's python3-venv and retrying"; \
				apt-get update -qq \
				&& DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-venv \
				&& $(PYTHON) -m venv --clear $(VENV) \
				|| { echo "Error: installing python3-venv or creating $(VENV) failed; see the messages above" >&2; exit 1; }; \
			else \
				echo "Error: $(PYTHON) -m venv failed. Install the python3-venv package (Debian and Ubuntu:" \
					"apt-get install python3-venv) or set PYTHON to a Python 3.10+ that has venv and pip," \
					"then run make again" >&2; \
				exit 1; \
			fi; \
		fi; \
	fi
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test]'
	touch $(STAMP)

# Fashion-MNIST: use a copy that cet already finds ($$CET_DATA or Debian's package); otherwise install
# Debian's dataset-fashion-mnist when apt-get is available and we are root.
data: $(STAMP)
	@if $(PY) -c "from cet.data import find_fashion_mnist; find_fashion_mnist()" 2>/dev/null; then \
		echo "Fashion-MNIST found"; \
	elif command -v apt-get >/dev/null 2>&1 && [ "$$(id -u)" = 0 ]; then \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dataset-fashion-mnist; \
	else \
		$(PY) -c "from cet.data import find_fashion_mnist; find_fashion_mnist()"; \
	fi

# Chromium (or Chrome) and its WebDriver for the browser check: use the ones on PATH; otherwise install
# Debian's chromium and chromium-driver when apt-get is available and we are root, as for the data.
chromium: $(STAMP)
	@if $(PY) -c "from cet.bookcheck import find_chromium; find_chromium()" 2>/dev/null; then \
		echo "Chromium found"; \
	elif command -v apt-get >/dev/null 2>&1 && [ "$$(id -u)" = 0 ]; then \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver; \
	else \
		$(PY) -c "from cet.bookcheck import find_chromium; find_chromium()"; \
	fi

book: data
	$(PY) -m cet.book execute --profile full
	$(PY) -m cet.book build --profile full
	@echo "The book is at $(CURDIR)/_build/html/index.html"

# The smoke book has its own folders under _build/smoke, so it never replaces the full book.
book-smoke: data
	$(PY) -m cet.book execute --profile smoke
	$(PY) -m cet.book build --profile smoke
	@echo "The smoke book is at $(CURDIR)/_build/smoke/_build/html/index.html"

check-book: chromium $(STAMP)
	$(PY) -m cet.bookcheck --profile $(PROFILE)

# pytest executes every chapter once with the smoke parameters into _build/smoke/source (the session
# fixture in tests/conftest.py); the smoke book is then built from those notebooks, not executed again.
test: data chromium
	$(PY) -m pytest
	$(PY) -m cet.book build --profile smoke
	$(PY) -m cet.bookcheck --profile smoke

# The kernel is registered inside .venv (--sys-prefix), so it touches nothing outside the repository.
lab: data
	$(PY) -m ipykernel install --sys-prefix --name cet --display-name "Python (cet)"
	$(VENV)/bin/jupyter lab --ServerApp.root_dir=$(CURDIR)

clean:
	rm -rf _build
