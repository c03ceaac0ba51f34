"""Early-exit Conformer encoder: shapes, exits, and that upper layers are never run."""

import pytest
import torch
from speechbrain.lobes.models.convolution import ConvolutionFrontEnd

from earlyexit_brain.models.conformer import EarlyExitConformerEncoder
from earlyexit_brain.models.exits import CTCExitHeads, count_exits, resolve_exit_layers
from earlyexit_brain.models.frontend import ChannelsLastFrontEnd


def small_encoder(exit_layers=(1, 2, 4), num_layers=4, **kw):
    torch.manual_seed(0)
    return EarlyExitConformerEncoder(
        input_size=20,
        num_layers=num_layers,
        d_model=32,
        nhead=4,
        d_ffn=64,
        exit_layers=list(exit_layers),
        kernel_size=7,
        **kw,
    ).eval()


def test_resolve_exit_layers_forms():
    assert resolve_exit_layers([2, 4, 6], 6) == [2, 4, 6]
    assert resolve_exit_layers(2, 6) == [2, 4, 6]
    assert resolve_exit_layers("every_4", 6) == [4, 6]  # the top layer always exits
    assert count_exits("every_2", 12) == 6


@pytest.mark.parametrize(
    "bad, words",
    [
        ([0, 2], "out of range"),
        ([2, 7], "out of range"),
        ([4, 2], "ascending"),
        ([2, 2], "duplicated"),
        ([], "empty"),
        ("every_x", "every_k"),
        ([1.5], "integer"),
    ],
)
def test_resolve_exit_layers_errors_name_the_key(bad, words):
    with pytest.raises(ValueError) as err:
        resolve_exit_layers(bad, 6)
    assert "exit_layers" in str(err.value) and words in str(err.value)


def test_forward_shapes_and_lengths():
    enc = small_encoder()
    feats = torch.randn(3, 57, 20)
    hiddens = enc(feats, torch.tensor([1.0, 0.7, 0.4]))
    assert len(hiddens) == 3
    for h in hiddens:
        assert h.shape == (3, enc.output_frames(57), 32)
        assert torch.isfinite(h).all()
    heads = CTCExitHeads(32, 11, 3)
    for lp in heads(hiddens):
        assert lp.shape == (3, enc.output_frames(57), 11)
        assert torch.allclose(lp.exp().sum(-1), torch.ones(3, enc.output_frames(57)), atol=1e-5)


@pytest.mark.parametrize("frames", [5, 8, 9, 63, 100, 101, 102, 103])
def test_output_frames_matches_forward(frames):
    enc = small_encoder()
    assert enc(torch.randn(1, frames, 20))[0].shape[1] == enc.output_frames(frames)


def count_layer_calls(enc):
    calls = [0] * enc.num_layers
    hooks = []
    for i, layer in enumerate(enc.layers):

        def hook(module, inputs, output, i=i):
            calls[i] += 1

        hooks.append(layer.register_forward_hook(hook))
    return calls, hooks


@pytest.mark.parametrize("max_exit, expected_layers", [(0, 1), (1, 2), (2, 4)])
def test_layers_above_requested_exit_are_never_called(max_exit, expected_layers):
    enc = small_encoder()
    calls, hooks = count_layer_calls(enc)
    out = enc(torch.randn(2, 40, 20), torch.ones(2), max_exit=max_exit)
    assert len(out) == max_exit + 1
    assert calls == [1] * expected_layers + [0] * (enc.num_layers - expected_layers)
    for h in hooks:
        h.remove()


def test_iter_exits_is_lazy():
    enc = small_encoder()
    calls, _ = count_layer_calls(enc)
    gen = enc.iter_exits(torch.randn(1, 40, 20))
    assert calls == [0, 0, 0, 0]  # nothing runs before the first exit is asked for
    first_index, _ = next(gen)
    assert first_index == 0 and calls == [1, 0, 0, 0]
    gen.close()  # the caller stops: layers 2-4 never run
    assert calls == [1, 0, 0, 0]


def test_truncated_forward_equals_full_forward_prefix():
    enc = small_encoder()
    feats = torch.randn(2, 40, 20)
    lens = torch.tensor([1.0, 0.6])
    full = enc(feats, lens)
    for k in range(enc.num_exits):
        part = enc(feats, lens, max_exit=k)
        assert torch.equal(part[-1], full[k])


def test_bad_max_exit():
    enc = small_encoder()
    with pytest.raises(ValueError):
        enc(torch.randn(1, 20, 20), max_exit=3)


def test_params_to_exit_grows_and_last_exit_uses_every_layer():
    enc = small_encoder()
    counts = [enc.params_to_exit(k) for k in range(enc.num_exits)]
    assert counts == sorted(counts) and len(set(counts)) == len(counts)
    total = sum(p.numel() for p in enc.parameters())
    other_norms = sum(p.numel() for n in enc.exit_norms[:-1] for p in n.parameters())
    assert counts[-1] == total - other_norms


def test_every_exit_gets_gradient():
    enc = small_encoder()
    enc.train()
    heads = CTCExitHeads(32, 11, enc.num_exits)
    losses = [lp.mean() for lp in heads(enc(torch.randn(2, 30, 20)))]
    sum(losses).backward()
    for k, head in enumerate(heads.heads):
        assert head.weight.grad is not None and head.weight.grad.abs().sum() > 0, k
    assert all(p.grad is not None for p in enc.layers[-1].parameters() if p.requires_grad)


def test_constructor_errors():
    with pytest.raises(ValueError, match="nhead"):
        EarlyExitConformerEncoder(20, 2, 30, 4, 64, [2])
    with pytest.raises(ValueError, match="attention_type"):
        EarlyExitConformerEncoder(20, 2, 32, 4, 64, [2], attention_type="foo")


def front_ends(channels, strides, residual=False):
    """Our front end and SpeechBrain's, with the same arguments and parameters."""
    kw = dict(
        input_shape=[None, None, 20],
        num_blocks=len(channels),
        num_layers_per_block=1,
        out_channels=list(channels),
        kernel_sizes=[3] * len(channels),
        strides=list(strides),
        residuals=[residual] * len(channels),
        dropout=0.0,
    )
    torch.manual_seed(0)
    ours = ChannelsLastFrontEnd(**kw)
    theirs = ConvolutionFrontEnd(**kw)
    assert list(ours.state_dict()) == list(theirs.state_dict())  # older checkpoints load
    theirs.load_state_dict(ours.state_dict())
    return ours, theirs


@pytest.mark.parametrize("channels, strides", [([32, 32], [2, 2]), ([16, 8, 12], [2, 1, 2]), ([8], [1])])
def test_the_channels_last_front_end_computes_speechbrains(channels, strides):
    ours, theirs = front_ends(channels, strides)
    assert ours.channels_last
    feats = torch.randn(3, 37, 20)
    feats[2, 25:] = 0.0  # padding, reflected at the edge as SpeechBrain does
    a, b = feats.clone().requires_grad_(), feats.clone().requires_grad_()
    out, ref = ours(a), theirs(b)
    assert out.shape == ref.shape and out.is_contiguous()
    assert torch.allclose(out, ref, atol=1e-5)
    weight = torch.randn_like(ref)
    (out * weight).sum().backward()
    (ref * weight).sum().backward()
    assert torch.allclose(a.grad, b.grad, atol=1e-4)
    for (name, p), q in zip(ours.named_parameters(), theirs.parameters()):
        assert torch.allclose(p.grad, q.grad, atol=1e-3, rtol=1e-4), name


def test_the_front_end_falls_back_to_speechbrains_forward():
    ours, theirs = front_ends([8, 8], [2, 2], residual=True)
    assert not ours.channels_last
    feats = torch.randn(2, 30, 20)
    assert torch.equal(ours(feats), theirs(feats))
