"""The Brains' own YAML keys (:class:`BrainOptions`): the decoders of each stage, checkpoint averaging,
and the optional objects the training hooks call (augmenters, schedulers, the second optimiser of SSL
encoders, the training clock), each with its default and rule in one place (docs/recipes.md lists
them). :class:`~earlyexit_brain.brain.EarlyExitCTCBrain` reads them as ``self.options``."""

from dataclasses import dataclass
from typing import Any, List, Optional

from .options import Options, is_int, option

#: Every decoder a stage can run: CTC greedy and beam search at every exit, the attention
#: decoders' joint beam search (models with decoders only).
DECODERS = ("ctc_greedy", "ctc_beam", "aed_beam")
_DECODER_WORDS = "one of " + ", ".join(repr(d) for d in DECODERS)


def _optional_object(example: str):
    """A rule for a key that is null or an object the YAML builds (``example`` names one)."""
    return (lambda v: v is None or callable(v), f"null or an object ({example})")


@dataclass(frozen=True)
class BrainOptions(Options):
    """The keys the Brains read (besides the modules, the loss and SpeechBrain's own objects)."""

    # null (the default): the Brain's own default decoder (CTC greedy; the attention search with decoders)
    valid_decoder: Optional[str] = option(
        "valid_decoder", None, lambda v: v is None or v in DECODERS, "null or " + _DECODER_WORDS
    )
    test_decoders: Optional[List[str]] = option(
        "test_decoders",
        None,
        lambda v: v is None or (isinstance(v, list) and len(v) > 0 and all(d in DECODERS for d in v)),
        "null or a non-empty list among " + ", ".join(repr(d) for d in DECODERS),
    )
    avg_checkpoints: int = option(
        "avg_checkpoints", 1, lambda v: is_int(v) and v >= 1, "an integer >= 1", null_is_default=True
    )
    wav_augment: Optional[Any] = option(
        "wav_augment", None, *_optional_object("!new:speechbrain.augment.augmenter.Augmenter")
    )
    fea_augment: Optional[Any] = option(
        "fea_augment", None, *_optional_object("!new:speechbrain.augment.augmenter.Augmenter")
    )
    augmentation: Optional[Any] = option("augmentation", None, *_optional_object("e.g. !new:...SpectrogramDrop"))
    lr_annealing: Optional[Any] = option(
        "lr_annealing", None, *_optional_object("e.g. !new:speechbrain.nnet.schedulers.LinearWarmupScheduler")
    )
    ssl_opt_class: Optional[Any] = option("ssl_opt_class", None, *_optional_object("e.g. !name:torch.optim.AdamW"))
    ssl_lr_annealing: Optional[Any] = option(
        "ssl_lr_annealing", None, *_optional_object("e.g. !new:speechbrain.nnet.schedulers.NewBobScheduler")
    )
    train_clock: Optional[Any] = option(
        "train_clock",
        None,
        lambda v: v is None or hasattr(v, "seconds"),
        "null or an object (!new:earlyexit_brain.checkpoints.TrainClock)",
    )
    model: Optional[Any] = option(
        "model",
        None,
        lambda v: v is None or hasattr(v, "state_dict"),
        "null or a module (!new:torch.nn.ModuleList) holding every trained module (averaged by avg_checkpoints)",
    )

    @property
    def augmenters(self) -> List[Any]:
        """The augmenters that may enlarge a training batch (``wav_augment``, ``fea_augment``)."""
        return [a for a in (self.wav_augment, self.fea_augment) if a is not None]
