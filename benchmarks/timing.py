"""What every section shares: the two encoder configurations, the random-weight inference model, and timing.

Timing is wall-clock with the device synchronised around each call (:func:`timed`); variants compared
side by side are timed in rotation (:func:`time_in_rotation`), so that machine noise hits them alike.
"""

import os
import platform
import statistics
import time

import torch
from speechbrain.lobes.features import Fbank
from speechbrain.processing.features import InputNormalization

from earlyexit_brain.models.conformer import EarlyExitConformerEncoder
from earlyexit_brain.models.exits import CTCExitHeads
from earlyexit_brain.models.pipeline import EarlyExitCTCModel

CONFIGS = {
    # name: (encoder kwargs, early-exit layers, single-exit layers)
    "default (6 layers, d 144)": (
        dict(num_layers=6, d_model=144, nhead=4, d_ffn=576, kernel_size=15, frontend_channels=(32, 32)),
        [2, 4, 6],
        [6],
    ),
    "paper size (12 layers, d 256)": (
        dict(num_layers=12, d_model=256, nhead=8, d_ffn=2048, kernel_size=31),
        [2, 4, 6, 8, 10, 12],
        [12],
    ),
}


def sync(device):
    """Wait for the device's queued work (CUDA); nothing on the CPU."""
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, device):
    """Seconds of one call of ``fn``, the device synchronised before and after."""
    sync(device)
    start = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - start


def time_in_rotation(variants, repeats, warmup, device):
    """Seconds of each call of every callable in ``variants``, ``warmup`` rounds left out;
    the order rotates from round to round, so that machine noise hits them alike."""
    names = list(variants)
    times = {key: [] for key in names}
    for i in range(warmup + repeats):
        for key in names[i % len(names) :] + names[: i % len(names)]:
            t = timed(variants[key], device)
            if i >= warmup:
                times[key].append(t)
    return times


def stats(values):
    """Median, min and max of ``values`` (seconds) in milliseconds."""
    return {"median_ms": 1000 * statistics.median(values), "min_ms": 1000 * min(values), "max_ms": 1000 * max(values)}


def build_inference_model(name, device, vocab=32, seconds=2.0):
    """Random-weight EarlyExitCTCModel of a configuration, in eval mode on ``device``."""
    enc_kwargs, ee_layers, _ = CONFIGS[name]
    torch.manual_seed(0)
    enc = EarlyExitConformerEncoder(input_size=80, exit_layers=ee_layers, dropout=0.0, **enc_kwargs)
    heads = CTCExitHeads(enc_kwargs["d_model"], vocab, len(ee_layers))
    normalize = InputNormalization(norm_type="global")
    fbank = Fbank(n_mels=80)
    with torch.no_grad():
        normalize(fbank(0.05 * torch.randn(1, int(seconds * 16000))), torch.ones(1))  # statistics
    return EarlyExitCTCModel(fbank, normalize, enc, heads).eval().to(device)


def autocast(device, bf16):
    """bf16 autocast on ``device``, or autocast disabled."""
    if bf16:
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return torch.autocast(device.type, enabled=False)


def machine_description(device):
    """The machine line of bench.json and bench.md."""
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name()}, torch {torch.__version__}, {torch.get_num_threads()} CPU threads"
    return (
        f"{os.cpu_count()} CPU cores ({platform.machine()}), torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads"
    )
