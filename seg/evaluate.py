"""Evaluation: whole-image inference, a device-side confusion matrix all-reduced across ranks, metrics.

Inference follows both references: the model runs on the test-resized image; its logits are resized
(bilinear, align_corners=False) to the network input size, cropped to the unpadded image, resized to
the original size, and the argmax is scored against the original-size label.
"""
import functools
import json
import os

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from seg import amp, data, dist, files, metrics, models, transforms
from seg.errors import UserError


def predict_logits(model, image, hw, out_hw):
    """1×C×h×w logits at the original size `out_hw` for one resized uint8 image (1×3×H×W, valid hw)."""
    logits = model(image, hw)["seg"].float()
    padded_hw = (-(-image.shape[-2] // model.size_divisibility) * model.size_divisibility,
                 -(-image.shape[-1] // model.size_divisibility) * model.size_divisibility)
    if tuple(logits.shape[-2:]) != padded_hw:
        logits = F.interpolate(logits, size=padded_hw, mode="bilinear", align_corners=False)
    height, width = int(hw[0, 0]), int(hw[0, 1])
    logits = logits[:, :, :height, :width]
    return F.interpolate(logits, size=tuple(out_hw), mode="bilinear", align_corners=False)


@torch.no_grad()
def confusion_over(model, loader, torch_device, num_classes, amp_mode):
    """Dataset-level confusion matrix, summed over this rank's images and then over all ranks."""
    model.eval()
    matrix = torch.zeros(num_classes, num_classes, dtype=torch.int64, device=torch_device)
    for batch in data.prefetch(loader, torch_device):
        with amp.autocast_context(torch_device.type, amp_mode):
            logits = predict_logits(model, batch["image"], batch["hw"], batch["label"].shape[-2:])
        matrix += metrics.confusion_matrix(logits.argmax(dim=1), batch["label"], num_classes)
    return dist.all_reduce_sum(matrix)


def eval_dataset(config):
    info = data.dataset_info(config["data"]["dataset"])
    root = os.path.join(config["data_root"], config["data"]["root"])
    items = info["list"](root, config["data"]["val_splits"])
    resize = functools.partial(resize_for_test, long_short=tuple(config["data"]["test_scale"]))
    return data.EvalDataset(items, resize, config["model"]["num_classes"], info["hint"]), info


def resize_for_test(image, long_short):
    height, width = transforms.rescale_hw(image.shape[0], image.shape[1], long_short)
    if (height, width) == image.shape[:2]:
        return image
    return transforms.resize_image(image, (height, width))


def evaluate_and_report(config, model, torch_device, rank, world_size, iteration=None):
    """Evaluate on the val split; rank 0 prints the table and writes eval.json. Returns the metrics."""
    dataset, info = eval_dataset(config)
    loader = data.eval_loader(dataset, rank, world_size, config["data"]["workers"], torch_device.type != "cpu")
    matrix = confusion_over(model, loader, torch_device, config["model"]["num_classes"], config["amp"])
    result = metrics.metrics_from_confusion(matrix)
    if rank == 0:
        where = f" at iteration {iteration}" if iteration else ""
        print(f"evaluation on {len(dataset)} images{where}:\n{metrics.format_table(result, info['classes'])}",
              flush=True)
        record = {"iteration": iteration, "classes": info["classes"], **result}
        files.write_text_atomic(json.dumps(record, indent=1), os.path.join(config["output_dir"], "eval.json"))
        with open(os.path.join(config["output_dir"], "metrics.jsonl"), "a") as handle:
            handle.write(json.dumps({"iteration": iteration, "aAcc": result["aAcc"], "mIoU": result["mIoU"],
                                     "mAcc": result["mAcc"]}) + "\n")
    return result


def evaluate(config):
    """The evaluate task: load `weights`, score the val split."""
    from seg import train

    if not config["weights"]:
        raise UserError(f"[{config['section']}] needs weights=PATH (a seg, mmsegmentation or detectron2 checkpoint)")
    torch_device, rank, world_size = train.setup_run(config)
    model = models.build(config["model"]).to(torch_device)
    models.load_initial_weights(model, config, log=print if rank == 0 else (lambda *a: None))
    result = evaluate_and_report(config, model, torch_device, rank, world_size)
    if rank == 0 and config["save_predictions"] > 0:
        save_predictions(config, model, torch_device)
    dist.cleanup()
    return result


def colorize(label, palette):
    """H×W class indices -> H×W×3 uint8 RGB; 255 (ignore) is drawn white."""
    table = np.full((256, 3), 255, np.uint8)
    table[: len(palette)] = np.asarray(palette, np.uint8)
    return table[label]


@torch.no_grad()
def save_predictions(config, model, torch_device):
    """Write <output_dir>/predictions/<n>.png: input | ground truth | prediction, colour-coded."""
    dataset, info = eval_dataset(config)
    folder = os.path.join(config["output_dir"], "predictions")
    os.makedirs(folder, exist_ok=True)
    model.eval()
    for index in range(min(config["save_predictions"], len(dataset))):
        batch = data.to_device(data.collate_eval([dataset[index]]), torch_device)
        label = batch["label"][0].cpu().numpy()
        logits = predict_logits(model, batch["image"], batch["hw"], label.shape)
        pred = logits.argmax(dim=1)[0].cpu().numpy().astype(np.uint8)
        image_path = dataset.items[index][0]
        photo = data.read_image_bgr(image_path)[:, :, ::-1]
        panel = np.concatenate([photo, colorize(label, info["palette"]), colorize(pred, info["palette"])], axis=1)
        stem = os.path.splitext(os.path.basename(image_path))[0]
        files.write_bytes_atomic(_png_bytes(panel), os.path.join(folder, f"{stem}.png"))
    print(f"wrote {min(config['save_predictions'], len(dataset))} colour-coded predictions to {folder}")


def _png_bytes(array):
    import io

    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()
