"""Model benchmarks, not tests: `python run.py pspnet_bench`, `pointrend_bench`.

Model benchmarks time the training step (train.train_one_step: the trainer's loss, SGD, autocast and
loss scaler) on a synthetic batch already on the device, and inference in eval mode under no_grad, for
every combination of bench.amp × bench.channels_last × bench.compile. After bench.warmup untimed steps
the median of bench.steps timed ones is reported, with peak device memory and, from FLOPs counted
once by torch.utils.flop_counter (convolutions and matmuls; element-wise ops are not counted),
achieved TFLOP/s and MFU = achieved / the device's dense peak for that precision.

The data benchmark is seg/databench.py. Results go to <output_dir>/bench.{json,md}, written atomically.
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
import time

import torch
from torch.utils.flop_counter import FlopCounterMode

from seg import amp, data, dist, files, models, train
from seg.files import UserError

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
