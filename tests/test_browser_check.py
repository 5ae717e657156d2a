"""The browser check's page logic (the browser run itself is `make browser-test`), and the runbook's
post-processing that keeps build paths off the pages."""

from __future__ import annotations

import json
from pathlib import Path

import browser_check  # book/_tools/, on sys.path through conftest.py
import nbformat
import runbook


def test_raw_markdown_table_text_is_caught_and_prose_is_not():
    paragraphs = [
        "| case | Dice fixed | Dice moving | baseline ||---|---|---|---|| 104 | 0.5 | 0.6 | 0.1 || 105 | 0.4 |",
        "  | a | b |",  # leading space, still a row
        "text |---| inside",
        "| :--- | ---: |",
        "A sentence with a pipe | in it, and a dash---here.",
        "|x| is the absolute value",
        "",
    ]
    bad = browser_check.raw_markdown_rows(paragraphs)
    assert len(bad) == 4
    assert bad[0].startswith("| case |") and bad[0].endswith("…")  # shortened to 80 characters + …
    assert browser_check.raw_markdown_rows(paragraphs[4:]) == []


def test_console_errors_skip_only_severe_messages_about_the_colab_badge():
    badge = "https://colab.research.google.com/assets/colab-badge.svg - Failed to load resource"
    entries = [
        {"level": "SEVERE", "message": badge},
        {"level": "SEVERE", "message": "http://127.0.0.1:1/_static/require.js 404 (Not Found)"},
        {"level": "WARNING", "message": "something deprecated"},
        {"level": "SEVERE", "message": "Uncaught TypeError: x is undefined"},
    ]
    assert browser_check.console_errors(entries) == [
        "http://127.0.0.1:1/_static/require.js 404 (Not Found)",
        "Uncaught TypeError: x is undefined",
    ]


def test_page_files_skip_assets_and_name_screenshots(tmp_path):
    for rel in (
        "index.html",
        "book/chapters/02_vqae.html",
        "book/profiles.html",
        "_static/x.html",
        "_sources/y.html",
    ):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text("<html></html>")
    pages = browser_check.page_files(tmp_path)
    assert pages == [Path("book/chapters/02_vqae.html"), Path("book/profiles.html"), Path("index.html")]
    assert [browser_check.is_chapter(p) for p in pages] == [True, False, False]
    assert browser_check.screenshot_name(pages[0]) == "book_chapters_02_vqae.png"


def test_page_files_without_a_build_says_so(tmp_path):
    try:
        browser_check.page_files(tmp_path)
    except FileNotFoundError as err:
        assert "make html" in str(err)
    else:
        raise AssertionError("expected FileNotFoundError")


def test_parameters_are_passed_relative_to_the_notebooks_folder(tmp_path):
    (tmp_path / "notebooks").mkdir()
    assert runbook.relative_to(tmp_path / "_build" / "work", tmp_path / "notebooks") == "../_build/work"
    assert runbook.relative_to(tmp_path / "data", tmp_path / "notebooks") == "../data"


def test_injected_parameters_cell_is_tagged_remove_cell(tmp_path):
    nb = nbformat.v4.new_notebook()
    nb.cells = [
        nbformat.v4.new_code_cell("profile = 'ci'", metadata={"tags": ["parameters"]}),
        nbformat.v4.new_code_cell('work_dir = "../_build/work"', metadata={"tags": ["injected-parameters"]}),
        nbformat.v4.new_code_cell("print(1)"),
    ]
    path = tmp_path / "01_x.ipynb"
    nbformat.write(nb, path)
    assert runbook.hide_injected_parameters(path) == 1
    assert runbook.hide_injected_parameters(path) == 1  # idempotent: the tag is not added twice
    tags = [c["metadata"].get("tags", []) for c in json.loads(path.read_text())["cells"]]
    assert tags == [["parameters"], ["injected-parameters", "remove-cell"], []]
    assert not list(tmp_path.glob(".*.tmp"))


def test_outputs_on_stderr_with_warnings_tracebacks_or_build_paths_are_caught():
    outputs = [
        {"text": "torch 2.13.0, monai 1.6.1\nprofile ci: volumes of (64, 52, 64); device cpu\n"},
        {"text": "/tmp/ipykernel_4217/1.py:15: UserWarning: Converting a tensor …\n", "stderr": True},
        {"text": "values\nDeprecationWarning: x is deprecated\n"},  # a warning printed to stdout
        {"text": "Traceback (most recent call last):\n  File …\nValueError: no", "traceback": True},
        {"text": "prepared now, 6.2 s; cache: ../_build/test-work/prepared"},
        {"text": "data in ../data, tokens → ../_build/test-work/tokens.pt"},
        {"text": "The authors' networks are not downloaded; `--dest DATA_DIR/unleashing-registration`"},
        {"text": "a Warning about nothing, and warnings in prose are fine"},
    ]
    problems = browser_check.output_problems(outputs)
    assert browser_check.output_problems(outputs[:1] + outputs[-2:]) == []
    assert [p.split(":")[0] for p in problems] == [
        "output on stderr",
        "Python warning in an output",
        "build path '/tmp/' in an output",
        "Python warning in an output",
        "traceback in an output",
        "build path '_build/' in an output",
        "build path '../data' in an output",
        "build path '_build/' in an output",
    ]
    assert "UserWarning: Converting a tensor" in problems[1]
    assert "cache: ../_build/test-work/prepared" in problems[5]


def test_tables_wider_than_the_column_are_caught():
    tables = [
        {"width": 760.0, "text": "| field | ci |"},
        {"width": 761.5, "text": "wide"},
        {"width": 1200, "text": "x"},
    ]
    problems = browser_check.wide_tables(tables, column_width=760.0)
    assert len(problems) == 2 and "1200 px > 760 px" in problems[1]
    assert browser_check.wide_tables(tables[:1], column_width=760.0) == []


def test_figures_under_half_the_column_are_caught():
    images = [
        {"width": 380.0, "src": "a.png"},
        {"width": 379.0, "src": "b.png"},
        {"width": 760, "src": "c.png"},
    ]
    problems = browser_check.narrow_figures(images, column_width=760.0)
    assert problems == ["figure 379 px wide, under 50% of the 760 px column: b.png"]
