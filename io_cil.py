"""Files in and out, for every module: the one-line error a user sees (InputError), the line for a
failed file operation, atomic writers, and reading back what the tool wrote. No TensorFlow and
no images here.

Every file the tool writes is written under a temporary name of its own (temporary_name) and
renamed into place, so a reader, or a run killed mid-write, sees the old file or the new one,
never half of one. A file the tool wrote so is read back with one "damaged" message naming it
and the fix, where a value in it turns out not to be what the tool writes.
"""

import contextlib
import errno
import json
import os
import secrets
from pathlib import Path

import imageio.v3
import numpy as np

# errno -> what a user can do about a file that cannot be written or read
OS_ERROR_FIXES = {
    errno.ENOSPC: "no space left on the device; free some (df -h) and run again",
    errno.EDQUOT: "disk quota exceeded; free some space or choose a folder with quota left",
    errno.EROFS: "read-only file system; choose a writable folder",
    errno.EACCES: "permission denied; make it writable or choose another folder",
    errno.EPERM: "not permitted; make it writable or choose another folder",
    errno.ENAMETOOLONG: "name too long for the file system; choose a shorter path",
    errno.ENOTDIR: "a part of the path is a file, not a folder; choose another path",
    errno.EISDIR: "is a folder, not a file; choose another path",
}
SHOWN_PATH_CHARACTERS = 160  # a path longer than this is shown shortened in an error line


class InputError(Exception):
    """A problem with the user's files or options, reported as one line without a traceback."""


def os_error_line(error, path=None):
    """One line for a failed file operation: the file, what happened, what to do."""
    name = str(error.filename if error.filename is not None else path or "?")
    if len(name) > SHOWN_PATH_CHARACTERS:
        name = f"{name[:SHOWN_PATH_CHARACTERS // 2]}...{name[-SHOWN_PATH_CHARACTERS // 2:]}"
    fix = OS_ERROR_FIXES.get(error.errno, f"{error.strerror or error}")
    return f"{name}: {fix}"


def damaged(file, what, fix):
    """The InputError for a file of the tool whose content is not what the tool wrote."""
    return InputError(f"{file}: damaged ({what}); {fix}")


def writable(folder, what):
    """InputError unless this process may create files in `folder` (the `what` of a run)."""
    if not os.access(folder, os.W_OK | os.X_OK):
        raise InputError(f"{folder}: the {what} is not writable; make it writable or choose "
                         "another folder")


def temporary_name(path, kind="partial"):
    """A name beside `path` for writing it before it is renamed into place: a dot first (file
    finders skip it), the process and a random token (two writers never share one), the
    suffix kept (writers recognise the format)."""
    path = Path(path)
    return path.with_name(f".{path.stem}.{os.getpid()}-{secrets.token_hex(3)}.{kind}"
                          f"{path.suffix}")


def write_atomically(path, write):
    """Call write(temporary_path), then rename it over `path`; InputError naming the file when
    the write fails (a full disk, a read-only folder)."""
    path = Path(path)
    temporary = temporary_name(path)
    try:
        write(temporary)
        os.replace(temporary, path)
    except OSError as error:
        raise InputError(os_error_line(error, path)) from None
    finally:
        with contextlib.suppress(OSError):         # gone already, or its folder unreadable
            temporary.unlink(missing_ok=True)
    return path


def write_text(path, text):
    """A text file written atomically."""
    return write_atomically(path, lambda p: p.write_text(text))


def write_json(path, data):
    return write_text(path, json.dumps(data, indent=2) + "\n")


def write_json_once(path, data):
    """Write `path` only if no file is there, whole or not at all, even when several processes
    try at once; returns whether this call wrote it."""
    path = Path(path)
    temporary = temporary_name(path)
    try:
        temporary.write_text(json.dumps(data, indent=2) + "\n")
        os.link(temporary, path)               # fails if the file exists, atomically
        return True
    except FileExistsError:
        return False
    finally:
        with contextlib.suppress(OSError):
            temporary.unlink(missing_ok=True)


def write_png(path, array):
    """An image file written atomically; encoded in memory first, so a write that fails (a full
    disk) is one OSError of the write itself, not of an encoder left half-open."""
    encoded = imageio.v3.imwrite("<bytes>", np.asarray(array), extension=Path(path).suffix)
    return write_atomically(path, lambda p: p.write_bytes(encoded))


def unique_keys(pairs):
    """json.loads' object_pairs_hook for files people write (grids, configs): the object, or
    ValueError naming a key given twice, whose first value JSON would drop without a word."""
    seen = set()
    for key, _ in pairs:
        if key in seen:
            raise ValueError(f"key {key!r} is given twice; keep one value")
        seen.add(key)
    return dict(pairs)


def read_json(file, fix="restore it from a copy, or delete it"):
    """The JSON object in `file`, None when there is no file; InputError naming the file and
    the `fix` when it is damaged (cut short, hand-edited, not an object)."""
    file = Path(file)
    if not file.is_file():
        return None
    try:
        content = json.loads(file.read_text())
    except (ValueError, UnicodeDecodeError) as error:
        raise damaged(file, f"not readable JSON: {str(error)[:80]}", fix) from None
    if not isinstance(content, dict):
        raise damaged(file, "not a JSON object", fix)
    return content
