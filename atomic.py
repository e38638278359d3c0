"""Writing a file so that a crash, a kill or a full disk never leaves a torn one in its place.

Every file the project writes (checkpoints, predicted masks, the decoded-sample cache,
metrics.jsonl, config.json, evaluation reports, plots, bench.json) goes through `atomic_write`: the data goes to a
hidden temporary file beside the target, is flushed to the disk (fsync), and is then renamed over
the target in one step (`os.replace`, atomic on POSIX and Windows). A reader sees the old file or
the new one, never half of one.
"""
import glob
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
        _fsync_folder(path.parent)
    except OSError as err:  # name the file the caller asked for, not the temporary one
        raise OSError(err.errno, f"cannot write {path}: {err.strerror or err}") from err
    finally:
        tmp.unlink(missing_ok=True)


def _fsync_folder(folder: Path):
    """Make the rename itself durable (POSIX); where a folder cannot be opened (Windows), skip it."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some file systems refuse fsync on a folder; the data itself is already synced
    finally:
        os.close(fd)


def remove_stale_temporaries(path) -> int:
    """Delete the temporaries of `path` that killed writers left (SIGKILL skips atomic_write's cleanup):
    `.<name>.<pid>.tmp` whose process no longer runs. Returns how many were removed.

    For the files a long run streams for minutes (predict.py's submission): a killed run's partial
    copy is otherwise left beside the target for good.
    """
    removed = 0
    for stale in Path(path).parent.glob(f".{glob.escape(Path(path).name)}.*.tmp"):
        pid = stale.name[len(Path(path).name) + 2:-len(".tmp")]
        if pid.isdigit() and int(pid) != os.getpid() and not _running(int(pid)):
            stale.unlink(missing_ok=True)
            removed += 1
    return removed


def temporary_target(tmp) -> Path:
    """The file an atomic_write temporary (`.<name>.<pid>.tmp`) was to become, beside it."""
    tmp = Path(tmp)
    return tmp.with_name(tmp.name[1:].rsplit(".", 2)[0])


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)  # signal 0: only asks whether the process exists
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # it exists, as another user's
    return True


def folder_problem(folder) -> str | None:
    """Why files could not be written in `folder` (or in the folders that would be created for it); None if they can.

    Checks the nearest existing ancestor: it must be a folder, writable and searchable (a read-only
    mount, missing permissions, or a file where a folder should be all show here, before any work).
    """
    existing = Path(folder).absolute()
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        return f"{existing} is not a folder"
    if not os.access(existing, os.W_OK | os.X_OK):
        return f"{existing} is not writable"
    return None


def write_bytes(path, data: bytes):
    """Write `data` to `path` atomically."""
    with atomic_write(path) as f:
        f.write(data)


def write_text(path, text: str):
    """Write UTF-8 `text` to `path` atomically."""
    write_bytes(path, text.encode("utf-8"))
