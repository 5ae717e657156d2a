"""Chapter 5's figures: 2D fields as deformed grids and arrows, slices of 3D maps."""

from __future__ import annotations

import matplotlib.pyplot as plt
import torch

from regdiff_core.figures.data import central_slab, plot_mip_overlay
from regdiff_core.registration import compose


def show_slice(ax, image, **kwargs):
    """``imshow`` of a 2D array (U, V) with U across and V upwards (chapter 1's orientation)."""
    image = image.detach().cpu().float().numpy() if isinstance(image, torch.Tensor) else image
    return ax.imshow(image.T, origin="lower", interpolation="nearest", **kwargs)


def plot_deformed_grid(
    ax, ddf: torch.Tensor, step: int = 4, color: str = "C0", linewidth: float = 0.7
) -> None:
    """Draw x ↦ x + u(x) of a 2D field ``ddf`` (2, U, V) in voxels as grid lines (U across, V upwards).

    Under the pull-back convention the drawn lines are where each grid point of the target samples the
    source image.
    """
    u = ddf.detach().cpu().float()
    U, V = u.shape[1:]
    ii, jj = torch.meshgrid(
        torch.arange(U, dtype=torch.float32), torch.arange(V, dtype=torch.float32), indexing="ij"
    )
    pu, pv = (ii + u[0]).numpy(), (jj + u[1]).numpy()
    for r in list(range(0, U, step)) + [U - 1]:
        ax.plot(pu[r], pv[r], color=color, lw=linewidth)
    for c in list(range(0, V, step)) + [V - 1]:
        ax.plot(pu[:, c], pv[:, c], color=color, lw=linewidth)
    ax.set_xlim(-0.5, U - 0.5)
    ax.set_ylim(-0.5, V - 0.5)
    ax.set_aspect("equal")


def plot_velocity(ax, v: torch.Tensor, step: int = 4, color: str = "C3") -> None:
    """Arrows of a 2D field ``v`` (2, U, V) in voxels, every ``step`` voxels (U across, V upwards), to scale."""
    v = v.detach().cpu().float()
    U, V = v.shape[1:]
    ii, jj = torch.meshgrid(torch.arange(0, U, step), torch.arange(0, V, step), indexing="ij")
    sub = v[:, ::step, ::step]
    ax.quiver(ii, jj, sub[0], sub[1], angles="xy", scale_units="xy", scale=1, color=color, width=0.004)
    ax.set_xlim(-0.5, U - 0.5)
    ax.set_ylim(-0.5, V - 0.5)
    ax.set_aspect("equal")


def slice_field(ddf: torch.Tensor, axis: int, index: int) -> torch.Tensor:
    """The in-plane components of a 3D field (3, H, W, D) on slice ``index`` of ``axis`` → (2, ·, ·)."""
    keep = [c for c in range(3) if c != axis]
    return ddf.select(axis + 1, index)[keep]


def plot_swirl(
    v: torch.Tensor, phi: torch.Tensor, phi_inv: torch.Tensor, root: torch.Tensor, root_inv: torch.Tensor
):
    """The 2D velocity ``v`` (1, 2, U, V) as arrows, then the maps exp(v), exp(−v), exp(v/2) and exp(−v/2)
    (each (1, 2, U, V)) as deformed grids."""
    fig, axes = plt.subplots(1, 5, figsize=(17, 3.7))
    plot_velocity(axes[0], v[0], step=4)
    for ax, field, title in zip(
        axes[1:],
        (phi, phi_inv, root, root_inv),
        ("φ = exp(v)", "φ⁻¹ = exp(−v)", "√φ = exp(v/2)", "√φ⁻¹ = exp(−v/2)"),
    ):
        plot_deformed_grid(ax, field[0], step=4)
        ax.set_title(title)
    axes[0].set_title("velocity v (voxels, to scale)")
    plt.tight_layout()
    return fig


def plot_compositions(phi: torch.Tensor, phi_inv: torch.Tensor, root: torch.Tensor):
    """φ ∘ φ⁻¹ (should be the identity) and √φ ∘ √φ (should be φ) as deformed grids; fields (1, 2, U, V)."""
    fig, axes = plt.subplots(1, 2, figsize=(7.5, 3.7))
    plot_deformed_grid(axes[0], compose(phi, phi_inv)[0], step=4)
    axes[0].set_title("φ ∘ φ⁻¹ ≈ identity")
    plot_deformed_grid(axes[1], compose(root, root)[0], step=4, color="C2")
    axes[1].set_title("√φ ∘ √φ ≈ φ")
    plt.tight_layout()
    return fig


def plot_step_losses(trained: dict):
    """The loss of step 1 and step 2 against the iteration for the first run of each regime (``trained``:
    (regime, run) → :class:`~regdiff_core.store.registration.TrainedRegistration`): raw, faint, and a running
    mean over a tenth of the run."""
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.4))
    first_runs = {r: t for (r, run), t in trained.items() if run == 0}
    for i, (regime, result) in enumerate(first_runs.items()):
        steps = [h["step"] for h in result.history]
        for ax, key in zip(axes, ("loss_step1", "loss_step2")):
            values = torch.tensor([h[key] for h in result.history])
            k = max(1, len(values) // 10)
            smooth = torch.nn.functional.avg_pool1d(
                values.view(1, 1, -1), k, 1, padding=k // 2, count_include_pad=False
            )
            ax.plot(steps, values, color=f"C{i}", alpha=0.25)
            ax.plot(steps, smooth.flatten()[: len(steps)], color=f"C{i}", label=regime)
    for ax, title in zip(axes, ("step 1", "step 2 (after the midpoint warp)")):
        ax.set_xlabel("iteration")
        ax.set_ylabel("L1 + λ·smoothness")
        ax.set_title(title)
    axes[0].legend(fontsize=8)
    plt.tight_layout()
    return fig


def plot_before_after(fixed: torch.Tensor, moving: torch.Tensor, warped: torch.Tensor, case: str):
    """MIPs over the central quarter of W, side by side: the pair before registration (``fixed``, ``moving``)
    and ``warped`` (the fixed mask warped by φ_AB) with ``moving`` after; masks (H, W, D)."""
    slab = central_slab(fixed.shape[1], 1 / 4)
    fig, axes = plt.subplots(1, 2, figsize=(10, 4.5))
    plot_mip_overlay(fixed, moving, axis=1, slab=slab, ax=axes[0], title=f"case {case}: before")
    plot_mip_overlay(warped, moving, axis=1, slab=slab, ax=axes[1], title="after: A∘φ_AB and B")
    plt.tight_layout()
    return fig


def plot_map_slice(phi: torch.Tensor, det: torch.Tensor, index: int):
    """Slice ``index`` of W of a 3D map: its in-plane part ``phi`` (3, H, W, D) as a deformed grid (left) and
    its Jacobian determinant ``det`` (H, W, D) in colour (right)."""
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5))
    plot_deformed_grid(axes[0], slice_field(phi, axis=1, index=index), step=2)
    axes[0].set_title(f"φ_AB, slice W = {index} (in-plane part)")
    im = show_slice(axes[1], det.select(1, index), cmap="RdBu_r", vmin=0, vmax=2)
    fig.colorbar(im, ax=axes[1], label="det(I + ∇u)")
    axes[1].set_title("Jacobian determinant")
    for ax in axes:
        ax.set_xlabel("H (voxels)")
        ax.set_ylabel("D (voxels)")
    plt.tight_layout()
    return fig
