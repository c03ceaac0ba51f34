"""earlyexit_brain: early-exit speech recognition on SpeechBrain."""

__version__ = "0.1.0"
