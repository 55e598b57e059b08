"""News images (feedback-prop §4.3): one trunk, a caption-noun head and an article-noun head."""
from __future__ import annotations

from typing import Literal, Optional

import torch
from lightning.pytorch import LightningModule
from lightning.pytorch.utilities import rank_zero_info
from torchmetrics import SumMetric

from lightning_modules.metrics import LabelMAP
from topdown.backbones import build_backbone, train_head_only
from topdown.losses import weighted_bce
from topdown.news import HEADS, multi_head


class NewsModule(LightningModule):
    """Trains ``backbone`` with the sum of the two heads' eq. 6 losses; reports mAP per head and stage.

    The network (``self.net``) returns ``{"caption": logits [B, K_c], "article": logits [B, K_a]}``.

    Args:
        backbone: torchvision model name (ResNet-50 as in the paper; any classifier with a linear head).
        num_caption_labels, num_article_labels: vocabulary sizes (linked from the datamodule).
        caption_label_weights, article_label_weights: lambda_j of eq. 6 per head (linked); ones when absent.
        weights: pretrained trunk: a local file or a cached torchvision weights name; the trunk must be
            complete in it (:func:`topdown.backbones.load_weights`) unless ``partial_weights``.
        freeze_backbone_epochs: train only the heads for this many epochs, then end to end.
        partial_weights: accept a file that holds only part of the trunk (the rest stays random).
    """

    def __init__(
        self,
        backbone: str = "resnet50",
        num_caption_labels: int = 500,
        num_article_labels: int = 1000,
        caption_label_weights: Optional[torch.Tensor] = None,
        article_label_weights: Optional[torch.Tensor] = None,
        weights: Optional[str] = None,
        optimizer: Literal["adam", "sgd"] = "adam",
        lr: float = 1e-3,
        weight_decay: float = 1e-4,
        freeze_backbone_epochs: int = 0,
        partial_weights: bool = False,
    ):
        super().__init__()
        self.save_hyperparameters(ignore=["caption_label_weights", "article_label_weights"])
        sizes = {"caption": num_caption_labels, "article": num_article_labels}
        self.net = multi_head(build_backbone(backbone, num_caption_labels, weights=weights,
                                             partial_weights=partial_weights), sizes)
        if self.net.topdown_weights is not None:
            rank_zero_info(str(self.net.topdown_weights))
        for head, given in (("caption", caption_label_weights), ("article", article_label_weights)):
            w = torch.ones(sizes[head]) if given is None else torch.as_tensor(given).float()
            if w.shape != (sizes[head],):
                raise ValueError(f"{head}_label_weights has shape {tuple(w.shape)}, expected ({sizes[head]},)")
            self.register_buffer(f"{head}_weights", w)
        # one metric object per stage and head: their states never mix
        self.maps = torch.nn.ModuleDict({f"{stage}_{h}": LabelMAP(sizes[h]) for stage in ("val", "test") for h in HEADS})
        self.val_skipped, self.test_skipped = SumMetric(), SumMetric()

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        return self.net(images)

    def on_train_epoch_start(self) -> None:
        train_head_only(self.net, self.current_epoch < self.hparams.freeze_backbone_epochs)

    def _valid(self, batch: dict, skipped: SumMetric | None, stage: str):
        valid = batch["valid"]
        n_bad = int((~valid).sum())
        if skipped is not None:
            skipped.update(torch.tensor(float(n_bad), device=self.device))
        elif n_bad:
            self.log(f"{stage}/skipped", float(n_bad), on_step=False, on_epoch=True, reduce_fx="sum")
        return batch["image"][valid], {h: batch[f"{h}_labels"][valid] for h in HEADS}

    def losses(self, outputs: dict, labels: dict) -> dict[str, torch.Tensor]:
        """Eq. 6 per head (each with its own lambda_j)."""
        return {h: weighted_bce(outputs[h], labels[h], getattr(self, f"{h}_weights")) for h in HEADS}

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor | None:
        images, labels = self._valid(batch, None, "train")
        if images.shape[0] == 0:
            return None
        parts = self.losses(self(images), labels)
        loss = parts["caption"] + parts["article"]
        n = images.shape[0]
        self.log("train/loss", loss, on_step=True, on_epoch=True, prog_bar=True, batch_size=n)
        for h, v in parts.items():
            self.log(f"train/loss_{h}", v, on_step=False, on_epoch=True, batch_size=n)
        return loss

    def _evaluate(self, batch: dict, stage: str, skipped: SumMetric) -> None:
        images, labels = self._valid(batch, skipped, stage)
        if images.shape[0] == 0:
            return
        outputs = self(images)
        parts = self.losses(outputs, labels)
        # per-rank loss only: a synced per-step log would deadlock when ranks hold unequal batches
        self.log(f"{stage}/loss", parts["caption"] + parts["article"], batch_size=images.shape[0])
        for h in HEADS:
            self.maps[f"{stage}_{h}"].update(torch.sigmoid(outputs[h]), labels[h].long())

    def _epoch_end(self, stage: str, skipped: SumMetric) -> None:
        for h in HEADS:
            metric = self.maps[f"{stage}_{h}"]
            # a split whose images were all skipped has no mAP (nothing to gather either)
            value = metric.compute() if metric.update_called or self.trainer.world_size > 1 else float("nan")
            self.log(f"{stage}/map_{h}", value, prog_bar=h == "caption")
            metric.reset()
        self.log(f"{stage}/skipped", skipped.compute())
        skipped.reset()

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        self._evaluate(batch, "val", self.val_skipped)

    def on_validation_epoch_end(self) -> None:
        self._epoch_end("val", self.val_skipped)

    def test_step(self, batch: dict, batch_idx: int) -> None:
        self._evaluate(batch, "test", self.test_skipped)

    def on_test_epoch_end(self) -> None:
        self._epoch_end("test", self.test_skipped)

    def configure_optimizers(self):
        params = list(self.net.parameters())
        if self.hparams.optimizer == "adam":
            return torch.optim.Adam(params, lr=self.hparams.lr, weight_decay=self.hparams.weight_decay)
        return torch.optim.SGD(params, lr=self.hparams.lr, momentum=0.9, weight_decay=self.hparams.weight_decay)
