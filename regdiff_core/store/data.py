"""Chapter 1's files: the downloaded masks and landmarks under ``data_dir``, the prepared cache under ``work_dir``.

:mod:`regdiff_core.data` holds what chapter 1 computes (binarise, dilate, crop, pad, block-reduce, the
frame maps, Dice) and the structures it returns (:class:`~regdiff_core.data.PairSet`,
:class:`~regdiff_core.data.Landmarks`, :class:`~regdiff_core.data.DataError`); this module names, reads
and writes the files, and runs the steps over them (:func:`prepare`, :func:`load_pairs`).

Layout under ``data_dir`` (downloaded by :func:`data_download.fetch`, never written otherwise)::

    unleashing-registration/                 the paper's release (RELEASE)
        dilated_vessels_10/case_NNN_{1,2}.nii.gz   10 training pairs, already dilated
        dilated_vessels_ts/case_NNN_{1,2}.nii.gz   the 27 test pairs, already dilated (TEST_FOLDER)
        lms_validation_cropped.pth                 landmarks, canonical frame (LANDMARKS_FILE)
        lung250_3d_vqae_model_dilated.pth          the paper's token grids (chapter 2, store.vqae)
        regnets_state_*.csv                        the paper's results (chapter 6, store.metrics)
    lung250m-4b/segTr/case_NNN_{1,2}.nii.gz  Lung250M-4B's 97 raw training pairs (LUNG250M), not dilated

``_1`` is inhale (fixed), ``_2`` exhale (moving); labels 0 (background), 1 (artery), 2 (vein).

Under ``work_dir``: ``prepared/{train,test}.pt``, one ``torch.save`` dict per split (:func:`prepare`):
``fixed``/``moving`` ``uint8 (N, *shape)``, ``spacing (N, 3)``, ``raw_shapes (N, 3)``,
``canonical_fraction (N, 2)``, ``cases``, ``shape``, and the bookkeeping that decides whether it is still
valid: ``format`` (:data:`CACHE_FORMAT`), ``dataset``, ``split`` and ``inputs`` (size, mtime and sha256
of every mask it was made from, :func:`input_record`). Every later chapter reads it through
:func:`load_pairs`, and the landmarks through :func:`load_landmarks`.

Kept apart from the computation so that the chapter module reads as the method: a change to a path,
a cache rule or an error message for a damaged file happens here, and the maths is tested on tensors
without touching the disk.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from regdiff_core import utils
from regdiff_core.config import ALL_TEST_CASES, RELEASE_TRAIN_CASES, case_id
from regdiff_core.data import (
    CanonicalPair,
    DataError,
    Landmarks,
    PairSet,
    binarise,
    block_factors,
    block_reduce,
    canonical_to_profile,
    dilate3,
    pad_crop_to_canonical,
    seed_crop,
)

# --------------------------------------------------------------------------------------------------
# Datasets and where their files live (paths relative to ``data_dir / <dataset>``)
# --------------------------------------------------------------------------------------------------

#: The paper's own data release: 10 training pairs, the test pairs, the landmarks, the result CSVs.
RELEASE = "unleashing-registration"
#: Lung250M-4B's raw vessel segmentations of its 97 training pairs (not dilated).
LUNG250M = "lung250m-4b"

#: Landmarks of the 27 test pairs, in the canonical frame: ``[fixed, moving]``, lists in ALL_TEST_CASES order.
LANDMARKS_FILE = "lms_validation_cropped.pth"
#: The release's test pairs (already dilated).
TEST_FOLDER = "dilated_vessels_ts"

#: Lung250M-4B has 124 pairs (000–123); the 27 with landmarks are validation/test, the other 97 train.
LUNG250M_TRAIN_CASES: tuple[str, ...] = tuple(
    f"{i:03d}" for i in range(124) if f"{i:03d}" not in ALL_TEST_CASES
)


@dataclass(frozen=True)
class DatasetLayout:
    """Where a dataset keeps its training pairs and whether they still need the one-voxel dilation."""

    train_folder: str
    dilated: bool
    train_cases: tuple[str, ...]


DATASETS: dict[str, DatasetLayout] = {
    RELEASE: DatasetLayout("dilated_vessels_10", dilated=True, train_cases=RELEASE_TRAIN_CASES),
    LUNG250M: DatasetLayout("segTr", dilated=False, train_cases=LUNG250M_TRAIN_CASES),
}

#: Increase when the cache layout changes; an older cache is then rebuilt. (2: records its input files.)
CACHE_FORMAT = 2

SPLITS = ("train", "test")


@dataclass
class PrepareResult:
    """What :func:`prepare` did. ``cached``: the splits found ready in ``work_dir`` and not redone."""

    train_path: Path
    test_path: Path
    train_cases: list[str]
    test_cases: list[str]
    shape: tuple[int, int, int]
    cached: tuple[str, ...]
    seconds: float

    @property
    def n_train(self) -> int:
        return len(self.train_cases)

    @property
    def n_test(self) -> int:
        return len(self.test_cases)


# --------------------------------------------------------------------------------------------------
# One pair on disk: read and check the masks, steps 2–6
# --------------------------------------------------------------------------------------------------


def _check_labels(array: np.ndarray, path: Path) -> None:
    """Raise :class:`DataError` unless every value of ``array`` is one of the labels 0, 1, 2."""
    if array.dtype == np.uint8:  # the common case: one fast max() decides, unique() only on failure
        if array.max(initial=0) <= 2:
            return
        outside = array > 2
        raise DataError(
            f"{path}: not a vessel label map: values {np.unique(array[outside])[:8].tolist()} outside "
            f"{{0, 1, 2}} in {int(outside.sum())} voxels"
        )
    if array.dtype.kind not in "biuf":
        raise DataError(f"{path}: not a vessel label map: data type {array.dtype} is not numeric")
    if array.dtype.kind == "f":
        non_integer = ~np.isfinite(array) | (array != np.round(array))
        if non_integer.any():
            values = np.unique(array[non_integer])[:8].tolist()
            raise DataError(
                f"{path}: not a vessel label map: non-integer values {values} in {int(non_integer.sum())} voxels "
                "(expected labels 0, 1, 2; is this an intensity image?)"
            )
    outside = (array < 0) | (array > 2)
    if outside.any():
        values = np.unique(array[outside])[:8].tolist()
        raise DataError(
            f"{path}: not a vessel label map: values {values} outside {{0, 1, 2}} in {int(outside.sum())} voxels"
        )


def load_label_volume(path: str | Path) -> tuple[np.ndarray, tuple[float, float, float]]:
    """Read a vessel segmentation: ``(array (H, W, D) as stored, spacing in mm)``; checks it holds labels.

    Raises ``FileNotFoundError`` naming the path, or :class:`DataError` for non-label data.
    """
    import nibabel as nib

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"{path}: file not found (download it with `python -m regdiff_core prepare` or `python -m data_download`)"
        )
    try:
        image = nib.load(str(path))
        array = np.asanyarray(image.dataobj)  # native dtype; get_fdata() would make a float64 copy
    except Exception as err:  # nibabel raises many kinds for a broken file (EOFError, gzip, ImageFileError)
        raise DataError(
            f"{path}: not a readable NIfTI file ({type(err).__name__}: {err}); it is truncated or not a "
            "nii.gz. Delete it and run `python -m regdiff_core prepare` again to download it afresh."
        ) from err
    if array.ndim != 3:
        raise DataError(f"{path}: expected a 3-D volume, got shape {array.shape}")
    _check_labels(array, path)
    spacing = tuple(float(z) for z in image.header.get_zooms()[:3])
    return array, spacing


def pair_paths(root: str | Path, folder: str, case: str) -> tuple[Path, Path]:
    """``(fixed, moving)`` file paths: ``root/folder/case_NNN_1.nii.gz`` (inhale), ``…_2.nii.gz`` (exhale)."""
    base = Path(root) / folder
    return base / f"case_{case}_1.nii.gz", base / f"case_{case}_2.nii.gz"


def load_canonical_pair(
    fixed_path: str | Path, moving_path: str | Path, *, case: str, dilate: bool
) -> CanonicalPair:
    """Steps 2–6 for one pair: load, check, binarise, (dilate), seed crop, pad/crop to 256×208×256.

    Raises ``FileNotFoundError`` (names the file), :class:`DataError` for non-label data or when the two
    volumes differ in shape (names both files and shapes).
    """
    fixed_path, moving_path = Path(fixed_path), Path(moving_path)
    fixed_raw, spacing = load_label_volume(fixed_path)
    moving_raw, _ = load_label_volume(moving_path)
    if fixed_raw.shape != moving_raw.shape:
        raise DataError(
            f"case {case}: fixed and moving differ in shape: {fixed_path} has {tuple(fixed_raw.shape)}, "
            f"{moving_path} has {tuple(moving_raw.shape)}"
        )
    out = []
    for raw in (fixed_raw, moving_raw):
        v = binarise(raw)
        if dilate:
            v = dilate3(v)
        out.append(pad_crop_to_canonical(seed_crop(v, case)).contiguous())
    return CanonicalPair(
        fixed=out[0],
        moving=out[1],
        spacing=torch.tensor(spacing, dtype=torch.float32),
        raw_shape=tuple(int(s) for s in fixed_raw.shape),  # type: ignore[arg-type]
    )


# --------------------------------------------------------------------------------------------------
# Splits, download, cache
# --------------------------------------------------------------------------------------------------


def split_spec(profile, split: str) -> tuple[str, str, tuple[str, ...], bool]:
    """``(dataset, folder, cases, needs_dilation)`` of a split under ``profile.data``."""
    cfg = profile.data
    if split == "train":
        if cfg.train_dataset not in DATASETS:
            raise DataError(f"unknown train_dataset {cfg.train_dataset!r}; choose one of {sorted(DATASETS)}")
        layout = DATASETS[cfg.train_dataset]
        cases = tuple(map(case_id, cfg.train_cases)) if cfg.train_cases is not None else layout.train_cases
        _check_cases(cases, layout.train_cases, f"{cfg.train_dataset} training")
        return cfg.train_dataset, layout.train_folder, cases, not layout.dilated
    if split == "test":
        cases = tuple(map(case_id, cfg.test_cases)) if cfg.test_cases is not None else ALL_TEST_CASES
        _check_cases(cases, ALL_TEST_CASES, "test (with landmarks)")
        return RELEASE, TEST_FOLDER, cases, False
    raise DataError(f"unknown split {split!r}; choose one of {SPLITS}")


def _check_cases(cases: Sequence[str], valid: Sequence[str], what: str) -> None:
    unknown = [c for c in cases if c not in valid]
    if unknown:
        raise DataError(f"{what} cases {unknown} do not exist; valid: {' '.join(valid)}")
    if len(set(cases)) != len(cases):
        raise DataError(f"{what} cases contain duplicates: {list(cases)}")
    if not cases:
        raise DataError(f"no {what} cases selected")


def prepared_path(work_dir: str | Path, split: str) -> Path:
    return Path(work_dir) / "prepared" / f"{split}.pt"


def input_record(paths: Sequence[Path], root: Path) -> dict[str, list]:
    """``{path relative to root: [size, mtime_ns, sha256]}`` of the files a split is prepared from."""
    from data_download import file_hash

    out = {}
    root = Path(root).resolve()  # the downloader returns absolute paths; data_dir may be relative
    for path in paths:
        st = path.stat()
        out[Path(path).resolve().relative_to(root).as_posix()] = [st.st_size, st.st_mtime_ns, file_hash(path)]
    return out


def _inputs_unchanged(recorded: dict[str, list], root: Path) -> bool:
    """True unless a recorded input file exists with other content. Size and mtime unchanged → unchanged
    (no hashing); otherwise the sha256 decides. A missing file says nothing (a cleaned data folder)."""
    from data_download import file_hash

    for rel, (size, mtime_ns, sha) in recorded.items():
        path = root / rel
        if not path.is_file():
            continue
        st = path.stat()
        if (st.st_size, st.st_mtime_ns) == (size, mtime_ns):
            continue
        if st.st_size != size or file_hash(path) != sha:
            return False
    return True


def prepared_metadata(work_dir: str | Path, split: str) -> dict[str, Any] | None:
    """``{"dataset", "cases", "shape"}`` of the prepared ``split`` in ``work_dir``, or None when there is none.

    Reads only the metadata (memory-mapped), so it is cheap even for the full-size cache.
    """
    path = prepared_path(work_dir, split)
    if not path.is_file():
        return None
    try:
        cached = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:
        return None
    if cached.get("format") != CACHE_FORMAT:
        return None
    return {
        "dataset": cached.get("dataset"),
        "cases": list(cached.get("cases", [])),
        "shape": tuple(int(x) for x in cached.get("shape", ())),
    }


def adopt_prepared_cases(profile, work_dir: str | Path, explicit: Sequence[str] = ()):
    """``profile`` with ``data.train_cases``/``data.test_cases`` taken from the cache in ``work_dir``.

    A prepared work folder remembers which cases ``prepare`` was asked for, so the later stages need not
    repeat ``--set data.test_cases=…``. Only splits prepared for the profile's dataset and shape are
    adopted, and never a field named in ``explicit`` (the user's own ``--set`` keys win; a mismatch then
    raises the usual clear error in :func:`load_pairs`).
    """
    overrides: dict[str, Any] = {}
    shape = tuple(int(s) for s in profile.data.shape)
    for split in SPLITS:
        key = f"data.{split}_cases"
        if key in explicit:
            continue
        meta = prepared_metadata(work_dir, split)
        if meta is None or meta["shape"] != shape or not meta["cases"]:
            continue
        dataset = profile.data.train_dataset if split == "train" else RELEASE
        if meta["dataset"] != dataset:
            continue
        try:
            wanted = list(split_spec(profile, split)[2])
        except DataError:  # the profile's own list is invalid: the cache's is what exists
            wanted = None
        if wanted != meta["cases"]:
            overrides[key] = tuple(meta["cases"])
    return profile.replace(overrides) if overrides else profile


def _cache_matches(
    path: Path, dataset: str, cases: Sequence[str], shape: Sequence[int], data_root: Path | None = None
) -> bool:
    """True when ``path`` holds this split, prepared from ``dataset``/``cases`` at ``shape`` and from input
    files (under ``data_root``, the dataset's folder) that have not changed since."""
    if not path.is_file():
        return False
    try:  # mmap: only the small metadata is read, not the volumes
        cached = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # an unreadable cache is rebuilt, not trusted
        return False
    return (
        isinstance(cached, dict)
        and cached.get("format") == CACHE_FORMAT
        and cached.get("dataset") == dataset
        and list(cached.get("cases", [])) == list(cases)
        and tuple(cached.get("shape", ())) == tuple(shape)
        and (data_root is None or _inputs_unchanged(cached.get("inputs", {}), data_root))
    )


def prepare_split(
    pairs: Sequence[tuple[str, str | Path, str | Path]],
    shape: Sequence[int],
    *,
    dilate: bool,
    progress: bool = True,
    desc: str = "prepare",
) -> dict[str, Any]:
    """Steps 2–7 for every ``(case, fixed_path, moving_path)`` of one split; returns what :func:`prepare` caches.

    Keys: ``fixed``/``moving`` ``uint8 (N, *shape)``, ``spacing (N, 3)`` mm, ``raw_shapes (N, 3)``,
    ``canonical_fraction (N, 2)`` (vessel volume fraction in the canonical frame, fixed/moving), ``cases``,
    ``shape``. Only one canonical pair is in memory at a time.
    """
    shape = tuple(int(s) for s in shape)
    block_factors(shape)
    n = len(pairs)
    fixed = torch.empty((n, *shape), dtype=torch.uint8)
    moving = torch.empty((n, *shape), dtype=torch.uint8)
    spacing = torch.empty((n, 3), dtype=torch.float32)
    raw_shapes = torch.empty((n, 3), dtype=torch.int64)
    canonical_fraction = torch.empty((n, 2), dtype=torch.float64)
    for i, (case, fixed_path, moving_path) in _progress(list(enumerate(pairs)), progress, desc):
        pair = load_canonical_pair(fixed_path, moving_path, case=case, dilate=dilate)
        fixed[i] = block_reduce(pair.fixed, shape)
        moving[i] = block_reduce(pair.moving, shape)
        spacing[i] = pair.spacing
        raw_shapes[i] = torch.tensor(pair.raw_shape)
        canonical_fraction[i, 0] = torch.count_nonzero(pair.fixed).item() / pair.fixed.numel()
        canonical_fraction[i, 1] = torch.count_nonzero(pair.moving).item() / pair.moving.numel()
    return {
        "cases": [case for case, _, _ in pairs],
        "fixed": fixed,
        "moving": moving,
        "spacing": spacing,
        "raw_shapes": raw_shapes,
        "canonical_fraction": canonical_fraction,
        "shape": shape,
    }


def _progress(items: list, enabled: bool, desc: str):
    if not enabled:
        return items
    from tqdm.auto import tqdm

    return tqdm(items, desc=desc)


def download_pairs(
    dataset: str,
    data_dir: str | Path,
    cases: Sequence[str],
    *,
    base_url: str | None = None,
    progress: bool = True,
    desc: str = "download",
) -> list[tuple[str, Path, Path]]:
    """Download (or verify) the pairs of ``cases`` into ``data_dir/dataset`` via :func:`data_download.fetch`.

    Returns ``(case, fixed_path, moving_path)`` per case. The landmarks and the paper's CSVs come along
    with every release download. A file the server lacks raises ``DownloadError`` naming the case and file.
    """
    from data_download import DownloadError, fetch  # the download package: the only code that goes online

    dest = Path(data_dir) / dataset
    pairs = []
    for case in _progress(list(cases), progress, desc):
        try:  # one case per call, so that an error can name the case
            paths = fetch(dataset, dest=dest, cases=[case], base_url=base_url, progress=False)
        except DownloadError as err:
            raise DownloadError(f"{dataset} case {case}: {err}") from err
        pairs.append((case, Path(paths[0]), Path(paths[1])))
    return pairs


def prepare(
    profile, data_dir: str | Path, work_dir: str | Path, *, base_url: str | None = None, progress: bool = True
) -> PrepareResult:
    """Download the profile's training and test pairs and cache them prepared under ``work_dir/prepared/``.

    ``base_url`` replaces the upstream URL prefix (a local mirror); ``None`` uses ``$REGDIFF_DATA_URL``
    (``$REGDIFF_LUNG250M_URL`` for lung250m-4b) or the upstream servers. A split already cached for the
    same dataset, cases and shape is skipped (and not downloaded again). Test pairs and landmarks always
    come from the paper's release.
    """
    start = time.perf_counter()
    shape = tuple(int(s) for s in profile.data.shape)
    block_factors(shape)
    data_dir, work_dir = Path(data_dir), Path(work_dir)
    cached: list[str] = []
    cases_of: dict[str, list[str]] = {}
    for split in SPLITS:
        dataset, _, cases, dilate = split_spec(profile, split)
        cases_of[split] = list(cases)
        path = prepared_path(work_dir, split)
        if _cache_matches(path, dataset, cases, shape, data_dir / dataset):
            cached.append(split)
            continue
        files = download_pairs(
            dataset, data_dir, cases, base_url=base_url, progress=progress, desc=f"download {split}"
        )
        result = prepare_split(files, shape, dilate=dilate, progress=progress, desc=f"prepare {split}")
        inputs = input_record([p for _, f, m in files for p in (f, m)], data_dir / dataset)
        result.update(format=CACHE_FORMAT, dataset=dataset, split=split, inputs=inputs)
        utils.atomic_torch_save(result, path)
    from data_download import DATASETS

    # the files that come with every release download (landmarks, the paper's CSVs and token grids):
    # fetched here too when the splits were cached but the data_dir is fresh or older than one of them
    if not all((data_dir / RELEASE / path).is_file() for path in DATASETS[RELEASE].always):
        download_pairs(RELEASE, data_dir, cases_of["test"][:1], base_url=base_url, progress=False)
    return PrepareResult(
        train_path=prepared_path(work_dir, "train"),
        test_path=prepared_path(work_dir, "test"),
        train_cases=cases_of["train"],
        test_cases=cases_of["test"],
        shape=shape,  # type: ignore[arg-type]
        cached=tuple(cached),
        seconds=time.perf_counter() - start,
    )


def load_pairs(profile, work_dir: str | Path, split: str) -> PairSet:
    """The prepared ``split`` ("train" | "test") from ``work_dir/prepared/{split}.pt`` at ``profile.data.shape``.

    Raises ``FileNotFoundError`` when chapter 1 has not run, and :class:`DataError` when the cache was
    made for another shape or other cases than the profile asks for.
    """
    if split not in SPLITS:
        raise DataError(f"unknown split {split!r}; choose one of {SPLITS}")
    path = prepared_path(work_dir, split)
    if not path.is_file():
        raise FileNotFoundError(
            f"{path}: no prepared {split} pairs; run chapter 1 (notebooks/01_data_preparation.ipynb) "
            f"or `python -m regdiff_core prepare --profile {profile.name}`"
        )
    cached = _read_prepared(path, profile)
    dataset, _, cases, _ = split_spec(profile, split)
    shape = tuple(int(s) for s in profile.data.shape)
    if (
        cached.get("format") != CACHE_FORMAT
        or tuple(cached["shape"]) != shape
        or list(cached["cases"]) != list(cases)
        or cached.get("dataset") != dataset
    ):
        raise DataError(
            f"{path} holds {cached.get('dataset')} cases {cached.get('cases')} at shape {tuple(cached.get('shape', ()))}, "
            f"but profile {profile.name!r} wants {dataset} cases {list(cases)} at {shape}; "
            f"pass the same --set data.{split}_cases=… as to prepare, or prepare these cases into another "
            f"--work-dir (`python -m regdiff_core prepare --profile {profile.name}` here replaces this cache)"
        )
    return PairSet(
        cases=list(cached["cases"]),
        fixed=cached["fixed"],
        moving=cached["moving"],
        spacing=cached["spacing"],
        raw_shapes=cached.get("raw_shapes"),
    )


def _read_prepared(path: Path, profile=None, mmap: bool = False) -> dict[str, Any]:
    """``torch.load`` of a prepared split; a damaged file is a :class:`DataError` naming it."""
    rerun = f"`python -m regdiff_core prepare --profile {profile.name if profile else '<profile>'}`"
    try:
        cached = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as err:  # truncated, or not a torch file
        raise DataError(
            f"{path}: cannot read the prepared pairs ({type(err).__name__}: {str(err).splitlines()[0]}); "
            f"the file is damaged. Run {rerun} (or chapter 1) to rebuild it."
        ) from err
    keys = ("cases", "fixed", "moving", "spacing", "shape", "canonical_fraction")
    if not isinstance(cached, dict) or any(k not in cached for k in keys):
        raise DataError(f"{path}: not a prepared split of this project (expected keys {keys}); run {rerun}")
    return cached


def load_canonical_fraction(work_dir: str | Path, split: str) -> torch.Tensor:
    """Vessel volume fraction of each prepared pair in the canonical frame, ``(N, 2)`` (fixed, moving)."""
    path = prepared_path(work_dir, split)
    return _read_prepared(path, mmap=True)["canonical_fraction"].clone()


def load_landmarks(profile, data_dir: str | Path, cases: Sequence[str] | None = None) -> Landmarks:
    """Landmarks of ``cases`` (default: ``profile.data.test_cases``, None = all 27) from the release.

    The file ``data_dir/unleashing-registration/lms_validation_cropped.pth`` holds ``[fixed, moving]``,
    each a list of 27 ``(N_i, 3)`` tensors in :data:`~regdiff_core.config.ALL_TEST_CASES` order, voxel
    indices of the canonical frame. Returned both as stored and mapped to ``profile.data.shape``.
    """
    if cases is None:
        cases = profile.data.test_cases if profile.data.test_cases is not None else ALL_TEST_CASES
    cases = [case_id(c) for c in cases]
    _check_cases(cases, ALL_TEST_CASES, "landmark")
    path = Path(data_dir) / RELEASE / LANDMARKS_FILE
    if not path.is_file():
        raise FileNotFoundError(
            f"{path}: landmark file not found; run chapter 1 or `python -m regdiff_core prepare --profile {profile.name}`"
        )
    try:
        stored = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise DataError(
            f"{path}: cannot read the landmarks ({type(err).__name__}); the file is damaged. Delete it and run "
            f"`python -m regdiff_core prepare --profile {profile.name}` to download it again."
        ) from err
    if (
        not isinstance(stored, list | tuple)
        or len(stored) != 2
        or any(len(side) != len(ALL_TEST_CASES) for side in stored)
    ):
        raise DataError(f"{path}: expected [fixed, moving], each a list of {len(ALL_TEST_CASES)} tensors")
    shape = tuple(profile.data.shape)
    out: dict[str, list[torch.Tensor]] = {"cf": [], "cm": [], "f": [], "m": []}
    for case in cases:
        i = ALL_TEST_CASES.index(case)
        canonical_fixed = torch.as_tensor(stored[0][i]).to(torch.float32)
        canonical_moving = torch.as_tensor(stored[1][i]).to(torch.float32)
        out["cf"].append(canonical_fixed)
        out["cm"].append(canonical_moving)
        out["f"].append(canonical_to_profile(canonical_fixed, shape))
        out["m"].append(canonical_to_profile(canonical_moving, shape))
    return Landmarks(
        cases=cases, fixed=out["f"], moving=out["m"], canonical_fixed=out["cf"], canonical_moving=out["cm"]
    )


__all__ = [
    "CACHE_FORMAT",
    "DATASETS",
    "LANDMARKS_FILE",
    "LUNG250M",
    "RELEASE",
    "TEST_FOLDER",
    "DatasetLayout",
    "PrepareResult",
    "adopt_prepared_cases",
    "download_pairs",
    "input_record",
    "load_canonical_fraction",
    "load_canonical_pair",
    "load_label_volume",
    "load_landmarks",
    "load_pairs",
    "pair_paths",
    "prepare",
    "prepare_split",
    "prepared_metadata",
    "prepared_path",
    "split_spec",
]
