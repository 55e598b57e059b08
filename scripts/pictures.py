"""The generators paper's pictures: Figures 1, 2, 3, A1 and A2, as PNG files in a run folder and on W&B.

    python scripts/pictures.py --bank runs/generators/version_0/generator_bank.pt \\
        --inversion runs/inversion_conv1/version_0/checkpoints/last.ckpt \\
                    runs/inversion_conv5/version_0/checkpoints/last.ckpt

The "new image" is a held-out central-object original (``--split val``, ``--original K``)
rendered at the bank's image size, transformed by the paper's six cases (rotate ±30°,
scale 1.3x / 0.75x, left 30 px, up 30 px) about its object.

* ``fig1_flows.png`` (Fig. 1): the SIFT flows of the image's six pairs, per layer.
* ``fig2_pca.png`` (Fig. 2): the rotation flows' PCA mean ``M`` and first components ``U_1``, ``U_2``.
* ``figA1_mean_flows.png`` (Fig. A1): the mean flow ``M`` of each kind (its base amount), per layer.
* ``fig_generators.png``: the generators ``G[Δ]`` of the six cases, per layer (what Fig. 3 applies).
* ``fig3_<layer>.png`` (Fig. 3), per inversion decoder: the truly transformed images, the inversions of
  their bottom-up features, and the inversions of the image's features warped by each generator.
* ``figA2_<layer>.png`` (Fig. A2): inversions of the image's features after each generator and its
  negation, beside the untouched inversion; under each, the conv5 RMS / mean absolute deviation of
  "G then -G" from the untouched conv5 features (also in ``figA2_conv5.csv``).

Every picture says which AlexNet weights made it. The decoders must invert the AlexNet the bank was
fitted with: a mismatch is reported as a warning.
"""
from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from scripts.zeroshot import open_run  # noqa: E402


def weights_label(bank) -> str:
    w = bank.meta.get("weights")
    return f"AlexNet weights: {w}" if w else f"AlexNet: random init (seed {bank.meta.get('init_seed', 0)}), untrained"


def new_image(a, bank):
    """The held-out original and its renderings ``{case: (I[0], I[Δ])}`` (ImageNet-normalised, [3, S, S])."""
    import torch

    from datamodules.pairs import _ImageCache, _normalize
    from datamodules.rotation_pairs import read_originals
    from topdown.generators import EVAL_CASES
    from topdown.transforms import canvas_side, compose, render

    originals = read_originals(a.root, a.dataset, a.split)
    if not originals:
        raise RuntimeError(f"no central-object originals in {a.dataset} split {a.split!r} at {a.root}")
    if not 0 <= a.original < len(originals):
        raise ValueError(f"--original {a.original} out of range: {len(originals)} originals in split {a.split!r}")
    orig = originals[a.original]
    img = _ImageCache().get(orig.path)
    if img is None:
        raise FileNotFoundError(f"cannot read the image {orig.path}")
    s = bank.image_size
    cases = [c for c in EVAL_CASES if c[1] in bank.kinds]
    identity = {k: (1.0 if k == "scale" else 0.0) for _, k, _ in cases}
    side = max(canvas_side(orig.box, orig.width, orig.height, k, [identity[k], amt], s) for _, k, amt in cases)
    out = {}
    for name, kind, amount in cases:
        pair = render(img.float() / 255, orig.box, kind, [identity[kind], compose(kind, identity[kind], amount)], s,
                      side=side, fill="mean").clamp(0, 1)
        out[name] = _normalize(pair)
    return orig, cases, out


def load_decoder(path: str, bank, extractor):
    """An inversion checkpoint (its decoder and AlexNet); warns when its AlexNet is not the bank's."""
    import torch

    from lightning_modules.inversion import InversionModule

    # weights=None: the AlexNet comes from the checkpoint's own tensors, wherever its weights file is now.
    module = InversionModule.load_from_checkpoint(path, map_location="cpu", weights=None).eval()
    own, ref = module.extractor.state_dict(), extractor.state_dict()
    shared = [k for k in own if k in ref]
    if not shared or not all(torch.equal(own[k], ref[k]) for k in shared):
        warnings.warn(f"{path}: the decoder inverts another AlexNet than the bank's ({weights_label(bank)}); "
                      "its pictures of warped features are not meaningful", stacklevel=2)
    return module


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--bank", required=True, help="generator_bank.pt (all kinds for Fig. 3 / A2)")
    p.add_argument("--inversion", nargs="*", default=[], help="inversion checkpoints (train.py --model inversion)")
    p.add_argument("--weights", default=None, help="AlexNet weights (default: the bank's)")
    p.add_argument("--root", default="data/scenes")
    p.add_argument("--dataset", default="scenes", choices=("scenes", "ilsvrc"))
    p.add_argument("--split", default="val", help="split of the new image (held out from the bank's fit)")
    p.add_argument("--original", type=int, default=0, help="which central-object original of the split")
    p.add_argument("--pca-components", type=int, default=2, help="components shown in Fig. 2")
    p.add_argument("--out", default="runs")
    p.add_argument("--no-wandb", action="store_true")
    p.add_argument("--wandb-project", default="topdown")
    p.add_argument("--threads", type=int, default=2)
    a = p.parse_args(argv)

    import torch

    from topdown.evidence import write_csv
    from topdown.generators import ConvFeatures, GeneratorBank, feature_flows, warp_features
    from topdown.inversion import to_rgb
    from topdown.pictures import save_flow_grid, save_image_rows

    torch.set_num_threads(a.threads)
    bank = GeneratorBank.load(a.bank)
    extractor = ConvFeatures.for_bank(bank, a.weights).eval()
    decoders = [load_decoder(path, bank, extractor) for path in a.inversion]
    run_dir, logger = open_run(a.out, "pictures", not a.no_wandb, a.wandb_project)
    note = f"{weights_label(bank)}; bank {a.bank}"
    written: dict[str, Path] = {}
    layers = list(bank.layout.names)

    orig, cases, pairs = new_image(a, bank)
    first = next(iter(pairs.values()))[0]
    with torch.no_grad():
        f0 = extractor(first[None])
        f1 = {name: extractor(pair[1:2]) for name, pair in pairs.items()}
        flows = {name: feature_flows(f0, f1[name], flow_kwargs=bank.meta.get("flow_kwargs") or {},
                                     quantile=float(bank.meta.get("quantile", 0.99))) for name in pairs}
    gens = {name: bank.generator(kind, amount) for name, kind, amount in cases}

    # Fig. 1: the flows of the new image's pairs, per layer.
    written["fig1_flows"] = save_flow_grid(
        run_dir / "fig1_flows.png", [[flows[n][layer][0] for layer in layers] for n, _, _ in cases],
        [n for n, _, _ in cases], layers, title=f"Fig. 1: SIFT flows of AlexNet features, {Path(orig.path).name}",
        note=note)

    # Fig. 2: PCA mean and first components of the rotation flows.
    if "rotation" in bank.kinds:
        model = bank.models["rotation"]
        k = min(a.pca_components, model.basis.shape[1] - 1)
        cols = [bank.layout.unflatten(model.basis[:, i].float()) for i in range(k + 1)]
        info = model.info or {}
        written["fig2_pca"] = save_flow_grid(
            run_dir / "fig2_pca.png", [[c[layer] for layer in layers] for c in cols],
            ["mean M"] + [f"U{i}" for i in range(1, k + 1)], layers,
            title=f"Fig. 2: PCA of {model.base_amount:g}° rotation flows ({info.get('pairs_pca', '?')} pairs)",
            note=note)

    # Fig. A1: the mean flow of each kind.
    kinds = list(bank.kinds)
    unit = {"rotation": "°", "scale": "x", "translation_x": " px", "translation_y": " px"}
    written["figA1_mean_flows"] = save_flow_grid(
        run_dir / "figA1_mean_flows.png",
        [[bank.layout.unflatten(bank.models[k].basis[:, 0].float())[layer] for k in kinds] for layer in layers],
        layers, [f"{k} {bank.models[k].base_amount:g}{unit.get(k, '')}" for k in kinds],
        title="Fig. A1: mean feature flow of each transform (its base amount)", note=note)

    # The generators themselves, G[Δ] of the six cases (§3.1), beside Fig. 1's measured flows.
    written["fig_generators"] = save_flow_grid(
        run_dir / "fig_generators.png", [[gens[n][layer] for layer in layers] for n, _, _ in cases],
        [n for n, _, _ in cases], layers, title="Generators G[Δ] = U[Δ]·w of the six cases, per layer", note=note)

    # Fig. A2 numbers: G then -G at conv5 against the untouched conv5 features.
    errors = []
    err_layer = "conv5" if "conv5" in layers else layers[-1]
    for name, kind, amount in cases:
        g = gens[name][err_layer]
        back = warp_features(warp_features(f0[err_layer], g), -g)
        d = (back - f0[err_layer]).double()
        errors.append({"case": name, "layer": err_layer, "rms": float(d.pow(2).mean().sqrt()),
                       "mad": float(d.abs().mean())})
    write_csv(run_dir / f"figA2_{err_layer}.csv", errors)

    for module in decoders:
        layer = module.hparams.layer
        if layer not in layers:
            warnings.warn(f"decoder of {layer} skipped: the bank has no {layer} generators", stacklevel=2)
            continue
        inv = lambda f: to_rgb(module(f))[0]  # noqa: E731
        with torch.no_grad():
            untouched = inv(f0[layer])
            bottom_up = [inv(f1[n][layer]) for n, _, _ in cases]
            generated = [inv(warp_features(f0[layer], gens[n][layer])) for n, _, _ in cases]
            there_and_back = [inv(warp_features(warp_features(f0[layer], gens[n][layer]), -gens[n][layer]))
                              for n, _, _ in cases]
        names = [n for n, _, _ in cases]
        written[f"fig3_{layer}"] = save_image_rows(
            run_dir / f"fig3_{layer}.png",
            [[to_rgb(first)] + [to_rgb(pairs[n][1]) for n in names], [untouched] + bottom_up, [None] + generated],
            row_labels=["image", f"inverted {layer}\n(bottom-up)", f"inverted {layer}\n(generator)"],
            col_labels=["(a) input"] + names,
            title=f"Fig. 3: {layer} features of a new image transformed by the generators, inverted", note=note)
        written[f"figA2_{layer}"] = save_image_rows(
            run_dir / f"figA2_{layer}.png", [[untouched] + there_and_back],
            col_labels=["none"] + [f"{n} and its negation" for n in names],
            captions=[[""] + [f"{err_layer} RMS {e['rms']:.3g}\nMAD {e['mad']:.3g}" for e in errors]],
            title=f"Fig. A2: inverted {layer} features after a generator and its negation", note=note)

    print("\n".join(f"{k}: {v}" for k, v in written.items()))
    print("G then -G at " + err_layer + ": " + "; ".join(f"{e['case']} RMS {e['rms']:.4g} MAD {e['mad']:.4g}"
                                                         for e in errors))
    if logger is not None:
        logger.log_hyperparams({**vars(a), "image": orig.path, "weights_used": weights_label(bank)})
        for key, path in written.items():
            logger.log_image(key=f"figures/{key}", images=[str(path)])
        logger.log_table(f"figA2_{err_layer}", columns=["case", "layer", "rms", "mad"],
                         data=[[e["case"], e["layer"], e["rms"], e["mad"]] for e in errors])
        logger.experiment.finish()
    print(f"written to {run_dir}")
    return {"run_dir": run_dir, "files": written, "errors": errors}


if __name__ == "__main__":
    main()
