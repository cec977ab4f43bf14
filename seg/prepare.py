"""Dataset preparation: VOC12aug labels from SBD, Cityscapes trainIds, small generated demo datasets. Writes are atomic:
a rerun skips what an interrupted one finished. Layouts (mmseg `docs/dataset_prepare.md`, cityscapesScripts' README):
    data/VOCdevkit/VOC2012/{JPEGImages, SegmentationClass, SegmentationClassAug, ImageSets/Segmentation/*.txt}
    data/VOCdevkit/VOCaug/dataset/{cls/*.mat, train.txt, val.txt}     # SBD benchmark_RELEASE/dataset
    cityscapes/{leftImg8bit, gtFine}/{train,val,test}/<city>/<city>_<seq>_<frame>_{leftImg8bit,gtFine_*}.png"""
import colorsys
import concurrent.futures
import json
import shutil
from pathlib import Path

import numpy as np
from PIL import Image

from seg.data import CITYSCAPES_ID_TO_TRAINID, VOC_PALETTE, read_split
from seg.files import UserError, name_list, save_image, write_label_png, write_text_atomic

_VOC_HINT = ("Download VOCtrainval_11-May-2012.tar (PASCAL VOC 2012) and extract it so that its VOC2012 folder "
             "(with JPEGImages, SegmentationClass, ImageSets) is data/VOCdevkit/VOC2012.")
_SBD_HINT = ("Download SBD's benchmark.tgz and move its benchmark_RELEASE/dataset folder (with cls/*.mat, "
             "train.txt, val.txt) to data/VOCdevkit/VOCaug/dataset.")
_CITYSCAPES_HINT = ("Download gtFine_trainvaltest.zip and leftImg8bit_trainvaltest.zip from cityscapes-dataset.com "
                    "and unzip both into one folder, giving <root>/{gtFine,leftImg8bit}/{train,val,test}/<city>/.")
_DEMO_VERSION = 4  # bump when the generators change, so old demo folders are not silently reused
_PICK_ANOTHER = "pick another data_root or empty that folder"
_DEMO_VOC_SHAPES = {1: "disc", 2: "square", 3: "triangle", 4: "cross"}  # aeroplane, bicycle, bird, boat
_DEMO_VOC_TURN, _DEMO_VOC_TRIES = 0.1, 20  # VOC demo shapes: turned within ±0.1·π (±18°); places tried per shape
_DEMO_CITY_COLOURS = {7: (110, 100, 110), 8: (170, 150, 160), 11: (120, 90, 70), 21: (70, 120, 40),
                      23: (120, 170, 230), 4: (150, 140, 60), 1: (30, 30, 30), 0: (0, 0, 0)}  # label id: base RGB


def _require(hint, *paths):
    for path in paths:
        if not Path(path).exists():
            raise UserError(f"{path} not found. {hint}")


def _run_parallel(function, jobs, workers):
    """Apply `function` to every job, in `workers` processes when it is worth it."""
    if workers <= 1 or len(jobs) < 2 * workers:
        list(map(function, jobs))
    else:
        with concurrent.futures.ProcessPoolExecutor(workers) as pool:
            list(pool.map(function, jobs, chunksize=max(1, len(jobs) // (8 * workers))))


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
    segmentation = np.asarray(getattr(content.get("GTcls"), "Segmentation", None))  # None: a 0-D array
    if segmentation.ndim != 2:
        raise UserError(f"{mat_path} has no 2-D GTcls.Segmentation; is it an SBD cls/*.mat file?")
    if segmentation.min() < 0 or segmentation.max() > 255:
        raise UserError(f"{mat_path}: GTcls.Segmentation has values outside 0..255")
    write_label_png(png_path, segmentation.astype(np.uint8))


def prepare_voc_aug(voc_root, sbd_root, log=print, workers=4):
    """Build VOC12aug: SegmentationClassAug/*.png from SBD cls/*.mat, and ImageSets/Segmentation/{aug,trainaug}.txt.
    Checks splits first, skips finished PNGs; returns {converted, skipped, voc_train, voc_val, aug, trainaug} counts."""
    voc_root, sbd_root = Path(voc_root), Path(sbd_root)
    split_folder = voc_root / "ImageSets" / "Segmentation"
    _require(_VOC_HINT, voc_root, split_folder / "train.txt", split_folder / "val.txt")
    _require(_SBD_HINT, sbd_root, sbd_root / "cls", sbd_root / "train.txt", sbd_root / "val.txt")
    mats = sorted((sbd_root / "cls").glob("*.mat"))
    if not mats:
        raise UserError(f"no .mat files in {sbd_root / 'cls'}. {_SBD_HINT}")
    voc_train, voc_val = set(read_split(split_folder / "train.txt")), set(read_split(split_folder / "val.txt"))
    sbd_all = set(read_split(sbd_root / "train.txt") + read_split(sbd_root / "val.txt"))
    # as mmseg's `tools/convert_datasets/voc_aug.py` builds them, sorted so reruns give identical files
    aug, trainaug = sorted(sbd_all - (voc_train | voc_val)), sorted((voc_train | sbd_all) - voc_val)
    if unlabelled := sorted(set(aug) - {mat.stem for mat in mats}):
        raise UserError(f"{len(unlabelled)} images of SBD's train.txt/val.txt have no cls/<name>.mat: "
                        f"{name_list(unlabelled)}. Is the SBD download complete? {_SBD_HINT}")
    if (len(voc_train), len(voc_val)) != (1464, 1449):
        log("note: not the full VOC 2012 splits (1464 train / 1449 val), so the 9118 aug / 10582 trainaug check "
            "is skipped")
    elif (len(aug), len(trainaug)) != (9118, 10582):
        raise UserError(f"VOC12aug: expected 9118 aug and 10582 trainaug images, got {len(aug)} and "
                        f"{len(trainaug)}; check SBD's train.txt and val.txt. {_SBD_HINT}")
    _loadmat()  # fail here, once, if scipy is missing
    out_folder = voc_root / "SegmentationClassAug"
    jobs = [(mat, out_folder / f"{mat.stem}.png") for mat in mats if not (out_folder / f"{mat.stem}.png").exists()]
    log(f"SBD: {len(mats)} masks, {len(mats) - len(jobs)} already converted, converting {len(jobs)}")
    _run_parallel(_convert_sbd_mat, jobs, workers)
    write_text_atomic("".join(f"{stem}\n" for stem in aug), split_folder / "aug.txt")
    write_text_atomic("".join(f"{stem}\n" for stem in trainaug), split_folder / "trainaug.txt")
    log(f"VOC12aug: {len(aug)} aug + {len(voc_train)} train images; trainaug.txt {len(trainaug)}")
    return {"converted": len(jobs), "skipped": len(mats) - len(jobs), "voc_train": len(voc_train),
            "voc_val": len(voc_val), "aug": len(aug), "trainaug": len(trainaug)}


def _convert_cityscapes_label(job):
    """(labelIds_png, labelTrainIds_png): map official label ids to train ids (255 = ignore)."""
    source, target = job
    label_ids = np.asarray(Image.open(source))
    if label_ids.ndim != 2 or label_ids.dtype != np.uint8:
        raise UserError(f"{source} is not an 8-bit single-channel label image")
    write_label_png(target, CITYSCAPES_ID_TO_TRAINID[label_ids])


def _train_ids_path(label_ids_path):
    return Path(str(label_ids_path).replace("_gtFine_labelIds.png", "_gtFine_labelTrainIds.png"))


def prepare_cityscapes(root, workers=4, log=print):
    """Write gtFine/*/<city>/*_gtFine_labelTrainIds.png beside each *_gtFine_labelIds.png, in parallel, with the classes
    of cityscapesScripts' createTrainIdLabelImgs.py (its `helpers/labels.py` table), skipping targets newer than their
    source. A train/val image without a labelIds file: UserError. Returns {train, val (images), converted, skipped}."""
    root = Path(root)
    _require(_CITYSCAPES_HINT, root, root / "gtFine", root / "leftImg8bit")
    counts = {}
    for split in ("train", "val"):
        images, gt_folder = sorted((root / "leftImg8bit" / split).glob("*/*_leftImg8bit.png")), root / "gtFine" / split
        labels = [gt_folder / image.parent.name / image.name.replace("_leftImg8bit.png", "_gtFine_labelIds.png")
                  for image in images]
        if missing := [label for label in labels if not label.exists()]:
            raise UserError(f"{len(missing)} of {len(images)} {split} images have no labelIds file: "
                            f"{name_list(missing)}. {_CITYSCAPES_HINT}")
        counts[split] = len(images)
    if counts["train"] + counts["val"] == 0:
        raise UserError(f"no images under {root / 'leftImg8bit'}/{{train,val}}/<city>/. {_CITYSCAPES_HINT}")
    sources = sorted(p for split in ("train", "val", "test")
                     for p in (root / "gtFine" / split).glob("*/*_gtFine_labelIds.png"))
    jobs = [(s, t) for s, t in ((s, _train_ids_path(s)) for s in sources)
            if not (t.exists() and t.stat().st_mtime_ns >= s.stat().st_mtime_ns)]  # done: target not older
    log(f"Cityscapes: {len(sources)} labelIds files, {len(sources) - len(jobs)} already converted, "
        f"converting {len(jobs)} with {workers} workers")
    _run_parallel(_convert_cityscapes_label, jobs, workers)
    counts.update(converted=len(jobs), skipped=len(sources) - len(jobs))
    if (counts["train"], counts["val"]) != (2975, 500):
        log("note: full Cityscapes has 2975 train / 500 val images")
    log(f"Cityscapes: {counts['train']} train and {counts['val']} val images with labels")
    return counts


def _claim_demo_folder(root, parameters, generated_folders):
    """True when `root` holds the finished demo of `parameters`. Else claims it (only if missing, empty or marked by
    `.demo_complete` as a demo of this kind; else UserError) and removes its generated folders: nothing stale stays."""
    marker = root / ".demo_complete"
    if marker.exists():  # written atomically: always complete JSON
        recorded = json.loads(marker.read_text())
        if recorded["kind"] != parameters["kind"]:
            raise UserError(f"{root} holds a generated {recorded['kind']} demo, not a {parameters['kind']} one; "
                            f"{_PICK_ANOTHER}")
        if recorded == parameters:
            return True
    elif root.is_file() or (root.is_dir() and any(root.iterdir())):
        raise UserError(f"{root} holds files that the demo did not make (no .demo_complete marker); {_PICK_ANOTHER}")
    # claimed before writing, so a rerun after an interruption regenerates instead of refusing its own files
    write_text_atomic(json.dumps({**parameters, "complete": False}, sort_keys=True), marker)
    for folder in generated_folders:
        shutil.rmtree(root / folder, ignore_errors=True)
    return False


def _texture(rng, hw, colour, amplitude=30.0):
    """Float H×W×3 RGB: `colour` plus stripes of random period/angle and pixel noise, so regions are not flat."""
    yy, xx = np.mgrid[0:hw[0], 0:hw[1]].astype(np.float32)
    angle, period = rng.uniform(0, np.pi), rng.uniform(5, 20)
    stripes = np.sin(2 * np.pi * (xx * np.cos(angle) + yy * np.sin(angle)) / period)
    weights = rng.uniform(-1, 1, size=3) * amplitude
    return np.asarray(colour, np.float32) + stripes[..., None] * weights + rng.normal(0, amplitude / 3, size=(*hw, 3))


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
    if kind == "cross":  # arms radius / 3 wide
        return ((abs(u) <= radius) & (abs(v) <= radius / 3)) | ((abs(v) <= radius) & (abs(u) <= radius / 3))
    raise ValueError(kind)


def _boundary_band(label):
    """Bool H×W: pixels with a differently labelled 8-neighbour (a band ~2 px wide along every class edge)."""
    (height, width), padded = label.shape, np.pad(label, 1, mode="edge")
    return np.any([padded[dy:dy + height, dx:dx + width] != label for dy in range(3) for dx in range(3)], axis=0)


def _demo_voc_sample(rng, hw):
    """(RGB uint8 H×W×3, label uint8 H×W in 0..4, no ignore band). Greyish striped background, 1-3 shapes in
    saturated colours, none covering another, each turned at most _DEMO_VOC_TURN·π: object versus background is
    local, the class needs the shape (occluded or freely turned shapes left the tiny demo model guessing)."""
    image = _texture(rng, hw, rng.uniform(40, 200) + rng.uniform(-25, 25, size=3), amplitude=20.0)  # background
    label = np.zeros(hw, np.uint8)
    for class_id in [int(rng.integers(1, len(_DEMO_VOC_SHAPES) + 1)) for _ in range(rng.integers(1, 4))]:
        radius = rng.uniform(0.22, 0.38) * min(hw)
        for _ in range(_DEMO_VOC_TRIES):  # a free place, or one shape fewer
            centre = [rng.uniform(0.5 * radius, side - 0.5 * radius) for side in hw]
            angle = rng.uniform(-np.pi, np.pi) * _DEMO_VOC_TURN
            mask = _shape_mask(_DEMO_VOC_SHAPES[class_id], hw, centre, radius, angle)
            if not (mask & (label > 0)).any():
                hsv = rng.uniform(0, 1), rng.uniform(0.6, 1.0), rng.uniform(0.7, 1.0)
                image[mask] = _texture(rng, hw, np.array(colorsys.hsv_to_rgb(*hsv)) * 255, amplitude=12.0)[mask]
                label[mask] = class_id
                break
    return np.clip(image, 0, 255).astype(np.uint8), label


def make_demo_voc(root, n_train=320, n_val=40, size=(72, 96), seed=0):
    """Generate a small deterministic dataset in the VOC12aug layout; returns `root`. Classes 1..4 (aeroplane, bicycle,
    bird, boat) are a disc, square, triangle and cross, 1-3 per image, not overlapping. The first n_train // 2 training
    images are in train.txt (SegmentationClass: palette PNGs with a 255 band along edges, like VOC), the rest in aug.txt
    (SegmentationClassAug: grayscale, no band, like SBD; it holds train too); trainaug.txt: all; val.txt: `n_val`."""
    root = Path(root)
    parameters = dict(kind="voc", n_train=n_train, n_val=n_val, size=list(size), seed=seed, version=_DEMO_VERSION)
    if _claim_demo_folder(root, parameters, ("JPEGImages", "SegmentationClass", "SegmentationClassAug", "ImageSets")):
        return root
    names = [f"2007_{index:06d}" for index in range(1, n_train + n_val + 1)]
    splits = {"train": names[:n_train // 2], "val": names[n_train:], "aug": names[n_train // 2:n_train],
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
    write_text_atomic(json.dumps(parameters, sort_keys=True), root / ".demo_complete")  # last: the demo is complete
    return root


def _demo_cityscapes_sample(rng, hw):
    """One generated street scene: (RGB uint8 H×W×3, official label ids uint8 H×W). Sky, buildings and trees,
    road and sidewalks; then cars, people and a static box on them, the ego vehicle and an unlabelled border."""
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
    below = yy >= horizon
    ids[below] = 8  # sidewalk, and a road narrowing towards a vanishing point
    ids[below & (abs(xx - rng.uniform(0.4, 0.6) * width) <= (0.04 + 0.42 * depth) * width)] = 7
    image = np.zeros((height, width, 3), np.float32)
    for label_id in np.unique(ids):
        colour = np.asarray(_DEMO_CITY_COLOURS[int(label_id)]) + rng.uniform(-25, 25, size=3)
        image[ids == label_id] = _texture(rng, hw, colour, amplitude=15)[ids == label_id]
    objects = [(26, 1.8)] * int(rng.integers(1, 4)) + [(24, 0.35)] * int(rng.integers(0, 3)) + [(4, 0.8)]
    for label_id, aspect in objects:  # cars on the road, people and a static box on the pavement
        bottom = int(rng.uniform(horizon + 0.15 * (height - horizon), height - 4))
        depth = (bottom - horizon) / max(1, height - horizon)
        object_height = max(4, (0.1 + 0.35 * depth) * height * (1.3 if label_id == 24 else 0.7))
        centre_x = rng.uniform(0.1, 0.9) * width
        if label_id == 26:  # a body box plus a narrower cabin on top
            above = yy <= bottom
            mask = (abs(xx - centre_x) <= aspect * object_height / 2) & above & (yy >= bottom - 0.6 * object_height)
            mask |= (abs(xx - centre_x) <= 0.55 * object_height) & above & (yy >= bottom - object_height)
            colour = rng.uniform(0, 255, size=3)
        else:  # an upright ellipse or box
            half_h, half_w, cy = object_height / 2, aspect * object_height / 2, bottom - object_height / 2
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
    """Generate a small deterministic dataset in the Cityscapes layout, trainIds included; returns `root`. Street
    scenes with official label ids road 7, sidewalk 8, building 11, vegetation 21, sky 23, person 24, car 26 and the
    ignored ids 0 (border), 1 (ego vehicle), 4 (static box). Train images in aachen and bremen, val in frankfurt."""
    root = Path(root)
    parameters = dict(kind="cityscapes", n_train=n_train, n_val=n_val, size=[*size], seed=seed, version=_DEMO_VERSION)
    if _claim_demo_folder(root, parameters, ("leftImg8bit", "gtFine")):
        return root
    cities = {"train": ("aachen", "bremen"), "val": ("frankfurt",)}
    for split, count, first_index in (("train", n_train, 0), ("val", n_val, n_train)):
        for number in range(count):
            city = cities[split][number % len(cities[split])]
            stem = f"{city}_000000_{number // len(cities[split]):06d}"
            image, ids = _demo_cityscapes_sample(np.random.default_rng([seed, first_index + number]), tuple(size))
            save_image(root / "leftImg8bit" / split / city / f"{stem}_leftImg8bit.png", image, "PNG")
            label_ids = root / "gtFine" / split / city / f"{stem}_gtFine_labelIds.png"
            write_label_png(label_ids, ids)
            _convert_cityscapes_label((label_ids, _train_ids_path(label_ids)))
    write_text_atomic(json.dumps(parameters, sort_keys=True), root / ".demo_complete")
    return root
