"""Chapter 1: from downloaded lung-vessel masks to cached, canonical-frame tensors at the profile's size.

The pipeline, one function per step (``prepare`` runs them all and caches the result):

1. **download** through :func:`data_download.fetch` (this module never touches the network itself);
2. **load** each inhale/exhale pair with nibabel and check it: both files exist, both have the same
   shape, and both hold label data (integers in {0, 1, 2}) — :func:`load_label_volume`;
3. **binarise** with ``> 0`` (artery and vein labels become one "vessel" class, as in the paper);
4. **dilate** raw Lung250M-4B segmentations once by the 18-neighbourhood (:func:`dilate3`: the 3×3×3
   cube without its 8 corners, the element the paper's release was dilated with). The release
   (``dilated_vessels_*``) is dilated already and is *not* dilated a second time;
5. **crop** case 035 to its first 280 slices along the last axis (:func:`seed_crop`; the seed does the
   same because that scan is far longer than the others);
6. **pad/crop** to the seed's canonical 256×208×256 frame (:func:`pad_crop_to_canonical`, the one
   place this formula lives; the seed copied it into five scripts). The landmarks are voxel indices in
   this frame;
7. **resample** to ``profile.data.shape`` by block reduction (:func:`block_reduce`): a profile voxel
   covers the canonical voxels ``[k·f, (k+1)·f)`` and is a vessel if *any* of them is one;
8. **cache** ``uint8`` tensors, case ids and voxel spacings in ``work_dir/prepared/{train,test}.pt``.

Conventions: fixed = inhale (``case_NNN_1``), moving = exhale (``case_NNN_2``). Volumes are indexed
``(H, W, D)`` in the files' voxel order; landmark coordinates use the same order. Spacing is in mm per
canonical voxel (≈ 1 mm; we do not resample to exactly 1 mm because the landmarks were defined on the
voxel grid, not in mm).

Left out on purpose:

- **No intensity CT.** The paper's generative model and registration work on vessel masks only.
- **No resampling to isotropic spacing.** The released masks are already ≈1 mm; the landmarks are voxel
  indices of exactly these grids, so any resampling would have to be applied to them as well.
- **No interpolation-based downsampling.** Trilinear or mean-then-threshold resampling erases vessels
  thinner than half a block; see :func:`block_reduce`.

Hand-written where a library has it: the dilation (:func:`dilate3`) is scipy's ``binary_dilation`` with
``generate_binary_structure(3, 2)`` (the 18-neighbourhood), but runs on ``uint8`` torch tensors as six
1-D maxima (the element is the union of three 3×3 squares, each separable), several times faster on a CPU.
The paper's README says "kernel 3x3x3", but its released masks are 18-neighbourhood dilations: each one
is unchanged by an opening with that element and loses 4–10 % of its voxels under an opening with the
full cube (``tests/test_data.py`` checks this on the release's own masks).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from regdiff_core import utils
from regdiff_core.config import ALL_TEST_CASES, CANONICAL_SHAPE, RELEASE_TRAIN_CASES, case_id

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

#: The seed crops these cases along the last axis before padding (case → number of slices kept).
SEED_CROP: dict[str, int] = {"035": 280}

#: Increase when the cache layout changes; an older cache is then rebuilt. (2: records its input files.)
CACHE_FORMAT = 2

SPLITS = ("train", "test")


class DataError(ValueError):
    """Input data that cannot be used as it is: wrong labels, mismatched shapes, unknown cases, stale cache."""


# --------------------------------------------------------------------------------------------------
# Public results
# --------------------------------------------------------------------------------------------------


@dataclass
class PairSet:
    """Paired vessel volumes at one resolution.

    ``fixed``/``moving``: ``(N, H, W, D)``, ``uint8`` in {0, 1} for real pairs (float probabilities allowed
    for synthetic ones); fixed = inhale (``_1``), moving = exhale (``_2``).
    ``spacing``: ``(N, 3)`` mm per *canonical* voxel, from the nii headers (≈ 1.0).
    ``raw_shapes``: ``(N, 3)`` shape of each pair as stored in its file (``None`` for synthetic pairs).
    """

    cases: list[str]
    fixed: torch.Tensor
    moving: torch.Tensor
    spacing: torch.Tensor
    raw_shapes: torch.Tensor | None = None

    def __len__(self) -> int:
        return len(self.cases)

    def volumes(self, index: Any = None, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """``(N or len(index), 2, H, W, D)`` in ``dtype``, channels (fixed, moving)."""
        fixed = self.fixed if index is None else self.fixed[index]
        moving = self.moving if index is None else self.moving[index]
        if fixed.dim() == 3:  # a single integer index
            fixed, moving = fixed[None], moving[None]
        return torch.stack((fixed, moving), dim=1).to(dtype)


@dataclass
class Landmarks:
    """Landmark pairs of the test cases. Coordinates ``(N_i, 3)`` float, voxel indices ``(i_H, i_W, i_D)``.

    ``fixed``/``moving`` are at the profile's resolution (``profile.data.shape``, via
    :func:`canonical_to_profile`); ``canonical_*`` are as stored, in the canonical 256×208×256 frame.
    """

    cases: list[str]
    fixed: list[torch.Tensor]
    moving: list[torch.Tensor]
    canonical_fixed: list[torch.Tensor]
    canonical_moving: list[torch.Tensor]

    def __len__(self) -> int:
        return len(self.cases)

    def initial_tre(self) -> torch.Tensor:
        """Per-case mean distance ``‖fixed − moving‖`` before registration, ``(n_cases,)``, canonical voxels (≈ mm)."""
        return torch.stack(
            [(f - m).norm(dim=-1).mean() for f, m in zip(self.canonical_fixed, self.canonical_moving)]
        )


@dataclass
class CanonicalPair:
    """One pair after steps 2–6: ``fixed``/``moving`` ``uint8 (256, 208, 256)``; ``spacing (3,)`` mm;
    ``raw_shape``: the shape stored in the file (before the seed's crop and the pad/crop)."""

    fixed: torch.Tensor
    moving: torch.Tensor
    spacing: torch.Tensor
    raw_shape: tuple[int, int, int]


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
# Steps 2–7 on single volumes
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


def binarise(labels: np.ndarray | torch.Tensor) -> torch.Tensor:
    """``labels > 0`` as ``uint8`` {0, 1}: arteries (1) and veins (2) become one vessel class."""
    if isinstance(labels, np.ndarray):  # numpy's comparison + a bool→uint8 view is the fastest route
        return torch.from_numpy(np.greater(labels, 0).view(np.uint8))
    return (labels > 0).to(torch.uint8)


def dice(a: torch.Tensor, b: torch.Tensor, dims: int | tuple[int, ...] | None = None) -> torch.Tensor:
    """Dice 2|A∩B| / (|A| + |B|) of two masks (bool; any other dtype counts nonzero as inside), reduced
    over ``dims`` (default: all) → float64; 1 where both masks are empty. The one Dice of the book:
    every chapter calls this (or :func:`dice_from_counts`, for overlaps counted another way)."""
    a, b = a.bool(), b.bool()
    dims = tuple(range(a.ndim)) if dims is None else dims
    return dice_from_counts((a & b).sum(dims), a.sum(dims), b.sum(dims))


def dice_from_counts(overlap: torch.Tensor, size_a: torch.Tensor, size_b: torch.Tensor) -> torch.Tensor:
    """Dice from voxel counts (|A∩B|, |A|, |B|, broadcastable) → float64; 1 where |A| + |B| = 0."""
    total = size_a.double() + size_b.double()
    return torch.where(total > 0, 2 * overlap.double() / total.clamp(min=1), torch.ones_like(total))


def _max3(volume: torch.Tensor, axis: int) -> torch.Tensor:
    """1-D maximum of each voxel and its two neighbours along ``axis`` (zero outside the volume)."""
    n = volume.shape[axis]
    res = volume.clone()
    if n < 2:
        return res
    # res[k] = max(v[k-1], v[k], v[k+1])
    res.narrow(axis, 1, n - 1).copy_(torch.maximum(res.narrow(axis, 1, n - 1), volume.narrow(axis, 0, n - 1)))
    res.narrow(axis, 0, n - 1).copy_(torch.maximum(res.narrow(axis, 0, n - 1), volume.narrow(axis, 1, n - 1)))
    return res


def dilate3(volume: torch.Tensor) -> torch.Tensor:
    """Binary dilation by the 18-neighbourhood over the last three axes (zero outside the volume).

    The structuring element is the 3×3×3 cube without its 8 corners (offsets with at least one zero
    coordinate; scipy's ``generate_binary_structure(3, 2)``), the element the paper's release was
    dilated with. It is the union of the three axis-aligned 3×3 squares, so the result is
    ``max(sq_HW, sq_HD, sq_WD)``, each square two separable 1-D maxima; works on ``uint8``.
    ``volume``: ``(..., H, W, D)``; returns the same shape and dtype.
    """
    along = {axis: _max3(volume, axis) for axis in (-3, -2, -1)}
    # δ_18(v) = max(δ_W δ_H v, δ_D δ_H v, δ_D δ_W v)
    out = _max3(along[-3], -2)
    out = torch.maximum(out, _max3(along[-3], -1))
    return torch.maximum(out, _max3(along[-2], -1))


def seed_crop(volume: torch.Tensor, case: str) -> torch.Tensor:
    """The seed's one special case: keep only the first ``SEED_CROP[case]`` slices of the last axis.

    Case 035 is 451 slices long in the last axis (the others ≤ 353); the seed cuts it to 280 before
    padding. Other cases pass through unchanged.
    """
    depth = SEED_CROP.get(case)
    if depth is None or volume.shape[-1] <= depth:
        return volume
    return volume[..., :depth]


def canonical_padding(shape: Sequence[int]) -> tuple[int, int, int, int, int, int]:
    """The seed's pad/crop amounts ``(h1, h2, w1, w2, d1, d2)`` for a volume of ``shape = (H, W, D)``.

    Negative values crop. ``H + h1 + h2 = 256``, ``W + w1 + w2 = 208``, ``D + d1 + d2 = 256`` for every shape.
    """
    H, W, D = (int(s) for s in shape[-3:])
    # h1, w1, d1 = (352 − H)//2 − 48, (256 − W)//2 − 32, (352 − D)//2 − 48
    h1, w1, d1 = (352 - H) // 2 - 48, (256 - W) // 2 - 32, (352 - D) // 2 - 48
    # h2, w2, d2 = 352 − H − h1 − 96, 256 − W − w1 − 48, 352 − D − d1 − 96
    h2, w2, d2 = 352 - H - h1 - 96, 256 - W - w1 - 48, 352 - D - d1 - 96
    return h1, h2, w1, w2, d1, d2


def original_to_canonical(coords: Any, shape: Sequence[int]) -> torch.Tensor:
    """Voxel coordinates ``(..., 3)`` of a scan of ``shape = (H, W, D)`` moved into the canonical frame:
    plus the pad/crop offset ``(h1, w1, d1)`` of :func:`canonical_padding` (float64, not rounded).

    The release's ``lms_validation_cropped.pth`` holds Lung250M-4B's original-frame landmarks moved so
    and rounded down, minus those that fall outside the frame (chapter 6's tests check it).
    """
    h1, _, w1, _, d1, _ = canonical_padding(shape)
    coords = torch.as_tensor(coords).double()
    if coords.shape[-1:] != (3,):
        raise ValueError(f"coordinates must have shape (..., 3), got {tuple(coords.shape)}")
    return coords + torch.tensor([h1, w1, d1], dtype=torch.float64)


def pad_crop_to_canonical(volume: torch.Tensor) -> torch.Tensor:
    """Pad with zeros / crop the last three axes ``(H, W, D)`` into the canonical 256×208×256 frame.

    The one implementation of the seed's formula (:func:`canonical_padding`); the landmarks live in
    this frame. ``volume``: ``(..., H, W, D)`` any dtype → ``(..., 256, 208, 256)``.
    """
    h1, h2, w1, w2, d1, d2 = canonical_padding(volume.shape)
    out = F.pad(volume, (d1, d2, w1, w2, h1, h2))  # F.pad lists the last axis first
    assert tuple(out.shape[-3:]) == CANONICAL_SHAPE, out.shape
    return out


def block_factors(shape: Sequence[int]) -> tuple[int, int, int]:
    """Integer block size per axis from the canonical frame to ``shape``; raises if it does not divide."""
    shape = tuple(int(s) for s in shape)
    if len(shape) != 3 or any(s <= 0 or S % s for s, S in zip(shape, CANONICAL_SHAPE)):
        raise DataError(
            f"profile shape {shape} must divide the canonical frame {CANONICAL_SHAPE} axis by axis "
            "(e.g. (128, 104, 128) or (64, 52, 64))"
        )
    return tuple(S // s for s, S in zip(shape, CANONICAL_SHAPE))  # type: ignore[return-value]


def block_reduce(volume: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
    """Resample canonical ``(..., 256, 208, 256)`` to ``(..., *shape)``: each output voxel = max over its block.

    Geometry (align_corners=False): output voxel ``k`` covers canonical voxels ``[k·f, (k+1)·f)``, so its
    centre sits at canonical ``(k + 0.5)·f − 0.5`` — the same map as :func:`canonical_to_profile`.

    Why the maximum ("any vessel in the block") and not the mean, trilinear, or nearest: a vessel one or
    two voxels across fills only ``1/f`` to ``2/f`` of a block's cross-section, so mean-then-threshold at
    0.5 deletes it, and nearest-neighbour keeps it only when it passes the sampled voxel. Small vessels
    are most of the tree (and most landmarks sit on them), so we keep them at the price of vessels that
    look up to one block thicker; the notebook shows the vessel fraction this adds. Works on ``uint8``
    masks and on float probabilities alike.
    """
    f = block_factors(shape)
    if f == (1, 1, 1):
        return volume
    lead = volume.shape[:-3]
    s = tuple(int(x) for x in shape)
    blocks = volume.reshape(*lead, s[0], f[0], s[1], f[1], s[2], f[2])
    n = len(lead)
    return blocks.amax(dim=(n + 1, n + 3, n + 5))


def canonical_to_profile(coords: Any, shape: Sequence[int]) -> torch.Tensor:
    """Map voxel coordinates ``(..., 3)`` from the canonical 256×208×256 frame to a grid of ``shape``.

    Per axis, with canonical size ``S`` and profile size ``s`` (voxel centres, align_corners=False):
    ``p = (i + 0.5) · s / S − 0.5``. Returns a float tensor (float32 unless ``coords`` is float64).
    """
    coords = _as_float(coords)
    scale = torch.tensor([s / S for s, S in zip(shape, CANONICAL_SHAPE)], dtype=coords.dtype)
    # p = (i + 0.5) · s / S − 0.5
    return (coords + 0.5) * scale - 0.5


def profile_to_canonical(coords: Any, shape: Sequence[int]) -> torch.Tensor:
    """Inverse of :func:`canonical_to_profile`: ``i = (p + 0.5) · S / s − 0.5`` per axis."""
    coords = _as_float(coords)
    scale = torch.tensor([S / s for s, S in zip(shape, CANONICAL_SHAPE)], dtype=coords.dtype)
    # i = (p + 0.5) · S / s − 0.5
    return (coords + 0.5) * scale - 0.5


def _as_float(coords: Any) -> torch.Tensor:
    coords = torch.as_tensor(coords)
    if not coords.is_floating_point():
        coords = coords.to(torch.float32)
    if coords.shape[-1:] != (3,):
        raise ValueError(f"coordinates must have shape (..., 3), got {tuple(coords.shape)}")
    return coords


# --------------------------------------------------------------------------------------------------
# Pairs on disk
# --------------------------------------------------------------------------------------------------


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


def vessel_fraction(pairs: PairSet) -> torch.Tensor:
    """Share of vessel voxels per pair, ``(N, 2)`` (fixed, moving); for probabilities, their mean."""
    dims = (1, 2, 3)
    return torch.stack(
        (pairs.fixed.to(torch.float64).mean(dim=dims), pairs.moving.to(torch.float64).mean(dim=dims)), dim=1
    )


def landmark_hit_rate(
    volumes: torch.Tensor, points: Sequence[torch.Tensor], shift: Sequence[int] = (0, 0, 0), radius: int = 0
) -> float:
    """Share of landmarks with a vessel voxel within ``radius`` voxels (Euclidean) of their rounded position.

    ``volumes``: ``(N, H, W, D)`` masks; ``points``: N tensors ``(N_i, 3)`` of voxel coordinates in those
    volumes; ``shift`` moves every point by whole voxels first (positions are clamped to the volume).
    A frame check: the share should be highest at ``shift = (0, 0, 0)``.
    """
    r = torch.arange(-radius, radius + 1)
    ball = torch.stack(torch.meshgrid(r, r, r, indexing="ij"), -1).reshape(-1, 3)
    ball = ball[ball.pow(2).sum(-1) <= radius**2]
    upper = torch.tensor(volumes.shape[1:]) - 1
    hits = total = 0
    for volume, p in zip(volumes, points):
        q = (p.round().long() + torch.as_tensor(shift))[:, None, :] + ball[None]
        q = torch.minimum(q.clamp(min=0), upper)
        hits += int((volume[q[..., 0], q[..., 1], q[..., 2]] > 0).any(dim=1).sum())
        total += len(p)
    return hits / max(total, 1)


def shapes_table(pairs: PairSet, split: str) -> list[dict[str, Any]]:
    """One row per pair: case, split, raw shape (and the seed's crop), pad/crop per axis, spacing.

    Narrow enough for the page: the canonical and profile shapes, the same in every row, are left to the
    text. A negative pad crops; ``H + h1 + h2 = 256`` and alike (:func:`canonical_padding`).
    """
    rows = []
    for i, case in enumerate(pairs.cases):
        raw = tuple(int(s) for s in pairs.raw_shapes[i]) if pairs.raw_shapes is not None else None
        cropped = raw if raw is None or case not in SEED_CROP else (*raw[:2], min(raw[2], SEED_CROP[case]))
        pad = canonical_padding(cropped) if cropped else None
        shown = "×".join(map(str, raw)) if raw else None
        if raw and cropped != raw:
            shown += f" (D cut to {cropped[2]})"
        rows.append(
            {
                "case": case,
                "split": split,
                "raw shape": shown,
                "pad H (h1, h2)": pad[0:2] if pad else None,
                "pad W (w1, w2)": pad[2:4] if pad else None,
                "pad D (d1, d2)": pad[4:6] if pad else None,
                # spaces around ×: a narrow column wraps between numbers, never inside one
                "spacing (mm)": " × ".join(f"{float(s):.4f}" for s in pairs.spacing[i]),
            }
        )
    return rows


__all__ = [
    "CanonicalPair",
    "DataError",
    "Landmarks",
    "PairSet",
    "PrepareResult",
    "block_reduce",
    "canonical_padding",
    "canonical_to_profile",
    "dice",
    "dice_from_counts",
    "dilate3",
    "load_canonical_pair",
    "load_label_volume",
    "load_landmarks",
    "load_pairs",
    "pad_crop_to_canonical",
    "prepare",
    "profile_to_canonical",
    "seed_crop",
    "landmark_hit_rate",
    "vessel_fraction",
]
