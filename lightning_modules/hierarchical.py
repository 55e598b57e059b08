"""Hierarchical scene categorization (feedback-prop §4.2, Table 1): one LightningModule, five rows.

``variant`` picks the network trained by ``python train.py --model hierarchical``:

* ``baseline``: CNN + softmax over the fine categories;
* ``baseline_pl``: the same with the true coarse indicator concatenated to the classifier input;
* ``sinn_pl``: SINN (Hu et al. 2016) with the coarse labels as partial labels.

The LF / RF rows evaluate a trained ``baseline`` with feedback-prop, the true coarse labels as
known evidence (:class:`topdown.evidence.CoarseLabelEvidence`), through the shared protocols:
``evaluate.py --feedback.protocol select`` chooses λ and T on val and reports test
(``scripts/table1.py`` runs it). ``feedback_layers`` are the model's default pivots (AlexNet
conv2..conv5 as in the paper).

Logged keys: ``train/loss``, ``{val,test}/loss``, ``{val,test}/mc_acc``, ``{val,test}/map``,
``{val,test}/iou_acc`` (percent, topdown.metrics), ``{val,test}/skipped``, and the same three figures
of the fine softmax conditioned on the true coarse labels, ``{val,test}/cond_mc_acc``,
``{val,test}/cond_map``, ``{val,test}/cond_iou_acc`` (:func:`topdown.sinn.condition_on_coarse`;
the ``Bsln + cond`` row of Table 1 for the Baseline).
"""
from __future__ import annotations

from typing import Literal, Optional

import torch
import torch.nn.functional as F
from lightning.pytorch import LightningModule
from lightning.pytorch.utilities import rank_zero_info
from torchmetrics import Metric, SumMetric
from torchmetrics.utilities.data import dim_zero_cat

from datamodules.common import valid_rows
from topdown.metrics import table1_metrics
from topdown.sinn import (
    DEFAULT_THRESHOLD,
    SINN,
    FineClassifier,
    condition_on_coarse,
    feature_trunk,
    pearson_correlation,
    relation_masks,
    sinn_loss,
    stacked_level_targets,
)

VARIANTS = ("baseline", "baseline_pl", "sinn_pl")


class Table1Metric(Metric):
    """Collects fine-category scores and targets of a split; computes MC Acc, mAP and IoU Acc.

    The states are concatenated across DDP ranks, and the eval sampler gives every sample to
    exactly one rank, so the figures do not depend on the number of devices.
    """

    full_state_update = False

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.add_state("scores", default=[], dist_reduce_fx="cat")
        self.add_state("target", default=[], dist_reduce_fx="cat")

    def update(self, scores: torch.Tensor, target: torch.Tensor) -> None:
        self.scores.append(scores.detach().float())
        self.target.append(target.detach().long())

    def compute(self) -> dict[str, float]:
        if not self.scores:
            return {"mc_acc": float("nan"), "map": float("nan"), "iou_acc": float("nan")}
        return table1_metrics(dim_zero_cat(self.scores), dim_zero_cat(self.target))


class HierarchicalModule(LightningModule):
    """Baseline, Baseline + PL and SINN + PL of feedback-prop Table 1 (the LF / RF rows: module docstring).

    Args:
        variant: ``baseline``, ``baseline_pl`` or ``sinn_pl`` (see module docstring).
        backbone: torchvision model name (AlexNet as in the paper; any classification model works).
        weights: pretrained weights: a local file (e.g. a Places365 AlexNet state dict) or a cached
            torchvision weights name; random init when None.  The trunk must be complete in the
            file (:func:`topdown.backbones.load_weights`) unless ``partial_weights``.
        partial_weights: accept a file that holds only part of the trunk (the rest stays random).
        num_classes, num_general, num_coarse: level sizes (linked from the datamodule).
        relation_threshold: τ of SINN's relation graphs: positive where the Pearson correlation of
            two labels on the training split is > τ, negative where < −τ.
        lr, weight_decay: rate and weight decay of the training optimizer (``optimizer``; Adam is
            fused where torch supports it: on CPU it is ~10x cheaper than the per-tensor update).
        head_lr: rate of the layers after the trunk (the classifier, SINN's level and relation
            layers); None = ``lr``. Fine-tuning from a pretrained trunk (Places365 in the paper, a
            trained Baseline in ``scripts/table1.py``) gives the new layers a higher rate so the
            three partial-label inputs of Bsln + PL can gain weight in a few epochs.
        feedback_layers: the default pivots of its feedback-prop evaluation, in forward order
            (paper names or module names; ``--feedback.layers`` overrides them).

    The hierarchy (``fine_to_general``, ``fine_to_coarse``) and SINN's relation graphs are read
    from the datamodule in ``setup`` and kept as buffers, so a checkpoint carries them.
    """

    def __init__(
        self,
        variant: Literal["baseline", "baseline_pl", "sinn_pl"] = "baseline",
        backbone: str = "alexnet",
        weights: Optional[str] = None,
        num_classes: int = 397,
        num_general: int = 16,
        num_coarse: int = 3,
        relation_threshold: float = DEFAULT_THRESHOLD,
        optimizer: Literal["adam", "sgd"] = "adam",
        lr: float = 1e-4,
        weight_decay: float = 1e-4,
        head_lr: Optional[float] = None,
        feedback_layers: list[str] = ["conv2", "conv3", "conv4", "conv5"],  # noqa: B006 (CLI default)
        partial_weights: bool = False,
    ):
        super().__init__()
        if variant not in VARIANTS:
            raise ValueError(f"unknown variant {variant!r}; choose from {VARIANTS}")
        self.save_hyperparameters()
        trunk, dim = feature_trunk(backbone, weights, partial=partial_weights)
        if weights:
            rank_zero_info(str(trunk.topdown_weights))
        if variant == "sinn_pl":
            self.net = SINN(trunk, dim, (num_coarse, num_general, num_classes), observed=("coarse",))
        else:
            self.net = FineClassifier(trunk, dim, num_classes, num_partial=num_coarse if variant == "baseline_pl" else 0)
        self.register_buffer("fine_to_general", torch.zeros(num_classes, num_general))
        self.register_buffer("fine_to_coarse", torch.zeros(num_classes, num_coarse))
        self.val_metrics, self.test_metrics = Table1Metric(), Table1Metric()
        self.val_cond_metrics, self.test_cond_metrics = Table1Metric(), Table1Metric()
        self.val_skipped, self.test_skipped = SumMetric(), SumMetric()

    # ---------------------------------------------------------------- data-dependent state
    def setup(self, stage: str) -> None:
        dm = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        if dm is None or not hasattr(dm, "hierarchy"):
            return  # a checkpoint brings the buffers
        self.set_hierarchy(dm.hierarchy["fine_to_general"], dm.hierarchy["fine_to_coarse"],
                           dm.train_targets if self.hparams.variant == "sinn_pl" else None)

    @torch.no_grad()
    def set_hierarchy(self, fine_to_general: torch.Tensor, fine_to_coarse: torch.Tensor,
                      train_targets: Optional[torch.Tensor] = None) -> None:
        """Install the hierarchy and, for SINN, the relation graphs from the training labels."""
        for name, value in (("fine_to_general", fine_to_general), ("fine_to_coarse", fine_to_coarse)):
            buf = getattr(self, name)
            if tuple(value.shape) != tuple(buf.shape):
                raise ValueError(f"{name} from the data is {tuple(value.shape)}, the model was built for {tuple(buf.shape)}")
            buf.copy_(value)
        if isinstance(self.net, SINN) and train_targets is not None:
            labels = stacked_level_targets(train_targets, self.fine_to_general.cpu(), self.fine_to_coarse.cpu())
            positive, negative = relation_masks(pearson_correlation(labels), self.hparams.relation_threshold)
            self.net.set_relations(positive.to(self.device), negative.to(self.device))

    # ---------------------------------------------------------------- forward
    def forward(self, image: torch.Tensor, coarse: Optional[torch.Tensor] = None):
        """Fine logits (Baseline, Baseline + PL) or SINN's ``{"coarse", "general", "fine"}`` logits."""
        if self.hparams.variant == "baseline":
            return self.net(image)
        return self.net(image, coarse)

    @staticmethod
    def fine_logits(outputs) -> torch.Tensor:
        return outputs["fine"] if isinstance(outputs, dict) else outputs

    def loss(self, outputs, target: torch.Tensor) -> torch.Tensor:
        if isinstance(outputs, dict):
            return sinn_loss(outputs, target, self.fine_to_general, self.fine_to_coarse)
        return F.cross_entropy(outputs, target)


    def training_step(self, batch: dict, batch_idx: int):
        b = valid_rows(batch)
        if b["image"].shape[0] == 0:
            return None
        loss = self.loss(self(b["image"], b["coarse"]), b["target"])
        self.log("train/loss", loss, on_step=True, on_epoch=True, prog_bar=True, batch_size=b["image"].shape[0])
        return loss

    def _evaluate(self, batch: dict, stage: str, metric: Table1Metric, cond: Table1Metric, skipped: SumMetric) -> None:
        skipped.update(torch.tensor(float((~batch["valid"]).sum()), device=self.device))
        b = valid_rows(batch)
        if b["image"].shape[0] == 0:
            return
        logits = self.fine_logits(self(b["image"], b["coarse"]))
        # Per-rank loss only: a synced per-step log could deadlock on unequal batches.
        self.log(f"{stage}/loss", F.cross_entropy(logits, b["target"]), batch_size=b["image"].shape[0])
        metric.update(logits.softmax(-1), b["target"])
        cond.update(condition_on_coarse(logits, b["coarse"], self.fine_to_coarse), b["target"])

    def _log_epoch(self, stage: str, metric: Table1Metric, cond: Table1Metric, skipped: SumMetric) -> None:
        for key, value in metric.compute().items():
            self.log(f"{stage}/{key}", value, prog_bar=key == "mc_acc")
        for key, value in cond.compute().items():
            self.log(f"{stage}/cond_{key}", value)
        self.log(f"{stage}/skipped", skipped.compute())
        metric.reset(), cond.reset(), skipped.reset()

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        self._evaluate(batch, "val", self.val_metrics, self.val_cond_metrics, self.val_skipped)

    def on_validation_epoch_end(self) -> None:
        self._log_epoch("val", self.val_metrics, self.val_cond_metrics, self.val_skipped)

    def test_step(self, batch: dict, batch_idx: int) -> None:
        self._evaluate(batch, "test", self.test_metrics, self.test_cond_metrics, self.test_skipped)

    def on_test_epoch_end(self) -> None:
        self._log_epoch("test", self.test_metrics, self.test_cond_metrics, self.test_skipped)

    def configure_optimizers(self):
        trunk = [p for p in self.net.trunk.parameters() if p.requires_grad]
        in_trunk = {id(p) for p in trunk}
        head = [p for p in self.net.parameters() if p.requires_grad and id(p) not in in_trunk]
        lr, wd = self.hparams.lr, self.hparams.weight_decay
        head_lr = self.hparams.head_lr if self.hparams.head_lr is not None else lr
        groups = [g for g in ({"params": trunk, "lr": lr}, {"params": head, "lr": head_lr}) if g["params"]]
        if self.hparams.optimizer == "adam":
            try:
                return torch.optim.Adam(groups, lr=lr, weight_decay=wd, fused=True)
            except RuntimeError:  # fused kernels exist for cpu/cuda/mps only
                return torch.optim.Adam(groups, lr=lr, weight_decay=wd)
        return torch.optim.SGD(groups, lr=lr, momentum=0.9, weight_decay=wd)
