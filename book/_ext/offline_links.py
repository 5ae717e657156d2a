"""Sphinx extension for this book: pages that work offline, and without console errors.

- ``LOCAL_COPIES``: links to public CDNs that notebook outputs carry in their HTML (matplotlib's
  animation player links Font Awesome 4 from a CDN) are rewritten to the copies shipped in ``_static/``
  (``data_download/book_assets.py``).
- Duplicate scripts are dropped: sphinx-thebe 0.3.1 registers its inline configuration once per read
  phase, and Jupyter Book runs it twice, so every page declared ``const THEBE_JS_URL`` twice — a
  ``SyntaxError`` in the console (the browser check, ``book/_tools/browser_check.py``, found it).
"""

from __future__ import annotations

#: CDN URL → path below ``_static/``
LOCAL_COPIES = {
    "https://maxcdn.bootstrapcdn.com/font-awesome/4.4.0/css/font-awesome.min.css": "font-awesome/css/font-awesome.min.css",
}


def _key(script) -> tuple:
    attributes = getattr(script, "attributes", {}) or {}
    # inline scripts come with filename None or "" depending on who added them
    filename = getattr(script, "filename", script) or ""
    return (str(filename), tuple(sorted((k, str(v)) for k, v in attributes.items())))


def _page_context(app, pagename, templatename, context, doctree):
    scripts = context.get("script_files")
    if scripts:
        seen, unique = set(), []
        for script in scripts:
            key = _key(script)
            if key not in seen:
                seen.add(key)
                unique.append(script)
        scripts[:] = unique
    body = context.get("body")
    if body:
        for url, local in LOCAL_COPIES.items():
            if url in body:
                body = body.replace(url, context["pathto"]("_static/" + local, 1))
        context["body"] = body


def setup(app):
    # early: `html-page-context` is emitted with emit_firstresult, so a handler after one that returns
    # a template name would never run
    app.connect("html-page-context", _page_context, priority=100)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
