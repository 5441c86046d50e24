"""A Sphinx extension for the book: drop script tags that a page would otherwise include twice.

With Sphinx 7.4.7, jupyter-book 1.0.4 and sphinx-thebe 0.3.1, the inline scripts that sphinx-thebe and
sphinx-togglebutton add once per build appear twice in every page. One copy comes through the extension
registry and one through the builder, with the file names None and "". sphinx-thebe's script declares
``const THEBE_JS_URL``, so the second copy raises "Identifier 'THEBE_JS_URL' has already been
declared" in the browser console. This extension keeps the first copy of each script.
"""

from __future__ import annotations

__all__ = ["setup"]


def _script_key(script) -> tuple:
    # An inline script is registered once with the file name None and once with "", so both count as "".
    filename = getattr(script, "filename", script) or ""
    attributes = getattr(script, "attributes", {}) or {}
    return str(filename), tuple(sorted((key, str(value)) for key, value in attributes.items()))


def _drop_duplicate_scripts(app, pagename, templatename, context, doctree) -> None:
    scripts = context.get("script_files")
    if not scripts:
        return
    seen = set()
    unique = []
    for script in scripts:
        key = _script_key(script)
        if key not in seen:
            seen.add(key)
            unique.append(script)
    context["script_files"] = unique


def setup(app):
    # Priority 900 runs after the extensions that add page-specific scripts in html-page-context.
    app.connect("html-page-context", _drop_duplicate_scripts, priority=900)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
