"""Table 6 of feedback-prop (§4.4): captions with the object labels as the known evidence.

The captioning model's evaluation runs on the house's one feedback-prop path: its evidence is a
:class:`topdown.captions.CaptionEvidence` (the module's ``feedback_evidence``: every object label
known, the caption decoded with beam search from the refined trunk, COCO caption metrics), run
by :class:`callbacks.feedback.FeedbackPropCallback` through the shared protocols
(:mod:`callbacks.protocols`: ``single``, ``layers``; ``sweep`` is refused, all labels are known).

``select`` is Table 6 when no pivots are given: rows no-fp, LF-input, LF-conv10, LF-conv22,
LF-conv40, LF-conv10,40, RF-conv10,40 (ResNet-50's names of the outputs of its first three
stages; on ResNet-18 the same stages are conv5, conv9, conv13).  λ from ``--feedback.lr_grid``
and t ≤ T of each row are chosen on the validation split by CIDEr
(:func:`topdown.evidence.select_setting`, through ``callbacks.protocols._choose``), and each row
runs once on test with its choice (:meth:`~callbacks.feedback.FeedbackSetting.at`).  With
``--feedback.layers`` or ``--feedback.candidates`` it is the shared ``select``.

Outputs (run folder, and W&B): the table in the paper's layout (``fp_select_table.txt``,
``.csv``: BLEU-4, METEOR, ROUGE-L, CIDEr, plus the object head's mAP and BCE, the chosen λ and T,
the COCO results file of every row), ``fp_selection.{csv,json}``, the val CIDEr curves at the
chosen λ (``fp_select_val_cider.png``), and a few test images with their known objects, their
references and their captions before and after feedback-prop (``fp_select_examples.json``,
W&B ``fp/select_examples``).
"""
from __future__ import annotations

import json
import time
from typing import Sequence

from callbacks.protocols import PROTOCOL_RUNNERS as SHARED_RUNNERS

TABLE6_COLUMNS = ("BLEU-4", "METEOR", "ROUGE-L", "CIDEr")
NUM_EXAMPLES = 6


def row_name(method: str, layers: Sequence[str]) -> str:
    """Table 6's row names: ``LF-input``, ``LF-conv10``, ``RF-conv10,40``; other pivots joined by ``+``."""
    if len(layers) > 1 and all(name.startswith("conv") and name[4:].isdigit() for name in layers):
        pivots = "conv" + ",".join(name[4:] for name in layers)
    else:
        pivots = "+".join(layers)
    return f"{method.upper()}-{pivots}"


def table6_pivots(net) -> tuple[str, str, str]:
    """The paper's names of the outputs of the trunk's first three stages (``layer1``-``layer3``):
    conv10, conv22, conv40 on ResNet-50 (Table 6), conv5, conv9, conv13 on ResNet-18."""
    from topdown.layers import paper_layer_names

    aliases = paper_layer_names(net)
    by_module = {module: name for name, module in aliases.items()}
    found = [by_module.get(f"trunk.{stage}") for stage in ("layer1", "layer2", "layer3")]
    if None in found:
        raise ValueError(f"Table 6's pivots are the stages of a ResNet trunk; pass --feedback.layers or "
                         f"--feedback.candidates for {type(getattr(net, 'trunk', net)).__name__}")
    return tuple(found)


def table6_rows(net) -> list[tuple[str, tuple[str, ...]]]:
    """Table 6's rows after no-fp: LF at the image, at each of the three stages, at the first and
    third together, and RF at the first and third together."""
    c10, c22, c40 = table6_pivots(net)
    return [("lf", ("input",)), ("lf", (c10,)), ("lf", (c22,)), ("lf", (c40,)), ("lf", (c10, c40)),
            ("rf", (c10, c40))]


def _cell(m: str, v: float) -> str:
    """The paper's formats: BLEU-4 and METEOR in percent, ROUGE-L and CIDEr as fractions."""
    if v is None or v != v:
        return "-"
    return f"{100 * v:.2f}" if m in ("BLEU-4", "METEOR") else f"{v:.4f}"


def _record(res, setting, t: int) -> dict:
    for r in res.records:
        if (r["setting"], r["lr"], r["steps"], r.get("stop"), r["iteration"]) == \
                (setting.name, setting.lr, setting.steps, setting.stop, t):
            return r
    raise KeyError(f"no record of {setting.name} at iteration {t}")


def run_select(cli, fb) -> dict:
    """Table 6 (§4.4): λ and T of each row chosen on val by CIDEr, the rows run on test with their choice."""
    from callbacks.feedback import FeedbackSetting, image, log_wandb, table
    from callbacks.protocols import _choose, _Protocol, _public, _steps_text, _with_test, _write_selection
    from topdown.evidence import plot_iterations, text_table, write_csv

    if fb.candidates or fb.layers:
        return SHARED_RUNNERS["select"](cli, fb)
    t0 = time.perf_counter()
    p = _Protocol(cli, fb, "select")
    p.no_split()
    ev = p.evidence
    rows = [(m, s) for m, s in table6_rows(p.net) if fb.method in (None, "both", m)]
    for _, s in rows:
        p.check_layers(list(s))
    grid = [FeedbackSetting(m, s, lr, fb.steps) for m, s in rows for lr in fb.lr_grid]
    val = p.run(grid, "val", "select_val", keep="all")
    chosen = _choose(p, val, {(m, s): [g for g in grid if (g.method, g.layers) == (m, s)] for m, s in rows})
    t_val = time.perf_counter()
    test = p.run([c["apply"] for c in chosen], "test", "select_test", keep="last")
    _with_test(p, chosen, test)
    nofp = _record(test, chosen[0]["apply"], 0)
    for (m, s), c in zip(rows, chosen):
        c["row"] = row_name(m, s)
        c["captions"] = _record(test, c["apply"], c["apply"].last).get("captions")
    extra = [x for x in ("map", "object_loss") if x in ev.metrics]
    shown = [x for x in TABLE6_COLUMNS if x in ev.metrics] + extra  # --model.metrics may leave some out
    out_rows = [{"row": "no-fp", **{x: nofp[x] for x in shown}, "captions": nofp.get("captions")}]
    out_rows += [{"row": c["row"], **{x: c[f"test_{x}"] for x in shown}, "lr": c["lr"],
                  "T": _steps_text(c), "val_CIDEr": c["val_CIDEr"], "captions": c["captions"]} for c in chosen]
    title = (f"Table 6 on test ({test.summary[0]['num_known']} object labels known): λ in {list(fb.lr_grid)} and "
             f"t <= {fb.steps} per pivot chosen on val by CIDEr")
    text = text_table(["", *TABLE6_COLUMNS],
                      [[r["row"], *(_cell(x, r.get(x)) for x in TABLE6_COLUMNS)] for r in out_rows], title)
    choice = text_table(["", "lr", "T", "val CIDEr", "object BCE val", "object BCE test"],
                        [[c["row"], f"{c['lr']:g}", _steps_text(c), f"{c['val_CIDEr']:.4f}",
                          f"{c['val_object_loss']:.4f}", f"{c['test_object_loss']:.4f}"] for c in chosen],
                        f"chosen on val (no-fp: val CIDEr {chosen[0]['val_CIDEr_nofp']:.4f}, object BCE "
                        f"{nofp['object_loss']:.4f} on test); val {t_val - t0:.0f} s, test "
                        f"{time.perf_counter() - t_val:.0f} s")
    images, examples = [], []
    if p.rank0:
        write_csv(p.out / "fp_select_table.csv", out_rows)
        _write_selection(p, chosen, "fp_selection")
        curves = {c["row"]: val.row(_val_setting(grid, c))["curves"]["CIDEr"] for c in chosen}
        images.append(plot_iterations(p.out / "fp_select_val_cider.png", curves, ylabel="val CIDEr x 100",
                                      title="feedback-prop on captions: val CIDEr per iteration (chosen λ)"))
        examples = _examples(p, out_rows)
        (p.out / "fp_select_examples.json").write_text(json.dumps(examples, indent=1) + "\n")
        log_wandb(cli.trainer, {"fp/select_table": table(out_rows),
                                "fp/select_examples": table([{"image": image(ex["path"]),
                                                              **{k: v for k, v in ex.items() if k != "path"}}
                                                             for ex in examples])})
    p.files += [p.out / "fp_select_table.csv", p.out / "fp_selection.csv", p.out / "fp_selection.json",
                p.out / "fp_select_examples.json"]
    return p.finish(text + "\n\n" + choice, images, {"rows": out_rows, "selection": _public(chosen),
                                                     "val_callback": val, "callback": test, "examples": examples})


def _val_setting(grid, c):
    """The val setting (T = steps, the whole λ grid run) that the choice ``c`` was read from."""
    return next(g for g in grid if (g.method, g.layer_name, g.lr) == (c["method"], c["layers"], c["lr"]))


def _examples(p, rows: list[dict]) -> list[dict]:
    """The first test images (by id): known objects, references, captions of every row (from the COCO
    results files the evaluation wrote)."""
    dm = p.cli.datamodule
    ids = [int(i) for i in dm.split_image_ids("test")]
    paths, labels, refs = dm.split_paths("test"), dm.split_labels("test"), dm.split_references("test")
    names = getattr(dm, "object_names", None)
    captions = {}
    for r in rows:
        if r.get("captions"):
            captions[r["row"]] = {x["image_id"]: x["caption"] for x in json.loads((p.out / r["captions"]).read_text())}
    out = []
    for j in sorted(range(len(ids)), key=lambda j: ids[j])[:NUM_EXAMPLES]:
        i = ids[j]
        if not all(i in c for c in captions.values()):
            continue  # a missing or corrupt image has no caption
        out.append({"path": str(paths[j]), "image_id": i,
                    "objects": ", ".join(names[k] for k in labels[j].nonzero()[0]) if names else "",
                    "references": " / ".join(refs[i]), **{row: c[i] for row, c in captions.items()}})
    return out


def run_sweep(cli, fb) -> dict:
    raise ValueError("feedback protocol 'sweep' varies the number of known labels of a multi-label model; the "
                     "captioning model knows all of its object labels: use single, layers or select")


PROTOCOL_RUNNERS = {**SHARED_RUNNERS, "sweep": run_sweep, "select": run_select}
