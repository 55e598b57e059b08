"""Copy the generators' recorded pictures from their run folders into the docs, as 256-colour PNGs.

    python scripts/docs_figures.py --pictures runs/pictures/version_0 --zeroshot runs/zeroshot/version_0 \\
        --siamese runs/siamese_curve/version_1 --inversion runs/inversion_conv1/version_0 \\
        runs/inversion_conv5/version_0 --out docs/figures/generators

Only the colour palette changes (a third of the size); the figures are the commands' own.
"""
from __future__ import annotations

import argparse
from pathlib import Path

from PIL import Image


def copy_png(src: Path, dst: Path) -> Path:
    if not src.is_file():
        raise FileNotFoundError(f"figure not found: {src}")
    dst.parent.mkdir(parents=True, exist_ok=True)
    with Image.open(src) as im:
        im.convert("RGB").quantize(256).save(dst, optimize=True)
    return dst


def main(argv: list[str] | None = None) -> list[Path]:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--pictures", help="run folder of scripts/pictures.py")
    p.add_argument("--zeroshot", help="run folder of scripts/zeroshot.py")
    p.add_argument("--siamese", help="run folder of scripts/siamese_curve.py")
    p.add_argument("--inversion", nargs="*", default=[], help="run folders of train.py --model inversion")
    p.add_argument("--out", default="docs/figures/generators")
    a = p.parse_args(argv)
    out = Path(a.out)
    jobs: list[tuple[Path, str]] = []
    if a.pictures:
        jobs += [(f, f.name) for f in sorted(Path(a.pictures).glob("fig*.png"))]
    if a.zeroshot:
        jobs.append((Path(a.zeroshot) / "zeroshot_scatter.png", "zeroshot_scatter.png"))
    if a.siamese:
        jobs.append((Path(a.siamese) / "siamese_curve.png", "siamese_curve.png"))
    for run in a.inversion:
        layer = next((line.split(":", 1)[1].strip() for line in (Path(run) / "config.yaml").read_text().splitlines()
                      if line.strip().startswith("layer:")), "layer")
        jobs.append((Path(run) / "inversions.png", f"inversions_{layer}.png"))
    written = [copy_png(src, out / name) for src, name in jobs]
    print("\n".join(str(w) for w in written))
    return written


if __name__ == "__main__":
    main()
