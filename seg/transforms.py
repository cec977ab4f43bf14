"""Training-time augmentation: mmsegmentation 0.10 (VOC) and detectron2 PointRend (Cityscapes).

Images are uint8 H×W×3 BGR, labels uint8 H×W (255 = ignore), randomness from the `rng: numpy.random.Generator`
argument; nothing here normalises or pads (collate pads, the model normalises). A sampler is three stages, which
seg/bench.py times apart: a crop plan (CROP_PLANS: scale, crop windows tested on label windows gathered from the
original label, flip coin), resize_image_window (bit for bit that window of a full resize), colour.draw_jitter.
Labels are resized exactly by OpenCV's (VOC) or Pillow's (Cityscapes) nearest rule, images with OpenCV
INTER_LINEAR's geometry in float32 (README "Differences from the references"): VOC images ±1 on a few pixels
(OpenCV's 11-bit weights; not checked against cv2), Cityscapes within 1 of Pillow BILINEAR upscaling, sharper
downscaling (no antialiasing: mean ~1.5 levels, max ~10 on a noisy photo-like image; up to ~40 on fine stripes)."""

import numpy as np

from seg import colour


def rescale_hw(h, w, long_short):
    """Keep-ratio size of mmcv.imrescale: the long side at most max(long_short), the short side at most
    min(long_short). Example: (375, 500) with (2048, 512) -> (512, 683)."""
    factor = min(max(long_short) / max(h, w), min(long_short) / min(h, w))
    return int(h * factor + 0.5), int(w * factor + 0.5)


def shortest_edge_hw(h, w, short_edge, max_size):
    """detectron2 ResizeShortestEdge.get_output_shape: short side -> short_edge, long side <= max_size."""
    scale = short_edge * 1.0 / min(h, w)
    new_h, new_w = (short_edge * 1.0, scale * w) if h < w else (scale * h, short_edge * 1.0)
    shrink = min(1.0, max_size * 1.0 / max(new_h, new_w))  # 1.0: the long side is within max_size
    return int(new_h * shrink + 0.5), int(new_w * shrink + 0.5)


# Source index tables: where the outputs dst = start .. start + length - 1 along one axis read (scale = src / dst).
def nearest_src_cv2(start, length, src_size, dst_size):
    """OpenCV INTER_NEAREST: min(floor(dst * scale), src_size - 1) -> intp (length,)."""
    scale = 1.0 / (dst_size / src_size)  # OpenCV stores the inverse scale and inverts it
    return np.minimum(np.floor(np.arange(start, start + length, dtype=float) * scale).astype(np.intp), src_size - 1)


def nearest_src_pil(start, length, src_size, dst_size):
    """Pillow NEAREST (ImagingScaleAffine): floor(scale / 2 + dst * scale), the position summed step by step in
    float64 as Pillow does; the running sum (not a product) equals Pillow for every size tried."""
    scale = src_size / dst_size
    steps = np.full(start + length, scale)
    steps[0] = 0.5 * scale
    return np.minimum(np.add.accumulate(steps)[start:].astype(np.intp), src_size - 1)


def bilinear_src(start, length, src_size, dst_size):
    """OpenCV INTER_LINEAR taps floor(src), floor(src) + 1 of src = (dst + 0.5) * scale - 0.5 in float32, no
    antialiasing -> (first, second, weight of second), intp, intp, float32 (length,). Positions outside the
    image are clamped, so a border output copies the border pixel."""
    scale = 1.0 / (dst_size / src_size)
    position = ((np.arange(start, start + length, dtype=np.float64) + 0.5) * scale - 0.5).astype(np.float32)
    first, weight = np.floor(position).astype(np.intp), position - np.floor(position)
    weight[(first < 0) | (first >= src_size - 1)] = 0
    first = np.clip(first, 0, src_size - 1)
    return first, np.minimum(first + 1, src_size - 1), weight


# A window is (y0, x0, height, width) in the coordinates of the resized image.
_STRIP_VALUES = 1 << 17  # output values per strip: keeps the float temporaries in cache


def _blend(values, first, second, weight, axis):
    """values[first] + weight * (values[second] - values[first]) along axis (0 or 1), float32."""
    base = values.take(first, axis=axis)
    if not weight.any():  # scale 1 along this axis: the blend would return base exactly
        return base.astype(np.float32, copy=False)
    out = np.subtract(values.take(second, axis=axis), base, dtype=np.float32)
    out *= weight if axis == 1 else weight[:, None]
    out += base
    return out


def resize_image_window(image, hw, window, flip=False):
    """Window of the H×W×3 uint8 image bilinearly resized to hw, mirrored if flip -> 3×height×width planes.
    In strips of output rows: columns first when upscaling rows (on the few source rows a strip reads), else rows
    first; the order depends only on the scale, so a window is bit for bit that window of the full resize. 0.5 added
    before the last pass (a convex blend keeps it) makes the truncating float -> uint8 cast round half up, as OpenCV."""
    (h, w), (y0, x0, height, width) = image.shape[:2], window
    if tuple(hw) == (h, w):  # scale 1: every tap weight is 0, a plain crop
        crop = image[y0:y0 + height, x0:x0 + width]
        return np.ascontiguousarray((crop[:, ::-1] if flip else crop).transpose(2, 0, 1))
    top, bottom, wy = bilinear_src(y0, height, h, hw[0])
    left, right, wx = (taps[::-1] if flip else taps for taps in bilinear_src(x0, width, w, hw[1]))
    lo, hi = int(min(left.min(), right.min())), int(max(left.max(), right.max())) + 1
    channel = np.arange(3)[:, None]  # gather channel-major so each strip comes out as 3 planes
    left3, right3, wx3 = ((left - lo) * 3 + channel).ravel(), ((right - lo) * 3 + channel).ravel(), np.tile(wx, 3)
    planes = np.empty((3, height, width), np.uint8)
    strip = max(1, _STRIP_VALUES // len(left3))
    for start in range(0, height, strip):
        first, second, weight = top[start:start + strip], bottom[start:start + strip], wy[start:start + strip]
        r0, r1 = int(first.min()), int(second.max()) + 1
        source = image[r0:r1, lo:hi].reshape(r1 - r0, -1)
        if hw[0] > h:
            source = source.astype(np.float32)  # float gathers are cheaper than mixed-type blends
            source += 0.5
            rows = _blend(_blend(source, left3, right3, wx3, 1), first - r0, second - r0, weight, 0)
        else:
            rows = _blend(source, first - r0, second - r0, weight, 0)
            rows += 0.5
            rows = _blend(rows, left3, right3, wx3, 1)
        planes[:, start:start + strip] = rows.reshape(len(first), 3, width).transpose(1, 0, 2)
    return planes


def resize_label_window(label, hw, window, nearest_src, flip=False):
    """Window of the H×W label resized to hw with nearest_src (nearest_src_cv2 or _pil), mirrored if flip.
    Reads only the source rows and column span the window uses."""
    (h, w), (y0, x0, height, width) = label.shape, window
    rows, cols = nearest_src(y0, height, h, hw[0]), nearest_src(x0, width, w, hw[1])
    lo, hi = int(cols.min()), int(cols.max()) + 1
    return label[:, lo:hi].take(rows, axis=0).take(cols[::-1] - lo if flip else cols - lo, axis=1)


def resize_image(image, hw):
    """Bilinear resize of an H×W×3 uint8 image to hw = (new_h, new_w), OpenCV INTER_LINEAR geometry."""
    return colour.planar_view(resize_image_window(image, hw, (0, 0) + tuple(hw)))


def _draw_window(rng, hw, crop_hw):
    """Uniform crop window (y0, x0, height, width) inside hw; a side shorter than the crop is kept whole."""
    height, width = min(crop_hw[0], hw[0]), min(crop_hw[1], hw[1])
    return int(rng.integers(hw[0] - height + 1)), int(rng.integers(hw[1] - width + 1)), height, width  # y0 first


def class_counts(label, ignore_index=255):
    """Pixel count of every class present in label, ignore_index left out -> int64 (classes present,)."""
    flat = label.reshape(-1)
    if flat.size % 2 == 0:  # count byte pairs: half as many elements for bincount to convert
        pairs = np.bincount(flat.view(np.uint16), minlength=1 << 16).reshape(256, 256)
        counts = pairs.sum(axis=0) + pairs.sum(axis=1)
    else:
        counts = np.bincount(flat, minlength=256)
    if 0 <= ignore_index < 256:
        counts[ignore_index] = 0
    return counts[counts > 0]


def mmseg_accepts(label, cat_max_ratio, ignore_index):
    """mmseg RandomCrop: more than one class and the largest below cat_max_ratio of the counted pixels."""
    counts = class_counts(label, ignore_index)
    return len(counts) > 1 and counts.max() / counts.sum() < cat_max_ratio


def detectron2_accepts(label, max_area, ignore_index):
    """detectron2 RandomCrop_CategoryAreaConstraint: the same rule written as max < sum * max_area."""
    counts = class_counts(label, ignore_index)
    return len(counts) > 1 and counts.max() < counts.sum() * max_area


def choose_window(rng, label_of, hw, crop_hw, accepts, tries, draw_after_last):
    """Draw crop windows of the resized size hw until accepts(label_of(window) -> label crop), at most `tries`
    times -> (window, label crop). If every try fails, mmseg (draw_after_last=True) draws one more window and
    uses it untested; detectron2 (False) keeps the last tested one."""
    for _ in range(tries):
        window = _draw_window(rng, hw, crop_hw)
        crop_label = label_of(window)
        if accepts(crop_label):
            return window, crop_label
    if draw_after_last or tries == 0:
        window = _draw_window(rng, hw, crop_hw)
        crop_label = label_of(window)
    return window, crop_label


def _plan_window(rng, label, hw, crop_hw, accepts, max_ratio, draw_after_last, nearest_src):
    """Crop window of the label resized to hw, then the flip coin -> (hw, window, flip, label crop mirrored if flip)."""
    label_of = lambda window: resize_label_window(label, hw, window, nearest_src)  # noqa: E731
    window, crop_label = choose_window(rng, label_of, hw, crop_hw, accepts, 10 if max_ratio < 1 else 0, draw_after_last)
    flip = bool(rng.random() < 0.5)
    return hw, window, flip, np.ascontiguousarray(crop_label[:, ::-1]) if flip else crop_label


def voc_crop_plan(rng, label, *, scale, ratio_range, crop_hw, cat_max_ratio, ignore_index=255):
    """mmseg 0.10 Resize(scale, ratio_range, keep_ratio) -> RandomCrop(crop_hw, cat_max_ratio, 10 tries) ->
    RandomFlip(0.5) on an H×W label. Draws rng.random() ratio, windows (y0 then x0), rng.random() flip."""
    ratio = rng.random() * (ratio_range[1] - ratio_range[0]) + ratio_range[0]
    hw = rescale_hw(*label.shape, (int(scale[0] * ratio), int(scale[1] * ratio)))
    accepts = lambda crop: mmseg_accepts(crop, cat_max_ratio, ignore_index)  # noqa: E731
    return _plan_window(rng, label, hw, crop_hw, accepts, cat_max_ratio, True, nearest_src_cv2)


def cityscapes_crop_plan(rng, label, *, short_edges, max_size, crop_hw, single_category_max_area, ignore_index=255):
    """detectron2 ResizeShortestEdge(short_edges, max_size, "choice") -> RandomCrop_CategoryAreaConstraint(crop_hw,
    max_area, 10 tries) -> RandomFlip. Draws rng.integers short edge index, windows (y0, x0), rng.random() flip."""
    hw = shortest_edge_hw(*label.shape, short_edges[int(rng.integers(len(short_edges)))], max_size)
    accepts = lambda crop: detectron2_accepts(crop, single_category_max_area, ignore_index)  # noqa: E731
    return _plan_window(rng, label, hw, crop_hw, accepts, single_category_max_area, False, nearest_src_pil)


# name -> (crop plan, hue_high of colour.draw_jitter: mmseg's hue shift is in [-18, 17], detectron2's [-18, 18])
CROP_PLANS = {"voc": (voc_crop_plan, 18), "cityscapes": (cityscapes_crop_plan, 19)}


def _train_sample(name, rng, image, label, **options):
    """CROP_PLANS[name] -> that window of the resized image -> colour.draw_jitter, drawn last -> (H×W×3 uint8 BGR
    image, a view of channel planes; H×W uint8 label, not padded; int16 jitter parameters, applied later by
    colour.jittered or apply_jitter). Flip drawn before the jitter (detectron2: after): the jitter is per pixel."""
    if image.shape[:2] != label.shape:
        raise ValueError(f"image {image.shape[:2]} and label {label.shape} differ in size")
    plan, hue_high = CROP_PLANS[name]
    hw, window, flip, label = plan(rng, label, **options)
    return colour.planar_view(resize_image_window(image, hw, window, flip)), label, colour.draw_jitter(rng, hue_high)


def voc_train_sample(rng, image, label, *, scale=(2048, 512), ratio_range=(0.5, 2.0), crop_hw=(512, 512),
                     cat_max_ratio=0.75, ignore_index=255):
    """mmseg 0.10 VOC train pipeline: voc_crop_plan, then PhotoMetricDistortion (see _train_sample)."""
    return _train_sample("voc", rng, image, label, scale=scale, ratio_range=ratio_range, crop_hw=crop_hw,
                         cat_max_ratio=cat_max_ratio, ignore_index=ignore_index)


def cityscapes_train_sample(rng, image, label, *, short_edges=(512, 768, 1024, 1280, 1536, 1792, 2048),
                            max_size=4096, crop_hw=(512, 1024), single_category_max_area=0.75, ignore_index=255):
    """detectron2 PointRend Cityscapes augmentation: cityscapes_crop_plan, then ColorAugSSD (see _train_sample)."""
    return _train_sample("cityscapes", rng, image, label, short_edges=short_edges, max_size=max_size, crop_hw=crop_hw,
                         single_category_max_area=single_category_max_area, ignore_index=ignore_index)


TRAIN_SAMPLERS = {"voc": voc_train_sample, "cityscapes": cityscapes_train_sample}
