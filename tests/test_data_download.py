"""data_download against local HTTP servers on 127.0.0.1 only: the real mirror, and servers that misbehave."""

from __future__ import annotations

import contextlib
import hashlib
import socket
import subprocess
import sys
from http.server import SimpleHTTPRequestHandler
from pathlib import Path
from urllib.parse import urlsplit

import nibabel as nib
import numpy as np
import pytest

import data_download
from data_download import core
from data_download.__main__ import main as cli
from data_download.mirror import serve

UR = "unleashing-registration"
ALWAYS = [
    "lms_validation_cropped.pth",
    "lung250_3d_vqae_model_dilated.pth",  # the paper's token grids, not a model
    "regnets_state_dilated_vessels.csv",
    "regnets_state_dilated_vessels_10.csv",
    "regnets_state_synth.csv",
]


@pytest.fixture(autouse=True)
def no_retries(monkeypatch):
    """pooch waits 1 s, 2 s, ... between retries; tests that want a retry ask for one."""
    monkeypatch.setattr(core, "RETRIES", 0)
    monkeypatch.delenv("REGDIFF_DATA_URL", raising=False)
    monkeypatch.delenv("REGDIFF_LUNG250M_URL", raising=False)


@pytest.fixture
def mirror(mirror_dir) -> Path:
    return mirror_dir


class Recorder:
    """What the test server saw, and how it should misbehave: ``actions[path](handler)`` replaces a GET."""

    def __init__(self):
        self.requests: list[str] = []
        self.actions: dict = {}


@contextlib.contextmanager
def recording_server(directory: Path):
    """Serve ``directory``, recording every GET; yields (url, recorder)."""
    rec = Recorder()

    class Handler(SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def do_GET(self):
            path = urlsplit(self.path).path.lstrip("/")
            rec.requests.append(path)
            action = rec.actions.get(path)
            return action(self) if action else super().do_GET()

    with serve(directory, Handler) as url:
        yield url, rec


def send(body: bytes, declared_length: int | None = None, once: bool = False):
    """An action that answers 200 with ``body`` while announcing ``declared_length`` bytes (None: no
    Content-Length), then closes the connection. ``once``: only for the first request, then serve normally."""
    used = []

    def action(handler):
        if once and used:
            return SimpleHTTPRequestHandler.do_GET(handler)
        used.append(1)
        handler.send_response(200)
        if declared_length is not None:
            handler.send_header("Content-Length", str(declared_length))
        handler.end_headers()
        handler.wfile.write(body)
        handler.wfile.flush()
        handler.close_connection = True

    return action


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def files_under(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file())


def closed_port_url() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}"  # nothing listens there any more: connection refused


# --- manifests -----------------------------------------------------------------------------------------


def test_manifest_is_the_upstream_list_with_pinned_urls(mirror):
    ds = data_download.DATASETS[UR]
    shipped = Path(core.__file__).with_name("unleashing-registration.sha256").read_text()
    assert shipped == (mirror.parent / "unleashing-registration.sha256").read_text()
    lines = shipped.splitlines()
    assert len(ds.files) == sum(not line.startswith("#") for line in lines) + sum(
        "git-blob" in line for line in lines
    )
    assert ds.splits["train"] == tuple(f"{i:03d}" for i in range(32, 42))
    assert len(ds.splits["test"]) == 27 and {"002", "097", "104", "123"} <= set(ds.splits["test"])
    assert ds.url("dilated_vessels_10/case_032_1.nii.gz") == (
        "https://raw.githubusercontent.com/multimodallearning/UnleashingRegistration/"
        "cd1fce1ca3214fc731d72cbd7d7cfb89f8d808c5/dilated_vessels_10/case_032_1.nii.gz"
    )
    nets = [e for e in ds.select(["032"], networks=True) if e.path.endswith(".pth") and "regnets" in e.path]
    assert [e.hash.split(":")[0] for e in nets] == ["git-blob"] * 3


def test_lung250m_manifest_is_the_97_training_pairs():
    ds = data_download.DATASETS["lung250m-4b"]
    train = ds.splits["train"]
    # 104 ids 000–103, minus the 7 validation cases below 104
    assert len(train) == 97 and train[0] == "000" and train[-1] == "103"
    assert not {"002", "008", "054", "055", "056", "094", "097"} & set(train)
    assert ds.pair("001") == ("segTr/case_001_1.nii.gz", "segTr/case_001_2.nii.gz")
    assert ds.url("segTr/case_001_1.nii.gz") == (
        "https://cloud.imi.uni-luebeck.de/s/s64fqbPpXNexBPP/download?path=%2FsegTr&files=case_001_1.nii.gz"
    )
    assert ds.url("segTr/case_001_1.nii.gz", "http://h:1/") == "http://h:1/segTr/case_001_1.nii.gz"


def test_lung250m_repo_manifest_is_the_pinned_peer_files(repo_mirror_dir):
    ds = data_download.DATASETS["lung250m-4b-repo"]
    shipped = Path(core.__file__).with_name("lung250m-4b-repo.sha256").read_text()
    assert shipped == (repo_mirror_dir.parent / "lung250m-4b-repo.sha256").read_text()
    paths = [e.path for e in ds.select()]
    vxmpp = ["002", "008", "054", "055", "056", "094", "097", *(f"{i}" for i in range(104, 114))]
    assert paths == ["evaluation/lms_validation.pth", *(f"predict_vxmpp/case_{c}.csv" for c in vxmpp)]
    assert all(e.hash.startswith("sha256:") for e in ds.select())
    assert ds.url("predict_vxmpp/case_104.csv") == (
        "https://raw.githubusercontent.com/multimodallearning/Lung250M-4B/"
        "53598ca8f64b13aeb774bc6e6ace486f78d73688/predict_vxmpp/case_104.csv"
    )
    with pytest.raises(data_download.UnknownCaseError, match="no case selection"):
        ds.select(["104"])


def test_lung250m_repo_fetch_from_mirror_via_its_variable(repo_mirror_dir, tmp_path, monkeypatch):
    with serve(repo_mirror_dir) as url:
        monkeypatch.setenv("REGDIFF_LUNG250M_REPO_URL", url)
        paths = data_download.fetch("lung250m-4b-repo", tmp_path, progress=False)
    assert len(paths) == 18
    for path in paths:
        rel = path.relative_to(tmp_path)
        assert path.read_bytes() == (repo_mirror_dir / rel).read_bytes()


def test_git_blob_id_is_gits(tmp_path):
    f = tmp_path / "f"
    f.write_bytes(b"hello world\n")  # `echo 'hello world' | git hash-object --stdin`
    assert core.file_hash(f, "git-blob") == "3b18e512dba79e4c8300dd08aeb37f8e728b8dad"
    f.write_bytes(b"")
    assert core.file_hash(f, "git-blob") == "e69de29bb2d1d6434b8b29ae775ad8c2e48c5391"


# --- unleashing-registration against the mirror ---------------------------------------------------------


def test_fetch_from_mirror_lands_verified_files_in_upstream_layout(mirror, mirror_url, tmp_path, monkeypatch):
    monkeypatch.setenv("REGDIFF_DATA_URL", mirror_url)  # no base_url: the variable is used
    paths = data_download.fetch(UR, tmp_path, cases=["32", "case_002"], progress=False)
    expected = [
        "dilated_vessels_10/case_032_1.nii.gz",
        "dilated_vessels_10/case_032_2.nii.gz",
        "dilated_vessels_ts/case_002_1.nii.gz",
        "dilated_vessels_ts/case_002_2.nii.gz",
        *ALWAYS,
    ]
    assert paths == [tmp_path / p for p in expected]
    assert files_under(tmp_path) == sorted(paths)
    listed = {
        line.split()[2]: line.split()[0]
        for line in (mirror.parent / f"{UR}.sha256").read_text().splitlines()[1:]
    }
    for p in expected:
        assert sha256(tmp_path / p) == listed[p]


def test_present_files_are_not_fetched_again_and_a_bad_one_is_replaced(mirror, tmp_path):
    with recording_server(mirror) as (url, rec):
        data_download.fetch(UR, tmp_path, cases=["032"], base_url=url, progress=False)
        assert len(rec.requests) == 2 + len(ALWAYS)
        rec.requests.clear()
        data_download.fetch(UR, tmp_path, cases=["032"], base_url=url, progress=False)
        assert rec.requests == []
        (tmp_path / ALWAYS[0]).write_bytes(b"changed on disk")
        data_download.fetch(UR, tmp_path, cases=["032"], base_url=url, progress=False)
        assert rec.requests == [ALWAYS[0]]
    assert (tmp_path / ALWAYS[0]).read_bytes() == (mirror / ALWAYS[0]).read_bytes()


def test_checksum_mismatch_removes_file_and_cli_names_file_and_hashes(mirror, tmp_path, capsys):
    target = "dilated_vessels_10/case_032_1.nii.gz"
    body = (mirror / target).read_bytes()[:-10] + b"0123456789"  # same size, different content
    with recording_server(mirror) as (url, rec):
        rec.actions[target] = send(body, len(body))
        code = cli([UR, "--dest", str(tmp_path), "--cases", "032", "--base-url", url, "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    assert target in err
    assert core.file_hash(mirror / target) in err  # expected
    assert hashlib.sha256(body).hexdigest() in err  # actual
    assert files_under(tmp_path) == []


@pytest.mark.parametrize(
    "declared, error, message",
    [(True, data_download.DownloadError, "interrupted"), (False, data_download.ChecksumError, "mismatch")],
    ids=["cut", "short"],
)
def test_interrupted_or_truncated_download_leaves_no_file(mirror, tmp_path, declared, error, message):
    """'cut': the connection closes mid-file; 'short': a complete-looking response with half the bytes."""
    target = "dilated_vessels_10/case_032_2.nii.gz"
    full = (mirror / target).read_bytes()
    with recording_server(mirror) as (url, rec):
        rec.actions[target] = send(full[: len(full) // 2], len(full) if declared else None)
        with pytest.raises(error, match=f"case_032_2.*{message}"):
            data_download.fetch(UR, tmp_path, cases=["032"], base_url=url, progress=False)
    # only the file before it: no partial file under the final name, no temporary file left behind
    assert files_under(tmp_path) == [tmp_path / "dilated_vessels_10/case_032_1.nii.gz"]


def test_a_failed_download_is_retried(mirror, tmp_path, monkeypatch):
    monkeypatch.setattr(core, "RETRIES", 1)  # pooch waits 1 s before the retry
    target = "regnets_state_synth.csv"
    with recording_server(mirror) as (url, rec):
        rec.actions[target] = send(b"partial", 10_000, once=True)
        data_download.fetch(UR, tmp_path, cases=["032"], base_url=url, progress=False)
        assert rec.requests.count(target) == 2
    assert (tmp_path / target).read_bytes() == (mirror / target).read_bytes()


def test_offline_without_mirror_says_what_to_set(tmp_path, capsys):
    with pytest.raises(data_download.DownloadError, match="REGDIFF_DATA_URL.*--base-url"):
        data_download.fetch(UR, tmp_path, cases=["032"], base_url=closed_port_url(), progress=False)
    assert cli(["lung250m-4b", "--dest", str(tmp_path), "--cases", "1", "--base-url", closed_port_url()]) == 2
    assert "REGDIFF_LUNG250M_URL" in capsys.readouterr().err
    assert files_under(tmp_path) == []


def test_unknown_dataset_or_case_lists_the_valid_ones(tmp_path, capsys):
    with pytest.raises(data_download.UnknownDatasetError, match="unleashing-registration, lung250m-4b"):
        data_download.fetch("lung250m", tmp_path)
    with pytest.raises(
        data_download.UnknownCaseError, match=r"unknown case\(s\) 999.*train: 032 .*test: 002 "
    ):
        data_download.fetch(UR, tmp_path, cases=["032", "999"])
    assert cli(["nope", "--dest", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: unknown dataset 'nope'") and "Traceback" not in err


def test_networks_are_checked_by_git_blob_id(tmp_path, monkeypatch):
    """A toy dataset (the real networks are not mirrored) whose one file is known by its git blob id."""
    (tmp_path / "srv").mkdir()
    (tmp_path / "srv/net.pth").write_bytes(b"weights")
    blob = hashlib.sha1(b"blob 7\0weights").hexdigest()
    toy = core.Dataset(
        "toy",
        "",
        "http://upstream/{path}",
        "X",
        (core.FileEntry("net.pth", f"git-blob:{blob}"),),
        {},
        networks=("net.pth",),
    )
    monkeypatch.setitem(data_download.DATASETS, "toy", toy)
    assert data_download.DATASETS[UR].select([], networks=False) == [
        e for e in data_download.DATASETS[UR].files if e.path in ALWAYS
    ]
    with recording_server(tmp_path / "srv") as (url, rec):
        assert data_download.fetch("toy", tmp_path / "a", networks=True, base_url=url, progress=False) == [
            tmp_path / "a/net.pth"
        ]
        data_download.fetch("toy", tmp_path / "a", networks=True, base_url=url, progress=False)
        assert rec.requests == ["net.pth"]  # the second call found it verified
        rec.actions["net.pth"] = send(b"WEIGHTS", 7)
        with pytest.raises(data_download.ChecksumError) as info:
            data_download.fetch("toy", tmp_path / "b", networks=True, base_url=url, progress=False)
    assert (info.value.kind, info.value.expected) == ("git-blob", blob)
    assert info.value.actual == hashlib.sha1(b"blob 7\0WEIGHTS").hexdigest()
    assert files_under(tmp_path / "b") == []


# --- lung250m-4b against a tiny archive in the share's layout -----------------------------------------------


def write_label_map(path: Path, data: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.Nifti1Image(data, np.eye(4)).to_filename(path)


@pytest.fixture(scope="module")
def share(tmp_path_factory) -> Path:
    """segTr/case_NNN_{1,2}.nii.gz for all 97 training pairs: 4×4×3 uint8 labels in {0, 1, 2}."""
    root = tmp_path_factory.mktemp("share")
    rng = np.random.default_rng(0)
    for case in data_download.DATASETS["lung250m-4b"].splits["train"]:
        for i in (1, 2):
            write_label_map(
                root / f"segTr/case_{case}_{i}.nii.gz", rng.integers(0, 3, (4, 4, 3), dtype=np.uint8)
            )
    return root


def test_lung250m_records_sha256_on_first_download_and_verifies_after(share, tmp_path):
    with recording_server(share) as (url, rec):
        paths = data_download.fetch("lung250m-4b", tmp_path, base_url=url, progress=False)
        assert len(paths) == 194 and len(rec.requests) == 194
        record = (tmp_path / "lung250m-4b.sha256").read_text().splitlines()
        entries = {line.split()[2]: line.split()[0] for line in record if not line.startswith("#")}
        assert entries == {
            p.relative_to(tmp_path).as_posix(): sha256(share / p.relative_to(tmp_path)) for p in paths
        }

        rec.requests.clear()
        data_download.fetch("lung250m-4b", tmp_path, cases=["001"], base_url=url, progress=False)
        assert rec.requests == []  # verified against the record

        # the share now serves a different file than the one recorded: refused, removed
        (tmp_path / "segTr/case_001_1.nii.gz").unlink()
        other = (share / "segTr/case_003_1.nii.gz").read_bytes()
        rec.actions["segTr/case_001_1.nii.gz"] = send(other, len(other))
        with pytest.raises(data_download.ChecksumError, match=entries["segTr/case_001_1.nii.gz"]):
            data_download.fetch("lung250m-4b", tmp_path, cases=["001"], base_url=url, progress=False)
    assert not (tmp_path / "segTr/case_001_1.nii.gz").exists()


def test_lung250m_interrupted_run_keeps_the_pairs_it_checked(share, tmp_path):
    with recording_server(share) as (url, rec):
        rec.actions["segTr/case_001_2.nii.gz"] = send(b"cut", 100)
        with pytest.raises(data_download.DownloadError, match="interrupted"):
            data_download.fetch("lung250m-4b", tmp_path, cases=["000", "001"], base_url=url, progress=False)
        record = (tmp_path / "lung250m-4b.sha256").read_text()
        assert "case_000_2" in record and "case_001" not in record
        rec.actions.clear()
        rec.requests.clear()
        data_download.fetch("lung250m-4b", tmp_path, cases=["000", "001"], base_url=url, progress=False)
        # case_001_1 arrived (complete) before the cut but was never checked: kept, only its partner is
        # fetched, and the pair is checked by content and recorded
        assert rec.requests == ["segTr/case_001_2.nii.gz"]
        assert "case_001_1" in (tmp_path / "lung250m-4b.sha256").read_text()


@pytest.mark.parametrize("problem", ["labels", "shapes", "not-nifti"])
def test_lung250m_content_check_rejects_a_bad_pair(tmp_path, monkeypatch, problem):
    fixed = np.zeros((4, 4, 3), np.uint8)
    moving = {"labels": np.full((4, 4, 3), 7, np.uint8), "shapes": np.zeros((4, 4, 2), np.uint8)}.get(
        problem, fixed
    )
    write_label_map(tmp_path / "srv/segTr/case_001_1.nii.gz", fixed)
    write_label_map(tmp_path / "srv/segTr/case_001_2.nii.gz", moving)
    if problem == "not-nifti":
        (tmp_path / "srv/segTr/case_001_2.nii.gz").write_bytes(b"<html>login</html>")
    with recording_server(tmp_path / "srv") as (url, _):
        monkeypatch.setenv("REGDIFF_LUNG250M_URL", url)
        with pytest.raises(data_download.InvalidDataError, match="case_001"):
            data_download.fetch("lung250m-4b", tmp_path / "dest", cases=["1"], progress=False)
    assert files_under(tmp_path / "dest") == []  # both files removed, nothing recorded


# --- the mirror server ----------------------------------------------------------------------------------------


def test_mirror_command_serves_dir_to_the_command_and_returns_its_exit_code(tmp_path):
    (tmp_path / "hello.txt").write_text("hi")
    check = "import os, sys, urllib.request as u; sys.exit(3 if u.urlopen(os.environ['REGDIFF_DATA_URL'] + '/hello.txt').read() == b'hi' else 1)"
    done = subprocess.run(
        [sys.executable, "-m", "data_download.mirror", str(tmp_path), "--", sys.executable, "-c", check]
    )
    assert done.returncode == 3
    assert data_download.mirror.main([str(tmp_path), sys.executable]) == 2  # no "--": usage


def test_mirror_command_serves_more_folders_under_their_variables(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    (tmp_path / "a/x.txt").write_text("A")
    (tmp_path / "b/x.txt").write_text("B")
    check = (
        "import os, sys, urllib.request as u; get = lambda v: u.urlopen(os.environ[v] + '/x.txt').read(); "
        "sys.exit(4 if (get('REGDIFF_DATA_URL'), get('OTHER_URL')) == (b'A', b'B') else 1)"
    )
    argv = [str(tmp_path / "a"), f"OTHER_URL={tmp_path / 'b'}", "--", sys.executable, "-c", check]
    assert subprocess.run([sys.executable, "-m", "data_download.mirror", *argv]).returncode == 4
    assert data_download.mirror.main([str(tmp_path / "a"), "not-a-pair", "--", sys.executable]) == 2
    assert data_download.mirror.main([str(tmp_path / "a"), f"V={tmp_path / 'nope'}", "--", "true"]) == 2
