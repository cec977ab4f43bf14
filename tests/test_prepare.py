"""Tests for seg/prepare.py: label PNGs, VOC12aug conversion, Cityscapes trainIds, demo datasets."""
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from seg.files import UserError
from seg import data, files, prepare

# Spec pointrend.md §6.6, written out again here so the module's table is checked against an independent copy.
SPEC_TRAIN_IDS = {7: 0, 8: 1, 11: 2, 12: 3, 13: 4, 17: 5, 19: 6, 20: 7, 21: 8, 22: 9, 23: 10, 24: 11, 25: 12,
                  26: 13, 27: 14, 28: 15, 31: 16, 32: 17, 33: 18}
SPEC_IGNORED_IDS = [0, 1, 2, 3, 4, 5, 6, 9, 10, 14, 15, 16, 18, 29, 30, 34, 255]


def reference_train_ids(ids):
    out = np.full(ids.shape, 255, np.uint8)
    for label_id, train_id in SPEC_TRAIN_IDS.items():
        out[ids == label_id] = train_id
    return out


def voc_bit_colormap(n):
    """The classic VOC colour map, built by spreading the bits of the class index over R, G and B."""
    colours = []
    for index in range(n):
        r = g = b = 0
        value = index
        for shift in range(7, -1, -1):
            r |= (value & 1) << shift
            g |= ((value >> 1) & 1) << shift
            b |= ((value >> 2) & 1) << shift
            value >>= 3
        colours.append((r, g, b))
    return colours


def test_palettes_and_class_tables():
    assert len(data.VOC_CLASSES) == 21 and data.VOC_CLASSES[15] == "person"
    assert [tuple(c) for c in data.VOC_PALETTE] == voc_bit_colormap(21)
    assert voc_bit_colormap(256)[255] == files._IGNORE_COLOUR
    assert len(data.CITYSCAPES_CLASSES) == len(data.CITYSCAPES_PALETTE) == 19
    assert data.CITYSCAPES_CLASSES[13] == "car" and data.CITYSCAPES_PALETTE[13] == (0, 0, 142)


def test_id_to_trainid_matches_spec_table():
    lut = data.CITYSCAPES_ID_TO_TRAINID
    assert lut.shape == (256,) and lut.dtype == np.uint8
    for label_id in range(256):
        assert lut[label_id] == SPEC_TRAIN_IDS.get(label_id, 255), label_id
    assert all(lut[i] == 255 for i in SPEC_IGNORED_IDS)
    assert sorted(lut[lut != 255].tolist()) == list(range(19))


def test_label_png_round_trip(tmp_path):
    rng = np.random.default_rng(0)
    label = rng.integers(0, 21, size=(37, 53)).astype(np.uint8)
    label[rng.random(label.shape) < 0.1] = 255
    path = tmp_path / "sub" / "a.png"
    files.write_label_png(path, label, data.VOC_PALETTE)
    with Image.open(path) as image:
        assert image.mode == "P"
        np.testing.assert_array_equal(np.array(image), label)
        palette = image.getpalette()
        assert palette[:63] == [v for c in data.VOC_PALETTE for v in c]
        assert tuple(palette[3 * 255:3 * 256]) == (224, 224, 192)
        rgb = np.array(image.convert("RGB"))
    expected_rgb = np.array(voc_bit_colormap(256), np.uint8)[label]
    np.testing.assert_array_equal(rgb[label != 255], expected_rgb[label != 255])
    files.write_label_png(tmp_path / "b.png", label)
    with Image.open(tmp_path / "b.png") as image:
        assert image.mode == "L"
        np.testing.assert_array_equal(np.array(image), label)
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["a.png", "b.png", "sub"]  # no temporary files left


def test_read_split(tmp_path):
    (tmp_path / "s.txt").write_text("a\n\n b \nc")
    assert data.read_split(tmp_path / "s.txt") == ["a", "b", "c"]
    with pytest.raises(UserError, match="missing.txt"):
        data.read_split(tmp_path / "missing.txt")


# ----------------------------------------------------------------------------------------------------- VOC aug

def write_split(path, stems):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(f"{s}\n" for s in stems))


def make_tiny_voc_and_sbd(tmp_path, voc_train, voc_val, sbd_train, sbd_val, rng):
    scipy_io = pytest.importorskip("scipy.io")
    scipy_sparse = pytest.importorskip("scipy.sparse")
    voc, sbd = tmp_path / "VOC2012", tmp_path / "VOCaug" / "dataset"
    write_split(voc / "ImageSets" / "Segmentation" / "train.txt", voc_train)
    write_split(voc / "ImageSets" / "Segmentation" / "val.txt", voc_val)
    write_split(sbd / "train.txt", sbd_train)
    write_split(sbd / "val.txt", sbd_val)
    (sbd / "cls").mkdir(parents=True)
    masks = {}
    for stem in sorted(set(sbd_train) | set(sbd_val)):
        mask = rng.integers(0, 21, size=(int(rng.integers(5, 12)), int(rng.integers(5, 12)))).astype(np.uint8)
        # SBD's layout: a 1×1 struct GTcls with fields Boundaries (20×1 cell of sparse edge maps),
        # Segmentation (uint8 H×W) and CategoriesPresent.
        boundaries = np.empty((20, 1), object)
        for index in range(20):
            boundaries[index, 0] = scipy_sparse.csc_matrix(mask == index + 1)
        scipy_io.savemat(sbd / "cls" / f"{stem}.mat", {"GTcls": {
            "Boundaries": boundaries, "Segmentation": mask,
            "CategoriesPresent": np.unique(mask[mask > 0]).astype(np.uint8)}})
        masks[stem] = mask
    return voc, sbd, masks


def test_prepare_voc_aug(tmp_path):
    rng = np.random.default_rng(1)
    stems = [f"2008_{i:06d}" for i in range(40)]
    voc_train, voc_val = stems[0:10], stems[10:18]
    sbd_train, sbd_val = stems[5:30] + stems[5:7], stems[14:35]  # overlaps VOC train and val, and a duplicate
    voc, sbd, masks = make_tiny_voc_and_sbd(tmp_path, voc_train, voc_val, sbd_train, sbd_val, rng)
    mat = pytest.importorskip("scipy.io").loadmat(sbd / "cls" / f"{stems[5]}.mat")
    np.testing.assert_array_equal(mat["GTcls"][0]["Segmentation"][0], masks[stems[5]])  # mmseg's access path

    logged = []
    counts = prepare.prepare_voc_aug(voc, sbd, log=logged.append, workers=1)
    aug = [s for s in stems if (s in sbd_train or s in sbd_val) and s not in voc_train and s not in voc_val]
    trainaug = [s for s in stems if (s in voc_train or s in sbd_train or s in sbd_val) and s not in voc_val]
    split_folder = voc / "ImageSets" / "Segmentation"
    assert data.read_split(split_folder / "aug.txt") == aug
    assert data.read_split(split_folder / "trainaug.txt") == trainaug
    assert counts["aug"] == len(aug) == 17 and counts["trainaug"] == len(trainaug) == 27
    assert counts["converted"] == len(masks) and counts["skipped"] == 0 and logged
    for stem, mask in masks.items():
        with Image.open(voc / "SegmentationClassAug" / f"{stem}.png") as image:
            assert image.mode == "L"
            np.testing.assert_array_equal(np.array(image), mask)
    png = voc / "SegmentationClassAug" / f"{stems[20]}.png"
    mtime = png.stat().st_mtime_ns
    again = prepare.prepare_voc_aug(voc, sbd, log=logged.append, workers=1)
    assert again["converted"] == 0 and again["skipped"] == len(masks) and png.stat().st_mtime_ns == mtime


def test_prepare_voc_aug_full_size_check_and_missing_data(tmp_path):
    rng = np.random.default_rng(2)
    voc_train = [f"2007_{i:06d}" for i in range(1464)]
    voc_val = [f"2009_{i:06d}" for i in range(1449)]
    voc, sbd, _ = make_tiny_voc_and_sbd(tmp_path, voc_train, voc_val, ["2010_000001"], ["2010_000002"], rng)
    with pytest.raises(UserError, match="9118"):
        prepare.prepare_voc_aug(voc, sbd, log=lambda _: None, workers=1)
    assert not (voc / "ImageSets" / "Segmentation" / "aug.txt").exists()  # checked before anything is written
    assert not (voc / "SegmentationClassAug").exists()
    with pytest.raises(UserError, match="VOCtrainval_11-May-2012.tar") as error:
        prepare.prepare_voc_aug(tmp_path / "nowhere", sbd, log=lambda _: None)
    assert str(tmp_path / "nowhere") in str(error.value)
    with pytest.raises(UserError, match="benchmark.tgz") as error:
        prepare.prepare_voc_aug(voc, tmp_path / "nosbd", log=lambda _: None)
    assert str(tmp_path / "nosbd") in str(error.value) and "data/VOCdevkit/VOCaug/dataset" in str(error.value)
    (sbd / "cls" / "2010_000002.mat").unlink()
    write_split(voc / "ImageSets" / "Segmentation" / "train.txt", ["x"])
    with pytest.raises(UserError, match="2010_000002"):
        prepare.prepare_voc_aug(voc, sbd, log=lambda _: None, workers=1)


# -------------------------------------------------------------------------------------------------- Cityscapes

def make_tiny_cityscapes(root, rng, files):
    """files: (split, city, frame) triples; writes an image and a random labelIds map for each."""
    sources = []
    for split, city, frame in files:
        stem = f"{city}_000000_{frame:06d}"
        image = root / "leftImg8bit" / split / city / f"{stem}_leftImg8bit.png"
        image.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, size=(8, 16, 3), dtype=np.uint8)).save(image)
        ids = rng.integers(0, 40, size=(8, 16)).astype(np.uint8)
        ids[0, 0] = 255
        label = root / "gtFine" / split / city / f"{stem}_gtFine_labelIds.png"
        label.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(ids).save(label)
        sources.append((label, ids))
    return sources


def train_ids_of(label_path):
    return Path(str(label_path).replace("_labelIds.png", "_labelTrainIds.png"))


def test_prepare_cityscapes(tmp_path):
    rng = np.random.default_rng(3)
    files = [("train", "aachen", 0), ("train", "aachen", 1), ("train", "bochum", 0), ("val", "lindau", 0),
             ("val", "lindau", 7), ("test", "berlin", 0)]
    sources = make_tiny_cityscapes(tmp_path, rng, files)
    counts = prepare.prepare_cityscapes(tmp_path, workers=2, log=lambda _: None)  # 6 jobs: the process pool
    assert counts == {"train": 3, "val": 2, "converted": 6, "skipped": 0}
    for label, ids in sources:
        with Image.open(train_ids_of(label)) as image:
            assert image.mode == "L"
            np.testing.assert_array_equal(np.array(image), reference_train_ids(ids))
    mtimes = [train_ids_of(label).stat().st_mtime_ns for label, _ in sources]
    counts = prepare.prepare_cityscapes(tmp_path, workers=1, log=lambda _: None)
    assert counts["converted"] == 0 and counts["skipped"] == 6
    assert [train_ids_of(label).stat().st_mtime_ns for label, _ in sources] == mtimes
    newer = mtimes[1] + 10**9  # a relabelled source is newer than its target, so it is converted again
    os.utime(sources[1][0], ns=(newer, newer))
    assert prepare.prepare_cityscapes(tmp_path, workers=1, log=lambda _: None)["converted"] == 1


def test_prepare_cityscapes_errors(tmp_path):
    with pytest.raises(UserError, match="gtFine_trainvaltest.zip") as error:
        prepare.prepare_cityscapes(tmp_path / "cityscapes", log=lambda _: None)
    assert str(tmp_path / "cityscapes") in str(error.value) and "leftImg8bit_trainvaltest.zip" in str(error.value)
    sources = make_tiny_cityscapes(tmp_path, np.random.default_rng(4), [("train", "ulm", 0), ("val", "ulm", 3)])
    sources[1][0].unlink()
    with pytest.raises(UserError, match="ulm_000000_000003_gtFine_labelIds.png"):
        prepare.prepare_cityscapes(tmp_path, workers=1, log=lambda _: None)
    assert not train_ids_of(sources[0][0]).exists()  # checked before anything is written


# ------------------------------------------------------------------------------------------------------- demos

def file_bytes(root, pattern):
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(Path(root).glob(pattern))}


def test_make_demo_voc(tmp_path):
    kwargs = dict(n_train=6, n_val=3, size=(48, 64), seed=5)
    root = prepare.make_demo_voc(tmp_path / "a", **kwargs)
    names = [f"2007_{i:06d}" for i in range(1, 10)]
    splits = {s: data.read_split(root / "ImageSets" / "Segmentation" / f"{s}.txt")
              for s in ("train", "val", "aug", "trainaug")}
    assert splits == {"train": names[:3], "val": names[6:], "aug": names[3:6], "trainaug": names[:6]}
    assert sorted(p.stem for p in (root / "JPEGImages").glob("*.jpg")) == names
    assert sorted(p.stem for p in (root / "SegmentationClass").glob("*.png")) == names[:3] + names[6:]
    assert sorted(p.stem for p in (root / "SegmentationClassAug").glob("*.png")) == names[:6]
    for name in names:
        with Image.open(root / "JPEGImages" / f"{name}.jpg") as image:
            assert image.format == "JPEG" and image.mode == "RGB" and image.size == (64, 48)
    seen = set()
    for name in splits["train"] + splits["val"]:
        with Image.open(root / "SegmentationClass" / f"{name}.png") as image:
            assert image.mode == "P"
            voc_label = np.array(image)
        assert set(np.unique(voc_label)) <= {0, 1, 2, 3, 4, 255} and (voc_label == 255).any()
        seen |= set(np.unique(voc_label).tolist())
        if name in splits["train"]:  # the VOC label is the SBD-like label with a band set to 255
            with Image.open(root / "SegmentationClassAug" / f"{name}.png") as image:
                aug_label = np.array(image)
            keep = voc_label != 255
            np.testing.assert_array_equal(voc_label[keep], aug_label[keep])
            assert len(np.unique(aug_label[~keep])) > 1  # the band lies on class edges
    for name in splits["trainaug"]:
        with Image.open(root / "SegmentationClassAug" / f"{name}.png") as image:
            assert image.mode == "L"
            aug_label = np.array(image)
        assert set(np.unique(aug_label)) <= {0, 1, 2, 3, 4} and (aug_label > 0).any()
        seen |= set(np.unique(aug_label).tolist())
    assert len(seen - {0, 255}) >= 3
    other = prepare.make_demo_voc(tmp_path / "b", **kwargs)
    for pattern in ("Segmentation*/*.png", "ImageSets/Segmentation/*.txt", "JPEGImages/*.jpg"):
        assert file_bytes(root, pattern) == file_bytes(other, pattern)
    assert file_bytes(root, "SegmentationClass/*.png") != file_bytes(
        prepare.make_demo_voc(tmp_path / "c", **{**kwargs, "seed": 6}), "SegmentationClass/*.png")


def test_make_demo_voc_marker(tmp_path):
    root = prepare.make_demo_voc(tmp_path, n_train=3, n_val=1, size=(32, 32))
    label = root / "SegmentationClass" / "2007_000001.png"
    mtime = label.stat().st_mtime_ns
    prepare.make_demo_voc(tmp_path, n_train=3, n_val=1, size=(32, 32))
    assert label.stat().st_mtime_ns == mtime  # generated once
    (root / "notes.txt").write_text("mine")
    prepare.make_demo_voc(tmp_path, n_train=2, n_val=1, size=(32, 32))  # other parameters: made again
    assert sorted(p.name for p in (root / "JPEGImages").iterdir()) == [f"2007_00000{i}.jpg" for i in (1, 2, 3)]
    assert data.read_split(root / "ImageSets" / "Segmentation" / "val.txt") == ["2007_000003"]
    assert (root / "notes.txt").read_text() == "mine"  # only the generator's own folders are replaced
    with Image.open(root / "JPEGImages" / "2007_000001.jpg") as image:
        assert image.size == (32, 32)


def test_make_demo_cityscapes(tmp_path):
    kwargs = dict(n_train=4, n_val=2, size=(64, 128), seed=7)
    root = prepare.make_demo_cityscapes(tmp_path / "a", **kwargs)
    images = sorted(str(p.relative_to(root)) for p in root.glob("leftImg8bit/*/*/*"))
    assert images == [f"leftImg8bit/train/{c}/{c}_000000_00000{i}_leftImg8bit.png"
                      for c in ("aachen", "bremen") for i in (0, 1)] + \
                     [f"leftImg8bit/val/frankfurt/frankfurt_000000_00000{i}_leftImg8bit.png" for i in (0, 1)]
    ids_seen = set()
    for image_path in root.glob("leftImg8bit/*/*/*.png"):
        split_city = image_path.parent.relative_to(root / "leftImg8bit")
        label = root / "gtFine" / split_city / image_path.name.replace("_leftImg8bit", "_gtFine_labelIds")
        with Image.open(image_path) as image:
            assert image.mode == "RGB" and image.size == (128, 64)
        with Image.open(label) as image:
            ids = np.array(image)
        with Image.open(train_ids_of(label)) as image:
            np.testing.assert_array_equal(np.array(image), reference_train_ids(ids))
        ids_seen |= set(np.unique(ids).tolist())
    assert {7, 8, 23, 26, 0, 1, 4} <= ids_seen <= {0, 1, 4, 7, 8, 11, 21, 23, 24, 26}
    counts = prepare.prepare_cityscapes(root, workers=1, log=lambda _: None)  # the demo is already prepared
    assert counts == {"train": 4, "val": 2, "converted": 0, "skipped": 6}
    other = prepare.make_demo_cityscapes(tmp_path / "b", **kwargs)
    assert file_bytes(root, "gtFine/*/*/*.png") == file_bytes(other, "gtFine/*/*/*.png")
    assert file_bytes(root, "leftImg8bit/*/*/*.png") == file_bytes(other, "leftImg8bit/*/*/*.png")
    assert prepare.make_demo_cityscapes(root, **kwargs) == root
    prepare.make_demo_cityscapes(root, **{**kwargs, "n_train": 2})  # other parameters: made again, nothing stale
    assert prepare.prepare_cityscapes(root, workers=1, log=lambda _: None)["train"] == 2


def all_file_bytes(root):
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(Path(root).rglob("*")) if p.is_file()}


def write_user_voc(root):
    """A user's own VOC-layout files: one photo and a train split, without the demo's marker."""
    (root / "JPEGImages").mkdir(parents=True)
    Image.fromarray(np.random.default_rng(8).integers(0, 256, (20, 30, 3), np.uint8)).save(
        root / "JPEGImages" / "2007_000001.jpg")
    write_split(root / "ImageSets" / "Segmentation" / "train.txt", ["2007_000001"])


def write_user_cityscapes(root):
    make_tiny_cityscapes(root, np.random.default_rng(9), [("train", "aachen", 0)])


@pytest.mark.parametrize("generate", ["make_demo_voc", "make_demo_cityscapes"])
@pytest.mark.parametrize("write_user_files", [write_user_voc, write_user_cityscapes])
def test_demo_leaves_a_folder_of_user_files_alone(tmp_path, generate, write_user_files):
    root = tmp_path / "data" / "demo"
    write_user_files(root)
    before = all_file_bytes(root)
    with pytest.raises(UserError, match="data_root") as error:
        getattr(prepare, generate)(root, n_train=2, n_val=1, size=(32, 64))
    assert str(root) in str(error.value) and "empty" in str(error.value)
    assert all_file_bytes(root) == before and len(before) >= 2


def test_demo_into_a_missing_or_an_empty_folder(tmp_path):
    for generate, pattern in ((prepare.make_demo_voc, "*/*.*"), (prepare.make_demo_cityscapes, "*/*/*/*.png")):
        empty = tmp_path / f"empty_{generate.__name__}"
        empty.mkdir()
        generate(empty, n_train=2, n_val=1, size=(32, 64))
        missing = generate(tmp_path / "missing" / generate.__name__, n_train=2, n_val=1, size=(32, 64))
        made = file_bytes(missing, pattern)
        assert made == file_bytes(empty, pattern) and len(made) >= 6


@pytest.mark.parametrize("first, second", [("make_demo_voc", "make_demo_cityscapes"),
                                           ("make_demo_cityscapes", "make_demo_voc")])
def test_demo_of_one_kind_never_goes_into_a_demo_of_the_other(tmp_path, first, second):
    getattr(prepare, first)(tmp_path, n_train=2, n_val=1, size=(32, 64))
    before = all_file_bytes(tmp_path)
    with pytest.raises(UserError, match="data_root") as error:
        getattr(prepare, second)(tmp_path, n_train=2, n_val=1, size=(32, 64))
    assert str(tmp_path) in str(error.value)
    assert all_file_bytes(tmp_path) == before


def test_demo_rerun_after_an_interruption_regenerates_its_own_folder(tmp_path, monkeypatch):
    kwargs = dict(n_train=4, n_val=2, size=(32, 64), seed=3)
    save_image, saved = prepare.save_image, []

    def save_three_then_fail(*args):
        if len(saved) == 3:
            raise RuntimeError("interrupted")
        saved.append(save_image(*args))

    monkeypatch.setattr(prepare, "save_image", save_three_then_fail)
    with pytest.raises(RuntimeError, match="interrupted"):
        prepare.make_demo_voc(tmp_path / "a", **kwargs)
    monkeypatch.undo()
    assert len(list((tmp_path / "a" / "JPEGImages").iterdir())) == 3
    prepare.make_demo_voc(tmp_path / "a", **kwargs)  # no UserError: the half-made folder is the demo's own
    assert all_file_bytes(tmp_path / "a") == all_file_bytes(prepare.make_demo_voc(tmp_path / "b", **kwargs))
