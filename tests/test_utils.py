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
