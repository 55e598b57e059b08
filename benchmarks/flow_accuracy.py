"""Per-layer accuracy of SIFT Flow on AlexNet features (generators paper §2.1.3).

An image and its rotated / scaled / translated copy go through torchvision's
AlexNet (``alexnet(weights=None)``: random weights, nothing is downloaded; the
one-tower variant, so conv1..conv5 have 64, 192, 384, 256, 256 channels on
55x55, 27x27, 13x13 grids). For each conv layer (output of its ReLU, scaled
per pair to [0, 255]) the feature flow is compared with the analytic field of
the transformation mapped onto the layer's grid.

Grid mapping. Feature (i, j) of a layer sits at the centre of its receptive
field, image pixel (x, y) = (stride * j + offset, stride * i + offset):
conv1 (11x11, stride 4, pad 2): stride 4, offset 3; conv2 (after 3x3/2 max
pool, 5x5 pad 2): stride 8, offset 7; conv3-conv5 (after a second pool, 3x3 pad
1): stride 16, offset 15. The analytic flow of grid point p is
(T(p_img) - p_img) / stride in layer pixels; points whose match leaves the
layer's grid are not scored.

The image is synthetic (smooth colour noise with a few bright discs on a
320x320 canvas, warped, then both centre-cropped to 224x224 so no border enters
the crop). Random-weight features are not equivariant to rotation or scale, so
these errors include the features' own mismatch, not just the matcher's.

    PYTHONPATH=. .venv/bin/python benchmarks/flow_accuracy.py
"""
from __future__ import annotations

import argparse
import math

import torch
import torch.nn.functional as F
import torchvision

from topdown.flows import sift_flow

# (stride, offset) of each conv layer's grid in input pixels, see module docstring.
LAYER_GRID = {"conv1": (4, 3), "conv2": (8, 7), "conv3": (16, 15), "conv4": (16, 15),
              "conv5": (16, 15)}

TRANSFORMS = [  # (rotation deg, scale, tx px, ty px)
    (10.0, 1.0, 0.0, 0.0),
    (0.0, 1.1, 0.0, 0.0),
    (0.0, 1.0, 16.0, -8.0),
    (10.0, 1.1, 8.0, -6.0),
]


def synthetic_image(size: int = 320, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(1, 3, size // 8, size // 8, generator=g)
    x = F.interpolate(x, size=(size, size), mode="bicubic", align_corners=False)
    ys, xs = torch.meshgrid(torch.arange(size, dtype=torch.float32),
                            torch.arange(size, dtype=torch.float32), indexing="ij")
    for _ in range(12):
        cx, cy, r = (torch.rand(3, generator=g) * torch.tensor([size, size, 20]) + torch.tensor([0, 0, 8]))
        colour = torch.randn(3, 1, 1, generator=g)
        x = x + colour * (((xs - cx) ** 2 + (ys - cy) ** 2) < r ** 2).float()
    return (x - x.mean()) / x.std()


def similarity(deg: float, scale: float, tx: float, ty: float, centre: float) -> torch.Tensor:
    """3x3 matrix of T(p) = s R (p - c) + c + t in pixel coordinates."""
    th = math.radians(deg)
    a = scale * torch.tensor([[math.cos(th), -math.sin(th)], [math.sin(th), math.cos(th)]])
    m = torch.eye(3)
    m[:2, :2] = a
    m[:2, 2] = torch.tensor([centre, centre]) - a @ torch.tensor([centre, centre]) + torch.tensor([tx, ty])
    return m


def warp(image: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """image2(T(p)) = image(p), bilinear."""
    size = image.shape[-1]
    ys, xs = torch.meshgrid(torch.arange(size, dtype=torch.float32),
                            torch.arange(size, dtype=torch.float32), indexing="ij")
    q = torch.stack([xs, ys, torch.ones_like(xs)], -1) @ torch.linalg.inv(m).T
    grid = q[..., :2] / (size - 1) * 2 - 1
    return F.grid_sample(image, grid[None], mode="bilinear", padding_mode="border", align_corners=True)


def conv_features(net: torch.nn.Module, image: torch.Tensor) -> list[torch.Tensor]:
    out, h = [], image
    for m in net.features:
        h = m(h)
        if isinstance(m, torch.nn.ReLU):
            out.append(h)
    return out


def analytic_flow(m_crop: torch.Tensor, stride: int, offset: int, size: int):
    """Analytic flow on a layer grid (layer px) and the mask of points kept."""
    idx = torch.arange(size, dtype=torch.float32) * stride + offset
    ys, xs = torch.meshgrid(idx, idx, indexing="ij")
    p = torch.stack([xs, ys, torch.ones_like(xs)], -1)
    tp = p @ m_crop.T
    flow = ((tp[..., :2] - p[..., :2]) / stride).permute(2, 0, 1)
    lo, hi = offset, stride * (size - 1) + offset
    inside = (tp[..., 0] >= lo) & (tp[..., 0] <= hi) & (tp[..., 1] >= lo) & (tp[..., 1] <= hi)
    return flow, inside


def evaluate(seed: int = 0) -> list[tuple]:
    torch.manual_seed(seed)
    net = torchvision.models.alexnet(weights=None).eval()
    canvas, crop = 320, 224
    lo = (canvas - crop) // 2
    image = synthetic_image(canvas, seed)
    rows = []
    for deg, scale, tx, ty in TRANSFORMS:
        m = similarity(deg, scale, tx, ty, (canvas - 1) / 2)
        moved = warp(image, m)
        # Same transformation in crop coordinates: shift by the crop origin.
        shift = torch.eye(3)
        shift[:2, 2] = lo
        m_crop = torch.linalg.inv(shift) @ m @ shift
        with torch.no_grad():
            f1s = conv_features(net, image[..., lo:lo + crop, lo:lo + crop])
            f2s = conv_features(net, moved[..., lo:lo + crop, lo:lo + crop])
        for (name, (stride, offset)), f1, f2 in zip(LAYER_GRID.items(), f1s, f2s):
            top = torch.maximum(f1.amax(), f2.amax()).clamp(min=1e-12)
            flow = sift_flow(f1 / top * 255, f2 / top * 255)[0]
            truth, inside = analytic_flow(m_crop, stride, offset, f1.shape[-1])
            err = (flow - truth).norm(dim=0)[inside]
            floor = (truth.round() - truth).norm(dim=0)[inside]
            rows.append((f"rot {deg:g} scale {scale:g} t ({tx:g},{ty:g})", name, tuple(f1.shape[1:]),
                         err.mean().item(), floor.mean().item(),
                         truth.norm(dim=0)[inside].mean().item(), inside.float().mean().item()))
    return rows


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    print("| transform | layer | C x H x W | EPE (layer px) | EPE of rounded truth | "
          "mean |truth| | scored |")
    print("|---|---|---|---|---|---|---|")
    for t, name, shape, epe, floor, mag, frac in evaluate(args.seed):
        print(f"| {t} | {name} | {'x'.join(map(str, shape))} | {epe:.2f} | {floor:.2f} | "
              f"{mag:.2f} | {100 * frac:.0f}% |")


if __name__ == "__main__":
    main()
