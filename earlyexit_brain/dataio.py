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
import logging
import os
from typing import Dict, List, Optional, Tuple

import speechbrain as sb
import torch
from speechbrain.dataio.dataset import DynamicItemDataset
from speechbrain.dataio.sampler import DynamicBatchSampler

from .audio_check import check_manifest_audio, make_reader, row_segment

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
        raise ValueError(f"manifest {csv_path}: no {', '.join(repr(m) for m in missing)} "
                         f"column{'s' if len(missing) > 1 else ''}; a manifest needs the columns "
                         f"{','.join(REQUIRED_COLUMNS)} (spk_id, start and stop are optional)")
    try:
        return DynamicItemDataset.from_csv(csv_path=csv_path, replacements={"data_root": data_folder})
    except (KeyError, ValueError) as err:  # e.g. a duration that is not a number, a repeated ID
        raise ValueError(f"manifest {csv_path}: {err}") from None


def dataio_prepare(hparams: Dict, tokenizer, encoder) -> Tuple[DynamicItemDataset, DynamicItemDataset, Dict, Dict]:
    """Build train/valid/test datasets with audio and token pipelines.

    Training utterances whose token sequence cannot fit the encoder's frames
    under CTC, or longer than ``max_duration``, are filtered out and counted in
    the log. Validation and test sets are never filtered: an utterance that
    cannot be aligned counts as errors rather than disappearing.

    Returns
    -------
    train, valid, tests, loader_kwargs
        ``tests`` maps each name in ``test_sets`` to its dataset;
        ``loader_kwargs`` has ``train``/``valid``/``test`` DataLoader options.
    """
    data_folder = hparams["data_folder"]
    train = _load(hparams["train_csv"], data_folder)
    valid = _load(hparams["valid_csv"], data_folder)
    tests = {name: _load(hparams["test_csv"][name], data_folder) for name in hparams["test_sets"]}

    sample_rate = hparams["sample_rate"]
    bad_audio = hparams.get("bad_audio", "skip")
    cache = os.path.join(hparams["save_folder"], "audio_check") if "save_folder" in hparams else None
    manifests = {"train": hparams["train_csv"], "valid": hparams["valid_csv"], **hparams["test_csv"]}
    audio_summary = {}
    checked = []
    for name, dataset in [("train", train), ("valid", valid)] + list(tests.items()):
        dataset, audio_summary[name] = check_manifest_audio(
            dataset, name, manifests[name], sample_rate, bad_audio,
            float(hparams.get("max_audio_seconds", 120.0)), cache,
            int(hparams.get("audio_check_workers", 4)))
        checked.append(dataset)
    train, valid = checked[0], checked[1]
    tests = dict(zip(tests, checked[2:]))
    datasets = [train, valid] + list(tests.values())
    hparams["audio_check"] = audio_summary  # report.json: bad audio left out, resampled, down-mixed

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

    hop = hparams.get("hop_length")  # None: a waveform encoder (SSL)

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
    train = train.filtered_sorted(key_max_value={"duration": hparams["max_duration"]})
    n_long = n_before - len(train)
    n_mid = len(train)
    train = train.filtered_sorted(key_test={"ctc_fits": lambda fits: bool(fits)})
    n_unfit = n_mid - len(train)
    logger.info(
        "Training manifest %s: %d utterances, %d dropped as longer than max_duration=%s s, "
        "%d dropped because their tokens cannot fit the encoder frames under CTC",
        hparams["train_csv"], n_before, n_long, hparams["max_duration"], n_unfit,
    )
    if len(train) == 0:
        raise ValueError(f"no usable training utterance left in {hparams['train_csv']}")
    for name, ds in [("valid", valid)] + list(tests.items()):
        with ds.output_keys_as(["ctc_fits"]):
            bad = sum(1 for item in ds if not item["ctc_fits"])
        if bad:
            logger.warning("%s: %d utterances cannot be aligned under CTC (kept; they count "
                           "as errors)", name, bad)

    valid = valid.filtered_sorted(sort_key="duration")
    tests = {name: ds.filtered_sorted(sort_key="duration") for name, ds in tests.items()}
    sb.dataio.dataset.set_output_keys([train, valid] + list(tests.values()),
                                      ["id", "sig", "wrd", "tokens"])

    num_workers = hparams.get("num_workers", 0)
    loader = {
        "valid": {"batch_size": hparams["eval_batch_size"], "num_workers": num_workers},
        "test": {"batch_size": hparams["eval_batch_size"], "num_workers": num_workers},
    }
    if hparams.get("dynamic_batching", False):
        sampler = DynamicBatchSampler(
            train,
            max_batch_length=hparams["max_batch_length_train"],
            num_buckets=hparams.get("num_buckets", 20),
            length_func=lambda x: float(x["duration"]),
            shuffle=True,
            batch_ordering="random",
            seed=hparams["seed"],
        )
        loader["train"] = {"batch_sampler": sampler, "num_workers": num_workers}
    else:
        sorting = hparams.get("sorting", "random")
        if sorting == "ascending":
            train = train.filtered_sorted(sort_key="duration")
        elif sorting == "descending":
            train = train.filtered_sorted(sort_key="duration", reverse=True)
        loader["train"] = {"batch_size": hparams["batch_size"], "num_workers": num_workers,
                           "shuffle": sorting == "random"}
    # The training loader draws its iterators' seeds from its own generator, not from the
    # global one, so that a run resumed from a checkpoint (which restores the global random
    # state, see checkpoints.RandomState) draws the same dropout masks as the uninterrupted run.
    loader["train"]["generator"] = torch.Generator().manual_seed(int(hparams["seed"]))
    return train, valid, tests, loader
