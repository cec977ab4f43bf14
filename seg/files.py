"""What seg reads and writes besides checkpoints: UserError, atomic writes, image and label decoding and encoding, and
the decoded-image cache (`data.cache = true`). Decoding dominates the data pipeline (a 2048×1024 Cityscapes PNG takes
~50 ms in Pillow, the whole detectron2 mapper ~105 ms), so an item list's images and labels are decoded once into one
file that loader workers memory-map (shared pages): a 64-byte header (MAGIC, index offset and length as little-endian
uint64), 64-byte aligned arrays, a JSON index (item paths, (size, mtime_ns), offsets, shapes; rebuilt on change)."""
import atexit
import concurrent.futures
import contextlib
import glob
import hashlib
import importlib
import io
import json
import os
import socket
import struct
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

IGNORE_INDEX = 255
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")
_IGNORE_COLOUR = (224, 224, 192)  # colour of index 255 in the official VOC PNGs
_UNREADABLE = (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError)  # bomb: over ~179 megapixels
MAGIC, VERSION, HEADER_BYTES, ALIGN = b"SEGCACHE1", 1, 64, 64  # decoded-image cache file


class UserError(Exception):
    """A mistake the user can fix; the message names the file or key and says what to do (run.py exits 2)."""


def optional_import(name, pip):
    """Import an optional dependency, or UserError naming the pip command that installs it."""
    try:
        return importlib.import_module(name)
    except ImportError:
        raise UserError(f"this needs the optional package {name}: pip install {pip}") from None


def name_list(names, limit=10):
    """"a, b, c and 4 more": the first `limit` names of a message."""
    return ", ".join(map(str, names[:limit])) + (f" and {len(names) - limit} more" if len(names) > limit else "")


def write_atomic(path, write):
    """Call `write(binary_file)` on a temporary file beside `path`, then rename it: `path` is the old file or the
    complete new one, with open()'s mode. OS errors (a full disk, a read-only folder) become UserErrors naming it."""
    folder, temporary = os.path.dirname(os.path.abspath(path)), None
    try:
        os.makedirs(folder, exist_ok=True)
        with open(os.path.join(folder, f".{os.path.basename(path)}.{os.urandom(6).hex()}.tmp"), "xb") as stream:
            temporary = stream.name
            write(stream)
            stream.flush()
            os.fsync(stream.fileno())
        os.replace(temporary, path)
    except BaseException as error:
        if temporary is not None and os.path.exists(temporary):
            os.remove(temporary)
        if isinstance(error, OSError) and error.errno is not None:
            raise UserError(f"{path}: cannot write ({error.strerror}); free space or choose another folder") from error
        raise


def write_bytes_atomic(payload, path):
    write_atomic(path, lambda stream: stream.write(payload))


def write_text_atomic(text, path):
    write_bytes_atomic(text.encode("utf-8"), path)


class Tee:
    """A text stream that writes to `stream` and to the line-buffered file `copy` (stdlib streams are objects)."""

    def __init__(self, stream, copy):
        self.stream, self.copy = stream, copy

    def write(self, text):
        self.copy.write(text)
        return self.stream.write(text)

    def __getattr__(self, name):  # flush, fileno, isatty, encoding: the terminal's
        return getattr(self.stream, name)


@contextlib.contextmanager
def tee_output(path):
    """Inside, whatever is printed to stdout and stderr is also appended to `path` (line-buffered); yields the file.
    An error that ends the block is written there too, before it propagates."""
    with open(path, "a", buffering=1, encoding="utf-8") as copy:
        saved = sys.stdout, sys.stderr
        sys.stdout, sys.stderr = Tee(saved[0], copy), Tee(saved[1], copy)
        try:
            yield copy
        except BaseException as error:
            copy.write(f"ended by {type(error).__name__}: {error}\n")
            raise
        finally:
            sys.stdout, sys.stderr = saved


def read_image_bgr(path, upright=False):
    """uint8 H×W×3 BGR, the order both references feed their models; upright: turn by the EXIF orientation first."""
    try:
        with Image.open(path) as image:
            return to_bgr(ImageOps.exif_transpose(image) if upright else image, path, image.format)
    except _UNREADABLE as error:
        raise UserError(f"{path}: cannot read image ({error}); replace or remove it from the split") from error


def to_bgr(image, path="", file_format=None):
    """uint8 H×W×3 BGR, writable (as torch wants), of a Pillow image of any mode, as convert("RGB") (La via LA).
    16-bit grey keeps its top 8 bits (value >> 8, as Pillow decodes 16-bit RGB PNGs): modes I;16*, and "I" (older
    Pillow's) from a PNG or PGM `file_format` (a turned copy has none); other "I" and "F": UserError naming `path`."""
    file_format = file_format or image.format
    if image.mode in ("I;16", "I;16L", "I;16B", "I;16N") or (image.mode == "I" and file_format in ("PNG", "PPM")):
        return np.repeat((np.asarray(image) >> 8).astype(np.uint8)[:, :, None], 3, axis=2)
    if image.mode in ("I", "F"):
        raise UserError(f"{path}: a 32-bit {'integer' if image.mode == 'I' else 'float'} image (Pillow mode "
                        f"{image.mode}) has no 8-bit reading; convert it to an 8-bit PNG or JPEG")
    rgb = image if image.mode == "RGB" else (image.convert("LA") if image.mode == "La" else image).convert("RGB")
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


def write_label_png(path, label, palette=None):
    """Write a label map (uint8 H×W class ids, 255 = ignore) as a PNG, atomically: mode "L", or with `palette`
    (RGB triples, index = class id) mode "P", same pixel values shown in colour, 255 in VOC's cream."""
    label = np.asarray(label)
    if label.ndim != 2 or label.dtype != np.uint8:
        raise ValueError(f"label must be a uint8 H×W array, got {label.dtype} {label.shape}")
    image = Image.fromarray(label)
    if palette is not None:
        colours = [tuple(c) for c in palette] + [(0, 0, 0)] * (255 - len(palette)) + [_IGNORE_COLOUR]
        image.putpalette([value for colour in colours[:256] for value in colour])
    write_atomic(path, lambda file: image.save(file, format="PNG"))


def save_image(path, image_rgb, image_format):
    """Write an RGB uint8 H×W×3 image atomically; JPEG at quality 90 like typical photo datasets."""
    image, options = Image.fromarray(np.ascontiguousarray(image_rgb)), {"quality": 90} if image_format == "JPEG" else {}
    write_atomic(path, lambda file: image.save(file, format=image_format, **options))


def image_bytes(image, image_format, **options):
    """A Pillow image encoded in memory (then written atomically by write_bytes_atomic)."""
    buffer = io.BytesIO()
    image.save(buffer, format=image_format, **options)
    return buffer.getvalue()


def cache_path_for(folder, items, tag):
    """<folder>/<tag>-<hash of the item paths>.u8cache: different splits get different files."""
    digest = hashlib.sha1(json.dumps([list(item) for item in items]).encode()).hexdigest()[:12]
    return os.path.join(folder, f"{tag}-{digest}.u8cache")


def file_stats(items):
    """[[image size, image mtime_ns, label size, label mtime_ns]] for each (image, label) item."""
    return [[value for stat in map(os.stat, item) for value in (stat.st_size, stat.st_mtime_ns)] for item in items]


def read_index(path):
    """The index dict of a complete cache file, or None when there is no (readable) file."""
    with contextlib.suppress(OSError, ValueError), open(path, "rb") as handle:
        header = handle.read(HEADER_BYTES)
        if len(header) == HEADER_BYTES and header.startswith(MAGIC):
            offset, length = struct.unpack_from("<QQ", header, len(MAGIC))
            handle.seek(offset)
            index = json.loads(handle.read(length))
            return index if index.get("version") == VERSION else None
    return None


def is_current(index, items):
    """True when the index was built from exactly these items, with unchanged sizes and mtimes."""
    with contextlib.suppress(OSError):  # a file vanished
        return index is not None and index["items"] == list(map(list, items)) and index["stats"] == file_stats(items)
    return False


def build_cache(items, path, read_image, read_label, log, workers, lock_path):
    """Decode every item with read_image(path) -> uint8 H×W×3 and read_label(path) -> uint8 H×W in `workers` threads
    (Pillow releases the GIL) into a temporary file renamed to `path` (their errors propagate; it is removed); touch
    `lock_path` at most once a second, so waiters know the builder is alive. Returns the index dict."""
    stats, temporary = file_stats(items), f"{path}.tmp-{socket.gethostname()}-{os.getpid()}"
    start, touched, entries = time.time(), time.time(), []
    try:
        with open(temporary, "wb") as handle, concurrent.futures.ThreadPoolExecutor(workers) as pool:
            handle.write(b"\0" * HEADER_BYTES)
            for number, (image, label) in enumerate(_decode_in_order(pool, items, read_image, read_label, workers), 1):
                entries.append([])
                for array in (image, label):  # each at the next 64-byte boundary, C-contiguous
                    handle.write(b"\0" * (-handle.tell() % ALIGN))
                    entries[-1].append([handle.tell(), list(array.shape)])
                    handle.write(np.ascontiguousarray(array).tobytes())
                if time.time() - touched >= 1.0:
                    touched = time.time()
                    with contextlib.suppress(OSError):
                        os.utime(lock_path)
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
        Path(temporary).unlink(missing_ok=True)
    log(f"cache {path}: {len(items)} items, {os.path.getsize(path) / 2**30:.2f} GiB, "
        f"built in {time.time() - start:.1f} s")
    return index


def _decode_in_order(pool, items, read_image, read_label, workers):
    """(image, label) in item order, at most 2·workers decodes ahead: bounded memory, unlike Executor.map."""
    pending = []
    for item in items:
        pending.append(pool.submit(lambda pair: (read_image(pair[0]), read_label(pair[1])), item))
        if len(pending) >= 2 * workers:
            yield pending.pop(0).result()
    yield from (future.result() for future in pending)


def _lock_is_stale(lock_path, stale_s):
    """A lock is stale when its holder (same host) has exited or it was not refreshed for stale_s."""
    try:
        age = time.time() - os.path.getmtime(lock_path)
        with open(lock_path) as handle:
            owner = handle.read().split()
    except OSError:
        return False  # vanished: look again on the next poll
    if len(owner) == 2 and owner[0] == socket.gethostname():
        try:
            with contextlib.suppress(PermissionError):  # alive, owned by someone else
                os.kill(int(owner[1]), 0)
        except ProcessLookupError:
            return True
    return age > stale_s  # an unparseable lock too: young, being written; old, its writing failed


def take_lock(path):
    """Create `path` holding "host pid" (a hard link: exclusive, never half-written), taking over a lock whose process
    is gone from this host or is this one; else UserError naming the holder. release() is returned and runs at exit."""
    mine, temporary = f"{socket.gethostname()} {os.getpid()}", f"{path}.{os.getpid()}.tmp"
    write_text_atomic(mine, temporary)
    try:
        for attempt in range(2):
            with contextlib.suppress(FileExistsError):
                os.link(temporary, path)
                break
            holder = ""
            with contextlib.suppress(OSError), open(path) as handle:
                holder = handle.read()
            if attempt or holder not in (mine, "") and not _lock_is_stale(path, float("inf")):
                host, _, pid = holder.partition(" ")
                raise UserError(f"{os.path.dirname(path)} is in use by process {pid} on {host} ({path}): wait for "
                                f"that run to end, or choose another output_dir (delete {path} if that process is "
                                f"gone from its host)")
            Path(path).unlink(missing_ok=True)
    finally:
        os.remove(temporary)

    def release():
        with contextlib.suppress(OSError), open(path) as handle:
            if handle.read() == mine:
                os.remove(path)
    atexit.register(release)
    return release


def ensure_cache(items, path, read_image, read_label, log=print, workers=1, stale_s=300.0, poll_s=0.5):
    """A CachedReader for `items`, built if missing or out of date. Safe from every process at once: the one that
    creates `<path>.lock` builds; the others poll (one of them builds if that fails or the lock goes stale)."""
    lock_path, logged_wait = path + ".lock", False
    while not is_current(read_index(path), items):
        os.makedirs(os.path.dirname(os.path.abspath(lock_path)), exist_ok=True)
        try:
            with open(lock_path, "x") as handle:  # O_EXCL: one builder
                handle.write(f"{socket.gethostname()} {os.getpid()}")
        except FileExistsError:
            if _lock_is_stale(lock_path, stale_s):
                log(f"cache {path}: taking over a stale lock")
                Path(lock_path).unlink(missing_ok=True)
                continue
            if not logged_wait:
                log(f"cache {path}: waiting for another process to finish building it")
                logged_wait = True
            time.sleep(poll_s)
            continue
        try:
            if not is_current(read_index(path), items):  # another builder may have just finished
                for temporary in glob.glob(glob.escape(path) + ".tmp-*"):  # of builds that died (maybe gigabytes)
                    with contextlib.suppress(OSError):
                        if time.time() - os.path.getmtime(temporary) > stale_s:
                            os.remove(temporary)
                build_cache(items, path, read_image, read_label, log, workers, lock_path)
        finally:
            Path(lock_path).unlink(missing_ok=True)
    return CachedReader(path)


class CachedReader:
    """A cache file's items: .image(i) uint8 H×W×3 BGR, .label(i) uint8 H×W, len(). Arrays are copy-on-write views
    of a memory map (writes stay private), opened lazily: a pickled reader carries only its path and index."""

    def __init__(self, path):
        self.path, self._buffer, index = path, None, read_index(path)
        if index is None:
            raise FileNotFoundError(f"{path}: not a complete seg cache file")
        self.entries, self.items = index["entries"], [tuple(item) for item in index["items"]]

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
    """(image_fn(i), label_fn(i)) of the cache at `cache_path`, built if needed (label values are checked then)."""
    try:
        reader = ensure_cache(items, cache_path, read_image_bgr,
                              lambda label_path: read_label(label_path, num_classes, hint), log, workers)
    except OSError as error:  # a read-only dataset folder, a full disk
        raise UserError(f"{cache_path}: building the decoded-image cache failed ({error}). A missing file: "
                        f"check the dataset; a read-only or full disk: put the cache in another folder, "
                        f"or set data.cache = false") from error
    return reader.image, reader.label
