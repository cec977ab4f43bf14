"""The training loop shared by PSPNet and PointRend, and its pieces: optimizer, learning rate, norm_eval, speed-ups, one
step, reseeding, resume, the output folder's ownership and what a checkpoint holds. `train` reads top to bottom: set the
lr, wait for a batch, step, and on their intervals log, checkpoint and evaluate; seg/tasks.py builds what it takes."""
import contextlib
import hashlib
import json
import os
import re
import time

import torch

from seg import amp, checkpoint, dist, files, transforms
from seg.files import UserError
from seg.metrics import drop_records_after

NORM_TYPES = (torch.nn.modules.batchnorm._BatchNorm, torch.nn.GroupNorm)
SEG_OUTPUTS = re.compile(r"iter_\d+\.pth|best\.pth|metrics\.jsonl|eval\.json|log\.txt|config\.toml|tb|predictions|"
                         r"report")


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
    """channels_last, then DDP, then torch.compile; neither speed-up on NPU (torch_npu supports only contiguous
    tensors, and its compile backend is not the one torch ships)."""
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
    if (jitter := batch.pop("jitter", None)) is not None:
        batch["image"] = transforms.apply_jitter(batch["image"], jitter)
    return batch


def train_one_step(model, batch, loss_fn, optimizer, scaler, autocast, accumulate=1):
    """Forward and backward over `accumulate` equal micro-batches of `batch` (DDP all-reduces the gradients after
    the last only), then one step. Returns (dict of detached loss terms averaged over the micro-batches, whether
    the step was applied). Only fp16 reads anything back (the overflow check; GradScaler reads it too)."""
    optimizer.zero_grad(set_to_none=True)
    totals, keys = {}, ("image", "hw", "label")
    parts = [batch] if accumulate == 1 else [dict(zip(keys, values)) for values in
                                             zip(*(batch[key].chunk(accumulate) for key in keys))]
    for index, part in enumerate(parts):
        last = index == accumulate - 1
        with contextlib.nullcontext() if last or not hasattr(model, "no_sync") else model.no_sync():
            with autocast():
                outputs = model(part["image"], part["hw"])
            losses = loss_fn(outputs, part["label"])
            scaler.scale(sum(losses.values()) / accumulate).backward()
        totals = {key: totals.get(key, 0) + value.detach() / accumulate for key, value in losses.items()}
    return totals, amp.step(scaler, optimizer)


def reseed(seed, rank, iteration):
    """Restart every rank's torch generators (CPU and device: dropout, PointRend's points) after each checkpoint and
    on resume: a resumed run draws what the uninterrupted one drew, with no generator state to gather (HCCL cannot)."""
    torch.manual_seed((seed * 1_000_003 + iteration) * 4099 + rank)


def every(interval, iteration, at_end):
    return at_end or (interval > 0 and iteration % interval == 0)


def train(runner, batches, step, iterations, intervals, hooks, meter):
    """Run `iterations` (a range: first + 1 .. total) of training.

    runner: the model as trained (DDP / compiled); batches: an iterator of device batches; step: {"loss_fn",
    "optimizer", "scaler", "autocast", "lr_at": 0-based iteration -> lr, "norm_eval", "seed", "rank", "accumulate"
    (micro-batches per step; 1 if absent)}; intervals: {"log", "checkpoint", "eval", "final_eval"}; hooks: {"log":
    record -> None, "checkpoint": iteration -> None, "evaluate": iteration -> None or why to stop early, "say": print on
    rank 0}; meter: metrics.Meter. Checkpoints and evaluations are not training time (meter.paused); an evaluation comes
    before the checkpoint of its iteration (which then holds its result), and after each checkpoint every rank reseeds.
    An early stop ends like the last iteration: with a checkpoint; returns its reason, or None."""
    optimizer, scaler, total = step["optimizer"], step["scaler"], iterations.stop - 1
    runner.train()
    set_norm_eval(runner, step["norm_eval"])
    for iteration in iterations:
        for group in optimizer.param_groups:
            group["lr"] = step["lr_at"](iteration - 1)
        waited = time.perf_counter()
        batch = next(batches)
        waited = time.perf_counter() - waited
        losses, applied = train_one_step(runner, on_device(batch), step["loss_fn"], optimizer, scaler,
                                         step["autocast"], step.get("accumulate", 1))
        meter.add(losses, waited)
        if not applied:
            hooks["say"](f"iter {iteration}: fp16 gradients overflowed, step skipped; loss scale now "
                         f"{scaler.get_scale():g}")
        end = iteration == total
        if iteration % intervals["log"] == 0 or end:
            hooks["log"](meter.read(iteration, total, optimizer.param_groups[0]["lr"]))
        with meter.paused():
            stop = every(intervals["eval"], iteration, end and intervals["final_eval"]) and hooks["evaluate"](iteration)
            if every(intervals["checkpoint"], iteration, end or stop):
                hooks["checkpoint"](iteration)
                reseed(step["seed"], step["rank"], iteration)
        if stop:
            hooks["say"](f"stopped early at iteration {iteration} of {total}: {stop}", flush=True)
            return stop
    return None


def resume(model, optimizer, scaler, output_dir, iterations, log, reseed_with=(0, 0), identity=None, resume_from="",
           progress=None):
    """Load the newest loadable checkpoint of `output_dir` (torn ones are skipped with a warning; with `identity`,
    another run's is a UserError), or the file `resume_from` whatever run wrote it, and reseed with (seed, rank);
    returns its iteration, or 0 when there is none. Records past it leave metrics.jsonl (rank 0): the resumed run
    logs them anew. `progress` (checkpoint.record_evaluation's) takes the stored one of its metric."""
    seed, rank = reseed_with
    path, state = ((resume_from, checkpoint.load_training_state(resume_from)) if resume_from else
                   checkpoint.latest_loadable_checkpoint(output_dir, log=log, identity=identity))
    if path is None:
        log(f"resume = true but {output_dir} holds no loadable checkpoint; starting from scratch")
        state = {"iteration": 0}
    elif state["iteration"] >= iterations:
        raise UserError(f"{path} is at iteration {state['iteration']}, not before iterations = {iterations}: nothing "
                        f"is left to train. Set iterations above {state['iteration']} to train on, or use another "
                        f"output_dir")
    else:
        try:
            model.load_state_dict(state["model"])
            optimizer.load_state_dict(state["optimizer"])
        except (RuntimeError, ValueError, KeyError) as error:  # resume_from: a file of another model
            raise UserError(f"{path} does not fit this model and optimizer ({checkpoint.first_line(error)})") from None
        amp.load_scaler_state(scaler, state.get("scaler"))
        if progress is not None and (state.get("best") or {}).get("metric") == progress["metric"]:
            progress.update(state["best"])
        reseed(seed, rank, state["iteration"])
        log(f"resumed from {path} at iteration {state['iteration']}")
    records = os.path.join(output_dir, "metrics.jsonl")
    # also without a checkpoint: the records of a run killed before its first one
    if rank == 0 and (dropped := drop_records_after(records, state["iteration"])):
        log(f"warning: dropped {dropped} unreadable lines of {records}")
    return state["iteration"]


def own_output_dir(output_dir, section, identity, resuming):
    """Lock `output_dir` (files.take_lock) and make it this run's: <output_dir>/run.json records the section, a
    fingerprint of `identity` (checkpoint.run_identity) and the time. A folder holding anything is trained into only
    when `resuming` the run its run.json records (or, without one, when it holds a checkpoint of this run and only
    seg's outputs: checkpoints copied by hand); else UserError naming the folder and its files. Returns release()."""
    os.makedirs(output_dir, exist_ok=True)
    release, marker = files.take_lock(os.path.join(output_dir, ".lock")), os.path.join(output_dir, "run.json")
    fingerprint = hashlib.sha1(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]
    names = sorted(name for name in os.listdir(output_dir) if not name.startswith(".lock"))
    shown, problem = files.name_list(names, 5), None
    try:
        try:
            with open(marker, "rb") as handle:
                run = json.load(handle)
        except (OSError, ValueError) as error:
            run = None if isinstance(error, FileNotFoundError) else {"section": "an unreadable run.json"}
        if run is not None and run.get("fingerprint") != fingerprint:
            problem = f"holds a run of [{run.get('section')}] with another model or data ({shown});"
        elif run is None and names and not (resuming and all(map(SEG_OUTPUTS.fullmatch, names)) and
                checkpoint.latest_loadable_checkpoint(output_dir, lambda line: None, identity)[0]):
            problem = f"holds files no seg run of this model and data made ({shown});"
        elif names not in ([], ["run.json"]) and not resuming:
            problem = f"holds this run's files ({shown}): resume=true continues it; to start over, delete them, or"
        if problem:
            raise UserError(f"output_dir = {output_dir} {problem} choose another output_dir")
        if run is None:
            files.write_text_atomic(json.dumps({"section": section, "fingerprint": fingerprint, "created":
                                                time.strftime("%Y-%m-%dT%H:%M:%S%z")}) + "\n", marker)
    except BaseException:
        release()
        raise
    return release


def training_state(model, optimizer, scaler, iteration, config, best=None):
    """What a checkpoint holds: model, optimizer, scaler, iteration, the config (and checkpoint.best's progress)."""
    return {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "scaler": amp.scaler_state(scaler),
            "iteration": iteration, "config": config, **({"best": dict(best)} if best else {})}
