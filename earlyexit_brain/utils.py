"""Small helpers shared by the library and the recipes."""

import contextlib
import os
import shutil
import tempfile
from typing import Iterator, List, Optional

import torch


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
def atomic_folder(folder: str, prefix: str = ".tmp-") -> Iterator[str]:
    """Build a folder beside ``folder`` (the block writes into the yielded path) and move it
    into place, replacing any previous one, only when the block succeeds; a crash never
    leaves a half-written ``folder``. The folder gets the previous one's permissions, or
    the usual ones under the umask."""
    folder = os.path.abspath(folder)
    parent = os.path.dirname(folder)
    os.makedirs(parent, exist_ok=True)
    mode = _mode_for(folder, 0o777)
    tmp = tempfile.mkdtemp(prefix=prefix, dir=parent)
    try:
        yield tmp
        os.chmod(tmp, mode)  # mkdtemp's 0700 would lock a group out of the folder
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


def rss_bytes() -> Optional[int]:
    """The process's current resident set size in bytes (Linux ``/proc``); None elsewhere."""
    try:
        with open("/proc/self/statm") as fin:
            return int(fin.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        return None


def tokens_to_text(tokenizer, ids) -> str:
    """Decode CTC output ids with a SentencePieceProcessor.

    A CTC layer may have more outputs than the tokenizer has pieces (e.g. 32
    outputs for 29 characters); ids without a piece are dropped instead of
    making SentencePiece raise.
    """
    size = tokenizer.vocab_size()
    ids = [int(i) for i in ids if 0 <= int(i) < size]
    return tokenizer.decode_ids(ids) if ids else ""


def tokenizer_pieces(tokenizer) -> List[str]:
    """Every piece of a SentencePieceProcessor, by id."""
    return [tokenizer.id_to_piece(i) for i in range(tokenizer.vocab_size())]


def valid_frames(x: torch.Tensor, lengths: Optional[torch.Tensor]) -> torch.Tensor:
    """Valid frames ``(B,)`` of a padded ``(B, T, ...)`` batch from SpeechBrain relative lengths.

    ``round(length * T)`` as SpeechBrain computes it, at least 1 frame.
    """
    t = x.shape[1]
    if lengths is None:
        return torch.full((x.shape[0],), t, dtype=torch.long, device=x.device)
    return torch.round(lengths.to(x.device) * t).long().clamp(1, t)


def padding_mask(frames: torch.Tensor, t: int) -> torch.Tensor:
    """``(B, t)`` bool mask, True on the frames beyond each utterance's ``frames``."""
    return torch.arange(t, device=frames.device)[None, :] >= frames[:, None]
