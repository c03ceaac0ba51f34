"""Waveform-to-exits model: features, normalisation, early-exit encoder, CTC heads.

:class:`EarlyExitCTCModel` bundles the pieces a trained recipe uses so that
inference, evaluation and benchmarks run the same code. Its ``forward`` returns
the log-probabilities of one default exit, which is what SpeechBrain's stock
``EncoderASR`` expects from its ``encoder`` module.
"""

import platform
import time
from typing import Dict, List, Optional, Sequence

import torch
from torch import nn

from ..exits import DynamicOutput, ExitPolicy, LatencyTable, fit_latency_table, run_dynamic


class EarlyExitCTCModel(nn.Module):
    """Waveforms ``(B, S)`` -> per-exit CTC log-probabilities.

    Arguments
    ---------
    compute_features : callable
        Waveform to features, e.g. ``speechbrain.lobes.features.Fbank``.
    normalize : callable
        Feature normalisation called as ``normalize(feats, lengths)``.
    encoder : nn.Module
        An early-exit encoder with the incremental interface.
    heads : nn.Module
        One CTC head per exit (``forward_exit(k, hidden)``).
    default_exit : int, optional
        1-based exit used by :meth:`forward` (default: the last).
    """

    def __init__(self, compute_features, normalize, encoder, heads, default_exit: Optional[int] = None):
        super().__init__()
        self.compute_features = compute_features
        self.normalize = normalize
        self.encoder = encoder
        self.heads = heads
        num_exits = len(encoder.exit_layers)
        if default_exit is None:
            default_exit = num_exits
        if not 1 <= default_exit <= num_exits:
            raise ValueError(f"default_exit: the model has exits 1..{num_exits}, got {default_exit}")
        self.default_exit = default_exit
        self._min_samples: Optional[int] = None

    def _apply(self, fn, *args, **kwargs):
        # SpeechBrain's InputNormalization keeps its statistics in plain tensor
        # attributes that only its own ``to`` moves; move them with the model.
        super()._apply(fn, *args, **kwargs)
        for name in ("glob_mean", "glob_std"):
            value = getattr(self.normalize, name, None)
            if isinstance(value, torch.Tensor):
                setattr(self.normalize, name, fn(value))
        return self

    @property
    def exit_layers(self) -> List[int]:
        """1-based encoder layer of each exit."""
        return list(self.encoder.exit_layers)

    @property
    def num_exits(self) -> int:
        return len(self.encoder.exit_layers)

    @property
    def min_samples(self) -> int:
        """Fewest waveform samples the model transcribes (shorter audio fails in the front end).

        The encoder's ``min_input_length`` (feature frames, or samples for an encoder
        that reads the waveform) is turned into samples by finding the shortest
        input for which ``compute_features`` gives that many frames, whatever the
        features' window, hop and padding.
        """
        if self._min_samples is None:
            need = int(getattr(self.encoder, "min_input_length", 1))
            device = next(self.parameters()).device

            def frames(samples: int) -> int:
                return int(self.compute_features(torch.zeros(1, samples, device=device)).shape[1])

            low, high = 1, 1
            with torch.no_grad():
                while frames(high) < need:
                    low, high = high + 1, 2 * high
                while low < high:  # frames grow with the samples: the first that is enough
                    mid = (low + high) // 2
                    low, high = (low, mid) if frames(mid) >= need else (mid + 1, high)
            self._min_samples = high
        return self._min_samples

    def features(self, wavs: torch.Tensor, wav_lens: torch.Tensor) -> torch.Tensor:
        """Normalised features ``(B, T, F)``."""
        feats = self.compute_features(wavs)
        return self.normalize(feats, wav_lens)

    def exit_log_probs(self, wavs, wav_lens, exit_index: int) -> torch.Tensor:
        """Log-probabilities ``(B, T', V)`` of one exit (0-based); layers above it never run."""
        state = self.encoder.start(self.features(wavs, wav_lens), wav_lens)
        return self.heads.forward_exit(exit_index, self.encoder.advance(state, exit_index))

    def forward(self, wavs: torch.Tensor, wav_lens: torch.Tensor) -> torch.Tensor:
        """Log-probabilities of the default exit (the stock ``EncoderASR`` contract)."""
        return self.exit_log_probs(wavs, wav_lens, self.default_exit - 1)

    def dynamic(self, wavs: torch.Tensor, wav_lens: torch.Tensor, policy: ExitPolicy,
                durations: Optional[torch.Tensor] = None, keep_hidden: bool = False) -> DynamicOutput:
        """Early-exit inference with ``policy`` (see :func:`earlyexit_brain.exits.run_dynamic`)."""
        feats = self.features(wavs, wav_lens)
        return run_dynamic(self.encoder, self.heads, feats, wav_lens, policy, durations,
                           keep_hidden=keep_hidden)


class EarlyExitAEDModel(EarlyExitCTCModel):
    """:class:`EarlyExitCTCModel` with one attention decoder per exit (joint CTC/attention).

    ``forward`` still gives the default exit's CTC log-probabilities (stock
    ``EncoderASR``); :meth:`decode_exit` runs SpeechBrain's joint CTC/attention
    beam search of one exit on that exit's encoder states, so only the
    decoder of the exit an utterance stopped at ever runs.
    """

    def __init__(self, compute_features, normalize, encoder, heads, decoders, bos_index: int,
                 eos_index: int, blank_index: int = 0, beam_size: int = 10, ctc_weight: float = 0.4,
                 length_normalization: bool = True, length_reward: float = 0.0,
                 max_decode_ratio: float = 1.0, lm_weight: float = 0.0, lm_word_bonus: float = 0.0,
                 lm_oov_penalty: float = 10.0, default_exit: Optional[int] = None):
        super().__init__(compute_features, normalize, encoder, heads, default_exit)
        if decoders.num_exits != self.num_exits:
            raise ValueError(f"decoders: {decoders.num_exits} decoders for {self.num_exits} exits")
        self.decoders = decoders
        self.search_options = dict(bos_index=int(bos_index), eos_index=int(eos_index),
                                   blank_index=int(blank_index), beam_size=int(beam_size),
                                   ctc_weight=float(ctc_weight),
                                   length_normalization=bool(length_normalization),
                                   length_reward=float(length_reward),
                                   max_decode_ratio=float(max_decode_ratio),
                                   lm_weight=float(lm_weight), lm_word_bonus=float(lm_word_bonus),
                                   lm_oov_penalty=float(lm_oov_penalty))
        self._searchers: Dict[int, torch.nn.Module] = {}  # not registered: no extra weights
        self.lm: Dict = {}

    @property
    def fuses_lm(self) -> bool:
        """Whether the search fuses a word n-gram (search option ``lm_weight`` > 0)."""
        return self.search_options["lm_weight"] > 0

    def use_lm(self, lm_path: Optional[str], pieces: Sequence[str]):
        """The word n-gram file and the tokenizer's pieces that a search with
        ``lm_weight`` > 0 fuses (the weights are search options)."""
        self.lm = {"lm_path": lm_path, "pieces": list(pieces)}
        self._searchers = {}

    def searcher(self, exit_index: int):
        """The joint CTC/attention beam searcher of one exit (built once)."""
        if exit_index not in self._searchers:
            from .decoders import make_aed_searcher

            self._searchers[exit_index] = make_aed_searcher(self.decoders, self.heads, exit_index,
                                                            **self.search_options, **self.lm)
        return self._searchers[exit_index]

    @torch.no_grad()
    def decode_exit(self, exit_index: int, hidden: torch.Tensor,
                    rel_lens: Optional[torch.Tensor] = None) -> List[List[int]]:
        """Token ids of the best hypothesis per utterance of exit ``exit_index``'s states ``(B, T, D)``."""
        if rel_lens is None:
            rel_lens = torch.ones(hidden.shape[0], device=hidden.device)
        hyps, _, _, _ = self.searcher(exit_index)(hidden, rel_lens.to(hidden.device))
        return [list(map(int, h)) for h in hyps]

    def decode_states(self, exit_index: int, states: List[torch.Tensor]) -> List[List[int]]:
        """:meth:`decode_exit` of utterances' unpadded states ``(T_b, D)``, padded into one batch."""
        frames = torch.tensor([s.shape[0] for s in states], dtype=torch.float32)
        padded = torch.nn.utils.rnn.pad_sequence(states, batch_first=True)
        return self.decode_exit(exit_index, padded, frames / padded.shape[1])

    def decode_dynamic(self, out: DynamicOutput) -> List[List[int]]:
        """Decode a :func:`run_dynamic` output made with ``keep_hidden=True``: the utterances that
        stopped at the same exit are batched through that exit's decoder only."""
        result: List[List[int]] = [[] for _ in out.exits]
        for k in sorted(set(int(e) for e in out.exits)):
            members = [b for b, e in enumerate(out.exits) if int(e) == k]
            for b, ids in zip(members, self.decode_states(k, [out.hiddens[b] for b in members])):
                result[b] = ids
        return result


def timed_exits(model: EarlyExitCTCModel, wavs: torch.Tensor, wav_lens: torch.Tensor,
                keep_hidden: bool = False):
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
def measure_latency_table(model: EarlyExitCTCModel, sample_rate: int = 16000,
                          durations: Sequence[float] = (2.0, 5.0, 10.0, 20.0),
                          repeats: int = 5, warmup: int = 1, seed: int = 0) -> LatencyTable:
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
        points.append({"seconds": float(seconds),
                       "ms": [round(float(v), 3) for v in runs.median(0).values]})
    model.train(was_training)
    name = f"{device.type}:{platform.processor() or platform.machine()}"
    return fit_latency_table(points, device=name, threads=torch.get_num_threads())
