"""Audio for the ONNX runtime without PyTorch: reading, down-mixing and resampling in numpy.

:func:`read_audio` does what :class:`~earlyexit_brain.inference.EarlyExitASR` does with
SpeechBrain's ``load_audio``: soundfile decodes the file to float32, every channel is
resampled to the model's rate with torchaudio's windowed-sinc resampler (Hann window,
6 zero crossings, roll-off 0.99; :func:`resample` computes the same kernel and
convolution in numpy), and the channels are averaged.
"""

import math
import os
from functools import lru_cache
from typing import Optional, Tuple

import numpy as np
import soundfile as sf


@lru_cache(maxsize=16)
def _sinc_kernel(orig: int, new: int, lowpass_filter_width: int = 6, rolloff: float = 0.99) -> Tuple[np.ndarray, int]:
    """torchaudio's ``_get_sinc_resample_kernel`` (``sinc_interp_hann``) for rates already
    divided by their gcd: ``(new, 2 * width + orig)`` float32 kernels and ``width``."""
    base = min(orig, new) * rolloff
    width = math.ceil(lowpass_filter_width * orig / base)
    idx = np.arange(-width, width + orig, dtype=np.float64)[None, :] / orig
    # torchaudio computes these offsets in float32 before adding the float64 positions
    t = (np.arange(0, -new, -1, dtype=np.float32)[:, None] / np.float32(new)).astype(np.float64) + idx
    t = np.clip(t * base, -lowpass_filter_width, lowpass_filter_width)
    window = np.cos(t * math.pi / lowpass_filter_width / 2) ** 2
    t = t * math.pi
    with np.errstate(invalid="ignore", divide="ignore"):
        kernels = np.where(t == 0, 1.0, np.sin(t) / t)
    kernels = kernels * window * (base / orig)
    return kernels.astype(np.float32), width


def resample(signal: np.ndarray, orig_freq: int, new_freq: int) -> np.ndarray:
    """Resample ``(S,)`` or ``(S, C)`` float32 audio from ``orig_freq`` to ``new_freq`` Hz.

    The same windowed-sinc filter and output length as ``torchaudio.functional.resample``
    with its defaults (outputs equal to about 1e-6).

    Example
    -------
    >>> resample(np.ones(8000, dtype=np.float32), 8000, 16000).shape
    (16000,)
    """
    orig_freq, new_freq = int(orig_freq), int(new_freq)
    if orig_freq == new_freq:
        return signal
    gcd = math.gcd(orig_freq, new_freq)
    orig, new = orig_freq // gcd, new_freq // gcd
    kernels, width = _sinc_kernel(orig, new)
    flat = signal.ndim == 1
    channels = signal[:, None] if flat else signal
    length = channels.shape[0]
    padded = np.pad(channels.T.astype(np.float32), ((0, 0), (width, width + orig)))
    size = kernels.shape[1]
    steps = (padded.shape[1] - size) // orig + 1
    windows = np.lib.stride_tricks.sliding_window_view(padded, size, axis=1)[:, ::orig][:, :steps]
    out = (windows @ kernels.T).reshape(channels.shape[1], -1)  # (C, steps * new), interleaved
    out = out[:, : math.ceil(new * length / orig)]
    return out[0] if flat else out.T


def read_audio(path: str, sample_rate: int) -> np.ndarray:
    """Decode ``path``, resample it to ``sample_rate`` and average its channels: ``(S,)`` float32.

    A ValueError names the file when it is missing or cannot be decoded.
    """
    if not os.path.isfile(path):
        raise ValueError(f"{path}: no such audio file")
    try:
        data, rate = sf.read(path, dtype="float32", always_2d=True)
    except Exception as err:  # soundfile raises several types
        raise ValueError(f"{path}: cannot be decoded as audio ({err})") from err
    data = resample(data, int(rate), int(sample_rate))
    return data.mean(axis=1, dtype=np.float32) if data.shape[1] > 1 else data[:, 0]


def signal_problem(signal: np.ndarray, min_samples: int, sample_rate: int) -> Optional[str]:
    """Why a mono waveform at the model's rate cannot be transcribed, or None (as
    :meth:`EarlyExitASR.signal_problem <earlyexit_brain.inference.EarlyExitASR.signal_problem>`):
    empty, NaN or infinite samples, or shorter than the model's ``min_samples``."""
    if signal.size == 0:
        return "the audio is empty (no samples)"
    if not bool(np.isfinite(signal).all()):
        return "the audio contains NaN or infinite samples"
    if signal.size < min_samples:
        return (
            f"the audio is too short: {signal.size} samples, the model needs at least "
            f"{min_samples} ({1000.0 * min_samples / sample_rate:.0f} ms)"
        )
    return None
