"""The recipe YAMLs that are copies of one another agree outside the keys meant to differ.

Every recipe YAML is a complete file that reads top to bottom (as SpeechBrain's recipes do), so
some are copies of others: the WavLM and HuBERT recipes of the wav2vec2 one, each single-exit
baseline of its early-exit model, TED-LIUM's of LibriSpeech's, the attention-decoder and smoke
variants of the synthetic defaults. For each pair below, every top-level key is compared as
written (references unresolved, so that a key derived from a differing one is not a difference;
objects with their class and every argument), and the keys that differ must be exactly the
listed ones. A change to a shared key therefore goes into every copy, and a key meant to differ
that no longer does is named too. The exit-policy block is compared across every recipe.
"""

import glob
import os

import pytest
import yaml

ABSENT = "<absent>"


class _WrittenLoader(yaml.SafeLoader):
    """Reads a HyperPyYAML file as written: a tagged node becomes ``{tag: value}``."""


def _tagged(loader, suffix, node):
    if isinstance(node, yaml.MappingNode):
        value = loader.construct_mapping(node, deep=True)
    elif isinstance(node, yaml.SequenceNode):
        value = loader.construct_sequence(node, deep=True)
    else:
        value = loader.construct_scalar(node)
    return {"!" + suffix: value}


_WrittenLoader.add_multi_constructor("!", _tagged)


def written(repo_root, path):
    with open(os.path.join(repo_root, "hparams", path)) as fin:
        return yaml.load(fin, Loader=_WrittenLoader)


def keys_apart(a, b):
    return sorted(k for k in set(a) | set(b) if a.get(k, ABSENT) != b.get(k, ABSENT))


#: The attention-decoder exits' own keys (conformer_aed_ee.yaml, smoke_aed.yaml).
DECODER_KEYS = [
    "bos_index",
    "eos_index",
    "ctc_weight",
    "label_smoothing",
    "beam_size",
    "valid_beam_size",
    "decode_ctc_weight",
    "aed_length_normalization",
    "aed_length_reward",
    "max_decode_ratio",
    "aed_lm_weight",
    "aed_lm_word_bonus",
    "aed_lm_oov_penalty",
    "num_exits",
    "decoder_layers",
    "decoder_d_model",
    "decoder_nhead",
    "decoder_d_ffn",
    "share_embedding",
    "decoders",
    # the objects that hold the decoders, and the loss with their cross-entropy
    "modules",
    "model",
    "ctc_heads",
    "loss",
    "test_decoders",
]
#: The sizes and budgets that make the smoke recipes quick.
SMOKE_KEYS = [
    "data_folder",
    "corpus_options",
    "number_of_epochs",
    "max_batch_length_train",
    "eval_batch_size",
    "warmup_steps",
    "ctc_beam_size",
    "ctc_lm_alpha",
    "ctc_lm_beta",
    "ngram_order",
    "sweep_points",
    "latency_durations",
    "n_mels",
    "num_layers",
    "d_model",
    "d_ffn",
    "kernel_size",
    "exit_layers",
    "frontend_channels",
    "ckpt_interval_minutes",
]

COPIES = [
    # (the file copied, its copy, the keys meant to differ)
    ("librispeech/wav2vec2_ctc_ee.yaml", "librispeech/wavlm_ctc_ee.yaml", ["output_folder", "ssl_source"]),
    ("librispeech/wav2vec2_ctc_ee.yaml", "librispeech/hubert_ctc_ee.yaml", ["output_folder", "ssl_source"]),
    (
        "librispeech/conformer_ctc_ee.yaml",
        "librispeech/conformer_ctc_single.yaml",
        ["output_folder", "exit_layers", "policy_evaluation"],
    ),
    (
        "librispeech/conformer_ctc_ee.yaml",
        "librispeech/conformer_aed_ee.yaml",
        ["output_folder", "valid_decoder", *DECODER_KEYS],
    ),
    (
        "librispeech/conformer_ctc_ee.yaml",
        "tedlium/conformer_ctc_ee.yaml",
        [
            "output_folder",
            "prepare_corpus",
            "corpus_options",
            "train_splits",
            "dev_splits",
            "test_splits",
            "partition",
            "valid_csv",
            "test_sets",
            "test_csv",
        ],
    ),
    (
        "synthetic/conformer_ctc_ee.yaml",
        "synthetic/conformer_ctc_single.yaml",
        [
            "output_folder",
            "exit_layers",
            "policy_evaluation",
            "exit_distillation_weight",
            "exit_distillation_from_epoch",
            "loss",
            "controller_csv",
            "exit_controller",
        ],
    ),  # one exit: nothing to distil, no exit to choose
    (
        "synthetic/conformer_ctc_ee.yaml",
        "synthetic/conformer_aed_ee.yaml",
        [
            "output_folder",
            "output_neurons",
            "exit_distillation_weight",
            "exit_distillation_from_epoch",
            "exit_controller",  # the attention beam search over the controller's utterances: opt-in
            *DECODER_KEYS,
        ],
    ),
    (
        "synthetic/conformer_ctc_ee.yaml",
        "synthetic/smoke.yaml",
        ["output_folder", *SMOKE_KEYS, "exit_distillation_weight", "exit_distillation_from_epoch", "loss"],
    ),
    (
        "synthetic/smoke.yaml",
        "synthetic/smoke_aed.yaml",
        ["output_folder", "output_neurons", "valid_decoder", "ctc_beam_size", *DECODER_KEYS, "opt_class"],
    ),  # smoke_aed's AdamW is not the fused one
    (
        "synthetic/conformer_aed_ee.yaml",
        "synthetic/smoke_aed.yaml",
        [
            "output_folder",
            *SMOKE_KEYS,
            "valid_decoder",
            "beam_size",
            "valid_beam_size",
            "max_decode_ratio",
            "aed_lm_weight",
            "aed_lm_word_bonus",
            "decoder_nhead",
            "decoder_d_ffn",
            "opt_class",
            "exit_controller",
        ],
    ),
]


@pytest.mark.parametrize("main, copy, differ", COPIES, ids=[f"{a} {b}" for a, b, _ in COPIES])
def test_copies_agree_outside_the_keys_meant_to_differ(repo_root, main, copy, differ):
    apart = keys_apart(written(repo_root, main), written(repo_root, copy))
    assert apart == sorted(set(differ)), (
        f"hparams/{copy} against hparams/{main}: keys apart that are not listed: "
        f"{sorted(set(apart) - set(differ))}; listed keys that agree: {sorted(set(differ) - set(apart))}"
    )


POLICY_KEYS = [
    "policy_evaluation",
    "policy_sweep",
    "sweep_points",
    "calibration_target",
    "calibration_value",
    "calibration_confidence",
    "default_policy",
    "nbest_beam_size",
    "nbest_token_prune_logp",
    "entropy_normalize",
    "posterior_greedy_form",
    "latency_durations",
    "exit_controller",
    "controller_hidden_units",
    "controller_weight_decay",
]
#: Per recipe, the exit-policy keys that differ from hparams/synthetic/conformer_ctc_ee.yaml's.
POLICY_DIFFERENCES = {
    "librispeech/conformer_ctc_single.yaml": ["policy_evaluation", "exit_controller"],  # one exit: nothing to choose
    "synthetic/conformer_ctc_single.yaml": ["policy_evaluation", "exit_controller"],
    "synthetic/conformer_aed_ee.yaml": ["exit_controller"],  # opt-in: an attention beam search per utterance
    "synthetic/smoke.yaml": ["sweep_points", "latency_durations"],  # quick
    "synthetic/smoke_aed.yaml": ["sweep_points", "latency_durations"],
    "synthetic/wav2vec2_ctc_ee.yaml": ["sweep_points", "latency_durations"],
    # real corpora: no held-out set of their own for the controller (docs/exit_policies.md)
    **{
        f"{corpus}/{name}.yaml": ["exit_controller"]
        for corpus, names in {
            "librispeech": ["conformer_aed_ee", "conformer_ctc_ee", "hubert_ctc_ee", "splitformer_ctc_ee"]
            + ["wav2vec2_ctc_ee", "wavlm_ctc_ee"],
            "tedlium": ["conformer_ctc_ee"],
        }.items()
        for name in names
    },
}


def test_every_recipe_has_the_default_exit_policy_block(repo_root):
    main = written(repo_root, "synthetic/conformer_ctc_ee.yaml")
    assert set(POLICY_KEYS) <= set(main)
    paths = sorted(
        os.path.relpath(p, os.path.join(repo_root, "hparams"))
        for p in glob.glob(os.path.join(repo_root, "hparams", "*", "*.yaml"))
    )
    assert len(paths) >= 13 and set(POLICY_DIFFERENCES) <= set(paths)
    for path in paths:
        values = written(repo_root, path)
        apart = [k for k in POLICY_KEYS if values.get(k, ABSENT) != main[k]]
        assert apart == POLICY_DIFFERENCES.get(path, []), path
