"""The synthetic corpus's plan (:mod:`earlyexit_brain.data.synthetic` renders it): its options and
their checks, the eSpeak NG voices, the sentences of every split and the speakers, every random
choice drawn up front from the seed, so that the rendering is deterministic and parallel."""

import random
from typing import Dict, List, Sequence

from earlyexit_brain.data.text import top_words

SPLITS = ("train", "dev", "test", "test_unseen_voice")
#: The optional split of held-out utterances for the learned exit controller.
CONTROLLER_SPLIT = "controller"

#: eSpeak NG English accents used for speakers.
ACCENTS = (
    "en-us",
    "en",
    "en-gb-x-rp",
    "en-gb-scotland",
    "en-gb-x-gbclan",
    "en-gb-x-gbcwmd",
    "en-029",
    "en-us-nyc",
)


#: eSpeak NG voice variants (timbre). Whisper, croak and robot-like variants
#: are left out: they are not plausible speech.
VARIANTS = (
    "m1",
    "m2",
    "m3",
    "m4",
    "m5",
    "m6",
    "m7",
    "m8",
    "f1",
    "f2",
    "f3",
    "f4",
    "f5",
    "klatt",
    "klatt2",
    "klatt3",
    "klatt4",
    "klatt6",
    "Alex",
    "Alicia",
    "Andrea",
    "Andy",
    "Annie",
    "Denis",
    "Gene",
    "Hugo",
    "Jacky",
    "Lee",
    "Marco",
    "Mario",
    "Michael",
    "Mike",
    "Reed",
    "Storm",
    "adam",
    "anika",
    "announcer",
    "antonio",
    "aunty",
    "belinda",
    "benjamin",
    "boris",
    "caleb",
    "david",
    "ed",
    "edward",
    "grandma",
    "grandpa",
    "gustave",
    "ian",
    "iven",
    "john",
    "linda",
    "max",
    "michel",
    "miguel",
    "norbert",
    "pablo",
    "paul",
    "pedro",
    "quincy",
    "rob",
    "robert",
    "sandro",
    "shelby",
    "steph",
    "travis",
    "victor",
    "zac",
)


#: Default options; every one is a YAML key of the synthetic hparams files.
DEFAULTS = dict(
    seed=1234,
    n_train=6000,
    n_dev_sentences=200,
    n_test_sentences=300,
    max_vocab=3000,
    closed_vocabulary=True,
    min_words=4,
    max_words=14,
    n_train_speakers=120,
    n_unseen_speakers=24,
    n_unseen_variants=10,
    rate_range=(150, 220),
    pitch_range=(25, 75),
    noise_snr_db=(20.0, 40.0),
    gain_db=(-8.0, 0.0),
    n_controller_sentences=0,
)


def check_options(opts: Dict) -> None:
    """Validate corpus options; errors name the YAML key."""
    int_keys = (
        "seed",
        "n_train",
        "n_dev_sentences",
        "n_test_sentences",
        "max_vocab",
        "min_words",
        "max_words",
        "n_train_speakers",
        "n_unseen_speakers",
        "n_unseen_variants",
        "n_controller_sentences",
    )
    for key in int_keys:
        if isinstance(opts[key], bool) or not isinstance(opts[key], int):
            raise ValueError(f"synthetic corpus option '{key}' must be an integer, got {opts[key]!r}")
    for key in ("n_train", "n_dev_sentences", "n_test_sentences", "n_train_speakers", "n_unseen_speakers", "min_words"):
        if opts[key] < 1:
            raise ValueError(f"synthetic corpus option '{key}' must be >= 1, got {opts[key]}")
    if opts["n_controller_sentences"] < 0:
        raise ValueError(
            f"synthetic corpus option 'n_controller_sentences' must be >= 0, got {opts['n_controller_sentences']}"
        )
    if opts["n_controller_sentences"] and opts["max_vocab"] <= 0:
        raise ValueError(
            "synthetic corpus option 'n_controller_sentences' needs 'max_vocab' > 0: its sentences are "
            "those with one word outside the max_vocab most frequent words"
        )
    if opts["max_words"] < opts["min_words"]:
        raise ValueError("synthetic corpus options: 'max_words' must be >= 'min_words'")
    if not 1 <= opts["n_unseen_variants"] < len(VARIANTS):
        raise ValueError(f"synthetic corpus option 'n_unseen_variants' must be in 1..{len(VARIANTS) - 1}")
    for key in ("rate_range", "pitch_range", "noise_snr_db", "gain_db"):
        val = opts[key]
        if (
            not isinstance(val, (list, tuple))
            or len(val) != 2
            or not all(isinstance(v, (int, float)) for v in val)
            or val[0] > val[1]
        ):
            raise ValueError(f"synthetic corpus option '{key}' must be [low, high], got {val!r}")
    for key, low, high, unit in (("rate_range", 80, 450, " words/min"), ("pitch_range", 0, 100, "")):
        if not (low <= opts[key][0] and opts[key][1] <= high):
            raise ValueError(f"synthetic corpus option '{key}' must lie within {low}..{high}{unit}, got {opts[key]!r}")


def _split_sentences(sentences: List[str], n_train: int, n_dev: int, n_test: int, closed: bool, rng):
    """Shuffle, then hold out dev/test sentences.

    When ``closed``, every held-out word occurs in a training sentence that is
    actually spoken (the first ``n_train`` of the training pool), so WER
    measures recognition rather than the spelling of never-heard words.
    """
    pool = list(sentences)
    rng.shuffle(pool)
    need = n_dev + n_test
    n_distinct = min(n_train, len(pool) - need)
    if n_distinct < 1:
        raise ValueError(
            f"synthetic corpus: {len(pool)} sentences cannot give n_dev_sentences + "
            f"n_test_sentences = {need} held-out sentences; lower them or raise 'max_vocab'"
        )
    held: List[str] = []
    if n_distinct < len(pool) - need:
        # Training speaks only part of the pool: hold out from the rest.
        train = pool[:n_distinct]
        vocab = {w for s in train for w in s.split()}
        for s in pool[n_distinct:]:
            if len(held) == need:
                break
            if not closed or all(w in vocab for w in s.split()):
                held.append(s)
    else:
        # Training speaks the whole pool: hold out while every word keeps a training use.
        counts: Dict[str, int] = {}
        for s in pool:
            for w in s.split():
                counts[w] = counts.get(w, 0) + 1
        train = []
        for s in pool:
            words = s.split()
            ok = len(held) < need
            if ok and closed:
                local: Dict[str, int] = {}
                for w in words:
                    local[w] = local.get(w, 0) + 1
                ok = all(counts[w] - c >= 1 for w, c in local.items())
            if ok:
                held.append(s)
                for w in words:
                    counts[w] -= 1
            else:
                train.append(s)
    if len(held) < need:
        raise ValueError(
            f"synthetic corpus: only {len(held)} held-out sentences could be found for "
            f"n_dev_sentences + n_test_sentences = {need} (closed_vocabulary={closed}); "
            f"lower them, raise 'n_train' or 'max_vocab', or set closed_vocabulary: False"
        )
    return train, held[:n_dev], held[n_dev:]


def _make_speakers(prefix: str, n: int, variants: Sequence[str], opts: Dict, rng) -> List[Dict]:
    combos = [(a, v) for a in ACCENTS for v in variants]
    rng.shuffle(combos)
    speakers = []
    for i in range(n):
        accent, variant = combos[i % len(combos)]
        speakers.append(
            dict(
                spk_id=f"{prefix}{i:03d}",
                voice=f"{accent}+{variant}",
                rate=rng.uniform(*opts["rate_range"]),
                pitch=rng.uniform(*opts["pitch_range"]),
                pitch_range=rng.uniform(20, 80),
            )
        )
    return speakers


def plan_corpus(opts: Dict, sentences: List[str], controller_sentences: Sequence[str] = ()) -> Dict[str, List[Dict]]:
    """Decide every utterance (text, speaker, prosody, noise seed) for every split.

    ``controller_sentences`` (the candidates of the ``controller`` split) are drawn from after
    every other split, with a generator of their own: the other splits are the same with or
    without them.
    """
    rng = random.Random(opts["seed"])
    train_s, dev_s, test_s = _split_sentences(
        sentences,
        opts["n_train"],
        opts["n_dev_sentences"],
        opts["n_test_sentences"],
        opts["closed_vocabulary"],
        rng,
    )
    variants = list(VARIANTS)
    rng.shuffle(variants)
    unseen_variants = variants[: opts["n_unseen_variants"]]
    seen_variants = variants[opts["n_unseen_variants"] :]
    seen = _make_speakers("spk", opts["n_train_speakers"], seen_variants, opts, rng)
    unseen = _make_speakers("new", opts["n_unseen_speakers"], unseen_variants, opts, rng)

    def utt(split, idx, text, spk):
        return dict(
            ID=f"{split}-{spk['spk_id']}-{idx:06d}",
            spk_id=spk["spk_id"],
            text=text,
            voice=spk["voice"],
            rate=int(round(spk["rate"] * rng.uniform(0.92, 1.08))),
            pitch=int(round(min(100, max(0, spk["pitch"] + rng.uniform(-5, 5))))),
            pitch_range=int(round(spk["pitch_range"])),
            gain_db=rng.uniform(*opts["gain_db"]),
            snr_db=rng.uniform(*opts["noise_snr_db"]),
            noise_seed=rng.randrange(2**31),
        )

    plan: Dict[str, List[Dict]] = {s: [] for s in SPLITS}
    order = list(train_s)
    for i in range(opts["n_train"]):
        if i % len(order) == 0 and i > 0:
            rng.shuffle(order)
        plan["train"].append(utt("train", i, order[i % len(order)], rng.choice(seen)))
    for i, text in enumerate(dev_s):
        plan["dev"].append(utt("dev", i, text, rng.choice(seen)))
    for i, text in enumerate(test_s):
        plan["test"].append(utt("test", i, text, rng.choice(seen)))
    for i, text in enumerate(test_s):
        plan["test_unseen_voice"].append(utt("test_unseen_voice", i, text, rng.choice(unseen)))
    wanted = opts["n_controller_sentences"]
    if wanted:
        if len(controller_sentences) < wanted:
            raise ValueError(
                f"synthetic corpus: n_controller_sentences = {wanted}, but only {len(controller_sentences)} "
                f"sentences have exactly one word outside the {opts['max_vocab']} most frequent words"
            )
        rng = random.Random(f"{opts['seed']}-{CONTROLLER_SPLIT}")
        pool = sorted(controller_sentences)
        rng.shuffle(pool)
        plan[CONTROLLER_SPLIT] = [
            utt(CONTROLLER_SPLIT, i, text, rng.choice(seen)) for i, text in enumerate(pool[:wanted])
        ]
    return plan


def controller_candidates(sentences: Sequence[str], max_vocab: int) -> List[str]:
    """The distinct sentences with exactly one word outside the ``max_vocab`` most frequent words
    (ranked as :func:`~earlyexit_brain.data.text.restrict_vocabulary` ranks them): none can be a
    sentence of the vocabulary-restricted pool that train, dev and test come from."""
    vocab = top_words(sentences, max_vocab)
    return sorted({s for s in sentences if sum(w not in vocab for w in s.split()) == 1})
