"""SpeechBrain's convolutional front end computed channels-last (same weights, same outputs;
docs/notes/2026-11-27-channels-last-front-end.md)."""

import torch
from speechbrain.lobes.models.convolution import ConvolutionFrontEnd
from speechbrain.nnet.CNN import Conv2d, get_padding_elem
from torch import nn
from torch.nn import functional as F


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
