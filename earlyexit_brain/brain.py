"""SpeechBrain ``Brain`` subclasses for early-exit ASR (one concept: the Brains and their hooks).

:class:`EarlyExitCTCBrain` trains an encoder with one CTC head per exit using
the multi-exit objective ``L = sum_k w_k * CTC_k`` (default ``w_k = 1``, the
paper's plain sum) and evaluates every exit in the same pass: WER and CER per
exit on validation and test, per-exit alignment files at test time.
"""

import functools
import logging
import os
import time
from typing import Dict, List, Optional, Sequence

import speechbrain as sb
import torch

# RandomState and TrainClock moved to checkpoints.py; the names stay here for the hyperparams.yaml
# of experiments made before (their YAML builds earlyexit_brain.brain.TrainClock)
from .brain_options import BrainOptions
from .checkpoints import RandomState, TrainClock, load_average_of_best  # noqa: F401
from .decoding.attention import AEDSearchOptions, make_aed_searcher
from .decoding.ctc import CTC_DECODERS, CTCDecoder, CTCDecodingOptions
from .models.decoders import add_bos_eos
from .utils import tokenizer_pieces, tokens_to_text, uses_decoders

logger = logging.getLogger(__name__)


class EarlyExitCTCBrain(sb.Brain):
    """Multi-exit CTC training and per-exit evaluation.

    Expected ``modules``: ``encoder`` (an early-exit encoder whose forward
    returns one hidden state per exit), ``ctc_heads`` (one log-softmax head
    per exit) and ``normalize`` (feature normalisation). Expected hparams:
    ``compute_features``, ``blank_index``, ``epoch_counter`` and ``loss``
    (:class:`earlyexit_brain.losses.MultiExitLoss`: per-exit CTC, exit weights,
    distillation), and optionally (:class:`~earlyexit_brain.brain_options.BrainOptions`
    holds these keys, their defaults and rules):

    - ``wav_augment``: applied to the waveforms in training, called as
      ``wavs, lens = wav_augment(wavs, lens)`` (SpeechBrain's ``Augmenter``,
      e.g. with ``SpeedPerturb``); the token targets are replicated with its
      ``replicate_labels`` when it enlarges the batch;
    - ``fea_augment``: the same on the normalised features (an ``Augmenter``
      of ``SpectrogramDrop``/``Warping``: SpecAugment);
    - ``augmentation``: a module applied as ``feats = augmentation(feats)``
      (e.g. one ``SpectrogramDrop``);
    - ``lr_annealing``: a per-update SpeechBrain scheduler called with the
      optimizer, e.g. ``LinearWarmupScheduler`` or ``NoamScheduler``;
    - ``avg_checkpoints``: evaluation loads the average of the best N
      checkpoints (by the evaluation's ``min_key``) instead of the best one.

    After :meth:`evaluate` on a test set, ``self.test_results[set_name]`` holds
    ``[{"exit": k, "wer": ..., "cer": ..., "n": ...}, ...]``.
    """

    # ------------------------------------------------------------------ helpers
    @functools.cached_property
    def options(self) -> BrainOptions:
        """The Brain's own keys of ``hparams`` (:class:`~earlyexit_brain.brain_options.BrainOptions`:
        decoders, checkpoint averaging, the optional hooks), read and checked once."""
        return BrainOptions.from_hparams(self.hparams)

    @property
    def num_exits(self) -> int:
        """Number of exits of the encoder."""
        encoder = self.modules.encoder
        encoder = getattr(encoder, "module", encoder)  # DDP
        return len(encoder.exit_layers)

    def _train_loader_specifics(self, dataset, loader_kwargs):
        loader_kwargs = super()._train_loader_specifics(dataset, loader_kwargs)
        batch_sampler = loader_kwargs.get("batch_sampler")
        if self.train_sampler is None and hasattr(batch_sampler, "set_epoch"):
            # SpeechBrain sets the epoch of a batch sampler only under DDP. Without it a
            # DynamicBatchSampler repeats one order in every epoch, and a run resumed
            # mid-epoch cannot find the order the interrupted run was following.
            self.train_sampler = batch_sampler
        return loader_kwargs

    # ---------------------------------------------------------------- forward
    def encode(self, batch, stage):
        """Features -> (augmentation in training) -> encoder: ``(hiddens, wav_lens)``, one
        hidden state per exit."""
        batch = batch.to(self.device)
        wavs, wav_lens = batch.sig
        train = stage == sb.Stage.TRAIN
        options = self.options
        if train and options.wav_augment is not None:
            wavs, wav_lens = options.wav_augment(wavs, wav_lens)
        feats = self.hparams.compute_features(wavs)
        feats = self.modules.normalize(feats, wav_lens)
        if train and options.fea_augment is not None:
            feats, wav_lens = options.fea_augment(feats, wav_lens)
        if train and options.augmentation is not None:
            feats = options.augmentation(feats)
        return self.modules.encoder(feats, wav_lens), wav_lens

    def compute_forward(self, batch, stage):
        """Features -> encoder -> every exit's CTC log-probabilities.

        Returns ``(log_probs, wav_lens, hiddens)``: one entry per exit of the
        log-probabilities and of the encoder states (which decoders read).
        """
        hiddens, wav_lens = self.encode(batch, stage)
        return self.modules.ctc_heads(hiddens), wav_lens, hiddens

    def targets(self, batch, stage):
        """``(tokens, token_lens)``, replicated as the augmenters enlarged the batch in training."""
        tokens, token_lens = batch.tokens
        if stage == sb.Stage.TRAIN:
            for augmenter in self.options.augmenters:
                if hasattr(augmenter, "replicate_labels"):
                    tokens = augmenter.replicate_labels(tokens)
                    token_lens = augmenter.replicate_labels(token_lens)
        return tokens, token_lens

    def epoch(self) -> Optional[int]:
        """The current epoch (1-based; None before training), for the loss's distillation schedule."""
        return getattr(self.hparams.epoch_counter, "current", None)

    def compute_objectives(self, predictions, batch, stage):
        """The multi-exit loss (``hparams.loss``); per-exit WER/CER outside training."""
        log_probs, wav_lens, hiddens = predictions
        tokens, token_lens = self.targets(batch, stage)
        losses = self.hparams.loss(log_probs, wav_lens, tokens, token_lens, epoch=self.epoch())
        self.record_losses(losses.per_exit)
        if stage != sb.Stage.TRAIN:
            self.score_exits(batch, log_probs, wav_lens, hiddens, stage)
        return losses.total

    def record_losses(self, losses: Sequence[torch.Tensor]) -> None:
        """Add each exit's loss to the stage's running per-exit losses (logged as ``loss_exit<k>``)."""
        for k, value in enumerate(torch.stack(losses).detach().cpu().tolist()):  # one copy, not one per exit
            self._exit_loss_sum[k] += value
        self._exit_loss_count += 1

    # --------------------------------------------------------------- decoding
    DEFAULT_DECODER = "ctc_greedy"

    def stage_decoders(self, stage) -> List[str]:
        """Decoders run on every exit: ``valid_decoder`` in validation, ``test_decoders`` in test
        (the first one gives the per-exit WER/CER; the others are reported beside it)."""
        if stage == sb.Stage.TEST:
            return list(self.options.test_decoders or [self.DEFAULT_DECODER])
        return [self.options.valid_decoder or self.DEFAULT_DECODER]

    def ctc_decoder(self, name: str) -> CTCDecoder:
        """The CTC decoder ``name`` (``ctc_greedy``, or ``ctc_beam``: SpeechBrain's CTC
        beam search (``CTCBeamSearcher``) with ``ctc_beam_size``, and the n-gram LM ``ctc_lm_path``
        weighted by ``ctc_lm_alpha``/``ctc_lm_beta`` when there is one), built once."""
        decoders = self.__dict__.setdefault("_ctc_decoders", {})
        if name not in decoders:
            decoders[name] = CTCDecoder(
                name,
                self.tokenizer.sp,
                self.vocab_size(),
                self.hparams.blank_index,
                CTCDecodingOptions.from_hparams(self.hparams),
            )
        return decoders[name]

    def vocab_size(self) -> int:
        heads = getattr(self.modules.ctc_heads, "module", self.modules.ctc_heads)
        return heads.config["vocab_size"]

    def decode_exit(self, decoder: str, exit_index: int, log_probs, wav_lens, hiddens, stage) -> List[str]:
        """Texts of one exit's hypotheses for a batch with ``decoder``."""
        if decoder in CTC_DECODERS:
            return self.ctc_decoder(decoder)(log_probs, wav_lens)
        raise ValueError(
            f"test_decoders/valid_decoder: {decoder!r} needs attention decoders; "
            f"this model has CTC exits only (use ctc_greedy or ctc_beam)"
        )

    def score_exits(self, batch, log_probs, wav_lens, hiddens, stage):
        """Decode every exit with each of the stage's decoders; accumulate WER/CER and time."""
        targets = [w.split(" ") for w in batch.wrd]
        for name in self.stage_decoders(stage):
            for k, lp in enumerate(log_probs):
                start = time.perf_counter()
                with torch.no_grad():
                    texts = self.decode_exit(name, k, lp, wav_lens, hiddens, stage)
                self.decode_seconds[name][k] += time.perf_counter() - start
                words = [t.split(" ") for t in texts]
                self.decoder_metrics[name][0][k].append(batch.id, words, targets)
                self.decoder_metrics[name][1][k].append(batch.id, words, targets)

    def fit_batch(self, batch):
        """SpeechBrain's ``fit_batch``, except that a batch whose loss is not finite is skipped.

        Nothing is back-propagated or applied for it (gradients accumulated
        since the last update are dropped too, and the learning-rate schedule
        does not advance, the feature normaliser's running statistics are
        restored); it is counted (``skipped`` in the epoch's training
        stats) and logged with its utterance IDs. Under DDP the decision is
        taken jointly, so every process skips the same step. More than
        ``nonfinite_patience`` skipped batches in one epoch stop training with
        a message saying so.
        """
        should_step = (self.step % self.grad_accumulation_factor) == 0
        self.on_fit_batch_start(batch, should_step)
        sums, count = list(self._exit_loss_sum), self._exit_loss_count
        norm_stats = self._normalizer_stats()
        with self.no_sync(not should_step):
            with self.training_ctx:
                outputs = self.compute_forward(batch, sb.Stage.TRAIN)
                loss = self.compute_objectives(outputs, batch, sb.Stage.TRAIN)
            if not self._all_finite(loss):
                self._exit_loss_sum, self._exit_loss_count = sums, count
                if norm_stats is not None:  # NaN audio must not poison the running statistics
                    self._normalizer()._load_statistics_dict(norm_stats)
                self._skip_nonfinite(batch, loss)
                return loss.detach().cpu()
            self.scaler.scale(loss / self.grad_accumulation_factor).backward()
        if should_step:
            self.optimizers_step()
        self.on_fit_batch_end(batch, outputs, loss, should_step)
        return loss.detach().cpu()

    def _normalizer(self):
        normalize = getattr(self.modules, "normalize", None)
        return getattr(normalize, "module", normalize)

    def _normalizer_stats(self):
        """A copy of the feature normaliser's running statistics (None without one)."""
        normalize = self._normalizer()
        if not hasattr(normalize, "_statistics_dict"):
            return None
        return {k: v.clone() if torch.is_tensor(v) else v for k, v in normalize._statistics_dict().items()}

    def _all_finite(self, loss) -> bool:
        finite = torch.isfinite(loss.detach()).all().to(torch.float32).reshape(1)
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(finite, op=torch.distributed.ReduceOp.MIN)
        return bool(finite.item() > 0)

    def _skip_nonfinite(self, batch, loss):
        self.zero_grad()
        self.nonfinite_count += 1
        ids = list(getattr(batch, "id", []))
        logger.warning(
            "Skipped a training batch: its loss is %s (no update applied; %d skipped "
            "this epoch, nonfinite_patience %d). Utterances: %s",
            float(loss.detach()),
            self.nonfinite_count,
            self.nonfinite_patience,
            ", ".join(ids[:8]) + (" ..." if len(ids) > 8 else ""),
        )
        if self.nonfinite_count > self.nonfinite_patience:
            raise RuntimeError(
                f"Training stopped: {self.nonfinite_count} batches with a non-finite loss in one "
                f"epoch, more than nonfinite_patience={self.nonfinite_patience}. Look for NaN/inf "
                f"audio in the utterances logged above, or lower the learning rate; raise "
                f"nonfinite_patience to tolerate more. The last checkpoint is intact: rerun the "
                f"same command to resume from it."
            )

    def init_optimizers(self):
        """One optimiser, or two when the YAML gives ``ssl_opt_class`` (SSL encoders).

        With ``ssl_opt_class`` the pre-trained model's parameters
        (``encoder.model``) get their own optimiser and learning rate, as in
        SpeechBrain's wav2vec2 recipes, and ``opt_class`` updates the rest (exit
        heads, any non-pre-trained part). Both are checkpointed
        (``optimizer``, ``ssl_optimizer``); ``lr_annealing`` steps ``opt_class``'s
        optimiser and ``ssl_lr_annealing`` (optional) the SSL one.
        """
        ssl_opt_class = self.options.ssl_opt_class
        if ssl_opt_class is None or self.opt_class is None:
            return super().init_optimizers()
        encoder = getattr(self.modules.encoder, "module", self.modules.encoder)  # DDP
        ssl_model = getattr(encoder, "model", None)
        if ssl_model is None:
            raise ValueError(
                "ssl_opt_class: the encoder has no pre-trained 'model' to optimise "
                "separately (use it with EarlyExitSSLEncoder only)"
            )
        ssl_ids = {id(p) for p in ssl_model.parameters()}
        ssl_params = [p for p in ssl_model.parameters() if p.requires_grad]
        other = [p for p in self.modules.parameters() if id(p) not in ssl_ids and p.requires_grad]
        self.optimizer = self.opt_class(other)
        self.ssl_optimizer = ssl_opt_class(ssl_params)
        self.optimizers_dict = {"model_optimizer": self.optimizer, "ssl_optimizer": self.ssl_optimizer}
        if self.checkpointer is not None:
            self.checkpointer.add_recoverable("optimizer", self.optimizer)
            self.checkpointer.add_recoverable("ssl_optimizer", self.ssl_optimizer)

    def on_fit_batch_end(self, batch, outputs, loss, should_step):
        """Step the per-update learning-rate schedule(s); add the batch's time to the training clock."""
        self._tick_train_clock()
        if should_step and self.options.lr_annealing is not None:
            self.options.lr_annealing(self.optimizer)
        ssl_annealing = self.options.ssl_lr_annealing
        if should_step and ssl_annealing is not None and hasattr(self, "ssl_optimizer"):
            ssl_annealing(self.ssl_optimizer)

    def _tick_train_clock(self):
        """Add the time since the last tick to ``train_clock``. Ticking after every batch (not
        only at the end of an epoch) keeps the time up to date in intra-epoch checkpoints, so
        a run killed mid-epoch and resumed still reports its whole training time."""
        now = time.time()
        clock = self.options.train_clock
        if clock is not None:
            clock.seconds += now - self._stage_started
        self._stage_started = now

    # ---------------------------------------------------------------- stages
    def on_stage_start(self, stage, epoch=None):
        """Reset per-exit metric trackers."""
        self._exit_loss_sum = [0.0] * self.num_exits
        self._exit_loss_count = 0
        self._stage_started = time.time()
        if stage != sb.Stage.TRAIN:
            exits = range(self.num_exits)
            self.decoder_metrics = {
                name: (
                    [self.hparams.error_rate_computer() for _ in exits],
                    [self.hparams.cer_computer() for _ in exits],
                )
                for name in self.stage_decoders(stage)
            }
            self.decode_seconds = {name: [0.0 for _ in exits] for name in self.decoder_metrics}
            # the first decoder gives the per-exit WER/CER of the logs, checkpoints and report
            self.wer_metrics, self.cer_metrics = self.decoder_metrics[self.stage_decoders(stage)[0]]

    def _exit_stats(self, stage_loss) -> Dict[str, float]:
        stats = {"loss": float(stage_loss)}
        n = max(1, self._exit_loss_count)
        for k, total in enumerate(self._exit_loss_sum):
            stats[f"loss_exit{k + 1}"] = round(total / n, 4)
        return stats

    def on_stage_end(self, stage, stage_loss, epoch=None):
        """Log per-exit metrics; keep the best checkpoint on the last exit's WER."""
        stats = self._exit_stats(stage_loss)
        if stage == sb.Stage.TRAIN:
            stats["skipped"] = self.nonfinite_count  # batches with a non-finite loss
            self.train_stats = stats
            self._tick_train_clock()
            return
        for k in range(self.num_exits):
            stats[f"WER_exit{k + 1}"] = round(float(self.wer_metrics[k].summarize("error_rate")), 3)
            stats[f"CER_exit{k + 1}"] = round(float(self.cer_metrics[k].summarize("error_rate")), 3)
        stats["WER"] = stats[f"WER_exit{self.num_exits}"]
        stats["CER"] = stats[f"CER_exit{self.num_exits}"]
        if stage == sb.Stage.VALID:
            lr = self.optimizer.param_groups[0]["lr"]
            self.hparams.train_logger.log_stats(
                stats_meta={"epoch": epoch, "lr": float(lr)},
                train_stats=getattr(self, "train_stats", None),
                valid_stats=stats,
            )
            self.checkpointer.save_and_keep_only(
                meta={k: float(v) for k, v in stats.items()},
                min_keys=[self.hparams.checkpoint_key],
                num_to_keep=self.hparams.checkpoints_to_keep,
            )
        elif stage == sb.Stage.TEST:
            name = getattr(self, "test_set_name", "test")
            for dec, (wer, _) in list(self.decoder_metrics.items())[1:]:  # the other decoders
                for k in range(self.num_exits):
                    stats[f"WER_{dec}_exit{k + 1}"] = round(float(wer[k].summarize("error_rate")), 3)
            self.hparams.train_logger.log_stats(
                stats_meta={"Epoch loaded": self.hparams.epoch_counter.current, "set": name},
                test_stats=stats,
            )
            results = []
            for k in range(self.num_exits):
                n = len(self.wer_metrics[k].scores)
                decoders = {
                    dec: {
                        "wer": round(float(wer[k].summarize("error_rate")), 3),
                        "cer": round(float(cer[k].summarize("error_rate")), 3),
                        "ms_per_utterance": round(1000.0 * self.decode_seconds[dec][k] / max(1, n), 3),
                    }
                    for dec, (wer, cer) in self.decoder_metrics.items()
                }
                results.append(
                    {
                        "exit": k + 1,
                        "wer": stats[f"WER_exit{k + 1}"],
                        "cer": stats[f"CER_exit{k + 1}"],
                        "n": n,
                        "decoders": decoders,
                    }
                )
                path = os.path.join(self.hparams.output_folder, f"wer_{name}_exit{k + 1}.txt")
                with open(path, "w") as fout:
                    self.wer_metrics[k].write_stats(fout)
            if not hasattr(self, "test_results"):
                self.test_results = {}
            self.test_results[name] = results

    def on_evaluate_start(self, max_key=None, min_key=None):
        """Load the best checkpoint, or the average of the best ``avg_checkpoints``."""
        super().on_evaluate_start(max_key=max_key, min_key=min_key)
        n = self.options.avg_checkpoints
        if n > 1 and self.checkpointer is not None:
            used = load_average_of_best(self.checkpointer, self.options.model, n, min_key=min_key, max_key=max_key)
            logger.info(
                "Evaluating the average of %d checkpoint(s) (avg_checkpoints=%d): %s",
                len(used),
                n,
                [os.path.basename(c.path) for c in used],
            )
            self.averaged_checkpoints = len(used)
        else:
            self.averaged_checkpoints = 1

    def evaluate_set(self, name: str, dataset, loader_kwargs: Optional[Dict] = None, min_key: Optional[str] = None):
        """Evaluate every exit on one named test set; returns its per-exit results."""
        self.test_set_name = name
        self.evaluate(dataset, min_key=min_key, test_loader_kwargs=loader_kwargs or {})
        return self.test_results[name]


class EarlyExitSeq2SeqBrain(EarlyExitCTCBrain):
    """Joint CTC/attention training and decoding with one attention decoder per exit.

    On top of :class:`EarlyExitCTCBrain`'s modules it expects ``decoders``
    (:class:`earlyexit_brain.models.decoders.ExitDecoders`) and the hparams
    ``bos_index`` and ``eos_index``. The loss object gets the decoders'
    teacher-forced outputs too (bos prepended to their input, eos appended to
    their target): exit ``k``'s loss is ``ctc_weight * CTC_k + (1 - ctc_weight) * CE_k``
    (:class:`earlyexit_brain.losses.MultiExitLoss`).

    Decoding (``valid_decoder``, ``test_decoders``) adds ``aed_beam``:
    SpeechBrain's joint CTC/attention beam search over the exit's decoder and
    CTC head (``beam_size`` in test, ``valid_beam_size`` in validation,
    ``decode_ctc_weight``, ``aed_length_normalization``/``aed_length_reward``,
    ``max_decode_ratio``).
    """

    DEFAULT_DECODER = "aed_beam"

    def compute_forward(self, batch, stage):
        """``(ctc_log_probs, wav_lens, hiddens, decoder_log_probs, targets)``: one entry per exit
        of the first, third and fourth; ``targets`` is ``(tokens, token_lens, tokens_eos,
        eos_lens)``, the CTC targets and the decoders' teacher-forcing targets."""
        hiddens, wav_lens = self.encode(batch, stage)
        log_probs = self.modules.ctc_heads(hiddens)
        tokens, token_lens = self.targets(batch, stage)
        tokens_bos, tokens_eos, eos_lens = add_bos_eos(
            tokens, token_lens, self.hparams.bos_index, self.hparams.eos_index
        )
        dec_log_probs = self.modules.decoders(hiddens, wav_lens, tokens_bos)
        return log_probs, wav_lens, hiddens, dec_log_probs, (tokens, token_lens, tokens_eos, eos_lens)

    def compute_objectives(self, predictions, batch, stage):
        """The multi-exit loss of CTC and the decoders' cross-entropy; per-exit WER/CER outside training."""
        log_probs, wav_lens, hiddens, dec_log_probs, targets = predictions
        tokens, token_lens, tokens_eos, eos_lens = targets
        losses = self.hparams.loss(
            log_probs,
            wav_lens,
            tokens,
            token_lens,
            epoch=self.epoch(),
            decoder_log_probs=dec_log_probs,
            tokens_eos=tokens_eos,
            eos_lens=eos_lens,
        )
        self.record_losses(losses.per_exit)
        if stage != sb.Stage.TRAIN:
            self.score_exits(batch, log_probs, wav_lens, hiddens, stage)
        return losses.total

    def aed_searcher(self, exit_index: int, stage):
        """The (cached) joint CTC/attention beam searcher of one exit for a stage."""
        options = AEDSearchOptions.from_hparams(self.hparams)
        beam = int(options.beam_size if stage == sb.Stage.TEST else options.valid_beam_size or options.beam_size)
        key = (exit_index, beam)
        cache = self.__dict__.setdefault("_aed_searchers", {})
        if key not in cache:
            cache[key] = make_aed_searcher(
                getattr(self.modules.decoders, "module", self.modules.decoders),
                getattr(self.modules.ctc_heads, "module", self.modules.ctc_heads),
                exit_index,
                **options.searcher_kwargs(beam),
                lm_path=CTCDecodingOptions.from_hparams(self.hparams).lm_path,
                pieces=tokenizer_pieces(self.tokenizer.sp),
            )
        return cache[key]

    def decode_exit(self, decoder, exit_index, log_probs, wav_lens, hiddens, stage):
        if decoder != "aed_beam":
            return super().decode_exit(decoder, exit_index, log_probs, wav_lens, hiddens, stage)
        hyps, _, _, _ = self.aed_searcher(exit_index, stage)(hiddens[exit_index], wav_lens)
        return [tokens_to_text(self.tokenizer.sp, h) for h in hyps]


def brain_class_for(hparams: Dict):
    """The Brain a recipe's hparams need: :class:`EarlyExitSeq2SeqBrain` when its ``modules``
    have attention ``decoders``, else :class:`EarlyExitCTCBrain`."""
    return EarlyExitSeq2SeqBrain if uses_decoders(hparams) else EarlyExitCTCBrain
