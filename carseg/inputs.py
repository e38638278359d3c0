"""The photos a command is given: files, folders and glob patterns turned into the photo paths to read,
each under the name it was given, with a reason for every input that names no photo.

A path that exists is used as it is, whatever its name holds; only one that does not is read as a
pattern. predict.py's outputs and submission rows are named after these paths.
"""
import errno
import glob
import os
import stat
from pathlib import Path

from carseg.images import IMAGE_EXTENSIONS


def collect_inputs(inputs, recursive=False):
    """Expand files, folders and glob patterns into image paths; returns (paths, problems).

    A path that exists is used as given, whatever its name holds (brackets, '*', '?', spaces): a folder
    "shoot[2024]" or a photo "car[1].png" is that file, not a pattern. Only a path that does not exist
    is read as a pattern (matches).

    Each path keeps its own name (_entries): a symbolic link "link.jpg" to "sp ace.jpg" is an input of
    its own, whose outputs and submission row are named link; only one name given twice (a folder and a
    photo in it) is predicted once. An entry that is no regular file (a dangling link, a named pipe) is
    a problem with its reason, given by name or found in a folder alike, as an unreadable photo is.
    """
    paths, problems = [], []
    for item in inputs:
        named = matches(item, recursive)
        if not named:
            problems.append(_no_match(item))
        for path in named:
            found = [path]
            if path.is_dir():
                found = _folder_images(path, recursive)
                if not found:
                    problems.append(f"{path}: folder has no images ({', '.join(sorted(IMAGE_EXTENSIONS))})")
            for image in found:
                problem = _not_a_photo(image)
                if problem:
                    problems.append(problem)
                else:
                    paths.append(image)
    return list(dict.fromkeys(_entries(paths))), problems


def _entries(paths) -> list:
    """Each path as the name it is in its folder: absolute, the folder's symbolic links resolved (one
    call per folder), the last name kept as given even where it is a link."""
    folders = {}
    for path in paths:
        if path.parent not in folders:
            folders[path.parent] = path.parent.resolve()
    return [folders[path.parent] / path.name for path in paths]


def _not_a_photo(path: Path) -> str | None:
    """Why `path` cannot be read as a photo, said without opening it (a named pipe would block the read
    for ever); None for a regular file, or a link to one."""
    try:
        mode = path.stat().st_mode
    except OSError as err:
        missing = "does not exist" if err.errno == errno.ENOENT else f"cannot be read ({err.strerror or err})"
        if path.is_symlink():
            return f"{path}: a symbolic link to {os.readlink(path)}, which {missing}"
        return f"{path}: {missing}"
    if stat.S_ISREG(mode):
        return None
    kinds = ((stat.S_ISDIR, "a folder"), (stat.S_ISFIFO, "a named pipe"), (stat.S_ISSOCK, "a socket"),
             (stat.S_ISCHR, "a device"), (stat.S_ISBLK, "a device"))
    kind = next((name for test, name in kinds if test(mode)), "not a regular file")
    return f"{path}: {kind}, not a photo file"


def matches(item: str, recursive: bool) -> list:
    """The paths one input names: itself if it exists; else, if it holds glob characters, the pattern's matches.

    "shoot[2024]/*.png", a pattern inside a folder whose own name holds glob characters, matches nothing
    as a pattern ([2024] is one character of 2, 0 or 4); the user means the folder itself. So a pattern
    that matches nothing is tried again with its longest existing start taken literally (glob.escape).
    Why only then: where the pattern matches (a folder shoot2/), the shell would have expanded it the
    same way, and it passes a word on unchanged, as here, only when it matched nothing.
    """
    if os.path.lexists(item):  # a dangling link too: _not_a_photo says what it is
        return [Path(item)]
    if not glob.has_magic(item):
        return []
    matches = glob.glob(item, recursive=recursive)
    start, rest = _existing_start(item)
    if not matches and start:
        matches = glob.glob(os.path.join(glob.escape(start), *rest), recursive=recursive)
    return [Path(match) for match in sorted(matches)]


def _existing_start(path: str) -> tuple:
    """(the longest start of `path` that exists on disk, or '', the list of the parts after it)."""
    start, rest = path, []
    while start and not os.path.exists(start):
        parent, part = os.path.split(start)
        if parent == start:  # a root that does not exist (a missing drive)
            return "", [path]
        start, rest = parent, [part, *rest]
    return start, rest


def _no_match(item: str) -> str:
    """Why an input names no file. "shoot[2024]/gone.png" is a missing file, not a pattern: only the
    part after what exists can be one."""
    _, rest = _existing_start(item)
    if glob.has_magic(os.path.join(*rest)):
        return f"{item}: no such file, and no file matches it as a pattern"
    return f"{item}: does not exist"


def _folder_images(folder: Path, recursive: bool) -> list:
    """The entries of `folder` (and below, if `recursive`) named as images, sorted; hidden ones and
    folders left out. The folder is the base of Path.rglob, not part of its pattern, so glob characters
    in its name are taken literally. Not only regular files: a dangling link or a named pipe called
    x.jpg is listed, for collect_inputs to report, as it is given by name (before, a scan skipped it
    silently and the run ended with exit status 0)."""
    return sorted(p for p in (folder.rglob("*") if recursive else folder.iterdir())
                  if p.suffix.lower() in IMAGE_EXTENSIONS and not p.name.startswith(".") and not p.is_dir())
