"""The command line of the installed `seg` command and of `python run.py`: one main (run.py's docstring lists the
launch commands; installed, `seg` stands for `python run.py` from any folder).

    seg --list [--config my.toml]               # every section, grouped by the file it comes from
    seg pspnet_eval weights=PATH                # a section, key=value overrides (TOML literals), --show, --check-data
    seg mine --config my.toml                   # your sections: [mine] inherit = "pspnet_folder" + what differs
    torchrun --nproc_per_node 8 --no-python seg pspnet_8p   # one node, 8 devices

Mistakes in the config or the data exit with code 2 and a message naming the key or file.
"""
import functools
import os
import signal
import sys

from seg import checkpoint, config, dist, tasks
from seg.files import UserError


# configs.toml inside the installed package (setup.py copies it there), else the checkout's, next to run.py (a
# checkout or an editable install): one file, wherever seg runs from
HERE = os.path.dirname(os.path.abspath(__file__))
CONFIG_PATH = os.path.join(HERE if os.path.isfile(os.path.join(HERE, "configs.toml")) else os.path.dirname(HERE),
                           "configs.toml")


def split_config_files(argv):
    """(argv without them, the files of every `--config FILE` / `--config=FILE`, in order)."""
    rest, paths, items = [], [], iter(argv)
    for item in items:
        if item == "--config" or item.startswith("--config="):
            path = item.split("=", 1)[1] if "=" in item else next(items, "")
            if not path:
                raise UserError("--config needs a file: --config my.toml (repeatable; later files win)")
            paths.append(path)
        else:
            rest.append(item)
    return rest, paths


def main(argv, usage=__doc__):
    argv, user_files = split_config_files(argv)
    paths = [CONFIG_PATH, *user_files]
    if not argv or argv[0] in ("-h", "--help"):
        print(usage)
        return 0
    if argv[0] == "--list":
        origin = None
        for name, description, where in config.describe_sections(paths):
            print(*([f"# {where}"] if where != origin else []), f"{name:<20} {description}", sep="\n")
            origin = where
        return 0
    section, rest = argv[0], argv[1:]
    overrides = [item for item in rest if item not in ("--show", "--check-data")]
    if unknown_flags := [item for item in overrides if item.startswith("-")]:
        raise UserError(f"unknown option {unknown_flags[0]}; options: --list, --show, --check-data, --config FILE; the "
                        f"rest key=value")
    load = functools.partial(config.load_config, paths, model_defaults_for=tasks.builder_defaults,
                             stored_config_for=checkpoint.stored_config, log=dist.print_on_rank0)
    resolved = load(section, overrides)
    if "--show" in rest:
        print(config.to_toml(resolved))
    elif "--check-data" in rest:
        tasks.check_data_task(config.validate({**resolved, "task": "check_data"}))
    elif resolved["task"] not in tasks.TASKS:
        raise UserError(f"[{section}] task = {resolved['task']!r} is not runnable; see `seg --list`")
    else:
        try:
            tasks.TASKS[resolved["task"]](config.validate(resolved, dist.launch_ranks()[2]), load)
        except KeyboardInterrupt:  # Ctrl-C, or SIGTERM (a scheduler, torchrun stopping its workers)
            last = resolved["task"] in ("train", "demo") and checkpoint.latest_checkpoint(resolved["output_dir"])
            dist.print_on_rank0(f"interrupted; resume from {last} with resume=true" if last else "interrupted",
                                file=sys.stderr)
            return 130
    return 0


def user_message(error):
    """The user's message, without the worker traceback DataLoader wraps around it."""
    text, marker = str(error), "seg.files.UserError: "
    return text.rsplit(marker, 1)[-1].strip() if marker in text else text


def console(usage=__doc__):
    """The `seg` command (and run.py): main on sys.argv; a user's mistake exits 2 with its message, no traceback,
    on every rank (a rank whose peer failed says so in one line)."""
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # SIGTERM stops as Ctrl-C does
    try:
        sys.exit(main(sys.argv[1:], usage))
    except KeyboardInterrupt:
        sys.exit(130)
    except Exception as error:
        if not isinstance(error, UserError) and not dist.peer_failed(error):
            raise
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # torchrun stops the other processes: let them exit 2 first
        print(f"error: {user_message(error)}" if isinstance(error, UserError) else f"error: rank "
              f"{dist.launch_ranks()[0]} stops: another process of this run failed (its message says why)",
              file=sys.stderr)
        sys.exit(2)
