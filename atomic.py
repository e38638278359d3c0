"""Writing a file so that a crash, a kill or a full disk never leaves a torn one in its place.

Every file the project writes for later use (checkpoints, predicted masks, the decoded-sample cache,
metrics.jsonl, config.json, evaluation reports) goes through `atomic_write`: the data goes to a
hidden temporary file beside the target, is flushed to the disk (fsync), and is then renamed over
the target in one step (`os.replace`, atomic on POSIX and Windows). A reader sees the old file or
the new one, never half of one.
"""
import os
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def atomic_write(path, mode: str = "wb"):
    """Yield a file object for a temporary file beside `path`; when the block ends cleanly, it replaces `path`.

    On any exception (OSError for a full disk, KeyboardInterrupt...) the temporary file is removed
    and `path` keeps what it held before. The temporary name, `.<name>.<pid>.tmp`, is hidden and
    differs between processes writing the same folder.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_bytes(path, data: bytes):
    """Write `data` to `path` atomically."""
    with atomic_write(path) as f:
        f.write(data)


def write_text(path, text: str):
    """Write UTF-8 `text` to `path` atomically."""
    write_bytes(path, text.encode("utf-8"))
