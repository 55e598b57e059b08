"""The news view of the embedded ``scenes`` dataset, in the GoodNews layout (feedback-prop §4.3).

``build_news_view(root)`` adds, under ``root/news/``::

    article_caption.json   {article_id: {"article": text, "images": {"0": caption}, "headline": {"main": ...}}}
    img_splits.json        {"<article_id>_0": "train" | "val" | "test"}
    images/<article_id>_0.jpg   the scene image (a hard link, or a byte copy, of the COCO-layout file)
    news.json              seed and counts; written last, so its presence means a complete view

Each image gets an article of several sentences. It names the scene and most of the objects
of the picture in words that its captions never use (a ``dog`` of the captions is a
``hound``, ``terrier`` or ``spaniel`` in the article; a ``beach`` is a ``coastline``), so the
article nouns are evidence about the caption nouns only through what they say about the
picture. It is noisy as real news is: some objects go unmentioned, some articles name an
object or a place that is not in the picture, and every article carries a story of its own
(politics, courts, weather, ...) whose nouns are unrelated to the image. The sentences come
in random order, so the first 25 % of the words hold about a quarter of the clues.

The caption of an image is the first of its five COCO-layout captions; ``train2014``
images are ``train`` and ``val2014`` images are split half and half into ``val`` and
``test``. Everything is read back from the files of the scenes build and drawn from an RNG
stream of its own, seeded by ``(seed, image id)``: the rest of the dataset is unchanged.
"""
from __future__ import annotations

import fcntl
import json
import os
import shutil
from collections import Counter
from pathlib import Path

import numpy as np

NEWS_DIR = "news"
_STREAM = 0x4E455753  # "NEWS": this view's own random stream

# Article words for each object and scene: none of them occurs in the captions.
OBJECT_WORDS = {
    "woman": ("resident", "mother", "shopper"), "child": ("youngster", "toddler", "pupil"),
    "dog": ("hound", "terrier", "spaniel"), "cat": ("tabby", "feline", "moggy"),
    "bird": ("pigeon", "seagull", "sparrow"), "horse": ("stallion", "mare", "jockey"),
    "cow": ("heifer", "herd", "calf"), "sheep": ("ewe", "flock", "shepherd"),
    "car": ("motorist", "sedan", "hatchback"), "bus": ("minibus", "commuter", "coach"),
    "truck": ("van", "haulier", "pickup"), "bicycle": ("cyclist", "rider", "helmet"),
    "boat": ("yacht", "vessel", "ferry"), "airplane": ("aircraft", "airliner", "pilot"),
    "train": ("railway", "locomotive", "carriage"), "tree": ("oak", "foliage", "branch"),
    "flower": ("blossom", "bloom", "tulip"), "bench": ("seat", "plaque", "memorial"),
    "chair": ("stool", "armchair", "furniture"), "table": ("desk", "tablecloth", "furniture"),
    "bed": ("mattress", "duvet", "pillow"), "couch": ("settee", "cushion", "upholstery"),
    "lamp": ("lantern", "bulb", "lampshade"), "laptop": ("notebook", "keyboard", "screen"),
    "book": ("paperback", "textbook", "author"), "cup": ("coffee", "tea", "saucer"),
    "bottle": ("wine", "beer", "drink"), "umbrella": ("parasol", "sunshade", "brolly"),
    "ball": ("football", "soccer", "kickabout"), "kite": ("streamer", "breeze", "hobbyist"),
}
SCENE_WORDS = {
    "bedroom": ("nightstand", "bedtime", "pyjamas"), "kitchen": ("cooker", "oven", "chef"),
    "living_room": ("household", "fireplace", "television"), "dining_room": ("dinner", "feast", "banquet"),
    "office": ("employer", "headquarters", "colleague"), "classroom": ("teacher", "lesson", "blackboard"),
    "restaurant": ("waiter", "menu", "cuisine"), "supermarket": ("retailer", "checkout", "aisle"),
    "beach": ("coastline", "seafront", "holidaymaker"), "lake": ("reservoir", "angler", "lakeside"),
    "river": ("riverbank", "canal", "towpath"), "mountain": ("summit", "climber", "peak"),
    "desert": ("drought", "oasis", "camel"), "forest": ("woodland", "forestry", "ranger"),
    "pasture": ("farmer", "agriculture", "livestock"), "street": ("pedestrian", "pavement", "traffic"),
    "highway": ("motorway", "congestion", "junction"), "parking_lot": ("attendant", "garage", "driver"),
    "harbor": ("quay", "waterfront", "fisherman"), "airport": ("terminal", "passenger", "aviation"),
    "park": ("picnic", "greenery", "gardener"), "playground": ("swing", "slide", "playtime"),
    "baseball_field": ("league", "pitcher", "tournament"),
}
# The story each article also tells, unrelated to its picture.
TOPICS = {
    "politics": ("government", "minister", "election", "parliament", "vote", "policy", "campaign", "referendum"),
    "economy": ("economy", "budget", "inflation", "tax", "investor", "profit", "bank", "industry"),
    "courts": ("police", "court", "judge", "investigation", "trial", "suspect", "officer", "lawyer"),
    "health": ("hospital", "doctor", "patient", "vaccine", "virus", "nurse", "clinic", "treatment"),
    "weather": ("storm", "forecast", "rainfall", "temperature", "flood", "warning", "wind", "heatwave"),
    "culture": ("festival", "concert", "museum", "exhibition", "film", "actor", "singer", "audience"),
}
DAYS = ("Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday")
STORY = (
    "The {a} announced a review of the {b} on {day}.",
    "Critics said the {a} had ignored the {b} for years.",
    "A spokesman for the {a} declined to comment on the {b}.",
    "The {a} is expected to publish a report on the {b} next month.",
    "Officials said the {a} and the {b} would be discussed at a meeting on {day}.",
    "According to a statement, the {a} will not change its position on the {b}.",
)
OBJECT_SENTENCES = (
    "Witnesses described a {w} near the scene.",
    "A {w} could be seen in the background, one local noted.",
    "The {w} drew the attention of passers-by.",
    "Nobody expected to find the {w} there, the organisers admitted.",
    "Photographs published on {day} show a {w} in the foreground.",
)
SCENE_SENTENCES = (
    "The {w} was busier than usual on {day}.",
    "Locals say the {w} has changed a lot in recent years.",
    "Our photographer spent the afternoon near the {w}.",
    "Visitors to the {w} were asked to take care.",
)
HEADLINES = ("{A} under pressure over {b}", "New {b} plan divides {a}", "{A} faces questions on {b}")


def article_id(image_id: int) -> str:
    """A 24-hex-digit id like GoodNews' article ids."""
    return f"{image_id:024x}"


def _scene_of_images(root: Path) -> dict[int, str]:
    classes = [line.strip() for line in (root / "SUN397" / "ClassName.txt").read_text().splitlines() if line.strip()]
    out = {}
    for c in classes:
        name = c.rsplit("/", 1)[-1]
        for f in (root / "SUN397" / c.lstrip("/")).glob("sun_*.jpg"):
            out[int(f.stem.split("_")[1])] = name
    return out


def write_article(rng: np.random.Generator, scene: str, objects: Counter) -> tuple[str, str]:
    """(article text, headline) for one picture of ``scene`` holding ``objects`` (category counts)."""
    sentences = []
    day = lambda: DAYS[int(rng.integers(len(DAYS)))]  # noqa: E731

    def pick(seq):
        return seq[int(rng.integers(len(seq)))]

    for _ in range(1 + int(rng.random() < .5)):
        sentences.append(pick(SCENE_SENTENCES).format(w=pick(SCENE_WORDS[scene]), day=day()))
    for name in sorted(objects):
        if rng.random() < .75:
            sentences.append(pick(OBJECT_SENTENCES).format(w=pick(OBJECT_WORDS[name]), day=day()))
    if rng.random() < .35:  # an object that is not in the picture
        absent = [o for o in OBJECT_WORDS if o not in objects]
        sentences.append(pick(OBJECT_SENTENCES).format(w=pick(OBJECT_WORDS[pick(absent)]), day=day()))
    if rng.random() < .2:  # and a place that is not
        other = [s for s in SCENE_WORDS if s != scene]
        sentences.append(pick(SCENE_SENTENCES).format(w=pick(SCENE_WORDS[pick(other)]), day=day()))
    topic = TOPICS[pick(sorted(TOPICS))]
    for _ in range(int(rng.integers(3, 7))):
        a, b = rng.choice(len(topic), 2, replace=False)
        sentences.append(pick(STORY).format(a=topic[a], b=topic[b], day=day()))
    order = rng.permutation(len(sentences))
    a, b = rng.choice(len(topic), 2, replace=False)
    headline = pick(HEADLINES).format(A=topic[a].capitalize(), a=topic[a], b=topic[b])
    return " ".join(sentences[i] for i in order), headline


def build_news_view(root, seed: int = 0, test_fraction: float = 0.5) -> Path:
    """Write ``root/news/`` from a complete scenes build under ``root`` (see module docstring)."""
    root = Path(root)
    out = root / NEWS_DIR
    if out.exists():
        shutil.rmtree(out)  # its vocabulary caches describe the previous view too
    (out / "images").mkdir(parents=True)
    scenes = _scene_of_images(root)
    articles, splits = {}, {}
    counts = Counter()
    for coco_split in ("train", "val"):
        caps = json.loads((root / "annotations" / f"captions_{coco_split}2014.json").read_text())
        inst = json.loads((root / "annotations" / f"instances_{coco_split}2014.json").read_text())
        names = {c["id"]: c["name"] for c in inst["categories"]}
        objects: dict[int, Counter] = {im["id"]: Counter() for im in caps["images"]}
        for ann in inst["annotations"]:
            objects[ann["image_id"]][names[ann["category_id"]]] += 1
        first = {}
        for ann in sorted(caps["annotations"], key=lambda a: a["id"]):
            first.setdefault(ann["image_id"], ann["caption"])
        for im in sorted(caps["images"], key=lambda im: im["id"]):
            i = im["id"]
            rng = np.random.default_rng([seed, _STREAM, i])
            text, headline = write_article(rng, scenes[i], objects[i])
            aid = article_id(i)
            key = f"{aid}_0"
            split = "train" if coco_split == "train" else ("test" if rng.random() < test_fraction else "val")
            articles[aid] = {"article": text, "images": {"0": first[i]}, "headline": {"main": headline}}
            splits[key] = split
            counts[split] += 1
            src, dst = root / f"{coco_split}2014" / im["file_name"], out / "images" / f"{key}.jpg"
            try:
                os.link(src, dst)
            except OSError:
                shutil.copyfile(src, dst)
    (out / "article_caption.json").write_text(json.dumps(articles, indent=0))
    (out / "img_splits.json").write_text(json.dumps(splits, indent=0))
    meta = {"seed": seed, "test_fraction": test_fraction, "counts": dict(sorted(counts.items())),
            "articles": len(articles)}
    (out / "news.json").write_text(json.dumps(meta, indent=1) + "\n")
    return out


def ensure_news_view(root, seed: int = 0) -> Path:
    """``root/news`` from the scenes build under ``root``, written once (safe when DDP ranks race)."""
    root = Path(root)
    with open(root / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            if not (root / NEWS_DIR / "news.json").is_file():
                build_news_view(root, seed)
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
    return root / NEWS_DIR
