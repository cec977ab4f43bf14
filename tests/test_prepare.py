"""Dataset preparation and the demo generators, on tiny trees in the real layouts."""
import os

import numpy as np
import pytest
from PIL import Image

from seg import prepare
from seg.errors import UserError

# cityscapesScripts labels.py, written out independently of seg/prepare.py
SPEC_TRAIN_IDS = {"road": (7, 0), "sidewalk": (8, 1), "building": (11, 2), "wall": (12, 3), "fence": (13, 4),
                  "pole": (17, 5), "traffic light": (19, 6), "traffic sign": (20, 7), "vegetation": (21, 8),
                  "terrain": (22, 9), "sky": (23, 10), "person": (24, 11), "rider": (25, 12), "car": (26, 13),
                  "truck": (27, 14), "bus": (28, 15), "train": (31, 16), "motorcycle": (32, 17), "bicycle": (33, 18)}
SPEC_IGNORED_IDS = [0, 1, 2, 3, 4, 5, 6, 9, 10, 14, 15, 16, 18, 29, 30]


def test_id_to_train_id_table_matches_the_spec():
    for name, (label_id, train_id) in SPEC_TRAIN_IDS.items():
        assert prepare.CITYSCAPES_ID_TO_TRAINID[label_id] == train_id, name
        assert prepare.CITYSCAPES_CLASSES[train_id] == name
    assert all(prepare.CITYSCAPES_ID_TO_TRAINID[i] == 255 for i in SPEC_IGNORED_IDS)
    assert int((prepare.CITYSCAPES_ID_TO_TRAINID != 255).sum()) == 19


def test_palette_png_round_trip(tmp_path):
    label = np.random.default_rng(0).integers(0, 21, (7, 9)).astype(np.uint8)
    label[0, 0] = 255
    path = tmp_path / "x.png"
    prepare.write_label_png(str(path), label, prepare.VOC_PALETTE)
    with Image.open(path) as image:
        assert image.mode == "P"
        assert np.array_equal(np.asarray(image), label)  # pixel values are class indices
        palette = np.array(image.getpalette()[: 3 * 21]).reshape(21, 3)
    assert np.array_equal(palette, np.array(prepare.VOC_PALETTE))
    assert not [name for name in os.listdir(tmp_path) if name != "x.png"]  # no temporary left behind


def write_mat(path, segmentation):
    savemat = pytest.importorskip("scipy.io").savemat
    savemat(str(path), {"GTcls": {"Segmentation": segmentation, "Boundaries": np.zeros(1), "CategoriesPresent": 1}})


def test_prepare_voc_aug_on_a_tiny_sbd(tmp_path):
    voc, sbd = tmp_path / "VOC2012", tmp_path / "dataset"
    (voc / "ImageSets" / "Segmentation").mkdir(parents=True)
    (sbd / "cls").mkdir(parents=True)
    voc_train, voc_val = ["a", "b", "c"], ["d", "e"]
    sbd_train, sbd_val = ["b", "f", "g", "d"], ["h", "a", "i"]
    (voc / "ImageSets" / "Segmentation" / "train.txt").write_text("\n".join(voc_train) + "\n")
    (voc / "ImageSets" / "Segmentation" / "val.txt").write_text("\n".join(voc_val) + "\n")
    (sbd / "train.txt").write_text("\n".join(sbd_train) + "\n")
    (sbd / "val.txt").write_text("\n".join(sbd_val) + "\n")
    rng = np.random.default_rng(0)
    masks = {stem: rng.integers(0, 21, (5, 6)).astype(np.uint8) for stem in set(sbd_train + sbd_val)}
    for stem, mask in masks.items():
        write_mat(sbd / "cls" / f"{stem}.mat", mask)
    counts = prepare.prepare_voc_aug(voc, sbd, log=lambda *a: None)
    split = lambda name: (voc / "ImageSets" / "Segmentation" / f"{name}.txt").read_text().split()
    everything = set(sbd_train + sbd_val)
    assert set(split("aug")) == everything - set(voc_train) - set(voc_val) == {"f", "g", "h", "i"}
    assert set(split("trainaug")) == (set(voc_train) | everything) - set(voc_val)
    assert counts["aug"] == 4 and counts["converted"] == len(masks)
    for stem, mask in masks.items():
        assert np.array_equal(np.asarray(Image.open(voc / "SegmentationClassAug" / f"{stem}.png")), mask)
    assert prepare.prepare_voc_aug(voc, sbd, log=lambda *a: None)["converted"] == 0  # finished files skipped


def test_prepare_voc_aug_names_missing_folders(tmp_path):
    with pytest.raises(UserError, match="VOC2012"):
        prepare.prepare_voc_aug(tmp_path / "VOC2012", tmp_path / "dataset")


def make_cityscapes(root, label_ids):
    for index, ids in enumerate(label_ids):
        name = f"aachen_000000_{index:06d}"
        for folder, suffix, array in (("leftImg8bit", "leftImg8bit", np.zeros(ids.shape + (3,), np.uint8)),
                                      ("gtFine", "gtFine_labelIds", ids)):
            path = root / folder / "train" / "aachen" / f"{name}_{suffix}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(array).save(path)


def test_prepare_cityscapes_maps_ids_and_skips_finished_files(tmp_path):
    rng = np.random.default_rng(0)
    label_ids = [rng.integers(0, 34, (6, 8)).astype(np.uint8) for _ in range(3)]
    make_cityscapes(tmp_path, label_ids)
    (tmp_path / "leftImg8bit" / "val").mkdir()
    counts = prepare.prepare_cityscapes(tmp_path, workers=2, log=lambda *a: None)
    assert counts["train"] == 3 and counts["converted"] == 3
    targets = sorted((tmp_path / "gtFine" / "train" / "aachen").glob("*_labelTrainIds.png"))
    for ids, target in zip(label_ids, targets):
        expected = np.array([[SPEC_TRAIN_IDS_BY_ID.get(int(v), 255) for v in row] for row in ids])
        assert np.array_equal(np.asarray(Image.open(target)), expected)
    stamps = [t.stat().st_mtime_ns for t in targets]
    assert prepare.prepare_cityscapes(tmp_path, log=lambda *a: None)["converted"] == 0
    assert stamps == [t.stat().st_mtime_ns for t in targets]


SPEC_TRAIN_IDS_BY_ID = {label_id: train_id for label_id, train_id in SPEC_TRAIN_IDS.values()}


def test_prepare_cityscapes_names_images_without_labels(tmp_path):
    make_cityscapes(tmp_path, [np.zeros((4, 4), np.uint8)])
    os.remove(next((tmp_path / "gtFine").rglob("*_labelIds.png")))
    (tmp_path / "leftImg8bit" / "val").mkdir()
    with pytest.raises(UserError, match="aachen_000000_000000_gtFine_labelIds.png"):
        prepare.prepare_cityscapes(tmp_path, log=lambda *a: None)


def test_demo_voc_layout_and_determinism(tmp_path):
    a = prepare.make_demo_voc(tmp_path / "a", n_train=6, n_val=3, size=(32, 40), seed=5)
    b = prepare.make_demo_voc(tmp_path / "b", n_train=6, n_val=3, size=(32, 40), seed=5)
    splits = {name: (a / "ImageSets" / "Segmentation" / f"{name}.txt").read_text().split()
              for name in ("train", "val", "aug", "trainaug")}
    assert (len(splits["train"]), len(splits["aug"]), len(splits["val"])) == (3, 3, 3)
    assert set(splits["trainaug"]) == set(splits["train"]) | set(splits["aug"])
    for stem in splits["train"] + splits["val"]:
        assert (a / "JPEGImages" / f"{stem}.jpg").is_file()
        voc_label = Image.open(a / "SegmentationClass" / f"{stem}.png")
        assert voc_label.mode == "P" and voc_label.size == (40, 32)
        values = set(np.unique(np.asarray(voc_label)).tolist())
        assert values <= {0, 1, 2, 3, 4, 255} and 255 in values  # VOC-style boundary band
        assert (a / "SegmentationClass" / f"{stem}.png").read_bytes() == (b / "SegmentationClass" / f"{stem}.png").read_bytes()
    for stem in splits["aug"]:
        sbd_label = np.asarray(Image.open(a / "SegmentationClassAug" / f"{stem}.png"))
        assert set(np.unique(sbd_label).tolist()) <= {0, 1, 2, 3, 4}  # SBD style: no band
    assert splits == {name: (b / "ImageSets" / "Segmentation" / f"{name}.txt").read_text().split() for name in splits}


def test_demo_cityscapes_layout(tmp_path):
    root = prepare.make_demo_cityscapes(tmp_path / "c", n_train=2, n_val=1, size=(32, 64), seed=0)
    for split, count in (("train", 2), ("val", 1)):
        images = sorted((root / "leftImg8bit" / split).glob("*/*_leftImg8bit.png"))
        assert len(images) == count
        for image in images:
            stem = image.name[: -len("_leftImg8bit.png")]
            folder = root / "gtFine" / split / image.parent.name
            ids = np.asarray(Image.open(folder / f"{stem}_gtFine_labelIds.png"))
            train_ids = np.asarray(Image.open(folder / f"{stem}_gtFine_labelTrainIds.png"))
            assert np.array_equal(train_ids, prepare.CITYSCAPES_ID_TO_TRAINID[ids])
            assert ids.shape == (32, 64) and len(np.unique(train_ids)) > 2
