"""Waveform-to-exits model: features, normalisation, early-exit encoder, CTC heads.

:class:`EarlyExitCTCModel` bundles the pieces a trained recipe uses so that
inference, evaluation and benchmarks run the same code. Its ``forward`` returns
the log-probabilities of one default exit, which is what SpeechBrain's stock
``EncoderASR`` expects from its ``encoder`` module.
"""

from typing import Dict, List, Optional, Sequence

import torch
from torch import nn


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
    def exit_compute_layers(self) -> List[int]:
        """Layers computed to reach each exit (the Splitformer's branches counted as layers)."""
        return list(self.encoder.exit_compute_layers)

    @property
    def num_exits(self) -> int:
        return len(self.encoder.exit_layers)

    #: Whether the exits have attention decoders (:class:`EarlyExitAEDModel`): the one
    #: place that answers it for a model; :func:`earlyexit_brain.utils.uses_decoders`
    #: answers it for a recipe's hyperparameters.
    has_decoders = False

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


class EarlyExitAEDModel(EarlyExitCTCModel):
    """:class:`EarlyExitCTCModel` with one attention decoder per exit (joint CTC/attention).

    ``forward`` still gives the default exit's CTC log-probabilities (stock
    ``EncoderASR``); :func:`earlyexit_brain.decoding.attention.decode_exit` runs
    SpeechBrain's joint CTC/attention beam search of one exit on that exit's encoder
    states with the search options held here, so only the decoder of the exit an
    utterance stopped at ever runs.
    """

    def __init__(
        self,
        compute_features,
        normalize,
        encoder,
        heads,
        decoders,
        bos_index: int,
        eos_index: int,
        blank_index: int = 0,
        beam_size: int = 10,
        ctc_weight: float = 0.4,
        length_normalization: bool = True,
        length_reward: float = 0.0,
        max_decode_ratio: float = 1.0,
        lm_weight: float = 0.0,
        lm_word_bonus: float = 0.0,
        lm_oov_penalty: float = 10.0,
        default_exit: Optional[int] = None,
    ):
        super().__init__(compute_features, normalize, encoder, heads, default_exit)
        if decoders.num_exits != self.num_exits:
            raise ValueError(f"decoders: {decoders.num_exits} decoders for {self.num_exits} exits")
        self.decoders = decoders
        self.search_options = dict(
            bos_index=int(bos_index),
            eos_index=int(eos_index),
            blank_index=int(blank_index),
            beam_size=int(beam_size),
            ctc_weight=float(ctc_weight),
            length_normalization=bool(length_normalization),
            length_reward=float(length_reward),
            max_decode_ratio=float(max_decode_ratio),
            lm_weight=float(lm_weight),
            lm_word_bonus=float(lm_word_bonus),
            lm_oov_penalty=float(lm_oov_penalty),
        )
        self._searchers: Dict[int, torch.nn.Module] = {}  # not registered: no extra weights
        self.has_decoders = True
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
