"""What seg reads and writes besides checkpoints: UserError, atomic writes (a temporary file beside the target,
then os.replace: a crash never leaves half an output), image and label decoding and encoding, and the cache.

Decoded-image cache (`data.cache = true`): decoding dominates the data pipeline (a 2048×1024 Cityscapes PNG takes
~50 ms with Pillow, the whole detectron2 mapper ~105 ms), so the first run decodes every image (BGR H×W×3) and label
(H×W) into one file per item list, which loader workers memory-map: all processes share its pages and a sample costs
a copy. Layout: 64-byte header (MAGIC, index offset and length as little-endian uint64), arrays on 64-byte
boundaries, JSON index (item paths, their (size, mtime_ns), each array's offset and shape); rebuilt when any of
those change. Written under a temporary name and renamed, so it is always complete. A lock file (O_EXCL) elects one
builder, the others wait; a lock whose process died or that is not refreshed for `stale_s` is taken over. Disk cost:
~0.75 MB per VOC sample, ~8.4 MB per Cityscapes sample (25 GB for the 2975 training images).
"""
import concurrent.futures
import contextlib
import glob
import hashlib
import io
import json
import os
import socket
import struct
import tempfile
import time

import numpy as np
from PIL import Image, ImageOps

IGNORE_INDEX = 255
_IGNORE_COLOUR = (224, 224, 192)  # colour of index 255 in the official VOC PNGs
_SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N")
# Pillow's errors for unreadable files; DecompressionBombError: a picture over ~179 megapixels
_UNREADABLE = (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError)


class UserError(Exception):
    """A mistake the user can fix; the message names the file or key and says what to do (run.py exits 2)."""


def write_atomic(path, write):
    """Call `write(binary_file)` on a temporary file beside `path`, then rename it to `path`: `path` is the old
    file or the complete new one, with the mode open(path, "w") gives (0o666 & ~umask, not mkstemp's 0o600)."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=folder, prefix=f".{os.path.basename(path)}.", suffix=".tmp")
    umask = os.umask(0o077)  # the umask can only be read by setting it: private for that instant
    os.umask(umask)
    try:
        with os.fdopen(handle, "wb") as stream:
            os.chmod(temporary, 0o666 & ~umask)
            write(stream)
            stream.flush()
            os.fsync(stream.fileno())
        os.replace(temporary, path)
    except BaseException:
        if os.path.exists(temporary):
            os.remove(temporary)
        raise


def write_bytes_atomic(payload, path):
    write_atomic(path, lambda stream: stream.write(payload))


def write_text_atomic(text, path):
    write_bytes_atomic(text.encode("utf-8"), path)


def read_image_bgr(path, upright=False):
    """uint8 H×W×3 BGR (the order both references feed their models; see to_bgr). upright: turn the picture by
    its EXIF orientation first (photos for prediction)."""
    try:
        with Image.open(path) as image:
            file_format = image.format  # a turned copy has none
            return to_bgr(ImageOps.exif_transpose(image) if upright else image, path, file_format)
    except _UNREADABLE as error:
        raise UserError(f"{path}: cannot read image ({error}); replace or remove it from the split") from error


def to_bgr(image, path="", file_format=None):
    """uint8 H×W×3 BGR, writable (as torch wants), of a Pillow image of any mode. 16-bit grey keeps its top 8 bits
    (value >> 8, as Pillow decodes 16-bit RGB PNGs): modes I;16*, and "I" read from a PNG or PGM file (`file_format`;
    older Pillow's mode for 16-bit grey there). Other 32-bit images ("I", "F") have no known 8-bit reading: UserError
    naming `path`. Other modes convert as Pillow's convert("RGB") (La, premultiplied, by way of LA)."""
    file_format = file_format or image.format
    if image.mode in _SIXTEEN_BIT_MODES or (image.mode == "I" and file_format in ("PNG", "PPM")):
        grey = (np.asarray(image) >> 8).astype(np.uint8)
        return np.repeat(grey[:, :, None], 3, axis=2)
    if image.mode in ("I", "F"):
        raise UserError(f"{path}: a 32-bit {'integer' if image.mode == 'I' else 'float'} image (Pillow mode "
                        f"{image.mode}) has no 8-bit reading; convert it to an 8-bit PNG or JPEG")
    if image.mode == "La":
        image = image.convert("LA")
    rgb = image if image.mode == "RGB" else image.convert("RGB")
    width, height = rgb.size  # Pillow packs BGR bytes itself: no RGB array, no reversing copy
    return np.frombuffer(bytearray(rgb.tobytes("raw", "BGR")), np.uint8).reshape(height, width, 3)


def read_label(path, num_classes, hint=""):
    """uint8 H×W class indices; values must be < num_classes or 255."""
    try:
        with Image.open(path) as image:
            if image.mode not in ("P", "L"):
                raise UserError(f"{path}: label PNG has mode {image.mode}; expected class indices "
                                f"(palette 'P' or grayscale 'L'){hint}")
            label = np.asarray(image)
    except (OSError, ValueError) as error:
        raise UserError(f"{path}: cannot read label ({error})") from error
    bad = (label >= num_classes) & (label != IGNORE_INDEX)
    if bad.any():
        raise UserError(f"{path}: label value {int(label[bad][0])} is neither a class id (0..{num_classes - 1}) "
                        f"nor {IGNORE_INDEX}{hint}")
    return label


def check_same_size(image, label, image_path, label_path):
    if image.shape[:2] != label.shape:
        raise UserError(f"{label_path}: label is {label.shape[1]}x{label.shape[0]} but {image_path} is "
                        f"{image.shape[1]}x{image.shape[0]}")


def write_label_png(path, label, palette=None):
    """Write a label map (uint8 H×W class ids, 255 = ignore) as a PNG, atomically: mode "L", or with `palette`
    (RGB triples, index = class id) mode "P", same pixel values shown in colour, 255 in VOC's cream."""
    label = np.asarray(label)
    if label.ndim != 2 or label.dtype != np.uint8:
        raise ValueError(f"label must be a uint8 H×W array, got {label.dtype} {label.shape}")
    image = Image.fromarray(label)
    if palette is not None:
        colours = ([tuple(c) for c in palette] + [(0, 0, 0)] * 256)[:256]
        if len(palette) < 256:
            colours[255] = _IGNORE_COLOUR
        image.putpalette([value for colour in colours for value in colour])
    write_atomic(path, lambda file: image.save(file, format="PNG"))


def save_image(path, image_rgb, image_format):
    """Write an RGB uint8 H×W×3 image atomically; JPEG at quality 90 like typical photo datasets."""
    options = {"quality": 90} if image_format == "JPEG" else {}
    image = Image.fromarray(np.ascontiguousarray(image_rgb))
    write_atomic(path, lambda file: image.save(file, format=image_format, **options))


def image_bytes(image, image_format, **options):
    """A Pillow image encoded in memory (then written atomically by write_bytes_atomic)."""
    buffer = io.BytesIO()
    image.save(buffer, format=image_format, **options)
    return buffer.getvalue()


# ---------------------------------------------------------------- decoded-image cache
MAGIC, VERSION = b"SEGCACHE1", 1
HEADER_BYTES = ALIGN = 64


def cache_path_for(folder, items, tag):
    """<folder>/<tag>-<hash of the item paths>.u8cache: different splits get different files."""
    digest = hashlib.sha1(json.dumps([list(item) for item in items]).encode()).hexdigest()[:12]
    return os.path.join(folder, f"{tag}-{digest}.u8cache")


def file_stats(items):
    """[[image size, image mtime_ns, label size, label mtime_ns]] for each (image, label) item."""
    return [[value for stat in map(os.stat, item) for value in (stat.st_size, stat.st_mtime_ns)] for item in items]


def read_index(path):
    """The index dict of a complete cache file, or None when there is no (readable) file."""
    try:
        with open(path, "rb") as handle:
            header = handle.read(HEADER_BYTES)
            if len(header) < HEADER_BYTES or not header.startswith(MAGIC):
                return None
            offset, length = struct.unpack_from("<QQ", header, len(MAGIC))
            handle.seek(offset)
            index = json.loads(handle.read(length))
    except (OSError, ValueError):
        return None
    return index if index.get("version") == VERSION else None


def is_current(index, items):
    """True when the index was built from exactly these items, with unchanged sizes and mtimes."""
    if index is None or index["items"] != [list(item) for item in items]:
        return False
    try:
        return index["stats"] == file_stats(items)
    except OSError:
        return False


def _write_array(handle, array):
    """Append a C-contiguous array at the next 64-byte boundary; returns [offset, shape]."""
    offset = -(-handle.tell() // ALIGN) * ALIGN
    handle.write(b"\0" * (offset - handle.tell()))
    handle.write(np.ascontiguousarray(array).tobytes())
    return [offset, list(array.shape)]


def build_cache(items, path, read_image, read_label, log=print, workers=1, heartbeat=None):
    """Decode every item with read_image(path) -> uint8 H×W×3 and read_label(path) -> uint8 H×W (their errors
    propagate; the partial file is removed) into a new cache at `path`, in `workers` threads (Pillow releases the
    GIL); heartbeat() after each item refreshes the lock. Returns the index dict."""
    stats = file_stats(items)
    temporary = f"{path}.tmp-{socket.gethostname()}-{os.getpid()}"
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    start, entries = time.time(), []
    try:
        with open(temporary, "wb") as handle, concurrent.futures.ThreadPoolExecutor(workers) as pool:
            handle.write(b"\0" * HEADER_BYTES)
            decoded = _decode_in_order(pool, items, read_image, read_label, workers)
            for number, (image, label) in enumerate(decoded, 1):
                entries.append([_write_array(handle, image), _write_array(handle, label)])
                if heartbeat is not None:
                    heartbeat()
                if number % 500 == 0:
                    log(f"cache {path}: {number}/{len(items)} decoded ({time.time() - start:.0f} s)")
            index = {"version": VERSION, "items": [list(item) for item in items], "stats": stats, "entries": entries}
            index_offset, payload = handle.tell(), json.dumps(index).encode()
            handle.write(payload)
            handle.seek(0)
            handle.write(MAGIC + struct.pack("<QQ", index_offset, len(payload)))
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.remove(temporary)
    log(f"cache {path}: {len(items)} items, {os.path.getsize(path) / 2**30:.2f} GiB, "
        f"built in {time.time() - start:.1f} s")
    return index


def _decode_in_order(pool, items, read_image, read_label, workers):
    """Yield (image, label) in item order with at most 2·workers decodes in flight, so memory stays bounded
    when writing is slower than decoding (Executor.map would queue every item at once)."""
    pending = []
    for item in items:
        pending.append(pool.submit(lambda pair: (read_image(pair[0]), read_label(pair[1])), item))
        if len(pending) >= 2 * workers:
            yield pending.pop(0).result()
    for future in pending:
        yield future.result()


def _lock_is_stale(lock_path, stale_s):
    """A lock is stale when its holder (same host) has exited or it was not refreshed for stale_s."""
    try:
        with open(lock_path) as handle:
            host, pid = handle.read().split()
        age = time.time() - os.path.getmtime(lock_path)
    except (OSError, ValueError):
        return False  # vanished or being written: look again on the next poll
    if host == socket.gethostname():
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            return True
        except PermissionError:
            pass  # alive, owned by someone else
    return age > stale_s


def _try_lock(lock_path):
    try:
        descriptor = os.open(lock_path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
        return False
    with os.fdopen(descriptor, "w") as handle:
        handle.write(f"{socket.gethostname()} {os.getpid()}")
    return True


def _remove_stale_temporaries(path, stale_s):
    """Temporary files of builds that died (they can be gigabytes); only the lock holder calls this."""
    for temporary in glob.glob(glob.escape(path) + ".tmp-*"):
        with contextlib.suppress(OSError):
            if time.time() - os.path.getmtime(temporary) > stale_s:
                os.remove(temporary)


def ensure_cache(items, path, read_image, read_label, log=print, workers=1, stale_s=300.0, poll_s=0.5):
    """A CachedReader for `items`, building the cache if missing or out of date. Safe from every process at once:
    the one that creates `<path>.lock` builds; the others poll for the cache (or, if it fails, one of them builds)."""
    logged_wait = False
    while True:
        if is_current(read_index(path), items):
            return CachedReader(path)
        lock_path = path + ".lock"
        os.makedirs(os.path.dirname(os.path.abspath(lock_path)), exist_ok=True)
        if _try_lock(lock_path):
            try:
                if not is_current(read_index(path), items):  # another builder may have just finished
                    _remove_stale_temporaries(path, stale_s)
                    last = [time.time()]
                    build_cache(items, path, read_image, read_label, log, workers, lambda: _touch(lock_path, last))
            finally:
                with contextlib.suppress(FileNotFoundError):
                    os.remove(lock_path)
            continue
        if _lock_is_stale(lock_path, stale_s):
            log(f"cache {path}: taking over a stale lock")
            with contextlib.suppress(FileNotFoundError):
                os.remove(lock_path)
            continue
        if not logged_wait:
            log(f"cache {path}: waiting for another process to finish building it")
            logged_wait = True
        time.sleep(poll_s)


def _touch(lock_path, last):
    """Refresh the lock's mtime at most once a second, so waiters know the builder is alive."""
    now = time.time()
    if now - last[0] >= 1.0:
        with contextlib.suppress(OSError):
            os.utime(lock_path)
        last[0] = now


class CachedReader:
    """A cache file's items: .image(i) uint8 H×W×3 BGR, .label(i) uint8 H×W, len(). Arrays are copy-on-write views
    of a memory map (writes stay private), opened lazily: a pickled reader carries only its path and index."""

    def __init__(self, path):
        self.path = path
        index = read_index(path)
        if index is None:
            raise FileNotFoundError(f"{path}: not a complete seg cache file")
        self.entries, self.items = index["entries"], [tuple(item) for item in index["items"]]
        self._buffer = None

    def __len__(self):
        return len(self.entries)

    def __getstate__(self):
        return {**self.__dict__, "_buffer": None}

    def _array(self, offset, shape):
        if self._buffer is None:
            self._buffer = np.memmap(self.path, dtype=np.uint8, mode="c")
        return self._buffer[offset:offset + int(np.prod(shape))].view(np.ndarray).reshape(shape)

    def image(self, i):
        return self._array(*self.entries[i][0])

    def label(self, i):
        return self._array(*self.entries[i][1])


def cached_items_reader(items, cache_path, num_classes, hint="", log=print, workers=1):
    """(image_fn(i), label_fn(i)) reading item i from the cache at `cache_path`, built if needed with
    read_image_bgr and read_label, so label values are checked once, while it is built."""
    try:
        reader = ensure_cache(items, cache_path, read_image_bgr,
                              lambda label_path: read_label(label_path, num_classes, hint), log, workers)
    except OSError as error:  # a read-only dataset folder, a full disk
        raise UserError(f"{cache_path}: building the decoded-image cache failed ({error}). A missing file: "
                        f"check the dataset; a read-only or full disk: put the cache in another folder, "
                        f"or set data.cache = false") from error
    return reader.image, reader.label
