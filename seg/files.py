"""Atomic file writes: a temporary file in the target folder, then os.replace, so a crash or Ctrl-C
never leaves a half-written output behind."""
import os
import tempfile


def write_atomic(path, write):
    """Call `write(binary_file)` on a temporary file beside `path`, then rename it to `path` in one step.

    `path` is afterwards either the old file or the complete new one; the temporary never outlives a failure.
    """
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=folder, prefix=f".{os.path.basename(path)}.", suffix=".tmp")
    try:
        with os.fdopen(handle, "wb") as stream:
            write(stream)
            stream.flush()
            os.fsync(stream.fileno())
        os.replace(temporary, path)
    except BaseException:
        if os.path.exists(temporary):
            os.remove(temporary)
        raise


def write_bytes_atomic(payload, path):
    write_atomic(path, lambda stream: stream.write(payload))


def write_text_atomic(text, path):
    write_bytes_atomic(text.encode("utf-8"), path)
