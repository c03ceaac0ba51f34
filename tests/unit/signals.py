"""Generated test signals."""

import math

import numpy as np

SR = 16000


def tone(seconds, sr=SR, freq=220.0, amp=0.3, seed=0):
    t = np.arange(int(seconds * sr)) / sr
    rng = np.random.default_rng(seed)
    return (amp * np.sin(2 * math.pi * freq * t) + 0.01 * rng.standard_normal(len(t))).astype("float32")
