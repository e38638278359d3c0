"""Writing a file so that a crash, a kill or a full disk never leaves a torn one in its place.

Every file the project writes (checkpoints, predicted masks, the decoded-sample cache,
metrics.jsonl, config.json, evaluation reports, plots, bench.json) goes through `atomic_write`: the data goes to a
hidden temporary file beside the target, is flushed to the disk (fsync), and is then renamed over
the target in one step (`os.replace`, atomic on POSIX and Windows). A reader sees the old file or
the new one, never half of one.
"""
import errno
import glob
import hashlib
import logging
import os
import threading
from contextlib import contextmanager
from pathlib import Path

log = logging.getLogger(__name__)
_writing, _writing_lock = set(), threading.Lock()  # the temporaries this process has open (atomic_write)
NAME_MAX = 255  # bytes in a file name where the file system does not say (ext4, XFS, Btrfs, ZFS, APFS)
PID_DIGITS = 10  # the longest process id a temporary's name leaves room for (32-bit; Linux's have at most 7 digits)
DIGEST_CHARS = 16  # hex digits of the hash that stands for a long name's middle: 64 bits
TAIL_BYTES = 32  # a long name's ending kept in its temporaries' names, so its suffix (_cutout.png) still shows


@contextmanager
def atomic_write(path, mode: str = "wb"):
    """Yield a file object for a temporary file beside `path`; when the block ends cleanly, it replaces `path`.

    On any exception (OSError for a full disk, KeyboardInterrupt...) the temporary file is removed
    and `path` keeps what it held before. The temporary (temporary_path) is hidden, differs between
    processes writing the same folder, and fits the file system wherever `path`'s own name does.

    Two writes of one `path` at once in one process (two threads, or a stream still open) would share
    that temporary: the second truncated the first's, the first then found it renamed away ("[Errno 2]
    cannot write") and its bytes had gone into the second's file (predict.py's submission named as a
    mask). The second write is refused instead, an OSError saying so, before it touches anything.
    """
    path = Path(path)
    tmp = temporary_path(path)
    key = os.path.join(os.path.realpath(tmp.parent), tmp.name)  # one key for a relative and an absolute name
    with _writing_lock:
        if key in _writing:
            raise OSError(errno.EBUSY, f"cannot write {path}: this process is writing it already "
                                       "(two outputs with one name)")
        _writing.add(key)
    try:
        with open(tmp, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        _fsync_folder(path.parent)
    except OSError as err:  # name the file the caller asked for, not the temporary one
        _discard(tmp)
        raise OSError(err.errno, f"cannot write {path}: {err.strerror or err}") from err
    except BaseException:
        _discard(tmp)
        raise
    finally:
        with _writing_lock:
            _writing.discard(key)


def _discard(tmp: Path):
    """Remove a failed write's temporary. A failure here is only logged: raised, it would replace the
    error that made the write fail (the one the user needs) with one about a hidden file."""
    try:
        tmp.unlink(missing_ok=True)
    except OSError as err:
        if err.errno != errno.ENAMETOOLONG:  # a name the system refuses was never created: nothing is left
            log.warning("could not remove the temporary file %s: %s", tmp, err.strerror or err)


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
    `.<key>.<pid>.tmp` (temporary_key) whose process no longer runs. Returns how many were removed.
    `path` may also be what temporary_target gives for a temporary.

    For the files a long run streams for minutes (predict.py's submission): a killed run's partial
    copy is otherwise left beside the target for good.
    """
    path, removed = Path(path), 0
    for key in {path.name, temporary_key(path)}:  # the name too: a temporary written before names were shortened
        for stale in path.parent.glob(f".{glob.escape(key)}.*.tmp"):
            pid = stale.name[len(key) + 2:-len(".tmp")]
            if pid.isdigit() and int(pid) != os.getpid() and not _running(int(pid)):
                stale.unlink(missing_ok=True)
                removed += 1
    return removed


def temporary_path(path) -> Path:
    """Where atomic_write writes `path` before renaming it: `.<key>.<pid>.tmp` beside it (temporary_key)."""
    path = Path(path)
    return path.with_name(f".{temporary_key(path)}.{os.getpid()}.tmp")


def temporary_key(path) -> str:
    """What stands for `path` in its temporaries' names: its name, or, where `.<name>.<pid>.tmp` could
    pass the folder's NAME_MAX (name_max), the name's start and its last TAIL_BYTES around a hash of
    the whole name, `<start>~<hash>~<end>`, so that a temporary never needs a longer name than the
    file it becomes can have.

    Why not always `.<name>.<pid>.tmp`: its 10 to 13 more bytes (by the pid's digits) left names over
    242 to 245 bytes unwritable where the file system takes 255, so a 244-character photo's
    `_cutout.png` (255 bytes) was never written. The choice assumes the longest pid, so every process
    makes the same one (and finds the others' stale temporaries); the ends are cut at whole UTF-8
    characters.
    """
    path = Path(path)
    name = os.fsencode(path.name)  # bytes: the limit counts them, and 100 'é' are 200
    room = name_max(path.parent) - len("..") - PID_DIGITS - len(".tmp")
    if len(name) <= room:
        return path.name
    digest = hashlib.sha256(name).hexdigest()[:DIGEST_CHARS].encode()
    keep = max(0, room - DIGEST_CHARS - 2)
    head, tail = keep - min(TAIL_BYTES, keep // 2), len(name) - min(TAIL_BYTES, keep // 2)
    while head > 0 and name[head] & 0xC0 == 0x80:  # 10xxxxxx: inside a character, whose start is cut off
        head -= 1
    while tail < len(name) and name[tail] & 0xC0 == 0x80:
        tail += 1
    return os.fsdecode(name[:head] + b"~" + digest + b"~" + name[tail:])


def temporary_target(tmp) -> Path:
    """The file an atomic_write temporary (`.<key>.<pid>.tmp`) was to become, beside it; for a long
    name, the key that stands for it (temporary_key), which ends as the file's name does and which
    remove_stale_temporaries accepts as it accepts the file."""
    tmp = Path(tmp)
    return tmp.with_name(tmp.name[1:].rsplit(".", 2)[0])


def name_max(folder) -> int:
    """The longest file name, in bytes, that `folder`'s file system takes (NAME_MAX where it cannot say).
    A folder not created yet is asked of through its nearest existing ancestor, where it will be created."""
    folder = _nearest_existing(folder)
    try:
        limit = os.pathconf(folder, "PC_NAME_MAX")
    except (AttributeError, OSError, ValueError):  # no pathconf (Windows), a file where a folder should be
        return NAME_MAX
    return limit if limit > 0 else NAME_MAX  # -1: no limit the system knows of


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
    existing = _nearest_existing(folder)
    if not existing.is_dir():
        return f"{existing} is not a folder"
    if not os.access(existing, os.W_OK | os.X_OK):
        return f"{existing} is not writable"
    return None


def _nearest_existing(folder) -> Path:
    """`folder` (absolute) if it exists, else its nearest ancestor that does."""
    existing = Path(folder).absolute()
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    return existing


def refuse_existing(path, overwrite: bool, why: str = ""):
    """FileExistsError naming `path` if it exists and `overwrite` is not set; `why` is added to the advice.

    A command replaces a file only when told to: it cannot know who made a file at its target (the
    repository's bench.json, a bundled model, a submission), and atomic_write's rename leaves no copy.
    Called before any work, so a refusal costs nothing.
    """
    if Path(path).exists() and not overwrite:
        raise FileExistsError(f"{path} exists already: pass --overwrite to replace it{why}")


def write_bytes(path, data: bytes):
    """Write `data` to `path` atomically."""
    with atomic_write(path) as f:
        f.write(data)


def write_text(path, text: str):
    """Write UTF-8 `text` to `path` atomically.

    Text UTF-8 cannot hold (a file name's non-UTF-8 bytes, which Python carries as lone surrogates:
    os.fsdecode) is an OSError naming `path`, as any other failure to write it is, so callers that
    handle "cannot write" (evaluate.py's reports) handle it too; before, UnicodeEncodeError named no file.
    """
    try:
        data = text.encode("utf-8")
    except UnicodeEncodeError as err:
        shown = text[max(0, err.start - 30):err.end + 10].encode("utf-8", "replace").decode()
        raise OSError(errno.EILSEQ, f"cannot write {path}: its text is not UTF-8 at {shown!r}") from err
    write_bytes(path, data)


def shown(text) -> str:
    """`text` (a path, or a message naming one) as it can be printed: the bytes of a file name that are
    not UTF-8, which Python carries as lone surrogates (os.fsdecode), become U+FFFD, as `ls` shows '?'.
    Only to show: the names themselves keep their bytes, so every output is named as its photo."""
    text = str(text)
    try:
        return text.encode("utf-8", "surrogateescape").decode("utf-8", "replace")
    except UnicodeEncodeError:  # a surrogate no file system byte gives (from a Windows name): replaced too
        return text.encode("utf-8", "replace").decode("utf-8")
