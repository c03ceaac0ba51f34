"""An ``onnx/`` folder on disk (docs/deployment.md): its ``manifest.json``, the sha256 check of its
files, and the onnxruntime sessions of its graphs."""

import functools
import hashlib
import json
import os
import re
from typing import Dict, Optional, Sequence

import onnxruntime as ort

MANIFEST = "manifest.json"


FORMAT = "earlyexit_brain-onnx"


FORMAT_VERSION = 1


PRECISIONS = ("fp32", "int8")


def sha256_file(path: str) -> str:
    """Hex sha256 of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as fin:
        for block in iter(lambda: fin.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def is_onnx_folder(path: str) -> bool:
    """Whether ``path`` is a folder holding an ONNX export's ``manifest.json``."""
    return os.path.isfile(os.path.join(str(path), MANIFEST))


def read_manifest(folder: str) -> Dict:
    """The folder's manifest; a ValueError names the file when it is missing or not ours."""
    path = os.path.join(folder, MANIFEST)
    try:
        with open(path) as fin:
            manifest = json.load(fin)
    except FileNotFoundError:
        raise ValueError(
            f"{path}: no such file; {folder} is not an ONNX export (recipes/export.py writes one)"
        ) from None
    except (OSError, ValueError) as err:
        raise ValueError(f"{path}: cannot be read as JSON ({err})") from err
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise ValueError(f"{path}: not an earlyexit_brain ONNX manifest (format {FORMAT!r} expected)")
    if manifest.get("format_version", 0) > FORMAT_VERSION:
        raise ValueError(
            f"{path}: format_version {manifest['format_version']} is newer than this "
            f"runtime reads ({FORMAT_VERSION}); update earlyexit_brain"
        )
    return manifest


def check_files(folder: str, manifest: Dict, names: Sequence[str]):
    """Raise a ValueError naming the file unless every file in ``names`` exists and has the
    sha256 that the manifest records."""
    recorded = manifest.get("files", {})
    for name in names:
        path = os.path.join(folder, name)
        if name not in recorded:
            raise ValueError(f"{os.path.join(folder, MANIFEST)}: no sha256 recorded for {name}")
        if not os.path.isfile(path):
            raise ValueError(f"{path}: missing (listed in {MANIFEST})")
        found = sha256_file(path)
        if found != recorded[name]:
            raise ValueError(
                f"{path}: sha256 {found} does not match {MANIFEST} ({recorded[name]}); "
                f"the file was changed or corrupted after the export"
            )


@functools.cache
def shared_arena():
    """Register, once per process, the onnxruntime environment's CPU arena that the runtime's
    sessions share (``session.use_env_allocators``). Each graph has its own session, and a
    session's own arena keeps the largest blocks its graph ever asked for: with one arena per
    graph the model held the sum of every graph's peak, with a shared one it holds the largest
    (docs/deployment.md, Memory)."""
    info = ort.OrtMemoryInfo("Cpu", ort.OrtAllocatorType.ORT_ARENA_ALLOCATOR, 0, ort.OrtMemType.DEFAULT)
    ort.create_and_register_allocator(info, ort.OrtArenaCfg({}))


def session_options(threads: Optional[int], spinning: bool = False, shared_memory: bool = True) -> ort.SessionOptions:
    """onnxruntime options: ``threads`` intra-op threads (None: onnxruntime's default, one per
    physical core), graphs run one operator at a time, warnings only, and threads that sleep
    when a graph ends (``spinning`` False): each graph has its own session and thread pool, and
    pools spinning between runs (onnxruntime's default) take the cores from the next graph and
    from anything else running (benchmarks.onnx_profile times both). With ``shared_memory``
    every session allocates from one arena (:func:`shared_arena`) instead of its own."""
    options = ort.SessionOptions()
    if threads is not None:
        if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
            raise ValueError(f"threads: expected a positive number of threads, got {threads!r}")
        options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.log_severity_level = 3
    options.add_session_config_entry("session.intra_op.allow_spinning", "1" if spinning else "0")
    if shared_memory:
        shared_arena()
        options.add_session_config_entry("session.use_env_allocators", "1")
    return options


def open_session(path: str, options: ort.SessionOptions, opset) -> ort.InferenceSession:
    """An onnxruntime session of ``path`` on the CPU; a ValueError names the file and why."""
    try:
        return ort.InferenceSession(path, sess_options=options, providers=["CPUExecutionProvider"])
    except Exception as err:  # onnxruntime raises its own Fail / InvalidProtobuf / ... types
        text = str(err) or type(err).__name__
        found = re.search(r"[Oo]pset \d+[^.]*\.", text)  # "Opset 99 is under development ..."
        detail = found.group(0) if found else text.split("failed:")[-1].strip()[:300]
        raise ValueError(
            f"{path}: onnxruntime {ort.__version__} cannot load it (the manifest's opset is {opset}): {detail}"
        ) from err
