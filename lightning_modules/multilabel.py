"""Multi-label image annotation (feedback-prop §4.1): a CNN with one logistic output per label."""
from __future__ import annotations

from typing import Literal, Optional

import torch
from lightning.pytorch import LightningModule
from lightning.pytorch.utilities import rank_zero_info
from torchmetrics import SumMetric

from lightning_modules.metrics import LabelMAP
from topdown.backbones import build_backbone, train_head_only
from topdown.losses import weighted_bce


class MultiLabelModule(LightningModule):
    """Trains ``backbone`` with the weighted BCE of eq. 6 and reports macro mAP per stage.

    Args:
        backbone: torchvision model name (``resnet18``, ``resnet50``, ``vgg16``, ...).
        num_labels: vocabulary size K (linked from the datamodule).
        label_weights: lambda_j of eq. 6, [K] (linked from the datamodule); ones when absent.
        head: ``linear`` or the reference code's ``conv_max`` (1x1 conv, spatial max).
        weights: pretrained weights: a local file or a cached torchvision weights name; the trunk
            must be complete in it (:func:`topdown.backbones.load_weights`) unless ``partial_weights``.
        partial_weights: accept a file that holds only part of the trunk (the rest stays random).
        freeze_backbone_epochs: the reference recipe: train only the head for this many epochs,
            then fine-tune end to end.
    """

    def __init__(
        self,
        backbone: str = "resnet18",
        num_labels: int = 100,
        label_weights: Optional[torch.Tensor] = None,
        head: Literal["linear", "conv_max"] = "linear",
        weights: Optional[str] = None,
        optimizer: Literal["adam", "sgd"] = "adam",
        lr: float = 1e-3,
        weight_decay: float = 1e-4,
        freeze_backbone_epochs: int = 0,
        partial_weights: bool = False,
    ):
        super().__init__()
        self.save_hyperparameters(ignore=["label_weights"])
        self.net = build_backbone(backbone, num_labels, head=head, weights=weights, partial_weights=partial_weights)
        if self.net.topdown_weights is not None:
            rank_zero_info(str(self.net.topdown_weights))
        weights_ = torch.ones(num_labels) if label_weights is None else torch.as_tensor(label_weights).float()
        if weights_.shape != (num_labels,):
            raise ValueError(f"label_weights has shape {tuple(weights_.shape)}, expected ({num_labels},)")
        self.register_buffer("label_weights", weights_)
        # One metric object per stage: their states never mix.
        self.val_map, self.test_map = LabelMAP(num_labels), LabelMAP(num_labels)
        self.val_skipped, self.test_skipped = SumMetric(), SumMetric()

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.net(images)

    def on_train_epoch_start(self) -> None:
        train_head_only(self.net, self.current_epoch < self.hparams.freeze_backbone_epochs)

    def _valid(self, batch: dict, stage: str, skipped: SumMetric | None = None):
        valid = batch["valid"]
        n_bad = int((~valid).sum())
        if skipped is not None:
            skipped.update(torch.tensor(float(n_bad), device=self.device))
        elif n_bad:
            self.log(f"{stage}/skipped", float(n_bad), on_step=False, on_epoch=True, reduce_fx="sum")
        return batch["image"][valid], batch["labels"][valid]

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor | None:
        images, labels = self._valid(batch, "train")
        if images.shape[0] == 0:
            return None
        loss = weighted_bce(self(images), labels, self.label_weights)
        self.log("train/loss", loss, on_step=True, on_epoch=True, prog_bar=True, batch_size=images.shape[0])
        return loss

    def _evaluate(self, batch: dict, stage: str, metric: LabelMAP, skipped: SumMetric) -> None:
        images, labels = self._valid(batch, stage, skipped)
        if images.shape[0] == 0:
            return
        logits = self(images)
        # Per-rank loss only: a synced per-step log would deadlock when ranks hold unequal batches.
        self.log(f"{stage}/loss", weighted_bce(logits, labels, self.label_weights), batch_size=images.shape[0])
        metric.update(torch.sigmoid(logits), labels.long())

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        self._evaluate(batch, "val", self.val_map, self.val_skipped)

    def on_validation_epoch_end(self) -> None:
        self.log("val/map", self.val_map.compute(), prog_bar=True)
        self.log("val/skipped", self.val_skipped.compute())
        self.val_map.reset(), self.val_skipped.reset()

    def test_step(self, batch: dict, batch_idx: int) -> None:
        self._evaluate(batch, "test", self.test_map, self.test_skipped)

    def on_test_epoch_end(self) -> None:
        self.log("test/map", self.test_map.compute())
        self.log("test/skipped", self.test_skipped.compute())
        self.test_map.reset(), self.test_skipped.reset()

    def configure_optimizers(self):
        params = [p for p in self.net.parameters()]
        if self.hparams.optimizer == "adam":
            return torch.optim.Adam(params, lr=self.hparams.lr, weight_decay=self.hparams.weight_decay)
        return torch.optim.SGD(params, lr=self.hparams.lr, momentum=0.9, weight_decay=self.hparams.weight_decay)
