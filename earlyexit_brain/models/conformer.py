"""Early-exit Conformer encoder built from SpeechBrain's own layers (its exits and heads are
:mod:`.exits`, its channels-last front end :mod:`.frontend`).

The encoder is SpeechBrain's convolutional front end followed by a stack of
:class:`speechbrain.lobes.models.transformer.Conformer.ConformerEncoderLayer`.
After each layer listed in ``exit_layers`` the hidden state is layer-normalised
(one LayerNorm per exit, the counterpart of the Conformer's final norm) and
handed to that exit's head. At inference, :meth:`EarlyExitConformerEncoder.iter_exits`
runs the stack layer by layer and yields each exit as soon as it exists, so a
caller that stops consuming the generator never computes the layers above.
"""

import math
from typing import Optional, Sequence, Union

import torch
from speechbrain.lobes.models.transformer.Conformer import ConformerEncoderLayer
from speechbrain.lobes.models.transformer.TransformerASR import make_transformer_src_mask
from speechbrain.nnet.activations import Swish
from speechbrain.nnet.attention import RelPosEncXL
from speechbrain.nnet.CNN import Conv2d, get_padding_elem
from speechbrain.nnet.normalization import LayerNorm
from torch import nn

from ..utils import padding_mask, valid_frames

# the exits and the channels-last front end have their own modules; the names stay importable from here
# for the hyperparams.yaml of experiments made before (e.g. !apply:earlyexit_brain.models.conformer.count_exits)
from .exits import CTCExitHeads, EncoderState, IncrementalExits, count_exits, resolve_exit_layers  # noqa: F401
from .frontend import ChannelsLastFrontEnd  # noqa: F401


def sinusoidal_positions(length: int, dim: int, device=None, dtype=torch.float32) -> torch.Tensor:
    """Fixed absolute positional encoding ``(1, length, dim)``:
    ``PE[p, 2i] = sin(p / 10000^(2i/dim))``, ``PE[p, 2i+1] = cos(...)`` (as
    SpeechBrain's ``PositionalEncoding``, computed for any length)."""
    if dim % 2:
        raise ValueError(f"abs_pos_encoding needs an even d_model, got {dim}")
    positions = torch.arange(length, device=device, dtype=torch.float32).unsqueeze(1)
    freqs = torch.exp(torch.arange(0, dim, 2, device=device, dtype=torch.float32) * (-math.log(10000.0) / dim))
    pe = torch.zeros(length, dim, device=device, dtype=torch.float32)
    pe[:, 0::2] = torch.sin(positions * freqs)
    pe[:, 1::2] = torch.cos(positions * freqs)
    return pe.unsqueeze(0).to(dtype)


def relative_positions(length: int, dim: int, inv_freq: torch.Tensor) -> torch.Tensor:
    """SpeechBrain's ``RelPosEncXL.make_pe(length)`` ``(1, 2 length - 1, dim)`` (equal to it) without
    its indexed assignments, which export to ONNX as ScatterElements: sines and cosines
    interleaved by a reshape."""
    positions = torch.arange(length, dtype=torch.float32, device=inv_freq.device)[:, None] * inv_freq
    pe = torch.stack([torch.sin(positions), torch.cos(positions)], dim=-1).reshape(length, dim)
    return torch.cat([torch.flip(pe, (0,)), pe[1:]], dim=0)[None]


class EarlyExitConformerEncoder(IncrementalExits, nn.Module):
    """Conformer encoder with an exit after selected layers.

    Arguments
    ---------
    input_size : int
        Number of input features per frame (e.g. 80 filterbanks).
    num_layers : int
        Number of Conformer layers.
    d_model : int
        Model dimension.
    nhead : int
        Attention heads.
    d_ffn : int
        Feed-forward hidden size.
    exit_layers : list of int, int or str
        Where the exits sit (see :func:`resolve_exit_layers`).
    kernel_size : int
        Depthwise convolution kernel of the Conformer convolution module.
    dropout : float
        Dropout in the front end, inside the layers and after the input projection.
    attention_type : str
        ``"RelPosMHAXL"`` (SpeechBrain's Conformer default) or ``"regularMHA"``.
    frontend_channels : list of int
        Output channels of the convolutional front end blocks; its strides
        (``frontend_strides``) give the time subsampling (default 4x).
    frontend_strides : list of int
        Stride of each front-end block.
    causal : bool
        Causal convolutions/attention.
    abs_pos_encoding : bool
        Add the fixed sinusoidal absolute positional encoding (no parameters)
        to the projected input, as SpeechBrain's ``TransformerASR`` does with
        ``regularMHA``. ``RelPosMHAXL`` has its own relative encodings and
        needs none.

    Example
    -------
    >>> enc = EarlyExitConformerEncoder(80, num_layers=4, d_model=64, nhead=4,
    ...                                 d_ffn=128, exit_layers=[2, 4])
    >>> feats = torch.randn(3, 101, 80)
    >>> hiddens = enc(feats, torch.tensor([1.0, 0.8, 0.5]))
    >>> [h.shape for h in hiddens]
    [torch.Size([3, 26, 64]), torch.Size([3, 26, 64])]

    The incremental form used by dynamic inference (nothing above exit 0 runs):

    >>> state = enc.start(feats, torch.tensor([1.0, 0.8, 0.5]))
    >>> enc.advance(state, 0).shape
    torch.Size([3, 26, 64])
    >>> state = enc.select(state, torch.tensor([2]))  # utterances 0 and 1 exit
    >>> enc.advance(state, 1).shape  # utterance 2: 13 valid frames
    torch.Size([1, 13, 64])
    """

    def __init__(
        self,
        input_size: int,
        num_layers: int,
        d_model: int,
        nhead: int,
        d_ffn: int,
        exit_layers: Union[Sequence[int], int, str] = 2,
        kernel_size: int = 31,
        dropout: float = 0.1,
        attention_type: str = "RelPosMHAXL",
        frontend_channels: Sequence[int] = (64, 32),
        frontend_strides: Sequence[int] = (2, 2),
        causal: bool = False,
        abs_pos_encoding: bool = False,
    ):
        super().__init__()
        if attention_type not in ("RelPosMHAXL", "regularMHA"):
            raise ValueError(
                f"attention_type: accepted values are 'RelPosMHAXL' and 'regularMHA', got {attention_type!r}"
            )
        if d_model % nhead != 0:
            raise ValueError(f"nhead: d_model={d_model} must be divisible by nhead={nhead}")
        if len(frontend_channels) != len(frontend_strides):
            raise ValueError("frontend_channels and frontend_strides must have the same length")
        self.exit_layers = resolve_exit_layers(exit_layers, num_layers)
        # constructor arguments, written into exported inference YAML files
        self.config = dict(
            input_size=input_size,
            num_layers=num_layers,
            d_model=d_model,
            nhead=nhead,
            d_ffn=d_ffn,
            exit_layers=list(self.exit_layers),
            kernel_size=kernel_size,
            dropout=dropout,
            attention_type=attention_type,
            frontend_channels=[int(c) for c in frontend_channels],
            frontend_strides=[int(s) for s in frontend_strides],
            causal=causal,
        )
        if abs_pos_encoding:  # only when set, so older exported configs stay unchanged
            self.config["abs_pos_encoding"] = True
        self.abs_pos_encoding = bool(abs_pos_encoding)
        self.num_layers = num_layers
        self.d_model = d_model
        self.attention_type = attention_type
        self.causal = causal
        n_blocks = len(frontend_channels)
        self.frontend = ChannelsLastFrontEnd(
            input_shape=[None, None, input_size],
            num_blocks=n_blocks,
            num_layers_per_block=1,
            out_channels=list(frontend_channels),
            kernel_sizes=[3] * n_blocks,
            strides=list(frontend_strides),
            residuals=[False] * n_blocks,
            dropout=dropout,
        )
        freq_out = input_size
        for stride in frontend_strides:
            freq_out = (freq_out + stride - 1) // stride
        self.frontend_strides = [int(s) for s in frontend_strides]
        self.input_projection = nn.Sequential(nn.Linear(frontend_channels[-1] * freq_out, d_model), nn.Dropout(dropout))
        self.positional_encoding = RelPosEncXL(d_model) if attention_type == "RelPosMHAXL" else None
        self.layers = nn.ModuleList(
            [
                ConformerEncoderLayer(
                    d_model=d_model,
                    d_ffn=d_ffn,
                    nhead=nhead,
                    kernel_size=kernel_size,
                    activation=Swish,
                    dropout=dropout,
                    causal=causal,
                    attention_type=attention_type,
                )
                for _ in range(num_layers)
            ]
        )
        self.exit_norms = nn.ModuleList([LayerNorm(d_model, eps=1e-6) for _ in self.exit_layers])

    @property
    def num_exits(self) -> int:
        """Number of exits."""
        return len(self.exit_layers)

    @property
    def min_input_length(self) -> int:
        """Fewest feature frames the front end takes.

        Working back from one output frame, each convolution needs enough input
        frames for the frames the next one takes, and its reflect padding (the
        default of SpeechBrain's ``Conv2d``) needs more input frames than it pads:
        shorter inputs fail inside PyTorch's padding.
        """
        convs = [
            layer for block in self.frontend.children() for layer in block.convs.children() if isinstance(layer, Conv2d)
        ]
        need = 1
        for layer in reversed(convs):  # the time axis is the kernels' last
            k, s, d = layer.kernel_size[-1], layer.stride[-1], layer.dilation[-1]
            side = get_padding_elem(1, s, k, d)[0] if layer.padding == "same" else 0
            added = 2 * side if layer.padding == "same" else d * (k - 1) if layer.padding == "causal" else 0
            need = max(1, (need - 1) * s + d * (k - 1) + 1 - added)
            if side and layer.padding_mode == "reflect":
                need = max(need, side + 1)
        return need

    def output_frames(self, input_frames: int) -> int:
        """Number of encoder frames produced for ``input_frames`` feature frames."""
        frames = input_frames
        for stride in self.frontend_strides:
            frames = (frames + stride - 1) // stride  # "same" padding
        return frames

    def embed(self, feats: torch.Tensor) -> torch.Tensor:
        """Front end and input projection: features ``(B, T, F)`` -> ``(B, T', d_model)``."""
        x = self.frontend(feats)
        if x.dim() == 4:
            b, t, c1, c2 = x.shape
            x = x.reshape(b, t, c1 * c2)
        x = self.input_projection(x)
        if self.abs_pos_encoding:
            x = x + sinusoidal_positions(x.shape[1], x.shape[2], x.device, x.dtype)
        return x

    def _state(self, x: torch.Tensor, frames: torch.Tensor, layer: int) -> EncoderState:
        """A state for ``x`` with ``frames`` valid frames: padding mask, attention mask, positions."""
        src_mask = make_transformer_src_mask(x, causal=self.causal)
        pos_embs = self.positional_encoding(x) if self.positional_encoding is not None else None
        return EncoderState(x, frames, layer, padding_mask(frames, x.shape[1]), src_mask, pos_embs)

    # ------------------------------------------------ incremental interface
    def start(self, feats: torch.Tensor, lengths: Optional[torch.Tensor] = None) -> EncoderState:
        """Run the front end only; the returned state is advanced with :meth:`advance`.

        Arguments
        ---------
        feats : torch.Tensor
            ``(B, T, F)`` normalised features.
        lengths : torch.Tensor, optional
            ``(B,)`` relative lengths in ``[0, 1]``.
        """
        x = self.embed(feats)
        return self._state(x, valid_frames(x, lengths), 0)

    def advance(self, state: EncoderState, exit_index: int) -> torch.Tensor:
        """Run the layers from ``state`` up to exit ``exit_index`` (0-based).

        Returns the exit's normalised hidden state ``(B, T', d_model)``; the
        state is updated in place, so the next call only runs the layers above.
        """
        if not 0 <= exit_index < self.num_exits:
            raise ValueError(f"exit index {exit_index} out of range 0..{self.num_exits - 1}")
        target = self.exit_layers[exit_index]
        if target < state.layer:
            raise ValueError(f"exit {exit_index} (layer {target}) is below the state's layer {state.layer}")
        self.run_layers(state, target)
        return self.exit_norm(exit_index)(state.x)

    def run_layers(self, state: EncoderState, target: int) -> None:
        """Run the layers above the state's layer up to layer ``target`` (1-based), updating
        ``state`` in place (no exit norm)."""
        x = state.x
        for layer in self.layers[state.layer : target]:
            x, _ = layer(
                x, src_mask=state.src_mask, src_key_padding_mask=state.key_padding_mask, pos_embs=state.pos_embs
            )
        state.x, state.layer = x, target

    def select(self, state: EncoderState, index: torch.Tensor, trim: bool = True) -> EncoderState:
        """Keep the utterances ``index`` of a state (the others left the batch).

        With ``trim`` the time axis is cut to the longest kept utterance, so the
        padding that only exited utterances needed is not computed either.
        SpeechBrain's Conformer convolution module masks its output but not its
        input, so padded frames leak into the last ``kernel_size // 2`` valid
        frames of a padded utterance: as with any change of batch composition,
        trimming can move such an utterance's outputs slightly. Without
        ``trim`` the kept utterances' outputs are exactly those of the full batch.
        """
        frames = state.frames[index]
        t_max = int(frames.max()) if trim else state.x.shape[1]
        return self._state(state.x[index, :t_max], frames, state.layer)

    def exit_norm(self, exit_index: int) -> nn.Module:
        """The norm ``advance`` applies to the states at exit ``exit_index`` (0-based)."""
        return self.exit_norms[exit_index]

    def params_to_exit(self, exit_index: int) -> int:
        """Encoder parameters used when stopping at ``exit_index`` (0-based)."""
        shared = sum(p.numel() for m in (self.frontend, self.input_projection) for p in m.parameters())
        if self.positional_encoding is not None:
            shared += sum(p.numel() for p in self.positional_encoding.parameters())
        layers = self.layers[: self.exit_layers[exit_index]]
        shared += sum(p.numel() for p in layers.parameters())
        shared += sum(p.numel() for p in self.exit_norms[exit_index].parameters())
        return shared
