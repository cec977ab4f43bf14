"""Inference and evaluation: one inference path serves the evaluate task, evaluation during training and
the predict task (seg/predict.py).

Inference of one image, as both references do it:
- Views: on the data side (loader workers), the image is resized with the keep-ratio rule of
  `transforms.rescale_hw` to data.test_scale times each ratio in test.scales (mmseg's MultiScaleFlipAug:
  int(long * ratio), int(short * ratio)). One ratio, 1.0, is plain single-scale testing.
- Whole mode: the model runs on the view; its logits are resized (bilinear, align_corners=False) to the
  padded input size and cropped to the valid view (detectron2's sem_seg_postprocess; mmseg pads nothing).
- Slide mode (mmseg slide_inference): windows of test.crop_hw every test.stride_hw, the last one on each
  axis shifted back to end at the border; each window's logits (as in whole mode), summed where windows
  overlap and divided by the number of windows covering each pixel.
- The view's logits are resized to the original size. With one view and no flip they are the scores
  (their argmax is the prediction, as in detectron2). With several scales or test.flip (predict the
  mirrored view, mirror its logits back), the scores are the mean of the softmax probabilities at the
  original size over scales × flips (mmseg's aug_test).
"""
import functools
import io
import itertools
import json
import os

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from seg import amp, data, dist, files, metrics, models, transforms
from seg.files import UserError

TEST_MODES = ("whole", "slide")


# ------------------------------------------------------------------------------- views (data side)

def check_test_options(test):
    """Raise a UserError naming the key when a [test] option cannot work."""
    if test["mode"] not in TEST_MODES:
        raise UserError(f"test.mode = {test['mode']!r}: use \"whole\" or \"slide\"")
    for key in ("crop_hw", "stride_hw"):
        value = test[key]
        if len(value) != 2 or not all(isinstance(v, int) and v > 0 for v in value):
            raise UserError(f"test.{key} = {value}: expected two positive integers [height, width]")
    if any(stride > crop for stride, crop in zip(test["stride_hw"], test["crop_hw"])):
        raise UserError(f"test.stride_hw = {test['stride_hw']} is larger than test.crop_hw = {test['crop_hw']}: "
                        f"the windows would leave gaps; use a stride no larger than the crop")
    if not test["scales"] or not all(isinstance(r, (int, float)) and r > 0 for r in test["scales"]):
        raise UserError(f"test.scales = {test['scales']}: expected positive ratios of data.test_scale, "
                        f"e.g. [1.0] or [0.5, 0.75, 1.0, 1.25, 1.5, 1.75]")


def resize_to_scales(image, long_short, ratios):
    """One view per ratio: H×W×3 uint8 `image` resized so that its long side is at most
    int(max(long_short)·ratio) and its short side at most int(min(long_short)·ratio), keeping its aspect
    ratio (mmcv.imrescale). Returns a list of uint8 h×w×3 arrays (the image itself when no resize is needed)."""
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
        pixels = torch.from_numpy(np.ascontiguousarray(view)).permute(2, 0, 1)
        image[index, :, : view.shape[0], : view.shape[1]] = pixels
    return image, torch.tensor([view.shape[:2] for view in views], dtype=torch.int64)


def collate_views(samples):
    """A batch of one EvalDataset sample (views, label): {"image": V×3×H×W, "hw": V×2, "label": 1×h×w uint8}
    (metrics.confusion_matrix widens labels on the device: 8× fewer bytes to copy than int64)."""
    (views, label), = samples
    image, hw = stack_views(views)
    return {"image": image, "hw": hw, "label": torch.tensor(label)[None]}  # a copy: labels may be read-only


# ------------------------------------------------------------------------------------------- inference

def whole_logits(model, image):
    """float N×C×H×W logits for a batch of uint8 N×3×H×W images that are entirely valid (no padding)."""
    count, _, height, width = image.shape
    hw = full_sizes(count, height, width, image.device)
    logits = model(image, hw)["seg"].float()
    divisor = model.size_divisibility
    padded_hw = (-(-height // divisor) * divisor, -(-width // divisor) * divisor)
    if tuple(logits.shape[-2:]) != padded_hw:
        logits = F.interpolate(logits, size=padded_hw, mode="bilinear", align_corners=False)
    return logits[:, :, :height, :width]


def full_sizes(count, height, width, device):
    """int64 count×2 valid sizes, all (height, width), made on `device` by fill kernels: torch.tensor(...,
    device=device) would copy from pageable host memory, which synchronises with the device."""
    sizes = torch.full((count, 2), height, dtype=torch.int64, device=device)
    sizes[:, 1] = width
    return sizes


def window_starts(size, crop, stride):
    """Start offsets of the sliding windows along an axis of `size` pixels: every `stride`, as many as
    needed to reach the end (max(size - crop + stride - 1, 0) // stride + 1), each window shifted back so
    that it ends inside the image; windows are min(crop, size) long."""
    count = max(size - crop + stride - 1, 0) // stride + 1
    return [max(min(index * stride + crop, size) - crop, 0) for index in range(count)]


def slide_logits(model, image, crop_hw, stride_hw, windows_per_batch=4):
    """float 1×C×H×W logits for an entirely valid uint8 1×3×H×W image: the whole-mode logits of every
    window, summed where windows overlap and divided by the number of windows covering each pixel.
    Windows all have one size, so they run `windows_per_batch` at a time."""
    height, width = image.shape[-2:]
    crop_h, crop_w = min(crop_hw[0], height), min(crop_hw[1], width)
    corners = [(top, left) for top in window_starts(height, crop_hw[0], stride_hw[0])
               for left in window_starts(width, crop_hw[1], stride_hw[1])]
    total, count = None, torch.zeros(height, width, device=image.device)
    for first in range(0, len(corners), windows_per_batch):
        group = corners[first: first + windows_per_batch]
        windows = torch.cat([image[:, :, top: top + crop_h, left: left + crop_w] for top, left in group])
        logits = whole_logits(model, windows)
        if total is None:
            total = logits.new_zeros(1, logits.shape[1], height, width)
        for (top, left), window in zip(group, logits):
            total[0, :, top: top + crop_h, left: left + crop_w] += window
            count[top: top + crop_h, left: left + crop_w] += 1
    return total / count


def view_logits(model, image, test):
    """float 1×C×H×W logits of one entirely valid uint8 1×3×H×W view, in test["mode"]."""
    if test["mode"] == "slide":
        return slide_logits(model, image, test["crop_hw"], test["stride_hw"])
    return whole_logits(model, image)


def test_time_scores(model, image, hw, out_hw, test):
    """Scores 1×C×h×w at the original size out_hw = (h, w) from the views of one image.

    image: uint8 V×3×H×W, the image resized to each test scale, padded (stack_views); hw: V×2 valid sizes,
    read on the host, so pass the loader's CPU tensor: a device tensor would cost a sync per image.
    test: the [test] table (mode, crop_hw, stride_hw, flip). One view without flip: its logits. Otherwise
    the softmax probabilities averaged over views × flips, each flipped view's logits mirrored back first.
    """
    flips = (False, True) if test["flip"] else (False,)
    sizes = hw.tolist()
    total = None
    for view, (height, width) in zip(image, sizes):
        view = view[None, :, :height, :width]
        for flip in flips:
            logits = view_logits(model, view.flip(-1), test).flip(-1) if flip else view_logits(model, view, test)
            logits = F.interpolate(logits, size=tuple(out_hw), mode="bilinear", align_corners=False)
            if len(sizes) * len(flips) == 1:
                return logits
            probabilities = logits.softmax(dim=1)
            total = probabilities if total is None else total + probabilities
    return total / (len(sizes) * len(flips))


# ------------------------------------------------------------------------------------------ evaluation

def host_and_device_batches(loader, torch_device):
    """(batch as the loader made it, its copy on the device) pairs, in loader order; batch k+1 is copied
    while the caller computes on batch k (data.prefetch). The host batch lets the caller read sizes without
    reading the device back. An empty loader gives no pairs."""
    host, to_copy = itertools.tee(loader)
    return zip(host, data.prefetch(to_copy, torch_device))


@torch.no_grad()
def confusion_over(model, loader, torch_device, num_classes, amp_mode, test):
    """Dataset-level confusion matrix, summed over this rank's images and then over all ranks.

    Nothing is read back from the device per image (sizes come from the host batch, the matrix stays on
    the device), so the device runs ahead of Python and the loader, not in lockstep with them.
    """
    model.eval()
    matrix = torch.zeros(num_classes, num_classes, dtype=torch.int64, device=torch_device)
    for host, batch in host_and_device_batches(loader, torch_device):
        with amp.autocast_context(torch_device.type, amp_mode):
            scores = test_time_scores(model, batch["image"], host["hw"], host["label"].shape[-2:], test)
        matrix += metrics.confusion_matrix(scores.argmax(dim=1), batch["label"], num_classes)
    return dist.all_reduce_sum(matrix)


def eval_dataset(config):
    """The val split as an EvalDataset whose samples are (views, original-size label)."""
    items, info, reader = data.split_items(config, "val_splits")
    resize = functools.partial(resize_to_scales, long_short=tuple(config["data"]["test_scale"]),
                               ratios=tuple(config["test"]["scales"]))
    return data.EvalDataset(items, resize, config["model"]["num_classes"], info["hint"], reader), info


def evaluate_and_report(config, model, torch_device, rank, world_size, iteration=None):
    """Evaluate on the val split; rank 0 prints the table and writes eval.json. Returns the metrics."""
    check_test_options(config["test"])
    dataset, info = eval_dataset(config)
    loader = data.eval_loader(dataset, rank, world_size, config["data"]["workers"], torch_device.type != "cpu",
                              collate_views)
    matrix = confusion_over(model, loader, torch_device, config["model"]["num_classes"], config["amp"],
                            config["test"])
    result = metrics.metrics_from_confusion(matrix)
    if rank == 0:
        where = f" at iteration {iteration}" if iteration else ""
        print(f"evaluation on {len(dataset)} images{where}:\n{metrics.format_table(result, info['classes'])}",
              flush=True)
        record = {"iteration": iteration, "test": config["test"], "classes": info["classes"], **result}
        files.write_text_atomic(json.dumps(record, indent=1), os.path.join(config["output_dir"], "eval.json"))
        with open(os.path.join(config["output_dir"], "metrics.jsonl"), "a") as handle:
            handle.write(json.dumps({"iteration": iteration, "aAcc": result["aAcc"], "mIoU": result["mIoU"],
                                     "mAcc": result["mAcc"]}) + "\n")
    return result


def evaluate(config):
    """The evaluate task: load `weights`, score the val split."""
    from seg import train

    if not config["weights"]:
        raise UserError(f"[{config['section']}] needs weights=PATH (a seg, mmsegmentation or detectron2 checkpoint)")
    check_test_options(config["test"])
    torch_device, rank, world_size = train.setup_run(config)
    model = models.build(config["model"]).to(torch_device)
    models.load_initial_weights(model, config, log=print if rank == 0 else (lambda *a: None))
    result = evaluate_and_report(config, model, torch_device, rank, world_size)
    if rank == 0 and config["save_predictions"] > 0:
        save_predictions(config, model, torch_device)
    dist.cleanup()
    return result


# -------------------------------------------------------------------------------------------- pictures

def colorize(label, palette):
    """H×W class indices -> H×W×3 uint8 RGB; 255 (ignore) and indices beyond the palette are drawn white."""
    table = np.full((256, 3), 255, np.uint8)
    table[: len(palette)] = np.asarray(palette, np.uint8)[:256]
    return table[label]


@torch.no_grad()
def save_predictions(config, model, torch_device):
    """Write <output_dir>/predictions/<stem>.png: input | ground truth | prediction, colour-coded, for the
    first `save_predictions` val images, predicted as evaluation does (test scales, flip, mode)."""
    dataset, info = eval_dataset(config)
    folder = os.path.join(config["output_dir"], "predictions")
    model.eval()
    count = min(config["save_predictions"], len(dataset))
    for index in range(count):
        host = collate_views([dataset[index]])
        batch = data.to_device(host, torch_device)
        label = host["label"][0].numpy()
        with amp.autocast_context(torch_device.type, config["amp"]):
            scores = test_time_scores(model, batch["image"], host["hw"], label.shape, config["test"])
        pred = scores.argmax(dim=1)[0].cpu().numpy().astype(np.uint8)
        image_path = dataset.items[index][0]
        photo = files.read_image_bgr(image_path)[:, :, ::-1]
        panel = np.concatenate([photo, colorize(label, info["palette"]), colorize(pred, info["palette"])], axis=1)
        stem = os.path.splitext(os.path.basename(image_path))[0]
        files.write_bytes_atomic(image_bytes(Image.fromarray(panel), "PNG"), os.path.join(folder, f"{stem}.png"))
    print(f"wrote {count} colour-coded predictions to {folder}")


def image_bytes(image, image_format, **options):
    """A Pillow image encoded in memory (then written atomically by files.write_bytes_atomic)."""
    buffer = io.BytesIO()
    image.save(buffer, format=image_format, **options)
    return buffer.getvalue()
