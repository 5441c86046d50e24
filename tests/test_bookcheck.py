"""Check that the browser check catches each kind of broken page, on small pages in a temporary site.

The pages are served and opened in headless Chromium like the built book; the module is skipped with
the install command when Chromium or its driver is missing (`make test` installs both first).
"""

from __future__ import annotations

import base64

import pytest

from cet import bookcheck
from cet.book import install_mathjax

try:
    bookcheck.find_chromium()
    import selenium  # noqa: F401
except (FileNotFoundError, ImportError) as error:
    pytest.skip(f"browser check unavailable ({error})", allow_module_level=True)

# A 1x1 transparent PNG.
PIXEL = base64.b64decode("iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNkYPhfDwAChwGA60e6kgAAAABJRU5ErkJggg==")
MATHJAX = '<script defer src="_static/mathjax/tex-mml-chtml.js"></script>'


def _page(body, head=MATHJAX):
    return f"<!DOCTYPE html><html><head><meta charset='utf-8'>{head}</head><body>{body}</body></html>"


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    root = tmp_path_factory.mktemp("site")
    install_mathjax(root / "_static")
    (root / "pixel.png").write_bytes(PIXEL)
    pages = {
        "good.html": _page('<p>An image <img src="pixel.png"> and math <span class="math">\\(a^2 + b^2\\)</span>.</p>'),
        "missing-image.html": _page('<p><img src="figures/absent.png"></p>'),
        "missing-script.html": _page('<p>text</p>', head=MATHJAX + '<script src="_static/absent.js"></script>'),
        "tex-error.html": _page('<p><span class="math">\\(\\frac{1}\\)</span></p>'),
        "no-mathjax.html": _page('<div class="math">\\[x^2\\]</div>', head=""),
        "console-error.html": _page("<script>console.error('broken widget')</script><p>text</p>"),
        "exception.html": _page("<script>undefinedFunction()</script><p>text</p>"),
    }
    for name, html in pages.items():
        (root / name).write_text(html)
    return root


@pytest.fixture(scope="module")
def reports(site):
    pages = ["good.html", "missing-image.html", "missing-script.html", "tex-error.html", "no-mathjax.html",
             "console-error.html", "exception.html", "absent.html"]
    screenshots = {"good.html": site / "shots" / "good.png"}
    return {report.page: report for report in bookcheck.check_pages(site, pages, screenshots)}


def test_good_page_passes(reports):
    report = reports["good.html"]
    assert report.problems == []
    assert report.math_elements == 1
    assert report.images == 1


def test_screenshot_saved(reports, site):
    shot = site / "shots" / "good.png"
    assert reports["good.html"].screenshot == shot
    assert shot.read_bytes().startswith(b"\x89PNG")


def test_missing_image_fails(reports):
    assert any("image not loaded: figures/absent.png" in p for p in reports["missing-image.html"].problems)


def test_missing_asset_fails(reports):
    problems = reports["missing-script.html"].problems
    assert any("404" in p and "absent.js" in p for p in problems), problems


def test_tex_error_fails(reports):
    problems = reports["tex-error.html"].problems
    assert any(p.startswith("MathJax error") for p in problems), problems


def test_math_without_mathjax_fails(reports):
    problems = reports["no-mathjax.html"].problems
    assert any("MathJax not loaded" in p for p in problems), problems
    assert any(p.startswith("math not rendered") for p in problems), problems


def test_console_error_fails(reports):
    problems = reports["console-error.html"].problems
    assert any("console error" in p and "broken widget" in p for p in problems), problems


def test_uncaught_exception_fails(reports):
    problems = reports["exception.html"].problems
    assert any("console error" in p and "undefinedFunction" in p for p in problems), problems


def test_absent_page_fails(reports):
    assert any("page not found" in p for p in reports["absent.html"].problems)
