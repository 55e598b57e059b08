"""The documented commands of the generators' uses: zero-shot, the Siamese curve and the pictures, end to end."""
from __future__ import annotations

import csv

import pytest
import torch

from topdown.generators import ConvFeatures, GeneratorBank, GeneratorModel

SIZE = 64  # AlexNet maps of 15, 7, 3, 3, 3 px


def _bank(path):
    """A bank over the real 64 px layout whose generators are small random flows (the scripts do not care)."""
    layout = ConvFeatures().layout(SIZE)
    g = torch.Generator().manual_seed(0)
    bank = GeneratorBank(layout, SIZE, {"weights": None, "init_seed": 0, "quantile": 0.99,
                                        "flow_kwargs": {"levels": 2, "top_wsize": 3, "top_iters": 10, "iters": 5}})
    ranges = {"rotation": (-60, 60), "scale": (1 / 1.4, 1.4), "translation_x": (-30, 30), "translation_y": (-30, 30)}
    base = {"rotation": 10.0, "scale": 1.3, "translation_x": 10.0, "translation_y": 10.0}
    for kind, rng in ranges.items():
        basis = torch.randn(layout.dim, 4, generator=g, dtype=torch.float64) / 10
        bank.add(GeneratorModel(kind, basis, torch.randn(12, generator=g, dtype=torch.float64) / 3, 3, base[kind],
                                {"amount_range": list(rng), "pairs_pca": 5}))
    return bank.save(path)


def _rows(path):
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


@pytest.mark.slow
def test_zeroshot_and_siamese_curve_commands(tiny_scenes, tmp_path):
    from scripts import siamese_curve, zeroshot

    bank = _bank(tmp_path / "bank.pt")
    out = tmp_path / "runs"
    zs = zeroshot.main(["--bank", str(bank), "--root", str(tiny_scenes), "--test-pairs", "6", "--out", str(out),
                        "--no-wandb", "--threads", "1"])
    rows = {r["range"]: r for r in _rows(zs["run_dir"] / "zeroshot.csv")}
    assert rows["all"]["pairs"] == "6" and int(rows["< 60"]["pairs"]) + int(rows["> 60"]["pairs"]) == 6
    assert 0 <= float(rows["all"]["accuracy"]) <= 1 and zs["test_originals"] == 9
    assert len(_rows(zs["run_dir"] / "zeroshot_pairs.csv")) == 6 and (zs["run_dir"] / "zeroshot_scatter.png").is_file()
    gen = _rows(zs["run_dir"] / "zeroshot_generator.csv")  # each G[Δθ] estimated back as Δθ
    assert len(gen) == 19 and all(float(r["own_estimate"]) == pytest.approx(float(r["amount"]), abs=1e-3) for r in gen)
    assert {"flow_cosine", "flow_gain"} <= set(_rows(zs["run_dir"] / "zeroshot_bins.csv")[0])

    curve = siamese_curve.main(["--zeroshot", str(zs["run_dir"] / "zeroshot.csv"), "--root", str(tiny_scenes),
                                "--train-pairs", "8", "4", "--samples", "8", "--test-pairs", "6", "--image-size",
                                str(SIZE), "--batch-size", "4", "--out", str(out), "--threads", "1",
                                "--no-wandb", "--", "--model.hidden", "16"])
    rows = _rows(curve["run_dir"] / "siamese_curve.csv")
    assert [r["train_pairs"] for r in rows] == ["4", "8", "zero-shot"]
    assert [r["epochs"] for r in rows[:2]] == ["2", "1"] and all(r["test_pairs"] == "6" for r in rows[:2])
    assert float(rows[2]["accuracy"]) == pytest.approx(curve["zero_shot"])
    png = curve["run_dir"] / "siamese_curve.png"
    assert png.stat().st_size > 10_000
    png.unlink()
    assert siamese_curve.main(["--replot", str(curve["run_dir"])])["png"] == png and png.is_file()  # from the CSV


@pytest.mark.slow
def test_pictures_command_writes_every_figure(tiny_scenes, tmp_path):
    import train
    from scripts import pictures

    bank = _bank(tmp_path / "bank.pt")
    cli = train.main(["--model", "inversion", "--model.width", "16", "--model.convs", "1", "--data.root",
                      str(tiny_scenes), "--data.image_size", str(SIZE), "--data.batch_size", "4",
                      "--data.num_workers", "0", "--run.root", str(tmp_path / "runs"), "--run.wandb", "false",
                      "--trainer.max_epochs", "1", "--trainer.limit_train_batches", "1",
                      "--trainer.limit_val_batches", "1", "--trainer.limit_test_batches", "1",
                      "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false"])
    ckpt = cli.run_dir / "checkpoints" / "last.ckpt"
    assert (cli.run_dir / "inversions.png").is_file()
    result = pictures.main(["--bank", str(bank), "--inversion", str(ckpt), "--root", str(tiny_scenes),
                            "--out", str(tmp_path / "runs"), "--threads", "1"])
    names = {p.name for p in result["files"].values()}
    assert names == {"fig1_flows.png", "fig2_pca.png", "figA1_mean_flows.png", "fig_generators.png",
                     "fig3_conv1.png", "figA2_conv1.png"}
    assert all(p.stat().st_size > 10_000 for p in result["files"].values())
    errors = _rows(result["run_dir"] / "figA2_conv5.csv")
    assert [r["case"] for r in errors] == ["rotate 30", "rotate -30", "scale 1.3x", "scale 0.75x", "left 30", "up 30"]
    assert all(float(r["rms"]) >= float(r["mad"]) >= 0 for r in errors)
    assert list((result["run_dir"] / "wandb").glob("offline-run-*/run-*.wandb"))  # the figures went to W&B
    from scripts import docs_figures

    copies = docs_figures.main(["--pictures", str(result["run_dir"]), "--inversion", str(cli.run_dir),
                                "--out", str(tmp_path / "docs")])
    assert {p.name for p in copies} == names | {"inversions_conv1.png"}
