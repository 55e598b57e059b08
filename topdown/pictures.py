"""Pictures of flows and images for the generators paper's figures (Fig. 1, 2, 3, A1, A2), as PNG files.

Flows are drawn on the colour wheel (hue: direction, saturation: magnitude
relative to the panel's largest, white: no motion) with arrows on a sparse grid
on top. Directions are on screen: ``u`` right, ``v`` down, as in
:mod:`topdown.flows`. Pure matplotlib (Agg); nothing here touches Lightning.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from topdown.evidence import _finish as _finish_plot
from topdown.evidence import _pyplot


def flow_to_rgb(flow: torch.Tensor, max_mag: float | None = None) -> np.ndarray:
    """``[2, H, W]`` flow -> ``[H, W, 3]`` RGB in [0, 1]: hue = direction, saturation = |flow| / ``max_mag``."""
    from matplotlib.colors import hsv_to_rgb

    f = torch.as_tensor(flow, dtype=torch.float64).cpu().numpy()
    if f.ndim != 3 or f.shape[0] != 2:
        raise ValueError(f"flow_to_rgb expects a [2, H, W] flow, got {f.shape}")
    u, v = f
    mag = np.hypot(u, v)
    top = float(mag.max()) if max_mag is None else float(max_mag)
    hue = (np.arctan2(-v, u) / (2 * np.pi)) % 1.0  # screen up (v < 0) is 90°
    sat = np.clip(mag / top, 0, 1) if top > 0 else np.zeros_like(mag)
    return hsv_to_rgb(np.stack((hue, sat, np.ones_like(mag)), axis=-1))


def draw_flow(ax, flow: torch.Tensor, title: str = "", arrows: int = 13, max_mag: float | None = None) -> float:
    """Colour-wheel image of ``flow`` [2, H, W] with arrows on at most ``arrows`` x ``arrows`` points.

    Arrows are scaled so the longest spans one grid step. Returns the largest magnitude (layer pixels).
    """
    f = torch.as_tensor(flow, dtype=torch.float64).cpu()
    _, h, w = f.shape
    mag = float(torch.hypot(f[0], f[1]).max())
    ax.imshow(flow_to_rgb(f, max_mag), interpolation="nearest", extent=(-0.5, w - 0.5, h - 0.5, -0.5))
    step = max(1, math.ceil(max(h, w) / arrows))
    ys, xs = np.mgrid[step // 2:h:step, step // 2:w:step]
    u, v = f[0].numpy()[ys, xs], f[1].numpy()[ys, xs]
    if mag > 0:
        ax.quiver(xs, ys, u, v, angles="xy", scale_units="xy", scale=mag / step, width=0.006, color="black")
    ax.set_xlim(-0.5, w - 0.5)
    ax.set_ylim(h - 0.5, -0.5)
    ax.set_xticks([]), ax.set_yticks([])
    ax.set_title(f"{title}\nmax {mag:.2g} px" if title else f"max {mag:.2g} px", fontsize=8)
    return mag


def _wheel_key(fig) -> None:
    ax = fig.add_axes((0.005, 0.005, 0.06, 0.06))
    n = 64
    ys, xs = np.mgrid[-1:1:n * 1j, -1:1:n * 1j]
    flow = torch.from_numpy(np.stack((xs, ys)))
    rgb = flow_to_rgb(flow, 1.0)
    rgb[np.hypot(xs, ys) > 1] = 1.0
    ax.imshow(rgb)
    ax.set_axis_off()


def save_flow_grid(path: str | Path, rows: Sequence[Sequence[torch.Tensor]], row_labels: Sequence[str],
                   col_labels: Sequence[str], title: str = "", note: str = "") -> Path:
    """A grid of flow panels (``rows[i][j]`` [2, H, W]) as a PNG, with a colour-wheel key in the corner."""
    plt = _pyplot()
    nr, nc = len(rows), max(len(r) for r in rows)
    fig, axes = plt.subplots(nr, nc, figsize=(2.3 * nc + 0.6, 2.4 * nr + 0.8), squeeze=False)
    for i, row in enumerate(rows):
        for j in range(nc):
            ax = axes[i, j]
            if j >= len(row) or row[j] is None:
                ax.set_axis_off()
                continue
            draw_flow(ax, row[j], col_labels[j] if i == 0 else "")
            if j == 0:
                ax.set_ylabel(row_labels[i], fontsize=9)
    return _save_figure(fig, path, title, note, wheel_key=True)


def save_image_rows(path: str | Path, rows: Sequence[torch.Tensor], row_labels: Sequence[str] = (),
                    col_labels: Sequence[str] = (), captions: Sequence[Sequence[str]] | None = None,
                    title: str = "", note: str = "") -> Path:
    """Rows of RGB images (each ``[N, 3, H, W]`` in [0, 1]; ``None`` entries leave a blank) as a PNG.

    ``captions[i][j]`` is printed under image ``j`` of row ``i``.
    """
    plt = _pyplot()
    nr, nc = len(rows), max(len(r) for r in rows)
    fig, axes = plt.subplots(nr, nc, figsize=(1.9 * nc + 0.6, 2.1 * nr + 0.8), squeeze=False)
    for i, row in enumerate(rows):
        for j in range(nc):
            ax = axes[i, j]
            ax.set_xticks([]), ax.set_yticks([])
            img = row[j] if j < len(row) else None
            if j == 0 and i < len(row_labels):
                ax.set_ylabel(row_labels[i], fontsize=8)
            if img is None:
                for spine in ax.spines.values():
                    spine.set_visible(False)
                continue
            ax.imshow(img.detach().float().cpu().clamp(0, 1).permute(1, 2, 0).numpy())
            if i == 0 and j < len(col_labels):
                ax.set_title(col_labels[j], fontsize=8)
            if captions is not None and i < len(captions) and j < len(captions[i]) and captions[i][j]:
                ax.set_xlabel(captions[i][j], fontsize=7)
    return _save_figure(fig, path, title, note)


def _save_figure(fig, path: str | Path, title: str, note: str, wheel_key: bool = False) -> Path:
    """Title, footnote, tight layout, PNG (a figure of several panels); the colour-wheel key goes in last."""
    if title:
        fig.suptitle(title, fontsize=10)
    if note:
        fig.text(0.5, 0.002, note, ha="center", va="bottom", fontsize=7, color="dimgray")
    height = fig.get_size_inches()[1]  # margins in inches, whatever the figure's height
    fig.tight_layout(rect=(0, 0.4 / height if note else 0, 1, 1 - 0.35 / height if title else 1))
    if wheel_key:
        _wheel_key(fig)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    _pyplot().close(fig)
    return path


def save_curve(path: str | Path, xs: Sequence[float], ys: Sequence[float], hline: float | None = None,
               hline_label: str = "", label: str = "", xlabel: str = "", ylabel: str = "", title: str = "",
               log_x: bool = True, ylim: tuple[float, float] | None = None,
               reference: Sequence[tuple[str, Sequence[float], Sequence[float]]] = (),
               reference_hline: tuple[str, float] | None = None) -> Path:
    """One curve (``ys`` over ``xs``, log x by default, values annotated) with an optional horizontal line;
    ``reference`` curves ``(label, xs, ys)`` and ``reference_hline`` ``(label, y)`` are drawn in grey."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    for ref_label, rx, ry in reference:
        ax.plot(rx, ry, marker="s", color="gray", linestyle=":", label=ref_label)
    if reference_hline is not None:
        ax.axhline(reference_hline[1], color="gray", linestyle="-.", linewidth=0.8, label=reference_hline[0])
    ax.plot(xs, ys, marker="o", label=label)
    for x, y in zip(xs, ys):
        ax.annotate(f"{y:.1f}", (x, y), textcoords="offset points", xytext=(0, 6), ha="center", fontsize=8)
    if hline is not None and not math.isnan(hline):
        ax.axhline(hline, color="tab:red", linestyle="--", label=hline_label)
    if log_x:
        ax.set_xscale("log")
    if ylim is not None:
        ax.set_ylim(*ylim)
    ax.set_xlabel(xlabel)
    return _finish_plot(fig, ax, path, title, ylabel=ylabel)
