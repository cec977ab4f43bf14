"""Losses shared by the trainers: a loss takes (model outputs, int64 N×H×W labels with 255 = ignored or padded) and
returns a dict of "loss*" terms whose sum is minimised.

PSPNet: mmsegmentation 0.10 `mmseg/models/decode_heads/decode_head.py` (logits resized to the label, cross-entropy
averaged over every pixel) plus 0.4 × the auxiliary FCN head's. PointRend: detectron2
`projects/PointRend/point_rend/semantic_seg.py` (coarse loss over valid pixels, point loss over valid points).
Options for imbalanced data, off by default: class weights and mmseg's OHEM pixel sampler."""
import functools
import math

import torch
import torch.nn.functional as F

from seg.files import IGNORE_INDEX
from seg.pointrend import sample_labels_nearest


def pixel_cross_entropy(logits, label, average="all", ignore_index=IGNORE_INDEX, class_weight=None, kept=None):
    """fp32 cross-entropy of N×C×H×W logits against N×H×W labels, summed over valid pixels and divided by N·H·W
    (average="all", mmsegmentation 0.10) or by the valid pixels (average="valid", detectron2; 0 if none).
    class_weight: C weights, each pixel's loss times its true class's (mmseg 0.10 `cross_entropy_loss.py`:
    F.cross_entropy(weight=..., reduction='none'), so the divisor stays a pixel count, not a sum of weights);
    kept: N×H×W 0/1 mask of the pixels that count (OHEM), the divisor unchanged (mmseg's `weight_reduce_loss`)."""
    per_pixel = F.cross_entropy(logits.float(), label, weight=class_weight, reduction="none", ignore_index=ignore_index)
    if kept is not None:
        per_pixel = per_pixel * kept
    if average == "all":
        return per_pixel.mean()
    if average == "valid":  # clamp keeps an all-ignored batch at 0/1 = 0 instead of 0/0 = NaN
        return per_pixel.sum() / (label != ignore_index).sum().clamp(min=1)
    raise ValueError(f"loss average must be 'all' or 'valid', got {average!r}")


def resize_logits(logits, size_hw):
    """Bilinear (align_corners=False) resize of N×C×h×w logits to size_hw, in fp32."""
    return F.interpolate(logits.float(), size=tuple(size_hw), mode="bilinear", align_corners=False)


def ohem_kept(logits, label, thresh, min_kept, ignore_index=IGNORE_INDEX):
    """mmseg's OHEMPixelSampler with a threshold (`mmseg/core/seg/sampler/ohem_pixel_sampler.py`): N×H×W 1.0 at the
    valid pixels whose softmax probability of their true class is below max(thresh, the probability ranked
    min(min_kept·N, valid pixels − 1) from the lowest), else 0. No gradient, no host synchronisation."""
    with torch.no_grad():
        valid = label != ignore_index
        prob = F.softmax(logits.float(), dim=1).gather(1, torch.where(valid, label, 0).unsqueeze(1)).squeeze(1)
        ranked = torch.where(valid, prob, 2.0).flatten().sort().values  # ignored pixels rank last
        rank = (valid.sum() - 1).clamp(max=min_kept * label.shape[0]).clamp(min=0)
        return (valid & (prob < ranked.gather(0, rank.view(1)).clamp(min=thresh))).float()


def enet_class_weight(pixels):
    """ENet's class weights (Paszke et al. 2016, section 5.2) from the pixels of each class: 1 / ln(1.02 + share)."""
    total = max(sum(pixels), 1)
    return [1 / math.log(1.02 + count / total) for count in pixels]


def pspnet_losses(outputs, label, average="all", aux_weight=0.4, class_weight=(), ohem=False, ohem_thresh=0.7,
                  ohem_min_kept=100000):
    """mmsegmentation's decode + 0.4·auxiliary loss, logits resized to the label size first. class_weight (C weights,
    () = none) weighs both heads; ohem keeps the decode head's hard pixels only (`ohem_kept`), as in mmseg's configs."""
    size = label.shape[-2:]
    seg = resize_logits(outputs["seg"], size)
    weight = seg.new_tensor(class_weight) if class_weight else None
    kept = ohem_kept(seg, label, ohem_thresh, ohem_min_kept) if ohem else None
    losses = {"loss_seg": pixel_cross_entropy(seg, label, average, class_weight=weight, kept=kept)}
    if "aux" in outputs:
        losses["loss_aux"] = aux_weight * pixel_cross_entropy(resize_logits(outputs["aux"], size), label, average,
                                                              class_weight=weight)
    return losses


def pointrend_losses(outputs, label):
    """detectron2's coarse loss plus the point loss. The stride-4 coarse logits are upsampled to the padded input size
    (= label size) and averaged over valid pixels. Point labels are nearest-sampled from the padded labels at the
    model's points; the point loss averages over valid points, 0 when all are ignored (detectron2 #1455 went NaN)."""
    coarse = resize_logits(outputs["coarse"], label.shape[-2:])
    point_labels = sample_labels_nearest(label, outputs["point_coords"])
    return {"loss_sem_seg": pixel_cross_entropy(coarse, label, "valid"),
            "loss_sem_seg_point": pixel_cross_entropy(outputs["point_logits"], point_labels, "valid")}


def loss_function(model_name, loss_table):
    """outputs, label -> dict of losses of `model_name`; loss_table: the config's [loss] (class_weight_rule aside)."""
    if model_name == "pspnet":
        return functools.partial(pspnet_losses, **{k: v for k, v in loss_table.items() if k != "class_weight_rule"})
    return pointrend_losses
