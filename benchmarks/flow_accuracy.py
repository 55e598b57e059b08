"""Per-layer accuracy of SIFT Flow on AlexNet features of `scenes` pairs (generators paper §2.1.3).

Pairs are rendered exactly as the generator pipeline renders them
(:func:`topdown.transforms.render` about the central object, the object's
canvas shared by both images, mean fill, 224 px) from the central-object
originals of the embedded ``scenes`` data; features are the pipeline's
(:class:`topdown.generators.ConvFeatures`, torchvision AlexNet conv1..conv5
after ReLU, random weights unless ``--weights``; scaled per pair and layer by
:func:`topdown.generators.scale_for_flow`), and the flows use the pipeline's
default SIFT Flow settings. Each flow is compared with the analytic
displacement of the rendering transform mapped onto the layer's grid.

Grid mapping. Feature (i, j) of a layer sits at the centre of its receptive
field, image pixel (stride * j + offset, stride * i + offset): conv1 (11x11,
stride 4, pad 2): stride 4, offset 3; conv2 (after a 3x3/2 max pool): stride 8,
offset 7; conv3-conv5 (after a second pool): stride 16, offset 15. Renderings
rotate / scale about the image centre (pixel 111.5) and translate in output
pixels, so the analytic flow of grid point p is (T(p) - p) / stride layer
pixels; points whose match leaves the layer's grid are not scored.
Random-weight features are not equivariant to rotation or scale, so these
errors include the features' own mismatch, not just the matcher's.

Per case and layer: EPE (layer px) of the flow, of the solver at ``--baseline``
(a git revision, e.g. the one before a change) and of the rounded analytic
flow (the floor for an integer flow), and the SIFT Flow energy
(:func:`topdown.flows.flow_energy`) of the flow relative to the baseline's and
to the rounded analytic flow's; all means over the originals.

First, the reference cases (``--reference``, default tests/data/siftflow_reference.npz:
CNN features of two real photographs with the flows of the original solver,
Ce Liu's BPFlow driven by SIFTflowc2f, and the true displacement): per case the
energy ratio to the original's flow, both EPEs, and the share of grid points
where the two flows are identical.

    PYTHONPATH=. .venv/bin/python benchmarks/flow_accuracy.py --root data/scenes --baseline 35b82b4
"""
from __future__ import annotations

import argparse
import math
from pathlib import Path

import numpy as np
import torch

from benchmarks.flows import load_revision
from datamodules.pairs import TransformPairs, coco_originals
from topdown.flows import flow_energy, sift_flow
from topdown.generators import ConvFeatures, scale_for_flow
from topdown.transforms import canvas_side

# (stride, offset) of each conv layer's grid in input pixels, see module docstring.
LAYER_GRID = {"conv1": (4, 3), "conv2": (8, 7), "conv3": (16, 15), "conv4": (16, 15),
              "conv5": (16, 15)}

CASES = [  # (name, kind, amount)
    ("rotate 10", "rotation", 10.0),
    ("rotate 30", "rotation", 30.0),
    ("scale 1.3x", "scale", 1.3),
    ("scale 0.75x", "scale", 0.75),
    ("left 16", "translation_x", -16.0),
    ("down 24", "translation_y", 24.0),
]


def analytic_flow(kind: str, amount: float, stride: int, offset: int, size: int, image_size: int = 224):
    """Displacement from I[identity] to I[amount] on a layer grid (layer px) and the points kept."""
    idx = torch.arange(size, dtype=torch.float64) * stride + offset
    ys, xs = torch.meshgrid(idx, idx, indexing="ij")
    c = image_size / 2 - 0.5
    dx, dy = xs - c, ys - c
    if kind == "rotation":   # counter-clockwise on screen, y down (topdown.transforms)
        th = math.radians(amount)
        nx, ny = math.cos(th) * dx + math.sin(th) * dy, -math.sin(th) * dx + math.cos(th) * dy
    elif kind == "scale":
        nx, ny = amount * dx, amount * dy
    elif kind == "translation_x":
        nx, ny = dx + amount, dy
    else:
        nx, ny = dx, dy + amount
    flow = torch.stack([(nx - dx) / stride, (ny - dy) / stride]).float()
    lo, hi = offset - c, stride * (size - 1) + offset - c
    inside = (nx >= lo) & (nx <= hi) & (ny >= lo) & (ny <= hi)
    return flow, inside


def reference_report(path: Path, baseline=None) -> None:
    """Per-case comparison with the original solver's flows (see the module docstring)."""
    z = np.load(path)
    cases = sorted({k.rsplit("_", 1)[0] for k in z.files if k.endswith("_original")})
    print(f"# reference cases: {path}")
    print("| case | C x H x W | energy / original | EPE | EPE original | same flow as original |"
          + (" energy before / original | EPE before |" if baseline else ""))
    print("|---|---|---|---|---|---|" + ("---|---|" if baseline else ""))
    ratios = []
    for name in cases:
        f1, f2 = (torch.from_numpy(z[f"{name}_{k}"])[None] for k in ("f1", "f2"))
        original, truth = torch.from_numpy(z[f"{name}_original"])[None], torch.from_numpy(z[f"{name}_gt"])
        valid = torch.from_numpy(z[f"{name}_valid"])
        alpha, d, gamma, *rest = z[f"{name}_params"].tolist()
        args = (alpha, d, gamma, *map(int, rest))
        flow = sift_flow(f1, f2, *args)
        e_orig = flow_energy(f1, f2, original, alpha, d, gamma).item()
        ratios.append(flow_energy(f1, f2, flow, alpha, d, gamma).item() / e_orig)

        def epe(f):
            return (f[0] - truth).norm(dim=0)[valid].mean().item()

        row = [name, "x".join(map(str, f1.shape[1:])), f"{ratios[-1]:.4f}", f"{epe(flow):.3f}",
               f"{epe(original):.3f}", f"{(flow == original).all(1).float().mean().item():.1%}"]
        if baseline is not None:
            before = baseline(f1, f2, *args)
            row += [f"{flow_energy(f1, f2, before, alpha, d, gamma).item() / e_orig:.4f}", f"{epe(before):.3f}"]
        print("| " + " | ".join(row) + " |", flush=True)
    print(f"# mean energy ratio {sum(ratios) / len(ratios):.4f}, max {max(ratios):.4f}")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--root", default="data/scenes")
    p.add_argument("--split", default="val")
    p.add_argument("--images", type=int, default=4, help="central-object originals used")
    p.add_argument("--weights", default=None, help="AlexNet state dict (default: random weights)")
    p.add_argument("--baseline", default=None, help="git revision of topdown/flows.py to compare with")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--reference", type=Path,
                   default=Path(__file__).resolve().parent.parent / "tests" / "data" / "siftflow_reference.npz")
    args = p.parse_args(argv)
    baseline = load_revision(args.baseline).sift_flow if args.baseline else None
    if args.reference and str(args.reference) != "none":
        reference_report(args.reference, baseline)
    torch.manual_seed(args.seed)
    net = ConvFeatures(weights=args.weights).eval()
    originals = coco_originals(args.root, args.split)[:args.images]
    if not originals:
        raise SystemExit(f"no central-object originals in {args.root} ({args.split})")
    head = "| case | layer | EPE | EPE before | EPE rounded truth | energy / before | energy / rounded truth |"
    if baseline is None:
        head = "| case | layer | EPE | EPE rounded truth | energy / rounded truth |"
    print(f"# {len(originals)} originals from {args.root} ({args.split}), AlexNet "
          f"{'weights ' + args.weights if args.weights else 'random weights'}, seed {args.seed}"
          + (f", before = topdown/flows.py at {args.baseline}" if baseline else ""))
    print(head)
    print("|" + "---|" * (head.count("|") - 1))
    for name, kind, amount in CASES:
        identity = 1.0 if kind == "scale" else 0.0
        sides = [canvas_side(o.box, o.width, o.height, kind, [identity, amount], 224) for o in originals]
        pairs = TransformPairs(originals, kind, [], [], sides, 224, fill="mean", cases=[(name, amount)])
        items = [pairs[i] for i in range(len(pairs))]
        with torch.no_grad():
            f1s = net(torch.stack([it["image"] for it in items]))
            f2s = net(torch.stack([it["transformed"] for it in items]))
        for layer, (stride, offset) in LAYER_GRID.items():
            a, b = scale_for_flow(f1s[layer], f2s[layer])
            truth, inside = analytic_flow(kind, amount, stride, offset, a.shape[-1])
            rounded = truth.round().expand(a.shape[0], 2, *truth.shape[1:])
            flow = sift_flow(a, b)

            def epe(f):
                return (f - truth).norm(dim=1)[:, inside].mean().item()

            energy = flow_energy(a, b, flow)
            row = [name, layer, f"{epe(flow):.2f}"]
            if baseline is not None:
                before = baseline(a, b)
                row += [f"{epe(before):.2f}"]
            row += [f"{epe(rounded):.2f}"]
            if baseline is not None:
                row += [f"{(energy / flow_energy(a, b, before)).mean().item():.3f}"]
            row += [f"{(energy / flow_energy(a, b, rounded)).mean().item():.3f}"]
            print("| " + " | ".join(row) + " |", flush=True)


if __name__ == "__main__":
    main()
