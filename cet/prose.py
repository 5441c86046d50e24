"""Find result numbers typed into a chapter's prose instead of glued from the executed notebook.

Every number that a chapter reports must come from its run, through myst-nb's ``glue`` and the
``{glue:text}`` / ``{glue:}`` / ``{glue:math}`` roles and directives, so that the prose cannot drift
from the results. The rule is deliberately simple. A *result number* is any of:

- a decimal number: ``0.93``, ``12.5``;
- a percentage: ``93%``, ``93 %``, ``93.1%``;
- a number in scientific notation: ``1e-3``, ``2.5E4``;
- a ratio written with ``x``: ``11x``, ``2.5x`` (but not a size such as ``28x28`` or ``3x3``).

Plain integers ("3 bits", "37 layers", "layer 4") are not flagged, since the prose needs them for the
design (kernel sizes, candidate bit widths). Glue a counted integer all the same. These parts of the
markdown are skipped: inline code and roles (``{glue:text}`name:.2f```, ``{cite}`key```), math
(``$...$``, ``$$...$$``), fenced code, the options and arguments of directives (their captions are
checked), HTML comments, link targets, and any sentence that cites a source with ``{cite}``, because
such a sentence quotes the literature rather than this run.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

__all__ = ["chapter_markdown", "find_unglued_numbers"]

_RESULT_NUMBER = re.compile(
    r"(?<![\w.])("
    r"\d+(?:\.\d+)?[eE][-+]?\d+"              # scientific notation
    r"|\d+(?:\.\d+)?\s?%"                     # percentage
    r"|\d+(?:\.\d+)?x(?![\w])"                # ratio such as 11x, not 28x28
    r"|\d*\.\d+"                              # decimal
    r")"
)
_FENCE = re.compile(r"^(?P<fence>`{3,}|:{3,})\s*(?P<info>\S*)")
_DISPLAY_MATH = re.compile(r"\$\$.*?\$\$", re.DOTALL)
_INLINE_MATH = re.compile(r"\$[^$\n]+\$")
_ROLE_OR_CODE = re.compile(r"(?:\{[\w:.-]+\})?(`+)(?:.+?)\1", re.DOTALL)
_HTML_COMMENT = re.compile(r"<!--.*?-->", re.DOTALL)
_LINK_TARGET = re.compile(r"\]\([^)]*\)")
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")


def _prose_lines(markdown: str) -> list[str]:
    """Return the lines that a reader sees as prose: no code fences, directive options or math blocks."""
    lines = []
    open_fences: list[tuple[str, bool]] = []  # (fence marker, whether its body is prose)
    for line in markdown.splitlines():
        match = _FENCE.match(line.strip())
        if match:
            fence = match.group("fence")
            if open_fences and fence == open_fences[-1][0] and not match.group("info"):
                open_fences.pop()
                continue
            if not open_fences or open_fences[-1][1]:
                info = match.group("info")
                # A directive ({glue:figure}, {note}) has a prose body, except the ones whose body is math
                # or code. A fence with a language or none is code.
                prose_body = info.startswith("{") and info not in ("{math}", "{code-cell}", "{code-block}", "{code}")
                open_fences.append((fence, prose_body))
                continue
        if open_fences and not open_fences[-1][1]:
            continue
        if open_fences and re.match(r"^\s*:[\w-]+:", line):
            continue  # a directive option such as :name: or :label:
        lines.append(line)
    return lines


def find_unglued_numbers(markdown: str) -> list[str]:
    """Return the result numbers typed into ``markdown`` (see the module docstring for the rule)."""
    text = "\n".join(_prose_lines(markdown))
    text = _HTML_COMMENT.sub(" ", text)
    text = _DISPLAY_MATH.sub(" ", text)
    found = []
    for paragraph in re.split(r"\n\s*\n", text):
        for sentence in _SENTENCE_END.split(paragraph):
            if "{cite" in sentence:
                continue
            sentence = _ROLE_OR_CODE.sub(" ", sentence)
            sentence = _INLINE_MATH.sub(" ", sentence)
            sentence = _LINK_TARGET.sub("]", sentence)
            found.extend(match.group(1) for match in _RESULT_NUMBER.finditer(sentence))
    return found


def chapter_markdown(path: Path) -> list[str]:
    """Return the markdown of a chapter: the markdown cells of a notebook, or the whole of a ``.md`` page."""
    path = Path(path)
    if path.suffix == ".ipynb":
        notebook = json.loads(path.read_text())
        return ["".join(cell["source"]) if isinstance(cell["source"], list) else cell["source"]
                for cell in notebook["cells"] if cell["cell_type"] == "markdown"]
    return [path.read_text()]
