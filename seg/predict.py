"""Prediction of single photos (the inference path of seg/evaluate.py: views, whole or slide mode, flips, scales) and
the pictures made from it: label maps, colours, overlays, photo | truth | prediction panels with legends; and ONNX
export of the same computation, checked in onnxruntime."""
import contextlib
import io
import logging
import os
import statistics
import sys
import time
import warnings

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from seg import dist, files, transforms
from seg.evaluate import eval_mode, resize_to_scales, stack_views, test_time_scores, whole_logits
from seg.files import UserError

OVERLAY_QUALITY = 95  # with 4:4:4 chroma, so thin class borders keep their colour


@torch.no_grad()
def predict_scores(model, image_bgr, test, test_scale, autocast):
    """(float 1×K×H×W test_time_scores at the size of a uint8 H×W×3 BGR image, whether it ran in slide mode): a view
    longer than test["max_size"] switches whole mode to slide mode (bounds device memory). `model` in eval mode."""
    views = resize_to_scales(image_bgr, test_scale, test["scales"])
    slide = test["mode"] == "whole" and max(max(view.shape[:2]) for view in views) > test["max_size"]
    image, hw = stack_views(views)
    with autocast():
        scores = test_time_scores(model, image.to(model.pixel_mean.device), hw, image_bgr.shape[:2],
                                  {**test, "mode": "slide"} if slide else test)
    return scores, slide


def predict_label(model, image_bgr, test, test_scale, autocast):
    """(uint8 H×W class indices, whether it ran in slide mode) for a uint8 H×W×3 BGR image; as predict_scores."""
    scores, slide = predict_scores(model, image_bgr, test, test_scale, autocast)
    return label_of(scores), slide


def label_of(scores):
    return scores.argmax(dim=1)[0].to(torch.uint8).cpu().numpy()


def probabilities_of(scores, test):
    """float32 K×H×W softmax probabilities (numpy) from predict_scores' scores under the same `test` options."""
    averaged = len(test["scales"]) * (1 + bool(test["flip"])) > 1  # already probabilities
    return (scores if averaged else scores.softmax(dim=1))[0].float().cpu().numpy()


def predict_files(model, jobs, output, inference, legend, log=print):
    """Label maps and overlays under `output` of jobs [(image path, output stem)] by `model` (eval mode); returns how
    many were written (unreadable images: skipped with a warning). inference: {"test": [test], "test_scale", "autocast",
    "save_probabilities": also <stem>_prob.npz[, "label_ids": see write_prediction]}; legend: (palette, class names)."""
    test, written, told = inference["test"], 0, False
    for number, (path, stem) in enumerate(jobs, 1):
        begin = time.perf_counter()
        try:
            image = files.read_image_bgr(path, upright=True)
        except UserError as error:
            print(f"warning: skipping {path}: {error}", file=sys.stderr, flush=True)
            continue
        scores, slide = predict_scores(model, image, test, inference["test_scale"], inference["autocast"])
        if inference.get("save_probabilities"):  # float16 K×H×W "probabilities" of a compressed .npz
            probabilities = probabilities_of(scores, test).astype(np.float16)
            files.write_atomic(os.path.join(output, f"{stem}_prob.npz"),
                               lambda stream: np.savez_compressed(stream, probabilities=probabilities))
        if slide and not told:
            told = True
            log(f"note: images whose test-resized long side exceeds test.max_size = {test['max_size']} run in slide "
                f"mode (test.crop_hw = {test['crop_hw']}, test.stride_hw = {test['stride_hw']})")
        write_prediction(output, stem, image[:, :, ::-1], label_of(scores), *legend, inference.get("label_ids"))
        written += 1
        print(f"{number}/{len(jobs)} {os.path.basename(path)} {image.shape[0]}x{image.shape[1]} "
              f"{(time.perf_counter() - begin) * 1000:.0f} ms", flush=True)
    return written


def colorize(label, palette):
    """H×W class indices -> H×W×3 uint8 RGB; 255 (ignore) and indices beyond the palette are drawn white."""
    table = np.full((256, 3), 255, np.uint8)
    table[: len(palette)] = np.asarray(palette, np.uint8)[:256]
    return table[label]


def draw_legend(image, classes, palette, names):
    """Draw a white box listing `classes` (swatch and name) at the top left of a Pillow RGB image, in Pillow's
    default font scaled to the image. Returns the box (left, top, right, bottom), inclusive."""
    try:
        font = ImageFont.load_default(max(10, round(min(image.size) / 40)))
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
    image = Image.fromarray(((photo.astype(np.uint16) + colorize(label, palette) + 1) // 2).astype(np.uint8))
    return image, draw_legend(image, np.unique(label).tolist(), palette, names)


def label_png(label, palette):
    """PNG bytes of a uint8 H×W label map as an indexed image: pixel = class index, `palette` for display."""
    image = Image.fromarray(label)
    image.putpalette([value for colour in palette for value in colour])  # "L" becomes "P", indices kept
    return files.image_bytes(image, "PNG")


def write_prediction(folder, stem, photo, label, palette, names, label_ids=None):
    """FOLDER/<stem>.png (indexed label map; with `label_ids`, a uint8 table class -> id, those ids in a grey PNG as
    Cityscapes' test server and cityscapesScripts read labelIds), FOLDER/<stem>_overlay.jpg (RGB `photo`); atomic."""
    if label_ids is not None:
        files.write_label_png(os.path.join(folder, f"{stem}.png"), label_ids[label])
    else:
        files.write_bytes_atomic(label_png(label, palette), os.path.join(folder, f"{stem}.png"))
    image, _ = overlay(photo, label, palette, names)
    jpeg = files.image_bytes(image, "JPEG", quality=OVERLAY_QUALITY, subsampling=0)
    files.write_bytes_atomic(jpeg, os.path.join(folder, f"{stem}_overlay.jpg"))


def panel(photo, label, prediction, palette, names, min_height=256):
    """uint8 RGB picture: photo | ground truth | prediction side by side, colour-coded, enlarged (nearest) to at
    least `min_height` rows, with a legend of the classes in either map."""
    picture = np.concatenate([photo, colorize(label, palette), colorize(prediction, palette)], axis=1)
    scale = -(-min_height // picture.shape[0])
    image = Image.fromarray(picture.repeat(scale, axis=0).repeat(scale, axis=1))
    if present := [k for k in np.union1d(np.unique(label), np.unique(prediction)).tolist() if k < len(names)]:
        draw_legend(image, present, palette, names)
    return np.asarray(image)


@torch.no_grad()
def prediction_panels(model, dataset, count, inference, legend, indices=None):
    """[(stem, panel)] of the first `count` samples of an EvalDataset (or those at `indices`), predicted as evaluation
    does (no switch to slide mode); inference and legend as for predict_files. The model keeps its modes."""
    panels, test = [], {**inference["test"], "max_size": float("inf")}
    with eval_mode(model):
        for index in range(min(count, len(dataset))) if indices is None else indices:
            image, label = dataset.load(index)
            prediction, _ = predict_label(model, image, test, inference["test_scale"], inference["autocast"])
            stem = os.path.splitext(os.path.basename(dataset.items[index][0]))[0]
            panels.append((stem, panel(image[:, :, ::-1], label, prediction, *legend)))
    return panels


def palette_and_names(palette, classes, num_classes):
    """The RGB palette and class names for `num_classes` classes; classes beyond the dataset's (a model
    fine-tuned on other data) get fixed pseudo-random colours and names "class k"."""
    palette, names = [tuple(colour) for colour in palette[:num_classes]], list(classes[:num_classes])
    rng = np.random.default_rng(0)
    while len(palette) < num_classes:
        palette.append(tuple(int(value) for value in rng.integers(0, 256, 3)))
        names.append(f"class {len(names)}")
    return palette, names


class ExportGraph(torch.nn.Module):
    """What an exported file computes: uint8 N×3×H×W BGR `image` -> float32 N×K×H×W `logits` at the input size,
    exactly whole_logits (normalising, PointRend's subdivision steps included) and int64 N×H×W `label`, their argmax."""

    def __init__(self, model):
        super().__init__()
        self.model = model.eval()

    def forward(self, image):
        logits = whole_logits(self.model, image)
        return logits, logits.argmax(dim=1)


def export_onnx(model, hw, path, opset=18):
    """Write ExportGraph(model) for H×W = hw images to `path` (ONNX, dynamic batch), atomically. torch.onnx's
    dynamo exporter: the TorchScript one cannot export PSPNet's adaptive pooling to 3 and 6 bins."""
    files.optional_import("onnxscript", "onnx onnxscript onnxruntime")
    if os.path.exists(path) and not is_seg_onnx(path):
        raise UserError(f"output={path} exists and is not an ONNX file seg wrote; remove it or choose another path")
    example = torch.zeros(2, 3, *hw, dtype=torch.uint8)
    logger = logging.getLogger("torch.onnx")
    level = logger.level
    logger.setLevel(logging.ERROR)  # notes on torchvision ops seg does not use; only while exporting
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            program = torch.onnx.export(ExportGraph(model), (example,), dynamo=True, opset_version=opset,
                                        input_names=["image"], output_names=["logits", "label"],
                                        dynamic_shapes={"image": {0: torch.export.Dim("batch")}})
    finally:
        logger.setLevel(level)
    files.write_bytes_atomic(program.model_proto.SerializeToString(), path)


def is_seg_onnx(path):
    """True for an ONNX file with ExportGraph's inputs and outputs (one seg wrote, safe to replace)."""
    onnx = files.optional_import("onnx", "onnx onnxscript onnxruntime")
    try:
        graph = onnx.load(str(path), load_external_data=False).graph
    except Exception:  # noqa: BLE001 - not a readable ONNX file
        return False
    return [x.name for x in graph.input] == ["image"] and [x.name for x in graph.output] == ["logits", "label"]


@torch.no_grad()
def compare_onnx(path, model, images):
    """{"agreement": share of pixels whose labels agree, "max_difference": max |Δlogit|, "max_logit": max |logit|,
    "runtime_s", "eager_s": CPU seconds per image} between onnxruntime on `path` and eager ExportGraph(model) for
    uint8 N×3×H×W BGR `images`; times are medians of 3 one-image runs after a warm-up."""
    runtime = files.optional_import("onnxruntime", "onnxruntime")
    session = runtime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    logits, label = session.run(["logits", "label"], {"image": images.numpy()})
    eager_logits, eager_label = ExportGraph(model)(images)
    seconds = [statistics.median(dist.time_calls(run, torch.device("cpu"), 1, 3)[1]) for run in (  # after a warm-up
        lambda: session.run(["label"], {"image": images[:1].numpy()}), lambda: ExportGraph(model)(images[:1]))]
    return {"agreement": float((label == eager_label.numpy()).mean()), "runtime_s": seconds[0], "eager_s": seconds[1],
            "max_difference": float(np.abs(logits - eager_logits.numpy()).max()),
            "max_logit": float(eager_logits.abs().max())}


def export_and_check(model, hw, path, check_paths):
    """Export `model` (eval mode, on the CPU) for H×W = hw to `path`, run the file in onnxruntime on the photos at
    `check_paths` (or generated ones) and print how far it agrees with seg; UserError below 99.9% label agreement."""
    export_onnx(model, hw, path)
    photos = [transforms.resize_image(files.read_image_bgr(photo, upright=True), hw) for photo in check_paths]
    images = (torch.from_numpy(np.stack(photos)).permute(0, 3, 1, 2).contiguous() if photos else  # uint8 N×3×H×W BGR
              torch.randint(0, 256, (2, 3, *hw), dtype=torch.uint8, generator=torch.Generator().manual_seed(0)))
    check = compare_onnx(path, model, images)
    print(f"wrote {path}: image uint8 N×3×{hw[0]}×{hw[1]} BGR -> logits, label; onnxruntime vs seg on {len(images)} "
          f"images: labels agree on {100 * check['agreement']:.4f}% of pixels, max |Δlogit| "
          f"{check['max_difference']:.2e} (logits up to {check['max_logit']:.2e}); one image on this CPU "
          f"({torch.get_num_threads()} threads): onnxruntime {check['runtime_s'] * 1e3:.0f} ms, seg eager "
          f"{check['eager_s'] * 1e3:.0f} ms")
    if check["agreement"] < 0.999:
        raise UserError(f"{path}: onnxruntime's labels agree with seg's on only {100 * check['agreement']:.3f}% of "
                        f"pixels (below 99.9%); the file is not a faithful export, do not deploy it")
    return check
