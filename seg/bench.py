"""Benchmarks, not tests. model_bench (`run.py pspnet_bench` / `pointrend_bench`, -> bench.{json,md}): train step
and inference time, peak memory, TFLOP/s and MFU (convolution and matmul FLOPs by torch.utils.flop_counter) per amp ×
channels_last × compile; data_bench (-> data_bench.{json,md}): each recipe's pipeline in one loader worker."""
import contextlib
import datetime
import functools
import itertools
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np
import torch
from torch.utils.flop_counter import FlopCounterMode

from seg import amp, data, dist, files, train, transforms

# Dense peak TFLOP/s by (device-name substring, precision), first match wins: NVIDIA H100 (SXM, PCIe; "with sparsity"
# is twice these), H200 (H100 SXM compute) and A100 datasheets, Ascend 910 launch figure; else set bench.peak_tflops.
HOPPER_SXM = {"fp32": 66.9, "tf32": 494.7, "bf16": 989.4, "fp16": 989.4}
PEAK_TFLOPS = [("H100 PCIe", {"fp32": 51.2, "tf32": 378.0, "bf16": 756.0, "fp16": 756.0}), ("H100", HOPPER_SXM),
               ("H200", HOPPER_SXM), ("A100", {"fp32": 19.5, "tf32": 156.0, "bf16": 312.0, "fp16": 312.0}),
               ("Ascend910A", {"fp16": 256.0})]
# data_bench: the real image sizes (H, W) and formats, and the noise std that makes generated files about as large as
# real ones (Cityscapes PNGs ~2.2 MB: 11 GB zip / 5000, VOC JPEGs ~110 KB: 1.9 GB tar / 17125); issue #5's targets.
REAL_IMAGES = {"voc": ((375, 500), "JPEG", 20.0), "cityscapes": ((1024, 2048), "PNG", 0.9)}
TARGET_IMAGES_PER_S = {"voc": 128.0, "cityscapes": 48.0}
REFERENCES = {"voc": "mmseg 0.10 VOC pipeline: 128 images/s per core", "cityscapes":
              "detectron2 PointRend mapper: 9.6 images/s per core (105 ms: 50 ms PNG decode, 31 ms resize)"}
STAGES = ("decode", "crop_choice", "resize", "colour", "collate")  # per-image milliseconds in the worker
MODEL_COLUMNS = [("amp", "amp", "{}"), ("channels_last", "channels_last", "{}"), ("compile", "compile", "{}"),
                 ("status", "status", "{}"), ("train ms", "train_step_ms", "{:.1f}"),
                 ("train img/s", "train_images_per_s", "{:.2f}"), ("train MiB", "train_peak_memory_mib", "{:.0f}"),
                 ("infer ms", "infer_ms", "{:.1f}"), ("infer img/s", "infer_images_per_s", "{:.2f}"),
                 ("train TFLOP/s", "train_tflops", "{:.4g}"), ("train MFU", "train_mfu", "{:.1%}"),
                 ("infer TFLOP/s", "infer_tflops", "{:.4g}"), ("infer MFU", "infer_mfu", "{:.1%}"),
                 ("first step s", "first_step_s", "{:.1f}"), ("note", "note", "{}")]
DATA_COLUMNS = [("dataset", "dataset", "{}"), ("jitter on", "jitter_on", "{}"), ("cache", "cache", "{}"),
                ("image", "image_desc", "{}"), ("images/s", "images_per_s", "{:.1f}"),
                ("target", "target_images_per_s", "{:.0f}"), ("ms/image", "ms_per_image", "{:.1f}"),
                *((stage.replace("_", " "), stage, "{:.1f}") for stage in STAGES),
                ("device colour", "device_colour_ms_per_image", "{:.2f}")]


def environment(torch_device, command):
    if torch_device.type != "cpu":
        name = torch.get_device_module(torch_device).get_device_name(torch_device)
    else:
        name = platform.processor() or "cpu"
        with contextlib.suppress(OSError), open("/proc/cpuinfo") as handle:
            models = [line.split(":", 1)[1].strip() for line in handle if line.startswith("model name")]
            name = f"{models[0]} ({os.cpu_count()} logical cores)" if models else name
    date = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
    return {"device": name, "device_type": torch_device.type, "torch": torch.__version__,
            "threads": torch.get_num_threads(), "date": date, "command": command or shlex.join(["python"] + sys.argv)}


def run_environment(torch_device, world_size):
    """For training logs: environment() + Python, CUDA/cuDNN or torch_npu/CANN, device names, world size, git commit."""
    found = {**environment(torch_device, None), "python": platform.python_version(), "world_size": world_size}
    if torch_device.type == "cuda":
        found.update(cuda=torch.version.cuda, cudnn=torch.backends.cudnn.version())
    if torch_device.type == "npu":
        found.update(torch_npu=sys.modules["torch_npu"].__version__, cann=getattr(torch.version, "cann", None))
    if torch_device.type != "cpu":
        module = torch.get_device_module(torch_device)
        found["devices"] = [module.get_device_name(index) for index in range(module.device_count())]
    checkout = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    with contextlib.suppress(OSError, subprocess.SubprocessError):  # no git; .git: not a repository seg sits in
        if os.path.exists(os.path.join(checkout, ".git")):
            found["git_commit"] = subprocess.run(["git", "-C", checkout, "rev-parse", "HEAD"], capture_output=True,
                                                 text=True, timeout=10, check=True).stdout.strip()
    return found


def markdown_table(rows, columns):
    """rows: list of dicts; columns: (header, key, format) -> GitHub markdown table text."""
    lines = ["| " + " | ".join(header for header, _, _ in columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    for row in rows:
        missing = "" if row.get("status") in ("skipped", "error") else "n/a"  # n/a: not measurable here
        lines.append("| " + " | ".join(missing if row.get(key) is None else fmt.format(row[key])
                                       for _, key, fmt in columns) + " |")
    return "\n".join(lines)


def write_outputs(result, table, output_dir, stem, title, summary, log):
    """Log `summary` and the table; write <output_dir>/<stem>.json and <stem>.md, each atomically."""
    log(f"\n{summary}\n{table}")
    header = "\n".join(f"- {key}: {result[key]}" for key in ("device", "torch", "threads", "date", "command"))
    files.write_text_atomic(json.dumps(result, indent=2) + "\n", os.path.join(output_dir, f"{stem}.json"))
    files.write_text_atomic(f"# {title}\n\n{header}\n\n{table}\n", os.path.join(output_dir, f"{stem}.md"))


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


def workload(model_parts, options, torch_device, seed, loss_scale, num_classes, combination=("off", False, False)):
    """(model, train_step, infer) for one combination: a fresh model, its optimizer and synthetic batches."""
    (build_model, make_optimizer, loss_fn), (amp_mode, channels_last, use_compile) = model_parts, combination
    torch.manual_seed(seed)
    if use_compile:  # a fresh compile: batch sizes an earlier combination saw would make this one's shapes dynamic
        torch.compiler.reset()
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    model = build_model().to(torch_device, memory_format=memory_format)
    runner = torch.compile(model) if use_compile else model
    optimizer = make_optimizer(model)
    scaler = amp.make_scaler(torch_device.type, amp_mode, loss_scale)
    autocast = amp.autocast_for(torch_device.type, amp_mode)
    batches = []  # a training batch and one inference image: random uint8 images, labels (10% ignore), full hw
    for batch_seed, size, hw in ((0, options["batch_size"], options["crop_hw"]), (1, 1, options["eval_hw"])):
        generator = torch.Generator().manual_seed(batch_seed)
        label = torch.randint(0, num_classes, (size, *hw), generator=generator)
        label[torch.rand(label.shape, generator=generator) < 0.1] = files.IGNORE_INDEX
        image = torch.randint(0, 256, (size, 3, *hw), dtype=torch.uint8, generator=generator)
        batches.append({"image": image.to(torch_device, memory_format=memory_format), "label": label.to(torch_device),
                        "hw": torch.tensor([list(hw)] * size).to(torch_device)})
    batch, eval_batch = batches

    def train_step():
        model.train()
        train.train_one_step(runner, batch, loss_fn, optimizer, scaler, autocast)

    def infer():
        model.eval()
        with torch.no_grad(), autocast():
            runner(eval_batch["image"], eval_batch["hw"])
    return model, train_step, infer


def bench_combination(make_workload, options, torch_device, flops, peaks, combination):
    """The row of (amp, channels_last, compile): times, memory, TFLOP/s, MFU (None: unknown) or why skipped / failed."""
    amp_mode, channels_last, use_compile = combination
    row = {"amp": amp_mode, "channels_last": channels_last, "compile": use_compile, "status": "ok", "note": ""}
    if reason := ("channels_last: torch_npu supports only contiguous_format " if channels_last
                  and torch_device.type == "npu" else amp.unsupported(torch_device.type, amp_mode)):
        return {**row, "status": "skipped", "note": reason}
    try:
        calls = make_workload(combination)[1:]
        for kind, call, key in zip(("train", "infer"), calls, ("train_step_ms", "infer_ms")):
            if torch_device.type != "cpu":
                torch.get_device_module(torch_device).reset_peak_memory_stats(torch_device)
            first, times = dist.time_calls(call, torch_device, options["warmup"], options["steps"])
            row.setdefault("first_step_s", first)  # the first training step's
            row[key] = 1e3 * statistics.median(times)
            row[f"{kind}_peak_memory_mib"] = dist.peak_memory_mib(torch_device) or None  # None on CPU
    except Exception as error:  # noqa: BLE001 - a failing combination (compile, OOM) is a result to record
        return {**row, "status": "error", "note": " ".join(f"{type(error).__name__}: {error}".split())[:600]}
    finally:
        calls = None
        if torch_device.type != "cpu":
            torch.get_device_module(torch_device).empty_cache()
    row["train_images_per_s"] = options["batch_size"] / (row["train_step_ms"] / 1e3)
    row["infer_images_per_s"] = 1e3 / row["infer_ms"]
    for kind, milliseconds in (("train", row["train_step_ms"]), ("infer", row["infer_ms"])):
        row[f"{kind}_tflops"] = flops[kind] / (milliseconds / 1e3) / 1e12
        row[f"{kind}_mfu"] = row[f"{kind}_tflops"] / peaks[amp_mode][0] if peaks[amp_mode][0] else None
    return row


def model_bench(build_model, make_optimizer, loss_fn, options, torch_device, output_dir, title, seed=0,
                loss_scale="dynamic", num_classes=21, command=None, log=functools.partial(print, flush=True)):
    """Run the amp × channels_last × compile matrix of options (the [bench] table); build_model() -> a fresh CPU
    nn.Module, make_optimizer(model), loss_fn(outputs, label) -> loss dict. Returns the result (also on disk)."""
    if dist.launch_ranks()[2] > 1:
        raise files.UserError(f"[{title}] is a one-process benchmark; run it without torchrun")
    make_workload = functools.partial(workload, (build_model, make_optimizer, loss_fn), options, torch_device, seed,
                                      loss_scale, num_classes)
    model, *calls = make_workload()  # FLOPs do not depend on precision or memory format
    flops = {}
    try:
        for kind, call in zip(("train", "infer"), calls):
            with FlopCounterMode(display=False) as counter:  # 2 FLOPs per multiply-add
                call()
            flops[kind] = counter.get_total_flops()
    except ValueError as error:  # e.g. BatchNorm over one value per channel at batch 1
        raise files.UserError(f"[{title}] one step at bench.batch_size = {options['batch_size']}, bench.crop_hw "
                              f"= {options['crop_hw']} fails: {error}. Use a larger batch or crop.") from error
    result = {"section": title, "model": type(model).__name__.lower(), **environment(torch_device, command),
              "batch_size": options["batch_size"], **{key: list(options[key]) for key in ("crop_hw", "eval_hw")},
              "warmup": options["warmup"], "steps": options["steps"], "train_gflop_per_step": flops["train"] / 1e9,
              "infer_gflop_per_image": flops["infer"] / 1e9, "peak_tflops": {}, "rows": []}
    model = calls = None
    peaks = {mode: peak_tflops(result["device"], torch_device.type, "fp32" if mode == "off" else mode,
                               options["peak_tflops"]) for mode in options["amp"]}
    result["peak_tflops"] = {mode: {"tflops": value, "source": source} for mode, (value, source) in peaks.items()}
    for combination in itertools.product(options["amp"], options["channels_last"], options["compile"]):
        result["rows"].append(bench_combination(make_workload, options, torch_device, flops, peaks, combination))
        log(markdown_table(result["rows"][-1:], MODEL_COLUMNS).splitlines()[-1])
    write_outputs(result, markdown_table(result["rows"], MODEL_COLUMNS), output_dir, "bench",
                  f"{title} ({result['model']})", f"{title}: {result['device']}, torch {result['torch']}, batch "
                  f"{options['batch_size']} x {options['crop_hw']}, eval {options['eval_hw']}, "
                  f"{flops['train'] / 1e9:.4g} GFLOP/step, {flops['infer'] / 1e9:.4g} GFLOP/inference", log)
    return result


def pipeline_row(dataset, read, params, count, options, jitter_in_loader, torch_device):
    """Per-image ms of STAGES (the sampler's own calls and draws, timed) and of apply_jitter on the device."""
    warmup, steps, batch_size = options["warmup"], options["steps"], options["batch_size"]
    plan, hue_high = transforms.CROP_PLANS[dataset]
    transforms.apply_jitter(torch.zeros(1, 3, 1, 1, dtype=torch.uint8, device=torch_device),
                        torch.zeros(1, transforms.JITTER_SIZE, dtype=torch.int16, device=torch_device))  # tables
    samples = []
    for position in range(warmup + steps):
        if position in (0, warmup):  # the warm-up samples' times are thrown away
            totals = dict.fromkeys((*STAGES, "device_colour"), 0.0)
        rng, start = np.random.default_rng([0, position]), time.perf_counter()
        image, label = read(position % count)
        totals["decode"] += (decoded := time.perf_counter()) - start
        hw, window, flip, label = plan(rng, label, **params)
        totals["crop_choice"] += (planned := time.perf_counter()) - decoded
        image = transforms.planar_view(transforms.resize_image_window(image, hw, window, flip))
        totals["resize"] += (resized := time.perf_counter()) - planned
        jitter = transforms.draw_jitter(rng, hue_high)
        if jitter_in_loader:
            image, jitter = transforms.jittered(image, jitter), None
        totals["colour"] += time.perf_counter() - resized
        samples.append((image, label, jitter))
        if len(samples) == batch_size or position == warmup + steps - 1:
            start = time.perf_counter()
            batch, samples = data.collate(samples), []
            totals["collate"] += time.perf_counter() - start
            if not jitter_in_loader:
                batch = data.to_device(batch, torch_device)
                totals["device_colour"] += dist.time_calls(
                    lambda: transforms.apply_jitter(batch["image"], batch["jitter"]), torch_device, 0, 1)[0]
    total = sum(totals[stage] for stage in STAGES)
    return {"dataset": dataset, "jitter_on": "loader" if jitter_in_loader else "device",
            "images_per_s": steps / total, "ms_per_image": 1e3 * total / steps,
            "stages_ms": {stage: 1e3 * totals[stage] / steps for stage in STAGES},
            "device_colour_ms_per_image": None if jitter_in_loader else 1e3 * totals["device_colour"] / steps,
            "target_images_per_s": TARGET_IMAGES_PER_S[dataset], "reference": REFERENCES[dataset]}


def recipe_rows(recipe, options, folder, image_hw, torch_device, log):
    """Yields a row per jitter placement (options["jitter_on"]) and cache off / on, on files generated under folder
    (JPEG at quality 90, PNG at Pillow's default): shaded rectangles plus Gaussian noise (which sets the file sizes)."""
    dataset, classes = recipe["dataset"], recipe["num_classes"]
    (height, width), (image_format, std) = image_hw.get(dataset, REAL_IMAGES[dataset][0]), REAL_IMAGES[dataset][1:]
    items = [(os.path.join(folder, dataset, f"{index:06d}_image.{image_format.lower()}"),
              os.path.join(folder, dataset, f"{index:06d}_label.png")) for index in range(options["images"])]
    for index, (image_path, label_path) in enumerate(items):
        rng = np.random.default_rng([0, index])
        label = np.full((height, width), rng.integers(classes), np.uint8)
        for _ in range(24):
            y0, x0 = rng.integers(height), rng.integers(width)
            size_y, size_x = rng.integers(height // 8, height // 2 + 1), rng.integers(width // 8, width // 2 + 1)
            label[y0:y0 + size_y, x0:x0 + size_x] = rng.integers(classes) if rng.random() < 0.9 else 255
        colours = rng.uniform(30, 225, size=(256, 3)).astype(np.float32)
        yy, xx = np.linspace(-1, 1, height, dtype=np.float32), np.linspace(-1, 1, width, dtype=np.float32)
        shading = 25 * (yy[:, None, None] * rng.uniform(-1, 1, 3) + xx[None, :, None] * rng.uniform(-1, 1, 3))
        image = colours[label] + shading.astype(np.float32) + rng.normal(0, std, (height, width, 3)).astype(np.float32)
        files.save_image(image_path, np.clip(image, 0, 255).astype(np.uint8), image_format)
        files.write_label_png(label_path, label)
    read_label = functools.partial(files.read_label, num_classes=classes)
    start = time.perf_counter()
    reader = files.ensure_cache(items, files.cache_path_for(os.path.join(folder, ".cache"), items, dataset),
                                files.read_image_bgr, read_label, log=lambda *a: None)
    build_s = time.perf_counter() - start
    file_bytes = {"image_bytes_mean": float(np.mean([os.path.getsize(image) for image, _ in items])),
                  "label_bytes_mean": float(np.mean([os.path.getsize(label) for _, label in items]))}
    for place in options["jitter_on"]:
        if place not in ("loader", "device"):
            raise files.UserError(f"bench.jitter_on = {options['jitter_on']}: use \"loader\" and/or \"device\"")
        for use_cache, read in ((False, lambda i: (files.read_image_bgr(items[i][0]), read_label(items[i][1]))),
                                (True, lambda i: (reader.image(i), reader.label(i)))):
            row = pipeline_row(dataset, read, recipe["params"], len(items), options, place == "loader", torch_device)
            extra = "" if place == "loader" else f" (+ {row['device_colour_ms_per_image']:.2f} ms/image on the device)"
            log(f"{dataset} jitter in the {place}, cache {'on' if use_cache else 'off'}: "
                f"{row['images_per_s']:.1f} images/s{extra}")
            yield {**row, "section": recipe["section"], "cache": use_cache, "image_hw": [height, width],
                   "image_format": image_format, "crop_hw": list(recipe["crop_hw"]), **file_bytes,
                   "cache_build_s_per_image": build_s / len(items) if use_cache else None}


def data_bench(recipes, options, torch_device, output_dir, command=None, image_hw=None,
               log=functools.partial(print, flush=True)):
    """Per-worker throughput of each recipe ({"section", "dataset", "num_classes", "crop_hw", "params": the sampler's
    kwargs}); options: the [bench] table; image_hw overrides REAL_IMAGES sizes (tests). Returns the result."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in a DataLoader worker
    try:
        result = {**environment(torch.device("cpu"), command), "images": options["images"],
                  "warmup": options["warmup"], "steps": options["steps"], "batch_size": options["batch_size"],
                  "rows": [], "jitter_device": environment(torch_device, command)["device"]}
        os.makedirs(output_dir, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=output_dir, prefix=".data_bench-") as folder:
            for recipe in recipes:
                result["rows"] += recipe_rows(recipe, options, folder, image_hw or {}, torch_device, log)
    finally:
        torch.set_num_threads(threads)
    shown = [{**row, **row["stages_ms"], "image_desc": "{1}x{0} {2} {3:.0f} KB".format(
        *row["image_hw"], row["image_format"], row["image_bytes_mean"] / 1e3)} for row in result["rows"]]
    table = markdown_table(shown, DATA_COLUMNS) + (
        "\n\nStage columns are milliseconds per image in the worker. \"device colour\": milliseconds per image "
        f"of transforms.apply_jitter on {result['jitter_device']} (one thread on a CPU), outside the worker.")
    write_outputs(result, table, output_dir, "data_bench", "data pipeline, one worker",
                  f"data_bench: one worker, {result['device']}, torch {result['torch']}", log)
    return result


def pipeline_report(dataset, divisor, workers, samples=24):
    """One worker's throughput, as a line: decode, augment, collate `samples` samples here, after 2 warm-up ones."""
    keys = iter([(index % len(dataset), 10**9 + index) for index in range(samples + 2)])
    _, times = dist.time_calls(lambda: data.collate([dataset[next(keys)]], divisor), torch.device("cpu"), 2, samples)
    rate = samples / sum(times)
    return (f"input pipeline: {rate:.1f} images/s per worker (decode + augment + collate, colour jitter "
            f"{'in the loader' if dataset.jitter_in_loader else 'on the device'}; measured in the main process); "
            f"{workers} workers per device give up to {rate * max(workers, 1):.0f} images/s")
