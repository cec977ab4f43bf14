"""The predict task: label maps and overlays for your own images.

    python run.py pspnet_predict weights=PATH input=IMAGE_FOLDER_OR_GLOB output=DIR
    python run.py pointrend_predict weights=PATH input="photos/*.jpg" output=DIR test.flip=true

For each input image <stem>.<ext> it writes OUTPUT/<stem>.png, the label map as an indexed ("P") PNG
(pixel values are class indices; the dataset palette makes it show in colour), and OUTPUT/<stem>_overlay.jpg,
the class colours blended at 50 % over the photo with a legend of the classes present. Inference is
seg/evaluate.py's (data.test_scale resize, test.scales, test.flip, whole or slide), so a prediction is
what evaluation would score. Images whose largest test view has a long side above test.max_size run in
slide mode even when test.mode = "whole", which bounds device memory for very large photos.

Unlike the training data, photos are turned upright by their EXIF orientation tag first (as OpenCV's
imread does for mmseg's demo), so the outputs line up with the photo as image viewers show it.
Under torchrun, rank r predicts images r, r + world_size, ...
"""
import collections
import glob
import os
import sys
import time

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont, ImageOps

from seg import amp, data, dist, evaluate, files, models
from seg.files import UserError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp")
OVERLAY_QUALITY = 95  # with 4:4:4 chroma, so thin class borders keep their colour
UNREADABLE = (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError)


# ------------------------------------------------------------------------------------------ inputs

def list_images(pattern):
    """Sorted paths from `input`: one file, a folder (its jpg/jpeg/png/bmp/webp files, not recursive) or a glob."""
    if os.path.isfile(pattern):
        return [pattern]
    if os.path.isdir(pattern):
        paths = sorted(os.path.join(pattern, name) for name in os.listdir(pattern)
                       if name.lower().endswith(IMAGE_EXTENSIONS) and os.path.isfile(os.path.join(pattern, name)))
        if not paths:
            raise UserError(f"input={pattern}: the folder holds no {'/'.join(IMAGE_EXTENSIONS)} images")
        return paths
    paths = sorted(path for path in glob.glob(pattern) if os.path.isfile(path))
    if not paths:
        raise UserError(f"input={pattern}: no such file or folder, and no file matches it as a glob")
    return paths


def output_stems(paths):
    """File stems naming each image's outputs; a stem seen before gets _2, _3, ... so nothing is overwritten."""
    seen, stems = collections.Counter(), []
    for path in paths:
        stem = os.path.splitext(os.path.basename(path))[0]
        seen[stem] += 1
        stems.append(stem if seen[stem] == 1 else f"{stem}_{seen[stem]}")
    return stems


def read_photo(path):
    """uint8 H×W×3 RGB, upright by EXIF orientation; None, after a warning naming the file, if unreadable."""
    try:
        with Image.open(path) as image:
            return np.asarray(ImageOps.exif_transpose(image).convert("RGB"))
    except UNREADABLE as error:
        print(f"warning: skipping {path}: not a readable image ({error})", file=sys.stderr, flush=True)
        return None


# ----------------------------------------------------------------------------------------- outputs

def palette_and_names(dataset, num_classes):
    """The dataset's RGB palette and class names for `num_classes` classes; classes beyond the dataset's
    (a model fine-tuned on other data) get fixed pseudo-random colours and names "class k"."""
    info = data.dataset_info(dataset)
    palette, names = [tuple(colour) for colour in info["palette"][:num_classes]], info["classes"][:num_classes]
    rng = np.random.default_rng(0)
    while len(palette) < num_classes:
        palette.append(tuple(int(value) for value in rng.integers(0, 256, 3)))
        names.append(f"class {len(names)}")
    return palette, names


def label_png(label, palette):
    """PNG bytes of a uint8 H×W label map as an indexed image: pixel = class index, `palette` for display."""
    image = Image.fromarray(label)
    image.putpalette([value for colour in palette for value in colour])  # "L" becomes "P", indices kept
    return files.image_bytes(image, "PNG")


def draw_legend(image, classes, palette, names):
    """Draw a white box at the top left listing `classes` (swatch and name) onto a Pillow RGB image, with
    Pillow's default font scaled to the image. Returns the box (left, top, right, bottom), inclusive."""
    size = max(10, round(min(image.size) / 40))
    try:
        font = ImageFont.load_default(size)
    except TypeError:  # Pillow < 10.1: a fixed bitmap font
        font = ImageFont.load_default()
    draw = ImageDraw.Draw(image)
    row, pad = draw.textbbox((0, 0), "Ag", font=font)[3] + 4, 4
    text_width = max(draw.textlength(names[k], font=font) for k in classes)
    box = (0, 0, int(3 * pad + row + text_width), pad + len(classes) * row)
    draw.rectangle(box, fill=(255, 255, 255))
    for index, k in enumerate(classes):
        top = pad + index * row
        draw.rectangle((pad, top, pad + row - 4, top + row - 4), fill=tuple(palette[k]), outline=(0, 0, 0))
        draw.text((2 * pad + row, top), names[k], fill=(0, 0, 0), font=font)
    return box


def overlay(photo, label, palette, names):
    """uint8 H×W×3 RGB photo with the label colours blended at 50 % ((photo + colour + 1) // 2) and a legend
    of the classes present. Returns (Pillow RGB image, legend box (left, top, right, bottom) inclusive)."""
    colours = evaluate.colorize(label, palette)
    image = Image.fromarray(((photo.astype(np.uint16) + colours + 1) // 2).astype(np.uint8))
    box = draw_legend(image, np.unique(label).tolist(), palette, names)
    return image, box


def write_outputs(folder, stem, photo, label, palette, names):
    """OUTPUT/<stem>.png (indexed label map) and OUTPUT/<stem>_overlay.jpg, each written atomically."""
    files.write_bytes_atomic(label_png(label, palette), os.path.join(folder, f"{stem}.png"))
    image, _ = overlay(photo, label, palette, names)
    jpeg = files.image_bytes(image, "JPEG", quality=OVERLAY_QUALITY, subsampling=0)
    files.write_bytes_atomic(jpeg, os.path.join(folder, f"{stem}_overlay.jpg"))


# --------------------------------------------------------------------------------------- inference

@torch.no_grad()
def predict_label(model, photo, test, test_scale, torch_device, amp_mode="off"):
    """uint8 H×W class indices for an RGB uint8 H×W×3 photo, and whether it ran in slide mode.

    The model sees the BGR photo resized to data.test_scale (times each test.scales ratio); views whose long
    side exceeds test.max_size switch the image to slide mode. `model` must be in eval mode.
    """
    views = evaluate.resize_to_scales(photo[:, :, ::-1], test_scale, test["scales"])
    slide = test["mode"] == "whole" and max(max(view.shape[:2]) for view in views) > test["max_size"]
    image, hw = evaluate.stack_views(views)
    with amp.autocast_context(torch_device.type, amp_mode):
        scores = evaluate.test_time_scores(model, image.to(torch_device), hw, photo.shape[:2],
                                           {**test, "mode": "slide"} if slide else test)
    return scores.argmax(dim=1)[0].to(torch.uint8).cpu().numpy(), slide


def predict_files(model, jobs, config, torch_device, palette, names):
    """Predict and write every (path, stem) in `jobs`, one progress line each; unreadable files are skipped
    with a warning. Returns the number of images written."""
    test, written, told = config["test"], 0, False
    for number, (path, stem) in enumerate(jobs, 1):
        start = time.perf_counter()
        photo = read_photo(path)
        if photo is None:
            continue
        label, slide = predict_label(model, photo, test, config["data"]["test_scale"], torch_device, config["amp"])
        if slide and not told:
            print(f"note: images whose test-resized long side exceeds test.max_size = {test['max_size']} run in "
                  f"slide mode (test.crop_hw = {test['crop_hw']}, test.stride_hw = {test['stride_hw']})")
            told = True
        write_outputs(config["output"], stem, photo, label, palette, names)
        written += 1
        milliseconds = (time.perf_counter() - start) * 1000
        print(f"{number}/{len(jobs)} {os.path.basename(path)} {photo.shape[0]}x{photo.shape[1]} {milliseconds:.0f} ms",
              flush=True)
    return written


def predict(config):
    """The predict task: `weights` applied to every image of `input`, outputs under `output`."""
    hints = {"weights": "a seg, mmsegmentation or detectron2 checkpoint", "input": "an image, a folder or a glob",
             "output": "the folder for label maps and overlays"}
    for key, hint in hints.items():
        if not config[key]:
            raise UserError(f"[{config['section']}] needs {key}=PATH ({hint})")
    evaluate.check_test_options(config["test"])
    paths = list_images(config["input"])
    torch_device, rank, world_size = dist.setup(config["device"])
    message = amp.check_amp_supported(torch_device.type, config["amp"])
    if message:
        raise UserError(f"amp = \"{config['amp']}\": {message}")
    model = models.build(config["model"]).to(torch_device).eval()
    models.load_initial_weights(model, config, log=print if rank == 0 else (lambda *a: None))
    palette, names = palette_and_names(config["data"]["dataset"], config["model"]["num_classes"])
    jobs = list(zip(paths, output_stems(paths)))[rank::world_size]
    written = predict_files(model, jobs, config, torch_device, palette, names)
    dist.cleanup()
    if jobs and not written:
        raise UserError(f"input={config['input']}: none of its {len(jobs)} files could be read as an image")
    print(f"wrote {written} label maps and overlays to {config['output']}")
    return written
