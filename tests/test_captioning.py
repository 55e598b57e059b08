"""`train.py --model captioning` and `evaluate.py` on the tiny scenes data: a short real run, the
Table 6 protocol, feedback-prop from the object labels, and a real 2-process DDP evaluation."""
from __future__ import annotations

import json

import pytest
import torch

import evaluate
import train
from conftest import TINY_SCENES
from test_cli import last_value, read_metrics
from test_distributed import finish, newest_run, run_entry
from topdown.captions import METRICS, start_meteor
from topdown.feedback import feedback_prop, multilabel_known_loss

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
    """One short real training run (3 epochs of 7 batches, then test on the best checkpoint)."""
    runs = tmp_path_factory.mktemp("caption-runs")
    return train.main(tiny_captioning_args(tiny_scenes, runs) + ["--trainer.max_epochs", "3", "--model.lr", "0.002"])


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
    ckpts = sorted(p.name for p in (run_dir / "checkpoints").glob("epoch*.ckpt"))
    assert len(ckpts) == 3 and all("val_CIDEr" in n for n in ckpts), ckpts  # best chosen by val/CIDEr
    results = json.loads((run_dir / "captions_test.json").read_text())
    test_ids = set(cli.datamodule.split_image_ids("test").tolist())
    assert {r["image_id"] for r in results} == test_ids and all(isinstance(r["caption"], str) for r in results)
    assert all((run_dir / f"captions_val_epoch{e:03d}.json").is_file() for e in range(3))
    assert cli.model.last_captions["test"] == {r["image_id"]: r["caption"] for r in results}


def test_feedback_prop_from_objects_lowers_their_loss_and_changes_captions(captioning_run):
    dm, model = captioning_run.datamodule, captioning_run.model
    batch = next(iter(dm.test_dataloader()))
    net = model.net.eval()
    labels = batch["labels"]
    seen = {}

    def record(t, out):
        seen[t] = (torch.nn.functional.binary_cross_entropy_with_logits(out["objects"], labels).item(),
                   net.decode(out["features"], 3, 16))

    known = multilabel_known_loss(torch.arange(labels.shape[1]), labels, key="objects")
    feedback_prop(net, batch["image"], known, ["conv9", "conv13"], method="rf", steps=5, lr=0.1, callback=record)
    losses = [seen[t][0] for t in range(6)]
    assert all(b < a for a, b in zip(losses, losses[1:])) and losses[-1] < 0.95 * losses[0], losses
    assert (seen[5][1] != seen[0][1]).any(1).sum() >= 1, "feedback-prop did not change any caption"
    with torch.no_grad():
        assert torch.equal(seen[0][1], net.decode(net(batch["image"])["features"], 3, 16))  # t = 0 is no-fp


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
    # lr and T come from val: the test run of each row uses exactly the chosen values
    for c, s in zip(out["selection"], out["callback"].settings):
        assert (c["lr"], c["steps"]) == (s.lr, s.steps) and c["lr"] in (0.03, 0.3) and 0 <= c["steps"] <= 2
        every = len(c["layers"].split("+")) if c["method"] == "lf" else 1  # LF: T counts per pivot
        assert c["val_CIDEr"] == max(out["val_callback"].curves[(c["row"], c["lr"])][::every])
    plain = last_value(read_metrics(run_dir), "test/CIDEr")  # the module's own test stage, same checkpoint
    assert out["rows"][0]["CIDEr"] == pytest.approx(plain, abs=1e-9)  # no-fp = the plain test stage
    for name in ("fp_select_table.txt", "fp_select_table.csv", "fp_select_test_iterations.png",
                 "fp_selection.json", "captions_select_test_no-fp.json", "fp_select_examples.json"):
        assert (run_dir / name).is_file(), name
    examples = json.loads((run_dir / "fp_select_examples.json").read_text())
    assert len(examples) == 6 and {"no-fp", "references", "objects"} <= set(examples[0])
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
    """Scores of a 2-process DDP test stage equal the single-process ones on a 9-image test split."""
    ckpt = str(captioning_run.run_dir / "checkpoints" / "last.ckpt")
    base = tiny_captioning_args(tiny_scenes, tmp_path / "runs") + [
        "--ckpt_path", ckpt, "--run.wandb", "false", "--data.max_test_images", "9",
        "--model.metrics", "[BLEU-4,ROUGE-L,CIDEr]"]  # METEOR's JVM is tested elsewhere
    ddp = base + ["--run.name", "ddp", "--trainer.accelerator", "cpu", "--trainer.devices", "2",
                  "--trainer.strategy", "ddp"]
    proc = run_entry("evaluate.py", ddp, tmp_path)  # runs while the single-process evaluation below does
    single = evaluate.main(base + ["--run.name", "single"])
    out = finish(proc)
    assert "distributed_backend=gloo" in out and "All distributed processes registered" in out
    ddp_dir = newest_run(tmp_path / "runs", "ddp")
    results = json.loads((ddp_dir / "captions_test.json").read_text())
    assert len(results) == 9 and results == json.loads((single.run_dir / "captions_test.json").read_text())
    for k in ("BLEU-4", "ROUGE-L", "CIDEr"):
        a, b = last_value(read_metrics(single.run_dir), f"test/{k}"), last_value(read_metrics(ddp_dir), f"test/{k}")
        assert a == pytest.approx(b, abs=1e-9), k
