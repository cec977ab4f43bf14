"""Sampler sharding and resumption, collation and padding, label validation."""
import itertools

import numpy as np
import pytest
import torch
from PIL import Image

import run
from seg import colour, config, data, demo, files, models, train
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


def test_prefetch_yields_every_batch_in_order():
    batches = [{"x": torch.tensor([i])} for i in range(4)]
    assert [int(b["x"]) for b in data.prefetch(batches, torch.device("cpu"))] == [0, 1, 2, 3]


def test_collate_pads_to_at_least_min_hw_like_mmseg_pad():
    small = (np.ones((3, 5, 3), np.uint8), np.ones((3, 5), np.uint8))
    batch = data.collate([small], divisor=1, min_hw=(8, 6))
    assert batch["image"].shape == (1, 3, 8, 6) and (batch["label"][0, 3:] == 255).all()
    assert int((batch["label"] != 255).sum()) == 15


def test_collate_stacks_jitter_parameters_and_refuses_a_mix():
    a = (np.zeros((3, 5, 3), np.uint8), np.ones((3, 5), np.uint8), np.full(colour.JITTER_SIZE, 1, np.int16))
    b = (np.zeros((4, 2, 3), np.uint8), np.ones((4, 2), np.uint8), np.full(colour.JITTER_SIZE, 2, np.int16))
    batch = data.collate([a, b])
    assert batch["jitter"].dtype == torch.int16 and batch["jitter"][:, 0].tolist() == [1, 2]
    with pytest.raises(ValueError, match="every sample"):
        data.collate([a, b[:2] + (None,)])


@pytest.mark.parametrize("dataset", ["voc", "cityscapes"])
def test_jitter_on_the_device_gives_the_batches_of_jitter_in_the_loader(tmp_path, dataset):
    """The training batch is the same, bit for bit, whether the loader applies the colour jitter or the
    device does after the copy (train.on_device), and the labels reach the losses as int64."""
    if dataset == "voc":
        demo.make_demo_voc(str(tmp_path / "voc"), n_train=4, n_val=1, size=(40, 56), seed=3)
        extra = ["data.crop_hw=[24,32]", "data.scale=[96,32]"]
    else:
        demo.make_demo_cityscapes(str(tmp_path / "cityscapes"), n_train=4, n_val=1, size=(32, 64), seed=3)
        extra = ["data.crop_hw=[24,48]", "data.short_edges=[32,48]"]
    cfg = config.load_config(run.CONFIG_PATH, "demo" if dataset == "voc" else "demo_pointrend",
                             [f"data_root={tmp_path}", f"data.root={dataset}", *extra], models.builder_defaults)
    in_loader, on_device = train.train_dataset(cfg, True), train.train_dataset(cfg, False)
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
    place = lambda value, device: train.jitter_in_loader({"data": {"jitter_on": value}}, device)  # noqa: E731
    assert [place("auto", device) for device in ("cuda", "cpu", "npu")] == [False, True, True]
    assert place("loader", "cuda") and not place("device", "cpu")
    with pytest.raises(UserError, match="data.jitter_on"):
        place("gpu", "cuda")
