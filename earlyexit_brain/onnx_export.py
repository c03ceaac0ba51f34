"""Export an early-exit model to ONNX graphs that keep every exit live (docs/deployment.md).

:func:`export_onnx_folder` reads an inference folder (what
:class:`~earlyexit_brain.inference.EarlyExitASR` loads) and writes an ``onnx/`` folder that
:class:`~earlyexit_brain.runtime.EarlyExitONNX` runs without PyTorch::

    manifest.json            exits and layers, opset, versions, every graph's inputs/outputs
                             (names, shapes with named dynamic axes), the agreement measured,
                             the sha256 of every file
    fp32/front.onnx          waveform -> Fbank -> normalisation -> convolutional front end
                             -> projection: x (B, T', D), frames (B,), pos_embs (1, 2T'-1, D)
    fp32/segment_<k>.onnx    the encoder layers between exit k-1 and exit k: x, frames
                             (, pos_embs) -> x
    fp32/head_<k>.onnx       exit k's LayerNorm, linear and log-softmax: x -> log_probs (B, T', V)
                             and hidden (B, T', D), the normalised states (the learned policy's)
    fp32/latency_table.json  per-exit latency measured in onnxruntime (the budget policy's)
    int8/...                 with ``int8=True``: the same graphs with dynamically quantised
                             int8 weights (onnxruntime.quantization.quantize_dynamic)
    tokenizer.model          the SentencePiece model
    policies.json            the calibrated thresholds and the learned exit controller, if any
                             (the inference folder's exit_policies.ckpt)

Exit ``k`` of the runtime runs the front end, segments 1..k and head k: exactly the layers
:meth:`EarlyExitConformerEncoder.advance <earlyexit_brain.models.conformer.EarlyExitConformerEncoder.advance>`
runs. Before the manifest is written, a few utterances go through onnxruntime and PyTorch
and the export is refused (:class:`ExportMismatchError`, naming the exit and the difference)
if any exit's log-probabilities differ by more than ``tolerance``. Graphs of one structure
(evenly spaced Conformer segments, heads) are exported once and copied with each further
module's weights, every copy checked against its module.

One concept, the folder's writer (the reason this module is over 400 lines): graphs, their
copies, int8, the agreement check, the latency table and the manifest.
"""

import functools
import json
import logging
import os
import shutil
import time
import warnings
from typing import Dict, List, Optional, Sequence

import numpy as np
import onnx
import onnx.numpy_helper
import onnxruntime as ort
import torch
from torch import nn

from .files import atomic_folder, atomic_write_text
from .inference import EarlyExitASR
from .models.conformer import EarlyExitConformerEncoder
from .models.splitformer import SplitformerEncoder
from .models.ssl import EarlyExitSSLEncoder
from .onnx_graphs import FrontGraph, HeadGraph, SegmentGraph, SSLFrontGraph, SSLSegmentGraph
from .runtime.audio import read_audio
from .runtime.folder import FORMAT, FORMAT_VERSION, MANIFEST, sha256_file
from .runtime.model import EarlyExitONNX
from .runtime.policies import RUNTIME_POLICIES, fit_latency
from .utils import padding_mask

logger = logging.getLogger(__name__)

OPSET = 18  # LayerNormalization is an operator; onnxruntime >= 1.14 runs it
TOLERANCE = 1e-3  # largest |log p| difference between onnxruntime fp32 and PyTorch at any exit
#: int8 weights of the matrix products only (the segments' pointwise convolutions are exported as
#: matrix products, onnx_graphs.PointwiseConv): onnxruntime's ConvInteger is slower than its fp32 Conv,
#: so the depthwise convolutions and the front end's (the STFT's DFT basis among them) stay fp32
INT8_OPS = ("MatMul",)


class ExportMismatchError(ValueError):
    """An exit's onnxruntime output differs from PyTorch's beyond the tolerance."""


# ---------------------------------------------------------------- source
def resolve_source(source: str) -> str:
    """The inference folder of ``source`` (an experiment folder or an inference folder); a
    ValueError names what is missing."""
    source = os.path.abspath(source)
    if not os.path.isdir(source):
        raise ValueError(f"{source}: no such experiment or inference folder")
    folder = source if os.path.isfile(os.path.join(source, "hyperparams.yaml")) else os.path.join(source, "inference")
    if not os.path.isfile(os.path.join(folder, "hyperparams.yaml")):
        raise ValueError(
            f"{source}: neither an inference folder (hyperparams.yaml) nor an experiment "
            f"folder with inference/ (train.py or recipes/evaluate.py writes it)"
        )
    for name, what in (("model.ckpt", "weights"), ("tokenizer.ckpt", "tokenizer")):
        if not os.path.isfile(os.path.join(folder, name)):
            raise ValueError(f"{os.path.join(folder, name)}: missing; the inference folder has no {what}")
    return folder


EXPORTED_ENCODERS = (EarlyExitConformerEncoder, SplitformerEncoder, EarlyExitSSLEncoder)


def check_exportable(model):
    """A ValueError naming the encoder unless this exporter covers it."""
    if type(model.encoder) not in EXPORTED_ENCODERS:  # a subclass may compute its exits otherwise
        raise ValueError(
            f"encoder: {type(model.encoder).__name__} is not exported to ONNX (only "
            f"{', '.join(e.__name__ for e in EXPORTED_ENCODERS)} are; see docs/deployment.md)"
        )


def probe_signals(sample_rate: int, seconds: Sequence[float] = (1.3, 2.1, 0.9), seed: int = 0) -> List[np.ndarray]:
    """Deterministic test signals: harmonic tones with a moving pitch, an envelope and noise."""
    rng = np.random.default_rng(seed)
    out = []
    for i, sec in enumerate(seconds):
        t = np.arange(int(sec * sample_rate)) / sample_rate
        f0 = 120 + 40 * i + 30 * np.sin(2 * np.pi * 0.7 * t)
        phase = 2 * np.pi * np.cumsum(f0) / sample_rate
        sig = sum(np.sin(h * phase) / h for h in range(1, 6)) * (0.5 + 0.5 * np.sin(2 * np.pi * 2.3 * t) ** 2)
        out.append((0.2 * sig + 0.01 * rng.standard_normal(len(t))).astype(np.float32))
    return out


def pad_batch(signals: Sequence[np.ndarray]):
    """``(B, S)`` zero-padded float32 batch and relative lengths."""
    longest = max(len(s) for s in signals)
    wavs = np.zeros((len(signals), longest), np.float32)
    for i, s in enumerate(signals):
        wavs[i, : len(s)] = s
    return wavs, np.array([len(s) / longest for s in signals], np.float32)


@torch.no_grad()
def torch_exit_log_probs(model, wavs: np.ndarray, lens: np.ndarray) -> List[np.ndarray]:
    """Every exit's log-probabilities of the PyTorch model (``start`` / ``advance`` / head)."""
    w, rel = torch.from_numpy(wavs), torch.from_numpy(lens)
    state = model.encoder.start(model.features(w, rel), rel)
    return [model.heads.forward_exit(k, model.encoder.advance(state, k)).numpy() for k in range(model.num_exits)]


# ---------------------------------------------------------------- export steps
def _export(module: nn.Module, args, path: str, inputs: List[str], outputs: List[str], dims, opset: int):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            module.eval(),
            args,
            path,
            input_names=inputs,
            output_names=outputs,
            dynamic_shapes=dims,
            opset_version=opset,
            dynamo=True,
            external_data=False,
            verbose=False,
        )


def _weight_sources(graph: onnx.GraphProto, state: Dict[str, np.ndarray]) -> Optional[Dict[str, tuple]]:
    """For each initializer of ``graph`` (exported from a module whose ``state_dict`` is
    ``state``): the state entry it was made of and how (``"same"``, or ``"T"``: transposed, then
    reshaped to the initializer's shape), or None for a constant that is no state entry's. The
    exporter keeps parameter names for some initializers and folds others (a weight transposed
    for MatMul, a bias reshaped) into anonymous ones, which are matched by value here. None when
    an initializer matches several entries that would give different results."""
    sources: Dict[str, tuple] = {}
    for init in graph.initializer:
        value = onnx.numpy_helper.to_array(init)
        if init.name in state and state[init.name].shape == value.shape:
            sources[init.name] = (init.name, "same")
            continue
        found = set()
        for name, tensor in state.items():
            if tensor.size != value.size or tensor.dtype != value.dtype or tensor.size < 2:
                continue
            if np.array_equal(tensor.reshape(value.shape), value):
                found.add((name, "same"))
            elif tensor.ndim == 2 and np.array_equal(tensor.T.reshape(value.shape), value):
                found.add((name, "T"))
        if len(found) > 1:
            return None  # ambiguous (e.g. two LayerNorms still at their initial ones)
        sources[init.name] = found.pop() if found else None
    return sources


def _state(module: nn.Module) -> Dict[str, np.ndarray]:
    return {k: v.detach().cpu().numpy() for k, v in module.state_dict().items()}


class _ExportedGraph:
    """A graph the exporter wrote (``path``) and the module it came from: the template of the
    copies :func:`_export_like` makes, its initializers' sources (:func:`_weight_sources`) found
    once for all of them."""

    def __init__(self, path: str, module: nn.Module):
        self.path, self.module = path, module

    @functools.cached_property
    def state(self) -> Dict[str, np.ndarray]:
        return _state(self.module)

    @functools.cached_property
    def sources(self) -> Optional[Dict[str, tuple]]:
        return _weight_sources(onnx.load(self.path).graph, self.state)


def _export_like(done: _ExportedGraph, module: nn.Module, args, path: str) -> Optional[Dict]:
    """Write ``module``'s graph to ``path`` as a copy of the graph already exported from a module
    of the same structure (``done``) with ``module``'s weights put in, and check it against
    ``module`` in PyTorch on ``args``: the copy's inputs and outputs (:func:`_io`), or None
    (``path`` removed) when the two modules' weights do not line up or the copy's output differs,
    and the caller exports."""
    old, new = done.state, _state(module)
    if old.keys() != new.keys() or any(old[k].shape != new[k].shape for k in old):
        return None
    sources = done.sources
    if sources is None:
        return None
    graph = onnx.load(done.path)
    for init in graph.graph.initializer:
        source = sources[init.name]
        if source is not None:
            name, how = source
            value = (new[name].T if how == "T" else new[name]).reshape(tuple(init.dims))
            init.CopyFrom(onnx.numpy_helper.from_array(np.ascontiguousarray(value), init.name))
    onnx.save(graph, path)
    with torch.no_grad():
        expected = module.eval()(*args)
    expected = [t.numpy() for t in (expected if isinstance(expected, tuple) else (expected,))]
    sess = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    got = sess.run(None, {i.name: a.numpy() for i, a in zip(sess.get_inputs(), args)})
    if len(got) == len(expected) and all(
        g.shape == e.shape and np.allclose(g, e, rtol=1e-4, atol=1e-4) for g, e in zip(got, expected)
    ):
        return _io(sess)
    os.remove(path)
    return None


def _io(graph) -> Dict:
    """Input and output names, shapes (named dynamic axes) and types as onnxruntime sees them, of
    the graph file ``graph`` or of an open session."""
    sess = ort.InferenceSession(graph, providers=["CPUExecutionProvider"]) if isinstance(graph, str) else graph
    describe = lambda args: [{"name": a.name, "shape": list(a.shape), "dtype": a.type} for a in args]  # noqa: E731
    return {"inputs": describe(sess.get_inputs()), "outputs": describe(sess.get_outputs())}


def export_graphs(model, folder: str, opset: int = OPSET, sample_rate: int = 16000) -> Dict:
    """Write the fp32 front end, segments and heads into ``folder``; their manifest entries."""
    os.makedirs(folder, exist_ok=True)
    encoder = model.encoder
    batch, samples = torch.export.Dim("batch"), torch.export.Dim("samples", min=max(2, model.min_samples))
    frames_dim, positions = torch.export.Dim("frames"), torch.export.Dim("positions")
    wavs, lens = pad_batch(probe_signals(sample_rate, seconds=(1.0, 0.7)))
    wavs, lens = torch.from_numpy(wavs), torch.from_numpy(lens)
    ssl = isinstance(encoder, EarlyExitSSLEncoder)
    relative = not ssl and encoder.positional_encoding is not None
    names = ["x", "frames"] + (["pos_embs"] if relative else [])
    entry: Dict = {"segments": [], "heads": []}
    path = os.path.join(folder, "front.onnx")
    front = SSLFrontGraph(model) if ssl else FrontGraph(model)
    _export(front, (wavs, lens), path, ["wavs", "wav_lens"], names, ({0: batch, 1: samples}, {0: batch}), opset)
    entry["front"] = {"file": path, **_io(path)}
    with torch.no_grad():
        state = front(wavs, lens)
    x = state[0].detach()
    seg_dims = ({0: batch, 1: frames_dim}, {0: batch}) + (({1: positions},) if relative else ())
    seg_args = (x,) + tuple(s.detach() for s in state[1:])
    exported: Dict[str, _ExportedGraph] = {}  # graphs of one structure: exported once, then copied

    def export_or_reuse(module, args, path, inputs, outputs, dims):
        # the modules' layout (their weights' names and shapes are checked as well); an SSL
        # segment holds the whole encoder, so every SSL segment is exported
        key = None if isinstance(module, SSLSegmentGraph) else repr(module)
        io = _export_like(exported[key], module, args, path) if key in exported else None
        if io is not None:
            logger.info(
                "%s: %s with this graph's weights", os.path.basename(path), os.path.basename(exported[key].path)
            )
            return io
        _export(module, args, path, inputs, outputs, dims, opset)
        logger.info("%s: exported", os.path.basename(path))
        if key is not None:
            exported.setdefault(key, _ExportedGraph(path, module))
        return _io(path)

    start = 0
    for k, stop in enumerate(encoder.exit_layers):
        path = os.path.join(folder, f"segment_{k + 1}.onnx")
        branch = encoder.branch_of(k) if isinstance(encoder, SplitformerEncoder) else None
        segment = SSLSegmentGraph(encoder, start, stop) if ssl else SegmentGraph(encoder, start, stop, branch)
        io = export_or_reuse(segment, seg_args, path, names, ["x_out"], seg_dims)
        extra = {"branch_layers": len(branch.layers), "branch_factor": branch.factor} if branch is not None else {}
        entry["segments"].append({"file": path, "layers": [start + 1, stop], **extra, **io})
        path = os.path.join(folder, f"head_{k + 1}.onnx")
        io = export_or_reuse(
            HeadGraph(model, k), (x,), path, ["x"], ["log_probs", "hidden"], ({0: batch, 1: frames_dim},)
        )
        entry["heads"].append({"file": path, "exit_layer": stop, **io})
        start = stop
    return entry


def quantize_graphs(fp32: Dict, folder: str) -> Dict:
    """int8 copies of the fp32 graphs (onnxruntime.quantization.quantize_dynamic: the MatMul
    weights, :data:`INT8_OPS`; every convolution stays fp32); their manifest entries."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    os.makedirs(folder, exist_ok=True)

    def one(item: Dict) -> Dict:
        path = os.path.join(folder, os.path.basename(item["file"]))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            quantize_dynamic(item["file"], path, op_types_to_quantize=list(INT8_OPS), weight_type=QuantType.QInt8)
        return {**item, "file": path, **_io(path)}

    return {
        "front": one(fp32["front"]),
        "segments": [one(s) for s in fp32["segments"]],
        "heads": [one(h) for h in fp32["heads"]],
    }


def compare(model, runtime: EarlyExitONNX, signals: Sequence[np.ndarray]) -> Dict:
    """Largest |log p| difference per exit between onnxruntime and PyTorch over the valid frames,
    for the padded batch of ``signals`` and each one alone, and the share of frames whose best
    token agrees."""
    worst = np.zeros(model.num_exits)
    same = np.zeros(model.num_exits)
    total = 0
    batches = [pad_batch(signals)] + [pad_batch([s]) for s in signals]
    for wavs, lens in batches:
        ours, ref = runtime.exit_log_probs(wavs, lens), torch_exit_log_probs(model, wavs, lens)
        frames = np.clip(np.round(lens * ref[0].shape[1]).astype(np.int64), 1, ref[0].shape[1])
        n = int(frames.sum())
        total += n
        for k in range(model.num_exits):
            if ours[k].shape != ref[k].shape:
                raise ExportMismatchError(
                    f"exit {k + 1}: onnxruntime gives shape {ours[k].shape}, PyTorch {ref[k].shape}"
                )
            valid = ~padding_mask(torch.from_numpy(frames), ref[k].shape[1]).numpy()
            diff = np.abs(ours[k] - ref[k])[valid]
            worst[k] = max(worst[k], float(diff.max()) if diff.size else 0.0)
            same[k] += float((ours[k].argmax(-1) == ref[k].argmax(-1))[valid].sum())
    return {
        "max_abs_diff": [float(f"{v:.3g}") for v in worst],
        "same_best_token": [round(float(v / total), 6) for v in same],
        "frames": total,
        "utterances": len(signals),
    }


def check_agreement(agreement: Dict, tolerance: float, exit_layers: Sequence[int]):
    """Raise :class:`ExportMismatchError` naming the first exit whose largest |log p| difference
    (:func:`compare`) is above ``tolerance``."""
    for k, diff in enumerate(agreement["max_abs_diff"]):
        if not diff <= tolerance:
            raise ExportMismatchError(
                f"exit {k + 1} (layer {exit_layers[k]}): onnxruntime and PyTorch log-probabilities "
                f"differ by up to {diff:.3g} (tolerance {tolerance:g}); the export is refused"
            )


def measure_latency(runtime: EarlyExitONNX, durations: Sequence[float], repeats: int, seed: int = 0) -> Dict:
    """The runtime's batch-1 latency to every exit (median of ``repeats`` runs after one warm-up,
    front end to the exit's log-probabilities) on low-level noise, fitted per exit."""
    rng = np.random.default_rng(seed)
    points = []
    for seconds in durations:
        wav = (0.01 * rng.standard_normal((1, int(seconds * runtime.sample_rate)))).astype(np.float32)
        runs = []
        for r in range(repeats + 1):
            ms, start = [], time.perf_counter()
            x, frames, pos = runtime._run_front(wav, np.ones(1, np.float32))
            for k in range(runtime.num_exits):
                x = runtime._run_segment(k, x, frames, pos)
                runtime._run_head(k, x)
                ms.append(1000.0 * (time.perf_counter() - start))
            if r:
                runs.append(ms)
        points.append({"seconds": float(seconds), "ms": [round(float(v), 3) for v in np.median(runs, 0)]})
    table = fit_latency(points)
    table.update(device="cpu:onnxruntime", threads=runtime.threads or 0)
    return table


def runtime_default_policy(policies: Dict, num_exits: int) -> Dict:
    """The stored default policy if the runtime has it; otherwise (the N-best posterior) the greedy
    posterior with its calibrated threshold, or the last exit."""
    default = policies.get("default")
    if not default:
        return {"policy": "fixed", "exit": num_exits}
    if default.get("policy") in RUNTIME_POLICIES:
        return dict(default)
    greedy = policies.get("thresholds", {}).get("posterior_greedy")
    if greedy is not None:
        return {
            "policy": "posterior_greedy",
            "threshold": greedy,
            "note": f"the stored default ({default.get('policy')}) is not in the runtime",
        }
    return {
        "policy": "fixed",
        "exit": num_exits,
        "note": f"the stored default ({default.get('policy')}) is not in the runtime",
    }


def export_onnx_folder(
    source: str,
    out: Optional[str] = None,
    int8: bool = False,
    opset: int = OPSET,
    tolerance: float = TOLERANCE,
    audio: Sequence[str] = (),
    latency_durations: Sequence[float] = (2.0, 5.0, 10.0),
    latency_repeats: int = 3,
    threads: Optional[int] = None,
) -> str:
    """Export the model of ``source`` (an experiment or inference folder) to ``out`` (default:
    ``onnx/`` beside the inference folder); returns its path.

    ``audio``: files to compare onnxruntime with PyTorch on (default: generated tones);
    ``tolerance``: the largest |log p| difference accepted at any exit (fp32; int8's is
    measured and recorded, not enforced); ``latency_durations`` / ``latency_repeats``: the
    runtime's latency table; ``threads``: onnxruntime's threads while measuring it. The folder
    is built beside its destination and moved into place only when complete
    (:func:`~earlyexit_brain.files.atomic_folder`); an existing ``out`` not made by this
    export is refused, naming ``--out``.
    """
    folder = resolve_source(source)
    out = os.path.abspath(out or os.path.join(os.path.dirname(folder), "onnx"))
    asr = EarlyExitASR.from_hparams(source=folder, savedir=folder)
    model = asr.model.cpu().eval()
    check_exportable(model)
    signals = [read_audio(p, int(asr.hparams.sample_rate)) for p in audio] or probe_signals(
        int(asr.hparams.sample_rate)
    )
    short = [len(s) for s in signals if len(s) < model.min_samples]
    if short:
        raise ValueError(
            f"audio: a comparison signal has {short[0]} samples, fewer than the model's {model.min_samples}"
        )
    with atomic_folder(out, "onnx_folder", "--out", prefix=".onnx-") as tmp:
        precisions = {"fp32": export_graphs(model, os.path.join(tmp, "fp32"), opset, int(asr.hparams.sample_rate))}
        if int8:
            precisions["int8"] = quantize_graphs(precisions["fp32"], os.path.join(tmp, "int8"))
        shutil.copyfile(os.path.join(folder, "tokenizer.ckpt"), os.path.join(tmp, "tokenizer.model"))
        policies = asr.policies.to_json()
        atomic_write_text(os.path.join(tmp, "policies.json"), json.dumps(policies, indent=2) + "\n")
        manifest = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "sample_rate": int(asr.hparams.sample_rate),
            "blank_index": int(asr.hparams.blank_index),
            "vocab_size": int(model.heads.heads[0].out_features),
            "min_samples": int(model.min_samples),
            "exit_layers": list(model.exit_layers),
            "compute_layers": [int(v) for v in model.encoder.exit_compute_layers],
            "num_layers": int(model.encoder.num_layers),
            "decoding": "ctc_greedy",
            "default_policy": runtime_default_policy(policies, model.num_exits),
            "decoders_exported": False if model.has_decoders else None,
            "opset": opset,
            "onnxruntime_version": ort.__version__,
            "torch_version": torch.__version__,
            "tokenizer": "tokenizer.model",
            "policies": "policies.json",
            "tolerance": tolerance,
        }
        for entries in precisions.values():  # paths relative to the folder
            for item in [entries["front"]] + entries["segments"] + entries["heads"]:
                item["file"] = os.path.relpath(item["file"], tmp)
        manifest["precisions"] = precisions
        _write_manifest(tmp, manifest)  # provisional: the runtime loads the folder to be checked
        for name in precisions:
            runtime = EarlyExitONNX.from_folder(tmp, precision=name, threads=threads)
            agreement = compare(model, runtime, signals)
            precisions[name]["agreement"] = agreement
            if name == "fp32":
                check_agreement(agreement, tolerance, model.exit_layers)
            table = measure_latency(runtime, latency_durations, latency_repeats)
            table_name = f"{name}/latency_table.json"
            atomic_write_text(os.path.join(tmp, table_name), json.dumps(table, indent=2) + "\n")
            precisions[name]["latency_table"] = table_name
        _write_manifest(tmp, manifest)
    return out


def _write_manifest(folder: str, manifest: Dict):
    """Write ``manifest.json`` with the sha256 of every file in ``folder`` (bar itself)."""
    files = {}
    for root, _, names in os.walk(folder):
        for name in sorted(names):
            rel = os.path.relpath(os.path.join(root, name), folder)
            if rel != MANIFEST and not name.startswith("."):
                files[rel] = sha256_file(os.path.join(root, name))
    manifest["files"] = dict(sorted(files.items()))
    atomic_write_text(os.path.join(folder, MANIFEST), json.dumps(manifest, indent=2) + "\n")
