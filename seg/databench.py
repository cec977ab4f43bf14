"""Data benchmark, not a test: `python run.py data_bench`.

Runs each training recipe's pipeline in one process, as one loader worker does (decode ->
transforms.TRAIN_SAMPLERS -> the colour jitter when it runs in the loader -> collate), on generated files
of the real sizes and formats, with the decoded-image cache off and on and the colour jitter in the
loader or on the device (data.jitter_on), and splits the time into stages. With the jitter on the
device it also times colour.apply_jitter on the collated batches on the section's device: work the
training device does after the copy, reported apart from the worker's time.

Results go to <output_dir>/data_bench.{json,md}, written atomically.
"""
import contextlib
import functools
import os
import tempfile
import time

import numpy as np
import torch
from PIL import Image

from seg import colour, data, dist, files, train, transforms
from seg.bench import environment, markdown_table, time_calls, write_outputs
from seg.files import UserError

# data_bench: the real datasets' image sizes (H, W), formats and the per-worker targets of issue #5.
REAL_IMAGES = {"voc": ((375, 500), "JPEG"), "cityscapes": ((1024, 2048), "PNG")}
# Noise std of the generated images, chosen so that files are about as large as the real ones:
# Cityscapes leftImg8bit PNGs ~2.2 MB (11 GB zip / 5000 images), VOC JPEGs ~110 KB (1.9 GB tar / 17125).
NOISE = {"voc": 20.0, "cityscapes": 0.9}
TARGET_IMAGES_PER_S = {"voc": 128.0, "cityscapes": 48.0}
REFERENCES = {"voc": "mmseg 0.10 VOC pipeline: 128 images/s per core",
              "cityscapes": "detectron2 PointRend mapper: 9.6 images/s per core (105 ms: 50 ms PNG decode, "
                            "31 ms resize)"}
# Functions of seg/transforms.py timed as stages: the first name that exists is wrapped (a stage with
# none counts as "other_transform"). Keep in step with transforms.py when its functions are renamed.
# "colour" is the jitter's draw here, plus its application when it runs in the loader (timed apart).
STAGE_FUNCTIONS = {"crop_choice": ("choose_window",), "resize": ("resize_image_window", "bilinear_window"),
                   "colour": ("draw_jitter",)}




# ---------------------------------------------------------------- generated files


def synthetic_scene(rng, hw, num_classes, noise):
    """(RGB uint8 H×W×3, label uint8 H×W): flat-coloured rectangles with smooth shading and Gaussian
    noise of std `noise`, which sets the compressed size (see NOISE)."""
    height, width = hw
    label = np.full(hw, rng.integers(num_classes), np.uint8)
    for _ in range(24):
        y0, x0 = rng.integers(height), rng.integers(width)
        size_y, size_x = rng.integers(height // 8, height // 2 + 1), rng.integers(width // 8, width // 2 + 1)
        label[y0:y0 + size_y, x0:x0 + size_x] = rng.integers(num_classes) if rng.random() < 0.9 else 255
    colours = rng.uniform(30, 225, size=(256, 3)).astype(np.float32)
    yy, xx = np.linspace(-1, 1, height, dtype=np.float32), np.linspace(-1, 1, width, dtype=np.float32)
    shading = 25 * (yy[:, None, None] * rng.uniform(-1, 1, 3) + xx[None, :, None] * rng.uniform(-1, 1, 3))
    image = colours[label] + shading.astype(np.float32) + rng.normal(0, noise, (height, width, 3)).astype(np.float32)
    return np.clip(image, 0, 255).astype(np.uint8), label


def write_bench_dataset(root, dataset, count, hw, num_classes, seed=0):
    """`count` generated samples in the dataset's on-disk layout; returns (data.root, train_splits)."""
    for index in range(count):
        image, label = synthetic_scene(np.random.default_rng([seed, index]), hw, num_classes, NOISE[dataset])
        if dataset == "voc":
            image_path = os.path.join(root, "voc", "JPEGImages", f"{index:06d}.jpg")
            label_path = os.path.join(root, "voc", "SegmentationClassAug", f"{index:06d}.png")
        else:
            stem = os.path.join("train", "bench", f"bench_000000_{index:06d}")
            image_path = os.path.join(root, "cityscapes", "leftImg8bit", f"{stem}_leftImg8bit.png")
            label_path = os.path.join(root, "cityscapes", "gtFine", f"{stem}_gtFine_labelTrainIds.png")
        for path in (image_path, label_path):
            os.makedirs(os.path.dirname(path), exist_ok=True)
        options = {"quality": 90} if dataset == "voc" else {}  # Pillow's PNG default: compress_level 6
        Image.fromarray(image).save(image_path, format=REAL_IMAGES[dataset][1], **options)
        Image.fromarray(label).save(label_path, format="PNG")
    if dataset == "voc":
        splits = os.path.join(root, "voc", "ImageSets", "Segmentation")
        os.makedirs(splits, exist_ok=True)
        with open(os.path.join(splits, "bench.txt"), "w") as handle:
            handle.write("".join(f"{index:06d}\n" for index in range(count)))
        return "voc", ["bench:SegmentationClassAug"]
    return "cityscapes", ["train"]


# ---------------------------------------------------------------- timing


@contextlib.contextmanager
def timed_stages(totals):
    """Accumulate seconds spent in the STAGE_FUNCTIONS of seg.transforms into totals[stage].

    Wraps the module attributes for the duration: the samplers look these functions up at call time.
    """
    wrapped = {}
    for stage, names in STAGE_FUNCTIONS.items():
        name = next((name for name in names if hasattr(transforms, name)), None)
        if name is not None:
            wrapped[name] = (stage, getattr(transforms, name))

    def timed(stage, function):
        def wrapper(*args, **kwargs):
            start = time.perf_counter()
            try:
                return function(*args, **kwargs)
            finally:
                totals[stage] = totals.get(stage, 0.0) + time.perf_counter() - start
        return wrapper

    try:
        for name, (stage, function) in wrapped.items():
            setattr(transforms, name, timed(stage, function))
        yield totals
    finally:
        for name, (_, function) in wrapped.items():
            setattr(transforms, name, function)


def pipeline_row(dataset, read, sample_fn, count, bench, jitter_in_loader, torch_device):
    """Per-image milliseconds of decode / sampler stages / collate over bench["steps"] samples after
    bench["warmup"], and with the jitter on the device, of colour.apply_jitter on each collated batch."""
    warmup, steps, batch_size = bench["warmup"], bench["steps"], bench["batch_size"]
    colour.apply_jitter(torch.zeros(1, 3, 1, 1, dtype=torch.uint8, device=torch_device),
                        torch.zeros(1, colour.JITTER_SIZE, dtype=torch.int16, device=torch_device))  # tables
    samples = []
    for position in range(warmup + steps):
        if position in (0, warmup):  # the warm-up samples' times are thrown away
            totals = dict.fromkeys(("decode", "sample", "collate", "device_colour", *STAGE_FUNCTIONS), 0.0)
        start = time.perf_counter()
        image, label = read(position % count)
        middle = time.perf_counter()
        with timed_stages(totals):
            image, label, jitter = sample_fn(np.random.default_rng([0, position]), image, label)
            if jitter_in_loader:
                before = time.perf_counter()
                image, jitter = colour.jittered(image, jitter), None
                totals["colour"] += time.perf_counter() - before
        samples.append((image, label, jitter))
        totals["decode"] += middle - start
        totals["sample"] += time.perf_counter() - middle
        if len(samples) == batch_size or position == warmup + steps - 1:
            start = time.perf_counter()
            batch = data.collate(samples)
            totals["collate"] += time.perf_counter() - start
            samples = []
            if not jitter_in_loader:
                batch = data.to_device(batch, torch_device)
                totals["device_colour"] += time_calls(lambda: colour.apply_jitter(batch["image"], batch["jitter"]),
                                                      torch_device, 0, 1)[0]
    stages = {"decode": totals["decode"], **{stage: totals[stage] for stage in STAGE_FUNCTIONS},
              "other_transform": totals["sample"] - sum(totals[stage] for stage in STAGE_FUNCTIONS),
              "collate": totals["collate"]}
    total = totals["decode"] + totals["sample"] + totals["collate"]
    return {"dataset": dataset, "jitter_on": "loader" if jitter_in_loader else "device",
            "images_per_s": steps / total, "ms_per_image": 1e3 * total / steps,
            "stages_ms": {stage: 1e3 * seconds / steps for stage, seconds in stages.items()},
            "device_colour_ms_per_image": None if jitter_in_loader else 1e3 * totals["device_colour"] / steps,
            "target_images_per_s": TARGET_IMAGES_PER_S[dataset], "reference": REFERENCES[dataset]}


def dataset_rows(config, recipe, folder, image_hw, torch_device, log):
    """A row per colour jitter placement (bench.jitter_on) and cache off / on for one training recipe, on
    files generated under `folder`."""
    bench, dataset = config["bench"], recipe["data"]["dataset"]
    hw, image_format = image_hw.get(dataset, REAL_IMAGES[dataset][0]), REAL_IMAGES[dataset][1]
    classes = recipe["model"]["num_classes"]
    root, splits = write_bench_dataset(folder, dataset, bench["images"], hw, classes)
    recipe = {**recipe, "data_root": folder, "data": {**recipe["data"], "root": root, "train_splits": splits}}
    train_set = train.train_dataset(recipe)
    items, sample_fn = train_set.items, train_set.sample_fn
    uncached = lambda i: (files.read_image_bgr(items[i][0]), files.read_label(items[i][1], classes))  # noqa: E731
    start = time.perf_counter()
    reader = files.ensure_cache(items, files.cache_path_for(os.path.join(folder, ".cache"), items, dataset),
                                files.read_image_bgr, lambda path: files.read_label(path, classes), log=lambda *a: None)
    build_s = time.perf_counter() - start
    file_bytes = {"image_bytes_mean": float(np.mean([os.path.getsize(image) for image, _ in items])),
                  "label_bytes_mean": float(np.mean([os.path.getsize(label) for _, label in items]))}
    rows = []
    for place in bench["jitter_on"]:
        if place not in ("loader", "device"):
            raise UserError(f"bench.jitter_on = {bench['jitter_on']}: use \"loader\" and/or \"device\"")
        for use_cache, read in ((False, uncached), (True, lambda i: (reader.image(i), reader.label(i)))):
            row = pipeline_row(dataset, read, sample_fn, len(items), bench, place == "loader", torch_device)
            rows.append({**row, "section": recipe["section"], "cache": use_cache, "image_hw": list(hw),
                         "image_format": image_format, "crop_hw": list(recipe["data"]["crop_hw"]), **file_bytes,
                         "cache_build_s_per_image": build_s / len(items) if use_cache else None})
            extra = "" if place == "loader" else f" (+ {row['device_colour_ms_per_image']:.2f} ms/image on the device)"
            log(f"{dataset} jitter in the {place}, cache {'on' if use_cache else 'off'}: "
                f"{row['images_per_s']:.1f} images/s{extra}")
    return rows


DATA_COLUMNS = [("dataset", "dataset", "{}"), ("jitter on", "jitter_on", "{}"), ("cache", "cache", "{}"),
                ("image", "image_desc", "{}"), ("images/s", "images_per_s", "{:.1f}"),
                ("target", "target_images_per_s", "{:.0f}"), ("ms/image", "ms_per_image", "{:.1f}"),
                ("decode", "decode", "{:.1f}"), ("crop choice", "crop_choice", "{:.1f}"),
                ("resize", "resize", "{:.1f}"),
                ("colour", "colour", "{:.1f}"), ("other", "other_transform", "{:.1f}"),
                ("collate", "collate", "{:.1f}"), ("device colour", "device_colour_ms_per_image", "{:.2f}")]


def data_bench(config, recipes, command=None, image_hw=None, log=functools.partial(print, flush=True)):
    """Per-worker throughput of each recipe's training pipeline; image_hw overrides REAL_IMAGES sizes
    (tests only). Returns the result dict (also written to disk)."""
    torch_device = torch.device(dist.resolve_device_type(config["device"]))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in a DataLoader worker
    try:
        result = {**environment(torch.device("cpu"), command), "images": config["bench"]["images"],
                  "warmup": config["bench"]["warmup"], "steps": config["bench"]["steps"],
                  "batch_size": config["bench"]["batch_size"], "rows": []}
        result["jitter_device"] = environment(torch_device, command)["device"]
        os.makedirs(config["output_dir"], exist_ok=True)
        with tempfile.TemporaryDirectory(dir=config["output_dir"], prefix=".data_bench-") as folder:
            for recipe in recipes:
                result["rows"] += dataset_rows(config, recipe, folder, image_hw or {}, torch_device, log)
    finally:
        torch.set_num_threads(threads)
    shown = [{**row, **row["stages_ms"], "image_desc": "{}x{} {} {:.0f} KB".format(
        row["image_hw"][1], row["image_hw"][0], row["image_format"], row["image_bytes_mean"] / 1e3)}
        for row in result["rows"]]
    table = markdown_table(shown, DATA_COLUMNS) + (
        "\n\nStage columns are milliseconds per image in the worker. \"device colour\": milliseconds per image "
        f"of colour.apply_jitter on {result['jitter_device']} (one thread on a CPU), outside the worker.")
    log(f"\ndata_bench: one worker, {result['device']}, torch {result['torch']}\n{table}")
    write_outputs(result, table, config["output_dir"], "data_bench", "data pipeline, one worker")
    return result
