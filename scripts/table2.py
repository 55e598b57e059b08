"""Feedback-prop Table 2 (§4.3): caption-noun mAP of news images without and with article text.

    python scripts/table2.py                                   # trains `--model news` on scenes, then the table
    python scripts/table2.py --ckpt_path runs/news/version_0/checkpoints/X.ckpt   # an existing model
    python scripts/table2.py --ckpt_path X --trainer.devices 2 --trainer.strategy ddp
    python scripts/table2.py --config configs/goodnews.yaml --data.root /data/goodnews --ckpt_path X

Without ``--ckpt_path`` the model is first trained with ``train.py --model news`` and the
given ``--model.*``, ``--data.*``, ``--trainer.*`` flags (the best checkpoint by
``val/map_caption`` is used). The table is then computed by :func:`callbacks.news.run_table2`
on the house's feedback-prop evaluation path (``FeedbackPropCallback`` with the text-prefix
evidence): every (lr, T ≤ ``--table2.steps``) of ``--table2.lr_grid`` on val, the best per cell
(``topdown.evidence.select_setting``, T ≥ 1) applied on test. Rows are the text fractions
(``--table2.fractions``, default no-text, 25, 50, 75, 100 %), columns the feedback-prop methods
and pivots (``--table2.columns``, default ``lf:conv40`` and ``rf:conv22``, the ResNet-50 names
of the paper). It prints the table and writes ``fp_table2_table.txt``, ``fp_table2_table.csv``,
``fp_table2_selection.csv``/``.json``, ``fp_table2_{val,test}_{iterations,summary}.csv``,
``fp_table2_test.png`` (mAP against text fraction), ``figure6.png`` and ``figure6.html`` to the
run folder (``runs/news-table2/version_N``), and logs them to W&B. DDP needs ``--ckpt_path``
(each process re-runs this command).
"""
from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any, Literal, Optional

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from callbacks.feedback import DEFAULT_MAX_SAMPLES, DEFAULT_MAX_STATE_GB  # noqa: E402
from lightning_modules.cli import TopdownCLI, build_cli, close_run  # noqa: E402

GROUP = "--table2."


class Table2CLI(TopdownCLI):
    """The shared command line plus the ``--table2.*`` group."""

    def add_stage_arguments(self, parser) -> None:
        g = GROUP
        parser.add_argument(g + "fractions", type=list[float], default=[0.0, 0.25, 0.5, 0.75, 1.0],
                            help="fractions of each article's words used as evidence (rows)")
        parser.add_argument(g + "columns", type=list[str], default=["lf:conv40", "rf:conv22"],
                            help="METHOD:PIVOTS columns, e.g. lf:conv40 rf:conv22 (ResNet-50 paper names) or lf:layer4")
        parser.add_argument(g + "lr_grid", type=list[float], default=[0.03, 0.1], help="update rates tried on val")
        parser.add_argument(g + "val_batches", type=Optional[int], default=None,
                            help="choose lr and T on the first N val batches only (default: all of val)")
        parser.add_argument(g + "steps", type=int, default=10, help="largest number of iterations T tried on val")
        parser.add_argument(g + "absent", type=Literal["negative", "unknown"], default="negative",
                            help="a vocabulary noun missing from the text prefix is a known negative, or unknown")
        parser.add_argument(g + "optimizer", type=Literal["sgd", "momentum", "adam", "adagrad"], default="adam")
        parser.add_argument(g + "weight_decay", type=float, default=1e-4)
        parser.add_argument(g + "max_samples", type=int, default=DEFAULT_MAX_SAMPLES,
                            help="images x fractions per feedback-prop call (device memory; as --feedback.max_samples)")
        parser.add_argument(g + "max_state_gb", type=Optional[float], default=DEFAULT_MAX_STATE_GB,
                            help="host memory for the metric state; the evaluation runs in several passes to stay under it")
        parser.add_argument(g + "figure6_images", type=int, default=6, help="test images in Figure 6 (0: none)")

    def instantiate_trainer(self, **kwargs: Any):
        kwargs.setdefault("inference_mode", False)  # feedback-prop needs autograd in validate/test
        return super().instantiate_trainer(**kwargs)


def _split(args: list[str]) -> tuple[list[str], list[str], Optional[str]]:
    """(flags for training, flags of the table only, --ckpt_path value)."""
    common, own, ckpt, i = [], [], None, 0
    while i < len(args):
        a = args[i]
        name = a.split("=", 1)[0]
        takes = "=" not in a and i + 1 < len(args)
        value = args[i + 1] if takes else a.split("=", 1)[-1]
        if name == "--ckpt_path":
            ckpt = value
        elif name == "--model" and takes or a.startswith("--model="):
            if value != "news":
                raise SystemExit(f"error: scripts/table2.py evaluates the news model, got --model {value}")
        elif name.startswith(GROUP):
            own += [a, args[i + 1]] if takes else [a]
        else:
            common.append(a)
            i += 1
            continue
        i += 2 if takes else 1
    return common, own, ckpt


def main(args: list[str] | None = None) -> dict:
    import train

    args = list(sys.argv[1:] if args is None else args)
    common, own, ckpt = _split(args)
    t0 = time.perf_counter()
    train_seconds = 0.0
    if ckpt is None:
        fit = train.main(["--model", "news", *common])
        ckpt = fit.trainer.checkpoint_callback.best_model_path if fit.trainer.checkpoint_callback else None
        if not ckpt:
            raise SystemExit("error: training wrote no checkpoint to evaluate (fast_dev_run?); pass --ckpt_path")
        train_seconds = time.perf_counter() - t0
        print(f"[table2] trained in {train_seconds:.0f} s; best checkpoint {ckpt}")
    named = any(a.split("=", 1)[0] == "--run.name" for a in common)
    cli = build_cli(["--model", "news", *common, *([] if named else ["--run.name", "news-table2"]), *own,
                     "--ckpt_path", ckpt], stage="test", cli_class=Table2CLI)
    from callbacks.news import run_table2

    result = run_table2(cli, cli.config.table2)
    result["seconds"]["train"] = round(train_seconds, 1)
    result["seconds"]["all"] = round(time.perf_counter() - t0, 1)
    result.update(cli=cli, ckpt_path=ckpt)
    if cli.trainer.is_global_zero:
        print(f"[table2] wall time: {result['seconds']}")
    close_run(cli)
    return result


if __name__ == "__main__":
    main()
