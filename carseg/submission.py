"""Kaggle's submission file: img,rle_mask rows streamed to disk (gzip when the name ends in .gz), one
shard per process under torchrun merged into the file one process writes, and a killed run's shards
removed.

The rows' masks are run-length encoded by carseg/rle.py; predict.py decides what goes in them.
"""
import csv
import glob
import gzip
import io
import logging
import os
import zlib
from contextlib import contextmanager
from pathlib import Path

from carseg import atomic, distributed

log = logging.getLogger(__name__)
SUBMISSION_HEADER = ("img", "rle_mask")  # Kaggle's columns
# gzip levels of a .gz submission: zlib's default 6, which on 150 Carvana rows compressed to 42.53 % against
# level 9's 42.48 % at 12.0 MB/s against 7.6; its shards under torchrun at 1, as the merge reads them once.
SUBMISSION_LEVEL, SHARD_LEVEL = 6, 1


@contextmanager
def submission_rows(path, world: distributed.World | None = None):
    """A csv writer for Kaggle's img,rle_mask rows, streamed to `path` through _text_file (gzip when it
    ends in .gz); None without a path. Under torchrun, to this rank's shard of `path` (shard_path),
    without the header line: rank 0 merges the shards (merge_submission).

    Rows go to disk as masks are made: holding them all until the end cost 8.7 kB per full-size
    Carvana mask on average (measured on 2,000), about 0.9 GB for the 100,064 photos of Kaggle's test set.
    A run that yields no row writes no file (see _NoRows); a shard is always written, as the merge needs them all.
    """
    if not path:
        yield None
        return
    world = world or distributed.SOLO
    compressed = _compressed(path)
    if world.distributed:
        target, level = shard_path(path, world.rank, world.size), SHARD_LEVEL
    else:
        target, level = path, SUBMISSION_LEVEL
    try:
        with _text_file(target, compressed, level) as text:
            rows = _CountingRows(csv.writer(text, lineterminator="\n"))
            if not world.distributed:
                rows.writer.writerow(SUBMISSION_HEADER)
            yield rows
            if not rows.count and not world.distributed:
                raise _NoRows
    except _NoRows:
        _log_no_rows(path)


def is_submission(path) -> bool:
    """Whether the file at `path` begins with Kaggle's header line img,rle_mask (gzip-decoded when the
    name ends in .gz), as every submission this tool writes does: the only kind of existing file that
    predict.py --skip-existing may rebuild without --overwrite. A file that cannot be read (or
    decompressed) is not one. Call it on a regular file only: opening a named pipe waits for a writer."""
    header = ",".join(SUBMISSION_HEADER).encode()
    try:
        with (gzip.open if _compressed(path) else open)(path, "rb") as f:
            line = f.readline(len(header) + 2)  # the header and its line end; no more of a large file
    except (OSError, EOFError, zlib.error):  # gzip.BadGzipFile is an OSError; EOFError: a cut gzip stream
        return False
    return line.rstrip(b"\r\n") == header


def refuse_existing_submission(path, overwrite: bool, skip_existing: bool):
    """FileExistsError naming `path` if it exists and may not be replaced: predict.py's --overwrite
    replaces any file; --skip-existing (which rebuilds every row, from the masks) only a submission
    (is_submission), so that it never replaces a user's own file. The advice names only what would work.
    Called before any work, so a refusal costs nothing."""
    path = Path(path)
    if overwrite or not os.path.lexists(path):
        return
    if not path.is_file():
        raise FileExistsError(f"{path} exists already and is not a regular file; give another --submission")
    if is_submission(path):
        if skip_existing:
            return
        raise FileExistsError(f"{path} exists already: pass --overwrite to replace it (or --skip-existing to "
                              "finish the run that wrote it), or give another --submission")
    header = ",".join(SUBMISSION_HEADER)
    alone = ", which --skip-existing alone never replaces" if skip_existing else ""
    raise FileExistsError(f"{path} exists already and is not a submission (its first line is not {header}){alone}: "
                          "pass --overwrite to replace it, or give another --submission")


class _CountingRows:
    """A csv writer that counts the rows given to it."""

    def __init__(self, writer):
        self.writer, self.count = writer, 0

    def writerow(self, row):
        self.count += 1
        return self.writer.writerow(row)


class _NoRows(Exception):
    """Raised inside a submission's atomic write to discard it: the run yielded no row (every photo
    failed, or none has a name the CSV can hold). A header-only file would replace a user's earlier
    submission with nothing, and it is no submission either."""


def _log_no_rows(path):
    kept = "the existing file is kept as it was" if Path(path).exists() else "no file is written"
    log.error("no submission row: no photo gave a row for %s, so %s", atomic.shown(path), kept)


@contextmanager
def _text_file(path, compressed: bool, level: int = SUBMISSION_LEVEL):
    """UTF-8 text streamed into a temporary file beside `path` (gzip at `level` if `compressed`) that
    replaces `path` when the block ends cleanly (atomic.atomic_write): a killed run leaves no `path`."""
    atomic.remove_stale_temporaries(path)  # a killed run's partial rows; --skip-existing rebuilds them
    with atomic.atomic_write(path, "wb") as raw:
        # The gzip header names the target, not the temporary: the bytes do not depend on the process id.
        stream = gzip.GzipFile(Path(path).name, "wb", level, raw, mtime=0) if compressed else raw
        text = io.TextIOWrapper(stream, encoding="utf-8", newline="")
        yield text
        text.flush()
        text.detach()  # flushed, and `raw` left open for atomic_write to fsync and rename
        if stream is not raw:
            stream.close()  # the gzip trailer; GzipFile does not close the file it was given


def _compressed(submission) -> bool:
    return str(submission).endswith(".gz")


def shard_path(submission, rank: int, size: int) -> Path:
    """Where rank `rank` of `size` streams its rows of `submission`: hidden, beside it, e.g.
    .sub.csv.gz.rank1-of-4 (gzip, without the header, when the submission is .gz)."""
    submission = Path(submission)
    return submission.with_name(f".{submission.name}.rank{rank}-of-{size}")


def merge_submission(submission, size: int):
    """Write `submission` from the shards of its `size` ranks: the header, then each shard's rows in rank
    order, the bytes one process writes for the same inputs (none if no shard holds a row); then delete the shards.

    Raises FileNotFoundError naming a missing shard, before writing anything.
    """
    shards = [shard_path(submission, rank, size) for rank in range(size)]
    missing = [str(shard) for shard in shards if not shard.is_file()]
    if missing:
        raise FileNotFoundError(f"cannot merge {submission}: no shard {', '.join(missing)}")
    compressed = _compressed(submission)
    try:
        with _text_file(submission, compressed) as text:
            csv.writer(text, lineterminator="\n").writerow(SUBMISSION_HEADER)
            copied = 0
            for shard in shards:
                with (gzip.open if compressed else open)(shard, "rt", encoding="utf-8", newline="") as part:
                    while chunk := part.read(1 << 20):
                        copied += text.write(chunk)
            if not copied:  # as one process: no row, no file (submission_rows)
                raise _NoRows
    except _NoRows:
        _log_no_rows(submission)
    for shard in shards:
        shard.unlink()


def write_row(rows, path: Path, rle: str, failures: dict):
    """The photo's submission row: its file name as the img column (csv quotes names with commas).

    A name that is not UTF-8 (a Latin-1 'café.jpg' from an old camera card) gets no row, and a failure
    saying why; its mask is written. The CSV is UTF-8 text: escaped, or with a replacement character,
    the name would be another name than the file's, matching no image, and Kaggle's test names are ASCII.
    """
    try:
        path.name.encode("utf-8")
    except UnicodeEncodeError:
        failures[path] = (f"{path}: mask written, but no submission row: the file name is not UTF-8, which "
                          "the CSV's img column cannot hold unchanged; rename the photo")
        return
    rows.writerow((path.name, rle))


def remove_shards(submission):
    """Delete the shard files a killed run left beside `submission`, of any number of processes, and their
    temporaries (_text_file removes the submission's own)."""
    submission = Path(submission)
    pattern = f"{glob.escape(submission.name)}.rank*-of-*"
    shards = set(submission.parent.glob("." + pattern))
    shards |= {atomic.temporary_target(tmp) for tmp in submission.parent.glob(f"..{pattern}.tmp")}
    for shard in shards:
        shard.unlink(missing_ok=True)
        atomic.remove_stale_temporaries(shard)
