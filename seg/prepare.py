"""Dataset preparation: VOC12aug labels from SBD, Cityscapes trainIds, and small generated demo datasets.

Everything written here goes to a temporary file in the target folder first and is renamed into place, so an
interrupted run never leaves a half-written label or split file; a rerun skips what is already finished.
On-disk layouts (see spec pspnet.md §4, pointrend.md §4):

    data/VOCdevkit/VOC2012/{JPEGImages, SegmentationClass, SegmentationClassAug, ImageSets/Segmentation/*.txt}
    data/VOCdevkit/VOCaug/dataset/{cls/*.mat, train.txt, val.txt}     # SBD benchmark_RELEASE/dataset
    cityscapes/{leftImg8bit, gtFine}/{train,val,test}/<city>/<city>_<seq>_<frame>_{leftImg8bit,gtFine_*}.png
"""
import concurrent.futures
from pathlib import Path

import numpy as np
from PIL import Image

from seg.data import CITYSCAPES_ID_TO_TRAINID, read_split
from seg.files import UserError, write_label_png, write_text_atomic

_VOC_HINT = ("Download VOCtrainval_11-May-2012.tar (PASCAL VOC 2012) and extract it so that its VOC2012 folder "
             "(with JPEGImages, SegmentationClass, ImageSets) is data/VOCdevkit/VOC2012.")
_SBD_HINT = ("Download SBD's benchmark.tgz and move its benchmark_RELEASE/dataset folder (with cls/*.mat, "
             "train.txt, val.txt) to data/VOCdevkit/VOCaug/dataset.")
_CITYSCAPES_HINT = ("Download gtFine_trainvaltest.zip and leftImg8bit_trainvaltest.zip from cityscapes-dataset.com "
                    "and unzip both into one folder, giving <root>/gtFine/{train,val,test}/<city>/ and "
                    "<root>/leftImg8bit/{train,val,test}/<city>/.")
_VOC_FULL = {"voc_train": 1464, "voc_val": 1449, "trainaug": 10582, "aug": 9118}
_CITYSCAPES_FULL = {"train": 2975, "val": 500}


# ----------------------------------------------------------------------------------------------- file helpers

def _require(path, hint):
    if not Path(path).exists():
        raise UserError(f"{path} not found. {hint}")


def _run_parallel(function, jobs, workers):
    """Apply `function` to every job, in `workers` processes when it is worth it; returns nothing."""
    if workers <= 1 or len(jobs) < 2 * workers:
        for job in jobs:
            function(job)
        return
    with concurrent.futures.ProcessPoolExecutor(workers) as pool:
        for _ in pool.map(function, jobs, chunksize=max(1, len(jobs) // (8 * workers))):
            pass


def _name_list(names, limit=10):
    shown = ", ".join(str(name) for name in names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


# ---------------------------------------------------------------------------------------------------- VOC aug

def _loadmat():
    try:
        from scipy.io import loadmat
    except ImportError:
        raise UserError("reading SBD's .mat files needs scipy: pip install scipy") from None
    return loadmat


def _convert_sbd_mat(job):
    """(mat_path, png_path): write GTcls.Segmentation (H×W class ids 0..20) as a grayscale PNG."""
    mat_path, png_path = job
    # squeeze_me + struct_as_record=False turns SBD's 1×1 struct GTcls into an object with attributes.
    content = _loadmat()(mat_path, squeeze_me=True, struct_as_record=False)
    segmentation = getattr(content.get("GTcls"), "Segmentation", None)
    if segmentation is None or np.ndim(segmentation) != 2:
        raise UserError(f"{mat_path} has no 2-D GTcls.Segmentation; is it an SBD cls/*.mat file?")
    segmentation = np.asarray(segmentation)
    if segmentation.min() < 0 or segmentation.max() > 255:
        raise UserError(f"{mat_path}: GTcls.Segmentation has values outside 0..255")
    write_label_png(png_path, segmentation.astype(np.uint8))


def _voc_aug_splits(voc_train, voc_val, sbd_all, mat_stems, log):
    """(aug, trainaug) as mmseg's voc_aug.py builds them (spec §4.2), sorted so reruns give identical files.

    UserError when an aug image has no SBD mask, or when the full VOC splits do not give 9118 / 10582 images.
    """
    voc_train, voc_val, sbd_all = set(voc_train), set(voc_val), set(sbd_all)
    aug, trainaug = sorted(sbd_all - (voc_train | voc_val)), sorted((voc_train | sbd_all) - voc_val)
    unlabelled = sorted(set(aug) - set(mat_stems))
    if unlabelled:
        raise UserError(f"{len(unlabelled)} images of SBD's train.txt/val.txt have no cls/<name>.mat: "
                        f"{_name_list(unlabelled)}. Is the SBD download complete? {_SBD_HINT}")
    if (len(voc_train), len(voc_val)) != (_VOC_FULL["voc_train"], _VOC_FULL["voc_val"]):
        log(f"note: not the full VOC 2012 splits ({_VOC_FULL['voc_train']} train / {_VOC_FULL['voc_val']} val), "
            "so the 9118 aug / 10582 trainaug check is skipped")
    elif (len(aug), len(trainaug)) != (_VOC_FULL["aug"], _VOC_FULL["trainaug"]):
        raise UserError(f"VOC12aug: expected 9118 aug and 10582 trainaug images, got {len(aug)} and "
                        f"{len(trainaug)}; check SBD's train.txt and val.txt. {_SBD_HINT}")
    return aug, trainaug


def prepare_voc_aug(voc_root, sbd_root, log=print, workers=4):
    """Build VOC12aug: SegmentationClassAug/*.png from SBD cls/*.mat, and ImageSets/Segmentation/{aug,trainaug}.txt.

    The split lists are checked before anything is written; finished PNGs are skipped. With the full VOC splits
    (1464 train / 1449 val) there must be 10582 trainaug and 9118 aug images, otherwise UserError.
    Returns {"converted", "skipped", "voc_train", "voc_val", "aug", "trainaug"} counts.
    """
    voc_root, sbd_root = Path(voc_root), Path(sbd_root)
    split_folder = voc_root / "ImageSets" / "Segmentation"
    for path in (voc_root, split_folder / "train.txt", split_folder / "val.txt"):
        _require(path, _VOC_HINT)
    for path in (sbd_root, sbd_root / "cls", sbd_root / "train.txt", sbd_root / "val.txt"):
        _require(path, _SBD_HINT)
    mats = sorted((sbd_root / "cls").glob("*.mat"))
    if not mats:
        raise UserError(f"no .mat files in {sbd_root / 'cls'}. {_SBD_HINT}")
    voc_train, voc_val = set(read_split(split_folder / "train.txt")), set(read_split(split_folder / "val.txt"))
    sbd_all = read_split(sbd_root / "train.txt") + read_split(sbd_root / "val.txt")
    aug, trainaug = _voc_aug_splits(voc_train, voc_val, sbd_all, [mat.stem for mat in mats], log)

    _loadmat()  # fail here, once, if scipy is missing
    out_folder = voc_root / "SegmentationClassAug"
    jobs = [(mat, out_folder / f"{mat.stem}.png") for mat in mats if not (out_folder / f"{mat.stem}.png").exists()]
    log(f"SBD: {len(mats)} masks, {len(mats) - len(jobs)} already converted, converting {len(jobs)}")
    _run_parallel(_convert_sbd_mat, jobs, workers)
    write_text_atomic("".join(f"{stem}\n" for stem in aug), split_folder / "aug.txt")
    write_text_atomic("".join(f"{stem}\n" for stem in trainaug), split_folder / "trainaug.txt")
    log(f"VOC12aug: {len(aug)} aug + {len(voc_train)} train images; trainaug.txt {len(trainaug)}")
    return {"converted": len(jobs), "skipped": len(mats) - len(jobs), "voc_train": len(voc_train),
            "voc_val": len(voc_val), "aug": len(aug), "trainaug": len(trainaug)}


# ------------------------------------------------------------------------------------------------- Cityscapes

def _convert_cityscapes_label(job):
    """(labelIds_png, labelTrainIds_png): map official label ids to train ids (255 = ignore)."""
    source, target = job
    label_ids = np.asarray(Image.open(source))
    if label_ids.ndim != 2 or label_ids.dtype != np.uint8:
        raise UserError(f"{source} is not an 8-bit single-channel label image")
    write_label_png(target, CITYSCAPES_ID_TO_TRAINID[label_ids])


def _train_ids_path(label_ids_path):
    return Path(str(label_ids_path).replace("_gtFine_labelIds.png", "_gtFine_labelTrainIds.png"))


def _is_finished(source, target):
    return target.exists() and target.stat().st_mtime_ns >= source.stat().st_mtime_ns


def _check_cityscapes_images(root, split):
    """Number of split images; UserError listing the images that have no *_gtFine_labelIds.png."""
    images = sorted((root / "leftImg8bit" / split).glob("*/*_leftImg8bit.png"))
    missing = []
    for image in images:
        label_name = image.name.replace("_leftImg8bit.png", "_gtFine_labelIds.png")
        label = root / "gtFine" / split / image.parent.name / label_name
        if not label.exists():
            missing.append(label)
    if missing:
        raise UserError(f"{len(missing)} of {len(images)} {split} images have no labelIds file: "
                        f"{_name_list(missing)}. {_CITYSCAPES_HINT}")
    return len(images)


def prepare_cityscapes(root, workers=4, log=print):
    """Write gtFine/*/<city>/*_gtFine_labelTrainIds.png from the *_gtFine_labelIds.png beside it, in parallel.

    Same classes as cityscapesScripts' createTrainIdLabelImgs.py (spec pointrend.md §6.6). A target that exists and
    is newer than its source is skipped. Every train/val image must have a labelIds file (else UserError).
    Returns {"train": images, "val": images, "converted": n, "skipped": n}.
    """
    root = Path(root)
    for path in (root, root / "gtFine", root / "leftImg8bit"):
        _require(path, _CITYSCAPES_HINT)
    counts = {split: _check_cityscapes_images(root, split) for split in ("train", "val")}
    if counts["train"] + counts["val"] == 0:
        raise UserError(f"no images under {root / 'leftImg8bit'}/{{train,val}}/<city>/. {_CITYSCAPES_HINT}")
    sources = sorted(p for split in ("train", "val", "test")
                     for p in (root / "gtFine" / split).glob("*/*_gtFine_labelIds.png"))
    jobs = [(s, _train_ids_path(s)) for s in sources if not _is_finished(s, _train_ids_path(s))]
    log(f"Cityscapes: {len(sources)} labelIds files, {len(sources) - len(jobs)} already converted, "
        f"converting {len(jobs)} with {workers} workers")
    _run_parallel(_convert_cityscapes_label, jobs, workers)
    counts.update(converted=len(jobs), skipped=len(sources) - len(jobs))
    if (counts["train"], counts["val"]) != (_CITYSCAPES_FULL["train"], _CITYSCAPES_FULL["val"]):
        log(f"note: full Cityscapes has {_CITYSCAPES_FULL['train']} train / {_CITYSCAPES_FULL['val']} val images")
    log(f"Cityscapes: {counts['train']} train and {counts['val']} val images with labels")
    return counts
