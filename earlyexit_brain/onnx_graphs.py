"""The PyTorch modules that :mod:`earlyexit_brain.onnx_export` exports, one ONNX graph each: the front
end (:class:`FrontGraph`, with the Fbank's STFT as a convolution, :class:`ConvSTFT`), an encoder
segment between two exits (:class:`SegmentGraph`, a Splitformer branch included) and an exit head
(:class:`HeadGraph`); for wav2vec2 / WavLM / HuBERT encoders :class:`SSLFrontGraph` and
:class:`SSLSegmentGraph`. Each computes what the PyTorch model computes for that part, in operators
onnxruntime runs well (docs/deployment.md)."""

import copy

import torch
from speechbrain.lobes.models.transformer.TransformerASR import make_transformer_src_mask
from torch import nn

from .models.conformer import EarlyExitConformerEncoder, relative_positions
from .models.ssl import EarlyExitSSLEncoder
from .utils import padding_mask, valid_frames


class ConvSTFT(nn.Module):
    """SpeechBrain's ``STFT`` (``torch.stft``) of ``(B, S)`` waveforms as one strided convolution with
    the windowed DFT basis: ``(B, T, n_fft // 2 + 1, 2)``, real and imaginary parts, as ``STFT``
    returns them. onnxruntime's STFT operator computes a plain DFT per frame (for 10 s at 1 thread
    about 10x the time of the whole Fbank in PyTorch); the convolution is one matrix product."""

    def __init__(self, stft):
        super().__init__()
        if stft.normalized_stft or not stft.onesided:
            raise ValueError("compute_features: only a one-sided, unnormalised STFT is exported as a convolution")
        n_fft, win = int(stft.n_fft), int(stft.win_length)
        window = torch.zeros(n_fft, dtype=torch.float64)
        left = (n_fft - win) // 2  # torch.stft centres a shorter window in n_fft
        window[left : left + win] = stft.window.to(torch.float64)
        k = torch.arange(n_fft // 2 + 1, dtype=torch.float64)[:, None]
        n = torch.arange(n_fft, dtype=torch.float64)[None, :]
        angle = 2 * torch.pi * k * n / n_fft
        basis = torch.cat([torch.cos(angle), -torch.sin(angle)]) * window  # (2F, n_fft)
        self.register_buffer("basis", basis[:, None, :].float(), persistent=False)
        self.n_fft, self.hop, self.center, self.pad_mode = n_fft, int(stft.hop_length), stft.center, stft.pad_mode

    def forward(self, wavs):
        """``(B, T, F, 2)``, as SpeechBrain's ``STFT``."""
        spec = self.spectrum(wavs)
        b, _, t = spec.shape
        return spec.reshape(b, 2, -1, t).permute(0, 3, 2, 1)

    def spectrum(self, wavs):
        """Real parts then imaginary parts ``(B, 2F, T)``."""
        x = wavs[:, None, :]
        if self.center:
            x = nn.functional.pad(x, (self.n_fft // 2, self.n_fft // 2), mode=self.pad_mode)
        return nn.functional.conv1d(x, self.basis, stride=self.hop)

    def power(self, wavs):
        """The power spectrogram ``(B, T, F)``: ``spectral_magnitude(stft(wavs))`` without the
        transpose of the two parts."""
        spec = self.spectrum(wavs)
        half = spec.shape[1] // 2
        return (spec[:, :half] ** 2 + spec[:, half:] ** 2).transpose(1, 2)


def _exportable_fbank(features) -> bool:
    """Whether ``features`` is SpeechBrain's Fbank without deltas or context (its STFT then runs as
    :class:`ConvSTFT`)."""
    from speechbrain.lobes.features import Fbank

    return isinstance(features, Fbank) and not features.deltas and not features.context


class FrontGraph(nn.Module):
    """Waveforms ``(B, S)`` and relative lengths ``(B,)`` -> the encoder's input state: projected
    front-end output ``x`` ``(B, T', D)``, valid frames ``(B,)`` and, for relative attention,
    the positional encodings ``(1, 2T'-1, D)`` (``EarlyExitConformerEncoder.start``)."""

    def __init__(self, model):
        super().__init__()
        self.model = model
        self.stft = ConvSTFT(model.compute_features.compute_STFT) if _exportable_fbank(model.compute_features) else None

    def features(self, wavs, wav_lens):
        """``model.features``, with the Fbank's STFT as a convolution when it is one."""
        if self.stft is None:
            return self.model.features(wavs, wav_lens)
        fbanks = self.model.compute_features.compute_fbanks(self.stft.power(wavs))
        return self.model.normalize(fbanks, wav_lens)

    def forward(self, wavs, wav_lens):
        x = self.model.encoder.embed(self.features(wavs, wav_lens))
        frames = valid_frames(x, wav_lens)
        encoding = self.model.encoder.positional_encoding
        if encoding is None:
            return x, frames
        return x, frames, relative_positions(x.shape[1], x.shape[2], encoding.inv_freq).to(encoding.emb_dtype)


class PointwiseConv(nn.Module):
    """A kernel-1 ``nn.Conv1d`` ``(B, C, T) -> (B, C', T)`` (the Conformer convolution module's
    bottleneck) as a matrix product over the channels, with the same weights: exported as a
    ``MatMul``, which onnxruntime's int8 quantisation turns into its integer matrix product, where a
    ``Conv`` becomes ``ConvInteger``, slower than the fp32 ``Conv`` (docs/deployment.md)."""

    def __init__(self, conv: nn.Conv1d):
        super().__init__()
        self.weight = nn.Parameter(conv.weight.detach()[:, :, 0].clone(), requires_grad=False)
        self.bias = None if conv.bias is None else nn.Parameter(conv.bias.detach().clone(), requires_grad=False)

    def forward(self, x):
        return nn.functional.linear(x.transpose(1, 2), self.weight, self.bias).transpose(1, 2)


def _is_pointwise(module) -> bool:
    return (
        isinstance(module, nn.Conv1d)
        and module.kernel_size == (1,)
        and module.stride == (1,)
        and module.dilation == (1,)
        and module.groups == 1
        and module.padding in ((0,), "valid")
    )


def with_pointwise_matmuls(module: nn.Module) -> nn.Module:
    """A copy of ``module`` whose kernel-1 ``Conv1d`` layers are :class:`PointwiseConv` (the
    PyTorch model itself is left as it is)."""
    module = copy.deepcopy(module)
    for _, child in list(module.named_modules()):
        for attr, sub in list(child.named_children()):
            if _is_pointwise(sub):
                setattr(child, attr, PointwiseConv(sub))
    return module


class SegmentGraph(nn.Module):
    """Encoder layers ``[start, stop)``: ``x`` ``(B, T, D)``, valid ``frames`` ``(B,)`` (the padding
    mask is made inside) and ``pos_embs`` -> ``x`` (before the exit's norm), as ``advance``; for
    a Splitformer block with a branch (``branch``), plus the branch's output on the block's input."""

    def __init__(self, encoder: EarlyExitConformerEncoder, start: int, stop: int, branch=None):
        super().__init__()
        self.layers = with_pointwise_matmuls(encoder.layers[start:stop])
        self.causal = encoder.causal
        self.branch = None if branch is None else with_pointwise_matmuls(branch)

    def forward(self, x, frames, pos_embs=None):
        block_input = x
        mask = padding_mask(frames, x.shape[1])
        src_mask = make_transformer_src_mask(x, causal=self.causal)
        for layer in self.layers:
            x, _ = layer(x, src_mask=src_mask, src_key_padding_mask=mask, pos_embs=pos_embs)
        if self.branch is not None:
            x = x + self.branch(block_input, frames)
        return x


class SSLFrontGraph(nn.Module):
    """wav2vec2 / WavLM / HuBERT: waveforms ``(B, S)`` and relative lengths ``(B,)`` -> the first
    layer's input ``x`` ``(B, T', D)`` and valid ``frames`` ``(B,)``: the waveform normalisation,
    the convolutional feature extractor, the projection and the positional convolution
    (``EarlyExitSSLEncoder.start``)."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, wavs, wav_lens):
        state = self.model.encoder.start(self.model.features(wavs, wav_lens), wav_lens)
        return state.x, state.frames


class SSLSegmentGraph(nn.Module):
    """Transformer layers ``[start, stop)`` of an SSL encoder: ``x`` ``(B, T, D)`` and valid
    ``frames`` ``(B,)`` -> ``x`` (before the exit's norm), the masks (and WavLM's position bias)
    made inside (``EarlyExitSSLEncoder.run_layers``)."""

    def __init__(self, encoder: EarlyExitSSLEncoder, start: int, stop: int):
        super().__init__()
        self.encoder, self.start, self.stop = encoder, start, stop

    def forward(self, x, frames):
        return self.encoder.run_layers(x, frames, self.start, self.stop)


class HeadGraph(nn.Module):
    """Exit ``k``: its LayerNorm, linear layer and log-softmax, ``x`` -> ``log_probs`` ``(B, T, V)``
    and ``hidden`` ``(B, T, D)``, the normalised states (what ``advance`` returns: the learned
    exit controller reads them; the runtime fetches them only for that policy)."""

    def __init__(self, model, exit_index: int):
        super().__init__()
        self.norm = model.encoder.exit_norm(exit_index)
        self.linear = model.heads.heads[exit_index]

    def forward(self, x):
        hidden = self.norm(x)
        return torch.log_softmax(self.linear(hidden), dim=-1), hidden
