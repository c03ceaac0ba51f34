"""Tiny LibriSpeech- and TED-LIUM-3-shaped trees generated for the tests (no download).

Audio is synthetic (a tone per word plus light noise, 16 kHz): enough for the
preparation, the data pipeline and short debug runs of the recipes, not for
learning. LibriSpeech files are FLAC, TED-LIUM talks NIST SPHERE (16-bit PCM),
both written with soundfile.
"""

import os

import numpy as np
import soundfile as sf

SR = 16000
WORDS = (
    (
        "the a of and to in is was he it that for with as his on be at by had not but "
        "what all were when we there can an your which their said if do will each about how up "
        "out them then she many some so these would other into has more her two like him see "
        "time could no make than first been its who now people my made over did down only way "
        "find use may water long little very after words called just where most know"
    )
    .upper()
    .split()
)

#: split -> speakers (each one chapter) of the generated LibriSpeech tree
LIBRI_LAYOUT = {
    "train-clean-100": ["19", "26"],
    "train-other-500": ["32"],
    "dev-clean": ["40"],
    "test-clean": ["50"],
    "test-other": ["60"],
}
LIBRI_UTTS = 4  # utterances per chapter


def tone_speech(words, rng, word_seconds=0.18, pad=0.15):
    """A waveform with one short tone per word (frequency from the word), plus noise."""
    pieces = [np.zeros(int(pad * SR), dtype=np.float32)]
    for w in words:
        f = 150.0 + (sum(map(ord, w)) % 40) * 20.0
        n = int(word_seconds * SR)
        t = np.arange(n) / SR
        pieces.append((0.3 * np.sin(2 * np.pi * f * t) * np.hanning(n)).astype(np.float32))
        pieces.append(np.zeros(int(0.04 * SR), dtype=np.float32))
    pieces.append(np.zeros(int(pad * SR), dtype=np.float32))
    wav = np.concatenate(pieces)
    return wav + 0.005 * rng.standard_normal(wav.shape[0]).astype(np.float32)


def sentence(rng, low=3, high=6):
    return [WORDS[i] for i in rng.integers(0, len(WORDS), size=int(rng.integers(low, high + 1)))]


def make_librispeech(root, seed=0, layout=None, utts=LIBRI_UTTS):
    """Write ``root/<split>/<spk>/<chap>/<spk>-<chap>-<utt>.flac`` + ``.trans.txt``.

    Returns ``{utt_id: (split, words, n_samples)}``.
    """
    rng = np.random.default_rng(seed)
    info = {}
    for split, speakers in (layout or LIBRI_LAYOUT).items():
        for spk in speakers:
            chap = str(100 + int(spk))
            folder = os.path.join(root, split, spk, chap)
            os.makedirs(folder, exist_ok=True)
            lines = []
            for u in range(utts):
                utt_id = f"{spk}-{chap}-{u:04d}"
                words = sentence(rng)
                wav = tone_speech(words, rng)
                sf.write(os.path.join(folder, utt_id + ".flac"), wav, SR, format="FLAC", subtype="PCM_16")
                lines.append(f"{utt_id} {' '.join(words)}")
                info[utt_id] = (split, " ".join(words), wav.shape[0])
            with open(os.path.join(folder, f"{spk}-{chap}.trans.txt"), "w") as fout:
                fout.write("\n".join(lines) + "\n")
    return info


#: split -> talks of the generated TED-LIUM tree (per partition)
TED_LAYOUT = {"train": ["AliceTalk_2010", "BobTalk_2012X"], "dev": ["CarolTalk_2011"], "test": ["DaveTalk_2013"]}
TED_SEGMENTS = 5  # scored segments per talk


def make_tedlium(root, seed=0, partitions=("legacy", "speaker-adaptation"), layout=None):
    """Write ``root/<partition>/<split>/{sph,stm}/<talk>.{sph,stm}``.

    Each talk: an ignored gap segment first, ``TED_SEGMENTS`` scored segments
    (lower case, contractions split as `` 's``, an ``<unk>``), one segment made
    only of ``<unk>`` (empty once normalised), a label field on every line.
    Returns ``{(partition, split): [(talk, start, stop, normalised words), ...]}``.
    """
    rng = np.random.default_rng(seed)
    truth = {}
    for partition in partitions:
        for split, talks in (layout or TED_LAYOUT).items():
            sph_dir = os.path.join(root, partition, split, "sph")
            stm_dir = os.path.join(root, partition, split, "stm")
            os.makedirs(sph_dir, exist_ok=True)
            os.makedirs(stm_dir, exist_ok=True)
            segs = []
            for talk in talks:
                audio, lines, t = [np.zeros(int(0.5 * SR), dtype=np.float32)], [], 0.5
                lines.append(f"{talk} 1 inter_segment_gap 0.00 0.50 <o,,unknown> ignore_time_segment_in_scoring")
                for k in range(TED_SEGMENTS + 1):
                    if k == TED_SEGMENTS:
                        raw, norm = "<unk>", None
                        wav = tone_speech(["UNK"], rng)
                    else:
                        words = [w.lower() for w in sentence(rng)]
                        raw_words = list(words)
                        if k % 2 == 0:  # a contraction, split as in the stm files
                            raw_words.insert(1, "'s")
                            words[0] = words[0] + "'s"
                        if k == 1:
                            raw_words.append("<unk>")
                        raw, norm = " ".join(raw_words), " ".join(words)
                        wav = tone_speech(words, rng)
                    start, stop = t, t + wav.shape[0] / SR
                    lines.append(f"{talk} 1 {talk} {start:.2f} {stop:.2f} <o,f0,female> {raw}")
                    if norm is not None:
                        segs.append((talk, round(start, 2), round(stop, 2), norm))
                    audio.append(wav)
                    gap = np.zeros(int(0.3 * SR), dtype=np.float32)
                    audio.append(gap)
                    t = stop + 0.3
                sf.write(
                    os.path.join(sph_dir, talk + ".sph"), np.concatenate(audio), SR, format="NIST", subtype="PCM_16"
                )
                with open(os.path.join(stm_dir, talk + ".stm"), "w") as fout:
                    fout.write("\n".join(lines) + "\n")
            truth[(partition, split)] = segs
    return truth
