"""Everything seg reads and writes besides checkpoints: atomic writes, image and label decoding and encoding, and
the decoded-image cache. UserError, the one exception for mistakes a user can fix, lives here too.

Atomic writes: a temporary file in the target folder, then os.replace, so a crash or Ctrl-C never leaves a
half-written output behind.

Decoded-image cache (`data.cache = true`): decode every PNG/JPEG once, then read uint8 arrays.

Decoding dominates the data pipeline (a 2048×1024 Cityscapes PNG takes ~50 ms with Pillow; the whole
detectron2 mapper takes ~105 ms), so the first run writes every decoded image (BGR H×W×3) and label
(H×W) into one file, and loader workers memory-map it: the pages are shared by all workers and
processes on the machine, and a sample costs a copy instead of a decode.

One file per item list, laid out as
    header (64 bytes): MAGIC, index offset and index length (little-endian uint64)
    arrays, each starting on a 64-byte boundary
    index: JSON with the item paths, their (size, mtime_ns), and each array's offset and shape.
It is written to a temporary file and renamed into place, so a file under the final name is always
complete: an interrupted build leaves no cache behind. A lock file (created with O_EXCL) elects one
builder; other processes wait for the finished file. A lock whose process died, or that has not been
refreshed for `stale_s` seconds, is taken over. If two processes still build at once (a lock judged
stale too early), each renames a complete file, so readers never see a mixed one.

The cache is valid while the item list and every file's size and mtime match the index; otherwise it
is rebuilt. Disk cost is the decoded size: ~0.75 MB per VOC sample, ~8.4 MB per Cityscapes sample
(25 GB for the 2975 training images), so it pays where that fits in the page cache or on a fast disk.
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
from PIL import Image

IGNORE_INDEX = 255
_IGNORE_COLOUR = (224, 224, 192)  # colour of index 255 in the official VOC PNGs


class UserError(Exception):
    """A bad config key, missing file or malformed input.

    The message names the file or key and says what to do; run.py prints it without a stack trace and
    exits with code 2.
    """


# ---------------------------------------------------------------- atomic writes


def write_atomic(path, write):
    """Call `write(binary_file)` on a temporary file beside `path`, then rename it to `path` in one step.

    `path` is afterwards either the old file or the complete new one; the temporary never outlives a failure.
    """
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=folder, prefix=f".{os.path.basename(path)}.", suffix=".tmp")
    try:
        with os.fdopen(handle, "wb") as stream:
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


# ---------------------------------------------------------------- images and labels


def read_image_bgr(path):
    """uint8 H×W×3 in BGR order, as both references feed their models. Pillow packs the pixels straight
    into BGR bytes: no RGB copy and no reversing copy (bytearray: a writable array, as torch wants)."""
    try:
        with Image.open(path) as image:
            rgb = image if image.mode == "RGB" else image.convert("RGB")
            width, height = rgb.size
            return np.frombuffer(bytearray(rgb.tobytes("raw", "BGR")), np.uint8).reshape(height, width, 3)
    except (OSError, ValueError) as error:
        raise UserError(f"{path}: cannot read image ({error}); replace or remove it from the split") from error


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
    """Write a label map (uint8 H×W class ids, 255 = ignore) as a PNG, atomically.

    With `palette` (RGB triples, index = class id) the PNG is mode "P" – its pixel values are still the class ids,
    it just shows in colour like the VOC SegmentationClass files, with 255 drawn in VOC's cream; without, mode "L".
    """
    label = np.asarray(label)
    if label.ndim != 2 or label.dtype != np.uint8:
        raise ValueError(f"label must be a uint8 H×W array, got {label.dtype} {label.shape}")
    image = Image.fromarray(label)
    if palette is not None:
        colours = [tuple(c) for c in palette][:256]
        colours += [(0, 0, 0)] * (256 - len(colours))
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
    """A Pillow image encoded in memory (then written atomically by files.write_bytes_atomic)."""
    buffer = io.BytesIO()
    image.save(buffer, format=image_format, **options)
    return buffer.getvalue()


# ---------------------------------------------------------------- decoded-image cache
MAGIC = b"SEGCACHE1"
HEADER_BYTES = 64
ALIGN = 64
VERSION = 1


# ---------------------------------------------------------------- naming and validity


def cache_path_for(folder, items, tag):
    """<folder>/<tag>-<hash of the item paths>.u8cache: different splits get different files."""
    digest = hashlib.sha1(json.dumps([list(item) for item in items]).encode()).hexdigest()[:12]
    return os.path.join(folder, f"{tag}-{digest}.u8cache")


def file_stats(items):
    """[[image size, image mtime_ns, label size, label mtime_ns]] for each (image, label) item."""
    stats = []
    for image_path, label_path in items:
        image, label = os.stat(image_path), os.stat(label_path)
        stats.append([image.st_size, image.st_mtime_ns, label.st_size, label.st_mtime_ns])
    return stats


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


# ---------------------------------------------------------------- building


def _write_array(handle, array):
    """Append a C-contiguous array at the next 64-byte boundary; returns [offset, shape]."""
    offset = -(-handle.tell() // ALIGN) * ALIGN
    handle.write(b"\0" * (offset - handle.tell()))
    handle.write(np.ascontiguousarray(array).tobytes())
    return [offset, list(array.shape)]


def build_cache(items, path, read_image, read_label, log=print, workers=1, heartbeat=None):
    """Decode every (image, label) item into a new cache file at `path`, atomically.

    read_image(path) -> uint8 H×W×3, read_label(path) -> uint8 H×W (their errors propagate, and the
    partial file is removed). `workers` threads decode in parallel (Pillow releases the GIL while
    decoding); arrays are written in item order. heartbeat() is called after each item (lock refresh).
    Returns the index dict.
    """
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
            index = {"version": VERSION, "items": [list(item) for item in items], "stats": stats,
                     "entries": entries}
            payload = json.dumps(index).encode()
            index_offset = handle.tell()
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
    """Yield (image, label) in item order, with at most 2·workers decodes in flight, so memory stays
    bounded when writing is slower than decoding (Executor.map would queue every item at once)."""
    pending = []
    for item in items:
        pending.append(pool.submit(lambda pair: (read_image(pair[0]), read_label(pair[1])), item))
        if len(pending) >= 2 * workers:
            yield pending.pop(0).result()
    for future in pending:
        yield future.result()


# ---------------------------------------------------------------- one builder, the others wait


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
    """Return a CachedReader for `items`, building the cache first if it is missing or out of date.

    Safe to call from every process at once: the one that creates `<path>.lock` builds, the others
    poll until a current cache appears (or the builder fails, and then one of them tries).
    """
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


# ---------------------------------------------------------------- reading


class CachedReader:
    """Read-side of a cache file: .image(i) uint8 H×W×3 BGR, .label(i) uint8 H×W, len() items.

    Arrays are copy-on-write views of a memory map (writable; writes stay private to the process and
    never reach the file). The map is opened lazily, so a reader pickled into DataLoader workers sends
    only its path and each worker maps the same shared pages.
    """

    def __init__(self, path):
        self.path = path
        index = read_index(path)
        if index is None:
            raise FileNotFoundError(f"{path}: not a complete seg cache file")
        self.entries = index["entries"]
        self.items = [tuple(item) for item in index["items"]]
        self._buffer = None

    def __len__(self):
        return len(self.entries)

    def __getstate__(self):
        return {"path": self.path, "entries": self.entries, "items": self.items, "_buffer": None}

    def _array(self, offset, shape):
        if self._buffer is None:
            self._buffer = np.memmap(self.path, dtype=np.uint8, mode="c")
        size = int(np.prod(shape))
        return self._buffer[offset:offset + size].view(np.ndarray).reshape(shape)

    def image(self, i):
        return self._array(*self.entries[i][0])

    def label(self, i):
        return self._array(*self.entries[i][1])


def cached_items_reader(items, cache_path, num_classes, hint="", log=print, workers=1):
    """(image_fn(i), label_fn(i)) reading item i from the cache at `cache_path` (built if needed).

    Decoding goes through seg.data's readers, so label values are checked (against num_classes) once,
    while the cache is built.
    """
    try:
        reader = ensure_cache(items, cache_path, read_image_bgr,
                              lambda label_path: read_label(label_path, num_classes, hint), log, workers)
    except OSError as error:  # a read-only dataset folder, a full disk
        raise UserError(f"{cache_path}: building the decoded-image cache failed ({error}). A missing file: "
                        f"check the dataset; a read-only or full disk: put the cache in another folder, "
                        f"or set data.cache = false") from error
    return reader.image, reader.label
