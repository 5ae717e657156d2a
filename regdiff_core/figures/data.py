"""Chapter 1's figures: maximum-intensity projections, slices, landmarks and vessel fractions of pairs.

Images: the projected/sliced axes are shown with the lower-numbered remaining axis horizontal and the
other one vertical, origin at the bottom left, so a voxel index (u, v) is drawn at x = u, y = v and
landmark scatters line up with the pixels. Fixed (inhale) is blue, moving (exhale) orange, in every
chapter. Later chapters' figures reuse :func:`plot_mip_overlay`, :func:`projection`,
:func:`overlay_rgb` and :func:`central_slab`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import matplotlib.pyplot as plt
import numpy as np
import torch

from regdiff_core.data import PairSet

FIXED_COLOR = (0.122, 0.467, 0.706)  # matplotlib's "tab:blue"
MOVING_COLOR = (1.0, 0.498, 0.055)  # "tab:orange"
AXIS_NAMES = ("H", "W", "D")


def _np(volume: Any) -> np.ndarray:
    if isinstance(volume, torch.Tensor):
        volume = volume.detach().to("cpu", torch.float32).numpy()
    return np.asarray(volume, dtype=np.float32)


def projection(
    volume: Any, axis: int = 1, slab: tuple[int, int] | None = None, mode: str = "max"
) -> np.ndarray:
    """Maximum (or ``mode="mean"``) projection of ``(H, W, D)`` along ``axis`` over ``slab = [start, stop)``."""
    v = _np(volume)
    if slab is not None:
        v = np.take(v, np.arange(*slab), axis=axis)
    return v.max(axis=axis) if mode == "max" else v.mean(axis=axis)


def central_slab(size: int, fraction: float = 1 / 8) -> tuple[int, int]:
    """``[start, stop)`` of a slab ``fraction`` of ``size`` thick (at least 1) around the middle of an axis."""
    half = max(1, round(size * fraction / 2))
    return size // 2 - half, size // 2 + half


def overlay_rgb(fixed_2d: np.ndarray, moving_2d: np.ndarray, alpha: float = 0.85) -> np.ndarray:
    """White background, fixed in blue, moving in orange on top (half transparent): ``(u, v, 3)`` in [0, 1]."""
    rgb = np.ones((*fixed_2d.shape, 3), dtype=np.float32)
    a_f = np.clip(fixed_2d, 0, 1)[..., None] * alpha
    rgb = rgb * (1 - a_f) + np.array(FIXED_COLOR) * a_f
    a_m = np.clip(moving_2d, 0, 1)[..., None] * alpha * 0.6
    return rgb * (1 - a_m) + np.array(MOVING_COLOR) * a_m


def _imshow(ax, image: np.ndarray, axis: int, **kwargs) -> None:
    u, v = (a for a in range(3) if a != axis)
    # rows of `image` index axis u; transpose so that u runs horizontally and v vertically, upwards
    ax.imshow(np.swapaxes(image, 0, 1), origin="lower", interpolation="nearest", **kwargs)
    ax.set_xlabel(f"{AXIS_NAMES[u]} (voxels)")
    ax.set_ylabel(f"{AXIS_NAMES[v]} (voxels)")


def _new_ax(ax, figsize=(5, 5)):

    if ax is None:
        _, ax = plt.subplots(figsize=figsize)
    return ax


def plot_mip_overlay(
    fixed: Any,
    moving: Any,
    axis: int = 1,
    slab: tuple[int, int] | None = None,
    ax=None,
    title: str | None = None,
    mode: str = "max",
):
    """Maximum-intensity projections of a pair overlaid: fixed (inhale) blue, moving (exhale) orange.

    ``fixed``/``moving``: ``(H, W, D)`` masks or probabilities. ``slab``: project only ``[start, stop)``
    along ``axis`` (a thin slab shows single vessels; the whole volume shows the lung's outline).
    """
    ax = _new_ax(ax)
    image = overlay_rgb(projection(fixed, axis, slab, mode), projection(moving, axis, slab, mode))
    _imshow(ax, image, axis)
    if title:
        ax.set_title(title)
    return ax


def plot_landmarks(
    volume: Any,
    points: Any,
    axis: int = 1,
    slab: tuple[int, int] | None = None,
    ax=None,
    title: str | None = None,
    color: Any = "crimson",
    size: float = 12,
):
    """Vessel MIP (grey) with the landmarks ``points (N, 3)`` (voxel indices of ``volume``) on top.

    With ``slab``, only the landmarks whose coordinate along ``axis`` lies in ``[start, stop)`` are drawn,
    so each dot sits on the slab's vessels it belongs to.
    """
    ax = _new_ax(ax)
    _imshow(ax, projection(volume, axis, slab), axis, cmap="Greys", vmin=0, vmax=1.5)
    p = _np(points).reshape(-1, 3)
    if slab is not None:
        p = p[(p[:, axis] >= slab[0] - 0.5) & (p[:, axis] < slab[1] - 0.5)]
    u, v = (a for a in range(3) if a != axis)
    ax.scatter(
        p[:, u],
        p[:, v],
        s=size,
        c=[color] if isinstance(color, str) else color,
        edgecolors="white",
        linewidths=0.5,
    )
    if title:
        ax.set_title(title)
    return ax


def plot_vessel_fractions(fractions: dict[str, Any], cases: Sequence[str], ax=None, title: str | None = None):
    """Grouped bars of vessel volume fractions (%) per case.

    ``fractions``: label → ``(N, 2)`` (fixed, moving) fractions in [0, 1], one row per case. Fixed bars
    are blue, moving bars orange; each label gets its own hatch.
    """
    ax = _new_ax(ax, figsize=(10, 3.5))
    n_groups = len(fractions) * 2
    width = 0.8 / n_groups
    x = np.arange(len(cases))
    hatches = ["", "//", "..", "xx"]
    for g, (label, values) in enumerate(fractions.items()):
        values = _np(values).reshape(len(cases), 2) * 100
        for c, (name, color) in enumerate((("fixed", FIXED_COLOR), ("moving", MOVING_COLOR))):
            k = 2 * g + c
            ax.bar(x + (k - (n_groups - 1) / 2) * width, values[:, c], width, color=color,
                   hatch=hatches[g % len(hatches)], edgecolor="white", label=f"{name}, {label}")  # fmt: skip
    ax.set_xticks(x, list(cases))
    ax.set_xlabel("case")
    ax.set_ylabel("vessel voxels (%)")
    ax.set_ylim(0, ax.get_ylim()[1] * 1.3)  # room for the legend above the bars
    ax.legend(fontsize="small", ncols=2, loc="upper right")
    if title:
        ax.set_title(title)
    return ax


def slice_image(fixed: Any, moving: Any, axis: int, index: int, view: str = "overlay") -> np.ndarray:
    """One slice of a pair as RGB ``(u, v, 3)``: ``view`` = "fixed" (blue), "moving" (orange) or "overlay"."""
    f = np.take(_np(fixed), index, axis=axis)
    m = np.take(_np(moving), index, axis=axis)
    if view == "fixed":
        m = np.zeros_like(m)
    elif view == "moving":
        f = np.zeros_like(f)
    elif view != "overlay":
        raise ValueError(f"view must be 'fixed', 'moving' or 'overlay', got {view!r}")
    return overlay_rgb(f, m)


def plot_slice(
    fixed: Any,
    moving: Any,
    axis: int = 1,
    index: int | None = None,
    view: str = "overlay",
    ax=None,
    title=None,
):
    """Draw one slice (default: the middle one) of a pair; see :func:`slice_image`."""
    ax = _new_ax(ax)
    if index is None:
        index = _np(fixed).shape[axis] // 2
    _imshow(ax, slice_image(fixed, moving, axis, index, view), axis)
    ax.set_title(title if title is not None else f"{view}, {AXIS_NAMES[axis]} = {index}")
    return ax


def plot_slices(
    fixed: Any, moving: Any, axis: int = 1, index: int | None = None, suptitle: str | None = None
):
    """The static companion of :func:`slice_viewer`: fixed / moving / overlay of one slice side by side."""
    fig, axes = plt.subplots(1, 3, figsize=(10, 3.9), layout="tight")
    for ax, view in zip(axes, ("fixed", "moving", "overlay")):
        plot_slice(fixed, moving, axis, index, view, ax=ax)
    if suptitle:
        fig.suptitle(suptitle)
    return fig


def slice_viewer(pairs: PairSet, index: int = 0, axis: int = 1, figsize=(5.5, 5)):
    """An ipywidgets viewer: case, view (fixed / moving / overlay), axis and slice sliders.

    Returns the widget (display it as a cell's last expression). The figure redraws on every change;
    in a static page (the book) only the first drawing is stored, which is why the notebook also shows
    :func:`plot_slices`.
    """
    import ipywidgets as widgets

    case = widgets.Dropdown(
        options=[(c, i) for i, c in enumerate(pairs.cases)], value=index, description="case"
    )
    view = widgets.ToggleButtons(options=["fixed", "moving", "overlay"], value="overlay", description="view")
    axis_w = widgets.ToggleButtons(
        options=[(f"{name} (axis {a})", a) for a, name in enumerate(AXIS_NAMES)],
        value=axis,
        description="axis",
    )
    shape = tuple(pairs.fixed.shape[1:])
    slider = widgets.IntSlider(value=shape[axis] // 2, min=0, max=shape[axis] - 1, description="slice")

    def on_axis(change):
        slider.max = shape[change["new"]] - 1
        slider.value = shape[change["new"]] // 2

    axis_w.observe(on_axis, names="value")

    def draw(case, view, axis, index):
        fig, ax = plt.subplots(figsize=figsize)
        plot_slice(pairs.fixed[case], pairs.moving[case], axis, min(index, shape[axis] - 1), view, ax=ax,
                   title=f"case {pairs.cases[case]}: {view}, {AXIS_NAMES[axis]} = {index}")  # fmt: skip
        plt.show()

    out = widgets.interactive_output(draw, {"case": case, "view": view, "axis": axis_w, "index": slider})
    return widgets.VBox([widgets.HBox([case, slider]), view, axis_w, out])
