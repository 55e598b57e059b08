"""Feature inversion (Dosovitskiy & Brox, CVPR 2016) for the generators paper's pictures (Fig. 3, A2).

``python train.py --model inversion --model.layer conv1`` (or ``conv5``) trains a
:class:`topdown.inversion.UpconvDecoder` from one AlexNet layer's features to the
image, the AlexNet frozen (``--model.weights``: the same file as the generator
bank's; none = the seeded random AlexNet every command shares). Data: the
``scenes`` images or any image folder (:class:`datamodules.images.ImageFolderDataModule`).

Loss: mean squared error between the reconstruction and the image, in
ImageNet-normalised colour space. Logged: ``train/loss``, ``val/loss``,
``test/loss``, ``{val,test}/skipped``. The test stage also writes
``<run>/inversions.png`` (test images above their reconstructions) and logs it
to W&B. The checkpoint holds the decoder and the AlexNet it inverts:
``InversionModule.load_from_checkpoint(path)`` is all that ``scripts/pictures.py`` needs.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F
from lightning.pytorch import LightningModule
from torchmetrics import MeanMetric, SumMetric

from topdown.generators import ConvFeatures
from topdown.inversion import UpconvDecoder, to_rgb

PICTURE_FILE = "inversions.png"


class InversionModule(LightningModule):
    """Args:
        layer: AlexNet layer to invert (paper name: ``conv1`` .. ``conv5``).
        weights: AlexNet weights file (frozen); ``None``: random init from ``init_seed``.
        image_size: image side (linked from the datamodule; 224 gives the bank's 55 / 13 px maps).
        width, convs: decoder size (:class:`topdown.inversion.UpconvDecoder`).
        lr: Adam learning rate (D&B: Adam).
        pictures: test images shown in ``inversions.png``.
    """

    def __init__(self, layer: str = "conv1", weights: Optional[str] = None, image_size: int = 224,
                 width: int = 64, convs: int = 2, lr: float = 1e-3, init_seed: int = 0, pictures: int = 8):
        super().__init__()
        self.save_hyperparameters()
        self.extractor = ConvFeatures((layer,), weights, init_seed=init_seed).eval()
        self.extractor.requires_grad_(False)
        with torch.no_grad():
            c, h, _ = self.extractor(torch.zeros(1, 3, image_size, image_size))[layer].shape[1:]
        self.decoder = UpconvDecoder(c, h, image_size, width, convs)
        self.val_loss, self.test_loss = MeanMetric(), MeanMetric()
        self.val_skipped, self.test_skipped = SumMetric(), SumMetric()
        self._shown: list[torch.Tensor] = []

    def train(self, mode: bool = True):
        super().train(mode)
        self.extractor.eval()  # frozen: never in training mode
        return self

    def features(self, images: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return self.extractor(images)[self.hparams.layer]

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """Image ``[B, 3, S, S]`` (normalised colour space) reconstructed from the layer's features."""
        return self.decoder(features)

    def training_step(self, batch: dict, batch_idx: int):
        images = batch["image"][batch["valid"].bool()]
        if images.shape[0] == 0:
            return None
        loss = F.mse_loss(self(self.features(images)), images)
        self.log("train/loss", loss, on_step=True, on_epoch=True, prog_bar=True, batch_size=images.shape[0])
        return loss

    def _evaluate(self, batch: dict, loss_metric: MeanMetric, skipped: SumMetric) -> torch.Tensor | None:
        valid = batch["valid"].bool()
        skipped.update(float((~valid).sum()))
        images = batch["image"][valid]
        if images.shape[0] == 0:
            return None
        recon = self(self.features(images))
        loss_metric.update(F.mse_loss(recon, images, reduction="none").mean(dim=(1, 2, 3)))
        return recon

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        self._evaluate(batch, self.val_loss, self.val_skipped)

    def on_validation_epoch_end(self) -> None:
        self.log("val/loss", self.val_loss.compute(), prog_bar=True)
        self.log("val/skipped", self.val_skipped.compute())
        self.val_loss.reset(), self.val_skipped.reset()

    def on_test_epoch_start(self) -> None:
        self._shown = []

    def test_step(self, batch: dict, batch_idx: int) -> None:
        recon = self._evaluate(batch, self.test_loss, self.test_skipped)
        have = sum(x.shape[0] for x in self._shown)
        if recon is not None and have < self.hparams.pictures:
            images = batch["image"][batch["valid"].bool()]
            k = min(self.hparams.pictures - have, images.shape[0])
            self._shown.append(torch.stack((images[:k], recon[:k]), dim=1).cpu())

    def on_test_epoch_end(self) -> None:
        self.log("test/loss", self.test_loss.compute())
        self.log("test/skipped", self.test_skipped.compute())
        self.test_loss.reset(), self.test_skipped.reset()
        if self.trainer.is_global_zero and self._shown and not self.trainer.sanity_checking:
            from topdown.pictures import save_image_rows

            pairs = torch.cat(self._shown)  # [N, 2, 3, S, S]
            run_dir = Path(self.trainer.log_dir or self.trainer.default_root_dir)
            path = save_image_rows(run_dir / PICTURE_FILE, [to_rgb(pairs[:, 0]), to_rgb(pairs[:, 1])],
                                   row_labels=["image", f"inverted {self.hparams.layer}"],
                                   title=f"Inversion of AlexNet {self.hparams.layer} features (test images)")
            for logger in self.trainer.loggers:
                if hasattr(logger, "log_image"):
                    logger.log_image(key=f"test/inversions_{self.hparams.layer}", images=[str(path)])

    def configure_optimizers(self):
        return torch.optim.Adam(self.decoder.parameters(), lr=self.hparams.lr)
