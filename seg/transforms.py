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
Colour: bgr_to_hsv is OpenCV's uint8 BGR2HSV integer algorithm (exact); hsv_to_bgr follows OpenCV's
float32 HSV2BGR in the same operation order, rounded half to even. Hue shifts: [-18, 17] for mmseg
(numpy randint), [-18, 18] for detectron2 (Python randint).

Differences from the references (for the README):
- VOC image resize: OpenCV blends with 11-bit fixed-point weights, we blend in float32: expect
  differences of 1 on a few pixels (not checked against a cv2 binary; OpenCV is not a dependency).
- Cityscapes image resize: detectron2 uses Pillow BILINEAR. Upscaling (short edge 1280-2048 for
  1024×2048 images) matches it within 1 (tested). Downscaling (short edge 512 and 768) Pillow
  antialiases with a wider filter and we do not (cannot be done cheaply on a window): our images are
  sharper; on a noisy photo-like image the mean difference is ~1.5 levels (max ~10), on a fine
  high-contrast pattern up to ~40.
- HSV: transcribed from OpenCV's source and checked against per-pixel transcriptions and colorsys,
  not against a cv2 binary.
- Random streams: numpy Generator draws instead of global numpy / Python `random`, so a seed gives
  different samples than upstream, with the same distributions. The Cityscapes flip coin is drawn
  before the colour jitter (detectron2 draws it after); both are independent and the jitter is per
  pixel, so the distribution is unchanged.
"""

import numpy as np


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


def _planar_view(planes):
    """3×H×W planes -> H×W×3 view (no copy; torch.from_numpy(view).permute(2, 0, 1) is contiguous)."""
    return np.moveaxis(planes, 0, -1)


def _planes_of(image):
    """H×W×3 image -> 3×H×W contiguous planes, without a copy when image is a _planar_view."""
    return np.ascontiguousarray(np.moveaxis(image, -1, 0))


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


# --------------------------------------------------------------------------------------- colour
# OpenCV's uint8 conversions, tabulated once. BGR -> HSV is integer arithmetic with 12-bit reciprocals
# (rounded half to even, like cvRound): S depends only on (max, min) and H only on (g - b, b - r), so
# two tables give both exactly. HSV -> BGR is float32: with H * (6/180) = sector + f, the channels are
# v (max), v(1 - s) (min) and v(1 - s*m) (middle; m = f or 1 - f by sector), times 255, rounded half
# to even. The min is tabulated by (s, v); the middle needs v(1 - s*m) per pixel in OpenCV's order.

_HUE_OFFSET = 255 * 511 + 255  # hue table index: (g - b) * 511 + (b - r) + this, in [0, 511 * 511)


def _colour_tables():
    n = np.arange(256, dtype=np.float64)
    with np.errstate(divide="ignore"):
        s_recip = np.where(n > 0, np.rint((255 << 12) / n), 0).astype(np.int64)
        h_recip = np.where(n > 0, np.rint((180 << 12) / (6 * n)), 0).astype(np.int64)
    v, v_min = np.meshgrid(np.arange(256), np.arange(256), indexing="ij")
    saturation = ((np.maximum(v - v_min, 0) * s_recip[v] + 2048) >> 12).astype(np.uint8).reshape(-1)
    g_minus_b, b_minus_r = np.meshgrid(np.arange(-255, 256), np.arange(-255, 256), indexing="ij")
    b = np.maximum(np.maximum(0, -g_minus_b), b_minus_r)  # any b keeping all three >= 0 will do
    g, r = b + g_minus_b, b - b_minus_r
    v, v_min = np.maximum(np.maximum(b, g), r), np.minimum(np.minimum(b, g), r)
    diff = v - v_min
    numerator = np.where(v == r, g - b, np.where(v == g, b - r + 2 * diff, r - g + 4 * diff))
    hue = (numerator * h_recip[np.minimum(diff, 255)] + 2048) >> 12
    hue_table = np.where(hue < 0, hue + 180, hue).astype(np.uint8).reshape(-1)  # rows g - b, columns b - r
    scaled = np.arange(256, dtype=np.float32) * (np.float32(6.0) / np.float32(180))
    f = scaled - np.trunc(scaled)
    sector = (np.arange(256) // 30) % 6  # equals OpenCV's float sector for every uint8 H
    m = np.where(sector % 2 == 1, f, np.float32(1) - f)  # sectors 1, 3, 5 fall, 0, 2, 4 rise
    unit = np.arange(256, dtype=np.float32) * (np.float32(1.0) / np.float32(255.0))  # OpenCV's s, v scale
    middle = (np.float32(1) - unit[None, :] * m[:, None]).reshape(-1)  # indexed [h, s]
    low = np.rint((unit[None, :] * (np.float32(1) - unit[:, None])) * np.float32(255))  # indexed [s, v]
    return saturation, hue_table, middle, low.astype(np.uint8).reshape(-1)


_S_OF_MAX_MIN, _H_OF_DIFFS, _MIDDLE_OF_H_S, _LOW_OF_S_V = _colour_tables()
_INV_255 = np.float32(1.0) / np.float32(255.0)
_BYTE_PAIRS = np.arange(1 << 16, dtype=np.uint16).view(np.uint8)  # the two bytes of every uint16


def _key(high, low):
    """high * 256 + low as uint16, the index of the 256×256 tables."""
    key = np.left_shift(high, 8, dtype=np.uint16)
    key |= low
    return key


def _s_and_low(saturation):
    """Given S per (max, min) key (65536,) uint8: S | low << 8, low = HSV2BGR's smallest channel."""
    v = np.repeat(np.arange(256, dtype=np.uint8), 256)
    return saturation | (_LOW_OF_S_V.take(_key(saturation, v)).astype(np.uint16) << 8)


_S_AND_LOW = _s_and_low(_S_OF_MAX_MIN)


def _hue(b, g, r, shift=0):
    """(OpenCV H + shift) mod 180 of uint8 B, G, R planes; the shift goes into the table, not the pixels."""
    key = np.subtract(g, b, dtype=np.int32)
    key *= 511
    key += np.subtract(b, r, dtype=np.int16)
    key += _HUE_OFFSET
    return (_wrap_hue(_H_OF_DIFFS, shift % 180) if shift % 180 else _H_OF_DIFFS).take(key, mode="clip")


def _wrap_hue(h, shift=0):
    """(h + shift) mod 180 for uint8 h and 0 <= shift < 180."""
    wide = h.astype(np.uint16)
    wide += shift
    np.subtract(wide, 180, out=wide, where=wide >= 180)
    np.subtract(wide, 180, out=wide, where=wide >= 180)  # OpenCV input may have H up to 255
    return wide.astype(np.uint8)


def _select(mask, if_true, if_false, out):
    """np.where(mask, if_true, if_false) for uint8 into out, with bit operations (several times faster)."""
    bits = mask.view(np.uint8)
    np.negative(bits, out=bits)  # True -> 0xFF
    change = np.bitwise_xor(if_true, if_false)
    change &= bits
    np.bitwise_xor(if_false, change, out=out)


def _to_bgr(h, middle_key, v, low):
    """3×H×W B, G, R planes from the H and V planes, the (h, s) keys of the middle and the min channel."""
    unit_v = v.astype(np.float32)
    unit_v *= _INV_255
    middle = _MIDDLE_OF_H_S.take(middle_key, mode="clip")  # uint16 keys: always in range
    middle *= unit_v
    middle *= np.float32(255)
    middle = np.rint(middle, out=middle).astype(np.uint8)
    wrapped = _wrap_hue(h) if h.max() >= 180 else h  # sector k covers H in [30k, 30k + 30)
    out = np.empty((3,) + h.shape, np.uint8)
    # B: min in sectors 0-1, v in 3-4; G: min in 4-5, v in 1-2; R: min in 2-3, v in 5 and 0
    _select(wrapped < 60, low, middle, out=out[0])
    _select(wrapped - np.uint8(90) < 60, v, out[0], out=out[0])
    _select(wrapped - np.uint8(120) < 60, low, middle, out=out[1])
    _select(wrapped - np.uint8(30) < 60, v, out[1], out=out[1])
    _select(wrapped - np.uint8(60) < 60, low, middle, out=out[2])
    _select(wrapped - np.uint8(30) < 120, out[2], v, out=out[2])
    return out


def _hsv_round_trip(planes, saturation_map=None, hue_shift=0):
    """BGR2HSV, S = saturation_map[S], H = (H + hue_shift) mod 180, HSV2BGR on 3×H×W uint8 planes."""
    b, g, r = planes
    v = np.maximum(np.maximum(b, g), r)
    table = _S_AND_LOW if saturation_map is None else _s_and_low(saturation_map[_S_OF_MAX_MIN])
    s_and_low = table.take(_key(v, np.minimum(np.minimum(b, g), r)), mode="clip")  # S and the min at once
    h = _hue(b, g, r, hue_shift)
    middle_key = np.left_shift(h, 8, dtype=np.uint16)
    middle_key |= s_and_low & 255
    return _to_bgr(h, middle_key, v, (s_and_low >> 8).astype(np.uint8))


def bgr_to_hsv(image):
    """H×W×3 uint8 BGR -> H×W×3 uint8 HSV, H in [0, 180), S and V in [0, 255], as cv2.COLOR_BGR2HSV."""
    b, g, r = _planes_of(image)
    v = np.maximum(np.maximum(b, g), r)
    s = _S_OF_MAX_MIN.take(_key(v, np.minimum(np.minimum(b, g), r)))
    return np.stack([_hue(b, g, r), s, v], axis=-1)


def hsv_to_bgr(hsv):
    """H×W×3 uint8 HSV (OpenCV ranges, H >= 180 wraps) -> H×W×3 uint8 BGR, as cv2.COLOR_HSV2BGR."""
    h, s, v = _planes_of(hsv)
    bgr = _to_bgr(h, _key(h, s), v, _LOW_OF_S_V.take(_key(s, v)))
    return np.ascontiguousarray(_planar_view(bgr))


def _affine_map(alpha, beta):
    """uint8 -> uint8 table of mmseg/detectron2 `convert`: clip(float32(x) * alpha + beta, 0, 255), truncated."""
    values = np.arange(256, dtype=np.float32) * np.float32(alpha) + np.float32(beta)
    return np.clip(values, 0, 255).astype(np.uint8)


def _map_planes(planes, table):
    """table[planes] for a (256,) uint8 table; looks up byte pairs in a 65536 table (half the lookups)."""
    flat = planes.reshape(-1)
    if flat.size % 2:
        return table.take(planes)
    pairs = table.take(_BYTE_PAIRS).view(np.uint16)
    return pairs.take(flat.view(np.uint16), mode="clip").view(np.uint8).reshape(planes.shape)


def _jitter_steps(rng, hue_high):
    """Draw the colour jitter shared by mmseg PhotoMetricDistortion and detectron2 ColorAugSSD.

    Returns steps ("map", table) for brightness/contrast and ("hsv", saturation table or None, hue shift).
    Each step happens with probability 1/2; contrast goes first or last with probability 1/2.
    """
    def maybe(step):
        return [step()] if rng.integers(2) else []

    def contrast():
        return ("map", _affine_map(rng.uniform(0.5, 1.5), 0))

    steps = maybe(lambda: ("map", _affine_map(1, rng.uniform(-32, 32))))
    contrast_first = rng.integers(2)
    steps += maybe(contrast) if contrast_first else []
    steps += maybe(lambda: ("hsv", _affine_map(rng.uniform(0.5, 1.5), 0), 0))
    steps += maybe(lambda: ("hsv", None, int(rng.integers(-18, hue_high))))
    return steps + ([] if contrast_first else maybe(contrast))


def _apply_jitter(planes, steps):
    """Run jitter steps on 3×H×W planes. Consecutive brightness/contrast tables are composed (exact, as
    each is a per-value map); every HSV step is its own uint8 round trip, as in the references."""
    table = None
    for step in steps + [("end",)]:
        if step[0] == "map":
            table = step[1] if table is None else step[1][table]
            continue
        if table is not None:
            planes, table = _map_planes(planes, table), None
        if step[0] == "hsv":
            planes = _hsv_round_trip(planes, *step[1:])
    return planes


def photometric_distortion(rng, image):
    """mmseg PhotoMetricDistortion (defaults) on an H×W×3 uint8 BGR image; hue shift in [-18, 17]."""
    return _planar_view(_apply_jitter(_planes_of(image), _jitter_steps(rng, 18)))


def color_aug_ssd(rng, image):
    """detectron2 ColorAugSSDTransform (BGR) on an H×W×3 uint8 image; hue shift in [-18, 18]."""
    return _planar_view(_apply_jitter(_planes_of(image), _jitter_steps(rng, 19)))


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
    than the crop stays short. Returns (H×W×3 uint8 BGR image, a view of channel planes; H×W uint8 label).
    Draws, in order: rng.random() ratio, windows (rng.integers y0 then x0), rng.random() flip, jitter."""
    ratio = rng.random() * (ratio_range[1] - ratio_range[0]) + ratio_range[0]
    hw = rescale_hw(*label.shape, (int(scale[0] * ratio), int(scale[1] * ratio)))
    accepts = lambda crop: mmseg_accepts(crop, cat_max_ratio, ignore_index)  # noqa: E731
    planes, crop_label = _crop_and_flip(rng, image, label, hw, crop_hw, accepts, 10 if cat_max_ratio < 1 else 0,
                                        True, nearest_src_cv2)
    return _planar_view(_apply_jitter(planes, _jitter_steps(rng, 18))), crop_label


def cityscapes_train_sample(rng, image, label, *, short_edges=(512, 768, 1024, 1280, 1536, 1792, 2048),
                            max_size=4096, crop_hw=(512, 1024), single_category_max_area=0.75,
                            ignore_index=255):
    """detectron2 PointRend Cityscapes augmentation: ResizeShortestEdge(short_edges, max_size, "choice")
    -> RandomCrop_CategoryAreaConstraint(crop_hw, max_area, 10 tries) -> ColorAugSSD -> RandomFlip.
    Returns (H×W×3 uint8 BGR image, a view of channel planes; H×W uint8 label).
    Draws, in order: rng.integers short edge index, windows (y0 then x0), rng.random() flip, jitter."""
    hw = shortest_edge_hw(*label.shape, short_edges[int(rng.integers(len(short_edges)))], max_size)
    accepts = lambda crop: detectron2_accepts(crop, single_category_max_area, ignore_index)  # noqa: E731
    planes, crop_label = _crop_and_flip(rng, image, label, hw, crop_hw, accepts,
                                        10 if single_category_max_area < 1 else 0, False, nearest_src_pil)
    return _planar_view(_apply_jitter(planes, _jitter_steps(rng, 19))), crop_label


TRAIN_SAMPLERS = {"voc": voc_train_sample, "cityscapes": cityscapes_train_sample}
