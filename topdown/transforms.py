"""Geometric transforms of an image about its central object (generators paper §2.1, §2.1.1).

The paper selects "original images" whose bounding box is centered, more square
than rectangular and covers 40-60% of the pixels (§2.1), then renders pairs
``(I[θ_init], I[θ_init + Δθ])`` in which only the central object's pose changes
(§2.1.1). This module holds both pieces as pure functions.

Coordinates are continuous pixel coordinates: pixel ``i`` covers ``[i, i+1)``,
so a box ``(x0, y0, x1, y1)`` spans ``x1 - x0`` pixels. ``x`` grows to the
right and ``y`` downwards, as on screen.

Kinds and their state (the pose ``t`` in ``I[t]``):

* ``rotation``: degrees, positive = counter-clockwise on screen (a point right
  of the centre moves up for +90°).
* ``scale``: a factor (1.3 = the object 1.3x larger), about the object centre.
* ``translation_x``: output pixels, positive = right (``-30`` = "left 30").
* ``translation_y``: output pixels, positive = down (``-30`` = "up 30").

Composition of a pair's amount: ``rotation`` and ``translation_*`` add
(``t + Δ``); ``scale`` multiplies (``t · Δ``), see :func:`compose`.

Framing (the "canvas"): each original is rendered from a square region of the
source image centred at the object centre, of side ``L`` (source pixels),
resized to ``size x size``. ``L`` is the smallest square that keeps the object
box wholly inside the frame for every state a kind can reach
(:func:`canvas_side`), and never smaller than the image's short side. Pixels
that come from outside the source image are filled by reflection of the image
(``fill="reflection"``) or by the image's mean colour (``fill="mean"``).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable, Sequence

import torch
import torch.nn.functional as F

KINDS = ("rotation", "scale", "translation_x", "translation_y")
FILLS = ("reflection", "mean")


@dataclass(frozen=True)
class CentralObjectCriteria:
    """Thresholds of "centered, more square than rectangular, 40-60% of the pixels" (§2.1).

    ``center_tol``: the box centre lies within ``center_tol·W`` (horizontally)
    and ``center_tol·H`` (vertically) of the image centre. ``aspect``: box
    ``width/height`` within ``[aspect[0], aspect[1]]`` (0.75-1.33: at most a
    4:3 box, which we read as "more square than rectangular"). ``area``: box
    area over image area within ``[area[0], area[1]]``.
    """

    center_tol: float = 0.10
    aspect: tuple[float, float] = (0.75, 4.0 / 3.0)
    area: tuple[float, float] = (0.40, 0.60)


def is_central_object(box: Sequence[float], width: float, height: float,
                      criteria: CentralObjectCriteria = CentralObjectCriteria()) -> bool:
    """True when ``box = (x0, y0, x1, y1)`` is a central object of a ``width x height`` image (§2.1)."""
    x0, y0, x1, y1 = (float(v) for v in box)
    if width <= 0 or height <= 0:
        raise ValueError(f"image size must be positive, got {width}x{height}")
    bw, bh = x1 - x0, y1 - y0
    if bw <= 0 or bh <= 0:
        return False
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    centered = abs(cx - width / 2) <= criteria.center_tol * width and abs(cy - height / 2) <= criteria.center_tol * height
    squareish = criteria.aspect[0] <= bw / bh <= criteria.aspect[1]
    frac = bw * bh / (width * height)
    return centered and squareish and criteria.area[0] <= frac <= criteria.area[1]


def compose(kind: str, state: float, amount: float) -> float:
    """State after applying ``amount`` to ``state``: ``t + Δ``, or ``t · Δ`` for scale (§2.1.1)."""
    _check_kind(kind)
    return state * amount if kind == "scale" else state + amount


def _check_kind(kind: str) -> None:
    if kind not in KINDS:
        raise ValueError(f"unknown transform kind {kind!r}; choose from {KINDS}")


def canvas_side(box: Sequence[float], width: float, height: float, kind: str, states: Iterable[float],
                size: int) -> float:
    """Side ``L`` (source pixels) of the square canvas that keeps the box in frame for all ``states``.

    The canvas is centred at the box centre. Rotation by any angle keeps the
    box within a disc of its half-diagonal; a scale ``s`` multiplies the box's
    extent; a shift of ``t`` output pixels is ``t·L/size`` source pixels, so
    ``w + 2|t|L/size <= L`` gives ``L >= w / (1 - 2|t|/size)``.
    """
    _check_kind(kind)
    x0, y0, x1, y1 = (float(v) for v in box)
    bw, bh = x1 - x0, y1 - y0
    states = [float(s) for s in states] or [0.0 if kind != "scale" else 1.0]
    base = min(width, height)
    if kind == "rotation":
        need = math.hypot(bw, bh) if any(s % 90 for s in states) else max(bw, bh)
    elif kind == "scale":
        if min(states) <= 0:
            raise ValueError(f"scale states must be positive factors, got {min(states)}")
        need = max(states) * max(bw, bh)
    else:
        shift = max(abs(s) for s in states)
        if 2 * shift >= size:
            raise ValueError(f"{kind}: a shift of {shift} px cannot keep the object in a {size}px frame")
        ext = bw if kind == "translation_x" else bh
        other = bh if kind == "translation_x" else bw
        need = max(ext / (1 - 2 * shift / size), other)
    return max(base, need)


def _affine_grid(kind: str, states: torch.Tensor, center: tuple[float, float], side: float, size: int,
                 width: int, height: int) -> torch.Tensor:
    """Sampling grid [N, size, size, 2] (grid_sample's normalised coordinates) of each state's rendering.

    Output pixel centre ``p`` maps to the canvas point ``q = c + (p - size/2)·L/size``; the source
    point is ``c + R(-θ)(q - c - t)/s`` (inverse of "rotate by θ, scale by s, shift by t about c").
    """
    dtype = torch.float64
    n = states.numel()
    states = states.to(dtype)
    step = side / size
    ticks = (torch.arange(size, dtype=dtype) + 0.5 - size / 2) * step
    qy, qx = torch.meshgrid(ticks, ticks, indexing="ij")  # canvas offsets from c, source pixels
    qx, qy = qx.expand(n, size, size), qy.expand(n, size, size)
    zero, one = torch.zeros(n, dtype=dtype), torch.ones(n, dtype=dtype)
    theta, scale, tx, ty = zero, one, zero, zero
    if kind == "rotation":
        theta = torch.deg2rad(states)
    elif kind == "scale":
        scale = states
    elif kind == "translation_x":
        tx = states * step
    else:
        ty = states * step
    dx = qx - tx[:, None, None]
    dy = qy - ty[:, None, None]
    # Counter-clockwise on screen with y down: forward map (dx, dy) -> (c dx + s dy, -s dx + c dy); invert it.
    c, s = torch.cos(theta)[:, None, None], torch.sin(theta)[:, None, None]
    sx = (c * dx - s * dy) / scale[:, None, None] + center[0]
    sy = (s * dx + c * dy) / scale[:, None, None] + center[1]
    grid = torch.stack((2 * sx / width - 1, 2 * sy / height - 1), dim=-1)
    return grid.float()


def render(image: torch.Tensor, box: Sequence[float], kind: str, states: Sequence[float] | torch.Tensor,
           size: int = 224, side: float | None = None, fill: str = "reflection") -> torch.Tensor:
    """Renderings ``I[t]`` [N, C, size, size] of ``image`` [C, H, W] for each state ``t`` (§2.1.1).

    The object is rotated / scaled / shifted about its box centre inside a square
    canvas of side ``side`` (default: :func:`canvas_side` for these states; pass
    the same ``side`` for every rendering of one original so pairs share a frame).
    The source is first resized with antialiasing so one canvas pixel maps to
    about one output pixel, then sampled bilinearly.
    """
    _check_kind(kind)
    if fill not in FILLS:
        raise ValueError(f"unknown fill {fill!r}; choose from {FILLS}")
    if image.dim() != 3:
        raise ValueError(f"image must be [C, H, W], got shape {tuple(image.shape)}")
    states = torch.as_tensor(states, dtype=torch.float64).reshape(-1)
    _, height, width = image.shape
    if side is None:
        side = canvas_side(box, width, height, kind, states.tolist(), size)
    factor = size / side
    x0, y0, x1, y1 = (float(v) for v in box)
    center = ((x0 + x1) / 2, (y0 + y1) / 2)
    img = image.float()
    if factor < 1:
        nh, nw = max(1, round(height * factor)), max(1, round(width * factor))
        img = F.interpolate(img[None], size=(nh, nw), mode="bilinear", antialias=True, align_corners=False)[0]
        center = (center[0] * nw / width, center[1] * nh / height)
        side = side * nw / width
        height, width = nh, nw
    grid = _affine_grid(kind, states, center, side, size, width, height)
    src = img.expand(states.numel(), *img.shape)
    if fill == "reflection":
        return F.grid_sample(src, grid, mode="bilinear", padding_mode="reflection", align_corners=False)
    mean = img.mean(dim=(1, 2), keepdim=True)
    return F.grid_sample(src - mean, grid, mode="bilinear", padding_mode="zeros", align_corners=False) + mean


def transformed_box(box: Sequence[float], kind: str, state: float, side: float, size: int) -> tuple[float, ...]:
    """Axis-aligned box (output pixels) enclosing the object box after state ``state`` of ``kind``.

    Used to check that the object stays in frame; same geometry as :func:`render`.
    """
    _check_kind(kind)
    x0, y0, x1, y1 = (float(v) for v in box)
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    k = size / side
    corners = [(x - cx, y - cy) for x in (x0, x1) for y in (y0, y1)]
    out = []
    for dx, dy in corners:
        if kind == "rotation":
            t = math.radians(state)
            dx, dy = math.cos(t) * dx + math.sin(t) * dy, -math.sin(t) * dx + math.cos(t) * dy
            px, py = dx * k, dy * k
        elif kind == "scale":
            px, py = dx * state * k, dy * state * k
        elif kind == "translation_x":
            px, py = dx * k + state, dy * k
        else:
            px, py = dx * k, dy * k + state
        out.append((px + size / 2, py + size / 2))
    xs, ys = [p[0] for p in out], [p[1] for p in out]
    return (min(xs), min(ys), max(xs), max(ys))
