"""Training-time augmentation: mmsegmentation 0.10 (VOC) and detectron2 PointRend (Cityscapes).

Images are uint8 H×W×3 BGR, labels uint8 H×W (255 = ignore); all randomness comes from the `rng:
numpy.random.Generator` argument. Nothing here normalises or pads (collate pads, the model normalises).
Images returned by the samplers, the jitters and resize_image are H×W×3 views of 3×H×W channel
planes: torch.from_numpy(image).permute(2, 0, 1) is then contiguous without a copy, and
np.ascontiguousarray(image) gives the usual interleaved layout.

Resize only the pixels the crop keeps: a sample draws its scale, computes the resized size, draws crop
windows in resized coordinates and tests the category rule on label windows gathered from the original
label; only the chosen window of the resized image is then computed, by a separable bilinear gather
from the original image. The window equals the same window of a full resize bit for bit.

Interpolation (dst = output index, scale = src_size / dst_size):
- bilinear (both datasets): OpenCV INTER_LINEAR: src = (dst + 0.5) * scale - 0.5 in float32, taps
  floor(src) and floor(src) + 1 clamped to the border, no antialiasing; float32 blend, then rounded
  half up (floor(x + 0.5)), like OpenCV's fixed-point cast.
- nearest, VOC (OpenCV INTER_NEAREST): src = min(floor(dst * scale), src_size - 1).
- nearest, Cityscapes (Pillow NEAREST): src = floor(scale / 2 + dst * scale) with the position summed
  step by step in float64 as Pillow does; equal to Pillow for every size tried.
Colour jitter (photometric_distortion, color_aug_ssd, the HSV conversions): seg/colour.py, re-exported.

Differences from the references (for the README):
- VOC image resize: OpenCV blends with 11-bit fixed-point weights, we blend in float32: expect
  differences of 1 on a few pixels (not checked against a cv2 binary; OpenCV is not a dependency).
- Cityscapes image resize: detectron2 uses Pillow BILINEAR. Upscaling (short edge 1280-2048 for
  1024×2048 images) matches it within 1 (tested). Downscaling (short edge 512 and 768) Pillow
  antialiases with a wider filter and we do not (cannot be done cheaply on a window): our images are
  sharper; on a noisy photo-like image the mean difference is ~1.5 levels (max ~10), on a fine
  high-contrast pattern up to ~40.
- HSV: see seg/colour.py.
- Random streams: numpy Generator draws instead of global numpy / Python `random`, so a seed gives
  different samples than upstream, with the same distributions. The Cityscapes flip coin is drawn
  before the colour jitter (detectron2 draws it after); both are independent and the jitter is per
  pixel, so the distribution is unchanged.
"""

import numpy as np

# The samplers call draw_jitter through this module's name, so that tests and seg/databench.py can
# replace it here (monkeypatch, stage timers).
from seg.colour import (_planar_view, _planes_of, bgr_to_hsv, color_aug_ssd, draw_jitter, hsv_to_bgr,  # noqa: F401
                        photometric_distortion)


# ---------------------------------------------------------------------------------------- sizes

def rescale_hw(h, w, long_short):
    """Keep-ratio size of mmcv.imrescale: the long side at most max(long_short), the short side at most
    min(long_short). Example: (375, 500) with (2048, 512) -> (512, 683)."""
    factor = min(max(long_short) / max(h, w), min(long_short) / min(h, w))
    return int(h * factor + 0.5), int(w * factor + 0.5)


def shortest_edge_hw(h, w, short_edge, max_size):
    """detectron2 ResizeShortestEdge.get_output_shape: short side -> short_edge, long side <= max_size."""
    scale = short_edge * 1.0 / min(h, w)
    new_h, new_w = (short_edge * 1.0, scale * w) if h < w else (scale * h, short_edge * 1.0)
    if max(new_h, new_w) > max_size:
        shrink = max_size * 1.0 / max(new_h, new_w)
        new_h, new_w = new_h * shrink, new_w * shrink
    return int(new_h + 0.5), int(new_w + 0.5)


# ------------------------------------------------------------------------ source index tables
# Each returns, for the output positions start .. start + length - 1 along one axis, where to read.

def nearest_src_cv2(start, length, src_size, dst_size):
    """OpenCV INTER_NEAREST: min(floor(dst * src/dst_size), src_size - 1), intp array (length,)."""
    scale = 1.0 / (dst_size / src_size)  # OpenCV stores the inverse scale and inverts it
    dst = np.arange(start, start + length, dtype=np.float64)
    return np.minimum(np.floor(dst * scale).astype(np.intp), src_size - 1)


def nearest_src_pil(start, length, src_size, dst_size):
    """Pillow NEAREST (ImagingScaleAffine): the position starts at scale/2 and adds scale per output
    pixel in float64; the running sum (not a product) is what makes it bit-exact."""
    scale = src_size / dst_size
    steps = np.full(start + length, scale)
    steps[0] = 0.5 * scale
    position = np.add.accumulate(steps)[start:]
    return np.minimum(position.astype(np.intp), src_size - 1)


def bilinear_src(start, length, src_size, dst_size):
    """OpenCV INTER_LINEAR taps: (first, second, weight of second), intp, intp, float32 (length,).
    Positions outside the image are clamped, so a border output copies the border pixel."""
    scale = 1.0 / (dst_size / src_size)
    dst = np.arange(start, start + length, dtype=np.float64)
    position = ((dst + 0.5) * scale - 0.5).astype(np.float32)
    first = np.floor(position)
    weight = position - first
    first = first.astype(np.intp)
    below, above = first < 0, first >= src_size - 1
    weight[below | above] = 0
    first[below] = 0
    first[above] = src_size - 1
    return first, np.minimum(first + 1, src_size - 1), weight


# ------------------------------------------------------------------------------ windowed resize
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

    Works in strips of output rows. When upscaling rows it blends columns first, on the few source rows a
    strip reads; otherwise rows first. The order depends only on the scale, so a window equals the same
    window of the full resize bit for bit. 0.5 is added before the last pass (a convex blend keeps it)
    so the final float -> uint8 cast (truncation) rounds half up.
    """
    (h, w), (y0, x0, height, width) = image.shape[:2], window
    if tuple(hw) == (h, w):  # scale 1: every tap weight is 0, a plain crop
        crop = image[y0:y0 + height, x0:x0 + width]
        return np.ascontiguousarray((crop[:, ::-1] if flip else crop).transpose(2, 0, 1))
    top, bottom, wy = bilinear_src(y0, height, h, hw[0])
    left, right, wx = (taps[::-1] if flip else taps for taps in bilinear_src(x0, width, w, hw[1]))
    lo, hi = int(min(left.min(), right.min())), int(max(left.max(), right.max())) + 1
    channel = np.arange(3)[:, None]  # gather channel-major so each strip comes out as 3 planes
    left3, right3 = ((left - lo) * 3 + channel).ravel(), ((right - lo) * 3 + channel).ravel()
    wx3 = np.tile(wx, 3)
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
    return _planar_view(resize_image_window(image, hw, (0, 0) + tuple(hw)))


def resize_label(label, hw, rule="cv2"):
    """Nearest resize of an H×W label to hw; rule "cv2" (mmseg) or "pil" (detectron2)."""
    src = nearest_src_cv2 if rule == "cv2" else nearest_src_pil
    return resize_label_window(label, hw, (0, 0) + tuple(hw), src)


def hflip(image, label):
    """Horizontal flip of an H×W×3 image and its H×W label (contiguous copies)."""
    return np.ascontiguousarray(image[:, ::-1]), np.ascontiguousarray(label[:, ::-1])


# ---------------------------------------------------------------------------------------- crops

def _draw_window(rng, hw, crop_hw):
    """Uniform crop window (y0, x0, height, width) inside hw; a side shorter than the crop is kept whole."""
    height, width = min(crop_hw[0], hw[0]), min(crop_hw[1], hw[1])
    y0 = int(rng.integers(hw[0] - height + 1))
    x0 = int(rng.integers(hw[1] - width + 1))
    return y0, x0, height, width


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
    """Draw crop windows of the resized size hw until accepts(label_of(window)), at most `tries` times.

    label_of(window) -> label crop. If every try fails, mmseg (draw_after_last=True) draws one more window
    and uses it untested; detectron2 (False) keeps the last tested one. Returns (window, label crop).
    """
    for _ in range(tries):
        window = _draw_window(rng, hw, crop_hw)
        crop_label = label_of(window)
        if accepts(crop_label):
            return window, crop_label
    if draw_after_last or tries == 0:
        window = _draw_window(rng, hw, crop_hw)
        crop_label = label_of(window)
    return window, crop_label


# ------------------------------------------------------------------------------------ pipelines

def _crop_and_flip(rng, image, label, hw, crop_hw, accepts, tries, draw_after_last, nearest_src):
    """Choose the crop window of the image resized to hw, draw the flip coin, then compute only that
    window: (3×h×w image planes, h×w label)."""
    if image.shape[:2] != label.shape:
        raise ValueError(f"image {image.shape[:2]} and label {label.shape} differ in size")
    label_of = lambda window: resize_label_window(label, hw, window, nearest_src)  # noqa: E731
    window, crop_label = choose_window(rng, label_of, hw, crop_hw, accepts, tries, draw_after_last)
    flip = rng.random() < 0.5
    crop_label = np.ascontiguousarray(crop_label[:, ::-1]) if flip else crop_label
    return resize_image_window(image, hw, window, flip), crop_label


def voc_train_sample(rng, image, label, *, scale=(2048, 512), ratio_range=(0.5, 2.0), crop_hw=(512, 512),
                     cat_max_ratio=0.75, ignore_index=255):
    """mmseg 0.10 VOC train pipeline: Resize(scale, ratio_range, keep_ratio) -> RandomCrop(crop_hw,
    cat_max_ratio, 10 tries) -> RandomFlip(0.5) -> PhotoMetricDistortion. Not padded: a side shorter
    than the crop stays short. Returns (H×W×3 uint8 BGR image, a view of channel planes; H×W uint8 label;
    PhotoMetricDistortion's parameters from colour.draw_jitter, not yet applied: see seg/colour.py).
    Draws, in order: rng.random() ratio, windows (rng.integers y0 then x0), rng.random() flip, jitter."""
    ratio = rng.random() * (ratio_range[1] - ratio_range[0]) + ratio_range[0]
    hw = rescale_hw(*label.shape, (int(scale[0] * ratio), int(scale[1] * ratio)))
    accepts = lambda crop: mmseg_accepts(crop, cat_max_ratio, ignore_index)  # noqa: E731
    planes, crop_label = _crop_and_flip(rng, image, label, hw, crop_hw, accepts, 10 if cat_max_ratio < 1 else 0,
                                        True, nearest_src_cv2)
    return _planar_view(planes), crop_label, draw_jitter(rng, 18)


def cityscapes_train_sample(rng, image, label, *, short_edges=(512, 768, 1024, 1280, 1536, 1792, 2048),
                            max_size=4096, crop_hw=(512, 1024), single_category_max_area=0.75,
                            ignore_index=255):
    """detectron2 PointRend Cityscapes augmentation: ResizeShortestEdge(short_edges, max_size, "choice")
    -> RandomCrop_CategoryAreaConstraint(crop_hw, max_area, 10 tries) -> ColorAugSSD -> RandomFlip.
    Returns (H×W×3 uint8 BGR image, a view of channel planes; H×W uint8 label; ColorAugSSD's parameters
    from colour.draw_jitter, not yet applied: the jitter is per pixel, so it commutes with the flip).
    Draws, in order: rng.integers short edge index, windows (y0 then x0), rng.random() flip, jitter."""
    hw = shortest_edge_hw(*label.shape, short_edges[int(rng.integers(len(short_edges)))], max_size)
    accepts = lambda crop: detectron2_accepts(crop, single_category_max_area, ignore_index)  # noqa: E731
    planes, crop_label = _crop_and_flip(rng, image, label, hw, crop_hw, accepts,
                                        10 if single_category_max_area < 1 else 0, False, nearest_src_pil)
    return _planar_view(planes), crop_label, draw_jitter(rng, 19)


TRAIN_SAMPLERS = {"voc": voc_train_sample, "cityscapes": cityscapes_train_sample}
