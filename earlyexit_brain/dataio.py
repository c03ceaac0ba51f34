"""Data pipelines shared by the recipes: manifests -> SpeechBrain datasets.

Any corpus preparation that writes SpeechBrain CSV manifests with columns
``ID,duration,wav,spk_id,wrd`` works here, so recipes cannot tell corpora apart.
Manifests may add ``start`` and ``stop`` columns (sample indices, ``stop``
exclusive, as TED-LIUM's): each utterance is then the segment ``[start, stop)``
of ``wav``, read in place; an empty ``start``/``stop`` reads the whole file.
``$data_root`` in a manifest is replaced with ``data_folder``. Audio is
down-mixed and resampled to ``sample_rate`` when read; bad audio is handled as
the ``bad_audio`` key says (see :mod:`earlyexit_brain.audio_check`).
"""

import csv
import dataclasses
import logging
import os
from typing import Dict, List, NamedTuple, Optional

import speechbrain as sb
import torch
from speechbrain.dataio.dataset import DynamicItemDataset
from speechbrain.dataio.sampler import DynamicBatchSampler

from .audio_check import check_manifest_audio, make_reader, row_segment
from .options import ConfigError, Options, is_int, is_num, option

logger = logging.getLogger(__name__)

#: The columns the pipelines read (``ID`` keys the utterances).
REQUIRED_COLUMNS = ("ID", "duration", "wav", "wrd")


def ctc_required_frames(tokens: List[int]) -> int:
    """Minimum CTC input length for ``tokens``: one frame per token plus one
    blank between every pair of identical neighbours."""
    repeats = sum(1 for a, b in zip(tokens, tokens[1:]) if a == b)
    return len(tokens) + repeats


def encoder_frames(duration: float, sample_rate: int, hop_length_ms: Optional[float], encoder) -> int:
    """Encoder output frames for an utterance of ``duration`` seconds.

    ``hop_length_ms`` is the feature hop; None when the encoder reads the waveform
    itself (SSL encoders: ``output_frames`` takes samples).
    """
    n_samples = int(round(duration * sample_rate))
    if hop_length_ms is None:
        return encoder.output_frames(n_samples)
    feat_frames = n_samples // int(round(sample_rate * hop_length_ms / 1000.0)) + 1
    return encoder.output_frames(feat_frames)


def has_segments(dataset: DynamicItemDataset) -> bool:
    """True when the manifest has both ``start`` and ``stop`` columns."""
    if not dataset.data_ids:
        return False
    first = dataset.data[dataset.data_ids[0]]
    has_start, has_stop = "start" in first, "stop" in first
    if has_start != has_stop:
        raise ValueError("a manifest with segments needs both 'start' and 'stop' columns")
    return has_start


def _load(csv_path: str, data_folder: str) -> DynamicItemDataset:
    """A manifest as a dataset; an error names the file when it is missing, lacks a
    column the pipelines read, or has a value SpeechBrain cannot parse."""
    try:
        with open(csv_path, newline="", encoding="utf-8") as fin:
            header = {name.strip() for name in next(csv.reader(fin), [])}
    except FileNotFoundError:
        raise FileNotFoundError(f"manifest not found: {csv_path}") from None
    missing = [name for name in REQUIRED_COLUMNS if name not in header]
    if missing:
        raise ValueError(
            f"manifest {csv_path}: no {', '.join(repr(m) for m in missing)} "
            f"column{'s' if len(missing) > 1 else ''}; a manifest needs the columns "
            f"{','.join(REQUIRED_COLUMNS)} (spk_id, start and stop are optional)"
        )
    try:
        return DynamicItemDataset.from_csv(csv_path=csv_path, replacements={"data_root": data_folder})
    except (KeyError, ValueError) as err:  # e.g. a duration that is not a number, a repeated ID
        raise ValueError(f"manifest {csv_path}: {err}") from None


def _seconds(v) -> bool:
    return is_num(v) and v > 0


def _folder(v) -> bool:
    return isinstance(v, str) and v.strip() != ""


@dataclasses.dataclass(frozen=True)
class DataOptions(Options):
    """What :func:`dataio_prepare` reads from a recipe; each field is the recipe YAML key of its name.

    Arguments
    ---------
    data_folder : str
        Replaces ``$data_root`` in the manifests.
    train_csv, valid_csv : str
        The training and validation manifests.
    test_csv : dict
        ``{set name: manifest}``; ``test_sets`` names the sets evaluated, in order.
    controller_csv : str, optional
        Held-out utterances (never trained on, never a test set) that the learned exit controller
        is trained on (``exit_controller``; docs/exit_policies.md); None: no such set.
    sample_rate : int
        Audio is down-mixed and resampled to it when read.
    seed : int
        Seeds the training loader's generator and the dynamic batch sampler.
    max_duration : float
        Training utterances longer than this (s) are left out.
    eval_batch_size : int
        Validation and test batch size.
    batch_size : int, optional
        Training batch size (needed without ``dynamic_batching``).
    sorting : str
        Training order without dynamic batching: ``random``, ``ascending`` or ``descending`` duration.
    dynamic_batching : bool
        SpeechBrain's ``DynamicBatchSampler`` with ``max_batch_length_train`` seconds per batch and
        ``num_buckets`` buckets.
    bad_audio : str
        ``skip`` or ``fail`` (docs/reliability.md); ``max_audio_seconds``: longer audio counts as bad.
    audio_check_workers : int
        Processes of the header checks.
    save_folder : str, optional
        Where the header checks are cached (``<save_folder>/audio_check``; None: not cached).
    hop_length : float, optional
        The feature hop in ms (None: a waveform encoder, whose ``output_frames`` takes samples).
    num_workers : int
        DataLoader workers.
    """

    data_folder: str = option("data_folder", dataclasses.MISSING, _folder, "a folder path")
    train_csv: str = option("train_csv", dataclasses.MISSING, _folder, "a manifest path")
    valid_csv: str = option("valid_csv", dataclasses.MISSING, _folder, "a manifest path")
    test_csv: Dict[str, str] = option(
        "test_csv", dataclasses.MISSING, lambda v: isinstance(v, dict), "a mapping of set names to manifests"
    )
    test_sets: List[str] = option(
        "test_sets",
        dataclasses.MISSING,
        lambda v: isinstance(v, list) and len(v) > 0 and all(isinstance(x, str) for x in v),
        "a non-empty list of set names",
    )
    sample_rate: int = option("sample_rate", dataclasses.MISSING, lambda v: is_int(v) and v >= 1, "an integer >= 1")
    seed: int = option("seed", dataclasses.MISSING, is_int, "an integer")
    max_duration: float = option("max_duration", dataclasses.MISSING, _seconds, "a number of seconds > 0")
    eval_batch_size: int = option(
        "eval_batch_size", dataclasses.MISSING, lambda v: is_int(v) and v >= 1, "an integer >= 1"
    )
    batch_size: Optional[int] = option(
        "batch_size", None, lambda v: v is None or (is_int(v) and v >= 1), "an integer >= 1"
    )
    sorting: str = option(
        "sorting",
        "random",
        lambda v: v in ("ascending", "descending", "random"),
        "'ascending', 'descending' or 'random'",
    )
    dynamic_batching: bool = option("dynamic_batching", False, lambda v: isinstance(v, bool), "true or false")
    max_batch_length_train: Optional[float] = option(
        "max_batch_length_train", None, lambda v: v is None or _seconds(v), "a number of seconds > 0"
    )
    num_buckets: int = option("num_buckets", 20, lambda v: is_int(v) and v >= 1, "an integer >= 1")
    bad_audio: str = option("bad_audio", "skip", lambda v: v in ("skip", "fail"), "skip or fail")
    max_audio_seconds: float = option("max_audio_seconds", 120.0, _seconds, "a number of seconds > 0")
    audio_check_workers: int = option("audio_check_workers", 4, lambda v: is_int(v) and v >= 1, "an integer >= 1")
    save_folder: Optional[str] = option("save_folder", None, lambda v: v is None or _folder(v), "a folder path")
    hop_length: Optional[float] = option(
        "hop_length", None, lambda v: v is None or _seconds(v), "null or a hop in ms > 0"
    )
    num_workers: int = option("num_workers", 0, lambda v: is_int(v) and v >= 0, "an integer >= 0")
    controller_csv: Optional[str] = option(
        "controller_csv", None, lambda v: v is None or _folder(v), "null or a manifest path"
    )

    def __post_init__(self):
        super().__post_init__()
        missing = [name for name in self.test_sets if name not in self.test_csv]
        if missing:
            raise ConfigError(f"key 'test_sets': {missing} not in test_csv {sorted(self.test_csv)}")
        if self.dynamic_batching and self.max_batch_length_train is None:
            raise ConfigError("key 'max_batch_length_train' is needed with dynamic_batching")
        if not self.dynamic_batching and self.batch_size is None:
            raise ConfigError("key 'batch_size' is needed without dynamic_batching")
        if self.controller_csv is not None:
            others = {"train_csv": self.train_csv, "valid_csv": self.valid_csv}
            others.update({f"test_csv.{name}": path for name, path in self.test_csv.items()})
            same = [
                key for key, path in others.items() if os.path.abspath(path) == os.path.abspath(self.controller_csv)
            ]
            if same:
                raise ConfigError(
                    f"key 'controller_csv': {self.controller_csv} is also {same[0]}; the exit controller is "
                    "trained on held-out utterances that are neither trained on, nor dev, nor a test set"
                )


class PreparedData(NamedTuple):
    """What :func:`dataio_prepare` returns."""

    train: DynamicItemDataset
    valid: DynamicItemDataset
    tests: Dict[str, DynamicItemDataset]
    loaders: Dict[str, Dict]
    audio_check: Dict[str, Dict]  # per set: utterances left out for bad audio, files resampled / down-mixed
    controller: Optional[DynamicItemDataset] = None  # the learned exit controller's utterances (controller_csv)


def dataio_prepare(options, tokenizer, encoder) -> PreparedData:
    """Build train/valid/test datasets with audio and token pipelines.

    Training utterances whose token sequence cannot fit the encoder's frames
    under CTC, or longer than ``max_duration``, are filtered out and counted in
    the log. Validation and test sets are never filtered: an utterance that
    cannot be aligned counts as errors rather than disappearing.

    Arguments
    ---------
    options : DataOptions or dict
        The data options, or a recipe's hparams to read them from.
    tokenizer : SentencePiece
        ``tokenizer.sp`` encodes the transcripts.
    encoder : early-exit encoder
        Its ``output_frames`` decides which training utterances CTC can align.

    Returns
    -------
    PreparedData
        ``train, valid, tests, loaders, audio_check, controller``: ``tests`` maps each name in
        ``test_sets`` to its dataset; ``loaders`` has ``train``/``valid``/``test`` DataLoader options;
        ``audio_check`` the per-set summary of the audio checks (report.json); ``controller`` the
        ``controller_csv`` set (None without one), prepared as the test sets are.
    """
    o = options if isinstance(options, DataOptions) else DataOptions.from_hparams(options)
    train = _load(o.train_csv, o.data_folder)
    valid = _load(o.valid_csv, o.data_folder)
    tests = {name: _load(o.test_csv[name], o.data_folder) for name in o.test_sets}
    held = {"controller": _load(o.controller_csv, o.data_folder)} if o.controller_csv is not None else {}

    sample_rate, bad_audio = o.sample_rate, o.bad_audio
    cache = os.path.join(o.save_folder, "audio_check") if o.save_folder is not None else None
    manifests = {"train": o.train_csv, "valid": o.valid_csv, **o.test_csv, "controller": o.controller_csv}
    audio_summary = {}
    checked = []
    for name, dataset in [("train", train), ("valid", valid)] + list(tests.items()) + list(held.items()):
        dataset, audio_summary[name] = check_manifest_audio(
            dataset,
            name,
            manifests[name],
            sample_rate,
            bad_audio,
            float(o.max_audio_seconds),
            cache,
            int(o.audio_check_workers),
        )
        checked.append(dataset)
    train, valid = checked[0], checked[1]
    tests = dict(zip(tests, checked[2 : 2 + len(tests)]))
    held = dict(zip(held, checked[2 + len(tests) :]))
    datasets = [train, valid] + list(tests.values()) + list(held.values())

    def audio_pipelines(training):
        read = make_reader(sample_rate, bad_audio, training)

        @sb.utils.data_pipeline.takes("wav")
        @sb.utils.data_pipeline.provides("sig")
        def audio_pipeline(wav):
            return read(wav)

        @sb.utils.data_pipeline.takes("wav", "start", "stop")
        @sb.utils.data_pipeline.provides("sig")
        def segment_pipeline(wav, start, stop):
            return read(wav, *row_segment(start, stop))

        return audio_pipeline, segment_pipeline

    @sb.utils.data_pipeline.takes("wrd")
    @sb.utils.data_pipeline.provides("tokens_list", "tokens")
    def text_pipeline(wrd):
        tokens_list = tokenizer.sp.encode_as_ids(wrd)
        yield tokens_list
        yield torch.LongTensor(tokens_list)

    hop = o.hop_length  # None: a waveform encoder (SSL)

    @sb.utils.data_pipeline.takes("duration", "tokens_list")
    @sb.utils.data_pipeline.provides("ctc_fits")
    def fit_pipeline(duration, tokens_list):
        return ctc_required_frames(tokens_list) <= encoder_frames(duration, sample_rate, hop, encoder)

    for dataset in datasets:
        whole, segment = audio_pipelines(training=dataset is train)
        sb.dataio.dataset.add_dynamic_item([dataset], segment if has_segments(dataset) else whole)
    sb.dataio.dataset.add_dynamic_item(datasets, text_pipeline)
    sb.dataio.dataset.add_dynamic_item(datasets, fit_pipeline)

    n_before = len(train)
    train = train.filtered_sorted(key_max_value={"duration": o.max_duration})
    n_long = n_before - len(train)
    n_mid = len(train)
    train = train.filtered_sorted(key_test={"ctc_fits": lambda fits: bool(fits)})
    n_unfit = n_mid - len(train)
    logger.info(
        "Training manifest %s: %d utterances, %d dropped as longer than max_duration=%s s, "
        "%d dropped because their tokens cannot fit the encoder frames under CTC",
        o.train_csv,
        n_before,
        n_long,
        o.max_duration,
        n_unfit,
    )
    if len(train) == 0:
        raise ValueError(f"no usable training utterance left in {o.train_csv}")
    for name, ds in [("valid", valid)] + list(tests.items()) + list(held.items()):
        with ds.output_keys_as(["ctc_fits"]):
            bad = sum(1 for item in ds if not item["ctc_fits"])
        if bad:
            logger.warning("%s: %d utterances cannot be aligned under CTC (kept; they count as errors)", name, bad)

    valid = valid.filtered_sorted(sort_key="duration")
    tests = {name: ds.filtered_sorted(sort_key="duration") for name, ds in tests.items()}
    held = {name: ds.filtered_sorted(sort_key="duration") for name, ds in held.items()}
    sb.dataio.dataset.set_output_keys(
        [train, valid] + list(tests.values()) + list(held.values()), ["id", "sig", "wrd", "tokens"]
    )

    num_workers = o.num_workers
    loader = {
        "valid": {"batch_size": o.eval_batch_size, "num_workers": num_workers},
        "test": {"batch_size": o.eval_batch_size, "num_workers": num_workers},
    }
    if o.dynamic_batching:
        sampler = DynamicBatchSampler(
            train,
            max_batch_length=o.max_batch_length_train,
            num_buckets=o.num_buckets,
            length_func=lambda x: float(x["duration"]),
            shuffle=True,
            batch_ordering="random",
            seed=o.seed,
        )
        loader["train"] = {"batch_sampler": sampler, "num_workers": num_workers}
    else:
        sorting = o.sorting
        if sorting == "ascending":
            train = train.filtered_sorted(sort_key="duration")
        elif sorting == "descending":
            train = train.filtered_sorted(sort_key="duration", reverse=True)
        loader["train"] = {"batch_size": o.batch_size, "num_workers": num_workers, "shuffle": sorting == "random"}
    # The training loader draws its iterators' seeds from its own generator, not from the
    # global one, so that a run resumed from a checkpoint (which restores the global random
    # state, see checkpoints.RandomState) draws the same dropout masks as the uninterrupted run.
    loader["train"]["generator"] = torch.Generator().manual_seed(int(o.seed))
    return PreparedData(train, valid, tests, loader, audio_summary, held.get("controller"))
