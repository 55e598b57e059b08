"""Warp-augmented AlexNet: generator training inside the network (generators paper §3.3, Fig. 5, Table 1).

``python train.py --model warp_alexnet`` trains a torchvision classifier (AlexNet by
default) on ILSVRC CLS-LOC or its ``scenes`` view (:mod:`datamodules.ilsvrc`).
With ``bank`` (a ``generator_bank.pt`` of ``train.py --model generators``), a
:class:`topdown.warp.GeneratorWarp` after ``warp_layer`` (conv5) warps each
training batch by one of ``generators`` drawn uniformly, with the approximate
inverse warp in backward (``warp_backward="negate"``); without a bank it is the
plain network. Validation and test never warp.

Logged keys (accuracies in percent): ``train/loss``, ``train/warped`` (share of
warped batches), ``{val,test}/loss``, ``{val,test}/top1``, ``{val,test}/top5``
(centre crop), ``test/top1_10view``, ``test/top5_10view`` (four corners and the
centre, mirrored, softmax averaged), ``{val,test}/skipped``.

The checkpoint's network is ``net.*`` in torchvision's names, so it is an AlexNet
weights file for :func:`topdown.backbones.load_state` (which drops the ``net.``
prefix): ``--model.weights runs/warp_alexnet/version_N/checkpoints/last.ckpt`` of
``train.py --model generators``.
"""
from __future__ import annotations

from typing import Literal, Optional

import torch
import torch.nn.functional as F
from lightning.pytorch import LightningModule
from lightning.pytorch.utilities import rank_zero_info
from torchmetrics import MetricCollection, SumMetric
from torchmetrics.classification import MulticlassAccuracy

from datamodules.common import valid_rows
from topdown.backbones import build_backbone, load_state
from topdown.warp import PAPER_GENERATORS, GeneratorWarp, attach, check_bank_fits, layer_size, view_probabilities


def topk_accuracy(num_classes: int) -> MetricCollection:
    """Top-1 and top-5 accuracy (micro: the share of samples whose class is among the k best scores).

    The states are sums, all-reduced over DDP ranks, and the eval sampler gives every
    sample to exactly one rank, so the figures do not depend on the number of devices.
    """
    return MetricCollection({f"top{k}": MulticlassAccuracy(num_classes, top_k=min(k, num_classes), average="micro")
                             for k in (1, 5)}, compute_groups=False)


class WarpAlexNetModule(LightningModule):
    """Classifier with optional generator training at ``warp_layer`` (Fig. 5).

    Args:
        num_classes: classes (linked from the datamodule).
        backbone: torchvision classification model name (the paper: ``alexnet``).
        weights: pretrained trunk, a local file or a cached torchvision weights name (the head is new).
        init_from: a checkpoint of this model (or any file with this network's tensors) whose whole
            network, head included, starts the run: Table 1's "additional epochs" continue a trained
            network. Every tensor of the network must be in the file.
        image_size: the network's input side (linked from the datamodule's ``crop_size``); the bank's
            ``warp_layer`` maps must have the size this input gives (checked when the module is built).
        bank: generator bank file; turns generator training on. None = the plain network.
        generators: ``[kind, amount]`` pairs drawn from, in the bank's units (degrees, zoom factor, pixels
            at the bank's image size; the paper: +30°, -30°, 1.3x, 0.75x, 30 px left, 30 px up at 224).
        warp_layer: the layer whose output is warped, a paper name of the bank (the paper: ``conv5``).
        warp_p: probability that a training batch is warped (the paper: 1, every batch).
        warp_backward: ``negate`` (the paper's approximate inverse) or ``autograd`` (the exact adjoint).
        warp_inverse: how the forward warp applies a flow (:func:`topdown.warp.warp_features`).
        warp_seed: seed of the per-batch draws; the draw of step t is the same on every DDP rank.
        optimizer, lr, momentum, weight_decay: SGD with momentum (AlexNet's recipe) or Adam.
        lr_schedule: ``constant`` or ``cosine`` (to zero over ``trainer.max_epochs``).
    """

    def __init__(
        self,
        num_classes: int = 1000,
        backbone: str = "alexnet",
        weights: Optional[str] = None,
        init_from: Optional[str] = None,
        image_size: int = 224,
        bank: Optional[str] = None,
        generators: list[tuple[str, float]] = [list(g) for g in PAPER_GENERATORS],  # noqa: B006 (CLI default)
        warp_layer: str = "conv5",
        warp_p: float = 1.0,
        warp_backward: Literal["negate", "autograd"] = "negate",
        warp_inverse: Literal["negate", "exact"] = "negate",
        warp_seed: int = 0,
        optimizer: Literal["sgd", "adam"] = "sgd",
        lr: float = 0.01,
        momentum: float = 0.9,
        weight_decay: float = 5e-4,
        lr_schedule: Literal["constant", "cosine"] = "constant",
    ):
        super().__init__()
        self.save_hyperparameters()
        self.net = build_backbone(backbone, num_classes, weights=weights)
        if init_from:
            self._load_network(init_from)
        self.warp: Optional[GeneratorWarp] = None
        if bank:
            from topdown.generators import GeneratorBank

            gbank = GeneratorBank.load(bank)
            check_bank_fits(gbank, warp_layer, layer_size(self.net, warp_layer, image_size), image_size,
                            f"generator bank {bank}")
            self.warp = GeneratorWarp.from_bank(gbank, warp_layer, generators, p=warp_p, backward=warp_backward,
                                                inverse=warp_inverse, seed=warp_seed)
            attach(self.net, warp_layer, self.warp)
        self.val_acc, self.test_acc, self.test_acc10 = (topk_accuracy(num_classes) for _ in range(3))
        self.val_skipped, self.test_skipped = SumMetric(), SumMetric()

    def _load_network(self, path: str) -> None:
        try:
            state = load_state(path)
        except FileNotFoundError as err:
            raise FileNotFoundError(f"init_from: {err} (evaluating or resuming a checkpoint of a run that started "
                                    "from it? pass --model.init_from null: the checkpoint holds the network)") from None
        own = self.net.state_dict()
        missing = [k for k in own if k not in state]
        if missing:
            raise ValueError(f"init_from {path} lacks {len(missing)} tensor(s) of the {self.hparams.backbone} network, "
                             f"e.g. {missing[:3]}: not a checkpoint of this model?")
        wrong = [f"{k} {tuple(state[k].shape)} vs {tuple(v.shape)}" for k, v in own.items() if state[k].shape != v.shape]
        if wrong:
            raise ValueError(f"init_from {path}: tensor shapes differ from the network's (other num_classes?): "
                             + "; ".join(wrong[:3]))
        self.net.load_state_dict({k: state[k] for k in own})

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.net(images)

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        """Checkpoints load with or without a bank: the warp's buffers are training state, not the network."""
        state = checkpoint.get("state_dict", {})
        saved = [k for k in state if k.startswith("warp.")]
        if self.warp is None and saved:
            for k in saved:
                del state[k]
            rank_zero_info("warp_alexnet: the checkpoint was trained with a generator bank; this run has none")
        elif self.warp is not None and not saved:
            state.update({f"warp.{k}": v for k, v in self.warp.state_dict().items()})
            rank_zero_info("warp_alexnet: the checkpoint has no generator warp; generator training starts from step 0")


    # ---------------------------------------------------------------- training
    def training_step(self, batch: dict, batch_idx: int):
        b = valid_rows(batch)
        n = b["image"].shape[0]
        if n == 0:
            return None
        loss = F.cross_entropy(self(b["image"]), b["target"])
        self.log("train/loss", loss, on_step=True, on_epoch=True, prog_bar=True, batch_size=n)
        if self.warp is not None:
            self.log("train/warped", float(self.warp.last is not None), on_step=False, on_epoch=True, batch_size=n)
        return loss

    # ---------------------------------------------------------------- evaluation
    def _evaluate(self, batch: dict, stage: str, acc: MetricCollection, skipped: SumMetric,
                  acc10: Optional[MetricCollection] = None) -> None:
        skipped.update(torch.tensor(float((~batch["valid"]).sum()), device=self.device))
        b = valid_rows(batch)
        n = b["image"].shape[0]
        if n == 0:
            return
        if acc10 is not None and "views" in b:
            views = b["views"]
            centre, multi = view_probabilities(self(views.flatten(0, 1)).unflatten(0, views.shape[:2]))
            acc10.update(multi, b["target"])
        else:
            centre = self(b["image"]).float().softmax(-1)
        # Per-rank loss only: a synced per-step log could deadlock on unequal batches.
        self.log(f"{stage}/loss", F.nll_loss(centre.clamp_min(1e-12).log(), b["target"]), batch_size=n)
        acc.update(centre, b["target"])

    def _log_epoch(self, stage: str, acc: MetricCollection, skipped: SumMetric,
                   acc10: Optional[MetricCollection] = None) -> None:
        # Every rank computes (the states are all-reduced); percent, as Table 1.
        for name, v in acc.compute().items():
            self.log(f"{stage}/{name}", 100.0 * v, prog_bar=name == "top1")
        acc.reset()
        dm = getattr(self.trainer, "datamodule", None)
        if acc10 is not None and getattr(dm, "test_views", 10) > 1:  # decided by the data's config: same on all ranks
            for name, v in acc10.compute().items():
                self.log(f"{stage}/{name}_10view", 100.0 * v)
            acc10.reset()
        if self.trainer.is_global_zero and hasattr(dm, "skipped_count"):
            skipped.update(torch.tensor(float(dm.skipped_count(stage)), device=self.device))  # left out at reading
        self.log(f"{stage}/skipped", skipped.compute())
        skipped.reset()

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        self._evaluate(batch, "val", self.val_acc, self.val_skipped)

    def on_validation_epoch_end(self) -> None:
        self._log_epoch("val", self.val_acc, self.val_skipped)

    def test_step(self, batch: dict, batch_idx: int) -> None:
        self._evaluate(batch, "test", self.test_acc, self.test_skipped, self.test_acc10)

    def on_test_epoch_end(self) -> None:
        self._log_epoch("test", self.test_acc, self.test_skipped, self.test_acc10)

    # ---------------------------------------------------------------- optimization
    def configure_optimizers(self):
        hp = self.hparams
        params = [p for p in self.net.parameters() if p.requires_grad]
        if hp.optimizer == "sgd":
            opt = torch.optim.SGD(params, lr=hp.lr, momentum=hp.momentum, weight_decay=hp.weight_decay)
        else:
            try:
                opt = torch.optim.Adam(params, lr=hp.lr, weight_decay=hp.weight_decay, fused=True)
            except RuntimeError:  # fused kernels exist for cpu/cuda/mps only
                opt = torch.optim.Adam(params, lr=hp.lr, weight_decay=hp.weight_decay)
        if hp.lr_schedule == "constant":
            return opt
        epochs = max(1, int(self.trainer.max_epochs or 1))
        return {"optimizer": opt, "lr_scheduler": torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs)}
