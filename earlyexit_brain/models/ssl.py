"""Early-exit encoder over a pre-trained wav2vec2 / WavLM / HuBERT model (Hugging Face).

:class:`EarlyExitSSLEncoder` wraps a ``transformers`` ``Wav2Vec2Model``,
``WavLMModel`` or ``HubertModel`` and taps the hidden state after the
transformer layers listed in ``exit_layers``. It has the same interface as
:class:`earlyexit_brain.models.conformer.EarlyExitConformerEncoder`
(``exit_layers``, ``num_layers``, ``config``, ``forward``, ``start`` /
``advance`` / ``select``, ``iter_exits``, ``params_to_exit``,
``output_frames``), so the Brain, the exit policies, evaluation, export and
``EarlyExitASR`` use it unchanged. Its input is the raw waveform ``(B, S)``:
the YAML's ``compute_features`` is :class:`WaveformFeatures` (the identity) and
its ``normalize`` is :class:`WaveformNormalization`.

The layers are run one by one here (the model's own ``encoder.forward`` runs
them all), mirroring the Hugging Face code: padded frames zeroed, convolutional
positional embedding, then

- post-norm layout (``do_stable_layer_norm=False``, base models): the
  encoder's ``layer_norm`` is applied *before* the layers, as HF does; each
  exit's hidden state is the layer's output as it is (every post-norm layer
  ends with a LayerNorm);
- stable-layer-norm layout (large models): HF applies ``encoder.layer_norm``
  *after the last layer* only. Here that final norm is applied to the hidden
  state of *every* exit (the layer outputs of a pre-norm stack are not
  normalised), so the last exit equals the full model's ``last_hidden_state``
  and every exit's head sees inputs on the scale the pre-trained model's top
  was trained to produce.

WavLM's relative position bias, computed by its first layer, is carried
between layers in the state (and cut with the batch in :meth:`select`).
LayerDrop is only ever applied in training mode; ``eval()`` turns it off.
"""

import json
import os
import re
from dataclasses import dataclass
from typing import Any, Dict, Optional, Sequence, Union

import torch
from torch import nn

from ..utils import padding_mask, valid_frames
from .exits import CTCExitHeads, IncrementalExits, resolve_exit_layers

SUPPORTED_MODEL_TYPES = ("wav2vec2", "wavlm", "hubert")
_NO_NORM = nn.Identity()  # the post-norm layout's exits: each layer ends with its own LayerNorm
_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")


def check_source(source: str, key: str = "ssl_source") -> bool:
    """Check that ``source`` is a local model folder or has the form of a Hub id.

    Returns True when it is a local folder. Raises ``ValueError`` naming ``key``
    otherwise (a folder without ``config.json``, or a string that is neither).
    """
    if not isinstance(source, str) or not source:
        raise ValueError(f"{key}: expected a Hub id (owner/name) or a local model folder, got {source!r}")
    if os.path.isdir(source):
        if not os.path.isfile(os.path.join(source, "config.json")):
            raise ValueError(
                f"{key}: the folder {source!r} has no config.json (not a saved "
                f"Hugging Face model; save one with save_pretrained)"
            )
        return True
    if os.path.exists(source) or not _HUB_ID.match(source):
        raise ValueError(
            f"{key}: {source!r} is neither a local model folder nor a Hugging Face Hub id of the form owner/name"
        )
    return False


def _build_hf_model(source: Optional[str], hf_config: Optional[Dict[str, Any]], key: str):
    from transformers import AutoConfig, AutoModel

    if hf_config is not None:
        cfg = dict(hf_config)
        model_type = cfg.pop("model_type", None)
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise ValueError(
                f"{key}: model type {model_type!r} is not supported; accepted: {', '.join(SUPPORTED_MODEL_TYPES)}"
            )
        config = AutoConfig.for_model(model_type, **cfg)
        return AutoModel.from_config(config)
    local = check_source(source, key)
    try:
        config = AutoConfig.from_pretrained(source, local_files_only=local)
    except OSError as err:
        raise ValueError(f"{key}: cannot load a model configuration from {source!r} ({err})") from err
    if config.model_type not in SUPPORTED_MODEL_TYPES:
        raise ValueError(
            f"{key}: {source!r} is a {config.model_type!r} model, which has no "
            f"wav2vec2-style transformer layers to tap; accepted model types: "
            f"{', '.join(SUPPORTED_MODEL_TYPES)}"
        )
    return AutoModel.from_pretrained(source, local_files_only=local)


def _json_config(config) -> Dict[str, Any]:
    """A plain-JSON dict of a HF config (enough to rebuild the model without download)."""
    data = json.loads(config.to_json_string(use_diff=False))
    for name in ("_name_or_path", "architectures", "transformers_version", "dtype", "torch_dtype"):
        data.pop(name, None)
    data["model_type"] = config.model_type
    return data


@dataclass
class SSLEncoderState:
    """Where an incremental run stands: ``x`` ``(B, T', D)`` after ``layer`` layers,
    ``frames`` ``(B,)`` valid frames, the layers' attention mask and WavLM's position bias."""

    x: torch.Tensor
    frames: torch.Tensor
    layer: int
    valid: torch.Tensor  # (B, T') bool, True on valid frames
    attention_mask: Optional[torch.Tensor]
    position_bias: Optional[torch.Tensor]
    frozen: bool = False  # run without gradients (ssl_freeze_steps)


class WaveformFeatures(nn.Module):
    """``compute_features`` for SSL encoders: the waveform ``(B, S)`` itself.

    ``sample_rate`` is only recorded (the exported inference YAML rebuilds the
    module from ``config``); the SSL models expect 16 kHz audio.
    """

    def __init__(self, sample_rate: int = 16000):
        super().__init__()
        self.config = {"sample_rate": int(sample_rate)}

    def forward(self, wavs: torch.Tensor) -> torch.Tensor:
        return wavs


class WaveformNormalization(nn.Module):
    """``normalize`` for SSL encoders, called as ``normalize(wavs, lengths)``.

    With ``enabled`` each utterance is scaled to zero mean and unit variance
    over its valid samples (what the HF feature extractor's ``do_normalize``
    does for models trained that way, e.g. wav2vec2-large-lv60, WavLM); padded
    samples are set to 0. It holds no statistics; its settings are in
    ``config`` (written into exported inference YAML files).
    """

    def __init__(self, enabled: bool = True, eps: float = 1e-7):
        super().__init__()
        self.enabled = bool(enabled)
        self.eps = eps
        self.config = {"enabled": self.enabled, "eps": float(eps)}

    def forward(self, wavs: torch.Tensor, lengths: Optional[torch.Tensor] = None) -> torch.Tensor:
        if not self.enabled:
            return wavs
        samples = valid_frames(wavs, lengths)
        valid = ~padding_mask(samples, wavs.shape[1])
        count = samples.to(wavs.dtype)[:, None]
        mean = (wavs * valid).sum(1, keepdim=True) / count
        var = (((wavs - mean) * valid) ** 2).sum(1, keepdim=True) / count
        return torch.where(valid, (wavs - mean) / torch.sqrt(var + self.eps), torch.zeros_like(wavs))

    def _save(self, path):
        """Write the (empty) state dict: the file stands where InputNormalization's statistics
        stand in exported folders and loads with SpeechBrain's default module transfer."""
        torch.save(self.state_dict(), path)


class EarlyExitSSLEncoder(IncrementalExits, nn.Module):
    """wav2vec2 / WavLM / HuBERT with an exit after selected transformer layers.

    Arguments
    ---------
    source : str, optional
        Hub id (``facebook/wav2vec2-base``) or local folder saved with
        ``save_pretrained`` (loaded with ``local_files_only``).
    exit_layers : list of int, int or str
        1-based transformer layers with an exit (see ``resolve_exit_layers``).
    freeze_feature_extractor : bool
        Freeze the convolutional feature extractor (run without gradients).
    freeze_steps : int
        Run the whole SSL model without gradients for the first ``freeze_steps``
        training forwards (only the exit heads learn meanwhile). The step count
        is a buffer, saved with the model.
    hf_config : dict, optional
        A model configuration (``config.to_dict()``): build a randomly
        initialised model from it instead of loading ``source``. Exported
        inference folders use it, so no download is needed; the weights come
        from the folder's ``model.ckpt``.
    overrides : dict, optional
        Config attributes set before loading (e.g. ``layerdrop``,
        ``mask_time_prob``, ``hidden_dropout``).

    Example
    -------
    >>> cfg = dict(model_type="wav2vec2", hidden_size=32, num_hidden_layers=2,
    ...            num_attention_heads=2, intermediate_size=64, conv_dim=[16, 16],
    ...            conv_stride=[5, 2], conv_kernel=[10, 3], num_conv_pos_embeddings=16,
    ...            num_conv_pos_embedding_groups=2)
    >>> enc = EarlyExitSSLEncoder(hf_config=cfg, exit_layers=[1, 2]).eval()
    >>> [h.shape for h in enc(torch.randn(2, 1600), torch.tensor([1.0, 0.5]))]
    [torch.Size([2, 159, 32]), torch.Size([2, 159, 32])]
    """

    def __init__(
        self,
        source: Optional[str] = None,
        exit_layers: Union[Sequence[int], int, str] = 2,
        freeze_feature_extractor: bool = True,
        freeze_steps: int = 0,
        hf_config: Optional[Dict[str, Any]] = None,
        overrides: Optional[Dict[str, Any]] = None,
    ):
        super().__init__()
        if source is None and hf_config is None:
            raise ValueError("ssl_source: give a Hub id or a local model folder")
        model = _build_hf_model(source, hf_config, "ssl_source")
        for name, value in (overrides or {}).items():
            if not hasattr(model.config, name):
                raise ValueError(f"ssl_overrides: {model.config.model_type} configs have no key {name!r}")
            setattr(model.config, name, value)
        self.model = model
        cfg = model.config
        self.model_type = cfg.model_type
        self.stable_layer_norm = bool(cfg.do_stable_layer_norm)
        self.num_layers = int(cfg.num_hidden_layers)
        self.d_model = int(cfg.hidden_size)
        try:
            self.exit_layers = resolve_exit_layers(exit_layers, self.num_layers)
        except ValueError as err:
            raise ValueError(f"{err} (the SSL model has {self.num_layers} transformer layers)") from err
        if freeze_steps < 0:
            raise ValueError(f"ssl_freeze_steps: must be >= 0, got {freeze_steps}")
        self.freeze_feature_extractor = bool(freeze_feature_extractor)
        self.freeze_steps = int(freeze_steps)
        self.register_buffer("steps", torch.zeros((), dtype=torch.long))
        if self.freeze_feature_extractor:
            for p in model.feature_extractor.parameters():
                p.requires_grad = False
        self.config = dict(
            hf_config=_json_config(cfg),
            exit_layers=list(self.exit_layers),
            freeze_feature_extractor=self.freeze_feature_extractor,
            freeze_steps=self.freeze_steps,
        )

    @property
    def num_exits(self) -> int:
        return len(self.exit_layers)

    @property
    def layers(self) -> nn.ModuleList:
        return self.model.encoder.layers

    @property
    def min_input_length(self) -> int:
        """Fewest waveform samples the convolutional feature extractor turns into one frame."""
        cfg = self.model.config
        need = 1
        for kernel, stride in reversed(list(zip(cfg.conv_kernel, cfg.conv_stride))):
            need = (need - 1) * int(stride) + int(kernel)
        return need

    def output_frames(self, input_samples: int) -> int:
        """Encoder frames for ``input_samples`` waveform samples (the conv feature extractor)."""
        return int(self.model._get_feat_extract_output_lengths(torch.tensor(input_samples)))

    # ------------------------------------------------------------ internals
    def _frozen(self) -> bool:
        return self.training and int(self.steps) < self.freeze_steps

    def _masks(self, x: torch.Tensor, valid: torch.Tensor):
        if self.model_type == "wavlm":
            return valid  # WavLM's attention takes the (B, T) mask itself
        from transformers.masking_utils import create_bidirectional_mask

        return create_bidirectional_mask(config=self.model.config, inputs_embeds=x, attention_mask=valid)

    def start(self, wavs: torch.Tensor, lengths: Optional[torch.Tensor] = None) -> SSLEncoderState:
        """Feature extractor, projection and positional embedding; no transformer layer runs.

        ``wavs`` ``(B, S)``; ``lengths`` ``(B,)`` relative lengths in ``[0, 1]``.
        """
        if wavs.dim() != 2:
            raise ValueError(
                f"EarlyExitSSLEncoder expects waveforms (B, S), got shape {tuple(wavs.shape)}; "
                f"use compute_features: WaveformFeatures"
            )
        frozen = self._frozen()
        if self.training and self.freeze_steps:
            self.steps += 1
        with torch.set_grad_enabled(torch.is_grad_enabled() and not frozen):
            samples = valid_frames(wavs, lengths)
            with torch.set_grad_enabled(torch.is_grad_enabled() and not self.freeze_feature_extractor):
                feats = self.model.feature_extractor(wavs).transpose(1, 2)
            t = feats.shape[1]
            frames = self.model._get_feat_extract_output_lengths(samples).long().clamp(1, t)
            valid = ~padding_mask(frames, t)
            projected = self.model.feature_projection(feats)
            x = projected[0] if isinstance(projected, tuple) else projected
            x = self.model._mask_hidden_states(x, attention_mask=valid)
            x = x.masked_fill(~valid[..., None], 0.0)
            enc = self.model.encoder
            x = x + enc.pos_conv_embed(x)
            if not self.stable_layer_norm:
                x = enc.layer_norm(x)
            x = enc.dropout(x)
        return SSLEncoderState(x, frames, 0, valid, self._masks(x, valid), None, frozen)

    def _run_layer(self, i: int, state: SSLEncoderState, x: torch.Tensor):
        layer = self.layers[i]
        cfg = self.model.config
        if self.training and cfg.layerdrop > 0.0 and not (self.model_type == "wavlm" and i == 0):
            if torch.rand([]) < cfg.layerdrop:  # LayerDrop (training only, as HF)
                return x
        if self.model_type == "wavlm":
            kwargs = {} if self.stable_layer_norm else {"index": i}
            x, state.position_bias = layer(
                x, attention_mask=state.attention_mask, position_bias=state.position_bias, **kwargs
            )
            return x
        out = layer(x, attention_mask=state.attention_mask)
        return out[0] if isinstance(out, tuple) else out

    def advance(self, state: SSLEncoderState, exit_index: int) -> torch.Tensor:
        """Run the layers from ``state`` up to exit ``exit_index`` (0-based); returns its
        hidden state ``(B, T', D)`` (final norm applied for the stable-layer-norm layout)."""
        if not 0 <= exit_index < self.num_exits:
            raise ValueError(f"exit index {exit_index} out of range 0..{self.num_exits - 1}")
        target = self.exit_layers[exit_index]
        if target < state.layer:
            raise ValueError(f"exit {exit_index} (layer {target}) is below the state's layer {state.layer}")
        with torch.set_grad_enabled(torch.is_grad_enabled() and not state.frozen):
            x = state.x
            for i in range(state.layer, target):
                x = self._run_layer(i, state, x)
            state.x, state.layer = x, target
            return self.exit_norm(exit_index)(x)

    def exit_norm(self, exit_index: int) -> nn.Module:
        """The norm ``advance`` applies at an exit: the encoder's final LayerNorm in the
        stable-layer-norm layout, none in the post-norm one (each layer ends with its own)."""
        return self.model.encoder.layer_norm if self.stable_layer_norm else _NO_NORM

    def first_position_bias(self, x: torch.Tensor) -> Optional[torch.Tensor]:
        """WavLM: the relative position bias ``(B * heads, T, T)`` that its first layer computes for
        ``x`` ``(B, T, D)`` and hands to every layer above (None for the other models, and for
        WavLM's first layer, which computes it itself): what a run that starts above the first
        layer (an ONNX segment) needs."""
        if self.model_type != "wavlm":
            return None
        attention = self.layers[0].attention
        b, t = x.shape[0], x.shape[1]
        bias = attention.compute_bias(t, t)
        return bias.unsqueeze(0).repeat(b, 1, 1, 1).view(b * attention.num_heads, t, t)

    def run_layers(self, x: torch.Tensor, frames: torch.Tensor, start: int, stop: int) -> torch.Tensor:
        """Layers ``[start, stop)`` (0-based) on ``x`` ``(B, T, D)`` with ``frames`` ``(B,)`` valid
        frames, without a state: the masks (and WavLM's position bias) made from ``x`` and
        ``frames``, as :meth:`start` and :meth:`advance` make them (an ONNX segment's graph)."""
        valid = ~padding_mask(frames, x.shape[1])
        bias = self.first_position_bias(x) if start > 0 else None
        state = SSLEncoderState(x, frames, start, valid, self._masks(x, valid), bias, False)
        for i in range(start, stop):
            x = self._run_layer(i, state, x)
        return x

    def select(self, state: SSLEncoderState, index: torch.Tensor, trim: bool = True) -> SSLEncoderState:
        """Keep the utterances ``index`` (the others left the batch); with ``trim`` cut the
        time axis to the longest kept utterance (masked attention makes this exact)."""
        frames = state.frames[index]
        t_max = int(frames.max()) if trim else state.x.shape[1]
        x = state.x[index, :t_max]
        valid = state.valid[index, :t_max]
        bias = state.position_bias
        if bias is not None:
            t = state.x.shape[1]
            bias = bias.view(state.x.shape[0], -1, t, t)[index, :, :t_max, :t_max]
            bias = bias.reshape(-1, t_max, t_max)
        return SSLEncoderState(x, frames, state.layer, valid, self._masks(x, valid), bias, state.frozen)

    def params_to_exit(self, exit_index: int) -> int:
        """SSL parameters used when stopping at ``exit_index`` (0-based)."""
        m = self.model
        shared = [m.feature_extractor, m.feature_projection, m.encoder.pos_conv_embed, m.encoder.layer_norm]
        total = sum(p.numel() for mod in shared for p in mod.parameters())
        if getattr(m, "masked_spec_embed", None) is not None:
            total += m.masked_spec_embed.numel()
        total += sum(p.numel() for p in self.layers[: self.exit_layers[exit_index]].parameters())
        return total


def init_heads_from_shared(heads: nn.Module) -> nn.Module:
    """Initialise every exit head of ``heads`` (a ``CTCExitHeads``) with the first head's
    weights (the authors' "one shared head" initialisation); returns ``heads``."""
    first = heads.heads[0]
    with torch.no_grad():
        for head in heads.heads[1:]:
            head.weight.copy_(first.weight)
            head.bias.copy_(first.bias)
    return heads


def make_ctc_heads(d_model: int, vocab_size: int, num_exits: int, shared_init: bool = True) -> CTCExitHeads:
    """``CTCExitHeads`` for an SSL encoder, every head initialised from one shared head
    when ``shared_init`` (YAML: ``shared_head_init``)."""
    heads = CTCExitHeads(d_model, vocab_size, num_exits)
    return init_heads_from_shared(heads) if shared_init else heads
