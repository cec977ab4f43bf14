"""The report page of a run: `python run.py report run=OUTPUT_DIR` writes <run>/report/index.html, a static page (no
JavaScript, no server) with its PNG plots beside it: the training curves of metrics.jsonl (each loss term, lr,
images/s, data time; mIoU, aAcc and val_loss per evaluation), eval.json's per-class IoU as bars and its confusion
matrix as a row-normalised heat map, the panels of its worst images, and the run's config.

A run in progress works (a line of metrics.jsonl being written is skipped), and so does a resumed one (metrics.jsonl
keeps one record per iteration; should one repeat, the last is kept). matplotlib is imported only here."""
import contextlib
import html
import json
import os
from pathlib import Path

import numpy as np

from seg import checkpoint, config, files
from seg.files import UserError


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
    """Loss terms, lr, images/s, data time against iteration, then mIoU / aAcc and val_loss per evaluation."""
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


def percent(value):
    return "–" if value is None or value != value else f"{100 * value:.2f}"  # None: not in this eval.json; NaN


def page(run, evaluation, plots, worst, config_text):
    """The HTML text: headline scores and the per-class table of eval.json, the plots, the worst panels, the config."""
    esc = html.escape
    parts = [f"<!doctype html>\n<html><head><meta charset='utf-8'><title>seg report {esc(run)}</title><style>"
             "body{font-family:sans-serif;margin:2em} td,th{padding:2px 8px;text-align:right} img{max-width:100%}"
             f"</style></head><body><h1>{esc(run)}</h1>"]
    if evaluation:
        loss, iteration = evaluation.get("val_loss"), evaluation.get("iteration")
        parts.append(f"<p>evaluation{f' at iteration {iteration}' if iteration else ''}: " + ", ".join(
            f"{key} {percent(evaluation.get(key))}" for key in ("aAcc", "mIoU", "mAcc", "mDice", "fwIoU")) +
            (f", val_loss {loss:.4f}" if loss is not None else "") + "</p>")
        keys = [key for key in ("IoU", "Acc", "Precision", "Recall", "Dice") if key in evaluation]
        rows = ["<tr><th>class</th>" + "".join(f"<th>{key}</th>" for key in keys) + "</tr>"] + [
            f"<tr><td>{esc(name)}</td>" + "".join(f"<td>{percent(evaluation[key][k])}</td>" for key in keys) +
            "</tr>" for k, name in enumerate(evaluation["classes"])]
        parts.append("<table>" + "\n".join(rows) + "</table>")
    parts += [f"<h2>{esc(title)}</h2><img src='{esc(name)}' alt='{esc(title)}'>" for title, name in plots]
    if worst:
        parts.append("<h2>worst images (photo | truth | prediction)</h2>" + "".join(
            f"<figure><img src='../{esc(item['panel'])}'><figcaption>{esc(item['stem'])}: mIoU "
            f"{percent(item['mIoU'])}</figcaption></figure>" for item in worst))
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
