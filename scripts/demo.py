"""The end-to-end demo run by ``make demo``: train, test, then feedback-prop on the embedded scenes.

    python scripts/demo.py --data-root data/scenes

1. builds (or reuses) the embedded ``scenes`` dataset,
2. trains a ResNet-18 multi-label model (feedback-prop §4.1, eq. 6) with ``train.main`` and
   prints its test mAP,
3. picks the pivot layer on (part of) the validation split (the layer-wise analysis of §5
   over a few candidates, LF and RF, all complement labels known; T chosen per cell on val,
   each cell's figure reported on the same part of the test split),
4. evaluates no-fp, LF and RF at that layer on the test split with half of the labels unknown
   and ``--draws`` random draws of known labels (§4.1), and prints unknown-label mAP as
   mean ± std.

The defaults fit in about ten minutes on two CPU cores; training stops at ``--train-minutes``
whatever the epoch count (Lightning's ``max_time``).
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))


def parse(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data-root", default="data/scenes", help="scenes dataset folder (built when missing)")
    p.add_argument("--num-images", type=int, default=3000, help="images of the scenes build (make data: 3000)")
    p.add_argument("--size", type=int, default=128, help="pixel size of the scenes build (make data: 128)")
    p.add_argument("--image-size", type=int, default=64, help="network input size (images are resized)")
    p.add_argument("--epochs", type=int, default=12)
    p.add_argument("--train-minutes", type=float, default=3.5, help="training stops after this long")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=2e-3, help="training learning rate (Adam)")
    p.add_argument("--candidates", default="conv9,conv13,conv17",
                   help="pivot layers tried on val (conv9 costs ~2.5x conv13)")
    p.add_argument("--val-fraction", type=float, default=0.34,
                   help="part of the val split used to pick the layer (and of the test split its table reports)")
    p.add_argument("--steps", type=int, default=10, help="feedback-prop iterations T")
    p.add_argument("--fp-lr", type=float, default=3e-2, help="feedback-prop update rate (3e-2 was best on val among 1e-2, 3e-2)")
    p.add_argument("--known-fraction", type=float, default=0.8,
                   help="known labels as a fraction of the labels that are not unknown")
    p.add_argument("--draws", type=int, default=5, help="random known-label draws")
    p.add_argument("--runs", default="runs", help="run folder root")
    p.add_argument("--workers", type=int, default=1, help="data loader workers")
    p.add_argument("--wandb", action="store_true", help="also log to W&B (offline)")
    return p.parse_args(argv)


def main(argv=None) -> dict:
    args = parse(argv)
    os.environ.setdefault("WANDB_MODE", "offline")
    os.environ.setdefault("WANDB_SILENT", "true")
    os.environ.setdefault("NLTK_DATA", str(REPO / ".nltk_data"))
    import torch

    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    import evaluate
    import train
    from datamodules.coco import ScenesMultiLabelDataModule
    from topdown.evidence import fmt, text_table

    t0 = time.perf_counter()

    def stage(i, what):
        print(f"\n=== [{i}/4] {what}  (elapsed {time.perf_counter() - t0:.0f} s)", flush=True)

    stage(1, f"scenes data in {args.data_root}")
    dm = ScenesMultiLabelDataModule(root=args.data_root, num_images=args.num_images, size=args.size,
                                    image_size=args.image_size, vocab_size=100, num_workers=0)
    dm.prepare_data()
    print(f"{len(dm.dataset('train'))} train / {len(dm.dataset('val'))} val / {len(dm.dataset('test'))} test "
          f"images, {dm.num_labels} caption labels")

    common = ["--model", "multilabel", "--data.root", args.data_root, "--data.num_images", str(args.num_images),
              "--data.size", str(args.size), "--data.image_size", str(args.image_size),
              "--data.batch_size", str(args.batch_size), "--data.num_workers", str(args.workers),
              "--run.root", args.runs, "--run.wandb", str(args.wandb).lower(),
              "--trainer.enable_model_summary", "false"]
    stage(2, f"training ResNet-18 ({args.epochs} epochs or {args.train_minutes} min, {args.image_size} px)")
    minutes = args.train_minutes
    fit = train.main(common + ["--run.name", "demo", "--model.lr", str(args.lr),
                               "--trainer.max_epochs", str(args.epochs),
                               "--trainer.max_time", f"00:00:{int(minutes):02d}:{int(minutes % 1 * 60):02d}"])
    test_map = float(fit.trainer.callback_metrics.get("test/map", float("nan")))
    ckpt = fit.trainer.checkpoint_callback.best_model_path or fit.trainer.checkpoint_callback.last_model_path
    if not ckpt:
        raise SystemExit(f"demo: training stopped before its first epoch ended (--train-minutes {minutes}); "
                         "give it more time")
    print(f"\ntest mAP (all {dm.num_labels} labels, {fit.trainer.current_epoch} epochs): {100 * test_map:.2f}")

    fb = common + ["--ckpt_path", ckpt, "--feedback.steps", str(args.steps), "--feedback.lr", str(args.fp_lr)]
    stage(3, f"choosing the pivot layer on val among {args.candidates} (LF and RF)")
    layers = evaluate.main(fb + ["--run.name", "demo-layers", "--feedback.protocol", "layers",
                                 "--feedback.lr_grid", f"[{args.fp_lr}]", "--feedback.candidates", f"[{args.candidates}]",
                                 "--trainer.limit_val_batches", str(args.val_fraction),
                                 "--trainer.limit_test_batches", str(args.val_fraction)])
    best = layers.feedback["best"]["layer"]
    print(f"best pivot on val: {best}")

    stage(4, f"feedback-prop on test at {best}: {args.draws} draws of known labels")
    pool = dm.num_labels - dm.num_labels // 2
    known = max(1, round(args.known_fraction * pool))
    single = evaluate.main(fb + ["--run.name", "demo-fp", "--feedback.method", "both",
                                 "--feedback.layers", f"[{best}]", "--feedback.num_known", str(known),
                                 "--feedback.draws", str(args.draws)])
    rows = single.feedback["callback"].summary
    nofp = rows[0]["map_unknown_nofp"]
    table = [["no-fp", fmt(nofp), ""]]
    for r in rows:
        table.append([f"{r['method'].upper()} ({best})", fmt(r["map_unknown"], r["map_unknown_std"]),
                      f"{100 * (r['map_unknown'] - nofp):+.2f}"])
    text = text_table(["", "mAP unknown", "vs no-fp"], table,
                      f"scenes test split: {dm.num_labels // 2} unknown labels, {known} known labels, "
                      f"mean±std over {args.draws} draws, T={args.steps}")
    wall = time.perf_counter() - t0
    print(f"\n{text}\n\ntest mAP {100 * test_map:.2f} | demo wall time {wall / 60:.1f} min | "
          f"runs in {Path(args.runs).resolve()}")
    return {"test_map": test_map, "best_layer": best, "rows": rows, "nofp": nofp, "wall_s": wall, "table": text}


if __name__ == "__main__":
    main()
