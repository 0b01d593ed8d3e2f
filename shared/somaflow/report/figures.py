"""The report's figures, drawn into PNG bytes.

Every function takes plain arrays (numpy, in the result's dims) and returns
the PNG of one figure. Figures are built with matplotlib's object API
(``matplotlib.figure.Figure``), not pyplot: no backend, display or global
figure state is involved, so they render in any process and thread.
"""

from __future__ import annotations

import io
from collections.abc import Sequence

import numpy as np
from matplotlib import colormaps
from matplotlib.cm import ScalarMappable
from matplotlib.collections import LineCollection
from matplotlib.colors import Normalize
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from skimage.measure import find_contours

#: colour map of the unit scores (accepted units' outlines and the colour bar)
SCORE_CMAP = "plasma"
#: colour of rejected units' outlines, and of the ground truth's
REJECTED_COLOR = "#00e5ff"
TRUTH_COLOR = "#ffffff"
DPI = 110


def _png(fig: Figure) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI, bbox_inches="tight", facecolor="white")
    return buf.getvalue()


def _display_range(image: np.ndarray) -> tuple[float, float]:
    """Contrast limits that ignore the brightest and darkest pixels (0.5 and 99.5 %)."""
    finite = image[np.isfinite(image)]
    if finite.size == 0:
        return 0.0, 1.0
    lo, hi = np.percentile(finite, [0.5, 99.5])
    return float(lo), float(hi if hi > lo else lo + 1.0)


def outlines(masks: np.ndarray) -> list[list[np.ndarray]]:
    """Contours of each mask: per unit, a list of (k, 2) arrays of (x, y) vertices.

    Parameters
    ----------
    masks : numpy.ndarray
        (unit, y, x) bool.
    """
    out = []
    for m in masks:
        padded = np.pad(m.astype(np.float32), 1)  # closes contours of masks that touch the border
        out.append([c[:, ::-1] - 1.0 for c in find_contours(padded, 0.5)])
    return out


def _segments(contours: Sequence[list[np.ndarray]], keep: np.ndarray) -> tuple[list[np.ndarray], list[int]]:
    segs, owner = [], []
    for i in np.flatnonzero(keep):
        for c in contours[i]:
            segs.append(c)
            owner.append(int(i))
    return segs, owner


def _panel_size(ny: int, nx: int) -> tuple[float, float]:
    """Inches of one image panel: the longer side 6.5 in (wide fields) or 7 in (tall ones)."""
    return (6.5, 6.5 * ny / nx) if nx >= ny else (7.0 * nx / ny, 7.0)


def score_norm(score: np.ndarray) -> Normalize:
    """Colour scale of the scores: the accepted units' range (at least 0.2 wide), up to 1."""
    lo = float(np.floor(score.min() * 10) / 10) if score.size else 0.0
    return Normalize(min(lo, 0.8), 1.0)


def summary_figure(images: dict[str, np.ndarray], contours: list[list[np.ndarray]], score: np.ndarray,
                   accepted: np.ndarray, truth_contours: list[list[np.ndarray]] | None = None,
                   rejected_on: str | None = None) -> bytes:
    """The summary images side by side with the units' outlines.

    Accepted units are drawn solid on every panel, coloured by score;
    ground-truth outlines, when given, dotted white on top. Rejected units
    (often many, and mostly noise) are drawn dashed in
    :data:`REJECTED_COLOR` on the panel ``rejected_on`` only (default: the
    last), so the other panels stay readable.

    Parameters
    ----------
    images : dict of str to numpy.ndarray
        Panel title -> (y, x) image.
    contours : list
        :func:`outlines` of the units.
    score, accepted : numpy.ndarray
        (unit,) float in [0, 1] and bool.
    truth_contours : list, optional
        :func:`outlines` of the ground truth.
    rejected_on : str, optional
        Title of the panel that shows the rejected units.
    """
    names = list(images)
    rejected_on = rejected_on or names[-1]
    ny, nx = next(iter(images.values())).shape
    w, h = _panel_size(ny, nx)
    fig = Figure(figsize=(w * len(names) + 1.0, h + 0.7), layout="constrained")
    axes = fig.subplots(1, len(names), squeeze=False)
    norm = score_norm(score[accepted])
    cmap = colormaps[SCORE_CMAP]
    acc_segs, acc_owner = _segments(contours, accepted)
    rej_segs, _ = _segments(contours, ~accepted)
    truth_segs = [c for unit in truth_contours for c in unit] if truth_contours else []
    for ax, name in zip(axes[0], names, strict=True):
        img = images[name]
        lo, hi = _display_range(img)
        ax.imshow(img, cmap="gray", vmin=lo, vmax=hi, interpolation="nearest")
        if rej_segs and name == rejected_on:
            ax.add_collection(LineCollection(rej_segs, colors=REJECTED_COLOR, linewidths=0.6,
                                             linestyles="--", alpha=0.7))
        if acc_segs:
            ax.add_collection(LineCollection(acc_segs, colors=cmap(norm(score[acc_owner])), linewidths=1.1))
        if truth_segs:  # on top: a matched unit shows as its outline dotted over in white
            ax.add_collection(LineCollection(truth_segs, colors=TRUTH_COLOR, linewidths=0.9,
                                             linestyles=":", alpha=0.95))
        title = name + (" · rejected units dashed" if rej_segs and name == rejected_on else "")
        ax.set_title(title, fontsize=11)
        ax.set_xlim(-0.5, nx - 0.5)
        ax.set_ylim(ny - 0.5, -0.5)
        ax.set_xticks([])
        ax.set_yticks([])
    bar = fig.colorbar(ScalarMappable(norm=norm, cmap=cmap), ax=axes[0].tolist(), shrink=0.8,
                       pad=0.01, aspect=30)
    bar.set_label("score (accepted units)")
    handles = [Line2D([], [], color=cmap(0.55), lw=1.5, label=f"accepted ({int(accepted.sum())}), colour = score"),
               Line2D([], [], color=REJECTED_COLOR, lw=1.2, ls="--", label=f"rejected ({int((~accepted).sum())})")]
    if truth_contours is not None:
        handles.append(Line2D([], [], color="black", lw=1.2, ls=":", label=f"ground truth ({len(truth_contours)})"))
    fig.legend(handles=handles, loc="outside lower center", ncol=len(handles), frameon=False, fontsize=10)
    return _png(fig)


def trace_grid(time: np.ndarray, dff: np.ndarray, spikes: np.ndarray, labels: Sequence[str],
               columns: int = 2) -> bytes:
    """ΔF/F of example units, each with its deconvolved spikes on a strip beneath.

    Parameters
    ----------
    time : numpy.ndarray
        (frame,) seconds.
    dff, spikes : numpy.ndarray
        (unit, frame) of the units shown.
    labels : sequence of str
        One title per unit.
    """
    n = len(labels)
    rows = max(1, int(np.ceil(n / columns)))
    fig = Figure(figsize=(7.2 * columns, 1.75 * rows + 0.3), layout="constrained")
    cells = fig.subfigures(rows, columns, squeeze=False)
    for k, cell in enumerate(cells.flat):
        if k >= n:
            continue
        ax, strip = cell.subplots(2, 1, sharex=True, gridspec_kw={"height_ratios": (3, 1), "hspace": 0})
        ax.plot(time, dff[k], color="#1f5fa8", lw=0.8)
        ax.set_title(labels[k], fontsize=9, loc="left", pad=2)
        ax.set_ylabel("ΔF/F", fontsize=8)
        s = spikes[k]
        on = s > 0
        strip.vlines(time[on], 0, s[on] / (float(s.max()) if s.max() > 0 else 1.0), color="#d1495b", lw=0.8)
        strip.set_ylim(0, 1.05)
        strip.set_yticks([])
        strip.set_ylabel("spikes", fontsize=8, rotation=0, ha="right", va="center")
        strip.set_xlim(float(time[0]), float(time[-1]) if len(time) > 1 else 1.0)
        last_row = k // columns == rows - 1 or k + columns >= n
        strip.set_xlabel("time (s)" if last_row else "", fontsize=8)
        strip.tick_params(labelbottom=last_row)
        for a in (ax, strip):
            a.tick_params(labelsize=8)
            a.spines[["top", "right"]].set_visible(False)
        ax.tick_params(labelbottom=False)
    return _png(fig)


def motion_figure(time: np.ndarray, shifts: np.ndarray) -> bytes:
    """The estimated (y, x) shift of every frame, in pixels."""
    fig = Figure(figsize=(9.6, 2.5), layout="constrained")
    ax = fig.subplots()
    ax.plot(time, shifts[:, 0], lw=0.9, label="y", color="#2a9d8f")
    ax.plot(time, shifts[:, 1], lw=0.9, label="x", color="#e76f51")
    ax.set_xlabel("time (s)")
    ax.set_ylabel("shift (pixels)")
    ax.legend(loc="upper right", ncol=2, frameon=False)
    ax.spines[["top", "right"]].set_visible(False)
    return _png(fig)


def score_histogram(score: np.ndarray, accepted: np.ndarray) -> bytes:
    """How the scores of accepted and rejected units are distributed."""
    fig = Figure(figsize=(5.0, 2.6), layout="constrained")
    ax = fig.subplots()
    bins = np.linspace(0, 1, 21)
    ax.hist([score[accepted], score[~accepted]], bins=bins, stacked=True,
            color=[colormaps[SCORE_CMAP](0.7), REJECTED_COLOR], label=["accepted", "rejected"])
    ax.set_xlabel("score")
    ax.set_ylabel("units")
    ax.legend(frameon=False, fontsize=9)
    ax.spines[["top", "right"]].set_visible(False)
    return _png(fig)
