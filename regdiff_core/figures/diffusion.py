"""Chapter 3's figures: token grids (one colour per code, grey = masked) and the denoiser's training."""

from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np
import torch

from regdiff_core.data import dice
from regdiff_core.figures.data import central_slab, plot_mip_overlay


def token_slice_rgb(x: torch.Tensor, mask_id: int, axis: int = 1, index: int | None = None):
    """One slice of a token grid (h, w, d) as an RGB image (v, u, 3) for ``imshow(origin="lower")``:
    each code gets a colour of ``tab20`` (cycled, so colours repeat every 20 codes); masked = light grey."""
    x = x.detach().cpu()
    index = x.shape[axis] // 2 if index is None else index
    s = np.take(x.numpy(), index, axis=axis)
    rgb = plt.get_cmap("tab20")(s % 20)[..., :3]
    rgb[s == mask_id] = 0.85
    return np.swapaxes(rgb, 0, 1)


def plot_token_grids(grids, titles, mask_id: int, axis: int = 1, size: float = 2.0):
    """Middle slices of several token grids (h, w, d) side by side; grey = masked.

    Titles at 12 pt: the figure is scaled down to the page's width, where 9 pt was too small to read.
    """
    fig, axes = plt.subplots(1, len(grids), figsize=(size * len(grids), size * 1.1), constrained_layout=True,
                             squeeze=False)  # fmt: skip
    for ax, x, title in zip(axes[0], grids, titles):
        ax.imshow(token_slice_rgb(x, mask_id, axis), origin="lower", interpolation="nearest")
        ax.set_title(title, fontsize=12)
        ax.set_xticks([])
        ax.set_yticks([])
    return fig


def plot_loss_weights(T: int):
    """The weight of a masked token's cross-entropy at each time t = 1/T … 1: the ELBO's 1/t against the
    seed's reweighted 1 − t (log scale)."""
    t_grid = torch.arange(1, T + 1) / T
    fig, ax = plt.subplots(figsize=(5.5, 3.4))
    ax.semilogy(t_grid, 1 / t_grid, label="ELBO: 1/t")
    ax.semilogy(t_grid[:-1], 1 - t_grid[:-1], label="reweighted (seed): 1 − t")
    ax.set_xlabel("t (share of tokens masked)")
    ax.set_ylabel("weight per masked token")
    ax.set_title(f"T = {T} time steps")
    ax.legend()
    return fig


def plot_denoiser_training(
    history: list[dict[str, float]],
    curve: list[dict[str, float]],
    window: int,
    entropy: float,
    mode_accuracy: float,
    ema: bool,
):
    """ELBO (left) and accuracy on masked tokens (right) against the step: the training grids' values as a
    running mean over ``window`` steps, the held-out ``curve`` of :func:`~regdiff_core.store.diffusion.train_tracked`
    with raw (and, if ``ema``, EMA) weights, and the baselines ``entropy`` (bits/token of the code
    histogram) and ``mode_accuracy`` (always guessing the most frequent code) as dashed lines."""
    steps = np.array([r["step"] for r in history])
    elbo, acc = (np.array([r[k] for r in history]) for k in ("elbo", "accuracy"))
    kernel = np.ones(window) / window
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.8), constrained_layout=True)
    axes[0].plot(steps[window - 1 :], np.convolve(elbo, kernel, "valid"), color="C0", alpha=0.6,
                 label=f"training grids (mean of {window} steps)")  # fmt: skip
    c_steps = [r["steps"] for r in curve]
    axes[0].plot(c_steps, [r["elbo"] for r in curve], "o-", color="C1", label="held out, raw weights")
    axes[1].plot(c_steps, [r["accuracy"] for r in curve], "o-", color="C1", label="held out, raw weights")
    if ema:
        axes[0].plot(c_steps, [r["ema_elbo"] for r in curve], "s-", color="C2", label="held out, EMA weights")
        axes[1].plot(
            c_steps, [r["ema_accuracy"] for r in curve], "s-", color="C2", label="held out, EMA weights"
        )
    axes[0].axhline(entropy, color="grey", ls="--", label="code histogram (entropy)")
    axes[0].set(xlabel="step", ylabel="ELBO (bits per token)", ylim=(0, None))
    axes[1].plot(
        steps[window - 1 :], np.convolve(acc, kernel, "valid"), color="C0", alpha=0.6, label="training grids"
    )
    axes[1].axhline(mode_accuracy, color="grey", ls="--", label="most frequent code")
    axes[1].set(xlabel="step", ylabel="accuracy on masked tokens", ylim=(0, 1))
    for ax in axes:
        ax.legend(fontsize=9)
    return fig


def plot_fill_in(fills: dict, baseline: dict[float, float]):
    """Accuracy on the masked tokens against the share masked: the denoiser's argmax fill-in (``fills``:
    ratio → :class:`~regdiff_core.diffusion.FillIn`) and the most-frequent-token guess (``baseline``)."""
    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    ax.plot(list(fills), [f.accuracy for f in fills.values()], "o-", label="denoiser (argmax)")
    ax.plot(list(baseline), list(baseline.values()), "s--", label="most frequent token")
    ax.set(xlabel="share of tokens masked", ylabel="accuracy on masked tokens", ylim=(0, 1))
    ax.legend()
    return fig


def plot_fill_in_decoded(probs: torch.Tensor, ratios: list[float], case: str):
    """A 2×2 grid of decoded pairs, fixed blue / moving orange over the central eighth of W: ``probs[0]``
    decoded from the true tokens, ``probs[k]`` from the grid filled in at ``ratios[k - 1]`` masked, titled
    with its Dice (fixed / moving) against the first."""
    slab = central_slab(probs.shape[3])  # a thin coronal slab: single vessels, not the lung's outline
    fig, axes = plt.subplots(2, 2, figsize=(7.5, 7.2))
    for k, ax in enumerate(axes.flat):
        d = dice(probs[k] > 0.5, probs[0] > 0.5, dims=(1, 2, 3))
        title = (
            "true tokens" if k == 0 else f"{100 * ratios[k - 1]:.0f}% masked: Dice {d[0]:.2f} / {d[1]:.2f}"
        )
        plot_mip_overlay(probs[k, 0], probs[k, 1], slab=slab, ax=ax)
        ax.set_title(title, fontsize=12)
        ax.set(xticks=[], yticks=[])
    fig.suptitle(f"test pair {case}, decoded; maximum projection over W in [{slab[0]}, {slab[1]})")
    fig.tight_layout()
    return fig
