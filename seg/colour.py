"""Colour jitter of the training pipelines: mmseg PhotoMetricDistortion and detectron2 ColorAugSSD.

Images are uint8 B, G, R; the jitters take and return 3×H×W channel planes (or H×W×3 views of them,
see seg/transforms.py). All randomness comes from the `rng: numpy.random.Generator` argument.

Colour: bgr_to_hsv is OpenCV's uint8 BGR2HSV integer algorithm (exact); hsv_to_bgr follows OpenCV's
float32 HSV2BGR in the same operation order, rounded half to even. Hue shifts: [-18, 17] for mmseg
(numpy randint), [-18, 18] for detectron2 (Python randint). Transcribed from OpenCV's source and
checked against per-pixel transcriptions and colorsys, not against a cv2 binary.

Every drawn saturation or hue step is its own uint8 BGR -> HSV -> BGR round trip, as in the references
(two steps are not fused: the uint8 rounding in between changes results). Brightness and contrast are
per-value maps, so consecutive ones compose into one 256-entry table.
"""

import functools

import numpy as np


def _planar_view(planes):
    """3×H×W planes -> H×W×3 view (no copy; torch.from_numpy(view).permute(2, 0, 1) is contiguous)."""
    return np.moveaxis(planes, 0, -1)


def _planes_of(image):
    """H×W×3 image -> 3×H×W contiguous planes, without a copy when image is a _planar_view."""
    return np.ascontiguousarray(np.moveaxis(image, -1, 0))


# ------------------------------------------------------------------------------------- tables
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
    return _shifted_hue_table(shift % 180).take(key, mode="clip")


@functools.lru_cache(maxsize=None)
def _shifted_hue_table(shift):
    """_H_OF_DIFFS + shift mod 180 for 0 <= shift < 180. Cached: rebuilding the 261K-entry table costs
    about as much as a tenth of a 512×512 round trip, and only 37 shifts are ever drawn (~9.6 MB)."""
    return _wrap_hue(_H_OF_DIFFS, shift) if shift else _H_OF_DIFFS


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
