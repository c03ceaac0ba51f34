"""Run an exported early-exit model with onnxruntime, without PyTorch (docs/deployment.md).

Needs numpy, onnxruntime, sentencepiece and soundfile only (``pip install ".[runtime]"``);
importing or using it imports none of torch, torchaudio, SpeechBrain or transformers::

    from earlyexit_brain.runtime import EarlyExitONNX
    asr = EarlyExitONNX.from_folder("results/.../onnx", threads=2)
    asr.transcribe_file("speech.wav", policy="entropy")
"""

from .folder import is_onnx_folder  # noqa: F401
from .model import EarlyExitONNX, Transcription  # noqa: F401
