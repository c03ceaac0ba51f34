"""Small helpers shared by the library and the recipes."""

import os
import re
from typing import List, Optional

import torch


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


def frame_mask(log_probs: torch.Tensor, lengths: Optional[torch.Tensor]) -> torch.Tensor:
    """``(B, T)`` float mask of valid frames."""
    frames = valid_frames(log_probs, lengths)
    return (~padding_mask(frames, log_probs.shape[1])).to(log_probs.dtype)


_REPO_ID = re.compile(
    r"^[A-Za-z0-9](?:[A-Za-z0-9._-]{0,94}[A-Za-z0-9])?/"
    r"[A-Za-z0-9](?:[A-Za-z0-9._-]{0,94}[A-Za-z0-9])?$"
)


def looks_like_repo_id(text: str) -> bool:
    """Whether ``text`` has the form of a Hub model id ``OWNER/NAME``."""
    return bool(isinstance(text, str) and _REPO_ID.match(text) and ".." not in text and "--" not in text)


def uses_decoders(hparams) -> bool:
    """Whether a recipe's hyperparameters (a loaded or raw mapping) give the exits attention
    decoders (a top-level ``decoders`` entry): the one place that answers it for
    hyperparameters; a model answers it with ``has_decoders``."""
    return "decoders" in hparams
