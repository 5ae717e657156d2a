"""Chapter 1: from downloaded lung-vessel masks to cached, canonical-frame tensors at the profile's size.

The pipeline, one function per step (:func:`regdiff_core.store.data.prepare` runs them all and caches
the result). This module holds what the steps compute and the structures they return (:class:`PairSet`,
:class:`Landmarks`, :class:`CanonicalPair`, :class:`DataError`); the files — the datasets' layout, the
download, reading the masks and landmarks, the prepared cache and :func:`~regdiff_core.store.data.load_pairs`
— are in :mod:`regdiff_core.store.data`:

1. **download** through :func:`data_download.fetch` (:func:`~regdiff_core.store.data.download_pairs`;
   the book never touches the network itself);
2. **load** each inhale/exhale pair with nibabel and check it: both files exist, both have the same
   shape, and both hold label data (integers in {0, 1, 2}) —
   :func:`~regdiff_core.store.data.load_label_volume`, :func:`~regdiff_core.store.data.load_canonical_pair`;
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
8. **cache** ``uint8`` tensors, case ids and voxel spacings in ``work_dir/prepared/{train,test}.pt``
   (:mod:`regdiff_core.store.data`).

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

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from regdiff_core.config import CANONICAL_SHAPE

#: The seed crops these cases along the last axis before padding (case → number of slices kept).
SEED_CROP: dict[str, int] = {"035": 280}


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


# --------------------------------------------------------------------------------------------------
# Steps 2–7 on single volumes
# --------------------------------------------------------------------------------------------------


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
# Checks of prepared pairs and landmarks
# --------------------------------------------------------------------------------------------------


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
    "block_reduce",
    "canonical_padding",
    "canonical_to_profile",
    "dice",
    "dice_from_counts",
    "dilate3",
    "pad_crop_to_canonical",
    "profile_to_canonical",
    "seed_crop",
    "landmark_hit_rate",
    "vessel_fraction",
]
