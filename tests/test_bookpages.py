"""The generated book fragments: profile tables follow ``config.PROFILES``; CI costs follow the metrics files."""

from __future__ import annotations

import dataclasses
import json

import bookpages  # book/_tools/, on sys.path through conftest.py
import pytest

from regdiff_core import config


def _table_row(markdown: str, stage: str, field: str) -> str:
    """The table row of ``field`` inside the section of ``stage``."""
    section = markdown.split(f"### `{stage}`", 1)[1].split("\n### ", 1)[0]
    rows = [line for line in section.splitlines() if line.startswith(f"| `{field}` |")]
    assert len(rows) == 1, f"expected one row for {stage}.{field}, got {rows}"
    return rows[0]


def _cells(row: str) -> list[str]:
    return [c.strip() for c in row.strip().strip("|").split("|")]


@pytest.fixture
def toy_profiles(monkeypatch):
    """Three profiles that differ only where this test says, installed as ``config.PROFILES``."""
    paper = config.Profile(name="paper")
    colab = dataclasses.replace(
        paper, name="colab", vqae=dataclasses.replace(paper.vqae, iterations=777, lr=0.25)
    )
    ci = dataclasses.replace(
        paper,
        name="ci",
        vqae=dataclasses.replace(paper.vqae, iterations=12345, lr=0.25),
        data=dataclasses.replace(paper.data, shape=(8, 6, 4), test_cases=("104", "108")),
    )
    profiles = {"paper": paper, "colab": colab, "ci": ci}  # deliberately not in column order
    monkeypatch.setattr(config, "PROFILES", profiles)
    return profiles


def test_table_shows_monkeypatched_values_in_ci_colab_paper_order(toy_profiles):
    md = bookpages.profiles_markdown()
    header = [line for line in md.split("### `vqae`", 1)[1].splitlines() if line.startswith("| field")][0]
    assert _cells(header)[:4] == ["field", "`ci`", "`colab`", "`paper`"]
    # hand-written expectations: ci 12345, colab 777, paper's default 42000
    assert _cells(_table_row(md, "vqae", "iterations"))[:4] == ["`iterations`", "`12345`", "`777`", "`42000`"]
    # lr: ci and colab share 0.25, paper has 5e-4; floats print in their short round-trip form
    assert _cells(_table_row(md, "vqae", "lr"))[:4] == ["`lr`", "`0.25`", "`0.25`", "`0.0005`"]
    shape_row = _cells(_table_row(md, "data", "shape"))
    assert shape_row[:4] == ["`shape`", "`(8, 6, 4)`", "`(256, 208, 256)`", "`(256, 208, 256)`"]
    assert _cells(_table_row(md, "data", "test_cases"))[:4] == [
        "`test_cases`",
        "`104, 108`",
        "`None`",
        "`None`",
    ]


def test_differing_fields_with_a_comment_get_a_note_below_the_table(toy_profiles):
    md = bookpages.profiles_markdown()
    vqae = md.split("### `vqae`", 1)[1].split("\n### ", 1)[0]
    comment = bookpages.field_comments(config.VQAEConfig)["iterations"]
    assert f"- `iterations`: {comment}" in vqae.splitlines()
    # beta has a comment too, but does not differ between the toy profiles → no note
    assert not any(line.startswith("- `beta`") for line in vqae.splitlines())


def test_shared_fields_are_listed_once_not_as_rows(toy_profiles):
    md = bookpages.profiles_markdown()
    vqae = md.split("### `vqae`", 1)[1].split("\n### ", 1)[0]
    # beta is equal in all three toy profiles → no row, but named among the shared values
    assert "| `beta` |" not in vqae
    assert "`beta` = `0.25`" in vqae
    # a stage where nothing differs says so instead of printing an empty table
    sampling = md.split("### `sampling`", 1)[1].split("\n### ", 1)[0]
    assert "All profiles use the same values for this stage." in sampling
    assert "| field" not in sampling


def test_every_stage_and_every_field_of_the_real_profiles_appears():
    md = bookpages.profiles_markdown()
    for stage, cls in config.STAGES.items():
        section = md.split(f"### `{stage}`", 1)[1].split("\n### ", 1)[0]
        for f in dataclasses.fields(cls):
            assert f"`{f.name}`" in section, f"{stage}.{f.name} missing from the generated page"


def test_explicit_profiles_argument_and_extra_profile_column():
    paper = config.Profile(name="paper")
    extra = dataclasses.replace(paper, name="h100", sampling=dataclasses.replace(paper.sampling, n_pairs=5))
    md = bookpages.profiles_markdown({"paper": paper, "h100": extra})
    assert _cells(_table_row(md, "sampling", "n_pairs"))[:3] == ["`n_pairs`", "`256`", "`5`"]


def test_format_value_shortens_long_case_lists_and_escapes_pipes():
    cases = tuple(f"{i:03d}" for i in range(32, 42))
    assert bookpages.format_value(cases) == "`032, 033, …, 041 (10)`"
    assert bookpages.format_value("a|b") == "`a/b`"
    assert bookpages.format_value(None) == "`None`"
    assert bookpages.format_value(5e-5) == "`5e-05`"


def test_field_comments_reads_both_comment_styles():
    comments = bookpages.field_comments(config.DataConfig)
    assert comments["test_cases"].startswith("test cases to prepare")  # a `#:` line above the field
    assert "336000" in bookpages.field_comments(config.VQAEConfig)["iterations"]  # a trailing `#`


def test_ci_costs_from_metrics_files(tmp_path):
    (tmp_path / "01_data_preparation.json").write_text(json.dumps({"seconds": 42.4, "shape": [64, 52, 64]}))
    (tmp_path / "02_vqae.json").write_text(json.dumps({"seconds": 3.3}))
    (tmp_path / "03_absorbing_diffusion.json").write_text(json.dumps({"final_loss": 1.0}))  # no seconds
    (tmp_path / "gpu_check.json").write_text(json.dumps({"seconds": 99}))  # not a chapter
    md = bookpages.ci_costs_markdown(tmp_path)
    assert "| `01_data_preparation` | 42 s |" in md
    assert "| `02_vqae` | 3.3 s |" in md  # under 10 s: one decimal
    assert "03_absorbing_diffusion" not in md
    assert "gpu_check" not in md
    assert "| **total** | 46 s |" in md  # 42.4 + 3.3 = 45.7
    assert "not recorded" in md  # no runbook.json → the profile is unknown


def test_ci_costs_with_runbook_wall_times(tmp_path):
    (tmp_path / "01_data_preparation.json").write_text(json.dumps({"seconds": 20.0}))
    (tmp_path / "runbook.json").write_text(
        json.dumps({"profile": "ci", "seconds": {"01_data_preparation": 31.0, "02_vqae": 150.0}})
    )
    md = bookpages.ci_costs_markdown(tmp_path)
    assert "profile `ci`" in md
    assert "| `01_data_preparation` | 20 s | 31 s |" in md
    assert "| `02_vqae` | — | 150 s |" in md  # ran, but wrote no metrics
    assert "| **total** | 20 s | 181 s |" in md


def test_ci_costs_absent_says_not_measured(tmp_path):
    md = bookpages.ci_costs_markdown(tmp_path / "missing")
    assert "Not measured yet" in md
    assert "|" not in md


def test_main_writes_both_fragments(tmp_path, monkeypatch, toy_profiles):
    metrics = tmp_path / "metrics"
    metrics.mkdir()
    (metrics / "06_evaluation.json").write_text(json.dumps({"seconds": 12.0}))
    out = tmp_path / "chapters"
    assert bookpages.main([str(out), "--metrics-dir", str(metrics)]) == 0
    assert "`12345`" in (out / "profiles_table.md").read_text()
    assert "| `06_evaluation` | 12 s |" in (out / "ci_costs_table.md").read_text()
    assert "differs from the authors' code" in (out / "seed_differences.md").read_text()
    # the default metrics folder follows $REGDIFF_METRICS_DIR, as the notebooks' write_metrics does
    monkeypatch.setenv("REGDIFF_METRICS_DIR", str(metrics))
    assert bookpages.main([str(tmp_path / "again")]) == 0
    assert "06_evaluation" in (tmp_path / "again" / "ci_costs_table.md").read_text()


def _notebook(path, *markdown_cells):
    cells = [{"cell_type": "markdown", "metadata": {}, "source": text} for text in markdown_cells]
    cells.insert(1, {"cell_type": "code", "metadata": {}, "outputs": [], "source": "x = 1"})
    path.write_text(json.dumps({"cells": cells, "metadata": {}, "nbformat": 4, "nbformat_minor": 5}))


def test_exercises_table_lists_notebook_exercises_with_measured_times(tmp_path):
    nbs = tmp_path / "notebooks"
    nbs.mkdir()
    _notebook(
        nbs / "01_data.ipynb",
        "# 1. Data",
        ":::{admonition} Exercise 1.1 — dilate once more\n:class: tip\n\n"
        "**Change:** dilate the masks\nonce more. **Predict:** the fraction.\n:::",
        ":::{admonition} Exercise 1.2 — move the frame\n:class: tip\n\n**Change:** shift it. **Predict:** x\n:::",
    )
    _notebook(nbs / "02_vqae.ipynb", ":::{admonition} Exercise 2.1 — codes\n\n**Change:** K = 24.\n:::")
    (nbs / "notes.ipynb").write_text("not a chapter")  # not NN_*: ignored
    metrics = tmp_path / "metrics"
    (metrics / "exercises").mkdir(parents=True)
    (metrics / "exercises" / "01_data.json").write_text(json.dumps({"1.1": 2.5, "1.2": 12.4}))
    (metrics / "runbook.json").write_text(json.dumps({"profile": "ci", "seconds": {}}))
    found = bookpages.list_exercises(nbs)
    assert [(e["notebook"], e["number"], e["title"]) for e in found] == [
        ("01_data", "1.1", "dilate once more"),
        ("01_data", "1.2", "move the frame"),
        ("02_vqae", "2.1", "codes"),
    ]
    assert found[0]["change"] == "dilate the masks once more."  # up to **Predict:**, whitespace joined
    assert found[2]["change"] == "K = 24."  # up to the closing fence
    md = bookpages.exercises_markdown(nbs, metrics)
    assert "profile `ci`" in md
    assert "| `01_data` | 1.1 dilate once more | dilate the masks once more. | 2.5 s |" in md
    assert "| `01_data` | 1.2 move the frame | shift it. | 12 s |" in md
    assert "| `02_vqae` | 2.1 codes | K = 24. | not run |" in md
    assert "| **all 3** | | 2 measured | 15 s |" in md  # 2.5 + 12.4 = 14.9


def test_exercises_table_of_the_real_notebooks_has_two_per_chapter(tmp_path):
    found = bookpages.list_exercises(bookpages.REPO_ROOT / "notebooks")
    per_chapter = {}
    for ex in found:
        per_chapter.setdefault(ex["notebook"], []).append(ex)
        assert ex["number"].split(".")[0] == str(int(ex["notebook"][:2])), ex
        assert ex["change"], f"exercise {ex['number']} says what to change"
    assert len(per_chapter) == 6
    assert all(len(v) >= 2 for v in per_chapter.values()), {k: len(v) for k, v in per_chapter.items()}


def test_seed_differences_table_has_one_row_per_difference():
    rows = [("vqae", "a | b", "because\nof c")]
    md = bookpages.seed_differences_markdown(rows)
    table = [line for line in md.splitlines() if line.startswith("| `")]
    assert table == ["| `vqae` | a / b | because of c |"]  # pipes and newlines cannot break the table
    listed = bookpages.seed_differences_markdown()
    assert sum(line.startswith("| `") for line in listed.splitlines()) == len(bookpages.SEED_DIFFERENCES)
    # every row names a stage of the profiles (or "all") and gives a reason
    for stage, what, why in bookpages.SEED_DIFFERENCES:
        assert stage in (*config.STAGES, "all") and what and why, (stage, what)
