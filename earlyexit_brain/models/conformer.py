"""Early-exit Conformer encoder built from SpeechBrain's own layers (one concept: the encoder, its front end,
exit norms and exit heads).

The encoder is SpeechBrain's convolutional front end followed by a stack of
:class:`speechbrain.lobes.models.transformer.Conformer.ConformerEncoderLayer`.
After each layer listed in ``exit_layers`` the hidden state is layer-normalised
(one LayerNorm per exit, the counterpart of the Conformer's final norm) and
handed to that exit's head. At inference, :meth:`EarlyExitConformerEncoder.iter_exits`
runs the stack layer by layer and yields each exit as soon as it exists, so a
caller that stops consuming the generator never computes the layers above.
"""

import math
from dataclasses import dataclass
from typing import Iterator, List, Optional, Sequence, Tuple, Union

import torch
from speechbrain.lobes.models.convolution import ConvolutionFrontEnd
from speechbrain.lobes.models.transformer.Conformer import ConformerEncoderLayer
from speechbrain.lobes.models.transformer.TransformerASR import make_transformer_src_mask
from speechbrain.nnet.CNN import Conv2d, get_padding_elem
from speechbrain.nnet.activations import Swish
from speechbrain.nnet.attention import RelPosEncXL
from speechbrain.nnet.normalization import LayerNorm
from torch import nn
from torch.nn import functional as F

from ..utils import padding_mask, valid_frames


def resolve_exit_layers(exit_layers: Union[Sequence[int], int, str], num_layers: int) -> List[int]:
    """Turn an exit specification into a sorted list of 1-based layer numbers.

    Arguments
    ---------
    exit_layers : list of int, int or str
        Either an explicit list such as ``[2, 4, 6]``, an int ``k`` meaning
        "every k layers", or the string ``"every_k"`` (e.g. ``"every_2"``).
    num_layers : int
        Depth of the encoder.

    Returns
    -------
    list of int
        The 1-based layers after which an exit sits, ascending.

    Raises
    ------
    ValueError
        Naming the ``exit_layers`` key when the list is empty, unsorted,
        duplicated or outside ``1..num_layers``.

    Example
    -------
    >>> resolve_exit_layers("every_2", 6)
    [2, 4, 6]
    >>> resolve_exit_layers([3, 6], 6)
    [3, 6]
    """
    if isinstance(exit_layers, str):
        if not exit_layers.startswith("every_") or not exit_layers[6:].isdigit():
            raise ValueError(
                f"exit_layers: expected a list of layer numbers, an int k or 'every_k', got {exit_layers!r}"
            )
        exit_layers = int(exit_layers[6:])
    if isinstance(exit_layers, bool):
        raise ValueError(f"exit_layers: expected a list of ints, got {exit_layers!r}")
    if isinstance(exit_layers, int):
        step = exit_layers
        if step < 1 or step > num_layers:
            raise ValueError(f"exit_layers: 'every {step}' must be between 1 and num_layers={num_layers}")
        layers = list(range(step, num_layers + 1, step))
        if layers[-1] != num_layers:
            layers.append(num_layers)
        return layers
    layers = list(exit_layers)
    if not layers:
        raise ValueError("exit_layers: the list of exits is empty")
    for layer in layers:
        if isinstance(layer, bool) or not isinstance(layer, int):
            raise ValueError(f"exit_layers: {layer!r} is not an integer layer number ({layers})")
        if layer < 1 or layer > num_layers:
            raise ValueError(
                f"exit_layers: layer {layer} is out of range; accepted values are 1..num_layers={num_layers} ({layers})"
            )
    if len(set(layers)) != len(layers):
        raise ValueError(f"exit_layers: duplicated layers in {layers}")
    if layers != sorted(layers):
        raise ValueError(f"exit_layers: layers must be in ascending order, got {layers}")
    return layers


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


class ChannelsLastFrontEnd(ConvolutionFrontEnd):
    """SpeechBrain's ``ConvolutionFrontEnd``, computed without its layout changes.

    The same modules, parameters (state-dict keys included) and outputs as
    SpeechBrain's front end; only the forward differs. SpeechBrain's ``Conv2d``
    turns the ``(B, T, F, C)`` activations into ``(B, C, F, T)`` for every
    convolution and back, so the LayerNorm, the activation and their backward
    passes work on strided copies. Here the activations stay ``(B, T, F, C)``
    in memory, which is PyTorch's ``channels_last`` layout of a convolution
    over ``(T, F)``, and each kernel is transposed to match: the products are
    the same, summed in another order (outputs equal to about 1e-6). On 2 CPU
    threads a training step's front end (forward and backward) takes about
    half of SpeechBrain's time (docs/performance.md).

    Blocks that this forward does not cover (a residual branch, another
    convolution class, a padding other than ``"same"``, a one-channel output
    that SpeechBrain would squeeze) run SpeechBrain's own forward.

    Example
    -------
    >>> fe = ChannelsLastFrontEnd(input_shape=[None, None, 80], num_blocks=2,
    ...                           num_layers_per_block=1, out_channels=[8, 8],
    ...                           kernel_sizes=[3, 3], strides=[2, 2], residuals=[False, False]).eval()
    >>> feats = torch.randn(2, 100, 80)
    >>> fe(feats).shape
    torch.Size([2, 25, 20, 8])
    >>> bool(torch.allclose(fe(feats), ConvolutionFrontEnd.forward(fe, feats), atol=1e-5))
    True
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.channels_last = all(
            block.reduce_conv is None
            and all(
                not isinstance(layer, Conv2d)
                or (
                    layer.padding == "same"
                    and layer.max_norm is None
                    and not layer.skip_transpose
                    and not layer.swap
                    and layer.conv.out_channels > 1
                    and isinstance(layer.conv, nn.Conv2d)
                    and layer.conv.padding == (0, 0)
                )
                for layer in block.convs.children()
            )
            for block in self.children()
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Features ``(B, T, F)`` -> ``(B, T', F', C)``, as SpeechBrain's front end."""
        if not getattr(self, "channels_last", False):  # also while SpeechBrain builds the blocks
            return super().forward(x)
        x = x.unsqueeze(-1)
        for block in self.children():
            for layer in block.convs.children():
                x = _conv2d_channels_last(layer, x) if isinstance(layer, Conv2d) else layer(x)
        return x


def _conv2d_channels_last(layer: Conv2d, x: torch.Tensor) -> torch.Tensor:
    """SpeechBrain ``Conv2d`` ("same" padding) on ``(B, T, F, C)``, returning ``(B, T', F', C')``.

    SpeechBrain pads and convolves ``(B, C, F, T)``: here the same padding
    (reflect by default, computed by SpeechBrain's ``get_padding_elem``) and the
    kernel, stride and dilation are applied with the two spatial axes swapped.
    """
    conv = layer.conv
    kernel, stride, dilation = layer.kernel_size, layer.stride, layer.dilation
    pad_time = get_padding_elem(layer.in_channels, stride[-1], kernel[-1], dilation[-1])
    pad_freq = get_padding_elem(layer.in_channels, stride[-2], kernel[-2], dilation[-2])
    h = x.permute(0, 3, 1, 2)  # (B, C, T, F), channels_last in memory
    h = F.pad(h, pad_freq + pad_time, mode=layer.padding_mode)
    h = h.contiguous(memory_format=torch.channels_last)
    weight = conv.weight.transpose(2, 3).contiguous(memory_format=torch.channels_last)
    h = F.conv2d(h, weight, conv.bias, stride=stride[::-1], dilation=dilation[::-1], groups=conv.groups)
    return h.permute(0, 2, 3, 1)


@dataclass
class EncoderState:
    """Where an incremental encoder run stands (see ``start``/``advance``/``select``).

    ``x`` is ``(B, T', d_model)`` after ``layer`` layers; ``frames`` ``(B,)``
    holds each utterance's valid frames.
    """

    x: torch.Tensor
    frames: torch.Tensor
    layer: int
    key_padding_mask: Optional[torch.Tensor]
    src_mask: Optional[torch.Tensor]
    pos_embs: Optional[torch.Tensor]


class IncrementalExits:
    """``iter_exits`` and ``forward`` for an encoder with an incremental interface.

    The encoder provides ``num_exits``, ``start(inputs, lengths) -> state`` and
    ``advance(state, exit_index) -> hidden``; layers above the last exit asked
    for are never run.
    """

    @property
    def exit_compute_layers(self) -> List[int]:
        """Layers computed to reach each exit, as dynamic inference and the policy evaluation
        count them: ``exit_layers`` here; an encoder with layers beside the stack (the
        Splitformer's branches) counts those too."""
        return list(self.exit_layers)

    def iter_exits(
        self, inputs: torch.Tensor, lengths: Optional[torch.Tensor] = None, max_exit: Optional[int] = None
    ) -> Iterator[Tuple[int, torch.Tensor]]:
        """Run layer by layer, yielding ``(exit_index, hidden)`` as each exit is reached.

        ``exit_index`` is 0-based; ``hidden`` is ``(B, T', d_model)`` after the
        exit's LayerNorm. The generator stops after ``max_exit`` (0-based,
        default: the last exit); layers above the last consumed exit are never
        run, because nothing is computed until the caller asks for the next exit.
        """
        last = self.num_exits - 1 if max_exit is None else max_exit
        if not 0 <= last < self.num_exits:
            raise ValueError(f"exit index {max_exit} out of range 0..{self.num_exits - 1}")
        state = self.start(inputs, lengths)
        for exit_idx in range(last + 1):
            yield exit_idx, self.advance(state, exit_idx)

    def forward(
        self, inputs: torch.Tensor, lengths: Optional[torch.Tensor] = None, max_exit: Optional[int] = None
    ) -> List[torch.Tensor]:
        """Hidden states at every exit up to ``max_exit`` (default: all).

        Arguments
        ---------
        inputs : torch.Tensor
            ``(B, T, F)`` normalised features (Conformer) or ``(B, S)`` waveforms (SSL).
        lengths : torch.Tensor
            ``(B,)`` relative lengths in ``[0, 1]`` (SpeechBrain convention);
            they are unchanged by subsampling.
        max_exit : int, optional
            0-based index of the last exit to compute.

        Returns
        -------
        list of torch.Tensor
            One ``(B, T', d_model)`` tensor per exit.
        """
        return [h for _, h in self.iter_exits(inputs, lengths, max_exit)]


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
        return self.exit_norms[exit_index](state.x)

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

    def params_to_exit(self, exit_index: int) -> int:
        """Encoder parameters used when stopping at ``exit_index`` (0-based)."""
        shared = sum(p.numel() for m in (self.frontend, self.input_projection) for p in m.parameters())
        if self.positional_encoding is not None:
            shared += sum(p.numel() for p in self.positional_encoding.parameters())
        layers = self.layers[: self.exit_layers[exit_index]]
        shared += sum(p.numel() for p in layers.parameters())
        shared += sum(p.numel() for p in self.exit_norms[exit_index].parameters())
        return shared


class CTCExitHeads(nn.Module):
    """One CTC output layer per exit: ``Linear(d_model -> vocab)`` + log-softmax.

    Example
    -------
    >>> heads = CTCExitHeads(d_model=8, vocab_size=5, num_exits=2)
    >>> out = heads([torch.randn(2, 3, 8), torch.randn(2, 3, 8)])
    >>> [o.shape for o in out]
    [torch.Size([2, 3, 5]), torch.Size([2, 3, 5])]
    """

    def __init__(self, d_model: int, vocab_size: int, num_exits: int):
        super().__init__()
        self.config = dict(d_model=d_model, vocab_size=vocab_size, num_exits=num_exits)
        self.heads = nn.ModuleList([nn.Linear(d_model, vocab_size) for _ in range(num_exits)])

    def forward_exit(self, exit_index: int, hidden: torch.Tensor) -> torch.Tensor:
        """Log-probabilities ``(B, T, V)`` of one exit."""
        return torch.log_softmax(self.heads[exit_index](hidden), dim=-1)

    def forward(self, hiddens: Sequence[torch.Tensor]) -> List[torch.Tensor]:
        """Log-probabilities for each exit's hidden state."""
        return [self.forward_exit(i, h) for i, h in enumerate(hiddens)]

    def params_of_exit(self, exit_index: int) -> int:
        """Parameters of one exit's head."""
        return sum(p.numel() for p in self.heads[exit_index].parameters())


def count_exits(exit_layers: Union[Sequence[int], int, str], num_layers: int) -> int:
    """Number of exits for an exit specification (for YAML wiring).

    Example
    -------
    >>> count_exits("every_2", 12)
    6
    """
    return len(resolve_exit_layers(exit_layers, num_layers))
