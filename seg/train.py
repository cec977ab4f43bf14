"""The training pieces shared by PSPNet and PointRend (seg/tasks.py runs the loop): losses, precision, optimizer,
learning rate, one step, and the meter that reads losses and speed once per log step.

Losses take (model outputs, int64 N×H×W labels with 255 = ignored or padded) and return dicts of "loss*" terms.
Precision is decided here only: amp = "off" | "fp16" | "bf16"; fp16 needs loss_scale = "dynamic" (2**16, halved on
overflow, doubled after 2000 clean steps) or a number (static, like the Ascend scripts' 128 and 512); bf16 needs
none. A step whose gradients overflow is skipped, never applied.
"""
import contextlib
import json
import math
import os
import time

import torch
import torch.nn.functional as F

from seg import checkpoint, colour, dist, files
from seg.files import IGNORE_INDEX, UserError
from seg.pointrend import sample_labels_nearest

NORM_TYPES = (torch.nn.modules.batchnorm._BatchNorm, torch.nn.GroupNorm)
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}
STATIC_SCALE = 2**31 - 1  # growth interval of a static loss scale: it never grows


def pixel_cross_entropy(logits, label, average="all", ignore_index=IGNORE_INDEX):
    """fp32 cross-entropy of N×C×H×W logits against N×H×W labels, summed over valid pixels and divided by N·H·W
    (average="all", mmsegmentation 0.10) or by the valid pixels (average="valid", detectron2; 0 if none)."""
    per_pixel = F.cross_entropy(logits.float(), label, reduction="none", ignore_index=ignore_index)
    if average == "all":
        return per_pixel.mean()
    if average == "valid":  # clamp keeps an all-ignored batch at 0/1 = 0 instead of 0/0 = NaN
        return per_pixel.sum() / (label != ignore_index).sum().clamp(min=1)
    raise ValueError(f"loss average must be 'all' or 'valid', got {average!r}")


def resize_logits(logits, size_hw):
    """Bilinear (align_corners=False) resize of N×C×h×w logits to size_hw, in fp32."""
    return F.interpolate(logits.float(), size=tuple(size_hw), mode="bilinear", align_corners=False)


def pspnet_losses(outputs, label, average="all", aux_weight=0.4):
    """mmsegmentation's decode + 0.4·auxiliary loss: logits are resized to the label size first."""
    size = label.shape[-2:]
    losses = {"loss_seg": pixel_cross_entropy(resize_logits(outputs["seg"], size), label, average)}
    if "aux" in outputs:
        losses["loss_aux"] = aux_weight * pixel_cross_entropy(resize_logits(outputs["aux"], size), label, average)
    return losses


def pointrend_losses(outputs, label):
    """detectron2's coarse loss plus the point loss. The stride-4 coarse logits are upsampled to the padded
    input size (= label size) and averaged over valid pixels. Point labels are nearest-sampled from the padded
    labels at the points the model used; the point loss averages over valid points and is 0 when all are
    ignored (detectron2 issue #1455 went NaN there)."""
    coarse = resize_logits(outputs["coarse"], label.shape[-2:])
    point_labels = sample_labels_nearest(label, outputs["point_coords"])
    return {"loss_sem_seg": pixel_cross_entropy(coarse, label, "valid"),
            "loss_sem_seg_point": pixel_cross_entropy(outputs["point_logits"], point_labels, "valid")}


def autocast_context(device_type, amp):
    """A context manager running the forward pass in the requested precision."""
    if amp == "off":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device_type, dtype=DTYPES[amp])


def make_scaler(device_type, amp, loss_scale):
    """torch.amp.GradScaler, enabled for fp16 only (elsewhere its calls pass through). A static scale is one
    that never grows; train_one_step undoes the halving GradScaler applies after an overflow."""
    dynamic = loss_scale == "dynamic"
    options = {"init_scale": 2.0**16 if dynamic else float(loss_scale), "enabled": amp == "fp16",
               "growth_interval": 2000 if dynamic else STATIC_SCALE}
    if device_type == "npu":  # spec npu.md §4: torch.amp's "npu" scaler needs torch >= 2.3; this one every 2.x
        return torch.npu.amp.GradScaler(**options)
    return torch.amp.GradScaler(device_type, **options)


def scaler_state(scaler):
    """The scaler in checkpoints as plain numbers: {"scale", "dynamic", "clean_steps"}, or None without fp16."""
    if not scaler.is_enabled():
        return None
    return {"scale": scaler.get_scale(), "dynamic": scaler.get_growth_interval() != STATIC_SCALE,
            "clean_steps": int(scaler.state_dict()["_growth_tracker"])}


def load_scaler_state(scaler, state):
    if scaler.is_enabled() and state:
        scaler.load_state_dict({**scaler.state_dict(), "scale": state["scale"],
                                "_growth_tracker": state["clean_steps"]})


def lr_at(iteration, base_lr, schedule, total):
    """Learning rate before iteration `iteration` (0-based) of `total`: poly (mmsegmentation)
    (base − min)·(1 − t/T)^power + min, or multistep (detectron2 WarmupMultiStepLR) base · warmup(t) ·
    gamma^(number of steps ≤ t) with warmup(t) = f + (1 − f)·t/W for t < W."""
    if schedule["policy"] == "poly":
        return (base_lr - schedule["min_lr"]) * (1 - iteration / total) ** schedule["power"] + schedule["min_lr"]
    factor = schedule["gamma"] ** sum(1 for step in schedule["steps"] if step <= iteration)
    if iteration < schedule["warmup_iters"]:
        alpha = iteration / schedule["warmup_iters"]
        factor *= schedule["warmup_factor"] * (1 - alpha) + alpha
    return base_lr * factor


def param_groups(model, weight_decay, weight_decay_norm):
    """Two groups: normalisation parameters (BN/GN γ, β) and everything else."""
    norm_ids = {id(p) for module in model.modules() if isinstance(module, NORM_TYPES)
                for p in module.parameters(recurse=False)}
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if id(p) not in norm_ids], "weight_decay": weight_decay},
              {"params": [p for p in params if id(p) in norm_ids], "weight_decay": weight_decay_norm}]
    return [group for group in groups if group["params"]]


def build_optimizer(model, lr, momentum, weight_decay, weight_decay_norm):
    return torch.optim.SGD(param_groups(model, weight_decay, weight_decay_norm), lr=lr, momentum=momentum)


def set_norm_eval(model, norm_eval):
    """mmseg's norm_eval: keep BN layers in eval mode (running statistics) while training."""
    if norm_eval:
        for module in model.modules():
            if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
                module.eval()


def speedups(model, torch_device, channels_last, compile_model, log):
    """channels_last, then DDP, then torch.compile; neither speed-up on NPU (spec/npu.md §8)."""
    if channels_last and torch_device.type == "npu":
        log("channels_last = true ignored: torch_npu supports only contiguous tensors")
    elif channels_last:
        model.to(memory_format=torch.channels_last)  # in place, before DDP registers its hooks
    model = dist.wrap_ddp(model, torch_device)
    if compile_model and torch_device.type == "npu":
        log("compile = true ignored: run eagerly on NPU")
    elif compile_model:
        model = torch.compile(model)
    return model


def on_device(batch):
    """Finish a training batch on the device: apply the colour jitter the loader drew (if it did not apply it)
    and widen the uint8 labels to int64 for the losses. Only device ops: no host synchronisation."""
    batch = dict(batch, label=batch["label"].long())
    jitter = batch.pop("jitter", None)
    if jitter is not None:
        batch["image"] = colour.apply_jitter(batch["image"], jitter)
    return batch


def train_one_step(model, batch, loss_fn, optimizer, scaler, autocast):
    """Forward, backward, step. Returns (dict of detached loss terms, whether the step was applied).
    Only fp16 reads anything back (the overflow check; GradScaler reads it too)."""
    optimizer.zero_grad(set_to_none=True)
    with autocast():
        outputs = model(batch["image"], batch["hw"])
    losses = loss_fn(outputs, batch["label"])
    scaler.scale(sum(losses.values())).backward()
    applied = True
    if scaler.is_enabled():
        before = scaler.get_scale()
        scaler.step(optimizer)
        scaler.update()
        applied = scaler.get_scale() >= before  # an overflow halves the scale
        if not applied and scaler.get_growth_interval() == STATIC_SCALE:
            scaler.update(before)
    else:
        optimizer.step()
    return {key: value.detach() for key, value in losses.items()}, applied


def reseed(seed, rank, iteration):
    """Restart every rank's torch generators (CPU and device: dropout, PointRend's points) after each checkpoint
    and on resume: a resumed run draws what the uninterrupted run drew, with no generator state to gather across
    ranks (HCCL cannot all_gather the int64 that would need)."""
    torch.manual_seed((seed * 1_000_003 + iteration) * 4099 + rank)


class Meter:
    """Loss sums stay on the device until a log step reads them (one sync); speed counts wall time between
    log steps minus the spans in paused() (checkpoints, evaluations: as the Ascend timers exclude hooks).
    The final figure starts after WARMUP iterations."""
    WARMUP = 5

    def __init__(self, images_per_step, torch_device):
        self.images_per_step, self.device = images_per_step, torch_device
        self.sums, self.count, self.data_time, self.done = {}, 0, 0.0, 0
        self.tick = time.perf_counter()
        self.warm = None  # [iterations done, time] once warm
        self.measured = None  # (iterations, seconds) from the warm start to the latest read

    def add(self, losses, data_time):
        for key, value in losses.items():
            self.sums[key] = self.sums.get(key, 0) + value
        self.count, self.data_time, self.done = self.count + 1, self.data_time + data_time, self.done + 1
        if self.done == self.WARMUP:
            dist.synchronize(self.device)
            self.warm = [self.done, time.perf_counter()]

    def read(self, iteration, total, lr):
        """The log record since the last read: mean loss terms over steps and ranks, lr, speed, ETA, memory."""
        keys = sorted(self.sums)
        stacked = dist.all_reduce_sum(torch.stack([self.sums[key].float() for key in keys]))
        scale = max(self.count, 1) * dist.world_size()
        dist.synchronize(self.device)
        now = time.perf_counter()
        if self.warm is not None and self.done > self.WARMUP:
            self.measured = (self.done - self.warm[0], now - self.warm[1])
        speed = self.images_per_step * self.count / (now - self.tick)
        record = {"iteration": iteration, "total": total, **{k: v / scale for k, v in zip(keys, stacked.tolist())},
                  "lr": lr, "images_per_s": speed, "data_time_s": self.data_time / max(self.count, 1),
                  "eta_min": (total - iteration) * self.images_per_step / speed / 60,
                  "peak_mem_mib": dist.peak_memory_mib(self.device)}
        self.sums, self.count, self.data_time, self.tick = {}, 0, 0.0, time.perf_counter()
        return record

    @contextlib.contextmanager
    def paused(self):
        start = time.perf_counter()
        yield
        elapsed = time.perf_counter() - start
        self.tick += elapsed
        if self.warm is not None:
            self.warm[1] += elapsed

    def summary(self, world_size):
        """The run's global images/s after the warm-up (None for runs of WARMUP iterations or fewer)."""
        if self.measured is None:
            return None
        rate = self.measured[0] * self.images_per_step / self.measured[1]
        return (f"done: {self.done} iterations, {rate:.2f} images/s global (after {self.WARMUP} warm-up "
                f"iterations, {world_size} process(es), batch {self.images_per_step})")


def finite(record):
    return all(math.isfinite(value) for key, value in record.items() if key.startswith("loss"))


def resume(model, optimizer, scaler, output_dir, iterations, seed, rank, log):
    """Load the newest loadable checkpoint of `output_dir` (torn ones are skipped with a warning) and reseed; returns
    its iteration, or 0 when there is none. Records past it leave metrics.jsonl: the resumed run logs them anew."""
    path, state = checkpoint.latest_loadable_checkpoint(output_dir, log=log)
    if path is None:
        log(f"resume = true but {output_dir} holds no loadable checkpoint; starting from scratch")
        return 0
    if state["iteration"] >= iterations:
        raise UserError(f"{path} is at iteration {state['iteration']}, not before iterations = {iterations}: nothing "
                        f"is left to train. Set iterations above {state['iteration']} to train on, or use another "
                        f"output_dir")
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    load_scaler_state(scaler, state.get("scaler"))
    reseed(seed, rank, state["iteration"])
    if rank == 0:
        drop_records_after(os.path.join(output_dir, "metrics.jsonl"), state["iteration"])
    log(f"resumed from {path} at iteration {state['iteration']}")
    return state["iteration"]


def every(interval, iteration, at_end):
    return at_end or (interval > 0 and iteration % interval == 0)


def tensorboard(output_dir, log):
    """A SummaryWriter on <output_dir>/tb, or None with one line saying how to get one (an optional package)."""
    try:
        import tensorboard  # noqa: F401 - torch.utils.tensorboard needs it
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        log("TensorBoard logging is off: pip install tensorboard, then tensorboard --logdir output")
        return None
    return SummaryWriter(os.path.join(output_dir, "tb"))


def log_record(record, output_dir, rank, board=None):
    """Rank 0 prints the record and appends it to metrics.jsonl (and to TensorBoard); non-finite losses stop the run."""
    if not finite(record):
        last = checkpoint.latest_checkpoint(output_dir)
        where = f"resume from {last} (resume=true) " if last else "restart "
        raise UserError(f"the loss is not finite (NaN or inf) by iteration {record['iteration']} ({record}); {where}"
                        f"with a lower optimizer.lr, amp=\"bf16\" or a static loss_scale, or from pretrained weights")
    if rank != 0:
        return
    losses = "  ".join(f"{k} {v:.4f}" for k, v in record.items() if k.startswith("loss"))
    print(f"iter {record['iteration']}/{record['total']}  {losses}  lr {record['lr']:.3e}  "
          f"{record['images_per_s']:.1f} img/s  data {record['data_time_s']:.3f}s  "
          f"eta {record['eta_min']:.1f} min  mem {record['peak_mem_mib']:.0f} MiB", flush=True)
    with open(os.path.join(output_dir, "metrics.jsonl"), "a") as handle:
        handle.write(json.dumps(record) + "\n")
    for key, value in record.items() if board is not None else ():
        if key not in ("iteration", "total", "eta_min"):
            board.add_scalar(f"train/{key}", value, record["iteration"])


def drop_records_after(path, iteration):
    """Rewrite metrics.jsonl without the records past `iteration` (and torn lines): a resumed run logs them anew."""
    if not os.path.isfile(path):
        return
    kept = []
    with open(path) as handle:
        for line in handle:
            try:
                kept += [line] if (json.loads(line).get("iteration") or 0) <= iteration else []
            except (ValueError, AttributeError):
                pass
    files.write_text_atomic("".join(kept), path)
