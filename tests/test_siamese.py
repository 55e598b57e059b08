"""The §3.2 Siamese baseline: shapes, shared towers, and its CLI."""
from __future__ import annotations

import pytest
import torch

import train
from topdown.siamese import SiameseAlexNet

torch.set_num_threads(1)


def test_siamese_shapes_and_shared_towers():
    net = SiameseAlexNet(image_size=64, hidden=16).eval()
    x, y = torch.randn(3, 3, 64, 64), torch.randn(3, 3, 64, 64)
    stacked = net.stacked_pool5(x, y)
    assert net.pool5_shape == (256, 1, 1) and stacked.shape == (3, 512, 1, 1)  # pool5 maps stacked by channel
    assert net.fc6.in_features == 512 and net.fc7.in_features == 16 and net.fc8.out_features == 1
    assert net(x, y).shape == (3,)
    # One tower serves both images: swapping the images swaps the two channel halves.
    swapped = net.stacked_pool5(y, x)
    assert torch.allclose(swapped, torch.cat((stacked[:, 256:], stacked[:, :256]), dim=1))
    tower = sum(p.numel() for p in net.tower.parameters())
    assert tower == 2_469_696  # AlexNet conv1..conv5 once, not twice
    # Gradients from the second image alone reach the same (shared) conv1 weights.
    net.zero_grad()
    net.stacked_pool5(x, y)[:, 256:].sum().backward()
    assert net.tower[0].weight.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="one shape"):
        net(x, y[:, :, :32, :32])


def test_siamese_cli_fast_dev_run(tiny_scenes, tmp_path):
    cli = train.main(["--model", "siamese", "--data.root", str(tiny_scenes), "--data.image_size", "64",
                      "--data.train_pairs", "8", "--data.test_pairs", "4", "--data.batch_size", "4",
                      "--model.hidden", "16", "--run.root", str(tmp_path), "--run.wandb", "false",
                      "--trainer.fast_dev_run", "true", "--trainer.enable_progress_bar", "false",
                      "--trainer.enable_model_summary", "false"])
    assert cli.trainer.state.finished
    assert cli.model.hparams.image_size == 64 and cli.model.hparams.threshold == 60  # linked from the data
    m = cli.trainer.callback_metrics
    assert m["test/pairs"] == 4 and m["test/skipped"] == 0 and 0 <= m["test/accuracy"] <= 1
