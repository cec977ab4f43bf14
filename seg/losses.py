"""Losses for both models, as functions of (model outputs, labels).

Labels are int64 N×H×W with 255 for ignored and padded pixels. Every function returns a dict of scalar
tensors whose keys start with "loss"; the trainer sums them.
"""
import torch.nn.functional as F

IGNORE_INDEX = 255


def pixel_cross_entropy(logits, label, average="all", ignore_index=IGNORE_INDEX):
    """Cross-entropy of N×C×H×W logits against N×H×W labels, computed in fp32.

    average="all": sum over valid pixels divided by N·H·W, ignored pixels included in the count
    (mmsegmentation 0.10). average="valid": divided by the number of valid pixels (detectron2,
    nn.CrossEntropyLoss); 0, not NaN, when every pixel is ignored.
    """
    per_pixel = F.cross_entropy(logits.float(), label, reduction="none", ignore_index=ignore_index)
    if average == "all":
        return per_pixel.mean()
    if average == "valid":
        # clamp keeps an all-ignored batch at 0/1 = 0 instead of 0/0 = NaN
        valid = (label != ignore_index).sum().clamp(min=1)
        return per_pixel.sum() / valid
    raise ValueError(f"loss average must be 'all' or 'valid', got {average!r}")


def resize_logits(logits, size_hw):
    """Bilinear (align_corners=False) resize of N×C×h×w logits to size_hw, in fp32."""
    return F.interpolate(logits.float(), size=tuple(size_hw), mode="bilinear", align_corners=False)


def pspnet_losses(outputs, label, average="all", aux_weight=0.4):
    """mmsegmentation's decode + 0.4·auxiliary loss: logits are resized to the label size first."""
    size = label.shape[-2:]
    losses = {"loss_seg": pixel_cross_entropy(resize_logits(outputs["seg"], size), label, average)}
    if "aux" in outputs:
        aux = pixel_cross_entropy(resize_logits(outputs["aux"], size), label, average)
        losses["loss_aux"] = aux_weight * aux
    return losses


def pointrend_losses(outputs, label):
    """detectron2's coarse loss plus the point loss.

    The stride-4 coarse logits are upsampled to the padded input size (= label size) and averaged over
    valid pixels. Point labels are nearest-sampled from the full-resolution padded labels at the points
    the model used; the point loss is averaged over valid points and is 0 when all are ignored
    (detectron2 issue #1455 went NaN there).
    """
    from seg.pointrend import sample_labels_nearest

    coarse = resize_logits(outputs["coarse"], label.shape[-2:])
    point_labels = sample_labels_nearest(label, outputs["point_coords"])
    return {
        "loss_sem_seg": pixel_cross_entropy(coarse, label, "valid"),
        "loss_sem_seg_point": pixel_cross_entropy(outputs["point_logits"], point_labels, "valid"),
    }
