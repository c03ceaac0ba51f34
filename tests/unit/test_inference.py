"""EarlyExitASR on an exported inference folder (tiny random model, generated audio)."""

import json
import shutil

import pytest
import sentencepiece as spm
import soundfile as sf
import torch
from signals import SR, tone  # tests/unit/signals.py
from speechbrain.decoders import ctc_greedy_decode
from speechbrain.lobes.features import Fbank
from speechbrain.processing.features import InputNormalization

from earlyexit_brain.evaluation import collect_exit_outputs, confidence_exits
from earlyexit_brain.inference import EarlyExitASR
from earlyexit_brain.models.conformer import EarlyExitConformerEncoder
from earlyexit_brain.models.exits import CTCExitHeads
from earlyexit_brain.models.pipeline import EarlyExitCTCModel
from earlyexit_brain.policies import GreedyPosteriorPolicy
from tests.oracles import check_policy_transcription


def greedy_text(model, tokenizer_path, wav, exit_index):
    sp = spm.SentencePieceProcessor(model_file=tokenizer_path)
    with torch.no_grad():
        lp = model.exit_log_probs(wav[None], torch.ones(1), exit_index)
    tokens = ctc_greedy_decode(lp, torch.ones(1), blank_id=0)[0]
    return "".join(sp.id_to_piece(t) for t in tokens if t < sp.vocab_size()).replace("▁", " ").strip()


def test_folder_contents(folder):
    import os

    from earlyexit_brain.files import OWNER_MARKER

    assert sorted(os.listdir(folder)) == sorted(
        [
            "hyperparams.yaml",
            "model.ckpt",
            "normalizer.ckpt",
            "tokenizer.ckpt",
            "exit_policies.ckpt",
            "latency_table.ckpt",
            OWNER_MARKER,
        ]
    )


def test_fixed_exit_transcription_matches_the_model(asr, model, tokenizer_path, audio):
    wav = torch.tensor(sf.read(audio["a"], dtype="float32")[0])
    for exit in (1, 2, 3):
        result = asr.transcribe_file(audio["a"], exit=exit)
        assert result.exit == exit and result.layers == [2, 4, 6][exit - 1]
        assert result.text == greedy_text(model, tokenizer_path, wav, exit - 1)
        assert result.path == audio["a"] and result.error is None


def test_policies_by_name_and_stored_defaults(asr):
    assert asr.make_policy().describe() == {"policy": "posterior_greedy", "threshold": 0.05, "form": "mean"}
    assert asr.make_policy("entropy").threshold == 0.99
    assert asr.make_policy("posterior").threshold == 0.5
    assert asr.make_policy("posterior_greedy", 0.7).threshold == 0.7
    assert asr.make_policy("budget", 100.0).budget_ms == 100.0


def test_budget_policy_uses_the_stored_latency_table(asr, audio):
    # table: exit k costs k ms per second of audio: 1.2 s -> 1.2 / 2.4 / 3.6 ms
    assert asr.transcribe_file(audio["a"], policy="budget", threshold=1000.0).exit == 3
    assert asr.transcribe_file(audio["a"], policy="budget", threshold=3.0).exit == 2
    assert asr.transcribe_file(audio["a"], policy="budget", threshold=0.5).exit == 1


def test_posterior_nbest_search_options_come_from_the_folder(asr, folder, tmp_path):
    assert asr._nbest_searcher().beam_size == 4
    assert asr._nbest_searcher().token_prune_min_logp == -3.0
    # a folder stored without the pruning option (calibrated with SpeechBrain's default)
    older = tmp_path / "older"
    shutil.copytree(folder, older)
    stored = json.loads((older / "exit_policies.ckpt").read_text())
    stored["options"]["posterior"] = {"beam_size": 4}
    (older / "exit_policies.ckpt").write_text(json.dumps(stored))
    assert EarlyExitASR.from_hparams(source=str(older))._nbest_searcher().token_prune_min_logp == -5.0


def test_posterior_nbest_policy_runs(asr, audio):
    result = asr.transcribe_file(audio["a"], policy="posterior", threshold=0.0)
    assert result.exit == 1 and result.layers == 2
    # the exit recomputed exit by exit (tests/oracles.py), and the fixed exit's text; a higher
    # threshold never stops earlier, and at 1.0 only a single hypothesis would stop before the last
    exits = [check_policy_transcription(asr, audio["a"], "posterior", t) for t in (0.3, 0.6, 1.0)]
    assert exits == sorted(exits) and exits[-1] == 3, exits


def test_resampling_and_down_mixing(asr, audio):
    signal = asr.load_checked(audio["stereo8k"])
    assert signal.dim() == 1
    assert abs(signal.shape[0] - 2 * SR) <= 2
    # channels 0.4 and 0.2 amplitude -> mean 0.3
    assert float(signal[SR // 2 : SR].abs().max()) == pytest.approx(0.3, abs=0.03)
    assert asr.transcribe_file(audio["stereo8k"], exit=1).exit == 1


@pytest.mark.parametrize(
    "name, words",
    [
        ("missing", "no such audio file"),
        ("zero_bytes", "cannot be decoded"),
        ("garbage", "cannot be decoded"),
        ("empty", "empty"),
        ("silent", "silent"),
    ],
)
def test_bad_files_name_the_file(asr, audio, name, words):
    with pytest.raises(ValueError, match=words) as err:
        asr.transcribe_file(audio[name])
    assert audio[name] in str(err.value)


@pytest.mark.parametrize(
    "kwargs, words",
    [
        ({"policy": "fastest"}, "policy: unknown policy 'fastest'"),
        ({"policy": "oracle"}, "analysis"),
        ({"policy": "posterior_greedy", "threshold": 2.0}, "threshold"),
        ({"policy": "entropy", "threshold": -1.0}, "threshold"),
        ({"exit": 4}, "exit: the model has exits 1..3, got 4"),
        ({"exit": 1, "policy": "entropy"}, "exit: give either"),
    ],
)
def test_bad_arguments(asr, audio, kwargs, words):
    with pytest.raises(ValueError, match=words.replace(".", r"\.")):
        asr.transcribe_file(audio["a"], **kwargs)


def test_a_bad_file_in_a_batch_is_reported_and_the_rest_transcribed(asr, audio):
    results = asr.transcribe_files([audio["a"], audio["garbage"], audio["b"]], exit=2)
    assert [r.path for r in results] == [audio["a"], audio["garbage"], audio["b"]]
    assert results[1].text is None and audio["garbage"] in results[1].error
    assert results[0].exit == 2 and results[2].exit == 2 and results[0].error is None
    assert results[0].text == asr.transcribe_file(audio["a"], exit=2).text


def test_no_stored_threshold_is_an_error(folder, tmp_path):
    import shutil

    bare = tmp_path / "bare"
    shutil.copytree(folder, bare)
    (bare / "exit_policies.ckpt").write_text("{}\n")
    asr = EarlyExitASR.from_hparams(source=str(bare))
    assert asr.make_policy().describe() == {"policy": "fixed", "exit": 3}
    with pytest.raises(ValueError, match="threshold: no calibrated threshold"):
        asr.make_policy("entropy")


def test_optional_records_are_read_by_name(asr):
    assert asr.stored("latency_table").data == asr.latency_table.to_json()
    assert asr.stored("ngram_lm") is None  # the fixture's folder has no n-gram
    with pytest.raises(KeyError, match="'tokenizer' is not an optional record"):
        asr.stored("tokenizer")


def test_stock_speechbrain_encoder_asr_loads_the_folder(folder, asr, audio):
    from speechbrain.inference.ASR import EncoderASR

    stock = EncoderASR.from_hparams(source=folder)
    assert stock.transcribe_file(audio["a"]) == asr.transcribe_file(audio["a"], exit=3).text


def test_simulated_policy_decisions_equal_a_real_dynamic_run(asr, model, tokenizer_path):
    sp = spm.SentencePieceProcessor(model_file=tokenizer_path)
    items = [
        {"id": f"u{i}", "sig": torch.tensor(tone(0.5 + 0.3 * i, freq=150 + 40 * i, seed=i)), "wrd": "THE CAT"}
        for i in range(6)
    ]
    scorer = GreedyPosteriorPolicy(0.5)
    outputs = collect_exit_outputs(model, items, sp, {"posterior_greedy": scorer})
    assert outputs.errors.shape == (6, 3) and (outputs.exit_ms[:, 1:] >= outputs.exit_ms[:, :-1]).all()
    threshold = float(outputs.scores["posterior_greedy"][:, 0].median())
    simulated = confidence_exits(outputs, scorer, "posterior_greedy", threshold)
    assert 0 < int((simulated == 0).sum()) < 6  # some stop at exit 1, some go on
    for i, item in enumerate(items):
        real = asr.transcribe_batch(item["sig"][None], policy=GreedyPosteriorPolicy(threshold))[0]
        assert real.exit - 1 == int(simulated[i])
        assert real.text == outputs.hyps[i][int(simulated[i])]


def test_moving_the_model_moves_the_normalisation_statistics(tokenizer_path):
    normalize = InputNormalization(norm_type="global")
    fbank = Fbank(n_mels=20)
    normalize(fbank(torch.randn(1, SR)), torch.ones(1))
    encoder = EarlyExitConformerEncoder(
        20, num_layers=2, d_model=16, nhead=2, d_ffn=32, exit_layers=[1, 2], kernel_size=3
    )
    model = EarlyExitCTCModel(fbank, normalize, encoder, CTCExitHeads(16, 5, 2)).eval()
    model.to(torch.float64)  # stands in for a device move: the same _apply path
    assert normalize.glob_mean.dtype == torch.float64 and normalize.glob_std.dtype == torch.float64
    model.to(torch.float32)
    assert normalize.glob_mean.dtype == torch.float32
    with torch.no_grad():
        assert model(torch.randn(1, SR), torch.ones(1)).shape[-1] == 5
