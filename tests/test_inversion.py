"""Feature inversion (Dosovitskiy & Brox 2016): the decoder learns, and its CLI runs on any image folder."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

import train
from topdown.generators import ConvFeatures
from topdown.inversion import UpconvDecoder

torch.set_num_threads(1)


def test_decoder_sizes_follow_the_layer():
    assert UpconvDecoder(64, 55, 224).num_upconvs == 2  # conv1: 55 -> 110 -> 220, resized to 224
    assert UpconvDecoder(256, 13, 224).num_upconvs == 4  # conv5: 13 -> 26 -> ... -> 208, resized to 224
    out = UpconvDecoder(256, 13, 224, width=32, convs=1)(torch.randn(2, 256, 13, 13))
    assert out.shape == (2, 3, 224, 224)
    with pytest.raises(ValueError, match=r"\[B, 256, H, W\]"):
        UpconvDecoder(256, 13, 224)(torch.randn(2, 64, 13, 13))


def test_decoder_lowers_its_loss_in_a_short_fit():
    g = torch.Generator().manual_seed(0)
    # Smooth images (coarse noise, upsampled), as natural images are at this scale.
    images = torch.nn.functional.interpolate(torch.randn(4, 3, 8, 8, generator=g), size=64, mode="bilinear")
    with torch.no_grad():
        feats = ConvFeatures(("conv1",)).eval()(images)["conv1"]
    torch.manual_seed(0)
    dec = UpconvDecoder(feats.shape[1], feats.shape[-1], 64, width=32, convs=1)
    opt = torch.optim.Adam(dec.parameters(), lr=3e-3)
    losses = []
    for _ in range(60):
        loss = torch.nn.functional.mse_loss(dec(feats), images)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], losses[::10]


def test_inversion_cli_on_an_image_folder(tmp_path):
    folder = tmp_path / "photos" / "nested"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(20):
        Image.fromarray(rng.integers(0, 255, (40, 50, 3), dtype=np.uint8)).save(folder / f"p{i:02d}.png")
    (folder / "p09.png").write_bytes(b"not an image")  # held out (every 10th, the first of val): counted as skipped, not fatal
    with pytest.warns(UserWarning, match="p09.png"):
        cli = train.main(["--model", "inversion", "--model.layer", "conv5", "--model.width", "32",
                          "--model.convs", "1", "--data.dataset", "folder", "--data.root", str(tmp_path / "photos"),
                          "--data.image_size", "64", "--data.batch_size", "4", "--data.num_workers", "0",
                          "--run.root", str(tmp_path / "runs"), "--run.wandb", "false",
                          "--trainer.fast_dev_run", "true", "--trainer.enable_progress_bar", "false",
                          "--trainer.enable_model_summary", "false"])
    assert cli.trainer.state.finished
    assert not any(p.requires_grad for p in cli.model.extractor.parameters())  # the AlexNet stays frozen
    assert len(cli.datamodule.paths["train"]) == 18 and [p.name for p in cli.datamodule.paths["val"]] == ["p09.png", "p19.png"]
    m = cli.trainer.callback_metrics
    assert m["test/skipped"] == 1 and torch.isfinite(m["test/loss"])
    with pytest.raises(FileNotFoundError, match="nowhere"):
        train.main(["--model", "inversion", "--data.dataset", "folder", "--data.root", str(tmp_path / "nowhere"),
                    "--run.root", str(tmp_path / "runs"), "--run.wandb", "false", "--trainer.fast_dev_run", "true"])
