"""Open every page of the built book in headless Chromium and report what a reader would see broken.

``python -m cet.bookcheck --profile smoke`` (``make check-book``) serves the built HTML from a local
HTTP server on 127.0.0.1, loads each page with Selenium driving Debian's ``chromium`` and
``chromium-driver``, and fails when a page has:

- an image that did not load, or any asset (script, style sheet, font) whose request returned an HTTP error;
- a math element that MathJax did not typeset, or typeset as a TeX error;
- an error in the browser console, which includes a failed request and an uncaught exception.

It saves a full-page screenshot of each page of the table of contents to the profile's screenshot
folder (``_build/screenshots`` for the full book, ``_build/smoke/screenshots`` for the smoke book).
"""

from __future__ import annotations

import argparse
import base64
import functools
import http.server
import logging
import shutil
import sys
import threading
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

__all__ = ["PageReport", "check_pages", "find_chromium", "main", "screenshot_dir"]

logger = logging.getLogger(__name__)

CHROMIUM_CANDIDATES = ("chromium", "chromium-browser", "google-chrome")
DRIVER_CANDIDATES = ("chromedriver", "chromium-driver")
# Seconds to wait for a page's load event and then for MathJax to finish typesetting.
PAGE_TIMEOUT = 60
# Screenshots are cut at this height in CSS pixels, so one very long page cannot fill the disk.
MAX_SCREENSHOT_HEIGHT = 20_000

# Runs in the page after the load event: waits for MathJax 3 to typeset, then lists what is broken.
_INSPECT_PAGE = """
const done = arguments[arguments.length - 1];
const inspect = () => {
  const problems = [];
  for (const image of document.images) {
    if (!image.complete || image.naturalWidth === 0) {
      problems.push(`image not loaded: ${image.getAttribute('src')}`);
    }
  }
  // Chrome asks for /favicon.ico on its own when a page declares no icon; that request is not the page's.
  const declaresIcon = document.querySelector('link[rel~="icon"]') !== null;
  for (const entry of performance.getEntriesByType('resource')) {
    if (!declaresIcon && entry.name.endsWith('/favicon.ico')) {
      continue;
    }
    if (entry.responseStatus >= 400) {
      problems.push(`asset answered ${entry.responseStatus}: ${entry.name}`);
    }
  }
  const math = document.querySelectorAll('.math, span.math, div.math');
  if (math.length > 0 && !window.MathJax) {
    problems.push(`MathJax not loaded, ${math.length} math elements left as TeX`);
  }
  for (const element of math) {
    if (!element.querySelector('mjx-container') && !element.closest('mjx-container')) {
      problems.push(`math not rendered: ${element.textContent.trim().slice(0, 80)}`);
    }
  }
  for (const error of document.querySelectorAll('mjx-merror')) {
    const text = error.getAttribute('data-mjx-error') || error.textContent;
    problems.push(`MathJax error: ${text.trim().slice(0, 120)}`);
  }
  done({problems: problems, math: math.length, images: document.images.length, declaresIcon: declaresIcon});
};
if (window.MathJax && MathJax.startup && MathJax.startup.promise) {
  MathJax.startup.promise.then(inspect, (error) => done({problems: [`MathJax failed: ${error}`], math: 0, images: 0}));
} else {
  inspect();
}
"""


@dataclass
class PageReport:
    """The browser's findings on one page: its problems and its number of math elements and images."""

    page: str
    problems: list[str] = field(default_factory=list)
    math_elements: int = 0
    images: int = 0
    screenshot: Path | None = None


def find_chromium() -> tuple[str, str]:
    """Return the paths of the Chromium binary and its WebDriver, or raise FileNotFoundError with the fix."""
    browser = next((shutil.which(name) for name in CHROMIUM_CANDIDATES if shutil.which(name)), None)
    driver = next((shutil.which(name) for name in DRIVER_CANDIDATES if shutil.which(name)), None)
    if browser is None or driver is None:
        missing = " and ".join(name for name, path in (("chromium", browser), ("chromedriver", driver)) if path is None)
        raise FileNotFoundError(
            f"{missing} not found on PATH. Install them with `apt-get install chromium chromium-driver` "
            f"(Debian; `make check-book` does this when run as root)"
        )
    return browser, driver


def screenshot_dir(profile: str) -> Path:
    """Return the folder of the profile's screenshots: ``_build/screenshots`` or ``_build/smoke/screenshots``."""
    from cet import book

    return book.BUILD / "screenshots" if profile == "full" else book.BUILD / profile / "screenshots"


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format, *args):  # noqa: A002 - the name is fixed by the base class
        logger.debug("%s %s", self.address_string(), format % args)


@contextmanager
def _serve(directory: Path):
    """Serve ``directory`` over HTTP on a free port of 127.0.0.1; yield the base URL."""
    handler = functools.partial(_QuietHandler, directory=str(directory))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


@contextmanager
def _chromium():
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    browser, driver_path = find_chromium()
    options = webdriver.ChromeOptions()
    options.binary_location = browser
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                     "--window-size=1280,1000", "--hide-scrollbars", "--disable-extensions",
                     "--no-first-run", "--disable-background-networking", "--disable-component-update"):
        options.add_argument(argument)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    # Passing the driver's path keeps Selenium Manager from looking for (and downloading) a driver.
    driver = webdriver.Chrome(service=Service(executable_path=driver_path), options=options)
    driver.set_page_load_timeout(PAGE_TIMEOUT)
    driver.set_script_timeout(PAGE_TIMEOUT)
    try:
        yield driver
    finally:
        driver.quit()


def _save_screenshot(driver, path: Path) -> None:
    height = driver.execute_script("return Math.ceil(document.documentElement.scrollHeight)")
    height = min(max(int(height), 1), MAX_SCREENSHOT_HEIGHT)
    shot = driver.execute_cdp_cmd("Page.captureScreenshot", {
        "format": "png", "captureBeyondViewport": True,
        "clip": {"x": 0, "y": 0, "width": 1280, "height": height, "scale": 1},
    })
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(path.name + ".partial")
    temporary.write_bytes(base64.b64decode(shot["data"]))
    temporary.replace(path)


def check_pages(html_root: Path, pages: list[str], screenshots: dict[str, Path] | None = None) -> list[PageReport]:
    """Load each page (a path relative to ``html_root``) in headless Chromium; return one report per page.

    ``screenshots`` maps pages to the PNG files to write for them.
    """
    screenshots = screenshots or {}
    reports = []
    with _serve(html_root) as base_url, _chromium() as driver:
        for page in pages:
            report = PageReport(page)
            if not (html_root / page).is_file():
                report.problems.append(f"page not found: {html_root / page}")
                reports.append(report)
                continue
            driver.get_log("browser")  # drop the messages of the page before
            driver.get(f"{base_url}/{page}")
            found = driver.execute_async_script(_INSPECT_PAGE)
            report.problems.extend(found["problems"])
            report.math_elements = found["math"]
            report.images = found["images"]
            for entry in driver.get_log("browser"):
                implicit_icon = not found.get("declaresIcon") and f"{base_url}/favicon.ico" in entry["message"]
                if entry["level"] == "SEVERE" and not implicit_icon:
                    report.problems.append(f"console error: {entry['message']}")
            if page in screenshots:
                _save_screenshot(driver, screenshots[page])
                report.screenshot = screenshots[page]
            reports.append(report)
    return reports


def _book_pages(html_root: Path) -> list[str]:
    """List every HTML page of a built book except Sphinx's copies of the sources and static files."""
    skipped = {"_sources", "_static", "_images"}
    return sorted(str(path.relative_to(html_root)) for path in html_root.rglob("*.html")
                  if not skipped & set(path.relative_to(html_root).parts))


def main(argv: list[str] | None = None) -> int:
    from cet import book

    parser = argparse.ArgumentParser(prog="python -m cet.bookcheck", description=__doc__.splitlines()[0])
    parser.add_argument("--profile", choices=book.PROFILES, default="full",
                        help="which built book to check: full (_build/html) or smoke (_build/smoke/_build/html)")
    arguments = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")

    html_root = book.html_index(arguments.profile).parent
    if not (html_root / "index.html").is_file():
        parser.error(f"{html_root / 'index.html'} not found: build the {arguments.profile} book first")
    shots = screenshot_dir(arguments.profile)
    if shots.exists():
        shutil.rmtree(shots)
    chapter_pages = [str(page.relative_to(book.ROOT).with_suffix(".html")) for page in book.toc_pages()]
    screenshots = {page: shots / f"{Path(page).stem}.png" for page in chapter_pages}
    pages = sorted(set(_book_pages(html_root)) | set(chapter_pages))

    reports = check_pages(html_root, pages, screenshots)
    failed = [report for report in reports if report.problems]
    for report in reports:
        status = "FAILED" if report.problems else "ok"
        print(f"{status:6} {report.page}: {report.math_elements} math elements, {report.images} images"
              + (f", screenshot {report.screenshot}" if report.screenshot else ""))
        for problem in report.problems:
            print(f"       {problem}")
    print(f"{len(reports) - len(failed)} passed, {len(failed)} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
