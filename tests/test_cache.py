"""Decoded-image cache: identical to decoding, rebuilt when files change, never half-written."""
import errno
import os
import pickle
import re
import signal
import stat
import subprocess
import sys
import textwrap
import threading
import time

import numpy as np
import pytest
from PIL import Image

from seg import files, transforms
from seg.files import UserError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def write_items(folder, sizes, seed=0):
    """Images of the given (H, W) sizes alternating JPEG / PNG (RGB and palette), with labels."""
    rng, items = np.random.default_rng(seed), []
    for index, (height, width) in enumerate(sizes):
        image = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
        label = rng.integers(0, 5, (height, width), dtype=np.uint8)
        label[: height // 4] = 255
        suffix = ("jpg", "png", "png")[index % 3]
        image_path, label_path = folder / f"{index}.{suffix}", folder / f"{index}_label.png"
        picture = Image.fromarray(image)
        if index % 3 == 2:  # a palette image: decoding must convert it like files.read_image_bgr does
            picture = picture.quantize(16)
        picture.save(image_path)
        Image.fromarray(label).save(label_path)
        items.append((str(image_path), str(label_path)))
    return items


def decode(items, index):
    image_path, label_path = items[index]
    return files.read_image_bgr(image_path), files.read_label(label_path, 5)


def test_cached_arrays_and_samples_equal_decoding(tmp_path):
    items = write_items(tmp_path, [(40, 56), (33, 70), (64, 48), (25, 25)])
    path = files.cache_path_for(str(tmp_path / ".cache"), items, "voc")
    image_fn, label_fn = files.cached_items_reader(items, path, num_classes=5)
    for index in range(len(items)):
        image, label = decode(items, index)
        for cached, decoded in ((image_fn(index), image), (label_fn(index), label)):
            assert cached.dtype == np.uint8 and cached.shape == decoded.shape
            assert np.array_equal(cached, decoded)
        # the training sampler sees the same arrays, so it draws the same sample
        params = {"scale": (80, 32), "crop_hw": (24, 24)}
        expected = transforms.voc_train_sample(np.random.default_rng(index), image, label, **params)
        got = transforms.voc_train_sample(np.random.default_rng(index), image_fn(index), label_fn(index), **params)
        assert all(np.array_equal(a, b) for a, b in zip(got, expected))
    # workers receive a pickled reader: it carries the path and index, not the pixels
    reader = pickle.loads(pickle.dumps(image_fn.__self__))
    assert len(pickle.dumps(image_fn.__self__)) < 4000
    assert np.array_equal(reader.image(1), decode(items, 1)[0])


def test_writes_to_a_returned_array_stay_private(tmp_path):
    items = write_items(tmp_path, [(20, 30)])
    path = str(tmp_path / "c.u8cache")
    reader = files.ensure_cache(items, path, files.read_image_bgr, lambda p: files.read_label(p, 5))
    reader.image(0)[:] = 7  # a transform modifying its input in place must not corrupt the cache
    assert np.array_equal(files.CachedReader(path).image(0), decode(items, 0)[0])


def test_rebuilt_when_a_file_changes_or_the_list_changes(tmp_path):
    items = write_items(tmp_path, [(20, 30), (24, 16)])
    path = str(tmp_path / "c.u8cache")
    calls = []

    def read_image(image_path):
        calls.append(image_path)
        return files.read_image_bgr(image_path)

    read_label = lambda p: files.read_label(p, 5)  # noqa: E731
    files.ensure_cache(items, path, read_image, read_label)
    files.ensure_cache(items, path, read_image, read_label)
    assert len(calls) == 2  # the second call reused the cache
    replacement = np.full((24, 16, 3), 99, np.uint8)
    Image.fromarray(replacement).save(items[1][0])  # same name, new content, size and mtime
    os.utime(items[1][0], ns=(time.time_ns(), time.time_ns() + 10**9))
    reader = files.ensure_cache(items, path, read_image, read_label)
    assert len(calls) == 4 and np.array_equal(reader.image(1), replacement[:, :, ::-1])
    assert not files.is_current(files.read_index(path), items[:1])  # another item list: not this cache
    assert files.cache_path_for("d", items[:1], "voc") != files.cache_path_for("d", items, "voc")


def test_interrupted_build_leaves_nothing(tmp_path):
    items = write_items(tmp_path, [(20, 30)] * 4)
    path = str(tmp_path / "c.u8cache")

    def read_image(image_path):
        if image_path == items[2][0]:
            raise KeyboardInterrupt
        return files.read_image_bgr(image_path)

    with pytest.raises(KeyboardInterrupt):
        files.ensure_cache(items, path, read_image, lambda p: files.read_label(p, 5))
    assert sorted(os.listdir(tmp_path)) == sorted(name for pair in items for name in map(os.path.basename, pair))
    reader = files.ensure_cache(items, path, files.read_image_bgr, lambda p: files.read_label(p, 5))
    assert np.array_equal(reader.label(3), decode(items, 3)[1])


KILLED_BUILDER = textwrap.dedent("""
    import sys, time
    sys.path.insert(0, {root!r})
    from seg import data, files
    items = {items!r}
    def slow(path):
        print("decoding", flush=True)
        time.sleep(0.2)
        return files.read_image_bgr(path)
    files.ensure_cache(items, {path!r}, slow, lambda p: files.read_label(p, 5))
""")


def test_killed_builder_leaves_no_cache_and_its_lock_is_taken_over(tmp_path):
    items = write_items(tmp_path, [(20, 30)] * 6)
    path = str(tmp_path / "c.u8cache")
    script = KILLED_BUILDER.format(root=ROOT, items=items, path=path)
    process = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    for _ in range(2):
        assert process.stdout.readline().strip() == "decoding"  # two items in: mid-build
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert not os.path.exists(path) and files.read_index(path) is None
    assert os.path.exists(path + ".lock")  # a dead builder's lock remains ...
    reader = files.ensure_cache(items, path, files.read_image_bgr, lambda p: files.read_label(p, 5), poll_s=0.05)
    assert not os.path.exists(path + ".lock")  # ... and is taken over
    assert all(np.array_equal(reader.image(i), decode(items, i)[0]) for i in range(len(items)))


def test_concurrent_callers_build_once_and_all_get_the_cache(tmp_path):
    items = write_items(tmp_path, [(20, 30), (30, 20), (16, 16)])
    path = str(tmp_path / "c.u8cache")
    calls, results = [], []

    def read_image(image_path):
        calls.append(image_path)
        time.sleep(0.05)
        return files.read_image_bgr(image_path)

    def run():
        reader = files.ensure_cache(items, path, read_image, lambda p: files.read_label(p, 5), poll_s=0.02)
        results.append([reader.image(i).copy() for i in range(len(items))])

    threads = [threading.Thread(target=run) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(calls) == len(items) and len(results) == 3
    expected = [decode(items, i)[0] for i in range(len(items))]
    assert all(np.array_equal(a, b) for images in results for a, b in zip(images, expected))


def test_unwritable_cache_folder_is_a_user_error(tmp_path):
    items = write_items(tmp_path, [(20, 30)])
    blocker = tmp_path / "not_a_folder"
    blocker.write_text("")
    with pytest.raises(UserError, match="not_a_folder.*data.cache = false"):
        files.cached_items_reader(items, str(blocker / "c.u8cache"), num_classes=5)


@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o077, 0o600)])
def test_atomic_writes_get_the_mode_of_an_ordinary_open(tmp_path, umask, mode):
    previous = os.umask(umask)
    try:
        files.write_text_atomic("text", tmp_path / "atomic.txt")
        with open(tmp_path / "plain.txt", "w"):
            pass
    finally:
        os.umask(previous)
    assert stat.S_IMODE(os.stat(tmp_path / "plain.txt").st_mode) == mode  # what open() gives
    assert stat.S_IMODE(os.stat(tmp_path / "atomic.txt").st_mode) == mode


def test_a_failed_atomic_write_names_the_path_and_leaves_the_old_file(tmp_path):
    target = tmp_path / "result.json"
    target.write_text("old")

    def fill_the_disk(stream):
        stream.write(b"half of the new")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    with pytest.raises(UserError, match=re.escape(f"{target}: cannot write (No space left on device)")):
        files.write_atomic(target, fill_the_disk)
    assert target.read_text() == "old" and os.listdir(tmp_path) == ["result.json"]  # no .tmp left
    folder = tmp_path / "a_folder"  # renaming onto a non-empty folder fails
    (folder / "inside").mkdir(parents=True)
    with pytest.raises(UserError, match=re.escape(f"{folder}: cannot write (")):
        files.write_text_atomic("text", folder)
    assert sorted(os.listdir(tmp_path)) == ["a_folder", "result.json"] and os.listdir(folder) == ["inside"]
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    with pytest.raises(UserError, match=re.escape(f"{blocker / 'sub' / 'out.txt'}: cannot write (")):
        files.write_text_atomic("text", blocker / "sub" / "out.txt")


def test_the_cache_lock_is_an_ordinary_file_not_an_executable(tmp_path):
    items, modes = write_items(tmp_path, [(20, 30)]), []
    path = str(tmp_path / "c.u8cache")

    def read_image(image_path):
        modes.append(stat.S_IMODE(os.stat(path + ".lock").st_mode))
        return files.read_image_bgr(image_path)

    previous = os.umask(0o022)
    try:
        files.ensure_cache(items, path, read_image, lambda p: files.read_label(p, 5))
    finally:
        os.umask(previous)
    assert modes == [0o644]  # 0o666 & ~umask, what open() gives: not executable


def test_an_empty_lock_is_waited_on_while_young_and_taken_over_once_stale(tmp_path):
    items, results = write_items(tmp_path, [(20, 30)]), []
    path, start = str(tmp_path / "c.u8cache"), time.time()
    open(path + ".lock", "w").close()  # created, but writing the host and PID into it failed: it stays empty

    def run():
        results.append(files.ensure_cache(items, path, files.read_image_bgr, lambda p: files.read_label(p, 5),
                                          stale_s=0.5, poll_s=0.02))

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(timeout=30)
    assert results, "a waiter hangs on an empty lock"
    assert time.time() - start >= 0.45  # while young it may be being written: waited for stale_s
    assert np.array_equal(results[0].image(0), decode(items, 0)[0]) and not os.path.exists(path + ".lock")
