"""Download the book's data: verified, resumable, and pointable at a local mirror.

This package only moves files; reading and preparing them is chapter 1's job (``regdiff_core.data``).
It is built on `pooch <https://www.fatiando.org/pooch>`_, which keeps a registry of sha256 checksums,
streams every download to a temporary file, checks it, and only then moves it to its final name, retries
failed downloads, and draws a progress bar. We did not hand-write any of that.

Datasets (:data:`DATASETS`)
---------------------------
``unleashing-registration``
    The paper's own release, github.com/multimodallearning/UnleashingRegistration pinned to commit
    ``cd1fce1c…`` (raw files from raw.githubusercontent.com). Its manifest is every upstream file with
    its sha256 (``unleashing-registration.sha256``, shipped in this package). Case pairs
    ``case_NNN_1.nii.gz`` (fixed, inhale) / ``case_NNN_2.nii.gz`` (moving, exhale): the 10 training pairs
    032–041 in ``dilated_vessels_10/`` and the 27 test pairs in ``dilated_vessels_ts/`` (see
    ``DATASETS["unleashing-registration"].splits``). The landmarks ``lms_validation_cropped.pth`` and the
    paper's three result CSVs come with every selection; ``networks=True`` adds the three trained
    registration networks ``regnets_state_*.pth``, which upstream lists only by git blob id (sha1 over
    ``b"blob <size>\\0" + content``), so that is what is checked for them. Also with every selection comes
    ``lung250_3d_vqae_model_dilated.pth``, which despite its name is not a model: a list of 97 int16
    tensors of 3328 codes, the paper's own VQ-AE token grids (16×13×16, C order, codebook 1024) of the
    97 Lung250M-4B training pairs (chapters 2 and 3 use them; the VQ-AE that made them is not released).
    (The manifest also lists ``dilated_vessel/case_000_1.nii.gz`` and ``instructions.txt``; no chapter
    needs them, so :func:`fetch` does not download them.)
``lung250m-4b``
    The vessel segmentations ``segTr/case_NNN_{1,2}.nii.gz`` (labels 0 background, 1 and 2 the two
    vessel classes) of all 97 training pairs of Lung250M-4B (ids 000–103 except the validation cases 002,
    008, 054, 055, 056, 094, 097), from the Nextcloud share named in github.com/multimodallearning/
    Lung250M-4B's README (one file at a time, ``<share>/download?path=/segTr&files=<name>``). **No
    checksums are published for these files.** So on first download each pair is checked instead (both
    files readable NIfTI, 3D, label values within {0, 1, 2}, equal shapes; a failing pair is removed),
    and the sha256 of every file is written to ``<dest>/lung250m-4b.sha256``. Later calls verify the
    files against that record, exactly as for the other dataset. This protects against corruption after
    the first download, not against a wrong file on the share.
``lung250m-4b-repo``
    Two things from github.com/multimodallearning/Lung250M-4B pinned to commit ``53598ca8…`` (raw files):
    ``evaluation/lms_validation.pth``, the 27 test cases' landmarks in each scan's original voxel frame
    (a dict ``"2"``, ``"8"``, … → ``(N, 6)`` fixed then moving; 4677 pairs), and
    ``predict_vxmpp/case_NNN.csv``, the benchmark's VoxelMorph++ (with instance optimization) keypoint
    predictions for 17 of those cases (rows ``x_f, y_f, z_f, x_m, y_m, z_m``). Checksums in the shipped
    ``lung250m-4b-repo.sha256``. No case selection: all 18 files (5 MB) come together. Chapter 6.

API
---
``fetch(dataset, dest, *, cases=None, base_url=None, networks=False, progress=True) -> list[Path]``
    Download the selected files to ``dest`` under their upstream paths (e.g.
    ``dest/dilated_vessels_10/case_032_1.nii.gz``) and return their local paths: the case pairs in the
    order asked (fixed, moving), then the files that always come along, then the networks.
    ``cases=None`` means every case pair; ids may be given as ``"032"``, ``"32"`` or ``"case_032"``.
    Files already present whose checksum matches are not downloaded again.
``base_url`` / mirrors
    ``base_url`` replaces the upstream location: the file ``path`` is fetched from
    ``f"{base_url}/{path}"``, so any static HTTP server whose root is a copy of the dataset's folder
    serves it. Without ``base_url`` the environment variable ``REGDIFF_DATA_URL``
    (unleashing-registration), ``REGDIFF_LUNG250M_URL`` (lung250m-4b) or ``REGDIFF_LUNG250M_REPO_URL``
    (lung250m-4b-repo) is used if set. pooch cannot read ``file://`` URLs; :mod:`data_download.mirror`
    serves folders on 127.0.0.1 instead.
Errors
    Everything that stops a download raises :class:`DownloadError` with a message that says what to do:
    :class:`ChecksumError` (the file, the expected and the actual hash; the file is removed),
    :class:`InvalidDataError` (lung250m-4b content check), :class:`UnknownDatasetError` and
    :class:`UnknownCaseError` (listing the valid names). An interrupted or truncated download never leaves
    a file under its final name; an unreachable host gives a message naming the variable to set.

Command line::

    python -m data_download unleashing-registration --dest data/unleashing-registration --cases 032 033
    python -m data_download lung250m-4b --dest data/lung250m-4b --base-url http://127.0.0.1:8000
    python -m data_download lung250m-4b-repo --dest data/lung250m-4b-repo
    python -m data_download.mirror ../shared/data/unleashing-registration -- make book
    python -m data_download.mirror ../shared/data/unleashing-registration \\
        REGDIFF_LUNG250M_REPO_URL=../shared/data/lung250m-4b-repo -- make book

The command prints the error message and exits with status 2 when a download fails.
"""

from data_download.core import (
    DATASETS,
    ChecksumError,
    Dataset,
    DownloadError,
    FileEntry,
    InvalidDataError,
    UnknownCaseError,
    UnknownDatasetError,
    fetch,
    file_hash,
    get_dataset,
)

__all__ = [
    "DATASETS",
    "ChecksumError",
    "Dataset",
    "DownloadError",
    "FileEntry",
    "InvalidDataError",
    "UnknownCaseError",
    "UnknownDatasetError",
    "fetch",
    "file_hash",
    "get_dataset",
]
