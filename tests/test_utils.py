"""Shared helpers: metrics files, seeding, devices, atomic saves."""

import json
import math

import numpy as np
import pytest
import torch

from regdiff_core.utils import (
    atomic_torch_save,
    autocast,
    markdown_table,
    resolve_device,
    seed_everything,
    write_metrics,
)


def test_write_metrics_is_json_with_null_for_nan(tmp_path):
    path = write_metrics(
        "99_x", {"a": torch.tensor(1.5), "b": np.float32(2.0), "c": math.nan, "d": (1, 2)}, tmp_path
    )
    assert path == tmp_path / "99_x.json"
    assert json.loads(path.read_text()) == {"a": 1.5, "b": 2.0, "c": None, "d": [1, 2]}
    assert not list(tmp_path.glob("*.tmp"))


def test_seed_everything_repeats():
    seed_everything(3)
    a = torch.rand(4)
    seed_everything(3)
    assert torch.equal(a, torch.rand(4))


def test_autocast_is_a_no_op_on_cpu():
    with autocast(torch.device("cpu")):
        y = torch.ones(2, 2) @ torch.ones(2, 2)
    assert y.dtype == torch.float32


def test_resolve_device():
    assert resolve_device("cpu").type == "cpu"
    assert resolve_device("auto").type in {"cpu", "cuda", "mps"}
    with pytest.raises(ValueError, match="not a torch device"):
        resolve_device("gpu-please")


def test_atomic_save_leaves_old_file_when_writing_fails(tmp_path):
    path = atomic_torch_save({"x": 1}, tmp_path / "ck.pt")

    class Unpicklable:
        def __reduce__(self):
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        atomic_torch_save({"x": Unpicklable()}, path)
    assert torch.load(path, weights_only=True) == {"x": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["ck.pt"]


def test_markdown_table_formats_shapes_floats_and_missing_values():
    rows = [{"shape": (64, 52, 64), "x": 1 / 3, "n": 3}, {"shape": (1, 2), "x": None, "n": 4}]
    assert markdown_table(rows).splitlines() == [
        "| shape | x | n |",
        "|---|---|---|",
        "| 64×52×64 | 0.3333 | 3 |",
        "| 1, 2 | — | 4 |",
    ]
    assert markdown_table(rows, digits=1).splitlines()[2] == "| 64×52×64 | 0.3 | 3 |"
    assert markdown_table([]) == ""


def test_summary_table_flattens_and_formats_by_hand():
    from regdiff_core.utils import flatten_metrics, summary_table

    metrics = {
        "shape": [64, 52, 64],
        "cases": ["104", "105"],
        "regimes": {"real_all": {"final_loss": 0.123456, "n": 3}},
        "rows": [{"steps": 9}, {"steps": 10}],
        "missing": None,
        "note": "a|b",
    }
    assert flatten_metrics(metrics) == [
        ("shape", [64, 52, 64]),
        ("cases", ["104", "105"]),
        ("regimes.real_all.final_loss", 0.123456),
        ("regimes.real_all.n", 3),
        ("rows[0].steps", 9),
        ("rows[1].steps", 10),
        ("missing", None),
        ("note", "a|b"),
    ]
    collapsed = summary_table(metrics).splitlines()
    assert collapsed[0] == ":::{dropdown} All 8 numbers of the chapter's metrics file"
    assert collapsed[-1] == ":::"
    assert collapsed[1:-1] == summary_table(metrics, collapsed=False).splitlines()
    lines = summary_table(metrics, collapsed=False).splitlines()
    assert lines[0] == "| metric | value |"
    assert lines[1] == "|---|---|"
    assert lines[2:] == [
        "| `shape` | 64 × 52 × 64 |",
        "| `cases` | 104, 105 |",
        "| `regimes.real_all.final_loss` | 0.1235 |",
        "| `regimes.real_all.n` | 3 |",
        "| `rows[0].steps` | 9 |",
        "| `rows[1].steps` | 10 |",
        "| `missing` | — |",
        "| `note` | a\\|b |",
    ]


def test_exercise_timer_records_each_exercise_and_nothing_on_error(tmp_path):
    import json

    import pytest

    from regdiff_core.utils import exercise_timer

    with exercise_timer("02_vqae", "2.1", directory=tmp_path) as t:
        pass
    with exercise_timer("02_vqae", "2.2", directory=tmp_path):
        pass
    with pytest.raises(RuntimeError), exercise_timer("02_vqae", "2.3", directory=tmp_path):
        raise RuntimeError("a failing solution")
    recorded = json.loads((tmp_path / "exercises" / "02_vqae.json").read_text())
    assert set(recorded) == {"2.1", "2.2"}
    assert 0 <= recorded["2.1"] < 1 and t["seconds"] >= 0


def test_markdown_table_escapes_pipes_in_headers_and_values():
    from regdiff_core.utils import markdown_table

    assert markdown_table([{"max |u|": "a|b", "n": 1}]).splitlines() == [
        "| max \\|u\\| | n |",
        "|---|---|",
        "| a\\|b | 1 |",
    ]


def test_markdown_table_to_fixed_decimals_with_missing_values():
    text = markdown_table([{"a": 1.234, "b": None}, {"a": 2.0, "b": "x"}], digits=2)
    assert text.splitlines() == ["| a | b |", "|---|---|", "| 1.23 | — |", "| 2.00 | x |"]
