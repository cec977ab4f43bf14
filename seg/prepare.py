"""Dataset preparation: VOC12aug labels from SBD, Cityscapes trainIds, and small generated demo datasets.

Everything written here goes to a temporary file in the target folder first and is renamed into place, so an
interrupted run never leaves a half-written label or split file; a rerun skips what is already finished.
On-disk layouts (see spec pspnet.md §4, pointrend.md §4):

    data/VOCdevkit/VOC2012/{JPEGImages, SegmentationClass, SegmentationClassAug, ImageSets/Segmentation/*.txt}
    data/VOCdevkit/VOCaug/dataset/{cls/*.mat, train.txt, val.txt}     # SBD benchmark_RELEASE/dataset
    cityscapes/{leftImg8bit, gtFine}/{train,val,test}/<city>/<city>_<seq>_<frame>_{leftImg8bit,gtFine_*}.png
"""
import concurrent.futures
import contextlib
import json
import os
from pathlib import Path

import numpy as np
from PIL import Image

from seg.errors import UserError

VOC_CLASSES = (
    "background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor")
VOC_PALETTE = (
    (0, 0, 0), (128, 0, 0), (0, 128, 0), (128, 128, 0), (0, 0, 128), (128, 0, 128), (0, 128, 128),
    (128, 128, 128), (64, 0, 0), (192, 0, 0), (64, 128, 0), (192, 128, 0), (64, 0, 128), (192, 0, 128),
    (64, 128, 128), (192, 128, 128), (0, 64, 0), (128, 64, 0), (0, 192, 0), (128, 192, 0), (0, 64, 128))
CITYSCAPES_CLASSES = (
    "road", "sidewalk", "building", "wall", "fence", "pole", "traffic light", "traffic sign", "vegetation",
    "terrain", "sky", "person", "rider", "car", "truck", "bus", "train", "motorcycle", "bicycle")
CITYSCAPES_PALETTE = (
    (128, 64, 128), (244, 35, 232), (70, 70, 70), (102, 102, 156), (190, 153, 153), (153, 153, 153),
    (250, 170, 30), (220, 220, 0), (107, 142, 35), (152, 251, 152), (70, 130, 180), (220, 20, 60),
    (255, 0, 0), (0, 0, 142), (0, 0, 70), (0, 60, 100), (0, 80, 100), (0, 0, 230), (119, 11, 32))
# cityscapesScripts helpers/labels.py: label id -> train id for the 19 evaluated classes; all else is ignored.
_CITYSCAPES_TRAIN_ID_OF = {7: 0, 8: 1, 11: 2, 12: 3, 13: 4, 17: 5, 19: 6, 20: 7, 21: 8, 22: 9, 23: 10,
                           24: 11, 25: 12, 26: 13, 27: 14, 28: 15, 31: 16, 32: 17, 33: 18}
CITYSCAPES_ID_TO_TRAINID = np.full(256, 255, dtype=np.uint8)
CITYSCAPES_ID_TO_TRAINID[list(_CITYSCAPES_TRAIN_ID_OF)] = list(_CITYSCAPES_TRAIN_ID_OF.values())

_VOC_HINT = ("Download VOCtrainval_11-May-2012.tar (PASCAL VOC 2012) and extract it so that its VOC2012 folder "
             "(with JPEGImages, SegmentationClass, ImageSets) is data/VOCdevkit/VOC2012.")
_SBD_HINT = ("Download SBD's benchmark.tgz and move its benchmark_RELEASE/dataset folder (with cls/*.mat, "
             "train.txt, val.txt) to data/VOCdevkit/VOCaug/dataset.")
_CITYSCAPES_HINT = ("Download gtFine_trainvaltest.zip and leftImg8bit_trainvaltest.zip from cityscapes-dataset.com "
                    "and unzip both into one folder, giving <root>/gtFine/{train,val,test}/<city>/ and "
                    "<root>/leftImg8bit/{train,val,test}/<city>/.")
_VOC_FULL = {"voc_train": 1464, "voc_val": 1449, "trainaug": 10582, "aug": 9118}
_CITYSCAPES_FULL = {"train": 2975, "val": 500}
_IGNORE_COLOUR = (224, 224, 192)  # colour of index 255 in the official VOC PNGs
_DEMO_VERSION = 2  # bump when the generators change, so old demo folders are not silently reused


# ----------------------------------------------------------------------------------------------- file helpers

def _atomic_save(path, save):
    """Call `save(binary_file)` on a temporary file beside `path`, then rename it to `path` in one step."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(temporary, "wb") as file:
            save(file)
        os.replace(temporary, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temporary)


def _write_text(path, text):
    _atomic_save(path, lambda file: file.write(text.encode()))


def write_label_png(path, label, palette=None):
    """Write a label map (uint8 H×W class ids, 255 = ignore) as a PNG, atomically.

    With `palette` (RGB triples, index = class id) the PNG is mode "P" – its pixel values are still the class ids,
    it just shows in colour like the VOC SegmentationClass files, with 255 drawn in VOC's cream; without, mode "L".
    """
    label = np.asarray(label)
    if label.ndim != 2 or label.dtype != np.uint8:
        raise ValueError(f"label must be a uint8 H×W array, got {label.dtype} {label.shape}")
    image = Image.fromarray(label)
    if palette is not None:
        colours = [tuple(c) for c in palette][:256]
        colours += [(0, 0, 0)] * (256 - len(colours))
        if len(palette) < 256:
            colours[255] = _IGNORE_COLOUR
        image.putpalette([value for colour in colours for value in colour])
    _atomic_save(path, lambda file: image.save(file, format="PNG"))


def _save_image(path, image_rgb, image_format):
    """Write an RGB uint8 H×W×3 image atomically; JPEG at quality 90 like typical photo datasets."""
    options = {"quality": 90} if image_format == "JPEG" else {}
    image = Image.fromarray(np.ascontiguousarray(image_rgb))
    _atomic_save(path, lambda file: image.save(file, format=image_format, **options))


def read_split(path):
    """Read a split file: one image stem per line, blank lines dropped. Missing file -> UserError."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"split file {path} not found")
    return [line.strip() for line in path.read_text().splitlines() if line.strip()]


def _require(path, hint):
    if not Path(path).exists():
        raise UserError(f"{path} not found. {hint}")


def _run_parallel(function, jobs, workers):
    """Apply `function` to every job, in `workers` processes when it is worth it; returns nothing."""
    if workers <= 1 or len(jobs) < 2 * workers:
        for job in jobs:
            function(job)
        return
    with concurrent.futures.ProcessPoolExecutor(workers) as pool:
        for _ in pool.map(function, jobs, chunksize=max(1, len(jobs) // (8 * workers))):
            pass


def _name_list(names, limit=10):
    shown = ", ".join(str(name) for name in names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


# ---------------------------------------------------------------------------------------------------- VOC aug

def _loadmat():
    try:
        from scipy.io import loadmat
    except ImportError:
        raise UserError("reading SBD's .mat files needs scipy: pip install scipy") from None
    return loadmat


def _convert_sbd_mat(job):
    """(mat_path, png_path): write GTcls.Segmentation (H×W class ids 0..20) as a grayscale PNG."""
    mat_path, png_path = job
    # squeeze_me + struct_as_record=False turns SBD's 1×1 struct GTcls into an object with attributes.
    content = _loadmat()(mat_path, squeeze_me=True, struct_as_record=False)
    segmentation = getattr(content.get("GTcls"), "Segmentation", None)
    if segmentation is None or np.ndim(segmentation) != 2:
        raise UserError(f"{mat_path} has no 2-D GTcls.Segmentation; is it an SBD cls/*.mat file?")
    segmentation = np.asarray(segmentation)
    if segmentation.min() < 0 or segmentation.max() > 255:
        raise UserError(f"{mat_path}: GTcls.Segmentation has values outside 0..255")
    write_label_png(png_path, segmentation.astype(np.uint8))


def _voc_aug_splits(voc_train, voc_val, sbd_all):
    """The two lists mmseg's voc_aug.py builds (spec §4.2), sorted so reruns give identical files."""
    voc_train, voc_val, sbd_all = set(voc_train), set(voc_val), set(sbd_all)
    return sorted(sbd_all - (voc_train | voc_val)), sorted((voc_train | sbd_all) - voc_val)


def prepare_voc_aug(voc_root, sbd_root, log=print, workers=4):
    """Build VOC12aug: SegmentationClassAug/*.png from SBD cls/*.mat, and ImageSets/Segmentation/{aug,trainaug}.txt.

    Finished PNGs are skipped. With the full VOC splits (1464 train / 1449 val) the result must have 10582
    trainaug and 9118 aug entries, otherwise UserError. Returns the counts as a dict.
    """
    voc_root, sbd_root = Path(voc_root), Path(sbd_root)
    split_folder = voc_root / "ImageSets" / "Segmentation"
    for path in (voc_root, split_folder / "train.txt", split_folder / "val.txt"):
        _require(path, _VOC_HINT)
    for path in (sbd_root, sbd_root / "cls", sbd_root / "train.txt", sbd_root / "val.txt"):
        _require(path, _SBD_HINT)
    mats = sorted((sbd_root / "cls").glob("*.mat"))
    if not mats:
        raise UserError(f"no .mat files in {sbd_root / 'cls'}. {_SBD_HINT}")
    _loadmat()  # fail here, once, if scipy is missing
    out_folder = voc_root / "SegmentationClassAug"
    jobs = [(mat, out_folder / f"{mat.stem}.png") for mat in mats if not (out_folder / f"{mat.stem}.png").exists()]
    log(f"SBD: {len(mats)} masks, {len(mats) - len(jobs)} already converted, converting {len(jobs)}")
    _run_parallel(_convert_sbd_mat, jobs, workers)

    voc_train, voc_val = read_split(split_folder / "train.txt"), read_split(split_folder / "val.txt")
    sbd_all = read_split(sbd_root / "train.txt") + read_split(sbd_root / "val.txt")
    aug, trainaug = _voc_aug_splits(voc_train, voc_val, sbd_all)
    counts = {"converted": len(jobs), "skipped": len(mats) - len(jobs), "voc_train": len(set(voc_train)),
              "voc_val": len(set(voc_val)), "aug": len(aug), "trainaug": len(trainaug)}
    unlabelled = [stem for stem in aug if not (out_folder / f"{stem}.png").exists()]
    if unlabelled:
        raise UserError(f"{len(unlabelled)} SBD train/val images have no mask in {sbd_root / 'cls'}: "
                        f"{_name_list(unlabelled)}. Is the SBD download complete? {_SBD_HINT}")
    if counts["voc_train"] == _VOC_FULL["voc_train"] and counts["voc_val"] == _VOC_FULL["voc_val"]:
        if counts["aug"] != _VOC_FULL["aug"] or counts["trainaug"] != _VOC_FULL["trainaug"]:
            raise UserError(f"VOC12aug from {sbd_root}: expected 9118 aug and 10582 trainaug images, got "
                            f"{counts['aug']} and {counts['trainaug']}; check SBD's train.txt and val.txt")
    else:
        log(f"note: not the full VOC 2012 splits ({_VOC_FULL['voc_train']} train / {_VOC_FULL['voc_val']} val), "
            "so the 9118 / 10582 check is skipped")
    _write_text(split_folder / "aug.txt", "".join(f"{stem}\n" for stem in aug))
    _write_text(split_folder / "trainaug.txt", "".join(f"{stem}\n" for stem in trainaug))
    log(f"VOC12aug: {counts['aug']} aug + {counts['voc_train']} train images; trainaug.txt {counts['trainaug']}")
    return counts


# ------------------------------------------------------------------------------------------------- Cityscapes

def _convert_cityscapes_label(job):
    """(labelIds_png, labelTrainIds_png): map official label ids to train ids (255 = ignore)."""
    source, target = job
    label_ids = np.asarray(Image.open(source))
    if label_ids.ndim != 2 or label_ids.dtype != np.uint8:
        raise UserError(f"{source} is not an 8-bit single-channel label image")
    write_label_png(target, CITYSCAPES_ID_TO_TRAINID[label_ids])


def _train_ids_path(label_ids_path):
    return Path(str(label_ids_path).replace("_gtFine_labelIds.png", "_gtFine_labelTrainIds.png"))


def _is_finished(source, target):
    return target.exists() and target.stat().st_mtime_ns >= source.stat().st_mtime_ns


def _check_cityscapes_images(root, split):
    """Number of split images; UserError listing the images that have no *_gtFine_labelIds.png."""
    images = sorted((root / "leftImg8bit" / split).glob("*/*_leftImg8bit.png"))
    missing = []
    for image in images:
        label_name = image.name.replace("_leftImg8bit.png", "_gtFine_labelIds.png")
        label = root / "gtFine" / split / image.parent.name / label_name
        if not label.exists():
            missing.append(label)
    if missing:
        raise UserError(f"{len(missing)} of {len(images)} {split} images have no labelIds file: "
                        f"{_name_list(missing)}. {_CITYSCAPES_HINT}")
    return len(images)


def prepare_cityscapes(root, workers=4, log=print):
    """Write gtFine/*/<city>/*_gtFine_labelTrainIds.png from the *_gtFine_labelIds.png beside it, in parallel.

    Same classes as cityscapesScripts' createTrainIdLabelImgs.py (spec pointrend.md §6.6). A target that exists and
    is newer than its source is skipped. Every train/val image must have a labelIds file (else UserError).
    Returns {"train": images, "val": images, "converted": n, "skipped": n}.
    """
    root = Path(root)
    for path in (root, root / "gtFine", root / "leftImg8bit"):
        _require(path, _CITYSCAPES_HINT)
    counts = {split: _check_cityscapes_images(root, split) for split in ("train", "val")}
    if counts["train"] + counts["val"] == 0:
        raise UserError(f"no images under {root / 'leftImg8bit'}/{{train,val}}/<city>/. {_CITYSCAPES_HINT}")
    sources = sorted(p for split in ("train", "val", "test")
                     for p in (root / "gtFine" / split).glob("*/*_gtFine_labelIds.png"))
    jobs = [(s, _train_ids_path(s)) for s in sources if not _is_finished(s, _train_ids_path(s))]
    log(f"Cityscapes: {len(sources)} labelIds files, {len(sources) - len(jobs)} already converted, "
        f"converting {len(jobs)} with {workers} workers")
    _run_parallel(_convert_cityscapes_label, jobs, workers)
    counts.update(converted=len(jobs), skipped=len(sources) - len(jobs))
    if (counts["train"], counts["val"]) != (_CITYSCAPES_FULL["train"], _CITYSCAPES_FULL["val"]):
        log(f"note: full Cityscapes has {_CITYSCAPES_FULL['train']} train / {_CITYSCAPES_FULL['val']} val images")
    log(f"Cityscapes: {counts['train']} train and {counts['val']} val images with labels")
    return counts


# -------------------------------------------------------------------------------------------- demo generators

def _demo_marker_matches(root, parameters):
    """True when `root` already holds a finished demo made with `parameters`; UserError if made with others."""
    marker = Path(root) / ".demo_complete"
    if not marker.exists():
        return False
    found = json.loads(marker.read_text())
    if found != parameters:
        raise UserError(f"{root} holds demo data made with {found}, not {parameters}; delete that folder or "
                        "choose another one")
    return True


def _write_demo_marker(root, parameters):
    _write_text(Path(root) / ".demo_complete", json.dumps(parameters, sort_keys=True))


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


def _distinct_colour(rng, avoid, min_distance=120):
    """Random RGB at least `min_distance` (L1) from `avoid`, so shapes stay visible on their background."""
    for _ in range(20):
        colour = rng.uniform(0, 255, size=3)
        if np.abs(colour - avoid).sum() >= min_distance:
            break
    return colour


_DEMO_VOC_SHAPES = {1: "disc", 2: "square", 3: "triangle", 4: "cross"}  # aeroplane, bicycle, bird, boat


def _demo_voc_sample(rng, hw):
    """One generated VOC-like sample: (RGB uint8 H×W×3, label uint8 H×W in 0..4, no ignore band)."""
    background = rng.uniform(0, 255, size=3)
    image = _texture(rng, hw, background, amplitude=20.0)
    label = np.zeros(hw, np.uint8)
    short_side = min(hw)
    for _ in range(rng.integers(1, 4)):
        class_id = int(rng.integers(1, len(_DEMO_VOC_SHAPES) + 1))
        radius = rng.uniform(0.22, 0.38) * short_side
        centre = [rng.uniform(0.5 * radius, side - 0.5 * radius) for side in hw]
        mask = _shape_mask(_DEMO_VOC_SHAPES[class_id], hw, centre, radius, rng.uniform(0, 2 * np.pi))
        image[mask] = _texture(rng, hw, _distinct_colour(rng, background), amplitude=20.0)[mask]
        label[mask] = class_id
    return np.clip(image, 0, 255).astype(np.uint8), label


def make_demo_voc(root, n_train=320, n_val=40, size=(96, 128), seed=0):
    """Generate a small deterministic dataset in the VOC12aug layout; returns `root`.

    Classes 1..4 (aeroplane, bicycle, bird, boat) are a disc, square, triangle and cross with random colour and
    texture on a random textured background, so only the shape tells the class. Of the `n_train` training images,
    n_train // 2 are in train.txt (SegmentationClass, palette PNGs with a 255 band along edges, like VOC) and the rest
    in aug.txt (SegmentationClassAug, grayscale, no band, like SBD); trainaug.txt lists all of them and
    SegmentationClassAug also holds the train images (SBD overlaps VOC train). val.txt: `n_val` images in
    SegmentationClass. Generated once: a `.demo_complete` marker with the parameters is written last.
    """
    root = Path(root)
    parameters = {"kind": "voc", "n_train": n_train, "n_val": n_val, "size": list(size), "seed": seed,
                  "version": _DEMO_VERSION}
    if _demo_marker_matches(root, parameters):
        return root
    names = [f"2007_{index:06d}" for index in range(1, n_train + n_val + 1)]
    n_voc_train = n_train // 2
    splits = {"train": names[:n_voc_train], "val": names[n_train:], "aug": names[n_voc_train:n_train],
              "trainaug": names[:n_train]}
    for index, name in enumerate(names):
        image, label = _demo_voc_sample(np.random.default_rng([seed, index]), tuple(size))
        _save_image(root / "JPEGImages" / f"{name}.jpg", image, "JPEG")
        if name not in splits["aug"]:
            voc_label = np.where(_boundary_band(label), 255, label).astype(np.uint8)
            write_label_png(root / "SegmentationClass" / f"{name}.png", voc_label, VOC_PALETTE)
        if name not in splits["val"]:
            write_label_png(root / "SegmentationClassAug" / f"{name}.png", label)
    for split, stems in splits.items():
        _write_text(root / "ImageSets" / "Segmentation" / f"{split}.txt", "".join(f"{s}\n" for s in stems))
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
    and bremen, val images are in frankfurt. Generated once (marker `.demo_complete`, written last).
    """
    root = Path(root)
    parameters = {"kind": "cityscapes", "n_train": n_train, "n_val": n_val, "size": list(size), "seed": seed,
                  "version": _DEMO_VERSION}
    if _demo_marker_matches(root, parameters):
        return root
    cities = {"train": ("aachen", "bremen"), "val": ("frankfurt",)}
    index = 0
    for split, count in (("train", n_train), ("val", n_val)):
        for number in range(count):
            city = cities[split][number % len(cities[split])]
            stem = f"{city}_000000_{number // len(cities[split]):06d}"
            image, ids = _demo_cityscapes_sample(np.random.default_rng([seed, index]), tuple(size))
            index += 1
            _save_image(root / "leftImg8bit" / split / city / f"{stem}_leftImg8bit.png", image, "PNG")
            label_ids = root / "gtFine" / split / city / f"{stem}_gtFine_labelIds.png"
            write_label_png(label_ids, ids)
            _convert_cityscapes_label((label_ids, _train_ids_path(label_ids)))
    _write_demo_marker(root, parameters)
    return root
