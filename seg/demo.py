"""Small generated datasets in the exact VOC and Cityscapes layouts, for the demos and the tests.

Deterministic for given parameters; generated once (a `.demo_complete` marker with the parameters and the
generator version is written last, atomically).
"""
import colorsys
import json
import shutil
from pathlib import Path

import numpy as np

from seg.data import VOC_PALETTE
from seg.files import save_image, write_label_png, write_text_atomic
from seg.prepare import _convert_cityscapes_label, _train_ids_path

_DEMO_VERSION = 3  # bump when the generators change, so old demo folders are not silently reused


def _demo_is_complete(root, parameters, generated_folders):
    """True when `root` holds a finished demo made with `parameters`.

    A demo made with other parameters (or an older generator) is removed first – only the folders the generator
    writes, and only when its marker proves it made them – so no stale image outlives a smaller rerun.
    """
    marker = Path(root) / ".demo_complete"
    if not marker.exists():
        return False
    if json.loads(marker.read_text()) == parameters:
        return True
    marker.unlink()
    for folder in generated_folders:
        shutil.rmtree(Path(root) / folder, ignore_errors=True)
    return False


def _write_demo_marker(root, parameters):
    write_text_atomic(json.dumps(parameters, sort_keys=True), Path(root) / ".demo_complete")


def _texture(rng, hw, colour, amplitude=30.0):
    """Float H×W×3 RGB: `colour` plus stripes of random period/angle and pixel noise, so regions are not flat."""
    height, width = hw
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    angle, period = rng.uniform(0, np.pi), rng.uniform(5, 20)
    stripes = np.sin(2 * np.pi * (xx * np.cos(angle) + yy * np.sin(angle)) / period)
    weights = rng.uniform(-1, 1, size=3) * amplitude
    noise = rng.normal(0, amplitude / 3, size=(height, width, 3))
    return np.asarray(colour, np.float32) + stripes[..., None] * weights + noise


def _shape_mask(kind, hw, centre_yx, radius, angle):
    """Bool H×W mask of a shape of circumradius `radius` px, rotated by `angle` radians."""
    yy, xx = np.mgrid[0:hw[0], 0:hw[1]].astype(np.float32)
    dy, dx = yy - centre_yx[0], xx - centre_yx[1]
    u, v = dx * np.cos(angle) + dy * np.sin(angle), -dx * np.sin(angle) + dy * np.cos(angle)
    if kind == "disc":
        return u * u + v * v <= radius * radius
    if kind == "square":
        return np.maximum(abs(u), abs(v)) <= 0.75 * radius
    if kind == "triangle":  # equilateral: inside the three edges, each at the inradius radius/2
        normals = (-np.pi / 2, np.pi / 6, 5 * np.pi / 6)
        return np.all([u * np.cos(a) + v * np.sin(a) <= radius / 2 for a in normals], axis=0)
    if kind == "cross":
        arm = radius / 3
        return ((abs(u) <= radius) & (abs(v) <= arm)) | ((abs(v) <= radius) & (abs(u) <= arm))
    raise ValueError(kind)


def _boundary_band(label):
    """Bool H×W: pixels with a differently labelled 8-neighbour (a band ~2 px wide along every class edge)."""
    height, width = label.shape
    padded = np.pad(label, 1, mode="edge")
    band = np.zeros(label.shape, bool)
    for dy in range(3):
        for dx in range(3):
            band |= padded[dy:dy + height, dx:dx + width] != label
    return band


_DEMO_VOC_SHAPES = {1: "disc", 2: "square", 3: "triangle", 4: "cross"}  # aeroplane, bicycle, bird, boat
_DEMO_VOC_FOLDERS = ("JPEGImages", "SegmentationClass", "SegmentationClassAug", "ImageSets")


def _saturated_colour(rng):
    """A random bright, saturated RGB colour: objects stand out from the greyish backgrounds."""
    return np.array(colorsys.hsv_to_rgb(rng.uniform(0, 1), rng.uniform(0.6, 1.0), rng.uniform(0.7, 1.0))) * 255


def _demo_voc_sample(rng, hw):
    """One generated VOC-like sample: (RGB uint8 H×W×3, label uint8 H×W in 0..4, no ignore band).

    Backgrounds are greyish stripes, objects saturated colours: telling object from background is local,
    telling the classes apart needs the shape.
    """
    background = rng.uniform(40, 200) + rng.uniform(-25, 25, size=3)
    image = _texture(rng, hw, background, amplitude=20.0)
    label = np.zeros(hw, np.uint8)
    short_side = min(hw)
    for _ in range(rng.integers(1, 4)):
        class_id = int(rng.integers(1, len(_DEMO_VOC_SHAPES) + 1))
        radius = rng.uniform(0.22, 0.38) * short_side
        centre = [rng.uniform(0.5 * radius, side - 0.5 * radius) for side in hw]
        mask = _shape_mask(_DEMO_VOC_SHAPES[class_id], hw, centre, radius, rng.uniform(0, 2 * np.pi))
        image[mask] = _texture(rng, hw, _saturated_colour(rng), amplitude=12.0)[mask]
        label[mask] = class_id
    return np.clip(image, 0, 255).astype(np.uint8), label


def make_demo_voc(root, n_train=320, n_val=40, size=(96, 128), seed=0):
    """Generate a small deterministic dataset in the VOC12aug layout; returns `root`.

    Classes 1..4 (aeroplane, bicycle, bird, boat) are a disc, square, triangle and cross, 1-3 per image, in random
    saturated colours on greyish striped backgrounds, so only the shape tells the class. Of the `n_train` training images,
    n_train // 2 are in train.txt (SegmentationClass, palette PNGs with a 255 band along edges, like VOC) and the rest
    in aug.txt (SegmentationClassAug, grayscale, no band, like SBD); trainaug.txt lists all of them and
    SegmentationClassAug also holds the train images (SBD overlaps VOC train). val.txt: `n_val` images in
    SegmentationClass. Generated once: a `.demo_complete` marker with the parameters is written last; other
    parameters regenerate the folder.
    """
    root = Path(root)
    parameters = {"kind": "voc", "n_train": n_train, "n_val": n_val, "size": list(size), "seed": seed,
                  "version": _DEMO_VERSION}
    if _demo_is_complete(root, parameters, _DEMO_VOC_FOLDERS):
        return root
    names = [f"2007_{index:06d}" for index in range(1, n_train + n_val + 1)]
    n_voc_train = n_train // 2
    splits = {"train": names[:n_voc_train], "val": names[n_train:], "aug": names[n_voc_train:n_train],
              "trainaug": names[:n_train]}
    for index, name in enumerate(names):
        image, label = _demo_voc_sample(np.random.default_rng([seed, index]), tuple(size))
        save_image(root / "JPEGImages" / f"{name}.jpg", image, "JPEG")
        if name not in splits["aug"]:
            voc_label = np.where(_boundary_band(label), 255, label).astype(np.uint8)
            write_label_png(root / "SegmentationClass" / f"{name}.png", voc_label, VOC_PALETTE)
        if name not in splits["val"]:
            write_label_png(root / "SegmentationClassAug" / f"{name}.png", label)
    for split, stems in splits.items():
        write_text_atomic("".join(f"{s}\n" for s in stems), root / "ImageSets" / "Segmentation" / f"{split}.txt")
    _write_demo_marker(root, parameters)
    return root


# Official Cityscapes label ids used by the demo, and their base colours (RGB) before per-image jitter.
_DEMO_CITY_COLOURS = {7: (110, 100, 110), 8: (170, 150, 160), 11: (120, 90, 70), 21: (70, 120, 40),
                      23: (120, 170, 230), 4: (150, 140, 60), 1: (30, 30, 30), 0: (0, 0, 0)}


def _street_label_ids(rng, hw):
    """Label ids H×W of a street scene: sky, buildings/trees, road + sidewalks; returns (ids, horizon row)."""
    height, width = hw
    ids = np.full(hw, 23, np.uint8)
    horizon = int(rng.uniform(0.4, 0.55) * height)
    column = 0
    while column < width:  # a row of buildings and trees of random widths and heights
        block_width = int(rng.uniform(0.08, 0.25) * width)
        top = max(0, horizon - int(rng.uniform(0.15, 0.4) * height))
        ids[top:horizon, column:column + block_width] = 21 if rng.random() < 0.3 else 11
        column += block_width
    yy, xx = np.mgrid[0:height, 0:width]
    depth = np.clip((yy - horizon) / max(1, height - horizon), 0, 1)  # 0 at the horizon, 1 at the bottom
    vanishing_x = rng.uniform(0.4, 0.6) * width
    below = yy >= horizon
    ids[below] = 8
    ids[below & (abs(xx - vanishing_x) <= (0.04 + 0.42 * depth) * width)] = 7
    return ids, horizon


def _demo_cityscapes_sample(rng, hw):
    """One generated street scene: (RGB uint8 H×W×3, official label ids uint8 H×W)."""
    ids, horizon = _street_label_ids(rng, hw)
    height, width = hw
    image = np.zeros((height, width, 3), np.float32)
    for label_id in np.unique(ids):
        colour = np.asarray(_DEMO_CITY_COLOURS[int(label_id)]) + rng.uniform(-25, 25, size=3)
        image[ids == label_id] = _texture(rng, hw, colour, amplitude=15)[ids == label_id]
    yy, xx = np.mgrid[0:height, 0:width]
    objects = [(26, 1.8)] * int(rng.integers(1, 4)) + [(24, 0.35)] * int(rng.integers(0, 3)) + [(4, 0.8)]
    for label_id, aspect in objects:  # cars on the road, people and a static box on the pavement
        bottom = int(rng.uniform(horizon + 0.15 * (height - horizon), height - 4))
        depth = (bottom - horizon) / max(1, height - horizon)
        object_height = max(4, (0.1 + 0.35 * depth) * height * (1.3 if label_id == 24 else 0.7))
        centre_x = rng.uniform(0.1, 0.9) * width
        if label_id == 26:  # a body box plus a narrower cabin on top
            mask = ((abs(xx - centre_x) <= aspect * object_height / 2) & (yy <= bottom)
                    & (yy >= bottom - 0.6 * object_height))
            mask |= ((abs(xx - centre_x) <= 0.55 * object_height) & (yy <= bottom)
                     & (yy >= bottom - object_height))
            colour = rng.uniform(0, 255, size=3)
        else:  # an upright ellipse or box
            half_h, half_w = object_height / 2, aspect * object_height / 2
            cy = bottom - half_h
            mask = (((yy - cy) / half_h) ** 2 + ((xx - centre_x) / half_w) ** 2 <= 1) if label_id == 24 else \
                (abs(yy - cy) <= half_h) & (abs(xx - centre_x) <= half_w)
            colour = rng.uniform(0, 120, size=3) if label_id == 24 else _DEMO_CITY_COLOURS[4]
        ids[mask] = label_id
        image[mask] = _texture(rng, hw, colour, amplitude=20)[mask]
    ids[-max(2, height // 20):] = 1  # ego vehicle bonnet and
    ids[:, :2], ids[:, -2:] = 0, 0  # an unlabelled border: ids that map to ignore (255)
    for label_id in (1, 0):
        image[ids == label_id] = _DEMO_CITY_COLOURS[label_id]
    return np.clip(image, 0, 255).astype(np.uint8), ids


def make_demo_cityscapes(root, n_train=32, n_val=8, size=(128, 256), seed=0):
    """Generate a small deterministic dataset in the Cityscapes layout, trainIds included; returns `root`.

    Street scenes with official label ids road 7, sidewalk 8, building 11, vegetation 21, sky 23, person 24, car 26
    and the ignored ids 0 (border), 1 (ego vehicle), 4 (static box). Train images are split over the cities aachen
    and bremen, val images are in frankfurt. Generated once (marker `.demo_complete`, written last); other
    parameters regenerate the folder.
    """
    root = Path(root)
    parameters = {"kind": "cityscapes", "n_train": n_train, "n_val": n_val, "size": list(size), "seed": seed,
                  "version": _DEMO_VERSION}
    if _demo_is_complete(root, parameters, ("leftImg8bit", "gtFine")):
        return root
    cities = {"train": ("aachen", "bremen"), "val": ("frankfurt",)}
    index = 0
    for split, count in (("train", n_train), ("val", n_val)):
        for number in range(count):
            city = cities[split][number % len(cities[split])]
            stem = f"{city}_000000_{number // len(cities[split]):06d}"
            image, ids = _demo_cityscapes_sample(np.random.default_rng([seed, index]), tuple(size))
            index += 1
            save_image(root / "leftImg8bit" / split / city / f"{stem}_leftImg8bit.png", image, "PNG")
            label_ids = root / "gtFine" / split / city / f"{stem}_gtFine_labelIds.png"
            write_label_png(label_ids, ids)
            _convert_cityscapes_label((label_ids, _train_ids_path(label_ids)))
    _write_demo_marker(root, parameters)
    return root
