"""A GPU node without internet: the wheelhouse's choice of packages, the platform tags, ``$REGDIFF_SET``,
and ``make gpu-book`` from a local data folder that lacks some test pairs."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from data_download.wheelhouse import LEAN_SKIP, TORCH_FAMILY, expand_platforms, node_requirements, walk
from regdiff_core.config import ConfigError, get_profile

REPO_ROOT = Path(__file__).resolve().parent.parent

# a resolution as pip's report gives it: monai needs torch and numpy, torch brings sympy (→ mpmath) and
# numpy, matplotlib brings pillow and kiwisolver, nibabel needs numpy and (on old Pythons only) importlib
FOUND = {
    "monai": {"version": "1.6", "requires_dist": ["torch>=2", "numpy>=1.24"]},
    "torch": {"version": "2.13", "requires_dist": ["sympy>=1.13", "numpy"]},
    "sympy": {"version": "1.14", "requires_dist": ["mpmath<1.4"]},
    "mpmath": {"version": "1.3", "requires_dist": []},
    "numpy": {"version": "2.4", "requires_dist": []},
    "Matplotlib": {"version": "3.11", "requires_dist": ["pillow>=8", "kiwisolver", "pytest; extra == 'dev'"]},
    "pillow": {"version": "13", "requires_dist": []},
    "kiwisolver": {"version": "1.5", "requires_dist": []},
    "nibabel": {"version": "5.4", "requires_dist": ["numpy", "importlib-resources; python_version < '3.9'"]},
    "importlib-resources": {"version": "7", "requires_dist": []},
}


def test_torch_and_what_only_it_needs_stay_out_of_the_wheelhouse():
    kept = walk(FOUND, ["monai", "matplotlib", "nibabel"], set(TORCH_FAMILY), {"python_version": "3.11"})
    # numpy stays (monai needs it too); sympy and mpmath go with torch; no dev extra, no old-Python backport
    assert kept == [("Matplotlib", "3.11"), ("kiwisolver", "1.5"), ("monai", "1.6"), ("nibabel", "5.4"),
                    ("numpy", "2.4"), ("pillow", "13")]  # fmt: skip


def test_the_lean_wheelhouse_leaves_out_what_a_pytorch_image_carries():
    kept = walk(
        FOUND, ["monai", "matplotlib", "nibabel"], {*TORCH_FAMILY, *LEAN_SKIP}, {"python_version": "3.11"}
    )
    assert kept == [("monai", "1.6"), ("nibabel", "5.4")]  # kiwisolver went with matplotlib


def test_node_requirements_are_the_dependencies_the_notebook_runners_and_the_build_backend():
    names = [r.split(">")[0].split("=")[0].split("<")[0] for r in node_requirements()]
    assert "torch" not in names and {"monai", "papermill", "ipykernel", "nbformat", "setuptools"} <= set(
        names
    )
    assert "jupyter-book" not in names  # the node executes notebooks; it does not build the pages


def test_platform_tags_expand_to_every_older_glibc():
    tags = expand_platforms(["manylinux_2_28_x86_64", "win_amd64"])
    assert tags[0] == "manylinux_2_28_x86_64" and "manylinux_2_27_x86_64" in tags
    assert {"manylinux2014_x86_64", "manylinux_2_17_x86_64", "manylinux1_x86_64"} <= set(tags)
    assert "manylinux_2_29_x86_64" not in tags and tags[-1] == "win_amd64"


def test_regdiff_set_overrides_every_named_profile_and_says_so_once(monkeypatch, capsys):
    monkeypatch.setenv("REGDIFF_SET", "data.test_cases=2,8; registration.iterations=7")
    assert get_profile("gpu").data.test_cases == ("002", "008")
    assert get_profile("ci", {"registration.iterations": 9}).registration.iterations == 9  # explicit wins
    assert capsys.readouterr().out.count("REGDIFF_SET") == 1
    monkeypatch.setenv("REGDIFF_SET", "data.test_cases")
    with pytest.raises(ConfigError, match="REGDIFF_SET"):
        get_profile("gpu")


@pytest.mark.skipif(shutil.which("make") is None, reason="needs make")
def test_gpu_book_from_a_local_folder_runs_on_the_test_pairs_it_holds(tmp_path):
    release = tmp_path / "unleashing-registration"
    (release / "dilated_vessels_ts").mkdir(parents=True)
    (release / "lms_validation_cropped.pth").write_bytes(b"")
    for case in ("123", "002", "008"):
        for i in (1, 2):
            (release / "dilated_vessels_ts" / f"case_{case}_{i}.nii.gz").write_bytes(b"")
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    (venv / ".installed").touch()  # newer than pyproject.toml: `install` has nothing to do
    out = subprocess.run(
        ["make", "-n", "gpu-book", f"MIRROR_DIR={tmp_path}", f"VENV={venv}"],
        cwd=REPO_ROOT, capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    assert 'REGDIFF_SET="data.test_cases=002,008,123"' in out
    assert f"-m data_download.mirror {release}" in out
    assert "holds 3 of the 27 test pairs" in out
