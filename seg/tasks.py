"""The task layer, the only code that reads a resolved config: each task turns it into objects and hands them to the
module that does the work: seg/train.py trains, seg/evaluate.py evaluates, seg/predict.py predicts and exports.
seg.main calls TASKS[config["task"]](config, load_section)."""
import contextlib
import functools
import inspect
import json
import os

import torch

from seg import (amp, bench, checkpoint, data, dist, evaluate, files, losses, metrics, pointrend, predict, prepare,
                 pspnet, train, transforms)
from seg.config import section_toml
from seg.files import UserError

MODELS = {"pspnet": pspnet.build_pspnet, "pointrend": pointrend.build_pointrend}


def builder_defaults(name):
    """The builder's keyword arguments and defaults: the keys a config's [model] table may set. build_pointrend
    passes **backbone_kwargs on to build_resnet_fpn (whose out_channels it sets itself)."""
    functions = [pointrend.build_resnet_fpn, pointrend.build_pointrend] if name == "pointrend" else [MODELS.get(name)]
    parameters = [p for function in functions if function for p in inspect.signature(function).parameters.values()]
    return {p.name: p.default for p in parameters if p.default is not p.empty and p.name != "out_channels"}


def build_model(model_table):
    """Build from a [model] table: `name` picks the builder, every other key is its argument."""
    kwargs = {key: tuple(value) if isinstance(value, list) else value
              for key, value in model_table.items() if key != "name"}
    return MODELS[model_table["name"]](**kwargs)


def loss_function(config, log=print):
    """outputs, label -> dict of losses; loss.class_weight_rule = "enet" weighs the classes by their training pixels."""
    table = dict(config["loss"])
    if table["class_weight_rule"]:
        items, info, _ = split_items(config, "train_splits", cache=False)
        _, pixels = data.check_items(items, config["model"]["num_classes"], info["hint"],
                                     config["data"]["reduce_zero_label"], max(config["data"]["workers"], 1))
        table["class_weight"] = losses.enet_class_weight(pixels.tolist())
        log("loss.class_weight_rule = \"enet\": loss.class_weight = [" + ", ".join(
            f"{weight:.4f}" for weight in table["class_weight"]) + f"] for {', '.join(info['classes'])}")
    return losses.loss_function(config["model"]["name"], table)


def start(config):
    """(torch.device, rank, world size, print on rank 0) after setting up the process group and seed."""
    torch_device, rank, world_size = dist.setup(config["device"])
    if message := amp.unsupported(torch_device.type, config["amp"]):
        raise UserError(f"amp = \"{config['amp']}\": {message}")
    torch.manual_seed(config["seed"] + rank)
    return torch_device, rank, world_size, print if rank == 0 else (lambda *args, **kwargs: None)


def model_with_weights(config, torch_device, log):
    """The model on the device with `pretrained` (backbone only), then `weights` (whole model) loaded."""
    model = build_model(config["model"]).to(torch_device)
    if config["pretrained"]:  # config.validate checked that the file is there
        checkpoint.load_pretrained_backbone(model.backbone, config["pretrained"], log=log, verbose=config["verbose"])
    if config["weights"]:
        checkpoint.load_model_weights(model, config["weights"], allow_missing=config["allow_missing_weights"],
                                      log=log, verbose=config["verbose"])
    return model


def inference_model(config, torch_device, say):
    """(model_with_weights in eval mode, config with the `amp` ("auto" resolved) and `channels_last` of inference)."""
    model = model_with_weights(config, torch_device, say).eval()
    precision, channels_last = amp.inference_precision(torch_device.type, config["amp"], config["channels_last"])
    if config["amp"] == "auto":
        say(f'amp = "auto" on this {torch_device.type}: {"fp32" if precision == "off" else precision}'
            f'{" + channels_last" if channels_last else ""}; amp=off gives exact fp32')
    if channels_last and torch_device.type != "npu":  # torch_npu supports only contiguous tensors
        model.to(memory_format=torch.channels_last)
    return model, {**config, "amp": precision, "channels_last": channels_last}


def inference_options(config, torch_device):
    """What predicting one photo takes (predict.predict_files' and predict.prediction_panels' `inference`)."""
    return {"test": config["test"], "test_scale": config["data"]["test_scale"],
            "autocast": amp.autocast_for(torch_device.type, config["amp"]),
            "label_ids": data.CITYSCAPES_TRAINID_TO_ID if config["label_ids"] == "cityscapes" else None}


def dataset_info(config):
    """The dataset's lister(root, splits) and label hint; the model's class names and palette (data.* override)."""
    cfg, info = config["data"], data.dataset_info(config["data"]["dataset"])
    if cfg["dataset"] == "folder":
        info["list"] = functools.partial(data.folder_items, label_suffix=cfg["label_suffix"])
    info["palette"], info["classes"] = predict.palette_and_names(
        cfg["palette"] or info["palette"], cfg["classes"] or info["classes"], config["model"]["num_classes"])
    return info


def split_items(config, splits_key, cache=True, complete=True):
    """(items, dataset info, decoded-image cache reader or None) of config["data"][splits_key]; `complete`: every
    file must exist (a cheap check at start, so a missing val image is not found after training)."""
    cfg, info = config["data"], dataset_info(config)
    items = info["list"](os.path.join(config["data_root"], cfg["root"]), cfg[splits_key])
    if missing := [path for item in items for path in item if complete and not os.path.isfile(path)]:
        raise UserError(f"{missing[0]}: not found, one of {len(missing)} missing files of data.{splits_key} (e.g. "
                        f"{', '.join(missing[1:4]) or 'no other'}); check data_root, data.root and the split lists")
    if not cfg["cache"] or not cache:
        return items, info, None
    tag = f"{cfg['dataset']}-{splits_key}{'-reduced' if cfg['reduce_zero_label'] else ''}"
    path = files.cache_path_for(os.path.join(config["data_root"], ".cache"), items, tag)
    classes = config["model"]["num_classes"] + cfg["reduce_zero_label"]  # stored values, before the reduction
    return items, info, files.cached_items_reader(items, path, classes, info["hint"], workers=max(cfg["workers"], 1))


def augmentation(config):
    """Whose training pipeline ("voc": mmseg's, "cityscapes": detectron2's): the dataset's, for a folder its model's."""
    if config["data"]["dataset"] != "folder":
        return config["data"]["dataset"]
    return "voc" if config["model"]["name"] == "pspnet" else "cityscapes"


def sampler_params(cfg, pipeline):
    """The [data] table's keyword arguments for the `pipeline`'s sampler in transforms.TRAIN_SAMPLERS."""
    if pipeline == "voc":
        return {"scale": tuple(cfg["scale"]), "ratio_range": tuple(cfg["ratio_range"]),
                "crop_hw": tuple(cfg["crop_hw"]), "cat_max_ratio": cfg["cat_max_ratio"]}
    return {"short_edges": tuple(cfg["short_edges"]), "max_size": cfg["max_size"], "crop_hw": tuple(cfg["crop_hw"]),
            "single_category_max_area": cfg["cat_max_ratio"]}


def jitter_in_loader(config, device_type):
    """data.jitter_on: the colour jitter in the loader workers (numpy) or on the device after the copy (torch).
    "auto": the device on CUDA (it frees the workers of their costliest stage); the loader on CPU (numpy is 5-10×
    faster there) and NPU (torch_npu's int32 table lookups are unverified; the Ascend ports jitter in workers)."""
    return {"loader": True, "device": False}.get(config["data"]["jitter_on"], device_type != "cuda")


def train_dataset(config, in_loader=True):
    """The training split with its augmentation; the colour jitter in the loader, or left to train.on_device."""
    cfg, pipeline = config["data"], augmentation(config)
    items, info, reader = split_items(config, "train_splits")
    sample_fn = functools.partial(transforms.TRAIN_SAMPLERS[pipeline], **sampler_params(cfg, pipeline))
    return data.TrainDataset(items, sample_fn, config["model"]["num_classes"], config["seed"], info["hint"], reader,
                             in_loader, cfg["reduce_zero_label"])


def eval_dataset(config):
    """(val split as (views, original-size label) samples, dataset info)."""
    items, info, reader = split_items(config, "val_splits")
    resize = functools.partial(evaluate.resize_to_scales, long_short=tuple(config["data"]["test_scale"]),
                               ratios=tuple(config["test"]["scales"]))
    return data.EvalDataset(items, resize, config["model"]["num_classes"], info["hint"], reader,
                            config["data"]["reduce_zero_label"]), info


def train_task(config, load_section=None):
    """Train `iterations` steps (resume: from this output_dir's newest checkpoint); returns the trained model. Rank 0
    also appends whatever it prints to <output_dir>/log.txt, after the resolved config and the environment."""
    for key in ("train_splits", "val_splits")[: 1 + bool(config["eval_interval"] or config["final_eval"])]:
        split_items(config, key, cache=False)
    torch_device, rank, world_size, say = start(config)  # config.validate checked the batch these processes share
    resuming = config["resume"] or bool(config["resume_from"])
    release = train.own_output_dir(config["output_dir"], config["section"], checkpoint.run_identity(config),
                                   resuming) if rank == 0 else (lambda: None)
    dist.barrier()  # the other processes stop here (exit 2) when rank 0 refuses the folder
    try:
        with files.tee_output(os.path.join(config["output_dir"], "log.txt")) if rank == 0 else \
                contextlib.nullcontext() as log_file:
            if log_file:
                files.write_text_atomic(section_toml(config), os.path.join(config["output_dir"], "config.toml"))
                log_file.write(f"\n{section_toml(config)}\n")
                say(f"environment: {json.dumps(bench.run_environment(torch_device, world_size))}")
            model = train_model(config, torch_device, rank, world_size, say, resuming)
    finally:
        release()
    dist.cleanup()
    return model


def train_model(config, torch_device, rank, world_size, say, resuming):
    """train_task's run on a started process: build, resume (`resuming`), train, summarise."""
    batch_size, accumulate = config["data"]["batch_size"], config["accumulate"]
    model = dist.convert_sync_batchnorm(model_with_weights(config, torch_device, say), torch_device.type,
                                        config["sync_bn"])
    optimizer = train.build_optimizer(model, **config["optimizer"])
    scaler = amp.make_scaler(torch_device.type, config["amp"], config["loss_scale"])
    best = config["checkpoint"]["best"]
    progress = {"metric": best, "value": None, "iteration": 0, "stale": 0} if best else None
    first = train.resume(model, optimizer, scaler, config["output_dir"], config["iterations"], say,
                         reseed_with=(config["seed"], rank), identity=checkpoint.run_identity(config),
                         resume_from=config["resume_from"], progress=progress) if resuming else 0
    dataset, per_device = train_dataset(config, jitter_in_loader(config, torch_device.type)), batch_size // world_size
    # mmseg pads every VOC training sample to the crop size (Pad(size=(512, 512))): padded pixels count in its loss
    # denominator and reach the BN statistics. detectron2 pads the batch only to a multiple of 32.
    loader = data.train_loader(dataset, per_device, rank, world_size, config["seed"], config["data"]["workers"],
                               torch_device.type != "cpu", start=first * per_device, divisor=model.size_divisibility,
                               min_hw=tuple(config["data"]["crop_hw"]) if augmentation(config) == "voc" else (0, 0))
    if accumulate > 1:
        say(f"accumulate = {accumulate}: micro-batches of {per_device // accumulate} images on each of {world_size} "
            f"process(es), {batch_size} images per step")
    runner = train.speedups(model, torch_device, config["channels_last"], config["compile"], say)
    board = metrics.tensorboard(config["output_dir"], say) if rank == 0 else None
    step = {"loss_fn": loss_function(config, say), "optimizer": optimizer, "scaler": scaler, "seed": config["seed"],
            "autocast": amp.autocast_for(torch_device.type, config["amp"]), "norm_eval": config["norm_eval"],
            "lr_at": functools.partial(train.lr_at, base_lr=config["optimizer"]["lr"], schedule=config["schedule"],
                                       total=config["iterations"]), "accumulate": accumulate, "rank": rank}
    intervals = {"log": config["log_interval"], "checkpoint": config["checkpoint_interval"],
                 "eval": config["eval_interval"], "final_eval": config["final_eval"]}
    evaluate = evaluation(config, model, torch_device, board) if intervals["eval"] or intervals["final_eval"] else None
    hooks = {"say": say, "log": functools.partial(metrics.log_record, output_dir=config["output_dir"], rank=rank,
                                                  board=board),
             **checkpoint_hooks(config, lambda iteration: train.training_state(
                 model, optimizer, scaler, iteration, config, best=progress), progress, evaluate, say)}
    meter = metrics.Meter(batch_size, torch_device)
    train.train(runner, data.prefetch(loader, torch_device), step, range(first + 1, config["iterations"] + 1),
                intervals, hooks, meter)
    if board is not None:
        board.close()
    if summary := meter.summary(world_size):
        say(summary, flush=True)
    if config["measure_pipeline"] and rank == 0:
        print(bench.pipeline_report(dataset, model.size_divisibility, config["data"]["workers"]))
    return model


def checkpoint_hooks(config, state_of, progress, evaluate, say):
    """hooks["checkpoint"]: save iter_*.pth (state_of(iteration) -> training state), then keep only the newest
    checkpoint.keep_last; hooks["evaluate"]: evaluate(iteration) -> scores, then with checkpoint.best follow
    `progress`, save best.pth on a new best, and return why to stop early (or None)."""
    output_dir, policy, rank = config["output_dir"], config["checkpoint"], dist.rank()

    def save(iteration):
        checkpoint.save_checkpoint(state_of(iteration), output_dir, rank, say)
        if policy["keep_last"] and rank == 0:
            checkpoint.keep_newest(output_dir, config, policy["keep_last"], say)

    def judge(iteration):
        scores = evaluate(iteration)
        is_best, stop = checkpoint.record_evaluation(progress, scores, iteration, policy) if progress else (0, None)
        if is_best:
            checkpoint.save_checkpoint(state_of(iteration), output_dir, rank, say, name="best.pth")
        return stop
    return {"checkpoint": save, "evaluate": judge if evaluate else None}


def evaluation(config, model, torch_device, board=None):
    """evaluate(iteration=None) -> scores of `model` on the val split; rank 0 prints the table, writes eval.json and a
    metrics.jsonl line (TensorBoard scalars, three panels to `board`). The global CPU generator is left as it was."""
    dataset, info = eval_dataset(config)
    rank, world_size, autocast = dist.rank(), dist.world_size(), amp.autocast_for(torch_device.type, config["amp"])
    loader = data.eval_loader(dataset, rank, world_size, config["data"]["workers"], torch_device.type != "cpu",
                              evaluate.collate_views)

    def run(iteration=None):
        progress = metrics.progress_lines(len(loader), max(10, len(loader) // 10), print) if rank == 0 else None
        with torch.random.fork_rng(devices=[]):
            matrix, details = evaluate.confusion_over(model, loader, torch_device, config["model"]["num_classes"],
                                                      autocast, config["test"], progress,
                                                      per_image=(len(dataset), loader.dataset.indices))
        loss = details["val_loss"]
        result = {**metrics.metrics_from_confusion(matrix), "val_loss": None if loss is None else loss.item()}
        if rank == 0:
            worst = worst_panels(config, model, torch_device, details["per_image"], (dataset, info))
            metrics.report_evaluation(result, info["classes"], len(dataset), {"iteration": iteration, "test":
                                      config["test"], "worst": worst}, config["output_dir"], board)
        for stem, picture in panels_of(config, model, torch_device, 3, (dataset, info)) if board is not None else ():
            board.add_image(f"val/{stem}", picture, iteration, dataformats="HWC")
        return result
    return run


def worst_panels(config, model, torch_device, counts, dataset_and_info):
    """eval.json's "worst": the report.worst images of lowest mIoU (metrics.worst_images), lowest first, each with
    its photo | truth | prediction panel written to <output_dir>/worst/NN_<stem>.png."""
    worst, (dataset, info) = metrics.worst_images(counts, config["report"]["worst"]), dataset_and_info
    panels = predict.prediction_panels(model, dataset, 0, inference_options(config, torch_device),
                                       (info["palette"], info["classes"]), indices=[index for index, _ in worst])
    listed = []
    for number, ((index, miou), (stem, picture)) in enumerate(zip(worst, panels), 1):
        path = os.path.join("worst", f"{number:02d}_{stem}.png")
        files.save_image(os.path.join(config["output_dir"], path), picture, "PNG")
        listed.append({"index": index, "stem": stem, "mIoU": miou, "panel": path})
    return listed


def evaluate_task(config, load_section=None):
    """Load `weights`, score the val split, optionally save colour-coded predictions and (label_ids) the val label maps
    cityscapesScripts' evaluator reads (<output_dir>/label_ids/<stem>.png), predicted as evaluation: no slide switch."""
    split_items(config, "val_splits", cache=False)  # every file is there before the model loads
    torch_device, rank, world_size, say = start(config)
    os.makedirs(config["output_dir"], exist_ok=True)
    model, config = inference_model(config, torch_device, say)
    result = evaluation(config, model, torch_device)()
    dist.print_on_rank0(f"wrote {os.path.join(config['output_dir'], 'eval.json')}")
    if rank == 0 and config["save_predictions"] > 0:
        save_predictions(config, model, torch_device)
    if rank == 0 and config["label_ids"]:
        dataset, info = eval_dataset(config)
        folder, inference = os.path.join(config["output_dir"], "label_ids"), inference_options(config, torch_device)
        jobs = data.prediction_jobs([image for image, _ in dataset.items], folder)
        written = predict.predict_files(model.eval(), jobs, folder, {**inference, "test": {
            **config["test"], "max_size": float("inf")}}, (info["palette"], info["classes"]))
        print(f"wrote {written} label maps in {config['label_ids']} label ids to {folder}")
    dist.cleanup()
    return result


def panels_of(config, model, torch_device, count, dataset_and_info=None):
    """[(stem, photo | truth | prediction picture)] of the first `count` val images, predicted as evaluation does."""
    dataset, info = dataset_and_info or eval_dataset(config)
    return predict.prediction_panels(model, dataset, count, inference_options(config, torch_device),
                                     (info["palette"], info["classes"]))


def save_predictions(config, model, torch_device):
    """<output_dir>/predictions/<stem>.png: photo | truth | prediction of the first `save_predictions` val images."""
    folder = os.path.join(config["output_dir"], "predictions")
    panels = panels_of(config, model, torch_device, config["save_predictions"])
    for stem, picture in panels:
        files.save_image(os.path.join(folder, f"{stem}.png"), picture, "PNG")
    print(f"wrote {len(panels)} colour-coded predictions to {folder}")


def predict_jobs(config):
    """[(input path, output stem)] of every input image; UserError when an output would replace an input."""
    return data.prediction_jobs(data.list_images(config["input"]), config["output"])


def predict_task(config, load_section=None):
    """`weights` applied to every image of `input`; label maps and overlays under `output`."""
    jobs = predict_jobs(config)
    torch_device, rank, world_size, say = start(config)
    model, config = inference_model(config, torch_device, say)
    info = dataset_info(config)
    inference = {**inference_options(config, torch_device), "save_probabilities": config["save_probabilities"]}
    written = predict.predict_files(model, jobs[rank::world_size], config["output"], inference,
                                    (info["palette"], info["classes"]), say)
    dist.cleanup()
    if jobs and not written:
        raise UserError(f"input={config['input']}: none of its {len(jobs)} files could be read as an image")
    print(f"wrote {written} label maps and overlays to {config['output']}")
    return written


def export_task(config, load_section=None):
    """`weights` as an ONNX file at `output` for export.hw images (a seg checkpoint may set it), run in onnxruntime on
    a few images (`input` resized to export.hw, or generated) against seg: exit 2 below 99.9% label agreement."""
    model = model_with_weights(config, torch.device("cpu"), print).eval()
    print(f"exporting for H×W = {config['export']['hw'][0]}×{config['export']['hw'][1]} images (export.hw)")
    return predict.export_and_check(model, tuple(config["export"]["hw"]), config["output"],
                                    data.list_images(config["input"])[:4] if config["input"] else [])


def demo_task(config, load_section=None):
    """Generate the demo data (local rank 0 per node; the others wait), train, evaluate, save its predictions."""
    _, rank, _, _ = start(config)
    root = os.path.join(config["data_root"], config["data"]["root"])
    generate = prepare.make_demo_voc if config["data"]["dataset"] == "voc" else prepare.make_demo_cityscapes
    if dist.launch_ranks()[1] == 0:
        generate(root)
    dist.barrier()
    model = train_task(config)
    if rank == 0 and config["save_predictions"]:
        save_predictions(config, model, next(model.parameters()).device)


def bench_task(config, load_section=None):
    torch_device, _, _ = dist.setup(config["device"])
    return bench.model_bench(lambda: build_model(config["model"]),
                             lambda model: train.build_optimizer(model, **config["optimizer"]), loss_function(config),
                             config["bench"], torch_device, config["output_dir"], config["section"],
                             seed=config["seed"], loss_scale=config["loss_scale"],
                             num_classes=config["model"]["num_classes"])


def data_bench_task(config, load_section):
    recipes = [load_section(name) for name in config["bench"]["sections"]]
    recipes = [{"section": recipe["section"], "dataset": recipe["data"]["dataset"],
                "crop_hw": recipe["data"]["crop_hw"], "num_classes": recipe["model"]["num_classes"],
                "params": sampler_params(recipe["data"], augmentation(recipe))} for recipe in recipes]
    return bench.data_bench(recipes, config["bench"], torch.device(dist.resolve_device_type(config["device"])),
                            config["output_dir"])


def check_data_task(config, load_section=None):
    """Decode every image and label of the train and val splits (threads), then report every problem at once and
    each class's pixels: what to run before a long job. Exit 2 if anything is wrong."""
    problems, num_classes = [], config["model"]["num_classes"]
    for key in ("train_splits", "val_splits"):
        items, info, _ = split_items(config, key, cache=False, complete=False)
        found, pixels = data.check_items(items, num_classes, info["hint"], config["data"]["reduce_zero_label"],
                                         max(config["data"]["workers"], 1))
        problems += found
        print(f"data.{key} = {config['data'][key]}: {len(items)} images; pixels per class:\n" + "\n".join(
            f"  {name:<20} {count:>14,} {100 * count / max(sum(pixels), 1):6.2f}%" for name, count in
            zip(info["classes"], pixels)))
    if problems:
        raise UserError(f"{len(problems)} problems:\n" + "\n".join(problems))
    print("every image and label decodes and matches")


def prepare_task(config, load_section=None):
    root = os.path.join(config["data_root"], config["data"]["root"])
    if config["task"] == "prepare_cityscapes":
        return prepare.prepare_cityscapes(root, workers=config["data"]["workers"])
    return prepare.prepare_voc_aug(root, os.path.join(config["data_root"], "VOCdevkit", "VOCaug", "dataset"))


def report_task(config, load_section=None):
    return metrics.write_report(config["run"])


TASKS = {"train": train_task, "evaluate": evaluate_task, "predict": predict_task, "export": export_task,
         "demo": demo_task, "bench": bench_task, "data_bench": data_bench_task, "prepare_voc_aug": prepare_task,
         "prepare_cityscapes": prepare_task, "report": report_task}
