"""The training loop shared by PSPNet and PointRend: train_one_step, train, schedules, optimizer.

Launch with `python run.py SECTION` or `torchrun --nproc_per_node N run.py SECTION`.
"""
import functools
import json
import math
import os
import time

import torch

from seg import amp, checkpoint, colour, data, dist, evaluate, models, transforms
from seg.files import UserError

NORM_TYPES = (torch.nn.modules.batchnorm._BatchNorm, torch.nn.GroupNorm)


def lr_at(iteration, base_lr, schedule, total):
    """Learning rate before iteration `iteration` (0-based) of `total`.

    poly (mmsegmentation): (base − min)·(1 − t/T)^power + min.
    multistep (detectron2 WarmupMultiStepLR): base · warmup(t) · gamma^(number of steps ≤ t), where
    warmup(t) = f + (1 − f)·t/W for t < W.
    """
    if schedule["policy"] == "poly":
        return (base_lr - schedule["min_lr"]) * (1 - iteration / total) ** schedule["power"] + schedule["min_lr"]
    if schedule["policy"] == "multistep":
        factor = schedule["gamma"] ** sum(1 for step in schedule["steps"] if step <= iteration)
        if iteration < schedule["warmup_iters"]:
            alpha = iteration / schedule["warmup_iters"]
            factor *= schedule["warmup_factor"] * (1 - alpha) + alpha
        return base_lr * factor
    raise UserError(f"schedule.policy must be 'poly' or 'multistep', got {schedule['policy']!r}")


def param_groups(model, weight_decay, weight_decay_norm):
    """Two groups: normalisation parameters (BN/GN γ, β) and everything else."""
    norm_ids = {id(p) for module in model.modules() if isinstance(module, NORM_TYPES)
                for p in module.parameters(recurse=False)}
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if id(p) not in norm_ids], "weight_decay": weight_decay},
              {"params": [p for p in params if id(p) in norm_ids], "weight_decay": weight_decay_norm}]
    return [group for group in groups if group["params"]]


def build_optimizer(model, cfg):
    groups = param_groups(model, cfg["weight_decay"], cfg["weight_decay_norm"])
    return torch.optim.SGD(groups, lr=cfg["lr"], momentum=cfg["momentum"])


def set_norm_eval(model, norm_eval):
    """mmseg's norm_eval: keep BN layers in eval mode (running statistics) while training."""
    if norm_eval:
        for module in model.modules():
            if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
                module.eval()


def train_one_step(model, batch, loss_fn, optimizer, scaler, autocast):
    """Forward, backward, step. Returns (dict of detached loss terms, whether the step was applied)."""
    optimizer.zero_grad(set_to_none=True)
    with autocast():
        outputs = model(batch["image"], batch["hw"])
    losses = loss_fn(outputs, batch["label"])
    total = sum(losses.values())
    if scaler is None:
        total.backward()
        optimizer.step()
        applied = True
    else:
        scaler.scale_loss(total).backward()
        applied = scaler.step(optimizer)
    return {key: value.detach() for key, value in losses.items()}, applied


class Meter:
    """Sums loss terms on the device; read (one sync) only on log steps."""

    def __init__(self):
        self.sums, self.count, self.data_time = {}, 0, 0.0

    def add(self, losses, data_time):
        for key, value in losses.items():
            self.sums[key] = self.sums.get(key, 0) + value
        self.count += 1
        self.data_time += data_time

    def means(self):
        keys = sorted(self.sums)
        stacked = dist.all_reduce_sum(torch.stack([self.sums[key].float() for key in keys]))
        scale = max(self.count, 1) * (torch.distributed.get_world_size() if dist.is_distributed() else 1)
        return {key: value / scale for key, value in zip(keys, stacked.tolist())}


def log_record(record, output_dir, rank):
    if rank != 0:
        return
    losses = "  ".join(f"{k} {v:.4f}" for k, v in record.items() if k.startswith("loss"))
    print(f"iter {record['iteration']}/{record['total']}  {losses}  lr {record['lr']:.3e}  "
          f"{record['images_per_s']:.1f} img/s  data {record['data_time_s']:.3f}s  "
          f"eta {record['eta_min']:.1f} min  mem {record['peak_mem_mib']:.0f} MiB", flush=True)
    with open(os.path.join(output_dir, "metrics.jsonl"), "a") as handle:
        handle.write(json.dumps(record) + "\n")


def setup_run(config):
    """Device, process group, seeds and output folder for a train or evaluate task."""
    torch_device, rank, world_size = dist.setup(config["device"])
    message = amp.check_amp_supported(torch_device.type, config["amp"])
    if message:
        raise UserError(f"amp = \"{config['amp']}\": {message}")
    torch.manual_seed(config["seed"] + rank)
    os.makedirs(config["output_dir"], exist_ok=True)
    return torch_device, rank, world_size


def per_device_batch(config, world_size):
    batch = config["data"]["batch_size"]
    if batch % world_size:
        raise UserError(f"data.batch_size = {batch} (global) is not divisible by {world_size} processes")
    return batch // world_size


def train(config):
    torch_device, rank, world_size = setup_run(config)
    model = models.build(config["model"]).to(torch_device)
    models.load_initial_weights(model, config, log=print if rank == 0 else (lambda *a: None))
    model = dist.convert_sync_batchnorm(model, torch_device.type, config["sync_bn"])
    optimizer = build_optimizer(model, config["optimizer"])
    scaler = amp.make_scaler(config["amp"], config["loss_scale"])
    start = resume_state(config, model, optimizer, scaler, torch_device, rank)
    batch_size = per_device_batch(config, world_size)
    dataset = train_dataset(config, jitter_in_loader(config, torch_device.type))
    loader = data.train_loader(
        dataset, batch_size, rank, world_size, config["seed"], config["data"]["workers"], torch_device.type != "cpu",
        start=start * batch_size, divisor=model.size_divisibility, min_hw=training_pad_hw(config))
    ddp_model = speedups(model, config, torch_device, rank)
    run_iterations(config, ddp_model, model, optimizer, scaler, loader, start, torch_device, rank, world_size)
    if config["measure_pipeline"] and rank == 0:
        rate = pipeline_images_per_s(loader.dataset, model.size_divisibility)
        workers = config["data"]["workers"]
        jitter = "colour jitter in the loader" if dataset.jitter_in_loader else "colour jitter on the device"
        print(f"input pipeline: {rate:.1f} images/s per worker (decode + augment + collate, {jitter}; measured in the "
              f"main process); {workers} workers per device give up to {rate * max(workers, 1):.0f} images/s",
              flush=True)
    dist.cleanup()


def jitter_in_loader(config, device_type):
    """Where the colour jitter runs (data.jitter_on): in the loader workers (numpy) or on the device after the
    copy (torch, batched). "auto": on the device for CUDA, where it frees the workers of their costliest stage;
    in the loader on CPU (numpy is 5-10× faster there than torch's CPU ops) and on NPU (the torch_npu support of
    the int32 table lookups is unverified; the Ascend ports jitter in the workers too)."""
    place = config["data"]["jitter_on"]
    if place not in ("auto", "loader", "device"):
        raise UserError(f"data.jitter_on = {place!r}: use \"auto\", \"loader\" or \"device\"")
    return place == "loader" or (place == "auto" and device_type != "cuda")


def on_device(batch):
    """Finish a training batch on the device: apply the colour jitter the loader drew (if it did not apply it)
    and widen the uint8 labels to int64 for the losses. Only device ops: no host synchronisation."""
    batch = dict(batch, label=batch["label"].long())
    jitter = batch.pop("jitter", None)
    if jitter is not None:
        batch["image"] = colour.apply_jitter(batch["image"], jitter)
    return batch


def train_dataset(config, jitter_in_loader=True):
    """The training split with the dataset's augmentation (transforms.TRAIN_SAMPLERS); the colour jitter
    is applied in the loader or, with jitter_in_loader=False, left to on_device."""
    cfg = config["data"]
    items, info, reader = data.split_items(config, "train_splits")
    params = {"crop_hw": tuple(cfg["crop_hw"])}
    if cfg["dataset"] == "voc":
        params.update(scale=tuple(cfg["scale"]), ratio_range=tuple(cfg["ratio_range"]),
                      cat_max_ratio=cfg["cat_max_ratio"])
    else:
        params.update(short_edges=tuple(cfg["short_edges"]), max_size=cfg["max_size"],
                      single_category_max_area=cfg["cat_max_ratio"])
    sample_fn = functools.partial(transforms.TRAIN_SAMPLERS[cfg["dataset"]], **params)
    return data.TrainDataset(items, sample_fn, config["model"]["num_classes"], config["seed"], info["hint"], reader,
                             jitter_in_loader)


def pipeline_images_per_s(dataset, divisor, samples=24):
    """One worker's throughput: decode, augment and collate `samples` training samples, after 2 warm-up ones."""
    keys = [(index % len(dataset), 10**9 + index) for index in range(samples + 2)]
    data.collate([dataset[key] for key in keys[:2]], divisor)
    start = time.perf_counter()
    for key in keys[2:]:
        data.collate([dataset[key]], divisor)
    return samples / (time.perf_counter() - start)


def speedups(model, config, torch_device, rank):
    """channels_last, then DDP, then torch.compile; neither speed-up on NPU (spec/npu.md §8)."""
    say = print if rank == 0 else (lambda *a: None)
    if config["channels_last"]:
        if torch_device.type == "npu":
            say("channels_last = true ignored: torch_npu supports only contiguous tensors")
        else:
            model.to(memory_format=torch.channels_last)  # in place, before DDP registers its hooks
    model = dist.wrap_ddp(model, torch_device)
    if config["compile"]:
        if torch_device.type == "npu":
            say("compile = true ignored: run eagerly on NPU")
        else:
            model = torch.compile(model)
    return model


def training_pad_hw(config):
    """mmseg pads every VOC training sample to the crop size (Pad(size=(512, 512))): padded pixels count in
    its loss denominator and reach the BN statistics. detectron2 pads the batch only to a multiple of 32."""
    return tuple(config["data"]["crop_hw"]) if config["data"]["dataset"] == "voc" else (0, 0)


def resume_state(config, model, optimizer, scaler, torch_device, rank):
    """Iteration to start from: 0, or the latest checkpoint's when resume = true."""
    if not config["resume"]:
        return 0
    path = checkpoint.latest_checkpoint(config["output_dir"])
    if path is None:
        if rank == 0:
            print(f"resume = true but {config['output_dir']} holds no checkpoint; starting from scratch")
        return 0
    state = checkpoint.load_training_state(path)
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    if scaler is not None and state.get("scaler"):
        scaler.load_state_dict(state["scaler"])
    reseed(config["seed"], rank, state["iteration"])
    if rank == 0:
        print(f"resumed from {path} at iteration {state['iteration']}")
    return state["iteration"]


def run_iterations(config, ddp_model, model, optimizer, scaler, loader, start, torch_device, rank, world_size):
    total, base_lr = config["iterations"], config["optimizer"]["lr"]
    loss_fn = models.loss_function(config)
    autocast = lambda: amp.autocast_context(torch_device.type, config["amp"])  # noqa: E731
    images_per_step = config["data"]["batch_size"]
    meter, batches = Meter(), data.prefetch(loader, torch_device)
    tick = warm_start = time.perf_counter()
    for iteration in range(start, total):
        ddp_model.train()
        set_norm_eval(ddp_model, config["norm_eval"])
        for group in optimizer.param_groups:
            group["lr"] = lr_at(iteration, base_lr, config["schedule"], total)
        fetch_start = time.perf_counter()
        batch = on_device(next(batches))
        data_time = time.perf_counter() - fetch_start
        losses, applied = train_one_step(ddp_model, batch, loss_fn, optimizer, scaler, autocast)
        if not applied and rank == 0:
            print(f"iter {iteration + 1}: fp16 gradients overflowed, step skipped; loss scale now {scaler.scale:g}")
        meter.add(losses, data_time)
        done = iteration + 1 - start
        if done == 5:
            dist.synchronize(torch_device)
            warm_start, warm_done = time.perf_counter(), 5
        if (iteration + 1) % config["log_interval"] == 0 or iteration + 1 == total:
            means = meter.means()
            if any(math.isnan(value) for value in means.values()):
                raise UserError(f"the loss became NaN by iteration {iteration + 1} ({means}); lower optimizer.lr, "
                                f"use amp=\"bf16\" or a static loss_scale, or start from pretrained weights")
            dist.synchronize(torch_device)
            now = time.perf_counter()
            speed = images_per_step * meter.count / (now - tick)
            log_record({"iteration": iteration + 1, "total": total, **means, "lr": optimizer.param_groups[0]["lr"],
                        "images_per_s": speed, "data_time_s": meter.data_time / meter.count,
                        "eta_min": (total - iteration - 1) * images_per_step / speed / 60,
                        "peak_mem_mib": dist.peak_memory_mib(torch_device)}, config["output_dir"], rank)
            meter, tick = Meter(), time.perf_counter()
        hooks_start = time.perf_counter()
        end = iteration + 1 == total
        if end:
            dist.synchronize(torch_device)
            train_end = hooks_start
        if should(config["checkpoint_interval"], iteration, end):
            save_training_state(config, model, optimizer, scaler, iteration + 1, rank)
            reseed(config["seed"], rank, iteration + 1)
        if should(config["eval_interval"], iteration, end and config["final_eval"]):
            evaluate.evaluate_and_report(config, model, torch_device, rank, world_size, iteration + 1)
        # checkpoints and evaluations are not training time (as the Ascend timers exclude hooks)
        hooks = time.perf_counter() - hooks_start
        tick, warm_start = tick + hooks, warm_start + (hooks if 5 < done < total - start else 0)
    done = total - start
    if done > 5 and rank == 0:
        measured = (done - warm_done) * images_per_step / (train_end - warm_start)
        print(f"done: {done} iterations, {measured:.2f} images/s global (after 5 warm-up iterations, "
              f"{world_size} process(es), batch {images_per_step})", flush=True)


def should(interval, iteration, at_end):
    return at_end or (interval > 0 and (iteration + 1) % interval == 0)


def reseed(seed, rank, iteration):
    """Restart every rank's torch generators (CPU and device: dropout, PointRend's points) at a checkpoint.

    Runs after each checkpoint and on resume, so a resumed run draws exactly what the uninterrupted run drew,
    with no generator state to gather across ranks (HCCL cannot all_gather the int64 that would need).
    """
    torch.manual_seed((seed * 1_000_003 + iteration) * 4099 + rank)


def save_training_state(config, model, optimizer, scaler, iteration, rank):
    """Model, optimizer, scaler, iteration and the resolved config; rank 0 writes, atomically."""
    if rank == 0:
        state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                 "scaler": scaler.state_dict() if scaler else None, "iteration": iteration, "config": config}
        path = os.path.join(config["output_dir"], f"iter_{iteration:07d}.pth")
        checkpoint.save_atomic(state, path)
        print(f"saved {path}", flush=True)
    dist.barrier()
