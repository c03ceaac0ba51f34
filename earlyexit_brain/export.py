"""Write an inference folder: what :class:`~earlyexit_brain.inference.EarlyExitASR` (and, at
the default exit, SpeechBrain's ``EncoderASR``) loads.

The folder holds ``hyperparams.yaml``, ``model.ckpt`` (encoder, exit heads and any
exit decoders), ``normalizer.ckpt``, ``tokenizer.ckpt``, ``exit_policies.ckpt``
(calibrated thresholds, JSON), ``latency_table.ckpt`` (per-exit latency measured on
the training device, JSON) and, for models decoded with a word n-gram,
``ngram_lm.ckpt``.
"""

import json
import os
import shutil
from typing import Dict, Optional

import torch

from .files import atomic_folder, atomic_write_text
from .latency import LatencyTable
from .records import JsonRecord

# ---------------------------------------------------------------- export
INFERENCE_YAML = """\
# ############################################################################
# Inference hyperparameters of an early-exit model (earlyexit_brain).
# Load with earlyexit_brain.inference.EarlyExitASR.from_hparams(source=<folder>)
# or, at the default exit only, with speechbrain.inference.ASR.EncoderASR.
# Written by earlyexit_brain.export.export_inference_folder.
# ############################################################################

sample_rate: {sample_rate}
blank_index: {blank_index}
default_exit: {default_exit}     # exit (1-based) used by the module's forward

compute_features: !new:{features_class}
{features}

normalize: !new:{normalize_class}
{normalize}

ee_encoder: !new:{encoder_class}
{encoder}

ctc_heads: !new:{heads_class}
{heads}
{decoders}
encoder: !new:earlyexit_brain.models.pipeline.{model_class}
    compute_features: !ref <compute_features>
    normalize: !ref <normalize>
    encoder: !ref <ee_encoder>
    heads: !ref <ctc_heads>
    default_exit: !ref <default_exit>
{search}
model: !new:torch.nn.ModuleList
    - [!ref <ee_encoder>, !ref <ctc_heads>{decoders_ref}]

decoding_function: !name:speechbrain.decoders.ctc_greedy_decode
    blank_id: !ref <blank_index>

tokenizer: !new:sentencepiece.SentencePieceProcessor

audio_normalizer: !new:speechbrain.dataio.preprocess.AudioNormalizer
    sample_rate: !ref <sample_rate>

exit_policies: !new:earlyexit_brain.records.JsonRecord
latency_table: !new:earlyexit_brain.records.JsonRecord
{lm_record}
modules:
    encoder: !ref <encoder>

pretrainer: !new:speechbrain.utils.parameter_transfer.Pretrainer
    loadables:
        model: !ref <model>
        normalizer: !ref <normalize>
        tokenizer: !ref <tokenizer>
        exit_policies: !ref <exit_policies>
        latency_table: !ref <latency_table>
{lm_loadable}"""


def _yaml_block(config: Dict) -> str:
    return "\n".join(f"    {key}: {json.dumps(value)}" for key, value in config.items())


def _class_path(obj) -> str:
    return f"{type(obj).__module__}.{type(obj).__qualname__}"


def _decoder_parts(model) -> Dict[str, str]:
    """The inference YAML's pieces that differ between CTC and attention-decoder (AED) models."""
    if not model.has_decoders:
        return {"decoders": "", "model_class": "EarlyExitCTCModel", "search": "", "decoders_ref": ""}
    return {
        "decoders": f"\ndecoders: !new:{_class_path(model.decoders)}\n{_yaml_block(model.decoders.config)}\n",
        "model_class": "EarlyExitAEDModel",
        "search": "    decoders: !ref <decoders>\n" + _yaml_block(model.search_options) + "\n",
        "decoders_ref": ", !ref <decoders>",
    }


def export_inference_folder(
    folder: str,
    model,
    features_config: Dict,
    tokenizer_path: str,
    blank_index: int = 0,
    policies: Optional[Dict] = None,
    latency_table: Optional[LatencyTable] = None,
    lm_path: Optional[str] = None,
    key: str = "inference folder",
) -> str:
    """Write an inference folder that :class:`EarlyExitASR` loads; returns its path.

    ``model`` is an :class:`~earlyexit_brain.models.pipeline.EarlyExitCTCModel`
    holding the trained weights; ``features_config`` the Fbank arguments
    (``sample_rate``, ``n_fft``, ``n_mels``, ``hop_length``, ``win_length``);
    ``tokenizer_path`` the SentencePiece ``.model`` file; ``lm_path`` a word n-gram
    (ARPA or KenLM binary) copied as ``ngram_lm.ckpt`` for CTC beam search (or the
    attention search that fuses it). The folder is built
    beside its destination and moved into place, so a crash never leaves a
    half-written folder behind. An existing ``folder`` is replaced only if this
    function made it (:func:`~earlyexit_brain.files.atomic_folder`); otherwise a
    :class:`~earlyexit_brain.files.NotOurFolderError` names ``key`` and the folder.
    """
    folder = os.path.abspath(folder)
    # Fbank + global InputNormalization (the Conformer), or modules that carry their own
    # ``config`` (the SSL encoders' WaveformFeatures / WaveformNormalization)
    features_class, normalize_class = (
        "speechbrain.lobes.features.Fbank",
        "speechbrain.processing.features.InputNormalization",
    )
    features = dict(features_config)
    normalize_config: Dict = {"norm_type": "global"}
    if hasattr(model.compute_features, "config"):
        features_class, features = _class_path(model.compute_features), dict(model.compute_features.config)
    if hasattr(model.normalize, "config"):
        normalize_class, normalize_config = _class_path(model.normalize), dict(model.normalize.config)
    with atomic_folder(folder, "inference_folder", key, prefix=".inference-", legacy=("exit_policies.ckpt",)) as tmp:
        text = INFERENCE_YAML.format(
            sample_rate=int(features_config["sample_rate"]),
            blank_index=int(blank_index),
            default_exit=int(model.default_exit),
            features=_yaml_block(features),
            features_class=features_class,
            normalize_class=normalize_class,
            normalize=_yaml_block(normalize_config),
            encoder_class=_class_path(model.encoder),
            encoder=_yaml_block(model.encoder.config),
            heads_class=_class_path(model.heads),
            heads=_yaml_block(model.heads.config),
            **_decoder_parts(model),
            lm_record=(
                "ngram_lm: !new:earlyexit_brain.records.FileRecord   # word n-gram (ctc_beam, fused search)\n"
                if lm_path
                else ""
            ),
            lm_loadable="        ngram_lm: !ref <ngram_lm>\n" if lm_path else "",
        )
        atomic_write_text(os.path.join(tmp, "hyperparams.yaml"), text)
        parts = [model.encoder, model.heads] + ([model.decoders] if model.has_decoders else [])
        weights = torch.nn.ModuleList(parts).state_dict()
        torch.save(weights, os.path.join(tmp, "model.ckpt"))
        model.normalize._save(os.path.join(tmp, "normalizer.ckpt"))
        shutil.copyfile(tokenizer_path, os.path.join(tmp, "tokenizer.ckpt"))
        JsonRecord(policies or {})._save(os.path.join(tmp, "exit_policies.ckpt"))
        JsonRecord(latency_table.to_json() if latency_table else {})._save(os.path.join(tmp, "latency_table.ckpt"))
        if lm_path:
            shutil.copyfile(lm_path, os.path.join(tmp, "ngram_lm.ckpt"))
    return folder
