"""Checkpoints: atomic saves, resuming, and loading published weight files (see `load_weights_file`) without running
their code: pickles build only numpy arrays and containers, torch files go through torch.load(weights_only=True)."""
import codecs
import collections
import functools
import pickle
import re
import zipfile
from pathlib import Path

import numpy as np
import torch

from seg import dist
from seg.files import UserError, write_atomic

CHECKPOINT_NAME = re.compile(r"iter_(\d+)\.pth")
TORCH_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C  # first pickled object of torch.save's pre-1.6 (non-zip) format
# A file may lack these: BN step counters matter only for momentum=None; pixel mean/std come from the builder.
OPTIONAL_MODEL_TENSORS = ("num_batches_tracked", "pixel_mean", "pixel_std")
# Backbone weights inside whole-model files: mmseg (backbone.*) and detectron2 (backbone.bottom_up.*).
BACKBONE_PREFIXES = {"backbone.bottom_up.": "", "backbone.": ""}
# caffe2 blob name -> detectron2 name, re.sub in this order (steps 1-6 of convert_basic_c2_names in detectron2
# `detectron2/checkpoint/c2_model_loading.py`):
# `res4_22_branch2b_bn_running_var` -> `res4.22.conv2.norm.running_var`, `conv1_w` -> `stem.conv1.weight`.
C2_RENAMES = ((r"\Apred_([bw])\Z", r"linear_\1"), ("_", "."), (r"\.b$", ".bias"), (r"\.w$", ".weight"),
              (r"bn\.(s|gamma)$", "norm.weight"), (r"bn\.(bias|beta)$", "norm.bias"),
              (r"bn\.(rm|running\.mean)$", "norm.running_mean"), (r"bn\.(riv|running\.var)$", "norm.running_var"),
              (r"^res\.conv1\.norm\.", "conv1.norm."), (r"^conv1\.", "stem.conv1."), (r"\.branch1\.", ".shortcut."),
              (r"\.branch2a\.", ".conv1."), (r"\.branch2b\.", ".conv2."), (r"\.branch2c\.", ".conv3."))


def to_cpu(obj):
    """Nested dicts/lists/tuples with every tensor on the CPU (an NPU tensor would need torch_npu to unpickle)."""
    if isinstance(obj, torch.Tensor):
        return obj.cpu()
    if isinstance(obj, dict):
        items = [(key, to_cpu(value)) for key, value in obj.items()]
        return collections.OrderedDict(items) if isinstance(obj, collections.OrderedDict) else dict(items)
    if type(obj) in (list, tuple):
        return type(obj)(to_cpu(value) for value in obj)
    return obj


def save_atomic(obj, path):
    """torch.save `obj` (tensors moved to the CPU) atomically: `path` is the old file or the complete new one."""
    def write(stream):
        try:
            torch.save(to_cpu(obj), stream)
        except RuntimeError as error:  # torch's zip writer turns a failed write (ENOSPC) into an enforce failure
            cause = getattr(error.__context__, "strerror", None) or first_line(error)
            raise UserError(f"{path}: cannot write ({cause}); free space or choose another folder") from error
    write_atomic(path, write)


def save_checkpoint(state, output_dir, rank, log=print, name=None):
    """Rank 0 writes the training `state` to <output_dir>/iter_NNNNNNN.pth (its iteration) or `name`, atomically; every
    rank waits for it, so none runs ahead of a checkpoint that may be resumed from."""
    if rank == 0:
        path = Path(output_dir) / (name or f"iter_{state['iteration']:07d}.pth")
        save_atomic(state, path)
        log(f"saved {path}", flush=True)
    dist.barrier()


def checkpoints_newest_first(output_dir):
    """The `iter_{:07d}.pth` files in `output_dir` (iter_0000000.pth included), highest iteration first."""
    output_dir = Path(output_dir)
    found = [(int(match.group(1)), path) for path in (output_dir.iterdir() if output_dir.is_dir() else ())
             if (match := CHECKPOINT_NAME.fullmatch(path.name)) and path.is_file()]
    return [path for _, path in sorted(found, reverse=True)]


def run_identity(config):
    """What makes checkpoints one run's: its model and training data (a resumed run may change the schedule)."""
    return {"model": config["model"], "data": {key: config["data"][key] for key in (
        "dataset", "root", "train_splits", "classes", "reduce_zero_label", "label_suffix")}}


def why_not_this_run(path, stored, identity):
    """Why checkpoint `path`, whose stored config is `stored` (None: not a seg training checkpoint), is not of the run
    `identity`: the first identity key whose value differs (an older seg's config may lack some); None if it is."""
    for table, key in ((table, key) for table in identity for key in identity[table]):
        if (theirs := ((stored or {}).get(table) or {}).get(key, "not recorded")) != identity[table][key]:
            return (f"{path} is not a checkpoint of this run: its {table}.{key} is {theirs!r}, this run's "
                    f"{identity[table][key]!r}. Resume takes only this run's checkpoints: move the file away or use "
                    f"another output_dir (resume_from=PATH takes a file whatever run wrote it)")
    return None


def keep_newest(output_dir, config, keep_last, log=print):
    """Delete all but the newest `keep_last` (>= 1) iter_*.pth of this run (`why_not_this_run`): files seg did not
    write, other runs' and torn ones stay, and the newest loadable one of this run is always kept."""
    own = [path for path in checkpoints_newest_first(output_dir)
           if not why_not_this_run(path, stored_config(path), run_identity(config))]
    for path in own[keep_last:]:
        path.unlink()
        log(f"removed {path} (checkpoint.keep_last = {keep_last})")


def record_evaluation(progress, scores, iteration, policy):
    """Follow checkpoint.best's score in `progress` {"metric", "value", "iteration", "stale"}: the best, its iteration,
    the evaluations since it last rose by early_stop_delta or more -> (is this the best, why to stop early or None)."""
    value, best, patience = scores[progress["metric"]], progress["value"], policy["early_stop_patience"]
    improved = best is None or value > best
    rose = improved and (best is None or value - best >= policy["early_stop_delta"])
    progress.update(stale=0 if rose else progress["stale"] + 1, **({"value": value, "iteration": iteration}
                                                                   if improved else {}))
    if not patience or progress["stale"] < patience:
        return improved, None
    return improved, (f"{progress['metric']} did not rise by {policy['early_stop_delta']:g} or more in {patience} "
                      f"evaluations (best {100 * progress['value']:.2f} at iteration {progress['iteration']})")


def latest_checkpoint(output_dir):
    """The checkpoint in `output_dir` with the highest iteration, or None when there is none."""
    return next(iter(checkpoints_newest_first(output_dir)), None)


def latest_loadable_checkpoint(output_dir, log=print, identity=None):
    """(path, training state) of the newest checkpoint that loads, or (None, None); a torn one (copied or cut short
    outside save_atomic) is a warning with the reason. With `identity`, a loadable file of another run: UserError."""
    for path in checkpoints_newest_first(output_dir):
        try:
            state = torch_load(path)
        except UserError as error:  # names the file and the reason
            log(f"warning: skipping {path.name}, it does not load: {error}")
            continue
        state = load_training_state(path, state)
        if identity is not None and (reason := why_not_this_run(path, state.get("config"), identity)):
            raise UserError(reason)
        return path, state
    return None, None


def torch_load(path):
    """torch.load(weights_only=True) onto the CPU; a refused global or unreadable file becomes a UserError."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise UserError(f"{path}: file not found") from None
    except Exception as error:  # a refused global, a torn download, a non-torch file: all user input
        refused = re.search(r"GLOBAL ([\w.]+)", str(error)) if isinstance(error, pickle.UnpicklingError) else None
        if refused:
            name = refused.group(1) if "." in refused.group(1) else f"builtins.{refused.group(1)}"  # torch drops it
            raise UserError(f"{path} asks for the Python global {name}: it is not a plain weights file, and "
                            f"loading it could run code, so seg refuses it. Use a file holding only tensors (a "
                            f"state_dict).") from None
        raise UserError(f"{path}: not a readable torch file ({first_line(error)})") from None


def load_training_state(path, state=None):
    """seg's training checkpoint (`state`: already loaded) as a dict with "model" and "iteration" (CPU tensors)."""
    state = torch_load(path) if state is None else state
    if not isinstance(state, dict) or not {"model", "iteration"} <= state.keys():
        raise UserError(f"{path} is not a seg training checkpoint (it lacks 'model' or 'iteration'); resume "
                        f"from an iter_*.pth that seg wrote, or load other weights as model weights.")
    return state


def stored_config(path):
    """The resolved config a seg training checkpoint stores, or None for any other file (mmap: tensors stay unread)."""
    try:  # mmap=True: torch.load raises for a file not in torch's zip format (a legacy one too)
        state = load_training_state(path, torch.load(path, map_location="cpu", weights_only=True, mmap=True))
    except Exception:  # noqa: BLE001 - unreadable files are reported when the weights are loaded
        return None
    return state["config"] if isinstance(state.get("config"), dict) and state["config"] else None


def first_line(error):
    lines = [line for line in str(error).splitlines() if line.strip()]
    return lines[0][:300] if lines else type(error).__name__


def latin1_encode(text, encoding="latin1"):
    """`_codecs.encode` as protocol-2 pickles use it to rebuild bytes; other codecs are refused."""
    if codecs.lookup(encoding).name != "iso8859-1":
        raise pickle.UnpicklingError(f"codec {encoding!r} is not used by weights files")
    return codecs.encode(text, "latin1")


def empty_bytes(*args):
    """`bytes()` as protocol-2 pickles write b"" (an empty array's data); arguments (a size) are refused."""
    if args:
        raise pickle.UnpicklingError("bytes() with arguments is not used by weights files")
    return b""


class WeightsUnpickler(pickle.Unpickler):
    """Resolves only the globals a numpy 1.x (`numpy.core`) or 2.x (`numpy._core`) array pickle needs, taken from
    numpy's own reducers: no module is imported by a name read from the file. Python 2 strings are read as latin-1."""

    def __init__(self, file, path):
        super().__init__(file, encoding="latin1")
        self.path = path
        # A state_dict is an OrderedDict; building one runs no code chosen by the file.
        self.allowed = {("collections", "OrderedDict"): collections.OrderedDict, ("numpy", "ndarray"): np.ndarray,
                        ("numpy", "dtype"): np.dtype, ("_codecs", "encode"): latin1_encode,
                        ("__builtin__", "bytes"): empty_bytes, ("builtins", "bytes"): empty_bytes}
        for core in ("numpy.core", "numpy._core"):
            self.allowed[(f"{core}.multiarray", "_reconstruct")] = np.zeros(1).__reduce__()[0]
            self.allowed[(f"{core}.multiarray", "scalar")] = np.float32(0).__reduce__()[0]
            self.allowed[(f"{core}.numeric", "_frombuffer")] = np.zeros(1).__reduce_ex__(5)[0]  # protocol-5 pickles

    def find_class(self, module, name):
        if (module, name) not in self.allowed:
            raise UserError(f"{self.path} asks for the Python global {module}.{name}: it is not a plain weights "
                            f"file (only numpy arrays and containers are allowed), and loading it could run code, "
                            f"so seg refuses it.")
        return self.allowed[(module, name)]


def restricted_unpickle(path):
    """WeightsUnpickler(path).load(); UserError unless it holds only containers, scalars and numeric arrays."""
    try:
        with open(path, "rb") as file:
            data = WeightsUnpickler(file, path).load()
    except UserError:
        raise
    except FileNotFoundError:
        raise UserError(f"{path}: file not found") from None
    except Exception as error:  # truncated or not a pickle at all
        raise UserError(f"{path}: not a readable pickle ({first_line(error)})") from None
    plain = (str, bytes, int, float, bool, type(None))
    stack, seen = [data], set()
    while stack:  # iterative: a crafted pickle may nest deeper than Python's recursion limit
        item = stack.pop()
        if id(item) in seen:
            continue
        seen.add(id(item))
        if type(item) in (dict, collections.OrderedDict):
            stack += [*item.keys(), *item.values()]
        elif type(item) in (list, tuple):
            stack.extend(item)
        elif isinstance(item, np.ndarray) and item.dtype.hasobject:
            raise UserError(f"{path} holds a numpy array of Python objects: it is not a plain weights file.")
        elif not (type(item) in plain or isinstance(item, (np.ndarray, np.generic))):
            raise UserError(f"{path} holds a {type(item).__name__}: it is not a plain weights file.")
    return data


def convert_c2_names(names):
    """{caffe2 name: detectron2 name} by C2_RENAMES; UserError if two blobs would get the same name."""
    renamed = {name: functools.reduce(lambda text, rule: re.sub(*rule, text), C2_RENAMES, name) for name in names}
    if len(set(renamed.values())) != len(renamed):
        clashes = collections.Counter(renamed.values()).most_common(1)[0][0]
        sources = [old for old, new in renamed.items() if new == clashes]
        raise UserError(f"caffe2 blobs {sources} would all load as {clashes}; the file mixes two BN layouts.")
    return renamed


def arrays_to_tensors(arrays):
    """{name: tensor} from {name: numpy array}, dropping caffe2's `*_momentum` blobs and non-numeric values."""
    return {name: torch.from_numpy(np.array(value))  # np.array copies: unpickled arrays may be read-only
            for name, value in arrays.items()
            if isinstance(value, (np.ndarray, np.generic)) and value.dtype.kind in "biuf"
            and not name.endswith("_momentum")}


def torch_weights(data):
    """(state, format) from a torch.load'ed dict."""
    wrapper = next((key for key in ("state_dict", "model") if isinstance(data.get(key), dict)), None)
    state = {str(name).removeprefix("module."): value  # saved from a DataParallel/DDP wrapper
             for name, value in (data[wrapper] if wrapper else data).items() if isinstance(value, torch.Tensor)}
    if wrapper == "model":
        return state, "seg" if {"iteration", "config"} <= data.keys() else "detectron2"
    for prefixes, file_format in ((("backbone.bottom_up.", "sem_seg_head."), "detectron2"),
                                  (("backbone.", "decode_head.", "auxiliary_head."), "mmseg"),
                                  (("stem.", "layer1."), "mmcv_backbone")):
        if any(name.startswith(prefixes) for name in state):
            return state, file_format
    return state, "state_dict"


def load_weights_file(path):
    """(state {name: CPU tensor}, format), told by content, not file name: "seg" (save_atomic's {"model", "iteration",
    "config", ...}), "mmseg" ({"meta", "state_dict"}, backbone./decode_head./auxiliary_head. = PSPNet's names),
    "mmcv_backbone" (ImageNet ResNetV1c `resnet50_v1c-2cccc1ad.pth`, `stem.0.weight`), "detectron2" (.pkl {"model":
    numpy arrays, "__author__"} or .pth {"model": tensors}; PointRend's names), "caffe2" (MSRA's ImageNet `R-101.pkl`,
    blob names like `res2_0_branch2a_bn_gamma` converted by `convert_c2_names`), "state_dict" (any other)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: weights file not found")
    is_zip = zipfile.is_zipfile(path)
    data = None if is_zip else restricted_unpickle(path)
    from_torch = is_zip or (type(data) is int and data == TORCH_LEGACY_MAGIC)
    data = torch_load(path) if from_torch else data
    if not isinstance(data, dict):
        raise UserError(f"{path} holds a {type(data).__name__}, not a dict of weights.")
    if from_torch:
        state, file_format = torch_weights(data)
    elif "model" in data and "__author__" in data and isinstance(data["model"], dict):
        state, file_format = arrays_to_tensors(data["model"]), "detectron2"
    else:  # caffe2
        arrays = arrays_to_tensors(data["blobs"] if isinstance(data.get("blobs"), dict) else data)
        state, file_format = {new: arrays[old] for old, new in convert_c2_names(arrays).items()}, "caffe2"
    if not state:
        raise UserError(f"{path} holds no tensors (read as {file_format}); is it a weights file?")
    return state, file_format


def match_names(model_names, file_names, suffix_match):
    """{model name: file name}: exact, or detectron2's rule, the longest file name equal to a dot-suffix of the
    model name (`res4.22.conv2.norm.running_var` for `backbone.bottom_up.res4.22...`). One model name per file name."""
    file_names, matches = set(file_names), {}
    for name in model_names:  # the name itself first, then (suffix_match) ever shorter dot-suffixes
        suffixes = (name.split(".", start)[-1] for start in range(name.count(".") + 1 if suffix_match else 1))
        if (found := next((suffix for suffix in suffixes if suffix in file_names), None)) is not None:
            matches[name] = found
    shared = [file_name for file_name, count in collections.Counter(matches.values()).items() if count > 1]
    if shared:
        using = [model_name for model_name, file_name in matches.items() if file_name == shared[0]]
        raise UserError(f"weights name {shared[0]} fits several model tensors ({', '.join(using[:3])}); the "
                        f"file's names are too short to place it. Use a file with full names.")
    return matches


def load_into(module, state, *, prefix_map=None, suffix_match=False, strict_missing=False, source="weights",
              verbose=False, log=print):
    """Copy `state` ({file name: tensor}) into `module`'s parameters and buffers, never broadcasting: file names
    go through `prefix_map` ({file prefix: model prefix}, longest first), then `match_names`; a tensor of another
    shape is skipped. Returns {"loaded": [model name], "shape_mismatch": [(name, file shape, model shape)],
    "missing": [model names], "unused": [file names]} and logs one line (`verbose`: every name). `strict_missing`:
    a model tensor left unloaded (OPTIONAL_MODEL_TENSORS aside) is a UserError, nothing copied."""
    longest_first = sorted(prefix_map or {}, key=len, reverse=True)
    mapped = {next((prefix_map[old] + name[len(old):] for old in longest_first if name.startswith(old)), name): value
              for name, value in state.items()}
    if len(mapped) != len(state):
        raise UserError(f"{source}: two names in the file become the same name after removing prefixes.")
    model_state = module.state_dict()
    matches = match_names(model_state, mapped, suffix_match)
    taken = set(matches.values())
    report = dict(loaded=[], shape_mismatch=[], missing=[], unused=[name for name in mapped if name not in taken])
    for name, target in model_state.items():
        if name not in matches:
            report["missing"].append(name)
        elif tuple(mapped[matches[name]].shape) != tuple(target.shape):
            report["shape_mismatch"].append((name, tuple(mapped[matches[name]].shape), tuple(target.shape)))
        else:
            report["loaded"].append(name)
    if strict_missing:
        unloaded = [name for name in report["missing"] if name.rsplit(".", 1)[-1] not in OPTIONAL_MODEL_TENSORS]
        unloaded += [f"{name} (file {file}, model {model})" for name, file, model in report["shape_mismatch"]]
        if unloaded:
            raise UserError(f"{source}: {len(unloaded)} model tensors would stay unloaded (missing from the file or "
                            f"shaped differently), e.g. {'; '.join(unloaded[:4])}. To fine-tune from these weights "
                            f"(other classes or dataset), use a fine-tune section or set allow_missing_weights = true; "
                            f"otherwise pass the weights that match this model.")
    with torch.no_grad():  # state_dict() tensors share storage with the module's parameters and buffers
        for name in report["loaded"]:
            model_state[name].copy_(mapped[matches[name]])
    log(f"{source}: loaded {len(report['loaded'])}/{len(model_state)} model tensors, "
        f"{len(report['shape_mismatch'])} skipped for shape mismatch, {len(report['missing'])} missing from the file, "
        f"{len(report['unused'])} in the file unused")
    if verbose:
        for name, file, model in report["shape_mismatch"]:
            log(f"  shape mismatch: {name} file {file} model {model}")
        for kind in ("missing", "unused"):
            for name in report[kind]:
                log(f"  {kind}: {name}")
    return report


def load_pretrained_backbone(backbone, path, log=print, verbose=False):
    """ImageNet weights into a backbone: ResNetV1c from mmcv's `resnet50_v1c-*.pth` (or an mmseg checkpoint's
    backbone.*), ResNet-FPN or its `bottom_up` from MSRA's `R-101.pkl` (or a detectron2 model), by the suffix
    rule; R-101's fc1000.* and conv1_b stay unused. Returns `load_into`'s report."""
    state, file_format = load_weights_file(path)
    report = load_into(backbone, state, prefix_map=BACKBONE_PREFIXES, suffix_match=True,
                       source=f"pretrained backbone {Path(path).name} ({file_format})", verbose=verbose, log=log)
    if not report["loaded"]:
        raise UserError(f"{path} ({file_format}) has no tensor whose name and shape fit this backbone (file names "
                        f"like {', '.join(list(state)[:3])}); is it the pretrained file for this model and depth?")
    return report


def load_model_weights(model, path, allow_missing=False, log=print, verbose=False):
    """Whole-model weights: seg's checkpoint, mmseg's (PSPNet) or detectron2's (PointRend). Unfilled model tensors
    are a UserError unless `allow_missing` (fine-tuning, e.g. another class count). Returns `load_into`'s report."""
    state, file_format = load_weights_file(path)
    if file_format in ("caffe2", "mmcv_backbone"):
        raise UserError(f"{path} holds ImageNet backbone weights ({file_format}), not a whole model; give it as the "
                        f"model's pretrained backbone instead.")
    if file_format == "detectron2":  # seg's models take their pixel mean/std from the builder
        state = {name: value for name, value in state.items() if name not in ("pixel_mean", "pixel_std")}
    report = load_into(model, state, suffix_match=file_format == "detectron2", strict_missing=not allow_missing,
                       source=f"model weights {Path(path).name} ({file_format})", verbose=verbose, log=log)
    if not report["loaded"]:
        raise UserError(f"{path} ({file_format}) has no tensor whose name and shape fit this model (file names like "
                        f"{', '.join(list(state)[:3])}); is it a checkpoint of this model?")
    return report
