"""The Siamese baseline of the zero-shot task (generators paper §3.2): ``python train.py --model siamese``.

Trains :class:`topdown.siamese.SiameseAlexNet` with a logistic loss on "the rotation
between the two images exceeds ``threshold``" (pairs from
:class:`datamodules.rotation_pairs.RotationPairsDataModule`), then tests on the
zero-shot test pairs. Logged keys: ``train/loss``, ``train/accuracy``,
``test/accuracy``, ``test/accuracy_below`` / ``test/accuracy_above`` (pairs with
Δθ under / over the threshold), ``test/pairs``, ``test/skipped``. The accuracy
curve over the number of training pairs is ``scripts/siamese_curve.py``.
"""
from __future__ import annotations

from typing import Literal, Optional

import torch
import torch.nn.functional as F
from lightning.pytorch import LightningModule
from torchmetrics import SumMetric

from topdown.siamese import SiameseAlexNet


class SiameseModule(LightningModule):
    """Args:
        weights: AlexNet weights for the towers (local file; ``None`` = random init from ``init_seed``).
        image_size: input side (linked from the datamodule).
        threshold: class boundary in degrees (linked from the datamodule).
        hidden: fc6 / fc7 units (paper: 4096). dropout: after fc6 and fc7.
        optimizer, lr, weight_decay: training.
    """

    def __init__(self, weights: Optional[str] = None, image_size: int = 224, threshold: float = 60.0,
                 hidden: int = 4096, dropout: float = 0.5, optimizer: Literal["adam", "sgd"] = "adam",
                 lr: float = 1e-4, weight_decay: float = 5e-4, init_seed: int = 0):
        super().__init__()
        self.save_hyperparameters()
        self.net = SiameseAlexNet(weights, image_size, hidden, dropout, init_seed)
        # correct / count per range of Δθ (below, above the threshold): sums, so DDP ranks add up.
        self.correct = torch.nn.ModuleList([SumMetric(), SumMetric()])
        self.count = torch.nn.ModuleList([SumMetric(), SumMetric()])
        self.skipped = SumMetric()

    def forward(self, first: torch.Tensor, second: torch.Tensor) -> torch.Tensor:
        return self.net(first, second)

    def training_step(self, batch: dict, batch_idx: int):
        valid = batch["valid"].bool()
        if not valid.any():
            return None
        logits = self(batch["image"][valid], batch["transformed"][valid])
        label = batch["label"][valid]
        loss = F.binary_cross_entropy_with_logits(logits, label)
        n = int(valid.sum())
        self.log("train/loss", loss, on_step=True, on_epoch=True, prog_bar=True, batch_size=n)
        self.log("train/accuracy", ((logits > 0).float() == label).float().mean(), on_step=False, on_epoch=True,
                 batch_size=n)
        return loss

    def test_step(self, batch: dict, batch_idx: int) -> None:
        valid = batch["valid"].bool()
        self.skipped.update(float((~valid).sum()))
        if not valid.any():
            return
        logits = self(batch["image"][valid], batch["transformed"][valid])
        label = batch["label"][valid]
        hit = ((logits > 0).float() == label).float()
        for r, metric in enumerate(self.correct):
            in_range = label == r
            metric.update(hit[in_range].sum())
            self.count[r].update(in_range.sum().float())

    def on_test_epoch_end(self) -> None:
        correct = [float(m.compute()) for m in self.correct]
        count = [float(m.compute()) for m in self.count]
        total = sum(count)
        self.log("test/accuracy", sum(correct) / max(total, 1.0))
        self.log("test/accuracy_below", correct[0] / max(count[0], 1.0))
        self.log("test/accuracy_above", correct[1] / max(count[1], 1.0))
        self.log("test/pairs", total)
        self.log("test/skipped", float(self.skipped.compute()))
        for m in (*self.correct, *self.count, self.skipped):
            m.reset()

    def configure_optimizers(self):
        params = self.net.parameters()
        if self.hparams.optimizer == "adam":
            return torch.optim.Adam(params, lr=self.hparams.lr, weight_decay=self.hparams.weight_decay)
        return torch.optim.SGD(params, lr=self.hparams.lr, momentum=0.9, weight_decay=self.hparams.weight_decay)
