"""The ``stacked*`` and ``graphed`` train-step variants: alternatives to the library's forward and loss.

:class:`StackedExitsBrain` is ``EarlyExitCTCBrain`` (its ``fit_batch`` and everything else) with two hooks
replaced: ``compute_forward`` computes the exits' LayerNorms and heads as one batched op each
(:func:`stacked_log_probs`, optionally captured as CUDA graphs), ``compute_objectives`` every exit's CTC loss
from one call over ``(E, B, T, V)`` (:func:`ctc_stacked`, optionally cuDNN's CTC). The library does not
take them; the benchmark keeps them to measure them against its step.
"""

import torch

from earlyexit_brain.brain import EarlyExitCTCBrain


def stacked_log_probs(enc, heads, feats, lens):
    """``(E, B, T', V)`` log-probabilities of every exit, the exits' LayerNorms and heads as one op each.

    The same function as ``torch.stack(heads(enc(feats, lens)))`` up to float rounding.
    """
    state = enc.start(feats, lens)
    x, done, raw = state.x, 0, []
    for layer_no in enc.exit_layers:
        for layer in enc.layers[done:layer_no]:
            x, _ = layer(
                x, src_mask=state.src_mask, src_key_padding_mask=state.key_padding_mask, pos_embs=state.pos_embs
            )
        done = layer_no
        raw.append(x)
    norms = [n.norm for n in enc.exit_norms]
    h = torch.nn.functional.layer_norm(torch.stack(raw), norms[0].normalized_shape, eps=norms[0].eps)
    h = torch.addcmul(
        torch.stack([n.bias for n in norms])[:, None, None], h, torch.stack([n.weight for n in norms])[:, None, None]
    )
    e, b, t, d = h.shape
    weight = torch.stack([lin.weight for lin in heads.heads])  # (E, V, D)
    bias = torch.stack([lin.bias for lin in heads.heads])  # (E, V)
    logits = torch.baddbmm(bias[:, None], h.reshape(e, b * t, d), weight.transpose(1, 2))
    return torch.log_softmax(logits, dim=-1).view(e, b, t, -1)


class StackedExits(torch.nn.Module):
    """``stacked_log_probs`` as a module (what ``graphed`` captures)."""

    def __init__(self, enc, heads):
        super().__init__()
        self.enc, self.heads = enc, heads

    def forward(self, feats, lens):
        return stacked_log_probs(self.enc, self.heads, feats, lens)


def ctc_stacked(log_probs, wav_lens, tokens, token_lens, cudnn=False):
    """Each exit's mean CTC loss ``(E,)`` from ONE CTC call over ``(E, B, T, V)`` log-probabilities.

    ``wav_lens`` and ``token_lens`` are relative (SpeechBrain's convention) and go into the call as
    integer CPU tensors; the per-utterance losses are divided by the target lengths and averaged per
    exit, as ``reduction='mean'`` does. ``cudnn``: the targets concatenated, int32, on the CPU, and
    a contiguous input, so that PyTorch picks cuDNN's CTC.
    """
    e, b, t, v = log_probs.shape
    lp = log_probs.reshape(e * b, t, v).transpose(0, 1)
    in_lens = (wav_lens.cpu() * t).round().int()
    tok_lens = (token_lens.cpu() * tokens.shape[1]).round().int()
    if cudnn:
        cpu_tokens = tokens.cpu()
        lp = lp.contiguous()
        targets = torch.cat([row[:n] for row, n in zip(cpu_tokens, tok_lens)]).int().repeat(e)
    else:
        targets = tokens.repeat(e, 1)
    losses = torch.nn.functional.ctc_loss(
        lp, targets, in_lens.repeat(e), tok_lens.repeat(e), blank=0, reduction="none", zero_infinity=True
    )
    return (losses / tok_lens.clamp_min(1).to(losses).repeat(e)).view(e, b).mean(1)


class StackedExitsBrain(EarlyExitCTCBrain):
    """The ``stacked*`` and ``graphed`` variants: ``EarlyExitCTCBrain`` (``fit_batch`` and all) whose
    ``compute_forward`` computes every exit with :func:`stacked_log_probs` (optionally captured as CUDA
    graphs) and whose ``compute_objectives`` sums :func:`ctc_stacked` (optionally cuDNN's CTC).

    Arguments
    ---------
    cudnn : bool
        cuDNN's CTC.
    graphed_batch : PaddedBatch, optional
        Capture encoder and heads as CUDA graphs (``torch.cuda.make_graphed_callables``) for this
        batch's shapes.
    """

    def __init__(self, *args, cudnn=False, graphed_batch=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.cudnn = cudnn
        self.exits = StackedExits(self.modules.encoder, self.modules.ctc_heads)
        if graphed_batch is not None:
            wavs, wav_lens = graphed_batch.sig
            with torch.no_grad():
                sample = self.hparams.compute_features(wavs)  # the shape of the normalised features
            self.exits = torch.cuda.make_graphed_callables(self.exits, (sample, wav_lens))

    def compute_forward(self, batch, stage):
        batch = batch.to(self.device)
        wavs, wav_lens = batch.sig
        feats = self.modules.normalize(self.hparams.compute_features(wavs), wav_lens)
        return self.exits(feats, wav_lens), wav_lens

    def compute_objectives(self, predictions, batch, stage):
        log_probs, wav_lens = predictions
        tokens, token_lens = batch.tokens
        losses = ctc_stacked(log_probs, wav_lens, tokens, token_lens, self.cudnn)
        self.record_losses(list(losses))
        return losses.sum()
