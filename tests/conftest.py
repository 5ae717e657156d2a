"""Shared fixtures. The data mirror is served over HTTP on 127.0.0.1 (pooch cannot read ``file://``)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

from data_download.mirror import serve

REPO_ROOT = Path(__file__).resolve().parent.parent

#: The book-build scripts are not part of the installed package: they live in ``book/_tools/`` and are
#: run by path (``python book/_tools/runbook.py``), so their folder is on ``sys.path`` there. The tests
#: import them the same way: ``import bookpages``.
TOOLS_DIR = REPO_ROOT / "book" / "_tools"
if str(TOOLS_DIR) not in sys.path:
    sys.path.insert(0, str(TOOLS_DIR))


def _shared_mirror(env_var: str, name: str) -> Path:
    """``$env_var``, else ``<repo>/../shared/data/<name>``; skips the test if that folder is absent."""
    env = os.environ.get(env_var)
    directory = Path(env) if env else REPO_ROOT.parent / "shared" / "data" / name
    if not directory.is_dir():
        pytest.skip(f"data mirror not found at {directory}: set {env_var} to a copy of shared/data/{name}")
    return directory


@pytest.fixture(scope="session")
def mirror_dir() -> Path:
    """The read-only unleashing-registration mirror: ``$REGDIFF_MIRROR_DIR``, else
    ``<repo>/../shared/data/unleashing-registration``; skips the test if it is absent."""
    return _shared_mirror("REGDIFF_MIRROR_DIR", "unleashing-registration")


@pytest.fixture(scope="session")
def mirror_url(mirror_dir):
    """Base URL (no trailing /) of a local HTTP server whose root is the unleashing-registration mirror,
    e.g. ``f"{mirror_url}/dilated_vessels_10/case_032_1.nii.gz"``; pass it as ``base_url``."""
    with serve(mirror_dir) as url:
        yield url


@pytest.fixture(scope="session")
def repo_mirror_dir() -> Path:
    """The read-only mirror of Lung250M-4B's repository files: ``$REGDIFF_REPO_MIRROR_DIR``, else
    ``<repo>/../shared/data/lung250m-4b-repo``; skips the test if it is absent."""
    return _shared_mirror("REGDIFF_REPO_MIRROR_DIR", "lung250m-4b-repo")


@pytest.fixture(scope="session")
def repo_data_dir(tmp_path_factory, repo_mirror_dir) -> Path:
    """A data_dir holding ``lung250m-4b-repo/`` fetched (checksums verified) from the served mirror."""
    from data_download import fetch

    root = tmp_path_factory.mktemp("repo_data")
    with serve(repo_mirror_dir) as url:
        fetch("lung250m-4b-repo", root / "lung250m-4b-repo", base_url=url, progress=False)
    return root


@pytest.fixture(scope="session")
def prepared_ci(tmp_path_factory, mirror_url):
    """Chapter 1 run once at ``ci`` from the mirror: ``.profile``, ``.data_dir``, ``.work_dir`` (Paths).

    ``work_dir/prepared/{train,test}.pt`` hold the 10 release training pairs and the ci test pairs at
    64×52×64; ``data_dir/unleashing-registration/`` holds their files and the landmarks. Read-only: copy
    anything a test wants to change.
    """
    from types import SimpleNamespace

    from regdiff_core.config import get_profile
    from regdiff_core.store.data import prepare

    root = tmp_path_factory.mktemp("prepared_ci")
    profile = get_profile("ci")
    prepare(profile, root / "data", root / "work", base_url=mirror_url, progress=False)
    return SimpleNamespace(profile=profile, data_dir=root / "data", work_dir=root / "work")


@pytest.fixture
def one_torch_thread():
    """Run a test on one torch thread. For tests of tiny tensors: on a shared 2-core machine two
    OpenMP threads spin against other processes and ran such tests up to 70× slower than one did."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
