"""Fitting a generator bank from transformed pairs (generators paper §2.1-§3.1): thin Lightning wiring.

``python train.py --model generators`` runs, per transformation kind of the
datamodule (:class:`datamodules.pairs.PairsDataModule`), two epochs with no
optimizer:

1. PCA epoch: flows of the base-amount pairs accumulate into
   :class:`topdown.generators.PCAStats`; at the epoch's end the statistics are
   summed over DDP ranks and ``M, U_1..U_K`` computed (§2.1.4).
2. Regression epoch: flows of all amounts, both signs (the datamodule's reversed
   pairs carry ``delta = -a``), accumulate into
   :class:`topdown.generators.RegressionStats` (eq. 2); at the end ``w_lsq`` is
   solved and the kind's generator joins the bank (§3.1), with its fitted amount
   range for :meth:`~topdown.generators.GeneratorBank.estimate`.

After the last kind, the bank is written to ``<run>/generator_bank.pt`` and
fitting stops. ``test`` evaluates the bank (§3.1 RMS/MAD, Fig. A2 negation) on
the test originals and writes ``<run>/generator_eval.csv``, also sent to the
loggers (a W&B table when the logger has ``log_table``).

Standalone evaluation of a saved bank::

    python -m lightning_modules.generators --bank RUN/generator_bank.pt --root data/scenes --out eval.csv
    python -m lightning_modules.generators --ckpt RUN/checkpoints/last.ckpt   # bank and AlexNet of the run
"""
from __future__ import annotations

import argparse
import warnings
from pathlib import Path
from typing import Literal, Sequence

import torch
from lightning.pytorch import LightningModule
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

from topdown.generators import (EVAL_CASES, EVAL_COLUMNS, PAPER_LAYERS, ConvFeatures, GeneratorBank, GeneratorModel,
                                PCAStats, RegressionStats, WarpErrorStats, feature_flows, format_table,
                                table_rows)
from topdown.evidence import write_csv

BANK_FILE = "generator_bank.pt"
TABLE_FILE = "generator_eval.csv"


class GeneratorsModule(LightningModule):
    """Learns a :class:`~topdown.generators.GeneratorBank` from a pairs datamodule (no gradient steps).

    Args:
        weights: local AlexNet state-dict / checkpoint file; ``None`` = random init (logged as a warning).
        layers: paper layer names whose flows form the flow vector (conv1..conv5, footnote 1).
        num_components: principal flows kept (paper: 10).
        degree: columns per basis group in ``U[Δ]`` (3: 1, a, a²; eq. 1).
        quantile: robust max used to scale features to [0, 255] before SIFT flow.
        flow_kwargs: keyword arguments of :func:`topdown.flows.sift_flow`.
        eval_layer: layer of the RMS / MAD evaluation (paper: conv5).
        inverse: how the generator is applied at evaluation (``"negate"`` as in the paper, or ``"exact"``).
        exact_eig_below: flow dimensions below this use a full ``eigh``; above, subspace iteration.
        pca_rank: fewer PCA pairs than ``num_components + 1``: ``"drop"`` the components beyond the rank
            with a warning saying how many, or ``"error"``.
        init_seed: seed of the random AlexNet when ``weights`` is None (the same for every command).
    """

    def __init__(self, weights: str | None = None, layers: Sequence[str] = PAPER_LAYERS, num_components: int = 10,
                 degree: int = 3, quantile: float = 0.99, flow_kwargs: dict | None = None, eval_layer: str = "conv5",
                 inverse: str = "negate", exact_eig_below: int = 3000, pca_rank: Literal["drop", "error"] = "drop",
                 init_seed: int = 0):
        super().__init__()
        self.save_hyperparameters()
        self.automatic_optimization = False
        self.extractor = ConvFeatures(tuple(layers), weights, init_seed=init_seed).eval()
        self.extractor.requires_grad_(False)
        # DistributedDataParallel refuses a module without a trainable parameter; this one is never used.
        self.ddp_anchor = torch.nn.Parameter(torch.zeros(1))
        if eval_layer not in layers:
            raise ValueError(f"eval_layer {eval_layer!r} is not among layers {list(layers)}")
        if not weights:
            rank_zero_warn("generators: no AlexNet weights given; features come from a randomly initialised AlexNet")
        self.bank: GeneratorBank | None = None
        self.bases: dict[str, torch.Tensor] = {}
        self.stats = None
        self._pca_info: dict = {}
        self.eval_stats: dict[str, WarpErrorStats] = {}

    # -- plan ----------------------------------------------------------------------------------------------------
    def _datamodule(self):
        dm = getattr(self.trainer, "datamodule", None)
        if dm is None or not hasattr(dm, "schedule"):
            raise RuntimeError("GeneratorsModule needs a PairsDataModule (with .schedule, .kinds, .image_size)")
        return dm

    def on_fit_start(self) -> None:
        dm = self._datamodule()
        n = len(dm.schedule)
        if self.trainer.max_epochs not in (-1, None) and self.trainer.max_epochs < n:
            raise ValueError(f"trainer.max_epochs={self.trainer.max_epochs} is too few for {n} phases "
                             f"{dm.schedule}; use -1 (stops when done) or >= {n}")
        if not self.trainer.reload_dataloaders_every_n_epochs == 1:
            raise ValueError("set trainer.reload_dataloaders_every_n_epochs: 1 so each phase gets its pair set")
        layout = self.extractor.layout(dm.image_size)
        meta = {"backbone": "alexnet", "weights": self.hparams.weights, "pretrained": self.extractor.pretrained,
                "init_seed": self.hparams.init_seed, "reverse": bool(getattr(dm, "reverse", False)),
                "quantile": self.hparams.quantile, "flow_kwargs": dict(self.hparams.flow_kwargs or {}),
                "dataset": getattr(dm, "dataset", None), "originals": len(getattr(dm, "train_originals", []))}
        self.bank = GeneratorBank(layout, dm.image_size, meta)
        rank_zero_info(f"generators: fitting {dm.kinds} in {n} phases {dm.schedule}; flow vector of "
                       f"{layout.dim} values {dict(zip(layout.names, layout.shapes))}")

    def _phase(self) -> tuple[str, str]:
        return self._datamodule().phase(self.current_epoch)

    def configure_optimizers(self):
        return None

    # -- fitting -------------------------------------------------------------------------------------------------
    def on_train_epoch_start(self) -> None:
        kind, phase = self._phase()
        if phase == "pca":
            self.stats = PCAStats.zeros(self.bank.layout.dim)
        else:
            if kind not in self.bases:
                raise RuntimeError(f"regression phase of {kind!r} without its PCA basis (resume from a PCA epoch's end?)")
            self.stats = RegressionStats.zeros(self.bases[kind].shape[1], self.hparams.degree)
        self.stats = type(self.stats)(*(t.to(self.device) for t in vars(self.stats).values()))

    def _flows(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        valid = batch["valid"].bool()
        images = torch.cat((batch["image"][valid], batch["transformed"][valid]))
        with torch.no_grad():
            feats = self.extractor(images)
            n = int(valid.sum())
            flows = feature_flows({k: v[:n] for k, v in feats.items()}, {k: v[n:] for k, v in feats.items()},
                                  flow_kwargs=self.hparams.flow_kwargs, quantile=self.hparams.quantile)
        return self.bank.layout.flatten(flows), valid

    def training_step(self, batch: dict, batch_idx: int):
        kind, phase = self._phase()
        wrong = [k for k in batch["kind"] if k != kind]
        if wrong:
            raise RuntimeError(f"epoch {self.current_epoch} fits {kind!r} but the batch holds {wrong[0]!r} pairs")
        real = ~batch["pad"].bool() if "pad" in batch else torch.ones_like(batch["valid"].bool())
        skipped = int((~batch["valid"].bool() & real).sum())
        self.log("train/skipped", float(skipped), reduce_fx="sum", on_step=False, on_epoch=True, sync_dist=True,
                 batch_size=len(batch["kind"]))
        if not batch["valid"].any():
            return None
        flows, valid = self._flows(batch)
        if phase == "pca":
            self.stats.update(flows)
        else:
            self.stats.update(flows, batch["delta"][valid], self.bases[kind].to(self.device))
        self.log("train/flow_abs", flows.abs().mean(), prog_bar=True, on_step=True, on_epoch=False,
                 batch_size=flows.shape[0])
        return None

    def _reduce(self):
        if self.trainer.world_size <= 1:
            return None
        return lambda t: self.trainer.strategy.reduce(t, reduce_op="sum")

    def on_train_epoch_end(self) -> None:
        kind, phase = self._phase()
        stats = self.stats.all_reduce(self._reduce())
        dm = self._datamodule()
        if phase == "pca":
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                mean, comps, var = stats.components(self.hparams.num_components, self.hparams.exact_eig_below,
                                                    on_rank=self.hparams.pca_rank)
            for w in caught:
                rank_zero_warn(f"generators, {kind}: {w.message}")
            total = float(torch.trace(stats.covariance()))
            self.bases[kind] = torch.cat((mean[:, None], comps), dim=1).cpu()
            self._pca_info = {"pairs_pca": int(stats.count), "explained": float(var.sum()) / max(total, 1e-300),
                              "variances": [float(v) for v in var],
                              "components_dropped": self.hparams.num_components - comps.shape[1]}
            self.log(f"train/{kind}/pca_pairs", float(stats.count), rank_zero_only=True)
            self.log(f"train/{kind}/explained_variance", self._pca_info["explained"], rank_zero_only=True)
        else:
            w, rms = stats.solve(self.bases[kind])
            info = {**self._pca_info, "pairs_regression": int(stats.count), "residual_rms": rms,
                    "amount_range": list(dm.amount_range(kind)) if hasattr(dm, "amount_range") else None}
            self.bank.add(GeneratorModel(kind, self.bases[kind], w, self.hparams.degree, dm.base_amounts[kind], info))
            self.log(f"train/{kind}/residual_rms", rms, rank_zero_only=True)
            self.log(f"train/{kind}/regression_pairs", float(stats.count), rank_zero_only=True)
        self.stats = None
        if self.current_epoch + 1 >= len(dm.schedule):
            run_dir = self.run_dir()  # every rank: trainer.log_dir is a collective under DDP
            if self.trainer.is_global_zero:
                path = self.bank.save(run_dir / BANK_FILE)
                rank_zero_info(f"generators: bank of {self.bank.kinds} written to {path}")
            self.trainer.should_stop = True

    def run_dir(self) -> Path:
        return Path(self.trainer.log_dir or self.trainer.default_root_dir)

    # -- checkpoints ---------------------------------------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["generator_bank"] = self.bank.state_dict() if self.bank is not None else None
        checkpoint["generator_bases"] = dict(self.bases)

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        if checkpoint.get("generator_bank") is not None:
            self.bank = GeneratorBank.from_state_dict(checkpoint["generator_bank"], "checkpoint")
        self.bases = dict(checkpoint.get("generator_bases") or {})

    # -- evaluation ----------------------------------------------------------------------------------------------
    def on_test_epoch_start(self) -> None:
        if self.bank is None or not self.bank.kinds:
            raise RuntimeError("GeneratorsModule.test: no generator bank (fit first or load a checkpoint)")
        self.eval_stats = {name: WarpErrorStats.zeros() for name, _, _ in EVAL_CASES}

    def test_step(self, batch: dict, batch_idx: int):
        valid = batch["valid"].bool()
        real = ~batch["pad"].bool() if "pad" in batch else torch.ones_like(valid)
        self.log("test/skipped", float((~valid & real).sum()), reduce_fx="sum", on_step=False, on_epoch=True, sync_dist=True,
                 batch_size=len(valid))
        layer = self.hparams.eval_layer
        cases = {name: (kind, amount) for name, kind, amount in EVAL_CASES}
        for name in sorted(set(c for c, v in zip(batch["case"], valid.tolist()) if v)):
            kind, amount = cases[name]
            if kind not in self.bank.kinds:
                continue
            rows = torch.tensor([c == name for c in batch["case"]], device=valid.device) & valid
            with torch.no_grad():
                f0 = self.extractor(batch["image"][rows])[layer]
                f1 = self.extractor(batch["transformed"][rows])[layer]
                flow = self.bank.generator(kind, amount)[layer].to(f0)
                self.eval_stats[name].update(f0, f1, flow, self.hparams.inverse)
        return None

    def on_test_epoch_end(self) -> None:
        reduce = self._reduce()
        stats = {name: self.eval_stats[name].all_reduce(reduce) for name, _, _ in EVAL_CASES}
        rows = table_rows(stats, EVAL_CASES, self.hparams.eval_layer)
        for r in rows:
            key = r["case"].replace(" ", "_")
            for col in ("rms_generator", "mad_generator", "rms_no_warp", "mad_no_warp", "rms_negation",
                        "mad_negation"):
                self.log(f"test/{key}/{col}", r[col], rank_zero_only=True)
        run_dir = self.run_dir()
        if self.trainer.is_global_zero:
            path = write_csv(run_dir / TABLE_FILE, rows, EVAL_COLUMNS)
            rank_zero_info(f"generators: evaluation at {self.hparams.eval_layer} (written to {path})\n"
                           + format_table(rows))
            for logger in self.trainer.loggers:
                if hasattr(logger, "log_table"):
                    logger.log_table(key="test/generators", columns=list(EVAL_COLUMNS),
                                     data=[[r.get(c) for c in EVAL_COLUMNS] for r in rows])
        self.eval_rows = rows


def main(argv: Sequence[str] | None = None) -> list[dict]:
    """Evaluate a saved bank on the test originals of a pairs dataset; print the table, write the CSV."""
    from datamodules.pairs import PairsDataModule
    from topdown.generators import evaluate_bank

    p = argparse.ArgumentParser(prog="python -m lightning_modules.generators", description=main.__doc__)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--bank", help="generator_bank.pt written by train.py --model generators")
    src.add_argument("--ckpt", help="a generators checkpoint: its bank and its AlexNet")
    p.add_argument("--root", default="data/scenes")
    p.add_argument("--dataset", default="scenes", choices=("scenes", "ilsvrc"))
    p.add_argument("--split", default="val")
    p.add_argument("--max-images", type=int, default=None)
    p.add_argument("--weights", default=None, help="AlexNet weights file (default: the bank's; a random-init bank "
                   "gets the same seeded random AlexNet)")
    p.add_argument("--layer", default="conv5")
    p.add_argument("--inverse", default="negate", choices=("negate", "exact"))
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--out", default=None, help="CSV path (default: beside the bank)")
    args = p.parse_args(argv)
    state = None
    if args.ckpt:
        ckpt = torch.load(args.ckpt, map_location="cpu", weights_only=False)
        if not ckpt.get("generator_bank"):
            raise ValueError(f"{args.ckpt} holds no generator bank (not a finished generators run?)")
        bank = GeneratorBank.from_state_dict(ckpt["generator_bank"], args.ckpt)
        state = {k.removeprefix("extractor."): v for k, v in ckpt["state_dict"].items() if k.startswith("extractor.")}
    else:
        bank = GeneratorBank.load(args.bank)
    dm = PairsDataModule(root=args.root, dataset=args.dataset, transform=bank.kinds, image_size=bank.image_size,
                         batch_size=args.batch_size, test_max_images=args.max_images, test_split=args.split)
    dm.prepare_data()
    dm.setup("test")
    extractor = ConvFeatures.for_bank(bank, args.weights).eval()
    if state is not None:
        extractor.load_state_dict(state)

    def pairs():
        for batch in dm.test_dataloader():
            valid = batch["valid"].bool()
            for name in sorted(set(batch["case"])):
                rows = torch.tensor([c == name for c in batch["case"]]) & valid
                if rows.any():
                    yield name, batch["image"][rows], batch["transformed"][rows]

    cases = [c for c in EVAL_CASES if c[1] in bank.kinds]
    rows = evaluate_bank(bank, extractor, pairs(), cases, args.layer, args.inverse)
    out = Path(args.out) if args.out else Path(args.bank or args.ckpt).with_name(TABLE_FILE)
    write_csv(out, rows, EVAL_COLUMNS)
    print(format_table(rows))
    print(f"written to {out}")
    return rows


if __name__ == "__main__":
    main()
