"""Sampler sharding and resumption, collation and padding, image decoding, label validation."""
import itertools
import struct
import zlib

import numpy as np
import pytest
import torch
from PIL import Image

import run
from seg import config, data, files, prepare, tasks, train, transforms
from seg.files import UserError


def take(sampler, n):
    return list(itertools.islice(iter(sampler), n))


def test_shards_cover_each_epoch_once_and_agree_with_one_process():
    size, world = 10, 2
    ranks = [take(data.InfiniteShardedSampler(size, r, world, seed=3), 10) for r in range(world)]
    single = take(data.InfiniteShardedSampler(size, 0, 1, seed=3), 20)
    # each epoch (5 samples per rank) covers the dataset exactly once across ranks
    for epoch in range(2):
        indices = [i for rank in ranks for i, _ in rank[epoch * 5:(epoch + 1) * 5]]
        assert sorted(indices) == list(range(size))
    # one process sees the same (index, global position) pairs, in the global order
    merged = sorted(pair for rank in ranks for pair in rank)
    assert sorted(single, key=lambda p: p[1]) == sorted(merged, key=lambda p: p[1])
    assert [p for _, p in single] == list(range(20))


def test_sampler_resumes_mid_stream():
    full = take(data.InfiniteShardedSampler(7, 1, 2, seed=0), 12)
    resumed = take(data.InfiniteShardedSampler(7, 1, 2, seed=0, start=5), 7)
    assert resumed == full[5:]


def test_collate_pads_bottom_right_with_ignore():
    a = (np.full((3, 5, 3), 7, np.uint8), np.ones((3, 5), np.uint8))
    b = (np.full((4, 2, 3), 9, np.uint8), np.zeros((4, 2), np.uint8))
    batch = data.collate([a, b], divisor=4)
    assert batch["image"].shape == (2, 3, 4, 8) and batch["label"].shape == (2, 4, 8)
    assert batch["label"].dtype == torch.uint8 and "jitter" not in batch  # widened on the device
    assert batch["hw"].tolist() == [[3, 5], [4, 2]]
    assert (batch["label"][0, 3:] == 255).all() and (batch["label"][0, :, 5:] == 255).all()
    assert (batch["label"][0, :3, :5] == 1).all() and (batch["image"][1, :, :4, :2] == 9).all()
    assert (batch["image"][0, :, 3:] == 0).all()


def test_label_out_of_range_names_the_file(tmp_path):
    path = tmp_path / "bad.png"
    label = np.zeros((4, 4), np.uint8)
    label[1, 1] = 40
    Image.fromarray(label).save(path)
    with pytest.raises(UserError, match="bad.png.*40"):
        files.read_label(str(path), 21)
    label[1, 1] = 255
    Image.fromarray(label).save(path)
    assert files.read_label(str(path), 21)[1, 1] == 255


def test_corrupt_image_names_the_file(tmp_path):
    path = tmp_path / "broken.jpg"
    path.write_bytes(b"not a jpeg")
    with pytest.raises(UserError, match="broken.jpg"):
        files.read_image_bgr(str(path))


def test_image_is_bgr(tmp_path):
    path = tmp_path / "red.png"
    Image.fromarray(np.array([[[255, 0, 0]]], np.uint8)).save(path)
    assert files.read_image_bgr(str(path)).tolist() == [[[0, 0, 255]]]


@pytest.mark.parametrize("mode", ["RGB", "L", "P", "RGBA", "CMYK"])
def test_images_of_every_mode_decode_to_writable_bgr(tmp_path, mode):
    rgb = np.random.default_rng(0).integers(0, 256, (5, 7, 3), dtype=np.uint8)
    image = Image.fromarray(rgb).convert(mode)
    path = tmp_path / ("image.jpg" if mode == "CMYK" else "image.png")
    image.save(path)
    expected = np.asarray(Image.open(path).convert("RGB"))[:, :, ::-1]
    got = files.read_image_bgr(str(path))
    assert got.shape == (5, 7, 3) and got.flags.writeable and np.array_equal(got, expected)


@pytest.mark.parametrize("mode, suffix", [("1", "png"), ("LA", "png"), ("PA", "tif"), ("YCbCr", "tif"),
                                          ("LAB", "tif")])
def test_images_of_the_other_file_modes_decode_like_pillow(tmp_path, mode, suffix):
    rgb = np.random.default_rng(0).integers(0, 256, (5, 7, 3), dtype=np.uint8)
    path = tmp_path / f"image.{suffix}"
    Image.fromarray(rgb).convert(mode).save(path)
    with Image.open(path) as image:
        assert image.mode == mode  # the file really holds this mode
        expected = np.asarray(image.convert("RGB"))[:, :, ::-1]
    assert np.array_equal(files.read_image_bgr(str(path)), expected)


def write_png_16_bit(path, values):
    """A 16-bit PNG of uint16 H×W (grey) or H×W×3 (RGB) values, encoded here: Pillow cannot write 16-bit RGB."""
    height, width = values.shape[:2]
    rows = b"".join(b"\0" + row.astype(">u2").tobytes() for row in values)

    def chunk(kind, body):
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    header = struct.pack(">IIBBBBB", width, height, 16, 2 if values.ndim == 3 else 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows))
                     + chunk(b"IEND", b""))


def test_16_bit_images_keep_their_top_8_bits(tmp_path):
    """16-bit grey decodes as value >> 8, as Pillow decodes 16-bit RGB PNGs, instead of saturating at 255."""
    values = np.linspace(0, 65535, 6 * 40).astype(np.uint16).reshape(6, 40)
    values[0, :5] = [255, 256, 32767, 32768, 65279]
    expected = np.repeat((values // 256).astype(np.uint8)[:, :, None], 3, axis=2)
    Image.fromarray(values).save(tmp_path / "little.png")
    Image.frombytes("I;16B", values.shape[::-1], values.astype(">u2").tobytes()).save(tmp_path / "big.tif")
    Image.fromarray(values).save(tmp_path / "grey.pgm")
    write_png_16_bit(tmp_path / "grey16.png", values)
    write_png_16_bit(tmp_path / "rgb16.png", np.repeat(values[:, :, None], 3, axis=2))
    # the modes Pillow opens them in ("I": 16-bit PGM, and 16-bit grey PNG in older Pillow versions)
    cases = {"little.png": ("I;16", "I"), "big.tif": ("I;16B",), "grey.pgm": ("I",), "grey16.png": ("I;16", "I"),
             "rgb16.png": ("RGB",)}
    for name, modes in cases.items():
        with Image.open(tmp_path / name) as image:
            assert image.mode in modes, name
        got = files.read_image_bgr(str(tmp_path / name))
        assert got.dtype == np.uint8 and got.flags.writeable and np.array_equal(got, expected), name


@pytest.mark.parametrize("dtype", [np.int32, np.float32])
def test_32_bit_images_are_a_user_error(tmp_path, dtype):
    path = tmp_path / "deep.tif"
    Image.fromarray(np.full((4, 5), 70000, dtype)).save(path)  # Pillow mode "I" or "F"
    with pytest.raises(UserError, match="deep.tif.*8-bit"):
        files.read_image_bgr(str(path))


EIGHT_BIT_MODES = ["1", "L", "LA", "La", "P", "PA", "RGB", "RGBA", "RGBa", "RGBX", "CMYK", "YCbCr", "LAB", "HSV"]


@pytest.mark.parametrize("mode", EIGHT_BIT_MODES + ["I;16", "I;16L", "I;16B", "I;16N", "I", "F"])
def test_every_pillow_mode_gives_bgr_or_a_user_error(mode):
    rng = np.random.default_rng(1)
    if mode in EIGHT_BIT_MODES:
        image = Image.fromarray(rng.integers(0, 256, (5, 7, 3), dtype=np.uint8)).convert(mode)
        # Pillow converts La (premultiplied alpha) to RGB only by way of LA
        expected = np.asarray((image.convert("LA") if mode == "La" else image).convert("RGB"))[:, :, ::-1]
    elif mode.startswith("I;16"):
        values = rng.integers(0, 65536, (5, 7), dtype=np.uint16)
        image = Image.frombytes(mode, (7, 5), values.astype(">u2" if mode == "I;16B" else "=u2").tobytes())
        expected = np.repeat((values // 256).astype(np.uint8)[:, :, None], 3, axis=2)
    else:  # 32-bit values with no known range, not read from a 16-bit file
        with pytest.raises(UserError, match="picture.*8-bit"):
            files.to_bgr(Image.new(mode, (7, 5), 70000), "picture")
        return
    got = files.to_bgr(image, "picture")
    assert got.shape == (5, 7, 3) and got.dtype == np.uint8 and got.flags.writeable
    assert np.array_equal(got, expected)


def test_upright_turns_by_the_exif_orientation(tmp_path):
    rgb = np.random.default_rng(2).integers(0, 256, (4, 6, 3), dtype=np.uint8)
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: turn 90 degrees clockwise to display
    Image.fromarray(rgb).save(tmp_path / "turned.png", exif=exif)
    path = str(tmp_path / "turned.png")
    assert np.array_equal(files.read_image_bgr(path), rgb[:, :, ::-1])
    assert np.array_equal(files.read_image_bgr(path, upright=True), np.rot90(rgb, k=-1)[:, :, ::-1])


def test_prefetch_yields_every_batch_in_order():
    batches = [{"x": torch.tensor([i])} for i in range(4)]
    assert [int(b["x"]) for b in data.prefetch(batches, torch.device("cpu"))] == [0, 1, 2, 3]


def test_collate_pads_to_at_least_min_hw_like_mmseg_pad():
    small = (np.ones((3, 5, 3), np.uint8), np.ones((3, 5), np.uint8))
    batch = data.collate([small], divisor=1, min_hw=(8, 6))
    assert batch["image"].shape == (1, 3, 8, 6) and (batch["label"][0, 3:] == 255).all()
    assert int((batch["label"] != 255).sum()) == 15


def test_collate_stacks_jitter_parameters_and_refuses_a_mix():
    a = (np.zeros((3, 5, 3), np.uint8), np.ones((3, 5), np.uint8), np.full(transforms.JITTER_SIZE, 1, np.int16))
    b = (np.zeros((4, 2, 3), np.uint8), np.ones((4, 2), np.uint8), np.full(transforms.JITTER_SIZE, 2, np.int16))
    batch = data.collate([a, b])
    assert batch["jitter"].dtype == torch.int16 and batch["jitter"][:, 0].tolist() == [1, 2]
    with pytest.raises(ValueError, match="every sample"):
        data.collate([a, b[:2] + (None,)])


@pytest.mark.parametrize("dataset", ["voc", "cityscapes"])
def test_jitter_on_the_device_gives_the_batches_of_jitter_in_the_loader(tmp_path, dataset):
    """The training batch is the same, bit for bit, whether the loader applies the colour jitter or the
    device does after the copy (train.on_device), and the labels reach the losses as int64."""
    if dataset == "voc":
        prepare.make_demo_voc(str(tmp_path / "voc"), n_train=4, n_val=1, size=(40, 56), seed=3)
        extra = ["data.crop_hw=[24,32]", "data.scale=[96,32]"]
    else:
        prepare.make_demo_cityscapes(str(tmp_path / "cityscapes"), n_train=4, n_val=1, size=(32, 64), seed=3)
        extra = ["data.crop_hw=[24,48]", "data.short_edges=[32,48]"]
    cfg = config.load_config(run.CONFIG_PATH, "demo" if dataset == "voc" else "demo_pointrend",
                             [f"data_root={tmp_path}", f"data.root={dataset}", *extra], tasks.builder_defaults)
    in_loader, on_device = tasks.train_dataset(cfg, True), tasks.train_dataset(cfg, False)
    keys, jittered = [(position % 4, position) for position in range(12)], 0
    for first in range(0, 12, 3):
        raw = data.collate([on_device[key] for key in keys[first:first + 3]], 8)
        loader_batch = train.on_device(data.collate([in_loader[key] for key in keys[first:first + 3]], 8))
        device_batch = train.on_device(raw)
        assert loader_batch.keys() == device_batch.keys() == {"image", "label", "hw"}
        assert device_batch["label"].dtype == torch.int64
        for key in loader_batch:
            assert torch.equal(loader_batch[key], device_batch[key]), key
        jittered += not torch.equal(raw["image"], device_batch["image"])
    assert jittered >= 2  # the jitter did change the images, so the equality above is not vacuous


def test_jitter_placement_rule_and_bad_value():
    place = lambda value, device: tasks.jitter_in_loader({"data": {"jitter_on": value}}, device)  # noqa: E731
    assert [place("auto", device) for device in ("cuda", "cpu", "npu")] == [False, True, True]
    assert place("loader", "cuda") and not place("device", "cpu")
    with pytest.raises(UserError, match="data.jitter_on"):
        config.validate(config.load_config(run.CONFIG_PATH, "demo", ['data.jitter_on="gpu"'], tasks.builder_defaults))
