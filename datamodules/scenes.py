"""The embedded ``scenes`` dataset: procedurally drawn scenes in real on-disk formats.

``python -m datamodules.scenes --root DIR --num-images N --size S --seed 0``
writes a small stand-in for the two datasets of the papers (layout fixed in
docs/DESIGN.md):

* COCO-2014 (feedback-prop §4.1-4.2): ``annotations/captions_*2014.json`` with
  five captions per image, ``annotations/instances_*2014.json`` with boxes of
  30 object categories, and JPEGs named ``COCO_{train,val}2014_%012d.jpg``;
  ``annotations/dataset_coco.json``, Karpathy's split file of the same captions (the
  captioning view, feedback-prop §4.4; :func:`write_karpathy_split`).
* SUN397 (feedback-prop §4.3, hierarchical scene recognition): the same
  images in ``SUN397/<letter>/<category>/``, ``ClassName.txt`` and a
  three-level ``hierarchy.csv`` (coarse, general, fine).
* ILSVRC CLS-LOC classification (generators paper §3.3, Table 1): the same
  images in ``ILSVRC/Data/CLS-LOC/train/<wnid>/`` and a flat
  ``ILSVRC/Data/CLS-LOC/val/``, with ``LOC_val_solution.csv`` and
  ``LOC_synset_mapping.txt`` (:func:`write_classification_view`). An image's class
  is its largest object's category (WordNet ids of :data:`OBJECT_SYNSETS`).

Why it looks the way it does: feedback-prop only helps when knowing some
labels tells something about the others, so each scene has a strong, structured
co-occurrence prior over objects (plus object pairs that go together, and one
pair that avoids each other). Clutter, occlusion, small objects, look-alike
categories, noise and JPEG artefacts keep a ResNet-18 far from perfect. About
one image in eight has a single large central object whose box is centred,
near-square and covers 40-60% of the pixels (the generators paper's §2.1
selection rule), drawn so that it stays in frame under any rotation.

Every image is drawn from its own generator seeded by ``(seed, image_id)``, so
the bytes do not depend on the number of workers.
"""
from __future__ import annotations

import argparse
import fcntl
import io
import json
import math
import multiprocessing
import os
import re
import shutil
import time
import warnings
from collections import Counter
from pathlib import Path
from typing import NamedTuple

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

# --------------------------------------------------------------------------- #
# Vocabulary of the world: colours, objects, scenes.
# --------------------------------------------------------------------------- #
COLORS = {
    "red": (200, 35, 35), "green": (45, 150, 55), "blue": (40, 75, 200),
    "yellow": (235, 210, 45), "orange": (240, 130, 25), "purple": (130, 55, 165),
    "pink": (240, 145, 185), "brown": (120, 75, 35), "black": (28, 28, 28),
    "white": (238, 238, 238), "gray": (128, 128, 132),
}


class ObjectSpec(NamedTuple):
    name: str
    plural: str
    supercategory: str
    shape: str          # main silhouette
    part: str           # extra parts that make the glyph recognisable
    texture: str        # fill pattern of the main silhouette
    colors: tuple       # colour names the instances may take
    size: float         # typical height as a fraction of the image, close to the camera
    aspect: float       # width / height
    place: str          # ground, sky or water
    verbs: tuple
    synonyms: tuple     # caption words used instead of the name now and then


def _o(name, plural, sup, shape, part, tex, colors, size, aspect, place, verbs, syn=""):
    return ObjectSpec(name, plural, sup, shape, part, tex, tuple(colors.split()), size, aspect,
                      place, tuple(verbs.split()), tuple(syn.split()))


# Look-alikes on purpose (woman/child, dog/cat, horse/cow, bird/kite, car/truck)
# so that recognition is hard and context (the other labels) helps.
OBJECTS = [
    _o("woman", "women", "person", "trapezoid", "head", "solid", "red blue black white green purple",
       0.36, 0.42, "ground", "standing walking smiling", "lady person"),
    _o("child", "children", "person", "triangle", "head", "dots", "yellow pink orange red blue",
       0.24, 0.5, "ground", "playing running standing", "kid girl boy"),
    _o("dog", "dogs", "animal", "ellipse", "animal", "solid", "brown black white",
       0.17, 1.4, "ground", "sitting running lying", "puppy"),
    _o("cat", "cats", "animal", "ellipse", "animal", "hstripes", "gray orange black white",
       0.13, 1.3, "ground", "sitting sleeping lying", "kitten"),
    _o("bird", "birds", "animal", "diamond", "none", "solid", "red blue yellow black",
       0.07, 1.4, "sky", "flying perched"),
    _o("horse", "horses", "animal", "rect", "animal", "solid", "brown black white",
       0.32, 1.3, "ground", "standing running grazing", "pony"),
    _o("cow", "cows", "animal", "rect", "animal", "dots", "white black brown",
       0.27, 1.5, "ground", "grazing standing", "cattle"),
    _o("sheep", "sheep", "animal", "ellipse", "legs", "checker", "white gray",
       0.16, 1.4, "ground", "grazing standing", "lamb"),
    _o("car", "cars", "vehicle", "rect", "wheels", "solid", "red blue white black gray yellow",
       0.18, 1.9, "ground", "parked driving", "vehicle"),
    _o("bus", "buses", "vehicle", "rect", "wheels", "windows", "yellow red blue white",
       0.34, 2.2, "ground", "parked driving"),
    _o("truck", "trucks", "vehicle", "cab", "wheels", "hstripes", "white red blue orange gray",
       0.27, 1.8, "ground", "parked driving", "lorry"),
    _o("bicycle", "bicycles", "vehicle", "twinring", "none", "solid", "red blue black green",
       0.16, 1.6, "ground", "parked leaning", "bike"),
    _o("boat", "boats", "vehicle", "invtrapezoid", "sail", "solid", "white red blue yellow",
       0.22, 1.2, "water", "floating docked", "ship sailboat"),
    _o("airplane", "airplanes", "vehicle", "plane", "none", "solid", "white gray blue",
       0.30, 1.6, "sky", "flying parked", "plane jet"),
    _o("train", "trains", "vehicle", "rect", "wheels", "windows", "red green blue gray",
       0.25, 3.0, "ground", "moving stopped"),
    _o("tree", "trees", "plant", "ellipse", "trunk", "dots", "green green orange",
       0.48, 0.7, "ground", "growing standing"),
    _o("flower", "flowers", "plant", "star", "stick", "solid", "red yellow pink purple white",
       0.10, 0.7, "ground", "blooming growing"),
    _o("bench", "benches", "furniture", "rect", "legs", "hstripes", "brown green gray",
       0.14, 2.2, "ground", "empty"),
    _o("chair", "chairs", "furniture", "lshape", "legs", "solid", "brown black red blue",
       0.20, 0.8, "ground", "empty"),
    _o("table", "tables", "furniture", "tshape", "none", "hstripes", "brown white black",
       0.22, 1.6, "ground", "set"),
    _o("bed", "beds", "furniture", "rect", "headboard", "checker", "white blue pink red",
       0.32, 1.8, "ground", "made"),
    _o("couch", "couches", "furniture", "ushape", "none", "solid", "red blue gray brown green",
       0.26, 2.0, "ground", "empty", "sofa"),
    _o("lamp", "lamps", "furniture", "trapezoid", "stick", "gradient", "yellow white orange",
       0.22, 0.6, "ground", "lit"),
    _o("laptop", "laptops", "electronic", "rect", "screen", "gradient", "gray black white",
       0.12, 1.3, "ground", "open", "computer"),
    _o("book", "books", "indoor", "rect", "spine", "solid", "red blue green brown black",
       0.09, 0.7, "ground", "lying", "novel"),
    _o("cup", "cups", "kitchen", "invtrapezoid", "handle", "solid", "white red blue yellow",
       0.07, 1.0, "ground", "", "mug"),
    _o("bottle", "bottles", "kitchen", "bottle", "none", "gradient", "green brown blue white",
       0.13, 0.35, "ground", ""),
    _o("umbrella", "umbrellas", "outdoor", "semicircle", "stick", "vstripes",
       "red blue black yellow pink purple", 0.22, 1.2, "ground", "open"),
    _o("ball", "balls", "sports", "ellipse", "none", "checker", "red white orange yellow blue",
       0.06, 1.0, "ground", "lying"),
    _o("kite", "kites", "sports", "diamond", "tail", "dstripes", "red yellow blue green orange pink",
       0.11, 0.8, "sky", "flying"),
]
OBJECT_INDEX = {o.name: i for i, o in enumerate(OBJECTS)}

COARSE = ("indoor", "outdoor_natural", "outdoor_man_made")
GENERAL = {  # general category -> coarse category (SUN's hierarchy_three_levels)
    "home": "indoor", "workplace": "indoor", "shopping_dining": "indoor",
    "water_ice_snow": "outdoor_natural", "mountains_desert": "outdoor_natural",
    "forest_field": "outdoor_natural",
    "transportation": "outdoor_man_made", "sports_leisure": "outdoor_man_made",
}


class SceneSpec(NamedTuple):
    name: str
    general: tuple
    words: tuple        # how captions name the scene
    background: dict
    prior: dict         # object -> (presence probability, mean extra instances)


def _prior(text):
    out = {}
    for item in text.split():
        name, spec = item.split(":")
        p, _, extra = spec.partition("x")
        out[name] = (float(p), float(extra or 0))
    return out


def _s(name, general, words, bg, prior):
    return SceneSpec(name, tuple(general.split()), tuple(words.split("|")), bg, _prior(prior))


def _bg(kind, horizon, top, bottom, ground, tex, *features):
    return {"kind": kind, "horizon": horizon, "top": top, "bottom": bottom, "ground": ground,
            "texture": tex, "features": features}


SKY, PALE, DUSK = (95, 150, 225), (185, 210, 235), (150, 140, 200)
GRASS, SAND, ASPHALT = (70, 145, 60), (220, 195, 140), (95, 95, 100)
# Three scenes belong to two general categories (dining_room, harbor, park), and
# two of those to two coarse ones: SUN's hierarchy is not a tree either.
SCENES = [
    _s("bedroom", "home", "bedroom|bed room|room", _bg("in", .62, (225, 205, 215), (205, 190, 205), (150, 120, 110), "carpet", "window", "frame"),
       "bed:.92 lamp:.6 book:.5x1 cat:.3 dog:.12 chair:.3 laptop:.25 woman:.2 child:.2 cup:.15 ball:.1"),
    _s("kitchen", "home", "kitchen", _bg("in", .58, (235, 235, 225), (220, 220, 210), (190, 185, 175), "tiles", "counter", "tiles_wall"),
       "table:.6 cup:.75x1 bottle:.65x1 chair:.5x1 woman:.4 cat:.15 flower:.15 book:.1 laptop:.1"),
    _s("living_room", "home", "living room|room|lounge", _bg("in", .6, (215, 190, 150), (200, 175, 140), (140, 95, 55), "wood", "window", "frame"),
       "couch:.88 lamp:.5 table:.5 book:.4x1 dog:.35 cat:.35 woman:.3 child:.25 laptop:.25 cup:.3 flower:.2 chair:.3"),
    _s("dining_room", "home shopping_dining", "dining room|room", _bg("in", .62, (200, 170, 170), (185, 160, 160), (125, 85, 50), "wood", "ceiling_lamps", "frame"),
       "table:.95 chair:.9x2 cup:.6x1 bottle:.5 flower:.4 lamp:.3 woman:.3 child:.2"),
    _s("office", "workplace", "office|workplace|room", _bg("in", .6, (210, 215, 220), (195, 200, 205), (110, 115, 125), "carpet", "blinds"),
       "laptop:.88x1 chair:.8x1 table:.6 cup:.5 book:.5x1 woman:.6 lamp:.3 bottle:.3 flower:.1"),
    _s("classroom", "workplace", "classroom|class room|school", _bg("in", .6, (225, 220, 190), (215, 210, 180), (150, 130, 100), "tiles", "board"),
       "chair:.9x3 table:.7x2 book:.8x2 child:.75x3 woman:.45 laptop:.3 ball:.1"),
    _s("restaurant", "shopping_dining", "restaurant|cafe|diner", _bg("in", .6, (120, 70, 50), (100, 60, 45), (90, 55, 35), "wood", "ceiling_lamps", "frame"),
       "table:.92x2 chair:.85x3 cup:.7x2 bottle:.6x1 woman:.75x2 child:.2 flower:.3 lamp:.3"),
    _s("supermarket", "shopping_dining", "supermarket|grocery store|store|market", _bg("in", .72, (235, 235, 235), (225, 225, 225), (200, 200, 195), "tiles", "shelves"),
       "bottle:.92x4 woman:.6x1 child:.3 cup:.3 book:.2 flower:.3 ball:.2"),
    _s("beach", "water_ice_snow", "beach|shore|seaside", _bg("out", .38, SKY, PALE, SAND, "sand", "sea"),
       "umbrella:.8x2 woman:.7x2 child:.5x1 ball:.4 boat:.5 bird:.4x1 dog:.25 kite:.3 chair:.35 bottle:.15"),
    _s("lake", "water_ice_snow", "lake|pond|water", _bg("out", .35, SKY, PALE, GRASS, "grass", "hills", "lake"),
       "boat:.7x1 tree:.8x3 bird:.5x2 woman:.3 dog:.2 bench:.2"),
    _s("river", "water_ice_snow", "river|stream|water", _bg("out", .3, PALE, SKY, GRASS, "grass", "river"),
       "boat:.5 tree:.75x3 bird:.4 horse:.15 cow:.15 woman:.2"),
    _s("mountain", "mountains_desert", "mountain|mountains|hill", _bg("out", .5, SKY, PALE, (110, 130, 70), "grass", "mountains"),
       "tree:.6x3 woman:.3 horse:.2 cow:.2 sheep:.25x3 bird:.3"),
    _s("desert", "mountains_desert", "desert|dunes|sand", _bg("out", .42, PALE, (235, 220, 200), (225, 185, 120), "sand", "dunes"),
       "horse:.3 woman:.3 car:.3 truck:.25 bird:.15 tree:.1"),
    _s("forest", "forest_field", "forest|woods", _bg("out", .15, (170, 200, 170), (120, 160, 110), (60, 90, 45), "grass", "trunks"),
       "tree:.98x5 bird:.5x1 dog:.2 woman:.25 horse:.1 bicycle:.1 bench:.1"),
    _s("pasture", "forest_field", "pasture|field|meadow|farm", _bg("out", .42, SKY, PALE, (95, 170, 65), "grass", "fence"),
       "cow:.6x3 sheep:.5x4 horse:.5x1 tree:.5x1 dog:.25 woman:.2 bird:.3 truck:.15"),
    _s("street", "transportation", "street|road|city street|city", _bg("out", .4, PALE, SKY, ASPHALT, "asphalt", "buildings", "road"),
       "car:.9x3 bus:.4 truck:.4 bicycle:.35 woman:.8x2 child:.2 dog:.2 tree:.4x1 umbrella:.25 bench:.15"),
    _s("highway", "transportation", "highway|freeway|road", _bg("out", .4, SKY, PALE, (90, 140, 70), "grass", "lanes"),
       "car:.95x5 truck:.7x1 bus:.4 tree:.3x2 bird:.1"),
    _s("parking_lot", "transportation", "parking lot|lot|car park", _bg("out", .3, PALE, SKY, ASPHALT, "asphalt", "parking_lines"),
       "car:.98x5 truck:.5x1 bus:.2 woman:.4 bicycle:.2 tree:.2"),
    _s("harbor", "transportation water_ice_snow", "harbor|port|marina|dock", _bg("out", .35, SKY, PALE, (70, 110, 160), "water", "pier"),
       "boat:.95x3 bird:.5x2 woman:.4 car:.3 truck:.25 umbrella:.1 bench:.15"),
    _s("airport", "transportation", "airport|runway|airfield", _bg("out", .5, SKY, PALE, (120, 150, 100), "grass", "runway"),
       "airplane:.95x1 truck:.5 bus:.4 car:.4 woman:.4x1 bird:.2"),
    _s("park", "sports_leisure forest_field", "park|garden|lawn", _bg("out", .38, SKY, PALE, GRASS, "grass", "path"),
       "tree:.9x3 bench:.7x1 woman:.6x1 dog:.5 child:.4 ball:.3 bicycle:.3 kite:.3 bird:.4x1 flower:.4x2 umbrella:.1"),
    _s("playground", "sports_leisure", "playground|play area|schoolyard", _bg("out", .4, SKY, PALE, (170, 90, 70), "sand", "playframe"),
       "child:.95x3 ball:.6 woman:.4 dog:.3 tree:.4x1 bench:.4 bicycle:.3 kite:.25"),
    _s("baseball_field", "sports_leisure", "baseball field|ball field|stadium", _bg("out", .35, SKY, PALE, (60, 150, 60), "grass", "diamond"),
       "woman:.9x4 ball:.7 bench:.4 child:.3 chair:.2"),
]
SCENE_INDEX = {s.name: i for i, s in enumerate(SCENES)}

# Objects that go together (a present -> add b with probability p), and one pair
# that avoids each other (a present -> drop b with probability p).
PAIRS = [("dog", "ball", .35), ("child", "ball", .3), ("child", "kite", .15), ("woman", "umbrella", .15),
         ("horse", "woman", .4), ("table", "cup", .45), ("table", "chair", .55), ("laptop", "cup", .4),
         ("bicycle", "woman", .6), ("cup", "bottle", .3), ("bed", "lamp", .35), ("couch", "lamp", .3),
         ("car", "truck", .2), ("boat", "bird", .25), ("tree", "bird", .2), ("bench", "tree", .3)]
AVOID = [("cat", "dog", .6)]

CENTRAL_PROB = 0.14
CENTRAL_AREA = (0.42, 0.48)   # of the image; with aspect <= 1.1 the box corners stay within S/2
CENTRAL_ASPECT = (0.91, 1.1)

# --------------------------------------------------------------------------- #
# Drawing
# --------------------------------------------------------------------------- #


def _jitter(rgb, rng, amount=18):
    d = rng.integers(-amount, amount + 1, 3).tolist()
    return tuple(min(255, max(0, int(c) + e)) for c, e in zip(rgb, d))


def _shade(rgb, f):
    return tuple(min(255, max(0, int(c * f))) for c in rgb)


def _noise_field(rng, size, cells, amp):
    low = rng.normal(0.0, amp, size=(cells, cells)).astype(np.float32)
    img = Image.fromarray(low, mode="F").resize((size, size), Image.BILINEAR)
    return np.asarray(img)


def _shape_polygon(shape, x0, y0, x1, y1):
    """Polygon vertices of a silhouette inside the box, or None for ellipse-like shapes."""
    w, h = x1 - x0, y1 - y0
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    if shape == "rect":
        return [(x0, y0), (x1, y0), (x1, y1), (x0, y1)]
    if shape == "triangle":
        return [(cx, y0), (x1, y1), (x0, y1)]
    if shape == "trapezoid":
        return [(x0 + .25 * w, y0), (x1 - .25 * w, y0), (x1, y1), (x0, y1)]
    if shape == "invtrapezoid":
        return [(x0, y0), (x1, y0), (x1 - .22 * w, y1), (x0 + .22 * w, y1)]
    if shape == "diamond":
        return [(cx, y0), (x1, cy), (cx, y1), (x0, cy)]
    if shape == "star":
        pts = []
        for k in range(10):
            r = 1.0 if k % 2 == 0 else 0.45
            a = -math.pi / 2 + k * math.pi / 5
            pts.append((cx + r * w / 2 * math.cos(a), cy + r * h / 2 * math.sin(a)))
        return pts
    if shape == "cab":
        return [(x0, y0 + .3 * h), (x0 + .25 * w, y0 + .3 * h), (x0 + .3 * w, y0), (x1, y0), (x1, y1), (x0, y1)]
    if shape == "plane":
        return [(x0, cy - .1 * h), (x0 + .35 * w, cy - .1 * h), (x0 + .55 * w, y0), (x0 + .68 * w, y0),
                (x0 + .6 * w, cy - .1 * h), (x1, cy - .05 * h), (x1, cy + .08 * h), (x0 + .6 * w, cy + .1 * h),
                (x0 + .68 * w, y1), (x0 + .55 * w, y1), (x0 + .35 * w, cy + .1 * h), (x0, cy + .1 * h)]
    if shape == "lshape":
        return [(x0, y0), (x0 + .3 * w, y0), (x0 + .3 * w, y0 + .55 * h), (x1, y0 + .55 * h), (x1, y1), (x0, y1)]
    if shape == "tshape":
        return [(x0, y0), (x1, y0), (x1, y0 + .25 * h), (x0 + .58 * w, y0 + .25 * h), (x0 + .58 * w, y1),
                (x0 + .42 * w, y1), (x0 + .42 * w, y0 + .25 * h), (x0, y0 + .25 * h)]
    if shape == "ushape":
        return [(x0, y0), (x0 + .18 * w, y0), (x0 + .18 * w, y0 + .45 * h), (x1 - .18 * w, y0 + .45 * h),
                (x1 - .18 * w, y0), (x1, y0), (x1, y1), (x0, y1)]
    if shape == "bottle":
        return [(x0 + .35 * w, y0), (x1 - .35 * w, y0), (x1 - .35 * w, y0 + .3 * h), (x1, y0 + .45 * h),
                (x1, y1), (x0, y1), (x0, y0 + .45 * h), (x0 + .35 * w, y0 + .3 * h)]
    return None


def _draw_shape(d: ImageDraw.ImageDraw, shape, box, fill=255):
    x0, y0, x1, y1 = box
    if x1 - x0 < 1 or y1 - y0 < 1:
        return
    poly = _shape_polygon(shape, x0, y0, x1, y1)
    if poly is not None:
        d.polygon(poly, fill=fill)
    elif shape == "semicircle":
        d.pieslice([x0, y0, x1, y0 + 2 * (y1 - y0)], 180, 360, fill=fill)
    elif shape == "twinring":
        r = min((x1 - x0) * .28, (y1 - y0) * .5)
        wdt = max(1, int(r * .35))
        for cx in (x0 + r, x1 - r):
            d.ellipse([cx - r, y1 - 2 * r, cx + r, y1], outline=fill, width=wdt)
        d.line([(x0 + r, y1 - r), ((x0 + x1) / 2, y0 + .2 * (y1 - y0)), (x1 - r, y1 - r)], fill=fill, width=wdt)
        d.line([((x0 + x1) / 2 - r * .6, y0), ((x0 + x1) / 2 + r * .3, y0)], fill=fill, width=wdt)
    else:  # ellipse
        d.ellipse([x0, y0, x1, y1], fill=fill)


def _texture(kind, w, h, c1, c2, rng):
    """RGB array [h, w, 3] filling a silhouette: the category's pattern in its colours."""
    yy, xx = np.ogrid[0:h, 0:w]
    period = max(2, int(round(min(w, h) / rng.uniform(3.0, 5.0))))
    if kind == "hstripes":
        pat = (yy // period) % 2 == 0
    elif kind == "vstripes":
        pat = (xx // period) % 2 == 0
    elif kind == "dstripes":
        pat = ((xx + yy) // period) % 2 == 0
    elif kind == "checker":
        pat = ((xx // period) + (yy // period)) % 2 == 0
    elif kind == "dots":
        pat = ((xx % period) - period // 2) ** 2 + ((yy % period) - period // 2) ** 2 > (period / 3.2) ** 2
    elif kind == "windows":
        top, bot = int(.15 * h), int(.45 * h)
        pat = ~(((xx // period) % 2 == 1) & (yy >= top) & (yy < bot))
        c2 = (200, 225, 240)
    elif kind == "gradient":
        t = (yy / max(h - 1, 1))[..., None]
        col = (np.asarray(c1) * (1 - t) + np.asarray(c2) * t).astype(np.uint8)
        return np.ascontiguousarray(np.broadcast_to(col, (h, w, 3)))
    else:
        pat = np.ones((h, w), bool)
    pat = np.broadcast_to(pat, (h, w))
    return np.where(pat[..., None], np.asarray(c1, np.uint8), np.asarray(c2, np.uint8)).astype(np.uint8)


def _glyph(spec: ObjectSpec, w, h, color, rng):
    """Draw one object into a tile: returns (RGB image, mask image), both w x h."""
    base = COLORS[color]
    c1 = _jitter(base, rng, 14)
    c2 = _shade(c1, 0.6 if sum(c1) > 300 else 1.6)
    tile = Image.new("RGB", (w, h))
    mask = Image.new("L", (w, h), 0)
    dm = ImageDraw.Draw(mask)
    dt = ImageDraw.Draw(tile)
    main = (0, 0, w - 1, h - 1)
    under, over = [], []  # (shape-or-callable, box, colour) drawn before / after the body
    part, W, H = spec.part, w - 1, h - 1
    dark = (30, 30, 30)
    if part == "head":
        r = min(W * .55, H * .28)
        main = (0, H * .25, W, H)
        over.append(("ellipse", (W / 2 - r / 2, 0, W / 2 + r / 2, r), _jitter((205, 160, 125), rng, 25)))
    elif part == "animal":
        main = (0, H * .2, W * .82, H * .78)
        legc = _shade(c1, .7)
        for fx in (.08, .25, .55, .7):
            under.append(("rect", (W * fx, H * .6, W * fx + max(1, W * .08), H), legc))
        over.append(("ellipse", (W * .66, 0, W, H * .45), c1))
    elif part == "legs":
        main = (0, 0, W, H * .72)
        for fx in (.06, .86):
            under.append(("rect", (W * fx, H * .5, W * fx + max(1, W * .08), H), _shade(c1, .6)))
    elif part == "wheels":
        main = (0, 0, W, H * .8)
        r = min(H * .22, W * .14)
        for fx in (.22, .78):
            over.append(("ellipse", (W * fx - r, H - 2 * r, W * fx + r, H), dark))
    elif part == "trunk":
        main = (0, 0, W, H * .75)
        under.append(("rect", (W * .42, H * .5, W * .58, H), (95, 60, 30)))
    elif part in ("stick", "tail"):
        main = (0, 0, W, H * .62)
        if part == "stick":
            under.append(("rect", (W * .46, H * .3, W * .54 + .5, H), (60, 60, 60) if spec.name != "flower" else (40, 120, 40)))
        else:
            under.append(("line", (W * .5, H * .62, W * .3, H), (240, 240, 240)))
    elif part == "sail":
        main = (0, H * .62, W, H)
        under.append(("rect", (W * .48, 0, W * .52 + .5, H * .65), (70, 50, 30)))
        over.append(("triangle_r", (W * .53, H * .05, W * .95, H * .58), (245, 245, 240)))
    elif part == "handle":
        main = (0, 0, W * .78, H)
        under.append(("ring", (W * .6, H * .2, W, H * .7), c1))
    elif part == "screen":
        main = (W * .1, 0, W * .9, H * .7)
        over.append(("trapezoid", (0, H * .7, W, H), _shade(c1, .8)))
        over.append(("rect", (W * .18, H * .08, W * .82, H * .62), (40, 60, 110)))
    elif part == "headboard":
        main = (0, H * .35, W, H)
        under.append(("rect", (0, 0, W * .12, H), _shade(c1, .5)))
        over.append(("ellipse", (W * .14, H * .2, W * .4, H * .5), (245, 245, 245)))
    elif part == "spine":
        over.append(("rect", (0, 0, W * .15, H), _shade(c1, .55)))

    def paint(items):
        for shape, box, col in items:
            if shape == "line":
                dm.line([box[:2], box[2:]], fill=255, width=1)
                dt.line([box[:2], box[2:]], fill=col, width=1)
            elif shape == "ring":
                wd = max(1, int((box[2] - box[0]) * .25))
                dm.ellipse(box, outline=255, width=wd)
                dt.ellipse(box, outline=col, width=wd)
            elif shape == "triangle_r":
                poly = [(box[0], box[1]), (box[2], box[3]), (box[0], box[3])]
                dm.polygon(poly, fill=255)
                dt.polygon(poly, fill=col)
            else:
                _draw_shape(dm, shape, box, 255)
                _draw_shape(dt, shape, box, col)

    paint(under)
    body = Image.new("L", (w, h), 0)
    _draw_shape(ImageDraw.Draw(body), spec.shape, main, 255)
    tile.paste(Image.fromarray(_texture(spec.texture, w, h, c1, c2, rng)), (0, 0), body)
    mask.paste(255, (0, 0), body)
    paint(over)
    return tile, mask


def _background(scene: SceneSpec, S, rng):
    """Scene background as a PIL image plus the rows where water lies (for boats)."""
    bg = scene.background
    hz = int(S * np.clip(bg["horizon"] + rng.uniform(-.07, .07), .1, .8))
    top, bottom, ground = (_jitter(bg[k], rng, 20) for k in ("top", "bottom", "ground"))
    arr = np.empty((S, S, 3), np.float32)
    t = np.linspace(0, 1, max(hz, 1))[:, None]
    arr[:hz] = (np.asarray(top) * (1 - t) + np.asarray(bottom) * t)[:, None, :]
    arr[hz:] = ground
    tex = bg["texture"]
    ys, xs = np.mgrid[hz:S, 0:S]
    if tex == "wood":
        period = max(2, S // rng.integers(10, 18))
        arr[hz:] *= np.where((ys // period) % 2 == 0, 1.0, 0.85)[..., None]
    elif tex == "tiles":
        period = max(3, S // rng.integers(8, 14))
        arr[hz:] *= np.where(((xs // period) + (ys // period)) % 2 == 0, 1.0, 0.88)[..., None]
    amp = {"carpet": 10, "grass": 22, "sand": 14, "asphalt": 10, "water": 12}.get(tex, 6)
    arr[hz:] += _noise_field(rng, S, int(rng.integers(6, 20)), amp)[hz:, :, None]
    arr += _noise_field(rng, S, 4, 8)[..., None]
    img = Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))
    d = ImageDraw.Draw(img)
    water = None
    for f in bg["features"]:
        if f == "sea":
            y1 = hz + int(S * rng.uniform(.12, .22))
            d.rectangle([0, hz, S, y1], fill=_jitter((50, 110, 180), rng))
            for y in range(hz + 2, y1, max(2, S // 24)):
                d.line([(0, y), (S, y)], fill=_jitter((120, 170, 220), rng), width=1)
            water = (hz, y1)
        elif f == "hills":
            pts = [(0, hz)] + [(x, hz - rng.uniform(.03, .12) * S) for x in np.linspace(0, S, 6)] + [(S, hz)]
            d.polygon(pts, fill=_jitter((50, 95, 60), rng))
        elif f == "lake":
            y1 = int(hz + (S - hz) * rng.uniform(.55, .8))
            d.rectangle([0, hz, S, y1], fill=_jitter((70, 120, 160), rng))
            water = (hz, y1)
        elif f == "river":
            xa, xb = rng.uniform(.1, .5) * S, rng.uniform(.5, .9) * S
            wid = rng.uniform(.12, .25) * S
            d.polygon([(xa, hz), (xa + wid * .4, hz), (xb + wid, S), (xb - wid * .2, S)], fill=_jitter((60, 115, 175), rng))
            water = (hz, S)
        elif f == "mountains":
            for _ in range(int(rng.integers(2, 5))):
                cx, hw, ht = rng.uniform(0, S), rng.uniform(.15, .35) * S, rng.uniform(.15, .35) * S
                d.polygon([(cx - hw, hz), (cx, hz - ht), (cx + hw, hz)], fill=_jitter((115, 110, 120), rng))
                d.polygon([(cx - hw * .25, hz - ht * .75), (cx, hz - ht), (cx + hw * .25, hz - ht * .75)], fill=(245, 245, 250))
        elif f == "dunes":
            for k in range(3):
                y = hz + (k + .5) * (S - hz) / 3
                pts = [(x, y + math.sin(x / S * 6 + k) * S * .04) for x in np.linspace(0, S, 12)]
                d.line(pts, fill=_jitter((200, 160, 100), rng), width=max(1, S // 40))
        elif f == "trunks":
            for _ in range(int(rng.integers(6, 14))):
                x, wd = rng.uniform(0, S), rng.uniform(.02, .06) * S
                d.rectangle([x, 0, x + wd, S], fill=_jitter((70, 50, 30), rng, 15))
            for _ in range(int(rng.integers(4, 9))):
                x, y, r = rng.uniform(0, S), rng.uniform(0, hz + 5), rng.uniform(.08, .2) * S
                d.ellipse([x - r, y - r, x + r, y + r], fill=_jitter((40, 90, 40), rng, 15))
        elif f == "buildings":
            x = -rng.uniform(0, .1) * S
            while x < S:
                wd, ht = rng.uniform(.12, .3) * S, rng.uniform(.15, .35) * S
                col = _jitter((150, 130, 115), rng, 40)
                d.rectangle([x, hz - ht, x + wd, hz], fill=col)
                step = max(3, int(S / 25))
                for wy in range(int(hz - ht + 2), int(hz - 2), step):
                    for wx in range(int(x + 2), int(x + wd - 2), step):
                        d.rectangle([wx, wy, wx + 1, wy + 1], fill=(60, 70, 90))
                x += wd + rng.uniform(0, .05) * S
        elif f in ("road", "lanes"):
            spread = .5 if f == "road" else .9
            d.polygon([(S * (.5 - spread * .15), hz), (S * (.5 + spread * .15), hz), (S * (.5 + spread), S), (S * (.5 - spread), S)],
                      fill=_jitter((85, 85, 90), rng, 10))
            for lane in ((0.0,) if f == "road" else (-.33, .33)):
                for k in range(6):
                    t0, t1 = k / 6, k / 6 + .08
                    d.line([(S * (.5 + lane * spread * (0.3 + .7 * t0)), hz + (S - hz) * t0),
                            (S * (.5 + lane * spread * (0.3 + .7 * t1)), hz + (S - hz) * t1)], fill=(235, 235, 200), width=max(1, S // 64))
        elif f == "parking_lines":
            step = rng.uniform(.12, .2) * S
            for x in np.arange(rng.uniform(0, step), S, step):
                d.line([(x, hz + (S - hz) * .3), (x - S * .05, S)], fill=(235, 235, 235), width=max(1, S // 64))
        elif f == "runway":
            y0 = hz + (S - hz) * rng.uniform(.2, .4)
            y1 = y0 + (S - hz) * .3
            d.rectangle([0, y0, S, y1], fill=_jitter((80, 80, 85), rng, 8))
            for x in np.arange(0, S, S / 8):
                d.rectangle([x, (y0 + y1) / 2 - 1, x + S / 16, (y0 + y1) / 2], fill=(240, 240, 240))
        elif f == "pier":
            y = hz + (S - hz) * rng.uniform(.4, .7)
            d.rectangle([0, y, S * rng.uniform(.4, .9), y + S * .04], fill=_jitter((110, 80, 50), rng))
            water = (hz, S)
        elif f == "path":
            xa = rng.uniform(.2, .8) * S
            d.polygon([(xa - S * .02, hz), (xa + S * .02, hz), (S * rng.uniform(.5, 1.1), S), (S * rng.uniform(-.1, .4), S)],
                      fill=_jitter((200, 180, 140), rng))
        elif f == "diamond":
            cx, cy = S / 2, hz + (S - hz) * .55
            r = (S - hz) * .4
            d.polygon([(cx, cy - r), (cx + r * 1.5, cy), (cx, cy + r), (cx - r * 1.5, cy)], fill=_jitter((190, 150, 100), rng))
        elif f == "fence":
            y = hz + (S - hz) * rng.uniform(.05, .2)
            for dy in (0, S * .03):
                d.line([(0, y + dy), (S, y + dy)], fill=(110, 80, 50), width=1)
            for x in np.arange(0, S, S / 10):
                d.line([(x, y - S * .02), (x, y + S * .05)], fill=(110, 80, 50), width=1)
        elif f == "playframe":
            x0 = rng.uniform(0, .5) * S
            for k in range(4):
                col = COLORS[("red", "blue", "yellow", "green")[k]]
                d.line([(x0 + k * S * .08, hz - S * .2), (x0 + k * S * .08 + S * .05, hz + S * .1)], fill=col, width=max(1, S // 40))
            d.line([(x0, hz - S * .2), (x0 + S * .3, hz - S * .2)], fill=COLORS["red"], width=max(1, S // 40))
        elif f in ("window", "blinds", "frame", "board"):
            wd, ht = rng.uniform(.15, .35) * S, rng.uniform(.15, .3) * S
            x, y = rng.uniform(.05, .9) * S - wd / 2, rng.uniform(.05, max(.06, hz / S - .35)) * S
            if f == "board":
                wd, x = S * rng.uniform(.45, .7), S * rng.uniform(.05, .3)
                d.rectangle([x, y, x + wd, y + ht], fill=_jitter((40, 70, 50), rng, 10), outline=(120, 90, 60))
                for k in range(3):
                    yy = y + ht * (k + 1) / 4
                    d.line([(x + wd * .1, yy), (x + wd * rng.uniform(.3, .9), yy)], fill=(230, 230, 230))
            elif f == "frame":
                d.rectangle([x, y, x + wd * .6, y + ht * .7], fill=_jitter((150, 120, 90), rng, 60), outline=(60, 40, 20), width=max(1, S // 64))
            else:
                d.rectangle([x, y, x + wd, y + ht], fill=_jitter((170, 200, 230), rng, 15), outline=(245, 245, 245), width=max(1, S // 50))
                if f == "blinds":
                    for yy in np.arange(y, y + ht, max(2, S / 40)):
                        d.line([(x, yy), (x + wd, yy)], fill=(225, 225, 220))
                else:
                    d.line([(x + wd / 2, y), (x + wd / 2, y + ht)], fill=(245, 245, 245), width=max(1, S // 64))
        elif f == "counter":
            y0 = hz - S * rng.uniform(.12, .2)
            d.rectangle([0, y0, S, hz], fill=_jitter((140, 110, 80), rng, 25))
            d.rectangle([0, y0, S, y0 + max(1, S // 40)], fill=_jitter((200, 200, 200), rng))
        elif f == "tiles_wall":
            step = max(3, S // 16)
            for yy in range(0, int(hz * .6), step):
                d.line([(0, yy), (S, yy)], fill=(200, 200, 195))
        elif f == "ceiling_lamps":
            for _ in range(int(rng.integers(1, 4))):
                x, r = rng.uniform(.1, .9) * S, S * .04
                d.line([(x, 0), (x, S * .08)], fill=(40, 40, 40))
                d.pieslice([x - r * 1.5, S * .08, x + r * 1.5, S * .08 + 2 * r], 180, 360, fill=(250, 220, 120))
        elif f == "shelves":
            for yy in np.linspace(S * .08, hz - S * .04, 4):
                d.rectangle([0, yy, S, yy + max(1, S // 64)], fill=(150, 150, 150))
                x = 0.0
                while x < S:
                    wd = rng.uniform(.02, .05) * S
                    d.rectangle([x, yy - S * rng.uniform(.04, .09), x + wd, yy],
                                fill=tuple(int(v) for v in rng.integers(30, 240, 3)))
                    x += wd + rng.uniform(0, .02) * S
    return img, water, hz


# --------------------------------------------------------------------------- #
# One image
# --------------------------------------------------------------------------- #


def _sample_objects(scene: SceneSpec, rng, max_instances):
    """Instances (category names) from the scene prior and the pair rules."""
    present = {}
    for name, (p, extra) in scene.prior.items():
        if rng.random() < p:
            present[name] = 1 + int(rng.poisson(extra)) if extra else 1
    if not present:
        best = max(scene.prior, key=lambda n: scene.prior[n][0])
        present[best] = 1
    for a, b, p in PAIRS:
        if a in present and b not in present and rng.random() < p:
            present[b] = 1
    for a, b, p in AVOID:
        if a in present and b in present and rng.random() < p:
            del present[b]
    instances = [n for n in sorted(present, key=OBJECT_INDEX.get) for _ in range(present[n])]
    if len(instances) > max_instances:
        keep = rng.choice(len(instances), max_instances, replace=False)
        instances = [instances[i] for i in sorted(keep)]
    return instances


def _place(spec: ObjectSpec, S, hz, water, rng):
    """Box (x0, y0, w, h) of one instance and its size relative to the category (1 = typical)."""
    rel = float(np.exp(rng.normal(0, .3)))
    aspect = spec.aspect * rng.uniform(.85, 1.15)
    if spec.place == "sky" and hz > S * .2 and rng.random() < .8:
        h = spec.size * S * rel * rng.uniform(.5, 1.0)
        yc = rng.uniform(.05 * S, hz)
        y0 = yc - h / 2
    else:
        lo, hi = (water if spec.place == "water" and water else (hz, S))
        yb = rng.uniform(lo + .1 * (hi - lo), hi + .05 * S)
        depth = np.clip((yb - hz) / max(S - hz, 1), 0, 1)
        h = spec.size * S * rel * (.45 + .75 * depth)
        y0 = yb - h
    h = max(h, max(4.0, .045 * S))
    w = min(max(h * aspect, 3.0), .95 * S)
    x0 = rng.uniform(-.15 * w, S - .85 * w)
    return int(round(x0)), int(round(y0)), max(3, int(round(w))), max(3, int(round(h))), rel


def _paste(canvas, idmap, tile, mask, x0, y0, k):
    """Paste a tile and record which pixels object k now owns; returns its in-frame mask pixels."""
    canvas.paste(tile, (x0, y0), mask)
    S = canvas.size[0]
    m = np.asarray(mask) > 127
    h, w = m.shape
    ya, yb, xa, xb = max(0, y0), min(S, y0 + h), max(0, x0), min(S, x0 + w)
    if ya >= yb or xa >= xb:
        return None
    sub = m[ya - y0:yb - y0, xa - x0:xb - x0]
    idmap[ya:yb, xa:xb][sub] = k
    ys, xs = np.nonzero(sub)
    if len(ys) == 0:
        return None
    return (xa + xs.min(), ya + ys.min(), xa + xs.max() + 1, ya + ys.max() + 1, int(len(ys)))


def render_image(seed: int, image_id: int, size: int):
    """Draw image ``image_id``: returns (JPEG bytes, record with scene, objects and captions)."""
    rng = np.random.default_rng([seed, image_id])
    S = size
    scene_idx = int(rng.integers(len(SCENES)))
    scene = SCENES[scene_idx]
    canvas, water, hz = _background(scene, S, rng)
    instances = _sample_objects(scene, rng, max_instances=10 if S >= 96 else 8)
    central = rng.random() < CENTRAL_PROB
    central_name = None
    if central:
        big = [n for n in instances if OBJECTS[OBJECT_INDEX[n]].size >= .09]
        central_name = big[int(rng.integers(len(big)))] if big else instances[0]
        instances.remove(central_name)
        instances = instances[: int(rng.integers(0, 4))]  # a few small things around it

    placed = []
    for name in instances:
        spec = OBJECTS[OBJECT_INDEX[name]]
        x0, y0, w, h, rel = _place(spec, S, hz, water, rng)
        color = spec.colors[int(rng.integers(len(spec.colors)))]
        placed.append([name, color, rel, x0, y0, w, h])
    placed.sort(key=lambda p: p[4] + p[6])  # far (higher up) first, so nearer objects occlude them
    if central_name is not None:
        spec = OBJECTS[OBJECT_INDEX[central_name]]
        area = rng.uniform(*CENTRAL_AREA) * S * S
        asp = rng.uniform(*CENTRAL_ASPECT)
        w, h = int(round(math.sqrt(area * asp))), int(round(math.sqrt(area / asp)))
        color = spec.colors[int(rng.integers(len(spec.colors)))]
        placed.append([central_name, color, 1.6, (S - w) // 2, (S - h) // 2, w, h])

    idmap = np.full((S, S), -1, np.int16)
    n_clutter = int(rng.integers(2, 9))
    distractor_shapes = ("rect", "triangle", "ellipse", "diamond", "star", "trapezoid", "semicircle")
    textures = ("solid", "hstripes", "vstripes", "dots", "checker", "dstripes")

    def clutter(n):
        for _ in range(n):
            w, h = (int(v) for v in rng.uniform(.03, .16, 2) * S + 2)
            mask = Image.new("L", (w, h), 0)
            _draw_shape(ImageDraw.Draw(mask), distractor_shapes[int(rng.integers(len(distractor_shapes)))], (0, 0, w - 1, h - 1))
            c1 = tuple(int(v) for v in rng.integers(0, 256, 3))
            tile = Image.fromarray(_texture(textures[int(rng.integers(len(textures)))], w, h, c1, _shade(c1, .6), rng))
            _paste(canvas, idmap, tile, mask, int(rng.integers(-w // 2, S)), int(rng.integers(-h // 2, S)), -1)

    clutter(n_clutter // 2)
    extents = []
    for k, (name, color, rel, x0, y0, w, h) in enumerate(placed):
        tile, mask = _glyph(OBJECTS[OBJECT_INDEX[name]], w, h, color, rng)
        if central_name is not None and k == len(placed) - 1:
            clutter(n_clutter - n_clutter // 2)  # clutter stays behind the central object
        extents.append(_paste(canvas, idmap, tile, mask, x0, y0, k))
    if central_name is None:
        clutter(n_clutter - n_clutter // 2)

    objects = []
    for k, (name, color, rel, *_box) in enumerate(placed):
        ext = extents[k]
        if ext is None:
            continue
        visible = int((idmap == k).sum())
        if visible < 4 or visible < .15 * ext[4]:
            continue  # hidden behind others: nobody would annotate or mention it
        x0, y0, x1, y1, area = ext
        objects.append({"category": name, "color": color, "rel_size": float(rel),
                        "bbox": [int(x0), int(y0), int(x1 - x0), int(y1 - y0)], "area": area,
                        "visible": visible / (S * S),
                        "central": bool(central_name is not None and k == len(placed) - 1)})
    for o in objects:
        if o["central"] and not _is_central(o["bbox"], S):
            o["central"] = False

    img = canvas
    if rng.random() < .3:
        img = img.filter(ImageFilter.GaussianBlur(rng.uniform(.3, .9)))
    arr = np.asarray(img).astype(np.float32)
    arr = (arr - 128) * rng.uniform(.8, 1.15) + 128 + rng.uniform(-20, 20)
    arr += rng.standard_normal(arr.shape, dtype=np.float32) * np.float32(rng.uniform(2, 9))
    img = Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=int(rng.integers(45, 91)))
    captions = make_captions(scene, objects, rng)
    return buf.getvalue(), {"id": image_id, "scene": scene.name, "objects": objects, "captions": captions}


def _is_central(bbox, S):
    """The generators paper's §2.1 rule: centred, near-square, 40-60% of the pixels, in frame under rotation."""
    x, y, w, h = bbox
    cx, cy = x + w / 2, y + h / 2
    return (abs(cx - S / 2) <= .05 * S and abs(cy - S / 2) <= .05 * S
            and max(w, h) / max(min(w, h), 1) <= 1.25
            and .40 <= w * h / (S * S) <= .60
            and max(math.hypot(px - S / 2, py - S / 2) for px in (x, x + w) for py in (y, y + h)) <= S / 2)


# --------------------------------------------------------------------------- #
# Captions
# --------------------------------------------------------------------------- #
NUMBERS = {2: "two", 3: "three", 4: "four", 5: "five"}


def _noun_phrase(name, objs, rng, article=True):
    spec = OBJECTS[OBJECT_INDEX[name]]
    n = len(objs)
    noun = spec.name
    if spec.synonyms and rng.random() < .2:
        noun = spec.synonyms[int(rng.integers(len(spec.synonyms)))]
    adjs = []
    if rng.random() < .4 and len({o["color"] for o in objs}) == 1:
        adjs.append(objs[0]["color"])
    rel = float(np.mean([o["rel_size"] for o in objs]))
    if rng.random() < .5 and (rel > 1.35 or rel < .72):
        size_words = ("large", "big", "huge") if rel > 1.35 else ("small", "little", "tiny")
        adjs.insert(0, size_words[int(rng.integers(3))])
    if n == 1:
        phrase = " ".join(adjs + [noun])
        if not article:
            return phrase
        return ("an " if phrase[0] in "aeiou" else "a ") + phrase
    if noun == spec.name:
        noun = spec.plural
    elif noun in ("person",):
        noun = "people"
    elif noun.endswith("y") and noun not in ("boy",):
        noun = noun[:-1] + "ies"
    elif noun not in ("cattle",):
        noun = noun + "s"
    counted = NUMBERS.get(n) if rng.random() < .6 else None
    lead = counted or ("some", "several", "a group of", "many")[int(rng.integers(4))]
    if n == 2 and counted is None:
        lead = "a couple of"
    return " ".join([lead] + adjs + [noun])


MASS_SCENE_WORDS = {"sand", "water", "dunes", "mountains", "woods"}


def _scene_phrase(scene, rng):
    """(article, scene word) such as ("a", "living room") or ("the", "woods")."""
    word = scene.words[int(rng.integers(len(scene.words)))]
    if word in MASS_SCENE_WORDS or rng.random() < .25:
        return "the", word
    return ("an" if word[0] in "aeiou" else "a"), word


def make_captions(scene: SceneSpec, objects, rng, n=5):
    """Five COCO-like captions: they mention the salient objects, often not the small ones."""
    groups = {}
    for o in objects:
        groups.setdefault(o["category"], []).append(o)
    salience = {}
    for name, objs in groups.items():
        vis = max(o["visible"] for o in objs)
        s = .25 + 5 * vis + .1 * (len(objs) - 1)
        if any(o["central"] for o in objs):
            s = 5.0
        salience[name] = min(s, .97)
    out = []
    prep = ("in", "at", "near", "on", "inside") if scene.background["kind"] == "in" else ("in", "at", "on", "near", "by")
    for _ in range(n):
        chosen = [m for m in groups if rng.random() < salience[m]]
        chosen.sort(key=lambda m: -salience[m] + rng.uniform(-.3, .3))
        chosen = chosen[: int(rng.integers(1, 5))]
        article, sword = _scene_phrase(scene, rng)
        sp = f"{article} {sword}"
        pr = prep[int(rng.integers(len(prep)))]
        if not chosen:
            opts = [f"a view of {sp}", f"a picture of {sp} on a sunny day", f"an empty {sword}",
                    f"there is nothing much going on {pr} {sp}"]
            cap = opts[int(rng.integers(len(opts)))]
        else:
            nps = [_noun_phrase(m, groups[m], rng) for m in chosen]
            verbs = [OBJECTS[OBJECT_INDEX[m]].verbs for m in chosen]
            v0 = verbs[0][int(rng.integers(len(verbs[0])))] if verbs[0] else "sitting"
            listing = nps[0] if len(nps) == 1 else ", ".join(nps[:-1]) + " and " + nps[-1]
            t = int(rng.integers(8))
            if t == 4 and len(nps) == 1:
                t = int(rng.integers(3))
            if t == 0:
                cap = f"{nps[0]} {v0} {pr} {sp}"
                if len(nps) > 1:
                    cap += " with " + (nps[1] if len(nps) == 2 else ", ".join(nps[1:-1]) + " and " + nps[-1])
            elif t == 1:
                cap = f"{listing} {pr} {sp}"
            elif t == 2:
                cap = f"{sp} with {listing}"
            elif t == 3:
                cap = f"a photo of {listing}"
            elif t == 4 and len(nps) > 1:
                cap = f"{nps[0]} is {v0} next to {nps[1]}" + (f" {pr} {sp}" if rng.random() < .5 else "")
                if len(nps) > 2:
                    cap += " while " + " and ".join(nps[2:]) + " are nearby"
            elif t == 5:
                be = "are" if (len(nps) > 1 or len(groups[chosen[0]]) > 1) else "is"
                cap = f"there {be} {listing} {pr} this {sword}"
            elif t == 6:
                cap = f"{listing} on a {('sunny', 'cloudy', 'bright', 'nice')[int(rng.integers(4))]} day {pr} {sp}"
            else:
                cap = f"an image of {listing} {v0} {pr} {sp}" if v0 else f"an image of {listing}"
        cap = cap[0].upper() + cap[1:] + ("." if rng.random() < .8 else "")
        out.append(cap)
    return out


# --------------------------------------------------------------------------- #
# Writing the dataset
# --------------------------------------------------------------------------- #


def _file_name(split, image_id):
    return f"COCO_{split}2014_{image_id:012d}.jpg"


def _sun_dir(scene_name):
    return Path("SUN397") / scene_name[0] / scene_name


def _work(task):
    root, seed, image_id, split, size = task
    data, rec = render_image(seed, image_id, size)
    path = Path(root) / f"{split}2014" / _file_name(split, image_id)
    path.write_bytes(data)
    sun = Path(root) / _sun_dir(rec["scene"]) / f"sun_{image_id:08d}.jpg"
    if sun.exists():
        sun.unlink()
    try:
        os.link(path, sun)
    except OSError:
        shutil.copyfile(path, sun)
    rec["split"] = split
    return rec


def _write_json(path: Path, obj):
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(obj, separators=(",", ":")))
    os.replace(tmp, path)


def hierarchy_rows():
    """(fine category, set of coarse, set of general) for every scene, from SUN-like groupings."""
    return [(s.name, {GENERAL[g] for g in s.general}, set(s.general)) for s in SCENES]


def build_scenes(root, num_images: int = 3000, size: int = 128, seed: int = 0, workers: int = 2,
                 val_fraction: float = 0.4) -> Path:
    """Write the whole dataset under ``root`` (see module docstring); returns ``root`` as a Path.

    ``scenes.json`` is written last, so its presence means a complete build.
    """
    if not 16 <= size <= 1024:
        raise ValueError(f"build_scenes: size must be within 16..1024 pixels, got {size}")
    if num_images < 2:
        raise ValueError(f"build_scenes: num_images must be at least 2, got {num_images}")
    if not 0 < val_fraction < 1:
        raise ValueError(f"build_scenes: val_fraction must be in (0, 1), got {val_fraction}")
    root = Path(root)
    t0 = time.perf_counter()
    for sub in ("annotations", "train2014", "val2014"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    for s in SCENES:
        (root / _sun_dir(s.name)).mkdir(parents=True, exist_ok=True)
    (root / "scenes.json").unlink(missing_ok=True)
    for stale in (*root.glob("vocab_*.txt"), *root.glob("vocab_*.labels.npz")):
        stale.unlink()  # the datamodule's caches describe the previous build

    ids = np.arange(1, num_images + 1)
    n_val = max(1, min(num_images - 1, int(round(val_fraction * num_images))))
    val_ids = set(np.random.default_rng([seed, 0x5E]).permutation(ids)[:n_val].tolist())
    tasks = [(str(root), seed, int(i), "val" if i in val_ids else "train", size) for i in ids]
    if workers and workers > 1:
        ctx = multiprocessing.get_context("fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn")
        with ctx.Pool(workers) as pool:
            records = list(pool.imap(_work, tasks, chunksize=max(1, min(64, len(tasks) // (workers * 8) or 1))))
    else:
        records = [_work(t) for t in tasks]

    categories = [{"id": i + 1, "name": o.name, "supercategory": o.supercategory} for i, o in enumerate(OBJECTS)]
    info = {"description": "topdown embedded scenes (procedurally generated, COCO-2014 layout)",
            "version": "1.0", "year": 2014, "contributor": "topdown", "seed": seed}
    central = []
    for split in ("train", "val"):
        recs = [r for r in records if r["split"] == split]
        images = [{"id": r["id"], "file_name": _file_name(split, r["id"]), "width": size, "height": size,
                   "license": 0, "coco_url": "", "date_captured": ""} for r in recs]
        caps, anns = [], []
        for r in recs:
            for c, text in enumerate(r["captions"]):
                caps.append({"id": r["id"] * 10 + c, "image_id": r["id"], "caption": text})
            for k, o in enumerate(r["objects"]):
                x, y, w, h = o["bbox"]
                ann_id = r["id"] * 1000 + k  # unique without coordination between workers
                anns.append({"id": ann_id, "image_id": r["id"], "category_id": OBJECT_INDEX[o["category"]] + 1,
                             "bbox": [x, y, w, h], "area": o["area"], "iscrowd": 0,
                             "segmentation": [[x, y, x + w, y, x + w, y + h, x, y + h]]})
                if o["central"]:
                    central.append({"image_id": r["id"], "annotation_id": ann_id, "split": split,
                                    "category": o["category"], "file_name": f"{split}2014/" + _file_name(split, r["id"])})
        licenses = [{"id": 0, "name": "generated", "url": ""}]
        _write_json(root / "annotations" / f"captions_{split}2014.json",
                    {"info": info, "licenses": licenses, "images": images, "annotations": caps})
        _write_json(root / "annotations" / f"instances_{split}2014.json",
                    {"info": info, "licenses": licenses, "images": images, "annotations": anns, "categories": categories})

    (root / "SUN397" / "ClassName.txt").write_text("".join(f"/{s.name[0]}/{s.name}\n" for s in SCENES))
    general = list(GENERAL)
    lines = [",".join(["category", *COARSE, *general])]
    for name, coarse, gen in hierarchy_rows():
        lines.append(",".join([f"'/{name[0]}/{name}'", *("1" if c in coarse else "0" for c in COARSE),
                               *("1" if g in gen else "0" for g in general)]))
    (root / "SUN397" / "hierarchy.csv").write_text("\n".join(lines) + "\n")

    write_karpathy_split(root, seed)

    meta = {
        "seed": seed, "size": size, "num_images": num_images, "val_fraction": val_fraction,
        "counts": {"train": sum(r["split"] == "train" for r in records),
                   "val": sum(r["split"] == "val" for r in records),
                   "annotations": sum(len(r["objects"]) for r in records),
                   "central_objects": len(central),
                   "scenes": dict(Counter(r["scene"] for r in records)),
                   "objects": dict(Counter(o["category"] for r in records for o in r["objects"]))},
        "scene_categories": [s.name for s in SCENES],
        "object_categories": [o.name for o in OBJECTS],
        "hierarchy": {"coarse": {c: [g for g in general if GENERAL[g] == c] for c in COARSE},
                      "general": {g: [s.name for s in SCENES if g in s.general] for g in general}},
        "central_objects": central,
        "build_seconds": round(time.perf_counter() - t0, 2),
    }
    from datamodules.scenes_news import build_news_view

    build_news_view(root, seed)  # the GoodNews-layout news view (root/news), from the files above
    write_classification_view(root)  # the ILSVRC CLS-LOC view (root/ILSVRC), hard links to the images
    _write_json(root / "scenes.json", meta)
    return root


# The Karpathy split file of the captioning task (feedback-prop §4.4): ``dataset_coco.json``
# beside the instances files. Written from the caption files, with its own random stream, so
# adding it changed none of the other files.
KARPATHY_FILE = Path("annotations") / "dataset_coco.json"
_KARPATHY_STREAM = 0xCA97


def karpathy_tokens(raw: str) -> list[str]:
    """Lower-case alphanumeric words, the ``tokens`` field of Karpathy's split file."""
    return re.findall(r"[a-z0-9]+", raw.lower())


def write_karpathy_split(root, seed: int = 0, eval_fraction: float = 1 / 12) -> Path:
    """Write ``annotations/dataset_coco.json`` in the layout of Karpathy's COCO split file.

    train2014 images are ``train``; val2014 images are shuffled with ``(seed, stream)`` and give
    ``val`` and ``test`` (``eval_fraction`` of all images each, as 5,000 of COCO's 123,287 are
    about 1/25; here larger, so the small data still has a useful test split), the rest ``restval``.
    Reads the caption files already written, so it also completes a build made before it existed.
    """
    root = Path(root)
    per_split = {}
    for folder in ("train", "val"):
        data = json.loads((root / "annotations" / f"captions_{folder}2014.json").read_text())
        caps: dict[int, list] = {im["id"]: [] for im in data["images"]}
        for ann in data["annotations"]:
            caps[ann["image_id"]].append(ann)
        per_split[folder] = (sorted(data["images"], key=lambda im: im["id"]), caps)
    n_all = sum(len(images) for images, _ in per_split.values())
    val_images = per_split["val"][0]
    n_eval = min(max(1, int(round(n_all * eval_fraction))), len(val_images) // 2)
    order = np.random.default_rng([seed, _KARPATHY_STREAM]).permutation(len(val_images))
    split_of = {val_images[int(i)]["id"]: ("val" if r < n_eval else "test" if r < 2 * n_eval else "restval")
                for r, i in enumerate(order)}
    images = []
    for folder in ("train", "val"):
        for im in per_split[folder][0]:
            anns = sorted(per_split[folder][1][im["id"]], key=lambda a: a["id"])
            imgid = len(images)
            images.append({
                "filepath": f"{folder}2014", "filename": im["file_name"], "imgid": imgid,
                "split": "train" if folder == "train" else split_of[im["id"]],
                "sentids": [a["id"] for a in anns], "cocoid": im["id"],
                "sentences": [{"tokens": karpathy_tokens(a["caption"]), "raw": a["caption"], "imgid": imgid,
                               "sentid": a["id"]} for a in anns],
            })
    path = root / KARPATHY_FILE
    _write_json(path, {"images": images, "dataset": "coco"})
    return path


# --------------------------------------------------------------------------- #
# ILSVRC CLS-LOC classification view (generators paper §3.3, Table 1)
# --------------------------------------------------------------------------- #
# WordNet 3.0 noun synsets of the object categories: ILSVRC's wnid and its LOC_synset_mapping.txt names.
OBJECT_SYNSETS = {
    "woman": ("n10787470", "woman, adult female"), "child": ("n09917593", "child, kid, youngster"),
    "dog": ("n02084071", "dog, domestic dog, Canis familiaris"), "cat": ("n02121620", "cat, true cat"),
    "bird": ("n01503061", "bird"), "horse": ("n02374451", "horse, Equus caballus"), "cow": ("n02403454", "cow, moo-cow"),
    "sheep": ("n02411705", "sheep"), "car": ("n02958343", "car, auto, automobile, machine, motorcar"),
    "bus": ("n02924116", "bus, autobus, coach, motorbus, omnibus"), "truck": ("n04490091", "truck, motortruck"),
    "bicycle": ("n02834778", "bicycle, bike, wheel, cycle"), "boat": ("n02858304", "boat"),
    "airplane": ("n02691156", "airplane, aeroplane, plane"), "train": ("n04468005", "train, railroad train"),
    "tree": ("n13104059", "tree"), "flower": ("n11669921", "flower"), "bench": ("n02828884", "bench"),
    "chair": ("n03001627", "chair"), "table": ("n04379243", "table"), "bed": ("n02818832", "bed"),
    "couch": ("n04256520", "sofa, couch, lounge"), "lamp": ("n03636248", "lamp"),
    "laptop": ("n03642806", "laptop, laptop computer"), "book": ("n02870092", "book, volume"),
    "cup": ("n03147509", "cup"), "bottle": ("n02876657", "bottle"), "umbrella": ("n04507155", "umbrella"),
    "ball": ("n02778669", "ball"), "kite": ("n03621473", "kite"),
}
CLS_LOC_MARKER = "ILSVRC/scenes_cls_loc.json"  # written last: its presence means a complete view


def image_class(annotations: list[dict]) -> dict | None:
    """The annotation that names an image's class: the largest by ``area`` (ties: the lowest id); None if none.

    ILSVRC CLS-LOC labels each image by one object category and boxes the
    objects of that category; a scene holds several objects, and the one
    covering most pixels is the one a single label would name. It is read from
    the COCO annotation files, so an existing build gets the same view.
    """
    return max(annotations, key=lambda a: (a["area"], -a["id"])) if annotations else None


def _link_file(src: Path, dst: Path) -> None:
    """Hard-link ``dst`` to ``src`` (the same bytes, no re-encoding), or copy where links are not possible."""
    if dst.exists():
        dst.unlink()
    try:
        os.link(src, dst)
    except OSError:
        shutil.copyfile(src, dst)


def write_classification_view(root) -> dict:
    """Write the ILSVRC CLS-LOC classification layout of an existing build under ``root`` (additive).

    ::

        ILSVRC/Data/CLS-LOC/train/<wnid>/<wnid>_<image id>.JPEG    # from train2014/
        ILSVRC/Data/CLS-LOC/val/ILSVRC2012_val_<image id:08d>.JPEG   # from val2014/
        LOC_val_solution.csv       # ImageId,PredictionString ("<wnid> xmin ymin xmax ymax ..." of the class's boxes)
        LOC_synset_mapping.txt     # "<wnid> <names>" for every object category, sorted by wnid
        ILSVRC/scenes_cls_loc.json # rule, counts per split and class, images left out

    The class rule is :func:`image_class`. Image files are hard links to (or
    copies of) the COCO-layout files, and nothing else in ``root`` is written or
    read from a random stream, so every other file of a build stays byte-identical.
    Images without any annotation are left out and listed in the JSON file.
    """
    root = Path(root)
    data_dir = root / "ILSVRC" / "Data" / "CLS-LOC"
    (root / CLS_LOC_MARKER).unlink(missing_ok=True)
    shutil.rmtree(data_dir, ignore_errors=True)
    summary = {"rule": "largest annotation by area (ties: lowest annotation id)", "counts": {}, "classes": {},
               "left_out": {}}
    val_rows = []
    for split in ("train", "val"):
        inst = json.loads((root / "annotations" / f"instances_{split}2014.json").read_text())
        names = {c["id"]: c["name"] for c in inst["categories"]}
        by_image: dict[int, list[dict]] = {}
        for a in inst["annotations"]:
            by_image.setdefault(a["image_id"], []).append(a)
        per_class: Counter = Counter()
        left_out = []
        for img in sorted(inst["images"], key=lambda i: i["id"]):
            anns = by_image.get(img["id"], [])
            label = image_class(anns)
            if label is None:
                left_out.append(img["file_name"])
                continue
            wnid = OBJECT_SYNSETS[names[label["category_id"]]][0]
            src = root / f"{split}2014" / img["file_name"]
            if split == "train":
                dst = data_dir / "train" / wnid / f"{wnid}_{img['id']}.JPEG"
            else:
                stem = f"ILSVRC2012_val_{img['id']:08d}"
                dst = data_dir / "val" / f"{stem}.JPEG"
                boxes = [a["bbox"] for a in sorted(anns, key=lambda a: a["id"])
                         if a["category_id"] == label["category_id"]]
                val_rows.append((stem, " ".join(f"{wnid} {x} {y} {x + w} {y + h}" for x, y, w, h in boxes)))
            dst.parent.mkdir(parents=True, exist_ok=True)
            _link_file(src, dst)
            per_class[wnid] += 1
        summary["counts"][split] = sum(per_class.values())
        summary["classes"][split] = dict(sorted(per_class.items()))
        summary["left_out"][split] = left_out
    with open(root / "LOC_val_solution.csv", "w", newline="") as f:
        f.write("ImageId,PredictionString\n")
        f.writelines(f"{stem},{pred}\n" for stem, pred in sorted(val_rows))
    (root / "LOC_synset_mapping.txt").write_text(
        "".join(f"{wnid} {names}\n" for wnid, names in sorted(OBJECT_SYNSETS.values())))
    _write_json(root / CLS_LOC_MARKER, summary)
    return summary


def ensure_classification_view(root) -> Path:
    """Write the CLS-LOC view of the build at ``root`` unless it is complete; safe under concurrent DDP ranks."""
    root = Path(root)
    if not (root / "scenes.json").is_file():
        raise FileNotFoundError(f"no scenes build at {root} (scenes.json missing): build it first")
    with open(root / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            if not (root / CLS_LOC_MARKER).is_file():
                write_classification_view(root)
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
    return root


def ensure_scenes(root, **kw) -> Path:
    """Build ``root`` unless ``root/scenes.json`` exists; safe when several DDP ranks call it at once.

    A ``fcntl.flock`` on ``root/.lock`` makes the other ranks wait until the first
    has finished, after which they see ``scenes.json`` and return.
    """
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    with open(root / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            meta_path = root / "scenes.json"
            if not meta_path.exists():
                build_scenes(root, **kw)
            else:
                meta = json.loads(meta_path.read_text())
                if not (root / KARPATHY_FILE).is_file():  # a build from before the captioning view
                    write_karpathy_split(root, meta.get("seed", 0))
                asked = {k: kw[k] for k in ("num_images", "size", "seed") if k in kw}
                differ = {k: (meta.get(k), v) for k, v in asked.items() if meta.get(k) != v}
                if differ:
                    warnings.warn(f"{root} already holds a scenes build that differs from what was asked "
                                  f"({', '.join(f'{k}: built {a}, asked {b}' for k, (a, b) in differ.items())}); "
                                  f"using it as it is (delete {meta_path} to rebuild)", stacklevel=2)
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
    return root


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m datamodules.scenes", description=__doc__.split("\n")[0])
    p.add_argument("--root", required=True, help="output folder")
    p.add_argument("--num-images", type=int, default=3000)
    p.add_argument("--size", type=int, default=128, help="image side in pixels (64-256 are sensible)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--val-fraction", type=float, default=0.4)
    a = p.parse_args(argv)
    t0 = time.perf_counter()
    root = build_scenes(a.root, num_images=a.num_images, size=a.size, seed=a.seed, workers=a.workers,
                        val_fraction=a.val_fraction)
    meta = json.loads((root / "scenes.json").read_text())
    c = meta["counts"]
    print(f"scenes: {a.num_images} images at {a.size}px in {root} ({c['train']} train, {c['val']} val, "
          f"{c['annotations']} objects, {c['central_objects']} central) in {time.perf_counter() - t0:.1f}s")


if __name__ == "__main__":
    main()
