"""Test views, inference and the confusion matrix over a loader: one inference path serves evaluation and prediction
(seg/predict.py runs it on single photos).

Inference of one image, as both references do it. Views: the image resized by the keep-ratio rule
(`transforms.rescale_hw`) to data.test_scale times each ratio of test.scales (mmseg MultiScaleFlipAug), on the data
side. Whole mode: the model's logits resized (bilinear, align_corners=False) to the padded input and cropped to the
view (detectron2 sem_seg_postprocess). Slide mode (mmseg slide_inference): windows of test.crop_hw every
test.stride_hw, the last one per axis shifted back to end at the border, logits summed where windows overlap and
divided by the count. Each view's logits are resized to the original size: one view without flip gives the scores
(detectron2); several scales or test.flip average the softmax probabilities over views × flips (mmseg aug_test)."""
import contextlib
import itertools

import numpy as np
import torch
import torch.nn.functional as F

from seg import data, dist, transforms
from seg.losses import pixel_cross_entropy
from seg.metrics import confusion_matrix


def resize_to_scales(image, long_short, ratios):
    """One uint8 h×w×3 view per ratio: `image` with long side <= int(max(long_short)·ratio) and short side
    <= int(min(long_short)·ratio), aspect kept (mmcv.imrescale); the image itself where no resize is needed."""
    sizes = [transforms.rescale_hw(*image.shape[:2], (int(long_short[0] * ratio), int(long_short[1] * ratio)))
             for ratio in ratios]
    return [image if hw == image.shape[:2] else transforms.resize_image(image, hw) for hw in sizes]


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


def channels_last(model):
    """Whether the model's convolutions hold their weights in channels_last (NHWC) memory format (a k×k one tells)."""
    return any(p.dim() == 4 and not p.is_contiguous() and p.is_contiguous(memory_format=torch.channels_last)
               for p in model.parameters())


def whole_logits(model, image):
    """float N×C×H×W logits for a batch of uint8 N×3×H×W images that are entirely valid (no padding)."""
    count, _, height, width = image.shape
    if channels_last(model):  # the input in the convolutions' memory format, as they hold their weights
        image = image.contiguous(memory_format=torch.channels_last)
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
    """Scores 1×C×h×w at the original size out_hw = (h, w) from the views of one image: image uint8 V×3×H×W, the
    views padded (stack_views); hw: V×2 valid sizes, read on the host (pass the loader's CPU tensor: a device tensor
    would cost a sync per image); test: the [test] table. One view without flip: its logits; otherwise softmax
    probabilities averaged over views × flips (flipped logits mirrored back first)."""
    def view_logits(view):
        if test["mode"] == "slide":
            return slide_logits(model, view, test["crop_hw"], test["stride_hw"])
        return whole_logits(model, view)
    flips = (False, True) if test["flip"] else (False,)
    sizes, total = hw.tolist(), None
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


def host_and_device_batches(loader, torch_device):
    """(batch as the loader made it, its device copy) pairs; batch k+1 is copied while the caller computes on batch
    k (data.prefetch), and sizes are read from the host batch, not from the device."""
    host, to_copy = itertools.tee(loader)
    return zip(host, data.prefetch(to_copy, torch_device))


@contextlib.contextmanager
def eval_mode(model):
    """The model in eval mode inside; after, every module back in the mode it had (norm_eval's BN layers: eval)."""
    modes = [(module, module.training) for module in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for module, training in modes:
            module.training = training


@torch.no_grad()
def confusion_over(model, loader, torch_device, num_classes, autocast, test, progress=None, per_image=None):
    """Dataset-level confusion matrix, summed over this rank's images and then over all ranks. Nothing is read back
    from the device per image, so the device runs ahead of Python and the loader. progress(images done). per_image =
    (dataset size, the dataset index of each loader batch) also returns {"per_image": int64 images×2×C
    (intersection, union) of every image, "val_loss": the pixel cross-entropy over every valid pixel, a scalar, or
    None}, on the device; val_loss only in whole mode at one scale without flip, where the scores are the logits."""
    matrix = torch.zeros(num_classes, num_classes, dtype=torch.int64, device=torch_device)
    counts = torch.zeros(per_image[0] if per_image else 0, 2, num_classes, dtype=torch.int64, device=torch_device)
    loss_sum = torch.zeros((), device=torch_device)
    logits = test["mode"] == "whole" and len(test["scales"]) == 1 and not test["flip"]
    with eval_mode(model):
        for done, (host, batch) in enumerate(host_and_device_batches(loader, torch_device), 1):
            with autocast():
                scores = test_time_scores(model, batch["image"], host["hw"], host["label"].shape[-2:], test)
            image_matrix = confusion_matrix(scores.argmax(dim=1), batch["label"], num_classes)
            matrix += image_matrix
            if per_image:  # a row filled by index on the device: nothing is read back until the end
                both = image_matrix.diag()
                counts[per_image[1][done - 1]] = torch.stack([both, image_matrix.sum(0) + image_matrix.sum(1) - both])
                if logits:  # "all" = the valid pixels' sum over all pixels: times the (host) pixel count
                    loss_sum += pixel_cross_entropy(scores, batch["label"].long()) * batch["label"].numel()
            if progress:
                progress(done)
    matrix = dist.all_reduce_sum(matrix)
    if not per_image:
        return matrix
    loss = dist.all_reduce_sum(loss_sum) / matrix.sum().clamp(min=1) if logits else None
    return matrix, {"per_image": dist.all_reduce_sum(counts), "val_loss": loss}
