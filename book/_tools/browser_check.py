"""Open every page of the built book in headless Chromium, as a reader would, and fail on what looks wrong.

``python book/_tools/browser_check.py _build/html --screenshots _build/screenshots`` serves the built
HTML from ``127.0.0.1`` (no internet needed: MathJax and the widget scripts ship with the build, see
``data_download/book_assets.py``), opens each page, waits for MathJax and the widgets, and checks:

- no raw Markdown table text: a paragraph that starts with ``| `` or contains ``|---`` is a table
  that was rendered as CommonMark instead of HTML;
- every image loaded (``naturalWidth`` > 0), except the external Colab badge, which needs internet;
- no error in the JavaScript console (again except the Colab badge's failed load);
- every widget view rendered from its saved state (the view script has a rendered widget beside it);
- every piece of math typeset (each ``.math`` element holds an ``mjx-container``);
- every chapter page (``book/chapters/…``) shows at least one figure;
- no absolute path of the build machine (``--forbid``, default: this checkout's root) in the page text;
- no cell output on stderr, no Python warning and no traceback in any output, collapsed ones included
  (an exercise's hidden solution is read too);
- no build path in an output: ``/tmp/``, ``../data``, ``_build/`` (:data:`BUILD_PATHS`) are plumbing,
  not something a reader needs (prose may name ``_build/metrics/``; outputs may not);
- no visible table wider than the content column (it would be cut off or scroll sideways);
- no visible figure of a cell output rendered narrower than half the content column (its labels would
  be unreadable; :data:`MIN_FIGURE_SHARE`).

A full-page PNG of every page goes to ``--screenshots`` (``book_chapters_02_vqae.png`` …), problems to
stdout; the exit status is 1 if any page has a problem.

**Why Selenium and not Playwright:** Playwright drives its *own* browser builds, which
``playwright install`` downloads from Microsoft's CDN — impossible on this project's offline CI machines.
Selenium drives the system's Chromium through Debian's ``chromium-driver`` (same version as
``chromium``), both from Debian's archive, which the machines can reach; ``make browser-deps`` installs
them where missing.

Left out on purpose: pixel comparisons against reference screenshots (they break on every font or
theme update); layout checks beyond these (a figure's own font sizes, what a table says) are for a
person looking at the screenshots.
"""

from __future__ import annotations

import argparse
import base64
import json
import re
import shutil
import sys
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

#: The checkout this script belongs to (it lives in ``book/_tools/``).
REPO_ROOT = Path(__file__).resolve().parents[2]

#: Images that may fail offline: they come from outside the book.
EXTERNAL_OK = ("colab.research.google.com/assets/colab-badge.svg",)

#: Folders of the HTML build that hold assets, not pages.
ASSET_DIRS = {"_static", "_sources", "_images", "_sphinx_design_static"}

_RAW_TABLE = re.compile(r"^\|\s|\|\s*:?-{3,}")

#: Text of the build machine's folders that no cell output may show.
BUILD_PATHS = ("/tmp/", "../data", "_build/")

#: A figure in a cell output must be at least this share of the content column wide.
MIN_FIGURE_SHARE = 0.5

#: A Python warning (``UserWarning: …``, ``warnings.warn(``) or a traceback in an output's text.
_WARNING = re.compile(r"\b[A-Z]\w*Warning: |\bwarnings\.warn\(|Traceback \(most recent call last\)")


def raw_markdown_rows(paragraphs: Iterable[str]) -> list[str]:
    """The paragraphs (texts of ``<p>`` elements) that are Markdown table text, shortened for the report."""
    bad = []
    for text in paragraphs:
        t = text.strip()
        if _RAW_TABLE.search(t):
            bad.append(t[:80] + ("…" if len(t) > 80 else ""))
    return bad


def output_problems(outputs: Iterable[dict]) -> list[str]:
    """Problems of cell outputs, each ``{"text": …, "stderr": bool, "traceback": bool}``: stderr streams,
    tracebacks, Python warnings, and build paths (:data:`BUILD_PATHS`) in the text."""
    problems = []
    for out in outputs:
        text = out.get("text", "")
        first = " ".join(text.split())[:100]
        if out.get("stderr"):
            problems.append(f"output on stderr: {first!r}")
        if out.get("traceback"):
            problems.append(f"traceback in an output: {first!r}")
        match = _WARNING.search(text)
        if match and not out.get("traceback"):
            line = next(ln for ln in text.splitlines() if match.group(0) in ln)
            problems.append(f"Python warning in an output: {' '.join(line.split())[:120]!r}")
        for path in BUILD_PATHS:
            if path in text:
                i = text.index(path)
                context = " ".join(text[max(0, i - 50) : i + 50].split())
                problems.append(f"build path {path!r} in an output: {context!r}")
    return problems


def wide_tables(tables: Iterable[dict], column_width: float, slack: float = 1.0) -> list[str]:
    """Visible tables (``{"width": px, "text": …}``) wider than the content column (px)."""
    return [
        f"table wider than the column ({t['width']:.0f} px > {column_width:.0f} px): "
        f"{' '.join(t.get('text', '').split())[:60]!r}"
        for t in tables
        if t["width"] > column_width + slack
    ]


def narrow_figures(images: Iterable[dict], column_width: float, share: float = MIN_FIGURE_SHARE) -> list[str]:
    """Visible figures of cell outputs (``{"width": px, "src": …}``) narrower than ``share`` of the column."""
    return [
        f"figure {img['width']:.0f} px wide, under {share:.0%} of the {column_width:.0f} px column: "
        f"{img.get('src', '')[:60]}"
        for img in images
        if img["width"] < share * column_width
    ]


def is_external_ok(text: str) -> bool:
    return any(url in text for url in EXTERNAL_OK)


def console_errors(entries: Iterable[dict]) -> list[str]:
    """SEVERE browser-log messages, minus those about the allowed external images."""
    return [
        e.get("message", "")
        for e in entries
        if e.get("level") == "SEVERE" and not is_external_ok(e.get("message", ""))
    ]


def page_files(html_dir: Path) -> list[Path]:
    """Every ``.html`` page of the build (relative paths), assets excluded, sorted."""
    pages = []
    for path in sorted(Path(html_dir).rglob("*.html")):
        rel = path.relative_to(html_dir)
        if rel.parts[0] in ASSET_DIRS:
            continue
        pages.append(rel)
    if not pages:
        raise FileNotFoundError(f"no HTML pages under {html_dir}: build the book first (make html)")
    return pages


def is_chapter(rel: Path) -> bool:
    return rel.parts[:2] == ("book", "chapters")


def screenshot_name(rel: Path) -> str:
    return "_".join(rel.with_suffix("").parts) + ".png"


@dataclass
class PageReport:
    page: str
    seconds: float = 0.0
    problems: list[str] = field(default_factory=list)
    facts: dict = field(default_factory=dict)


# One script collects everything the checks need from the rendered page.
_COLLECT = r"""
const inCode = (el) => !!el.closest('pre, code, .highlight');
const paragraphs = [...document.querySelectorAll('article p, main p')]
  .filter((p) => !inCode(p)).map((p) => p.textContent);
const images = [...document.images].map((img) => ({
  src: img.currentSrc || img.src, ok: img.complete && img.naturalWidth > 0,
  figure: !!img.closest('.cell_output, figure'),
}));
const views = [...document.querySelectorAll('script[type="application/vnd.jupyter.widget-view+json"]')];
const unrendered = views.filter((s) => !s.parentElement.querySelector('.jupyter-widgets, .widget-output, .lm-Widget')).length;
const maths = [...document.querySelectorAll('span.math, div.math')];
const untypeset = maths.filter((m) => !m.querySelector('mjx-container')).map((m) => m.textContent.slice(0, 60));
const column = document.querySelector('article.bd-article') || document.querySelector('article')
  || document.querySelector('main') || document.body;
const style = getComputedStyle(column);
const columnWidth = column.clientWidth - parseFloat(style.paddingLeft) - parseFloat(style.paddingRight);
const shown = (el) => el.getClientRects().length > 0 && el.getBoundingClientRect().width > 0;
const tables = [...column.querySelectorAll('table')].filter(shown).map((t) => ({
  width: Math.max(t.scrollWidth, t.getBoundingClientRect().width), text: t.innerText.slice(0, 80)}));
const outputs = [...document.querySelectorAll('.cell_output')].map((o) => ({
  text: o.textContent, stderr: !!o.querySelector('.stderr'), traceback: !!o.querySelector('.traceback')}));
const figures = [...document.querySelectorAll('.cell_output img')].filter(shown).map((img) => ({
  width: img.getBoundingClientRect().width, src: (img.currentSrc || img.src).split('/').pop()}));
return {paragraphs, images, views: views.length, unrendered, maths: maths.length, untypeset,
        text: document.body.innerText, columnWidth, tables, outputs, figures};
"""

_WAIT_MATHJAX = r"""
const done = arguments[arguments.length - 1];
if (window.MathJax && MathJax.startup && MathJax.startup.promise) {
  MathJax.startup.promise.then(() => done(true), () => done(false));
} else { done(null); }
"""

_WIDGETS_PENDING = r"""
const views = [...document.querySelectorAll('script[type="application/vnd.jupyter.widget-view+json"]')];
return views.filter((s) => !s.parentElement.querySelector('.jupyter-widgets, .widget-output, .lm-Widget')).length;
"""


def find_browser() -> tuple[str, str]:
    """(chromium binary, chromedriver binary), or SystemExit saying how to install them."""
    browser = next(
        (shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome") if shutil.which(n)), None
    )
    driver = shutil.which("chromedriver")
    if not browser or not driver:
        raise SystemExit(
            "[browser_check] needs chromium and chromedriver: `make browser-deps` "
            "(Debian: apt-get install -y chromium chromium-driver)"
        )
    return browser, driver


def make_driver(width: int = 1280, height: int = 900):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    browser, driver = find_browser()
    options = webdriver.ChromeOptions()
    options.binary_location = browser
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                f"--window-size={width},{height}", "--hide-scrollbars", "--force-device-scale-factor=1"):  # fmt: skip
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    return webdriver.Chrome(service=Service(driver), options=options)


def full_page_png(driver, width: int = 1280, max_height: int = 16000) -> bytes:
    """A PNG of the whole page (not just the window): the viewport is made as tall as the page for the shot.

    (``captureBeyondViewport`` alone shifted the layout and left images unpainted.) Pages taller than
    ``max_height`` pixels, Chromium's texture limit, are cut there.
    """
    height = driver.execute_script(
        "return Math.max(document.documentElement.scrollHeight, document.body.scrollHeight)"
    )
    height = int(min(max(height, 1), max_height))
    driver.execute_cdp_cmd(
        "Emulation.setDeviceMetricsOverride",
        {"width": width, "height": height, "deviceScaleFactor": 1, "mobile": False},
    )
    try:
        time.sleep(0.3)  # let the taller viewport lay out and paint
        shot = driver.execute_cdp_cmd("Page.captureScreenshot", {"format": "png"})
    finally:
        driver.execute_cdp_cmd("Emulation.clearDeviceMetricsOverride", {})
    return base64.b64decode(shot["data"])


def check_page(driver, url: str, rel: Path, forbid: Sequence[str], timeout: float = 30.0) -> PageReport:
    report = PageReport(page=str(rel))
    t0 = time.perf_counter()
    driver.get(url)
    driver.set_script_timeout(timeout)
    deadline = time.monotonic() + timeout
    while driver.execute_script("return document.readyState") != "complete" and time.monotonic() < deadline:
        time.sleep(0.1)
    driver.execute_async_script(_WAIT_MATHJAX)
    while driver.execute_script(_WIDGETS_PENDING) and time.monotonic() < deadline:
        time.sleep(0.2)
    info = driver.execute_script(_COLLECT)
    report.facts = {
        "images": len(info["images"]),
        "figures": sum(1 for i in info["images"] if i["figure"] and i["ok"]),
        "widgets": info["views"],
        "math": info["maths"],
        "tables": driver.execute_script(
            "return document.querySelectorAll('article table, main table').length"
        ),
    }
    for row in raw_markdown_rows(info["paragraphs"]):
        report.problems.append(f"raw Markdown table text: {row!r}")
    for img in info["images"]:
        if not img["ok"] and not is_external_ok(img["src"]):
            report.problems.append(f"image did not load: {img['src']}")
    for message in console_errors(driver.get_log("browser")):
        report.problems.append(f"console error: {message[:200]}")
    if info["unrendered"]:
        report.problems.append(
            f"{info['unrendered']} of {info['views']} widget(s) did not render from their state"
        )
    for tex in info["untypeset"]:
        report.problems.append(f"math not typeset: {tex!r}")
    if is_chapter(rel) and report.facts["figures"] < 1:
        report.problems.append("chapter page without a figure")
    for text in forbid:
        if text and text in info["text"]:
            report.problems.append(f"page shows the build machine's path {text!r}")
    report.facts["column_px"] = round(info["columnWidth"])
    report.problems += output_problems(info["outputs"])
    report.problems += wide_tables(info["tables"], info["columnWidth"])
    report.problems += narrow_figures(info["figures"], info["columnWidth"])
    report.seconds = time.perf_counter() - t0
    return report


def run(
    html_dir: Path, screenshots: Path | None, forbid: Sequence[str], pages: Sequence[str] = ()
) -> list[PageReport]:
    from data_download.mirror import serve

    html_dir = Path(html_dir)
    rels = page_files(html_dir)
    if pages:
        rels = [r for r in rels if any(str(r).startswith(p) for p in pages)]
    if screenshots is not None:
        screenshots.mkdir(parents=True, exist_ok=True)
    reports = []
    driver = make_driver()
    try:
        with serve(html_dir) as base:
            for rel in rels:
                report = check_page(driver, f"{base}/{rel.as_posix()}", rel, forbid)
                if screenshots is not None:
                    (screenshots / screenshot_name(rel)).write_bytes(full_page_png(driver))
                status = "ok" if not report.problems else f"{len(report.problems)} problem(s)"
                facts = ", ".join(f"{k} {v}" for k, v in report.facts.items())
                print(f"[browser_check] {rel}: {status} ({facts}; {report.seconds:.1f} s)", flush=True)
                for problem in report.problems:
                    print(f"    - {problem}", flush=True)
                reports.append(report)
    finally:
        driver.quit()
    return reports


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="book/_tools/browser_check.py", description=__doc__.splitlines()[0])
    parser.add_argument("html_dir", type=Path, nargs="?", default=Path("_build/html"))
    parser.add_argument("--screenshots", type=Path, default=Path("_build/screenshots"))
    parser.add_argument("--forbid", action="append", default=None, help="text no page may show (repeatable)")
    parser.add_argument("--only", nargs="*", default=(), help="page path prefixes, e.g. book/chapters/02")
    parser.add_argument("--json", type=Path, default=None, help="write the reports here")
    args = parser.parse_args(argv)
    forbid = args.forbid if args.forbid is not None else [str(REPO_ROOT)]
    t0 = time.perf_counter()
    reports = run(args.html_dir, args.screenshots, forbid, args.only)
    seconds = time.perf_counter() - t0
    failed = [r for r in reports if r.problems]
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(
            json.dumps({"seconds": seconds, "pages": [r.__dict__ for r in reports]}, indent=2) + "\n"
        )
    print(
        f"[browser_check] {len(reports) - len(failed)} passed, {len(failed)} failed "
        f"({len(reports)} pages, {seconds:.0f} s); screenshots in {args.screenshots}"
    )
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
