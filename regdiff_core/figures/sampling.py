"""Chapter 4's figures: the sampler unmasking a grid (strip and animation), real against synthetic pairs,
and the memorisation check."""

from __future__ import annotations

from collections.abc import Sequence

import matplotlib.pyplot as plt
import numpy as np
from matplotlib import animation

from regdiff_core.figures.data import central_slab, overlay_rgb, plot_mip_overlay, projection
from regdiff_core.figures.diffusion import token_slice_rgb
from regdiff_core.sampling import Memorisation, UnmaskingFrame


def plot_memorisation(check: Memorisation):
    """The three Dice distributions of a :class:`Memorisation` as a strip plot on [0, 1]."""
    groups = {
        "synthetic → nearest training": check.synthetic.dice,
        "real → nearest other training": check.real.dice,
        "VQ-AE copy → its original": check.copy_dice,
    }
    fig, ax = plt.subplots(figsize=(8, 3.2), constrained_layout=True)
    for k, d in enumerate(groups.values()):
        ax.scatter(d.numpy(), k + np.linspace(-0.15, 0.15, len(d)), s=14)
    ax.set_yticks(range(len(groups)), list(groups))
    ax.set_xlabel("pair Dice (fixed and moving masks together)")
    ax.set_xlim(0, 1)
    return fig


def plot_unmasking_strip(
    frames: Sequence[UnmaskingFrame], mask_id: int, axis: int = 1, suptitle: str | None = None
):
    """Static strip: for each frame the token grid's middle slice (top, grey = masked) and the decoded
    guess of x_0 as a maximum-intensity projection, fixed blue / moving orange (bottom)."""
    # at most 4 frames per row: 8 frames in one row made every label unreadably small at the page's width
    n = len(frames)
    per_row = min(n, 4)
    rows = -(-n // per_row)
    fig, axes = plt.subplots(
        2 * rows, per_row, figsize=(2.3 * per_row, 2.4 * 2 * rows), constrained_layout=True, squeeze=False
    )
    for ax in axes.flat:
        ax.set_axis_off()
    for k, frame in enumerate(frames):
        top, bottom = axes[2 * (k // per_row), k % per_row], axes[2 * (k // per_row) + 1, k % per_row]
        top.set_axis_on()
        bottom.set_axis_on()
        top.imshow(token_slice_rgb(frame.x_t, mask_id, axis), origin="lower", interpolation="nearest")
        top.set_title(f"step {frame.step}: {100 * frame.unmasked:.0f}% unmasked", fontsize=11)
        plot_mip_overlay(frame.probs[0], frame.probs[1], axis=axis, ax=bottom)
        for ax in (top, bottom):
            ax.set_xticks([])
            ax.set_yticks([])
            ax.set_xlabel("")
            ax.set_ylabel("")
        if k % per_row == 0:
            top.set_ylabel("tokens (slice)", fontsize=11)
            bottom.set_ylabel("decoded guess (MIP)", fontsize=11)
    if suptitle:
        fig.suptitle(suptitle, fontsize=11)
    return fig


def unmasking_animation(frames: Sequence[UnmaskingFrame], mask_id: int, axis: int = 1) -> str:
    """The frames as an HTML/JavaScript player with a step slider (``FuncAnimation.to_jshtml``).

    Unlike an ipywidgets slider, it keeps working in the static book: every frame is embedded.
    """
    fig, (ax_t, ax_v) = plt.subplots(1, 2, figsize=(7, 3.4), constrained_layout=True)
    first = frames[0]
    im_t = ax_t.imshow(token_slice_rgb(first.x_t, mask_id, axis), origin="lower", interpolation="nearest")

    def mip(frame: UnmaskingFrame) -> np.ndarray:
        return np.swapaxes(
            overlay_rgb(projection(frame.probs[0], axis), projection(frame.probs[1], axis)), 0, 1
        )

    im_v = ax_v.imshow(mip(first), origin="lower", interpolation="nearest")
    for ax in (ax_t, ax_v):
        ax.set_xticks([])
        ax.set_yticks([])
    ax_v.set_title("decoded guess of x_0 (MIP)")

    def draw(k: int):
        frame = frames[k]
        im_t.set_data(token_slice_rgb(frame.x_t, mask_id, axis))
        im_v.set_data(mip(frame))
        ax_t.set_title(f"tokens after step {frame.step} ({100 * frame.unmasked:.0f}% unmasked)")
        return im_t, im_v

    anim = animation.FuncAnimation(fig, draw, frames=len(frames), interval=400, blit=False)
    html = anim.to_jshtml(default_mode="once")
    plt.close(fig)
    return html


def plot_gallery(
    real,
    synthetic,
    n: int = 3,
    axis: int = 1,
    threshold: float | None = None,
    slab: tuple[int, int] | None = None,
):
    """Real pairs (top row) above synthetic pairs (bottom), fixed blue / moving orange: maximum-intensity
    projections along ``axis`` over ``slab`` (default: the central eighth, as in chapter 2; a thin slab
    shows single vessels, the whole volume only the lung's outline). ``real``/``synthetic``: ``PairSet``;
    ``threshold`` binarises first. Sized so that the page shows it at about its natural size."""
    n = min(n, len(real), len(synthetic))
    slab = slab if slab is not None else central_slab(real.fixed.shape[1 + axis])
    fig, axes = plt.subplots(2, n, figsize=(2.7 * n, 5.6), squeeze=False)
    for row, (label, pairs) in enumerate((("real", real), ("synthetic", synthetic))):
        for k in range(n):
            f, m = pairs.fixed[k].float(), pairs.moving[k].float()
            if threshold is not None:
                f, m = (f > threshold).float(), (m > threshold).float()
            plot_mip_overlay(f, m, axis=axis, slab=slab, ax=axes[row, k], title=f"{label} {pairs.cases[k]}")
    fig.suptitle(f"maximum projection over slab {slab[0]}–{slab[1]} of axis {axis}")
    fig.tight_layout()
    return fig
