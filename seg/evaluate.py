"""Inference, metrics and prediction pictures: one inference path serves evaluation and prediction.

Inference of one image, as both references do it. Views: the image resized by the keep-ratio rule
(`transforms.rescale_hw`) to data.test_scale times each ratio of test.scales (mmseg MultiScaleFlipAug), on the data
side. Whole mode: the model's logits resized (bilinear, align_corners=False) to the padded input and cropped to the
view (detectron2 sem_seg_postprocess). Slide mode (mmseg slide_inference): windows of test.crop_hw every
test.stride_hw, the last one per axis shifted back to end at the border, logits summed where windows overlap and
divided by the count. Each view's logits are resized to the original size: one view without flip gives the scores
(detectron2); several scales or test.flip average the softmax probabilities over views × flips (mmseg aug_test).

Metrics come from a dataset-level confusion matrix (rows truth, columns prediction) accumulated on the device
without per-image host reads, then all-reduced; no prediction maps are kept.
"""
import contextlib
import importlib
import io
import itertools
import logging
import os
import statistics
import time
import warnings

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFont

from seg import data, dist, files, transforms
from seg.files import IGNORE_INDEX, UserError

OVERLAY_QUALITY = 95  # with 4:4:4 chroma, so thin class borders keep their colour


# ------------------------------------------------------------------------------- views (data side)

def resize_to_scales(image, long_short, ratios):
    """One uint8 h×w×3 view per ratio: `image` with long side <= int(max(long_short)·ratio) and short side
    <= int(min(long_short)·ratio), aspect kept (mmcv.imrescale); the image itself where no resize is needed."""
    views = []
    for ratio in ratios:
        scaled = (int(long_short[0] * ratio), int(long_short[1] * ratio))
        height, width = transforms.rescale_hw(image.shape[0], image.shape[1], scaled)
        views.append(image if (height, width) == image.shape[:2] else transforms.resize_image(image, (height, width)))
    return views


def stack_views(views):
    """[h_v×w_v×3 uint8] -> (uint8 V×3×H×W zero-padded bottom/right to the largest view, int64 V×2 sizes)."""
    height, width = max(view.shape[0] for view in views), max(view.shape[1] for view in views)
    image = torch.zeros(len(views), 3, height, width, dtype=torch.uint8)
    for index, view in enumerate(views):
        pixels = torch.from_numpy(np.ascontiguousarray(view))  # views may have reversed strides, from_numpy refuses
        image[index, :, : view.shape[0], : view.shape[1]] = pixels.permute(2, 0, 1)
    return image, torch.tensor([view.shape[:2] for view in views], dtype=torch.int64)


def collate_views(samples):
    """A batch of one EvalDataset sample (views, label): {"image": V×3×H×W, "hw": V×2, "label": 1×h×w uint8}
    (confusion_matrix widens labels on the device: 8× fewer bytes to copy than int64)."""
    (views, label), = samples
    image, hw = stack_views(views)
    return {"image": image, "hw": hw, "label": torch.tensor(label)[None]}  # a copy: labels may be read-only


# ------------------------------------------------------------------------------------------- inference

def whole_logits(model, image):
    """float N×C×H×W logits for a batch of uint8 N×3×H×W images that are entirely valid (no padding)."""
    count, _, height, width = image.shape
    # sizes made on the device by fill kernels: torch.tensor(..., device=) would copy from pageable memory (a sync)
    hw = torch.full((count, 2), height, dtype=torch.int64, device=image.device)
    hw[:, 1] = width
    logits = model(image, hw)["seg"].float()
    padded_hw = (data.pad_to(height, model.size_divisibility), data.pad_to(width, model.size_divisibility))
    if tuple(logits.shape[-2:]) != padded_hw:
        logits = F.interpolate(logits, size=padded_hw, mode="bilinear", align_corners=False)
    return logits[:, :, :height, :width]


def window_starts(size, crop, stride):
    """Window starts along an axis of `size` pixels: every `stride`, max(size - crop + stride - 1, 0) // stride + 1
    of them, each shifted back to end inside the image; windows are min(crop, size) long."""
    count = max(size - crop + stride - 1, 0) // stride + 1
    return [max(min(index * stride + crop, size) - crop, 0) for index in range(count)]


def slide_logits(model, image, crop_hw, stride_hw, windows_per_batch=4):
    """float 1×C×H×W logits of an entirely valid uint8 1×3×H×W image: every window's whole-mode logits, summed
    where windows overlap and divided by their count; windows run `windows_per_batch` at a time."""
    height, width = image.shape[-2:]
    crop_h, crop_w = min(crop_hw[0], height), min(crop_hw[1], width)
    corners = [(top, left) for top in window_starts(height, crop_hw[0], stride_hw[0])
               for left in window_starts(width, crop_hw[1], stride_hw[1])]
    total, count = None, torch.zeros(height, width, device=image.device)
    for first in range(0, len(corners), windows_per_batch):
        group = corners[first: first + windows_per_batch]
        logits = whole_logits(model, torch.cat([image[:, :, top: top + crop_h, left: left + crop_w]
                                                for top, left in group]))
        if total is None:
            total = logits.new_zeros(1, logits.shape[1], height, width)
        for (top, left), window in zip(group, logits):
            total[0, :, top: top + crop_h, left: left + crop_w] += window
            count[top: top + crop_h, left: left + crop_w] += 1
    return total / count


def test_time_scores(model, image, hw, out_hw, test):
    """Scores 1×C×h×w at the original size out_hw = (h, w) from the views of one image.

    image: uint8 V×3×H×W, the views padded (stack_views); hw: V×2 valid sizes, read on the host (pass the
    loader's CPU tensor: a device tensor would cost a sync per image); test: the [test] table. One view without flip:
    its logits; otherwise softmax probabilities averaged over views × flips (flipped logits mirrored back first).
    """
    def view_logits(view):
        if test["mode"] == "slide":
            return slide_logits(model, view, test["crop_hw"], test["stride_hw"])
        return whole_logits(model, view)
    flips = (False, True) if test["flip"] else (False,)
    sizes = hw.tolist()
    total = None
    for view, (height, width) in zip(image, sizes):
        view = view[None, :, :height, :width]
        for flip in flips:
            logits = view_logits(view.flip(-1)).flip(-1) if flip else view_logits(view)
            logits = F.interpolate(logits, size=tuple(out_hw), mode="bilinear", align_corners=False)
            if len(sizes) * len(flips) == 1:
                return logits
            probabilities = logits.softmax(dim=1)
            total = probabilities if total is None else total + probabilities
    return total / (len(sizes) * len(flips))


@torch.no_grad()
def predict_label(model, image_bgr, test, test_scale, autocast):
    """uint8 H×W class indices for a uint8 H×W×3 BGR image, and whether it ran in slide mode: views whose long
    side exceeds test["max_size"] switch a whole-mode image to slide mode (bounds device memory). `model` must be
    in eval mode; autocast() gives the precision context."""
    views = resize_to_scales(image_bgr, test_scale, test["scales"])
    slide = test["mode"] == "whole" and max(max(view.shape[:2]) for view in views) > test["max_size"]
    image, hw = stack_views(views)
    with autocast():
        scores = test_time_scores(model, image.to(model.pixel_mean.device), hw, image_bgr.shape[:2],
                                  {**test, "mode": "slide"} if slide else test)
    return scores.argmax(dim=1)[0].to(torch.uint8).cpu().numpy(), slide


# ------------------------------------------------------------------------------------------- metrics

def confusion_matrix(pred, label, num_classes, ignore_index=IGNORE_INDEX):
    """num_classes×num_classes int64 counts of (label, pred) pairs over pixels whose label is valid.

    pred, label: integer tensors of the same shape, on the same device. Labels outside [0, num_classes) other
    than ignore_index are rejected by the data loader, not here (a check would read the labels back).
    No host synchronisation: ignored pixels are not removed (label[valid] would read the number of valid
    pixels back to size its result) but routed to one extra bin, num_classes², that is dropped at the end.
    """
    extra = num_classes * num_classes
    index = torch.where(label != ignore_index, label.long() * num_classes + pred.long(), extra).reshape(-1)
    if index.device.type == "npu":
        # spec npu.md §5 lists torch_npu's scatter for fp16/fp32 only and its bincount for uint8..int64; with
        # every value below minlength the result has extra + 1 bins
        counts = torch.bincount(index, minlength=extra + 1)
    else:
        # torch.bincount on CUDA reads max(index) back to size its output (a sync per call); adding ones into a
        # tensor whose size is known up front needs nothing from the device
        counts = torch.zeros(extra + 1, dtype=torch.int64, device=index.device).index_add_(
            0, index, index.new_ones(1).expand(index.numel()))
    return counts[:extra].reshape(num_classes, num_classes)


def metrics_from_confusion(matrix):
    """aAcc, mIoU, mAcc and per-class IoU / Acc as fractions; a class absent from the truth has Acc NaN (and IoU NaN
    if never predicted either); means skip NaN classes, as mmsegmentation's np.nanmean."""
    matrix = matrix.double().cpu()
    intersection, label_area = matrix.diag(), matrix.sum(dim=1)
    iou = intersection / (label_area + matrix.sum(dim=0) - intersection)  # 0/0 -> NaN, as in mmsegmentation
    acc = intersection / label_area
    return {"aAcc": (intersection.sum() / label_area.sum()).item(), "mIoU": torch.nanmean(iou).item(),
            "mAcc": torch.nanmean(acc).item(), "IoU": iou.tolist(), "Acc": acc.tolist()}


def format_table(metrics, class_names):
    """The per-class IoU/Acc table and the summary line, in percent with 2 decimals."""
    def percent(value):
        return "nan" if value != value else f"{100 * value:.2f}"
    width = max(len(name) for name in class_names)
    lines = [f"{'class':<{width}}  {'IoU':>6}  {'Acc':>6}"]
    for name, iou, acc in zip(class_names, metrics["IoU"], metrics["Acc"]):
        lines.append(f"{name:<{width}}  {percent(iou):>6}  {percent(acc):>6}")
    lines.append(f"aAcc {percent(metrics['aAcc'])}  mIoU {percent(metrics['mIoU'])}  mAcc {percent(metrics['mAcc'])}")
    return "\n".join(lines)


def host_and_device_batches(loader, torch_device):
    """(batch as the loader made it, its device copy) pairs; batch k+1 is copied while the caller computes on batch
    k (data.prefetch), and sizes are read from the host batch, not from the device."""
    host, to_copy = itertools.tee(loader)
    return zip(host, data.prefetch(to_copy, torch_device))


@torch.no_grad()
def confusion_over(model, loader, torch_device, num_classes, autocast, test, progress=None):
    """Dataset-level confusion matrix, summed over this rank's images and then over all ranks. Nothing is read
    back from the device per image, so the device runs ahead of Python and the loader. progress(images done)."""
    model.eval()
    matrix = torch.zeros(num_classes, num_classes, dtype=torch.int64, device=torch_device)
    for done, (host, batch) in enumerate(host_and_device_batches(loader, torch_device), 1):
        with autocast():
            scores = test_time_scores(model, batch["image"], host["hw"], host["label"].shape[-2:], test)
        matrix += confusion_matrix(scores.argmax(dim=1), batch["label"], num_classes)
        if progress:
            progress(done)
    return dist.all_reduce_sum(matrix)


def progress_lines(total, every, log):
    """progress(done): every `every` images, a line with the count, images/s and ETA (host time: the device may
    still be working on the last ones)."""
    start = time.perf_counter()

    def progress(done):
        if done % every == 0 and done < total:
            rate = done / (time.perf_counter() - start)
            log(f"evaluating: {done}/{total} images, {rate:.1f} images/s, ETA {(total - done) / rate:.0f} s",
                flush=True)
    return progress


# -------------------------------------------------------------------------------------------- pictures

def colorize(label, palette):
    """H×W class indices -> H×W×3 uint8 RGB; 255 (ignore) and indices beyond the palette are drawn white."""
    table = np.full((256, 3), 255, np.uint8)
    table[: len(palette)] = np.asarray(palette, np.uint8)[:256]
    return table[label]


def draw_legend(image, classes, palette, names):
    """Draw a white box listing `classes` (swatch and name) at the top left of a Pillow RGB image, in Pillow's
    default font scaled to the image. Returns the box (left, top, right, bottom), inclusive."""
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
    colours = colorize(label, palette)
    image = Image.fromarray(((photo.astype(np.uint16) + colours + 1) // 2).astype(np.uint8))
    return image, draw_legend(image, np.unique(label).tolist(), palette, names)


def label_png(label, palette):
    """PNG bytes of a uint8 H×W label map as an indexed image: pixel = class index, `palette` for display."""
    image = Image.fromarray(label)
    image.putpalette([value for colour in palette for value in colour])  # "L" becomes "P", indices kept
    return files.image_bytes(image, "PNG")


def write_prediction(folder, stem, photo, label, palette, names):
    """FOLDER/<stem>.png (indexed label map) and FOLDER/<stem>_overlay.jpg (RGB `photo`), each atomically."""
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
    present = [k for k in np.union1d(np.unique(label), np.unique(prediction)).tolist() if k < len(names)]
    if present:
        draw_legend(image, present, palette, names)
    return np.asarray(image)


@torch.no_grad()
def prediction_panels(model, dataset, count, palette, names, test, test_scale, autocast):
    """[(stem, panel)] of the first `count` samples of an EvalDataset, predicted as evaluation does (any size:
    no switch to slide mode)."""
    model.eval()
    panels = []
    for index in range(min(count, len(dataset))):
        image, label = dataset.load(index)
        prediction, _ = predict_label(model, image, {**test, "max_size": float("inf")}, test_scale, autocast)
        stem = os.path.splitext(os.path.basename(dataset.items[index][0]))[0]
        panels.append((stem, panel(image[:, :, ::-1], label, prediction, palette, names)))
    return panels


def write_png(path, picture):
    """An RGB uint8 H×W×3 picture as a PNG, written atomically."""
    files.write_bytes_atomic(files.image_bytes(Image.fromarray(picture), "PNG"), path)


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
    """What an exported file computes: uint8 N×3×H×W BGR `image` (normalised inside the model) -> float32 N×K×H×W
    `logits` at the input size, exactly whole_logits (PointRend's subdivision steps included), and int64 N×H×W
    `label`, their argmax."""

    def __init__(self, model):
        super().__init__()
        self.model = model.eval()

    def forward(self, image):
        logits = whole_logits(self.model, image)
        return logits, logits.argmax(dim=1)


def optional_import(name, pip):
    """Import an optional dependency, or UserError naming the pip command that installs it."""
    try:
        return importlib.import_module(name)
    except ImportError:
        raise UserError(f"this needs the optional package {name}: pip install {pip}") from None


def export_onnx(model, hw, path, opset=18):
    """Write ExportGraph(model) for H×W = hw images to `path` (ONNX, dynamic batch), atomically. torch.onnx's
    dynamo exporter: the TorchScript one cannot export PSPNet's adaptive pooling to 3 and 6 bins."""
    optional_import("onnxscript", "onnx onnxscript onnxruntime")
    if os.path.exists(path) and not is_seg_onnx(path):
        raise UserError(f"output={path} exists and is not an ONNX file seg wrote; remove it or choose another path")
    example = torch.zeros(2, 3, *hw, dtype=torch.uint8)
    logging.getLogger("torch.onnx").setLevel(logging.ERROR)  # notes on torchvision ops seg does not use
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        program = torch.onnx.export(ExportGraph(model), (example,), dynamo=True, opset_version=opset,
                                    input_names=["image"], output_names=["logits", "label"],
                                    dynamic_shapes={"image": {0: torch.export.Dim("batch")}})
    files.write_bytes_atomic(program.model_proto.SerializeToString(), path)


def is_seg_onnx(path):
    """True for an ONNX file with ExportGraph's inputs and outputs (one seg wrote, safe to replace)."""
    onnx = optional_import("onnx", "onnx onnxscript onnxruntime")
    try:
        graph = onnx.load(str(path), load_external_data=False).graph
    except Exception:  # noqa: BLE001 - not a readable ONNX file
        return False
    return [x.name for x in graph.input] == ["image"] and [x.name for x in graph.output] == ["logits", "label"]


def export_check_images(paths, hw):
    """uint8 N×3×H×W BGR images to check an export on: the photos at `paths` resized to hw, or two generated ones."""
    if not paths:
        return torch.randint(0, 256, (2, 3, *hw), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    photos = [transforms.resize_image(files.read_image_bgr(path, upright=True), hw) for path in paths]
    return torch.from_numpy(np.stack(photos)).permute(0, 3, 1, 2).contiguous()


@torch.no_grad()
def compare_onnx(path, model, images):
    """{"agreement": share of pixels whose labels agree, "max_difference": max |Δlogit|, "max_logit": max |logit|,
    "runtime_s", "eager_s": CPU seconds per image} between onnxruntime on `path` and eager ExportGraph(model) for
    uint8 N×3×H×W BGR `images`; times are medians of 3 one-image runs after a warm-up."""
    runtime = optional_import("onnxruntime", "onnxruntime")
    session = runtime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    logits, label = session.run(["logits", "label"], {"image": images.numpy()})
    eager_logits, eager_label = ExportGraph(model)(images)
    seconds = []
    for run in (lambda: session.run(["label"], {"image": images[:1].numpy()}), lambda: ExportGraph(model)(images[:1])):
        times = []
        for _ in range(4):  # the first is a warm-up
            start = time.perf_counter()
            run()
            times.append(time.perf_counter() - start)
        seconds.append(statistics.median(times[1:]))
    return {"agreement": float((label == eager_label.numpy()).mean()), "runtime_s": seconds[0], "eager_s": seconds[1],
            "max_difference": float(np.abs(logits - eager_logits.numpy()).max()),
            "max_logit": float(eager_logits.abs().max())}
