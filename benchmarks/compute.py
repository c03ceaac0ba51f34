"""The ``compute`` section: parameters and multiply-accumulates to each exit (torch.utils.flop_counter)."""

import torch
from torch.utils.flop_counter import FlopCounterMode

from .timing import build_inference_model


@torch.no_grad()
def bench_compute(name, seconds=10.0, vocab=32):
    """Parameters and multiply-accumulates to each exit (torch.utils.flop_counter), batch 1."""
    model = build_inference_model(name, torch.device("cpu"), vocab)
    wav, lens = 0.05 * torch.randn(1, int(seconds * 16000)), torch.ones(1)
    rows = []
    for k, layer in enumerate(model.exit_layers):
        counter = FlopCounterMode(display=False)
        with counter:
            model.exit_log_probs(wav, lens, k)
        rows.append(
            {
                "exit": k + 1,
                "layer": layer,
                "params": model.encoder.params_to_exit(k) + model.heads.params_of_exit(k),
                "gmacs": counter.get_total_flops() / 2e9,
            }
        )
    return {"config": name, "audio_seconds": seconds, "exits": rows}
