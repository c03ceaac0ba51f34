"""Writing files and folders safely: atomically, with their permissions, and only where
this package may write.

Every folder a command of this package creates and later writes into, replaces or
deletes from (an experiment's ``output_folder``, the synthetic corpus, a real corpus's
manifest folder, an exported inference folder, a Hub folder) carries a small marker
file, :data:`OWNER_MARKER`, naming what it is (:func:`claim_folder`). A command given a
folder that is not empty and has no marker of the same kind refuses it with an error
naming the key and the folder (:class:`NotOurFolderError`): no command deletes or
overwrites what it did not make. Folders made by versions before the marker are
recognised by the files only they write (``legacy``).
"""

import contextlib
import json
import os
import shutil
import tempfile
from typing import Iterator, Optional, Sequence

#: The marker file in every folder this package owns: JSON ``{"kind": ...}``.
OWNER_MARKER = ".earlyexit_brain.json"


class NotOurFolderError(ValueError):
    """A folder or file that this package did not create would be written into or replaced."""


def _mode_for(path: str, new: int = 0o666) -> int:
    """The permission bits for what is written at ``path``: those of the file or folder it
    replaces, else ``new`` under the process's umask (what ``open``, with 0o666, or
    ``os.makedirs``, with 0o777, would give), not the private mode of a temporary one."""
    try:
        return os.stat(path).st_mode & 0o7777
    except OSError:
        return new & ~current_umask()


def current_umask() -> int:
    """The process's umask, read from ``/proc/self/status`` where Linux gives it (setting
    and restoring it, the only portable way, would race with other threads' files)."""
    try:
        with open("/proc/self/status") as fin:
            for line in fin:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    umask = os.umask(0)
    os.umask(umask)
    return umask


def atomic_write_text(path: str, text: str) -> None:
    """Write ``text`` to ``path`` so that readers never see a partial file.

    The file keeps the permissions of the one it replaces (a new one gets the usual
    ones under the umask), not the private mode of the temporary file it is written to
    first, so an experiment folder shared with a group stays readable."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    mode = _mode_for(path)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-", suffix=os.path.basename(path))
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "w") as fout:
            fout.write(text)
            fout.flush()
            os.fsync(fout.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


@contextlib.contextmanager
def atomic_folder(folder: str, kind: str, key: str, prefix: str = ".tmp-", legacy: Sequence[str] = ()) -> Iterator[str]:
    """Build a folder beside ``folder`` (the block writes into the yielded path) and move it
    into place, replacing any previous one, only when the block succeeds; a crash never
    leaves a half-written ``folder``. The folder gets the previous one's permissions, or
    the usual ones under the umask, and is marked as ``kind``. An existing ``folder``
    that this package did not make as ``kind`` is refused (:class:`NotOurFolderError`
    naming ``key``) before the block runs, and checked again before it is replaced."""
    folder = os.path.abspath(folder)
    check_replaceable(folder, kind, key, legacy)
    parent = os.path.dirname(folder)
    os.makedirs(parent, exist_ok=True)
    mode = _mode_for(folder, 0o777)
    tmp = tempfile.mkdtemp(prefix=prefix, dir=parent)
    try:
        yield tmp
        _mark(tmp, kind)
        os.chmod(tmp, mode)  # mkdtemp's 0700 would lock a group out of the folder
        check_replaceable(folder, kind, key, legacy)  # it may have appeared meanwhile
        old = None
        if os.path.exists(folder):
            old = tempfile.mkdtemp(prefix=prefix + "old-", dir=parent)
            os.replace(folder, os.path.join(old, "folder"))
        os.replace(tmp, folder)
        if old:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def folder_kind(folder: str) -> Optional[str]:
    """The kind recorded in ``folder``'s :data:`OWNER_MARKER`, or None without a readable one."""
    try:
        with open(os.path.join(folder, OWNER_MARKER)) as fin:
            kind = json.load(fin).get("kind")
    except (OSError, ValueError, AttributeError):
        return None
    return kind if isinstance(kind, str) else None


def _mark(folder: str, kind: str) -> None:
    atomic_write_text(
        os.path.join(folder, OWNER_MARKER), json.dumps({"kind": kind, "written_by": "earlyexit_brain"}) + "\n"
    )


def owned(folder: str, kind: str, legacy: Sequence[str] = ()) -> bool:
    """Whether ``folder`` (an existing folder) may be written into or replaced as ``kind``:
    it holds no file (empty folders only, such as the ``save/`` that building a recipe's
    checkpointer creates), or its marker says ``kind``, or (no marker) it holds one of the
    ``legacy`` files that only this package's earlier versions wrote there (a name
    ending in "/" is a folder that must not be empty)."""
    if not _holds_files(folder):
        return True
    if os.path.isfile(os.path.join(folder, OWNER_MARKER)):
        return folder_kind(folder) == kind
    return any(_legacy_present(os.path.join(folder, name)) for name in legacy)


def _holds_files(folder: str) -> bool:
    """Whether any file (or link) lies in ``folder`` or below; stops at the first."""
    for root, dirs, names in os.walk(folder):
        if names or any(os.path.islink(os.path.join(root, d)) for d in dirs):
            return True
    return False


def _legacy_present(path: str) -> bool:
    """A legacy file exists; a name ending in "/" is a folder that must not be empty."""
    if path.endswith("/"):
        return os.path.isdir(path) and bool(os.listdir(path))
    return os.path.exists(path)


def _refusal(folder: str, kind: str, key: str) -> NotOurFolderError:
    found = folder_kind(folder)
    why = (
        f"it was made for another purpose ({found})"
        if found
        else f"it is not empty and was not made by earlyexit_brain (it has no {OWNER_MARKER})"
    )
    return NotOurFolderError(
        f"{key}: {folder}: refusing to write into it, replace it or delete anything in it as "
        f"a {kind.replace('_', ' ')}: {why}. Give a new or empty folder."
    )


def claim_folder(folder: str, kind: str, key: str, legacy: Sequence[str] = ()) -> str:
    """Create ``folder`` (or accept an existing one this package made as ``kind``) and mark
    it; a folder that is not ours raises :class:`NotOurFolderError` naming ``key``.
    Returns the absolute path."""
    folder = os.path.abspath(folder)
    check_replaceable(folder, kind, key, legacy)
    os.makedirs(folder, exist_ok=True)
    if folder_kind(folder) != kind:
        _mark(folder, kind)
    return folder


def check_replaceable(folder: str, kind: str, key: str, legacy: Sequence[str] = ()) -> None:
    """Raise :class:`NotOurFolderError` unless ``folder`` is absent or may be replaced as ``kind``."""
    folder = os.path.abspath(folder)
    if os.path.exists(folder) and not os.path.isdir(folder):
        raise NotADirectoryError(f"{key}: {folder} exists and is not a folder")
    if os.path.isdir(folder) and not owned(folder, kind, legacy):
        raise _refusal(folder, kind, key)


def check_overwritable_file(path: str, key: str, ours) -> None:
    """Raise :class:`NotOurFolderError` if ``path`` exists and ``ours(path)`` (a check of its
    content) says this package did not write it."""
    if os.path.exists(path) and (os.path.isdir(path) or not ours(path)):
        raise NotOurFolderError(
            f"{key}: {path} exists and was not written by this command; refusing to overwrite "
            f"it. Give a new file name, or remove it yourself."
        )


def is_own_json(path: str, field: str) -> bool:
    """Whether ``path`` is a JSON object with the top-level ``field`` (what a command of this
    package writes), for :func:`check_overwritable_file`."""
    try:
        with open(path) as fin:
            data = json.load(fin)
    except (OSError, ValueError):
        return False
    return isinstance(data, dict) and field in data
