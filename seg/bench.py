"""Benchmarks, not tests: `python run.py pspnet_bench`, `pointrend_bench`, `data_bench`.

Model benchmarks time the training step (train.train_one_step: the trainer's loss, SGD, autocast and
loss scaler) on a synthetic batch already on the device, and inference in eval mode under no_grad, for
every combination of bench.amp × bench.channels_last × bench.compile. After bench.warmup untimed steps
the median of bench.steps timed ones is reported, with peak device memory and, from FLOPs counted
once by torch.utils.flop_counter (convolutions and matmuls; element-wise ops are not counted),
achieved TFLOP/s and MFU = achieved / the device's dense peak for that precision.

The data benchmark runs each training recipe's pipeline in one process, as one loader worker does
(decode -> transforms.TRAIN_SAMPLERS -> collate), on generated files of the real sizes and formats,
with the decoded-image cache off and on, and splits the time into stages.

Results go to <output_dir>/bench.{json,md} and data_bench.{json,md}, written atomically.
"""
import contextlib
import datetime
import functools
import itertools
import json
import os
import platform
import shlex
import statistics
import sys
import tempfile
import time

import numpy as np
import torch
from PIL import Image
from torch.utils.flop_counter import FlopCounterMode

from seg import amp, cache, data, dist, files, models, train, transforms
from seg.errors import UserError

# Dense (no sparsity) peak TFLOP/s by (device-name substring, precision); the first match wins, so
# more specific names come first. Sources: NVIDIA H100 datasheet (SXM: FP32 67, TF32 494.7, BF16/FP16
# 989.4; PCIe: 51, 378, 756; the datasheet's "with sparsity" figures are twice these), NVIDIA H200
# datasheet (same compute as H100 SXM), NVIDIA A100 datasheet (FP32 19.5, TF32 156, BF16/FP16 312),
# Huawei's Ascend 910 launch figure (FP16 256). Other devices: set bench.peak_tflops.
PEAK_TFLOPS = [
    ("H100 PCIe", {"fp32": 51.2, "tf32": 378.0, "bf16": 756.0, "fp16": 756.0}),
    ("H100", {"fp32": 66.9, "tf32": 494.7, "bf16": 989.4, "fp16": 989.4}),
    ("H200", {"fp32": 66.9, "tf32": 494.7, "bf16": 989.4, "fp16": 989.4}),
    ("A100", {"fp32": 19.5, "tf32": 156.0, "bf16": 312.0, "fp16": 312.0}),
    ("Ascend910A", {"fp16": 256.0}),
]

# data_bench: the real datasets' image sizes (H, W), formats and the per-worker targets of issue #5.
REAL_IMAGES = {"voc": ((375, 500), "JPEG"), "cityscapes": ((1024, 2048), "PNG")}
# Noise std of the generated images, chosen so that files are about as large as the real ones:
# Cityscapes leftImg8bit PNGs ~2.2 MB (11 GB zip / 5000 images), VOC JPEGs ~110 KB (1.9 GB tar / 17125).
NOISE = {"voc": 20.0, "cityscapes": 0.9}
TARGET_IMAGES_PER_S = {"voc": 128.0, "cityscapes": 48.0}
REFERENCES = {"voc": "mmseg 0.10 VOC pipeline: 128 images/s per core",
              "cityscapes": "detectron2 PointRend mapper: 9.6 images/s per core (105 ms: 50 ms PNG decode, "
                            "31 ms resize)"}
# Functions of seg/transforms.py timed as stages: the first name that exists is wrapped (a stage with
# none counts as "other_transform"). Keep in step with transforms.py when its functions are renamed.
STAGE_FUNCTIONS = {"crop_choice": ("choose_window",), "resize": ("resize_image_window", "bilinear_window"),
                   "colour": ("_apply_jitter",)}


# ---------------------------------------------------------------- environment and output


def device_name(torch_device):
    if torch_device.type in ("cuda", "npu"):
        return getattr(torch, torch_device.type).get_device_name(torch_device)
    with contextlib.suppress(OSError):
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.startswith("model name"):
                    return f"{line.split(':', 1)[1].strip()} ({os.cpu_count()} logical cores)"
    return platform.processor() or "cpu"


def environment(torch_device, command):
    date = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
    return {"device": device_name(torch_device), "device_type": torch_device.type, "torch": torch.__version__,
            "threads": torch.get_num_threads(), "date": date, "command": command or shlex.join(["python"] + sys.argv)}


def peak_tflops(name, device_type, precision, override):
    """(dense peak TFLOP/s or None, where it came from) for a device name and precision."""
    if override > 0:
        return override, "bench.peak_tflops"
    if device_type == "cuda" and precision == "fp32" and torch.backends.cudnn.allow_tf32:
        precision = "tf32"  # cuDNN convolutions (nearly all of these models' FLOPs) run in TF32 by default
    for substring, peaks in PEAK_TFLOPS:
        if substring in name and precision in peaks:
            return peaks[precision], f"seg/bench.py PEAK_TFLOPS[{substring!r}][{precision!r}]"
    return None, f"no peak known for {name!r} {precision}; set bench.peak_tflops"


def markdown_table(rows, columns):
    """rows: list of dicts; columns: (header, key, format) -> GitHub markdown table text."""
    lines = ["| " + " | ".join(header for header, _, _ in columns) + " |",
             "|" + "|".join("---" for _ in columns) + "|"]
    for row in rows:
        missing = "" if row.get("status") in ("skipped", "error") else "n/a"  # n/a: not measurable here
        cells = [(missing if row.get(key) is None else fmt.format(row[key])) for _, key, fmt in columns]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_outputs(result, table, output_dir, stem, title):
    """<output_dir>/<stem>.json and <stem>.md, each atomically."""
    header = "\n".join(f"- {key}: {result[key]}" for key in ("device", "torch", "threads", "date", "command"))
    files.write_text_atomic(json.dumps(result, indent=2) + "\n", os.path.join(output_dir, f"{stem}.json"))
    files.write_text_atomic(f"# {title}\n\n{header}\n\n{table}\n", os.path.join(output_dir, f"{stem}.md"))


# ---------------------------------------------------------------- model benchmark


def synthetic_batch(batch_size, hw, num_classes, torch_device, seed=0):
    """A batch dict in memory: random uint8 images, random labels (10% ignore), full-size hw."""
    generator = torch.Generator().manual_seed(seed)
    label = torch.randint(0, num_classes, (batch_size, *hw), generator=generator)
    label[torch.rand(label.shape, generator=generator) < 0.1] = data.IGNORE_INDEX
    batch = {"image": torch.randint(0, 256, (batch_size, 3, *hw), dtype=torch.uint8, generator=generator),
             "label": label, "hw": torch.tensor([list(hw)] * batch_size)}
    return {key: value.to(torch_device) for key, value in batch.items()}


def time_calls(function, torch_device, warmup, steps):
    """(seconds of the first call, [seconds of each of `steps` calls after `warmup` untimed ones])."""
    times = []
    for _ in range(warmup + steps):
        dist.synchronize(torch_device)
        start = time.perf_counter()
        function()
        dist.synchronize(torch_device)
        times.append(time.perf_counter() - start)
    return times[0], times[warmup:]


def count_flops(function):
    """FLOPs (2 per multiply-add) of the convolutions and matmuls one call runs."""
    with FlopCounterMode(display=False) as counter:
        function()
    return counter.get_total_flops()


def skip_reason(device_type, amp_mode, channels_last, use_compile):
    """Why the device cannot run a combination, or None."""
    if channels_last and device_type == "npu":
        return "channels_last: torch_npu supports only contiguous_format (spec/npu.md §8)"
    return amp.check_amp_supported(device_type, amp_mode)


class Workload:
    """What one model benchmark runs: the model, its optimizer and batches, built per combination."""

    def __init__(self, config, torch_device, amp_mode="off", channels_last=False, use_compile=False):
        bench = config["bench"]
        torch.manual_seed(config["seed"])
        memory_format = torch.channels_last if channels_last else torch.contiguous_format
        self.model = models.build(config["model"]).to(torch_device, memory_format=memory_format)
        self.runner = torch.compile(self.model) if use_compile else self.model
        self.optimizer = train.build_optimizer(self.model, config["optimizer"])
        self.scaler = amp.make_scaler(amp_mode, config["loss_scale"])
        self.autocast = functools.partial(amp.autocast_context, torch_device.type, amp_mode)
        self.loss_fn = models.loss_function(config)
        classes = config["model"]["num_classes"]
        self.batch = synthetic_batch(bench["batch_size"], bench["crop_hw"], classes, torch_device)
        self.eval_batch = synthetic_batch(1, bench["eval_hw"], classes, torch_device, seed=1)
        if channels_last:
            for batch in (self.batch, self.eval_batch):
                batch["image"] = batch["image"].contiguous(memory_format=torch.channels_last)

    def train_step(self):
        self.model.train()
        train.train_one_step(self.runner, self.batch, self.loss_fn, self.optimizer, self.scaler, self.autocast)

    def infer(self):
        self.model.eval()
        with torch.no_grad(), self.autocast():
            self.runner(self.eval_batch["image"], self.eval_batch["hw"])


def reset_peak(torch_device):
    if torch_device.type != "cpu":
        getattr(torch, torch_device.type).reset_peak_memory_stats(torch_device)


def bench_combination(config, torch_device, amp_mode, channels_last, use_compile):
    """One row of the matrix: timings, memory (None on CPU) or the reason it was skipped / failed."""
    row = {"amp": amp_mode, "channels_last": channels_last, "compile": use_compile, "status": "ok", "note": ""}
    reason = skip_reason(torch_device.type, amp_mode, channels_last, use_compile)
    if reason:
        return {**row, "status": "skipped", "note": reason}
    bench, memory = config["bench"], (lambda: dist.peak_memory_mib(torch_device) or None)  # None on CPU
    try:
        work = Workload(config, torch_device, amp_mode, channels_last, use_compile)
        reset_peak(torch_device)
        first, train_times = time_calls(work.train_step, torch_device, bench["warmup"], bench["steps"])
        row.update(first_step_s=first, train_step_ms=1e3 * statistics.median(train_times),
                   train_peak_memory_mib=memory())
        reset_peak(torch_device)
        _, infer_times = time_calls(work.infer, torch_device, bench["warmup"], bench["steps"])
        row.update(infer_ms=1e3 * statistics.median(infer_times), infer_peak_memory_mib=memory())
    except Exception as error:  # noqa: BLE001 - a failing combination (compile, OOM) is a result to record
        text = " ".join(f"{type(error).__name__}: {error}".split())
        return {**row, "status": "error", "note": text[:600]}
    finally:
        work = None
        if torch_device.type != "cpu":
            getattr(torch, torch_device.type).empty_cache()
    row["train_images_per_s"] = bench["batch_size"] / (row["train_step_ms"] / 1e3)
    row["infer_images_per_s"] = 1e3 / row["infer_ms"]
    return row


def add_flop_rates(row, flops, peaks):
    """Achieved TFLOP/s and MFU (None where the peak is unknown) for a finished row."""
    peak = peaks[row["amp"]][0]
    for kind, milliseconds in (("train", row["train_step_ms"]), ("infer", row["infer_ms"])):
        achieved = flops[kind] / (milliseconds / 1e3) / 1e12
        row[f"{kind}_tflops"] = achieved
        row[f"{kind}_mfu"] = achieved / peak if peak else None


MODEL_COLUMNS = [("amp", "amp", "{}"), ("channels_last", "channels_last", "{}"), ("compile", "compile", "{}"),
                 ("status", "status", "{}"), ("train ms", "train_step_ms", "{:.1f}"),
                 ("train img/s", "train_images_per_s", "{:.2f}"), ("train MiB", "train_peak_memory_mib", "{:.0f}"),
                 ("infer ms", "infer_ms", "{:.1f}"), ("infer img/s", "infer_images_per_s", "{:.2f}"),
                 ("train TFLOP/s", "train_tflops", "{:.4g}"), ("train MFU", "train_mfu", "{:.1%}"),
                 ("infer TFLOP/s", "infer_tflops", "{:.4g}"), ("infer MFU", "infer_mfu", "{:.1%}"),
                 ("first step s", "first_step_s", "{:.1f}"), ("note", "note", "{}")]


def model_bench(config, command=None, log=functools.partial(print, flush=True)):
    """Run the amp × channels_last × compile matrix; returns the result dict (also written to disk)."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise UserError(f"[{config['section']}] is a one-process benchmark; run it without torchrun")
    torch_device, _, _ = dist.setup(config["device"])
    os.makedirs(config["output_dir"], exist_ok=True)
    bench = config["bench"]
    work = Workload(config, torch_device)  # FLOPs do not depend on precision or memory format
    try:
        flops = {"train": count_flops(work.train_step), "infer": count_flops(work.infer)}
    except ValueError as error:  # e.g. BatchNorm over one value per channel at batch 1
        raise UserError(f"[{config['section']}] one step at bench.batch_size = {bench['batch_size']}, bench.crop_hw "
                        f"= {bench['crop_hw']} fails: {error}. Use a larger batch or crop.") from error
    work = None
    result = {"section": config["section"], "model": config["model"]["name"],
              **environment(torch_device, command), "batch_size": bench["batch_size"],
              "crop_hw": list(bench["crop_hw"]), "eval_hw": list(bench["eval_hw"]), "warmup": bench["warmup"],
              "steps": bench["steps"], "train_gflop_per_step": flops["train"] / 1e9,
              "infer_gflop_per_image": flops["infer"] / 1e9, "peak_tflops": {}, "rows": []}
    peaks = {mode: peak_tflops(result["device"], torch_device.type, "fp32" if mode == "off" else mode,
                               bench["peak_tflops"]) for mode in bench["amp"]}
    result["peak_tflops"] = {mode: {"tflops": value, "source": source} for mode, (value, source) in peaks.items()}
    for amp_mode, channels_last, use_compile in itertools.product(bench["amp"], bench["channels_last"],
                                                                   bench["compile"]):
        row = bench_combination(config, torch_device, amp_mode, channels_last, use_compile)
        if row["status"] == "ok":
            add_flop_rates(row, flops, peaks)
        result["rows"].append(row)
        log(markdown_table([row], MODEL_COLUMNS).splitlines()[-1])
    table = markdown_table(result["rows"], MODEL_COLUMNS)
    log(f"\n{result['section']}: {result['device']}, torch {result['torch']}, batch {bench['batch_size']} x "
        f"{bench['crop_hw']}, eval {bench['eval_hw']}, {flops['train'] / 1e9:.4g} GFLOP/step, "
        f"{flops['infer'] / 1e9:.4g} GFLOP/inference\n{table}")
    write_outputs(result, table, config["output_dir"], "bench", f"{config['section']} ({result['model']})")
    return result


# ---------------------------------------------------------------- data benchmark: generated files


def synthetic_scene(rng, hw, num_classes, noise):
    """(RGB uint8 H×W×3, label uint8 H×W): flat-coloured rectangles with smooth shading and Gaussian
    noise of std `noise`, which sets the compressed size (see NOISE)."""
    height, width = hw
    label = np.full(hw, rng.integers(num_classes), np.uint8)
    for _ in range(24):
        y0, x0 = rng.integers(height), rng.integers(width)
        size_y, size_x = rng.integers(height // 8, height // 2 + 1), rng.integers(width // 8, width // 2 + 1)
        label[y0:y0 + size_y, x0:x0 + size_x] = rng.integers(num_classes) if rng.random() < 0.9 else 255
    colours = rng.uniform(30, 225, size=(256, 3)).astype(np.float32)
    yy, xx = np.linspace(-1, 1, height, dtype=np.float32), np.linspace(-1, 1, width, dtype=np.float32)
    shading = 25 * (yy[:, None, None] * rng.uniform(-1, 1, 3) + xx[None, :, None] * rng.uniform(-1, 1, 3))
    image = colours[label] + shading.astype(np.float32) + rng.normal(0, noise, (height, width, 3)).astype(np.float32)
    return np.clip(image, 0, 255).astype(np.uint8), label


def write_bench_dataset(root, dataset, count, hw, num_classes, seed=0):
    """`count` generated samples in the dataset's on-disk layout; returns (data.root, train_splits)."""
    for index in range(count):
        image, label = synthetic_scene(np.random.default_rng([seed, index]), hw, num_classes, NOISE[dataset])
        if dataset == "voc":
            image_path = os.path.join(root, "voc", "JPEGImages", f"{index:06d}.jpg")
            label_path = os.path.join(root, "voc", "SegmentationClassAug", f"{index:06d}.png")
        else:
            stem = os.path.join("train", "bench", f"bench_000000_{index:06d}")
            image_path = os.path.join(root, "cityscapes", "leftImg8bit", f"{stem}_leftImg8bit.png")
            label_path = os.path.join(root, "cityscapes", "gtFine", f"{stem}_gtFine_labelTrainIds.png")
        for path in (image_path, label_path):
            os.makedirs(os.path.dirname(path), exist_ok=True)
        options = {"quality": 90} if dataset == "voc" else {}  # Pillow's PNG default: compress_level 6
        Image.fromarray(image).save(image_path, format=REAL_IMAGES[dataset][1], **options)
        Image.fromarray(label).save(label_path, format="PNG")
    if dataset == "voc":
        splits = os.path.join(root, "voc", "ImageSets", "Segmentation")
        os.makedirs(splits, exist_ok=True)
        with open(os.path.join(splits, "bench.txt"), "w") as handle:
            handle.write("".join(f"{index:06d}\n" for index in range(count)))
        return "voc", ["bench:SegmentationClassAug"]
    return "cityscapes", ["train"]


# ---------------------------------------------------------------- data benchmark: timing


@contextlib.contextmanager
def timed_stages(totals):
    """Accumulate seconds spent in the STAGE_FUNCTIONS of seg.transforms into totals[stage].

    Wraps the module attributes for the duration: the samplers look these functions up at call time.
    """
    wrapped = {}
    for stage, names in STAGE_FUNCTIONS.items():
        name = next((name for name in names if hasattr(transforms, name)), None)
        if name is not None:
            wrapped[name] = (stage, getattr(transforms, name))

    def timed(stage, function):
        def wrapper(*args, **kwargs):
            start = time.perf_counter()
            try:
                return function(*args, **kwargs)
            finally:
                totals[stage] = totals.get(stage, 0.0) + time.perf_counter() - start
        return wrapper

    try:
        for name, (stage, function) in wrapped.items():
            setattr(transforms, name, timed(stage, function))
        yield totals
    finally:
        for name, (_, function) in wrapped.items():
            setattr(transforms, name, function)


def pipeline_row(dataset, read, sample_fn, count, warmup, steps, batch_size):
    """Per-image milliseconds of decode / sampler stages / collate, over `steps` samples after `warmup`."""
    totals, samples = {"decode": 0.0, "sample": 0.0, "collate": 0.0}, []
    for position in range(warmup + steps):
        if position == warmup:
            totals, samples = {"decode": 0.0, "sample": 0.0, "collate": 0.0}, []
        start = time.perf_counter()
        image, label = read(position % count)
        middle = time.perf_counter()
        with timed_stages(totals):
            samples.append(sample_fn(np.random.default_rng([0, position]), image, label))
        totals["decode"] += middle - start
        totals["sample"] += time.perf_counter() - middle
        if len(samples) == batch_size or position == warmup + steps - 1:
            start = time.perf_counter()
            data.collate(samples)
            totals["collate"] += time.perf_counter() - start
            samples = []
    stages = {"decode": totals["decode"], **{stage: totals.get(stage, 0.0) for stage in STAGE_FUNCTIONS},
              "other_transform": totals["sample"] - sum(totals.get(stage, 0.0) for stage in STAGE_FUNCTIONS),
              "collate": totals["collate"]}
    total = totals["decode"] + totals["sample"] + totals["collate"]
    return {"dataset": dataset, "images_per_s": steps / total, "ms_per_image": 1e3 * total / steps,
            "stages_ms": {stage: 1e3 * seconds / steps for stage, seconds in stages.items()},
            "target_images_per_s": TARGET_IMAGES_PER_S[dataset], "reference": REFERENCES[dataset]}


def dataset_rows(config, recipe, folder, image_hw, log):
    """Cache off and on rows for one training recipe, on files generated under `folder`."""
    bench, dataset = config["bench"], recipe["data"]["dataset"]
    hw, image_format = image_hw.get(dataset, REAL_IMAGES[dataset][0]), REAL_IMAGES[dataset][1]
    classes = recipe["model"]["num_classes"]
    root, splits = write_bench_dataset(folder, dataset, bench["images"], hw, classes)
    recipe = {**recipe, "data_root": folder, "data": {**recipe["data"], "root": root, "train_splits": splits}}
    train_set = train.train_dataset(recipe)
    items, sample_fn = train_set.items, train_set.sample_fn
    uncached = lambda i: (data.read_image_bgr(items[i][0]), data.read_label(items[i][1], classes))  # noqa: E731
    start = time.perf_counter()
    reader = cache.ensure_cache(items, cache.cache_path_for(os.path.join(folder, ".cache"), items, dataset),
                                data.read_image_bgr, lambda path: data.read_label(path, classes), log=lambda *a: None)
    build_s = time.perf_counter() - start
    file_bytes = {"image_bytes_mean": float(np.mean([os.path.getsize(image) for image, _ in items])),
                  "label_bytes_mean": float(np.mean([os.path.getsize(label) for _, label in items]))}
    rows = []
    for use_cache, read in ((False, uncached), (True, lambda i: (reader.image(i), reader.label(i)))):
        row = pipeline_row(dataset, read, sample_fn, len(items), bench["warmup"], bench["steps"],
                           bench["batch_size"])
        rows.append({**row, "section": recipe["section"], "cache": use_cache, "image_hw": list(hw),
                     "image_format": image_format, "crop_hw": list(recipe["data"]["crop_hw"]), **file_bytes,
                     "cache_build_s_per_image": build_s / len(items) if use_cache else None})
        log(f"{dataset} cache {'on' if use_cache else 'off'}: {row['images_per_s']:.1f} images/s")
    return rows


DATA_COLUMNS = [("dataset", "dataset", "{}"), ("cache", "cache", "{}"), ("image", "image_desc", "{}"),
                ("images/s", "images_per_s", "{:.1f}"), ("target", "target_images_per_s", "{:.0f}"),
                ("ms/image", "ms_per_image", "{:.1f}"), ("decode", "decode", "{:.1f}"),
                ("crop choice", "crop_choice", "{:.1f}"), ("resize", "resize", "{:.1f}"),
                ("colour", "colour", "{:.1f}"), ("other", "other_transform", "{:.1f}"),
                ("collate", "collate", "{:.1f}")]


def data_bench(config, recipes, command=None, image_hw=None, log=functools.partial(print, flush=True)):
    """Per-worker throughput of each recipe's training pipeline; image_hw overrides REAL_IMAGES sizes
    (tests only). Returns the result dict (also written to disk)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in a DataLoader worker
    try:
        result = {**environment(torch.device("cpu"), command), "images": config["bench"]["images"],
                  "warmup": config["bench"]["warmup"], "steps": config["bench"]["steps"],
                  "batch_size": config["bench"]["batch_size"], "rows": []}
        os.makedirs(config["output_dir"], exist_ok=True)
        with tempfile.TemporaryDirectory(dir=config["output_dir"], prefix=".data_bench-") as folder:
            for recipe in recipes:
                result["rows"] += dataset_rows(config, recipe, folder, image_hw or {}, log)
    finally:
        torch.set_num_threads(threads)
    shown = [{**row, **row["stages_ms"], "image_desc": "{}x{} {} {:.0f} KB".format(
        row["image_hw"][1], row["image_hw"][0], row["image_format"], row["image_bytes_mean"] / 1e3)}
        for row in result["rows"]]
    table = markdown_table(shown, DATA_COLUMNS) + "\n\nStage columns are milliseconds per image."
    log(f"\ndata_bench: one worker, {result['device']}, torch {result['torch']}\n{table}")
    write_outputs(result, table, config["output_dir"], "data_bench", "data pipeline, one worker")
    return result
