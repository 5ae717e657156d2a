"""Chapter 6's figures: TRE box plots and the paper's claim, this run against the paper."""

from __future__ import annotations

from collections.abc import Sequence

import matplotlib.pyplot as plt
import torch

from regdiff_core.metrics import REGIME_LABELS, Evaluation, seed_spread


def plot_tre_boxes(ax, evaluations: dict[str, Evaluation], initial: torch.Tensor | None = None) -> None:
    """Box plots of per-landmark TRE (mm): initial, then each model's network and TTA results."""
    data, labels = [], []
    if initial is not None:
        data.append(initial.numpy())
        labels.append("initial")
    for name, ev in evaluations.items():
        data.append(torch.cat([c.net.tre for c in ev.cases]).numpy())
        short = name.replace("_plus_", "+").replace("reconstructions", "recon.")
        labels.append(f"{short}\nnetwork")
        if ev.cases and ev.cases[0].tta is not None:
            data.append(torch.cat([c.tta.tre for c in ev.cases]).numpy())
            labels.append(f"{short}\n+ TTA")
    ax.boxplot(data, showfliers=False)
    ax.set_xticks(range(1, len(labels) + 1), labels, fontsize=8, rotation=45, ha="right")
    ax.set_ylabel("TRE (mm)")
    ax.grid(axis="y", alpha=0.3)


def plot_claim(
    axes, ours: dict[str, float], paper: dict[str, float], initial: tuple[float, float],
    titles: tuple[str, str] = ("this run", "the paper"), seeds: dict[str, Sequence[float]] | None = None,
) -> None:  # fmt: skip
    """The network column of this run (``axes[0]``) and of the paper (``axes[1]``) as bars, best regime first.

    ``ours``/``paper``: regime → mean TRE (mm); ``initial``: (ours, paper) TRE before registration, drawn as a
    dashed line; ``seeds``: regime → this run's per-seed values, drawn as black dots with a bar of ± one
    sample standard deviation. Each panel keeps its own scale: the point is the order of the bars, not their
    height.
    """
    for k, (ax, values, before, title) in enumerate(zip(axes, (ours, paper), initial, titles)):
        names = sorted(values, key=values.get)
        colors = [f"C{list(REGIME_LABELS).index(n)}" if n in REGIME_LABELS else "C7" for n in names]
        ax.bar(range(len(names)), [values[n] for n in names], color=colors)
        for i, n in enumerate(names):
            runs = list((seeds or {}).get(n, [])) if k == 0 else []
            top = values[n]
            if len(runs) > 1:
                spread = seed_spread(runs)
                ax.errorbar(i, spread.mean, yerr=spread.std, color="k", capsize=4, lw=1)
                ax.plot([i] * len(runs), runs, "k.", ms=6)
                top = max(max(runs), spread.mean + spread.std)
            ax.text(i + 0.05, top, f"{values[n]:.2f}", ha="center", va="bottom", fontsize=10)
        ax.axhline(before, color="k", ls="--", lw=1)
        ax.text(-0.4, before, f"initial {before:.2f}", ha="left", va="bottom", fontsize=10)
        ax.set_xticks(range(len(names)), [n.replace("_plus_", "+\n").replace("reconstructions", "recon-\nstructions")
                                          for n in names], fontsize=10)  # fmt: skip
        ax.set_ylim(0, before * 1.12)
        ax.set(ylabel="mean TRE, network alone (mm)", title=title)


def plot_tta_curves(curves: dict[str, dict[int, float]], title: str):
    """Mean TRE (mm) against the number of TTA steps, one line per regime (``curves``: regime → steps → TRE,
    from :func:`~regdiff_core.metrics.tta_curve`), in the regime's colour."""
    fig, ax = plt.subplots(figsize=(7, 3.8))
    for r, c in curves.items():
        ax.plot(list(c), list(c.values()), "o-", color=f"C{list(REGIME_LABELS).index(r)}", label=r)
    ax.set(xlabel="TTA steps", ylabel="mean TRE (mm)", title=title)
    ax.legend(fontsize=9)
    return fig
