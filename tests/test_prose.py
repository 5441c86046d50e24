"""Check the rule that finds result numbers typed into a chapter's prose instead of glued."""

from __future__ import annotations

import nbformat
import pytest

from cet.prose import chapter_markdown, find_unglued_numbers

FLAGGED = [
    ("The model reaches 91.23% accuracy.", ["91.23%"]),
    ("It keeps 93 % of the weights.", ["93 %"]),
    ("The correlation is 0.87 here.", ["0.87"]),
    ("A trace of 1e-3 and 2.5E4 flops.", ["1e-3", "2.5E4"]),
    ("CET reaches 11x and 2.5x compression.", ["11x", "2.5x"]),
    ("A value of .5 nats.", [".5"]),
    ("## Accuracy drops 1.5 points", ["1.5"]),
    ("```{glue:figure} curvature\n:name: fig-a\n\nThe gap is 0.3 on average.\n```", ["0.3"]),
    ("A sentence with {cite}`x` cited. But 0.4 is ours.", ["0.4"]),
]

ALLOWED = [
    "The layer is quantized to 3 bits, 37 layers in all, with 28x28 images and 3x3 kernels.",
    "The model reaches {glue:text}`accuracy:.2f`% and {glue:text}`ratio:.0f`x.",
    "The error $d = 0.5 \\lambda$ and $$\\rho = 0.25$$ are math.",
    "Run `lr = 0.05` or {glue:}`value` or {eq}`eq-1`.",
    "```python\nrate = 0.05\n```",
    "```{math}\n:label: eq-x\nx = 0.5\n```",
    "The paper reports 11x compression at 75.1% accuracy {cite}`zhang2025cet`.",
    "<!-- 0.5 is a draft note -->",
    "See [the release notes](https://example.org/v2.0.html).",
    "Section 1. The second-order model, and Jupyter Book 1.x.",
]


@pytest.mark.parametrize(("markdown", "expected"), FLAGGED)
def test_typed_result_flagged(markdown, expected):
    assert find_unglued_numbers(markdown) == expected


@pytest.mark.parametrize("markdown", ALLOWED)
def test_glued_or_design_number_allowed(markdown):
    assert find_unglued_numbers(markdown) == []


def test_notebook_markdown_cells_read(tmp_path):
    notebook = nbformat.v4.new_notebook()
    notebook.cells = [nbformat.v4.new_markdown_cell("Accuracy 90.5%"), nbformat.v4.new_code_cell("x = 0.5"),
                      nbformat.v4.new_markdown_cell("Done.")]
    path = tmp_path / "chapter.ipynb"
    nbformat.write(notebook, path)
    assert chapter_markdown(path) == ["Accuracy 90.5%", "Done."]
