"""Chapter 2's figures: training history, reconstructions, motion kept and codebook usage of the VQ-AE."""

from __future__ import annotations

import matplotlib.pyplot as plt
import torch

from regdiff_core.figures.data import central_slab, plot_mip_overlay
from regdiff_core.vqae import MotionKept, Tokens, codebook_stats


def plot_codebook_comparison(token_sets: dict[str, Tokens], axes=None):
    """Side by side, for each token set: the share of tokens taken by each code, codes sorted by
    frequency (log scale), the x axis the whole codebook. Returns the figure."""
    if axes is None:
        _, axes = plt.subplots(1, len(token_sets), figsize=(5.5 * len(token_sets), 3.2), sharey=True)
    for ax, (name, t) in zip(list(axes), token_sets.items()):
        counts = torch.bincount(t.tokens.flatten(), minlength=t.codebook_size).sort(descending=True).values
        share = counts.double() / counts.sum()
        stats = codebook_stats(counts)
        ax.bar(range(stats.used), share[: stats.used].numpy(), width=1.0)  # unused codes have no bar
        ax.set(yscale="log", xlim=(-0.5, t.codebook_size - 0.5), xlabel="code (sorted by frequency)")
        ax.set_title(f"{name}: {stats.used} of {t.codebook_size} codes, perplexity {stats.perplexity:.1f}")
    list(axes)[0].set_ylabel("share of tokens")
    fig = list(axes)[0].figure
    fig.tight_layout()
    return fig


def plot_motion_kept(cases, kept: MotionKept, ax=None):
    """Per pair: Dice(fixed, moving) of inputs and reconstructions, and the motion contrast of both."""
    axes = ax if ax is not None else plt.subplots(1, 2, figsize=(9.5, 3.4))[1]
    idx = torch.arange(len(cases))
    for a, (vin, vrec), title in zip(
        axes,
        ((kept.pair_inputs, kept.pair_recon), (kept.contrast_inputs, kept.contrast_recon)),
        ("Dice(fixed, moving): higher = more alike", "motion contrast: 0 = motion lost"),
    ):
        a.bar(idx - 0.2, vin, 0.4, label="inputs", color="C0")
        a.bar(idx + 0.2, vrec, 0.4, label="reconstructions", color="C1")
        a.set_xticks(idx, list(cases), rotation=90 if len(cases) > 8 else 0, fontsize=9)
        a.set_ylim(0, 1)
        a.set_title(title)
    axes[0].legend(loc="lower right", fontsize=9)
    return axes


def plot_history(history: list[dict[str, float]], title: str = "VQ-AE training", axes=None):
    """Loss, training Dice and codebook perplexity against the step. Returns the matplotlib figure."""
    if axes is None:
        fig, axes = plt.subplots(1, 3, figsize=(10, 3.2))
    fig = axes[0].figure
    steps = [h["step"] for h in history]
    axes[0].plot(steps, [h["loss"] for h in history], lw=0.8)
    axes[0].set(xlabel="step", ylabel="loss", title="loss (CE + 0.1·codebook)", yscale="log")
    axes[1].plot(steps, [h["dice"] for h in history], lw=0.8)
    axes[1].set(xlabel="step", ylabel="Dice", title="training-patch Dice", ylim=(0, 1))
    logged = [h for h in history if "perplexity" in h]
    axes[2].plot([h["step"] for h in logged], [h["perplexity"] for h in logged], marker=".")
    axes[2].set(xlabel="step", ylabel="perplexity", title="codebook perplexity per window")
    fig.suptitle(title)
    fig.tight_layout()
    return fig


def plot_reconstructions(
    inputs: torch.Tensor,
    probs: torch.Tensor,
    cases: list[str],
    dice_scores=None,
    n: int = 3,
    axis: int = 1,
    slab: tuple[int, int] | None = None,
):
    """Input pairs (top) above their reconstructions P(vessel) > 0.5 (bottom): maximum-intensity
    projections along ``axis`` over ``slab`` (default: the central eighth; a thin slab shows single
    vessels, the whole volume only the lung's outline), fixed blue and moving orange as in the paper.
    Returns the figure."""
    n = min(n, inputs.shape[0])
    slab = slab if slab is not None else central_slab(inputs.shape[2 + axis])
    fig, axes = plt.subplots(2, n, figsize=(3.4 * n, 6.4), squeeze=False)
    for i in range(n):
        x, recon = inputs[i], (probs[i] > 0.5).float()
        plot_mip_overlay(x[0], x[1], axis=axis, slab=slab, ax=axes[0, i], title=f"case {cases[i]}: input")
        score = "" if dice_scores is None else f" (Dice {float(dice_scores[i].mean()):.2f})"
        plot_mip_overlay(
            recon[0], recon[1], axis=axis, slab=slab, ax=axes[1, i], title=f"reconstruction{score}"
        )
    fig.suptitle(f"maximum projection over slab {slab[0]}–{slab[1]} of axis {axis}")
    fig.tight_layout()
    return fig


def plot_codebook_usage(tokens: torch.Tensor, codebook_size: int, ax=None):
    """Histogram of how often each code occurs in ``tokens``, codes sorted by frequency. Returns the figure."""
    if ax is None:
        _, ax = plt.subplots(figsize=(7, 3))
    counts = torch.bincount(tokens.flatten(), minlength=codebook_size).sort(descending=True).values
    ax.bar(range(codebook_size), counts.numpy(), width=1.0)
    ax.set(yscale="log", xlabel="code (sorted by frequency)", ylabel="occurrences")
    used = int((counts > 0).sum())
    ax.set_title(f"{used} of {codebook_size} codes occur in {tokens.numel()} tokens")
    ax.figure.tight_layout()
    return ax.figure


def plot_restart_perplexity(histories: dict[bool, list[dict[str, float]]], step: int, codebook_size: int):
    """Codebook perplexity per logging window of the runs without and with dead-code restarts
    (``histories``: restarts on? → training history), a dotted line at the ``step`` the table compares."""
    fig, ax = plt.subplots(figsize=(6, 3.2))
    for restart in (False, True):
        logged = [h for h in histories[restart] if "perplexity" in h]
        label = "with restarts" if restart else "without restarts (authors' code)"
        ax.plot([h["step"] for h in logged], [h["perplexity"] for h in logged], marker=".", label=label)
    ax.axvline(step, color="0.6", lw=0.8, ls=":", label=f"step {step}: the table's comparison")
    ax.set(xlabel="step", ylabel="perplexity", yscale="log", title=f"codebook of {codebook_size} codes")
    ax.legend()
    return fig
