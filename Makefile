# The two commands of the README: `make book` (the main job) and `make test`.
# Each creates the virtual environment and installs the data when they are missing.

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: book book-smoke test data clean help

help:
	@echo "make book        create .venv, install the data, execute every chapter, build _build/html"
	@echo "make test        create .venv, install the data, run the unit tests and the smoke chapters"
	@echo "make book-smoke  the book with small parameters (minutes), for checking the pipeline"
	@echo "make clean       remove _build (the checkpoint cache and .venv stay)"

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
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

book: data
	$(PY) -m cet.book execute --profile full
	$(PY) -m cet.book build
	@echo "The book is at $(CURDIR)/_build/html/index.html"

book-smoke: data
	$(PY) -m cet.book execute --profile smoke
	$(PY) -m cet.book build
	@echo "The book is at $(CURDIR)/_build/html/index.html"

test: data
	$(PY) -m pytest

clean:
	rm -rf _build
