"""Evaluate a checkpoint: ``python evaluate.py --model NAME --ckpt_path PATH``.

The model and data settings saved with the checkpoint's run are applied first, so
the command needs no more than the checkpoint; later flags override them.

Feedback-prop evaluation (Wang et al., CVPR 2018; docs/FEEDBACK.md) is asked for with
``--feedback.*`` flags::

    python evaluate.py --model multilabel --ckpt_path X \\
        --feedback.method rf --feedback.layers '[conv13]' --feedback.steps 10 --feedback.lr 3e-3

``--feedback.protocol`` picks what is run (default ``single`` when ``--feedback.layers`` is
given, else the plain test stage):

* ``single`` — one method (or ``both``) at the given pivots; ``--feedback.num_known`` known
  labels (default: all labels that are not unknown), ``--feedback.draws`` random draws.
* ``sweep`` — Figure 4: unknown-label mAP against the number of known labels
  (``--feedback.num_known '[5,10,...]'``, default 10 steps up to the whole complement),
  mean ± std over ``--feedback.draws`` draws, one line per method and pivot
  (``--feedback.candidates`` pivots one at a time, else ``--feedback.layers``).
* ``layers`` — §5, Tables 3-5: LF and RF at each candidate pivot (default the paper's
  layers for the backbone), all complement labels known, rows ``no-fp``, ``fp-input``, ...;
  λ and T of each cell chosen on val, the test figure reported.
* ``select`` — §4.1: choose the update rate (``--feedback.lr_grid``) and the number of
  iterations T (≤ ``--feedback.steps``) on the validation split, then apply them on test;
  ``--feedback.extend_grid N`` extends the grid beyond an edge that val picks (N times at most)
  so that the grid brackets the chosen rate.

A hierarchical scene model (``--model hierarchical``, Table 1) is evaluated with its true
coarse categories as the known evidence (``single`` and ``select``; pivots default to the
model's ``feedback_layers``).

Other flags: ``--feedback.optimizer`` (adam), ``--feedback.weight_decay`` (1e-4, as the
reference code), ``--feedback.unknown_file`` (the fixed unknown labels: reused when it
exists, else drawn with ``--feedback.seed`` and saved), ``--feedback.num_unknown`` (default
half of the labels), ``--feedback.split`` (test or val, for single/sweep),
``--feedback.select_by`` (the val figures that choose), ``--feedback.iterations``
(``last`` or ``all``), ``--feedback.max_samples`` (images × draws per feedback-prop call),
``--feedback.max_state_gb`` (host memory of the metric state).

Each protocol prints its table and writes ``fp_<protocol>_*.csv``, ``*.png`` and
``fp_<protocol>_table.txt`` to the run folder, and logs the same to W&B.
The Trainer is built with ``inference_mode=False`` when feedback-prop is asked for.

A model may bring its own protocols under the same flags (registry ``extra["feedback_protocols"]``):
``--model captioning`` runs feedback-prop on captions with the object labels known (its evidence
comes from the model, ``feedback_evidence``); ``select`` without pivots is Table 6
(docs/CAPTIONING.md).
"""
from __future__ import annotations

from typing import Any, Literal, Optional, Union

from callbacks.feedback import DEFAULT_MAX_SAMPLES, DEFAULT_MAX_STATE_GB
from callbacks.protocols import PROTOCOL_RUNNERS
from lightning_modules.cli import TopdownCLI, build_cli, close_run

PROTOCOLS = tuple(PROTOCOL_RUNNERS)


class EvaluateCLI(TopdownCLI):
    """The evaluation command line: the shared one plus the ``--feedback.*`` group."""

    def add_stage_arguments(self, parser) -> None:
        g = "--feedback."
        parser.add_argument(g + "protocol", type=Optional[Literal[PROTOCOLS]], default=None,
                            help="single | sweep | layers | select (default: single when --feedback.layers is given)")
        parser.add_argument(g + "method", type=Optional[Literal["lf", "rf", "both"]], default=None,
                            help="LF (Algorithm 1), RF (Algorithm 2) or both (default: rf; layers protocol: both)")
        parser.add_argument(g + "layers", type=Optional[list[str]], default=None,
                            help="pivot layers of one feedback-prop run, e.g. [conv13] or [conv9,conv13]")
        parser.add_argument(g + "candidates", type=Optional[list[str]], default=None,
                            help="pivots tried one at a time (layers/sweep/select); layers default: the paper's")
        parser.add_argument(g + "steps", type=int, default=10, help="iterations T per pivot")
        parser.add_argument(g + "lr", type=float, default=3e-3, help="update rate lambda")
        parser.add_argument(g + "lr_grid", type=list[float], default=[1e-3, 3e-3, 1e-2, 3e-2, 1e-1],
                            help="update rates tried on val by the select protocol")
        parser.add_argument(g + "extend_grid", type=int, default=0,
                            help="select: times the lr grid is extended beyond an edge that val picks, so the "
                                 "grid brackets the chosen lr (0: never)")
        parser.add_argument(g + "optimizer", type=Literal["sgd", "momentum", "adam", "adagrad"], default="adam")
        parser.add_argument(g + "weight_decay", type=float, default=1e-4)
        parser.add_argument(g + "unknown_file", type=Optional[str], default=None,
                            help="file of the fixed unknown labels (index<TAB>word); default beside the vocabulary")
        parser.add_argument(g + "num_unknown", type=Optional[int], default=None, help="default: half of the labels")
        parser.add_argument(g + "num_known", type=Optional[Union[int, list[int]]], default=None,
                            help="known labels (a list for sweep); default: all labels that are not unknown")
        parser.add_argument(g + "draws", type=int, default=5, help="random known-label draws per count")
        parser.add_argument(g + "seed", type=int, default=0, help="seed of the unknown and known draws")
        parser.add_argument(g + "split", type=Optional[Literal["test", "val"]], default=None,
                            help="split of single/sweep (default test); layers and select choose on val, report test")
        parser.add_argument(g + "select_by", type=Optional[list[str]], default=None,
                            help="val figures that choose lr and T, in order (default: map_unknown; "
                                 "hierarchical: [mc_acc, map])")
        parser.add_argument(g + "iterations", type=Literal["last", "all"], default="last",
                            help="keep the scores of the reported iteration only, or of every iteration (curves)")
        parser.add_argument(g + "max_samples", type=int, default=DEFAULT_MAX_SAMPLES,
                            help="images x draws per feedback-prop call (device memory: 32 fits ResNet-50/VGG-16 "
                                 "at 224 px with an early pivot on 12 GB)")
        parser.add_argument(g + "max_state_gb", type=Optional[float], default=DEFAULT_MAX_STATE_GB,
                            help="host memory for the metric state; a protocol runs in several passes to stay under it")

    def instantiate_trainer(self, **kwargs: Any):
        if protocol_of(self.config_init.get("feedback")) is not None:
            kwargs.setdefault("inference_mode", False)  # feedback-prop needs autograd in test/validate
        return super().instantiate_trainer(**kwargs)


def protocol_of(fb) -> Optional[str]:
    if fb is None:
        return None
    if fb.get("protocol"):
        return fb.protocol
    return "single" if fb.get("layers") else None


def main(args: list[str] | None = None):
    cli = build_cli(args, stage="test", cli_class=EvaluateCLI)
    fb = cli.config.feedback
    protocol = protocol_of(fb)
    if protocol is None:
        cli.trainer.test(cli.model, datamodule=cli.datamodule, ckpt_path=cli.config.ckpt_path)
    else:
        cli.feedback = protocol_runners(cli.preset)[protocol](cli, fb)
    close_run(cli)
    return cli


def protocol_runners(preset) -> dict:
    """A model's own feedback-prop protocols (registry ``extra["feedback_protocols"]``, "module:NAME"),
    else the multi-label ones."""
    spec = preset.extra.get("feedback_protocols")
    if not spec:
        return PROTOCOL_RUNNERS
    import importlib

    module, _, name = spec.partition(":")
    return getattr(importlib.import_module(module), name)


if __name__ == "__main__":
    main()
