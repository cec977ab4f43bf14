"""Datasets on disk (VOC12aug, Cityscapes): metadata, listers, datasets, sampler, collation, normalisation, loaders."""
import collections
import concurrent.futures
import functools
import glob
import os
import sys

import numpy as np
import torch
import torch.nn.functional as F

from seg import transforms
from seg.files import IGNORE_INDEX, IMAGE_EXTENSIONS, UserError, read_image_bgr, read_label

VOC_CLASSES = (
    "background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor")


def colour_map(count):
    """PASCAL VOC's colour map: class k gets the bits of k spread over R, G, B from the high bit down; 256 distinct."""
    return tuple(tuple(sum(((k >> (3 * bit + channel)) & 1) << (7 - bit) for bit in range(3)) for channel in range(3))
                 for k in range(count))


VOC_PALETTE = colour_map(21)
CITYSCAPES_CLASSES = (
    "road", "sidewalk", "building", "wall", "fence", "pole", "traffic light", "traffic sign", "vegetation",
    "terrain", "sky", "person", "rider", "car", "truck", "bus", "train", "motorcycle", "bicycle")
CITYSCAPES_PALETTE = ((128, 64, 128), (244, 35, 232), (70, 70, 70), (102, 102, 156), (190, 153, 153), (153, 153, 153),
                      (250, 170, 30), (220, 220, 0), (107, 142, 35), (152, 251, 152), (70, 130, 180), (220, 20, 60),
                      (255, 0, 0), (0, 0, 142), (0, 0, 70), (0, 60, 100), (0, 80, 100), (0, 0, 230), (119, 11, 32))
# cityscapesScripts helpers/labels.py: the label ids of train ids 0..18 (the evaluated classes); all else is ignored
CITYSCAPES_TRAIN_LABEL_IDS = (7, 8, 11, 12, 13, 17, 19, 20, 21, 22, 23, 24, 25, 26, 27, 28, 31, 32, 33)
CITYSCAPES_ID_TO_TRAINID = np.array([CITYSCAPES_TRAIN_LABEL_IDS.index(label_id) if label_id in
                                     CITYSCAPES_TRAIN_LABEL_IDS else IGNORE_INDEX for label_id in range(256)], np.uint8)
CITYSCAPES_TRAINID_TO_ID = np.array(CITYSCAPES_TRAIN_LABEL_IDS, np.uint8)  # predictions for the test server
LABEL_HINTS = {"voc": "; check the label folder (SegmentationClass / SegmentationClassAug)",
               "cityscapes": "; these look like labelIds: run `python run.py prepare_cityscapes`",
               "folder": "; label maps hold class indices (255 = ignore; with data.reduce_zero_label 0 is ignored and "
                         "1..K are the classes): check data.classes and data.reduce_zero_label"}


def dataset_info(name):
    """{"list": lister(root, splits), "hint", "classes", "palette"} of a dataset kind ("voc" or "cityscapes")."""
    if name not in LABEL_HINTS:
        raise UserError(f"data.dataset must be one of {sorted(LABEL_HINTS)}, got {name!r}")
    lister, classes, palette = {"voc": (voc_items, VOC_CLASSES, VOC_PALETTE),
                                "cityscapes": (cityscapes_items, CITYSCAPES_CLASSES, CITYSCAPES_PALETTE),
                                "folder": (folder_items, (), colour_map(256))}[name]
    return {"list": lister, "hint": LABEL_HINTS[name], "classes": list(classes), "palette": palette}


def read_split(path):
    """Read a split file: one image stem per line, blank lines dropped. Missing file -> UserError."""
    if not os.path.isfile(path):
        raise UserError(f"split file {path} not found: check data_root / data.root, or prepare the dataset "
                        f"(python run.py prepare_voc_aug)")
    with open(path) as handle:
        return [line.strip() for line in handle.read().splitlines() if line.strip()]


def voc_items(root, splits):
    """[(image, label)] for splits like ["train:SegmentationClass", "aug:SegmentationClassAug"]."""
    if not os.path.isdir(root):
        raise UserError(f"{root}: VOC2012 folder not found. Put VOCdevkit under data/ (see README, "
                        f"'Preparing VOC12aug') or set data_root=PATH.")
    return [(os.path.join(root, "JPEGImages", f"{stem}.jpg"), os.path.join(root, label_dir, f"{stem}.png"))
            for name, label_dir in (split.split(":") for split in splits)
            for stem in read_split(os.path.join(root, "ImageSets", "Segmentation", f"{name}.txt"))]


def cityscapes_items(root, splits):
    """[(image, label)] for splits like ["train"]: leftImg8bit/<split>/<city>/*_leftImg8bit.png."""
    items = []
    for split in splits:
        images = sorted(glob.glob(os.path.join(root, "leftImg8bit", split, "*", "*_leftImg8bit.png")))
        if not images:
            raise UserError(f"{os.path.join(root, 'leftImg8bit', split)}: no *_leftImg8bit.png images. Put "
                            f"the Cityscapes folders under data/cityscapes (see README) or set data_root=PATH.")
        for image in images:
            city, stem = os.path.basename(os.path.dirname(image)), os.path.basename(image)[: -len("_leftImg8bit.png")]
            items.append((image, os.path.join(root, "gtFine", split, city, f"{stem}_gtFine_labelTrainIds.png")))
    missing = [label for _, label in items if not os.path.isfile(label)]
    if missing:
        raise UserError(f"{missing[0]} (and {len(missing) - 1} more) missing: run "
                        f"`python run.py prepare_cityscapes` to write the labelTrainIds files")
    return items


def folder_items(root, splits, label_suffix=".png"):
    """[(image, label)] of <root>/images/<split>/<stem>.<image extension> and
    <root>/labels/<split>/<stem><label_suffix>; UserError naming images without a label and labels without an image."""
    items = []
    for split in splits:
        folders = [os.path.join(root, kind, split) for kind in ("images", "labels")]
        for folder in folders:
            if not os.path.isdir(folder):
                raise UserError(f"{folder}: folder not found; a folder dataset keeps images/<split>/ and "
                                f"labels/<split>/ under data_root/data.root (README, 'Your own data')")
        names = [sorted(os.listdir(folder)) for folder in folders]
        images = {os.path.splitext(name)[0]: name for name in names[0] if name.lower().endswith(IMAGE_EXTENSIONS)}
        for name in names[0]:  # a.jpg and a.png would share the label a.png: one would silently win
            if name.lower().endswith(IMAGE_EXTENSIONS) and images[os.path.splitext(name)[0]] != name:
                raise UserError(f"{folders[0]}: {name} and {images[os.path.splitext(name)[0]]} share one stem, so "
                                f"one label; rename or remove one of them")
        labels = {name[: -len(label_suffix)]: name for name in names[1] if name.endswith(label_suffix)}
        for stems, kind in ((sorted(images.keys() - labels.keys()), "images without a label"),
                            (sorted(labels.keys() - images.keys()), f"labels (*{label_suffix}) without an image")):
            if stems:
                raise UserError(f"{folders[0 if 'images' in kind else 1]}: {len(stems)} {kind}, e.g. "
                                f"{', '.join(stems[:5])}; every image needs <stem>{label_suffix} in {folders[1]}")
        items += [(os.path.join(folders[0], images[stem]), os.path.join(folders[1], labels[stem])) for stem in images]
    return items


class EvalDataset(torch.utils.data.Dataset):
    """(resize_fn(image): the test-resized image views, original-size label)."""

    def __init__(self, items, resize_fn, num_classes, hint="", reader=None, reduce_zero_label=False):
        self.items, self.resize_fn, self.num_classes = items, resize_fn, num_classes
        self.hint, self.reader, self.reduce_zero_label = hint, reader, reduce_zero_label

    def __len__(self):
        return len(self.items)

    def __getitem__(self, index):
        image, label = self.load(index)
        return self.resize_fn(image), label

    def load(self, index):
        """(image uint8 H×W×3 BGR, label uint8 H×W) of item `index`: decoded, or from reader = (image_fn, label_fn).
        reduce_zero_label (mmseg's): stored 0 becomes 255 (ignored) and k becomes k - 1."""
        if self.reader is not None:
            image, label = self.reader[0](index), self.reader[1](index)
        else:
            image_path, label_path = self.items[index]
            image = read_image_bgr(image_path)
            label = read_label(label_path, self.num_classes + self.reduce_zero_label, self.hint)
            if image.shape[:2] != label.shape:
                raise UserError(f"{label_path}: label is {label.shape[1]}x{label.shape[0]} but {image_path} is "
                                f"{image.shape[1]}x{image.shape[0]}")
        if self.reduce_zero_label:
            label = label - np.uint8(1)  # 0 wraps to 255
            label[label == 254] = IGNORE_INDEX  # a stored 255 stays ignored
        return image, label


def check_items(items, num_classes, hint="", reduce_zero_label=False, workers=1):
    """(problem messages, int64 (num_classes,) pixels per class) of decoding every (image, label), in threads."""
    dataset = EvalDataset(items, None, num_classes, hint, None, reduce_zero_label)

    def check(index):
        try:
            _, label = dataset.load(index)
        except UserError as error:
            return str(error), 0
        return None, np.bincount(label[label != IGNORE_INDEX], minlength=num_classes)
    with concurrent.futures.ThreadPoolExecutor(workers) as pool:
        results = list(pool.map(check, range(len(items))))
    return [problem for problem, _ in results if problem], sum((pixels for _, pixels in results),
                                                               np.zeros(num_classes, np.int64))


class TrainDataset(EvalDataset):
    """Keys are (index, stream position) from InfiniteShardedSampler; a sample is (image, label, jitter): jittered
    here (numpy) and jitter None with jitter_in_loader, else the parameters for the device (transforms.apply_jitter)."""

    def __init__(self, items, sample_fn, num_classes, seed, hint="", reader=None, jitter_in_loader=True,
                 reduce_zero_label=False):
        super().__init__(items, None, num_classes, hint, reader, reduce_zero_label)
        self.sample_fn, self.seed, self.jitter_in_loader = sample_fn, seed, jitter_in_loader

    def __getitem__(self, key):
        image, label, jitter = self.sample_fn(np.random.default_rng([self.seed, key[1]]), *self.load(key[0]))
        return (transforms.jittered(image, jitter), label, None) if self.jitter_in_loader else (image, label, jitter)


class InfiniteShardedSampler(torch.utils.data.Sampler):
    """Endless shuffled epochs, less the tail that does not divide evenly across ranks; rank r takes every
    world_size-th index of each shared permutation, as (dataset index, global stream position), from its `start`-th
    sample on (resume). The position seeds the sample's numpy Generator: augmentations differ across ranks and workers
    yet do not depend on how many there are (batch 2B on one process = batch B on two, bit for bit)."""

    def __init__(self, size, rank, world_size, seed, start=0):
        if size < world_size:
            raise UserError(f"the training set has {size} images, fewer than the {world_size} processes")
        self.size, self.rank, self.world_size, self.seed, self.start = size, rank, world_size, seed, start

    def __iter__(self):
        per_rank = self.size // self.world_size
        epoch, offset = divmod(self.start, per_rank)
        while True:
            order = torch.randperm(self.size, generator=torch.Generator().manual_seed(self.seed * 100003 + epoch))
            for local in range(offset, per_rank):
                position = (epoch * per_rank + local) * self.world_size + self.rank
                yield int(order[local * self.world_size + self.rank]), position
            epoch, offset = epoch + 1, 0


def pad_to(size, divisor):
    return -(-size // divisor) * divisor


def collate(samples, divisor=1, min_hw=(0, 0)):
    """[(image uint8 H×W×3, label uint8 H×W[, jitter or None])] -> batch padded bottom/right to ≥ min_hw and a multiple
    of divisor: "image" uint8 N×3×H×W (padding 0, re-zeroed after normalising), "label" uint8 N×H×W (padding 255, int64
    on the device: 8× fewer bytes to copy), "hw" int64 N×2 valid sizes, "jitter" int16 N×JITTER_SIZE (transforms)."""
    height, width = (pad_to(max(min_hw[d], *(sample[0].shape[d] for sample in samples)), divisor) for d in (0, 1))
    images = torch.zeros(len(samples), 3, height, width, dtype=torch.uint8)
    labels = torch.full((len(samples), height, width), IGNORE_INDEX, dtype=torch.uint8)
    for i, (image, label, *_) in enumerate(samples):
        h, w = label.shape  # copy each array straight into the batch: one strided copy, no intermediate arrays
        images[i, :, :h, :w] = torch.from_numpy(np.moveaxis(image, -1, 0))
        labels[i, :h, :w] = torch.from_numpy(label)
    batch = {"image": images, "label": labels, "hw": torch.tensor([sample[1].shape for sample in samples])}
    if jitters := [sample[2] for sample in samples if len(sample) > 2 and sample[2] is not None]:
        if len(jitters) != len(samples):
            raise ValueError("either every sample of a batch carries colour jitter parameters or none does")
        batch["jitter"] = torch.from_numpy(np.stack(jitters))
    return batch


def normalize_and_pad(image, hw, mean, std, rgb, divisor):
    """The model's first step, on the device (collate padded on the host): image N×3×H×W uint8 (or float) 0..255 BGR;
    hw: int N×2 valid (height, width), padding at bottom/right; mean, std: 3 values in the model's channel order (RGB
    if `rgb`: flip BGR to RGB first); divisor: pad H, W up to a multiple of it (1 = none). Returns float32 N×3×H'×W':
    (x - mean) / std inside each valid area, exactly 0 elsewhere (both references pad after normalising: 0 = mean)."""
    x = image.float().flip(1) if rgb else image.float()
    mean, std = (torch.as_tensor(v, dtype=torch.float32, device=x.device).view(1, -1, 1, 1) for v in (mean, std))
    x = (x - mean) / std
    height, width = x.shape[-2:]
    hw = hw.to(x.device)
    # A mask instead of a loop over images keeps hw on the device: no host sync per batch.
    rows = torch.arange(height, device=x.device).view(1, height, 1) < hw[:, 0].view(-1, 1, 1)
    cols = torch.arange(width, device=x.device).view(1, 1, width) < hw[:, 1].view(-1, 1, 1)
    x = x.masked_fill(~(rows & cols).unsqueeze(1), 0.0)
    if image.is_contiguous(memory_format=torch.channels_last):  # masked_fill returns NCHW; keep the caller's NHWC
        x = x.contiguous(memory_format=torch.channels_last)
    pad_h, pad_w = -height % divisor, -width % divisor
    return F.pad(x, (0, pad_w, 0, pad_h), value=0.0) if pad_h or pad_w else x


def train_loader(dataset, per_device_batch, rank, world_size, seed, workers, pin_memory, start=0, divisor=1,
                 min_hw=(0, 0)):
    """Batches of `dataset` drawn by InfiniteShardedSampler, collated (a partial: picklable for the workers)."""
    return torch.utils.data.DataLoader(
        dataset, per_device_batch, sampler=InfiniteShardedSampler(len(dataset), rank, world_size, seed, start),
        collate_fn=functools.partial(collate, divisor=divisor, min_hw=min_hw), num_workers=workers, drop_last=True,
        pin_memory=pin_memory, persistent_workers=workers > 0, prefetch_factor=4 if workers > 0 else None,
        generator=torch.Generator().manual_seed(seed))  # iterating must not draw from the global RNG (exact resume)


def eval_loader(dataset, rank, world_size, workers, pin_memory, collate_fn):
    """Rank r evaluates images r, r + world_size, ...: every image exactly once across ranks, one a batch."""
    return torch.utils.data.DataLoader(
        torch.utils.data.Subset(dataset, list(range(rank, len(dataset), world_size))), batch_size=1, shuffle=False,
        num_workers=workers, collate_fn=collate_fn, pin_memory=pin_memory)


def to_device(batch, device):
    """Copy a batch; non_blocking overlaps the copy with compute when the source is pinned."""
    return {key: value.to(device, non_blocking=True) for key, value in batch.items()}


def prefetch(batches, device):
    """Yield batches already on the device, copying batch k+1 while the caller computes on batch k."""
    iterator = iter(batches)
    upcoming = to_device(next(iterator), device)
    for batch in iterator:
        current, upcoming = upcoming, to_device(batch, device)
        yield current
    yield upcoming


def list_images(pattern):
    """Sorted paths from `input`: one file, a folder (its jpg/jpeg/png/bmp/webp files, not recursive) or a glob. A
    symbolic link to nothing among them is skipped with a warning naming it."""
    if os.path.isfile(pattern):
        return [pattern]
    folder = os.path.isdir(pattern)
    named = sorted(os.path.join(pattern, name) for name in os.listdir(pattern) if name.lower().endswith(
        IMAGE_EXTENSIONS)) if folder else sorted(glob.glob(pattern))
    for path in (path for path in named if os.path.islink(path) and not os.path.exists(path)):
        print(f"warning: skipping {path}: a symbolic link to {os.readlink(path)}, which does not exist",
              file=sys.stderr, flush=True)
    paths = [path for path in named if os.path.isfile(path)]
    if not paths and folder:
        raise UserError(f"input={pattern}: the folder holds no {'/'.join(IMAGE_EXTENSIONS)} images")
    if not paths:
        raise UserError(f"input={pattern}: no such file or folder, and no file matches it as a glob")
    return paths


def prediction_jobs(paths, output):
    """[(input path, output stem)]; UserError when `output` is a file or an output would replace an input."""
    if os.path.exists(output) and not os.path.isdir(output):
        raise UserError(f"output={output} is an existing file; give a folder for the predictions")
    jobs, inputs = list(zip(paths, output_stems(paths))), {os.path.realpath(path) for path in paths}
    for name in (f"{stem}{ending}" for _, stem in jobs for ending in (".png", "_overlay.jpg")):
        if os.path.realpath(os.path.join(output, name)) in inputs:
            raise UserError(f"output={output}: writing {name} would replace the input image of that name; choose "
                            f"an output folder apart from the inputs")
    return jobs


def output_stems(paths):
    """File stems naming each image's outputs; a stem seen before gets _2, _3, ... so nothing is overwritten."""
    seen, stems = collections.Counter(), []
    for path in paths:
        stem = os.path.splitext(os.path.basename(path))[0]
        seen[stem] += 1
        stems.append(stem if seen[stem] == 1 else f"{stem}_{seen[stem]}")
    return stems
