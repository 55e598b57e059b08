"""`train.py --model captioning` and `evaluate.py` on the tiny scenes data: a short real run, the
Table 6 protocol, feedback-prop from the object labels, and a real 2-process DDP evaluation."""
from __future__ import annotations

import json

import pytest
import torch

import evaluate
import train
from scripts import rescore_captions
from conftest import TINY_SCENES
from datamodules.karpathy import ScenesCaptionsDataModule
from lightning_modules.captioning import CaptioningModule
from test_cli import last_value, read_metrics
from test_distributed import finish, newest_run, run_entry
from topdown.captions import METRICS, start_meteor
from topdown.feedback import feedback_prop

# METEOR's JVM loads its tables for several seconds: start it at collection, so the load overlaps
# the tests before the first score; every test of the session then shares it.
start_meteor()


def tiny_captioning_args(root, runs) -> list[str]:
    return [
        "--model", "captioning",
        "--data.root", str(root),
        "--data.num_images", str(TINY_SCENES["num_images"]),
        "--data.size", str(TINY_SCENES["size"]),
        "--data.image_size", "64",
        "--data.min_count", "2",
        "--data.batch_size", "16",
        "--data.num_workers", "0",
        "--model.backbone", "resnet18",
        "--model.embed_dim", "64",
        "--model.hidden_dim", "64",
        "--run.root", str(runs),
        "--trainer.enable_progress_bar", "false",
        "--trainer.enable_model_summary", "false",
    ]


@pytest.fixture(scope="module")
def captioning_run(tiny_scenes, tmp_path_factory):
    """One short real training run (2 epochs of 7 batches, then test on the best checkpoint)."""
    runs = tmp_path_factory.mktemp("caption-runs")
    return train.main(tiny_captioning_args(tiny_scenes, runs) + ["--trainer.max_epochs", "2", "--model.lr", "0.002"])


def test_training_run_scores_captions_and_writes_results(captioning_run):
    cli, run_dir = captioning_run, captioning_run.run_dir
    assert cli.model.hparams.num_objects == cli.datamodule.num_objects == 30  # linked from the data
    assert cli.model.vocab.words == tuple(cli.datamodule.caption_vocabulary)
    rows = read_metrics(run_dir)
    for stage in ("val", "test"):
        for k in METRICS:
            assert 0.0 <= last_value(rows, f"{stage}/{k}") <= 10.0
        assert 0.0 <= last_value(rows, f"{stage}/map") <= 1.0
        assert last_value(rows, f"{stage}/skipped_no_instances") == 0
    ckpts = sorted(p.name for p in (run_dir / "checkpoints").glob("*.ckpt"))
    best = max(float(r["val/CIDEr"]) for r in rows if r.get("val/CIDEr"))
    assert ckpts == [next(n for n in ckpts if n.startswith("epoch")), "last.ckpt"], ckpts
    assert f"val_CIDEr{best:.4f}" in ckpts[0]  # the best checkpoint is chosen by val/CIDEr
    results = json.loads((run_dir / "captions_test.json").read_text())
    test_ids = set(cli.datamodule.split_image_ids("test").tolist())
    assert {r["image_id"] for r in results} == test_ids and all(isinstance(r["caption"], str) for r in results)
    assert all((run_dir / f"captions_val_epoch{e:03d}.json").is_file() for e in range(2))
    assert cli.model.last_captions["test"] == {r["image_id"]: r["caption"] for r in results}


def test_feedback_prop_from_objects_lowers_their_loss_and_changes_captions(tiny_scenes):
    """The caption evidence (all object labels known) drives feedback_prop: the object BCE falls,
    captions change, and t = 0 is the plain decoding.  An untrained network: its decoder depends on
    the image (a few epochs on the tiny data give one sentence for every image)."""
    torch.manual_seed(0)
    dm = ScenesCaptionsDataModule(root=str(tiny_scenes), image_size=64, min_count=2, batch_size=16, num_workers=0,
                                  **TINY_SCENES)
    model = CaptioningModule("resnet18", dm.num_objects, vocabulary=dm.caption_vocabulary, embed_dim=64,
                             hidden_dim=64, metrics=["CIDEr"]).eval()
    ev = model.feedback_evidence()
    ev.setup(model, dm)
    batch = next(iter(dm.test_dataloader()))
    net = model.net
    images, context = ev.batch(batch)
    seen = {}

    def record(t, out):
        seen[t] = ev.scores(out)

    feedback_prop(net, images, ev.known_loss(context, [0], slice(None)), ["conv9", "conv13"], method="rf", steps=5,
                  lr=0.1, callback=record)
    target = ev.target(context)
    figures = [ev.evaluate(seen[t], target, 0) for t in range(6)]
    losses = [f["object_loss"] for f in figures]
    assert all(b < a for a, b in zip(losses, losses[1:])) and losses[-1] < 0.95 * losses[0], losses
    length = model.hparams.max_decode_len
    assert (seen[5][:, :length] != seen[0][:, :length]).any(1).sum() >= 1, "feedback-prop did not change any caption"
    with torch.no_grad():
        assert torch.equal(seen[0][:, :length].long(), net.decode(net(images)["features"], 3, length))  # t = 0: no-fp
    assert set(figures[0]) == set(ev.metrics) and ev.metrics[0] == "CIDEr"


@pytest.mark.filterwarnings("ignore:mention_precision is NaN")  # the tiny model's captions name no object
def test_evaluate_table6_protocol(captioning_run, tiny_scenes, tmp_path):
    ckpt = str(captioning_run.run_dir / "checkpoints" / "last.ckpt")
    cli = evaluate.main(tiny_captioning_args(tiny_scenes, tmp_path) + [
        "--ckpt_path", ckpt, "--feedback.protocol", "select", "--feedback.lr_grid", "[0.03,0.3]",
        "--feedback.steps", "2"])
    out, run_dir = cli.feedback, cli.run_dir
    # Table 6's rows with ResNet-18's names of the same stages (layer1, layer2, layer3)
    assert [r["row"] for r in out["rows"]] == ["no-fp", "LF-input", "LF-conv5", "LF-conv9", "LF-conv13",
                                               "LF-conv5,13", "RF-conv5,13"]
    assert out["table"].splitlines()[1].split() == ["BLEU-4", "METEOR", "ROUGE-L", "CIDEr"]
    # λ and t come from val (select_setting: the best val CIDEr at t >= 1), never from test; the test
    # run of each row is exactly the chosen computation
    val = out["val_callback"]
    for c, s in zip(out["selection"], out["callback"].settings):
        curves = [r["curves"]["CIDEr"][1:] for r in val.summary
                  if (r["method"], r["layers"]) == (c["method"], c["layers"])]
        assert len(curves) == 2 and c["val_CIDEr"] == max(max(v) for v in curves)
        assert (s.lr, s.steps, s.stop) == (c["lr"], c["steps"], c["stop"]) and c["lr"] in (0.03, 0.3)
        assert s.last == c["iteration"] >= 1
    plain = last_value(read_metrics(run_dir), "test/CIDEr")  # the module's own test stage, same checkpoint
    assert out["rows"][0]["CIDEr"] == pytest.approx(plain, rel=1e-6)  # no-fp = the plain test stage (logged as float32)
    for name in ("fp_select_table.txt", "fp_select_table.csv", "fp_select_val_cider.png", "fp_selection.json",
                 "fp_select_examples.json", "fp_select_test_iterations.csv", "fp_select_val_iterations.csv"):
        assert (run_dir / name).is_file(), name
    for r in out["rows"]:  # every row's captions as a COCO results file, rescorable
        results = json.loads((run_dir / r["captions"]).read_text())
        assert {x["image_id"] for x in results} == set(cli.datamodule.split_image_ids("test").tolist())
    rescored = rescore_captions.main([str(run_dir), "--root", str(tiny_scenes), "--num_images",
                                      str(TINY_SCENES["num_images"]), "--size", str(TINY_SCENES["size"])])
    assert [r["row"] for r in rescored] == [r["row"] for r in out["rows"]]
    for a, b in zip(rescored, out["rows"]):  # the results files give back the table
        assert a["CIDEr"] == pytest.approx(b["CIDEr"], abs=1e-12) and 0 <= a["mention_recall"] <= 1
    examples = json.loads((run_dir / "fp_select_examples.json").read_text())
    assert len(examples) == 6 and {"no-fp", "RF-conv5,13", "references", "objects"} <= set(examples[0])
    media = next((run_dir / "wandb").glob("offline-run-*/files/media/table/fp"))  # written when logged
    table = json.loads(next(media.glob("select_examples_*.table.json")).read_text())
    assert table["columns"][:2] == ["image", "image_id"] and len(table["data"]) == 6
    assert table["data"][0][table["columns"].index("no-fp")] == examples[0]["no-fp"]
    assert list(media.glob("select_table_*.table.json"))


def test_caption_protocol_rejects_multilabel_only_flags(captioning_run, tiny_scenes, tmp_path):
    ckpt = str(captioning_run.run_dir / "checkpoints" / "last.ckpt")
    with pytest.raises(ValueError, match="--feedback.num_unknown do not apply to the captioning model"):
        evaluate.main(tiny_captioning_args(tiny_scenes, tmp_path) + [
            "--ckpt_path", ckpt, "--feedback.layers", "[conv13]", "--feedback.num_unknown", "3",
            "--run.wandb", "false"])


@pytest.mark.slow
def test_ddp_gathers_each_caption_once(captioning_run, tiny_scenes, tmp_path):
    """A 2-process DDP test stage on a 9-image test split: every image's caption once, equal to the
    single-process run's, scored as one split."""
    from topdown.captions import score_caption_sets

    best = next((captioning_run.run_dir / "checkpoints").glob("epoch*.ckpt"))  # what the fixture's test stage used
    ddp = tiny_captioning_args(tiny_scenes, tmp_path / "runs") + [
        "--ckpt_path", str(best), "--run.wandb", "false", "--data.max_test_images", "9",
        "--model.metrics", "[BLEU-4,ROUGE-L,CIDEr]",  # METEOR's JVM is tested elsewhere
        "--run.name", "ddp", "--trainer.accelerator", "cpu", "--trainer.devices", "2", "--trainer.strategy", "ddp"]
    out = finish(run_entry("evaluate.py", ddp, tmp_path))
    assert "distributed_backend=gloo" in out and "All distributed processes registered" in out
    ddp_dir = newest_run(tmp_path / "runs", "ddp")
    results = json.loads((ddp_dir / "captions_test.json").read_text())
    single = json.loads((captioning_run.run_dir / "captions_test.json").read_text())
    single = {r["image_id"]: r["caption"] for r in single}
    assert len(results) == len({r["image_id"] for r in results}) == 9
    assert all(single[r["image_id"]] == r["caption"] for r in results)
    refs = captioning_run.datamodule.split_references("test")
    cands = {r["image_id"]: r["caption"] for r in results}
    expected = score_caption_sets({i: refs[i] for i in cands}, [cands], ("BLEU-4", "ROUGE-L", "CIDEr"))[0]
    for k, v in expected.items():
        assert last_value(read_metrics(ddp_dir), f"test/{k}") == pytest.approx(v, rel=1e-6), k
