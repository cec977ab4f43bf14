"""Segmentation metrics from a dataset-level confusion matrix (mmsegmentation §6 / Cityscapes IoU).

The matrix is accumulated on the device (a fixed-size index_add_, or torch.bincount on Ascend NPUs) without
reading anything back to the host, and all-reduced across ranks; no prediction maps are kept. Rows are ground
truth, columns are predictions.
"""
import math

import torch


def confusion_matrix(pred, label, num_classes, ignore_index=255):
    """num_classes×num_classes int64 counts of (label, pred) pairs over pixels whose label is valid.

    pred, label: integer tensors of the same shape, on the same device. Labels outside
    [0, num_classes) other than ignore_index are a caller bug and are rejected by the data loader; they are
    not checked here, because a check would read the labels back to the host.

    No host synchronisation: ignored pixels are not removed (label[valid] would read the number of valid
    pixels back to size its result) but routed to one extra bin, num_classes², that is dropped at the end.
    """
    extra = num_classes * num_classes
    index = torch.where(label != ignore_index, label.long() * num_classes + pred.long(), extra).reshape(-1)
    return _count_bins(index, extra + 1)[:extra].reshape(num_classes, num_classes)


def _count_bins(index, size):
    """int64 counts of each value of a 1-D int64 `index` whose values all lie in [0, size): `size` bins."""
    if index.device.type == "npu":
        # spec npu.md §5 lists torch_npu's scatter for fp16/fp32 only (int64 counts would be unsupported or run
        # on the slow AI CPU) and its bincount for uint8..int64; with every value below minlength, `size` bins.
        return torch.bincount(index, minlength=size)
    # torch.bincount on CUDA reads max(index) back to the host to size its output (a sync per call); adding
    # ones into a tensor whose size is known up front needs nothing from the device.
    return torch.zeros(size, dtype=torch.int64, device=index.device).index_add_(
        0, index, index.new_ones(1).expand(index.numel()))


def metrics_from_confusion(matrix):
    """aAcc, mIoU, mAcc and per-class IoU / Acc as fractions, NaN-aware as np.nanmean.

    Acc_c is NaN when class c never occurs in the ground truth; IoU_c is NaN when it occurs in neither
    prediction nor ground truth. Means skip NaN classes.
    """
    matrix = matrix.double().cpu()
    intersection = matrix.diag()
    label_area = matrix.sum(dim=1)
    union = label_area + matrix.sum(dim=0) - intersection
    iou = intersection / union  # 0/0 -> NaN, as in mmsegmentation
    acc = intersection / label_area
    return {
        "aAcc": (intersection.sum() / label_area.sum()).item(),
        "mIoU": _nanmean(iou.tolist()),
        "mAcc": _nanmean(acc.tolist()),
        "IoU": iou.tolist(),
        "Acc": acc.tolist(),
    }


def _nanmean(values):
    kept = [v for v in values if not math.isnan(v)]
    return sum(kept) / len(kept) if kept else float("nan")


def format_table(metrics, class_names):
    """The per-class IoU/Acc table and the summary line, in percent with 2 decimals."""
    width = max(len(name) for name in class_names)
    lines = [f"{'class':<{width}}  {'IoU':>6}  {'Acc':>6}"]
    for name, iou, acc in zip(class_names, metrics["IoU"], metrics["Acc"]):
        lines.append(f"{name:<{width}}  {_percent(iou):>6}  {_percent(acc):>6}")
    lines.append(
        f"aAcc {_percent(metrics['aAcc'])}  mIoU {_percent(metrics['mIoU'])}  mAcc {_percent(metrics['mAcc'])}"
    )
    return "\n".join(lines)


def _percent(value):
    return "nan" if math.isnan(value) else f"{100 * value:.2f}"
