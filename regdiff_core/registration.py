"""Chapter 5: a two-step registration network that is inverse consistent by construction.

The paper's registration network (after Greer et al., "Inverse consistency by construction", MICCAI 2023)
registers a fixed mask A (inhale) and a moving mask B (exhale) in two greedy steps. Each step is one
MONAI ``UNet`` N, applied to both orders of the inputs:

    v_AB = smooth(0.35·tanh N(A, B) − 0.35·tanh N(B, A)),        v_BA = −v_AB   (exactly)
    φ_AB = exp(v_AB),  φ_BA = exp(v_BA) = exp(−v_AB) = φ_AB⁻¹   (scaling and squaring)

Because the velocity is antisymmetric in its inputs and the map is its exponential, φ_AB ∘ φ_BA = id
holds by construction, not by a penalty. Step 2 registers the two images after warping each half way,
A∘exp(v₁/2) and B∘exp(−v₁/2); the final map is root₁ ∘ φ₂ ∘ root₁ with root₁ = exp(v₁/2), which is
again exactly invertible by the same recipe with −v. Training is greedy, as in the seed: each step has
its own loss and optimizer, and step 2 sees step 1's midpoint-warped images without a gradient path
back into step 1. Test-time adaptation (TTA) fine-tunes copies of both networks on one test pair.

Displacement convention (the only place it is defined; everything in this package follows it)
-------------------------------------------------------------------------------------------------
* A displacement field ``ddf`` (and a velocity ``v``) has shape ``(B, dim, *spatial)`` and is in
  **voxels of the grid it lives on**.
* **Channel order = axis order**: channel ``c`` is the displacement along tensor axis ``2 + c``
  (for volumes ``(H, W, D)``: channel 0 along H, 1 along W, 2 along D). This is MONAI's order.
* **Pull-back**: ``warp(I, u)(x) = I(x + u(x))``. A map Φ_u(x) = x + u(x) with I_A ∘ φ_AB ≈ I_B, so φ_AB
  takes a point of B's space (the moving, exhale scan) to its partner in A's space (the fixed,
  inhale scan); a moving landmark m is moved to m + u_AB(m). ``compose(u_outer, u_inner)`` is the
  displacement of Φ_outer ∘ Φ_inner.
* Voxel ``i`` sits at integer index ``i``. Between grids of sizes ``S`` and ``s`` (e.g. the canonical
  256×208×256 frame and a profile's grid) points map with align_corners=False geometry:
  ``p_s = (p_S + 0.5)·s/S − 0.5`` (:func:`rescale_points`), displacements scale by ``s/S``.

MONAI's :class:`~monai.networks.blocks.Warp` and :class:`~monai.networks.blocks.DVF2DDF` use exactly this
convention (they pass voxel positions to ``grid_sample`` with ``align_corners=True``, which addresses
voxel centres by index). The seed instead keeps fields in ``grid_sample``'s normalised units with
``align_corners=False`` (−1 … 1 spans the outer voxel *edges*) and channel order reversed (x = last
axis). The network's raw output is in the seed's units — so that the paper's released weights, tanh
range 0.35 and smoothness weight λ mean the same here — and :func:`seed_to_voxel` converts it once.

Hand-written where a library has it
-----------------------------------
* :func:`warp` and :func:`exp_velocity` call ``grid_sample`` directly instead of going through MONAI's
  ``Warp``/``DVF2DDF``: same arithmetic, but ``Warp`` rebuilds its reference grid on every call and
  normalises it axis by axis, which made each warp about 3× slower than the ``grid_sample`` inside it
  on CPU — and training warps dozens of times per iteration. The tests hold ours to MONAI's
  and to the seed's ``disp_square``, both kept in :mod:`regdiff_core.reference`, within 1e-4 voxels.
* :func:`smooth_velocity`: the seed's average-pool cascade, which no library layer reproduces.
* :func:`smoothness`: MONAI's ``BendingEnergyLoss`` is second order; the paper's penalty is the mean
  squared first difference in the seed's units.

Everything is dimension-generic (2D fields ``(B, 2, H, W)`` work as 3D ones do). A grid whose sizes are
not multiples of the UNet's total stride (8) — ci's 32×26×32 — is zero-padded at its far ends for the
network and cropped back; the paper's 128×104×128 needs no padding, so paper-scale results are unaffected.

Training: :func:`greedy_iteration` is one iteration of both steps, :func:`train_registration` the run
on a regime's pairs; which pairs, where a run is kept and its model file are
:mod:`regdiff_core.store.registration`.

Differences from the authors' code (the seed) and why: one list, on the book's profiles page
(``book/profiles.md``; ``SEED_DIFFERENCES`` in ``book/_tools/bookpages.py``).

Left out on purpose: an affine pre-alignment (the paper has none; the canonical pad/crop frame aligns
the lungs roughly).
"""

from __future__ import annotations

import copy
import dataclasses
import math
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from monai.networks.nets import UNet

from regdiff_core import distributed
from regdiff_core.config import (
    RELEASE_TRAIN_CASES,
    Profile,
    RegistrationConfig,
)
from regdiff_core.training import CHECKPOINT_FILE, train_loop
from regdiff_core.utils import autocast

# --------------------------------------------------------------------------------------------------
# The displacement convention (see the module docstring) and the operations built on it.
# --------------------------------------------------------------------------------------------------


def rescale_points(points: torch.Tensor, from_shape: Sequence[int], to_shape: Sequence[int]) -> torch.Tensor:
    """Voxel coordinates on a grid of size ``from_shape`` → the same physical points on ``to_shape``.

    ``points``: (N, dim) voxel indices (float). align_corners=False geometry: voxel k of a size-S grid
    covers [k − ½, k + ½) in its own index units, so ``p_s = (p_S + 0.5)·s/S − 0.5`` per axis.
    """
    S = torch.as_tensor(tuple(from_shape), dtype=points.dtype, device=points.device)
    s = torch.as_tensor(tuple(to_shape), dtype=points.dtype, device=points.device)
    # p_s = (p_S + ½)·s/S − ½
    return (points + 0.5) * s / S - 0.5


def resize_field(ddf: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """Resample a displacement (B, dim, *S) in voxels of S to the grid ``size``, in voxels of that grid.

    Linear interpolation with align_corners=False geometry; component c is multiplied by size_c / S_c.
    """
    size = tuple(int(s) for s in size)
    sizes = tuple(ddf.shape[2:])
    if size == sizes:
        return ddf
    dim = len(sizes)
    mode = "trilinear" if dim == 3 else "bilinear"
    out = F.interpolate(ddf, size=size, mode=mode, align_corners=False)
    scale = torch.tensor([s / S for s, S in zip(size, sizes)], dtype=ddf.dtype, device=ddf.device)
    return out * scale.view(1, dim, *([1] * dim))


def seed_to_voxel(field: torch.Tensor) -> torch.Tensor:
    """Seed units → this package's convention. ``field``: (B, dim, *S), grid_sample units, channel 0 = last axis.

    grid_sample with align_corners=False maps the size-S axis onto [−1, 1], so one voxel is 2/S units:
    u_vox[c] = field[dim − 1 − c] · S_c / 2.
    """
    sizes = field.shape[2:]
    dim = len(sizes)
    scale = torch.tensor([s / 2.0 for s in sizes], dtype=field.dtype, device=field.device)
    return field.flip(1) * scale.view(1, dim, *([1] * dim))


def voxel_to_seed(ddf: torch.Tensor) -> torch.Tensor:
    """The inverse of :func:`seed_to_voxel`: (B, dim, *S) voxels → seed units (normalised, channel 0 = last axis)."""
    sizes = ddf.shape[2:]
    dim = len(sizes)
    scale = torch.tensor([2.0 / s for s in sizes], dtype=ddf.dtype, device=ddf.device)
    return (ddf * scale.view(1, dim, *([1] * dim))).flip(1)


def _identity_grid(sizes: tuple[int, ...], device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """grid_sample coordinates (align_corners=False) of every voxel centre: (1, *S, dim), last axis first."""
    key = (sizes, str(device), dtype)
    grid = _IDENTITY_CACHE.get(key)
    if grid is None:
        dim = len(sizes)
        theta = torch.eye(dim, dim + 1, device=device, dtype=dtype).unsqueeze(0)
        grid = F.affine_grid(theta, [1, 1, *sizes], align_corners=False)
        if len(_IDENTITY_CACHE) > 16:
            _IDENTITY_CACHE.clear()
        _IDENTITY_CACHE[key] = grid
    return grid


_IDENTITY_CACHE: dict[tuple, torch.Tensor] = {}


def warp(image: torch.Tensor, ddf: torch.Tensor, padding_mode: str = "zeros") -> torch.Tensor:
    """Pull-back warp ``image(x + ddf(x))`` with linear interpolation; equal to MONAI's ``Warp``.

    ``image``: (B, C, *S); ``ddf``: (B, dim, *S), voxels. Images use zero padding (the seed's default);
    displacement fields are composed with ``"border"`` padding (see :func:`compose`).

    Why not MONAI's ``Warp`` itself: it makes the same ``grid_sample`` call (voxel positions with
    align_corners=True address the same points as ours with align_corners=False) but rebuilds its
    reference grid on every call (in MONAI 1.6 its cache test compares ``(dim, *S)`` with ``*S`` and
    never hits) and normalises the grid axis by axis in place. On CPU that made each warp about 3×
    slower than the ``grid_sample`` it wraps, and training warps 50 times per step and direction.
    The tests check this function against ``Warp``, and :func:`exp_velocity` against ``DVF2DDF``.
    """
    grid = _identity_grid(tuple(ddf.shape[2:]), image.device, image.dtype)
    offset = voxel_to_seed(ddf.to(image.dtype)).movedim(1, -1)
    # trilinear for volumes (grid_sample calls it "bilinear")
    return F.grid_sample(
        image, grid + offset, mode="bilinear", padding_mode=padding_mode, align_corners=False
    )


def compose(u_outer: torch.Tensor, u_inner: torch.Tensor) -> torch.Tensor:
    """Displacement of Φ_outer ∘ Φ_inner, both (B, dim, *S) in voxels, border padding as in the seed.

    Φ_outer(Φ_inner(x)) = x + u_inner(x) + u_outer(x + u_inner(x)).
    """
    # u = u_inner + u_outer ∘ (id + u_inner)
    return u_inner + warp(u_outer, u_inner, padding_mode="border")


def exp_velocity(v: torch.Tensor, steps: int = 12) -> torch.Tensor:
    """exp(v) by scaling and squaring: u = v / 2^steps, then ``steps`` times u ← u + u∘(id + u) (border padding).

    ``v``: (B, dim, *S) stationary velocity in voxels → (B, dim, *S) displacement in voxels. The recursion
    of MONAI's ``DVF2DDF(num_steps=steps, padding_mode="border")``; the squarings run in grid_sample
    units (as the seed's ``disp_square``), which saves two conversions per squaring and changes only
    rounding (the tests hold both to 1e-4 voxels).
    """
    grid = _identity_grid(tuple(v.shape[2:]), v.device, v.dtype)
    # u₀ = v / 2^K
    w = voxel_to_seed(v) / 2**steps
    for _ in range(steps):
        # u_{k+1} = u_k + u_k(x + u_k(x))   (u_k ∘ u_k as displacements)
        w = w + F.grid_sample(
            w, grid + w.movedim(1, -1), mode="bilinear", padding_mode="border", align_corners=False
        )
    return seed_to_voxel(w)


def exp_both(v: torch.Tensor, steps: int = 12) -> tuple[torch.Tensor, torch.Tensor]:
    """(exp(v), exp(−v)) in one batched :func:`exp_velocity`: the same numbers as two calls, bit for bit.

    On a CPU ``grid_sample`` in 3D runs its batch in parallel, one sample per thread: a batch of one
    (test-time adaptation) leaves the second core idle, a batch of two does not. Every sample is computed
    on its own, so batching changes no rounding (``tests/test_registration.py`` checks equality).
    """
    return exp_velocity(torch.cat([v, -v]), steps).chunk(2)


def warp_both(
    A: torch.Tensor, B: torch.Tensor, phi_A: torch.Tensor, phi_B: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """(A∘φ_A, B∘φ_B) in one batched :func:`warp` (zero padding), equal bit for bit to two calls."""
    return warp(torch.cat([A, B]), torch.cat([phi_A, phi_B])).chunk(2)


# --------------------------------------------------------------------------------------------------
# The network.
# --------------------------------------------------------------------------------------------------


def smooth_velocity(x: torch.Tensor, kernel: int = 7) -> torch.Tensor:
    """The seed's smoothing: average pools (kernel k, strides 2, 2, 1, 1, zero padding counted), then linear upsampling.

    ``x``: (B, dim, *S) → (B, dim, *S). Linear in ``x``, so smooth(−x) = −smooth(x) exactly.
    """
    dim = x.dim() - 2
    pool = getattr(F, f"avg_pool{dim}d")
    pad = (kernel - 1) // 2
    y = x
    for stride in (2, 2, 1, 1):
        # explicit zero padding = the seed's pool(padding=pad) with count_include_pad, also for grids < k
        y = pool(F.pad(y, [pad] * (2 * dim)), kernel, stride=stride)
    mode = "trilinear" if dim == 3 else "bilinear"
    return F.interpolate(y, size=x.shape[2:], mode=mode, align_corners=False)


def _pad_to_multiple(x: torch.Tensor, multiple: int) -> tuple[torch.Tensor, tuple[int, ...]]:
    """Zero-pad the spatial axes at their far ends to a multiple of ``multiple`` (a UNet needs it)."""
    sizes = x.shape[2:]
    extra = [(-s) % multiple for s in sizes]
    if not any(extra):
        return x, tuple(sizes)
    pad: list[int] = []
    for e in reversed(extra):  # F.pad lists the last axis first
        pad += [0, e]
    return F.pad(x, pad), tuple(sizes)


class StepLoss(NamedTuple):
    """One step's loss. ``loss`` = ``l1`` + λ·``smoothness``; ``phi_AB``/``phi_BA``: (B, dim, *S), voxels."""

    loss: torch.Tensor
    l1: torch.Tensor
    smoothness: torch.Tensor
    phi_AB: torch.Tensor
    phi_BA: torch.Tensor


class Registration(NamedTuple):
    """The output of :meth:`TwoStepRegistration.register` on one grid ``S`` (all displacements in voxels of S).

    ``phi_AB``: (B, dim, *S) with A∘φ_AB ≈ B; ``phi_BA`` = its inverse by construction; ``v1``, ``v2``: the two
    steps' velocities (v_AB); ``root1`` = exp(v1/2); ``warped_A`` = A∘φ_AB, ``warped_B`` = B∘φ_BA.
    """

    phi_AB: torch.Tensor
    phi_BA: torch.Tensor
    v1: torch.Tensor
    v2: torch.Tensor
    root1: torch.Tensor
    warped_A: torch.Tensor
    warped_B: torch.Tensor


class TwoStepRegistration(nn.Module):
    """Two MONAI UNets (one per greedy step), each turned into an inverse-consistent map.

    ``spatial_dims`` 2 or 3. Inputs A, B: (B, 1, *S) float masks in [0, 1] on the registration grid.
    """

    def __init__(self, cfg: RegistrationConfig, spatial_dims: int = 3) -> None:
        super().__init__()
        self.cfg = cfg
        self.spatial_dims = spatial_dims
        self.nets = nn.ModuleList(
            UNet(
                spatial_dims=spatial_dims,
                in_channels=2,
                out_channels=spatial_dims,
                channels=tuple(cfg.channels),
                strides=tuple(cfg.strides),
            )
            for _ in range(2)
        )
        self.multiple = math.prod(cfg.strides)
        #: how many pairs it was trained on (set by :func:`train_registration` and :func:`~regdiff_core.store.registration.load_registration`)
        self.n_train_pairs: int | None = None

    def _net(self, step: int, x: torch.Tensor) -> torch.Tensor:
        x_pad, sizes = _pad_to_multiple(x, self.multiple)
        out = self.nets[step](x_pad)
        return out[(slice(None), slice(None), *(slice(0, s) for s in sizes))]

    def velocity(self, step: int, A: torch.Tensor, B: torch.Tensor, amp: bool = False) -> torch.Tensor:
        """v_AB of step ``step`` (0 or 1): (B, dim, *S) in voxels. Antisymmetric: velocity(B, A) = −velocity(A, B)."""
        c = self.cfg.tanh_scale
        with autocast(A.device, enabled=amp):
            # one batched pass over both orders: N(A, B) and N(B, A)
            out = self._net(step, torch.cat([torch.cat([A, B], 1), torch.cat([B, A], 1)], 0))
        out_AB, out_BA = out.float().chunk(2, 0)
        # v_AB = smooth(c·tanh N(A,B) − c·tanh N(B,A))   (seed units)
        v_seed = smooth_velocity(c * torch.tanh(out_AB) - c * torch.tanh(out_BA), self.cfg.smooth_kernel)
        return seed_to_voxel(v_seed)

    def step_loss(self, A: torch.Tensor, B: torch.Tensor, v: torch.Tensor) -> StepLoss:
        """The paper's loss for one step, given its velocity v = v_AB (voxels)."""
        return registration_loss(A, B, v, self.cfg.ss_steps, self.cfg.smooth_weight)

    def midpoint(
        self, A: torch.Tensor, B: torch.Tensor, v: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Warp both images half way: A∘exp(v/2), B∘exp(−v/2) (the input of the next step), no gradient."""
        with torch.no_grad():
            root_AB, root_BA = exp_both(v / 2, self.cfg.ss_steps)
            return warp_both(A, B, root_AB, root_BA)

    @torch.no_grad()
    def register(self, A: torch.Tensor, B: torch.Tensor) -> Registration:
        """Final maps φ_AB = root₁ ∘ φ₂ ∘ root₁ and φ_BA (its inverse by construction), on A's grid."""
        steps = self.cfg.ss_steps
        v1 = self.velocity(0, A, B)
        A_mid, B_mid = self.midpoint(A, B, v1)
        v2 = self.velocity(1, A_mid, B_mid)
        # both directions in one batch (the same numbers as one call each, see exp_both)
        roots = exp_velocity(torch.cat([v1 / 2, -v1 / 2]), steps)
        phi2 = exp_velocity(torch.cat([v2, -v2]), steps)
        # φ_AB = root₁ ∘ φ₂ ∘ root₁,  φ_BA = root₁⁻¹ ∘ φ₂⁻¹ ∘ root₁⁻¹
        phi_AB, phi_BA = compose(roots, compose(phi2, roots)).chunk(2)
        root1_AB = roots.chunk(2)[0]
        return Registration(phi_AB, phi_BA, v1, v2, root1_AB, *warp_both(A, B, phi_AB, phi_BA))


def smoothness(ddf: torch.Tensor) -> torch.Tensor:
    """The seed's first-order penalty: Σ over axes of mean((u(x+e) − u(x))²), with u in seed units."""
    u = voxel_to_seed(ddf)
    # R(u) = Σ_axes mean(|∂u|²)  (forward differences)
    return sum(u.diff(dim=axis).square().mean() for axis in range(2, u.dim()))


def registration_loss(
    A: torch.Tensor, B: torch.Tensor, v: torch.Tensor, steps: int, weight: float
) -> StepLoss:
    """L = |A∘φ_AB − B|₁ + |B∘φ_BA − A|₁ + λ·(R(φ_AB) + R(φ_BA)), φ_AB = exp(v), φ_BA = exp(−v). L1 = mean."""
    phi_AB, phi_BA = exp_both(v, steps)
    warped_A, warped_B = warp_both(A, B, phi_AB, phi_BA)
    l1 = F.l1_loss(warped_A, B) + F.l1_loss(warped_B, A)
    smooth = smoothness(phi_AB) + smoothness(phi_BA)
    return StepLoss(l1 + weight * smooth, l1, smooth, phi_AB, phi_BA)


def build_registration(cfg: RegistrationConfig, spatial_dims: int = 3) -> TwoStepRegistration:
    return TwoStepRegistration(cfg, spatial_dims)


# --------------------------------------------------------------------------------------------------
# Greedy training (shared by training and test-time adaptation).
# --------------------------------------------------------------------------------------------------


def registration_grid(shape: Sequence[int], scale: float) -> tuple[int, ...]:
    """The registration grid for volumes of ``shape`` at ``scale`` (paper: 256×208×256 · ½ = 128×104×128)."""
    return tuple(max(1, round(s * scale)) for s in shape)


def to_grid(x: torch.Tensor, grid: Sequence[int]) -> torch.Tensor:
    """Resample (B, C, *S) volumes to ``grid``: area averaging when shrinking (the seed's ``avg_pool3d(·, 2)``
    at a factor 2), linear interpolation (align_corners=False) when enlarging, unchanged when equal."""
    grid = tuple(grid)
    if tuple(x.shape[2:]) == grid:
        return x
    if all(g <= s for g, s in zip(grid, x.shape[2:])):
        return F.interpolate(x, size=grid, mode="area")
    mode = "trilinear" if x.dim() == 5 else "bilinear"
    return F.interpolate(x, size=grid, mode=mode, align_corners=False)


def make_optimizers(model: TwoStepRegistration, lr: float) -> list[torch.optim.Optimizer]:
    """One Adam per step's network, as in the seed."""
    return [torch.optim.Adam(net.parameters(), lr=lr) for net in model.nets]


def greedy_iteration(
    model: TwoStepRegistration,
    optimizers: Sequence[torch.optim.Optimizer],
    A: torch.Tensor,
    B: torch.Tensor,
    scaler: torch.amp.GradScaler | None = None,
    amp: bool = False,
) -> dict[str, torch.Tensor]:
    """One optimization iteration of both steps (greedy): update net 1, warp A and B half way, update net 2.

    ``A``, ``B``: (B, 1, *S) on the registration grid. Returns the per-step and total loss as 0-d tensors
    on the device (``float()`` reads one).
    """
    out: dict[str, torch.Tensor] = {}
    total: torch.Tensor | float = 0.0
    for step, opt in enumerate(optimizers):
        opt.zero_grad(set_to_none=True)
        v = model.velocity(step, A, B, amp=amp)
        terms = model.step_loss(A, B, v)
        if scaler is not None:
            scaler.scale(terms.loss).backward()
            scaler.step(opt)
            scaler.update()
        else:
            terms.loss.backward()
            opt.step()
        # tensors, left on the device: training.train_loop reads them when it logs
        out[f"loss_step{step + 1}"] = terms.loss.detach()
        out[f"l1_step{step + 1}"] = terms.l1.detach()
        out[f"smooth_step{step + 1}"] = terms.smoothness.detach()
        total = total + terms.loss.detach().double()  # in float64, as Python sums the logged floats
        if step + 1 < len(optimizers):
            # midpoint warp of the (detached) velocity: the next step's inputs
            A, B = model.midpoint(A, B, v.detach())
    out["loss"] = total
    return out


# --------------------------------------------------------------------------------------------------
# Regimes: which pairs a network is trained on.
# --------------------------------------------------------------------------------------------------

REGIMES: dict[str, str] = {
    "real_all": "all prepared real training pairs",
    "real_few": "the first n_few real training pairs (the release's 10 at paper scale)",
    "synthetic": "n_synthetic synthetic pairs from chapter 4",
    "synthetic_plus_few": "the synthetic pairs plus the few real pairs",
    "reconstructions": "the VQ-AE reconstructions of all real training pairs (an upper bound, not in the paper)",
}


def regime_runs(profile: Profile) -> dict[str, int]:
    """How many training runs (seeds) chapter 5 trains per regime of ``registration.regimes``."""
    cfg = profile.registration
    return {r: cfg.seeds if r in cfg.seed_regimes else 1 for r in cfg.regimes}


def few_cases(cases: Sequence[str], n_few: int) -> list[str]:
    """The "few real pairs": the release's training cases (032–041) first, in order, then the others; first n_few."""
    cases = list(cases)
    preferred = [c for c in RELEASE_TRAIN_CASES if c in cases] + [
        c for c in cases if c not in RELEASE_TRAIN_CASES
    ]
    return preferred[:n_few]


# --------------------------------------------------------------------------------------------------
# Training a regime, saving and loading.
# --------------------------------------------------------------------------------------------------


class RegistrationRun(NamedTuple):
    """What :func:`train_registration` returns: the trained ``model`` (eval mode), its ``grid``, the
    per-iteration ``history``, the ``seconds`` of this call."""

    model: TwoStepRegistration
    grid: tuple[int, ...]
    history: list[dict[str, float]]
    seconds: float


def train_registration(
    data: Any,
    cfg: RegistrationConfig,
    device: torch.device,
    *,
    out_dir: str | Path | None = None,
    desc: str = "registration",
    progress: bool = True,
) -> RegistrationRun:
    """Train both steps greedily (as the seed) on ``data``'s pairs for ``cfg.iterations`` iterations.

    ``data``: anything with ``cases``, ``shape`` and ``batch(index, device) -> (fixed, moving)`` — the
    :class:`~regdiff_core.store.registration.RegimeData` of a regime. Each iteration draws a random batch
    (``randperm(n)[:batch]``, as the seed), resamples it to the registration grid and runs
    :func:`greedy_iteration`. With ``out_dir``, the checkpoint (``checkpoint.pt``) and ``history.csv`` go
    there and an existing checkpoint of the same pairs and settings is resumed. The randomness (initial
    weights, batches) comes from the global RNG: seed it before the call.
    """
    out_dir = Path(out_dir) if out_dir is not None else None
    grid = registration_grid(data.shape, cfg.scale)
    model = build_registration(cfg, spatial_dims=len(data.shape)).to(device)
    optimizers = make_optimizers(model, cfg.lr)
    amp = cfg.amp and device.type == "cuda"
    scaler = torch.amp.GradScaler(device.type, enabled=amp)
    n = len(data.cases)
    batch = distributed.rank_batch(cfg.batch_size, "registration.batch_size")  # torchrun: this rank's share

    def step_fn(step: int) -> dict[str, torch.Tensor]:
        # a random batch of pairs, as the seed: randperm(n)[:batch]
        idx = torch.randperm(n)[:batch]
        fixed, moving = data.batch(idx, device)  # float32 (B, *S); synthetic pairs read from disk
        A = to_grid(fixed.unsqueeze(1), grid)
        B = to_grid(moving.unsqueeze(1), grid)
        return greedy_iteration(model, optimizers, A, B, scaler if amp else None, amp)

    # one checkpoint layout for every stage: model(s), optimizer(s), then scheduler, scaler, EMA where present
    state = {
        "model_step1": model.nets[0], "model_step2": model.nets[1],
        "optimizer_step1": optimizers[0], "optimizer_step2": optimizers[1],
    }  # fmt: skip
    if amp:
        state["scaler"] = scaler
    unwrap = distributed.wrap_each(model.nets, cfg.batch_size)  # torchrun: each network in its own DDP
    result = train_loop(
        step_fn,
        state,
        cfg.iterations,
        ckpt_path=out_dir / CHECKPOINT_FILE if out_dir is not None else None,
        ckpt_every=cfg.ckpt_every,
        log_every=cfg.log_every,
        history_csv=out_dir / "history.csv" if out_dir is not None else None,
        desc=desc,
        progress=progress,
        stage="registration",
        settings=dataclasses.asdict(cfg),
        inputs={"cases": list(data.cases), "shape": list(data.shape)},  # other pairs: set aside
    )
    unwrap()
    model.n_train_pairs = n
    model.eval()
    return RegistrationRun(model, grid, result.history, result.seconds)


def loss_rows(trained: dict[tuple[str, int], Any], seed: int, third: int) -> list[dict[str, Any]]:
    """One table row per training run ((regime, run) → a run with ``history``, ``n_pairs``, ``seconds``;
    run k used ``seed + k``): the mean loss over the middle and over the last ``third`` iterations, which
    tells a run still falling from one that has levelled off."""
    rows = []
    for (regime, run), t in trained.items():
        loss = [h["loss"] for h in t.history]
        rows.append(
            {
                "regime": regime,
                "seed": seed + run,
                "pairs": t.n_pairs,
                "middle third": sum(loss[third:-third]) / max(1, len(loss[third:-third])),
                "last third": sum(loss[-third:]) / len(loss[-third:]),
                "seconds": t.seconds,
            }
        )
    return rows


# --------------------------------------------------------------------------------------------------
# Test-time adaptation.
# --------------------------------------------------------------------------------------------------


class TTAResult(NamedTuple):
    model: TwoStepRegistration  # the adapted copy (the input model is left untouched)
    history: list[dict[str, float]]
    seconds: float


def test_time_adapt(
    model: TwoStepRegistration,
    A: torch.Tensor,
    B: torch.Tensor,
    iterations: int,
    lr: float,
    amp: bool = False,
    progress: bool = False,
) -> TTAResult:
    """Fine-tune copies of both networks on one pair (A, B): (1, 1, *S) on the registration grid.

    ``iterations`` greedy iterations with Adam(lr) per network and the training loss (paper: 50, 0.005).
    ``progress``: a tqdm bar over the iterations (removed when done).
    """
    adapted = copy.deepcopy(model).train()
    optimizers = make_optimizers(adapted, lr)
    amp = amp and A.device.type == "cuda"
    scaler = torch.amp.GradScaler(A.device.type, enabled=amp) if amp else None
    history = []
    t0 = time.perf_counter()
    steps: Any = range(iterations)
    if progress:
        from tqdm.auto import tqdm

        steps = tqdm(steps, desc="TTA", leave=False)
    for _ in steps:
        history.append(greedy_iteration(adapted, optimizers, A, B, scaler, amp))
    history = [{k: float(v) for k, v in row.items()} for row in history]  # one device sync, at the end
    return TTAResult(adapted.eval(), history, time.perf_counter() - t0)


# --------------------------------------------------------------------------------------------------
# A 2D teaching example (chapter 5; its figures are in figures/registration.py).
# --------------------------------------------------------------------------------------------------


def swirl_velocity(shape: Sequence[int], amplitude: float, sigma: float) -> torch.Tensor:
    """A 2D teaching example: a rotation about the centre fading with a Gaussian of width ``sigma`` (voxels).

    Returns (1, 2, H, W) in voxels; the largest speed is about ``amplitude`` voxels.
    """
    H, W = shape
    i, j = torch.meshgrid(
        torch.arange(H, dtype=torch.float32), torch.arange(W, dtype=torch.float32), indexing="ij"
    )
    di, dj = i - (H - 1) / 2, j - (W - 1) / 2
    # v(x) = a·e^{−|x−c|²/2σ²}·(−(x_j − c_j), x_i − c_i)/σ
    weight = amplitude * torch.exp(-(di**2 + dj**2) / (2 * sigma**2)) / sigma * math.exp(0.5)
    return torch.stack([-dj * weight, di * weight]).unsqueeze(0)
