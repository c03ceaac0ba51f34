"""What every early-exit encoder shares: the exit layers (:func:`resolve_exit_layers`), the
incremental interface that stops above the last exit asked for (:class:`IncrementalExits`,
:class:`EncoderState`), and the CTC heads, one per exit (:class:`CTCExitHeads`)."""

from dataclasses import dataclass
from typing import Iterator, List, Optional, Sequence, Tuple, Union

import torch
from torch import nn


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


def count_exits(exit_layers: Union[Sequence[int], int, str], num_layers: int) -> int:
    """Number of exits for an exit specification (for YAML wiring).

    Example
    -------
    >>> count_exits("every_2", 12)
    6
    """
    return len(resolve_exit_layers(exit_layers, num_layers))


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
