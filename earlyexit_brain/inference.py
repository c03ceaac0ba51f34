"""Transcribe with an early-exit model: :class:`EarlyExitASR`, and the folder it loads.

An inference folder (written by :func:`earlyexit_brain.export.export_inference_folder` at the end of
training or by ``recipes/evaluate.py``) holds ``hyperparams.yaml``,
``model.ckpt`` (encoder and exit heads), ``normalizer.ckpt``,
``tokenizer.ckpt``, ``exit_policies.ckpt`` (calibrated thresholds, JSON) and
``latency_table.ckpt`` (per-exit latency measured on the training device,
JSON)::

    from earlyexit_brain.inference import EarlyExitASR
    asr = EarlyExitASR.from_hparams(source="results/.../inference")
    asr.transcribe_file("speech.wav")                      # the calibrated default policy
    asr.transcribe_file("speech.wav", exit=1)              # fixed exit 1
    asr.transcribe_file("speech.wav", policy="entropy", threshold=0.2)
    asr.transcribe_file("speech.wav", policy="budget", threshold=50)  # ms

Each call returns :class:`Transcription` objects with the text, the exit used
and the encoder layers computed. The folder's ``modules.encoder`` is an
:class:`~earlyexit_brain.models.pipeline.EarlyExitCTCModel` whose forward gives
the default exit's log-probabilities, so SpeechBrain's stock ``EncoderASR``
loads the same folder and transcribes at the default exit.
"""

import logging
import os
from typing import Dict, List, Optional, Sequence, Union

import torch
from speechbrain.inference.interfaces import Pretrained
from speechbrain.utils.data_utils import batch_pad_right
from speechbrain.utils.fetching import FetchConfig, LocalStrategy, fetch

from .audio_check import wav_truncation
from .decoding.ctc import CTCDecoder, CTCDecodingOptions, make_ctc_beam_searcher
from .dynamic import decode_dynamic, run_model
from .latency import LatencyTable
from .policies import POLICY_NAMES, ExitPolicy, check_exit, make_policy
from .policy_bundle import PolicyBundle
from .records import FileRecord, JsonRecord  # noqa: F401  (older inference folders name them here)
from .safe_load import check_alias_expansion, check_hparams_text, weights_only_loading
from .transcription import SILENCE_PEAK, Transcription, transcribe_files_in_batches
from .utils import looks_like_repo_id, tokenizer_pieces, tokens_to_text

logger = logging.getLogger(__name__)


class EarlyExitASR(Pretrained):
    """Early-exit transcription with a fixed exit, a budget or a confidence policy.

    CTC models decode the chosen exit as stored with the model (``decoding`` in
    ``exit_policies.ckpt``): greedily, or with CTC beam search and the
    folder's word n-gram LM (``ngram_lm.ckpt``); ``decoder="ctc_greedy"`` or
    ``"ctc_beam"`` overrides it. Attention-decoder (AED) models run the chosen
    exit's decoder only, with joint CTC/attention beam search (the exit
    policies read the exits' CTC posteriors).

    ``exit`` is 1-based; ``policy`` is one of ``fixed``, ``entropy``,
    ``posterior``, ``posterior_greedy``, ``budget``, ``learned`` (the learned exit controller, when
    the model was trained with one) (or an
    :class:`~earlyexit_brain.policies.ExitPolicy`); ``threshold`` defaults to the
    threshold calibrated on the dev set and stored with the model (milliseconds
    for ``budget``). With neither exit nor policy, the stored default policy is
    used (the last exit when there is none). Layers above the exit an
    utterance stops at are never computed.
    """

    HPARAMS_NEEDED = ["tokenizer", "blank_index", "sample_rate"]
    MODULES_NEEDED = ["encoder"]

    @classmethod
    def from_hparams(cls, source, hparams_file: str = "hyperparams.yaml", trust_remote_code: bool = False, **kwargs):
        """Load from a local folder or a Hub id (SpeechBrain's fetching: ``savedir``,
        ``fetch_config``, ``local_strategy``, ``run_opts``, ``overrides``).

        Unless ``trust_remote_code`` is True, the hyperparams file is refused if
        it builds or calls anything outside the allowlist of
        :mod:`earlyexit_brain.safe_load` or names files outside the model's
        folder; an alias bomb is refused whatever the trust, and checkpoints
        always load with ``weights_only=True`` (one that holds code raises
        :class:`~earlyexit_brain.safe_load.UnsafeCheckpointError`). Offline
        (``HF_HUB_OFFLINE=1``), a Hub id loads from the local Hugging Face cache.
        """
        from huggingface_hub.errors import EntryNotFoundError, RepositoryNotFoundError

        if isinstance(source, (str, os.PathLike)) and not os.path.isdir(source) and not looks_like_repo_id(str(source)):
            raise ValueError(f"{source}: no such model folder, and not a Hub id OWNER/NAME")
        try:
            local = fetch(
                filename=hparams_file,
                source=source,
                savedir=kwargs.get("savedir"),
                save_filename=None,
                local_strategy=kwargs.get("local_strategy", LocalStrategy.SYMLINK),
                fetch_config=kwargs.get("fetch_config", FetchConfig()),
            )
            with open(local, encoding="utf-8") as fin:
                text = fin.read()
            origin = f"{source}/{hparams_file}"
            if trust_remote_code:
                check_alias_expansion(text, origin)  # a trusted source can still be a bomb
            else:
                check_hparams_text(text, origin)
            with weights_only_loading():
                return super().from_hparams(source, hparams_file=hparams_file, **kwargs)
        except (EntryNotFoundError, RepositoryNotFoundError) as err:
            # SpeechBrain 1.1.2 turns a missing Hub file into a ValueError only for
            # huggingface_hub < 1.0 (requests errors); do it for every version.
            raise ValueError(
                f"{source}: cannot fetch the model's files ({type(err).__name__}: "
                f"{str(err).splitlines()[0]}); check the repo id, your access to it, "
                f"and the network or the local Hugging Face cache"
            ) from err

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.model = self.mods.encoder
        self.tokenizer = self.hparams.tokenizer
        record = self.stored("exit_policies")
        source = getattr(record, "path", None) or "exit_policies"
        self.policies = PolicyBundle.from_json(record.data if record is not None else None, source=source)
        if self.policies.controller is not None:
            self.policies.controller.check_model(self.model.num_exits, self.model.heads.heads[0].in_features, source)
        record = self.stored("latency_table")
        self.latency_table = LatencyTable(**record.data) if record is not None and record.data else None
        self._searcher = None
        self._ctc_decoders: Dict[str, CTCDecoder] = {}
        if self.model.has_decoders and self.model.fuses_lm:  # the attention search fuses the word n-gram
            record = self.stored("ngram_lm")
            if record is None:
                raise ValueError(
                    "lm_weight: this model's attention search fuses a word n-gram, but its folder has no ngram_lm.ckpt"
                )
            self.model.use_lm(record.path, tokenizer_pieces(self.tokenizer))

    #: The folder's optional records (hyperparams.yaml keys of files that a folder may lack: an
    #: older export, a model trained without an n-gram, a folder written without a latency table).
    OPTIONAL_RECORDS = ("exit_policies", "latency_table", "ngram_lm")

    def stored(self, name: str):
        """The folder's record ``name`` of :attr:`OPTIONAL_RECORDS` (its ``path`` and ``data``),
        or None when the folder has none."""
        if name not in self.OPTIONAL_RECORDS:
            raise KeyError(f"{name!r} is not an optional record of an inference folder: {self.OPTIONAL_RECORDS}")
        return getattr(self.hparams, name, None)

    def ctc_decoder(self, name: Optional[str] = None) -> CTCDecoder:
        """The CTC decoder ``name`` (default: the one stored with the model, else greedy)."""
        stored = dict(self.policies.decoding)
        name = name or stored["decoder"]
        if name not in self._ctc_decoders:  # CTCDecoder refuses a name that is not a CTC decoder
            options = CTCDecodingOptions()
            if name == "ctc_beam":
                record = self.stored("ngram_lm")
                options = CTCDecodingOptions(
                    **{key: stored[key] for key in ("beam_size", "alpha", "beta") if key in stored},
                    lm_path=record.path if record is not None else None,
                )
            vocab = self.model.heads.heads[0].out_features
            self._ctc_decoders[name] = CTCDecoder(name, self.tokenizer, vocab, self.hparams.blank_index, options)
        return self._ctc_decoders[name]

    @property
    def num_exits(self) -> int:
        return self.model.num_exits

    @property
    def exit_layers(self) -> List[int]:
        return self.model.exit_layers

    def _nbest_searcher(self):
        if self._searcher is None:
            options = self.policies.policy_options("posterior")
            vocab = self.model.heads.heads[0].out_features
            self._searcher = make_ctc_beam_searcher(
                self.tokenizer,
                vocab,
                self.hparams.blank_index,
                options.get("beam_size", 10),
                token_prune_min_logp=options.get("token_prune_min_logp"),
            )
        return self._searcher

    def make_policy(
        self, policy: Union[str, ExitPolicy, None] = None, threshold: Optional[float] = None, exit: Optional[int] = None
    ) -> ExitPolicy:
        """Resolve ``exit`` / ``policy`` / ``threshold`` (with the stored defaults) into a policy.

        A ``threshold`` needs the ``policy`` it is for (as the command line's
        ``--threshold`` needs ``--policy``): it is never applied to the stored
        default policy, whichever that is.
        """
        if threshold is not None and policy is None:
            raise ValueError(
                "threshold: give policy= with threshold= (the policy it is for: entropy, "
                "posterior, posterior_greedy, budget or learned)"
            )
        if isinstance(policy, ExitPolicy):
            if threshold is not None:
                raise ValueError(
                    "threshold: an ExitPolicy object carries its own threshold; do not pass threshold= with it"
                )
            return policy
        if exit is not None and policy not in (None, "fixed"):
            raise ValueError(f"exit: give either an exit or the policy {policy!r}, not both")
        if policy is None and exit is None:
            default = self.policies.default
            if default is None:
                exit = self.num_exits
            else:
                policy, threshold, exit = default["policy"], default.get("threshold"), default.get("exit")
        if policy is None:
            policy = "fixed"
        if not isinstance(policy, str) or policy not in POLICY_NAMES:
            raise ValueError(f"policy: unknown policy {policy!r}; accepted: {', '.join(POLICY_NAMES)}")
        if policy == "fixed":
            check_exit(exit, self.num_exits)
        elif threshold is None and policy != "oracle":
            stored = self.policies.threshold(policy)
            if stored is None:
                raise ValueError(
                    f"threshold: no calibrated threshold is stored for the {policy} policy; pass threshold="
                )
            threshold = stored
        # the posterior policy's stored option (beam size) configures its searcher instead
        options = {} if policy == "posterior" else self.policies.policy_options(policy)
        return make_policy(
            policy,
            threshold=threshold,
            exit=exit,
            num_exits=self.num_exits,
            searcher=self._nbest_searcher() if policy == "posterior" else None,
            latency_table=self.latency_table,
            controller=self.policies.controller,
            **options,
        )

    def transcribe_batch(
        self,
        wavs: torch.Tensor,
        wav_lens: Optional[torch.Tensor] = None,
        exit: Optional[int] = None,
        policy=None,
        threshold: Optional[float] = None,
        decoder: Optional[str] = None,
    ) -> List[Transcription]:
        """Transcribe a padded batch ``(B, S)`` of 16 kHz mono waveforms (relative ``wav_lens``).

        A row that cannot be transcribed (empty, shorter than the model's
        ``min_samples``, NaN or infinite samples) gets ``text`` None and ``error``
        saying why; the other rows are transcribed as a batch of their own, cut
        to the longest of them, so one bad row never costs the others.
        """
        chosen = self.make_policy(policy, threshold, exit)
        aed = self.model.has_decoders  # attention decoders: only the exit's runs
        if aed and decoder is not None:
            raise ValueError("decoder: this model decodes with its attention decoders; decoder= applies to CTC models")
        ctc = None if aed else self.ctc_decoder(decoder)
        wavs = wavs.float()
        if wav_lens is None:
            wav_lens = torch.ones(wavs.shape[0])
        wav_lens = wav_lens.float().cpu()
        samples = (wav_lens * wavs.shape[1]).round().long().tolist()
        problems = [self.signal_problem(wavs[b, :n]) for b, n in enumerate(samples)]
        results: List[Transcription] = [
            Transcription(text=None, error=f"row {b}: {problem}") for b, problem in enumerate(problems)
        ]
        keep = [b for b, problem in enumerate(problems) if problem is None]
        if not keep:
            return results
        if len(keep) < len(samples):
            longest = max(samples[b] for b in keep)
            wavs, wav_lens = wavs[keep, :longest], torch.tensor([samples[b] / longest for b in keep])
        for b, result in zip(keep, self._transcribe_rows(wavs, wav_lens, chosen, aed, ctc)):
            results[b] = result
        return results

    def _transcribe_rows(
        self, wavs: torch.Tensor, wav_lens: torch.Tensor, chosen: ExitPolicy, aed: bool, ctc: Optional[CTCDecoder]
    ) -> List[Transcription]:
        """:meth:`transcribe_batch` of rows that are known to be usable."""
        wavs, wav_lens = wavs.to(self.device), wav_lens.to(self.device)
        durations = (wav_lens * wavs.shape[1] / self.hparams.sample_rate).cpu()
        with torch.no_grad():
            out = run_model(self.model, wavs, wav_lens, chosen, durations, keep_hidden=aed)
            if aed:
                texts = [tokens_to_text(self.tokenizer, t) for t in decode_dynamic(self.model, out)]
            else:
                texts = [ctc(lp[None], torch.ones(1))[0] for lp in out.log_probs]
        return [
            Transcription(text=text, exit=int(out.exits[b]) + 1, layers=int(out.layers[b]))
            for b, text in enumerate(texts)
        ]

    def signal_problem(self, signal: torch.Tensor) -> Optional[str]:
        """Why a mono waveform at the model's rate cannot be transcribed, or None.

        Empty, shorter than the model's ``min_samples`` (its front end's
        convolutions would fail on it) or holding NaN or infinite samples.
        """
        if signal.numel() == 0:
            return "the audio is empty (no samples)"
        if not bool(torch.isfinite(signal).all()):
            return "the audio contains NaN or infinite samples"
        needed = self.model.min_samples
        if signal.numel() < needed:
            return (
                f"the audio is too short: {signal.numel()} samples, the model needs at least "
                f"{needed} ({1000.0 * needed / self.hparams.sample_rate:.0f} ms)"
            )
        return None

    def load_checked(self, path: str) -> torch.Tensor:
        """Load, down-mix and resample an audio file; a ValueError names the file if it is unusable.

        Unusable: missing, undecodable, a WAV file cut short of what its header
        promises (decoders read it up to the cut without a word), or a waveform
        :meth:`signal_problem` refuses, or silent.
        """
        if not os.path.isfile(path):
            raise ValueError(f"{path}: no such audio file")
        truncated = wav_truncation(path)
        if truncated is not None:
            raise ValueError(f"{path}: {truncated}")
        try:
            signal = self.load_audio(path)
        except Exception as err:  # soundfile raises several types
            raise ValueError(f"{path}: cannot be decoded as audio ({err})") from err
        problem = self.signal_problem(signal)
        if problem is not None:
            raise ValueError(f"{path}: {problem}")
        if float(signal.abs().max()) < SILENCE_PEAK:
            raise ValueError(f"{path}: the audio is silent (peak amplitude below {SILENCE_PEAK})")
        return signal

    def transcribe_file(
        self,
        path: str,
        exit: Optional[int] = None,
        policy=None,
        threshold: Optional[float] = None,
        decoder: Optional[str] = None,
    ) -> Transcription:
        """Transcribe one file; a ValueError names the file when it cannot be used."""
        chosen = self.make_policy(policy, threshold, exit)
        signal = self.load_checked(path)
        result = self.transcribe_batch(signal[None], torch.ones(1), policy=chosen, decoder=decoder)[0]
        result.path = path
        return result

    def transcribe_files(
        self,
        paths: Sequence[str],
        exit: Optional[int] = None,
        policy=None,
        threshold: Optional[float] = None,
        batch_size: int = 8,
        decoder: Optional[str] = None,
    ) -> List[Transcription]:
        """Transcribe many files in batches; a bad file is reported (``error``) and the rest transcribed."""
        chosen = self.make_policy(policy, threshold, exit)

        def transcribe(signals):
            wavs, lens = batch_pad_right(signals)
            return self.transcribe_batch(wavs, lens, policy=chosen, decoder=decoder)

        return transcribe_files_in_batches(paths, self.load_checked, transcribe, batch_size)
