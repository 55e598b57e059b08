"""Rescore COCO caption results files (``[{"image_id", "caption"}]``) against a split's references.

Prints, per file, the COCO caption metrics (:func:`topdown.captions.caption_scores`) and which
known objects the captions name (:func:`topdown.captions.mention_scores`: precision of the named
objects, recall of the present ones).  A run folder of ``evaluate.py --model captioning
--feedback.protocol select`` is read through its ``fp_select_table.csv`` (one results file per
Table 6 row)::

    python scripts/rescore_captions.py runs/captioning-eval/version_0            # Table 6 rows on test
    python scripts/rescore_captions.py captions_test.json --split test
    python scripts/rescore_captions.py X.json --root /data/coco --coco          # real COCO, Karpathy split

The data options are those of the training run (``--root``, ``--num_images``, ``--size`` for
scenes); the split must be the one the captions were made for.
"""
from __future__ import annotations

import argparse
import csv
import json
from pathlib import Path


def results_files(paths: list[str]) -> list[tuple[str, Path]]:
    out = []
    for p in map(Path, paths):
        table = p / "fp_select_table.csv"
        if p.is_dir():
            if not table.is_file():
                raise FileNotFoundError(f"{p} is a folder without fp_select_table.csv")
            out += [(r["row"], p / r["captions"]) for r in csv.DictReader(open(table)) if r.get("captions")]
        elif p.is_file():
            out.append((p.stem, p))
        else:
            raise FileNotFoundError(f"no results file or run folder at {p}")
    return out


def main(argv=None) -> list[dict]:
    from datamodules.karpathy import KarpathyCaptionsDataModule, ScenesCaptionsDataModule
    from topdown.captions import caption_scores, mention_scores
    from topdown.evidence import text_table

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("paths", nargs="+", help="COCO results files or select-protocol run folders")
    ap.add_argument("--split", default="test", choices=("val", "test"))
    ap.add_argument("--root", default="data/scenes")
    ap.add_argument("--coco", action="store_true", help="real COCO (Karpathy's split file under --root)")
    ap.add_argument("--num_images", type=int, default=3000)
    ap.add_argument("--size", type=int, default=128)
    args = ap.parse_args(argv)
    dm = (KarpathyCaptionsDataModule(root=args.root) if args.coco
          else ScenesCaptionsDataModule(root=args.root, num_images=args.num_images, size=args.size))
    ids = [int(i) for i in dm.split_image_ids(args.split)]
    labels = dict(zip(ids, dm.split_labels(args.split)))
    refs_all = dm.split_references(args.split)
    rows = []
    for name, path in results_files(args.paths):
        cands = {int(r["image_id"]): r["caption"] for r in json.loads(path.read_text())}
        unknown = [i for i in cands if i not in labels]
        if unknown:
            raise ValueError(f"{path}: {len(unknown)} image ids are not in the {args.split} split, e.g. {unknown[:5]}")
        scores = caption_scores({i: refs_all[i] for i in cands}, cands)
        order = sorted(cands)
        scores.update(mention_scores([cands[i] for i in order], [labels[i] for i in order], dm.object_names))
        scores["words"] = sum(len(cands[i].split()) for i in order) / len(order)
        rows.append({"row": name, "images": len(cands), **scores})
    cols = ["BLEU-4", "METEOR", "ROUGE-L", "CIDEr", "mention_precision", "mention_recall", "words"]
    print(text_table(["", "images", *cols],
                     [[r["row"], str(r["images"]), *(f"{r[c]:.4f}" for c in cols)] for r in rows],
                     f"captions rescored against the {args.split} references"))
    return rows


if __name__ == "__main__":
    main()
