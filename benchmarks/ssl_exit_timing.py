"""CPU time from the waveform to each exit: base-size SSL encoders vs the paper's Conformer.

Randomly initialised models (timing does not depend on the weights), built from a
config: nothing downloads. Batch 1, ``--seconds`` of noise, median of ``--repeats``
passes after one warm-up; every model is timed in the same run, side by side.

    python -m benchmarks.ssl_exit_timing --seconds 5 --repeats 5
"""

import argparse
import time

import torch
from speechbrain.lobes.features import Fbank
from speechbrain.processing.features import InputNormalization
from transformers import AutoConfig

from earlyexit_brain.latency import timed_exits
from earlyexit_brain.models.conformer import EarlyExitConformerEncoder
from earlyexit_brain.models.exits import CTCExitHeads
from earlyexit_brain.models.pipeline import EarlyExitCTCModel
from earlyexit_brain.models.ssl import EarlyExitSSLEncoder, WaveformFeatures, WaveformNormalization


def ssl_model(model_type, vocab=256):
    """A random-weight base-size SSL model (12 layers, 768 hidden) with exits every 2 layers."""
    cfg = AutoConfig.for_model(model_type).to_dict()  # the base layout: 12 layers, 768 hidden
    cfg["model_type"] = model_type
    enc = EarlyExitSSLEncoder(hf_config=cfg, exit_layers=[2, 4, 6, 8, 10, 12])
    return EarlyExitCTCModel(WaveformFeatures(), WaveformNormalization(), enc, CTCExitHeads(768, vocab, 6))


def conformer_model():
    enc = EarlyExitConformerEncoder(
        80, 12, 256, 8, 2048, exit_layers=[2, 4, 6, 8, 10, 12], attention_type="regularMHA", abs_pos_encoding=True
    )
    norm = InputNormalization()
    norm(torch.randn(1, 50, 80), torch.ones(1))  # statistics, so that eval mode can normalise
    return EarlyExitCTCModel(Fbank(n_mels=80), norm, enc, CTCExitHeads(256, 256, 6))


@torch.no_grad()
def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--models", default="wav2vec2,wavlm,hubert,conformer")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    wav = 0.01 * torch.randn(1, int(args.seconds * 16000))
    lens = torch.ones(1)
    print(f"torch threads: {torch.get_num_threads()}; {args.seconds} s of audio, batch 1, median of {args.repeats}")
    print(
        "model | ms front end (no layer) | ms to exits 1..6 (layers 2..12) | exit 6 / exit 1 | "
        "exit 6 / exit 3 | layers only: exit 6 / exit 1"
    )
    for name in args.models.split(","):
        model = (conformer_model() if name == "conformer" else ssl_model(name)).eval()
        timed_exits(model, wav, lens)
        runs = torch.tensor([timed_exits(model, wav, lens)[0] for _ in range(args.repeats)])
        ms = runs.median(0).values.tolist()
        front = []
        for _ in range(args.repeats):
            start = time.perf_counter()
            model.encoder.start(model.features(wav, lens), lens)
            front.append((time.perf_counter() - start) * 1000.0)
        f = float(torch.tensor(front).median())
        print(
            f"{name} | {f:.0f} | {' / '.join(f'{v:.0f}' for v in ms)} | {ms[5] / ms[0]:.2f} | "
            f"{ms[5] / ms[2]:.2f} | {(ms[5] - f) / (ms[0] - f):.2f}"
        )


if __name__ == "__main__":
    main()
