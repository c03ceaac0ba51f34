"""ONNX export of wav2vec2 / WavLM encoders (tiny random models, no download): every exit's
log-probabilities and the runtime's transcripts equal PyTorch's; WavLM's segments above the first
layer rebuild its relative position bias."""

import numpy as np
import pytest
import soundfile as sf
import torch

pytest.importorskip("transformers")

from test_ssl_encoder import TINY  # noqa: E402  (tests/unit/test_ssl_encoder.py)

from benchmarks.onnx_runtime import char_tokenizer  # noqa: E402
from earlyexit_brain.export import export_inference_folder  # noqa: E402
from earlyexit_brain.inference import EarlyExitASR  # noqa: E402
from earlyexit_brain.models.exits import CTCExitHeads  # noqa: E402
from earlyexit_brain.models.pipeline import EarlyExitCTCModel  # noqa: E402
from earlyexit_brain.models.ssl import EarlyExitSSLEncoder, WaveformFeatures, WaveformNormalization  # noqa: E402
from earlyexit_brain.onnx_export import export_onnx_folder, pad_batch, torch_exit_log_probs  # noqa: E402
from earlyexit_brain.runtime import EarlyExitONNX  # noqa: E402
from earlyexit_brain.runtime.policies import entropy_score  # noqa: E402

pytestmark = pytest.mark.slow  # two full exports


def ssl_model(family, stable):
    cfg = dict(TINY, model_type=family, do_stable_layer_norm=stable)
    if family == "wavlm":
        cfg.update(num_buckets=16, max_bucket_distance=40)
    torch.manual_seed(0)
    encoder = EarlyExitSSLEncoder(hf_config=cfg, exit_layers=[2, 4])
    return EarlyExitCTCModel(WaveformFeatures(), WaveformNormalization(), encoder, CTCExitHeads(32, 30, 2)).eval()


def signals():
    rng = np.random.default_rng(0)
    return [(0.1 * rng.standard_normal(n)).astype(np.float32) for n in (16000, 9000, 12500)]


def first_exit(runtime, wavs):
    """Each utterance's exit-1 log-probabilities ``(T, V)``, run alone."""
    return [runtime.log_probs_at_exit(w[None], None, 0)[0] for w in wavs]


# wav2vec2 post-norm (no norm at the exits), WavLM stable-layer-norm (the final LayerNorm at every
# exit; its second segment starts at layer 3 and needs the first layer's position bias)
@pytest.mark.parametrize("family, stable", [("wav2vec2", False), ("wavlm", True)])
def test_ssl_exits_export_and_run_as_in_pytorch(tmp_path, family, stable):
    model = ssl_model(family, stable)
    inference = export_inference_folder(
        str(tmp_path / "inference"), model, {"sample_rate": 16000}, char_tokenizer(str(tmp_path))
    )
    onnx = export_onnx_folder(
        inference, str(tmp_path / "onnx"), int8=family == "wavlm", latency_durations=(0.5, 1.0), latency_repeats=1
    )
    runtime = EarlyExitONNX.from_folder(onnx, threads=1)
    assert runtime.exit_layers == [2, 4]
    assert [i["name"] for i in runtime.manifest["precisions"]["fp32"]["segments"][1]["inputs"]] == ["x", "frames"]

    asr = EarlyExitASR.from_hparams(source=inference, savedir=inference)
    wavs, lens = pad_batch(signals())
    expected = torch_exit_log_probs(asr.model, wavs, lens)
    got = runtime.exit_log_probs(wavs, lens)
    frames = [asr.model.encoder.output_frames(len(s)) for s in signals()]
    for k in range(2):
        for b, n in enumerate(frames):
            assert np.abs(got[k][b, :n] - expected[k][b, :n]).max() < 1e-3, (family, k, b)

    paths = []
    for i, wav in enumerate(signals()):
        paths.append(str(tmp_path / f"{i}.wav"))
        sf.write(paths[-1], wav, 16000)
    for exit_number in (1, 2):
        want = [asr.transcribe_file(p, exit=exit_number).text for p in paths]
        assert [runtime.transcribe_file(p, exit=exit_number).text for p in paths] == want
    # a confidence policy: utterances that stop at exit 1 leave the batch (the rest run on, their
    # time axis cut), in the runtime as in PyTorch
    scores = [float(entropy_score(lp[None], np.array([lp.shape[0]]))[0]) for lp in first_exit(runtime, signals())]
    threshold = float(np.median(scores))  # between the utterances' scores: some stop, some go on
    ours = runtime.transcribe_files(paths, policy="entropy", threshold=threshold)
    theirs = asr.transcribe_files(paths, policy="entropy", threshold=threshold)
    assert [(r.text, r.exit) for r in ours] == [(r.text, r.exit) for r in theirs]
    assert sorted({r.exit for r in ours}) == [1, 2]
    if family == "wavlm":
        int8 = EarlyExitONNX.from_folder(onnx, threads=1, precision="int8")
        assert all(isinstance(int8.transcribe_file(p, exit=2).text, str) for p in paths)
