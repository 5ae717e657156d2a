"""The references the book checks its own code against: the authors' functions, ported, and MONAI's.

Chapter 5 and ``tests/test_registration.py`` compare :func:`regdiff_core.registration.exp_velocity` and
:func:`~regdiff_core.registration.warp` (the voxel-unit versions the pipeline uses) with

- the authors' ``disp_square`` and image warp (:func:`seed_scaling_and_squaring`, :func:`seed_warp`),
  made device-agnostic and dimension-generic, in the authors' units (normalised coordinates, channel 0 =
  last axis; :func:`~regdiff_core.registration.voxel_to_seed` converts);
- MONAI's ``DVF2DDF`` and ``Warp`` (:func:`monai_exp_velocity`, :func:`monai_warp`).

Nothing in the pipeline calls these; they live apart so that a chapter module holds only what it runs.
"""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F
from monai.networks.blocks import DVF2DDF, Warp


def monai_exp_velocity(v: torch.Tensor, steps: int = 12) -> torch.Tensor:
    """The same exponential with MONAI's ``DVF2DDF`` (border padding), for the tests."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*Using PyTorch native grid_sample.*")
        layer = DVF2DDF(num_steps=steps, mode="bilinear", padding_mode="border")
    return layer(v)


def monai_warp(image: torch.Tensor, ddf: torch.Tensor, padding_mode: str = "zeros") -> torch.Tensor:
    """MONAI's ``Warp`` (bilinear), for the tests."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*Using PyTorch native grid_sample.*")
        layer = Warp(mode="bilinear", padding_mode=padding_mode)
    return layer(image, ddf)


def _seed_identity(field: torch.Tensor) -> torch.Tensor:
    B, dim = field.shape[:2]
    theta = torch.eye(dim, dim + 1, dtype=field.dtype, device=field.device).unsqueeze(0).expand(B, -1, -1)
    return F.affine_grid(theta, [B, 1, *field.shape[2:]], align_corners=False)


def seed_scaling_and_squaring(field: torch.Tensor, steps: int = 12) -> torch.Tensor:
    """The seed's ``disp_square`` made device-agnostic and dimension-generic; seed units in and out.

    Kept only as the reference the tests compare :func:`exp_velocity` with.
    """
    grid = _seed_identity(field)
    perm = [0, *range(2, field.dim()), 1]
    u = field / 2**steps
    for _ in range(steps):
        u = F.grid_sample(u, u.permute(perm) + grid, align_corners=False, padding_mode="border") + u
    return u


def seed_warp(image: torch.Tensor, field: torch.Tensor) -> torch.Tensor:
    """The seed's image warp: ``grid_sample(image, field + identity, align_corners=False)``, seed units."""
    perm = [0, *range(2, field.dim()), 1]
    return F.grid_sample(image, field.permute(perm) + _seed_identity(field), align_corners=False)
