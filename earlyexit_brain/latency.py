"""The latency to each exit: measured at batch 1 on a device and fitted as a line in the
audio length (:class:`LatencyTable`), for the budget policy and the reports."""

import json
import platform
import time
from dataclasses import dataclass
from typing import Dict, List, Sequence

import torch

from .files import atomic_write_text
from .models.pipeline import EarlyExitCTCModel


@dataclass
class LatencyTable:
    """Measured latency to reach each exit, as a linear function of audio length.

    ``intercept_ms[k] + ms_per_second[k] * seconds`` predicts the time from the
    waveform to exit ``k``'s log-probabilities at batch 1 on the device where
    the table was measured (front end, layers up to the exit, head).
    """

    intercept_ms: List[float]
    ms_per_second: List[float]
    points: List[Dict]
    device: str = "cpu"
    threads: int = 1

    def predict_ms(self, exit_index: int, seconds) -> torch.Tensor:
        """Predicted milliseconds to reach ``exit_index`` for ``seconds`` of audio."""
        seconds = torch.as_tensor(seconds, dtype=torch.float64)
        return self.intercept_ms[exit_index] + self.ms_per_second[exit_index] * seconds

    @property
    def num_exits(self) -> int:
        return len(self.intercept_ms)

    def to_json(self) -> Dict:
        return {
            "intercept_ms": self.intercept_ms,
            "ms_per_second": self.ms_per_second,
            "points": self.points,
            "device": self.device,
            "threads": self.threads,
        }

    def save(self, path: str):
        atomic_write_text(path, json.dumps(self.to_json(), indent=2) + "\n")

    @classmethod
    def load(cls, path: str) -> "LatencyTable":
        try:
            with open(path) as fin:
                data = json.load(fin)
            return cls(**data)
        except (OSError, ValueError, TypeError) as err:
            raise ValueError(f"latency table {path}: cannot be read ({err})") from err


def fit_latency_table(points: List[Dict], device: str = "cpu", threads: int = 1) -> LatencyTable:
    """Least-squares line per exit through ``[{"seconds": s, "ms": [per exit]}, ...]``."""
    xs = torch.tensor([p["seconds"] for p in points], dtype=torch.float64)
    design = torch.stack([torch.ones_like(xs), xs], 1)
    intercepts, slopes = [], []
    for k in range(len(points[0]["ms"])):
        ys = torch.tensor([p["ms"][k] for p in points], dtype=torch.float64)
        coef = torch.linalg.lstsq(design, ys[:, None]).solution[:, 0]
        intercepts.append(round(float(coef[0]), 4))
        slopes.append(round(float(coef[1]), 4))
    return LatencyTable(intercepts, slopes, points, device, threads)


def timed_exits(model: EarlyExitCTCModel, wavs: torch.Tensor, wav_lens: torch.Tensor, keep_hidden: bool = False):
    """``(ms, log_probs)``: cumulative milliseconds from the waveform to each exit, in one pass, and
    each exit's log-probabilities; with ``keep_hidden`` also each exit's encoder states."""
    cuda = wavs.is_cuda
    start = time.perf_counter()
    feats = model.features(wavs, wav_lens)
    times, log_probs, hiddens = [], [], []
    for k, hidden in model.encoder.iter_exits(feats, wav_lens):
        log_probs.append(model.heads.forward_exit(k, hidden))
        if keep_hidden:
            hiddens.append(hidden)
        if cuda:
            torch.cuda.synchronize()
        times.append((time.perf_counter() - start) * 1000.0)
    if keep_hidden:
        return times, log_probs, hiddens
    return times, log_probs


@torch.no_grad()
def measure_latency_table(
    model: EarlyExitCTCModel,
    sample_rate: int = 16000,
    durations: Sequence[float] = (2.0, 5.0, 10.0, 20.0),
    repeats: int = 5,
    warmup: int = 1,
    seed: int = 0,
) -> LatencyTable:
    """Measure the batch-1 latency to every exit on this device and fit a :class:`LatencyTable`.

    Each point is the median over ``repeats`` passes (after ``warmup``) of
    :func:`timed_exits` on ``seconds`` of low-level noise.
    """
    was_training = model.training
    model.eval()
    gen = torch.Generator().manual_seed(seed)
    points: List[Dict] = []
    device = next(model.parameters()).device
    for seconds in durations:
        wav = 0.01 * torch.randn(1, int(seconds * sample_rate), generator=gen)
        wav, lens = wav.to(device), torch.ones(1, device=device)
        for _ in range(warmup):
            timed_exits(model, wav, lens)[0]
        runs = torch.tensor([timed_exits(model, wav, lens)[0] for _ in range(repeats)])
        points.append({"seconds": float(seconds), "ms": [round(float(v), 3) for v in runs.median(0).values]})
    model.train(was_training)
    name = f"{device.type}:{platform.processor() or platform.machine()}"
    return fit_latency_table(points, device=name, threads=torch.get_num_threads())
