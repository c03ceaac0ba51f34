"""The early-exit model in onnxruntime: :class:`EarlyExitONNX`, the API of
:class:`~earlyexit_brain.inference.EarlyExitASR` with numpy, onnxruntime, sentencepiece and
soundfile only (no PyTorch, torchaudio, SpeechBrain or transformers).

It loads an ``onnx/`` folder written by :func:`earlyexit_brain.onnx_export.export_onnx_folder`
(docs/deployment.md): the front end (waveform -> features -> normalisation -> convolutional
front end -> projection), one graph per encoder segment between consecutive exits, one
graph per exit head (norm, linear, log-softmax; it also outputs the normalised states that the
learned exit controller reads), the tokenizer, the calibrated policies (and the learned exit
controller's weights, if any), a latency table measured in this runtime and ``manifest.json``,
whose sha256 of every file is checked before anything is loaded.
"""

import json
import logging
import os
from typing import Dict, List, Optional, Sequence

import numpy as np
import sentencepiece as spm

from ..controller_numpy import greedy_tokens
from ..policy_bundle import PolicyBundle
from ..transcription import SILENCE_PEAK, Transcription, transcribe_files_in_batches
from .audio import read_audio, signal_problem
from .folder import MANIFEST, PRECISIONS, check_files, open_session, read_manifest, session_options
from .policies import RUNTIME_POLICIES, RuntimeLatencyTable, RuntimePolicy, make_runtime_policy

logger = logging.getLogger(__name__)


def greedy_ids(log_probs: np.ndarray, blank_index: int) -> List[int]:
    """Greedy CTC decoding of ``(T, V)`` log-probabilities: the best token of every frame,
    repeats merged, blanks removed (SpeechBrain's ``ctc_greedy_decode``).

    Example
    -------
    >>> lp = np.log(np.array([[.1, .9], [.2, .8], [.9, .1], [.3, .7]]))
    >>> greedy_ids(lp, 0)
    [1, 1]
    """
    return greedy_tokens(log_probs.argmax(-1), blank_index).tolist()


class EarlyExitONNX:
    """Early-exit transcription in onnxruntime with a fixed exit, a budget or a confidence policy.

    ``exit`` is 1-based; ``policy`` is ``fixed``, ``entropy``, ``posterior_greedy``, ``budget``
    or ``learned`` (when the model's policies.json holds a learned exit controller; the N-best
    ``posterior`` policy needs a beam search the runtime does not have); ``threshold`` defaults
    to the threshold calibrated on the dev set and stored with the model (milliseconds for
    ``budget``, predicted by the latency table the export measured in onnxruntime). With neither
    exit nor policy, the stored default policy is used. Utterances that stop leave the batch, and
    the segments above the deepest exit still needed never run (``runs`` counts the graphs run).
    Decoding is greedy CTC. Use :meth:`from_folder`.
    """

    def __init__(self, folder: str, manifest: Dict, precision: str, threads: Optional[int], options=None):
        self.folder, self.manifest, self.precision, self.threads = folder, manifest, precision, threads
        graphs = manifest["precisions"][precision]
        opset = manifest.get("opset")
        options = session_options(threads) if options is None else options
        self.front = open_session(os.path.join(folder, graphs["front"]["file"]), options, opset)
        self.segments = [open_session(os.path.join(folder, g["file"]), options, opset) for g in graphs["segments"]]
        self.heads = [open_session(os.path.join(folder, g["file"]), options, opset) for g in graphs["heads"]]
        self.uses_positions = "pos_embs" in [i["name"] for i in graphs["segments"][0]["inputs"]]
        self.tokenizer = spm.SentencePieceProcessor(model_file=os.path.join(folder, manifest["tokenizer"]))
        path = os.path.join(folder, manifest["policies"])
        with open(path) as fin:
            self.policies = PolicyBundle.from_json(json.load(fin), source=path)
        self.hidden_size = self._hidden_size()
        if self.policies.controller is not None:
            self.policies.controller.check_model(len(self.heads), self.hidden_size, path)
        # the heads of exports made before the learned policy give the log-probabilities only
        self.heads_give_states = all("hidden" in [o.name for o in head.get_outputs()] for head in self.heads)
        table = graphs.get("latency_table")
        self.latency_table = None
        if table:
            with open(os.path.join(folder, table)) as fin:
                self.latency_table = RuntimeLatencyTable(**json.load(fin))
        self.sample_rate = int(manifest["sample_rate"])
        self.blank_index = int(manifest["blank_index"])
        self.min_samples = int(manifest["min_samples"])
        counted = manifest.get("compute_layers")
        if counted is not None and not (
            isinstance(counted, list)
            and len(counted) == len(self.heads)
            and all(isinstance(c, int) and c >= e for c, e in zip(counted, manifest["exit_layers"]))
        ):
            raise ValueError(
                f"{os.path.join(folder, MANIFEST)}: compute_layers must list, per exit, the layers computed "
                f"to it (at least the exit's layer {manifest['exit_layers']}), got {counted!r}"
            )
        self.runs = {"front": 0, "segments": [0] * len(self.segments), "heads": [0] * len(self.heads)}

    @classmethod
    def from_folder(
        cls, path: str, threads: Optional[int] = None, precision: str = "fp32", options=None
    ) -> "EarlyExitONNX":
        """Load an ONNX export (``onnx/`` folder): ``precision`` ``fp32`` or ``int8`` (when the
        export has it); ``threads`` onnxruntime's intra-op threads (None: its default, one per
        physical core); ``options`` an ``onnxruntime.SessionOptions`` for every graph instead of
        :func:`~earlyexit_brain.runtime.folder.session_options` of ``threads`` (e.g. with
        onnxruntime's profiler on). Every file's sha256 is checked against ``manifest.json``
        first; a ValueError names the file at fault."""
        folder = os.path.abspath(str(path))
        if not os.path.isdir(folder):
            raise ValueError(f"{path}: no such ONNX folder")
        manifest = read_manifest(folder)
        if precision not in PRECISIONS:
            raise ValueError(f"precision: accepted values are {', '.join(PRECISIONS)}, got {precision!r}")
        if precision not in manifest.get("precisions", {}):
            raise ValueError(
                f"precision: {folder} has no {precision} graphs (exported: "
                f"{', '.join(manifest.get('precisions', {}))}; recipes/export.py --int8 adds int8)"
            )
        graphs = manifest["precisions"][precision]
        names = [graphs["front"]["file"]] + [g["file"] for g in graphs["segments"] + graphs["heads"]]
        names += [manifest["tokenizer"], manifest["policies"]] + (
            [graphs["latency_table"]] if graphs.get("latency_table") else []
        )
        check_files(folder, manifest, names)
        return cls(folder, manifest, precision, threads, options)

    # ------------------------------------------------------------------ properties
    def _hidden_size(self) -> Optional[int]:
        """The encoder states' size: the last axis of the head graphs' input (None where a graph
        does not give it as a number)."""
        sizes = {head.get_inputs()[0].shape[-1] for head in self.heads}
        size = sizes.pop() if len(sizes) == 1 else None
        return size if isinstance(size, int) and not isinstance(size, bool) else None

    @property
    def num_exits(self) -> int:
        return len(self.heads)

    @property
    def exit_layers(self) -> List[int]:
        return list(self.manifest["exit_layers"])

    @property
    def compute_layers(self) -> List[int]:
        """Layers computed to reach each exit: a Splitformer's branches counted (as
        ``Transcription.layers`` reports them); the exits' layers for a folder without the key."""
        return list(self.manifest.get("compute_layers") or self.manifest["exit_layers"])

    @property
    def vocab_size(self) -> int:
        return int(self.manifest["vocab_size"])

    # ------------------------------------------------------------------ policies
    def make_policy(self, policy=None, threshold: Optional[float] = None, exit: Optional[int] = None) -> RuntimePolicy:
        """Resolve ``exit`` / ``policy`` / ``threshold`` (with the stored defaults) into a policy,
        as :meth:`EarlyExitASR.make_policy <earlyexit_brain.inference.EarlyExitASR.make_policy>`."""
        if isinstance(policy, RuntimePolicy):
            if threshold is not None:
                raise ValueError("threshold: a policy object carries its own threshold; do not pass threshold=")
            return policy
        if threshold is not None and policy is None:
            raise ValueError(
                "threshold: give policy= with threshold= (the policy it is for: entropy, posterior_greedy, "
                "budget or learned)"
            )
        if exit is not None and policy not in (None, "fixed"):
            raise ValueError(f"exit: give either an exit or the policy {policy!r}, not both")
        if policy is None and exit is None:
            default = self.manifest.get("default_policy") or {"policy": "fixed", "exit": self.num_exits}
            policy, threshold, exit = default["policy"], default.get("threshold"), default.get("exit")
        if policy is None:
            policy = "fixed"
        if not isinstance(policy, str):
            raise ValueError(f"policy: expected a policy name ({', '.join(RUNTIME_POLICIES)}), got {policy!r}")
        if policy not in ("fixed", "posterior") and threshold is None and policy in RUNTIME_POLICIES:
            threshold = self.policies.threshold(policy)
            if threshold is None:
                raise ValueError(
                    f"threshold: no calibrated threshold is stored for the {policy} policy; pass threshold="
                )
        options = {} if policy == "budget" else self.policies.policy_options(policy)
        if policy == "learned" and self.policies.controller is not None and not self.heads_give_states:
            raise ValueError(
                f"policy: the learned policy reads the exits' normalised states, which the head graphs of "
                f"{self.folder} do not output (exported before the learned policy); export the model again "
                f"(recipes/export.py)"
            )
        return make_runtime_policy(
            policy,
            threshold,
            exit,
            self.num_exits,
            self.latency_table,
            self.vocab_size,
            controller=self.policies.controller,
            **options,
        )

    # ------------------------------------------------------------------ graphs
    def _run_front(self, wavs: np.ndarray, wav_lens: np.ndarray):
        self.runs["front"] += 1
        out = self.front.run(None, {"wavs": wavs, "wav_lens": wav_lens})
        return out[0], out[1], (out[2] if self.uses_positions else None)

    def _run_segment(self, k: int, x: np.ndarray, frames: np.ndarray, pos: Optional[np.ndarray]) -> np.ndarray:
        self.runs["segments"][k] += 1
        feed = {"x": x, "frames": frames}
        if pos is not None:
            feed["pos_embs"] = pos
        return self.segments[k].run(None, feed)[0]

    def _run_head(self, k: int, x: np.ndarray) -> np.ndarray:
        self.runs["heads"][k] += 1
        return self.heads[k].run(["log_probs"], {"x": x})[0]

    def _run_head_states(self, k: int, x: np.ndarray):
        """Exit ``k``'s log-probabilities ``(B, T, V)`` and normalised states ``(B, T, D)``."""
        self.runs["heads"][k] += 1
        log_probs, hidden = self.heads[k].run(["log_probs", "hidden"], {"x": x})
        return log_probs, hidden

    def exit_log_probs(self, wavs: np.ndarray, wav_lens: Optional[np.ndarray] = None) -> List[np.ndarray]:
        """Every exit's log-probabilities ``(B, T', V)`` for a padded batch (no policy, no
        utterance leaves): what the export compares with PyTorch."""
        wavs = np.ascontiguousarray(wavs, dtype=np.float32)
        lens = np.ones(len(wavs), np.float32) if wav_lens is None else np.asarray(wav_lens, np.float32)
        x, frames, pos = self._run_front(wavs, lens)
        out = []
        for k in range(self.num_exits):
            x = self._run_segment(k, x, frames, pos)
            out.append(self._run_head(k, x))
        return out

    def log_probs_at_exit(self, wavs: np.ndarray, wav_lens: Optional[np.ndarray], exit_index: int) -> np.ndarray:
        """Exit ``exit_index``'s (0-based) log-probabilities ``(B, T', V)``: the front end, the
        segments up to that exit and its head only (``EarlyExitCTCModel.exit_log_probs``)."""
        wavs = np.ascontiguousarray(wavs, dtype=np.float32)
        lens = np.ones(len(wavs), np.float32) if wav_lens is None else np.asarray(wav_lens, np.float32)
        x, frames, pos = self._run_front(wavs, lens)
        for k in range(exit_index + 1):
            x = self._run_segment(k, x, frames, pos)
        return self._run_head(exit_index, x)

    def run_dynamic(self, wavs: np.ndarray, wav_lens: np.ndarray, policy: RuntimePolicy):
        """``(log_probs, exits, layers)``: each utterance's ``(T_b, V)`` log-probabilities at the
        exit it stopped at (0-based ``exits``) and the layers computed, as
        :func:`earlyexit_brain.dynamic.run_dynamic`: stopped utterances leave the batch (its time
        axis cut to the longest still running); fixed and budget policies plan the exits first, so
        only the heads of the exits someone stops at run, and no segment above the deepest. A
        policy that ``needs_context`` (``learned``) also gets the previous exit's log-probabilities
        of the utterances still running and, when it ``needs_states`` (a controller that reads
        them), each exit's normalised encoder states (else ``hidden=None``: the heads are not asked
        for them)."""
        batch = wavs.shape[0]
        durations = wav_lens.astype(np.float64) * wavs.shape[1] / self.sample_rate
        x, frames, pos = self._run_front(wavs, wav_lens)
        active = np.arange(batch)
        plan = policy.planned_exits(durations, self.num_exits)
        out: List[Optional[np.ndarray]] = [None] * batch
        exits = np.zeros(batch, dtype=np.int64)
        done = 0  # segments run
        context = plan is None and getattr(policy, "needs_context", False)
        states = context and getattr(policy, "needs_states", True)  # the heads' states fetched only if read
        previous = None  # the previous exit's log-probabilities of the utterances still running
        for k in range(self.num_exits):
            if plan is not None:
                stop = plan[active] == k
                if not stop.any():
                    continue
            while done <= k:
                x = self._run_segment(done, x, frames, pos)
                done += 1
            last = k == self.num_exits - 1
            if context and not last:
                log_probs, hidden = self._run_head_states(k, x) if states else (self._run_head(k, x), None)
                stop = np.asarray(policy(k, log_probs, frames, hidden=hidden, previous=previous), bool)
                previous = log_probs
            else:
                log_probs = self._run_head(k, x)
                if plan is None:
                    stop = np.ones(len(active), bool) if last else np.asarray(policy(k, log_probs, frames), bool)
            for i in np.flatnonzero(stop):
                out[int(active[i])] = log_probs[i, : int(frames[i])]
                exits[int(active[i])] = k
            if stop.all():
                break
            if stop.any():
                keep = np.flatnonzero(~stop)
                frames, active = frames[keep], active[keep]
                t_old, t_new = x.shape[1], int(frames.max())
                x = np.ascontiguousarray(x[keep, :t_new])
                if previous is not None:
                    previous = previous[keep, :t_new]
                if pos is not None:  # relative positions of t_new frames: the middle of those of t_old
                    pos = np.ascontiguousarray(pos[:, t_old - t_new : t_old + t_new - 1])
        layers = np.array([self.compute_layers[int(k)] for k in exits], dtype=np.int64)
        return out, exits, layers

    def text(self, log_probs: np.ndarray) -> str:
        """Greedy CTC text of one utterance's ``(T, V)`` log-probabilities."""
        size = self.tokenizer.vocab_size()
        ids = [i for i in greedy_ids(log_probs, self.blank_index) if 0 <= i < size]
        return self.tokenizer.decode_ids(ids) if ids else ""

    # ------------------------------------------------------------------ transcription
    def transcribe_batch(
        self,
        wavs: np.ndarray,
        wav_lens: Optional[np.ndarray] = None,
        exit: Optional[int] = None,
        policy=None,
        threshold: Optional[float] = None,
    ) -> List[Transcription]:
        """Transcribe a padded batch ``(B, S)`` of mono waveforms at the model's rate (relative
        ``wav_lens``). A row that cannot be transcribed (empty, too short, NaN or infinite
        samples) gets ``text`` None and ``error``; the other rows are transcribed together."""
        chosen = self.make_policy(policy, threshold, exit)
        wavs = np.asarray(wavs, dtype=np.float32)
        if wavs.ndim != 2:
            raise ValueError(f"wavs: expected a (batch, samples) array, got shape {wavs.shape}")
        lens = np.ones(len(wavs), np.float32) if wav_lens is None else np.asarray(wav_lens, np.float32)
        samples = [int(round(float(length) * wavs.shape[1])) for length in lens]
        problems = [signal_problem(wavs[b, :n], self.min_samples, self.sample_rate) for b, n in enumerate(samples)]
        results = [Transcription(text=None, error=f"row {b}: {p}") for b, p in enumerate(problems)]
        keep = [b for b, p in enumerate(problems) if p is None]
        if not keep:
            return results
        if len(keep) < len(samples):
            longest = max(samples[b] for b in keep)
            wavs = wavs[keep, :longest]
            lens = np.array([samples[b] / longest for b in keep], np.float32)
        log_probs, exits, layers = self.run_dynamic(np.ascontiguousarray(wavs), lens, chosen)
        for i, b in enumerate(keep):
            results[b] = Transcription(text=self.text(log_probs[i]), exit=int(exits[i]) + 1, layers=int(layers[i]))
        return results

    def load_checked(self, path: str) -> np.ndarray:
        """Read, resample and down-mix a file; a ValueError names it when it is missing,
        undecodable, empty, too short, not finite or silent."""
        signal = read_audio(path, self.sample_rate)
        problem = signal_problem(signal, self.min_samples, self.sample_rate)
        if problem is not None:
            raise ValueError(f"{path}: {problem}")
        if float(np.abs(signal).max()) < SILENCE_PEAK:
            raise ValueError(f"{path}: the audio is silent (peak amplitude below {SILENCE_PEAK})")
        return signal

    def transcribe_file(
        self, path: str, exit: Optional[int] = None, policy=None, threshold: Optional[float] = None
    ) -> Transcription:
        """Transcribe one file; a ValueError names the file when it cannot be used."""
        chosen = self.make_policy(policy, threshold, exit)
        result = self.transcribe_batch(self.load_checked(path)[None], policy=chosen)[0]
        result.path = path
        return result

    def transcribe_files(
        self,
        paths: Sequence[str],
        exit: Optional[int] = None,
        policy=None,
        threshold: Optional[float] = None,
        batch_size: int = 8,
    ) -> List[Transcription]:
        """Transcribe many files in batches; a bad file is reported (``error``) and the rest transcribed."""
        chosen = self.make_policy(policy, threshold, exit)

        def transcribe(signals):
            longest = max(len(sig) for sig in signals)
            wavs = np.zeros((len(signals), longest), np.float32)
            for row, sig in enumerate(signals):
                wavs[row, : len(sig)] = sig
            lens = np.array([len(sig) / longest for sig in signals], np.float32)
            return self.transcribe_batch(wavs, lens, policy=chosen)

        return transcribe_files_in_batches(paths, self.load_checked, transcribe, batch_size)
