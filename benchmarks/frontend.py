"""The ``frontend`` section: the Conformer's convolutional front end computed by SpeechBrain's
``ConvolutionFrontEnd.forward`` and by the encoder's channels-last forward, side by side."""

import statistics

import torch
from speechbrain.lobes.models.convolution import ConvolutionFrontEnd

from earlyexit_brain.models.conformer import EarlyExitConformerEncoder

from .timing import CONFIGS, stats, time_in_rotation


def bench_frontend(name, batch, seconds, repeats, warmup, device):
    """SpeechBrain's front-end forward against the channels-last one (same module), in rotation."""
    enc_kwargs, ee_layers, _ = CONFIGS[name]
    torch.manual_seed(0)
    frontend = EarlyExitConformerEncoder(input_size=80, exit_layers=ee_layers, dropout=0.0, **enc_kwargs).frontend.to(
        device
    )
    forwards = {"speechbrain": lambda x: ConvolutionFrontEnd.forward(frontend, x), "channels_last": frontend}
    result = {"config": name, "device": str(device), "threads": torch.get_num_threads(), "passes": []}
    for kind, shape in (("train", (batch, int(seconds * 100))), ("inference", (1, 1000))):
        feats = torch.randn(*shape, 80, device=device)
        with torch.no_grad():
            diff = (forwards["speechbrain"](feats) - forwards["channels_last"](feats)).abs().max().item()

        def run(key, kind=kind, feats=feats):
            if kind == "train":
                x = feats.clone().requires_grad_()
                forwards[key](x).square().mean().backward()
            else:
                with torch.no_grad():
                    forwards[key](feats)

        times = time_in_rotation({key: lambda key=key: run(key) for key in forwards}, repeats, warmup, device)
        frontend.zero_grad(set_to_none=True)
        entry = {"pass": kind, "batch": shape[0], "audio_seconds": shape[1] / 100, "max_abs_diff": diff}
        entry.update({k: stats(v) for k, v in times.items()})
        entry["ratio"] = entry["channels_last"]["median_ms"] / entry["speechbrain"]["median_ms"]
        entry["ratio_pairwise_median"] = statistics.median(
            a / b for a, b in zip(times["channels_last"], times["speechbrain"])
        )
        result["passes"].append(entry)
    return result
