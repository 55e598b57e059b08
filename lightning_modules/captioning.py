"""Joint captioning and object categorization (feedback-prop §4.4): the wiring of
:class:`topdown.decoder.CaptionNet`, its two losses and the COCO caption metrics.

Loss = caption cross-entropy (teacher forcing) + ``object_loss_weight`` x eq. 6 on the object head.
Every validation and test epoch decodes the split with beam search, gathers the captions of all
DDP ranks (:class:`DecodedCaptions`; the evaluation sampler gives each image to one rank), scores
them in one call (:func:`topdown.captions.score_caption_sets`),
writes them as a COCO results file in the run folder and logs ``<stage>/BLEU-1..4``,
``<stage>/METEOR``, ``<stage>/ROUGE-L``, ``<stage>/CIDEr`` beside the object head's ``<stage>/map``,
``<stage>/skipped`` (unreadable images) and ``<stage>/skipped_no_instances``. The best checkpoint
is chosen by ``val/CIDEr`` (registry preset).

Feedback-prop (``evaluate.py --feedback.*``, Table 6) asks the module for its evidence,
:meth:`CaptioningModule.feedback_evidence`: the object labels known, the caption the target
(:class:`topdown.captions.CaptionEvidence`).
"""
from __future__ import annotations

from pathlib import Path
from typing import Literal, Optional

import torch
from lightning.pytorch import LightningModule
from torchmetrics import Metric, SumMetric
from torchmetrics.utilities.data import dim_zero_cat

from lightning_modules.metrics import LabelMAP
from topdown.captions import (METRICS, CaptionEvidence, CaptionVocab, score_caption_sets, start_meteor,
                              write_coco_results)
from topdown.decoder import CaptionNet, caption_loss
from topdown.losses import weighted_bce


class CaptioningModule(LightningModule):
    """Show and Tell plus an object head on one trunk.

    Args:
        backbone: torchvision model name (``resnet50`` as the paper; any classification model).
        num_objects, object_weights, vocabulary: linked from the datamodule (K, eq. 6's lambda_j,
            the caption words).
        weights: pretrained trunk weights, a local file or a cached torchvision weights name.
        partial_weights: accept a weights file that holds only part of the trunk.
        object_loss_weight: lambda of ``caption CE + lambda * object loss``.
        lr, trunk_lr: Adam rates of the heads and of the trunk (``trunk_lr`` None: ``lr``).
        freeze_trunk_epochs: train the heads only (trunk frozen, BatchNorm statistics too) for
            this many epochs, then end to end.
        beam_size, max_decode_len: decoding of the validation and test captions (beam 1 = greedy).
        metrics: caption metrics computed at validation and test (default all; without METEOR
            no Java process is needed for it).
        results_dir: where the COCO results files go (default the run folder).
    """

    def __init__(
        self,
        backbone: str = "resnet50",
        num_objects: int = 80,
        object_weights: Optional[torch.Tensor] = None,
        vocabulary: Optional[list[str]] = None,
        weights: Optional[str] = None,
        partial_weights: bool = False,
        embed_dim: int = 512,
        hidden_dim: int = 512,
        dropout: float = 0.5,
        object_loss_weight: float = 1.0,
        optimizer: Literal["adam", "sgd"] = "adam",
        lr: float = 4e-4,
        trunk_lr: Optional[float] = None,
        weight_decay: float = 0.0,
        freeze_trunk_epochs: int = 0,
        beam_size: int = 3,
        max_decode_len: int = 16,
        metrics: Optional[list[str]] = None,
        results_dir: Optional[str] = None,
    ):
        super().__init__()
        self.save_hyperparameters(ignore=["object_weights", "vocabulary"])
        if not vocabulary:
            raise ValueError("CaptioningModule needs the caption vocabulary (linked from the datamodule's "
                             "caption_vocabulary)")
        self.vocab = CaptionVocab(tuple(vocabulary))
        bad = [m for m in (metrics or []) if m not in METRICS]
        if bad:
            raise ValueError(f"unknown caption metrics {bad}; choose from {METRICS}")
        self.metrics = tuple(metrics) if metrics else METRICS
        self.net = CaptionNet(backbone, num_objects, len(self.vocab), weights, embed_dim, hidden_dim, dropout,
                              partial_weights=partial_weights)
        w = torch.ones(num_objects) if object_weights is None else torch.as_tensor(object_weights).float()
        if w.shape != (num_objects,):
            raise ValueError(f"object_weights has shape {tuple(w.shape)}, expected ({num_objects},)")
        self.register_buffer("object_weights", w)
        self.maps = torch.nn.ModuleDict({s: LabelMAP(num_objects) for s in ("val", "test")})
        self.skipped = torch.nn.ModuleDict({s: SumMetric() for s in ("val", "test")})
        self.decoded = torch.nn.ModuleDict({s: DecodedCaptions() for s in ("val", "test")})
        self.last_captions: dict[str, dict[int, str]] = {}

    def forward(self, images: torch.Tensor, captions: Optional[torch.Tensor] = None) -> dict[str, torch.Tensor]:
        return self.net(images, captions)

    # ------------------------------------------------------------------ training
    def on_train_epoch_start(self) -> None:
        frozen = self.current_epoch < self.hparams.freeze_trunk_epochs
        self.net.trunk.requires_grad_(not frozen)
        self.net.trunk.train(not frozen)  # a frozen trunk keeps its BatchNorm statistics too

    def _valid(self, batch: dict):
        v = batch["valid"]
        return batch["image"][v], batch["labels"][v], batch["captions"][v], batch["index"][v], int((~v).sum())

    def _losses(self, images, labels, captions) -> tuple[dict, dict]:
        flat = captions.flatten(0, 1)
        out = self.net(images, flat)
        cap = caption_loss(out["caption"], flat)
        obj = weighted_bce(out["objects"], labels, self.object_weights)
        return out, {"loss": cap + self.hparams.object_loss_weight * obj, "caption_loss": cap, "object_loss": obj}

    def training_step(self, batch: dict, batch_idx: int) -> Optional[torch.Tensor]:
        images, labels, captions, _, n_bad = self._valid(batch)
        if n_bad:
            self.log("train/skipped", float(n_bad), on_step=False, on_epoch=True, reduce_fx="sum")
        if images.shape[0] == 0:
            return None
        _, losses = self._losses(images, labels, captions)
        for k, v in losses.items():
            self.log(f"train/{k}", v, on_step=True, on_epoch=True, prog_bar=k == "loss", batch_size=images.shape[0])
        return losses["loss"]

    # ---------------------------------------------------------------- evaluation
    def _start(self, stage: str) -> None:
        self.decoded[stage].reset()
        if "METEOR" in self.metrics and self.trainer.is_global_zero and not self.trainer.sanity_checking:
            start_meteor()  # the JVM loads while the split is decoded

    def on_validation_epoch_start(self) -> None:
        self._start("val")

    def on_test_epoch_start(self) -> None:
        self._start("test")

    def _evaluate(self, batch: dict, stage: str) -> None:
        images, labels, captions, index, n_bad = self._valid(batch)
        self.skipped[stage].update(torch.tensor(float(n_bad), device=self.device))
        if images.shape[0] == 0:
            return
        out, losses = self._losses(images, labels, captions)
        # per-rank values: a synced per-step log would deadlock when ranks hold unequal batches
        self.log(f"{stage}/loss", losses["loss"], batch_size=images.shape[0])
        self.log(f"{stage}/caption_loss", losses["caption_loss"], batch_size=images.shape[0])
        self.maps[stage].update(torch.sigmoid(out["objects"]), labels.long())
        tokens = self.net.decode(out["features"], self.hparams.beam_size, self.hparams.max_decode_len)
        self.decoded[stage].update(index, tokens)

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        self._evaluate(batch, "val")

    def test_step(self, batch: dict, batch_idx: int) -> None:
        self._evaluate(batch, "test")

    def on_validation_epoch_end(self) -> None:
        self._finish("val")

    def on_test_epoch_end(self) -> None:
        self._finish("test")

    def _finish(self, stage: str) -> None:
        index, tokens = self.decoded[stage].compute()
        self.decoded[stage].reset()
        m, skipped = self.maps[stage], self.skipped[stage]
        if self.trainer.sanity_checking:
            m.reset(), skipped.reset()
            return
        self.log(f"{stage}/map", m.compute())
        self.log(f"{stage}/skipped", skipped.compute())
        m.reset(), skipped.reset()
        dm = self.trainer.datamodule
        no_inst = getattr(dm, "skipped_no_instances", None)
        if no_inst is not None:
            self.log(f"{stage}/skipped_no_instances", float(no_inst[stage]))
        scores = None
        if self.trainer.is_global_zero and index.numel():
            candidates = self.captions_of(dm, stage, index, tokens)
            self.last_captions[stage] = candidates
            refs = dm.split_references(stage)
            scores = score_caption_sets({k: refs[k] for k in candidates}, [candidates], self.metrics)[0]
            name = f"captions_{stage}" + (f"_epoch{self.current_epoch:03d}" if stage == "val" else "") + ".json"
            write_coco_results(self.results_dir / name, candidates)
        scores = self.trainer.strategy.broadcast(scores, src=0)
        for k, v in (scores or {}).items():
            self.log(f"{stage}/{k}", v, prog_bar=k == "CIDEr", sync_dist=False, rank_zero_only=False)

    def captions_of(self, dm, stage: str, index: torch.Tensor, tokens: torch.Tensor) -> dict[int, str]:
        """``{COCO image id: caption}`` of decoded ``tokens`` of the rows ``index`` of a split."""
        ids = dm.split_image_ids(stage)[index.cpu().numpy()]
        return {int(i): self.vocab.decode(t) for i, t in zip(ids, tokens.cpu())}

    @property
    def results_dir(self) -> Path:
        return Path(self.hparams.results_dir or self.trainer.default_root_dir)

    # ------------------------------------------------------------------ feedback-prop
    def feedback_evidence(self, fb=None, out_dir=None) -> CaptionEvidence:
        """What ``evaluate.py --feedback.*`` evaluates on this model (§4.4, Table 6): every object
        label known, the caption decoded with this module's beam size and length, COCO results
        files in ``out_dir``."""
        if fb is not None:
            unused = [f"--feedback.{k}" for k in ("unknown_file", "num_unknown", "num_known") if fb.get(k) is not None]
            if unused:
                raise ValueError(f"{', '.join(unused)} do not apply to the captioning model: all of its object labels "
                                 "are the known evidence and the caption is the unknown target (§4.4)")
        return CaptionEvidence(self.hparams.num_objects, self.hparams.max_decode_len, self.hparams.beam_size,
                               vocab=self.vocab, metrics=self.metrics, results_dir=out_dir)  # names: from the data

    # ------------------------------------------------------------------ checkpoints
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["caption_vocabulary"] = list(self.vocab.words)

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        saved = checkpoint.get("caption_vocabulary")
        if saved is not None and list(saved) != list(self.vocab.words):
            diff = next((i for i, (a, b) in enumerate(zip(saved, self.vocab.words)) if a != b),
                        min(len(saved), len(self.vocab)))
            raise ValueError(f"the checkpoint was trained with a caption vocabulary of {len(saved)} words, the data "
                             f"gives {len(self.vocab)} (first difference at id {diff}); evaluate with the data "
                             "settings of the training run (min_count, max_len, split)")

    def configure_optimizers(self):
        trunk = list(self.net.trunk.parameters())
        heads = list(self.net.heads.parameters())
        groups = [{"params": heads, "lr": self.hparams.lr},
                  {"params": trunk, "lr": self.hparams.trunk_lr or self.hparams.lr}]
        if self.hparams.optimizer == "adam":
            return torch.optim.Adam(groups, weight_decay=self.hparams.weight_decay)
        return torch.optim.SGD(groups, momentum=0.9, weight_decay=self.hparams.weight_decay)


class DecodedCaptions(Metric):
    """The decoded captions of a split, ``(index [N], tokens [N, L])`` sorted by index, gathered from every
    DDP rank when computed (the evaluation sampler does not pad, so each image comes once)."""

    full_state_update = False

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.add_state("index", default=[], dist_reduce_fx="cat")
        self.add_state("tokens", default=[], dist_reduce_fx="cat")

    def update(self, index: torch.Tensor, tokens: torch.Tensor) -> None:
        self.index.append(index.detach().long())
        self.tokens.append(tokens.detach().long())

    def compute(self) -> tuple[torch.Tensor, torch.Tensor]:
        if isinstance(self.index, list) and not self.index:  # a list until DDP synced it into a tensor
            return torch.zeros(0, dtype=torch.long, device=self.device), torch.zeros(0, 0, dtype=torch.long)
        index, tokens = dim_zero_cat(self.index), dim_zero_cat(self.tokens)
        order = torch.argsort(index)
        return index[order], tokens[order]
