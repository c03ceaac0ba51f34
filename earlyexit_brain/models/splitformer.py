"""Splitformer: the early-exit Conformer with parallel downsampled layers before chosen exits.

Lasbordes, Falavigna and Brutti, "Splitformer: An improved early-exit architecture for
automatic speech recognition on edge devices" (arXiv 2506.18035, EUSIPCO 2025). The
trunk is :class:`~earlyexit_brain.models.conformer.EarlyExitConformerEncoder` unchanged
(front end, projection, positional encodings, SpeechBrain ``ConformerEncoderLayer``\\ s,
one LayerNorm per exit). Each exit listed in ``branch_exits`` (by default the first and
the last) gets a parallel branch beside its block, the layers between the previous exit
and this one: the block's input is downsampled in time by ``branch_factor`` (every n-th
frame kept, the input first padded with zero frames to a multiple of n as the authors'
code does), run through ``branch_layers`` Conformer layers, upsampled back (each frame
repeated n times, the padding dropped) and added to the block's output. The sum is what
the exit's LayerNorm and head see and what the trunk's next layer takes, as in the
authors' code (augustgw/early-exit-transformer, ``Splitformer``).
"""

from typing import List, Optional, Sequence, Union

import torch
from speechbrain.lobes.models.transformer.Conformer import ConformerEncoderLayer
from speechbrain.lobes.models.transformer.TransformerASR import make_transformer_src_mask
from speechbrain.nnet.activations import Swish
from speechbrain.nnet.attention import RelPosEncXL
from torch import nn
from torch.nn import functional as F

from ..utils import padding_mask
from .conformer import EarlyExitConformerEncoder, relative_positions
from .exits import EncoderState


def resolve_branch_exits(branch_exits: Optional[Sequence[int]], num_exits: int) -> List[int]:
    """The 1-based exits that get a parallel branch, ascending.

    Arguments
    ---------
    branch_exits : list of int or None
        1-based exit numbers; None (the paper's choice) means the first and the last exit.
    num_exits : int
        Number of exits of the encoder.

    Returns
    -------
    list of int

    Raises
    ------
    ValueError
        Naming the ``branch_exits`` key when an entry is not an exit number, is
        duplicated or the list is not ascending.

    Example
    -------
    >>> resolve_branch_exits(None, 6)
    [1, 6]
    >>> resolve_branch_exits(None, 1)
    [1]
    >>> resolve_branch_exits([], 3)
    []
    """
    if branch_exits is None:
        return sorted({1, num_exits})
    if isinstance(branch_exits, (str, bytes)) or not isinstance(branch_exits, Sequence):
        raise ValueError(f"branch_exits: expected null or a list of 1-based exit numbers, got {branch_exits!r}")
    exits = list(branch_exits)
    for e in exits:
        if isinstance(e, bool) or not isinstance(e, int) or not 1 <= e <= num_exits:
            raise ValueError(f"branch_exits: {e!r} is not an exit number; accepted values are 1..{num_exits} ({exits})")
    if len(set(exits)) != len(exits) or exits != sorted(exits):
        raise ValueError(f"branch_exits: the exits must be distinct and ascending, got {exits}")
    return exits


class DownsampledBranch(nn.Module):
    """Conformer layers on a time-downsampled copy of a sequence, upsampled back.

    ``(B, T, D)`` with ``frames`` valid frames per utterance -> ``(B, T, D)``. The
    input is padded with zero frames to a multiple of ``factor``; frames ``0, n, 2n,
    ...`` are kept, so an utterance of ``f`` valid frames has ``ceil(f / n)`` valid
    downsampled frames and the key-padding mask of the branch's layers is built from
    those counts: frames beyond an utterance's end are never attended to (SpeechBrain's
    convolution module still reads them, as in the trunk: see
    :meth:`~earlyexit_brain.models.conformer.EarlyExitConformerEncoder.select`). With
    ``RelPosMHAXL`` the relative positional encodings are computed for the downsampled
    length (distances in downsampled frames); with ``regularMHA`` the input already
    carries the absolute positions of the frames it was taken from. Each output frame
    ``t`` is the branch's frame ``t // n``.

    Arguments
    ---------
    d_model, nhead, d_ffn, kernel_size, dropout, causal, attention_type
        As the Conformer layers of :class:`~earlyexit_brain.models.conformer.EarlyExitConformerEncoder`.
    factor : int
        Time downsampling factor (>= 1).
    num_layers : int
        Conformer layers in the branch (>= 1).

    Example
    -------
    >>> branch = DownsampledBranch(d_model=16, nhead=2, d_ffn=32, kernel_size=3, dropout=0.0).eval()
    >>> branch(torch.randn(2, 7, 16), torch.tensor([7, 5])).shape
    torch.Size([2, 7, 16])
    >>> branch.downsampled_frames(torch.tensor([7, 5, 4]))
    tensor([4, 3, 2])
    """

    def __init__(
        self,
        d_model: int,
        nhead: int,
        d_ffn: int,
        factor: int = 2,
        num_layers: int = 1,
        kernel_size: int = 31,
        dropout: float = 0.1,
        causal: bool = False,
        attention_type: str = "RelPosMHAXL",
    ):
        super().__init__()
        self.factor = int(factor)
        self.causal = causal
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
        self.positional_encoding = RelPosEncXL(d_model) if attention_type == "RelPosMHAXL" else None

    def downsampled_frames(self, frames: torch.Tensor) -> torch.Tensor:
        """Valid downsampled frames ``ceil(frames / factor)`` ``(B,)``."""
        return torch.div(frames + self.factor - 1, self.factor, rounding_mode="floor")

    def forward(self, x: torch.Tensor, frames: torch.Tensor) -> torch.Tensor:
        """The branch's output ``(B, T, D)`` for the input ``x`` ``(B, T, D)`` with ``frames`` ``(B,)`` valid frames."""
        t = x.shape[1]
        # zero frames up to a multiple of the factor (none when it is one already: no branch on
        # the length, so that the ONNX export keeps it dynamic), dropped again below
        down = F.pad(x, (0, 0, 0, (self.factor - t % self.factor) % self.factor))[:, :: self.factor]
        src_mask = make_transformer_src_mask(down, causal=self.causal)
        encoding = self.positional_encoding
        pos_embs = None
        if encoding is not None:  # RelPosEncXL's positions, in exportable operators
            pos_embs = relative_positions(down.shape[1], down.shape[2], encoding.inv_freq).to(encoding.emb_dtype)
        key_padding_mask = padding_mask(self.downsampled_frames(frames), down.shape[1])
        for layer in self.layers:
            down, _ = layer(down, src_mask=src_mask, src_key_padding_mask=key_padding_mask, pos_embs=pos_embs)
        return down.repeat_interleave(self.factor, dim=1)[:, :t]


class SplitformerEncoder(EarlyExitConformerEncoder):
    """:class:`~earlyexit_brain.models.conformer.EarlyExitConformerEncoder` with a parallel
    downsampled branch (:class:`DownsampledBranch`) beside the block before chosen exits.

    The arguments of the Conformer encoder, plus:

    Arguments
    ---------
    branch_exits : list of int, optional
        1-based exits whose block gets a branch; None (default): the first and the last
        exit, as in the paper. ``[]`` gives the plain early-exit Conformer.
    branch_factor : int
        Time downsampling factor of the branches (the paper: 2).
    branch_layers : int
        Conformer layers in each branch (the paper: 1).

    The encoder interface is the Conformer's (docs/architecture.md). The branches count
    as layers where compute is counted: ``exit_compute_layers[k]`` is the trunk's layers
    to exit ``k`` plus ``branch_layers`` for every branch at or below it (what dynamic
    inference and the policy evaluation report as layers computed), and
    ``params_to_exit`` includes those branches. A branch layer runs on ``1 / branch_factor``
    of the frames, so it costs less time than a trunk layer; the measured latency table
    (the budget policy's) includes it as it is.

    Example
    -------
    >>> enc = SplitformerEncoder(80, num_layers=4, d_model=32, nhead=4, d_ffn=64,
    ...                          exit_layers=[2, 4], kernel_size=3, dropout=0.0).eval()
    >>> enc.branch_exits, enc.exit_compute_layers
    ([1, 2], [3, 6])
    >>> [h.shape for h in enc(torch.randn(2, 101, 80), torch.tensor([1.0, 0.7]))]
    [torch.Size([2, 26, 32]), torch.Size([2, 26, 32])]
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
        branch_exits: Optional[Sequence[int]] = None,
        branch_factor: int = 2,
        branch_layers: int = 1,
    ):
        super().__init__(
            input_size,
            num_layers,
            d_model,
            nhead,
            d_ffn,
            exit_layers=exit_layers,
            kernel_size=kernel_size,
            dropout=dropout,
            attention_type=attention_type,
            frontend_channels=frontend_channels,
            frontend_strides=frontend_strides,
            causal=causal,
            abs_pos_encoding=abs_pos_encoding,
        )
        for key, value in (("branch_factor", branch_factor), ("branch_layers", branch_layers)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{key}: expected an integer >= 1, got {value!r}")
        self.branch_exits = resolve_branch_exits(branch_exits, self.num_exits)
        self.branch_factor = branch_factor
        self.branch_layers = branch_layers
        self.config.update(
            branch_exits=list(self.branch_exits), branch_factor=branch_factor, branch_layers=branch_layers
        )
        self.branches = nn.ModuleList(
            [
                DownsampledBranch(
                    d_model,
                    nhead,
                    d_ffn,
                    factor=branch_factor,
                    num_layers=branch_layers,
                    kernel_size=kernel_size,
                    dropout=dropout,
                    causal=causal,
                    attention_type=attention_type,
                )
                for _ in self.branch_exits
            ]
        )
        # 0-based exit index -> its branch
        self._branch_of = {e - 1: i for i, e in enumerate(self.branch_exits)}

    @property
    def exit_compute_layers(self) -> List[int]:
        """Layers computed to reach each exit: the trunk's, plus ``branch_layers`` per branch at or below it."""
        out, extra = [], 0
        for k, layer in enumerate(self.exit_layers):
            extra += self.branch_layers if k in self._branch_of else 0
            out.append(layer + extra)
        return out

    def advance(self, state: EncoderState, exit_index: int) -> torch.Tensor:
        """Run the blocks (and their branches) from ``state`` up to exit ``exit_index`` (0-based).

        Returns the exit's normalised hidden state ``(B, T', d_model)``; the state is
        updated in place. Blocks are run one exit at a time even when exits are skipped,
        since a branch takes its block's input.
        """
        if not 0 <= exit_index < self.num_exits:
            raise ValueError(f"exit index {exit_index} out of range 0..{self.num_exits - 1}")
        target = self.exit_layers[exit_index]
        if target < state.layer:
            raise ValueError(f"exit {exit_index} (layer {target}) is below the state's layer {state.layer}")
        for k in range(exit_index + 1):
            if self.exit_layers[k] <= state.layer:
                continue
            block_input = state.x
            self.run_layers(state, self.exit_layers[k])  # the trunk's layers of the block
            if k in self._branch_of:
                state.x = state.x + self.branches[self._branch_of[k]](block_input, state.frames)
        return self.exit_norm(exit_index)(state.x)

    def branch_of(self, exit_index: int) -> Optional[DownsampledBranch]:
        """The branch beside the block before exit ``exit_index`` (0-based), or None."""
        i = self._branch_of.get(exit_index)
        return None if i is None else self.branches[i]

    def params_to_exit(self, exit_index: int) -> int:
        """Encoder parameters used when stopping at ``exit_index`` (0-based), branches included."""
        total = super().params_to_exit(exit_index)
        for k, i in self._branch_of.items():
            if k <= exit_index:
                total += sum(p.numel() for p in self.branches[i].parameters())
        return total
