"""ONNX export of the exits and the runtime without PyTorch (earlyexit_brain.onnx_export,
earlyexit_brain.runtime): the smoke model of conftest.py exported once for the module."""

import copy
import dataclasses
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import soundfile as sf
import torch
import torchaudio
from signals import SR, tone  # tests/unit/signals.py
from test_controller import S, random_weights  # tests/unit/test_controller.py

from benchmarks.onnx_profile import optimised_nodes, ort_profile
from earlyexit_brain import transcribe
from earlyexit_brain.controller import controller_probability as torch_probability
from earlyexit_brain.controller import exit_features
from earlyexit_brain.files import NotOurFolderError
from earlyexit_brain.inference import EarlyExitASR
from earlyexit_brain.onnx_export import (
    OPSET,
    ExportMismatchError,
    _export,
    _export_like,
    _ExportedGraph,
    _io,
    check_agreement,
    export_onnx_folder,
    pad_batch,
    runtime_default_policy,
    torch_exit_log_probs,
)
from earlyexit_brain.onnx_graphs import HeadGraph
from earlyexit_brain.policies import EntropyPolicy, GreedyPosteriorPolicy
from earlyexit_brain.runtime import EarlyExitONNX
from earlyexit_brain.runtime.audio import resample
from earlyexit_brain.runtime.folder import session_options, sha256_file
from earlyexit_brain.runtime.policies import (
    RuntimeLatencyTable,
    RuntimePolicy,
    controller_features,
    controller_probability,
    entropy_score,
    greedy_posterior_score,
)

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
D = 32  # the smoke model's d_model
B, T = torch.export.Dim("batch"), torch.export.Dim("frames")  # a head graph's dynamic axes


@pytest.fixture(scope="module")
def onnx_folder(folder):
    return export_onnx_folder(
        folder,
        os.path.join(os.path.dirname(folder), "onnx"),
        int8=True,
        latency_durations=(0.5, 1.0),
        latency_repeats=1,
    )


@pytest.fixture(scope="module")
def runtime(onnx_folder):
    return EarlyExitONNX.from_folder(onnx_folder, threads=1)


def copy_of(onnx_folder, tmp_path):
    dest = tmp_path / "onnx"
    shutil.copytree(onnx_folder, dest)
    return dest


def rewrite_sha(folder, name):
    path = os.path.join(folder, "manifest.json")
    manifest = json.load(open(path))
    manifest["files"][name] = sha256_file(os.path.join(folder, name))
    json.dump(manifest, open(path, "w"))


# ---------------------------------------------------------------- export
def test_manifest_lists_exits_graphs_and_every_file(onnx_folder, asr):
    manifest = json.load(open(os.path.join(onnx_folder, "manifest.json")))
    assert manifest["exit_layers"] == [2, 4, 6] and manifest["opset"] == 18
    import onnxruntime

    assert manifest["onnxruntime_version"] == onnxruntime.__version__
    fp32 = manifest["precisions"]["fp32"]
    assert [s["layers"] for s in fp32["segments"]] == [[1, 2], [3, 4], [5, 6]]
    assert [i["name"] for i in fp32["front"]["inputs"]] == ["wavs", "wav_lens"]
    assert [i["name"] for i in fp32["segments"][0]["inputs"]] == ["x", "frames", "pos_embs"]
    assert fp32["front"]["inputs"][0]["shape"] == ["batch", "samples"]  # dynamic batch and length
    assert fp32["heads"][0]["outputs"][0]["shape"][0] == "batch"
    on_disk = {
        os.path.relpath(os.path.join(r, n), onnx_folder)
        for r, _, names in os.walk(onnx_folder)
        for n in names
        if not n.startswith(".")
    } - {"manifest.json"}
    assert set(manifest["files"]) == on_disk
    assert all(sha256_file(os.path.join(onnx_folder, n)) == h for n, h in manifest["files"].items())
    assert {"int8/segment_3.onnx", "tokenizer.model", "policies.json", "fp32/latency_table.json"} <= on_disk
    assert json.load(open(os.path.join(onnx_folder, "policies.json"))) == asr.policies.to_json()


def test_fp32_agrees_with_pytorch_at_every_exit(onnx_folder, runtime, asr, audio):
    manifest = json.load(open(os.path.join(onnx_folder, "manifest.json")))
    assert max(manifest["precisions"]["fp32"]["agreement"]["max_abs_diff"]) <= manifest["tolerance"]
    signals = [runtime.load_checked(audio[name]) for name in ("a", "b", "stereo8k")]
    longest = max(map(len, signals))
    wavs = np.stack([np.pad(s, (0, longest - len(s))) for s in signals])
    lens = np.array([len(s) / longest for s in signals], np.float32)
    ours, ref = runtime.exit_log_probs(wavs, lens), torch_exit_log_probs(asr.model, wavs, lens)
    for k in range(3):
        assert ours[k].shape == ref[k].shape
        assert np.abs(ours[k] - ref[k]).max() < 1e-3, f"exit {k + 1}"
    for name in ("a", "b", "stereo8k"):
        for k in (1, 2, 3):
            mine, theirs = runtime.transcribe_file(audio[name], exit=k), asr.transcribe_file(audio[name], exit=k)
            assert (mine.text, mine.exit, mine.layers) == (theirs.text, theirs.exit, theirs.layers)


def test_policies_give_the_exits_and_texts_of_pytorch(runtime, asr, audio):
    files = [audio["a"], audio["b"], audio["stereo8k"]]
    for policy, threshold in (
        ("entropy", 0.99),
        ("entropy", 0.9999),
        ("posterior_greedy", 0.05),
        ("posterior_greedy", 0.99),
        (None, None),
    ):
        ours = runtime.transcribe_files(files, policy=policy, threshold=threshold)
        theirs = asr.transcribe_files(files, policy=policy, threshold=threshold)
        assert [(r.text, r.exit) for r in ours] == [(r.text, r.exit) for r in theirs], policy


def test_budget_uses_the_latency_table_measured_in_the_runtime(onnx_folder, audio):
    runtime = EarlyExitONNX.from_folder(onnx_folder, threads=1)
    measured = json.load(open(os.path.join(onnx_folder, "fp32", "latency_table.json")))
    assert [p["seconds"] for p in measured["points"]] == [0.5, 1.0] and measured["device"] == "cpu:onnxruntime"
    assert runtime.latency_table.intercept_ms == measured["intercept_ms"]
    runtime.latency_table = RuntimeLatencyTable([1.0, 2.0, 3.0], [1.0, 2.0, 3.0])  # a 1.2 s file: 2.2, 4.4, 6.6 ms
    for budget, exit in ((1e9, 3), (5.0, 2), (4.0, 1), (1e-6, 1)):
        assert runtime.transcribe_file(audio["a"], policy="budget", threshold=budget).exit == exit
    runtime.runs = {"front": 0, "segments": [0, 0, 0], "heads": [0, 0, 0]}
    runtime.transcribe_file(audio["a"], policy="budget", threshold=5.0)
    assert runtime.runs["segments"] == [1, 1, 0] and runtime.runs["heads"] == [0, 1, 0]


def test_numpy_scores_equal_the_pytorch_policies():
    gen = torch.Generator().manual_seed(0)
    log_probs = torch.log_softmax(3 * torch.randn(3, 11, 7, generator=gen), -1)
    lengths = torch.tensor([1.0, 0.55, 0.1])
    frames = np.array([11, 6, 1])
    np.testing.assert_allclose(
        entropy_score(log_probs.numpy(), frames), EntropyPolicy(0.5).score(log_probs, lengths).numpy(), rtol=1e-5
    )
    np.testing.assert_allclose(
        entropy_score(log_probs.numpy(), frames, normalize=False),
        EntropyPolicy(0.5, normalize=False).score(log_probs, lengths).numpy(),
        rtol=1e-5,
    )
    for form in ("mean", "geometric"):
        np.testing.assert_allclose(
            greedy_posterior_score(log_probs.numpy(), frames, form),
            GreedyPosteriorPolicy(0.5, form).score(log_probs, lengths).numpy(),
            rtol=1e-5,
        )


def test_the_shared_arena_gives_the_numbers_of_per_session_arenas(onnx_folder, runtime, audio):
    """Every session allocates from the process's one arena by default; a padded batch run twice
    (blocks reused across graphs and runs) gives what sessions with their own arenas give."""

    def env_allocators(session):
        try:
            return session.get_session_options().get_session_config_entry("session.use_env_allocators")
        except Exception:  # onnxruntime raises when the entry was never set
            return None

    own = EarlyExitONNX.from_folder(onnx_folder, options=session_options(1, shared_memory=False))
    assert all(env_allocators(s) == "1" for s in [runtime.front, *runtime.segments, *runtime.heads])
    assert env_allocators(own.front) is None
    signals = [runtime.load_checked(audio[name]) for name in ("b", "a")]
    longest = max(map(len, signals))
    wavs = np.stack([np.pad(s, (0, longest - len(s))) for s in signals])
    lens = np.array([len(s) / longest for s in signals], np.float32)
    for _ in range(2):
        for shared, separate in zip(runtime.exit_log_probs(wavs, lens), own.exit_log_probs(wavs, lens)):
            np.testing.assert_array_equal(shared, separate)


def test_a_graph_of_the_same_structure_takes_the_other_modules_weights(tmp_path):
    """The export writes one graph per structure and copies it with each further module's weights
    (the exporter's folded, transposed weights matched by value); a module whose weights do not
    line up, or whose copy computes something else, is refused and its file removed."""
    torch.manual_seed(0)
    layers = lambda width, act: torch.nn.Sequential(torch.nn.Linear(4, width), act, torch.nn.Linear(width, 3))  # noqa: E731
    a, b = layers(6, torch.nn.Tanh()), layers(6, torch.nn.Tanh())
    x = torch.randn(2, 5, 4)
    dims = ({0: torch.export.Dim("batch"), 1: torch.export.Dim("frames")},)
    path_a = str(tmp_path / "a.onnx")
    _export(a, (x,), path_a, ["x"], ["y"], dims, OPSET)
    template = _ExportedGraph(path_a, a)
    io = _export_like(template, b, (x,), str(tmp_path / "b.onnx"))
    assert io == _io(str(tmp_path / "b.onnx")) and io["inputs"][0]["name"] == "x"  # the manifest's entry
    other = torch.randn(3, 7, 4)  # the copy keeps the dynamic axes
    got = ort.InferenceSession(str(tmp_path / "b.onnx")).run(None, {"x": other.numpy()})[0]
    with torch.no_grad():
        np.testing.assert_allclose(got, b(other).numpy(), rtol=1e-5, atol=1e-5)
        assert np.abs(got - a(other).numpy()).max() > 1e-2
    for refused in (layers(7, torch.nn.Tanh()), layers(6, torch.nn.ReLU())):  # other shapes; another function
        path = str(tmp_path / "refused.onnx")
        assert _export_like(template, refused, (x,), path) is None and not os.path.exists(path)


def test_int8_runs_and_is_smaller(onnx_folder, audio):
    manifest = json.load(open(os.path.join(onnx_folder, "manifest.json")))

    def size(precision, part=""):
        return sum(
            os.path.getsize(os.path.join(onnx_folder, n))
            for n in manifest["files"]
            if n.startswith(f"{precision}/{part}") and n.endswith(".onnx")
        )

    assert size("int8") < size("fp32") and size("int8", "segment_") < 0.75 * size("fp32", "segment_")
    int8 = EarlyExitONNX.from_folder(onnx_folder, threads=1, precision="int8")
    result = int8.transcribe_file(audio["a"], exit=3)
    assert result.exit == 3 and isinstance(result.text, str)
    assert len(manifest["precisions"]["int8"]["agreement"]["max_abs_diff"]) == 3


def test_export_refuses_a_mismatch_naming_the_exit(onnx_folder):
    agreement = json.load(open(os.path.join(onnx_folder, "manifest.json")))["precisions"]["fp32"]["agreement"]
    check_agreement(agreement, 1e-3, [2, 4, 6])
    with pytest.raises(ExportMismatchError, match=r"exit 1 \(layer 2\).*differ by up to"):
        check_agreement(agreement, 1e-12, [2, 4, 6])


def test_default_policy_falls_back_when_the_runtime_lacks_it():
    policies = {"default": {"policy": "posterior", "threshold": 0.9}, "thresholds": {"posterior_greedy": 0.7}}
    assert runtime_default_policy(policies, 3)["policy"] == "posterior_greedy"
    assert runtime_default_policy({"default": {"policy": "posterior"}}, 3)["exit"] == 3
    assert runtime_default_policy({}, 2) == {"policy": "fixed", "exit": 2}


# ---------------------------------------------------------------- dynamic inference
def test_segments_above_the_deepest_needed_exit_never_run(onnx_folder):
    runtime = EarlyExitONNX.from_folder(onnx_folder, threads=1)
    wavs = np.stack([0.3 * np.sin(np.arange(20000) * f) for f in (0.01, 0.03)]).astype(np.float32)
    for exit, segments, heads in ((1, [1, 0, 0], [1, 0, 0]), (2, [1, 1, 0], [0, 1, 0]), (3, [1, 1, 1], [0, 0, 1])):
        runtime.runs = {"front": 0, "segments": [0, 0, 0], "heads": [0, 0, 0]}
        assert [r.exit for r in runtime.transcribe_batch(wavs, exit=exit)] == [exit, exit]
        assert runtime.runs == {"front": 1, "segments": segments, "heads": heads}


class StopRowZeroFirst(RuntimePolicy):
    """Stops the batch's first row at exit 1 and the other at the last exit; records batch sizes."""

    def __init__(self):
        super().__init__("entropy", 0.0)
        self.seen = []

    def __call__(self, exit_index, log_probs, frames):
        self.seen.append(log_probs.shape[:2])
        return np.array([exit_index == 0 and len(self.seen) == 1 and i == 0 for i in range(len(log_probs))])


def test_stopped_utterances_leave_the_batch(onnx_folder):
    runtime = EarlyExitONNX.from_folder(onnx_folder, threads=1)
    wavs = np.zeros((2, 24000), np.float32)
    wavs[0] = 0.3 * np.sin(np.arange(24000) * 0.02)
    wavs[1, :16000] = 0.3 * np.sin(np.arange(16000) * 0.05)
    lens = np.array([1.0, 16000 / 24000], np.float32)
    policy = StopRowZeroFirst()
    results = runtime.transcribe_batch(wavs, lens, policy=policy)
    assert [(r.exit, r.layers) for r in results] == [(1, 2), (3, 6)]
    assert policy.seen[0][0] == 2 and policy.seen[1][0] == 1  # exit 2 saw only the second row
    assert policy.seen[1][1] < policy.seen[0][1]  # ... cut to its own frames
    alone = runtime.transcribe_batch(wavs[1:, :16000], exit=3)[0]
    assert results[1].text == alone.text


# ---------------------------------------------------------------- the learned policy
CONTROLLER = random_weights(num_exits=3, hidden_size=D, hidden_units=4, seed=2, scale=2.0)


def learned_bundle(policies) -> dict:
    """A stored bundle with :data:`CONTROLLER` and a calibrated learned threshold."""
    data = policies.to_json()
    data["thresholds"] = {**data["thresholds"], "learned": 0.5}
    return {**data, "controller": CONTROLLER.to_json()}


@pytest.fixture(scope="module")
def controller_folder(folder, asr, tmp_path_factory):
    """conftest's inference folder with a random controller in its policy bundle."""
    out = tmp_path_factory.mktemp("learned") / "inference"
    shutil.copytree(folder, out)
    with open(out / "exit_policies.ckpt", "w") as fout:
        json.dump(learned_bundle(asr.policies), fout)
    return str(out)


@pytest.fixture(scope="module")
def learned_onnx(onnx_folder, asr, tmp_path_factory):
    """The module's export with the same bundle as policies.json (what the export writes from
    exit_policies.ckpt: see test_manifest_lists_exits_graphs_and_every_file)."""
    dest = tmp_path_factory.mktemp("learned_onnx") / "onnx"
    shutil.copytree(onnx_folder, dest)
    with open(dest / "policies.json", "w") as fout:
        json.dump(learned_bundle(asr.policies), fout)
    rewrite_sha(dest, "policies.json")
    return str(dest)


@pytest.fixture(scope="module")
def learned_asr(controller_folder):
    return EarlyExitASR.from_hparams(source=controller_folder)


@pytest.fixture(scope="module")
def learned_runtime(learned_onnx):
    return EarlyExitONNX.from_folder(learned_onnx, threads=1)


@pytest.fixture(scope="module")
def utterances(tmp_path_factory):
    d = tmp_path_factory.mktemp("learned_audio")
    out = []
    for i, seconds in enumerate((1.2, 0.6, 2.0, 0.9, 1.5, 0.7, 1.1)):
        path = str(d / f"u{i}.wav")
        sf.write(path, tone(seconds, freq=150.0 + 60 * i, amp=0.1 + 0.05 * i, seed=i), SR)
        out.append(path)
    return out


def test_the_heads_give_the_normalised_states(learned_onnx, learned_runtime):
    assert learned_runtime.policies.controller == CONTROLLER
    assert learned_runtime.hidden_size == D and learned_runtime.heads_give_states
    manifest = json.load(open(os.path.join(learned_onnx, "manifest.json")))
    for precision in ("fp32", "int8"):
        heads = manifest["precisions"][precision]["heads"]
        assert [o["name"] for o in heads[0]["outputs"]] == ["log_probs", "hidden"]
        assert heads[0]["outputs"][1]["shape"] == ["batch", heads[0]["inputs"][0]["shape"][1], D]


@torch.no_grad()
def test_the_runtime_features_equal_pytorch_at_every_exit(learned_onnx, learned_asr, utterances, tmp_path):
    """The heads' ``hidden`` are the normalised states that ``advance`` gives (the segments' output is
    not: with exit norms that are not the identity, as after training, the features would differ)."""
    model = copy.deepcopy(learned_asr.model)
    gen = torch.Generator().manual_seed(5)
    for norm in model.encoder.exit_norms[:2]:
        for name, param in norm.named_parameters():  # the scale around 1, the shift around 0
            param.copy_(float(name.endswith("weight")) + 0.5 * torch.randn(param.shape, generator=gen))
    dest = copy_of(learned_onnx, tmp_path)
    x = torch.randn(2, 7, D, generator=gen)
    for k in range(2):  # heads with these norms
        name = f"fp32/head_{k + 1}.onnx"
        _export(HeadGraph(model, k), (x,), str(dest / name), ["x"], ["log_probs", "hidden"], ({0: B, 1: T},), 18)
        rewrite_sha(dest, name)
    runtime = EarlyExitONNX.from_folder(dest, threads=1)
    wavs, lens = pad_batch([runtime.load_checked(p) for p in utterances[:4]])
    w, rel = torch.from_numpy(wavs), torch.from_numpy(lens)
    state = model.encoder.start(model.features(w, rel), rel)
    x, frames, pos = runtime._run_front(wavs, lens)
    ref_prev = ours_prev = None
    for k in range(2):
        hidden = model.encoder.advance(state, k)
        lp = model.heads.forward_exit(k, hidden)
        ref = exit_features(hidden, lp, state.frames, ref_prev, 0)
        x = runtime._run_segment(k, x, frames, pos)
        ours_lp, ours_hidden = runtime._run_head_states(k, x)
        ours = controller_features(ours_hidden, ours_lp, frames, ours_prev, 0)
        np.testing.assert_allclose(ours, ref.numpy(), atol=1e-4)
        np.testing.assert_allclose(
            controller_probability(CONTROLLER, k, ours), torch_probability(CONTROLLER, k, ref).numpy(), atol=1e-4
        )
        assert np.abs(controller_features(x, ours_lp, frames, ours_prev, 0) - ours).max() > 0.1
        ref_prev, ours_prev = lp, ours_lp


def test_learned_exits_and_texts_equal_pytorch(learned_runtime, learned_asr, utterances):
    policy = learned_asr.make_policy("learned", threshold=0.5)
    # thresholds between the utterances' exit-1 probabilities (each alone) send them to different exits
    probs = []
    for path in utterances:
        wav = torch.from_numpy(learned_runtime.load_checked(path))[None]
        model = learned_asr.model
        with torch.no_grad():
            state = model.encoder.start(model.features(wav, torch.ones(1)), torch.ones(1))
            hidden = model.encoder.advance(state, 0)
            probs.append(float(policy.score(model.heads.forward_exit(0, hidden), torch.ones(1), 0, hidden)[0]))
    ranked = sorted(probs)
    middles = [(a + c) / 2 for a, c in zip(ranked, ranked[1:]) if c - a > 1e-3]
    thresholds = [0.0, 0.5, 1.0] + middles[:: max(1, len(middles) // 3)]
    spread = 0
    for threshold in thresholds:
        ours = learned_runtime.transcribe_files(utterances, policy="learned", threshold=threshold)
        theirs = learned_asr.transcribe_files(utterances, policy="learned", threshold=threshold)
        assert [(r.text, r.exit, r.layers) for r in ours] == [(r.text, r.exit, r.layers) for r in theirs], threshold
        spread = max(spread, len({r.exit for r in ours}))
    assert spread >= 2  # some threshold sent the utterances to different exits
    default = learned_runtime.transcribe_files(utterances, policy="learned")  # the stored threshold, 0.5
    assert [r.exit for r in default] == [r.exit for r in learned_asr.transcribe_files(utterances, policy="learned")]


def test_learned_utterances_leave_the_batch_and_no_segment_runs_beyond(learned_runtime, utterances):
    runtime = learned_runtime
    runtime.runs = {"front": 0, "segments": [0, 0, 0], "heads": [0, 0, 0]}
    first = runtime.transcribe_files(utterances, policy="learned", threshold=0.0)
    assert {r.exit for r in first} == {1}
    assert runtime.runs["segments"] == [1, 0, 0] and runtime.runs["heads"] == [1, 0, 0]
    seen = []

    class Spy:  # stops the longest utterance still running at each exit
        needs_context = True

        def planned_exits(self, durations, num_exits):
            return None

        def __call__(self, k, log_probs, frames, hidden=None, previous=None):
            seen.append((log_probs.shape, hidden.shape, None if previous is None else previous.shape))
            return np.arange(len(frames)) == int(np.argmax(frames))

    wavs, lens = pad_batch([runtime.load_checked(p) for p in utterances[:4]])
    _, exits, _ = runtime.run_dynamic(wavs, lens, Spy())
    assert exits.tolist() == [1, 2, 0, 2]  # 1.2, 0.6, 2.0 and 0.9 s
    (lp0, h0, p0), (lp1, h1, p1) = seen
    assert p0 is None and h0 == lp0[:2] + (D,)
    assert lp1[0] == 3 and lp1[1] < lp0[1]  # the longest left: the batch's time axis was cut
    assert h1 == lp1[:2] + (D,) and p1 == lp1  # the previous exit's, re-indexed and cut to the current length


def test_a_statistics_only_controller_runs_without_the_states(learned_onnx, controller_folder, utterances, tmp_path):
    """A controller that does not read the states (the recipes' default): the runtime asks the heads
    for ``log_probs`` alone and decides as PyTorch does."""
    stats = dataclasses.replace(
        CONTROLLER,
        reads_states=False,
        exits=[
            {**e, "mean": e["mean"][:S], "scale": e["scale"][:S], "w1": [r[:S] for r in e["w1"]]}
            for e in CONTROLLER.exits
        ],
    )
    dest = copy_with_policies(learned_onnx, tmp_path, lambda data: data.update(controller=stats.to_json()))
    bundle = tmp_path / "inference"
    shutil.copytree(controller_folder, bundle)
    data = json.load(open(bundle / "exit_policies.ckpt"))
    json.dump({**data, "controller": stats.to_json()}, open(bundle / "exit_policies.ckpt", "w"))
    runtime, asr = EarlyExitONNX.from_folder(dest, threads=1), EarlyExitASR.from_hparams(source=str(bundle))
    asked = []
    for head in runtime.heads:
        head.run = lambda names, feed, run=head.run: asked.append(tuple(names)) or run(names, feed)
    model = asr.model
    probs = []
    with torch.no_grad():
        for path in utterances:
            wav = torch.from_numpy(runtime.load_checked(path))[None]
            state = model.encoder.start(model.features(wav, torch.ones(1)), torch.ones(1))
            hidden = model.encoder.advance(state, 0)
            probs.append(
                float(
                    asr.make_policy("learned", threshold=0.5).score(
                        model.heads.forward_exit(0, hidden), torch.ones(1), 0, hidden
                    )[0]
                )
            )
    threshold = float(np.median(probs))  # about half the utterances stop at exit 1
    ours = runtime.transcribe_files(utterances, policy="learned", threshold=threshold)
    theirs = asr.transcribe_files(utterances, policy="learned", threshold=threshold)
    assert [(r.text, r.exit) for r in ours] == [(r.text, r.exit) for r in theirs]
    assert len({r.exit for r in ours}) >= 2
    assert asked and set(asked) == {("log_probs",)}


def copy_with_policies(onnx_folder, tmp_path, change):
    dest = copy_of(onnx_folder, tmp_path)
    data = json.load(open(dest / "policies.json"))
    change(data)
    json.dump(data, open(dest / "policies.json", "w"))
    rewrite_sha(dest, "policies.json")
    return dest


@pytest.mark.parametrize(
    "num_exits, hidden_size, message",
    [(3, 16, "3 exits and 16-dimensional"), (2, D, f"2 exits and {D}-dimensional")],
)
def test_a_controller_for_another_model_is_refused(learned_onnx, tmp_path, num_exits, hidden_size, message):
    wrong = random_weights(num_exits=num_exits, hidden_size=hidden_size)
    dest = copy_with_policies(learned_onnx, tmp_path, lambda data: data.update(controller=wrong.to_json()))
    with pytest.raises(ValueError, match=rf"policies.json: its learned exit controller was trained for {message}"):
        EarlyExitONNX.from_folder(dest)


def test_without_a_controller_or_the_heads_states_learned_is_refused(learned_onnx, learned_runtime, tmp_path):
    dest = copy_with_policies(learned_onnx, tmp_path, lambda data: data.pop("controller"))
    runtime = EarlyExitONNX.from_folder(dest)
    with pytest.raises(ValueError, match="policy: the learned policy needs a learned exit controller"):
        runtime.make_policy("learned", threshold=0.5)
    runtime.make_policy("entropy")  # the others still run
    old = EarlyExitONNX.from_folder(learned_onnx)
    old.heads_give_states = False  # as an export made before the heads gave their states
    with pytest.raises(ValueError, match="export the model again"):
        old.make_policy("learned")


# ---------------------------------------------------------------- without PyTorch
BLOCKER = """
import importlib.abc, sys
BLOCKED = ("torch", "torchaudio", "speechbrain", "transformers")
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ImportError(f"blocked import of {name}")
sys.meta_path.insert(0, Block())
"""


def test_the_runtime_runs_with_torch_blocked(onnx_folder, learned_onnx, learned_runtime, utterances, audio):
    learned = [r.exit for r in learned_runtime.transcribe_files(utterances, policy="learned")]
    code = (
        BLOCKER
        + f"""
import json, runpy
from earlyexit_brain.runtime import EarlyExitONNX
asr = EarlyExitONNX.from_folder({onnx_folder!r}, threads=1)
r = asr.transcribe_file({audio["stereo8k"]!r}, policy="entropy")
bad = asr.transcribe_files([{audio["a"]!r}, {audio["silent"]!r}])
learned = EarlyExitONNX.from_folder({learned_onnx!r}, threads=1).transcribe_files({utterances!r}, policy="learned")
print(json.dumps({{"exit": r.exit, "text": r.text, "errors": [b.error is not None for b in bad],
                  "learned": [r.exit for r in learned],
                  "loaded": sorted(m for m in sys.modules if m.split(".")[0] in BLOCKED)}}))
sys.argv = ["x", {onnx_folder!r}, {audio["a"]!r}, "--exit", "2", "--threads", "1"]
runpy.run_module("earlyexit_brain.runtime", run_name="__main__")
"""
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.strip().splitlines()
    result = json.loads(lines[0])
    assert result["loaded"] == [] and result["exit"] in (1, 2, 3) and result["errors"] == [False, True]
    assert result["learned"] == learned  # the learned policy's numpy features and estimator
    assert "exit 2 (4 layers)" in lines[1]


# ---------------------------------------------------------------- bad inputs
def test_a_changed_file_is_refused_by_its_sha256(onnx_folder, tmp_path):
    dest = copy_of(onnx_folder, tmp_path)
    with open(dest / "policies.json", "a") as fout:
        fout.write(" ")
    with pytest.raises(ValueError, match=r"policies.json: sha256 .* does not match manifest.json"):
        EarlyExitONNX.from_folder(dest)
    os.remove(dest / "fp32" / "head_2.onnx")
    with pytest.raises(ValueError, match=r"head_2.onnx: missing"):
        EarlyExitONNX.from_folder(dest)


def test_a_corrupted_graph_or_an_unknown_opset_is_named(onnx_folder, tmp_path):
    dest = copy_of(onnx_folder, tmp_path)
    data = open(dest / "fp32" / "segment_2.onnx", "rb").read()
    open(dest / "fp32" / "segment_2.onnx", "wb").write(data[: len(data) // 2])
    rewrite_sha(dest, "fp32/segment_2.onnx")
    with pytest.raises(ValueError, match=r"segment_2.onnx: onnxruntime .* cannot load it"):
        EarlyExitONNX.from_folder(dest)
    shutil.copyfile(os.path.join(onnx_folder, "fp32", "segment_2.onnx"), dest / "fp32" / "segment_2.onnx")
    rewrite_sha(dest, "fp32/segment_2.onnx")
    model = onnx.load(str(dest / "fp32" / "head_1.onnx"))
    model.opset_import[0].version = 99
    onnx.save(model, str(dest / "fp32" / "head_1.onnx"))
    rewrite_sha(dest, "fp32/head_1.onnx")
    with pytest.raises(ValueError, match=r"head_1.onnx: onnxruntime .* cannot load it.*[Oo]pset 99"):
        EarlyExitONNX.from_folder(dest)


def test_folder_and_argument_errors(onnx_folder, runtime, tmp_path):
    with pytest.raises(ValueError, match="not an ONNX export"):
        EarlyExitONNX.from_folder(tmp_path)
    with pytest.raises(ValueError, match="precision"):
        EarlyExitONNX.from_folder(onnx_folder, precision="int4")
    with pytest.raises(ValueError, match="threads"):
        EarlyExitONNX.from_folder(onnx_folder, threads=0)
    with pytest.raises(ValueError, match="posterior_greedy"):
        runtime.make_policy("posterior")
    with pytest.raises(ValueError, match="threshold: give policy="):
        runtime.make_policy(threshold=0.5)
    with pytest.raises(ValueError, match="exit: the model has exits 1..3"):
        runtime.make_policy(exit=4)


def test_bad_audio_is_named_and_the_rest_transcribed(runtime, asr, audio):
    for name, why in (
        ("empty", "empty"),
        ("silent", "silent"),
        ("zero_bytes", "cannot be decoded"),
        ("garbage", "cannot be decoded"),
        ("missing", "no such audio file"),
    ):
        with pytest.raises(ValueError, match=why) as err:
            runtime.transcribe_file(audio[name])
        assert audio[name] in str(err.value)
    files = [audio["a"], audio["garbage"], audio["b"]]
    results = runtime.transcribe_files(files, exit=2)
    assert results[1].text is None and audio["garbage"] in results[1].error
    assert [r.text for r in results] == [r.text for r in asr.transcribe_files(files, exit=2)]
    wavs = np.zeros((3, 16000), np.float32)
    wavs[0] = 0.3 * np.sin(np.arange(16000) * 0.02)
    wavs[2, 0] = np.nan
    rows = runtime.transcribe_batch(wavs, np.array([1.0, 0.0, 1.0]), exit=1)
    assert rows[0].text is not None and "empty" in rows[1].error and "NaN" in rows[2].error


def test_resampling_equals_torchaudio():
    rng = np.random.default_rng(1)
    for orig in (8000, 22050, 44100):
        x = (0.3 * rng.standard_normal((orig + 123, 2))).astype(np.float32)
        ref = torchaudio.transforms.Resample(orig, 16000)(torch.from_numpy(x.T.copy())).numpy().T
        np.testing.assert_allclose(resample(x, orig, 16000), ref, atol=1e-5)


def test_export_source_and_destination_errors(folder, tmp_path):
    partial = tmp_path / "inference"
    shutil.copytree(folder, partial)
    os.remove(partial / "tokenizer.ckpt")
    with pytest.raises(ValueError, match=r"tokenizer.ckpt: missing; the inference folder has no tokenizer"):
        export_onnx_folder(str(partial))
    os.remove(partial / "model.ckpt")
    with pytest.raises(ValueError, match=r"model.ckpt: missing; the inference folder has no weights"):
        export_onnx_folder(str(partial))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="neither an inference folder"):
        export_onnx_folder(str(tmp_path / "empty"))
    theirs = tmp_path / "theirs"
    theirs.mkdir()
    (theirs / "notes.txt").write_text("mine")
    with pytest.raises(NotOurFolderError, match="--out"):
        export_onnx_folder(folder, str(theirs))
    assert (theirs / "notes.txt").read_text() == "mine"


def test_transcribe_command_takes_an_onnx_folder(onnx_folder, audio, capsys):
    code = transcribe.main([onnx_folder, audio["a"], audio["missing"], "--exit", "1", "--threads", "1"])
    out, err = capsys.readouterr()
    assert code == 1 and "exit 1 (2 layers)" in out and audio["missing"] in err
    assert transcribe.main([onnx_folder, audio["a"], "--decoder", "ctc_beam"]) == 2


# ---------------------------------------------------------------- publishing
def test_the_hub_folder_carries_the_onnx_export_validated(tmp_path, folder, model, onnx_folder):
    from test_hub import make_experiment  # tests/unit/test_hub.py

    from earlyexit_brain import hub

    experiment = make_experiment(tmp_path, folder, model)
    shutil.copytree(onnx_folder, experiment / "onnx")
    out = hub.build_hub_folder(str(experiment), str(tmp_path / "hub"), "alice/tiny-ee", onnx=True)
    assert not os.path.exists(os.path.join(out, "onnx", ".earlyexit_brain.json"))
    assert json.load(open(os.path.join(out, "config.json")))["earlyexit_brain"]["onnx"]["folder"] == "onnx"
    assert "EarlyExitONNX.from_folder" in open(os.path.join(out, "README.md")).read()
    texts = hub.validate_hub_folder(out)
    example = os.path.join(out, "example.wav")
    assert texts["onnx_fp32"] == EarlyExitONNX.from_folder(os.path.join(out, "onnx")).transcribe_file(example).text
    assert "onnx_int8" in texts
    with open(os.path.join(out, "onnx", "int8", "head_1.onnx"), "ab") as fout:
        fout.write(b"tampered")
    with pytest.raises(hub.PublishError, match=r"onnx: the ONNX runtime could not load its int8 graphs.*sha256"):
        hub.validate_hub_folder(out)


# ---------------------------------------------------------------- the benchmark module
def test_benchmark_sections_run_on_the_smoke_model(model, onnx_folder, audio):
    from benchmarks.onnx_runtime import bench_latency, markdown, peak_memory, word_errors

    lat = bench_latency("smoke", model, onnx_folder, threads=1, seconds=0.5, repeats=1, warmup=0)
    assert [r["layer"] for r in lat["exits"]] == [2, 4, 6]
    assert all(r[e]["median_ms"] > 0 for r in lat["exits"] for e in ("torch", "fp32", "int8"))
    child = peak_memory("runtime", onnx_folder, audio["a"], threads=1)
    assert child["torch_loaded"] is False and child["exit"] == 3 and child["peak_rss_bytes"] > 0
    assert word_errors("the cat sat", "the bat sat down") == (2, 3)
    sizes = {"smoke": {"fp32": 2.0e6, "int8": 1.0e6}}
    text = markdown({"latency": [lat], "sizes": sizes, "memory": {}})
    assert "| 3 | 6 |" in text and "0.500" in text


def test_the_decision_benchmark_times_every_deciding_exit(model, onnx_folder):
    from benchmarks.controller_decision import bench_decisions, markdown

    r = bench_decisions("smoke", model, onnx_folder, threads=1, seconds=0.5, repeats=1, warmup=0)
    assert [e["exit"] for e in r["exits"]] == [1, 2]  # the last exit decides nothing
    for e in r["exits"]:
        for engine in ("torch", "fp32"):
            row = e[engine]
            assert row["decision_ms"] > 0 and row["to_exit_ms"] >= row["segment_ms"]
            assert row["share_to_exit"] == pytest.approx(row["decision_ms"] / row["to_exit_ms"])
    first = r["exits"][0]["torch"]
    assert first["segment_ms"] == first["to_exit_ms"]  # the first segment includes the front end
    assert "| 2 | 4 |" in markdown([r])


def test_the_exported_front_end_computes_speechbrains_features(model):
    from speechbrain.nnet.attention import RelPosEncXL
    from speechbrain.processing.features import spectral_magnitude

    from earlyexit_brain.models.conformer import relative_positions
    from earlyexit_brain.onnx_graphs import FrontGraph

    front = FrontGraph(model)
    wavs, lens = 0.1 * torch.randn(2, 12345, generator=torch.Generator().manual_seed(0)), torch.tensor([1.0, 0.6])
    with torch.no_grad():
        stft = model.compute_features.compute_STFT(wavs)
        assert torch.allclose(front.stft(wavs), stft, atol=1e-5)
        assert torch.allclose(front.stft.power(wavs), spectral_magnitude(stft), atol=1e-5)
        assert torch.allclose(front.features(wavs, lens), model.features(wavs, lens), atol=1e-4)
    for length, dim in ((1, 32), (9, 32), (40, 144)):
        encoding = RelPosEncXL(dim)
        assert torch.equal(relative_positions(length, dim, encoding.inv_freq), encoding.make_pe(length))


def test_the_profile_sums_every_graph_run_by_operator(onnx_folder, tmp_path):
    """benchmarks.onnx_profile: onnxruntime's profiler over the full model, the warm-up left out;
    the operator totals are the graph totals, and every graph up to the last exit ran."""
    wav = (0.05 * np.random.default_rng(0).standard_normal((1, 16000))).astype(np.float32)
    for precision in ("fp32", "int8"):
        prof = ort_profile(onnx_folder, precision, 1, wav, np.ones(1, np.float32), 2, str(tmp_path))
        graphs = prof["by_graph_ms"]
        runtime = EarlyExitONNX.from_folder(onnx_folder, precision=precision)
        expected = {"front", f"head {runtime.num_exits}"} | {f"segment {k + 1}" for k in range(runtime.num_exits)}
        assert set(graphs) == expected and all(ms > 0 for ms in graphs.values())
        assert abs(sum(graphs.values()) - prof["total_ms"]) < 1e-6 * max(1.0, prof["total_ms"])
        assert ("MatMul" if precision == "fp32" else "MatMulInteger") in " ".join(prof["by_op_ms"])
    nodes = optimised_nodes(onnx_folder, "fp32", str(tmp_path))
    assert sum(nodes["after"].values()) <= sum(nodes["before"].values())
