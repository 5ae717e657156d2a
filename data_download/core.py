"""Manifests of the three datasets and :func:`fetch`, which downloads a selection of their files with pooch.

pooch does the downloading: each file streams to a temporary file next to its destination, its sha256 is
checked against the registry, and only then is it moved to its final name; failed downloads are retried.
What pooch does not know, we add here: the git blob ids of the three released networks (checked inside the
downloader, so a bad file is still never moved to its final name), case selection, mirrors, clear errors,
and, for Lung250M-4B, whose files have no published checksums, a content check plus a sha256 record.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import re
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import pooch
import requests
import urllib3

#: How often pooch retries a failed download (it waits 1 s, 2 s, ... between tries).
RETRIES = 3
#: Seconds without a byte from the server before a download counts as stalled (requests' read timeout).
TIMEOUT = 60
#: The names :mod:`tempfile` gives pooch's temporary downloads ("tmp" + 8 characters).
_POOCH_TMP = re.compile(r"^tmp[a-z0-9_]{8}$")

UNLEASHING_COMMIT = "cd1fce1ca3214fc731d72cbd7d7cfb89f8d808c5"
UNLEASHING_URL = (
    f"https://raw.githubusercontent.com/multimodallearning/UnleashingRegistration/{UNLEASHING_COMMIT}"
)
LUNG250M_SHARE = "https://cloud.imi.uni-luebeck.de/s/s64fqbPpXNexBPP"
LUNG250M_REPO_COMMIT = "53598ca8f64b13aeb774bc6e6ace486f78d73688"
LUNG250M_REPO_URL = f"https://raw.githubusercontent.com/multimodallearning/Lung250M-4B/{LUNG250M_REPO_COMMIT}"
#: The paper's own VQ-AE token grids of the 97 Lung250M-4B training pairs (not a model, despite the name).
PAPER_TOKENS_FILE = "lung250_3d_vqae_model_dilated.pth"
#: Lung250M-4B validation/test pairs (its README); all other ids 000–103 are the 97 training pairs.
LUNG250M_NOT_TRAINING = {"002", "008", "054", "055", "056", "094", "097"} | {
    f"{i:03d}" for i in range(104, 124)
}

_PAIR_FILE = re.compile(r"case_(\d{3})_([12])\.nii\.gz$")
log = logging.getLogger(__name__)


class DownloadError(Exception):
    """A download could not be completed; the message says what to do. The CLI prints it and exits 2."""


class ChecksumError(DownloadError, ValueError):
    """A file's checksum differs from the manifest (or record); the file has been removed."""

    def __init__(self, path: str, kind: str, expected: str, actual: str):
        self.path, self.kind, self.expected, self.actual = path, kind, expected, actual
        super().__init__(
            f"{path}: {kind} checksum mismatch, expected {expected}, got {actual}; the file was removed. "
            "Run again to retry; if it persists, the server (or mirror) holds a different file."
        )


class InvalidDataError(DownloadError):
    """A downloaded file without a known checksum failed the content check; it has been removed."""


class UnknownDatasetError(DownloadError, ValueError):
    """The dataset name is not one of :data:`DATASETS`."""


class UnknownCaseError(UnknownDatasetError):
    """A requested case id is not in the dataset."""


@dataclass(frozen=True)
class FileEntry:
    """One upstream file: ``path`` relative to the dataset root ("/"-separated) and its known checksum.

    ``hash`` is ``"sha256:<hex>"``, ``"git-blob:<hex>"`` (sha1 over ``b"blob <size>\\0" + content``), or
    ``None`` when no checksum is published (then a sha256 is recorded on first download).
    """

    path: str
    hash: str | None


@dataclass(frozen=True)
class Dataset:
    """A dataset: its complete manifest and how to reach it.

    ``url_template`` builds the upstream URL from ``{path}`` (or its ``{folder}`` and ``{name}``); a mirror
    given as ``base_url`` instead serves ``f"{base_url}/{path}"`` (a static server whose root is the
    dataset's root folder).
    """

    name: str
    description: str
    url_template: str
    env_var: str  # environment variable that names a mirror
    files: tuple[FileEntry, ...]  # the complete upstream manifest
    splits: dict[str, tuple[str, ...]]  # split name → case ids ("032", ...)
    always: tuple[str, ...] = ()  # paths that come with every selection
    networks: tuple[str, ...] = ()  # paths added by networks=True
    record: str | None = None  # sha256 record under dest, for files without published checksums

    @property
    def cases(self) -> tuple[str, ...]:
        """All case ids, sorted."""
        return tuple(sorted(c for ids in self.splits.values() for c in ids))

    def pair(self, case: str) -> tuple[str, str]:
        """Paths of the (fixed = inhale ``_1``, moving = exhale ``_2``) files of a case."""
        paths = {
            m.group(2): f.path for f in self.files if (m := _PAIR_FILE.search(f.path)) and m.group(1) == case
        }
        return paths["1"], paths["2"]

    def url(self, path: str, base_url: str | None = None) -> str:
        """Where ``path`` is downloaded from: the mirror ``base_url`` if given, else upstream."""
        if base_url:
            return f"{base_url.rstrip('/')}/{path}"
        folder, _, name = path.rpartition("/")
        return self.url_template.format(path=path, folder=folder, name=name)

    def select(self, cases: Sequence[str] | None = None, networks: bool = False) -> list[FileEntry]:
        """The manifest entries for ``cases`` (None: all), in case order (fixed, moving), then the
        files that always come along, then the networks if asked for."""
        if cases and not self.splits:
            raise UnknownCaseError(
                f"{self.name} has no case selection: its {len(self.files)} files always come together "
                "(leave out --cases)"
            )
        wanted = self.cases if cases is None else [normalize_case(c) for c in cases]
        unknown = [c for c in wanted if c not in self.cases]
        if unknown:
            valid = "; ".join(f"{split}: {' '.join(ids)}" for split, ids in self.splits.items())
            raise UnknownCaseError(
                f"unknown case(s) {', '.join(unknown)} for {self.name}; valid cases are {valid}"
            )
        if networks and not self.networks:
            raise DownloadError(f"{self.name} has no released networks (only unleashing-registration has)")
        paths = [p for c in dict.fromkeys(wanted) for p in self.pair(c)]
        paths += [*self.always, *(self.networks if networks else ())]
        by_path = {f.path: f for f in self.files}
        return [by_path[p] for p in paths]


def normalize_case(case: str | int) -> str:
    """``32``, ``"32"``, ``"032"`` and ``"case_032"`` all name case ``"032"``."""
    text = str(case).removeprefix("case_")
    return f"{int(text):03d}" if text.isdigit() else text


def read_sha256_list(text: str) -> list[FileEntry]:
    """Parse a ``sha256  size  path`` list; ``# git-blob <sha1>  path`` comment lines give git blob ids."""
    entries = []
    for line in text.splitlines():
        fields = line.split()
        if len(fields) == 3 and not line.startswith("#"):
            entries.append(FileEntry(fields[2], f"sha256:{fields[0]}"))
        elif len(fields) == 4 and fields[:2] == ["#", "git-blob"]:
            entries.append(FileEntry(fields[3], f"git-blob:{fields[2]}"))
    return entries


def file_hash(path: str | Path, kind: str = "sha256") -> str:
    """Hex digest of a file: ``"sha256"``, or ``"git-blob"`` (the id git gives the file's content)."""
    path = Path(path)
    if kind == "git-blob":
        digest = hashlib.sha1(b"blob %d\0" % path.stat().st_size)
    else:
        digest = hashlib.new(kind)
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def _unleashing_registration() -> Dataset:
    text = Path(__file__).with_name("unleashing-registration.sha256").read_text()
    files = tuple(read_sha256_list(text))

    def ids(folder: str) -> tuple[str, ...]:
        return tuple(
            sorted(
                {m.group(1) for f in files if f.path.startswith(folder) and (m := _PAIR_FILE.search(f.path))}
            )
        )

    return Dataset(
        name="unleashing-registration",
        description="the paper's release: 10 training + 27 test vessel pairs, landmarks, results, networks",
        url_template=UNLEASHING_URL + "/{path}",
        env_var="REGDIFF_DATA_URL",
        files=files,
        splits={"train": ids("dilated_vessels_10/"), "test": ids("dilated_vessels_ts/")},
        always=(
            "lms_validation_cropped.pth",
            PAPER_TOKENS_FILE,
            "regnets_state_dilated_vessels.csv",
            "regnets_state_dilated_vessels_10.csv",
            "regnets_state_synth.csv",
        ),
        networks=tuple(
            f.path for f in files if f.path.startswith("regnets_state_") and f.path.endswith(".pth")
        ),
    )


def _lung250m_4b() -> Dataset:
    train = tuple(f"{i:03d}" for i in range(104) if f"{i:03d}" not in LUNG250M_NOT_TRAINING)
    return Dataset(
        name="lung250m-4b",
        description="Lung250M-4B vessel segmentations segTr of the 97 training pairs (no published checksums)",
        # a Nextcloud public share serves one file of a folder as .../download?path=/<folder>&files=<name>
        url_template=LUNG250M_SHARE + "/download?path=%2F{folder}&files={name}",
        env_var="REGDIFF_LUNG250M_URL",
        files=tuple(FileEntry(f"segTr/case_{c}_{i}.nii.gz", None) for c in train for i in (1, 2)),
        splits={"train": train},
        record="lung250m-4b.sha256",
    )


def _lung250m_4b_repo() -> Dataset:
    text = Path(__file__).with_name("lung250m-4b-repo.sha256").read_text()
    files = tuple(read_sha256_list(text))
    return Dataset(
        name="lung250m-4b-repo",
        description="Lung250M-4B's repository: landmarks in the original frame, VoxelMorph++ predictions",
        url_template=LUNG250M_REPO_URL + "/{path}",
        env_var="REGDIFF_LUNG250M_REPO_URL",
        files=files,
        splits={},  # no case pairs: the whole (small) manifest comes with every download
        always=tuple(f.path for f in files),
    )


#: The datasets :func:`fetch` knows, by name.
DATASETS: dict[str, Dataset] = {
    d.name: d for d in (_unleashing_registration(), _lung250m_4b(), _lung250m_4b_repo())
}


def get_dataset(name: str) -> Dataset:
    """The :class:`Dataset` called ``name``, or :class:`UnknownDatasetError` listing the valid names."""
    try:
        return DATASETS[name]
    except KeyError:
        raise UnknownDatasetError(
            f"unknown dataset {name!r}; valid datasets are: {', '.join(DATASETS)}"
        ) from None


def fetch(
    dataset: str,
    dest: str | Path,
    *,
    cases: Sequence[str] | None = None,
    base_url: str | None = None,
    networks: bool = False,
    progress: bool = True,
) -> list[Path]:
    """Download the selected files of ``dataset`` to ``dest`` (upstream paths kept); return their paths.

    Files already in ``dest`` whose checksum matches are not downloaded again; a local file that does not
    match is replaced. A local Lung250M-4B file without a recorded checksum is kept and checked by content
    with its partner (then recorded) instead of being downloaded again. ``base_url`` (else
    ``$REGDIFF_DATA_URL`` / ``$REGDIFF_LUNG250M_URL``) names a mirror. Raises :class:`DownloadError` (or a
    subclass) with a message saying what went wrong.

    While it runs, ``fetch`` holds a lock on ``dest`` (the file ``.<dest name>.lock`` next to it): a second
    ``fetch`` into the same folder waits for the first, then finds its files. Temporary files left there
    by a download that was killed are removed.
    """
    ds = get_dataset(dataset)
    entries = ds.select(cases, networks)
    dest = Path(dest).expanduser()
    with _locked(dest):
        _remove_stale_temporaries(dest, entries)
        return _fetch_locked(ds, entries, dest, base_url, progress)


@contextlib.contextmanager
def _locked(dest: Path) -> Iterator[None]:
    """Hold an exclusive ``flock`` on ``dest``'s lock file (POSIX; elsewhere no lock is taken)."""
    try:
        import fcntl
    except ImportError:  # Windows: no flock
        yield
        return
    dest.parent.mkdir(parents=True, exist_ok=True)
    lock = dest.parent / f".{dest.name}.lock"
    with lock.open("a") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            print(f"waiting for another download into {dest} to finish (it holds {lock}) …", file=sys.stderr)
            fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _remove_stale_temporaries(dest: Path, entries: Sequence[FileEntry]) -> None:
    """Remove pooch's temporary files (``tmpXXXXXXXX``) and our record's ``.tmp`` in the folders of
    ``entries``: with the lock held, no other download is writing them, so they are leftovers of a kill."""
    folders = {dest} | {(dest / e.path).parent for e in entries}
    records = {Path(d.record).with_suffix(".tmp").name for d in DATASETS.values() if d.record}
    for folder in sorted(folders):
        if not folder.is_dir():
            continue
        for path in folder.iterdir():
            if path.is_file() and (_POOCH_TMP.match(path.name) or path.name in records):
                log.warning("%s: removing a temporary file left by an interrupted download", path)
                path.unlink(missing_ok=True)


def _fetch_locked(
    ds: Dataset, entries: list[FileEntry], dest: Path, base_url: str | None, progress: bool
) -> list[Path]:
    base_url = base_url or os.environ.get(ds.env_var) or None
    record_path = dest / ds.record if ds.record else None
    record = (
        {f.path: f.hash for f in read_sha256_list(record_path.read_text())}
        if record_path and record_path.exists()
        else {}
    )
    entries = [FileEntry(e.path, e.hash or record.get(e.path)) for e in entries]

    registry = {e.path: e.hash if e.hash and e.hash.startswith("sha256:") else None for e in entries}
    urls = {e.path: ds.url(e.path, base_url) for e in entries}
    store = pooch.create(path=dest, base_url="", registry=registry, urls=urls, retry_if_failed=RETRIES)
    level = pooch.get_logger().level
    pooch.get_logger().setLevel(logging.INFO if progress else logging.WARNING)
    paths, fresh = [], set()  # fresh: files first downloaded now, without a known checksum
    try:
        for entry in entries:
            paths.append(_fetch_one(store, ds, entry, dest, progress))
            if entry.hash is None:
                fresh.add(entry.path)
            # a pair is complete once its moving file (_2, selected after _1) is here: check it, record it
            if record_path and (m := _PAIR_FILE.search(entry.path)) and m.group(2) == "2":
                pair = ds.pair(m.group(1))
                if fresh & set(pair):
                    _check_and_record(pair, dest, record_path)
    finally:
        pooch.get_logger().setLevel(level)
    return paths


def _fetch_one(store: pooch.Pooch, ds: Dataset, entry: FileEntry, dest: Path, progress: bool) -> Path:
    """Fetch one file through pooch, turning pooch's and requests' exceptions into ours."""
    path = dest / entry.path
    kind, _, expected = (entry.hash or "").partition(":")
    # A local file that fails its checksum is removed first, so that a failed download cannot leave it in
    # place under its final name. One without a checksum to check (Lung250M-4B, not yet recorded) is kept:
    # pooch leaves an existing file alone, and fetch() checks it by content with its partner and records it.
    if path.exists() and expected and file_hash(path, kind) != expected:
        log.warning("%s: checksum mismatch, downloading it again", path)
        path.unlink()
    downloader = pooch.HTTPDownloader(progressbar=progress, timeout=TIMEOUT)
    if kind == "git-blob":
        downloader = _git_blob_checked(downloader, entry.path, expected)
    url = store.get_url(entry.path)
    try:
        return Path(store.fetch(entry.path, downloader=downloader, progressbar=progress))
    except ChecksumError:
        raise
    except ValueError as err:  # pooch: "... expected <hash> but got <hash>. Deleted download ..."
        match = re.search(r"expected (\S+) but got (\S+?)\.", str(err))
        actual = match.group(2) if match else "unknown"
        raise ChecksumError(entry.path, kind, expected, actual) from err
    except (requests.exceptions.ConnectionError, requests.exceptions.Timeout) as err:
        if _stalled(err):  # the server answered, then sent nothing for TIMEOUT s
            raise DownloadError(
                f"download of {entry.path} from {url} stalled: {urlsplit(url).netloc} answered but sent no "
                f"data for {TIMEOUT} s ({_reason(err)}); nothing was kept, run again (a slow server or "
                "network; a mirror may help)"
            ) from err
        if not _unreachable(err):  # connected, then the connection broke off
            raise DownloadError(
                f"download of {entry.path} from {url} was interrupted: the connection to "
                f"{urlsplit(url).netloc} broke off ({_reason(err)}); nothing was kept, run again"
            ) from err
        raise DownloadError(
            f"cannot reach {urlsplit(url).netloc} to download {entry.path} (offline?). To use a mirror, set "
            f"{ds.env_var}=<URL> or pass --base-url URL (base_url=... in Python); "
            "`python -m data_download.mirror DIR -- CMD` serves a local copy."
        ) from err
    except requests.exceptions.HTTPError as err:
        raise DownloadError(
            f"{url}: HTTP {err.response.status_code}; the server does not have {entry.path}"
        ) from err
    except requests.exceptions.RequestException as err:
        raise DownloadError(
            f"download of {entry.path} from {url} was interrupted ({err}); nothing was kept, run again"
        ) from err


def _reason(err: BaseException) -> str:
    reason = err.args[0] if err.args else err
    return str(getattr(reason, "reason", reason))


def _stalled(err: BaseException) -> bool:
    """True for a read timeout: connected, then no data for ``TIMEOUT`` seconds."""
    if isinstance(err, requests.exceptions.ConnectTimeout):
        return False
    if isinstance(err, requests.exceptions.Timeout):
        return True
    reason = err.args[0] if err.args else None
    return isinstance(getattr(reason, "reason", reason), urllib3.exceptions.ReadTimeoutError)


def _unreachable(err: BaseException) -> bool:
    """True when no connection to the server could be made (refused, no route, DNS, connect timeout);
    False when it was connected and the transfer stalled or broke off."""
    if isinstance(err, requests.exceptions.ConnectTimeout):
        return True
    if isinstance(err, requests.exceptions.Timeout):  # a read timeout: connected, no answer in time
        return False
    reason = err.args[0] if err.args else None
    reason = getattr(reason, "reason", reason)  # urllib3's MaxRetryError wraps the cause
    return not isinstance(reason, urllib3.exceptions.ReadTimeoutError | urllib3.exceptions.ProtocolError)


def _git_blob_checked(downloader, path: str, expected: str):
    """Wrap a pooch downloader so that the temporary file must have git blob id ``expected``."""

    def download(url, output_file, store):
        downloader(url, output_file, store)
        actual = file_hash(output_file, "git-blob")
        if actual != expected:
            raise ChecksumError(path, "git-blob", expected, actual)  # pooch deletes the temporary file

    return download


def _check_and_record(pair: tuple[str, str], dest: Path, record_path: Path) -> None:
    """Check a newly downloaded pair's content (removing it if bad), then add its sha256 to the record."""
    files = [dest / p for p in pair]
    try:
        check_label_pair(*files)
    except InvalidDataError:
        for f in files:
            f.unlink(missing_ok=True)
        raise
    lines = record_path.read_text().splitlines() if record_path.exists() else ["# sha256  size  path"]
    lines = [line for line in lines if (line.split() or [""])[-1] not in pair]
    lines += [f"{file_hash(f)}  {f.stat().st_size}  {p}" for f, p in zip(files, pair)]
    tmp = record_path.with_suffix(".tmp")
    tmp.write_text("\n".join(lines) + "\n")
    tmp.replace(record_path)  # atomic: an interrupted run never leaves half a record


def check_label_pair(fixed: Path, moving: Path, labels: frozenset[int] = frozenset({0, 1, 2})) -> None:
    """Raise :class:`InvalidDataError` unless both files are readable 3D NIfTI label maps with values in
    ``labels`` and the same shape."""
    import nibabel as nib  # imported here: only Lung250M-4B downloads need it
    import numpy as np

    shapes = []
    for path in (fixed, moving):
        try:
            data = np.asanyarray(nib.load(path).dataobj)
        except Exception as err:  # nibabel raises many kinds for a broken file (gzip, header, EOF)
            raise InvalidDataError(
                f"{path} is not a readable NIfTI file ({err}); both files of the pair were removed"
            ) from err
        if np.issubdtype(data.dtype, np.integer) and data.min() >= 0:
            values = np.flatnonzero(np.bincount(data.ravel()))  # much faster than np.unique on 30M voxels
        else:
            values = np.unique(data)
        if data.ndim != 3 or not set(values.tolist()) <= labels:
            raise InvalidDataError(
                f"{path}: expected a 3D label map with values in {sorted(labels)}, got shape {data.shape} "
                f"and values {values[:10].tolist()}; both files of the pair were removed"
            )
        shapes.append(data.shape)
    if shapes[0] != shapes[1]:
        raise InvalidDataError(
            f"{fixed} and {moving} differ in shape ({shapes[0]} vs {shapes[1]}); both were removed"
        )
