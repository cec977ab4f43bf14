"""Atomic file writes: a temporary file in the target folder, then os.replace, so a crash or Ctrl-C
never leaves a half-written output behind."""
import os
import tempfile


def write_bytes_atomic(payload, path):
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=folder, prefix=".tmp-", suffix=os.path.basename(path))
    try:
        with os.fdopen(handle, "wb") as stream:
            stream.write(payload)
        os.replace(temporary, path)
    except BaseException:
        if os.path.exists(temporary):
            os.remove(temporary)
        raise


def write_text_atomic(text, path):
    write_bytes_atomic(text.encode("utf-8"), path)
