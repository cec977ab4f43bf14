"""Sampler sharding and resumption, collation and padding, label validation."""
import itertools

import numpy as np
import pytest
import torch
from PIL import Image

from seg import data
from seg.errors import UserError


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
        data.read_label(str(path), 21)
    label[1, 1] = 255
    Image.fromarray(label).save(path)
    assert data.read_label(str(path), 21)[1, 1] == 255


def test_corrupt_image_names_the_file(tmp_path):
    path = tmp_path / "broken.jpg"
    path.write_bytes(b"not a jpeg")
    with pytest.raises(UserError, match="broken.jpg"):
        data.read_image_bgr(str(path))


def test_image_is_bgr(tmp_path):
    path = tmp_path / "red.png"
    Image.fromarray(np.array([[[255, 0, 0]]], np.uint8)).save(path)
    assert data.read_image_bgr(str(path)).tolist() == [[[0, 0, 255]]]


def test_prefetch_yields_every_batch_in_order():
    batches = [{"x": torch.tensor([i])} for i in range(4)]
    assert [int(b["x"]) for b in data.prefetch(batches, torch.device("cpu"))] == [0, 1, 2, 3]


def test_collate_pads_to_at_least_min_hw_like_mmseg_pad():
    small = (np.ones((3, 5, 3), np.uint8), np.ones((3, 5), np.uint8))
    batch = data.collate([small], divisor=1, min_hw=(8, 6))
    assert batch["image"].shape == (1, 3, 8, 6) and (batch["label"][0, 3:] == 255).all()
    assert int((batch["label"] != 255).sum()) == 15
