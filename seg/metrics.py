"""What a run measures and writes down: the confusion matrix and the scores derived from it, the evaluation table,
the training meter (losses, speed, data time), the records of both in metrics.jsonl, eval.json and TensorBoard, and
the report page drawn from those records (`python run.py report run=OUTPUT_DIR`).

Scores come from a dataset-level confusion matrix (rows truth, columns prediction) accumulated on the device without
per-image host reads, then all-reduced; no prediction maps are kept (as torchvision's references/segmentation).

The report is <run>/report/index.html, a static page (no JavaScript, no server) with its PNG plots beside it: the
training curves of metrics.jsonl (each loss term, lr, images/s, data time; mIoU, aAcc and val_loss per evaluation),
eval.json's per-class IoU as bars and its confusion matrix as a row-normalised heat map, the panels of its worst
images, and the run's config. A run in progress works (a line of metrics.jsonl being written is skipped), and so does
a resumed one (one record per iteration; should one repeat, the last is kept). matplotlib is imported only there."""
import contextlib
import html
import json
import math
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from seg import checkpoint, config, dist, files
from seg.files import IGNORE_INDEX, UserError


def confusion_matrix(pred, label, num_classes, ignore_index=IGNORE_INDEX):
    """num_classes×num_classes int64 counts of (label, pred) pairs over pixels whose label is valid.

    pred, label: integer tensors of the same shape, on the same device. Labels outside [0, num_classes) other
    than ignore_index are rejected by the data loader, not here (a check would read the labels back).
    No host synchronisation: ignored pixels are not removed (label[valid] would read the number of valid
    pixels back to size its result) but routed to one extra bin, num_classes², that is dropped at the end."""
    extra = num_classes * num_classes
    index = torch.where(label != ignore_index, label.long() * num_classes + pred.long(), extra).reshape(-1)
    if index.device.type == "npu":
        # torch_npu lists its scatter kernels for fp16/fp32 only and its bincount for uint8..int64; with every
        # value below minlength the result has extra + 1 bins
        counts = torch.bincount(index, minlength=extra + 1)
    else:
        # torch.bincount on CUDA reads max(index) back to size its output (a sync per call); adding ones into a
        # tensor whose size is known up front needs nothing from the device
        counts = torch.zeros(extra + 1, dtype=torch.int64, device=index.device).index_add_(
            0, index, index.new_ones(1).expand(index.numel()))
    return counts[:extra].reshape(num_classes, num_classes)


def metrics_from_confusion(matrix):
    """Scores as fractions: aAcc, mIoU, mAcc and per class IoU, Acc (NaN for a class absent from the truth; IoU NaN
    only if never predicted either), Precision (NaN if never predicted), Recall (= Acc) and Dice (= F1 = 2PR / (P + R),
    NaN for a class in neither truth nor prediction), their means over non-NaN classes (mmsegmentation's np.nanmean),
    frequency-weighted IoU (Σ truth share × IoU over the truth's classes, FCN's paper) and "confusion" (rows truth)."""
    matrix = matrix.double().cpu()
    intersection, label_area, predicted_area = matrix.diag(), matrix.sum(dim=1), matrix.sum(dim=0)
    iou = intersection / (label_area + predicted_area - intersection)  # 0/0 -> NaN, as in mmsegmentation
    per_class = {"Precision": intersection / predicted_area, "Recall": intersection / label_area,
                 "Dice": 2 * intersection / (label_area + predicted_area)}
    present, acc = label_area > 0, per_class["Recall"]
    return {"aAcc": (intersection.sum() / label_area.sum()).item(), "mIoU": torch.nanmean(iou).item(),
            "mAcc": torch.nanmean(acc).item(), "IoU": iou.tolist(), "Acc": acc.tolist(),
            **{f"m{key}": torch.nanmean(value).item() for key, value in per_class.items()},
            **{key: value.tolist() for key, value in per_class.items()},
            "fwIoU": ((label_area[present] * iou[present]).sum() / label_area.sum()).item(),
            "confusion": matrix.long().tolist()}


def worst_images(counts, k):
    """[(image index, its mIoU)] of the k images of lowest mIoU over the classes in their truth or prediction, lowest
    first, ties by index, from int64 images×2×C (intersection, union) counts; images without a valid pixel left out."""
    miou = torch.nanmean(counts[:, 0].double() / counts[:, 1], dim=1).tolist()  # 0/0: a class not in the image
    return [(index, value) for value, index in sorted((v, i) for i, v in enumerate(miou) if v == v)[:k]]


def percent(value, missing="nan"):
    return missing if value is None or value != value else f"{100 * value:.2f}"  # None: not in this eval.json; NaN


def format_table(metrics, class_names):
    """The per-class IoU/Acc table and the summary line, in percent with 2 decimals."""
    width = max(len(name) for name in class_names)
    lines = [f"{'class':<{width}}  {'IoU':>6}  {'Acc':>6}"]
    for name, iou, acc in zip(class_names, metrics["IoU"], metrics["Acc"]):
        lines.append(f"{name:<{width}}  {percent(iou):>6}  {percent(acc):>6}")
    lines.append(f"aAcc {percent(metrics['aAcc'])}  mIoU {percent(metrics['mIoU'])}  mAcc {percent(metrics['mAcc'])}"
                 + (f"  mDice {percent(metrics['mDice'])}" if "mDice" in metrics else ""))
    return "\n".join(lines)


def progress_lines(total, every, log):
    """progress(done): every `every` images, a line with the count, images/s and ETA (host time: the device may lag)."""
    start = time.perf_counter()

    def progress(done):
        if done % every == 0 and done < total:
            rate = done / (time.perf_counter() - start)
            log(f"evaluating: {done}/{total} images, {rate:.1f} images/s, ETA {(total - done) / rate:.0f} s",
                flush=True)
    return progress


class Meter:
    """Loss sums stay on the device until a log step reads them (one sync); speed counts wall time between
    log steps minus the spans in paused() (checkpoints, evaluations: as the Ascend timers exclude hooks).
    Data time is the time the loop waited for its batches. The final figure starts after WARMUP iterations."""
    WARMUP = 5

    def __init__(self, images_per_step, torch_device):
        self.images_per_step, self.device = images_per_step, torch_device
        self.sums, self.count, self.data_time, self.done = {}, 0, 0.0, 0
        self.tick = time.perf_counter()
        self.warm = None  # the time WARMUP iterations were done
        self.measured = None  # (iterations, seconds) from the warm start to the latest read

    def add(self, losses, data_time):
        for key, value in losses.items():
            self.sums[key] = self.sums.get(key, 0) + value
        self.count, self.data_time, self.done = self.count + 1, self.data_time + data_time, self.done + 1
        if self.done == self.WARMUP:
            dist.synchronize(self.device)
            self.warm = time.perf_counter()

    def read(self, iteration, total, lr):
        """The log record since the last read: mean loss terms over steps and ranks, lr, speed, ETA, memory."""
        keys = sorted(self.sums)
        stacked = dist.all_reduce_sum(torch.stack([self.sums[key].float() for key in keys]))
        scale = max(self.count, 1) * dist.world_size()
        dist.synchronize(self.device)
        now = time.perf_counter()
        if self.done > self.WARMUP:  # then warm is set
            self.measured = (self.done - self.WARMUP, now - self.warm)
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
            self.warm += elapsed

    def summary(self, world_size):
        """The run's global images/s after the warm-up (None for runs of WARMUP iterations or fewer)."""
        if self.measured is None:
            return None
        rate = self.measured[0] * self.images_per_step / self.measured[1]
        return (f"done: {self.done} iterations, {rate:.2f} images/s global (after {self.WARMUP} warm-up "
                f"iterations, {world_size} process(es), batch {self.images_per_step})")


def tensorboard(output_dir, log):
    """A SummaryWriter on <output_dir>/tb, or None with one line saying why (no tensorboard package, no writable tb)."""
    try:
        import tensorboard  # noqa: F401 - torch.utils.tensorboard needs it
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        log("TensorBoard logging is off: pip install tensorboard, then tensorboard --logdir output")
        return None
    folder = os.path.join(output_dir, "tb")
    try:  # the writer's thread would fail later, with a traceback, in a folder it cannot write
        os.makedirs(folder, exist_ok=True)
        tempfile.TemporaryFile(dir=folder).close()
        return SummaryWriter(folder)
    except OSError as error:
        log(f"warning: TensorBoard logging is off: cannot write {folder} ({error.strerror or error}); training goes on")
        return None


def append_record(record, output_dir, board=None, scalars=None, tag=""):
    """One JSON line in <output_dir>/metrics.jsonl; `scalars` {name: value} also to TensorBoard `board` as tag/name."""
    with open(os.path.join(output_dir, "metrics.jsonl"), "a") as handle:
        handle.write(json.dumps(record) + "\n")
    for key, value in (scalars or {}).items() if board is not None else ():
        board.add_scalar(f"{tag}/{key}", value, record["iteration"])


def log_record(record, output_dir, rank, board=None):
    """Rank 0 prints the record and appends it to metrics.jsonl (and to TensorBoard); non-finite losses stop the run."""
    if not all(math.isfinite(value) for key, value in record.items() if key.startswith("loss")):
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
    append_record(record, output_dir, board, {key: value for key, value in record.items()
                                              if key not in ("iteration", "total", "eta_min")}, "train")


def report_evaluation(result, classes, images, record, output_dir, board=None):
    """Print the table of an evaluation over `images` images, write eval.json (`record` plus the scores) and a
    metrics.jsonl line, and add the scores to TensorBoard; record = {"iteration": int or None, "test": [test]}."""
    where = f" at iteration {record['iteration']}" if record["iteration"] else ""
    print(f"evaluation on {images} images{where}:\n{format_table(result, classes)}", flush=True)
    record = {**record, "classes": classes, **result}
    files.write_text_atomic(json.dumps(record, indent=1), os.path.join(output_dir, "eval.json"))
    scores = {key: result[key] for key in ("aAcc", "mIoU", "mAcc", "mDice", "val_loss") if result.get(key) is not None}
    append_record({"iteration": record["iteration"], **scores}, output_dir, board,
                  {**scores, **{f"IoU/{name}": iou for name, iou in zip(classes, result["IoU"])}}, "val")


def drop_records_after(path, iteration):
    """Rewrite metrics.jsonl without the records past `iteration` and without lines that cannot be read (torn, not
    UTF-8 or JSON, no integer iteration): a resumed run logs them anew. Returns how many lines could not be read."""
    if not os.path.isfile(path):
        return 0
    kept, unreadable = [], 0
    with open(path, "rb") as handle:
        for line in handle:
            try:
                number = json.loads(line.decode("utf-8")).get("iteration") or 0  # evaluate_task's have None
                if type(number) is not int:
                    raise TypeError(number)
                kept += [line.decode("utf-8")] if number <= iteration else []
            except (ValueError, AttributeError, TypeError):
                unreadable += 1
    files.write_text_atomic("".join(kept), path)
    return unreadable


def read_records(path):
    """The records of a metrics.jsonl, in order ([] without it), less the lines that do not parse (torn, not UTF-8)."""
    records = []
    for line in Path(path).read_bytes().splitlines() if os.path.isfile(path) else ():
        with contextlib.suppress(ValueError):  # UnicodeDecodeError is one
            records.append(json.loads(line))
    return records


def by_iteration(records, key):
    """The records holding `key` and an iteration, one per iteration (the last), in iteration order."""
    kept = {r["iteration"]: r for r in records if isinstance(r, dict) and key in r and r.get("iteration")}
    return [kept[iteration] for iteration in sorted(kept)]


def run_config(run, evaluation):
    """(TOML text, where it came from) of the run's config: <run>/config.toml, else the config stored in the newest
    seg checkpoint that has one, else eval.json's [test] table."""
    path = os.path.join(run, "config.toml")
    if os.path.isfile(path):
        return Path(path).read_text(), path
    for path in checkpoint.checkpoints_newest_first(run):
        if stored := checkpoint.stored_config(path):
            return config.to_toml(stored), str(path)
    return config.to_toml({"test": (evaluation or {}).get("test", {})}), "eval.json"


def save_png(figure, path):
    files.write_atomic(path, lambda stream: figure.savefig(stream, format="png", dpi=100, bbox_inches="tight"))
    return os.path.basename(path)


def curves_figure(figure, train, evals):
    losses = sorted({key for record in train for key in record if key.startswith("loss")})
    panels = [(title, keys, records) for title, keys, records in (
        ("loss terms", losses, train), ("learning rate", ["lr"], train), ("images/s (global)", ["images_per_s"], train),
        ("data time (s)", ["data_time_s"], train), ("evaluation", ["mIoU", "aAcc"], evals),
        ("validation loss", ["val_loss"], evals)) if any(r.get(key) is not None for r in records for key in keys)]
    rows = -(-len(panels) // 3)
    figure.set_size_inches(15, 3.4 * rows)
    for number, (title, keys, records) in enumerate(panels, 1):
        axes = figure.add_subplot(rows, 3, number)
        for key in keys:
            points = [(r["iteration"], r[key]) for r in records if r.get(key) is not None]
            axes.plot(*zip(*points), label=key, marker="o" if records is evals else None)
        axes.set(title=title, xlabel="iteration")
        if len(keys) > 1:
            axes.legend()
    return figure


def iou_figure(figure, evaluation):
    classes, ticks = evaluation["classes"], range(len(evaluation["classes"]))
    figure.set_size_inches(7, 1 + 0.3 * len(classes))
    axes = figure.add_subplot()
    axes.barh(ticks, [100 * value if value == value else 0 for value in evaluation["IoU"]])
    axes.set_yticks(ticks, classes)
    axes.invert_yaxis()
    axes.set(xlim=(0, 100), xlabel="IoU (%)", title=f"per-class IoU (mIoU {100 * evaluation['mIoU']:.2f})")
    return figure


def confusion_figure(figure, evaluation):
    """Each truth row as shares of its pixels (an empty row stays 0), cells of 1% or more labelled in percent."""
    classes, matrix = evaluation["classes"], np.asarray(evaluation["confusion"], np.float64)
    shares = matrix / np.maximum(matrix.sum(axis=1, keepdims=True), 1)
    figure.set_size_inches(2.5 + 0.4 * len(classes), 1.5 + 0.4 * len(classes))
    axes = figure.add_subplot()
    image = axes.imshow(shares, cmap="Blues", vmin=0, vmax=1)
    for (row, column), share in np.ndenumerate(shares):
        if share >= 0.01:
            axes.text(column, row, f"{100 * share:.0f}", ha="center", va="center", fontsize=7,
                      color="white" if share > 0.5 else "black")
    axes.set_xticks(range(len(classes)), classes, rotation=90)
    axes.set_yticks(range(len(classes)), classes)
    axes.set(xlabel="prediction", ylabel="truth", title="confusion matrix (rows normalised)")
    figure.colorbar(image, ax=axes, label="share of the truth class's pixels")
    return figure


def page(run, evaluation, plots, worst, config_text):
    """The HTML text: headline scores and the per-class table of eval.json, the plots, the worst panels, the config."""
    esc = html.escape
    parts = [f"<!doctype html>\n<html><head><meta charset='utf-8'><title>seg report {esc(run)}</title><style>"
             "body{font-family:sans-serif;margin:2em} td,th{padding:2px 8px;text-align:right} img{max-width:100%}"
             f"</style></head><body><h1>{esc(run)}</h1>"]
    if evaluation:
        loss, iteration = evaluation.get("val_loss"), evaluation.get("iteration")
        parts.append(f"<p>evaluation{f' at iteration {iteration}' if iteration else ''}: " + ", ".join(
            f"{key} {percent(evaluation.get(key), '–')}" for key in ("aAcc", "mIoU", "mAcc", "mDice", "fwIoU")) +
            (f", val_loss {loss:.4f}" if loss is not None else "") + "</p>")
        keys = [key for key in ("IoU", "Acc", "Precision", "Recall", "Dice") if key in evaluation]
        rows = ["<tr><th>class</th>" + "".join(f"<th>{key}</th>" for key in keys) + "</tr>"] + [
            f"<tr><td>{esc(name)}</td>" + "".join(f"<td>{percent(evaluation[key][k], '–')}</td>" for key in keys) +
            "</tr>" for k, name in enumerate(evaluation["classes"])]
        parts.append("<table>" + "\n".join(rows) + "</table>")
    parts += [f"<h2>{esc(title)}</h2><img src='{esc(name)}' alt='{esc(title)}'>" for title, name in plots]
    if worst:
        parts.append("<h2>worst images (photo | truth | prediction)</h2>" + "".join(
            f"<figure><img src='../{esc(item['panel'])}'><figcaption>{esc(item['stem'])}: mIoU "
            f"{percent(item['mIoU'], '–')}</figcaption></figure>" for item in worst))
    parts.append(f"<h2>config ({esc(config_text[1])})</h2><pre>{esc(config_text[0])}</pre></body></html>\n")
    return "\n".join(parts)


def write_report(run):
    """Write <run>/report/index.html and its plots (curves.png, iou.png, confusion.png) from what <run> holds now;
    returns the page's path. UserError when <run> has neither metrics.jsonl nor eval.json."""
    records, evaluation_path = read_records(os.path.join(run, "metrics.jsonl")), os.path.join(run, "eval.json")
    try:
        evaluation = json.loads(Path(evaluation_path).read_text()) if os.path.isfile(evaluation_path) else None
    except ValueError as error:
        raise UserError(f"{evaluation_path}: not JSON ({error}); evaluate again to rewrite it") from None
    if not records and evaluation is None:
        raise UserError(f"run={run}: no metrics.jsonl or eval.json there; give the output_dir of a training or "
                        f"evaluation run (one that has logged at least once)")
    files.optional_import("matplotlib", "matplotlib")
    from matplotlib.figure import Figure  # optional: imported only once the package is known to be there
    folder, evaluation = os.path.join(run, "report"), evaluation or {}
    train, evals = by_iteration(records, "lr"), by_iteration(records, "mIoU")
    figures = [("training curves", "curves.png", curves_figure, (train, evals), train or evals),
               ("per-class IoU", "iou.png", iou_figure, (evaluation,), "IoU" in evaluation),
               ("confusion matrix", "confusion.png", confusion_figure, (evaluation,), "confusion" in evaluation)]
    plots = [(title, save_png(draw(Figure(layout="constrained"), *arguments), os.path.join(folder, name)))
             for title, name, draw, arguments, wanted in figures if wanted]
    worst = [item for item in evaluation.get("worst", []) if os.path.isfile(os.path.join(run, item["panel"]))]
    path = os.path.join(folder, "index.html")
    files.write_text_atomic(page(run, evaluation, plots, worst, run_config(run, evaluation)), path)
    print(f"wrote {path} ({len(plots)} plots, {len(worst)} worst-image panels)")
    return path
