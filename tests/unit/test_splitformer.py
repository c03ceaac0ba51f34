"""The Splitformer encoder: masks of the downsampled branches, laziness, the incremental
interface, parameters, compute counted with the branches, its YAMLs and its exported folder."""

import difflib
import json
import os

import pytest
import sentencepiece as spm
import soundfile as sf
import torch
from hyperpyyaml import load_hyperpyyaml
from signals import SR, tone  # tests/unit/signals.py
from speechbrain.lobes.features import Fbank
from speechbrain.processing.features import InputNormalization
from tokenizer_helpers import char_tokenizer  # tests/unit/tokenizer_helpers.py
from torch import nn

from earlyexit_brain import hub
from earlyexit_brain.config import check_hparams_file
from earlyexit_brain.dynamic import run_dynamic
from earlyexit_brain.evaluation import ExitOutputs, summarize
from earlyexit_brain.export import export_inference_folder
from earlyexit_brain.inference import EarlyExitASR
from earlyexit_brain.latency import fit_latency_table
from earlyexit_brain.models.conformer import EarlyExitConformerEncoder
from earlyexit_brain.models.exits import CTCExitHeads
from earlyexit_brain.models.pipeline import EarlyExitCTCModel
from earlyexit_brain.models.splitformer import DownsampledBranch, SplitformerEncoder
from earlyexit_brain.policies import FixedExit
from earlyexit_brain.report import build_report, plot_wer_vs_compute, report_markdown

D = 16


def stack_only(kernel_size=1, **kwargs):
    """A Splitformer whose front end and projection are the identity, on ``(B, T, D)`` inputs.

    The test then sees the stack and the branches only: SpeechBrain's convolution front end
    and the Conformer layers' convolution module (kernel > 1) read the frames beyond an
    utterance's end, which the trunk does whatever the branches do (see the Conformer
    encoder's ``select``); kernel 1 leaves the attention masks as the only guard, which
    is what the branches must get right."""
    torch.manual_seed(0)
    kwargs = dict(dict(num_layers=6, exit_layers=[2, 4, 6]), **kwargs)
    enc = SplitformerEncoder(D, d_model=D, nhead=2, d_ffn=32, kernel_size=kernel_size, dropout=0.0, **kwargs)
    enc.frontend = nn.Identity()
    enc.input_projection = nn.Identity()
    return enc.eval()


@pytest.mark.parametrize("attention_type", ["RelPosMHAXL", "regularMHA"])
@pytest.mark.parametrize("factor", [2, 3])
def test_an_utterance_gives_the_same_output_alone_and_padded_in_a_batch(attention_type, factor):
    enc = stack_only(attention_type=attention_type, branch_factor=factor, branch_exits=[1, 2, 3])
    lengths = [7, 8, 9, 10, 13]  # odd and even, a multiple of the factor or not
    t_max = max(lengths)
    gen = torch.Generator().manual_seed(1)
    utts = [torch.randn(1, n, D, generator=gen) for n in lengths]
    batch = 50.0 * torch.randn(len(lengths), t_max, D, generator=gen)  # loud garbage in the padding
    for b, u in enumerate(utts):
        batch[b, : u.shape[1]] = u[0]
    rel = torch.tensor(lengths, dtype=torch.float32) / t_max
    with torch.no_grad():
        batched = enc(batch, rel)
        for b, u in enumerate(utts):
            alone = enc(u, torch.ones(1))
            for k in range(enc.num_exits):
                torch.testing.assert_close(
                    batched[k][b, : lengths[b]],
                    alone[k][0],
                    atol=1e-5,
                    rtol=1e-5,
                    msg=f"exit {k + 1}, {lengths[b]} frames",
                )


def test_the_branch_masks_padding_and_repeats_its_frames():
    torch.manual_seed(0)
    branch = DownsampledBranch(D, 2, 32, factor=2, kernel_size=1, dropout=0.0).eval()
    x = torch.randn(1, 9, D)
    padded = torch.cat([x, 100.0 * torch.randn(1, 4, D)], 1)
    with torch.no_grad():
        alone, batched = branch(x, torch.tensor([9])), branch(padded, torch.tensor([9]))
    torch.testing.assert_close(batched[:, :9], alone)
    assert alone.shape == x.shape
    torch.testing.assert_close(alone[:, 0::2][:, :4], alone[:, 1::2])  # frame t is the branch's t // 2
    assert branch.downsampled_frames(torch.tensor([1, 2, 9, 10])).tolist() == [1, 1, 5, 5]
    # the mask matters: with it wrong (every frame valid), the garbage reaches the valid frames
    with torch.no_grad():
        leaky = branch(padded, torch.tensor([13]))
    assert not torch.allclose(leaky[:, :9], alone, atol=1e-3)


def counting_hooks(enc):
    calls = {"layers": [0] * len(enc.layers), "branches": [0] * len(enc.branches)}
    for i, layer in enumerate(enc.layers):
        layer.register_forward_hook(lambda *a, i=i: calls["layers"].__setitem__(i, calls["layers"][i] + 1))
    for j, branch in enumerate(enc.branches):
        for layer in branch.layers:
            layer.register_forward_hook(lambda *a, j=j: calls["branches"].__setitem__(j, calls["branches"][j] + 1))
    return calls


@pytest.mark.parametrize("max_exit, layers, branches", [(0, 2, [2, 0]), (1, 4, [2, 0]), (2, 6, [2, 2])])
def test_stopping_at_an_exit_runs_only_the_layers_and_branches_up_to_it(max_exit, layers, branches):
    torch.manual_seed(0)
    enc = SplitformerEncoder(
        20,
        num_layers=6,
        d_model=D,
        nhead=2,
        d_ffn=32,
        exit_layers=[2, 4, 6],
        kernel_size=3,
        dropout=0.0,
        branch_layers=2,
    ).eval()
    calls = counting_hooks(enc)
    with torch.no_grad():
        enc(torch.randn(2, 60, 20), torch.tensor([1.0, 0.6]), max_exit=max_exit)
    assert calls["layers"] == [1] * layers + [0] * (6 - layers)
    assert calls["branches"] == branches  # layer calls: 2 layers per branch, branches at exits 1 and 3
    calls["layers"], calls["branches"] = [0] * 6, [0, 0]
    gen = enc.iter_exits(torch.randn(1, 60, 20))
    with torch.no_grad():
        next(gen)  # exit 1 only: nothing above it has run
    assert calls["layers"] == [1, 1, 0, 0, 0, 0] and calls["branches"] == [2, 0]


def test_the_incremental_path_gives_the_hidden_states_of_forward():
    torch.manual_seed(0)
    enc = SplitformerEncoder(
        20, num_layers=6, d_model=D, nhead=2, d_ffn=32, exit_layers=[2, 4, 6], kernel_size=3, dropout=0.0
    ).eval()
    feats, lens = torch.randn(3, 81, 20), torch.tensor([1.0, 0.7, 0.45])
    with torch.no_grad():
        full = enc(feats, lens)
        state = enc.start(feats, lens)
        torch.testing.assert_close(enc.advance(state, 2), full[2])  # exits skipped: blocks and branches run
        state = enc.start(feats, lens)
        torch.testing.assert_close(enc.advance(state, 0), full[0])
        kept = enc.select(state, torch.tensor([0, 2]), trim=False)  # without trim: exactly the batch's
        torch.testing.assert_close(enc.advance(kept, 2), full[2][[0, 2]])
        with pytest.raises(ValueError, match="below the state's layer"):
            enc.advance(kept, 1)
    stack = stack_only()  # with trim (kernel 1: no convolution reads the cut padding) too
    x, rel = torch.randn(3, 12, D), torch.tensor([1.0, 0.75, 7 / 12])
    with torch.no_grad():
        full = stack(x, rel)
        state = stack.start(x, rel)
        stack.advance(state, 0)
        state = stack.select(state, torch.tensor([1, 2]))
        assert state.x.shape[1] == 9
        hidden = stack.advance(state, 2)
    torch.testing.assert_close(hidden[1, :7], full[2][2, :7], atol=1e-5, rtol=1e-5)


def test_params_and_layers_to_each_exit_count_the_branches(tmp_path):
    kwargs = dict(
        input_size=20, num_layers=6, d_model=D, nhead=2, d_ffn=32, exit_layers=[2, 4, 6], kernel_size=3, dropout=0.0
    )
    torch.manual_seed(0)
    plain = EarlyExitConformerEncoder(**kwargs)
    split = SplitformerEncoder(**kwargs, branch_exits=[1, 3], branch_layers=2)
    branch = sum(p.numel() for p in split.branches[0].parameters())
    assert branch == 2 * sum(p.numel() for p in plain.layers[0].parameters())
    assert [split.params_to_exit(k) - plain.params_to_exit(k) for k in range(3)] == [branch, branch, 2 * branch]
    other_norms = sum(p.numel() for norm in split.exit_norms[:2] for p in norm.parameters())
    assert split.params_to_exit(2) == sum(p.numel() for p in split.parameters()) - other_norms
    assert split.exit_compute_layers == [4, 6, 10] and plain.exit_compute_layers == [2, 4, 6]
    assert SplitformerEncoder(**kwargs, branch_exits=[]).exit_compute_layers == [2, 4, 6]
    heads = CTCExitHeads(D, 5, 3)
    feats = torch.randn(2, 60, 20)
    with torch.no_grad():
        out = run_dynamic(split.eval(), heads, feats, torch.ones(2), FixedExit(1))
    assert out.layers.tolist() == [6, 6]  # 4 trunk layers and the first exit's 2 branch layers
    results = {"test": [{"exit": k + 1, "wer": 1.0, "cer": 1.0, "n": 1} for k in range(3)]}
    report = build_report(split, heads, results, {"epochs": 1, "seconds": 1.0})
    assert [e.get("compute_layers") for e in report["exits"]] == [4, 6, 10] and report["compute_layers"] == 10
    assert [e["params_to_exit"] for e in report["exits"]] == [
        split.params_to_exit(k) + heads.params_of_exit(k) for k in range(3)
    ]
    assert "compute_layers" not in build_report(plain, heads, results, {"epochs": 1, "seconds": 1.0})
    assert os.path.isfile(plot_wer_vs_compute(report, str(tmp_path / "plot.png")))  # x: layers counted, of 10
    outputs = ExitOutputs(
        ids=["a", "b"],
        durations=torch.ones(2, dtype=torch.float64),
        ref_words=torch.ones(2, dtype=torch.float64),
        errors=torch.zeros(2, 3, dtype=torch.float64),
        hyps=[["x"] * 3] * 2,
        exit_ms=torch.ones(2, 3, dtype=torch.float64),
        exit_layers=split.exit_layers,
        compute_layers=split.exit_compute_layers,
    )
    assert summarize(outputs, torch.tensor([0, 2]))["avg_layers"] == 7.0  # (4 + 10) / 2


def test_policy_table_says_how_layers_are_counted():
    report = {
        "params_total": 1,
        "num_layers": 6,
        "compute_layers": 8,
        "train": {"epochs": 1, "seconds": 1},
        "exits": [{"exit": 1, "layer": 2, "params_to_exit": 1, "sets": {"t": {"wer": 1, "cer": 1, "n": 1}}}],
        "policies": [
            {
                "policy": "fixed",
                "exit": 1,
                "threshold": None,
                "sets": {"t": {"wer": 1.0, "avg_layers": 3.0, "seconds": 1.0}},
            }
        ],
    }
    assert "branches counted (of 8: 6 in the stack)" in report_markdown(report)


@pytest.mark.parametrize(
    "kwargs, words",
    [
        ({"branch_exits": [0, 3]}, "branch_exits: 0 is not an exit number; accepted values are 1..3"),
        ({"branch_exits": [3, 1]}, "branch_exits: the exits must be distinct and ascending"),
        ({"branch_exits": "first"}, "branch_exits: expected null or a list"),
        ({"branch_factor": 0}, "branch_factor: expected an integer >= 1"),
        ({"branch_layers": 1.5}, "branch_layers: expected an integer >= 1"),
    ],
)
def test_bad_branch_arguments_name_the_key(kwargs, words):
    with pytest.raises(ValueError, match=words):
        SplitformerEncoder(20, num_layers=6, d_model=D, nhead=2, d_ffn=32, exit_layers=[2, 4, 6], **kwargs)


def model_params(path, overrides):
    with open(path) as fin:
        hparams = load_hyperpyyaml(fin, overrides)
    return hparams, sum(p.numel() for p in hparams["model"].parameters())


def test_the_paper_configuration_has_the_papers_parameters(repo_root, tmp_path):
    overrides = {"data_folder": str(tmp_path), "output_folder": str(tmp_path / "out")}
    hparams, split = model_params(os.path.join(repo_root, "hparams/librispeech/splitformer_ctc_ee.yaml"), overrides)
    _, conformer = model_params(os.path.join(repo_root, "hparams/librispeech/conformer_ctc_ee.yaml"), overrides)
    assert isinstance(hparams["encoder"], SplitformerEncoder) and hparams["encoder"].branch_exits == [1, 6]
    assert hparams["output_neurons"] == 256 and hparams["encoder"].exit_layers == [2, 4, 6, 8, 10, 12]
    assert abs(split / 36.7e6 - 1) < 0.02, split  # the paper's 36.7 M
    assert abs(conformer / 31.5e6 - 1) < 0.02, conformer  # and the early-exit Conformer's 31.5 M


@pytest.mark.parametrize("corpus", ["synthetic", "librispeech"])
def test_the_yamls_differ_from_the_conformers_only_in_the_encoder(repo_root, tmp_path, corpus):
    folder = os.path.join(repo_root, "hparams", corpus)
    conformer = open(os.path.join(folder, "conformer_ctc_ee.yaml")).read().splitlines()
    split = open(os.path.join(folder, "splitformer_ctc_ee.yaml")).read().splitlines()
    changed = [
        line[1:]
        for line in difflib.unified_diff(conformer, split, lineterm="", n=0)
        if line[:1] in "+-" and not line.startswith(("+++", "---"))
    ]
    allowed = ("#", "output_folder: !ref results/", "branch_", "    branch_", "encoder: !new:earlyexit_brain.models.")
    assert changed and all(not line.strip() or line.startswith(allowed) for line in changed), changed
    overrides = {"data_folder": str(tmp_path)} if corpus != "synthetic" else None
    raw = check_hparams_file(os.path.join(folder, "splitformer_ctc_ee.yaml"), overrides)
    assert (
        raw["output_folder"]
        != check_hparams_file(os.path.join(folder, "conformer_ctc_ee.yaml"), overrides)["output_folder"]
    )


def splitformer_folder(tmp_path):
    """A tiny random Splitformer (exits at layers 2/4/6, branches before exits 1 and 3, factor 3)
    written as an inference folder: ``(folder, model)``."""
    (tmp_path / "spm").mkdir()
    tokenizer_path = char_tokenizer(tmp_path / "spm")
    torch.manual_seed(0)
    sp = spm.SentencePieceProcessor(model_file=tokenizer_path)
    normalize = InputNormalization(norm_type="global")
    fbank = Fbank(n_mels=20)
    normalize(fbank(torch.randn(2, SR)), torch.ones(2))
    encoder = SplitformerEncoder(
        20,
        num_layers=6,
        d_model=32,
        nhead=4,
        d_ffn=64,
        exit_layers=[2, 4, 6],
        kernel_size=3,
        dropout=0.0,
        branch_exits=[1, 3],
        branch_factor=3,
    )
    model = EarlyExitCTCModel(fbank, normalize, encoder, CTCExitHeads(32, sp.vocab_size() + 2, 3)).eval()
    table = fit_latency_table([{"seconds": 1.0, "ms": [1.0, 2.0, 3.0]}, {"seconds": 2.0, "ms": [2.0, 4.0, 6.0]}])
    features = {"sample_rate": SR, "n_fft": 400, "n_mels": 20, "hop_length": 10, "win_length": 25}
    policies = {
        "default": {"policy": "posterior_greedy", "threshold": 0.05},
        "thresholds": {"posterior_greedy": 0.05},
        "options": {"posterior_greedy": {"form": "mean"}},
    }
    folder = export_inference_folder(str(tmp_path / "inference"), model, features, tokenizer_path, 0, policies, table)
    return folder, model


def test_an_exported_splitformer_folder_transcribes(tmp_path):
    folder, model = splitformer_folder(tmp_path)
    encoder = model.encoder
    assert "SplitformerEncoder" in open(os.path.join(folder, "hyperparams.yaml")).read()
    asr = EarlyExitASR.from_hparams(source=folder)
    loaded = asr.model.encoder
    assert isinstance(loaded, SplitformerEncoder) and loaded.config == encoder.config
    path = str(tmp_path / "a.wav")
    sf.write(path, tone(1.3, seed=3), SR)
    wav = torch.tensor(sf.read(path, dtype="float32")[0])[None]
    with torch.no_grad():
        for k in range(3):
            torch.testing.assert_close(
                asr.model.exit_log_probs(wav, torch.ones(1), k), model.exit_log_probs(wav, torch.ones(1), k)
            )
            result = asr.transcribe_file(path, exit=k + 1)
            assert result.exit == k + 1 and result.layers == [3, 5, 8][k] and result.error is None
    assert asr.transcribe_file(path).layers in (3, 5, 8)  # the stored default policy


def test_the_side_by_side_benchmark(monkeypatch):
    from benchmarks import timing
    from benchmarks.splitformer import bench_splitformer, markdown

    monkeypatch.setitem(
        timing.CONFIGS,
        "tiny",
        (dict(num_layers=2, d_model=D, nhead=2, d_ffn=32, kernel_size=3, frontend_channels=(8, 8)), [1, 2], [2]),
    )
    result = bench_splitformer("tiny", seconds=1.0, train_batch=2, train_seconds=0.5, repeats=1, warmup=0)
    assert [e["splitformer_compute_layers"] for e in result["exits"]] == [2, 4]
    assert [b["exit"] for b in result["branches"]] == [1, 2]
    assert result["branches"][0]["frames"] == 26  # 101 feature frames, 4x subsampling
    conformer, split = result["params"]["conformer"], result["params"]["splitformer"]
    branch = split[0] - conformer[0]
    assert branch > 0 and split[1] - conformer[1] == 2 * branch
    assert result["train_step"]["ratio"] > 0
    assert all(abs(e["added_ms"] - (e["splitformer_ms"] - e["conformer_ms"])) < 0.011 for e in result["exits"])
    assert "| 2 | 2 | 4 |" in markdown(result)


def test_the_model_card_names_the_splitformer():
    words, tag = hub.encoder_kind({"encoder": "new:earlyexit_brain.models.splitformer.SplitformerEncoder"})
    assert words.startswith("Splitformer encoder") and tag == "splitformer"
    assert hub.encoder_kind({"encoder": "new:earlyexit_brain.models.conformer.EarlyExitConformerEncoder"}) == (
        "Conformer encoder",
        "conformer",
    )


@pytest.mark.slow
def test_a_splitformer_exports_to_onnx_and_the_runtime_counts_its_branches(tmp_path):
    """The branches go into the segments before exits 1 and 3; onnxruntime agrees with PyTorch at
    every exit (the export's own check: a padded batch of odd and even lengths, and each alone),
    and the runtime reports the layers with the branches counted, as EarlyExitASR does."""
    from earlyexit_brain.onnx_export import export_onnx_folder
    from earlyexit_brain.runtime import EarlyExitONNX

    folder, model = splitformer_folder(tmp_path)
    out = export_onnx_folder(folder, str(tmp_path / "onnx"), latency_durations=(0.5,), latency_repeats=1)
    manifest = json.load(open(os.path.join(out, "manifest.json")))
    assert manifest["exit_layers"] == [2, 4, 6] and manifest["compute_layers"] == [3, 5, 8]
    segments = manifest["precisions"]["fp32"]["segments"]
    assert [s.get("branch_layers") for s in segments] == [1, None, 1]
    assert [s.get("branch_factor") for s in segments] == [3, None, 3]
    assert max(manifest["precisions"]["fp32"]["agreement"]["max_abs_diff"]) <= manifest["tolerance"]
    runtime = EarlyExitONNX.from_folder(out, threads=1)
    asr = EarlyExitASR.from_hparams(source=folder)
    for seconds, seed in ((1.3, 3), (0.97, 4)):
        path = str(tmp_path / f"{seed}.wav")
        sf.write(path, tone(seconds, seed=seed), SR)
        for k in (1, 2, 3):
            mine, theirs = runtime.transcribe_file(path, exit=k), asr.transcribe_file(path, exit=k)
            assert (
                (mine.text, mine.exit, mine.layers)
                == (theirs.text, theirs.exit, theirs.layers)
                == (
                    theirs.text,
                    k,
                    [3, 5, 8][k - 1],
                )
            )
    # a manifest whose compute_layers do not fit the exits is refused, naming the file and key
    manifest["compute_layers"] = [1, 5, 8]
    with open(os.path.join(out, "manifest.json"), "w") as fout:
        json.dump(manifest, fout)
    with pytest.raises(ValueError, match="manifest.json: compute_layers"):
        EarlyExitONNX(out, manifest, "fp32", 1)


def test_only_the_conformer_and_the_splitformer_are_exported():
    from types import SimpleNamespace

    from earlyexit_brain.onnx_export import check_exportable

    check_exportable(SimpleNamespace(encoder=stack_only()))
    with pytest.raises(ValueError, match="encoder: Linear is not exported to ONNX"):
        check_exportable(SimpleNamespace(encoder=nn.Linear(2, 2)))
