"""The figure modules draw from small made-up inputs, and the chapter modules stay free of plotting."""

import ast
from pathlib import Path
from types import SimpleNamespace

import matplotlib
import pytest
import torch

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from regdiff_core import figures  # noqa: E402
from regdiff_core import registration as reg  # noqa: E402

CHAPTERS = ("data", "vqae", "diffusion", "sampling", "registration", "metrics")
PACKAGE = Path(__file__).resolve().parents[1] / "regdiff_core"


@pytest.fixture(autouse=True)
def _close_figures():
    yield
    plt.close("all")


@pytest.mark.parametrize("chapter", CHAPTERS)
def test_chapter_modules_do_not_import_plotting_libraries(chapter):
    tree = ast.parse((PACKAGE / f"{chapter}.py").read_text())
    imported = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            imported.update(a.name.split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            imported.add(node.module.split(".")[0])
            if node.module.startswith("regdiff_core.figures"):
                imported.add("regdiff_core.figures")
    assert not imported & {"matplotlib", "ipywidgets", "regdiff_core.figures"}


def test_central_slab_matches_the_notebooks_former_inline_slabs():
    for w in (52, 104, 208):
        assert figures.data.central_slab(w, 1 / 4) == (w // 2 - w // 8, w // 2 + w // 8)
        assert figures.data.central_slab(w) == (w // 2 - w // 16, w // 2 + w // 16)


def test_pair_figures_draw():
    g = torch.Generator().manual_seed(0)
    fixed, moving = (torch.rand(8, 6, 8, generator=g) > 0.7 for _ in range(2))
    figures.data.plot_slices(fixed, moving, axis=1)
    figures.data.plot_landmarks(fixed, torch.tensor([[1.0, 3.0, 2.0]]), slab=(2, 4))
    figures.data.plot_vessel_fractions({"profile": torch.rand(2, 2)}, ["001", "002"])
    probs = torch.rand(4, 2, 8, 6, 8, generator=g)
    fig = figures.diffusion.plot_fill_in_decoded(probs, [0.1, 0.5, 1.0], "001")
    assert fig.axes[1].get_title().startswith("10% masked: Dice")
    fig = figures.registration.plot_before_after(fixed.float(), moving.float(), fixed.float(), "001")
    assert [ax.get_title() for ax in fig.axes] == ["case 001: before", "after: A∘φ_AB and B"]


def test_training_figures_draw():
    history = [
        {"step": s, "loss": 1.0 / s, "dice": 0.5, "elbo": 3.0 - s / 10, "accuracy": s / 20}
        for s in range(1, 9)
    ]
    for h in history[1::2]:
        h["perplexity"] = 4.0
    figures.vqae.plot_history(history)
    fig = figures.vqae.plot_restart_perplexity({False: history, True: history}, 4, 16)
    assert len(fig.axes[0].lines) == 3
    figures.diffusion.plot_loss_weights(8)
    curve = [
        {"steps": s, "elbo": 2.0, "accuracy": 0.3, "ema_elbo": 1.9, "ema_accuracy": 0.35} for s in (4, 8)
    ]
    fig = figures.diffusion.plot_denoiser_training(history, curve, 2, 2.5, 0.1, ema=True)
    assert len(fig.axes[0].lines) == 4
    fills = {r: SimpleNamespace(accuracy=1 - r) for r in (0.1, 0.5, 1.0)}
    figures.diffusion.plot_fill_in(fills, {r: 0.1 for r in fills})
    losses = [{"step": s, "loss_step1": 1.0 / s, "loss_step2": 0.5 / s} for s in range(1, 21)]
    trained = {
        ("real_all", 0): SimpleNamespace(history=losses),
        ("real_all", 1): SimpleNamespace(history=losses),
    }
    fig = figures.registration.plot_step_losses(trained)
    assert len(fig.axes[0].lines) == 2  # the first run only: raw and smoothed
    fig = figures.metrics.plot_tta_curves(
        {"real_all": {0: 3.0, 10: 2.5}, "synthetic": {0: 3.2, 10: 2.6}}, "t"
    )
    assert [line.get_label() for line in fig.axes[0].lines] == ["real_all", "synthetic"]


def test_field_figures_draw():
    v = reg.swirl_velocity((16, 16), amplitude=2.0, sigma=4.0)
    phi, phi_inv = reg.exp_velocity(v, 6), reg.exp_velocity(-v, 6)
    root, root_inv = reg.exp_velocity(v / 2, 6), reg.exp_velocity(-v / 2, 6)
    assert len(figures.registration.plot_swirl(v, phi, phi_inv, root, root_inv).axes) == 5
    assert len(figures.registration.plot_compositions(phi, phi_inv, root).axes) == 2
    field = 0.1 * torch.randn(3, 8, 6, 8, generator=torch.Generator().manual_seed(0))
    fig = figures.registration.plot_map_slice(field, torch.ones(8, 6, 8), 3)
    assert fig.axes[0].get_title() == "φ_AB, slice W = 3 (in-plane part)"
