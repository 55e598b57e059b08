"""The models a user names with ``--model NAME``: a preset config plus the data-to-model links.

Each entry's preset lives in ``configs/<name>.yaml``. ``links`` are
``(data attribute, model argument)`` pairs passed to ``link_arguments`` with
``apply_on="instantiate"``: sizes that depend on the data (number of labels,
label weights, hierarchy) flow from the datamodule to the model.
``monitor`` is the validation key that picks the best checkpoint.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"


@dataclass(frozen=True)
class Preset:
    name: str
    links: tuple[tuple[str, str], ...] = ()
    monitor: str | None = None
    mode: str = "max"
    extra: dict = field(default_factory=dict)

    @property
    def config(self) -> Path:
        return CONFIG_DIR / f"{self.name}.yaml"


MODELS: dict[str, Preset] = {
    "multilabel": Preset(
        "multilabel",
        links=(
            ("data.num_labels", "model.init_args.num_labels"),
            ("data.label_weights", "model.init_args.label_weights"),
        ),
        monitor="val/map",
    ),
    "hierarchical": Preset(
        "hierarchical",
        links=(
            ("data.num_classes", "model.init_args.num_classes"),
            ("data.num_general", "model.init_args.num_general"),
            ("data.num_coarse", "model.init_args.num_coarse"),
        ),
        monitor="val/mc_acc",
    ),
    "generators": Preset("generators"),
    "siamese": Preset(
        "siamese",
        links=(
            ("data.image_size", "model.init_args.image_size"),
            ("data.threshold", "model.init_args.threshold"),
        ),
    ),
    "inversion": Preset(
        "inversion",
        links=(("data.image_size", "model.init_args.image_size"),),
        monitor="val/loss",
        mode="min",
    ),
    "news": Preset(
        "news",
        links=(
            ("data.num_caption_labels", "model.init_args.num_caption_labels"),
            ("data.num_article_labels", "model.init_args.num_article_labels"),
            ("data.caption_label_weights", "model.init_args.caption_label_weights"),
            ("data.article_label_weights", "model.init_args.article_label_weights"),
        ),
        monitor="val/map_caption",
    ),
    "warp_alexnet": Preset(
        "warp_alexnet",
        links=(
            ("data.num_classes", "model.init_args.num_classes"),
            ("data.crop_size", "model.init_args.image_size"),
        ),
        monitor="val/top1",
    ),
    "captioning": Preset(
        "captioning",
        links=(
            ("data.num_objects", "model.init_args.num_objects"),
            ("data.label_weights", "model.init_args.object_weights"),
            ("data.caption_vocabulary", "model.init_args.vocabulary"),
        ),
        monitor="val/CIDEr",
        # evaluate.py --feedback.*: caption protocols (Table 6) instead of the multi-label ones
        extra={"feedback_protocols": "callbacks.captions:PROTOCOL_RUNNERS"},
    ),
}


def get_preset(name: str) -> Preset:
    if name not in MODELS:
        raise KeyError(name)
    return MODELS[name]
